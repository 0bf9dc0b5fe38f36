//! The VDI header (512 bytes at offset 0, little-endian): QEMU's validation with its words,
//! and the encode of a new one.

use crate::error::{Error, Result};

/// Size of the header QEMU reads and writes.
pub const HEADER_SIZE: usize = 512;
/// The signature at 0x40.
pub const SIGNATURE: u32 = 0xbeda_107f;
/// Version 1.1, the only one QEMU opens.
const VERSION_1_1: u32 = 0x0001_0001;
/// Image types.
pub const TYPE_DYNAMIC: u32 = 1;
pub const TYPE_STATIC: u32 = 2;
/// The only block size QEMU opens and creates.
pub const BLOCK_SIZE: u32 = 1 << 20;
/// At most this many blocks: the block map must stay below 2 GiB (QEMU's limit).
pub const MAX_BLOCKS: u32 = ((1u64 << 31) - 512) as u32 / 4;
/// The largest disk QEMU opens or creates.
pub const MAX_DISK_SIZE: u64 = MAX_BLOCKS as u64 * BLOCK_SIZE as u64;
/// The text QEMU puts at the start.
const TEXT: &[u8] = b"<<< QEMU VM Virtual Disk Image >>>\n";

/// Where the fields are.
const AT_SIGNATURE: usize = 0x40;
const AT_VERSION: usize = 0x44;
const AT_HEADER_SIZE: usize = 0x48;
const AT_TYPE: usize = 0x4c;
const AT_OFFSET_BMAP: usize = 0x154;
const AT_OFFSET_DATA: usize = 0x158;
const AT_SECTOR_SIZE: usize = 0x168;
const AT_DISK_SIZE: usize = 0x170;
const AT_BLOCK_SIZE: usize = 0x178;
const AT_BLOCKS: usize = 0x180;
pub const AT_BLOCKS_ALLOCATED: usize = 0x184;
const AT_UUID_IMAGE: usize = 0x188;
const AT_UUID_LAST_SNAP: usize = 0x198;
const AT_UUID_LINK: usize = 0x1a8;
const AT_UUID_PARENT: usize = 0x1b8;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Whether `first` (a file's first bytes) is a VDI header, as QEMU's `vdi_probe` says:
/// a whole header with the signature.
pub fn probe(first: &[u8]) -> bool {
    first.len() >= HEADER_SIZE && le32(first, AT_SIGNATURE) == SIGNATURE
}

/// A validated header, its bytes kept to be written back with a new allocation count.
#[derive(Debug, Clone)]
pub struct Header {
    pub bytes: [u8; HEADER_SIZE],
    pub image_type: u32,
    pub offset_bmap: u64,
    pub offset_data: u64,
    /// Guest size (rounded up to whole sectors, as QEMU does for odd sizes).
    pub disk_size: u64,
    pub block_size: u64,
    pub blocks: u32,
    pub blocks_allocated: u32,
}

impl Header {
    /// Parse and check a header in QEMU's order and words.
    pub fn parse(bytes: [u8; HEADER_SIZE]) -> Result<Header> {
        let b = &bytes;
        let unsupported = |m: String| Err(Error::Unsupported(m));
        let disk_size = le64(b, AT_DISK_SIZE);
        if disk_size > MAX_DISK_SIZE {
            return unsupported(format!(
                "Unsupported VDI image size (size is 0x{disk_size:x}, max supported is \
                 0x{MAX_DISK_SIZE:x})"
            ));
        }
        // VirtualBox can make odd sizes; QEMU rounds them up.
        let disk_size = disk_size.next_multiple_of(512);
        let (signature, version) = (le32(b, AT_SIGNATURE), le32(b, AT_VERSION));
        let (bmap, data) = (le32(b, AT_OFFSET_BMAP), le32(b, AT_OFFSET_DATA));
        let (sector, block) = (le32(b, AT_SECTOR_SIZE), le32(b, AT_BLOCK_SIZE));
        let blocks = le32(b, AT_BLOCKS);
        let room = u64::from(blocks) * u64::from(block);
        let null = |at: usize| b[at..at + 16].iter().all(|&x| x == 0);
        if signature != SIGNATURE {
            return Err(Error::corrupt(format!(
                "Image not in VDI format (bad signature {signature:08x})"
            )));
        }
        if version != VERSION_1_1 {
            return unsupported(format!(
                "unsupported VDI image (version {}.{})",
                version >> 16,
                version & 0xffff
            ));
        }
        if bmap % 512 != 0 {
            return unsupported(format!(
                "unsupported VDI image (unaligned block map offset 0x{bmap:x})"
            ));
        }
        if data % 512 != 0 {
            return unsupported(format!(
                "unsupported VDI image (unaligned data offset 0x{data:x})"
            ));
        }
        if sector != 512 {
            return unsupported(format!(
                "unsupported VDI image (sector size {sector} is not 512)"
            ));
        }
        if block != BLOCK_SIZE {
            return unsupported(format!(
                "unsupported VDI image (block size {block} is not {BLOCK_SIZE})"
            ));
        }
        if disk_size > room {
            return unsupported(format!(
                "unsupported VDI image (disk size {disk_size}, image bitmap has room for \
                 {room})"
            ));
        }
        if !null(AT_UUID_LINK) {
            return unsupported("unsupported VDI image (non-NULL link UUID)".into());
        }
        if !null(AT_UUID_PARENT) {
            return unsupported("unsupported VDI image (non-NULL parent UUID)".into());
        }
        if blocks > MAX_BLOCKS {
            return unsupported(format!(
                "unsupported VDI image (too many blocks {blocks}, max is {MAX_BLOCKS})"
            ));
        }
        Ok(Header {
            image_type: le32(b, AT_TYPE),
            offset_bmap: u64::from(bmap),
            offset_data: u64::from(data),
            disk_size,
            block_size: u64::from(block),
            blocks,
            blocks_allocated: le32(b, AT_BLOCKS_ALLOCATED),
            bytes,
        })
    }

    /// Bytes of the block map as stored: whole sectors.
    pub fn bmap_len(&self) -> u64 {
        (u64::from(self.blocks) * 4).next_multiple_of(512)
    }
}

/// A new header as QEMU writes it: map at 512, data after it, 1 MiB blocks.
pub fn encode_new(disk_size: u64, fixed: bool, uuids: [[u8; 16]; 2]) -> [u8; HEADER_SIZE] {
    let blocks = disk_size.div_ceil(u64::from(BLOCK_SIZE)) as u32;
    let bmap_len = (u64::from(blocks) * 4).next_multiple_of(512) as u32;
    let mut b = [0u8; HEADER_SIZE];
    b[..TEXT.len()].copy_from_slice(TEXT);
    put32(&mut b, AT_SIGNATURE, SIGNATURE);
    put32(&mut b, AT_VERSION, VERSION_1_1);
    put32(&mut b, AT_HEADER_SIZE, 0x180);
    put32(
        &mut b,
        AT_TYPE,
        if fixed { TYPE_STATIC } else { TYPE_DYNAMIC },
    );
    put32(&mut b, AT_OFFSET_BMAP, 512);
    put32(&mut b, AT_OFFSET_DATA, 512 + bmap_len);
    put32(&mut b, AT_SECTOR_SIZE, 512);
    b[AT_DISK_SIZE..AT_DISK_SIZE + 8].copy_from_slice(&disk_size.to_le_bytes());
    put32(&mut b, AT_BLOCK_SIZE, BLOCK_SIZE);
    put32(&mut b, AT_BLOCKS, blocks);
    put32(&mut b, AT_BLOCKS_ALLOCATED, if fixed { blocks } else { 0 });
    b[AT_UUID_IMAGE..AT_UUID_IMAGE + 16].copy_from_slice(&uuids[0]);
    b[AT_UUID_LAST_SNAP..AT_UUID_LAST_SNAP + 16].copy_from_slice(&uuids[1]);
    b
}

/// Store `n` as the header's allocated block count.
pub fn set_blocks_allocated(bytes: &mut [u8; HEADER_SIZE], n: u32) {
    put32(bytes, AT_BLOCKS_ALLOCATED, n);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_headers_parse_and_limits_hold() {
        let h = Header::parse(encode_new(100 << 20, false, [[1; 16], [2; 16]])).unwrap();
        assert_eq!(
            (h.blocks, h.blocks_allocated, h.offset_data),
            (100, 0, 1024)
        );
        assert_eq!(h.image_type, TYPE_DYNAMIC);
        assert!(probe(&h.bytes));
        assert!(!probe(&h.bytes[..511]));
        // QEMU's limit, as qemu-img prints it.
        assert_eq!(MAX_DISK_SIZE, 0x1fffff8000000);
        let mut b = encode_new(1 << 20, true, [[0; 16]; 2]);
        b[AT_DISK_SIZE..AT_DISK_SIZE + 8].copy_from_slice(&(2u64 << 20).to_le_bytes());
        let e = Header::parse(b).unwrap_err().to_string();
        assert_eq!(
            e,
            "unsupported VDI image (disk size 2097152, image bitmap has room for 1048576)"
        );
    }
}
