//! The hosted sparse extent header ("KDMV"), the streamOptimized footer that replaces it,
//! and QEMU's checks on both, in its order and words.

use crate::error::{Error, Result};

/// The sparse extent magic, `KDMV` (big-endian read of the first four bytes).
pub const MAGIC: [u8; 4] = *b"KDMV";
/// The VMFS sparse (VMDK3) magic, `COWD`.
pub const COWD_MAGIC: [u8; 4] = *b"COWD";
/// The header's grain directory offset when the footer holds the real one.
pub const GD_AT_END: u64 = u64::MAX;
/// Flag: newline detection bytes are valid.
pub const FLAG_NL_DETECT: u32 = 1;
/// Flag: a redundant grain directory exists.
pub const FLAG_RGD: u32 = 1 << 1;
/// Flag: grain table entry 1 means a zeroed grain.
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Flag: grains are compressed.
pub const FLAG_COMPRESS: u32 = 1 << 16;
/// Flag: grains and metadata are preceded by markers.
pub const FLAG_MARKER: u32 = 1 << 17;
/// `compressAlgorithm` for deflate.
pub const COMPRESSION_DEFLATE: u16 = 1;
/// The size of the encoded header, magic included.
pub const ENCODED_LEN: usize = 79;
/// Marker types of a stream.
pub const MARKER_EOS: u32 = 0;
pub const MARKER_GT: u32 = 1;
pub const MARKER_GD: u32 = 2;
pub const MARKER_FOOTER: u32 = 3;

/// A sparse extent header (all offsets and sizes in 512-byte sectors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SparseHeader {
    pub version: u32,
    pub flags: u32,
    pub capacity: u64,
    pub granularity: u64,
    pub desc_offset: u64,
    pub desc_size: u64,
    pub num_gtes_per_gt: u32,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    pub grain_offset: u64,
    pub compress_algorithm: u16,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl SparseHeader {
    /// Decode the fields after the magic from `b` (at least [`ENCODED_LEN`] bytes, magic
    /// first; the magic itself is the caller's to check).
    pub fn decode(b: &[u8]) -> SparseHeader {
        SparseHeader {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            granularity: le64(b, 20),
            desc_offset: le64(b, 28),
            desc_size: le64(b, 36),
            num_gtes_per_gt: le32(b, 44),
            rgd_offset: le64(b, 48),
            gd_offset: le64(b, 56),
            grain_offset: le64(b, 64),
            compress_algorithm: u16::from_le_bytes([b[77], b[78]]),
        }
    }

    /// Encode the header into a 512-byte sector, magic and newline check bytes included.
    pub fn encode(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.granularity.to_le_bytes());
        b[28..36].copy_from_slice(&self.desc_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.desc_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.num_gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.grain_offset.to_le_bytes());
        b[73..77].copy_from_slice(b"\n \r\n");
        b[77..79].copy_from_slice(&self.compress_algorithm.to_le_bytes());
        b
    }

    /// Whether grains are deflate-compressed (QEMU's test: the algorithm, not the flag).
    pub fn compressed(&self) -> bool {
        self.compress_algorithm == COMPRESSION_DEFLATE
    }
}

/// The footer of a stream (QEMU reads 1536 bytes ending 512 bytes before the end of the
/// file: footer marker, footer header, end-of-stream marker) and its header, after QEMU's
/// sanity checks.
pub fn parse_footer(b: &[u8; 1536]) -> Result<SparseHeader> {
    let marker_ok = |at: usize, ty: u32, val_zero: bool| {
        (!val_zero || le64(b, at) == 0) && le32(b, at + 8) == 0 && le32(b, at + 12) == ty
    };
    if b[512..516] != MAGIC
        || !marker_ok(0, MARKER_FOOTER, false)
        || !marker_ok(1024, MARKER_EOS, true)
    {
        return Err(Error::corrupt("Invalid footer"));
    }
    Ok(SparseHeader::decode(&b[512..]))
}

/// The grain directory geometry QEMU derives from a header, after its checks: grain size in
/// sectors, grain table entries, sectors one table covers, grain directory entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub grain_sectors: u64,
    pub gtes: u32,
    pub gt_sectors: u32,
    pub gd_entries: u32,
}

/// QEMU's largest grain (1 GiB in sectors) and grain directory (entries).
const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
const MAX_GD_ENTRIES: u32 = 32 * 1024 * 1024;

/// Check a header as QEMU's `vmdk_open_vmdk4` does (version, table sizes, a file holding
/// the grains' start) and derive its geometry. `file_sectors` is the file's length in
/// sectors, rounded up.
pub fn check(h: &SparseHeader, writable: bool, file_sectors: u64) -> Result<Geometry> {
    if h.version > 3 {
        return Err(Error::Unsupported(format!(
            "Unsupported VMDK version {}",
            h.version
        )));
    }
    if h.version == 3 && writable && !h.compressed() {
        return Err(Error::invalid("VMDK version 3 must be read only"));
    }
    if h.num_gtes_per_gt > 512 {
        return Err(Error::corrupt("L2 table size too big"));
    }
    // QEMU keeps the product in 32 bits.
    let gt_sectors = (u64::from(h.num_gtes_per_gt).wrapping_mul(h.granularity)) as u32;
    if gt_sectors == 0 {
        return Err(Error::corrupt("L1 entry size is invalid"));
    }
    let gd_entries = h.capacity.div_ceil(u64::from(gt_sectors)) as u32;
    if file_sectors < h.grain_offset {
        return Err(Error::corrupt(format!(
            "File truncated, expecting at least {} bytes",
            h.grain_offset.wrapping_mul(512) as i64
        )));
    }
    if h.granularity > MAX_GRAIN_SECTORS {
        return Err(Error::corrupt("Invalid granularity, image may be corrupt"));
    }
    if gd_entries > MAX_GD_ENTRIES {
        return Err(Error::corrupt("L1 size too big"));
    }
    Ok(Geometry {
        grain_sectors: h.granularity,
        gtes: h.num_gtes_per_gt,
        gt_sectors,
        gd_entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SparseHeader {
        SparseHeader {
            version: 1,
            flags: FLAG_NL_DETECT | FLAG_RGD,
            capacity: 20480,
            granularity: 128,
            desc_offset: 1,
            desc_size: 20,
            num_gtes_per_gt: 512,
            rgd_offset: 21,
            gd_offset: 26,
            grain_offset: 128,
            compress_algorithm: 0,
        }
    }

    #[test]
    fn round_trips() {
        let h = sample();
        let b = h.encode();
        assert_eq!(b[..4], MAGIC);
        assert_eq!(SparseHeader::decode(&b), h);
    }

    #[test]
    fn checks_in_qemus_order() {
        let mut h = sample();
        assert_eq!(check(&h, true, 1000).unwrap().gd_entries, 1);
        h.version = 4;
        assert!(check(&h, false, 1000)
            .unwrap_err()
            .to_string()
            .contains("version 4"));
        h.version = 3;
        assert!(check(&h, true, 1000).is_err());
        assert!(check(&h, false, 1000).is_ok());
        h.num_gtes_per_gt = 513;
        assert_eq!(
            check(&h, false, 1000).unwrap_err().to_string(),
            "L2 table size too big"
        );
        h.num_gtes_per_gt = 0;
        assert_eq!(
            check(&h, false, 1000).unwrap_err().to_string(),
            "L1 entry size is invalid"
        );
        h = sample();
        assert!(check(&h, false, 100)
            .unwrap_err()
            .to_string()
            .contains("65536 bytes"));
        h.granularity = 0x20_0001;
        h.num_gtes_per_gt = 1;
        assert!(check(&h, false, 1000)
            .unwrap_err()
            .to_string()
            .contains("granularity"));
        h = sample();
        h.capacity = u64::MAX / 2;
        h.num_gtes_per_gt = 1;
        h.granularity = 1;
        assert_eq!(
            check(&h, false, 1000).unwrap_err().to_string(),
            "L1 size too big"
        );
    }
}
