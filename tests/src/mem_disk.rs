//! An in-memory disk behind the engine's [`BlockDriver`] trait, for device tests (the vmm's
//! virtio-blk tests) that need a disk whose contents they can inspect directly.

use std::sync::RwLock;

use common::{Allocation, BlockDriver, BlockStatus, Error, IoBuf, IoBufMut, Result};

/// A raw disk held in memory: every byte is data, flushes do nothing.
pub struct MemDisk {
    data: RwLock<Vec<u8>>,
    read_only: bool,
}

impl MemDisk {
    /// A disk of `size` zero bytes.
    pub fn new(size: usize, read_only: bool) -> Self {
        MemDisk {
            data: RwLock::new(vec![0; size]),
            read_only,
        }
    }

    /// A copy of the whole disk.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap().clone()
    }
}

impl BlockDriver for MemDisk {
    fn format_name(&self) -> &'static str {
        "raw"
    }
    fn size(&self) -> u64 {
        self.data.read().unwrap().len() as u64
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn read_vectored_at(&self, bufs: &[IoBufMut<'_>], offset: u64) -> Result<()> {
        let len = common::iovec::total_len(bufs);
        common::driver::check_range(offset, len as u64, self.size())?;
        let d = self.data.read().unwrap();
        common::iovec::scatter(bufs, &d[offset as usize..offset as usize + len]);
        Ok(())
    }
    fn write_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let len = common::iovec::total_len(bufs);
        common::driver::check_range(offset, len as u64, self.size())?;
        let mut d = self.data.write().unwrap();
        common::iovec::gather(bufs, &mut d[offset as usize..offset as usize + len]);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        common::driver::check_range(offset, len, self.size())?;
        let mut d = self.data.write().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn block_status(&self, _offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus {
            len,
            allocation: Allocation::Data,
            depth: 0,
            host_offset: None,
            compressed: false,
        })
    }
    fn allocated_file_size(&self) -> Result<u64> {
        Ok(self.size())
    }
}
