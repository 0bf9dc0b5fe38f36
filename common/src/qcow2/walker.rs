//! One walk over every reference an image holds: the header, the active L1 table and every
//! snapshot's, the L2 tables they point at (read through the metadata cache, so tables not
//! yet written back are seen as they are), the data clusters and compressed extents of
//! every L2 entry, the refcount table and blocks, and the snapshot table.
//!
//! Check, refcount rebuild, snapshots, amend and measure all build on it. It reports each
//! problem it meets as a [`Finding`] and carries on, unless the visitor says stop.

use std::collections::HashMap;

use super::entry::{self, CompressedRun, L2Entry};
use super::l2::decode_entry;
use super::meta::{read_u64_table, Meta};
use super::overlap::REFTABLE_OFFSET_MASK;
use super::snapshot;
use super::units::{GuestCluster, HostOffset};
use crate::error::Result;

/// The L1 table a reference comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L1Source {
    Active,
    /// The snapshot at this index of the snapshot table.
    Snapshot(usize),
}

/// A structure that occupies a range of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Structure {
    Header,
    L1Table(L1Source),
    RefcountTable,
    RefcountBlock,
    SnapshotTable,
}

/// Something the walker met.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visit {
    /// A structure of `bytes` bytes at `offset`.
    Structure {
        kind: Structure,
        offset: HostOffset,
        bytes: u64,
    },
    /// An L2 table that L1 entry `index` of `l1` points at (raw entry `entry`).
    L2Table {
        l1: L1Source,
        index: usize,
        entry: u64,
        offset: HostOffset,
    },
    /// An L2 entry that references storage: a data cluster or a compressed extent. A
    /// table that several entries of one L1 table point at is walked once, with `uses` the
    /// number of those L1 entries (each is one reference) and `guest` for the first.
    Entry {
        l1: L1Source,
        guest: GuestCluster,
        table: HostOffset,
        index: usize,
        entry: L2Entry,
        uses: u64,
    },
    /// A problem, with where it is; the walk goes on past it.
    Finding(Finding),
}

/// A problem in the metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Host offset of the structure the problem is in.
    pub offset: HostOffset,
    pub message: String,
}

/// What the visitor wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// The host bytes an entry references (a compressed extent is cut to a cluster, as QEMU
/// counts it).
pub fn entry_extent(e: L2Entry, cluster_bits: u32) -> Option<(HostOffset, u64)> {
    if e.is_compressed() {
        let run = CompressedRun::decode(e.word, cluster_bits);
        Some((HostOffset(run.offset), run.len.min(1 << cluster_bits)))
    } else {
        e.host_cluster().map(|h| (h, 1 << cluster_bits))
    }
}

/// Shorthand for the visitor's type.
pub type Visitor<'a> = dyn FnMut(Visit) -> Flow + 'a;

macro_rules! visit {
    ($v:expr, $item:expr) => {
        if $v($item) == Flow::Stop {
            return Ok(Flow::Stop);
        }
    };
}

fn finding(offset: u64, message: String) -> Visit {
    Visit::Finding(Finding {
        offset: HostOffset(offset),
        message,
    })
}

impl Meta {
    /// Visit a structure, or report it when it does not lie inside the file.
    fn visit_structure(
        &self,
        v: &mut Visitor<'_>,
        kind: Structure,
        offset: u64,
        bytes: u64,
    ) -> Flow {
        let end = self.geo().host_offset(self.refs.end).0;
        if bytes > 0 && offset.saturating_add(bytes) > end {
            let what =
                format!("metadata at offset {offset:#x} lies beyond the end of the image file");
            return v(finding(offset, what));
        }
        v(Visit::Structure {
            kind,
            offset: HostOffset(offset),
            bytes,
        })
    }

    /// Walk every reference of the image. Returns `Flow::Stop` if the visitor stopped it.
    pub(crate) fn walk(&mut self, v: &mut Visitor<'_>) -> Result<Flow> {
        let g = self.geo();
        let cs = g.cluster_size();
        let structure = |m: &Self, v: &mut Visitor<'_>, kind, offset, bytes| {
            m.visit_structure(v, kind, offset, bytes)
        };
        if structure(self, v, Structure::Header, 0, cs) == Flow::Stop {
            return Ok(Flow::Stop);
        }
        let (l1_off, l1_bytes) = (self.h.l1_table_offset, u64::from(self.h.l1_size) * 8);
        let active_l1 = Structure::L1Table(L1Source::Active);
        if structure(self, v, active_l1, l1_off, l1_bytes) == Flow::Stop {
            return Ok(Flow::Stop);
        }
        let active = self.l1.entries.clone();
        if self.walk_l1(L1Source::Active, &active, v)? == Flow::Stop {
            return Ok(Flow::Stop);
        }
        let rt_bytes = u64::from(self.h.refcount_table_clusters) * cs;
        let rt_off = self.h.refcount_table_offset;
        if structure(self, v, Structure::RefcountTable, rt_off, rt_bytes) == Flow::Stop {
            return Ok(Flow::Stop);
        }
        for e in self.refs.table.clone() {
            let off = e & REFTABLE_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if !g.is_cluster_aligned(HostOffset(off)) {
                visit!(
                    v,
                    finding(off, format!("refcount block offset {off:#x} is unaligned"))
                );
                continue;
            }
            if structure(self, v, Structure::RefcountBlock, off, cs) == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
        self.walk_snapshots(v)
    }

    fn walk_snapshots(&mut self, v: &mut Visitor<'_>) -> Result<Flow> {
        if self.h.nb_snapshots == 0 {
            return Ok(Flow::Continue);
        }
        let snaps = match snapshot::read_table(&**self.storage(), &self.h) {
            Ok(s) => s,
            Err(e) => {
                visit!(v, finding(self.h.snapshots_offset, e.to_string()));
                return Ok(Flow::Continue);
            }
        };
        let (off, bytes) = (self.h.snapshots_offset, snapshot::encoded_len(&snaps));
        if self.visit_structure(v, Structure::SnapshotTable, off, bytes) == Flow::Stop {
            return Ok(Flow::Stop);
        }
        for (i, s) in snaps.iter().enumerate() {
            let src = L1Source::Snapshot(i);
            let bytes = u64::from(s.l1_size) * 8;
            let off = s.l1_table_offset;
            let end = self.geo().host_offset(self.refs.end).0;
            if bytes > super::header::MAX_L1_BYTES || off.saturating_add(bytes) > end {
                let what = format!("snapshot {} L1 table is too large or past the end", s.id);
                visit!(v, finding(off, what));
                continue;
            }
            if self.visit_structure(v, Structure::L1Table(src), off, bytes) == Flow::Stop {
                return Ok(Flow::Stop);
            }
            let l1 = read_u64_table(
                &**self.storage(),
                off,
                s.l1_size as usize,
                "Could not read snapshot L1 table",
            )?;
            if self.walk_l1(src, &l1, v)? == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Continue)
    }

    fn walk_l1(&mut self, l1: L1Source, table: &[u64], v: &mut Visitor<'_>) -> Result<Flow> {
        let g = self.geo();
        // Distinct tables in order of first use, with the number of L1 entries using each.
        let mut tables: Vec<(usize, HostOffset, u64)> = Vec::new();
        let mut seen: HashMap<HostOffset, usize> = HashMap::new();
        for (index, &raw) in table.iter().enumerate() {
            let off = match entry::l1_table_offset(raw, g.cluster_size()) {
                Ok(Some(off)) => off,
                Ok(None) => continue,
                Err(e) => {
                    visit!(v, finding(raw & entry::OFFSET_MASK, e.to_string()));
                    continue;
                }
            };
            visit!(
                v,
                Visit::L2Table {
                    l1,
                    index,
                    entry: raw,
                    offset: off,
                }
            );
            match seen.get(&off) {
                Some(&k) => tables[k].2 += 1,
                None => {
                    seen.insert(off, tables.len());
                    tables.push((index, off, 1));
                }
            }
        }
        for (index, off, uses) in tables {
            if let Some(problem) = self.l2_location_problem(off) {
                visit!(v, finding(off.0, problem));
                continue;
            }
            if self.walk_l2(l1, index, off, uses, v)? == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Continue)
    }

    /// The entries of the table at `off`, first used by L1 entry `index`, used `uses` times.
    fn walk_l2(
        &mut self,
        l1: L1Source,
        index: usize,
        off: HostOffset,
        uses: u64,
        v: &mut Visitor<'_>,
    ) -> Result<Flow> {
        let g = self.geo();
        let bytes = self.l2_bytes(off)?;
        let first = g.first_cluster_of_l1(index);
        let end = g.host_offset(self.refs.end);
        for i in 0..g.l2_entries() as usize {
            let e = decode_entry(&bytes, i, g.extended_l2);
            if let Err(err) = e.validate(g.cluster_size(), g.extended_l2) {
                let at = off.0 + i as u64 * g.l2_entry_size();
                visit!(v, finding(at, err.to_string()));
                continue;
            }
            let Some((host, len)) = entry_extent(e, g.cluster_bits) else {
                continue;
            };
            if host.0.saturating_add(len) > end.0 {
                let what = format!(
                    "cluster at offset {:#x} lies beyond the end of the image file",
                    host.0
                );
                visit!(v, finding(off.0, what));
                continue;
            }
            visit!(
                v,
                Visit::Entry {
                    l1,
                    guest: first.plus(i as u64),
                    table: off,
                    index: i,
                    entry: e,
                    uses,
                }
            );
        }
        Ok(Flow::Continue)
    }
}
