//! Where a qcow2 file keeps its metadata, and patching it, for the hostile-image tests.
//!
//! - [`Layout::parse`]: header fields, extensions, the L1 table and the L2 tables it (and
//!   every snapshot's L1 table) points at, the refcount table and blocks, the snapshot table;
//!   lenient (a field that points outside the buffer reads as 0), so it also describes a
//!   damaged file;
//! - [`Field`]s name the header fields ([`HEADER_FIELDS`]) and the fields of a snapshot table
//!   entry ([`SNAPSHOT_FIELDS`]) with their offsets and widths;
//! - [`Patch`] changes a file in place: named header fields, big-endian words at offsets the
//!   layout gives (an L1, L2 or refcount table entry), bytes, the length;
//! - [`get_be`], [`put_be`], [`put_refcount`] do the same on a buffer.
//!
//! All on-disk fields are big-endian (qcow2 spec, QEMU `docs/interop/qcow2.rst`).

use std::os::unix::fs::FileExt;
use std::path::Path;

/// L1/L2 entry flag: the cluster's refcount is exactly one (writable in place).
pub const COPIED: u64 = 1 << 63;
/// L2 entry flag: a compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 entry flag (standard clusters): the cluster reads as zeroes.
pub const ZERO: u64 = 1;
/// The host offset bits of an L1 or standard L2 entry.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;

/// Header extension types.
pub const EXT_END: u64 = 0;
pub const EXT_BACKING_FORMAT: u64 = 0xe279_2aca;
pub const EXT_FEATURE_NAMES: u64 = 0x6803_f857;
pub const EXT_BITMAPS: u64 = 0x2385_2875;
pub const EXT_FULL_DISK_ENCRYPTION: u64 = 0x0537_be77;
pub const EXT_DATA_FILE: u64 = 0x4441_5441;
/// Size of one feature name table entry.
pub const FEATURE_NAME_ENTRY: u64 = 48;

/// A big-endian field: its offset (in the header, or in a snapshot table entry), its width in
/// bytes and its name in the spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u64,
    pub width: u64,
    pub name: &'static str,
}

const fn field(offset: u64, width: u64, name: &'static str) -> Field {
    Field {
        offset,
        width,
        name,
    }
}

pub const VERSION: Field = field(4, 4, "version");
pub const BACKING_FILE_OFFSET: Field = field(8, 8, "backing_file_offset");
pub const BACKING_FILE_SIZE: Field = field(16, 4, "backing_file_size");
pub const CLUSTER_BITS: Field = field(20, 4, "cluster_bits");
pub const SIZE: Field = field(24, 8, "size");
pub const CRYPT_METHOD: Field = field(32, 4, "crypt_method");
pub const L1_SIZE: Field = field(36, 4, "l1_size");
pub const L1_TABLE_OFFSET: Field = field(40, 8, "l1_table_offset");
pub const REFCOUNT_TABLE_OFFSET: Field = field(48, 8, "refcount_table_offset");
pub const REFCOUNT_TABLE_CLUSTERS: Field = field(56, 4, "refcount_table_clusters");
pub const NB_SNAPSHOTS: Field = field(60, 4, "nb_snapshots");
pub const SNAPSHOTS_OFFSET: Field = field(64, 8, "snapshots_offset");
/// Version 3 only, from here on.
pub const INCOMPATIBLE_FEATURES: Field = field(72, 8, "incompatible_features");
pub const COMPATIBLE_FEATURES: Field = field(80, 8, "compatible_features");
pub const AUTOCLEAR_FEATURES: Field = field(88, 8, "autoclear_features");
pub const REFCOUNT_ORDER: Field = field(96, 4, "refcount_order");
pub const HEADER_LENGTH: Field = field(100, 4, "header_length");
pub const COMPRESSION_TYPE: Field = field(104, 1, "compression_type");

/// Every header field, in file order.
pub const HEADER_FIELDS: &[Field] = &[
    VERSION,
    BACKING_FILE_OFFSET,
    BACKING_FILE_SIZE,
    CLUSTER_BITS,
    SIZE,
    CRYPT_METHOD,
    L1_SIZE,
    L1_TABLE_OFFSET,
    REFCOUNT_TABLE_OFFSET,
    REFCOUNT_TABLE_CLUSTERS,
    NB_SNAPSHOTS,
    SNAPSHOTS_OFFSET,
    INCOMPATIBLE_FEATURES,
    COMPATIBLE_FEATURES,
    AUTOCLEAR_FEATURES,
    REFCOUNT_ORDER,
    HEADER_LENGTH,
    COMPRESSION_TYPE,
];

/// Fields of a snapshot table entry (offsets within the entry).
pub const SNAPSHOT_L1_TABLE_OFFSET: Field = field(0, 8, "l1_table_offset");
pub const SNAPSHOT_L1_SIZE: Field = field(8, 4, "l1_size");
pub const SNAPSHOT_FIELDS: &[Field] = &[
    SNAPSHOT_L1_TABLE_OFFSET,
    SNAPSHOT_L1_SIZE,
    field(12, 2, "id_len"),
    field(14, 2, "name_len"),
    field(32, 4, "vm_state_size"),
    field(36, 4, "extra_data_size"),
    field(40, 8, "vm_state_size_large"),
    field(48, 8, "disk_size"),
];

/// The big-endian value of `width` bytes (1, 2, 4 or 8) at `at`; 0 past the buffer's end.
pub fn get_be(b: &[u8], at: u64, width: u64) -> u64 {
    let at = at as usize;
    let w = width as usize;
    b.get(at..at + w)
        .map_or(0, |s| s.iter().fold(0u64, |v, &x| (v << 8) | u64::from(x)))
}

/// The big-endian u32 at `at` (0 past the end).
pub fn be32(b: &[u8], at: u64) -> u64 {
    get_be(b, at, 4)
}

/// The big-endian u64 at `at` (0 past the end).
pub fn be64(b: &[u8], at: u64) -> u64 {
    get_be(b, at, 8)
}

/// Store `v` big-endian in `width` bytes at `at`, if it fits in the buffer.
pub fn put_be(b: &mut [u8], at: u64, width: u64, v: u64) -> bool {
    let at = at as usize;
    let w = width as usize;
    if at + w > b.len() {
        return false;
    }
    b[at..at + w].copy_from_slice(&v.to_be_bytes()[8 - w..]);
    true
}

/// Set the refcount of cluster `idx` in the refcount block at `block` (refcount order
/// `order`: 1 << order bits per refcount) to `v`, if it is inside the buffer.
pub fn put_refcount(b: &mut [u8], block: u64, order: u64, idx: u64, v: u64) {
    let bits = 1u64 << order;
    if bits >= 8 {
        put_be(b, block + idx * bits / 8, bits / 8, v);
    } else {
        let at = (block + idx * bits / 8) as usize;
        let shift = (idx * bits) % 8;
        let m = (((1u16 << bits) - 1) as u8) << shift;
        if let Some(x) = b.get_mut(at) {
            *x = (*x & !m) | (((v as u8) << shift) & m);
        }
    }
}

/// `v` rounded up to a multiple of `to`.
pub fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// Where the metadata of a qcow2 file lives. Tables are (offset, length in bytes).
#[derive(Clone, Debug, Default)]
pub struct Layout {
    pub cluster_bits: u32,
    pub cluster_size: u64,
    pub version: u64,
    pub extended_l2: bool,
    pub refcount_order: u64,
    pub file_len: u64,
    pub header_len: u64,
    /// Offsets of the extension headers (type, length), the end-of-extensions one included.
    pub ext_headers: Vec<u64>,
    /// Where the extensions end.
    pub ext_end: u64,
    /// The feature name table: offset of its first entry, number of entries.
    pub feature_names: Option<(u64, u64)>,
    /// The backing file name: offset, length.
    pub backing: Option<(u64, u64)>,
    pub l1: (u64, u64),
    /// Every L2 table the active L1 table and the snapshots' L1 tables point at.
    pub l2s: Vec<u64>,
    /// The refcount table.
    pub rt: (u64, u64),
    /// Every refcount block the refcount table points at.
    pub rbs: Vec<u64>,
    pub snap_table: Option<(u64, u64)>,
    /// Offset of each snapshot table entry.
    pub snap_entries: Vec<u64>,
    /// Each snapshot's L1 table.
    pub snap_l1s: Vec<(u64, u64)>,
}

impl Layout {
    /// The layout of the qcow2 file at `path`.
    pub fn of(path: &Path) -> Layout {
        Layout::parse(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    /// The layout of the qcow2 file whose bytes are `b`.
    pub fn parse(b: &[u8]) -> Layout {
        let cluster_bits = be32(b, CLUSTER_BITS.offset) as u32;
        let cs = 1u64 << cluster_bits;
        let version = be32(b, VERSION.offset);
        let mut l = Layout {
            cluster_bits,
            cluster_size: cs,
            version,
            file_len: b.len() as u64,
            ..Default::default()
        };
        if version >= 3 {
            l.extended_l2 = be64(b, INCOMPATIBLE_FEATURES.offset) & INCOMPAT_EXTENDED_L2 != 0;
            l.refcount_order = be32(b, REFCOUNT_ORDER.offset);
            l.header_len = be32(b, HEADER_LENGTH.offset);
        } else {
            l.refcount_order = 4;
            l.header_len = INCOMPATIBLE_FEATURES.offset;
        }
        let mut at = l.header_len;
        for _ in 0..64 {
            if at + 8 > cs {
                break;
            }
            l.ext_headers.push(at);
            let kind = be32(b, at);
            let len = be32(b, at + 4);
            at += 8;
            if kind == EXT_END {
                break;
            }
            if kind == EXT_FEATURE_NAMES {
                l.feature_names = Some((at, len / FEATURE_NAME_ENTRY));
            }
            at += round_up(len, 8);
        }
        l.ext_end = at;
        let bo = be64(b, BACKING_FILE_OFFSET.offset);
        if bo != 0 {
            l.backing = Some((bo, be32(b, BACKING_FILE_SIZE.offset)));
        }
        let l1_off = be64(b, L1_TABLE_OFFSET.offset);
        let l1_size = be32(b, L1_SIZE.offset);
        l.l1 = (l1_off, l1_size * 8);
        l.rt = (
            be64(b, REFCOUNT_TABLE_OFFSET.offset),
            be32(b, REFCOUNT_TABLE_CLUSTERS.offset) * cs,
        );
        let mut l2s = Vec::new();
        let add_l1 = |off: u64, bytes: u64, l2s: &mut Vec<u64>| {
            for i in 0..bytes / 8 {
                let e = be64(b, off + 8 * i) & OFFSET_MASK;
                if e != 0 && !l2s.contains(&e) {
                    l2s.push(e);
                }
            }
        };
        add_l1(l1_off, l1_size * 8, &mut l2s);
        for i in 0..l.rt.1 / 8 {
            let e = be64(b, l.rt.0 + 8 * i) & !0x1ff;
            if e != 0 {
                l.rbs.push(e);
            }
        }
        let nb = be32(b, NB_SNAPSHOTS.offset);
        if nb > 0 {
            let start = be64(b, SNAPSHOTS_OFFSET.offset);
            let mut at = start;
            for _ in 0..nb {
                l.snap_entries.push(at);
                let sl1 = be64(b, at + SNAPSHOT_L1_TABLE_OFFSET.offset);
                let sl1_size = be32(b, at + SNAPSHOT_L1_SIZE.offset);
                l.snap_l1s.push((sl1, sl1_size * 8));
                add_l1(sl1, sl1_size * 8, &mut l2s);
                let var = get_be(b, at + 12, 2) + get_be(b, at + 14, 2) + be32(b, at + 36);
                at = round_up(at + 40 + var, 8);
            }
            l.snap_table = Some((start, at - start));
        }
        l.l2s = l2s;
        l
    }

    /// File offset of entry `entry` of the `l2_index`-th L2 table (in [`Layout::l2s`]
    /// order): 8 bytes per entry, 16 (entry, subcluster bitmap) with extended L2.
    pub fn l2_entry(&self, l2_index: usize, entry: u64) -> u64 {
        self.l2s[l2_index] + entry * if self.extended_l2 { 16 } else { 8 }
    }

    /// File offset of `f` in snapshot table entry `snapshot`.
    pub fn snapshot_field(&self, snapshot: usize, f: Field) -> u64 {
        self.snap_entries[snapshot] + f.offset
    }

    /// Metadata offsets a hostile pointer may aim at, with names for the mutation log.
    pub fn targets(&self) -> Vec<(u64, String)> {
        let cs = self.cluster_size;
        let mut v = vec![
            (0, "header".to_string()),
            (cs, "cluster 1".to_string()),
            (self.l1.0, "L1".to_string()),
            (self.rt.0, "reftable".to_string()),
            (round_up(self.file_len, cs), "EOF (aligned)".to_string()),
        ];
        v.extend(
            self.rbs
                .iter()
                .take(2)
                .map(|&o| (o, "refblock".to_string())),
        );
        v.extend(self.l2s.iter().take(3).map(|&o| (o, "L2".to_string())));
        if let Some((o, _)) = self.snap_table {
            v.push((o, "snapshot table".to_string()));
        }
        v.extend(
            self.snap_l1s
                .iter()
                .take(2)
                .map(|&(o, _)| (o, "snapshot L1".to_string())),
        );
        v
    }

    /// Host clusters holding metadata (header, tables): (offset, length, what).
    pub fn metadata_ranges(&self) -> Vec<(u64, u64, String)> {
        let cs = self.cluster_size;
        // Whole clusters: a table owns the clusters it starts in, to their end.
        let cl = |bytes: u64| round_up(bytes.max(1), cs);
        let mut v = vec![(0, cs, "header cluster".to_string())];
        v.push((self.l1.0, cl(self.l1.1), "L1 table".into()));
        v.push((self.rt.0, self.rt.1, "refcount table".into()));
        for &o in &self.rbs {
            v.push((o, cs, format!("refcount block {o:#x}")));
        }
        for &o in &self.l2s {
            v.push((o, cs, format!("L2 table {o:#x}")));
        }
        if let Some((o, n)) = self.snap_table {
            v.push((o, cl(n), "snapshot table".into()));
        }
        for &(o, n) in &self.snap_l1s {
            v.push((o, cl(n), format!("snapshot L1 table {o:#x}")));
        }
        v
    }
}

/// A qcow2 file changed in place.
pub struct Patch<'a>(pub &'a Path);

impl Patch<'_> {
    fn file(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.0)
            .unwrap_or_else(|e| panic!("{}: {e}", self.0.display()))
    }

    /// The layout of the file as it is now.
    pub fn layout(&self) -> Layout {
        Layout::of(self.0)
    }

    /// Set the header field `f` to `v` (which must fit in the field).
    pub fn set(&self, f: Field, v: u64) {
        assert!(
            f.width == 8 || v < 1 << (8 * f.width),
            "{v:#x} does not fit in {}",
            f.name
        );
        self.put_bytes(f.offset, &v.to_be_bytes()[8 - f.width as usize..]);
    }

    /// The value of the header field `f`.
    pub fn get(&self, f: Field) -> u64 {
        let mut b = vec![0u8; f.width as usize];
        self.file()
            .read_exact_at(&mut b, f.offset)
            .unwrap_or_else(|e| panic!("{}: reading {}: {e}", self.0.display(), f.name));
        get_be(&b, 0, f.width)
    }

    /// Set incompatible feature bits (in addition to those set).
    pub fn set_incompatible(&self, bits: u64) {
        self.set(
            INCOMPATIBLE_FEATURES,
            self.get(INCOMPATIBLE_FEATURES) | bits,
        );
    }

    pub fn put_u64(&self, off: u64, v: u64) {
        self.put_bytes(off, &v.to_be_bytes());
    }

    pub fn put_u32(&self, off: u64, v: u32) {
        self.put_bytes(off, &v.to_be_bytes());
    }

    pub fn put_bytes(&self, off: u64, b: &[u8]) {
        self.file()
            .write_all_at(b, off)
            .unwrap_or_else(|e| panic!("{}: writing at {off:#x}: {e}", self.0.display()));
    }

    pub fn truncate(&self, len: u64) {
        self.file().set_len(len).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_endian_fields_and_refcounts() {
        let mut b = vec![0u8; 16];
        assert!(put_be(&mut b, 2, 4, 0x1234_5678));
        assert_eq!(get_be(&b, 2, 4), 0x1234_5678);
        assert_eq!(get_be(&b, 2, 2), 0x1234);
        assert_eq!(be32(&b, 14), 0, "past the end reads 0");
        assert!(!put_be(&mut b, 12, 8, 1), "past the end is not stored");
        // 1-bit refcounts: cluster 9 is bit 1 of byte 1.
        let mut rb = vec![0u8; 4];
        put_refcount(&mut rb, 0, 0, 9, 1);
        assert_eq!(rb, [0, 2, 0, 0]);
        // 16-bit refcounts: cluster 1 is bytes 2..4.
        put_refcount(&mut rb, 0, 4, 1, 0xabcd);
        assert_eq!(rb, [0, 2, 0xab, 0xcd]);
    }

    /// A minimal v3 header with one L1 entry, one refcount block, a feature name table.
    #[test]
    fn parse_finds_the_tables() {
        let cs = 512u64;
        let mut b = vec![0u8; 6 * cs as usize];
        put_be(&mut b, 0, 4, 0x5146_49fb);
        put_be(&mut b, VERSION.offset, 4, 3);
        put_be(&mut b, CLUSTER_BITS.offset, 4, 9);
        put_be(&mut b, L1_SIZE.offset, 4, 2);
        put_be(&mut b, L1_TABLE_OFFSET.offset, 8, 3 * cs);
        put_be(&mut b, REFCOUNT_TABLE_OFFSET.offset, 8, cs);
        put_be(&mut b, REFCOUNT_TABLE_CLUSTERS.offset, 4, 1);
        put_be(
            &mut b,
            INCOMPATIBLE_FEATURES.offset,
            8,
            INCOMPAT_EXTENDED_L2,
        );
        put_be(&mut b, REFCOUNT_ORDER.offset, 4, 4);
        put_be(&mut b, HEADER_LENGTH.offset, 4, 112);
        put_be(&mut b, 112, 4, EXT_FEATURE_NAMES);
        put_be(&mut b, 116, 4, 2 * FEATURE_NAME_ENTRY);
        put_be(&mut b, cs, 8, 2 * cs);
        put_be(&mut b, 3 * cs + 8, 8, (4 * cs) | COPIED);
        let l = Layout::parse(&b);
        assert_eq!((l.cluster_size, l.version, l.extended_l2), (512, 3, true));
        assert_eq!(l.feature_names, Some((120, 2)));
        assert_eq!(l.ext_headers, [112, 120 + 96]);
        assert_eq!((l.l1, l.rt), ((3 * cs, 16), (cs, cs)));
        assert_eq!((l.l2s.clone(), l.rbs.clone()), (vec![4 * cs], vec![2 * cs]));
        assert_eq!(l.l2_entry(0, 3), 4 * cs + 48);
        assert!(l.snap_table.is_none() && l.backing.is_none());
    }

    #[test]
    fn patch_named_fields() {
        let dir = crate::tempdir();
        let p = dir.path().join("h");
        std::fs::write(&p, vec![0u8; 200]).unwrap();
        let f = Patch(&p);
        f.set(HEADER_LENGTH, 0xffff_ffff);
        f.set(SIZE, 1 << 40);
        f.set_incompatible(INCOMPAT_DIRTY);
        f.set_incompatible(INCOMPAT_CORRUPT);
        let b = std::fs::read(&p).unwrap();
        assert_eq!(be32(&b, 100), 0xffff_ffff);
        assert_eq!(be64(&b, 24), 1 << 40);
        assert_eq!(f.get(INCOMPATIBLE_FEATURES), 3);
        f.truncate(50);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 50);
    }
}
