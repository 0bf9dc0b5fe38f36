//! qed's open checks, lookups and check on images QEMU makes, and on hostile headers.

use super::*;
use crate::check::Fix;
use crate::test_tools::qemu_ok;

fn header(cluster: u32, table: u32, l1: u64, size: u64) -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&cluster.to_le_bytes());
    h[8..12].copy_from_slice(&table.to_le_bytes());
    h[12..16].copy_from_slice(&1u32.to_le_bytes());
    h[40..48].copy_from_slice(&l1.to_le_bytes());
    h[48..56].copy_from_slice(&size.to_le_bytes());
    h
}

fn open_bytes(b: &[u8]) -> Result<Opened> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qed");
    std::fs::write(&p, b).unwrap();
    let s = crate::storage::FileStorage::new(std::fs::File::open(&p).unwrap());
    open(&s)
}

fn err(b: &[u8]) -> String {
    open_bytes(b).err().expect("must not open").to_string()
}

#[test]
fn valid_minimal_header_opens() {
    let mut b = header(4096, 2, 4096, 1 << 20);
    b.resize(3 * 4096, 0);
    let o = open_bytes(&b).unwrap();
    assert_eq!(o.size, 1 << 20);
    assert!(o.backing.is_none());
}

#[test]
fn hostile_geometry_in_qemus_words() {
    for (cluster, table, l1, size, what) in [
        (4095, 2, 4096, 1 << 20, "cluster size"), // not a power of two
        (1 << 27, 2, 1 << 27, 1 << 20, "cluster size"), // too big
        (4096, 3, 4096, 1 << 20, "table size"),   // not a power of two
        (4096, 32, 4096, 1 << 20, "table size"),  // too big
        (4096, 2, 4096, 1000, "image size"),      // not whole sectors
        (4096, 2, 4096, u64::MAX - 511, "image size"), // more than the tables map
        (4096, 2, 4097, 1 << 20, "table offset"), // L1 not aligned
        (4096, 2, 1 << 40, 1 << 20, "table offset"), // L1 past the end of the file
        (4096, 2, 0, 1 << 20, "table offset"),    // L1 in the header
        (4096, 1, 4096, 1 << 20, "table offset"), // one-cluster tables, as QEMU
        (4096, 16, u64::MAX - 4095, 4096, "table offset"), // L1 end overflows
    ] {
        let mut b = header(cluster, table, l1, size);
        b.resize(3 * 4096, 0);
        assert_eq!(
            err(&b),
            format!("QED {what} is invalid"),
            "{cluster} {table} {l1}"
        );
    }
}

#[test]
fn unknown_features_and_wrong_magic() {
    let mut b = header(4096, 2, 4096, 1 << 20);
    b.resize(3 * 4096, 0);
    b[16] = 8;
    assert_eq!(err(&b), "Unsupported QED features: 8");
    b[0] = b'X';
    assert_eq!(err(&b), "Image not in QED format");
    assert!(!probe(&b));
}

#[test]
fn backing_name_lying_about_its_place() {
    let mut b = header(4096, 2, 4096, 1 << 20);
    b.resize(3 * 4096, 0);
    b[16] = 1;
    b[56..60].copy_from_slice(&64u32.to_le_bytes());
    b[60..64].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(err(&b), "QED backing filename offset is invalid");
    b[60..64].copy_from_slice(&4u32.to_le_bytes());
    b[64..68].copy_from_slice(b"b\0xy");
    let o = open_bytes(&b).unwrap();
    assert_eq!(o.backing.unwrap().name, "b", "a C string, as QEMU keeps it");
}

#[test]
fn need_check_opens_read_only_as_is() {
    let mut b = header(4096, 2, 4096, 1 << 20);
    b.resize(3 * 4096, 0);
    b[16] = 2;
    assert!(open_bytes(&b).is_ok());
}

#[test]
fn l2_and_data_offsets_are_checked_on_lookup() {
    // L1 at 4096, L2 at 12288 (two clusters each); the file is five clusters long.
    let mut b = header(4096, 2, 4096, 1 << 20);
    b.resize(5 * 4096, 0);
    b[4096..4104].copy_from_slice(&12288u64.to_le_bytes());
    b[12288..12296].copy_from_slice(&(1u64 << 40).to_le_bytes());
    b[12296..12304].copy_from_slice(&1u64.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qed");
    std::fs::write(&p, &b).unwrap();
    let s = crate::storage::FileStorage::new(std::fs::File::open(&p).unwrap());
    let o = open(&s).unwrap();
    let e = o.map.lookup(&s, 0, 4096).unwrap_err().to_string();
    assert!(
        e.contains("QED cluster offset 0x10000000000 is invalid"),
        "{e}"
    );
    assert_eq!(
        o.map.lookup(&s, 4096, 1 << 16).unwrap(),
        (Mapped::Zero, 4096)
    );
    assert_eq!(
        o.map.lookup(&s, 8192, 1 << 16).unwrap(),
        (Mapped::Unallocated, 1 << 16)
    );
    let r = o.map.check(&s, o.size, Fix::default()).unwrap();
    assert_eq!((r.corruptions, r.leaks, r.allocated_clusters), (1, 0, 1));
    // An L2 table past the end of the file.
    b[4096..4104].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    let s = crate::storage::FileStorage::new(std::fs::File::open(&p).unwrap());
    let o = open(&s).unwrap();
    let e = o.map.lookup(&s, 0, 4096).unwrap_err().to_string();
    assert!(e.contains("QED L2 table offset"), "{e}");
    assert_eq!(
        o.map.check(&s, o.size, Fix::default()).unwrap().corruptions,
        1
    );
}

#[test]
fn qemu_image_maps_its_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.qed");
    let ps = p.to_str().unwrap();
    qemu_ok("qemu-img", &["create", "-q", "-f", "qed", ps, "4M"]);
    qemu_ok("qemu-io", &["-f", "qed", "-c", "write -P 9 64k 128k", ps]);
    let s = crate::storage::FileStorage::new(std::fs::File::open(&p).unwrap());
    let o = open(&s).unwrap();
    assert_eq!(o.map.cluster_size(), 65536);
    let (m, n) = o.map.lookup(&s, 65536 + 10, 1 << 20).unwrap();
    assert!(matches!(m, Mapped::Data(_)), "{m:?}");
    assert_eq!(n, 128 * 1024 - 10, "two contiguous clusters");
    let r = o.map.check(&s, o.size, Fix::default()).unwrap();
    assert_eq!((r.corruptions, r.leaks, r.allocated_clusters), (0, 0, 2));
    assert_eq!(r.total_clusters, 64);
}
