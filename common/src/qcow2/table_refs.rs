//! The references one L1 table holds, counted with the walker, and applied to the
//! refcounts as runs: what snapshot create/apply/delete and shrinking add or take away.

use super::allocator::When;
use super::counts::ClusterCounts;
use super::meta::Meta;
use super::refcount;
use super::units::{ClusterCount, HostCluster};
use super::walker::{Flow, L1Source, Visit};
use crate::error::{Error, Result};

impl Meta {
    /// Count what the L1 table `table` at `offset` references, as QEMU's check counts it:
    /// its L2 tables (once per L1 entry naming them) and what their entries point at.
    /// Refcounts changed on metadata the walker finds fault with would be a guess, so
    /// a finding is an error.
    pub(super) fn table_refs(
        &mut self,
        l1: L1Source,
        offset: u64,
        table: &[u64],
    ) -> Result<ClusterCounts> {
        let g = self.geo();
        let mut counts = ClusterCounts::new(g.refblock_bits());
        let mut problem = None;
        self.walk_table(l1, (offset, table), true, &mut |visit| {
            match visit {
                Visit::Structure { .. } => {}
                Visit::L2Table { offset, .. } => {
                    counts.add(g.clusters_touched(offset, g.cluster_size()), 1);
                }
                Visit::Entry { extent, uses, .. } => {
                    let (host, len) = extent.expect("no finding, so inside the file");
                    counts.add(g.clusters_touched(host, len), uses);
                }
                Visit::Finding(f) => {
                    problem = Some(f);
                    return Flow::Stop;
                }
            }
            Flow::Continue
        })?;
        match problem {
            Some(f) => Err(Error::corrupt(format!("{f}; run 'check -r all' first"))),
            None => Ok(counts),
        }
    }

    /// Refuse `counts` if adding them would overflow a refcount's width (refcount_bits=1
    /// cannot hold two references).
    pub(super) fn refs_fit(&mut self, counts: &ClusterCounts) -> Result<()> {
        let max = refcount::max_value(self.h.refcount_order);
        for (first, n, addend) in runs(counts) {
            for c in first.run(n) {
                if self.refcount(c)?.saturating_add(addend) > max {
                    return Err(Error::invalid(format!(
                        "refcount of cluster {} would overflow {} bits",
                        c.0,
                        self.h.refcount_bits()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Add `counts` to the refcounts now, all or nothing: refused before any change when
    /// a refcount would overflow its width.
    pub(super) fn add_refs(&mut self, counts: &ClusterCounts) -> Result<()> {
        self.refs_fit(counts)?;
        for (first, n, addend) in runs(counts) {
            self.update_refcount(first, n, addend as i64, When::Now)?;
        }
        Ok(())
    }

    /// Take `counts` off the refcounts at the next flush.
    pub(super) fn drop_refs(&mut self, counts: &ClusterCounts) {
        for (first, n, addend) in runs(counts) {
            self.refs.defer(first, n, -(addend as i64));
        }
    }
}

/// The counts as runs of consecutive clusters with the same nonzero count:
/// (first cluster, length, count).
fn runs(counts: &ClusterCounts) -> impl Iterator<Item = (HostCluster, ClusterCount, u64)> + '_ {
    let mut cells = counts
        .chunks()
        .flat_map(|(chunk, slots)| {
            let base = chunk * slots.len() as u64;
            let nonzero = slots.iter().enumerate().filter(|&(_, &n)| n > 0);
            nonzero.map(move |(i, &n)| (base + i as u64, u64::from(n)))
        })
        .peekable();
    std::iter::from_fn(move || {
        let (first, n) = cells.next()?;
        let mut len = 1;
        while cells
            .next_if(|&(c, m)| c == first + len && m == n)
            .is_some()
        {
            len += 1;
        }
        Some((HostCluster(first), ClusterCount(len), n))
    })
}
