//! The driver of the formats the engine reads but never writes (qed, qcow version 1,
//! parallels): each format says where a guest range lives ([`GuestMap`]); reading, block
//! status, the backing file and the refusal of every write are shared here.

use crate::backing::BackingRef;
use crate::check::{CheckReport, Fix};
use crate::driver::{check_range, Allocation, BlockDriver, BlockStatus, Clusters};
use crate::error::{io_err, Error, Result};
use crate::format::Format;
use crate::iovec::{self, IoBuf, IoBufMut};
use crate::storage::Storage;

/// Where a run of guest bytes lives in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapped {
    /// Stored plainly at this host offset (of the run's first byte).
    Data(u64),
    /// The whole cluster holding the run is stored deflated (raw deflate, QEMU's zlib):
    /// `len` bytes at host `at`.
    Compressed { at: u64, len: u64 },
    /// Reads as zeroes (a zero cluster).
    Zero,
    /// Not in this image: the backing file's, or zeroes.
    Unallocated,
}

/// A format's map from guest offsets to the image file.
pub trait GuestMap: Send + Sync {
    /// What guest `pos` maps to and for how many bytes from `pos` (at least 1, at most
    /// `len`) the same holds (contiguous host bytes for data).
    fn lookup(&self, storage: &dyn Storage, pos: u64, len: u64) -> Result<(Mapped, u64)>;

    /// The cluster (block) size.
    fn cluster_size(&self) -> u64;

    /// The cluster size `info` prints, or `None` for a format that gives QEMU no driver
    /// information (nor, then, a dirty flag).
    fn info_cluster_size(&self) -> Option<u64> {
        Some(self.cluster_size())
    }

    /// `qemu-img check` for the format, repairing through `storage` what `fix` allows
    /// where QEMU repairs; `None` where QEMU has no check.
    fn check(&self, _storage: &dyn Storage, _size: u64, _fix: Fix) -> Option<CheckReport> {
        None
    }
}

/// What a format's open found, for [`ReadOnlyImage::new`].
pub struct Opened {
    pub format: Format,
    pub size: u64,
    pub map: Box<dyn GuestMap>,
    pub backing: Option<BackingRef>,
    /// Opened for its metadata only: the data needs a key (AES-encrypted qcow).
    pub encrypted: bool,
}

/// An open image of a format the engine only reads.
pub struct ReadOnlyImage {
    storage: Box<dyn Storage>,
    opened: Opened,
    below: Option<Box<dyn BlockDriver>>,
}

/// Open an image of one of the formats the engine only reads (`metadata_only`: for `info`,
/// see [`crate::open::OpenOptions::metadata_only`]).
pub fn open(format: Format, storage: &dyn Storage, metadata_only: bool) -> Result<Opened> {
    match format {
        Format::Qed => crate::qed::open(storage),
        Format::Qcow => crate::qcow1::open(storage, metadata_only),
        Format::Parallels => crate::parallels::open(storage),
        _ => Err(Error::Unsupported(format!(
            "{} is not a read-only format",
            format.name()
        ))),
    }
}

impl ReadOnlyImage {
    /// The image `opened` on `storage`; refused when asked for writing, unless only for
    /// `check`'s repairs (`for_check`).
    pub fn new(
        storage: Box<dyn Storage>,
        opened: Opened,
        read_only: bool,
        for_check: bool,
    ) -> Result<Self> {
        if !read_only && !for_check {
            return Err(opened.format.read_only_error());
        }
        Ok(ReadOnlyImage {
            storage,
            opened,
            below: None,
        })
    }

    /// Which format the image is.
    pub fn format(&self) -> Format {
        self.opened.format
    }

    /// The storage under the image.
    pub fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    /// Whether the image's data is encrypted (and so unreadable here).
    pub fn encrypted(&self) -> bool {
        self.opened.encrypted
    }

    /// The cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.opened.map.cluster_size()
    }

    /// The cluster size `info` prints, if it prints one.
    pub fn info_cluster_size(&self) -> Option<u64> {
        self.opened.map.info_cluster_size()
    }

    /// Attach the opened backing file (the chain opener does).
    pub fn set_backing(&mut self, below: Box<dyn BlockDriver>) {
        self.below = Some(below);
    }

    /// `qemu-img check`, repairing what `fix` allows (the image must have been opened
    /// for writing). It reads the image afresh, so that a check after a repair sees what
    /// the repair wrote. Unsupported for a format QEMU cannot check.
    pub fn check(&self, fix: Fix) -> Result<CheckReport> {
        let fresh = open(self.opened.format, &*self.storage, false)?;
        fresh
            .map
            .check(&*self.storage, fresh.size, fix)
            .ok_or(Error::Unsupported("checks".into()))
    }

    /// The decompressed cluster holding guest `pos`, stored as `len` bytes at `at`.
    fn inflate(&self, pos: u64, at: u64, len: u64) -> Result<Vec<u8>> {
        let cs = self.cluster_size();
        // The cluster's stored bytes never exceed a cluster (QEMU's bound).
        let mut input = vec![0u8; len.min(cs) as usize];
        self.storage
            .read_at(&mut input, at)
            .map_err(io_err("Could not read a compressed cluster"))?;
        let mut out = vec![0u8; cs as usize];
        crate::qcow2::compress::decompress(
            crate::qcow2::header::CompressionType::Zlib,
            &input,
            &mut out,
        )
        .map_err(|_| {
            Error::corrupt(format!(
                "the compressed cluster of guest offset {} does not decompress",
                pos - pos % cs
            ))
        })?;
        Ok(out)
    }
}

impl BlockDriver for ReadOnlyImage {
    fn format_name(&self) -> &'static str {
        self.opened.format.name()
    }

    fn size(&self) -> u64 {
        self.opened.size
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn read_vectored_at(&self, bufs: &[IoBufMut<'_>], offset: u64) -> Result<()> {
        let len = iovec::total_len(bufs) as u64;
        check_range(offset, len, self.opened.size)?;
        if self.opened.encrypted {
            return Err(Error::Unsupported(crate::qcow1::ENCRYPTED.into()));
        }
        let mut front = iovec::Front::new(bufs);
        let mut pos = offset;
        while front.remaining() > 0 {
            let want = front.remaining() as u64;
            let (m, n) = self.opened.map.lookup(&*self.storage, pos, want)?;
            let part = front.take(n as usize);
            match m {
                Mapped::Data(h) => self
                    .storage
                    .read_vectored_at(&part, h)
                    .map_err(io_err("Could not read image data"))?,
                Mapped::Compressed { at, len } => {
                    let c = self.inflate(pos, at, len)?;
                    let i = (pos % self.cluster_size()) as usize;
                    iovec::scatter(&part, &c[i..i + n as usize]);
                }
                Mapped::Zero => iovec::zero(&part),
                Mapped::Unallocated => crate::backing::read_below(self.backing(), &part, pos)?,
            }
            pos += n;
        }
        Ok(())
    }

    fn write_vectored_at(&self, _bufs: &[IoBuf<'_>], _offset: u64) -> Result<()> {
        Err(Error::ReadOnly)
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> Result<()> {
        Err(Error::ReadOnly)
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(Error::ReadOnly)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range(offset, len, self.opened.size)?;
        if len == 0 {
            return Err(Error::invalid("block_status of an empty range"));
        }
        let (m, n) = self.opened.map.lookup(&*self.storage, offset, len)?;
        let status = |allocation, host_offset, compressed| BlockStatus {
            len: n,
            allocation,
            depth: 0,
            host_offset,
            compressed,
        };
        Ok(match m {
            Mapped::Data(h) => status(Allocation::Data, Some(h), false),
            Mapped::Compressed { .. } => status(Allocation::Data, None, true),
            Mapped::Zero => status(Allocation::Zero, None, false),
            Mapped::Unallocated => crate::backing::status_below(self.backing(), offset, n)?
                .unwrap_or_else(|| status(Allocation::Unallocated, None, false)),
        })
    }

    fn clusters(&self) -> Option<Clusters> {
        let cs = self.cluster_size();
        Some(Clusters {
            cluster: cs,
            subcluster: cs,
        })
    }

    fn allocated_file_size(&self) -> Result<u64> {
        self.storage
            .allocated_size()
            .map_err(io_err("Failed to get the allocated file size"))
    }

    fn backing(&self) -> Option<&dyn BlockDriver> {
        self.below.as_deref()
    }

    fn backing_ref(&self) -> Option<BackingRef> {
        self.opened.backing.clone()
    }
}
