//! The engine moves data through buffers that are not Rust slices: anonymous mappings
//! reached only by pointer, as guest memory is, even while another thread changes them.

use std::path::Path;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::open::{open_image, Format, OpenOptions};
use common::qcow2::create::Qcow2CreateOptions;
use common::qcow2::Qcow2Image;
use common::{BlockDriver, IoBuf, IoBufMut};

const SIZE: u64 = 1 << 20;

/// An anonymous mapping, touched only through its pointer.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory, owned by this handle until drop.
unsafe impl Send for Mapping {}
// SAFETY: accessed only through raw pointers (volatile or copies), never references.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(len: usize) -> Mapping {
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Mapping { ptr: p.cast(), len }
    }

    /// Read and write views of `len` bytes at `off` of the mapping.
    fn buf_mut(&self, off: usize, len: usize) -> IoBufMut<'_> {
        assert!(off + len <= self.len);
        // SAFETY: inside the mapping, which lives as long as the borrow of self.
        unsafe { IoBufMut::new(self.ptr.add(off), len) }
    }

    fn buf(&self, off: usize, len: usize) -> IoBuf<'_> {
        self.buf_mut(off, len).into()
    }

    fn set(&self, off: usize, v: u8) {
        assert!(off < self.len);
        // SAFETY: inside the mapping; a volatile store, as a guest's would be.
        unsafe { ptr::write_volatile(self.ptr.add(off), v) }
    }

    fn get(&self, off: usize) -> u8 {
        assert!(off < self.len);
        // SAFETY: inside the mapping; a volatile load.
        unsafe { ptr::read_volatile(self.ptr.add(off)) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Images of every kind the engine serves: raw, raw with O_DIRECT, qcow2.
fn images(dir: &Path) -> Vec<(&'static str, Box<dyn BlockDriver>)> {
    let raw = |name: &str, direct| {
        let p = dir.join(name);
        std::fs::write(&p, vec![0u8; SIZE as usize]).unwrap();
        let opts = OpenOptions {
            format: Some(Format::Raw),
            direct,
            ..Default::default()
        };
        open_image(&p, &opts).unwrap().into_driver()
    };
    let create = Qcow2CreateOptions {
        size: SIZE,
        ..Default::default()
    };
    let qcow2 = Qcow2Image::create_and_open(&dir.join("q.qcow2"), &create).unwrap();
    vec![
        ("raw", raw("r.raw", false)),
        ("raw O_DIRECT", raw("d.raw", true)),
        ("qcow2", Box::new(qcow2)),
    ]
}

fn temp_dir() -> tempfile::TempDir {
    // tmpfs has no O_DIRECT: use the build's target directory, which is on disk.
    tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).unwrap()
}

#[test]
fn reads_and_writes_through_mapped_memory() {
    let dir = temp_dir();
    for (name, img) in images(dir.path()) {
        let src = Mapping::new(64 << 10);
        let dst = Mapping::new(64 << 10);
        for i in 0..src.len {
            src.set(i, (i * 7 + i / 4096) as u8);
        }
        // Page-aligned pieces (straight to the file even with O_DIRECT) and odd ones.
        let pieces = [
            (0, 4096),
            (4096, 8192),
            (12288 + 3, 5000),
            (20000, 1),
            (30001, 7),
        ];
        for (off, len) in pieces {
            // Guest offset = mapping offset: the aligned pieces stay aligned.
            let at = 3 * 65536 + off as u64;
            let half = len / 2;
            let w = [src.buf(off, half), src.buf(off + half, len - half)];
            img.write_vectored_at(&w, at).unwrap();
            let r = [dst.buf_mut(off, half), dst.buf_mut(off + half, len - half)];
            img.read_vectored_at(&r, at).unwrap();
        }
        for (off, len) in pieces {
            for i in off..off + len {
                assert_eq!(dst.get(i), src.get(i), "{name}: byte {i}");
            }
        }
        // The slice API agrees with what landed in the mapping.
        let mut plain = vec![0u8; 4096];
        img.read_at(&mut plain, 3 * 65536 + 4096).unwrap();
        assert!((0..4096).all(|i| plain[i] == src.get(4096 + i)), "{name}");
    }
}

/// Another thread keeps writing the buffers while the engine reads into them and writes
/// from them: nothing breaks, a write stores for each byte one of the values it had, and
/// once the writer stops a read delivers exactly the image's bytes.
#[test]
fn buffers_changed_concurrently_by_another_thread() {
    let dir = temp_dir();
    for (name, img) in images(dir.path()) {
        let len = 3 * 65536 + 512;
        let m = Arc::new(Mapping::new(len));
        for i in 0..len {
            m.set(i, 0xaa);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let scribbler = {
            let (m, stop) = (m.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    m.set(i % m.len, 0x55);
                    i = i.wrapping_add(4093);
                }
            })
        };
        // Unaligned, spanning clusters: in-place, allocating and copy-on-write paths.
        let at = 65536 - 100;
        for _ in 0..20 {
            img.write_vectored_at(&[m.buf(0, 1000), m.buf(1000, len - 1000)], at)
                .unwrap();
            img.read_vectored_at(&[m.buf_mut(7, len - 7), m.buf_mut(0, 7)], at)
                .unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        scribbler.join().unwrap();
        let mut stored = vec![0u8; len];
        img.read_at(&mut stored, at).unwrap();
        assert!(
            stored.iter().all(|&b| b == 0xaa || b == 0x55),
            "{name}: a byte the buffer never held"
        );
        img.read_vectored_at(&[m.buf_mut(0, len)], at).unwrap();
        assert!((0..len).all(|i| m.get(i) == stored[i]), "{name}");
    }
}
