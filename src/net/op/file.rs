//! Block requests on a loop's own ring (`Connection::submit_file`): file
//! reads, writes, syncs and fallocate issued with the loop's next batch,
//! their completions reaped with its sockets' and their callbacks run on
//! the loop thread. A server that answers requests from a file then needs
//! no thread hop per request (the receive, the file read and the reply all
//! happen on one thread and one ring), as Seastar-style servers do.
//!
//! Operations in flight per loop are bounded (`MAX_IN_FLIGHT`, part of the
//! CQ sizing, so the CQ cannot overflow); more wait in a queue. Each has a
//! slot with a generation, encoded in its `user_data` like a connection's
//! operations.

use std::collections::VecDeque;

use io_uring::squeue::Entry;

use crate::net::connection::ConnTable;
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
