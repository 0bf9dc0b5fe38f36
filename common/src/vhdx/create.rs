//! Creating a VHDX as `qemu-img create -f vhdx` lays it out: the file identifier (with
//! QEMU's creator string), two headers, two region tables, the log at 1 MiB, the BAT after
//! it, 1 MiB of metadata, and 5 MiB of room before the data area. A fixed image's file
//! holds every block (sparse); with `block_state_zero` (the default) every BAT entry says
//! ZERO, else a fixed image's entries point at their blocks.

use std::path::Path;

use crate::create::OptionValues;
use crate::error::{Error, Result};
use crate::storage::{FileStorage, Storage};

use super::bat::{self, entry, entry_count};
use super::header::{Header, FILE_SIGNATURE, HEADER_OFFSETS, HEADER_SECTION_END, HEADER_SIZE};
use super::metadata::{self, Metadata, BLOCK_SIZE_MAX};
use super::region::{self, Region, TABLE_OFFSETS};

const MIB: u64 = 1 << 20;
/// The largest disk QEMU creates.
const MAX_SIZE: u64 = 64 << 40;
/// What QEMU writes as the creator.
const CREATOR: &str = "QEMU v10.0.2";

/// A new VHDX.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VhdxCreateOptions {
    /// Size in bytes (whole sectors).
    pub size: u64,
    /// `log_size`: a whole number of MiB.
    pub log_size: u64,
    /// `block_size`, or `None` to pick it from the size as QEMU does.
    pub block_size: Option<u64>,
    /// `subformat=fixed`.
    pub fixed: bool,
    /// `block_state_zero`.
    pub block_state_zero: bool,
}

/// The options from `-o` values, rounded and checked in QEMU's order and words.
pub fn from_values(size: u64, values: &dyn OptionValues) -> Result<VhdxCreateOptions> {
    let fixed = crate::create::fixed_subformat(values)?;
    let block_size = values
        .number("block_size")
        .map(|b| b.next_multiple_of(MIB).min(BLOCK_SIZE_MAX))
        .filter(|&b| b != 0);
    let log_size = match values.number("log_size") {
        None => MIB,
        Some(l) => l.checked_next_multiple_of(MIB).unwrap_or(u64::MAX),
    };
    let o = VhdxCreateOptions {
        size,
        log_size,
        block_size,
        fixed,
        block_state_zero: values.flag("block_state_zero").unwrap_or(true),
    };
    validate(&o)?;
    Ok(o)
}

/// QEMU's refusals, in its order.
fn validate(o: &VhdxCreateOptions) -> Result<()> {
    if o.size > MAX_SIZE {
        return Err(Error::invalid("Image size too large; max of 64TB"));
    }
    if o.log_size > u64::from(u32::MAX) {
        return Err(Error::invalid("Log size must be smaller than 4 GB"));
    }
    if o.log_size < MIB || !o.log_size.is_multiple_of(MIB) {
        return Err(Error::invalid("Log size must be a multiple of 1 MB"));
    }
    if let Some(b) = o.block_size {
        if b < MIB || !b.is_multiple_of(MIB) {
            return Err(Error::invalid("Block size must be a multiple of 1 MB"));
        }
        if !b.is_power_of_two() {
            return Err(Error::invalid("Block size must be a power of two"));
        }
    }
    Ok(())
}

/// QEMU's block size for a disk of `size` bytes when none is given.
fn auto_block_size(size: u64) -> u64 {
    match size {
        s if s > 32 << 40 => 64 * MIB,
        s if s > 100 << 30 => 32 * MIB,
        s if s > 1 << 30 => 16 * MIB,
        _ => 8 * MIB,
    }
}

/// Create (or overwrite) a VHDX at `path`.
pub fn create_vhdx(path: &Path, o: &VhdxCreateOptions) -> Result<()> {
    validate(o)?;
    let block_size = o.block_size.unwrap_or_else(|| auto_block_size(o.size));
    let storage = FileStorage::new(crate::storage::open_new_image_file(path)?);
    let io = |e| Error::io(format!("Could not create '{}'", path.display()), e);
    storage.set_len(0).map_err(io)?;

    let mut id = FILE_SIGNATURE.to_vec();
    id.extend(CREATOR.encode_utf16().flat_map(u16::to_le_bytes));
    storage.write_at(&id, 0).map_err(io)?;

    let sequence = u64::from(u32::from_le_bytes(
        super::new_guid()?[..4].try_into().expect("4 bytes"),
    ));
    let mut h = Header {
        sequence,
        file_write_guid: super::new_guid()?,
        data_write_guid: super::new_guid()?,
        log_guid: [0; 16],
        log_version: 0,
        log_length: o.log_size as u32,
        log_offset: HEADER_SECTION_END,
    };
    for at in HEADER_OFFSETS {
        storage
            .write_at(&h.encode(&[0; HEADER_SIZE]), at)
            .map_err(io)?;
        h.sequence += 1;
    }

    let entries = entry_count(o.size, block_size).expect("64 TiB is well inside 32-bit blocks");
    let bat_region = Region {
        offset: (HEADER_SECTION_END + o.log_size).next_multiple_of(MIB),
        length: (entries * 8).next_multiple_of(MIB) as u32,
    };
    let meta_region = Region {
        offset: (bat_region.offset + u64::from(bat_region.length)).next_multiple_of(MIB),
        length: MIB as u32,
    };
    let data_start = bat_region.offset + u64::from(bat_region.length) + 5 * MIB;
    let file_len = if o.fixed {
        data_start + o.size
    } else {
        data_start
    };
    storage.set_len(file_len).map_err(io)?;
    if o.fixed || o.block_state_zero {
        let mut table = vec![0u8; bat_region.length as usize];
        for block in 0..o.size.div_ceil(block_size) {
            let e = if o.block_state_zero {
                entry(0, bat::ZERO)
            } else {
                entry(
                    (data_start + block * block_size).next_multiple_of(MIB),
                    bat::FULLY_PRESENT,
                )
            };
            let i = bat::index(block, block_size) as usize;
            table[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
        storage.write_at(&table, bat_region.offset).map_err(io)?;
    }
    let rt = region::encode(bat_region, meta_region);
    for at in TABLE_OFFSETS {
        storage.write_at(&rt, at).map_err(io)?;
    }
    let m = Metadata {
        block_size,
        leave_blocks_allocated: o.fixed,
        virtual_size: o.size,
        logical_sector_size: 512,
        physical_sector_size: 512,
    };
    storage
        .write_at(
            &metadata::encode(&m, super::new_guid()?),
            meta_region.offset,
        )
        .map_err(io)?;
    storage.flush().map_err(io)
}
