//! Where completion callbacks run: a pool of callback threads that any
//! number of contexts can share, or (zero threads) directly on the driver's
//! poller thread for the lowest latency.

use std::cell::Cell;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crossbeam::channel::{self, Receiver, Sender};
use parking_lot::{Condvar, Mutex};

use crate::driver::start_engine_thread;
use crate::tasks::{IOCallbackCustom, IOEvent};

thread_local! {
    /// While this thread runs a completion callback: the address of the
    /// tracker of the context it belongs to (0 otherwise). A drain must not
    /// wait on such a thread, and a draining context still accepts the
    /// follow-up I/O its own callbacks submit.
    static IN_CALLBACK: Cell<usize> = const { Cell::new(0) };
    /// On a pool thread: the address of its pool (0 otherwise).
    static POOL_OF_THREAD: Cell<usize> = const { Cell::new(0) };
}

/// `IN_CALLBACK` while a callback runs outside any context's drain (a
/// request refused after the drain ended): in a callback, but of no context.
const DETACHED_CALLBACK: usize = 1;

/// Whether the current thread is inside an ioengine completion callback.
pub fn in_callback() -> bool {
    IN_CALLBACK.with(|cur| cur.get()) != 0
}

/// Whether the current thread runs a callback of the context owning `tracker`.
pub(crate) fn in_callback_of(tracker: &CompletionTracker) -> bool {
    IN_CALLBACK.with(|cur| cur.get()) == tracker as *const CompletionTracker as usize
}

/// Counts the callbacks of one context that have been promised (events
/// accepted) but have not returned yet. A draining context's submitter stops
/// only at zero (so callbacks may still submit follow-up I/O), and
/// `shutdown` waits for zero.
pub(crate) struct CompletionTracker {
    /// Callbacks promised and not returned, plus `CLOSED` once the drain
    /// has ended (then nothing can be added).
    outstanding: AtomicUsize,
    draining: AtomicBool,
    lock: Mutex<()>,
    idle: Condvar,
    /// Wakes the context's submitter when the count reaches zero in a drain.
    wake_submitter: Sender<()>,
}

impl CompletionTracker {
    pub(crate) fn new(wake_submitter: Sender<()>) -> Self {
        CompletionTracker {
            outstanding: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            lock: Mutex::new(()),
            idle: Condvar::new(),
            wake_submitter,
        }
    }

    /// Set in `outstanding` when the drain has ended.
    const CLOSED: usize = 1 << (usize::BITS - 1);

    /// Promises callbacks for accepted events. Only while the context is
    /// open, or from one of its callbacks (which keeps the drain open).
    pub(crate) fn add(&self, callbacks: usize) {
        self.outstanding.fetch_add(callbacks, Ordering::SeqCst);
    }

    /// Promises callbacks unless the drain has ended; false if it has.
    pub(crate) fn add_unless_closed(&self, callbacks: usize) -> bool {
        self.outstanding
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n & Self::CLOSED == 0).then_some(n + callbacks))
            .is_ok()
    }

    /// Ends the drain if no callback is outstanding; false otherwise.
    pub(crate) fn close_if_idle(&self) -> bool {
        self.outstanding.compare_exchange(0, Self::CLOSED, Ordering::SeqCst, Ordering::SeqCst).is_ok()
            || self.is_closed()
    }

    fn is_closed(&self) -> bool {
        self.outstanding.load(Ordering::SeqCst) & Self::CLOSED != 0
    }

    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::SeqCst) & !Self::CLOSED
    }

    fn done_one(&self) {
        // SeqCst pairs with begin_drain/wait_idle and the submitter's check:
        // either they see zero, or this thread sees `draining` and wakes them.
        if self.outstanding.fetch_sub(1, Ordering::SeqCst) & !Self::CLOSED == 1 && self.draining.load(Ordering::SeqCst)
        {
            let _ = self.wake_submitter.try_send(());
            let _guard = self.lock.lock();
            self.idle.notify_all();
        }
    }

    /// Marks the start of a drain; must precede the `running = false` store.
    pub(crate) fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Blocks until every promised callback has returned.
    pub(crate) fn wait_idle(&self) {
        self.begin_drain();
        let mut guard = self.lock.lock();
        while self.outstanding() > 0 {
            self.idle.wait(&mut guard);
        }
    }
}

type Job<C> = (Box<IOEvent<C>>, Arc<CompletionTracker>);

struct WorkersInner<C: IOCallbackCustom> {
    /// `None` in inline mode (zero threads).
    sender: Option<Sender<Job<C>>>,
    /// Names the pool's threads (`POOL_OF_THREAD`); 0 in inline mode.
    id: usize,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// A pool of callback threads, cheap to clone and share between contexts.
/// The threads exit when the last clone (including the ones contexts keep)
/// is dropped, after running every queued callback.
pub struct IOWorkers<C: IOCallbackCustom>(Arc<WorkersInner<C>>);

impl<C: IOCallbackCustom> Clone for IOWorkers<C> {
    fn clone(&self) -> Self {
        IOWorkers(self.0.clone())
    }
}

/// Runs one callback with the in-callback marker set; a panicking Rust
/// callback is reported and contained so the engine keeps its count.
fn run_guarded<C: IOCallbackCustom>(event: Box<IOEvent<C>>, tracker: &CompletionTracker) {
    run_marked(event, tracker as *const CompletionTracker as usize);
    tracker.done_one();
}

fn run_marked<C: IOCallbackCustom>(event: Box<IOEvent<C>>, marker: usize) {
    let outer = IN_CALLBACK.with(|cur| cur.replace(marker));
    if panic::catch_unwind(AssertUnwindSafe(|| event.run_callback())).is_err() {
        eprintln!("ioengine: an I/O completion callback panicked; the panic was contained");
    }
    IN_CALLBACK.with(|cur| cur.set(outer));
}

/// Runs the callback of an event whose context has finished draining, on
/// the calling thread: guarded like any callback, but its context no
/// longer accepts its follow-ups (nothing would serve them).
pub(crate) fn run_detached<C: IOCallbackCustom>(event: Box<IOEvent<C>>) {
    run_marked(event, DETACHED_CALLBACK);
}

impl<C: IOCallbackCustom> IOWorkers<C> {
    /// `threads == 0`: callbacks run on the poller thread of the context that
    /// completed the I/O (they must not block). Otherwise that many threads
    /// take callbacks from one shared queue.
    pub fn new(threads: usize) -> io::Result<Self> {
        if threads == 0 {
            return Ok(IOWorkers(Arc::new(WorkersInner { sender: None, id: 0, threads: Mutex::new(Vec::new()) })));
        }
        static NEXT_POOL_ID: AtomicUsize = AtomicUsize::new(1);
        let id = NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver): (Sender<Job<C>>, Receiver<Job<C>>) = channel::unbounded();
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let rx = receiver.clone();
            let handle = start_engine_thread(&format!("ioe-cb-{i}"), move || {
                POOL_OF_THREAD.with(|p| p.set(id));
                for (event, tracker) in rx.iter() {
                    run_guarded(event, &tracker);
                }
            });
            match handle {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // Threads already started exit once the sender is gone.
                    drop(sender);
                    for h in handles {
                        let _ = h.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(IOWorkers(Arc::new(WorkersInner { sender: Some(sender), id, threads: Mutex::new(handles) })))
    }

    /// Whether the calling thread is one of this pool's threads.
    pub(crate) fn owns_current_thread(&self) -> bool {
        self.0.id != 0 && POOL_OF_THREAD.with(|p| p.get()) == self.0.id
    }

    /// Number of callback threads (0 = inline on the poller).
    pub fn thread_count(&self) -> usize {
        self.0.threads.lock().len()
    }

    pub fn is_inline(&self) -> bool {
        self.0.sender.is_none()
    }

    /// Runs or queues the callback of a completed event.
    pub(crate) fn dispatch(&self, event: Box<IOEvent<C>>, tracker: &Arc<CompletionTracker>) {
        match &self.0.sender {
            None => {
                run_guarded(event, tracker);
            }
            Some(sender) => {
                if let Err(channel::SendError((event, _))) = sender.send((event, tracker.clone())) {
                    // Unreachable while this clone exists (threads only stop when
                    // every sender is gone); run inline rather than lose it.
                    run_guarded(event, tracker);
                }
            }
        }
    }
}

impl<C: IOCallbackCustom> Drop for WorkersInner<C> {
    fn drop(&mut self) {
        self.sender.take();
        let me = thread::current().id();
        for handle in self.threads.get_mut().drain(..) {
            // The last handle may be dropped by a callback on a pool thread:
            // that thread finishes by itself once its callback returns.
            if handle.thread().id() != me {
                let _ = handle.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_tracker_promises_nothing_more() {
        let (wake, _woken) = channel::bounded(1);
        let tracker = CompletionTracker::new(wake);
        tracker.add(1);
        assert!(!tracker.close_if_idle(), "closed with a callback outstanding");
        assert!(tracker.add_unless_closed(2));
        assert_eq!(tracker.outstanding(), 3);
        for _ in 0..3 {
            tracker.done_one();
        }
        assert!(tracker.close_if_idle());
        assert!(tracker.close_if_idle(), "closing twice");
        assert!(!tracker.add_unless_closed(1));
        assert_eq!(tracker.outstanding(), 0);
        tracker.wait_idle();
    }
}
