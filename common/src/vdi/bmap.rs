//! A VDI's block map: which image block holds each guest block, and appending new blocks
//! (data first, then the header's count and the map sector that changed, as QEMU does).

use crate::error::{io_err, Error, Result, Structure};
use crate::storage::Storage;

use super::header::{set_blocks_allocated, Header, HEADER_SIZE};

/// Map entries at or above this are not allocated (unallocated, discarded).
const FIRST_UNALLOCATED: u32 = 0xffff_fffe;
/// The entry of a block that is not allocated.
pub const UNALLOCATED: u32 = 0xffff_ffff;

/// The map as stored (whole sectors, entries little-endian) and what allocation needs.
pub struct Bmap {
    raw: Vec<u8>,
    blocks: u32,
    header: [u8; HEADER_SIZE],
    offset_bmap: u64,
    offset_data: u64,
    block_size: u64,
    /// The header's allocated block count, written back on allocation.
    blocks_allocated: u32,
    /// Index of the next new image block: past the count and past every block in use, so
    /// that a wrong count cannot make two guest blocks share one.
    next_block: u64,
}

impl Bmap {
    /// Read the map of `h` from `storage` of `file_len` bytes; it must lie in the file.
    pub fn load(storage: &dyn Storage, h: &Header, file_len: u64) -> Result<Bmap> {
        let len = h.bmap_len();
        if h.offset_bmap + len > file_len {
            return Err(Error::corrupt_at(
                Structure::Header,
                h.offset_bmap,
                format!(
                    "VDI block map ({len} bytes at offset {}) lies past the end of the file",
                    h.offset_bmap
                ),
            ));
        }
        let mut raw = vec![0u8; len as usize];
        storage
            .read_at(&mut raw, h.offset_bmap)
            .map_err(io_err("Could not read the VDI block map"))?;
        let mut m = Bmap {
            raw,
            blocks: h.blocks,
            header: h.bytes,
            offset_bmap: h.offset_bmap,
            offset_data: h.offset_data,
            block_size: h.block_size,
            blocks_allocated: h.blocks_allocated,
            next_block: 0,
        };
        let in_use = (0..m.blocks)
            .filter_map(|i| m.image_block(i))
            .map(|b| u64::from(b) + 1)
            .max()
            .unwrap_or(0);
        m.next_block = in_use.max(u64::from(m.blocks_allocated));
        Ok(m)
    }

    /// The raw entry of guest block `index`.
    pub fn entry(&self, index: u32) -> u32 {
        let at = index as usize * 4;
        u32::from_le_bytes(self.raw[at..at + 4].try_into().expect("4 bytes"))
    }

    /// The image block holding guest block `index`, if it is allocated.
    pub fn image_block(&self, index: u32) -> Option<u32> {
        let e = self.entry(index);
        (e < FIRST_UNALLOCATED).then_some(e)
    }

    /// Number of guest blocks.
    pub fn blocks(&self) -> u32 {
        self.blocks
    }

    /// The allocated block count the header states.
    pub fn blocks_allocated(&self) -> u32 {
        self.blocks_allocated
    }

    /// Host offset of guest `offset`, if its block is allocated.
    pub fn host_offset(&self, offset: u64) -> Option<u64> {
        let b = self.image_block((offset / self.block_size) as u32)?;
        Some(self.offset_data + u64::from(b) * self.block_size + offset % self.block_size)
    }

    /// Allocate guest block `index` and store `data` at `in_block` in it; the rest of the
    /// block reads as zeroes. The caller holds the map exclusively, so no other writer
    /// touches the new block before its entry is visible.
    pub fn allocate(
        &mut self,
        storage: &dyn Storage,
        index: u32,
        in_block: u64,
        data: &[crate::iovec::IoBuf<'_>],
    ) -> Result<()> {
        let b = u32::try_from(self.next_block)
            .ok()
            .filter(|&b| b < FIRST_UNALLOCATED)
            .ok_or_else(|| Error::NoSpace("The VDI image has no room for more blocks".into()))?;
        let start = self.offset_data + u64::from(b) * self.block_size;
        let end = start + self.block_size;
        let file_len = storage
            .len()
            .map_err(io_err("Could not get the file length"))?;
        // Past the end of the file a new block is a hole; inside it (junk after the last
        // block) its other bytes are cleared first.
        if file_len > start {
            storage
                .punch_hole(start, file_len.min(end) - start)
                .map_err(io_err("Could not clear a new VDI block"))?;
        }
        storage
            .write_vectored_at(data, start + in_block)
            .map_err(io_err("Could not write to the VDI image"))?;
        if file_len < end {
            storage
                .set_len(end)
                .map_err(io_err("Could not grow the VDI image"))?;
        }
        let at = index as usize * 4;
        self.raw[at..at + 4].copy_from_slice(&b.to_le_bytes());
        self.next_block += 1;
        self.blocks_allocated = self.blocks_allocated.wrapping_add(1);
        set_blocks_allocated(&mut self.header, self.blocks_allocated);
        storage
            .write_at(&self.header, 0)
            .map_err(io_err("Could not write the VDI header"))?;
        let sector = at / 512 * 512;
        storage
            .write_at(
                &self.raw[sector..sector + 512],
                self.offset_bmap + sector as u64,
            )
            .map_err(io_err("Could not write the VDI block map"))?;
        Ok(())
    }
}
