//! vpc (VHD) against qemu-img and qemu-io: images qemu-img made and qemu-io wrote (dynamic
//! and fixed, odd sizes, `force_size`) read the same through `img` (`convert -O raw`,
//! `info`, `map`, `check`, `compare`, `dd`); images `img create` and `img convert -O vpc`
//! write are the ones qemu-img writes (`info`, `compare`, no more disk); random writes
//! through the engine read back by qemu-img as a model says.

use integration_tests::foreign::{
    convert_sources, qemu_io_random, qimg, read_only_commands_agree, round_trip, twin_writes_agree,
};
use integration_tests::twin::{Names, Pair, Twin};
use integration_tests::*;

/// (subformat options, size) of the images qemu-img makes for the read tests.
const SHAPES: &[(&str, &str)] = &[
    ("subformat=dynamic", "1"),
    ("subformat=dynamic", "5000000"),
    ("subformat=dynamic", "100M"),
    ("subformat=dynamic,force_size=on", "3000001"),
    ("subformat=dynamic", "2G"),
    ("subformat=fixed", "1"),
    ("subformat=fixed", "7340033"),
    ("subformat=fixed,force_size=on", "3000001"),
    ("subformat=fixed", "64M"),
];

#[test]
fn qemu_images_read_the_same() {
    let seed = seed(0x7663_0001);
    eprintln!("seed {seed:#x}");
    let mut rng = Rng::new(seed);
    let dir = tempdir();
    let mut f = Failures::new();
    for (i, (opts, size)) in SHAPES.iter().enumerate() {
        let file = format!("s{i}.vhd");
        qimg(
            dir.path(),
            &format!("create -q -f vpc -o {opts} {file} {size}"),
        );
        let virt = qemu_info_json(&dir.path().join(&file), &["-f", "vpc"])["virtual-size"]
            .as_u64()
            .unwrap();
        qemu_io_random(&dir.path().join(&file), "vpc", virt, &mut rng, 12);
        f.record(
            &format!("{opts} {size}"),
            read_only_commands_agree(dir.path(), &file, "vpc"),
        );
        // compare and dd against qemu-img, in the same directory.
        let raw = format!("s{i}.raw");
        qimg(dir.path(), &format!("convert -f vpc -O raw {file} {raw}"));
        let img = Tool::img();
        for args in [
            vec!["compare", "-f", "vpc", "-F", "raw", &file, &raw],
            vec!["compare", "-s", "-f", "vpc", "-F", "raw", &file, &raw],
        ] {
            let r = Pair::run(dir.path(), dir.path(), &img, &args)
                .compare(Names::Prefix, twin::verbatim);
            f.record(&format!("{opts} {size} {args:?}"), r);
        }
        let out = img.run(
            Some(dir.path()),
            &[
                "dd",
                "-f",
                "vpc",
                "-O",
                "raw",
                &format!("if={file}"),
                "of=dd.raw",
            ],
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

#[test]
fn img_create_makes_what_qemu_img_makes() {
    let twin = Twin::new(|_| {});
    let mut f = Failures::new();
    let cases: &[&[&str]] = &[
        &["create", "-f", "vpc", "n.vhd", "100M"],
        &["create", "-f", "vpc", "n.vhd", "1"],
        &["create", "-f", "vpc", "n.vhd", "0"],
        &["create", "-f", "vpc", "n.vhd", "1000001"],
        &["create", "-f", "vpc", "n.vhd", "2040G"],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "subformat=fixed",
            "n.vhd",
            "10M",
        ],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "subformat=fixed",
            "n.vhd",
            "3333333",
        ],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "force_size=on",
            "n.vhd",
            "1000001",
        ],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "force_size=on,subformat=fixed",
            "n.vhd",
            "1000001",
        ],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "subformat=fixed,force_size=off",
            "n.vhd",
            "50M",
        ],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "preallocation=full",
            "n.vhd",
            "5M",
        ],
        &["create", "-q", "-f", "vpc", "n.vhd", "5M"],
        // Refusals, word for word.
        &["create", "-f", "vpc", "n.vhd", "3000G"],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "force_size=on",
            "n.vhd",
            "3000G",
        ],
        &["create", "-f", "vpc", "-o", "subformat=foo", "n.vhd", "1M"],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "force_size=maybe",
            "n.vhd",
            "1M",
        ],
        &["create", "-f", "vpc", "n.vhd"],
        &["create", "-f", "vpc", "-b", "x", "-F", "raw", "n.vhd", "1M"],
        &["create", "-f", "vpc", "-o", "help"],
        &["create", "-f", "vpc", "-o", "help", "n.vhd"],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "preallocation=bogus",
            "n.vhd",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "preallocation=metadata",
            "n.vhd",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "preallocation=falloc",
            "n.vhd",
            "1M",
        ],
        &["convert", "-O", "vpc", "-o", "help", "n.vhd"],
        &["convert", "-O", "vpc", "-o", "help", "x.raw", "n.vhd"],
    ];
    for args in cases {
        f.record(
            &format!("{args:?}"),
            twin_writes_agree(&twin, args, "n.vhd", "vpc"),
        );
    }
    f.finish();
}

#[test]
fn img_convert_writes_what_qemu_img_writes() {
    let twin = convert_sources(0x7663_0002, 9_000_000, 5_000_000);
    let mut f = Failures::new();
    for source in ["a.qcow2", "b.raw"] {
        for opts in [
            "subformat=dynamic",
            "subformat=fixed",
            "force_size=on",
            "subformat=fixed,force_size=on",
        ] {
            let args = ["convert", "-O", "vpc", "-o", opts, source, "o.vhd"];
            f.record(
                &format!("{source} {opts}"),
                twin_writes_agree(&twin, &args, "o.vhd", "vpc"),
            );
        }
    }
    for source in ["a.qcow2", "b.raw"] {
        for args in [
            vec!["convert", "-S", "0", "-O", "vpc", source, "o.vhd"],
            vec!["convert", "-m", "16", "-W", "-O", "vpc", source, "o.vhd"],
            vec![
                "dd",
                "-O",
                "vpc",
                "bs=64k",
                &format!("if={source}"),
                "of=o.vhd",
            ],
        ] {
            f.record(
                &format!("{args:?}"),
                twin_writes_agree(&twin, &args, "o.vhd", "vpc"),
            );
        }
    }
    // Through vpc and back: both directions through img, then qemu-img.
    let back = round_trip(twin.img_dir(), &[("vpc", "x.vhd")]);
    f.record("qcow2 -> vpc -> qcow2", back);
    f.finish();
}

/// Seeded writes, zero writes and discards through the engine (dynamic and fixed, several
/// threads on disjoint ranges), then qemu-img reads what an in-memory model holds.
#[test]
fn engine_writes_read_by_qemu_as_the_model() {
    let seed = seed(0x7663_0003);
    eprintln!("seed {seed:#x}");
    let dir = tempdir();
    let mut f = Failures::new();
    for (n, sub) in ["dynamic", "fixed"].into_iter().enumerate() {
        let file = dir.path().join(format!("m{n}.vhd"));
        qimg(
            dir.path(),
            &format!("create -q -f vpc -o subformat={sub} m{n}.vhd 13M"),
        );
        let img = engine::open_with(&file, false, Some("vpc"), false).unwrap();
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
        let got = qemu_read_all(&file, Some("vpc"), dir.path());
        let r = match first_mismatch(&model, &got) {
            Some(m) => Err(format!("qemu-img reads other bytes: {m}")),
            None => Ok(()),
        };
        f.record(sub, r);
        // The image the engine wrote is still one qemu-img copies faithfully.
        let copy = dir.path().join(format!("q{n}.vhd"));
        qimg(
            dir.path(),
            &format!("convert -f vpc -O vpc -o subformat={sub} m{n}.vhd q{n}.vhd"),
        );
        let cmp = qemu_img(&["compare", "-f", "vpc", "-F", "vpc", s(&file), s(&copy)]);
        f.record(&format!("{sub} copy"), cmp.check().map(drop));
    }
    f.finish();
}
