//! Any bytes as the client side of an NBD connection to the server
//! (`common::nbd::server`): the handshake's options, then transmission requests (served
//! concurrently), against a 1 MiB qcow2 image with 4 KiB clusters over a raw backing file.
//! Afterwards the image must open again and `check` clean (no corruption, no leak).
//!
//! Input: byte 0 picks the export (bit 0 read-only, bit 1 `qemu:allocation-depth`
//! offered, bit 2 writethrough, bits 3-4 the requests in flight: 16, 1, 2 or 4, bit 5 a
//! 64 KiB budget of bytes in flight instead of 64 MiB); the rest is what the client
//! sends, until its end.

// Links the fuzz crate, whose allocator bounds the heap (`fuzz::heap_limit`).
use fuzz as _;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use common::check::Fix;
use common::create::{create, CreateOptions, Preallocation, Qcow2CreateOptions};
use common::nbd::server::{negotiate, transmit, Export, Limits, Outcome, WriteCache};
use common::open::{open_image, Image, OpenOptions};

const SIZE: u64 = 1 << 20;

/// A directory on tmpfs, one per fuzzing process, removed when dropped.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The base (raw, data in its first half) and the overlay (data, zeroes and unallocated
/// clusters over it); the overlay's bytes to restore it from before each input.
fn make_images(dir: &Path) -> (PathBuf, Vec<u8>) {
    let base = dir.join("base.raw");
    let top = dir.join("top.qcow2");
    let raw = CreateOptions::Raw {
        size: SIZE,
        preallocation: Preallocation::Off,
    };
    create(&base, &raw).unwrap();
    let rw = OpenOptions::default();
    let b = open_image(&base, &rw).unwrap();
    b.driver().write_at(&[0x5a; SIZE as usize / 2], 0).unwrap();
    drop(b);
    let q = Qcow2CreateOptions {
        size: SIZE,
        cluster_size: 4096,
        backing_file: Some(base.to_str().unwrap().to_string()),
        backing_format: Some("raw".into()),
        ..Default::default()
    };
    create(&top, &CreateOptions::Qcow2(q)).unwrap();
    let t = open_image(&top, &rw).unwrap();
    let d = t.driver();
    d.write_at(&[0xa5; 64 << 10], 0).unwrap();
    d.write_zeroes(256 << 10, 64 << 10, true).unwrap();
    d.write_at(&[0x3c; 8 << 10], 768 << 10).unwrap();
    d.flush().unwrap();
    drop(t);
    let bytes = std::fs::read(&top).unwrap();
    (top, bytes)
}

fn open(path: &Path, read_only: bool, check: bool) -> Image {
    let opts = OpenOptions {
        read_only,
        check,
        ..Default::default()
    };
    open_image(path, &opts).expect("the overlay opens")
}

/// The in-flight limits byte 0 picks: the server's own, or fewer requests (down to one,
/// served without a second thread) and a small byte budget that larger requests exceed.
fn limits(sel: u8) -> Limits {
    let standard = Limits::default();
    Limits {
        requests: [standard.requests, 1, 2, 4][usize::from(sel >> 3 & 3)],
        bytes: if sel & 0x20 != 0 {
            64 << 10
        } else {
            standard.bytes
        },
    }
}

fn main() {
    let shm = Path::new("/dev/shm");
    let root = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = Dir(root.join(format!("img-fuzz-nbd-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let (top, pristine) = make_images(&dir.0);
    afl::fuzz!(|data: &[u8]| {
        let Some((&sel, client)) = data.split_first() else {
            return;
        };
        std::fs::write(&top, &pristine).unwrap();
        let export = Export {
            image: open(&top, sel & 1 != 0, false).into_driver(),
            name: String::new(),
            description: Some("fuzz".into()),
            allocation_depth: sel & 2 != 0,
            cache: if sel & 4 != 0 {
                WriteCache::Through
            } else {
                WriteCache::Back
            },
            multi_conn: false,
            limits: limits(sel),
        };
        let mut r = BufReader::new(client);
        let mut w = std::io::sink();
        if let Ok(Outcome::Transmission(session)) = negotiate(&export, &mut r, &mut w) {
            let _ = transmit(&export, &session, &mut r, &mut w);
        }
        export.driver().flush().expect("flush after serving");
        drop(export);
        let report = open(&top, true, true)
            .check(Fix::default())
            .expect("check after serving");
        assert!(
            report.corruptions == 0
                && report.leaks == 0
                && report.check_errors == 0
                && report.failure.is_none(),
            "the image is not clean after serving: {report:?}"
        );
    });
}
