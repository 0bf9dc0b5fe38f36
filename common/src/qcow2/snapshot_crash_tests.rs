//! Snapshot create, delete and apply crashed at every point of their write log: no crash may
//! leave an image `qemu-img check` calls corrupt (leaks are allowed), and the image reads
//! as before or as after, its snapshots included.

use std::path::Path;
use std::sync::Arc;

use super::Qcow2Image;
use crate::fault_storage::FaultStorage;
use crate::test_tools::{qemu, qemu_ok};

/// An image of 512-byte clusters (many L2 tables and refcount blocks) with data written
/// around snapshot `s1`: some clusters shared with it, some its own, some the active's.
fn image_with_a_snapshot(p: &str, opts: &str) {
    qemu_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", opts, p, "1M"],
    );
    let io = |cmd: &str| qemu_ok("qemu-io", &["-f", "qcow2", "-c", cmd, p]);
    io("write -P 1 0 400k");
    io("write -c -P 2 576k 64k");
    qemu_ok("qemu-img", &["snapshot", "-c", "s1", p]);
    io("write -P 3 200k 300k");
    io("write -z 900k 20k");
}

/// What the image shows: its guest bytes and, by name, each snapshot's.
fn view(dir: &Path, file: &str) -> Vec<(String, Vec<u8>)> {
    let f = dir.join(file);
    let fs = f.to_str().unwrap();
    let raw = dir.join("view.raw");
    let rs = raw.to_str().unwrap();
    let list = qemu_ok("qemu-img", &["snapshot", "-l", fs]);
    let names: Vec<String> = list
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect();
    let mut out = Vec::new();
    for name in std::iter::once(None).chain(names.iter().map(Some)) {
        let mut args = vec!["convert", "-O", "raw"];
        let sel;
        if let Some(n) = name {
            sel = format!("snapshot.name={n}");
            args.extend(["-l", &sel]);
        }
        args.extend([fs, rs]);
        qemu_ok("qemu-img", &args);
        let label = name.cloned().unwrap_or_default();
        out.push((label, std::fs::read(&raw).unwrap()));
    }
    out
}

/// Run `op` on the image over a fault storage, then replay a crash at every point of its
/// log (everything issued durable, and two subsets of the unflushed writes).
fn crash_everywhere(opts: &str, op: &dyn Fn(&Qcow2Image)) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow2");
    let ps = p.to_str().unwrap();
    image_with_a_snapshot(ps, opts);
    let before = view(dir.path(), "t.qcow2");
    let fault = FaultStorage::with_content(std::fs::read(&p).unwrap());
    let img = Qcow2Image::open(Arc::new(fault.clone()), false).unwrap();
    fault.reset_log().unwrap();
    op(&img);
    drop(img);
    std::fs::write(&p, fault.content().unwrap()).unwrap();
    let (code, out) = qemu("qemu-img", &["check", ps]);
    assert_eq!(code, 0, "after the operation: {out}");
    let after = view(dir.path(), "t.qcow2");
    assert_ne!(before, after, "the operation changes what the image shows");
    let log_len = fault.log().len();
    for k in 0..=log_len {
        for (i, image) in fault.crash_images(k).into_iter().enumerate() {
            std::fs::write(&p, image).unwrap();
            let (code, out) = qemu("qemu-img", &["check", ps]);
            assert!(
                code == 0 || code == 3,
                "crash at {k}/{log_len} ({i}) corrupts the image: {out}"
            );
            let now = view(dir.path(), "t.qcow2");
            assert!(
                now == before || now == after,
                "crash at {k}/{log_len} ({i}): reads neither as before nor as after"
            );
        }
    }
}

#[test]
fn a_crashed_snapshot_create_is_never_corrupt() {
    crash_everywhere("cluster_size=512", &|img| {
        img.snapshot_create("s2").unwrap()
    });
}

#[test]
fn a_crashed_snapshot_create_with_extended_l2_is_never_corrupt() {
    crash_everywhere("cluster_size=16k,extended_l2=on,refcount_bits=4", &|img| {
        img.snapshot_create("s2").unwrap()
    });
}

#[test]
fn a_crashed_snapshot_delete_is_never_corrupt() {
    crash_everywhere("cluster_size=512", &|img| {
        img.snapshot_delete("s1").unwrap()
    });
}

#[test]
fn a_crashed_snapshot_apply_is_never_corrupt() {
    crash_everywhere("cluster_size=512", &|img| img.snapshot_apply("s1").unwrap());
}

/// With refcount_bits=1 a snapshot cannot be taken (no cluster can hold two references):
/// refused before anything is allocated, so the image still checks clean, nothing leaked,
/// and reads as before.
#[test]
fn a_refused_snapshot_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow2");
    let ps = p.to_str().unwrap();
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=1",
            ps,
            "1M",
        ],
    );
    qemu_ok("qemu-io", &["-f", "qcow2", "-c", "write -P 7 0 200k", ps]);
    let before = std::fs::read(&p).unwrap();
    let fault = FaultStorage::with_content(before.clone());
    let img = Qcow2Image::open(Arc::new(fault.clone()), false).unwrap();
    let e = img.snapshot_create("s1").unwrap_err();
    assert!(e.to_string().contains("would overflow 1 bits"), "{e}");
    drop(img);
    let after = fault.content().unwrap();
    assert_eq!(after, before, "the file is unchanged");
    std::fs::write(&p, &after).unwrap();
    let (code, out) = qemu("qemu-img", &["check", ps]);
    assert_eq!(code, 0, "{out}");
}
