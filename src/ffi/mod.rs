//! The C ABI: `extern "C"` functions over opaque handles. This layer only
//! checks arguments, converts handles and catches panics; the engine's
//! logic lives in the core modules so Rust users can use them directly.
//!
//! Conventions (liburing style): functions return 0 or a non-negative value
//! on success and a negative errno on failure; a failed call has no effect.

#![allow(non_camel_case_types)]
// These functions are called from C, where every call is "unsafe"; the
// pointer contracts are in the header, and each dereference says why it holds.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

pub mod buffer;
pub mod context;
pub mod library;
pub mod merge;
pub mod net;
pub mod submit;
pub mod workers;

use std::ffi::c_void;
use std::io;
use std::panic::{self, AssertUnwindSafe};

use crate::tasks::{IOCallbackCustom, IOEvent};

/// Completion callback: `result` is the number of bytes transferred (read,
/// write; 0 for fsync, fdatasync and fallocate) or a negative errno.
/// It runs exactly once per accepted request, on a callback-worker thread or,
/// without workers, on the context's poller thread. It must not throw.
pub type ioe_callback = Option<unsafe extern "C" fn(user_data: *mut c_void, result: i64)>;

/// A C callback and its argument, as the core's callback type.
pub struct FfiCallback {
    func: unsafe extern "C" fn(*mut c_void, i64),
    user_data: *mut c_void,
}

// SAFETY: the header tells users that callbacks run on engine threads, so
// `user_data` must be usable from any thread; the engine only passes it along.
unsafe impl Send for FfiCallback {}

impl FfiCallback {
    /// `None` (a NULL function pointer) is refused with EINVAL.
    pub(crate) fn new(func: ioe_callback, user_data: *mut c_void) -> Result<FfiCallback, i32> {
        func.map(|func| FfiCallback { func, user_data }).ok_or(-libc::EINVAL)
    }
}

impl IOCallbackCustom for FfiCallback {
    fn call(self, event: Box<IOEvent<Self>>) {
        let result = event.result().unwrap_or(-(libc::EIO as i64));
        // The buffer is borrowed from the caller, so dropping the event frees
        // only the engine's own memory; do it before the user may reuse it.
        drop(event);
        // SAFETY: the function pointer and user_data came from the caller
        // together, and the header documents the call contract.
        unsafe { (self.func)(self.user_data, result) }
    }
}

/// Error returned when a panic was caught at the boundary (a bug in the
/// engine): ENOTRECOVERABLE, so that callers can tell it from an I/O error.
pub(crate) const PANIC_ERRNO: i32 = libc::ENOTRECOVERABLE;

/// Runs `f`; a panic returns `fallback` instead of unwinding into C.
pub(crate) fn guard_or<T, F: FnOnce() -> T>(fallback: T, f: F) -> T {
    panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

/// Runs `f`, turning a panic into `-EIO`.
pub(crate) fn guard<F: FnOnce() -> i32>(f: F) -> i32 {
    guard_or(-PANIC_ERRNO, f)
}

/// As [`guard`] for functions returning a 64-bit value.
pub(crate) fn guard64<F: FnOnce() -> i64>(f: F) -> i64 {
    guard_or(-(PANIC_ERRNO as i64), f)
}

/// `-errno` of an I/O error.
pub(crate) fn neg(err: &io::Error) -> i32 {
    -err.raw_os_error().unwrap_or(libc::EIO)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_at_the_boundary_is_not_an_io_error() {
        let rc = super::guard(|| panic!("engine bug (expected by the test)"));
        assert_eq!(rc, -libc::ENOTRECOVERABLE);
        assert_ne!(rc, -libc::EIO);
        assert_eq!(super::guard64(|| panic!("engine bug (expected by the test)")), -(libc::ENOTRECOVERABLE as i64));
    }
}
