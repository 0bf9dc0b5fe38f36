//! `--image-opts`: an image named by QEMU's option string instead of a file name, as in
//! `driver=qcow2,file.filename=disk.qcow2` or
//! `driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=/run/nbd.sock`.
//!
//! The options img acts on: `driver` (a format, or a protocol: `file`, `host_device`,
//! `host_cdrom`, `nbd`), the protocol child's (`file.driver`, `file.filename`, the NBD
//! server and export, `file.locking=on|auto`, `file.aio`), `read-only`, `force-share`,
//! `cache.direct`, `cache.no-flush`, `backing` (empty or JSON null: not opened);
//! `node-name` and `auto-read-only` are taken and mean nothing here, and qcow2's cache
//! sizes are taken and left to the engine, which sizes its own caches. Any other option is
//! refused, in QEMU's words. `json:{...}` file names are the same options as JSON.

use std::collections::BTreeMap;

use common::nbd::uri::escape;
use common::open::{Format, OpenOptions};

use crate::qemu_opts;

/// What an option string names: the file (or NBD URI) to open and how.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageSpec {
    /// A file name or an NBD URI, as the engine opens them.
    pub name: String,
    /// The format; `None` probes it.
    pub format: Option<Format>,
    /// `driver` named a protocol: the image is its bytes, with no format node above.
    pub protocol_on_top: bool,
    /// `backing: null`: the backing file is not opened.
    no_backing: bool,
    read_only: Option<bool>,
    force_share: Option<bool>,
    direct: Option<bool>,
    no_flush: Option<bool>,
    /// Format options given without a `driver`: QEMU judges them by the probed format.
    format_keys: Vec<String>,
}

/// Why the options cannot open the image the way the command needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// `read-only=on` for a command that writes.
    ReadOnly,
    /// `force-share=off` with `-U`.
    ForceShare,
}

impl ImageSpec {
    /// `opts` (what the command asks for) with what the option string says, which wins
    /// where both name the same thing; a conflict QEMU refuses is an error.
    pub fn open_options(&self, opts: OpenOptions) -> Result<OpenOptions, Conflict> {
        if self.read_only == Some(true) && !opts.read_only {
            return Err(Conflict::ReadOnly);
        }
        if opts.force_share && self.force_share == Some(false) {
            return Err(Conflict::ForceShare);
        }
        Ok(OpenOptions {
            format: self.format,
            force_share: self.force_share.unwrap_or(opts.force_share),
            direct: self.direct.unwrap_or(opts.direct),
            no_flush: self.no_flush.unwrap_or(opts.no_flush),
            no_backing: opts.no_backing || self.no_backing,
            ..opts
        })
    }

    /// `backing: null`: the backing file is not opened.
    pub fn no_backing(&self) -> bool {
        self.no_backing
    }

    /// Whether `probed`, the format the image was found in, takes the format options
    /// given without a `driver`; the error is qemu-img's text after `Could not open ...: `.
    pub fn check_probed(&self, probed: &str) -> Result<(), String> {
        match self.format_keys.iter().find(|k| !format_takes(probed, k)) {
            Some(k) => Err(unsupported_by(probed, k)),
            None => Ok(()),
        }
    }
}

/// Whether format `format` takes option `key` (besides [`FORMAT_KEYS`]).
fn format_takes(format: &str, key: &str) -> bool {
    format == "qcow2" && QCOW2_CACHE_KEYS.contains(&key)
}

/// qemu-img's refusal of a format option.
fn unsupported_by(format: &str, key: &str) -> String {
    format!("Block format '{format}' does not support the option '{key}'")
}

/// Protocols a `driver` may name.
const PROTOCOLS: &[&str] = &["file", "host_device", "host_cdrom", "nbd"];

/// Options of the format layer img takes besides `driver`.
const FORMAT_KEYS: &[&str] = &[
    "read-only",
    "force-share",
    "cache.direct",
    "cache.no-flush",
    "node-name",
    "auto-read-only",
];

/// qcow2's cache tuning: taken, and left to the engine.
const QCOW2_CACHE_KEYS: &[&str] = &[
    "cache-size",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
    "cache-clean-interval",
];

/// Parse an `--image-opts` string; the error is what qemu-img prints after
/// `Could not open 'STRING': `.
pub fn parse(s: &str) -> Result<ImageSpec, String> {
    interpret(qemu_opts::split(s, "file"))
}

/// Parse the JSON object of a `json:{...}` file name (nested objects are the dotted keys
/// of the option string), in format `format` if `-f` gave one; the error is what qemu-img prints after `Could not open ...: `.
pub fn parse_json(s: &str, format: Option<&str>) -> Result<ImageSpec, String> {
    let v: serde_json::Value =
        serde_json::from_str(s).map_err(|e| format!("Could not parse the JSON options: {e}"))?;
    let serde_json::Value::Object(top) = v else {
        return Err("Invalid JSON object given".into());
    };
    let mut o = BTreeMap::new();
    let mut no_backing = false;
    for (k, v) in top {
        if k == "backing" && v.is_null() {
            no_backing = true;
        } else {
            flatten(&k, &v, &mut o);
        }
    }
    // `-f` names the driver, whatever the object says.
    if let Some(f) = format {
        o.insert("driver".into(), f.to_string());
    }
    let mut spec = interpret(o)?;
    spec.no_backing |= no_backing;
    Ok(spec)
}

/// `v` under `key` as option-string entries: objects as dotted keys, booleans `on`/`off`.
fn flatten(key: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    use serde_json::Value;
    let text = match v {
        Value::Object(m) => {
            for (k, v) in m {
                flatten(&format!("{key}.{k}"), v, out);
            }
            return;
        }
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
        Value::Null => String::new(),
        Value::Number(_) | Value::Array(_) => v.to_string(),
    };
    out.insert(key.to_string(), text);
}

/// The options of a file name, as a map, made into what it names.
fn interpret(mut o: BTreeMap<String, String>) -> Result<ImageSpec, String> {
    if o.contains_key("file") {
        let f = &o["file"];
        return Err(format!("Cannot find device='{f}' nor node-name='{f}'"));
    }
    let driver = o.remove("driver");
    let has_child = o.keys().any(|k| k.starts_with("file."));
    let mut spec = ImageSpec::default();
    let child: BTreeMap<String, String> = match driver.as_deref() {
        None if !has_child => return Err("Must specify either driver or file".into()),
        Some(p) if PROTOCOLS.contains(&p) => {
            // A protocol on top: its bytes are the image.
            spec.format = Some(Format::Raw);
            spec.protocol_on_top = true;
            let mut c: BTreeMap<String, String> = o
                .iter()
                .filter(|(k, _)| !FORMAT_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            c.insert("driver".into(), p.to_string());
            o.retain(|k, _| FORMAT_KEYS.contains(&k.as_str()));
            c
        }
        Some(f) => {
            let format = Format::from_name(f).map_err(|e| crate::errors::engine_msg(&e))?;
            spec.format = Some(format);
            if !has_child {
                return Err("A block device must be specified for \"file\"".into());
            }
            take_prefixed(&mut o, "file.")
        }
        None => take_prefixed(&mut o, "file."),
    };
    for (k, v) in &o {
        let b = || parse_bool(k, v);
        match k.as_str() {
            "read-only" => spec.read_only = Some(b()?),
            "force-share" => spec.force_share = Some(b()?),
            "cache.direct" => spec.direct = Some(b()?),
            "cache.no-flush" => spec.no_flush = Some(b()?),
            "auto-read-only" => {
                b()?;
            }
            "node-name" => {}
            "backing" if v.is_empty() => {
                eprintln!(
                    "img: warning: Use of \"backing\": \"\" is deprecated; use \"backing\": null instead"
                );
                spec.no_backing = true;
            }
            "backing" => return Err(format!("Cannot find device='{v}' nor node-name='{v}'")),
            k => match driver.as_deref() {
                // Judged once the format is probed.
                None => spec.format_keys.push(k.to_string()),
                Some(f) if format_takes(f, k) => {}
                Some(f) => return Err(unsupported_by(f, k)),
            },
        }
    }
    spec.name = protocol_name(&child)?;
    Ok(spec)
}

/// The file name or NBD URI the protocol child's options name.
fn protocol_name(c: &BTreeMap<String, String>) -> Result<String, String> {
    let driver = c.get("driver").map_or("file", String::as_str);
    if !PROTOCOLS.contains(&driver) {
        return Err(format!("Unknown driver '{driver}'"));
    }
    let unsupported =
        |k: &str| format!("Block protocol '{driver}' doesn't support the option '{k}'");
    if driver == "nbd" {
        for k in c.keys() {
            if !NBD_KEYS.contains(&k.as_str()) {
                return Err(unsupported(k));
            }
        }
        return nbd_uri(c);
    }
    for (k, v) in c {
        match k.as_str() {
            "driver" | "filename" => {}
            "locking" => {
                match v.as_str() {
                    "on" | "auto" => {}
                    "off" => return Err(
                        "img always locks the images it opens: file.locking=off is not supported"
                            .into(),
                    ),
                    _ => return Err(format!("invalid parameter value: {v}")),
                }
            }
            "aio" => match v.as_str() {
                "threads" | "native" | "io_uring" => {}
                _ => return Err(format!("invalid parameter value: {v}")),
            },
            k => return Err(unsupported(k)),
        }
    }
    let Some(name) = c.get("filename") else {
        return Err(format!("The '{driver}' block driver requires a file name"));
    };
    if driver == "host_device" {
        use std::os::unix::fs::FileTypeExt;
        let device = std::fs::metadata(name)
            .map(|m| m.file_type().is_block_device() || m.file_type().is_char_device())
            .unwrap_or(true);
        if !device {
            return Err(format!(
                "'host_device' driver requires '{name}' to be either a character or block device"
            ));
        }
    }
    Ok(name.clone())
}

/// The NBD options img knows (the server's address, old and new spellings, and the
/// export).
const NBD_KEYS: &[&str] = &[
    "driver",
    "server.type",
    "server.host",
    "server.port",
    "server.path",
    "host",
    "port",
    "path",
    "export",
];

/// The `nbd://` or `nbd+unix://` URI of an NBD child's options.
fn nbd_uri(c: &BTreeMap<String, String>) -> Result<String, String> {
    let get = |new: &str, old: &str| c.get(new).or_else(|| c.get(old)).cloned();
    let export = c.get("export").map_or("", String::as_str);
    let path = get("server.path", "path");
    let host = get("server.host", "host");
    let kind = match c.get("server.type").map(String::as_str) {
        Some("unix") => "unix",
        Some("inet") => "inet",
        Some(t) => return Err(format!("Parameter 'type' does not accept value '{t}'")),
        None if path.is_some() => "unix",
        None if host.is_some() => "inet",
        None => return Err("NBD server address missing".into()),
    };
    if kind == "unix" {
        let path = path.ok_or("Parameter 'path' is missing")?;
        let (export, path) = (escape(export.as_bytes()), escape(path.as_bytes()));
        return Ok(format!("nbd+unix:///{export}?socket={path}"));
    }
    let host = host.ok_or("Parameter 'host' is missing")?;
    // The new spelling names the port explicitly, as QEMU requires; the old one
    // defaults it.
    let port = match (c.get("server.port"), c.get("port")) {
        (Some(p), _) | (None, Some(p)) => p.clone(),
        (None, None) if c.contains_key("server.host") => {
            return Err("Parameter 'port' is missing".into())
        }
        (None, None) => "10809".into(),
    };
    Ok(format!("nbd://{host}:{port}/{}", escape(export.as_bytes())))
}

/// The options whose keys start with `prefix`, taken out of `o` with the prefix removed.
fn take_prefixed(o: &mut BTreeMap<String, String>, prefix: &str) -> BTreeMap<String, String> {
    let keys: Vec<String> = o
        .keys()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect();
    keys.into_iter()
        .map(|k| {
            let v = o.remove(&k).unwrap_or_default();
            (k[prefix.len()..].to_string(), v)
        })
        .collect()
}

/// QEMU's boolean option values.
fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_formats() {
        let s = parse("driver=qcow2,file.filename=a,,b.qcow2,read-only=on").unwrap();
        assert_eq!(s.name, "a,b.qcow2");
        assert_eq!(s.format, Some(Format::Qcow2));
        assert_eq!((s.read_only, s.force_share), (Some(true), None));
        let s = parse("file.filename=x.img").unwrap();
        assert_eq!((s.name.as_str(), s.format), ("x.img", None));
        let s = parse("driver=file,filename=x.img,cache.direct=on").unwrap();
        assert_eq!((s.name.as_str(), s.format), ("x.img", Some(Format::Raw)));
        assert!(s.direct == Some(true) && s.protocol_on_top);
        let s = parse("driver=qcow2,file.filename=a,file.filename=b").unwrap();
        assert_eq!(s.name, "b");
    }

    #[test]
    fn json_names() {
        let s = parse_json(
            r#"{"driver":"qcow2","file":{"driver":"file","filename":"a.qcow2"},"read-only":true,"backing":null,"l2-cache-size":65536}"#,
            None,
        )
        .unwrap();
        assert_eq!(
            (s.name.as_str(), s.format),
            ("a.qcow2", Some(Format::Qcow2))
        );
        assert!(s.read_only == Some(true) && s.no_backing);
        // -f names the driver: raw has no cache sizes.
        let raw = parse_json(
            r#"{"driver":"qcow2","file":{"filename":"a"},"l2-cache-size":1}"#,
            Some("raw"),
        );
        assert_eq!(
            raw.unwrap_err(),
            "Block format 'raw' does not support the option 'l2-cache-size'"
        );
        let s = parse_json(
            r#"{"driver":"nbd","server":{"type":"unix","path":"/s"}}"#,
            None,
        )
        .unwrap();
        assert_eq!(s.name, "nbd+unix:///?socket=/s");
        assert_eq!(
            parse_json("[1]", None).unwrap_err(),
            "Invalid JSON object given"
        );
        assert!(parse_json(r#"{"driver":"qcow2""#, None)
            .unwrap_err()
            .starts_with("Could not parse the JSON options: "));
        assert_eq!(
            parse_json(r#"{"driver":"qcow2","file":"a"}"#, None).unwrap_err(),
            "Cannot find device='a' nor node-name='a'"
        );
    }

    #[test]
    fn nbd_servers() {
        let s =
            parse("driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=/s").unwrap();
        assert_eq!(s.name, "nbd+unix:///?socket=/s");
        let s = parse("driver=nbd,server.type=inet,server.host=h,server.port=99,export=e").unwrap();
        assert_eq!(s.name, "nbd://h:99/e");
        assert_eq!(parse("driver=nbd,host=h").unwrap().name, "nbd://h:10809/");
        assert_eq!(
            parse("driver=nbd,server.type=inet,server.host=h").unwrap_err(),
            "Parameter 'port' is missing"
        );
        assert_eq!(
            parse("driver=qcow2,file.driver=nbd").unwrap_err(),
            "NBD server address missing"
        );
    }

    #[test]
    fn errors_in_qemu_words() {
        for (s, e) in [
            (
                "a.qcow2",
                "Cannot find device='a.qcow2' nor node-name='a.qcow2'",
            ),
            ("filename=a", "Must specify either driver or file"),
            (
                "driver=qcow2",
                "A block device must be specified for \"file\"",
            ),
            ("driver=bogus,file.filename=a", "Unknown driver 'bogus'"),
            (
                "driver=raw,file.driver=bogus,file.filename=a",
                "Unknown driver 'bogus'",
            ),
            (
                "driver=qcow2,file.filename=a,foo=1",
                "Block format 'qcow2' does not support the option 'foo'",
            ),
            (
                "driver=qcow2,file.filename=a,file.foo=1",
                "Block protocol 'file' doesn't support the option 'foo'",
            ),
            (
                "driver=qcow2,file.driver=file",
                "The 'file' block driver requires a file name",
            ),
            (
                "driver=qcow2,file.filename=a,read-only=maybe",
                "Parameter 'read-only' expects 'on' or 'off'",
            ),
            (
                "driver=qcow2,file.filename=a,file.locking=bogus",
                "invalid parameter value: bogus",
            ),
            (
                "driver=raw,file.filename=a,l2-cache-size=1M",
                "Block format 'raw' does not support the option 'l2-cache-size'",
            ),
        ] {
            assert_eq!(parse(s).unwrap_err(), e, "{s}");
        }
        assert!(parse("driver=qcow2,file.filename=a,l2-cache-size=1M").is_ok());
    }
}
