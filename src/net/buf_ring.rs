//! A provided buffer ring (`IORING_REGISTER_PBUF_RING`, 5.19): the loop's
//! receive buffers, lent to the kernel as a pool. A multishot receive takes
//! one per completion, so a connection holds a receive buffer only while
//! its data is being handed to the application; idle connections hold none.

use std::io;
use std::ptr;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

/// Anonymous, page-aligned memory, unmapped on drop.
struct Mapping {
    addr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let addr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { addr: addr as *mut u8, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping came from mmap with this length and is unmapped once.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// A registered buffer ring and its buffers. It must be dropped after the
/// ring it is registered with (the loop declares the ring first), so the
/// kernel never writes into unmapped memory.
pub(crate) struct BufRing {
    entries: Mapping,
    buffers: Mapping,
    count: u16,
    buf_size: u32,
    /// Our copy of the ring's tail: the next entry to hand to the kernel.
    tail: u16,
    /// Per buffer: sends still using it (see `Segment::Received`).
    pins: Vec<u16>,
    pinned: u32,
}

/// The buffer group id the loop's receives select from.
pub(crate) const BUFFER_GROUP: u16 = 0;

impl BufRing {
    /// `count` buffers (a power of two, at most 32768) of `buf_size` bytes,
    /// registered with `ring` and all given to the kernel.
    pub(crate) fn register(ring: &IoUring, count: u16, buf_size: u32) -> io::Result<BufRing> {
        if !count.is_power_of_two() || buf_size == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let page = 4096;
        let entries_len = (count as usize * std::mem::size_of::<BufRingEntry>()).div_ceil(page) * page;
        let entries = Mapping::new(entries_len)?;
        let buffers = Mapping::new(count as usize * buf_size as usize)?;
        let mut ring_bufs =
            BufRing { entries, buffers, count, buf_size, tail: 0, pins: vec![0; count as usize], pinned: 0 };
        for bid in 0..count {
            ring_bufs.put(bid);
        }
        ring_bufs.publish();
        // SAFETY: the entries stay mapped until `self` drops, after the ring
        // (see the type's documentation).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(ring_bufs.entries.addr as u64, count, BUFFER_GROUP, 0)?
        };
        Ok(ring_bufs)
    }

    /// The first `len` bytes of buffer `bid`, which the kernel filled and
    /// handed to us with a completion.
    pub(crate) fn data(&self, bid: u16, len: usize) -> &[u8] {
        let len = len.min(self.buf_size as usize);
        let bid = (bid % self.count) as usize;
        // SAFETY: bid < count, so the range lies inside the buffers mapping;
        // the kernel is done writing it (its completion was reaped) until we
        // give it back with `recycle`.
        unsafe { std::slice::from_raw_parts(self.buffers.addr.add(bid * self.buf_size as usize), len) }
    }

    /// Gives buffer `bid` back to the kernel, unless sends still use it.
    pub(crate) fn recycle(&mut self, bid: u16) {
        if self.pins[(bid % self.count) as usize] == 0 {
            self.put(bid % self.count);
            self.publish();
        }
    }

    /// How many more buffers sends may keep: at most half the ring, so
    /// that receiving always has buffers (kept ones return as sends end).
    pub(crate) fn pin_budget(&self) -> u32 {
        (self.count as u32 / 2).saturating_sub(self.pinned)
    }

    /// `n` sends now use buffer `bid` (call before `recycle`).
    pub(crate) fn pin(&mut self, bid: u16, n: u32) {
        let pins = &mut self.pins[(bid % self.count) as usize];
        if *pins == 0 {
            self.pinned += 1;
        }
        *pins += n as u16;
    }

    /// A send that used buffer `bid` is over; the last one gives it back.
    pub(crate) fn unpin(&mut self, bid: u16) {
        let bid = bid % self.count;
        let pins = &mut self.pins[bid as usize];
        *pins = pins.saturating_sub(1);
        if *pins == 0 {
            self.pinned -= 1;
            self.recycle(bid);
        }
    }

    fn put(&mut self, bid: u16) {
        let index = (self.tail & (self.count - 1)) as usize;
        // SAFETY: index < count entries inside the entries mapping; the kernel
        // only reads entries between its head and our published tail, and this
        // one lies beyond the published tail.
        let entry = unsafe { &mut *(self.entries.addr as *mut BufRingEntry).add(index) };
        // SAFETY: bid < count: the buffer lies inside the buffers mapping.
        entry.set_addr(unsafe { self.buffers.addr.add(bid as usize * self.buf_size as usize) } as u64);
        entry.set_len(self.buf_size);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the entries written so far visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail field lives in the first entry of our mapping; the
        // kernel reads it concurrently, hence the atomic release store.
        let tail = unsafe { &*(BufRingEntry::tail(self.entries.addr as *const BufRingEntry) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }
}
