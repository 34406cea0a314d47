//! EventLoopThreadPool (seed 3.4): the loops that serve connections, and
//! the round-robin choice of the next one for a new connection.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::net::event_loop::{LoopShared, Task};
use crate::net::NetOptions;

/// A new connection counted in for its loop (`LoopPool::admit`) and on its
/// way there. Whatever path drops it without the loop taking it (the loop
/// is stopping or has ended, epoll refused the descriptor) closes the
/// connection, counts it as rejected and gives its place back, so the
/// server's counts always balance.
pub(crate) struct Admission {
    fd: Option<OwnedFd>,
    opts: Arc<NetOptions>,
    owner: Arc<LoopShared>,
}

impl Admission {
    /// The loop takes the connection: from now on it releases the place
    /// when the connection closes.
    pub(crate) fn take(mut self) -> OwnedFd {
        match self.fd.take() {
            Some(fd) => fd,
            None => unreachable!("an admission is taken once"),
        }
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |fd| fd.as_raw_fd())
    }

    pub(crate) fn owned_by(&self, this: &Arc<LoopShared>) -> bool {
        Arc::ptr_eq(&self.owner, this)
    }

    /// Hands it to its loop (which may have ended: the task is then dropped).
    pub(crate) fn post(self) {
        let owner = self.owner.clone();
        owner.post(Task::Adopt(self));
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.fd.take().is_some() {
            self.owner.counters.rejected.fetch_add(1, Ordering::Relaxed);
            self.opts.release(&self.owner);
        }
    }
}

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
    /// it, counted at once (the loop releases it when it closes). Gives the
    /// descriptor back when the server holds `max_connections` or no loop
    /// has room.
    pub(crate) fn admit(&self, fd: OwnedFd, opts: &Arc<NetOptions>) -> Result<Admission, OwnedFd> {
        match self.admit_loop(opts) {
            Some(owner) => Ok(Admission { fd: Some(fd), opts: opts.clone(), owner }),
            None => Err(fd),
        }
    }

    fn admit_loop(&self, opts: &NetOptions) -> Option<Arc<LoopShared>> {
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
