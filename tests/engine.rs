//! Behaviour of the engine, each test on both backends (forced explicitly)
//! and, where callbacks matter, with inline callbacks and a callback pool.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use ioengine::{
    Backend, Buffer, ClosureCb, ContextOptions, IOAction, IOChannel, IOContext, IOEvent, IOWorkers, MergeSubmitter,
    MAX_DEPTH,
};

const BLOCK: usize = 4096;

fn errno(res: i64) -> i32 {
    assert!(res < 0, "expected an error, got {res}");
    (-res) as i32
}

/// Writes `blocks` random blocks at distinct random offsets, then reads
/// each back through the engine and compares byte for byte.
fn write_then_read_random(backend: Backend, workers: &IOWorkers<ClosureCb>, direct: bool) {
    const FILE_BLOCKS: u64 = 1024;
    let file = TempFile::new("rand", FILE_BLOCKS * BLOCK as u64, direct);
    let ctx = context(backend, 32, workers);
    let col = Collector::new();
    let mut rng = Rng::new(0x1234 + direct as u64);

    let mut offsets = Vec::new();
    let mut seen = HashSet::new();
    while offsets.len() < 300 {
        let block = rng.next() % FILE_BLOCKS;
        if seen.insert(block) {
            offsets.push(block * BLOCK as u64);
        }
    }
    let mut expected = Vec::new();
    for (i, &off) in offsets.iter().enumerate() {
        let mut buf = Buffer::aligned(BLOCK).unwrap();
        rng.fill(buf.as_mut_slice());
        expected.push(buf.as_slice().to_vec());
        ctx.submit(col.event(file.fd(), buf, IOAction::Write, off, i as u64), IOChannel::Write).unwrap();
    }
    for done in col.wait(offsets.len()) {
        assert_eq!(done.result, BLOCK as i64, "write {} on {backend}", done.tag);
    }
    for (i, &off) in offsets.iter().enumerate() {
        let buf = Buffer::aligned(BLOCK).unwrap();
        ctx.submit(col.event(file.fd(), buf, IOAction::Read, off, i as u64), IOChannel::Read).unwrap();
    }
    let mut tags = HashSet::new();
    for done in col.wait(offsets.len()) {
        assert_eq!(done.result, BLOCK as i64);
        assert!(tags.insert(done.tag), "tag {} completed twice", done.tag);
        assert_eq!(done.buf.unwrap().as_slice(), &expected[done.tag as usize][..], "block {} differs", done.tag);
    }
    let stats = ctx.stats();
    assert_eq!(stats.submitted, 600);
    assert_eq!(stats.completed, 600);
    assert_eq!(stats.failed, 0);
    drop(ctx);
    // Independent check through the page cache (O_DIRECT wrote to the device).
    let contents = file.contents();
    for (i, &off) in offsets.iter().enumerate() {
        assert_eq!(&contents[off as usize..off as usize + BLOCK], &expected[i][..]);
    }
}

#[test]
fn random_offset_writes_read_back_identical() {
    for backend in backends() {
        for workers in worker_modes() {
            write_then_read_random(backend, &workers, false);
        }
    }
}

#[test]
fn o_direct_with_aligned_buffers() {
    for backend in backends() {
        write_then_read_random(backend, &IOWorkers::new(0).unwrap(), true);
    }
}

/// The file's O_DIRECT alignment rules (memory, offset) from statx; zeros
/// when the file system does not report them.
fn dio_alignment(file: &TempFile) -> (u32, u32) {
    // SAFETY: statx writes into the zeroed struct we own; the path is empty
    // and AT_EMPTY_PATH makes it describe the descriptor itself.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statx(file.fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
    assert_eq!(rc, 0, "statx");
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return (0, 0);
    }
    (stx.stx_dio_mem_align, stx.stx_dio_offset_align)
}

#[test]
fn misaligned_o_direct_buffer_fails_with_einval_and_engine_keeps_serving() {
    for backend in backends() {
        let file = TempFile::new("misaligned", 0, true);
        // Allocated blocks: O_DIRECT reads of holes are served without any
        // alignment check on some file systems (ext4 zero-fills them).
        std::fs::write(&file.path, vec![0x11u8; 64 * 1024]).unwrap();
        file.file.sync_all().unwrap();
        let (mem_align, offset_align) = dio_alignment(&file);
        if mem_align <= 1 || offset_align <= 1 {
            // tmpfs, for one, takes O_DIRECT at any alignment (and does not
            // report one): nothing to refuse.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIP misaligned O_DIRECT: {} reports no alignment to break (memory {mem_align}, offset {offset_align})",
                std::env::temp_dir().display()
            );
            return;
        }
        let ctx = context(backend, 8, &IOWorkers::new(0).unwrap());
        let col = Collector::new();

        // A buffer length that is not a multiple of the block size.
        ctx.submit(col.event(file.fd(), Buffer::aligned(BLOCK - 1).unwrap(), IOAction::Read, 0, 1), IOChannel::Read)
            .unwrap();
        assert_eq!(errno(col.wait_one().result), libc::EINVAL, "{backend} misaligned length");
        // A file offset that is not block aligned.
        ctx.submit(col.event(file.fd(), Buffer::aligned(BLOCK).unwrap(), IOAction::Write, 1, 2), IOChannel::Write)
            .unwrap();
        assert_eq!(errno(col.wait_one().result), libc::EINVAL, "{backend} misaligned offset");

        // A buffer address below the device's memory alignment. Recent kernels
        // only require the device's DMA alignment, which may be a single byte.
        let mut backing = Buffer::aligned(2 * BLOCK).unwrap();
        let shift = if mem_align > 1 { mem_align as usize / 2 } else { 1 };
        // SAFETY: the slice starts `shift` bytes into an 8 KiB allocation that
        // outlives the I/O (we wait for its completion below).
        let misaligned = unsafe { Buffer::from_raw_parts(backing.as_mut_ptr().add(shift), BLOCK) }.unwrap();
        ctx.submit(col.event(file.fd(), misaligned, IOAction::Read, 0, 3), IOChannel::Read).unwrap();
        let result = col.wait_one().result;
        if mem_align > 1 {
            assert_eq!(errno(result), libc::EINVAL, "{backend} misaligned address (dio_mem_align {mem_align})");
        } else {
            assert_eq!(result, BLOCK as i64, "{backend}: device accepts any address alignment");
        }

        let mut data = Buffer::aligned(BLOCK).unwrap();
        data.as_mut_slice().fill(0x5a);
        ctx.submit(col.event(file.fd(), data, IOAction::Write, 8192, 4), IOChannel::Write).unwrap();
        assert_eq!(col.wait_one().result, BLOCK as i64);
        ctx.submit(col.event(file.fd(), Buffer::aligned(BLOCK).unwrap(), IOAction::Read, 8192, 5), IOChannel::Read)
            .unwrap();
        let done = col.wait_one();
        assert_eq!(done.result, BLOCK as i64);
        assert!(done.buf.unwrap().as_slice().iter().all(|&b| b == 0x5a));
        assert_eq!(ctx.stats().failed, if mem_align > 1 { 3 } else { 2 });
    }
}

#[test]
fn invalid_fd_fails_with_ebadf() {
    for backend in backends() {
        let ctx = context(backend, 8, &IOWorkers::new(0).unwrap());
        let col = Collector::new();
        // -1 and a number far above any descriptor this process has open
        // (a closed descriptor could be reused by a parallel test).
        for (tag, fd) in [(1u64, -1), (2, 1 << 20)] {
            ctx.submit(col.event(fd, Buffer::aligned(512).unwrap(), IOAction::Read, 0, tag), IOChannel::Read).unwrap();
            assert_eq!(errno(col.wait_one().result), libc::EBADF, "{backend} fd {fd}");
            let mut ev = IOEvent::fsync(fd);
            col.attach(&mut ev, tag);
            ctx.submit(ev, IOChannel::Prio).unwrap();
            assert_eq!(errno(col.wait_one().result), libc::EBADF, "{backend} fsync fd {fd}");
        }
        // Still serving.
        let file = TempFile::new("ebadf", 4096, false);
        ctx.submit(col.event(file.fd(), Buffer::aligned(512).unwrap(), IOAction::Read, 0, 9), IOChannel::Read).unwrap();
        assert_eq!(col.wait_one().result, 512);
        assert_eq!(ctx.stats().failed, 4);
    }
}

#[test]
fn reads_past_end_of_file_return_the_bytes_that_exist() {
    for backend in backends() {
        let file = TempFile::new("eof", 0, false);
        let mut rng = Rng::new(99);
        let mut content = vec![0u8; 10_000];
        rng.fill(&mut content);
        std::fs::write(&file.path, &content).unwrap();

        let ctx = context(backend, 8, &IOWorkers::new(1).unwrap());
        let col = Collector::new();
        ctx.submit(col.event(file.fd(), Buffer::aligned(8192).unwrap(), IOAction::Read, 8192, 1), IOChannel::Read)
            .unwrap();
        let done = col.wait_one();
        assert_eq!(done.result, 10_000 - 8192);
        assert_eq!(&done.buf.unwrap().as_slice()[..10_000 - 8192], &content[8192..]);

        ctx.submit(col.event(file.fd(), Buffer::aligned(4096).unwrap(), IOAction::Read, 20_000, 2), IOChannel::Read)
            .unwrap();
        assert_eq!(col.wait_one().result, 0);
    }
}

#[test]
fn fsync_fdatasync_and_fallocate() {
    for backend in backends() {
        let file = TempFile::new("sync", 0, false);
        let ctx = context(backend, 8, &IOWorkers::new(0).unwrap());
        let col = Collector::new();

        let mut ev = IOEvent::fallocate(file.fd(), 0, 0, 1 << 20);
        col.attach(&mut ev, 1);
        ctx.submit(ev, IOChannel::Write).unwrap();
        assert_eq!(col.wait_one().result, 0, "{backend} fallocate");
        assert_eq!(file.file.metadata().unwrap().len(), 1 << 20);

        let mut data = Buffer::aligned(BLOCK).unwrap();
        data.as_mut_slice().fill(0xee);
        ctx.submit(col.event(file.fd(), data, IOAction::Write, 0, 2), IOChannel::Write).unwrap();
        assert_eq!(col.wait_one().result, BLOCK as i64);

        for (tag, mut ev) in [(3, IOEvent::fsync(file.fd())), (4, IOEvent::fdatasync(file.fd()))] {
            col.attach(&mut ev, tag);
            ctx.submit(ev, IOChannel::Prio).unwrap();
            assert_eq!(col.wait_one().result, 0, "{backend} sync {tag}");
        }

        // Punch the block out again; it reads back as zeros and the size stays.
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let mut ev = IOEvent::fallocate(file.fd(), mode, 0, BLOCK as u64);
        col.attach(&mut ev, 5);
        ctx.submit(ev, IOChannel::Write).unwrap();
        assert_eq!(col.wait_one().result, 0, "{backend} punch hole");
        ctx.submit(col.event(file.fd(), Buffer::aligned(BLOCK).unwrap(), IOAction::Read, 0, 6), IOChannel::Read)
            .unwrap();
        let done = col.wait_one();
        assert_eq!(done.result, BLOCK as i64);
        assert!(done.buf.unwrap().as_slice().iter().all(|&b| b == 0));
        assert_eq!(file.file.metadata().unwrap().len(), 1 << 20);

        // A mode the kernel rejects reports its error.
        let mut ev = IOEvent::fallocate(file.fd(), libc::FALLOC_FL_PUNCH_HOLE, 0, BLOCK as u64);
        col.attach(&mut ev, 7);
        ctx.submit(ev, IOChannel::Write).unwrap();
        assert!(col.wait_one().result < 0, "{backend} punch hole without keep-size must fail");
    }
}

#[test]
fn drop_with_hundreds_in_flight_runs_every_callback_exactly_once() {
    for backend in backends() {
        for workers in worker_modes() {
            const EVENTS: usize = 800;
            let file = TempFile::new("drain", (EVENTS * BLOCK) as u64, false);
            let ctx = context(backend, 16, &workers);
            let calls: Arc<Vec<AtomicUsize>> = Arc::new((0..EVENTS).map(|_| AtomicUsize::new(0)).collect());
            for i in 0..EVENTS {
                let action = if i % 2 == 0 { IOAction::Write } else { IOAction::Read };
                let mut ev = IOEvent::new(file.fd(), Buffer::aligned(BLOCK).unwrap(), action, (i * BLOCK) as u64);
                let calls = calls.clone();
                ev.set_callback(ClosureCb::new(move |ev| {
                    assert_eq!(ev.result(), Some(BLOCK as i64));
                    calls[i].fetch_add(1, Ordering::SeqCst);
                }));
                let channel = [IOChannel::Write, IOChannel::Read, IOChannel::Prio][i % 3];
                ctx.submit(ev, channel).unwrap();
            }
            // Most are still queued or in flight here; drop must drain them all.
            drop(ctx);
            for (i, c) in calls.iter().enumerate() {
                assert_eq!(c.load(Ordering::SeqCst), 1, "{backend}: event {i}");
            }
        }
    }
}

#[test]
fn merging_gives_each_event_its_own_bytes() {
    for backend in backends() {
        for workers in worker_modes() {
            let file = TempFile::new("merge", 0, false);
            let ctx = context(backend, 8, &workers);
            let col = Collector::new();
            let mut rng = Rng::new(7);
            let mut expected = vec![0u8; 64 * BLOCK];
            rng.fill(&mut expected);

            let mut writer =
                MergeSubmitter::new(ctx.clone(), file.fd(), IOAction::Write, IOChannel::Write, 32 * BLOCK).unwrap();
            for i in 0..64 {
                let buf = Buffer::copy_from(&expected[i * BLOCK..(i + 1) * BLOCK]).unwrap();
                writer.add_event(col.event(file.fd(), buf, IOAction::Write, (i * BLOCK) as u64, i as u64)).unwrap();
            }
            writer.flush();
            assert_eq!(writer.held_count(), 0);
            for done in col.wait(64) {
                assert_eq!(done.result, BLOCK as i64);
            }
            assert_eq!(ctx.stats().merged, 64);
            assert_eq!(file.contents(), expected);

            // Reads of odd sizes, merged, then one that runs past end of file.
            let sizes = [100usize, 4096, 3000, 9000, 512];
            let mut reader =
                MergeSubmitter::new(ctx.clone(), file.fd(), IOAction::Read, IOChannel::Read, 1 << 20).unwrap();
            let mut off = 0usize;
            for (i, &len) in sizes.iter().enumerate() {
                reader
                    .add_event(col.event(
                        file.fd(),
                        Buffer::aligned(len).unwrap(),
                        IOAction::Read,
                        off as u64,
                        i as u64,
                    ))
                    .unwrap();
                off += len;
            }
            let tail_start = expected.len() - 1000;
            // Not contiguous: flushes the run above and starts a new one.
            reader
                .add_event(col.event(file.fd(), Buffer::aligned(2000).unwrap(), IOAction::Read, tail_start as u64, 10))
                .unwrap();
            reader
                .add_event(col.event(
                    file.fd(),
                    Buffer::aligned(4096).unwrap(),
                    IOAction::Read,
                    (tail_start + 2000) as u64,
                    11,
                ))
                .unwrap();
            drop(reader); // flushes
            let mut done_all = col.wait(sizes.len() + 2);
            done_all.sort_by_key(|d| d.tag);
            let mut off = 0usize;
            for (done, &len) in done_all.iter().zip(sizes.iter()) {
                assert_eq!(done.result, len as i64);
                assert_eq!(
                    done.buf.as_ref().unwrap().as_slice(),
                    &expected[off..off + len],
                    "{backend} merged read {}",
                    done.tag
                );
                off += len;
            }
            let tail = &done_all[sizes.len()];
            assert_eq!(tail.result, 1000);
            assert_eq!(&tail.buf.as_ref().unwrap().as_slice()[..1000], &expected[tail_start..]);
            assert_eq!(done_all[sizes.len() + 1].result, 0);
            assert_eq!(ctx.stats().merged, 64 + sizes.len() as u64 + 2);
        }
    }
}

#[test]
fn merge_submitter_rejects_foreign_events() {
    let ctx = context(backends()[0], 4, &IOWorkers::new(0).unwrap());
    let file = TempFile::new("merge-reject", 8192, false);
    let mut writer = MergeSubmitter::new(ctx.clone(), file.fd(), IOAction::Write, IOChannel::Write, 8192).unwrap();
    let col = Collector::new();
    let wrong_action = col.event(file.fd(), Buffer::aligned(512).unwrap(), IOAction::Read, 0, 1);
    let err = writer.add_event(wrong_action).unwrap_err();
    assert_eq!(err.error.raw_os_error(), Some(libc::EINVAL));
    let wrong_fd = col.event(file.fd() + 1000, Buffer::aligned(512).unwrap(), IOAction::Write, 0, 2);
    assert_eq!(writer.add_event(wrong_fd).unwrap_err().error.raw_os_error(), Some(libc::EINVAL));
    // Vectored events and events with their own RWF_* flags keep their shape.
    let mut vectored = IOEvent::vectored(
        file.fd(),
        vec![Buffer::aligned(512).unwrap(), Buffer::aligned(512).unwrap()],
        IOAction::Write,
        0,
    );
    col.attach(&mut vectored, 3);
    assert_eq!(writer.add_event(vectored).unwrap_err().error.raw_os_error(), Some(libc::EINVAL));
    let mut flagged = col.event(file.fd(), Buffer::aligned(512).unwrap(), IOAction::Write, 0, 4);
    flagged.set_rw_flags(libc::RWF_DSYNC);
    assert_eq!(writer.add_event(flagged).unwrap_err().error.raw_os_error(), Some(libc::EINVAL));
    assert!(col.drain_ready().is_empty());
    assert!(MergeSubmitter::new(ctx.clone(), file.fd(), IOAction::Fsync, IOChannel::Write, 8192).is_err());
    assert!(MergeSubmitter::new(ctx, file.fd(), IOAction::Write, IOChannel::Write, 0).is_err());
}

/// A vectored write of owned buffers and a vectored read into others, with
/// RWF_DSYNC on the write: the buffers come back with `take_buffers` and
/// hold the bytes; flags on an fsync or unknown flags are refused.
#[test]
fn vectored_events_with_rw_flags() {
    for backend in backends() {
        let file = TempFile::new("vectored", 0, false);
        let ctx = context(backend, 4, &IOWorkers::new(0).unwrap());
        let (tx, rx) = crossbeam::channel::unbounded();
        let sizes = [100usize, 0, 4000, 1];
        let mut rng = Rng::new(3);
        let bufs: Vec<Buffer> = sizes
            .iter()
            .map(|&n| {
                let mut b = Buffer::aligned(n).unwrap();
                rng.fill(b.as_mut_slice());
                b
            })
            .collect();
        let expected: Vec<u8> = bufs.iter().flat_map(|b| b.as_slice().to_vec()).collect();
        let mut write = IOEvent::vectored(file.fd(), bufs, IOAction::Write, 10);
        write.set_rw_flags(libc::RWF_DSYNC);
        let tx2 = tx.clone();
        write.set_callback(ClosureCb::new(move |ev| tx2.send(ev).unwrap()));
        ctx.submit(write, IOChannel::Write).unwrap();
        let mut done = rx.recv_timeout(HANG_GUARD).unwrap();
        assert_eq!(done.result(), Some(expected.len() as i64), "{backend}");
        assert_eq!(done.take_buffers().len(), sizes.len());
        assert_eq!(&file.contents()[10..10 + expected.len()], &expected[..], "{backend}");

        let parts = vec![Buffer::aligned(7).unwrap(), Buffer::aligned(expected.len() - 7).unwrap()];
        let mut read = IOEvent::vectored(file.fd(), parts, IOAction::Read, 10);
        read.set_callback(ClosureCb::new(move |ev| tx.send(ev).unwrap()));
        ctx.submit(read, IOChannel::Read).unwrap();
        let mut done = rx.recv_timeout(HANG_GUARD).unwrap();
        assert_eq!(done.result(), Some(expected.len() as i64));
        let back: Vec<u8> = done.take_buffers().iter().flat_map(|b| b.as_slice().to_vec()).collect();
        assert_eq!(back, expected, "{backend}");

        let mut sync = IOEvent::fsync(file.fd());
        sync.set_rw_flags(libc::RWF_DSYNC);
        assert_eq!(ctx.submit(sync, IOChannel::Write).unwrap_err().error.raw_os_error(), Some(libc::EINVAL));
        let mut odd = IOEvent::new(file.fd(), Buffer::aligned(8).unwrap(), IOAction::Read, 0);
        odd.set_rw_flags(0x40000);
        assert_eq!(ctx.submit(odd, IOChannel::Read).unwrap_err().error.raw_os_error(), Some(libc::EINVAL));
        let none = IOEvent::vectored(file.fd(), vec![Buffer::empty()], IOAction::Read, 0);
        assert_eq!(ctx.submit(none, IOChannel::Read).unwrap_err().error.raw_os_error(), Some(libc::EINVAL));
    }
}

#[test]
fn invalid_events_and_options_are_refused_synchronously() {
    let workers = IOWorkers::<ClosureCb>::new(0).unwrap();
    for depth in [0, MAX_DEPTH + 1] {
        let err =
            IOContext::with_options(&ContextOptions::with_depth(depth), &workers).err().expect("bad depth accepted");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }
    let small_cq = ContextOptions { cq_size: Some(7), ..ContextOptions::with_depth(8) };
    assert_eq!(IOContext::with_options(&small_cq, &workers).err().unwrap().raw_os_error(), Some(libc::EINVAL));

    for backend in backends() {
        let ctx = context(backend, 4, &workers);
        let col = Collector::new();
        let zero = col.event(0, Buffer::aligned(0).unwrap(), IOAction::Read, 0, 1);
        let err = ctx.submit(zero, IOChannel::Read).unwrap_err();
        assert_eq!(err.error.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(err.event.user_tag, 1);
        let far = col.event(0, Buffer::aligned(512).unwrap(), IOAction::Read, i64::MAX as u64, 2);
        assert_eq!(ctx.submit(far, IOChannel::Read).unwrap_err().error.raw_os_error(), Some(libc::EINVAL));
        let mut empty_alloc = IOEvent::fallocate(0, 0, 0, 0);
        col.attach(&mut empty_alloc, 3);
        assert!(ctx.submit(empty_alloc, IOChannel::Write).is_err());
        assert_eq!(ctx.stats().submitted, 0);
        // Refused events never call back.
        drop(ctx);
        assert!(col.drain_ready().is_empty());
    }
}

#[test]
fn stress_many_threads_more_events_than_depth_loses_nothing() {
    for backend in backends() {
        const THREADS: usize = 4;
        const PER_THREAD: usize = 10_000;
        const FILE_BLOCKS: usize = 256;
        let file = Arc::new(TempFile::new("stress", 0, false));
        let mut pattern = vec![0u8; FILE_BLOCKS * 512];
        Rng::new(5).fill(&mut pattern);
        std::fs::write(&file.path, &pattern).unwrap();
        let pattern = Arc::new(pattern);

        let workers = IOWorkers::new(2).unwrap();
        let ctx = context(backend, 64, &workers);
        let col = Collector::new();
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (ctx, col, file, pattern) = (ctx.clone(), col.clone(), file.clone(), pattern.clone());
                s.spawn(move || {
                    let mut rng = Rng::new(t as u64 + 1);
                    for i in 0..PER_THREAD {
                        let tag = (t * PER_THREAD + i) as u64;
                        let block = (rng.next() % FILE_BLOCKS as u64) as usize;
                        let (action, channel, buf) = match i % 4 {
                            // Rewrites the block with the bytes it already holds, so
                            // concurrent reads always see the same pattern.
                            0 => (
                                IOAction::Write,
                                IOChannel::Write,
                                Buffer::copy_from(&pattern[block * 512..(block + 1) * 512]).unwrap(),
                            ),
                            1 => (IOAction::Read, IOChannel::Prio, Buffer::aligned(512).unwrap()),
                            _ => (IOAction::Read, IOChannel::Read, Buffer::aligned(512).unwrap()),
                        };
                        ctx.submit(col.event(file.fd(), buf, action, (block * 512) as u64, tag), channel).unwrap();
                    }
                });
            }
        });
        let total = THREADS * PER_THREAD;
        let mut seen = vec![false; total];
        for n in 0..total {
            let done = col.wait_one();
            if n % 997 == 0 {
                assert!(ctx.running_count() <= 64, "{backend}: more I/Os in flight than depth");
            }
            assert!(!seen[done.tag as usize], "{backend}: event {} completed twice", done.tag);
            seen[done.tag as usize] = true;
            assert_eq!(done.result, 512, "{backend}: event {}", done.tag);
            if done.action == IOAction::Read {
                let off = done.offset as usize;
                assert_eq!(done.buf.unwrap().as_slice(), &pattern[off..off + 512]);
            }
        }
        assert!(col.drain_ready().is_empty(), "{backend}: extra completions");
        let stats = ctx.stats();
        assert_eq!((stats.submitted, stats.completed, stats.failed), (total as u64, total as u64, 0));
        assert_eq!((stats.pending, stats.in_flight), (0, 0));
    }
}

#[test]
fn callbacks_may_submit_and_may_drop_the_last_handle() {
    for backend in backends() {
        for workers in worker_modes() {
            let file = Arc::new(TempFile::new("chain", 8192, false));
            let ctx = context(backend, 4, &workers);
            let col = Collector::new();
            // The write's callback submits a read of the same block, then drops
            // the context handle it holds, which is the last one.
            let mut data = Buffer::aligned(BLOCK).unwrap();
            data.as_mut_slice().fill(0x42);
            let mut ev = IOEvent::new(file.fd(), data, IOAction::Write, 0);
            let (ctx_in_cb, col_in_cb, file_in_cb) = (ctx.clone(), col.clone(), file.clone());
            ev.set_callback(ClosureCb::new(move |ev| {
                assert_eq!(ev.result(), Some(BLOCK as i64));
                let read = col_in_cb.event(file_in_cb.fd(), Buffer::aligned(BLOCK).unwrap(), IOAction::Read, 0, 2);
                ctx_in_cb.submit(read, IOChannel::Read).unwrap();
                drop(ctx_in_cb);
            }));
            ctx.submit(ev, IOChannel::Write).unwrap();
            drop(ctx);
            let done = col.wait_one();
            assert_eq!(done.result, BLOCK as i64, "{backend}");
            assert!(done.buf.unwrap().as_slice().iter().all(|&b| b == 0x42));
        }
    }
}

#[test]
fn a_panicking_callback_is_contained() {
    for backend in backends() {
        let file = TempFile::new("panic", 8192, false);
        let ctx = context(backend, 4, &IOWorkers::new(0).unwrap());
        let mut ev = IOEvent::new(file.fd(), Buffer::aligned(512).unwrap(), IOAction::Read, 0);
        ev.set_callback(ClosureCb::new(|_| panic!("callback panic (expected by the test)")));
        ctx.submit(ev, IOChannel::Read).unwrap();
        let col = Collector::new();
        ctx.submit(col.event(file.fd(), Buffer::aligned(512).unwrap(), IOAction::Read, 0, 1), IOChannel::Read).unwrap();
        assert_eq!(col.wait_one().result, 512);
        assert_eq!(ctx.stats().completed, 2);
    }
}

#[test]
fn io_uring_setup_flags() {
    if !available(Backend::Uring) {
        return;
    }
    let workers = IOWorkers::<ClosureCb>::new(0).unwrap();
    // SQPOLL with a short idle time, and an explicit completion-queue size.
    for opts in [
        ContextOptions { backend: Backend::Uring, sqpoll_idle_ms: Some(50), ..ContextOptions::with_depth(16) },
        ContextOptions { backend: Backend::Uring, cq_size: Some(256), ..ContextOptions::with_depth(16) },
    ] {
        let ctx = IOContext::with_options(&opts, &workers).unwrap();
        let file = TempFile::new("flags", 64 * 1024, false);
        let col = Collector::new();
        for i in 0..32u64 {
            let buf = Buffer::copy_from(&[i as u8; 512]).unwrap();
            ctx.submit(col.event(file.fd(), buf, IOAction::Write, i * 512, i), IOChannel::Write).unwrap();
        }
        for done in col.wait(32) {
            assert_eq!(done.result, 512);
        }
        let contents = file.contents();
        for i in 0..32usize {
            assert!(contents[i * 512..(i + 1) * 512].iter().all(|&b| b == i as u8));
        }
    }
    // IOPOLL needs a device with poll queues: the ring starts, and an I/O on
    // a file that cannot be polled still gets exactly one callback.
    let opts = ContextOptions { backend: Backend::Uring, iopoll: true, ..ContextOptions::with_depth(4) };
    let ctx = IOContext::with_options(&opts, &workers).unwrap();
    let file = TempFile::new("iopoll", 64 * 1024, true);
    let col = Collector::new();
    ctx.submit(col.event(file.fd(), Buffer::aligned(BLOCK).unwrap(), IOAction::Read, 0, 1), IOChannel::Read).unwrap();
    let done = col.wait_one();
    assert!(done.result == BLOCK as i64 || done.result < 0);
    drop(ctx);
    assert!(col.drain_ready().is_empty());
}

#[test]
fn shutdown_races_with_submitters_and_loses_nothing() {
    for backend in backends() {
        for workers in worker_modes() {
            let file = Arc::new(TempFile::new("shutdown", 64 * 512, false));
            let ctx = context(backend, 8, &workers);
            let accepted = Arc::new(AtomicUsize::new(0));
            let called = Arc::new(AtomicUsize::new(0));
            let (first_tx, first_rx) = crossbeam::channel::bounded::<()>(1);
            let called_at_shutdown = std::thread::scope(|s| {
                for t in 0..3 {
                    let (ctx, file, accepted, called, first_tx) =
                        (ctx.clone(), file.clone(), accepted.clone(), called.clone(), first_tx.clone());
                    s.spawn(move || {
                        for i in 0u64.. {
                            let mut ev =
                                IOEvent::new(file.fd(), Buffer::aligned(512).unwrap(), IOAction::Read, (i % 64) * 512);
                            let called = called.clone();
                            ev.set_callback(ClosureCb::new(move |ev| {
                                assert_eq!(ev.result(), Some(512));
                                called.fetch_add(1, Ordering::SeqCst);
                            }));
                            match ctx.submit(ev, [IOChannel::Read, IOChannel::Prio, IOChannel::Write][t]) {
                                Ok(()) => {
                                    accepted.fetch_add(1, Ordering::SeqCst);
                                    let _ = first_tx.try_send(());
                                }
                                Err(e) => {
                                    assert_eq!(e.error.raw_os_error(), Some(libc::ESHUTDOWN));
                                    break;
                                }
                            }
                        }
                    });
                }
                // Shut down while the three threads are still submitting.
                first_rx.recv_timeout(HANG_GUARD).unwrap();
                ctx.shutdown().unwrap();
                // Every accepted event has called back by the time shutdown returns:
                // no callback may run after this point.
                called.load(Ordering::SeqCst)
            });
            assert_eq!(
                called.load(Ordering::SeqCst),
                called_at_shutdown,
                "{backend}: callback after shutdown returned"
            );
            assert_eq!(called.load(Ordering::SeqCst), accepted.load(Ordering::SeqCst), "{backend}");
            assert!(accepted.load(Ordering::SeqCst) > 0);
            assert_eq!(ctx.stats().completed, accepted.load(Ordering::SeqCst) as u64);
            assert!(ctx.shutdown().is_ok(), "shutdown is idempotent");
        }
    }
}

#[test]
fn merge_submitter_after_shutdown_fails_held_events_with_eshutdown() {
    for backend in backends() {
        let file = TempFile::new("merge-shutdown", 8192, false);
        let ctx = context(backend, 4, &IOWorkers::new(0).unwrap());
        let col = Collector::new();
        let mut reader = MergeSubmitter::new(ctx.clone(), file.fd(), IOAction::Read, IOChannel::Read, 1 << 20).unwrap();
        for i in 0..3u64 {
            reader.add_event(col.event(file.fd(), Buffer::aligned(512).unwrap(), IOAction::Read, i * 512, i)).unwrap();
        }
        ctx.shutdown().unwrap();
        let late = col.event(file.fd(), Buffer::aligned(512).unwrap(), IOAction::Read, 1536, 9);
        assert_eq!(reader.add_event(late).unwrap_err().error.raw_os_error(), Some(libc::ESHUTDOWN));
        reader.flush();
        let mut results: Vec<(u64, i64)> = col.wait(3).iter().map(|d| (d.tag, d.result)).collect();
        results.sort();
        assert_eq!(
            results,
            vec![(0, -(libc::ESHUTDOWN as i64)), (1, -(libc::ESHUTDOWN as i64)), (2, -(libc::ESHUTDOWN as i64))]
        );
        assert!(col.drain_ready().is_empty());
        // Counted like every request the context answered.
        let stats = ctx.stats();
        assert_eq!((stats.submitted, stats.completed, stats.failed, stats.merged), (3, 3, 3, 3), "{backend}");
    }
}

#[test]
fn callbacks_submit_follow_ups_during_a_drain_and_they_complete() {
    for backend in backends() {
        for workers in worker_modes() {
            const CHAINS: usize = 200;
            let file = Arc::new(TempFile::new("drain-chain", (CHAINS * 512) as u64, false));
            let ctx = context(backend, 8, &workers);
            let col = Collector::new();
            for i in 0..CHAINS {
                // A read whose callback writes the block it read elsewhere.
                let mut ev = IOEvent::new(file.fd(), Buffer::aligned(512).unwrap(), IOAction::Read, (i * 512) as u64);
                let (ctx_cb, col_cb, file_cb) = (ctx.clone(), col.clone(), file.clone());
                ev.set_callback(ClosureCb::new(move |mut ev| {
                    assert_eq!(ev.result(), Some(512));
                    let buf = ev.take_buffer().unwrap();
                    let write = col_cb.event(file_cb.fd(), buf, IOAction::Write, ev.offset(), ev.offset());
                    ctx_cb.submit(write, IOChannel::Write).expect("a callback's follow-up is accepted while draining");
                }));
                ctx.submit(ev, IOChannel::Read).unwrap();
            }
            ctx.shutdown().unwrap();
            // Every follow-up write completed before shutdown returned.
            let writes = col.drain_ready();
            assert_eq!(writes.len(), CHAINS, "{backend}");
            assert!(writes.iter().all(|d| d.result == 512));
            assert_eq!(ctx.stats().completed, 2 * CHAINS as u64);
            // From outside a callback, the context now refuses.
            let late = col.event(file.fd(), Buffer::aligned(512).unwrap(), IOAction::Read, 0, 0);
            assert_eq!(ctx.submit(late, IOChannel::Read).unwrap_err().error.raw_os_error(), Some(libc::ESHUTDOWN));
        }
    }
}

#[test]
fn engine_memory_is_reported_and_bounded_per_slot() {
    for backend in backends() {
        for depth in [1usize, 32, 128, 1024] {
            let ctx = context(backend, depth, &IOWorkers::new(0).unwrap());
            let stats = ctx.stats();
            let event = std::mem::size_of::<IOEvent<ClosureCb>>() as u64;
            println!(
                "{backend} depth {depth}: {} bytes, {} per slot (event {event})",
                stats.memory_bytes, stats.memory_per_slot
            );
            assert!(stats.memory_bytes > 0);
            assert!(stats.memory_per_slot > event);
            // Bounded: the driver's share per slot does not grow with depth.
            let bound = if backend == Backend::Uring { 256 } else { 320 };
            assert!(
                stats.memory_per_slot <= bound || depth == 1,
                "{backend} depth {depth}: {} bytes per slot",
                stats.memory_per_slot
            );
        }
    }
}

#[test]
fn callbacks_on_pool_threads_chain_writes_fallocate_and_fsync() {
    // Follow-ups queued by pool-thread callbacks are submitted on those
    // threads; that path must handle every kind of request, including the
    // ones AIO hands to its helper thread (fallocate).
    for backend in backends() {
        const CHAINS: usize = 64;
        let workers = IOWorkers::new(2).unwrap();
        let file = Arc::new(TempFile::new("pool-chain", 0, false));
        let ctx = context(backend, 4, &workers);
        let col = Collector::new();
        for i in 0..CHAINS {
            let offset = (i * BLOCK) as u64;
            // Reserve the block, then write it, then fsync.
            let mut reserve = IOEvent::fallocate(file.fd(), 0, offset, BLOCK as u64);
            let (ctx_a, col_a, file_a) = (ctx.clone(), col.clone(), file.clone());
            reserve.set_callback(ClosureCb::new(move |ev| {
                assert_eq!(ev.result(), Some(0));
                let mut data = Buffer::aligned(BLOCK).unwrap();
                data.as_mut_slice().fill(i as u8);
                let mut write = IOEvent::new(file_a.fd(), data, IOAction::Write, offset);
                let (ctx_b, col_b, file_b) = (ctx_a.clone(), col_a.clone(), file_a.clone());
                write.set_callback(ClosureCb::new(move |ev| {
                    assert_eq!(ev.result(), Some(BLOCK as i64));
                    let mut sync = IOEvent::fsync(file_b.fd());
                    col_b.attach(&mut sync, i as u64);
                    ctx_b.submit(sync, IOChannel::Prio).unwrap();
                }));
                ctx_a.submit(write, IOChannel::Write).unwrap();
            }));
            ctx.submit(reserve, IOChannel::Write).unwrap();
        }
        let mut tags: Vec<u64> = (0..CHAINS)
            .map(|_| col.wait_one())
            .map(|d| {
                assert_eq!(d.result, 0, "{backend} fsync");
                d.tag
            })
            .collect();
        tags.sort_unstable();
        assert_eq!(tags, (0..CHAINS as u64).collect::<Vec<_>>(), "{backend}");
        ctx.shutdown().unwrap();
        assert_eq!(ctx.stats().completed, 3 * CHAINS as u64, "{backend}");
        let bytes = std::fs::read(&file.path).unwrap();
        assert_eq!(bytes.len(), CHAINS * BLOCK, "{backend}");
        for (i, block) in bytes.chunks(BLOCK).enumerate() {
            assert!(block.iter().all(|&b| b == i as u8), "{backend} block {i}");
        }
    }
}

/// Batches (`IOContext::batch`) from plain threads and from callbacks, one
/// nested in another and one of a second context inside: every event is
/// submitted when the outermost batch ends, whichever thread ends it, and
/// reads back the right bytes.
#[test]
fn batches_submit_everything_when_they_end() {
    const THREADS: usize = 3;
    const PER_THREAD: usize = 200; // more than the depth: some wait in the queues
    const FILE_BLOCKS: usize = 128;
    for backend in backends() {
        for workers in worker_modes() {
            let file = Arc::new(TempFile::new("batch", 0, false));
            let mut pattern = vec![0u8; FILE_BLOCKS * 512];
            Rng::new(11).fill(&mut pattern);
            std::fs::write(&file.path, &pattern).unwrap();
            let ctx = context(backend, 32, &workers);
            let other = context(backend, 4, &workers);
            let col = Collector::new();
            let chained = Arc::new(AtomicUsize::new(0));
            std::thread::scope(|s| {
                for t in 0..THREADS {
                    let (ctx, other, col, file, chained) =
                        (ctx.clone(), other.clone(), col.clone(), file.clone(), chained.clone());
                    s.spawn(move || {
                        let read = |tag: u64| {
                            let off = (tag as usize % FILE_BLOCKS * 512) as u64;
                            col.event(file.fd(), Buffer::aligned(512).unwrap(), IOAction::Read, off, tag)
                        };
                        let _batch = ctx.batch();
                        for i in 0..PER_THREAD {
                            let tag = (t * PER_THREAD + i) as u64;
                            if i == PER_THREAD / 2 {
                                // Nested: its end submits nothing, the outer one does.
                                let _inner = ctx.batch();
                                ctx.submit(read(tag), IOChannel::Read).unwrap();
                                // Another context's batch inside: not batched at all.
                                let _elsewhere = other.batch();
                                other.submit(read(1_000_000 + t as u64), IOChannel::Read).unwrap();
                                continue;
                            }
                            let mut event = read(tag);
                            if i == 0 {
                                // A callback that submits two follow-ups in a batch of its own.
                                let (ctx2, file2, col2, chained2) =
                                    (ctx.clone(), file.clone(), col.clone(), chained.clone());
                                col.attach_then(&mut event, tag, move || {
                                    let _batch = ctx2.batch();
                                    for k in 0..2u64 {
                                        let follow = 2_000_000 + tag * 2 + k;
                                        let off = (follow as usize % FILE_BLOCKS * 512) as u64;
                                        let buf = Buffer::aligned(512).unwrap();
                                        let e = col2.event(file2.fd(), buf, IOAction::Read, off, follow);
                                        ctx2.submit(e, IOChannel::Read).unwrap();
                                    }
                                    chained2.fetch_add(1, Ordering::SeqCst);
                                });
                            }
                            ctx.submit(event, IOChannel::Read).unwrap();
                        }
                    });
                }
            });
            let total = THREADS * PER_THREAD + THREADS + 2 * THREADS;
            let mut tags = HashSet::new();
            for done in col.wait(total) {
                assert!(tags.insert(done.tag), "{backend}: tag {} completed twice", done.tag);
                assert_eq!(done.result, 512, "{backend}: tag {}", done.tag);
                let off = done.offset as usize;
                assert_eq!(done.buf.unwrap().as_slice(), &pattern[off..off + 512], "{backend}: tag {}", done.tag);
            }
            assert!(col.drain_ready().is_empty(), "{backend}: extra completions");
            assert_eq!(chained.load(Ordering::SeqCst), THREADS);
            let stats = ctx.stats();
            assert_eq!((stats.completed, stats.failed), ((THREADS * PER_THREAD + 2 * THREADS) as u64, 0));
            assert_eq!(other.stats().completed, THREADS as u64);
        }
    }
}
