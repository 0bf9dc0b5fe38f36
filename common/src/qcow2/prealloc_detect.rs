//! QEMU's test for a metadata-preallocated image: noticeably more clusters in use than
//! the host has allocated for the file. Only for such an image does block status ask
//! the file whether a data cluster's storage is a hole (after `preallocation=metadata`
//! it is, and reads as zeroes), exactly as QEMU does; for any other image a data cluster
//! is data, whatever the file holds under it.

use super::meta::Meta;
use super::units::HostCluster;
use super::Qcow2Image;
use crate::error::{io, Result};

impl Qcow2Image {
    /// Whether block status asks the file about holes under data clusters: decided once
    /// per open, and (as in QEMU) not when the test itself fails.
    pub(super) fn reads_holes(&self) -> bool {
        *self
            .reads_holes
            .get_or_init(|| self.meta().looks_metadata_preallocated().unwrap_or(false))
    }
}

impl Meta {
    /// Whether at least max(10/9 of the host-allocated clusters, those + 2) clusters of
    /// the file have a nonzero refcount.
    pub(super) fn looks_metadata_preallocated(&mut self) -> Result<bool> {
        let file_len = io("Could not get image file length", self.storage().len())?;
        let allocated = io(
            "Could not get allocated size",
            self.storage().allocated_size(),
        )?;
        let cs = self.geo().cluster_size();
        let real = allocated / cs;
        let threshold = (real * 10 / 9).max(real + 2);
        let mut in_use = 0;
        let end = file_len.div_ceil(cs);
        let mut c = 0;
        while in_use < threshold {
            // Clusters no refcount block covers are free: skipped a block at a time.
            c = self.next_with_refblock(HostCluster(c), end);
            if c >= end {
                break;
            }
            if self.refcount(HostCluster(c))? != 0 {
                in_use += 1;
            }
            c += 1;
        }
        Ok(in_use >= threshold)
    }
}
