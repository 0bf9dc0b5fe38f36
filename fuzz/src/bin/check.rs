//! Any bytes checked as qcow2 (or, by the first byte, as vdi): `check`, then `check -r all`
//! on the same file opened read-write, then `check` of what the repair left.

use common::check::Fix;
use common::open::{Format, OpenOptions};

fn main() {
    let scratch = fuzz::Scratch::new("check");
    afl::fuzz!(|data: &[u8]| {
        let Some((&sel, bytes)) = data.split_first() else {
            return;
        };
        let format = if sel & 1 == 0 {
            Format::Qcow2
        } else {
            Format::Vdi
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
