//! The copy of a safe rebase: every range the image does not hold itself, read from the
//! old and the new backing file and compared in (sub)cluster units; where they differ,
//! the old contents are written into the image (zeroes past the old file's end). Ranges
//! are found first from block status, then compared and written on several threads.
//!
//! A crash during the copy leaves the image reading as before: it only gains clusters
//! holding what the old backing file showed there.

use std::ops::Range;

use common::open::Image;
use common::{Allocation, BlockDriver};

use super::NewBacking;
use crate::errors::engine_msg;
use crate::progress::Progress;
use crate::workers::for_each_piece;

/// The most bytes compared at once (qemu-img's buffer size).
const CHUNK: u64 = 2 << 20;

/// The backing files being compared, and how the image is written.
struct Rebase<'a> {
    top: &'a dyn BlockDriver,
    image: &'a Image,
    old: Option<&'a dyn BlockDriver>,
    new: Option<&'a dyn BlockDriver>,
    old_size: u64,
    new_size: u64,
    /// Writes are aligned to this: the (sub)cluster, or the cluster when compressing.
    align: u64,
    compress: bool,
}

/// Copy into `image` what its old backing file shows where `new` (none: zeroes) differs.
pub fn copy_differences(
    image: &Image,
    new: Option<&NewBacking<'_>>,
    compress: bool,
    progress: &Progress,
) -> Result<(), String> {
    let top = image.driver();
    let (cluster, sub) = top.clusters().map_or((1, 1), |c| (c.cluster, c.subcluster));
    let old = image.layer(1);
    let (new, prefix) = match new {
        Some(NewBacking::InChain(d)) => (image.layer(*d), Some(*d)),
        Some(NewBacking::Opened(d)) => (Some(*d), None),
        None => (None, None),
    };
    let r = Rebase {
        top,
        image,
        old,
        new,
        old_size: old.map_or(0, |b| b.size()),
        new_size: new.map_or(0, |b| b.size()),
        align: if compress { cluster } else { sub },
        compress,
    };
    let ranges = r
        .plan(prefix)
        .map_err(|e| format!("error while reading image metadata: {}", engine_msg(&e)))?;
    progress.start(top.size());
    progress.advance(top.size() - ranges.iter().map(|r| r.end - r.start).sum::<u64>());
    let buffers = || {
        (
            vec![0u8; r.max_range() as usize],
            vec![0u8; r.max_range() as usize],
        )
    };
    for_each_piece(&ranges, buffers, |(old, new), range| {
        r.compare_and_copy(range.clone(), old, new)?;
        progress.advance(range.end - range.start);
        Ok(())
    })?;
    top.flush().map_err(|e| engine_msg(&e))
}

impl Rebase<'_> {
    /// The ranges to compare, in qemu-img's steps: not held by the image, (with the new
    /// backing file in the old chain) held by a layer above it, aligned out to `align`.
    fn plan(&self, prefix: Option<u32>) -> common::Result<Vec<Range<u64>>> {
        let size = self.top.size();
        let mut ranges = Vec::new();
        let mut offset = 0;
        while offset < size {
            let st = self.top.block_status(offset, CHUNK.min(size - offset))?;
            let mut n = st.len;
            if st.depth == 0 && st.allocation != Allocation::Unallocated {
                offset += n;
                continue;
            }
            if let (Some(depth), Some(old)) = (prefix, self.old) {
                // Past the old backing file's end it read as zeroes: compare there too.
                if offset < self.old_size {
                    let s = old.block_status(offset, n.min(self.old_size - offset))?;
                    n = s.len;
                    if s.allocation == Allocation::Unallocated || s.depth + 1 >= depth {
                        offset += n;
                        continue;
                    }
                }
            }
            let mut start = offset - offset % self.align;
            let mut end = (offset + n).next_multiple_of(self.align).min(size);
            // Aligned out over data the image holds (a cluster with allocated subclusters
            // when compressing): keep the range as it is instead, never overwrite that.
            if self.holds_any(start..offset)? || self.holds_any(offset + n..end)? {
                (start, end) = (offset, offset + n);
            }
            ranges.push(start..end);
            offset = end;
        }
        Ok(ranges)
    }

    /// Whether the image itself holds any byte of `range`.
    fn holds_any(&self, range: Range<u64>) -> common::Result<bool> {
        let mut pos = range.start;
        while pos < range.end {
            let st = self.top.block_status(pos, range.end - pos)?;
            if st.depth == 0 && st.allocation != Allocation::Unallocated {
                return Ok(true);
            }
            pos += st.len;
        }
        Ok(false)
    }

    /// The longest range `plan` makes: a chunk aligned out by one unit at each end.
    fn max_range(&self) -> u64 {
        CHUNK + 2 * self.align.min(CHUNK)
    }

    /// Compare one range in both backing files (read into `old` and `new`, each at least
    /// `max_range` long) and write where they differ.
    fn compare_and_copy(
        &self,
        range: Range<u64>,
        old: &mut [u8],
        new: &mut [u8],
    ) -> Result<(), String> {
        let offset = range.start;
        let n = (range.end - range.start) as usize;
        let read = |b: Option<&dyn BlockDriver>, size: u64, buf: &mut [u8], what: &str| {
            let have = size.saturating_sub(offset).min(n as u64) as usize;
            if let Some(b) = b.filter(|_| have > 0) {
                b.read_at(&mut buf[..have], offset)
                    .map_err(|_| format!("error while reading from {what} backing file"))?;
            }
            buf[have..n].fill(0);
            Ok::<_, String>(have)
        };
        let n_old = read(self.old, self.old_size, old, "old")?;
        read(self.new, self.new_size, new, "new")?;
        let (old, new) = (&old[..n], &new[..n]);
        let mut old_eof = n_old == 0;
        let mut done = 0;
        while done < n {
            let (differ, len) = compare(&old[done..], &new[done..], self.align as usize);
            if differ {
                let at = offset + done as u64;
                self.write(at, &old[done..done + len], old_eof)
                    .map_err(|e| format!("Error while writing to COW image: {e}"))?;
            }
            done += len;
            if offset + done as u64 >= self.old_size {
                old_eof = true;
            }
        }
        Ok(())
    }

    /// Write `data` at `at` into the image: as zeroes past the old backing file's end,
    /// compressed cluster by cluster with `-c`.
    fn write(&self, at: u64, data: &[u8], zeroes: bool) -> Result<(), String> {
        let r = if zeroes {
            self.top.write_zeroes(at, data.len() as u64, false)
        } else if self.compress {
            // Whole clusters (or the image's last one) compressed, anything else plainly.
            let size = self.top.size();
            let mut pos = at;
            data.chunks(self.align as usize).try_for_each(|c| {
                let whole = pos.is_multiple_of(self.align)
                    && (c.len() as u64 == self.align || pos + c.len() as u64 == size);
                let r = if whole {
                    self.image.write_compressed(pos, c)
                } else {
                    self.top.write_at(c, pos)
                };
                pos += c.len() as u64;
                r
            })
        } else {
            self.top.write_at(data, at)
        };
        r.map_err(|e| engine_msg(&e))
    }
}

/// Whether the first `unit` bytes of `a` and `b` differ, and how many bytes from the start
/// (whole units, the last one possibly short) all match or all differ alike.
fn compare(a: &[u8], b: &[u8], unit: usize) -> (bool, usize) {
    let len = a.len().min(b.len());
    let first = unit.min(len);
    let differ = a[..first] != b[..first];
    let mut i = first;
    while i < len {
        let n = unit.min(len - i);
        if (a[i..i + n] != b[i..i + n]) != differ {
            break;
        }
        i += n;
    }
    (differ, i)
}

#[cfg(test)]
mod tests {
    use super::compare;

    #[test]
    fn compares_in_units_like_qemu() {
        let a = [0u8, 0, 1, 1, 0, 0];
        let b = [0u8, 0, 0, 0, 0, 1];
        assert_eq!(compare(&a, &b, 2), (false, 2));
        assert_eq!(compare(&a[2..], &b[2..], 2), (true, 4));
        assert_eq!(compare(&a, &a, 4), (false, 6));
        assert_eq!(compare(&a[..5], &b[..5], 2), (false, 2));
    }
}
