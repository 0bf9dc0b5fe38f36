//! The qed format (QEMU Enhanced Disk), read only: a little-endian header, an L1 table
//! and L2 tables of 64-bit cluster offsets (0 unallocated, 1 a zero cluster), and a
//! backing file name in the header clusters. QEMU's open checks, in its words.
//!
//! The need-check flag (`QED_F_NEED_CHECK`, set while QEMU has the image open for
//! writing) makes QEMU check and repair the image when it opens it read-write; read-only
//! it reads the image as it is, and so does the engine (which opens qed read-only, or
//! writable for `check -r` only, whose repair clears the flag as QEMU's does). Neither
//! QEMU's `info` nor its `check` reports the flag.

pub mod check;

use crate::backing::BackingRef;
use crate::block_map::{read_entries, StoredTable};
use crate::error::{io_err, Error, Result, Structure};
use crate::format::Format;
use crate::readonly::{GuestMap, Mapped, Opened};
use crate::storage::Storage;

/// `QED\0`, little-endian.
pub const MAGIC: [u8; 4] = *b"QED\0";
/// Bytes of the header QEMU reads.
const HEADER_LEN: usize = 64;
const F_BACKING_FILE: u64 = 1;
const F_NEED_CHECK: u64 = 2;
const F_BACKING_FORMAT_NO_PROBE: u64 = 4;
const KNOWN_FEATURES: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;
/// The L2 entry of a zero cluster.
const ZERO_CLUSTER: u64 = 1;
/// QEMU keeps a backing file name in a buffer of this size, terminator included.
const MAX_BACKING_NAME: u64 = 4096;
/// At most this many L2 entries are read for one lookup.
const MAX_ENTRIES_PER_LOOKUP: u64 = 8192;

fn invalid(what: &str) -> Error {
    Error::invalid(format!("QED {what} is invalid"))
}

/// Whether the first bytes of a file are a qed header (QEMU's `bdrv_qed_probe`).
pub fn probe(first: &[u8]) -> bool {
    first.len() >= HEADER_LEN && first[..4] == MAGIC
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The geometry of an open qed image: what lookups and the check need.
pub struct QedMap {
    cluster: u64,
    /// Clusters per table.
    table_size: u64,
    /// Clusters of the header.
    header_size: u64,
    l1_offset: u64,
    /// The file length rounded down to whole clusters (QEMU's `file_size`).
    file_size: u64,
    /// Entries per table.
    entries: u64,
    l1: StoredTable,
    /// The header's feature bits.
    features: u64,
}

impl QedMap {
    /// QEMU's `qed_check_cluster_offset`: cluster aligned, past the header, in the file.
    fn cluster_ok(&self, offset: u64) -> bool {
        offset.is_multiple_of(self.cluster)
            && offset >= self.header_size * self.cluster
            && offset < self.file_size
    }

    /// QEMU's `qed_check_table_offset`: the table's first and last cluster are valid,
    /// the last past the first (so that, as in QEMU, a one-cluster table never is).
    fn table_ok(&self, offset: u64) -> bool {
        match offset.checked_add((self.table_size - 1) * self.cluster) {
            Some(end) if end > offset => self.cluster_ok(offset) && self.cluster_ok(end),
            _ => false,
        }
    }

    /// Guest bytes one L2 table maps.
    fn l2_coverage(&self) -> u64 {
        self.entries * self.cluster
    }
}

/// Open the qed image on `storage`.
pub fn open(storage: &dyn Storage) -> Result<Opened> {
    let mut h = [0u8; HEADER_LEN];
    storage
        .read_at(&mut h, 0)
        .map_err(io_err("Failed to read QED header"))?;
    if h[..4] != MAGIC {
        return Err(Error::invalid("Image not in QED format"));
    }
    let cluster = u64::from(le32(&h, 4));
    let table_size = u64::from(le32(&h, 8));
    let header_size = u64::from(le32(&h, 12));
    let features = le64(&h, 16);
    let l1_offset = le64(&h, 40);
    let image_size = le64(&h, 48);
    let name_at = u64::from(le32(&h, 56));
    let name_len = u64::from(le32(&h, 60));
    if features & !KNOWN_FEATURES != 0 {
        return Err(Error::Unsupported(format!(
            "Unsupported QED features: {:x}",
            features & !KNOWN_FEATURES
        )));
    }
    if !cluster.is_power_of_two() || !(4096..=64 << 20).contains(&cluster) {
        return Err(invalid("cluster size"));
    }
    let file_len = storage.len().map_err(io_err("Failed to get file length"))?;
    if !table_size.is_power_of_two() || table_size > 16 {
        return Err(invalid("table size"));
    }
    let entries = table_size * cluster / 8;
    // QEMU's largest image: every L2 table of the L1 table present.
    let max_size = u128::from(entries) * u128::from(entries) * u128::from(cluster);
    if !image_size.is_multiple_of(512) || u128::from(image_size) > max_size {
        return Err(invalid("image size"));
    }
    let mut map = QedMap {
        cluster,
        table_size,
        header_size,
        l1_offset,
        file_size: file_len - file_len % cluster,
        entries,
        l1: StoredTable::default(),
        features,
    };
    if !map.table_ok(l1_offset) {
        return Err(invalid("table offset"));
    }
    if header_size > u64::from(u32::MAX) / cluster {
        return Err(Error::invalid("QED header size is too large"));
    }
    let mut backing = None;
    if features & F_BACKING_FILE != 0 {
        if name_at + name_len > cluster * header_size {
            return Err(invalid("backing filename offset"));
        }
        if name_len >= MAX_BACKING_NAME {
            return Err(Error::invalid("Failed to read backing filename"));
        }
        let mut name = vec![0u8; name_len as usize];
        storage
            .read_at(&mut name, name_at)
            .map_err(io_err("Failed to read backing filename"))?;
        // QEMU keeps it as a C string.
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        backing = Some(BackingRef {
            name: String::from_utf8_lossy(&name[..end]).into_owned(),
            format: (features & F_BACKING_FORMAT_NO_PROBE != 0).then(|| "raw".to_string()),
        });
    }
    // The table lies in the file (checked above), so it is no larger than the file.
    map.l1 = StoredTable::read(storage, l1_offset, entries, 8, false)
        .map_err(|e| e.context("Failed to read L1 table"))?;
    Ok(Opened {
        format: Format::Qed,
        size: image_size,
        map: Box::new(map),
        backing,
        encrypted: false,
    })
}

impl GuestMap for QedMap {
    fn lookup(&self, storage: &dyn Storage, pos: u64, len: u64) -> Result<(Mapped, u64)> {
        let cover = self.l2_coverage();
        let l2 = self.l1.get(pos / cover);
        if l2 == 0 {
            // One run over every L2 table that is not there (a hostile L1 may be huge).
            let tables = (pos % cover + len).div_ceil(cover);
            let run = self.l1.zero_run(pos / cover, tables) * cover - pos % cover;
            return Ok((Mapped::Unallocated, len.min(run)));
        }
        let len = len.min(cover - pos % cover);
        if !self.table_ok(l2) {
            return Err(Error::corrupt_at(
                Structure::L1Table,
                self.l1_offset,
                format!("QED L2 table offset 0x{l2:x} is invalid"),
            ));
        }
        let in_cluster = pos % self.cluster;
        let index = pos % cover / self.cluster;
        let n = (in_cluster + len)
            .div_ceil(self.cluster)
            .min(MAX_ENTRIES_PER_LOOKUP);
        let e = read_entries(storage, l2 + index * 8, n, 8, false)
            .map_err(|e| e.located(Structure::L2Table, l2))?;
        let first = e[0];
        let same = |k: usize| match first {
            0 | ZERO_CLUSTER => e[k] == first,
            _ => first.checked_add(k as u64 * self.cluster) == Some(e[k]),
        };
        let run = (1..e.len()).take_while(|&k| same(k)).count() as u64 + 1;
        let n = len.min(run * self.cluster - in_cluster);
        Ok(match first {
            0 => (Mapped::Unallocated, n),
            ZERO_CLUSTER => (Mapped::Zero, n),
            h if self.cluster_ok(h) => (Mapped::Data(h + in_cluster), n),
            h => {
                return Err(Error::corrupt_at(
                    Structure::L2Table,
                    l2 + index * 8,
                    format!("QED cluster offset 0x{h:x} is invalid"),
                ))
            }
        })
    }

    fn cluster_size(&self) -> u64 {
        self.cluster
    }

    fn check(
        &self,
        storage: &dyn Storage,
        size: u64,
        fix: crate::check::Fix,
    ) -> Option<crate::check::CheckReport> {
        Some(check::check(self, storage, size, fix.any()))
    }
}

#[cfg(test)]
mod tests;
