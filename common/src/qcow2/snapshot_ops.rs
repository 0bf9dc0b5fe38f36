//! Internal snapshots: create, apply and delete, as QEMU's `qcow2-snapshot.c` does them.
//!
//! Crash safety: refcount increments are durable before any table points at what they
//! count; rewriting the header (nb_snapshots, snapshots_offset, or the active L1) is the
//! commit point; what stopped being referenced is freed after it, deferred to the flush
//! that follows. A crash may leak clusters, never lose a reference.

use super::entry::{self, L2Entry, COPIED};
use super::meta::{read_u64_table, Meta};
use super::snapshot::{self, Snapshot};
use super::units::HostOffset;
use super::walker::L1Source;
use super::Qcow2Image;
use crate::error::{io, Error, Result};

fn encode_u64_table(t: &[u64]) -> Vec<u8> {
    t.iter().flat_map(|v| v.to_be_bytes()).collect()
}

/// Wall-clock time as (seconds, nanoseconds), at microsecond precision as QEMU records it.
fn now() -> (u32, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as u32, d.subsec_micros() * 1000)
}

impl Meta {
    /// Set COPIED on the active L1 and L2 entries exactly where the refcount of what they
    /// point at is 1 (QEMU's `update_snapshot_refcount(.., 0)`); never on compressed ones.
    fn fix_copied(&mut self) -> Result<()> {
        let g = self.geo();
        for idx in 0..self.l1.entries.len() {
            let raw = self.l1.entries[idx];
            let Some(t) = entry::l1_table_offset(raw, g.cluster_size())? else {
                continue;
            };
            let l1e = if self.refcount(g.host_cluster(t))? == 1 {
                raw | COPIED
            } else {
                raw & !COPIED
            };
            if l1e != raw {
                self.l1.entries[idx] = l1e;
                self.l1.dirty = true;
            }
            for i in 0..g.l2_entries() as usize {
                let e = self.l2_get(t, i)?;
                let word = match e.host_cluster() {
                    _ if e.is_compressed() => e.word & !COPIED,
                    Some(h) if self.refcount(g.host_cluster(h))? == 1 => e.word | COPIED,
                    Some(_) => e.word & !COPIED,
                    None => e.word,
                };
                if word != e.word {
                    self.l2_set(t, i, L2Entry { word, ..e })?;
                }
            }
        }
        Ok(())
    }

    /// Write `table` to new clusters and switch the header to it (the commit point); the
    /// old table is freed at the next flush. Everything the table points at must be durable.
    pub(super) fn write_snapshot_table(
        &mut self,
        old: &[Snapshot],
        table: &[Snapshot],
    ) -> Result<()> {
        let g = self.geo();
        let bytes = snapshot::try_encode_table(table)?;
        let offset = if bytes.is_empty() {
            0
        } else {
            let first = self.alloc_clusters(g.clusters_for(bytes.len() as u64))?;
            self.write_refcounts()?;
            self.sync()?;
            let off = g.host_offset(first).0;
            io(
                "Could not write snapshot table",
                self.storage().write_at(&bytes, off),
            )?;
            self.sync()?;
            off
        };
        let (old_off, old_len) = (self.h.snapshots_offset, snapshot::encoded_len(old));
        self.h.nb_snapshots = table.len() as u32;
        self.h.snapshots_offset = offset;
        self.write_header()?;
        self.sync()?;
        if old_len > 0 {
            let first = g.host_cluster(HostOffset(old_off));
            self.refs.defer(first, g.clusters_for(old_len), -1);
        }
        Ok(())
    }

    /// The snapshot table, for editing.
    pub(super) fn snapshot_table(&self) -> Result<Vec<Snapshot>> {
        snapshot::read_table(&**self.storage(), &self.h)
    }

    /// The L1 table of snapshot `sn`.
    fn snapshot_l1(&self, sn: &Snapshot) -> Result<Vec<u64>> {
        read_u64_table(
            &**self.storage(),
            sn.l1_table_offset,
            sn.l1_size as usize,
            "Could not read snapshot L1 table",
        )
    }

    /// Take a snapshot of the active L1 named `name`, with the next free numeric ID.
    fn snapshot_create(&mut self, name: &str) -> Result<()> {
        self.flush()?;
        let old = self.snapshot_table()?;
        if old.len() >= super::header::MAX_SNAPSHOTS as usize {
            return Err(Error::invalid("Too many snapshots"));
        }
        let g = self.geo();
        let active: Vec<u64> = self.l1.entries.clone();
        let counts = self.table_refs(L1Source::Active, self.h.l1_table_offset, &active)?;
        self.add_refs(&counts)?;
        let l1_copy: Vec<u64> = active.iter().map(|e| e & !COPIED).collect();
        let l1_offset = if l1_copy.is_empty() {
            0
        } else {
            let first = self.alloc_clusters(g.clusters_for(l1_copy.len() as u64 * 8))?;
            let off = g.host_offset(first).0;
            io(
                "Could not write snapshot L1 table",
                self.storage().write_at(&encode_u64_table(&l1_copy), off),
            )?;
            off
        };
        self.fix_copied()?;
        // Refcounts first, then the L2 and L1 tables without COPIED, all durable.
        self.flush()?;
        let id = old
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let (date_sec, date_nsec) = now();
        let mut table = old.clone();
        table.push(Snapshot {
            l1_table_offset: l1_offset,
            l1_size: l1_copy.len() as u32,
            id: id.to_string(),
            name: name.to_string(),
            date_sec,
            date_nsec,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.h.size),
            // qemu-img zeroes the whole entry, icount included.
            icount: Some(0),
            unknown_extra: Vec::new(),
        });
        self.write_snapshot_table(&old, &table)?;
        self.flush()
    }

    /// Remove snapshot `index` of the table and drop what it referenced.
    fn snapshot_delete(&mut self, index: usize) -> Result<()> {
        self.flush()?;
        let old = self.snapshot_table()?;
        let sn = old[index].clone();
        let l1 = self.snapshot_l1(&sn)?;
        let mut counts = self.table_refs(L1Source::Snapshot(index), sn.l1_table_offset, &l1)?;
        let g = self.geo();
        let l1_bytes = u64::from(sn.l1_size) * 8;
        counts.add(
            g.clusters_touched(HostOffset(sn.l1_table_offset), l1_bytes),
            1,
        );
        let mut table = old.clone();
        table.remove(index);
        self.write_snapshot_table(&old, &table)?;
        self.drop_refs(&counts);
        self.flush()?;
        self.fix_copied()?;
        self.flush()
    }

    /// Make the active L1 a copy of snapshot `index`'s, and the virtual size its disk size.
    fn snapshot_apply(&mut self, index: usize) -> Result<()> {
        self.flush()?;
        let sn = self.snapshot_table()?[index].clone();
        let g = self.geo();
        let size = sn.disk_size.unwrap_or(self.h.size);
        let mut entries = (self.l1.entries.len() as u64).max(u64::from(sn.l1_size));
        if size > self.h.size {
            entries = entries.max(g.l1_entries_for(size));
        }
        self.grow_l1(entries)?;
        let mut l1: Vec<u64> = self.snapshot_l1(&sn)?;
        l1.iter_mut().for_each(|e| *e &= !COPIED);
        l1.resize(self.l1.entries.len(), 0);
        let new_counts = self.table_refs(L1Source::Snapshot(index), sn.l1_table_offset, &l1)?;
        let active = self.l1.entries.clone();
        let old_counts = self.table_refs(L1Source::Active, self.h.l1_table_offset, &active)?;
        self.add_refs(&new_counts)?;
        self.write_refcounts()?;
        self.sync()?;
        if size != self.h.size {
            self.h.size = size;
            self.write_header()?;
            self.sync()?;
        }
        self.l1.entries = l1;
        self.l1.dirty = true;
        self.overlap.set_l2(&self.l1.entries, g);
        self.write_l1()?;
        self.sync()?;
        self.drop_refs(&old_counts);
        self.flush()?;
        self.fix_copied()?;
        self.flush()
    }
}

/// Which internal snapshot to read an image as (the forms of `qemu-img convert -l`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotKey {
    /// An ID, else a name.
    IdOrName(String),
    /// The snapshot with this ID and (or) this name.
    Exact {
        id: Option<String>,
        name: Option<String>,
    },
}

/// The index of the snapshot whose ID is `key`, else the first whose name is (QEMU's
/// `find_snapshot_by_id_or_name`).
fn by_id_or_name(table: &[Snapshot], key: &str) -> Option<usize> {
    table
        .iter()
        .position(|s| s.id == key)
        .or_else(|| table.iter().position(|s| s.name == key))
}

impl Qcow2Image {
    /// Take an internal snapshot named `name` (names need not be unique, as in QEMU).
    pub fn snapshot_create(&self, name: &str) -> Result<()> {
        self.with_meta_exclusive(|m| m.snapshot_create(name))
    }

    /// Delete the first snapshot named `name`.
    pub fn snapshot_delete(&self, name: &str) -> Result<()> {
        self.with_meta_exclusive(|m| {
            let table = m.snapshot_table()?;
            let i = table
                .iter()
                .position(|s| s.name == name)
                .ok_or_else(|| Error::NotFound("snapshot not found".into()))?;
            m.snapshot_delete(i)
        })
    }

    /// Read the image as snapshot `key` from now on, without changing the file (QEMU's
    /// `bdrv_snapshot_load_tmp`): the snapshot's L1 table and disk size take the place of
    /// the active ones in memory. Read-only images only.
    pub fn load_snapshot(&self, key: &SnapshotKey) -> Result<()> {
        if !self.read_only {
            return Err(Error::invalid(
                "Device is writable, cannot load an internal snapshot",
            ));
        }
        let mut m = self.meta();
        let table = m.snapshot_table()?;
        let found = match key {
            SnapshotKey::IdOrName(k) => by_id_or_name(&table, k),
            SnapshotKey::Exact { id, name } if id.is_some() || name.is_some() => {
                table.iter().position(|s| {
                    id.as_ref().is_none_or(|i| &s.id == i)
                        && name.as_ref().is_none_or(|n| &s.name == n)
                })
            }
            SnapshotKey::Exact { .. } => None,
        };
        let sn = &table[found.ok_or_else(|| Error::NotFound("Can't find snapshot".into()))?];
        m.l1.entries = m.snapshot_l1(sn)?;
        m.h.size = sn.disk_size.unwrap_or(m.h.size);
        Ok(())
    }

    /// Revert the image to the snapshot whose ID, or else name, is `key`.
    pub fn snapshot_apply(&self, key: &str) -> Result<()> {
        self.with_meta_exclusive(|m| {
            let table = m.snapshot_table()?;
            let i = by_id_or_name(&table, key).ok_or_else(|| {
                Error::NotFound("Failed to load snapshot: No such file or directory".into())
            })?;
            m.snapshot_apply(i)
        })
    }
}
