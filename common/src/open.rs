//! Opening an image by name: probe the format, take the lock, follow the backing chain.

use std::path::{Path, PathBuf};

use crate::driver::BlockDriver;
use crate::error::{Error, Result};
use crate::qcow2::Qcow2Image;
use crate::raw::RawImage;

/// Image formats the engine knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// Parse a format name as given to `-f`/`-F`/`format=`.
    pub fn from_name(name: &str) -> Result<Format> {
        match name {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(Error::invalid(format!("Unknown driver '{other}'"))),
        }
    }
}

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open without write access.
    pub read_only: bool,
    /// Take no exclusive lock and tolerate other writers (`-U`).
    pub force_share: bool,
    /// The format, or `None` to probe it.
    pub format: Option<Format>,
    /// Do not open the backing file (qemu-img info does this).
    pub no_backing: bool,
}

/// An open image of any format.
// One `Image` exists per open file, so the size difference of the variants is irrelevant.
#[allow(clippy::large_enum_variant)]
pub enum Image {
    Raw(RawImage),
    Qcow2(Qcow2Image),
}

impl Image {
    /// The image as the common trait.
    pub fn driver(&self) -> &dyn BlockDriver {
        match self {
            Image::Raw(r) => r,
            Image::Qcow2(q) => q,
        }
    }

    /// The image as an owned trait object.
    pub fn into_driver(self) -> Box<dyn BlockDriver> {
        match self {
            Image::Raw(r) => Box::new(r),
            Image::Qcow2(q) => Box::new(q),
        }
    }

    /// Which format the image is.
    pub fn format(&self) -> Format {
        match self {
            Image::Raw(_) => Format::Raw,
            Image::Qcow2(_) => Format::Qcow2,
        }
    }
}

/// Guess the format of a file from its first bytes, like QEMU (qcow2 magic, else raw).
pub fn probe_format(path: &Path) -> Result<Format> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("Could not open '{}'", path.display()), e))?;
    let mut buf = [0u8; 8];
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(Error::io(format!("Could not read '{}'", path.display()), e)),
        }
    }
    Ok(if crate::qcow2::header::probe(&buf[..n]) {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// Open an image by path, probing its format unless `opts.format` says it.
pub fn open_image(path: &Path, opts: &OpenOptions) -> Result<Image> {
    open_in_chain(path, opts, &mut Vec::new())
}

/// Open one layer, remembering the files already in the chain to detect loops.
pub(crate) fn open_in_chain(
    path: &Path,
    opts: &OpenOptions,
    seen: &mut Vec<PathBuf>,
) -> Result<Image> {
    let canonical = std::fs::canonicalize(path)
        .map_err(|e| Error::io(format!("Could not open '{}'", path.display()), e))?;
    if seen.contains(&canonical) {
        return Err(Error::invalid(format!(
            "Backing file '{}' refers to itself (loop in the backing chain)",
            path.display()
        )));
    }
    seen.push(canonical);
    let format = match opts.format {
        Some(f) => f,
        None => probe_format(path)?,
    };
    match format {
        Format::Raw => Ok(Image::Raw(RawImage::open(
            path,
            opts.read_only,
            opts.force_share,
        )?)),
        Format::Qcow2 => Ok(Image::Qcow2(Qcow2Image::open_in_chain(path, opts, seen)?)),
    }
}

/// Resolve a backing file name stored in `overlay` the way QEMU does: absolute names stay,
/// relative names are relative to the overlay's directory.
pub fn resolve_backing_path(overlay: &Path, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    if b.is_absolute() {
        return b.to_path_buf();
    }
    match overlay.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(b),
        _ => b.to_path_buf(),
    }
}
