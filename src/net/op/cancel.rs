//! Cancel: closing a descriptor does not cancel what is in flight on it, so
//! a connection cancels its operations and waits for their completions
//! before it closes the descriptor (and before its buffers may go).

use io_uring::opcode;
use io_uring::squeue::Entry;
use io_uring::types::{CancelBuilder, Fd};

use super::{OpKind, OpTag};

/// Cancels every operation on `fd` (IORING_ASYNC_CANCEL_FD | ALL, 5.19).
pub(crate) fn prepare_by_fd(fd: i32, slot: u32, generation: u32) -> Entry {
    opcode::AsyncCancel2::new(CancelBuilder::fd(Fd(fd)).all())
        .build()
        .user_data(OpTag::conn_op(OpKind::Cancel, slot, generation).encode())
}

/// Cancels the operation tagged `target` (older kernels).
pub(crate) fn prepare_by_tag(target: OpTag, slot: u32, generation: u32) -> Entry {
    opcode::AsyncCancel::new(target.encode())
        .build()
        .user_data(OpTag::conn_op(OpKind::Cancel, slot, generation).encode())
}

/// Cancels a loop-level operation (the acceptor's accept or timer, the wake read).
pub(crate) fn prepare_loop_op(target: OpKind) -> Entry {
    opcode::AsyncCancel::new(OpTag::loop_op(target).encode()).build().user_data(OpTag::loop_op(OpKind::Cancel).encode())
}
