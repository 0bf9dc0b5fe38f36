//! The vhdx format against qemu-img/qemu-io: concurrent allocating writers, and logs that
//! must not make the open spin (a dirty log replayed: tests/tests/vhdx_cross.rs).

use std::path::Path;
use std::sync::Arc;

use super::create::{create_vhdx, VhdxCreateOptions};
use super::header::Headers;
use super::VhdxImage;
use crate::driver::BlockDriver;
use crate::storage::{FileStorage, Storage};
use crate::test_tools::qemu_ok;

fn open_file(p: &Path, read_only: bool) -> crate::Result<VhdxImage> {
    let f = crate::storage::open_image_file(p, read_only).unwrap();
    VhdxImage::open(
        Box::new(FileStorage::new(f)),
        p.to_str().unwrap(),
        read_only,
        false,
    )
}

fn qemu_raw(p: &Path, out: &Path) -> Vec<u8> {
    let (p, o) = (p.to_str().unwrap(), out.to_str().unwrap());
    qemu_ok("qemu-img", &["convert", "-f", "vhdx", "-O", "raw", p, o]);
    std::fs::read(out).unwrap()
}

fn options(size: u64, block_size: u64) -> VhdxCreateOptions {
    VhdxCreateOptions {
        size,
        log_size: 1 << 20,
        block_size: Some(block_size),
        fixed: false,
        block_state_zero: true,
    }
}

/// Eight threads write interleaved 64 KiB pieces over the same unallocated 1 MiB blocks:
/// every byte arrives, each block is allocated once (the file grows by one block per
/// guest block), qemu-img reads it and finds it clean.
#[test]
fn concurrent_allocating_writes_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.vhdx");
    let size = 16u64 << 20;
    create_vhdx(&p, &options(size, 1 << 20)).unwrap();
    let empty_len = std::fs::metadata(&p).unwrap().len();
    let img = Arc::new(open_file(&p, false).unwrap());
    let piece = 64u64 << 10;
    let threads = 8u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            let img = Arc::clone(&img);
            s.spawn(move || {
                let mut off = t * piece;
                while off < size {
                    let data = vec![(off / piece) as u8 ^ 0xa5; piece as usize];
                    img.write_at(&data, off).unwrap();
                    off += threads * piece;
                }
            });
        }
    });
    img.flush().unwrap();
    drop(img);
    let got = qemu_raw(&p, &dir.path().join("c.raw"));
    for (i, chunk) in got.chunks(piece as usize).enumerate() {
        assert!(chunk.iter().all(|&b| b == i as u8 ^ 0xa5), "piece {i}");
    }
    let len = std::fs::metadata(&p).unwrap().len();
    assert_eq!(
        len,
        empty_len.next_multiple_of(1 << 20) + size,
        "one block each"
    );
    let out = qemu_ok("qemu-img", &["check", p.to_str().unwrap()]);
    assert!(out.contains("No errors were found"), "{out}");
}

/// A log entry as long as the whole log with a wrong checksum (QEMU would read it over
/// and over) and a log full of entry headers: the open ends, with an answer.
#[test]
fn hostile_logs_end() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("h.vhdx");
    create_vhdx(&p, &options(8 << 20, 1 << 20)).unwrap();
    let f = crate::storage::open_image_file(&p, false).unwrap();
    let s = FileStorage::new(f);
    let mut headers = Headers::load(&s).unwrap();
    let guid = [7u8; 16];
    headers.update(&s, false, Some(guid)).unwrap();
    let mut e = [0u8; 64];
    e[..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&(1u32 << 20).to_le_bytes());
    e[16..24].copy_from_slice(&1u64.to_le_bytes());
    e[32..48].copy_from_slice(&guid);
    s.write_at(&e, 1 << 20).unwrap();
    drop(s);
    assert!(
        open_file(&p, false).is_ok(),
        "no valid entry, nothing to replay"
    );
    let f = crate::storage::open_image_file(&p, false).unwrap();
    let s = FileStorage::new(f);
    for k in 0..256u64 {
        let mut e = e;
        e[8..12].copy_from_slice(&(8192u32).to_le_bytes());
        s.write_at(&e, (1 << 20) + k * 4096).unwrap();
    }
    drop(s);
    let start = std::time::Instant::now();
    let _ = open_file(&p, false);
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
}
