//! `img check` against `qemu-img check` on identical copies of clean and damaged images:
//! stdout, stderr (prefix mapped), exit code, and after a repair the image qemu-img then
//! finds and the guest data it holds.

use integration_tests::*;
use std::path::Path;

fn be64(b: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}
fn put64(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
}

/// The header fields the damage helpers need.
struct Layout {
    cluster_bits: u32,
    l1: u64,
    reftable: u64,
    refcount_order: u32,
}

impl Layout {
    fn of(b: &[u8]) -> Layout {
        Layout {
            cluster_bits: u32::from_be_bytes(b[20..24].try_into().unwrap()),
            l1: be64(b, 40),
            reftable: be64(b, 48),
            refcount_order: u32::from_be_bytes(b[96..100].try_into().unwrap()),
        }
    }
    fn l2(&self, b: &[u8], i: u64) -> u64 {
        be64(b, self.l1 + 8 * i) & 0x00ff_ffff_ffff_fe00
    }
    /// Byte offset of cluster `c`'s refcount (refcount widths of 8 bits and more).
    fn refcount_at(&self, b: &[u8], c: u64) -> (u64, usize) {
        let bytes = 1usize << (self.refcount_order - 3);
        let per_rb = (1u64 << self.cluster_bits) / bytes as u64;
        let rb = be64(b, self.reftable + 8 * (c / per_rb)) & !0x1ff;
        (rb + (c % per_rb) * bytes as u64, bytes)
    }
    fn set_refcount(&self, b: &mut [u8], c: u64, v: u64) {
        let (at, n) = self.refcount_at(b, c);
        let be = v.to_be_bytes();
        b[at as usize..at as usize + n].copy_from_slice(&be[8 - n..]);
    }
    fn refcount(&self, b: &[u8], c: u64) -> u64 {
        let (at, n) = self.refcount_at(b, c);
        b[at as usize..at as usize + n]
            .iter()
            .fold(0, |a, &x| (a << 8) | u64::from(x))
    }
}

/// An image made by qemu-img/qemu-io: `opts`, then the qemu-io commands.
fn make(dir: &Path, name: &str, opts: &str, size: &str, io: &[&str]) -> Vec<u8> {
    let p = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, s(&p), size]).ok();
    for c in io {
        if let Some(snap) = c.strip_prefix("snapshot ") {
            qemu_img(&["snapshot", "-c", snap, s(&p)]).ok();
        } else if let Some(args) = c.strip_prefix("bitmap ") {
            let mut a = vec!["bitmap"];
            a.extend(args.split(' '));
            a.push(s(&p));
            let name = a.remove(a.len() - 2);
            a.push(name);
            qemu_img(&a).check().unwrap();
        } else {
            qemu_io(&["-c", c, s(&p)]).ok();
        }
    }
    std::fs::read(&p).unwrap()
}

fn raw_of(dir: &Path, img: &Path) -> Vec<u8> {
    let out = dir.join("out.raw");
    qemu_img(&["convert", "-O", "raw", s(img), s(&out)]).ok();
    std::fs::read(&out).unwrap()
}

/// Run both tools on copies of `bytes`; with `-r`, also compare what the repair left.
fn compare(dir: &Path, what: &str, bytes: &[u8], args: &[&str]) -> Result<(), String> {
    let (qd, id) = (dir.join("q"), dir.join("i"));
    for d in [&qd, &id] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("t.qcow2"), bytes).unwrap();
    }
    let mut full = vec!["check"];
    full.extend_from_slice(args);
    full.push("t.qcow2");
    let q = qemu_img_in(&qd, &full);
    let i = img_in(&id, &full);
    let ierr = i
        .stderr
        .replace("img: ", "qemu-img: ")
        .replace("'img check -r'", "'qemu-img check -r'");
    if (q.stdout.as_str(), q.stderr.as_str(), q.code) != (i.stdout.as_str(), ierr.as_str(), i.code)
    {
        return Err(format!(
            "{what} {args:?}:\n--- qemu-img\n{}\n--- img\n{}",
            q.report(),
            i.report()
        ));
    }
    if args.contains(&"-r") {
        let after_q = qemu_img(&["check", s(&qd.join("t.qcow2"))]);
        let after_i = qemu_img(&["check", s(&id.join("t.qcow2"))]);
        if after_q.code == Some(0) && after_i.code != Some(0) {
            return Err(format!(
                "{what} {args:?}: not clean after repair\n{}",
                after_i.report()
            ));
        }
        if after_q.code == Some(0)
            && raw_of(dir, &qd.join("t.qcow2")) != raw_of(dir, &id.join("t.qcow2"))
        {
            return Err(format!("{what} {args:?}: guest data differs after repair"));
        }
    }
    Ok(())
}

const MODES: &[&[&str]] = &[
    &[],
    &["--output=json"],
    &["-r", "leaks"],
    &["-r", "all"],
    &["-r", "all", "--output=json"],
    &["-q"],
];

fn compare_all(dir: &Path, what: &str, bytes: &[u8]) -> Vec<String> {
    MODES
        .iter()
        .filter_map(|m| compare(dir, what, bytes, m).err())
        .collect()
}

const WRITES: &[&str] = &[
    "write -P 1 0 300k",
    "write -c -P 2 1M 64k",
    "write -P 3 3M 100k",
    "write -P 4 2M 4k",
];

#[test]
fn clean_images_match_qemu() {
    let dir = tempdir();
    let mut failures = Vec::new();
    for opts in [
        "cluster_size=512",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=65536",
        "cluster_size=65536,refcount_bits=2",
        "cluster_size=16384,refcount_bits=64",
        "cluster_size=65536,extended_l2=on",
        "cluster_size=2097152",
        "cluster_size=65536,refcount_bits=8,compression_type=zstd",
    ] {
        let cs: u64 = opts
            .split(',')
            .find_map(|o| o.strip_prefix("cluster_size="))
            .unwrap()
            .parse()
            .unwrap();
        let compressed = format!("write -c -P 2 {} {cs}", (1u64 << 20).next_multiple_of(cs));
        let mut writes = WRITES.to_vec();
        writes[1] = &compressed;
        let b = make(dir.path(), "src.qcow2", opts, "8M", &writes);
        failures.extend(compare_all(dir.path(), opts, &b));
        let mut io = writes.clone();
        io.extend([
            "snapshot s1",
            "write -P 5 0 64k",
            "snapshot s2",
            "write -P 6 5M 8k",
        ]);
        if !opts.contains("refcount_bits=1") {
            let b = make(dir.path(), "src.qcow2", opts, "8M", &io);
            failures.extend(compare_all(dir.path(), &format!("{opts} +snapshots"), &b));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn damaged_images_match_qemu() {
    let dir = tempdir();
    let base = make(dir.path(), "src.qcow2", "cluster_size=65536", "8M", WRITES);
    let snap = {
        let mut io = WRITES.to_vec();
        io.push("snapshot s1");
        make(dir.path(), "src.qcow2", "cluster_size=65536", "8M", &io)
    };
    let lay = Layout::of(&base);
    let l2 = lay.l2(&base, 0);
    let e0 = be64(&base, l2);
    let data0 = (e0 & 0x00ff_ffff_ffff_fe00) >> 16;
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();

    let mut b = base.clone();
    let end = b.len() as u64 >> 16;
    b.resize(b.len() + 65536, 0);
    lay.set_refcount(&mut b, end, 1);
    cases.push(("leaked cluster", b));

    let mut b = base.clone();
    lay.set_refcount(&mut b, data0, 2);
    cases.push(("refcount too high", b));

    let mut b = base.clone();
    lay.set_refcount(&mut b, data0, 0);
    cases.push(("refcount zero", b));

    let mut b = snap.clone();
    let sl = Layout::of(&b);
    let sdata = (be64(&b, sl.l2(&b, 0)) & 0x00ff_ffff_ffff_fe00) >> 16;
    assert_eq!(sl.refcount(&b, sdata), 2);
    sl.set_refcount(&mut b, sdata, 1);
    cases.push(("refcount too low", b));

    let mut b = base.clone();
    put64(&mut b, lay.l1, be64(&base, lay.l1) & !(1 << 63));
    cases.push(("L1 without COPIED", b));

    let mut b = base.clone();
    put64(&mut b, l2, e0 & !(1 << 63));
    cases.push(("L2 entry without COPIED", b));

    let mut b = base.clone();
    put64(&mut b, lay.l1, lay.reftable | (1 << 63));
    cases.push(("L2 table on the refcount table", b));

    let mut b = base.clone();
    put64(&mut b, l2 + 8, be64(&base, l2 + 8) + 0x200);
    cases.push(("unaligned data entry", b));

    let mut b = base.clone();
    put64(&mut b, l2 + 16, (be64(&base, l2 + 16) + 0x400) | 1);
    cases.push(("unaligned preallocated entry", b));

    let mut b = base.clone();
    let ce = be64(&base, l2 + 16 * 8); // guest 1M: the compressed cluster
    assert!(ce & (1 << 62) != 0);
    let x = 62 - (16 - 8);
    let sectors = ce & !((1u64 << x) - 1);
    put64(&mut b, l2 + 16 * 8, sectors | (1 << 40));
    cases.push(("compressed past the end", b));

    let mut b = base.clone();
    let far = ((b.len() as u64 >> 16) + 4) << 16;
    put64(&mut b, lay.reftable + 8, far);
    cases.push(("refcount block outside the image", b));

    let mut b = base.clone();
    put64(&mut b, lay.reftable + 8, 0x1234_0200);
    cases.push(("unaligned refcount block", b));

    let mut failures = Vec::new();
    for (what, bytes) in &cases {
        failures.extend(compare_all(dir.path(), what, bytes));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Bitmaps made by qemu-img and dirtied by qemu-io writes.
const BITMAPS: &[&str] = &[
    "bitmap --add b0",
    "bitmap --add -g 512 fine",
    "write -P 7 0 300k",
    "write -P 8 6M 4k",
    "bitmap --disable fine",
    "bitmap --add -g 1M --disable off",
];

/// After a repair on both sides, the bitmaps are still there, with the same bits.
fn bitmaps_kept(dir: &Path, what: &str, bytes: &[u8]) -> Vec<String> {
    let before = {
        let p = dir.join("before.qcow2");
        std::fs::write(&p, bytes).unwrap();
        qcow2_bitmaps::summary(&p)
    };
    let mut failures = Vec::new();
    for mode in [&["-r", "leaks"][..], &["-r", "all"]] {
        if let Err(e) = compare(dir, what, bytes, mode) {
            failures.push(e);
            continue;
        }
        for side in ["q", "i"] {
            let after = qcow2_bitmaps::summary(&dir.join(side).join("t.qcow2"));
            if after != before {
                failures.push(format!(
                    "{what} {mode:?} ({side}): bitmaps changed\n{before}\n->\n{after}"
                ));
            }
        }
    }
    failures
}

#[test]
fn images_with_bitmaps_match_qemu() {
    let dir = tempdir();
    let mut failures = Vec::new();
    for opts in [
        "cluster_size=512",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=65536",
        "cluster_size=65536,extended_l2=on,refcount_bits=64",
        "cluster_size=2097152",
    ] {
        let mut io = BITMAPS.to_vec();
        io.extend(WRITES.iter().filter(|w| !w.contains("-c")));
        let b = make(dir.path(), "src.qcow2", opts, "8M", &io);
        failures.extend(compare_all(dir.path(), opts, &b));
        failures.extend(bitmaps_kept(dir.path(), opts, &b));
    }
    // Damage next to bitmaps: a leak, a refcount too high and one at zero.
    let base = make(dir.path(), "src.qcow2", "cluster_size=65536", "8M", BITMAPS);
    let lay = Layout::of(&base);
    let bm = qcow2_bitmaps::parse(&base).unwrap();
    let table = bm.entries[0].table_offset;
    let data = be64(&base, table) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(data, 0, "b0 has dirty bits");
    let mut b = base.clone();
    let end = b.len() as u64 >> 16;
    b.resize(b.len() + 65536, 0);
    lay.set_refcount(&mut b, end, 1);
    failures.extend(bitmaps_kept(dir.path(), "leak beside bitmaps", &b));
    let mut b = base.clone();
    lay.set_refcount(&mut b, data >> 16, 2);
    failures.extend(compare_all(dir.path(), "bitmap data refcount 2", &b));
    let mut b = base.clone();
    lay.set_refcount(&mut b, table >> 16, 0);
    failures.extend(compare_all(dir.path(), "bitmap table refcount 0", &b));
    let mut b = base.clone();
    lay.set_refcount(&mut b, bm.dir_offset >> 16, 0);
    // Not `-r leaks`: after that failed check qemu-img stores its bitmaps over the
    // directory (refcount 0) on close, and marks the image corrupt.
    failures.extend(
        MODES
            .iter()
            .filter(|m| **m != ["-r", "leaks"])
            .filter_map(|m| compare(dir.path(), "bitmap directory refcount 0", &b, m).err()),
    );
    // A program without bitmap support cleared the autoclear bit: the bitmaps are stale,
    // their clusters leak (QEMU warns), and a repair drops the extension.
    let mut b = base.clone();
    put64(&mut b, 88, 0);
    failures.extend(compare_all(dir.path(), "stale bitmaps extension", &b));
    // An in-use bitmap is not loaded on open, so check meets its damage.
    let in_use = |b: &mut Vec<u8>| {
        let e = &bm.entries[0];
        qcow2_layout::put_be(b, e.at + 12, 4, e.flags | 1);
    };
    let mut b = base.clone();
    in_use(&mut b);
    failures.extend(compare_all(dir.path(), "in-use bitmap", &b));
    let mut b = base.clone();
    in_use(&mut b);
    put64(&mut b, table, 1);
    failures.extend(compare_all(
        dir.path(),
        "in-use bitmap, data cluster leaked",
        &b,
    ));
    let mut b = base.clone();
    in_use(&mut b);
    put64(&mut b, table, 0x1000_0000);
    failures.extend(compare_all(
        dir.path(),
        "in-use bitmap data past the end",
        &b,
    ));
    let mut b = base.clone();
    in_use(&mut b);
    put64(&mut b, bm.entries[0].at, 0x1000_0000);
    failures.extend(compare_all(
        dir.path(),
        "in-use bitmap table past the end",
        &b,
    ));
    let mut b = base.clone();
    in_use(&mut b);
    put64(&mut b, table, data | 0x0100_0000_0000_0000);
    failures.extend(compare_all(
        dir.path(),
        "in-use bitmap, reserved table bits",
        &b,
    ));
    let mut b = base.clone();
    in_use(&mut b);
    put64(&mut b, table, data + 0x200);
    failures.extend(compare_all(dir.path(), "in-use bitmap, unaligned data", &b));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn formats_without_checks_and_bad_usage_match_qemu() {
    let dir = tempdir();
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    for args in [
        vec!["check", "-f", "raw", "r.raw"],
        vec!["check", "-r", "foo", "r.raw"],
        vec!["check", "--output=xml", "r.raw"],
        vec!["check"],
        vec!["check", "missing.qcow2"],
    ] {
        let q = qemu_img_in(dir.path(), &args);
        let i = img_in(dir.path(), &args);
        assert_eq!(
            (q.stdout.as_str(), q.stderr.as_str(), q.code),
            (
                i.stdout.as_str(),
                i.stderr
                    .replace("img: ", "qemu-img: ")
                    .replace("Try 'img ", "Try 'qemu-img ")
                    .as_str(),
                i.code
            ),
            "{args:?}"
        );
    }
}
