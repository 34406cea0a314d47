//! Submission: single requests, batches and the per-operation shorthands.

// The shorthands mirror the request fields one by one, as C APIs do.
#![allow(clippy::too_many_arguments)]

use std::ffi::{c_int, c_void};

use super::context::{context_ref, ioe_context};
use super::{guard, ioe_callback, FfiCallback};
use crate::tasks::{Buffer, IOAction, IOChannel, IOEvent};

/// Read `len` bytes at `offset` into `buf`.
pub const IOE_OP_READ: u32 = 0;
/// Write `len` bytes from `buf` at `offset`.
pub const IOE_OP_WRITE: u32 = 1;
/// fsync(2) the file (`buf`, `len`, `offset` ignored).
pub const IOE_OP_FSYNC: u32 = 2;
/// fdatasync(2) the file (`buf`, `len`, `offset` ignored).
pub const IOE_OP_FDATASYNC: u32 = 3;
/// fallocate(2) over `[offset, offset + len)` with `fallocate_mode`;
/// `buf` must be NULL.
pub const IOE_OP_FALLOCATE: u32 = 4;
/// preadv(2): read at `offset` into several buffers in turn. `buf` points
/// to an array of `len` struct iovec (1 to IOE_MAX_IOVECS; they must hold
/// at least one byte together). The array is copied at submission; the
/// memory it points to is borrowed until the callback runs. The result
/// counts bytes over all buffers.
pub const IOE_OP_READV: u32 = 5;
/// pwritev(2): write several buffers in turn at `offset`; as IOE_OP_READV.
pub const IOE_OP_WRITEV: u32 = 6;

/// Most iovecs one IOE_OP_READV / IOE_OP_WRITEV request may carry (IOV_MAX).
pub const IOE_MAX_IOVECS: u32 = 1024;

/// `rw_flags`: the data (and the metadata needed to read it back) is
/// durable before the callback runs, as if written with O_DSYNC
/// (RWF_DSYNC): a FUA write. Writes only mean something with it; on reads
/// it is accepted and has no effect.
pub const IOE_RWF_DSYNC: u32 = 0x2;
/// `rw_flags`: as IOE_RWF_DSYNC, with all metadata too (RWF_SYNC, O_SYNC).
pub const IOE_RWF_SYNC: u32 = 0x4;
/// `rw_flags`: complete with -EAGAIN instead of waiting for the page cache,
/// a lock or the device (RWF_NOWAIT); -EAGAIN is then the result, never
/// retried by the engine. Some files answer -EOPNOTSUPP instead.
pub const IOE_RWF_NOWAIT: u32 = 0x8;
/// `rw_flags`: polled completion (RWF_HIPRI). Contexts created with
/// IOE_SETUP_IOPOLL poll every read and write already; elsewhere neither
/// backend polls, and the flag is accepted and ignored.
pub const IOE_RWF_HIPRI: u32 = 0x1;

const KNOWN_RW_FLAGS: u32 = IOE_RWF_DSYNC | IOE_RWF_SYNC | IOE_RWF_NOWAIT | IOE_RWF_HIPRI;

// The IOE_RWF_* values are the kernel's RWF_* ones, passed through as they are.
const _: () = assert!(
    IOE_RWF_DSYNC == libc::RWF_DSYNC as u32
        && IOE_RWF_SYNC == libc::RWF_SYNC as u32
        && IOE_RWF_NOWAIT == libc::RWF_NOWAIT as u32
        && IOE_RWF_HIPRI == libc::RWF_HIPRI as u32
        && KNOWN_RW_FLAGS == crate::tasks::RW_FLAGS_ALLOWED as u32
);

/// Request flag: start this request only once every request accepted
/// before it by the context has completed, and start requests accepted
/// after it only once it has completed (io_uring's IOSQE_IO_DRAIN, on both
/// backends). Accepted requests otherwise run in no particular order: a
/// write followed by an fdatasync without this flag may be synced first.
pub const IOE_REQ_DRAIN: u32 = 1 << 0;

const KNOWN_REQUEST_FLAGS: u32 = IOE_REQ_DRAIN;

/// Served first, without a budget (strict priority).
pub const IOE_CHANNEL_PRIO: u32 = 0;
/// Reads: share each scheduling round fairly with writes.
pub const IOE_CHANNEL_READ: u32 = 1;
/// Writes: share each scheduling round fairly with reads.
pub const IOE_CHANNEL_WRITE: u32 = 2;

/// One request. `buf` (and for vectored requests the memory its iovecs
/// point to) is borrowed: it must stay valid, and untouched by the caller,
/// until the request's callback runs.
#[repr(C)]
pub struct ioe_request {
    /// IOE_OP_*.
    pub op: u32,
    /// IOE_CHANNEL_*.
    pub channel: u32,
    /// File descriptor. An invalid one completes with -EBADF.
    pub fd: c_int,
    /// fallocate(2) mode bits, for IOE_OP_FALLOCATE.
    pub fallocate_mode: c_int,
    /// Data buffer (read/write), or the struct iovec array (readv/writev).
    /// O_DIRECT needs the device's alignment.
    pub buf: *mut c_void,
    /// Bytes to read/write (> 0), the number of iovecs (readv/writev), or
    /// the fallocate length (> 0).
    pub len: u64,
    /// File offset, at most INT64_MAX together with len. Ignored on streams
    /// (pipes, sockets, terminals), which are read and written in order, as
    /// by read(2) and write(2), on both backends.
    pub offset: u64,
    /// Called exactly once with the result; must not be NULL.
    pub callback: ioe_callback,
    /// Passed to the callback unchanged.
    pub user_data: *mut c_void,
    /// IOE_REQ_* bits (0 for none).
    pub flags: u32,
    /// IOE_RWF_* bits for reads and writes (plain or vectored); must be 0
    /// for other operations.
    pub rw_flags: u32,
}

pub(crate) fn channel_from_c(channel: u32) -> Result<IOChannel, c_int> {
    match channel {
        IOE_CHANNEL_PRIO => Ok(IOChannel::Prio),
        IOE_CHANNEL_READ => Ok(IOChannel::Read),
        IOE_CHANNEL_WRITE => Ok(IOChannel::Write),
        _ => Err(-libc::EINVAL),
    }
}

/// Builds the event for a read or write of caller memory.
pub(crate) fn rw_event(
    fd: c_int,
    action: IOAction,
    buf: *mut c_void,
    len: u64,
    offset: u64,
    cb: FfiCallback,
) -> Result<Box<IOEvent<FfiCallback>>, c_int> {
    if buf.is_null() || len == 0 || len > isize::MAX as u64 {
        return Err(-libc::EINVAL);
    }
    // SAFETY: non-null; the header makes the caller keep `len` bytes at `buf`
    // valid and untouched until the callback runs.
    let buffer = unsafe { Buffer::from_raw_parts(buf as *mut u8, len as usize) }.map_err(|_| -libc::EINVAL)?;
    let mut event = IOEvent::new(fd, buffer, action, offset);
    event.set_callback(cb);
    Ok(event)
}

/// Builds a vectored read or write over the caller's iovec array (copied
/// here; the memory it points to stays the caller's).
fn vectored_event(
    fd: c_int,
    action: IOAction,
    iov: *const libc::iovec,
    count: u64,
    offset: u64,
    cb: FfiCallback,
) -> Result<Box<IOEvent<FfiCallback>>, c_int> {
    if iov.is_null() || count == 0 || count > IOE_MAX_IOVECS as u64 {
        return Err(-libc::EINVAL);
    }
    // SAFETY: non-null; the caller promises `count` initialised iovecs,
    // read only here.
    let iovs = unsafe { std::slice::from_raw_parts(iov, count as usize) };
    let mut bufs = Vec::with_capacity(iovs.len());
    let mut total: u64 = 0;
    for v in iovs {
        total = total.checked_add(v.iov_len as u64).ok_or(-libc::EINVAL)?;
        if v.iov_len == 0 {
            bufs.push(Buffer::empty());
            continue;
        }
        if v.iov_len > isize::MAX as usize {
            return Err(-libc::EINVAL);
        }
        // SAFETY: the header makes the caller keep each iovec's memory valid
        // and untouched until the callback runs; a NULL base is refused.
        let buf = unsafe { Buffer::from_raw_parts(v.iov_base as *mut u8, v.iov_len) }.map_err(|_| -libc::EINVAL)?;
        bufs.push(buf);
    }
    if total == 0 || total > isize::MAX as u64 {
        return Err(-libc::EINVAL);
    }
    let mut event = IOEvent::vectored(fd, bufs, action, offset);
    event.set_callback(cb);
    Ok(event)
}

pub(crate) fn event_from_request(req: &ioe_request) -> Result<(Box<IOEvent<FfiCallback>>, IOChannel), c_int> {
    if req.flags & !KNOWN_REQUEST_FLAGS != 0 || req.rw_flags & !KNOWN_RW_FLAGS != 0 {
        return Err(-libc::EINVAL);
    }
    let is_rw = matches!(req.op, IOE_OP_READ | IOE_OP_WRITE | IOE_OP_READV | IOE_OP_WRITEV);
    if req.rw_flags != 0 && !is_rw {
        return Err(-libc::EINVAL);
    }
    let channel = channel_from_c(req.channel)?;
    let cb = FfiCallback::new(req.callback, req.user_data)?;
    let event = match req.op {
        IOE_OP_READ => rw_event(req.fd, IOAction::Read, req.buf, req.len, req.offset, cb)?,
        IOE_OP_WRITE => rw_event(req.fd, IOAction::Write, req.buf, req.len, req.offset, cb)?,
        IOE_OP_READV => vectored_event(req.fd, IOAction::Read, req.buf as *const _, req.len, req.offset, cb)?,
        IOE_OP_WRITEV => vectored_event(req.fd, IOAction::Write, req.buf as *const _, req.len, req.offset, cb)?,
        IOE_OP_FSYNC | IOE_OP_FDATASYNC => {
            let mut event = if req.op == IOE_OP_FSYNC { IOEvent::fsync(req.fd) } else { IOEvent::fdatasync(req.fd) };
            event.set_callback(cb);
            event
        }
        IOE_OP_FALLOCATE => {
            if !req.buf.is_null() {
                return Err(-libc::EINVAL);
            }
            let mut event = IOEvent::fallocate(req.fd, req.fallocate_mode, req.offset, req.len);
            event.set_callback(cb);
            event
        }
        _ => return Err(-libc::EINVAL),
    };
    let mut event = event;
    event.set_drain(req.flags & IOE_REQ_DRAIN != 0);
    event.set_rw_flags(req.rw_flags as i32);
    Ok((event, channel))
}

/// A request with every field zero (NULL pointers, no flags).
fn request_defaults() -> ioe_request {
    ioe_request {
        op: 0,
        channel: 0,
        fd: -1,
        fallocate_mode: 0,
        buf: std::ptr::null_mut(),
        len: 0,
        offset: 0,
        callback: None,
        user_data: std::ptr::null_mut(),
        flags: 0,
        rw_flags: 0,
    }
}

/// Validates and queues one request on a live context.
fn submit_one(ctx: &ioe_context, req: &ioe_request) -> c_int {
    match event_from_request(req) {
        Ok((event, channel)) => match ctx.ctx.submit(event, channel) {
            Ok(()) => 0,
            // The refused event is dropped without calling back.
            Err(refused) => super::neg(&refused.error),
        },
        Err(e) => e,
    }
}

/// Queues one request; never waits (see Conventions). Accepted requests
/// run in no particular order unless IOE_REQ_DRAIN orders them. Returns 0
/// (the callback will run exactly once) or, with no callback ever, -EINVAL
/// (NULL `ctx`/`req`, unknown op, channel, flag or rw_flag, rw_flags on
/// an operation other than a read or write, NULL callback, NULL or
/// zero-length buffer for a read/write, a NULL iovec array, no iovecs or
/// more than IOE_MAX_IOVECS, an iovec with a NULL base and a length, or
/// iovecs holding no byte for a readv/writev, non-NULL buffer or zero
/// length for fallocate, range beyond INT64_MAX, fsync,
/// fdatasync or fallocate on an IOE_SETUP_IOPOLL context), -EAGAIN (the
/// context holds `max_queued` requests) or -ESHUTDOWN (the context is being
/// destroyed). Any thread may call it at any time, also from callbacks.
#[no_mangle]
pub extern "C" fn ioe_submit(ctx: *mut ioe_context, req: *const ioe_request) -> c_int {
    guard(|| {
        let Some(ctx) = context_ref(ctx) else { return -libc::EINVAL };
        // SAFETY: a non-null request points to an initialised ioe_request
        // (caller's contract); it is only read.
        let Some(req) = (unsafe { req.as_ref() }) else { return -libc::EINVAL };
        submit_one(ctx, req)
    })
}

/// Queues `count` requests in order, stopping at the first one refused,
/// and hands the queued ones to the kernel together: on the calling thread
/// when no other thread is submitting for the context at that moment (one
/// system call for the batch and no wake-up of the submitter thread, as
/// liburing's io_uring_submit; it never waits for the I/O, though for data
/// in the page cache the kernel copies it within the call), else on the
/// submitter thread. Prefer it to a loop of ioe_submit when a thread issues
/// several requests at once. Returns how many were queued (their callbacks
/// will run); if the first is refused, its negative errno instead (as
/// ioe_submit). 0 for count 0. -EINVAL for NULL `ctx`, or NULL `reqs` with
/// count > 0. Any thread may call it, also from callbacks.
#[no_mangle]
pub extern "C" fn ioe_submit_batch(ctx: *mut ioe_context, reqs: *const ioe_request, count: usize) -> i64 {
    super::guard64(|| {
        let Some(ctx) = context_ref(ctx) else { return -(libc::EINVAL as i64) };
        if count == 0 {
            return 0;
        }
        if reqs.is_null() || count > isize::MAX as usize / std::mem::size_of::<ioe_request>() {
            return -(libc::EINVAL as i64);
        }
        // SAFETY: non-null; the caller promises `count` initialised requests.
        let reqs = unsafe { std::slice::from_raw_parts(reqs, count) };
        // Handed to the kernel together when the batch ends.
        let _batch = ctx.ctx.batch();
        for (i, req) in reqs.iter().enumerate() {
            let rc = submit_one(ctx, req);
            if rc < 0 {
                return if i == 0 { rc as i64 } else { i as i64 };
            }
        }
        count as i64
    })
}

fn sync_request(ctx: *mut ioe_context, op: u32, fd: c_int, channel: u32, cb: ioe_callback, ud: *mut c_void) -> c_int {
    let req = ioe_request { op, channel, fd, callback: cb, user_data: ud, ..request_defaults() };
    ioe_submit(ctx, &req)
}

/// Shorthand for ioe_submit with IOE_OP_READ; same returns.
#[no_mangle]
pub extern "C" fn ioe_read(
    ctx: *mut ioe_context,
    fd: c_int,
    buf: *mut c_void,
    len: u64,
    offset: u64,
    channel: u32,
    callback: ioe_callback,
    user_data: *mut c_void,
) -> c_int {
    let req = ioe_request { op: IOE_OP_READ, channel, fd, buf, len, offset, callback, user_data, ..request_defaults() };
    ioe_submit(ctx, &req)
}

/// Shorthand for ioe_submit with IOE_OP_WRITE; same returns. `buf` is only
/// read, but must stay valid until the callback runs.
#[no_mangle]
pub extern "C" fn ioe_write(
    ctx: *mut ioe_context,
    fd: c_int,
    buf: *const c_void,
    len: u64,
    offset: u64,
    channel: u32,
    callback: ioe_callback,
    user_data: *mut c_void,
) -> c_int {
    let buf = buf as *mut c_void;
    let req =
        ioe_request { op: IOE_OP_WRITE, channel, fd, buf, len, offset, callback, user_data, ..request_defaults() };
    ioe_submit(ctx, &req)
}

/// Shorthand for ioe_submit with IOE_OP_FSYNC; same returns.
#[no_mangle]
pub extern "C" fn ioe_fsync(
    ctx: *mut ioe_context,
    fd: c_int,
    channel: u32,
    callback: ioe_callback,
    user_data: *mut c_void,
) -> c_int {
    sync_request(ctx, IOE_OP_FSYNC, fd, channel, callback, user_data)
}

/// Shorthand for ioe_submit with IOE_OP_FDATASYNC; same returns.
#[no_mangle]
pub extern "C" fn ioe_fdatasync(
    ctx: *mut ioe_context,
    fd: c_int,
    channel: u32,
    callback: ioe_callback,
    user_data: *mut c_void,
) -> c_int {
    sync_request(ctx, IOE_OP_FDATASYNC, fd, channel, callback, user_data)
}

/// Shorthand for ioe_submit with IOE_OP_FALLOCATE; same returns.
#[no_mangle]
pub extern "C" fn ioe_fallocate(
    ctx: *mut ioe_context,
    fd: c_int,
    mode: c_int,
    offset: u64,
    len: u64,
    channel: u32,
    callback: ioe_callback,
    user_data: *mut c_void,
) -> c_int {
    let req = ioe_request {
        op: IOE_OP_FALLOCATE,
        channel,
        fd,
        fallocate_mode: mode,
        len,
        offset,
        callback,
        user_data,
        ..request_defaults()
    };
    ioe_submit(ctx, &req)
}
