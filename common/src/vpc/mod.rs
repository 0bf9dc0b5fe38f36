//! The vpc format (Virtual PC / Hyper-V VHD): fixed disks (guest data at its own offset,
//! a footer after it) and dynamic disks (a footer copy, a dynamic header and a block
//! allocation table up front, blocks of sector bitmap + data appended, the footer last).
//!
//! Like QEMU, a block in the table is data as a whole (its sector bitmap is not consulted
//! on reads, and set to all ones on the first write), and differencing disks are read as
//! dynamic ones without their parent.

pub mod bat;
pub mod create;
pub mod footer;

use std::sync::Mutex;

use crate::block_map::{pieces, stored_data_status, zero_stored};
use crate::driver::{check_range, Allocation, BlockDriver, BlockStatus, Clusters};
use crate::error::{io_err, Error, Result, Structure};
use crate::iovec::{self, IoBuf, IoBufMut};
use crate::storage::Storage;

use bat::Bat;
use footer::{DynHeader, Footer, DYN_HEADER_SIZE, FOOTER_COOKIE, FOOTER_SIZE};

/// An open VHD image.
pub struct VpcImage {
    storage: Box<dyn Storage>,
    footer: Footer,
    size: u64,
    read_only: bool,
    /// The allocation table of a dynamic disk (none for a fixed one).
    bat: Option<Mutex<Bat>>,
    /// Where a fixed disk's footer starts: no guest write may reach it.
    footer_at: u64,
}

impl VpcImage {
    /// Open the image on `storage` (opened and locked by the chain opener). A failure QEMU
    /// reports as a bare errno comes back as an I/O error without context, for the opener
    /// to name the file in.
    pub fn open(storage: Box<dyn Storage>, read_only: bool) -> Result<VpcImage> {
        // QEMU counts the file in whole sectors (the tail reads as zeroes).
        let file_len = storage
            .len()
            .map_err(io_err("Could not get the image size"))?
            .next_multiple_of(512);
        let mut bytes = [0u8; FOOTER_SIZE];
        storage
            .read_at(&mut bytes, 0)
            .map_err(io_err("Unable to read VHD header"))?;
        let at_start = &bytes[..8] == FOOTER_COOKIE;
        if !at_start {
            // A fixed disk has its footer at the end only.
            if file_len < FOOTER_SIZE as u64 {
                return Err(Error::corrupt("File too small for a VHD header"));
            }
            storage
                .read_at(&mut bytes, file_len - FOOTER_SIZE as u64)
                .map_err(io_err("Unable to read VHD header"))?;
            if &bytes[..8] != FOOTER_COOKIE
                || u32::from_be_bytes(bytes[60..64].try_into().expect("4 bytes"))
                    != footer::TYPE_FIXED
            {
                return Err(Error::corrupt("invalid VPC image"));
            }
        }
        let footer = Footer::parse(bytes)?;
        let size = footer.sectors * 512;
        let bat = if at_start {
            Some(Mutex::new(Self::load_dynamic(
                &*storage, &footer, size, file_len,
            )?))
        } else {
            None
        };
        Ok(VpcImage {
            storage,
            footer,
            size,
            read_only,
            bat,
            footer_at: file_len.saturating_sub(FOOTER_SIZE as u64),
        })
    }

    /// The dynamic header and allocation table, checked as QEMU checks them.
    fn load_dynamic(
        storage: &dyn Storage,
        footer: &Footer,
        size: u64,
        file_len: u64,
    ) -> Result<Bat> {
        let at = footer.data_offset;
        // Bytes past the end of the file read as zeroes (as in QEMU), but the offset must
        // be one a read can start at.
        if at > i64::MAX as u64 - DYN_HEADER_SIZE as u64 {
            return Err(Error::corrupt_at(
                Structure::Header,
                at,
                "Error reading dynamic VHD header",
            ));
        }
        let mut raw = [0u8; DYN_HEADER_SIZE];
        storage
            .read_at(&mut raw, at)
            .map_err(io_err("Error reading dynamic VHD header"))?;
        let h = DynHeader::parse(&raw).map_err(|e| e.located(Structure::Header, at))?;
        let bs = h.block_size;
        if !bs.is_power_of_two() || bs < 512 {
            return Err(Error::corrupt(format!("Invalid block size {bs}")));
        }
        let bs = u64::from(bs);
        if size / bs > u64::from(u32::MAX) {
            return Err(Error::corrupt("Too many blocks"));
        }
        if u64::from(h.max_table_entries) * bs < size {
            return Err(Error::corrupt("Page table too small"));
        }
        if h.max_table_entries > i32::MAX as u32 / 4 {
            return Err(Error::corrupt(format!(
                "Max Table Entries too large ({})",
                h.max_table_entries as i32
            )));
        }
        Bat::load(storage, h.table_offset, h.max_table_entries, bs, file_len)
    }

    /// Whether the disk is fixed (no allocation table).
    pub fn is_fixed(&self) -> bool {
        self.bat.is_none()
    }

    /// The block size of a dynamic disk.
    pub fn block_size(&self) -> Option<u64> {
        self.bat.as_ref().map(|b| self.lock(b).block_size)
    }

    /// The storage under the image.
    pub fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    fn lock<'a>(&self, bat: &'a Mutex<Bat>) -> std::sync::MutexGuard<'a, Bat> {
        bat.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        // A fixed disk whose footer lies inside the guest range (a hostile size) must
        // not have its footer overwritten.
        if self.is_fixed() && offset + len > self.footer_at {
            return Err(Error::invalid(
                "write past the start of the fixed VHD's footer",
            ));
        }
        Ok(())
    }

    /// Zero (punching holes when `unmap`) the stored parts of a guest range.
    fn zero_range(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let zero_host = |at, n| zero_stored(&*self.storage, at, n, unmap);
        let Some(bat) = &self.bat else {
            return zero_host(offset, len);
        };
        let bs = self.lock(bat).block_size;
        for (pos, n) in pieces(bs, offset, len) {
            // An unallocated block reads as zeroes already.
            let host = self.lock(bat).host_offset(pos);
            if let Some(h) = host {
                zero_host(h, n)?;
            }
        }
        Ok(())
    }
}

impl BlockDriver for VpcImage {
    fn format_name(&self) -> &'static str {
        "vpc"
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
        let Some(bat) = &self.bat else {
            return self
                .storage
                .read_vectored_at(bufs, offset)
                .map_err(io_err("Failed to read"));
        };
        let bs = self.lock(bat).block_size;
        let mut front = iovec::Front::new(bufs);
        for (pos, n) in pieces(bs, offset, len) {
            let part = front.take(n as usize);
            let host = self.lock(bat).host_offset(pos);
            match host {
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
        let Some(bat) = &self.bat else {
            return self
                .storage
                .write_vectored_at(bufs, offset)
                .map_err(io_err("Failed to write"));
        };
        let bs = self.lock(bat).block_size;
        let mut front = iovec::Front::new(bufs);
        for (pos, n) in pieces(bs, offset, len) {
            let part = front.take(n as usize);
            // Allocation happens under the lock, so two writers never both allocate one
            // block; the data goes to the file outside it.
            let host =
                self.lock(bat)
                    .host_offset_for_write(&*self.storage, &self.footer.bytes, pos)?;
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
        let Some(bat) = &self.bat else {
            // Data at its own offset, refined by the file (QEMU's "recurse"): a hole in
            // the file is data that reads as zeroes.
            return stored_data_status(&*self.storage, offset, len);
        };
        let bat = self.lock(bat);
        let mut pieces = pieces(bat.block_size, offset, len);
        let (pos, n) = pieces.next().expect("len > 0");
        if let Some(h) = bat.host_offset(pos) {
            return Ok(BlockStatus {
                len: n,
                allocation: Allocation::Data,
                depth: 0,
                host_offset: Some(h),
                compressed: false,
            });
        }
        // A run of unallocated blocks reads as zeroes (QEMU's "zero", at depth 0).
        let mut run = n;
        for (p, n) in pieces {
            if bat.host_offset(p).is_some() {
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
        self.block_size().map(|b| Clusters {
            cluster: b,
            subcluster: b,
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
