//! Crash safety of `vmm`: SIGKILL while the guest writes with fsync.
//!
//! The guest writes numbered blocks (4 to 64 KiB at seeded 4 KiB-aligned offsets, some over
//! earlier blocks, most into clusters and L2 tables not allocated yet) to a qcow2 overlay,
//! each with O_DIRECT and fsync (`dd oflag=direct conv=fsync`: virtio-blk writes, then a
//! flush), and prints `E2E: SYNCED i` on the console after each. The runner kills vmm with
//! SIGKILL a seeded delay (up to about two writes' time) after the console has shown a seeded
//! number of those lines, while the guest goes on writing ([`KillAfter`]). Then, on this host:
//! - `qemu-img check` finds no corruption (leaks allowed; the stale refcounts of a dirty
//!   lazy-refcounts image too), and the image is clean after `img check -r leaks` (`-r all`
//!   for the dirty image) ([`check_after_kill`]);
//! - the image reads, per 512-byte sector, as the base with every block up to the last
//!   SYNCED one written over it, except where a later block lies, which may have landed,
//!   wholly or in part (it was written, maybe completely, but not reported synced);
//! - the backing file is unchanged.
//!
//! Two runs (one guest boot each): "kill-fsync", 64 KiB clusters over the 64 MiB base (a
//! 4 KiB write into a new cluster copies the rest of it from the backing file), killed
//! early; "kill-fsync-lazy", a 128 MiB overlay of 4 KiB clusters with 64-bit refcounts
//! (an L2 table per 2 MiB of disk, a refcount block per 2 MiB of file) and lazy_refcounts=on,
//! killed later.

use std::fs;
use std::path::Path;

use integration_tests::{
    check_after_kill, qcow2_is_dirty, qemu_convert_raw, qemu_img_in, Rng, Tool,
};

use crate::images::{make_patterned_qcow2, KIB, MIB};
use crate::report::GUEST_SH_PRELUDE;
use crate::spec::{Drive, KillAfter, VmOutput, VmSpec};
use crate::tools::sha256_file;

const BASE: &str = "kill-base.qcow2";
const BASE_SIZE: u64 = 64 * MIB;
/// (pattern byte, offset, length) of the base.
const BASE_PATTERNS: &[(u8, u64, u64)] = &[
    (0x6b, 0, 8 * MIB),
    (0x6c, 24 * MIB, 8 * MIB),
    (0x6d, BASE_SIZE - 4 * MIB, 4 * MIB),
];
/// The console line after each synced write: `E2E: SYNCED <i>`.
const SYNCED: &str = "E2E: SYNCED ";
/// Writes the guest has beyond the kill point, so that it is still writing when killed.
const MARGIN: u32 = 48;
/// Longest delay of the kill after its SYNCED line (a write takes 100-150 ms in the test
/// host).
const MAX_DELAY_MS: u64 = 300;
const SECTOR: usize = 512;

/// One run: its overlay's options and size, and the range its kill point is drawn from.
struct Variant {
    name: &'static str,
    options: &'static str,
    size: u64,
    /// Lowest and highest kill point (SYNCED lines), inclusive.
    kill_at: (u64, u64),
    lazy: bool,
}

const VARIANTS: [Variant; 2] = [
    Variant {
        name: "kill-fsync",
        options: "cluster_size=65536",
        size: BASE_SIZE,
        kill_at: (2, 12),
        lazy: false,
    },
    Variant {
        name: "kill-fsync-lazy",
        options: "cluster_size=4096,refcount_bits=64,lazy_refcounts=on",
        size: 2 * BASE_SIZE,
        kill_at: (20, 40),
        lazy: true,
    },
];

pub struct ScenarioKill {
    pub spec: VmSpec,
    overlay: String,
    size: u64,
    lazy: bool,
    /// The guest's writes in order: (offset, data).
    writes: Vec<(u64, Vec<u8>)>,
    base_sha: String,
}

/// The base (made once, in `dir`) and one overlay and guest per [`VARIANTS`] entry.
pub fn scenarios_kill(dir: &Path, rng: &mut Rng) -> Result<Vec<ScenarioKill>, String> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    make_patterned_qcow2(&dir.join(BASE), BASE_SIZE, BASE_PATTERNS)?;
    let base_sha = sha256_file(&dir.join(BASE));
    VARIANTS
        .iter()
        .map(|v| {
            let overlay = format!("{}.qcow2", v.name);
            let size = v.size.to_string();
            qemu_img_in(
                dir,
                &[
                    "create", "-q", "-f", "qcow2", "-o", v.options, "-b", BASE, "-F", "qcow2",
                    &overlay, &size,
                ],
            )
            .check()?;
            let kill = KillAfter {
                pattern: SYNCED.into(),
                count: rng.range(v.kill_at.0, v.kill_at.1) as u32,
                delay_ms: rng.below(MAX_DELAY_MS + 1) as u32,
            };
            let writes = plan_writes(rng, v.size, (kill.count + MARGIN) as usize);
            Ok(ScenarioKill {
                spec: guest(v.name, &overlay, &writes, kill),
                overlay,
                size: v.size,
                lazy: v.lazy,
                writes,
                base_sha: base_sha.clone(),
            })
        })
        .collect()
}

/// `n` writes of 4 to 64 KiB, 4 KiB aligned, inside `size`; about one in five over part
/// of an earlier one.
fn plan_writes(rng: &mut Rng, size: u64, n: usize) -> Vec<(u64, Vec<u8>)> {
    let mut w: Vec<(u64, Vec<u8>)> = Vec::with_capacity(n);
    for _ in 0..n {
        let len = 4 * KIB * rng.range(1, 16);
        let off = if !w.is_empty() && rng.chance(1, 5) {
            let (o, d) = &w[rng.below(w.len() as u64) as usize];
            (o + 4 * KIB * rng.below(d.len() as u64 / (4 * KIB))).min(size - len)
        } else {
            4 * KIB * rng.below((size - len) / (4 * KIB) + 1)
        };
        w.push((off, rng.bytes(len as usize)));
    }
    w
}

fn guest(name: &str, overlay: &str, writes: &[(u64, Vec<u8>)], kill: KillAfter) -> VmSpec {
    let mut sh = String::from(GUEST_SH_PRELUDE);
    for (i, (off, _)) in writes.iter().enumerate() {
        sh.push_str(&format!(
            "write_dev vda {off} /data/w{i} || exit 1; say \"SYNCED {i}\"\n"
        ));
    }
    VmSpec {
        name: name.into(),
        cpus: 1,
        memory_mib: 256,
        drives: vec![Drive {
            file: overlay.into(),
            readonly: false,
            snapshot: false,
        }],
        test_sh: sh,
        data: writes
            .iter()
            .enumerate()
            .map(|(i, (_, d))| (format!("w{i}"), d.clone()))
            .collect(),
        env: vec![],
        disk_boot: false,
        net: None,
        firmware: false,
        kill_after: Some(kill),
    }
}

/// The indices of the console's SYNCED lines, which must be 0, 1, 2, ... in order.
fn synced(console: &str) -> Result<usize, String> {
    let mut n = 0;
    for line in console.lines() {
        let Some(at) = line.find(SYNCED) else {
            continue;
        };
        let i = line[at + SYNCED.len()..].trim();
        if i != n.to_string() {
            return Err(format!("SYNCED line {n} reads {line:?}"));
        }
        n += 1;
    }
    Ok(n)
}

/// Run the checks of the module doc on a killed run's image; `Ok` is a one-line summary.
pub fn check_kill(
    s: &ScenarioKill,
    out: &VmOutput,
    images: &Path,
    work: &Path,
    img: &Path,
) -> Result<String, String> {
    let name = &s.spec.name;
    let fail = |m: String| format!("{name}: {m}\n{}", out.describe());
    let count = s.spec.kill_after.as_ref().map_or(0, |k| k.count) as usize;
    if !out.killed {
        return Err(fail("vmm was not SIGKILLed at its kill point".into()));
    }
    let n = synced(&out.console).map_err(&fail)?;
    if n < count {
        return Err(fail(format!(
            "{n} SYNCED lines, the kill point was {count}"
        )));
    }
    if n == s.writes.len() || out.console.contains("E2E: END") {
        return Err(fail(format!(
            "the guest finished its {} writes before the kill",
            s.writes.len()
        )));
    }
    if sha256_file(&images.join(BASE)) != s.base_sha {
        return Err(fail(format!("{BASE} changed")));
    }
    let path = images.join(&s.overlay);
    let dirty = qcow2_is_dirty(&path);
    let repair = check_after_kill(&Tool::at(img), &path, s.lazy).map_err(&fail)?;
    let got =
        qemu_convert_raw(&path, None, &work.join(format!("{name}-after.raw"))).map_err(&fail)?;
    // The tests of the runs check in parallel: a file each.
    let base_raw = work.join(format!("{name}-base.raw"));
    let mut want = qemu_convert_raw(&images.join(BASE), None, &base_raw).map_err(&fail)?;
    want.resize(s.size as usize, 0);
    let (synced_writes, later) = s.writes.split_at(n);
    for (off, d) in synced_writes {
        want[*off as usize..*off as usize + d.len()].copy_from_slice(d);
    }
    if got.len() != want.len() {
        return Err(fail(format!(
            "the image reads {} bytes, {} expected",
            got.len(),
            want.len()
        )));
    }
    // A sector may differ from the synced state only as one of the later writes has it.
    let bad: Vec<usize> = (0..got.len() / SECTOR)
        .map(|i| i * SECTOR)
        .filter(|&at| got[at..at + SECTOR] != want[at..at + SECTOR])
        .filter(|&at| {
            !later.iter().any(|(off, d)| {
                let o = *off as usize;
                at >= o && at < o + d.len() && got[at..at + SECTOR] == d[at - o..at - o + SECTOR]
            })
        })
        .collect();
    if let Some(&first) = bad.first() {
        let from = synced_writes
            .iter()
            .rposition(|(o, d)| (*o as usize..*o as usize + d.len()).contains(&first))
            .map_or("the base".into(), |i| format!("write {i}"));
        return Err(fail(format!(
            "{} sectors read neither as synced nor as a later write left them, the first at \
             {first:#x} (it should read as {from}; {n} writes synced; repair: {repair:?})",
            bad.len()
        )));
    }
    // How much of each later write is there (sectors reading as it).
    let found: Vec<(usize, usize)> = later
        .iter()
        .map(|(off, d)| {
            let o = *off as usize;
            let same = (0..d.len() / SECTOR)
                .filter(|i| {
                    got[o + i * SECTOR..o + (i + 1) * SECTOR] == d[i * SECTOR..(i + 1) * SECTOR]
                })
                .count();
            (same, d.len() / SECTOR)
        })
        .collect();
    let whole = found.iter().filter(|(s, all)| s == all).count();
    let part = found.iter().filter(|(s, all)| *s > 0 && s < all).count();
    let delay = s.spec.kill_after.as_ref().map_or(0, |k| k.delay_ms);
    Ok(format!(
        "{name}: SIGKILL {delay} ms after SYNCED line {count}: {n} of {} writes synced, all \
         there; of the later ones {whole} there whole, {part} in part; image left {}, \
         repair: {}",
        s.writes.len(),
        if dirty { "dirty" } else { "not dirty" },
        repair.map_or("none (clean)".into(), |m| format!("check -r {m}"))
    ))
}
