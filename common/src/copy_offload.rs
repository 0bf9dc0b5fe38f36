//! Copy offloading (`convert -C`): guest data moved between image files by the kernel,
//! never through this process, where both ends allow it.

use crate::driver::{Allocation, BlockDriver};
use crate::error::Result;
use crate::open::Image;

/// Copy `len` guest bytes at `src_offset` of `src` to `dst_offset` of `dst` in the
/// kernel: done for a raw or qcow2 target (into the clusters the data lands in), from data
/// any layer of the source chain stores plainly in its file. `Ok(false)` otherwise (compressed data, zeroes, a file that refuses),
/// with part of the range perhaps copied: the caller then reads and writes it all.
pub fn copy_range(
    src: &dyn BlockDriver,
    src_offset: u64,
    dst: &Image,
    dst_offset: u64,
    len: u64,
) -> Result<bool> {
    let copy_in = |file, host, at, len| match dst {
        Image::Raw(to) => to.copy_in(file, host, at, len),
        Image::Qcow2(to) => to.copy_in(file, host, at, len),
        _ => Ok(false),
    };
    if !matches!(dst, Image::Raw(_) | Image::Qcow2(_)) {
        return Ok(false);
    }
    let mut done = 0;
    while done < len {
        let st = src.block_status(src_offset + done, len - done)?;
        let host = match (st.allocation, st.host_offset) {
            (Allocation::Data, Some(h)) if !st.compressed => h,
            _ => return Ok(false),
        };
        let Some(file) = layer(src, st.depth).and_then(|l| l.data_file()) else {
            return Ok(false);
        };
        if !copy_in(file, host, dst_offset + done, st.len)? {
            return Ok(false);
        }
        done += st.len;
    }
    Ok(true)
}

/// The layer `depth` levels below `top`.
fn layer(top: &dyn BlockDriver, depth: u32) -> Option<&dyn BlockDriver> {
    let mut l = top;
    for _ in 0..depth {
        l = l.backing()?;
    }
    Some(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::open::{open_image, OpenOptions};

    fn open(path: &std::path::Path, read_only: bool) -> Image {
        let opts = OpenOptions {
            read_only,
            ..Default::default()
        };
        crate::lock::retry_while_locked(|| open_image(path, &opts)).unwrap()
    }

    #[test]
    fn the_kernel_copies_between_raw_files_and_refuses_what_it_cannot() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&a, &data).unwrap();
        std::fs::write(&b, vec![0u8; 2 << 20]).unwrap();
        let (src, dst) = (open(&a, true), open(&b, false));
        assert!(copy_range(src.driver(), 4096, &dst, 1 << 20, 65536).unwrap());
        let mut got = vec![0u8; 65536];
        dst.driver().read_at(&mut got, 1 << 20).unwrap();
        assert_eq!(got, data[4096..4096 + 65536]);
        // Past the source's end: nothing to copy there, the caller must read and write.
        assert!(!copy_range(src.driver(), 1 << 20, &dst, 0, 4096).unwrap_or(false));
        // Into a read-only target: an error, not a copy.
        drop(dst);
        assert!(copy_range(src.driver(), 0, &open(&b, true), 0, 4096).is_err());
    }

    /// Into qcow2: whole clusters, a cluster already allocated (written in place) and
    /// partial clusters at both ends (copied on write) all read back, and qemu-img finds
    /// the image clean and equal.
    #[test]
    fn the_kernel_copies_into_qcow2_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let (a, q) = (dir.path().join("a.raw"), dir.path().join("q.qcow2"));
        let data: Vec<u8> = (0..4 << 20).map(|i| (i % 253) as u8 | 1).collect();
        std::fs::write(&a, &data).unwrap();
        let (qs, as_) = (q.to_str().unwrap(), a.to_str().unwrap());
        crate::test_tools::qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", qs, "4M"]);
        crate::test_tools::qemu_ok("qemu-io", &["-c", "write -P 9 1M 64k", qs]);
        let (src, dst) = (open(&a, true), open(&q, false));
        // Whole clusters over an allocated one, then partial clusters at both ends.
        assert!(copy_range(src.driver(), 512 << 10, &dst, 512 << 10, 1 << 20).unwrap());
        assert!(copy_range(src.driver(), 3000, &dst, 3000, 70000).unwrap());
        assert!(copy_range(src.driver(), 3 << 20, &dst, 3 << 20, 1 << 20).unwrap());
        dst.driver().flush().unwrap();
        drop(dst);
        crate::test_tools::qemu_ok("qemu-img", &["check", qs]);
        let mut want = vec![0u8; 4 << 20];
        for (at, len) in [(512 << 10, 1 << 20), (3000, 70000), (3 << 20, 1 << 20)] {
            want[at..at + len].copy_from_slice(&data[at..at + len]);
        }
        std::fs::write(&a, &want).unwrap();
        crate::test_tools::qemu_ok(
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", "raw", qs, as_],
        );
    }
}
