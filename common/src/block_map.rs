//! What formats that map fixed-size guest blocks to places in a file share (vpc, vdi,
//! vmdk, vhdx): cutting a guest range at block boundaries, zeroing stored bytes, and asking the
//! file whether data stored at its own offset is a hole; reading their tables of entries.

use crate::driver::{Allocation, BlockStatus};
use crate::error::{Error, Result};
use crate::storage::Storage;

/// `len` guest bytes at `offset` cut where blocks of `block_size` bytes end: (offset, bytes).
pub(crate) fn pieces(block_size: u64, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        (pos < end).then(|| {
            let n = (block_size - pos % block_size).min(end - pos);
            let p = (pos, n);
            pos += n;
            p
        })
    })
}

/// Make `n` stored bytes at `at` read as zeroes: a hole when `unmap`, else zero bytes
/// written (a MiB at a time at most).
pub(crate) fn zero_stored(storage: &dyn Storage, at: u64, n: u64, unmap: bool) -> Result<()> {
    let fail = |e| Error::io("Failed to write zeroes", e);
    if unmap {
        return storage.punch_hole(at, n).map_err(fail);
    }
    let zeros = vec![0u8; n.min(1 << 20) as usize];
    let mut done = 0;
    while done < n {
        let k = (n - done).min(zeros.len() as u64);
        storage
            .write_at(&zeros[..k as usize], at + done)
            .map_err(fail)?;
        done += k;
    }
    Ok(())
}

/// Status of `n` bytes of data stored at `host` of `storage`, asking the file as QEMU does
/// for data kept at a fixed place (a fixed VHD, a static VDI, a flat vmdk extent): where
/// the file has a hole, the data reads as zeroes.
pub(crate) fn stored_data_status(storage: &dyn Storage, host: u64, n: u64) -> Result<BlockStatus> {
    let st = crate::raw::file_status(storage, host, n)?;
    Ok(BlockStatus {
        allocation: match st.allocation {
            Allocation::Zero => Allocation::DataOverHole,
            // Only the file's zero flag refines the format's data (QEMU's rule).
            Allocation::Undetermined => Allocation::Data,
            a => a,
        },
        ..st
    })
}

/// `n` table entries of `width` (4 or 8) bytes at `at`, big- or little-endian; bytes past
/// the end of the file read as zero, as QEMU reads them. The caller bounds `n`.
pub(crate) fn read_entries(
    storage: &dyn Storage,
    at: u64,
    n: u64,
    width: usize,
    big_endian: bool,
) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; n as usize * width];
    storage
        .read_at(&mut raw, at)
        .map_err(|e| Error::io("Could not read a mapping table", e))?;
    Ok(raw
        .chunks_exact(width)
        .map(|c| decode(c, big_endian))
        .collect())
}

fn decode(c: &[u8], big_endian: bool) -> u64 {
    let mut b = [0u8; 8];
    if big_endian {
        b[8 - c.len()..].copy_from_slice(c);
        u64::from_be_bytes(b)
    } else {
        b[..c.len()].copy_from_slice(c);
        u64::from_le_bytes(b)
    }
}

/// A table of entries read once at open (an L1 table, a block allocation table): only
/// the part inside the file is held, so a hostile entry count costs no memory; entries
/// past the end of the file are zero, as QEMU reads them.
#[derive(Debug, Default)]
pub(crate) struct StoredTable {
    entries: Vec<u64>,
}

impl StoredTable {
    /// `n` entries of `width` bytes at `at` of `storage`.
    pub(crate) fn read(
        storage: &dyn Storage,
        at: u64,
        n: u64,
        width: usize,
        big_endian: bool,
    ) -> Result<StoredTable> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io("Could not get the image size", e))?;
        let in_file = file_len.saturating_sub(at).div_ceil(width as u64).min(n);
        Ok(StoredTable {
            entries: read_entries(storage, at, in_file, width, big_endian)?,
        })
    }

    /// Entry `i` (zero past the stored part).
    pub(crate) fn get(&self, i: u64) -> u64 {
        usize::try_from(i)
            .ok()
            .and_then(|i| self.entries.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// How many entries from `i` on (at most `max`) are zero.
    pub(crate) fn zero_run(&self, i: u64, max: u64) -> u64 {
        // Past the stored part every entry is zero: only stored entries can end the run.
        let end = (self.entries.len() as u64).min(i.saturating_add(max));
        (i..end)
            .find(|&k| self.entries[k as usize] != 0)
            .map_or(max, |k| k - i)
    }

    /// The stored entries, in order (the rest are zero).
    pub(crate) fn stored(&self) -> &[u64] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::StoredTable;

    #[test]
    fn zero_runs_end_at_a_stored_entry_or_run_to_the_end() {
        let t = StoredTable {
            entries: vec![5, 0, 0, 7, 0],
        };
        assert_eq!(t.zero_run(0, 10), 0);
        assert_eq!(t.zero_run(1, 10), 2);
        assert_eq!(t.zero_run(1, 1), 1);
        assert_eq!(t.zero_run(4, 3), 3, "zero past the stored part");
        assert_eq!(t.zero_run(9, 3), 3);
    }

    /// A run over 2^50 entries past a short table is one step, not one per entry (the
    /// qcow and qed maps ask for one over every table a huge request covers).
    #[test]
    fn a_huge_zero_run_past_the_table_is_immediate() {
        let t = StoredTable {
            entries: vec![0, 0],
        };
        let started = std::time::Instant::now();
        assert_eq!(t.zero_run(0, 1 << 50), 1 << 50);
        assert_eq!(t.zero_run(u64::MAX - 3, 1 << 50), 1 << 50);
        assert!(started.elapsed().as_secs() < 5, "stepped entry by entry");
    }
}
