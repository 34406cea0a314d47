//! Contexts: options, creation, destruction (drain) and queries.

use std::ffi::c_int;
use std::sync::Arc;

use super::workers::ioe_workers;
use super::{guard, guard64, guard_or, neg, FfiCallback};
use crate::callback_worker::IOWorkers;
use crate::context::{ContextOptions, IOContext};
use crate::driver::Backend;

/// Choose io_uring when the kernel supports it, Linux AIO otherwise.
pub const IOE_BACKEND_AUTO: u32 = 0;
/// io_uring only; context creation fails if it cannot start.
pub const IOE_BACKEND_URING: u32 = 1;
/// Linux native AIO only; context creation fails if it cannot start.
pub const IOE_BACKEND_AIO: u32 = 2;

/// io_uring: a kernel thread polls the submission queue
/// (IORING_SETUP_SQPOLL); it sleeps after `sqpoll_idle_ms` idle.
pub const IOE_SETUP_SQPOLL: u32 = 1 << 0;
/// io_uring: busy-poll for completions (IORING_SETUP_IOPOLL). Needs O_DIRECT
/// files on a device with poll queues (other reads and writes complete with
/// an error). The poller spins only while I/O is in flight; an idle context
/// sleeps. IOE_OP_FSYNC, IOE_OP_FDATASYNC and IOE_OP_FALLOCATE cannot run
/// on such a ring and are refused by the submission functions (-EINVAL).
pub const IOE_SETUP_IOPOLL: u32 = 1 << 1;
/// io_uring: use `cq_size` completion-queue entries (IORING_SETUP_CQSIZE).
pub const IOE_SETUP_CQSIZE: u32 = 1 << 2;

const KNOWN_FLAGS: u32 = IOE_SETUP_SQPOLL | IOE_SETUP_IOPOLL | IOE_SETUP_CQSIZE;

/// Largest queue depth a context accepts.
pub const IOE_MAX_DEPTH: u32 = 32767;
/// Default queue depth set by `ioe_context_options_init`.
pub const IOE_DEFAULT_DEPTH: u32 = 128;

// The C constants are literals for cbindgen; the build fails if they drift
// from the core's.
const _: () = assert!(IOE_MAX_DEPTH as usize == crate::context::MAX_DEPTH);
const _: () = assert!(IOE_DEFAULT_DEPTH as usize == crate::context::DEFAULT_DEPTH);

/// How to create a context. Always fill it with `ioe_context_options_init`
/// first, then change the fields you need.
#[repr(C)]
pub struct ioe_context_options {
    /// Most I/Os in flight in the kernel at once, 1 to IOE_MAX_DEPTH.
    /// More requests than that may be submitted; they wait in the queues.
    pub depth: u32,
    /// IOE_BACKEND_AUTO, IOE_BACKEND_URING or IOE_BACKEND_AIO. The
    /// environment variable IOENGINE_BACKEND=auto|uring|aio overrides it.
    pub backend: u32,
    /// IOE_SETUP_* bits (io_uring only; AIO ignores them).
    pub flags: u32,
    /// With IOE_SETUP_SQPOLL: idle milliseconds before the kernel thread sleeps.
    pub sqpoll_idle_ms: u32,
    /// With IOE_SETUP_CQSIZE: completion-queue entries, `depth` to 65536
    /// (without the flag: `depth` rounded up to a power of two).
    pub cq_size: u32,
    /// Most requests the context holds queued, waiting for a free slot (a
    /// merged run counts once); past it the submission functions return
    /// -EAGAIN at once (also from callbacks) and ioe_stats.queue_full
    /// counts it. 0 (the default): no limit, so a producer faster than the
    /// device grows memory without bound.
    pub max_queued: u32,
    /// Callback pool, or NULL to run callbacks directly on the context's
    /// poller thread (lowest latency; such callbacks must not block).
    /// Borrowed: the context takes its own reference.
    pub workers: *mut ioe_workers,
    /// Must be zero (room for future options).
    pub reserved: [u64; 4],
}

/// A context: queues, a driver and its threads (opaque).
pub struct ioe_context {
    pub(crate) ctx: Arc<IOContext<FfiCallback>>,
}

/// Counters since the context was created.
#[repr(C)]
pub struct ioe_stats {
    /// Requests accepted (each request of a merge counts).
    pub submitted: u64,
    /// Requests whose callback ran or is running.
    pub completed: u64,
    /// Completed requests whose result was an error.
    pub failed: u64,
    /// Requests that travelled inside a merged I/O.
    pub merged: u64,
    /// I/Os in the kernel now (a merged I/O counts once).
    pub in_flight: u64,
    /// Requests waiting in the queues now.
    pub pending: u64,
    /// Memory the engine keeps for the context (slots, kernel rings,
    /// bookkeeping), in bytes.
    pub memory_bytes: u64,
    /// Engine memory per in-flight I/O: its share of memory_bytes plus the
    /// request record that travels with it.
    pub memory_per_slot: u64,
    /// io_uring: times the engine found its completion queue overflowed,
    /// plus completions the kernel dropped. Zero by design: the queues are
    /// sized so that they cannot overflow; anything else is a bug.
    pub cq_overflows: u64,
    /// Submissions refused with -EAGAIN because `max_queued` requests were
    /// queued.
    pub queue_full: u64,
    /// Zero; room for counters added later without changing the size.
    pub reserved: [u64; 6],
}

/// Fills `*opts` with defaults: depth IOE_DEFAULT_DEPTH, IOE_BACKEND_AUTO,
/// no flags, inline callbacks. Returns 0 or -EINVAL (NULL).
#[no_mangle]
pub extern "C" fn ioe_context_options_init(opts: *mut ioe_context_options) -> c_int {
    guard(|| {
        if opts.is_null() {
            return -libc::EINVAL;
        }
        let defaults = ioe_context_options {
            depth: IOE_DEFAULT_DEPTH,
            backend: IOE_BACKEND_AUTO,
            flags: 0,
            sqpoll_idle_ms: 0,
            cq_size: 0,
            max_queued: 0,
            workers: std::ptr::null_mut(),
            reserved: [0; 4],
        };
        // SAFETY: non-null; the caller promises it points to writable memory
        // for an ioe_context_options.
        unsafe { opts.write(defaults) };
        0
    })
}

fn backend_from_c(value: u32) -> Option<Backend> {
    match value {
        IOE_BACKEND_AUTO => Some(Backend::Auto),
        IOE_BACKEND_URING => Some(Backend::Uring),
        IOE_BACKEND_AIO => Some(Backend::Aio),
        _ => None,
    }
}

fn backend_to_c(backend: Backend) -> u32 {
    match backend {
        Backend::Auto => IOE_BACKEND_AUTO,
        Backend::Uring => IOE_BACKEND_URING,
        Backend::Aio => IOE_BACKEND_AIO,
    }
}

/// Converts C options to the core's, rejecting what it does not know.
fn options_from_c(opts: &ioe_context_options) -> Result<ContextOptions, c_int> {
    let backend = backend_from_c(opts.backend).ok_or(-libc::EINVAL)?;
    if opts.flags & !KNOWN_FLAGS != 0 || opts.reserved.iter().any(|&r| r != 0) {
        return Err(-libc::EINVAL);
    }
    if opts.depth == 0 || opts.depth > IOE_MAX_DEPTH {
        return Err(-libc::EINVAL);
    }
    Ok(ContextOptions {
        depth: opts.depth as usize,
        backend,
        sqpoll_idle_ms: (opts.flags & IOE_SETUP_SQPOLL != 0).then_some(opts.sqpoll_idle_ms),
        iopoll: opts.flags & IOE_SETUP_IOPOLL != 0,
        cq_size: (opts.flags & IOE_SETUP_CQSIZE != 0).then_some(opts.cq_size),
        max_queued: (opts.max_queued != 0).then_some(opts.max_queued as usize),
    })
}

/// Creates a context and stores its handle in `*out` (NULL on failure).
/// `opts` may be NULL for defaults.
///
/// IOE_BACKEND_AUTO uses AIO only when io_uring is unavailable here (see
/// ioe_context_fallback_reason); options are checked the same way whatever
/// the backend, so an option io_uring would refuse is -EINVAL on AIO too.
///
/// Returns 0; -EINVAL for NULL `out`, an unknown backend or flag, a depth
/// outside 1 to IOE_MAX_DEPTH, a cq_size below depth or above 65536,
/// non-zero reserved fields or a malformed IOENGINE_BACKEND; -ENOSYS,
/// -EPERM, -EACCES or -EOPNOTSUPP when an explicitly requested io_uring
/// cannot run; -EAGAIN when a thread cannot be created or the kernel's AIO
/// limit (fs.aio-max-nr) is exhausted; -ENOMEM.
#[no_mangle]
pub extern "C" fn ioe_context_create(opts: *const ioe_context_options, out: *mut *mut ioe_context) -> c_int {
    guard(|| {
        if out.is_null() {
            return -libc::EINVAL;
        }
        // SAFETY: non-null; the caller promises it is writable.
        unsafe { *out = std::ptr::null_mut() };
        let mut defaults = std::mem::MaybeUninit::<ioe_context_options>::uninit();
        let opts = if opts.is_null() {
            ioe_context_options_init(defaults.as_mut_ptr());
            // SAFETY: ioe_context_options_init just wrote every field.
            unsafe { defaults.assume_init_ref() }
        } else {
            // SAFETY: non-null; the caller promises it points to initialised options.
            unsafe { &*opts }
        };
        let core_opts = match options_from_c(opts) {
            Ok(o) => o,
            Err(e) => return e,
        };
        let workers = if opts.workers.is_null() {
            match IOWorkers::new(0) {
                Ok(w) => w,
                Err(e) => return neg(&e),
            }
        } else {
            // SAFETY: a non-null workers pointer is a live handle from
            // ioe_workers_create (caller's contract); we only clone its Arc.
            unsafe { &*opts.workers }.workers.clone()
        };
        match IOContext::with_options(&core_opts, &workers) {
            Ok(ctx) => {
                // SAFETY: out checked above.
                unsafe { *out = Box::into_raw(Box::new(ioe_context { ctx })) };
                0
            }
            Err(e) => neg(&e),
        }
    })
}

/// Borrows a context handle; None for NULL.
pub(crate) fn context_ref<'a>(ctx: *const ioe_context) -> Option<&'a ioe_context> {
    // SAFETY: a non-null handle is a live pointer from ioe_context_create
    // (caller's contract: not destroyed while other calls use it).
    unsafe { ctx.as_ref() }
}

/// Drains and destroys a context: submissions from other threads are
/// refused (-ESHUTDOWN) while callbacks of this context may still submit
/// follow-up requests (a read whose callback writes completes both); every
/// accepted request completes and its callback returns, the threads are
/// joined and the ring / AIO context is closed; then the handle is freed.
/// Mergers still open on the context stay valid, but their requests fail
/// with -ESHUTDOWN (see ioe_merger_add).
///
/// Returns 0; -EINVAL (NULL); -EDEADLK, with nothing done, when the drain
/// could need the calling thread: from a callback of this context, or from
/// any thread of its ioe_workers pool. Callbacks of other contexts (with
/// other pools, or inline) may destroy it.
/// No other thread may use the handle once this is called; callbacks of
/// the draining context may, until destroy returns.
#[no_mangle]
pub extern "C" fn ioe_context_destroy(ctx: *mut ioe_context) -> c_int {
    guard(|| {
        if ctx.is_null() {
            return -libc::EINVAL;
        }
        {
            let Some(handle) = context_ref(ctx) else { return -libc::EINVAL };
            if handle.ctx.drain_would_deadlock() {
                return -libc::EDEADLK;
            }
            if let Err(e) = handle.ctx.shutdown() {
                return neg(&e);
            }
        }
        // SAFETY: non-null handle from ioe_context_create; after the drain no
        // callback can reach it, and the caller gives it up with this call.
        drop(unsafe { Box::from_raw(ctx) });
        0
    })
}

/// The backend running the context: IOE_BACKEND_URING or IOE_BACKEND_AIO
/// (never AUTO); -EINVAL for NULL.
#[no_mangle]
pub extern "C" fn ioe_context_backend(ctx: *const ioe_context) -> c_int {
    guard(|| context_ref(ctx).map_or(-libc::EINVAL, |c| backend_to_c(c.ctx.backend()) as c_int))
}

/// Why an IOE_BACKEND_AUTO context runs on AIO: the negative errno
/// io_uring failed to start with. -ENOSYS: the kernel has no io_uring;
/// -EPERM or -EACCES: forbidden (sysctl kernel.io_uring_disabled, a seccomp
/// profile such as Docker's default); -EOPNOTSUPP: an opcode the engine
/// needs is missing; -ENOMEM: the kernel refused the ring's memory.
/// Returns 0 when the context runs the backend asked for (or auto found
/// io_uring), and -EINVAL for NULL (never a fallback reason).
#[no_mangle]
pub extern "C" fn ioe_context_fallback_reason(ctx: *const ioe_context) -> c_int {
    guard(|| context_ref(ctx).map_or(-libc::EINVAL, |c| c.ctx.fallback_reason().map_or(0, |e| neg(&e))))
}

/// The name of a backend constant ("auto", "io_uring", "aio"), or
/// "unknown". Static string; never NULL.
#[no_mangle]
pub extern "C" fn ioe_backend_name(backend: u32) -> *const std::ffi::c_char {
    guard_or(c"unknown".as_ptr(), || match backend_from_c(backend) {
        Some(Backend::Auto) => c"auto".as_ptr(),
        Some(Backend::Uring) => c"io_uring".as_ptr(),
        Some(Backend::Aio) => c"aio".as_ptr(),
        None => c"unknown".as_ptr(),
    })
}

/// The context's depth (most I/Os in flight); -EINVAL for NULL.
#[no_mangle]
pub extern "C" fn ioe_context_depth(ctx: *const ioe_context) -> c_int {
    guard(|| context_ref(ctx).map_or(-libc::EINVAL, |c| c.ctx.depth() as c_int))
}

/// Requests waiting in the queues now; -EINVAL for NULL.
#[no_mangle]
pub extern "C" fn ioe_context_pending(ctx: *const ioe_context) -> i64 {
    guard64(|| context_ref(ctx).map_or(-(libc::EINVAL as i64), |c| c.ctx.pending_count() as i64))
}

/// I/Os in the kernel now; -EINVAL for NULL.
#[no_mangle]
pub extern "C" fn ioe_context_running(ctx: *const ioe_context) -> i64 {
    guard64(|| context_ref(ctx).map_or(-(libc::EINVAL as i64), |c| c.ctx.running_count() as i64))
}

/// Copies the counters into `*out`. Returns 0 or -EINVAL (NULL argument).
/// Safe from any thread and from callbacks.
#[no_mangle]
pub extern "C" fn ioe_context_stats(ctx: *const ioe_context, out: *mut ioe_stats) -> c_int {
    guard(|| {
        let Some(handle) = context_ref(ctx) else { return -libc::EINVAL };
        if out.is_null() {
            return -libc::EINVAL;
        }
        let s = handle.ctx.stats();
        let stats = ioe_stats {
            submitted: s.submitted,
            completed: s.completed,
            failed: s.failed,
            merged: s.merged,
            in_flight: s.in_flight,
            pending: s.pending,
            memory_bytes: s.memory_bytes,
            memory_per_slot: s.memory_per_slot,
            cq_overflows: s.cq_overflows,
            queue_full: s.queue_full,
            reserved: [0; 6],
        };
        // SAFETY: non-null; the caller promises it is writable.
        unsafe { out.write(stats) };
        0
    })
}
