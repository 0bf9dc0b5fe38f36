//! `bitmap`: add, remove, clear, enable, disable and merge persistent dirty bitmaps, with
//! QEMU's rules and words (`block/monitor/bitmap-qmp-cmds.c`, `qcow2-bitmap.c`).
//!
//! The operations of one call apply in order to the directory in memory; what they
//! changed is then stored at once. Crash safety: new bitmap data, tables and directory
//! are written with their refcounts durable before the header names them; rewriting the
//! header (the bitmaps extension and its autoclear bit) is the commit point; clusters
//! that nothing references any more are freed after it, deferred to the flush. A crash
//! leaks clusters at worst.
//!
//! Guest writes are recorded as QEMU records them: before the first one, the enabled
//! bitmaps are marked in use on disk (so a crash leaves them inconsistent, never
//! silently stale); the written ranges are kept in memory ([`DirtyLog`]) and set in the
//! bitmaps when the image is closed, which stores them consistent again.

use std::sync::atomic::Ordering;

use super::bitmap_data::{clusters_of, Bits};
use super::bitmaps::{self, DirEntry, Extension, FLAG_AUTO, FLAG_IN_USE};
use super::header::Header;
use super::meta::Meta;
use super::units::HostOffset;
use super::Qcow2Image;
use crate::error::{io, Error, Result};
use crate::ops::{BitmapEdit, BitmapOp, BitmapOpError};
use crate::storage::Storage;

/// A bitmap while the operations run: its directory entry and, when its bits change,
/// the new bits to store.
struct Slot {
    entry: DirEntry,
    bits: Option<Bits>,
    /// The entry is in the directory on disk (its clusters are freed when it goes).
    on_disk: bool,
}

/// Where a merge reads its source bitmap.
pub enum Source<'a> {
    /// The image being edited.
    This,
    /// Another qcow2 image.
    Other {
        storage: &'a dyn Storage,
        header: Box<Header>,
    },
    /// An image of a format without bitmaps.
    NoBitmaps,
}

/// Guest bytes written while enabled bitmaps were in use, to set in them at close: a
/// bitmap of its own at the finest of their granularities (memory as QEMU's).
pub(crate) struct DirtyLog {
    /// The bitmaps marked in use for this log.
    names: Vec<String>,
    written: Bits,
}

impl DirtyLog {
    /// Record a write of `len` bytes at `offset`.
    fn add(&mut self, offset: u64, len: u64) {
        self.written.mark(offset, offset.saturating_add(len.max(1)));
    }
}

fn not_found(name: &str) -> Error {
    Error::NotFound(format!("Dirty bitmap '{name}' not found"))
}

fn inconsistent(name: &str) -> Error {
    Error::invalid(format!(
        "Bitmap '{name}' is inconsistent and cannot be used\n\
         Try block-dirty-bitmap-remove to delete this bitmap from disk"
    ))
}

/// QEMU's default granularity: the cluster size, within 4 KiB..64 KiB.
fn default_granularity(cluster_size: u64) -> u64 {
    cluster_size.clamp(4096, 65536)
}

/// The operations' state.
struct Edit<'a> {
    slots: Vec<Slot>,
    /// Bitmaps removed from the directory on disk.
    dropped: Vec<DirEntry>,
    changed: bool,
    node: &'a str,
}

impl Edit<'_> {
    fn find(&self, name: &str) -> Result<usize> {
        self.slots
            .iter()
            .position(|s| s.entry.name == name)
            .ok_or_else(|| not_found(name))
    }

    /// The bitmap of slot `i` as a consistent, usable one.
    fn usable(&self, i: usize) -> Result<()> {
        let e = &self.slots[i].entry;
        if e.in_use() {
            return Err(inconsistent(&e.name));
        }
        Ok(())
    }

    /// The current bits of slot `i`, loaded from the image when they did not change.
    fn bits(&mut self, m: &Meta, i: usize) -> Result<Bits> {
        if let Some(b) = &self.slots[i].bits {
            return Ok(b.clone());
        }
        Bits::load(
            &**m.storage(),
            &self.slots[i].entry,
            m.h.size,
            m.h.cluster_bits,
        )
    }

    /// QEMU's `block_dirty_bitmap_add` checks for a persistent bitmap, in its order.
    fn add(&mut self, m: &Meta, name: &str, granularity: Option<u32>) -> Result<()> {
        if name.is_empty() {
            return Err(Error::invalid("Bitmap name cannot be empty"));
        }
        let gran = match granularity {
            Some(g) if g < 512 || !g.is_power_of_two() => {
                return Err(Error::invalid(
                    "Granularity must be power of 2 and at least 512",
                ))
            }
            Some(g) => u64::from(g),
            None => default_granularity(m.h.cluster_size()),
        };
        let cant = |why: &str| {
            Error::invalid(format!(
                "Can't make bitmap '{name}' persistent in '{}': {why}",
                self.node
            ))
        };
        if m.h.version < 3 {
            return Err(cant("Cannot store dirty bitmaps in qcow2 v2 files"));
        }
        let bytes = m.h.size.div_ceil(gran).div_ceil(8);
        let cs = m.h.cluster_size();
        if bytes > bitmaps::MAX_PHYS_BYTES
            || u128::from(bytes) > u128::from(bitmaps::MAX_TABLE_ENTRIES) * u128::from(cs)
        {
            return Err(cant(
                "Too much space will be occupied by the bitmap. Use larger granularity",
            ));
        }
        if name.len() > bitmaps::MAX_NAME_BYTES {
            return Err(cant(&format!(
                "Name length exceeds maximum ({} characters)",
                bitmaps::MAX_NAME_BYTES
            )));
        }
        // QEMU counts what the directory on disk holds.
        let disk: Vec<&DirEntry> = self
            .slots
            .iter()
            .filter(|s| s.on_disk)
            .map(|s| &s.entry)
            .collect();
        if !disk.is_empty() {
            if disk.len() as u32 >= bitmaps::MAX_BITMAPS {
                return Err(cant(
                    "Maximum number of persistent bitmaps is already reached",
                ));
            }
            let dir: u64 = disk.iter().map(|e| bitmaps::entry_len(e.name.len())).sum();
            if dir + bitmaps::entry_len(name.len()) > bitmaps::MAX_DIRECTORY_BYTES {
                return Err(cant("Not enough space in the bitmap directory"));
            }
        }
        if self.find(name).is_ok() {
            return Err(Error::invalid(format!("Bitmap already exists: {name}")));
        }
        let granularity_bits = gran.trailing_zeros();
        self.slots.push(Slot {
            entry: DirEntry {
                table_offset: 0,
                table_size: 0,
                flags: FLAG_AUTO,
                granularity_bits,
                name: name.to_string(),
            },
            bits: Some(Bits::empty(m.h.size, granularity_bits, m.h.cluster_bits)),
            on_disk: false,
        });
        Ok(())
    }

    fn apply(&mut self, m: &Meta, name: &str, op: &BitmapOp, source: &Source<'_>) -> Result<()> {
        match op {
            BitmapOp::Add { granularity } => return self.add(m, name, *granularity),
            BitmapOp::Remove => {
                let i = self.find(name)?;
                let s = self.slots.remove(i);
                if s.on_disk {
                    self.dropped.push(s.entry);
                }
            }
            BitmapOp::Clear => {
                let i = self.find(name)?;
                self.usable(i)?;
                let e = &self.slots[i].entry;
                let empty = Bits::empty(m.h.size, e.granularity_bits, m.h.cluster_bits);
                self.slots[i].bits = Some(empty);
            }
            BitmapOp::Enable | BitmapOp::Disable => {
                let i = self.find(name)?;
                self.usable(i)?;
                let e = &mut self.slots[i].entry;
                if matches!(op, BitmapOp::Enable) {
                    e.flags |= FLAG_AUTO;
                } else {
                    e.flags &= !FLAG_AUTO;
                }
            }
            BitmapOp::Merge { source: src_name } => {
                let dst = self.find(name)?;
                let src = match source {
                    Source::This => {
                        let i = self.find(src_name)?;
                        self.usable(i)?;
                        self.bits(m, i)?
                    }
                    Source::Other { storage, header } => load_source(*storage, header, src_name)?,
                    Source::NoBitmaps => return Err(not_found(src_name)),
                };
                if src.size != m.h.size {
                    return Err(crate::ops::bitmap_sizes_differ(m.h.size, src.size));
                }
                self.usable(dst)?;
                let mut bits = self.bits(m, dst)?;
                bits.merge(&src);
                self.slots[dst].bits = Some(bits);
            }
        }
        Ok(())
    }
}

/// The bits of bitmap `name` of another image, which must be consistent.
fn load_source(storage: &dyn Storage, header: &Header, name: &str) -> Result<Bits> {
    let dir = bitmaps::directory(storage, header)?;
    let e = dir
        .iter()
        .find(|e| e.name == name)
        .ok_or_else(|| not_found(name))?;
    if e.in_use() {
        return Err(inconsistent(name));
    }
    Bits::load(storage, e, header.size, header.cluster_bits)
}

impl Meta {
    /// Store the new bits of `slots`, then a directory of their entries, switch the
    /// header to it, and free what the old directory, the rewritten bitmaps and
    /// `dropped` held.
    fn store_bitmaps(&mut self, slots: &mut [Slot], dropped: &[DirEntry]) -> Result<()> {
        // QEMU cannot store a bitmap of an empty disk (no table): it runs out of memory.
        if slots
            .iter()
            .any(|s| s.bits.as_ref().is_some_and(|b| b.table_entries() == 0))
        {
            return Err(Error::invalid("No memory"));
        }
        self.flush()?;
        let g = self.geo();
        let mut freed = Vec::new();
        for e in dropped {
            freed.extend(clusters_if_valid(self, e)?);
        }
        for s in slots.iter_mut() {
            let Some(bits) = s.bits.take() else { continue };
            if s.on_disk {
                freed.extend(clusters_if_valid(self, &s.entry)?);
            }
            s.entry.table_offset = bits.store(self, &s.entry.name)?;
            s.entry.table_size = bits.table_entries();
        }
        let entries: Vec<DirEntry> = slots.iter().map(|s| s.entry.clone()).collect();
        self.write_directory(&entries)?;
        for (off, n) in freed {
            self.refs.defer(g.host_cluster(off), n, -1);
        }
        self.flush()
    }

    /// Write `entries` as the new bitmap directory and switch the header to it (the
    /// commit point); the old directory is freed at the next flush.
    fn write_directory(&mut self, entries: &[DirEntry]) -> Result<()> {
        let g = self.geo();
        let old = bitmaps::extension(&self.h)?;
        let ext = if entries.is_empty() {
            None
        } else {
            let dir = bitmaps::encode_directory(entries);
            let first = self.alloc_clusters(g.clusters_for(dir.len() as u64))?;
            let off = g.host_offset(first).0;
            io(
                "Failed to write bitmap directory",
                self.storage().write_at(&dir, off),
            )?;
            Some(Extension {
                count: entries.len() as u32,
                dir_size: dir.len() as u64,
                dir_offset: off,
            })
        };
        // Tables, data and directory, with their refcounts, before the header names them.
        self.write_refcounts()?;
        self.sync()?;
        let before = self.h.clone();
        bitmaps::set_extension(&mut self.h, ext);
        if let Err(e) = self.write_header().and_then(|_| self.sync()) {
            self.h = before;
            return Err(e);
        }
        if let Some(old) = old {
            let first = g.host_cluster(HostOffset(old.dir_offset));
            self.refs.defer(first, g.clusters_for(old.dir_size), -1);
        }
        Ok(())
    }

    /// Before the first guest write: mark the enabled, consistent bitmaps in use (as
    /// QEMU does when it opens them read-write) and return the log that records the
    /// writes for them; `None` when no bitmap records writes.
    fn bitmaps_before_write(&mut self) -> Result<Option<DirtyLog>> {
        let dir = bitmaps::directory(&**self.storage(), &self.h)?;
        let tracked: Vec<&DirEntry> = dir.iter().filter(|e| e.auto() && !e.in_use()).collect();
        let Some(bits) = tracked.iter().map(|e| e.granularity_bits).min() else {
            return Ok(None);
        };
        let names = tracked.iter().map(|e| e.name.clone()).collect();
        let written = Bits::empty(self.h.size, bits, self.h.cluster_bits);
        let entries: Vec<DirEntry> = dir
            .iter()
            .cloned()
            .map(|mut e| {
                if e.auto() {
                    e.flags |= FLAG_IN_USE;
                }
                e
            })
            .collect();
        self.write_directory(&entries)?;
        self.flush()?;
        Ok(Some(DirtyLog { names, written }))
    }

    /// Set what `log` recorded in its bitmaps and store them consistent (in use cleared).
    fn bitmaps_store_log(&mut self, log: &DirtyLog) -> Result<()> {
        let dir = bitmaps::directory(&**self.storage(), &self.h)?;
        let mut slots = Vec::with_capacity(dir.len());
        for mut entry in dir {
            let mut bits = None;
            if entry.in_use() && entry.auto() && log.names.contains(&entry.name) {
                let mut b =
                    Bits::load(&**self.storage(), &entry, self.h.size, self.h.cluster_bits)?;
                b.merge(&log.written);
                entry.flags &= !FLAG_IN_USE;
                bits = Some(b);
            }
            slots.push(Slot {
                entry,
                bits,
                on_disk: true,
            });
        }
        self.store_bitmaps(&mut slots, &[])
    }
}

/// The clusters bitmap `e` holds, or none when its table is damaged (QEMU frees nothing
/// then: a leak, never a wrong free).
fn clusters_if_valid(
    m: &Meta,
    e: &DirEntry,
) -> Result<Vec<(HostOffset, super::units::ClusterCount)>> {
    let table = bitmaps::read_table_raw(&**m.storage(), e)?;
    let cs = m.geo().cluster_size();
    if table.iter().any(|&t| !bitmaps::table_entry_ok(t, cs)) {
        return Ok(Vec::new());
    }
    clusters_of(m, e)
}

impl Qcow2Image {
    /// Apply each edit's operations in order to its bitmap, then store what changed at
    /// once (also when an operation failed: those before it stay done, as in qemu-img).
    /// `node` names the image in QEMU's messages; `source` is the image `Merge` reads
    /// from.
    pub(crate) fn bitmap_edits(
        &self,
        node: &str,
        edits: &[BitmapEdit<'_>],
        source: &Source<'_>,
    ) -> std::result::Result<(), BitmapOpError> {
        let whole = |error| BitmapOpError {
            edit: edits.len().saturating_sub(1),
            op: None,
            error,
        };
        if self.read_only {
            return Err(whole(Error::ReadOnly));
        }
        let pending = self.take_dirty_log();
        let _g = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let mut m = self.meta();
        m.store_dirty_log(pending).map_err(whole)?;
        let dir = bitmaps::directory(&**m.storage(), &m.h).map_err(whole)?;
        let mut edit = Edit {
            slots: dir
                .into_iter()
                .map(|entry| Slot {
                    entry,
                    bits: None,
                    on_disk: true,
                })
                .collect(),
            dropped: Vec::new(),
            changed: false,
            node,
        };
        let mut failed = None;
        'edits: for (k, e) in edits.iter().enumerate() {
            for (i, op) in e.ops.iter().enumerate() {
                match edit.apply(&m, e.name, op, source) {
                    Ok(()) => edit.changed = true,
                    Err(error) => {
                        failed = Some(BitmapOpError {
                            edit: k,
                            op: Some(i),
                            error,
                        });
                        break 'edits;
                    }
                }
            }
        }
        if edit.changed {
            let Edit {
                mut slots, dropped, ..
            } = edit;
            m.store_bitmaps(&mut slots, &dropped).map_err(|e| {
                whole(e.context(&format!(
                    "Lost persistent bitmaps during inactivation of node '{node}'"
                )))
            })?;
        }
        self.bitmaps_settled.store(false, Ordering::Release);
        failed.map_or(Ok(()), Err)
    }

    /// Called before every guest write of `len` bytes at `offset`: the first one marks
    /// the enabled bitmaps in use, and every one is recorded for them.
    pub(super) fn before_guest_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.bitmaps_settled.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut log = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        if log.is_none() {
            let _g = self.gate.write().unwrap_or_else(|p| p.into_inner());
            match self.meta().bitmaps_before_write()? {
                Some(l) => *log = Some(l),
                None => {
                    self.bitmaps_settled.store(true, Ordering::Release);
                    return Ok(());
                }
            }
        }
        if let Some(l) = log.as_mut() {
            l.add(offset, len);
        }
        Ok(())
    }

    /// The recorded writes, taken for storing (lock order: the log, then the gate and
    /// the metadata).
    pub(super) fn take_dirty_log(&self) -> Option<DirtyLog> {
        let log = self.dirty.lock().unwrap_or_else(|p| p.into_inner()).take();
        if log.is_some() {
            self.bitmaps_settled.store(false, Ordering::Release);
        }
        log
    }
}

impl Qcow2Image {
    /// Before the virtual size changes (QEMU's `qcow2_truncate_bitmaps_check`): refuse
    /// when a bitmap is inconsistent; store the recorded writes, then mark every bitmap
    /// in use, so that a crash leaves them inconsistent rather than sized wrong.
    pub(super) fn bitmaps_before_resize(&self) -> Result<()> {
        let log = self.take_dirty_log();
        self.with_bitmaps_locked(|m| {
            m.store_dirty_log(log)?;
            let dir = bitmaps::directory(&**m.storage(), &m.h)?;
            if let Some(e) = dir.iter().find(|e| e.in_use()) {
                return Err(inconsistent(&e.name));
            }
            if dir.is_empty() {
                return Ok(());
            }
            let marked: Vec<DirEntry> = dir
                .into_iter()
                .map(|mut e| {
                    e.flags |= FLAG_IN_USE;
                    e
                })
                .collect();
            m.write_directory(&marked)?;
            m.flush()
        })
    }

    /// After the virtual size changed (or failed to): store every bitmap marked by
    /// [`Qcow2Image::bitmaps_before_resize`] at the current size, bits past the end
    /// dropped and new ones clear, consistent again.
    pub(super) fn bitmaps_after_resize(&self) -> Result<()> {
        self.with_bitmaps_locked(|m| {
            let dir = bitmaps::directory(&**m.storage(), &m.h)?;
            if dir.is_empty() {
                return Ok(());
            }
            let mut slots = Vec::with_capacity(dir.len());
            for mut entry in dir {
                let bits = Bits::load(&**m.storage(), &entry, m.h.size, m.h.cluster_bits)?;
                entry.flags &= !FLAG_IN_USE;
                slots.push(Slot {
                    entry,
                    bits: Some(bits),
                    on_disk: true,
                });
            }
            m.store_bitmaps(&mut slots, &[])
        })
    }

    /// Run `op` on the metadata with data I/O shut out (no-op on a read-only image).
    fn with_bitmaps_locked(&self, op: impl FnOnce(&mut Meta) -> Result<()>) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _g = self.gate.write().unwrap_or_else(|p| p.into_inner());
        op(&mut self.meta())
    }
}

impl Meta {
    /// Store `log` into its bitmaps, if there is one (at close, and before an edit).
    pub(super) fn store_dirty_log(&mut self, log: Option<DirtyLog>) -> Result<()> {
        match log {
            Some(l) => self.bitmaps_store_log(&l),
            None => Ok(()),
        }
    }
}
