//! The vhdx format (Hyper-V): a 1 MiB header section (file identifier, two headers, two
//! region tables), a metadata log, a block allocation table (BAT), metadata, and payload
//! blocks of 1 to 256 MiB appended at 1 MiB boundaries as they are first written (dynamic)
//! or laid out at creation (fixed).
//!
//! As in QEMU: differencing images are refused, the whole disk reports as data without
//! an offset (QEMU's vhdx has no block status), every BAT update goes through the log and
//! is replayed at once, and a dirty image's log is replayed on a read-write open (a
//! read-only open refuses it).
//!
//! Concurrency: the BAT, headers and log are behind a read-write lock. Lookups take it
//! shared and release it before data moves; allocating a block takes it exclusively and
//! writes the block's data before its entry is logged and becomes visible, so a second
//! writer of the same block waits, then writes in place.

pub mod bat;
pub mod check;
pub mod crc;
pub mod create;
pub mod header;
pub mod log;
pub mod metadata;
pub mod region;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::block_map::pieces;
use crate::driver::{check_range, Allocation, BlockDriver, BlockStatus, Clusters};
use crate::error::{io_err, Error, Result};
use crate::iovec::{self, IoBuf, IoBufMut};
use crate::storage::Storage;

use bat::{Bat, Payload};
use header::{Headers, FILE_SIGNATURE, HEADER_SECTION_END};
use log::Log;
use region::Regions;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A GUID as VHDX stores it (the first three fields little-endian).
const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// A new random GUID.
fn new_guid() -> Result<[u8; 16]> {
    crate::uuid::random_v4()
}

/// QEMU's bare errno for an open that fails without a message: the chain opener names
/// the file.
fn errno(e: i32) -> Error {
    Error::io("", std::io::Error::from_raw_os_error(e))
}

/// What allocation changes: the BAT, the headers (log GUID, sequence numbers), the log.
struct State {
    bat: Bat,
    headers: Headers,
    log: Log,
}

/// An open VHDX image.
pub struct VhdxImage {
    storage: Box<dyn Storage>,
    size: u64,
    block_size: u64,
    read_only: bool,
    /// The open replayed a log (`check` counts it as a repaired corruption).
    log_replayed: bool,
    /// The regions (log, BAT, metadata) payload blocks must not overlap.
    regions: Regions,
    /// The headers got a new data-write GUID (once, before the first guest write).
    data_guid_set: AtomicBool,
    state: RwLock<State>,
}

impl VhdxImage {
    /// Open the image `name` on `storage` (opened and locked by the chain opener), with
    /// QEMU's checks in its order. `check` is QEMU's BDRV_O_CHECK: the BAT entries are
    /// left for `check` to report instead of failing the open.
    pub fn open(
        storage: Box<dyn Storage>,
        name: &str,
        read_only: bool,
        check: bool,
    ) -> Result<VhdxImage> {
        let mut sig = [0u8; 8];
        storage
            .read_at(&mut sig, 0)
            .map_err(io_err("Could not read the VHDX file identifier"))?;
        if &sig != FILE_SIGNATURE {
            return Err(errno(libc::EINVAL));
        }
        let mut headers = Headers::load(&*storage)?;
        let h = headers.current().clone();
        let mut regions = Regions::default();
        regions.register(h.log_offset, u64::from(h.log_length));
        header::check_log_place(&h)?;
        let mut log = Log::new(h.log_offset, u64::from(h.log_length));
        let mut log_replayed = false;
        let mut data_guid_set = false;
        if h.has_log() && h.log_length != 0 {
            if u64::from(h.log_length) % HEADER_SECTION_END != 0 {
                return Err(errno(libc::EINVAL));
            }
            if let Some(seq) = log.search(&*storage, &h.log_guid)? {
                if read_only {
                    return Err(Error::Unsupported(format!(
                        "VHDX image file '{name}' opened read-only, but contains a log that \
                         needs to be replayed\nTo replay the log, run:\nqemu-img check -r all \
                         '{name}'"
                    )));
                }
                headers.update(&*storage, true, None)?;
                data_guid_set = true;
                log.replay(&*storage, seq, &h.log_guid)?;
                headers.update(&*storage, false, Some([0; 16]))?;
                log_replayed = true;
            }
        }
        let (bat_region, meta_region) = region::load(&*storage, &mut regions)?;
        let m = metadata::load(&*storage, meta_region.offset)?;
        let file_len = storage
            .len()
            .map_err(io_err("Could not get the image size"))?;
        let bat = Bat::load(
            &*storage,
            bat_region,
            m.virtual_size,
            m.block_size,
            file_len,
        )?;
        if !check {
            if let Some(m) = bat.check(file_len, &regions, true).into_iter().next() {
                return Err(Error::corrupt(m));
            }
        }
        Ok(VhdxImage {
            storage,
            size: m.virtual_size,
            block_size: m.block_size,
            read_only,
            log_replayed,
            regions,
            data_guid_set: AtomicBool::new(data_guid_set),
            state: RwLock::new(State { bat, headers, log }),
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

    fn state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn state_mut(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// `qemu-img check` for vhdx: a log replayed on open counts as a repaired corruption,
    /// every BAT entry past the end of the file or over a region as a corruption.
    pub fn check(&self) -> Result<crate::check::CheckReport> {
        let file_len = self
            .storage
            .len()
            .map_err(io_err("Could not determinate VHDX image file size."))?;
        Ok(check::check(
            &self.state().bat,
            file_len,
            &self.regions,
            self.log_replayed,
        ))
    }

    /// Before the first guest-visible write: a new data-write GUID in the headers.
    fn mark_data_written(&self, st: &mut State) -> Result<()> {
        if !self.data_guid_set.load(Ordering::Acquire) {
            st.headers.update(&*self.storage, true, None)?;
            self.data_guid_set.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Allocate the payload block holding guest `pos` at the end of the file (1 MiB
    /// aligned), write `data` at its place in it, then log the new BAT entry and replay
    /// it as QEMU does. The caller holds the state exclusively.
    fn allocate(&self, st: &mut State, pos: u64, data: &[IoBuf<'_>]) -> Result<()> {
        let io = |what: &'static str| io_err(what);
        let s = &*self.storage;
        let len = s.len().map_err(io("Could not get the image size"))?;
        let start = len
            .checked_next_multiple_of(HEADER_SECTION_END)
            .filter(|&o| o <= i64::MAX as u64 - self.block_size)
            .ok_or_else(|| errno(libc::EINVAL))?;
        s.set_len(start + self.block_size)
            .map_err(io("Could not grow the VHDX image"))?;
        s.write_vectored_at(data, start + pos % self.block_size)
            .map_err(io("Failed to write"))?;
        s.flush().map_err(io("Failed to flush"))?;
        let index = st.bat.index_of(pos);
        let value = bat::entry(start, bat::FULLY_PRESENT);
        let at = st.bat.offset + index * 8;
        let page_at = at / log::SECTOR * log::SECTOR;
        let mut page = vec![0u8; log::SECTOR as usize];
        s.read_at(&mut page, page_at)
            .map_err(io("Could not read the VHDX BAT"))?;
        let in_page = (at - page_at) as usize;
        page[in_page..in_page + 8].copy_from_slice(&value.to_le_bytes());
        // QEMU's vhdx_log_write_and_flush: a log GUID, the entry, then the BAT itself.
        if st.headers.current().has_log() {
            return Err(Error::Unsupported(
                "The VHDX log must be empty before a BAT update".into(),
            ));
        }
        let guid = new_guid()?;
        st.headers.update(s, false, Some(guid))?;
        let file_len = s.len().map_err(io("Could not get the image size"))?;
        st.log.write_entry(s, page_at, &page, file_len, &guid)?;
        s.flush().map_err(io("Failed to flush"))?;
        s.write_at(&page, page_at)
            .and_then(|()| s.flush())
            .map_err(io("Could not write the VHDX BAT"))?;
        st.headers.update(s, false, Some([0; 16]))?;
        st.bat.set(index, value);
        Ok(())
    }

    /// The host offset of guest `pos`, or why there is none.
    fn host(&self, bat: &Bat, pos: u64) -> Result<Option<u64>> {
        match bat.payload(pos) {
            Payload::Zero => Ok(None),
            // QEMU reads a block at file offset 0 from 0, without the offset in it.
            Payload::Present(0) => Ok(Some(0)),
            Payload::Present(o) => Ok(Some(o + pos % self.block_size)),
            Payload::Invalid => Err(Error::io(
                "Failed to read",
                std::io::Error::from_raw_os_error(libc::EIO),
            )),
        }
    }
}

impl BlockDriver for VhdxImage {
    fn format_name(&self) -> &'static str {
        "vhdx"
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
            let host = self.host(&self.state().bat, pos)?;
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
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        if !self.data_guid_set.load(Ordering::Acquire) {
            self.mark_data_written(&mut self.state_mut())?;
        }
        let mut front = iovec::Front::new(bufs);
        for (pos, n) in pieces(self.block_size, offset, len) {
            let part = front.take(n as usize);
            let host = self.host(&self.state().bat, pos)?;
            let host = match host {
                Some(h) => h,
                None => {
                    let mut st = self.state_mut();
                    match self.host(&st.bat, pos)? {
                        // Another writer allocated it meanwhile.
                        Some(h) => h,
                        None => {
                            self.allocate(&mut st, pos, &part)?;
                            continue;
                        }
                    }
                }
            };
            if host < HEADER_SECTION_END {
                return Err(Error::io(
                    "Failed to write",
                    std::io::Error::from_raw_os_error(libc::EFAULT),
                ));
            }
            self.storage
                .write_vectored_at(&part, host)
                .map_err(io_err("Failed to write"))?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        // QEMU's vhdx writes zero buffers: blocks holding data get zeroes written,
        // blocks that read as zeroes stay as they are.
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        for (pos, n) in pieces(self.block_size, offset, len) {
            if let Some(h) = self.host(&self.state().bat, pos)? {
                if !self.data_guid_set.load(Ordering::Acquire) {
                    self.mark_data_written(&mut self.state_mut())?;
                }
                crate::block_map::zero_stored(&*self.storage, h, n, false)?;
            }
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // QEMU's vhdx has no discard: nothing changes.
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)
    }

    fn flush(&self) -> Result<()> {
        self.storage.flush().map_err(io_err("Failed to flush"))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Err(Error::invalid("block_status of an empty range"));
        }
        Ok(BlockStatus {
            len,
            allocation: Allocation::Data,
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
