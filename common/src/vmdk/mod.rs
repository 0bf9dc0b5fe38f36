//! The vmdk format (VMware): a descriptor naming extents, each flat (guest data at an
//! offset of a file) or sparse (a "KDMV" file: grain directory, grain tables, grains,
//! deflated with markers in streamOptimized images). A monolithicSparse image is one
//! sparse extent with its descriptor embedded; a descriptor file names its extent files
//! relative to its own directory, as QEMU resolves them.
//!
//! Concurrency: see `grain.rs`; flat extents and allocated grains move data without a lock.

pub mod check;
pub mod create;
pub mod descriptor;
mod extents;
pub mod grain;
pub mod header;
pub mod stream;

use std::path::Path;
use std::sync::Arc;

use crate::backing::BackingRef;
use crate::driver::{check_range, Allocation, BlockDriver, BlockStatus, Clusters};
use crate::error::{Error, Result};
use crate::iovec::{self, IoBuf, IoBufMut};
use crate::storage::Storage;

use descriptor::{einval, DESC_SIZE};
use extents::{read_desc, Opening};
use grain::{read_padded, Grain, GrainTables};
use header::{COWD_MAGIC, MAGIC};

/// Opens an extent file named by a descriptor (the chain opener's file rules and locks).
pub type ExtentOpener<'a> = &'a dyn Fn(&Path) -> Result<Box<dyn Storage>>;

enum Kind {
    /// Where the extent starts in its file (`None`: past any file, QEMU's shifted
    /// offset wrapped; every access fails).
    Flat { offset: Option<u64> },
    Sparse {
        tables: GrainTables,
        compressed: bool,
        marker: bool,
    },
}

/// One extent: guest bytes `[start, start + len)`.
struct Extent {
    start: u64,
    len: u64,
    file: Arc<dyn Storage>,
    /// Whether `file` is the image's own file.
    own_file: bool,
    name: String,
    /// The descriptor's type word, empty for the image's own sparse extent.
    type_name: String,
    kind: Kind,
}

/// What `info` reports of one extent (QAPI `VmdkExtentInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentInfo {
    pub filename: String,
    pub format: String,
    pub virtual_size: u64,
    pub cluster_size: Option<u64>,
    pub compressed: Option<bool>,
    /// For an extent in a file of its own (QEMU's `extents.N` child node): the file's
    /// length and allocated bytes.
    pub own_node: Option<(u64, Option<u64>)>,
}

/// What `info` reports of the image (QAPI `ImageInfoSpecificVmdk`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmdkInfo {
    pub create_type: String,
    pub cid: u32,
    pub parent_cid: u32,
    pub extents: Vec<ExtentInfo>,
    /// Bytes the image's own file (without the other extent files) occupies on the host,
    /// for its `file` child node.
    pub file_allocated: Option<u64>,
}

/// An open VMDK image.
pub struct VmdkImage {
    main: Arc<dyn Storage>,
    extents: Vec<Extent>,
    size: u64,
    read_only: bool,
    create_type: String,
    cid: u32,
    parent_cid: u32,
    /// Where the descriptor is in the image's own file (0x200 in a sparse file).
    desc_offset: u64,
    /// Whether this open already gave the descriptor a new CID (QEMU does on the first
    /// write of every open, so tools comparing CIDs see the change); held while doing it.
    cid_updated: std::sync::Mutex<bool>,
    /// The parent image the descriptor names (`parentFileNameHint`).
    parent: Option<String>,
    /// The parent, once the chain opener attached it, and its CID if it is a vmdk.
    backing: Option<(Box<dyn BlockDriver>, Option<u32>)>,
}

fn file_len(s: &dyn Storage) -> Result<u64> {
    s.len().map_err(|e| Error::io("Could not access file", e))
}

/// The host offset of extent byte `rel` of a flat extent starting at `offset`.
fn flat_host(offset: Option<u64>, rel: u64) -> Result<u64> {
    offset
        .and_then(|o| o.checked_add(rel))
        .filter(|&h| h <= i64::MAX as u64)
        .ok_or_else(|| {
            Error::io(
                "Flat extent offset out of range",
                std::io::Error::from_raw_os_error(libc::EIO),
            )
        })
}

impl VmdkImage {
    /// Open the image on `storage` (opened and locked by the chain opener), named `name`;
    /// `open_extent` opens the extent files a descriptor names.
    pub fn open(
        storage: Box<dyn Storage>,
        name: &str,
        read_only: bool,
        open_extent: ExtentOpener<'_>,
    ) -> Result<VmdkImage> {
        let main: Arc<dyn Storage> = Arc::from(storage);
        let buf = read_desc(&*main, 0)?;
        let mut o = Opening {
            read_only,
            extents: Vec::new(),
            create_type: None,
            open_extent,
            opened: std::fs::canonicalize(name)
                .map(|p| vec![(p, main.clone())])
                .unwrap_or_default(),
        };
        let desc_offset = if buf[..4] == MAGIC || buf[..4] == COWD_MAGIC {
            o.open_sparse(main.clone(), true, name, "", &buf, false)?;
            0x200
        } else {
            o.open_descriptor(&buf, name)?;
            0
        };
        let mut desc = vec![0u8; DESC_SIZE];
        read_padded(
            &*main,
            &mut desc,
            desc_offset,
            "Could not read the descriptor",
        )?;
        let parent = descriptor::parent_hint(&desc)?;
        let cid = descriptor::read_cid(&desc, false)?;
        let parent_cid = descriptor::read_cid(&desc, true)?;
        if o.extents.is_empty() {
            return Err(einval());
        }
        let size = o.next_start();
        Ok(VmdkImage {
            main,
            extents: o.extents,
            size,
            read_only,
            create_type: o.create_type.unwrap_or_default(),
            cid,
            parent_cid,
            desc_offset,
            cid_updated: std::sync::Mutex::new(false),
            parent,
            backing: None,
        })
    }

    /// The image's CID (`info`'s `cid`; an overlay's parent CID names it).
    pub fn cid(&self) -> u32 {
        self.cid
    }

    /// Attach the parent image; `parent_cid` is its CID when it is a vmdk.
    pub fn set_backing(&mut self, below: Box<dyn BlockDriver>, parent_cid: Option<u32>) {
        self.backing = Some((below, parent_cid));
    }

    fn below(&self) -> Option<&dyn BlockDriver> {
        self.backing.as_ref().map(|(b, _)| &**b)
    }

    /// Read what an unallocated grain shows from the parent, which must still be the
    /// image this one was made over: a vmdk whose CID is our parent CID (else EINVAL,
    /// as QEMU's `vmdk_is_cid_valid`).
    fn read_parent(&self, part: &[IoBufMut<'_>], pos: u64) -> Result<()> {
        if let Some((_, cid)) = &self.backing {
            if *cid != Some(self.parent_cid) {
                return Err(Error::io(
                    "Failed to read",
                    std::io::Error::from_raw_os_error(libc::EINVAL),
                ));
            }
        }
        crate::backing::read_below(self.below(), part, pos)
    }

    /// Give the descriptor a new random CID once per open, before the first write, as
    /// QEMU does (the sector run rewritten up to the end of the file's last sector).
    fn update_cid(&self) -> Result<()> {
        let mut done = self.cid_updated.lock().unwrap_or_else(|e| e.into_inner());
        if *done {
            return Ok(());
        }
        let mut desc = vec![0u8; DESC_SIZE];
        read_padded(
            &*self.main,
            &mut desc,
            self.desc_offset,
            "Could not read the descriptor",
        )?;
        let mut cid = [0u8; 4];
        cid.copy_from_slice(&crate::uuid::random_v4()?[..4]);
        let new = descriptor::with_cid(&desc, u32::from_le_bytes(cid))?;
        let end = file_len(&*self.main)?.next_multiple_of(512);
        let n = (end.saturating_sub(self.desc_offset) as usize).min(DESC_SIZE);
        self.main
            .write_at(&new[..n], self.desc_offset)
            .map_err(|e| Error::io("Could not write the descriptor", e))?;
        *done = true;
        Ok(())
    }

    /// The image's own file (the descriptor, or the sparse file holding it).
    pub fn storage(&self) -> &dyn Storage {
        &*self.main
    }

    /// QEMU's cluster size: the first extent's grain size when it is sparse and every
    /// other extent is alike (compressed or not, the same grain size; a flat extent's
    /// "grain" is the whole extent).
    pub fn cluster_size(&self) -> Option<u64> {
        let shape = |e: &Extent| match &e.kind {
            Kind::Flat { .. } => (false, e.len),
            Kind::Sparse {
                tables, compressed, ..
            } => (*compressed, tables.grain_bytes()),
        };
        let first = self.extents.first()?;
        let (compressed, grain) = shape(first);
        let cluster = matches!(first.kind, Kind::Sparse { .. }).then_some(grain);
        let alike = self.extents[1..].iter().all(|e| {
            let (c, g) = shape(e);
            c == compressed && cluster.is_none_or(|cs| cs == g)
        });
        cluster.filter(|_| alike)
    }

    /// Check the grains (`qemu-img check` for vmdk).
    pub fn check(&self) -> crate::check::CheckReport {
        check::check(self)
    }

    /// The format-specific information `info` shows.
    pub fn info(&self) -> VmdkInfo {
        VmdkInfo {
            create_type: self.create_type.clone(),
            cid: self.cid,
            parent_cid: self.parent_cid,
            extents: self
                .extents
                .iter()
                .map(|e| {
                    let (cluster_size, compressed) = match &e.kind {
                        Kind::Flat { .. } => (None, None),
                        Kind::Sparse {
                            tables, compressed, ..
                        } => (Some(tables.grain_bytes()), compressed.then_some(true)),
                    };
                    ExtentInfo {
                        filename: e.name.clone(),
                        format: e.type_name.clone(),
                        virtual_size: e.len,
                        cluster_size,
                        compressed,
                        own_node: (!e.own_file)
                            .then(|| (e.file.len().unwrap_or(0), e.file.allocated_size().ok())),
                    }
                })
                .collect(),
            file_allocated: self.main.allocated_size().ok(),
        }
    }

    fn extent(&self, pos: u64) -> &Extent {
        let i = self.extents.partition_point(|e| e.start + e.len <= pos);
        &self.extents[i]
    }

    /// The piece of `[pos, end)` inside one extent and one grain: (extent, offset in the
    /// extent, length).
    fn piece(&self, pos: u64, end: u64) -> (&Extent, u64, u64) {
        let e = self.extent(pos);
        let rel = pos - e.start;
        let limit = match &e.kind {
            Kind::Flat { .. } => e.len - rel,
            Kind::Sparse { tables, .. } => {
                let g = tables.grain_bytes();
                (g - rel % g).min(e.len - rel)
            }
        };
        (e, rel, limit.min(end - pos))
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        self.update_cid()
    }

    fn read_piece(&self, e: &Extent, rel: u64, part: &[IoBufMut<'_>]) -> Result<()> {
        let io = |x| Error::io("Failed to read", x);
        match &e.kind {
            Kind::Flat { offset } => e
                .file
                .read_vectored_at(part, flat_host(*offset, rel)?)
                .map_err(io),
            Kind::Sparse {
                tables,
                compressed,
                marker,
            } => match tables.lookup(&*e.file, rel)? {
                Grain::Unallocated => self.read_parent(part, e.start + rel),
                Grain::Zeroed => {
                    iovec::zero(part);
                    Ok(())
                }
                Grain::At(h) if !compressed => {
                    let g = tables.grain_bytes();
                    e.file.read_vectored_at(part, h + rel % g).map_err(io)
                }
                Grain::At(h) => {
                    let g = tables.grain_bytes();
                    let mut out = vec![0u8; g as usize];
                    let got = stream::read_grain(&*e.file, h, *marker, &mut out)?;
                    let (from, n) = ((rel % g) as usize, iovec::total_len(part));
                    if from + n > got {
                        return Err(Error::io(
                            "A compressed grain is shorter than the grain",
                            std::io::Error::from_raw_os_error(libc::EINVAL),
                        ));
                    }
                    let mut at = from;
                    for b in part {
                        b.copy_from(&out[at..at + b.len()]);
                        at += b.len();
                    }
                    Ok(())
                }
            },
        }
    }

    fn write_piece(&self, e: &Extent, rel: u64, part: &[IoBuf<'_>]) -> Result<()> {
        let io = |x| Error::io("Failed to write", x);
        let Kind::Sparse {
            tables, compressed, ..
        } = &e.kind
        else {
            let Kind::Flat { offset } = e.kind else {
                unreachable!()
            };
            return e
                .file
                .write_vectored_at(part, flat_host(offset, rel)?)
                .map_err(io);
        };
        let g = tables.grain_bytes();
        if *compressed {
            let mut data = vec![0u8; iovec::total_len(part)];
            let mut at = 0;
            for b in part {
                b.copy_to(&mut data[at..at + b.len()]);
                at += b.len();
            }
            return self.write_grain_compressed(e, rel, &data, None);
        }
        loop {
            let grain = tables.lookup(&*e.file, rel)?;
            if let Grain::At(h) = grain {
                return e.file.write_vectored_at(part, h + rel % g).map_err(io);
            }
            // A new grain starts as what it showed: the parent's bytes (QEMU copies them
            // without the CID check its reads make), or zeroes.
            let mut whole = vec![0u8; g as usize];
            if grain == Grain::Unallocated {
                let start = e.start + rel - rel % g;
                crate::backing::read_below(self.below(), &[(&mut whole[..]).into()], start)?;
            }
            let mut at = (rel % g) as usize;
            for b in part {
                b.copy_to(&mut whole[at..at + b.len()]);
                at += b.len();
            }
            if tables.allocate(&*e.file, rel, &whole)?.is_some() {
                return Ok(());
            }
        }
    }

    /// Append one grain compressed (`z`: its zlib stream, when made beforehand), as
    /// QEMU writes streams: whole grains only (or the extent's tail), each once.
    fn write_grain_compressed(
        &self,
        e: &Extent,
        rel: u64,
        data: &[u8],
        z: Option<&[u8]>,
    ) -> Result<()> {
        let Kind::Sparse { tables, marker, .. } = &e.kind else {
            return Err(einval());
        };
        let g = tables.grain_bytes();
        let n = data.len() as u64;
        if !*marker || !rel.is_multiple_of(g) || n > g || (n < g && rel + n != e.len) {
            return Err(Error::io(
                "Failed to write a compressed grain",
                std::io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        let owned;
        let z = match z {
            Some(z) => z,
            None => {
                owned = stream::deflate(data)?;
                &owned
            }
        };
        let framed = stream::frame((e.start + rel) / 512, z);
        tables.append_compressed(&*e.file, rel, &framed)
    }

    /// Whether writes must be whole compressed grains (a streamOptimized image).
    pub fn needs_compressed_writes(&self) -> bool {
        self.extents.first().is_some_and(|e| {
            matches!(
                e.kind,
                Kind::Sparse {
                    compressed: true,
                    ..
                }
            )
        })
    }

    /// The zlib stream of one grain's `data`, made without any lock, for
    /// [`VmdkImage::write_compressed`].
    pub fn compress_grain(&self, data: &[u8]) -> Result<Vec<u8>> {
        stream::deflate(data)
    }

    /// Write one grain at guest `offset`: compressed (from `z` when given) into a
    /// compressing extent, plainly into any other, as QEMU's compressed writes do.
    pub fn write_compressed(&self, offset: u64, data: &[u8], z: Option<&[u8]>) -> Result<()> {
        self.check_write(offset, data.len() as u64)?;
        let (e, rel, n) = self.piece(offset, offset + data.len() as u64);
        match &e.kind {
            Kind::Sparse {
                compressed: true, ..
            } if n == data.len() as u64 => self.write_grain_compressed(e, rel, data, z),
            Kind::Sparse {
                compressed: true, ..
            } => Err(einval()),
            _ => self.write_at(data, offset),
        }
    }

    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let (e, rel, n) = self.piece(pos, end);
            let allocated = match &e.kind {
                Kind::Flat { .. } => true,
                // Unallocated shows the parent, if any: zeroes must be written there.
                Kind::Sparse { tables, .. } => match tables.lookup(&*e.file, rel)? {
                    Grain::At(_) => true,
                    Grain::Unallocated => self.backing.is_some(),
                    Grain::Zeroed => false,
                },
            };
            if allocated {
                let zeros = vec![0u8; n as usize];
                self.write_piece(e, rel, &[zeros.as_slice().into()])?;
            }
            pos += n;
        }
        Ok(())
    }
}

impl BlockDriver for VmdkImage {
    fn format_name(&self) -> &'static str {
        "vmdk"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored_at(&self, bufs: &[IoBufMut<'_>], offset: u64) -> Result<()> {
        let len = iovec::total_len(bufs) as u64;
        check_range(offset, len, self.size)?;
        let mut front = iovec::Front::new(bufs);
        let (end, mut pos) = (offset + len, offset);
        while pos < end {
            let (e, rel, n) = self.piece(pos, end);
            let part = front.take(n as usize);
            self.read_piece(e, rel, &part)?;
            pos += n;
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        let len = iovec::total_len(bufs) as u64;
        self.check_write(offset, len)?;
        let mut front = iovec::Front::new(bufs);
        let (end, mut pos) = (offset + len, offset);
        while pos < end {
            let (e, rel, n) = self.piece(pos, end);
            let part = front.take(n as usize);
            self.write_piece(e, rel, &part)?;
            pos += n;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        self.check_write(offset, len)?;
        self.zero_range(offset, len)
    }

    /// Discarded bytes read as zeroes (the grains stay allocated: vmdk cannot free them).
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        self.zero_range(offset, len)
    }

    fn flush(&self) -> Result<()> {
        let mut flushed: Vec<*const ()> = Vec::new();
        for f in std::iter::once(&self.main).chain(self.extents.iter().map(|e| &e.file)) {
            let p = Arc::as_ptr(f) as *const ();
            if !flushed.contains(&p) {
                f.flush().map_err(|e| Error::io("Failed to flush", e))?;
                flushed.push(p);
            }
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Err(Error::invalid("block_status of an empty range"));
        }
        let end = offset + len;
        let (e, rel, n) = self.piece(offset, end);
        let status = |allocation, len, host_offset, compressed| BlockStatus {
            len,
            allocation,
            depth: 0,
            host_offset,
            compressed,
        };
        let Kind::Sparse {
            tables, compressed, ..
        } = &e.kind
        else {
            let Kind::Flat { offset: base } = e.kind else {
                unreachable!()
            };
            // QEMU asks the file about a flat extent's data: a hole reads as zeroes.
            return crate::block_map::stored_data_status(&*e.file, flat_host(base, rel)?, n);
        };
        let g = tables.grain_bytes();
        let first = tables.lookup(&*e.file, rel)?;
        // Extend over following grains of the same extent that map the same way (and,
        // for data, contiguously), as qemu-img map merges them.
        let mut run = n;
        let extent_end = e.start + e.len;
        while offset + run < end.min(extent_end) {
            let next_rel = rel + run;
            let next = tables.lookup(&*e.file, next_rel)?;
            let same = match (first, next) {
                (Grain::At(a), Grain::At(b)) => *compressed || b == a + (next_rel - rel) + rel % g,
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            run += g.min(end.min(extent_end) - (offset + run));
        }
        Ok(match first {
            Grain::Unallocated => crate::backing::status_below(self.below(), offset, run)?
                .unwrap_or_else(|| status(Allocation::Unallocated, run, None, false)),
            Grain::Zeroed => status(Allocation::Zero, run, None, false),
            Grain::At(_) if *compressed => status(Allocation::Data, run, None, true),
            Grain::At(h) => status(Allocation::Data, run, Some(h + rel % g), false),
        })
    }

    fn clusters(&self) -> Option<Clusters> {
        self.cluster_size().map(|c| Clusters {
            cluster: c,
            subcluster: c,
        })
    }

    fn backing(&self) -> Option<&dyn BlockDriver> {
        self.below()
    }

    fn backing_ref(&self) -> Option<BackingRef> {
        // QEMU opens a vmdk's parent as a vmdk, and reports that format.
        self.parent.clone().map(|name| BackingRef {
            name,
            format: Some("vmdk".into()),
        })
    }

    fn extent_file_name(&self, offset: u64) -> Option<String> {
        let e = self
            .extents
            .get(self.extents.partition_point(|e| e.start + e.len <= offset))?;
        (!e.own_file).then(|| e.name.clone())
    }

    fn allocated_file_size(&self) -> Result<u64> {
        let mut total = self
            .main
            .allocated_size()
            .map_err(|e| Error::io("Failed to get the allocated file size", e))?;
        for e in self.extents.iter().filter(|e| !e.own_file) {
            total += e
                .file
                .allocated_size()
                .map_err(|x| Error::io("Failed to get the allocated file size", x))?;
        }
        Ok(total)
    }
}
