//! Distinct types for the units qcow2 metadata mixes: guest offsets and clusters, host
//! offsets and clusters, cluster counts; and [`Geometry`], the one place that converts
//! between them. A guest offset cannot reach an L2 entry or a refcount index by mistake.

use super::header::Header;

/// A byte offset in the guest's view of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestOffset(pub u64);

/// The index of a guest cluster (guest offset / cluster size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestCluster(pub u64);

/// A byte offset in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOffset(pub u64);

/// The index of a cluster of the image file (host offset / cluster size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostCluster(pub u64);

/// A number of clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterCount(pub u64);

impl GuestCluster {
    /// The cluster `n` clusters after this one.
    pub fn plus(self, n: u64) -> GuestCluster {
        GuestCluster(self.0 + n)
    }
}

impl HostCluster {
    /// The cluster `n` clusters after this one.
    pub fn plus(self, n: u64) -> HostCluster {
        HostCluster(self.0 + n)
    }

    /// The clusters `self..self + n`.
    pub fn run(self, n: ClusterCount) -> impl Iterator<Item = HostCluster> {
        (self.0..self.0 + n.0).map(HostCluster)
    }
}

impl HostOffset {
    /// The offset `n` bytes further.
    pub fn plus(self, n: u64) -> HostOffset {
        HostOffset(self.0 + n)
    }
}

/// The layout constants of one image, derived from its header whenever they are needed
/// (never stored beside it, so a header change cannot leave a stale copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub extended_l2: bool,
    pub refcount_order: u32,
}

impl Header {
    /// This image's geometry.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            cluster_bits: self.cluster_bits,
            extended_l2: self.extended_l2(),
            refcount_order: self.refcount_order,
        }
    }
}

impl Geometry {
    /// Cluster size in bytes.
    pub fn cluster_size(self) -> u64 {
        1 << self.cluster_bits
    }

    /// The guest cluster holding `g`.
    pub fn guest_cluster(self, g: GuestOffset) -> GuestCluster {
        GuestCluster(g.0 >> self.cluster_bits)
    }

    /// The first guest byte of cluster `c`.
    pub fn guest_offset(self, c: GuestCluster) -> GuestOffset {
        GuestOffset(c.0 << self.cluster_bits)
    }

    /// Where `g` lies inside its cluster.
    pub fn in_cluster(self, g: GuestOffset) -> u64 {
        g.0 & (self.cluster_size() - 1)
    }

    /// The host cluster holding `h`.
    pub fn host_cluster(self, h: HostOffset) -> HostCluster {
        HostCluster(h.0 >> self.cluster_bits)
    }

    /// The first byte of host cluster `c`.
    pub fn host_offset(self, c: HostCluster) -> HostOffset {
        HostOffset(c.0 << self.cluster_bits)
    }

    /// Whether `h` is the start of a cluster.
    pub fn is_cluster_aligned(self, h: HostOffset) -> bool {
        h.0 & (self.cluster_size() - 1) == 0
    }

    /// Clusters needed to hold `bytes` bytes.
    pub fn clusters_for(self, bytes: u64) -> ClusterCount {
        ClusterCount(bytes.div_ceil(self.cluster_size()))
    }

    /// The host clusters that `bytes` bytes at `h` touch (none for zero bytes).
    pub fn clusters_touched(self, h: HostOffset, bytes: u64) -> std::ops::Range<u64> {
        if bytes == 0 {
            return 0..0;
        }
        (h.0 >> self.cluster_bits)..((h.0 + bytes - 1) >> self.cluster_bits) + 1
    }

    /// Bytes per L2 entry (8, or 16 with extended L2).
    pub fn l2_entry_size(self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// Entries in one L2 table.
    pub fn l2_entries(self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Guest bytes one L1 entry covers.
    pub fn l1_coverage(self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }

    /// L1 entries needed for a guest size.
    pub fn l1_entries_for(self, size: u64) -> u64 {
        size.div_ceil(self.l1_coverage())
    }

    /// The L1 index of guest cluster `c`.
    pub fn l1_index(self, c: GuestCluster) -> usize {
        (c.0 / self.l2_entries()) as usize
    }

    /// The index of guest cluster `c` in its L2 table.
    pub fn l2_index(self, c: GuestCluster) -> usize {
        (c.0 % self.l2_entries()) as usize
    }

    /// The first guest cluster that L1 entry `i` covers.
    pub fn first_cluster_of_l1(self, i: usize) -> GuestCluster {
        GuestCluster(i as u64 * self.l2_entries())
    }

    /// Bits of the allocation unit: the subcluster with extended L2, else the cluster.
    pub fn unit_bits(self) -> u32 {
        if self.extended_l2 {
            self.cluster_bits - 5
        } else {
            self.cluster_bits
        }
    }

    /// Refcount entries per refcount block, as a power of two.
    pub fn refblock_bits(self) -> u32 {
        self.cluster_bits + 3 - self.refcount_order
    }

    /// The refcount table index of the block describing host cluster `c`.
    pub fn reftable_index(self, c: HostCluster) -> usize {
        (c.0 >> self.refblock_bits()) as usize
    }

    /// The index of host cluster `c`'s refcount inside its block.
    pub fn refblock_slot(self, c: HostCluster) -> usize {
        (c.0 & ((1 << self.refblock_bits()) - 1)) as usize
    }

    /// The first host cluster that refcount block `rt` describes.
    pub fn first_cluster_of_refblock(self, rt: usize) -> HostCluster {
        HostCluster((rt as u64) << self.refblock_bits())
    }

    /// The largest host cluster index a 56-bit host offset can reach.
    pub fn host_cluster_limit(self) -> HostCluster {
        HostCluster(1u64 << (56 - self.cluster_bits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_agree() {
        for (bits, ext, order) in [
            (9u32, false, 0u32),
            (16, false, 4),
            (16, true, 6),
            (21, true, 4),
        ] {
            let g = Geometry {
                cluster_bits: bits,
                extended_l2: ext,
                refcount_order: order,
            };
            let cs = g.cluster_size();
            let off = GuestOffset(5 * cs + 7);
            let c = g.guest_cluster(off);
            assert_eq!(c, GuestCluster(5));
            assert_eq!(g.guest_offset(c).0 + g.in_cluster(off), off.0);
            let c = GuestCluster(g.l2_entries() * 3 + 2);
            assert_eq!((g.l1_index(c), g.l2_index(c)), (3, 2));
            assert_eq!(g.first_cluster_of_l1(3).plus(2), c);
            let h = HostCluster((1 << g.refblock_bits()) * 4 + 9);
            assert_eq!((g.reftable_index(h), g.refblock_slot(h)), (4, 9));
            assert_eq!(g.first_cluster_of_refblock(4).plus(9), h);
            assert_eq!(g.host_cluster(g.host_offset(h)), h);
            assert_eq!(g.clusters_touched(HostOffset(cs - 1), 2), 0..2);
            assert_eq!(g.clusters_touched(HostOffset(cs), 0), 0..0);
            assert_eq!(g.clusters_for(cs + 1), ClusterCount(2));
        }
    }
}
