//! The engine's error type: a kind callers can match on, and one line of text a user can act
//! on (QEMU's wording where QEMU has one).

use std::fmt;
use std::io;

/// Result alias used across the engine.
pub type Result<T> = std::result::Result<T, Error>;

/// A kind of on-disk metadata structure, named by corruption errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Structure {
    /// The image header, its extensions and the backing file name stored with it.
    Header,
    L1Table,
    L2Table,
    RefcountTable,
    RefcountBlock,
    SnapshotTable,
    CompressedCluster,
    DataCluster,
    BitmapDirectory,
}

/// Everything the engine can fail with. `Display` is the message alone, as qemu-img prints it.
#[derive(Debug)]
pub enum Error {
    /// An I/O error from the storage below, with what we were doing.
    Io { context: String, source: io::Error },
    /// The image is malformed or hostile (a field out of range, a table past the end, ...).
    Corrupt {
        /// The structure found broken, when the site knows it.
        structure: Option<Structure>,
        /// Host offset of that structure (or of the bad entry in it), when known.
        offset: Option<u64>,
        message: String,
    },
    /// The image uses something this engine does not implement (an unknown feature, ...).
    Unsupported(String),
    /// Another process holds a conflicting lock on the image ("image in use").
    Locked(String),
    /// A backing chain names a file already in it.
    BackingLoop(String),
    /// A write was attempted on an image opened read-only (or marked corrupt).
    ReadOnly,
    /// A caller passed an argument that cannot be honoured (offset past the end, bad option).
    InvalidArgument(String),
    /// What the caller named (a snapshot) does not exist.
    NotFound(String),
    /// What was asked does not fit where the format keeps it (a backing file name in a
    /// full qcow2 header cluster): QEMU's `ENOSPC` from a header update.
    NoSpace(String),
    /// A network peer broke the NBD protocol (bad magic, a length past the limits, a
    /// reply that does not match the request).
    Protocol(String),
}

impl Error {
    /// Wrap an I/O error with a short description of the operation that failed.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// A `Corrupt` error whose structure is not named.
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Error::Corrupt {
            structure: None,
            offset: None,
            message: msg.into(),
        }
    }

    /// A `Corrupt` error in `structure` at host `offset`.
    pub fn corrupt_at(structure: Structure, offset: u64, msg: impl Into<String>) -> Self {
        Error::Corrupt {
            structure: Some(structure),
            offset: Some(offset),
            message: msg.into(),
        }
    }

    /// Shorthand for an `InvalidArgument` error.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// A `Corrupt` error that does not say where yet gets `structure` at host `offset`;
    /// any other error comes back unchanged.
    pub fn located(self, structure: Structure, offset: u64) -> Self {
        match self {
            Error::Corrupt {
                structure: None,
                message,
                ..
            } => Error::corrupt_at(structure, offset, message),
            e => e,
        }
    }

    /// The same error, its message prefixed with `what` and `": "` (QEMU's
    /// `error_prepend`). The kind is kept: a lock conflict stays [`Error::Locked`].
    /// [`Error::ReadOnly`] has a fixed message and comes back unchanged.
    pub fn context(self, what: &str) -> Self {
        let pre = |m: String| format!("{what}: {m}");
        match self {
            Error::Io { context, source } => Error::Io {
                context: pre(context),
                source,
            },
            Error::Corrupt {
                structure,
                offset,
                message,
            } => Error::Corrupt {
                structure,
                offset,
                message: pre(message),
            },
            Error::Unsupported(m) => Error::Unsupported(pre(m)),
            Error::Locked(m) => Error::Locked(pre(m)),
            Error::BackingLoop(m) => Error::BackingLoop(pre(m)),
            Error::ReadOnly => Error::ReadOnly,
            Error::InvalidArgument(m) => Error::InvalidArgument(pre(m)),
            Error::NotFound(m) => Error::NotFound(pre(m)),
            Error::NoSpace(m) => Error::NoSpace(pre(m)),
            Error::Protocol(m) => Error::Protocol(pre(m)),
        }
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
            Error::Corrupt { message: m, .. }
            | Error::Unsupported(m)
            | Error::Locked(m)
            | Error::BackingLoop(m)
            | Error::InvalidArgument(m)
            | Error::NotFound(m)
            | Error::NoSpace(m)
            | Error::Protocol(m) => f.write_str(m),
            Error::ReadOnly => f.write_str("Image is read-only"),
        }
    }
}

/// Turn an I/O result into an engine result, saying what was being done.
pub(crate) fn io<T>(what: &str, r: io::Result<T>) -> Result<T> {
    r.map_err(|e| Error::io(what, e))
}

/// [`io`] as a `map_err` argument: the I/O error wrapped with what was being done.
pub(crate) fn io_err(what: &str) -> impl Fn(io::Error) -> Error + '_ {
    move |e| Error::io(what, e)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_keeps_the_kind_and_prepends_the_text() {
        let e = Error::Locked("Failed to get \"write\" lock".into()).context("Could not open x");
        assert!(matches!(e, Error::Locked(_)));
        assert_eq!(
            e.to_string(),
            "Could not open x: Failed to get \"write\" lock"
        );
        let e = Error::io(
            "Could not open 'b'",
            io::Error::from_raw_os_error(libc::ENOENT),
        )
        .context("Could not open backing file");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(
            e.to_string(),
            "Could not open backing file: Could not open 'b': No such file or directory"
        );
        let e = Error::corrupt_at(Structure::L2Table, 0x30000, "bad").context("c");
        assert!(matches!(
            e,
            Error::Corrupt {
                structure: Some(Structure::L2Table),
                offset: Some(0x30000),
                ..
            }
        ));
        assert_eq!(e.to_string(), "c: bad");
        assert!(matches!(Error::ReadOnly.context("c"), Error::ReadOnly));
    }
}
