//! The block allocation table: one 64-bit entry per payload block (state in bits 0-2,
//! file offset in MiB from bit 20), with a sector bitmap entry after every `chunk ratio`
//! payload entries. QEMU's entry count, lookups and open-time checks.

use crate::error::{io_err, Error, Result, Structure};
use crate::storage::Storage;

use super::errno;
use super::region::{Region, Regions};

/// Payload block states.
pub const NOT_PRESENT: u64 = 0;
pub const UNDEFINED: u64 = 1;
pub const ZERO: u64 = 2;
pub const UNMAPPED: u64 = 3;
pub const UNMAPPED_V095: u64 = 5;
pub const FULLY_PRESENT: u64 = 6;
const STATE_MASK: u64 = 7;
const OFFSET_MASK: u64 = 0xffff_ffff_fff0_0000;
/// The spec's sectors per chunk: a sector bitmap block covers this many.
const SECTORS_PER_CHUNK: u64 = 1 << 23;

/// Payload blocks per sector bitmap entry.
pub fn chunk_ratio(block_size: u64) -> u64 {
    SECTORS_PER_CHUNK * 512 / block_size
}

/// How many entries the BAT of a `size`-byte disk has (QEMU's count: the payload
/// entries and the bitmap entries between them, in 32-bit arithmetic as QEMU does it).
/// `None` for more payload blocks than 32 bits count.
pub fn entry_count(size: u64, block_size: u64) -> Option<u64> {
    let blocks = u32::try_from(size.div_ceil(block_size)).ok()?;
    let ratio_bits = chunk_ratio(block_size).trailing_zeros();
    Some(u64::from(blocks) + u64::from(blocks.wrapping_sub(1) >> ratio_bits))
}

/// The BAT index of payload block `block`.
pub fn index(block: u64, block_size: u64) -> u64 {
    block + block / chunk_ratio(block_size)
}

/// An entry: its file offset and state.
pub fn entry(offset: u64, state: u64) -> u64 {
    (offset & OFFSET_MASK) | state
}

/// What reading a payload block finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// Reads as zeroes (not present, undefined, zero, unmapped).
    Zero,
    /// Data at this file offset of the block's start.
    Present(u64),
    /// A state QEMU fails the I/O for (partially present, unknown).
    Invalid,
}

/// The table in memory.
pub struct Bat {
    entries: Vec<u64>,
    /// Where the table lies in the file.
    pub offset: u64,
    block_size: u64,
    size: u64,
}

impl Bat {
    /// Read the table of `region` for a `size`-byte disk of `block_size` blocks; it must
    /// hold every entry and (unlike QEMU, which reads zeroes there) lie inside the file.
    pub fn load(
        storage: &dyn Storage,
        region: Region,
        size: u64,
        block_size: u64,
        file_len: u64,
    ) -> Result<Bat> {
        let n = entry_count(size, block_size).ok_or_else(|| errno(libc::EINVAL))?;
        if n > u64::from(region.length) / 8 {
            return Err(errno(libc::EINVAL));
        }
        if region.offset.saturating_add(n * 8) > file_len {
            return Err(Error::corrupt_at(
                Structure::Header,
                region.offset,
                format!(
                    "VHDX BAT ({} bytes at offset {}) lies past the end of the file",
                    n * 8,
                    region.offset
                ),
            ));
        }
        let mut raw = vec![0u8; (n * 8) as usize];
        storage
            .read_at(&mut raw, region.offset)
            .map_err(io_err("Could not read the VHDX BAT"))?;
        Ok(Bat {
            entries: raw
                .chunks_exact(8)
                .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")))
                .collect(),
            offset: region.offset,
            block_size,
            size,
        })
    }

    /// The BAT index of the payload block holding guest `offset`.
    pub fn index_of(&self, offset: u64) -> u64 {
        index(offset / self.block_size, self.block_size)
    }

    /// What the payload block holding guest `offset` is.
    pub fn payload(&self, offset: u64) -> Payload {
        let e = self.entries[self.index_of(offset) as usize];
        match e & STATE_MASK {
            NOT_PRESENT | UNDEFINED | ZERO | UNMAPPED | UNMAPPED_V095 => Payload::Zero,
            FULLY_PRESENT => Payload::Present(e & OFFSET_MASK),
            _ => Payload::Invalid,
        }
    }

    /// Set entry `index` (after the log has put it in the file).
    pub fn set(&mut self, index: u64, value: u64) {
        self.entries[index as usize] = value;
    }

    /// QEMU's `vhdx_check_bat_entries`: every fully present payload block lies inside
    /// the file of `file_len` bytes (a short last block allowed) and, but for QEMU's
    /// skipping of every (chunk ratio + 1)th one, overlaps no region. QEMU's words, one
    /// line per finding; with `first_only`, the first finding ends the check.
    pub fn check(&self, file_len: u64, regions: &Regions, first_only: bool) -> Vec<String> {
        let mut found = Vec::new();
        let bs = self.block_size;
        let mut payblocks = chunk_ratio(bs);
        for (i, &e) in self.entries.iter().enumerate() {
            if e & STATE_MASK != FULLY_PRESENT {
                continue;
            }
            let i = i as u64;
            let offset = e & OFFSET_MASK;
            let block_len = self.size.checked_sub(i * bs).map_or(bs, |r| r.min(bs));
            let before = found.len();
            if offset > i64::MAX as u64 - bs {
                found.push(format!("VHDX BAT entry {i} offset overflow."));
            }
            if offset >= file_len {
                found.push(format!(
                    "VHDX BAT entry {i} start offset {offset} points after end of file \
                     ({file_len}). Image has probably been truncated."
                ));
            } else if offset + block_len > file_len {
                found.push(format!(
                    "VHDX BAT entry {i} end offset {} points after end of file \
                     ({file_len}). Image has probably been truncated.",
                    offset + block_len - 1
                ));
            }
            if payblocks > 0 {
                payblocks -= 1;
                found.extend(regions.overlap(offset, bs));
            } else {
                payblocks = chunk_ratio(bs);
            }
            if first_only && found.len() > before {
                found.truncate(before + 1);
                break;
            }
        }
        found
    }
}
