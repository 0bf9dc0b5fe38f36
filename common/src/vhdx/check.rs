//! `qemu-img check` for vhdx (QEMU's `vhdx_co_check`): a log replayed when the image was
//! opened counts as one repaired corruption; each BAT entry past the end of the file or
//! over a region is a corruption, with QEMU's words on stderr.

use crate::check::CheckReport;

use super::bat::Bat;
use super::region::Regions;

/// Check `bat` against a file of `file_len` bytes and its `regions`.
pub fn check(bat: &Bat, file_len: u64, regions: &Regions, log_replayed: bool) -> CheckReport {
    let mut r = CheckReport::default();
    if log_replayed {
        r.corruptions_fixed += 1;
    }
    for m in bat.check(file_len, regions, false) {
        r.corruptions += 1;
        r.messages.push(format!("img: {m}"));
    }
    r
}
