//! The raw format: guest offset = file offset, sparse-aware.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::driver::{check_range, Allocation, BlockDriver, BlockStatus};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::iovec::{IoBuf, IoBufMut};
use crate::storage::{FileStorage, Storage, StorageRun};

/// Chunk size used when zeroes have to be written out explicitly.
const ZERO_CHUNK: u64 = 1 << 20;

/// How much of the start of a probed raw image is guarded against format headers.
const PROBE_LEN: u64 = crate::probe::PROBE_LEN as u64;

/// A raw image: the guest sees the bytes of the file as they are.
pub struct RawImage {
    storage: Box<dyn Storage>,
    /// The virtual size (changed only by [`RawImage::resize`]).
    size: AtomicU64,
    read_only: bool,
    /// The format was probed, not given: writes must not make it probe as another format.
    probed: bool,
    /// Serialises writes touching the first [`PROBE_LEN`] bytes of a probed image, so the
    /// read-check-write of the probe guard cannot be raced by another such write.
    sector0: std::sync::Mutex<()>,
}

impl std::fmt::Debug for RawImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawImage")
            .field("size", &self.size())
            .field("read_only", &self.read_only)
            .field("probed", &self.probed)
            .finish_non_exhaustive()
    }
}

impl RawImage {
    /// Wrap an already open storage (the chain opener opened and locked the file). The size
    /// is the storage length at open.
    pub fn from_storage(storage: Box<dyn Storage>, read_only: bool) -> Result<RawImage> {
        // Like QEMU, the size is counted in whole 512-byte sectors; the tail past the end
        // of the file reads as zeroes.
        let size = storage
            .len()
            .map_err(|e| Error::io("Could not get the image size", e))?
            .next_multiple_of(512);
        Ok(RawImage {
            storage,
            size: AtomicU64::new(size),
            read_only,
            probed: false,
            sector0: std::sync::Mutex::new(()),
        })
    }

    /// Mark the image as opened with its format probed (no format given). Like QEMU, a
    /// write that would make the first sector probe as another format (a qcow2 header,
    /// say, naming a host file as its backing file) is then refused.
    pub(crate) fn set_probed(&mut self) {
        self.probed = true;
    }

    /// Whether the image was opened with its format probed.
    pub fn is_probed(&self) -> bool {
        self.probed
    }

    /// Run `write` (which stores `buf` at `offset`), refusing it if the image is probed
    /// and the first sector would afterwards probe as another format.
    ///
    /// Only data writes need this: zeroing bytes can never create the qcow2 magic or
    /// raise the version field, so write_zeroes and discard are not checked (nor are they
    /// in QEMU).
    fn guarded<F>(&self, bufs: &[IoBuf<'_>], offset: u64, write: F) -> Result<()>
    where
        F: FnOnce() -> Result<()>,
    {
        let len = crate::iovec::total_len(bufs) as u64;
        if !self.probed || len == 0 || offset >= PROBE_LEN {
            return write();
        }
        let _guard = self.sector0.lock().unwrap_or_else(|e| e.into_inner());
        let mut first = vec![0u8; PROBE_LEN.min(self.size()) as usize];
        self.storage
            .read_at(&mut first, 0)
            .map_err(|e| Error::io("Failed to read", e))?;
        let start = offset as usize;
        let end = (offset + len).min(first.len() as u64) as usize;
        crate::iovec::gather(
            &crate::iovec::Front::new(bufs).take(end - start),
            &mut first[start..end],
        );
        if crate::probe::probe_bytes(&first) != Format::Raw {
            return Err(Error::invalid(
                "Refusing to write a format header to a probed raw image \
                 (Operation not permitted)",
            ));
        }
        write()
    }

    /// The storage under the image.
    pub fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    /// Copy `len` bytes at `from_offset` of `from` to guest `offset` inside the kernel
    /// (convert's copy offloading). `Ok(false)` where that cannot be done, for the caller
    /// to write instead: the files do not allow it, or the copy would touch the first
    /// sectors of a probed image, which only the guarded write path may change.
    pub fn copy_in(
        &self,
        from: &std::fs::File,
        from_offset: u64,
        offset: u64,
        len: u64,
    ) -> Result<bool> {
        self.check_write(offset, len)?;
        if self.probed && offset < PROBE_LEN {
            return Ok(false);
        }
        let Some(to) = self.storage.file() else {
            return Ok(false);
        };
        crate::storage::copy_between(from, from_offset, to, offset, len)
            .map_err(|e| Error::io("Failed to write", e))
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size())
    }

    /// Change the size to `size` (`qemu-img resize` of a raw file, as QEMU's file driver
    /// truncates): the file is cut or extended, with falloc the added space reserved, with
    /// full written as zeroes.
    pub fn resize(&self, size: u64, mode: Preallocation) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let io = |what: &str, e| Error::io(what.to_string(), e);
        let old = self
            .storage
            .len()
            .map_err(|e| io("Could not get the file length", e))?;
        match mode {
            Preallocation::Off => {}
            Preallocation::Metadata => {
                return Err(Error::Unsupported(
                    "Unsupported preallocation mode: metadata".into(),
                ))
            }
            Preallocation::Falloc if size > old => self
                .storage
                .allocate(old, size - old)
                .map_err(|e| io("Could not preallocate new data", e))?,
            Preallocation::Full if size > old => {
                self.storage
                    .set_len(size)
                    .map_err(|e| io("Could not resize file", e))?;
                self.write_zero_chunks(old, size - old)?;
            }
            Preallocation::Falloc | Preallocation::Full => {}
        }
        self.storage
            .set_len(size)
            .map_err(|e| io("Could not resize file", e))?;
        self.size
            .store(size.next_multiple_of(512), Ordering::Release);
        Ok(())
    }

    fn write_zero_chunks(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(ZERO_CHUNK) as usize;
            self.storage
                .write_at(&zeros[..n], pos)
                .map_err(|e| Error::io("Failed to write zeroes", e))?;
            pos += n as u64;
        }
        Ok(())
    }
}

impl BlockDriver for RawImage {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored_at(&self, bufs: &[IoBufMut<'_>], offset: u64) -> Result<()> {
        check_range(offset, crate::iovec::total_len(bufs) as u64, self.size())?;
        self.storage
            .read_vectored_at(bufs, offset)
            .map_err(|e| Error::io("Failed to read", e))
    }

    fn write_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        self.check_write(offset, crate::iovec::total_len(bufs) as u64)?;
        self.guarded(bufs, offset, || {
            self.storage
                .write_vectored_at(bufs, offset)
                .map_err(|e| Error::io("Failed to write", e))
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if may_unmap {
            self.storage
                .punch_hole(offset, len)
                .map_err(|e| Error::io("Failed to write zeroes", e))
        } else {
            self.write_zero_chunks(offset, len)
        }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.storage
            .punch_hole(offset, len)
            .map_err(|e| Error::io("Failed to discard", e))
    }

    fn flush(&self) -> Result<()> {
        self.storage
            .flush()
            .map_err(|e| Error::io("Failed to flush", e))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range(offset, len, self.size())?;
        if len == 0 {
            return Err(Error::invalid("block_status of an empty range"));
        }
        file_status(self.storage.as_ref(), offset, len)
    }

    fn data_file(&self) -> Option<&std::fs::File> {
        self.storage.file()
    }

    fn allocated_file_size(&self) -> Result<u64> {
        self.storage
            .allocated_size()
            .map_err(|e| Error::io("Failed to get the allocated file size", e))
    }
}

/// Status of `len` bytes of a file at `offset` (data or hole, from SEEK_DATA), with the
/// file offset as host offset: what QEMU's file protocol answers, for raw and for formats
/// that store guest data at its own offset (fixed VHD) or let the file refine it.
pub(crate) fn file_status(storage: &dyn Storage, offset: u64, len: u64) -> Result<BlockStatus> {
    let end = offset + len;
    let (run, run_end) = storage
        .run_at(offset, end)
        .map_err(|e| Error::io("Failed to query allocation", e))?;
    let allocation = match run {
        StorageRun::Data => Allocation::Data,
        StorageRun::AllocatedZero => Allocation::DataOverHole,
        StorageRun::Hole => Allocation::Zero,
        StorageRun::UnsureHole => Allocation::Undetermined,
    };
    Ok(BlockStatus {
        len: run_end.clamp(offset + 1, end) - offset,
        allocation,
        depth: 0,
        // Holes too: like QEMU, the offset in the file is the guest offset.
        host_offset: Some(offset),
        compressed: false,
    })
}

pub use crate::prealloc::Preallocation;

/// Create (or overwrite) a raw image of `size` bytes, like `qemu-img create -f raw`.
///
/// Like QEMU, the file is opened without `O_TRUNC`, locked the way `qemu-img create`
/// locks it (so an image in use is not clobbered), truncated to zero and then grown
/// according to `prealloc`. `Metadata` is refused after the truncation, as QEMU does
/// ("Unsupported preallocation mode: metadata").
pub fn create_raw(path: &Path, size: u64, prealloc: Preallocation) -> Result<()> {
    let storage = FileStorage::new(crate::storage::open_new_image_file(path)?);
    let io = |what: &str, e| Error::io(what.to_string(), e);
    if storage
        .file()
        .metadata()
        .is_ok_and(|m| crate::storage::is_device(&m.file_type()))
    {
        return create_on_device(&storage, size, prealloc);
    }
    storage
        .set_len(0)
        .map_err(|e| io("Could not resize file", e))?;
    match prealloc {
        Preallocation::Off => storage
            .set_len(size)
            .map_err(|e| io("Could not resize file", e))?,
        Preallocation::Metadata => {
            return Err(Error::Unsupported(
                "Unsupported preallocation mode: metadata".into(),
            ))
        }
        Preallocation::Falloc => {
            storage
                .allocate(0, size)
                .map_err(|e| io("Could not preallocate data for the new file", e))?;
            storage
                .set_len(size)
                .map_err(|e| io("Could not resize file", e))?;
        }
        Preallocation::Full => {
            storage
                .set_len(size)
                .map_err(|e| io("Could not resize file", e))?;
            let zeros = vec![0u8; size.min(ZERO_CHUNK) as usize];
            let mut pos = 0;
            while pos < size {
                let n = (size - pos).min(ZERO_CHUNK) as usize;
                storage
                    .write_at(&zeros[..n], pos)
                    .map_err(|e| io("Could not write zeros for preallocation", e))?;
                pos += n as u64;
            }
        }
    }
    // Like QEMU, write the first block so that tools probing the file's allocation (which
    // treat an all-hole file specially) see it as in use.
    let first = size.min(4096) as usize;
    if first > 0 && prealloc != Preallocation::Full {
        storage
            .write_at(&vec![0u8; first], 0)
            .map_err(|e| io("Could not write the first block", e))?;
    }
    storage
        .flush()
        .map_err(|e| io("Could not flush the new file", e))?;
    Ok(())
}

/// QEMU's creation on a 'host_device' (`bdrv_co_create_opts_simple`): no preallocation,
/// the device is not grown, and its first sector is zeroed.
fn create_on_device(storage: &FileStorage, size: u64, prealloc: Preallocation) -> Result<()> {
    if prealloc != Preallocation::Off {
        return Err(Error::Unsupported(format!(
            "Unsupported preallocation mode '{}'",
            prealloc.name()
        )));
    }
    let len = storage
        .len()
        .map_err(|e| Error::io("Could not get the device size".to_string(), e))?;
    if size > len {
        return Err(Error::invalid("Cannot grow device files"));
    }
    storage
        .write_at(&vec![0u8; len.min(512) as usize], 0)
        .map_err(|e| {
            Error::io(
                "Failed to clear the new image's first sector".to_string(),
                e,
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Open and lock a file the way the chain opener does for a raw layer.
    fn open(path: &Path, read_only: bool, force_share: bool) -> Result<RawImage> {
        let storage = crate::storage::open_image_storage(path, read_only, false)?;
        crate::lock::lock_image(storage.file(), path, read_only, force_share)?;
        RawImage::from_storage(Box::new(storage), read_only)
    }

    fn status_runs(img: &RawImage) -> Vec<(u64, u64, Allocation)> {
        let mut v = Vec::new();
        let mut off = 0;
        while off < img.size() {
            let s = img.block_status(off, img.size() - off).unwrap();
            assert!(s.len > 0);
            if let Some(h) = s.host_offset {
                assert_eq!(h, off);
            }
            v.push((off, s.len, s.allocation));
            off += s.len;
        }
        v
    }

    #[test]
    fn create_open_read_write() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.raw");
        crate::lock::retry_while_locked(|| create_raw(&p, 4 << 20, Preallocation::Off)).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 4 << 20);
        let img = crate::lock::retry_while_locked(|| open(&p, false, false)).unwrap();
        assert_eq!(img.size(), 4 << 20);
        assert_eq!(img.format_name(), "raw");
        assert_eq!(
            status_runs(&img),
            vec![
                (0, 4096, Allocation::Data),
                (4096, (4 << 20) - 4096, Allocation::Zero)
            ],
            "fresh image: the first block written like QEMU does, the rest one hole"
        );
        img.write_at(b"hello", 1 << 20).unwrap();
        let mut buf = [0u8; 7];
        img.read_at(&mut buf, (1 << 20) - 1).unwrap();
        assert_eq!(&buf, b"\0hello\0");
        img.flush().unwrap();
        let runs = status_runs(&img);
        assert!(runs
            .iter()
            .any(|&(o, l, a)| a == Allocation::Data && o <= 1 << 20 && o + l > 1 << 20));
        assert_eq!(runs.iter().map(|r| r.1).sum::<u64>(), 4 << 20);
        assert!(img.allocated_file_size().unwrap() >= 4096);

        // Out of range and read-only checks.
        assert!(matches!(
            img.write_at(b"x", 4 << 20),
            Err(Error::InvalidArgument(_))
        ));
        assert!(img.read_at(&mut buf, (4 << 20) - 3).is_err());
        assert!(img.write_zeroes(u64::MAX, 2, false).is_err());
        drop(img);
        let ro = crate::lock::retry_while_locked(|| open(&p, true, false)).unwrap();
        assert!(ro.is_read_only());
        assert!(matches!(ro.write_at(b"x", 0), Err(Error::ReadOnly)));
        assert!(matches!(ro.discard(0, 4096), Err(Error::ReadOnly)));
        assert!(matches!(ro.write_zeroes(0, 1, true), Err(Error::ReadOnly)));
        // A second read-only open shares, a read-write one does not.
        let ro2 = open(&p, true, false).unwrap();
        let e = open(&p, false, false).unwrap_err();
        assert!(matches!(e, Error::Locked(_)), "{e}");
        drop((ro, ro2));
        crate::lock::retry_while_locked(|| open(&p, false, false)).unwrap();
    }

    #[test]
    fn zeroes_and_discard() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("z.raw");
        std::fs::write(&p, vec![0xabu8; 1 << 20]).unwrap();
        let img = crate::lock::retry_while_locked(|| open(&p, false, false)).unwrap();
        img.write_zeroes(4096, 8192, false).unwrap();
        img.write_zeroes(65536, 65536, true).unwrap();
        img.discard(262144, 65536).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        img.read_at(&mut buf, 0).unwrap();
        for (i, &b) in buf.iter().enumerate() {
            let zero = (4096..12288).contains(&i)
                || (65536..131072).contains(&i)
                || (262144..327680).contains(&i);
            assert_eq!(b, if zero { 0 } else { 0xab }, "byte {i}");
        }
        // Punched ranges show up as holes (on filesystems that support it).
        let s = img.block_status(65536, 65536).unwrap();
        if s.allocation == Allocation::Zero {
            assert_eq!(s.len, 65536);
            // Like QEMU's file driver: a hole's offset in the file is known too.
            assert_eq!(s.host_offset, Some(65536));
        }
        // Written zeroes stay allocated data.
        let s = img.block_status(4096, 8192).unwrap();
        assert_eq!(s.allocation, Allocation::Data);
        assert_eq!(s.host_offset, Some(4096));
    }

    #[test]
    fn block_status_runs_are_clipped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.raw");
        crate::lock::retry_while_locked(|| create_raw(&p, 1 << 20, Preallocation::Off)).unwrap();
        let img = crate::lock::retry_while_locked(|| open(&p, false, false)).unwrap();
        img.write_at(&[1u8; 65536], 512 << 10).unwrap();
        let s = img.block_status(0, 8192).unwrap();
        assert_eq!((s.len, s.allocation), (4096, Allocation::Data));
        let s = img.block_status(4096, 4096).unwrap();
        assert_eq!((s.len, s.allocation), (4096, Allocation::Zero));
        let s = img.block_status(4096, 1 << 19).unwrap();
        assert_eq!(s.allocation, Allocation::Zero);
        assert!(s.len <= (512 << 10) - 4096);
        let s = img.block_status(512 << 10, 100).unwrap();
        assert_eq!((s.len, s.allocation), (100, Allocation::Data));
        assert!(img.block_status(0, 0).is_err());
        assert!(img.block_status(1 << 20, 1).is_err());
    }

    #[test]
    fn preallocation_modes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.raw");
        // Existing content is thrown away.
        std::fs::write(&p, vec![0xffu8; 3 << 20]).unwrap();
        crate::lock::retry_while_locked(|| create_raw(&p, 2 << 20, Preallocation::Off)).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 2 << 20);
        assert!(m.blocks() * 512 < 1 << 20, "off is sparse");
        assert!(std::fs::read(&p).unwrap().iter().all(|&b| b == 0));

        crate::lock::retry_while_locked(|| create_raw(&p, 2 << 20, Preallocation::Falloc)).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 2 << 20);
        assert!(m.blocks() * 512 >= 2 << 20, "falloc allocates");

        crate::lock::retry_while_locked(|| create_raw(&p, (2 << 20) + 512, Preallocation::Full))
            .unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), (2 << 20) + 512);
        assert!(m.blocks() * 512 >= 2 << 20, "full allocates");
        assert!(std::fs::read(&p).unwrap().iter().all(|&b| b == 0));

        let e =
            crate::lock::retry_while_locked(|| create_raw(&p, 1 << 20, Preallocation::Metadata))
                .unwrap_err();
        assert_eq!(e.to_string(), "Unsupported preallocation mode: metadata");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0, "like QEMU");

        assert_eq!(
            Preallocation::from_name("bogus").unwrap_err().to_string(),
            "invalid parameter value: bogus"
        );
        for m in ["off", "metadata", "falloc", "full"] {
            assert_eq!(Preallocation::from_name(m).unwrap().name(), m);
        }
    }

    #[test]
    fn create_refuses_locked_image() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.raw");
        crate::lock::retry_while_locked(|| create_raw(&p, 1 << 20, Preallocation::Off)).unwrap();
        let img = crate::lock::retry_while_locked(|| open(&p, false, false)).unwrap();
        img.write_at(b"keep", 0).unwrap();
        let e = create_raw(&p, 1 << 20, Preallocation::Off).unwrap_err();
        assert!(matches!(e, Error::Locked(_)), "{e}");
        let mut buf = [0u8; 4];
        img.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"keep", "a locked image is not truncated");
    }

    #[test]
    fn from_storage_has_no_lock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.raw");
        crate::lock::retry_while_locked(|| create_raw(&p, 65536, Preallocation::Off)).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let a = RawImage::from_storage(Box::new(FileStorage::new(f)), false).unwrap();
        let b = crate::lock::retry_while_locked(|| open(&p, false, false)).unwrap();
        a.write_at(b"ab", 0).unwrap();
        let mut buf = [0u8; 2];
        b.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"ab");
    }

    #[test]
    fn over_fault_storage() {
        use crate::fault_storage::{FaultStorage, Op};
        let f = FaultStorage::with_content(vec![7u8; 64 << 10]);
        let img = RawImage::from_storage(f.boxed(), false).unwrap();
        assert_eq!(img.size(), 64 << 10);
        f.fail_write(1);
        let e = img.write_at(b"x", 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        f.fail_flush(1);
        assert_eq!(img.flush().unwrap_err().raw_os_error(), Some(libc::EIO));
        img.write_at(b"ab", 100).unwrap();
        img.flush().unwrap();
        img.write_zeroes(8192, 8192, true).unwrap();
        img.write_zeroes(0, 3 << 20 >> 8, false).unwrap(); // 12 KiB in one chunk
        img.discard(32768, 4096).unwrap();
        assert_eq!(
            f.log(),
            vec![
                Op::Write {
                    offset: 100,
                    len: 2
                },
                Op::Flush,
                Op::PunchHole {
                    offset: 8192,
                    len: 8192
                },
                Op::Write {
                    offset: 0,
                    len: 12288
                },
                Op::PunchHole {
                    offset: 32768,
                    len: 4096
                },
            ]
        );
        // Block status follows the memory storage's holes.
        let s = img.block_status(12288, 50000).unwrap();
        assert_eq!((s.len, s.allocation), (4096, Allocation::Zero));
        let s = img.block_status(16384, 49152).unwrap();
        assert_eq!((s.len, s.allocation), (16384, Allocation::Data));
        assert_eq!(img.allocated_file_size().unwrap(), 64 * 1024 - 4096 * 2);
        // Nothing can grow the image.
        assert!(img.write_at(b"x", 64 << 10).is_err());
        assert_eq!(f.content().unwrap().len(), 64 << 10);
        // Read-only over storage.
        let ro = RawImage::from_storage(f.boxed(), true).unwrap();
        assert!(matches!(ro.write_at(b"x", 0), Err(Error::ReadOnly)));
        assert!(matches!(ro.flush(), Ok(())));
    }

    /// The first bytes of a qcow2 header (magic, version 3).
    fn qcow2_start() -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h
    }

    #[test]
    fn probed_image_refuses_format_header_in_sector0() {
        use crate::fault_storage::FaultStorage;
        let f = FaultStorage::with_content(vec![0u8; 64 << 10]);
        let mut img = RawImage::from_storage(f.boxed(), false).unwrap();
        assert!(!img.is_probed());
        img.set_probed();
        assert!(img.is_probed());
        let refused = |r: Result<()>| {
            let e = r.unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
            assert!(e.to_string().contains("Operation not permitted"), "{e}");
        };
        // A whole header at once.
        refused(img.write_at(&qcow2_start(), 0));
        // Piecewise: the magic with version 0 does not probe as qcow2, so it is allowed;
        // the version that completes the header is not.
        img.write_at(b"QFI\xfb", 0).unwrap();
        refused(img.write_at(&3u32.to_be_bytes(), 4));
        refused(img.write_at(&[0, 0, 0, 2, 0xaa], 4));
        // A large write starting at 0 and running past sector 0.
        let mut big = vec![0x55u8; 8192];
        big[..8].copy_from_slice(&qcow2_start()[..8]);
        refused(img.write_at(&big, 0));
        // The same header assembled from scattered pieces of a vectored write.
        let h = qcow2_start();
        let pieces = [&h[..2], &[][..], &h[2..6], &h[6..]];
        let bufs: Vec<crate::IoBuf<'_>> = pieces.iter().map(|&p| p.into()).collect();
        refused(img.write_vectored_at(&bufs, 0));
        // Nothing refused reached the storage.
        let c = f.content().unwrap();
        assert_eq!(&c[..8], b"QFI\xfb\0\0\0\0");
        assert!(c[8..].iter().all(|&b| b == 0));
        // Other writes to sector 0, and anything past it, are fine.
        img.write_at(&[0u8; 4], 0).unwrap();
        img.write_at(&[1u8; 600], 4).unwrap();
        img.write_at(&qcow2_start(), 512).unwrap();
        img.write_zeroes(0, 4096, true).unwrap();
        img.discard(0, 4096).unwrap();

        // Without the probed flag (format given), the write goes through like QEMU's.
        let f = FaultStorage::with_content(vec![0u8; 4096]);
        let img = RawImage::from_storage(f.boxed(), false).unwrap();
        img.write_at(&qcow2_start(), 0).unwrap();
        assert_eq!(
            crate::probe::probe_bytes(&f.content().unwrap()),
            Format::Qcow2
        );
    }

    #[test]
    fn probed_image_smaller_than_a_sector() {
        use crate::fault_storage::FaultStorage;
        // The image size is rounded up to 512; the check must cope with the short file.
        let f = FaultStorage::with_content(vec![0u8; 100]);
        let mut img = RawImage::from_storage(f.boxed(), false).unwrap();
        img.set_probed();
        assert_eq!(img.size(), 512);
        assert!(img.write_at(&qcow2_start()[..8], 0).is_err());
        img.write_at(b"hello", 0).unwrap();
    }

    #[test]
    fn open_refuses_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.raw");
        assert!(std::process::Command::new("mkfifo")
            .arg(&p)
            .status()
            .unwrap()
            .success());
        for ro in [true, false] {
            let e = open(&p, ro, false).unwrap_err();
            assert!(e.to_string().contains("to be a regular file"), "{e}");
        }
    }

    #[test]
    fn concurrent_writers_threads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.raw");
        crate::lock::retry_while_locked(|| create_raw(&p, 8 << 20, Preallocation::Off)).unwrap();
        let img = std::sync::Arc::new(
            crate::lock::retry_while_locked(|| open(&p, false, false)).unwrap(),
        );
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let img = img.clone();
                s.spawn(move || {
                    for i in 0..64u64 {
                        let off = (t as u64 * 64 + i) * 16384;
                        img.write_at(&[t + 1; 16384], off).unwrap();
                    }
                });
            }
        });
        let mut buf = vec![0u8; 8 << 20];
        img.read_at(&mut buf, 0).unwrap();
        for (i, c) in buf.chunks(16384).enumerate() {
            assert!(c.iter().all(|&b| b == (i / 64) as u8 + 1));
        }
    }
}
