//! `img bitmap` against `qemu-img bitmap`: the same operations on twin copies of images
//! made by qemu-img (bitmaps added by qemu-img, dirtied by qemu-io writes), with output,
//! exit code, `qemu-img info` and the bitmaps' dirty granules (read from the files)
//! identical, and both images clean for `qemu-img check`; bitmaps made by `img` then
//! changed by qemu-img and qemu-io; errors word for word.

use integration_tests::qcow2_bitmaps::{self, summary};
use integration_tests::twin::Twin;
use integration_tests::*;
use std::path::Path;

fn qcow2(dir: &Path, file: &str, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([file, size]);
    qemu_img_in(dir, &args).check().unwrap();
}

fn qbitmap(dir: &Path, args: &[&str]) {
    let mut a = vec!["bitmap"];
    a.extend_from_slice(args);
    qemu_img_in(dir, &a).check().unwrap();
}

fn io(dir: &Path, file: &str, cmds: &[&str]) {
    let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    qemu_io_cmds(&dir.join(file), "qcow2", &cmds);
}

/// qemu-img names nodes `#block` with a counter and random digits.
fn unnumbered(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = rest.find("#block") {
        out.push_str(&rest[..at + 6]);
        rest = rest[at + 6..].trim_start_matches(|c: char| c.is_ascii_digit());
        out.push('N');
    }
    out.push_str(rest);
    out
}

/// What a tool left in `dir/file`: qemu-img's info bitmaps and check, and the bitmaps
/// as the file holds them.
fn state(dir: &Path, file: &str) -> Result<String, String> {
    let p = dir.join(file);
    qemu_check(&p)?;
    let info = qemu_info_json(&p, &[]);
    let bitmaps = &info["format-specific"]["data"]["bitmaps"];
    Ok(format!("{bitmaps}\n{}", summary(&p)))
}

/// `bitmap ARGS` through both tools on twin copies; everything must agree.
fn same(twin: &Twin, file: &str, args: &[&str]) -> Result<(), String> {
    let mut a = vec!["bitmap"];
    a.extend_from_slice(args);
    same_command(twin, file, &a)
}

/// `ARGS` (a whole command line) through both tools on twin copies; output, exit code,
/// and what `file` holds afterwards must agree.
fn same_command(twin: &Twin, file: &str, a: &[&str]) -> Result<(), String> {
    let pair = twin.run(a);
    let (q, i) = (&pair.qemu, &pair.img);
    let mut errs = Vec::new();
    if q.code != i.code {
        errs.push(format!(
            "exit code: qemu-img {:?}, img {:?}",
            q.code, i.code
        ));
    }
    let qerr = unnumbered(&qemu_to_img_prefix(&q.stderr));
    let qerr = qerr
        .replace("qemu-img bitmap", "img bitmap")
        .replace("'qemu-img check -r'", "'img check -r'");
    if let Some(d) = text_diff(
        "qemu-img stderr",
        &qerr,
        "img stderr",
        &unnumbered(&i.stderr),
    ) {
        errs.push(d);
    }
    if q.stdout != i.stdout {
        errs.push(format!("stdout: {:?} vs {:?}", q.stdout, i.stdout));
    }
    let made = |d: &Path| d.join(file).exists();
    if file.is_empty() || !made(twin.qemu_dir()) && !made(twin.img_dir()) {
        return pair.verdict(errs);
    }
    match (state(twin.qemu_dir(), file), state(twin.img_dir(), file)) {
        (Ok(qs), Ok(is)) => {
            if let Some(d) = text_diff("after qemu-img", &qs, "after img", &is) {
                errs.push(d);
            }
        }
        (q, i) => errs.push(format!("check: qemu-img side {q:?}, img side {i:?}")),
    }
    pair.verdict(errs)
}

/// A 64 MiB image with bitmaps b0 (64 KiB) and b1 (512 bytes, disabled after the
/// writes), dirtied by qemu-io writes, and a second image `o.qcow2` of the same size
/// with bitmap ob (4 KiB) dirtied elsewhere.
fn populated(opts: &'static str) -> impl Fn(&Path) {
    move |d: &Path| {
        qcow2(d, "t.qcow2", opts, "64M");
        qbitmap(d, &["--add", "t.qcow2", "b0"]);
        qbitmap(d, &["--add", "-g", "512", "t.qcow2", "b1"]);
        io(
            d,
            "t.qcow2",
            &["write 0 100k", "write 10M 1", "write 63M 1M"],
        );
        qbitmap(d, &["--disable", "t.qcow2", "b1"]);
        qbitmap(d, &["--add", "t.qcow2", "b2"]);
        io(d, "t.qcow2", &["write 32M 3k"]);
        qcow2(d, "o.qcow2", opts, "64M");
        qbitmap(d, &["--add", "-g", "4k", "o.qcow2", "ob"]);
        io(d, "o.qcow2", &["write 5M 9k", "write 40M 70k"]);
        qcow2(d, "small.qcow2", "", "32M");
        qbitmap(d, &["--add", "small.qcow2", "sb"]);
    }
}

const OPERATIONS: &[&[&str]] = &[
    &["--add", "t.qcow2", "new"],
    &["--add", "-g", "1M", "t.qcow2", "new"],
    &["--add", "-g", "2G", "--disable", "t.qcow2", "new"],
    &["--add", "-g", "0", "t.qcow2", "new"],
    &["--remove", "t.qcow2", "b1"],
    &["--remove", "t.qcow2", "b0"],
    &["--clear", "t.qcow2", "b0"],
    &["--disable", "t.qcow2", "b0"],
    &["--enable", "t.qcow2", "b1"],
    &["--merge", "b1", "t.qcow2", "b0"],
    &["--merge", "b0", "t.qcow2", "b1"],
    &["--merge", "b2", "t.qcow2", "b1"],
    &["--merge", "b0", "t.qcow2", "b0"],
    &["--merge", "ob", "-b", "o.qcow2", "t.qcow2", "b1"],
    &[
        "--merge", "ob", "-b", "o.qcow2", "-F", "qcow2", "t.qcow2", "b0",
    ],
    &[
        "--add",
        "--merge",
        "b1",
        "--merge",
        "b2",
        "--disable",
        "t.qcow2",
        "m",
    ],
    &["--clear", "--merge", "b2", "t.qcow2", "b0"],
    &["--remove", "--add", "-g", "8k", "t.qcow2", "b0"],
    &["--add", "--add", "t.qcow2", "twice"],
    &["--add", "--clear", "--remove", "t.qcow2", "x"],
    &["--add", "t.qcow2", "b0"],
    &["--add", "t.qcow2", ""],
    &["--add", "-g", "1000", "t.qcow2", "x"],
    &["--add", "-g", "256", "t.qcow2", "x"],
    &["--add", "-g", "4G", "t.qcow2", "x"],
    &["--remove", "t.qcow2", "nosuch"],
    &["--clear", "t.qcow2", "nosuch"],
    &["--enable", "t.qcow2", "nosuch"],
    &["--disable", "t.qcow2", "nosuch"],
    &["--merge", "nosuch", "t.qcow2", "b0"],
    &["--merge", "b0", "t.qcow2", "nosuch"],
    &["--merge", "b0", "-b", "o.qcow2", "t.qcow2", "b1"],
    &[
        "--merge", "ob", "-b", "o.qcow2", "-F", "raw", "t.qcow2", "b1",
    ],
    &["--merge", "sb", "-b", "small.qcow2", "t.qcow2", "b1"],
    &["--disable", "--merge", "nosuch", "t.qcow2", "b0"],
    &["--add", "-f", "raw", "t.qcow2", "x"],
    &["--remove", "-f", "raw", "t.qcow2", "b0"],
];

#[test]
fn operations_match_qemu() {
    let mut failures = Failures::new();
    for opts in ["", "cluster_size=512", "cluster_size=2M", "extended_l2=on"] {
        for args in OPERATIONS {
            let twin = Twin::new(populated(opts));
            failures.record(&format!("{opts} {args:?}"), same(&twin, "t.qcow2", args));
        }
    }
    failures.finish();
}

#[test]
fn names_limits_and_formats_match_qemu() {
    let mut failures = Failures::new();
    let long = "n".repeat(1023);
    let too_long = "n".repeat(1024);
    let twin = Twin::new(|d| {
        qcow2(d, "t.qcow2", "", "64M");
        qcow2(d, "v2.qcow2", "compat=0.10", "64M");
        qcow2(d, "big.qcow2", "", "100T");
        qcow2(d, "z.qcow2", "", "0");
        qemu_img_in(d, &["create", "-q", "-f", "raw", "r.raw", "1M"]).ok();
    });
    for (file, args) in [
        ("t.qcow2", vec!["--add", "t.qcow2", long.as_str()]),
        ("t.qcow2", vec!["--add", "t.qcow2", too_long.as_str()]),
        (
            "t.qcow2",
            vec!["--add", "t.qcow2", "name with spaces/and:odd*chars"],
        ),
        ("t.qcow2", vec!["--add", "t.qcow2", "ünïcødé"]),
        ("v2.qcow2", vec!["--add", "v2.qcow2", "x"]),
        ("v2.qcow2", vec!["--remove", "v2.qcow2", "x"]),
        ("big.qcow2", vec!["--add", "-g", "512", "big.qcow2", "x"]),
        ("big.qcow2", vec!["--add", "-g", "16k", "big.qcow2", "x"]),
        ("big.qcow2", vec!["--add", "big.qcow2", "x"]),
        ("big.qcow2", vec!["--clear", "big.qcow2", "x"]),
        ("", vec!["--add", "-f", "raw", "r.raw", "x"]),
        ("", vec!["--remove", "-f", "raw", "r.raw", "x"]),
        (
            "",
            vec!["--merge", "a", "-b", "t.qcow2", "-f", "raw", "r.raw", "x"],
        ),
        ("", vec!["--add", "nosuch.qcow2", "x"]),
        ("z.qcow2", vec!["--add", "z.qcow2", "x"]),
    ] {
        failures.record(
            &format!("{:?}", &args[..args.len().min(4)]),
            same(&twin, file, &args),
        );
    }
    failures.finish();
}

#[test]
fn usage_errors_match_qemu() {
    let mut failures = Failures::new();
    let twin = Twin::new(|d| qcow2(d, "t.qcow2", "", "1M"));
    for args in [
        &[][..],
        &["t.qcow2", "x"],
        &["--remove", "-g", "512", "t.qcow2", "x"],
        &["--remove", "-F", "raw", "t.qcow2", "x"],
        &["--remove", "-b", "t.qcow2", "t.qcow2", "x"],
        &["--remove", "t.qcow2"],
        &["--remove", "t.qcow2", "x", "y"],
        &["--add", "-g", "-1", "t.qcow2", "x"],
        &["--add", "-g", "abc", "t.qcow2", "x"],
        &["-g", "abc", "t.qcow2", "x"],
        &["--frob", "t.qcow2", "x"],
        &["--merge"],
        &["-g"],
    ] {
        failures.record(&format!("{args:?}"), same(&twin, "", args));
    }
    failures.finish();
}

/// Many bitmaps, added and removed one invocation at a time.
#[test]
fn many_bitmaps_match_qemu() {
    let twin = Twin::new(|d| {
        qcow2(d, "t.qcow2", "cluster_size=4096", "16M");
        io(d, "t.qcow2", &["write 0 1M"]);
    });
    let mut failures = Failures::new();
    let grans = ["512", "4k", "64k", "1M"];
    for i in 0..40 {
        let name = format!("bitmap-{i:02}");
        let g = grans[i % grans.len()];
        let r = same(&twin, "", &["--add", "-g", g, "t.qcow2", &name]);
        failures.record(&name, r);
    }
    for i in (0..40).step_by(3) {
        let name = format!("bitmap-{i:02}");
        failures.record(&name, same(&twin, "", &["--remove", "t.qcow2", &name]));
    }
    failures.record(
        "final",
        same(
            &twin,
            "t.qcow2",
            &["--merge", "bitmap-01", "t.qcow2", "bitmap-02"],
        ),
    );
    failures.finish();
}

/// A bitmap in use (not stored cleanly: QEMU calls it inconsistent) may only be removed.
#[test]
fn inconsistent_bitmaps_match_qemu() {
    let mut failures = Failures::new();
    for args in [
        &["--clear", "t.qcow2", "b0"][..],
        &["--enable", "t.qcow2", "b0"],
        &["--disable", "t.qcow2", "b0"],
        &["--merge", "b1", "t.qcow2", "b0"],
        &["--merge", "b0", "t.qcow2", "b1"],
        &["--remove", "t.qcow2", "b0"],
        &["--add", "t.qcow2", "b0"],
        &["--clear", "t.qcow2", "b1"],
    ] {
        let twin = Twin::new(|d| {
            populated("")(d);
            let p = d.join("t.qcow2");
            let mut b = std::fs::read(&p).unwrap();
            let e = qcow2_bitmaps::parse(&b).unwrap().entries[0].clone();
            qcow2_layout::put_be(&mut b, e.at + 12, 4, e.flags | 1);
            std::fs::write(&p, b).unwrap();
        });
        failures.record(&format!("{args:?}"), same(&twin, "t.qcow2", args));
    }
    failures.finish();
}

/// Bitmaps `img` made, changed by qemu-img and dirtied by qemu-io: QEMU reads what img
/// wrote, and img reads back what QEMU wrote.
#[test]
fn img_bitmaps_are_read_and_changed_by_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let p = d.join("t.qcow2");
    qcow2(d, "t.qcow2", "cluster_size=4096", "32M");
    let img_ok = |args: &[&str]| {
        let mut a = vec!["bitmap"];
        a.extend_from_slice(args);
        img_in(d, &a).check().unwrap();
    };
    img_ok(&["--add", "-g", "512", "t.qcow2", "fine"]);
    img_ok(&["--add", "t.qcow2", "coarse"]);
    // QEMU records its writes in the bitmaps img made.
    io(d, "t.qcow2", &["write 1M 5k", "write 20M 64k"]);
    qemu_check(&p).unwrap();
    let s = summary(&p);
    assert!(
        s.contains("fine 512 2 [(2048, 2057), (40960, 41087)]"),
        "{s}"
    );
    assert!(
        s.contains("coarse 4096 2 [(256, 257), (5120, 5135)]"),
        "{s}"
    );
    // img merges and disables; qemu-img then merges the result further.
    img_ok(&["--add", "--disable", "--merge", "coarse", "t.qcow2", "copy"]);
    qbitmap(d, &["--merge", "fine", "t.qcow2", "copy"]);
    img_ok(&["--remove", "t.qcow2", "fine"]);
    qemu_check(&p).unwrap();
    let info = qemu_info_json(&p, &[]);
    let names: Vec<&str> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["coarse", "copy"]);
    let s = summary(&p);
    assert!(s.contains("copy 4096 0 [(256, 257), (5120, 5135)]"), "{s}");
    // img info lists what qemu-img info lists.
    let ours = img_in(d, &["info", "--output=json", "t.qcow2"])
        .check()
        .unwrap()
        .stdout;
    let theirs = qemu_img_in(d, &["info", "--output=json", "t.qcow2"]);
    let pick = |t: &str| {
        let v: serde_json::Value = serde_json::from_str(t).unwrap();
        v["format-specific"]["data"]["bitmaps"].clone()
    };
    assert_eq!(pick(&ours), pick(&theirs.stdout));
    let human = |o: &str| {
        o.lines()
            .filter(|l| l.starts_with("        "))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let ours = img_in(d, &["info", "t.qcow2"]).check().unwrap().stdout;
    let theirs = qemu_img_in(d, &["info", "t.qcow2"]).check().unwrap().stdout;
    assert_eq!(human(&ours), human(&theirs));
}

/// Guest writes through the engine are recorded in the enabled bitmaps as qemu-io's
/// writes are recorded by QEMU: the same granules dirty, the bitmaps consistent after
/// close; disabled bitmaps do not change. A crash before close leaves them in use.
#[test]
fn guest_writes_are_recorded_like_qemu() {
    let twin = Twin::new(|d| {
        qcow2(d, "t.qcow2", "cluster_size=4096", "16M");
        qbitmap(d, &["--add", "-g", "512", "t.qcow2", "fine"]);
        qbitmap(d, &["--add", "t.qcow2", "coarse"]);
        qbitmap(d, &["--add", "-g", "64k", "--disable", "t.qcow2", "off"]);
        io(d, "t.qcow2", &["write 0 8k"]);
    });
    let writes: &[(&str, u64, u64)] = &[
        ("write", 65536, 4096),
        ("write", 100_000, 1),
        ("write -z", 3 << 20, 3 << 20),
        ("discard", 8 << 20, 1 << 20),
        ("write -c", 12 << 20, 4096),
        ("write", (16 << 20) - 512, 512),
    ];
    let cmds: Vec<String> = writes
        .iter()
        .map(|(c, o, l)| format!("{c} {o} {l}"))
        .collect();
    qemu_io_cmds(&twin.qemu_dir().join("t.qcow2"), "qcow2", &cmds);
    let p = twin.img_dir().join("t.qcow2");
    {
        let image = engine::open(&p, false).unwrap();
        for &(c, o, l) in writes {
            let data = vec![0x5a; l as usize];
            match c {
                "write" => image.driver().write_at(&data, o).unwrap(),
                "write -z" => image.driver().write_zeroes(o, l, false).unwrap(),
                "discard" => image.driver().discard(o, l).unwrap(),
                _ => image.write_compressed(o, &data).unwrap(),
            }
        }
        // While open, the enabled bitmaps are in use on disk.
        let s = summary(&p);
        assert!(
            s.contains("fine 512 3 ") && s.contains("off 65536 0 "),
            "{s}"
        );
    }
    let (q, i) = (
        state(twin.qemu_dir(), "t.qcow2"),
        state(twin.img_dir(), "t.qcow2"),
    );
    assert_eq!(q, i);
    assert!(i
        .unwrap()
        .contains("coarse 4096 2 [(0, 1), (16, 16), (24, 24)"));
    // `img check -r all` keeps the bitmaps and their clusters.
    let before = summary(&p);
    img_in(twin.img_dir(), &["check", "-r", "all", "t.qcow2"])
        .check()
        .unwrap();
    assert_eq!(summary(&p), before);
    qemu_check(&p).unwrap();
}

/// Commands that change the virtual size resize the bitmaps as QEMU does (bits past the
/// end dropped, new ones clear) and refuse an inconsistent bitmap; reverting to a snapshot
/// is refused while the image has bitmaps.
#[test]
fn resize_amend_and_snapshots_treat_bitmaps_like_qemu() {
    let mut failures = Failures::new();
    let cases: &[&[&str]] = &[
        &["resize", "t.qcow2", "1G"],
        &["resize", "t.qcow2", "+192M"],
        &["resize", "--shrink", "t.qcow2", "1M"],
        &["resize", "--shrink", "t.qcow2", "40M"],
        &["amend", "-o", "size=2G", "t.qcow2"],
        &["snapshot", "-a", "s1", "t.qcow2"],
        &["snapshot", "-a", "nosuch", "t.qcow2"],
    ];
    for args in cases {
        let twin = Twin::new(|d| {
            populated("")(d);
            qemu_img_in(d, &["snapshot", "-c", "s1", "t.qcow2"])
                .check()
                .unwrap();
        });
        failures.record(&format!("{args:?}"), same_command(&twin, "t.qcow2", args));
    }
    let twin = Twin::new(|d| {
        populated("")(d);
        let p = d.join("t.qcow2");
        let mut b = std::fs::read(&p).unwrap();
        let e = qcow2_bitmaps::parse(&b).unwrap().entries[1].clone();
        qcow2_layout::put_be(&mut b, e.at + 12, 4, e.flags | 1);
        std::fs::write(&p, b).unwrap();
    });
    failures.record(
        "resize with an inconsistent bitmap",
        same_command(&twin, "t.qcow2", &["resize", "t.qcow2", "1G"]),
    );
    failures.finish();
}

/// Mark bitmap `index` of `dir/file` in use (inconsistent), as a crash would leave it.
fn mark_in_use(dir: &Path, file: &str, index: usize) {
    let p = dir.join(file);
    let mut b = std::fs::read(&p).unwrap();
    let e = qcow2_bitmaps::parse(&b).unwrap().entries[index].clone();
    qcow2_layout::put_be(&mut b, e.at + 12, 4, e.flags | 1);
    std::fs::write(&p, b).unwrap();
}

/// `convert --bitmaps [--skip-broken-bitmaps]`: the bitmaps qemu-img copies (names,
/// granularities, flags, dirty granules), its errors and what it leaves behind; the
/// guest data of img's output equals the source's.
#[test]
fn convert_copies_bitmaps_like_qemu() {
    let mut failures = Failures::new();
    let cases: &[(&str, &[&str])] = &[
        ("out.qcow2", &["-O", "qcow2", "t.qcow2", "out.qcow2"]),
        (
            "out.qcow2",
            &[
                "-O",
                "qcow2",
                "-o",
                "cluster_size=512",
                "t.qcow2",
                "out.qcow2",
            ],
        ),
        (
            "out.qcow2",
            &[
                "-O",
                "qcow2",
                "-o",
                "cluster_size=2M",
                "t.qcow2",
                "out.qcow2",
            ],
        ),
        (
            "out.qcow2",
            &[
                "-O",
                "qcow2",
                "-o",
                "extended_l2=on",
                "t.qcow2",
                "out.qcow2",
            ],
        ),
        ("out.qcow2", &["-c", "-O", "qcow2", "t.qcow2", "out.qcow2"]),
        (
            "out.qcow2",
            &[
                "--skip-broken-bitmaps",
                "-O",
                "qcow2",
                "t.qcow2",
                "out.qcow2",
            ],
        ),
        // Into an existing image with a bitmap of its own, and into one that already
        // has some of the names (qemu-img makes those before the clash, newest first).
        ("o.qcow2", &["-n", "-O", "qcow2", "t.qcow2", "o.qcow2"]),
        ("dup.qcow2", &["-n", "-O", "qcow2", "t.qcow2", "dup.qcow2"]),
        // A bigger target: no merge fits, qemu-img makes no bitmap.
        ("big.qcow2", &["-n", "-O", "qcow2", "t.qcow2", "big.qcow2"]),
        // A source without bitmaps.
        ("out.qcow2", &["-O", "qcow2", "plain.qcow2", "out.qcow2"]),
        ("out.qcow2", &["-O", "qcow2", "v2.qcow2", "out.qcow2"]),
        (
            "out.qcow2",
            &["-O", "qcow2", "-o", "compat=0.10", "t.qcow2", "out.qcow2"],
        ),
        ("", &["-O", "raw", "t.qcow2", "out.raw"]),
        ("", &["-O", "qcow2", "r.raw", "out.qcow2"]),
        ("", &["-O", "qcow2", "t.qcow2", "o.qcow2", "out.qcow2"]),
    ];
    for opts in ["", "cluster_size=4096"] {
        for (file, args) in cases {
            let twin = Twin::new(|d| {
                populated(opts)(d);
                std::fs::copy(d.join("t.qcow2"), d.join("dup.qcow2")).unwrap();
                qbitmap(d, &["--remove", "dup.qcow2", "b0"]);
                qbitmap(d, &["--remove", "dup.qcow2", "b2"]);
                qcow2(d, "v2.qcow2", "compat=0.10", "64M");
                qcow2(d, "big.qcow2", "", "128M");
                qcow2(d, "plain.qcow2", "", "64M");
                qemu_img_in(d, &["create", "-q", "-f", "raw", "r.raw", "1M"]).ok();
            });
            let mut a = vec!["convert", "--bitmaps"];
            a.extend_from_slice(args);
            let mut r = same_command(&twin, file, &a);
            if r.is_ok() && !file.is_empty() {
                // The guest data: as like the source in img's output as in qemu-img's.
                let cmp = |d: &Path| qemu_img_in(d, &["compare", "-U", "t.qcow2", file]);
                let (q, i) = (cmp(twin.qemu_dir()), cmp(twin.img_dir()));
                if q.code != i.code {
                    r = Err(format!(
                        "compare with the source: qemu-img's output {:?}, img's {:?}\n{}",
                        q.code,
                        i.code,
                        i.report()
                    ));
                }
            }
            failures.record(&format!("{opts} {a:?}"), r);
        }
    }
    // An inconsistent bitmap stops the copy unless it is skipped (with a warning).
    for args in [
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "t.qcow2",
            "out.qcow2",
        ][..],
        &[
            "convert",
            "--bitmaps",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "t.qcow2",
            "out.qcow2",
        ],
    ] {
        for index in [0, 2] {
            let twin = Twin::new(|d| {
                populated("")(d);
                mark_in_use(d, "t.qcow2", index);
            });
            failures.record(
                &format!("bitmap {index} in use: {args:?}"),
                same_command(&twin, "out.qcow2", args),
            );
        }
    }
    // Usage errors.
    let twin = Twin::new(populated(""));
    failures.record(
        "--skip-broken-bitmaps alone",
        same_command(
            &twin,
            "",
            &[
                "convert",
                "--skip-broken-bitmaps",
                "-O",
                "qcow2",
                "t.qcow2",
                "out.qcow2",
            ],
        ),
    );
    failures.finish();
}
