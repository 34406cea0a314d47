//! Helpers shared by the integration tests: temporary files, a completion
//! collector and a deterministic pseudo-random generator.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam::channel::{unbounded, Receiver, Sender};
use ioengine::{Backend, Buffer, ClosureCb, ContextOptions, IOAction, IOContext, IOEvent, IOWorkers};

/// Guards against a hang only; never a timing assertion.
pub const HANG_GUARD: Duration = Duration::from_secs(120);

/// Both drivers, each forced explicitly.
pub const BACKENDS: [Backend; 2] = [Backend::Uring, Backend::Aio];

/// The drivers that can run on this machine. One that cannot (io_uring
/// disabled by sysctl or seccomp, AIO's fs.aio-max-nr used up) is reported
/// as skipped, once per test binary; any other failure fails the test.
pub fn backends() -> Vec<Backend> {
    static AVAILABLE: std::sync::OnceLock<Vec<Backend>> = std::sync::OnceLock::new();
    AVAILABLE
        .get_or_init(|| {
            let workers = IOWorkers::<ClosureCb>::new(0).unwrap();
            BACKENDS
                .into_iter()
                .filter(|&backend| {
                    let opts = ContextOptions { backend, ..ContextOptions::with_depth(1) };
                    match IOContext::with_options(&opts, &workers) {
                        Ok(_) => true,
                        Err(e) if unavailable(backend, &e) => {
                            // Straight to stderr, past the test harness's capture.
                            use std::io::Write;
                            let _ = writeln!(std::io::stderr(), "SKIP {backend}: not available here ({e})");
                            false
                        }
                        Err(e) => panic!("{backend} context: {e}"),
                    }
                })
                .collect()
        })
        .clone()
}

fn unavailable(backend: Backend, err: &std::io::Error) -> bool {
    let errno = err.raw_os_error().unwrap_or(0);
    matches!(errno, libc::ENOSYS | libc::EPERM | libc::EACCES | libc::EOPNOTSUPP)
        || (backend == Backend::Aio && errno == libc::EAGAIN)
}

/// Whether `backend` can run here (see `backends`).
pub fn available(backend: Backend) -> bool {
    backends().contains(&backend)
}

/// A file under the system temp dir, removed on drop.
pub struct TempFile {
    pub path: PathBuf,
    pub file: File,
}

static NEXT_FILE: AtomicU64 = AtomicU64::new(0);

impl TempFile {
    pub fn new(tag: &str, size: u64, direct: bool) -> TempFile {
        let path = std::env::temp_dir().join(format!(
            "ioengine-test-{}-{}-{}",
            std::process::id(),
            tag,
            NEXT_FILE.fetch_add(1, Ordering::Relaxed)
        ));
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(true);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(&path).expect("create temp file");
        file.set_len(size).expect("size temp file");
        TempFile { path, file }
    }

    pub fn fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.file.as_raw_fd()
    }

    /// Reads the whole file through the page cache, independent of the engine.
    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).expect("read back temp file")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// xorshift64*: deterministic data and offsets without a crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// What a callback reports: the event's tag, its result, and its buffer.
pub struct Done {
    pub tag: u64,
    pub result: i64,
    pub action: IOAction,
    pub offset: u64,
    pub buf: Option<Buffer>,
}

/// Collects completions through a channel; every callback sends one `Done`.
#[derive(Clone)]
pub struct Collector {
    tx: Sender<Done>,
    rx: Receiver<Done>,
}

impl Collector {
    pub fn new() -> Collector {
        let (tx, rx) = unbounded();
        Collector { tx, rx }
    }

    /// Attaches a callback that reports to this collector.
    pub fn attach(&self, ev: &mut IOEvent<ClosureCb>, tag: u64) {
        self.attach_then(ev, tag, || {});
    }

    /// Attaches a callback that runs `first`, then reports to this collector.
    pub fn attach_then(&self, ev: &mut IOEvent<ClosureCb>, tag: u64, first: impl FnOnce() + Send + 'static) {
        ev.user_tag = tag;
        let tx = self.tx.clone();
        ev.set_callback(ClosureCb::new(move |mut ev| {
            first();
            let done = Done {
                tag: ev.user_tag,
                result: ev.result().expect("callback without a result"),
                action: ev.action(),
                offset: ev.offset(),
                buf: ev.take_buffer(),
            };
            let _ = tx.send(done);
        }));
    }

    pub fn event(&self, fd: i32, buf: Buffer, action: IOAction, offset: u64, tag: u64) -> Box<IOEvent<ClosureCb>> {
        let mut ev = IOEvent::new(fd, buf, action, offset);
        self.attach(&mut ev, tag);
        ev
    }

    /// Waits for exactly `n` completions.
    pub fn wait(&self, n: usize) -> Vec<Done> {
        (0..n)
            .map(|i| self.rx.recv_timeout(HANG_GUARD).unwrap_or_else(|_| panic!("completion {i} of {n} never came")))
            .collect()
    }

    /// Completions already delivered, without waiting.
    pub fn drain_ready(&self) -> Vec<Done> {
        self.rx.try_iter().collect()
    }

    pub fn wait_one(&self) -> Done {
        self.wait(1).pop().unwrap()
    }
}

pub fn context(backend: Backend, depth: usize, workers: &IOWorkers<ClosureCb>) -> Arc<IOContext<ClosureCb>> {
    let opts = ContextOptions { backend, ..ContextOptions::with_depth(depth) };
    let ctx = IOContext::with_options(&opts, workers).unwrap_or_else(|e| panic!("{backend} context: {e}"));
    assert_eq!(ctx.backend(), backend);
    ctx
}

/// Worker pools to run each behaviour with: inline and a thread pool.
pub fn worker_modes() -> Vec<IOWorkers<ClosureCb>> {
    vec![IOWorkers::new(0).unwrap(), IOWorkers::new(2).unwrap()]
}
