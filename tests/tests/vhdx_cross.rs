//! vhdx against qemu-img and qemu-io: images qemu-img made (dynamic and fixed, every `-o`
//! option, odd sizes, BATs with sector bitmap entries between the payload entries) and
//! qemu-io wrote read the same through `img` (`convert -O raw`, `info`, `map`, `check`,
//! `compare`); images `img create` and `img convert -O vhdx` write are the ones qemu-img
//! writes (`info`, `compare`, `qemu-img check` clean, no more disk); engine writes from
//! several threads into the same unallocated blocks read by qemu-img as a model says; a
//! dirty log refused read-only and replayed by `check -r all` as qemu-img does.

use common::storage::{FileStorage, Storage};
use common::vhdx::header::Headers;
use common::vhdx::log::Log;
use integration_tests::foreign::{
    convert_sources, qemu_io_random, qimg, read_only_commands_agree, round_trip, twin_writes_agree,
};
use integration_tests::twin::{Names, Pair, Twin};
use integration_tests::*;

/// (options, size) of the images qemu-img makes for the read tests.
const SHAPES: &[(&str, &str)] = &[
    ("subformat=dynamic", "100M"),
    ("subformat=dynamic", "1"),
    ("subformat=dynamic", "0"),
    ("subformat=dynamic", "5000001"),
    ("block_size=1M", "40M"),
    // A chunk ratio of 4096 blocks: sector bitmap entries sit between the payload ones.
    ("block_size=1M", "4100M"),
    ("block_size=32M,log_size=4M", "200M"),
    ("block_state_zero=off", "30M"),
    ("subformat=fixed", "20M"),
    ("subformat=fixed,block_state_zero=off", "20M"),
    (
        "subformat=fixed,block_state_zero=off,block_size=2M",
        "7340033",
    ),
];

#[test]
fn qemu_images_read_the_same() {
    let seed = seed(0x7668_0001);
    eprintln!("seed {seed:#x}");
    let mut rng = Rng::new(seed);
    let dir = tempdir();
    let mut f = Failures::new();
    let img = Tool::img();
    for (i, (opts, size)) in SHAPES.iter().enumerate() {
        let file = format!("s{i}.vhdx");
        qimg(
            dir.path(),
            &format!("create -q -f vhdx -o {opts} {file} {size}"),
        );
        let path = dir.path().join(&file);
        let virt = qemu_info_json(&path, &[])["virtual-size"].as_u64().unwrap();
        if virt > 0 {
            qemu_io_random(&path, "vhdx", virt, &mut rng, 12);
        }
        if virt > 5 << 30 {
            // Blocks on both sides of the first sector bitmap entry.
            qemu_io_cmds(
                &path,
                "vhdx",
                &[
                    "write -P 0x61 4095M 2M".to_string(),
                    "write -P 0x62 4098M 1M".to_string(),
                ],
            );
        }
        f.record(
            &format!("{opts} {size}"),
            read_only_commands_agree(dir.path(), &file, "vhdx"),
        );
        for args in [
            vec!["check", "-r", "all", &file],
            vec!["check", "-r", "leaks", "--output=json", &file],
        ] {
            let r = Pair::run(dir.path(), dir.path(), &img, &args)
                .compare(Names::Prefix, twin::verbatim);
            f.record(&format!("{opts} {size} {args:?}"), r);
        }
        if virt < 1 << 30 {
            let raw = format!("s{i}.raw");
            qimg(dir.path(), &format!("convert -O raw {file} {raw}"));
            let args = ["compare", "-f", "vhdx", "-F", "raw", &file, &raw];
            let r = Pair::run(dir.path(), dir.path(), &img, &args)
                .compare(Names::Prefix, twin::verbatim);
            f.record(&format!("{opts} {size} {args:?}"), r);
            let _ = std::fs::remove_file(dir.path().join(raw));
        }
        let _ = std::fs::remove_file(path);
    }
    f.finish();
}

/// A change to an image's bytes.
type Edit = Box<dyn Fn(&mut Vec<u8>)>;

/// Damaged BATs (a block past the end of the file, a block over the BAT, a truncated
/// last block): `img check` says what `qemu-img check` says, with its exit code. (Other
/// opens refuse them: tests/hostile_images.rs.)
#[test]
fn damaged_bats_checked_alike() {
    let dir = tempdir();
    qimg(
        dir.path(),
        "create -q -f vhdx -o block_size=1M base.vhdx 10M",
    );
    qemu_io_cmds(
        &dir.path().join("base.vhdx"),
        "vhdx",
        &["write -P 1 0 3M".to_string()],
    );
    let base = std::fs::read(dir.path().join("base.vhdx")).unwrap();
    const BAT: usize = 2 << 20;
    let mut f = Failures::new();
    let edits: [(&str, Edit); 3] = [
        (
            "block past the end",
            Box::new(|b| b[BAT..BAT + 8].copy_from_slice(&((1u64 << 40) | 6).to_le_bytes())),
        ),
        (
            "block over the BAT",
            Box::new(|b| b[BAT + 8..BAT + 16].copy_from_slice(&((2u64 << 20) | 6).to_le_bytes())),
        ),
        (
            "last block cut short",
            Box::new(|b| b.truncate(b.len() - 4096)),
        ),
    ];
    let img = Tool::img();
    for (name, edit) in &edits {
        let mut b = base.clone();
        edit(&mut b);
        std::fs::write(dir.path().join("d.vhdx"), &b).unwrap();
        for args in [
            vec!["check", "d.vhdx"],
            vec!["check", "--output=json", "d.vhdx"],
            vec!["check", "-r", "all", "d.vhdx"],
        ] {
            let r = Pair::run(dir.path(), dir.path(), &img, &args)
                .compare(Names::Prefix, twin::verbatim);
            f.record(&format!("{name} {args:?}"), r);
        }
    }
    f.finish();
}

#[test]
fn img_create_makes_what_qemu_img_makes() {
    let twin = Twin::new(|_| {});
    let mut f = Failures::new();
    let cases: &[&[&str]] = &[
        &["create", "-f", "vhdx", "n.vhdx", "100M"],
        &["create", "-f", "vhdx", "n.vhdx", "0"],
        &["create", "-f", "vhdx", "n.vhdx", "1"],
        &["create", "-f", "vhdx", "n.vhdx", "1000001"],
        &["create", "-f", "vhdx", "n.vhdx", "3G"],
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "subformat=fixed",
            "n.vhdx",
            "10M",
        ],
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "subformat=fixed,block_state_zero=off",
            "n.vhdx",
            "3333333",
        ],
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M,log_size=2M",
            "n.vhdx",
            "50M",
        ],
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "block_size=300M,log_size=1",
            "n.vhdx",
            "5M",
        ],
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "block_state_zero=off",
            "n.vhdx",
            "5M",
        ],
        &["create", "-q", "-f", "vhdx", "n.vhdx", "5M"],
        // Refusals, word for word.
        &["create", "-f", "vhdx", "n.vhdx", "65T"],
        &["create", "-f", "vhdx", "-o", "log_size=0", "n.vhdx", "1M"],
        &["create", "-f", "vhdx", "-o", "log_size=5G", "n.vhdx", "1M"],
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "block_size=3M",
            "n.vhdx",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "subformat=differencing",
            "n.vhdx",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "block_state_zero=maybe",
            "n.vhdx",
            "1M",
        ],
        &["create", "-f", "vhdx", "n.vhdx"],
        &["create", "-f", "vhdx", "-o", "help"],
        &["create", "-f", "vhdx", "-o", "help", "n.vhdx"],
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "preallocation=metadata",
            "n.vhdx",
            "1M",
        ],
    ];
    for args in cases {
        f.record(
            &format!("{args:?}"),
            twin_writes_agree(&twin, args, "n.vhdx", "vhdx"),
        );
    }
    // Sizes too large to compare: the block size picked for them (32 MiB past 100 GiB,
    // 64 MiB past 32 TiB) and the file laid out alike.
    for size in ["200G", "33T"] {
        let pair = twin.run(&["create", "-q", "-f", "vhdx", "n.vhdx", size]);
        let mut errs = pair.differences(Names::Prefix, twin::verbatim);
        let info = |d: &std::path::Path| {
            let v = qemu_info_json(&d.join("n.vhdx"), &[]);
            (
                v["cluster-size"].clone(),
                v["children"][0]["info"]["virtual-size"].clone(),
            )
        };
        let (q, i) = (info(twin.qemu_dir()), info(twin.img_dir()));
        if q != i {
            errs.push(format!(
                "qemu-img's (block size, file length) {q:?}, img's {i:?}"
            ));
        }
        twin.remove("n.vhdx");
        f.record(size, pair.verdict(errs));
    }
    f.finish();
}

#[test]
fn img_convert_writes_what_qemu_img_writes() {
    let twin = convert_sources(0x7668_0002, 29_000_000, 15_000_000);
    let mut f = Failures::new();
    for source in ["a.qcow2", "b.raw"] {
        for opts in [
            "subformat=dynamic",
            "subformat=fixed",
            "block_size=1M",
            "block_state_zero=off",
            "subformat=fixed,block_state_zero=off",
            "log_size=3M,block_size=4M",
        ] {
            let args = ["convert", "-O", "vhdx", "-o", opts, source, "o.vhdx"];
            f.record(
                &format!("{source} {opts}"),
                twin_writes_agree(&twin, &args, "o.vhdx", "vhdx"),
            );
        }
    }
    for source in ["a.qcow2", "b.raw"] {
        let args = ["convert", "-m", "16", "-W", "-O", "vhdx", source, "o.vhdx"];
        let pair = twin.run(&args);
        let mut errs = pair.differences(Names::Prefix, twin::verbatim);
        // Out-of-order writes place blocks in the order they come: compare contents only.
        let (ours, theirs) = (
            twin.img_dir().join("o.vhdx"),
            twin.qemu_dir().join("o.vhdx"),
        );
        let cmp = qemu_img(&["compare", s(&theirs), s(&ours)]);
        if cmp.code != Some(0) {
            errs.push(cmp.report());
        }
        errs.extend(qemu_check(&ours).err());
        twin.remove("o.vhdx");
        f.record(&format!("{args:?}"), pair.verdict(errs));
    }
    let back = round_trip(twin.img_dir(), &[("vhdx", "x.vhdx")]);
    f.record("qcow2 -> vhdx -> qcow2", back);
    f.finish();
}

/// Writes through the engine from several threads, many of them into the same
/// unallocated blocks at once, then qemu-img reads what a model holds, finds the image
/// clean, and no block was allocated twice (the file grew by one block per guest block
/// written).
#[test]
fn concurrent_engine_writes_read_by_qemu_as_the_model() {
    let seed = seed(0x7668_0003);
    eprintln!("seed {seed:#x}");
    let dir = tempdir();
    let file = dir.path().join("m.vhdx");
    qimg(dir.path(), "create -q -f vhdx -o block_size=1M m.vhdx 24M");
    let empty_len = std::fs::metadata(&file).unwrap().len();
    let img = engine::open_with(&file, false, Some("vhdx"), false).unwrap();
    let size = img.driver().size();
    let threads = 6u64;
    // Each thread writes its own 512-byte sector of every block of the first half, so all
    // threads allocate the same blocks at the same time; zero writes in between.
    let blocks = 12u64;
    let pieces: Vec<Vec<(u64, Vec<u8>, bool)>> = (0..threads)
        .map(|t| {
            let mut rng = Rng::new(seed ^ (t + 1));
            let mut ops: Vec<(u64, Vec<u8>, bool)> = (0..blocks)
                .map(|b| ((b << 20) + t * 512, rng.bytes(512), false))
                .collect();
            let slice = (size / 2) / threads / 512 * 512;
            for _ in 0..10 {
                let len = rng.range(1, 300_000).min(slice);
                let off = size / 2 + t * slice + rng.below(slice - len + 1);
                ops.push((off, rng.bytes(len as usize), rng.chance(1, 4)));
            }
            ops
        })
        .collect();
    std::thread::scope(|s| {
        for ops in &pieces {
            let drv = img.driver();
            s.spawn(move || {
                for (off, data, zero) in ops {
                    if *zero {
                        drv.write_zeroes(*off, data.len() as u64, false).unwrap();
                    } else {
                        drv.write_at(data, *off).unwrap();
                    }
                }
            });
        }
    });
    let mut model = vec![0u8; size as usize];
    for ops in &pieces {
        for (off, data, zero) in ops {
            let r = *off as usize..*off as usize + data.len();
            if *zero {
                model[r].fill(0);
            } else {
                model[r].copy_from_slice(data);
            }
        }
    }
    img.driver().flush().unwrap();
    drop(img);
    let mut f = Failures::new();
    let got = qemu_read_all(&file, Some("vhdx"), dir.path());
    f.record(
        "contents",
        first_mismatch(&model, &got).map_or(Ok(()), |m| Err(format!("qemu-img reads {m}"))),
    );
    f.record("check", qemu_check(&file));
    let written: std::collections::BTreeSet<u64> = pieces
        .iter()
        .flatten()
        .filter(|(_, _, zero)| !zero)
        .flat_map(|(off, data, _)| (off >> 20)..=((off + data.len() as u64 - 1) >> 20))
        .collect();
    let file_len = std::fs::metadata(&file).unwrap().len();
    let most = empty_len.next_multiple_of(1 << 20) + written.len() as u64 * (1 << 20);
    f.record(
        "one allocation per block",
        if file_len <= most {
            Ok(())
        } else {
            Err(format!(
                "file {file_len} bytes, at most {most} for {} blocks",
                written.len()
            ))
        },
    );
    f.finish();
}

/// Leave the image at `path` as a crash after QEMU's log write would: `page` for file
/// offset `at` in a log entry that was never replayed, the headers naming its log.
fn leave_dirty(path: &std::path::Path, at: u64, page: &[u8]) {
    let file = common::storage::open_image_file(path, false).unwrap();
    let st = FileStorage::new(file);
    let mut headers = Headers::load(&st).unwrap();
    let h = headers.current().clone();
    let guid = *b"dirty-log-guid!!";
    headers.update(&st, false, Some(guid)).unwrap();
    let mut log = Log::new(h.log_offset, u64::from(h.log_length));
    log.write_entry(&st, at, page, st.len().unwrap(), &guid)
        .unwrap();
    st.flush().unwrap();
}

/// A BAT update left in the log (written by the engine's log writer, read by QEMU's log
/// replay): `info` refuses the read-only open in qemu-img's words, `check -r all`
/// replays it with qemu-img's report, and both then read the data the entry restored.
#[test]
fn dirty_log_replayed_as_qemu_does() {
    let src = tempdir();
    qimg(src.path(), "create -q -f vhdx d.vhdx 16M");
    let path = src.path().join("d.vhdx");
    qemu_io_cmds(&path, "vhdx", &["write -P 0x5a 0 1M".to_string()]);
    let mut b = std::fs::read(&path).unwrap();
    // The BAT lies at 2 MiB behind the 1 MiB log: keep its first page, undo entry 0.
    let bat = 2usize << 20;
    let page = b[bat..bat + 4096].to_vec();
    assert_eq!(page[0] & 7, 6, "qemu-io allocated block 0");
    b[bat..bat + 8].copy_from_slice(&2u64.to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    leave_dirty(&path, bat as u64, &page);
    let twin = Twin::copied_from(src.path());
    let mut f = Failures::new();
    for args in [
        vec!["info", "d.vhdx"],
        vec!["check", "d.vhdx"],
        vec!["check", "-r", "all", "d.vhdx"],
        vec!["check", "d.vhdx"],
        vec!["convert", "-O", "raw", "d.vhdx", "d.raw"],
    ] {
        f.record(
            &format!("{args:?}"),
            twin.run(&args).compare(Names::Prefix, twin::verbatim),
        );
    }
    let data = std::fs::read(twin.img_dir().join("d.raw")).unwrap_or_default();
    f.record(
        "replayed data",
        if data.len() == 16 << 20 && data[..1 << 20].iter().all(|&x| x == 0x5a) {
            Ok(())
        } else {
            Err("the first MiB is not what the log restored".into())
        },
    );
    f.finish();
}
