//! Storages for tests: an in-memory [`MemStorage`] and a [`FaultStorage`] wrapper that
//! injects failures (EIO on the Nth write or flush, short writes, ENOSPC past a length)
//! and records the ordered log of operations so that the write-ordering contract can be
//! checked and a crash at any point replayed.
//!
//! Both are cheap handles (`Clone` shares the same state): give one clone to the format as
//! `Box<dyn Storage>` and keep another to steer faults and inspect the log.

use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::iovec::{IoBufMut, Segment};
use crate::storage::Storage;

/// Allocation granularity of [`MemStorage`] (what `next_data` and `allocated_size` see).
pub const MEM_BLOCK: u64 = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn end_of(offset: u64, len: u64) -> io::Result<u64> {
    offset
        .checked_add(len)
        .filter(|&e| e <= i64::MAX as u64)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))
}

#[derive(Debug, Default)]
struct MemInner {
    data: Vec<u8>,
    /// Indices of allocated `MEM_BLOCK` blocks (all below `data.len()` rounded up).
    allocated: BTreeSet<u64>,
}

impl MemInner {
    fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        for b in offset / MEM_BLOCK..(offset + len).div_ceil(MEM_BLOCK) {
            self.allocated.insert(b);
        }
    }

    fn set_len(&mut self, len: u64) {
        self.data.resize(len as usize, 0);
        let first_gone = len.div_ceil(MEM_BLOCK);
        self.allocated.split_off(&first_gone);
    }
}

/// A sparse-aware in-memory storage. Holes are tracked per [`MEM_BLOCK`]: a block is
/// allocated once written (or reserved with `allocate`) until a `punch_hole` covers it
/// entirely or `set_len` cuts it off.
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    inner: Arc<Mutex<MemInner>>,
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage holding `data`, fully allocated.
    pub fn from_vec(data: Vec<u8>) -> Self {
        let mut inner = MemInner {
            data,
            allocated: BTreeSet::new(),
        };
        let len = inner.data.len() as u64;
        inner.mark(0, len);
        MemStorage {
            inner: Arc::new(Mutex::new(inner)),
        }
    }

    /// A copy of the current content.
    pub fn to_vec(&self) -> Vec<u8> {
        lock(&self.inner).data.clone()
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let inner = lock(&self.inner);
        let len = inner.data.len() as u64;
        buf.fill(0);
        if offset < len {
            let n = (len - offset).min(buf.len() as u64) as usize;
            let o = offset as usize;
            buf[..n].copy_from_slice(&inner.data[o..o + n]);
        }
        Ok(())
    }

    fn read_vectored_at(&self, bufs: &[IoBufMut<'_>], offset: u64) -> io::Result<()> {
        let inner = lock(&self.inner);
        let mut pos = offset;
        for b in bufs {
            let n = (inner.data.len() as u64)
                .saturating_sub(pos)
                .min(b.len() as u64) as usize;
            let o = pos as usize;
            b.sub(0, n)
                .copy_from(&inner.data[o.min(inner.data.len())..][..n]);
            b.sub(n, b.len() - n).zero();
            pos += b.len() as u64;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = end_of(offset, buf.len() as u64)?;
        let mut inner = lock(&self.inner);
        if buf.is_empty() {
            return Ok(());
        }
        if end > inner.data.len() as u64 {
            inner.data.resize(end as usize, 0);
        }
        inner.data[offset as usize..end as usize].copy_from_slice(buf);
        inner.mark(offset, buf.len() as u64);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.inner).data.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        end_of(len, 0)?;
        lock(&self.inner).set_len(len);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        end_of(offset, len)?;
        let mut inner = lock(&self.inner);
        let size = inner.data.len() as u64;
        if offset >= size || len == 0 {
            return Ok(());
        }
        // Like FALLOC_FL_KEEP_SIZE: never grows the storage.
        let end = (offset + len).min(size);
        inner.data[offset as usize..end as usize].fill(0);
        let first_full = offset.div_ceil(MEM_BLOCK);
        let last_full = if end == size {
            end.div_ceil(MEM_BLOCK)
        } else {
            end / MEM_BLOCK
        };
        for b in first_full..last_full {
            inner.allocated.remove(&b);
        }
        Ok(())
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = end_of(offset, len)?;
        let mut inner = lock(&self.inner);
        if len == 0 {
            return Ok(());
        }
        if end > inner.data.len() as u64 {
            inner.data.resize(end as usize, 0);
        }
        inner.mark(offset, len);
        Ok(())
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let inner = lock(&self.inner);
        let size = inner.data.len() as u64;
        if offset >= size {
            return Ok(None);
        }
        let Some(&first) = inner.allocated.range(offset / MEM_BLOCK..).next() else {
            return Ok(None);
        };
        let mut last = first;
        for &b in inner.allocated.range(first + 1..) {
            if b != last + 1 {
                break;
            }
            last = b;
        }
        let start = (first * MEM_BLOCK).max(offset);
        let stop = ((last + 1) * MEM_BLOCK).min(size);
        Ok((start < stop).then_some((start, stop)))
    }

    fn allocated_size(&self) -> io::Result<u64> {
        Ok(lock(&self.inner).allocated.len() as u64 * MEM_BLOCK)
    }
}

/// One operation that reached the storage below a [`FaultStorage`], in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `len` bytes were written at `offset` (for a short write: the prefix that landed).
    Write { offset: u64, len: u64 },
    /// A flush completed successfully: everything before it is durable.
    Flush,
    /// The storage was truncated or extended to `len`.
    SetLen { len: u64 },
    /// A range was deallocated (reads as zeroes).
    PunchHole { offset: u64, len: u64 },
    /// A range was reserved (content unchanged, may extend the length).
    Allocate { offset: u64, len: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteFault {
    Eio,
    Short(usize),
}

#[derive(Debug, Default)]
struct FaultState {
    writes: u64,
    flushes: u64,
    write_faults: Vec<(u64, WriteFault)>,
    flush_faults: Vec<u64>,
    writes_fail_from: Option<u64>,
    flushes_fail_from: Option<u64>,
    enospc_limit: Option<u64>,
    /// Content when recording started.
    initial: Vec<u8>,
    log: Vec<Op>,
    /// The bytes of each logged `Write`, by log index.
    data: Vec<Option<Vec<u8>>>,
}

impl FaultState {
    fn push(&mut self, op: Op, bytes: Option<Vec<u8>>) {
        self.log.push(op);
        self.data.push(bytes);
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

/// A [`Storage`] wrapper that injects failures and records every operation.
///
/// Counting is per call and 1-based: `fail_write(1)` makes the next `write_at` fail.
/// Operations are applied to the inner storage while the wrapper's state is locked, so the
/// log order is the order in which the inner storage saw them.
#[derive(Clone)]
pub struct FaultStorage {
    inner: Arc<dyn Storage>,
    state: Arc<Mutex<FaultState>>,
}

impl std::fmt::Debug for FaultStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = lock(&self.state);
        f.debug_struct("FaultStorage")
            .field("writes", &s.writes)
            .field("flushes", &s.flushes)
            .field("log_len", &s.log.len())
            .finish_non_exhaustive()
    }
}

fn read_all(s: &dyn Storage) -> io::Result<Vec<u8>> {
    let len = s.len()?;
    let mut v = vec![0u8; len as usize];
    s.read_at(&mut v, 0)?;
    Ok(v)
}

impl FaultStorage {
    /// Wrap `inner`, taking a copy of its current content as the initial state of the log.
    pub fn new(inner: impl Storage + 'static) -> io::Result<Self> {
        let inner: Arc<dyn Storage> = Arc::new(inner);
        let initial = read_all(&*inner)?;
        Ok(FaultStorage {
            inner,
            state: Arc::new(Mutex::new(FaultState {
                initial,
                ..Default::default()
            })),
        })
    }

    /// Wrap a fresh empty [`MemStorage`].
    pub fn in_memory() -> Self {
        Self::new(MemStorage::new()).expect("memory storage cannot fail")
    }

    /// Wrap a [`MemStorage`] holding `data`.
    pub fn with_content(data: Vec<u8>) -> Self {
        Self::new(MemStorage::from_vec(data)).expect("memory storage cannot fail")
    }

    /// A boxed clone, ready to hand to a format.
    pub fn boxed(&self) -> Box<dyn Storage> {
        Box::new(self.clone())
    }

    /// The `n`-th `write_at` from now (1 = the next one) fails with EIO, writing nothing.
    pub fn fail_write(&self, n: u64) {
        let mut s = lock(&self.state);
        let at = s.writes + n.max(1);
        s.write_faults.push((at, WriteFault::Eio));
    }

    /// The `n`-th `write_at` from now writes only its first `prefix` bytes, then fails
    /// with EIO.
    pub fn short_write(&self, n: u64, prefix: usize) {
        let mut s = lock(&self.state);
        let at = s.writes + n.max(1);
        s.write_faults.push((at, WriteFault::Short(prefix)));
    }

    /// Every `write_at` from the `n`-th from now on fails with EIO (a dead disk);
    /// `None` heals it.
    pub fn fail_writes_from(&self, n: Option<u64>) {
        let mut s = lock(&self.state);
        s.writes_fail_from = n.map(|n| s.writes + n.max(1));
    }

    /// The `n`-th `flush` from now (1 = the next one) fails with EIO.
    pub fn fail_flush(&self, n: u64) {
        let mut s = lock(&self.state);
        let at = s.flushes + n.max(1);
        s.flush_faults.push(at);
    }

    /// Every `flush` from the `n`-th from now on fails with EIO; `None` heals it.
    pub fn fail_flushes_from(&self, n: Option<u64>) {
        let mut s = lock(&self.state);
        s.flushes_fail_from = n.map(|n| s.flushes + n.max(1));
    }

    /// Writes and allocations reaching past `limit` bytes fail with ENOSPC (the part of a
    /// write below the limit lands first, like a real full disk). `None` lifts the limit.
    pub fn set_enospc_limit(&self, limit: Option<u64>) {
        lock(&self.state).enospc_limit = limit;
    }

    /// How many `write_at` calls were made (including failed ones).
    pub fn write_count(&self) -> u64 {
        lock(&self.state).writes
    }

    /// How many `flush` calls were made (including failed ones).
    pub fn flush_count(&self) -> u64 {
        lock(&self.state).flushes
    }

    /// The ordered log of operations that reached the inner storage.
    pub fn log(&self) -> Vec<Op> {
        lock(&self.state).log.clone()
    }

    /// Forget the log and take the current content as the new initial state.
    pub fn reset_log(&self) -> io::Result<()> {
        let current = read_all(&*self.inner)?;
        let mut s = lock(&self.state);
        s.initial = current;
        s.log.clear();
        s.data.clear();
        Ok(())
    }

    /// The current content of the inner storage.
    pub fn content(&self) -> io::Result<Vec<u8>> {
        read_all(&*self.inner)
    }

    /// Index just past the last `Flush` among the first `k` log entries (0 if none): the
    /// entries before it are durable in a crash at point `k`.
    pub fn durable_prefix(&self, k: usize) -> usize {
        let s = lock(&self.state);
        let k = k.min(s.log.len());
        s.log[..k]
            .iter()
            .rposition(|op| *op == Op::Flush)
            .map_or(0, |i| i + 1)
    }

    /// The content after exactly the first `k` logged operations (a crash right after
    /// them, where everything issued happened to reach the disk).
    pub fn crash_image_at(&self, k: usize) -> Vec<u8> {
        self.crash_image_subset(k, &|_| true)
    }

    /// Three crashes at log point `k`: every operation issued so far reached the disk, or
    /// of the unflushed ones only those at even, or only those at odd, log indices.
    pub fn crash_images(&self, k: usize) -> [Vec<u8>; 3] {
        [
            self.crash_image_at(k),
            self.crash_image_subset(k, &|i| i % 2 == 0),
            self.crash_image_subset(k, &|i| i % 2 == 1),
        ]
    }

    /// The content of a crash at log point `k` in which everything up to the last flush
    /// before `k` is durable and, of the later operations (log indices in
    /// `durable_prefix(k)..k`), only those for which `survives(index)` is true reached the
    /// disk — in log order. Use it to check that no subset of unflushed writes corrupts.
    pub fn crash_image_subset(&self, k: usize, survives: &dyn Fn(usize) -> bool) -> Vec<u8> {
        let durable = self.durable_prefix(k);
        let s = lock(&self.state);
        let k = k.min(s.log.len());
        let mut img = s.initial.clone();
        for i in 0..k {
            if i >= durable && !survives(i) {
                continue;
            }
            match (&s.log[i], &s.data[i]) {
                (Op::Write { offset, .. }, Some(bytes)) => {
                    let o = *offset as usize;
                    if img.len() < o + bytes.len() {
                        img.resize(o + bytes.len(), 0);
                    }
                    img[o..o + bytes.len()].copy_from_slice(bytes);
                }
                (Op::SetLen { len }, _) => img.resize(*len as usize, 0),
                (Op::PunchHole { offset, len }, _) => {
                    let o = (*offset as usize).min(img.len());
                    let e = (offset + len).min(img.len() as u64) as usize;
                    img[o..e].fill(0);
                }
                (Op::Allocate { offset, len }, _) => {
                    let e = (offset + len) as usize;
                    if img.len() < e {
                        img.resize(e, 0);
                    }
                }
                _ => {}
            }
        }
        img
    }
}

impl Storage for FaultStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn read_vectored_at(&self, bufs: &[IoBufMut<'_>], offset: u64) -> io::Result<()> {
        self.inner.read_vectored_at(bufs, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = lock(&self.state);
        s.writes += 1;
        let n = s.writes;
        let mut fault = None;
        if let Some(i) = s.write_faults.iter().position(|(at, _)| *at == n) {
            fault = Some(s.write_faults.remove(i).1);
        }
        if s.writes_fail_from.is_some_and(|from| n >= from) {
            fault = Some(WriteFault::Eio);
        }
        let (land, err) = match fault {
            Some(WriteFault::Eio) => (0, Some(eio())),
            Some(WriteFault::Short(p)) => (p.min(buf.len()), Some(eio())),
            None => (buf.len(), None),
        };
        let (land, err) = match s.enospc_limit {
            Some(limit) if offset.saturating_add(land as u64) > limit => (
                limit.saturating_sub(offset).min(land as u64) as usize,
                Some(enospc()),
            ),
            _ => (land, err),
        };
        if land > 0 {
            self.inner.write_at(&buf[..land], offset)?;
            s.push(
                Op::Write {
                    offset,
                    len: land as u64,
                },
                Some(buf[..land].to_vec()),
            );
        }
        match err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn flush(&self) -> io::Result<()> {
        let mut s = lock(&self.state);
        s.flushes += 1;
        let n = s.flushes;
        let once = if let Some(i) = s.flush_faults.iter().position(|&at| at == n) {
            s.flush_faults.remove(i);
            true
        } else {
            false
        };
        if once || s.flushes_fail_from.is_some_and(|from| n >= from) {
            return Err(eio());
        }
        self.inner.flush()?;
        s.push(Op::Flush, None);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = lock(&self.state);
        self.inner.set_len(len)?;
        s.push(Op::SetLen { len }, None);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut s = lock(&self.state);
        self.inner.punch_hole(offset, len)?;
        s.push(Op::PunchHole { offset, len }, None);
        Ok(())
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut s = lock(&self.state);
        if s.enospc_limit
            .is_some_and(|limit| offset.saturating_add(len) > limit)
        {
            return Err(enospc());
        }
        self.inner.allocate(offset, len)?;
        s.push(Op::Allocate { offset, len }, None);
        Ok(())
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        self.inner.next_data(offset)
    }

    fn allocated_size(&self) -> io::Result<u64> {
        self.inner.allocated_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno(r: io::Result<()>) -> i32 {
        r.unwrap_err().raw_os_error().unwrap()
    }

    #[test]
    fn mem_storage_basics() {
        let m = MemStorage::new();
        assert_eq!(m.len().unwrap(), 0);
        assert_eq!(m.next_data(0).unwrap(), None);
        m.write_at(b"abc", 10_000).unwrap();
        assert_eq!(m.len().unwrap(), 10_003);
        let mut buf = [9u8; 8];
        m.read_at(&mut buf, 9_998).unwrap();
        assert_eq!(&buf, b"\0\0abc\0\0\0", "past the end reads as zeroes");
        // Block 2 (8192..12288) is allocated, clipped to the length.
        assert_eq!(m.next_data(0).unwrap(), Some((8192, 10_003)));
        assert_eq!(m.next_data(9000).unwrap(), Some((9000, 10_003)));
        assert_eq!(m.allocated_size().unwrap(), 4096);
        m.set_len(20_000).unwrap();
        assert_eq!(m.next_data(10_003).unwrap(), Some((10_003, 12_288)));
        assert_eq!(m.next_data(12_288).unwrap(), None);
        m.allocate(16_384, 100).unwrap();
        assert_eq!(m.next_data(12_288).unwrap(), Some((16_384, 20_000)));
        // Partial punch zeroes but keeps the block; full punch frees it.
        m.punch_hole(10_001, 1).unwrap();
        m.read_at(&mut buf[..3], 10_000).unwrap();
        assert_eq!(&buf[..3], b"a\0c");
        assert_eq!(m.allocated_size().unwrap(), 8192);
        m.punch_hole(8192, 4096).unwrap();
        assert_eq!(m.next_data(0).unwrap(), Some((16_384, 20_000)));
        // Punch past the end does not grow; a tail punch frees the partial last block.
        m.punch_hole(16_384, 1 << 20).unwrap();
        assert_eq!(m.len().unwrap(), 20_000);
        assert_eq!(m.next_data(0).unwrap(), None);
        assert_eq!(m.allocated_size().unwrap(), 0);
        m.write_at(&[1; 5000], 0).unwrap();
        m.set_len(100).unwrap();
        assert_eq!(m.allocated_size().unwrap(), 4096);
        assert_eq!(m.to_vec(), vec![1u8; 100]);
        assert_eq!(errno(m.write_at(b"x", u64::MAX)), libc::EFBIG);
        let shared = m.clone();
        shared.write_at(b"z", 0).unwrap();
        assert_eq!(m.to_vec()[0], b'z');
    }

    #[test]
    fn fail_nth_write_and_flush() {
        let f = FaultStorage::in_memory();
        f.fail_write(2);
        f.write_at(b"a", 0).unwrap();
        assert_eq!(errno(f.write_at(b"b", 1)), libc::EIO);
        f.write_at(b"c", 2).unwrap();
        assert_eq!(f.content().unwrap(), b"a\0c");
        assert_eq!(f.write_count(), 3);

        f.fail_flush(1);
        assert_eq!(errno(f.flush()), libc::EIO);
        f.flush().unwrap();
        assert_eq!(f.flush_count(), 2);

        f.fail_writes_from(Some(1));
        assert_eq!(errno(f.write_at(b"d", 0)), libc::EIO);
        assert_eq!(errno(f.write_at(b"d", 0)), libc::EIO);
        f.fail_writes_from(None);
        f.write_at(b"d", 0).unwrap();
        f.fail_flushes_from(Some(2));
        f.flush().unwrap();
        assert!(f.flush().is_err() && f.flush().is_err());
        assert_eq!(
            f.log(),
            vec![
                Op::Write { offset: 0, len: 1 },
                Op::Write { offset: 2, len: 1 },
                Op::Flush,
                Op::Write { offset: 0, len: 1 },
                Op::Flush,
            ]
        );
    }

    #[test]
    fn short_write_and_enospc() {
        let f = FaultStorage::with_content(vec![0u8; 8]);
        f.short_write(1, 3);
        assert_eq!(errno(f.write_at(b"abcdef", 0)), libc::EIO);
        assert_eq!(f.content().unwrap(), b"abc\0\0\0\0\0");
        assert_eq!(f.log(), vec![Op::Write { offset: 0, len: 3 }]);

        f.set_enospc_limit(Some(10));
        f.write_at(b"12", 8).unwrap();
        assert_eq!(errno(f.write_at(b"xyz", 9)), libc::ENOSPC);
        assert_eq!(f.content().unwrap(), b"abc\0\0\0\0\0\x31x");
        assert_eq!(errno(f.write_at(b"q", 10)), libc::ENOSPC);
        assert_eq!(errno(f.allocate(0, 11)), libc::ENOSPC);
        f.allocate(0, 10).unwrap();
        f.set_enospc_limit(None);
        f.write_at(b"q", 10).unwrap();
        assert_eq!(f.len().unwrap(), 11);
    }

    #[test]
    fn crash_replay() {
        let f = FaultStorage::with_content(b"........".to_vec());
        let boxed = f.boxed();
        boxed.write_at(b"AA", 0).unwrap(); // 0
        boxed.flush().unwrap(); // 1
        boxed.write_at(b"BB", 2).unwrap(); // 2
        boxed.set_len(12).unwrap(); // 3
        boxed.write_at(b"CC", 10).unwrap(); // 4
        boxed.punch_hole(0, 1).unwrap(); // 5
        boxed.flush().unwrap(); // 6
        boxed.write_at(b"DD", 4).unwrap(); // 7

        assert_eq!(f.crash_image_at(0), b"........");
        assert_eq!(f.crash_image_at(1), b"AA......");
        assert_eq!(f.crash_image_at(3), b"AABB....");
        assert_eq!(f.crash_image_at(4), b"AABB....\0\0\0\0");
        assert_eq!(f.crash_image_at(6), b"\0ABB....\0\0CC");
        assert_eq!(f.crash_image_at(100), f.content().unwrap());
        assert_eq!(f.durable_prefix(0), 0);
        assert_eq!(f.durable_prefix(2), 2);
        assert_eq!(f.durable_prefix(6), 2);
        assert_eq!(f.durable_prefix(7), 7);
        // Crash before the second flush where only the CC write landed.
        assert_eq!(f.crash_image_subset(6, &|i| i == 4), b"AA......\0\0CC");
        // Durable operations are applied whatever the predicate says.
        assert_eq!(f.crash_image_subset(8, &|_| false), b"\0ABB....\0\0CC");

        f.reset_log().unwrap();
        assert!(f.log().is_empty());
        assert_eq!(f.crash_image_at(0), f.content().unwrap());
    }

    #[test]
    fn concurrent_writes_are_logged_consistently() {
        let f = FaultStorage::in_memory();
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let f = f.clone();
                s.spawn(move || {
                    for i in 0..100u64 {
                        f.write_at(&[t; 16], (i % 10) * 16).unwrap();
                    }
                });
            }
        });
        assert_eq!(f.log().len(), 400);
        assert_eq!(f.crash_image_at(400), f.content().unwrap());
    }
}
