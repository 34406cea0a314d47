//! The epoll event loop: the same server where io_uring cannot run
//! (disabled by sysctl or seccomp, or an old kernel). Level-triggered
//! readiness; one read per readable connection and event, into the loop's
//! buffer (handed to the application borrowed, as the io_uring loop hands
//! out its ring buffers); sends go straight out while the socket takes
//! them and wait for EPOLLOUT when it does not. The task queue, the
//! connection table, the output queue and the callbacks are the io_uring
//! loop's. Block requests (`Connection::submit_file`) go to helper
//! threads, which post them back for their callbacks.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::net::acceptor::dispatch;
use crate::net::connection::{
    guarded, sent, CloseRequest, ConnState, ConnTable, Connection, Sending, ServerHandler, Settled,
};
use crate::net::event_loop::{LoopShared, Task};
use crate::net::linger::{self, LingerQueue};
use crate::net::loop_pool::{Admission, LoopPool};
use crate::net::op::file::FileHelpers;
use crate::net::op::send::MAX_SEGMENTS;
use crate::net::op::{accept, OpKind, OpTag};
use crate::net::{socket, NetOptions};

/// Most events taken by one epoll_wait.
const MAX_EVENTS: usize = 256;
/// Bytes one read of a connection takes at most.
const READ_BUFFER: usize = 64 << 10;
/// Connections accepted per readiness of the listener before other work.
const ACCEPT_BATCH: usize = 64;
/// Pause after EMFILE/ENFILE before accepting again.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

struct EpollConn {
    state: ConnState,
    /// Output taken for sending, in order.
    sending: Sending,
    /// EPOLLOUT is wanted (the socket refused more).
    want_write: bool,
}

/// The accepting side of the main loop.
struct EpollAcceptor {
    listener: OwnedFd,
    pool: Arc<LoopPool>,
    /// Accepting resumes at this time (after EMFILE); the listener is out of
    /// the epoll set meanwhile.
    paused_until: Option<Instant>,
}

pub(crate) struct EpollLoop {
    epoll: OwnedFd,
    shared: Arc<LoopShared>,
    handler: Arc<dyn ServerHandler>,
    opts: Arc<NetOptions>,
    conns: ConnTable<EpollConn>,
    acceptor: Option<EpollAcceptor>,
    read_buf: Box<[u8]>,
    /// Lingering closes, oldest first (epoll_wait's timeout covers the oldest).
    lingering: LingerQueue,
    /// Block requests (`Connection::submit_file`), run by helper threads.
    files: FileHelpers,
    stopping: bool,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl EpollLoop {
    pub(crate) fn new(
        shared: Arc<LoopShared>,
        handler: Arc<dyn ServerHandler>,
        opts: Arc<NetOptions>,
        acceptor: Option<(OwnedFd, Arc<LoopPool>)>,
    ) -> io::Result<EpollLoop> {
        // SAFETY: plain epoll_create1(2).
        let raw = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: a new descriptor that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(raw) };
        let event_loop = EpollLoop {
            epoll,
            shared,
            handler,
            conns: ConnTable::new(),
            acceptor: acceptor.map(|(listener, pool)| EpollAcceptor { listener, pool, paused_until: None }),
            read_buf: vec![0u8; READ_BUFFER].into_boxed_slice(),
            lingering: LingerQueue::new(opts.linger),
            opts,
            files: FileHelpers::default(),
            stopping: false,
        };
        event_loop.control(
            libc::EPOLL_CTL_ADD,
            event_loop.shared.wake_fd(),
            libc::EPOLLIN as u32,
            OpTag::loop_op(OpKind::Wake),
        )?;
        if let Some(fd) = event_loop.acceptor.as_ref().map(|a| a.listener.as_raw_fd()) {
            event_loop.control(libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32, OpTag::loop_op(OpKind::Accept))?;
        }
        Ok(event_loop)
    }

    fn control(&self, op: libc::c_int, fd: RawFd, events: u32, tag: OpTag) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: tag.encode() };
        // SAFETY: epoll_ctl on our epoll descriptor with an event on our stack.
        check(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) }).map(drop)
    }

    /// Runs the loop until it is stopped and every connection is closed.
    pub(crate) fn run(mut self) {
        let _mark = self.shared.enter();
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
        loop {
            self.drain_tasks();
            if self.stopping && self.conns.live() == 0 && self.files.idle() {
                break;
            }
            let timeout = self.wait_timeout();
            // SAFETY: `events` has room for MAX_EVENTS entries.
            let n =
                unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), MAX_EVENTS as i32, timeout) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                eprintln!("ioengine: internal error: epoll_wait failed: {err}; aborting");
                std::process::abort();
            }
            for event in &events[..n as usize] {
                let (flags, data) = (event.events, event.u64);
                let Some(tag) = OpTag::decode(data) else { continue };
                match tag.kind {
                    OpKind::Wake => self.on_wake(),
                    OpKind::Accept => self.accept_ready(),
                    _ => self.on_conn_event(tag, flags),
                }
            }
            self.resume_accepting();
            self.end_expired_lingering();
        }
        if let Some(acceptor) = self.acceptor.take() {
            drop(acceptor.listener);
        }
    }

    fn on_wake(&mut self) {
        let mut count = 0u64;
        // SAFETY: an 8-byte read of our eventfd into our stack.
        let _ = unsafe { libc::read(self.shared.wake_fd(), &mut count as *mut u64 as *mut libc::c_void, 8) };
        self.shared.woken();
    }

    fn drain_tasks(&mut self) {
        while let Some(task) = self.shared.next_task() {
            match task {
                Task::Adopt(fd) => self.adopt(fd),
                Task::Kick(conn) => {
                    conn.take_kick();
                    let (slot, generation) = (conn.0.slot, conn.0.generation);
                    if self.conns.get(slot, generation).is_some() {
                        self.pump(slot);
                    }
                }
                Task::Stop => self.stop(),
                Task::File(op) => self.files.start(op, &self.shared),
                // On the loop thread: the callback may send on its
                // connections (no wake-up) and submit more file operations.
                Task::FileDone(op) => self.files.done(op).finish(),
            }
        }
    }

    fn stop(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        if let Some(acceptor) = self.acceptor.take() {
            if acceptor.paused_until.is_none() {
                let _ =
                    self.control(libc::EPOLL_CTL_DEL, acceptor.listener.as_raw_fd(), 0, OpTag::loop_op(OpKind::Accept));
            }
        }
        self.lingering.clear();
        for slot in 0..self.conns.capacity() {
            match self.conns.slot(slot) {
                // Its output is out and its close was asked for: no reset.
                Some(c) if c.state.lingering => self.close(slot, 0, false),
                Some(_) => self.close(slot, libc::ECANCELED, true),
                None => {}
            }
        }
    }

    // --- accepting ---------------------------------------------------------

    /// epoll_wait's timeout: until accepting resumes or the oldest
    /// lingering connection's time is up, whichever comes first; -1 for none.
    fn wait_timeout(&self) -> i32 {
        let paused = self.acceptor.as_ref().and_then(|a| a.paused_until);
        let deadline = match (paused, self.lingering.next_deadline()) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(deadline) => deadline,
                None => return -1,
            },
        };
        // Rounded up, so the loop does not wake just before the deadline.
        linger::until(deadline).as_millis().min(i32::MAX as u128 - 1) as i32 + 1
    }

    /// Closes the lingering connections whose time is up.
    fn end_expired_lingering(&mut self) {
        for (slot, generation) in self.lingering.take_expired(Instant::now()) {
            if self.conns.get(slot, generation).is_some_and(|c| c.state.lingering) {
                self.close(slot, 0, false);
            }
        }
    }

    fn resume_accepting(&mut self) {
        let Some(acceptor) = self.acceptor.as_mut() else { return };
        match acceptor.paused_until {
            Some(until) if Instant::now() >= until => {
                acceptor.paused_until = None;
                let fd = acceptor.listener.as_raw_fd();
                let _ = self.control(libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32, OpTag::loop_op(OpKind::Accept));
            }
            _ => {}
        }
    }

    fn accept_ready(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            let Some(acceptor) = self.acceptor.as_mut() else { return };
            let listener = acceptor.listener.as_raw_fd();
            // SAFETY: accept4 on our listening socket; no address wanted.
            let raw = unsafe {
                libc::accept4(
                    listener,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if raw < 0 {
                let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
                if accept::is_resource_error(errno) {
                    // Out of descriptors: stop watching the listener for a while.
                    acceptor.paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    self.shared.counters.accept_pauses.fetch_add(1, Ordering::Relaxed);
                    let _ = self.control(libc::EPOLL_CTL_DEL, listener, 0, OpTag::loop_op(OpKind::Accept));
                    return;
                }
                if errno != libc::EAGAIN && !accept::is_connection_error(errno) {
                    eprintln!("ioengine: accept failed: {}", io::Error::from_raw_os_error(errno));
                }
                if errno == libc::EAGAIN || !accept::is_connection_error(errno) {
                    return;
                }
                continue;
            }
            // SAFETY: accept4 just created this descriptor for us.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            self.shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
            if let Some(admission) = dispatch(&acceptor.pool, fd, &self.shared, &self.opts) {
                self.adopt(admission);
            }
        }
    }

    // --- connections -------------------------------------------------------

    fn adopt(&mut self, admission: Admission) {
        if self.stopping {
            return; // dropping the admission closes and counts it
        }
        let (slot, generation) = self.conns.reserve();
        let raw = admission.raw_fd();
        let tag = OpTag::conn_op(OpKind::Recv, slot, generation);
        if self.control(libc::EPOLL_CTL_ADD, raw, (libc::EPOLLIN | libc::EPOLLRDHUP) as u32, tag).is_err() {
            self.conns.unreserve(slot);
            return; // as above
        }
        std::mem::forget(admission.take()); // the table owns it now; closed in `close`
        if self.opts.nodelay {
            let _ = socket::set_int_option(raw, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
        }
        let handle = Connection::new(self.shared.clone(), slot, generation, socket::peer_addr(raw));
        self.conns.fill(
            slot,
            EpollConn { state: ConnState::new(raw, handle.clone()), sending: Sending::default(), want_write: false },
        );
        guarded((), || self.handler.on_connect(&handle));
        self.pump(slot);
    }

    fn on_conn_event(&mut self, tag: OpTag, flags: u32) {
        let Some(c) = self.conns.get(tag.slot, tag.generation) else { return };
        if c.state.eof && flags & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
            // After end of file epoll keeps reporting HUP/ERR (they cannot be
            // masked): the connection is over, with the socket's error if any.
            let error = socket::pending_error(c.state.fd);
            self.close(tag.slot, error, error != 0);
            return;
        }
        if flags & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
            self.read_ready(tag.slot);
        }
        if flags & libc::EPOLLOUT as u32 != 0 {
            self.pump(tag.slot);
        }
    }

    fn read_ready(&mut self, slot: u32) {
        let handler = self.handler.clone();
        let Some(c) = self.conns.slot(slot) else { return };
        if c.state.eof || c.state.closing {
            return;
        }
        // The application's buffer when it waits for bytes (recv_into),
        // else the loop's.
        let into = c.state.receiving_into();
        let (buf, len) = into.unwrap_or((self.read_buf.as_mut_ptr(), self.read_buf.len()));
        // SAFETY: a read into a buffer of that length: the loop's own, or
        // the application's, valid until its done runs.
        let n = unsafe { libc::read(c.state.fd, buf as *mut libc::c_void, len) };
        if n > 0 && into.is_some() {
            c.state.received_into(n as usize);
        } else if n > 0 {
            c.state.deliver(&*handler, &self.read_buf[..n as usize]);
        } else if n == 0 {
            // No more reads: stop watching for them (EPOLLOUT stays if wanted).
            let events = if c.want_write { libc::EPOLLOUT as u32 } else { 0 };
            let (fd, generation) = (c.state.fd, c.state.handle.0.generation);
            let _ = self.control(libc::EPOLL_CTL_MOD, fd, events, OpTag::conn_op(OpKind::Recv, slot, generation));
            let Some(c) = self.conns.slot(slot) else { return };
            if c.state.peer_finished(&*handler) {
                // Both directions are done: nothing can happen any more.
                self.close(slot, 0, false);
                return;
            }
        } else {
            let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
            if errno != libc::EAGAIN && errno != libc::EINTR {
                self.close(slot, errno, true);
                return;
            }
        }
        self.pump(slot);
    }

    /// Moves a connection along: close requests, sends, callbacks.
    fn pump(&mut self, slot: u32) {
        let handler = self.handler.clone();
        let high_water = self.opts.high_water;
        let Some(c) = self.conns.slot(slot) else { return };
        if c.state.closing {
            return;
        }
        if c.state.handle.close_request() == CloseRequest::Abort {
            self.close(slot, 0, true);
            return;
        }
        if let Err(errno) = self.flush(slot) {
            self.close(slot, errno, true);
            return;
        }
        let linger = self.lingering.enabled();
        let Some(c) = self.conns.slot(slot) else { return };
        let idle = c.sending.is_empty();
        match c.state.settle_output(&*handler, high_water, idle, linger) {
            Settled::Open => {}
            Settled::Close => self.close(slot, 0, false),
            Settled::Linger => {
                let generation = c.state.handle.0.generation;
                self.shared.counters.lingering.fetch_add(1, Ordering::Relaxed);
                self.lingering.push(slot, generation);
            }
        }
    }

    /// Sends queued output until the socket refuses more (then EPOLLOUT is
    /// watched) or nothing is left. Err: the errno that ended the connection.
    fn flush(&mut self, slot: u32) -> Result<(), i32> {
        let Some(c) = self.conns.slot(slot) else { return Ok(()) };
        loop {
            c.sending.refill(&c.state.handle, MAX_SEGMENTS);
            if c.sending.is_empty() {
                break;
            }
            // Every queued piece in one sendmsg (up to MAX_SEGMENTS).
            let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_SEGMENTS];
            let count = c.sending.iovecs(&mut iov);
            // SAFETY: msghdr is a plain C struct; all-zero is valid.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = count;
            // SAFETY: sendmsg(2) from iovecs into segments we own for the call;
            // MSG_NOSIGNAL: EPIPE, not SIGPIPE.
            let n = unsafe { libc::sendmsg(c.state.fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
            if n < 0 {
                let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
                if errno == libc::EINTR {
                    continue;
                }
                if errno == libc::EAGAIN {
                    break;
                }
                return Err(errno);
            }
            let n = n as usize;
            sent(&c.state.handle, n);
            c.state.wrote = true;
            // No receive buffers are kept on epoll: finishing frees nothing more.
            c.sending.consume(n, |segment| {
                let len = segment.len();
                let _ = segment.finish(Ok(len));
            });
        }
        // Watch EPOLLOUT only while output waits for the socket.
        let want_write = !c.sending.is_empty();
        if want_write != c.want_write {
            c.want_write = want_write;
            let mut events = if c.state.eof { 0 } else { (libc::EPOLLIN | libc::EPOLLRDHUP) as u32 };
            if want_write {
                events |= libc::EPOLLOUT as u32;
            }
            let (fd, generation) = (c.state.fd, c.state.handle.0.generation);
            let _ = self.control(libc::EPOLL_CTL_MOD, fd, events, OpTag::conn_op(OpKind::Recv, slot, generation));
        }
        Ok(())
    }

    /// Closes a connection at once: nothing is in flight in the kernel on
    /// epoll. `abortive`: the peer sees a reset, queued output is dropped.
    fn close(&mut self, slot: u32, error: i32, abortive: bool) {
        let Some(mut c) = self.conns.remove(slot) else { return };
        let fd = c.state.fd;
        let _ = self.control(libc::EPOLL_CTL_DEL, fd, 0, OpTag::loop_op(OpKind::Wake));
        if abortive && error != libc::ECONNRESET && error != libc::EPIPE {
            socket::set_reset_on_close(fd);
        }
        // SAFETY: the descriptor is ours (adopted from the acceptor).
        unsafe { libc::close(fd) };
        if c.state.lingering {
            self.shared.counters.lingering.fetch_sub(1, Ordering::Relaxed);
        }
        c.state.abandon_into(if error != 0 { error } else { libc::ECANCELED });
        let outcome = || Err(io::Error::from_raw_os_error(if error != 0 { error } else { libc::ECANCELED }));
        for segment in c.sending.segments {
            let _ = segment.finish(outcome());
        }
        for segment in c.state.handle.mark_closed() {
            let _ = segment.finish(outcome());
        }
        // Counted out first: once on_close runs, the stats and
        // max_connections no longer see it.
        self.opts.release(&self.shared);
        guarded((), || self.handler.on_close(&c.state.handle, error));
    }
}
