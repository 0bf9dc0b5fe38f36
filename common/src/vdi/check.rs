//! `qemu-img check` for vdi: every allocated map entry names an image block inside the
//! image and no other entry names it, and the header's allocated count is right. QEMU's
//! words, on stderr, one line per finding.

use crate::check::CheckReport;

use super::bmap::Bmap;

/// Check `map` as QEMU's `vdi_co_check` does.
pub fn check(map: &Bmap) -> CheckReport {
    let mut r = CheckReport::default();
    let n = map.blocks();
    // The image blocks some entry names (only those below `n` are valid).
    let mut used = vec![false; n as usize];
    let mut allocated = 0u32;
    for block in 0..n {
        let Some(e) = map.image_block(block) else {
            continue;
        };
        if e < n {
            allocated += 1;
            if !used[e as usize] {
                used[e as usize] = true;
            } else {
                // QEMU names the image block twice.
                r.messages
                    .push(format!("ERROR: block index {e} also used by {e}"));
                r.corruptions += 1;
            }
        } else {
            r.messages
                .push(format!("ERROR: block index {block} too large, is {e}"));
            r.corruptions += 1;
        }
    }
    if allocated != map.blocks_allocated() {
        r.messages.push(format!(
            "ERROR: allocated blocks mismatch, is {allocated}, should be {}",
            map.blocks_allocated()
        ));
        r.corruptions += 1;
    }
    r
}
