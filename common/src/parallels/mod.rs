//! The parallels format (expandable images), read only: a little-endian header, a block
//! allocation table of 32-bit cluster offsets (in sectors for "WithoutFreeSpace" images,
//! in clusters for "WithouFreSpacExt" ones, 0 unallocated) and the data clusters. QEMU's
//! open checks, in its words. The format extension (dirty bitmaps) changes nothing read
//! and is not read; an image left "in use" reads as it is, as QEMU reads it read-only.

mod check;

use crate::block_map::StoredTable;
use crate::check::{CheckReport, Fix};
use crate::error::{io_err, Error, Result, Structure};
use crate::format::Format;
use crate::readonly::{GuestMap, Mapped, Opened};
use crate::storage::Storage;

const MAGIC: &[u8; 16] = b"WithoutFreeSpace";
const MAGIC_EXT: &[u8; 16] = b"WithouFreSpacExt";
const HEADER_LEN: usize = 64;
const VERSION: u32 = 2;
/// `in_use` while a writer has the image open.
const IN_USE: u32 = 0x746f_6e59;
/// QEMU's largest request (`BDRV_REQUEST_MAX_BYTES`): it reads header and table in one.
const MAX_REQUEST: u64 = i32::MAX as u64 & !511;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Whether the first bytes of a file are a parallels header (QEMU's `parallels_probe`).
pub fn probe(first: &[u8]) -> bool {
    first.len() >= HEADER_LEN
        && (first[..16] == *MAGIC || first[..16] == *MAGIC_EXT)
        && le32(first, 16) == VERSION
}

/// The geometry of an open parallels image.
struct ParallelsMap {
    /// Sectors per cluster.
    tracks: u64,
    /// Sectors per unit of a table entry.
    multiplier: u64,
    entries: u64,
    bat: StoredTable,
    /// Left in use by a writer (QEMU's `header_unclean`).
    unclean: bool,
    /// The header's `data_off` (sectors), and whether it has the old magic (which lets
    /// it be 0).
    data_off: u64,
    old_magic: bool,
}

impl ParallelsMap {
    fn cluster(&self) -> u64 {
        self.tracks * 512
    }

    /// Host offset of cluster `i`, if allocated.
    fn host(&self, i: u64) -> Option<u64> {
        (i < self.entries)
            .then(|| self.bat.get(i))
            .filter(|&e| e != 0)
            .map(|e| e * self.multiplier * 512)
    }
}

/// Open the parallels image on `storage`.
pub fn open(storage: &dyn Storage) -> Result<Opened> {
    let mut h = [0u8; HEADER_LEN];
    storage
        .read_at(&mut h, 0)
        .map_err(io_err("Could not read the parallels header"))?;
    let not_parallels = || Error::invalid("Image not in Parallels format");
    let tracks = u64::from(le32(&h, 28));
    let mut sectors = le64(&h, 36);
    let multiplier = if h[..16] == *MAGIC {
        // Only the low half counts in old images.
        sectors &= 0xffff_ffff;
        1
    } else if h[..16] == *MAGIC_EXT {
        tracks
    } else {
        return Err(not_parallels());
    };
    if le32(&h, 16) != VERSION {
        return Err(not_parallels());
    }
    if tracks == 0 {
        return Err(Error::invalid("Invalid image: Zero sectors per track"));
    }
    if tracks > i32::MAX as u64 / 513 {
        return Err(Error::invalid("Invalid image: Too big cluster"));
    }
    let entries = u64::from(le32(&h, 32));
    if entries > i32::MAX as u64 / 4 {
        return Err(Error::invalid("Catalog too large"));
    }
    if 64 + entries * 4 > MAX_REQUEST {
        return Err(Error::io("", std::io::Error::from_raw_os_error(libc::EIO)));
    }
    // QEMU's block layer refuses a size it cannot count in bytes (a table shorter than the
    // size is read as unallocated past its end).
    if sectors > i64::MAX as u64 / 512 {
        return Err(Error::io(
            "Could not refresh total sector count",
            std::io::Error::from_raw_os_error(libc::EFBIG),
        ));
    }
    let ext_off = le64(&h, 56);
    if ext_off > i64::MAX as u64 >> 9 {
        return Err(Error::invalid("Invalid image: Too big offset"));
    }
    let bat = StoredTable::read(storage, HEADER_LEN as u64, entries, 4, false)
        .map_err(|e| e.located(Structure::L1Table, HEADER_LEN as u64))?;
    Ok(Opened {
        format: Format::Parallels,
        size: sectors * 512,
        map: Box::new(ParallelsMap {
            tracks,
            multiplier,
            entries,
            bat,
            unclean: le32(&h, 44) == IN_USE,
            data_off: u64::from(le32(&h, 48)),
            old_magic: multiplier == 1,
        }),
        backing: None,
        encrypted: false,
    })
}

impl GuestMap for ParallelsMap {
    fn lookup(&self, _storage: &dyn Storage, pos: u64, len: u64) -> Result<(Mapped, u64)> {
        let cs = self.cluster();
        let (i, in_cluster) = (pos / cs, pos % cs);
        let clusters = (in_cluster + len).div_ceil(cs);
        let Some(h) = self.host(i) else {
            // Past the table everything is unallocated, and so is the part of the table
            // past the end of the file: only stored entries can end the run.
            let in_table = clusters.min(self.entries.saturating_sub(i));
            let zeros = self.bat.zero_run(i + 1, in_table.saturating_sub(1));
            let run = if zeros + 1 < in_table {
                zeros + 1
            } else {
                clusters
            };
            return Ok((
                Mapped::Unallocated,
                len.min(run.saturating_mul(cs) - in_cluster),
            ));
        };
        let run = (1..clusters)
            .take_while(|&k| self.host(i + k) == h.checked_add(k * cs))
            .count() as u64;
        Ok((
            Mapped::Data(h + in_cluster),
            len.min((run + 1) * cs - in_cluster),
        ))
    }

    fn cluster_size(&self) -> u64 {
        self.cluster()
    }

    /// QEMU's `info` shows no cluster size for parallels.
    fn info_cluster_size(&self) -> Option<u64> {
        None
    }

    fn check(&self, storage: &dyn Storage, _size: u64, fix: Fix) -> Option<CheckReport> {
        Some(check::check(self, storage, fix))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn header(magic: &[u8; 16], tracks: u32, entries: u32, sectors: u64) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[..16].copy_from_slice(magic);
        b[16..20].copy_from_slice(&VERSION.to_le_bytes());
        b[28..32].copy_from_slice(&tracks.to_le_bytes());
        b[32..36].copy_from_slice(&entries.to_le_bytes());
        b[36..44].copy_from_slice(&sectors.to_le_bytes());
        b
    }

    /// `b` as a file in `dir`, open for reading and writing; its storage and path.
    fn stored(dir: &tempfile::TempDir, b: &[u8]) -> (crate::storage::FileStorage, PathBuf) {
        let p = dir.path().join("t.hds");
        std::fs::write(&p, b).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        (crate::storage::FileStorage::new(file), p)
    }

    fn open_bytes(b: &[u8]) -> Result<Opened> {
        let dir = tempfile::tempdir().unwrap();
        open(&stored(&dir, b).0)
    }

    fn err(b: &[u8]) -> String {
        open_bytes(b).err().expect("must not open").to_string()
    }

    #[test]
    fn open_errors_in_qemus_words() {
        assert_eq!(err(&[0u8; 4096]), "Image not in Parallels format");
        let mut b = header(MAGIC_EXT, 8, 1, 8);
        b[16] = 3;
        assert_eq!(err(&b), "Image not in Parallels format");
        assert!(!probe(&b));
        assert_eq!(
            err(&header(MAGIC_EXT, 0, 1, 8)),
            "Invalid image: Zero sectors per track"
        );
        assert_eq!(
            err(&header(MAGIC_EXT, 1 << 22, 1, 8)),
            "Invalid image: Too big cluster"
        );
        assert_eq!(err(&header(MAGIC_EXT, 8, 1 << 30, 8)), "Catalog too large");
        let mut b = header(MAGIC_EXT, 8, 1, 8);
        b[56..64].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert_eq!(err(&b), "Invalid image: Too big offset");
        assert!(err(&header(MAGIC_EXT, 8, 1, u64::MAX)).contains("File too large"));
    }

    #[test]
    fn old_images_count_entries_in_sectors_and_32_bit_sizes() {
        // Cluster 0 at sector 16 (old: entry 16; new: entry 2 of 8-sector clusters).
        let mut b = header(MAGIC, 8, 2, (1 << 32) | 16);
        b[64..68].copy_from_slice(&16u32.to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.hds");
        std::fs::write(&p, &b).unwrap();
        let s = crate::storage::FileStorage::new(std::fs::File::open(&p).unwrap());
        let o = open(&s).unwrap();
        assert_eq!(o.size, 16 * 512, "only the low half of the size counts");
        assert_eq!(
            o.map.lookup(&s, 100, 10_000).unwrap(),
            (Mapped::Data(8192 + 100), 3996)
        );
        assert_eq!(
            o.map.lookup(&s, 4096, 4096).unwrap(),
            (Mapped::Unallocated, 4096)
        );
        b[..16].copy_from_slice(MAGIC_EXT);
        b[64..68].copy_from_slice(&2u32.to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        let s = crate::storage::FileStorage::new(std::fs::File::open(&p).unwrap());
        let o = open(&s).unwrap();
        assert_eq!(o.size, ((1u64 << 32) | 16) * 512);
        assert_eq!(
            o.map.lookup(&s, 100, 10).unwrap(),
            (Mapped::Data(8192 + 100), 10)
        );
        // Past the table: unallocated, in one run.
        assert_eq!(
            o.map.lookup(&s, 8192, 1 << 30).unwrap(),
            (Mapped::Unallocated, 1 << 30)
        );
    }

    /// Found by fuzzing (check): an entry far past the end of the file made the end of the
    /// data 4 TiB: the shared-cluster pass held a flag per cluster up to it and the repair
    /// grew the file to it.
    #[test]
    fn an_entry_far_past_the_file_is_repaired_in_bounds() {
        let mut b = header(MAGIC_EXT, 8, 4, 64);
        b[48..52].copy_from_slice(&8u32.to_le_bytes());
        b[64..68].copy_from_slice(&(1u32 << 30).to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        let (s, p) = stored(&dir, &b);
        let o = open(&s).unwrap();
        let all = Fix {
            leaks: true,
            errors: true,
        };
        let r = o.map.check(&s, o.size, all).unwrap();
        assert!(
            r.messages
                .contains(&"Repairing cluster 0 is outside image".to_string()),
            "{:?}",
            r.messages
        );
        assert_eq!(r.corruptions_fixed, 1);
        let len = std::fs::metadata(&p).unwrap().len();
        assert!(len <= 4096, "the repair grew the file to {len}");
    }

    /// Found by fuzzing (open_read): a disk of 2^59 bytes in 512-byte clusters with a
    /// two-entry table took minutes to map, a step per cluster past the table.
    #[test]
    fn a_huge_disk_past_its_table_maps_in_one_step() {
        let b = header(MAGIC_EXT, 1, 2, 1 << 50);
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = stored(&dir, &b);
        let o = open(&s).unwrap();
        let started = std::time::Instant::now();
        assert_eq!(
            o.map.lookup(&s, 0, o.size).unwrap(),
            (Mapped::Unallocated, o.size)
        );
        assert_eq!(
            o.map.lookup(&s, 700, o.size - 700).unwrap(),
            (Mapped::Unallocated, o.size - 700)
        );
        assert!(started.elapsed().as_secs() < 5, "mapped cluster by cluster");
    }

    /// Found by fuzzing (open_read): a table of 335 M entries in a file of 541 bytes took
    /// half a minute to map, a step per entry past the end of the file.
    #[test]
    fn a_huge_table_past_the_end_of_the_file_maps_in_one_step() {
        let mut b = header(MAGIC_EXT, 512, 500_000_000, 1 << 50);
        b[64 + 4 * 3..64 + 4 * 4].copy_from_slice(&1u32.to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = stored(&dir, &b);
        let o = open(&s).unwrap();
        let cs = 512 * 512;
        let started = std::time::Instant::now();
        assert_eq!(
            o.map.lookup(&s, 0, o.size).unwrap(),
            (Mapped::Unallocated, 3 * cs)
        );
        assert_eq!(
            o.map.lookup(&s, 3 * cs, o.size - 3 * cs).unwrap(),
            (Mapped::Data(cs), cs)
        );
        assert_eq!(
            o.map.lookup(&s, 4 * cs + 5, o.size - 4 * cs - 5).unwrap(),
            (Mapped::Unallocated, o.size - 4 * cs - 5)
        );
        assert!(started.elapsed().as_secs() < 2, "mapped entry by entry");
    }
}
