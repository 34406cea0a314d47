//! Merging: a `MergeSubmitter` collects contiguous reads (or writes) on one
//! file and submits them as one vectored I/O straight from the events' own
//! buffers (no copy). On completion every original event gets its own
//! result and callback.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::context::{IOContext, SubmitError};
use crate::embedded_list::EmbeddedList;
use crate::tasks::{IOAction, IOCallbackCustom, IOChannel, IOEvent};

/// Most events in one merged I/O (the kernel's iovec limit).
pub const MAX_MERGE_EVENTS: usize = libc::UIO_MAXIOV as usize;

/// Coalesces contiguous same-fd, same-direction events. Not thread-safe by
/// itself (`&mut self`): use one per submitting thread, file and direction.
/// Dropping it flushes what it holds.
pub struct MergeSubmitter<C: IOCallbackCustom> {
    ctx: Arc<IOContext<C>>,
    fd: RawFd,
    action: IOAction,
    channel: IOChannel,
    merge_size_limit: u64,
    held: EmbeddedList<C>,
    start: u64,
    end: u64,
}

impl<C: IOCallbackCustom> MergeSubmitter<C> {
    /// `action` must be `Read` or `Write`; `merge_size_limit` (bytes, > 0)
    /// caps one merged I/O.
    pub fn new(
        ctx: Arc<IOContext<C>>,
        fd: RawFd,
        action: IOAction,
        channel: IOChannel,
        merge_size_limit: usize,
    ) -> io::Result<Self> {
        if !matches!(action, IOAction::Read | IOAction::Write) || merge_size_limit == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(MergeSubmitter {
            ctx,
            fd,
            action,
            channel,
            merge_size_limit: merge_size_limit as u64,
            held: EmbeddedList::new(),
            start: 0,
            end: 0,
        })
    }

    /// Adds an event. It is held while it continues the current run (next
    /// offset, same fd and action, within the size limit); otherwise the run
    /// is submitted first. A run that reaches the limit is submitted at once.
    /// An event for another fd or action, or an invalid one, is handed back
    /// with `EINVAL`.
    pub fn add_event(&mut self, event: Box<IOEvent<C>>) -> Result<(), SubmitError<C>> {
        let wrong_target = event.fd() != self.fd || event.action() != self.action;
        if let Err(errno) = self.ctx.check(&event).and(if wrong_target { Err(libc::EINVAL) } else { Ok(()) }) {
            return Err(SubmitError { error: io::Error::from_raw_os_error(errno), event });
        }
        if !self.ctx.accepts_submissions() {
            return Err(SubmitError { error: io::Error::from_raw_os_error(libc::ESHUTDOWN), event });
        }
        let len = event.len();
        let continues = !self.held.is_empty()
            && event.offset() == self.end
            && (self.end - self.start) + len <= self.merge_size_limit
            && self.held.len() < MAX_MERGE_EVENTS;
        if !continues {
            self.flush();
            self.start = event.offset();
            self.end = event.offset();
        }
        self.held.push_back(event);
        self.end += len;
        if self.end - self.start >= self.merge_size_limit {
            self.flush();
        }
        Ok(())
    }

    /// Submits what is held (as one I/O, or as the single event it is). If
    /// the context has shut down meanwhile, the held events' callbacks run
    /// right here with `-ESHUTDOWN`: an accepted event always gets one.
    pub fn flush(&mut self) {
        let mut held = std::mem::take(&mut self.held);
        let event = match held.len() {
            0 => return,
            1 => match held.pop_front() {
                Some(event) => event,
                None => return,
            },
            n => {
                self.ctx.shared().counters.merged.fetch_add(n as u64, Ordering::Relaxed);
                IOEvent::merged(self.fd, self.action, self.start, held)
            }
        };
        if let Err(event) = self.ctx.enqueue_gated(event, self.channel) {
            self.ctx.shared().fail_unsubmitted(event, libc::ESHUTDOWN);
        }
    }

    /// Events held and not yet submitted.
    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }

    pub fn action(&self) -> IOAction {
        self.action
    }

    pub fn context(&self) -> &Arc<IOContext<C>> {
        &self.ctx
    }
}

impl<C: IOCallbackCustom> Drop for MergeSubmitter<C> {
    fn drop(&mut self) {
        self.flush();
    }
}
