//! The Linux native AIO driver: one kernel AIO context, a submitter thread
//! (`io_submit` in batches), a poller thread blocked in `io_getevents` with
//! no timeout, and helper threads for what AIO cannot do without blocking.
//!
//! `io_submit` runs many requests synchronously: buffered reads of
//! uncached data, buffered writes, reads of an empty pipe or socket (which
//! may wait for ever). Reads and writes therefore go in with RWF_NOWAIT, so
//! the kernel answers EAGAIN (or EOPNOTSUPP) instead of blocking the thread
//! that submits (the poller, a caller's pool thread, the submitter); those
//! requests, fallocate (which AIO lacks) and fsync where the file system
//! refuses AIO fsync run on helper threads (see `Helpers`), so that a
//! request that blocks for ever holds up nobody else.
//!
//! Every completion reaches the user through the poller: results produced
//! outside the kernel's AIO path (helper operations, requests `io_submit`
//! refused) are parked in the slot and announced with a zero-length read on
//! a private memfd, which completes at once. The same zero-length read with
//! the sentinel tag is the shutdown signal.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use crossbeam::channel::{self, Receiver, Sender};
use parking_lot::Mutex;

use crate::common::{poll_request_from_queues, SlotCollection};
use crate::context::{ContextOptions, IoSharedContext, PollerMark};
use crate::driver::blocking::run_blocking;
use crate::driver::{
    flush_before, is_resource_shortage, neg_errno, spawn_engine_thread, start_engine_thread, ActionSet, Backend,
    Backoff, SlotTable, Started, SubmitLock, SENTINEL_DATA,
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

    /// `aio_rw_flags`: fail with EAGAIN rather than block (4.14).
    pub const RWF_NOWAIT: i32 = 0x8;

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

/// Helper threads for work that ends (see `Helpers`).
const BOUNDED_HELPERS: usize = 2;

/// `aio_data` of the start-up probe for RWF_NOWAIT; slot ids are smaller.
const PROBE_DATA: u64 = u64::MAX - 1;

/// `aio_data` bit (above the slot id) of a request whose caller asked for
/// RWF_NOWAIT itself: its EAGAIN is the answer, not a cue for a helper.
const CALLER_NOWAIT: u64 = 1 << 32;

/// AIO's slot: the event and the `iocb` the kernel reads it from, so the
/// request needs no other memory.
pub struct AioSlot<C: IOCallbackCustom> {
    event: Option<Box<IOEvent<C>>>,
    iocb: iocb,
    /// A result produced outside the AIO path, delivered by the wake read.
    parked_result: Option<i64>,
    /// The event's requests run on a helper thread (AIO has no form for it,
    /// or the kernel could not start it without blocking).
    on_helper: bool,
}

/// What the holder of the submit lock owns: the free-slot list and the
/// iocb pointers for the next `io_submit`. When io_submit refuses for lack
/// of kernel resources (EAGAIN), the iocbs it did not take stay at the
/// front of `batch` and the submitter thread retries them with back-off.
struct SubmitState {
    free: Vec<u32>,
    batch: Vec<*mut iocb>,
}

// SAFETY: the iocb pointers point into slots owned by the lock holder; the
// state only moves between threads under the `submit` mutex.
unsafe impl Send for SubmitState {}

/// Who retries a wake read the kernel refused for now.
#[derive(Clone, Copy)]
enum Retry<'a> {
    /// A helper, through this sender (the caller must not wait).
    Later(&'a Sender<HelperJob>),
    /// The calling thread, with back-off.
    Here,
}

/// Work for the helper threads.
enum HelperJob {
    /// Run the next request of this slot's event with a blocking call.
    Run(u32),
    /// Announce a result that a thread which must not wait could not
    /// announce (the kernel refused the wake read for now).
    Deliver(u32, i64),
}

/// The helper threads. Work on regular files and block devices ends (a
/// disk read, a write into the page cache); `BOUNDED_HELPERS` threads run
/// it, more would only contend for the same inode locks. A read or write
/// of a stream (pipe, socket, character device) may wait for ever, so
/// every helper such a request occupies is replaced by a new one while
/// work waits, up to one per slot: nothing waits behind a stream.
struct Helpers {
    jobs: Receiver<HelperJob>,
    idle: AtomicUsize,
    started: AtomicUsize,
    /// Helpers inside a stream read or write now.
    on_streams: AtomicUsize,
    max: usize,
    /// Helpers started after the first; the poller joins them as it exits.
    grown: Mutex<Vec<JoinHandle<()>>>,
}

struct AioInner<C: IOCallbackCustom> {
    /// This value's own `Arc`, for starting helpers from any thread.
    me: Weak<AioInner<C>>,
    context: aio_context_t,
    destroyed: AtomicBool,
    slots: SlotTable<AioSlot<C>>,
    /// Private memfd that zero-length reads (wake-ups, sentinel) target.
    wake_file: OwnedFd,
    /// The kernel knows RWF_NOWAIT (4.14). Without it reads and writes run
    /// inside io_submit, as AIO always did on such kernels.
    nowait: bool,
    /// Held while filling slots and submitting: by the submitter thread, the
    /// poller right after a batch of completions (so follow-ups that inline
    /// callbacks queue go out without a thread hand-off), or a pool thread.
    submit: SubmitLock<SubmitState>,
    /// Slot ids the poller freed; drained by whoever holds `submit`.
    free_ids: Receiver<u32>,
    /// Set while io_submit refuses for lack of resources: the iocbs wait in
    /// the batch and only the submitter thread retries, so the poller and
    /// pool threads never spin on it.
    stalled: AtomicBool,
    helpers: Helpers,
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

    /// Submits one iocb, retrying interruptions. Err is the refusal.
    fn submit_one(&self, cb: *mut iocb) -> io::Result<()> {
        let mut list = [cb];
        loop {
            // SAFETY: cb points into a slot this thread owns; its buffers belong
            // to the slot's event, which stays parked until completion.
            match unsafe { abi::io_submit(self.context, 1, list.as_mut_ptr()) } {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Parks `result` in slot `id` (owned by the caller) and lets the poller
    /// deliver it. If the kernel refuses the wake read for now, a helper
    /// retries it (`Later(sender)`, for threads that must not wait), or this
    /// thread does, with back-off (`Here`).
    fn complete_via_poller(&self, id: u32, result: i64, retry: Retry<'_>) {
        // SAFETY: the caller owns the slot and hands it to the kernel below.
        let slot = unsafe { self.slot(id) };
        slot.parked_result = Some(result);
        slot.iocb = wake_iocb(self.wake_file.as_raw_fd(), id as u64);
        let cb: *mut iocb = &mut slot.iocb;
        let mut backoff = Backoff::new();
        while let Err(e) = self.submit_one(cb) {
            if !is_resource_shortage(&e) {
                eprintln!("ioengine: AIO wake-up submit failed: {e}; retrying");
            }
            match retry {
                Retry::Later(helper) => {
                    self.to_helper(helper, HelperJob::Deliver(id, result));
                    return;
                }
                Retry::Here => backoff.pause(),
            }
        }
    }

    /// Hands slot `id` (owned by the caller) to the helpers: its requests
    /// run there from now on.
    fn run_on_helper(&self, helper: &Sender<HelperJob>, id: u32) {
        // SAFETY: the caller owns the slot and passes it to a helper below.
        unsafe { self.slot(id) }.on_helper = true;
        self.to_helper(helper, HelperJob::Run(id));
    }

    fn to_helper(&self, helper: &Sender<HelperJob>, job: HelperJob) {
        // Helpers keep their receiver until every sender is gone.
        let _ = helper.send(job);
        if self.helpers_short() {
            self.grow_helpers();
        }
    }

    /// Whether jobs wait that no idle helper will take while fewer than
    /// `BOUNDED_HELPERS` helpers are free of streams.
    fn helpers_short(&self) -> bool {
        let h = &self.helpers;
        crate::driver::blocking::helper_wanted(
            h.started.load(Ordering::SeqCst),
            h.jobs.len() > h.idle.load(Ordering::SeqCst),
            h.on_streams.load(Ordering::SeqCst),
            BOUNDED_HELPERS,
            h.max,
        )
    }

    /// Starts one more helper. If the thread cannot start, the jobs wait for
    /// the helpers there are.
    fn grow_helpers(&self) {
        let mut grown = self.helpers.grown.lock();
        let Some(me) = self.me.upgrade() else { return };
        if !self.helpers_short() {
            return;
        }
        let jobs = self.helpers.jobs.clone();
        match spawn_engine_thread("ioe-aio-helper", move || worker_helper(me, jobs)) {
            Ok(handle) => {
                self.helpers.started.fetch_add(1, Ordering::SeqCst);
                grown.push(handle);
            }
            Err(e) => eprintln!("ioengine: cannot start another AIO helper thread ({e}); its work waits"),
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

/// Whether the kernel knows RWF_NOWAIT: a zero-length read of the memfd
/// with the flag is refused with EOPNOTSUPP (a memfd cannot honour it) by a
/// kernel that knows it and EINVAL by one that does not.
fn probe_nowait(context: aio_context_t, memfd: i32) -> bool {
    let mut probe = iocb { aio_rw_flags: abi::RWF_NOWAIT, ..wake_iocb(memfd, PROBE_DATA) };
    let mut list = [&mut probe as *mut iocb];
    // SAFETY: a zero-length read needs no buffer; the iocb outlives the call
    // and, if the kernel accepts it, its completion is reaped below.
    match unsafe { abi::io_submit(context, 1, list.as_mut_ptr()) } {
        Ok(_) => {
            let mut event = io_event::default();
            // SAFETY: room for one event; null timeout waits for it.
            let _ = unsafe { abi::io_getevents(context, 1, 1, &mut event, ptr::null_mut()) };
            true
        }
        Err(e) => e.raw_os_error() != Some(libc::EINVAL),
    }
}

/// Where an event's next request runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Kernel,
    Helper,
}

/// Writes the iocb for the event's next request; `Helper` when AIO has no
/// form for it (fallocate).
fn fill_iocb<C: IOCallbackCustom>(cb: &mut iocb, event: &mut IOEvent<C>, id: u32, nowait: bool) -> Route {
    // The caller's flags, with RWF_NOWAIT added where the kernel knows it;
    // AIO never polls, so RWF_HIPRI means nothing here.
    let caller_flags = event.rw_flags() & !libc::RWF_HIPRI;
    let rw_flags = caller_flags | if nowait { abi::RWF_NOWAIT } else { 0 };
    let caller_nowait = if caller_flags & libc::RWF_NOWAIT != 0 { CALLER_NOWAIT } else { 0 };
    let (opcode, buf, nbytes, offset, rw_flags) = match event.next_request() {
        IoRequest::Read { buf, len, offset } => (abi::IOCB_CMD_PREAD, buf as u64, len as u64, offset, rw_flags),
        IoRequest::Write { buf, len, offset } => (abi::IOCB_CMD_PWRITE, buf as u64, len as u64, offset, rw_flags),
        IoRequest::Readv { iov, count, offset } => (abi::IOCB_CMD_PREADV, iov as u64, count as u64, offset, rw_flags),
        IoRequest::Writev { iov, count, offset } => (abi::IOCB_CMD_PWRITEV, iov as u64, count as u64, offset, rw_flags),
        IoRequest::Fsync => (abi::IOCB_CMD_FSYNC, 0, 0, 0, 0),
        IoRequest::Fdatasync => (abi::IOCB_CMD_FDSYNC, 0, 0, 0, 0),
        IoRequest::Fallocate { .. } => return Route::Helper,
    };
    *cb = iocb {
        aio_data: id as u64 | caller_nowait,
        aio_lio_opcode: opcode,
        aio_fildes: event.fd() as u32,
        aio_buf: buf,
        aio_nbytes: nbytes,
        aio_offset: offset as i64,
        aio_rw_flags: rw_flags,
        ..Default::default()
    };
    Route::Kernel
}

/// Whether the kernel's answer to a RWF_NOWAIT request the driver added
/// means "this would block" (or "cannot promise not to"): then a helper
/// runs it. A caller's own RWF_NOWAIT gets the answer as it is.
fn would_block(cb: &iocb, result: i64) -> bool {
    cb.aio_rw_flags & abi::RWF_NOWAIT != 0
        && cb.aio_data & CALLER_NOWAIT == 0
        && (result == -(libc::EAGAIN as i64) || result == -(libc::EOPNOTSUPP as i64))
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
    /// Sets up the AIO context and starts the submitter, poller and first
    /// helper threads. The io_uring options do not apply and are ignored.
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
        let nowait = probe_nowait(context, wake_file.as_raw_fd());

        ctx.driver_bytes.store(memory_bytes::<C>(depth), Ordering::Relaxed);
        let slots = SlotTable::new(depth, || AioSlot {
            event: None,
            iocb: iocb::default(),
            parked_result: None,
            on_helper: false,
        });
        let (free_sender, free_ids) = channel::bounded(depth);
        let free_sender_direct = free_sender.clone();
        let submit =
            SubmitLock::new(SubmitState { free: (0..depth as u32).rev().collect(), batch: Vec::with_capacity(depth) });
        let (helper_sender, helper_jobs) = channel::unbounded::<HelperJob>();
        let helpers = Helpers {
            jobs: helper_jobs,
            idle: AtomicUsize::new(0),
            started: AtomicUsize::new(1),
            on_streams: AtomicUsize::new(0),
            max: depth.max(BOUNDED_HELPERS),
            grown: Mutex::new(Vec::new()),
        };
        let inner = Arc::new_cyclic(|me| AioInner {
            me: me.clone(),
            context,
            destroyed: AtomicBool::new(false),
            slots,
            wake_file,
            nowait,
            submit,
            free_ids,
            stalled: AtomicBool::new(false),
            helpers,
        });

        let mut threads = Vec::with_capacity(3);
        let spawned = (|| -> io::Result<()> {
            let (inner_h, jobs) = (inner.clone(), inner.helpers.jobs.clone());
            threads.push(start_engine_thread("ioe-aio-helper", move || worker_helper(inner_h, jobs))?);
            let (ctx_p, inner_p, helper_p) = (ctx.clone(), inner.clone(), helper_sender.clone());
            threads
                .push(start_engine_thread("ioe-aio-poll", move || worker_poll(ctx_p, inner_p, free_sender, helper_p))?);
            let (ctx_s, inner_s, helper_s) = (ctx.clone(), inner.clone(), helper_sender.clone());
            threads.push(start_engine_thread("ioe-aio-submit", move || {
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
        // drained, so the helper threads can end.
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
    helper: &'a Sender<HelperJob>,
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
        slot.on_helper = false;
        let event = slot.event.insert(event);
        match fill_iocb(&mut slot.iocb, event, id, self.inner.nowait) {
            Route::Kernel => self.batch.push(&mut slot.iocb),
            Route::Helper => self.inner.run_on_helper(self.helper, id),
        }
    }
}

/// Submits the batch. A request the kernel refuses gets its error through
/// the poller, or runs on a helper (a read or write the file cannot promise
/// to start without blocking; fsync the file system cannot do through
/// AIO). If the kernel is short of resources (EAGAIN), the iocbs it did not
/// take stay in the batch; returns true then.
fn submit_batch<C: IOCallbackCustom>(
    inner: &AioInner<C>,
    batch: &mut Vec<*mut iocb>,
    helper: &Sender<HelperJob>,
) -> bool {
    let mut start = 0;
    while start < batch.len() {
        let rest = batch.len() - start;
        // SAFETY: every pointer is the iocb of a slot this thread filled and owns;
        // the slot's event keeps the buffers alive until completion.
        match unsafe { abi::io_submit(inner.context, rest, batch.as_mut_ptr().add(start)) } {
            Ok(n) => start += n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                batch.drain(..start);
                return true;
            }
            Err(e) => {
                // io_submit stops at the first request it refuses.
                // SAFETY: the pointer is a slot iocb owned by this thread.
                let refused = unsafe { &*batch[start] };
                let id = refused.aio_data as u32;
                let errno = neg_errno(&e);
                let is_sync = matches!(refused.aio_lio_opcode, abi::IOCB_CMD_FSYNC | abi::IOCB_CMD_FDSYNC);
                if would_block(refused, errno) || (is_sync && errno == -(libc::EINVAL as i64)) {
                    inner.run_on_helper(helper, id);
                } else {
                    inner.complete_via_poller(id, errno, Retry::Later(helper));
                }
                start += 1;
            }
        }
    }
    batch.clear();
    false
}

/// One submission step under the submit lock: take back freed slots, fill
/// them from the queues (writing their iocbs) and submit them, after any
/// the kernel refused for lack of resources before. Threads that must not
/// wait (`!may_wait`) leave such a backlog to the submitter thread, which
/// they wake; `stalled` changes only under the lock, so the submitter's
/// last retry always sees what they left. Returns how many events it took
/// from the queues and whether a backlog remains.
fn submit_step<C: IOCallbackCustom>(
    ctx: &IoSharedContext<C>,
    inner: &AioInner<C>,
    state: &mut SubmitState,
    helper: &Sender<HelperJob>,
    may_wait: bool,
) -> (usize, bool) {
    let mut taken = 0;
    if ctx.total_count.load(Ordering::SeqCst) > 0 {
        state.free.extend(inner.free_ids.try_iter());
        let quota = state.free.len();
        let mut filler = AioFiller { ctx, inner, free: &mut state.free, batch: &mut state.batch, helper };
        taken = poll_request_from_queues(ctx, quota, &mut filler);
    }
    if state.batch.is_empty() || (!may_wait && inner.stalled.load(Ordering::SeqCst)) {
        return (taken, !state.batch.is_empty());
    }
    let backlog = submit_batch(inner, &mut state.batch, helper);
    if may_wait {
        inner.stalled.store(backlog, Ordering::SeqCst);
    } else if backlog && !inner.stalled.swap(true, Ordering::SeqCst) {
        let _ = ctx.noti_sender.try_send(());
    }
    (taken, backlog)
}

fn worker_submit<C: IOCallbackCustom>(
    ctx: Arc<IoSharedContext<C>>,
    inner: Arc<AioInner<C>>,
    noti: Receiver<()>,
    helper: Sender<HelperJob>,
) {
    let direct = ctx.direct_submit_guard();
    let mut backoff = Backoff::new();
    loop {
        // Take the pending wake-up first: anything queued after this point
        // sends a new one, so the waits below cannot miss work.
        let _ = noti.try_recv();
        let (out_of_slots, (taken, backlog)) = {
            let mut state = inner.submit.lock_for_step();
            let step = submit_step(&ctx, &inner, &mut state, &helper, true);
            (state.free.is_empty(), step)
        };
        if backlog {
            // The kernel is short of resources: the iocbs wait (their slots
            // stay busy, so nothing is lost) until it takes them.
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
        // Sleep until new work or (when work waits for one) a freed slot.
        // No timeout, no polling.
        if ctx.ready_count() > 0 {
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
/// callbacks on pool threads (with nothing freed). Never waits.
fn hand_back<C: IOCallbackCustom>(
    ctx: &IoSharedContext<C>,
    inner: &AioInner<C>,
    freed: &mut Vec<u32>,
    free_sender: &Sender<u32>,
    helper: &Sender<HelperJob>,
) {
    if freed.is_empty() && ctx.total_count.load(Ordering::SeqCst) == 0 {
        return;
    }
    inner.submit.step_or_leave(freed, free_sender, |state, freed| {
        state.free.append(freed);
        submit_step(ctx, inner, state, helper, false);
    });
}

/// Applies a result to slot `id`: completes the event, or issues the next
/// request for the rest of a short transfer (from this thread, since
/// io_submit is thread-safe and the request will not block), or hands it to
/// a helper when the kernel could not run it without blocking. `final_result`:
/// the result came from outside AIO and is not retried.
fn handle_result<C: IOCallbackCustom>(
    ctx: &IoSharedContext<C>,
    inner: &AioInner<C>,
    freed: &mut Vec<u32>,
    helper: &Sender<HelperJob>,
    id: u32,
    mut result: i64,
    mut final_result: bool,
) {
    // SAFETY: the kernel returned this slot's request; nobody else holds it.
    let slot = unsafe { inner.slot(id) };
    loop {
        if !final_result && would_block(&slot.iocb, result) {
            inner.run_on_helper(helper, id);
            return;
        }
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
                if slot.on_helper || fill_iocb(&mut slot.iocb, event, id, inner.nowait) == Route::Helper {
                    inner.run_on_helper(helper, id);
                    return;
                }
                match inner.submit_one(&mut slot.iocb) {
                    Ok(()) => return,
                    Err(e) if is_resource_shortage(&e) || would_block(&slot.iocb, neg_errno(&e)) => {
                        // Not on this thread: a helper runs it (and may wait).
                        inner.run_on_helper(helper, id);
                        return;
                    }
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
    helper: Sender<HelperJob>,
) {
    // Callbacks that run inline here queue follow-ups without waking the
    // submitter: this thread submits them after the batch.
    let mark = PollerMark::set(&ctx);
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
                // Only a context the engine broke fails here: nothing could
                // ever be reaped again, and retrying would spin.
                eprintln!("ioengine: internal error: io_getevents failed: {e}; aborting");
                std::process::abort();
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
            // A parked result was produced outside AIO (a helper, or a
            // refusal by io_submit) and is final.
            // SAFETY: this completion hands slot `id` to this thread.
            let parked = unsafe { inner.slot(id) }.parked_result.take();
            handle_result(&ctx, &inner, &mut freed, &helper, id, parked.unwrap_or(info.res), parked.is_some());
        }
        if exiting && ctx.free_slots_count.load(Ordering::SeqCst) == ctx.depth {
            break;
        }
        hand_back(&ctx, &inner, &mut freed, &free_sender, &helper);
    }
    drop(mark);
    inner.destroy();
    // The helpers end once every sender of their channel is gone (the
    // submitter drops its own as it returns); join the ones started late.
    drop(helper);
    let grown = std::mem::take(&mut *inner.helpers.grown.lock());
    for handle in grown {
        let _ = handle.join();
    }
}

/// Runs what AIO cannot run without blocking, off the submitter, the poller
/// and callers' threads.
fn worker_helper<C: IOCallbackCustom>(inner: Arc<AioInner<C>>, jobs: Receiver<HelperJob>) {
    loop {
        inner.helpers.idle.fetch_add(1, Ordering::SeqCst);
        let job = jobs.recv();
        inner.helpers.idle.fetch_sub(1, Ordering::SeqCst);
        let Ok(job) = job else { return };
        match job {
            HelperJob::Run(id) => {
                // SAFETY: whoever sent the id handed the slot over to this thread.
                let slot = unsafe { inner.slot(id) };
                let result = slot.event.as_mut().map_or(-(libc::EINVAL as i64), |event| {
                    if event.is_seekable() {
                        return run_blocking(event);
                    }
                    // This thread may now wait for ever: let another take over
                    // the waiting work.
                    inner.helpers.on_streams.fetch_add(1, Ordering::SeqCst);
                    if inner.helpers_short() {
                        inner.grow_helpers();
                    }
                    let result = run_blocking(event);
                    inner.helpers.on_streams.fetch_sub(1, Ordering::SeqCst);
                    result
                });
                inner.complete_via_poller(id, result, Retry::Here);
            }
            HelperJob::Deliver(id, result) => inner.complete_via_poller(id, result, Retry::Here),
        }
    }
}
