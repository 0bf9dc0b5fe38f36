//! Creating images of every format: qemu-img's creation options (`-o`), checked in its order
//! with its messages, and the create itself.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::Format;
use crate::open::{Chain, Image, OpenOptions};
use crate::qcow2::Qcow2Image;

pub use crate::prealloc::Preallocation;
pub use crate::qcow2::create::Qcow2CreateOptions;
pub use crate::qcow2::header::CompressionType;
pub use crate::vdi::create::VdiCreateOptions;
pub use crate::vhdx::create::VhdxCreateOptions;
pub use crate::vmdk::create::VmdkCreateOptions;
pub use crate::vpc::create::VpcCreateOptions;

/// A new image, per format.
#[derive(Debug, Clone)]
pub enum CreateOptions {
    Raw {
        /// Size in bytes (a multiple of 512, as qemu-img rounds it).
        size: u64,
        preallocation: Preallocation,
    },
    Qcow2(Qcow2CreateOptions),
    Vpc(VpcCreateOptions),
    Vdi(VdiCreateOptions),
    Vmdk(VmdkCreateOptions),
    Vhdx(VhdxCreateOptions),
}

/// The values of QEMU creation options as a front end parsed them (`-o key=value,...`),
/// typed by the option's kind.
pub trait OptionValues {
    /// A string option.
    fn text(&self, name: &str) -> Option<&str>;
    /// A boolean option.
    fn flag(&self, name: &str) -> Option<bool>;
    /// A size or number option.
    fn number(&self, name: &str) -> Option<u64>;
}

impl CreateOptions {
    /// The options for a new `format` image of `size` bytes (rounded up to whole sectors)
    /// from parsed `-o` values, with qemu-img's checks in its order.
    pub fn from_values(format: Format, values: &dyn OptionValues, size: u64) -> Result<Self> {
        match format {
            Format::Raw => {
                let preallocation = match values.text("preallocation") {
                    Some(p) => Preallocation::from_name(p)?,
                    None => Preallocation::Off,
                };
                Ok(CreateOptions::Raw {
                    size: round_to_sector(size),
                    preallocation,
                })
            }
            Format::Qcow2 => {
                let mut q = qcow2_from_values(values, size)?;
                q.validate()?;
                q.size = round_to_sector(size);
                Ok(CreateOptions::Qcow2(q))
            }
            Format::Vpc => {
                check_protocol_preallocation(values)?;
                let fixed = fixed_subformat(values)?;
                Ok(CreateOptions::Vpc(VpcCreateOptions {
                    size: round_to_sector(size),
                    fixed,
                    force_size: values.flag("force_size").unwrap_or(false),
                }))
            }
            Format::Vdi => {
                check_protocol_preallocation(values)?;
                Ok(CreateOptions::Vdi(VdiCreateOptions {
                    size: round_to_sector(size),
                    fixed: values.flag("static").unwrap_or(false),
                }))
            }
            Format::Vmdk => {
                let o = crate::vmdk::create::from_values(round_to_sector(size), values)?;
                check_protocol_preallocation(values)?;
                Ok(CreateOptions::Vmdk(o))
            }
            Format::Vhdx => {
                let o = crate::vhdx::create::from_values(round_to_sector(size), values)?;
                check_protocol_preallocation(values)?;
                Ok(CreateOptions::Vhdx(o))
            }
            Format::Qed | Format::Qcow | Format::Parallels => Err(format.read_only_error()),
        }
    }
}

/// `subformat=dynamic|fixed` of vpc and vhdx: whether it is fixed.
pub(crate) fn fixed_subformat(values: &dyn OptionValues) -> Result<bool> {
    match values.text("subformat") {
        None | Some("dynamic") => Ok(false),
        Some("fixed") => Ok(true),
        Some(other) => Err(Error::invalid(format!(
            "Parameter 'subformat' does not accept value '{other}'"
        ))),
    }
}

/// vpc and vdi pass `preallocation` to the file they create, which QEMU then overwrites
/// with the format's own layout: the value is only checked, as the file protocol does.
fn check_protocol_preallocation(values: &dyn OptionValues) -> Result<()> {
    match values.text("preallocation").map(Preallocation::from_name) {
        Some(Ok(Preallocation::Metadata)) => Err(Error::Unsupported(
            "Unsupported preallocation mode: metadata".into(),
        )),
        Some(Err(e)) => Err(e),
        _ => Ok(()),
    }
}

/// Sizes are rounded up to whole 512-byte sectors, as QEMU does for both formats.
fn round_to_sector(size: u64) -> u64 {
    size.checked_next_multiple_of(512).unwrap_or(size)
}

/// qcow2's option values as engine options: the checks QEMU makes while it reads them.
fn qcow2_from_values(values: &dyn OptionValues, size: u64) -> Result<Qcow2CreateOptions> {
    let not_accepted = |param: &str, v: &str| {
        Error::invalid(format!("Parameter '{param}' does not accept value '{v}'"))
    };
    let mut q = Qcow2CreateOptions {
        size,
        ..Default::default()
    };
    if let Some(v) = values.text("compat") {
        q.version = match v {
            "0.10" | "v2" => 2,
            "1.1" | "v3" => 3,
            other => return Err(not_accepted("version", other)),
        };
    }
    if let Some(v) = values.text("preallocation") {
        q.preallocation = match Preallocation::from_name(v) {
            Ok(p) => p,
            Err(_) => return Err(not_accepted("preallocation", v)),
        };
    }
    if let Some(v) = values.text("compression_type") {
        q.compression_type = match v {
            "zlib" => CompressionType::Zlib,
            "zstd" => CompressionType::Zstd,
            other => return Err(not_accepted("compression-type", other)),
        };
    }
    if values.flag("encryption") == Some(true) {
        return Err(Error::invalid(
            "Parameter 'encrypt.key-secret' is required for cipher",
        ));
    }
    if values.text("data_file").is_some() || values.flag("data_file_raw") == Some(true) {
        return Err(Error::Unsupported(
            "External data files are not supported".into(),
        ));
    }
    if let Some(c) = values.number("cluster_size") {
        q.cluster_size = c;
    }
    q.extended_l2 = values.flag("extended_l2").unwrap_or(false);
    q.backing_file = values.text("backing_file").map(str::to_string);
    q.backing_format = values.text("backing_fmt").map(str::to_string);
    q.lazy_refcounts = values.flag("lazy_refcounts").unwrap_or(false);
    // Out-of-range widths (beyond u32) are refused by the width check.
    q.refcount_bits = values
        .number("refcount_bits")
        .map_or(16, |b| u32::try_from(b).unwrap_or(u32::MAX));
    Ok(q)
}

/// Create (or overwrite) an image at `path`.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    match opts {
        CreateOptions::Raw {
            size,
            preallocation,
        } => crate::raw::create_raw(path, *size, *preallocation).map_err(|e| {
            if e.raw_os_error() == Some(libc::EFBIG) {
                Error::invalid("The image size is too large for file format 'raw'")
            } else {
                e
            }
        }),
        CreateOptions::Qcow2(q) => crate::qcow2::create::create_qcow2(path, q),
        CreateOptions::Vpc(v) => crate::vpc::create::create_vpc(path, v),
        CreateOptions::Vdi(v) => crate::vdi::create::create_vdi(path, v),
        CreateOptions::Vmdk(v) => crate::vmdk::create::create_vmdk(path, v),
        CreateOptions::Vhdx(v) => crate::vhdx::create::create_vhdx(path, v),
    }
}

/// Create a qcow2 image at `path` and open it read-write through the same descriptor, with
/// its backing chain (read-only below it), so that nobody can take the image in between.
pub fn create_and_open(path: &Path, opts: &Qcow2CreateOptions) -> Result<Image> {
    let top = Image::Qcow2(Qcow2Image::create_and_open(path, opts)?);
    Chain::starting_at(path)?.attach_below(top, path, &OpenOptions::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// `-o` values as a front end would have typed them.
    #[derive(Default)]
    struct Values(HashMap<&'static str, &'static str>);

    impl OptionValues for Values {
        fn text(&self, name: &str) -> Option<&str> {
            self.0.get(name).copied()
        }
        fn flag(&self, name: &str) -> Option<bool> {
            self.0.get(name).map(|v| *v == "on")
        }
        fn number(&self, name: &str) -> Option<u64> {
            self.0.get(name).map(|v| v.parse().unwrap())
        }
    }

    fn values(pairs: &[(&'static str, &'static str)]) -> Values {
        Values(pairs.iter().copied().collect())
    }

    #[test]
    fn sizes_are_rounded_and_checked_after_the_options() {
        let Ok(CreateOptions::Qcow2(q)) =
            CreateOptions::from_values(Format::Qcow2, &values(&[]), 5)
        else {
            panic!("qcow2 options expected")
        };
        assert_eq!(q.size, 512);
        let raw = CreateOptions::from_values(Format::Raw, &values(&[]), 513).unwrap();
        assert!(matches!(raw, CreateOptions::Raw { size: 1024, .. }));
        // An option error is reported before the size error, as qemu-img does.
        let v = values(&[("compat", "0.10"), ("lazy_refcounts", "on")]);
        let e = CreateOptions::from_values(Format::Qcow2, &v, u64::MAX).unwrap_err();
        assert!(
            e.to_string().starts_with("Lazy refcounts only supported"),
            "{e}"
        );
        let e = CreateOptions::from_values(Format::Qcow2, &values(&[]), u64::MAX).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Could not resize image: Image size cannot be negative"
        );
    }

    #[test]
    fn option_values_are_refused_with_qemu_messages() {
        let cases: [(&[(&'static str, &'static str)], &str); 4] = [
            (
                &[("preallocation", "bogus")],
                "Parameter 'preallocation' does not accept value 'bogus'",
            ),
            (
                &[("refcount_bits", "4294967312")],
                "Refcount width must be a power of two and may not exceed 64 bits",
            ),
            (
                &[("data_file", "d")],
                "External data files are not supported",
            ),
            (
                &[("encryption", "on")],
                "Parameter 'encrypt.key-secret' is required for cipher",
            ),
        ];
        for (v, want) in cases {
            let e = CreateOptions::from_values(Format::Qcow2, &values(v), 1 << 20).unwrap_err();
            assert_eq!(e.to_string(), want);
        }
        let e = CreateOptions::from_values(Format::Raw, &values(&[("preallocation", "x")]), 1)
            .unwrap_err();
        assert_eq!(e.to_string(), "invalid parameter value: x");
    }

    #[test]
    fn create_and_open_attaches_the_backing_chain_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0x5au8; 1 << 16]).unwrap();
        let opts = Qcow2CreateOptions {
            size: 1 << 16,
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            ..Default::default()
        };
        let top = crate::lock::retry_while_locked(|| {
            create_and_open(&dir.path().join("top.qcow2"), &opts)
        })
        .unwrap();
        assert!(!top.driver().is_read_only());
        assert!(top.layer(1).unwrap().is_read_only());
        let mut b = [0u8; 4];
        top.driver().read_at(&mut b, 100).unwrap();
        assert_eq!(b, [0x5a; 4]);
        top.driver().write_at(&[1; 4], 100).unwrap();
        top.driver().read_at(&mut b, 98).unwrap();
        assert_eq!(b, [0x5a, 0x5a, 1, 1]);
        assert_eq!(std::fs::read(&base).unwrap(), vec![0x5au8; 1 << 16]);
    }
}
