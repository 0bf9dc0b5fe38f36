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
    match crate::inflate::inflate(false, input, out) {
        Ok((_, written)) if written == out.len() => Ok(()),
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

/// log2 of the deflate window QEMU uses for compressed clusters.
const ZLIB_WINDOW_BITS: u8 = 12;

thread_local! {
    /// One deflate state per thread, reset for each cluster, with QEMU's parameters: raw
    /// deflate, level 6, a 4 KiB window (windowBits -12; QEMU inflates with that window,
    /// so a larger one makes clusters it cannot read). A state per call would churn the
    /// allocator's per-thread arenas, and with them the peak memory.
    static DEFLATE: std::cell::RefCell<flate2::Compress> =
        std::cell::RefCell::new(new_deflate());
}

fn new_deflate() -> flate2::Compress {
    flate2::Compress::new_with_window_bits(flate2::Compression::new(6), false, ZLIB_WINDOW_BITS)
}

/// Compress one cluster; `None` when compression does not save space (QEMU then writes it
/// uncompressed).
pub fn compress(kind: CompressionType, input: &[u8]) -> Result<Option<Vec<u8>>> {
    let out = match kind {
        CompressionType::Zlib => {
            let mut out = Vec::with_capacity(input.len());
            let status = DEFLATE.with(|c| {
                let mut c = c.borrow_mut();
                c.reset();
                let status = c.compress_vec(input, &mut out, flate2::FlushCompress::Finish);
                if !matches!(status, Ok(flate2::Status::StreamEnd)) {
                    // A stream left unfinished (the cluster did not shrink) is not reused:
                    // zlib-rs does not recover from it with a reset.
                    *c = new_deflate();
                }
                status
            });
            match status {
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

    /// One thread's deflate state serves cluster after cluster, incompressible ones (their
    /// streams left unfinished) among them: every compressed cluster still inflates to
    /// its data, and nothing panics.
    #[test]
    fn the_reused_deflate_state_survives_incompressible_clusters() {
        let period = crate::test_tools::noise(5000);
        let data: Vec<u8> = period.iter().copied().cycle().take(1 << 20).collect();
        for cluster in data.chunks(512) {
            if let Some(c) = compress(CompressionType::Zlib, cluster).unwrap() {
                let mut out = vec![0u8; cluster.len()];
                decompress(CompressionType::Zlib, &c, &mut out).unwrap();
                assert_eq!(out, cluster);
            }
        }
    }

    /// Repeats 5000 bytes apart, beyond a 4 KiB window: a 32 KiB window would refer back
    /// past what QEMU's inflate (windowBits -12) keeps; ours must inflate with 4 KiB.
    #[test]
    fn zlib_window_is_4k() {
        let period: Vec<u8> = (0..5000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let data: Vec<u8> = period.iter().copied().cycle().take(65536).collect();
        let c = compress(CompressionType::Zlib, &data).unwrap();
        // With a 4 KiB window the repeats cannot be found: the data does not shrink
        // much, or at all; what was compressed must inflate with a 4 KiB window.
        if let Some(c) = c {
            let mut d = flate2::Decompress::new_with_window_bits(false, ZLIB_WINDOW_BITS);
            let mut out = vec![0u8; data.len()];
            d.decompress(&c, &mut out, flate2::FlushDecompress::Finish)
                .unwrap();
            assert_eq!(out, data);
        }
        let short: Vec<u8> = period[..3000].iter().copied().cycle().take(65536).collect();
        let c = compress(CompressionType::Zlib, &short).unwrap().unwrap();
        let mut d = flate2::Decompress::new_with_window_bits(false, ZLIB_WINDOW_BITS);
        let mut out = vec![0u8; short.len()];
        d.decompress(&c, &mut out, flate2::FlushDecompress::Finish)
            .unwrap();
        assert_eq!(out, short);
    }
}
