//! Random 4 KiB reads (or writes) through io-engine 0.12 at a fixed queue
//! depth, as `ioe-bench` runs them through ioengine: each completion's
//! callback submits the next request. `--workers 0` runs callbacks inline on
//! the crate's completion thread (its `InlineClosure`); `--workers 1` hands
//! them over a channel to one callback thread, as ioengine's pool does.
//! Prints one JSON line: IOPS and process CPU time per I/O.

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossfire::mpsc;
use io_buffer::Buffer;
use io_engine::{setup, Driver, IOAction, IOEvent, InlineClosure};

struct Options {
    backend: String,
    filename: String,
    size: u64,
    iodepth: usize,
    runtime: f64,
    direct: bool,
    write: bool,
    workers: usize,
}

fn parse_size(s: &str) -> u64 {
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_lowercase()) {
        Some('k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().unwrap_or_else(|_| usage(&format!("bad size {s}"))) * mult
}

fn usage(why: &str) -> ! {
    eprintln!("io-engine-peer: {why}");
    eprintln!(
        "usage: io-engine-peer --filename PATH [--size 1g] [--iodepth 32] [--runtime 5] \
         [--backend uring|aio] [--direct 0|1] [--rw randread|randwrite] [--workers 0|1]"
    );
    std::process::exit(2)
}

fn parse_options() -> Options {
    let mut o = Options {
        backend: "uring".into(),
        filename: String::new(),
        size: 1 << 30,
        iodepth: 32,
        runtime: 5.0,
        direct: false,
        write: false,
        workers: 0,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_else(|| usage(&format!("{} needs a value", args[i])));
        match args[i].as_str() {
            "--backend" => o.backend = value,
            "--filename" => o.filename = value,
            "--size" => o.size = parse_size(&value),
            "--iodepth" => o.iodepth = value.parse().unwrap_or_else(|_| usage("bad --iodepth")),
            "--runtime" => o.runtime = value.parse().unwrap_or_else(|_| usage("bad --runtime")),
            "--direct" => o.direct = value == "1",
            "--rw" => o.write = value == "randwrite",
            "--workers" => o.workers = value.parse().unwrap_or_else(|_| usage("bad --workers")),
            other => usage(&format!("unknown option {other}")),
        }
        i += 2;
    }
    if o.filename.is_empty() || o.iodepth == 0 || o.workers > 1 {
        usage("--filename is required, --iodepth at least 1, --workers 0 or 1");
    }
    o
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF covers every thread of the process.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Run state shared by the callbacks.
struct Run {
    stop: AtomicBool,
    completed: AtomicU64,
    errors: AtomicU64,
    in_flight: Mutex<usize>,
    idle: Condvar,
    blocks: u64,
    seed: AtomicU64,
}

impl Run {
    fn next_offset(&self) -> i64 {
        // xorshift on a shared state: contention is the same for every engine.
        let mut x = self.seed.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x, Ordering::Relaxed);
        ((x % self.blocks) * 4096) as i64
    }

    /// After a completion: the next request, or one fewer in flight.
    fn next(&self, buf: Buffer) -> Option<(Buffer, i64)> {
        if self.stop.load(Ordering::Relaxed) {
            let mut n = self.in_flight.lock().unwrap();
            *n -= 1;
            if *n == 0 {
                self.idle.notify_all();
            }
            return None;
        }
        Some((buf, self.next_offset()))
    }
}

fn main() {
    let o = parse_options();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(if o.direct { libc::O_DIRECT } else { 0 })
        .open(&o.filename)
        .unwrap_or_else(|e| usage(&format!("{}: {e}", o.filename)));
    let fd = file.as_raw_fd();
    let driver = match o.backend.as_str() {
        "uring" => Driver::Uring,
        "aio" => Driver::Aio,
        other => usage(&format!("unknown backend {other}")),
    };
    let action = if o.write { IOAction::Write } else { IOAction::Read };
    let run = Arc::new(Run {
        stop: AtomicBool::new(false),
        completed: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        in_flight: Mutex::new(o.iodepth),
        idle: Condvar::new(),
        blocks: (o.size / 4096).max(1),
        seed: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
    });
    let (submit_tx, submit_rx) = mpsc::bounded_blocking::<Box<IOEvent<()>>>(o.iodepth);
    let on_done = {
        let (run, submit_tx) = (run.clone(), submit_tx.clone());
        move |(): (), _offset: i64, res: Result<Option<Buffer>, _>| {
            let buf = match res {
                Ok(Some(buf)) if buf.len() == 4096 => {
                    run.completed.fetch_add(1, Ordering::Relaxed);
                    buf
                }
                _ => {
                    run.errors.fetch_add(1, Ordering::Relaxed);
                    Buffer::aligned(4096).expect("buffer")
                }
            };
            if let Some((buf, offset)) = run.next(buf) {
                let mut ev = IOEvent::new(fd, buf, action, offset);
                ev.set_args(());
                let _ = submit_tx.send(Box::new(ev));
            }
        }
    };
    if o.workers == 0 {
        setup::<(), _, _>(o.iodepth, submit_rx, InlineClosure(Box::new(on_done)), driver).expect("io-engine setup");
    } else {
        let (done_tx, done_rx) = mpsc::bounded_blocking::<Box<IOEvent<()>>>(o.iodepth);
        setup::<(), _, _>(o.iodepth, submit_rx, done_tx, driver).expect("io-engine setup");
        std::thread::spawn(move || {
            while let Ok(ev) = done_rx.recv() {
                ev.callback_unchecked(&on_done);
            }
        });
    }

    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    for _ in 0..o.iodepth {
        let mut ev = IOEvent::new(fd, Buffer::aligned(4096).expect("buffer"), action, run.next_offset());
        ev.set_args(());
        submit_tx.send(Box::new(ev)).expect("submit");
    }
    std::thread::sleep(Duration::from_secs_f64(o.runtime));
    let done = run.completed.load(Ordering::Relaxed);
    let (cpu1, elapsed) = (cpu_seconds(), t0.elapsed().as_secs_f64());
    run.stop.store(true, Ordering::Relaxed);
    let mut n = run.in_flight.lock().unwrap();
    while *n > 0 {
        n = run.idle.wait(n).unwrap();
    }
    println!(
        "{{\"engine\":\"io-engine 0.12\",\"backend\":\"{}\",\"iodepth\":{},\"workers\":{},\"ios\":{},\"errors\":{},\
         \"seconds\":{:.6},\"iops\":{:.1},\"cpu_seconds\":{:.6},\"cpu_us_per_io\":{:.4}}}",
        o.backend,
        o.iodepth,
        o.workers,
        done,
        run.errors.load(Ordering::Relaxed),
        elapsed,
        done as f64 / elapsed,
        cpu1 - cpu0,
        (cpu1 - cpu0) / done.max(1) as f64 * 1e6
    );
}
