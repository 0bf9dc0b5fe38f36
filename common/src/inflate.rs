//! Inflating one compressed cluster or grain with a deflate state kept per thread and
//! reset for each: a state per call (two allocations, the window one of them) would churn
//! the allocator's per-thread arenas, and with them the peak memory of a parallel convert.

use std::cell::RefCell;

use flate2::{Decompress, DecompressError, FlushDecompress, Status};

thread_local! {
    /// Raw deflate (qcow2's zlib clusters) and zlib streams (vmdk's grains).
    static STATES: [RefCell<Decompress>; 2] =
        [RefCell::new(Decompress::new(false)), RefCell::new(Decompress::new(true))];
}

/// Inflate `input` into `out` in one call (`zlib_header`: the stream has zlib's header
/// and checksum); the call's status and how many bytes it wrote.
pub fn inflate(
    zlib_header: bool,
    input: &[u8],
    out: &mut [u8],
) -> Result<(Status, usize), DecompressError> {
    STATES.with(|states| {
        let mut d = states[usize::from(zlib_header)].borrow_mut();
        d.reset(zlib_header);
        let r = d.decompress(input, out, FlushDecompress::Finish);
        let written = d.total_out() as usize;
        if !matches!(r, Ok(Status::StreamEnd)) {
            // A stream that did not end (corrupt, or cut short) leaves nothing behind.
            *d = Decompress::new(zlib_header);
        }
        r.map(|s| (s, written))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn deflated(zlib_header: bool, data: &[u8]) -> Vec<u8> {
        let level = flate2::Compression::default();
        if zlib_header {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), level);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        } else {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), level);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
    }

    /// The kept state inflates stream after stream, good and broken ones interleaved, in
    /// both framings: a broken stream never spoils the next good one.
    #[test]
    fn the_kept_state_survives_broken_streams() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 7 % 253) as u8).collect();
        for zlib_header in [false, true] {
            let good = deflated(zlib_header, &data);
            let mut out = vec![0u8; data.len()];
            for round in 0..3 {
                let (status, n) = inflate(zlib_header, &good, &mut out).unwrap();
                assert_eq!((status, n), (Status::StreamEnd, data.len()), "{round}");
                assert_eq!(out, data);
                let cut = inflate(zlib_header, &good[..good.len() / 2], &mut out);
                assert!(!matches!(cut, Ok((Status::StreamEnd, _))));
                assert!(inflate(zlib_header, &[0xff; 64], &mut out).is_err());
            }
        }
    }
}
