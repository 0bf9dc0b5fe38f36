//! Any bytes as qcow2, through the parts of the format the engine parses on demand: the
//! snapshot table (every snapshot loaded and read), header extensions and the bitmap
//! directory (info, and a bitmap edit on a read-write open), compressed clusters (read).

use common::open::{Format, OpenOptions};
use common::ops::{BitmapOp, SnapshotKey};

/// Most snapshots loaded per input.
const MAX_SNAPSHOTS: usize = 8;

fn main() {
    let scratch = fuzz::Scratch::new("qcow2_parts");
    afl::fuzz!(|data: &[u8]| {
        let ro = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        if let Some(img) = scratch.open(data, Some(Format::Qcow2), ro) {
            fuzz::describe(&img);
            fuzz::walk(img.driver());
            let snaps = img.snapshots().unwrap_or_default();
            for s in snaps.iter().take(MAX_SNAPSHOTS) {
                let key = SnapshotKey::Exact {
                    id: Some(s.id.clone()),
                    name: Some(s.name.clone()),
                };
                if img.load_snapshot(&key).is_ok() {
                    fuzz::walk(img.driver());
                }
            }
        }
        // Read-write: the bitmaps are loaded (and in-use ones refused) on open, and an
        // edit reads and rewrites the directory.
        if let Some(img) = scratch.open(data, Some(Format::Qcow2), OpenOptions::default()) {
            let names: Vec<String> = match img.info() {
                Ok(info) => match info.specific {
                    Some(common::ops::FormatSpecific::Qcow2(q)) => {
                        q.bitmaps.into_iter().map(|b| b.name).collect()
                    }
                    _ => Vec::new(),
                },
                Err(_) => Vec::new(),
            };
            for name in names.iter().take(4) {
                let ops = [
                    BitmapOp::Merge {
                        source: name.clone(),
                    },
                    BitmapOp::Clear,
                ];
                let _ = img.bitmap_edit("#block0", name, &ops, None);
            }
            let _ = img.bitmap_edit(
                "#block0",
                "fuzz",
                &[BitmapOp::Add { granularity: None }],
                None,
            );
            let _ = img.driver().write_at(&[0x5a; 4096], 0);
            let _ = img.driver().flush();
        }
    });
}
