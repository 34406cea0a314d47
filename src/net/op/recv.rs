//! Receive: multishot from the loop's provided buffer ring (6.0), or one
//! receive at a time into a buffer of the connection's own, or into the
//! application's buffer.

use io_uring::opcode;
use io_uring::squeue::Entry;
use io_uring::types::Fd;

use super::{OpKind, OpTag};
use crate::net::buf_ring::BUFFER_GROUP;

/// `IORING_CQE_F_BUFFER`: the completion used a provided buffer.
const CQE_F_BUFFER: u32 = 1 << 0;
/// `IORING_CQE_F_MORE`: the multishot request stays armed.
pub(crate) const CQE_F_MORE: u32 = 1 << 1;

pub(crate) fn prepare_multishot(fd: i32, slot: u32, generation: u32) -> Entry {
    opcode::RecvMulti::new(Fd(fd), BUFFER_GROUP)
        .build()
        .user_data(OpTag::conn_op(OpKind::Recv, slot, generation).encode())
}

/// A single receive into `buf` (`len` bytes, which must stay valid until
/// the completion).
pub(crate) fn prepare_single(fd: i32, buf: *mut u8, len: u32, slot: u32, generation: u32) -> Entry {
    opcode::Recv::new(Fd(fd), buf, len).build().user_data(OpTag::conn_op(OpKind::Recv, slot, generation).encode())
}

/// A receive into the application's buffer (`Connection::recv_into`):
/// MSG_WAITALL, so the kernel keeps receiving until `len` bytes are in
/// (one completion) unless the stream ends or fails first.
pub(crate) fn prepare_into(fd: i32, buf: *mut u8, len: u32, slot: u32, generation: u32) -> Entry {
    opcode::Recv::new(Fd(fd), buf, len)
        .flags(libc::MSG_WAITALL)
        .build()
        .user_data(OpTag::conn_op(OpKind::RecvInto, slot, generation).encode())
}

/// The provided buffer a completion carries, if any.
pub(crate) fn buffer_id(flags: u32) -> Option<u16> {
    (flags & CQE_F_BUFFER != 0).then_some((flags >> 16) as u16)
}
