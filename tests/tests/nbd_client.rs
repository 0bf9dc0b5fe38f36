//! `img` on NBD exports (`nbd://HOST:PORT/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`):
//! info, map, measure, check, compare, convert and dd of an export served by `qemu-nbd`
//! print what qemu-img prints on the same export; writes go through; a server that goes
//! away or sends garbage mid-job is a one-line error.

use integration_tests::nbd::{free_port, Addr, FakeBehaviour, FakeServer, Server};
use integration_tests::*;
use std::path::{Path, PathBuf};

/// A qcow2 with a backing file (data, zeroes, discards), a standalone qcow2 (with a
/// cluster whose tail is a hole in the file) and a raw file.
fn images(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let q = |args: &[&str]| assert!(qemu_img_in(dir, args).success(), "{args:?}");
    q(&["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
    qemu_io_cmds(
        &dir.join("base.qcow2"),
        "qcow2",
        &["write -P 0x55 4M 256k".into()],
    );
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    qemu_io_cmds(
        &dir.join("top.qcow2"),
        "qcow2",
        &[
            "write -P 1 0 64k".into(),
            "write -z 1M 128k".into(),
            "write -P 2 4M 4k".into(),
            "write -P 3 7M 64k".into(),
        ],
    );
    q(&["create", "-q", "-f", "qcow2", "alone.qcow2", "4M"]);
    qemu_io_cmds(
        &dir.join("alone.qcow2"),
        "qcow2",
        &[
            "write -P 9 64k 64k".into(),
            "write -z 1M 64k".into(),
            "write -P 4 2M 100k".into(),
            "write -P 5 3M 4k".into(),
        ],
    );
    // The tail of the cluster at 2M+64k (past the write) made a hole in the file: data
    // over a hole, the server's zero flag without its hole flag.
    punch_guest_range(&dir.join("alone.qcow2"), (2 << 20) + (100 << 10), 28 << 10);
    q(&["create", "-q", "-f", "raw", "disk.raw", "6M"]);
    qemu_io_cmds(
        &dir.join("disk.raw"),
        "raw",
        &[
            "write -P 7 0 4k".into(),
            "write -P 8 2M 1M".into(),
            "discard 2M 64k".into(),
        ],
    );
    (
        dir.join("top.qcow2"),
        dir.join("alone.qcow2"),
        dir.join("disk.raw"),
    )
}

/// Punch a hole in the file of qcow2 image `path` under guest bytes `at..at + len`,
/// which must lie in one data cluster.
fn punch_guest_range(path: &Path, at: u64, len: u64) {
    let map = qemu_img(&["map", "--output=json", s(path)]).ok();
    let extents: serde_json::Value = serde_json::from_str(&map.stdout).unwrap();
    let e = extents
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            let (start, n) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            start <= at && at + len <= start + n && e["data"] == true
        })
        .expect("a data extent under the range");
    let host = e["offset"].as_u64().unwrap() + at - e["start"].as_u64().unwrap();
    let st = std::process::Command::new("fallocate")
        .args([
            "-p",
            "-o",
            &host.to_string(),
            "-l",
            &len.to_string(),
            s(path),
        ])
        .status()
        .unwrap();
    assert!(st.success(), "fallocate failed");
}

/// Run `img ARGS` and `qemu-img ARGS`: exit code, stdout and stderr (qemu-img's name
/// mapped) must be equal.
fn same(args: &[&str]) -> Result<(), String> {
    let a = img(args);
    let b = qemu_img(args);
    // qemu-img 10.0.2 warns of a failed GLib assertion before some URI errors: its bug,
    // not part of its message.
    let b_err: String = qemu_to_img_prefix(&b.stderr)
        .lines()
        .filter(|l| !l.contains("GLib: g_hash_table_lookup: assertion"))
        .map(|l| format!("{l}\n"))
        .collect();
    ensure(
        a.code == b.code && a.stdout == b.stdout && a.stderr == b_err,
        || {
            format!(
                "{args:?}\nimg exit {:?}, qemu-img exit {:?}\n{}{}",
                a.code,
                b.code,
                text_diff("qemu-img", &b.stdout, "img", &a.stdout).unwrap_or_default(),
                text_diff("qemu-img stderr", &b_err, "img stderr", &a.stderr).unwrap_or_default()
            )
        },
    )
}

#[test]
fn img_reads_qemu_nbd_exports_as_qemu_img_does() {
    let d = tempdir();
    let (top, alone, raw) = images(d.path());
    let mut f = Failures::new();
    // (what is served, qemu-nbd's format, over TCP)
    let exports = [
        (&top, "qcow2", false),
        (&raw, "raw", true),
        // The export's bytes are a qcow2 image: probed as qcow2 over NBD.
        (&alone, "raw", false),
        // Zero-reading data (a cluster's tail): the zero flag without the hole flag.
        (&alone, "qcow2", false),
    ];
    for (i, (file, fmt, tcp)) in exports.into_iter().enumerate() {
        let addr = if tcp {
            Addr::Tcp(free_port())
        } else {
            Addr::Unix(d.path().join(format!("s{i}")))
        };
        let srv = Server::start(
            Path::new("qemu-nbd"),
            &["-t", "-r", "-e", "0", "-f", fmt, s(file)],
            addr,
            d.path(),
        );
        let uri = srv.addr.uri();
        let name = format!("{} as {fmt}", file.file_name().unwrap().to_string_lossy());
        for args in [
            vec!["info", &uri],
            vec!["info", "--output=json", &uri],
            vec!["info", "-f", "raw", &uri],
            vec!["map", &uri],
            vec!["map", "--output=json", &uri],
            vec!["map", "--output=json", "-f", "raw", &uri],
            vec!["measure", "-O", "qcow2", &uri],
            vec!["measure", "--output=json", "-O", "raw", &uri],
            vec!["check", &uri],
            vec!["compare", &uri, s(file)],
            vec!["compare", "-f", "raw", "-F", fmt, &uri, s(file)],
        ] {
            f.record(
                &format!("{name}: {}", args[..args.len() - 1].join(" ")),
                same(&args),
            );
        }
        f.record(
            &format!("{name}: convert and dd"),
            (|| {
                let out = d.path().join(format!("out{i}.qcow2"));
                img(&["convert", "-f", "raw", "-O", "qcow2", &uri, s(&out)]).check()?;
                qemu_img(&["compare", "-F", fmt, s(&out), s(file)]).check()?;
                let dd = d.path().join(format!("dd{i}.raw"));
                let of = format!("of={}", s(&dd));
                img(&[
                    "dd",
                    "-f",
                    "raw",
                    "-O",
                    "raw",
                    &format!("if={uri}"),
                    &of,
                    "bs=64k",
                ])
                .check()?;
                qemu_img(&["compare", "-f", "raw", "-F", fmt, s(&dd), s(file)]).check()?;
                Ok(())
            })(),
        );
    }
    f.record(
        "unknown export",
        (|| {
            let srv = Server::start(
                Path::new("qemu-nbd"),
                &["-t", "-r", "-x", "there", s(&raw)],
                Addr::Unix(d.path().join("named")),
                d.path(),
            );
            let Addr::Unix(p) = &srv.addr else {
                unreachable!()
            };
            same(&["info", &format!("nbd+unix:///there?socket={}", p.display())])?;
            same(&[
                "info",
                &format!("nbd+unix:///elsewhere?socket={}", p.display()),
            ])
        })(),
    );
    for bad in ["nbd+unix:///x", "nbd://h:99999/", "nbd://127.0.0.1:1/"] {
        f.record(bad, same(&["info", bad]));
    }
    f.finish();
}

#[test]
fn img_writes_through_an_export() {
    let d = tempdir();
    let (top, _, _) = images(d.path());
    qemu_img_in(d.path(), &["create", "-q", "-f", "raw", "target.raw", "8M"]).ok();
    let target = d.path().join("target.raw");
    let srv = Server::start(
        Path::new("qemu-nbd"),
        &["-t", "-f", "raw", s(&target)],
        Addr::Unix(d.path().join("w")),
        d.path(),
    );
    img(&["convert", "-n", "-O", "raw", s(&top), &srv.addr.uri()]).ok();
    drop(srv);
    let out = qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&target), s(&top)]);
    assert!(out.success(), "{}", out.report());
}

#[test]
fn a_server_that_goes_away_or_sends_garbage_is_a_one_line_error() {
    let d = tempdir();
    for (i, behaviour) in [FakeBehaviour::HangUpAfter(3), FakeBehaviour::Garbage]
        .into_iter()
        .enumerate()
    {
        let fake = FakeServer::start(d.path().join(format!("f{i}")), 64 << 20, behaviour);
        let out_path = d.path().join(format!("o{i}.raw"));
        let out = img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &fake.uri(),
            s(&out_path),
        ]);
        assert_eq!(out.code, Some(1), "{behaviour:?}: {}", out.report());
        assert_eq!(
            out.stderr.lines().count(),
            1,
            "{behaviour:?}: {}",
            out.report()
        );
        assert!(
            out.stderr.starts_with("img: error while reading"),
            "{}",
            out.report()
        );
        if let FakeBehaviour::HangUpAfter(_) = behaviour {
            assert!(
                out.stderr.contains("Connection to the NBD server was lost"),
                "{}",
                out.report()
            );
        }
    }
}

#[test]
fn an_overlay_on_an_nbd_backing_file_is_described_as_qemu_img_does() {
    let d = tempdir();
    let (_, _, raw) = images(d.path());
    let srv = Server::start(
        Path::new("qemu-nbd"),
        &["-t", "-r", "-e", "0", "-f", "raw", s(&raw)],
        Addr::Unix(d.path().join("b")),
        d.path(),
    );
    let uri = srv.addr.uri();
    let twin = twin::Twin::new(|_| {});
    let check = |pair: twin::Pair| {
        let errs = pair.differences(twin::Names::Prefix, twin::verbatim);
        if let Err(e) = pair.verdict(errs) {
            panic!("{e}");
        }
    };
    check(twin.run(&["create", "-f", "qcow2", "-b", &uri, "-F", "raw", "ov.qcow2"]));
    for dir in [twin.img_dir(), twin.qemu_dir()] {
        qemu_io_cmds(
            &dir.join("ov.qcow2"),
            "qcow2",
            &["write -P 6 2M 64k".into()],
        );
    }
    for args in [
        &["info", "ov.qcow2"][..],
        &["info", "--backing-chain", "ov.qcow2"],
        &["map", "--output=json", "ov.qcow2"],
        &["compare", "-F", "raw", "ov.qcow2", s(&raw)],
    ] {
        check(twin.run(args));
    }
}
