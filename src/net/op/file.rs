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

use crate::net::op::{OpKind, OpTag, GENERATION_MASK};
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

/// One loop's file operations.
#[derive(Default)]
pub(crate) struct FileOps {
    slots: Vec<Option<FileOp>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    waiting: VecDeque<FileOp>,
    in_flight: usize,
}

impl FileOps {
    /// Whether none is in flight or waiting.
    pub(crate) fn idle(&self) -> bool {
        self.in_flight == 0 && self.waiting.is_empty()
    }

    /// Starts an operation: its SQE, or None if it waits for a slot.
    pub(crate) fn start(&mut self, op: FileOp) -> Option<Entry> {
        if self.in_flight >= MAX_IN_FLIGHT {
            self.waiting.push_back(op);
            return None;
        }
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                self.generations.push(0);
                (self.slots.len() - 1) as u32
            }
        };
        let generation = (self.generations[slot as usize] + 1) & GENERATION_MASK;
        self.generations[slot as usize] = generation;
        self.in_flight += 1;
        let op = self.slots[slot as usize].insert(op);
        Some(op.entry(OpTag::conn_op(OpKind::File, slot, generation).encode()))
    }

    /// A completion: what the loop does next (the rest, the callback, and
    /// possibly a waiting operation's SQE in `next`).
    pub(crate) fn complete(&mut self, tag: OpTag, result: i32, next: &mut Vec<Entry>) -> Option<FileOp> {
        let index = tag.slot as usize;
        if index >= self.slots.len() || self.generations[index] != tag.generation {
            return None;
        }
        let op = self.slots[index].as_mut()?;
        if op.apply(result as i64) == Progress::Resubmit {
            next.push(op.entry(tag.encode()));
            return None;
        }
        let done = self.slots[index].take();
        self.free.push(tag.slot);
        self.in_flight -= 1;
        if let Some(waiting) = self.waiting.pop_front() {
            if let Some(entry) = self.start(waiting) {
                next.push(entry);
            }
        }
        done
    }
}
