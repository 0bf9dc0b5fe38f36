//! Format probing: which format the first bytes of a file are, for every format the engine
//! knows. The formats and the chain opener use this; no format probes for another.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::Format;

/// How much of the start of a file probing looks at (QEMU's `BLOCK_PROBE_BUF_SIZE`).
pub const PROBE_LEN: usize = 512;

/// qcow2's magic, `QFI\xfb`.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// A dynamic VHD's footer copy starts with this (a fixed VHD has its footer only at the end
/// of the file, so it probes as raw, as in QEMU).
pub const VPC_COOKIE: [u8; 8] = *b"conectix";

/// The format the first bytes of a file (up to [`PROBE_LEN`]) show: qcow2 for its magic
/// and a version of at least 2 (QEMU's `qcow2_probe`), vpc for the footer cookie
/// (`vpc_probe`), vdi for a whole header with its signature (`vdi_probe`), vhdx for its
/// file identifier (`vhdx_probe`), vmdk, qed for a whole header with its magic
/// (`bdrv_qed_probe`), qcow for its magic and version 1 (`qcow_probe`), parallels for
/// either magic and version 2 (`parallels_probe`), else raw. The magics exclude each
/// other, so QEMU's scores need no order.
pub fn probe_bytes(first: &[u8]) -> Format {
    let qcow2 = first.len() >= 8
        && first[..4] == QCOW2_MAGIC
        && u32::from_be_bytes([first[4], first[5], first[6], first[7]]) >= 2;
    if qcow2 {
        Format::Qcow2
    } else if first.len() >= 8 && first[..8] == VPC_COOKIE {
        Format::Vpc
    } else if crate::vdi::header::probe(first) {
        Format::Vdi
    } else if vmdk_probe(first) {
        Format::Vmdk
    } else if first.len() >= 8 && first[..8] == *crate::vhdx::header::FILE_SIGNATURE {
        Format::Vhdx
    } else if crate::qed::probe(first) {
        Format::Qed
    } else if crate::qcow1::probe(first) {
        Format::Qcow
    } else if crate::parallels::probe(first) {
        Format::Parallels
    } else {
        Format::Raw
    }
}

/// QEMU's `vmdk_probe`: a sparse extent's magic (`KDMV`, `COWD`), or a descriptor whose
/// first line that is neither a comment nor blank is `version=1`, `2` or `3`.
fn vmdk_probe(first: &[u8]) -> bool {
    if first.len() < 4 {
        return false;
    }
    if first[..4] == *b"KDMV" || first[..4] == *b"COWD" {
        return true;
    }
    let mut p = first;
    while let Some(&c) = p.first() {
        match c {
            b'#' => {
                let n = p
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(p.len(), |i| i + 1);
                p = &p[n..];
            }
            b' ' => {
                let mut i = p.iter().take_while(|&&b| b == b' ').count();
                if p.get(i) == Some(&b'\r') {
                    i += 1;
                }
                if p.get(i) != Some(&b'\n') {
                    return false;
                }
                p = &p[i + 1..];
            }
            _ => {
                return [b"1", b"2", b"3"].iter().any(|v| {
                    let line = [b"version=".as_slice(), v.as_slice()].concat();
                    p.starts_with(&[line.as_slice(), b"\n"].concat())
                        || p.starts_with(&[line.as_slice(), b"\r\n"].concat())
                });
            }
        }
    }
    false
}

/// Probe the format of the file at `path` (opened read-only, without blocking on a FIFO).
pub fn probe_file(path: &Path) -> Result<Format> {
    let storage = crate::storage::FileStorage::new(crate::storage::open_image_file(path, true)?);
    probe_storage(&storage)
        .map_err(|e| Error::io(format!("Could not read '{}'", path.display()), e))
}

/// Probe the format of an opened file from its first bytes.
pub fn probe_storage(storage: &dyn crate::storage::Storage) -> std::io::Result<Format> {
    let mut first = vec![0u8; (PROBE_LEN as u64).min(storage.len()?) as usize];
    storage.read_at(&mut first, 0)?;
    Ok(probe_bytes(&first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qcow2_needs_magic_and_version() {
        let mut h = [0u8; 16];
        assert_eq!(probe_bytes(&h), Format::Raw);
        h[..4].copy_from_slice(&QCOW2_MAGIC);
        assert_eq!(probe_bytes(&h), Format::Raw, "version 0");
        h[7] = 2;
        assert_eq!(probe_bytes(&h), Format::Qcow2);
        assert_eq!(probe_bytes(&h[..7]), Format::Raw, "too short");
    }

    #[test]
    fn vpc_needs_its_cookie_at_the_start() {
        let mut h = [0u8; 512];
        h[..8].copy_from_slice(&VPC_COOKIE);
        assert_eq!(probe_bytes(&h), Format::Vpc);
        assert_eq!(probe_bytes(&h[..7]), Format::Raw, "too short");
        h[0] = b'C';
        assert_eq!(probe_bytes(&h), Format::Raw);
    }

    #[test]
    fn vmdk_magic_or_descriptor_version() {
        assert_eq!(probe_bytes(b"KDMV\x01"), Format::Vmdk);
        assert_eq!(
            probe_bytes(b"# Disk DescriptorFile\n  \r\nversion=1\nCID=1"),
            Format::Vmdk
        );
        assert_eq!(probe_bytes(b"#x\nversion=3\r\n"), Format::Vmdk);
        assert_eq!(probe_bytes(b"#x\nversion=4\n"), Format::Raw);
        assert_eq!(probe_bytes(b"  x\nversion=1\n"), Format::Raw);
        assert_eq!(probe_bytes(b"version=1"), Format::Raw, "no newline");
    }

    #[test]
    fn vhdx_needs_its_file_identifier() {
        assert_eq!(probe_bytes(b"vhdxfile\0\0"), Format::Vhdx);
        assert_eq!(probe_bytes(b"vhdxfil"), Format::Raw, "too short");
        assert_eq!(probe_bytes(b"vhdxFile"), Format::Raw);
    }

    #[test]
    fn qed_needs_a_whole_header_with_its_magic() {
        let mut h = [0u8; 64];
        h[..4].copy_from_slice(b"QED\0");
        assert_eq!(probe_bytes(&h), Format::Qed);
        assert_eq!(probe_bytes(&h[..63]), Format::Raw, "too short");
        h[3] = 1;
        assert_eq!(probe_bytes(&h), Format::Raw);
    }

    #[test]
    fn qcow_version_1_and_parallels() {
        let mut h = [0u8; 64];
        h[..4].copy_from_slice(&QCOW2_MAGIC);
        h[7] = 1;
        assert_eq!(probe_bytes(&h), Format::Qcow);
        assert_eq!(probe_bytes(&h[..47]), Format::Raw, "too short");
        h[..16].copy_from_slice(b"WithouFreSpacExt");
        h[16..20].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(probe_bytes(&h), Format::Parallels);
        h[..16].copy_from_slice(b"WithoutFreeSpace");
        assert_eq!(probe_bytes(&h), Format::Parallels);
        h[16] = 1;
        assert_eq!(probe_bytes(&h), Format::Raw, "version 1");
    }

    #[test]
    fn vdi_needs_a_whole_header_with_its_signature() {
        let mut h = [0u8; 512];
        h[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
        assert_eq!(probe_bytes(&h), Format::Vdi);
        assert_eq!(probe_bytes(&h[..511]), Format::Raw, "too short");
        h[0x40] = 0;
        assert_eq!(probe_bytes(&h), Format::Raw);
    }
}
