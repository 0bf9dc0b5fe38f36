//! Compressed clusters: zlib (raw deflate, as QEMU writes it) and zstd.

use super::header::CompressionType;
use crate::error::{Error, Result};

/// Decompress one cluster from `input` into `out` (exactly one cluster long).
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Zlib => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<()> {
    let mut d = flate2::Decompress::new(false);
    match d.decompress(input, out, flate2::FlushDecompress::Finish) {
        Ok(_) if d.total_out() as usize == out.len() => Ok(()),
        Ok(_) => Err(Error::corrupt(
            "compressed cluster decompresses to the wrong size",
        )),
        Err(e) => Err(Error::corrupt(format!(
            "compressed cluster is corrupt: {e}"
        ))),
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<()> {
    use std::io::Read;
    let mut dec = zstd::stream::read::Decoder::with_buffer(input)
        .map_err(|e| Error::corrupt(format!("compressed cluster is corrupt: {e}")))?
        .single_frame();
    let mut done = 0;
    while done < out.len() {
        match dec.read(&mut out[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) => {
                return Err(Error::corrupt(format!(
                    "compressed cluster is corrupt: {e}"
                )))
            }
        }
    }
    if done != out.len() {
        return Err(Error::corrupt(
            "compressed cluster decompresses to the wrong size",
        ));
    }
    Ok(())
}

/// Compress one cluster; `None` when compression does not save space (QEMU then writes it
/// uncompressed).
pub fn compress(kind: CompressionType, input: &[u8]) -> Result<Option<Vec<u8>>> {
    let out = match kind {
        CompressionType::Zlib => {
            let mut c = flate2::Compress::new(flate2::Compression::default(), false);
            let mut out = Vec::with_capacity(input.len());
            match c.compress_vec(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => out,
                Ok(_) => return Ok(None),
                Err(e) => return Err(Error::invalid(format!("compression failed: {e}"))),
            }
        }
        CompressionType::Zstd => zstd::bulk::compress(input, 0)
            .map_err(|e| Error::invalid(format!("compression failed: {e}")))?,
    };
    Ok((out.len() < input.len()).then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_both_kinds() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 300) as u8).collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let mut c = compress(kind, &data).unwrap().unwrap();
            c.extend_from_slice(&[0xAA; 700]); // trailing sector padding is ignored
            let mut out = vec![0u8; data.len()];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
            assert!(decompress(kind, &c[..c.len() / 3], &mut out).is_err());
        }
    }
}
