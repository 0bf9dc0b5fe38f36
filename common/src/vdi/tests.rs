//! The vdi format against qemu-img/qemu-io, concurrent allocating writers, the check, and
//! hostile headers answered with one-line errors.

use std::path::Path;
use std::sync::Arc;

use super::create::{create_vdi, VdiCreateOptions};
use super::VdiImage;
use crate::driver::BlockDriver;
use crate::fault_storage::MemStorage;
use crate::storage::FileStorage;
use crate::test_tools::{qemu, qemu_ok};

fn open_file(p: &Path, read_only: bool) -> VdiImage {
    let f = crate::storage::open_image_file(p, read_only).unwrap();
    VdiImage::open(Box::new(FileStorage::new(f)), read_only).unwrap()
}

fn qemu_raw(p: &Path, out: &Path) -> Vec<u8> {
    let (p, o) = (p.to_str().unwrap(), out.to_str().unwrap());
    qemu_ok("qemu-img", &["convert", "-f", "vdi", "-O", "raw", p, o]);
    std::fs::read(out).unwrap()
}

/// Eight threads write interleaved 64 KiB pieces over the same unallocated blocks: every
/// byte arrives, each block is allocated once (qemu-img check agrees), qemu-img reads it.
#[test]
fn concurrent_allocating_writes_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.vdi");
    let size = 16u64 << 20;
    create_vdi(&p, &VdiCreateOptions { size, fixed: false }).unwrap();
    let img = Arc::new(open_file(&p, false));
    let piece = 64 << 10;
    let threads = 8u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            let img = Arc::clone(&img);
            s.spawn(move || {
                let mut off = t * piece;
                while off < size {
                    let buf = vec![(off / piece) as u8 | 1; piece as usize];
                    img.write_at(&buf, off).unwrap();
                    off += threads * piece;
                }
            });
        }
    });
    drop(img);
    // Header, one map sector, 16 blocks: a double allocation would make it longer.
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 1024 + (16 << 20));
    let text = qemu_ok("qemu-img", &["check", p.to_str().unwrap()]);
    assert!(text.contains("No errors were found"), "{text}");
    let got = qemu_raw(&p, &dir.path().join("c.raw"));
    for (i, chunk) in got.chunks(piece as usize).enumerate() {
        assert!(chunk.iter().all(|&b| b == i as u8 | 1), "piece {i}");
    }
}

/// What qemu-io writes into dynamic and static images reads back alike, and what the
/// engine writes qemu-img reads.
#[test]
fn reads_and_writes_agree_with_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for st in ["off", "on"] {
        let p = dir.path().join(format!("{st}.vdi"));
        let ps = p.to_str().unwrap();
        let o = format!("static={st}");
        qemu_ok(
            "qemu-img",
            &["create", "-q", "-f", "vdi", "-o", &o, ps, "7M"],
        );
        qemu_ok(
            "qemu-io",
            &["-f", "vdi", "-c", "write -P 0x5a 1000k 1500k", ps],
        );
        let img = open_file(&p, false);
        img.write_at(&[0xc3; 3000], 5 << 20).unwrap();
        img.write_zeroes(1100 << 10, 4096, false).unwrap();
        let mut ours = vec![0u8; img.size() as usize];
        img.read_at(&mut ours, 0).unwrap();
        drop(img);
        let theirs = qemu_raw(&p, &dir.path().join(format!("{st}.raw")));
        assert_eq!(ours, theirs, "static={st}");
        assert!(ours[(1000 << 10)..(1100 << 10)].iter().all(|&b| b == 0x5a));
        assert!(ours[(5 << 20)..(5 << 20) + 3000].iter().all(|&b| b == 0xc3));
        let text = qemu_ok("qemu-img", &["check", ps]);
        assert!(text.contains("No errors were found"), "{text}");
    }
}

fn dynamic_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.vdi");
    let ps = p.to_str().unwrap();
    qemu_ok("qemu-img", &["create", "-q", "-f", "vdi", ps, "10M"]);
    qemu_ok("qemu-io", &["-f", "vdi", "-c", "write -P 1 2M 2M", ps]);
    std::fs::read(p).unwrap()
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn with(base: &[u8], edit: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
    let mut b = base.to_vec();
    edit(&mut b);
    b
}

/// Hostile headers: one line each, no panic, no allocation beyond the file; the words are
/// QEMU's where QEMU refuses the image too.
#[test]
fn hostile_headers_fail_cleanly() {
    let good = dynamic_bytes();
    let open = |b: Vec<u8>| VdiImage::open(Box::new(MemStorage::from_vec(b)), true);
    open(good.clone()).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated header",
            good[..300].to_vec(),
            "sector size 0 is not 512",
        ),
        (
            "truncated signature",
            good[..64].to_vec(),
            "bad signature 00000000",
        ),
        (
            "blocks near 2^32",
            with(&good, |b| {
                put32(b, 0x180, 0xffff_fff0);
                b[0x170..0x178].copy_from_slice(&(1u64 << 40).to_le_bytes());
            }),
            "too many blocks 4294967280",
        ),
        (
            "map past the end",
            with(&good, |b| put32(b, 0x180, 0x1fff_ff80)),
            "lies past the end of the file",
        ),
        (
            "size beyond the limit",
            with(&good, |b| {
                b[0x170..0x178].copy_from_slice(&u64::MAX.to_le_bytes())
            }),
            "Unsupported VDI image size",
        ),
        (
            "size beyond the map",
            with(&good, |b| put32(b, 0x180, 2)),
            "image bitmap has room for 2097152",
        ),
        (
            "block size",
            with(&good, |b| put32(b, 0x178, 4096)),
            "block size 4096 is not 1048576",
        ),
        (
            "unaligned map",
            with(&good, |b| put32(b, 0x154, 0x201)),
            "unaligned block map offset 0x201",
        ),
        (
            "parent",
            with(&good, |b| b[0x1b8] = 1),
            "non-NULL parent UUID",
        ),
        (
            "version",
            with(&good, |b| put32(b, 0x44, 0x0002_0000)),
            "unsupported VDI image (version 2.0)",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (what, bytes, want) in cases {
        let e = open(bytes.clone())
            .err()
            .unwrap_or_else(|| panic!("{what} opened"));
        let s = e.to_string();
        assert!(s.contains(want) && !s.contains('\n'), "{what}: {s}");
        // qemu-img refuses it too (the map past the end aside, which QEMU reads as zeroes).
        if what != "map past the end" {
            let p = dir.path().join("h.vdi");
            std::fs::write(&p, &bytes).unwrap();
            let (code, text) = qemu("qemu-img", &["info", "-f", "vdi", p.to_str().unwrap()]);
            assert!(code == 1 && text.contains(want), "{what}: qemu-img: {text}");
        }
    }
}

/// A damaged map: the check finds what QEMU's finds, in its words.
#[test]
fn check_reports_like_qemu() {
    let good = dynamic_bytes();
    let dir = tempfile::tempdir().unwrap();
    for (what, bytes) in [
        ("clean", good.clone()),
        ("entry too large", with(&good, |b| put32(b, 512, 77))),
        ("shared block", with(&good, |b| put32(b, 512 + 4, 0))),
        ("count", with(&good, |b| put32(b, 0x184, 9))),
    ] {
        let p = dir.path().join("k.vdi");
        std::fs::write(&p, &bytes).unwrap();
        let img = open_file(&p, true);
        let r = img.check();
        let (code, text) = qemu("qemu-img", &["check", p.to_str().unwrap()]);
        let theirs: Vec<&str> = text.lines().filter(|l| l.starts_with("ERROR")).collect();
        assert_eq!(r.messages, theirs, "{what}");
        assert_eq!(r.corruptions as usize, theirs.len(), "{what}");
        assert_eq!(code, if theirs.is_empty() { 0 } else { 2 }, "{what}");
    }
}
