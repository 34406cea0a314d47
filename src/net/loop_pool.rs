//! EventLoopThreadPool (seed 3.4): the loops that serve connections, and
//! the round-robin choice of the next one for a new connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::net::event_loop::LoopShared;
use crate::net::NetOptions;

pub(crate) struct LoopPool {
    loops: Vec<Arc<LoopShared>>,
    next: AtomicUsize,
}

impl LoopPool {
    /// `loops` must not be empty.
    pub(crate) fn new(loops: Vec<Arc<LoopShared>>) -> LoopPool {
        assert!(!loops.is_empty(), "a loop pool needs a loop");
        LoopPool { loops, next: AtomicUsize::new(0) }
    }

    /// The loop for the next connection, in turn.
    pub(crate) fn next_loop(&self) -> Arc<LoopShared> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.loops[n % self.loops.len()].clone()
    }

    /// Admits a new connection: the next loop in turn that has room takes
    /// it, counted at once (the loop releases it when it closes). None when
    /// the server holds `max_connections` or no loop has room.
    pub(crate) fn admit(&self, opts: &NetOptions) -> Option<Arc<LoopShared>> {
        if opts.open.fetch_add(1, Ordering::SeqCst) >= opts.max_connections {
            opts.open.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        for _ in 0..self.loops.len() {
            let target = self.next_loop();
            if target.counters.live.fetch_add(1, Ordering::SeqCst) < opts.max_connections_per_loop {
                return Some(target);
            }
            target.counters.live.fetch_sub(1, Ordering::SeqCst);
        }
        opts.open.fetch_sub(1, Ordering::SeqCst);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loops_take_turns() {
        let loops: Vec<_> = (0..3).map(|_| LoopShared::new().unwrap()).collect();
        let pool = LoopPool::new(loops.clone());
        for round in 0..3 {
            for expected in &loops {
                assert!(Arc::ptr_eq(&pool.next_loop(), expected), "round {round}");
            }
        }
    }
}
