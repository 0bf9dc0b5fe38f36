//! Rebuilding the refcount structures from the metadata that references clusters.
//!
//! Used when a lazy-refcounts image was not closed cleanly (the dirty bit is set): the
//! references are counted from the header, L1/L2 tables (active and snapshots) and the
//! snapshot table, and a fresh refcount table with its blocks is written past the end of
//! the file. The old refcount structures are not referenced any more and become free.

use std::collections::BTreeMap;

use super::entry::{self, CompressedRun, L2Entry};
use super::header::INCOMPAT_DIRTY;
use super::meta::Meta;
use super::refcount;
use super::snapshot;
use crate::error::{io, Error, Result};

/// Reference counts by host cluster index.
pub(crate) type Counts = BTreeMap<u64, u64>;

impl Meta {
    fn count_range(&self, counts: &mut Counts, offset: u64, bytes: u64, limit: u64) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let cb = self.h.cluster_bits;
        let first = offset >> cb;
        let last = (offset + bytes - 1) >> cb;
        if last >= limit {
            return Err(Error::corrupt(format!(
                "metadata at offset {offset:#x} lies beyond the end of the image file"
            )));
        }
        for c in first..=last {
            *counts.entry(c).or_insert(0) += 1;
        }
        Ok(())
    }

    /// Count the references of one L1 table and everything below it. An L2 table that
    /// several L1 entries point at is read and counted once, times its number of uses.
    fn count_l1(&self, counts: &mut Counts, l1: &[u64], limit: u64) -> Result<()> {
        let cs = self.cluster_size();
        let cb = self.h.cluster_bits;
        let ext = self.h.extended_l2();
        let storage = self.storage().clone();
        let mut uses: BTreeMap<u64, u64> = BTreeMap::new();
        for &l1e in l1 {
            if let Some(l2) = entry::l1_table_offset(l1e, cs)? {
                *uses.entry(l2.0).or_insert(0) += 1;
            }
        }
        let mut table = vec![0u8; cs as usize];
        let mut here = Counts::new();
        for (&l2, &n) in &uses {
            here.clear();
            self.count_range(&mut here, l2, cs, limit)?;
            io("Could not read L2 table", storage.read_at(&mut table, l2))?;
            let step = if ext { 16 } else { 8 };
            for raw in table.chunks_exact(step) {
                let e = L2Entry {
                    word: u64::from_be_bytes(raw[..8].try_into().unwrap()),
                    bitmap: if ext {
                        u64::from_be_bytes(raw[8..16].try_into().unwrap())
                    } else {
                        0
                    },
                };
                e.validate(cs, ext)?;
                if e.is_compressed() {
                    let run = CompressedRun::decode(e.word, cb);
                    self.count_range(&mut here, run.offset, run.len.min(1 << cb), limit)?;
                } else if let Some(h) = e.host_cluster() {
                    self.count_range(&mut here, h.0, cs, limit)?;
                }
            }
            for (&c, &k) in &here {
                *counts.entry(c).or_insert(0) += k * n;
            }
        }
        Ok(())
    }

    /// Count every reference in the image except those of the refcount structures.
    pub(crate) fn count_references(&self) -> Result<Counts> {
        let cs = self.cluster_size();
        let storage = self.storage().clone();
        let file_len = io("Could not get image file length", storage.len())?;
        let limit = file_len.div_ceil(cs);
        let mut counts = Counts::new();
        self.count_range(&mut counts, 0, cs, limit.max(1))?;
        self.count_range(
            &mut counts,
            self.h.l1_table_offset,
            u64::from(self.h.l1_size) * 8,
            limit,
        )?;
        self.count_l1(&mut counts, &self.l1, limit)?;
        let snaps = snapshot::read_table(&*storage, &self.h)?;
        if !snaps.is_empty() {
            self.count_range(
                &mut counts,
                self.h.snapshots_offset,
                snapshot::encoded_len(&snaps),
                limit,
            )?;
        }
        for s in &snaps {
            let bytes = u64::from(s.l1_size) * 8;
            if bytes > super::header::MAX_L1_BYTES {
                return Err(Error::corrupt("Snapshot L1 table too large"));
            }
            self.count_range(&mut counts, s.l1_table_offset, bytes, limit)?;
            let mut buf = vec![0u8; bytes as usize];
            io(
                "Could not read snapshot L1 table",
                storage.read_at(&mut buf, s.l1_table_offset),
            )?;
            let l1: Vec<u64> = buf
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                .collect();
            self.count_l1(&mut counts, &l1, limit)?;
        }
        Ok(counts)
    }

    /// Replace the refcount structures by ones built from the references, and clear the
    /// dirty bit. The new structures go past the end of the file.
    pub(crate) fn rebuild_refcounts(&mut self) -> Result<()> {
        let mut counts = self.count_references()?;
        let cs = self.cluster_size();
        let per_rb = 1u64 << (self.h.cluster_bits + 3 - self.h.refcount_order);
        let file_clusters =
            io("Could not get image file length", self.storage().len())?.div_ceil(cs);
        let start = file_clusters.max(counts.keys().next_back().map_or(0, |c| c + 1));
        // Find how many refcount blocks and table clusters are needed to describe
        // everything including themselves.
        let mut blocks = 0u64;
        let mut table_clusters = 1u64;
        loop {
            let end = start + blocks + table_clusters;
            let mut indexes: Vec<u64> = counts.keys().map(|c| c / per_rb).collect();
            indexes.extend((start..end).map(|c| c / per_rb));
            indexes.dedup();
            let need_blocks = indexes.len() as u64;
            let need_table = ((end - 1) / per_rb + 1).saturating_mul(8).div_ceil(cs);
            if need_blocks == blocks && need_table == table_clusters {
                break;
            }
            blocks = need_blocks;
            table_clusters = need_table.max(1);
        }
        if table_clusters * cs > super::header::MAX_REFTABLE_BYTES {
            return Err(Error::corrupt("rebuilt refcount table would be too large"));
        }
        let table_start = start + blocks;
        let end = table_start + table_clusters;
        for c in start..end {
            *counts.entry(c).or_insert(0) += 1;
        }
        let max = refcount::max_value(self.h.refcount_order);
        let mut table = vec![0u64; (table_clusters * cs / 8) as usize];
        let mut index_list: Vec<u64> = counts.keys().map(|c| c / per_rb).collect();
        index_list.dedup();
        let storage = self.storage().clone();
        for (j, &rbi) in index_list.iter().enumerate() {
            let off = (start + j as u64) * cs;
            table[rbi as usize] = off;
            let mut block = vec![0u8; cs as usize];
            for (&c, &n) in counts.range(rbi * per_rb..(rbi + 1) * per_rb) {
                if n > max {
                    return Err(Error::corrupt(format!(
                        "cluster {c} has too many references"
                    )));
                }
                refcount::set(&mut block, self.h.refcount_order, (c % per_rb) as usize, n);
            }
            io(
                "Could not write refcount block",
                storage.write_at(&block, off),
            )?;
        }
        let bytes: Vec<u8> = table.iter().flat_map(|v| v.to_be_bytes()).collect();
        io(
            "Could not write refcount table",
            storage.write_at(&bytes, table_start * cs),
        )?;
        io("Could not flush image file", storage.flush())?;
        self.h.refcount_table_offset = table_start * cs;
        self.h.refcount_table_clusters = table_clusters as u32;
        self.h.incompatible_features &= !INCOMPAT_DIRTY;
        self.write_header()?;
        io("Could not flush image file", storage.flush())?;
        self.reset_refcounts(table);
        Ok(())
    }
}
