//! EventLoopThreadPool (seed 3.4): the loops that serve connections, and
//! the round-robin choice of the next one for a new connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::net::event_loop::LoopShared;

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
