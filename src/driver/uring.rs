//! The io_uring driver: one ring per context, a submitter thread that owns
//! the submission queue and a poller thread that owns the completion queue.
//!
//! A slot is only the event pointer; the slot id travels as the SQE's
//! `user_data`. Both queues have room for `depth` entries; at most `depth`
//! I/Os are in flight and the shutdown NOP is sent only when none is, so
//! neither queue can overflow.

use std::cell::UnsafeCell;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crossbeam::channel::{self, Receiver, Sender};
use io_uring::squeue::Entry;
use io_uring::types::{Fd, FsyncFlags};
use io_uring::{opcode, IoUring, Probe, SubmissionQueue, Submitter};

use crate::common::{poll_request_from_queues, SlotCollection};
use crate::context::{ContextOptions, IoSharedContext};
use crate::driver::SENTINEL_DATA;
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

struct UringInner<C: IOCallbackCustom> {
    ring: IoUring,
    slots: Box<[UnsafeCell<UringSlot<C>>]>,
}

// SAFETY: a slot is used by one thread at a time; ownership passes from the
// submitter to the poller through the ring (kernel barriers) and back through
// channels, each a happens-before edge. The ring's SQ is used only by the
// submitter and its CQ only by the poller.
unsafe impl<C: IOCallbackCustom> Sync for UringInner<C> {}
// SAFETY: as above; events are Send.
unsafe impl<C: IOCallbackCustom> Send for UringInner<C> {}

impl<C: IOCallbackCustom> UringInner<C> {
    /// # Safety
    /// The caller must own slot `id` at this moment (see the Sync impl).
    #[allow(clippy::mut_from_ref)]
    unsafe fn slot(&self, id: u32) -> &mut UringSlot<C> {
        &mut *self.slots[id as usize].get()
    }
}

/// Whether io_uring can run here: the syscall is allowed and every opcode
/// the driver needs is supported.
pub fn uring_supported() -> bool {
    build_ring(&ContextOptions::with_depth(1)).is_ok()
}

fn build_ring(opts: &ContextOptions) -> io::Result<IoUring> {
    let mut builder = IoUring::builder();
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
        let ring = build_ring(opts)?;
        ctx.driver_bytes.store(memory_bytes::<C>(&ring, ctx.depth), Ordering::Relaxed);
        let slots = (0..ctx.depth).map(|_| UnsafeCell::new(UringSlot { event: None })).collect();
        let inner = Arc::new(UringInner { ring, slots });
        let sqpoll = opts.sqpoll_idle_ms.is_some();

        // Each slot id is in at most one message at a time, so `depth`
        // capacity never blocks the poller.
        let (free_sender, free_receiver) = channel::bounded(ctx.depth);
        let (retry_sender, retry_receiver) = channel::bounded(ctx.depth);

        let (ctx_poll, inner_poll) = (ctx.clone(), inner.clone());
        let poller = thread::Builder::new()
            .name("ioe-uring-poll".into())
            .spawn(move || worker_poll(ctx_poll, inner_poll, free_sender, retry_sender))?;
        let inner_submit = inner.clone();
        let submitter = thread::Builder::new()
            .name("ioe-uring-submit".into())
            .spawn(move || worker_submit(ctx, inner_submit, sqpoll, noti_receiver, free_receiver, retry_receiver));
        match submitter {
            Ok(submitter) => Ok(vec![submitter, poller]),
            Err(e) => {
                // Nothing was submitted: the NOP alone lets the poller exit.
                let mut sq = SqWriter {
                    // SAFETY: no submitter thread exists, so this is the only SQ user.
                    sq: unsafe { inner.ring.submission_shared() },
                    submitter: inner.ring.submitter(),
                    sqpoll,
                };
                sq.push(&opcode::Nop::new().build().user_data(SENTINEL_DATA));
                sq.submit();
                drop(sq);
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

/// The submitter's side of the ring.
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
            // Not reachable with the ring sized depth + 1, but a full queue only
            // needs the kernel to consume entries.
            self.submit();
            thread::yield_now();
        }
    }

    /// Hands every queued SQE to the kernel (one syscall for the batch).
    fn submit(&mut self) {
        self.sq.sync();
        while !self.sq.is_empty() {
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
            self.sq.sync();
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
        // SAFETY: `id` came from the free list, so this thread owns the slot.
        let slot = unsafe { self.inner.slot(id) };
        let entry = prepare(slot.event.insert(event), id);
        self.sq.push(&entry);
    }
}

fn resubmit<C: IOCallbackCustom>(inner: &UringInner<C>, sq: &mut SqWriter<'_>, id: u32) {
    // SAFETY: the poller sent this id for resubmission and does not touch the
    // slot until the new request completes.
    let slot = unsafe { inner.slot(id) };
    if let Some(event) = slot.event.as_mut() {
        let entry = prepare(event, id);
        sq.push(&entry);
    }
}

fn worker_submit<C: IOCallbackCustom>(
    ctx: Arc<IoSharedContext<C>>,
    inner: Arc<UringInner<C>>,
    sqpoll: bool,
    noti: Receiver<()>,
    free_receiver: Receiver<u32>,
    retry_receiver: Receiver<u32>,
) {
    let mut free: Vec<u32> = (0..ctx.depth as u32).rev().collect();
    let mut sq = SqWriter {
        // SAFETY: this thread is the only one that ever touches the submission queue.
        sq: unsafe { inner.ring.submission_shared() },
        submitter: inner.ring.submitter(),
        sqpoll,
    };
    loop {
        // Take the pending wake-up first: anything queued after this point
        // sends a new one, so the waits below cannot miss work.
        let _ = noti.try_recv();
        for id in retry_receiver.try_iter() {
            resubmit(&inner, &mut sq, id);
        }
        if ctx.total_count.load(Ordering::SeqCst) > 0 {
            if free.is_empty() {
                free.extend(free_receiver.try_iter());
            }
            let quota = free.len();
            let mut filler = UringFiller { ctx: &ctx, inner: &inner, free: &mut free, sq: &mut sq };
            poll_request_from_queues(&ctx, quota, &mut filler);
        }
        sq.submit();

        if ctx.total_count.load(Ordering::SeqCst) > 0 {
            if free.is_empty() {
                // Work waits for a slot: sleep until one frees (or a retry).
                crossbeam::select! {
                    recv(free_receiver) -> id => free.extend(id),
                    recv(retry_receiver) -> id => if let Ok(id) = id { resubmit(&inner, &mut sq, id) },
                }
            }
            continue;
        }
        if ctx.drained() {
            break;
        }
        // Idle: sleep until new work (or a retry). No timeout, no polling.
        crossbeam::select! {
            recv(noti) -> _ => {},
            recv(retry_receiver) -> id => if let Ok(id) = id { resubmit(&inner, &mut sq, id) },
        }
    }

    // Shutdown: the NOP wakes the poller, which drains every slot and exits.
    // Short transfers may still need resubmitting until then.
    let nop = opcode::Nop::new().build().user_data(SENTINEL_DATA);
    sq.push(&nop);
    sq.submit();
    while let Ok(id) = retry_receiver.recv() {
        resubmit(&inner, &mut sq, id);
        sq.submit();
    }
}

fn worker_poll<C: IOCallbackCustom>(
    ctx: Arc<IoSharedContext<C>>,
    inner: Arc<UringInner<C>>,
    free_sender: Sender<u32>,
    retry_sender: Sender<u32>,
) {
    // SAFETY: this thread is the only one that ever touches the completion queue.
    let mut cq = unsafe { inner.ring.completion_shared() };
    let submitter = inner.ring.submitter();
    let mut exiting = false;
    loop {
        cq.sync();
        for cqe in &mut cq {
            let data = cqe.user_data();
            if data == SENTINEL_DATA {
                exiting = true;
                continue;
            }
            let id = data as u32;
            // SAFETY: the kernel returned this slot's request, so the submitter
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
                    let _ = free_sender.send(id);
                    if let Some(event) = event {
                        ctx.complete(event);
                    }
                }
            }
        }
        cq.sync();
        if !cq.is_empty() {
            continue;
        }
        if exiting && ctx.free_slots_count.load(Ordering::SeqCst) == ctx.depth {
            return;
        }
        // SAFETY: plain io_uring_enter with no argument pointer: submit nothing,
        // wait for at least one completion.
        match unsafe { submitter.enter::<libc::sigset_t>(0, 1, ENTER_GETEVENTS, None) } {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)) => {}
            Err(e) => {
                eprintln!("ioengine: io_uring_enter(wait) failed: {e}; retrying");
                thread::yield_now();
            }
        }
    }
}
