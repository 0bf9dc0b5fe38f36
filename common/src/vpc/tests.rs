//! The vpc format against qemu-img/qemu-io, concurrent allocating writers, and hostile
//! headers answered with one-line errors.

use std::path::Path;
use std::sync::Arc;

use super::create::{create_vpc, VpcCreateOptions};
use super::VpcImage;
use crate::driver::BlockDriver;
use crate::fault_storage::MemStorage;
use crate::storage::FileStorage;
use crate::test_tools::qemu_ok;

fn open_file(p: &Path, read_only: bool) -> VpcImage {
    let f = crate::storage::open_image_file(p, read_only).unwrap();
    VpcImage::open(Box::new(FileStorage::new(f)), read_only).unwrap()
}

fn qemu_raw(p: &Path, out: &Path) -> Vec<u8> {
    qemu_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vpc",
            "-O",
            "raw",
            p.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(out).unwrap()
}

/// Eight threads write interleaved 64 KiB pieces over the same unallocated blocks: every
/// byte arrives, each block is allocated once, and qemu-img reads what was written.
#[test]
fn concurrent_allocating_writes_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.vhd");
    let size = 16u64 << 20;
    create_vpc(
        &p,
        &VpcCreateOptions {
            size,
            fixed: false,
            force_size: true,
        },
    )
    .unwrap();
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
    img.flush().unwrap();
    drop(img);
    // 8 blocks of 2 MiB, each with its 512-byte bitmap, after 2048 bytes of metadata,
    // and the footer: a double allocation would make the file longer.
    let len = std::fs::metadata(&p).unwrap().len();
    assert_eq!(len, 2048 + 8 * (512 + (2 << 20)) + 512);
    let got = qemu_raw(&p, &dir.path().join("c.raw"));
    for (i, chunk) in got.chunks(piece as usize).enumerate() {
        assert!(chunk.iter().all(|&b| b == i as u8 | 1), "piece {i}");
    }
}

/// What qemu-io writes into a dynamic and a fixed image reads back alike, and what the
/// engine writes qemu-img reads.
#[test]
fn reads_and_writes_agree_with_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["dynamic", "fixed"] {
        let p = dir.path().join(format!("{sub}.vhd"));
        let ps = p.to_str().unwrap();
        let o = format!("subformat={sub}");
        qemu_ok(
            "qemu-img",
            &["create", "-q", "-f", "vpc", "-o", &o, ps, "7M"],
        );
        qemu_ok(
            "qemu-io",
            &["-f", "vpc", "-c", "write -P 0x5a 1000k 1500k", ps],
        );
        let img = open_file(&p, false);
        img.write_at(&[0xc3; 3000], 5 << 20).unwrap();
        img.write_zeroes(1100 << 10, 4096, false).unwrap();
        let mut ours = vec![0u8; img.size() as usize];
        img.read_at(&mut ours, 0).unwrap();
        drop(img);
        let theirs = qemu_raw(&p, &dir.path().join(format!("{sub}.raw")));
        assert_eq!(ours, theirs, "{sub}");
        assert!(ours[(1000 << 10)..(1100 << 10)].iter().all(|&b| b == 0x5a));
        assert!(ours[(1100 << 10)..(1104 << 10)].iter().all(|&b| b == 0));
        assert!(ours[(5 << 20)..(5 << 20) + 3000].iter().all(|&b| b == 0xc3));
    }
}

/// A dynamic image made by qemu-img, as bytes.
fn dynamic_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.vhd");
    qemu_ok(
        "qemu-img",
        &["create", "-q", "-f", "vpc", p.to_str().unwrap(), "10M"],
    );
    std::fs::read(p).unwrap()
}

fn open_mem(bytes: Vec<u8>) -> crate::Result<VpcImage> {
    VpcImage::open(Box::new(MemStorage::from_vec(bytes)), true)
}

fn put_be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Hostile headers: one line each, no panic, no allocation beyond the file.
#[test]
fn hostile_headers_fail_cleanly() {
    let good = dynamic_bytes();
    open_mem(good.clone()).unwrap();
    let fix_sum = |b: &mut Vec<u8>| {
        let sum = super::footer::checksum(&b[..512], 64);
        put_be32(b, 64, sum);
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated header",
            good[..300].to_vec(),
            "Invalid header magic",
        ),
        (
            "truncated table",
            good[..1000].to_vec(),
            "The image has been truncated",
        ),
        ("truncated cookie", good[..7].to_vec(), "invalid VPC image"),
        (
            "bad checksum",
            {
                let mut b = good.clone();
                b[40] ^= 0xff;
                b
            },
            "Incorrect header checksum",
        ),
        (
            "table near 2^32 entries",
            {
                let mut b = good.clone();
                put_be32(&mut b, 512 + 28, 0xffff_fff0);
                b
            },
            "Max Table Entries too large",
        ),
        (
            "table of 2^29 - 1 entries",
            {
                let mut b = good.clone();
                put_be32(&mut b, 512 + 28, 0x1fff_ffff);
                b
            },
            "Error reading pagetable",
        ),
        (
            "table past the end",
            {
                let mut b = good.clone();
                b[512 + 16..512 + 24].copy_from_slice(&(1u64 << 40).to_be_bytes());
                b
            },
            "The image has been truncated",
        ),
        (
            "block past the end",
            {
                let mut b = good.clone();
                put_be32(&mut b, 1536, 0x7fff_0000);
                b
            },
            "The image has been truncated",
        ),
        (
            "block size not a power of two",
            {
                let mut b = good.clone();
                put_be32(&mut b, 512 + 32, 3 << 20);
                b
            },
            "Invalid block size 3145728",
        ),
        (
            "dynamic header past the end",
            {
                let mut b = good.clone();
                b[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
                fix_sum(&mut b);
                b
            },
            "Error reading dynamic VHD header",
        ),
        (
            "size beyond 2040 GiB",
            {
                let mut b = good.clone();
                b[28..32].copy_from_slice(b"qem2");
                b[48..56].copy_from_slice(&(u64::MAX - 511).to_be_bytes());
                fix_sum(&mut b);
                b
            },
            "File too large",
        ),
        (
            "table smaller than the disk",
            {
                let mut b = good.clone();
                put_be32(&mut b, 512 + 28, 1);
                b
            },
            "Page table too small",
        ),
    ];
    for (what, bytes, want) in cases {
        let e = open_mem(bytes)
            .err()
            .unwrap_or_else(|| panic!("{what} opened"));
        let s = e.to_string();
        assert!(s.contains(want) && !s.contains('\n'), "{what}: {s}");
    }
}
