//! A dynamic VHD's block allocation table: which guest block lives where, and allocating
//! new blocks at the end of the file (sector bitmap, then the footer moved past the block,
//! then the table entry, each durable before the next, as QEMU orders them).

use crate::error::{io_err, Error, Result, Structure};
use crate::storage::Storage;

use super::footer::FOOTER_SIZE;

/// A table entry for a block that is not allocated.
pub const UNALLOCATED: u32 = u32::MAX;

/// The table and where the next block goes; lives under the image's lock.
pub struct Bat {
    /// Sector of each block's bitmap, or [`UNALLOCATED`].
    entries: Vec<u32>,
    /// Host offset of the table.
    table_offset: u64,
    /// Where the next block's bitmap goes (the footer sits there).
    free_offset: u64,
    /// Blocks whose sector bitmap this open has set to all ones.
    full_bitmap: Vec<bool>,
    /// Where the metadata (footer copy, header, table) ends: no block may start before.
    metadata_end: u64,
    pub block_size: u64,
    pub bitmap_size: u64,
}

impl Bat {
    /// Read a table of `entries` entries at `table_offset` from `storage` of `file_len`
    /// bytes; the table must lie inside the file and every block it points at end there.
    pub fn load(
        storage: &dyn Storage,
        table_offset: u64,
        entries: u32,
        block_size: u64,
        file_len: u64,
    ) -> Result<Bat> {
        let truncated = || {
            Error::corrupt_at(
                Structure::Header,
                table_offset,
                "block-vpc: free_data_block_offset points after the end of file. The image \
                 has been truncated.",
            )
        };
        let table_len = u64::from(entries) * 4;
        // QEMU's largest single read (INT_MAX rounded down to whole sectors).
        if table_len > (i32::MAX as u64) / 512 * 512 {
            return Err(Error::corrupt_at(
                Structure::Header,
                table_offset,
                "Error reading pagetable",
            ));
        }
        let table_end = table_offset.checked_add(table_len).ok_or_else(truncated)?;
        if table_end > file_len {
            return Err(truncated());
        }
        let mut raw = vec![0u8; table_len as usize];
        storage
            .read_at(&mut raw, table_offset)
            .map_err(io_err("Error reading pagetable"))?;
        let entries: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let bitmap_size = (block_size / (8 * 512)).next_multiple_of(512);
        let mut free_offset = table_end.next_multiple_of(512);
        for &e in entries.iter().filter(|&&e| e != UNALLOCATED) {
            free_offset = free_offset.max(u64::from(e) * 512 + bitmap_size + block_size);
        }
        if free_offset > file_len {
            return Err(truncated());
        }
        Ok(Bat {
            full_bitmap: vec![false; entries.len()],
            entries,
            table_offset,
            free_offset,
            metadata_end: table_end,
            block_size,
            bitmap_size,
        })
    }

    /// Host offset of guest `offset`'s data, if its block is allocated.
    pub fn host_offset(&self, offset: u64) -> Option<u64> {
        let index = (offset / self.block_size) as usize;
        let e = *self.entries.get(index)?;
        (e != UNALLOCATED).then(|| u64::from(e) * 512 + self.bitmap_size + offset % self.block_size)
    }

    /// Host offset of guest `offset`'s data for a write: its block allocated first if it
    /// is not, and its sector bitmap set to all ones (the whole block is data, as QEMU
    /// keeps it). `footer` is written past a new block.
    pub fn host_offset_for_write(
        &mut self,
        storage: &dyn Storage,
        footer: &[u8; FOOTER_SIZE],
        offset: u64,
    ) -> Result<u64> {
        let index = (offset / self.block_size) as usize;
        let Some(&e) = self.entries.get(index) else {
            return Err(Error::invalid(format!(
                "offset {offset} has no entry in the block allocation table"
            )));
        };
        if e == UNALLOCATED {
            self.allocate(storage, footer, index)?;
        } else if !self.full_bitmap[index] {
            let bitmap_at = u64::from(e) * 512;
            if bitmap_at < self.metadata_end {
                return Err(Error::corrupt_at(
                    Structure::Header,
                    self.table_offset + index as u64 * 4,
                    format!("block {index} overlaps the VHD metadata"),
                ));
            }
            self.write_full_bitmap(storage, bitmap_at)?;
            self.full_bitmap[index] = true;
        }
        Ok(self.host_offset(offset).expect("the block is allocated"))
    }

    fn write_full_bitmap(&self, storage: &dyn Storage, at: u64) -> Result<()> {
        let ones = vec![0xffu8; self.bitmap_size as usize];
        storage
            .write_at(&ones, at)
            .map_err(io_err("Failed to write a VHD block bitmap"))
    }

    /// Put block `index` at the end of the file.
    fn allocate(
        &mut self,
        storage: &dyn Storage,
        footer: &[u8; FOOTER_SIZE],
        index: usize,
    ) -> Result<()> {
        let at = self.free_offset;
        let sector = u32::try_from(at / 512)
            .ok()
            .filter(|&s| s != UNALLOCATED)
            .ok_or_else(|| Error::NoSpace("The VHD file is full".into()))?;
        let data_at = at + self.bitmap_size;
        let end = data_at + self.block_size;
        self.write_full_bitmap(storage, at)?;
        // The data area past the old end of the file is a hole; anything the file holds
        // there already (junk after the footer) is zeroed.
        let len = storage
            .len()
            .map_err(io_err("Failed to get the file length"))?;
        let junk_end = len.min(end);
        if junk_end > data_at {
            storage
                .punch_hole(data_at, junk_end - data_at)
                .map_err(io_err("Failed to clear a new VHD block"))?;
        }
        storage
            .write_at(footer, end)
            .and_then(|()| storage.flush())
            .map_err(io_err("Failed to write the VHD footer"))?;
        storage
            .write_at(&sector.to_be_bytes(), self.table_offset + index as u64 * 4)
            .and_then(|()| storage.flush())
            .map_err(io_err("Failed to write the block allocation table"))?;
        self.entries[index] = sector;
        self.full_bitmap[index] = true;
        self.free_offset = end;
        Ok(())
    }
}
