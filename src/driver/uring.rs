//! The io_uring driver: one ring per context, a submitter thread and a
//! poller thread. The poller alone reads the completion queue. The
//! submission queue and the free-slot list belong to whoever holds the
//! `submit` lock: the submitter thread, or the poller right after a batch of
//! completions, so follow-up requests that inline callbacks queue go out in
//! the same `io_uring_enter` that waits for the next completions (no thread
//! hand-off, no extra syscall).
//!
//! A slot is only the event pointer; the slot id travels as the SQE's
//! `user_data`. Both queues have room for `depth` entries; at most `depth`
//! I/Os are in flight and the shutdown NOP is sent only when none is, so
//! neither queue can overflow.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crossbeam::channel::{self, Receiver, Sender};
use io_uring::squeue::Entry;
use io_uring::types::{Fd, FsyncFlags};
use io_uring::{opcode, IoUring, Probe, SubmissionQueue, Submitter};

use crate::common::{poll_request_from_queues, SlotCollection};
use crate::context::{ContextOptions, IoSharedContext, PollerMark};
use crate::driver::{flush_before, SlotTable, SubmitLock, SENTINEL_DATA};
use crate::tasks::{IOCallbackCustom, IOEvent, IoRequest, Progress};

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
    /// Held while filling slots and writing SQEs.
    submit: SubmitLock<SubmitState>,
    /// Slot ids the poller freed, and slot ids needing their next request
    /// (short transfers); drained by whoever holds `submit`.
    free_ids: Receiver<u32>,
    retry_ids: Receiver<u32>,
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
        SqWriter {
            // SAFETY: the `submit` lock (proved by the borrowed state) makes
            // this the only SubmissionQueue in existence.
            sq: unsafe { self.ring.submission_shared() },
            submitter: self.ring.submitter(),
            sqpoll: self.sqpoll,
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
/// system calls, so pool-mode rings keep the default. Kernels before 5.19
/// refuse the flag; the ring is then built without it.
fn build_ring(opts: &ContextOptions, cooperative: bool) -> io::Result<IoUring> {
    if cooperative {
        match build_ring_with(opts, true) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            built => return built,
        }
    }
    build_ring_with(opts, false)
}

fn build_ring_with(opts: &ContextOptions, coop_taskrun: bool) -> io::Result<IoUring> {
    let mut builder = IoUring::builder();
    if coop_taskrun {
        builder.setup_coop_taskrun();
    }
    if let Some(idle) = opts.sqpoll_idle_ms {
        builder.setup_sqpoll(idle);
    }
    if opts.iopoll {
        builder.setup_iopoll();
    }
    // depth entries suffice: at most depth I/Os are in flight, and the
    // shutdown NOP is only sent once none is. The completion queue defaults
    // to the same size (the kernel's default is twice the SQ) to keep the
    // ring's memory per slot small.
    let entries = u32::try_from(opts.depth).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    builder.setup_cqsize(opts.cq_size.unwrap_or(entries));
    let ring = builder.build(entries)?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    if REQUIRED_OPCODES.iter().any(|&op| !probe.is_supported(op)) {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    let params = ring.params();
    if (params.sq_entries() as usize) < opts.depth || (params.cq_entries() as usize) < opts.depth {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(ring)
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
    pub fn start<C: IOCallbackCustom>(
        ctx: Arc<IoSharedContext<C>>,
        opts: &ContextOptions,
        noti_receiver: Receiver<()>,
    ) -> io::Result<Vec<JoinHandle<()>>> {
        let ring = build_ring(opts, ctx.cb_workers.is_inline())?;
        ctx.driver_bytes.store(memory_bytes::<C>(&ring, ctx.depth), Ordering::Relaxed);
        let slots = SlotTable::new(ctx.depth, || UringSlot { event: None });
        // Each slot id is in at most one message at a time, so `depth`
        // capacity never blocks the poller.
        let (free_sender, free_ids) = channel::bounded(ctx.depth);
        let free_sender_direct = free_sender.clone();
        let (retry_sender, retry_ids) = channel::bounded(ctx.depth);
        let inner = Arc::new(UringInner {
            ring,
            slots,
            sqpoll: opts.sqpoll_idle_ms.is_some(),
            submit: SubmitLock::new(SubmitState { free: (0..ctx.depth as u32).rev().collect() }),
            free_ids,
            retry_ids,
        });

        let (ctx_poll, inner_poll) = (ctx.clone(), inner.clone());
        let poller = thread::Builder::new()
            .name("ioe-uring-poll".into())
            .spawn(move || worker_poll(ctx_poll, inner_poll, free_sender, retry_sender))?;
        let (ctx_direct, inner_direct) = (ctx.clone(), inner.clone());
        let inner_submit = inner.clone();
        let submitter = thread::Builder::new()
            .name("ioe-uring-submit".into())
            .spawn(move || worker_submit(ctx, inner_submit, noti_receiver));
        match submitter {
            Ok(submitter) => {
                ctx_direct.set_direct_submit(Box::new(move |ctx| {
                    hand_back(ctx, &inner_direct, &mut Vec::new(), &free_sender_direct, true);
                }));
                Ok(vec![submitter, poller])
            }
            Err(e) => {
                // Nothing was submitted: the NOP alone lets the poller exit.
                let mut state = inner.submit.lock();
                let mut sq = inner.sq_writer(&mut state);
                sq.push(&opcode::Nop::new().build().user_data(SENTINEL_DATA));
                sq.submit();
                drop(sq);
                drop(state);
                let _ = poller.join();
                Err(e)
            }
        }
    }
}

/// Builds the SQE for the next request of the event in slot `id`.
fn prepare<C: IOCallbackCustom>(event: &mut IOEvent<C>, id: u32) -> Entry {
    let fd = Fd(event.fd());
    let entry = match event.next_request() {
        IoRequest::Read { buf, len, offset } => opcode::Read::new(fd, buf, len).offset(offset).build(),
        IoRequest::Write { buf, len, offset } => opcode::Write::new(fd, buf, len).offset(offset).build(),
        IoRequest::Readv { iov, count, offset } => opcode::Readv::new(fd, iov, count).offset(offset).build(),
        IoRequest::Writev { iov, count, offset } => opcode::Writev::new(fd, iov, count).offset(offset).build(),
        IoRequest::Fsync => opcode::Fsync::new(fd).build(),
        IoRequest::Fdatasync => opcode::Fsync::new(fd).flags(FsyncFlags::DATASYNC).build(),
        IoRequest::Fallocate { mode, offset, len } => opcode::Fallocate::new(fd, len).offset(offset).mode(mode).build(),
    };
    entry.user_data(id as u64)
}

/// The submission queue as seen by the holder of the submit lock.
struct SqWriter<'a> {
    sq: SubmissionQueue<'a>,
    submitter: Submitter<'a>,
    sqpoll: bool,
}

impl SqWriter<'_> {
    fn push(&mut self, entry: &Entry) {
        loop {
            // SAFETY: the entry points into an event parked in its slot (or at
            // nothing, for the NOP); the event stays there, untouched, until the
            // poller reaps this entry's completion.
            if unsafe { self.sq.push(entry) }.is_ok() {
                return;
            }
            // Not reachable with at most depth entries outstanding, but a full
            // queue only needs the kernel to consume entries.
            self.submit();
            thread::yield_now();
        }
    }

    /// Publishes the queued SQEs and returns how many the kernel has not
    /// consumed yet.
    fn publish(&mut self) -> usize {
        self.sq.sync();
        self.sq.len()
    }

    /// Hands every queued SQE to the kernel (one syscall for the batch).
    fn submit(&mut self) {
        while self.publish() > 0 {
            match self.submitter.submit() {
                Ok(_) if self.sqpoll => return, // the kernel thread consumes them
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    // EAGAIN/EBUSY: the kernel is short of memory or has a
                    // completion backlog the poller is draining. Nothing else is
                    // expected; report it and retry rather than drop I/Os.
                    if !matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) {
                        eprintln!("ioengine: io_uring_enter(submit) failed: {e}; retrying");
                    }
                    thread::yield_now();
                }
            }
        }
    }
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
        let entry = prepare(slot.event.insert(event), id);
        self.sq.push(&entry);
    }
}

/// One submission step under the submit lock: resubmit short transfers,
/// take back freed slots, fill them from the queues and write their SQEs.
/// Returns the SQ writer with the new entries published but not submitted.
fn submit_step<'a, C: IOCallbackCustom>(
    ctx: &IoSharedContext<C>,
    inner: &'a UringInner<C>,
    state: &mut SubmitState,
) -> SqWriter<'a> {
    let mut sq = inner.sq_writer(state);
    for id in inner.retry_ids.try_iter() {
        push_next_request(inner, &mut sq, id);
    }
    if ctx.total_count.load(Ordering::SeqCst) > 0 {
        state.free.extend(inner.free_ids.try_iter());
        let quota = state.free.len();
        let mut filler = UringFiller { ctx, inner, free: &mut state.free, sq: &mut sq };
        poll_request_from_queues(ctx, quota, &mut filler);
    }
    sq.publish();
    sq
}

fn worker_submit<C: IOCallbackCustom>(ctx: Arc<IoSharedContext<C>>, inner: Arc<UringInner<C>>, noti: Receiver<()>) {
    let direct = ctx.direct_submit_guard();
    loop {
        // Take the pending wake-up first: anything queued after this point
        // sends a new one, so the waits below cannot miss work.
        let _ = noti.try_recv();
        let out_of_slots = {
            let mut state = inner.submit.lock_for_step();
            let mut sq = submit_step(&ctx, &inner, &mut state);
            sq.submit();
            state.free.is_empty()
        };
        if (ctx.total_count.load(Ordering::SeqCst) > 0 && !out_of_slots) || inner.submit.step_pending() {
            continue;
        }
        if ctx.drained() {
            break;
        }
        // Sleep until new work, a freed slot (only useful when work waits for
        // one) or a retry. No timeout, no polling.
        if ctx.total_count.load(Ordering::SeqCst) > 0 {
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
    let mut state = inner.submit.lock();
    let mut sq = inner.sq_writer(&mut state);
    sq.push(&opcode::Nop::new().build().user_data(SENTINEL_DATA));
    sq.submit();
}

/// Writes the SQE for the next request of slot `id` (a short transfer's
/// remainder, or a transient error's retry).
fn push_next_request<C: IOCallbackCustom>(inner: &UringInner<C>, sq: &mut SqWriter<'_>, id: u32) {
    // SAFETY: the poller sent this id for its next request and does not touch
    // the slot until that request completes.
    let slot = unsafe { inner.slot(id) };
    if let Some(event) = slot.event.as_mut() {
        let entry = prepare(event, id);
        sq.push(&entry);
    }
}

/// A retry id taken off the channel while waiting: issue its request now.
fn requeue_retry<C: IOCallbackCustom>(inner: &UringInner<C>, id: u32) {
    let mut state = inner.submit.lock();
    let mut sq = inner.sq_writer(&mut state);
    push_next_request(inner, &mut sq, id);
    sq.submit();
}

/// The poller's side of submission: slots it freed go back into the free
/// list and the queued follow-ups and retries get their SQEs, unless another
/// thread holds the submit lock; then that thread does it (see
/// `SubmitLock::step_or_leave`). `submit_now` hands the SQEs to the kernel at
/// once; if false, the number published but not yet submitted is returned,
/// for the poller's next `io_uring_enter`. Also the direct submission step
/// of callbacks on pool threads (nothing freed, `submit_now`).
fn hand_back<C: IOCallbackCustom>(
    ctx: &IoSharedContext<C>,
    inner: &UringInner<C>,
    freed: &mut Vec<u32>,
    free_sender: &Sender<u32>,
    submit_now: bool,
) -> usize {
    let has_work = || ctx.total_count.load(Ordering::SeqCst) > 0 || !inner.retry_ids.is_empty();
    if freed.is_empty() && !has_work() {
        return 0;
    }
    let mut unsubmitted = 0;
    inner.submit.step_or_leave(freed, free_sender, |state, freed| {
        state.free.append(freed);
        if has_work() {
            let mut sq = submit_step(ctx, inner, state);
            unsubmitted = if submit_now || inner.sqpoll {
                sq.submit();
                0
            } else {
                sq.publish()
            };
        }
    });
    unsubmitted
}

fn worker_poll<C: IOCallbackCustom>(
    ctx: Arc<IoSharedContext<C>>,
    inner: Arc<UringInner<C>>,
    free_sender: Sender<u32>,
    retry_sender: Sender<u32>,
) {
    // Callbacks that run inline here queue follow-ups without waking the
    // submitter: this thread submits them after the batch.
    let _mark = PollerMark::set(&ctx);
    // SAFETY: this thread is the only one that ever touches the completion queue.
    let mut cq = unsafe { inner.ring.completion_shared() };
    let submitter = inner.ring.submitter();
    let mut exiting = false;
    let mut freed: Vec<u32> = Vec::with_capacity(ctx.depth);
    loop {
        cq.sync();
        let batch = cq.len();
        for (n, cqe) in (&mut cq).enumerate() {
            // Hand the follow-ups queued so far to the kernel as the batch
            // goes, not at its end: the device gets work back sooner.
            if flush_before(n, batch) {
                hand_back(&ctx, &inner, &mut freed, &free_sender, true);
            }
            let data = cqe.user_data();
            if data == SENTINEL_DATA {
                exiting = true;
                continue;
            }
            let id = data as u32;
            // SAFETY: the kernel returned this slot's request, so its submitter
            // has handed the slot over and does not touch it now.
            let slot = unsafe { inner.slot(id) };
            let Some(event) = slot.event.as_mut() else { continue };
            match event.apply_result(cqe.result() as i64) {
                Progress::Resubmit => {
                    let _ = retry_sender.send(id);
                }
                Progress::Complete => {
                    let event = slot.event.take();
                    ctx.free_slots_count.fetch_add(1, Ordering::SeqCst);
                    freed.push(id);
                    if let Some(event) = event {
                        ctx.complete(event);
                    }
                }
            }
        }
        cq.sync();
        let more_ready = !cq.is_empty();
        if exiting && !more_ready && ctx.free_slots_count.load(Ordering::SeqCst) == ctx.depth {
            return;
        }
        // Give the freed slots back and submit what the batch queued
        // (follow-ups, retries) before reaping more, so the device never waits
        // for this loop.
        let to_submit = hand_back(&ctx, &inner, &mut freed, &free_sender, false);
        if more_ready && to_submit == 0 {
            continue;
        }
        // Submit (if anything) and, unless completions are already waiting,
        // wait for at least one, in one call.
        let (min_complete, flags) = if more_ready { (0, 0) } else { (1, ENTER_GETEVENTS) };
        // SAFETY: plain io_uring_enter with no argument pointer.
        match unsafe { submitter.enter::<libc::sigset_t>(to_submit as u32, min_complete, flags, None) } {
            Ok(_) => {}
            Err(e) => {
                // Entries this call did not take stay in the ring: the
                // submitter's submit loop retries them.
                if to_submit > 0 {
                    let _ = ctx.noti_sender.try_send(());
                }
                if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)) {
                    eprintln!("ioengine: io_uring_enter(wait) failed: {e}; retrying");
                    thread::yield_now();
                }
            }
        }
    }
}
