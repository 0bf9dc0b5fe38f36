//! Repairs interrupted at every write: what survives is repaired by a second check, and
//! qemu-img then finds the image clean.

use crate::test_tools::{qemu, qemu_ok};
use std::sync::Arc;

use super::Qcow2Image;
use crate::check::Fix;
use crate::fault_storage::FaultStorage;

const ALL: Fix = Fix {
    leaks: true,
    errors: true,
};

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// A qemu-made image (64 KiB clusters, 16-bit refcounts) and two damaged copies: a data
/// cluster's refcount cleared (refcounts rebuilt) and one raised (a leak, bad COPIED).
fn damaged(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let p = dir.join("src.qcow2");
    let f = p.to_str().unwrap();
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", f, "8M"]);
    qemu_ok(
        "qemu-io",
        &["-c", "write -P 1 0 300k", "-c", "write -P 2 4M 64k", f],
    );
    let base = std::fs::read(&p).unwrap();
    let (l1, rt) = (be64(&base, 40) as usize, be64(&base, 48) as usize);
    let mask = 0x00ff_ffff_ffff_fe00;
    let l2 = (be64(&base, l1) & mask) as usize;
    let data = ((be64(&base, l2) & mask) >> 16) as usize;
    let rb = be64(&base, rt) as usize;
    let mut out = Vec::new();
    for v in [0u16, 2] {
        let mut b = base.clone();
        b[rb + 2 * data..rb + 2 * data + 2].copy_from_slice(&v.to_be_bytes());
        out.push(b);
    }
    out
}

fn check_all(bytes: Vec<u8>, fail_from: Option<u64>) -> (Vec<u8>, u64) {
    let fault = FaultStorage::with_content(bytes);
    let before = fault.write_count();
    fault.fail_writes_from(fail_from);
    if let Ok(img) = Qcow2Image::open_for(Arc::new(fault.clone()), false, true) {
        let _ = img.check(ALL);
    }
    let writes = fault.write_count() - before;
    fault.fail_writes_from(None);
    (fault.content().unwrap(), writes)
}

#[test]
fn interrupted_repairs_are_repaired_by_a_second_check() {
    let dir = tempfile::tempdir().unwrap();
    for (k, bytes) in damaged(dir.path()).into_iter().enumerate() {
        let (_, total) = check_all(bytes.clone(), None);
        assert!(total > 0, "case {k}: the repair writes");
        for n in 1..=total {
            let (survived, _) = check_all(bytes.clone(), Some(n));
            let (repaired, _) = check_all(survived, None);
            let p = dir.path().join("r.qcow2");
            std::fs::write(&p, repaired).unwrap();
            let (code, text) = qemu("qemu-img", &["check", p.to_str().unwrap()]);
            assert_eq!(code, 0, "case {k}, write {n} failed: {text}");
        }
    }
}

/// A refcount table entry for a block past the end of the file, as the `check` fuzz target
/// found. Where the refcount table can describe the block (at 2 GiB: the table covers
/// 4 GiB of 4 KiB clusters), `check -r all` grows the file to hold it, as QEMU does, and
/// neither it nor the next check visits every cluster up to it. Past what the table can
/// describe (at 2^50) no real block can lie: the file is not grown ("could not resize
/// image", EFBIG) instead of growing to 2^50 and making every later pass step through
/// nothing. Either way the repair and a second check end in seconds.
#[test]
fn far_refcount_block_repair_is_bounded() {
    let shm = std::path::Path::new("/dev/shm");
    assert!(
        shm.is_dir(),
        "needs tmpfs at /dev/shm for large sparse files"
    );
    let dir = tempfile::tempdir_in(shm).unwrap();
    // The last: found by fuzzing (check), the block's end overflowed; QEMU refuses it
    // with EINVAL.
    let cases = [
        (1u64 << 31, None),
        (1u64 << 50, Some("File too large")),
        (0xffff_ffff_ffff_f000, Some("Invalid argument")),
    ];
    for (at, refused) in cases {
        let p = dir.path().join("far.qcow2");
        let f = p.to_str().unwrap();
        qemu_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4k",
                f,
                "2M",
            ],
        );
        qemu_ok("qemu-io", &["-c", "write -P 1 0 64k", f]);
        let mut b = std::fs::read(&p).unwrap();
        let rt = be64(&b, 48) as usize;
        b[rt + 8..rt + 16].copy_from_slice(&at.to_be_bytes());
        std::fs::write(&p, &b).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = p.clone();
        std::thread::spawn(move || {
            let open = || {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .unwrap();
                let storage = crate::storage::FileStorage::new(file);
                Qcow2Image::open_for(Arc::new(storage), false, true).unwrap()
            };
            let repaired = open().check(ALL);
            let _again = open().check(Fix::default());
            let _ = tx.send(repaired.messages);
        });
        let messages = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("check of a refcount block at {at:#x} took over 30 s"));
        assert!(
            messages
                .iter()
                .any(|m| m == "Repairing refcount block 1 is outside image"),
            "{messages:?}"
        );
        let len = std::fs::metadata(&p).unwrap().len();
        match refused {
            None => assert!(len > at, "not grown to the block at {at:#x}: {messages:?}"),
            Some(why) => {
                assert!(len < 1 << 20, "grown to {len} for a block at {at:#x}");
                let want = format!("ERROR could not resize image: {why}");
                assert!(messages.contains(&want), "{messages:?}");
            }
        }
        std::fs::remove_file(&p).unwrap();
    }
}
