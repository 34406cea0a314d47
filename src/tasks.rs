//! `IOEvent`: one I/O request as the user hands it to a context, and the
//! buffer type it carries.
//!
//! An event is allocated once by the user (`Box<IOEvent<C>>`), travels
//! through the queues and a driver slot, and comes back to the user inside
//! its callback. Nothing else is allocated per I/O.

use std::alloc::{self, Layout};
use std::fmt;
use std::io;
use std::os::unix::io::RawFd;
use std::ptr::{self, NonNull};

use crate::embedded_list::EmbeddedList;

/// Largest transfer the kernel performs in one read/write call
/// (`MAX_RW_COUNT`). Longer requests are split by the short-transfer logic.
pub(crate) const MAX_RW_CHUNK: u64 = 0x7fff_f000;

/// How many times an I/O that completes with `-EAGAIN`/`-EINTR` is retried
/// before that error is handed to the user.
const MAX_TRANSIENT_RETRIES: u8 = 16;

/// Per-request read/write flags an event may carry (`preadv2(2)`'s
/// `RWF_*`, the same values): data durable before completion
/// (`RWF_DSYNC`, `RWF_SYNC`), fail with `EAGAIN` instead of waiting
/// (`RWF_NOWAIT`), polled completion (`RWF_HIPRI`, which only IOPOLL
/// contexts honour, for every read and write already; elsewhere ignored).
pub const RW_FLAGS_ALLOWED: i32 = libc::RWF_HIPRI | libc::RWF_DSYNC | libc::RWF_SYNC | libc::RWF_NOWAIT;

/// Most buffers one vectored event may carry (`IOV_MAX`).
pub const MAX_IOVECS: usize = libc::UIO_MAXIOV as usize;

/// The operation an event performs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IOAction {
    /// Read `len` bytes at `offset` into the buffer.
    Read = 0,
    /// Write the buffer at `offset`.
    Write = 1,
    /// `fsync(2)` the file.
    Fsync = 2,
    /// `fdatasync(2)` the file.
    Fdatasync = 3,
    /// `fallocate(2)` with `mode` over `[offset, offset + len)`.
    Fallocate = 4,
}

/// The queue an event is submitted on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IOChannel {
    /// Served before reads and writes, without a budget.
    Prio = 0,
    /// Reads; shares each round fairly with `Write`.
    Read = 1,
    /// Writes; shares each round fairly with `Read`.
    Write = 2,
}

/// What runs when an event completes. Implemented for closures through
/// [`ClosureCb`]; the C layer implements it for function pointers.
///
/// `call` runs exactly once per submitted event, on a callback-worker
/// thread or, when the workers were created with zero threads, on the
/// driver's poller thread (where it must not block).
pub trait IOCallbackCustom: Sized + Send + 'static {
    fn call(self, event: Box<IOEvent<Self>>);
}

/// A boxed closure as a callback, for Rust users and tests.
pub struct ClosureCb(pub Box<dyn FnOnce(Box<IOEvent<ClosureCb>>) + Send + 'static>);

impl ClosureCb {
    pub fn new<F: FnOnce(Box<IOEvent<ClosureCb>>) + Send + 'static>(f: F) -> Self {
        ClosureCb(Box::new(f))
    }
}

impl IOCallbackCustom for ClosureCb {
    fn call(self, event: Box<IOEvent<Self>>) {
        (self.0)(event)
    }
}

/// A byte buffer for I/O: either owned (allocated with a chosen alignment,
/// freed on drop) or borrowed from memory the caller owns and keeps alive
/// until the I/O's callback has run (the C API uses this).
pub struct Buffer {
    ptr: NonNull<u8>,
    len: usize,
    /// log2 of the allocation's alignment (owned buffers only).
    align_shift: u8,
    owned: bool,
}

// SAFETY: the buffer is plain memory; ownership moves with the event and only
// one thread (the user, or the kernel while the I/O is in flight) uses it at a time.
unsafe impl Send for Buffer {}

/// Alignment used by [`Buffer::aligned`]; satisfies O_DIRECT on every common
/// device (logical block sizes of 512 B and 4 KiB).
pub const DIRECT_IO_ALIGN: usize = 4096;

impl Buffer {
    /// An owned, zero-filled buffer aligned to [`DIRECT_IO_ALIGN`].
    pub fn aligned(len: usize) -> io::Result<Buffer> {
        Self::with_alignment(len, DIRECT_IO_ALIGN)
    }

    /// An owned, zero-filled buffer with the given power-of-two alignment.
    pub fn with_alignment(len: usize, align: usize) -> io::Result<Buffer> {
        let layout =
            Layout::from_size_align(len.max(1), align).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        if len == 0 {
            // A zero-length buffer owns no memory; a dangling aligned pointer is
            // valid for zero-byte accesses.
            let ptr = NonNull::new(align as *mut u8).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            return Ok(Buffer { ptr, len: 0, align_shift: 0, owned: false });
        }
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(Buffer { ptr, len, align_shift: align.trailing_zeros() as u8, owned: true })
    }

    /// A zero-length buffer (owns nothing).
    pub fn empty() -> Buffer {
        Buffer { ptr: NonNull::dangling(), len: 0, align_shift: 0, owned: false }
    }

    /// Wraps memory owned by the caller. The buffer never frees it.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes until the event
    /// carrying this buffer has completed and its callback has returned (or the
    /// buffer is dropped), and must not be accessed by anyone else meanwhile.
    pub unsafe fn from_raw_parts(ptr: *mut u8, len: usize) -> io::Result<Buffer> {
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        Ok(Buffer { ptr, len, align_shift: 0, owned: false })
    }

    /// An owned buffer holding a copy of `data`, aligned for O_DIRECT.
    pub fn copy_from(data: &[u8]) -> io::Result<Buffer> {
        let mut buf = Self::aligned(data.len())?;
        buf.as_mut_slice().copy_from_slice(data);
        Ok(buf)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes (owned allocation or the caller's
        // promise in from_raw_parts) and we hold &self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: owned buffers were allocated in with_alignment with exactly
            // this size (len > 0) and alignment (a power of two, 1 << align_shift).
            unsafe {
                alloc::dealloc(self.ptr.as_ptr(), Layout::from_size_align_unchecked(self.len, 1 << self.align_shift))
            }
        }
    }
}

impl fmt::Debug for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buffer").field("ptr", &self.ptr).field("len", &self.len).field("owned", &self.owned).finish()
    }
}

/// Result value meaning "not completed yet".
const RESULT_PENDING: i64 = i64::MIN;

/// The kernel request a driver must issue next for an event, derived from
/// the event's progress. Each driver maps it to its own `iocb` or SQE.
#[derive(Clone, Copy, Debug)]
pub(crate) enum IoRequest {
    Read { buf: *mut u8, len: u32, offset: u64 },
    Write { buf: *const u8, len: u32, offset: u64 },
    Readv { iov: *const libc::iovec, count: u32, offset: u64 },
    Writev { iov: *const libc::iovec, count: u32, offset: u64 },
    Fsync,
    Fdatasync,
    Fallocate { mode: i32, offset: u64, len: u64 },
}

/// Whether the file behind an event takes "the rest" after a short
/// transfer: only regular files and block devices do; pipes, sockets and
/// character devices give what they have, as read(2) and write(2) do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Remainder {
    Unknown,
    Continue,
    Stop,
}

/// What a driver does with a slot after the kernel reported a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// The event is complete: hand it to its callback(s).
    Complete,
    /// Issue the next request (`IOEvent::next_request`) for the remainder.
    Resubmit,
}

/// One I/O request. Create it with [`IOEvent::new`] (read/write) or one of
/// the other constructors, set a callback, and submit it to a context.
pub struct IOEvent<C: IOCallbackCustom> {
    fd: RawFd,
    /// fallocate mode.
    mode: i32,
    offset: u64,
    /// Bytes to transfer (read/write) or the range length (fallocate).
    length: u64,
    /// Bytes already transferred by earlier (short) requests.
    done: u64,
    /// Bytes or -errno once complete, `RESULT_PENDING` before.
    res: i64,
    /// The last errno the kernel reported, kept when bytes were transferred
    /// before it (merged events pass it to the sub-events after the prefix).
    last_error: i32,
    action: IOAction,
    transient_retries: u8,
    /// Ordered after everything accepted before it (see `set_drain`).
    drain: bool,
    /// Whether the file is seekable (see `is_seekable`), learned when first
    /// needed.
    remainder: Remainder,
    buf: Option<Buffer>,
    callback: Option<C>,
    /// Only for a merged event (boxed so plain events stay small).
    merge: Option<Box<MergeState<C>>>,
    /// Only for a vectored event: its buffers and their iovecs.
    vectored: Option<Box<Vectored>>,
    /// `RWF_*` bits for reads and writes (see `RW_FLAGS_ALLOWED`).
    rw_flags: i32,
    /// Link used by `EmbeddedList`.
    pub(crate) next: *mut IOEvent<C>,
    /// Opaque value for the user (tests and tools use it as an id).
    pub user_tag: u64,
}

/// What a merged event carries besides the plain fields.
struct MergeState<C: IOCallbackCustom> {
    /// The original events, in offset order.
    subs: EmbeddedList<C>,
    /// One iovec per sub-event.
    iov: IovCursor,
}

/// What a vectored event carries: its buffers, one iovec each.
struct Vectored {
    bufs: Vec<Buffer>,
    iov: IovCursor,
}

/// The iovecs of a vectored request; `start` is the first one not yet
/// fully transferred (it is trimmed in place after a short transfer).
struct IovCursor {
    iov: Vec<libc::iovec>,
    start: usize,
}

impl IovCursor {
    fn new<'a>(bufs: impl Iterator<Item = Option<&'a Buffer>>) -> Self {
        let iov = bufs
            .map(|buf| libc::iovec {
                iov_base: buf.map_or(ptr::null_mut(), |b| b.as_ptr() as *mut libc::c_void),
                iov_len: buf.map_or(0, |b| b.len()),
            })
            .collect();
        IovCursor { iov, start: 0 }
    }

    /// The iovecs still to transfer (at most `MAX_IOVECS` per request).
    fn rest(&self) -> (*const libc::iovec, u32) {
        let rest = &self.iov[self.start..];
        (rest.as_ptr(), rest.len().min(MAX_IOVECS) as u32)
    }

    /// Drops the first `n` bytes.
    fn advance(&mut self, n: u64) {
        let mut left = n as usize;
        while left > 0 && self.start < self.iov.len() {
            let iov = &mut self.iov[self.start];
            if left >= iov.iov_len {
                left -= iov.iov_len;
                iov.iov_len = 0;
                self.start += 1;
            } else {
                // SAFETY: left < iov_len, so the new base stays inside this buffer.
                iov.iov_base = unsafe { (iov.iov_base as *mut u8).add(left) } as *mut libc::c_void;
                iov.iov_len -= left;
                left = 0;
            }
        }
    }
}

// SAFETY: the raw pointers (`next`, iovec bases) point into memory owned by the
// event itself (sub-task list, buffers) and move with it; the event is only
// ever used by one thread at a time.
unsafe impl<C: IOCallbackCustom> Send for IOEvent<C> {}

impl<C: IOCallbackCustom> IOEvent<C> {
    fn blank(fd: RawFd, action: IOAction) -> Self {
        IOEvent {
            fd,
            mode: 0,
            offset: 0,
            length: 0,
            done: 0,
            res: RESULT_PENDING,
            last_error: 0,
            action,
            transient_retries: 0,
            drain: false,
            remainder: Remainder::Unknown,
            buf: None,
            callback: None,
            merge: None,
            vectored: None,
            rw_flags: 0,
            next: ptr::null_mut(),
            user_tag: 0,
        }
    }

    /// A read or write of `buf` at `offset`. For `Fsync`, `Fdatasync` and
    /// `Fallocate` use the dedicated constructors instead (a buffer passed
    /// here with those actions is ignored for fsync and rejected on submit
    /// for fallocate).
    pub fn new(fd: RawFd, buf: Buffer, action: IOAction, offset: u64) -> Box<Self> {
        let mut ev = Self::blank(fd, action);
        ev.offset = offset;
        ev.length = buf.len() as u64;
        ev.buf = Some(buf);
        Box::new(ev)
    }

    /// A vectored read (into each buffer in turn) or write (from each in
    /// turn) starting at `offset`: `preadv(2)`/`pwritev(2)`. At most
    /// `MAX_IOVECS` buffers, holding at least one byte together (else
    /// submission fails with `EINVAL`). The result counts bytes over all of
    /// them; `take_buffers` returns them.
    pub fn vectored(fd: RawFd, bufs: Vec<Buffer>, action: IOAction, offset: u64) -> Box<Self> {
        let mut ev = Self::blank(fd, action);
        ev.offset = offset;
        ev.length = bufs.iter().map(|b| b.len() as u64).sum();
        let iov = IovCursor::new(bufs.iter().map(Some));
        ev.vectored = Some(Box::new(Vectored { bufs, iov }));
        Box::new(ev)
    }

    /// Sets `RWF_*` flags on a read or write (see `RW_FLAGS_ALLOWED`; other
    /// bits, or flags on other actions, fail submission with `EINVAL`). With
    /// `RWF_NOWAIT` an `EAGAIN` is the result, never retried.
    pub fn set_rw_flags(&mut self, flags: i32) {
        self.rw_flags = flags;
    }

    pub fn rw_flags(&self) -> i32 {
        self.rw_flags
    }

    /// Whether this event reads or writes several buffers.
    pub fn is_vectored(&self) -> bool {
        self.vectored.is_some()
    }

    /// Takes the buffers back out of a completed vectored event.
    pub fn take_buffers(&mut self) -> Vec<Buffer> {
        self.vectored.take().map_or_else(Vec::new, |v| v.bufs)
    }

    pub fn fsync(fd: RawFd) -> Box<Self> {
        Box::new(Self::blank(fd, IOAction::Fsync))
    }

    pub fn fdatasync(fd: RawFd) -> Box<Self> {
        Box::new(Self::blank(fd, IOAction::Fdatasync))
    }

    /// `fallocate(fd, mode, offset, len)`.
    pub fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> Box<Self> {
        let mut ev = Self::blank(fd, IOAction::Fallocate);
        ev.mode = mode;
        ev.offset = offset;
        ev.length = len;
        Box::new(ev)
    }

    pub fn set_callback(&mut self, cb: C) {
        self.callback = Some(cb);
    }

    /// Makes this a drain event: it starts only once every event accepted
    /// before it by the context has completed, and events accepted after
    /// it start only once it has completed (io_uring's IOSQE_IO_DRAIN, on
    /// every backend). For example a write, then an fdatasync with drain
    /// set: the fdatasync covers the write.
    pub fn set_drain(&mut self, drain: bool) {
        self.drain = drain;
    }

    pub fn is_drain(&self) -> bool {
        self.drain
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }

    pub fn action(&self) -> IOAction {
        self.action
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes requested (read/write) or range length (fallocate).
    pub fn len(&self) -> u64 {
        self.length
    }

    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// Bytes transferred (read/write; 0 for the other actions) or the
    /// negative errno, once complete.
    pub fn result(&self) -> Option<i64> {
        (self.res != RESULT_PENDING).then_some(self.res)
    }

    /// Like [`result`](Self::result) as an `io::Result`.
    pub fn io_result(&self) -> Option<io::Result<usize>> {
        self.result().map(|r| if r < 0 { Err(io::Error::from_raw_os_error((-r) as i32)) } else { Ok(r as usize) })
    }

    pub fn buffer(&self) -> Option<&Buffer> {
        self.buf.as_ref()
    }

    pub fn buffer_mut(&mut self) -> Option<&mut Buffer> {
        self.buf.as_mut()
    }

    /// Takes the buffer back out of a completed event.
    pub fn take_buffer(&mut self) -> Option<Buffer> {
        self.buf.take()
    }

    /// Number of user events this event stands for (merged events carry many).
    pub(crate) fn callback_count(&self) -> usize {
        self.merge.as_ref().map_or(1, |m| m.subs.len())
    }

    /// Whether this event carries merged sub-events.
    pub(crate) fn is_merged(&self) -> bool {
        self.merge.is_some()
    }

    /// Checks what the kernel would reject late or what would corrupt the
    /// engine's accounting; returns the errno to report synchronously.
    pub(crate) fn validate(&self) -> Result<(), i32> {
        if self.offset > i64::MAX as u64 || self.length > i64::MAX as u64 {
            return Err(libc::EINVAL);
        }
        if self.offset.checked_add(self.length).map_or(true, |end| end > i64::MAX as u64) {
            return Err(libc::EINVAL);
        }
        if self.res != RESULT_PENDING {
            // Already completed once: a resubmitted event must be rebuilt.
            return Err(libc::EINVAL);
        }
        if self.rw_flags != 0
            && (self.rw_flags & !RW_FLAGS_ALLOWED != 0 || !matches!(self.action, IOAction::Read | IOAction::Write))
        {
            return Err(libc::EINVAL);
        }
        match self.action {
            IOAction::Read | IOAction::Write => {
                if self.length == 0 {
                    return Err(libc::EINVAL);
                }
                if let Some(vectored) = &self.vectored {
                    if vectored.bufs.len() > MAX_IOVECS || self.buf.is_some() {
                        return Err(libc::EINVAL);
                    }
                } else if !self.is_merged() && self.buf.as_ref().map_or(true, |b| b.len() as u64 != self.length) {
                    return Err(libc::EINVAL);
                }
            }
            IOAction::Fallocate => {
                if self.length == 0 || self.buf.is_some() || self.vectored.is_some() {
                    return Err(libc::EINVAL);
                }
            }
            IOAction::Fsync | IOAction::Fdatasync => {}
        }
        Ok(())
    }

    /// Makes this event a merged carrier for `subs` (contiguous, same fd and
    /// action, in offset order), reading into / writing from their buffers
    /// directly with one vectored request.
    pub(crate) fn merged(fd: RawFd, action: IOAction, offset: u64, subs: EmbeddedList<C>) -> Box<Self> {
        let mut ev = Self::blank(fd, action);
        ev.offset = offset;
        ev.length = subs.iter().map(|sub| sub.length).sum();
        let iov = IovCursor::new(subs.iter().map(|sub| sub.buf.as_ref()));
        ev.merge = Some(Box::new(MergeState { subs, iov }));
        Box::new(ev)
    }

    /// The request a driver must issue next (first or after a short transfer).
    pub(crate) fn next_request(&mut self) -> IoRequest {
        let offset = self.offset + self.done;
        if let (IOAction::Read | IOAction::Write, Some(cursor)) = (self.action, self.iov_cursor()) {
            let (iov, count) = cursor.rest();
            return if self.action == IOAction::Read {
                IoRequest::Readv { iov, count, offset }
            } else {
                IoRequest::Writev { iov, count, offset }
            };
        }
        match self.action {
            IOAction::Read | IOAction::Write => {
                let len = (self.length - self.done).min(MAX_RW_CHUNK) as u32;
                let done = self.done as usize;
                let base = self.buf.as_mut().map_or(ptr::null_mut(), |b| b.as_mut_ptr());
                // SAFETY: validate() ensured the buffer holds `length` bytes and
                // done < length, so base + done stays inside the allocation.
                let buf = unsafe { base.add(done) };
                if self.action == IOAction::Read {
                    IoRequest::Read { buf, len, offset }
                } else {
                    IoRequest::Write { buf, len, offset }
                }
            }
            IOAction::Fsync => IoRequest::Fsync,
            IOAction::Fdatasync => IoRequest::Fdatasync,
            IOAction::Fallocate => IoRequest::Fallocate { mode: self.mode, offset: self.offset, len: self.length },
        }
    }

    /// Applies one kernel result (`bytes` or `-errno`) and decides whether the
    /// event is complete. Short reads/writes of regular files and block
    /// devices resubmit the remainder (a read that reaches end of file
    /// completes with the bytes it got); on other files (pipes, sockets,
    /// character devices) a short transfer completes the event.
    pub(crate) fn apply_result(&mut self, res: i64) -> Progress {
        // EAGAIN is the answer a RWF_NOWAIT request asked for.
        let transient =
            (res == -(libc::EAGAIN as i64) && self.rw_flags & libc::RWF_NOWAIT == 0) || res == -(libc::EINTR as i64);
        if transient && self.transient_retries < MAX_TRANSIENT_RETRIES {
            self.transient_retries += 1;
            return Progress::Resubmit;
        }
        match self.action {
            IOAction::Read | IOAction::Write => {
                if res < 0 {
                    self.last_error = res as i32;
                    // Bytes already transferred win over a later error, as with
                    // read(2)/write(2); the caller sees a short count.
                    self.res = if self.done > 0 { self.done as i64 } else { res };
                    return Progress::Complete;
                }
                if res == 0 {
                    // End of file (read) or a device that accepts nothing more.
                    self.res = self.done as i64;
                    return Progress::Complete;
                }
                self.advance(res as u64);
                if self.done >= self.length {
                    self.res = self.length as i64;
                    Progress::Complete
                } else if self.is_seekable() {
                    Progress::Resubmit
                } else {
                    self.res = self.done as i64;
                    Progress::Complete
                }
            }
            _ => {
                self.res = res.min(0);
                Progress::Complete
            }
        }
    }

    /// Whether the file is a regular file or block device: only those take
    /// the remainder after a short transfer, and only they have offsets.
    /// Asked of the file once (an fstat, only on rare paths), then kept.
    pub(crate) fn is_seekable(&mut self) -> bool {
        if self.remainder == Remainder::Unknown {
            let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
            // SAFETY: fstat writes into the struct we own; a stale or bad
            // descriptor only makes it fail.
            let ok = unsafe { libc::fstat(self.fd, st.as_mut_ptr()) } == 0;
            // SAFETY: zero-initialised above, and filled by fstat when ok.
            let mode = unsafe { st.assume_init_ref() }.st_mode;
            let seekable = ok && matches!(mode & libc::S_IFMT, libc::S_IFREG | libc::S_IFBLK);
            self.remainder = if seekable { Remainder::Continue } else { Remainder::Stop };
        }
        self.remainder == Remainder::Continue
    }

    /// Applies a result that must not be retried: it comes from a path that
    /// has done its own retrying (AIO's helper thread) or from a refusal.
    /// Retrying a helper's result natively would run another operation
    /// (AIO refuses the fsync the helper ran instead).
    pub(crate) fn apply_final_result(&mut self, res: i64) -> Progress {
        self.transient_retries = MAX_TRANSIENT_RETRIES;
        self.apply_result(res)
    }

    /// The iovecs of a merged or vectored event.
    fn iov_cursor(&self) -> Option<&IovCursor> {
        match (&self.merge, &self.vectored) {
            (Some(merge), _) => Some(&merge.iov),
            (None, Some(vectored)) => Some(&vectored.iov),
            (None, None) => None,
        }
    }

    /// Records `n` more bytes transferred and trims the iovec list of a
    /// merged or vectored event so the next request starts after them.
    fn advance(&mut self, n: u64) {
        self.done += n;
        match (&mut self.merge, &mut self.vectored) {
            (Some(merge), _) => merge.iov.advance(n),
            (None, Some(vectored)) => vectored.iov.advance(n),
            (None, None) => {}
        }
    }

    /// Completes the event (and each merged sub-event) with `-errno` without
    /// any I/O having been issued.
    pub(crate) fn fail(&mut self, errno: i32) {
        self.res = -(errno as i64);
        self.last_error = -errno;
    }

    /// For a merged event, completed: splits its result among the original
    /// events in offset order and returns them, each with its own result.
    /// Bytes transferred cover a prefix of the sub-events; a sub-event after
    /// that prefix gets the error (if the merged I/O failed) or 0 (end of file).
    fn split_merged(&mut self) -> EmbeddedList<C> {
        // Every completion path leaves `done` as the bytes actually transferred.
        let transferred = self.done;
        let error = self.last_error as i64;
        let Some(merge) = self.merge.take() else { return EmbeddedList::new() };
        let mut subs = merge.subs;
        let mut start = 0u64;
        for sub in subs.iter_mut() {
            let end = start + sub.length;
            sub.res = if transferred >= end {
                sub.length as i64
            } else if transferred > start {
                (transferred - start) as i64
            } else if error < 0 {
                error
            } else {
                0
            };
            start = end;
        }
        subs
    }

    /// Calls `f` with each user event this event stands for: itself, or for a
    /// merged carrier each original event with its share of the result.
    pub(crate) fn for_each_user_event(mut self: Box<Self>, mut f: impl FnMut(Box<IOEvent<C>>)) {
        if !self.is_merged() {
            f(self);
            return;
        }
        let mut subs = self.split_merged();
        drop(self);
        while let Some(sub) = subs.pop_front() {
            f(sub);
        }
    }

    /// Runs the callback, consuming the event. Events without a callback are
    /// simply dropped.
    pub(crate) fn run_callback(mut self: Box<Self>) {
        if let Some(cb) = self.callback.take() {
            cb.call(self);
        }
    }
}

impl<C: IOCallbackCustom> fmt::Debug for IOEvent<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IOEvent")
            .field("fd", &self.fd)
            .field("action", &self.action)
            .field("offset", &self.offset)
            .field("len", &self.length)
            .field("result", &self.result())
            .field("merged", &self.merge.as_ref().map_or(0, |m| m.subs.len()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A regular file to point events at (short-transfer tests need one).
    fn regular_fd() -> i32 {
        use std::os::fd::IntoRawFd;
        std::fs::File::open("/proc/self/exe").unwrap().into_raw_fd()
    }

    fn read_event(len: usize) -> Box<IOEvent<ClosureCb>> {
        IOEvent::new(regular_fd(), Buffer::aligned(len).unwrap(), IOAction::Read, 4096)
    }

    #[test]
    fn a_short_read_from_a_pipe_completes_with_what_arrived() {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let mut ev: Box<IOEvent<ClosureCb>> = IOEvent::new(fds[0], Buffer::aligned(64).unwrap(), IOAction::Read, 0);
        assert_eq!(ev.apply_result(10), Progress::Complete);
        assert_eq!(ev.result(), Some(10));
        // SAFETY: closing the descriptors pipe gave us.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }

    #[test]
    fn short_read_resubmits_remainder_then_completes_at_eof() {
        let mut ev = read_event(8192);
        assert_eq!(ev.apply_result(4096), Progress::Resubmit);
        match ev.next_request() {
            IoRequest::Read { len, offset, .. } => {
                assert_eq!(len, 4096);
                assert_eq!(offset, 8192);
            }
            other => panic!("unexpected request {other:?}"),
        }
        assert_eq!(ev.apply_result(0), Progress::Complete);
        assert_eq!(ev.result(), Some(4096));
    }

    #[test]
    fn error_after_partial_transfer_reports_bytes() {
        let mut ev = read_event(8192);
        assert_eq!(ev.apply_result(512), Progress::Resubmit);
        assert_eq!(ev.apply_result(-(libc::EIO as i64)), Progress::Complete);
        assert_eq!(ev.result(), Some(512));
    }

    #[test]
    fn transient_errors_are_retried_a_bounded_number_of_times() {
        let mut ev = read_event(512);
        for _ in 0..MAX_TRANSIENT_RETRIES {
            assert_eq!(ev.apply_result(-(libc::EAGAIN as i64)), Progress::Resubmit);
        }
        assert_eq!(ev.apply_result(-(libc::EAGAIN as i64)), Progress::Complete);
        assert_eq!(ev.result(), Some(-(libc::EAGAIN as i64)));
    }

    #[test]
    fn a_final_result_is_never_retried() {
        let mut ev: Box<IOEvent<ClosureCb>> = IOEvent::fsync(3);
        assert_eq!(ev.apply_final_result(-(libc::EINTR as i64)), Progress::Complete);
        assert_eq!(ev.result(), Some(-(libc::EINTR as i64)));
    }

    #[test]
    fn validate_rejects_zero_length_and_overflowing_ranges() {
        let ev: Box<IOEvent<ClosureCb>> = IOEvent::new(3, Buffer::aligned(0).unwrap(), IOAction::Write, 0);
        assert_eq!(ev.validate(), Err(libc::EINVAL));
        let ev: Box<IOEvent<ClosureCb>> =
            IOEvent::new(3, Buffer::aligned(4096).unwrap(), IOAction::Read, u64::MAX - 10);
        assert_eq!(ev.validate(), Err(libc::EINVAL));
        let ev: Box<IOEvent<ClosureCb>> = IOEvent::fallocate(3, 0, 0, 0);
        assert_eq!(ev.validate(), Err(libc::EINVAL));
        assert_eq!(read_event(4096).validate(), Ok(()));
    }

    #[test]
    fn merged_split_gives_each_sub_event_its_share() {
        let fd = regular_fd();
        let mut list = EmbeddedList::new();
        for i in 0..3u64 {
            list.push_back(IOEvent::<ClosureCb>::new(fd, Buffer::aligned(4096).unwrap(), IOAction::Read, i * 4096));
        }
        let mut merged = IOEvent::merged(fd, IOAction::Read, 0, list);
        assert_eq!(merged.len(), 3 * 4096);
        // Short: 4096 + 100 bytes, then end of file.
        assert_eq!(merged.apply_result(4096 + 100), Progress::Resubmit);
        match merged.next_request() {
            IoRequest::Readv { count, offset, iov } => {
                assert_eq!(count, 2);
                assert_eq!(offset, 4196);
                // SAFETY: iov points at the event's own iovec array with `count` entries.
                assert_eq!(unsafe { (*iov).iov_len }, 4096 - 100);
            }
            other => panic!("unexpected request {other:?}"),
        }
        assert_eq!(merged.apply_result(0), Progress::Complete);
        let results: Vec<i64> = merged.split_merged().iter().map(|e| e.result().unwrap()).collect();
        assert_eq!(results, vec![4096, 100, 0]);
    }

    #[test]
    fn merged_failure_reaches_every_untransferred_sub_event() {
        let fd = regular_fd();
        let mut list = EmbeddedList::new();
        for i in 0..2u64 {
            list.push_back(IOEvent::<ClosureCb>::new(fd, Buffer::aligned(512).unwrap(), IOAction::Write, i * 512));
        }
        let mut merged = IOEvent::merged(fd, IOAction::Write, 0, list);
        assert_eq!(merged.apply_result(-(libc::ENOSPC as i64)), Progress::Complete);
        let results: Vec<i64> = merged.split_merged().iter().map(|e| e.result().unwrap()).collect();
        assert_eq!(results, vec![-(libc::ENOSPC as i64); 2]);
    }

    #[test]
    fn merged_partial_write_then_error_splits_bytes_and_error() {
        let fd = regular_fd();
        let mut list = EmbeddedList::new();
        for i in 0..3u64 {
            list.push_back(IOEvent::<ClosureCb>::new(fd, Buffer::aligned(512).unwrap(), IOAction::Write, i * 512));
        }
        let mut merged = IOEvent::merged(fd, IOAction::Write, 0, list);
        assert_eq!(merged.apply_result(700), Progress::Resubmit);
        assert_eq!(merged.apply_result(-(libc::ENOSPC as i64)), Progress::Complete);
        let results: Vec<i64> = merged.split_merged().iter().map(|e| e.result().unwrap()).collect();
        assert_eq!(results, vec![512, 188, -(libc::ENOSPC as i64)]);
    }
}
