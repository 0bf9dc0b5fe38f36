//! NBD image names, as QEMU takes them: `nbd://HOST[:PORT]/EXPORT` and
//! `nbd+unix:///EXPORT?socket=PATH`.

use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use super::consts::DEFAULT_PORT;
use crate::error::{Error, Result};

/// Where an NBD server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

/// A server and the export to open on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdTarget {
    pub endpoint: Endpoint,
    pub export: String,
}

impl NbdTarget {
    /// The name QEMU gives the export once open (`nbd://HOST[:PORT][/EXPORT]`,
    /// `nbd+unix://[/EXPORT]?socket=PATH`; the default port left out).
    pub fn display_name(&self) -> String {
        let export = if self.export.is_empty() {
            String::new()
        } else {
            format!("/{}", self.export)
        };
        match &self.endpoint {
            Endpoint::Tcp { host, port } if *port == DEFAULT_PORT => {
                format!("nbd://{host}{export}")
            }
            Endpoint::Tcp { host, port } => format!("nbd://{host}:{port}{export}"),
            Endpoint::Unix(p) => format!("nbd+unix://{export}?socket={}", p.display()),
        }
    }
}

/// Whether `name` is meant as an NBD URI (then [`parse`] says whether it is a valid one).
pub fn is_nbd_uri(name: &str) -> bool {
    name.starts_with("nbd://") || name.starts_with("nbd+tcp://") || name.starts_with("nbd+unix://")
}

/// Parse an NBD URI.
pub fn parse(name: &str) -> Result<NbdTarget> {
    let bad = || Error::invalid("No valid URL specified");
    let (scheme, rest) = name.split_once("://").ok_or_else(bad)?;
    let (authority, path_query) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (path, query) = match path_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_query, None),
    };
    let export =
        String::from_utf8_lossy(&unescape(path.strip_prefix('/').unwrap_or(path))).into_owned();
    let endpoint = match scheme {
        "nbd" | "nbd+tcp" => {
            if query.is_some() || authority.is_empty() {
                return Err(bad());
            }
            let (host, port) = match authority.rsplit_once(':') {
                Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                    (h, p.parse::<u16>().map_err(|_| bad())?)
                }
                _ => (authority, DEFAULT_PORT),
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            Endpoint::Tcp {
                host: host.to_string(),
                port,
            }
        }
        "nbd+unix" => {
            if !authority.is_empty() {
                return Err(bad());
            }
            let socket = query
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("socket=")))
                .filter(|s| !s.is_empty())
                .ok_or_else(bad)?;
            Endpoint::Unix(PathBuf::from(std::ffi::OsString::from_vec(unescape(
                socket,
            ))))
        }
        _ => return Err(bad()),
    };
    Ok(NbdTarget { endpoint, export })
}

/// `%XX` escapes decoded (anything else kept as it is), as a URI's path and query values
/// are read.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// `s` with the characters that would end a URI's path or query value (and `%` itself)
/// escaped, for building a URI from parts.
pub fn escape(s: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s {
        if matches!(c, b'%' | b'?' | b'#' | b'&' | b';') || !c.is_ascii_graphic() {
            out.push_str(&format!("%{c:02X}"));
        } else {
            out.push(c as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemus_uri_forms() {
        assert_eq!(
            parse("nbd://127.0.0.1:1234/exp").unwrap(),
            NbdTarget {
                endpoint: Endpoint::Tcp {
                    host: "127.0.0.1".into(),
                    port: 1234
                },
                export: "exp".into()
            }
        );
        assert_eq!(
            parse("nbd://h").unwrap(),
            NbdTarget {
                endpoint: Endpoint::Tcp {
                    host: "h".into(),
                    port: 10809
                },
                export: "".into()
            }
        );
        assert_eq!(
            parse("nbd+unix:///?socket=/tmp/s").unwrap(),
            NbdTarget {
                endpoint: Endpoint::Unix("/tmp/s".into()),
                export: "".into()
            }
        );
        assert_eq!(parse("nbd+unix:///e?socket=/s").unwrap().export, "e");
        assert!(parse("nbd+unix:///e").is_err());
        assert!(parse("nbd://h:99999/").is_err());
        assert!(parse("nbd:///x").is_err());
        assert!(is_nbd_uri("nbd://x") && !is_nbd_uri("disk.qcow2"));
        let name = |u: &str| parse(u).unwrap().display_name();
        assert_eq!(name("nbd+unix:///?socket=/s"), "nbd+unix://?socket=/s");
        assert_eq!(name("nbd+unix:///e?socket=/s"), "nbd+unix:///e?socket=/s");
        assert_eq!(name("nbd://h:1/e"), "nbd://h:1/e");
        assert_eq!(name("nbd://h:10809/"), "nbd://h");
    }

    #[test]
    fn escapes_are_decoded() {
        let t = parse("nbd+unix:///a%20b%3Fc?socket=/tmp/s%261").unwrap();
        assert_eq!(t.export, "a b?c");
        assert_eq!(t.endpoint, Endpoint::Unix("/tmp/s&1".into()));
        assert_eq!(parse("nbd://h/50%").unwrap().export, "50%");
        let raw = b"/tmp/a&b%41 c";
        let built = format!("nbd+unix:///?socket={}", escape(raw));
        assert_eq!(
            parse(&built).unwrap().endpoint,
            Endpoint::Unix("/tmp/a&b%41 c".into())
        );
    }
}
