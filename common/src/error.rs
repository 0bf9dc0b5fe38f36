//! The engine's error type: one line of text a user can act on.

use std::fmt;
use std::io;

/// Result alias used across the engine.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything the engine can fail with. `Display` is a single human-readable line.
#[derive(Debug)]
pub enum Error {
    /// An I/O error from the storage below, with what we were doing.
    Io { context: String, source: io::Error },
    /// The image is malformed or hostile (a field out of range, a table past the end, ...).
    Corrupt(String),
    /// The image uses something this engine does not implement (an unknown feature, ...).
    Unsupported(String),
    /// Another process holds a conflicting lock on the image.
    Locked(String),
    /// A write was attempted on an image opened read-only (or marked corrupt).
    ReadOnly,
    /// A caller passed an argument that cannot be honoured (offset past the end, bad option).
    InvalidArgument(String),
}

impl Error {
    /// Wrap an I/O error with a short description of the operation that failed.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Shorthand for a `Corrupt` error.
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Error::Corrupt(msg.into())
    }

    /// Shorthand for an `InvalidArgument` error.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// The underlying OS error number, when there is one (ENOSPC, EACCES, ...).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { context, source } => write!(f, "{context}: {}", os_message(source)),
            Error::Corrupt(m) | Error::Unsupported(m) | Error::Locked(m) => f.write_str(m),
            Error::InvalidArgument(m) => f.write_str(m),
            Error::ReadOnly => f.write_str("Image is read-only"),
        }
    }
}

/// Turn an I/O result into an engine result, saying what was being done.
pub(crate) fn io<T>(what: &str, r: io::Result<T>) -> Result<T> {
    r.map_err(|e| Error::io(what, e))
}

/// An I/O error's text the way C's strerror puts it, without Rust's "(os error N)" suffix.
pub fn os_message(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
