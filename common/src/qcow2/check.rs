//! `check`: recount every reference on the walker, compare with the stored refcounts,
//! check the COPIED flags of the active tables, and repair what may be repaired, in
//! QEMU's order and with its messages (`block/qcow2-refcount.c`).
//!
//! Repairs keep the write ordering: an entry that stops referencing a cluster is written
//! before that cluster's refcount drops; refcounts only grow to what the metadata
//! references. A repair interrupted anywhere leaves an image a second check repairs.

use std::io;

use super::counts::ClusterCounts;
use super::entry::{L2Entry, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use super::header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use super::l2::decode_entry;
use super::meta::Meta;
use super::overlap::Metadata;
use super::refcount;
use super::units::{HostCluster, HostOffset};
use super::walker::{Finding, Flow, L1Source, Structure, Visit};
use crate::check::{CheckReport, Fix};
use crate::error::{Error, Result};

/// The counters of QEMU's `BdrvCheckResult` (the messages are kept apart: QEMU saves
/// and restores the counters, never what it printed).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Tally {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub allocated: u64,
    pub fragmented: u64,
    pub compressed: u64,
}

/// One check: the tally and the lines printed so far.
pub(super) struct Checker {
    pub t: Tally,
    pub messages: Vec<String>,
}

impl Checker {
    pub fn say(&mut self, m: impl Into<String>) {
        self.messages.push(m.into());
    }
}

/// The recounted references (QEMU's in-memory refcount table).
pub(super) struct Recount {
    pub counts: ClusterCounts,
    /// Clusters the recount covers: the file's, or more where references reach past it.
    pub nb_clusters: u64,
    pub max: u64,
    pub cluster_bits: u32,
}

impl Recount {
    pub fn get(&self, c: u64) -> u64 {
        self.counts.get(HostCluster(c))
    }

    /// Count one reference to each cluster of `bytes` at `offset` (inside the file).
    fn inc(&mut self, ck: &mut Checker, offset: u64, bytes: u64) {
        let b = self.cluster_bits;
        for c in (offset >> b)..=((offset + bytes - 1) >> b) {
            self.nb_clusters = self.nb_clusters.max(c + 1);
            if !self.counts.inc(c, self.max) {
                ck.say(format!("ERROR: overflow cluster offset={:#x}", c << b));
                ck.say(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img \
                     convert to create a clean copy if the image cannot be opened for writing",
                );
                ck.t.corruptions += 1;
            }
        }
    }
}

/// The text of C's `strerror` for an engine error (metadata errors are EIO in QEMU).
pub(super) fn errno_of(e: &Error) -> io::Error {
    match e.raw_os_error() {
        Some(n) => io::Error::from_raw_os_error(n),
        None => io::Error::from_raw_os_error(libc::EIO),
    }
}

fn strerror(e: &Error) -> String {
    crate::error::os_message(&errno_of(e))
}

impl Meta {
    fn new_recount(&self) -> Result<Recount> {
        let g = self.geo();
        Ok(Recount {
            counts: ClusterCounts::new(g.refblock_bits()),
            nb_clusters: self.file_len()?.div_ceil(g.cluster_size()),
            max: refcount::max_value(g.refcount_order),
            cluster_bits: g.cluster_bits,
        })
    }

    /// Recount every reference (QEMU's `calculate_refcounts`).
    pub(super) fn calculate_refcounts(
        &mut self,
        ck: &mut Checker,
        rc: &mut Recount,
        fix: Fix,
        rebuild: &mut bool,
    ) -> Result<()> {
        let g = self.geo();
        let cs = g.cluster_size();
        let storage = self.storage().clone();
        let mut repairs: Vec<(HostOffset, usize)> = Vec::new();
        let mut skip_entry = false;
        let mut next_contiguous = 0u64;
        let mut table_of: Option<(L1Source, usize)> = None;
        let mut resize_error: Option<Error> = None;
        // The file grows to a refcount block past its end only where the refcount table
        // could describe it: a block beyond that (a hostile offset) cannot be a real one, and
        // growing to it would make every later pass step through nothing for ever.
        let describable = (self.refs.table.len() as u64) << (g.refblock_bits() + g.cluster_bits);
        self.walk(&mut |visit| {
            match visit {
                Visit::Structure {
                    kind: Structure::RefcountBlock(i),
                    offset,
                    ..
                } => {
                    let c = offset.0 >> g.cluster_bits;
                    if c >= rc.nb_clusters {
                        ck.t.corruptions += 1;
                        let verb = if fix.errors { "Repairing" } else { "ERROR" };
                        ck.say(format!("{verb} refcount block {i} is outside image"));
                        if fix.errors {
                            // Past what a file offset can count, QEMU refuses with
                            // EINVAL (and the sum would overflow).
                            let grown = if offset.0 > i64::MAX as u64 - cs {
                                Err(std::io::Error::from_raw_os_error(libc::EINVAL))
                            } else if offset.0 + cs > describable {
                                Err(std::io::Error::from_raw_os_error(libc::EFBIG))
                            } else {
                                storage.set_len(offset.0 + cs)
                            };
                            match grown {
                                Ok(()) => {
                                    rc.nb_clusters = rc.nb_clusters.max(c + 1);
                                    ck.t.corruptions -= 1;
                                    ck.t.corruptions_fixed += 1;
                                    rc.inc(ck, offset.0, cs);
                                }
                                Err(e) => {
                                    *rebuild = true;
                                    let e = Error::io("resize", e);
                                    ck.say(format!(
                                        "ERROR could not resize image: {}",
                                        strerror(&e)
                                    ));
                                    resize_error = Some(e);
                                }
                            }
                        }
                    } else {
                        rc.inc(ck, offset.0, cs);
                        let n = rc.get(c);
                        if n != 1 {
                            ck.say(format!("ERROR refcount block {i} refcount={n}"));
                            ck.t.corruptions += 1;
                            *rebuild = true;
                        }
                    }
                }
                Visit::Structure { offset, bytes, .. } => rc.inc(ck, offset.0, bytes),
                Visit::L2Table { offset, .. } => rc.inc(ck, offset.0, cs),
                Visit::Entry {
                    l1,
                    guest,
                    entry,
                    extent,
                    ..
                } => {
                    if std::mem::take(&mut skip_entry) {
                        return Flow::Continue;
                    }
                    let table = (l1, g.l1_index(guest));
                    if table_of != Some(table) {
                        table_of = Some(table);
                        next_contiguous = 0;
                    }
                    if l1 == L1Source::Active {
                        ck.t.allocated += 1;
                        if entry.word & COMPRESSED != 0 {
                            ck.t.compressed += 1;
                            ck.t.fragmented += 1;
                        } else {
                            let off = entry.word & OFFSET_MASK;
                            if next_contiguous != 0 && off != next_contiguous {
                                ck.t.fragmented += 1;
                            }
                            next_contiguous = off + cs;
                        }
                    }
                    if let Some((host, len)) = extent {
                        rc.inc(ck, host.0, len);
                    }
                }
                Visit::Finding(f) => {
                    ck.t.corruptions += 1;
                    match f {
                        Finding::PreallocUnaligned { table, index, .. } if fix.errors => {
                            ck.say(f.message(true));
                            repairs.push((table, index));
                            ck.t.corruptions -= 1;
                            ck.t.corruptions_fixed += 1;
                            skip_entry = true;
                        }
                        Finding::ReftableReserved { .. } | Finding::RefblockUnaligned { .. } => {
                            ck.say(f.message(false));
                            *rebuild = true;
                        }
                        _ => ck.say(f.message(false)),
                    }
                }
            }
            Flow::Continue
        })?;
        if !repairs.is_empty() {
            self.zero_unaligned_entries(&repairs)?;
        }
        Ok(())
    }

    /// Make the preallocated entries at `(table, index)` plain zero entries, durably,
    /// before any refcount drops for what they referenced.
    fn zero_unaligned_entries(&mut self, entries: &[(HostOffset, usize)]) -> Result<()> {
        let g = self.geo();
        for &(table, i) in entries {
            let old = self.l2_get_any(table, i)?;
            let word = if g.extended_l2 { 0 } else { ZERO };
            self.l2_set_any(table, i, L2Entry { word, ..old })?;
        }
        self.flush()
    }

    /// Entry `i` of the L2 table at `off`, which may be unaligned (read from the file).
    fn l2_get_any(&mut self, off: HostOffset, i: usize) -> Result<L2Entry> {
        if self.l2_location_problem(off).is_none() {
            return self.l2_get(off, i);
        }
        let g = self.geo();
        let size = g.l2_entry_size();
        let mut buf = vec![0u8; size as usize];
        crate::error::io(
            "Could not read L2 table",
            self.storage().read_at(&mut buf, off.0 + i as u64 * size),
        )?;
        Ok(decode_entry(&buf, 0, g.extended_l2))
    }

    /// Set entry `i` of the L2 table at `off`: through the cache, or straight into the
    /// file (synced) where the cache cannot hold the table.
    fn l2_set_any(&mut self, off: HostOffset, i: usize, e: L2Entry) -> Result<()> {
        if self.l2_location_problem(off).is_none() {
            return self.l2_set(off, i, e);
        }
        let g = self.geo();
        let mut bytes = e.word.to_be_bytes().to_vec();
        if g.extended_l2 {
            bytes.extend_from_slice(&e.bitmap.to_be_bytes());
        }
        let at = off.0 + i as u64 * g.l2_entry_size();
        crate::error::io(
            "Could not write L2 table",
            self.storage().write_at(&bytes, at),
        )?;
        self.sync()
    }

    /// Compare stored and recounted refcounts, fixing what `fix` allows (QEMU's
    /// `compare_refcounts`). Returns the highest cluster in use.
    pub(super) fn compare_refcounts(
        &mut self,
        ck: &mut Checker,
        rc: &Recount,
        fix: Fix,
        rebuild: &mut bool,
    ) -> u64 {
        let mut highest = 0;
        let mut next = 0;
        while next < rc.nb_clusters {
            // A refcount block's worth of clusters with no block stored and nothing
            // recounted agrees everywhere: skipped whole, so that a reference or a repair
            // far past the data (a refcount block at 2^40) costs no per-cluster loop.
            // Clusters with no refcount block stored and nothing recounted agree: skipped
            // a block's worth at a time, so that a reference or a repair far past the data
            // (a refcount block at 2^50) costs no loop over every cluster up to it.
            let counted = rc.counts.next_counted(next).unwrap_or(u64::MAX);
            let i = self.next_with_refblock(HostCluster(next), counted.min(rc.nb_clusters));
            if i >= rc.nb_clusters {
                break;
            }
            next = i;
            next += 1;
            let r1 = match self.refcount(HostCluster(i)) {
                Ok(v) => v,
                Err(e) => {
                    ck.say(format!(
                        "Can't get refcount for cluster {i}: {}",
                        strerror(&e)
                    ));
                    ck.t.check_errors += 1;
                    continue;
                }
            };
            let r2 = rc.get(i);
            if r1 > 0 || r2 > 0 {
                highest = i;
            }
            if r1 == r2 {
                continue;
            }
            let fixable = if r1 == 0 {
                *rebuild = true;
                false
            } else {
                (r1 > r2 && fix.leaks) || (r1 < r2 && fix.errors)
            };
            let verb = match (fixable, r1 < r2) {
                (true, _) => "Repairing",
                (false, true) => "ERROR",
                (false, false) => "Leaked",
            };
            ck.say(format!("{verb} cluster {i} refcount={r1} reference={r2}"));
            if fixable && self.set_cluster_refcount(HostCluster(i), r2).is_ok() {
                if r1 > r2 {
                    ck.t.leaks_fixed += 1;
                } else {
                    ck.t.corruptions_fixed += 1;
                }
                continue;
            }
            if r1 < r2 {
                ck.t.corruptions += 1;
            } else {
                ck.t.leaks += 1;
            }
        }
        highest
    }

    /// The COPIED flags of the active L1 table and its L2 tables must say whether the
    /// refcount is 1 (QEMU's `check_oflag_copied`).
    pub(super) fn check_oflag_copied(&mut self, ck: &mut Checker, fix: Fix) -> Result<()> {
        let g = self.geo();
        let t = ck.t;
        let repair =
            fix.errors || (fix.leaks && t.check_errors == 0 && t.corruptions == 0 && t.leaks == 0);
        let verb = if repair { "Repairing" } else { "ERROR" };
        let file_len = self.file_len()?;
        for i in 0..self.l1.entries.len() {
            let l1e = self.l1.entries[i];
            let l2 = HostOffset(l1e & OFFSET_MASK);
            if l2.0 == 0 {
                continue;
            }
            let Ok(n) = self.refcount(g.host_cluster(l2)) else {
                continue;
            };
            if (n == 1) != (l1e & COPIED != 0) {
                ck.t.corruptions += 1;
                ck.say(format!(
                    "{verb} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={n}"
                ));
                if repair {
                    self.l1.entries[i] = if n == 1 { l1e | COPIED } else { l1e & !COPIED };
                    self.l1.dirty = true;
                    if let Err(e) = self.write_l1() {
                        ck.t.check_errors += 1;
                        return Err(e);
                    }
                    ck.t.corruptions -= 1;
                    ck.t.corruptions_fixed += 1;
                }
            }
            let mut dirty = Vec::new();
            let Some(table) = self.l2_table_bytes(l2, file_len)? else {
                continue;
            };
            for j in 0..g.l2_entries() as usize {
                let e = decode_entry(&table, j, g.extended_l2);
                let data = e.word & OFFSET_MASK;
                if e.word & COMPRESSED != 0 || data == 0 {
                    continue;
                }
                let Ok(n) = self.refcount(g.host_cluster(HostOffset(data))) else {
                    continue;
                };
                if (n == 1) != e.is_copied() {
                    ck.t.corruptions += 1;
                    ck.say(format!(
                        "{verb} OFLAG_COPIED data cluster: l2_entry={:x} refcount={n}",
                        e.word
                    ));
                    if repair {
                        let word = if n == 1 {
                            e.word | COPIED
                        } else {
                            e.word & !COPIED
                        };
                        dirty.push((j, L2Entry { word, ..e }));
                    }
                }
            }
            if dirty.is_empty() {
                continue;
            }
            let kind = self.overlap.kind_of(&self.h, g.host_cluster(l2));
            if kind.is_some_and(|k| k != Metadata::ActiveL2) {
                ck.say(
                    "ERROR: Could not write L2 table; metadata overlap check failed: \
                     Input/output error",
                );
                ck.t.check_errors += 1;
                return Err(Error::corrupt("metadata overlap"));
            }
            for &(j, e) in &dirty {
                self.l2_set_any(l2, j, e)?;
            }
            ck.t.corruptions -= dirty.len() as u64;
            ck.t.corruptions_fixed += dirty.len() as u64;
        }
        Ok(())
    }

    /// The whole check (QEMU's `qcow2_check_refcounts` and `qcow2_co_check_locked`).
    pub(crate) fn check(&mut self, fix: Fix) -> CheckReport {
        let mut ck = Checker {
            t: Tally::default(),
            messages: Vec::new(),
        };
        let mut highest = 0;
        let failure = self.check_refcounts(&mut ck, fix, &mut highest).err();
        let failure = failure.or_else(|| {
            let t = ck.t;
            if !fix.any() || t.check_errors != 0 || t.corruptions != 0 {
                return None;
            }
            self.mark_clean_and_consistent().err()
        });
        let g = self.geo();
        let t = ck.t;
        CheckReport {
            corruptions: t.corruptions,
            leaks: t.leaks,
            check_errors: t.check_errors,
            corruptions_fixed: t.corruptions_fixed,
            leaks_fixed: t.leaks_fixed,
            image_end_offset: (highest + 1) * g.cluster_size(),
            total_clusters: self.h.size.div_ceil(g.cluster_size()),
            allocated_clusters: t.allocated,
            fragmented_clusters: t.fragmented,
            compressed_clusters: t.compressed,
            messages: ck.messages,
            failure: failure.map(|e| errno_of(&e)),
        }
    }

    fn check_refcounts(&mut self, ck: &mut Checker, fix: Fix, highest: &mut u64) -> Result<()> {
        let mut rc = self.new_recount()?;
        let mut rebuild = false;
        self.calculate_refcounts(ck, &mut rc, fix, &mut rebuild)?;
        let before = ck.t;
        *highest = self.compare_refcounts(ck, &rc, Fix::default(), &mut rebuild);
        if rebuild && fix.errors {
            let old = ck.t;
            ck.say("Rebuilding refcount structure");
            self.rebuild_from_recount(&mut rc)?;
            ck.t.corruptions = 0;
            ck.t.leaks = 0;
            rebuild = false;
            let mut rc = self.new_recount()?;
            self.calculate_refcounts(ck, &mut rc, Fix::default(), &mut rebuild)?;
            let saved = ck.t;
            ck.t = Tally::default();
            *highest = self.compare_refcounts(
                ck,
                &rc,
                Fix {
                    leaks: true,
                    errors: false,
                },
                &mut rebuild,
            );
            if rebuild {
                ck.say("ERROR rebuilt refcount structure is still broken");
            }
            let fresh_leaks = ck.t.leaks;
            ck.t = saved;
            if ck.t.corruptions < old.corruptions {
                ck.t.corruptions_fixed += old.corruptions - ck.t.corruptions;
            }
            if ck.t.leaks < old.leaks {
                ck.t.leaks_fixed += old.leaks - ck.t.leaks;
            }
            ck.t.leaks += fresh_leaks;
        } else if fix.any() {
            if rebuild {
                ck.say("ERROR need to rebuild refcount structures");
                ck.t.check_errors += 1;
                return Err(Error::io("check", io::Error::from_raw_os_error(libc::EIO)));
            }
            if ck.t.leaks != 0 || ck.t.corruptions != 0 {
                ck.t = before;
                *highest = self.compare_refcounts(ck, &rc, fix, &mut rebuild);
            }
        }
        if fix.any() {
            self.flush()?;
        }
        self.check_oflag_copied(ck, fix)?;
        if fix.any() {
            self.flush()?;
        }
        Ok(())
    }

    /// After a repair that left no errors: clear the dirty and corrupt bits.
    fn mark_clean_and_consistent(&mut self) -> Result<()> {
        let bits = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
        if self.h.incompatible_features & bits != 0 {
            self.flush()?;
            self.h.incompatible_features &= !bits;
            self.write_header()?;
            self.sync()?;
        }
        Ok(())
    }
}
