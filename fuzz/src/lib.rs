//! Shared pieces of the fuzz targets: an input written to a scratch image file, opened
//! through the engine's front-end API, and bounded walks over what it opened.
//!
//! Every walk is bounded (block-status calls, bytes read) so that no input can take more
//! than a moment; the engine's own answers (errors) are never a failure, only a panic,
//! a hang or an abort is, and so is a heap over 1 GiB ([`heap_limit`]).

pub mod heap_limit;
pub mod open_files;

use std::path::PathBuf;

use common::open::{open_image, Format, Image, OpenOptions};
use common::{Allocation, BlockDriver};

/// Most block-status calls one walk makes.
pub const MAX_STATUS_CALLS: usize = 4096;
/// Most guest bytes one walk reads.
pub const MAX_READ: u64 = 64 << 20;
/// Largest single read.
const READ_CHUNK: u64 = 1 << 20;

/// A scratch image file on tmpfs, one per fuzzing process, removed when dropped.
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// A scratch file named after this process (AFL runs one process per instance).
    pub fn new(tag: &str) -> Scratch {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        Scratch {
            path: dir.join(format!("img-fuzz-{tag}-{}", std::process::id())),
        }
    }

    /// Replace the file's contents with `bytes` and open it (no backing files: an input
    /// naming one must not make the target read the host's files).
    pub fn open(&self, bytes: &[u8], format: Option<Format>, opts: OpenOptions) -> Option<Image> {
        std::fs::write(&self.path, bytes).expect("scratch file");
        let opts = OpenOptions {
            format,
            no_backing: true,
            ..opts
        };
        open_image(&self.path, &opts).ok()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The format the first input byte selects: probed, or one of the engine's formats.
pub fn pick_format(b: u8) -> Option<Format> {
    match b % 9 {
        0 => None,
        1 => Some(Format::Raw),
        2 => Some(Format::Qcow2),
        3 => Some(Format::Vpc),
        4 => Some(Format::Vdi),
        5 => Some(Format::Vhdx),
        6 => Some(Format::Qed),
        7 => Some(Format::Qcow),
        _ => Some(Format::Parallels),
    }
}

/// Block status over the whole image (at most [`MAX_STATUS_CALLS`] calls), reading every
/// run that holds data (at most [`MAX_READ`] bytes in all) and the first bytes of every
/// other run. Errors end the walk.
pub fn walk(d: &dyn BlockDriver) {
    let size = d.size();
    let mut buf = vec![0u8; READ_CHUNK as usize];
    let (mut offset, mut budget) = (0u64, MAX_READ);
    for _ in 0..MAX_STATUS_CALLS {
        if offset >= size {
            break;
        }
        let Ok(st) = d.block_status(offset, size - offset) else {
            return;
        };
        assert!(
            st.len >= 1 && st.len <= size - offset,
            "block status of {offset:#x} answered a run of {:#x} bytes in a disk of {size:#x}",
            st.len
        );
        let want = match st.allocation {
            Allocation::Data | Allocation::DataOverHole | Allocation::Undetermined => st.len,
            Allocation::Zero | Allocation::Unallocated => st.len.min(512),
        };
        let mut at = offset;
        let end = offset + want.min(budget);
        while at < end {
            let n = (end - at).min(READ_CHUNK);
            if d.read_at(&mut buf[..n as usize], at).is_err() {
                break;
            }
            at += n;
        }
        budget -= end - offset;
        offset += st.len;
    }
}

/// Everything `info` shows of an image: format-specific info, snapshots, sizes.
pub fn describe(img: &Image) {
    let _ = img.info();
    let _ = img.snapshots();
    let _ = img.driver().allocated_file_size();
    let _ = img.driver().clusters();
    let _ = img.open_warnings();
}
