//! Loop timers: a TIMEOUT that completes (with -ETIME) after a while. The
//! kernel reads the timespec when it takes the entry, which with SQPOLL is
//! later than the push: the loop keeps it in memory it owns until the
//! completion.

use io_uring::opcode;
use io_uring::squeue::Entry;
use io_uring::types::Timespec;

use super::{OpKind, OpTag};

/// A timer of the loop's, tagged `kind`.
pub(crate) fn prepare(timespec: *const Timespec, kind: OpKind) -> Entry {
    opcode::Timeout::new(timespec).build().user_data(OpTag::loop_op(kind).encode())
}

/// A timespec for `duration`.
pub(crate) fn timespec(duration: std::time::Duration) -> Timespec {
    Timespec::new().sec(duration.as_secs()).nsec(duration.subsec_nanos())
}
