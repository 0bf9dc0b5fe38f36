//! The text descriptor: the CIDs, the create type, the parent hint and the extent lines,
//! found the way QEMU finds them (first occurrence in the text, `sscanf`-like fields).

use crate::error::{Error, Result};

/// How much descriptor QEMU reads for the CIDs (20 sectors).
pub const DESC_SIZE: usize = 20 * 512;
/// The most of a descriptor file QEMU reads at once (just under 1 MiB).
pub const MAX_DESC_FILE: u64 = (1 << 20) - 1;

/// The text up to its first NUL, as C string functions see it.
pub fn c_text(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `sscanf("%x")` on `s`: leading white space, an optional sign and `0x`, hex digits
/// (saturating as glibc's strtoul does, then kept to 32 bits).
fn scan_hex(s: &[u8]) -> Option<u32> {
    let mut i = s.iter().take_while(|b| b.is_ascii_whitespace()).count();
    let neg = match s.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    if s.get(i) == Some(&b'0')
        && matches!(s.get(i + 1), Some(b'x' | b'X'))
        && s.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
    {
        i += 2;
    }
    let digits: Vec<u8> = s[i.min(s.len())..]
        .iter()
        .copied()
        .take_while(u8::is_ascii_hexdigit)
        .collect();
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for d in digits {
        let x = (d as char).to_digit(16).expect("hex digit") as u64;
        v = v
            .checked_mul(16)
            .and_then(|v| v.checked_add(x))
            .unwrap_or(u64::MAX);
    }
    Some(if neg {
        v.wrapping_neg() as u32
    } else {
        v as u32
    })
}

/// The CID (`parent` false) or parent CID from the descriptor sector run, as QEMU's
/// `vmdk_read_cid` finds it: the first occurrence of the name, then a hex number one byte
/// past it. A missing or unreadable one is EINVAL.
pub fn read_cid(desc: &[u8], parent: bool) -> Result<u32> {
    let text = c_text(&desc[..desc.len().min(DESC_SIZE - 1)]);
    let name: &[u8] = if parent { b"parentCID" } else { b"CID" };
    find(text, name)
        .and_then(|at| scan_hex(text.get(at + name.len() + 1..).unwrap_or(&[])))
        .ok_or_else(einval)
}

/// The parent image the descriptor names (`parentFileNameHint`), as QEMU's
/// `vmdk_parent_open` reads it: the name starts 20 bytes after the key (past `="`) and runs
/// to the next quote; no closing quote, or a name of 4096 bytes or more, is EINVAL.
pub fn parent_hint(desc: &[u8]) -> Result<Option<String>> {
    let text = c_text(&desc[..desc.len().min(DESC_SIZE - 1)]);
    let key: &[u8] = b"parentFileNameHint";
    let Some(at) = find(text, key) else {
        return Ok(None);
    };
    let name = text.get(at + key.len() + 2..).unwrap_or(&[]);
    let end = name.iter().position(|&b| b == b'"').ok_or_else(einval)?;
    if end >= 4096 {
        return Err(einval());
    }
    Ok(Some(String::from_utf8_lossy(&name[..end]).into_owned()))
}

/// The descriptor sector run `desc` with its CID replaced by `cid`, as QEMU's
/// `vmdk_write_cid` edits its buffer: the text after the first "CID=" becomes the new
/// hex number, a newline, and the text from "parentCID" on (bytes past the new end stay).
/// No "parentCID" is EINVAL.
pub fn with_cid(desc: &[u8], cid: u32) -> Result<Vec<u8>> {
    let mut d = desc[..desc.len().min(DESC_SIZE)].to_vec();
    d.resize(DESC_SIZE, 0);
    d[DESC_SIZE - 1] = 0;
    let text = c_text(&d).to_vec();
    let tail = find(&text, b"parentCID")
        .map(|at| text[at..].to_vec())
        .ok_or_else(einval)?;
    if let Some(at) = find(&text, b"CID") {
        let mut new = format!("{cid:x}\n").into_bytes();
        new.extend_from_slice(&tail);
        let at = at + 4;
        let n = new.len().min(DESC_SIZE - 1 - at.min(DESC_SIZE - 1));
        d[at..at + n].copy_from_slice(&new[..n]);
        d[at + n] = 0;
    }
    Ok(d)
}

/// A bare EINVAL, which the opener names the file for.
pub fn einval() -> Error {
    Error::io("", std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// The value of `name="..."` as QEMU's `vmdk_parse_description` reads it (two bytes
/// skipped after the name, up to the next quote), at most `max` bytes.
pub fn quoted_value(text: &[u8], name: &str, max: usize) -> Option<String> {
    let at = find(text, name.as_bytes())? + name.len() + 2;
    if at >= text.len() {
        return None;
    }
    let len = text[at..].iter().position(|&b| b == b'"')?;
    (len < max).then(|| String::from_utf8_lossy(&text[at..at + len]).into_owned())
}

/// One extent line of a descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    pub sectors: u64,
    /// `FLAT`, `SPARSE`, `VMFS`, `VMFSSPARSE` or `SESPARSE`.
    pub kind: String,
    pub file: String,
    /// Start of a flat extent in its file, in sectors.
    pub flat_offset: u64,
}

/// A word of at most `max` non-space bytes (`%Ns`), skipping white space first.
fn word<'a>(s: &mut &'a [u8], max: usize) -> Option<&'a [u8]> {
    let skip = s.iter().take_while(|b| b.is_ascii_whitespace()).count();
    *s = &s[skip..];
    let n = s
        .iter()
        .take(max)
        .take_while(|b| !b.is_ascii_whitespace())
        .count();
    if n == 0 {
        return None;
    }
    let (w, rest) = s.split_at(n);
    *s = rest;
    Some(w)
}

/// A signed decimal (`%ld`), skipping white space first; saturating like strtol.
fn number(s: &mut &[u8]) -> Option<i64> {
    let skip = s.iter().take_while(|b| b.is_ascii_whitespace()).count();
    let mut t = &s[skip..];
    let neg = matches!(t.first(), Some(b'-'));
    if matches!(t.first(), Some(b'-' | b'+')) {
        t = &t[1..];
    }
    let n = t.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 {
        return None;
    }
    let mut v: i64 = 0;
    for &d in &t[..n] {
        v = v
            .checked_mul(10)
            .and_then(|v| v.checked_add(i64::from(d - b'0')))
            .unwrap_or(i64::MAX);
    }
    *s = &t[n..];
    Some(if neg { v.saturating_neg() } else { v })
}

/// A scanned extent line: access, sectors, type, file name, flat offset (-1 if absent).
type Fields = (String, i64, String, String, i64);

/// The fields `sscanf("%10s %ld %10s \"%511[^\n\r\"]\" %ld")` matches on a line, and how
/// many matched.
fn scan_line(line: &[u8]) -> (usize, Option<Fields>) {
    let mut s = line;
    let Some(access) = word(&mut s, 10) else {
        return (0, None);
    };
    let Some(sectors) = number(&mut s) else {
        return (1, None);
    };
    let Some(kind) = word(&mut s, 10) else {
        return (2, None);
    };
    let skip = s.iter().take_while(|b| b.is_ascii_whitespace()).count();
    s = &s[skip..];
    if s.first() != Some(&b'"') {
        return (3, None);
    }
    s = &s[1..];
    let n = s
        .iter()
        .take(511)
        .take_while(|&&b| b != b'\n' && b != b'\r' && b != b'"')
        .count();
    if n == 0 {
        return (3, None);
    }
    let file = String::from_utf8_lossy(&s[..n]).into_owned();
    s = &s[n..];
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut fields = (text(access), sectors, text(kind), file, -1);
    if s.first() != Some(&b'"') {
        return (4, Some(fields));
    }
    s = &s[1..];
    match number(&mut s) {
        Some(off) => {
            fields.4 = off;
            (5, Some(fields))
        }
        None => (4, Some(fields)),
    }
}

/// The extent lines of a descriptor, as QEMU's `vmdk_parse_extents` keeps them: lines that
/// are not `RW` extents of a known type are skipped, a malformed one is an error.
pub fn extents(text: &[u8]) -> Result<Vec<ExtentLine>> {
    let mut out = Vec::new();
    for line in text.split_inclusive(|&b| b == b'\n') {
        let (matches, fields) = scan_line(line);
        let Some((access, sectors, kind, file, flat_offset)) = fields else {
            continue;
        };
        if matches < 4 || access != "RW" {
            continue;
        }
        let valid = match kind.as_str() {
            "FLAT" => matches == 5 && flat_offset >= 0,
            "VMFS" => matches == 4,
            _ => matches == 4,
        };
        if !valid {
            let shown = line.strip_suffix(b"\n").unwrap_or(line);
            return Err(Error::corrupt(format!(
                "Invalid extent line: {}",
                String::from_utf8_lossy(shown)
            )));
        }
        let known = ["FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE"].contains(&kind.as_str());
        if sectors <= 0 || !known {
            continue;
        }
        out.push(ExtentLine {
            sectors: sectors as u64,
            flat_offset: if kind == "VMFS" {
                0
            } else {
                flat_offset.max(0) as u64
            },
            kind,
            file,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cids_as_qemu_finds_them() {
        let d = b"# Disk DescriptorFile\nversion=1\nCID=a1d80f92\nparentCID=ffffffff\n";
        assert_eq!(read_cid(d, false).unwrap(), 0xa1d8_0f92);
        assert_eq!(read_cid(d, true).unwrap(), 0xffff_ffff);
        // The first "CID" in the text wins, even inside parentCID.
        let d = b"parentCID=12\nCID=34\n";
        assert_eq!(read_cid(d, false).unwrap(), 0x12);
        assert!(read_cid(b"version=1\n", false).is_err());
        assert!(read_cid(b"CID=zz", false).is_err());
        assert_eq!(read_cid(b"CID=0x1ffffffff", false).unwrap(), 0xffff_ffff);
    }

    #[test]
    fn cid_rewritten_as_qemu_does() {
        let mut d = b"version=1\nCID=a1d80f92\nparentCID=ffffffff\nx=1\n".to_vec();
        d.resize(DESC_SIZE, 0);
        let n = with_cid(&d, 0x12).unwrap();
        assert_eq!(c_text(&n), b"version=1\nCID=12\nparentCID=ffffffff\nx=1\n");
        // The old text's last bytes stay past the new end, as in QEMU's buffer.
        assert_eq!(n[40], 0);
        assert_eq!(&n[41..46], &d[41..46]);
        assert_ne!(&d[41..46], &[0u8; 5]);
        assert!(with_cid(b"CID=1\n", 2).is_err());
    }

    #[test]
    fn create_type() {
        let t = b"createType=\"monolithicFlat\"\n";
        assert_eq!(
            quoted_value(t, "createType", 128).unwrap(),
            "monolithicFlat"
        );
        assert_eq!(quoted_value(b"createType=\"x", "createType", 128), None);
        assert_eq!(quoted_value(b"nothing", "createType", 128), None);
    }

    #[test]
    fn extent_lines() {
        let t = b"RW 2048 FLAT \"a-flat.vmdk\" 0\nRDONLY 5 FLAT \"b\" 0\n# x\nRW 10 SPARSE \"s.vmdk\"\nRW 7 VMFS \"v\"\nRW 0 FLAT \"z\" 0\n";
        let e = extents(t).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].file, "a-flat.vmdk");
        assert_eq!((e[1].kind.as_str(), e[1].sectors), ("SPARSE", 10));
        assert_eq!(e[2].flat_offset, 0);
        let err = extents(b"RW 10 FLAT \"a\"\n").unwrap_err();
        assert_eq!(err.to_string(), "Invalid extent line: RW 10 FLAT \"a\"");
        assert!(extents(b"RW 10 SPARSE \"a\" 5\n").is_err());
    }

    #[test]
    fn parent_hint_as_qemu_reads_it() {
        let d = b"CID=1\nparentCID=2\nparentFileNameHint=\"../base.vmdk\"\n";
        assert_eq!(parent_hint(d).unwrap().as_deref(), Some("../base.vmdk"));
        assert_eq!(parent_hint(b"CID=1\nparentCID=ffffffff\n").unwrap(), None);
        // No closing quote, or a name too long for QEMU's buffer.
        assert!(parent_hint(b"parentFileNameHint=\"base.vmdk\n").is_err());
        let long = format!("parentFileNameHint=\"{}\"", "a".repeat(4096));
        assert!(parent_hint(long.as_bytes()).is_err());
    }
}
