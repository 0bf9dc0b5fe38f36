//! The storage layer under the formats: positional I/O on something file-like.
//!
//! Production uses [`FileStorage`]; tests put a fault-injecting or recording storage here.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Positional byte storage. All methods take `&self` and are safe to call concurrently.
pub trait Storage: Send + Sync {
    /// Fill `buf` from `offset`. Bytes past the end of the storage read as zeroes.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
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
    /// Bytes actually allocated on the host.
    fn allocated_size(&self) -> io::Result<u64>;
}

/// A [`Storage`] on an open file.
pub struct FileStorage {
    file: File,
}

impl FileStorage {
    /// Wrap an open file.
    pub fn new(file: File) -> Self {
        FileStorage { file }
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

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
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
}
