//! The bytes of a file's own data extents, as the file system maps them (`FS_IOC_FIEMAP`).
//!
//! `st_blocks` also counts the file system's bookkeeping for the file: on ext4 a file whose
//! data lies in more than four extents needs an extent-tree block, so two files holding the
//! same data can differ by 4 KiB depending on how the free space happened to be split. Tests
//! that compare the host space two images take compare their data extents instead.

use std::os::fd::AsRawFd;
use std::path::Path;

/// `struct fiemap` (linux/fiemap.h) with room for a batch of extents.
#[repr(C)]
struct FiemapRequest {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; BATCH],
}

/// `struct fiemap_extent`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

const BATCH: usize = 64;
/// `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// Write delayed allocations out first, so that they are mapped.
const FIEMAP_FLAG_SYNC: u32 = 1;
const FIEMAP_EXTENT_LAST: u32 = 1;

/// Sum of the lengths of `path`'s data extents (written and preallocated), or `None` when
/// the file system cannot tell (no FIEMAP support).
pub fn data_bytes(path: &Path) -> Option<u64> {
    let file = std::fs::File::open(path).ok()?;
    let mut total = 0u64;
    let mut start = 0u64;
    loop {
        let mut req = FiemapRequest {
            start,
            length: u64::MAX - start,
            flags: FIEMAP_FLAG_SYNC,
            mapped_extents: 0,
            extent_count: BATCH as u32,
            reserved: 0,
            extents: [FiemapExtent::default(); BATCH],
        };
        // SAFETY: `req` is a live, correctly laid out `struct fiemap` with room for
        // `extent_count` extents, which is all the kernel writes.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut req) };
        if rc != 0 {
            return None;
        }
        let got = &req.extents[..(req.mapped_extents as usize).min(BATCH)];
        let Some(last) = got.last() else {
            return Some(total);
        };
        total += got.iter().map(|e| e.length).sum::<u64>();
        if last.flags & FIEMAP_EXTENT_LAST != 0 {
            return Some(total);
        }
        start = last.logical + last.length;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// Five separate 4 KiB extents: 20 KiB of data, whatever the extent tree costs.
    #[test]
    fn counts_data_extents_only() {
        let dir = crate::tempdir();
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        for i in 0..5u64 {
            file.write_at(&[0xa5; 4096], i * 8192).unwrap();
        }
        file.set_len(200 << 10).unwrap();
        match data_bytes(&path) {
            Some(n) => assert_eq!(n, 5 * 4096),
            None => assert!(!crate::in_ci(), "no FIEMAP for {} in CI", path.display()),
        }
    }
}
