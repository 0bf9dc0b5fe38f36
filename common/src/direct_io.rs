//! Positional I/O on a file opened with `O_DIRECT` (bypassing the host page cache, QEMU's
//! `cache=none`) for buffers of any alignment and size.
//!
//! Requests whose buffer, offset and length are aligned go straight to the file. Others go
//! through an aligned bounce buffer; an unaligned write reads the blocks it covers only
//! partly, patches them, and writes them back. Writes hold per-block stripe locks, so two
//! writers patching one block never lose each other's bytes.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard};

use crate::iovec::{self, IoBuf, IoBufMut};
use crate::storage::{preadv_all, pwritev_all};

const STRIPES: usize = 64;

/// O_DIRECT I/O helper for one file.
pub struct DirectIo {
    align: usize,
    stripes: Vec<Mutex<()>>,
}

/// A zeroed heap buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize, align: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len.max(align), align).expect("valid layout");
        // SAFETY: the layout has a nonzero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, layout }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live, zero-initialised allocation of layout.size() bytes that
        // this buffer owns exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

impl DirectIo {
    /// Learn the alignment the file needs (512 bytes, else 4096).
    pub fn new(file: &File) -> io::Result<DirectIo> {
        let mut align = 512;
        let mut probe = AlignedBuf::new(4096, 4096);
        if let Err(e) = file.read_at(&mut probe.as_mut_slice()[..512], 0) {
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
            align = 4096;
            file.read_at(probe.as_mut_slice(), 0)?;
        }
        Ok(DirectIo {
            align,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    /// Whether a list of buffers at `offset` can go to the file as it is.
    fn aligned(&self, mut bufs: impl Iterator<Item = (*const u8, usize)>, offset: u64) -> bool {
        let a = self.align;
        offset.is_multiple_of(a as u64)
            && bufs.all(|(ptr, len)| (ptr as usize).is_multiple_of(a) && len.is_multiple_of(a))
    }

    /// The aligned span [start, end) covering `len` bytes at `offset`.
    fn span(&self, offset: u64, len: usize) -> (u64, u64) {
        let a = self.align as u64;
        (
            offset - offset % a,
            (offset + len as u64).next_multiple_of(a),
        )
    }

    /// Lock the stripes of the blocks in [start, end), in index order.
    fn lock(&self, start: u64, end: u64) -> Vec<MutexGuard<'_, ()>> {
        let a = self.align as u64;
        let blocks = ((end - start) / a) as usize;
        let mut idx: Vec<usize> = if blocks >= STRIPES {
            (0..STRIPES).collect()
        } else {
            (0..blocks as u64)
                .map(|i| ((start / a + i) % STRIPES as u64) as usize)
                .collect()
        };
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| self.stripes[i].lock().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }

    /// Fill `bufs` from `offset`; bytes past the end of the file read as zeroes.
    pub fn read_vectored_at(
        &self,
        file: &File,
        bufs: &[IoBufMut<'_>],
        offset: u64,
    ) -> io::Result<()> {
        let raw = bufs.iter().map(|b| (b.as_mut_ptr() as *const u8, b.len()));
        if self.aligned(raw, offset) {
            return preadv_all(file, bufs, offset);
        }
        let len = iovec::total_len(bufs);
        let (start, end) = self.span(offset, len);
        let mut bounce = AlignedBuf::new((end - start) as usize, self.align);
        let b = &mut bounce.as_mut_slice()[..(end - start) as usize];
        preadv_all(file, &[IoBufMut::from(&mut *b)], start)?;
        let at = (offset - start) as usize;
        iovec::scatter(bufs, &b[at..at + len]);
        Ok(())
    }

    /// Write all of `bufs` at `offset`.
    pub fn write_vectored_at(
        &self,
        file: &File,
        bufs: &[IoBuf<'_>],
        offset: u64,
    ) -> io::Result<()> {
        let data_len = iovec::total_len(bufs);
        let (start, end) = self.span(offset, data_len);
        let _guards = self.lock(start, end);
        if self.aligned(bufs.iter().map(|b| (b.as_ptr(), b.len())), offset) {
            return pwritev_all(file, bufs, offset);
        }
        let len = (end - start) as usize;
        let mut bounce = AlignedBuf::new(len, self.align);
        let b = &mut bounce.as_mut_slice()[..len];
        let a = self.align;
        let at = (offset - start) as usize;
        // Blocks only partly covered keep their other bytes: read them first.
        if at != 0 {
            preadv_all(file, &[IoBufMut::from(&mut b[..a])], start)?;
        }
        let tail = len - a;
        if !(at + data_len).is_multiple_of(a) && (tail != 0 || at == 0) {
            preadv_all(file, &[IoBufMut::from(&mut b[tail..])], start + tail as u64)?;
        }
        iovec::gather(bufs, &mut b[at..at + data_len]);
        pwritev_all(file, &[IoBuf::from(&*b)], start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn unaligned_reads_and_writes_round_trip_without_losing_neighbours() {
        // tmpfs has no O_DIRECT: use the build's target directory, which is on disk.
        let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).unwrap();
        let p = dir.path().join("d.img");
        std::fs::write(&p, vec![7u8; 20000]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p)
            .unwrap();
        let d = DirectIo::new(&file).unwrap();
        let mut model = vec![7u8; 20000];
        for (off, len, v) in [
            (3u64, 5usize, 1u8),
            (510, 4, 2),
            (4096, 4096, 3),
            (8000, 9000, 4),
        ] {
            d.write_vectored_at(&file, &[IoBuf::from(&vec![v; len][..])], off)
                .unwrap();
            model[off as usize..off as usize + len].fill(v);
        }
        // Extending the file past its end with an unaligned tail.
        d.write_vectored_at(&file, &[IoBuf::from(&[9u8; 100][..])], 19950)
            .unwrap();
        model.resize(20050, 0);
        model[19950..20050].fill(9);
        let mut back = vec![0u8; 20050];
        d.read_vectored_at(&file, &[IoBufMut::from(&mut back[1..])], 1)
            .unwrap();
        d.read_vectored_at(&file, &[IoBufMut::from(&mut back[..1])], 0)
            .unwrap();
        assert!(back == model);
        // Concurrent single-byte writers into one block lose nothing.
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let (d, file) = (&d, &file);
                s.spawn(move || {
                    for i in 0..32u64 {
                        d.write_vectored_at(
                            file,
                            &[IoBuf::from(&[t + 100][..])],
                            64 + u64::from(t) * 32 + i,
                        )
                        .unwrap();
                    }
                });
            }
        });
        let mut blk = vec![0u8; 256];
        d.read_vectored_at(&file, &[IoBufMut::from(&mut blk[..])], 64)
            .unwrap();
        for t in 0..8usize {
            assert!(blk[t * 32..t * 32 + 32].iter().all(|&b| b == t as u8 + 100));
        }
    }
}
