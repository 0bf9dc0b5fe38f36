//! The qcow2 header and its extensions: a validating parse and an encode that round-trips.

use crate::error::{Error, Result, Structure};

/// `QFI\xfb`.
pub const MAGIC: u32 = u32::from_be_bytes(crate::probe::QCOW2_MAGIC);
/// Smallest and largest cluster_bits QEMU accepts.
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Length of the version 2 header and of the version 3 header without compression type.
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Header length QEMU writes for version 3 (with the compression type byte, padded).
pub const V3_HEADER_LEN: u32 = 112;
/// Largest active L1 table QEMU opens (32 MiB of entries).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU opens (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest number of internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature bits.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature bits.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension types.
pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_CRYPTO: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionType {
    #[default]
    Zlib,
    Zstd,
}

impl CompressionType {
    /// The name qemu-img uses (`zlib`, `zstd`).
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// Which kind of feature a feature-name table entry names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    Incompatible,
    Compatible,
    Autoclear,
}

/// One entry of the feature-name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    pub kind: FeatureKind,
    pub bit: u8,
    pub name: String,
}

/// A header extension this engine does not interpret, kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawExtension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// The parsed qcow2 header with its extensions and backing file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    /// Backing file name as stored in the image (not resolved).
    pub backing_file: Option<String>,
    /// Backing format from the backing-format extension.
    pub backing_format: Option<String>,
    /// External data file name from its extension (guest data lives there).
    pub data_file: Option<String>,
    /// Feature-name table, when present.
    pub feature_names: Vec<FeatureName>,
    /// Extensions kept verbatim (bitmaps and any unknown ones).
    pub other_extensions: Vec<RawExtension>,
}

/// Big-endian u32 at `at` (the caller checked the bounds).
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
/// Big-endian u64 at `at` (the caller checked the bounds).
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether L2 entries are 128 bits wide with subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Whether guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & INCOMPAT_DATA_FILE != 0
    }

    /// Whether the external data file is a valid raw image by itself.
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    /// Whether lazy refcounts are enabled.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Whether the image was not closed cleanly with lazy refcounts.
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }

    /// Whether the image has been marked corrupt.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }

    /// The compat string qemu-img prints (`0.10` or `1.1`).
    pub fn compat_name(&self) -> &'static str {
        if self.version == 2 {
            "0.10"
        } else {
            "1.1"
        }
    }

    /// Parse and validate the header from the start of the file.
    ///
    /// `first_cluster` holds the first cluster of the file, zero-filled past the end of a
    /// shorter file as QEMU reads it; call [`Header::cluster_bits_of`] first to learn how
    /// much to read. Tables are checked for alignment and size, not against the file's end:
    /// like QEMU, a table past the end reads as zeroes.
    pub fn parse(first_cluster: &[u8]) -> Result<Header> {
        let b = first_cluster;
        if b.len() < V2_HEADER_LEN as usize {
            return Err(Error::corrupt_at(
                Structure::Header,
                0,
                "Image is not in qcow2 format (header truncated)",
            ));
        }
        if be32(b, 0) != MAGIC {
            return Err(Error::corrupt_at(
                Structure::Header,
                0,
                "Image is not in qcow2 format",
            ));
        }
        let version = be32(b, 4);
        if version != 2 && version != 3 {
            return Err(Error::Unsupported(format!(
                "Unsupported qcow2 version {version}"
            )));
        }
        let cluster_bits = be32(b, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::corrupt_at(
                Structure::Header,
                0,
                format!("Unsupported cluster size: 2^{cluster_bits}"),
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            cluster_bits,
            size: be64(b, 24),
            crypt_method: be32(b, 32),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            other_extensions: Vec::new(),
        };
        if version == 3 {
            if b.len() < V3_MIN_HEADER_LEN as usize {
                return Err(Error::corrupt_at(
                    Structure::Header,
                    0,
                    "qcow2 header truncated",
                ));
            }
            h.incompatible_features = be64(b, 72);
            h.compatible_features = be64(b, 80);
            h.autoclear_features = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            if h.header_length < V3_MIN_HEADER_LEN {
                return Err(Error::corrupt_at(
                    Structure::Header,
                    0,
                    "qcow2 header too short",
                ));
            }
            if u64::from(h.header_length) > cluster_size || h.header_length as usize > b.len() {
                return Err(Error::corrupt_at(
                    Structure::Header,
                    0,
                    "qcow2 header exceeds cluster size",
                ));
            }
            if h.header_length > V3_MIN_HEADER_LEN {
                h.compression_type = match b[104] {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    n => {
                        return Err(Error::Unsupported(format!(
                            "Unknown compression type value: {n}"
                        )))
                    }
                };
            }
        }
        h.parse_extensions(b)?;
        h.check_features()?;
        h.validate()?;
        h.read_backing_name(b)?;
        Ok(h)
    }

    /// cluster_bits from the fixed header, validated after the magic and the version (QEMU's
    /// order); lets the caller size the first read.
    pub fn cluster_bits_of(start: &[u8]) -> Result<u32> {
        if start.len() < V2_HEADER_LEN as usize || be32(start, 0) != MAGIC {
            return Err(Error::corrupt_at(
                Structure::Header,
                0,
                "Image is not in qcow2 format",
            ));
        }
        let version = be32(start, 4);
        if version != 2 && version != 3 {
            return Err(Error::Unsupported(format!(
                "Unsupported qcow2 version {version}"
            )));
        }
        let bits = be32(start, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(Error::corrupt_at(
                Structure::Header,
                0,
                format!("Unsupported cluster size: 2^{bits}"),
            ));
        }
        Ok(bits)
    }

    fn parse_extensions(&mut self, b: &[u8]) -> Result<()> {
        let end = (self.cluster_size() as usize).min(b.len());
        let mut at = self.header_length as usize;
        loop {
            if at + 8 > end {
                return Err(Error::corrupt_at(
                    Structure::Header,
                    0,
                    "qcow2 header extension truncated",
                ));
            }
            let kind = be32(b, at);
            let len = be32(b, at + 4) as usize;
            at += 8;
            if kind == EXT_END {
                return Ok(());
            }
            if len > end - at {
                return Err(Error::corrupt_at(
                    Structure::Header,
                    0,
                    "qcow2 header extension too large",
                ));
            }
            let data = &b[at..at + len];
            match kind {
                EXT_BACKING_FORMAT => {
                    self.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let kind = match e[0] {
                            0 => FeatureKind::Incompatible,
                            1 => FeatureKind::Compatible,
                            2 => FeatureKind::Autoclear,
                            _ => continue,
                        };
                        let raw = &e[2..48];
                        let n = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
                        self.feature_names.push(FeatureName {
                            kind,
                            bit: e[1],
                            name: String::from_utf8_lossy(&raw[..n]).into_owned(),
                        });
                    }
                }
                EXT_CRYPTO => {
                    return Err(Error::Unsupported(
                        "Encrypted qcow2 images are not supported".into(),
                    ))
                }
                EXT_DATA_FILE => {
                    self.data_file = Some(String::from_utf8_lossy(data).into_owned());
                }
                _ => self.other_extensions.push(RawExtension {
                    kind,
                    data: data.to_vec(),
                }),
            }
            at += len.next_multiple_of(8).min(end - at);
        }
    }

    fn check_features(&self) -> Result<()> {
        let mut unknown = self.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            // Like QEMU: the names the image's own table gives, then one mask of the rest.
            let mut parts = Vec::new();
            for f in &self.feature_names {
                let bit = 1u64.checked_shl(u32::from(f.bit)).unwrap_or(0);
                if f.kind == FeatureKind::Incompatible && unknown & bit != 0 {
                    parts.push(f.name.clone());
                    unknown &= !bit;
                }
            }
            if unknown != 0 {
                parts.push(format!("Unknown incompatible feature: {unknown:x}"));
            }
            return Err(Error::Unsupported(format!(
                "Unsupported qcow2 feature(s): {}",
                parts.join(", ")
            )));
        }
        if self.crypt_method != 0 {
            return Err(Error::Unsupported(
                "Encrypted qcow2 images are not supported".into(),
            ));
        }
        let zstd_bit = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
        match (self.compression_type, zstd_bit) {
            (CompressionType::Zlib, true) => Err(Error::corrupt_at(
                Structure::Header,
                0,
                "Compression type incompatible feature bit must not be set for zlib",
            )),
            (CompressionType::Zstd, false) => Err(Error::corrupt_at(
                Structure::Header,
                0,
                "Compression type incompatible feature bit must be set for zstd",
            )),
            _ => Ok(()),
        }
    }

    fn validate(&self) -> Result<()> {
        let cs = self.cluster_size();
        if self.refcount_order > 6 {
            return Err(Error::corrupt_at(
                Structure::Header,
                0,
                format!(
                    "Reference count entry width too large; may not exceed 64 bits (order {})",
                    self.refcount_order
                ),
            ));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(Error::corrupt_at(
                Structure::Header,
                0,
                "Extended L2 entries need a cluster size of at least 16384 bytes",
            ));
        }
        // Tables must be cluster aligned and end within a signed 64-bit file offset (QEMU's
        // qcow2_validate_table); past the end of the file they read as zeroes.
        let table = |structure: Structure, what: &str, offset: u64, bytes: u64| -> Result<()> {
            let in_range = offset
                .checked_add(bytes)
                .is_some_and(|end| end <= i64::MAX as u64);
            if !offset.is_multiple_of(cs) || !in_range {
                return Err(Error::corrupt_at(
                    structure,
                    offset,
                    format!("Invalid {what} offset {offset:#x}"),
                ));
            }
            Ok(())
        };
        if self.refcount_table_clusters == 0 {
            return Err(Error::corrupt_at(
                Structure::Header,
                0,
                "Image has no refcount table",
            ));
        }
        let reftable_bytes = u64::from(self.refcount_table_clusters) * cs;
        if reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::corrupt_at(
                Structure::RefcountTable,
                self.refcount_table_offset,
                "Reference count table too large",
            ));
        }
        table(
            Structure::RefcountTable,
            "Reference count table",
            self.refcount_table_offset,
            reftable_bytes,
        )?;
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::corrupt_at(
                Structure::L1Table,
                self.l1_table_offset,
                "Active L1 table too large",
            ));
        }
        if self.l1_size > 0 {
            table(
                Structure::L1Table,
                "Active L1 table",
                self.l1_table_offset,
                l1_bytes,
            )?;
        }
        if self.size > u64::from(self.l1_size).saturating_mul(self.geometry().l1_coverage()) {
            return Err(Error::corrupt_at(
                Structure::Header,
                0,
                "Image is too big for its L1 table (virtual size exceeds L1 coverage)",
            ));
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::corrupt_at(
                Structure::Header,
                0,
                "Too many snapshots",
            ));
        }
        if self.nb_snapshots > 0 {
            table(
                Structure::SnapshotTable,
                "Snapshot table",
                self.snapshots_offset,
                0,
            )?;
        }
        Ok(())
    }

    /// Check that the active L1 table, the refcount table and the snapshot table lie within
    /// a file of `file_len` bytes (up to its last, partial cluster). QEMU opens an image
    /// whose tables lie past the end, where they read as zeroes; the engine does that only
    /// read-only, since a writer would allocate clusters over them or grow the file to
    /// reach them.
    pub fn check_tables_in_file(&self, file_len: u64) -> Result<()> {
        let file_end = file_len.next_multiple_of(self.cluster_size());
        let tables = [
            (
                Structure::RefcountTable,
                "Reference count table",
                self.refcount_table_offset,
                u64::from(self.refcount_table_clusters) * self.cluster_size(),
            ),
            (
                Structure::L1Table,
                "Active L1 table",
                self.l1_table_offset,
                u64::from(self.l1_size) * 8,
            ),
            (
                Structure::SnapshotTable,
                "Snapshot table",
                self.snapshots_offset,
                u64::from(self.nb_snapshots.min(1)),
            ),
        ];
        for (structure, what, offset, bytes) in tables {
            let inside = offset.checked_add(bytes).is_some_and(|end| end <= file_end);
            if bytes > 0 && !inside {
                return Err(Error::corrupt_at(
                    structure,
                    offset,
                    format!("{what} at offset {offset:#x} extends past the end of the image file"),
                ));
            }
        }
        Ok(())
    }

    fn read_backing_name(&mut self, b: &[u8]) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let off = self.backing_file_offset;
        let len = u64::from(self.backing_file_size);
        if self.backing_file_size > MAX_BACKING_NAME
            || off.saturating_add(len) > self.cluster_size()
            || off.saturating_add(len) > b.len() as u64
        {
            return Err(Error::corrupt_at(
                Structure::Header,
                0,
                "Backing file name too long or out of range",
            ));
        }
        let raw = &b[off as usize..(off + len) as usize];
        self.backing_file = Some(String::from_utf8_lossy(raw).into_owned());
        Ok(())
    }

    /// Encode the header, its extensions and the backing file name into the bytes of the
    /// first cluster (the caller writes them at offset 0). Fails when they do not fit.
    pub fn encode(&mut self) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut out = Vec::with_capacity(1024);
        if self.version == 2 {
            self.header_length = V2_HEADER_LEN;
        } else if self.header_length < V3_HEADER_LEN {
            self.header_length = V3_HEADER_LEN;
        }
        out.extend_from_slice(&MAGIC.to_be_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&0u64.to_be_bytes()); // backing offset, patched below
        out.extend_from_slice(&0u32.to_be_bytes()); // backing size, patched below
        out.extend_from_slice(&self.cluster_bits.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.crypt_method.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        out.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        out.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            out.extend_from_slice(&self.incompatible_features.to_be_bytes());
            out.extend_from_slice(&self.compatible_features.to_be_bytes());
            out.extend_from_slice(&self.autoclear_features.to_be_bytes());
            out.extend_from_slice(&self.refcount_order.to_be_bytes());
            out.extend_from_slice(&self.header_length.to_be_bytes());
            let ct = match self.compression_type {
                CompressionType::Zlib => 0u8,
                CompressionType::Zstd => 1,
            };
            out.push(ct);
            out.resize(self.header_length as usize, 0);
        }
        let mut ext = |kind: u32, data: &[u8]| {
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(8), 0);
        };
        if let Some(fmt) = &self.backing_format {
            ext(EXT_BACKING_FORMAT, fmt.as_bytes());
        }
        if let Some(name) = &self.data_file {
            ext(EXT_DATA_FILE, name.as_bytes());
        }
        // Like QEMU: its own feature table, left out for clusters of 4 KiB and less where
        // it would crowd out the backing file name.
        if self.version >= 3 && cs > 4096 {
            let table = default_feature_names();
            let mut data = Vec::with_capacity(table.len() * 48);
            for f in &table {
                let mut e = [0u8; 48];
                e[0] = match f.kind {
                    FeatureKind::Incompatible => 0,
                    FeatureKind::Compatible => 1,
                    FeatureKind::Autoclear => 2,
                };
                e[1] = f.bit;
                let n = f.name.len().min(46);
                e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                data.extend_from_slice(&e);
            }
            ext(EXT_FEATURE_TABLE, &data);
        }
        for e in &self.other_extensions {
            ext(e.kind, &e.data);
        }
        ext(EXT_END, &[]);
        match &self.backing_file {
            Some(name) => {
                if name.len() > MAX_BACKING_NAME as usize {
                    return Err(Error::invalid("Backing file name too long"));
                }
                self.backing_file_offset = out.len() as u64;
                self.backing_file_size = name.len() as u32;
                out.extend_from_slice(name.as_bytes());
            }
            None => {
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
        }
        out[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        out[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        if out.len() > cs {
            return Err(Error::NoSpace(
                "qcow2 header and extensions do not fit in the first cluster".into(),
            ));
        }
        Ok(out)
    }
}

/// The feature-name table QEMU writes into every version 3 image.
pub fn default_feature_names() -> Vec<FeatureName> {
    let f = |kind, bit, name: &str| FeatureName {
        kind,
        bit,
        name: name.to_string(),
    };
    use FeatureKind::*;
    vec![
        f(Incompatible, 0, "dirty bit"),
        f(Incompatible, 1, "corrupt bit"),
        f(Incompatible, 2, "external data file"),
        f(Incompatible, 3, "compression type"),
        f(Incompatible, 4, "extended L2 entries"),
        f(Compatible, 0, "lazy refcounts"),
        f(Autoclear, 0, "bitmaps"),
        f(Autoclear, 1, "raw external data"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 4,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: INCOMPAT_EXTL2 | INCOMPAT_COMPRESSION,
            compatible_features: COMPAT_LAZY_REFCOUNTS,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: CompressionType::Zstd,
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            data_file: None,
            feature_names: default_feature_names(),
            other_extensions: vec![RawExtension {
                kind: 0x1234_5678,
                data: vec![1, 2, 3],
            }],
        }
    }

    #[test]
    fn encode_parse_round_trip() {
        let mut h = sample();
        let bytes = h.encode().unwrap();
        let mut cluster = bytes.clone();
        cluster.resize(1 << 16, 0);
        let parsed = Header::parse(&cluster).unwrap();
        assert_eq!(parsed, h);
        let mut again = parsed.clone();
        assert_eq!(again.encode().unwrap(), bytes);
    }

    #[test]
    fn rejects_bad_fields() {
        let mut h = sample();
        let good = h.encode().unwrap();
        let parse = |b: &[u8]| {
            let mut c = b.to_vec();
            c.resize(1 << 16, 0);
            Header::parse(&c)
        };
        let mut bad = good.clone();
        bad[20..24].copy_from_slice(&22u32.to_be_bytes());
        assert!(parse(&bad).is_err());
        let mut bad = good.clone();
        bad[36..40].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
        assert!(parse(&bad).is_err());
        // An unaligned refcount table is refused (one past the end of the file is not: QEMU
        // opens it and reads zeroes).
        let mut bad = good.clone();
        bad[48..56].copy_from_slice(&((100u64 << 16) + 8).to_be_bytes());
        assert!(parse(&bad).is_err());
        let mut far = good.clone();
        far[48..56].copy_from_slice(&(100u64 << 16).to_be_bytes());
        assert!(parse(&far).is_ok());
        let mut bad = good.clone();
        bad[72..80]
            .copy_from_slice(&(INCOMPAT_EXTL2 | INCOMPAT_COMPRESSION | 1 << 40).to_be_bytes());
        let err = parse(&bad).unwrap_err().to_string();
        assert!(
            err.contains("Unknown incompatible feature: 10000000000"),
            "{err}"
        );
        // The external data file bit is known: it parses (I/O on such images is refused
        // by the image layer, not the header).
        let mut df = good.clone();
        df[72..80].copy_from_slice(
            &(INCOMPAT_EXTL2 | INCOMPAT_COMPRESSION | INCOMPAT_DATA_FILE).to_be_bytes(),
        );
        assert!(parse(&df).unwrap().has_data_file());
        assert!(parse(&good[..50]).is_err());
    }
}
