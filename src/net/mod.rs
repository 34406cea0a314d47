//! The proactor TCP server (seed 002): one io_uring per thread. A main
//! loop accepts connections and hands each, in turn, to one of a pool of
//! loops, which does all of that connection's I/O on its own ring. Where
//! io_uring cannot run (disabled by sysctl or seccomp), the same server
//! runs on epoll, behind the same handle and callbacks.

pub(crate) mod acceptor;
pub(crate) mod buf_ring;
pub mod connection;
pub(crate) mod eof_watch;
pub(crate) mod epoll;
pub(crate) mod event_loop;
pub(crate) mod linger;
pub(crate) mod loop_pool;
pub(crate) mod op;
pub mod server;
pub(crate) mod socket;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;

pub use connection::{Connection, RecvDone, SendDone, ServerHandler};
pub use server::{ServerStats, TcpServer};

/// Name of the environment variable operators use to force a backend.
pub const NET_BACKEND_ENV: &str = "IOENGINE_NET_BACKEND";

/// Which kernel interface runs a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum NetBackend {
    /// io_uring when it starts and has the operations the server needs,
    /// epoll otherwise.
    Auto = 0,
    /// io_uring; fails if it cannot start.
    Uring = 1,
    /// epoll.
    Epoll = 2,
}

impl NetBackend {
    pub fn name(self) -> &'static str {
        match self {
            NetBackend::Auto => "auto",
            NetBackend::Uring => "io_uring",
            NetBackend::Epoll => "epoll",
        }
    }
}

impl fmt::Display for NetBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for NetBackend {
    type Err = io::Error;
    fn from_str(s: &str) -> io::Result<NetBackend> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(NetBackend::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(NetBackend::Uring),
            "epoll" => Ok(NetBackend::Epoll),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
}

/// How a server is set up. `ServerOptions::new(addr)` gives the defaults.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Address to listen on; port 0 lets the kernel choose (see
    /// `TcpServer::local_addr`). An IPv6 address listens on IPv6 only.
    pub addr: SocketAddr,
    /// `IOENGINE_NET_BACKEND` in the environment overrides it.
    pub backend: NetBackend,
    /// Loops serving connections besides the accepting one; 0: the
    /// accepting loop serves them too (one thread in all).
    pub threads: usize,
    /// Most connections open at once; more are accepted and closed at once.
    pub max_connections: usize,
    /// listen(2) backlog.
    pub backlog: i32,
    /// Queued output at which `on_high_water` runs.
    pub high_water: usize,
    /// TCP_NODELAY on accepted connections.
    pub nodelay: bool,
    /// io_uring: receive buffers per loop (a power of two, at most 32768)
    /// and their size (at most 16 MiB, and at most 1 GiB for all of a
    /// loop's); connections take one per receive completion.
    pub recv_buffers: u16,
    pub recv_buffer_size: u32,
    /// io_uring: submission queue entries per loop.
    pub sq_entries: u32,
    /// io_uring: completion queue entries per loop; by default sized so it
    /// cannot overflow (see `event_loop::cq_entries_for`).
    pub cq_entries: Option<u32>,
    /// io_uring: a kernel thread polls each loop's submission queue,
    /// sleeping after this many idle milliseconds (IORING_SETUP_SQPOLL).
    pub sqpoll_idle_ms: Option<u32>,
    /// With SQPOLL: the CPU the kernel thread is pinned to.
    pub sqpoll_cpu: Option<u32>,
    /// How long a graceful close waits, once our output is out and our
    /// write side shut, for the peer to finish, reading and dropping what
    /// it still sends; zero closes at once, and data the
    /// peer sends late may then make the kernel reset the connection and
    /// drop output the peer has not received yet.
    pub linger: std::time::Duration,
    /// Listen on a Unix stream socket at this path instead of `addr`. A
    /// stale socket file there (nobody listening) is replaced; the server
    /// removes the file when it stops.
    pub unix_path: Option<std::path::PathBuf>,
}

impl ServerOptions {
    pub fn new(addr: SocketAddr) -> ServerOptions {
        ServerOptions {
            addr,
            backend: NetBackend::Auto,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_connections: 16384,
            backlog: 1024,
            high_water: 64 << 20,
            nodelay: true,
            recv_buffers: 256,
            recv_buffer_size: 16 << 10,
            sq_entries: 1024,
            cq_entries: None,
            sqpoll_idle_ms: None,
            sqpoll_cpu: None,
            linger: std::time::Duration::from_secs(5),
            unix_path: None,
        }
    }

    pub(crate) fn validate(&self) -> io::Result<()> {
        let invalid = || Err(io::Error::from_raw_os_error(libc::EINVAL));
        if self.max_connections == 0 || self.backlog <= 0 || self.high_water == 0 || self.threads > 1024 {
            return invalid();
        }
        if !self.recv_buffers.is_power_of_two()
            || self.recv_buffers > 32768
            || self.recv_buffer_size == 0
            || self.recv_buffer_size > MAX_RECV_BUFFER_SIZE
            || u64::from(self.recv_buffers) * u64::from(self.recv_buffer_size) > MAX_RECV_RING_BYTES
        {
            return invalid();
        }
        if self.sq_entries == 0 || self.sq_entries > 32768 {
            return invalid();
        }
        if let Some(cq) = self.cq_entries {
            if cq < self.sq_entries || cq > crate::ring::MAX_CQ_ENTRIES {
                return invalid();
            }
        }
        if self.sqpoll_cpu.is_some() && self.sqpoll_idle_ms.is_none() {
            return invalid();
        }
        Ok(())
    }
}

/// Largest receive buffer: far above what one receive fills on a socket,
/// far below the kernel's limit on one transfer (INT_MAX).
pub(crate) const MAX_RECV_BUFFER_SIZE: u32 = 16 << 20;
/// Most memory one loop's receive buffers may take together.
pub(crate) const MAX_RECV_RING_BYTES: u64 = 1 << 30;

/// What every loop of a server works with.
#[derive(Debug)]
pub(crate) struct NetOptions {
    pub(crate) high_water: usize,
    pub(crate) nodelay: bool,
    pub(crate) recv_buffers: u16,
    pub(crate) recv_buffer_size: u32,
    pub(crate) sq_entries: u32,
    pub(crate) cq_entries: Option<u32>,
    pub(crate) sqpoll_idle_ms: Option<u32>,
    pub(crate) sqpoll_cpu: Option<u32>,
    pub(crate) backlog: i32,
    pub(crate) linger: std::time::Duration,
    /// Most connections a loop holds (sizes its completion queue).
    pub(crate) max_connections_per_loop: usize,
    /// Most connections the server holds, and how many it holds now
    /// (reserved by the acceptor before a loop takes the connection).
    pub(crate) max_connections: usize,
    pub(crate) open: std::sync::atomic::AtomicUsize,
}

impl NetOptions {
    /// A connection a loop held (or was to take) is gone.
    pub(crate) fn release(&self, owner: &event_loop::LoopShared) {
        owner.counters.live.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl NetOptions {
    pub(crate) fn from_server(opts: &ServerOptions) -> NetOptions {
        let serving = opts.threads.max(1);
        NetOptions {
            high_water: opts.high_water,
            nodelay: opts.nodelay,
            recv_buffers: opts.recv_buffers,
            recv_buffer_size: opts.recv_buffer_size,
            sq_entries: opts.sq_entries,
            cq_entries: opts.cq_entries,
            sqpoll_idle_ms: opts.sqpoll_idle_ms,
            sqpoll_cpu: opts.sqpoll_cpu,
            backlog: opts.backlog,
            linger: opts.linger,
            max_connections_per_loop: opts.max_connections.div_ceil(serving),
            max_connections: opts.max_connections,
            open: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}
