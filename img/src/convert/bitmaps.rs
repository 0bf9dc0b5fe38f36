//! `convert --bitmaps [--skip-broken-bitmaps]`: the source's persistent dirty bitmaps
//! copied into the target once its data is, as qemu-img does it (the same checks, order
//! and messages).

use common::open::Image;
use common::ops::{bitmap_sizes_differ, BitmapEdit, BitmapInfo, BitmapOp, FormatSpecific};

use crate::errors::{engine_msg, Failure};

/// The source's persistent bitmaps in directory order; refuses a source that cannot hold
/// bitmaps, and (unless `skip_broken`) one with an inconsistent bitmap. qemu-img runs
/// this before it creates the target.
pub fn check(src: &Image, skip_broken: bool) -> Result<Vec<BitmapInfo>, Failure> {
    if !src.supports_persistent_bitmaps() {
        return Err(Failure::msg("Source lacks bitmap support"));
    }
    let list = bitmaps_of(src)?;
    // qemu-img walks its bitmaps newest first, the reverse of the directory.
    if let Some(b) = list.iter().rev().find(|b| b.in_use && !skip_broken) {
        return Err(Failure::msg(format!(
            "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use 'img \
             bitmap --remove' to delete it",
            b.name
        )));
    }
    Ok(list)
}

/// Refuse a target that cannot hold bitmaps (checked once it is open, as qemu-img does).
pub fn check_target(dst: &Image) -> Result<(), Failure> {
    if dst.supports_persistent_bitmaps() {
        return Ok(());
    }
    Err(Failure::msg(format!(
        "Format driver '{}' does not support bitmaps",
        dst.driver().format_name()
    )))
}

/// Create each bitmap of `list` (from [`check`]) in `dst` with its granularity, fill it
/// from `src`'s bitmap of that name and leave it enabled or disabled as it was; the
/// inconsistent ones are skipped with a warning.
///
/// qemu-img creates them newest first and stops at the first failure, keeping those
/// made before it (a bitmap it could not fill it removes again), and stores them all
/// when it closes the target, listed in the source's order. So this works out which
/// qemu-img would have made (a name taken, or a target of another size, which no merge
/// accepts), makes them in directory order in one edit, then reports the failure.
pub fn copy(src: &Image, dst: &Image, list: &[BitmapInfo]) -> Result<(), Failure> {
    let existing: Vec<String> = bitmaps_of(dst)?.into_iter().map(|b| b.name).collect();
    let (src_size, dst_size) = (src.driver().size(), dst.driver().size());
    let mut make = Vec::new();
    let mut failure = None;
    for b in list.iter().rev() {
        if b.in_use {
            eprintln!("img: warning: Skipping inconsistent bitmap '{}'", b.name);
        } else if existing.contains(&b.name) {
            failure = Some(Failure::msg(format!(
                "Failed to create bitmap {0}: Bitmap already exists: {0}",
                b.name
            )));
            break;
        } else if src_size != dst_size {
            failure = Some(Failure::msg(format!(
                "Failed to populate bitmap {}: {}",
                b.name,
                engine_msg(&bitmap_sizes_differ(dst_size, src_size))
            )));
            break;
        } else {
            make.push(b);
        }
    }
    if make.is_empty() {
        return failure.map_or(Ok(()), Err);
    }
    make.reverse();
    let ops: Vec<Vec<BitmapOp>> = make
        .iter()
        .map(|b| {
            let mut ops = vec![
                BitmapOp::Add {
                    granularity: u32::try_from(b.granularity).ok(),
                },
                BitmapOp::Merge {
                    source: b.name.clone(),
                },
            ];
            if !b.auto {
                ops.push(BitmapOp::Disable);
            }
            ops
        })
        .collect();
    let edits: Vec<BitmapEdit> = make
        .iter()
        .zip(&ops)
        .map(|(b, ops)| BitmapEdit { name: &b.name, ops })
        .collect();
    dst.bitmap_edits(NODE, &edits, Some(src)).map_err(|e| {
        let what = match e.op {
            // Storing them failed: QEMU's words at close.
            None => return Failure::msg(engine_msg(&e.error)),
            Some(1) => "populate",
            Some(_) => "create",
        };
        let name = make.get(e.edit).map_or("", |b| b.name.as_str());
        Failure::msg(format!(
            "Failed to {what} bitmap {name}: {}",
            engine_msg(&e.error)
        ))
    })?;
    failure.map_or(Ok(()), Err)
}

/// The target's node name in QEMU's messages about it.
const NODE: &str = "target";

/// The persistent bitmaps of a qcow2 image (none for other formats).
fn bitmaps_of(image: &Image) -> Result<Vec<BitmapInfo>, Failure> {
    let info = image.info().map_err(|e| Failure::msg(engine_msg(&e)))?;
    Ok(match info.specific {
        Some(FormatSpecific::Qcow2(q)) => q.bitmaps,
        _ => Vec::new(),
    })
}
