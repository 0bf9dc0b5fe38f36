//! The one trait every open image implements, and the block-status types it reports.

use crate::backing::BackingRef;
use crate::error::Result;
use crate::iovec::{IoBuf, IoBufMut};

/// What a range of guest data is, as reported by [`BlockDriver::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Data stored in this layer (or a layer below, see `depth`).
    Data,
    /// Data allocated in a layer whose storage under it is a hole, so it reads as zeroes
    /// (QEMU's data and zero both set), as after `preallocation=metadata`.
    DataOverHole,
    /// Reads as zeroes because a layer says so (zero flag, hole, zero cluster).
    Zero,
    /// No layer of the chain has it; reads as zeroes.
    Unallocated,
    /// Neither data nor zeroes for sure: a hole that may read non-zero (an NBD server's
    /// hole flag without its zero flag). It must be read to be copied, and is not
    /// allocated (QEMU's data and zero both clear).
    Undetermined,
}

/// The status of a run of guest bytes that all behave alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Length of the run in bytes (at least 1, at most what was asked).
    pub len: u64,
    /// Whether the run holds data, reads as zero, or is unallocated everywhere.
    pub allocation: Allocation,
    /// Which layer answers: 0 is the image itself, 1 its backing file, and so on.
    pub depth: u32,
    /// Host offset of the data in the file of that layer, when it is stored plainly
    /// (not compressed) and the format knows it; for a zero or unallocated run, where
    /// storage reserved for it lies, if any (as QEMU reports it).
    pub host_offset: Option<u64>,
    /// The data is stored compressed (qcow2 compressed clusters).
    pub compressed: bool,
}

/// How a format allocates guest space, for formats that do it in clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clusters {
    /// Cluster size in bytes.
    pub cluster: u64,
    /// The smallest unit a cluster's data is allocated in (the cluster itself, or a
    /// subcluster with qcow2's extended L2 entries).
    pub subcluster: u64,
}

/// An open image. All methods take `&self` and may be called from several threads at once.
///
/// Offsets and lengths are in guest bytes. Reads and writes need not be aligned.
pub trait BlockDriver: Send + Sync {
    /// The format name as qemu-img prints it (`raw`, `qcow2`).
    fn format_name(&self) -> &'static str;

    /// Virtual size of the image in bytes.
    fn size(&self) -> u64;

    /// Whether the image was opened read-only.
    fn is_read_only(&self) -> bool;

    /// Read `buf.len()` bytes at `offset`. The range must lie within the image.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_vectored_at(&[buf.into()], offset)
    }

    /// Write `buf` at `offset`. The range must lie within the image.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_vectored_at(&[buf.into()], offset)
    }

    /// Read into `bufs`, in order, from `offset` (a scatter read straight into the caller's
    /// buffers, which may be guest memory). The whole range must lie within the image.
    fn read_vectored_at(&self, bufs: &[IoBufMut<'_>], offset: u64) -> Result<()>;

    /// Write `bufs`, in order, at `offset` (a gather write from the caller's buffers,
    /// which may be guest memory). The whole range must lie within the image.
    fn write_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()>;

    /// Make `len` bytes at `offset` read as zeroes. With `may_unmap` the format may
    /// release the storage behind them.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()>;

    /// Tell the image that `len` bytes at `offset` are no longer needed. Afterwards the
    /// range reads as zeroes or as the backing file, whichever the format does.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Make every completed write durable.
    fn flush(&self) -> Result<()>;

    /// Status of the bytes starting at `offset`, for a run of at most `len` bytes.
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus>;

    /// The format's cluster geometry, for formats that allocate in clusters.
    fn clusters(&self) -> Option<Clusters> {
        None
    }

    /// Bytes the image occupies on the host (allocated blocks of its file), for `info`.
    fn allocated_file_size(&self) -> Result<u64>;

    /// The opened layer below this one (its backing file), if it has one.
    fn backing(&self) -> Option<&dyn BlockDriver> {
        None
    }

    /// The file this layer keeps its guest data in, at the host offsets block status
    /// reports, for copies the kernel makes between files.
    fn data_file(&self) -> Option<&std::fs::File> {
        None
    }

    /// The file holding this layer's guest byte at `offset` when that is not the layer's
    /// own file (a vmdk extent file), as QEMU names it: what `map` shows for its data.
    fn extent_file_name(&self, _offset: u64) -> Option<String> {
        None
    }

    /// The backing file this layer names, as stored (unresolved), if it names one.
    fn backing_ref(&self) -> Option<BackingRef> {
        None
    }
}

/// Check that `len` bytes at `offset` fit in an image of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(crate::error::Error::invalid(format!(
            "request at offset {offset} length {len} is beyond the end of the image ({size} bytes)"
        ))),
    }
}
