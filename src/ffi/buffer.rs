//! Aligned buffers for O_DIRECT.

use std::ffi::{c_int, c_void};

use super::{guard, guard_or};

/// Alignment `ioe_buffer_alloc` uses when asked for 0: enough for O_DIRECT
/// on devices with 512-byte or 4 KiB blocks.
pub const IOE_DEFAULT_ALIGN: u32 = 4096;

/// Allocates `len` zeroed bytes aligned to `align` (a power of two, at least
/// sizeof(void *); 0 means IOE_DEFAULT_ALIGN) and stores the pointer in
/// `*out`. Free it with ioe_buffer_free (or free(3)). Returns 0, -EINVAL
/// (NULL out, len 0, bad alignment) or -ENOMEM; `*out` is NULL on failure.
#[no_mangle]
pub extern "C" fn ioe_buffer_alloc(len: usize, align: usize, out: *mut *mut c_void) -> c_int {
    guard(|| {
        if out.is_null() {
            return -libc::EINVAL;
        }
        // SAFETY: non-null; the caller promises it is writable.
        unsafe { *out = std::ptr::null_mut() };
        let align = if align == 0 { IOE_DEFAULT_ALIGN as usize } else { align };
        if len == 0 || !align.is_power_of_two() || align < std::mem::size_of::<*mut c_void>() {
            return -libc::EINVAL;
        }
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: posix_memalign writes ptr only on success; align was checked.
        let rc = unsafe { libc::posix_memalign(&mut ptr, align, len) };
        if rc != 0 {
            return -rc;
        }
        // SAFETY: ptr is a fresh allocation of len bytes.
        unsafe {
            std::ptr::write_bytes(ptr as *mut u8, 0, len);
            *out = ptr;
        }
        0
    })
}

/// Frees a buffer from ioe_buffer_alloc. NULL is ignored.
#[no_mangle]
pub extern "C" fn ioe_buffer_free(buf: *mut c_void) {
    guard_or((), || {
        // SAFETY: buf is NULL or came from posix_memalign in ioe_buffer_alloc.
        unsafe { libc::free(buf) }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_alignment_is_the_core_one() {
        assert_eq!(super::IOE_DEFAULT_ALIGN as usize, crate::tasks::DIRECT_IO_ALIGN);
    }
}
