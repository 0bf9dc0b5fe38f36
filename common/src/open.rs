//! Opening an image by name, with its whole backing chain. The chain is built here, not
//! by the formats: for every layer, open its file and take QEMU's locks, probe its format,
//! read the backing reference the format stores, resolve it as QEMU does, refuse loops and
//! decide read-only or read-write; then hand each layer the opened layer below it. A name
//! that is an NBD URI (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`) is
//! opened on [`NbdStorage`](crate::nbd::storage::NbdStorage) instead of a file (no lock:
//! the server holds it).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backing::{resolve_backing_path, BackingRef};
use crate::driver::BlockDriver;
use crate::error::{Error, Result};
pub use crate::format::Format;
use crate::qcow2::Qcow2Image;
use crate::raw::RawImage;
use crate::readonly::ReadOnlyImage;
use crate::vdi::VdiImage;
use crate::vhdx::VhdxImage;
use crate::vmdk::VmdkImage;
use crate::vpc::VpcImage;

/// The most backing files a chain may have below the image. A read recurses once per layer
/// it falls through, so the depth bounds the stack a reading thread needs: QEMU has no such
/// bound and overflows its stack on a chain of 1000 (qemu-img 10.0.2 segfaults); past this
/// one the chain is refused with an error.
pub const MAX_CHAIN_DEPTH: usize = 1024;

/// The stack of a thread that reads or writes images (convert's workers, serve's clients,
/// vmm's block worker): the main thread's default, which a read through
/// [`MAX_CHAIN_DEPTH`] layers fits in with room to spare (a debug build needs under 4 MiB).
pub const IO_THREAD_STACK: usize = 8 << 20;

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open the image itself (depth 0) without write access.
    pub read_only: bool,
    /// Take no exclusive lock and tolerate other writers (`-U`); read-only layers only.
    pub force_share: bool,
    /// The format, or `None` to probe it.
    pub format: Option<Format>,
    /// Do not open the backing file (qemu-img info does this).
    pub no_backing: bool,
    /// Bypass the host page cache (O_DIRECT), for the whole chain: QEMU's `cache=none`.
    pub direct: bool,
    /// The depth of one lower layer to open read-write too (1 is the backing file, 2 its
    /// backing file, ...), as `qemu-img commit` needs for its base. Every other lower layer
    /// is read-only.
    pub writable_backing: Option<u32>,
    /// Ignore flushes for the whole chain (QEMU's `cache=unsafe`, `qemu-img convert`'s
    /// default for its target): faster, and nothing is durable until the kernel writes it.
    pub no_flush: bool,
    /// Open for `check` (QEMU's BDRV_O_CHECK): a dirty image is not repaired on open,
    /// and a corrupt one may be opened read-write to be repaired.
    pub check: bool,
    /// Open the image itself (depth 0) for its metadata only, as QEMU opens it for `info`
    /// (BDRV_O_NO_IO): an AES-encrypted qcow image then opens without its key, its data
    /// unreadable; otherwise it is refused.
    pub metadata_only: bool,
    /// How a `json:{...}` backing file name is read; without it such a name is taken as
    /// a file name (and is not found).
    pub json_names: Option<JsonNames>,
}

/// Reads the object of a `json:{...}` backing file name (the text after `json:`) with the
/// format the overlay records, if any, into the layer it names. The error is the text
/// after "Could not open backing file: ".
pub type JsonNames = fn(&str, Option<&str>) -> std::result::Result<JsonBacking, String>;

/// The layer a `json:{...}` backing file name names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonBacking {
    /// The file name or NBD URI, as given: a relative name is not resolved against the
    /// overlay (QEMU takes it from the working directory).
    pub name: String,
    /// Its format: the one the overlay records wins over the object's driver, as in QEMU;
    /// `None` probes it.
    pub format: Option<Format>,
    /// `"backing": null`: the chain ends with this layer.
    pub no_backing: bool,
}

/// An open image of any format, with its backing chain attached.
// One `Image` exists per open file, so the size difference of the variants is irrelevant.
#[allow(clippy::large_enum_variant)]
pub enum Image {
    Raw(RawImage),
    Qcow2(Qcow2Image),
    Vpc(VpcImage),
    Vdi(VdiImage),
    Vmdk(VmdkImage),
    Vhdx(VhdxImage),
    /// qed, qcow (version 1), parallels: read only.
    ReadOnly(ReadOnlyImage),
}

impl Image {
    /// The image as the common trait.
    pub fn driver(&self) -> &dyn BlockDriver {
        match self {
            Image::Raw(r) => r,
            Image::Qcow2(q) => q,
            Image::Vpc(v) => v,
            Image::Vdi(v) => v,
            Image::Vmdk(v) => v,
            Image::Vhdx(v) => v,
            Image::ReadOnly(r) => r,
        }
    }

    /// The image as an owned trait object.
    pub fn into_driver(self) -> Box<dyn BlockDriver> {
        match self {
            Image::Raw(r) => Box::new(r),
            Image::Qcow2(q) => Box::new(q),
            Image::Vpc(v) => Box::new(v),
            Image::Vdi(v) => Box::new(v),
            Image::Vmdk(v) => Box::new(v),
            Image::Vhdx(v) => Box::new(v),
            Image::ReadOnly(r) => Box::new(r),
        }
    }

    /// Check the image's consistency, repairing what `fix` allows.
    pub fn check(&self, fix: crate::check::Fix) -> Result<crate::check::CheckReport> {
        match self {
            Image::Raw(_) | Image::Vpc(_) => Err(Error::Unsupported("checks".into())),
            Image::Qcow2(q) => Ok(q.check(fix)),
            // QEMU's vdi check repairs nothing, and says so for any repair mode.
            Image::Vdi(_) if fix.any() => Err(Error::Unsupported("checks".into())),
            Image::Vdi(v) => Ok(v.check()),
            // QEMU's vmdk check repairs nothing either.
            Image::Vmdk(_) if fix.any() => Err(Error::Unsupported("checks".into())),
            Image::Vmdk(v) => Ok(v.check()),
            Image::Vhdx(v) => v.check(),
            Image::ReadOnly(r) => r.check(fix),
        }
    }

    /// Which format the image is.
    pub fn format(&self) -> Format {
        match self {
            Image::Raw(_) => Format::Raw,
            Image::Qcow2(_) => Format::Qcow2,
            Image::Vpc(_) => Format::Vpc,
            Image::Vdi(_) => Format::Vdi,
            Image::Vmdk(_) => Format::Vmdk,
            Image::Vhdx(_) => Format::Vhdx,
            Image::ReadOnly(r) => r.format(),
        }
    }

    /// Whether the image's data is encrypted (opened for its metadata only, unreadable).
    pub fn encrypted(&self) -> bool {
        matches!(self, Image::ReadOnly(r) if r.encrypted())
    }

    /// The layer at `depth` of the chain: 0 is the image itself, 1 its backing file, ...
    pub fn layer(&self, depth: u32) -> Option<&dyn BlockDriver> {
        let mut layer = self.driver();
        for _ in 0..depth {
            layer = layer.backing()?;
        }
        Some(layer)
    }

    /// The backing file this layer names, as stored.
    pub(crate) fn backing_ref(&self) -> Option<BackingRef> {
        match self {
            Image::Raw(_) | Image::Vpc(_) | Image::Vdi(_) | Image::Vhdx(_) => None,
            Image::Qcow2(q) => q.backing_ref(),
            Image::Vmdk(v) => BlockDriver::backing_ref(v),
            Image::ReadOnly(r) => r.backing_ref(),
        }
    }

    /// Attach the opened layer below. Only formats that name a backing file get one.
    fn set_backing(&mut self, below: Image) {
        match self {
            Image::Qcow2(q) => q.set_backing(below.into_driver()),
            Image::Vmdk(v) => {
                let cid = match &below {
                    Image::Vmdk(p) => Some(p.cid()),
                    _ => None,
                };
                v.set_backing(below.into_driver(), cid);
            }
            Image::ReadOnly(r) => r.set_backing(below.into_driver()),
            _ => {}
        }
    }
}

/// Open an image by path, probing its format unless `opts.format` says it, and its backing
/// chain unless `opts.no_backing`.
pub fn open_image(path: &Path, opts: &OpenOptions) -> Result<Image> {
    let mut chain = Chain::default();
    let top = chain.open_layer(path, opts.format, opts.read_only, true, opts)?;
    chain.attach_below(top, path, opts)
}

/// The canonical paths of the layers opened so far, to detect loops.
#[derive(Default)]
pub(crate) struct Chain {
    seen: Vec<PathBuf>,
}

impl Chain {
    /// A chain whose top layer, at `path`, is already open (a new image, say).
    pub(crate) fn starting_at(path: &Path) -> Result<Chain> {
        Ok(Chain {
            seen: vec![canonical(path)?],
        })
    }

    /// Open one layer: its file, its lock, its format (probed when `format` is `None`);
    /// `top`: the image itself (depth 0).
    fn open_layer(
        &mut self,
        path: &Path,
        format: Option<Format>,
        read_only: bool,
        top: bool,
        opts: &OpenOptions,
    ) -> Result<Image> {
        if let Some(name) = path.to_str().filter(|n| crate::nbd::uri::is_nbd_uri(n)) {
            let storage = crate::nbd::storage::NbdStorage::connect(&crate::nbd::uri::parse(name)?)?;
            let read_only = read_only || storage.read_only();
            return image_on(storage, format, read_only, top, (path, opts));
        }
        let canonical = canonical(path)?;
        if self.seen.contains(&canonical) {
            return Err(Error::BackingLoop(format!(
                "Backing file '{}' refers to itself (loop in the backing chain)",
                path.display()
            )));
        }
        self.seen.push(canonical);
        // Never blocks on a FIFO; refuses anything but a regular file or a block device.
        let mut storage = crate::storage::open_image_storage(path, read_only, opts.direct)?;
        if opts.no_flush {
            storage = storage.ignoring_flushes();
        }
        crate::lock::lock_image(storage.file(), path, read_only, opts.force_share)?;
        image_on(storage, format, read_only, top, (path, opts))
    }

    /// Open every layer below `top` (which was opened from `path`) and attach each to the
    /// one above it. Errors of a layer at depth N read "Could not open backing file: "
    /// N times before its own message, as QEMU's do, and keep their kind.
    pub(crate) fn attach_below(
        &mut self,
        top: Image,
        path: &Path,
        opts: &OpenOptions,
    ) -> Result<Image> {
        let mut layers = vec![top];
        let mut path = path.to_path_buf();
        // A layer named by a `json:` name with `"backing": null` ends the chain.
        let mut last = false;
        while let Some(r) = layers.last().and_then(Image::backing_ref) {
            if opts.no_backing || last {
                break;
            }
            let depth = layers.len() as u32;
            if layers.len() > MAX_CHAIN_DEPTH {
                return Err(Error::invalid(format!(
                    "Backing chain too deep: more than {MAX_CHAIN_DEPTH} backing files"
                )));
            }
            let (below, format) = match (r.name.strip_prefix("json:"), opts.json_names) {
                (Some(json), Some(read)) => match read(json, r.format.as_deref()) {
                    Ok(named) => {
                        last = named.no_backing;
                        (PathBuf::from(named.name), Ok(named.format))
                    }
                    Err(m) => (PathBuf::new(), Err(Error::invalid(m))),
                },
                _ => (
                    resolve_backing_path(&path, &r.name),
                    r.format.as_deref().map(Format::from_name).transpose(),
                ),
            };
            let layer = format
                .and_then(|format| {
                    let read_only = opts.writable_backing != Some(depth);
                    self.open_layer(&below, format, read_only, false, opts)
                })
                .map_err(|e| {
                    // Like QEMU, which prepends this once per layer it recursed through.
                    (0..depth).fold(e, |e, _| e.context("Could not open backing file"))
                })?;
            layers.push(layer);
            path = below;
        }
        if let Some(d) = opts.writable_backing {
            if d == 0 || d as usize >= layers.len() {
                return Err(Error::invalid(format!(
                    "The backing chain has no layer at depth {d}"
                )));
            }
        }
        let mut image = layers.pop().expect("the chain has its top layer");
        while let Some(mut above) = layers.pop() {
            above.set_backing(image);
            image = above;
        }
        Ok(image)
    }
}

/// The image of `format` (probed when `None`) on `storage`, opened from `path` with
/// `opts` (which a vmdk's extent files are opened with too); `opts.check` and
/// `opts.metadata_only` apply to the `top` layer only.
fn image_on<S: crate::storage::Storage + 'static>(
    storage: S,
    format: Option<Format>,
    read_only: bool,
    top: bool,
    (path, opts): (&Path, &OpenOptions),
) -> Result<Image> {
    let check = top && opts.check;
    let metadata_only = top && opts.metadata_only;
    let probed = format.is_none();
    let format = match format {
        Some(f) => f,
        None => crate::probe::probe_storage(&storage)
            .map_err(|e| Error::io("Could not read image for determining its format", e))?,
    };
    Ok(match format {
        Format::Raw => {
            let mut raw = RawImage::from_storage(Box::new(storage), read_only)?;
            if probed {
                // Like QEMU: a guest must not turn a probed raw image into another format.
                raw.set_probed();
            }
            Image::Raw(raw)
        }
        Format::Qcow2 => Image::Qcow2(Qcow2Image::open_for(Arc::new(storage), read_only, check)?),
        Format::Vpc => Image::Vpc(
            VpcImage::open(Box::new(storage), read_only).map_err(|e| name_bare_errno(e, path))?,
        ),
        Format::Vdi => Image::Vdi(VdiImage::open(Box::new(storage), read_only)?),
        Format::Vhdx => Image::Vhdx(
            VhdxImage::open(Box::new(storage), &path.to_string_lossy(), read_only, check)
                .map_err(|e| name_bare_errno(e, path))?,
        ),
        Format::Vmdk => {
            let open_extent = |p: &Path| -> Result<Box<dyn crate::storage::Storage>> {
                let mut s = crate::storage::open_image_storage(p, read_only, opts.direct)?;
                if opts.no_flush {
                    s = s.ignoring_flushes();
                }
                crate::lock::lock_image(s.file(), p, read_only, opts.force_share)?;
                Ok(Box::new(s))
            };
            let name = path.to_string_lossy();
            Image::Vmdk(
                VmdkImage::open(Box::new(storage), &name, read_only, &open_extent)
                    .map_err(|e| name_bare_errno(e, path))?,
            )
        }
        Format::Qed | Format::Qcow | Format::Parallels => {
            let opened = crate::readonly::open(format, &storage, metadata_only)
                .map_err(|e| name_bare_errno(e, path))?;
            Image::ReadOnly(ReadOnlyImage::new(
                Box::new(storage),
                opened,
                read_only,
                check,
            )?)
        }
    })
}

/// An I/O error a format gave without words (QEMU's bare errno from a driver's open) as
/// QEMU's block layer words it: "Could not open 'PATH': <strerror>".
fn name_bare_errno(e: Error, path: &Path) -> Error {
    match e {
        Error::Io { context, source } if context.is_empty() => {
            Error::io(format!("Could not open '{}'", path.display()), source)
        }
        e => e,
    }
}

/// The path with every symbolic link resolved, so that two names of one file compare equal.
fn canonical(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path)
        .map_err(|e| Error::io(format!("Could not open '{}'", path.display()), e))
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
        let e = crate::probe::probe_file(&f).unwrap_err();
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
        assert_eq!(crate::probe::probe_file(&p).unwrap(), Format::Raw);

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
        assert_eq!(crate::probe::probe_file(&p).unwrap(), Format::Qcow2);
    }
}
