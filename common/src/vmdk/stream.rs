//! streamOptimized grains: a grain marker (guest sector, compressed size) followed by the
//! zlib stream of one grain, inflated as QEMU does (two grains' worth read, the size
//! checked against that, the stream required to end inside one grain).

use flate2::Status;

use crate::error::{Error, Result};
use crate::storage::Storage;

use super::grain::read_padded;

/// A grain marker's length before the compressed data.
pub const MARKER_LEN: usize = 12;

fn einval(what: &str) -> Error {
    Error::io(what, std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// The bytes read first at a marker: the marker and, for most grains, part of the stream.
const FIRST_READ: usize = 4096;

/// Inflate the grain whose marker is at host byte `host` into `out` (one grain long);
/// returns how many bytes the stream held. As in QEMU, a stream longer than two grains'
/// worth is refused; only as much as the marker names is read.
pub fn read_grain(
    storage: &dyn Storage,
    host: u64,
    has_marker: bool,
    out: &mut [u8],
) -> Result<usize> {
    let grain = out.len();
    let what = "Could not read a compressed grain";
    let (buf, start, len) = if has_marker {
        let mut buf = vec![0u8; FIRST_READ.min(grain * 2)];
        read_padded(storage, &mut buf, host, what)?;
        let size = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes")) as usize;
        if size == 0 || size > grain * 2 - MARKER_LEN {
            return Err(einval("Invalid compressed grain size"));
        }
        let have = buf.len();
        if MARKER_LEN + size > have {
            buf.resize(MARKER_LEN + size, 0);
            read_padded(storage, &mut buf[have..], host + have as u64, what)?;
        }
        (buf, MARKER_LEN, size)
    } else {
        let mut buf = vec![0u8; grain];
        read_padded(storage, &mut buf, host, what)?;
        (buf, 0, grain)
    };
    match crate::inflate::inflate(true, &buf[start..start + len], out) {
        Ok((Status::StreamEnd, written)) => Ok(written),
        _ => Err(einval("Could not inflate a compressed grain")),
    }
}

/// One grain's zlib stream (QEMU's `compress()`, level 6).
pub fn deflate(data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data)
        .map_err(|e| Error::io("Could not compress a grain", e))?;
    e.finish()
        .map_err(|e| Error::io("Could not compress a grain", e))
}

/// A grain's marker for guest sector `lba` and its zlib stream `z`, padded to a whole
/// number of sectors.
pub fn frame(lba: u64, z: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MARKER_LEN + z.len() + 512);
    out.extend_from_slice(&lba.to_le_bytes());
    out.extend_from_slice(&(z.len() as u32).to_le_bytes());
    out.extend_from_slice(z);
    out.resize(out.len().next_multiple_of(512), 0);
    out
}

/// [`deflate`] and [`frame`] together.
#[cfg(test)]
fn encode_grain(lba: u64, data: &[u8]) -> Result<Vec<u8>> {
    Ok(frame(lba, &deflate(data)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault_storage::MemStorage;

    #[test]
    fn grains_round_trip_and_hostile_sizes_fail() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let enc = encode_grain(128, &data).unwrap();
        let s = MemStorage::new();
        s.write_at(&enc, 512).unwrap();
        let mut out = vec![0u8; 65536];
        assert_eq!(read_grain(&s, 512, true, &mut out).unwrap(), 65536);
        assert_eq!(out, data);
        let mut bad = enc.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        s.write_at(&bad, 512).unwrap();
        assert!(read_grain(&s, 512, true, &mut out).is_err());
        bad[8..12].copy_from_slice(&0u32.to_le_bytes());
        s.write_at(&bad, 512).unwrap();
        assert!(read_grain(&s, 512, true, &mut out).is_err());
        // A grain of garbage, or one that inflates to more than a grain.
        s.write_at(&[0xffu8; 4096], 512).unwrap();
        assert!(read_grain(&s, 512, true, &mut out).is_err());
        let big = encode_grain(0, &vec![0u8; 65536 * 2]).unwrap();
        s.write_at(&big, 512).unwrap();
        assert!(read_grain(&s, 512, true, &mut out).is_err());
    }

    /// A stream longer than the first read is read on from the file, to its end.
    #[test]
    fn incompressible_grains_are_read_whole() {
        let data = crate::test_tools::noise(65536);
        let enc = encode_grain(0, &data).unwrap();
        assert!(enc.len() > FIRST_READ * 2, "{}", enc.len());
        let s = MemStorage::new();
        s.write_at(&enc, 1024).unwrap();
        let mut out = vec![0u8; 65536];
        assert_eq!(read_grain(&s, 1024, true, &mut out).unwrap(), 65536);
        assert_eq!(out, data);
        // Cut short by the end of the file: the rest reads as zeroes and fails to inflate.
        let cut = MemStorage::new();
        cut.write_at(&enc[..enc.len() / 2], 0).unwrap();
        assert!(read_grain(&cut, 0, true, &mut out).is_err());
    }
}
