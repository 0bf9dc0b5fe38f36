//! Engine-level tests of the qcow2 driver against qemu-img (installed here and in CI).

use std::path::Path;
use std::process::Command;

use super::create::{create_qcow2, Preallocation, Qcow2CreateOptions};
use super::header::CompressionType;
use super::Qcow2Image;
use crate::driver::BlockDriver;
use crate::open::OpenOptions;

/// Run qemu-img (see [`crate::test_tools::qemu`]).
fn qemu_img(args: &[&str]) -> (bool, String) {
    let (code, text) = crate::test_tools::qemu("qemu-img", args);
    (code == 0, text)
}

/// Open read-write, retrying a lock conflict for a moment (see `qemu_img`).
fn open_rw(path: &Path) -> crate::Result<Qcow2Image> {
    crate::lock::retry_while_locked(|| open_qcow2(path, &rw()))
}

/// Open through the chain opener and take the qcow2 image out.
pub(super) fn open_qcow2(path: &Path, opts: &OpenOptions) -> crate::Result<Qcow2Image> {
    match crate::open::open_image(path, opts)? {
        crate::open::Image::Qcow2(q) => Ok(q),
        _ => panic!("{} is not qcow2", path.display()),
    }
}

fn check_clean(path: &Path) {
    let (ok, text) = qemu_img(&["check", path.to_str().unwrap()]);
    assert!(ok, "qemu-img check failed for {}:\n{text}", path.display());
    assert!(text.contains("No errors were found"), "{text}");
    assert!(!text.contains("leaked"), "{text}");
}

fn qemu_raw(path: &Path) -> Vec<u8> {
    let raw = path.with_extension("raw");
    let (ok, text) = qemu_img(&[
        "convert",
        "-O",
        "raw",
        path.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    std::fs::read(raw).unwrap()
}

fn rw() -> OpenOptions {
    OpenOptions::default()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

#[test]
fn create_write_read_check_all_geometries() {
    let dir = tempfile::tempdir().unwrap();
    for (cs, bits, ext, version) in [
        (65536u64, 16u32, false, 3u32),
        (512, 1, false, 3),
        (4096, 64, false, 3),
        (65536, 16, true, 3),
        (16384, 8, true, 3),
        (2 << 20, 16, false, 3),
        (65536, 16, false, 2),
    ] {
        let path = dir
            .path()
            .join(format!("g{cs}-{bits}-{ext}-{version}.qcow2"));
        let size = 8 << 20;
        let opts = Qcow2CreateOptions {
            size,
            cluster_size: cs,
            refcount_bits: bits,
            extended_l2: ext,
            version,
            ..Default::default()
        };
        crate::lock::retry_while_locked(|| create_qcow2(&path, &opts)).unwrap();
        check_clean(&path);
        let mut model = vec![0u8; size as usize];
        {
            let img = open_rw(&path).unwrap();
            for (i, (off, len)) in [
                (0u64, 1000usize),
                (70000, 200000),
                (5 << 20, 4096),
                (size - 777, 777),
                (1234567, 3),
            ]
            .into_iter()
            .enumerate()
            {
                let data = pattern(len, i as u8);
                img.write_at(&data, off).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            img.write_zeroes(60000, 10000, false).unwrap();
            model[60000..70000].fill(0);
            img.discard(0, 2 << 20).unwrap();
            let dstart = 0usize.next_multiple_of(cs as usize);
            let dend = (2 << 20) / cs as usize * cs as usize;
            // Without a backing file a discarded cluster reads as zeroes in v2 and v3.
            model[dstart..dend].fill(0);
            let mut back = vec![0u8; size as usize];
            img.read_at(&mut back, 0).unwrap();
            assert!(
                back == model,
                "engine read-back differs for cs={cs} bits={bits} ext={ext}"
            );
        }
        check_clean(&path);
        assert!(
            qemu_raw(&path) == model,
            "qemu-img sees other data for cs={cs} bits={bits} ext={ext}"
        );
    }
}

#[test]
fn preallocation_modes_pass_check() {
    let dir = tempfile::tempdir().unwrap();
    for p in [
        Preallocation::Metadata,
        Preallocation::Falloc,
        Preallocation::Full,
    ] {
        let path = dir.path().join(format!("{p:?}.qcow2"));
        let opts = Qcow2CreateOptions {
            size: 3 << 20,
            preallocation: p,
            compression_type: CompressionType::Zstd,
            lazy_refcounts: true,
            ..Default::default()
        };
        crate::lock::retry_while_locked(|| create_qcow2(&path, &opts)).unwrap();
        check_clean(&path);
        assert_eq!(qemu_raw(&path), vec![0u8; 3 << 20]);
    }
}

#[test]
fn refcount_table_grows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grow.qcow2");
    // 512-byte clusters with 64-bit refcounts: one block covers only 64 clusters and one
    // table cluster only 64 blocks, so a few MiB of data forces the table to grow.
    let opts = Qcow2CreateOptions {
        size: 16 << 20,
        cluster_size: 512,
        refcount_bits: 64,
        ..Default::default()
    };
    crate::lock::retry_while_locked(|| create_qcow2(&path, &opts)).unwrap();
    let data = pattern(4 << 20, 7);
    {
        let img = open_rw(&path).unwrap();
        img.write_at(&data, 1 << 20).unwrap();
    }
    check_clean(&path);
    let raw = qemu_raw(&path);
    assert!(raw[1 << 20..5 << 20] == data[..]);
}

fn qemu_io(path: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(path.to_str().unwrap());
    let out = Command::new("qemu-io").args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("error") && !text.contains("failed"),
        "{text}"
    );
}

fn engine_bytes(path: &Path) -> Vec<u8> {
    let opts = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let img = crate::lock::retry_while_locked(|| crate::open::open_image(path, &opts)).unwrap();
    let d = img.driver();
    let mut out = vec![0u8; d.size() as usize];
    // Odd chunk size so that reads straddle clusters and subclusters.
    for (i, chunk) in out.chunks_mut(12345).enumerate() {
        d.read_at(chunk, i as u64 * 12345).unwrap();
    }
    out
}

#[test]
fn reads_what_qemu_wrote_through_a_backing_chain_with_compression() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    for (ct, ext) in [("zlib", "off"), ("zstd", "on")] {
        let base = p(&format!("base-{ct}.qcow2"));
        let mid = p(&format!("mid-{ct}.qcow2"));
        let top = p(&format!("top-{ct}.qcow2"));
        let o = format!("compression_type={ct},extended_l2={ext}");
        assert!(
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &o,
                base.to_str().unwrap(),
                "4M"
            ])
            .0
        );
        qemu_io(
            &base,
            "qcow2",
            &[
                "write -c -P 0x22 64k 64k",
                "write -c -P 0x33 1M 128k",
                "write -P 0x11 0 64k",
                "write -P 0x12 1536k 2M",
            ],
        );
        assert!(
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &o,
                "-b",
                &format!("base-{ct}.qcow2"),
                "-F",
                "qcow2",
                mid.to_str().unwrap()
            ])
            .0
        );
        qemu_io(
            &mid,
            "qcow2",
            &[
                "write -P 0x44 100000 5000",
                "write -z 2M 70000",
                "discard 3M 128k",
                "write -P 0x55 3100000 10",
            ],
        );
        assert!(
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                mid.file_name().unwrap().to_str().unwrap(),
                "-F",
                "qcow2",
                top.to_str().unwrap()
            ])
            .0
        );
        qemu_io(
            &top,
            "qcow2",
            &[
                "write -P 0x66 65000 1000",
                "write -z -u 1M 64k",
                "write -c -P 0x77 3584k 64k",
            ],
        );
        let expected = qemu_raw(&top);
        assert!(engine_bytes(&top) == expected, "chain read differs ({ct})");
    }
}

#[test]
fn dirty_lazy_refcount_image_is_repaired_on_read_write_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dirty.qcow2");
    assert!(
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            path.to_str().unwrap(),
            "4M"
        ])
        .0
    );
    // qemu-io's `abort` kills it with the refcounts of the new clusters never written.
    let status = Command::new("qemu-io")
        .args([
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "abort",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap()
        .status;
    assert!(!status.success());
    let (ok, text) = qemu_img(&["check", path.to_str().unwrap()]);
    assert!(
        !ok && text.contains("refcount=0 reference=1"),
        "image should need repair:\n{text}"
    );
    {
        let img = open_rw(&path).unwrap();
        assert!(!img.header().is_dirty(), "repair clears the dirty bit");
        let mut buf = vec![0u8; 1 << 20];
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0x5a));
        img.write_at(&[7u8; 4096], 2 << 20).unwrap();
    }
    check_clean(&path);
    let raw = qemu_raw(&path);
    assert!(raw[..1 << 20].iter().all(|&b| b == 0x5a));
    assert!(raw[2 << 20..(2 << 20) + 4096].iter().all(|&b| b == 7));
    let (_, json) = qemu_img(&["info", "--output=json", path.to_str().unwrap()]);
    assert!(json.contains("\"dirty-flag\": false"), "{json}");
}

#[test]
fn lazy_refcounts_set_dirty_while_open_and_clear_on_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lazy.qcow2");
    let opts = Qcow2CreateOptions {
        size: 4 << 20,
        lazy_refcounts: true,
        ..Default::default()
    };
    crate::lock::retry_while_locked(|| create_qcow2(&path, &opts)).unwrap();
    let img = open_rw(&path).unwrap();
    img.write_at(&[1u8; 512], 0).unwrap();
    let on_disk = super::read_header(&crate::storage::FileStorage::new(
        std::fs::File::open(&path).unwrap(),
    ))
    .unwrap();
    assert!(on_disk.is_dirty());
    drop(img);
    let (_, json) = qemu_img(&["info", "--output=json", path.to_str().unwrap()]);
    assert!(
        json.contains("\"dirty-flag\": false") && json.contains("\"lazy-refcounts\": true"),
        "{json}"
    );
    check_clean(&path);
}

/// Crash at every point of a recorded run (and with random subsets of the unflushed
/// writes lost): `qemu-img check` never finds corruption (leaks are allowed), and every
/// guest range that was flushed and not touched since reads back as flushed.
#[test]
fn crash_at_any_point_leaves_a_consistent_image() {
    use crate::fault_storage::{FaultStorage, Op};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    for ext in [false, true] {
        let fault = FaultStorage::in_memory();
        let size = 4u64 << 20;
        let opts = Qcow2CreateOptions {
            size,
            cluster_size: 16384,
            extended_l2: ext,
            ..Default::default()
        };
        super::create::format_qcow2(Arc::new(fault.clone()), &opts).unwrap();
        fault.reset_log().unwrap();
        // Each step: guest range touched, and whether a flush follows it.
        let mut model = vec![0u8; size as usize];
        let mut flushed: Vec<(usize, Vec<u8>)> = Vec::new(); // (log len at flush, model)
        let mut touched_since: Vec<Vec<(u64, u64)>> = Vec::new();
        {
            let img = Qcow2Image::open(Arc::new(fault.clone()), false).unwrap();
            let steps: Vec<(u64, u64, u8)> = vec![
                (0, 100_000, 1),
                (300_000, 5000, 2),
                (1 << 20, 70_000, 3),
                (50_000, 40_000, 4),
                (3 << 20, 1 << 20, 5),
            ];
            for (i, &(off, len, kind)) in steps.iter().enumerate() {
                let data = pattern(len as usize, kind);
                img.write_at(&data, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                for t in touched_since.iter_mut() {
                    t.push((off, len));
                }
                if i % 2 == 1 {
                    img.discard(0, 64 << 10).unwrap();
                    model[..64 << 10].fill(0);
                    img.write_zeroes(1 << 20, 32 << 10, true).unwrap();
                    model[1 << 20..(1 << 20) + (32 << 10)].fill(0);
                    for t in touched_since.iter_mut() {
                        t.push((0, 64 << 10));
                        t.push((1 << 20, 32 << 10));
                    }
                }
                img.flush().unwrap();
                flushed.push((fault.log().len(), model.clone()));
                touched_since.push(Vec::new());
            }
        }
        let log = fault.log();
        assert!(log.contains(&Op::Flush));
        let file = dir.path().join(format!("crash-{ext}.qcow2"));
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for k in 0..=log.len() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let seed = rng;
            let images = [
                (fault.crash_image_at(k), true),
                (
                    fault.crash_image_subset(k, &|i| (seed >> (i % 61)) & 1 == 1),
                    false,
                ),
            ];
            for (img, check_data) in images {
                std::fs::write(&file, &img).unwrap();
                let (code, text) =
                    crate::test_tools::qemu("qemu-img", &["check", file.to_str().unwrap()]);
                assert!(
                    code == 0 || code == 3,
                    "crash at op {k}/{} (ext={ext}) corrupts the image:\n{}",
                    log.len(),
                    text
                );
                // The newest flush completed by point k: its data must be intact where
                // nothing touched it afterwards.
                let newest = flushed.iter().rposition(|(at, _)| *at <= k);
                if let (Some(j), true) = (newest, check_data) {
                    let back = qemu_raw(&file);
                    let expect = &flushed[j].1;
                    let touched = &touched_since[j];
                    for c in (0..size).step_by(4096) {
                        let hit = touched.iter().any(|&(o, l)| c + 4096 > o && c < o + l);
                        if !hit {
                            let r = c as usize..c as usize + 4096;
                            assert!(
                                back[r.clone()] == expect[r],
                                "flushed data lost at {c} after crash at op {k}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn allocation_refuses_metadata_clusters_when_refcounts_lie() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lying.qcow2");
    let opts = Qcow2CreateOptions {
        size: 4 << 20,
        ..Default::default()
    };
    crate::lock::retry_while_locked(|| create_qcow2(&path, &opts)).unwrap();
    {
        let img = open_rw(&path).unwrap();
        img.write_at(&[9u8; 65536], 0).unwrap();
    }
    // Zero the refcount block (cluster 2): now every cluster, the header and the L2 table
    // included, claims to be free.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&vec![0u8; 65536], 2 * 65536).unwrap();
    drop(f);
    let header_before = std::fs::read(&path).unwrap()[..104].to_vec();
    {
        let img = open_rw(&path).unwrap();
        let err = img.write_at(&[1u8; 512], 1 << 20).unwrap_err().to_string();
        assert!(
            err.contains("preventing invalid write on metadata"),
            "{err}"
        );
        assert!(img.header().is_corrupt());
    }
    let after = std::fs::read(&path).unwrap();
    assert_eq!(
        after[..72],
        header_before[..72],
        "only the feature bits may change"
    );
    let (_, info) = qemu_img(&["info", path.to_str().unwrap()]);
    assert!(info.contains("corrupt: true"), "{info}");
    assert!(
        open_rw(&path).is_err(),
        "a corrupt image opens read-only only"
    );
    assert!(
        qemu_raw(&path)[..65536].iter().all(|&b| b == 9),
        "guest data untouched"
    );
}

#[test]
fn external_data_file_images_open_for_metadata_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("df.qcow2");
    let data = dir.path().join("df.raw");
    let opt = format!("data_file={}", data.display());
    assert!(
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opt,
            path.to_str().unwrap(),
            "1M"
        ])
        .0
    );
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let img = crate::lock::retry_while_locked(|| open_qcow2(&path, &ro)).unwrap();
    assert_eq!(
        img.header().data_file.as_deref(),
        Some(data.to_str().unwrap())
    );
    let err = img.read_at(&mut [0u8; 512], 0).unwrap_err().to_string();
    assert!(err.contains("external data file"), "{err}");
    drop(img);
    let err = open_rw(&path)
        .err()
        .expect("read-write open refused")
        .to_string();
    assert!(err.contains("external data file"), "{err}");
}

#[test]
fn v2_discard_keeps_data_over_a_backing_file_and_drops_it_without() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("b.qcow2");
    let top = dir.path().join("t.qcow2");
    let lone = dir.path().join("n.qcow2");
    for (p, backing) in [(&base, None), (&top, Some("b.qcow2")), (&lone, None)] {
        let opts = Qcow2CreateOptions {
            size: 1 << 20,
            version: 2,
            backing_file: backing.map(str::to_string),
            backing_format: backing.map(|_| "qcow2".to_string()),
            ..Default::default()
        };
        crate::lock::retry_while_locked(|| create_qcow2(p, &opts)).unwrap();
    }
    qemu_io(&base, "qcow2", &["write -P 0x11 0 1M"]);
    for p in [&top, &lone] {
        let opts = OpenOptions::default();
        let img = crate::lock::retry_while_locked(|| crate::open::open_image(p, &opts)).unwrap();
        let d = img.driver();
        d.write_at(&[0x22; 131072], 0).unwrap();
        d.discard(0, 131072).unwrap();
        let mut buf = vec![0u8; 131072];
        d.read_at(&mut buf, 0).unwrap();
        let want = if p == &top { 0x22 } else { 0 };
        assert!(buf.iter().all(|&b| b == want), "{}", p.display());
    }
    check_clean(&top);
    check_clean(&lone);
}

/// A new qcow2 image of `size` bytes on in-memory fault-injecting storage, opened.
fn image_on_fault_storage(size: u64) -> (crate::fault_storage::FaultStorage, Qcow2Image) {
    use std::sync::Arc;
    let fault = crate::fault_storage::FaultStorage::in_memory();
    let opts = Qcow2CreateOptions {
        size,
        ..Default::default()
    };
    super::create::format_qcow2(Arc::new(fault.clone()), &opts).unwrap();
    let img = Qcow2Image::open(Arc::new(fault.clone()), false).unwrap();
    (fault, img)
}

/// Write the storage's bytes to `path` and check them with qemu-img: consistent, leaks
/// allowed (a failed allocating write may leak its cluster).
fn check_consistent(fault: &crate::fault_storage::FaultStorage, path: &Path) {
    std::fs::write(path, fault.content().unwrap()).unwrap();
    let (code, text) = crate::test_tools::qemu("qemu-img", &["check", path.to_str().unwrap()]);
    assert!(code == 0 || code == 3, "{text}");
}

/// A full disk: writes that need new space fail with ENOSPC and a clear error; what was
/// flushed before stays intact, the image stays consistent, and once space is back the
/// same image takes writes and flushes again.
#[test]
fn full_disk_fails_cleanly_and_keeps_flushed_data() {
    let dir = tempfile::tempdir().unwrap();
    let (fault, img) = image_on_fault_storage(8 << 20);
    let first = pattern(1 << 20, 3);
    img.write_at(&first, 0).unwrap();
    img.flush().unwrap();
    let used = fault.content().unwrap().len() as u64;
    fault.set_enospc_limit(Some(used + (128 << 10)));
    let mut failed = None;
    for i in 1..8u64 {
        if let Err(e) = img.write_at(&pattern(1 << 20, i as u8), i << 20) {
            failed = Some(e);
            break;
        }
    }
    let err = failed.expect("writes past the limit must fail");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(!err.to_string().contains('\n'), "one-line error: {err}");
    // Whatever reached the disk is a consistent image with the flushed data in it.
    let snapshot = dir.path().join("full.qcow2");
    check_consistent(&fault, &snapshot);
    assert!(qemu_raw(&snapshot)[..1 << 20] == first[..]);
    // Space comes back: the open image works again and ends up clean.
    fault.set_enospc_limit(None);
    img.write_at(&pattern(4096, 9), 7 << 20).unwrap();
    img.flush().unwrap();
    let mut back = vec![0u8; 1 << 20];
    img.read_at(&mut back, 0).unwrap();
    assert!(back == first);
    drop(img);
    check_consistent(&fault, &snapshot);
    let raw = qemu_raw(&snapshot);
    assert!(raw[..1 << 20] == first[..]);
    assert!(raw[7 << 20..(7 << 20) + 4096] == pattern(4096, 9)[..]);
}

/// A failing flush (EIO from fdatasync) is reported, keeps the metadata dirty, and the
/// next flush writes it all: nothing acknowledged is lost and the image ends up clean.
#[test]
fn failed_flush_is_reported_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let (fault, img) = image_on_fault_storage(4 << 20);
    let data = pattern(300_000, 5);
    img.write_at(&data, 100_000).unwrap();
    fault.fail_flush(1);
    let err = img
        .flush()
        .expect_err("the injected flush failure is reported");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    img.flush().unwrap();
    drop(img);
    let path = dir.path().join("flushed.qcow2");
    std::fs::write(&path, fault.content().unwrap()).unwrap();
    check_clean(&path);
    assert!(qemu_raw(&path)[100_000..400_000] == data[..]);
}

/// `direct` (O_DIRECT, cache=none) through a backing chain: unaligned writes and reads give
/// the same bytes as qemu-img sees, and the image stays clean.
#[test]
fn direct_io_chain_reads_and_writes_like_buffered() {
    // tmpfs has no O_DIRECT: use the build's target directory, which is on disk.
    let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "4M"]).0);
    qemu_io(&base, "qcow2", &["write -P 0x33 0 4M"]);
    let opts = Qcow2CreateOptions {
        size: 4 << 20,
        backing_file: Some("base.qcow2".into()),
        backing_format: Some("qcow2".into()),
        ..Default::default()
    };
    crate::lock::retry_while_locked(|| create_qcow2(&top, &opts)).unwrap();
    let mut model = vec![0x33u8; 4 << 20];
    {
        let direct = OpenOptions {
            direct: true,
            ..Default::default()
        };
        let img =
            crate::lock::retry_while_locked(|| crate::open::open_image(&top, &direct)).unwrap();
        let d = img.driver();
        let writes = [
            (1u64, 3usize),
            (70_000, 200_001),
            (1 << 20, 65536),
            (4_000_000, 190_000),
        ];
        for (i, (off, len)) in writes.into_iter().enumerate() {
            let data = pattern(len, i as u8 + 1);
            d.write_at(&data, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        d.flush().unwrap();
        let mut back = vec![0u8; 4 << 20];
        for (i, chunk) in back.chunks_mut(77_777).enumerate() {
            d.read_at(chunk, i as u64 * 77_777).unwrap();
        }
        assert!(back == model);
    }
    check_clean(&top);
    assert!(qemu_raw(&top) == model);
}
