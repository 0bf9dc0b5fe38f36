//! Format operations beside [`crate::BlockDriver`]: what describes an image's structure
//! rather than moving guest bytes, for every format behind one API.
//! Check/repair and measure live in their own modules.

use crate::backing::BackingRef;
use crate::error::{Error, Result};
use crate::open::Image;

pub use crate::qcow2::amend::AmendOptions;
pub use crate::qcow2::bitmaps::BitmapInfo;
pub use crate::qcow2::snapshot_ops::SnapshotKey;

/// What the format says about an image, for `info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatInfo {
    /// Cluster size, for formats that have clusters.
    pub cluster_size: Option<u64>,
    /// The image was not closed cleanly (qcow2's dirty bit); `None` for a format that
    /// gives no driver information (QEMU's `bdrv_get_info` fails: parallels).
    pub dirty: Option<bool>,
    /// The backing file the image names.
    pub backing: Option<BackingRef>,
    /// The format's own fields (QAPI `ImageInfoSpecific`), for formats that have any.
    pub specific: Option<FormatSpecific>,
}

/// Format-specific information.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatSpecific {
    Qcow2(Qcow2Info),
    Vmdk(crate::vmdk::VmdkInfo),
}

/// qcow2's fields (QAPI `ImageInfoSpecificQCow2`); the optional ones only exist for
/// compat 1.1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Info {
    /// `0.10` or `1.1`.
    pub compat: &'static str,
    /// `zlib` or `zstd`.
    pub compression_type: &'static str,
    pub lazy_refcounts: Option<bool>,
    pub refcount_bits: u32,
    pub corrupt: Option<bool>,
    pub extended_l2: Option<bool>,
    /// External data file name, when the image names one.
    pub data_file: Option<String>,
    /// Whether the external data file is raw, when the image has one.
    pub data_file_raw: Option<bool>,
    /// Persistent dirty bitmaps (empty when there are none).
    pub bitmaps: Vec<BitmapInfo>,
}

/// One internal snapshot, as `info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    /// When it was taken: seconds and nanoseconds since the epoch.
    pub date_sec: u32,
    pub date_nsec: u32,
    /// Guest clock in nanoseconds.
    pub vm_clock_nsec: u64,
    pub icount: Option<u64>,
}

impl Image {
    /// What the format says about the image.
    pub fn info(&self) -> Result<FormatInfo> {
        match self {
            Image::Raw(_) => Ok(FormatInfo {
                cluster_size: None,
                dirty: Some(false),
                backing: None,
                specific: None,
            }),
            Image::Vhdx(v) => Ok(FormatInfo {
                cluster_size: Some(v.block_size()),
                dirty: Some(false),
                backing: None,
                specific: None,
            }),
            Image::Vdi(v) => Ok(FormatInfo {
                cluster_size: Some(v.block_size()),
                dirty: Some(false),
                backing: None,
                specific: None,
            }),
            Image::Vmdk(v) => Ok(FormatInfo {
                cluster_size: v.cluster_size(),
                dirty: Some(false),
                backing: self.backing_ref(),
                specific: Some(FormatSpecific::Vmdk(v.info())),
            }),
            Image::ReadOnly(r) => Ok(FormatInfo {
                cluster_size: r.info_cluster_size(),
                // Both come from QEMU's driver information, which some formats lack.
                dirty: r.info_cluster_size().map(|_| false),
                backing: crate::BlockDriver::backing_ref(r),
                specific: None,
            }),
            Image::Vpc(v) => Ok(FormatInfo {
                cluster_size: v.block_size(),
                dirty: Some(false),
                backing: None,
                specific: None,
            }),
            Image::Qcow2(q) => {
                let h = q.header();
                let v3 = h.version >= 3;
                Ok(FormatInfo {
                    cluster_size: Some(h.cluster_size()),
                    dirty: Some(h.is_dirty()),
                    backing: q.backing_ref(),
                    specific: Some(FormatSpecific::Qcow2(Qcow2Info {
                        compat: h.compat_name(),
                        compression_type: h.compression_type.name(),
                        lazy_refcounts: v3.then(|| h.lazy_refcounts()),
                        refcount_bits: h.refcount_bits(),
                        corrupt: v3.then(|| h.is_corrupt()),
                        extended_l2: v3.then(|| h.extended_l2()),
                        data_file: h.data_file.clone(),
                        data_file_raw: h.has_data_file().then(|| h.data_file_raw()),
                        bitmaps: q.bitmaps()?,
                    })),
                })
            }
        }
    }

    /// The internal snapshots, in table order (none for formats without snapshots).
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let Image::Qcow2(q) = self else {
            return Ok(Vec::new());
        };
        Ok(q.snapshots()?
            .into_iter()
            .map(|s| SnapshotInfo {
                id: s.id,
                name: s.name,
                vm_state_size: s.vm_state_size,
                date_sec: s.date_sec,
                date_nsec: s.date_nsec,
                vm_clock_nsec: s.vm_clock_nsec,
                icount: s.icount,
            })
            .collect())
    }

    /// Take an internal snapshot named `name` of the image as it is now.
    pub fn snapshot_create(&self, name: &str) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.snapshot_create(name),
            Image::Raw(_)
            | Image::Vpc(_)
            | Image::Vdi(_)
            | Image::Vmdk(_)
            | Image::Vhdx(_)
            | Image::ReadOnly(_) => Err(Error::Unsupported("Operation not supported".into())),
        }
    }

    /// Revert the image to the snapshot whose ID, or else name, is `key`.
    pub fn snapshot_apply(&self, key: &str) -> Result<()> {
        match self {
            // QEMU refuses to revert an image that has persistent bitmaps.
            Image::Qcow2(q) if !q.bitmaps()?.is_empty() => {
                Err(Error::Unsupported("Device has active dirty bitmaps".into()))
            }
            Image::Qcow2(q) => q.snapshot_apply(key),
            Image::Raw(_)
            | Image::Vpc(_)
            | Image::Vdi(_)
            | Image::Vmdk(_)
            | Image::Vhdx(_)
            | Image::ReadOnly(_) => Err(Error::Unsupported(
                "Block driver does not support snapshots".into(),
            )),
        }
    }

    /// Read the image as its internal snapshot `key` from now on (`convert -l`); the
    /// image must be open read-only.
    pub fn load_snapshot(&self, key: &SnapshotKey) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.load_snapshot(key),
            Image::Raw(_)
            | Image::Vpc(_)
            | Image::Vdi(_)
            | Image::Vmdk(_)
            | Image::Vhdx(_)
            | Image::ReadOnly(_) => Err(Error::Unsupported(format!(
                "Block format '{}' used by device '' does not support temporarily loading \
                 internal snapshots",
                self.format().name()
            ))),
        }
    }

    /// Delete the first snapshot named `name` (qemu-img deletes by name only).
    pub fn snapshot_delete(&self, name: &str) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.snapshot_delete(name),
            Image::Raw(_)
            | Image::Vpc(_)
            | Image::Vdi(_)
            | Image::Vmdk(_)
            | Image::Vhdx(_)
            | Image::ReadOnly(_) => Err(Error::NotFound("snapshot not found".into())),
        }
    }

    /// Change the virtual size to `size` (`qemu-img resize`), preallocating an added area
    /// per `mode`; shrinking frees what lies past the new end.
    pub fn resize(&self, size: u64, mode: crate::prealloc::Preallocation) -> Result<()> {
        match self {
            Image::Raw(r) => r.resize(size, mode),
            Image::Vpc(_)
            | Image::Vdi(_)
            | Image::Vmdk(_)
            | Image::Vhdx(_)
            | Image::ReadOnly(_) => Err(Error::Unsupported(
                "Image format driver does not support resize".into(),
            )),
            Image::Qcow2(q) => q.resize(size, mode),
        }
    }

    /// Change the format's options in place (`qemu-img amend`); `progress` hears the
    /// share done, 0 to 100.
    pub fn amend(&self, opts: &AmendOptions, progress: &mut dyn FnMut(f64)) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.amend(opts, progress),
            Image::Raw(_)
            | Image::Vpc(_)
            | Image::Vdi(_)
            | Image::Vmdk(_)
            | Image::Vhdx(_)
            | Image::ReadOnly(_) => Err(Error::Unsupported(format!(
                "Format driver '{}' does not support option amendment",
                self.format().name()
            ))),
        }
    }

    /// Drop everything the image itself maps, durably, so that it reads as its backing
    /// file (QEMU's `make_empty`, which `commit` applies to the overlay it committed).
    pub fn make_empty(&self) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.make_empty(),
            Image::Raw(_)
            | Image::Vpc(_)
            | Image::Vdi(_)
            | Image::Vmdk(_)
            | Image::Vhdx(_)
            | Image::ReadOnly(_) => Err(Error::Unsupported("Operation not supported".into())),
        }
    }

    /// Name `backing` (name and format as they are to be stored, not resolved) as the
    /// image's backing file, or none; every other header field and extension is kept.
    /// Everything written before is made durable first. The layer attached below in memory
    /// stays until the image is opened again.
    pub fn change_backing_file(&self, backing: Option<&BackingRef>) -> Result<()> {
        if backing.is_some_and(|b| b.name.is_empty()) {
            return Err(Error::invalid("Invalid argument"));
        }
        match self {
            Image::Qcow2(q) => q.change_backing_file(backing),
            Image::Raw(_)
            | Image::Vpc(_)
            | Image::Vdi(_)
            | Image::Vmdk(_)
            | Image::Vhdx(_)
            | Image::ReadOnly(_) => Err(Error::Unsupported("Operation not supported".into())),
        }
    }

    /// Length in bytes of the file under the format (a device's size for a device).
    pub fn file_length(&self) -> Result<u64> {
        let storage = match self {
            Image::Raw(r) => r.storage(),
            Image::Vpc(v) => v.storage(),
            Image::Vdi(v) => v.storage(),
            Image::ReadOnly(r) => r.storage(),
            Image::Vmdk(v) => v.storage(),
            Image::Vhdx(v) => v.storage(),
            Image::Qcow2(q) => q.storage(),
        };
        storage
            .len()
            .map_err(|e| Error::io("Could not get the file length".to_string(), e))
    }

    /// Write one guest cluster compressed (`offset` cluster aligned, `data` a whole cluster
    /// or the image's last partial one); a cluster that does not shrink is stored plainly.
    pub fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.write_compressed(offset, data),
            Image::Vmdk(v) => v.write_compressed(offset, data, None),
            Image::Raw(_) | Image::Vpc(_) | Image::Vdi(_) | Image::Vhdx(_) | Image::ReadOnly(_) => {
                Err(Error::Unsupported(
                    "Compression not supported for this file format".into(),
                ))
            }
        }
    }
}

/// One change [`Image::bitmap_edit`] makes to a persistent dirty bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapOp {
    /// Create it, enabled, with this granularity (the format's default when `None`).
    Add {
        granularity: Option<u32>,
    },
    Remove,
    /// Unset every bit.
    Clear,
    /// Record future writes.
    Enable,
    /// Stop recording writes.
    Disable,
    /// Set the bits that bitmap `source` has set.
    Merge {
        source: String,
    },
}

/// Why a `Merge` between bitmaps of disks of `dst` and `src` bytes fails when the two
/// differ (QEMU's words): callers that must know before editing, as `convert --bitmaps`,
/// report it too.
pub fn bitmap_sizes_differ(dst: u64, src: u64) -> Error {
    Error::invalid(format!(
        "Bitmaps are of different sizes (destination size is {dst}, source size is {src}) \
         and can't be merged"
    ))
}

/// The operations [`Image::bitmap_edits`] applies to one bitmap.
#[derive(Debug, Clone, Copy)]
pub struct BitmapEdit<'a> {
    pub name: &'a str,
    pub ops: &'a [BitmapOp],
}

/// A failed [`Image::bitmap_edits`]: the index of the edit and of its operation that
/// failed, or `op: None` when storing the result failed.
#[derive(Debug)]
pub struct BitmapOpError {
    pub edit: usize,
    pub op: Option<usize>,
    pub error: Error,
}

impl Image {
    /// Whether the image can hold persistent dirty bitmaps: qcow2 version 3 only, as in
    /// QEMU (`bdrv_supports_persistent_dirty_bitmap`).
    pub fn supports_persistent_bitmaps(&self) -> bool {
        matches!(self, Image::Qcow2(q) if q.header().version >= 3)
    }

    /// Apply `ops` in order to bitmap `name` and store the result; operations before a
    /// failed one stay done, as in qemu-img. `Merge` reads its source bitmap from
    /// `source`, or from this image when `None`. `node` names the image in QEMU's
    /// messages (qemu-img names its nodes `#blockNNN`).
    pub fn bitmap_edit(
        &self,
        node: &str,
        name: &str,
        ops: &[BitmapOp],
        source: Option<&Image>,
    ) -> std::result::Result<(), BitmapOpError> {
        self.bitmap_edits(node, &[BitmapEdit { name, ops }], source)
    }

    /// [`Image::bitmap_edit`] for several bitmaps, edited in order and stored once (as
    /// QEMU stores all its bitmaps when it closes the image).
    pub fn bitmap_edits(
        &self,
        node: &str,
        edits: &[BitmapEdit<'_>],
        source: Option<&Image>,
    ) -> std::result::Result<(), BitmapOpError> {
        use crate::qcow2::BitmapSource;
        let src = match source {
            None => BitmapSource::This,
            Some(Image::Qcow2(q)) => BitmapSource::Other {
                storage: q.storage(),
                header: Box::new(q.header()),
            },
            Some(
                Image::Raw(_)
                | Image::Vpc(_)
                | Image::Vdi(_)
                | Image::Vmdk(_)
                | Image::Vhdx(_)
                | Image::ReadOnly(_),
            ) => BitmapSource::NoBitmaps,
        };
        match self {
            Image::Qcow2(q) => q.bitmap_edits(node, edits, &src),
            Image::Raw(_)
            | Image::Vpc(_)
            | Image::Vdi(_)
            | Image::Vmdk(_)
            | Image::Vhdx(_)
            | Image::ReadOnly(_) => {
                // Raw images hold no bitmaps and can store none.
                let Some(first) = edits.first() else {
                    return Ok(());
                };
                let error = match first.ops.first() {
                    Some(BitmapOp::Add { .. }) => Error::Unsupported(format!(
                        "Can't store persistent bitmaps to {node}: Operation not supported"
                    )),
                    _ => Error::NotFound(format!("Dirty bitmap '{}' not found", first.name)),
                };
                Err(BitmapOpError {
                    edit: 0,
                    op: Some(0),
                    error,
                })
            }
        }
    }
}

/// Something QEMU warns about when it opens an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenWarning {
    /// A program without bitmap support wrote the image: its persistent bitmaps are
    /// ignored (and dropped by a read-write open), their clusters may be leaked. `v2` for
    /// a compat 0.10 image, which QEMU words differently.
    StaleBitmaps { v2: bool },
}

impl Image {
    /// What QEMU would warn about the image when opening it.
    pub fn open_warnings(&self) -> Vec<OpenWarning> {
        match self {
            Image::Qcow2(q) if q.had_stale_bitmaps() => vec![OpenWarning::StaleBitmaps {
                v2: q.header().version < 3,
            }],
            _ => Vec::new(),
        }
    }
}

/// One cluster compressed for an image by [`Image::compress_cluster`], to be written by
/// [`Image::write_compressed_prepared`]; compressing apart from writing lets callers
/// compress on many threads and still write in guest order.
#[derive(Debug)]
pub struct CompressedCluster(Option<Vec<u8>>);

impl Image {
    /// Compress `data` (at most one cluster) as [`Image::write_compressed`] would, without
    /// writing it or holding any lock.
    pub fn compress_cluster(&self, data: &[u8]) -> Result<CompressedCluster> {
        match self {
            Image::Qcow2(q) => Ok(CompressedCluster(q.compress_cluster(data)?)),
            Image::Vmdk(v) if v.needs_compressed_writes() => {
                Ok(CompressedCluster(Some(v.compress_grain(data)?)))
            }
            Image::Vmdk(_) => Ok(CompressedCluster(None)),
            Image::Raw(_) | Image::Vpc(_) | Image::Vdi(_) | Image::Vhdx(_) | Image::ReadOnly(_) => {
                Err(Error::Unsupported(
                    "Compression not supported for this file format".into(),
                ))
            }
        }
    }

    /// Write `data` at `offset` (the rules of [`Image::write_compressed`]) as `c`, which
    /// [`Image::compress_cluster`] made from this `data`.
    pub fn write_compressed_prepared(
        &self,
        offset: u64,
        data: &[u8],
        c: &CompressedCluster,
    ) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.write_packed(offset, data, c.0.as_deref()),
            Image::Vmdk(v) => v.write_compressed(offset, data, c.0.as_deref()),
            Image::Raw(_) | Image::Vpc(_) | Image::Vdi(_) | Image::Vhdx(_) | Image::ReadOnly(_) => {
                Err(Error::Unsupported(
                    "Compression not supported for this file format".into(),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::open::{open_image, OpenOptions};

    /// Compressed writes go to the format that has them; raw refuses with qemu-img's words.
    #[test]
    fn compressed_writes_dispatch_by_format() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![0x61u8; 65536];
        for (fmt, ok) in [("qcow2", true), ("raw", false)] {
            let p = dir.path().join(format!("c.{fmt}"));
            crate::test_tools::qemu_ok(
                "qemu-img",
                &["create", "-q", "-f", fmt, p.to_str().unwrap(), "1M"],
            );
            let img = crate::lock::retry_while_locked(|| open_image(&p, &OpenOptions::default()))
                .unwrap();
            match img.write_compressed(65536, &data) {
                Ok(()) => assert!(ok),
                Err(e) => {
                    assert!(!ok, "{e}");
                    assert_eq!(
                        e.to_string(),
                        "Compression not supported for this file format"
                    );
                }
            }
            let mut back = vec![0u8; 65536];
            img.driver().read_at(&mut back, 65536).unwrap();
            assert_eq!(back == data, ok);
        }
    }
}
