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
pub mod grain;
pub mod header;
pub mod stream;

use std::path::Path;
use std::sync::Arc;

use crate::driver::{check_range, Allocation, BlockDriver, BlockStatus, Clusters};
use crate::error::{Error, Result};
use crate::iovec::{self, IoBuf, IoBufMut};
use crate::storage::Storage;

use descriptor::{einval, DESC_SIZE, MAX_DESC_FILE};
use grain::{read_padded, Grain, GrainTables};
use header::{SparseHeader, COWD_MAGIC, FLAG_MARKER, FLAG_RGD, FLAG_ZERO_GRAIN, GD_AT_END, MAGIC};

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
}

fn file_len(s: &dyn Storage) -> Result<u64> {
    s.len().map_err(|e| Error::io("Could not access file", e))
}

/// The first bytes of a file as QEMU's `vmdk_read_desc` reads them (at most just under
/// 1 MiB, a file under 4 bytes refused).
fn read_desc(s: &dyn Storage, offset: u64) -> Result<Vec<u8>> {
    let len = file_len(s)?;
    if len < 4 {
        return Err(Error::corrupt("File is too small, not a valid image"));
    }
    let mut buf = vec![0u8; len.min(MAX_DESC_FILE) as usize];
    read_padded(s, &mut buf, offset, "Could not read from file")?;
    Ok(buf)
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

/// State gathered while opening.
struct Opening<'a> {
    read_only: bool,
    extents: Vec<Extent>,
    create_type: Option<String>,
    open_extent: ExtentOpener<'a>,
    /// Files opened so far by canonical path (the image's own first), so an extent
    /// naming one of them shares it rather than locking the file a second time.
    opened: Vec<(std::path::PathBuf, Arc<dyn Storage>)>,
}

impl Opening<'_> {
    fn next_start(&self) -> u64 {
        self.extents.last().map_or(0, |e| e.start + e.len)
    }

    /// Open a sparse extent file whose first bytes are `buf` (QEMU's `vmdk_open_sparse`).
    fn open_sparse(
        &mut self,
        file: Arc<dyn Storage>,
        own_file: bool,
        name: &str,
        type_name: &str,
        buf: &[u8],
        nested: bool,
    ) -> Result<()> {
        if buf[..4] == MAGIC {
            self.open_kdmv(file, own_file, name, type_name, nested)
        } else if buf[..4] == COWD_MAGIC {
            Err(Error::Unsupported(
                "VMFS sparse (COWD) extents are not supported".into(),
            ))
        } else {
            Err(Error::corrupt("Image not in VMDK format"))
        }
    }

    fn open_kdmv(
        &mut self,
        file: Arc<dyn Storage>,
        own_file: bool,
        name: &str,
        type_name: &str,
        nested: bool,
    ) -> Result<()> {
        let mut b = [0u8; 512];
        read_padded(&*file, &mut b, 0, "Could not read header")?;
        let mut h = SparseHeader::decode(&b);
        if h.capacity == 0 && h.desc_offset != 0 {
            if nested {
                return Err(Error::corrupt("Image not in VMDK format"));
            }
            let at = h.desc_offset.checked_mul(512).ok_or_else(|| {
                Error::io(
                    "Could not read from file",
                    std::io::Error::from_raw_os_error(libc::EIO),
                )
            })?;
            let desc = read_desc(&*file, at)?;
            return self.open_descriptor(&desc, name);
        }
        self.create_type
            .get_or_insert_with(|| "monolithicSparse".into());
        let len = file_len(&*file)?;
        let sectors = len.div_ceil(512);
        if h.gd_offset == GD_AT_END {
            let mut footer = [0u8; 1536];
            let at = (sectors * 512).checked_sub(1536).ok_or_else(|| {
                Error::io(
                    "Failed to read footer",
                    std::io::Error::from_raw_os_error(libc::EINVAL),
                )
            })?;
            read_padded(&*file, &mut footer, at, "Failed to read footer")?;
            h = header::parse_footer(&footer)?;
        }
        let geo = header::check(&h, !self.read_only, sectors)?;
        let capacity = h
            .capacity
            .checked_mul(512)
            .filter(|c| {
                self.next_start()
                    .checked_add(*c)
                    .is_some_and(|e| e <= i64::MAX as u64)
            })
            .ok_or_else(|| Error::corrupt("Image capacity out of range"))?;
        let rgd = (h.flags & FLAG_RGD != 0).then_some(h.rgd_offset);
        let tables = GrainTables::load(
            &*file,
            name,
            geo,
            h.gd_offset,
            rgd.filter(|&s| s != 0),
            h.flags & FLAG_ZERO_GRAIN != 0,
            !self.read_only,
        )?;
        let compressed = h.compressed();
        if compressed {
            self.create_type = Some("streamOptimized".into());
        }
        self.extents.push(Extent {
            start: self.next_start(),
            len: capacity,
            file,
            own_file,
            name: name.to_string(),
            type_name: type_name.to_string(),
            kind: Kind::Sparse {
                tables,
                compressed,
                marker: h.flags & FLAG_MARKER != 0,
            },
        });
        Ok(())
    }

    /// Open the extents a descriptor names (QEMU's `vmdk_open_desc_file`); `name` is the
    /// descriptor's file, extent names are relative to its directory.
    fn open_descriptor(&mut self, text: &[u8], name: &str) -> Result<()> {
        let text = descriptor::c_text(text);
        let ct = descriptor::quoted_value(text, "createType", 128)
            .ok_or_else(|| Error::corrupt("invalid VMDK image descriptor"))?;
        const KNOWN: [&str; 6] = [
            "monolithicFlat",
            "vmfs",
            "vmfsSparse",
            "seSparse",
            "twoGbMaxExtentSparse",
            "twoGbMaxExtentFlat",
        ];
        if !KNOWN.contains(&ct.as_str()) {
            return Err(Error::Unsupported(format!("Unsupported image type '{ct}'")));
        }
        self.create_type = Some(ct);
        let dir = match name.rfind('/') {
            Some(i) => &name[..=i],
            None => "",
        };
        for line in descriptor::extents(text)? {
            let path = if line.file.starts_with('/') {
                line.file.clone()
            } else {
                format!("{dir}{}", line.file)
            };
            let canonical = std::fs::canonicalize(&path).ok();
            let known = self
                .opened
                .iter()
                .find(|(p, _)| Some(p) == canonical.as_ref())
                .map(|(_, f)| f.clone());
            let file = match known {
                Some(f) => f,
                None => {
                    let f: Arc<dyn Storage> = Arc::from((self.open_extent)(Path::new(&path))?);
                    if let Some(c) = canonical {
                        self.opened.push((c, f.clone()));
                    }
                    f
                }
            };
            match line.kind.as_str() {
                "FLAT" | "VMFS" => {
                    let len = line
                        .sectors
                        .checked_mul(512)
                        .filter(|l| {
                            self.next_start()
                                .checked_add(*l)
                                .is_some_and(|e| e <= i64::MAX as u64)
                        })
                        .ok_or_else(|| Error::corrupt("Extent size out of range"))?;
                    let offset = line.flat_offset.checked_mul(512);
                    self.extents.push(Extent {
                        start: self.next_start(),
                        len,
                        file,
                        own_file: false,
                        name: path,
                        type_name: line.kind,
                        kind: Kind::Flat { offset },
                    });
                }
                "SPARSE" | "VMFSSPARSE" => {
                    let buf = read_desc(&*file, 0)?;
                    self.open_sparse(file, false, &path, &line.kind, &buf, true)?;
                }
                _ => {
                    return Err(Error::Unsupported(
                        "seSparse extents are not supported".into(),
                    ))
                }
            }
        }
        Ok(())
    }
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
        if descriptor::c_text(&desc)
            .windows(18)
            .any(|w| w == b"parentFileNameHint")
        {
            return Err(Error::Unsupported(
                "vmdk images with a parent (parentFileNameHint) are not supported".into(),
            ));
        }
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
        })
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
                Grain::Unallocated | Grain::Zeroed => {
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
            if let Grain::At(h) = tables.lookup(&*e.file, rel)? {
                return e.file.write_vectored_at(part, h + rel % g).map_err(io);
            }
            let mut whole = vec![0u8; g as usize];
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
                Kind::Sparse { tables, .. } => {
                    matches!(tables.lookup(&*e.file, rel)?, Grain::At(_))
                }
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
            let st = crate::raw::file_status(&*e.file, flat_host(base, rel)?, n)?;
            return Ok(BlockStatus {
                allocation: match st.allocation {
                    Allocation::Zero => Allocation::DataOverHole,
                    a => a,
                },
                ..st
            });
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
            Grain::Unallocated => status(Allocation::Unallocated, run, None, false),
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
