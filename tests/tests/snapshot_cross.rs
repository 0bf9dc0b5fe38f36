//! `img snapshot` against `qemu-img snapshot`: snapshots made by one tool are listed,
//! applied and deleted by the other; `-l` and error output are identical (both tools run
//! in the same directory and time zone); after every step `qemu-img check` is clean and
//! every snapshot reads back (`qemu-img convert -l snapshot.name=...`) what it held.

use integration_tests::twin::{verbatim, Names, Pair};
use integration_tests::*;
use std::path::Path;

fn qcow2(dir: &Path, file: &str, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([file, size]);
    qemu_img_in(dir, &args).ok();
}

fn io(path: &Path, cmds: &[&str]) {
    let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    qemu_io_cmds(path, "qcow2", &cmds);
}

/// Run `tool snapshot ARGS FILE`, which must succeed.
fn snap(tool: &Tool, path: &Path, args: &[&str]) -> Result<(), String> {
    let mut a = vec!["snapshot"];
    a.extend_from_slice(args);
    a.push(s(path));
    tool.run(None, &a).check().map(|_| ())
}

/// What snapshot `name` holds, read by qemu-img.
fn snapshot_contents(path: &Path, name: &str) -> Result<Vec<u8>, String> {
    let out = path.with_extension(format!("{name}.raw"));
    let opt = format!("snapshot.name={name}");
    qemu_img(&["convert", "-l", &opt, "-O", "raw", s(path), s(&out)]).check()?;
    let data = std::fs::read(&out).map_err(|e| e.to_string());
    let _ = std::fs::remove_file(&out);
    data
}

/// Every snapshot in `expected` reads back its contents, and the image checks clean.
fn verify(path: &Path, expected: &[(String, Vec<u8>)]) -> Result<(), String> {
    qemu_check(path)?;
    for (name, data) in expected {
        let got = snapshot_contents(path, name)?;
        if let Some(m) = first_mismatch(data, &got) {
            return Err(format!("snapshot {name}: {m}"));
        }
    }
    Ok(())
}

/// `img snapshot ARGS` and `qemu-img snapshot ARGS` print the same in `dir`.
fn same_output(dir: &Path, args: &[&str]) -> Result<(), String> {
    let mut a = vec!["snapshot"];
    a.extend_from_slice(args);
    Pair::run(dir, dir, &Tool::img(), &a).compare(Names::Everywhere, verbatim)
}

/// Pattern, snapshot, overwrite, snapshot, with `maker` taking the snapshots; then the
/// other tool applies the first and deletes it; contents and check verified throughout.
fn round_trip(opts: &str, compressed: bool, maker: &Tool, other: &Tool) -> Result<(), String> {
    let dir = tempdir();
    let p = dir.path().join("t.qcow2");
    qcow2(dir.path(), "t.qcow2", opts, "4M");
    let w = if compressed { "write -c" } else { "write" };
    io(
        &p,
        &[
            &format!("{w} -P 0x11 0 1M"),
            "write -P 0x12 3M 64k",
            "write -z 2M 64k",
        ],
    );
    let mut expected = Vec::new();
    for (i, name) in ["first", "second"].iter().enumerate() {
        let now = qemu_read_all(&p, None, dir.path());
        snap(maker, &p, &["-c", name])?;
        expected.push((name.to_string(), now));
        verify(&p, &expected)?;
        let pat = format!("write -P 0x{:x} {}k 192k", 0x40 + i, 64 * i + 32);
        io(&p, &[&pat, "write -P 0x55 1536k 64k", "discard 3M 64k"]);
        verify(&p, &expected)?;
    }
    same_output(dir.path(), &["-l", "t.qcow2"])?;
    snap(other, &p, &["-a", "first"])?;
    let active = qemu_read_all(&p, None, dir.path());
    ensure(active == expected[0].1, || "apply: contents differ".into())?;
    verify(&p, &expected)?;
    io(&p, &["write -P 0x66 0 128k"]);
    snap(other, &p, &["-d", "first"])?;
    expected.remove(0);
    verify(&p, &expected)?;
    snap(maker, &p, &["-d", "second"])?;
    qemu_check(&p)?;
    let mut want = active;
    want[..128 << 10].fill(0x66);
    ensure(qemu_read_all(&p, None, dir.path()) == want, || {
        "active contents changed by deletes".into()
    })
}

#[test]
fn snapshots_cross_both_ways_on_many_geometries() {
    let configs = [
        ("", false),
        ("cluster_size=4096", false),
        ("cluster_size=512", false),
        ("cluster_size=2M", false),
        ("extended_l2=on", false),
        ("extended_l2=on,cluster_size=16k", true),
        ("", true),
        ("compat=0.10", false),
        ("lazy_refcounts=on", false),
        ("refcount_bits=4", false),
        ("refcount_bits=16", true),
        ("refcount_bits=8", false),
        ("refcount_bits=32", false),
        ("refcount_bits=64", true),
    ];
    let mut f = Failures::new();
    for (opts, compressed) in configs {
        for (dir_name, maker, other) in [
            ("img->qemu", Tool::img(), Tool::qemu_img()),
            ("qemu->img", Tool::qemu_img(), Tool::img()),
        ] {
            let name = format!("{dir_name} [{opts}] compressed={compressed}");
            f.record(&name, round_trip(opts, compressed, &maker, &other));
        }
    }
    f.finish();
}

/// Narrow refcounts cannot count more references: both tools refuse the same way, and
/// img leaves the image clean (qemu-img leaks a cluster there).
#[test]
fn narrow_refcounts_refuse_like_qemu() {
    let cases: &[(&str, &str, &[&str], &[&str])] = &[
        ("refcount_bits=1", "write 0 64k", &[], &["-c", "a"]),
        ("refcount_bits=1", "", &[], &["-c", "a"]),
        (
            "refcount_bits=2",
            "write 0 64k",
            &["-c", "a", "-c", "b"],
            &["-a", "a"],
        ),
        ("refcount_bits=4", "write -c 0 1M", &[], &["-c", "a"]),
    ];
    let mut f = Failures::new();
    for (n, &(opts, write, before, args)) in cases.iter().enumerate() {
        let dir = tempdir();
        let d = dir.path();
        qcow2(d, "t.qcow2", opts, "1M");
        if !write.is_empty() {
            io(&d.join("t.qcow2"), &[write]);
        }
        for pair in before.chunks(2) {
            qemu_img_in(d, &["snapshot", pair[0], pair[1], "t.qcow2"]).ok();
        }
        std::fs::copy(d.join("t.qcow2"), d.join("i.qcow2")).unwrap();
        let mut qa = vec!["snapshot"];
        qa.extend_from_slice(args);
        let mut ia = qa.clone();
        qa.push("t.qcow2");
        ia.push("i.qcow2");
        let qo = qemu_img_in(d, &qa);
        let io_ = Tool::img().run(Some(d), &ia);
        let (qe, ie) = (qemu_to_img_prefix(&qo.stderr), io_.stderr.clone());
        let r = ensure(qo.code == io_.code && qe == ie, || {
            format!("differ:\n{}\n{}", qo.report(), io_.report())
        })
        .and_then(|_| qemu_check(&d.join("i.qcow2")));
        f.record(&format!("{n}: {opts} {write} {}", args.join(" ")), r);
    }
    f.finish();
}

/// `-l` of tables qemu-img made, and qemu-img's messages for bad requests.
#[test]
fn list_and_errors_match_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let p = d.join("s.qcow2");
    qcow2(d, "s.qcow2", "", "2M");
    io(&p, &["write -P 1 0 64k"]);
    for name in [
        "one",
        "a name with spaces",
        "a-very-long-snapshot-tag-name",
        "one",
    ] {
        qemu_img_in(d, &["snapshot", "-c", name, "s.qcow2"]).ok();
    }
    qcow2(d, "none.qcow2", "", "1M");
    qemu_img_in(d, &["create", "-q", "-f", "raw", "r.raw", "1M"]).ok();
    let mut f = Failures::new();
    let cases: &[&[&str]] = &[
        &["-l", "s.qcow2"],
        &["s.qcow2"],
        &["-U", "-l", "s.qcow2"],
        &["-f", "qcow2", "-l", "s.qcow2"],
        &["-l", "none.qcow2"],
        &["-l", "-f", "raw", "r.raw"],
        &["-l", "-c", "x", "s.qcow2"],
        &["-c", "x", "-d", "y", "s.qcow2"],
        &["-l"],
        &["-l", "s.qcow2", "none.qcow2"],
        &["-c"],
        &["-x", "s.qcow2"],
        &["-d", "nope", "s.qcow2"],
        &["-d", "2", "s.qcow2"],
        &["-a", "nope", "s.qcow2"],
        &["-c", "x", "-f", "raw", "r.raw"],
        &["-a", "x", "-f", "raw", "r.raw"],
        &["-d", "x", "-f", "raw", "r.raw"],
        &["-l", "missing.qcow2"],
    ];
    for args in cases {
        f.record(&args.join(" "), same_output(d, args));
    }
    f.record("still clean", qemu_check(&p));
    f.finish();
}

/// Over a hundred snapshots, made by img, listed identically, applied and deleted by both.
#[test]
fn many_snapshots() {
    let dir = tempdir();
    let d = dir.path();
    let p = d.join("m.qcow2");
    qcow2(d, "m.qcow2", "cluster_size=4096", "1M");
    let mut expected = Vec::new();
    let mut f = Failures::new();
    for i in 0..120u32 {
        if i % 10 == 0 {
            io(&p, &[&format!("write -P {} {}k 8k", i + 1, (i % 60) * 8)]);
            expected.push((format!("s{i}"), qemu_read_all(&p, None, d)));
        }
        if let Err(e) = snap(&Tool::img(), &p, &["-c", &format!("s{i}")]) {
            f.record(&format!("create s{i}"), Err(e));
        }
    }
    f.record("after creating", verify(&p, &expected));
    f.record("list", same_output(d, &["-l", "m.qcow2"]));
    for i in (1..120).step_by(2) {
        let tool = if i % 4 == 1 {
            Tool::img()
        } else {
            Tool::qemu_img()
        };
        if let Err(e) = snap(&tool, &p, &["-d", &format!("s{i}")]) {
            f.record(&format!("delete s{i}"), Err(e));
        }
    }
    f.record("after deleting", verify(&p, &expected));
    f.record("list after deleting", same_output(d, &["-l", "m.qcow2"]));
    // ID 61 is s60 (IDs are not reused until the highest one goes).
    f.record("apply by id", snap(&Tool::img(), &p, &["-a", "61"]));
    f.record(
        "applied contents",
        ensure(qemu_read_all(&p, None, d) == expected[6].1, || {
            "apply by ID read back wrong".into()
        }),
    );
    f.record("after apply", verify(&p, &expected));
    f.record(
        "create after deletes",
        snap(&Tool::img(), &p, &["-c", "last"]),
    );
    f.record("list at the end", same_output(d, &["-l", "m.qcow2"]));
    f.finish();
}
