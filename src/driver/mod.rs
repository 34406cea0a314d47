//! The drivers: each owns its slots and runs its own submitter and poller
//! threads over the shared context. The backend is chosen once, here, when a
//! context starts; the worker loops are monomorphic per driver.

pub mod aio;
pub(crate) mod blocking;
pub mod uring;

use std::cell::UnsafeCell;
use std::fmt;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::str::FromStr;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam::channel::{Receiver, Sender};
use parking_lot::{Mutex, MutexGuard};

use crate::context::{ContextOptions, IoSharedContext};
use crate::tasks::{IOAction, IOCallbackCustom};

/// Largest number of completions a poller handles before it submits the
/// follow-ups their callbacks queued.
const FLUSH_EVERY: usize = 4;

/// Whether the poller, about to handle completion `n` (from 0) of a
/// wake-up's batch of `batch`, first submits the follow-ups that the
/// completions before it queued.
/// - The first follow-up always goes out at once: a batch means the device
///   has just finished what it held (a virtual disk may complete a queue's
///   worth with one interrupt) and is idle until work arrives.
/// - A short batch means completions trickle in from a device: each
///   follow-up goes out at once, so requests reach the device one by one
///   rather than in bursts that then complete in bursts (which lowers the
///   device's effective queue depth).
/// - A long batch means completions came in bulk (page cache hits, a device
///   catching up): then one call per few follow-ups saves system calls and
///   lets the block layer merge neighbouring requests.
pub(crate) fn flush_before(n: usize, batch: usize) -> bool {
    match n {
        0 => false,
        1 => true,
        _ => batch <= FLUSH_EVERY || n % FLUSH_EVERY == 0,
    }
}

/// A driver's submit lock: the state only its holder may touch (free slot
/// ids, and for io_uring the submission queue), plus a mark that makes the
/// holder run one more step for a thread that found the lock busy.
///
/// The poller and callbacks on pool threads never wait for the lock: if it
/// is busy they leave their freed slot ids in the channel the step drains,
/// set the mark and go. Whoever holds the lock checks the mark after
/// releasing it and steps again, so their queued work goes out on a thread
/// that is already running, with no wake-up of the submitter thread.
pub(crate) struct SubmitLock<S> {
    state: Mutex<S>,
    step_pending: AtomicBool,
}

impl<S> SubmitLock<S> {
    pub(crate) fn new(state: S) -> Self {
        SubmitLock { state: Mutex::new(state), step_pending: AtomicBool::new(false) }
    }

    /// Takes the lock, waiting for it, without looking at the mark. For the
    /// submitter thread, which runs a step after every such hold (at the top
    /// of its loop) and checks `step_pending` before it sleeps, and for
    /// start-up and shutdown, when no other thread submits.
    pub(crate) fn lock(&self) -> MutexGuard<'_, S> {
        self.state.lock()
    }

    /// `lock` before a step: the step covers whatever the mark stood for.
    pub(crate) fn lock_for_step(&self) -> MutexGuard<'_, S> {
        let guard = self.state.lock();
        self.clear_mark();
        guard
    }

    /// Clears the mark before a step (under the lock). Mostly it is not set,
    /// and a plain load spares the hand-back a locked write: a mark set after
    /// this load is seen by the check after unlocking.
    fn clear_mark(&self) {
        if self.step_pending.load(Ordering::SeqCst) {
            self.step_pending.store(false, Ordering::SeqCst);
        }
    }

    /// Whether a thread left work while the lock was held; asked after
    /// releasing it.
    pub(crate) fn step_pending(&self) -> bool {
        // Orders the unlock before this load (see `step_or_leave`).
        fence(Ordering::SeqCst);
        self.step_pending.load(Ordering::SeqCst)
    }

    /// Runs `step` under the lock (with `freed`, the slot ids the caller
    /// gives back), and again while other threads marked work meanwhile.
    /// If the lock is busy, the ids go to `free_sender` and the holder (or
    /// the next one) runs the step instead. Never waits.
    pub(crate) fn step_or_leave(
        &self,
        freed: &mut Vec<u32>,
        free_sender: &Sender<u32>,
        mut step: impl FnMut(&mut S, &mut Vec<u32>),
    ) {
        let mut guard = match self.state.try_lock() {
            Some(guard) => guard,
            None => {
                // The ids go first: a holder that sees the mark must find them.
                // The channel has room for every slot id (each is in it at
                // most once), so sending never blocks.
                for id in freed.drain(..) {
                    let _ = free_sender.send(id);
                }
                // Mark, then try the lock again; the holder unlocks, then
                // checks the mark. The fences (here and in `step_pending`)
                // make sure one of the two sees the other's write: either
                // this thread gets the lock or the holder sees the mark. A
                // holder clears the mark only before a step, which then sees
                // this thread's work.
                self.step_pending.store(true, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                match self.state.try_lock() {
                    Some(guard) => guard,
                    None => return,
                }
            }
        };
        loop {
            self.clear_mark();
            step(&mut guard, freed);
            drop(guard);
            if !self.step_pending() {
                return;
            }
            guard = match self.state.try_lock() {
                Some(guard) => guard,
                None => return,
            };
        }
    }
}

/// Spawns an engine thread. Its body must not panic: the engine's state
/// would be left half-updated, with I/O in flight whose buffers the kernel
/// may still write, so a panic there (a bug in the engine, never a user
/// callback, which runs guarded) ends the process with a message rather
/// than leaving `ioe_context_destroy` waiting for ever.
pub(crate) fn spawn_engine_thread<F>(name: &str, body: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    #[cfg(test)]
    fault::before_spawn()?;
    let thread_name = name.to_string();
    thread::Builder::new().name(name.to_string()).spawn(move || {
        if panic::catch_unwind(AssertUnwindSafe(body)).is_err() {
            eprintln!("ioengine: internal error: engine thread {thread_name} panicked; aborting");
            std::process::abort();
        }
    })
}

/// `spawn_engine_thread`, returning once the thread runs under its name, so
/// that when a constructor returns every thread it started can be seen (in
/// /proc, a debugger, a profiler) as what it is. For threads started while
/// creating a context, pool or server, where the caller may wait; not for
/// threads a poller starts on the fly.
pub(crate) fn start_engine_thread<F>(name: &str, body: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let (running, started) = crossbeam::channel::bounded::<()>(1);
    let handle = spawn_engine_thread(name, move || {
        let _ = running.send(());
        body()
    })?;
    // An error means the thread ended without signalling, which only an
    // abort could do: nothing to wait for either way.
    let _ = started.recv();
    Ok(handle)
}

/// Test-only fault injection: make the n-th next thread spawn fail.
#[cfg(test)]
pub(crate) mod fault {
    use std::cell::Cell;
    use std::io;

    thread_local! {
        /// Spawns left before one fails (on this thread), if set.
        static SPAWNS_BEFORE_FAILURE: Cell<Option<usize>> = const { Cell::new(None) };
    }

    /// The `n`-th spawn from now (0 = the next) on this thread fails with EAGAIN.
    pub(crate) fn fail_spawn_after(n: Option<usize>) {
        SPAWNS_BEFORE_FAILURE.with(|c| c.set(n));
    }

    pub(super) fn before_spawn() -> io::Result<()> {
        SPAWNS_BEFORE_FAILURE.with(|c| match c.get() {
            Some(0) => {
                c.set(None);
                Err(io::Error::from_raw_os_error(libc::EAGAIN))
            }
            Some(n) => {
                c.set(Some(n - 1));
                Ok(())
            }
            None => Ok(()),
        })
    }
}

/// Pauses between retries of a call the kernel refused for lack of
/// resources (EAGAIN, ENOMEM, EBUSY): 50 us, doubling up to 10 ms, so a
/// thread that has nothing else to do neither spins nor gives up on I/O
/// it owns. Only for engine threads that may sleep (the submitter, the AIO
/// helper); never the poller or a caller's thread.
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_micros(50);
    const LONGEST: Duration = Duration::from_millis(10);

    pub(crate) fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    pub(crate) fn pause(&mut self) {
        thread::sleep(self.next);
        self.next = (self.next * 2).min(Self::LONGEST);
    }

    pub(crate) fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Whether an error from the kernel means "try again later" rather than a
/// bug in how the engine calls it.
pub(crate) fn is_resource_shortage(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::ENOMEM) | Some(libc::EBUSY) | Some(libc::EINTR))
}

pub use aio::AioDriver;
pub use uring::{uring_supported, UringDriver};

/// `user_data` / `aio_data` of the shutdown sentinel; slot ids are smaller.
pub(crate) const SENTINEL_DATA: u64 = u64::MAX;

/// Name of the environment variable operators use to force a backend.
pub const BACKEND_ENV: &str = "IOENGINE_BACKEND";

/// Which kernel interface runs a context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Backend {
    /// io_uring when the kernel allows it and supports the needed opcodes,
    /// Linux AIO otherwise.
    Auto = 0,
    /// io_uring; fails if it cannot start.
    Uring = 1,
    /// Linux native AIO (`io_submit`); fails if it cannot start.
    Aio = 2,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Uring => "io_uring",
            Backend::Aio => "aio",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = io::Error;
    fn from_str(s: &str) -> io::Result<Backend> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Backend::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(Backend::Uring),
            "aio" | "libaio" => Ok(Backend::Aio),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unknown backend {s:?} (expected auto, uring or aio)"),
            )),
        }
    }
}

/// The backend to start: `IOENGINE_BACKEND` when set (operators have the
/// last word), else the requested one. A malformed variable is an error
/// rather than being ignored.
pub(crate) fn resolve_backend(requested: Backend) -> io::Result<Backend> {
    match std::env::var(BACKEND_ENV) {
        Ok(value) if !value.trim().is_empty() => value.parse().map_err(|_| io::Error::from_raw_os_error(libc::EINVAL)),
        _ => Ok(requested),
    }
}

/// What a started driver reports to its context.
pub(crate) struct Started {
    /// The backend running (never `Auto`).
    pub backend: Backend,
    pub threads: Vec<JoinHandle<()>>,
    /// Why `Auto` runs AIO: the errno that io_uring failed with.
    pub fallback_errno: Option<i32>,
    /// Actions the backend can never run as set up (fsync on an IOPOLL
    /// ring): refused at submission with EINVAL.
    pub refused_actions: ActionSet,
}

/// A set of `IOAction`s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ActionSet(u8);

impl ActionSet {
    pub(crate) fn of(actions: &[IOAction]) -> Self {
        ActionSet(actions.iter().fold(0, |set, &a| set | 1 << a as u8))
    }

    pub(crate) fn contains(self, action: IOAction) -> bool {
        self.0 & (1 << action as u8) != 0
    }
}

/// Whether an io_uring start failure means io_uring cannot run here at
/// all (not built into the kernel, forbidden by `kernel.io_uring_disabled`
/// or seccomp, missing opcodes, ring memory refused), so that `Auto` may
/// use AIO. Anything else (invalid options, no threads) is the caller's
/// error on either backend.
fn uring_unavailable(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EOPNOTSUPP) | Some(libc::ENOMEM)
    )
}

/// Starts the driver for `backend`. `Auto` falls back to AIO only when
/// io_uring is unavailable (see `uring_unavailable`); an explicit choice
/// never falls back.
pub(crate) fn start<C: IOCallbackCustom>(
    shared: &Arc<IoSharedContext<C>>,
    opts: &ContextOptions,
    backend: Backend,
    noti_receiver: Receiver<()>,
) -> io::Result<Started> {
    match backend {
        Backend::Uring => UringDriver::start(shared.clone(), opts, noti_receiver),
        Backend::Aio => AioDriver::start(shared.clone(), opts, noti_receiver),
        Backend::Auto => match UringDriver::start(shared.clone(), opts, noti_receiver.clone()) {
            Err(e) if uring_unavailable(&e) => {
                let mut started = AioDriver::start(shared.clone(), opts, noti_receiver)?;
                started.fallback_errno = e.raw_os_error();
                Ok(started)
            }
            started => started,
        },
    }
}

/// A driver's slots, one per I/O that may be in flight. A slot is used by
/// one thread at a time: whoever holds the submit lock fills it, the kernel
/// owns it while the I/O is in flight, the poller (or the AIO helper) takes
/// the result, and the id goes back through a channel. Each of those steps
/// is a happens-before edge, so no slot is ever touched by two threads at once.
pub(crate) struct SlotTable<S> {
    slots: Box<[UnsafeCell<S>]>,
}

// SAFETY: see the type's documentation: slot ownership passes between threads
// only along happens-before edges, and the slots' contents are Send.
unsafe impl<S: Send> Sync for SlotTable<S> {}

impl<S> SlotTable<S> {
    pub(crate) fn new(depth: usize, make: impl Fn() -> S) -> Self {
        SlotTable { slots: (0..depth).map(|_| UnsafeCell::new(make())).collect() }
    }

    /// # Safety
    /// The caller must own slot `id` at this moment (see the type's documentation).
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn get(&self, id: u32) -> &mut S {
        &mut *self.slots[id as usize].get()
    }
}

/// `Err(errno)` of a failed libc call as a negative result value.
pub(crate) fn neg_errno(err: &io::Error) -> i64 {
    -(err.raw_os_error().unwrap_or(libc::EIO) as i64)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;
    use std::thread;
    use std::time::Duration;

    use crossbeam::channel;

    use super::{fault, flush_before, Backend, SubmitLock, FLUSH_EVERY};
    use crate::callback_worker::IOWorkers;
    use crate::context::{ContextOptions, IOContext};
    use crate::tasks::ClosureCb;

    /// A panic in engine code (not a user callback) ends the process with
    /// a message rather than leaving a drain waiting for a dead thread. Run
    /// in a child process: the test binary again, with only this test.
    #[test]
    fn a_panicking_engine_thread_aborts_with_a_message() {
        const CHILD: &str = "IOENGINE_TEST_PANICKING_ENGINE_THREAD";
        if std::env::var_os(CHILD).is_some() {
            let handle = super::spawn_engine_thread("ioe-test-bug", || panic!("engine bug (expected by the test)"));
            let _ = handle.unwrap().join();
            unreachable!("the process should have aborted");
        }
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "driver::tests::a_panicking_engine_thread_aborts_with_a_message", "--nocapture"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(output.status.signal(), Some(libc::SIGABRT), "{output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("engine thread ioe-test-bug panicked; aborting"), "{stderr}");
    }

    /// Every thread a context or a pool starts may fail to start: creation
    /// then fails with EAGAIN, promptly (threads already started are ended
    /// and joined), whatever the backend and wherever the failure falls.
    #[test]
    fn a_thread_that_cannot_start_fails_creation_with_eagain() {
        for backend in [Backend::Uring, Backend::Aio, Backend::Auto] {
            for pool in [0, 2] {
                for nth in 0..6 {
                    let (done, outcome) = channel::bounded(1);
                    thread::spawn(move || {
                        fault::fail_spawn_after(Some(nth));
                        let workers = IOWorkers::<ClosureCb>::new(pool);
                        let result = workers.and_then(|workers| {
                            let opts = ContextOptions { backend, ..ContextOptions::with_depth(4) };
                            IOContext::with_options(&opts, &workers).map(|ctx| ctx.backend())
                        });
                        fault::fail_spawn_after(None);
                        let _ = done.send(result.map_err(|e| e.raw_os_error()));
                    });
                    let result = outcome
                        .recv_timeout(Duration::from_secs(60))
                        .unwrap_or_else(|_| panic!("{backend} pool {pool}: creation hung with spawn {nth} failing"));
                    match result {
                        Ok(running) => {
                            let threads = pool + if running == Backend::Aio { 3 } else { 2 };
                            assert!(nth >= threads, "{backend} pool {pool}: spawn {nth} failed and creation succeeded");
                        }
                        Err(errno) => {
                            if errno == Some(libc::ENOSYS) || errno == Some(libc::EPERM) {
                                eprintln!("skipped {backend}: unavailable here");
                                break;
                            }
                            assert_eq!(errno, Some(libc::EAGAIN), "{backend} pool {pool} spawn {nth}");
                        }
                    }
                }
            }
        }
    }

    /// Threads leave work (a unit, and a freed id) and call `step_or_leave`
    /// at the same moment, round after round; the step takes all of both
    /// and is slow enough that the others find the lock busy. Whoever finds
    /// it busy relies on the holder, so once every call of a round has
    /// returned nothing may be left over, with no final sweep.
    #[test]
    fn work_left_at_a_busy_submit_lock_is_always_taken_by_a_holder() {
        const THREADS: usize = 4;
        const ROUNDS: usize = 10_000;
        let queued = AtomicUsize::new(0);
        let (free_sender, free_ids) = channel::bounded(THREADS);
        let lock = SubmitLock::new((0usize, 0usize)); // (units taken, ids taken)
        let (start, end) = (Barrier::new(THREADS), Barrier::new(THREADS));
        let (contended, stranded) = (AtomicUsize::new(0), AtomicUsize::new(0));
        thread::scope(|scope| {
            for t in 0..THREADS {
                let (queued, free_sender, free_ids, lock) = (&queued, &free_sender, &free_ids, &lock);
                let (start, end, contended, stranded) = (&start, &end, &contended, &stranded);
                scope.spawn(move || {
                    let mut freed = Vec::new();
                    for _ in 0..ROUNDS {
                        start.wait();
                        queued.fetch_add(1, Ordering::SeqCst);
                        freed.push(t as u32);
                        let mut ran = false;
                        lock.step_or_leave(&mut freed, free_sender, |state, freed| {
                            ran = true;
                            thread::yield_now();
                            state.0 += queued.swap(0, Ordering::SeqCst);
                            state.1 += freed.drain(..).count() + free_ids.try_iter().count();
                        });
                        if !ran {
                            contended.fetch_add(1, Ordering::Relaxed);
                        }
                        // Count rather than assert here: a panic would leave the
                        // other threads waiting at the barrier for ever.
                        if end.wait().is_leader() && (queued.load(Ordering::SeqCst) != 0 || !free_ids.is_empty()) {
                            stranded.fetch_add(1, Ordering::SeqCst);
                            queued.store(0, Ordering::SeqCst);
                            let _ = free_ids.try_iter().count();
                        }
                        end.wait();
                    }
                });
            }
        });
        assert_eq!(stranded.load(Ordering::SeqCst), 0, "rounds that left work behind");
        assert_eq!(*lock.lock(), (THREADS * ROUNDS, THREADS * ROUNDS));
        assert!(contended.load(Ordering::Relaxed) > 0, "the lock was never found busy: the test proved nothing");
    }

    fn flush_points(batch: usize) -> Vec<usize> {
        (0..batch).filter(|&n| flush_before(n, batch)).collect()
    }

    #[test]
    fn first_follow_up_goes_at_once_short_batches_flush_each_long_ones_every_few() {
        assert!(flush_points(1).is_empty(), "a lone completion's follow-up goes with the next wait");
        for batch in 2..=FLUSH_EVERY {
            assert_eq!(flush_points(batch), (1..batch).collect::<Vec<_>>(), "batch {batch}");
        }
        assert_eq!(flush_points(FLUSH_EVERY + 1), vec![1, FLUSH_EVERY]);
        let long = flush_points(32);
        assert_eq!(long[..3], [1, FLUSH_EVERY, 2 * FLUSH_EVERY]);
        assert_eq!(long.len(), 1 + 32 / FLUSH_EVERY - 1);
    }
}
