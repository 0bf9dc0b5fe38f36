//! Creating a VHD as `qemu-img create -f vpc` lays it out: a fixed disk is a sparse file
//! with the footer at its end; a dynamic one is footer copy, dynamic header (at 512), an
//! empty allocation table (at 1536, whole sectors of 0xff) and the footer, with 2 MiB
//! blocks.

use std::path::Path;

use crate::error::{Error, Result};
use crate::storage::{FileStorage, Storage};

use super::footer::{encode_footer, rounded_size, DynHeader, NewFooter};

/// QEMU's block size for new dynamic disks.
const BLOCK_SIZE: u32 = 2 << 20;
/// Where QEMU puts the allocation table.
const TABLE_OFFSET: u64 = 1536;

/// A new VHD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VpcCreateOptions {
    /// Size in bytes as asked (rounded to the geometry unless `force_size`).
    pub size: u64,
    /// `subformat=fixed` rather than dynamic.
    pub fixed: bool,
    /// `force_size=on`: the size as given, not what a CHS geometry holds.
    pub force_size: bool,
}

impl VpcCreateOptions {
    /// The guest size the new image will have, or qemu-img's error for the size.
    pub fn rounded_size(&self) -> Result<u64> {
        rounded_size(self.size, self.force_size).map(|(_, s)| s)
    }
}

/// Create (or overwrite) a VHD at `path`.
pub fn create_vpc(path: &Path, o: &VpcCreateOptions) -> Result<()> {
    let (geometry, size) = rounded_size(o.size, o.force_size)?;
    let footer = encode_footer(&NewFooter {
        size,
        geometry,
        fixed: o.fixed,
        force_size: o.force_size,
        uuid: crate::uuid::random_v4()?,
    });
    let storage = FileStorage::new(crate::storage::open_new_image_file(path)?);
    let io = |e| Error::io(format!("Could not create '{}'", path.display()), e);
    storage.set_len(0).map_err(io)?;
    if o.fixed {
        storage.set_len(size).map_err(io)?;
        storage.write_at(&footer, size).map_err(io)?;
    } else {
        let entries = size.div_ceil(u64::from(BLOCK_SIZE));
        let table_len = (entries * 4).next_multiple_of(512);
        storage.write_at(&footer, 0).map_err(io)?;
        let header = DynHeader {
            table_offset: TABLE_OFFSET,
            max_table_entries: entries as u32,
            block_size: BLOCK_SIZE,
        };
        storage.write_at(&header.encode(), 512).map_err(io)?;
        storage
            .write_at(&vec![0xff; table_len as usize], TABLE_OFFSET)
            .map_err(io)?;
        storage
            .write_at(&footer, TABLE_OFFSET + table_len)
            .map_err(io)?;
    }
    storage.flush().map_err(io)
}
