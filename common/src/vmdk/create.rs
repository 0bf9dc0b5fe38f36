//! Creating a VMDK as `qemu-img create -f vmdk` lays it out: for a sparse extent the
//! header, redundant and primary grain directories each followed by every grain table
//! (zeroed), grains from the next 64 KiB; flat extents as empty files of their size; the
//! descriptor embedded at 0x200 (monolithicSparse) or as its own file naming the extent
//! files `NAME-flat.EXT`, `NAME-s001.EXT`, `NAME-f001.EXT`, ... beside it.

use std::path::Path;

use crate::create::OptionValues;
use crate::error::{Error, Result};
use crate::storage::{FileStorage, Storage};

use super::header::{
    SparseHeader, COMPRESSION_DEFLATE, FLAG_COMPRESS, FLAG_MARKER, FLAG_NL_DETECT, FLAG_RGD,
    FLAG_ZERO_GRAIN,
};

/// The subformats `img` creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subformat {
    MonolithicSparse,
    MonolithicFlat,
    TwoGbMaxExtentSparse,
    TwoGbMaxExtentFlat,
    StreamOptimized,
}

impl Subformat {
    fn name(self) -> &'static str {
        match self {
            Subformat::MonolithicSparse => "monolithicSparse",
            Subformat::MonolithicFlat => "monolithicFlat",
            Subformat::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            Subformat::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
            Subformat::StreamOptimized => "streamOptimized",
        }
    }

    fn flat(self) -> bool {
        matches!(
            self,
            Subformat::MonolithicFlat | Subformat::TwoGbMaxExtentFlat
        )
    }

    fn split(self) -> bool {
        matches!(
            self,
            Subformat::TwoGbMaxExtentSparse | Subformat::TwoGbMaxExtentFlat
        )
    }
}

/// A new VMDK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmdkCreateOptions {
    /// Size in bytes (whole sectors).
    pub size: u64,
    pub subformat: Subformat,
    /// `ide`, `buslogic`, `lsilogic` or `legacyESX`.
    pub adapter_type: String,
    /// `ddb.virtualHWVersion` (QEMU's default 4, or 6 with `compat6`).
    pub hw_version: String,
    pub tools_version: String,
    pub zeroed_grain: bool,
    /// The parent image (`backing_file`, a vmdk), as its name is to be stored.
    pub backing_file: Option<String>,
}

/// The checks QEMU makes while reading the options, in its order, and the options.
pub fn from_values(size: u64, values: &dyn OptionValues) -> Result<VmdkCreateOptions> {
    let backing_fmt = values.text("backing_fmt");
    let backing_file = values.text("backing_file");
    let adapter = values.text("adapter_type");
    let hwversion = values.text("hwversion");
    let toolsversion = values.text("toolsversion");
    let compat6 = values.flag("compat6").unwrap_or(false);
    let subformat = values.text("subformat");
    let zeroed_grain = values.flag("zeroed_grain").unwrap_or(false);
    if backing_fmt.is_some_and(|f| f != "vmdk") {
        return Err(Error::invalid("backing_file must be a vmdk image"));
    }
    let bad = |v: &str| Error::invalid(format!("invalid parameter value: {v}"));
    let adapter_type = match adapter {
        None => "ide",
        Some(a @ ("ide" | "buslogic" | "lsilogic" | "legacyESX")) => a,
        Some(other) => return Err(bad(other)),
    };
    let subformat = match subformat {
        None | Some("monolithicSparse") => Subformat::MonolithicSparse,
        Some("monolithicFlat") => Subformat::MonolithicFlat,
        Some("twoGbMaxExtentSparse") => Subformat::TwoGbMaxExtentSparse,
        Some("twoGbMaxExtentFlat") => Subformat::TwoGbMaxExtentFlat,
        Some("streamOptimized") => Subformat::StreamOptimized,
        Some(other) => return Err(bad(other)),
    };
    let hwversion = hwversion.filter(|&h| h != "undefined");
    let hw_version = match (compat6, hwversion) {
        (true, Some(_)) => {
            return Err(Error::invalid(
                "compat6 cannot be enabled with hwversion set",
            ))
        }
        (true, None) => "6",
        (false, h) => h.unwrap_or("4"),
    };
    if subformat.flat() && backing_file.is_some() {
        return Err(Error::Unsupported(
            "Flat image can't have backing file".into(),
        ));
    }
    if subformat.flat() && zeroed_grain {
        return Err(Error::Unsupported(
            "Flat image can't enable zeroed grain".into(),
        ));
    }
    Ok(VmdkCreateOptions {
        size,
        subformat,
        adapter_type: adapter_type.to_string(),
        hw_version: hw_version.to_string(),
        tools_version: toolsversion.unwrap_or("2147483647").to_string(),
        zeroed_grain,
        backing_file: backing_file.map(str::to_string),
    })
}

/// The header of a new sparse extent of `bytes` and the sector of its first grain table
/// after each directory, as QEMU lays them out.
fn sparse_layout(bytes: u64, zeroed_grain: bool, compress: bool) -> (SparseHeader, u64, u64) {
    let capacity = bytes / 512;
    let grains = capacity.div_ceil(128);
    let gt_sectors = 4u64;
    let gt_count = grains.div_ceil(512);
    let gd_sectors = (gt_count * 4).div_ceil(512);
    let rgd_offset = 21;
    let gd_offset = rgd_offset + gd_sectors + gt_sectors * gt_count;
    let grain_offset = (gd_offset + gd_sectors + gt_sectors * gt_count).next_multiple_of(128);
    let h = SparseHeader {
        version: match (compress, zeroed_grain) {
            (true, _) => 3,
            (false, true) => 2,
            (false, false) => 1,
        },
        flags: FLAG_RGD
            | FLAG_NL_DETECT
            | if compress {
                FLAG_COMPRESS | FLAG_MARKER
            } else {
                0
            }
            | if zeroed_grain { FLAG_ZERO_GRAIN } else { 0 },
        capacity,
        granularity: 128,
        desc_offset: 1,
        desc_size: 20,
        num_gtes_per_gt: 512,
        rgd_offset,
        gd_offset,
        grain_offset,
        compress_algorithm: if compress { COMPRESSION_DEFLATE } else { 0 },
    };
    (h, gt_count, gd_sectors)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(format!("Could not create '{}'", path.display()), e)
}

/// Write a new sparse extent of `bytes` into `storage` (empty).
fn init_sparse(
    storage: &dyn Storage,
    path: &Path,
    bytes: u64,
    zeroed_grain: bool,
    compress: bool,
) -> Result<()> {
    let (h, gt_count, gd_sectors) = sparse_layout(bytes, zeroed_grain, compress);
    storage.write_at(&h.encode()[..512], 0).map_err(io(path))?;
    storage.set_len(h.grain_offset * 512).map_err(io(path))?;
    for dir in [h.rgd_offset, h.gd_offset] {
        let mut gd = vec![0u8; (gd_sectors * 512) as usize];
        for (i, e) in gd.chunks_exact_mut(4).take(gt_count as usize).enumerate() {
            let t = (dir + gd_sectors + i as u64 * 4) as u32;
            e.copy_from_slice(&t.to_le_bytes());
        }
        storage.write_at(&gd, dir * 512).map_err(io(path))?;
    }
    Ok(())
}

fn new_file(path: &Path) -> Result<FileStorage> {
    let s = FileStorage::new(crate::storage::open_new_image_file(path)?);
    s.set_len(0).map_err(io(path))?;
    Ok(s)
}

/// The CID of the parent `backing` (named as stored in the new image at `path`), which
/// must open as a vmdk.
fn parent_cid(path: &Path, backing: &str) -> Result<u32> {
    let opts = crate::open::OpenOptions {
        read_only: true,
        format: Some(crate::format::Format::Vmdk),
        no_backing: true,
        ..Default::default()
    };
    let at = crate::backing::resolve_backing_path(path, backing);
    match crate::open::open_image(&at, &opts)? {
        crate::open::Image::Vmdk(v) => Ok(v.cid()),
        _ => Err(Error::invalid("backing_file must be a vmdk image")),
    }
}

/// Create (or overwrite) a VMDK whose descriptor is at `path`.
pub fn create_vmdk(path: &Path, o: &VmdkCreateOptions) -> Result<()> {
    let name = path.to_string_lossy();
    let (dir, base) = match name.rfind('/') {
        Some(i) => (&name[..=i], &name[i + 1..]),
        None => ("", &name[..]),
    };
    let (prefix, postfix) = match base.rfind('.') {
        Some(i) => (&base[..i], &base[i..]),
        None => (base, ""),
    };
    let parent = match &o.backing_file {
        Some(b) => Some((b.as_str(), parent_cid(path, b)?)),
        None => None,
    };
    let sub = o.subformat;
    let main = new_file(path)?;
    let mut lines = String::new();
    let kind = if sub.flat() { "FLAT" } else { "SPARSE" };
    let mut line = |sectors: u64, file: &str| {
        let tail = if sub.flat() { " 0" } else { "" };
        lines.push_str(&format!("RW {sectors} {kind} \"{file}\"{tail}\n"));
    };
    let single = matches!(
        sub,
        Subformat::MonolithicSparse | Subformat::StreamOptimized
    );
    if single {
        let compress = sub == Subformat::StreamOptimized;
        init_sparse(&main, path, o.size, o.zeroed_grain, compress)?;
        line(o.size.div_ceil(512), base);
    } else {
        let extent = if sub.split() {
            0x8000_0000
        } else {
            o.size.max(1)
        };
        let mut done = 0;
        let mut idx = 1;
        while done < o.size {
            let cur = (o.size - done).min(extent);
            let file = if sub.split() {
                let c = if sub.flat() { 'f' } else { 's' };
                format!("{prefix}-{c}{idx:03}{postfix}")
            } else {
                format!("{prefix}-flat{postfix}")
            };
            let epath = format!("{dir}{file}");
            let epath = Path::new(&epath);
            let s = new_file(epath)?;
            if sub.flat() {
                s.set_len(cur).map_err(io(epath))?;
            } else {
                init_sparse(&s, epath, cur, o.zeroed_grain, false)?;
            }
            s.flush().map_err(io(epath))?;
            line(cur.div_ceil(512), &file);
            done += cur;
            idx += 1;
        }
    }
    let heads: u64 = if o.adapter_type == "ide" { 16 } else { 255 };
    let mut cid = [0u8; 4];
    cid.copy_from_slice(&crate::uuid::random_v4()?[..4]);
    let (parent_cid, parent_line) = match parent {
        Some((name, cid)) => (cid, format!("parentFileNameHint=\"{name}\"")),
        None => (u32::MAX, String::new()),
    };
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID={:x}\nparentCID={parent_cid:x}\ncreateType=\"{}\"\n\
         {parent_line}\n# Extent description\n{lines}\n# The Disk Data Base\n#DDB\n\n\
         ddb.virtualHWVersion = \"{}\"\nddb.geometry.cylinders = \"{}\"\n\
         ddb.geometry.heads = \"{heads}\"\nddb.geometry.sectors = \"63\"\n\
         ddb.adapterType = \"{}\"\nddb.toolsVersion = \"{}\"\n",
        u32::from_le_bytes(cid),
        sub.name(),
        o.hw_version,
        o.size / (63 * heads * 512),
        o.adapter_type,
        o.tools_version,
    );
    if single {
        main.write_at(desc.as_bytes(), 0x200).map_err(io(path))?;
    } else {
        main.write_at(desc.as_bytes(), 0).map_err(io(path))?;
        main.set_len(desc.len() as u64).map_err(io(path))?;
    }
    main.flush().map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_as_qemu() {
        // qemu-img create -f vmdk 10M: GD at 26, grains at 128.
        let (h, gts, gds) = sparse_layout(10 << 20, false, false);
        assert_eq!((h.rgd_offset, h.gd_offset, h.grain_offset), (21, 26, 128));
        assert_eq!((gts, gds), (1, 1));
        let (h, _, _) = sparse_layout(0, true, false);
        assert_eq!((h.version, h.flags & FLAG_ZERO_GRAIN), (2, FLAG_ZERO_GRAIN));
        let (h, _, _) = sparse_layout(0, false, true);
        assert_eq!((h.version, h.compress_algorithm), (3, COMPRESSION_DEFLATE));
    }

    #[test]
    fn option_checks_in_qemus_order() {
        struct V(Vec<(&'static str, &'static str)>);
        impl OptionValues for V {
            fn text(&self, name: &str) -> Option<&str> {
                self.0.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
            }
            fn flag(&self, name: &str) -> Option<bool> {
                self.text(name).map(|v| v == "on")
            }
            fn number(&self, _: &str) -> Option<u64> {
                None
            }
        }
        let f = |bf: Option<&'static str>,
                 a: Option<&'static str>,
                 hw: Option<&'static str>,
                 c6: bool,
                 sub: Option<&'static str>,
                 zg: bool| {
            let mut v = vec![];
            for (k, x) in [
                ("backing_fmt", bf),
                ("adapter_type", a),
                ("hwversion", hw),
                ("subformat", sub),
            ] {
                if let Some(x) = x {
                    v.push((k, x));
                }
            }
            if c6 {
                v.push(("compat6", "on"));
            }
            if zg {
                v.push(("zeroed_grain", "on"));
            }
            from_values(1 << 20, &V(v)).map_err(|e| e.to_string())
        };
        assert_eq!(
            f(Some("raw"), Some("x"), None, false, None, false).unwrap_err(),
            "backing_file must be a vmdk image"
        );
        assert_eq!(
            f(None, Some("x"), None, false, Some("y"), false).unwrap_err(),
            "invalid parameter value: x"
        );
        assert_eq!(
            f(None, None, None, false, Some("y"), false).unwrap_err(),
            "invalid parameter value: y"
        );
        assert_eq!(
            f(None, None, Some("7"), true, None, false).unwrap_err(),
            "compat6 cannot be enabled with hwversion set"
        );
        assert_eq!(
            f(None, None, Some("undefined"), true, None, false)
                .unwrap()
                .hw_version,
            "6"
        );
        assert!(f(None, None, None, false, Some("monolithicFlat"), true).is_err());
        assert_eq!(
            f(None, Some("lsilogic"), None, false, None, false)
                .unwrap()
                .adapter_type,
            "lsilogic"
        );
    }
}
