//! A dirty bitmap's bits in memory, one piece per bitmap data cluster (QEMU's
//! serialization: bit `i` covers granule `i`, least significant bit first), loaded from
//! and stored into the image. Pieces that are all zeroes take no memory and no cluster.

use super::bitmaps::{self, DirEntry, TABLE_ALL_ONES, TABLE_OFFSET_MASK};
use super::meta::Meta;
use super::units::{ClusterCount, HostOffset};
use crate::error::{io, Result};
use crate::storage::Storage;

/// The bits of one bitmap.
#[derive(Debug, Clone)]
pub(crate) struct Bits {
    pub granularity_bits: u32,
    /// Guest bytes the bitmap covers.
    pub size: u64,
    cluster_bits: u32,
    /// One cluster of bits per bitmap table entry; `None` is all zeroes.
    chunks: Vec<Option<Vec<u8>>>,
}

impl Bits {
    /// A bitmap with no bit set.
    pub fn empty(size: u64, granularity_bits: u32, cluster_bits: u32) -> Bits {
        let n = bitmaps::table_entries(size, granularity_bits, cluster_bits);
        Bits {
            granularity_bits,
            size,
            cluster_bits,
            chunks: vec![None; n as usize],
        }
    }

    /// Bitmap table entries (and at most data clusters) this bitmap takes.
    pub fn table_entries(&self) -> u32 {
        self.chunks.len() as u32
    }

    fn bits(&self) -> u64 {
        self.size.div_ceil(1 << self.granularity_bits)
    }

    fn bits_per_chunk(&self) -> u64 {
        8 << self.cluster_bits
    }

    /// The bits of the consistent bitmap `e` (its table was checked when the image was
    /// opened, and its size matches the disk's).
    pub fn load(storage: &dyn Storage, e: &DirEntry, size: u64, cluster_bits: u32) -> Result<Bits> {
        let cs = 1u64 << cluster_bits;
        let table = bitmaps::read_table(storage, e, cs)?;
        let mut b = Bits::empty(size, e.granularity_bits, cluster_bits);
        for (chunk, &entry) in b.chunks.iter_mut().zip(&table) {
            let off = entry & TABLE_OFFSET_MASK;
            if off != 0 {
                let mut data = vec![0u8; cs as usize];
                io(
                    &format!("Could not read bitmap '{}' from image", e.name),
                    storage.read_at(&mut data, off),
                )?;
                *chunk = Some(data);
            } else if entry & TABLE_ALL_ONES != 0 {
                *chunk = Some(vec![0xff; cs as usize]);
            }
        }
        b.clear_tail();
        Ok(b)
    }

    /// Clear the bits past the last granule (a hostile or sloppy writer may set them).
    fn clear_tail(&mut self) {
        let bpc = self.bits_per_chunk();
        let bits = self.bits();
        if let Some(Some(last)) = self.chunks.last_mut() {
            let used = bits - (bits - 1) / bpc * bpc;
            let full = (used / 8) as usize;
            if !used.is_multiple_of(8) {
                last[full] &= (1u8 << (used % 8)) - 1;
                last[full + 1..].fill(0);
            } else {
                last[full..].fill(0);
            }
        }
    }

    /// Set bits `first..=last`.
    fn set_bits(&mut self, first: u64, last: u64) {
        let bpc = self.bits_per_chunk();
        let cs = 1usize << self.cluster_bits;
        let mut bit = first;
        while bit <= last {
            let chunk = self.chunks[(bit / bpc) as usize].get_or_insert_with(|| vec![0; cs]);
            let (lo, hi) = (bit % bpc, (last - bit + bit % bpc).min(bpc - 1));
            let mut i = lo;
            while i <= hi {
                if i % 8 == 0 && i + 7 <= hi {
                    let n = ((hi + 1 - i) / 8) as usize;
                    let at = (i / 8) as usize;
                    chunk[at..at + n].fill(0xff);
                    i += 8 * n as u64;
                } else {
                    chunk[(i / 8) as usize] |= 1 << (i % 8);
                    i += 1;
                }
            }
            bit += hi - lo + 1;
        }
    }

    /// Set the bits of the granules guest bytes `start..end` touch.
    pub fn mark(&mut self, start: u64, end: u64) {
        let end = end.min(self.size);
        if start < end {
            self.set_bits(
                start >> self.granularity_bits,
                (end - 1) >> self.granularity_bits,
            );
        }
    }

    /// Runs of set bits, as `(first, last)` inclusive, in order.
    fn set_runs(&self) -> Vec<(u64, u64)> {
        let bpc = self.bits_per_chunk();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (k, chunk) in self.chunks.iter().enumerate() {
            let Some(data) = chunk else { continue };
            for (j, &byte) in data.iter().enumerate() {
                if byte == 0 {
                    continue;
                }
                for b in 0..8 {
                    if byte & (1 << b) == 0 {
                        continue;
                    }
                    let bit = k as u64 * bpc + j as u64 * 8 + b;
                    match runs.last_mut() {
                        Some(r) if r.1 + 1 == bit => r.1 = bit,
                        _ => runs.push((bit, bit)),
                    }
                }
            }
        }
        runs
    }

    /// Set every bit whose granule holds a byte that `src` marks dirty (QEMU's merge; the
    /// caller checked the sizes match).
    pub fn merge(&mut self, src: &Bits) {
        // Piece by piece only when the pieces line up: the same granularity, and the
        // same cluster size (a merge from another image may have another).
        if src.granularity_bits == self.granularity_bits && src.cluster_bits == self.cluster_bits {
            for (d, s) in self.chunks.iter_mut().zip(&src.chunks) {
                let Some(s) = s else { continue };
                match d {
                    Some(d) => d.iter_mut().zip(s).for_each(|(a, b)| *a |= b),
                    None => *d = Some(s.clone()),
                }
            }
            return;
        }
        for (first, last) in src.set_runs() {
            let start = first << src.granularity_bits;
            let end = ((last + 1) << src.granularity_bits).min(self.size);
            if start >= end {
                continue;
            }
            self.set_bits(
                start >> self.granularity_bits,
                (end - 1) >> self.granularity_bits,
            );
        }
    }

    /// Write the bits into new clusters (pieces with a bit set) and a new bitmap table;
    /// returns the table's offset. Refcounts are taken now; nothing points at the
    /// clusters yet.
    pub fn store(&self, m: &mut Meta, name: &str) -> Result<u64> {
        let g = m.geo();
        let mut table = vec![0u64; self.chunks.len()];
        for (entry, chunk) in table.iter_mut().zip(&self.chunks) {
            let Some(data) = chunk.as_ref().filter(|d| d.iter().any(|&b| b != 0)) else {
                continue;
            };
            let off = g.host_offset(m.alloc_clusters(ClusterCount(1))?).0;
            io(
                &format!("Failed to write bitmap '{name}' to file"),
                m.storage().write_at(data, off),
            )?;
            *entry = off;
        }
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        let first = m.alloc_clusters(g.clusters_for(bytes.len() as u64))?;
        let off = g.host_offset(first).0;
        io(
            &format!("Failed to write bitmap '{name}' to file"),
            m.storage().write_at(&bytes, off),
        )?;
        Ok(off)
    }
}

/// The host clusters (by offset) that bitmap `e` holds: its table's and its data's.
pub(crate) fn clusters_of(m: &Meta, e: &DirEntry) -> Result<Vec<(HostOffset, ClusterCount)>> {
    let g = m.geo();
    let cs = g.cluster_size();
    let mut out = vec![(
        HostOffset(e.table_offset),
        g.clusters_for(u64::from(e.table_size) * 8),
    )];
    for entry in bitmaps::read_table_raw(&**m.storage(), e)? {
        let off = entry & TABLE_OFFSET_MASK;
        if off != 0 && bitmaps::table_entry_ok(entry, cs) {
            out.push((HostOffset(off), ClusterCount(1)));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_bits(size: u64, gran: u32, bits: &[u64]) -> Bits {
        let mut b = Bits::empty(size, gran, 9);
        for &i in bits {
            b.set_bits(i, i);
        }
        b
    }

    #[test]
    fn merge_across_granularities_covers_every_dirty_byte() {
        // 512-byte granules 1 and 300..=301 into 64 KiB granules: bytes 512.. and
        // 153600..154624 are in granules 0 and 2.
        let mut dst = Bits::empty(1 << 20, 16, 9);
        let src = with_bits(1 << 20, 9, &[1, 300, 301]);
        dst.merge(&src);
        assert_eq!(dst.set_runs(), vec![(0, 0), (2, 2)]);
        // And back: a 64 KiB granule is 128 granules of 512 bytes.
        let mut fine = Bits::empty(1 << 20, 9, 9);
        fine.merge(&dst);
        assert_eq!(fine.set_runs(), vec![(0, 127), (256, 383)]);
    }

    #[test]
    fn same_granularity_merge_is_a_union() {
        let mut a = with_bits(1 << 30, 9, &[0, 5000]);
        a.merge(&with_bits(1 << 30, 9, &[1, 4096 * 3]));
        assert_eq!(a.set_runs(), vec![(0, 1), (5000, 5000), (12288, 12288)]);
    }

    #[test]
    fn merge_from_an_image_with_other_clusters_keeps_every_bit() {
        // 64 KiB clusters hold 512 Ki bits a piece; 512-byte clusters 4 Ki.
        let mut small = with_bits(1 << 30, 9, &[5]);
        let mut big = Bits::empty(1 << 30, 9, 16);
        big.set_bits(10, 10);
        big.set_bits(100_000, 100_001);
        small.merge(&big);
        assert_eq!(small.set_runs(), vec![(5, 5), (10, 10), (100_000, 100_001)]);
        assert!(small.chunks.iter().flatten().all(|c| c.len() == 512));
        let mut back = Bits::empty(1 << 30, 9, 16);
        back.set_bits(7, 7);
        back.merge(&small);
        let runs = vec![(5, 5), (7, 7), (10, 10), (100_000, 100_001)];
        assert_eq!(back.set_runs(), runs);
    }

    #[test]
    fn set_bits_crosses_pieces() {
        // 4096 bits per piece with 512-byte clusters.
        let mut b = Bits::empty(1 << 30, 9, 9);
        b.set_bits(4090, 8200);
        assert_eq!(b.set_runs(), vec![(4090, 8200)]);
        assert_eq!(b.chunks.iter().filter(|c| c.is_some()).count(), 3);
    }

    #[test]
    fn tail_bits_past_the_disk_are_dropped() {
        // 1000 granules: bits 1000.. of the only piece are not part of the bitmap.
        let mut b = Bits::empty(1000 * 512, 9, 9);
        b.chunks[0] = Some(vec![0xff; 512]);
        b.clear_tail();
        assert_eq!(b.set_runs(), vec![(0, 999)]);
    }
}
