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
