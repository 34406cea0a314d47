//! Watching half-closed connections on the io_uring loop for a later reset.
//!
//! After the peer's end of file a socket reports POLLRDHUP for good, and an
//! io_uring poll always waits for POLLRDHUP whatever mask it is given, so a
//! poll on the socket itself would complete at once. Without a watch, a
//! peer that half-closes and then resets would go unnoticed (and keep its
//! place under max_connections) until the application sends. So the loop
//! keeps an epoll set of its own, made on first use, holding such sockets
//! with no events asked for (epoll then reports only EPOLLERR and EPOLLHUP),
//! and one poll for that set's readiness stays armed on the ring while the
//! set holds any socket. epoll does the watching; the ring only learns
//! that something happened. Closing a socket takes it out of the set; once
//! the set is empty its poll is cancelled and the set closed, so an idle
//! loop holds no descriptor for it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use io_uring::opcode;
use io_uring::squeue::Entry;
use io_uring::types::Fd;

use crate::net::op::{OpKind, OpTag};

/// Events read from the set per completion; more wait for the next one.
const BATCH: usize = 64;

pub(crate) struct EofWatch {
    set: Option<OwnedFd>,
    /// Sockets in the set (connections closing leave it as they close).
    watched: usize,
    /// The poll on the set is in flight.
    pub(crate) armed: bool,
    /// A cancel of that poll is in flight (the set emptied).
    cancelling: bool,
}

impl EofWatch {
    pub(crate) fn new() -> EofWatch {
        EofWatch { set: None, watched: 0, armed: false, cancelling: false }
    }

    fn set_fd(&mut self) -> io::Result<RawFd> {
        if let Some(set) = &self.set {
            return Ok(set.as_raw_fd());
        }
        // SAFETY: plain epoll_create1.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nothing else owns.
        let set = unsafe { OwnedFd::from_raw_fd(raw) };
        self.set = Some(set);
        Ok(raw)
    }

    /// Adds a half-closed connection's socket; `tag` comes back when it
    /// fails or hangs up. Returns the poll to submit if none is armed.
    pub(crate) fn watch(&mut self, fd: RawFd, tag: OpTag) -> io::Result<Option<Entry>> {
        let set = self.set_fd()?;
        let mut event = libc::epoll_event { events: 0, u64: tag.encode() };
        // SAFETY: epoll_ctl on our set with an event on our stack.
        if unsafe { libc::epoll_ctl(set, libc::EPOLL_CTL_ADD, fd, &mut event) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.watched += 1;
        Ok(self.arm())
    }

    /// Takes a socket out of the set (it reported; the loop deals with it).
    pub(crate) fn unwatch(&mut self, fd: RawFd) {
        if let Some(set) = &self.set {
            // SAFETY: epoll_ctl on our set; the event argument may be null for DEL.
            unsafe { libc::epoll_ctl(set.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
        }
        self.watched -= 1;
    }

    /// A watched connection closed (its close removed it from the set).
    pub(crate) fn forget(&mut self) {
        self.watched -= 1;
    }

    /// With no socket left in the set: closes it, or first returns the
    /// cancel of its poll (the set closes when the poll ends, `ended`).
    pub(crate) fn release_if_empty(&mut self) -> Option<Entry> {
        if self.watched > 0 || self.set.is_none() {
            return None;
        }
        if !self.armed {
            self.set = None;
            return None;
        }
        if self.cancelling {
            return None;
        }
        self.cancelling = true;
        Some(crate::net::op::cancel::prepare_loop_op(OpKind::EofWatch))
    }

    /// The poll on the set completed (reported, or was cancelled).
    pub(crate) fn ended(&mut self) {
        self.armed = false;
        self.cancelling = false;
    }

    /// The poll on the set, if sockets are watched and none is armed.
    pub(crate) fn arm(&mut self) -> Option<Entry> {
        let set = self.set.as_ref()?.as_raw_fd();
        if self.armed || self.watched == 0 {
            return None;
        }
        self.armed = true;
        Some(
            opcode::PollAdd::new(Fd(set), libc::POLLIN as u32)
                .build()
                .user_data(OpTag::loop_op(OpKind::EofWatch).encode()),
        )
    }

    /// The poll completed: the connections whose sockets failed or hung up.
    pub(crate) fn ready(&mut self) -> Vec<OpTag> {
        let Some(set) = &self.set else { return Vec::new() };
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
        // SAFETY: epoll_wait into our array of BATCH entries, without waiting.
        let n = unsafe { libc::epoll_wait(set.as_raw_fd(), events.as_mut_ptr(), BATCH as i32, 0) };
        events[..n.max(0) as usize].iter().filter_map(|e| OpTag::decode(e.u64)).collect()
    }
}
