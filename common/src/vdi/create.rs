//! Creating a VDI as `qemu-img create -f vdi` lays it out: header, block map at 512 (every
//! entry unallocated, or for a static image each block at its own index), and for a static
//! image the file grown (sparse) to hold every block.

use std::path::Path;

use crate::error::{Error, Result};
use crate::storage::{FileStorage, Storage};

use super::header::{encode_new, Header, MAX_DISK_SIZE};

/// A new VDI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VdiCreateOptions {
    /// Size in bytes (whole sectors).
    pub size: u64,
    /// `static=on`: every block allocated up front.
    pub fixed: bool,
}

/// qemu-img's refusal of a size beyond what VDI holds.
pub fn check_size(size: u64) -> Result<()> {
    if size > MAX_DISK_SIZE {
        return Err(Error::invalid(format!(
            "Unsupported VDI image size (size is 0x{size:x}, max supported is \
             0x{MAX_DISK_SIZE:x})"
        )));
    }
    Ok(())
}

/// Create (or overwrite) a VDI at `path`.
pub fn create_vdi(path: &Path, o: &VdiCreateOptions) -> Result<()> {
    check_size(o.size)?;
    let uuids = [crate::uuid::random_v4()?, crate::uuid::random_v4()?];
    let header = encode_new(o.size, o.fixed, uuids);
    let h = Header::parse(header).expect("a new header is valid");
    let storage = FileStorage::new(crate::storage::open_new_image_file(path)?);
    let io = |e| Error::io(format!("Could not create '{}'", path.display()), e);
    storage.set_len(0).map_err(io)?;
    storage.write_at(&header, 0).map_err(io)?;
    let mut map = vec![0u8; h.bmap_len() as usize];
    for (i, e) in map.chunks_exact_mut(4).take(h.blocks as usize).enumerate() {
        let v = if o.fixed { i as u32 } else { u32::MAX };
        e.copy_from_slice(&v.to_le_bytes());
    }
    storage.write_at(&map, h.offset_bmap).map_err(io)?;
    if o.fixed {
        let end = h.offset_data + u64::from(h.blocks) * h.block_size;
        storage.set_len(end).map_err(io)?;
    }
    storage.flush().map_err(io)
}
