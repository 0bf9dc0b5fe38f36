//! The storage layer under the formats: positional I/O on something file-like.
//!
//! Production uses [`FileStorage`]; tests put a fault-injecting or recording storage here.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

use crate::iovec::{self, IoBuf, IoBufMut, Segment};

/// Positional byte storage. All methods take `&self` and are safe to call concurrently.
pub trait Storage: Send + Sync {
    /// Fill `buf` from `offset`. Bytes past the end of the storage read as zeroes.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Fill `bufs`, in order, from `offset` (bytes past the end read as zeroes). By default
    /// one `read_at` per buffer, through a bounce buffer.
    fn read_vectored_at(&self, bufs: &[IoBufMut<'_>], offset: u64) -> io::Result<()> {
        let mut bounce = Vec::new();
        let mut pos = offset;
        for b in bufs {
            bounce.resize(b.len(), 0);
            self.read_at(&mut bounce, pos)?;
            b.copy_from(&bounce);
            pos += b.len() as u64;
        }
        Ok(())
    }
    /// Write all of `bufs`, in order, at `offset`. By default one `write_at` per buffer,
    /// through a bounce buffer.
    fn write_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> io::Result<()> {
        let mut bounce = Vec::new();
        let mut pos = offset;
        for b in bufs {
            bounce.resize(b.len(), 0);
            b.copy_to(&mut bounce);
            self.write_at(&bounce, pos)?;
            pos += b.len() as u64;
        }
        Ok(())
    }
    /// Make all completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the storage holds no bytes at all.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncate or extend to `len` bytes (new bytes read as zeroes).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Deallocate a range so that it reads as zeroes; may be a no-op that writes zeroes.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Reserve space for a range without changing its contents (posix_fallocate).
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Start of the next data region at or after `offset`, and where it ends, if the
    /// storage can tell holes from data (SEEK_DATA/SEEK_HOLE). `None` past the last data.
    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>>;
    /// What the run of bytes at `offset` (up to `end`, the storage's length at most) is,
    /// and where it ends. By default from [`Storage::next_data`]: data or a hole.
    fn run_at(&self, offset: u64, end: u64) -> io::Result<(StorageRun, u64)> {
        Ok(match self.next_data(offset)? {
            Some((start, stop)) if start <= offset && stop > offset => {
                (StorageRun::Data, stop.min(end))
            }
            Some((start, _)) => (StorageRun::Hole, start.max(offset + 1).min(end)),
            None => (StorageRun::Hole, end),
        })
    }
    /// Bytes actually allocated on the host.
    fn allocated_size(&self) -> io::Result<u64>;
    /// The open file under this storage, for copies the kernel makes between files.
    fn file(&self) -> Option<&File> {
        None
    }
}

/// What a run of a storage's bytes is, as [`Storage::run_at`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageRun {
    /// Allocated, with data.
    Data,
    /// Allocated, but reads as zeroes (an NBD server's zero flag without its hole flag).
    AllocatedZero,
    /// A hole: reads as zeroes.
    Hole,
    /// A hole that may read non-zero (an NBD server's hole flag without its zero flag).
    UnsureHole,
}

/// Copy `len` bytes at `from_offset` of `from` to `to_offset` of `to` inside the kernel
/// (copy_file_range). `Ok(false)` when the files do not allow it (a kernel or filesystem
/// without it, a range past the end of `from`): the caller copies by reading and writing.
pub fn copy_between(
    from: &File,
    from_offset: u64,
    to: &File,
    to_offset: u64,
    len: u64,
) -> io::Result<bool> {
    let (mut src, mut dst, mut left) = (from_offset as i64, to_offset as i64, len);
    while left > 0 {
        let step = left.min(1 << 30) as usize;
        // SAFETY: valid fds and offsets owned by this frame; the kernel copies between
        // the files and writes only the two offsets.
        let n = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut src,
                to.as_raw_fd(),
                &mut dst,
                step,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOSYS | libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP) => Ok(false),
                _ => Err(e),
            };
        }
        if n == 0 {
            return Ok(false);
        }
        left -= n as u64;
    }
    Ok(true)
}

/// A [`Storage`] on an open file.
pub struct FileStorage {
    file: File,
    /// Set when the file was opened with O_DIRECT.
    direct: Option<crate::direct_io::DirectIo>,
    /// Flushes do nothing (QEMU's `cache=unsafe`).
    no_flush: bool,
}

impl FileStorage {
    /// Wrap an open file.
    pub fn new(file: File) -> Self {
        FileStorage {
            file,
            direct: None,
            no_flush: false,
        }
    }

    /// Wrap a file opened with O_DIRECT (see [`open_image_file`]).
    pub fn new_direct(file: File) -> io::Result<Self> {
        let direct = crate::direct_io::DirectIo::new(&file)?;
        Ok(FileStorage {
            file,
            direct: Some(direct),
            no_flush: false,
        })
    }

    /// The same storage with flushes ignored, as QEMU's `cache=unsafe`: nothing is made
    /// durable before the kernel writes it back by itself.
    pub fn ignoring_flushes(self) -> Self {
        FileStorage {
            no_flush: true,
            ..self
        }
    }

    /// The underlying file (for locking).
    pub fn file(&self) -> &File {
        &self.file
    }
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Most buffers one preadv/pwritev takes (Linux's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// Call `op` (one preadv or pwritev of a list at an offset, returning the bytes moved)
/// until all of `bufs` has moved or `op` moves nothing; returns what had not moved then.
/// Only a partial transfer copies the list (to advance it), so the usual single call
/// allocates nothing.
fn transfer<B: Segment>(
    bufs: &[B],
    offset: u64,
    op: impl Fn(&[B], u64) -> libc::ssize_t,
) -> io::Result<Vec<B>> {
    let mut left = iovec::total_len(bufs);
    let mut rest = bufs;
    let mut advanced: Vec<B>;
    let mut pos = offset;
    while left > 0 {
        let chunk = &rest[..rest.len().min(IOV_MAX)];
        let r = op(chunk, pos);
        if r == 0 {
            if iovec::total_len(chunk) == 0 {
                // A run of empty buffers moves nothing without being the end of the file.
                rest = &rest[chunk.len()..];
                continue;
            }
            return Ok(rest.to_vec());
        }
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = r as usize;
        (pos, left) = (pos + n as u64, left - n);
        if left > 0 {
            let mut f = iovec::Front::new(rest);
            f.take(n);
            advanced = f.take(left);
            rest = &advanced;
        }
    }
    Ok(Vec::new())
}

/// Fill `bufs` from `offset` of `file` with preadv; bytes past the end read as zeroes.
pub(crate) fn preadv_all(file: &File, bufs: &[IoBufMut<'_>], offset: u64) -> io::Result<()> {
    let past_end = transfer(bufs, offset, |l, pos| {
        // SAFETY: IoBufMut has the layout of iovec, and its contract makes each of the
        // entries writable memory for the duration of the call.
        unsafe {
            libc::preadv(
                file.as_raw_fd(),
                l.as_ptr() as *const libc::iovec,
                l.len() as libc::c_int,
                pos as libc::off_t,
            )
        }
    })?;
    iovec::zero(&past_end);
    Ok(())
}

/// Write all of `bufs` at `offset` of `file` with pwritev.
pub(crate) fn pwritev_all(file: &File, bufs: &[IoBuf<'_>], offset: u64) -> io::Result<()> {
    let unwritten = transfer(bufs, offset, |l, pos| {
        // SAFETY: IoBuf has the layout of iovec, and its contract makes each of the
        // entries readable memory for the duration of the call.
        unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                l.as_ptr() as *const libc::iovec,
                l.len() as libc::c_int,
                pos as libc::off_t,
            )
        }
    })?;
    if !unwritten.is_empty() {
        return Err(io::ErrorKind::WriteZero.into());
    }
    Ok(())
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_vectored_at(&[buf.into()], offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_vectored_at(&[buf.into()], offset)
    }

    fn read_vectored_at(&self, bufs: &[IoBufMut<'_>], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(d) => d.read_vectored_at(&self.file, bufs, offset),
            None => preadv_all(&self.file, bufs, offset),
        }
    }

    fn write_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(d) => d.write_vectored_at(&self.file, bufs, offset),
            None => pwritev_all(&self.file, bufs, offset),
        }
    }

    fn flush(&self) -> io::Result<()> {
        if self.no_flush {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        let meta = self.file.metadata()?;
        if meta.is_file() {
            return Ok(meta.len());
        }
        // A device's size is where its end is (QEMU's raw_getlength); positional I/O
        // never uses the file offset this moves.
        // SAFETY: lseek on a valid, owned fd with plain integer arguments.
        let end = unsafe { libc::lseek(self.file.as_raw_fd(), 0, libc::SEEK_END) };
        u64::try_from(end).map_err(|_| io::Error::last_os_error())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on a valid fd with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        match cvt(r) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let zeros = vec![0u8; len.min(1 << 20) as usize];
                let mut pos = offset;
                while pos < offset + len {
                    let n = (offset + len - pos).min(zeros.len() as u64) as usize;
                    self.write_at(&zeros[..n], pos)?;
                    pos += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: posix_fallocate on a valid fd with plain integer arguments.
        let r = unsafe {
            libc::posix_fallocate(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(())
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let fd = self.file.as_raw_fd();
        // SAFETY: lseek on a valid fd.
        let data = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                // Filesystems without SEEK_DATA: everything up to EOF is data.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    let len = self.len()?;
                    Ok((offset < len).then_some((offset, len)))
                }
                _ => Err(e),
            };
        }
        // SAFETY: lseek on a valid fd.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some((data as u64, hole as u64)))
    }

    fn allocated_size(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }

    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }
}

/// Open an image file (read-write unless `read_only`) without ever blocking, and refuse
/// anything that is not a regular file or a device (QEMU's 'host_device' takes block and
/// character devices).
///
/// The open uses `O_NONBLOCK`, so a FIFO (or a character device that would wait for a
/// peer) cannot hang the caller; the file type is then checked and `O_NONBLOCK` cleared
/// again so the descriptor behaves like one from a plain open. Errors are one line:
/// "Could not open '<path>': <strerror>" from the open itself, and, like QEMU's 'file'
/// driver, "'file' driver requires '<path>' to be a regular file" for other file types.
pub fn open_image_file(path: &std::path::Path, read_only: bool) -> crate::Result<File> {
    open_image_file_with(
        std::fs::OpenOptions::new().read(true).write(!read_only),
        path,
        0,
    )
}

/// Whether `ft` is a block or character device, which QEMU opens as 'host_device' (no
/// truncation, a fixed size).
pub fn is_device(ft: &std::fs::FileType) -> bool {
    use std::os::unix::fs::FileTypeExt;
    ft.is_block_device() || ft.is_char_device()
}

/// Open (creating it if needed) and lock the file of an image about to be created, without
/// truncating it: like QEMU, the lock comes first, so that an image in use by someone else
/// is not clobbered. The caller truncates it.
pub fn open_new_image_file(path: &std::path::Path) -> crate::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| crate::Error::io(format!("Could not create '{}'", path.display()), e))?;
    crate::lock::lock_image_perms(&file, path, crate::lock::Perms::CREATE)?;
    Ok(file)
}

/// Open an image file as storage; with `direct`, bypassing the host page cache (O_DIRECT).
pub fn open_image_storage(
    path: &std::path::Path,
    read_only: bool,
    direct: bool,
) -> crate::Result<FileStorage> {
    if !direct {
        return Ok(FileStorage::new(open_image_file(path, read_only)?));
    }
    let file = open_image_file_with(
        std::fs::OpenOptions::new().read(true).write(!read_only),
        path,
        libc::O_DIRECT,
    )?;
    FileStorage::new_direct(file).map_err(|e| {
        crate::Error::io(
            format!(
                "Could not open '{}' with O_DIRECT (cache=none)",
                path.display()
            ),
            e,
        )
    })
}

/// [`open_image_file`] with the caller's access mode: `opts` gets `O_NONBLOCK` added for
/// the open, and the same file type check applies.
fn open_image_file_with(
    opts: &mut std::fs::OpenOptions,
    path: &std::path::Path,
    flags: i32,
) -> crate::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let open_err = |e| crate::Error::io(format!("Could not open '{}'", path.display()), e);
    let file = opts
        .custom_flags(libc::O_NONBLOCK | flags)
        .open(path)
        .map_err(open_err)?;
    let ft = file.metadata().map_err(open_err)?.file_type();
    if !(ft.is_file() || is_device(&ft)) {
        return Err(crate::Error::invalid(format!(
            "'file' driver requires '{}' to be a regular file",
            path.display()
        )));
    }
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a valid, owned fd with plain integer arguments.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) }).map_err(open_err)?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) }).map_err(open_err)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// preadv/pwritev move every byte to the right place, past IOV_MAX buffers and empty
    /// ones, and a read past the end of the file fills zeroes; the direct-I/O fallback
    /// (one transfer per buffer) agrees.
    #[test]
    fn vectored_io_matches_plain_io() {
        // tmpfs has no O_DIRECT: use the build's target directory, which is on disk.
        let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).unwrap();
        for direct in [false, true] {
            let p = dir.path().join(format!("v{direct}"));
            std::fs::write(&p, vec![0u8; 8192]).unwrap();
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .unwrap();
            let st = if direct {
                open_image_storage(&p, false, true).unwrap()
            } else {
                FileStorage::new(f)
            };
            // 1500 pieces of 4 bytes (plus empty ones) at offset 4096: more than IOV_MAX.
            let data: Vec<u8> = (0..6000u32).map(|i| (i * 7 + 3) as u8).collect();
            let mut bufs: Vec<IoBuf<'_>> = data.chunks(4).map(IoBuf::from).collect();
            bufs.insert(10, IoBuf::from(&[][..]));
            st.write_vectored_at(&bufs, 4096).unwrap();
            let mut plain = vec![0u8; 6000];
            st.read_at(&mut plain, 4096).unwrap();
            assert_eq!(plain, data);
            // Read back across the end of the file (4096 + 6000 < 12288): zeroes there.
            let mut back = vec![0xffu8; 8192];
            let parts: Vec<IoBufMut<'_>> = back.chunks_mut(3).map(IoBufMut::from).collect();
            st.read_vectored_at(&parts, 4096).unwrap();
            assert_eq!(&back[..6000], &data[..]);
            assert!(back[6000..].iter().all(|&b| b == 0));
        }
    }

    /// More than IOV_MAX empty buffers before the data: the empty run is not taken for the
    /// end of the file, in either direction.
    #[test]
    fn a_long_run_of_empty_buffers_is_not_end_of_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e");
        std::fs::write(&p, [7u8; 512]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let st = FileStorage::new(f);
        let mut got = [0u8; 16];
        let mut parts: Vec<IoBufMut<'_>> = (0..IOV_MAX + 100)
            .map(|_| IoBufMut::from(&mut [][..]))
            .collect();
        parts.push(IoBufMut::from(&mut got[..]));
        st.read_vectored_at(&parts, 100).unwrap();
        assert_eq!(got, [7u8; 16]);
        let data = [9u8; 16];
        let mut out: Vec<IoBuf<'_>> = (0..IOV_MAX + 100).map(|_| IoBuf::from(&[][..])).collect();
        out.push(IoBuf::from(&data[..]));
        st.write_vectored_at(&out, 200).unwrap();
        let mut back = [0u8; 16];
        st.read_at(&mut back, 200).unwrap();
        assert_eq!(back, data);
    }

    /// With flushes ignored nothing reaches fdatasync: on /dev/null, where fdatasync fails,
    /// the flush succeeds only then.
    #[test]
    fn ignored_flushes_do_not_sync() {
        let f = || std::fs::File::open("/dev/null").unwrap();
        assert!(FileStorage::new(f()).flush().is_err());
        FileStorage::new(f()).ignoring_flushes().flush().unwrap();
    }

    /// A failing preadv/pwritev is reported, not retried forever or taken as end of file.
    #[test]
    fn vectored_io_errors_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let st = FileStorage::new(File::open(dir.path()).unwrap());
        let mut b = [0u8; 8];
        let e = st
            .read_vectored_at(&[IoBufMut::from(&mut b[..])], 0)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EISDIR), "{e}");
        let p = dir.path().join("ro");
        std::fs::write(&p, b"data").unwrap();
        let st = FileStorage::new(File::open(&p).unwrap());
        let e = st
            .write_vectored_at(&[IoBuf::from(&b"x"[..])], 0)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
    }

    fn mkfifo(p: &std::path::Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn open_image_file_refuses_fifo_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.fifo");
        mkfifo(&p);
        // Read-only: O_NONBLOCK makes the open return at once; read-write on a FIFO
        // never blocks either. Both are refused by type.
        for ro in [true, false] {
            let e = open_image_file(&p, ro).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "'file' driver requires '{}' to be a regular file",
                    p.display()
                )
            );
        }
        // A directory is refused too (read-only; read-write fails at open with EISDIR).
        let e = open_image_file(dir.path(), true).unwrap_err();
        assert!(e.to_string().contains("to be a regular file"), "{e}");
        let e = open_image_file(dir.path(), false).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("Could not open '{}': Is a directory", dir.path().display())
        );
    }

    #[test]
    fn open_image_file_regular_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.img");
        let e = open_image_file(&p, true).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "Could not open '{}': No such file or directory",
                p.display()
            )
        );
        std::fs::write(&p, b"abc").unwrap();
        let f = open_image_file(&p, false).unwrap();
        // SAFETY: F_GETFL on a valid fd.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0, "O_NONBLOCK is cleared");
        let s = FileStorage::new(f);
        s.write_at(b"xy", 1).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"axy");
        let ro = open_image_file(&p, true).unwrap();
        assert!(FileStorage::new(ro).write_at(b"z", 0).is_err());
    }

    #[test]
    fn open_image_file_dev_null_is_an_empty_device() {
        // qemu-img opens a character device through 'host_device': /dev/null is 0 bytes.
        let f = open_image_file(std::path::Path::new("/dev/null"), true).unwrap();
        assert!(is_device(&f.metadata().unwrap().file_type()));
        assert_eq!(FileStorage::new(f).len().unwrap(), 0);
    }
}
