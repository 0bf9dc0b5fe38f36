//! The cluster allocator: the refcount table and blocks (through their cache), cluster and
//! byte-granular allocation, and refcount updates applied now or deferred to the next flush.
//!
//! Increments are applied at once (they reach the file before anything points at the
//! cluster, see `Meta::flush`). Decrements of clusters that tables still point at on disk are
//! deferred: they are applied at the next flush, after those tables were rewritten, and a
//! deferred cluster is not reused before that.

use std::ops::Range;

use super::cache::TableCache;
use super::meta::{encode_u64_table, Meta};
use super::overlap::{Metadata, REFTABLE_OFFSET_MASK};
use super::refcount;
use super::units::{ClusterCount, HostCluster, HostOffset};
use crate::error::{io, Error, Result, Structure};

/// When a refcount update takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Now, in the cached refcount block.
    Now,
    /// At the next flush, after every table that referenced the clusters is on disk.
    Deferred,
}

/// The allocator's state.
pub(crate) struct Refcounts {
    /// The refcount table, as in the file (offsets of refcount blocks).
    pub table: Vec<u64>,
    pub table_dirty: bool,
    pub blocks: TableCache,
    /// Lowest cluster that may be free.
    free_hint: HostCluster,
    /// Clusters picked for an allocation whose refcount is not set yet.
    reserved: Vec<Range<u64>>,
    /// Updates to apply at the next flush.
    deferred: Vec<(HostCluster, ClusterCount, i64)>,
    /// The cluster past everything in the file or allocated this session: clusters from
    /// here on are free whatever (possibly corrupt) refcounts say.
    pub end: HostCluster,
    /// Where the next compressed cluster may start inside a partly used cluster.
    next_byte: Option<HostOffset>,
}

impl Refcounts {
    pub fn new(table: Vec<u64>, blocks: usize, end: HostCluster) -> Refcounts {
        Refcounts {
            table,
            table_dirty: false,
            blocks: TableCache::new(blocks),
            free_hint: HostCluster(1),
            reserved: Vec::new(),
            deferred: Vec::new(),
            end,
            next_byte: None,
        }
    }

    fn is_reserved(&self, c: HostCluster) -> bool {
        self.reserved.iter().any(|r| r.contains(&c.0))
    }

    /// The first cluster past everything in the file or allocated in memory.
    fn end_cluster(&self) -> HostCluster {
        let reserved = self.reserved.iter().map(|r| r.end).max().unwrap_or(0);
        HostCluster(self.end.0.max(reserved))
    }

    /// Add `addend` to the refcounts of clusters `first..first + n` at the next flush.
    pub fn defer(&mut self, first: HostCluster, n: ClusterCount, addend: i64) {
        if n.0 > 0 {
            self.deferred.push((first, n, addend));
        }
    }

    /// Whether updates wait for the next flush.
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }
}

impl Meta {
    /// Where the refcount block of table entry `rt` is, if it has one.
    pub(super) fn refblock_offset(&self, rt: usize) -> Result<Option<HostOffset>> {
        match self.refs.table.get(rt) {
            None | Some(0) => Ok(None),
            Some(&e) => {
                let off = HostOffset(e & REFTABLE_OFFSET_MASK);
                if off.0 == 0 || !self.geo().is_cluster_aligned(off) {
                    return Err(Error::corrupt_at(
                        Structure::RefcountTable,
                        self.h.refcount_table_offset + rt as u64 * 8,
                        format!("refcount block offset {:#x} is invalid", off.0),
                    ));
                }
                Ok(Some(off))
            }
        }
    }

    fn evict_refblocks(&mut self) -> Result<()> {
        while self.refs.blocks.needs_eviction() {
            let (o, dirty) = self.refs.blocks.lru().expect("full cache has an LRU entry");
            if dirty {
                self.write_refblock(o)?;
            }
            self.refs.blocks.remove(o);
        }
        Ok(())
    }

    fn load_refblock(&mut self, off: HostOffset) -> Result<()> {
        if self.refs.blocks.get(off.0).is_some() {
            return Ok(());
        }
        self.evict_refblocks()?;
        let mut buf = vec![0u8; self.geo().cluster_size() as usize];
        io(
            "Could not read refcount block",
            self.storage().read_at(&mut buf, off.0),
        )?;
        self.refs.blocks.insert(off.0, buf, false);
        Ok(())
    }

    /// Put a new refcount block in the cache, dirty. A failed write-back of an evicted
    /// block leaves that block cached rather than losing it.
    fn insert_new_refblock(&mut self, off: HostOffset, block: Vec<u8>) {
        while self.refs.blocks.needs_eviction() {
            let (o, dirty) = self.refs.blocks.lru().expect("full cache has an LRU entry");
            if dirty && self.write_refblock(o).is_err() {
                break;
            }
            self.refs.blocks.remove(o);
        }
        self.refs.blocks.insert(off.0, block, true);
    }

    fn write_refblock(&mut self, off: u64) -> Result<()> {
        let data = self.refs.blocks.peek(off).expect("cached");
        io(
            "Could not write refcount block",
            self.storage().write_at(data, off),
        )?;
        self.refs.blocks.mark_clean(off);
        Ok(())
    }

    /// The first cluster past everything the file held at open and everything allocated
    /// since: a cluster allocated from here on has never been written, and reads as
    /// zeroes until it is.
    pub(super) fn allocation_end(&self) -> HostCluster {
        self.refs.end_cluster()
    }

    /// The first cluster from `c` on that a stored refcount block covers (every cluster
    /// before it has refcount 0), or `limit` if none comes before it. Scans the table no
    /// further than `limit`, so that a walk over the clusters costs a step per block
    /// where there is none.
    pub(super) fn next_with_refblock(&self, c: HostCluster, limit: u64) -> u64 {
        let g = self.geo();
        let per_rb = 1u64 << g.refblock_bits();
        let stored = |rt: u64| {
            usize::try_from(rt)
                .ok()
                .and_then(|rt| self.refs.table.get(rt))
                .is_some_and(|&e| e != 0)
        };
        let first = g.reftable_index(c) as u64;
        if stored(first) {
            return c.0.min(limit);
        }
        let mut rt = first + 1;
        while rt.saturating_mul(per_rb) < limit && rt < self.refs.table.len() as u64 {
            if stored(rt) {
                return rt * per_rb;
            }
            rt += 1;
        }
        limit
    }

    /// A copy of the refcount block at `off`.
    pub(super) fn refblock_bytes(&mut self, off: HostOffset) -> Result<Vec<u8>> {
        self.load_refblock(off)?;
        Ok(self.refs.blocks.get(off.0).expect("loaded").to_vec())
    }

    /// Refcount of host cluster `c`.
    pub fn refcount(&mut self, c: HostCluster) -> Result<u64> {
        let g = self.geo();
        let Some(off) = self.refblock_offset(g.reftable_index(c))? else {
            return Ok(0);
        };
        self.load_refblock(off)?;
        let block = self.refs.blocks.get(off.0).expect("loaded");
        Ok(refcount::get(block, g.refcount_order, g.refblock_slot(c)))
    }

    pub(super) fn set_refcount(&mut self, c: HostCluster, value: u64) -> Result<()> {
        let g = self.geo();
        if value > refcount::max_value(g.refcount_order) {
            return Err(Error::invalid(format!(
                "refcount of cluster {} would overflow {} bits",
                c.0,
                1u32 << g.refcount_order
            )));
        }
        let off = self.ensure_refblock(g.reftable_index(c))?;
        self.load_refblock(off)?;
        let block = self.refs.blocks.get_mut(off.0).expect("loaded");
        refcount::set(block, g.refcount_order, g.refblock_slot(c), value);
        Ok(())
    }

    /// The refcount block for table entry `rt`, allocated (and the table grown) if needed.
    fn ensure_refblock(&mut self, rt: usize) -> Result<HostOffset> {
        if rt >= self.refs.table.len() {
            self.grow_reftable(rt)?;
        }
        if let Some(off) = self.refblock_offset(rt)? {
            return Ok(off);
        }
        let g = self.geo();
        let c = self.find_free(ClusterCount(1))?;
        self.refs.end = self.refs.end.max(c.plus(1));
        let off = g.host_offset(c);
        let mut block = vec![0u8; g.cluster_size() as usize];
        let self_described = g.reftable_index(c) == rt;
        if self_described {
            refcount::set(&mut block, g.refcount_order, g.refblock_slot(c), 1);
        }
        self.insert_new_refblock(off, block);
        self.refs.table[rt] = off.0;
        self.overlap.add(Metadata::RefcountBlock, c);
        self.refs.table_dirty = true;
        if !self_described {
            self.refs.reserved.push(c.0..c.0 + 1);
            let r = self.update_refcount(c, ClusterCount(1), 1, When::Now);
            self.refs.reserved.pop();
            r?;
        }
        Ok(off)
    }

    /// Grow the refcount table so that entry `rt` exists. The new table and the refcount
    /// blocks that describe it go at the end of the file and are made durable at once.
    fn grow_reftable(&mut self, rt: usize) -> Result<()> {
        let g = self.geo();
        let cs = g.cluster_size();
        let per_rb = 1u64 << g.refblock_bits();
        let start = self.refs.end_cluster().0;
        let want_entries = ((rt as u64 + 1) * 3 / 2).max(self.refs.table.len() as u64 + 1);
        let mut table_clusters = (want_entries * 8).div_ceil(cs);
        let mut new_blocks: Vec<u64>;
        loop {
            // Refcount block indexes needed to describe [start, start + blocks + table).
            let mut k = 0u64;
            loop {
                let end = start + k + table_clusters;
                let needed: Vec<u64> = ((start / per_rb)..=((end - 1) / per_rb))
                    .filter(|&i| self.refblock_offset(i as usize).ok().flatten().is_none())
                    .collect();
                if needed.len() as u64 == k {
                    new_blocks = needed;
                    break;
                }
                k = needed.len() as u64;
            }
            let end = start + new_blocks.len() as u64 + table_clusters;
            let entries_needed = ((end - 1) / per_rb + 1).max(rt as u64 + 1);
            if entries_needed * 8 <= table_clusters * cs {
                break;
            }
            table_clusters = (entries_needed * 8).div_ceil(cs);
        }
        let table_start = start + new_blocks.len() as u64;
        let end = table_start + table_clusters;
        self.refs.end = self.refs.end.max(HostCluster(end));
        if table_clusters * cs > super::header::MAX_REFTABLE_BYTES {
            return Err(Error::invalid(
                "refcount table would exceed its maximum size",
            ));
        }
        let mut table = self.refs.table.clone();
        table.resize((table_clusters * cs / 8) as usize, 0);
        // New refcount blocks, placed in order at `start`.
        for (j, &rb_index) in new_blocks.iter().enumerate() {
            let c = HostCluster(start + j as u64);
            let off = g.host_offset(c);
            table[rb_index as usize] = off.0;
            self.overlap.add(Metadata::RefcountBlock, c);
            let mut block = vec![0u8; cs as usize];
            for c in start.max(rb_index * per_rb)..end.min((rb_index + 1) * per_rb) {
                refcount::set(&mut block, g.refcount_order, (c % per_rb) as usize, 1);
            }
            io(
                "Could not write refcount block",
                self.storage().write_at(&block, off.0),
            )?;
            self.insert_new_refblock(off, block);
            self.refs.blocks.mark_clean(off.0);
        }
        let old_table = (self.h.refcount_table_offset, self.h.refcount_table_clusters);
        self.refs.table = table;
        // Clusters of the region covered by pre-existing blocks get their counts there.
        for c in start..end {
            if !new_blocks.contains(&(c / per_rb)) {
                self.set_refcount(HostCluster(c), 1)?;
            }
        }
        self.write_refblocks()?;
        io(
            "Could not write refcount table",
            self.storage()
                .write_at(&encode_u64_table(&self.refs.table), table_start * cs),
        )?;
        self.sync()?;
        self.h.refcount_table_offset = table_start * cs;
        self.h.refcount_table_clusters = table_clusters as u32;
        self.write_header()?;
        self.sync()?;
        self.refs.table_dirty = false;
        let old = g.host_cluster(HostOffset(old_table.0));
        self.update_refcount(
            old,
            ClusterCount(u64::from(old_table.1)),
            -1,
            When::Deferred,
        )
    }

    /// Find `n` contiguous free clusters (refcount 0, not cluster 0, not reserved).
    /// Moves the search hint past the clusters found to be in use.
    fn find_free(&mut self, n: ClusterCount) -> Result<HostCluster> {
        let limit = self.geo().host_cluster_limit();
        let mut c = self.refs.free_hint.max(HostCluster(1));
        let mut first_free = None;
        let mut run = 0;
        loop {
            if c >= limit {
                return Err(Error::invalid("image file would grow past the qcow2 limit"));
            }
            // Past everything this session knows of, refcounts (possibly corrupt ones
            // claiming far-away clusters) are not consulted: those clusters are free.
            let free = c >= self.refs.end || self.refcount(c)? == 0;
            if free && !self.refs.is_reserved(c) {
                first_free.get_or_insert(c);
                run += 1;
                if run == n.0 {
                    let start = HostCluster(c.0 + 1 - n.0);
                    let ff = first_free.expect("set above");
                    self.refs.free_hint = if ff == start { c.plus(1) } else { ff };
                    return Ok(start);
                }
            } else {
                run = 0;
            }
            c = c.plus(1);
        }
    }

    /// Allocate `n` contiguous clusters with refcount 1; returns the first.
    pub fn alloc_clusters(&mut self, n: ClusterCount) -> Result<HostCluster> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.mark_dirty_if_lazy()?;
        let first = self.find_free(n)?;
        self.check_no_overlap(first, n)?;
        self.refs.reserved.push(first.0..first.0 + n.0);
        let result = self.update_refcount(first, n, 1, When::Now);
        self.refs.reserved.pop();
        result?;
        self.refs.end = self.refs.end.max(first.plus(n.0));
        Ok(first)
    }

    /// Allocate `size` bytes (at most a cluster) for compressed data, packed after the
    /// previous compressed cluster the way QEMU packs them: in the rest of its host cluster,
    /// running into the next cluster when that one is the next free one. Every host cluster
    /// the bytes touch gets one more reference.
    pub fn alloc_bytes(&mut self, size: u64) -> Result<HostOffset> {
        let g = self.geo();
        let cs = g.cluster_size();
        assert!(
            size > 0 && size <= cs,
            "compressed data is at most a cluster"
        );
        let mut at = self.refs.next_byte.take();
        if let Some(off) = at {
            let full =
                self.refcount(g.host_cluster(off))? >= refcount::max_value(self.h.refcount_order);
            if full {
                at = None;
            }
        }
        let start = match at {
            Some(off) if cs - off.0 % cs >= size => off,
            Some(off) => {
                let next = self.alloc_clusters(ClusterCount(1))?;
                if g.host_offset(next).0 == off.0.next_multiple_of(cs) {
                    // Runs on into the new cluster, which now holds its one reference.
                    self.update_refcount(g.host_cluster(off), ClusterCount(1), 1, When::Now)?;
                    self.set_next_byte(off.plus(size));
                    return Ok(off);
                }
                g.host_offset(next)
            }
            None => g.host_offset(self.alloc_clusters(ClusterCount(1))?),
        };
        if start.0 % cs != 0 {
            // The cluster is shared with earlier compressed data: one more reference.
            self.update_refcount(g.host_cluster(start), ClusterCount(1), 1, When::Now)?;
        }
        self.set_next_byte(start.plus(size));
        Ok(start)
    }

    fn set_next_byte(&mut self, off: HostOffset) {
        let aligned = self.geo().is_cluster_aligned(off);
        self.refs.next_byte = (!aligned).then_some(off);
    }

    /// Add `addend` to the refcounts of clusters `first..first + n`, now or at the next
    /// flush. A cluster whose count drops to zero is deallocated in the file and may be
    /// allocated again.
    pub fn update_refcount(
        &mut self,
        first: HostCluster,
        n: ClusterCount,
        addend: i64,
        when: When,
    ) -> Result<()> {
        match when {
            When::Deferred => {
                self.refs.defer(first, n, addend);
                Ok(())
            }
            When::Now => first
                .run(n)
                .try_for_each(|c| self.add_to_refcount(c, addend)),
        }
    }

    /// Drop one reference to each of `clusters` now (nothing on disk points at them).
    pub(super) fn free_now(&mut self, clusters: Range<u64>) -> Result<()> {
        let n = ClusterCount(clusters.end - clusters.start);
        self.update_refcount(HostCluster(clusters.start), n, -1, When::Now)
    }

    fn add_to_refcount(&mut self, c: HostCluster, addend: i64) -> Result<()> {
        if self.change_refcount(c, addend)? {
            self.release(c.0..c.0 + 1)?;
        }
        Ok(())
    }

    /// Add `addend` to the refcount of `c`; says whether `c` became free (its storage is
    /// not released yet: the caller does that before anything can be allocated).
    fn change_refcount(&mut self, c: HostCluster, addend: i64) -> Result<bool> {
        let v = self.refcount(c)?;
        let new = v.checked_add_signed(addend).ok_or_else(|| {
            let block = self.refs.table.get(self.geo().reftable_index(c)).copied();
            Error::corrupt_at(
                Structure::RefcountBlock,
                block.unwrap_or(0) & REFTABLE_OFFSET_MASK,
                format!("refcount of cluster {} would drop below zero", c.0),
            )
        })?;
        // Metadata may lose a reference it shares (with a snapshot), never its last one.
        if new == 0 {
            if let Some(kind) = self.overlap.kind_of(&self.h, c) {
                return Err(self.overlap_error("Freeing a cluster", c, kind.structure(), kind));
            }
        }
        self.set_refcount_value(c, new)?;
        Ok(new == 0)
    }

    /// Set the refcount of `c` to `value` now, whatever it was (check's repair). A cluster
    /// that becomes free is deallocated in the file and may be allocated again.
    pub(super) fn set_cluster_refcount(&mut self, c: HostCluster, value: u64) -> Result<()> {
        self.set_refcount_value(c, value)?;
        if value == 0 {
            self.release(c.0..c.0 + 1)?;
        }
        Ok(())
    }

    /// Store refcount `value` of `c`; a free cluster may be allocated again.
    fn set_refcount_value(&mut self, c: HostCluster, value: u64) -> Result<()> {
        self.set_refcount(c, value)?;
        if value == 0 {
            self.refs.free_hint = self.refs.free_hint.min(c);
            if self.refs.next_byte.map(|o| self.geo().host_cluster(o)) == Some(c) {
                self.refs.next_byte = None;
            }
        }
        Ok(())
    }

    /// Deallocate the storage of the free clusters `clusters` in the file.
    pub(super) fn release(&mut self, clusters: Range<u64>) -> Result<()> {
        let cs = self.geo().cluster_size();
        io(
            "Could not discard cluster",
            self.storage()
                .punch_hole(clusters.start * cs, (clusters.end - clusters.start) * cs),
        )
    }

    /// Apply the deferred updates (the tables that referenced the clusters are on disk).
    /// On failure the updates not applied stay deferred. Clusters that become free are
    /// deallocated in the file in contiguous runs, before anything can reuse them.
    pub(super) fn apply_deferred(&mut self) -> Result<()> {
        let updates = std::mem::take(&mut self.refs.deferred);
        let mut freed: Vec<Range<u64>> = Vec::new();
        let mut result = Ok(());
        'updates: for (i, &(first, n, addend)) in updates.iter().enumerate() {
            for (k, c) in first.run(n).enumerate() {
                match self.change_refcount(c, addend) {
                    Ok(false) => {}
                    Ok(true) => match freed.last_mut() {
                        Some(r) if r.end == c.0 => r.end += 1,
                        _ => freed.push(c.0..c.0 + 1),
                    },
                    Err(e) => {
                        let rest = ClusterCount(n.0 - k as u64);
                        self.refs.deferred.push((c, rest, addend));
                        self.refs.deferred.extend_from_slice(&updates[i + 1..]);
                        result = Err(e);
                        break 'updates;
                    }
                }
            }
        }
        for r in freed {
            self.release(r)?;
        }
        result
    }

    /// Refuse clusters that are in use as metadata although their refcount says free: the
    /// refcounts are corrupt. Like QEMU, mark the image corrupt and stop writing to it.
    fn check_no_overlap(&mut self, first: HostCluster, n: ClusterCount) -> Result<()> {
        let hit = first
            .run(n)
            .find_map(|c| Some((c, self.overlap.kind_of(&self.h, c)?)));
        match hit {
            Some((c, kind)) => Err(self.overlap_error("Allocation", c, kind.structure(), kind)),
            None => Ok(()),
        }
    }

    /// Check that guest data may be written to host cluster `c` in place: it must not
    /// hold metadata and must be allocated (refcount above 0).
    pub fn check_data_cluster(&mut self, c: HostCluster) -> Result<()> {
        if let Some(kind) = self.overlap.kind_of(&self.h, c) {
            return Err(self.overlap_error("Data write", c, kind.structure(), kind));
        }
        if c >= self.refs.end || self.refcount(c)? == 0 {
            return Err(self.overlap_error(
                "Data write",
                c,
                Structure::DataCluster,
                "a cluster with refcount 0",
            ));
        }
        Ok(())
    }

    /// Write every dirty refcount block.
    pub(super) fn write_refblocks(&mut self) -> Result<()> {
        for off in self.refs.blocks.dirty_offsets() {
            self.write_refblock(off)?;
        }
        Ok(())
    }

    /// Write dirty refcount blocks, sync, then the refcount table if it changed.
    pub(super) fn write_refcounts(&mut self) -> Result<()> {
        self.write_refblocks()?;
        if self.refs.table_dirty {
            self.sync()?;
            io(
                "Could not write refcount table",
                self.storage().write_at(
                    &encode_u64_table(&self.refs.table),
                    self.h.refcount_table_offset,
                ),
            )?;
            self.refs.table_dirty = false;
        }
        Ok(())
    }

    /// Replace the refcount structures (after a rebuild wrote new ones).
    pub(crate) fn reset_refcounts(&mut self, table: Vec<u64>) -> Result<()> {
        let g = self.geo();
        self.overlap.set_refblocks(&table, g);
        let file_end = io("Could not get image file length", self.storage().len())?;
        let end = self
            .refs
            .end
            .max(HostCluster(file_end.div_ceil(g.cluster_size())));
        self.refs = Refcounts::new(table, refblock_cache_size(g.cluster_size()), end);
        Ok(())
    }
}

/// Refcount blocks kept in the cache for a cluster size (32 MiB at most).
pub(super) fn refblock_cache_size(cluster_size: u64) -> usize {
    ((32u64 << 20) / cluster_size).clamp(16, 1024) as usize
}
