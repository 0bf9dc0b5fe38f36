//! The write ordering of header changes, checked on the fault-injecting storage's log.

use std::sync::Arc;

use super::Qcow2Image;
use crate::driver::BlockDriver;
use crate::fault_storage::{FaultStorage, Op};

/// The first guest write marks the enabled bitmap in use: the new directory and the
/// header that names it are durable before the guest data reaches the file. Closing
/// stores the bitmap with the write recorded, consistent again, the autoclear bit set.
#[test]
fn bitmaps_are_marked_in_use_durably_before_the_first_data_write() {
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
    assert!(fault.log().is_empty(), "opening writes nothing");
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
    // The guest data (in a whole cluster) is the last write.
    let data = log
        .iter()
        .rposition(|op| matches!(op, Op::Write { offset, .. } if *offset != 0))
        .expect("data is written");
    assert!(flush < data, "{log:?}");
    drop(img);
    let content = fault.content().unwrap();
    assert_eq!(content[95] & 1, 1, "bitmaps autoclear bit");
    let h = super::header::Header::parse(&content[..65536]).unwrap();
    let dir = super::bitmaps::directory(&fault, &h).unwrap();
    assert_eq!(dir.len(), 1);
    assert!(!dir[0].in_use() && dir[0].auto(), "{dir:?}");
    let bits = super::bitmap_data::Bits::load(&fault, &dir[0], h.size, h.cluster_bits).unwrap();
    let mut want = super::bitmap_data::Bits::empty(h.size, dir[0].granularity_bits, h.cluster_bits);
    want.mark(1 << 20, (1 << 20) + 4096);
    assert_eq!(format!("{bits:?}"), format!("{want:?}"));
}
