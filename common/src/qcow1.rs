//! The qcow format, version 1, read only: a big-endian header, an L1 table and L2 tables
//! of 64-bit cluster offsets (bit 63 marks a cluster stored deflated, its compressed length
//! in the bits below), and a backing file name. QEMU's open checks, in its words; the
//! virtual size is the header's rounded down to whole sectors, as QEMU counts it.

use crate::backing::BackingRef;
use crate::block_map::{read_entries, StoredTable};
use crate::error::{io_err, Error, Result, Structure};
use crate::format::Format;
use crate::readonly::{GuestMap, Mapped, Opened};
use crate::storage::Storage;

/// qcow's magic (qcow2's too: the version tells them apart).
const MAGIC: [u8; 4] = *b"QFI\xfb";
const HEADER_LEN: usize = 48;
/// Bit 63 of an L2 entry: the cluster is compressed.
const COMPRESSED: u64 = 1 << 63;
/// The longest backing file name QEMU reads.
const MAX_BACKING_NAME: u32 = 1023;
/// QEMU's largest request (`BDRV_REQUEST_MAX_BYTES`).
const MAX_REQUEST: u64 = i32::MAX as u64 & !511;
/// At most this many L2 entries are read for one lookup.
const MAX_ENTRIES_PER_LOOKUP: u64 = 8192;

/// Whether the first bytes of a file are a qcow version 1 header (QEMU's `qcow_probe`).
pub fn probe(first: &[u8]) -> bool {
    first.len() >= HEADER_LEN && first[..4] == MAGIC && be32(first, 4) == 1
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The geometry of an open qcow image.
struct QcowMap {
    cluster_bits: u32,
    l2_bits: u32,
    l1: StoredTable,
}

/// Why an AES-encrypted image's data cannot be read (img takes no keys).
pub const ENCRYPTED: &str = "AES-encrypted qcow images are not supported by img";

/// Open the qcow image on `storage`. An AES-encrypted one opens only for its metadata
/// (`metadata_only`, as QEMU opens it without a key for `info`); its data is unreadable.
pub fn open(storage: &dyn Storage, metadata_only: bool) -> Result<Opened> {
    let mut h = [0u8; HEADER_LEN];
    storage
        .read_at(&mut h, 0)
        .map_err(io_err("Could not read the qcow header"))?;
    if h[..4] != MAGIC {
        return Err(Error::invalid("Image not in qcow format"));
    }
    let version = be32(&h, 4);
    if version != 1 {
        return Err(Error::Unsupported(format!(
            "qcow (v1) does not support qcow version {version}"
        )));
    }
    let backing_at = be64(&h, 8);
    let backing_len = be32(&h, 16);
    let size = be64(&h, 24);
    let (cluster_bits, l2_bits) = (u32::from(h[32]), u32::from(h[33]));
    let crypt = be32(&h, 36);
    let l1_at = be64(&h, 40);
    if size <= 1 {
        return Err(Error::invalid(
            "Image size is too small (must be at least 2 bytes)",
        ));
    }
    if !(9..=16).contains(&cluster_bits) {
        return Err(Error::invalid("Cluster size must be between 512 and 64k"));
    }
    // A number of entries of 8 bytes each.
    if !(6..=13).contains(&l2_bits) {
        return Err(Error::invalid("L2 table size must be between 512 and 64k"));
    }
    let encrypted = match crypt {
        0 => false,
        1 if metadata_only => true,
        1 => return Err(Error::Unsupported(ENCRYPTED.into())),
        _ => return Err(Error::invalid("invalid encryption method in qcow header")),
    };
    let shift = cluster_bits + l2_bits;
    let too_large = || Error::invalid("Image too large");
    if size > u64::MAX - (1 << shift) {
        return Err(too_large());
    }
    let l1_size = size.div_ceil(1 << shift);
    if l1_size > i32::MAX as u64 / 8 {
        return Err(too_large());
    }
    // QEMU reads the table in one request, which its block layer fails (EIO, no words)
    // past its largest request or its largest offset.
    let l1_bytes = l1_size * 8;
    if l1_bytes > MAX_REQUEST
        || l1_at
            .checked_add(l1_bytes)
            .is_none_or(|e| e > i64::MAX as u64)
    {
        return Err(Error::io("", std::io::Error::from_raw_os_error(libc::EIO)));
    }
    let l1 = StoredTable::read(storage, l1_at, l1_size, 8, true)
        .map_err(|e| e.located(Structure::L1Table, l1_at))?;
    let mut backing = None;
    if backing_at != 0 {
        if backing_len > MAX_BACKING_NAME {
            return Err(Error::invalid("Backing file name too long"));
        }
        let mut name = vec![0u8; backing_len as usize];
        storage
            .read_at(&mut name, backing_at)
            .map_err(io_err("Could not read the backing file name"))?;
        // QEMU keeps it as a C string.
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        backing = Some(BackingRef {
            name: String::from_utf8_lossy(&name[..end]).into_owned(),
            format: None,
        });
    }
    Ok(Opened {
        format: Format::Qcow,
        size: size / 512 * 512,
        map: Box::new(QcowMap {
            cluster_bits,
            l2_bits,
            l1,
        }),
        backing,
        encrypted,
    })
}

impl GuestMap for QcowMap {
    fn lookup(&self, storage: &dyn Storage, pos: u64, len: u64) -> Result<(Mapped, u64)> {
        let cs = 1u64 << self.cluster_bits;
        let cover = cs << self.l2_bits;
        let l2 = self.l1.get(pos / cover);
        if l2 == 0 {
            // One run over every L2 table that is not there (a hostile L1 may be huge).
            let tables = (pos % cover + len).div_ceil(cover);
            let run = self.l1.zero_run(pos / cover, tables) * cover - pos % cover;
            return Ok((Mapped::Unallocated, len.min(run)));
        }
        let len = len.min(cover - pos % cover);
        let in_cluster = pos % cs;
        let index = pos % cover / cs;
        let n = (in_cluster + len).div_ceil(cs).min(MAX_ENTRIES_PER_LOOKUP);
        let at = l2.checked_add(index * 8).ok_or_else(|| {
            Error::corrupt_at(Structure::L1Table, 0, "qcow L2 table offset overflows")
        })?;
        let e =
            read_entries(storage, at, n, 8, true).map_err(|e| e.located(Structure::L2Table, l2))?;
        let first = e[0];
        if first & COMPRESSED != 0 {
            let mask = (1u64 << (63 - self.cluster_bits)) - 1;
            let stored = (first >> (63 - self.cluster_bits)) & (cs - 1);
            let c = Mapped::Compressed {
                at: first & mask,
                len: stored,
            };
            return Ok((c, (cs - in_cluster).min(len)));
        }
        // A run of unallocated clusters, or of contiguous plain ones.
        let same = |k: usize| match first {
            0 => e[k] == 0,
            _ => first.checked_add(k as u64 * cs) == Some(e[k]),
        };
        let run = (1..e.len()).take_while(|&k| same(k)).count() as u64 + 1;
        let n = len.min(run * cs - in_cluster);
        Ok(match first {
            0 => (Mapped::Unallocated, n),
            h => match h.checked_add(in_cluster) {
                Some(h) => (Mapped::Data(h), n),
                None => {
                    return Err(Error::corrupt_at(
                        Structure::L2Table,
                        at,
                        format!("qcow cluster offset 0x{h:x} is invalid"),
                    ))
                }
            },
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, size: u64, cluster_bits: u8, l2_bits: u8, crypt: u32) -> Vec<u8> {
        let mut h = vec![0u8; 4096];
        h[..4].copy_from_slice(&MAGIC);
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[24..32].copy_from_slice(&size.to_be_bytes());
        h[32] = cluster_bits;
        h[33] = l2_bits;
        h[36..40].copy_from_slice(&crypt.to_be_bytes());
        h[40..48].copy_from_slice(&48u64.to_be_bytes());
        h
    }

    fn open_bytes(b: &[u8]) -> Result<Opened> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.qcow");
        std::fs::write(&p, b).unwrap();
        open(
            &crate::storage::FileStorage::new(std::fs::File::open(&p).unwrap()),
            false,
        )
    }

    /// AES-encrypted: refused, unless opened for its metadata only (`info`).
    #[test]
    fn an_encrypted_image_opens_for_its_metadata_only() {
        let b = header(1, 1 << 20, 12, 9, 1);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.qcow");
        std::fs::write(&p, &b).unwrap();
        let storage = || crate::storage::FileStorage::new(std::fs::File::open(&p).unwrap());
        let e = open(&storage(), false).err().expect("must not open");
        assert_eq!(e.to_string(), ENCRYPTED);
        let o = open(&storage(), true).unwrap();
        assert!(o.encrypted);
        assert_eq!(o.size, 1 << 20);
        // Its data cannot be read.
        let image = crate::readonly::ReadOnlyImage::new(Box::new(storage()), o, true, false);
        let mut buf = [0u8; 512];
        let e = crate::BlockDriver::read_at(&image.unwrap(), &mut buf, 0).unwrap_err();
        assert_eq!(e.to_string(), ENCRYPTED);
    }

    #[test]
    fn open_errors_in_qemus_words() {
        let err = |b: Vec<u8>| open_bytes(&b).err().expect("must not open").to_string();
        assert_eq!(
            err(header(2, 1 << 20, 12, 9, 0)),
            "qcow (v1) does not support qcow version 2"
        );
        assert_eq!(
            err(header(1, 1, 12, 9, 0)),
            "Image size is too small (must be at least 2 bytes)"
        );
        assert_eq!(
            err(header(1, 1 << 20, 17, 9, 0)),
            "Cluster size must be between 512 and 64k"
        );
        assert_eq!(
            err(header(1, 1 << 20, 12, 5, 0)),
            "L2 table size must be between 512 and 64k"
        );
        assert_eq!(
            err(header(1, 1 << 20, 12, 9, 2)),
            "invalid encryption method in qcow header"
        );
        assert_eq!(err(header(1, u64::MAX - 10, 12, 9, 0)), "Image too large");
        // An L1 table of 2^28 - 1 entries: allowed, and only the part in the file is held.
        // An L1 table of 2^28 - 64 entries: allowed, and only the part in the file is held;
        // one more fails as QEMU's one request for it does.
        let most = ((1u64 << 28) - 64) << 15;
        assert_eq!(open_bytes(&header(1, most, 9, 6, 0)).unwrap().size, most);
        assert!(err(header(1, most + 1, 9, 6, 0)).contains("Input/output error"));
        let mut b = header(1, 1 << 20, 12, 9, 0);
        b[40..48].copy_from_slice(&(u64::MAX - 7).to_be_bytes());
        assert!(err(b).contains("Input/output error"));
        assert_eq!(err(header(1, 1 << 62, 9, 6, 0)), "Image too large");
        let mut b = header(1, 1 << 20, 12, 9, 0);
        b[8..16].copy_from_slice(&100u64.to_be_bytes());
        b[16..20].copy_from_slice(&1024u32.to_be_bytes());
        assert_eq!(err(b.clone()), "Backing file name too long");
        b[16..20].copy_from_slice(&3u32.to_be_bytes());
        b[100..103].copy_from_slice(b"a\0b");
        assert_eq!(open_bytes(&b).unwrap().backing.unwrap().name, "a");
    }

    #[test]
    fn odd_sizes_round_down_to_sectors() {
        assert_eq!(open_bytes(&header(1, 1000, 12, 9, 0)).unwrap().size, 512);
        assert!(probe(&header(1, 1000, 12, 9, 0)));
        assert!(!probe(&header(2, 1000, 12, 9, 0)));
    }
}
