//! The io_uring driver: one ring per context, a submitter thread and a
//! poller thread. The poller alone reads the completion queue. The
//! submission queue and the free-slot list belong to whoever holds the
//! `submit` lock: the submitter thread, the poller right after a batch of
//! completions (so follow-up requests that inline callbacks queue go out in
//! the same `io_uring_enter` that waits for the next completions), or a
//! pool thread submitting its callback's follow-ups.
//!
//! A slot is only the event pointer; the slot id travels as the SQE's
//! `user_data`. Both queues have room for `depth` entries and neither can
//! overflow: at most `depth` I/Os are in flight, the poller publishes each
//! completion's removal from the CQ before the slot can be reused (so a
//! slot never holds an unreaped completion and an I/O in flight at once),
//! and the shutdown NOP is only sent once every slot is free.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use crossbeam::channel::{self, Receiver, Sender};
use io_uring::squeue::Entry;
use io_uring::{opcode, IoUring};

use crate::common::{poll_request_from_queues, SlotCollection};
use crate::context::{ContextOptions, IoSharedContext, PollerMark};
use crate::driver::{
    flush_before, is_resource_shortage, start_engine_thread, ActionSet, Backend, Backoff, SlotTable, Started,
    SubmitLock, SENTINEL_DATA,
};
use crate::ring::{probe_opcodes, setup, CqTail, RingConfig, SqWriter};
use crate::tasks::{IOAction, IOCallbackCustom, IOEvent, Progress};

/// `IORING_ENTER_GETEVENTS`: wait for completions.
const ENTER_GETEVENTS: u32 = 1;

/// Opcodes the driver issues; a kernel missing any of them is not used.
const REQUIRED_OPCODES: [u8; 7] = [
    opcode::Nop::CODE,
    opcode::Read::CODE,
    opcode::Write::CODE,
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
];

/// What an IOPOLL ring cannot run (the kernel fails them at preparation).
const NOT_ON_IOPOLL: [IOAction; 3] = [IOAction::Fsync, IOAction::Fdatasync, IOAction::Fallocate];

/// io_uring's slot: just the event that is in flight.
pub struct UringSlot<C: IOCallbackCustom> {
    event: Option<Box<IOEvent<C>>>,
}

/// What the holder of the submit lock owns besides the submission queue.
struct SubmitState {
    /// Ids of slots that carry no I/O.
    free: Vec<u32>,
}

struct UringInner<C: IOCallbackCustom> {
    ring: IoUring,
    slots: SlotTable<UringSlot<C>>,
    sqpoll: bool,
    iopoll: bool,
    /// Held while filling slots and writing SQEs.
    submit: SubmitLock<SubmitState>,
    /// Slot ids the poller freed, and slot ids needing their next request
    /// (short transfers); drained by whoever holds `submit`.
    free_ids: Receiver<u32>,
    retry_ids: Receiver<u32>,
    /// Set while the kernel refuses submissions (EAGAIN and the like): the
    /// entries wait in the SQ and only the submitter thread retries, with
    /// back-off, so the poller and pool threads never spin on it.
    stalled: AtomicBool,
    /// Whether threads that submit on their own (pool callbacks, batch
    /// ends) hand their entries to the submitter thread, and what decides
    /// it (`DirectSplit`). None on SQPOLL and IOPOLL rings.
    direct_split: Option<DirectSplit>,
    /// IOPOLL only: the poller sleeps here while nothing is in flight (an
    /// IOPOLL ring does not block in `io_uring_enter`); every submission
    /// from another thread rings it.
    idle_wake: Option<(Sender<()>, Receiver<()>)>,
}

impl<C: IOCallbackCustom> UringInner<C> {
    /// # Safety
    /// The caller must own slot `id` at this moment (see `SlotTable`).
    #[allow(clippy::mut_from_ref)]
    unsafe fn slot(&self, id: u32) -> &mut UringSlot<C> {
        self.slots.get(id)
    }

    /// The submission queue, for the holder of `submit`.
    fn sq_writer(&self, _lock: &mut SubmitState) -> SqWriter<'_> {
        // SAFETY: the `submit` lock (proved by the borrowed state) makes this
        // the only SubmissionQueue in existence.
        unsafe { SqWriter::new(&self.ring, self.sqpoll) }
    }

    /// Queues an entry. The SQ has room for every slot and the NOP is only
    /// sent when all are free, so it is never full; if it were, submitting
    /// frees room.
    fn push(&self, sq: &mut SqWriter<'_>, entry: &Entry) {
        // SAFETY: the entry points into an event parked in its slot (or at
        // nothing, for the NOP); the event stays there, untouched, until the
        // poller reaps this entry's completion.
        if unsafe { sq.push(entry) }.is_ok() {
            return;
        }
        let _ = sq.submit();
        // SAFETY: as above.
        if unsafe { sq.push(entry) }.is_err() {
            unreachable!("io_uring submission queue full with at most depth entries outstanding");
        }
    }

    /// Hands the queued entries to the kernel from a thread that must not
    /// wait: the poller or a pool thread. If the kernel refuses them for
    /// now, they stay queued for the submitter thread, which retries.
    fn submit_or_defer(&self, ctx: &IoSharedContext<C>, sq: &mut SqWriter<'_>) {
        if self.stalled.load(Ordering::SeqCst) {
            sq.publish();
            return;
        }
        match sq.submit() {
            Ok(()) => self.wake_idle_poller(),
            Err(e) => self.stall(ctx, &e),
        }
    }

    /// Records that the kernel refused a submission and hands the retry to
    /// the submitter thread.
    fn stall(&self, ctx: &IoSharedContext<C>, err: &io::Error) {
        if !self.stalled.swap(true, Ordering::SeqCst) && !is_resource_shortage(err) {
            eprintln!("ioengine: io_uring_enter(submit) failed: {err}; retrying");
        }
        let _ = ctx.noti_sender.try_send(());
    }

    /// Submits the `pending` entries published in the SQ (and any others
    /// published meanwhile). Needs no lock (see `worker_submit`): entering
    /// only reads the ring's head and tail. A pass the kernel ends early (a
    /// kernel without SUBMIT_ALL meeting an entry that fails at
    /// preparation) is followed at once by another for the rest; a pass
    /// that takes nothing (another thread submitted them) ends it.
    fn enter_published(&self, mut pending: usize) -> io::Result<()> {
        while pending > 0 {
            let before = self.direct_split.as_ref().map(|split| split.tail.load());
            let consumed = match self.ring.submitter().submit() {
                Ok(consumed) => consumed,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            };
            if let (Some(split), Some(before)) = (&self.direct_split, before) {
                split.record(consumed, split.tail.load().wrapping_sub(before) as usize);
            }
            if consumed == 0 || self.sqpoll {
                break;
            }
            pending = pending.saturating_sub(consumed);
        }
        Ok(())
    }

    fn wake_idle_poller(&self) {
        if let Some((wake, _)) = &self.idle_wake {
            let _ = wake.try_send(());
        }
    }

    /// Counts an overflow of the completion queue if the kernel flags one
    /// (impossible by construction; the statistics would show a bug).
    fn note_overflow(&self, ctx: &IoSharedContext<C>, sq: &SqWriter<'_>) {
        if sq.cq_overflowed() {
            ctx.counters.cq_overflows.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Whether io_uring can run here: the syscall is allowed and every opcode
/// the driver needs is supported.
pub fn uring_supported() -> bool {
    build_ring(&ContextOptions::with_depth(1), false).is_ok()
}

/// `cooperative`: ask for IORING_SETUP_COOP_TASKRUN, only when every thread
/// that submits to this ring enters the kernel again soon by itself.
///
/// The kernel posts a request's completion as task work of the thread that
/// submitted it. By default it interrupts that thread (an IPI, a VM exit
/// under virtualisation) to run the work at once; cooperatively it waits
/// for the thread's next system call or sleep. With inline callbacks only
/// the driver's own threads submit, and both enter the kernel after every
/// batch, so nothing waits longer and the interrupts go: sequential
/// buffered writes, which complete on io-wq threads one by one, ran about
/// 3x faster here. Pool threads run user callbacks of any length between
/// system calls, so pool-mode rings keep the default.
///
/// Every ring asks for IORING_SETUP_SUBMIT_ALL (5.18): without it the
/// kernel stops consuming the SQ at the first entry that fails at
/// preparation (a buffer address it refuses), and the rest wait for the
/// next submission. Older kernels get the flags they know; the driver then
/// submits again whatever the kernel left.
fn build_ring(opts: &ContextOptions, cooperative: bool) -> io::Result<(IoUring, u32)> {
    // depth entries suffice: at most depth I/Os are in flight, and the
    // shutdown NOP is only sent once none is. The completion queue defaults
    // to the same size (the kernel's default is twice the SQ) to keep the
    // ring's memory per slot small; see the module documentation for why it
    // cannot overflow.
    let entries = u32::try_from(opts.depth).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut optional = vec![setup::SUBMIT_ALL];
    #[cfg(test)]
    if tests::WITHOUT_SUBMIT_ALL.with(|w| w.get()) {
        optional.clear();
    }
    if cooperative {
        optional.push(setup::COOP_TASKRUN);
    }
    let config = RingConfig {
        entries,
        cq_entries: Some(opts.cq_size.unwrap_or(entries)),
        sqpoll_idle_ms: opts.sqpoll_idle_ms,
        sqpoll_cpu: None,
        iopoll: opts.iopoll,
        optional,
    };
    let built = config.build()?;
    probe_opcodes(&built.ring, &REQUIRED_OPCODES)?;
    let params = built.ring.params();
    if (params.sq_entries() as usize) < opts.depth || (params.cq_entries() as usize) < opts.depth {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok((built.ring, built.flags))
}

/// What the driver keeps per context: slots, the free list and the two
/// slot-id channels, and the rings shared with the kernel (SQ entries with
/// their index array, CQ entries).
fn memory_bytes<C: IOCallbackCustom>(ring: &IoUring, depth: usize) -> usize {
    let params = ring.params();
    let channel_slot = std::mem::size_of::<usize>() + std::mem::size_of::<u32>();
    let per_slot = std::mem::size_of::<UringSlot<C>>() + std::mem::size_of::<u32>() + 2 * channel_slot;
    let sq = params.sq_entries() as usize * (std::mem::size_of::<Entry>() + std::mem::size_of::<u32>());
    let cq = params.cq_entries() as usize * std::mem::size_of::<io_uring::cqueue::Entry>();
    depth * per_slot + sq + cq
}

pub struct UringDriver;

impl UringDriver {
    /// Sets up the ring and starts the submitter and poller threads.
    pub(crate) fn start<C: IOCallbackCustom>(
        ctx: Arc<IoSharedContext<C>>,
        opts: &ContextOptions,
        noti_receiver: Receiver<()>,
    ) -> io::Result<Started> {
        let (ring, flags) = build_ring(opts, ctx.cb_workers.is_inline())?;
        ctx.driver_bytes.store(memory_bytes::<C>(&ring, ctx.depth), Ordering::Relaxed);
        ctx.setup_flags.store(flags, Ordering::Relaxed);
        let slots = SlotTable::new(ctx.depth, || UringSlot { event: None });
        // Each slot id is in at most one message at a time, so `depth`
        // capacity never blocks the poller.
        let (free_sender, free_ids) = channel::bounded(ctx.depth);
        let free_sender_direct = free_sender.clone();
        let (retry_sender, retry_ids) = channel::bounded(ctx.depth);
        let iopoll = flags & setup::IOPOLL != 0;
        let direct_split = (flags & (setup::SQPOLL | setup::IOPOLL) == 0)
            .then(|| CqTail::new(&ring).ok())
            .flatten()
            .map(DirectSplit::new);
        let inner = Arc::new(UringInner {
            ring,
            slots,
            sqpoll: flags & setup::SQPOLL != 0,
            iopoll,
            submit: SubmitLock::new(SubmitState { free: (0..ctx.depth as u32).rev().collect() }),
            free_ids,
            retry_ids,
            stalled: AtomicBool::new(false),
            direct_split,
            idle_wake: iopoll.then(|| channel::bounded(1)),
        });

        let (ctx_poll, inner_poll) = (ctx.clone(), inner.clone());
        let poller = start_engine_thread("ioe-uring-poll", move || {
            Poller::new(ctx_poll, inner_poll, free_sender, retry_sender).run()
        })?;
        let (ctx_direct, inner_direct) = (ctx.clone(), inner.clone());
        let inner_submit = inner.clone();
        let submitter =
            start_engine_thread("ioe-uring-submit", move || worker_submit(ctx, inner_submit, noti_receiver));
        match submitter {
            Ok(submitter) => {
                ctx_direct.set_direct_submit(Box::new(move |ctx| match &inner_direct.direct_split {
                    Some(split) => {
                        let pending =
                            hand_back(ctx, &inner_direct, &mut Vec::new(), &free_sender_direct, Hand::Publish, false);
                        if pending == 0 {
                            return;
                        }
                        if split.active.load(Ordering::Relaxed) {
                            // Written here, submitted by the submitter thread.
                            let _ = ctx.noti_sender.try_send(());
                            return;
                        }
                        match inner_direct.enter_published(pending) {
                            Ok(()) => inner_direct.wake_idle_poller(),
                            Err(e) => inner_direct.stall(ctx, &e),
                        }
                    }
                    None => {
                        hand_back(ctx, &inner_direct, &mut Vec::new(), &free_sender_direct, Hand::SubmitNow, false);
                    }
                }));
                let refused_actions = if iopoll { ActionSet::of(&NOT_ON_IOPOLL) } else { ActionSet::default() };
                Ok(Started {
                    backend: Backend::Uring,
                    threads: vec![submitter, poller],
                    fallback_errno: None,
                    refused_actions,
                })
            }
            Err(e) => {
                // Nothing was submitted: the NOP alone lets the poller exit.
                send_sentinel(&inner);
                let _ = poller.join();
                Err(e)
            }
        }
    }
}

/// Submits the NOP that tells the poller to exit once every slot is free.
/// Runs on the submitter thread (or the starting thread), which may wait.
fn send_sentinel<C: IOCallbackCustom>(inner: &UringInner<C>) {
    let mut state = inner.submit.lock();
    let mut sq = inner.sq_writer(&mut state);
    inner.push(&mut sq, &opcode::Nop::new().build().user_data(SENTINEL_DATA));
    let mut backoff = Backoff::new();
    while let Err(e) = sq.submit() {
        if !is_resource_shortage(&e) {
            eprintln!("ioengine: io_uring shutdown NOP submit failed: {e}; retrying");
        }
        backoff.pause();
    }
    inner.wake_idle_poller();
}

/// Fills free slots straight from the queues, writing one SQE per event.
struct UringFiller<'a, 'b, C: IOCallbackCustom> {
    ctx: &'a IoSharedContext<C>,
    inner: &'a UringInner<C>,
    free: &'a mut Vec<u32>,
    sq: &'a mut SqWriter<'b>,
}

impl<C: IOCallbackCustom> SlotCollection<C> for UringFiller<'_, '_, C> {
    fn push(&mut self, event: Box<IOEvent<C>>) {
        // poll_request_from_queues asks for at most free.len() events.
        let Some(id) = self.free.pop() else {
            unreachable!("scheduler exceeded its quota");
        };
        self.ctx.free_slots_count.fetch_sub(1, Ordering::SeqCst);
        // SAFETY: `id` came from the free list, so the lock holder owns the slot.
        let slot = unsafe { self.inner.slot(id) };
        let entry = crate::ring::prepare_entry(slot.event.insert(event), id as u64);
        self.inner.push(self.sq, &entry);
    }
}

/// One submission step under the submit lock: resubmit short transfers,
/// take back freed slots, fill them from the queues and write their SQEs.
/// Returns the SQ writer with the new entries published but not submitted,
/// and how many events it took from the queues.
fn submit_step<'a, C: IOCallbackCustom>(
    ctx: &IoSharedContext<C>,
    inner: &'a UringInner<C>,
    state: &mut SubmitState,
) -> (SqWriter<'a>, usize) {
    let mut sq = inner.sq_writer(state);
    inner.note_overflow(ctx, &sq);
    for id in inner.retry_ids.try_iter() {
        push_next_request(inner, &mut sq, id);
    }
    let mut taken = 0;
    if ctx.total_count.load(Ordering::SeqCst) > 0 {
        state.free.extend(inner.free_ids.try_iter());
        let quota = state.free.len();
        let mut filler = UringFiller { ctx, inner, free: &mut state.free, sq: &mut sq };
        taken = poll_request_from_queues(ctx, quota, &mut filler);
    }
    sq.publish();
    (sq, taken)
}

fn worker_submit<C: IOCallbackCustom>(ctx: Arc<IoSharedContext<C>>, inner: Arc<UringInner<C>>, noti: Receiver<()>) {
    let direct = ctx.direct_submit_guard();
    let mut backoff = Backoff::new();
    loop {
        // Take the pending wake-up first: anything queued after this point
        // sends a new one, so the waits below cannot miss work.
        let _ = noti.try_recv();
        let (out_of_slots, pending, taken) = {
            let mut state = inner.submit.lock_for_step();
            let (mut sq, taken) = submit_step(&ctx, &inner, &mut state);
            let pending = sq.publish();
            (state.free.is_empty(), pending, taken)
        };
        // The kernel call goes without the lock: reads the page cache can
        // serve are copied inside it, and meanwhile the poller can write
        // the next entries (they go with this call or the next).
        let refused = pending > 0
            && match inner.enter_published(pending) {
                Ok(()) => {
                    inner.stalled.store(false, Ordering::SeqCst);
                    inner.wake_idle_poller();
                    false
                }
                Err(e) => {
                    inner.stall(&ctx, &e);
                    true
                }
            };
        if refused {
            // The kernel is short of memory: entries wait in the SQ (their
            // slots stay busy, so nothing is lost) until it takes them.
            backoff.pause();
            continue;
        }
        backoff.reset();
        // More ready while slots are free: step again, if the last step took
        // any. A step that took none while work is ready was held back by a
        // running drain request: the poller's step that frees its slot goes
        // on, and new work wakes this thread.
        if (taken > 0 && ctx.ready_count() > 0 && !out_of_slots) || inner.submit.step_pending() {
            continue;
        }
        if ctx.finish_drain() {
            break;
        }
        // Sleep until new work, a freed slot (only useful when work waits for
        // one) or a retry. No timeout, no polling.
        if ctx.ready_count() > 0 {
            crossbeam::select! {
                recv(noti) -> _ => {},
                recv(inner.free_ids) -> id => if let Ok(id) = id { inner.submit.lock().free.push(id) },
                recv(inner.retry_ids) -> id => if let Ok(id) = id { requeue_retry(&inner, id) },
            }
        } else {
            crossbeam::select! {
                recv(noti) -> _ => {},
                recv(inner.retry_ids) -> id => if let Ok(id) = id { requeue_retry(&inner, id) },
            }
        }
    }

    // Shutdown: nothing is queued or in flight and every callback returned.
    // No callback can submit any more, so the direct path goes (with its
    // share of the ring). The NOP wakes the poller, which finds every slot
    // free and exits.
    drop(direct);
    send_sentinel(&inner);
}

/// Writes the SQE for the next request of slot `id` (a short transfer's
/// remainder, or a transient error's retry).
fn push_next_request<C: IOCallbackCustom>(inner: &UringInner<C>, sq: &mut SqWriter<'_>, id: u32) {
    // SAFETY: the poller sent this id for its next request and does not touch
    // the slot until that request completes.
    let slot = unsafe { inner.slot(id) };
    if let Some(event) = slot.event.as_mut() {
        let entry = crate::ring::prepare_entry(event, id as u64);
        inner.push(sq, &entry);
    }
}

/// A retry id taken off the channel while waiting: queue its request; the
/// submitter's next step submits it.
fn requeue_retry<C: IOCallbackCustom>(inner: &UringInner<C>, id: u32) {
    let mut state = inner.submit.lock();
    let mut sq = inner.sq_writer(&mut state);
    push_next_request(inner, &mut sq, id);
    sq.publish();
}

/// What `hand_back` does with the entries it writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hand {
    /// Submit them now (pool threads, and the poller mid-batch).
    SubmitNow,
    /// Leave them published for the poller's next `io_uring_enter`, and say
    /// how many wait.
    Publish,
}

/// The poller's side of submission: slots it freed go back into the free
/// list and the queued follow-ups and retries get their SQEs, unless another
/// thread holds the submit lock; then that thread does it (see
/// `SubmitLock::step_or_leave`). Also the direct submission step of
/// callbacks on pool threads (nothing freed, `SubmitNow`). Entries the
/// kernel left in the SQ (a pass that ended early) go with the new ones;
/// `leftover` says there may be some even if nothing else is to do.
/// Returns how many entries wait in the SQ for the caller to submit.
fn hand_back<C: IOCallbackCustom>(
    ctx: &IoSharedContext<C>,
    inner: &UringInner<C>,
    freed: &mut Vec<u32>,
    free_sender: &Sender<u32>,
    hand: Hand,
    leftover: bool,
) -> usize {
    let has_work = || ctx.total_count.load(Ordering::SeqCst) > 0 || !inner.retry_ids.is_empty();
    if freed.is_empty() && !has_work() && !leftover {
        return 0;
    }
    let mut unsubmitted = 0;
    inner.submit.step_or_leave(freed, free_sender, |state, freed| {
        state.free.append(freed);
        let mut sq = if has_work() { submit_step(ctx, inner, state).0 } else { inner.sq_writer(state) };
        unsubmitted = if hand == Hand::SubmitNow || inner.sqpoll || inner.stalled.load(Ordering::SeqCst) {
            inner.submit_or_defer(ctx, &mut sq);
            0
        } else {
            sq.publish()
        };
    });
    unsubmitted
}

/// Who runs the `io_uring_enter` that submits inline callbacks'
/// follow-ups.
///
/// Reads the page cache can serve complete inside the `io_uring_enter`
/// that submits them: the kernel copies the data there. When the poller
/// submits its inline callbacks' follow-ups itself (the default: fewest
/// wake-ups, lowest latency, least CPU when the device does the work), one
/// thread then does the copies, the reaping and the callbacks while the
/// submitter thread idles. Split, the poller only writes the entries and
/// wakes the submitter thread, which enters the kernel (and copies) while
/// the poller reaps and runs callbacks: two cores instead of one.
///
/// The poller splits when both hold, and goes back when either fails:
/// - many requests are outstanding (in flight or queued), so there is work
///   to overlap; at a small depth a hand-over only adds a wake-up per I/O;
/// - sampled submissions complete inline: every `SAMPLE_EVERY`th pass that
///   submits (only while much is outstanding), the poller submits without
///   waiting and counts the completions there when the call returns:
///   nearly all for the page cache, almost none for a device. Split, it
///   samples rarely (a sample contends with the submitter thread for the
///   ring's lock).
struct SplitPolicy {
    /// Inline callbacks on a ring without SQPOLL or IOPOLL.
    allowed: bool,
    active: bool,
    /// Submitting passes until the next sample.
    until_sample: u32,
    /// Requests outstanding (in flight or queued) as a batch of
    /// completions arrives, moving average (fixed point, `ONE`).
    batch: u32,
    /// Recent samples, +1 inline, -1 not, kept within -2..=2.
    votes: i32,
}

impl SplitPolicy {
    const ONE: u32 = 256;
    const SAMPLE_EVERY: u32 = 16;
    const SAMPLE_EVERY_SPLIT: u32 = 256;
    /// Outstanding requests to split at, and to stay split.
    const ENTER_BATCH: u32 = 24 * Self::ONE;
    const LEAVE_BATCH: u32 = 12 * Self::ONE;

    fn new(allowed: bool) -> Self {
        SplitPolicy { allowed, active: false, until_sample: Self::SAMPLE_EVERY, batch: Self::ONE, votes: 0 }
    }

    /// After each pass's (non-empty) batch of completions, with the
    /// requests that were outstanding as it arrived.
    fn note_batch(&mut self, outstanding: usize) {
        self.batch = average(self.batch, outstanding.min(1 << 16) as u32 * Self::ONE);
        if self.active && self.batch < Self::LEAVE_BATCH {
            self.active = false;
            self.until_sample = self.until_sample.min(Self::SAMPLE_EVERY);
        }
    }

    /// Before a pass that submits: whether to sample it.
    fn sample_due(&mut self) -> bool {
        if !self.allowed || (!self.active && self.batch < Self::ENTER_BATCH) {
            return false;
        }
        self.until_sample -= 1;
        if self.until_sample > 0 {
            return false;
        }
        self.until_sample = if self.active { Self::SAMPLE_EVERY_SPLIT } else { Self::SAMPLE_EVERY };
        true
    }

    fn record_sample(&mut self, submitted: usize, completed_inline: usize) {
        let inline = completed_inline * 2 >= submitted;
        self.votes = (self.votes + if inline { 1 } else { -1 }).clamp(-2, 2);
        self.active = if self.active { self.votes > 0 } else { self.votes == 2 && self.batch >= Self::ENTER_BATCH };
        if !self.active {
            self.until_sample = self.until_sample.min(Self::SAMPLE_EVERY);
        }
    }
}

/// Threads other than the poller that submit on their own (pool threads
/// running callbacks, and any thread ending a batch, `IOContext::batch`)
/// enter the kernel themselves, so page-cache copies run on that thread:
/// next to the callbacks on a pool thread, or on several callers' threads
/// at once, which then contend for the ring's lock. Split, they only write
/// the entries and wake the submitter thread, which enters the kernel while
/// they go on. Every thread that submits (those threads, and the submitter
/// thread) reads the CQ tail around its `io_uring_enter` and records how
/// many completions came during the call against how many entries it
/// handed over. Split when most complete inside the call and calls hand
/// over several entries each (at a small depth a hand-over would only add
/// a wake-up); back when either fails. Device reads (O_DIRECT) keep the
/// direct path: one system call per batch and no thread hop.
struct DirectSplit {
    tail: CqTail,
    active: AtomicBool,
    /// Moving averages (fixed point, `ONE`): share of entries completed
    /// inside the call, and entries per call. Updated without a lock by
    /// whichever thread submitted; a lost update only delays a decision.
    inline: AtomicU32,
    batch: AtomicU32,
}

impl DirectSplit {
    const ONE: u32 = 256;
    const ENTER_INLINE: u32 = Self::ONE * 3 / 4;
    const LEAVE_INLINE: u32 = Self::ONE * 3 / 8;
    const ENTER_BATCH: u32 = 4 * Self::ONE;
    const LEAVE_BATCH: u32 = 2 * Self::ONE;

    fn new(tail: CqTail) -> Self {
        DirectSplit { tail, active: AtomicBool::new(false), inline: AtomicU32::new(0), batch: AtomicU32::new(0) }
    }

    fn record(&self, submitted: usize, completed: usize) {
        if submitted == 0 {
            return;
        }
        let share = (completed.min(submitted) * Self::ONE as usize / submitted) as u32;
        let inline = average(self.inline.load(Ordering::Relaxed), share);
        let batch = average(self.batch.load(Ordering::Relaxed), submitted.min(1 << 16) as u32 * Self::ONE);
        self.inline.store(inline, Ordering::Relaxed);
        self.batch.store(batch, Ordering::Relaxed);
        let active = if self.active.load(Ordering::Relaxed) {
            inline >= Self::LEAVE_INLINE && batch >= Self::LEAVE_BATCH
        } else {
            inline >= Self::ENTER_INLINE && batch >= Self::ENTER_BATCH
        };
        self.active.store(active, Ordering::Relaxed);
    }
}

/// A moving average over about eight samples.
fn average(old: u32, new: u32) -> u32 {
    ((old as u64 * 7 + new as u64) / 8) as u32
}

/// The poller thread's state.
struct Poller<C: IOCallbackCustom> {
    ctx: Arc<IoSharedContext<C>>,
    inner: Arc<UringInner<C>>,
    free_sender: Sender<u32>,
    retry_sender: Sender<u32>,
    /// Slots freed since the last hand-back.
    freed: Vec<u32>,
    /// The last `io_uring_enter` consumed fewer entries than it was given.
    leftover: bool,
    exiting: bool,
    split: SplitPolicy,
}

impl<C: IOCallbackCustom> Poller<C> {
    fn new(
        ctx: Arc<IoSharedContext<C>>,
        inner: Arc<UringInner<C>>,
        free_sender: Sender<u32>,
        retry_sender: Sender<u32>,
    ) -> Self {
        let freed = Vec::with_capacity(ctx.depth);
        let split = SplitPolicy::new(ctx.cb_workers.is_inline() && !inner.sqpoll && !inner.iopoll);
        Poller { ctx, inner, free_sender, retry_sender, freed, leftover: false, exiting: false, split }
    }

    fn run(mut self) {
        // Callbacks that run inline here queue follow-ups without waking the
        // submitter: this thread submits them after the batch.
        let _mark = PollerMark::set(&self.ctx);
        let inner = self.inner.clone();
        // SAFETY: this thread is the only one that ever touches the completion queue.
        let mut cq = unsafe { inner.ring.completion_shared() };
        let submitter = inner.ring.submitter();
        let mut dropped_seen = cq.overflow();
        loop {
            cq.sync();
            let batch = cq.len();
            for n in 0..batch {
                // Hand the follow-ups queued so far to the kernel as the batch
                // goes, not at its end: the device gets work back sooner.
                if flush_before(n, batch) {
                    self.hand_back(Hand::SubmitNow);
                }
                let Some(cqe) = cq.next() else { break };
                // Publish the entry's removal before acting on it: once its
                // slot can be reused (or its callback lets the context shut
                // down), its completion no longer takes room in the CQ.
                cq.sync();
                self.complete_one(cqe.user_data(), cqe.result());
            }
            if self.split.allowed && batch > 0 {
                // Outstanding as the batch arrived: in slots (the batch's
                // slots are already free) and queued for one.
                let outstanding =
                    self.ctx.depth - self.ctx.free_slots_count.load(Ordering::Relaxed) + batch + self.ctx.ready_count();
                self.split.note_batch(outstanding);
            }
            let dropped = cq.overflow();
            if dropped != dropped_seen {
                // Completions the kernel could not keep: impossible by the
                // sizing above, counted so that a kernel surprise shows.
                let lost = dropped.wrapping_sub(dropped_seen);
                self.ctx.counters.cq_overflows.fetch_add(lost as u64, Ordering::Relaxed);
                eprintln!("ioengine: the kernel dropped {lost} io_uring completions");
                dropped_seen = dropped;
            }
            cq.sync();
            let more_ready = !cq.is_empty();
            if self.exiting && !more_ready && self.ctx.free_slots_count.load(Ordering::SeqCst) == self.ctx.depth {
                return;
            }
            // Give the freed slots back and submit what the batch queued
            // (follow-ups, retries) before reaping more, so the device never
            // waits for this loop.
            let mut to_submit = self.hand_back(Hand::Publish);
            if more_ready && to_submit == 0 {
                continue;
            }
            if to_submit > 0 && self.split.sample_due() {
                // Submit without waiting, and count what completed inside
                // the call.
                let before = cq.len();
                // SAFETY: plain io_uring_enter with no argument pointer.
                match unsafe { submitter.enter::<libc::sigset_t>(to_submit as u32, 0, 0, None) } {
                    Ok(consumed) => {
                        self.leftover = consumed < to_submit;
                        cq.sync();
                        self.split.record_sample(consumed, cq.len().saturating_sub(before));
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => self.inner.stall(&self.ctx, &e),
                }
                continue;
            }
            if to_submit > 0 && self.split.active {
                // The submitter thread enters the kernel for them.
                self.kick_submitter();
                to_submit = 0;
            }
            if to_submit == 0 && self.inner.iopoll && self.idle_on_iopoll(&mut cq) {
                continue;
            }
            // Submit (if anything) and, unless completions are already waiting,
            // wait for at least one, in one call.
            let (min_complete, flags) = if more_ready { (0, 0) } else { (1, ENTER_GETEVENTS) };
            // SAFETY: plain io_uring_enter with no argument pointer.
            match unsafe { submitter.enter::<libc::sigset_t>(to_submit as u32, min_complete, flags, None) } {
                Ok(consumed) if consumed < to_submit => {
                    // The kernel ended its pass early (a kernel without
                    // SUBMIT_ALL met an entry failing at preparation), or
                    // another thread submitted meanwhile: the next hand-back
                    // submits whatever is left. The call did not wait.
                    self.leftover = true;
                }
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    // Entries this call did not take stay in the ring for the
                    // submitter thread, which retries with back-off; from here
                    // on this thread only waits (never spins on the error).
                    if to_submit > 0 {
                        self.inner.stall(&self.ctx, &e);
                    } else if !is_resource_shortage(&e) {
                        eprintln!("ioengine: io_uring_enter(wait) failed: {e}");
                    }
                }
            }
        }
    }

    fn hand_back(&mut self, hand: Hand) -> usize {
        let leftover = std::mem::take(&mut self.leftover);
        if hand == Hand::SubmitNow && self.split.active {
            // Mid-batch, split: the submitter thread submits them.
            if hand_back(&self.ctx, &self.inner, &mut self.freed, &self.free_sender, Hand::Publish, leftover) > 0 {
                self.kick_submitter();
            }
            return 0;
        }
        hand_back(&self.ctx, &self.inner, &mut self.freed, &self.free_sender, hand, leftover)
    }

    /// Wakes the submitter thread to submit what is published in the SQ
    /// (its next step submits everything there).
    fn kick_submitter(&self) {
        let _ = self.ctx.noti_sender.try_send(());
    }

    /// Applies one completion to its slot.
    fn complete_one(&mut self, data: u64, result: i32) {
        if data == SENTINEL_DATA {
            self.exiting = true;
            return;
        }
        let id = data as u32;
        // SAFETY: the kernel returned this slot's request, so its submitter
        // has handed the slot over and does not touch it now.
        let slot = unsafe { self.inner.slot(id) };
        let Some(event) = slot.event.as_mut() else { return };
        match event.apply_result(result as i64) {
            Progress::Resubmit => {
                let _ = self.retry_sender.send(id);
            }
            Progress::Complete => {
                let event = slot.event.take();
                self.ctx.free_slots_count.fetch_add(1, Ordering::SeqCst);
                self.freed.push(id);
                if let Some(event) = event {
                    self.ctx.complete(event);
                }
            }
        }
    }

    /// An IOPOLL ring returns from `io_uring_enter` at once when nothing is
    /// in flight, so with nothing in flight the poller sleeps on its wake
    /// channel instead. Returns true if it slept (or found completions).
    fn idle_on_iopoll(&self, cq: &mut io_uring::CompletionQueue<'_>) -> bool {
        let Some((_, wake)) = &self.inner.idle_wake else { return false };
        // Clear an old wake-up, then look: a submission after this point
        // rings again, one before it shows in the counts or the CQ.
        let _ = wake.try_recv();
        cq.sync();
        let idle = io_uring::CompletionQueue::is_empty(cq)
            && self.ctx.free_slots_count.load(Ordering::SeqCst) == self.ctx.depth;
        if !idle {
            return !io_uring::CompletionQueue::is_empty(cq);
        }
        let _ = wake.recv();
        true
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use std::time::Duration;

    use crossbeam::channel;

    use crate::callback_worker::IOWorkers;
    use crate::context::{ContextOptions, IOContext};
    use crate::driver::Backend;
    use crate::tasks::{Buffer, ClosureCb, IOAction, IOChannel, IOEvent};

    /// Direct submitters split once their calls complete inline and carry several
    /// entries; back when completions stop coming inside the call or calls
    /// carry one entry.
    #[test]
    fn direct_split_follows_inline_completions_and_batches() {
        let ring = match io_uring::IoUring::new(2) {
            Ok(ring) => ring,
            Err(e) => {
                eprintln!("skipped: io_uring unavailable here ({e})");
                return;
            }
        };
        let split = super::DirectSplit::new(crate::ring::CqTail::new(&ring).unwrap());
        let active = |s: &super::DirectSplit| s.active.load(std::sync::atomic::Ordering::Relaxed);
        for _ in 0..32 {
            split.record(1, 1); // inline, but one entry per call
        }
        assert!(!active(&split));
        for _ in 0..32 {
            split.record(8, 8);
        }
        assert!(active(&split));
        for _ in 0..32 {
            split.record(8, 0); // a device's reads
        }
        assert!(!active(&split));
        for _ in 0..32 {
            split.record(8, 8);
        }
        assert!(active(&split));
        for _ in 0..32 {
            split.record(1, 1);
        }
        assert!(!active(&split));
    }

    /// The split decision: only with much outstanding and inline samples;
    /// back on non-inline samples or when little is outstanding; never on
    /// rings where it is not allowed.
    #[test]
    fn split_policy_follows_depth_and_inline_samples() {
        use super::SplitPolicy;
        let sample_all = |p: &mut SplitPolicy, inline: bool| {
            let mut sampled = false;
            for _ in 0..SplitPolicy::SAMPLE_EVERY_SPLIT {
                if p.sample_due() {
                    p.record_sample(32, if inline { 32 } else { 1 });
                    sampled = true;
                    break;
                }
            }
            sampled
        };
        let mut p = SplitPolicy::new(true);
        for _ in 0..64 {
            p.note_batch(2); // depth 2: no samples, no split
        }
        assert!(!sample_all(&mut p, true) && !p.active);
        for _ in 0..64 {
            p.note_batch(32);
        }
        assert!(sample_all(&mut p, true) && !p.active, "one vote is not enough");
        assert!(sample_all(&mut p, true) && p.active);
        assert!(sample_all(&mut p, false) && p.active, "one contrary sample is tolerated");
        assert!(sample_all(&mut p, false) && !p.active);
        assert!(sample_all(&mut p, true) && sample_all(&mut p, true) && p.active);
        for _ in 0..64 {
            p.note_batch(1);
        }
        assert!(!p.active, "little outstanding: back");
        let mut off = SplitPolicy::new(false);
        for _ in 0..64 {
            off.note_batch(32);
        }
        assert!(!sample_all(&mut off, true) && !off.active);
    }

    thread_local! {
        /// Build rings on this thread as a kernel before 5.18 would.
        pub(super) static WITHOUT_SUBMIT_ALL: Cell<bool> = const { Cell::new(false) };
    }

    /// Above the user address space: the kernel refuses it (EFAULT).
    const KERNEL_ADDRESS: usize = 0xffff_8000_0000_0000;

    /// As a kernel without IORING_SETUP_SUBMIT_ALL would: an entry failing
    /// at preparation ends the kernel's pass, and the poller must submit the
    /// entries after it at once, not when some later submission comes.
    #[test]
    fn entries_after_a_preparation_failure_are_submitted_without_submit_all() {
        WITHOUT_SUBMIT_ALL.with(|w| w.set(true));
        let opts = ContextOptions { backend: Backend::Uring, ..ContextOptions::with_depth(8) };
        let ctx = match IOContext::<ClosureCb>::with_options(&opts, &IOWorkers::new(0).unwrap()) {
            Ok(ctx) => ctx,
            Err(e) => {
                eprintln!("skipped: io_uring unavailable here ({e})");
                return;
            }
        };
        WITHOUT_SUBMIT_ALL.with(|w| w.set(false));
        assert_eq!(ctx.inner.setup_flags.load(std::sync::atomic::Ordering::Relaxed) & super::setup::SUBMIT_ALL, 0);
        let path = std::env::temp_dir().join(format!("ioengine-unit-submit-all-{}", std::process::id()));
        let file = std::fs::File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(format!("/proc/self/fd/{}", file.as_raw_fd()), vec![7u8; 8192]).unwrap();
        let fd = file.as_raw_fd();
        let (tx, rx) = channel::unbounded::<(u64, i64)>();
        for round in 0..20u64 {
            // The first read's callback (on the poller) queues a read the kernel
            // refuses and a valid one: both go into one io_uring_enter.
            let mut first = IOEvent::new(fd, Buffer::aligned(4096).unwrap(), IOAction::Read, 0);
            let (ctx_cb, tx_cb) = (Arc::clone(&ctx), tx.clone());
            first.set_callback(ClosureCb::new(move |ev| {
                assert_eq!(ev.result(), Some(4096));
                // SAFETY: the engine only hands this address to the kernel,
                // which refuses it; nothing dereferences it.
                let bad = unsafe { Buffer::from_raw_parts(KERNEL_ADDRESS as *mut u8, 4096) }.unwrap();
                for (tag, buf) in [(0u64, bad), (1, Buffer::aligned(4096).unwrap())] {
                    let mut ev = IOEvent::new(fd, buf, IOAction::Read, 4096);
                    let tx = tx_cb.clone();
                    ev.set_callback(ClosureCb::new(move |ev| {
                        let _ = tx.send((tag, ev.result().unwrap()));
                    }));
                    ctx_cb.submit(ev, IOChannel::Read).unwrap();
                }
            }));
            ctx.submit(first, IOChannel::Read).unwrap();
            let mut got: Vec<(u64, i64)> = (0..2)
                .map(|_| rx.recv_timeout(Duration::from_secs(60)).expect("a request stranded in the SQ"))
                .collect();
            got.sort();
            assert_eq!(got, vec![(0, -(libc::EFAULT as i64)), (1, 4096)], "round {round}");
        }
        assert_eq!(ctx.stats().cq_overflows, 0);
    }
}
