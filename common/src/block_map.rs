//! What formats that map fixed-size guest blocks to places in a file share (vpc, vdi,
//! vmdk, vhdx): cutting a guest range at block boundaries, zeroing stored bytes, and asking the
//! file whether data stored at its own offset is a hole.

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
            a => a,
        },
        ..st
    })
}
