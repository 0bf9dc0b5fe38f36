//! Any bytes as the client side of an NBD connection to the server
//! (`common::nbd::server`): the handshake's options, then transmission requests (served
//! concurrently), against a 1 MiB qcow2 image with 4 KiB clusters over a raw backing file.
//! Afterwards no descriptor of the image may be left open, and it must open again and
//! `check` clean (no corruption, no leak). Each process AFL forks has its own copy of the
//! images (see [`Images`]).
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

/// A directory removed when dropped.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The images of the process that runs the inputs, in a directory of its own named after
/// its pid inside the one the fork server made. Every process AFL forks writes its own on
/// its first input: no image file is shared with an earlier child (one AFL killed in the
/// middle of an input, say) or with anything else, so a lock conflict on reopening can
/// only be this process's own descriptor left open. The fork server's children run one
/// at a time, so the directories of other pids in it are of dead children and removed.
struct Images {
    pid: u32,
    _dir: Dir,
    top: PathBuf,
    /// Inputs this process has run.
    inputs: u64,
}

impl Images {
    /// Write `pristine`'s files into this process's directory under `root`.
    fn new(root: &Path, pristine: &Pristine) -> Images {
        let pid = std::process::id();
        for e in std::fs::read_dir(root).unwrap().flatten() {
            let name = e.file_name();
            let dead = !Path::new("/proc").join(&name).exists();
            if e.path().is_dir() && name.to_string_lossy() != pid.to_string() && dead {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let dir = Dir(root.join(pid.to_string()));
        let _ = std::fs::remove_dir_all(&dir.0);
        std::fs::create_dir(&dir.0).unwrap();
        std::fs::write(dir.0.join(BASE), &pristine.base).unwrap();
        let top = dir.0.join(TOP);
        std::fs::write(&top, &pristine.top).unwrap();
        Images {
            pid,
            _dir: dir,
            top,
            inputs: 0,
        }
    }
}

const BASE: &str = "base.raw";
const TOP: &str = "top.qcow2";

/// The bytes of the base (raw, data in its first half) and of the overlay (data, zeroes
/// and unallocated clusters over it, naming its backing file relative to itself).
struct Pristine {
    base: Vec<u8>,
    top: Vec<u8>,
}

/// Make the images in `dir` (before the fork server starts, so that no input's coverage
/// includes it) and keep their bytes.
fn make_images(dir: &Path) -> Pristine {
    let base = dir.join(BASE);
    let top = dir.join(TOP);
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
        backing_file: Some(BASE.into()),
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
    let p = Pristine {
        base: std::fs::read(&base).unwrap(),
        top: std::fs::read(&top).unwrap(),
    };
    std::fs::remove_file(base).unwrap();
    std::fs::remove_file(top).unwrap();
    p
}

/// Open the overlay; a refusal is a failure, and one for a lock names who holds the file.
fn open(path: &Path, read_only: bool, check: bool, input: u64) -> Image {
    let opts = OpenOptions {
        read_only,
        check,
        ..Default::default()
    };
    match open_image(path, &opts) {
        Ok(image) => image,
        Err(e @ common::Error::Locked(_)) => panic!(
            "the overlay opens: {e} (input {input} of process {}); holders:\n{}",
            std::process::id(),
            fuzz::open_files::holders(path).join("\n")
        ),
        Err(e) => panic!("the overlay opens: {e}"),
    }
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
    let tmp = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    // Made before the fork server starts; each child's images go in a directory inside.
    let root = Dir(tmp.join(format!("img-fuzz-nbd-{}", std::process::id())));
    std::fs::create_dir_all(&root.0).unwrap();
    let pristine = make_images(&root.0);
    let mut mine: Option<Images> = None;
    afl::fuzz!(|data: &[u8]| {
        let pid = std::process::id();
        let im = match &mut mine {
            Some(im) if im.pid == pid => im,
            _ => mine.insert(Images::new(&root.0, &pristine)),
        };
        im.inputs += 1;
        let Some((&sel, client)) = data.split_first() else {
            return;
        };
        let top = &im.top;
        std::fs::write(top, &pristine.top).unwrap();
        let export = Export {
            image: open(top, sel & 1 != 0, false, im.inputs).into_driver(),
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
        let report = open(top, true, true, im.inputs)
            .check(Fix::default())
            .expect("check after serving");
        let left = fuzz::open_files::own_fds_on(top);
        assert!(
            left.is_empty(),
            "descriptors {left:?} of the overlay outlive serving"
        );
        assert!(
            report.corruptions == 0
                && report.leaks == 0
                && report.check_errors == 0
                && report.failure.is_none(),
            "the image is not clean after serving: {report:?}"
        );
    });
}
