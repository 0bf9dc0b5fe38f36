//! Image locks against QEMU's, both ways (QEMU's byte-range lock layout: DESIGN.md,
//! `common::lock`).
//!
//! - An image `qemu-io` or `qemu-nbd` holds read-write: every `img` subcommand that writes
//!   it fails exactly as `qemu-img`'s does (exit code and message, "Is another process using
//!   the image?"), a read without `-U` fails as qemu-img's does, and with `-U` reads work
//!   and read the same as qemu-img's.
//! - An image `img serve` holds: `qemu-io` and `qemu-img` are refused exactly as they are
//!   when `qemu-nbd` holds it (read-write and read-only exports), and their `-U` reads work.
//!
//! Every run is `run_once`: the helpers' retry on a lock conflict would hide what is tested.

use integration_tests::nbd::{serve_img, unix_at, Server};
use integration_tests::*;
use std::path::Path;

/// A 4 MiB qcow2 image with data at 0 and 1 MiB, over a backing file (so that commit and
/// rebase have something to do).
fn image(dir: &Path) {
    qemu_img_in(dir, &["create", "-q", "-f", "qcow2", "b.qcow2", "4M"]).ok();
    qemu_img_in(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2",
        ],
    )
    .ok();
    qemu_io_cmds(
        &dir.join("b.qcow2"),
        "qcow2",
        &["write -P 0x11 0 64k".into()],
    );
    qemu_io_cmds(
        &dir.join("t.qcow2"),
        "qcow2",
        &["write -P 0x22 1M 64k".into()],
    );
}

/// `img` and `qemu-img` on `args` in `dir`: the same exit code, stdout and stderr (qemu-img's
/// prefix mapped to ours), or what differs.
fn same_as_qemu_img(dir: &Path, args: &[&str]) -> Result<Output, String> {
    let ours = Tool::img().run_once(Some(dir), args);
    let theirs = Tool::qemu_img().run_once(Some(dir), args);
    let theirs_err = qemu_to_img_prefix(&theirs.stderr);
    if ours.code != theirs.code || ours.stdout != theirs.stdout || ours.stderr != theirs_err {
        return Err(format!(
            "img and qemu-img differ:\n{}\n{}",
            ours.report(),
            theirs.report()
        ));
    }
    Ok(ours)
}

/// Subcommands that open `t.qcow2` for writing (each leaves it as it was when it fails).
const WRITERS: &[&[&str]] = &[
    &["resize", "t.qcow2", "+1M"],
    &["snapshot", "-c", "s1", "t.qcow2"],
    &["amend", "-o", "lazy_refcounts=on", "t.qcow2"],
    &["commit", "t.qcow2"],
    &["rebase", "-u", "-b", "", "t.qcow2"],
    &["check", "-r", "all", "t.qcow2"],
    &["bitmap", "--add", "t.qcow2", "b0"],
    &["convert", "-n", "-O", "qcow2", "b.qcow2", "t.qcow2"],
];

/// Reads without `-U`: refused while another process writes the image.
const READERS: &[&[&str]] = &[
    &["info", "t.qcow2"],
    &["check", "t.qcow2"],
    &["map", "t.qcow2"],
    &["compare", "t.qcow2", "b.qcow2"],
];

/// The same reads with `-U`: they work.
const SHARED_READERS: &[&[&str]] = &[
    &["info", "-U", "t.qcow2"],
    &["check", "-U", "t.qcow2"],
    &["map", "-U", "--output=json", "t.qcow2"],
    &["compare", "-U", "t.qcow2", "t.qcow2"],
    &["convert", "-U", "-O", "raw", "t.qcow2", "out.raw"],
];

/// Every subcommand of [`WRITERS`], [`READERS`] and [`SHARED_READERS`] on `t.qcow2` while
/// `hold` holds it: as qemu-img.
fn img_as_qemu_img_while_held(holder: &str, hold: impl Fn(&Path) -> Box<dyn std::any::Any>) {
    let d = tempdir();
    image(d.path());
    let before = qemu_read_all(&d.path().join("t.qcow2"), Some("qcow2"), d.path());
    let mut f = Failures::new();
    {
        let _h = hold(d.path());
        for args in WRITERS.iter().chain(READERS) {
            let r = same_as_qemu_img(d.path(), args).and_then(|o| {
                ensure(
                    matches!(o.code, Some(1) | Some(2))
                        && o.stderr.contains("Is another process using the image"),
                    || format!("not refused for the lock:\n{}", o.report()),
                )
            });
            f.record(&format!("{holder} holds it: img {}", args.join(" ")), r);
        }
        for args in SHARED_READERS {
            let r = same_as_qemu_img(d.path(), args)
                .and_then(|o| ensure(o.success(), || format!("-U read failed:\n{}", o.report())));
            f.record(&format!("{holder} holds it: img {}", args.join(" ")), r);
        }
    }
    let after = qemu_read_all(&d.path().join("t.qcow2"), Some("qcow2"), d.path());
    f.record(
        &format!("{holder}: the refused writers changed nothing"),
        first_mismatch(&before, &after).map_or(Ok(()), Err),
    );
    f.finish();
}

#[test]
fn qemu_io_holding_an_image_refuses_img_as_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    img_as_qemu_img_while_held("qemu-io", |dir| {
        Box::new(qemu_io_hold(&dir.join("t.qcow2")))
    });
}

/// `qemu-nbd -t -f qcow2 EXTRA DIR/t.qcow2`, serving until dropped.
fn qemu_nbd(dir: &Path, extra: &[&str]) -> Server {
    let image = dir.join("t.qcow2");
    let mut args = vec!["-t", "-f", "qcow2"];
    args.extend_from_slice(extra);
    args.push(s(&image));
    Server::start(Path::new("qemu-nbd"), &args, unix_at(dir, "nbd.sock"), dir)
}

#[test]
fn qemu_nbd_holding_an_image_refuses_img_as_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    img_as_qemu_img_while_held("qemu-nbd", |dir| Box::new(qemu_nbd(dir, &[])));
}

/// What `qemu-io` and `qemu-img` make of `t.qcow2` while it is held: a write, a read
/// without and with `-U`, `qemu-img check` and `info -U`, as (exit code, stderr with the
/// directory blanked) each.
fn qemu_tools_view(dir: &Path) -> Vec<(String, Option<i32>, String)> {
    let t = s(&dir.join("t.qcow2")).to_string();
    let cases: Vec<(&str, Tool, Vec<&str>)> = vec![
        (
            "qemu-io write",
            Tool::qemu_io(),
            vec!["-c", "write -P 0x33 0 4k", &t],
        ),
        (
            "qemu-io read",
            Tool::qemu_io(),
            vec!["-r", "-c", "read 0 4k", &t],
        ),
        (
            "qemu-io -U read",
            Tool::qemu_io(),
            vec!["-U", "-r", "-c", "read -P 0x22 1M 64k", &t],
        ),
        ("qemu-img check", Tool::qemu_img(), vec!["check", &t]),
        ("qemu-img info -U", Tool::qemu_img(), vec!["info", "-U", &t]),
        (
            "qemu-img resize",
            Tool::qemu_img(),
            vec!["resize", &t, "+1M"],
        ),
    ];
    let dirname = s(dir).to_string();
    cases
        .into_iter()
        .map(|(name, tool, args)| {
            let o = tool.run_once(None, &args);
            let err = format!(
                "{}{}",
                o.stderr,
                if o.code == Some(0) { "" } else { &o.stdout }
            )
            .replace(&dirname, "DIR");
            (name.to_string(), o.code, err)
        })
        .collect()
}

/// `img serve` (read-write, and `-r`) holds an image as `qemu-nbd` does: QEMU's tools see
/// the same locks, word for word; `-U` readers work.
#[test]
fn img_serve_holding_an_image_refuses_qemu_as_qemu_nbd() {
    if !have_qemu_img() {
        return;
    }
    let mut f = Failures::new();
    for ro in [false, true] {
        let extra: &[&str] = if ro { &["-r"] } else { &[] };
        let theirs = {
            let d = tempdir();
            image(d.path());
            let _srv = qemu_nbd(d.path(), extra);
            qemu_tools_view(d.path())
        };
        let ours = {
            let d = tempdir();
            image(d.path());
            let mut args = vec!["-t", "-f", "qcow2"];
            args.extend_from_slice(extra);
            let t = d.path().join("t.qcow2");
            args.push(s(&t));
            let _srv = serve_img(&args, unix_at(d.path(), "img.sock"), d.path());
            qemu_tools_view(d.path())
        };
        let mode = if ro { "-r" } else { "read-write" };
        for (t, o) in theirs.iter().zip(&ours) {
            f.record(
                &format!("{mode} export: {}", t.0),
                ensure(t == o, || {
                    format!("under qemu-nbd: {t:?}\nunder img serve: {o:?}")
                }),
            );
        }
        // The point of the comparison: the holder refused the writer, not both allowed it.
        let write = &ours[0];
        f.record(
            &format!("{mode} export: the write is refused"),
            ensure(
                write.1 != Some(0) && write.2.contains("Failed to get \"write\" lock"),
                || format!("{write:?}"),
            ),
        );
        let shared = &ours[2];
        f.record(
            &format!("{mode} export: the -U read works"),
            ensure(shared.1 == Some(0), || format!("{shared:?}")),
        );
    }
    f.finish();
}
