//! A qcow2 file's persistent bitmaps read straight from its bytes, independent of the
//! engine: where the bitmaps extension, the directory entries and the tables are, and
//! which granules each bitmap marks dirty. For comparing what two tools wrote and for
//! patching hostile variants.

use crate::qcow2_layout::{be32, be64};

/// One bitmap directory entry and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// File offset of the entry in the directory.
    pub at: u64,
    pub table_offset: u64,
    pub table_size: u64,
    pub flags: u64,
    pub granularity_bits: u32,
    pub name: String,
}

/// The bitmaps extension and the directory it points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmaps {
    /// File offset of the extension's data (count, reserved, size, offset).
    pub ext_at: u64,
    pub count: u64,
    pub dir_size: u64,
    pub dir_offset: u64,
    pub entries: Vec<Entry>,
}

/// The bitmaps of an image file's bytes, `None` without a bitmaps extension. Meant for
/// well-formed images (a hostile directory is cut short, not reported).
pub fn parse(b: &[u8]) -> Option<Bitmaps> {
    let mut at = be32(b, 100);
    loop {
        let (kind, len) = (be32(b, at), be32(b, at + 4));
        if kind == 0 || at + 8 + len > b.len() as u64 {
            return None;
        }
        if kind == 0x2385_2875 {
            break;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    let ext_at = at + 8;
    let (count, dir_size, dir_offset) =
        (be32(b, ext_at), be64(b, ext_at + 8), be64(b, ext_at + 16));
    let mut entries = Vec::new();
    let mut p = dir_offset;
    while p + 24 <= (dir_offset + dir_size).min(b.len() as u64) && (entries.len() as u64) < count {
        let name_size = (be32(b, p + 16) & 0xffff) as usize;
        let name_at = p as usize + 24;
        let name = String::from_utf8_lossy(b.get(name_at..name_at + name_size)?).into_owned();
        entries.push(Entry {
            at: p,
            table_offset: be64(b, p),
            table_size: be32(b, p + 8),
            flags: be32(b, p + 12),
            granularity_bits: u32::from(b[p as usize + 17]),
            name,
        });
        p += (24 + name_size as u64).div_ceil(8) * 8;
    }
    Some(Bitmaps {
        ext_at,
        count,
        dir_size,
        dir_offset,
        entries,
    })
}

/// The runs of dirty granules `(first, last)` of bitmap `e` in the file `b` with
/// clusters of `1 << cluster_bits` bytes.
pub fn dirty_runs(b: &[u8], e: &Entry, cluster_bits: u32) -> Vec<(u64, u64)> {
    let cs = 1u64 << cluster_bits;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for k in 0..e.table_size {
        let entry = be64(b, e.table_offset + 8 * k);
        let off = entry & 0x00ff_ffff_ffff_fe00;
        for byte in 0..cs {
            let v = if off != 0 {
                b.get((off + byte) as usize).copied().unwrap_or(0)
            } else if entry & 1 != 0 {
                0xff
            } else {
                break;
            };
            for bit in 0..8 {
                if v & (1 << bit) != 0 {
                    let g = (k * cs + byte) * 8 + bit;
                    match runs.last_mut() {
                        Some(r) if r.1 + 1 == g => r.1 = g,
                        _ => runs.push((g, g)),
                    }
                }
            }
        }
    }
    runs
}

/// Every bitmap of the file at `path` as `name granularity flags runs`, one per line, in
/// directory order (empty without bitmaps).
pub fn summary(path: &std::path::Path) -> String {
    let b = std::fs::read(path).unwrap_or_default();
    if b.len() < 104 {
        return String::new();
    }
    let cluster_bits = be32(&b, 20) as u32;
    let Some(bm) = parse(&b) else {
        return String::new();
    };
    bm.entries
        .iter()
        .map(|e| {
            format!(
                "{} {} {} {:?}\n",
                e.name,
                1u64 << e.granularity_bits,
                e.flags,
                dirty_runs(&b, e, cluster_bits)
            )
        })
        .collect()
}
