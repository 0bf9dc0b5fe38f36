//! The write ordering of header changes, checked on the fault-injecting storage's log.

use std::sync::Arc;

use super::Qcow2Image;
use crate::driver::BlockDriver;
use crate::fault_storage::{FaultStorage, Op};

/// Opening read-write clears the autoclear bits (the bitmaps go stale once this engine
/// writes); that header must be durable before the first guest data reaches the file.
#[test]
fn cleared_autoclear_bits_are_durable_before_the_first_data_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bitmap.qcow2");
    let p = path.to_str().unwrap();
    for args in [
        vec!["create", "-q", "-f", "qcow2", p, "4M"],
        vec!["bitmap", "--add", p, "b0"],
    ] {
        crate::test_tools::qemu_ok("qemu-img", &args);
    }
    let fault = FaultStorage::with_content(std::fs::read(&path).unwrap());
    let img = Qcow2Image::open(Arc::new(fault.clone()), false).unwrap();
    img.write_at(&[7u8; 4096], 1 << 20).unwrap();
    let log = fault.log();
    let header = log
        .iter()
        .position(|op| matches!(op, Op::Write { offset: 0, .. }))
        .expect("the header is rewritten");
    let flush = log[header..]
        .iter()
        .position(|op| *op == Op::Flush)
        .map(|i| header + i)
        .expect("a flush follows the header write");
    let first_other = log
        .iter()
        .position(|op| matches!(op, Op::Write { offset, .. } if *offset != 0))
        .expect("data is written");
    assert!(flush < first_other, "{log:?}");
    drop(img);
    assert_eq!(
        &fault.content().unwrap()[88..96],
        &[0u8; 8],
        "autoclear bits"
    );
}
