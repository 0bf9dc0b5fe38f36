//! L1 and L2 table entries, standard and extended (with subcluster bitmaps).

pub use super::units::HostOffset;
use crate::error::{Error, Result};

/// Bit 63 of L1 and standard L2 entries: refcount is exactly one, writes need no COW.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries (version 3): the cluster reads as zeroes.
pub const ZERO: u64 = 1;
/// Host offset bits 9..55 of L1 entries and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry (must be zero).
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Number of subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;
/// Subcluster bitmap with every subcluster reading as zero.
pub const ALL_ZEROES: u64 = 0xffff_ffff << 32;
/// Subcluster bitmap with every subcluster allocated.
pub const ALL_ALLOCATED: u64 = 0xffff_ffff;

/// Decode an L1 entry into the L2 table offset (None when no L2 table), validating it.
pub fn l1_table_offset(entry: u64, cluster_size: u64) -> Result<Option<HostOffset>> {
    if entry & L1_RESERVED != 0 {
        return Err(Error::corrupt(format!(
            "L1 entry {entry:#x} has reserved bits set"
        )));
    }
    let off = entry & OFFSET_MASK;
    if off == 0 {
        return Ok(None);
    }
    if !off.is_multiple_of(cluster_size) {
        return Err(Error::corrupt(format!(
            "L2 table offset {off:#x} unaligned (L1 entry {entry:#x})"
        )));
    }
    Ok(Some(HostOffset(off)))
}

/// An L2 entry as stored: the 64-bit descriptor and, with extended L2, the bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Entry {
    pub word: u64,
    pub bitmap: u64,
}

/// A compressed cluster's place in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedRun {
    /// Byte offset of the compressed data (not aligned).
    pub offset: u64,
    /// Bytes that may hold compressed data, from `offset`.
    pub len: u64,
}

impl CompressedRun {
    /// Decode the compressed descriptor of an L2 entry.
    pub fn decode(word: u64, cluster_bits: u32) -> CompressedRun {
        let x = 62 - (cluster_bits - 8);
        let offset = word & ((1u64 << x) - 1);
        let sectors = ((word >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
        CompressedRun {
            offset,
            len: sectors * 512 - (offset & 511),
        }
    }

    /// Encode as an L2 entry word (with the compressed bit).
    pub fn encode(self, cluster_bits: u32) -> u64 {
        let x = 62 - (cluster_bits - 8);
        let end = self.offset + self.len;
        let sectors = end.div_ceil(512) - self.offset / 512;
        COMPRESSED | ((sectors - 1) << x) | self.offset
    }

    /// Host clusters the compressed data touches (each holds one reference for it).
    pub fn clusters(self, cluster_bits: u32) -> std::ops::RangeInclusive<u64> {
        (self.offset >> cluster_bits)..=((self.offset + self.len - 1) >> cluster_bits)
    }
}

/// What a cluster (or subcluster) is, decoded from its L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Not allocated here: read the backing file (or zeroes).
    Unallocated,
    /// Reads as zeroes. `host` is kept for preallocated zero clusters.
    Zero { host: Option<HostOffset> },
    /// Stored plainly at `host`.
    Data { host: HostOffset },
    /// Stored compressed.
    Compressed(CompressedRun),
}

impl L2Entry {
    /// Host cluster of a standard (non-compressed) entry, if any.
    pub fn host_cluster(self) -> Option<HostOffset> {
        if self.word & COMPRESSED != 0 {
            return None;
        }
        let off = self.word & OFFSET_MASK;
        (off != 0).then_some(HostOffset(off))
    }

    /// Whether the entry is compressed.
    pub fn is_compressed(self) -> bool {
        self.word & COMPRESSED != 0
    }

    /// Whether the COPIED flag is set.
    pub fn is_copied(self) -> bool {
        self.word & COPIED != 0
    }

    /// Validate the entry against the image geometry.
    pub fn validate(self, cluster_size: u64, extended: bool) -> Result<()> {
        if self.is_compressed() {
            if extended && self.bitmap != 0 {
                return Err(Error::corrupt(
                    "compressed cluster with a subcluster bitmap",
                ));
            }
            // Compressed data never takes more than a cluster (QEMU then stores the cluster
            // plainly), plus the rounding to whole sectors.
            let run = CompressedRun::decode(self.word, cluster_size.trailing_zeros());
            if run.len > cluster_size + 512 {
                return Err(Error::corrupt(format!(
                    "compressed cluster claims {} bytes (L2 entry {:#x})",
                    run.len, self.word
                )));
            }
            return Ok(());
        }
        if let Some(HostOffset(off)) = self.host_cluster() {
            if off % cluster_size != 0 {
                return Err(Error::corrupt(format!(
                    "cluster offset {off:#x} unaligned (L2 entry {:#x})",
                    self.word
                )));
            }
        }
        if extended && (self.bitmap & (self.bitmap >> 32) & ALL_ALLOCATED) != 0 {
            return Err(Error::corrupt(format!(
                "subcluster both allocated and zero (bitmap {:#x})",
                self.bitmap
            )));
        }
        Ok(())
    }

    /// Decode the kind of subcluster `sc` (always 0 for standard entries).
    pub fn kind(self, cluster_bits: u32, extended: bool, sc: u32) -> Kind {
        if self.is_compressed() {
            return Kind::Compressed(CompressedRun::decode(self.word, cluster_bits));
        }
        let host = self.host_cluster();
        if extended {
            let sub = host.map(|h| HostOffset(h.0 + (u64::from(sc) << (cluster_bits - 5))));
            if self.bitmap & (1u64 << (32 + sc)) != 0 {
                // Like QEMU's ZERO_ALLOC: the subcluster keeps its place in the cluster.
                return Kind::Zero { host: sub };
            }
            return match sub {
                Some(host) if self.bitmap & (1u64 << sc) != 0 => Kind::Data { host },
                _ => Kind::Unallocated,
            };
        }
        if self.word & ZERO != 0 {
            return Kind::Zero { host };
        }
        match host {
            Some(h) => Kind::Data { host: h },
            None => Kind::Unallocated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_descriptor_round_trips() {
        for bits in [9u32, 12, 16, 21] {
            let run = CompressedRun {
                offset: (5u64 << bits) + 100,
                len: (1u64 << bits) / 2 + 7,
            };
            let word = run.encode(bits);
            let back = CompressedRun::decode(word, bits);
            assert_eq!(back.offset, run.offset);
            assert!(back.len >= run.len && back.len < run.len + 512);
        }
    }

    #[test]
    fn kinds() {
        let e = L2Entry {
            word: COPIED | 0x30000,
            bitmap: 0,
        };
        assert_eq!(
            e.kind(16, false, 0),
            Kind::Data {
                host: HostOffset(0x30000)
            }
        );
        let z = L2Entry {
            word: ZERO,
            bitmap: 0,
        };
        assert_eq!(z.kind(16, false, 0), Kind::Zero { host: None });
        let x = L2Entry {
            word: 0x30000,
            bitmap: 0b10 | (1 << 32),
        };
        assert_eq!(
            x.kind(16, true, 0),
            Kind::Zero {
                host: Some(HostOffset(0x30000))
            }
        );
        let unallocated_zero = L2Entry {
            word: 0,
            bitmap: 1 << 32,
        };
        assert_eq!(
            unallocated_zero.kind(16, true, 0),
            Kind::Zero { host: None }
        );
        assert_eq!(
            x.kind(16, true, 1),
            Kind::Data {
                host: HostOffset(0x30000 + 2048)
            }
        );
        assert_eq!(x.kind(16, true, 2), Kind::Unallocated);
        assert!(L2Entry {
            word: 0x30200,
            bitmap: 0
        }
        .validate(65536, false)
        .is_err());
    }
}
