//! `img create` / `img info` side by side with `qemu-img` (skipped when qemu-img is not
//! installed): same stdout, same stderr once `qemu-img` reads `img`, same exit code.

use std::path::Path;
use std::process::Command;

const IMG: &str = env!("CARGO_BIN_EXE_img");

/// Whether qemu-img is installed. Outside CI a test without it is skipped loudly; in CI its
/// absence fails the test.
fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img").arg("--version").output().is_ok();
    assert!(
        ok || std::env::var_os("CI").is_none(),
        "qemu-img is missing in CI"
    );
    if !ok {
        eprintln!("SKIPPED: qemu-img not installed");
    }
    ok
}

struct Run {
    out: String,
    err: String,
    code: i32,
}

fn run(prog: &str, dir: &Path, args: &[&str]) -> Run {
    let o = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .env("TZ", "UTC")
        .output()
        .expect("run");
    Run {
        out: String::from_utf8_lossy(&o.stdout).replace("qemu-img", "img"),
        err: String::from_utf8_lossy(&o.stderr).replace("qemu-img", "img"),
        code: o.status.code().unwrap_or(-1),
    }
}

/// Run `args` with both tools, each in its own copy of the fixtures, and compare.
fn same(fixtures: &Path, args: &[&str]) {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for d in [a.path(), b.path()] {
        for e in std::fs::read_dir(fixtures).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
    }
    let q = run("qemu-img", a.path(), args);
    let i = run(IMG, b.path(), args);
    assert_eq!(i.out, q.out, "stdout of {args:?}");
    assert_eq!(i.err, q.err, "stderr of {args:?}");
    assert_eq!(i.code, q.code, "exit code of {args:?}");
}

fn fixtures() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let q = |args: &[&str]| {
        let s = Command::new("qemu-img")
            .args(args)
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(
            s.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&s.stderr)
        );
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
    for f in [
        "base.qcow2",
        "base.raw",
        "ov.qcow2",
        "v2.qcow2",
        "e.qcow2",
        "m.qcow2",
    ] {
        same(fx.path(), &["info", f]);
        same(fx.path(), &["info", "--output=json", f]);
        same(fx.path(), &["info", "--backing-chain", f]);
        same(
            fx.path(),
            &["info", "--backing-chain", "--output", "json", f],
        );
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
        same(fx.path(), args);
    }
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
    for line in cases {
        let args: Vec<&str> = line.split_whitespace().collect();
        same(fx.path(), &args);
    }
}
