//! Block requests on a connection's loop (`Connection::submit_file`):
//! file reads, writes, syncs and fallocate whose callbacks run on the loop
//! thread.
//!
//! - io_uring loops (`FileOps`) issue them on their own ring with the next
//!   batch and reap them with their sockets' completions. A server that
//!   answers requests from a file then needs no thread hop per request
//!   (the receive, the file read and the reply all happen on one thread
//!   and one ring), as Seastar-style servers do. Operations in flight per
//!   loop are bounded (`MAX_IN_FLIGHT`, part of the CQ sizing, so the CQ
//!   cannot overflow); more wait in a queue. Each has a slot with a
//!   generation, encoded in its `user_data` like a connection's operations.
//! - epoll loops (`FileHelpers`) have no ring: helper threads run the
//!   requests with blocking calls and post them back to the loop, which
//!   runs the callbacks.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam::channel::{Receiver, Sender};
use io_uring::squeue::Entry;

use crate::driver::blocking;
use crate::net::connection::ConnTable;
use crate::net::event_loop::{LoopShared, Task};
use crate::net::op::{OpKind, OpTag};
use crate::tasks::{IOCallbackCustom, IOEvent, Progress};

/// File operations in flight on one loop at most.
pub(crate) const MAX_IN_FLIGHT: usize = 256;

/// A block request a loop can run: an `IOEvent` of any callback type.
pub(crate) trait LoopFileOp: Send {
    /// The SQE for the next request (first, or the rest after a short transfer).
    fn entry(&mut self, user_data: u64) -> Entry;
    /// Applies a kernel result.
    fn apply(&mut self, result: i64) -> Progress;
    /// Completes without I/O with `-errno` (the server stopped first).
    fn fail(&mut self, errno: i32);
    /// Runs the request to completion with blocking system calls (a
    /// helper thread of an epoll loop).
    fn run_blocking(&mut self);
    /// Whether its descriptor is a pipe, socket or character device, where
    /// a blocking call may wait for ever (one `fstat`, then cached).
    fn on_stream(&mut self) -> bool;
    /// Runs the callback (for a merged event, each original's).
    fn finish(self: Box<Self>);
}

impl<C: IOCallbackCustom> LoopFileOp for IOEvent<C> {
    fn entry(&mut self, user_data: u64) -> Entry {
        crate::ring::prepare_entry(self, user_data)
    }

    fn apply(&mut self, result: i64) -> Progress {
        self.apply_result(result)
    }

    fn fail(&mut self, errno: i32) {
        IOEvent::fail(self, errno);
    }

    fn run_blocking(&mut self) {
        blocking::run_to_completion(self);
    }

    fn on_stream(&mut self) -> bool {
        !self.is_seekable()
    }

    fn finish(self: Box<Self>) {
        self.run_callback();
    }
}

pub(crate) type FileOp = Box<dyn LoopFileOp>;

/// Answers an operation that will never run (the loop is gone, or cannot
/// run it): its callback runs now, once, with `-errno`.
pub(crate) fn refuse(mut op: FileOp, errno: i32) {
    op.fail(errno);
    op.finish();
}

/// One loop's file operations: slots with generations, as its connections'.
pub(crate) struct FileOps {
    slots: ConnTable<FileOp>,
    waiting: VecDeque<FileOp>,
}

impl Default for FileOps {
    fn default() -> Self {
        FileOps { slots: ConnTable::new(), waiting: VecDeque::new() }
    }
}

impl FileOps {
    /// Whether none is in flight or waiting.
    pub(crate) fn idle(&self) -> bool {
        self.slots.live() == 0 && self.waiting.is_empty()
    }

    /// Starts an operation: its SQE, or None if it waits for a slot.
    pub(crate) fn start(&mut self, op: FileOp) -> Option<Entry> {
        if self.slots.live() >= MAX_IN_FLIGHT {
            self.waiting.push_back(op);
            return None;
        }
        let (slot, generation) = self.slots.reserve();
        self.slots.fill(slot, op);
        let op = self.slots.slot(slot)?;
        Some(op.entry(OpTag::conn_op(OpKind::File, slot, generation).encode()))
    }

    /// A completion: the operation whose callback is due, if it is done.
    /// SQEs to submit (the rest of a short transfer, a waiting operation's
    /// start) go to `next`.
    pub(crate) fn complete(&mut self, tag: OpTag, result: i32, next: &mut Vec<Entry>) -> Option<FileOp> {
        let op = self.slots.get(tag.slot, tag.generation)?;
        if op.apply(result as i64) == Progress::Resubmit {
            next.push(op.entry(tag.encode()));
            return None;
        }
        let done = self.slots.remove(tag.slot);
        if let Some(waiting) = self.waiting.pop_front() {
            if let Some(entry) = self.start(waiting) {
                next.push(entry);
            }
        }
        done
    }
}

/// Helpers an epoll loop keeps free of streams for requests on files and
/// block devices, which always end: each runs one request at a time.
const BOUNDED_HELPERS: usize = 4;

/// Helpers one epoll loop starts at most: beyond `BOUNDED_HELPERS`, one
/// per request in flight on a stream (which may hold its helper for ever),
/// so that requests on files never wait behind a pipe nobody writes.
const MAX_HELPERS: usize = BOUNDED_HELPERS + 60;

/// An epoll loop's file operations: helper threads, started as requests
/// need them, run each with blocking calls and post it back to the loop
/// (`Task::FileDone`), which runs its callback. Only the loop thread uses
/// this, so its counts are exact; when to start a helper is AIO's policy
/// (`blocking::helper_wanted`), with requests on streams counted from
/// submission to completion.
pub(crate) struct FileHelpers {
    /// Taken at drop: the helpers see the channel close and return.
    jobs: Option<Sender<FileOp>>,
    queue: Receiver<FileOp>,
    helpers: Vec<JoinHandle<()>>,
    /// Given to helpers and not yet posted back.
    in_flight: usize,
    /// Of those, requests on streams.
    on_streams: usize,
}

impl Default for FileHelpers {
    fn default() -> Self {
        let (jobs, queue) = crossbeam::channel::unbounded();
        FileHelpers { jobs: Some(jobs), queue, helpers: Vec::new(), in_flight: 0, on_streams: 0 }
    }
}

impl FileHelpers {
    /// Whether none is in flight.
    pub(crate) fn idle(&self) -> bool {
        self.in_flight == 0
    }

    /// Hands an operation to the helpers, starting one if every helper has
    /// a request and the policy allows another. If not even one helper can
    /// be started, the callback runs now with -EAGAIN.
    pub(crate) fn start(&mut self, mut op: FileOp, shared: &Arc<LoopShared>) {
        let stream = op.on_stream();
        let started = self.helpers.len();
        let on_streams = self.on_streams + stream as usize;
        if blocking::helper_wanted(started, self.in_flight >= started, on_streams, BOUNDED_HELPERS, MAX_HELPERS) {
            match self.spawn(shared) {
                Ok(handle) => self.helpers.push(handle),
                Err(_) if self.helpers.is_empty() => return refuse(op, libc::EAGAIN),
                // The running helpers take it in turn.
                Err(_) => {}
            }
        }
        self.in_flight += 1;
        self.on_streams += stream as usize;
        // Cannot fail: `self.queue` keeps the channel open until drop.
        if let Some(jobs) = self.jobs.as_ref() {
            let _ = jobs.send(op);
        }
    }

    fn spawn(&self, shared: &Arc<LoopShared>) -> io::Result<JoinHandle<()>> {
        let (queue, shared) = (self.queue.clone(), shared.clone());
        crate::driver::spawn_engine_thread("ioe-net-file", move || {
            while let Ok(mut op) = queue.recv() {
                op.run_blocking();
                shared.post(Task::FileDone(op));
            }
        })
    }

    /// An operation a helper posted back: its callback is due.
    pub(crate) fn done(&mut self, mut op: FileOp) -> FileOp {
        self.in_flight -= 1;
        self.on_streams -= op.on_stream() as usize;
        op
    }
}

impl Drop for FileHelpers {
    /// Normally the loop has ended with nothing in flight: with the only
    /// sender gone, each helper's wait ends and it returns. If the loop
    /// ends otherwise (a panic), helpers may be inside a call that never
    /// returns, so they are left to end on their own rather than joined.
    fn drop(&mut self) {
        drop(self.jobs.take());
        if self.in_flight > 0 || std::thread::panicking() {
            self.helpers.clear();
            return;
        }
        for handle in self.helpers.drain(..) {
            let _ = handle.join();
        }
    }
}
