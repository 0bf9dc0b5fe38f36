//! The persistent dirty bitmaps extension and the bitmap directory: parse with QEMU's
//! checks and words (`qcow2_read_extensions`, `bitmap_list_load`, `check_dir_entry`),
//! bitmap tables (`bitmap_table_load`), and the encode the writers use.

use super::header::{be32, be64, Header, RawExtension, AUTOCLEAR_BITMAPS, EXT_BITMAPS};
use crate::error::{Error, Result, Structure};
use crate::storage::Storage;

/// Bitmaps QEMU allows in one image, and the largest directory it reads.
pub const MAX_BITMAPS: u32 = 65535;
pub const MAX_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;
/// Largest bitmap table (entries) and bitmap data (bytes) of one bitmap.
pub const MAX_TABLE_ENTRIES: u32 = 0x800_0000;
pub const MAX_PHYS_BYTES: u64 = 0x2000_0000;
/// Granularity limits (log2 of bytes) and the longest name.
pub const MIN_GRANULARITY_BITS: u32 = 9;
pub const MAX_GRANULARITY_BITS: u32 = 31;
pub const MAX_NAME_BYTES: usize = 1023;

pub const FLAG_IN_USE: u32 = 1;
pub const FLAG_AUTO: u32 = 2;
const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);
/// The only bitmap type: dirty tracking.
const TYPE_DIRTY_TRACKING: u8 = 1;
/// Directory entry header bytes (before extra data and name).
const ENTRY_HEADER: usize = 24;

/// Bitmap table entry fields.
pub const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// An entry without an offset whose data is all ones.
pub const TABLE_ALL_ONES: u64 = 1;

/// One entry of the bitmap directory (QEMU writes no extra data, so neither do we).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub table_offset: u64,
    /// Entries of the bitmap table.
    pub table_size: u32,
    pub flags: u32,
    pub granularity_bits: u32,
    pub name: String,
}

impl DirEntry {
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }
}

/// The bitmaps header extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extension {
    pub count: u32,
    pub dir_size: u64,
    pub dir_offset: u64,
}

/// One entry of the bitmap directory, as `info` shows it.
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

fn ext_error(m: impl Into<String>) -> Error {
    Error::corrupt_at(Structure::Header, 0, m)
}

/// Bytes of a directory entry with a name of `name_len` bytes, padded to 8.
pub fn entry_len(name_len: usize) -> u64 {
    (ENTRY_HEADER + name_len).next_multiple_of(8) as u64
}

/// Bitmap table entries a bitmap of `granularity_bits` over `size` guest bytes needs
/// (QEMU's serialization size in clusters).
pub fn table_entries(size: u64, granularity_bits: u32, cluster_bits: u32) -> u64 {
    let bits = size.div_ceil(1 << granularity_bits);
    let bytes = bits.div_ceil(64) * 8;
    bytes.div_ceil(1 << cluster_bits)
}

/// The extension as the header holds it: `None` when it is absent or its autoclear bit
/// is clear (a program without bitmap support wrote the image: QEMU ignores it then).
pub fn extension(h: &Header) -> Result<Option<Extension>> {
    let Some(ext) = h.other_extensions.iter().find(|e| e.kind == EXT_BITMAPS) else {
        return Ok(None);
    };
    if ext.data.len() != 24 {
        return Err(ext_error("bitmaps_ext: Invalid extension length"));
    }
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return Ok(None);
    }
    let e = Extension {
        count: be32(&ext.data, 0),
        dir_size: be64(&ext.data, 8),
        dir_offset: be64(&ext.data, 16),
    };
    if be32(&ext.data, 4) != 0 {
        return Err(ext_error("bitmaps_ext: Reserved field is not zero"));
    }
    if e.count > MAX_BITMAPS {
        return Err(ext_error(format!(
            "bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}",
            e.count
        )));
    }
    if e.count == 0 {
        return Err(ext_error("found bitmaps extension with zero bitmaps"));
    }
    if !e.dir_offset.is_multiple_of(h.cluster_size()) {
        return Err(ext_error("bitmaps_ext: invalid bitmap directory offset"));
    }
    if e.dir_size > MAX_DIRECTORY_BYTES {
        return Err(ext_error(format!(
            "bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size \
             ({MAX_DIRECTORY_BYTES})",
            e.dir_size
        )));
    }
    Ok(Some(e))
}

/// Whether the header has a bitmaps extension whose autoclear bit is clear: a program
/// without bitmap support wrote the image, so every bitmap in it is stale.
pub fn stale_extension(h: &Header) -> bool {
    h.autoclear_features & AUTOCLEAR_BITMAPS == 0
        && h.other_extensions.iter().any(|e| e.kind == EXT_BITMAPS)
}

/// Put `ext` into the header's extensions (where QEMU writes it: before unknown ones),
/// or remove the extension for `None`; sets or clears the autoclear bit to match.
pub fn set_extension(h: &mut Header, ext: Option<Extension>) {
    h.other_extensions.retain(|e| e.kind != EXT_BITMAPS);
    match ext {
        Some(e) => {
            let mut data = Vec::with_capacity(24);
            data.extend_from_slice(&e.count.to_be_bytes());
            data.extend_from_slice(&0u32.to_be_bytes());
            data.extend_from_slice(&e.dir_size.to_be_bytes());
            data.extend_from_slice(&e.dir_offset.to_be_bytes());
            h.other_extensions.insert(
                0,
                RawExtension {
                    kind: EXT_BITMAPS,
                    data,
                },
            );
            h.autoclear_features |= AUTOCLEAR_BITMAPS;
        }
        None => h.autoclear_features &= !AUTOCLEAR_BITMAPS,
    }
}

/// QEMU's `check_dir_entry` for an image of `size` guest bytes.
fn entry_ok(e: &DirEntry, kind: u8, cluster_size: u64, size: u64) -> bool {
    let fail = e.table_size == 0
        || e.table_offset == 0
        || !e.table_offset.is_multiple_of(cluster_size)
        || e.table_size > MAX_TABLE_ENTRIES
        || e.granularity_bits > MAX_GRANULARITY_BITS
        || e.granularity_bits < MIN_GRANULARITY_BITS
        || e.flags & RESERVED_FLAGS != 0
        || e.name.len() > MAX_NAME_BYTES
        || kind != TYPE_DIRTY_TRACKING;
    let phys = u64::from(e.table_size) * cluster_size;
    if fail || phys > MAX_PHYS_BYTES {
        return false;
    }
    // A consistent bitmap must cover the whole disk.
    e.in_use() || u128::from(size) <= (u128::from(phys) * 8) << e.granularity_bits
}

/// Read and check the bitmap directory `ext` describes (QEMU's `bitmap_list_load`).
pub fn read_directory(storage: &dyn Storage, h: &Header, ext: &Extension) -> Result<Vec<DirEntry>> {
    let at = |off: usize, m: &str| {
        Error::corrupt_at(Structure::BitmapDirectory, ext.dir_offset + off as u64, m)
    };
    if ext.dir_size == 0 {
        return Err(at(0, "Requested bitmap directory size is zero"));
    }
    let mut dir = vec![0u8; ext.dir_size as usize];
    let file_len = storage
        .len()
        .map_err(|e| Error::io("Could not get image size", e))?;
    // Past the end of the file reads as zeroes, as in QEMU.
    let have = file_len.saturating_sub(ext.dir_offset).min(ext.dir_size) as usize;
    storage
        .read_at(&mut dir[..have], ext.dir_offset)
        .map_err(|e| Error::io("Failed to read bitmap directory", e))?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        if pos + ENTRY_HEADER > dir.len() {
            return Err(at(pos, "Broken bitmap directory"));
        }
        if out.len() as u32 >= ext.count {
            return Err(at(
                pos,
                "More bitmaps found than specified in header extension",
            ));
        }
        let d = &dir[pos..];
        let name_size = usize::from(u16::from_be_bytes([d[18], d[19]]));
        let extra = be32(d, 20) as usize;
        // QEMU sizes an entry in a C int: a huge extra data size wraps around and is
        // then refused for being extra data, not for leaving the directory.
        let wrapped =
            i64::from((ENTRY_HEADER as u64 + name_size as u64 + extra as u64) as u32 as i32);
        if (wrapped + 7) & !7 > d.len() as i64 {
            return Err(at(pos, "Broken bitmap directory"));
        }
        if extra != 0 {
            return Err(at(pos, "Bitmap extra data is not supported"));
        }
        let len = (ENTRY_HEADER + name_size).next_multiple_of(8);
        let raw_name = &d[ENTRY_HEADER..ENTRY_HEADER + name_size];
        let nul = raw_name.iter().position(|&c| c == 0).unwrap_or(name_size);
        let e = DirEntry {
            table_offset: be64(d, 0),
            table_size: be32(d, 8),
            flags: be32(d, 12),
            granularity_bits: u32::from(d[17]),
            name: String::from_utf8_lossy(&raw_name[..nul]).into_owned(),
        };
        if !entry_ok(&e, d[16], h.cluster_size(), h.size) || name_size > MAX_NAME_BYTES {
            return Err(at(
                pos,
                &format!("Bitmap '{}' doesn't satisfy the constraints", e.name),
            ));
        }
        out.push(e);
        pos += len;
    }
    if out.len() as u32 != ext.count {
        return Err(at(
            pos,
            "Less bitmaps found than specified in header extension",
        ));
    }
    Ok(out)
}

/// The directory bytes for `entries` (names are checked by the caller).
pub fn encode_directory(entries: &[DirEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        out.extend_from_slice(&e.table_offset.to_be_bytes());
        out.extend_from_slice(&e.table_size.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        out.push(TYPE_DIRTY_TRACKING);
        out.push(e.granularity_bits as u8);
        out.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(e.name.as_bytes());
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

/// Whether a bitmap table entry is valid (QEMU's `check_table_entry`).
pub fn table_entry_ok(entry: u64, cluster_size: u64) -> bool {
    let offset = entry & TABLE_OFFSET_MASK;
    entry & TABLE_RESERVED == 0
        && (offset == 0 || (entry & TABLE_ALL_ONES == 0 && offset.is_multiple_of(cluster_size)))
}

/// The raw bitmap table of `e` (zeroes past the end of the file).
pub fn read_table_raw(storage: &dyn Storage, e: &DirEntry) -> Result<Vec<u64>> {
    let bytes = u64::from(e.table_size) * 8;
    let mut buf = vec![0u8; bytes as usize];
    let file_len = storage
        .len()
        .map_err(|e| Error::io("Could not get image size", e))?;
    let have = file_len.saturating_sub(e.table_offset).min(bytes) as usize;
    storage
        .read_at(&mut buf[..have], e.table_offset)
        .map_err(|err| Error::io(format!("Could not read bitmap table of '{}'", e.name), err))?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// The bitmap table of `e`, every entry checked (QEMU's `bitmap_table_load`).
pub fn read_table(storage: &dyn Storage, e: &DirEntry, cluster_size: u64) -> Result<Vec<u64>> {
    let table = read_table_raw(storage, e)?;
    if table.iter().any(|&t| !table_entry_ok(t, cluster_size)) {
        return Err(bad_table(e));
    }
    Ok(table)
}

/// The directory of an image, empty when it has no (consistent) bitmaps extension.
pub fn directory(storage: &dyn Storage, h: &Header) -> Result<Vec<DirEntry>> {
    match extension(h)? {
        Some(ext) => read_directory(storage, h, &ext),
        None => Ok(Vec::new()),
    }
}

/// Check every entry of `e`'s bitmap table, reading only the part inside the file (the
/// rest reads as zeroes, which are valid) a piece at a time.
fn check_table(storage: &dyn Storage, e: &DirEntry, cluster_size: u64) -> Result<()> {
    let bytes = u64::from(e.table_size) * 8;
    let file_len = storage
        .len()
        .map_err(|e| Error::io("Could not get image size", e))?;
    let have = file_len.saturating_sub(e.table_offset).min(bytes);
    let mut buf = vec![0u8; have.min(1 << 16) as usize];
    let mut done = 0;
    while done < have {
        let n = (have - done).min(buf.len() as u64) as usize;
        storage
            .read_at(&mut buf[..n], e.table_offset + done)
            .map_err(|err| {
                Error::io(format!("Could not read bitmap table of '{}'", e.name), err)
            })?;
        let bad = buf[..n].chunks_exact(8).any(|c| {
            !table_entry_ok(
                u64::from_be_bytes(c.try_into().expect("8 bytes")),
                cluster_size,
            )
        });
        if bad {
            return Err(bad_table(e));
        }
        done += n as u64;
    }
    Ok(())
}

fn bad_table(e: &DirEntry) -> Error {
    Error::corrupt_at(
        Structure::BitmapDirectory,
        e.table_offset,
        format!(
            "Could not read bitmap_table table from image for bitmap '{}': Invalid argument",
            e.name
        ),
    )
}

/// What QEMU checks of the bitmaps when it opens an image: the extension, the directory,
/// and the table of every bitmap not in use (its size must match the disk's). Returns the
/// directory.
pub fn check_on_open(storage: &dyn Storage, h: &Header) -> Result<Vec<DirEntry>> {
    let dir = directory(storage, h)?;
    for e in &dir {
        if e.in_use() {
            continue;
        }
        check_table(storage, e, h.cluster_size())?;
        if u64::from(e.table_size) != table_entries(h.size, e.granularity_bits, h.cluster_bits) {
            return Err(Error::corrupt_at(
                Structure::BitmapDirectory,
                e.table_offset,
                format!(
                    "Could not read bitmap '{}' from image: Invalid argument",
                    e.name
                ),
            ));
        }
    }
    Ok(dir)
}

/// The bitmaps of an image, as `info` lists them.
pub fn read_bitmaps(storage: &dyn Storage, h: &Header) -> Result<Vec<BitmapInfo>> {
    Ok(directory(storage, h)?
        .into_iter()
        .map(|e| BitmapInfo {
            granularity: 1 << e.granularity_bits,
            in_use: e.in_use(),
            auto: e.auto(),
            name: e.name,
        })
        .collect())
}
