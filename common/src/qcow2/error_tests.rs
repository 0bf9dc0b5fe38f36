//! Corruption errors name the structure and its host offset, so callers can decide by kind.

use std::sync::Arc;

use super::entry::COPIED;
use super::Qcow2Image;
use crate::driver::BlockDriver;
use crate::error::{Error, Structure};
use crate::fault_storage::FaultStorage;

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// A 1 MiB image qemu-img wrote two clusters into; returns its bytes, the L1 table offset
/// and the L2 table offset.
fn image() -> (Vec<u8>, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.qcow2");
    let f = p.to_str().unwrap();
    for (tool, args) in [
        ("qemu-img", vec!["create", "-q", "-f", "qcow2", f, "1M"]),
        ("qemu-io", vec!["-c", "write -P 3 0 128k", f]),
    ] {
        crate::test_tools::qemu_ok(tool, &args);
    }
    let b = std::fs::read(&p).unwrap();
    let l1 = be64(&b, 40);
    let l2 = be64(&b, l1 as usize) & super::entry::OFFSET_MASK;
    (b, l1, l2)
}

fn location(e: Error) -> (Option<Structure>, Option<u64>) {
    match e {
        Error::Corrupt {
            structure, offset, ..
        } => (structure, offset),
        other => panic!("not a corruption error: {other}"),
    }
}

fn open(bytes: Vec<u8>, read_only: bool) -> Qcow2Image {
    Qcow2Image::open(Arc::new(FaultStorage::with_content(bytes)), read_only).unwrap()
}

#[test]
fn bad_entries_are_located() {
    let (mut b, _, l2) = image();
    let e1 = l2 as usize + 8;
    b[e1..e1 + 8].copy_from_slice(&(COPIED | 0x30200).to_be_bytes());
    let img = open(b.clone(), true);
    let mut buf = [0u8; 512];
    let e = img.read_at(&mut buf, 65536).unwrap_err();
    assert_eq!(location(e), (Some(Structure::L2Table), Some(l2 + 8)));

    let (mut b, l1_b, _) = image();
    let at = l1_b as usize;
    let entry = be64(&b, at);
    b[at..at + 8].copy_from_slice(&(entry | 1 << 60).to_be_bytes());
    let img = open(b, true);
    let e = img.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(location(e), (Some(Structure::L1Table), Some(l1_b)));
}

/// An L2 entry pointing at the refcount table: a write there is refused, the error names
/// the structure it would have overwritten, and the image is marked corrupt.
#[test]
fn overlap_names_the_structure_it_protects() {
    let (mut b, _, l2) = image();
    let reftable = be64(&b, 48);
    let e0 = l2 as usize;
    b[e0..e0 + 8].copy_from_slice(&(COPIED | reftable).to_be_bytes());
    let img = open(b, false);
    let e = img.write_at(&[1u8; 512], 0).unwrap_err();
    assert_eq!(
        location(e),
        (Some(Structure::RefcountTable), Some(reftable))
    );
    assert!(img.header().is_corrupt());
}
