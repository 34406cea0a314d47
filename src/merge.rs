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
    /// Runs the context refused (it shut down) whose callbacks have not
    /// been delivered yet: they run once the caller's locks are released.
    refused: Vec<Box<IOEvent<C>>>,
}

/// Runs a merger held when its context refused them, to be failed with
/// `ESHUTDOWN` through the context's callback path by `deliver`, once the
/// caller holds nothing their callbacks may need (a callback may well add
/// the next request to the same merger).
#[must_use = "refused requests get their callbacks only when delivered"]
pub(crate) struct Refused<C: IOCallbackCustom> {
    ctx: Option<Arc<IOContext<C>>>,
    events: Vec<Box<IOEvent<C>>>,
}

impl<C: IOCallbackCustom> Refused<C> {
    pub(crate) fn deliver(self) {
        let Some(ctx) = self.ctx else { return };
        for event in self.events {
            ctx.shared().complete_refused(event, libc::ESHUTDOWN);
        }
    }
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
            refused: Vec::new(),
        })
    }

    /// Adds an event. It is held while it continues the current run (next
    /// offset, same fd and action, within the size limit); otherwise the run
    /// is submitted first. A run that reaches the limit is submitted at once.
    /// An event for another fd or action, a vectored one, one with `RWF_*`
    /// flags, or an invalid one, is handed back
    /// with `EINVAL`; after the context shut down, with `ESHUTDOWN`; with
    /// `EAGAIN` while the context holds its `max_queued` requests. If the
    /// context shut down while a run was held, its events complete with
    /// `ESHUTDOWN` (see [`flush`](Self::flush)).
    pub fn add_event(&mut self, event: Box<IOEvent<C>>) -> Result<(), SubmitError<C>> {
        let added = self.add_event_deferred(event);
        self.take_refused().deliver();
        added
    }

    /// `add_event` leaving refused runs for `take_refused`.
    pub(crate) fn add_event_deferred(&mut self, event: Box<IOEvent<C>>) -> Result<(), SubmitError<C>> {
        // Vectored events and events with their own RWF_* flags are not merged.
        let wrong_target =
            event.fd() != self.fd || event.action() != self.action || event.is_vectored() || event.rw_flags() != 0;
        if let Err(errno) = self.ctx.check(&event).and(if wrong_target { Err(libc::EINVAL) } else { Ok(()) }) {
            return Err(SubmitError { error: io::Error::from_raw_os_error(errno), event });
        }
        if !self.ctx.accepts_submissions() {
            return Err(SubmitError { error: io::Error::from_raw_os_error(libc::ESHUTDOWN), event });
        }
        if self.ctx.shared().queue_is_full() {
            self.ctx.shared().counters.queue_full.fetch_add(1, Ordering::Relaxed);
            return Err(SubmitError { error: io::Error::from_raw_os_error(libc::EAGAIN), event });
        }
        let len = event.len();
        let continues = !self.held.is_empty()
            && event.offset() == self.end
            && (self.end - self.start) + len <= self.merge_size_limit
            && self.held.len() < MAX_MERGE_EVENTS;
        if !continues {
            self.flush_deferred();
            self.start = event.offset();
            self.end = event.offset();
        }
        self.held.push_back(event);
        self.end += len;
        if self.end - self.start >= self.merge_size_limit {
            self.flush_deferred();
        }
        Ok(())
    }

    /// Submits what is held (as one I/O, or as the single event it is). If
    /// the context has shut down meanwhile, the held events complete with
    /// `ESHUTDOWN` instead, counted by the context and called back through
    /// its usual path (pool thread, or this thread without a pool): an
    /// accepted event always gets one callback.
    pub fn flush(&mut self) {
        self.flush_deferred();
        self.take_refused().deliver();
    }

    /// The refused runs not yet delivered.
    pub(crate) fn take_refused(&mut self) -> Refused<C> {
        let events = std::mem::take(&mut self.refused);
        Refused { ctx: (!events.is_empty()).then(|| self.ctx.clone()), events }
    }

    /// `flush` leaving a refused run for `take_refused`.
    pub(crate) fn flush_deferred(&mut self) {
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
        // A run is made of requests the merger accepted: the context's
        // queue limit was checked as each was added, and does not refuse it.
        if let Err(refused) = self.ctx.enqueue_gated(event, self.channel, true) {
            self.refused.push(refused.event);
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
