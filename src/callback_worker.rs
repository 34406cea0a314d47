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

use crate::tasks::{IOCallbackCustom, IOEvent};

thread_local! {
    /// True while this thread runs a completion callback. Dropping the last
    /// handle of a context there must not wait for that context to drain:
    /// the drain may need this very thread.
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// Whether the current thread is inside an ioengine completion callback.
pub fn in_callback() -> bool {
    IN_CALLBACK.with(|flag| flag.get())
}

/// Counts the callbacks of one context that have been promised (events
/// accepted) but have not returned yet, so the context's drop can wait for
/// all of them.
pub(crate) struct CompletionTracker {
    outstanding: AtomicUsize,
    draining: AtomicBool,
    lock: Mutex<()>,
    idle: Condvar,
}

impl CompletionTracker {
    pub(crate) fn new() -> Self {
        CompletionTracker {
            outstanding: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            lock: Mutex::new(()),
            idle: Condvar::new(),
        }
    }

    pub(crate) fn add(&self, callbacks: usize) {
        self.outstanding.fetch_add(callbacks, Ordering::SeqCst);
    }

    fn done_one(&self) {
        // SeqCst pairs with wait_idle: either the waiter sees zero, or this
        // thread sees `draining` and wakes it under the lock.
        if self.outstanding.fetch_sub(1, Ordering::SeqCst) == 1 && self.draining.load(Ordering::SeqCst) {
            let _guard = self.lock.lock();
            self.idle.notify_all();
        }
    }

    /// Blocks until every promised callback has returned.
    pub(crate) fn wait_idle(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let mut guard = self.lock.lock();
        while self.outstanding.load(Ordering::SeqCst) > 0 {
            self.idle.wait(&mut guard);
        }
    }
}

type Job<C> = (Box<IOEvent<C>>, Arc<CompletionTracker>);

struct WorkersInner<C: IOCallbackCustom> {
    /// `None` in inline mode (zero threads).
    sender: Option<Sender<Job<C>>>,
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
fn run_guarded<C: IOCallbackCustom>(event: Box<IOEvent<C>>) {
    IN_CALLBACK.with(|flag| flag.set(true));
    if panic::catch_unwind(AssertUnwindSafe(|| event.run_callback())).is_err() {
        eprintln!("ioengine: an I/O completion callback panicked; the panic was contained");
    }
    IN_CALLBACK.with(|flag| flag.set(false));
}

impl<C: IOCallbackCustom> IOWorkers<C> {
    /// `threads == 0`: callbacks run on the poller thread of the context that
    /// completed the I/O (they must not block). Otherwise that many threads
    /// take callbacks from one shared queue.
    pub fn new(threads: usize) -> io::Result<Self> {
        if threads == 0 {
            return Ok(IOWorkers(Arc::new(WorkersInner { sender: None, threads: Mutex::new(Vec::new()) })));
        }
        let (sender, receiver): (Sender<Job<C>>, Receiver<Job<C>>) = channel::unbounded();
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let rx = receiver.clone();
            let handle = thread::Builder::new().name(format!("ioe-cb-{i}")).spawn(move || {
                for (event, tracker) in rx.iter() {
                    run_guarded(event);
                    tracker.done_one();
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
        Ok(IOWorkers(Arc::new(WorkersInner { sender: Some(sender), threads: Mutex::new(handles) })))
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
                run_guarded(event);
                tracker.done_one();
            }
            Some(sender) => {
                if let Err(channel::SendError((event, _))) = sender.send((event, tracker.clone())) {
                    // Unreachable while this clone exists (threads only stop when
                    // every sender is gone); run inline rather than lose it.
                    run_guarded(event);
                    tracker.done_one();
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
