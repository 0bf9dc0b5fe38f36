//! The metadata log: a circular buffer of 4 KiB sectors holding entries (a header,
//! descriptors, data sectors, CRC-32C over all of it). QEMU writes every BAT update as
//! one entry and replays it at once; on open, the newest valid sequence of entries of a
//! dirty image (non-zero log GUID) is found and replayed, as QEMU's `vhdx_log_search`
//! and `vhdx_log_flush` do.
//!
//! Unlike QEMU, a search that makes no progress steps on, and a search bounded to a few
//! laps of the log fails, so that no log can make the open spin.

use crate::block_map::zero_stored;
use crate::error::{io_err, Result};
use crate::storage::Storage;

use super::crc::Crc;
use super::{errno, le32, le64};

/// The log's unit.
pub const SECTOR: u64 = 4096;
const ENTRY_SIGNATURE: &[u8; 4] = b"loge";
const DATA_DESC: &[u8; 4] = b"desc";
const ZERO_DESC: &[u8; 4] = b"zero";
const DATA_SECTOR: &[u8; 4] = b"data";
/// Sectors read while searching, per sector of the log, before the search gives up.
const SEARCH_LAPS: u64 = 4;

/// Where the log is and where its next entry goes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Log {
    pub offset: u64,
    pub length: u64,
    read: u64,
    write: u64,
    tail: u64,
    sequence: u64,
}

/// An entry header's fields.
#[derive(Debug, Clone, Copy)]
struct EntryHeader {
    checksum: u32,
    entry_length: u64,
    sequence: u64,
    descriptors: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
}

/// A run of valid entries found by the search.
#[derive(Debug, Clone, Copy)]
pub struct Sequence {
    read: u64,
    count: u64,
    first_sequence: u64,
}

/// One descriptor.
#[derive(Debug, Clone, Copy)]
struct Descriptor {
    zero: bool,
    trailing: [u8; 4],
    leading: [u8; 8],
    /// For a zero descriptor, the bytes to zero.
    zero_length: u64,
    file_offset: u64,
    sequence: u64,
}

impl Descriptor {
    fn parse(d: &[u8]) -> Option<Descriptor> {
        let zero = &d[..4] == ZERO_DESC;
        (zero || &d[..4] == DATA_DESC).then(|| Descriptor {
            zero,
            trailing: d[4..8].try_into().expect("4 bytes"),
            leading: d[8..16].try_into().expect("8 bytes"),
            zero_length: le64(d, 8),
            file_offset: le64(d, 16),
            sequence: le64(d, 24),
        })
    }

    /// QEMU's `vhdx_log_desc_is_valid`.
    fn is_valid(&self, h: &EntryHeader) -> bool {
        self.sequence == h.sequence
            && self.file_offset.is_multiple_of(SECTOR)
            && (!self.zero || self.zero_length.is_multiple_of(SECTOR))
    }
}

/// Sectors the header and `n` descriptors take (126 in the first, 128 in the others).
fn descriptor_sectors(n: u64) -> u64 {
    (n + 2).div_ceil(128)
}

impl Log {
    pub fn new(offset: u64, length: u64) -> Log {
        Log {
            offset,
            length,
            ..Log::default()
        }
    }

    fn next(&self, idx: u64) -> u64 {
        let i = idx + SECTOR;
        if i >= self.length {
            0
        } else {
            i
        }
    }

    fn read_sector(&self, storage: &dyn Storage, idx: u64, buf: &mut [u8]) -> Result<()> {
        storage
            .read_at(buf, self.offset + idx)
            .map_err(io_err("Could not read the VHDX log"))
    }

    /// The entry header at `idx`, if QEMU's `vhdx_log_hdr_is_valid` accepts it.
    fn header_at(
        &self,
        storage: &dyn Storage,
        idx: u64,
        guid: &[u8; 16],
    ) -> Result<Option<EntryHeader>> {
        let mut b = [0u8; 64];
        self.read_sector(storage, idx, &mut b)?;
        let h = EntryHeader {
            checksum: le32(&b, 4),
            entry_length: u64::from(le32(&b, 8)),
            sequence: le64(&b, 16),
            descriptors: u64::from(le32(&b, 24)),
            flushed_file_offset: le64(&b, 48),
            last_file_offset: le64(&b, 56),
        };
        let valid = &b[..4] == ENTRY_SIGNATURE
            && h.entry_length <= self.length
            && h.entry_length.is_multiple_of(SECTOR)
            && h.sequence != 0
            && b[32..48] == *guid
            && h.descriptors * 32 <= h.entry_length;
        Ok(valid.then_some(h))
    }

    /// Read the descriptor sectors of the entry `h` at `*idx` (moving `*idx` past them),
    /// feeding them to `crc` and each descriptor to `each`; an invalid descriptor fails
    /// with EINVAL, as in QEMU.
    fn descriptors(
        &self,
        storage: &dyn Storage,
        idx: &mut u64,
        h: &EntryHeader,
        crc: &mut Crc,
        mut each: impl FnMut(Descriptor) -> Result<()>,
    ) -> Result<()> {
        let mut sector = vec![0u8; SECTOR as usize];
        let mut seen = 0u64;
        for s in 0..descriptor_sectors(h.descriptors) {
            self.read_sector(storage, *idx, &mut sector)?;
            *idx = self.next(*idx);
            if s == 0 {
                crc.update_skipping(&sector, 4);
            } else {
                crc.update(&sector);
            }
            let start = if s == 0 { 64 } else { 0 };
            for d in sector[start..].chunks_exact(32) {
                if seen == h.descriptors {
                    break;
                }
                seen += 1;
                match Descriptor::parse(d).filter(|d| d.is_valid(h)) {
                    Some(d) => each(d)?,
                    None => return Err(errno(libc::EINVAL)),
                }
            }
        }
        Ok(())
    }

    /// QEMU's `vhdx_validate_log_entry` at `*idx`: the entry if it is valid (and, when
    /// `after` is non-zero, numbered `after + 1`). `*idx` moves one sector past an
    /// invalid header, else past what was read of the entry.
    fn validate(
        &self,
        storage: &dyn Storage,
        idx: &mut u64,
        after: u64,
        guid: &[u8; 16],
        budget: &mut u64,
    ) -> Result<Option<EntryHeader>> {
        let h = match self.header_at(storage, *idx, guid)? {
            Some(h) if after == 0 || h.sequence == after.wrapping_add(1) => h,
            _ => {
                *idx = self.next(*idx);
                return Ok(None);
            }
        };
        let total = h.entry_length / SECTOR;
        let desc = descriptor_sectors(h.descriptors);
        *budget = budget
            .checked_sub(total.max(desc))
            .ok_or_else(|| errno(libc::EINVAL))?;
        let mut crc = Crc::default();
        self.descriptors(storage, idx, &h, &mut crc, |_| Ok(()))?;
        let mut sector = vec![0u8; SECTOR as usize];
        for _ in desc..total {
            self.read_sector(storage, *idx, &mut sector)?;
            *idx = self.next(*idx);
            crc.update(&sector);
        }
        Ok((crc.value() == h.checksum).then_some(h))
    }

    /// Find the valid sequence of entries with the highest first sequence number (QEMU's
    /// `vhdx_log_search`), if any; the next entry written is numbered after it.
    pub fn search(&mut self, storage: &dyn Storage, guid: &[u8; 16]) -> Result<Option<Sequence>> {
        let mut budget = SEARCH_LAPS * (self.length / SECTOR) + 16;
        let mut best: Option<Sequence> = None;
        let mut idx = 0;
        loop {
            let tail = idx;
            if let Some(h) = self.validate(storage, &mut idx, 0, guid, &mut budget)? {
                let mut seq = Sequence {
                    read: tail,
                    count: 1,
                    first_sequence: h.sequence,
                };
                let mut last = 0;
                while let Some(h) = self.validate(storage, &mut idx, last, guid, &mut budget)? {
                    seq.count += 1;
                    last = h.sequence;
                }
                if best.is_none_or(|b| seq.first_sequence > b.first_sequence) {
                    best = Some(seq);
                }
            }
            if idx < tail {
                break;
            }
            if idx == tail {
                // An entry as long as the log that is not valid: QEMU would read it forever.
                idx = self.next(idx);
                if idx < tail {
                    break;
                }
            }
        }
        if let Some(b) = best {
            self.sequence = b.first_sequence.wrapping_add(1);
        }
        Ok(best)
    }

    /// Write the entries of `seq` to their places in the file (QEMU's `vhdx_log_flush`
    /// without the header updates, which the caller makes), then flush.
    pub fn replay(&mut self, storage: &dyn Storage, seq: Sequence, guid: &[u8; 16]) -> Result<()> {
        let io = io_err("Could not replay the VHDX log");
        let mut idx = seq.read;
        for _ in 0..seq.count {
            let file_len = storage.len().map_err(&io)?;
            let h = self
                .header_at(storage, idx, guid)?
                .ok_or_else(|| errno(libc::EINVAL))?;
            if h.flushed_file_offset > file_len {
                return Err(errno(libc::EINVAL));
            }
            let mut data_idx = idx;
            for _ in 0..descriptor_sectors(h.descriptors) {
                data_idx = self.next(data_idx);
            }
            let mut sector = vec![0u8; SECTOR as usize];
            let mut crc = Crc::default();
            self.descriptors(storage, &mut idx, &h, &mut crc, |d| {
                if d.zero {
                    // Zeroes up to the end of the file are written, past it the file grows.
                    let end = d.file_offset.saturating_add(d.zero_length);
                    let len = storage.len().map_err(&io)?;
                    if d.file_offset < len {
                        zero_stored(storage, d.file_offset, end.min(len) - d.file_offset, false)?;
                    }
                    if end > len {
                        storage.set_len(end).map_err(&io)?;
                    }
                    return storage.flush().map_err(&io);
                }
                self.read_sector(storage, data_idx, &mut sector)?;
                data_idx = self.next(data_idx);
                let s = (u64::from(le32(&sector, 4)) << 32) | u64::from(le32(&sector, 4092));
                if &sector[..4] != DATA_SECTOR || s != d.sequence {
                    return Err(errno(libc::EINVAL));
                }
                sector[..8].copy_from_slice(&d.leading);
                sector[4092..].copy_from_slice(&d.trailing);
                storage
                    .write_at(&sector, d.file_offset)
                    .and_then(|()| storage.flush())
                    .map_err(&io)
            })?;
            idx = data_idx;
            if file_len < h.last_file_offset && h.last_file_offset % (1 << 20) != 0 {
                let new_len = h
                    .last_file_offset
                    .checked_next_multiple_of(1 << 20)
                    .filter(|&l| l <= i64::MAX as u64)
                    .ok_or_else(|| errno(libc::EINVAL))?;
                storage.set_len(new_len).map_err(&io)?;
            }
        }
        storage.flush().map_err(&io)?;
        self.read = 0;
        self.write = 0;
        Ok(())
    }

    /// Write one entry that puts the 4 KiB `page` at `file_offset`, with the file now
    /// `file_len` bytes long, under `guid` (QEMU's `vhdx_log_write` of a BAT update).
    pub fn write_entry(
        &mut self,
        storage: &dyn Storage,
        file_offset: u64,
        page: &[u8],
        file_len: u64,
        guid: &[u8; 16],
    ) -> Result<()> {
        if self.sequence == 0 {
            self.sequence = 1;
        }
        let seq = self.sequence;
        let mut e = vec![0u8; 2 * SECTOR as usize];
        e[..4].copy_from_slice(ENTRY_SIGNATURE);
        e[8..12].copy_from_slice(&(2 * SECTOR as u32).to_le_bytes());
        e[12..16].copy_from_slice(&(self.tail as u32).to_le_bytes());
        e[16..24].copy_from_slice(&seq.to_le_bytes());
        e[24..28].copy_from_slice(&1u32.to_le_bytes());
        e[32..48].copy_from_slice(guid);
        e[48..56].copy_from_slice(&file_len.to_le_bytes());
        e[56..64].copy_from_slice(&file_len.to_le_bytes());
        let d = &mut e[64..96];
        d[..4].copy_from_slice(DATA_DESC);
        d[4..8].copy_from_slice(&page[4092..4096]);
        d[8..16].copy_from_slice(&page[..8]);
        d[16..24].copy_from_slice(&file_offset.to_le_bytes());
        d[24..32].copy_from_slice(&seq.to_le_bytes());
        let s = &mut e[SECTOR as usize..];
        s[..4].copy_from_slice(DATA_SECTOR);
        s[4..8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
        s[8..4092].copy_from_slice(&page[8..4092]);
        s[4092..].copy_from_slice(&(seq as u32).to_le_bytes());
        super::crc::seal(&mut e, 4);
        for sector in e.chunks_exact(SECTOR as usize) {
            let at = self.write;
            let next = self.next(at);
            if next == self.read {
                return Err(errno(libc::EINVAL));
            }
            storage
                .write_at(sector, self.offset + at)
                .map_err(io_err("Could not write the VHDX log"))?;
            self.write = next;
        }
        self.sequence += 1;
        self.tail = self.write;
        // What QEMU's replay of the entry leaves: the log read up to here.
        self.read = self.write;
        Ok(())
    }
}
