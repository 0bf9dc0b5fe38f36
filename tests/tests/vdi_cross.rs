//! vdi against qemu-img and qemu-io: images qemu-img made and qemu-io wrote (dynamic and
//! static, odd sizes) read the same through `img` (`convert -O raw`, `info`, `map`,
//! `check`, `compare`, `dd`); images `img create` and `img convert -O vdi` write are the ones
//! qemu-img writes (`info`, `compare`, `qemu-img check` clean, no more disk); random writes
//! through the engine read back by qemu-img as a model says; damaged maps checked alike.

use integration_tests::foreign::{
    convert_sources, qemu_io_random, qimg, read_only_commands_agree, round_trip, twin_writes_agree,
};
use integration_tests::twin::{Names, Pair, Twin};
use integration_tests::*;

/// (options, size) of the images qemu-img makes for the read tests.
const SHAPES: &[(&str, &str)] = &[
    ("static=off", "1"),
    ("static=off", "0"),
    ("static=off", "5000001"),
    ("static=off", "100M"),
    ("static=off", "2G"),
    ("static=on", "1"),
    ("static=on", "7340033"),
    ("static=on", "64M"),
];

#[test]
fn qemu_images_read_the_same() {
    let seed = seed(0x7664_0001);
    eprintln!("seed {seed:#x}");
    let mut rng = Rng::new(seed);
    let dir = tempdir();
    let mut f = Failures::new();
    for (i, (opts, size)) in SHAPES.iter().enumerate() {
        let file = format!("s{i}.vdi");
        qimg(
            dir.path(),
            &format!("create -q -f vdi -o {opts} {file} {size}"),
        );
        let virt = qemu_info_json(&dir.path().join(&file), &[])["virtual-size"]
            .as_u64()
            .unwrap();
        if virt > 0 {
            qemu_io_random(&dir.path().join(&file), "vdi", virt, &mut rng, 12);
        }
        f.record(
            &format!("{opts} {size}"),
            read_only_commands_agree(dir.path(), &file, "vdi"),
        );
        let img = Tool::img();
        for args in [
            vec!["check", &file],
            vec!["check", "--output=json", &file],
            vec!["check", "-r", "all", &file],
        ] {
            let r = Pair::run(dir.path(), dir.path(), &img, &args)
                .compare(Names::Prefix, twin::verbatim);
            f.record(&format!("{opts} {size} {args:?}"), r);
        }
        let raw = format!("s{i}.raw");
        qimg(dir.path(), &format!("convert -O raw {file} {raw}"));
        for args in [
            vec!["compare", &file, &raw],
            vec!["compare", "-s", "-f", "vdi", "-F", "raw", &file, &raw],
        ] {
            let r = Pair::run(dir.path(), dir.path(), &img, &args)
                .compare(Names::Prefix, twin::verbatim);
            f.record(&format!("{opts} {size} {args:?}"), r);
        }
        let out = img.run(
            Some(dir.path()),
            &["dd", "-O", "raw", &format!("if={file}"), "of=dd.raw"],
        );
        let r = if !out.success() {
            Err(out.report())
        } else {
            match first_mismatch(
                &std::fs::read(dir.path().join(&raw)).unwrap(),
                &std::fs::read(dir.path().join("dd.raw")).unwrap(),
            ) {
                Some(m) => Err(format!("dd differs: {m}")),
                None => Ok(()),
            }
        };
        f.record(&format!("{opts} {size} dd"), r);
        let _ = std::fs::remove_file(dir.path().join("dd.raw"));
    }
    f.finish();
}

/// A damaged block map: `img check` says what `qemu-img check` says, with its exit code.
#[test]
fn damaged_maps_checked_alike() {
    let dir = tempdir();
    qimg(dir.path(), "create -q -f vdi base.vdi 8M");
    qemu_io_random(
        &dir.path().join("base.vdi"),
        "vdi",
        8 << 20,
        &mut Rng::new(5),
        6,
    );
    let base = std::fs::read(dir.path().join("base.vdi")).unwrap();
    let e0 = u32::from_le_bytes(base[512..516].try_into().unwrap());
    let mut f = Failures::new();
    // (what, offset, little-endian value written there)
    let cases: [(&str, usize, u32); 4] = [
        ("entry past the blocks", 512 + 4, 4000),
        (
            "two entries, one block",
            512 + 28,
            if e0 == u32::MAX { 0 } else { e0 },
        ),
        ("count too high", 0x184, 100),
        ("discarded entry", 512 + 8, 0xffff_fffe),
    ];
    let img = Tool::img();
    for (name, at, v) in cases {
        let mut b = base.clone();
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        std::fs::write(dir.path().join("d.vdi"), &b).unwrap();
        for args in [
            vec!["check", "d.vdi"],
            vec!["check", "--output=json", "d.vdi"],
            vec!["check", "-q", "d.vdi"],
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
        &["create", "-f", "vdi", "n.vdi", "100M"],
        &["create", "-f", "vdi", "n.vdi", "1"],
        &["create", "-f", "vdi", "n.vdi", "0"],
        &["create", "-f", "vdi", "n.vdi", "1000001"],
        &["create", "-f", "vdi", "n.vdi", "2T"],
        &["create", "-f", "vdi", "-o", "static=on", "n.vdi", "10M"],
        &["create", "-f", "vdi", "-o", "static=on", "n.vdi", "3333333"],
        &["create", "-f", "vdi", "-o", "static=off", "n.vdi", "50M"],
        &[
            "create",
            "-f",
            "vdi",
            "-o",
            "preallocation=full",
            "n.vdi",
            "5M",
        ],
        &["create", "-q", "-f", "vdi", "n.vdi", "5M"],
        // Refusals, word for word.
        &["create", "-f", "vdi", "n.vdi", "5000T"],
        &["create", "-f", "vdi", "-o", "static=maybe", "n.vdi", "1M"],
        &[
            "create",
            "-f",
            "vdi",
            "-o",
            "subformat=fixed",
            "n.vdi",
            "1M",
        ],
        &["create", "-f", "vdi", "n.vdi"],
        &["create", "-f", "vdi", "-b", "x", "-F", "raw", "n.vdi", "1M"],
        &["create", "-f", "vdi", "-o", "help"],
        &["create", "-f", "vdi", "-o", "help", "n.vdi"],
        &[
            "create",
            "-f",
            "vdi",
            "-o",
            "preallocation=bogus",
            "n.vdi",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vdi",
            "-o",
            "preallocation=metadata",
            "n.vdi",
            "1M",
        ],
        &["convert", "-O", "vdi", "-o", "help", "n.vdi"],
        &["convert", "-O", "vdi", "-o", "help", "x.raw", "n.vdi"],
    ];
    for args in cases {
        f.record(
            &format!("{args:?}"),
            twin_writes_agree(&twin, args, "n.vdi", "vdi"),
        );
    }
    f.finish();
}

#[test]
fn img_convert_writes_what_qemu_img_writes() {
    let twin = convert_sources(0x7664_0002, 9_000_000, 5_000_000);
    let mut f = Failures::new();
    for source in ["a.qcow2", "b.raw"] {
        for opts in ["static=off", "static=on"] {
            let args = ["convert", "-O", "vdi", "-o", opts, source, "o.vdi"];
            f.record(
                &format!("{source} {opts}"),
                twin_writes_agree(&twin, &args, "o.vdi", "vdi"),
            );
        }
    }
    for source in ["a.qcow2", "b.raw"] {
        for args in [
            vec!["convert", "-S", "0", "-O", "vdi", source, "o.vdi"],
            vec!["convert", "-m", "16", "-W", "-O", "vdi", source, "o.vdi"],
            vec![
                "dd",
                "-O",
                "vdi",
                "bs=64k",
                &format!("if={source}"),
                "of=o.vdi",
            ],
        ] {
            f.record(
                &format!("{args:?}"),
                twin_writes_agree(&twin, &args, "o.vdi", "vdi"),
            );
        }
    }
    let back = round_trip(twin.img_dir(), &[("vdi", "x.vdi"), ("vpc", "x.vhd")]);
    f.record("qcow2 -> vdi -> vpc -> qcow2", back);
    f.finish();
}

/// Seeded writes, zero writes and discards through the engine (dynamic and static, several
/// threads on disjoint ranges), then qemu-img reads what an in-memory model holds and
/// finds the image clean.
#[test]
fn engine_writes_read_by_qemu_as_the_model() {
    let seed = seed(0x7664_0003);
    eprintln!("seed {seed:#x}");
    let dir = tempdir();
    let mut f = Failures::new();
    for (n, st) in ["off", "on"].into_iter().enumerate() {
        let file = dir.path().join(format!("m{n}.vdi"));
        qimg(
            dir.path(),
            &format!("create -q -f vdi -o static={st} m{n}.vdi 13M"),
        );
        let img = engine::open_with(&file, false, Some("vdi"), false).unwrap();
        let size = img.driver().size();
        let mut model = vec![0u8; size as usize];
        let threads = 4u64;
        let slice = size / threads / 512 * 512;
        let pieces: Vec<Vec<(u64, Vec<u8>, u8)>> = (0..threads)
            .map(|t| {
                let mut rng = Rng::new(seed ^ (t + 1) ^ (n as u64) << 32);
                (0..40)
                    .map(|_| {
                        let len = rng.range(1, 300_000).min(slice);
                        let off = t * slice + rng.below(slice - len + 1);
                        let kind = rng.below(4) as u8;
                        (off, rng.bytes(len as usize), kind)
                    })
                    .collect()
            })
            .collect();
        std::thread::scope(|s| {
            for ops in &pieces {
                let drv = img.driver();
                s.spawn(move || {
                    for (off, data, kind) in ops {
                        let len = data.len() as u64;
                        match kind {
                            0 => drv.write_zeroes(*off, len, false).unwrap(),
                            1 => drv.discard(*off, len).unwrap(),
                            _ => drv.write_at(data, *off).unwrap(),
                        }
                    }
                });
            }
        });
        for ops in &pieces {
            for (off, data, kind) in ops {
                let r = *off as usize..*off as usize + data.len();
                match kind {
                    0 | 1 => model[r].fill(0),
                    _ => model[r].copy_from_slice(data),
                }
            }
        }
        img.driver().flush().unwrap();
        drop(img);
        let got = qemu_read_all(&file, Some("vdi"), dir.path());
        let r = match first_mismatch(&model, &got) {
            Some(m) => Err(format!("qemu-img reads other bytes: {m}")),
            None => Ok(()),
        };
        f.record(&format!("static={st}"), r);
        f.record(&format!("static={st} check"), qemu_check(&file));
    }
    f.finish();
}
