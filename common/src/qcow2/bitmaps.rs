//! The persistent dirty bitmaps directory, read for `info` (bitmap contents are not used).

use super::header::{be32, be64, Header, AUTOCLEAR_BITMAPS, EXT_BITMAPS};
use crate::error::{Error, Result, Structure};
use crate::storage::Storage;

/// Bitmaps QEMU allows in one image, and the largest directory it reads.
const MAX_BITMAPS: u32 = 65535;
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
const FLAG_IN_USE: u32 = 1;
const FLAG_AUTO: u32 = 2;

/// One entry of the bitmap directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    /// Bytes of guest data one bit covers.
    pub granularity: u64,
    /// The bitmap was in use (not saved cleanly) and is inconsistent.
    pub in_use: bool,
    /// The bitmap tracks writes automatically.
    pub auto: bool,
}

/// The bitmaps of an image; empty unless the bitmaps extension is present and consistent
/// (its autoclear bit set), as QEMU reports them.
pub fn read_bitmaps(storage: &dyn Storage, h: &Header) -> Result<Vec<BitmapInfo>> {
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return Ok(Vec::new());
    }
    let Some(ext) = h.other_extensions.iter().find(|e| e.kind == EXT_BITMAPS) else {
        return Ok(Vec::new());
    };
    if ext.data.len() < 24 {
        return Err(Error::corrupt_at(
            Structure::Header,
            0,
            "bitmaps extension too short",
        ));
    }
    let count = be32(&ext.data, 0);
    let dir_size = be64(&ext.data, 8);
    let dir_offset = be64(&ext.data, 16);
    let file_len = storage
        .len()
        .map_err(|e| Error::io("Could not get image size", e))?;
    if count > MAX_BITMAPS
        || dir_size > MAX_DIRECTORY_BYTES
        || dir_offset
            .checked_add(dir_size)
            .is_none_or(|end| end > file_len)
    {
        return Err(Error::corrupt_at(
            Structure::BitmapDirectory,
            dir_offset,
            "bitmap directory is invalid",
        ));
    }
    let mut dir = vec![0u8; dir_size as usize];
    storage
        .read_at(&mut dir, dir_offset)
        .map_err(|e| Error::io("Could not read bitmap directory", e))?;
    let mut out = Vec::new();
    let mut at = 0usize;
    for _ in 0..count {
        if at + 24 > dir.len() {
            return Err(Error::corrupt_at(
                Structure::BitmapDirectory,
                dir_offset + at as u64,
                "bitmap directory truncated",
            ));
        }
        let flags = be32(&dir, at + 12);
        let granularity_bits = u32::from(dir[at + 17]);
        let name_size = usize::from(u16::from_be_bytes([dir[at + 18], dir[at + 19]]));
        let extra = be32(&dir, at + 20) as usize;
        let name_at = at + 24 + extra;
        let end = name_at.checked_add(name_size).filter(|&e| e <= dir.len());
        let Some(end) = end.filter(|_| (9..=31).contains(&granularity_bits)) else {
            return Err(Error::corrupt_at(
                Structure::BitmapDirectory,
                dir_offset + at as u64,
                "bitmap directory entry is invalid",
            ));
        };
        out.push(BitmapInfo {
            name: String::from_utf8_lossy(&dir[name_at..end]).into_owned(),
            granularity: 1 << granularity_bits,
            in_use: flags & FLAG_IN_USE != 0,
            auto: flags & FLAG_AUTO != 0,
        });
        at = end.next_multiple_of(8);
    }
    Ok(out)
}
