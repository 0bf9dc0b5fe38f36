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

fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
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

    fn aligned(&self, ptr: *const u8, len: usize, offset: u64) -> bool {
        let a = self.align;
        (ptr as usize).is_multiple_of(a) && len.is_multiple_of(a) && offset.is_multiple_of(a as u64)
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

    /// Fill `buf` from `offset`; bytes past the end of the file read as zeroes.
    pub fn read_at(&self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.aligned(buf.as_ptr(), buf.len(), offset) {
            let n = read_full(file, buf, offset)?;
            buf[n..].fill(0);
            return Ok(());
        }
        let (start, end) = self.span(offset, buf.len());
        let mut bounce = AlignedBuf::new((end - start) as usize, self.align);
        let b = bounce.as_mut_slice();
        let n = read_full(file, &mut b[..(end - start) as usize], start)?;
        b[n..].fill(0);
        let at = (offset - start) as usize;
        buf.copy_from_slice(&b[at..at + buf.len()]);
        Ok(())
    }

    /// Write all of `buf` at `offset`.
    pub fn write_at(&self, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        let (start, end) = self.span(offset, buf.len());
        let _guards = self.lock(start, end);
        if self.aligned(buf.as_ptr(), buf.len(), offset) {
            return file.write_all_at(buf, offset);
        }
        let len = (end - start) as usize;
        let mut bounce = AlignedBuf::new(len, self.align);
        let b = bounce.as_mut_slice();
        let a = self.align;
        let at = (offset - start) as usize;
        // Blocks only partly covered keep their other bytes: read them first.
        if at != 0 {
            let n = read_full(file, &mut b[..a], start)?;
            b[n..a].fill(0);
        }
        let tail = len - a;
        if !(at + buf.len()).is_multiple_of(a) && (tail != 0 || at == 0) {
            let n = read_full(file, &mut b[tail..len], start + tail as u64)?;
            b[tail + n..len].fill(0);
        }
        b[at..at + buf.len()].copy_from_slice(buf);
        file.write_all_at(&b[..len], start)
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
            d.write_at(&file, &vec![v; len], off).unwrap();
            model[off as usize..off as usize + len].fill(v);
        }
        // Extending the file past its end with an unaligned tail.
        d.write_at(&file, &[9u8; 100], 19950).unwrap();
        model.resize(20050, 0);
        model[19950..20050].fill(9);
        let mut back = vec![0u8; 20050];
        d.read_at(&file, &mut back[1..], 1).unwrap();
        d.read_at(&file, &mut back[..1], 0).unwrap();
        assert!(back == model);
        // Concurrent single-byte writers into one block lose nothing.
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let (d, file) = (&d, &file);
                s.spawn(move || {
                    for i in 0..32u64 {
                        d.write_at(file, &[t + 100], 64 + u64::from(t) * 32 + i)
                            .unwrap();
                    }
                });
            }
        });
        let mut blk = vec![0u8; 256];
        d.read_at(&file, &mut blk, 64).unwrap();
        for t in 0..8usize {
            assert!(blk[t * 32..t * 32 + 32].iter().all(|&b| b == t as u8 + 100));
        }
    }
}
