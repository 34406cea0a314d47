//! Library-level calls: version and error text.

use std::cell::RefCell;
use std::ffi::{c_char, c_int};

use super::guard_or;

/// Major version; changes break the ABI (it is the soname's number; while
/// it is 0, the minor version is part of the soname too, since any 0.x
/// release may change the ABI).
pub const IOE_VERSION_MAJOR: u32 = 0;
/// Minor version: additions.
pub const IOE_VERSION_MINOR: u32 = 2;
/// Patch version: fixes.
pub const IOE_VERSION_PATCH: u32 = 1;

/// The library's version as `(major << 16) | (minor << 8) | patch`. Compare
/// with the `IOE_VERSION_*` macros to detect a header/library mismatch.
#[no_mangle]
pub extern "C" fn ioe_version() -> u32 {
    guard_or(0, || (IOE_VERSION_MAJOR << 16) | (IOE_VERSION_MINOR << 8) | IOE_VERSION_PATCH)
}

/// The library's version as a static NUL-terminated string ("0.2.1").
/// Never NULL; the caller must not free it.
#[no_mangle]
pub extern "C" fn ioe_version_string() -> *const c_char {
    const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    guard_or(c"".as_ptr(), || VERSION.as_ptr() as *const c_char)
}

thread_local! {
    static ERROR_TEXT: RefCell<[u8; 128]> = const { RefCell::new([0; 128]) };
}

/// A description of an error code: `err` may be negative (as returned by
/// this library) or positive. Returns a NUL-terminated string in a buffer
/// owned by the calling thread, valid until that thread's next
/// `ioe_strerror` call; never NULL. Safe to call from callbacks.
#[no_mangle]
pub extern "C" fn ioe_strerror(err: c_int) -> *const c_char {
    guard_or(c"unknown error".as_ptr(), || {
        let code = err.checked_abs().unwrap_or(0);
        ERROR_TEXT.with(|buf| {
            let mut buf = buf.borrow_mut();
            let text =
                if code == 0 { "success".to_string() } else { std::io::Error::from_raw_os_error(code).to_string() };
            // Strip std's " (os error N)" suffix: C users expect strerror-like text.
            let text = text.split(" (os error").next().unwrap_or("");
            let n = text.len().min(buf.len() - 1);
            buf[..n].copy_from_slice(&text.as_bytes()[..n]);
            buf[n] = 0;
            buf.as_ptr() as *const c_char
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn version_constants_match_the_crate_version() {
        let parse = |s: &str| s.parse::<u32>().unwrap();
        assert_eq!(IOE_VERSION_MAJOR, parse(env!("CARGO_PKG_VERSION_MAJOR")));
        assert_eq!(IOE_VERSION_MINOR, parse(env!("CARGO_PKG_VERSION_MINOR")));
        assert_eq!(IOE_VERSION_PATCH, parse(env!("CARGO_PKG_VERSION_PATCH")));
        // SAFETY: ioe_version_string returns a static NUL-terminated string.
        let text = unsafe { CStr::from_ptr(ioe_version_string()) }.to_str().unwrap();
        assert_eq!(text, env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn strerror_accepts_negative_and_positive_codes() {
        // SAFETY: ioe_strerror returns a NUL-terminated thread-local string.
        let text = |e| unsafe { CStr::from_ptr(ioe_strerror(e)) }.to_str().unwrap().to_string();
        assert_eq!(text(-libc::EINVAL), text(libc::EINVAL));
        assert!(text(-libc::EBADF).to_lowercase().contains("bad file"));
        assert_eq!(text(0), "success");
        assert!(!text(i32::MIN).is_empty());
    }
}
