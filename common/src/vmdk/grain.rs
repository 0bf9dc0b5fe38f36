//! A sparse extent's grain directory and grain tables: lookups through a bounded cache of
//! tables, and allocating a grain (data written whole, then its entry in both tables).
//!
//! Concurrency: cached tables hold atomic entries; lookups take the cache lock only to
//! find a table. Allocation is serialised by one mutex that also holds the next free
//! sector, so no grain is handed out twice and a second writer of a grain waits, then
//! finds it allocated.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::error::{Error, Result};
use crate::storage::Storage;

use super::header::Geometry;

/// Grain table entry meaning "reads as zeroes" when the zeroed-grain flag is set.
pub const GTE_ZEROED: u32 = 1;
/// Tables kept in the cache before it is emptied (2 KiB each at 512 entries).
const CACHE_TABLES: usize = 4096;
/// QEMU's limit for a sparse extent's sectors (32-bit entries).
const MAX_SECTORS: u64 = 1 << 32;

/// Where a grain is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    Unallocated,
    Zeroed,
    /// Host byte offset of the grain's start.
    At(u64),
}

/// Read `buf.len()` bytes at `offset`; the part past the end of the file reads as
/// zeroes, as QEMU's file protocol pads reads there.
pub fn read_padded(storage: &dyn Storage, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
    let len = storage.len().map_err(|e| Error::io(what, e))?;
    buf.fill(0);
    if offset < len {
        let n = ((len - offset).min(buf.len() as u64)) as usize;
        storage
            .read_at(&mut buf[..n], offset)
            .map_err(|e| Error::io(what, e))?;
    }
    Ok(())
}

type Table = Arc<[AtomicU32]>;

/// A sparse extent's tables.
pub struct GrainTables {
    geo: Geometry,
    gd: Vec<u32>,
    /// The redundant directory, kept only when writable (QEMU updates both tables).
    rgd: Option<Vec<u32>>,
    zero_grain: bool,
    cache: RwLock<HashMap<u32, Table>>,
    /// The next free sector of the file; held while allocating.
    next_sector: Mutex<u64>,
}

/// Read a directory of `entries` at byte `offset`. Untrusted: it must lie inside the file
/// (QEMU would read zeroes past the end; refusing keeps a hostile count from costing more
/// memory than the file holds, and garbage entries from mapping petabytes).
fn read_dir(storage: &dyn Storage, offset: u64, entries: u32, file_len: u64) -> Result<Vec<u32>> {
    let bytes = u64::from(entries) * 4;
    if entries > 0 && offset.checked_add(bytes).is_none_or(|end| end > file_len) {
        return Err(Error::corrupt(format!(
            "Grain directory at offset {offset} ({entries} entries) is beyond the end of the file"
        )));
    }
    let mut b = vec![0u8; bytes as usize];
    storage
        .read_at(&mut b, offset)
        .map_err(|e| Error::io("Could not read l1 table", e))?;
    Ok(b.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect())
}

impl GrainTables {
    /// Load the directory (at sector `gd_sector`) and, when `writable`, the redundant one,
    /// of the extent file `name`.
    pub fn load(
        storage: &dyn Storage,
        name: &str,
        geo: Geometry,
        gd_sector: u64,
        rgd_sector: Option<u64>,
        zero_grain: bool,
        writable: bool,
    ) -> Result<GrainTables> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io("Could not get the file length", e))?;
        // QEMU's shifted offset lands far past any file: its read fails with EIO.
        let at = |s: u64| {
            s.checked_mul(512).ok_or_else(|| {
                Error::io(
                    format!("Could not read l1 table from extent '{name}'"),
                    std::io::Error::from_raw_os_error(libc::EIO),
                )
            })
        };
        let gd = read_dir(storage, at(gd_sector)?, geo.gd_entries, file_len)?;
        let rgd = match rgd_sector {
            Some(s) if writable => Some(read_dir(storage, at(s)?, geo.gd_entries, file_len)?),
            _ => None,
        };
        let next = file_len
            .div_ceil(512)
            .next_multiple_of(geo.grain_sectors.max(1));
        Ok(GrainTables {
            geo,
            gd,
            rgd,
            zero_grain,
            cache: RwLock::new(HashMap::new()),
            next_sector: Mutex::new(next),
        })
    }

    /// The grain size in bytes.
    pub fn grain_bytes(&self) -> u64 {
        self.geo.grain_sectors * 512
    }

    fn table(&self, storage: &dyn Storage, gt_sector: u32) -> Result<Table> {
        if let Some(t) = self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&gt_sector)
        {
            return Ok(t.clone());
        }
        let mut b = vec![0u8; self.geo.gtes as usize * 4];
        read_padded(
            storage,
            &mut b,
            u64::from(gt_sector) * 512,
            "Could not read grain table",
        )?;
        let t: Table = b
            .chunks_exact(4)
            .map(|c| AtomicU32::new(u32::from_le_bytes(c.try_into().expect("4 bytes"))))
            .collect();
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_TABLES {
            cache.clear();
        }
        Ok(cache.entry(gt_sector).or_insert(t).clone())
    }

    /// Directory and table index of the grain holding extent byte `offset`.
    fn indexes(&self, offset: u64) -> Result<(usize, usize)> {
        let sector = offset / 512;
        let gd_index = sector / u64::from(self.geo.gt_sectors);
        if gd_index >= u64::from(self.geo.gd_entries) {
            return Err(Error::io(
                "Grain directory too small for the image",
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        let gt_index = (sector / self.geo.grain_sectors) % u64::from(self.geo.gtes);
        Ok((gd_index as usize, gt_index as usize))
    }

    /// Where the grain holding extent byte `offset` is.
    pub fn lookup(&self, storage: &dyn Storage, offset: u64) -> Result<Grain> {
        let (gd_index, gt_index) = self.indexes(offset)?;
        let gt = self.gd.get(gd_index).copied().unwrap_or(0);
        if gt == 0 {
            return Ok(Grain::Unallocated);
        }
        let entry = self.table(storage, gt)?[gt_index].load(Ordering::Acquire);
        Ok(match entry {
            0 => Grain::Unallocated,
            GTE_ZEROED if self.zero_grain => Grain::Zeroed,
            s => Grain::At(u64::from(s) * 512),
        })
    }

    /// Append a compressed grain (`encoded`: marker and stream, whole sectors) for extent
    /// byte `offset` at the end of the file and point both tables at it, as QEMU writes
    /// streams: a grain already written is refused.
    pub fn append_compressed(
        &self,
        storage: &dyn Storage,
        offset: u64,
        encoded: &[u8],
    ) -> Result<()> {
        let mut next = self.next_sector.lock().unwrap_or_else(|e| e.into_inner());
        if let Grain::At(_) = self.lookup(storage, offset)? {
            return Err(Error::io(
                "Could not write to allocated cluster for streamOptimized",
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        let sector = *next;
        self.point(storage, offset, sector, encoded)?;
        *next = sector + (encoded.len() as u64).div_ceil(512);
        Ok(())
    }

    /// Write `data` at `sector`, then the grain's entry in both tables.
    fn point(&self, storage: &dyn Storage, offset: u64, sector: u64, data: &[u8]) -> Result<()> {
        let (gd_index, gt_index) = self.indexes(offset)?;
        let gt = self.gd.get(gd_index).copied().unwrap_or(0);
        if gt == 0 {
            return Err(Error::Unsupported(
                "Writing where the grain directory has no table".into(),
            ));
        }
        if sector >= MAX_SECTORS {
            return Err(Error::NoSpace("The extent is full".into()));
        }
        storage
            .write_at(data, sector * 512)
            .map_err(|e| Error::io("Failed to write", e))?;
        let entry = (sector as u32).to_le_bytes();
        let mut tables = vec![gt];
        if let Some(rgd) = &self.rgd {
            tables.push(rgd.get(gd_index).copied().unwrap_or(0));
        }
        for t in tables.into_iter().filter(|&t| t != 0) {
            storage
                .write_at(&entry, u64::from(t) * 512 + gt_index as u64 * 4)
                .map_err(|e| Error::io("Failed to write grain table", e))?;
        }
        self.table(storage, gt)?[gt_index].store(sector as u32, Ordering::Release);
        Ok(())
    }

    /// Allocate the grain holding extent byte `offset` and write `data` (the whole grain,
    /// or the extent's tail grain) into it, then point both tables at it. Returns the
    /// host offset; a grain another writer allocated meanwhile is returned untouched
    /// (`None` data written), as `Err` never leaves an entry pointing at unwritten data.
    pub fn allocate(&self, storage: &dyn Storage, offset: u64, data: &[u8]) -> Result<Option<u64>> {
        let mut next = self.next_sector.lock().unwrap_or_else(|e| e.into_inner());
        if let Grain::At(_) = self.lookup(storage, offset)? {
            return Ok(None);
        }
        let sector = *next;
        self.point(storage, offset, sector, data)?;
        *next = sector + self.geo.grain_sectors;
        Ok(Some(sector * 512))
    }
}
