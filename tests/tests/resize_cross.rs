//! `img resize` against `qemu-img resize`.
//!
//! Each case prepares the same image in twin directories (with qemu-img and qemu-io),
//! runs the same `resize` arguments through both tools, and requires the same exit code,
//! stdout and stderr; where qemu-img changed its image, img's must pass `qemu-img check`,
//! report the same `qemu-img info` (virtual size, format fields), map the same (data,
//! zero, depth; host offsets aside) and read the same (`qemu-img compare`).

use integration_tests::twin::{verbatim, Images, Names, Twin};
use integration_tests::*;
use std::path::Path;

/// The image a case starts from, by name: `NAME.qcow2` (or `.raw`) in the directory.
fn setup(kind: &str, d: &Path) {
    let qimg = |args: &[&str]| assert!(qemu_img_in(d, args).success(), "{args:?}");
    let io = |file: &str, cmds: &[&str]| {
        let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
        qemu_io_cmds(&d.join(file), "qcow2", &cmds);
    };
    let data = [
        "write -P 1 0 100k",
        "write -P 2 900k 200k",
        "write -z 1536k 64k",
    ];
    match kind {
        "plain" => {
            qimg(&["create", "-q", "-f", "qcow2", "plain.qcow2", "2M"]);
            io("plain.qcow2", &data);
        }
        "small" => {
            // 512-byte clusters: one L2 table covers 32 KiB, so a shrink drops many.
            qimg(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512",
                "small.qcow2",
                "2M",
            ]);
            io("small.qcow2", &data);
            io(
                "small.qcow2",
                &["write -P 3 1900k 100k", "write -c -P 4 1200k 32k"],
            );
        }
        "ext" => {
            qimg(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "extended_l2=on,cluster_size=64k",
                "ext.qcow2",
                "2M",
            ]);
            io("ext.qcow2", &data);
            io("ext.qcow2", &["write -P 5 1000k 3k"]);
        }
        "v2" => {
            qimg(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "v2.qcow2",
                "2M",
            ]);
            io("v2.qcow2", &["write -P 1 0 100k", "write -P 2 900k 200k"]);
        }
        "snap" => {
            qimg(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4k",
                "snap.qcow2",
                "2M",
            ]);
            io("snap.qcow2", &data);
            qimg(&["snapshot", "-c", "s1", "snap.qcow2"]);
            io("snap.qcow2", &["write -P 9 1800k 200k", "write -P 8 0 4k"]);
        }
        "v2snap" => {
            qimg(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "v2snap.qcow2",
                "2M",
            ]);
            qimg(&["snapshot", "-c", "s1", "v2snap.qcow2"]);
        }
        "odd" => {
            // A size that is not a whole number of clusters.
            qimg(&["create", "-q", "-f", "qcow2", "odd.qcow2", "1000448"]);
            io("odd.qcow2", &["write -P 6 900k 77k"]);
        }
        "chain" | "chainv2" => {
            // The overlay is shorter than its backing file, whose data must not show
            // through the area a resize adds.
            qimg(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
            io("base.qcow2", &["write -P 7 0 4M"]);
            let compat = if kind == "chain" {
                "compat=1.1"
            } else {
                "compat=0.10"
            };
            let file = format!("{kind}.qcow2");
            qimg(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                compat,
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                &file,
                "1000448",
            ]);
            io(&file, &["write -P 1 64k 64k"]);
        }
        "chainshort" => {
            // The backing file ends inside the overlay's last cluster: its head still
            // shows through there.
            qimg(&["create", "-q", "-f", "qcow2", "base.qcow2", "990208"]);
            io("base.qcow2", &["write -P 7 0 990208"]);
            qimg(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "chainshort.qcow2",
                "1000448",
            ]);
        }
        "raw" => {
            qimg(&["create", "-q", "-f", "raw", "raw.raw", "1M"]);
            qemu_io_cmds(&d.join("raw.raw"), "raw", &["write -P 3 0 1M".to_string()]);
        }
        other => panic!("unknown setup {other}"),
    }
}

/// The image file a case works on: the first argument naming one of the setups.
fn image_of(args: &[&str]) -> Option<String> {
    args.iter()
        .find(|a| a.ends_with(".qcow2") || a.ends_with(".raw"))
        .map(|a| a.to_string())
}

fn run_case(kind: &str, line: &str) -> Result<(), String> {
    // Made once and copied, so that both tools start from the same bytes (snapshot dates).
    let src = tempdir();
    setup(kind, src.path());
    let twin = Twin::copied_from(src.path());
    let args: Vec<&str> = std::iter::once("resize")
        .chain(line.split_whitespace())
        .collect();
    let pair = twin.run(&args);
    let mut errs = pair.differences(Names::Everywhere, verbatim);
    if let Some(file) = image_of(&args) {
        if twin.qemu_dir().join(&file).exists() {
            if let Err(e) = twin.compare_images(&file, Images::default()) {
                errs.push(e);
            }
            let preallocated = line.contains("--preallocation=metadata");
            errs.extend(
                twin.compare_maps(&file, |m| guest_map(m, preallocated))
                    .err(),
            );
            if file.ends_with(".qcow2") {
                // img's own check agrees that the image is clean.
                let out = img_in(twin.img_dir(), &["check", "-U", &file]);
                if !out.success() {
                    errs.push(format!("img check of img's image:\n{}", out.report()));
                }
            }
        }
    }
    pair.verdict(errs)
}

/// `qemu-img map` as the guest sees it. For preallocated clusters (data without a
/// guest write) `zero` only says whether the host file has a hole there, which is file
/// layout (the contents are compared separately): drop it, merging what that splits.
fn guest_map(map: serde_json::Value, preallocated: bool) -> serde_json::Value {
    if !preallocated {
        return map;
    }
    let mut out: Vec<serde_json::Value> = Vec::new();
    for mut e in map.as_array().cloned().unwrap_or_default() {
        if e["data"] == true {
            e.as_object_mut().unwrap().remove("zero");
        }
        if let Some(last) = out.last_mut() {
            let keys = ["depth", "present", "zero", "data", "compressed"];
            if keys.iter().all(|k| last.get(k) == e.get(k)) {
                let len = last["length"].as_u64().unwrap() + e["length"].as_u64().unwrap();
                last["length"] = len.into();
                continue;
            }
        }
        out.push(e);
    }
    out.into()
}

fn run_all(cases: &[(&str, &str)]) {
    let mut f = Failures::new();
    for (kind, line) in cases {
        f.record(&format!("[{kind}] resize {line}"), run_case(kind, line));
    }
    f.finish();
}

#[test]
fn resize_grows_like_qemu() {
    run_all(&[
        ("plain", "plain.qcow2 +1M"),
        ("plain", "plain.qcow2 3M"),
        ("plain", "plain.qcow2 +0"),
        ("plain", "-q plain.qcow2 5G"),
        ("plain", "-f qcow2 plain.qcow2 2049M"),
        ("plain", "plain.qcow2 +1M -q"),
        ("small", "small.qcow2 +3M"),
        ("small", "small.qcow2 64M"),
        ("ext", "ext.qcow2 +1M"),
        ("v2", "v2.qcow2 +1M"),
        ("snap", "snap.qcow2 +3M"),
        ("odd", "odd.qcow2 2M"),
        ("odd", "odd.qcow2 +512"),
        ("chain", "chain.qcow2 3M"),
        ("chain", "chain.qcow2 8M"),
        ("chainv2", "chainv2.qcow2 3M"),
        ("raw", "-f raw raw.raw +1M"),
        ("raw", "-f raw raw.raw 3000000"),
        ("raw", "-f raw raw.raw +511"),
    ]);
}

#[test]
fn resize_shrinks_like_qemu() {
    run_all(&[
        ("plain", "--shrink plain.qcow2 1M"),
        ("plain", "--shrink plain.qcow2 -- -1M"),
        ("plain", "plain.qcow2 --shrink -1M"),
        ("plain", "--shrink plain.qcow2 950k"),
        ("plain", "--shrink plain.qcow2 512"),
        ("small", "--shrink small.qcow2 1M"),
        ("small", "--shrink small.qcow2 1001k"),
        ("small", "--shrink small.qcow2 40k"),
        ("ext", "--shrink ext.qcow2 999k"),
        ("v2", "--shrink v2.qcow2 512k"),
        ("snap", "--shrink snap.qcow2 1M"),
        ("snap", "--shrink snap.qcow2 4k"),
        ("odd", "--shrink odd.qcow2 500k"),
        ("chain", "--shrink chain.qcow2 100k"),
        ("raw", "-f raw --shrink raw.raw 300000"),
        ("raw", "-f raw --shrink raw.raw -- -1k"),
    ]);
}

#[test]
fn resize_preallocates_like_qemu() {
    run_all(&[
        ("plain", "--preallocation=metadata plain.qcow2 +3M"),
        ("plain", "--preallocation=falloc plain.qcow2 +3M"),
        ("plain", "--preallocation=full plain.qcow2 +3M"),
        ("plain", "--preallocation=off plain.qcow2 +3M"),
        ("small", "--preallocation=metadata small.qcow2 +100k"),
        ("ext", "--preallocation=metadata ext.qcow2 +1M"),
        ("odd", "--preallocation=metadata odd.qcow2 +1M"),
        ("odd", "--preallocation=full odd.qcow2 +1M"),
        ("chain", "--preallocation=metadata chain.qcow2 3M"),
        ("chain", "--preallocation=full chain.qcow2 3M"),
        ("chainshort", "--preallocation=metadata chainshort.qcow2 3M"),
        ("chainshort", "chainshort.qcow2 3M"),
        ("raw", "-f raw --preallocation=falloc raw.raw +1M"),
        ("raw", "-f raw --preallocation=full raw.raw +1M"),
        ("raw", "-f raw --preallocation=metadata raw.raw +1M"),
    ]);
}

#[test]
fn resize_refuses_like_qemu() {
    run_all(&[
        ("plain", "plain.qcow2 1M"),
        ("plain", "plain.qcow2 -- -1M"),
        ("plain", "plain.qcow2 -1M"),
        ("plain", "plain.qcow2 -- -4M"),
        ("plain", "plain.qcow2 -4M"),
        ("plain", "--shrink plain.qcow2 0"),
        ("plain", "plain.qcow2 3000000"),
        ("plain", "plain.qcow2 +511"),
        ("plain", "plain.qcow2 10P"),
        ("plain", "plain.qcow2 +1E"),
        ("plain", "plain.qcow2 +8E"),
        ("plain", "plain.qcow2 16E"),
        ("plain", "plain.qcow2 abc"),
        ("plain", "plain.qcow2 +"),
        ("plain", "plain.qcow2 +-1M"),
        ("plain", "plain.qcow2"),
        ("plain", ""),
        ("plain", "-q plain.qcow2"),
        ("plain", "plain.qcow2 1M 2M"),
        ("plain", "missing.qcow2 1M"),
        ("plain", "-x plain.qcow2 1M"),
        ("plain", "-U plain.qcow2 1M"),
        ("plain", "-f raw2 plain.qcow2 1M"),
        ("plain", "--preallocation=bogus plain.qcow2 +1M"),
        ("plain", "--preallocation=falloc plain.qcow2 +0"),
        ("plain", "--preallocation=full --shrink plain.qcow2 1M"),
        ("v2snap", "v2snap.qcow2 +1M"),
        ("v2snap", "--shrink v2snap.qcow2 1M"),
        ("chainv2", "chainv2.qcow2 3M"),
    ]);
}

/// Where qemu-img differs: after a shrink to a size inside a cluster, a grow makes the
/// rest of that cluster read as zeroes again, instead of what it held before the shrink.
#[test]
fn grow_after_unaligned_shrink_reads_zeroes() {
    let dir = tempdir();
    let f = dir.path().join("a.qcow2");
    let file = s(&f);
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", file, "1M"]).success());
    qemu_io_cmds(&f, "qcow2", &["write -P 0xaa 0 1M".to_string()]);
    for args in [
        &["resize", "-q", "--shrink", file, "1000448"][..],
        &["resize", "-q", file, "1M"][..],
    ] {
        let out = img(args);
        assert!(out.success(), "{}", out.report());
    }
    qemu_check(&f).unwrap();
    let out = qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "read -P 0xaa 0 1000448",
        "-c",
        "read -P 0 1000448 48128",
        file,
    ]);
    assert!(
        out.success() && !out.stdout.contains("verification failed"),
        "{}",
        out.report()
    );
}
