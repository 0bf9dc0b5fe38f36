//! `img dd` against `qemu-img dd`.
//!
//! Each case runs the same arguments through both tools in twin directories holding the
//! same inputs (made by qemu-img and qemu-io): exit code, stdout and stderr (`qemu-img`
//! mapped to `img`) must be identical, and when qemu-img wrote an output image, img's
//! must match it (`Twin::compare_images`: `qemu-img check`, `info --output=json`, the raw
//! file length, and `qemu-img compare` of the contents). qemu-img dd writes every block
//! while img skips what reads as zeroes, so a qcow2 output's file length may differ.

use integration_tests::twin::{verbatim, Images, Names, Twin};
use integration_tests::*;
use std::path::Path;

/// Inputs: a sparse qcow2 with data, zero clusters and a backing file; a raw image whose
/// length is not a whole number of sectors; an empty one.
fn env() -> Twin {
    Twin::new(|d: &Path| {
        let qimg = |args: &[&str]| assert!(qemu_img_in(d, args).success(), "{args:?}");
        qimg(&["create", "-q", "-f", "qcow2", "base.qcow2", "2M"]);
        qemu_io_cmds(
            &d.join("base.qcow2"),
            "qcow2",
            &["write -P 3 1M 64k".to_string()],
        );
        qimg(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "in.qcow2",
        ]);
        qemu_io_cmds(
            &d.join("in.qcow2"),
            "qcow2",
            &[
                "write -P 5 64k 64k".to_string(),
                "write -P 6 700k 3k".to_string(),
                "write -z 1M 4k".to_string(),
                "write -P 7 2047k 1k".to_string(),
            ],
        );
        let mut odd = Vec::with_capacity(100_000);
        let mut rng = Rng::new(0x0dd);
        while odd.len() < 100_000 {
            odd.extend_from_slice(&rng.next_u64().to_le_bytes());
        }
        odd.truncate(100_000);
        std::fs::write(d.join("odd.raw"), &odd).unwrap();
        std::fs::write(d.join("empty.raw"), b"").unwrap();
    })
}

/// The output file a case names (`of=...`), if any.
fn output_of(args: &[&str]) -> Option<String> {
    args.iter()
        .find_map(|a| a.strip_prefix("of="))
        .filter(|o| !o.is_empty())
        .map(str::to_string)
}

fn run_case(twin: &Twin, line: &str) -> Result<(), String> {
    let args: Vec<&str> = std::iter::once("dd")
        .chain(line.split_whitespace())
        .collect();
    let out = output_of(&args);
    if let Some(o) = &out {
        twin.remove(o);
    }
    let pair = twin.run(&args);
    let mut errs = pair.differences(Names::Everywhere, verbatim);
    if let Some(o) = out {
        if pair.qemu.success() && twin.qemu_dir().join(&o).exists() {
            if let Err(e) = twin.compare_images(&o, Images::default()) {
                errs.push(e);
            }
        }
    }
    pair.verdict(errs)
}

fn run_all(lines: &[&str]) {
    let twin = env();
    let mut f = Failures::new();
    for line in lines {
        f.record(&format!("dd {line}"), run_case(&twin, line));
    }
    f.finish();
}

#[test]
fn dd_copies_like_qemu() {
    run_all(&[
        "if=in.qcow2 of=o.raw",
        "-O raw if=in.qcow2 of=o.raw",
        "-O qcow2 if=in.qcow2 of=o.qcow2",
        "-f qcow2 -O qcow2 if=in.qcow2 of=o.qcow2",
        "-f raw if=in.qcow2 of=o.raw",
        "-U if=in.qcow2 of=o.raw",
        "bs=1k count=3 skip=2 if=in.qcow2 of=o.raw",
        "bs=64k skip=1 count=12 -O qcow2 if=in.qcow2 of=o.qcow2",
        "bs=1M skip=1 if=in.qcow2 of=o.raw",
        "bs=4k skip=100 count=200 if=in.qcow2 of=o.raw",
        "count=0 if=in.qcow2 of=o.raw",
        "count=1 if=in.qcow2 of=o.raw",
        "bs=3 if=odd.raw of=o.raw",
        "bs=3 skip=7 count=20000 if=odd.raw of=o.raw",
        "bs=1.5k skip=3 if=odd.raw of=o.raw",
        "bs=100000 if=odd.raw -O qcow2 of=o.qcow2",
        "bs=1M count=99 if=odd.raw of=o.raw",
        "if=empty.raw of=o.raw",
        "if=in.qcow2 if=odd.raw of=x.raw of=o.raw",
        "if=base.qcow2 of=sub/o.raw",
    ]);
}

#[test]
fn dd_errors_match_qemu() {
    run_all(&[
        "",
        "if=in.qcow2",
        "of=o.raw",
        "foo=bar if=in.qcow2 of=o.raw",
        "x if=in.qcow2 of=o.raw",
        "=x if=in.qcow2 of=o.raw",
        "if=in.qcow2 of=o.raw bogus",
        "bs=0 if=in.qcow2 of=o.raw",
        "bs=-1 if=in.qcow2 of=o.raw",
        "bs=2G if=in.qcow2 of=o.raw",
        "bs=abc if=in.qcow2 of=o.raw",
        "bs=1k count=abc if=in.qcow2 of=o.raw",
        "count=-1 if=in.qcow2 of=o.raw",
        "skip=x if=in.qcow2 of=o.raw",
        "skip=-5 if=in.qcow2 of=o.raw",
        "bs=1M skip=5 if=in.qcow2 of=o.raw",
        "skip=9223372036854775807 if=in.qcow2 of=o.raw",
        "if=nonexistent of=o.raw",
        "if= of=o.raw",
        "if=in.qcow2 of=",
        "if=in.qcow2 of=nodir/o.raw",
        "-f bogus if=in.qcow2 of=o.raw",
        "-f qcow2 if=odd.raw of=o.raw",
        "-O bogus if=in.qcow2 of=o.raw",
        "-q if=in.qcow2 of=o.raw",
        "--bogus if=in.qcow2 of=o.raw",
        "-f",
    ]);
}
