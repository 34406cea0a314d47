//! EventLoop (seed 3.2): one thread, one io_uring that only it touches,
//! waiting for completions until stopped. Other threads hand it work
//! through a task queue and wake it with an eventfd whose read stays armed
//! on the ring.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam::queue::SegQueue;
use io_uring::squeue::Entry;
use io_uring::IoUring;

use crate::net::acceptor::{AcceptOutcome, Acceptor};
use crate::net::buf_ring::BufRing;
use crate::net::connection::{
    guarded, sent, with_receive_window, CloseRequest, ConnState, ConnTable, Connection, ReceiveWindow, Segment,
    Sending, ServerHandler, Settled,
};
use crate::net::eof_watch::EofWatch;
use crate::net::linger::{self, LingerQueue};
use crate::net::loop_pool::Admission;
use crate::net::op::{accept, cancel, recv, send, timer, OpKind, OpTag};
use crate::net::NetOptions;
use crate::ring::{probe_opcodes, setup, RingConfig};

thread_local! {
    /// The loop running on this thread (0 if none).
    static CURRENT_LOOP: Cell<usize> = const { Cell::new(0) };
}

/// Work handed to a loop.
pub(crate) enum Task {
    /// A new connection for this loop.
    Adopt(Admission),
    /// A connection of this loop has output or a close request.
    Kick(Connection),
    /// Close every connection and end the loop.
    Stop,
    /// A block request to run (on the ring, or by the epoll loop's helpers).
    File(crate::net::op::file::FileOp),
    /// A block request an epoll loop's helper has run: its callback is due.
    FileDone(crate::net::op::file::FileOp),
}

/// Counters of one loop, readable from any thread.
#[derive(Default)]
pub(crate) struct LoopCounters {
    pub(crate) live: AtomicUsize,
    pub(crate) accepted: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) cq_overflows: AtomicU64,
    pub(crate) recv_starved: AtomicU64,
    pub(crate) accept_pauses: AtomicU64,
    /// Connections lingering now (a gauge).
    pub(crate) lingering: AtomicUsize,
}

/// The part of a loop other threads use: its task queue and wake-up.
pub(crate) struct LoopShared {
    tasks: SegQueue<Task>,
    /// eventfd: written by other threads, read by an armed read on the ring
    /// (io_uring) or watched by epoll. Closed when the server stops (this
    /// outlives the loop: stats, and connection handles users keep); the
    /// lock keeps a poster from writing to the number once it is closed and
    /// maybe reused. Posters take it only to write a wake-up.
    wake: parking_lot::RwLock<Option<OwnedFd>>,
    /// The descriptor, for the loop's own thread while it runs.
    wake_raw: RawFd,
    /// A wake-up is on its way: later posters need not write the eventfd.
    notified: AtomicBool,
    /// The loop has ended: tasks posted from now on are dropped (a task may
    /// hold a connection, which holds this: keeping it would be a cycle).
    exited: AtomicBool,
    pub(crate) counters: LoopCounters,
}

impl LoopShared {
    pub(crate) fn new() -> io::Result<Arc<LoopShared>> {
        // SAFETY: plain eventfd(2).
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Arc::new(LoopShared {
            tasks: SegQueue::new(),
            wake_raw: wake.as_raw_fd(),
            wake: parking_lot::RwLock::new(Some(wake)),
            notified: AtomicBool::new(false),
            exited: AtomicBool::new(false),
            counters: LoopCounters::default(),
        }))
    }

    /// Queues a task for the loop; wakes it unless called on the loop's own
    /// thread (which drains its queue before it waits) or a wake-up is
    /// already on its way. Never blocks.
    pub(crate) fn post(&self, task: Task) {
        self.tasks.push(task);
        // The push, then the check; `close` stores, then drains. Without
        // the fences on both sides each could miss the other (the queue's
        // own ordering is acquire/release): a task left in the queue of an
        // ended loop holds its connection, which holds the loop: a leak.
        fence(Ordering::SeqCst);
        if self.exited.load(Ordering::SeqCst) {
            // Either the loop's last drain saw this task or this sees `exited`.
            self.drop_tasks();
            return;
        }
        if self.is_current() {
            return;
        }
        if !self.notified.swap(true, Ordering::SeqCst) {
            let wake = self.wake.read();
            if let Some(fd) = wake.as_ref() {
                let one: u64 = 1;
                // SAFETY: an 8-byte write from our stack to our eventfd (open while
                // the read lock is held); it can only fail with EAGAIN when the
                // counter is saturated, and then the loop is woken anyway.
                let _ = unsafe { libc::write(fd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
            }
        }
    }

    /// For the loop's own thread, which runs before `close`.
    pub(crate) fn wake_fd(&self) -> RawFd {
        self.wake_raw
    }

    /// The loop took the wake-up: posts from now on wake it again. Must
    /// come before it drains the queue.
    pub(crate) fn woken(&self) {
        self.notified.store(false, Ordering::SeqCst);
    }

    pub(crate) fn next_task(&self) -> Option<Task> {
        self.tasks.pop()
    }

    /// After the loop ended (its thread joined): no task will run any more,
    /// and the eventfd closes.
    pub(crate) fn close(&self) {
        self.exited.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.drop_tasks();
        drop(self.wake.write().take());
    }

    fn drop_tasks(&self) {
        while let Some(task) = self.tasks.pop() {
            match task {
                // A block request's callback still runs, once, with the news.
                Task::File(op) => crate::net::op::file::refuse(op, libc::ESHUTDOWN),
                // Never left behind (an epoll loop ends only when its helpers
                // have given everything back); answered rather than lost.
                Task::FileDone(op) => op.finish(),
                _ => {}
            }
        }
    }

    /// Whether the loop has ended (tasks posted now are refused).
    pub(crate) fn has_exited(&self) -> bool {
        self.exited.load(Ordering::SeqCst)
    }

    /// Whether the calling thread is this loop's.
    pub(crate) fn is_current(&self) -> bool {
        CURRENT_LOOP.with(|c| c.get()) == self as *const LoopShared as usize
    }

    /// Marks the calling thread as this loop's, for its lifetime.
    pub(crate) fn enter(self: &Arc<Self>) -> LoopMark {
        CURRENT_LOOP.with(|c| c.set(Arc::as_ptr(self) as usize));
        LoopMark
    }
}

/// See `LoopShared::enter`.
pub(crate) struct LoopMark;

impl Drop for LoopMark {
    fn drop(&mut self) {
        CURRENT_LOOP.with(|c| c.set(0));
    }
}

/// A connection in the io_uring loop's table.
struct UringConn {
    state: ConnState,
    /// Operations in flight on the descriptor (their completions pending).
    ops: u32,
    recv_armed: bool,
    /// The multishot receive is being cancelled so that a receive into the
    /// application's buffer can follow.
    recv_cancel_sent: bool,
    /// A receive into the application's buffer is in flight.
    into_armed: bool,
    /// Single-shot receive buffer (kernels without buffer rings).
    recv_buf: Option<Box<[u8]>>,
    /// Output taken for sending; a send is in flight while `send_busy`.
    sending: Sending,
    send_busy: bool,
    /// Where a send of several segments keeps its iovecs (made on first use).
    gather: Option<Box<send::Gather>>,
    cancel_sent: bool,
    /// Its close cancelled by descriptor (IORING_ASYNC_CANCEL_FD): an
    /// -EINVAL answer means the kernel lacks it, for this connection too.
    cancel_by_fd_sent: bool,
    /// In the loop's set of half-closed sockets (`EofWatch`).
    eof_watched: bool,
}

/// How the loop receives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RecvMode {
    /// Multishot receive from the provided buffer ring.
    Multishot,
    /// One receive at a time into the connection's own buffer.
    Single,
}

/// The io_uring event loop.
pub(crate) struct UringLoop {
    /// Dropped first: the kernel stops using `bufs` and `wake_buf` with it.
    ring: IoUring,
    bufs: Option<BufRing>,
    wake_buf: Box<u64>,
    retry_timespec: Box<io_uring::types::Timespec>,
    /// Lingering closes, and their timer (one at a time, for the oldest).
    lingering: LingerQueue,
    linger_timespec: Box<io_uring::types::Timespec>,
    linger_timer_armed: bool,
    eof_watch: EofWatch,
    shared: Arc<LoopShared>,
    handler: Arc<dyn ServerHandler>,
    opts: Arc<NetOptions>,
    recv_mode: RecvMode,
    cancel_by_fd: bool,
    conns: ConnTable<UringConn>,
    /// Slots whose multishot receive ended for lack of buffers.
    starved: Vec<u32>,
    acceptor: Option<Acceptor>,
    /// Loop-level operations in flight (wake read, accept, timers, cancels).
    loop_ops: u32,
    stopping: bool,
    /// The loop has left its run loop: the wake read is not armed again.
    exiting: bool,
    /// The overflow count last seen in the CQ ring.
    cq_dropped: u32,
    /// Block requests on this ring (`Connection::submit_file`).
    files: crate::net::op::file::FileOps,
    /// SQEs the last file completions asked for.
    file_next: Vec<Entry>,
}

/// Opcodes the loop needs.
const REQUIRED_OPCODES: [u8; 6] = [
    io_uring::opcode::Read::CODE,
    io_uring::opcode::Accept::CODE,
    io_uring::opcode::Recv::CODE,
    io_uring::opcode::Send::CODE,
    io_uring::opcode::AsyncCancel::CODE,
    io_uring::opcode::Timeout::CODE,
];

/// Builds a loop's ring: SINGLE_ISSUER + DEFER_TASKRUN (6.1), else
/// COOP_TASKRUN (5.19), else plain; SUBMIT_ALL where known. Must run on
/// the loop's thread (the single issuer). Returns the ring and its flags.
pub(crate) fn build_ring(opts: &NetOptions, max_conns: usize) -> io::Result<(IoUring, u32)> {
    let entries = opts.sq_entries;
    let cq = match opts.cq_entries {
        Some(cq) => cq,
        None => cq_entries_for(max_conns, opts.recv_buffers as usize, opts.backlog as usize),
    };
    let config = RingConfig {
        entries,
        cq_entries: Some(cq),
        sqpoll_idle_ms: opts.sqpoll_idle_ms,
        sqpoll_cpu: opts.sqpoll_cpu,
        iopoll: false,
        optional: vec![
            setup::SUBMIT_ALL,
            setup::COOP_TASKRUN,
            if opts.sqpoll_idle_ms.is_some() { 0 } else { setup::SINGLE_ISSUER | setup::DEFER_TASKRUN },
        ],
    };
    let built = config.build()?;
    probe_opcodes(&built.ring, &REQUIRED_OPCODES)?;
    Ok((built.ring, built.flags))
}

/// Completion entries a loop needs so that its CQ cannot overflow: per
/// connection at most a receive's final completion (multishot, or into the
/// application's buffer: never both), a send, the cancel that makes way for
/// a receive into a buffer, and the close's cancel (or two, one per
/// operation, on kernels without cancel by descriptor, which have no
/// multishot receive to make way from): four;
/// receive completions carrying data at most one per provided buffer (a
/// buffer comes back only once its completion was reaped); the accepts a
/// full backlog can produce; and a few loop operations.
pub(crate) fn cq_entries_for(max_conns: usize, recv_buffers: usize, backlog: usize) -> u32 {
    let need = 4 * max_conns + recv_buffers + backlog + crate::net::op::file::MAX_IN_FLIGHT + 16;
    need.next_power_of_two().clamp(64, crate::ring::MAX_CQ_ENTRIES as usize) as u32
}

impl UringLoop {
    pub(crate) fn new(
        ring: IoUring,
        shared: Arc<LoopShared>,
        handler: Arc<dyn ServerHandler>,
        opts: Arc<NetOptions>,
        acceptor: Option<Acceptor>,
    ) -> UringLoop {
        // A kernel without buffer rings (before 5.19) receives one buffer at
        // a time per connection.
        let bufs = BufRing::register(&ring, opts.recv_buffers, opts.recv_buffer_size).ok();
        let recv_mode = if bufs.is_some() { RecvMode::Multishot } else { RecvMode::Single };
        UringLoop {
            ring,
            bufs,
            wake_buf: Box::new(0),
            retry_timespec: Box::new(io_uring::types::Timespec::new().nsec(100_000_000)),
            lingering: LingerQueue::new(opts.linger),
            linger_timespec: Box::new(io_uring::types::Timespec::new()),
            linger_timer_armed: false,
            eof_watch: EofWatch::new(),
            shared,
            handler,
            opts,
            recv_mode,
            cancel_by_fd: true,
            conns: ConnTable::new(),
            starved: Vec::new(),
            acceptor,
            loop_ops: 0,
            stopping: false,
            exiting: false,
            cq_dropped: 0,
            files: Default::default(),
            file_next: Vec::new(),
        }
    }

    /// Queues an SQE, submitting first if the queue is full.
    fn push(&mut self, entry: &Entry) {
        loop {
            // SAFETY: every entry's pointers (buffers, timespec, eventfd
            // target) point into memory the loop keeps until the completion.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return;
            }
            // Full: hand what is queued to the kernel, then retry.
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    // EBUSY/EAGAIN: reap to make room (no spin: completions
                    // are waiting when the kernel says so).
                    if !crate::driver::is_resource_shortage(&e) {
                        eprintln!("ioengine: net loop submit failed: {e}");
                    }
                    let _ = self.ring.submit_and_wait(1);
                    self.reap();
                }
            }
        }
    }

    fn arm_wake(&mut self) {
        let entry = io_uring::opcode::Read::new(
            io_uring::types::Fd(self.shared.wake_fd()),
            &mut *self.wake_buf as *mut u64 as *mut u8,
            8,
        )
        .build()
        .user_data(OpTag::loop_op(OpKind::Wake).encode());
        self.push(&entry);
        self.loop_ops += 1;
    }

    /// Runs the loop until it is stopped and every connection is closed.
    pub(crate) fn run(mut self) {
        let _mark = self.shared.enter();
        self.arm_wake();
        if let Some(acceptor) = self.acceptor.as_mut() {
            let entry = acceptor.arm();
            self.push(&entry);
            self.loop_ops += 1;
        }
        loop {
            self.drain_tasks();
            self.feed_starved();
            if self.stopping && self.conns.live() == 0 && self.acceptor_done() && self.files.idle() {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if crate::driver::is_resource_shortage(&e) => {}
                Err(e) => {
                    eprintln!("ioengine: internal error: net loop io_uring_enter failed: {e}; aborting");
                    std::process::abort();
                }
            }
            self.reap();
        }
        // Cancel the wake read and wait for every loop operation, so the
        // kernel is done with the loop's memory before it goes. A wake-up
        // that completes the read first must not arm it again.
        self.exiting = true;
        let entry = cancel::prepare_loop_op(OpKind::Wake);
        self.push(&entry);
        self.loop_ops += 1;
        if self.linger_timer_armed {
            let entry = cancel::prepare_loop_op(OpKind::LingerTimer);
            self.push(&entry);
            self.loop_ops += 1;
        }
        if self.eof_watch.armed {
            let entry = cancel::prepare_loop_op(OpKind::EofWatch);
            self.push(&entry);
            self.loop_ops += 1;
        }
        while self.loop_ops > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(_) => break,
            }
            self.reap();
        }
    }

    fn acceptor_done(&self) -> bool {
        self.acceptor.as_ref().map_or(true, |a| a.closed())
    }

    /// Handles every completion waiting in the CQ.
    fn reap(&mut self) {
        loop {
            let entry = {
                let mut cq = self.ring.completion();
                let dropped = cq.overflow();
                if dropped != self.cq_dropped {
                    let lost = dropped.wrapping_sub(self.cq_dropped);
                    self.shared.counters.cq_overflows.fetch_add(lost as u64, Ordering::Relaxed);
                    self.cq_dropped = dropped;
                }
                cq.next()
            };
            let Some(cqe) = entry else { break };
            self.complete(cqe.user_data(), cqe.result(), cqe.flags());
        }
    }

    fn complete(&mut self, data: u64, result: i32, flags: u32) {
        let Some(tag) = OpTag::decode(data) else { return };
        match tag.kind {
            OpKind::Wake => self.on_wake(result),
            OpKind::Accept => self.on_accept(result, flags),
            OpKind::AcceptRetry => self.on_accept_retry(),
            OpKind::Recv => self.on_recv(tag, result, flags),
            OpKind::RecvInto => self.on_recv_into(tag, result),
            OpKind::Send => self.on_send(tag, result),
            OpKind::Cancel => self.on_cancel(tag, result),
            OpKind::LingerTimer => self.on_linger_timer(),
            OpKind::EofWatch => self.on_eof_watch(result),
            OpKind::File => self.on_file(tag, result),
        }
    }

    fn on_file(&mut self, tag: OpTag, result: i32) {
        let mut next = std::mem::take(&mut self.file_next);
        let done = self.files.complete(tag, result, &mut next);
        for entry in next.drain(..) {
            self.push(&entry);
        }
        self.file_next = next;
        if let Some(op) = done {
            // On the loop thread: the callback may send on its connections
            // (no wake-up) and submit more file operations.
            op.finish();
        }
    }

    // --- tasks -------------------------------------------------------------

    fn on_wake(&mut self, result: i32) {
        self.loop_ops -= 1;
        if result == -libc::ECANCELED || self.exiting {
            return;
        }
        self.shared.woken();
        self.arm_wake();
    }

    fn drain_tasks(&mut self) {
        while let Some(task) = self.shared.next_task() {
            match task {
                Task::Adopt(fd) => self.adopt(fd),
                Task::Kick(conn) => {
                    conn.take_kick();
                    let (slot, generation) = (conn.0.slot, conn.0.generation);
                    if self.conn(slot, generation).is_some() {
                        self.pump(slot);
                    }
                }
                Task::Stop => self.stop(),
                Task::File(op) => {
                    if let Some(entry) = self.files.start(op) {
                        self.push(&entry);
                    }
                }
                // Only epoll loops' helpers post these.
                Task::FileDone(op) => op.finish(),
            }
        }
    }

    fn stop(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        if let Some(acceptor) = self.acceptor.as_mut() {
            if let Some(entry) = acceptor.stop() {
                self.push(&entry);
                self.loop_ops += 1;
            }
        }
        self.lingering.clear();
        for slot in 0..self.conns.capacity() {
            match self.conns.slot(slot) {
                // Its output is out and its close was asked for: no reset.
                Some(c) if c.state.lingering => self.begin_close(slot, 0, false),
                Some(_) => self.begin_close(slot, libc::ECANCELED, true),
                None => {}
            }
        }
    }

    // --- accepting ---------------------------------------------------------

    fn on_accept(&mut self, result: i32, flags: u32) {
        let more = flags & recv::CQE_F_MORE != 0;
        if !more {
            self.loop_ops -= 1;
        }
        let Some(acceptor) = self.acceptor.as_mut() else {
            if result >= 0 {
                // SAFETY: a descriptor the kernel just gave us; nothing else owns it.
                drop(unsafe { OwnedFd::from_raw_fd(result) });
            }
            return;
        };
        let outcome = acceptor.on_complete(result, more, self.stopping);
        match outcome {
            AcceptOutcome::Connection(fd, rearm) => {
                self.shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
                if let Some(admission) = acceptor.dispatch(fd, &self.shared, &self.opts) {
                    self.adopt(admission);
                }
                if let Some(entry) = rearm {
                    self.push(&entry);
                    self.loop_ops += 1;
                }
            }
            AcceptOutcome::Rearm(entry) => {
                self.push(&entry);
                self.loop_ops += 1;
            }
            AcceptOutcome::Pause => {
                self.shared.counters.accept_pauses.fetch_add(1, Ordering::Relaxed);
                let entry = accept::prepare_retry(&*self.retry_timespec);
                self.push(&entry);
                self.loop_ops += 1;
            }
            AcceptOutcome::Nothing => {}
        }
    }

    fn on_accept_retry(&mut self) {
        self.loop_ops -= 1;
        if let Some(entry) = self.acceptor.as_mut().and_then(|a| a.resume(self.stopping)) {
            self.push(&entry);
            self.loop_ops += 1;
        }
    }

    // --- connections -------------------------------------------------------

    fn conn(&mut self, slot: u32, generation: u32) -> Option<&mut UringConn> {
        self.conns.get(slot, generation)
    }

    /// Takes a new connection into the loop's table and starts receiving.
    fn adopt(&mut self, admission: Admission) {
        if self.stopping {
            return; // dropping the admission closes and counts it
        }
        let fd = admission.take();
        let (slot, generation) = self.conns.reserve();
        let raw = fd.as_raw_fd();
        std::mem::forget(fd); // the table owns it now; closed in finish_close
        if self.opts.nodelay {
            let _ = crate::net::socket::set_int_option(raw, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
        }
        let peer = crate::net::socket::peer_addr(raw);
        let handle = Connection::new(self.shared.clone(), slot, generation, peer);
        self.conns.fill(
            slot,
            UringConn {
                state: ConnState::new(raw, handle.clone()),
                ops: 0,
                recv_armed: false,
                recv_cancel_sent: false,
                into_armed: false,
                recv_buf: None,
                sending: Sending::default(),
                send_busy: false,
                gather: None,
                cancel_sent: false,
                cancel_by_fd_sent: false,
                eof_watched: false,
            },
        );
        guarded((), || self.handler.on_connect(&handle));
        self.arm_recv(slot);
        self.pump(slot);
    }

    fn arm_recv(&mut self, slot: u32) {
        let mode = self.recv_mode;
        let buf_size = self.opts.recv_buffer_size;
        let Some(c) = self.conns.slot(slot) else { return };
        if c.recv_armed || c.into_armed || c.state.closing || c.state.eof {
            return;
        }
        let (fd, generation) = (c.state.fd, c.state.handle.0.generation);
        if let Some((buf, missing)) = c.state.receiving_into() {
            let len = missing.min(u32::MAX as usize) as u32;
            c.into_armed = true;
            c.ops += 1;
            let entry = recv::prepare_into(fd, buf, len, slot, generation);
            self.push(&entry);
            return;
        }
        let entry = match mode {
            RecvMode::Multishot => recv::prepare_multishot(fd, slot, generation),
            RecvMode::Single => {
                let buf = c.recv_buf.get_or_insert_with(|| vec![0u8; buf_size as usize].into_boxed_slice());
                recv::prepare_single(fd, buf.as_mut_ptr(), buf.len() as u32, slot, generation)
            }
        };
        c.recv_armed = true;
        c.ops += 1;
        self.push(&entry);
    }

    fn on_recv(&mut self, tag: OpTag, result: i32, flags: u32) {
        let more = flags & recv::CQE_F_MORE != 0;
        let buffer = recv::buffer_id(flags);
        let handler = self.handler.clone();
        let mode = self.recv_mode;
        let Some(c) = self.conns.get(tag.slot, tag.generation) else {
            // A completion for a connection that is gone: only its buffer matters.
            if let (Some(bid), Some(bufs)) = (buffer, self.bufs.as_mut()) {
                bufs.recycle(bid);
            }
            return;
        };
        if !more {
            c.recv_armed = false;
            c.recv_cancel_sent = false;
            c.ops -= 1;
        }
        let mut ended = None;
        if result > 0 {
            let len = result as usize;
            match (mode, buffer) {
                (RecvMode::Multishot, Some(bid)) => {
                    if let Some(bufs) = self.bufs.as_mut() {
                        let data = bufs.data(bid, len);
                        let window = ReceiveWindow {
                            owner: Arc::as_ptr(&self.shared),
                            start: data.as_ptr(),
                            len: data.len(),
                            bid,
                            pins: 0,
                            budget: bufs.pin_budget(),
                        };
                        let window = with_receive_window(window, || c.state.deliver(&*handler, data));
                        if window.pins > 0 {
                            bufs.pin(bid, window.pins);
                        }
                    }
                }
                _ => {
                    if let Some(buf) = c.recv_buf.take() {
                        c.state.deliver(&*handler, &buf[..len.min(buf.len())]);
                        c.recv_buf = Some(buf);
                    }
                }
            }
        } else if result == 0 {
            if c.state.peer_finished(&*handler) {
                ended = Some(0);
            }
        } else if result == -libc::ENOBUFS {
            // The ring ran dry: resume once buffers are back (end of batch).
            self.shared.counters.recv_starved.fetch_add(1, Ordering::Relaxed);
            self.starved.push(tag.slot);
        } else if result == -libc::EINVAL && mode == RecvMode::Multishot {
            // A kernel without multishot receive (before 6.0).
            self.recv_mode = RecvMode::Single;
            self.starved.push(tag.slot);
        } else if result != -libc::ECANCELED {
            ended = Some(-result);
        }
        if let (Some(bid), Some(bufs)) = (buffer, self.bufs.as_mut()) {
            bufs.recycle(bid);
        }
        match ended {
            Some(errno) => self.begin_close(tag.slot, errno, errno != 0),
            None => {
                if result == 0 {
                    self.watch_eof(tag.slot);
                } else if !more && (result > 0 || result == -libc::ECANCELED) {
                    // ECANCELED without a close: our own cancel, made way
                    // for a receive into the application's buffer.
                    self.arm_recv(tag.slot);
                } else if more {
                    self.make_way_for_recv_into(tag.slot);
                }
                self.pump(tag.slot);
            }
        }
    }

    /// The application asked for the next bytes in its own buffer
    /// (`Connection::recv_into`) while the multishot receive is armed:
    /// cancel it, so that the kernel does not take them into the ring's
    /// buffers. What it still brings is copied; then `arm_recv` receives
    /// into the buffer.
    fn make_way_for_recv_into(&mut self, slot: u32) {
        let Some(c) = self.conns.slot(slot) else { return };
        if !c.recv_armed || c.recv_cancel_sent || c.state.receiving_into().is_none() {
            return;
        }
        c.recv_cancel_sent = true;
        c.ops += 1;
        let generation = c.state.handle.0.generation;
        let entry = cancel::prepare_by_tag(OpTag::conn_op(OpKind::Recv, slot, generation), slot, generation);
        self.push(&entry);
    }

    /// A receive into the application's buffer completed.
    fn on_recv_into(&mut self, tag: OpTag, result: i32) {
        let handler = self.handler.clone();
        let Some(c) = self.conns.get(tag.slot, tag.generation) else { return };
        c.ops -= 1;
        c.into_armed = false;
        if c.state.closing {
            self.maybe_finish_close(tag.slot);
            return;
        }
        if result > 0 {
            c.state.received_into(result as usize);
        } else if result == 0 {
            if c.state.peer_finished(&*handler) {
                self.begin_close(tag.slot, 0, false);
                return;
            }
            self.watch_eof(tag.slot);
        } else if result != -libc::ECANCELED && result != -libc::EINTR && result != -libc::EAGAIN {
            self.begin_close(tag.slot, -result, true);
            return;
        }
        self.arm_recv(tag.slot);
        self.pump(tag.slot);
    }

    /// After the peer's end of file: watch the socket for a later reset
    /// (see `EofWatch`). If it cannot be watched, a reset shows at the next
    /// send, as it would without the watch.
    fn watch_eof(&mut self, slot: u32) {
        let Some(c) = self.conns.slot(slot) else { return };
        if c.state.closing || c.eof_watched {
            return;
        }
        let tag = OpTag::conn_op(OpKind::Recv, slot, c.state.handle.0.generation);
        if let Ok(poll) = self.eof_watch.watch(c.state.fd, tag) {
            c.eof_watched = true;
            if let Some(entry) = poll {
                self.push(&entry);
                self.loop_ops += 1;
            }
        }
    }

    /// Half-closed sockets failed or hung up: each leaves the set (epoll
    /// would report it again and again) and its connection ends with the
    /// socket's error, as on the epoll backend.
    fn on_eof_watch(&mut self, result: i32) {
        self.loop_ops -= 1;
        self.eof_watch.ended();
        if self.exiting {
            return;
        }
        let reported = if result == -libc::ECANCELED { Vec::new() } else { self.eof_watch.ready() };
        for tag in reported {
            let Some(c) = self.conns.get(tag.slot, tag.generation) else { continue };
            if !c.eof_watched {
                continue;
            }
            c.eof_watched = false;
            self.eof_watch.unwatch(c.state.fd);
            if !c.state.closing {
                let error = crate::net::socket::pending_error(c.state.fd);
                self.begin_close(tag.slot, error, error != 0);
            }
        }
        if let Some(entry) = self.eof_watch.arm() {
            self.push(&entry);
            self.loop_ops += 1;
        }
        self.release_eof_watch_if_empty();
    }

    /// Closes the watch set once it holds no socket (cancelling its poll first).
    fn release_eof_watch_if_empty(&mut self) {
        if let Some(cancel) = self.eof_watch.release_if_empty() {
            self.push(&cancel);
            self.loop_ops += 1;
        }
    }

    /// Re-arms receives that stopped for lack of buffers: by now the batch
    /// that used them has given them back.
    fn feed_starved(&mut self) {
        while let Some(slot) = self.starved.pop() {
            self.arm_recv(slot);
        }
    }

    /// Moves a connection along: close requests, the next send, callbacks.
    fn pump(&mut self, slot: u32) {
        let handler = self.handler.clone();
        let high_water = self.opts.high_water;
        let Some(c) = self.conns.slot(slot) else { return };
        if c.state.closing {
            self.maybe_finish_close(slot);
            return;
        }
        let request = c.state.handle.close_request();
        if request == CloseRequest::Abort {
            self.begin_close(slot, 0, true);
            return;
        }
        // Start the next send if none is in flight: what is left of the last
        // one first, then queued output, gathered into one send.
        if !c.send_busy {
            c.sending.refill(&c.state.handle, send::MAX_SEGMENTS);
            if !c.sending.is_empty() {
                self.push_send(slot);
            }
        }
        let linger = self.lingering.enabled();
        let Some(c) = self.conns.slot(slot) else { return };
        let idle = c.sending.is_empty();
        match c.state.settle_output(&*handler, high_water, idle, linger) {
            Settled::Open => {}
            Settled::Close => self.begin_close(slot, 0, false),
            Settled::Linger => {
                let generation = c.state.handle.0.generation;
                self.shared.counters.lingering.fetch_add(1, Ordering::Relaxed);
                self.lingering.push(slot, generation);
                self.arm_linger_timer();
            }
        }
    }

    /// Starts the linger timer for the oldest lingering connection, unless
    /// it runs already (it re-arms itself when it fires).
    fn arm_linger_timer(&mut self) {
        if self.linger_timer_armed || self.exiting {
            return;
        }
        let Some(deadline) = self.lingering.next_deadline() else { return };
        *self.linger_timespec = timer::timespec(linger::until(deadline));
        let entry = timer::prepare(&*self.linger_timespec, OpKind::LingerTimer);
        self.push(&entry);
        self.loop_ops += 1;
        self.linger_timer_armed = true;
    }

    /// Closes the lingering connections whose time is up.
    fn on_linger_timer(&mut self) {
        self.loop_ops -= 1;
        self.linger_timer_armed = false;
        for (slot, generation) in self.lingering.take_expired(std::time::Instant::now()) {
            if self.conn(slot, generation).is_some_and(|c| c.state.lingering && !c.state.closing) {
                self.begin_close(slot, 0, false);
            }
        }
        self.arm_linger_timer();
    }

    /// Sends what `sending` holds: one SEND for a single segment, one
    /// SENDMSG gathering several.
    fn push_send(&mut self, slot: u32) {
        let Some(c) = self.conns.slot(slot) else { return };
        let (fd, generation) = (c.state.fd, c.state.handle.0.generation);
        let entry = if c.sending.segments.len() == 1 {
            let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }];
            c.sending.iovecs(&mut iov);
            let len = iov[0].iov_len.min(u32::MAX as usize) as u32;
            send::prepare(fd, iov[0].iov_base as *const u8, len, slot, generation)
        } else {
            let gather = c.gather.get_or_insert_with(send::Gather::new);
            let count = c.sending.iovecs(&mut gather.iov);
            send::prepare_gathered(fd, gather, count, slot, generation)
        };
        c.send_busy = true;
        c.ops += 1;
        self.push(&entry);
    }

    fn on_send(&mut self, tag: OpTag, result: i32) {
        let Some(c) = self.conn(tag.slot, tag.generation) else { return };
        c.ops -= 1;
        if result < 0 {
            let errno = -result;
            if c.state.closing || errno == libc::ECANCELED {
                self.maybe_finish_close(tag.slot);
            } else {
                self.begin_close(tag.slot, errno, true);
            }
            return;
        }
        let bytes = result as usize;
        sent(&c.state.handle, bytes);
        c.state.wrote = true;
        c.send_busy = false;
        let mut done = Vec::new();
        c.sending.consume(bytes, |segment| done.push(segment));
        for segment in done {
            let len = segment.len();
            self.finish_segment(segment, Ok(len));
        }
        // A short send's rest goes next, before anything queued later.
        self.pump(tag.slot);
    }

    /// Ends a segment; a receive buffer it kept goes back to the kernel.
    fn finish_segment(&mut self, segment: Segment, outcome: io::Result<usize>) {
        if let (Some(bid), Some(bufs)) = (segment.finish(outcome), self.bufs.as_mut()) {
            bufs.unpin(bid);
        }
    }

    // --- closing -----------------------------------------------------------

    /// Starts closing: no more callbacks but `on_close`; operations in flight
    /// are cancelled and the descriptor closes once they have completed.
    /// `abortive`: queued output is dropped and the peer sees a reset.
    fn begin_close(&mut self, slot: u32, error: i32, abortive: bool) {
        let cancel_by_fd = self.cancel_by_fd;
        let Some(c) = self.conns.slot(slot) else { return };
        if !c.state.closing {
            c.state.closing = true;
            c.state.error = error;
            c.state.handle.refuse_sends();
            if abortive && error != libc::ECONNRESET && error != libc::EPIPE {
                crate::net::socket::set_reset_on_close(c.state.fd);
            }
        }
        if c.ops > 0 && !c.cancel_sent {
            c.cancel_sent = true;
            let (fd, generation) = (c.state.fd, c.state.handle.0.generation);
            if cancel_by_fd {
                c.ops += 1;
                c.cancel_by_fd_sent = true;
                let entry = cancel::prepare_by_fd(fd, slot, generation);
                self.push(&entry);
            } else {
                self.cancel_each(slot);
            }
        }
        self.maybe_finish_close(slot);
    }

    /// Cancels the receive and the send one by one (kernels before 5.19).
    fn cancel_each(&mut self, slot: u32) {
        let Some(c) = self.conns.slot(slot) else { return };
        let generation = c.state.handle.0.generation;
        let mut targets = Vec::with_capacity(2);
        if c.recv_armed {
            targets.push(OpTag::conn_op(OpKind::Recv, slot, generation));
        }
        if c.into_armed {
            targets.push(OpTag::conn_op(OpKind::RecvInto, slot, generation));
        }
        if c.send_busy {
            targets.push(OpTag::conn_op(OpKind::Send, slot, generation));
        }
        c.ops += targets.len() as u32;
        for target in targets {
            let entry = cancel::prepare_by_tag(target, slot, generation);
            self.push(&entry);
        }
    }

    fn on_cancel(&mut self, tag: OpTag, result: i32) {
        if tag.generation == 0 {
            self.loop_ops -= 1;
            return;
        }
        let Some(c) = self.conn(tag.slot, tag.generation) else { return };
        c.ops -= 1;
        // Decided by what this connection sent, not by the loop's flag: a
        // second connection's by-descriptor cancel may answer after the
        // first turned the flag off. (Cancels by tag never answer EINVAL.)
        if result == -libc::EINVAL && c.cancel_by_fd_sent {
            // A kernel without IORING_ASYNC_CANCEL_FD: cancel each operation.
            c.cancel_by_fd_sent = false;
            self.cancel_by_fd = false;
            self.cancel_each(tag.slot);
        }
        self.maybe_finish_close(tag.slot);
    }

    /// Closes the descriptor once nothing is in flight on it, then tells the
    /// application and frees the slot.
    fn maybe_finish_close(&mut self, slot: u32) {
        let Some(c) = self.conns.slot(slot) else { return };
        if !c.state.closing || c.ops > 0 {
            return;
        }
        let Some(mut c) = self.conns.remove(slot) else { return };
        // SAFETY: the descriptor is ours (adopted from the acceptor) and no
        // operation is in flight on it any more.
        unsafe { libc::close(c.state.fd) };
        if c.eof_watched {
            self.eof_watch.forget(); // the close took it out of the set
            self.release_eof_watch_if_empty();
        }
        if c.state.lingering {
            self.shared.counters.lingering.fetch_sub(1, Ordering::Relaxed);
        }
        let error = c.state.error;
        c.state.abandon_into(if error != 0 { error } else { libc::ECANCELED });
        let outcome = || Err(io::Error::from_raw_os_error(if error != 0 { error } else { libc::ECANCELED }));
        for segment in c.sending.segments {
            self.finish_segment(segment, outcome());
        }
        for segment in c.state.handle.mark_closed() {
            self.finish_segment(segment, outcome());
        }
        // Counted out first: once on_close runs, the stats and
        // max_connections no longer see it.
        self.opts.release(&self.shared);
        guarded((), || self.handler.on_close(&c.state.handle, error));
    }
}
