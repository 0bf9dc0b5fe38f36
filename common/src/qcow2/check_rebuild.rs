//! Rebuilding the refcount structures from check's recount, as QEMU's
//! `rebuild_refcount_structure` does: refcount blocks and then the table go into the first
//! clusters the recount says are free, the header is pointed at the new table, and the
//! old structures are left to leak (the check that follows frees them).

use super::check::Recount;
use super::meta::Meta;
use super::refcount;
use super::units::HostCluster;
use crate::error::{io, Error, Result, Structure};

impl Recount {
    /// QEMU's `alloc_clusters_imrt`: the first run of `n` free clusters from
    /// `*first_free`, counted as used (the recount grows past its end if need be).
    fn alloc(&mut self, n: u64, first_free: &mut u64) -> u64 {
        let mut c = *first_free;
        let mut run = 0;
        let mut first_gap = true;
        while c < self.nb_clusters && run < n {
            if self.get(c) == 0 {
                run += 1;
                if first_gap {
                    *first_free = c;
                    first_gap = false;
                }
            } else {
                run = 0;
            }
            c += 1;
        }
        if run < n {
            self.nb_clusters = c + n - run;
        }
        let start = c - run;
        for k in start..start + n {
            self.counts.inc(k, self.max);
        }
        start
    }
}

impl Meta {
    /// QEMU's `rebuild_refcounts_write_refblocks` over clusters `first..end`: a refcount
    /// block for every block's worth of clusters in use, written from the recount. Says
    /// whether the table had to grow.
    fn write_rebuilt_refblocks(
        &mut self,
        rc: &mut Recount,
        first: u64,
        mut end: u64,
        table: &mut Vec<u64>,
    ) -> Result<bool> {
        let g = self.geo();
        let cs = g.cluster_size();
        let per_rb = 1u64 << g.refblock_bits();
        let mut first_free = 0;
        let mut grown = false;
        let mut c = first;
        while c < end {
            // Past the recounted references by whole blocks at once.
            match rc.counts.next_counted(c) {
                Some(n) if n < end => c = n,
                _ => break,
            }
            if rc.get(c) == 0 {
                c += 1;
                continue;
            }
            let rbi = c / per_rb;
            let start = rbi * per_rb;
            let off = match table.get(rbi as usize) {
                Some(&o) if o != 0 => o,
                _ => {
                    first_free = first_free.max(start);
                    let b = rc.alloc(1, &mut first_free);
                    end = end.max(b + 1);
                    if table.len() as u64 <= rbi {
                        let entries = ((rbi + 1) * 8).next_multiple_of(cs) / 8;
                        if entries * 8 > super::header::MAX_REFTABLE_BYTES {
                            return Err(Error::corrupt_at(
                                Structure::RefcountTable,
                                self.h.refcount_table_offset,
                                "rebuilt refcount table would be too large",
                            ));
                        }
                        table.resize(entries as usize, 0);
                        grown = true;
                    }
                    table[rbi as usize] = b * cs;
                    b * cs
                }
            };
            let mut block = vec![0u8; cs as usize];
            for slot in 0..per_rb {
                let n = rc.get(start + slot);
                if n != 0 {
                    refcount::set(&mut block, g.refcount_order, slot as usize, n);
                }
            }
            io(
                "Could not write refcount block",
                self.storage().write_at(&block, off),
            )?;
            c = start + per_rb;
        }
        Ok(grown)
    }

    /// Write new refcount structures for the recount and switch the header to them.
    pub(super) fn rebuild_from_recount(&mut self, rc: &mut Recount) -> Result<()> {
        let cs = self.geo().cluster_size();
        let mut table = Vec::new();
        let nb = rc.nb_clusters;
        self.write_rebuilt_refblocks(rc, 0, nb, &mut table)?;
        let (table_off, table_clusters) = loop {
            let clusters = (table.len() as u64 * 8).div_ceil(cs);
            let mut first_free = 0;
            let start = rc.alloc(clusters, &mut first_free);
            if !self.write_rebuilt_refblocks(rc, start, start + clusters, &mut table)? {
                break (start * cs, clusters);
            }
        };
        self.install_refcount_table(table, table_off, table_clusters, |_| {})?;
        let end = HostCluster(rc.nb_clusters);
        self.refs.end = self.refs.end.max(end);
        Ok(())
    }
}
