//! ioengine: an asynchronous block I/O engine for Linux.
//!
//! One [`IOContext`] accepts [`IOEvent`]s on three queues (priority, read,
//! write) from any number of threads. A driver, io_uring or Linux AIO chosen
//! at run time, moves them into the kernel with a submitter thread and reaps
//! completions with a poller thread; each event's callback then runs exactly
//! once, on a callback worker or inline on the poller.
//!
//! ```no_run
//! use ioengine::{Buffer, ClosureCb, IOAction, IOChannel, IOContext, IOEvent, IOWorkers};
//! use std::os::fd::AsRawFd;
//!
//! let file = std::fs::File::create("/tmp/example").unwrap();
//! let workers = IOWorkers::<ClosureCb>::new(1).unwrap();
//! let ctx = IOContext::new(64, &workers).unwrap();
//! let mut ev = IOEvent::new(file.as_raw_fd(), Buffer::copy_from(b"hello").unwrap(), IOAction::Write, 0);
//! ev.set_callback(ClosureCb::new(|ev| assert_eq!(ev.result(), Some(5))));
//! ctx.submit(ev, IOChannel::Write).unwrap();
//! drop(ctx); // waits for the write and its callback
//! ```

pub mod callback_worker;
pub mod common;
pub mod context;
pub mod driver;
pub mod embedded_list;
pub mod merge;
pub mod net;
pub(crate) mod ring;
pub mod tasks;

pub use callback_worker::{in_callback, IOWorkers};
pub use common::{poll_request_from_queues, SlotCollection};
pub use context::{
    ContextOptions, IOContext, IoSharedContext, IoStats, SubmitBatch, SubmitError, DEFAULT_DEPTH, MAX_DEPTH,
};
pub use driver::{uring_supported, Backend, BACKEND_ENV};
pub use merge::{MergeSubmitter, MAX_MERGE_EVENTS};
pub use tasks::{Buffer, ClosureCb, IOAction, IOCallbackCustom, IOChannel, IOEvent, DIRECT_IO_ALIGN};
pub mod ffi;
