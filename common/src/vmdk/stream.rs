//! streamOptimized grains: a grain marker (guest sector, compressed size) followed by the
//! zlib stream of one grain, inflated as QEMU does (two grains' worth read, the size
//! checked against that, the stream required to end inside one grain).

use flate2::{Decompress, FlushDecompress, Status};

use crate::error::{Error, Result};
use crate::storage::Storage;

use super::grain::read_padded;

/// A grain marker's length before the compressed data.
pub const MARKER_LEN: usize = 12;

fn einval(what: &str) -> Error {
    Error::io(what, std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// Inflate the grain whose marker is at host byte `host` into `out` (one grain long);
/// returns how many bytes the stream held.
pub fn read_grain(
    storage: &dyn Storage,
    host: u64,
    has_marker: bool,
    out: &mut [u8],
) -> Result<usize> {
    let grain = out.len();
    let mut buf = vec![0u8; grain * 2];
    read_padded(storage, &mut buf, host, "Could not read a compressed grain")?;
    let (data, len) = if has_marker {
        let size = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes")) as usize;
        (&buf[MARKER_LEN..], size)
    } else {
        (&buf[..], grain)
    };
    if len == 0 || len > data.len() {
        return Err(einval("Invalid compressed grain size"));
    }
    let mut z = Decompress::new(true);
    match z.decompress(&data[..len], out, FlushDecompress::Finish) {
        Ok(Status::StreamEnd) => Ok(z.total_out() as usize),
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
}
