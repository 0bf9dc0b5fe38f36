//! `img measure` against `qemu-img measure`: `--size` and source images (raw sparse, qcow2
//! with data, zeroes, compressed clusters, backing chains, persistent bitmaps) for raw and
//! qcow2 targets across qcow2's options, human and JSON; usage and option errors word for
//! word. `measure` writes nothing, so both tools run in one directory (`Pair::run`).

use integration_tests::twin::{verbatim, Names, Pair};
use integration_tests::*;
use std::path::Path;

fn qimg(dir: &Path, args: &str) {
    let a: Vec<&str> = args.split_whitespace().collect();
    assert!(qemu_img_in(dir, &a).success(), "qemu-img {args}");
}

fn qio(dir: &Path, file: &str, cmds: &[&str]) {
    let mut a = vec![];
    for c in cmds {
        a.extend(["-c", c]);
    }
    a.push(file);
    assert!(qemu_io_in(dir, &a), "qemu-io {cmds:?} {file}");
}

fn qemu_io_in(dir: &Path, args: &[&str]) -> bool {
    Tool::qemu_io().run(Some(dir), args).success()
}

/// Sources of every kind `measure` reads.
fn make_sources(dir: &Path) -> Vec<&'static str> {
    qimg(dir, "create -q -f qcow2 empty.qcow2 3M");
    qimg(dir, "create -q -f raw empty.raw 1M");
    qimg(dir, "create -q -f qcow2 d.qcow2 10M");
    qio(
        dir,
        "d.qcow2",
        &["write -P 1 0 1M", "write -z 2M 1M", "write -P 2 5000k 10k"],
    );
    qimg(dir, "convert -c -O qcow2 d.qcow2 c.qcow2");
    qimg(dir, "create -q -f qcow2 -b d.qcow2 -F qcow2 top.qcow2");
    qio(dir, "top.qcow2", &["write -P 3 8M 64k", "write -z 0 64k"]);
    qimg(
        dir,
        "create -q -f qcow2 -o compat=0.10,cluster_size=4k v2.qcow2 7M",
    );
    qio(
        dir,
        "v2.qcow2",
        &["write -P 4 1000 3000", "write -P 5 6M 5k"],
    );
    std::fs::write(dir.join("odd.raw"), vec![7u8; 1000]).unwrap();
    let sparse = std::fs::File::create(dir.join("sparse.raw")).unwrap();
    sparse.set_len(5 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    sparse.write_all_at(&[9u8; 12288], 400 << 10).unwrap();
    sparse.write_all_at(&[9u8; 4096], 3 << 20).unwrap();
    qimg(dir, "create -q -f qcow2 bm.qcow2 20M");
    qio(dir, "bm.qcow2", &["write -P 1 0 1M"]);
    qimg(dir, "bitmap --add bm.qcow2 b1");
    qimg(dir, "bitmap --add -g 512 bm.qcow2 a-longer-bitmap-name");
    // Metadata preallocation: qemu counts data clusters over holes as zeroes.
    qimg(
        dir,
        "create -q -f qcow2 -o preallocation=metadata pm.qcow2 8M",
    );
    qio(dir, "pm.qcow2", &["write -P 1 0 100k", "write -P 2 5M 64k"]);
    qimg(dir, "create -q -f qcow2 -o extended_l2=on x.qcow2 6M");
    qio(
        dir,
        "x.qcow2",
        &[
            "write -P 1 4k 8k",
            "write -z 64k 32k",
            "write -P 2 1M 3k",
            "write -P 3 5000k 100k",
        ],
    );
    qimg(dir, "create -q -f qcow2 -o cluster_size=4k u.qcow2 1000000");
    qio(
        dir,
        "u.qcow2",
        &["write -P 1 999000 1000", "write -P 2 0 512"],
    );
    vec![
        "empty.qcow2",
        "empty.raw",
        "d.qcow2",
        "c.qcow2",
        "top.qcow2",
        "v2.qcow2",
        "odd.raw",
        "sparse.raw",
        "bm.qcow2",
        "pm.qcow2",
        "x.qcow2",
        "u.qcow2",
    ]
}

/// Target options: raw's and qcow2's.
const QCOW2_OPTS: &[&str] = &[
    "",
    "cluster_size=512",
    "cluster_size=4k",
    "cluster_size=2M",
    "extended_l2=on",
    "extended_l2=on,cluster_size=16k",
    "refcount_bits=1",
    "refcount_bits=64,cluster_size=4k",
    "refcount_bits=8,compat=1.1",
    "compat=0.10",
    "preallocation=metadata",
    "preallocation=falloc",
    "preallocation=full",
    "backing_file=x",
    "lazy_refcounts=on,compression_type=zstd",
];

fn compare(dir: &Path, args: &[&str]) -> Result<(), String> {
    let mut full = vec!["measure"];
    full.extend_from_slice(args);
    Pair::run(dir, dir, &Tool::img(), &full).compare(Names::Prefix, verbatim)
}

fn with_opts<'a>(o: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![];
    if !o.is_empty() {
        v.extend(["-o", o]);
    }
    v.extend_from_slice(rest);
    v
}

#[test]
fn sources_match_qemu() {
    let dir = tempdir();
    let mut f = Failures::new();
    for src in make_sources(dir.path()) {
        for out in ["human", "json"] {
            let o = format!("--output={out}");
            f.record(
                &format!("raw {src} {out}"),
                compare(dir.path(), &["-O", "raw", &o, src]),
            );
            for opts in QCOW2_OPTS {
                let args = with_opts(opts, &["-O", "qcow2", &o, src]);
                f.record(&format!("{args:?}"), compare(dir.path(), &args));
            }
        }
    }
    f.record("-f", compare(dir.path(), &["-f", "qcow2", "-U", "d.qcow2"]));
    f.finish();
}

#[test]
fn sizes_match_qemu() {
    let dir = tempdir();
    let mut f = Failures::new();
    for size in ["0", "1", "511", "1G", "1T", "100T", "9223372036854775807"] {
        for opts in QCOW2_OPTS {
            for out in ["--output=human", "--output=json"] {
                let args = with_opts(opts, &["-O", "qcow2", out, "--size", size]);
                f.record(&format!("{args:?}"), compare(dir.path(), &args));
            }
        }
        f.record(size, compare(dir.path(), &["--size", size]));
    }
    f.finish();
}

#[test]
fn errors_match_qemu() {
    let dir = tempdir();
    make_sources(dir.path());
    qimg(dir.path(), "snapshot -c s1 empty.qcow2");
    // A snapshot holding less than the active image: measured on its own.
    qimg(dir.path(), "create -q -f qcow2 snap.qcow2 8M");
    let snap = dir.path().join("snap.qcow2");
    qemu_io_cmds(&snap, "qcow2", &["write -P 1 0 1M".to_string()]);
    qimg(dir.path(), "snapshot -c s1 snap.qcow2");
    qemu_io_cmds(&snap, "qcow2", &["write -P 2 2M 4M".to_string()]);
    let mut f = Failures::new();
    let cases: &[&[&str]] = &[
        &["-l", "s1", "snap.qcow2"],
        &["-l", "1", "-O", "qcow2", "snap.qcow2"],
        &["-l", "snapshot.name=s1", "-O", "qcow2", "snap.qcow2"],
        &[
            "-l",
            "snapshot.id=1,snapshot.name=s1",
            "--output=json",
            "-O",
            "qcow2",
            "snap.qcow2",
        ],
        &["-l", "snapshot.id=1,snapshot.name=s2", "snap.qcow2"],
        &["-O", "qcow2", "snap.qcow2"],
        &[],
        &["--size", "-1"],
        &["--size", "1x"],
        &["--size", ""],
        &["--size", "1G", "d.qcow2"],
        &["-f", "raw"],
        &["-l", "x"],
        &["a", "b"],
        &["nofile"],
        &["-s", "1"],
        &["-x"],
        &["-o"],
        &["--output=x", "--size", "1"],
        &["-O", "foo", "--size", "1G"],
        &["-O", "vmdk", "--size", "1G"],
        &["-O", "qcow2", "-o", "foo=1", "--size", "1G"],
        &["-O", "qcow2", "-o", "help", "--size", "1G"],
        &["-O", "qcow2", "-o", ",x", "--size", "1G"],
        &["-O", "qcow2", "-o", "cluster_size=1000", "--size", "1G"],
        &["-O", "qcow2", "-o", "compat=v3", "--size", "1G"],
        &[
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=8",
            "--size",
            "1G",
        ],
        &["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1G"],
        &["-O", "qcow2", "-o", "preallocation=bogus", "--size", "1G"],
        &[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-o",
            "extended_l2=on",
            "--size",
            "1",
        ],
        &["-O", "qcow2", "-o", "cluster_size=512", "--size", "100T"],
        &["-O", "qcow2", "-o", "size=5G"],
        &["-O", "qcow2", "-o", "size=5G", "--size", "1G"],
        &["-O", "raw", "-o", "cluster_size=4k", "--size", "1"],
        &["-O", "raw", "-o", "preallocation=bogus", "--size", "1"],
        &["-l", "nosuch", "d.qcow2"],
        &["-l", "snapshot.id=9", "empty.qcow2"],
        &["-l", "snapshot.foo=1", "empty.qcow2"],
        &["-l", "x", "empty.raw"],
        &["--size", "1", "--size", "2"],
    ];
    for args in cases {
        let mut full = vec!["measure"];
        full.extend_from_slice(args);
        let r = Pair::run(dir.path(), dir.path(), &Tool::img(), &full)
            .compare(Names::Everywhere, verbatim);
        f.record(&format!("{args:?}"), r);
    }
    f.finish();
}

/// A source whose L2 table holds an unaligned data offset: the walker finds fault with it,
/// so measure falls back to block status, which refuses it, and img fails as qemu-img does
/// (exit 1, one line) instead of measuring what the damaged table seems to say.
#[test]
fn damaged_sources_fail_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    qimg(d, "create -q -f qcow2 bad.qcow2 4M");
    qio(d, "bad.qcow2", &["write -P 1 0 64k", "write -P 2 1M 64k"]);
    let p = d.join("bad.qcow2");
    let mut b = std::fs::read(&p).unwrap();
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l2 = (be(&b, be(&b, 40) as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    let e = be(&b, l2 + 16 * 8);
    b[l2 + 16 * 8..l2 + 17 * 8].copy_from_slice(&(e + 512).to_be_bytes());
    std::fs::write(&p, b).unwrap();
    let q = qemu_img_in(d, &["measure", "-O", "qcow2", "bad.qcow2"]);
    let i = Tool::img().run(Some(d), &["measure", "-O", "qcow2", "bad.qcow2"]);
    assert_eq!(q.code, Some(1), "{}", q.report());
    assert_eq!(i.code, q.code, "{}", i.report());
    assert!(i.stdout.is_empty(), "{}", i.report());
    assert_eq!(i.stderr.lines().count(), 1, "{}", i.report());
    assert!(i.stderr.contains("unaligned"), "{}", i.report());
}
