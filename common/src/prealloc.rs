//! Preallocation modes shared by the formats.

use crate::error::{Error, Result};

/// Preallocation modes of `qemu-img create -o preallocation=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Sparse file.
    #[default]
    Off,
    /// Preallocate metadata only (qcow2); not supported for raw.
    Metadata,
    /// Reserve the space with `posix_fallocate`.
    Falloc,
    /// Write zeroes over the whole image.
    Full,
}

impl Preallocation {
    /// Parse the `preallocation=` option value.
    pub fn from_name(name: &str) -> Result<Preallocation> {
        match name {
            "off" => Ok(Preallocation::Off),
            "metadata" => Ok(Preallocation::Metadata),
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            other => Err(Error::invalid(format!("invalid parameter value: {other}"))),
        }
    }

    /// The name as qemu-img prints it.
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}
