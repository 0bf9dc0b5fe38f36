//! `qemu-img check` for parallels, in QEMU's order and words: an image left in use, a
//! wrong `data_off`, clusters past the end of the file, space leaked past the last
//! cluster, clusters that two table entries share, then the allocation figures.
//!
//! With a repair mode it repairs as QEMU does (`-r leaks` truncates the leaked space,
//! `-r all` also clears entries outside the file, rewrites `data_off` and gives each
//! shared cluster's later user a copy of its own), and then, as QEMU does when it closes
//! an image it opened for writing, clears the in-use mark and cuts the file at the end
//! of its data. Unlike QEMU, unallocated entries are never "outside" a file shorter than
//! a cluster, entries pointing below the data area are not counted as shared (QEMU
//! fails an assertion on them), and the file is never extended to where entries past its
//! end would put the end of the data.

use std::collections::BTreeSet;

use crate::check::{CheckReport, Fix};
use crate::storage::Storage;

use super::{ParallelsMap, HEADER_LEN};

/// "Repairing" where the mode repairs what was found, "ERROR" where it does not.
fn word(repairing: bool) -> &'static str {
    if repairing {
        "Repairing"
    } else {
        "ERROR"
    }
}

/// The check's working state: the table as repaired so far.
struct Checker<'a> {
    m: &'a ParallelsMap,
    storage: &'a dyn Storage,
    fix: Fix,
    bat: Vec<u64>,
    r: CheckReport,
}

impl Checker<'_> {
    fn host(&self, i: usize) -> u64 {
        self.bat[i] * self.m.multiplier * 512
    }

    /// Set table entry `i` to `value` (`host` bytes / unit) in memory and in the file.
    fn set_entry(&mut self, i: usize, value: u64) -> bool {
        self.bat[i] = value;
        let at = HEADER_LEN as u64 + i as u64 * 4;
        let ok = self
            .storage
            .write_at(&(value as u32).to_le_bytes(), at)
            .is_ok();
        if !ok {
            self.r.check_errors += 1;
        }
        ok
    }

    fn report(&mut self, line: String) {
        self.r.messages.push(line);
    }
}

/// Check the image `m` maps on `storage`, repairing what `fix` allows.
pub fn check(m: &ParallelsMap, storage: &dyn Storage, fix: Fix) -> CheckReport {
    let mut c = Checker {
        m,
        storage,
        fix,
        bat: m.bat.stored().to_vec(),
        r: CheckReport {
            total_clusters: m.entries,
            ..Default::default()
        },
    };
    // QEMU counts the file in whole sectors.
    let size = match storage.len() {
        Ok(s) => s.next_multiple_of(512),
        Err(e) => {
            c.r.check_errors += 1;
            c.r.failure = Some(e);
            return c.r;
        }
    };
    if m.unclean {
        c.report(format!(
            "{} image was not closed correctly",
            word(fix.errors)
        ));
        c.r.corruptions += 1;
        c.r.corruptions_fixed += u64::from(fix.errors);
    }
    let data_start = check_data_off(&mut c, size / 512);
    let mut end = check_outside(&mut c, size, data_start);
    if let Err(e) = check_leak(&mut c, size, end, true) {
        c.r.failure = Some(e);
        return c.r;
    }
    match check_shared(&mut c, data_start, size, end) {
        Ok(e) => end = e,
        Err(e) => {
            c.r.failure = Some(e);
            return c.r;
        }
    }
    c.r.image_end_offset = end;
    count_allocation(&mut c, end);
    if fix.any() {
        close(&mut c, end);
    }
    c.r
}

/// The data area's first sector: `data_off` if QEMU accepts it, else where it should be
/// (a corruption, repaired in the header with `-r all`).
fn check_data_off(c: &mut Checker, file_sectors: u64) -> u64 {
    let m = c.m;
    let mut min = (HEADER_LEN as u64 + 4 * m.entries).div_ceil(512);
    if !m.old_magic {
        min = min.next_multiple_of(m.tracks);
    }
    if m.data_off == 0 && m.old_magic {
        return min;
    }
    if (min..=file_sectors).contains(&m.data_off) {
        return m.data_off;
    }
    c.r.corruptions += 1;
    if c.fix.errors {
        if c.storage.write_at(&(min as u32).to_le_bytes(), 48).is_ok() {
            c.r.corruptions_fixed += 1;
        } else {
            c.r.check_errors += 1;
        }
    }
    c.report(format!(
        "{} data_off field has incorrect value",
        word(c.fix.errors)
    ));
    min
}

/// Entries whose cluster runs past the end of the file (cleared with `-r all`); the end
/// of the image's data.
fn check_outside(c: &mut Checker, size: u64, data_start: u64) -> u64 {
    let cs = c.m.cluster();
    // Where QEMU's open put the end of the data: past every entry's cluster.
    let mut data_end = data_start * 512;
    let mut high = 0;
    for i in 0..c.bat.len() {
        let off = c.host(i);
        if off == 0 {
            continue;
        }
        data_end = data_end.max(off + cs);
        if off + cs > size {
            c.report(format!(
                "{} cluster {i} is outside image",
                word(c.fix.errors)
            ));
            c.r.corruptions += 1;
            if c.fix.errors && c.set_entry(i, 0) {
                c.r.corruptions_fixed += 1;
            }
            continue;
        }
        high = high.max(off);
    }
    if high == 0 {
        data_end
    } else {
        high + cs
    }
}

/// Space past the end of the data: leaked, truncated with a repair of leaks. `explicit`
/// is false for the truncation after shared clusters were copied (not counted again).
fn check_leak(c: &mut Checker, size: u64, end: u64, explicit: bool) -> std::io::Result<()> {
    if size <= end {
        return Ok(());
    }
    let count = (size - end).div_ceil(c.m.cluster());
    if explicit {
        c.report(format!(
            "{} space leaked at the end of the image {}",
            word(c.fix.leaks),
            size - end
        ));
        c.r.leaks += count;
    }
    if c.fix.leaks {
        c.storage
            .set_len(end)
            .inspect_err(|_| c.r.check_errors += 1)?;
        if explicit {
            c.r.leaks_fixed += count;
        }
    }
    Ok(())
}

/// Entries sharing a cluster with an earlier one; with `-r all` each gets a copy of its
/// own, in the first cluster of the file no entry uses (or past the end). The new end of
/// the data. What it holds is bounded by the table, not by sizes the table claims.
fn check_shared(c: &mut Checker, data_start: u64, size: u64, mut end: u64) -> std::io::Result<u64> {
    let cs = c.m.cluster();
    let base = data_start * 512;
    // Clusters of the data area the file holds (QEMU's used-cluster bitmap).
    let slots = end.min(size).saturating_sub(base).div_ceil(cs);
    if slots == 0 {
        return Ok(end);
    }
    let slot = |off: u64| {
        (off >= base)
            .then(|| (off - base) / cs)
            .filter(|&s| s < slots)
    };
    let entries = 0..c.bat.len();
    let mut used: BTreeSet<u64> = entries
        .clone()
        .filter(|&i| c.bat[i] != 0)
        .filter_map(|i| slot(c.host(i)))
        .collect();
    let mut seen = BTreeSet::new();
    // The first cluster no entry uses only moves forward as copies take clusters.
    let mut free = 0;
    let mut copied = false;
    let mut buf = Vec::new();
    for i in entries {
        let off = c.host(i);
        let Some(s) = slot(off).filter(|_| c.bat[i] != 0) else {
            continue;
        };
        if seen.insert(s) {
            continue;
        }
        c.report(format!(
            "{} duplicate offset in BAT entry {i}",
            word(c.fix.errors)
        ));
        c.r.corruptions += 1;
        if !c.fix.errors {
            continue;
        }
        while used.contains(&free) {
            free += 1;
        }
        let to = if free < slots { base + free * cs } else { end };
        buf.resize(cs as usize, 0);
        let moved = c
            .storage
            .read_at(&mut buf, off)
            .and_then(|()| c.storage.write_at(&buf, to));
        if moved.is_err() {
            c.r.check_errors += 1;
            continue;
        }
        if !c.set_entry(i, to / (c.m.multiplier * 512)) {
            continue;
        }
        match slot(to) {
            Some(t) => {
                used.insert(t);
            }
            None => end = end.max(to + cs),
        }
        c.r.corruptions_fixed += 1;
        copied = true;
    }
    if copied {
        let size = c
            .storage
            .len()
            .inspect_err(|_| c.r.check_errors += 1)?
            .next_multiple_of(512);
        check_leak(c, size, end, false)?;
    }
    Ok(end)
}

/// Allocated and fragmented clusters among the entries inside the data.
fn count_allocation(c: &mut Checker, end: u64) {
    let cs = c.m.cluster();
    let mut prev = 0;
    for i in 0..c.bat.len() {
        let off = c.host(i);
        if off == 0 || off + cs > end {
            prev = 0;
            continue;
        }
        if prev != 0 && prev + cs != off {
            c.r.fragmented_clusters += 1;
        }
        prev = off;
        c.r.allocated_clusters += 1;
    }
}

/// What QEMU does closing an image it opened for writing: the header no longer in use,
/// the file cut to the end of the data, all of it flushed. (QEMU also extends a file to
/// where entries past its end claim the data ends; that is not done: a hostile table would
/// make the file any size.)
fn close(c: &mut Checker, end: u64) {
    let cut = |s: &dyn Storage| match s.len() {
        Ok(len) if len > end => s.set_len(end),
        other => other.map(|_| ()),
    };
    let done = c
        .storage
        .write_at(&0u32.to_le_bytes(), 44)
        .and_then(|()| cut(c.storage))
        .and_then(|()| c.storage.flush());
    if done.is_err() {
        c.r.check_errors += 1;
    }
}
