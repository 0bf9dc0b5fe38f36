//! The image formats the engine knows, by the names qemu-img uses.

use crate::error::{Error, Result};

/// Image formats the engine knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
    Vpc,
    Vdi,
    Vmdk,
    Vhdx,
    /// Read only, as the next two.
    Qed,
    /// qcow version 1.
    Qcow,
    Parallels,
}

impl Format {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vpc => "vpc",
            Format::Vdi => "vdi",
            Format::Vmdk => "vmdk",
            Format::Vhdx => "vhdx",
            Format::Qed => "qed",
            Format::Qcow => "qcow",
            Format::Parallels => "parallels",
        }
    }

    /// Parse a format name as given to `-f`/`-F`/`format=`.
    pub fn from_name(name: &str) -> Result<Format> {
        match name {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "vpc" => Ok(Format::Vpc),
            "vdi" => Ok(Format::Vdi),
            "vmdk" => Ok(Format::Vmdk),
            "vhdx" => Ok(Format::Vhdx),
            "qed" => Ok(Format::Qed),
            "qcow" => Ok(Format::Qcow),
            "parallels" => Ok(Format::Parallels),
            other => Err(Error::invalid(format!("Unknown driver '{other}'"))),
        }
    }

    /// Whether the engine only reads the format (it neither creates nor writes it).
    pub fn is_read_only(self) -> bool {
        matches!(self, Format::Qed | Format::Qcow | Format::Parallels)
    }

    /// Why an image of a read-only format cannot be created or opened for writing.
    pub fn read_only_error(self) -> Error {
        Error::Unsupported(format!(
            "The {} format is read-only in img: it reads such images but does not create \
             or write them",
            self.name()
        ))
    }
}
