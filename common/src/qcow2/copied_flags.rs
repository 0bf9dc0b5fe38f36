//! COPIED flags: set on an active L1 or L2 entry exactly where the refcount of the
//! cluster it points at is 1 (never on a compressed entry), as QEMU keeps them and
//! `qemu-img check` demands.

use super::entry::{self, L2Entry, COPIED};
use super::l2::{decode_entry, encode_entry};
use super::meta::Meta;
use super::refcount_switch::RefChange;
use super::units::{ClusterCount, HostOffset};
use crate::error::{io, Result};

impl Meta {
    /// Set COPIED in the entries of the L2 table `table` exactly where the refcount after
    /// `change` is 1; says whether any entry changed.
    fn set_copied_flags(&mut self, table: &mut [u8], change: &RefChange) -> Result<bool> {
        let g = self.geo();
        let ext = g.extended_l2;
        let mut changed = false;
        for i in 0..g.l2_entries() as usize {
            let e = decode_entry(table, i, ext);
            let word = match e.host_cluster() {
                _ if e.is_compressed() => e.word & !COPIED,
                Some(h) if self.refcount_after(g.host_cluster(h), change)? == 1 => e.word | COPIED,
                Some(_) => e.word & !COPIED,
                None => e.word,
            };
            if word != e.word {
                encode_entry(table, i, ext, L2Entry { word, ..e });
                changed = true;
            }
        }
        Ok(changed)
    }

    /// L1 entry `raw`, naming table `t`, with COPIED set exactly if the refcount of `t`
    /// after `change` is 1.
    fn l1_entry_after(&mut self, raw: u64, t: HostOffset, change: &RefChange) -> Result<u64> {
        let c = self.geo().host_cluster(t);
        Ok(if self.refcount_after(c, change)? == 1 {
            raw | COPIED
        } else {
            raw & !COPIED
        })
    }

    /// Set COPIED on the active L1 and L2 entries exactly where the refcount is 1, in
    /// place (QEMU's `update_snapshot_refcount(.., 0)`).
    pub(super) fn fix_copied(&mut self) -> Result<()> {
        let g = self.geo();
        let none = RefChange::new(g.refblock_bits());
        for idx in 0..self.l1.entries.len() {
            let raw = self.l1.entries[idx];
            let Some(t) = entry::l1_table_offset(raw, g.cluster_size())? else {
                continue;
            };
            let l1e = self.l1_entry_after(raw, t, &none)?;
            if l1e != raw {
                self.l1.entries[idx] = l1e;
                self.l1.dirty = true;
            }
            let mut table = self.l2_bytes(t)?;
            if self.set_copied_flags(&mut table, &none)? {
                self.l2_replace(t, &table)?;
            }
        }
        Ok(())
    }

    /// The active L1 table as it must read once `change` is applied, its L2 tables written
    /// copy-on-write: a table whose COPIED flags change is copied, flags right, to a new
    /// cluster (the original stays as it is for the snapshots that share it, and the
    /// active's reference to it moves to `change.sub`), and each L1 entry gets COPIED
    /// where its table's refcount will be 1 (a copy's is). Nothing the image references
    /// now is written.
    pub(super) fn active_tables_after(&mut self, change: &mut RefChange) -> Result<Vec<u64>> {
        let g = self.geo();
        let cs = g.cluster_size();
        let mut l1 = self.l1.entries.clone();
        for e in l1.iter_mut() {
            let Some(t) = entry::l1_table_offset(*e, cs)? else {
                continue;
            };
            let mut table = self.l2_bytes(t)?;
            if self.set_copied_flags(&mut table, change)? {
                let copy = g.host_offset(self.alloc_clusters(ClusterCount(1))?);
                io(
                    "Could not write L2 table",
                    self.storage().write_at(&table, copy.0),
                )?;
                change.sub.add(g.clusters_touched(t, cs), 1);
                *e = copy.0 | COPIED;
            } else {
                *e = self.l1_entry_after(*e, t, change)?;
            }
        }
        Ok(l1)
    }
}
