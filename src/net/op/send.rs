//! Send: `IORING_OP_SEND` with MSG_NOSIGNAL, never WRITE: a peer that left
//! gives -EPIPE instead of a SIGPIPE that would kill the host process.

use io_uring::opcode;
use io_uring::squeue::Entry;
use io_uring::types::Fd;

use super::{OpKind, OpTag};

/// Most pieces of queued output one send gathers.
pub(crate) const MAX_SEGMENTS: usize = 16;

/// Where a gathered send's iovecs and message header live while it is in
/// flight: boxed with the connection, whose segments they point into.
pub(crate) struct Gather {
    pub(crate) iov: [libc::iovec; MAX_SEGMENTS],
    pub(crate) msg: libc::msghdr,
}

impl Gather {
    pub(crate) fn new() -> Box<Gather> {
        // SAFETY: iovec and msghdr are plain C structs; all-zero is valid.
        Box::new(unsafe { std::mem::zeroed() })
    }
}

/// Sends the `count` pieces of `gather.iov` in one go (IORING_OP_SENDMSG).
/// The box must stay put until the completion.
pub(crate) fn prepare_gathered(fd: i32, gather: &mut Gather, count: usize, slot: u32, generation: u32) -> Entry {
    gather.msg = libc::msghdr {
        msg_name: std::ptr::null_mut(),
        msg_namelen: 0,
        msg_iov: gather.iov.as_mut_ptr(),
        msg_iovlen: count,
        msg_control: std::ptr::null_mut(),
        msg_controllen: 0,
        msg_flags: 0,
    };
    opcode::SendMsg::new(Fd(fd), &gather.msg)
        .flags(libc::MSG_NOSIGNAL as u32)
        .build()
        .user_data(OpTag::conn_op(OpKind::Send, slot, generation).encode())
}

/// Sends `len` bytes at `buf` (valid until the completion).
pub(crate) fn prepare(fd: i32, buf: *const u8, len: u32, slot: u32, generation: u32) -> Entry {
    opcode::Send::new(Fd(fd), buf, len)
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(OpTag::conn_op(OpKind::Send, slot, generation).encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every send the loop can issue carries MSG_NOSIGNAL: a peer that left
    /// must not raise SIGPIPE in the host process (the end-to-end test
    /// cannot force the one race where a send follows a consumed reset).
    #[test]
    fn sends_never_raise_sigpipe() {
        let byte = 0u8;
        let mut gather = Gather::new();
        for entry in [prepare(3, &byte, 1, 1, 1), prepare_gathered(3, &mut gather, 1, 1, 1)] {
            // SAFETY: an SQE is 64 bytes of plain data (io_uring_sqe).
            let raw: [u8; 64] = unsafe { std::mem::transmute(entry) };
            // The operation flags (msg_flags for sends) sit at offset 28.
            let msg_flags = u32::from_ne_bytes([raw[28], raw[29], raw[30], raw[31]]);
            assert_ne!(msg_flags & libc::MSG_NOSIGNAL as u32, 0, "a send without MSG_NOSIGNAL");
        }
    }
}
