//! Mergers: coalescing contiguous requests on one file into one I/O.

use std::ffi::{c_int, c_void};

use parking_lot::Mutex;

use super::context::{context_ref, ioe_context};
use super::submit::{channel_from_c, rw_event, IOE_OP_READ, IOE_OP_WRITE};
use super::{guard, ioe_callback, neg, FfiCallback};
use crate::merge::MergeSubmitter;
use crate::tasks::IOAction;

/// A merger for one file and direction (opaque). Its calls are serialised
/// internally, but it is meant for one submitting thread.
pub struct ioe_merger {
    merger: Mutex<MergeSubmitter<FfiCallback>>,
}

fn merger_ref<'a>(merger: *mut ioe_merger) -> Option<&'a ioe_merger> {
    // SAFETY: a non-null handle is a live pointer from ioe_merger_create
    // (caller's contract: not destroyed while other calls use it).
    unsafe { merger.as_ref() }
}

impl ioe_merger {
    /// Runs `f` on the merger under its lock, then delivers the callbacks of
    /// runs the context refused, after unlocking: such a callback may call
    /// this merger again.
    fn with<R>(&self, f: impl FnOnce(&mut MergeSubmitter<FfiCallback>) -> R) -> R {
        let (result, refused) = {
            let mut merger = self.merger.lock();
            let result = f(&mut merger);
            (result, merger.take_refused())
        };
        refused.deliver();
        result
    }
}

/// Creates a merger that joins contiguous IOE_OP_READ (or IOE_OP_WRITE)
/// requests on `fd` into one vectored I/O of at most `max_bytes` bytes
/// (and at most 1024 requests), submitted on `channel`. Each request still
/// gets its own callback and result. The merger keeps the context's engine
/// alive until it is destroyed. Returns 0 or -EINVAL (NULL argument, other
/// op, unknown channel, max_bytes 0); `*out` is NULL on failure.
#[no_mangle]
pub extern "C" fn ioe_merger_create(
    ctx: *mut ioe_context,
    fd: c_int,
    op: u32,
    channel: u32,
    max_bytes: u64,
    out: *mut *mut ioe_merger,
) -> c_int {
    guard(|| {
        if out.is_null() {
            return -libc::EINVAL;
        }
        // SAFETY: non-null; the caller promises it is writable.
        unsafe { *out = std::ptr::null_mut() };
        let Some(ctx) = context_ref(ctx) else { return -libc::EINVAL };
        let action = match op {
            IOE_OP_READ => IOAction::Read,
            IOE_OP_WRITE => IOAction::Write,
            _ => return -libc::EINVAL,
        };
        let channel = match channel_from_c(channel) {
            Ok(c) => c,
            Err(e) => return e,
        };
        if max_bytes == 0 || max_bytes > isize::MAX as u64 {
            return -libc::EINVAL;
        }
        match MergeSubmitter::new(ctx.ctx.clone(), fd, action, channel, max_bytes as usize) {
            Ok(merger) => {
                // SAFETY: out checked above.
                unsafe { *out = Box::into_raw(Box::new(ioe_merger { merger: Mutex::new(merger) })) };
                0
            }
            Err(e) => neg(&e),
        }
    })
}

/// Adds a request for `len` bytes at `offset` (same rules as ioe_request).
/// It is held while it extends the current run; a request that does not
/// continue the run submits the run first, and a run that reaches
/// `max_bytes` is submitted at once. Returns 0 (the callback will run
/// exactly once, with -ESHUTDOWN if the context is destroyed before the run
/// is submitted) or, with no callback, -EINVAL, -ESHUTDOWN, or -EAGAIN
/// while the context holds its `max_queued` requests.
///
/// Requests of a run refused that way are counted by the context
/// (submitted, completed, failed) and called back after the merger is
/// unlocked, so such a callback may call ioe_merger_add on it again
/// (getting -ESHUTDOWN). While the context still drains they are called
/// back like any request (on its pool, or without a pool on the thread that
/// flushed the run: this call, ioe_merger_flush or ioe_merger_destroy); once
/// ioe_context_destroy has returned, always on the thread that flushed, so
/// that thread must not hold a lock those callbacks take.
#[no_mangle]
pub extern "C" fn ioe_merger_add(
    merger: *mut ioe_merger,
    buf: *mut c_void,
    len: u64,
    offset: u64,
    callback: ioe_callback,
    user_data: *mut c_void,
) -> c_int {
    guard(|| {
        let Some(merger) = merger_ref(merger) else { return -libc::EINVAL };
        let cb = match FfiCallback::new(callback, user_data) {
            Ok(cb) => cb,
            Err(e) => return e,
        };
        merger.with(|merger| match rw_event(merger.fd(), merger.action(), buf, len, offset, cb) {
            Ok(event) => match merger.add_event_deferred(event) {
                Ok(()) => 0,
                Err(refused) => neg(&refused.error),
            },
            Err(e) => e,
        })
    })
}

/// Submits the requests held. Returns 0 or -EINVAL (NULL).
#[no_mangle]
pub extern "C" fn ioe_merger_flush(merger: *mut ioe_merger) -> c_int {
    guard(|| {
        let Some(merger) = merger_ref(merger) else { return -libc::EINVAL };
        merger.with(|merger| merger.flush_deferred());
        0
    })
}

/// Number of requests held, not yet submitted; -EINVAL for NULL.
#[no_mangle]
pub extern "C" fn ioe_merger_held(merger: *mut ioe_merger) -> c_int {
    guard(|| merger_ref(merger).map_or(-libc::EINVAL, |m| m.merger.lock().held_count() as c_int))
}

/// Flushes and frees the merger. Returns 0 or -EINVAL (NULL). The handle
/// must not be used afterwards, also not by callbacks of its requests
/// (they may run after this returns).
#[no_mangle]
pub extern "C" fn ioe_merger_destroy(merger: *mut ioe_merger) -> c_int {
    guard(|| {
        if merger.is_null() {
            return -libc::EINVAL;
        }
        // SAFETY: non-null handle from ioe_merger_create, given up by the
        // caller. Dropping it flushes; no lock is held while refused
        // requests are called back.
        drop(unsafe { Box::from_raw(merger) });
        0
    })
}
