//! Send: `IORING_OP_SEND` with MSG_NOSIGNAL, never WRITE: a peer that left
//! gives -EPIPE instead of a SIGPIPE that would kill the host process.

use io_uring::opcode;
use io_uring::squeue::Entry;
use io_uring::types::Fd;

use super::{OpKind, OpTag};

/// Sends `len` bytes at `buf` (valid until the completion).
pub(crate) fn prepare(fd: i32, buf: *const u8, len: u32, slot: u32, generation: u32) -> Entry {
    opcode::Send::new(Fd(fd), buf, len)
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(OpTag::conn_op(OpKind::Send, slot, generation).encode())
}
