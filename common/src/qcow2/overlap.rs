//! The metadata overlap set: which host clusters hold metadata, so that allocation, frees
//! and data writes refuse them even when corrupt refcounts or entries point there (QEMU's
//! overlap check).

use std::collections::HashSet;
use std::fmt;

use super::entry::OFFSET_MASK;
use super::header::Header;
use super::units::{Geometry, HostCluster, HostOffset};
use crate::error::Structure;

/// Bits 9..63 of a refcount table entry hold the refcount block offset.
pub const REFTABLE_OFFSET_MASK: u64 = !0x1ff;

/// A kind of qcow2 metadata structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metadata {
    Header,
    ActiveL1,
    RefcountTable,
    SnapshotTable,
    RefcountBlock,
    ActiveL2,
}

impl Metadata {
    /// The structure, as corruption errors name it.
    pub fn structure(self) -> Structure {
        match self {
            Metadata::Header => Structure::Header,
            Metadata::ActiveL1 => Structure::L1Table,
            Metadata::RefcountTable => Structure::RefcountTable,
            Metadata::SnapshotTable => Structure::SnapshotTable,
            Metadata::RefcountBlock => Structure::RefcountBlock,
            Metadata::ActiveL2 => Structure::L2Table,
        }
    }
}

impl fmt::Display for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Metadata::Header => "the header",
            Metadata::ActiveL1 => "the active L1 table",
            Metadata::RefcountTable => "the refcount table",
            Metadata::SnapshotTable => "the snapshot table",
            Metadata::RefcountBlock => "a refcount block",
            Metadata::ActiveL2 => "an L2 table",
        })
    }
}

/// Host clusters of the active L2 tables and the refcount blocks; the header-described
/// structures (L1, refcount table, snapshot table) are read from the header itself.
#[derive(Default)]
pub struct OverlapSet {
    l2: HashSet<HostCluster>,
    refblocks: HashSet<HostCluster>,
}

/// Clusters of the nonzero offsets in a table of entries.
fn cluster_set(table: &[u64], mask: u64, g: Geometry) -> HashSet<HostCluster> {
    table
        .iter()
        .map(|e| e & mask)
        .filter(|&o| o != 0)
        .map(|o| g.host_cluster(HostOffset(o)))
        .collect()
}

impl OverlapSet {
    /// The set for an active L1 table and a refcount table.
    pub fn new(l1: &[u64], reftable: &[u64], g: Geometry) -> OverlapSet {
        OverlapSet {
            l2: cluster_set(l1, OFFSET_MASK, g),
            refblocks: cluster_set(reftable, REFTABLE_OFFSET_MASK, g),
        }
    }

    /// Replace the refcount blocks (after a rebuild).
    pub fn set_refblocks(&mut self, reftable: &[u64], g: Geometry) {
        self.refblocks = cluster_set(reftable, REFTABLE_OFFSET_MASK, g);
    }

    pub fn add(&mut self, kind: Metadata, c: HostCluster) {
        match kind {
            Metadata::ActiveL2 => self.l2.insert(c),
            Metadata::RefcountBlock => self.refblocks.insert(c),
            _ => unreachable!("only L2 tables and refcount blocks are kept in the set"),
        };
    }

    /// Replace the active L2 tables (the active L1 was replaced).
    pub fn set_l2(&mut self, l1: &[u64], g: Geometry) {
        self.l2 = cluster_set(l1, OFFSET_MASK, g);
    }

    pub fn remove_l2(&mut self, c: HostCluster) {
        self.l2.remove(&c);
    }

    /// Which metadata host cluster `c` holds, if any.
    pub fn kind_of(&self, h: &Header, c: HostCluster) -> Option<Metadata> {
        let g = h.geometry();
        let within =
            |off: u64, bytes: u64| g.clusters_touched(HostOffset(off), bytes).contains(&c.0);
        if c.0 == 0 {
            Some(Metadata::Header)
        } else if within(h.l1_table_offset, u64::from(h.l1_size) * 8) {
            Some(Metadata::ActiveL1)
        } else if within(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * g.cluster_size(),
        ) {
            Some(Metadata::RefcountTable)
        } else if h.nb_snapshots > 0 && within(h.snapshots_offset, 1) {
            Some(Metadata::SnapshotTable)
        } else if self.refblocks.contains(&c) {
            Some(Metadata::RefcountBlock)
        } else if self.l2.contains(&c) {
            Some(Metadata::ActiveL2)
        } else {
            None
        }
    }
}
