//! `img info` against `qemu-img info` on images made by qemu-img / qemu-io.
//!
//! Both tools run in the same directory on the same file with the same arguments (`info`
//! writes nothing; `integration_tests::twin::Pair`); stdout,
//! stderr (prefix mapped) and exit code must be identical, except the values of
//! `disk size:` (human) and `"actual-size"` (JSON), which depend on the host filesystem.

use integration_tests::qcow2_layout::{
    Layout, Patch, INCOMPAT_CORRUPT, L1_TABLE_OFFSET, REFCOUNT_TABLE_OFFSET, SNAPSHOTS_OFFSET,
};
use integration_tests::twin::{Names, Pair};
use integration_tests::*;
use std::path::Path;

fn compare_info(dir: &Path, args: &[&str]) -> Result<(), String> {
    let mut full = vec!["info"];
    full.extend_from_slice(args);
    Pair::run(dir, dir, &Tool::img(), &full).compare(Names::Prefix, foreign::normalize_info)
}

/// Every flavour of `info` invocation for one image.
fn variants(file: &str, fmt: &str) -> Vec<Vec<String>> {
    let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        f(&[file]),
        f(&["--output=json", file]),
        f(&["--output", "human", file]),
        f(&["--backing-chain", file]),
        f(&["--output=json", "--backing-chain", file]),
        f(&["-f", fmt, file]),
        f(&["-f", fmt, "--output=json", file]),
        f(&["-U", file]),
        f(&["-U", "--backing-chain", "--output=json", file]),
    ]
}

fn qimg(dir: &Path, args: &str) {
    let a: Vec<&str> = args.split_whitespace().collect();
    qemu_img_in(dir, &a).ok();
}

fn qio(dir: &Path, file: &str, fmt: &str, cmds: &[&str]) {
    qemu_io_cmds(
        &dir.join(file),
        fmt,
        &cmds.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
    );
}

/// Build the images (name, format) in `dir`.
fn make_images(dir: &Path) -> Vec<(String, &'static str)> {
    let mut v: Vec<(String, &'static str)> = Vec::new();
    let mut add = |name: &str, fmt: &'static str| v.push((name.to_string(), fmt));

    qimg(dir, "create -q -f qcow2 v3.qcow2 1M");
    add("v3.qcow2", "qcow2");
    qimg(dir, "create -q -f qcow2 -o compat=0.10 v2.qcow2 1.5G");
    add("v2.qcow2", "qcow2");
    qimg(
        dir,
        "create -q -f qcow2 -o cluster_size=512,refcount_bits=1 c512.qcow2 3M",
    );
    qio(dir, "c512.qcow2", "qcow2", &["write -P 1 1000 5000"]);
    add("c512.qcow2", "qcow2");
    qimg(
        dir,
        "create -q -f qcow2 -o cluster_size=2M,refcount_bits=64 c2m.qcow2 10G",
    );
    qio(dir, "c2m.qcow2", "qcow2", &["write -P 2 3M 1M"]);
    add("c2m.qcow2", "qcow2");
    qimg(
        dir,
        "create -q -f qcow2 -o lazy_refcounts=on lazy.qcow2 64M",
    );
    add("lazy.qcow2", "qcow2");
    // Dirty: lazy refcounts, write, then abort() without closing.
    qimg(
        dir,
        "create -q -f qcow2 -o lazy_refcounts=on dirty.qcow2 64M",
    );
    let _ = qemu_io(&[
        "-c",
        "write -P 3 0 128k",
        "-c",
        "abort",
        s(&dir.join("dirty.qcow2")),
    ]);
    add("dirty.qcow2", "qcow2");
    qimg(
        dir,
        "create -q -f qcow2 -o extended_l2=on,cluster_size=128k el2.qcow2 5M",
    );
    qio(dir, "el2.qcow2", "qcow2", &["write -P 4 4k 4k"]);
    add("el2.qcow2", "qcow2");
    qimg(
        dir,
        "create -q -f qcow2 -o compression_type=zstd zstd.qcow2 2M",
    );
    qio(dir, "zstd.qcow2", "qcow2", &["write -c -P 5 0 64k"]);
    add("zstd.qcow2", "qcow2");
    qimg(
        dir,
        "create -q -f qcow2 -o preallocation=metadata pm.qcow2 3M",
    );
    add("pm.qcow2", "qcow2");
    qimg(dir, "create -q -f qcow2 -o preallocation=full pf.qcow2 1M");
    add("pf.qcow2", "qcow2");
    qimg(dir, "create -q -f raw r.raw 3M");
    add("r.raw", "raw");
    qimg(dir, "create -q -f raw odd.raw 1000");
    add("odd.raw", "raw");
    qimg(dir, "create -q -f qcow2 odd.qcow2 1000001");
    add("odd.qcow2", "qcow2");
    // Backing chains: qcow2 <- qcow2 (2 deep), raw <- qcow2 <- qcow2 (3 deep), relative.
    qimg(dir, "create -q -f qcow2 base.qcow2 4M");
    qio(dir, "base.qcow2", "qcow2", &["write -P 6 0 1M"]);
    qimg(dir, "create -q -f qcow2 -b base.qcow2 -F qcow2 top2.qcow2");
    add("top2.qcow2", "qcow2");
    qimg(dir, "create -q -f qcow2 -b base.raw -F raw mid.qcow2 1M"); // fails if base.raw missing
    add("mid.qcow2", "qcow2");
    qimg(
        dir,
        "create -q -f qcow2 -b mid.qcow2 -F qcow2 top3.qcow2 2M",
    );
    add("top3.qcow2", "qcow2");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    qimg(
        dir,
        "create -q -f qcow2 -b ../top2.qcow2 -F qcow2 -o compat=0.10 sub/rel.qcow2",
    );
    add("sub/rel.qcow2", "qcow2");
    qimg(
        dir,
        "create -q -f qcow2 -u -b missing.qcow2 -F qcow2 miss.qcow2 1M",
    );
    add("miss.qcow2", "qcow2");
    // Snapshots.
    qimg(dir, "create -q -f qcow2 snap.qcow2 8M");
    qio(dir, "snap.qcow2", "qcow2", &["write -P 7 0 1M"]);
    qimg(dir, "snapshot -c first snap.qcow2");
    qio(dir, "snap.qcow2", "qcow2", &["write -P 8 512k 1M"]);
    qimg(dir, "snapshot -c second-with-longer-name snap.qcow2");
    qimg(dir, "snapshot -c third snap.qcow2");
    add("snap.qcow2", "qcow2");
    qimg(dir, "create -q -f qcow2 -o compat=0.10 snapv2.qcow2 8M");
    qimg(dir, "snapshot -c only snapv2.qcow2");
    add("snapv2.qcow2", "qcow2");
    qimg(
        dir,
        "create -q -f qcow2 -b snap.qcow2 -F qcow2 snaptop.qcow2",
    );
    qimg(dir, "snapshot -c topsnap snaptop.qcow2");
    add("snaptop.qcow2", "qcow2");
    // Corrupt bit set (info still works and says corrupt: true).
    qimg(dir, "create -q -f qcow2 corrupt.qcow2 1M");
    Patch(&dir.join("corrupt.qcow2")).set_incompatible(INCOMPAT_CORRUPT);
    add("corrupt.qcow2", "qcow2");
    v
}

#[test]
fn info_matches_qemu() {
    let tmp = tempdir();
    let dir = tmp.path();
    qimg(dir, "create -q -f raw base.raw 1M");
    qio(dir, "base.raw", "raw", &["write -P 9 4k 8k"]);
    let images = make_images(dir);
    let mut f = Failures::new();
    for (file, fmt) in &images {
        for args in variants(file, fmt) {
            let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            f.record(&format!("info {}", args.join(" ")), compare_info(dir, &a));
        }
    }
    // Absolute paths (names and backing "actual path" then carry the absolute directory).
    for (file, fmt) in [
        ("top3.qcow2", "qcow2"),
        ("sub/rel.qcow2", "qcow2"),
        ("r.raw", "raw"),
    ] {
        let abs = dir.join(file);
        for args in variants(s(&abs), fmt).into_iter().take(5) {
            let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            f.record(
                &format!("info {}", args.join(" ")),
                compare_info(Path::new("/"), &a),
            );
        }
    }
    // Wrong -f: qcow2 read as raw is fine; raw read as qcow2 is an error (same message).
    f.record(
        "info -f raw v3.qcow2",
        compare_info(dir, &["-f", "raw", "v3.qcow2"]),
    );
    f.record(
        "info -f qcow2 r.raw",
        compare_info(dir, &["-f", "qcow2", "r.raw"]),
    );
    f.record(
        "info nonexistent",
        compare_info(dir, &["nonexistent.qcow2"]),
    );
    f.finish();
}

/// While another process has the image open read-write, plain `info` fails with the lock
/// message (like qemu-img) and `info -U` works.
#[test]
fn info_on_locked_image() {
    let tmp = tempdir();
    let dir = tmp.path();
    qimg(dir, "create -q -f qcow2 locked.qcow2 1M");
    let holder = qemu_io_hold(&dir.join("locked.qcow2"));
    let mut f = Failures::new();
    f.record(
        "info locked.qcow2 (locked)",
        compare_info(dir, &["locked.qcow2"]),
    );
    f.record(
        "info -U locked.qcow2 (locked)",
        compare_info(dir, &["-U", "locked.qcow2"]),
    );
    f.record(
        "info -U --output=json locked.qcow2 (locked)",
        compare_info(dir, &["-U", "--output=json", "locked.qcow2"]),
    );
    drop(holder);
    f.finish();
}

/// While another process writes the backing file: plain `info` of the overlay works (it does
/// not open the backing file), `--backing-chain` fails on the backing file with the lock
/// message, `-U` works; all like qemu-img.
#[test]
fn info_on_overlay_with_locked_backing_file() {
    let tmp = tempdir();
    let dir = tmp.path();
    qimg(dir, "create -q -f qcow2 base.qcow2 1M");
    qimg(dir, "create -q -f qcow2 -b base.qcow2 -F qcow2 ov.qcow2");
    let holder = qemu_io_hold(&dir.join("base.qcow2"));
    let mut f = Failures::new();
    for args in [
        &["ov.qcow2"][..],
        &["--backing-chain", "ov.qcow2"],
        &["--backing-chain", "--output=json", "ov.qcow2"],
        &["-U", "--backing-chain", "ov.qcow2"],
    ] {
        f.record(
            &format!("info {} (backing locked)", args.join(" ")),
            compare_info(dir, args),
        );
    }
    drop(holder);
    f.finish();
}

/// Less common qcow2 features qemu-img create/bitmap can produce: persistent dirty bitmaps
/// (autoclear feature, listed under "bitmaps:") and external data files.
#[test]
fn info_matches_qemu_extra_features() {
    let tmp = tempdir();
    let dir = tmp.path();
    qimg(dir, "create -q -f qcow2 bm.qcow2 1M");
    qimg(dir, "bitmap --add bm.qcow2 bm0");
    qimg(dir, "bitmap --add -g 128k bm.qcow2 second");
    qimg(dir, "bitmap --add bm.qcow2 off");
    qimg(dir, "bitmap --disable bm.qcow2 off");
    qimg(dir, "create -q -f qcow2 -o data_file=df.raw df.qcow2 1M");
    qimg(
        dir,
        "create -q -f qcow2 -o data_file=dfr.raw,data_file_raw=on dfr.qcow2 1M",
    );
    let mut f = Failures::new();
    for file in ["bm.qcow2", "df.qcow2", "dfr.qcow2"] {
        for args in variants(file, "qcow2").into_iter().take(5) {
            let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            f.record(&format!("info {}", args.join(" ")), compare_info(dir, &a));
        }
    }
    f.finish();
}

/// Files qemu-img still describes: /dev/null (a 0-byte raw image on 'host_device'), a qcow2
/// header cut short at every length (the missing bytes read as zeroes, so qemu-img names
/// the field that then fails), and tables past the end of the file (read as zeroes).
#[test]
fn info_matches_qemu_on_short_files_and_far_tables() {
    let tmp = tempdir();
    let dir = tmp.path();
    qimg(dir, "create -q -f qcow2 full.qcow2 1M");
    let header = std::fs::read(dir.join("full.qcow2")).unwrap();
    // An empty name too: no file name at all.
    let mut files = vec!["/dev/null".to_string(), String::new()];
    for len in (4..=120).step_by(4).chain([7, 9, 71, 73, 103, 105]) {
        let name = format!("cut{len}.qcow2");
        std::fs::write(dir.join(&name), &header[..len]).unwrap();
        files.push(name);
    }
    qimg(dir, "create -q -f qcow2 snap.qcow2 1M");
    qio(dir, "snap.qcow2", "qcow2", &["write -P 7 0 64k"]);
    qimg(dir, "snapshot -c one snap.qcow2");
    let far = 1u64 << 30;
    let snap_entry = Layout::of(&dir.join("snap.qcow2")).snap_entries[0];
    for (name, patch) in [
        ("far_l1.qcow2", L1_TABLE_OFFSET.offset),
        ("far_rt.qcow2", REFCOUNT_TABLE_OFFSET.offset),
        ("far_snap.qcow2", SNAPSHOTS_OFFSET.offset),
        ("far_snap_l1.qcow2", snap_entry),
    ] {
        std::fs::copy(dir.join("snap.qcow2"), dir.join(name)).unwrap();
        Patch(&dir.join(name)).put_u64(patch, far);
        files.push(name.to_string());
    }
    let mut f = Failures::new();
    for file in &files {
        for args in [
            vec![file.as_str()],
            vec!["--output=json", file.as_str()],
            vec!["-f", "qcow2", file.as_str()],
        ] {
            f.record(
                &format!("info {}", args.join(" ")),
                compare_info(dir, &args),
            );
        }
    }
    f.finish();
}
