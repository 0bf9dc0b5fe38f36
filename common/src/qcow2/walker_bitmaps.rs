//! The walker's part for persistent bitmaps, as QEMU's `qcow2_check_bitmaps_refcounts`
//! counts them: the bitmap directory, then each bitmap's table and its data clusters.
//! A directory or table that cannot be read stops the walk with EINVAL, as it stops
//! QEMU's check ("Check failed: Invalid argument"); opening the image already refused
//! most of them.

use std::io;

use super::bitmaps::{self, TABLE_OFFSET_MASK};
use super::meta::Meta;
use super::walker::{Flow, Structure, Visitor};
use crate::error::{Error, Result};

fn invalid(what: &str) -> Error {
    Error::io(what, io::Error::from_raw_os_error(libc::EINVAL))
}

impl Meta {
    /// Visit the bitmap directory, tables and data clusters (nothing without bitmaps).
    pub(super) fn walk_bitmaps(&mut self, file_len: u64, v: &mut Visitor<'_>) -> Result<Flow> {
        let Ok(ext) = bitmaps::extension(&self.h) else {
            return Err(invalid("bitmaps extension"));
        };
        let Some(ext) = ext else {
            return Ok(Flow::Continue);
        };
        let (off, bytes) = (ext.dir_offset, ext.dir_size);
        if self.visit_structure(v, Structure::BitmapDirectory, off, bytes, file_len) == Flow::Stop {
            return Ok(Flow::Stop);
        }
        let storage = self.storage().clone();
        let dir = bitmaps::read_directory(&*storage, &self.h, &ext)
            .map_err(|_| invalid("bitmap directory"))?;
        let cs = self.geo().cluster_size();
        for (i, e) in dir.iter().enumerate() {
            let bytes = u64::from(e.table_size) * 8;
            let kind = Structure::BitmapTable(i);
            if self.visit_structure(v, kind, e.table_offset, bytes, file_len) == Flow::Stop {
                return Ok(Flow::Stop);
            }
            let table =
                bitmaps::read_table(&*storage, e, cs).map_err(|_| invalid("bitmap table"))?;
            for entry in table {
                let off = entry & TABLE_OFFSET_MASK;
                if off == 0 {
                    continue;
                }
                let kind = Structure::BitmapData(i);
                if self.visit_structure(v, kind, off, cs, file_len) == Flow::Stop {
                    return Ok(Flow::Stop);
                }
            }
        }
        Ok(Flow::Continue)
    }
}
