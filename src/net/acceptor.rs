//! Acceptor (seed 3.3): runs on the main loop and accepts connections on
//! the listening socket, multishot where the kernel has it (5.19), else
//! one at a time; re-arms when a completion comes without
//! `IORING_CQE_F_MORE`; hands each connection to the next loop of the pool.
//! Out of descriptors or memory (EMFILE, ENFILE), it pauses for a moment
//! instead of spinning or giving up.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use io_uring::squeue::Entry;

use crate::net::event_loop::LoopShared;
use crate::net::loop_pool::{Admission, LoopPool};
use crate::net::op::{accept, cancel, OpKind};
use crate::net::NetOptions;

/// What a completion of the accept (or its retry timer) asks the loop to do.
pub(crate) enum AcceptOutcome {
    /// A new connection, and the accept to submit if it is not armed any more.
    Connection(OwnedFd, Option<Entry>),
    /// Submit this accept.
    Rearm(Entry),
    /// Wait, then `resume`.
    Pause,
    Nothing,
}

pub(crate) struct Acceptor {
    listener: Option<OwnedFd>,
    multishot: bool,
    /// The accept or the retry timer, whichever is in flight.
    in_flight: Option<OpKind>,
    stopping: bool,
    pool: Arc<LoopPool>,
}

impl Acceptor {
    pub(crate) fn new(listener: OwnedFd, pool: Arc<LoopPool>) -> Acceptor {
        Acceptor { listener: Some(listener), multishot: true, in_flight: None, stopping: false, pool }
    }

    fn prepare(&mut self) -> Option<Entry> {
        let listener = self.listener.as_ref()?;
        self.in_flight = Some(OpKind::Accept);
        Some(accept::prepare(listener.as_raw_fd(), self.multishot))
    }

    /// The first accept.
    pub(crate) fn arm(&mut self) -> Entry {
        match self.prepare() {
            Some(entry) => entry,
            None => unreachable!("the acceptor is armed once, with its listener"),
        }
    }

    /// Applies an accept completion. `more`: the multishot accept stays armed.
    pub(crate) fn on_complete(&mut self, result: i32, more: bool, loop_stopping: bool) -> AcceptOutcome {
        if !more {
            self.in_flight = None;
        }
        if result >= 0 {
            // SAFETY: the kernel just created this descriptor for us.
            let fd = unsafe { OwnedFd::from_raw_fd(result) };
            let stopping = self.stopping || loop_stopping;
            let rearm = if more || stopping { None } else { self.prepare() };
            if stopping {
                self.close_if_idle();
            }
            return AcceptOutcome::Connection(fd, rearm);
        }
        let errno = -result;
        if self.stopping || loop_stopping || errno == libc::ECANCELED {
            self.close_if_idle();
            return AcceptOutcome::Nothing;
        }
        if errno == libc::EINVAL && self.multishot {
            // A kernel without multishot accept.
            self.multishot = false;
            return self.prepare().map_or(AcceptOutcome::Nothing, AcceptOutcome::Rearm);
        }
        if more {
            return AcceptOutcome::Nothing;
        }
        if accept::is_resource_error(errno) {
            self.in_flight = Some(OpKind::AcceptRetry);
            return AcceptOutcome::Pause;
        }
        if !accept::is_connection_error(errno) {
            eprintln!("ioengine: accept failed: {}; retrying", std::io::Error::from_raw_os_error(errno));
        }
        self.prepare().map_or(AcceptOutcome::Nothing, AcceptOutcome::Rearm)
    }

    /// The retry timer fired (or was cancelled): accept again unless stopping.
    pub(crate) fn resume(&mut self, loop_stopping: bool) -> Option<Entry> {
        self.in_flight = None;
        if self.stopping || loop_stopping {
            self.close_if_idle();
            return None;
        }
        self.prepare()
    }

    /// Stops accepting: returns the cancellation to submit, if an accept or
    /// the timer is in flight; the listener closes once it completed.
    pub(crate) fn stop(&mut self) -> Option<Entry> {
        self.stopping = true;
        match self.in_flight {
            Some(kind) => Some(cancel::prepare_loop_op(kind)),
            None => {
                self.close_if_idle();
                None
            }
        }
    }

    fn close_if_idle(&mut self) {
        if self.in_flight.is_none() {
            self.listener = None;
        }
    }

    /// Whether the listener is closed and nothing of the acceptor is in flight.
    pub(crate) fn closed(&self) -> bool {
        self.listener.is_none() && self.in_flight.is_none()
    }

    /// Hands a new connection to the next loop with room: returns it if
    /// that loop is the caller's own (`this`), else posts it there. With no
    /// room (max_connections) it is closed and counted as rejected.
    pub(crate) fn dispatch(&self, fd: OwnedFd, this: &Arc<LoopShared>, opts: &Arc<NetOptions>) -> Option<Admission> {
        dispatch(&self.pool, fd, this, opts)
    }
}

/// See `Acceptor::dispatch` (the epoll loop's acceptor uses it too).
pub(crate) fn dispatch(
    pool: &LoopPool,
    fd: OwnedFd,
    this: &Arc<LoopShared>,
    opts: &Arc<NetOptions>,
) -> Option<Admission> {
    let admission = match pool.admit(fd, opts) {
        Ok(admission) => admission,
        Err(_closed_on_drop) => {
            this.counters.rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return None;
        }
    };
    if admission.owned_by(this) {
        return Some(admission);
    }
    admission.post();
    None
}
