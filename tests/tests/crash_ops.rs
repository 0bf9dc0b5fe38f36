//! SIGKILL during the subcommands that change an image's structure: `snapshot -c/-a/-d`,
//! `resize --shrink`, `amend`, `commit`, `rebase`, `convert -n` and `check -r all`.
//!
//! For each operation an image is made with qemu-img and qemu-io (512-byte clusters, so
//! the operation has many steps), the operation is run to completion once on a copy to
//! learn the state after it and how long it takes, then run again on fresh copies and
//! killed with SIGKILL after a random delay within that time. After every kill `qemu-img
//! check` must find no corruption (leaks are allowed, and `img check -r leaks` then leaves
//! the image clean), and the image must read exactly as before the operation or exactly
//! as after it: virtual size, guest contents and every internal snapshot's contents.
//! `commit` and `rebase` run on a chain (t.qcow2 over m.qcow2 over b.qcow2): t.qcow2 reads
//! the same throughout, and the lower images (commit's base, which may hold part of what
//! it commits) must check without corruption too. `convert -n` into t.qcow2 may leave each
//! sector as before or as after. `check -r all` repairs damaged refcounts: killed, the
//! image may still be damaged, but a second `img check -r all` must repair it, and it
//! reads as before throughout.
//!
//! `CRASH_KILLS=<n>` sets the kills per operation (default 12); the seed is printed and
//! `TEST_SEED` replays it.

use integration_tests::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What an image shows: virtual size, guest bytes, and each snapshot's (name, bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
struct View {
    size: u64,
    active: Vec<u8>,
    snapshots: Vec<(String, Vec<u8>)>,
}

fn raw_of(dir: &Path, file: &str, snapshot: Option<&str>) -> Vec<u8> {
    let mut args = vec!["convert", "-U"];
    if let Some(s) = snapshot {
        args.extend(["-l", s]);
    }
    args.extend(["-O", "raw", file, "view.raw"]);
    qemu_img_in(dir, &args).ok();
    let b = std::fs::read(dir.join("view.raw")).unwrap();
    std::fs::remove_file(dir.join("view.raw")).unwrap();
    b
}

fn view(dir: &Path, file: &str) -> View {
    let info = qemu_info_json(&dir.join(file), &["-U"]);
    let mut snapshots: Vec<(String, Vec<u8>)> = info["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    let name = s["name"].as_str().unwrap().to_string();
                    let bytes = raw_of(dir, file, Some(&name));
                    (name, bytes)
                })
                .collect()
        })
        .unwrap_or_default();
    snapshots.sort();
    View {
        size: info["virtual-size"].as_u64().unwrap(),
        active: raw_of(dir, file, None),
        snapshots,
    }
}

fn describe(v: &View) -> String {
    let names: Vec<&str> = v.snapshots.iter().map(|s| s.0.as_str()).collect();
    format!("size {} snapshots {names:?}", v.size)
}

/// One operation: how to make its image, the `img` arguments (`t.qcow2` is the image),
/// and what a kill may leave.
struct Op {
    name: &'static str,
    setup: fn(&Path),
    args: &'static [&'static str],
    kind: Kind,
}

/// What an image killed mid-operation may be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Consistent, and reading exactly as before or exactly as after.
    Whole,
    /// Consistent, each sector reading as before or as after (a copy into the image).
    Sectors,
    /// A repair: still damaged as before, repaired, or half-way; a second `img check -r
    /// all` repairs it, and it reads as before throughout.
    Repair,
}

fn qio(dir: &Path, file: &str, cmds: &[&str]) {
    let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    qemu_io_cmds(&dir.join(file), "qcow2", &cmds);
}

fn create(dir: &Path, opts: &str, size: &str) {
    qemu_img_in(
        dir,
        &["create", "-q", "-f", "qcow2", "-o", opts, "t.qcow2", size],
    )
    .ok();
}

/// 8 MiB of 512-byte clusters, written all over, with two snapshots between writes.
fn with_snapshots(dir: &Path) {
    create(dir, "cluster_size=512", "8M");
    qio(dir, "t.qcow2", &["write -P 1 0 8M"]);
    qemu_img_in(dir, &["snapshot", "-c", "s1", "t.qcow2"]).ok();
    qio(dir, "t.qcow2", &["write -P 2 1M 2M", "write -z 5M 1M"]);
    qemu_img_in(dir, &["snapshot", "-c", "s2", "t.qcow2"]).ok();
    qio(dir, "t.qcow2", &["write -P 3 0 512k", "discard 7M 512k"]);
}

/// Data, zero clusters (allocated and not) and discards, 512-byte clusters.
fn mixed(dir: &Path) {
    create(dir, "cluster_size=512", "8M");
    qio(
        dir,
        "t.qcow2",
        &[
            "write -P 1 0 6M",
            "write -z 1M 1M",
            "write -z -u 3M 1M",
            "write -z 7M 512k",
            "discard 5M 256k",
        ],
    );
}

/// t.qcow2 over m.qcow2 over b.qcow2, 512-byte clusters, each layer holding data, zero
/// clusters and discards over part of the one below.
fn chain(dir: &Path) {
    let mk = |args: &[&str]| qemu_img_in(dir, args).ok();
    mk(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "b.qcow2",
        "8M",
    ]);
    qio(dir, "b.qcow2", &["write -P 1 0 8M"]);
    for (file, below) in [("m.qcow2", "b.qcow2"), ("t.qcow2", "m.qcow2")] {
        mk(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "-b",
            below,
            "-F",
            "qcow2",
            file,
        ]);
    }
    qio(
        dir,
        "m.qcow2",
        &["write -P 2 1M 3M", "write -z 5M 512k", "discard 6M 256k"],
    );
    qio(
        dir,
        "t.qcow2",
        &["write -P 3 2M 3M", "write -z 7M 256k", "discard 1M 128k"],
    );
}

const OPS: &[Op] = &[
    Op {
        name: "commit",
        setup: chain,
        args: &["commit", "t.qcow2"],
        kind: Kind::Whole,
    },
    Op {
        name: "commit -b two levels down",
        setup: chain,
        args: &["commit", "-b", "b.qcow2", "t.qcow2"],
        kind: Kind::Whole,
    },
    Op {
        name: "rebase (safe)",
        setup: chain,
        args: &["rebase", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2"],
        kind: Kind::Whole,
    },
    Op {
        name: "rebase -b \"\"",
        setup: chain,
        args: &["rebase", "-b", "", "t.qcow2"],
        kind: Kind::Whole,
    },
    Op {
        name: "snapshot -c",
        setup: with_snapshots,
        args: &["snapshot", "-c", "s3", "t.qcow2"],
        kind: Kind::Whole,
    },
    Op {
        name: "snapshot -a",
        setup: with_snapshots,
        args: &["snapshot", "-a", "s1", "t.qcow2"],
        kind: Kind::Whole,
    },
    Op {
        name: "snapshot -d",
        setup: with_snapshots,
        args: &["snapshot", "-d", "s1", "t.qcow2"],
        kind: Kind::Whole,
    },
    Op {
        name: "resize --shrink",
        setup: mixed,
        args: &["resize", "--shrink", "t.qcow2", "1M"],
        kind: Kind::Whole,
    },
    Op {
        name: "resize --shrink (snapshots)",
        setup: with_snapshots,
        args: &["resize", "--shrink", "t.qcow2", "1000k"],
        kind: Kind::Whole,
    },
    Op {
        name: "amend compat=0.10",
        setup: mixed,
        args: &["amend", "-o", "compat=0.10", "t.qcow2"],
        kind: Kind::Whole,
    },
    Op {
        name: "amend refcount_bits=64",
        setup: with_snapshots,
        args: &["amend", "-o", "refcount_bits=64", "t.qcow2"],
        kind: Kind::Whole,
    },
    Op {
        name: "convert -n",
        setup: convert_target,
        args: &["convert", "-n", "-O", "qcow2", "s.qcow2", "t.qcow2"],
        kind: Kind::Sectors,
    },
    Op {
        name: "check -r all",
        setup: damaged_refcounts,
        args: &["check", "-r", "all", "t.qcow2"],
        kind: Kind::Repair,
    },
];

/// s.qcow2 (mixed data, zeroes and discards) to be converted over t.qcow2, which holds
/// other data everywhere, both of 512-byte clusters.
fn convert_target(dir: &Path) {
    mixed(dir);
    std::fs::rename(dir.join("t.qcow2"), dir.join("s.qcow2")).unwrap();
    create(dir, "cluster_size=512", "8M");
    qio(dir, "t.qcow2", &["write -P 9 0 8M"]);
}

/// An image with snapshots whose stored refcounts are wrong: every tenth cluster of the
/// first refcount block too low (0) or too high (5), and space leaked at the end.
fn damaged_refcounts(dir: &Path) {
    with_snapshots(dir);
    let p = dir.join("t.qcow2");
    let mut b = std::fs::read(&p).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let block = be64(&b, be64(&b, 48) as usize) as usize;
    // 16-bit refcounts, 256 to a 512-byte block; clusters 0-9 hold the header and tables.
    for (k, e) in (10..256).step_by(10).enumerate() {
        let v: u16 = if k % 2 == 0 { 0 } else { 5 };
        b[block + 2 * e..block + 2 * e + 2].copy_from_slice(&v.to_be_bytes());
    }
    b.extend(vec![0u8; 64 << 10]);
    std::fs::write(&p, &b).unwrap();
    let chk = qemu_img(&["check", s(&p)]);
    assert_eq!(
        chk.code,
        Some(2),
        "the damage is corruption:\n{}",
        chk.report()
    );
}

/// Run `img ARGS` in `dir`, SIGKILLed after `delay` unless it finished before.
fn run_killed(dir: &Path, args: &[&str], delay: Duration) -> bool {
    let mut child = Command::new(img_bin())
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < delay {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let killed = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    killed
}

/// Whether `got` has the size and snapshots of `before` and `after` (the same in both),
/// and each sector of its active image reads as in one of them.
fn sector_mix(got: &View, before: &View, after: &View) -> bool {
    let same = |v: &View| v.size == got.size && v.snapshots == got.snapshots;
    same(before)
        && same(after)
        && got.active.len() == before.active.len()
        && got.active.len() == after.active.len()
        && got
            .active
            .chunks(512)
            .zip(before.active.chunks(512).zip(after.active.chunks(512)))
            .all(|(g, (b, a))| g == b || g == a)
}

/// After a killed repair: `img check -r all` again leaves t.qcow2 clean for `qemu-img
/// check`, reading as `before`.
fn repair_again(dir: &Path, before: &View) -> Result<(), String> {
    let rep = img_in(dir, &["check", "-r", "all", "t.qcow2"]);
    let again = qemu_img(&["check", s(&dir.join("t.qcow2"))]);
    if !again.success() {
        return Err(format!(
            "not clean after a second img check -r all:\n{}\n{}",
            rep.report(),
            again.report()
        ));
    }
    let got = view(dir, "t.qcow2");
    if got != *before {
        return Err(format!(
            "the repaired image reads otherwise ({}) than before ({})",
            describe(&got),
            describe(before)
        ));
    }
    Ok(())
}

/// Returns how many kills hit the process while it ran.
fn crash_op(op: &Op, kills: usize, rng: &mut Rng) -> Result<usize, String> {
    let base = tempdir();
    (op.setup)(base.path());
    // Every file of the setup (a backing chain for commit and rebase).
    let copy = |to: &Path| {
        for e in std::fs::read_dir(base.path()).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    };
    let before = view(base.path(), "t.qcow2");
    // The shorter of two uninterrupted runs sets the range of kill delays.
    let mut took = Duration::MAX;
    let full = tempdir();
    for _ in 0..2 {
        copy(full.path());
        let start = Instant::now();
        let out = img_in(full.path(), op.args);
        took = took.min(start.elapsed());
        if !out.success() {
            return Err(format!(
                "{} failed when not killed:\n{}",
                op.name,
                out.report()
            ));
        }
    }
    let after = view(full.path(), "t.qcow2");
    let (mut as_before, mut as_after, mut leaked, mut running) = (0, 0, 0, 0);
    let mut mixed = 0;
    for k in 0..kills {
        let d = tempdir();
        copy(d.path());
        let delay = Duration::from_micros(rng.below(took.as_micros() as u64 + 1));
        if run_killed(d.path(), op.args, delay) {
            running += 1;
        }
        // The images below t.qcow2 that the operation writes (commit's base) must be
        // consistent too; they may hold part of what is committed.
        for lower in ["b.qcow2", "m.qcow2"] {
            let l = d.path().join(lower);
            if l.exists() {
                let chk = qemu_img(&["check", s(&l)]);
                if !matches!(chk.code, Some(0) | Some(3)) {
                    return Err(format!(
                        "{} killed after {delay:?} (kill {k}): qemu-img check of {lower} finds \
                         corruption:\n{}",
                        op.name,
                        chk.report()
                    ));
                }
            }
        }
        let f = d.path().join("t.qcow2");
        if op.kind == Kind::Repair {
            repair_again(d.path(), &before)
                .map_err(|e| format!("{} killed after {delay:?} (kill {k}): {e}", op.name))?;
            as_before += 1;
            continue;
        }
        let chk = qemu_img(&["check", s(&f)]);
        if !matches!(chk.code, Some(0) | Some(3)) {
            return Err(format!(
                "{} killed after {delay:?} (kill {k}): qemu-img check finds corruption:\n{}",
                op.name,
                chk.report()
            ));
        }
        if chk.code == Some(3) {
            let rep = img_in(d.path(), &["check", "-r", "leaks", "t.qcow2"]);
            let again = qemu_img(&["check", s(&f)]);
            if !again.success() {
                return Err(format!(
                    "{} killed after {delay:?}: not clean after img check -r leaks:\n{}\n{}",
                    op.name,
                    rep.report(),
                    again.report()
                ));
            }
        }
        let got = view(d.path(), "t.qcow2");
        if got == before {
            as_before += 1;
        } else if got == after {
            as_after += 1;
        } else if op.kind == Kind::Sectors && sector_mix(&got, &before, &after) {
            mixed += 1;
        } else {
            return Err(format!(
                "{} killed after {delay:?}: the image reads neither as before ({}) nor as \
                 after ({}): {}",
                op.name,
                describe(&before),
                describe(&after),
                describe(&got)
            ));
        }
        if chk.code == Some(3) {
            leaked += 1;
        }
    }
    eprintln!(
        "{}: {took:?} uninterrupted; {kills} kills, {running} while it ran: {as_before} read \
         as before, {as_after} as after, {mixed} partly as after, {leaked} left \
         leaks",
        op.name
    );
    Ok(running)
}

#[test]
fn sigkill_during_structure_changes_leaves_a_consistent_image() {
    let kills: usize = std::env::var("CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let mut rng = Rng::new(seed(0xc4a5));
    let mut f = Failures::new();
    let mut running = 0;
    for op in OPS {
        let r = crash_op(op, kills, &mut rng).map(|n| running += n);
        f.record(op.name, r);
    }
    f.finish();
    // Delays are drawn within an uninterrupted run's time: most kills must land mid-way,
    // or the test shows nothing.
    let total = kills * OPS.len();
    assert!(
        running * 2 >= total,
        "only {running} of {total} kills hit a running img"
    );
}
