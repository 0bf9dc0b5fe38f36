//! The guest ranges an image's own layer holds data for, found by walking its active
//! L1 table: what `measure` counts for a source without a backing file.

use std::ops::Range;

use super::entry::Kind;
use super::walker::{Flow, L1Source, Visit};
use super::Qcow2Image;
use crate::error::Result;

impl Qcow2Image {
    /// Call `f` with each guest range this layer stores data for (plainly or compressed;
    /// not zeroes, not unallocated), in guest order, within the virtual size. Like block
    /// status, data over a hole of a metadata-preallocated image reads as zeroes and is
    /// left out. Returns `false`, having stopped, at the first thing the walker finds
    /// wrong with the metadata: judging a damaged image is block status's job.
    pub fn data_ranges(&self, f: &mut dyn FnMut(Range<u64>)) -> Result<bool> {
        let holes_matter = self.reads_holes();
        let mut m = self.meta();
        let (g, size) = (m.geo(), m.h.size);
        let (offset, table) = (m.h.l1_table_offset, m.l1.entries.clone());
        let units = if g.extended_l2 { 32 } else { 1 };
        let unit = 1u64 << g.unit_bits();
        let mut sound = true;
        let mut failed = None;
        m.walk_table(L1Source::Active, (offset, &table), false, &mut |v| {
            let (guest, entry) = match v {
                Visit::Entry { guest, entry, .. } => (guest, entry),
                Visit::Finding(_) => {
                    sound = false;
                    return Flow::Stop;
                }
                _ => return Flow::Continue,
            };
            let start = g.guest_offset(guest).0;
            for sc in 0..units {
                let at = start + u64::from(sc) * unit;
                if at >= size {
                    break;
                }
                let end = (at + unit).min(size);
                let host = match entry.kind(g.cluster_bits, g.extended_l2, sc) {
                    Kind::Compressed(_) => None,
                    Kind::Data { host } => Some(host.0),
                    Kind::Zero { .. } | Kind::Unallocated => continue,
                };
                match host {
                    Some(h) if holes_matter => {
                        if let Err(e) = self.data_over(h, at..end, f) {
                            failed = Some(e);
                            return Flow::Stop;
                        }
                    }
                    _ => f(at..end),
                }
            }
            Flow::Continue
        })?;
        match failed {
            Some(e) => Err(e),
            None => Ok(sound),
        }
    }

    /// Pass on the parts of guest range `r`, stored from host offset `host`, that the
    /// file holds data for.
    fn data_over(&self, host: u64, r: Range<u64>, f: &mut dyn FnMut(Range<u64>)) -> Result<()> {
        let mut at = r.start;
        while at < r.end {
            let (hole, len) = self.host_run(host + (at - r.start), r.end - at)?;
            if !hole {
                f(at..at + len);
            }
            at += len;
        }
        Ok(())
    }
}
