//! Sequential read-ahead over a byte range of the disk, for ext4-view, which reads a file
//! 32 KiB at a time. Each read that continues the previous one doubles the window read
//! ahead (up to [`MAX_WINDOW`]); the window is read on several threads in 1 MiB pieces, so
//! that the compressed clusters of a `qcow2 -c` image are decompressed in parallel. Reads
//! elsewhere (metadata) go straight to the disk.

use std::sync::Arc;

use common::BlockDriver;

/// Largest window read ahead.
const MAX_WINDOW: u64 = 8 << 20;
/// Smallest window: a read-ahead below it is not worth a thread.
const MIN_WINDOW: u64 = 256 << 10;
/// What one thread reads of a window, at disk offsets aligned to it (so that no cluster of
/// up to 1 MiB is decompressed by two threads).
const PIECE: u64 = 1 << 20;
/// Most threads reading a window.
const MAX_THREADS: usize = 4;

/// `len` bytes of `disk` from `start`, read ahead.
pub struct ReadAhead {
    disk: Arc<dyn BlockDriver>,
    start: u64,
    len: u64,
    /// The window: bytes from range offset `at`.
    buf: Vec<u8>,
    at: u64,
    /// Where the last read ended, and the window that read would have read ahead.
    last_end: u64,
    window: u64,
}

impl ReadAhead {
    pub fn new(disk: Arc<dyn BlockDriver>, start: u64, len: u64) -> ReadAhead {
        ReadAhead {
            disk,
            start,
            len,
            buf: Vec::new(),
            at: 0,
            last_end: u64::MAX,
            window: MIN_WINDOW / 2,
        }
    }

    /// Fill `dst` from range offset `offset`; the caller has checked the range.
    pub fn read(&mut self, offset: u64, dst: &mut [u8]) -> common::error::Result<()> {
        let end = offset + dst.len() as u64;
        let sequential = offset == self.last_end;
        self.last_end = end;
        if offset >= self.at && end <= self.at + self.buf.len() as u64 {
            let from = (offset - self.at) as usize;
            dst.copy_from_slice(&self.buf[from..from + dst.len()]);
            return Ok(());
        }
        if !sequential {
            self.window = MIN_WINDOW / 2;
            return self.disk.read_at(dst, self.start + offset);
        }
        self.window = (self.window * 2).min(MAX_WINDOW);
        let want = self.window.max(dst.len() as u64).min(self.len - offset);
        self.buf.resize(want as usize, 0);
        self.at = offset;
        if let Err(e) = read_parallel(&*self.disk, &mut self.buf, self.start + offset) {
            self.buf.clear();
            return Err(e);
        }
        dst.copy_from_slice(&self.buf[..dst.len()]);
        Ok(())
    }
}

/// Fill `buf` from disk offset `at` in [`PIECE`]-aligned pieces on up to [`MAX_THREADS`]
/// threads (this one included; fewer when threads cannot be started).
fn read_parallel(disk: &dyn BlockDriver, buf: &mut [u8], at: u64) -> common::error::Result<()> {
    let first = (PIECE - at % PIECE) as usize;
    let mut pieces: Vec<(u64, &mut [u8])> = Vec::new();
    let (head, mut rest) = buf.split_at_mut(first.min(buf.len()));
    pieces.push((at, head));
    let mut off = at + first as u64;
    while !rest.is_empty() {
        let (p, r) = rest.split_at_mut((PIECE as usize).min(rest.len()));
        pieces.push((off, p));
        off += PIECE;
        rest = r;
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_THREADS)
        .min(pieces.len());
    let queue = std::sync::Mutex::new(pieces);
    let work = || -> common::error::Result<()> {
        loop {
            let Some((off, piece)) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                return Ok(());
            };
            disk.read_at(piece, off)?;
        }
    };
    std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads)
            .filter_map(|_| std::thread::Builder::new().spawn_scoped(s, work).ok())
            .collect();
        let mut r = work();
        for h in helpers {
            let h = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            r = r.and(h);
        }
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs of sequential reads (which grow the window past several pieces and threads)
    /// mixed with jumps, over a range at an unaligned disk offset: every read returns the
    /// disk's bytes. `TEST_SEED` replays.
    #[test]
    fn reads_match_the_disk() {
        let seed = integration_tests::seed(0x4ead);
        let mut rng = integration_tests::Rng::new(seed);
        let data = rng.bytes(24 << 20);
        let disk = Arc::new(super::super::partitions::tests::mem(&data));
        let (start, len) = (12_345u64, (20 << 20) + 777);
        let mut ra = ReadAhead::new(disk, start, len);
        let mut at = 0u64;
        for round in 0..3000 {
            if rng.below(50) == 0 {
                at = rng.below(len);
            }
            let n = (1 + rng.below(40_000)).min(len - at) as usize;
            let mut buf = vec![0u8; n];
            ra.read(at, &mut buf).unwrap();
            let want = &data[(start + at) as usize..(start + at) as usize + n];
            assert!(
                buf == want,
                "round {round}: {n} bytes at {at} (TEST_SEED={seed:#x})"
            );
            at = if at + n as u64 >= len {
                0
            } else {
                at + n as u64
            };
        }
    }
}
