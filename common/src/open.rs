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
    /// Bypass the host page cache (O_DIRECT), for the whole chain: QEMU's `cache=none`.
    pub direct: bool,
    /// Open for `check` (QEMU's BDRV_O_CHECK): a dirty image is not repaired on open,
    /// and a corrupt one may be opened read-write to be repaired.
    pub check: bool,
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

    /// Check the image's consistency, repairing what `fix` allows.
    pub fn check(&self, fix: crate::check::Fix) -> Result<crate::check::CheckReport> {
        match self {
            Image::Raw(_) => Err(Error::Unsupported("checks".into())),
            Image::Qcow2(q) => Ok(q.check(fix)),
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
    let mut f = crate::storage::open_image_file(path, true)?;
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
        Format::Raw => {
            let mut raw = RawImage::open_with(path, opts.read_only, opts.force_share, opts.direct)?;
            if opts.format.is_none() {
                // Like QEMU: a guest must not turn a probed raw image into another format.
                raw.set_probed();
            }
            Ok(Image::Raw(raw))
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::create::{create_qcow2, Qcow2CreateOptions};

    fn mkfifo(p: &Path) {
        assert!(std::process::Command::new("mkfifo")
            .arg(p)
            .status()
            .unwrap()
            .success());
    }

    fn qcow2_start() -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h
    }

    #[test]
    fn fifo_image_fails_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.fifo");
        mkfifo(&f);
        let e = probe_format(&f).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "'file' driver requires '{}' to be a regular file",
                f.display()
            )
        );
        for format in [None, Some(Format::Raw), Some(Format::Qcow2)] {
            for read_only in [true, false] {
                let opts = OpenOptions {
                    read_only,
                    format,
                    ..Default::default()
                };
                let e = open_image(&f, &opts).err().expect("a FIFO must not open");
                let s = e.to_string();
                assert!(s.contains("to be a regular file"), "{s}");
                assert!(!s.contains('\n'), "{s:?}");
            }
        }
    }

    #[test]
    fn fifo_backing_file_fails_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path().join("b.raw");
        let t = dir.path().join("t.qcow2");
        for backing_format in [Some("raw"), None] {
            let _ = std::fs::remove_file(&b);
            std::fs::write(&b, vec![0u8; 1 << 20]).unwrap();
            crate::lock::retry_while_locked(|| {
                create_qcow2(
                    &t,
                    &Qcow2CreateOptions {
                        size: 4 << 20,
                        backing_file: Some("b.raw".into()),
                        backing_format: backing_format.map(String::from),
                        ..Default::default()
                    },
                )
            })
            .unwrap();
            std::fs::remove_file(&b).unwrap();
            mkfifo(&b);
            for read_only in [true, false] {
                let opts = OpenOptions {
                    read_only,
                    ..Default::default()
                };
                // Retried like the create: another test thread's child may briefly hold
                // a copy of the descriptor the create just closed, and its lock.
                let e = crate::lock::retry_while_locked(|| open_image(&t, &opts))
                    .err()
                    .expect("a FIFO backing file");
                let s = e.to_string();
                assert!(s.contains("to be a regular file"), "{s}");
                assert!(!s.contains('\n'), "{s:?}");
            }
        }
    }

    #[test]
    fn probed_raw_refuses_a_qcow2_header_in_sector0() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.img");
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();

        // Probed: refused, and the file still probes as raw.
        let img =
            crate::lock::retry_while_locked(|| open_image(&p, &OpenOptions::default())).unwrap();
        let Image::Raw(raw) = &img else {
            panic!("zeroes probe as raw")
        };
        assert!(raw.is_probed());
        let e = img.driver().write_at(&qcow2_start(), 0).unwrap_err();
        assert!(e.to_string().contains("Operation not permitted"), "{e}");
        img.driver().write_at(&[0xeeu8; 512], 0).unwrap();
        drop(img);
        assert_eq!(probe_format(&p).unwrap(), Format::Raw);

        // Format given: the guest may write whatever it likes, as in QEMU.
        let opts = OpenOptions {
            format: Some(Format::Raw),
            ..Default::default()
        };
        let img = crate::lock::retry_while_locked(|| open_image(&p, &opts)).unwrap();
        let Image::Raw(raw) = &img else {
            panic!("raw was asked for")
        };
        assert!(!raw.is_probed());
        img.driver().write_at(&qcow2_start(), 0).unwrap();
        drop(img);
        assert_eq!(probe_format(&p).unwrap(), Format::Qcow2);
    }
}
