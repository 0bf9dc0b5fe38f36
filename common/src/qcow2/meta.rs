//! The metadata of an open qcow2 image, and its write-back in the dependency order of
//! DESIGN.md. The concerns live in their own modules, each an `impl Meta` over its part of
//! the state: `allocator` (refcounts), `l2` (L2 tables by host offset), `mapping` (the
//! active L1 and copy-on-write), `walker` (every reference), `rebuild`.
//!
//! Everything here runs under the image's metadata lock. Ordering contract: refcount
//! increments reach the file before anything points at the new cluster, guest data and L2
//! tables before the entries that point at them, and refcount decrements only after the
//! tables that stopped pointing at the cluster. Freed clusters are not reused before that.

use std::sync::Arc;

use super::allocator::{refblock_cache_size, Refcounts};
use super::cache::TableCache;
use super::header::{Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use super::inflight::Inflight;
use super::mapping::ActiveL1;
use super::overlap::OverlapSet;
use super::units::{Geometry, HostCluster};
use crate::error::{io, Error, Result, Structure};
use crate::storage::Storage;

/// Default guest bytes covered by cached L2 tables (QEMU: 32 GiB with 64 KiB clusters).
const L2_CACHE_COVERAGE: u64 = 32 << 30;
/// Upper bound on L2 cache memory.
const CACHE_MAX_BYTES: u64 = 32 << 20;

pub(crate) struct Meta {
    pub h: Header,
    storage: Arc<dyn Storage>,
    pub(super) l1: ActiveL1,
    pub(super) l2: TableCache,
    pub(super) refs: Refcounts,
    pub(super) overlap: OverlapSet,
    pub(super) inflight: Inflight,
    pub read_only: bool,
}

pub(super) fn read_u64_table(
    storage: &dyn Storage,
    offset: u64,
    count: usize,
    what: &str,
) -> Result<Vec<u64>> {
    let mut buf = vec![0u8; count * 8];
    io(what, storage.read_at(&mut buf, offset))?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// The bytes of a table of big-endian 64-bit entries.
pub(super) fn encode_u64_table(t: &[u64]) -> Vec<u8> {
    t.iter().flat_map(|v| v.to_be_bytes()).collect()
}

impl Meta {
    /// Load the L1 and refcount tables of an image whose header was validated.
    pub fn load(storage: Arc<dyn Storage>, h: Header, read_only: bool) -> Result<Meta> {
        let g = h.geometry();
        let l1 = read_u64_table(
            &*storage,
            h.l1_table_offset,
            h.l1_size as usize,
            "Could not read L1 table",
        )?;
        let rt_entries = (u64::from(h.refcount_table_clusters) * g.cluster_size() / 8) as usize;
        let reftable = read_u64_table(
            &*storage,
            h.refcount_table_offset,
            rt_entries,
            "Could not read refcount table",
        )?;
        let cs = g.cluster_size();
        let l2_tables = (L2_CACHE_COVERAGE / g.l1_coverage())
            .max(h.size.div_ceil(g.l1_coverage()).min(CACHE_MAX_BYTES / cs))
            .clamp(16, (CACHE_MAX_BYTES / cs).max(16));
        let end = io("Could not get image file length", storage.len())?.div_ceil(cs);
        Ok(Meta {
            overlap: OverlapSet::new(&l1, &reftable, g),
            l1: ActiveL1::new(l1),
            l2: TableCache::new(l2_tables as usize),
            refs: Refcounts::new(reftable, refblock_cache_size(cs), HostCluster(end)),
            inflight: Inflight::default(),
            h,
            storage,
            read_only,
        })
    }

    /// The image's geometry, from the header.
    pub fn geo(&self) -> Geometry {
        self.h.geometry()
    }

    /// The storage the metadata lives on.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// With lazy refcounts, set the dirty bit (durably) before the first metadata change.
    pub(super) fn mark_dirty_if_lazy(&mut self) -> Result<()> {
        if self.h.lazy_refcounts() && !self.h.is_dirty() {
            self.h.incompatible_features |= INCOMPAT_DIRTY;
            self.write_header()?;
            self.sync()?;
        }
        Ok(())
    }

    /// Rewrite the header (all fields and extensions kept) into cluster 0.
    pub fn write_header(&mut self) -> Result<()> {
        let mut bytes = self.h.encode()?;
        bytes.resize(self.geo().cluster_size() as usize, 0);
        io(
            "Could not write qcow2 header",
            self.storage.write_at(&bytes, 0),
        )
    }

    /// Make everything written so far durable.
    pub fn sync(&self) -> Result<()> {
        io("Could not flush image file", self.storage.flush())
    }

    /// Metadata points where it must not: like QEMU, mark the image corrupt (when it is
    /// writable) and stop writing to it. `what` was about to touch host cluster `c`, which
    /// holds `kind` (`described` as QEMU names it).
    pub(super) fn overlap_error(
        &mut self,
        what: &str,
        c: HostCluster,
        kind: Structure,
        described: impl std::fmt::Display,
    ) -> Error {
        if !self.read_only {
            self.h.incompatible_features |= INCOMPAT_CORRUPT;
            let _ = self.write_header().and_then(|_| self.sync());
            self.read_only = true;
        }
        let offset = self.geo().host_offset(c).0;
        Error::corrupt_at(
            kind,
            offset,
            format!(
                "{what} at offset {offset:#x}: preventing invalid write on metadata (overlaps \
                 with {described}); image marked as corrupt"
            ),
        )
    }

    /// Write everything back in dependency order and make it durable.
    pub fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        // 1. Refcount increments (and data written so far) first.
        self.write_refcounts()?;
        self.sync()?;
        // 2. L2 tables, then the L1 entries pointing at them.
        if self.write_dirty_l2()? {
            self.sync()?;
        }
        if self.write_l1()? {
            self.sync()?;
        }
        // 3. Now nothing on disk points at freed clusters: apply the deferred decrements.
        if self.refs.has_deferred() {
            self.apply_deferred()?;
            self.write_refcounts()?;
            self.sync()?;
        }
        Ok(())
    }

    /// Flush and clear the dirty bit: the image is consistent on disk.
    pub fn close(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.flush()?;
        if self.h.is_dirty() {
            self.h.incompatible_features &= !INCOMPAT_DIRTY;
            self.write_header()?;
            self.sync()?;
        }
        Ok(())
    }
}
