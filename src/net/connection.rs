//! TcpConnection (seed 3.6): one accepted socket, bound to one event loop
//! for its whole life. This file holds what both backends share: the
//! handle users keep (`Connection`, usable from any thread), the output
//! queue that survives short sends and keeps order, the input tail kept
//! for a parser that waits for a whole message, close requests, and the
//! callbacks (`ServerHandler`).

use std::collections::VecDeque;
use std::ffi::c_void;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::net::event_loop::{LoopShared, Task};

/// What a server calls back, always on the event loop thread that owns the
/// connection. Callbacks must not block (they hold up every connection of
/// their loop). From a callback every method of `Connection` may be called,
/// on this or any other connection.
pub trait ServerHandler: Send + Sync + 'static {
    /// A connection was accepted and bound to a loop.
    fn on_connect(&self, _conn: &Connection) {}

    /// Bytes arrived. `data` is borrowed for the duration of the call only
    /// (it may point into the loop's receive buffers). Returns how many
    /// bytes were consumed; the rest is kept and presented again, in front
    /// of the next bytes, so a parser can wait for a whole message.
    fn on_data(&self, conn: &Connection, data: &[u8]) -> usize;

    /// The peer will send no more (it closed or shut down its write side).
    /// By default the connection closes once its queued output is sent.
    fn on_eof(&self, conn: &Connection) {
        conn.close();
    }

    /// Everything queued has been handed to the kernel.
    fn on_write_complete(&self, _conn: &Connection) {}

    /// Queued output reached the high-water mark (once each time it rises
    /// past it): stop producing until `on_write_complete`.
    fn on_high_water(&self, _conn: &Connection, _queued: usize) {}

    /// The connection is closed: exactly once, and last. `error` is 0 for a
    /// close asked for or a peer that closed cleanly, else the errno that
    /// ended it (ECONNRESET, EPIPE, ECANCELED when the server stopped).
    fn on_close(&self, _conn: &Connection, _error: i32) {}
}

/// Called once a receive into a caller's buffer (`Connection::recv_into`)
/// is over: with the buffer's length once every byte is in it, or with the
/// error that ended it first (`ECONNRESET` when the peer finished sending
/// before the buffer was full, `ECANCELED` when the application closed or
/// aborted the connection or the server stopped, or the socket's error).
/// Runs on the connection's loop thread, also after a close was asked for
/// (the one callback besides on_close and borrowed sends' done that does).
pub type RecvDone = Box<dyn FnOnce(&Connection, io::Result<usize>) + Send>;

/// A receive into a caller's buffer, waiting for its bytes.
pub(crate) struct RecvInto {
    buf: *mut u8,
    len: usize,
    filled: usize,
    done: RecvDone,
}

// SAFETY: the buffer is the caller's promise of memory valid until `done`
// runs, written only by the loop thread (or the kernel on its behalf).
unsafe impl Send for RecvInto {}

impl RecvInto {
    /// Copies what it still needs from the front of `data`; returns how
    /// many bytes it took.
    fn take_from(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.len - self.filled);
        // SAFETY: `filled + n <= len`, inside the caller's buffer, which
        // cannot overlap the loop's receive buffers or input.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.buf.add(self.filled), n) };
        self.filled += n;
        n
    }

    fn is_full(&self) -> bool {
        self.filled == self.len
    }
}

/// The connection whose callback runs on this thread (on_data, or the done
/// of a receive into a buffer), and the receive into a buffer it asked for.
struct Delivery {
    conn: *const ConnShared,
    request: Option<RecvInto>,
}

thread_local! {
    static DELIVERY: std::cell::RefCell<Option<Delivery>> = const { std::cell::RefCell::new(None) };
}

/// Runs `callback` as a callback of `conn` that may call `recv_into`;
/// returns its result and the receive into a buffer it asked for.
fn with_delivery<R>(conn: &Connection, callback: impl FnOnce() -> R) -> (R, Option<RecvInto>) {
    let mine = Delivery { conn: Arc::as_ptr(&conn.0), request: None };
    let outer = DELIVERY.with(|d| d.replace(Some(mine)));
    let result = callback();
    let mine = DELIVERY.with(|d| d.replace(outer));
    (result, mine.and_then(|d| d.request))
}

/// Called with the outcome of a borrowed send: bytes sent, or the error
/// that ended the connection before it was all sent.
pub type SendDone = Box<dyn FnOnce(io::Result<usize>) + Send>;

/// One piece of queued output.
pub(crate) enum Segment {
    /// Bytes the engine copied; sends queued back to back share one.
    Owned(Vec<u8>),
    /// Bytes the caller keeps valid until `done` runs.
    Borrowed { ptr: *const u8, len: usize, done: Option<SendDone> },
    /// Bytes still in the loop's receive buffer `bid`, sent from there: the
    /// loop keeps that buffer out of the ring until the segment is over.
    Received { ptr: *const u8, len: usize, bid: u16 },
}

// SAFETY: a borrowed pointer is the caller's promise of memory valid until
// `done` runs, usable from the loop thread; the rest is owned data.
unsafe impl Send for Segment {}

impl Segment {
    pub(crate) fn len(&self) -> usize {
        match self {
            Segment::Owned(data) => data.len(),
            Segment::Borrowed { len, .. } | Segment::Received { len, .. } => *len,
        }
    }

    pub(crate) fn as_ptr(&self) -> *const u8 {
        match self {
            Segment::Owned(data) => data.as_ptr(),
            Segment::Borrowed { ptr, .. } | Segment::Received { ptr, .. } => *ptr,
        }
    }

    /// Ends the segment: a borrowed one's callback learns the outcome.
    /// Returns the receive buffer a `Received` segment held, for the loop
    /// to give back to the kernel.
    #[must_use]
    pub(crate) fn finish(self, outcome: io::Result<usize>) -> Option<u16> {
        match self {
            Segment::Borrowed { done: Some(done), .. } => {
                done(outcome);
                None
            }
            Segment::Received { bid, .. } => Some(bid),
            _ => None,
        }
    }
}

/// Output waiting for the loop, shared with every thread that sends.
#[derive(Default)]
pub(crate) struct OutQueue {
    pub(crate) segments: VecDeque<Segment>,
    /// Closing or closed: sends are refused.
    pub(crate) refused: bool,
}

/// How a connection is to end, in increasing force.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum CloseRequest {
    None = 0,
    /// Shut the write side down once queued output is sent.
    ShutdownWrite = 1,
    /// Close once queued output is sent.
    Graceful = 2,
    /// Close now, dropping queued output (the peer sees a reset).
    Abort = 3,
}

impl CloseRequest {
    fn from_u8(value: u8) -> CloseRequest {
        match value {
            1 => CloseRequest::ShutdownWrite,
            2 => CloseRequest::Graceful,
            3 => CloseRequest::Abort,
            _ => CloseRequest::None,
        }
    }
}

/// The part of a connection every thread may touch.
pub(crate) struct ConnShared {
    pub(crate) owner: Arc<LoopShared>,
    pub(crate) slot: u32,
    pub(crate) generation: u32,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) out: Mutex<OutQueue>,
    /// Bytes queued or being sent.
    pub(crate) queued: AtomicUsize,
    /// A `Task::Kick` is on its way to the loop.
    kick_pending: AtomicBool,
    close_request: AtomicU8,
    /// The loop has closed it; `on_close` has run or is running.
    closed: AtomicBool,
    context: AtomicPtr<c_void>,
}

/// A connection handle: cheap to clone, usable from any thread, valid as
/// long as it is held (after the connection closed, operations fail with
/// `ENOTCONN`).
#[derive(Clone)]
pub struct Connection(pub(crate) Arc<ConnShared>);

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection").field("peer", &self.0.peer).field("closed", &self.is_closed()).finish()
    }
}

fn not_connected() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOTCONN)
}

impl Connection {
    pub(crate) fn new(owner: Arc<LoopShared>, slot: u32, generation: u32, peer: Option<SocketAddr>) -> Connection {
        Connection(Arc::new(ConnShared {
            owner,
            slot,
            generation,
            peer,
            out: Mutex::new(OutQueue::default()),
            queued: AtomicUsize::new(0),
            kick_pending: AtomicBool::new(false),
            close_request: AtomicU8::new(CloseRequest::None as u8),
            closed: AtomicBool::new(false),
            context: AtomicPtr::new(std::ptr::null_mut()),
        }))
    }

    /// Queues a copy of `data`; never blocks. Sends from any thread keep
    /// the order in which they were queued. `ENOTCONN` once the connection
    /// is closing or closed.
    pub fn send(&self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return if self.accepts_sends() { Ok(()) } else { Err(not_connected()) };
        }
        // Bytes the application sends straight from the receive buffer it
        // was handed (an echo, a proxy) go out from there, uncopied.
        let received = receive_buffer_holding(self, data);
        {
            let mut out = self.0.out.lock();
            if out.refused {
                if let Some(pin) = received {
                    pin.release();
                }
                return Err(not_connected());
            }
            match (received, out.segments.back_mut()) {
                (Some(pin), _) => out.segments.push_back(pin.segment(data)),
                (None, Some(Segment::Owned(tail))) => tail.extend_from_slice(data),
                (None, _) => out.segments.push_back(Segment::Owned(data.to_vec())),
            }
            self.0.queued.fetch_add(data.len(), Ordering::SeqCst);
        }
        self.kick();
        Ok(())
    }

    /// Queues `len` bytes at `ptr` without copying; `done` runs on the
    /// connection's loop thread once they were sent, or with the error that
    /// ended the connection first. On `Err` (closing or closed, `len` 0)
    /// nothing was queued and `done` does not run.
    ///
    /// # Safety
    /// The memory must stay valid and unchanged until `done` runs.
    pub unsafe fn send_borrowed(&self, ptr: *const u8, len: usize, done: SendDone) -> io::Result<()> {
        if ptr.is_null() || len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        {
            let mut out = self.0.out.lock();
            if out.refused {
                return Err(not_connected());
            }
            out.segments.push_back(Segment::Borrowed { ptr, len, done: Some(done) });
            self.0.queued.fetch_add(len, Ordering::SeqCst);
        }
        self.kick();
        Ok(())
    }

    /// Has the next `len` bytes of the stream put straight into `buf`: the
    /// bytes after those the running `on_data` consumes (its return value),
    /// then, for what has not arrived yet, the kernel receives into `buf`
    /// itself (no copy through the loop's buffers on io_uring or epoll).
    /// `on_data` is not called until `done` has run (right after this
    /// `on_data` returns, when the bytes are there already); the bytes after
    /// the buffer's go to `on_data` as usual. `done` runs exactly once, on the
    /// loop thread (see `RecvDone`), and may call `recv_into` again.
    /// Callable only from this connection's `on_data` or from a `done` of
    /// its own, once per call; after `shutdown_write` too (receiving goes
    /// on). Errors (and `done` does not run): `EINVAL` (null `buf`, `len` 0,
    /// called from anywhere else), `EBUSY` (a second one in the same
    /// callback), `ENOTCONN` (close or abort asked for, or closed).
    ///
    /// # Safety
    /// `buf` must be valid for `len` bytes of writes, and not read or
    /// freed, until `done` runs.
    pub unsafe fn recv_into(&self, buf: *mut u8, len: usize, done: RecvDone) -> io::Result<()> {
        if buf.is_null() || len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // After shutdown_write receiving goes on: only a close refuses.
        if self.is_closed() || self.close_request() as u8 >= CloseRequest::Graceful as u8 {
            return Err(not_connected());
        }
        DELIVERY.with(|d| match d.borrow_mut().as_mut() {
            Some(delivery) if std::ptr::eq(delivery.conn, Arc::as_ptr(&self.0)) => {
                if delivery.request.is_some() {
                    return Err(io::Error::from_raw_os_error(libc::EBUSY));
                }
                delivery.request = Some(RecvInto { buf, len, filled: 0, done });
                Ok(())
            }
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        })
    }

    /// Closes once the queued output is sent, after lingering for the peer
    /// to finish (`ServerOptions::linger`); further sends are refused.
    pub fn close(&self) {
        self.request_close(CloseRequest::Graceful);
    }

    /// Shuts the write side down (the peer sees end of file) once the
    /// queued output is sent; receiving goes on, further sends are refused
    /// (`ENOTCONN`). Once the peer has finished too, the connection closes.
    pub fn shutdown_write(&self) {
        self.request_close(CloseRequest::ShutdownWrite);
    }

    /// Closes now: queued output is dropped (borrowed sends learn it) and
    /// the peer sees a reset.
    pub fn abort(&self) {
        self.request_close(CloseRequest::Abort);
    }

    /// Bytes queued and not yet handed to the kernel.
    pub fn queued_bytes(&self) -> usize {
        self.0.queued.load(Ordering::SeqCst)
    }

    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.0.peer
    }

    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::SeqCst)
    }

    /// A pointer the application keeps with the connection.
    pub fn set_context(&self, context: *mut c_void) {
        self.0.context.store(context, Ordering::SeqCst);
    }

    pub fn context(&self) -> *mut c_void {
        self.0.context.load(Ordering::SeqCst)
    }

    fn accepts_sends(&self) -> bool {
        !self.0.out.lock().refused
    }

    fn request_close(&self, request: CloseRequest) {
        // Output queued from now on could never be sent (the write side
        // shuts once what is queued is out): refused.
        self.0.out.lock().refused = true;
        let previous = self.0.close_request.fetch_max(request as u8, Ordering::SeqCst);
        if previous < request as u8 {
            self.kick();
        }
    }

    /// Tells the owning loop this connection has work; one task at a time.
    fn kick(&self) {
        if !self.0.kick_pending.swap(true, Ordering::SeqCst) {
            self.0.owner.post(Task::Kick(self.clone()));
        }
    }

    /// Runs a block request (read, write, vectored, fsync, fdatasync,
    /// fallocate) on this connection's loop, its callback run on the loop
    /// thread. An io_uring loop submits it with its next batch on its own
    /// ring: from the loop thread (inside a callback) this costs no thread
    /// hop at all. An epoll loop has one of its helper threads (see
    /// `FileHelpers` for how many) run it with blocking calls and then runs
    /// the callback;
    /// if no helper can be started, the callback runs with `EAGAIN`. The
    /// request does not depend on the connection staying open. Refused
    /// (handed back) with `EINVAL` (invalid) or `ESHUTDOWN` (the server
    /// stopped); if the server stops before the loop takes it, its
    /// callback runs with `ESHUTDOWN` on the stopping thread.
    pub fn submit_file<C: crate::tasks::IOCallbackCustom>(
        &self,
        event: Box<crate::tasks::IOEvent<C>>,
    ) -> Result<(), (io::Error, Box<crate::tasks::IOEvent<C>>)> {
        let owner = &self.0.owner;
        let refused = if let Err(errno) = event.validate() {
            Some(errno)
        } else if owner.has_exited() {
            Some(libc::ESHUTDOWN)
        } else {
            None
        };
        if let Some(errno) = refused {
            return Err((io::Error::from_raw_os_error(errno), event));
        }
        owner.post(Task::File(event));
        Ok(())
    }

    // --- for the loop -------------------------------------------------------

    /// The loop takes the kick (before looking at the connection, so a
    /// later send kicks again).
    pub(crate) fn take_kick(&self) {
        self.0.kick_pending.store(false, Ordering::SeqCst);
    }

    pub(crate) fn close_request(&self) -> CloseRequest {
        CloseRequest::from_u8(self.0.close_request.load(Ordering::SeqCst))
    }

    /// Refuses further sends (the loop began closing on its own: an error,
    /// or the server stopping).
    pub(crate) fn refuse_sends(&self) {
        self.0.out.lock().refused = true;
    }

    /// Marks the connection closed and hands back what was still queued.
    pub(crate) fn mark_closed(&self) -> VecDeque<Segment> {
        let mut out = self.0.out.lock();
        out.refused = true;
        self.0.closed.store(true, Ordering::SeqCst);
        self.0.queued.store(0, Ordering::SeqCst);
        std::mem::take(&mut out.segments)
    }
}

/// The receive buffer the io_uring loop on this thread is handing to
/// `on_data` right now, so that sends of those very bytes can keep the
/// buffer instead of copying it (see `Connection::send`).
pub(crate) struct ReceiveWindow {
    /// The loop's task queue: only its own connections may pin its buffers.
    pub(crate) owner: *const LoopShared,
    pub(crate) start: *const u8,
    pub(crate) len: usize,
    pub(crate) bid: u16,
    /// Sends that kept the buffer during this delivery.
    pub(crate) pins: u32,
    /// How many more buffers may be kept (the loop's budget, so that kept
    /// buffers never leave receiving short).
    pub(crate) budget: u32,
}

thread_local! {
    static RECEIVE_WINDOW: std::cell::Cell<Option<ReceiveWindow>> = const { std::cell::Cell::new(None) };
}

/// Runs `deliver` with `window` open for `Connection::send`; returns the
/// window as it ends (its `pins`).
pub(crate) fn with_receive_window(window: ReceiveWindow, deliver: impl FnOnce()) -> ReceiveWindow {
    RECEIVE_WINDOW.with(|w| w.set(Some(window)));
    deliver();
    match RECEIVE_WINDOW.with(|w| w.take()) {
        Some(window) => window,
        None => unreachable!("the receive window is closed only here"),
    }
}

/// A pin taken on the open receive window's buffer.
struct Pin {
    bid: u16,
}

impl Pin {
    fn segment(self, data: &[u8]) -> Segment {
        Segment::Received { ptr: data.as_ptr(), len: data.len(), bid: self.bid }
    }

    fn release(self) {
        RECEIVE_WINDOW.with(|w| {
            if let Some(mut window) = w.take() {
                window.pins -= 1;
                window.budget += 1;
                w.set(Some(window));
            }
        });
    }
}

/// A pin on the receive buffer holding `data`, if the loop on this thread
/// is delivering it to one of its own connections (`conn`) and has budget.
fn receive_buffer_holding(conn: &Connection, data: &[u8]) -> Option<Pin> {
    RECEIVE_WINDOW.with(|w| {
        let mut window = w.take()?;
        let inside = data.as_ptr() >= window.start
            && data.as_ptr() as usize + data.len() <= window.start as usize + window.len
            && std::ptr::eq(window.owner, Arc::as_ptr(&conn.0.owner))
            && window.budget > 0;
        let pin = inside.then(|| {
            window.pins += 1;
            window.budget -= 1;
            Pin { bid: window.bid }
        });
        w.set(Some(window));
        pin
    })
}

/// Output taken from the shared queue for sending: the loop's own, in order.
/// The first `offset` bytes of the front segment have gone out already.
#[derive(Default)]
pub(crate) struct Sending {
    pub(crate) segments: VecDeque<Segment>,
    pub(crate) offset: usize,
}

impl Sending {
    /// Tops up from the shared queue, to at most `max` segments.
    pub(crate) fn refill(&mut self, handle: &Connection, max: usize) {
        if self.segments.len() >= max {
            return;
        }
        let mut out = handle.0.out.lock();
        while self.segments.len() < max {
            match out.segments.pop_front() {
                Some(segment) => self.segments.push_back(segment),
                None => break,
            }
        }
    }

    /// Fills `iov` with what is left to send; returns how many it filled.
    pub(crate) fn iovecs(&self, iov: &mut [libc::iovec]) -> usize {
        let mut n = 0;
        for (i, segment) in self.segments.iter().take(iov.len()).enumerate() {
            let skip = if i == 0 { self.offset } else { 0 };
            // SAFETY: skip < len for the front segment (a finished one is popped):
            // the pointer stays inside the segment.
            iov[i] = libc::iovec {
                iov_base: unsafe { segment.as_ptr().add(skip) } as *mut libc::c_void,
                iov_len: segment.len() - skip,
            };
            n += 1;
        }
        n
    }

    /// Accounts for `bytes` sent: finished segments leave, in order, and
    /// are handed to `finished`.
    pub(crate) fn consume(&mut self, mut bytes: usize, mut finished: impl FnMut(Segment)) {
        while bytes > 0 {
            let Some(front) = self.segments.front() else { break };
            let left = front.len() - self.offset;
            if bytes < left {
                self.offset += bytes;
                return;
            }
            bytes -= left;
            self.offset = 0;
            if let Some(segment) = self.segments.pop_front() {
                finished(segment);
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }
}

/// What the loop keeps for a connection; touched by the loop thread only.
pub(crate) struct ConnState {
    pub(crate) fd: RawFd,
    pub(crate) handle: Connection,
    /// Bytes the application has not consumed yet.
    pub(crate) input: Vec<u8>,
    /// A receive into the application's buffer, waiting for its bytes.
    into: Option<RecvInto>,
    /// Above `high_water` and the callback ran; re-armed below it.
    pub(crate) above_high_water: bool,
    /// Output went out since the queue was last empty (write-complete due).
    pub(crate) wrote: bool,
    /// The peer shut its side down.
    pub(crate) eof: bool,
    /// Our write side is shut down.
    pub(crate) write_shut: bool,
    /// A graceful close is waiting for the peer to finish (see `linger`):
    /// what arrives is dropped, no callbacks run but `on_close`.
    pub(crate) lingering: bool,
    /// Closing has begun: no more callbacks but `on_close`.
    pub(crate) closing: bool,
    /// The errno that ends the connection, reported by `on_close`.
    pub(crate) error: i32,
}

impl ConnState {
    pub(crate) fn new(fd: RawFd, handle: Connection) -> ConnState {
        ConnState {
            fd,
            handle,
            input: Vec::new(),
            into: None,
            above_high_water: false,
            wrote: false,
            eof: false,
            write_shut: false,
            lingering: false,
            closing: false,
            error: 0,
        }
    }

    /// Whether the application has heard the last of this connection but
    /// for on_close (and borrowed sends' done): it is closing, lingering, or
    /// the application asked to close it (from any thread, so data or end
    /// of file the loop meets after that call is not handed over).
    pub(crate) fn silent(&self) -> bool {
        self.closing || self.lingering || self.handle.close_request() as u8 >= CloseRequest::Graceful as u8
    }

    /// Hands received bytes to the application: to a buffer it gave
    /// `recv_into`, else to on_data, straight from `data` when nothing was
    /// left over, else after the kept tail. Keeps what it did not consume.
    pub(crate) fn deliver(&mut self, handler: &dyn ServerHandler, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.input.is_empty() {
            let left = self.consume(handler, data);
            if left > 0 {
                self.input.extend_from_slice(&data[data.len() - left..]);
            }
        } else {
            let mut input = std::mem::take(&mut self.input);
            input.extend_from_slice(data);
            let left = self.consume(handler, &input);
            input.drain(..input.len() - left);
            // An idle connection keeps no input memory.
            if !input.is_empty() {
                self.input = input;
            }
        }
    }

    /// Feeds `data` to the receive into a buffer, if one waits, and to
    /// on_data; returns how many bytes at its end on_data left for later.
    fn consume(&mut self, handler: &dyn ServerHandler, mut data: &[u8]) -> usize {
        loop {
            if data.is_empty() || self.silent() {
                return 0;
            }
            if let Some(into) = self.into.as_mut() {
                let taken = into.take_from(data);
                data = &data[taken..];
                if into.is_full() {
                    self.finish_into(None);
                }
                continue;
            }
            let handle = &self.handle;
            let (outcome, request) = with_delivery(handle, || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.on_data(handle, data)))
            });
            let used = match outcome {
                Ok(used) => used.min(data.len()),
                Err(_) => {
                    // A Rust handler's bug: contained as `guarded` does; the
                    // bytes count as consumed, and a buffer it gave is not
                    // filled with bytes meant for later (its done is told).
                    eprintln!("ioengine: a server callback panicked; the panic was contained");
                    if let Some(request) = request {
                        self.into = Some(request);
                        self.abandon_into(libc::ECANCELED);
                    }
                    return 0;
                }
            };
            data = &data[used..];
            match request {
                Some(request) => self.into = Some(request),
                None => return data.len(),
            }
        }
    }

    /// Runs the done of the receive into a buffer: with its length
    /// (`error` None) or the error. The done may ask for the next one.
    fn finish_into(&mut self, error: Option<i32>) {
        let Some(into) = self.into.take() else { return };
        let outcome = match error {
            None => Ok(into.len),
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
        };
        let (done, handle) = (into.done, &self.handle);
        let ((), request) = with_delivery(handle, || guarded((), || done(handle, outcome)));
        self.into = request;
    }

    /// Where the kernel should receive next: the missing part of the
    /// application's buffer, while one waits and the connection listens.
    pub(crate) fn receiving_into(&self) -> Option<(*mut u8, usize)> {
        let into = self.into.as_ref()?;
        if self.silent() || self.eof {
            return None;
        }
        // SAFETY: filled < len while the receive waits: inside the buffer.
        Some((unsafe { into.buf.add(into.filled) }, into.len - into.filled))
    }

    /// The kernel put `bytes` into the buffer `receiving_into` gave.
    pub(crate) fn received_into(&mut self, bytes: usize) {
        let Some(into) = self.into.as_mut() else { return };
        into.filled = (into.filled + bytes).min(into.len);
        if into.is_full() {
            self.finish_into(None);
        }
    }

    /// The peer finished sending (end of file): a receive into a buffer
    /// ends unfilled and on_eof runs. Returns whether both directions are
    /// now done (our write side was shut already), so the loop closes.
    pub(crate) fn peer_finished(&mut self, handler: &dyn ServerHandler) -> bool {
        self.eof = true;
        // Closed by the application while it waited: cancelled, not cut short.
        self.abandon_into(if self.silent() { libc::ECANCELED } else { libc::ECONNRESET });
        if !self.silent() {
            guarded((), || handler.on_eof(&self.handle));
        }
        self.write_shut && !self.closing
    }

    /// The receive into a buffer ends unfilled (end of file, close): its
    /// done learns `errno`, and may not ask for another (nothing more can
    /// arrive).
    pub(crate) fn abandon_into(&mut self, errno: i32) {
        if let Some(into) = self.into.take() {
            let handle = &self.handle;
            guarded((), || (into.done)(handle, Err(io::Error::from_raw_os_error(errno))));
        }
    }

    /// Runs the high-water and write-complete callbacks that are due.
    pub(crate) fn output_callbacks(&mut self, handler: &dyn ServerHandler, high_water: usize, idle: bool) {
        if self.silent() {
            return;
        }
        let queued = self.handle.queued_bytes();
        if queued >= high_water && !self.above_high_water {
            self.above_high_water = true;
            guarded((), || handler.on_high_water(&self.handle, queued));
        } else if queued < high_water {
            self.above_high_water = false;
        }
        if idle && self.wrote && queued == 0 {
            self.wrote = false;
            guarded((), || handler.on_write_complete(&self.handle));
        }
    }

    /// After a loop has pushed output along: runs the output callbacks and,
    /// once nothing is queued or in flight, carries out a close or
    /// shutdown_write request. Both loops share this so the close rules are
    /// one. `linger`: a graceful close lingers (see `linger`).
    pub(crate) fn settle_output(
        &mut self,
        handler: &dyn ServerHandler,
        high_water: usize,
        idle: bool,
        linger: bool,
    ) -> Settled {
        self.output_callbacks(handler, high_water, idle);
        if !idle || self.handle.queued_bytes() != 0 || self.lingering {
            return Settled::Open;
        }
        match self.handle.close_request() {
            // With the peer's end of file seen nothing more can arrive: a
            // close now cannot reset.
            CloseRequest::Graceful if self.eof || !linger => Settled::Close,
            CloseRequest::Graceful => {
                self.shut_write();
                self.lingering = true;
                Settled::Linger
            }
            CloseRequest::ShutdownWrite if !self.write_shut => {
                self.shut_write();
                // With end of file already seen both directions are done:
                // nothing can happen any more.
                if self.eof {
                    Settled::Close
                } else {
                    Settled::Open
                }
            }
            _ => Settled::Open,
        }
    }

    fn shut_write(&mut self) {
        if !self.write_shut {
            self.write_shut = true;
            // SAFETY: shutdown(2) on the connection's open descriptor.
            unsafe { libc::shutdown(self.fd, libc::SHUT_WR) };
        }
    }
}

/// What a loop does with a connection after `settle_output`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Nothing to do.
    Open,
    /// Close it (no reset: a requested or completed end).
    Close,
    /// It began lingering: the loop starts its clock.
    Linger,
}

/// Runs an application callback. A panic (a bug in a Rust handler) is
/// reported and contained, so the loop and its other connections go on;
/// `fallback` stands for the callback's result.
pub(crate) fn guarded<R>(fallback: R, callback: impl FnOnce() -> R) -> R {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(callback)).unwrap_or_else(|_| {
        eprintln!("ioengine: a server callback panicked; the panic was contained");
        fallback
    })
}

/// Output of all connections' queues, released when bytes were sent.
pub(crate) fn sent(handle: &Connection, bytes: usize) {
    handle.0.queued.fetch_sub(bytes, Ordering::SeqCst);
}

/// A loop's connections (and its file operations): slots reused through a free list, each reuse with
/// a new generation (never 0, which loop-level operations use), so that a
/// late completion or event for a slot's earlier connection is recognised.
pub(crate) struct ConnTable<T> {
    slots: Vec<Option<T>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    live: usize,
}

impl<T> ConnTable<T> {
    pub(crate) fn new() -> Self {
        ConnTable { slots: Vec::new(), generations: Vec::new(), free: Vec::new(), live: 0 }
    }

    /// Gives back a slot from `reserve` that no connection took.
    pub(crate) fn unreserve(&mut self, slot: u32) {
        self.free.push(slot);
    }

    /// A free slot and the generation of the connection that will take it.
    pub(crate) fn reserve(&mut self) -> (u32, u32) {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                self.generations.push(0);
                (self.slots.len() - 1) as u32
            }
        };
        let generation = match (self.generations[slot as usize] + 1) & crate::net::op::GENERATION_MASK {
            0 => 1,
            g => g,
        };
        self.generations[slot as usize] = generation;
        (slot, generation)
    }

    /// Fills a slot from `reserve`.
    pub(crate) fn fill(&mut self, slot: u32, value: T) {
        self.slots[slot as usize] = Some(value);
        self.live += 1;
    }

    /// The connection in `slot` if it is still the one of `generation`.
    pub(crate) fn get(&mut self, slot: u32, generation: u32) -> Option<&mut T> {
        if self.generations.get(slot as usize) != Some(&generation) {
            return None;
        }
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    pub(crate) fn slot(&mut self, slot: u32) -> Option<&mut T> {
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    /// Empties a slot for reuse.
    pub(crate) fn remove(&mut self, slot: u32) -> Option<T> {
        let value = self.slots.get_mut(slot as usize)?.take()?;
        self.free.push(slot);
        self.live -= 1;
        Some(value)
    }

    pub(crate) fn live(&self) -> usize {
        self.live
    }

    pub(crate) fn capacity(&self) -> u32 {
        self.slots.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_slot_gets_a_new_generation() {
        let mut table = ConnTable::new();
        let (slot, first) = table.reserve();
        table.fill(slot, "a");
        assert_eq!(table.get(slot, first), Some(&mut "a"));
        assert_eq!(table.remove(slot), Some("a"));
        let (again, second) = table.reserve();
        table.fill(again, "b");
        assert_eq!(again, slot);
        assert_ne!(first, second);
        assert_eq!(table.get(slot, first), None, "a stale generation reached the new connection");
        assert_eq!(table.live(), 1);
    }

    /// A handler for the receive-into tests: `b'L', n` asks for the next
    /// `n` bytes in `buf`; any other byte is taken as plain data.
    struct IntoHandler {
        buf: Mutex<Vec<u8>>,
        plain: Mutex<Vec<u8>>,
        outcomes: Arc<Mutex<Vec<Result<usize, i32>>>>,
    }

    impl ServerHandler for IntoHandler {
        fn on_data(&self, conn: &Connection, data: &[u8]) -> usize {
            let plain = data.iter().take_while(|&&b| b != b'L' && b != b'P').count();
            self.plain.lock().extend_from_slice(&data[..plain]);
            let data = &data[plain..];
            if data.first() == Some(&b'P') {
                // A handler bug after giving a buffer.
                let outcomes = self.outcomes.clone();
                let done: RecvDone = Box::new(move |_, outcome| {
                    outcomes.lock().push(outcome.map_err(|e| e.raw_os_error().unwrap_or(0)))
                });
                let mut buf = self.buf.lock();
                *buf = vec![0; 4];
                // SAFETY: the buffer lives in the handler; it is never filled.
                unsafe { conn.recv_into(buf.as_mut_ptr(), 4, done) }.expect("asked from on_data");
                drop(buf);
                panic!("a handler bug (expected by the test)");
            }
            if data.len() < 2 {
                return plain;
            }
            let len = data[1] as usize;
            let mut buf = self.buf.lock();
            *buf = vec![0; len];
            let outcomes = self.outcomes.clone();
            let done: RecvDone =
                Box::new(move |_, outcome| outcomes.lock().push(outcome.map_err(|e| e.raw_os_error().unwrap_or(0))));
            // SAFETY: the buffer lives in the handler, untouched until done runs.
            unsafe { conn.recv_into(buf.as_mut_ptr(), len, done) }.expect("asked from on_data");
            let busy: RecvDone = Box::new(|_, _| {});
            // SAFETY: refused, so never written.
            let again = unsafe { conn.recv_into(buf.as_mut_ptr(), len, busy) };
            assert_eq!(again.map_err(|e| e.raw_os_error()), Err(Some(libc::EBUSY)));
            plain + 2
        }
    }

    #[test]
    fn a_receive_into_a_buffer_takes_the_bytes_after_those_consumed_and_hands_back_the_rest() {
        let shared = LoopShared::new().expect("eventfd");
        let conn = Connection::new(shared, 1, 1, None);
        let handler = IntoHandler {
            buf: Mutex::new(Vec::new()),
            plain: Mutex::new(Vec::new()),
            outcomes: Arc::new(Mutex::new(Vec::new())),
        };
        let mut state = ConnState::new(-1, conn.clone());
        // Not from on_data: refused.
        let mut byte = 0u8;
        // SAFETY: refused, so never written.
        let outside = unsafe { conn.recv_into(&mut byte, 1, Box::new(|_, _| {})) };
        assert_eq!(outside.map_err(|e| e.raw_os_error()), Err(Some(libc::EINVAL)));

        // The header split across deliveries; two payload bytes come with it.
        state.deliver(&handler, b"xL");
        state.deliver(&handler, b"\x05ab");
        let (ptr, missing) = state.receiving_into().expect("waiting for three bytes");
        assert_eq!(missing, 3);
        assert_eq!(ptr, handler.buf.lock().as_mut_ptr().wrapping_add(2));
        // The kernel puts one byte in; the rest and two more bytes arrive.
        // SAFETY: the missing part of the buffer, as receiving_into gave it.
        unsafe { *ptr = b'c' };
        state.received_into(1);
        state.deliver(&handler, b"deyz");
        assert!(state.receiving_into().is_none());
        assert_eq!(&handler.buf.lock()[..], b"abcde");
        assert_eq!(&handler.outcomes.lock()[..], &[Ok(5)]);
        assert_eq!(&handler.plain.lock()[..], b"xyz");

        // The peer stops halfway: the done learns ECONNRESET, once.
        state.deliver(&handler, b"L\x04q");
        assert_eq!(state.receiving_into().map(|(_, missing)| missing), Some(3));
        state.abandon_into(libc::ECONNRESET);
        state.abandon_into(libc::ECONNRESET);
        assert_eq!(&handler.outcomes.lock()[..], &[Ok(5), Err(libc::ECONNRESET)]);
        assert!(state.input.is_empty());

        // on_data panics after giving a buffer: its done is told, and the
        // next bytes go to on_data, not into the buffer.
        state.deliver(&handler, b"P");
        assert_eq!(&handler.outcomes.lock()[..], &[Ok(5), Err(libc::ECONNRESET), Err(libc::ECANCELED)]);
        assert!(state.receiving_into().is_none());
        state.deliver(&handler, b"ok");
        assert_eq!(&handler.plain.lock()[..], b"xyzok");
    }
}
