//! Refcount changes that take effect in the same instant as a header change, written
//! copy-on-write. Snapshot create and delete need this: qcow2 wants an active entry's
//! COPIED flag set exactly when its cluster's refcount is 1, and no write order changes a
//! flag in an L2 table and a count in a refcount block at once.
//!
//! The refcount blocks the change touches are copied into new clusters with the change
//! applied, a new refcount table points at the copies (and at every untouched block), and
//! one header write switches to that table together with the caller's own header edit
//! (new L1 and snapshot tables, written copy-on-write as well). Before that write the old
//! image is intact on disk (the new clusters merely leak); after it the new one is
//! consistent; the old table and the replaced blocks are freed afterwards.

use std::collections::BTreeSet;
use std::ops::Range;

use super::allocator::When;
use super::counts::ClusterCounts;
use super::header::Header;
use super::meta::Meta;
use super::refcount;
use super::units::{ClusterCount, HostCluster, HostOffset};
use crate::error::{io, Error, Result, Structure};

/// A change of refcounts: `add` added to the stored counts and `sub` taken off them, both
/// kept in chunks of one refcount block's clusters.
pub(super) struct RefChange {
    pub add: ClusterCounts,
    pub sub: ClusterCounts,
}

impl RefChange {
    /// No change, in chunks of `refblock_bits`.
    pub fn new(refblock_bits: u32) -> RefChange {
        RefChange {
            add: ClusterCounts::new(refblock_bits),
            sub: ClusterCounts::new(refblock_bits),
        }
    }

    /// The refcount table indexes of the blocks the change touches.
    fn blocks(&self) -> BTreeSet<u64> {
        let idx = |c: &ClusterCounts| c.chunks().map(|(i, _)| i).collect::<Vec<_>>();
        idx(&self.add).into_iter().chain(idx(&self.sub)).collect()
    }
}

impl Meta {
    /// The refcount of `c` once `change` is applied: refused if it would drop below zero
    /// (the stored counts are corrupt) or overflow the refcount width.
    pub(super) fn refcount_after(&mut self, c: HostCluster, change: &RefChange) -> Result<u64> {
        let stored = self.refcount(c)?;
        self.count_after(c, stored, change.add.get(c), change.sub.get(c))
    }

    /// `stored + add - sub`, the refcount of `c` after a change, checked as
    /// [`Meta::refcount_after`] says.
    fn count_after(&self, c: HostCluster, stored: u64, add: u64, sub: u64) -> Result<u64> {
        let Some(n) = (stored + add).checked_sub(sub) else {
            let block = self.refs.table.get(self.geo().reftable_index(c)).copied();
            return Err(Error::corrupt_at(
                Structure::RefcountBlock,
                block.unwrap_or(0) & super::overlap::REFTABLE_OFFSET_MASK,
                format!("refcount of cluster {} would drop below zero", c.0),
            ));
        };
        if n > refcount::max_value(self.h.refcount_order) {
            return Err(Error::invalid(format!(
                "refcount of cluster {} would overflow {} bits",
                c.0,
                self.h.refcount_bits()
            )));
        }
        Ok(n)
    }

    /// Refcount block `rbi` as stored (zeroes where the table has none), with `change`
    /// applied, and the clusters whose count it drops to zero.
    fn block_after(&mut self, rbi: u64, change: &RefChange) -> Result<(Vec<u8>, Vec<u64>)> {
        let g = self.geo();
        let mut block = match self.refblock_offset(rbi as usize)? {
            Some(off) => self.refblock_bytes(off)?,
            None => vec![0u8; g.cluster_size() as usize],
        };
        let count = |c: &ClusterCounts, slot: usize| c.chunk(rbi).map_or(0, |s| u64::from(s[slot]));
        let mut freed = Vec::new();
        for slot in 0..1usize << g.refblock_bits() {
            let (add, sub) = (count(&change.add, slot), count(&change.sub, slot));
            if add + sub == 0 {
                continue;
            }
            let c = HostCluster((rbi << g.refblock_bits()) + slot as u64);
            let stored = refcount::get(&block, g.refcount_order, slot);
            let n = self.count_after(c, stored, add, sub)?;
            refcount::set(&mut block, g.refcount_order, slot, n);
            if n == 0 {
                freed.push(c.0);
            }
        }
        Ok((block, freed))
    }

    /// Apply `change` to the refcounts and `edit` to the header in one header write (see
    /// the module). Everything the edited header points at must be written already.
    pub(super) fn switch_refcounts(
        &mut self,
        change: &RefChange,
        edit: impl FnOnce(&mut Header),
    ) -> Result<()> {
        let g = self.geo();
        let cs = g.cluster_size();
        let blocks = change.blocks();
        // Every count is checked before anything is written.
        let mut freed: Vec<Range<u64>> = Vec::new();
        for &rbi in &blocks {
            for c in self.block_after(rbi, change)?.1 {
                match freed.last_mut() {
                    Some(r) if r.end == c => r.end += 1,
                    _ => freed.push(c..c + 1),
                }
            }
        }
        // The block copies and the table, in one run of new clusters; the run itself may
        // make the live table grow, then the new one must be larger.
        let k = blocks.len() as u64;
        let entries = |m: &Meta| {
            let last = blocks.last().map_or(0, |&i| i + 1);
            (m.refs.table.len() as u64).max(last)
        };
        let (first, table_clusters) = loop {
            let t = (entries(self) * 8).div_ceil(cs).max(1);
            let first = self.alloc_clusters(ClusterCount(k + t))?;
            if entries(self) * 8 <= t * cs {
                break (first, t);
            }
            self.update_refcount(first, ClusterCount(k + t), -1, When::Now)?;
        };
        // The old image, new clusters counted as leaks, is durable before any copy.
        self.write_refcounts()?;
        self.sync()?;
        let mut table = self.refs.table.clone();
        table.resize((table_clusters * cs / 8) as usize, 0);
        let mut replaced = Vec::new();
        for (j, &rbi) in blocks.iter().enumerate() {
            if let Some(off) = self.refblock_offset(rbi as usize)? {
                replaced.push(g.host_cluster(off));
            }
            // Again on the blocks as they are now, the new clusters counted.
            let (block, _) = self.block_after(rbi, change)?;
            let off = g.host_offset(first.plus(j as u64)).0;
            io(
                "Could not write refcount block",
                self.storage().write_at(&block, off),
            )?;
            table[rbi as usize] = off;
        }
        let old_table = (
            g.host_cluster(HostOffset(self.h.refcount_table_offset)),
            ClusterCount(u64::from(self.h.refcount_table_clusters)),
        );
        let table_off = g.host_offset(first.plus(k)).0;
        self.install_refcount_table(table, table_off, table_clusters, edit)?;
        // Nothing points at the old table and blocks any more.
        self.update_refcount(old_table.0, old_table.1, -1, When::Now)?;
        for c in replaced {
            self.update_refcount(c, ClusterCount(1), -1, When::Now)?;
        }
        for r in freed {
            self.release(r)?;
        }
        Ok(())
    }
}
