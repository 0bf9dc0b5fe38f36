//! The source images of `img convert`, concatenated: what each extent needs in the
//! target (from block status), reads across their boundaries, and `--salvage`, which
//! turns what cannot be read into zeroes with a warning instead of failing.

use common::copy_offload::copy_range;
use common::{open::Image, Allocation};

use crate::errors::{engine_msg, io_msg};

/// QEMU counts image lengths in 512-byte sectors.
pub(super) const SECTOR: u64 = 512;

/// What an extent of the sources needs in the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Read it and write what is not zero.
    Data,
    /// It reads as zeroes.
    Zero,
    /// The target's backing file provides it.
    Backing,
}

/// A run of the sources with one [`Kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Run {
    pub kind: Kind,
    /// Where it ends (never past a source's end).
    pub end: u64,
    /// Its data is stored compressed: chunks of it are at most this long.
    pub piece: Option<u64>,
}

/// The shortest piece of compressed source data a chunk reads. qemu-img reads such data a
/// cluster at a time; pieces of a cluster (at least this) keep each worker's buffers near
/// that, where 8 workers x 2 MiB would double its memory.
const COMPRESSED_PIECE: u64 = 64 << 10;

/// The source images, concatenated. Each counts in whole sectors as in QEMU: bytes past a
/// source's end, up to its next sector boundary, read as zeroes.
pub struct Sources {
    parts: Vec<Part>,
    size: u64,
}

struct Part {
    image: Image,
    /// Where it starts in the concatenation.
    start: u64,
    /// Its length in the concatenation (whole sectors).
    len: u64,
    /// Its own size in bytes.
    bytes: u64,
    /// How much of its compressed data one chunk reads: a cluster (grain), whole.
    piece: u64,
}

impl Sources {
    /// The images in command-line order.
    pub fn new(images: Vec<Image>) -> Sources {
        let mut start = 0;
        let parts = images
            .into_iter()
            .map(|image| {
                let bytes = image.driver().size();
                let len = bytes.next_multiple_of(SECTOR);
                let cluster = image.info().ok().and_then(|i| i.cluster_size);
                let p = Part {
                    image,
                    start,
                    len,
                    bytes,
                    piece: cluster.unwrap_or(0).max(COMPRESSED_PIECE),
                };
                start += len;
                p
            })
            .collect();
        Sources { parts, size: start }
    }

    /// The first source image.
    pub fn first(&self) -> &Image {
        &self.parts[0].image
    }

    /// Total length of the concatenation.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn part(&self, offset: u64) -> &Part {
        let i = self.parts.partition_point(|p| p.start + p.len <= offset);
        &self.parts[i]
    }

    /// The run starting at `offset`. With `top_only`, only a source's own layer counts as
    /// data or zeroes.
    pub(super) fn status(&self, offset: u64, top_only: bool, limit: u64) -> Result<Run, String> {
        let p = self.part(offset);
        let rel = offset - p.start;
        if rel >= p.bytes {
            return Ok(Run {
                kind: Kind::Zero,
                end: p.start + p.len,
                piece: None,
            });
        }
        let st = p
            .image
            .driver()
            .block_status(rel, (p.bytes - rel).min(limit))
            .map_err(|e| {
                format!(
                    "error while reading block status at offset {offset}: {}",
                    engine_msg(&e)
                )
            })?;
        let kind = match st.allocation {
            _ if top_only && st.depth > 0 => Kind::Backing,
            Allocation::Data => Kind::Data,
            // QEMU copies nothing that reads as zeroes, whatever is allocated there.
            Allocation::Zero | Allocation::DataOverHole => Kind::Zero,
            Allocation::Unallocated | Allocation::Undetermined if top_only => Kind::Backing,
            Allocation::Unallocated => Kind::Zero,
            // It may not read as zeroes: copied unless the target's backing answers.
            Allocation::Undetermined => Kind::Data,
        };
        let end = if rel + st.len >= p.bytes {
            p.start + p.len
        } else {
            offset + st.len
        };
        Ok(Run {
            kind,
            end,
            piece: st.compressed.then_some(p.piece),
        })
    }

    /// Read `buf.len()` bytes at `offset` of the concatenation.
    pub(super) fn read(&self, mut offset: u64, mut buf: &mut [u8]) -> Result<(), String> {
        while !buf.is_empty() {
            let p = self.part(offset);
            let rel = offset - p.start;
            let n = buf.len().min((p.start + p.len - offset) as usize);
            let (here, rest) = buf.split_at_mut(n);
            let stored = (p.bytes.saturating_sub(rel) as usize).min(n);
            p.image
                .driver()
                .read_at(&mut here[..stored], rel)
                .map_err(|e| format!("error while reading at byte {offset}: {}", io_msg(&e)))?;
            here[stored..].fill(0);
            offset += n as u64;
            buf = rest;
        }
        Ok(())
    }
}

impl Sources {
    /// Have the kernel copy `len` bytes at `offset` of the concatenation to the same
    /// offset of `target` (`-C`); `Ok(false)` where the files do not allow it.
    pub(super) fn copy_out(&self, offset: u64, len: u64, target: &Image) -> common::Result<bool> {
        let p = self.part(offset);
        let rel = offset - p.start;
        if rel + len > p.bytes {
            return Ok(false);
        }
        copy_range(p.image.driver(), rel, target, offset, len)
    }

    /// [`Sources::status`], but an error is retried on ever shorter ranges and, for a
    /// single sector, passed to `warn` and taken for data (QEMU's `--salvage`).
    pub(super) fn status_salvaging(
        &self,
        offset: u64,
        top_only: bool,
        warn: &dyn Fn(&str),
    ) -> Result<Run, String> {
        let mut limit = u64::MAX;
        loop {
            match self.status(offset, top_only, limit) {
                Ok(r) => return Ok(r),
                Err(e) if limit <= SECTOR => {
                    warn(&e);
                    return Ok(Run {
                        kind: Kind::Data,
                        end: offset + SECTOR,
                        piece: None,
                    });
                }
                Err(_) => {
                    let left = (self.size - offset).min(limit);
                    limit = left.div_ceil(SECTOR).div_ceil(4) * SECTOR;
                }
            }
        }
    }

    /// [`Sources::read`], but a range that fails is read again sector by sector, and a
    /// sector that still fails is passed to `warn` and reads as zeroes.
    pub(super) fn read_salvaging(
        &self,
        offset: u64,
        buf: &mut [u8],
        warn: &dyn Fn(&str),
    ) -> Result<(), String> {
        if self.read(offset, buf).is_ok() {
            return Ok(());
        }
        for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
            let at = offset + i as u64 * SECTOR;
            let p = self.part(at);
            let rel = at - p.start;
            let stored = (p.bytes.saturating_sub(rel) as usize).min(sector.len());
            sector[stored..].fill(0);
            if let Err(e) = p.image.driver().read_at(&mut sector[..stored], rel) {
                warn(&format!("error while reading offset {rel}: {}", io_msg(&e)));
                sector[..stored].fill(0);
            }
        }
        Ok(())
    }
}
