//! Block requests run with blocking system calls, on threads that may
//! wait: AIO's helper threads (what native AIO cannot run without
//! blocking) and an epoll loop's file helpers (`Connection::submit_file`
//! where there is no ring).

use std::io;

use crate::tasks::{IOCallbackCustom, IOEvent, IoRequest, Progress};

/// Whether a pool of helper threads that run blocking calls should start
/// one more: work is waiting that no free helper will take, fewer than
/// `bounded` helpers are free of streams (work on files and block devices
/// ends, and more threads would only contend for the same inode locks;
/// a read or write of a pipe, socket or character device may wait for
/// ever, so each helper it holds is replaced), and the pool is below `cap`.
/// One policy for AIO's helpers and an epoll loop's file helpers.
pub(crate) fn helper_wanted(started: usize, work_waits: bool, on_streams: usize, bounded: usize, cap: usize) -> bool {
    work_waits && started - on_streams.min(started) < bounded && started < cap
}

/// Runs an event to completion with blocking calls: the rest after a short
/// transfer too, as a driver resubmits it. The result is in the event.
pub(crate) fn run_to_completion<C: IOCallbackCustom>(event: &mut IOEvent<C>) {
    loop {
        let result = run_blocking(event);
        if event.apply_final_result(result) == Progress::Complete {
            return;
        }
    }
}

/// Runs an event's next request synchronously, on a thread that may block
/// (AIO's helpers, an epoll loop's file helpers): bytes, 0 or -errno. A
/// call a signal interrupts is made again here (a bounded number of
/// times), so the result is final (`apply_final_result`).
pub(crate) fn run_blocking<C: IOCallbackCustom>(event: &mut IOEvent<C>) -> i64 {
    const MAX_EINTR: usize = 16;
    let fd = event.fd();
    let seekable = event.is_seekable();
    let request = event.next_request();
    // Nothing polls on this path: RWF_HIPRI means nothing here.
    let flags = event.rw_flags() & !libc::RWF_HIPRI;
    let mut result = 0;
    for _ in 0..MAX_EINTR {
        let ret = run_once(fd, request, seekable, flags);
        if ret >= 0 {
            return ret;
        }
        result = crate::driver::neg_errno(&io::Error::last_os_error());
        if result != -(libc::EINTR as i64) {
            break;
        }
    }
    result
}

/// One system call for a request; -1 with errno on failure. Reads and
/// writes go through `preadv2(2)` / `pwritev2(2)` with the caller's RWF_*
/// flags (offset -1 on streams, pipes and sockets: no offset, as read(2)).
fn run_once(fd: i32, request: IoRequest, seekable: bool, flags: i32) -> i64 {
    let one = |buf: *const u8, len: u32| libc::iovec { iov_base: buf as *mut libc::c_void, iov_len: len as usize };
    let at = |offset: u64| if seekable { offset as libc::off_t } else { -1 };
    let single;
    let (iov, count, offset, write) = match request {
        IoRequest::Read { buf, len, offset } => {
            single = one(buf, len);
            (&single as *const libc::iovec, 1, offset, false)
        }
        IoRequest::Write { buf, len, offset } => {
            single = one(buf, len);
            (&single as *const libc::iovec, 1, offset, true)
        }
        IoRequest::Readv { iov, count, offset } => (iov, count, offset, false),
        IoRequest::Writev { iov, count, offset } => (iov, count, offset, true),
        // SAFETY: plain syscalls on a descriptor number (a bad one yields EBADF).
        IoRequest::Fallocate { mode, offset, len } => unsafe {
            return libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) as i64;
        },
        // SAFETY: as above.
        IoRequest::Fsync => return unsafe { libc::fsync(fd) } as i64,
        // SAFETY: as above.
        IoRequest::Fdatasync => return unsafe { libc::fdatasync(fd) } as i64,
    };
    // SAFETY: the iovecs point into the event's buffers (or `single`, alive
    // here), which the calling helper owns until it hands the result back.
    unsafe {
        if write {
            libc::pwritev2(fd, iov, count as i32, at(offset), flags) as i64
        } else {
            libc::preadv2(fd, iov, count as i32, at(offset), flags) as i64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::helper_wanted;

    #[test]
    fn helpers_grow_only_past_those_held_by_streams() {
        // Nothing waits: none.
        assert!(!helper_wanted(0, false, 0, 4, 64));
        // Work waits: up to the bound, then only for helpers streams hold.
        assert!(helper_wanted(3, true, 0, 4, 64));
        assert!(!helper_wanted(4, true, 0, 4, 64));
        assert!(helper_wanted(4, true, 2, 4, 64));
        assert!(!helper_wanted(6, true, 2, 4, 64));
        // Streams counted before their helper exists.
        assert!(helper_wanted(1, true, 5, 4, 64));
        // Never past the cap.
        assert!(!helper_wanted(64, true, 64, 4, 64));
    }
}
