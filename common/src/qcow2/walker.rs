//! One walk over every reference an image holds, in the order QEMU's check counts them:
//! the header, the active L1 table, each of its entries' L2 table and that table's entries,
//! then every snapshot's L1 table the same way, the snapshot table, the refcount table,
//! the bitmaps (`walker_bitmaps`) and the refcount blocks. An L2 table is read from the
//! metadata cache when it is there (so tables not yet written back are seen as they are),
//! else straight from the file without entering the cache (bytes past the end read as
//! zeroes, as in QEMU).
//!
//! Check, refcount rebuild, snapshots, amend and measure all build on it. It reports each
//! problem it meets as a [`Finding`] (in the order QEMU prints them) and carries on, unless
//! the visitor says stop.

use std::collections::HashMap;
use std::fmt;

use super::entry::{CompressedRun, L2Entry, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use super::l2::decode_entry;
use super::meta::{read_u64_table, Meta};
use super::overlap::REFTABLE_OFFSET_MASK;
use super::snapshot;
use super::units::{GuestCluster, HostOffset};
use crate::error::{io, Result};

/// Reserved bits of an L1 entry.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry.
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Reserved bits of a refcount table entry.
const REFTABLE_RESERVED: u64 = 0x1ff;

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
    SnapshotTable,
    RefcountTable,
    /// The refcount block of this refcount table index.
    RefcountBlock(usize),
    BitmapDirectory,
    /// The bitmap table of the bitmap at this index of the directory.
    BitmapTable(usize),
    /// A data cluster of the bitmap at this index of the directory.
    BitmapData(usize),
}

/// Something the walker met.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visit {
    /// A structure of `bytes` bytes at `offset` (inside the file, see [`Finding::BeyondEnd`]).
    Structure {
        kind: Structure,
        offset: HostOffset,
        bytes: u64,
    },
    /// The L2 table that L1 entry `index` of `l1` points at (raw entry `entry`). A table
    /// that several L1 entries point at is visited, with its entries, once per L1 entry.
    L2Table {
        l1: L1Source,
        index: usize,
        entry: u64,
        offset: HostOffset,
    },
    /// An L2 entry that references storage (a data cluster, preallocated zeroes or a
    /// compressed extent), after its findings. `extent` is the host range to count, `None`
    /// when it lies past the end of the file. A compressed entry with a subcluster bitmap
    /// is only a finding.
    Entry {
        l1: L1Source,
        guest: GuestCluster,
        table: HostOffset,
        index: usize,
        entry: L2Entry,
        extent: Option<(HostOffset, u64)>,
        /// References the entry stands for: 1, or with [`Meta::walk_shared_once`] the
        /// number of L1 entries pointing at its table.
        uses: u64,
    },
    /// A problem; the walk goes on past it.
    Finding(Finding),
}

/// A problem in the metadata, with what QEMU's check says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A reference ends a cluster or more past the end of the file.
    BeyondEnd { offset: u64, size: u64 },
    /// An L1 entry has reserved bits set.
    L1Reserved { entry: u64 },
    /// An L1 entry points at an unaligned L2 table.
    L2Unaligned { offset: u64 },
    /// A standard L2 entry has reserved bits set.
    L2Reserved { entry: u64 },
    /// A compressed entry has the COPIED flag (`offset` is its compressed data's).
    CompressedCopied { offset: u64 },
    /// A compressed entry (index `index` of its table) has a subcluster bitmap.
    CompressedBitmap { index: usize, entry: u64 },
    /// An allocated entry marks subclusters both allocated and zero.
    AllocatedBitmap { offset: u64 },
    /// An entry holding data points at an unaligned offset.
    DataUnaligned { offset: u64 },
    /// A zero (preallocated) entry, index `index` of the table at `table`, points at an
    /// unaligned offset: a repair makes it a plain zero entry.
    PreallocUnaligned {
        table: HostOffset,
        index: usize,
        offset: u64,
    },
    /// An unallocated entry marks subclusters allocated.
    UnallocatedBitmap,
    /// The snapshot table cannot be read.
    SnapshotTable(String),
    /// A refcount table entry has reserved bits set.
    ReftableReserved { index: usize },
    /// A refcount table entry points at an unaligned refcount block.
    RefblockUnaligned { index: usize },
}

impl Finding {
    /// QEMU's line for the finding; `repairing` says whether a repair is under way
    /// (QEMU says "Repairing" instead of "ERROR" for the problems check fixes in place).
    pub fn message(&self, repairing: bool) -> String {
        match self {
            Finding::BeyondEnd { offset, size } => format!(
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset {offset:#x} size {size:#x}"
            ),
            Finding::L1Reserved { entry } => {
                format!("ERROR found L1 entry with reserved bits set: {entry:x}")
            }
            Finding::L2Unaligned { offset } => format!(
                "ERROR l2_offset={offset:x}: Table is not cluster aligned; L1 entry corrupted"
            ),
            Finding::L2Reserved { entry } => {
                format!("ERROR found l2 entry with reserved bits set: {entry:x}")
            }
            Finding::CompressedCopied { offset } => format!(
                "ERROR: coffset={offset:#x}: copied flag must never be set for compressed \
                 clusters"
            ),
            Finding::CompressedBitmap { index, entry } => format!(
                "ERROR compressed cluster {index} with non-zero subcluster allocation \
                 bitmap, entry={entry:#x}"
            ),
            Finding::AllocatedBitmap { offset } => format!(
                "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster \
                 allocation bitmap"
            ),
            Finding::DataUnaligned { offset } => format!(
                "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry \
                 corrupted."
            ),
            Finding::PreallocUnaligned { offset, .. } => format!(
                "{} offset={offset:x}: Preallocated cluster is not properly aligned; L2 \
                 entry corrupted.",
                if repairing { "Repairing" } else { "ERROR" }
            ),
            Finding::UnallocatedBitmap => {
                "ERROR: Unallocated cluster has non-zero subcluster allocation bitmap".into()
            }
            Finding::SnapshotTable(e) => format!("ERROR snapshot table: {e}"),
            Finding::ReftableReserved { index } => {
                format!("ERROR refcount table entry {index} has reserved bits set")
            }
            Finding::RefblockUnaligned { index } => format!(
                "ERROR refcount block {index} is not cluster aligned; refcount table entry \
                 corrupted"
            ),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message(false))
    }
}

/// What the visitor wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// The host bytes an entry references, as QEMU counts them: a data cluster, or a
/// compressed extent from its offset to the end of its last sector.
pub fn entry_extent(e: L2Entry, cluster_bits: u32) -> Option<(HostOffset, u64)> {
    if e.is_compressed() {
        let run = CompressedRun::decode(e.word & !COPIED, cluster_bits);
        Some((HostOffset(run.offset), run.len))
    } else {
        let off = e.word & OFFSET_MASK;
        (off != 0).then_some((HostOffset(off), 1 << cluster_bits))
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

impl Meta {
    /// The file length as QEMU's block layer sees it (whole 512-byte sectors).
    pub(super) fn file_len(&self) -> Result<u64> {
        let len = io("Could not get image file length", self.storage().len())?;
        Ok(len.next_multiple_of(512))
    }

    /// Whether a reference of `bytes` at `offset` ends a cluster or more past the end
    /// of a file of `file_len` bytes (QEMU tolerates a partly written last cluster).
    pub(super) fn beyond_end(&self, offset: u64, bytes: u64, file_len: u64) -> Option<Finding> {
        let end = i128::from(offset) + i128::from(bytes);
        (end - i128::from(file_len) >= i128::from(self.geo().cluster_size())).then_some(
            Finding::BeyondEnd {
                offset,
                size: bytes,
            },
        )
    }

    /// Visit a structure (nothing when it is empty), or report it past the end.
    pub(super) fn visit_structure(
        &self,
        v: &mut Visitor<'_>,
        kind: Structure,
        offset: u64,
        bytes: u64,
        file_len: u64,
    ) -> Flow {
        if bytes == 0 {
            return Flow::Continue;
        }
        match self.beyond_end(offset, bytes, file_len) {
            Some(f) => v(Visit::Finding(f)),
            None => v(Visit::Structure {
                kind,
                offset: HostOffset(offset),
                bytes,
            }),
        }
    }

    /// Walk every reference of the image. Returns `Flow::Stop` if the visitor stopped it.
    pub(crate) fn walk(&mut self, v: &mut Visitor<'_>) -> Result<Flow> {
        self.walk_with(false, v)
    }

    /// Like [`Meta::walk`], but the entries of a table that several entries of one L1
    /// table point at are visited once, with `uses` the number of those L1 entries (so a
    /// hostile L1 repeating one table costs one table walk, not one per entry).
    pub(crate) fn walk_shared_once(&mut self, v: &mut Visitor<'_>) -> Result<Flow> {
        self.walk_with(true, v)
    }

    /// Walk the references of one L1 table, `table` at `offset` (the active one or a
    /// snapshot's, as `l1` says), with shared tables visited once as in
    /// [`Meta::walk_shared_once`] when `shared_once`. Returns `Flow::Stop` if the visitor
    /// stopped it.
    pub(crate) fn walk_table(
        &mut self,
        l1: L1Source,
        (offset, table): (u64, &[u64]),
        shared_once: bool,
        v: &mut Visitor<'_>,
    ) -> Result<Flow> {
        let file_len = self.file_len()?;
        let bytes = table.len() as u64 * 8;
        self.walk_l1(l1, offset, bytes, table, (file_len, shared_once), v)
    }

    fn walk_with(&mut self, shared_once: bool, v: &mut Visitor<'_>) -> Result<Flow> {
        let cs = self.geo().cluster_size();
        let file_len = self.file_len()?;
        if self.visit_structure(v, Structure::Header, 0, cs, file_len) == Flow::Stop {
            return Ok(Flow::Stop);
        }
        let active = self.l1.entries.clone();
        let (l1_off, l1_bytes) = (self.h.l1_table_offset, active.len() as u64 * 8);
        let src = L1Source::Active;
        if self.walk_l1(src, l1_off, l1_bytes, &active, (file_len, shared_once), v)? == Flow::Stop {
            return Ok(Flow::Stop);
        }
        if self.walk_snapshots((file_len, shared_once), v)? == Flow::Stop {
            return Ok(Flow::Stop);
        }
        let rt_bytes = u64::from(self.h.refcount_table_clusters) * cs;
        let rt_off = self.h.refcount_table_offset;
        let kind = Structure::RefcountTable;
        if self.visit_structure(v, kind, rt_off, rt_bytes, file_len) == Flow::Stop {
            return Ok(Flow::Stop);
        }
        if self.walk_bitmaps(file_len, v)? == Flow::Stop {
            return Ok(Flow::Stop);
        }
        for (index, e) in self.refs.table.clone().into_iter().enumerate() {
            let off = e & REFTABLE_OFFSET_MASK;
            if e & REFTABLE_RESERVED != 0 {
                visit!(v, Visit::Finding(Finding::ReftableReserved { index }));
            } else if !off.is_multiple_of(cs) {
                visit!(v, Visit::Finding(Finding::RefblockUnaligned { index }));
            } else if off != 0 {
                visit!(
                    v,
                    Visit::Structure {
                        kind: Structure::RefcountBlock(index),
                        offset: HostOffset(off),
                        bytes: cs,
                    }
                );
            }
        }
        Ok(Flow::Continue)
    }

    fn walk_snapshots(&mut self, mode: (u64, bool), v: &mut Visitor<'_>) -> Result<Flow> {
        let file_len = mode.0;
        if self.h.nb_snapshots == 0 {
            return Ok(Flow::Continue);
        }
        let snaps = match snapshot::read_table(&**self.storage(), &self.h) {
            Ok(s) => s,
            Err(e) => {
                visit!(v, Visit::Finding(Finding::SnapshotTable(e.to_string())));
                return Ok(Flow::Continue);
            }
        };
        for (i, s) in snaps.iter().enumerate() {
            let l1 = read_u64_table(
                &**self.storage(),
                s.l1_table_offset,
                s.l1_size as usize,
                "Could not read snapshot L1 table",
            )?;
            let (off, bytes) = (s.l1_table_offset, u64::from(s.l1_size) * 8);
            let src = L1Source::Snapshot(i);
            if self.walk_l1(src, off, bytes, &l1, mode, v)? == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
        let (off, bytes) = (self.h.snapshots_offset, snapshot::encoded_len(&snaps));
        let kind = Structure::SnapshotTable;
        Ok(self.visit_structure(v, kind, off, bytes, file_len))
    }

    /// An L1 table of `bytes` bytes at `off` with entries `table`, and everything below;
    /// `mode` is the file length and whether shared tables are walked once.
    fn walk_l1(
        &mut self,
        l1: L1Source,
        off: u64,
        bytes: u64,
        table: &[u64],
        mode: (u64, bool),
        v: &mut Visitor<'_>,
    ) -> Result<Flow> {
        let (file_len, shared_once) = mode;
        // With `shared_once`: distinct tables in order of first use, with their uses.
        let mut pending: Vec<(usize, u64, u64)> = Vec::new();
        let mut seen: HashMap<u64, usize> = HashMap::new();
        if table.is_empty() {
            return Ok(Flow::Continue);
        }
        if self.visit_structure(v, Structure::L1Table(l1), off, bytes, file_len) == Flow::Stop {
            return Ok(Flow::Stop);
        }
        let cs = self.geo().cluster_size();
        for (index, &raw) in table.iter().enumerate() {
            if raw == 0 {
                continue;
            }
            if raw & L1_RESERVED != 0 {
                visit!(v, Visit::Finding(Finding::L1Reserved { entry: raw }));
            }
            let l2 = raw & OFFSET_MASK;
            match self.beyond_end(l2, cs, file_len) {
                Some(f) => visit!(v, Visit::Finding(f)),
                None => visit!(
                    v,
                    Visit::L2Table {
                        l1,
                        index,
                        entry: raw,
                        offset: HostOffset(l2),
                    }
                ),
            }
            if !l2.is_multiple_of(cs) {
                visit!(v, Visit::Finding(Finding::L2Unaligned { offset: l2 }));
            }
            if shared_once {
                match seen.get(&l2) {
                    Some(&k) => pending[k].2 += 1,
                    None => {
                        seen.insert(l2, pending.len());
                        pending.push((index, l2, 1));
                    }
                }
            } else if self.walk_l2(l1, index, HostOffset(l2), (file_len, 1), v)? == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
        for (index, l2, uses) in pending {
            if self.walk_l2(l1, index, HostOffset(l2), (file_len, uses), v)? == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Continue)
    }

    /// The bytes of the L2 table at `off`: the cached copy where there is one (a table
    /// not yet written back is seen as it is), else straight from the file (zeroes past
    /// its end) without filling the cache, which a walk over every table would flush of
    /// the working set and grow to its bound (QEMU's check reads them aside too). `None`
    /// for a table that starts past the end (all zeroes, nothing in it), without a read:
    /// a hostile L1 can name thousands of those.
    pub(super) fn l2_table_bytes(
        &mut self,
        off: HostOffset,
        file_len: u64,
    ) -> Result<Option<Vec<u8>>> {
        if let Some(cached) = self.l2.peek(off.0) {
            return Ok(Some(cached.to_vec()));
        }
        if off.0 >= file_len {
            return Ok(None);
        }
        let mut buf = vec![0u8; self.geo().cluster_size() as usize];
        io(
            "Could not read L2 table",
            self.storage().read_at(&mut buf, off.0),
        )?;
        Ok(Some(buf))
    }

    /// The entries of the table at `off`, which L1 entry `index` points at; `mode` is
    /// the file length and the number of references each entry stands for.
    fn walk_l2(
        &mut self,
        l1: L1Source,
        index: usize,
        off: HostOffset,
        mode: (u64, u64),
        v: &mut Visitor<'_>,
    ) -> Result<Flow> {
        let (file_len, uses) = mode;
        let g = self.geo();
        let Some(bytes) = self.l2_table_bytes(off, file_len)? else {
            return Ok(Flow::Continue);
        };
        let first = g.first_cluster_of_l1(index);
        let cs = g.cluster_size();
        for i in 0..g.l2_entries() as usize {
            let e = decode_entry(&bytes, i, g.extended_l2);
            if e.word == 0 && e.bitmap == 0 {
                continue;
            }
            let offset = e.word & OFFSET_MASK;
            let compressed = e.word & COMPRESSED != 0;
            let mut findings = Vec::new();
            if !compressed && e.word & L2_RESERVED != 0 {
                findings.push(Finding::L2Reserved { entry: e.word });
            }
            let zero = e.word & ZERO != 0 && !g.extended_l2;
            let mut counted = true;
            if compressed {
                if e.word & COPIED != 0 {
                    let run = CompressedRun::decode(e.word & !COPIED, g.cluster_bits);
                    findings.push(Finding::CompressedCopied { offset: run.offset });
                }
                if e.bitmap != 0 {
                    findings.push(Finding::CompressedBitmap {
                        index: i,
                        entry: e.word & !COPIED,
                    });
                    counted = false;
                }
            } else if offset != 0 {
                if (e.bitmap >> 32) & e.bitmap != 0 {
                    findings.push(Finding::AllocatedBitmap { offset });
                }
                if !offset.is_multiple_of(cs) {
                    let data = if g.extended_l2 {
                        e.bitmap & 0xffff_ffff != 0
                    } else {
                        !zero
                    };
                    findings.push(if data {
                        Finding::DataUnaligned { offset }
                    } else {
                        Finding::PreallocUnaligned {
                            table: off,
                            index: i,
                            offset,
                        }
                    });
                }
            } else {
                if !zero && e.bitmap & 0xffff_ffff != 0 {
                    findings.push(Finding::UnallocatedBitmap);
                }
                for f in findings {
                    visit!(v, Visit::Finding(f));
                }
                continue;
            }
            for f in findings {
                visit!(v, Visit::Finding(f));
            }
            if !counted {
                continue;
            }
            let mut extent = entry_extent(e, g.cluster_bits);
            if let Some((host, len)) = extent {
                if let Some(f) = self.beyond_end(host.0, len, file_len) {
                    visit!(v, Visit::Finding(f));
                    extent = None;
                }
            }
            visit!(
                v,
                Visit::Entry {
                    l1,
                    guest: first.plus(i as u64),
                    table: off,
                    index: i,
                    entry: e,
                    extent,
                    uses,
                }
            );
        }
        Ok(Flow::Continue)
    }
}
