//! ioe-demo: a short, self-checking run of the engine on a temporary file.
//!
//! For each backend (auto, then io_uring and AIO forced) it writes every 4 KiB
//! block of a file in random order with a pattern derived from the block
//! number, reads them all back in another random order and checks every
//! byte, then shows the engine's threads use no CPU while idle.
//!
//! Usage: ioe-demo [--size-mib N] [--depth N] [--direct] [--path DIR]

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{unbounded, Sender};
use ioengine::{Backend, Buffer, ContextOptions, IOAction, IOCallbackCustom, IOChannel, IOContext, IOEvent, IOWorkers};

const BLOCK: usize = 4096;

/// Per-phase completion state; the callback holds an `Arc` of it.
struct Phase {
    errors: AtomicU64,
    mismatches: AtomicU64,
    done: Sender<()>,
}

/// The callback type: a plain struct, no closure allocation per I/O.
struct DemoCb(Arc<Phase>);

impl IOCallbackCustom for DemoCb {
    fn call(self, event: Box<IOEvent<Self>>) {
        let phase = &self.0;
        match event.result() {
            Some(n) if n == BLOCK as i64 => {
                if event.action() == IOAction::Read {
                    let block = event.offset() / BLOCK as u64;
                    let buf = event.buffer().map(|b| b.as_slice()).unwrap_or(&[]);
                    if !matches_pattern(buf, block) {
                        phase.mismatches.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ => {
                phase.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        let _ = phase.done.send(());
    }
}

fn fill_pattern(buf: &mut [u8], block: u64) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let v = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64;
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
    }
}

fn matches_pattern(buf: &[u8], block: u64) -> bool {
    let mut expected = vec![0u8; buf.len()];
    fill_pattern(&mut expected, block);
    buf == expected.as_slice()
}

/// Random permutation of 0..n (xorshift Fisher-Yates, fixed seed).
fn shuffled(n: u64, seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

/// CPU time (clock ticks) used so far by this process's engine threads.
fn engine_thread_ticks() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    let mut total = 0;
    for task in tasks.flatten() {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !name.starts_with("ioe-") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            total += fields.get(11).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
            total += fields.get(12).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    total
}

struct Config {
    size_mib: u64,
    depth: usize,
    direct: bool,
    dir: std::path::PathBuf,
}

fn parse_args() -> Result<Config, String> {
    let mut cfg = Config { size_mib: 64, depth: 64, direct: false, dir: std::env::temp_dir() };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--size-mib" => cfg.size_mib = value("--size-mib")?.parse().map_err(|e| format!("--size-mib: {e}"))?,
            "--depth" => cfg.depth = value("--depth")?.parse().map_err(|e| format!("--depth: {e}"))?,
            "--direct" => cfg.direct = true,
            "--path" => cfg.dir = value("--path")?.into(),
            "-h" | "--help" => return Err("usage: ioe-demo [--size-mib N] [--depth N] [--direct] [--path DIR]".into()),
            other => return Err(format!("unknown option {other:?}; try --help")),
        }
    }
    if cfg.size_mib == 0 || cfg.depth == 0 {
        return Err("--size-mib and --depth must be positive".into());
    }
    Ok(cfg)
}

fn run_phase(ctx: &IOContext<DemoCb>, fd: i32, action: IOAction, order: &[u64]) -> Result<Duration, String> {
    let (done_tx, done_rx) = unbounded();
    let phase = Arc::new(Phase { errors: AtomicU64::new(0), mismatches: AtomicU64::new(0), done: done_tx });
    let start = Instant::now();
    for &block in order {
        let mut buf = Buffer::aligned(BLOCK).map_err(|e| format!("allocating a buffer: {e}"))?;
        if action == IOAction::Write {
            fill_pattern(buf.as_mut_slice(), block);
        }
        let mut ev = IOEvent::new(fd, buf, action, block * BLOCK as u64);
        ev.set_callback(DemoCb(phase.clone()));
        let channel = if action == IOAction::Write { IOChannel::Write } else { IOChannel::Read };
        ctx.submit(ev, channel).map_err(|e| format!("submit refused: {}", e.error))?;
    }
    for _ in order {
        done_rx.recv_timeout(Duration::from_secs(300)).map_err(|_| "an I/O never completed".to_string())?;
    }
    let elapsed = start.elapsed();
    let (errors, mismatches) = (phase.errors.load(Ordering::Relaxed), phase.mismatches.load(Ordering::Relaxed));
    if errors > 0 || mismatches > 0 {
        return Err(format!("{errors} I/O errors, {mismatches} blocks read back wrong"));
    }
    Ok(elapsed)
}

fn run_backend(cfg: &Config, backend: Backend, workers: &IOWorkers<DemoCb>) -> Result<(), String> {
    let path = cfg.dir.join(format!("ioe-demo-{}-{}", std::process::id(), backend.name()));
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(true);
    if cfg.direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    let file = opts.open(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
    let _cleanup = RemoveOnDrop(path.clone());
    let blocks = cfg.size_mib * 1024 * 1024 / BLOCK as u64;
    file.set_len(blocks * BLOCK as u64).map_err(|e| format!("sizing the file: {e}"))?;

    let ctx = IOContext::with_options(&ContextOptions { backend, ..ContextOptions::with_depth(cfg.depth) }, workers)
        .map_err(|e| format!("starting the {backend} context: {e}"))?;
    println!(
        "backend {:<8} (asked {:<8}) depth {}  file {} ({} MiB, {})",
        ctx.backend().name(),
        backend.name(),
        cfg.depth,
        path.display(),
        cfg.size_mib,
        if cfg.direct { "O_DIRECT" } else { "page cache" }
    );
    let fd = file.as_raw_fd();
    for (action, seed) in [(IOAction::Write, 0x5eed), (IOAction::Read, 0xbeef)] {
        let elapsed = run_phase(&ctx, fd, action, &shuffled(blocks, seed))?;
        let iops = blocks as f64 / elapsed.as_secs_f64();
        println!(
            "  random 4 KiB {:<5} {:>7} I/Os in {:>7.3} s = {:>9.0} IOPS {:>7.1} MiB/s{}",
            if action == IOAction::Write { "write" } else { "read" },
            blocks,
            elapsed.as_secs_f64(),
            iops,
            iops * BLOCK as f64 / (1024.0 * 1024.0),
            if action == IOAction::Read { ", every byte verified" } else { "" }
        );
    }
    let before = engine_thread_ticks();
    std::thread::sleep(Duration::from_millis(500));
    let idle_ticks = engine_thread_ticks() - before;
    let s = ctx.stats();
    println!(
        "  counters: submitted {} completed {} failed {} in flight {} pending {}; idle 0.5 s used {} CPU ticks",
        s.submitted, s.completed, s.failed, s.in_flight, s.pending, idle_ticks
    );
    drop(ctx);
    Ok(())
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn main() -> ExitCode {
    let cfg = match parse_args() {
        Ok(cfg) => cfg,
        Err(msg) => {
            eprintln!("ioe-demo: {msg}");
            return ExitCode::from(2);
        }
    };
    let workers = match IOWorkers::new(0) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("ioe-demo: starting callback workers: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("ioengine demo: io_uring usable here: {}", ioengine::uring_supported());
    for backend in [Backend::Auto, Backend::Uring, Backend::Aio] {
        if let Err(msg) = run_backend(&cfg, backend, &workers) {
            eprintln!("ioe-demo: {backend}: {msg}");
            return ExitCode::FAILURE;
        }
    }
    println!("ok: all data verified on every backend");
    ExitCode::SUCCESS
}
