//! The metadata of an open qcow2 image: L1 table, cached L2 tables and refcount blocks,
//! the cluster allocator, and write-back in the dependency order of DESIGN.md.
//!
//! Everything here runs under the image's metadata lock. Ordering contract:
//! refcount increments reach the file before anything points at the new cluster, guest data
//! and L2 tables before the entries that point at them, and refcount decrements only after
//! the tables that stopped pointing at the cluster. Freed clusters are not reused before that.

use std::collections::HashSet;
use std::sync::Arc;

use super::cache::TableCache;
use super::entry::{self, HostOffset, L2Entry, COPIED};
use super::header::{Header, INCOMPAT_DIRTY};
use super::refcount;
use crate::error::{io, Error, Result};
use crate::storage::Storage;

/// Bits 9..63 of a refcount table entry hold the refcount block offset.
const REFTABLE_OFFSET_MASK: u64 = !0x1ff;

/// Default guest bytes covered by cached L2 tables (QEMU: 32 GiB with 64 KiB clusters).
const L2_CACHE_COVERAGE: u64 = 32 << 30;
/// Upper bound on metadata cache memory per cache.
const CACHE_MAX_BYTES: u64 = 32 << 20;
/// `metadata_kind` of an active L2 table.
const L2_TABLE: &str = "an L2 table";

pub(crate) struct Meta {
    pub h: Header,
    storage: Arc<dyn Storage>,
    pub l1: Vec<u64>,
    l1_dirty: bool,
    reftable: Vec<u64>,
    reftable_dirty: bool,
    l2: TableCache,
    refblocks: TableCache,
    /// Lowest cluster index that may be free.
    free_hint: u64,
    /// Clusters picked for an allocation whose refcount is not set yet.
    reserved: Vec<std::ops::Range<u64>>,
    /// One refcount decrement per entry, applied at the next flush.
    pending_free: Vec<u64>,
    /// Host clusters holding active L2 tables and refcount blocks. Allocation, frees and
    /// data writes refuse them even when corrupt metadata points there (QEMU's overlap check).
    l2_clusters: HashSet<u64>,
    refblock_clusters: HashSet<u64>,
    /// Cluster index past everything in the file or allocated this session: clusters from
    /// here on are free whatever (possibly corrupt) refcounts say.
    alloc_end: u64,
    /// Guest cluster ranges (start, count) whose allocating write is under way.
    inflight: Vec<(u64, u64)>,
    pub read_only: bool,
}

fn be64_at(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[8 * i..8 * i + 8].try_into().unwrap())
}

fn read_u64_table(
    storage: &dyn Storage,
    offset: u64,
    count: usize,
    what: &str,
) -> Result<Vec<u64>> {
    let mut buf = vec![0u8; count * 8];
    io(what, storage.read_at(&mut buf, offset))?;
    Ok((0..count).map(|i| be64_at(&buf, i)).collect())
}

/// Cluster indexes of the nonzero offsets in a table of entries.
fn cluster_set(table: &[u64], mask: u64, cluster_bits: u32) -> HashSet<u64> {
    table
        .iter()
        .map(|e| e & mask)
        .filter(|&o| o != 0)
        .map(|o| o >> cluster_bits)
        .collect()
}

fn encode_u64_table(t: &[u64]) -> Vec<u8> {
    t.iter().flat_map(|v| v.to_be_bytes()).collect()
}

impl Meta {
    /// Load the L1 and refcount tables of an image whose header was validated.
    pub fn load(storage: Arc<dyn Storage>, h: Header, read_only: bool) -> Result<Meta> {
        let l1 = read_u64_table(
            &*storage,
            h.l1_table_offset,
            h.l1_size as usize,
            "Could not read L1 table",
        )?;
        let rt_entries = (u64::from(h.refcount_table_clusters) * h.cluster_size() / 8) as usize;
        let reftable = read_u64_table(
            &*storage,
            h.refcount_table_offset,
            rt_entries,
            "Could not read refcount table",
        )?;
        let cs = h.cluster_size();
        let l2_tables = (L2_CACHE_COVERAGE / h.l1_coverage())
            .max(h.size.div_ceil(h.l1_coverage()).min(CACHE_MAX_BYTES / cs))
            .clamp(16, (CACHE_MAX_BYTES / cs).max(16));
        let rb_tables = (CACHE_MAX_BYTES / cs).clamp(16, 1024);
        let alloc_end = io("Could not get image file length", storage.len())?.div_ceil(cs);
        Ok(Meta {
            l2_clusters: cluster_set(&l1, entry::OFFSET_MASK, h.cluster_bits),
            refblock_clusters: cluster_set(&reftable, REFTABLE_OFFSET_MASK, h.cluster_bits),
            alloc_end,
            l2: TableCache::new(l2_tables as usize),
            refblocks: TableCache::new(rb_tables as usize),
            h,
            storage,
            l1,
            l1_dirty: false,
            reftable,
            reftable_dirty: false,
            free_hint: 1,
            reserved: Vec::new(),
            pending_free: Vec::new(),
            inflight: Vec::new(),
            read_only,
        })
    }

    pub fn cluster_size(&self) -> u64 {
        self.h.cluster_size()
    }

    fn file_clusters(&self) -> Result<u64> {
        let len = io("Could not get image file length", self.storage.len())?;
        Ok(len.div_ceil(self.cluster_size()))
    }

    /// Check that a table cluster lies where a table may be (not cluster 0, inside the
    /// file's reach), so hostile offsets cannot make us read or write anywhere.
    fn check_table_offset(&self, off: u64, what: &str) -> Result<()> {
        if off == 0 || !off.is_multiple_of(self.cluster_size()) {
            return Err(Error::corrupt(format!("{what} offset {off:#x} is invalid")));
        }
        Ok(())
    }

    // ---- L2 tables -------------------------------------------------------------------

    fn load_l2(&mut self, off: u64) -> Result<()> {
        if self.l2.get(off).is_some() {
            return Ok(());
        }
        self.check_table_offset(off, "L2 table")?;
        let c = off >> self.h.cluster_bits;
        if c >= self.alloc_end {
            return Err(Error::corrupt(format!(
                "L2 table offset {off:#x} is beyond the end of the image file"
            )));
        }
        if let Some(kind) = self.metadata_kind(c).filter(|&k| k != L2_TABLE) {
            return Err(self.overlap("L2 table", c, kind));
        }
        self.make_room_l2()?;
        let mut buf = vec![0u8; self.cluster_size() as usize];
        io(
            "Could not read L2 table",
            self.storage.read_at(&mut buf, off),
        )?;
        self.l2.insert(off, buf, false);
        Ok(())
    }

    fn make_room_l2(&mut self) -> Result<()> {
        while self.l2.needs_eviction() {
            let (off, dirty) = self.l2.lru().expect("full cache has an LRU entry");
            if dirty {
                // Refcounts of the clusters it points at (and data) must be on disk first.
                self.write_refcounts()?;
                self.sync()?;
                self.write_l2(off)?;
            }
            self.l2.remove(off);
        }
        Ok(())
    }

    fn write_l2(&mut self, off: u64) -> Result<()> {
        let data = self.l2.peek(off).expect("dirty L2 table is cached");
        io("Could not write L2 table", self.storage.write_at(data, off))?;
        self.l2.mark_clean(off);
        Ok(())
    }

    /// L2 table offset for guest cluster `gc`, if there is one.
    pub fn l2_offset(&self, gc: u64) -> Result<Option<u64>> {
        let idx = (gc / self.h.l2_entries()) as usize;
        match self.l1.get(idx) {
            None => Ok(None),
            Some(&e) => Ok(entry::l1_table_offset(e, self.cluster_size())?.map(|h| h.0)),
        }
    }

    /// The L2 entry of guest cluster `gc` (an empty entry when it has no L2 table).
    pub fn l2_entry(&mut self, gc: u64) -> Result<L2Entry> {
        let Some(off) = self.l2_offset(gc)? else {
            return Ok(L2Entry::default());
        };
        self.load_l2(off)?;
        let i = (gc % self.h.l2_entries()) as usize;
        let t = self.l2.get(off).expect("just loaded");
        let e = if self.h.extended_l2() {
            L2Entry {
                word: be64_at(t, 2 * i),
                bitmap: be64_at(t, 2 * i + 1),
            }
        } else {
            L2Entry {
                word: be64_at(t, i),
                bitmap: 0,
            }
        };
        e.validate(self.cluster_size(), self.h.extended_l2())?;
        Ok(e)
    }

    /// Make the L2 table of `gc` writable (allocate it or copy it if shared), return it.
    fn l2_for_write(&mut self, gc: u64) -> Result<u64> {
        let idx = (gc / self.h.l2_entries()) as usize;
        let l1e = *self
            .l1
            .get(idx)
            .ok_or_else(|| Error::invalid("write beyond the end of the L1 table"))?;
        let old = entry::l1_table_offset(l1e, self.cluster_size())?;
        if let Some(HostOffset(off)) = old {
            if l1e & COPIED != 0 {
                self.load_l2(off)?;
                return Ok(off);
            }
        }
        let new = self.alloc_clusters(1)? << self.h.cluster_bits;
        let content = match old {
            Some(HostOffset(off)) => {
                self.load_l2(off)?;
                let c = self.l2.get(off).expect("loaded").to_vec();
                self.pending_free.push(off >> self.h.cluster_bits);
                c
            }
            None => vec![0u8; self.cluster_size() as usize],
        };
        self.make_room_l2()?;
        self.l2.insert(new, content, true);
        self.l2_clusters.insert(new >> self.h.cluster_bits);
        if let Some(HostOffset(off)) = old {
            self.l2_clusters.remove(&(off >> self.h.cluster_bits));
        }
        self.l1[idx] = new | COPIED;
        self.l1_dirty = true;
        Ok(new)
    }

    /// Set the L2 entry of guest cluster `gc`, allocating or copying its table as needed.
    pub fn set_l2_entry(&mut self, gc: u64, e: L2Entry) -> Result<()> {
        self.mark_dirty_if_lazy()?;
        let off = self.l2_for_write(gc)?;
        let i = (gc % self.h.l2_entries()) as usize;
        let ext = self.h.extended_l2();
        let t = self.l2.get_mut(off).expect("writable table is cached");
        if ext {
            t[16 * i..16 * i + 8].copy_from_slice(&e.word.to_be_bytes());
            t[16 * i + 8..16 * i + 16].copy_from_slice(&e.bitmap.to_be_bytes());
        } else {
            t[8 * i..8 * i + 8].copy_from_slice(&e.word.to_be_bytes());
        }
        Ok(())
    }

    /// Grow the active L1 table to `entries` entries: write a new table, point the header
    /// at it, then free the old one.
    pub fn grow_l1(&mut self, entries: u64) -> Result<()> {
        if entries <= self.l1.len() as u64 {
            return Ok(());
        }
        if entries * 8 > super::header::MAX_L1_BYTES {
            return Err(Error::invalid("Active L1 table too large"));
        }
        let cs = self.cluster_size();
        let clusters = (entries * 8).div_ceil(cs);
        let new = self.alloc_clusters(clusters)? << self.h.cluster_bits;
        self.l1.resize(entries as usize, 0);
        self.write_refcounts()?;
        self.sync()?;
        let mut bytes = encode_u64_table(&self.l1);
        bytes.resize(bytes.len().next_multiple_of(512), 0);
        io(
            "Could not write L1 table",
            self.storage.write_at(&bytes, new),
        )?;
        self.sync()?;
        let (old, old_size) = (self.h.l1_table_offset, u64::from(self.h.l1_size));
        self.h.l1_table_offset = new;
        self.h.l1_size = entries as u32;
        self.write_header()?;
        self.sync()?;
        self.l1_dirty = false;
        if old != 0 && old_size > 0 {
            let first = old >> self.h.cluster_bits;
            self.pending_free
                .extend(first..first + (old_size * 8).div_ceil(cs));
        }
        Ok(())
    }

    // ---- refcounts -------------------------------------------------------------------

    fn rb_bits(&self) -> u32 {
        self.h.cluster_bits + 3 - self.h.refcount_order
    }

    fn refblock_offset(&self, rt: usize) -> Result<Option<u64>> {
        match self.reftable.get(rt) {
            None | Some(0) => Ok(None),
            Some(&e) => {
                let off = e & REFTABLE_OFFSET_MASK;
                if off == 0 || !off.is_multiple_of(self.cluster_size()) {
                    return Err(Error::corrupt(format!(
                        "refcount block offset {off:#x} is invalid"
                    )));
                }
                Ok(Some(off))
            }
        }
    }

    fn load_refblock(&mut self, off: u64) -> Result<()> {
        if self.refblocks.get(off).is_some() {
            return Ok(());
        }
        while self.refblocks.needs_eviction() {
            let (o, dirty) = self.refblocks.lru().expect("full cache has an LRU entry");
            if dirty {
                self.write_refblock(o)?;
            }
            self.refblocks.remove(o);
        }
        let mut buf = vec![0u8; self.cluster_size() as usize];
        io(
            "Could not read refcount block",
            self.storage.read_at(&mut buf, off),
        )?;
        self.refblocks.insert(off, buf, false);
        Ok(())
    }

    fn write_refblock(&mut self, off: u64) -> Result<()> {
        let data = self.refblocks.peek(off).expect("cached");
        io(
            "Could not write refcount block",
            self.storage.write_at(data, off),
        )?;
        self.refblocks.mark_clean(off);
        Ok(())
    }

    /// Refcount of host cluster `c`.
    pub fn refcount(&mut self, c: u64) -> Result<u64> {
        let rt = (c >> self.rb_bits()) as usize;
        let Some(off) = self.refblock_offset(rt)? else {
            return Ok(0);
        };
        self.load_refblock(off)?;
        let i = (c & ((1 << self.rb_bits()) - 1)) as usize;
        Ok(refcount::get(
            self.refblocks.get(off).expect("loaded"),
            self.h.refcount_order,
            i,
        ))
    }

    fn set_refcount(&mut self, c: u64, value: u64) -> Result<()> {
        if value > refcount::max_value(self.h.refcount_order) {
            return Err(Error::invalid(format!(
                "refcount of cluster {c} would overflow {} bits",
                self.h.refcount_bits()
            )));
        }
        let rt = (c >> self.rb_bits()) as usize;
        let off = self.ensure_refblock(rt)?;
        self.load_refblock(off)?;
        let i = (c & ((1 << self.rb_bits()) - 1)) as usize;
        let order = self.h.refcount_order;
        refcount::set(
            self.refblocks.get_mut(off).expect("loaded"),
            order,
            i,
            value,
        );
        Ok(())
    }

    /// Add one to the refcount of cluster `c` now (decrements go through `free_cluster`).
    pub fn incref(&mut self, c: u64) -> Result<()> {
        let v = self.refcount(c)?;
        self.set_refcount(c, v + 1)
    }

    fn ensure_refblock(&mut self, rt: usize) -> Result<u64> {
        if rt >= self.reftable.len() {
            self.grow_reftable(rt)?;
        }
        if let Some(off) = self.refblock_offset(rt)? {
            return Ok(off);
        }
        let c = self.find_free(1)?;
        self.alloc_end = self.alloc_end.max(c + 1);
        let off = c << self.h.cluster_bits;
        let mut block = vec![0u8; self.cluster_size() as usize];
        let self_described = (c >> self.rb_bits()) as usize == rt;
        if self_described {
            refcount::set(
                &mut block,
                self.h.refcount_order,
                (c & ((1 << self.rb_bits()) - 1)) as usize,
                1,
            );
        }
        self.load_refblock_new(off, block);
        self.reftable[rt] = off;
        self.refblock_clusters.insert(c);
        self.reftable_dirty = true;
        if !self_described {
            self.reserved.push(c..c + 1);
            let r = self.incref(c);
            self.reserved.pop();
            r?;
        }
        Ok(off)
    }

    fn load_refblock_new(&mut self, off: u64, block: Vec<u8>) {
        // Evict without I/O errors being lost: a failed write-back leaves the block cached.
        while self.refblocks.needs_eviction() {
            let (o, dirty) = self.refblocks.lru().expect("full cache has an LRU entry");
            if dirty && self.write_refblock(o).is_err() {
                break;
            }
            self.refblocks.remove(o);
        }
        self.refblocks.insert(off, block, true);
    }

    /// Grow the refcount table so that entry `rt` exists. The new table and the refcount
    /// blocks that describe it go at the end of the file and are made durable at once.
    fn grow_reftable(&mut self, rt: usize) -> Result<()> {
        let cs = self.cluster_size();
        let per_rb = 1u64 << self.rb_bits();
        let start = self.end_cluster()?;
        let want_entries = ((rt as u64 + 1) * 3 / 2).max(self.reftable.len() as u64 + 1);
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
        self.alloc_end = self.alloc_end.max(end);
        if (table_clusters * cs) > super::header::MAX_REFTABLE_BYTES {
            return Err(Error::invalid(
                "refcount table would exceed its maximum size",
            ));
        }
        let mut table = self.reftable.clone();
        table.resize((table_clusters * cs / 8) as usize, 0);
        // New refcount blocks, placed in order at `start`.
        for (j, &rb_index) in new_blocks.iter().enumerate() {
            let off = (start + j as u64) * cs;
            table[rb_index as usize] = off;
            self.refblock_clusters.insert(start + j as u64);
            let mut block = vec![0u8; cs as usize];
            for c in start.max(rb_index * per_rb)..end.min((rb_index + 1) * per_rb) {
                refcount::set(&mut block, self.h.refcount_order, (c % per_rb) as usize, 1);
            }
            io(
                "Could not write refcount block",
                self.storage.write_at(&block, off),
            )?;
            self.load_refblock_new(off, block);
            self.refblocks.mark_clean(off);
        }
        let old_table = (self.h.refcount_table_offset, self.h.refcount_table_clusters);
        self.reftable = table;
        // Clusters of the region covered by pre-existing blocks get their counts there.
        for c in start..end {
            let rbi = c / per_rb;
            if !new_blocks.contains(&rbi) {
                self.set_refcount(c, 1)?;
            }
        }
        self.write_refcounts_blocks_only()?;
        io(
            "Could not write refcount table",
            self.storage
                .write_at(&encode_u64_table(&self.reftable), table_start * cs),
        )?;
        self.sync()?;
        self.h.refcount_table_offset = table_start * cs;
        self.h.refcount_table_clusters = table_clusters as u32;
        self.write_header()?;
        self.sync()?;
        self.reftable_dirty = false;
        let old_first = old_table.0 / cs;
        self.pending_free
            .extend(old_first..old_first + u64::from(old_table.1));
        Ok(())
    }

    /// First cluster index past everything in the file or allocated in memory.
    fn end_cluster(&mut self) -> Result<u64> {
        let mut end = self.alloc_end;
        for r in &self.reserved {
            end = end.max(r.end);
        }
        Ok(end)
    }

    fn is_reserved(&self, c: u64) -> bool {
        self.reserved.iter().any(|r| r.contains(&c))
    }

    /// Find `n` contiguous free clusters (refcount 0, not cluster 0, not reserved).
    /// Moves the search hint past the clusters found to be in use.
    fn find_free(&mut self, n: u64) -> Result<u64> {
        let limit = 1u64 << (56 - self.h.cluster_bits);
        let mut c = self.free_hint.max(1);
        let mut first_free = None;
        let mut run = 0;
        loop {
            if c >= limit {
                return Err(Error::invalid("image file would grow past the qcow2 limit"));
            }
            // Past everything this session knows of, refcounts (possibly corrupt ones
            // claiming far-away clusters) are not consulted: those clusters are free.
            let free = c >= self.alloc_end || self.refcount(c)? == 0;
            if free && !self.is_reserved(c) {
                first_free.get_or_insert(c);
                run += 1;
                if run == n {
                    let start = c + 1 - n;
                    let ff = first_free.expect("set above");
                    self.free_hint = if ff == start { c + 1 } else { ff };
                    return Ok(start);
                }
            } else {
                run = 0;
            }
            c += 1;
        }
    }

    /// Allocate `n` contiguous clusters with refcount 1; returns the first cluster index.
    pub fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.mark_dirty_if_lazy()?;
        let first = self.find_free(n)?;
        self.check_no_overlap(first, n)?;
        self.reserved.push(first..first + n);
        let mut result = Ok(());
        for c in first..first + n {
            result = self.set_refcount(c, 1);
            if result.is_err() {
                break;
            }
        }
        self.reserved.pop();
        result?;
        self.alloc_end = self.alloc_end.max(first + n);
        Ok(first)
    }

    /// Refuse clusters that are in use as metadata although their refcount says free: the
    /// refcounts are corrupt. Like QEMU, mark the image corrupt and stop writing to it.
    fn check_no_overlap(&mut self, first: u64, n: u64) -> Result<()> {
        match (first..first + n).find_map(|c| Some((c, self.metadata_kind(c)?))) {
            Some((c, kind)) => Err(self.overlap("Allocation", c, kind)),
            None => Ok(()),
        }
    }

    /// Which metadata host cluster `c` holds, if any.
    pub fn metadata_kind(&self, c: u64) -> Option<&'static str> {
        let cs = self.cluster_size();
        let cb = self.h.cluster_bits;
        let within =
            |off: u64, bytes: u64| bytes > 0 && c >= off >> cb && c <= (off + bytes - 1) >> cb;
        let h = &self.h;
        if c == 0 {
            Some("the header")
        } else if within(h.l1_table_offset, u64::from(h.l1_size) * 8) {
            Some("the active L1 table")
        } else if within(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
        ) {
            Some("the refcount table")
        } else if h.nb_snapshots > 0 && within(h.snapshots_offset, 1) {
            Some("the snapshot table")
        } else if self.refblock_clusters.contains(&c) {
            Some("a refcount block")
        } else if self.l2_clusters.contains(&c) {
            Some(L2_TABLE)
        } else {
            None
        }
    }

    /// Check that guest data may be written to host cluster `c` in place: it must not
    /// hold metadata and must be allocated (refcount above 0).
    pub fn check_data_cluster(&mut self, c: u64) -> Result<()> {
        if let Some(kind) = self.metadata_kind(c) {
            return Err(self.overlap("Data write", c, kind));
        }
        if c >= self.alloc_end || self.refcount(c)? == 0 {
            return Err(self.overlap("Data write", c, "a cluster with refcount 0"));
        }
        Ok(())
    }

    /// Metadata points where it must not: like QEMU, mark the image corrupt (when it is
    /// writable) and stop writing to it.
    fn overlap(&mut self, what: &str, c: u64, kind: &str) -> Error {
        if !self.read_only {
            self.h.incompatible_features |= super::header::INCOMPAT_CORRUPT;
            let _ = self.write_header().and_then(|_| self.sync());
            self.read_only = true;
        }
        Error::corrupt(format!(
            "{what} at offset {:#x}: preventing invalid write on metadata (overlaps with \
             {kind}); image marked as corrupt",
            c << self.h.cluster_bits
        ))
    }

    /// Drop one reference to cluster `c` at the next flush (after the tables that pointed
    /// at it are on disk). Until then the cluster is not reused.
    pub fn free_cluster(&mut self, c: u64) {
        self.pending_free.push(c);
    }

    /// Drop the reference an L2 entry holds on its host cluster(s).
    pub fn free_entry(&mut self, e: L2Entry) {
        let bits = self.h.cluster_bits;
        if e.is_compressed() {
            let mut run = entry::CompressedRun::decode(e.word, bits);
            run.len = run.len.min(1 << bits);
            for c in run.clusters(bits) {
                self.free_cluster(c);
            }
        } else if let Some(h) = e.host_cluster() {
            self.free_cluster(h.0 >> bits);
        }
    }

    // ---- allocating writes in flight ----------------------------------------------

    /// Whether an allocating write is under way for any of guest clusters `gc..gc + n`.
    pub fn inflight_overlaps(&self, gc: u64, n: u64) -> bool {
        self.inflight.iter().any(|&(s, k)| gc < s + k && s < gc + n)
    }

    /// Note an allocating write for guest clusters `gc..gc + n`.
    pub fn inflight_add(&mut self, gc: u64, n: u64) {
        self.inflight.push((gc, n));
    }

    /// The allocating write that started at guest cluster `gc` has settled.
    pub fn inflight_remove(&mut self, gc: u64) {
        if let Some(i) = self.inflight.iter().position(|&(s, _)| s == gc) {
            self.inflight.swap_remove(i);
        }
    }

    // ---- dirty bit, header, flush ----------------------------------------------------

    fn mark_dirty_if_lazy(&mut self) -> Result<()> {
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
        bytes.resize(self.cluster_size() as usize, 0);
        io(
            "Could not write qcow2 header",
            self.storage.write_at(&bytes, 0),
        )
    }

    pub fn sync(&self) -> Result<()> {
        io("Could not flush image file", self.storage.flush())
    }

    fn write_refcounts_blocks_only(&mut self) -> Result<()> {
        for off in self.refblocks.dirty_offsets() {
            self.write_refblock(off)?;
        }
        Ok(())
    }

    /// Write dirty refcount blocks, sync, then the refcount table if it changed.
    fn write_refcounts(&mut self) -> Result<()> {
        self.write_refcounts_blocks_only()?;
        if self.reftable_dirty {
            self.sync()?;
            io(
                "Could not write refcount table",
                self.storage.write_at(
                    &encode_u64_table(&self.reftable),
                    self.h.refcount_table_offset,
                ),
            )?;
            self.reftable_dirty = false;
        }
        Ok(())
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
        let dirty_l2 = self.l2.dirty_offsets();
        if !dirty_l2.is_empty() {
            for off in dirty_l2 {
                self.write_l2(off)?;
            }
            self.sync()?;
        }
        if self.l1_dirty {
            io(
                "Could not write L1 table",
                self.storage
                    .write_at(&encode_u64_table(&self.l1), self.h.l1_table_offset),
            )?;
            self.l1_dirty = false;
            self.sync()?;
        }
        // 3. Now nothing on disk points at freed clusters: drop their references.
        if !self.pending_free.is_empty() {
            let frees = std::mem::take(&mut self.pending_free);
            for (i, &c) in frees.iter().enumerate() {
                if let Err(e) = self.release(c) {
                    self.pending_free.extend_from_slice(&frees[i + 1..]);
                    return Err(e);
                }
            }
            self.write_refcounts()?;
            self.sync()?;
        }
        Ok(())
    }

    fn release(&mut self, c: u64) -> Result<()> {
        if let Some(kind) = self.metadata_kind(c) {
            return Err(self.overlap("Freeing a cluster", c, kind));
        }
        let v = self.refcount(c)?;
        if v == 0 {
            return Err(Error::corrupt(format!(
                "refcount of cluster {c} would drop below zero"
            )));
        }
        self.set_refcount(c, v - 1)?;
        if v == 1 {
            let cs = self.cluster_size();
            io(
                "Could not discard cluster",
                self.storage.punch_hole(c * cs, cs),
            )?;
            self.free_hint = self.free_hint.min(c);
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

    /// Replace the in-memory refcount table (after a rebuild wrote a new one).
    pub(crate) fn reset_refcounts(&mut self, table: Vec<u64>) {
        self.refblock_clusters = cluster_set(&table, REFTABLE_OFFSET_MASK, self.h.cluster_bits);
        self.reftable = table;
        if let Ok(end) = self.file_clusters() {
            self.alloc_end = self.alloc_end.max(end);
        }
        self.reftable_dirty = false;
        let cap = self.refblocks_capacity();
        self.refblocks = TableCache::new(cap);
        self.free_hint = 1;
    }

    fn refblocks_capacity(&self) -> usize {
        (CACHE_MAX_BYTES / self.cluster_size()).clamp(16, 1024) as usize
    }

    /// The storage the metadata lives on.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
}
