//! `qemu-img check` for qed, as QEMU's `qed_check` counts: every table and data cluster
//! offset valid and referenced once, unreferenced clusters past the header leaked, and
//! the allocation figures. QEMU prints no message per finding. A repair (either `-r`
//! mode, as in QEMU) clears invalid table entries and then, if nothing is left to fix,
//! the need-check flag; leaks and clusters referenced twice stay.

use crate::block_map::read_entries;
use crate::check::CheckReport;
use crate::storage::Storage;

use super::{QedMap, F_NEED_CHECK, MAX_ENTRIES_PER_LOOKUP, ZERO_CLUSTER};

/// Which clusters of the file some table references.
struct Used {
    bits: Vec<u64>,
}

impl Used {
    /// Mark `n` clusters from cluster `first`; false (and a corruption each) for those
    /// referenced before.
    fn mark(&mut self, first: u64, n: u64, r: &mut CheckReport) -> bool {
        let mut ok = true;
        for c in first..first + n {
            let (w, b) = ((c / 64) as usize, c % 64);
            if self.bits[w] & (1 << b) != 0 {
                r.corruptions += 1;
                ok = false;
            }
            self.bits[w] |= 1 << b;
        }
        ok
    }

    fn is_set(&self, c: u64) -> bool {
        self.bits[(c / 64) as usize] & (1 << (c % 64)) != 0
    }
}

/// An invalid table entry at `at` of the file: a corruption, or with `fix` cleared (a
/// failed write is a check error).
fn invalid_entry(storage: &dyn Storage, at: u64, fix: bool, r: &mut CheckReport) {
    if !fix {
        r.corruptions += 1;
    } else if storage.write_at(&[0; 8], at).is_ok() {
        r.corruptions_fixed += 1;
    } else {
        r.check_errors += 1;
    }
}

/// Check the image `m` maps, of guest `size` bytes, on `storage`; with `fix`, repair it.
pub fn check(m: &QedMap, storage: &dyn Storage, size: u64, fix: bool) -> CheckReport {
    let cs = m.cluster;
    let mut r = CheckReport {
        total_clusters: size.div_ceil(cs),
        ..Default::default()
    };
    let nclusters = m.file_size / cs;
    // One bit per cluster of the file: the file's size bounds it.
    let mut used = Used {
        bits: vec![0; nclusters.div_ceil(64) as usize],
    };
    used.mark(m.l1_offset / cs, m.table_size, &mut r);
    let mut failed = false;
    for (k, &l2) in m.l1.stored().iter().enumerate() {
        if l2 == 0 {
            continue;
        }
        if !m.table_ok(l2) {
            invalid_entry(storage, m.l1_offset + k as u64 * 8, fix, &mut r);
            continue;
        }
        if !used.mark(l2 / cs, m.table_size, &mut r) {
            continue;
        }
        // As in QEMU, fragmentation is counted within each L2 table.
        let mut last = None;
        let mut i = 0;
        while i < m.entries {
            let n = (m.entries - i).min(MAX_ENTRIES_PER_LOOKUP);
            let Ok(entries) = read_entries(storage, l2 + i * 8, n, 8, false) else {
                r.check_errors += 1;
                failed = true;
                break;
            };
            for (j, e) in entries.into_iter().enumerate() {
                if e == 0 || e == ZERO_CLUSTER {
                    continue;
                }
                // QEMU counts an entry as allocated before it validates it.
                r.allocated_clusters += 1;
                if last.is_some_and(|l: u64| l.wrapping_add(cs) != e) {
                    r.fragmented_clusters += 1;
                }
                last = Some(e);
                if !m.cluster_ok(e) {
                    invalid_entry(storage, l2 + (i + j as u64) * 8, fix, &mut r);
                    continue;
                }
                used.mark(e / cs, 1, &mut r);
            }
            i += n;
        }
    }
    if !failed {
        r.leaks = (m.header_size..nclusters)
            .filter(|&c| !used.is_set(c))
            .count() as u64;
        if fix {
            mark_clean(m, storage, &mut r);
        }
    }
    r
}

/// Clear the need-check flag of an image left with nothing to fix, once the repairs are
/// on disk (QEMU's `qed_check_mark_clean`).
fn mark_clean(m: &QedMap, storage: &dyn Storage, r: &mut CheckReport) {
    if r.corruptions > 0 || r.check_errors > 0 || m.features & F_NEED_CHECK == 0 {
        return;
    }
    let features = (m.features & !F_NEED_CHECK).to_le_bytes();
    let written = storage
        .flush()
        .and_then(|()| storage.write_at(&features, 16))
        .and_then(|()| storage.flush());
    if written.is_err() {
        r.check_errors += 1;
    }
}
