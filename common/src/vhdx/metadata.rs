//! The metadata region: a table of items (32 bytes each after a 32-byte header), of which
//! QEMU needs five: file parameters (block size, leave-blocks-allocated, has-parent), the
//! virtual disk size, page 83 data, and the logical and physical sector sizes.

use crate::error::{io_err, Result};
use crate::storage::Storage;

use super::{errno, guid, le32, le64};

const SIGNATURE: &[u8; 8] = b"metadata";
/// QEMU reads this much of the table (the header and up to 2047 entries).
const TABLE_MAX: usize = 64 << 10;
/// Where QEMU puts the items, from the start of the region.
pub const ITEMS_AT: u32 = 64 << 10;
/// Item flags.
const IS_VIRTUAL_DISK: u32 = 2;
const IS_REQUIRED: u32 = 4;
/// File parameter bits.
pub const LEAVE_BLOCKS_ALLOCATED: u32 = 1;
const HAS_PARENT: u32 = 2;
/// Block sizes the spec allows.
pub const BLOCK_SIZE_MIN: u64 = 1 << 20;
pub const BLOCK_SIZE_MAX: u64 = 256 << 20;

const FILE_PARAMETERS: [u8; 16] = guid(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
const VIRTUAL_SIZE: [u8; 16] = guid(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
const PAGE83: [u8; 16] = guid(
    0xbeca_12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
const LOGICAL_SECTOR: [u8; 16] = guid(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
const PHYSICAL_SECTOR: [u8; 16] = guid(
    0xcda3_48c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
const PARENT_LOCATOR: [u8; 16] = guid(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);

/// What the metadata says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metadata {
    pub block_size: u64,
    pub leave_blocks_allocated: bool,
    pub virtual_size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
}

/// Read the metadata of the region at `region_offset`, with QEMU's checks and errnos.
pub fn load(storage: &dyn Storage, region_offset: u64) -> Result<Metadata> {
    let io = io_err("Could not read the VHDX metadata");
    let mut t = vec![0u8; TABLE_MAX];
    storage.read_at(&mut t, region_offset).map_err(&io)?;
    if &t[..8] != SIGNATURE {
        return Err(errno(libc::EINVAL));
    }
    let count = usize::from(u16::from_le_bytes([t[10], t[11]]));
    if count * 32 > TABLE_MAX - 32 {
        return Err(errno(libc::EINVAL));
    }
    let known = [
        FILE_PARAMETERS,
        VIRTUAL_SIZE,
        PAGE83,
        LOGICAL_SECTOR,
        PHYSICAL_SECTOR,
        PARENT_LOCATOR,
    ];
    let mut at: [Option<u32>; 6] = [None; 6];
    for e in t[32..].chunks_exact(32).take(count) {
        match known.iter().position(|g| e[..16] == *g) {
            Some(i) if at[i].is_some() => return Err(errno(libc::EINVAL)),
            Some(i) => at[i] = Some(le32(e, 16)),
            None if le32(e, 24) & IS_REQUIRED != 0 => return Err(errno(libc::ENOTSUP)),
            None => {}
        }
    }
    if at[..5].iter().any(Option::is_none) {
        return Err(errno(libc::ENOTSUP));
    }
    let read = |i: usize, n: usize| -> Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        let off = region_offset.saturating_add(u64::from(at[i].expect("present")));
        storage.read_at(&mut b, off).map_err(&io)?;
        Ok(b)
    };
    let params = read(0, 8)?;
    let bits = le32(&params, 4);
    if bits & HAS_PARENT != 0 {
        // Differencing images: QEMU does not read them.
        return Err(errno(if at[5].is_some() {
            libc::ENOTSUP
        } else {
            libc::EINVAL
        }));
    }
    let m = Metadata {
        block_size: u64::from(le32(&params, 0)),
        leave_blocks_allocated: bits & LEAVE_BLOCKS_ALLOCATED != 0,
        virtual_size: le64(&read(1, 8)?, 0),
        logical_sector_size: le32(&read(3, 4)?, 0),
        physical_sector_size: le32(&read(4, 4)?, 0),
    };
    if !(BLOCK_SIZE_MIN..=BLOCK_SIZE_MAX).contains(&m.block_size) {
        return Err(errno(libc::EINVAL));
    }
    if m.logical_sector_size != 512 {
        return Err(errno(libc::ENOTSUP));
    }
    if !m.block_size.is_power_of_two() {
        return Err(errno(libc::EINVAL));
    }
    Ok(m)
}

/// The metadata region's first bytes as QEMU writes them: the table, then at
/// [`ITEMS_AT`] the five items (`page83` a new GUID).
pub fn encode(m: &Metadata, page83: [u8; 16]) -> Vec<u8> {
    let mut b = vec![0u8; ITEMS_AT as usize + 40];
    b[..8].copy_from_slice(SIGNATURE);
    b[10..12].copy_from_slice(&5u16.to_le_bytes());
    let items: [([u8; 16], u32, u32); 5] = [
        (FILE_PARAMETERS, 8, IS_REQUIRED),
        (VIRTUAL_SIZE, 8, IS_REQUIRED | IS_VIRTUAL_DISK),
        (PAGE83, 16, IS_REQUIRED | IS_VIRTUAL_DISK),
        (LOGICAL_SECTOR, 4, IS_REQUIRED | IS_VIRTUAL_DISK),
        (PHYSICAL_SECTOR, 4, IS_REQUIRED | IS_VIRTUAL_DISK),
    ];
    let mut off = ITEMS_AT;
    for (i, (g, len, flags)) in items.into_iter().enumerate() {
        let e = &mut b[32 + i * 32..64 + i * 32];
        e[..16].copy_from_slice(&g);
        e[16..20].copy_from_slice(&off.to_le_bytes());
        e[20..24].copy_from_slice(&len.to_le_bytes());
        e[24..28].copy_from_slice(&flags.to_le_bytes());
        off += len;
    }
    let d = &mut b[ITEMS_AT as usize..];
    d[..4].copy_from_slice(&(m.block_size as u32).to_le_bytes());
    let bits = if m.leave_blocks_allocated {
        LEAVE_BLOCKS_ALLOCATED
    } else {
        0
    };
    d[4..8].copy_from_slice(&bits.to_le_bytes());
    d[8..16].copy_from_slice(&m.virtual_size.to_le_bytes());
    d[16..32].copy_from_slice(&page83);
    d[32..36].copy_from_slice(&m.logical_sector_size.to_le_bytes());
    d[36..40].copy_from_slice(&m.physical_sector_size.to_le_bytes());
    b
}
