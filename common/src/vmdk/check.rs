//! `qemu-img check` for vmdk: every grain (every flat extent) points inside its file, as
//! QEMU's `vmdk_check` walks them, stopping at the first bad one.

use crate::check::CheckReport;

use super::grain::Grain;
use super::{Kind, VmdkImage};

/// Check `image` as QEMU does: one corruption at the first grain that cannot be looked up
/// or points at or past the end of its file.
pub fn check(image: &VmdkImage) -> CheckReport {
    let mut r = CheckReport::default();
    for e in &image.extents {
        let file_len = e.file.len().unwrap_or(0);
        let (step, n) = match &e.kind {
            Kind::Flat { .. } => (e.len.max(1), 1),
            Kind::Sparse { tables, .. } => {
                let g = tables.grain_bytes();
                (g, e.len.div_ceil(g))
            }
        };
        for i in 0..n {
            let rel = i * step;
            let sector = (e.start + rel) / 512;
            let host = match &e.kind {
                Kind::Flat { offset } => super::flat_host(*offset, 0).map(Some),
                Kind::Sparse { tables, .. } => tables.lookup(&*e.file, rel).map(|g| match g {
                    Grain::At(h) => Some(h),
                    _ => None,
                }),
            };
            let finding = match host {
                Err(_) => format!("ERROR: could not get cluster_offset for sector {sector}"),
                Ok(Some(h)) if h >= file_len => {
                    format!("ERROR: cluster offset for sector {sector} points after EOF")
                }
                Ok(_) => continue,
            };
            r.messages.push(finding);
            r.corruptions += 1;
            return r;
        }
    }
    r
}
