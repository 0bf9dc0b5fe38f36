//! `--image-opts` (and convert's `--target-image-opts`) against qemu-img: images named by
//! QEMU option strings (`driver=qcow2,file.filename=...`, protocols on top, NBD servers
//! over a unix socket) or `json:{...}` names give every subcommand the same output, exit
//! code and images as qemu-img, errors word for word.

use integration_tests::nbd::{Addr, Server};
use integration_tests::twin::{verbatim, Images, Names, Twin};
use integration_tests::*;
use std::path::Path;

/// Twin directories with [`setup`]'s files (made once, so snapshot dates agree).
fn twin() -> Twin {
    let d = tempdir();
    setup(d.path());
    Twin::copied_from(d.path())
}

/// `bench`'s timing line without its time.
fn untimed(s: &str) -> String {
    s.lines()
        .map(|l| match l.strip_prefix("Run completed in ") {
            Some(_) => "Run completed in N seconds.",
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A qcow2 image with data and a snapshot, a raw one, and an overlay of the qcow2.
fn setup(d: &Path) {
    let run = |args: &[&str]| qemu_img_in(d, args).check().unwrap();
    run(&["create", "-q", "-f", "qcow2", "t.qcow2", "8M"]);
    qemu_io_cmds(
        &d.join("t.qcow2"),
        "qcow2",
        &["write -P 7 0 100k".into(), "write -P 9 3M 64k".into()],
    );
    run(&["snapshot", "-c", "s1", "t.qcow2"]);
    run(&["create", "-q", "-f", "raw", "r.raw", "8M"]);
    qemu_io_cmds(&d.join("r.raw"), "raw", &["write -P 7 0 100k".into()]);
    run(&[
        "create", "-q", "-f", "qcow2", "-b", "t.qcow2", "-F", "qcow2", "o.qcow2",
    ]);
    run(&["create", "-q", "-f", "qcow2", "dst.qcow2", "8M"]);
}

const T: &str = "driver=qcow2,file.filename=t.qcow2";
const O: &str = "driver=qcow2,file.driver=file,file.filename=o.qcow2";
const R: &str = "driver=raw,file.filename=r.raw";

/// Commands that only read, and option strings that must fail as in qemu-img.
fn reading_cases() -> Vec<Vec<&'static str>> {
    let mut v: Vec<Vec<&str>> = vec![
        vec!["info", "--image-opts", T],
        vec!["info", "--image-opts", "--output=json", T],
        vec!["info", "--image-opts", "--backing-chain", O],
        vec!["info", "--image-opts", "file.filename=t.qcow2"],
        vec!["info", "--image-opts", "driver=file,filename=t.qcow2"],
        vec![
            "info",
            "--image-opts",
            "--output=json",
            "driver=file,filename=t.qcow2",
        ],
        vec!["info", "--image-opts", "driver=raw,file.filename=t.qcow2"],
        vec![
            "info",
            "--image-opts",
            &"driver=qcow2,file.filename=t.qcow2,read-only=on",
        ],
        vec![
            "info",
            "--image-opts",
            "driver=qcow2,file.filename=t.qcow2,l2-cache-size=1M",
        ],
        vec!["info", "--image-opts", "-f", "qcow2", T],
        vec![
            "info",
            "--image-opts",
            "driver=qcow2,file.filename=t.qcow2,",
        ],
        vec!["info", "--image-opts", ""],
        vec![
            "info",
            "-U",
            "--image-opts",
            "driver=qcow2,file.filename=t.qcow2,force-share=off",
        ],
        vec![
            "info",
            "--image-opts",
            "driver=qcow2,file.filename=t.qcow2,force-share=on",
        ],
        vec![
            "check",
            "-r",
            "leaks",
            "--image-opts",
            "driver=qcow2,file.filename=t.qcow2,read-only=on",
        ],
        vec![
            "resize",
            "--image-opts",
            "driver=qcow2,file.filename=t.qcow2,read-only=on",
            "+1M",
        ],
        vec![
            "resize",
            "--image-opts",
            "driver=qcow2,file.filename=t.qcow2,force-share=on",
            "+1M",
        ],
        vec![
            "convert",
            "-n",
            "--target-image-opts",
            "t.qcow2",
            "driver=qcow2,file.filename=dst.qcow2,read-only=on",
        ],
        vec![
            "info",
            "-f",
            "qcow2",
            r#"json:{"driver":"file","filename":"t.qcow2"}"#,
        ],
        vec![
            "info",
            "-f",
            "raw",
            r#"json:{"driver":"qcow2","file":{"filename":"t.qcow2"},"l2-cache-size":65536}"#,
        ],
        vec!["check", "--image-opts", T],
        vec!["check", "--image-opts", "--output=json", O],
        vec!["map", "--image-opts", O],
        vec!["map", "--image-opts", "--output=json", O],
        vec!["measure", "--image-opts", "-O", "qcow2", T],
        vec!["measure", "--image-opts", "-O", "qcow2"],
        vec!["compare", "--image-opts", T, R],
        vec!["compare", "--image-opts", O, T],
        vec!["snapshot", "-l", "--image-opts", T],
        vec!["bench", "--image-opts", "-c", "10", T],
    ];
    // QEMU's json: file names, without --image-opts.
    for (cmd, name) in [
        (
            "info",
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"t.qcow2"}}"#,
        ),
        ("info", r#"json:{"file":{"filename":"t.qcow2"}}"#),
        (
            "map",
            r#"json:{"driver":"qcow2","file.filename":"o.qcow2"}"#,
        ),
        (
            "map",
            r#"json:{"driver":"qcow2","file":{"filename":"o.qcow2"},"backing":null}"#,
        ),
        (
            "check",
            r#"json:{"driver":"qcow2","file":{"filename":"o.qcow2"},"backing":null}"#,
        ),
        ("info", r#"json:{"driver":"qcow2","file":"t.qcow2"}"#),
        ("info", "json:[1]"),
    ] {
        v.push(vec![cmd, name]);
    }
    v.push(vec![
        "info",
        "-f",
        "raw",
        r#"json:{"driver":"qcow2","file":{"filename":"t.qcow2"}}"#,
    ]);
    for bad in [
        "t.qcow2",
        "filename=t.qcow2",
        "driver=qcow2",
        "driver=bogus,file.filename=t.qcow2",
        "driver=qcow2,file.filename=nosuch",
        "driver=qcow2,file.filename=t.qcow2,foo=1",
        "driver=qcow2,file.filename=t.qcow2,file.foo=1",
        "driver=qcow2,file.driver=file",
        "driver=qcow2,file.filename=t.qcow2,read-only=maybe",
        "driver=qcow2,file.filename=t.qcow2,file.locking=bogus",
        "driver=qcow2,file.filename=r.raw",
        "driver=qcow2,file.driver=nbd",
        "driver=raw,file.driver=bogus,file.filename=t.qcow2",
        "driver=raw,file.driver=host_device,file.filename=t.qcow2",
        // Without a driver, format options are judged by the probed format.
        "file.filename=t.qcow2,bogus=1",
        "file.filename=r.raw,bogus=1",
        "file.filename=nosuch,bogus=1",
        "file.filename=r.raw,l2-cache-size=1M",
    ] {
        v.push(vec!["info", "--image-opts", bad]);
    }
    v.push(vec![
        "info",
        "--image-opts",
        "file.filename=t.qcow2,l2-cache-size=1M",
    ]);
    v.push(vec![
        "info",
        r#"json:{"file.filename":"t.qcow2","bogus":1}"#,
    ]);
    v
}

#[test]
fn reading_commands_match_qemu() {
    let twin = twin();
    let mut failures = Failures::new();
    for args in reading_cases() {
        let pair = twin.run(&args);
        failures.record(&format!("{args:?}"), pair.compare(Names::Prefix, untimed));
    }
    failures.finish();
}

#[test]
fn writing_commands_match_qemu() {
    let mut failures = Failures::new();
    let dst = "driver=qcow2,file.filename=dst.qcow2";
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "c.qcow2",
            vec!["convert", "--image-opts", "-O", "qcow2", O, "c.qcow2"],
        ),
        (
            "c.qcow2",
            vec!["convert", "--image-opts", "-O", "qcow2", T, R, "c.qcow2"],
        ),
        (
            "c.qcow2",
            vec![
                "convert",
                "--image-opts",
                "-f",
                "qcow2",
                "-O",
                "qcow2",
                T,
                "c.qcow2",
            ],
        ),
        (
            "dst.qcow2",
            vec!["convert", "--target-image-opts", "-n", "t.qcow2", dst],
        ),
        (
            "dst.qcow2",
            vec![
                "convert",
                "--target-image-opts",
                "-n",
                "-O",
                "qcow2",
                "t.qcow2",
                dst,
            ],
        ),
        (
            "",
            vec![
                "convert",
                "--target-image-opts",
                "-O",
                "qcow2",
                "t.qcow2",
                dst,
            ],
        ),
        (
            "c.raw",
            vec![
                "convert",
                r#"json:{"driver":"qcow2","file":{"filename":"o.qcow2"},"backing":null}"#,
                "c.raw",
            ],
        ),
        ("t.qcow2", vec!["resize", "--image-opts", T, "+1M"]),
        ("t.qcow2", vec!["snapshot", "-d", "s1", "--image-opts", T]),
        ("t.qcow2", vec!["snapshot", "-a", "s1", "--image-opts", T]),
        (
            "t.qcow2",
            vec!["amend", "--image-opts", "-o", "lazy_refcounts=on", T],
        ),
        ("t.qcow2", vec!["bitmap", "--add", "--image-opts", T, "b0"]),
        ("o.qcow2", vec!["commit", "--image-opts", O]),
        ("o.qcow2", vec!["rebase", "-u", "-b", "", "--image-opts", O]),
        (
            "d.raw",
            vec![
                "dd",
                "--image-opts",
                &"if=driver=qcow2,file.filename=t.qcow2",
                "of=d.raw",
                "bs=64k",
                "count=4",
            ],
        ),
    ];
    for (file, args) in cases {
        let twin = twin();
        let pair = twin.run(&args);
        let mut errs = pair.differences(Names::Prefix, verbatim);
        if pair.both_succeeded() && !file.is_empty() {
            errs.extend(twin.compare_images(file, Images::default()).err());
        }
        failures.record(&format!("{args:?}"), pair.verdict(errs));
    }
    failures.finish();
}

/// An NBD server named by options (new and old spellings, on top or under a format).
#[test]
fn nbd_servers_named_by_options_match_qemu() {
    let twin = twin();
    let sock = twin.qemu_dir().join("n.sock");
    let image = twin.qemu_dir().join("t.qcow2");
    let _srv = Server::start(
        Path::new("qemu-nbd"),
        &["-t", "-r", "-e", "0", "-x", "ex", "-f", "qcow2", s(&image)],
        Addr::Unix(sock.clone()),
        twin.qemu_dir(),
    );
    // A socket and an export whose names a URI would have to escape.
    let odd = twin.qemu_dir().join("n&2%41;x.sock");
    let _odd_srv = Server::start(
        Path::new("qemu-nbd"),
        &[
            "-t",
            "-r",
            "-e",
            "0",
            "-x",
            "a b?c#d",
            "-f",
            "qcow2",
            s(&image),
        ],
        Addr::Unix(odd.clone()),
        twin.qemu_dir(),
    );
    let p = sock.display();
    let specs = [
        format!(
            "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={p},file.export=ex"
        ),
        format!("driver=nbd,server.type=unix,server.path={p},export=ex"),
        format!("file.driver=nbd,file.path={p},file.export=ex"),
        format!("driver=nbd,server.type=unix,server.path={p}.none"),
        format!("driver=nbd,server.type=bogus,server.path={p}"),
        "driver=nbd,server.type=inet,server.host=127.0.0.1".to_string(),
        format!(
            "driver=nbd,server.type=unix,server.path={},export=a b?c#d",
            odd.display()
        ),
    ];
    let mut failures = Failures::new();
    for spec in &specs {
        for cmd in [
            vec!["info", "--image-opts", spec.as_str()],
            vec!["map", "--output=json", "--image-opts", spec.as_str()],
            vec!["compare", "--image-opts", spec.as_str(), T],
        ] {
            let pair = twin.run(&cmd);
            failures.record(&format!("{cmd:?}"), pair.compare(Names::Prefix, verbatim));
        }
    }
    failures.finish();
}

/// Overlays whose backing file names are `json:{...}` objects, as qemu-img and libvirt
/// write them: both tools follow them alike (a file name relative to the working
/// directory, dotted keys, a chain below the named file or none with `"backing": null`,
/// an NBD server, the recorded format where the object names no driver) and fail alike where the recorded format
/// overrides the object's driver and on objects that name nothing openable.
#[test]
fn json_backing_names_are_followed_like_qemu() {
    let twin = twin();
    let sock = twin.qemu_dir().join("b.sock");
    let _srv = Server::start(
        Path::new("qemu-nbd"),
        &[
            "-t",
            "-r",
            "-e",
            "0",
            "-f",
            "raw",
            s(&twin.qemu_dir().join("r.raw")),
        ],
        Addr::Unix(sock.clone()),
        twin.qemu_dir(),
    );
    let nbd = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"nbd","server":{{"type":"unix","path":"{}"}}}}}}"#,
        sock.display()
    );
    let overlays: Vec<(&str, String, &str)> = vec![
        (
            "j1",
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"t.qcow2"}}"#.into(),
            "qcow2",
        ),
        (
            "j2",
            r#"json:{"file":{"driver":"file","filename":"r.raw"}}"#.into(),
            "raw",
        ),
        (
            "clash",
            r#"json:{"driver":"raw","file.filename":"r.raw"}"#.into(),
            "qcow2",
        ),
        (
            "j4",
            r#"json:{"driver":"qcow2","file":{"filename":"o.qcow2"}}"#.into(),
            "qcow2",
        ),
        ("j5", nbd, "raw"),
        (
            "j6",
            r#"json:{"driver":"qcow2","file":{"filename":"o.qcow2"},"backing":null}"#.into(),
            "qcow2",
        ),
        ("bad1", r#"json:{"driver":"qcow2"}"#.into(), "qcow2"),
        (
            "bad2",
            r#"json:{"driver":"raw","file":{"driver":"file","filename":"none.raw"}}"#.into(),
            "raw",
        ),
        (
            "bad3",
            r#"json:{"driver":"raw","file":{"driver":"file","filename":"r.raw"},"bogus":1}"#.into(),
            "raw",
        ),
    ];
    for dir in [twin.qemu_dir(), twin.img_dir()] {
        for (name, backing, fmt) in &overlays {
            // Written before the backing file is named: qemu-io opens relative names
            // from its own working directory.
            let file = format!("{name}.qcow2");
            qemu_img_in(dir, &["create", "-q", "-f", "qcow2", &file, "8M"])
                .check()
                .unwrap();
            qemu_io_cmds(&dir.join(&file), "qcow2", &["write -P 5 1M 64k".into()]);
            let rebase = ["rebase", "-u", "-b", backing, "-F", fmt, &file];
            qemu_img_in(dir, &rebase).check().unwrap();
        }
    }
    let mut failures = Failures::new();
    for (name, _, _) in &overlays {
        let file = format!("{name}.qcow2");
        let out = format!("{name}.raw");
        for cmd in [
            vec!["map", "--output=json", &file],
            vec!["info", "--backing-chain", &file],
            vec!["compare", &file, "t.qcow2"],
            vec!["convert", "-O", "raw", &file, &out],
        ] {
            let pair = twin.run(&cmd);
            failures.record(&format!("{cmd:?}"), pair.compare(Names::Prefix, verbatim));
        }
        if name.starts_with('j') {
            failures.record(
                &format!("{name}: the copies"),
                twin.compare_images(&out, Images::default()),
            );
        }
    }
    failures.finish();
}
