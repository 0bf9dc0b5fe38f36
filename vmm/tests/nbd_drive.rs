//! `--drive file=nbd+unix:///...`: a vmm drive on an NBD export (served by qemu-nbd) reads
//! as the file; with `snapshot=on` the guest's writes stay in the overlay.

use std::path::Path;

use common::format::Format;
use integration_tests::nbd::{Addr, Server};
use integration_tests::*;
use vmm::config::{CacheMode, DriveConfig};
use vmm::disk::open_drive;

#[test]
fn a_drive_on_an_nbd_export_reads_as_the_file_and_snapshot_keeps_writes() {
    if !have_qemu_img() {
        return;
    }
    let d = tempdir();
    let file = d.path().join("disk.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&file), "4M"]).ok();
    qemu_io_cmds(&file, "raw", &["write -P 0x3c 1M 256k".into()]);
    let before = std::fs::read(&file).unwrap();
    let srv = Server::start(
        Path::new("qemu-nbd"),
        &["-t", "-e", "0", "-f", "raw", s(&file)],
        Addr::Unix(d.path().join("s")),
        d.path(),
    );
    for snapshot in [false, true] {
        let cfg = DriveConfig {
            path: srv.addr.uri().into(),
            format: Some(Format::Raw),
            read_only: false,
            snapshot,
            cache: CacheMode::Writeback,
            serial: None,
        };
        let drive = open_drive(&cfg).unwrap_or_else(|e| panic!("snapshot={snapshot}: {e}"));
        assert_eq!(drive.size(), before.len() as u64);
        let mut got = vec![0u8; before.len()];
        drive.read_at(&mut got, 0).unwrap();
        assert!(
            got == before,
            "snapshot={snapshot}: {:?}",
            first_mismatch(&before, &got)
        );
        if snapshot {
            drive.write_at(&[0xee; 4096], 0).unwrap();
            let mut b = [0u8; 4096];
            drive.read_at(&mut b, 0).unwrap();
            assert_eq!(b, [0xee; 4096]);
        }
        drive.flush().unwrap();
    }
    drop(srv);
    assert!(
        std::fs::read(&file).unwrap() == before,
        "snapshot=on wrote to the export"
    );
}
