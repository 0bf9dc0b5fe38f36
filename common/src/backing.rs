//! A layer's reference to the layer below it, and how QEMU resolves the name it stores.

use std::path::{Path, PathBuf};

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

/// Read guest bytes at `pos` that a layer does not hold from the layer `below` it: past
/// the end of that layer (or with none) they read as zeroes, as in QEMU.
pub(crate) fn read_below(
    below: Option<&dyn crate::BlockDriver>,
    bufs: &[crate::IoBufMut<'_>],
    pos: u64,
) -> crate::Result<()> {
    let len = crate::iovec::total_len(bufs);
    let avail = below.map_or(0, |b| b.size().saturating_sub(pos).min(len as u64) as usize);
    let mut front = crate::iovec::Front::new(bufs);
    if let (Some(b), true) = (below, avail > 0) {
        b.read_vectored_at(&front.take(avail), pos)?;
    }
    crate::iovec::zero(&front.take(len - avail));
    Ok(())
}

/// The status of guest bytes at `offset` that a layer does not hold (`own`, of the run's
/// length): the layer below's, one deeper, where it reaches; unallocated at this layer
/// past its end or in none.
pub(crate) fn status_below(
    below: Option<&dyn crate::BlockDriver>,
    offset: u64,
    own: crate::BlockStatus,
) -> crate::Result<crate::BlockStatus> {
    match below {
        Some(b) if offset < b.size() => {
            let mut s = b.block_status(offset, own.len.min(b.size() - offset))?;
            s.depth += 1;
            if s.allocation == crate::Allocation::Unallocated {
                s.depth = 0;
            }
            Ok(s)
        }
        _ => Ok(own),
    }
}
