//! The region table (64 KiB at 192 KiB, CRC-32C): where the BAT and the metadata lie.
//! Every region, the log's too, is registered so that none overlaps another (QEMU's
//! `vhdx_region_check`); BAT entries are checked against them.

use crate::error::{io_err, Error, Result};
use crate::storage::Storage;

use super::{crc, errno, guid, le32, le64};

/// Where QEMU reads the region table (the copy at 256 KiB is written, never read).
pub const TABLE_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
/// Bytes the table's checksum covers.
pub const TABLE_SIZE: usize = 64 << 10;
pub const SIGNATURE: &[u8; 4] = b"regi";
/// The spec's limit on entries.
const MAX_ENTRIES: u32 = 2047;
/// An entry the reader must understand.
const REQUIRED: u32 = 1;

pub const BAT_GUID: [u8; 16] = guid(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
pub const METADATA_GUID: [u8; 16] = guid(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);

/// A region of the file: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub length: u32,
}

/// The regions registered so far.
#[derive(Debug, Default)]
pub struct Regions(Vec<(u64, u64)>);

impl Regions {
    /// QEMU's words for the first registered region `[start, start + len)` overlaps, if
    /// any.
    pub fn overlap(&self, start: u64, len: u64) -> Option<String> {
        let end = start.saturating_add(len);
        self.0
            .iter()
            .find(|&&(s, e)| !(start >= e || end <= s))
            .map(|(s, e)| format!("VHDX region {start}-{end} overlaps with region {s}-{e}"))
    }

    pub fn register(&mut self, start: u64, len: u64) {
        self.0.push((start, start.saturating_add(len)));
    }
}

/// The BAT and metadata regions of the table in `storage`, each registered in `regions`.
pub fn load(storage: &dyn Storage, regions: &mut Regions) -> Result<(Region, Region)> {
    let mut b = vec![0u8; TABLE_SIZE];
    storage
        .read_at(&mut b, TABLE_OFFSETS[0])
        .map_err(io_err("Could not read the VHDX region table"))?;
    if !crc::is_valid(&b, 4) || &b[..4] != SIGNATURE {
        return Err(errno(libc::EINVAL));
    }
    let count = le32(&b, 8);
    if count > MAX_ENTRIES {
        return Err(errno(libc::EINVAL));
    }
    let (mut bat, mut meta) = (None, None);
    for e in b[16..].chunks_exact(32).take(count as usize) {
        let r = Region {
            offset: le64(e, 16),
            length: le32(e, 24),
        };
        if let Some(m) = regions.overlap(r.offset, u64::from(r.length)) {
            return Err(Error::corrupt(m));
        }
        regions.register(r.offset, u64::from(r.length));
        let slot = if e[..16] == BAT_GUID {
            &mut bat
        } else if e[..16] == METADATA_GUID {
            &mut meta
        } else if le32(e, 28) & REQUIRED != 0 {
            return Err(errno(libc::ENOTSUP));
        } else {
            continue;
        };
        if slot.replace(r).is_some() {
            return Err(errno(libc::EINVAL));
        }
    }
    match (bat, meta) {
        (Some(b), Some(m)) => Ok((b, m)),
        _ => Err(errno(libc::EINVAL)),
    }
}

/// A region table naming `bat` and `metadata` (neither flagged required, as QEMU
/// writes them), sealed.
pub fn encode(bat: Region, metadata: Region) -> Vec<u8> {
    let mut b = vec![0u8; TABLE_SIZE];
    b[..4].copy_from_slice(SIGNATURE);
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    for (i, (g, r)) in [(BAT_GUID, bat), (METADATA_GUID, metadata)]
        .into_iter()
        .enumerate()
    {
        let e = &mut b[16 + i * 32..16 + (i + 1) * 32];
        e[..16].copy_from_slice(&g);
        e[16..24].copy_from_slice(&r.offset.to_le_bytes());
        e[24..28].copy_from_slice(&r.length.to_le_bytes());
    }
    crc::seal(&mut b, 4);
    b
}
