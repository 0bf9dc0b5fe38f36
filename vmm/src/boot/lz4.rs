//! The legacy LZ4 frame format (`lz4 -l`) that Linux uses for an LZ4-compressed bzImage
//! payload: the magic 0x184C2102, then blocks, each a 4-byte little-endian compressed size
//! followed by an independent LZ4 block of at most 8 MiB uncompressed. The kernel build
//! appends the uncompressed size as a 4-byte trailer (`size_append`); the stream may also
//! hold concatenated frames (another magic between blocks).

/// The legacy frame magic.
pub const MAGIC: u32 = 0x184c_2102;
/// Uncompressed size of every block but the last.
pub const BLOCK_SIZE: usize = 8 << 20;
/// The largest compressed block that can decode to [`BLOCK_SIZE`] bytes (LZ4_compressBound).
const MAX_COMPRESSED: usize = BLOCK_SIZE + BLOCK_SIZE / 255 + 16;

/// Whether `data` starts like a legacy LZ4 frame.
pub fn is_legacy_frame(data: &[u8]) -> bool {
    data.len() >= 4 && u32::from_le_bytes(data[..4].try_into().unwrap()) == MAGIC
}

/// Decompress one block into `out` (at most [`BLOCK_SIZE`] bytes of it); returns the length.
pub fn decompress_block(block: &[u8], out: &mut [u8]) -> Result<usize, String> {
    let max = out.len().min(BLOCK_SIZE);
    lz4_flex::block::decompress_into(block, &mut out[..max])
        .map_err(|e| format!("LZ4 stream: corrupt block: {e}"))
}

/// The first `want` bytes an LZ4 block decompresses to (fewer if it is shorter), without
/// decompressing the rest: enough to read an ELF file's headers before the blocks are
/// decompressed in parallel.
pub fn decompress_prefix(block: &[u8], want: usize) -> Result<Vec<u8>, String> {
    let bad = || "LZ4 stream: corrupt block".to_string();
    let mut out: Vec<u8> = Vec::with_capacity(want);
    let mut i = 0;
    // A length field: 4 bits, extended by bytes while they are 255.
    let length = |i: &mut usize, base: usize| -> Result<usize, String> {
        let mut n = base;
        if base == 15 {
            loop {
                let b = *block.get(*i).ok_or_else(bad)?;
                *i += 1;
                n = n.checked_add(b as usize).ok_or_else(bad)?;
                if b != 255 {
                    break;
                }
            }
        }
        Ok(n)
    };
    while out.len() < want && i < block.len() {
        let token = block[i];
        i += 1;
        let lit = length(&mut i, (token >> 4) as usize)?;
        let end = i
            .checked_add(lit)
            .filter(|&e| e <= block.len())
            .ok_or_else(bad)?;
        let take = lit.min(want - out.len());
        out.extend_from_slice(&block[i..i + take]);
        i = end;
        if i == block.len() || out.len() >= want {
            break; // the last sequence has literals only
        }
        let off = block.get(i..i + 2).ok_or_else(bad)?;
        let off = u16::from_le_bytes([off[0], off[1]]) as usize;
        i += 2;
        let len = length(&mut i, (token & 15) as usize)?
            .checked_add(4)
            .ok_or_else(bad)?;
        if off == 0 || off > out.len() {
            return Err(bad());
        }
        for _ in 0..len.min(want - out.len()) {
            out.push(out[out.len() - off]);
        }
    }
    Ok(out)
}

/// The compressed blocks of a legacy frame, in order, and the size trailer if there is one
/// (checked by the caller against the decompressed length).
pub fn split_blocks(data: &[u8]) -> Result<(Vec<&[u8]>, Option<u32>), String> {
    if !is_legacy_frame(data) {
        return Err("not a legacy LZ4 frame".into());
    }
    let mut rest = &data[4..];
    let mut blocks = Vec::new();
    loop {
        if rest.is_empty() {
            return Ok((blocks, None));
        }
        if rest.len() < 4 {
            return Err(format!("LZ4 stream: {} stray bytes at the end", rest.len()));
        }
        let word = u32::from_le_bytes(rest[..4].try_into().unwrap());
        rest = &rest[4..];
        if word == MAGIC {
            continue;
        }
        if rest.is_empty() {
            return Ok((blocks, Some(word)));
        }
        let len = word as usize;
        if len == 0 || len > MAX_COMPRESSED || len > rest.len() {
            return Err(format!(
                "LZ4 stream: bad block size {len} ({} bytes left)",
                rest.len()
            ));
        }
        let (block, r) = rest.split_at(len);
        blocks.push(block);
        rest = r;
    }
}

/// A reader of the blocks of a legacy LZ4 frame.
pub struct Lz4Legacy<'a> {
    rest: &'a [u8],
    produced: u64,
}

impl<'a> Lz4Legacy<'a> {
    pub fn new(data: &'a [u8]) -> Result<Self, String> {
        if !is_legacy_frame(data) {
            return Err("not a legacy LZ4 frame".into());
        }
        Ok(Lz4Legacy {
            rest: &data[4..],
            produced: 0,
        })
    }

    /// Decompress the next block into `out` (at least [`BLOCK_SIZE`] bytes); returns its
    /// uncompressed length, or None at the end of the stream.
    pub fn next_block(&mut self, out: &mut [u8]) -> Result<Option<usize>, String> {
        loop {
            if self.rest.is_empty() {
                return Ok(None);
            }
            if self.rest.len() < 4 {
                return Err(format!(
                    "LZ4 stream: {} stray bytes at the end",
                    self.rest.len()
                ));
            }
            let word = u32::from_le_bytes(self.rest[..4].try_into().unwrap());
            self.rest = &self.rest[4..];
            if word == MAGIC {
                continue; // a concatenated frame
            }
            if self.rest.is_empty() {
                // The trailer the kernel build appends: the total uncompressed size.
                if word as u64 != self.produced & 0xffff_ffff {
                    return Err(format!(
                        "LZ4 stream: size trailer says {word} bytes, decompressed {}",
                        self.produced
                    ));
                }
                return Ok(None);
            }
            let len = word as usize;
            if len == 0 || len > MAX_COMPRESSED || len > self.rest.len() {
                return Err(format!(
                    "LZ4 stream: bad block size {len} ({} bytes left)",
                    self.rest.len()
                ));
            }
            let (block, rest) = self.rest.split_at(len);
            self.rest = rest;
            let n = decompress_block(block, out)?;
            self.produced += n as u64;
            return Ok(Some(n));
        }
    }
}

/// Frame `data` like `lz4 -l` plus the kernel's size trailer (tests).
#[cfg(test)]
pub fn compress_legacy(data: &[u8], trailer: bool) -> Vec<u8> {
    let mut out = MAGIC.to_le_bytes().to_vec();
    for chunk in data.chunks(BLOCK_SIZE) {
        let c = lz4_flex::block::compress(chunk);
        out.extend_from_slice(&(c.len() as u32).to_le_bytes());
        out.extend_from_slice(&c);
    }
    if trailer {
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decompress_all(data: &[u8]) -> Result<Vec<u8>, String> {
        let mut r = Lz4Legacy::new(data)?;
        let mut buf = vec![0u8; BLOCK_SIZE];
        let mut out = Vec::new();
        while let Some(n) = r.next_block(&mut buf)? {
            out.extend_from_slice(&buf[..n]);
        }
        Ok(out)
    }

    fn sample(len: usize) -> Vec<u8> {
        let mut x = 0x1234_5678u32;
        (0..len)
            .map(|i| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                // Mostly compressible, some noise.
                if i % 7 == 0 {
                    (x >> 16) as u8
                } else {
                    (i / 3) as u8
                }
            })
            .collect()
    }

    #[test]
    fn round_trip_several_blocks_with_trailer() {
        let data = sample(2 * BLOCK_SIZE + 12345);
        let framed = compress_legacy(&data, true);
        assert_eq!(decompress_all(&framed).unwrap(), data);
        let framed = compress_legacy(&data, false);
        assert_eq!(decompress_all(&framed).unwrap(), data);
    }

    #[test]
    fn split_matches_streaming() {
        let data = sample(BLOCK_SIZE + 5000);
        let framed = compress_legacy(&data, true);
        let (blocks, trailer) = split_blocks(&framed).unwrap();
        assert_eq!((blocks.len(), trailer), (2, Some(data.len() as u32)));
        let mut out = vec![0u8; BLOCK_SIZE];
        let n = decompress_block(blocks[1], &mut out).unwrap();
        assert_eq!(&out[..n], &data[BLOCK_SIZE..]);
        let plain = compress_legacy(&data, false);
        let (blocks, trailer) = split_blocks(&plain).unwrap();
        assert_eq!((blocks.len(), trailer), (2, None));
        assert!(split_blocks(&framed[..framed.len() - 2]).is_err());
    }

    #[test]
    fn prefix_matches_full_decompression() {
        let data = sample(200_000);
        let c = lz4_flex::block::compress(&data);
        for want in [0, 1, 17, 4096, 65_537, 200_000, 300_000] {
            let p = decompress_prefix(&c, want).unwrap();
            assert_eq!(p, &data[..want.min(data.len())]);
        }
        // Corrupt input: an error or some bytes, never a panic or more than asked.
        let mut x = 7u32;
        for _ in 0..2000 {
            let mut bad = c[..400].to_vec();
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            bad[(x >> 8) as usize % 400] = (x >> 20) as u8;
            if let Ok(p) = decompress_prefix(&bad, 4096) {
                assert!(p.len() <= 4096);
            }
        }
        assert!(
            decompress_prefix(&[0x0f, 1, 0, 0, 0], 10).is_err(),
            "offset before the start"
        );
    }

    #[test]
    fn concatenated_frames() {
        let a = sample(1000);
        let b = sample(3000);
        let mut framed = compress_legacy(&a, false);
        framed.extend(compress_legacy(&b, false));
        let mut both = a.clone();
        both.extend(&b);
        assert_eq!(decompress_all(&framed).unwrap(), both);
    }

    #[test]
    fn rejects_corruption() {
        let data = sample(100_000);
        let framed = compress_legacy(&data, true);
        // Wrong trailer.
        let mut bad = framed.clone();
        let n = bad.len();
        bad[n - 4] ^= 1;
        assert!(decompress_all(&bad).unwrap_err().contains("trailer"));
        // Truncated block.
        assert!(decompress_all(&framed[..framed.len() / 2]).is_err());
        // Block size beyond the data.
        let mut bad = framed.clone();
        bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decompress_all(&bad).is_err());
        // Not a frame at all.
        assert!(Lz4Legacy::new(b"\x1f\x8b\x08\x00").is_err());
        // Garbage inside a block: an error, never a panic.
        let mut bad = framed.clone();
        for b in bad[8..200].iter_mut() {
            *b = 0xff;
        }
        assert!(decompress_all(&bad).is_err());
    }
}
