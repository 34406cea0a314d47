//! Model-based random testing of the block engine: seeded random mixes of
//! reads, writes, vectored reads and writes, merged runs, fsync,
//! fdatasync, hole punching and zeroing, on all three channels, submitted
//! one by one or in batches, by several threads at once, with per-request
//! flags and callbacks that submit, against an in-memory image of the
//! file. Every result and every byte read is checked against the image,
//! every callback counted exactly once, and the file is compared with the
//! image at the end, for each backend, inline and pool callbacks, page
//! cache and O_DIRECT.
//!
//! Concurrent operations in one round never conflict (no two overlap where
//! one of them writes), so the image is exact whatever order the kernel
//! completes them in; each submitting thread owns one region of the file.
//!
//! `IOENGINE_MODEL_SEED=N` picks the seed (default 1, so that CI runs the
//! same test every time; `random` draws one; the seed is printed and in
//! every failure message); `IOENGINE_MODEL_ROUNDS=N` sets the rounds per
//! thread and configuration (default 100, bounded for CI);
//! `IOENGINE_MODEL_SECONDS=N` repeats the configurations, each time with a
//! new seed, for that long:
//! `IOENGINE_MODEL_SECONDS=600 cargo test --release --test model -- --nocapture`.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use crossbeam::channel::{unbounded, Sender};
use ioengine::{Backend, Buffer, ClosureCb, IOAction, IOChannel, IOContext, IOEvent, IOWorkers, MergeSubmitter};

const FILE_SIZE: u64 = 8 << 20;
const THREADS: usize = 2;
const REGION: u64 = FILE_SIZE / THREADS as u64;
const ALIGN: u64 = 4096;
const MAX_OPS_PER_ROUND: u64 = 12;

/// One operation of a round.
#[derive(Clone, Debug)]
enum Op {
    /// A write (vectored when `pieces` > 1); `then_read`: its callback
    /// submits a read of the same range, which must see the new bytes.
    Write {
        offset: u64,
        data: Vec<u8>,
        pieces: usize,
        flags: i32,
        then_read: bool,
    },
    Read {
        offset: u64,
        len: usize,
        pieces: usize,
    },
    /// Contiguous writes through a merger.
    Merged {
        offset: u64,
        data: Vec<Vec<u8>>,
        limit: usize,
    },
    Sync {
        data_only: bool,
    },
    Punch {
        offset: u64,
        len: u64,
    },
    Zero {
        offset: u64,
        len: u64,
    },
}

impl Op {
    /// The range it writes (punch and zero included) or reads.
    fn range(&self) -> Option<(u64, u64, bool)> {
        match self {
            Op::Write { offset, data, .. } => Some((*offset, *offset + data.len() as u64, true)),
            Op::Merged { offset, data, .. } => {
                Some((*offset, *offset + data.iter().map(|d| d.len() as u64).sum::<u64>(), true))
            }
            Op::Punch { offset, len } | Op::Zero { offset, len } => Some((*offset, *offset + *len, true)),
            Op::Read { offset, len, .. } => Some((*offset, *offset + *len as u64, false)),
            Op::Sync { .. } => None,
        }
    }

    /// Completions it reports.
    fn reports(&self) -> usize {
        match self {
            Op::Write { then_read: true, .. } => 2,
            Op::Merged { data, .. } => data.len(),
            _ => 1,
        }
    }
}

/// A completion: the operation's index in its round, which part, the
/// result, and the buffers it carried.
struct Report {
    op: usize,
    part: usize,
    result: i64,
    bufs: Vec<Buffer>,
}

struct Totals {
    ops: AtomicU64,
    bytes_checked: AtomicU64,
    callbacks: AtomicU64,
}

struct Config {
    backend: Backend,
    pool_threads: usize,
    direct: bool,
    seed: u64,
    rounds: usize,
}

impl Config {
    fn name(&self) -> String {
        let cache = if self.direct { "O_DIRECT" } else { "page cache" };
        format!("{} {} callbacks {}, seed {}", self.backend, cache, self.pool_threads, self.seed)
    }
}

fn channel(rng: &mut Rng) -> IOChannel {
    [IOChannel::Prio, IOChannel::Read, IOChannel::Write][(rng.next() % 3) as usize]
}

/// A length: mostly small, sometimes up to 128 KiB, rarely up to 1 MiB;
/// a multiple of 4096 for O_DIRECT.
fn length(rng: &mut Rng, direct: bool) -> u64 {
    let scale = match rng.next() % 100 {
        0..=69 => 8 << 10,
        70..=96 => 128 << 10,
        _ => 1 << 20,
    };
    if direct {
        ALIGN * (1 + rng.next() % (scale / ALIGN))
    } else {
        1 + rng.next() % scale
    }
}

fn bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rng.fill(&mut data);
    data
}

/// Splits `len` into `pieces` lengths (multiples of 4096 for O_DIRECT).
fn split(rng: &mut Rng, len: usize, pieces: usize, direct: bool) -> Vec<usize> {
    let unit = if direct { ALIGN as usize } else { 1 };
    let units = len / unit;
    let mut cuts: Vec<usize> = (1..pieces).map(|_| 1 + (rng.next() as usize) % (units - 1)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut lens = Vec::new();
    let mut at = 0;
    for cut in cuts.into_iter().chain(std::iter::once(units)) {
        lens.push((cut - at) * unit);
        at = cut;
    }
    lens
}

/// One round's operations in `[base, base + REGION)`, none conflicting.
fn generate(rng: &mut Rng, base: u64, direct: bool) -> Vec<Op> {
    let want = 1 + rng.next() % MAX_OPS_PER_ROUND;
    let mut ops: Vec<Op> = Vec::new();
    let mut tries = 0;
    while (ops.len() as u64) < want && tries < 4 * MAX_OPS_PER_ROUND {
        tries += 1;
        let mut len = length(rng, direct);
        let mut offset = base + rng.next() % (REGION - len);
        if direct {
            offset -= offset % ALIGN;
        }
        let op = match rng.next() % 100 {
            0..=34 => {
                let pieces = if rng.next() % 3 == 0 { 2 + (rng.next() % 7) as usize } else { 1 };
                let pieces = pieces.min((len / if direct { ALIGN } else { 1 }) as usize).max(1);
                let flags = match rng.next() % 10 {
                    0 => libc::RWF_DSYNC,
                    1 => libc::RWF_SYNC,
                    _ => 0,
                };
                let then_read = rng.next() % 8 == 0;
                Op::Write { offset, data: bytes(rng, len as usize), pieces, flags, then_read }
            }
            35..=74 => {
                let pieces = if rng.next() % 3 == 0 { 2 + (rng.next() % 7) as usize } else { 1 };
                let pieces = pieces.min((len / if direct { ALIGN } else { 1 }) as usize).max(1);
                Op::Read { offset, len: len as usize, pieces }
            }
            75..=84 => {
                let count = 2 + (rng.next() % 6) as usize;
                let count = count.min((len / if direct { ALIGN } else { 1 }) as usize).max(1);
                let lens = split(rng, len as usize, count, direct);
                let data = lens.into_iter().map(|l| bytes(rng, l)).collect();
                let limit = (ALIGN as usize) << (rng.next() % 8);
                Op::Merged { offset, data, limit }
            }
            85..=89 => Op::Sync { data_only: rng.next() % 2 == 0 },
            _ => {
                // Whole blocks, so no file system needs to zero a partial one.
                offset -= offset % ALIGN;
                len = len.div_ceil(ALIGN) * ALIGN;
                if offset + len > base + REGION {
                    continue;
                }
                if rng.next() % 2 == 0 {
                    Op::Punch { offset, len }
                } else {
                    Op::Zero { offset, len }
                }
            }
        };
        let conflicts = op.range().is_some_and(|(start, end, writes)| {
            ops.iter().filter_map(Op::range).any(|(s, e, w)| start < e && s < end && (writes || w))
        });
        if !conflicts {
            ops.push(op);
        }
    }
    ops
}

fn reporter(tx: &Sender<Report>, op: usize, part: usize) -> ClosureCb {
    let tx = tx.clone();
    ClosureCb::new(move |mut ev: Box<IOEvent<ClosureCb>>| {
        let result = ev.result().expect("a callback without a result");
        let bufs = if ev.is_vectored() { ev.take_buffers() } else { ev.take_buffer().into_iter().collect() };
        let _ = tx.send(Report { op, part, result, bufs });
    })
}

fn buffer_of(data: &[u8], direct: bool) -> Buffer {
    if direct {
        let mut buf = Buffer::aligned(data.len()).expect("aligned buffer");
        buf.as_mut_slice().copy_from_slice(data);
        buf
    } else {
        Buffer::copy_from(data).expect("buffer")
    }
}

fn buffers(lens: &[usize], data: Option<&[u8]>, direct: bool) -> Vec<Buffer> {
    let mut at = 0;
    lens.iter()
        .map(|&len| {
            let buf = match data {
                Some(data) => buffer_of(&data[at..at + len], direct),
                None if direct => Buffer::aligned(len).expect("aligned buffer"),
                None => Buffer::copy_from(&vec![0xee; len]).expect("buffer"),
            };
            at += len;
            buf
        })
        .collect()
}

/// Where a thread submits, and where its callbacks report.
struct Target {
    ctx: Arc<IOContext<ClosureCb>>,
    fd: i32,
    tx: Sender<Report>,
    direct: bool,
}

/// Submits one operation; refusals are failures (nothing here is invalid).
fn submit(target: &Target, op: &Op, index: usize, rng: &mut Rng, what: &str) {
    let Target { ctx, fd, tx, direct } = target;
    let (fd, direct) = (*fd, *direct);
    let chan = channel(rng);
    let event = match op {
        Op::Write { offset, data, pieces, flags, then_read } => {
            let lens = split(rng, data.len(), *pieces, direct);
            let bufs = buffers(&lens, Some(data), direct);
            let mut ev = if bufs.len() == 1 {
                IOEvent::new(fd, bufs.into_iter().next().expect("one buffer"), IOAction::Write, *offset)
            } else {
                IOEvent::vectored(fd, bufs, IOAction::Write, *offset)
            };
            ev.set_rw_flags(*flags);
            if *then_read {
                // The callback submits a read of what it wrote.
                let (ctx2, tx2, tx3) = (ctx.clone(), tx.clone(), tx.clone());
                let (offset, len) = (*offset, data.len());
                ev.set_callback(ClosureCb::new(move |ev: Box<IOEvent<ClosureCb>>| {
                    let result = ev.result().expect("a callback without a result");
                    let mut read = IOEvent::new(fd, buffers(&[len], None, direct).remove(0), IOAction::Read, offset);
                    read.set_callback(reporter(&tx3, index, 1));
                    if let Err(e) = ctx2.submit(read, IOChannel::Read) {
                        panic!("a read submitted from a callback was refused: {}", e.error);
                    }
                    let _ = tx2.send(Report { op: index, part: 0, result, bufs: Vec::new() });
                }));
                ev
            } else {
                ev.set_callback(reporter(tx, index, 0));
                ev
            }
        }
        Op::Read { offset, len, pieces } => {
            let lens = split(rng, *len, *pieces, direct);
            let bufs = buffers(&lens, None, direct);
            let mut ev = if bufs.len() == 1 {
                IOEvent::new(fd, bufs.into_iter().next().expect("one buffer"), IOAction::Read, *offset)
            } else {
                IOEvent::vectored(fd, bufs, IOAction::Read, *offset)
            };
            ev.set_callback(reporter(tx, index, 0));
            ev
        }
        Op::Merged { offset, data, limit } => {
            let mut merger = MergeSubmitter::new(ctx.clone(), fd, IOAction::Write, chan, *limit).expect("merger");
            let mut at = *offset;
            for (part, piece) in data.iter().enumerate() {
                let mut ev = IOEvent::new(fd, buffer_of(piece, direct), IOAction::Write, at);
                ev.set_callback(reporter(tx, index, part));
                if let Err(e) = merger.add_event(ev) {
                    panic!("{what}: merger refused a write: {}", e.error);
                }
                at += piece.len() as u64;
            }
            merger.flush();
            return;
        }
        Op::Sync { data_only } => {
            let mut ev = if *data_only { IOEvent::fdatasync(fd) } else { IOEvent::fsync(fd) };
            ev.set_callback(reporter(tx, index, 0));
            ev
        }
        Op::Punch { offset, len } | Op::Zero { offset, len } => {
            let mode = libc::FALLOC_FL_KEEP_SIZE
                | if matches!(op, Op::Punch { .. }) { libc::FALLOC_FL_PUNCH_HOLE } else { libc::FALLOC_FL_ZERO_RANGE };
            let mut ev = IOEvent::fallocate(fd, mode, *offset, *len);
            ev.set_callback(reporter(tx, index, 0));
            ev
        }
    };
    if let Err(e) = ctx.submit(event, chan) {
        panic!("{what}: submit refused: {}", e.error);
    }
}

/// Checks a round's completions against the image, then applies its writes.
fn check_round(ops: &[Op], reports: Vec<Report>, image: &mut [u8], base: u64, what: &str, totals: &Totals) {
    let mut seen: Vec<Vec<bool>> = ops.iter().map(|op| vec![false; op.reports()]).collect();
    for r in &reports {
        let slot = &mut seen[r.op][r.part];
        assert!(!*slot, "{what}: op {} part {} called back twice", r.op, r.part);
        *slot = true;
        let at = |offset: u64| (offset - base) as usize;
        match &ops[r.op] {
            Op::Write { data, offset, .. } if r.part == 1 => {
                // The read its callback submitted sees what it wrote.
                assert_eq!(r.result, data.len() as i64, "{what}: read after write at {offset}");
                assert!(r.bufs[0].as_slice() == &data[..], "{what}: read after write at {offset} differs");
                totals.bytes_checked.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            Op::Write { data, offset, .. } => {
                assert_eq!(r.result, data.len() as i64, "{what}: write of {} at {offset}", data.len());
            }
            Op::Read { offset, len, .. } => {
                assert_eq!(r.result, *len as i64, "{what}: read of {len} at {offset}");
                let got: Vec<u8> = r.bufs.iter().flat_map(|b| b.as_slice().iter().copied()).collect();
                let want = &image[at(*offset)..at(*offset) + len];
                if got != want {
                    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                    panic!("{what}: read of {len} at {offset} differs from the model at byte {first}");
                }
                totals.bytes_checked.fetch_add(*len as u64, Ordering::Relaxed);
            }
            Op::Merged { data, offset, .. } => {
                assert_eq!(r.result, data[r.part].len() as i64, "{what}: merged piece {} at {offset}", r.part);
            }
            Op::Sync { .. } => assert_eq!(r.result, 0, "{what}: sync"),
            Op::Punch { offset, .. } => assert_eq!(r.result, 0, "{what}: punch at {offset}"),
            Op::Zero { offset, .. } => {
                // Zero range is optional for a file system; a refusal changes nothing.
                assert!(r.result == 0 || r.result == -(libc::EOPNOTSUPP as i64), "{what}: zero at {offset}");
            }
        }
    }
    for (op, parts) in ops.iter().zip(&seen) {
        assert!(parts.iter().all(|&s| s), "{what}: {op:?} did not call back");
    }
    totals.callbacks.fetch_add(reports.len() as u64, Ordering::Relaxed);
    totals.ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
    let zero_refused = |index: usize| reports.iter().any(|r| r.op == index && r.result < 0);
    for (index, op) in ops.iter().enumerate() {
        let at = |offset: u64| (offset - base) as usize;
        match op {
            Op::Write { offset, data, .. } => image[at(*offset)..at(*offset) + data.len()].copy_from_slice(data),
            Op::Merged { offset, data, .. } => {
                let mut pos = at(*offset);
                for piece in data {
                    image[pos..pos + piece.len()].copy_from_slice(piece);
                    pos += piece.len();
                }
            }
            Op::Punch { offset, len } => image[at(*offset)..at(*offset) + *len as usize].fill(0),
            Op::Zero { offset, len } if !zero_refused(index) => image[at(*offset)..at(*offset) + *len as usize].fill(0),
            _ => {}
        }
    }
}

/// One submitting thread: `rounds` rounds in its region; returns its image.
fn drive(ctx: Arc<IOContext<ClosureCb>>, fd: i32, cfg: &Config, thread: usize, totals: &Totals) -> Vec<u8> {
    let base = thread as u64 * REGION;
    let mut image = vec![0u8; REGION as usize];
    let mut rng = Rng::new(cfg.seed ^ (thread as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let (tx, rx) = unbounded();
    let target = Target { ctx: ctx.clone(), fd, tx, direct: cfg.direct };
    for round in 0..cfg.rounds {
        let what = format!("{}, thread {thread}, round {round}", cfg.name());
        let ops = generate(&mut rng, base, cfg.direct);
        // One by one, or in one batch.
        if rng.next() % 2 == 0 {
            let _batch = ctx.batch();
            for (index, op) in ops.iter().enumerate() {
                submit(&target, op, index, &mut rng, &what);
            }
        } else {
            for (index, op) in ops.iter().enumerate() {
                submit(&target, op, index, &mut rng, &what);
            }
        }
        let expected: usize = ops.iter().map(Op::reports).sum();
        let reports: Vec<Report> = (0..expected)
            .map(|i| {
                rx.recv_timeout(HANG_GUARD)
                    .unwrap_or_else(|_| panic!("{what}: completion {i} of {expected} never came"))
            })
            .collect();
        check_round(&ops, reports, &mut image, base, &what, totals);
        assert!(rx.try_recv().is_err(), "{what}: a callback ran more than once");
    }
    image
}

fn run(cfg: &Config, totals: &Totals) {
    let file = TempFile::new("model", FILE_SIZE, cfg.direct);
    let workers = IOWorkers::<ClosureCb>::new(cfg.pool_threads).expect("workers");
    let ctx = context(cfg.backend, 32, &workers);
    let fd = file.fd();
    let images: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let ctx = ctx.clone();
                s.spawn(move || drive(ctx, fd, cfg, t, totals))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a submitting thread failed")).collect()
    });
    let stats = ctx.stats();
    assert_eq!(stats.submitted, stats.completed, "{}: every request completed", cfg.name());
    drop(ctx);
    // The file itself, read without the engine, is the model.
    let contents = file.contents();
    for (t, image) in images.iter().enumerate() {
        let region = &contents[t * REGION as usize..(t + 1) * REGION as usize];
        if region != &image[..] {
            let first = region.iter().zip(image).position(|(a, b)| a != b).unwrap_or(0);
            panic!("{}: the file differs from the model at byte {}", cfg.name(), t * REGION as usize + first);
        }
        totals.bytes_checked.fetch_add(REGION, Ordering::Relaxed);
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn random_operations_match_an_in_memory_model() {
    // A fixed seed by default, so that CI runs the same test every time;
    // IOENGINE_MODEL_SEED=random draws one (long runs draw more).
    let mut seed = match std::env::var("IOENGINE_MODEL_SEED").as_deref() {
        Ok("random") => {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
        }
        _ => env_u64("IOENGINE_MODEL_SEED").unwrap_or(1),
    };
    let rounds = env_u64("IOENGINE_MODEL_ROUNDS").unwrap_or(100) as usize;
    let deadline = env_u64("IOENGINE_MODEL_SECONDS").map(|s| Instant::now() + Duration::from_secs(s));
    let totals = Totals { ops: AtomicU64::new(0), bytes_checked: AtomicU64::new(0), callbacks: AtomicU64::new(0) };
    let mut seeds = Vec::new();
    loop {
        seeds.push(seed);
        eprintln!("model: seed {seed} (IOENGINE_MODEL_SEED={seed} repeats it)");
        for backend in backends() {
            for pool_threads in [0, 2] {
                for direct in [false, true] {
                    run(&Config { backend, pool_threads, direct, seed, rounds }, &totals);
                }
            }
        }
        match deadline {
            Some(deadline) if Instant::now() < deadline => seed = Rng::new(seed).next(),
            _ => break,
        }
    }
    eprintln!(
        "model: {} operations, {} callbacks, {} MiB checked, seeds {:?}",
        totals.ops.load(Ordering::Relaxed),
        totals.callbacks.load(Ordering::Relaxed),
        totals.bytes_checked.load(Ordering::Relaxed) >> 20,
        seeds
    );
}
