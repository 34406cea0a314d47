//! Lingering close. Closing a socket while the peer's data sits unread in
//! it, or receiving data after it was closed, makes the kernel answer with
//! a reset and throw away the output it has not delivered yet: a reply
//! handed to the kernel just before a graceful close could be lost. So a
//! graceful close shuts the write side down once our output is out, keeps
//! reading (and dropping) what the peer still sends, and closes when the
//! peer finishes, or when `linger` has passed for a peer that never does.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A loop's lingering connections, oldest first. Every connection lingers
/// for the same time, so the oldest always has the nearest deadline.
pub(crate) struct LingerQueue {
    linger: Duration,
    entries: VecDeque<(u32, u32, Instant)>,
}

impl LingerQueue {
    pub(crate) fn new(linger: Duration) -> LingerQueue {
        LingerQueue { linger, entries: VecDeque::new() }
    }

    /// Whether a graceful close lingers at all (a zero time closes at once).
    pub(crate) fn enabled(&self) -> bool {
        !self.linger.is_zero()
    }

    /// Connection `slot`/`generation` began lingering now.
    pub(crate) fn push(&mut self, slot: u32, generation: u32) {
        self.entries.push_back((slot, generation, Instant::now() + self.linger));
    }

    /// When the next connection's time is up.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.entries.front().map(|&(_, _, deadline)| deadline)
    }

    /// Takes the connections whose time is up (some may have closed since:
    /// the loop checks the generation).
    pub(crate) fn take_expired(&mut self, now: Instant) -> Vec<(u32, u32)> {
        let mut expired = Vec::new();
        while let Some(&(slot, generation, deadline)) = self.entries.front() {
            if deadline > now {
                break;
            }
            self.entries.pop_front();
            expired.push((slot, generation));
        }
        expired
    }

    /// Forgets every entry (the loop is stopping and closes them itself).
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }
}

/// Time from now to `deadline`, at least a millisecond (a timer of zero
/// would fire at once and again).
pub(crate) fn until(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_entries_come_out_oldest_first() {
        let mut queue = LingerQueue::new(Duration::ZERO);
        assert!(!queue.enabled());
        assert_eq!(queue.next_deadline(), None);
        queue.push(3, 1);
        queue.push(5, 2);
        let first = queue.next_deadline().expect("a deadline");
        assert_eq!(queue.take_expired(first), vec![(3, 1)]);
        let later = Instant::now() + Duration::from_secs(1);
        assert_eq!(queue.take_expired(later), vec![(5, 2)]);
        assert!(queue.take_expired(later).is_empty());

        let mut waiting = LingerQueue::new(Duration::from_secs(60));
        assert!(waiting.enabled());
        waiting.push(1, 1);
        assert!(waiting.take_expired(Instant::now()).is_empty());
        waiting.clear();
        assert_eq!(waiting.next_deadline(), None);
    }
}
