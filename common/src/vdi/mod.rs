//! The vdi format (VirtualBox): a header, a block map, and 1 MiB blocks appended in the
//! order they are first written (dynamic) or all present from the start (static).
//!
//! Concurrency: the map is behind a read-write lock. Lookups take it shared and release it
//! before the data moves (an allocated entry never changes); allocating a block takes it
//! exclusively and writes the block's data before the entry becomes visible, so a second
//! writer of the same block waits, then writes in place.

pub mod bmap;
pub mod check;
pub mod create;
pub mod header;

use std::sync::{RwLock, RwLockReadGuard};

use crate::block_map::{pieces, stored_data_status, zero_stored};
use crate::driver::{check_range, Allocation, BlockDriver, BlockStatus, Clusters};
use crate::error::{io_err, Error, Result};
use crate::iovec::{self, IoBuf, IoBufMut};
use crate::storage::Storage;

use bmap::Bmap;
use header::{Header, HEADER_SIZE, TYPE_STATIC};

/// An open VDI image.
pub struct VdiImage {
    storage: Box<dyn Storage>,
    size: u64,
    block_size: u64,
    is_static: bool,
    read_only: bool,
    bmap: RwLock<Bmap>,
}

impl VdiImage {
    /// Open the image on `storage` (opened and locked by the chain opener).
    pub fn open(storage: Box<dyn Storage>, read_only: bool) -> Result<VdiImage> {
        let mut bytes = [0u8; HEADER_SIZE];
        storage
            .read_at(&mut bytes, 0)
            .map_err(io_err("Could not read the VDI header"))?;
        let h = Header::parse(bytes)?;
        // QEMU counts the file in whole sectors (the tail reads as zeroes).
        let file_len = storage
            .len()
            .map_err(io_err("Could not get the image size"))?
            .next_multiple_of(512);
        let bmap = Bmap::load(&*storage, &h, file_len)?;
        Ok(VdiImage {
            storage,
            size: h.disk_size,
            block_size: h.block_size,
            is_static: h.image_type == TYPE_STATIC,
            read_only,
            bmap: RwLock::new(bmap),
        })
    }

    /// The storage under the image.
    pub fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    /// The block size (QEMU's cluster size for `info`).
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    fn map(&self) -> RwLockReadGuard<'_, Bmap> {
        self.bmap.read().unwrap_or_else(|e| e.into_inner())
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)
    }

    /// Zero (punching holes when `unmap`) the allocated parts of a guest range; the rest
    /// reads as zeroes already.
    fn zero_range(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        for (pos, n) in pieces(self.block_size, offset, len) {
            let Some(h) = self.map().host_offset(pos) else {
                continue;
            };
            zero_stored(&*self.storage, h, n, unmap)?;
        }
        Ok(())
    }

    /// Check the block map (`qemu-img check` for vdi).
    pub fn check(&self) -> crate::check::CheckReport {
        check::check(&self.map())
    }
}

impl BlockDriver for VdiImage {
    fn format_name(&self) -> &'static str {
        "vdi"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored_at(&self, bufs: &[IoBufMut<'_>], offset: u64) -> Result<()> {
        let len = iovec::total_len(bufs) as u64;
        check_range(offset, len, self.size)?;
        let mut front = iovec::Front::new(bufs);
        for (pos, n) in pieces(self.block_size, offset, len) {
            let part = front.take(n as usize);
            match self.map().host_offset(pos) {
                None => iovec::zero(&part),
                Some(h) => self
                    .storage
                    .read_vectored_at(&part, h)
                    .map_err(io_err("Failed to read"))?,
            }
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        let len = iovec::total_len(bufs) as u64;
        self.check_write(offset, len)?;
        let mut front = iovec::Front::new(bufs);
        for (pos, n) in pieces(self.block_size, offset, len) {
            let part = front.take(n as usize);
            let host = self.map().host_offset(pos);
            let host = match host {
                Some(h) => h,
                None => {
                    let mut map = self.bmap.write().unwrap_or_else(|e| e.into_inner());
                    match map.host_offset(pos) {
                        // Another writer allocated it meanwhile.
                        Some(h) => h,
                        None => {
                            let index = (pos / self.block_size) as u32;
                            map.allocate(&*self.storage, index, pos % self.block_size, &part)?;
                            continue;
                        }
                    }
                }
            };
            self.storage
                .write_vectored_at(&part, host)
                .map_err(io_err("Failed to write"))?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_write(offset, len)?;
        self.zero_range(offset, len, may_unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        self.zero_range(offset, len, true)
    }

    fn flush(&self) -> Result<()> {
        self.storage.flush().map_err(io_err("Failed to flush"))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Err(Error::invalid("block_status of an empty range"));
        }
        let map = self.map();
        let mut pieces = pieces(self.block_size, offset, len);
        let (pos, n) = pieces.next().expect("len > 0");
        if let Some(h) = map.host_offset(pos) {
            if !self.is_static {
                return Ok(BlockStatus {
                    len: n,
                    allocation: Allocation::Data,
                    depth: 0,
                    host_offset: Some(h),
                    compressed: false,
                });
            }
            // QEMU asks the file about a static image's data: a hole reads as zeroes.
            return stored_data_status(&*self.storage, h, n);
        }
        let mut run = n;
        for (p, n) in pieces {
            if map.host_offset(p).is_some() {
                break;
            }
            run += n;
        }
        Ok(BlockStatus {
            len: run,
            allocation: Allocation::Zero,
            depth: 0,
            host_offset: None,
            compressed: false,
        })
    }

    fn clusters(&self) -> Option<Clusters> {
        Some(Clusters {
            cluster: self.block_size,
            subcluster: self.block_size,
        })
    }

    fn allocated_file_size(&self) -> Result<u64> {
        self.storage
            .allocated_size()
            .map_err(io_err("Failed to get the allocated file size"))
    }
}

#[cfg(test)]
mod tests;
