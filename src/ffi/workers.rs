//! Callback worker pools.

use std::ffi::c_int;

use super::{guard, neg, FfiCallback};
use crate::callback_worker::IOWorkers;

/// A pool of callback threads shared by any number of contexts (opaque).
pub struct ioe_workers {
    pub(crate) workers: IOWorkers<FfiCallback>,
}

/// Most callback threads one pool may have.
pub const IOE_MAX_WORKER_THREADS: u32 = 1024;

/// Creates a pool of `threads` callback threads (1 to IOE_MAX_WORKER_THREADS)
/// and stores its handle in `*out`. Callbacks of every context created with
/// this pool run on these threads, in no particular order.
/// Returns 0, -EINVAL (NULL `out`, 0 or too many threads) or the error of
/// thread creation (e.g. -EAGAIN). On failure `*out` is set to NULL.
#[no_mangle]
pub extern "C" fn ioe_workers_create(threads: u32, out: *mut *mut ioe_workers) -> c_int {
    guard(|| {
        if out.is_null() {
            return -libc::EINVAL;
        }
        // SAFETY: out is non-null and the caller promises it is writable.
        unsafe { *out = std::ptr::null_mut() };
        if threads == 0 || threads > IOE_MAX_WORKER_THREADS {
            return -libc::EINVAL;
        }
        match IOWorkers::new(threads as usize) {
            Ok(workers) => {
                // SAFETY: as above.
                unsafe { *out = Box::into_raw(Box::new(ioe_workers { workers })) };
                0
            }
            Err(e) => neg(&e),
        }
    })
}

/// Releases the caller's handle. Contexts created with the pool keep it
/// alive; the threads stop (after running every queued callback) once the
/// last such context is destroyed too. Returns 0 or -EINVAL (NULL).
/// The handle must not be used afterwards. May be called from a callback.
#[no_mangle]
pub extern "C" fn ioe_workers_destroy(workers: *mut ioe_workers) -> c_int {
    guard(|| {
        if workers.is_null() {
            return -libc::EINVAL;
        }
        // SAFETY: a non-null handle came from ioe_workers_create and, per the
        // contract, is destroyed once.
        drop(unsafe { Box::from_raw(workers) });
        0
    })
}
