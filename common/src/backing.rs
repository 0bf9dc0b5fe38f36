//! A layer's reference to the layer below it, and how QEMU resolves the name it stores.

use std::path::{Path, PathBuf};

use crate::driver::{Allocation, BlockDriver, BlockStatus};
use crate::error::Result;
use crate::iovec::{self, IoBufMut};

/// The backing file an image names: the name and format exactly as stored in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingRef {
    /// The file name, not resolved.
    pub name: String,
    /// The format name, when the image records one (it may name a format the engine lacks).
    pub format: Option<String>,
}

/// Resolve a backing file name stored in `overlay` the way QEMU does: absolute names stay,
/// relative names are relative to the overlay's directory.
pub fn resolve_backing_path(overlay: &Path, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    // An NBD URI names a server, not a file: QEMU leaves protocol names as they are.
    if b.is_absolute() || crate::nbd::uri::is_nbd_uri(backing) {
        return b.to_path_buf();
    }
    match overlay.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(b),
        _ => b.to_path_buf(),
    }
}

/// Read guest bytes at `pos` that a layer does not have from the layer below it (zeroes
/// past that layer's end), or zeroes when there is none.
pub fn read_below(below: Option<&dyn BlockDriver>, bufs: &[IoBufMut<'_>], pos: u64) -> Result<()> {
    let len = iovec::total_len(bufs);
    let avail = below.map_or(0, |b| b.size().saturating_sub(pos).min(len as u64) as usize);
    let mut front = iovec::Front::new(bufs);
    if let (Some(b), true) = (below, avail > 0) {
        b.read_vectored_at(&front.take(avail), pos)?;
    }
    iovec::zero(&front.take(len - avail));
    Ok(())
}

/// The status of `len` bytes at `offset` that a layer does not have, as the layer below
/// reports them (one level deeper; unallocated anywhere stays depth 0). `None` where no
/// layer below covers `offset`: the caller reports its own unallocated run.
pub fn status_below(
    below: Option<&dyn BlockDriver>,
    offset: u64,
    len: u64,
) -> Result<Option<BlockStatus>> {
    let Some(b) = below.filter(|b| offset < b.size()) else {
        return Ok(None);
    };
    let mut s = b.block_status(offset, len.min(b.size() - offset))?;
    s.depth += 1;
    if s.allocation == Allocation::Unallocated {
        s.depth = 0;
    }
    Ok(Some(s))
}
