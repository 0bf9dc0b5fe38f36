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
        let (add, sub) = (change.add.get(c), change.sub.get(c));
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

    /// Apply `change` to the refcounts and `edit` to the header in one header write (see
    /// the module). Everything the edited header points at must be written already.
    pub(super) fn switch_refcounts(
        &mut self,
        change: &RefChange,
        edit: impl FnOnce(&mut Header),
    ) -> Result<()> {
        let g = self.geo();
        let cs = g.cluster_size();
        let per_rb = 1u64 << g.refblock_bits();
        let blocks = change.blocks();
        // Every count is checked before anything is written.
        let mut freed: Vec<Range<u64>> = Vec::new();
        for &rbi in &blocks {
            for c in (rbi * per_rb..(rbi + 1) * per_rb).map(HostCluster) {
                let changed = change.add.get(c) + change.sub.get(c) > 0;
                if changed && self.refcount_after(c, change)? == 0 {
                    match freed.last_mut() {
                        Some(r) if r.end == c.0 => r.end += 1,
                        _ => freed.push(c.0..c.0 + 1),
                    }
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
            let base = HostCluster(rbi * per_rb);
            let mut block = match self.refblock_offset(rbi as usize)? {
                Some(off) => {
                    replaced.push(g.host_cluster(off));
                    self.refblock_bytes(off)?
                }
                None => vec![0u8; cs as usize],
            };
            for slot in 0..per_rb {
                let c = base.plus(slot);
                if change.add.get(c) + change.sub.get(c) > 0 {
                    let n = self.refcount_after(c, change)?;
                    refcount::set(&mut block, g.refcount_order, slot as usize, n);
                }
            }
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
