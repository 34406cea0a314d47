//! TcpServer (seed 3.5): binds and listens, starts the accepting loop and
//! the loop pool, and stops them all, gracefully: accepting ends, every
//! connection gets its close callback, every thread is joined and every
//! descriptor closed.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam::channel;
use parking_lot::Mutex;

use crate::driver::start_engine_thread;
use crate::net::acceptor::Acceptor;
use crate::net::connection::ServerHandler;
use crate::net::epoll::EpollLoop;
use crate::net::event_loop::{build_ring, LoopShared, Task, UringLoop};
use crate::net::loop_pool::LoopPool;
use crate::net::{socket, NetBackend, NetOptions, ServerOptions, NET_BACKEND_ENV};

/// Counters of a server, summed over its loops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections open now.
    pub connections: u64,
    /// Connections accepted since start.
    pub accepted: u64,
    /// Connections accepted and closed at once, never seen by `on_connect`:
    /// `max_connections` were open, or the server was stopping.
    pub rejected: u64,
    /// io_uring: completions the kernel could not keep in a loop's CQ
    /// (zero by design).
    pub cq_overflows: u64,
    /// io_uring: times a connection's multishot receive stopped because its
    /// loop's receive buffers were all in use (it resumes when they return).
    pub recv_starved: u64,
    /// Times accepting paused because the process was out of descriptors or
    /// memory (EMFILE, ENFILE, ENOBUFS, ENOMEM); it resumes 100 ms later.
    pub accept_pauses: u64,
    /// Connections whose graceful close is waiting for the peer to finish
    /// (`ServerOptions::linger`); they count in `connections` too.
    pub lingering: u64,
}

struct Running {
    loops: Vec<Arc<LoopShared>>,
    threads: Vec<JoinHandle<()>>,
}

enum State {
    /// Bound and listening; not accepting yet.
    Bound(OwnedFd),
    Running(Running),
    Stopped,
}

/// A TCP server. Callbacks run on its loop threads; every method may be
/// called from any thread, but `stop` (and dropping the server) not from
/// one of its own callbacks.
pub struct TcpServer {
    local_addr: SocketAddr,
    /// The Unix socket file this server created, removed when it stops.
    unix_path: Option<std::path::PathBuf>,
    backend: NetBackend,
    fallback_errno: Option<i32>,
    handler: Arc<dyn ServerHandler>,
    opts: Arc<NetOptions>,
    threads: usize,
    setup_flags: std::sync::atomic::AtomicU32,
    state: Mutex<State>,
    /// Counters of loops that have ended, so stats outlive them.
    loops: Mutex<Vec<Arc<LoopShared>>>,
}

/// Whether an io_uring failure means io_uring cannot run here, so that
/// `Auto` may use epoll (as the block engine decides for AIO).
fn uring_unavailable(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EOPNOTSUPP) | Some(libc::ENOMEM)
    )
}

/// The backend to run, and why `Auto` did not pick io_uring.
fn choose_backend(requested: NetBackend, opts: &NetOptions) -> io::Result<(NetBackend, Option<i32>)> {
    let requested = match std::env::var(NET_BACKEND_ENV) {
        Ok(value) if !value.trim().is_empty() => value.parse()?,
        _ => requested,
    };
    let probe = || build_ring(opts, opts.max_connections_per_loop).map(drop);
    match requested {
        NetBackend::Uring => probe().map(|()| (NetBackend::Uring, None)),
        NetBackend::Epoll => Ok((NetBackend::Epoll, None)),
        NetBackend::Auto => match probe() {
            Ok(()) => Ok((NetBackend::Uring, None)),
            Err(e) if uring_unavailable(&e) => Ok((NetBackend::Epoll, e.raw_os_error())),
            Err(e) => Err(e),
        },
    }
}

impl TcpServer {
    /// Binds and listens (so the port is known and connections queue up),
    /// and chooses the backend. Nothing is accepted before `start`.
    pub fn bind(opts: &ServerOptions, handler: Arc<dyn ServerHandler>) -> io::Result<TcpServer> {
        opts.validate()?;
        let net = Arc::new(NetOptions::from_server(opts));
        let (backend, fallback_errno) = choose_backend(opts.backend, &net)?;
        let (listener, local_addr) = match &opts.unix_path {
            // A Unix socket has no port: the address reads 0.0.0.0:0.
            Some(path) => (socket::listen_unix(path, opts.backlog)?, SocketAddr::from(([0, 0, 0, 0], 0))),
            None => {
                let listener = socket::listen(&opts.addr, opts.backlog)?;
                let local_addr = socket::local_addr(listener.as_raw_fd())?;
                (listener, local_addr)
            }
        };
        Ok(TcpServer {
            local_addr,
            unix_path: opts.unix_path.clone(),
            backend,
            fallback_errno,
            handler,
            opts: net,
            threads: opts.threads,
            setup_flags: std::sync::atomic::AtomicU32::new(0),
            state: Mutex::new(State::Bound(listener)),
            loops: Mutex::new(Vec::new()),
        })
    }

    /// Whether the calling thread is one of this server's loops (so inside
    /// one of its callbacks). Checked before taking `state`, which a stop
    /// holds while it waits for these threads.
    fn on_own_loop(&self) -> bool {
        self.loops.lock().iter().any(|l| l.is_current())
    }

    /// Starts the loops and accepting. EINVAL if already started or stopped.
    pub fn start(&self) -> io::Result<()> {
        if self.on_own_loop() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut state = self.state.lock();
        let listener = match std::mem::replace(&mut *state, State::Stopped) {
            State::Bound(listener) => listener,
            other => {
                *state = other;
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
        };
        let main = LoopShared::new()?;
        let mut loops = vec![main.clone()];
        for _ in 0..self.threads {
            loops.push(LoopShared::new()?);
        }
        let serving = if self.threads == 0 { vec![main.clone()] } else { loops[1..].to_vec() };
        let pool = Arc::new(LoopPool::new(serving));
        let (ready_tx, ready) = channel::unbounded::<io::Result<u32>>();
        let mut running = Running { loops: loops.clone(), threads: Vec::new() };
        let mut accepting = Some((listener, pool));
        let mut outcome = Ok(());
        for (index, shared) in loops.iter().enumerate() {
            let name = if index == 0 { "ioe-net-main".to_string() } else { format!("ioe-net-{}", index - 1) };
            let (shared, handler, opts, ready_tx) =
                (shared.clone(), self.handler.clone(), self.opts.clone(), ready_tx.clone());
            let accepting = if index == 0 { accepting.take() } else { None };
            let backend = self.backend;
            let spawned = start_engine_thread(&name, move || match backend {
                NetBackend::Epoll => match EpollLoop::new(shared, handler, opts, accepting) {
                    Ok(event_loop) => {
                        let _ = ready_tx.send(Ok(0));
                        event_loop.run();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                },
                // The ring is built here: its single issuer is this thread.
                _ => match build_ring(&opts, opts.max_connections_per_loop) {
                    Ok((ring, flags)) => {
                        let acceptor = accepting.map(|(listener, pool)| Acceptor::new(listener, pool));
                        let event_loop = UringLoop::new(ring, shared, handler, opts, acceptor);
                        let _ = ready_tx.send(Ok(flags));
                        event_loop.run();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                },
            });
            match spawned {
                Ok(handle) => running.threads.push(handle),
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        drop(ready_tx);
        for _ in 0..running.threads.len() {
            match ready.recv() {
                Ok(Ok(flags)) => self.setup_flags.store(flags, Ordering::Relaxed),
                Ok(Err(e)) => outcome = outcome.and(Err(e)),
                Err(_) => outcome = outcome.and(Err(io::Error::from_raw_os_error(libc::EAGAIN))),
            }
        }
        *self.loops.lock() = loops;
        if let Err(e) = outcome {
            Self::shut(running);
            *state = State::Stopped;
            return Err(e);
        }
        *state = State::Running(running);
        Ok(())
    }

    /// Stops: accepting ends, every connection is closed (its `on_close`
    /// runs with ECANCELED), the loops end and their threads are joined.
    /// Idempotent. EDEADLK from one of the server's own loop threads.
    pub fn stop(&self) -> io::Result<()> {
        if self.on_own_loop() {
            return Err(io::Error::from_raw_os_error(libc::EDEADLK));
        }
        let mut state = self.state.lock();
        let was_listening = !matches!(*state, State::Stopped);
        match std::mem::replace(&mut *state, State::Stopped) {
            State::Running(running) => Self::shut(running),
            State::Bound(listener) => drop(listener),
            State::Stopped => {}
        }
        if let (true, Some(path)) = (was_listening, &self.unix_path) {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }

    fn shut(running: Running) {
        for shared in &running.loops {
            shared.post(Task::Stop);
        }
        for thread in running.threads {
            let _ = thread.join();
        }
        for shared in &running.loops {
            shared.close();
        }
    }

    /// The address the server listens on (with the port the kernel chose).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The backend running the server (never `Auto`).
    pub fn backend(&self) -> NetBackend {
        self.backend
    }

    /// Why an `Auto` server runs on epoll: the error io_uring failed with.
    pub fn fallback_reason(&self) -> Option<io::Error> {
        self.fallback_errno.map(io::Error::from_raw_os_error)
    }

    /// io_uring set-up flags in force on the loops' rings (`IORING_SETUP_*`
    /// bits; 0 on epoll or before `start`).
    pub fn setup_flags(&self) -> u32 {
        self.setup_flags.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> ServerStats {
        let mut stats = ServerStats::default();
        for shared in self.loops.lock().iter() {
            let c = &shared.counters;
            stats.connections += c.live.load(Ordering::Relaxed) as u64;
            stats.accepted += c.accepted.load(Ordering::Relaxed);
            stats.rejected += c.rejected.load(Ordering::Relaxed);
            stats.cq_overflows += c.cq_overflows.load(Ordering::Relaxed);
            stats.recv_starved += c.recv_starved.load(Ordering::Relaxed);
            stats.accept_pauses += c.accept_pauses.load(Ordering::Relaxed);
            stats.lingering += c.lingering.load(Ordering::Relaxed) as u64;
        }
        stats
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
