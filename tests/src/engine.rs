//! Thin adapters over the engine's public API (`common::open`), so that an API change is
//! adapted in one place.

use common::open::{open_image, Format, Image, OpenOptions};
use common::BlockDriver;
use std::path::Path;

/// Retry `f` for a moment while it fails with a lock conflict. Tests run in threads that
/// spawn child processes, and a child holds a copy of every open descriptor until its
/// `exec`: an image this process has just closed can still look locked for a moment.
fn retry_locked(mut f: impl FnMut() -> common::Result<Image>) -> common::Result<Image> {
    let start = std::time::Instant::now();
    loop {
        match f() {
            Err(common::Error::Locked(_))
                if start.elapsed() < std::time::Duration::from_secs(2) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            r => return r,
        }
    }
}

/// Open an image through the engine, probing the format.
pub fn open(path: &Path, read_only: bool) -> common::Result<Image> {
    let opts = OpenOptions {
        read_only,
        ..Default::default()
    };
    retry_locked(|| open_image(path, &opts))
}

/// Open with an explicit format (`"raw"`/`"qcow2"`) and share mode.
pub fn open_with(
    path: &Path,
    read_only: bool,
    format: Option<&str>,
    force_share: bool,
) -> common::Result<Image> {
    let format = format.map(|f| Format::from_name(f).expect("known format"));
    let opts = OpenOptions {
        read_only,
        force_share,
        format,
        ..Default::default()
    };
    retry_locked(|| open_image(path, &opts))
}

/// Read the whole guest contents in `chunk`-byte reads starting at `start` (bytes before
/// `start` are read last, so that every read is unaligned when `start` is).
pub fn read_all(d: &dyn BlockDriver, chunk: usize, start: u64) -> common::Result<Vec<u8>> {
    let size = d.size();
    let mut out = vec![0u8; size as usize];
    let mut pos = start.min(size);
    while pos < size {
        let n = (size - pos).min(chunk as u64) as usize;
        d.read_at(&mut out[pos as usize..pos as usize + n], pos)?;
        pos += n as u64;
    }
    let mut pos = 0;
    while pos < start.min(size) {
        let n = (start.min(size) - pos).min(chunk as u64) as usize;
        d.read_at(&mut out[pos as usize..pos as usize + n], pos)?;
        pos += n as u64;
    }
    Ok(out)
}
