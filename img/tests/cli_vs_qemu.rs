//! `img create` / `img info` side by side with `qemu-img` (skipped when qemu-img is not
//! installed, outside CI): same stdout, same stderr once `qemu-img` reads `img`, same exit
//! code. Each command runs in its own pair of twin directories holding copies of the same
//! fixtures (`integration_tests::twin`).

use std::path::Path;

use integration_tests::twin::{verbatim, Names, Twin};
use integration_tests::{have_qemu_img, qemu_img_in, tempdir, Failures, TempDir, Tool};

/// Run `args` with both tools, each in its own copy of the fixtures, and compare.
fn same(fixtures: &Path, args: &[&str]) -> Result<(), String> {
    let twin = Twin::with_img(Tool::at(env!("CARGO_BIN_EXE_img")), |d| {
        for e in std::fs::read_dir(fixtures).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
    });
    twin.run(args).compare(Names::Everywhere, verbatim)
}

fn fixtures() -> TempDir {
    let d = tempdir();
    let q = |args: &[&str]| {
        qemu_img_in(d.path(), args).ok();
    };
    q(&["create", "-q", "-f", "qcow2", "base.qcow2", "1G"]);
    q(&["create", "-q", "-f", "raw", "base.raw", "10M"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "ov.qcow2",
    ]);
    q(&["snapshot", "-c", "snap1", "ov.qcow2"]);
    q(&["snapshot", "-c", "a longer snapshot name", "ov.qcow2"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "v2.qcow2",
        "1M",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,compression_type=zstd,lazy_refcounts=on,refcount_bits=64",
        "e.qcow2",
        "10M",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        "m.qcow2",
        "1M",
    ]);
    d
}

#[test]
fn info_matches_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let fx = fixtures();
    let mut f = Failures::new();
    let mut case = |args: &[&str]| f.record(&args.join(" "), same(fx.path(), args));
    for file in [
        "base.qcow2",
        "base.raw",
        "ov.qcow2",
        "v2.qcow2",
        "e.qcow2",
        "m.qcow2",
    ] {
        case(&["info", file]);
        case(&["info", "--output=json", file]);
        case(&["info", "--backing-chain", file]);
        case(&["info", "--backing-chain", "--output", "json", file]);
    }
    for args in [
        &["info", "nonexistent"][..],
        &["info", "-f", "qcow2", "base.raw"],
        &["info", "-f", "foo", "base.raw"],
        &["info", "--output=foo", "base.raw"],
        &["info"],
        &["info", "a", "b"],
        &["info", "-x", "base.raw"],
        &["info", "-f"],
    ] {
        case(args);
    }
    f.finish();
}

#[test]
fn create_messages_match_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let fx = fixtures();
    // One command line per entry, split at spaces (no argument here contains one).
    let cases = [
        "create -f qcow2 x.qcow2 99E",
        "create -f qcow2 x.qcow2 -1",
        "create -f qcow2 x.qcow2 1.5.5G",
        "create -f qcow2 x.qcow2 16E",
        "create -f qcow2 x.qcow2 abc",
        "create -f qcow2 x.qcow2 1.5G",
        "create -f raw x.raw 5",
        "create -f qcow2 -o compat=0.10,lazy_refcounts=on x.qcow2 1G",
        "create -f qcow2 -o refcount_bits=3 x.qcow2 1G",
        "create -f qcow2 -o extended_l2=on,cluster_size=4k x.qcow2 1G",
        "create -f qcow2 -o cluster_size=3000 x.qcow2 1G",
        "create -f qcow2 -o cluster_size=abc x.qcow2 1G",
        "create -f qcow2 -o compression_type=lz4 x.qcow2 1G",
        "create -f qcow2 -o size=2G x.qcow2 1G",
        "create -f qcow2 -o foo=bar x.qcow2 1G",
        "create -f qcow2 x.qcow2",
        "create -f qcow2 -b base.qcow2 x.qcow2",
        "create -f qcow2 -b base.qcow2 -F qcow2 x.qcow2",
        "create -f qcow2 -b base.qcow2 -F raw x.qcow2",
        "create -f qcow2 -b gone -F qcow2 x.qcow2",
        "create -f qcow2 -u -b gone -F qcow2 x.qcow2 1G",
        "create -f qcow2 -u -b gone x.qcow2 1G",
        "create -f raw -b base.qcow2 -F qcow2 x.raw",
        "create -f foo x.foo 1G",
        "create -f qcow2 -o help",
        "create -f qcow2 -o compat=v3, x.qcow2 1M",
        "create -f qcow2 x.qcow2 1M extra",
        "create -f qcow2 x.qcow2 3P",
        "create -x x 1M",
        "create",
    ];
    let mut f = Failures::new();
    for line in cases {
        let args: Vec<&str> = line.split_whitespace().collect();
        f.record(line, same(fx.path(), &args));
    }
    f.finish();
}
