//! `IOContext`, the user-facing handle, and `IoSharedContext`, the
//! backend-free state it shares with the driver threads: queues, counters,
//! callback workers and the submitter's wake-up channel.

use std::cell::Cell;
use std::fmt;
use std::io;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam::channel::{self, Receiver, Sender};
use crossbeam::queue::SegQueue;
use parking_lot::Mutex;

use crate::callback_worker::{in_callback_of, run_detached, CompletionTracker, IOWorkers};
use crate::common::Barriers;
use crate::driver::{self, ActionSet, Backend};
use crate::tasks::{IOCallbackCustom, IOChannel, IOEvent};

/// Largest queue depth a context accepts (io_uring rings hold at most 32768
/// entries; the limit stays one below, as it always was).
pub const MAX_DEPTH: usize = 32767;

/// Depth of `ContextOptions::default()`.
pub const DEFAULT_DEPTH: usize = 128;

/// How a context is set up. `Default` gives depth 128 and automatic backend
/// choice with no special io_uring flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContextOptions {
    /// Most I/Os in flight in the kernel at once (1..=MAX_DEPTH).
    pub depth: usize,
    /// Which driver to run; `IOENGINE_BACKEND` in the environment overrides it.
    pub backend: Backend,
    /// io_uring only: start a kernel submission-polling thread that sleeps
    /// after this many idle milliseconds (IORING_SETUP_SQPOLL).
    pub sqpoll_idle_ms: Option<u32>,
    /// io_uring only: busy-poll completions (IORING_SETUP_IOPOLL). Needs
    /// O_DIRECT files on a device with polling queues; fsync is not allowed.
    pub iopoll: bool,
    /// io_uring only: completion-queue entries (IORING_SETUP_CQSIZE); at
    /// least `depth` (the default is `depth`, rounded up to a power of two).
    pub cq_size: Option<u32>,
    /// Most requests the context holds queued (not yet in flight); past
    /// it, `submit` refuses with EAGAIN at once. None: no limit.
    pub max_queued: Option<usize>,
}

impl Default for ContextOptions {
    fn default() -> Self {
        ContextOptions {
            depth: DEFAULT_DEPTH,
            backend: Backend::Auto,
            sqpoll_idle_ms: None,
            iopoll: false,
            cq_size: None,
            max_queued: None,
        }
    }
}

impl ContextOptions {
    pub fn with_depth(depth: usize) -> Self {
        ContextOptions { depth, ..Default::default() }
    }

    /// Checks the options whatever the backend: an option io_uring would
    /// refuse is an error even where the context would run on AIO.
    pub(crate) fn validate(&self) -> io::Result<()> {
        if self.depth == 0 || self.depth > MAX_DEPTH {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if let Some(cq) = self.cq_size {
            if (cq as usize) < self.depth || cq > crate::ring::MAX_CQ_ENTRIES {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
        }
        if self.max_queued == Some(0) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }
}

/// Counter totals since the context started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoStats {
    /// User events accepted by `submit` (each event of a merge counts).
    pub submitted: u64,
    /// User events whose result is known (callback run or about to run).
    pub completed: u64,
    /// Completed events whose result was an error.
    pub failed: u64,
    /// User events that travelled inside a merged I/O.
    pub merged: u64,
    /// I/Os in the kernel right now (a merged I/O counts once).
    pub in_flight: u64,
    /// Events waiting in the queues.
    pub pending: u64,
    /// Memory the engine keeps for this context: driver slots, kernel rings
    /// (SQ/CQ or AIO event ring) and the driver's bookkeeping, in bytes.
    pub memory_bytes: u64,
    /// Engine memory per in-flight I/O: its share of `memory_bytes` plus the
    /// event record that travels with it.
    pub memory_per_slot: u64,
    /// io_uring: times the engine found its completion queue overflowed,
    /// plus completions the kernel dropped. Zero by design; anything else
    /// is a bug worth reporting.
    pub cq_overflows: u64,
    /// Submissions refused with EAGAIN because `max_queued` requests were
    /// queued.
    pub queue_full: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) submitted: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) merged: AtomicU64,
    pub(crate) cq_overflows: AtomicU64,
    pub(crate) queue_full: AtomicU64,
}

/// The state shared by the user side and the driver threads. It holds no
/// backend data (no ring, no AIO context, no slots).
pub struct IoSharedContext<C: IOCallbackCustom> {
    pub depth: usize,

    /// False once shutdown starts (explicitly or with the last handle): new
    /// submissions are refused, the submitter drains the queues and stops.
    pub running: AtomicBool,
    /// Submissions between their `running` check and their enqueue; the
    /// submitter only stops when this is zero, so none can slip past shutdown.
    pub(crate) active_submits: AtomicUsize,
    /// Events waiting to be scheduled: in the three queues or held behind a
    /// drain request. Counted before an event is queued (a reservation,
    /// see `reserve_queued`), so it may run ahead of the queues briefly.
    pub total_count: AtomicUsize,
    /// Most events `total_count` may reach through `submit`.
    pub(crate) max_queued: usize,
    /// Driver slots not carrying an I/O; `depth - free` are in flight.
    pub free_slots_count: AtomicUsize,

    pub prio_queue: SegQueue<Box<IOEvent<C>>>,
    pub read_queue: SegQueue<Box<IOEvent<C>>>,
    pub write_queue: SegQueue<Box<IOEvent<C>>>,
    pub prio_count: AtomicUsize,
    pub read_count: AtomicUsize,
    pub write_count: AtomicUsize,

    pub cb_workers: IOWorkers<C>,
    /// Wakes the submitter; capacity one, so a pending wake-up costs the
    /// next submitter nothing.
    pub noti_sender: Sender<()>,

    /// Which of read/write goes first in the next scheduling round.
    pub(crate) reads_first: AtomicBool,
    pub(crate) counters: Counters,
    pub(crate) tracker: Arc<CompletionTracker>,
    /// Drain requests and what waits behind them.
    pub(crate) barriers: Barriers<C>,
    /// Bytes the running driver keeps (set once when it starts).
    pub(crate) driver_bytes: AtomicUsize,
    /// io_uring set-up flags in force (`ring::setup` bits; 0 on AIO).
    pub(crate) setup_flags: AtomicU32,
    /// The driver's "submit now on this thread" step, used by this context's
    /// callbacks running on pool threads (see `enqueue`). Installed when the
    /// driver has started, removed by its submitter once the context drained.
    pub(crate) direct_submit: Mutex<Option<DirectSubmit<C>>>,
    /// Set by a thread that found `direct_submit` busy: its holder runs the
    /// step once more before it leaves (see `submit_directly`).
    direct_pending: AtomicBool,
}

/// The driver's poller hand-back with nothing freed: moves queued events into
/// slots and hands them to the kernel on the calling thread if the submit
/// lock is free, else leaves them to the lock's holder (`SubmitLock`).
pub(crate) type DirectSubmit<C> = Box<dyn Fn(&IoSharedContext<C>) + Send + Sync>;

impl<C: IOCallbackCustom> IoSharedContext<C> {
    fn new(depth: usize, max_queued: Option<usize>, cb_workers: IOWorkers<C>) -> (Arc<Self>, Receiver<()>) {
        let (noti_sender, noti_receiver) = channel::bounded(1);
        let tracker = Arc::new(CompletionTracker::new(noti_sender.clone()));
        let shared = Arc::new(IoSharedContext {
            depth,
            running: AtomicBool::new(true),
            active_submits: AtomicUsize::new(0),
            total_count: AtomicUsize::new(0),
            max_queued: max_queued.unwrap_or(usize::MAX),
            free_slots_count: AtomicUsize::new(depth),
            prio_queue: SegQueue::new(),
            read_queue: SegQueue::new(),
            write_queue: SegQueue::new(),
            prio_count: AtomicUsize::new(0),
            read_count: AtomicUsize::new(0),
            write_count: AtomicUsize::new(0),
            cb_workers,
            noti_sender,
            reads_first: AtomicBool::new(true),
            counters: Counters::default(),
            tracker,
            barriers: Barriers::new(),
            driver_bytes: AtomicUsize::new(0),
            setup_flags: AtomicU32::new(0),
            direct_submit: Mutex::new(None),
            direct_pending: AtomicBool::new(false),
        });
        (shared, noti_receiver)
    }

    #[cfg(test)]
    pub(crate) fn new_for_tests(depth: usize, cb_workers: IOWorkers<C>) -> Arc<Self> {
        Self::new(depth, None, cb_workers).0
    }

    #[cfg(test)]
    pub(crate) fn new_for_tests_limited(depth: usize, max_queued: usize, cb_workers: IOWorkers<C>) -> Arc<Self> {
        Self::new(depth, Some(max_queued), cb_workers).0
    }

    /// Counts one more event waiting to be scheduled, unless `max_queued`
    /// are already (then false, and the refusal is counted). `forced`: the
    /// limit does not apply (a merger's run, made of requests it accepted).
    pub(crate) fn reserve_queued(&self, forced: bool) -> bool {
        if forced || self.max_queued == usize::MAX {
            self.total_count.fetch_add(1, Ordering::SeqCst);
            return true;
        }
        let max = self.max_queued;
        let reserved =
            self.total_count.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1)).is_ok();
        if !reserved {
            self.counters.queue_full.fetch_add(1, Ordering::Relaxed);
        }
        reserved
    }

    /// Whether `max_queued` events wait to be scheduled.
    pub(crate) fn queue_is_full(&self) -> bool {
        self.max_queued != usize::MAX && self.total_count.load(Ordering::SeqCst) >= self.max_queued
    }

    /// Events in the three queues, ready to be scheduled (not those held
    /// behind a drain request).
    pub(crate) fn ready_count(&self) -> usize {
        self.prio_count.load(Ordering::SeqCst)
            + self.read_count.load(Ordering::SeqCst)
            + self.write_count.load(Ordering::SeqCst)
    }

    /// Puts an event on its channel's queue (already counted in `total_count`).
    pub(crate) fn push_to_queue(&self, event: Box<IOEvent<C>>, channel: IOChannel) {
        let (queue, count) = match channel {
            IOChannel::Prio => (&self.prio_queue, &self.prio_count),
            IOChannel::Read => (&self.read_queue, &self.read_count),
            IOChannel::Write => (&self.write_queue, &self.write_count),
        };
        // Push before counting: a non-zero count always has an event behind it.
        queue.push(event);
        count.fetch_add(1, Ordering::SeqCst);
    }

    /// Puts an accepted event, already counted by `reserve_queued`, on its
    /// queue (or behind a drain request) and wakes the submitter.
    pub(crate) fn enqueue(&self, event: Box<IOEvent<C>>, channel: IOChannel) {
        let callbacks = event.callback_count();
        self.tracker.add(callbacks);
        self.counters.submitted.fetch_add(callbacks as u64, Ordering::Relaxed);
        if let Err((event, channel)) = self.barriers.hold(event, channel) {
            self.push_to_queue(event, channel);
        }
        // The context's own poller submits after its batch. Its callbacks on
        // pool threads submit right here when the submit lock is free: a
        // thread hop less per I/O in the usual "done, issue the next" loop.
        // Anyone else wakes the submitter (a full channel means a wake-up is
        // already pending).
        if POLLER_OF.with(|p| p.get()) == self as *const Self as usize {
            return;
        }
        // Inside a batch the submission waits for the batch's end.
        if BATCH_OF.with(|b| b.get()) == self as *const Self as usize {
            BATCH_OWED.with(|owed| owed.set(true));
            return;
        }
        if in_callback_of(&self.tracker) && self.submit_directly() {
            return;
        }
        let _ = self.noti_sender.try_send(());
    }

    /// Runs the driver's direct submission step; false (nothing done) if
    /// the driver has none (not started, or already drained). If another
    /// thread is running it, leaves a mark instead and that thread runs it
    /// once more for us: one thread at a time enters the kernel for the
    /// context, where two would contend for the ring's lock.
    fn submit_directly(&self) -> bool {
        let mut guard = match self.direct_submit.try_lock() {
            Some(guard) => guard,
            None => {
                // Mark, then try again: the holder unlocks before it checks
                // the mark, so (SeqCst on both sides) either it sees the
                // mark or this thread gets the lock.
                self.direct_pending.store(true, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                match self.direct_submit.try_lock() {
                    Some(guard) => guard,
                    None => return true,
                }
            }
        };
        loop {
            let Some(submit) = guard.as_deref() else { return false };
            // A mark left before this step is covered by it: whatever the
            // marking thread queued is in the queues already.
            if self.direct_pending.load(Ordering::SeqCst) {
                self.direct_pending.store(false, Ordering::SeqCst);
            }
            submit(self);
            drop(guard);
            fence(Ordering::SeqCst);
            if !self.direct_pending.load(Ordering::SeqCst) {
                return true;
            }
            guard = match self.direct_submit.try_lock() {
                Some(guard) => guard,
                // Whoever holds it now sees the mark after its own step.
                None => return true,
            };
        }
    }

    /// Installs the driver's direct submission step (see `enqueue`).
    pub(crate) fn set_direct_submit(&self, step: DirectSubmit<C>) {
        *self.direct_submit.lock() = Some(step);
    }

    /// Removes the direct submission step (dropping what it holds) when the
    /// guard goes: the submitter holds it and drops it once the context has
    /// drained (no callback can run any more), or if it unwinds.
    pub(crate) fn direct_submit_guard(&self) -> DirectSubmitGuard<'_, C> {
        DirectSubmitGuard(self)
    }

    /// Hands a completed event (or each event of a completed merge) to its
    /// callback. Called by the driver threads only.
    pub(crate) fn complete(&self, event: Box<IOEvent<C>>) {
        event.for_each_user_event(|user_event| self.finish_one(user_event));
    }

    fn finish_one(&self, event: Box<IOEvent<C>>) {
        self.count_completion(&event);
        self.cb_workers.dispatch(event, &self.tracker);
    }

    fn count_completion(&self, event: &IOEvent<C>) {
        self.counters.completed.fetch_add(1, Ordering::Relaxed);
        if event.result().is_some_and(|r| r < 0) {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether the submitter may stop, and if so ends the drain: shut down,
    /// no submission in progress, nothing queued and every callback
    /// returned (a running callback may still submit follow-up I/O). Once
    /// it returns true no callback of this context can be promised any
    /// more (see `complete_refused`). SeqCst pairs with
    /// `IOContext::enqueue_gated` and `CompletionTracker::done_one`.
    pub(crate) fn finish_drain(&self) -> bool {
        !self.running.load(Ordering::SeqCst)
            && self.active_submits.load(Ordering::SeqCst) == 0
            && self.total_count.load(Ordering::SeqCst) == 0
            && self.tracker.close_if_idle()
    }

    /// Delivers `errno` to an event the context refused after accepting it
    /// elsewhere (a merger held it when the context shut down). It is
    /// counted as submitted and failed like any request. While the drain
    /// is still going its callback takes the usual path (pool thread, or the
    /// calling thread without a pool) and may submit follow-ups; after the
    /// drain it runs on the calling thread, and the context refuses them.
    /// Callers must not hold locks a callback may need.
    pub(crate) fn complete_refused(&self, mut event: Box<IOEvent<C>>, errno: i32) {
        let callbacks = event.callback_count();
        self.counters.submitted.fetch_add(callbacks as u64, Ordering::Relaxed);
        event.fail(errno);
        if self.tracker.add_unless_closed(callbacks) {
            self.complete(event);
            return;
        }
        event.for_each_user_event(|user_event| {
            self.count_completion(&user_event);
            run_detached(user_event);
        });
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.depth.saturating_sub(self.free_slots_count.load(Ordering::SeqCst))
    }
}

/// See [`IoSharedContext::direct_submit_guard`].
pub(crate) struct DirectSubmitGuard<'a, C: IOCallbackCustom>(&'a IoSharedContext<C>);

impl<C: IOCallbackCustom> Drop for DirectSubmitGuard<'_, C> {
    fn drop(&mut self) {
        self.0.direct_submit.lock().take();
    }
}

thread_local! {
    /// The shared context whose poller runs on this thread (0 if none).
    static POLLER_OF: Cell<usize> = const { Cell::new(0) };
}

thread_local! {
    /// The shared context a batch on this thread is queueing into (0 if none).
    static BATCH_OF: Cell<usize> = const { Cell::new(0) };
    /// Whether the batch queued something that still has to be submitted.
    static BATCH_OWED: Cell<bool> = const { Cell::new(false) };
}

/// A batch of submissions from one thread (see [`IOContext::batch`]).
pub struct SubmitBatch<'a, C: IOCallbackCustom> {
    ctx: &'a IOContext<C>,
    /// Whether this guard opened the thread's batch (an inner or another
    /// context's batch on the same thread leaves it to the outer one).
    owner: bool,
}

impl<C: IOCallbackCustom> Drop for SubmitBatch<'_, C> {
    fn drop(&mut self) {
        if !self.owner {
            return;
        }
        BATCH_OF.with(|b| b.set(0));
        if BATCH_OWED.with(|owed| owed.replace(false)) {
            self.ctx.submit_batched();
        }
    }
}

/// Marks the current thread as the poller of a context for its lifetime.
/// Events queued from that poller's inline callbacks need no submitter
/// wake-up: the poller submits them itself after its completion batch.
pub(crate) struct PollerMark;

impl PollerMark {
    pub(crate) fn set<C: IOCallbackCustom>(ctx: &IoSharedContext<C>) -> PollerMark {
        POLLER_OF.with(|p| p.set(ctx as *const IoSharedContext<C> as usize));
        PollerMark
    }
}

impl Drop for PollerMark {
    fn drop(&mut self) {
        POLLER_OF.with(|p| p.set(0));
    }
}

/// An event `submit` refused, handed back with the reason.
pub struct SubmitError<C: IOCallbackCustom> {
    pub error: io::Error,
    pub event: Box<IOEvent<C>>,
}

impl<C: IOCallbackCustom> fmt::Debug for SubmitError<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubmitError").field("error", &self.error).field("event", &self.event).finish()
    }
}

/// The user-facing I/O context. Share it as `Arc<IOContext<C>>`; dropping
/// the last handle drains it (see [`Drop`](#impl-Drop-for-IOContext<C>)).
pub struct IOContext<C: IOCallbackCustom> {
    pub(crate) inner: Arc<IoSharedContext<C>>,
    pub(crate) noti_sender: Sender<()>,
    backend: Backend,
    /// Why `Auto` runs AIO (io_uring's errno), if it does.
    fallback_errno: Option<i32>,
    /// Actions the driver as set up can never run (fsync on IOPOLL).
    refused_actions: ActionSet,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl<C: IOCallbackCustom> IOContext<C> {
    /// A context with `depth` I/Os in flight at most and the backend chosen
    /// automatically (or by `IOENGINE_BACKEND`).
    pub fn new(depth: usize, cbs: &IOWorkers<C>) -> io::Result<Arc<Self>> {
        Self::with_options(&ContextOptions::with_depth(depth), cbs)
    }

    pub fn with_options(opts: &ContextOptions, cbs: &IOWorkers<C>) -> io::Result<Arc<Self>> {
        opts.validate()?;
        let backend = driver::resolve_backend(opts.backend)?;
        let (shared, noti_receiver) = IoSharedContext::new(opts.depth, opts.max_queued, cbs.clone());
        let started = driver::start(&shared, opts, backend, noti_receiver)?;
        Ok(Arc::new(IOContext {
            noti_sender: shared.noti_sender.clone(),
            inner: shared,
            backend: started.backend,
            fallback_errno: started.fallback_errno,
            refused_actions: started.refused_actions,
            threads: Mutex::new(started.threads),
        }))
    }

    /// Queues an event. Never blocks; once accepted, its callback runs
    /// exactly once with the result. Accepted events run in no particular
    /// order (a drain event, `IOEvent::set_drain`, orders itself after every
    /// event accepted before it and before every event accepted after it).
    /// Refused events are handed back and never called back: an invalid
    /// one (zero length read/write, a range past `i64::MAX`, an event that
    /// already completed, a fallocate with a buffer, an fsync, fdatasync or
    /// fallocate on an IOPOLL context) with `EINVAL`; with `EAGAIN` when
    /// `max_queued` events are queued; with `ESHUTDOWN` after shutdown.
    pub fn submit(&self, event: Box<IOEvent<C>>, channel: IOChannel) -> Result<(), SubmitError<C>> {
        if let Err(errno) = self.check(&event) {
            return Err(SubmitError { error: io::Error::from_raw_os_error(errno), event });
        }
        self.enqueue_gated(event, channel, false)
    }

    /// Starts a batch: events submitted from this thread until the returned
    /// guard drops are handed to the kernel together when it drops, by this
    /// thread itself if no other thread is submitting for the context right
    /// then (one system call for the batch and no thread hop, as a liburing
    /// user's own `io_uring_submit`), else by the submitter thread.
    /// Events submitted inside the batch may wait for its end, so never
    /// wait for their completion while holding the guard. Only the
    /// outermost batch on a thread counts; submissions to another context
    /// inside it are not batched.
    pub fn batch(&self) -> SubmitBatch<'_, C> {
        let me = &*self.inner as *const IoSharedContext<C> as usize;
        // Only the outermost batch on a thread batches; a batch of another
        // context opened inside it submits as usual.
        let owner = BATCH_OF.with(|b| b.get()) == 0;
        if owner {
            BATCH_OF.with(|b| b.set(me));
            BATCH_OWED.with(|o| o.set(false));
        }
        SubmitBatch { ctx: self, owner }
    }

    /// The end of a batch that queued events.
    fn submit_batched(&self) {
        let inner = &*self.inner;
        if POLLER_OF.with(|p| p.get()) == inner as *const IoSharedContext<C> as usize {
            return;
        }
        if !inner.submit_directly() {
            let _ = self.noti_sender.try_send(());
        }
    }

    /// What `submit` refuses synchronously (an errno), before queueing.
    pub(crate) fn check(&self, event: &IOEvent<C>) -> Result<(), i32> {
        event.validate()?;
        if self.refused_actions.contains(event.action()) {
            return Err(libc::EINVAL);
        }
        Ok(())
    }

    /// Enqueues unless shutdown has started (ESHUTDOWN) or the queues are
    /// full (EAGAIN; `forced` events go in regardless), handing the event
    /// back then.
    pub(crate) fn enqueue_gated(
        &self,
        event: Box<IOEvent<C>>,
        channel: IOChannel,
        forced: bool,
    ) -> Result<(), SubmitError<C>> {
        let inner = &*self.inner;
        // Announce the submission before checking `running`: shutdown stores
        // `running` first and the submitter checks `active_submits` after, so
        // (all SeqCst) either we see the shutdown or the submitter sees us.
        inner.active_submits.fetch_add(1, Ordering::SeqCst);
        // While draining, the context's own callbacks may still submit: the
        // callback running on this thread keeps the drain from finishing.
        let open = inner.running.load(Ordering::SeqCst) || in_callback_of(&inner.tracker);
        let outcome = if !open {
            Err(SubmitError { error: io::Error::from_raw_os_error(libc::ESHUTDOWN), event })
        } else if !inner.reserve_queued(forced) {
            Err(SubmitError { error: io::Error::from_raw_os_error(libc::EAGAIN), event })
        } else {
            inner.enqueue(event, channel);
            Ok(())
        };
        inner.active_submits.fetch_sub(1, Ordering::SeqCst);
        if !inner.running.load(Ordering::SeqCst) {
            // A draining submitter may be waiting for this submission to end.
            let _ = self.noti_sender.try_send(());
        }
        outcome
    }

    /// Whether waiting for this context's drain on the calling thread could
    /// wait for ever: the thread runs one of its callbacks (the drain waits
    /// for it to return), or belongs to its callback pool (its queued
    /// callbacks may need this thread).
    pub(crate) fn drain_would_deadlock(&self) -> bool {
        in_callback_of(&self.inner.tracker) || self.inner.cb_workers.owns_current_thread()
    }

    /// Whether shutdown has started.
    pub fn is_shut_down(&self) -> bool {
        !self.inner.running.load(Ordering::SeqCst)
    }

    /// Whether a submission from the current thread would be accepted.
    pub(crate) fn accepts_submissions(&self) -> bool {
        self.inner.running.load(Ordering::SeqCst) || in_callback_of(&self.inner.tracker)
    }

    /// Drains and stops the context: submissions are refused with `ESHUTDOWN`
    /// except from the context's own callbacks (so read-then-write chains
    /// finish), every queued and in-flight event completes and its callback
    /// returns, the driver threads are joined and the ring / AIO context is
    /// closed. Idempotent; concurrent callers all wait. A chain of callbacks
    /// that never stops submitting keeps the drain going.
    ///
    /// On a thread the drain may need (a callback of this context, or any
    /// thread of its callback pool) it cannot wait: there it starts the
    /// drain and returns `EDEADLK`. Callbacks of other contexts may wait.
    pub fn shutdown(&self) -> io::Result<()> {
        self.inner.tracker.begin_drain();
        self.inner.running.store(false, Ordering::SeqCst);
        let _ = self.noti_sender.try_send(());
        if self.drain_would_deadlock() {
            return Err(io::Error::from_raw_os_error(libc::EDEADLK));
        }
        let mut threads = self.threads.lock();
        for handle in threads.drain(..) {
            let _ = handle.join();
        }
        drop(threads);
        self.inner.tracker.wait_idle();
        Ok(())
    }

    /// Events waiting in the queues.
    pub fn pending_count(&self) -> usize {
        self.inner.total_count.load(Ordering::SeqCst)
    }

    /// I/Os in the kernel right now.
    pub fn running_count(&self) -> usize {
        self.inner.in_flight()
    }

    pub fn depth(&self) -> usize {
        self.inner.depth
    }

    /// The driver that runs this context (never `Auto`).
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Why an `Auto` context runs on AIO: the error io_uring failed to
    /// start with (ENOSYS: not in the kernel; EPERM/EACCES: forbidden by
    /// `kernel.io_uring_disabled` or seccomp; EOPNOTSUPP: a needed opcode
    /// is missing; ENOMEM: ring memory refused). None when the backend is
    /// the one asked for, or io_uring.
    pub fn fallback_reason(&self) -> Option<io::Error> {
        self.fallback_errno.map(io::Error::from_raw_os_error)
    }

    pub fn stats(&self) -> IoStats {
        let c = &self.inner.counters;
        IoStats {
            submitted: c.submitted.load(Ordering::Relaxed),
            completed: c.completed.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            merged: c.merged.load(Ordering::Relaxed),
            in_flight: self.inner.in_flight() as u64,
            pending: self.pending_count() as u64,
            memory_bytes: self.inner.driver_bytes.load(Ordering::Relaxed) as u64,
            memory_per_slot: (self.inner.driver_bytes.load(Ordering::Relaxed) / self.inner.depth
                + std::mem::size_of::<IOEvent<C>>()) as u64,
            cq_overflows: c.cq_overflows.load(Ordering::Relaxed),
            queue_full: c.queue_full.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn shared(&self) -> &IoSharedContext<C> {
        &self.inner
    }
}

impl<C: IOCallbackCustom> Drop for IOContext<C> {
    /// Drains, as [`IOContext::shutdown`]; from inside a callback the drain
    /// finishes in the background.
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
