//! L2 tables by their host offset, through the metadata cache: load, read and edit entries
//! in place, write back. Which table a guest cluster uses, and when a table must be copied,
//! is the active mapping's business (`mapping`); this module serves any table, including
//! one that a snapshot's L1 shares.

use super::entry::L2Entry;
use super::meta::Meta;
use super::units::HostOffset;
use crate::error::{io, Error, Result, Structure};

fn be64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Entry `i` of an L2 table's bytes (not validated).
pub fn decode_entry(table: &[u8], i: usize, extended: bool) -> L2Entry {
    if extended {
        L2Entry {
            word: be64_at(table, 16 * i),
            bitmap: be64_at(table, 16 * i + 8),
        }
    } else {
        L2Entry {
            word: be64_at(table, 8 * i),
            bitmap: 0,
        }
    }
}

/// Store entry `e` as entry `i` of an L2 table's bytes.
pub fn encode_entry(table: &mut [u8], i: usize, extended: bool, e: L2Entry) {
    if extended {
        table[16 * i..16 * i + 8].copy_from_slice(&e.word.to_be_bytes());
        table[16 * i + 8..16 * i + 16].copy_from_slice(&e.bitmap.to_be_bytes());
    } else {
        table[8 * i..8 * i + 8].copy_from_slice(&e.word.to_be_bytes());
    }
}

impl Meta {
    /// Why `off` cannot hold an L2 table (zero, unaligned, past the end of the file).
    pub(super) fn l2_location_problem(&self, off: HostOffset) -> Option<String> {
        let g = self.geo();
        if off.0 == 0 || !g.is_cluster_aligned(off) {
            Some(format!("L2 table offset {:#x} is invalid", off.0))
        } else if g.host_cluster(off) >= self.refs.end {
            Some(format!(
                "L2 table offset {:#x} is beyond the end of the image file",
                off.0
            ))
        } else {
            None
        }
    }

    /// Make sure the table at `off` is cached.
    pub(super) fn load_l2(&mut self, off: HostOffset) -> Result<()> {
        if self.l2.get(off.0).is_some() {
            return Ok(());
        }
        if let Some(problem) = self.l2_location_problem(off) {
            return Err(Error::corrupt_at(Structure::L2Table, off.0, problem));
        }
        self.make_room_l2()?;
        let mut buf = vec![0u8; self.geo().cluster_size() as usize];
        io(
            "Could not read L2 table",
            self.storage().read_at(&mut buf, off.0),
        )?;
        self.l2.insert(off.0, buf, false);
        Ok(())
    }

    /// Put a new table in the cache, dirty (written back at the next flush).
    pub(super) fn insert_l2(&mut self, off: HostOffset, content: Vec<u8>) -> Result<()> {
        self.make_room_l2()?;
        self.l2.insert(off.0, content, true);
        Ok(())
    }

    /// A copy of the bytes of the table at `off`.
    pub(super) fn l2_bytes(&mut self, off: HostOffset) -> Result<Vec<u8>> {
        self.load_l2(off)?;
        Ok(self.l2.get(off.0).expect("loaded").to_vec())
    }

    /// Replace the cached table at `off` by `content` (written back at the next flush).
    pub(super) fn l2_replace(&mut self, off: HostOffset, content: &[u8]) -> Result<()> {
        self.load_l2(off)?;
        self.l2
            .get_mut(off.0)
            .expect("loaded")
            .copy_from_slice(content);
        Ok(())
    }

    /// Entry `i` of the table at `off`, as stored (not validated).
    pub fn l2_get(&mut self, off: HostOffset, i: usize) -> Result<L2Entry> {
        self.load_l2(off)?;
        let ext = self.geo().extended_l2;
        Ok(decode_entry(self.l2.get(off.0).expect("loaded"), i, ext))
    }

    /// Set entry `i` of the table at `off` in the cache (written back at the next flush).
    pub fn l2_set(&mut self, off: HostOffset, i: usize, e: L2Entry) -> Result<()> {
        self.load_l2(off)?;
        let ext = self.geo().extended_l2;
        encode_entry(self.l2.get_mut(off.0).expect("loaded"), i, ext, e);
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
        io(
            "Could not write L2 table",
            self.storage().write_at(data, off),
        )?;
        self.l2.mark_clean(off);
        Ok(())
    }

    /// Write every dirty cached table; says whether there was any.
    pub(super) fn write_dirty_l2(&mut self) -> Result<bool> {
        let dirty = self.l2.dirty_offsets();
        for &off in &dirty {
            self.write_l2(off)?;
        }
        Ok(!dirty.is_empty())
    }
}
