//! Preallocation of guest clusters (`preallocation=metadata|falloc|full`), for create and
//! for the area a resize adds.

use std::ops::Range;

use super::entry::{L2Entry, COPIED};
use super::meta::Meta;
use super::units::{ClusterCount, GuestCluster};
use crate::error::{io, Result};
use crate::prealloc::Preallocation;

impl Meta {
    /// Allocate the L2 tables and data clusters of guest clusters `clusters` (which must
    /// have none yet); with falloc the file space too, with full also written as zeroes.
    /// The clusters of one L2 table follow it in the file, as QEMU lays them out.
    pub(super) fn preallocate(&mut self, clusters: Range<u64>, mode: Preallocation) -> Result<()> {
        let g = self.geo();
        let storage = self.storage().clone();
        let mut gc = GuestCluster(clusters.start);
        while gc.0 < clusters.end {
            let n = (g.l2_entries() - g.l2_index(gc) as u64).min(clusters.end - gc.0);
            // Touch the L2 table first so it precedes its data clusters.
            self.set_l2_entry(gc, L2Entry::default())?;
            let first = self.alloc_clusters(ClusterCount(n))?;
            for i in 0..n {
                let e = L2Entry {
                    word: g.host_offset(first.plus(i)).0 | COPIED,
                    // With subclusters QEMU leaves every subcluster unallocated: the
                    // cluster is reserved, reads still fall through to the backing file.
                    bitmap: 0,
                };
                self.set_l2_entry(gc.plus(i), e)?;
            }
            let (start, len) = (g.host_offset(first).0, n * g.cluster_size());
            match mode {
                Preallocation::Falloc => io("Could not preallocate", storage.allocate(start, len))?,
                Preallocation::Full => {
                    let zeros = vec![0u8; (1 << 20).min(len) as usize];
                    let mut pos = start;
                    while pos < start + len {
                        let k = (start + len - pos).min(zeros.len() as u64);
                        io(
                            "Could not preallocate",
                            storage.write_at(&zeros[..k as usize], pos),
                        )?;
                        pos += k;
                    }
                }
                _ => {
                    let end = start + len;
                    if io("Could not get image size", storage.len())? < end {
                        io("Could not preallocate", storage.set_len(end))?;
                    }
                }
            }
            gc = gc.plus(n);
        }
        Ok(())
    }
}
