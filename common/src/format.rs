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
            other => Err(Error::invalid(format!("Unknown driver '{other}'"))),
        }
    }
}
