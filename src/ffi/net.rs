//! TCP servers and their connections.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::mem::ManuallyDrop;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::{guard, guard64, guard_or, neg};
use crate::net::connection::ConnShared;
use crate::net::{Connection, NetBackend, ServerHandler, ServerOptions, TcpServer};

/// Choose io_uring when the kernel allows it, epoll otherwise.
pub const IOE_NET_BACKEND_AUTO: u32 = 0;
/// io_uring only; server creation fails if it cannot start.
pub const IOE_NET_BACKEND_URING: u32 = 1;
/// epoll.
pub const IOE_NET_BACKEND_EPOLL: u32 = 2;

/// io_uring: a kernel thread polls each loop's submission queue
/// (IORING_SETUP_SQPOLL), sleeping after `sqpoll_idle_ms` idle; pinned to
/// `sqpoll_cpu` with IOE_SERVER_SQPOLL_CPU.
pub const IOE_SERVER_SQPOLL: u32 = 1 << 0;
/// With IOE_SERVER_SQPOLL: pin the polling thread to `sqpoll_cpu`.
pub const IOE_SERVER_SQPOLL_CPU: u32 = 1 << 1;
/// io_uring: use `cq_size` completion-queue entries per loop.
pub const IOE_SERVER_CQSIZE: u32 = 1 << 2;
/// Busy-polling completions (IORING_SETUP_IOPOLL) is for O_DIRECT storage
/// and cannot serve sockets: ioe_server_create refuses it with -EINVAL.
pub const IOE_SERVER_IOPOLL: u32 = 1 << 3;
/// Leave Nagle's algorithm on (by default accepted connections get
/// TCP_NODELAY).
pub const IOE_SERVER_NAGLE: u32 = 1 << 4;

const KNOWN_SERVER_FLAGS: u32 =
    IOE_SERVER_SQPOLL | IOE_SERVER_SQPOLL_CPU | IOE_SERVER_CQSIZE | IOE_SERVER_IOPOLL | IOE_SERVER_NAGLE;

/// How to create a server. Fill it with `ioe_server_options_init` first,
/// then change the fields you need.
#[repr(C)]
pub struct ioe_server_options {
    /// Numeric IPv4 or IPv6 address to listen on ("0.0.0.0", "::1");
    /// NULL: "0.0.0.0". Borrowed for the call. An IPv6 address listens on
    /// IPv6 only. "unix:PATH", or an absolute path, listens on a Unix stream
    /// socket there instead (`port` and TCP options are then ignored): a
    /// stale socket file nobody listens on is replaced, anything else there
    /// is -EADDRINUSE, and the server removes the file when it stops. Such
    /// a server's port is 0 and its connections have no peer address.
    pub address: *const c_char,
    /// Port; 0 lets the kernel choose (ioe_server_port tells which).
    pub port: u16,
    /// IOE_NET_BACKEND_*. IOENGINE_NET_BACKEND=auto|uring|epoll in the
    /// environment overrides it.
    pub backend: u32,
    /// Event loops serving connections besides the accepting one; 0: the
    /// accepting loop serves them too (one thread in all). Default: the
    /// number of CPUs.
    pub threads: u32,
    /// Most connections open at once, across all loops (default 16384);
    /// more are accepted and closed at once (ioe_net_stats.rejected).
    pub max_connections: u32,
    /// listen(2) backlog (default 1024).
    pub backlog: u32,
    /// Queued output at which on_high_water runs (default 64 MiB).
    pub high_water: u64,
    /// IOE_SERVER_* bits.
    pub flags: u32,
    /// With IOE_SERVER_SQPOLL: idle milliseconds before the kernel thread sleeps.
    pub sqpoll_idle_ms: u32,
    /// With IOE_SERVER_SQPOLL_CPU: the CPU of the polling thread.
    pub sqpoll_cpu: u32,
    /// With IOE_SERVER_CQSIZE: completion-queue entries per loop, at least
    /// the submission queue's (1024), at most 65536. By default each loop's
    /// CQ is sized so that it cannot overflow: 4 entries per connection it
    /// may hold, one per receive buffer, the backlog, a few more.
    pub cq_size: u32,
    /// io_uring: receive buffers per loop, a power of two up to 32768
    /// (default 256), lent to connections one per receive completion (an
    /// idle connection holds none), and their size (default 16 KiB, at most
    /// 16 MiB; all of a loop's together at most 1 GiB). Checked on both
    /// backends: -EINVAL otherwise.
    pub recv_buffers: u32,
    pub recv_buffer_size: u32,
    /// Lingering close, in milliseconds (default 5000). A graceful close
    /// (ioe_conn_close) whose output has gone out shuts the write side
    /// down, then keeps reading and dropping what the peer still sends
    /// until the peer closes too or this time has passed, and only then
    /// closes the socket: closing with the peer's data unread, or
    /// receiving data after closing, makes the kernel reset the connection
    /// and throw away output the peer has not received yet. on_close runs
    /// when the socket closes; meanwhile the connection counts in
    /// ioe_net_stats.connections and .lingering, and no other callback
    /// runs for it. 0: close at once (late data from the peer may then
    /// cost it the end of the output).
    pub linger_ms: u32,
    /// Must be zero.
    pub reserved: [u64; 4],
}

/// What a server calls back. Every callback runs on the event loop thread
/// that owns the connection and must not block; `conn` is valid during the
/// call (keep it with ioe_conn_ref). From a callback every ioe_conn_*
/// function may be called, on any connection; ioe_server_stop and
/// ioe_server_destroy may not (-EDEADLK, also while another thread is
/// stopping the server), nor ioe_server_start (-EINVAL).
#[repr(C)]
pub struct ioe_server_callbacks {
    /// A connection was accepted. May be NULL.
    pub on_connect: Option<unsafe extern "C" fn(conn: *mut ioe_conn, user_data: *mut c_void)>,
    /// Bytes arrived: `data` is valid only during the call (it may point
    /// into the loop's receive buffers). Returns how many bytes it consumed
    /// (at most `len`); the rest is kept and passed again, in front of the
    /// next bytes, so a parser can wait for a whole message. A large
    /// payload may be taken straight into a buffer of the application's
    /// instead (ioe_conn_recv_into, called from here). Required.
    pub on_data: Option<
        unsafe extern "C" fn(conn: *mut ioe_conn, data: *const c_void, len: usize, user_data: *mut c_void) -> usize,
    >,
    /// The peer sends no more (it closed or shut down its write side).
    /// The connection stays open for sending until the application closes
    /// it; a reset or error from the peer after this ends it (on_close with
    /// the socket's error), on both backends. NULL: the connection closes
    /// once its queued output is sent.
    pub on_eof: Option<unsafe extern "C" fn(conn: *mut ioe_conn, user_data: *mut c_void)>,
    /// All queued output was handed to the kernel. May be NULL.
    pub on_write_complete: Option<unsafe extern "C" fn(conn: *mut ioe_conn, user_data: *mut c_void)>,
    /// Queued output rose past the high-water mark (once per rise). May be NULL.
    pub on_high_water: Option<unsafe extern "C" fn(conn: *mut ioe_conn, queued: usize, user_data: *mut c_void)>,
    /// The connection closed: exactly once per connection, and last. `error`
    /// is 0 for a requested close or a clean end by the peer, else the
    /// positive errno that ended it (ECONNRESET, EPIPE; ECANCELED when the
    /// server stopped). May be NULL.
    pub on_close: Option<unsafe extern "C" fn(conn: *mut ioe_conn, error: c_int, user_data: *mut c_void)>,
    /// Passed to every callback; used from the loop threads.
    pub user_data: *mut c_void,
}

/// Counters of a server, summed over its loops.
#[repr(C)]
pub struct ioe_net_stats {
    /// Connections open now.
    pub connections: u64,
    /// Connections accepted since start.
    pub accepted: u64,
    /// Connections accepted and closed at once, never seen by on_connect:
    /// max_connections were open, or the server was stopping.
    pub rejected: u64,
    /// io_uring: completions a loop's CQ could not keep (0 by design).
    pub cq_overflows: u64,
    /// io_uring: receives that paused because their loop's receive buffers
    /// were all in use (they resume as buffers return).
    pub recv_starved: u64,
    /// Times accepting paused for 100 ms because the process was out of
    /// descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM).
    pub accept_pauses: u64,
    /// Connections whose graceful close is waiting for the peer to finish
    /// (see ioe_server_options.linger_ms); counted in `connections` too.
    pub lingering: u64,
    /// Zero; room for more counters.
    pub reserved: [u64; 5],
}

/// A TCP server (opaque).
pub struct ioe_server {
    server: TcpServer,
}

/// A connection (opaque). Pointers given to callbacks are borrowed for the
/// call; ioe_conn_ref makes one that stays valid, for use from any thread,
/// until ioe_conn_unref, also after the connection closed (operations then
/// fail with -ENOTCONN).
pub struct ioe_conn {
    _private: [u8; 0],
}

/// The C callbacks as a server handler.
struct FfiHandler {
    callbacks: ioe_server_callbacks,
}

// SAFETY: the header makes the callbacks and user_data usable from the loop
// threads; the engine only calls them and passes user_data along.
unsafe impl Send for FfiHandler {}
// SAFETY: as above; the handler holds nothing it mutates.
unsafe impl Sync for FfiHandler {}

fn conn_ptr(conn: &Connection) -> *mut ioe_conn {
    Arc::as_ptr(&conn.0) as *mut ioe_conn
}

impl ServerHandler for FfiHandler {
    fn on_connect(&self, conn: &Connection) {
        if let Some(f) = self.callbacks.on_connect {
            // SAFETY: a C callback with the arguments its signature documents.
            unsafe { f(conn_ptr(conn), self.callbacks.user_data) }
        }
    }

    fn on_data(&self, conn: &Connection, data: &[u8]) -> usize {
        match self.callbacks.on_data {
            // SAFETY: as above; `data` is valid for the call.
            Some(f) => unsafe {
                f(conn_ptr(conn), data.as_ptr() as *const c_void, data.len(), self.callbacks.user_data)
            },
            None => data.len(),
        }
    }

    fn on_eof(&self, conn: &Connection) {
        match self.callbacks.on_eof {
            // SAFETY: as above.
            Some(f) => unsafe { f(conn_ptr(conn), self.callbacks.user_data) },
            None => conn.close(),
        }
    }

    fn on_write_complete(&self, conn: &Connection) {
        if let Some(f) = self.callbacks.on_write_complete {
            // SAFETY: as above.
            unsafe { f(conn_ptr(conn), self.callbacks.user_data) }
        }
    }

    fn on_high_water(&self, conn: &Connection, queued: usize) {
        if let Some(f) = self.callbacks.on_high_water {
            // SAFETY: as above.
            unsafe { f(conn_ptr(conn), queued, self.callbacks.user_data) }
        }
    }

    fn on_close(&self, conn: &Connection, error: i32) {
        if let Some(f) = self.callbacks.on_close {
            // SAFETY: as above.
            unsafe { f(conn_ptr(conn), error, self.callbacks.user_data) }
        }
    }
}

/// Fills `*opts` with defaults: 0.0.0.0, port 0, auto backend, one loop per
/// CPU, TCP_NODELAY. Returns 0 or -EINVAL (NULL).
#[no_mangle]
pub extern "C" fn ioe_server_options_init(opts: *mut ioe_server_options) -> c_int {
    guard(|| {
        if opts.is_null() {
            return -libc::EINVAL;
        }
        let d = ServerOptions::new(SocketAddr::from(([0, 0, 0, 0], 0)));
        let defaults = ioe_server_options {
            address: std::ptr::null(),
            port: 0,
            backend: IOE_NET_BACKEND_AUTO,
            threads: d.threads as u32,
            max_connections: d.max_connections as u32,
            backlog: d.backlog as u32,
            high_water: d.high_water as u64,
            flags: 0,
            sqpoll_idle_ms: 0,
            sqpoll_cpu: 0,
            cq_size: 0,
            recv_buffers: d.recv_buffers as u32,
            recv_buffer_size: d.recv_buffer_size,
            linger_ms: d.linger.as_millis().min(u32::MAX as u128) as u32,
            reserved: [0; 4],
        };
        // SAFETY: non-null; the caller promises writable memory for the struct.
        unsafe { opts.write(defaults) };
        0
    })
}

fn options_from_c(opts: &ioe_server_options) -> Result<ServerOptions, c_int> {
    let invalid = Err(-libc::EINVAL);
    if opts.flags & !KNOWN_SERVER_FLAGS != 0
        || opts.flags & IOE_SERVER_IOPOLL != 0
        || opts.reserved.iter().any(|&r| r != 0)
    {
        return invalid;
    }
    let mut unix_path = None;
    let ip: IpAddr = if opts.address.is_null() {
        IpAddr::from([0, 0, 0, 0])
    } else {
        // SAFETY: a non-null address is a NUL-terminated string (caller's contract).
        let text = unsafe { CStr::from_ptr(opts.address) };
        let bytes = text.to_bytes();
        if let Some(path) = bytes.strip_prefix(b"unix:").or(bytes.starts_with(b"/").then_some(bytes)) {
            use std::os::unix::ffi::OsStrExt;
            unix_path = Some(std::path::PathBuf::from(std::ffi::OsStr::from_bytes(path)));
            IpAddr::from([0, 0, 0, 0])
        } else {
            match text.to_str().ok().and_then(|t| t.parse().ok()) {
                Some(ip) => ip,
                None => return invalid,
            }
        }
    };
    let backend = match opts.backend {
        IOE_NET_BACKEND_AUTO => NetBackend::Auto,
        IOE_NET_BACKEND_URING => NetBackend::Uring,
        IOE_NET_BACKEND_EPOLL => NetBackend::Epoll,
        _ => return invalid,
    };
    let sqpoll = opts.flags & IOE_SERVER_SQPOLL != 0;
    if opts.flags & IOE_SERVER_SQPOLL_CPU != 0 && !sqpoll {
        return invalid;
    }
    if opts.recv_buffers == 0
        || opts.recv_buffers > 32768
        || opts.high_water == 0
        || opts.high_water > usize::MAX as u64
    {
        return invalid;
    }
    let mut core = ServerOptions::new(SocketAddr::new(ip, opts.port));
    core.unix_path = unix_path;
    core.backend = backend;
    core.threads = opts.threads as usize;
    core.max_connections = opts.max_connections as usize;
    core.backlog = opts.backlog.min(i32::MAX as u32) as i32;
    core.high_water = opts.high_water as usize;
    core.nodelay = opts.flags & IOE_SERVER_NAGLE == 0;
    core.recv_buffers = opts.recv_buffers as u16;
    core.recv_buffer_size = opts.recv_buffer_size;
    core.cq_entries = (opts.flags & IOE_SERVER_CQSIZE != 0).then_some(opts.cq_size);
    core.sqpoll_idle_ms = sqpoll.then_some(opts.sqpoll_idle_ms);
    core.sqpoll_cpu = (opts.flags & IOE_SERVER_SQPOLL_CPU != 0).then_some(opts.sqpoll_cpu);
    core.linger = std::time::Duration::from_millis(opts.linger_ms as u64);
    core.validate().map_err(|e| neg(&e))?;
    Ok(core)
}

/// Creates a server: binds and listens (so its port is known and
/// connections queue up) and chooses the backend; nothing is accepted
/// before ioe_server_start. `callbacks` is copied. Stores the handle in
/// `*out` (NULL on failure).
///
/// Returns 0; -EINVAL (NULL argument, NULL on_data, an address that is not
/// numeric IPv4/IPv6, unknown backend or flag, IOE_SERVER_IOPOLL, bad
/// sizes, non-zero reserved fields, malformed IOENGINE_NET_BACKEND);
/// -EADDRINUSE, -EACCES and other bind/listen errors; -ENOSYS, -EPERM,
/// -EACCES or -EOPNOTSUPP when io_uring was requested and cannot run.
#[no_mangle]
pub extern "C" fn ioe_server_create(
    opts: *const ioe_server_options,
    callbacks: *const ioe_server_callbacks,
    out: *mut *mut ioe_server,
) -> c_int {
    guard(|| {
        if out.is_null() {
            return -libc::EINVAL;
        }
        // SAFETY: non-null; the caller promises it is writable.
        unsafe { *out = std::ptr::null_mut() };
        // SAFETY: non-null pointers point to initialised structs (caller's contract).
        let (Some(opts), Some(callbacks)) = (unsafe { opts.as_ref() }, unsafe { callbacks.as_ref() }) else {
            return -libc::EINVAL;
        };
        if callbacks.on_data.is_none() {
            return -libc::EINVAL;
        }
        let core = match options_from_c(opts) {
            Ok(core) => core,
            Err(e) => return e,
        };
        let handler = Arc::new(FfiHandler {
            callbacks: ioe_server_callbacks {
                on_connect: callbacks.on_connect,
                on_data: callbacks.on_data,
                on_eof: callbacks.on_eof,
                on_write_complete: callbacks.on_write_complete,
                on_high_water: callbacks.on_high_water,
                on_close: callbacks.on_close,
                user_data: callbacks.user_data,
            },
        });
        match TcpServer::bind(&core, handler) {
            Ok(server) => {
                // SAFETY: out checked above.
                unsafe { *out = Box::into_raw(Box::new(ioe_server { server })) };
                0
            }
            Err(e) => neg(&e),
        }
    })
}

fn server_ref<'a>(server: *const ioe_server) -> Option<&'a ioe_server> {
    // SAFETY: a non-null handle is a live pointer from ioe_server_create
    // (caller's contract: not destroyed while other calls use it).
    unsafe { server.as_ref() }
}

/// Starts the event loops and accepting. Returns 0; -EINVAL (NULL, already
/// started or stopped); -EAGAIN (a thread could not be created); the error
/// of a loop's set-up.
#[no_mangle]
pub extern "C" fn ioe_server_start(server: *mut ioe_server) -> c_int {
    guard(|| match server_ref(server) {
        Some(s) => s.server.start().map_or_else(|e| neg(&e), |()| 0),
        None => -libc::EINVAL,
    })
}

/// Stops: accepting ends, every connection is closed (on_close runs with
/// ECANCELED; queued output is dropped; a connection lingering after
/// ioe_conn_close closes cleanly, error 0), the loops end and their threads
/// are joined, every descriptor is closed. Block requests submitted with
/// ioe_conn_submit complete first and their callbacks run (on the loop
/// threads) before the loops end; a callback that submits again keeps its
/// loop running until that request completes too. Idempotent. Returns 0, -EINVAL
/// (NULL) or -EDEADLK (called from one of the server's callbacks; nothing
/// happens).
#[no_mangle]
pub extern "C" fn ioe_server_stop(server: *mut ioe_server) -> c_int {
    guard(|| match server_ref(server) {
        Some(s) => s.server.stop().map_or_else(|e| neg(&e), |()| 0),
        None => -libc::EINVAL,
    })
}

/// Stops (as ioe_server_stop) and frees the server. Returns 0, -EINVAL
/// (NULL) or -EDEADLK (from one of its callbacks; nothing happens). The
/// handle must not be used afterwards.
#[no_mangle]
pub extern "C" fn ioe_server_destroy(server: *mut ioe_server) -> c_int {
    guard(|| {
        let Some(s) = server_ref(server) else { return -libc::EINVAL };
        if let Err(e) = s.server.stop() {
            return neg(&e);
        }
        // SAFETY: non-null handle from ioe_server_create, given up by the caller.
        drop(unsafe { Box::from_raw(server) });
        0
    })
}

/// The port the server listens on; -EINVAL for NULL.
#[no_mangle]
pub extern "C" fn ioe_server_port(server: *const ioe_server) -> c_int {
    guard(|| server_ref(server).map_or(-libc::EINVAL, |s| s.server.local_addr().port() as c_int))
}

/// The backend running the server: IOE_NET_BACKEND_URING or
/// IOE_NET_BACKEND_EPOLL; -EINVAL for NULL.
#[no_mangle]
pub extern "C" fn ioe_server_backend(server: *const ioe_server) -> c_int {
    guard(|| {
        server_ref(server).map_or(-libc::EINVAL, |s| match s.server.backend() {
            NetBackend::Epoll => IOE_NET_BACKEND_EPOLL as c_int,
            _ => IOE_NET_BACKEND_URING as c_int,
        })
    })
}

/// Why an IOE_NET_BACKEND_AUTO server runs on epoll: the negative errno
/// io_uring failed with (-ENOSYS, -EPERM, -EACCES, -EOPNOTSUPP, -ENOMEM, as
/// ioe_context_fallback_reason). 0 when it runs what was asked for;
/// -EINVAL for NULL.
#[no_mangle]
pub extern "C" fn ioe_server_fallback_reason(server: *const ioe_server) -> c_int {
    guard(|| server_ref(server).map_or(-libc::EINVAL, |s| s.server.fallback_reason().map_or(0, |e| neg(&e))))
}

/// The io_uring set-up flags in force on the server's rings
/// (IORING_SETUP_* bits, e.g. SINGLE_ISSUER and DEFER_TASKRUN on 6.1+,
/// COOP_TASKRUN on 5.19); 0 on epoll or before start; -EINVAL for NULL.
#[no_mangle]
pub extern "C" fn ioe_server_setup_flags(server: *const ioe_server) -> i64 {
    guard64(|| server_ref(server).map_or(-(libc::EINVAL as i64), |s| s.server.setup_flags() as i64))
}

/// Copies the counters into `*out`. Returns 0 or -EINVAL (NULL argument).
#[no_mangle]
pub extern "C" fn ioe_server_stats(server: *const ioe_server, out: *mut ioe_net_stats) -> c_int {
    guard(|| {
        let Some(s) = server_ref(server) else { return -libc::EINVAL };
        if out.is_null() {
            return -libc::EINVAL;
        }
        let st = s.server.stats();
        let stats = ioe_net_stats {
            connections: st.connections,
            accepted: st.accepted,
            rejected: st.rejected,
            cq_overflows: st.cq_overflows,
            recv_starved: st.recv_starved,
            accept_pauses: st.accept_pauses,
            lingering: st.lingering,
            reserved: [0; 5],
        };
        // SAFETY: non-null; the caller promises it is writable.
        unsafe { out.write(stats) };
        0
    })
}

/// Borrows a connection handle as the core's `Connection` without touching
/// its reference count.
fn with_conn<R>(conn: *const ioe_conn, fallback: R, f: impl FnOnce(&Connection) -> R) -> R {
    if conn.is_null() {
        return fallback;
    }
    // SAFETY: a non-null handle is a live Arc<ConnShared> pointer: borrowed in
    // a callback, or a reference from ioe_conn_ref (caller's contract). The
    // ManuallyDrop keeps the count as it is.
    let conn = ManuallyDrop::new(Connection(unsafe { Arc::from_raw(conn as *const ConnShared) }));
    f(&conn)
}

/// A reference to the connection that stays valid, for use from any thread,
/// until ioe_conn_unref (also after the connection closed). Returns `conn`,
/// or NULL for NULL.
#[no_mangle]
pub extern "C" fn ioe_conn_ref(conn: *mut ioe_conn) -> *mut ioe_conn {
    guard_or(std::ptr::null_mut(), || {
        if conn.is_null() {
            return std::ptr::null_mut();
        }
        // SAFETY: a live Arc<ConnShared> pointer (see with_conn): one more reference.
        unsafe { Arc::increment_strong_count(conn as *const ConnShared) };
        conn
    })
}

/// Drops a reference from ioe_conn_ref. Returns 0 or -EINVAL (NULL).
#[no_mangle]
pub extern "C" fn ioe_conn_unref(conn: *mut ioe_conn) -> c_int {
    guard(|| {
        if conn.is_null() {
            return -libc::EINVAL;
        }
        // SAFETY: the caller gives up a reference it got from ioe_conn_ref.
        unsafe { Arc::decrement_strong_count(conn as *const ConnShared) };
        0
    })
}

/// Runs a block request (as ioe_submit takes it: read, write, readv,
/// writev, fsync, fdatasync, fallocate; `rw_flags` honoured, `channel`
/// ignored) on the connection's event loop instead of a block-engine
/// context. Its callback runs on the loop thread, where it may send
/// (without a wake-up) and submit again. Any thread may call it.
///
/// On an io_uring server the request goes to the kernel with the loop's
/// next batch, on the loop's own ring: called from one of the connection's
/// callbacks this costs no thread hop, so a server answering from a file
/// receives, reads and replies on one thread. At most 256 per loop are in
/// flight; more wait their turn.
///
/// On an epoll server (no ring) helper threads of the loop, started as
/// requests need them, run requests with blocking calls (preadv2, pwritev2,
/// fsync, fdatasync, fallocate) and hand them back to the loop for their
/// callbacks: up to 4 for regular files and block devices, plus one per
/// request in flight on a pipe, socket or character device (up to 60), so
/// that a read that waits on a stream holds up no file request. If not
/// even one helper can be started, the callback runs with -EAGAIN.
///
/// The request does not depend on the connection staying open (its
/// callback runs even after on_close). A server stop waits for the
/// requests in flight, and for what their callbacks submit in turn, so a
/// read that never ends (an empty pipe nobody writes) holds the stop.
///
/// Returns 0 (the callback will run exactly once: with -ESHUTDOWN, on the
/// stopping thread, if the server stops before the loop takes it);
/// -ESHUTDOWN once the server has stopped; -EINVAL (NULL conn or req, and
/// what ioe_submit refuses, and IOE_REQ_DRAIN, which only contexts order).
/// No callback on an error.
#[no_mangle]
pub extern "C" fn ioe_conn_submit(conn: *mut ioe_conn, req: *const super::submit::ioe_request) -> c_int {
    guard(|| {
        // SAFETY: a non-null request points to an initialised ioe_request
        // (caller's contract); it is only read.
        let Some(req) = (unsafe { req.as_ref() }) else { return -libc::EINVAL };
        if req.flags & super::submit::IOE_REQ_DRAIN != 0 {
            return -libc::EINVAL;
        }
        let (event, _channel) = match super::submit::event_from_request(req) {
            Ok(built) => built,
            Err(e) => return e,
        };
        with_conn(conn, -libc::EINVAL, |c| match c.submit_file(event) {
            Ok(()) => 0,
            // The refused event is dropped without calling back.
            Err((e, _event)) => neg(&e),
        })
    })
}

/// Queues a copy of `len` bytes for sending; never blocks; any thread.
/// Sends keep the order in which they were queued. Bytes an on_data call
/// sends straight from the `data` it was given are sent from the receive
/// buffer itself, without a copy. Returns 0; -ENOTCONN (the connection is
/// closing, shut for writing, or closed: nothing queued); -EINVAL (NULL
/// conn, or NULL data with len > 0).
#[no_mangle]
pub extern "C" fn ioe_conn_send(conn: *mut ioe_conn, data: *const c_void, len: usize) -> c_int {
    guard(|| {
        if data.is_null() && len > 0 {
            return -libc::EINVAL;
        }
        let bytes: &[u8] = if len == 0 {
            &[]
        } else {
            // SAFETY: non-null, and the caller promises `len` readable bytes.
            unsafe { std::slice::from_raw_parts(data as *const u8, len) }
        };
        with_conn(conn, -libc::EINVAL, |c| c.send(bytes).map_or_else(|e| neg(&e), |()| 0))
    })
}

/// Called once a borrowed send is over: `result` is its length once every
/// byte has been handed to the kernel, or a negative errno if the
/// connection ended first (-ECANCELED for an abort or a stop, else the
/// socket's error; part of it may have gone out). Runs on the connection's
/// loop thread.
pub type ioe_send_done = Option<unsafe extern "C" fn(user_data: *mut c_void, result: i64)>;

struct BorrowedDone {
    done: unsafe extern "C" fn(*mut c_void, i64),
    user_data: *mut c_void,
}

// SAFETY: the header says the completion runs on a loop thread, so user_data
// must be usable there; the engine only passes it along.
unsafe impl Send for BorrowedDone {}

impl BorrowedDone {
    fn call(self, result: i64) {
        // SAFETY: the C callback and its argument, as documented.
        unsafe { (self.done)(self.user_data, result) }
    }
}

/// Queues `len` bytes at `data` without copying (for large buffers): they
/// must stay valid and unchanged until `done` runs, exactly once, on the
/// connection's loop thread. Any thread. Returns 0; -ENOTCONN (closing or
/// closed: nothing queued, `done` does not run); -EINVAL (NULL conn, data
/// or done, len 0).
#[no_mangle]
pub extern "C" fn ioe_conn_send_borrowed(
    conn: *mut ioe_conn,
    data: *const c_void,
    len: usize,
    done: ioe_send_done,
    user_data: *mut c_void,
) -> c_int {
    guard(|| {
        let Some(done) = done else { return -libc::EINVAL };
        let call = BorrowedDone { done, user_data };
        let done = Box::new(move |outcome: std::io::Result<usize>| {
            let result = match outcome {
                Ok(n) => n as i64,
                Err(e) => -(e.raw_os_error().unwrap_or(libc::EIO) as i64),
            };
            call.call(result);
        });
        with_conn(conn, -libc::EINVAL, |c| {
            // SAFETY: the caller keeps the bytes valid until `done` runs.
            unsafe { c.send_borrowed(data as *const u8, len, done) }.map_or_else(|e| neg(&e), |()| 0)
        })
    })
}

/// Called once a receive into a buffer (ioe_conn_recv_into) is over, on
/// the connection's loop thread: `result` is the buffer's length once every
/// byte is in it, or a negative errno if the connection ended first
/// (-ECONNRESET: the peer finished sending before the buffer was full;
/// -ECANCELED: the application closed or aborted the connection, or the
/// server stopped; else the socket's error). It runs even after a close was
/// asked for, before on_close. From here the
/// application owns the buffer again; it may call ioe_conn_recv_into for the
/// next bytes (not after an error), send, submit and close.
pub type ioe_recv_done =
    Option<unsafe extern "C" fn(conn: *mut ioe_conn, buf: *mut c_void, result: i64, user_data: *mut c_void)>;

struct RecvIntoDone {
    done: unsafe extern "C" fn(*mut ioe_conn, *mut c_void, i64, *mut c_void),
    buf: *mut c_void,
    user_data: *mut c_void,
}

// SAFETY: the header says the completion runs on the loop thread, so
// user_data and the buffer must be usable there; the engine only passes
// them along.
unsafe impl Send for RecvIntoDone {}

impl RecvIntoDone {
    fn call(self, conn: &Connection, result: i64) {
        // SAFETY: the C callback and its arguments, as documented.
        unsafe { (self.done)(conn_ptr(conn), self.buf, result, self.user_data) }
    }
}

/// Puts the next `len` bytes of the connection's stream straight into
/// `buf`: for large payloads (a write request's data) it saves the copy out
/// of the engine's receive buffers, and the buffer may be aligned for
/// O_DIRECT. Call it from the connection's on_data (or from a `done` of its
/// own): the bytes after the ones on_data reports consumed (its return
/// value) go into the buffer first, then the kernel receives the rest into
/// it directly. on_data is not called again until `done` has run; the
/// bytes after the buffer's go to on_data as usual. `done` runs exactly
/// once, on the loop thread: right after on_data returns when the bytes
/// are already there, never inside this call. `buf` must stay valid, and
/// must not be read or freed, until then. Allowed after
/// ioe_conn_shutdown_write (receiving goes on). Returns 0; -EINVAL (NULL
/// conn, buf or done, len 0, or not called from this connection's on_data
/// or done); -EBUSY (called twice in one callback); -ENOTCONN (close or
/// abort asked for, or closed). No callback on an error.
#[no_mangle]
pub extern "C" fn ioe_conn_recv_into(
    conn: *mut ioe_conn,
    buf: *mut c_void,
    len: usize,
    done: ioe_recv_done,
    user_data: *mut c_void,
) -> c_int {
    guard(|| {
        let Some(done) = done else { return -libc::EINVAL };
        let call = RecvIntoDone { done, buf, user_data };
        let done = Box::new(move |c: &Connection, outcome: std::io::Result<usize>| {
            let result = match outcome {
                Ok(n) => n as i64,
                Err(e) => -(e.raw_os_error().unwrap_or(libc::EIO) as i64),
            };
            call.call(c, result);
        });
        with_conn(conn, -libc::EINVAL, |c| {
            // SAFETY: the caller keeps the buffer valid until `done` runs.
            unsafe { c.recv_into(buf as *mut u8, len, done) }.map_or_else(|e| neg(&e), |()| 0)
        })
    })
}

/// Bytes queued and not yet handed to the kernel; -EINVAL for NULL.
#[no_mangle]
pub extern "C" fn ioe_conn_queued(conn: *const ioe_conn) -> i64 {
    guard64(|| with_conn(conn, -(libc::EINVAL as i64), |c| c.queued_bytes() as i64))
}

/// Closes once the queued output is sent (after a lingering wait for the
/// peer, see ioe_server_options.linger_ms); further sends get -ENOTCONN.
/// Once it returns, on_data, on_eof, on_high_water and on_write_complete
/// do not start any more for this connection (data still arriving is
/// dropped; a callback already running on the loop thread finishes); what
/// follows is borrowed sends' done callbacks and on_close. Any thread.
/// Returns 0 or -EINVAL (NULL); closing twice is harmless.
#[no_mangle]
pub extern "C" fn ioe_conn_close(conn: *mut ioe_conn) -> c_int {
    guard(|| {
        with_conn(conn, -libc::EINVAL, |c| {
            c.close();
            0
        })
    })
}

/// Shuts the write side down once the queued output is sent (the peer
/// sees end of file; receiving goes on). Later sends get -ENOTCONN; once
/// the peer has finished too, the connection closes (on_close, error 0).
/// Any thread. Returns 0 or -EINVAL.
#[no_mangle]
pub extern "C" fn ioe_conn_shutdown_write(conn: *mut ioe_conn) -> c_int {
    guard(|| {
        with_conn(conn, -libc::EINVAL, |c| {
            c.shutdown_write();
            0
        })
    })
}

/// Closes now: queued output is dropped (borrowed sends get -ECANCELED)
/// and the peer sees a reset. Any thread. Returns 0 or -EINVAL.
#[no_mangle]
pub extern "C" fn ioe_conn_abort(conn: *mut ioe_conn) -> c_int {
    guard(|| {
        with_conn(conn, -libc::EINVAL, |c| {
            c.abort();
            0
        })
    })
}

/// Whether the connection has closed: 1 or 0; -EINVAL for NULL.
#[no_mangle]
pub extern "C" fn ioe_conn_is_closed(conn: *const ioe_conn) -> c_int {
    guard(|| with_conn(conn, -libc::EINVAL, |c| c.is_closed() as c_int))
}

/// Keeps an application pointer with the connection. Returns 0 or -EINVAL.
#[no_mangle]
pub extern "C" fn ioe_conn_set_context(conn: *mut ioe_conn, context: *mut c_void) -> c_int {
    guard(|| {
        with_conn(conn, -libc::EINVAL, |c| {
            c.set_context(context);
            0
        })
    })
}

/// The pointer set with ioe_conn_set_context (NULL if none, or for NULL).
#[no_mangle]
pub extern "C" fn ioe_conn_context(conn: *const ioe_conn) -> *mut c_void {
    guard_or(std::ptr::null_mut(), || with_conn(conn, std::ptr::null_mut(), |c| c.context()))
}

/// Writes the peer's address, a struct sockaddr_in or sockaddr_in6, into
/// `addr` (room for `*len` bytes; a struct sockaddr_storage always fits)
/// and its size into `*len`. Returns 0; -ENOTCONN (unknown, or a
/// connection on a Unix socket); -ENOSPC
/// (`*len` too small); -EINVAL (NULL argument).
#[no_mangle]
pub extern "C" fn ioe_conn_peer(conn: *const ioe_conn, addr: *mut c_void, len: *mut u32) -> c_int {
    guard(|| {
        if addr.is_null() || len.is_null() {
            return -libc::EINVAL;
        }
        with_conn(conn, -libc::EINVAL, |c| {
            let Some(peer) = c.peer_addr() else { return -libc::ENOTCONN };
            let (storage, size) = crate::net::socket::to_sockaddr(&peer);
            // SAFETY: non-null; the caller promises *len is readable and writable.
            let room = unsafe { *len } as usize;
            if room < size as usize {
                return -libc::ENOSPC;
            }
            // SAFETY: `size` bytes fit in the caller's buffer (checked above);
            // the source is our sockaddr_storage.
            unsafe {
                std::ptr::copy_nonoverlapping(&storage as *const _ as *const u8, addr as *mut u8, size as usize);
                *len = size;
            }
            0
        })
    })
}
