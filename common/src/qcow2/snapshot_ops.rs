//! Internal snapshots: create, apply and delete, as QEMU's `qcow2-snapshot.c` does them.
//!
//! Crash safety: create and delete write everything they change copy-on-write (the
//! snapshot and active L1 tables, the active L2 tables whose COPIED flags change, the
//! snapshot table and the refcount blocks) and switch to it with one header write
//! (`refcount_switch`): a crash leaves the image as before or as after, at worst with
//! leaked clusters. Apply raises refcounts before the active L1 points at what they
//! count and lowers them after, deferred to the flush that follows.

use super::entry::COPIED;
use super::meta::{encode_u64_table, read_u64_table, Meta};
use super::refcount_switch::RefChange;
use super::snapshot::{self, Snapshot};
use super::units::HostOffset;
use super::walker::L1Source;
use super::Qcow2Image;
use crate::error::{io, Error, Result};

/// Wall-clock time as (seconds, nanoseconds), at microsecond precision as QEMU records it.
fn now() -> (u32, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as u32, d.subsec_micros() * 1000)
}

impl Meta {
    /// Write `table` to new clusters and switch the header to it (the commit point); the
    /// old table is freed at the next flush. Everything the table points at must be durable.
    pub(super) fn write_snapshot_table(
        &mut self,
        old: &[Snapshot],
        table: &[Snapshot],
    ) -> Result<()> {
        let g = self.geo();
        let bytes = snapshot::try_encode_table(table)?;
        let offset = self.write_new(&bytes, "Could not write snapshot table")?;
        self.write_refcounts()?;
        self.sync()?;
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

    /// `bytes` in newly allocated clusters; their offset (0 for no bytes).
    fn write_new(&mut self, bytes: &[u8], what: &str) -> Result<u64> {
        if bytes.is_empty() {
            return Ok(0);
        }
        let g = self.geo();
        let off = g.host_offset(self.alloc_clusters(g.clusters_for(bytes.len() as u64))?);
        io(what, self.storage().write_at(bytes, off.0))?;
        Ok(off.0)
    }

    /// Switch in one header write (see the module) to the active L1 `l1`, whose tables
    /// are written, the snapshot table `table` (replacing `old`) and the refcounts after
    /// `change`; then free the old active L1 and snapshot table.
    fn switch_snapshots(
        &mut self,
        old: &[Snapshot],
        table: &[Snapshot],
        l1: Vec<u64>,
        change: &RefChange,
    ) -> Result<()> {
        let g = self.geo();
        let old_l1 = g.clusters_touched(
            HostOffset(self.h.l1_table_offset),
            u64::from(self.h.l1_size) * 8,
        );
        let l1_offset = match self.write_new(&encode_u64_table(&l1), "Could not write L1 table")? {
            0 => self.h.l1_table_offset,
            off => off,
        };
        let snapshots = snapshot::try_encode_table(table)?;
        let snapshots_offset = self.write_new(&snapshots, "Could not write snapshot table")?;
        let old_snapshots = g.clusters_touched(
            HostOffset(self.h.snapshots_offset),
            snapshot::encoded_len(old),
        );
        self.switch_refcounts(change, |h| {
            h.l1_table_offset = l1_offset;
            h.nb_snapshots = table.len() as u32;
            h.snapshots_offset = snapshots_offset;
        })?;
        self.overlap.set_l2(&l1, g);
        self.l1.entries = l1;
        self.l1.dirty = false;
        self.free_now(old_l1)?;
        self.free_now(old_snapshots)?;
        self.flush()
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
        // The snapshot takes the active L2 tables and one more reference to their data;
        // the active image gets copies of the tables without COPIED flags.
        let mut change = RefChange::new(g.refblock_bits());
        change.add = self.table_refs(L1Source::Active, self.h.l1_table_offset, &active)?;
        self.refs_fit(&change.add)?;
        let l1_copy: Vec<u64> = active.iter().map(|e| e & !COPIED).collect();
        let l1_offset = self.write_new(
            &encode_u64_table(&l1_copy),
            "Could not write snapshot L1 table",
        )?;
        let l1 = self.active_tables_after(&mut change)?;
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
        self.switch_snapshots(&old, &table, l1, &change)
    }

    /// Remove snapshot `index` of the table and drop what it referenced.
    fn snapshot_delete(&mut self, index: usize) -> Result<()> {
        self.flush()?;
        let old = self.snapshot_table()?;
        let sn = old[index].clone();
        let l1 = self.snapshot_l1(&sn)?;
        let g = self.geo();
        let mut change = RefChange::new(g.refblock_bits());
        change.sub = self.table_refs(L1Source::Snapshot(index), sn.l1_table_offset, &l1)?;
        let l1_bytes = u64::from(sn.l1_size) * 8;
        change.sub.add(
            g.clusters_touched(HostOffset(sn.l1_table_offset), l1_bytes),
            1,
        );
        let active = self.active_tables_after(&mut change)?;
        let mut table = old.clone();
        table.remove(index);
        self.switch_snapshots(&old, &table, active, &change)
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
