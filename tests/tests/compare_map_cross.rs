//! `img compare` and `img map` against `qemu-img compare` / `qemu-img map` on images made
//! by qemu-img and qemu-io: data, zeroes, discards, compressed clusters, extended L2,
//! backing chains, raw sparse files. Both tools run in one directory on the same files;
//! stdout, stderr (program name mapped) and exit code must be identical.

use integration_tests::twin::{verbatim, Names, Pair};
use integration_tests::*;
use std::path::Path;

fn qimg(dir: &Path, args: &str) {
    let a: Vec<&str> = args.split_whitespace().collect();
    let out = qemu_img_in(dir, &a);
    assert!(out.success(), "qemu-img {args}: {}", out.report());
}

fn qio(dir: &Path, file: &str, fmt: &str, cmds: &[&str]) {
    qemu_io_cmds(
        &dir.join(file),
        fmt,
        &cmds.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
    );
}

fn same(dir: &Path, args: &[&str]) -> Result<(), String> {
    Pair::run(dir, dir, &Tool::img(), args).compare(Names::Everywhere, verbatim)
}

/// Images of every kind, by (name, format).
fn make_images(dir: &Path) -> Vec<(&'static str, &'static str)> {
    qimg(dir, "create -q -f qcow2 empty.qcow2 4M");
    qimg(dir, "create -q -f qcow2 data.qcow2 4M");
    qio(
        dir,
        "data.qcow2",
        "qcow2",
        &[
            "write -P 1 1000 10",
            "write -P 2 1M 300k",
            "write -P 3 3M 64k",
        ],
    );
    qimg(dir, "create -q -f qcow2 data2.qcow2 4M");
    qio(
        dir,
        "data2.qcow2",
        "qcow2",
        &[
            "write -P 1 1000 9",
            "write -P 2 1M 300k",
            "write -P 3 3M 64k",
        ],
    );
    // The same guest data as data.qcow2, with clusters in another host order.
    qimg(dir, "create -q -f qcow2 reorder.qcow2 4M");
    qio(
        dir,
        "reorder.qcow2",
        "qcow2",
        &[
            "write -P 3 3M 64k",
            "write -P 2 1M 300k",
            "write -P 1 1000 10",
        ],
    );
    qimg(dir, "create -q -f qcow2 zeroes.qcow2 4M");
    qio(
        dir,
        "zeroes.qcow2",
        "qcow2",
        &[
            "write -P 5 0 1M",
            "write -z 64k 128k",
            "write -z -u 512k 64k",
            "discard 768k 64k",
            "write -z 2M 64k",
        ],
    );
    qimg(dir, "create -q -f qcow2 comp.qcow2 4M");
    qio(
        dir,
        "comp.qcow2",
        "qcow2",
        &[
            "write -c -P 7 0 64k",
            "write -c -P 8 64k 64k",
            "write -P 9 128k 64k",
        ],
    );
    qimg(dir, "create -q -f qcow2 comp-only.qcow2 4M");
    qio(dir, "comp-only.qcow2", "qcow2", &["write -c -P 7 0 128k"]);
    qimg(
        dir,
        "create -q -f qcow2 -o extended_l2=on,cluster_size=64k ext.qcow2 4M",
    );
    qio(
        dir,
        "ext.qcow2",
        "qcow2",
        &[
            "write -P 1 0 4k",
            "write -P 2 12k 2k",
            "write -z 64k 64k",
            "write -P 3 200k 8k",
            "write -z 204k 2k",
            "discard 0 2k",
        ],
    );
    qimg(dir, "create -q -f qcow2 -o cluster_size=4k small.qcow2 6M");
    qio(
        dir,
        "small.qcow2",
        "qcow2",
        &["write -P 1 0 8k", "write -P 2 2044k 8k", "write -z 5M 4k"],
    );
    qimg(dir, "create -q -f qcow2 big.qcow2 8M");
    qio(dir, "big.qcow2", "qcow2", &["write -P 1 1000 10"]);
    qimg(dir, "create -q -f qcow2 big-tail.qcow2 8M");
    qio(
        dir,
        "big-tail.qcow2",
        "qcow2",
        &["write -P 1 1000 10", "write -P 4 6M 10"],
    );
    // A three-level chain; the middle layer is shorter than the top.
    qimg(dir, "create -q -f qcow2 base.qcow2 2M");
    qio(
        dir,
        "base.qcow2",
        "qcow2",
        &["write -P 1 0 1M", "write -c -P 2 1M 64k"],
    );
    qimg(
        dir,
        "create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 3M",
    );
    qio(
        dir,
        "mid.qcow2",
        "qcow2",
        &[
            "write -P 3 128k 64k",
            "write -z 256k 64k",
            "discard 512k 64k",
        ],
    );
    qimg(dir, "create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 4M");
    qio(
        dir,
        "top.qcow2",
        "qcow2",
        &["write -P 4 64k 64k", "write -P 5 3M 4k", "discard 128k 64k"],
    );
    // Flattened contents of the chain, as raw: compare must call it identical.
    qimg(dir, "convert -O raw top.qcow2 top.raw");
    qimg(
        dir,
        "create -q -f qcow2 -b base.qcow2 -F qcow2 ov2.qcow2 2M",
    );
    // Raw sparse files: a hole, data, an unaligned size.
    qimg(dir, "create -q -f raw sparse.raw 4M");
    qio(
        dir,
        "sparse.raw",
        "raw",
        &[
            "write -P 1 1000 10",
            "write -P 2 1M 300k",
            "write -P 3 3M 64k",
        ],
    );
    std::fs::write(dir.join("odd.raw"), vec![0u8; 1000]).unwrap();
    // Metadata preallocation (qemu then reads data over holes as zeroes), and over it.
    qimg(
        dir,
        "create -q -f qcow2 -o preallocation=metadata pm.qcow2 4M",
    );
    qio(
        dir,
        "pm.qcow2",
        "qcow2",
        &["write -P 1 0 100k", "write -P 2 2M 64k"],
    );
    qimg(dir, "create -q -f qcow2 -b pm.qcow2 -F qcow2 pm-top.qcow2");
    qio(dir, "pm-top.qcow2", "qcow2", &["write -P 3 64k 64k"]);
    vec![
        ("empty.qcow2", "qcow2"),
        ("data.qcow2", "qcow2"),
        ("data2.qcow2", "qcow2"),
        ("reorder.qcow2", "qcow2"),
        ("zeroes.qcow2", "qcow2"),
        ("comp.qcow2", "qcow2"),
        ("comp-only.qcow2", "qcow2"),
        ("ext.qcow2", "qcow2"),
        ("small.qcow2", "qcow2"),
        ("big.qcow2", "qcow2"),
        ("big-tail.qcow2", "qcow2"),
        ("base.qcow2", "qcow2"),
        ("mid.qcow2", "qcow2"),
        ("top.qcow2", "qcow2"),
        ("top.raw", "raw"),
        ("ov2.qcow2", "qcow2"),
        ("sparse.raw", "raw"),
        ("odd.raw", "raw"),
        ("pm.qcow2", "qcow2"),
        ("pm-top.qcow2", "qcow2"),
    ]
}

#[test]
fn compare_like_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    let images = make_images(d);
    let mut f = Failures::new();
    for (a, _) in &images {
        for (b, _) in &images {
            for flags in [&[][..], &["-s"][..], &["-q"][..]] {
                let mut args = vec!["compare"];
                args.extend_from_slice(flags);
                args.extend([*a, *b]);
                f.record(&args.join(" "), same(d, &args));
            }
        }
    }
    for args in [
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "top.qcow2",
            "top.raw",
        ][..],
        &["compare", "-f", "raw", "data.qcow2", "data.qcow2"],
        &["compare", "-p", "data.qcow2", "data.qcow2"],
        &["compare", "-p", "data.qcow2", "data2.qcow2"],
        &["compare", "-U", "-T", "none", "data.qcow2", "reorder.qcow2"],
        &["compare", "-T", "bogus", "data.qcow2", "data.qcow2"],
        &["compare", "-f", "foo", "data.qcow2", "data.qcow2"],
        &["compare", "data.qcow2", "missing.qcow2"],
        &["compare", "data.qcow2"],
        &["compare", "a", "b", "c"],
        &["compare", "-x", "a", "b"],
    ] {
        f.record(&args.join(" "), same(d, args));
    }
    f.finish();
}

#[test]
fn map_like_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    let images = make_images(d);
    let mut f = Failures::new();
    for (name, fmt) in &images {
        let variants: Vec<Vec<&str>> = vec![
            vec![name],
            vec!["--output=json", name],
            vec!["-f", fmt, "--output=json", name],
            vec![
                "--output=json",
                "--start-offset=100000",
                "--max-length=300000",
                name,
            ],
            vec!["--start-offset=1M", name],
            vec![
                "--output=json",
                "--start-offset",
                "64k",
                "--max-length",
                "1",
                name,
            ],
            vec!["--output=json", "--start-offset=16M", name],
            vec!["-U", "--output=json", "--max-length=0", name],
        ];
        for v in variants {
            let mut args = vec!["map"];
            args.extend(v);
            f.record(&args.join(" "), same(d, &args));
        }
    }
    // A chain named through a subdirectory: the file names in the table follow it.
    let sub = d.join("sub");
    std::fs::create_dir(&sub).unwrap();
    for n in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        std::fs::copy(d.join(n), sub.join(n)).unwrap();
    }
    for args in [
        &["map", "sub/top.qcow2"][..],
        &["map", "-f", "raw", "sub/top.qcow2"],
        &["map", "--output=json", "sub/top.qcow2"],
        &["map", "-f", "raw", "data.qcow2"],
        &["map", "--start-offset=-1", "data.qcow2"],
        &["map", "--start-offset=abc", "data.qcow2"],
        &["map", "--max-length=-5", "data.qcow2"],
        &["map", "--output=xml", "data.qcow2"],
        &["map"],
        &["map", "a", "b"],
        &["map", "missing.qcow2"],
    ] {
        f.record(&args.join(" "), same(d, args));
    }
    f.finish();
}

/// Random qemu-io write/zero/discard sequences on chains; `map --output=json` and
/// `compare` of img and qemu-img must agree on every image.
#[test]
fn random_images_map_like_qemu_img() {
    let seed = seed(0x6d61_7063_6d70);
    let mut rng = Rng::new(seed);
    let mut f = Failures::new();
    for round in 0..6 {
        let dir = tempdir();
        let d = dir.path();
        let cluster = *rng.pick(&[512u64, 4096, 65536]);
        let ext = cluster >= 16384 && rng.chance(1, 2);
        let size = rng.range(1, 8) << 20;
        let opts = format!(
            "cluster_size={cluster}{}",
            if ext { ",extended_l2=on" } else { "" }
        );
        let layers = rng.range(1, 4);
        let mut names = Vec::new();
        for l in 0..layers {
            let name = format!("l{l}.qcow2");
            let backing = match names.last() {
                Some(b) => format!("-b {b} -F qcow2 "),
                None => String::new(),
            };
            let lsize = size + rng.below(3) * (1 << 20);
            qimg(
                d,
                &format!("create -q -f qcow2 -o {opts} {backing}{name} {lsize}"),
            );
            let grain = if rng.chance(1, 2) { 512 } else { cluster };
            let mut cmds = Vec::new();
            // qemu-io writes compressed only to clusters this layer has not touched.
            let mut touched = std::collections::HashSet::new();
            for _ in 0..rng.range(1, 40) {
                let off = rng.below(lsize / grain) * grain;
                let len = (rng.range(1, 4 * cluster / grain + 1) * grain).min(lsize - off);
                let fresh = off.is_multiple_of(cluster)
                    && len >= cluster
                    && !touched.contains(&(off / cluster));
                let cmd = match rng.below(6) {
                    0 => format!("write -z {off} {len}"),
                    1 => format!("write -z -u {off} {len}"),
                    2 => format!("discard {off} {len}"),
                    3 if fresh => format!("write -c -P {} {off} {cluster}", rng.below(255) + 1),
                    _ => format!("write -P {} {off} {len}", rng.below(255) + 1),
                };
                touched.extend(off / cluster..(off + len).div_ceil(cluster));
                cmds.push(cmd);
            }
            let strs: Vec<&str> = cmds.iter().map(String::as_str).collect();
            qio(d, &name, "qcow2", &strs);
            names.push(name);
        }
        let top = names.last().unwrap().clone();
        qimg(d, &format!("convert -O qcow2 {top} flat.qcow2"));
        for args in [
            vec!["map", "--output=json", top.as_str()],
            vec![
                "map",
                "--output=json",
                "--start-offset=4096",
                "--max-length=1M",
                top.as_str(),
            ],
            vec!["map", top.as_str()],
            vec!["compare", top.as_str(), "flat.qcow2"],
            vec!["compare", "-s", top.as_str(), "flat.qcow2"],
            vec!["compare", names[0].as_str(), top.as_str()],
        ] {
            f.record(
                &format!(
                    "seed {seed:#x} round {round} ({opts}, {layers} layers): {}",
                    args.join(" ")
                ),
                same(d, &args),
            );
        }
    }
    f.finish();
}
