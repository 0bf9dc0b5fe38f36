//! Opening a vmdk's extents: a sparse file ("KDMV", its footer when the header sends
//! readers there, its embedded descriptor when it has no capacity), or a descriptor file's
//! extent lines, each file opened relative to the descriptor as QEMU resolves them.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::storage::Storage;

use super::descriptor::{self, MAX_DESC_FILE};
use super::grain::{read_padded, GrainTables};
use super::header::{
    self, SparseHeader, COWD_MAGIC, FLAG_MARKER, FLAG_RGD, FLAG_ZERO_GRAIN, GD_AT_END, MAGIC,
};
use super::{file_len, Extent, ExtentOpener, Kind};

/// The first bytes of a file as QEMU's `vmdk_read_desc` reads them (at most just under
/// 1 MiB, a file under 4 bytes refused).
pub(super) fn read_desc(s: &dyn Storage, offset: u64) -> Result<Vec<u8>> {
    let len = file_len(s)?;
    if len < 4 {
        return Err(Error::corrupt("File is too small, not a valid image"));
    }
    let mut buf = vec![0u8; len.min(MAX_DESC_FILE) as usize];
    read_padded(s, &mut buf, offset, "Could not read from file")?;
    Ok(buf)
}

/// State gathered while opening.
pub(super) struct Opening<'a> {
    pub(super) read_only: bool,
    pub(super) extents: Vec<Extent>,
    pub(super) create_type: Option<String>,
    pub(super) open_extent: ExtentOpener<'a>,
    /// Files opened so far by canonical path (the image's own first), so an extent
    /// naming one of them shares it rather than locking the file a second time.
    pub(super) opened: Vec<(std::path::PathBuf, Arc<dyn Storage>)>,
}

impl Opening<'_> {
    pub(super) fn next_start(&self) -> u64 {
        self.extents.last().map_or(0, |e| e.start + e.len)
    }

    /// Open a sparse extent file whose first bytes are `buf` (QEMU's `vmdk_open_sparse`).
    pub(super) fn open_sparse(
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
    pub(super) fn open_descriptor(&mut self, text: &[u8], name: &str) -> Result<()> {
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
