//! Creating a new qcow2 image: layout of header, refcount structures and L1 table.

use std::path::Path;
use std::sync::Arc;

use super::header::{
    CompressionType, Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2,
    MAX_L1_BYTES, V2_HEADER_LEN, V3_HEADER_LEN,
};
use super::meta::Meta;
use super::refcount;
use crate::error::{io, Error, Result};
use crate::lock;
use crate::storage::{FileStorage, Storage};

pub use crate::prealloc::Preallocation;

/// Options of `qemu-img create -f qcow2`, with qemu-img's defaults.
#[derive(Debug, Clone)]
pub struct Qcow2CreateOptions {
    /// Virtual size in bytes (a multiple of 512, as qemu-img rounds it).
    pub size: u64,
    /// 2 for compat=0.10, 3 for compat=1.1.
    pub version: u32,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    pub lazy_refcounts: bool,
    pub extended_l2: bool,
    pub compression_type: CompressionType,
    pub preallocation: Preallocation,
    /// Backing file name, stored as given.
    pub backing_file: Option<String>,
    /// Backing format name stored in the backing-format extension.
    pub backing_format: Option<String>,
}

impl Default for Qcow2CreateOptions {
    fn default() -> Self {
        Qcow2CreateOptions {
            size: 0,
            version: 3,
            cluster_size: 65536,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression_type: CompressionType::Zlib,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
        }
    }
}

impl Qcow2CreateOptions {
    /// Check the options the way qemu-img does, in its order and with its messages.
    pub fn validate(&self) -> Result<()> {
        if self.version != 2 && self.version != 3 {
            return Err(Error::invalid(format!(
                "Invalid compat version {}",
                self.version
            )));
        }
        let v2 = self.version == 2;
        let v3_only = |what: &str| {
            Err(Error::invalid(format!(
                "{what} only supported with compatibility level 1.1 and above (use version=v3 or greater)"
            )))
        };
        if self.extended_l2 && v2 {
            return v3_only("Extended L2 entries are");
        }
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(Error::invalid(
                "Cluster size must be a power of two between 512 and 2048k",
            ));
        }
        if self.extended_l2 && cs < 16384 {
            return Err(Error::invalid(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
            return Err(Error::invalid(
                "Backing file and preallocation can only be used at the same time if extended_l2 is on",
            ));
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return Err(Error::invalid(
                "Backing format cannot be used without backing file",
            ));
        }
        if self.lazy_refcounts && v2 {
            return v3_only("Lazy refcounts");
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(Error::invalid(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if v2 && self.refcount_bits != 16 {
            return Err(Error::invalid("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"));
        }
        if v2 && self.compression_type != CompressionType::Zlib {
            return v3_only("Non-zlib compression type is");
        }
        if self.size > i64::MAX as u64 {
            return Err(Error::invalid(
                "Could not resize image: Image size cannot be negative",
            ));
        }
        // The size as it will be created: in whole 512-byte sectors.
        let size = self.size.next_multiple_of(512);
        if self.header().geometry().l1_entries_for(size) * 8 > MAX_L1_BYTES {
            return Err(Error::invalid(
                "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
            ));
        }
        Ok(())
    }

    fn header(&self) -> Header {
        let mut incompat = 0;
        if self.extended_l2 {
            incompat |= INCOMPAT_EXTL2;
        }
        if self.compression_type == CompressionType::Zstd {
            incompat |= INCOMPAT_COMPRESSION;
        }
        let cs = self.cluster_size;
        Header {
            version: self.version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: cs.trailing_zeros(),
            size: 0,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: cs,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: incompat,
            compatible_features: if self.lazy_refcounts {
                COMPAT_LAZY_REFCOUNTS
            } else {
                0
            },
            autoclear_features: 0,
            refcount_order: self.refcount_bits.trailing_zeros(),
            header_length: if self.version == 2 {
                V2_HEADER_LEN
            } else {
                V3_HEADER_LEN
            },
            compression_type: self.compression_type,
            backing_file: self.backing_file.clone(),
            backing_format: self.backing_format.clone(),
            data_file: None,
            feature_names: Vec::new(),
            other_extensions: Vec::new(),
        }
    }
}

/// Create (or overwrite) a qcow2 image at `path`.
pub fn create_qcow2(path: &Path, opts: &Qcow2CreateOptions) -> Result<()> {
    opts.validate()?;
    let file = create_file(path)?;
    format_qcow2(Arc::new(FileStorage::new(file)), opts)
}

/// Open (creating it if needed) and lock a file for a new image, truncate it, and take the
/// read-write locks of an open image on it. Like qemu-img, which formats a qcow2 image
/// through a read-write open of the new file: if another process still writes the file,
/// the create fails and the (already truncated) file is removed.
pub(crate) fn create_file(path: &Path) -> Result<std::fs::File> {
    let file = crate::storage::open_new_image_file(path)?;
    // Like QEMU: a device keeps its size (truncating it to zero is a no-op there).
    let device = file
        .metadata()
        .is_ok_and(|m| crate::storage::is_device(&m.file_type()));
    if !device {
        file.set_len(0)
            .map_err(|e| Error::io("Could not resize file".to_string(), e))?;
    }
    if let Err(e) = lock::relock_image(&file, path, lock::Perms::CREATE, lock::Perms::READ_WRITE) {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(file)
}

/// Write a new qcow2 image onto empty storage.
pub fn format_qcow2(storage: Arc<dyn Storage>, opts: &Qcow2CreateOptions) -> Result<()> {
    opts.validate()?;
    let mut h = opts.header();
    let cs = opts.cluster_size;
    // Minimal layout: header, refcount table, one refcount block for clusters 0..2.
    let mut first = h.encode()?;
    first.resize(cs as usize, 0);
    io("Could not write qcow2 header", storage.write_at(&first, 0))?;
    let mut table = vec![0u8; cs as usize];
    table[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    io(
        "Could not write refcount table",
        storage.write_at(&table, cs),
    )?;
    let mut block = vec![0u8; cs as usize];
    for c in 0..3 {
        refcount::set(&mut block, h.refcount_order, c, 1);
    }
    io(
        "Could not write refcount block",
        storage.write_at(&block, 2 * cs),
    )?;
    // QEMU opens the new image here; what it reads back must be the header just written
    // (on /dev/null it is not: "Image is not in qcow2 format").
    super::read_header(&*storage)?;
    let mut meta = Meta::load(storage.clone(), h.clone(), false)?;
    meta.grow_l1(h.geometry().l1_entries_for(opts.size))?;
    meta.h.size = opts.size;
    meta.write_header()?;
    if opts.preallocation != Preallocation::Off {
        let clusters = h.geometry().clusters_for(opts.size).0;
        meta.preallocate(0..clusters, opts.preallocation)?;
    }
    meta.close()
}
