//! Sequential read-ahead under the ext2/3/4 reader. ext4-view asks for one block at a time,
//! so a kernel and an initrd of tens of MiB would be thousands of small engine reads, each
//! through every layer of the image chain. A read that continues where the last one (or the
//! window) ended is served from a window read ahead of it: the window doubles from
//! [`MIN_WINDOW`] up to [`MAX_WINDOW`] while reads stay sequential and is read in
//! [`PIECE`]-aligned pieces on up to [`MAX_THREADS`] threads, so that compressed clusters
//! decompress in parallel. Any other read (metadata, directories) goes straight to the disk
//! and shrinks the next window back to the minimum.

use std::sync::Arc;

use common::BlockDriver;

/// The first window once reads turn sequential.
const MIN_WINDOW: usize = 128 << 10;
/// The largest window (the memory read ahead at most).
const MAX_WINDOW: usize = 8 << 20;
/// A window is read in pieces at multiples of this disk offset, one per thread.
const PIECE: u64 = 1 << 20;
/// Most threads reading one window.
const MAX_THREADS: usize = 4;

/// A byte range of the disk (a partition, or the whole disk) read with read-ahead.
pub struct ReadAhead {
    disk: Arc<dyn BlockDriver>,
    /// Where the range starts on the disk, and its length.
    start: u64,
    len: u64,
    /// The window: the bytes at range offset `at`.
    buf: Vec<u8>,
    at: u64,
    /// Where the last read ended.
    next: u64,
    /// The size of the next window.
    window: usize,
}

impl ReadAhead {
    pub fn new(disk: Arc<dyn BlockDriver>, start: u64, len: u64) -> ReadAhead {
        ReadAhead {
            disk,
            start,
            len,
            buf: Vec::new(),
            at: 0,
            next: u64::MAX,
            window: MIN_WINDOW,
        }
    }

    /// Fill `dst` from range offset `off`; the caller has checked that it lies in the range.
    pub fn read(&mut self, dst: &mut [u8], off: u64) -> common::Result<()> {
        let end = off + dst.len() as u64;
        let window_end = self.at + self.buf.len() as u64;
        if off >= self.at && end <= window_end {
            let from = (off - self.at) as usize;
            dst.copy_from_slice(&self.buf[from..from + dst.len()]);
        } else if (off == self.next || off == window_end) && dst.len() < self.window {
            self.fill(off)?;
            dst.copy_from_slice(&self.buf[..dst.len()]);
            self.window = (self.window * 2).min(MAX_WINDOW);
        } else {
            self.disk.read_at(dst, self.start + off)?;
            self.window = MIN_WINDOW;
        }
        self.next = end;
        Ok(())
    }

    /// Read the next window, from range offset `off` to at most the end of the range.
    fn fill(&mut self, off: u64) -> common::Result<()> {
        let n = (self.window as u64).min(self.len - off) as usize;
        self.buf.resize(n, 0);
        self.at = off;
        let disk_off = self.start + off;
        let mut pieces = Vec::new();
        let mut rest = &mut self.buf[..];
        let mut at = disk_off;
        while !rest.is_empty() {
            let to_boundary = (PIECE - at % PIECE) as usize;
            let (piece, tail) = rest.split_at_mut(to_boundary.min(rest.len()));
            pieces.push((at, piece));
            at += to_boundary as u64;
            rest = tail;
        }
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_THREADS)
            .min(pieces.len());
        if threads <= 1 {
            return pieces
                .into_iter()
                .try_for_each(|(at, piece)| self.disk.read_at(piece, at));
        }
        let disk = &*self.disk;
        let per_thread = pieces.len().div_ceil(threads);
        std::thread::scope(|s| {
            let handles: Vec<_> = pieces
                .chunks_mut(per_thread)
                .map(|group| {
                    s.spawn(move || {
                        group
                            .iter_mut()
                            .try_for_each(|(at, piece)| disk.read_at(piece, *at))
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().expect("a read-ahead thread panicked"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::{BlockStatus, IoBuf, IoBufMut, Result};
    use integration_tests::mem_disk::MemDisk;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    /// A disk whose byte i is `i % 251`, counting the reads it is asked for.
    struct Counted(MemDisk, AtomicUsize);

    impl BlockDriver for Counted {
        fn format_name(&self) -> &'static str {
            "raw"
        }
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn is_read_only(&self) -> bool {
            true
        }
        fn read_vectored_at(&self, b: &[IoBufMut<'_>], o: u64) -> Result<()> {
            self.1.fetch_add(1, SeqCst);
            self.0.read_vectored_at(b, o)
        }
        fn write_vectored_at(&self, b: &[IoBuf<'_>], o: u64) -> Result<()> {
            self.0.write_vectored_at(b, o)
        }
        fn write_zeroes(&self, o: u64, n: u64, u: bool) -> Result<()> {
            self.0.write_zeroes(o, n, u)
        }
        fn discard(&self, o: u64, n: u64) -> Result<()> {
            self.0.discard(o, n)
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn block_status(&self, o: u64, n: u64) -> Result<BlockStatus> {
            self.0.block_status(o, n)
        }
        fn allocated_file_size(&self) -> Result<u64> {
            Ok(0)
        }
    }

    fn disk(len: u64) -> Arc<Counted> {
        let m = MemDisk::new(len as usize, false);
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        m.write_at(&data, 0).unwrap();
        Arc::new(Counted(m, 0.into()))
    }

    fn expect(off: u64, len: usize) -> Vec<u8> {
        (off..off + len as u64).map(|i| (i % 251) as u8).collect()
    }

    const START: u64 = 3 * 4096;

    #[test]
    fn sequential_blocks_are_read_in_growing_windows() {
        let len = 20 << 20;
        let d = disk(START + len);
        let mut r = ReadAhead::new(d.clone(), START, len);
        let mut buf = vec![0u8; 4096];
        for b in 0..len / 4096 {
            r.read(&mut buf, b * 4096).unwrap();
            assert_eq!(buf, expect(START + b * 4096, 4096), "block {b}");
        }
        // One direct read, then windows of 128 KiB doubling to 8 MiB read in 1 MiB pieces:
        // far fewer engine reads than the 5120 blocks.
        let reads = d.1.load(SeqCst);
        assert!(
            reads <= 1 + 30,
            "{reads} engine reads for 5120 sequential blocks"
        );
    }

    #[test]
    fn jumps_odd_sizes_and_reads_past_the_window_return_the_disk_bytes() {
        let len = 12 << 20;
        let d = disk(START + len);
        let mut r = ReadAhead::new(d, START, len);
        let mut buf = vec![0u8; 4096];
        for b in 0..600 {
            r.read(&mut buf, b * 4096).unwrap();
        }
        let cases = [
            (5000u64, 17usize),
            (1 << 20, 4096),
            (0, 1),
            (len - 100, 100),
            (600 * 4096 - 10, 4096),
            (7, 9 << 20),
        ];
        for (off, n) in cases {
            let mut b = vec![0u8; n];
            r.read(&mut b, off).unwrap();
            assert_eq!(b, expect(START + off, n), "read {off}+{n}");
        }
        // Sequential again after the jumps, up to the end of the range.
        for b in (len - (1 << 20)) / 4096..len / 4096 {
            r.read(&mut buf, b * 4096).unwrap();
            assert_eq!(buf, expect(START + b * 4096, 4096), "block {b}");
        }
    }
}
