//! Boot files from the host: kernels and initrds opened without blocking (a FIFO is refused,
//! not waited on), a kernel's bytes bounded by what its header says it needs, and the
//! scratch buffers the loaders use.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Largest kernel file vmm looks at (a vmlinux with debug information is well below it).
/// A larger file is refused from its size alone, before a byte of it is read.
pub const MAX_KERNEL_FILE: u64 = 1 << 30;

/// A zeroed scratch buffer mapped straight from the OS and unmapped on drop, so that the
/// tens of MiB the kernel loader uses for a moment (file image, decompression buffers, on
/// several threads) are not kept by the allocator and never count in vmm's memory.
pub struct Scratch {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: Scratch owns its mapping exclusively, like a Vec<u8>.
unsafe impl Send for Scratch {}

impl Scratch {
    pub fn new(len: usize) -> Result<Scratch, String> {
        if len == 0 {
            return Ok(Scratch {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                len,
            });
        }
        let p =
            crate::ram::map_anonymous(len).map_err(|e| format!("cannot map {len} bytes: {e}"))?;
        Ok(Scratch {
            ptr: p as *mut u8,
            len,
        })
    }
}

impl std::ops::Deref for Scratch {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` readable bytes (or a dangling pointer with len 0), owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: unmapping exactly the mapping made in `new`.
            unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
        }
    }
}

/// A kernel file's bytes, read-only: mapped from the page cache without a copy, or read
/// into a [`Scratch`] when the file cannot be mapped. A file truncated by someone else
/// while it is mapped would fault (SIGBUS); kernel images are not rewritten under a
/// starting VM, and the mapping lives only while loading.
pub enum FileImage {
    Mapped { ptr: *const u8, len: usize },
    Read(Scratch),
}

impl FileImage {
    /// The first `len` bytes of `f`; `populate` reads them in at once (one pass, instead
    /// of a fault per page), otherwise pages are read as they are touched.
    fn map(f: &File, len: usize, populate: bool) -> Result<FileImage, String> {
        if len != 0 {
            let flags = libc::MAP_PRIVATE | if populate { libc::MAP_POPULATE } else { 0 };
            // SAFETY: a fresh read-only mapping of a file we hold open.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    flags,
                    f.as_raw_fd(),
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                return Ok(FileImage::Mapped {
                    ptr: p as *const u8,
                    len,
                });
            }
        }
        let mut s = Scratch::new(len)?;
        std::io::Read::read_exact(&mut &*f, &mut s).map_err(|e| e.to_string())?;
        Ok(FileImage::Read(s))
    }
}

impl std::ops::Deref for FileImage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            // SAFETY: `len` readable bytes mapped in `map`, owned by self.
            FileImage::Mapped { ptr, len } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
            FileImage::Read(s) => s,
        }
    }
}

impl Drop for FileImage {
    fn drop(&mut self) {
        if let FileImage::Mapped { ptr, len } = *self {
            // SAFETY: unmapping exactly the mapping made in `map`.
            unsafe { libc::munmap(ptr as *mut libc::c_void, len) };
        }
    }
}

/// How many bytes of a kernel file starting with `head` the loaders read: a bzImage's
/// setup sectors and protected-mode code (`syssize` paragraphs, 32 bits wide from boot
/// protocol 2.04 on), bounded by the file's length `len`; the whole file for an older or
/// `syssize`-less bzImage (as QEMU reads it); None for an ELF file, whose loader reads only
/// its headers and segments. An error for a file that is neither.
pub fn kernel_extent(head: &[u8], len: u64) -> Result<Option<u64>, String> {
    if head.starts_with(b"\x7fELF") {
        return Ok(None);
    }
    if head.len() < 0x206 || &head[0x202..0x206] != b"HdrS" {
        return Err("not a bzImage or ELF kernel (no boot protocol header)".into());
    }
    let setup_sects = match head[0x1f1] {
        0 => 4,
        n => u64::from(n),
    };
    let version = u16::from_le_bytes([head[0x206], head[0x207]]);
    let syssize = u64::from(u32::from_le_bytes(head[0x1f4..0x1f8].try_into().unwrap()));
    if version < 0x0204 || syssize == 0 {
        return Ok(Some(len));
    }
    let need = (setup_sects + 1) * 512 + syssize * 16;
    // syssize is rounded up to a paragraph, so the file may end up to 15 bytes short.
    if need > len + 15 {
        return Err(format!(
            "truncated bzImage: its header says {need} bytes, the file has {len}"
        ));
    }
    Ok(Some(need.min(len)))
}

/// The bytes of the kernel file `f` the loaders need (see [`kernel_extent`]). A file larger
/// than [`MAX_KERNEL_FILE`] is refused before any of it is read.
pub fn kernel_image(f: &File) -> Result<FileImage, String> {
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    if len > MAX_KERNEL_FILE {
        return Err(format!(
            "{} MiB is larger than any kernel (at most {} MiB)",
            len >> 20,
            MAX_KERNEL_FILE >> 20
        ));
    }
    let mut head = [0u8; 1024];
    let n = read_prefix(f, &mut head)?;
    match kernel_extent(&head[..n], len)? {
        Some(need) => FileImage::map(f, need as usize, true),
        None => FileImage::map(f, len as usize, false),
    }
}

/// Read up to `buf.len()` bytes from the start of `f`; returns how many there were.
fn read_prefix(f: &File, buf: &mut [u8]) -> Result<usize, String> {
    use std::os::unix::fs::FileExt;
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(n)
}

/// Open a boot file (`what`: "kernel", "initrd") without blocking: `O_NONBLOCK` for the
/// open, so that a FIFO or a device waiting for a peer cannot hang vmm, then anything but
/// a regular file is refused.
pub fn open_boot_file(path: &Path, what: &str) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open {what} '{}': {e}", path.display()))?;
    let md = f
        .metadata()
        .map_err(|e| format!("cannot stat {what} '{}': {e}", path.display()))?;
    if !md.is_file() {
        return Err(format!("{what} '{}' is not a regular file", path.display()));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bz_head(setup_sects: u8, syssize: u32) -> Vec<u8> {
        let mut h = vec![0u8; 1024];
        h[0x1f1] = setup_sects;
        h[0x1f4..0x1f8].copy_from_slice(&syssize.to_le_bytes());
        h[0x202..0x206].copy_from_slice(b"HdrS");
        h[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        h
    }

    #[test]
    fn extent_follows_the_header() {
        assert_eq!(
            kernel_extent(&bz_head(3, 100), 1 << 20),
            Ok(Some(2048 + 1600))
        );
        assert_eq!(kernel_extent(&bz_head(0, 1), 1 << 20), Ok(Some(2560 + 16)));
        // A file up to a paragraph short of syssize is whole.
        assert_eq!(kernel_extent(&bz_head(1, 2), 1024 + 20), Ok(Some(1044)));
        assert_eq!(kernel_extent(&bz_head(1, 2), 1024 + 17), Ok(Some(1041)));
        assert!(kernel_extent(&bz_head(1, 2), 1024 + 16).is_err());
        assert!(kernel_extent(&bz_head(1, u32::MAX), 1 << 30)
            .unwrap_err()
            .contains("truncated"));
        assert_eq!(kernel_extent(b"\x7fELF\x02", 10), Ok(None));
        // No syssize, or a protocol before 2.04: the whole file.
        assert_eq!(kernel_extent(&bz_head(1, 0), 5000), Ok(Some(5000)));
        let mut old = bz_head(1, 2);
        old[0x206] = 0x03;
        assert_eq!(kernel_extent(&old, 5000), Ok(Some(5000)));
        assert!(kernel_extent(&[0u8; 1024], 1 << 20).is_err());
        assert!(kernel_extent(b"MZ", 2).is_err());
    }

    #[test]
    fn fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fifo");
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_boot_file(&p, "initrd").unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
