//! How `img` reports failure: one `img: ...` line (plus QEMU's hint lines) on stderr and
//! exit code 1, the way qemu-img does.

use std::fmt;

/// A failure of a subcommand, already worded for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// `img: MSG` (MSG may hold further hint lines).
    Msg(String),
    /// Bad usage: `img: MSG` then `Try 'img CMD --help' for more info`.
    Usage { cmd: &'static str, msg: String },
}

impl Failure {
    /// A plain error message.
    pub fn msg(m: impl Into<String>) -> Failure {
        Failure::Msg(m.into())
    }

    /// A usage error of subcommand `cmd`.
    pub fn usage(cmd: &'static str, m: impl Into<String>) -> Failure {
        Failure::Usage { cmd, msg: m.into() }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Msg(m) => write!(f, "img: {m}"),
            Failure::Usage { cmd, msg } => {
                write!(f, "img: {msg}\nTry 'img {cmd} --help' for more info")
            }
        }
    }
}

/// Result of a subcommand: the exit code on success.
pub type CmdResult = Result<i32, Failure>;

/// An engine error as one line of QEMU-style text: Rust's ` (os error N)` suffix removed,
/// so that I/O errors read like C's `strerror`.
pub fn engine_msg(e: &common::Error) -> String {
    strip_os_error(&e.to_string())
}

/// The error text qemu-img prints for a failed guest read or write: the strerror alone,
/// and EIO for data or metadata the format cannot use (a compressed cluster that does
/// not inflate).
pub fn io_msg(e: &common::Error) -> String {
    match e {
        common::Error::Io { source, .. } => common::error::os_message(source),
        common::Error::Corrupt { .. } => "Input/output error".to_string(),
        _ => engine_msg(e),
    }
}

/// Remove every ` (os error N)` that `std::io::Error`'s `Display` adds.
pub fn strip_os_error(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find(" (os error ") {
        let tail = &rest[at + " (os error ".len()..];
        let digits = tail.bytes().take_while(|c| c.is_ascii_digit()).count();
        if digits > 0 && tail[digits..].starts_with(')') {
            out.push_str(&rest[..at]);
            rest = &tail[digits + 1..];
        } else {
            out.push_str(&rest[..at + 1]);
            rest = &rest[at + 1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_os_error_suffixes() {
        assert_eq!(
            strip_os_error("Could not open 'x': No such file or directory (os error 2)"),
            "Could not open 'x': No such file or directory"
        );
        assert_eq!(strip_os_error("a (os error x) b"), "a (os error x) b");
        assert_eq!(strip_os_error("plain"), "plain");
    }

    #[test]
    fn failure_text() {
        assert_eq!(Failure::msg("x").to_string(), "img: x");
        assert_eq!(
            Failure::usage("create", "Expecting image file name").to_string(),
            "img: Expecting image file name\nTry 'img create --help' for more info"
        );
    }
}
