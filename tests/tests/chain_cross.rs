//! Backing chains opened by the engine (`common::open`) on chains made by qemu-img: a lower
//! layer opened read-write (what commit needs), a lock conflict on a backing file and a
//! missing one (kind kept, qemu-io's message), and loops.

use common::open::{open_image, Image, OpenOptions};
use common::Error;
use integration_tests::*;
use std::path::Path;

/// base.qcow2 <- mid.qcow2 <- top.qcow2, 1 MiB, 0x11 in base's first 128 KiB.
fn three_levels(dir: &Path) {
    for args in [
        "create -q -f qcow2 base.qcow2 1M",
        "create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2",
        "create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2",
    ] {
        qemu_img_in(dir, &args.split(' ').collect::<Vec<_>>()).ok();
    }
    qemu_io_cmds(
        &dir.join("base.qcow2"),
        "qcow2",
        &["write -P 0x11 0 128k".to_string()],
    );
}

/// Open with a retry while locked (a child of another test thread may hold a descriptor).
fn open_retry(path: &Path, opts: &OpenOptions) -> common::Result<Image> {
    let start = std::time::Instant::now();
    loop {
        match open_image(path, opts) {
            Err(Error::Locked(_)) if start.elapsed().as_secs() < 2 => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            r => return r,
        }
    }
}

/// What qemu-io prints after `can't open device PATH: ` when it cannot open `path`.
fn qemu_io_open_error(path: &Path) -> String {
    let out = qemu_io(&["-r", "-c", "read 0 1", s(path)]);
    assert!(!out.success(), "qemu-io opened {}", path.display());
    let prefix = format!("qemu-io: can't open device {}: ", s(path));
    out.stderr
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("unexpected qemu-io error: {}", out.stderr))
        .trim_end_matches('\n')
        .to_string()
}

#[test]
fn middle_layer_opened_read_write_takes_writes_bottom_stays_read_only() {
    let tmp = tempdir();
    let dir = tmp.path();
    three_levels(dir);
    let opts = OpenOptions {
        read_only: true,
        writable_backing: Some(1),
        ..Default::default()
    };
    let top = open_retry(&dir.join("top.qcow2"), &opts).unwrap();
    let (mid, base) = (top.layer(1).unwrap(), top.layer(2).unwrap());
    assert!(top.layer(3).is_none());
    assert!(top.driver().is_read_only());
    assert!(!mid.is_read_only());
    assert!(base.is_read_only());
    mid.write_at(&[0xab; 65536], 65536).unwrap();
    mid.flush().unwrap();
    assert!(matches!(base.write_at(&[1], 0), Err(Error::ReadOnly)));
    assert!(matches!(
        top.driver().write_at(&[1], 0),
        Err(Error::ReadOnly)
    ));
    // The top sees the write through its backing file, and base's data below it.
    let mut buf = vec![0u8; 128 << 10];
    top.driver().read_at(&mut buf, 0).unwrap();
    assert!(buf[..65536].iter().all(|&b| b == 0x11));
    assert!(buf[65536..].iter().all(|&b| b == 0xab));
    drop(top);

    assert_qemu_check_clean(&dir.join("mid.qcow2"));
    let cmds = |c: &[&str]| c.iter().map(|c| c.to_string()).collect::<Vec<_>>();
    qemu_io_cmds(
        &dir.join("mid.qcow2"),
        "qcow2",
        &cmds(&["read -P 0x11 0 64k", "read -P 0xab 64k 64k"]),
    );
    qemu_io_cmds(
        &dir.join("base.qcow2"),
        "qcow2",
        &cmds(&["read -P 0x11 0 128k", "read -P 0 128k 896k"]),
    );
    let map = qemu_img(&["map", "--output=json", s(&dir.join("top.qcow2"))]).ok();
    assert!(map.stdout.contains("\"depth\": 1"), "{}", map.stdout);
}

#[test]
fn writable_depth_must_be_in_the_chain() {
    let tmp = tempdir();
    let dir = tmp.path();
    three_levels(dir);
    for depth in [0, 3] {
        let opts = OpenOptions {
            read_only: true,
            writable_backing: Some(depth),
            ..Default::default()
        };
        let e = open_retry(&dir.join("top.qcow2"), &opts)
            .err()
            .expect("no such layer");
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    }
}

#[test]
fn lock_conflict_on_a_backing_file_keeps_its_kind() {
    let tmp = tempdir();
    let dir = tmp.path();
    three_levels(dir);
    let holder = qemu_io_hold(&dir.join("base.qcow2"));
    let want = qemu_io_open_error(&dir.join("top.qcow2"));
    for read_only in [true, false] {
        let opts = OpenOptions {
            read_only,
            ..Default::default()
        };
        match open_image(&dir.join("top.qcow2"), &opts) {
            Err(Error::Locked(m)) => assert_eq!(m, want, "read_only={read_only}"),
            Err(e) => panic!("read_only={read_only}: not a lock conflict: {e:?}"),
            Ok(_) => panic!("read_only={read_only}: opened under a writer"),
        }
    }
    drop(holder);
    open_retry(&dir.join("top.qcow2"), &OpenOptions::default()).unwrap();
}

#[test]
fn missing_backing_file_two_levels_down_reads_like_qemu_io() {
    let tmp = tempdir();
    let dir = tmp.path();
    three_levels(dir);
    std::fs::remove_file(dir.join("base.qcow2")).unwrap();
    let want = qemu_io_open_error(&dir.join("top.qcow2"));
    let e = open_retry(&dir.join("top.qcow2"), &OpenOptions::default())
        .err()
        .expect("base is gone");
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    assert_eq!(e.to_string(), want);
}

#[test]
fn backing_loops_are_refused_by_the_chain_opener() {
    let tmp = tempdir();
    let dir = tmp.path();
    three_levels(dir);
    // base names top: top -> mid -> base -> top.
    qemu_img_in(
        dir,
        &[
            "rebase",
            "-u",
            "-b",
            "top.qcow2",
            "-F",
            "qcow2",
            "base.qcow2",
        ],
    )
    .ok();
    let top = dir.join("top.qcow2");
    for read_only in [true, false] {
        let opts = OpenOptions {
            read_only,
            ..Default::default()
        };
        let e = open_retry(&top, &opts).err().expect("a loop");
        assert!(matches!(e, Error::BackingLoop(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "Could not open backing file: Could not open backing file: \
                 Could not open backing file: Backing file '{}' refers to itself \
                 (loop in the backing chain)",
                top.display()
            )
        );
    }
    // Without its backing file the image opens, and its lock was released on failure.
    let opts = OpenOptions {
        no_backing: true,
        ..Default::default()
    };
    open_retry(&top, &opts).unwrap();
}
