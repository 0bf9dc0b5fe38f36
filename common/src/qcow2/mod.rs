//! The qcow2 format (versions 2 and 3): open, read, write, zeroes, discard, block status.

mod allocator;
pub mod amend;
mod backing_file;
mod bitmap_data;
mod bitmap_ops;
pub mod bitmaps;
mod cache;
mod check;
mod check_rebuild;
pub mod compress;
mod compressed;
mod copied_flags;
mod counts;
pub mod create;
mod data_ranges;
pub mod entry;
pub mod header;
mod inflight;
mod l2;
mod make_empty;
mod mapping;
mod meta;
mod overlap;
mod prealloc_detect;
mod preallocate;
mod read;
mod rebuild;
pub mod refcount;
mod refcount_switch;
mod resize;
pub mod snapshot;
pub mod snapshot_ops;
mod table_refs;
pub mod units;
mod walker;
mod walker_bitmaps;
mod write;
mod zero;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};

use crate::backing::BackingRef;
use crate::driver::{BlockDriver, BlockStatus};
use crate::error::{Error, Result};
use crate::iovec::{IoBuf, IoBufMut};
use crate::storage::{FileStorage, Storage};
pub use bitmap_ops::Source as BitmapSource;
use header::Header;
use meta::Meta;
use snapshot::Snapshot;

/// An open qcow2 image.
pub struct Qcow2Image {
    storage: Arc<dyn Storage>,
    meta: Mutex<Meta>,
    /// Held shared by data I/O that bypasses the metadata lock, exclusively while freed
    /// clusters are released, so a cluster is never reused under an in-flight request.
    gate: RwLock<()>,
    /// The last decompressed cluster, by the offset of its compressed data.
    last_compressed: Mutex<Option<(u64, Arc<[u8]>)>>,
    /// Signalled when an allocating write has settled its mapping.
    alloc_done: Condvar,
    backing: Option<Box<dyn BlockDriver>>,
    /// Guest data lives in an external data file, which this engine does not read.
    external_data: bool,
    read_only: bool,
    /// No enabled bitmap needs marking in use before a guest write (`bitmap_ops`).
    bitmaps_settled: AtomicBool,
    /// Guest writes recorded for the enabled bitmaps, stored into them at close.
    dirty: Mutex<Option<bitmap_ops::DirtyLog>>,
    /// The image had a stale bitmaps extension when it was opened.
    stale_bitmaps: bool,
    /// Block status looks for holes under data clusters (`prealloc_detect`).
    reads_holes: OnceLock<bool>,
}

/// Read and validate the header from the start of `storage`.
pub fn read_header(storage: &dyn Storage) -> Result<Header> {
    let file_len = storage
        .len()
        .map_err(|e| Error::io("Could not get image size", e))?;
    // Like QEMU, bytes past the end of a short file read as zeroes.
    let read_padded = |len: u64| -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        let have = len.min(file_len) as usize;
        storage
            .read_at(&mut buf[..have], 0)
            .map_err(|e| Error::io("Could not read qcow2 header", e))?;
        Ok(buf)
    };
    let bits = Header::cluster_bits_of(&read_padded(header::V3_MIN_HEADER_LEN.into())?)?;
    Header::parse(&read_padded(1u64 << bits)?)
}

impl Qcow2Image {
    /// Open a qcow2 image on storage the caller opened (and, for a file, locked), without
    /// its backing file: the chain opener ([`crate::open`]) attaches that with
    /// [`Qcow2Image::set_backing`].
    pub fn open(storage: Arc<dyn Storage>, read_only: bool) -> Result<Qcow2Image> {
        Self::open_for(storage, read_only, false)
    }

    /// [`Qcow2Image::open`], or with `check` for `check` (QEMU's BDRV_O_CHECK): a dirty
    /// image is not repaired on open, and a corrupt one may be opened read-write to repair it.
    pub(crate) fn open_for(
        storage: Arc<dyn Storage>,
        read_only: bool,
        check: bool,
    ) -> Result<Qcow2Image> {
        let header = read_header(&*storage)?;
        Self::from_storage(storage, header, read_only, check)
    }

    /// Create a qcow2 image at `path` and open it read-write through the same file
    /// descriptor, so that nobody can take the image between the two. No backing file is
    /// attached.
    pub fn create_and_open(path: &Path, create: &create::Qcow2CreateOptions) -> Result<Qcow2Image> {
        create.validate()?;
        let file = create::create_file(path)?;
        let storage = Arc::new(FileStorage::new(file));
        create::format_qcow2(storage.clone(), create)?;
        Self::open(storage, false)
    }

    /// The backing file the header names (name and format as stored).
    pub fn backing_ref(&self) -> Option<BackingRef> {
        let h = &self.meta().h;
        h.backing_file.as_ref().map(|name| BackingRef {
            name: name.clone(),
            format: h.backing_format.clone(),
        })
    }

    /// Attach the opened backing file. Called by the chain opener before the image is
    /// shared; reads of clusters this image lacks go there from then on.
    pub fn set_backing(&mut self, backing: Box<dyn BlockDriver>) {
        self.backing = Some(backing);
    }

    fn from_storage(
        storage: Arc<dyn Storage>,
        header: Header,
        read_only: bool,
        check: bool,
    ) -> Result<Qcow2Image> {
        if header.is_corrupt() && !read_only && !check {
            return Err(Error::corrupt_at(
                crate::error::Structure::Header,
                0,
                "qcow2: Image is corrupt; cannot be opened read/write",
            ));
        }
        if header.has_data_file() && !read_only {
            return Err(Error::Unsupported(
                "qcow2 images with an external data file can only be opened read-only".into(),
            ));
        }
        if !read_only {
            let file_len = storage
                .len()
                .map_err(|e| Error::io("Could not get image size", e))?;
            header.check_tables_in_file(file_len)?;
        }
        let external_data = header.has_data_file();
        let dir = bitmaps::check_on_open(&*storage, &header)?;
        let settled = read_only || !dir.iter().any(|e| e.auto() && !e.in_use());
        let stale_bitmaps = bitmaps::stale_extension(&header);
        let mut meta = Meta::load(storage.clone(), header, read_only)?;
        if meta.h.is_dirty() && !read_only && !check {
            meta.rebuild_refcounts()?;
        }
        if !read_only {
            // Autoclear features this engine does not maintain become stale once it
            // writes: the spec says a writer that does not know them clears their bits.
            // It keeps bitmaps; an extension whose bit a program without bitmap support
            // cleared is dropped, as QEMU drops it. Durable before any write.
            let keep = if dir.is_empty() {
                0
            } else {
                header::AUTOCLEAR_BITMAPS
            };
            if meta.h.autoclear_features & !keep != 0 || stale_bitmaps {
                meta.h.autoclear_features &= keep;
                if stale_bitmaps {
                    bitmaps::set_extension(&mut meta.h, None);
                }
                meta.write_header()?;
                meta.sync()?;
            }
        }
        Ok(Qcow2Image {
            storage,
            meta: Mutex::new(meta),
            gate: RwLock::new(()),
            alloc_done: Condvar::new(),
            last_compressed: Mutex::new(None),
            backing: None,
            external_data,
            read_only,
            bitmaps_settled: AtomicBool::new(settled),
            dirty: Mutex::new(None),
            stale_bitmaps,
            reads_holes: OnceLock::new(),
        })
    }

    fn meta(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `op` with data I/O shut out and the metadata locked.
    pub(super) fn with_meta_exclusive<T>(
        &self,
        op: impl FnOnce(&mut Meta) -> Result<T>,
    ) -> Result<T> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.external_data {
            return Err(Error::Unsupported("Operation not supported".into()));
        }
        let _g = self.gate.write().unwrap_or_else(|p| p.into_inner());
        self.forget_decompressed();
        op(&mut self.meta())
    }

    /// The image's geometry (read from the header under the metadata lock).
    fn geo(&self) -> units::Geometry {
        self.meta().geo()
    }

    /// The geometry and the virtual size, read together.
    fn geo_and_size(&self) -> (units::Geometry, u64) {
        let m = self.meta();
        (m.geo(), m.h.size)
    }

    /// A copy of the current header (with extensions and backing file name).
    pub fn header(&self) -> Header {
        self.meta().h.clone()
    }

    /// The storage the image lives on.
    pub fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    /// The internal snapshots listed in the snapshot table.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let h = self.header();
        snapshot::read_table(&*self.storage, &h)
    }

    /// Drop the decompressed-cluster cache (freed clusters are about to become reusable).
    fn forget_decompressed(&self) {
        *self
            .last_compressed
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn check_own_data(&self) -> Result<()> {
        if self.external_data {
            return Err(Error::Unsupported(
                "I/O on qcow2 images with an external data file is not supported".into(),
            ));
        }
        Ok(())
    }

    /// The persistent dirty bitmaps the image declares (for `info`).
    pub fn bitmaps(&self) -> Result<Vec<bitmaps::BitmapInfo>> {
        bitmaps::read_bitmaps(&*self.storage, &self.header())
    }

    /// The image had a bitmaps extension that a program without bitmap support left
    /// stale (its bitmaps are ignored, their clusters may leak; a read-write open drops it).
    pub fn had_stale_bitmaps(&self) -> bool {
        self.stale_bitmaps
    }

    /// Check the image's consistency, repairing what `fix` allows.
    pub fn check(&self, fix: crate::check::Fix) -> crate::check::CheckReport {
        let _g = self.gate.write().unwrap_or_else(|p| p.into_inner());
        self.forget_decompressed();
        self.meta().check(fix)
    }

    /// Copy `len` bytes at `from_offset` of `from` to guest `offset`, the kernel moving
    /// the bytes into the clusters they land in (convert's copy offloading). `Ok(false)`
    /// where it cannot (the image file is not a plain file, or its data lives apart), for
    /// the caller to write instead.
    pub fn copy_in(
        &self,
        from: &std::fs::File,
        from_offset: u64,
        offset: u64,
        len: u64,
    ) -> Result<bool> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        crate::driver::check_range(offset, len, self.size())?;
        if self.external_data || self.storage.file().is_none() {
            return Ok(false);
        }
        self.before_guest_write(offset, len)?;
        self.copy_in_impl(from, from_offset, offset, len)?;
        Ok(true)
    }

    /// Flush and mark the image clean (clears the dirty bit of lazy-refcount images).
    /// Writes recorded for persistent bitmaps are stored into them first.
    pub fn close(&self) -> Result<()> {
        let log = self.take_dirty_log();
        let _g = self.gate.write().unwrap_or_else(|p| p.into_inner());
        self.forget_decompressed();
        let mut m = self.meta();
        let stored = m.store_dirty_log(log);
        let closed = m.close();
        stored.and(closed)
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        if !self.read_only {
            let _ = self.close();
        }
    }
}

impl BlockDriver for Qcow2Image {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn size(&self) -> u64 {
        self.meta().h.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored_at(&self, bufs: &[IoBufMut<'_>], offset: u64) -> Result<()> {
        crate::driver::check_range(offset, crate::iovec::total_len(bufs) as u64, self.size())?;
        self.check_own_data()?;
        self.read_impl(bufs, offset)
    }

    fn write_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        crate::driver::check_range(offset, crate::iovec::total_len(bufs) as u64, self.size())?;
        self.before_guest_write(offset, crate::iovec::total_len(bufs) as u64)?;
        self.write_impl(bufs, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        crate::driver::check_range(offset, len, self.size())?;
        self.before_guest_write(offset, len)?;
        self.zeroes_impl(offset, len, may_unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        crate::driver::check_range(offset, len, self.size())?;
        self.before_guest_write(offset, len)?;
        self.discard_impl(offset, len)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _g = self.gate.write().unwrap_or_else(|p| p.into_inner());
        self.forget_decompressed();
        self.meta().flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        crate::driver::check_range(offset, len.max(1), self.size())?;
        self.check_own_data()?;
        self.status_impl(offset, len)
    }

    fn clusters(&self) -> Option<crate::driver::Clusters> {
        let g = self.geo();
        Some(crate::driver::Clusters {
            cluster: g.cluster_size(),
            subcluster: 1 << g.unit_bits(),
        })
    }

    fn allocated_file_size(&self) -> Result<u64> {
        self.storage
            .allocated_size()
            .map_err(|e| Error::io("Could not get allocated size", e))
    }

    fn data_file(&self) -> Option<&std::fs::File> {
        if self.external_data {
            return None;
        }
        self.storage.file()
    }

    fn backing(&self) -> Option<&dyn BlockDriver> {
        self.backing.as_deref()
    }

    fn backing_ref(&self) -> Option<BackingRef> {
        Qcow2Image::backing_ref(self)
    }
}

#[cfg(test)]
mod check_tests;
#[cfg(test)]
mod concurrency_tests;
#[cfg(test)]
mod error_tests;
#[cfg(test)]
mod ordering_tests;
#[cfg(test)]
mod snapshot_crash_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod walker_tests;
