//! `--object TYPE,id=ID,...`: the objects qemu-img lets a command line create, checked as
//! QEMU checks them. img has no consumer for one yet (no encrypted format, no TLS), so only
//! `secret` is taken (checked, its file read); the other types qemu-img creates are
//! refused as not supported, and `help` lists what img takes.

use std::collections::BTreeSet;

use crate::errors::Failure;
use crate::qemu_opts;

/// The types qemu-img 10 creates from `--object`.
const QEMU_TYPES: &[&str] = &[
    "authz-list",
    "authz-list-file",
    "authz-simple",
    "main-loop",
    "pr-manager-helper",
    "secret",
    "secret_keyring",
    "thread-context",
    "throttle-group",
    "tls-creds-anon",
    "tls-creds-psk",
    "tls-creds-x509",
];

/// The options of a `secret`, in `TYPE,help`'s order.
const SECRET_OPTIONS: &[(&str, &str)] = &[
    ("data", "string"),
    ("file", "string"),
    ("format", "QCryptoSecretFormat"),
    ("iv", "string"),
    ("keyid", "string"),
];

/// What the `--object` arguments asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Objects {
    /// All created.
    Created,
    /// A `help` was printed: the command stops there, successfully.
    HelpShown,
}

/// Check and create each `--object` in order, stopping at the first failure.
pub fn create(defs: &[String]) -> Result<Objects, Failure> {
    let mut ids = BTreeSet::new();
    for def in defs {
        let o = keyval(def)?;
        let Some(kind) = o.get("qom-type") else {
            return Err(Failure::msg("Parameter 'qom-type' is missing"));
        };
        if kind == "help" {
            print!("List of user creatable objects:\n  secret\n");
            return Ok(Objects::HelpShown);
        }
        if !QEMU_TYPES.contains(&kind.as_str()) {
            return Err(Failure::msg(format!(
                "Parameter 'qom-type' does not accept value '{kind}'"
            )));
        }
        if kind != "secret" {
            return Err(Failure::msg(format!(
                "Object type '{kind}' is not supported by img"
            )));
        }
        if o.contains_key("help") {
            let mut text = String::from("secret options:\n");
            for (name, ty) in SECRET_OPTIONS {
                text.push_str(&format!("  {name}=<{ty}>\n"));
            }
            print!("{text}");
            return Ok(Objects::HelpShown);
        }
        secret(&o, &ids)?;
        let id = o["id"].clone();
        if !ids.insert(id.clone()) {
            return Err(Failure::msg(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
    }
    Ok(Objects::Created)
}

/// QEMU's checks of a `secret`, in its order; `ids` are the secrets made before it.
fn secret(
    o: &std::collections::BTreeMap<String, String>,
    ids: &BTreeSet<String>,
) -> Result<(), Failure> {
    let Some(id) = o.get("id") else {
        return Err(Failure::msg("Parameter 'id' is missing"));
    };
    if !is_identifier(id) {
        return Err(Failure::msg(
            "Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, \
             '-', '.', '_', starting with a letter.",
        ));
    }
    for k in o.keys() {
        let known = k == "qom-type" || k == "id" || SECRET_OPTIONS.iter().any(|(n, _)| n == k);
        if !known {
            return Err(Failure::msg(format!("Parameter '{k}' is unexpected")));
        }
    }
    if let Some(f) = o.get("format") {
        if f != "raw" && f != "base64" {
            return Err(Failure::msg(format!(
                "Parameter 'format' does not accept value '{f}'"
            )));
        }
    }
    match (o.get("data"), o.get("file")) {
        (Some(_), Some(_)) => return Err(Failure::msg("'file' and 'data' are mutually exclusive")),
        (None, None) => return Err(Failure::msg("Either 'file' or 'data' must be provided")),
        (None, Some(path)) => {
            let why = |what: &str, e: std::io::Error| {
                Failure::msg(format!(
                    "Unable to read {path}: {what} “{path}”: {}",
                    crate::errors::strip_os_error(&e.to_string())
                ))
            };
            let mut f = std::fs::File::open(path).map_err(|e| why("Failed to open file", e))?;
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut data)
                .map_err(|e| why("Error reading file", e))?;
            check_base64(o, &data)?;
        }
        (Some(d), None) => check_base64(o, d.as_bytes())?,
    }
    if let Some(k) = o.get("keyid") {
        if !ids.contains(k) {
            return Err(Failure::msg(format!("No secret with id '{k}'")));
        }
        return Err(Failure::msg(
            "Secrets encrypted with another secret (keyid) are not supported by img",
        ));
    }
    Ok(())
}

/// With `format=base64`, the secret must be base64 text (QEMU checks its characters).
fn check_base64(
    o: &std::collections::BTreeMap<String, String>,
    data: &[u8],
) -> Result<(), Failure> {
    let base64 = o.get("format").is_some_and(|f| f == "base64");
    let ok = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=');
    if base64 && !data.iter().all(ok) {
        return Err(Failure::msg("Base64 data contains invalid characters"));
    }
    Ok(())
}

/// An object's `TYPE,key=value,...` as QEMU's keyval parser reads it: the type first, a
/// bare key (but `help`) refused.
fn keyval(def: &str) -> Result<std::collections::BTreeMap<String, String>, Failure> {
    for (i, part) in common::option_list::split(def).iter().enumerate() {
        if i > 0 && !part.is_empty() && part != "help" && !part.contains('=') {
            return Err(Failure::msg(format!(
                "Expected '=' after parameter '{part}'"
            )));
        }
    }
    Ok(qemu_opts::split(def, "qom-type"))
}

/// QEMU's identifiers: letters, digits, `-`, `.`, `_`, starting with a letter.
fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(defs: &[&str]) -> String {
        let defs: Vec<String> = defs.iter().map(|d| d.to_string()).collect();
        create(&defs).unwrap_err().to_string()
    }

    #[test]
    fn secrets_are_checked_like_qemu() {
        let ok = |d: &str| create(&[d.to_string()]).unwrap();
        assert_eq!(ok("secret,id=s0,data=abc"), Objects::Created);
        assert_eq!(ok("secret,id=s0,data=YWJj,format=base64"), Objects::Created);
        assert_eq!(err(&["id=x"]), "img: Parameter 'qom-type' is missing");
        assert_eq!(
            err(&["foo,id=x"]),
            "img: Parameter 'qom-type' does not accept value 'foo'"
        );
        assert_eq!(err(&["secret,data=a"]), "img: Parameter 'id' is missing");
        assert!(err(&["secret,id=0a,data=a"]).contains("expects an identifier"));
        assert_eq!(
            err(&["secret,id=s0"]),
            "img: Either 'file' or 'data' must be provided"
        );
        assert_eq!(
            err(&["secret,id=s0,data=a,bogus=1"]),
            "img: Parameter 'bogus' is unexpected"
        );
        assert_eq!(
            err(&["secret,id=s0,data=a,keyid=k"]),
            "img: No secret with id 'k'"
        );
        assert_eq!(
            err(&["secret,id=s0,data=a", "secret,id=s0,data=b"]),
            "img: attempt to add duplicate property 's0' to object (type 'container')"
        );
        assert!(err(&["throttle-group,id=t"]).contains("not supported by img"));
        assert_eq!(
            err(&["secret,id=s0,data=a,foo"]),
            "img: Expected '=' after parameter 'foo'"
        );
        assert_eq!(err(&[""]), "img: Parameter 'qom-type' is missing");
        assert_eq!(
            err(&["secret,id=s0,data=a!c,format=base64"]),
            "img: Base64 data contains invalid characters"
        );
        assert!(err(&["secret,id=s0,file=/"]).contains("Error reading file “/”: Is a directory"));
    }
}
