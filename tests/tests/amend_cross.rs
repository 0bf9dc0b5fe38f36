//! `img amend` against `qemu-img amend`.
//!
//! Each case starts both tools from the same image (made once with qemu-img and qemu-io,
//! then copied), runs the same `amend` arguments, and requires the same exit code,
//! stdout and stderr; then img's image must pass `qemu-img check` and `img check`, and
//! match qemu-img's in `qemu-img info` (compat, refcount bits, lazy refcounts, size,
//! snapshots), `qemu-img map` (host offsets aside), guest contents, and the contents of
//! every internal snapshot.

use integration_tests::twin::{verbatim, Images, Names, Twin};
use integration_tests::*;
use std::path::Path;

/// The image a case starts from: `KIND.qcow2` (or `.raw`) in `d`.
fn setup(kind: &str, d: &Path) {
    let qimg = |args: &[&str]| assert!(qemu_img_in(d, args).success(), "{args:?}");
    let io = |file: &str, cmds: &[&str]| {
        let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
        qemu_io_cmds(&d.join(file), "qcow2", &cmds);
    };
    let file = format!("{kind}.qcow2");
    let create = |opts: &str| qimg(&["create", "-q", "-f", "qcow2", "-o", opts, &file, "4M"]);
    // Data, a zero cluster over data (kept allocated), a plain zero cluster, a discard
    // and a compressed cluster.
    let mixed = [
        "write -P 1 0 200k",
        "write -z 64k 64k",
        "write -z 1M 64k",
        "write -P 2 2M 128k",
        "discard 2M 64k",
        "write -c -P 3 3M 64k",
    ];
    match kind {
        "v3" => {
            create("compat=1.1");
            io(&file, &mixed);
        }
        "small" => {
            create("compat=1.1,cluster_size=512");
            io(&file, &mixed);
        }
        "v2" => {
            create("compat=0.10");
            io(&file, &["write -P 1 0 200k", "write -P 2 2M 128k"]);
        }
        "v2snap" => {
            create("compat=0.10");
            io(&file, &["write -P 1 0 200k"]);
            qimg(&["snapshot", "-c", "s1", &file]);
            io(&file, &["write -P 4 0 64k"]);
        }
        "snap" => {
            create("compat=1.1,cluster_size=4k");
            io(&file, &mixed);
            qimg(&["snapshot", "-c", "s1", &file]);
            io(&file, &["write -z 0 64k", "write -P 5 3M 4k"]);
            qimg(&["snapshot", "-c", "s2", &file]);
        }
        "resized" => {
            // A snapshot of another size prevents a downgrade.
            create("compat=1.1");
            qimg(&["snapshot", "-c", "s1", &file]);
            qimg(&["resize", "-q", &file, "8M"]);
        }
        "lazy" => {
            create("compat=1.1,lazy_refcounts=on");
            io(&file, &mixed);
        }
        "dirty" => {
            // Killed with lazy refcounts: the dirty bit is set, refcounts are stale.
            create("compat=1.1,lazy_refcounts=on");
            let out = qemu_io(&[
                "-f",
                "qcow2",
                "-c",
                "write -P 1 0 300k",
                "-c",
                "abort",
                s(&d.join(&file)),
            ]);
            assert!(!out.success(), "qemu-io abort: {}", out.report());
        }
        "r1" => {
            create("compat=1.1,refcount_bits=1");
            io(&file, &mixed);
        }
        "r64" => {
            create("compat=1.1,refcount_bits=64");
            io(&file, &mixed);
        }
        "ext" => {
            create("compat=1.1,extended_l2=on");
            io(&file, &["write -P 1 0 200k"]);
        }
        "zstd" => create("compat=1.1,compression_type=zstd"),
        "zstdc" => {
            create("compat=1.1,compression_type=zstd");
            io(&file, &["write -c -P 3 0 64k"]);
        }
        "chain" => {
            // Zero clusters over a backing file: a downgrade must give them storage.
            qimg(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
            io("base.qcow2", &["write -P 7 0 4M"]);
            qimg(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                &file,
            ]);
            io(
                &file,
                &["write -z 0 128k", "write -P 1 1M 64k", "write -z 1M 64k"],
            );
            qimg(&["snapshot", "-c", "s1", &file]);
        }
        "raw" => {
            qimg(&["create", "-q", "-f", "raw", "raw.raw", "1M"]);
        }
        other => panic!("unknown setup {other}"),
    }
}

/// The internal snapshots an image holds, by name.
fn snapshot_names(dir: &Path, file: &str) -> Vec<String> {
    let v = qemu_info_json(&dir.join(file), &["-U"]);
    v["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Snapshot `name` of `file` as raw bytes (`qemu-img convert -l`).
fn snapshot_bytes(dir: &Path, file: &str, name: &str) -> Result<Vec<u8>, String> {
    let out = qemu_img_in(
        dir,
        &["convert", "-U", "-l", name, "-O", "raw", file, "snap.raw"],
    );
    if !out.success() {
        return Err(out.report());
    }
    let b = std::fs::read(dir.join("snap.raw")).unwrap();
    std::fs::remove_file(dir.join("snap.raw")).unwrap();
    Ok(b)
}

fn compare_results(twin: &Twin, file: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if let Err(e) = twin.compare_images(file, Images::default()) {
        errs.push(e);
    }
    if file.ends_with(".raw") {
        return errs;
    }
    errs.extend(twin.compare_maps(file, |m| m).err());
    let out = img_in(twin.img_dir(), &["check", "-U", file]);
    if !out.success() {
        errs.push(format!("img check of img's image:\n{}", out.report()));
    }
    for sn in snapshot_names(twin.qemu_dir(), file) {
        match (
            snapshot_bytes(twin.qemu_dir(), file, &sn),
            snapshot_bytes(twin.img_dir(), file, &sn),
        ) {
            (Ok(q), Ok(i)) if q == i => {}
            (Ok(q), Ok(i)) => errs.push(format!(
                "snapshot {sn} differs: {}",
                first_mismatch(&q, &i).unwrap_or_default()
            )),
            (Err(e), _) | (_, Err(e)) => errs.push(format!("snapshot {sn}: {e}")),
        }
    }
    errs
}

/// `text` without the lines of QEMU's repair of a dirty image on open.
fn without_repair_lines(text: &str) -> String {
    text.lines()
        .filter(|l| {
            !(l.starts_with("ERROR cluster")
                || l.starts_with("Repairing cluster")
                || *l == "Rebuilding refcount structure")
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

fn run_case(kind: &str, line: &str) -> Result<(), String> {
    let src = tempdir();
    setup(kind, src.path());
    let twin = Twin::copied_from(src.path());
    let args: Vec<&str> = std::iter::once("amend")
        .chain(line.split_whitespace())
        .collect();
    let pair = twin.run(&args);
    let mut errs = pair.differences(Names::Everywhere, verbatim);
    if kind == "dirty" {
        // A known difference: QEMU repairs a dirty image when it opens it read-write and
        // prints its check's lines; img repairs it without a word. The rest must match.
        errs.retain(|e| !e.starts_with("stderr differs"));
        let (q, i) = (
            without_repair_lines(&pair.qemu.stderr.replace("qemu-img", "img")),
            without_repair_lines(&pair.img.stderr),
        );
        if let Some(d) = text_diff("qemu-img stderr", &q, "img stderr", &i) {
            errs.push(format!(
                "stderr differs (open-time repair lines aside):\n{d}"
            ));
        }
    }
    let file = if kind == "raw" {
        "raw.raw".to_string()
    } else {
        format!("{kind}.qcow2")
    };
    errs.extend(compare_results(&twin, &file));
    pair.verdict(errs)
}

fn run_all(cases: &[(&str, &str)]) {
    let mut f = Failures::new();
    for (kind, line) in cases {
        f.record(&format!("[{kind}] amend {line}"), run_case(kind, line));
    }
    f.finish();
}

#[test]
fn amend_changes_compat_like_qemu() {
    run_all(&[
        ("v3", "-o compat=0.10 v3.qcow2"),
        ("v3", "-o compat=v2 v3.qcow2"),
        ("v3", "-o compat=1.1 v3.qcow2"),
        ("small", "-o compat=0.10 small.qcow2"),
        ("v2", "-o compat=1.1 v2.qcow2"),
        ("v2", "-o compat=v3 v2.qcow2"),
        ("v2snap", "-o compat=1.1 v2snap.qcow2"),
        ("snap", "-o compat=0.10 snap.qcow2"),
        ("lazy", "-o compat=0.10 lazy.qcow2"),
        ("zstd", "-o compat=0.10 zstd.qcow2"),
        ("chain", "-o compat=0.10 chain.qcow2"),
        ("v3", "-p -o compat=0.10 v3.qcow2"),
        ("v3", "-q -o compat=0.10 v3.qcow2"),
        (
            "v2",
            "-o compat=1.1,lazy_refcounts=on,refcount_bits=8 v2.qcow2",
        ),
        ("v3", "-o compat=0.10 -o compat=1.1 v3.qcow2"),
    ]);
}

#[test]
fn amend_changes_refcounts_and_size_like_qemu() {
    run_all(&[
        ("v3", "-o lazy_refcounts=on v3.qcow2"),
        ("v3", "-o lazy_refcounts v3.qcow2"),
        ("lazy", "-o lazy_refcounts=off lazy.qcow2"),
        ("lazy", "-o nolazy_refcounts lazy.qcow2"),
        ("dirty", "-o lazy_refcounts=off dirty.qcow2"),
        ("dirty", "-o compat=0.10 dirty.qcow2"),
        ("dirty", "-o refcount_bits=8 dirty.qcow2"),
        ("v3", "-o refcount_bits=1 v3.qcow2"),
        ("v3", "-o refcount_bits=2 v3.qcow2"),
        ("v3", "-o refcount_bits=8 v3.qcow2"),
        ("v3", "-o refcount_bits=32 v3.qcow2"),
        ("v3", "-o refcount_bits=64 v3.qcow2"),
        ("small", "-o refcount_bits=64 small.qcow2"),
        ("r1", "-o refcount_bits=16 r1.qcow2"),
        ("r64", "-o refcount_bits=4 r64.qcow2"),
        ("snap", "-o refcount_bits=8 snap.qcow2"),
        ("snap", "-o refcount_bits=1 snap.qcow2"),
        ("v3", "-o size=8M v3.qcow2"),
        ("v3", "-o size=1M v3.qcow2"),
        ("v3", "-o size=0 v3.qcow2"),
        ("v3", "-o size=3000000 v3.qcow2"),
        ("snap", "-o size=8M snap.qcow2"),
        ("v3", "-o backing_file= v3.qcow2"),
        (
            "chain",
            "-o backing_file=base.qcow2,backing_fmt=qcow2 chain.qcow2",
        ),
    ]);
}

#[test]
fn amend_refuses_like_qemu() {
    run_all(&[
        ("v3", "v3.qcow2"),
        ("v3", "-o compat=0.9 v3.qcow2"),
        ("v3", "-o cluster_size=4096 v3.qcow2"),
        ("v3", "-o extended_l2=on v3.qcow2"),
        ("v3", "-o preallocation=full v3.qcow2"),
        ("v3", "-o encryption=on v3.qcow2"),
        ("v3", "-o encrypt.key-secret=x v3.qcow2"),
        ("v3", "-o encrypt.new-secret=x v3.qcow2"),
        ("v3", "-o nocow=on v3.qcow2"),
        ("v3", "-o bogus=1 v3.qcow2"),
        ("v3", "-o data_file=x v3.qcow2"),
        ("v3", "-o data_file_raw=on v3.qcow2"),
        ("v3", "-o refcount_bits=3 v3.qcow2"),
        ("v3", "-o refcount_bits=128 v3.qcow2"),
        ("v3", "-o refcount_bits=abc v3.qcow2"),
        ("v3", "-o lazy_refcounts=maybe v3.qcow2"),
        ("v3", "-o size=abc v3.qcow2"),
        ("v3", "-o backing_file=foo v3.qcow2"),
        ("v3", "-o backing_fmt=raw v3.qcow2"),
        ("v3", "-o compat=0.10,backing_file=foo v3.qcow2"),
        ("v2", "-o compat=1.1,backing_file=foo v2.qcow2"),
        ("v3", "-o ,compat=1.1 v3.qcow2"),
        ("v3", "-o compat=1.1, v3.qcow2"),
        ("v3", "-o compat=1.1 v3.qcow2 extra"),
        ("v3", "-o help"),
        ("v3", "-o help v3.qcow2"),
        ("v3", "-f qcow2 -o help missing.qcow2"),
        ("v3", "-o help,compat=0.10 v3.qcow2"),
        ("v3", "-o compat=1.1 missing.qcow2"),
        ("v3", "-U -o compat=1.1 v3.qcow2"),
        ("v2", "-o lazy_refcounts=on v2.qcow2"),
        ("v2", "-o refcount_bits=8 v2.qcow2"),
        ("v2snap", "-o size=8M v2snap.qcow2"),
        ("r1", "-o compat=0.10 r1.qcow2"),
        ("ext", "-o compat=0.10 ext.qcow2"),
        ("zstdc", "-o compat=0.10 zstdc.qcow2"),
        ("resized", "-o compat=0.10 resized.qcow2"),
        ("raw", "-f raw -o compat=1.1 raw.raw"),
        ("raw", "-f raw -o help raw.raw"),
        ("raw", "-f raw -o size=2M raw.raw"),
    ]);
}
