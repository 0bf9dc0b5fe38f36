//! Any bytes checked as one of the formats whose check repairs or reports in detail
//! (the first byte picks qcow2, vdi, qed or parallels): `check`, then `check -r all` on
//! the same file opened read-write, then `check` of what the repair left.

use common::check::Fix;
use common::open::{Format, OpenOptions};

fn main() {
    let scratch = fuzz::Scratch::new("check");
    afl::fuzz!(|data: &[u8]| {
        let Some((&sel, bytes)) = data.split_first() else {
            return;
        };
        let format = match sel % 4 {
            0 => Format::Qcow2,
            1 => Format::Vdi,
            2 => Format::Qed,
            _ => Format::Parallels,
        };
        let ro = OpenOptions {
            read_only: true,
            check: true,
            ..Default::default()
        };
        if let Some(img) = scratch.open(bytes, Some(format), ro) {
            let _ = img.check(Fix::default());
        }
        let rw = OpenOptions {
            check: true,
            ..Default::default()
        };
        if let Some(img) = scratch.open(bytes, Some(format), rw) {
            let all = Fix {
                leaks: true,
                errors: true,
            };
            let _ = img.check(all);
            let _ = img.check(Fix::default());
            fuzz::walk(img.driver());
        }
    });
}
