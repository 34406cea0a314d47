//! Accept: multishot where the kernel has it (5.19), single-shot otherwise.

use io_uring::opcode;
use io_uring::squeue::Entry;
use io_uring::types::Fd;

use super::{OpKind, OpTag};

/// Flags every accepted socket gets.
const ACCEPT_FLAGS: i32 = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;

/// An accept on `listener`: multishot, or one connection at a time.
pub(crate) fn prepare(listener: i32, multishot: bool) -> Entry {
    let tag = OpTag::loop_op(OpKind::Accept).encode();
    if multishot {
        opcode::AcceptMulti::new(Fd(listener)).flags(ACCEPT_FLAGS).build().user_data(tag)
    } else {
        opcode::Accept::new(Fd(listener), std::ptr::null_mut(), std::ptr::null_mut())
            .flags(ACCEPT_FLAGS)
            .build()
            .user_data(tag)
    }
}

/// Errors after which accepting pauses and retries later (out of
/// descriptors or memory) instead of stopping or spinning.
pub(crate) fn is_resource_error(errno: i32) -> bool {
    matches!(errno, libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
}

/// Errors that concern one connection only (it went away in the queue).
pub(crate) fn is_connection_error(errno: i32) -> bool {
    matches!(errno, libc::ECONNABORTED | libc::EPROTO | libc::EPERM | libc::EINTR | libc::EAGAIN)
}

/// The retry timer after a resource error.
pub(crate) fn prepare_retry(timespec: *const io_uring::types::Timespec) -> Entry {
    super::timer::prepare(timespec, OpKind::AcceptRetry)
}
