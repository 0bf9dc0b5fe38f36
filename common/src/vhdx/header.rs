//! The VHDX header section: the file identifier at 0 and the two 4 KiB headers at 64 KiB
//! and 128 KiB (CRC-32C, the one with the higher sequence number current), updated as the
//! spec asks: the non-current one rewritten with the next sequence number, twice.

use crate::error::{io_err, Error, Result};
use crate::storage::Storage;

use super::crc;
use super::{errno, le16, le32, le64};

/// The file type identifier at offset 0.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Where the two headers lie.
pub const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
/// The bytes a header's checksum covers.
pub const HEADER_SIZE: usize = 4096;
/// The end of the header section, where QEMU puts the log.
pub const HEADER_SECTION_END: u64 = 1 << 20;
const SIGNATURE: &[u8; 4] = b"head";

/// One header's fields (little-endian at these offsets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub sequence: u64,
    pub file_write_guid: [u8; 16],
    pub data_write_guid: [u8; 16],
    pub log_guid: [u8; 16],
    pub log_version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// The header in `b`, if its checksum, signature and version (1) are right.
    fn parse(b: &[u8]) -> Option<Header> {
        (crc::is_valid(b, 4) && &b[..4] == SIGNATURE && le16(b, 66) == 1).then(|| Header {
            sequence: le64(b, 8),
            file_write_guid: b[16..32].try_into().expect("16 bytes"),
            data_write_guid: b[32..48].try_into().expect("16 bytes"),
            log_guid: b[48..64].try_into().expect("16 bytes"),
            log_version: le16(b, 64),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        })
    }

    /// The header as stored: its fields over `reserved` (the rest of the 4 KiB), sealed.
    pub fn encode(&self, reserved: &[u8; HEADER_SIZE]) -> Vec<u8> {
        let mut b = reserved.to_vec();
        b[..4].copy_from_slice(SIGNATURE);
        b[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid);
        b[32..48].copy_from_slice(&self.data_write_guid);
        b[48..64].copy_from_slice(&self.log_guid);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&1u16.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        crc::seal(&mut b, 4);
        b
    }

    /// Whether a log may need replaying (QEMU: a non-zero log GUID).
    pub fn has_log(&self) -> bool {
        self.log_guid != [0; 16]
    }
}

/// Both headers as read, which one is current, and the GUID this session writes.
pub struct Headers {
    raw: [Box<[u8; HEADER_SIZE]>; 2],
    current: usize,
    header: Header,
    session_guid: [u8; 16],
}

impl Headers {
    /// Read the headers of `storage` and pick the current one as QEMU does (two valid
    /// ones with the same sequence number must be identical).
    pub fn load(storage: &dyn Storage) -> Result<Headers> {
        let mut raw = [Box::new([0u8; HEADER_SIZE]), Box::new([0u8; HEADER_SIZE])];
        for (b, at) in raw.iter_mut().zip(HEADER_OFFSETS) {
            storage
                .read_at(&mut b[..], at)
                .map_err(io_err("Could not read the VHDX headers"))?;
        }
        let parsed = [Header::parse(&raw[0][..]), Header::parse(&raw[1][..])];
        let current = match (&parsed[0], &parsed[1]) {
            (Some(_), None) => 0,
            (None, Some(_)) => 1,
            (Some(a), Some(b)) if a.sequence > b.sequence => 0,
            (Some(a), Some(b)) if b.sequence > a.sequence => 1,
            (Some(_), Some(_)) if raw[0] == raw[1] => 0,
            _ => return Err(Error::corrupt("No valid VHDX header found")),
        };
        let header = parsed[current]
            .clone()
            .expect("the current header is valid");
        Ok(Headers {
            raw,
            current,
            header,
            session_guid: super::new_guid()?,
        })
    }

    /// The current header.
    pub fn current(&self) -> &Header {
        &self.header
    }

    /// Write the non-current header as the next one, with this session's file-write GUID,
    /// a new data-write GUID if `new_data_guid`, and `log_guid` if given; then again, so
    /// that both headers agree (QEMU's `vhdx_update_headers`). Each write is flushed.
    pub fn update(
        &mut self,
        storage: &dyn Storage,
        new_data_guid: bool,
        log_guid: Option<[u8; 16]>,
    ) -> Result<()> {
        for _ in 0..2 {
            let next = 1 - self.current;
            let mut h = self.header.clone();
            h.sequence = h.sequence.wrapping_add(1);
            h.file_write_guid = self.session_guid;
            if new_data_guid {
                h.data_write_guid = super::new_guid()?;
            }
            if let Some(g) = log_guid {
                h.log_guid = g;
            }
            let bytes = h.encode(&self.raw[next]);
            storage
                .write_at(&bytes, HEADER_OFFSETS[next])
                .and_then(|()| storage.flush())
                .map_err(io_err("Could not write the VHDX header"))?;
            self.raw[next].copy_from_slice(&bytes);
            self.current = next;
            self.header = h;
        }
        Ok(())
    }
}

/// QEMU's checks of the log's place in the current header, before it looks for entries.
pub fn check_log_place(h: &Header) -> Result<()> {
    if h.log_offset < HEADER_SECTION_END
        || !h.log_offset.is_multiple_of(HEADER_SECTION_END)
        || h.log_version != 0
    {
        return Err(errno(libc::EINVAL));
    }
    Ok(())
}
