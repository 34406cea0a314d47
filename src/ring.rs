//! io_uring plumbing shared by every ring the library sets up: building a
//! ring whose optional set-up flags fall back on older kernels, probing
//! opcodes, and writing and submitting SQEs.

use std::io;

use io_uring::squeue::Entry;
use io_uring::{IoUring, Probe, SubmissionQueue, Submitter};

/// `IORING_SETUP_*` bits, as the kernel defines them (used to report the
/// flags a ring runs with; the builder sets them through the crate).
pub(crate) mod setup {
    pub const IOPOLL: u32 = 1 << 0;
    pub const SQPOLL: u32 = 1 << 1;
    pub const CQSIZE: u32 = 1 << 3;
    pub const SUBMIT_ALL: u32 = 1 << 7;
    pub const COOP_TASKRUN: u32 = 1 << 8;
    pub const SINGLE_ISSUER: u32 = 1 << 12;
    pub const DEFER_TASKRUN: u32 = 1 << 13;
}

/// Largest completion queue the kernel accepts without clamping
/// (`IORING_MAX_CQ_ENTRIES`).
pub(crate) const MAX_CQ_ENTRIES: u32 = 2 * 32768;

/// How to build a ring.
#[derive(Clone, Debug, Default)]
pub(crate) struct RingConfig {
    /// Submission queue entries.
    pub entries: u32,
    /// Completion queue entries (IORING_SETUP_CQSIZE), if not the kernel's
    /// default of twice `entries`.
    pub cq_entries: Option<u32>,
    /// IORING_SETUP_SQPOLL with this idle time in milliseconds.
    pub sqpoll_idle_ms: Option<u32>,
    /// With SQPOLL: pin the kernel thread to this CPU (IORING_SETUP_SQ_AFF).
    pub sqpoll_cpu: Option<u32>,
    /// IORING_SETUP_IOPOLL.
    pub iopoll: bool,
    /// Flags the ring should have where the kernel knows them, as groups in
    /// the order kernels gained them. When the kernel refuses the set
    /// (EINVAL), the newest group is dropped and the build retried.
    pub optional: Vec<u32>,
}

/// A ring and the set-up flags in force on it.
pub(crate) struct BuiltRing {
    pub ring: IoUring,
    pub flags: u32,
}

impl RingConfig {
    /// Builds the ring with as many optional flag groups as the kernel
    /// takes. An error is the kernel's answer for the required settings.
    pub(crate) fn build(&self) -> io::Result<BuiltRing> {
        let mut optional = self.optional.clone();
        loop {
            let wanted = optional.iter().fold(0, |all, group| all | group);
            match self.build_with(wanted) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !optional.is_empty() => {
                    optional.pop();
                }
                built => return built,
            }
        }
    }

    fn build_with(&self, optional: u32) -> io::Result<BuiltRing> {
        let mut builder = IoUring::builder();
        let mut flags = optional;
        if optional & setup::SUBMIT_ALL != 0 {
            builder.setup_submit_all();
        }
        if optional & setup::COOP_TASKRUN != 0 {
            builder.setup_coop_taskrun();
        }
        if optional & setup::SINGLE_ISSUER != 0 {
            builder.setup_single_issuer();
        }
        if optional & setup::DEFER_TASKRUN != 0 {
            builder.setup_defer_taskrun();
        }
        if let Some(idle) = self.sqpoll_idle_ms {
            builder.setup_sqpoll(idle);
            flags |= setup::SQPOLL;
            if let Some(cpu) = self.sqpoll_cpu {
                builder.setup_sqpoll_cpu(cpu);
            }
        }
        if self.iopoll {
            builder.setup_iopoll();
            flags |= setup::IOPOLL;
        }
        if let Some(cq) = self.cq_entries {
            builder.setup_cqsize(cq);
            flags |= setup::CQSIZE;
        }
        let ring = builder.build(self.entries)?;
        Ok(BuiltRing { ring, flags })
    }
}

/// `Err(EOPNOTSUPP)` unless the kernel supports every opcode in `needed`.
pub(crate) fn probe_opcodes(ring: &IoUring, needed: &[u8]) -> io::Result<()> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    if needed.iter().all(|&op| probe.is_supported(op)) {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
}

/// The submission queue, as seen by the one thread allowed to write it.
pub(crate) struct SqWriter<'a> {
    sq: SubmissionQueue<'a>,
    submitter: Submitter<'a>,
    sqpoll: bool,
}

impl<'a> SqWriter<'a> {
    /// # Safety
    /// No other `SubmissionQueue` of `ring` may exist while this one lives.
    pub(crate) unsafe fn new(ring: &'a IoUring, sqpoll: bool) -> Self {
        SqWriter { sq: ring.submission_shared(), submitter: ring.submitter(), sqpoll }
    }

    /// Queues an entry; `Err(entry)` if the queue is full. Callers size the
    /// queue so that it never is (see the drivers), and submit on `Err`.
    ///
    /// # Safety
    /// Whatever the entry points to must stay valid until its completion.
    pub(crate) unsafe fn push(&mut self, entry: &Entry) -> Result<(), ()> {
        self.sq.push(entry).map_err(|_| ())
    }

    /// Publishes the queued entries and returns how many the kernel has not
    /// consumed yet.
    pub(crate) fn publish(&mut self) -> usize {
        self.sq.sync();
        self.sq.len()
    }

    /// Hands every queued entry to the kernel. The kernel may stop early (a
    /// request that fails at preparation ends its pass on kernels without
    /// IORING_SETUP_SUBMIT_ALL), so this repeats until none is left. An
    /// error other than EINTR leaves the rest queued and is returned; the
    /// caller decides when to try again.
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        while self.publish() > 0 {
            match self.submitter.submit() {
                Ok(_) if self.sqpoll => return Ok(()), // the kernel thread consumes them
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether the kernel has flagged a completion queue overflow.
    pub(crate) fn cq_overflowed(&self) -> bool {
        self.sq.cq_overflow()
    }
}

/// `IORING_OFF_CQ_RING`: the mmap offset of the completion ring.
const OFF_CQ_RING: libc::off_t = 0x800_0000;

/// Where the CQ tail sits in the ring memory (`io_uring_params.cq_off.tail`):
/// the same for every ring of the running kernel, read once from a
/// throwaway ring of one entry. The structure is the kernel's stable ABI:
/// seven u32 and three reserved, then the SQ offsets (8 u32 and a u64),
/// then the CQ offsets, whose second field is the tail.
fn cq_tail_offset() -> io::Result<usize> {
    static OFFSET: std::sync::OnceLock<Result<usize, i32>> = std::sync::OnceLock::new();
    let found = OFFSET.get_or_init(|| {
        let mut params = [0u32; 30];
        // SAFETY: io_uring_setup fills the 120-byte params it is given.
        let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
        if fd < 0 {
            return Err(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO));
        }
        // SAFETY: closing the descriptor the call above returned.
        unsafe { libc::close(fd as i32) };
        const CQ_OFF_TAIL: usize = 10 + 10 + 1; // in u32 units
        Ok(params[CQ_OFF_TAIL] as usize)
    });
    found.map_err(io::Error::from_raw_os_error)
}

/// The CQ tail of a ring, readable from any thread: how many completions
/// the kernel has posted. A thread that submits reads it before and after
/// its `io_uring_enter` to see how many completions came during the call
/// (page-cache reads complete inside it), without touching the completion
/// queue, which belongs to the thread that reaps. A read-only mapping of
/// its own, unmapped on drop.
pub(crate) struct CqTail {
    map: *mut libc::c_void,
    len: usize,
    offset: usize,
}

// SAFETY: the mapping is read-only shared memory, read with atomic loads.
unsafe impl Send for CqTail {}
// SAFETY: as above.
unsafe impl Sync for CqTail {}

impl CqTail {
    pub(crate) fn new(ring: &IoUring) -> io::Result<CqTail> {
        use std::os::fd::AsRawFd;
        let offset = cq_tail_offset()?;
        let len = offset + std::mem::size_of::<u32>();
        // SAFETY: a new read-only shared mapping of the ring's CQ memory;
        // nothing else refers to it.
        let map = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, ring.as_raw_fd(), OFF_CQ_RING)
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(CqTail { map, len, offset })
    }

    pub(crate) fn load(&self) -> u32 {
        // SAFETY: the offset lies inside the mapping, is 4-byte aligned (the
        // kernel's layout), and the kernel writes the tail atomically.
        unsafe {
            (*(self.map.cast::<u8>().add(self.offset).cast::<std::sync::atomic::AtomicU32>()))
                .load(std::sync::atomic::Ordering::Acquire)
        }
    }
}

impl Drop for CqTail {
    fn drop(&mut self) {
        // SAFETY: our own mapping, of this length, no longer used.
        unsafe { libc::munmap(self.map, self.len) };
    }
}

/// The SQE for an event's next request (the first, or the rest after a
/// short transfer), tagged with `user_data`: the block engine's slots and
/// the network loops' file operations build them here alike.
pub(crate) fn prepare_entry<C: crate::tasks::IOCallbackCustom>(
    event: &mut crate::tasks::IOEvent<C>,
    user_data: u64,
) -> Entry {
    use crate::tasks::IoRequest;
    use io_uring::opcode;
    use io_uring::types::{Fd, FsyncFlags};
    let fd = Fd(event.fd());
    // io_uring refuses RWF_HIPRI outside IOPOLL rings, which poll every
    // read and write anyway: it never needs to go to the kernel.
    let flags = event.rw_flags() & !libc::RWF_HIPRI;
    let entry = match event.next_request() {
        IoRequest::Read { buf, len, offset } => opcode::Read::new(fd, buf, len).offset(offset).rw_flags(flags).build(),
        IoRequest::Write { buf, len, offset } => {
            opcode::Write::new(fd, buf, len).offset(offset).rw_flags(flags).build()
        }
        IoRequest::Readv { iov, count, offset } => {
            opcode::Readv::new(fd, iov, count).offset(offset).rw_flags(flags).build()
        }
        IoRequest::Writev { iov, count, offset } => {
            opcode::Writev::new(fd, iov, count).offset(offset).rw_flags(flags).build()
        }
        IoRequest::Fsync => opcode::Fsync::new(fd).build(),
        IoRequest::Fdatasync => opcode::Fsync::new(fd).flags(FsyncFlags::DATASYNC).build(),
        IoRequest::Fallocate { mode, offset, len } => opcode::Fallocate::new(fd, len).offset(offset).mode(mode).build(),
    };
    entry.user_data(user_data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another mapping's view of the CQ tail follows the kernel's posts.
    #[test]
    fn cq_tail_counts_posted_completions() {
        let mut ring = match IoUring::new(4) {
            Ok(ring) => ring,
            Err(e) => {
                eprintln!("skipped: io_uring unavailable here ({e})");
                return;
            }
        };
        let tail = CqTail::new(&ring).unwrap();
        assert_eq!(tail.load(), 0);
        for n in 1..=3u32 {
            // SAFETY: a NOP points at nothing.
            unsafe { ring.submission().push(&io_uring::opcode::Nop::new().build()).unwrap() };
            ring.submit_and_wait(1).unwrap();
            assert_eq!(tail.load(), n);
        }
        ring.completion().for_each(drop);
        assert_eq!(tail.load(), 3, "reaping moves the head, not the tail");
    }

    #[test]
    fn a_refused_flag_group_is_dropped_and_the_older_ones_kept() {
        // DEFER_TASKRUN without SINGLE_ISSUER is refused by every kernel
        // (EINVAL), like a flag an older kernel does not know.
        let config =
            RingConfig { entries: 4, optional: vec![setup::SUBMIT_ALL, setup::DEFER_TASKRUN], ..Default::default() };
        let built = match config.build() {
            Ok(built) => built,
            Err(e) => {
                eprintln!("skipped: io_uring unavailable here ({e})");
                return;
            }
        };
        assert_eq!(built.flags & setup::DEFER_TASKRUN, 0);
        // Kernels before 5.18 drop SUBMIT_ALL as well; later ones keep it.
        let again = RingConfig { entries: 4, optional: vec![setup::SUBMIT_ALL], ..Default::default() }.build().unwrap();
        assert_eq!(built.flags, again.flags);
    }
}
