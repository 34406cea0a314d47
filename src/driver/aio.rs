//! The Linux native AIO driver: one kernel AIO context, a submitter thread
//! (`io_submit` in batches), a poller thread blocked in `io_getevents` with
//! no timeout, and a helper thread for operations AIO cannot do natively
//! (fallocate; fsync where the file system refuses AIO fsync).
//!
//! Every completion reaches the user through the poller: results produced
//! outside the kernel's AIO path (helper operations, requests `io_submit`
//! refused) are parked in the slot and announced with a zero-length read on
//! a private memfd, which completes at once. The same zero-length read with
//! the sentinel tag is the shutdown signal.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam::channel::{self, Receiver, Sender};

use crate::common::{poll_request_from_queues, SlotCollection};
use crate::context::{ContextOptions, IoSharedContext, PollerMark};
use crate::driver::{
    flush_before, is_resource_shortage, neg_errno, spawn_engine_thread, ActionSet, Backend, Backoff, SlotTable,
    Started, SubmitLock, SENTINEL_DATA,
};
use crate::tasks::{IOCallbackCustom, IOEvent, IoRequest, Progress};

/// The kernel's AIO ABI (`linux/aio_abi.h`), written out here so the crate
/// needs neither libaio nor bindgen.
#[allow(non_camel_case_types)]
pub mod abi {
    use std::io;

    pub type aio_context_t = libc::c_ulong;

    pub const IOCB_CMD_PREAD: u16 = 0;
    pub const IOCB_CMD_PWRITE: u16 = 1;
    pub const IOCB_CMD_FSYNC: u16 = 2;
    pub const IOCB_CMD_FDSYNC: u16 = 3;
    pub const IOCB_CMD_PREADV: u16 = 7;
    pub const IOCB_CMD_PWRITEV: u16 = 8;

    /// `struct iocb`: 64 bytes; `aio_key` and `aio_rw_flags` swap places on
    /// big-endian machines.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct iocb {
        pub aio_data: u64,
        #[cfg(target_endian = "little")]
        pub aio_key: u32,
        pub aio_rw_flags: i32,
        #[cfg(target_endian = "big")]
        pub aio_key: u32,
        pub aio_lio_opcode: u16,
        pub aio_reqprio: i16,
        pub aio_fildes: u32,
        pub aio_buf: u64,
        pub aio_nbytes: u64,
        pub aio_offset: i64,
        pub aio_reserved2: u64,
        pub aio_flags: u32,
        pub aio_resfd: u32,
    }

    /// `struct io_event`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct io_event {
        pub data: u64,
        pub obj: u64,
        pub res: i64,
        pub res2: i64,
    }

    const _: () = assert!(std::mem::size_of::<iocb>() == 64);
    const _: () = assert!(std::mem::size_of::<io_event>() == 32);

    fn check(ret: libc::c_long) -> io::Result<usize> {
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret as usize)
        }
    }

    /// # Safety
    /// `ctx` must point to a zero-initialised `aio_context_t`.
    pub unsafe fn io_setup(nr_events: u32, ctx: *mut aio_context_t) -> io::Result<()> {
        check(libc::syscall(libc::SYS_io_setup, nr_events as libc::c_long, ctx)).map(|_| ())
    }

    /// # Safety
    /// `ctx` must be a context from `io_setup` that no thread uses afterwards.
    pub unsafe fn io_destroy(ctx: aio_context_t) -> io::Result<()> {
        check(libc::syscall(libc::SYS_io_destroy, ctx)).map(|_| ())
    }

    /// # Safety
    /// `iocbs` must point to `nr` valid iocb pointers whose buffers stay
    /// valid until the matching events are reaped.
    pub unsafe fn io_submit(ctx: aio_context_t, nr: usize, iocbs: *mut *mut iocb) -> io::Result<usize> {
        check(libc::syscall(libc::SYS_io_submit, ctx, nr as libc::c_long, iocbs))
    }

    /// # Safety
    /// `iocb` must be a request submitted on `ctx`; `result` must be writable.
    pub unsafe fn io_cancel(ctx: aio_context_t, iocb: *mut iocb, result: *mut io_event) -> io::Result<()> {
        check(libc::syscall(libc::SYS_io_cancel, ctx, iocb, result)).map(|_| ())
    }

    /// # Safety
    /// `events` must have room for `max_nr` entries; `timeout` null (wait
    /// forever) or valid.
    pub unsafe fn io_getevents(
        ctx: aio_context_t,
        min_nr: usize,
        max_nr: usize,
        events: *mut io_event,
        timeout: *mut libc::timespec,
    ) -> io::Result<usize> {
        check(libc::syscall(
            libc::SYS_io_getevents,
            ctx,
            min_nr as libc::c_long,
            max_nr as libc::c_long,
            events,
            timeout,
        ))
    }
}

use abi::{aio_context_t, io_event, iocb};

/// Most completions taken by one `io_getevents`.
const MAX_EVENTS_PER_POLL: usize = 512;
/// `io_submit` refusals with EAGAIN tolerated for one request before the
/// error goes to the user.
const MAX_SUBMIT_EAGAIN: u32 = 64;

/// AIO's slot: the event and the `iocb` the kernel reads it from, so the
/// request needs no other memory.
pub struct AioSlot<C: IOCallbackCustom> {
    event: Option<Box<IOEvent<C>>>,
    iocb: iocb,
    /// A result produced outside the AIO path, delivered by the wake read.
    parked_result: Option<i64>,
}

/// What the holder of the submit lock owns: the free-slot list and the
/// batch of iocb pointers for the next `io_submit`.
struct SubmitState {
    free: Vec<u32>,
    batch: Vec<*mut iocb>,
}

// SAFETY: the iocb pointers point into slots owned by the lock holder; the
// state only moves between threads under the `submit` mutex.
unsafe impl Send for SubmitState {}

struct AioInner<C: IOCallbackCustom> {
    context: aio_context_t,
    destroyed: AtomicBool,
    slots: SlotTable<AioSlot<C>>,
    /// Private memfd that zero-length reads (wake-ups, sentinel) target.
    wake_file: OwnedFd,
    /// Held while filling slots and submitting: by the submitter thread, or
    /// by the poller right after a batch of completions (so follow-ups that
    /// inline callbacks queue go out without a thread hand-off).
    submit: SubmitLock<SubmitState>,
    /// Slot ids the poller freed; drained by whoever holds `submit`.
    free_ids: Receiver<u32>,
}

impl<C: IOCallbackCustom> AioInner<C> {
    /// # Safety
    /// The caller must own slot `id` at this moment (see `SlotTable`).
    #[allow(clippy::mut_from_ref)]
    unsafe fn slot(&self, id: u32) -> &mut AioSlot<C> {
        self.slots.get(id)
    }

    fn destroy(&self) {
        if !self.destroyed.swap(true, Ordering::SeqCst) {
            // SAFETY: the context came from io_setup and the swap makes this the
            // only destroy; callers guarantee no request is outstanding.
            let _ = unsafe { abi::io_destroy(self.context) };
        }
    }

    /// Submits one iocb, retrying interruptions. Err is the refusal errno.
    fn submit_one(&self, cb: *mut iocb) -> Result<(), io::Error> {
        let mut list = [cb];
        let mut eagain = 0;
        loop {
            // SAFETY: cb points into a slot this thread owns; its buffers belong
            // to the slot's event, which stays parked until completion.
            match unsafe { abi::io_submit(self.context, 1, list.as_mut_ptr()) } {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && eagain < MAX_SUBMIT_EAGAIN => {
                    eagain += 1;
                    thread::yield_now();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Parks `result` in slot `id` and lets the poller deliver it.
    fn complete_via_poller(&self, id: u32, result: i64) {
        // SAFETY: the caller owns the slot and hands it to the kernel below.
        let slot = unsafe { self.slot(id) };
        slot.parked_result = Some(result);
        slot.iocb = wake_iocb(self.wake_file.as_raw_fd(), id as u64);
        let cb: *mut iocb = &mut slot.iocb;
        // A zero-length read of our own memfd cannot be refused but for lack
        // of memory; keep trying rather than lose the completion.
        while let Err(e) = self.submit_one(cb) {
            eprintln!("ioengine: AIO wake-up submit failed: {e}; retrying");
            thread::sleep(Duration::from_millis(1));
        }
    }
}

impl<C: IOCallbackCustom> Drop for AioInner<C> {
    fn drop(&mut self) {
        self.destroy();
    }
}

fn wake_iocb(fd: i32, data: u64) -> iocb {
    iocb {
        aio_data: data,
        aio_lio_opcode: abi::IOCB_CMD_PREAD,
        aio_fildes: fd as u32,
        aio_buf: 0,
        aio_nbytes: 0,
        ..Default::default()
    }
}

/// Writes the iocb for the event's next request. Returns false when AIO has
/// no native form for it (the helper thread runs it instead).
fn fill_iocb<C: IOCallbackCustom>(cb: &mut iocb, event: &mut IOEvent<C>, id: u32) -> bool {
    let (opcode, buf, nbytes, offset) = match event.next_request() {
        IoRequest::Read { buf, len, offset } => (abi::IOCB_CMD_PREAD, buf as u64, len as u64, offset),
        IoRequest::Write { buf, len, offset } => (abi::IOCB_CMD_PWRITE, buf as u64, len as u64, offset),
        IoRequest::Readv { iov, count, offset } => (abi::IOCB_CMD_PREADV, iov as u64, count as u64, offset),
        IoRequest::Writev { iov, count, offset } => (abi::IOCB_CMD_PWRITEV, iov as u64, count as u64, offset),
        IoRequest::Fsync => (abi::IOCB_CMD_FSYNC, 0, 0, 0),
        IoRequest::Fdatasync => (abi::IOCB_CMD_FDSYNC, 0, 0, 0),
        IoRequest::Fallocate { .. } => return false,
    };
    *cb = iocb {
        aio_data: id as u64,
        aio_lio_opcode: opcode,
        aio_fildes: event.fd() as u32,
        aio_buf: buf,
        aio_nbytes: nbytes,
        aio_offset: offset as i64,
        ..Default::default()
    };
    true
}

/// Runs a request synchronously (helper thread): 0 or -errno. A call a
/// signal interrupts is made again here (a bounded number of times), so
/// the result is final: the poller never retries it as a native AIO
/// request, which AIO may not have.
fn run_blocking<C: IOCallbackCustom>(event: &mut IOEvent<C>) -> i64 {
    const MAX_EINTR: usize = 16;
    let fd = event.fd();
    let request = event.next_request();
    let mut result = 0;
    for _ in 0..MAX_EINTR {
        // SAFETY: plain syscalls on a descriptor number; a bad one yields EBADF.
        let ret = unsafe {
            match request {
                IoRequest::Fallocate { mode, offset, len } => {
                    libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t)
                }
                IoRequest::Fsync => libc::fsync(fd),
                IoRequest::Fdatasync => libc::fdatasync(fd),
                _ => return -(libc::EINVAL as i64),
            }
        };
        if ret == 0 {
            return 0;
        }
        result = neg_errno(&io::Error::last_os_error());
        if result != -(libc::EINTR as i64) {
            break;
        }
    }
    result
}

/// What the driver keeps per context: slots (with their iocbs), the free
/// list, its channel and the submit batch, the poller's event buffer and the
/// kernel's completion ring.
fn memory_bytes<C: IOCallbackCustom>(depth: usize) -> usize {
    let channel_slot = std::mem::size_of::<usize>() + std::mem::size_of::<u32>();
    let per_slot = std::mem::size_of::<AioSlot<C>>()
        + std::mem::size_of::<u32>()
        + channel_slot
        + std::mem::size_of::<*mut iocb>();
    let events = depth.min(MAX_EVENTS_PER_POLL) * std::mem::size_of::<io_event>();
    let kernel_ring = depth * std::mem::size_of::<io_event>();
    depth * per_slot + events + kernel_ring
}

pub struct AioDriver;

impl AioDriver {
    /// Sets up the AIO context and starts the submitter, poller and helper
    /// threads. The io_uring options do not apply and are ignored.
    pub(crate) fn start<C: IOCallbackCustom>(
        ctx: Arc<IoSharedContext<C>>,
        _opts: &ContextOptions,
        noti_receiver: Receiver<()>,
    ) -> io::Result<Started> {
        let depth = ctx.depth;
        // SAFETY: the name is a NUL-terminated literal.
        let raw = unsafe { libc::memfd_create(c"ioengine-aio-wake".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned a new descriptor that nothing else owns.
        let wake_file = unsafe { OwnedFd::from_raw_fd(raw) };

        let mut context: aio_context_t = 0;
        // Room for every slot; the sentinel is only sent once all are free.
        let nr_events = u32::try_from(depth).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `context` is a zeroed aio_context_t on our stack.
        unsafe { abi::io_setup(nr_events, &mut context)? };

        ctx.driver_bytes.store(memory_bytes::<C>(depth), Ordering::Relaxed);
        let slots = SlotTable::new(depth, || AioSlot { event: None, iocb: iocb::default(), parked_result: None });
        let (free_sender, free_ids) = channel::bounded(depth);
        let free_sender_direct = free_sender.clone();
        let submit =
            SubmitLock::new(SubmitState { free: (0..depth as u32).rev().collect(), batch: Vec::with_capacity(depth) });
        let inner =
            Arc::new(AioInner { context, destroyed: AtomicBool::new(false), slots, wake_file, submit, free_ids });

        let (helper_sender, helper_receiver) = channel::unbounded::<u32>();

        let mut threads = Vec::with_capacity(3);
        let spawned = (|| -> io::Result<()> {
            let inner_h = inner.clone();
            threads.push(spawn_engine_thread("ioe-aio-helper", move || worker_helper(inner_h, helper_receiver))?);
            let (ctx_p, inner_p, helper_p) = (ctx.clone(), inner.clone(), helper_sender.clone());
            threads
                .push(spawn_engine_thread("ioe-aio-poll", move || worker_poll(ctx_p, inner_p, free_sender, helper_p))?);
            let (ctx_s, inner_s, helper_s) = (ctx.clone(), inner.clone(), helper_sender.clone());
            threads.push(spawn_engine_thread("ioe-aio-submit", move || {
                worker_submit(ctx_s, inner_s, noti_receiver, helper_s)
            })?);
            Ok(())
        })();
        if let Err(e) = spawned {
            // Nothing was submitted. The helper ends when every sender of its
            // channel is gone (the closures that failed to spawn dropped
            // theirs; a poller that started keeps one until it exits), and a
            // poller that started ends on the sentinel read.
            drop(helper_sender);
            if threads.len() >= 2 {
                send_sentinel(&inner);
            }
            for t in threads {
                let _ = t.join();
            }
            return Err(e);
        }
        // Holds a helper sender: the submitter drops it when the context has
        // drained, so the helper thread can end.
        let inner_d = inner.clone();
        ctx.set_direct_submit(Box::new(move |ctx| {
            hand_back(ctx, &inner_d, &mut Vec::new(), &free_sender_direct, &helper_sender)
        }));
        Ok(Started { backend: Backend::Aio, threads, fallback_errno: None, refused_actions: ActionSet::default() })
    }
}

/// Fills free slots straight from the queues: the iocb is written in the
/// slot itself and its address joins the batch for one `io_submit`.
struct AioFiller<'a, C: IOCallbackCustom> {
    ctx: &'a IoSharedContext<C>,
    inner: &'a AioInner<C>,
    free: &'a mut Vec<u32>,
    batch: &'a mut Vec<*mut iocb>,
    helper: &'a Sender<u32>,
}

impl<C: IOCallbackCustom> SlotCollection<C> for AioFiller<'_, C> {
    fn push(&mut self, event: Box<IOEvent<C>>) {
        // poll_request_from_queues asks for at most free.len() events.
        let Some(id) = self.free.pop() else {
            unreachable!("scheduler exceeded its quota");
        };
        self.ctx.free_slots_count.fetch_sub(1, Ordering::SeqCst);
        // SAFETY: `id` came from the free list, so this thread owns the slot.
        let slot = unsafe { self.inner.slot(id) };
        let event = slot.event.insert(event);
        if fill_iocb(&mut slot.iocb, event, id) {
            self.batch.push(&mut slot.iocb);
        } else {
            // The helper owns the slot from here; its thread outlives the submitter.
            let _ = self.helper.send(id);
        }
    }
}

/// Submits the batch; a request the kernel refuses gets its error through
/// the poller (fsync the file system cannot do asynchronously goes to the
/// helper instead).
fn submit_batch<C: IOCallbackCustom>(inner: &AioInner<C>, batch: &mut Vec<*mut iocb>, helper: &Sender<u32>) {
    let mut start = 0;
    let mut eagain = 0;
    while start < batch.len() {
        let rest = batch.len() - start;
        // SAFETY: every pointer is the iocb of a slot this thread filled and owns;
        // the slot's event keeps the buffers alive until completion.
        match unsafe { abi::io_submit(inner.context, rest, batch.as_mut_ptr().add(start)) } {
            Ok(n) => {
                start += n;
                eagain = 0;
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && eagain < MAX_SUBMIT_EAGAIN => {
                eagain += 1;
                thread::yield_now();
            }
            Err(e) => {
                // io_submit stops at the first request it refuses.
                // SAFETY: the pointer is a slot iocb owned by this thread.
                let refused = unsafe { &*batch[start] };
                let id = refused.aio_data as u32;
                let is_sync = matches!(refused.aio_lio_opcode, abi::IOCB_CMD_FSYNC | abi::IOCB_CMD_FDSYNC);
                if is_sync && e.raw_os_error() == Some(libc::EINVAL) {
                    let _ = helper.send(id);
                } else {
                    inner.complete_via_poller(id, neg_errno(&e));
                }
                start += 1;
                eagain = 0;
            }
        }
    }
    batch.clear();
}

/// One submission step under the submit lock: take back freed slots, fill
/// them from the queues (writing their iocbs) and submit them in one call.
fn submit_step<C: IOCallbackCustom>(
    ctx: &IoSharedContext<C>,
    inner: &AioInner<C>,
    state: &mut SubmitState,
    helper: &Sender<u32>,
) {
    if ctx.total_count.load(Ordering::SeqCst) == 0 {
        return;
    }
    state.free.extend(inner.free_ids.try_iter());
    let quota = state.free.len();
    let mut filler = AioFiller { ctx, inner, free: &mut state.free, batch: &mut state.batch, helper };
    poll_request_from_queues(ctx, quota, &mut filler);
    submit_batch(inner, &mut state.batch, helper);
}

fn worker_submit<C: IOCallbackCustom>(
    ctx: Arc<IoSharedContext<C>>,
    inner: Arc<AioInner<C>>,
    noti: Receiver<()>,
    helper: Sender<u32>,
) {
    let direct = ctx.direct_submit_guard();
    loop {
        // Take the pending wake-up first: anything queued after this point
        // sends a new one, so the waits below cannot miss work.
        let _ = noti.try_recv();
        let out_of_slots = {
            let mut state = inner.submit.lock_for_step();
            submit_step(&ctx, &inner, &mut state, &helper);
            state.free.is_empty()
        };
        if (ctx.total_count.load(Ordering::SeqCst) > 0 && !out_of_slots) || inner.submit.step_pending() {
            continue;
        }
        if ctx.finish_drain() {
            break;
        }
        // Sleep until new work or (when work waits for one) a freed slot.
        // No timeout, no polling.
        if ctx.total_count.load(Ordering::SeqCst) > 0 {
            crossbeam::select! {
                recv(noti) -> _ => {},
                recv(inner.free_ids) -> id => if let Ok(id) = id { inner.submit.lock().free.push(id) },
            }
        } else {
            let _ = noti.recv();
        }
    }
    // Shutdown: nothing is queued or in flight and every callback returned.
    // No callback can submit any more, so the direct path goes (with its
    // helper sender). The sentinel read wakes the poller, which destroys the
    // context and exits.
    drop(direct);
    send_sentinel(&inner);
}

/// Submits the zero-length read that tells the poller to exit once every
/// slot is free. Runs on the submitter (or the starting) thread, which may
/// wait for the kernel to find room.
fn send_sentinel<C: IOCallbackCustom>(inner: &AioInner<C>) {
    let mut sentinel = wake_iocb(inner.wake_file.as_raw_fd(), SENTINEL_DATA);
    let mut backoff = Backoff::new();
    while let Err(e) = inner.submit_one(&mut sentinel) {
        if !is_resource_shortage(&e) {
            eprintln!("ioengine: AIO shutdown sentinel submit failed: {e}; retrying");
        }
        backoff.pause();
    }
}

/// The poller's side of submission: slots it freed go back into the free
/// list and the queued follow-ups are submitted, unless another thread
/// holds the submit lock; then that thread does it (see
/// `SubmitLock::step_or_leave`). Also the direct submission step of
/// callbacks on pool threads (with nothing freed).
fn hand_back<C: IOCallbackCustom>(
    ctx: &IoSharedContext<C>,
    inner: &AioInner<C>,
    freed: &mut Vec<u32>,
    free_sender: &Sender<u32>,
    helper: &Sender<u32>,
) {
    if freed.is_empty() && ctx.total_count.load(Ordering::SeqCst) == 0 {
        return;
    }
    inner.submit.step_or_leave(freed, free_sender, |state, freed| {
        state.free.append(freed);
        submit_step(ctx, inner, state, helper);
    });
}

/// Applies a result to slot `id`: completes the event, or issues the next
/// request for the rest of a short transfer (from this thread, since
/// io_submit is thread-safe).
fn handle_result<C: IOCallbackCustom>(
    ctx: &IoSharedContext<C>,
    inner: &AioInner<C>,
    freed: &mut Vec<u32>,
    helper: &Sender<u32>,
    id: u32,
    mut result: i64,
    mut final_result: bool,
) {
    // SAFETY: the kernel returned this slot's request; nobody else holds it.
    let slot = unsafe { inner.slot(id) };
    loop {
        let Some(event) = slot.event.as_mut() else { return };
        let progress = if final_result { event.apply_final_result(result) } else { event.apply_result(result) };
        match progress {
            Progress::Complete => {
                let event = slot.event.take();
                ctx.free_slots_count.fetch_add(1, Ordering::SeqCst);
                freed.push(id);
                if let Some(event) = event {
                    ctx.complete(event);
                }
                return;
            }
            Progress::Resubmit => {
                if !fill_iocb(&mut slot.iocb, event, id) {
                    let _ = helper.send(id);
                    return;
                }
                match inner.submit_one(&mut slot.iocb) {
                    Ok(()) => return,
                    Err(e) => {
                        result = neg_errno(&e);
                        final_result = true;
                    }
                }
            }
        }
    }
}

fn worker_poll<C: IOCallbackCustom>(
    ctx: Arc<IoSharedContext<C>>,
    inner: Arc<AioInner<C>>,
    free_sender: Sender<u32>,
    helper: Sender<u32>,
) {
    // Callbacks that run inline here queue follow-ups without waking the
    // submitter: this thread submits them after the batch.
    let _mark = PollerMark::set(&ctx);
    let capacity = ctx.depth.min(MAX_EVENTS_PER_POLL);
    let mut events = vec![io_event::default(); capacity];
    let mut freed: Vec<u32> = Vec::with_capacity(ctx.depth);
    let mut exiting = false;
    loop {
        // SAFETY: `events` has room for `capacity` entries; a null timeout
        // blocks until at least one completion (no periodic wake-ups).
        let got = match unsafe { abi::io_getevents(inner.context, 1, capacity, events.as_mut_ptr(), ptr::null_mut()) } {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                eprintln!("ioengine: io_getevents failed: {e}; retrying");
                thread::yield_now();
                continue;
            }
        };
        for (n, info) in events[..got].iter().enumerate() {
            // Submit the follow-ups queued so far as the batch goes, not at
            // its end: the device gets work back sooner.
            if flush_before(n, got) {
                hand_back(&ctx, &inner, &mut freed, &free_sender, &helper);
            }
            if info.data == SENTINEL_DATA {
                exiting = true;
                continue;
            }
            let id = info.data as u32;
            // SAFETY: this completion hands slot `id` to this thread.
            // A parked result was produced outside AIO (the helper, or a
            // refusal by io_submit) and is final.
            let parked = unsafe { inner.slot(id) }.parked_result.take();
            handle_result(&ctx, &inner, &mut freed, &helper, id, parked.unwrap_or(info.res), parked.is_some());
        }
        if exiting && ctx.free_slots_count.load(Ordering::SeqCst) == ctx.depth {
            inner.destroy();
            return;
        }
        hand_back(&ctx, &inner, &mut freed, &free_sender, &helper);
    }
}

/// Runs the operations AIO cannot do natively, off the submitter and poller.
fn worker_helper<C: IOCallbackCustom>(inner: Arc<AioInner<C>>, jobs: Receiver<u32>) {
    for id in jobs.iter() {
        // SAFETY: whoever sent the id handed the slot over to this thread.
        let slot = unsafe { inner.slot(id) };
        let result = slot.event.as_mut().map_or(-(libc::EINVAL as i64), |event| run_blocking(event));
        inner.complete_via_poller(id, result);
    }
}
