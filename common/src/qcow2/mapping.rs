//! The active mapping: the active L1 table, the L2 entry of each guest cluster, and the
//! copy-on-write policy (a table another L1 shares is copied before it is changed).

use super::entry::{self, CompressedRun, L2Entry, COPIED};
use super::meta::{encode_u64_table, Meta};
use super::overlap::Metadata;
use super::units::{ClusterCount, GuestCluster, HostCluster, HostOffset};
use crate::error::{io, Error, Result, Structure};

/// The active L1 table as in memory; written back when dirty.
pub(crate) struct ActiveL1 {
    pub entries: Vec<u64>,
    pub dirty: bool,
}

impl ActiveL1 {
    pub fn new(entries: Vec<u64>) -> ActiveL1 {
        ActiveL1 {
            entries,
            dirty: false,
        }
    }
}

impl Meta {
    /// The L2 table of guest cluster `gc`, if it has one.
    pub fn l2_offset(&self, gc: GuestCluster) -> Result<Option<HostOffset>> {
        let g = self.geo();
        let i = g.l1_index(gc);
        match self.l1.entries.get(i) {
            None => Ok(None),
            Some(&e) => entry::l1_table_offset(e, g.cluster_size()).map_err(|err| {
                err.located(Structure::L1Table, self.h.l1_table_offset + i as u64 * 8)
            }),
        }
    }

    /// Load an active L2 table, refusing one that overlaps other metadata (which marks
    /// a writable image corrupt, as QEMU does).
    fn load_active_l2(&mut self, off: HostOffset) -> Result<()> {
        if self.l2.peek(off.0).is_some() {
            return Ok(());
        }
        let c = self.geo().host_cluster(off);
        if let Some(kind) = self
            .overlap
            .kind_of(&self.h, c)
            .filter(|&k| k != Metadata::ActiveL2)
        {
            if self.l2_location_problem(off).is_none() {
                return Err(self.overlap_error("L2 table", c, kind.structure(), kind));
            }
        }
        self.load_l2(off)
    }

    /// The L2 entry of guest cluster `gc` (an empty entry when it has no L2 table).
    pub fn l2_entry(&mut self, gc: GuestCluster) -> Result<L2Entry> {
        let Some(off) = self.l2_offset(gc)? else {
            return Ok(L2Entry::default());
        };
        self.load_active_l2(off)?;
        let g = self.geo();
        let i = g.l2_index(gc);
        let e = self.l2_get(off, i)?;
        e.validate(g.cluster_size(), g.extended_l2)
            .map_err(|err| err.located(Structure::L2Table, off.0 + i as u64 * g.l2_entry_size()))?;
        Ok(e)
    }

    /// Make the L2 table of `gc` writable (allocate it, or copy it if shared), return it.
    fn l2_for_write(&mut self, gc: GuestCluster) -> Result<HostOffset> {
        let g = self.geo();
        let idx = g.l1_index(gc);
        let l1e = *self
            .l1
            .entries
            .get(idx)
            .ok_or_else(|| Error::invalid("write beyond the end of the L1 table"))?;
        let old = entry::l1_table_offset(l1e, g.cluster_size())?;
        if let Some(off) = old {
            if l1e & COPIED != 0 {
                self.load_active_l2(off)?;
                return Ok(off);
            }
        }
        let new = g.host_offset(self.alloc_clusters(ClusterCount(1))?);
        let content = match old {
            Some(off) => {
                self.load_active_l2(off)?;
                let c = self.l2_bytes(off)?;
                self.refs.defer(g.host_cluster(off), ClusterCount(1), -1);
                c
            }
            None => vec![0u8; g.cluster_size() as usize],
        };
        self.insert_l2(new, content)?;
        self.overlap.add(Metadata::ActiveL2, g.host_cluster(new));
        if let Some(off) = old {
            self.overlap.remove_l2(g.host_cluster(off));
        }
        self.l1.entries[idx] = new.0 | COPIED;
        self.l1.dirty = true;
        Ok(new)
    }

    /// Set the L2 entry of guest cluster `gc`, allocating or copying its table as needed.
    pub fn set_l2_entry(&mut self, gc: GuestCluster, e: L2Entry) -> Result<()> {
        self.mark_dirty_if_lazy()?;
        let off = self.l2_for_write(gc)?;
        let i = self.geo().l2_index(gc);
        self.l2_set(off, i, e)
    }

    /// Drop the reference an L2 entry holds on its host cluster(s), at the next flush.
    pub fn free_entry(&mut self, e: L2Entry) {
        let g = self.geo();
        if e.is_compressed() {
            let mut run = CompressedRun::decode(e.word, g.cluster_bits);
            run.len = run.len.min(g.cluster_size());
            let clusters = g.clusters_touched(HostOffset(run.offset), run.len);
            self.refs.defer(
                HostCluster(clusters.start),
                ClusterCount(clusters.end - clusters.start),
                -1,
            );
        } else if let Some(h) = e.host_cluster() {
            self.refs.defer(g.host_cluster(h), ClusterCount(1), -1);
        }
    }

    /// Grow the active L1 table to `entries` entries: write a new table, point the header
    /// at it, then free the old one.
    pub fn grow_l1(&mut self, entries: u64) -> Result<()> {
        if entries <= self.l1.entries.len() as u64 {
            return Ok(());
        }
        if entries * 8 > super::header::MAX_L1_BYTES {
            return Err(Error::invalid("Active L1 table too large"));
        }
        let g = self.geo();
        let new = g.host_offset(self.alloc_clusters(g.clusters_for(entries * 8))?);
        self.l1.entries.resize(entries as usize, 0);
        self.write_refcounts()?;
        self.sync()?;
        let mut bytes = encode_u64_table(&self.l1.entries);
        bytes.resize(bytes.len().next_multiple_of(512), 0);
        io(
            "Could not write L1 table",
            self.storage().write_at(&bytes, new.0),
        )?;
        self.sync()?;
        let (old, old_size) = (self.h.l1_table_offset, u64::from(self.h.l1_size));
        self.h.l1_table_offset = new.0;
        self.h.l1_size = entries as u32;
        self.write_header()?;
        self.sync()?;
        self.l1.dirty = false;
        if old != 0 && old_size > 0 {
            let first = g.host_cluster(HostOffset(old));
            self.refs.defer(first, g.clusters_for(old_size * 8), -1);
        }
        Ok(())
    }

    /// Write the active L1 table if it changed; says whether it did.
    pub(super) fn write_l1(&mut self) -> Result<bool> {
        if !self.l1.dirty {
            return Ok(false);
        }
        io(
            "Could not write L1 table",
            self.storage()
                .write_at(&encode_u64_table(&self.l1.entries), self.h.l1_table_offset),
        )?;
        self.l1.dirty = false;
        Ok(true)
    }
}
