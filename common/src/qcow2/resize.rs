//! Changing the virtual size of a qcow2 image, as QEMU's `qcow2_co_truncate` does.
//!
//! Growing: the L1 table grows to exactly what the new size needs, the added area is
//! preallocated if asked, and where a longer backing file would show through it is
//! zeroed; only then does the header take the new size (the commit point: a crash
//! before it leaves the old size, with at most clusters mapped past the end).
//!
//! Shrinking: the header takes the new size first (the commit point), then the
//! clusters past the end lose their entries, the L1 entries past the end are cleared
//! (the table keeps its length, as in QEMU), what nothing references any more is freed,
//! and the file is cut after its last used cluster. A crash part-way leaks, never loses a
//! reference the new size still needs.

use super::entry::L2Entry;
use super::header::MAX_L1_BYTES;
use super::meta::Meta;
use super::units::{GuestCluster, GuestOffset, HostCluster};
use super::walker::L1Source;
use super::Qcow2Image;
use crate::error::{io, Error, Result};
use crate::prealloc::Preallocation;

impl Meta {
    /// Grow the L1 table for `size` and preallocate the clusters past `old` per `mode`.
    /// The header keeps the old size.
    fn prepare_grow(
        &mut self,
        old: u64,
        size: u64,
        mode: Preallocation,
        backed: bool,
    ) -> Result<()> {
        let g = self.geo();
        let entries = g.l1_entries_for(size);
        if entries.saturating_mul(8) > MAX_L1_BYTES {
            return Err(Error::invalid(
                "Failed to grow the L1 table: File too large",
            ));
        }
        self.grow_l1(entries)?;
        // The old table is free once the header points at the new one: let the
        // preallocation reuse it, as QEMU does.
        self.flush()?;
        if mode == Preallocation::Off {
            return Ok(());
        }
        // The cluster holding an unaligned old end is preallocated too, unless it has
        // storage or a backing file shows through its head (the zeroing after copies
        // that head into the cluster instead).
        let mut first = old / g.cluster_size();
        if !old.is_multiple_of(g.cluster_size()) {
            let e = self.l2_entry(GuestCluster(first))?;
            if backed || e.is_compressed() || e.host_cluster().is_some() {
                first += 1;
            }
        }
        self.preallocate(first..g.clusters_for(size).0, mode)
    }

    /// Make `size` the virtual size on disk, after everything it describes.
    fn commit_size(&mut self, size: u64) -> Result<()> {
        self.flush()?;
        self.h.size = size;
        self.write_header()?;
        self.sync()
    }

    /// Shrink the virtual size to `size` and free what lies past it.
    fn shrink(&mut self, size: u64) -> Result<()> {
        // Tables still in the cache are on disk before the walker reads the file.
        self.flush()?;
        let g = self.geo();
        let old_clusters = g.clusters_for(self.h.size).0;
        let first_gone = g.clusters_for(size).0;
        let keep = (g.l1_entries_for(size) as usize).min(self.l1.entries.len());
        // Count what the dropped L1 entries reference before changing anything: a
        // finding refuses the shrink with the image untouched.
        let mut tail = self.l1.entries.clone();
        tail[..keep].fill(0);
        let dropped = self.table_refs(L1Source::Active, self.h.l1_table_offset, &tail)?;
        self.commit_size(size)?;
        // Entries past the end in the last table that stays.
        let table_end = (keep as u64 * g.l2_entries()).min(old_clusters);
        for gc in (first_gone..table_end).map(GuestCluster) {
            if self.l2_offset(gc)?.is_none() {
                continue;
            }
            let e = self.l2_entry(gc)?;
            if e != L2Entry::default() {
                self.set_l2_entry(gc, L2Entry::default())?;
                self.free_entry(e);
            }
        }
        self.flush()?;
        if tail.iter().any(|&e| e != 0) {
            self.l1.entries[keep..].fill(0);
            self.l1.dirty = true;
            self.overlap.set_l2(&self.l1.entries, g);
            self.write_l1()?;
            self.sync()?;
            self.drop_refs(&dropped);
            self.flush()?;
        }
        self.cut_file_tail()
    }

    /// Truncate the file after its last cluster in use (QEMU does the same; failing to is
    /// not an error there either, the space stays allocated).
    fn cut_file_tail(&mut self) -> Result<()> {
        let cs = self.geo().cluster_size();
        let len = io("Could not get image file length", self.storage().len())?;
        let mut end = len.div_ceil(cs);
        while end > 0 && self.refcount(HostCluster(end - 1))? == 0 {
            end -= 1;
        }
        if end * cs < len {
            io(
                "Could not truncate the image file",
                self.storage().set_len(end * cs),
            )?;
            self.refs.end = self.refs.end.min(HostCluster(end));
        }
        Ok(())
    }
}

impl Qcow2Image {
    /// Change the virtual size to `size` (`qemu-img resize`), preallocating an added area
    /// per `mode`. Shrinking frees the clusters past the new end. Persistent bitmaps are
    /// resized with the image (`bitmap_ops`).
    pub fn resize(&self, size: u64, mode: Preallocation) -> Result<()> {
        self.bitmaps_before_resize()?;
        let resized = self.change_size(size, mode);
        let stored = self.bitmaps_after_resize();
        resized.and(stored)
    }

    fn change_size(&self, size: u64, mode: Preallocation) -> Result<()> {
        let (old, version, snapshots) = {
            let m = self.meta();
            (m.h.size, m.h.version, m.h.nb_snapshots)
        };
        if !size.is_multiple_of(512) {
            return Err(Error::invalid("The new size must be a multiple of 512"));
        }
        if snapshots > 0 && version < 3 {
            return Err(Error::invalid(
                "Can't resize a v2 image which has snapshots",
            ));
        }
        if size < old {
            if mode != Preallocation::Off {
                return Err(Error::invalid(
                    "Preallocation can't be used for shrinking an image",
                ));
            }
            return self.with_meta_exclusive(|m| m.shrink(size));
        }
        let backed = self.backing.is_some();
        self.with_meta_exclusive(|m| m.prepare_grow(old, size, mode, backed))?;
        // A longer backing file would show through the added area: zero it, as QEMU's
        // block layer asks of a growing truncate (falloc and full have zeroes in place
        // already). The cluster holding an unaligned old end gets zeroes past it too when
        // it has storage (which may hold what a shrink left there, where QEMU would show
        // it again), or the backing file's head copied in when preallocating.
        let longer = self.backing.as_ref().is_some_and(|b| b.size() > old);
        if longer && version < 3 {
            return Err(Error::Unsupported(
                "Failed to zero out new clusters: Operation not supported".into(),
            ));
        }
        let g = self.geo();
        let head_end = old.next_multiple_of(g.cluster_size()).min(size);
        let stored = {
            let e = self
                .meta()
                .l2_entry(g.guest_cluster(GuestOffset(old.min(size - 1))))?;
            e.is_compressed() || e.host_cluster().is_some()
        };
        let end = match mode {
            Preallocation::Off | Preallocation::Metadata if longer => size,
            _ if stored || (backed && mode != Preallocation::Off) => head_end,
            _ => old,
        };
        self.zeroes_within(old, end - old, false, size)?;
        self.with_meta_exclusive(|m| m.commit_size(size))
    }
}
