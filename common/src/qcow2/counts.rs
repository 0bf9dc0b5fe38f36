//! Reference counts recounted from the metadata, one compact array per refcount block's
//! worth of clusters (allocated only where references exist), for rebuild and check.

use std::collections::BTreeMap;

use super::units::HostCluster;

/// Counts by host cluster.
pub struct ClusterCounts {
    /// log2 of the clusters one chunk covers.
    chunk_bits: u32,
    chunks: BTreeMap<u64, Box<[u32]>>,
}

impl ClusterCounts {
    /// Counts kept in chunks of `1 << chunk_bits` clusters.
    pub fn new(chunk_bits: u32) -> ClusterCounts {
        ClusterCounts {
            chunk_bits,
            chunks: BTreeMap::new(),
        }
    }

    /// Add `n` references to each of the clusters `clusters` (saturating).
    pub fn add(&mut self, clusters: std::ops::Range<u64>, n: u64) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let size = 1usize << self.chunk_bits;
        for c in clusters {
            let chunk = self
                .chunks
                .entry(c >> self.chunk_bits)
                .or_insert_with(|| vec![0u32; size].into_boxed_slice());
            let slot = &mut chunk[(c as usize) & (size - 1)];
            *slot = slot.saturating_add(n);
        }
    }

    /// Add one reference to cluster `c` unless its count is `max` already; says whether
    /// it did.
    pub fn inc(&mut self, c: u64, max: u64) -> bool {
        let max = u32::try_from(max).unwrap_or(u32::MAX);
        let size = 1usize << self.chunk_bits;
        let chunk = self
            .chunks
            .entry(c >> self.chunk_bits)
            .or_insert_with(|| vec![0u32; size].into_boxed_slice());
        let slot = &mut chunk[(c as usize) & (size - 1)];
        if *slot >= max {
            return false;
        }
        *slot += 1;
        true
    }

    /// The count of cluster `c`.
    pub fn get(&self, c: HostCluster) -> u64 {
        let size = 1u64 << self.chunk_bits;
        self.chunks
            .get(&(c.0 >> self.chunk_bits))
            .map_or(0, |ch| u64::from(ch[(c.0 & (size - 1)) as usize]))
    }

    /// The counts of chunk `i` (clusters `i << chunk_bits` on), if it holds any.
    pub fn chunk(&self, i: u64) -> Option<&[u32]> {
        self.chunks.get(&i).map(|c| &c[..])
    }

    /// The first cluster at or after `c` whose chunk of `1 << chunk_bits` clusters holds
    /// any reference (`c` itself when its own chunk does), if there is one.
    pub fn next_counted(&self, c: u64) -> Option<u64> {
        let first = c >> self.chunk_bits;
        let (&i, _) = self.chunks.range(first..).next()?;
        Some(if i == first { c } else { i << self.chunk_bits })
    }

    /// The chunks that hold any reference, in order: (chunk index, counts).
    pub fn chunks(&self) -> impl Iterator<Item = (u64, &[u32])> {
        self.chunks.iter().map(|(&i, c)| (i, &c[..]))
    }

    /// One past the highest cluster with a reference (0 when there is none).
    pub fn end(&self) -> u64 {
        self.chunks.iter().next_back().map_or(0, |(&i, c)| {
            let last = c.iter().rposition(|&n| n > 0).map_or(0, |p| p as u64 + 1);
            (i << self.chunk_bits) + last
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_chunk() {
        let mut c = ClusterCounts::new(4);
        assert_eq!(c.end(), 0);
        c.add(3..5, 1);
        c.add(4..5, 1);
        c.add(40..41, 1);
        assert_eq!((c.get(HostCluster(3)), c.get(HostCluster(4))), (1, 2));
        assert_eq!((c.get(HostCluster(5)), c.get(HostCluster(100))), (0, 0));
        assert_eq!(c.end(), 41);
        assert!(c.inc(40, 2) && !c.inc(40, 2));
        assert_eq!(c.get(HostCluster(40)), 2);
        let idx: Vec<u64> = c.chunks().map(|(i, _)| i).collect();
        assert_eq!(idx, vec![0, 2]);
    }
}
