//! Rebuilding the refcount structures from the metadata that references clusters.
//!
//! Used when a lazy-refcounts image was not closed cleanly (the dirty bit is set): the
//! walker recounts every reference except the refcount structures' own, and a fresh
//! refcount table with its blocks is written past the end of the file. The old refcount
//! structures are not referenced any more and become free.

use super::counts::ClusterCounts;
use super::header::INCOMPAT_DIRTY;
use super::meta::Meta;
use super::refcount;
use super::units::HostOffset;
use super::walker::{Flow, Structure, Visit};
use crate::error::{self, io, Error, Result};

impl Meta {
    /// Count every reference in the image except those of the refcount structures. The
    /// first problem in the metadata is an error: a rebuild on it would be a guess.
    pub(crate) fn count_references(&mut self) -> Result<ClusterCounts> {
        let g = self.geo();
        let mut counts = ClusterCounts::new(g.refblock_bits());
        let mut problem = None;
        let mut count = |offset: HostOffset, bytes: u64, n: u64| {
            counts.add(g.clusters_touched(offset, bytes), n);
        };
        self.walk_shared_once(&mut |visit| {
            match visit {
                Visit::Structure {
                    kind,
                    offset,
                    bytes,
                } => {
                    if !matches!(kind, Structure::RefcountTable | Structure::RefcountBlock(_)) {
                        count(offset, bytes, 1);
                    }
                }
                Visit::L2Table { offset, .. } => count(offset, g.cluster_size(), 1),
                Visit::Entry { extent, uses, .. } => {
                    let (host, len) = extent.expect("no finding, so inside the file");
                    count(host, len, uses);
                }
                Visit::Finding(f) => {
                    problem = Some(f);
                    return Flow::Stop;
                }
            }
            Flow::Continue
        })?;
        match problem {
            Some(f) => Err(Error::corrupt(f.to_string())),
            None => Ok(counts),
        }
    }

    /// Replace the refcount structures by ones built from the references, and clear the
    /// dirty bit. The new structures go past the end of the file.
    pub(crate) fn rebuild_refcounts(&mut self) -> Result<()> {
        self.rebuild_refcounts_as(self.h.refcount_order)
    }

    /// [`Meta::rebuild_refcounts`] with entries of `2^order` bits (amend's refcount width
    /// change): the header switches width and structures in one write.
    pub(crate) fn rebuild_refcounts_as(&mut self, order: u32) -> Result<()> {
        let counts = self.count_references()?;
        let old_bits = self.geo().refblock_bits();
        let g = {
            let mut h = self.h.clone();
            h.refcount_order = order;
            h.geometry()
        };
        let cs = g.cluster_size();
        let per_rb = 1u64 << g.refblock_bits();
        let file_clusters =
            io("Could not get image file length", self.storage().len())?.div_ceil(cs);
        let start = file_clusters.max(counts.end());
        // The new refcount blocks that counted clusters fall in.
        let mut used: Vec<u64> = counts
            .chunks()
            .flat_map(|(i, slots)| {
                let base = i << old_bits;
                let nonzero = slots.iter().enumerate().filter(|&(_, &n)| n > 0);
                nonzero.map(move |(k, _)| (base + k as u64) / per_rb)
            })
            .collect();
        used.dedup();
        // How many refcount blocks and table clusters describe everything, themselves
        // included: the blocks of the counted chunks plus those of the new region.
        let mut blocks = 0u64;
        let mut table_clusters = 1u64;
        let indexes = |end: u64| {
            let mut idx = used.clone();
            idx.extend((start..end).map(|c| c / per_rb));
            idx.sort_unstable();
            idx.dedup();
            idx
        };
        loop {
            let end = start + blocks + table_clusters;
            let need_blocks = indexes(end).len() as u64;
            let need_table = ((end - 1) / per_rb + 1).saturating_mul(8).div_ceil(cs);
            if need_blocks == blocks && need_table == table_clusters {
                break;
            }
            blocks = need_blocks;
            table_clusters = need_table.max(1);
        }
        if table_clusters * cs > super::header::MAX_REFTABLE_BYTES {
            return Err(Error::corrupt_at(
                error::Structure::RefcountTable,
                self.h.refcount_table_offset,
                "rebuilt refcount table would be too large",
            ));
        }
        let table_start = start + blocks;
        let end = table_start + table_clusters;
        let max = refcount::max_value(g.refcount_order);
        let mut table = vec![0u64; (table_clusters * cs / 8) as usize];
        let storage = self.storage().clone();
        for (j, rbi) in indexes(end).into_iter().enumerate() {
            let off = (start + j as u64) * cs;
            table[rbi as usize] = off;
            let mut block = vec![0u8; cs as usize];
            for slot in 0..per_rb {
                let c = rbi * per_rb + slot;
                let n =
                    counts.get(super::units::HostCluster(c)) + u64::from((start..end).contains(&c));
                if n == 0 {
                    continue;
                }
                if n > max && order != self.h.refcount_order {
                    return Err(Error::invalid(format!(
                        "Cannot decrease refcount entry width to {} bits: Cluster at offset \
                         {:#x} has a refcount of {n}",
                        1u32 << order,
                        c * cs
                    )));
                }
                if n > max {
                    return Err(Error::corrupt_at(
                        error::Structure::DataCluster,
                        c * cs,
                        format!("cluster {c} has too many references"),
                    ));
                }
                refcount::set(&mut block, g.refcount_order, slot as usize, n);
            }
            io(
                "Could not write refcount block",
                storage.write_at(&block, off),
            )?;
        }
        self.install_refcount_table(table, table_start * cs, table_clusters, |h| {
            h.refcount_order = order;
            h.incompatible_features &= !INCOMPAT_DIRTY;
        })
    }

    /// Write the refcount `table` (`clusters` clusters at `offset`, its blocks already
    /// written) and make it durable, then point the header at it, with `edit` applied in
    /// the same header write, and count with it from now on.
    pub(super) fn install_refcount_table(
        &mut self,
        table: Vec<u64>,
        offset: u64,
        clusters: u64,
        edit: impl FnOnce(&mut super::header::Header),
    ) -> Result<()> {
        let bytes: Vec<u8> = table.iter().flat_map(|v| v.to_be_bytes()).collect();
        io(
            "Could not write refcount table",
            self.storage().write_at(&bytes, offset),
        )?;
        self.sync()?;
        self.h.refcount_table_offset = offset;
        self.h.refcount_table_clusters = clusters as u32;
        edit(&mut self.h);
        self.write_header()?;
        self.sync()?;
        self.reset_refcounts(table)
    }
}
