//! The VHD footer (512 bytes, at the end of every image and copied to the start of dynamic
//! ones) and the dynamic disk header that follows that copy: validating parse, encode, and
//! their checksum (the one's complement of the byte sum, the checksum field counted as 0).

use crate::error::{Error, Result};

/// Size of the footer.
pub const FOOTER_SIZE: usize = 512;
/// Size of the dynamic disk header.
pub const DYN_HEADER_SIZE: usize = 1024;
/// The footer's cookie.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// The dynamic header's cookie.
const DYN_COOKIE: &[u8; 8] = b"cxsparse";
/// Disk types.
pub const TYPE_FIXED: u32 = 2;
pub const TYPE_DYNAMIC: u32 = 3;
/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 UTC).
const VHD_EPOCH: u64 = 946_684_800;
/// The largest disk QEMU opens or creates: 2040 GiB, in sectors.
pub const MAX_SECTORS: u64 = 0xff00_0000;

/// Where the footer keeps its checksum.
const FOOTER_CHECKSUM: usize = 64;
/// Where the dynamic header keeps its checksum.
const DYN_CHECKSUM: usize = 36;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The VHD checksum of `buf` with the 4 bytes at `field` taken as zero.
pub fn checksum(buf: &[u8], field: usize) -> u32 {
    let sum = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |s, (_, &b)| s.wrapping_add(u32::from(b)));
    !sum
}

/// A parsed footer, with its bytes kept to be written back unchanged.
#[derive(Debug, Clone)]
pub struct Footer {
    pub bytes: [u8; FOOTER_SIZE],
    /// Offset of the dynamic header (dynamic disks).
    pub data_offset: u64,
    pub disk_type: u32,
    /// The guest size in sectors, as QEMU derives it (geometry or current size).
    pub sectors: u64,
}

impl Footer {
    /// Parse a footer whose cookie the caller found; the checksum must match and the size
    /// must be one QEMU opens.
    pub fn parse(bytes: [u8; FOOTER_SIZE]) -> Result<Footer> {
        if checksum(&bytes, FOOTER_CHECKSUM) != be32(&bytes, FOOTER_CHECKSUM) {
            return Err(Error::corrupt("Incorrect header checksum"));
        }
        let chs = u64::from(be16(&bytes, 56)) * u64::from(bytes[58]) * u64::from(bytes[59]);
        // Virtual PC and QEMU ('qemu') size a disk by its geometry; Hyper-V, disk2vhd,
        // XenServer, XenConverter and QEMU with force_size ('qem2') by the size field, as
        // does everyone for the largest geometry (which cannot hold larger disks).
        let app = &bytes[28..32];
        let by_size = [b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"]
            .iter()
            .any(|a| app == *a);
        let sectors = if by_size || chs == MAX_GEOMETRY {
            be64(&bytes, 48) / 512
        } else {
            chs
        };
        if sectors > MAX_SECTORS {
            // QEMU's bare errno: the chain opener names the file.
            return Err(Error::io(
                "",
                std::io::Error::from_raw_os_error(libc::EFBIG),
            ));
        }
        Ok(Footer {
            data_offset: be64(&bytes, 16),
            disk_type: be32(&bytes, 60),
            sectors,
            bytes,
        })
    }

    /// Whether this is a fixed disk (guest data at its own offset, footer after it).
    pub fn is_fixed(&self) -> bool {
        self.disk_type == TYPE_FIXED
    }
}

/// What a new footer says.
pub struct NewFooter {
    pub size: u64,
    pub geometry: Geometry,
    pub fixed: bool,
    /// Sized by the size field rather than the geometry (`force_size`).
    pub force_size: bool,
    pub uuid: [u8; 16],
}

/// Encode a new footer as QEMU writes it.
pub fn encode_footer(f: &NewFooter) -> [u8; FOOTER_SIZE] {
    let mut b = [0u8; FOOTER_SIZE];
    b[..8].copy_from_slice(FOOTER_COOKIE);
    b[8..12].copy_from_slice(&2u32.to_be_bytes());
    b[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    let data_offset = if f.fixed { u64::MAX } else { 512 };
    b[16..24].copy_from_slice(&data_offset.to_be_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    b[24..28].copy_from_slice(&(now.saturating_sub(VHD_EPOCH) as u32).to_be_bytes());
    b[28..32].copy_from_slice(if f.force_size { b"qem2" } else { b"qemu" });
    // Virtual PC 2007's version, on "Windows 2000".
    b[32..34].copy_from_slice(&5u16.to_be_bytes());
    b[34..36].copy_from_slice(&3u16.to_be_bytes());
    b[36..40].copy_from_slice(b"Wi2k");
    b[40..48].copy_from_slice(&f.size.to_be_bytes());
    b[48..56].copy_from_slice(&f.size.to_be_bytes());
    b[56..58].copy_from_slice(&f.geometry.cyls.to_be_bytes());
    b[58] = f.geometry.heads;
    b[59] = f.geometry.secs;
    let ty = if f.fixed { TYPE_FIXED } else { TYPE_DYNAMIC };
    b[60..64].copy_from_slice(&ty.to_be_bytes());
    b[68..84].copy_from_slice(&f.uuid);
    let sum = checksum(&b, FOOTER_CHECKSUM);
    b[64..68].copy_from_slice(&sum.to_be_bytes());
    b
}

/// The fields of the dynamic disk header QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DynHeader {
    pub table_offset: u64,
    pub max_table_entries: u32,
    pub block_size: u32,
}

impl DynHeader {
    /// Parse the header's cookie and fields (QEMU does not check its checksum).
    pub fn parse(b: &[u8; DYN_HEADER_SIZE]) -> Result<DynHeader> {
        if &b[..8] != DYN_COOKIE {
            return Err(Error::corrupt("Invalid header magic"));
        }
        Ok(DynHeader {
            table_offset: be64(b, 16),
            max_table_entries: be32(b, 28),
            block_size: be32(b, 32),
        })
    }

    /// Encode the header as QEMU writes it (no parent).
    pub fn encode(&self) -> [u8; DYN_HEADER_SIZE] {
        let mut b = [0u8; DYN_HEADER_SIZE];
        b[..8].copy_from_slice(DYN_COOKIE);
        // The spec says 0xFFFFFFFF, but Microsoft's tools expect all 64 bits set.
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        let sum = checksum(&b, DYN_CHECKSUM);
        b[36..40].copy_from_slice(&sum.to_be_bytes());
        b
    }
}

/// A disk's CHS geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cyls: u16,
    pub heads: u8,
    pub secs: u8,
}

impl Geometry {
    /// The largest geometry (65535 x 16 x 255).
    pub const MAX: Geometry = Geometry {
        cyls: 65535,
        heads: 16,
        secs: 255,
    };

    /// Sectors the geometry covers.
    pub fn sectors(self) -> u64 {
        u64::from(self.cyls) * u64::from(self.heads) * u64::from(self.secs)
    }

    /// The VHD specification's geometry for `sectors` (it may round down).
    pub fn for_sectors(sectors: u64) -> Geometry {
        let total = sectors.min(MAX_GEOMETRY);
        let (secs, heads, cth) = if total >= 65535 * 16 * 63 {
            (255u64, 16u64, total / 255)
        } else {
            let mut secs = 17;
            let mut cth = total / secs;
            let mut heads = cth.div_ceil(1024).max(4);
            if cth >= heads * 1024 || heads > 16 {
                secs = 31;
                heads = 16;
                cth = total / secs;
            }
            if cth >= heads * 1024 {
                secs = 63;
                heads = 16;
                cth = total / secs;
            }
            (secs, heads, cth)
        };
        Geometry {
            cyls: (cth / heads) as u16,
            heads: heads as u8,
            secs: secs as u8,
        }
    }
}

/// Sectors of the largest geometry.
pub const MAX_GEOMETRY: u64 = 65535 * 16 * 255;

/// The geometry and guest size (in bytes, a multiple of 512) QEMU gives a new image of
/// `size` bytes: the smallest geometry holding it, or with `force_size` (or past what a
/// geometry holds) the size itself under the largest geometry.
pub fn rounded_size(size: u64, force_size: bool) -> Result<(Geometry, u64)> {
    let size = size.div_ceil(512) * 512;
    let geometry = if force_size {
        Geometry::MAX
    } else {
        let want = (size / 512).min(MAX_GEOMETRY);
        let mut g = Geometry {
            cyls: 0,
            heads: 0,
            secs: 0,
        };
        let mut i = 0;
        while want > g.sectors() {
            g = Geometry::for_sectors(want + i);
            i += 1;
        }
        g
    };
    if geometry.sectors() == MAX_GEOMETRY {
        if size / 512 > MAX_SECTORS {
            return Err(Error::invalid(
                "The image size is too large for file format 'vpc'",
            ));
        }
        Ok((geometry, size))
    } else {
        Ok((geometry, geometry.sectors() * 512))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes `qemu-img info` printed for images `qemu-img create -f vpc` made.
    #[test]
    fn rounding_matches_qemu() {
        for (asked, got) in [
            (0, 0),
            (1, 34816),
            (100 << 20, 104_865_792),
            (2040u64 << 30, 2_190_433_320_960),
        ] {
            assert_eq!(rounded_size(asked, false).unwrap().1, got, "{asked}");
        }
        assert_eq!(rounded_size(1000, true).unwrap().1, 1024);
        assert!(rounded_size(3000 << 30, false).is_err());
        assert!(rounded_size(3000 << 30, true).is_err());
    }

    #[test]
    fn footer_round_trips_and_checks_its_sum() {
        let (geometry, size) = rounded_size(10 << 20, false).unwrap();
        let b = encode_footer(&NewFooter {
            size,
            geometry,
            fixed: false,
            force_size: false,
            uuid: [7; 16],
        });
        let f = Footer::parse(b).unwrap();
        assert_eq!(f.sectors * 512, size);
        assert_eq!((f.disk_type, f.data_offset), (TYPE_DYNAMIC, 512));
        let mut bad = b;
        bad[100] ^= 1;
        let e = Footer::parse(bad).unwrap_err();
        assert_eq!(e.to_string(), "Incorrect header checksum");
        let h = DynHeader {
            table_offset: 1536,
            max_table_entries: 5,
            block_size: 2 << 20,
        };
        assert_eq!(DynHeader::parse(&h.encode()).unwrap(), h);
    }
}
