//! vmdk against qemu-img and qemu-io: images qemu-img made in every subformat
//! (monolithicSparse with and without zeroed grains, streamOptimized, monolithicFlat,
//! twoGbMaxExtentSparse/Flat over several extents) and qemu-io wrote read the same through
//! `img` (`info` human/JSON with the extent child nodes, `map`, `check`, `compare`,
//! `convert -O raw`); `convert -O qcow2 -c` of a streamOptimized image equals qemu-img's;
//! `img convert -O vmdk -o subformat=streamOptimized` equals qemu-img's result;
//! a missing extent file is named as qemu-img names it; engine writes from several threads
//! (the same grains allocated at once) read by qemu-img as a model says, the CID renewed.

use integration_tests::foreign::{
    convert_sources, qemu_io_random, qimg, read_only_commands_agree, round_trip,
};
use integration_tests::twin::{Names, Pair, Twin};
use integration_tests::*;

/// (subformat, extra options, size) of the images qemu-img makes for the read tests.
const SHAPES: &[(&str, &str, &str)] = &[
    ("monolithicSparse", "", "1"),
    ("monolithicSparse", "", "5000001"),
    ("monolithicSparse", "", "100M"),
    ("monolithicSparse", "zeroed_grain=on", "33M"),
    ("monolithicSparse", "compat6=on", "7M"),
    ("monolithicFlat", "", "9000000"),
    ("twoGbMaxExtentSparse", "", "5G"),
    ("twoGbMaxExtentFlat", "", "40M"),
];

#[test]
fn qemu_images_read_the_same() {
    let seed = seed(0x766d_0001);
    eprintln!("seed {seed:#x}");
    let mut rng = Rng::new(seed);
    let mut f = Failures::new();
    for (i, (sub, extra, size)) in SHAPES.iter().enumerate() {
        // One directory per image: extent files are named after the descriptor.
        let dir = tempdir();
        let file = format!("s{i}.vmdk");
        let opts = if extra.is_empty() {
            format!("subformat={sub}")
        } else {
            format!("subformat={sub},{extra}")
        };
        qimg(
            dir.path(),
            &format!("create -q -f vmdk -o {opts} {file} {size}"),
        );
        let virt = qemu_info_json(&dir.path().join(&file), &[])["virtual-size"]
            .as_u64()
            .unwrap();
        // A big sparse image gets writes across its extent boundaries.
        let writes = if virt > 1 << 30 { 4 } else { 12 };
        qemu_io_random(&dir.path().join(&file), "vmdk", virt, &mut rng, writes);
        if virt > 1 << 31 {
            qemu_io_cmds(
                &dir.path().join(&file),
                "vmdk",
                &["write -P 9 2147418112 131072".to_string()],
            );
        }
        let what = format!("{opts} {size}");
        f.record(&what, read_only_commands_agree(dir.path(), &file, "vmdk"));
        let raw = format!("s{i}.raw");
        qimg(dir.path(), &format!("convert -O raw {file} {raw}"));
        let img = Tool::img();
        for args in [
            vec!["compare", &file, &raw],
            vec!["compare", "-s", "-f", "vmdk", "-F", "raw", &file, &raw],
            vec!["check", "-r", "all", &file],
        ] {
            let r = Pair::run(dir.path(), dir.path(), &img, &args)
                .compare(Names::Prefix, twin::verbatim);
            f.record(&format!("{what} {args:?}"), r);
        }
    }
    f.finish();
}

/// A streamOptimized image (the OVA format) qemu-img converted from a seeded half-full
/// source reads the same, and `convert -O qcow2 -c` of it equals qemu-img's result.
#[test]
fn stream_optimized_reads_and_converts_alike() {
    let seed = seed(0x766d_0002);
    eprintln!("seed {seed:#x}");
    let mut rng = Rng::new(seed);
    let src = tempdir();
    qimg(src.path(), "create -q -f raw src.raw 24M");
    qemu_io_random(&src.path().join("src.raw"), "raw", 24 << 20, &mut rng, 16);
    qimg(
        src.path(),
        "convert -O vmdk -o subformat=streamOptimized src.raw so.vmdk",
    );
    let mut f = Failures::new();
    f.record(
        "read-only commands",
        read_only_commands_agree(src.path(), "so.vmdk", "vmdk"),
    );
    let twin = Twin::copied_from(src.path());
    for args in [
        vec!["convert", "-O", "qcow2", "-c", "so.vmdk", "o.qcow2"],
        vec!["convert", "-O", "qcow2", "so.vmdk", "o.qcow2"],
    ] {
        let pair = twin.run(&args);
        let mut errs = pair.differences(Names::Prefix, twin::verbatim);
        let cmp = qemu_img(&[
            "compare",
            s(&twin.qemu_dir().join("o.qcow2")),
            s(&twin.img_dir().join("o.qcow2")),
        ]);
        if cmp.code != Some(0) {
            errs.push(cmp.report());
        }
        if let Err(e) = qemu_check(&twin.img_dir().join("o.qcow2")) {
            errs.push(e);
        }
        f.record(
            &format!("{args:?}"),
            if errs.is_empty() {
                Ok(())
            } else {
                Err(errs.join("\n"))
            },
        );
    }
    f.finish();
}

/// Descriptor files: extent names relative to the descriptor, absolute ones, a missing
/// extent file and malformed extent lines refused in qemu-img's words; a VMFS descriptor
/// with a flat extent reads as qemu-img reads it.
#[test]
fn descriptors_resolved_and_refused_alike() {
    let dir = tempdir();
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    qimg(d, "create -q -f raw sub/data.bin 3M");
    qemu_io_cmds(
        &d.join("sub/data.bin"),
        "raw",
        &["write -P 0x5a 100000 700000".to_string()],
    );
    let abs = d.join("sub/data.bin");
    let desc = |ct: &str, line: &str| {
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"{ct}\"\n\n# Extent description\n{line}\n"
        )
    };
    let cases = [
        (
            "rel.vmdk",
            desc("monolithicFlat", "RW 6144 FLAT \"data.bin\" 0"),
        ),
        ("vmfs.vmdk", desc("vmfs", "RW 4096 VMFS \"data.bin\"")),
        (
            "abs.vmdk",
            desc(
                "monolithicFlat",
                &format!("RW 2048 FLAT \"{}\" 2048", abs.display()),
            ),
        ),
        (
            "missing.vmdk",
            desc("monolithicFlat", "RW 6144 FLAT \"nope.bin\" 0"),
        ),
        (
            "badline.vmdk",
            desc("monolithicFlat", "RW 6144 FLAT \"data.bin\""),
        ),
        (
            "badtype.vmdk",
            desc("streamOptimized", "RW 6144 FLAT \"data.bin\" 0"),
        ),
        (
            "nocid.vmdk",
            desc("monolithicFlat", "RW 6144 FLAT \"data.bin\" 0").replace("CID=12345678\n", ""),
        ),
    ];
    let mut f = Failures::new();
    let img = Tool::img();
    for (name, text) in &cases {
        std::fs::write(d.join("sub").join(name), text).unwrap();
        let file = format!("sub/{name}");
        for args in [
            vec!["info", &file],
            vec!["info", "--output=json", &file],
            vec!["map", "--output=json", &file],
            vec!["check", &file],
        ] {
            let r = Pair::run(d, d, &img, &args)
                .compare(Names::Prefix, integration_tests::foreign::normalize_info);
            f.record(&format!("{name} {args:?}"), r);
        }
        let q = qemu_img(&[
            "convert",
            "-O",
            "raw",
            s(&d.join(&file)),
            s(&d.join("q.raw")),
        ]);
        let i = img.run(Some(d), &["convert", "-O", "raw", &file, "i.raw"]);
        if q.success() != i.success() {
            f.record(name, Err(format!("{}\n{}", q.report(), i.report())));
        } else if q.success() {
            let (a, b) = (
                std::fs::read(d.join("q.raw")).unwrap(),
                std::fs::read(d.join("i.raw")).unwrap(),
            );
            f.record(
                &format!("{name} convert"),
                first_mismatch(&a, &b).map_or(Ok(()), |m| Err(m.to_string())),
            );
        }
    }
    f.finish();
}

/// Writes through the engine from several threads, many of them into the same
/// unallocated grains at once, then qemu-img reads what a model holds, finds the image
/// clean, and no grain was allocated twice (the file holds one grain per guest grain
/// written at most).
#[test]
fn concurrent_engine_writes_read_by_qemu_as_the_model() {
    let seed = seed(0x766d_0003);
    eprintln!("seed {seed:#x}");
    let dir = tempdir();
    let file = dir.path().join("m.vmdk");
    qimg(dir.path(), "create -q -f vmdk m.vmdk 16M");
    let cid =
        |f: &std::path::Path| qemu_info_json(f, &[])["format-specific"]["data"]["cid"].clone();
    let cid_before = cid(&file);
    let img = engine::open_with(&file, false, Some("vmdk"), false).unwrap();
    let size = img.driver().size();
    let threads = 6u64;
    // Each thread writes its own 512-byte sector of every 64 KiB grain of one region,
    // so all threads allocate the same grains at the same time.
    let grains = 64u64;
    let pieces: Vec<Vec<(u64, Vec<u8>)>> = (0..threads)
        .map(|t| {
            let mut rng = Rng::new(seed ^ (t + 1));
            let mut ops: Vec<(u64, Vec<u8>)> = (0..grains)
                .map(|g| (g * 65536 + t * 512, rng.bytes(512)))
                .collect();
            // And some random writes into a thread's own slice of the rest.
            let slice = (size / 2) / threads / 512 * 512;
            for _ in 0..10 {
                let len = rng.range(1, 100_000).min(slice);
                let off = size / 2 + t * slice + rng.below(slice - len + 1);
                ops.push((off, rng.bytes(len as usize)));
            }
            ops
        })
        .collect();
    std::thread::scope(|s| {
        for ops in &pieces {
            let drv = img.driver();
            s.spawn(move || {
                for (off, data) in ops {
                    drv.write_at(data, *off).unwrap();
                }
            });
        }
    });
    let mut model = vec![0u8; size as usize];
    for ops in &pieces {
        for (off, data) in ops {
            model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
    }
    img.driver().flush().unwrap();
    drop(img);
    let mut f = Failures::new();
    // Like QEMU, the first write of an open gives the image a new CID.
    f.record(
        "new CID",
        if cid(&file) != cid_before {
            Ok(())
        } else {
            Err(format!("CID still {cid_before}"))
        },
    );
    let got = qemu_read_all(&file, Some("vmdk"), dir.path());
    f.record(
        "contents",
        first_mismatch(&model, &got).map_or(Ok(()), |m| Err(format!("qemu-img reads {m}"))),
    );
    f.record("check", qemu_check(&file));
    // Every guest grain written maps to its own host grain.
    let map = qemu_img(&["map", "--output=json", "-f", "vmdk", s(&file)]);
    let entries: serde_json::Value = serde_json::from_str(&map.stdout).unwrap();
    let mut hosts = Vec::new();
    for e in entries.as_array().unwrap() {
        if let Some(o) = e["offset"].as_u64() {
            let len = e["length"].as_u64().unwrap();
            hosts.extend((0..len / 65536).map(|k| o + k * 65536));
        }
    }
    let n = hosts.len();
    hosts.sort_unstable();
    hosts.dedup();
    f.record(
        "no grain shared",
        if hosts.len() == n {
            Ok(())
        } else {
            Err(format!("{} grains mapped twice", n - hosts.len()))
        },
    );
    let file_len = std::fs::metadata(&file).unwrap().len();
    let empty = {
        qimg(dir.path(), "create -q -f vmdk e.vmdk 16M");
        std::fs::metadata(dir.path().join("e.vmdk")).unwrap().len()
    };
    f.record(
        "one allocation per grain",
        if file_len <= empty + n as u64 * 65536 {
            Ok(())
        } else {
            Err(format!("file {file_len} bytes for {n} grains over {empty}"))
        },
    );
    f.finish();
}

#[test]
fn img_create_makes_what_qemu_img_makes() {
    let twin = Twin::new(|_| {});
    let mut f = Failures::new();
    let cases: &[&[&str]] = &[
        &["create", "-f", "vmdk", "n.vmdk", "100M"],
        &["create", "-f", "vmdk", "n.vmdk", "1"],
        &["create", "-f", "vmdk", "n.vmdk", "1000001"],
        &["create", "-f", "vmdk", "n.vmdk", "3T"],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicSparse",
            "n.vmdk",
            "7M",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "adapter_type=lsilogic",
            "n.vmdk",
            "10G",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "adapter_type=buslogic,hwversion=7",
            "n.vmdk",
            "1G",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "adapter_type=legacyESX,toolsversion=9",
            "n.vmdk",
            "1M",
        ],
        &["create", "-f", "vmdk", "-o", "compat6=on", "n.vmdk", "20M"],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "zeroed_grain=on",
            "n.vmdk",
            "20M",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "hwversion=undefined",
            "n.vmdk",
            "2M",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            "n.vmdk",
            "9M",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "subformat=twoGbMaxExtentSparse",
            "n.vmdk",
            "5G",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "subformat=twoGbMaxExtentFlat",
            "n.vmdk",
            "4100M",
        ],
        &["create", "-q", "-f", "vmdk", "n.vmdk", "5M"],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "n.vmdk",
            "30M",
        ],
        // Refusals, word for word.
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "adapter_type=scsi",
            "n.vmdk",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "subformat=bogus",
            "n.vmdk",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "compat6=on,hwversion=7",
            "n.vmdk",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat,zeroed_grain=on",
            "n.vmdk",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "backing_fmt=raw",
            "n.vmdk",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "compat6=maybe",
            "n.vmdk",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "preallocation=metadata",
            "n.vmdk",
            "1M",
        ],
        &["create", "-f", "vmdk", "n.vmdk"],
        &["create", "-f", "vmdk", "-o", "help"],
        &["create", "-f", "vmdk", "-o", "help", "n.vmdk"],
    ];
    for args in cases {
        f.record(
            &format!("{args:?}"),
            integration_tests::foreign::twin_writes_agree(&twin, args, "n.vmdk", "vmdk"),
        );
    }
    // An empty image, which QEMU then takes for a descriptor and refuses to open: the
    // same bytes, and the same refusal.
    let pair = twin.run(&["create", "-f", "vmdk", "z.vmdk", "0"]);
    f.record("size 0", pair.compare(Names::Prefix, twin::verbatim));
    let strip_cid = |p: &std::path::Path| {
        // The CID is random and printed without leading zeroes: drop its digits.
        let mut b = std::fs::read(p).unwrap();
        let at = b.windows(4).position(|w| w == b"CID=").unwrap() + 4;
        let n = b[at..].iter().position(|&c| c == b'\n').unwrap();
        b.drain(at..at + n);
        b
    };
    f.record(
        "size 0 bytes",
        match first_mismatch(
            &strip_cid(&twin.qemu_dir().join("z.vmdk")),
            &strip_cid(&twin.img_dir().join("z.vmdk")),
        ) {
            Some(m) => Err(m.to_string()),
            None => Ok(()),
        },
    );
    f.record(
        "size 0 info",
        twin.run(&["info", "z.vmdk"])
            .compare(Names::Prefix, twin::verbatim),
    );
    f.finish();
}

#[test]
fn img_convert_writes_what_qemu_img_writes() {
    let twin = convert_sources(0x766d_0004, 9_000_000, 5_000_000);
    let mut f = Failures::new();
    for source in ["a.qcow2", "b.raw"] {
        for opts in [
            "subformat=monolithicSparse",
            "zeroed_grain=on",
            "adapter_type=lsilogic,hwversion=8,toolsversion=1",
            "compat6=on",
            "subformat=monolithicFlat",
            "subformat=twoGbMaxExtentSparse",
        ] {
            let args = ["convert", "-O", "vmdk", "-o", opts, source, "o.vmdk"];
            f.record(
                &format!("{source} {opts}"),
                integration_tests::foreign::twin_writes_agree(&twin, &args, "o.vmdk", "vmdk"),
            );
        }
        // -c into a subformat that does not compress writes plainly, as QEMU does.
        let args = ["convert", "-c", "-O", "vmdk", source, "o.vmdk"];
        f.record(
            &format!("{args:?}"),
            integration_tests::foreign::twin_writes_agree(&twin, &args, "o.vmdk", "vmdk"),
        );
        let args = ["convert", "-m", "16", "-W", "-O", "vmdk", source, "o.vmdk"];
        f.record(
            &format!("{args:?}"),
            integration_tests::foreign::twin_writes_agree(&twin, &args, "o.vmdk", "vmdk"),
        );
    }
    // streamOptimized: the grains deflated apart from qemu-img's (another zlib), so the
    // files differ in length; the images are the same (contents, check, what info says
    // beyond the file length and CID), and img reads qemu-img's grains.
    for source in ["a.qcow2", "b.raw"] {
        for extra in [&[][..], &["-c"][..]] {
            let mut args = vec!["convert", "-O", "vmdk", "-o", "subformat=streamOptimized"];
            args.extend_from_slice(extra);
            args.extend_from_slice(&[source, "so.vmdk"]);
            let pair = twin.run(&args);
            let mut errs = pair.differences(Names::Prefix, twin::verbatim);
            let (q, i) = (
                twin.qemu_dir().join("so.vmdk"),
                twin.img_dir().join("so.vmdk"),
            );
            let cmp = qemu_img(&["compare", s(&q), s(&i)]);
            if cmp.code != Some(0) {
                errs.push(cmp.report());
            }
            if let Err(e) = qemu_check(&i) {
                errs.push(e);
            }
            let spec = |p: &std::path::Path| {
                let mut v = qemu_info_json(p, &[])["format-specific"].clone();
                v["data"]["cid"] = serde_json::Value::Null;
                v["data"]["extents"][0]["filename"] = serde_json::Value::Null;
                v
            };
            if spec(&q) != spec(&i) {
                errs.push(format!("info differs: {} vs {}", spec(&q), spec(&i)));
            }
            f.record(
                &format!("{args:?}"),
                if errs.is_empty() {
                    Ok(())
                } else {
                    Err(errs.join("\n"))
                },
            );
        }
    }
    f.record(
        "img's streamOptimized read alike",
        read_only_commands_agree(twin.img_dir(), "so.vmdk", "vmdk"),
    );
    // img's image read back by img the same as qemu-img reads it.
    let d = twin.img_dir();
    let back = round_trip(d, &[("vmdk", "x.vmdk")]);
    f.record("qcow2 -> vmdk -> qcow2", back);
    f.record(
        "img's vmdk read alike",
        read_only_commands_agree(d, "x.vmdk", "vmdk"),
    );
    f.finish();
}

/// Parent images (`parentFileNameHint`): an overlay qemu-img made over a vmdk reads the
/// same through `img` (info with the backing lines, map with the parent's depth, check,
/// convert); `img create -b` writes the descriptor qemu-img writes (parent CID and hint);
/// engine writes into part grains of an overlay copy the parent's bytes around them, as
/// qemu-img reads back; once the parent changed (new CID) reads of what the overlay lacks
/// fail as in qemu-img, and `-b` naming a non-vmdk is refused in its words.
#[test]
fn parent_images_read_and_write_alike() {
    let seed = seed(0x766d_0004);
    eprintln!("seed {seed:#x}");
    let mut rng = Rng::new(seed);
    let dir = tempdir();
    let d = dir.path();
    let size = 8u64 << 20;
    qimg(d, "create -q -f vmdk base.vmdk 8M");
    qemu_io_random(&d.join("base.vmdk"), "vmdk", size, &mut rng, 10);
    let mut f = Failures::new();
    for sub in ["monolithicSparse", "streamOptimized"] {
        let ov = format!("q-{sub}.vmdk");
        qimg(
            d,
            &format!("create -q -f vmdk -o subformat={sub} -b base.vmdk -F vmdk {ov}"),
        );
        if sub == "monolithicSparse" {
            qemu_io_random(&d.join(&ov), "vmdk", size, &mut rng, 6);
        }
        f.record(&ov, read_only_commands_agree(d, &ov, "vmdk"));
        let chain = Pair::run(d, d, &Tool::img(), &["info", "--backing-chain", &ov])
            .compare(Names::Prefix, integration_tests::foreign::normalize_info);
        f.record(&format!("{ov} --backing-chain"), chain);
    }
    // The descriptor img writes is qemu-img's but for the CID.
    let twin = Twin::copied_from(d);
    let create = [
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        "o.vmdk",
    ];
    let pair = twin.run(&create);
    let mut errs = pair.differences(Names::Prefix, twin::verbatim);
    let desc = |dir: &std::path::Path| {
        let b = std::fs::read(dir.join("o.vmdk")).unwrap();
        // Up to its NUL padding, whose length follows the CID's (random) digit count.
        let text = String::from_utf8_lossy(&b[0x200..0x400]).into_owned();
        text.trim_end_matches('\0')
            .lines()
            .filter(|l| !l.starts_with("CID="))
            .collect::<Vec<_>>()
            .join("\n")
    };
    if desc(twin.img_dir()) != desc(twin.qemu_dir()) {
        errs.push(format!(
            "descriptors differ:\n{}\n---\n{}",
            desc(twin.img_dir()),
            desc(twin.qemu_dir())
        ));
    }
    f.record(
        "create -b",
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("\n"))
        },
    );
    // Engine writes of part grains into img's overlay, read back by qemu-img.
    let ov = twin.img_dir().join("o.vmdk");
    let base_raw = twin.img_dir().join("base.raw");
    qimg(twin.img_dir(), "convert -O raw base.vmdk base.raw");
    let mut model = std::fs::read(&base_raw).unwrap();
    {
        let img = engine::open_with(&ov, false, Some("vmdk"), false).unwrap();
        for _ in 0..12 {
            let len = rng.range(1, 150_000);
            let off = rng.below(size - len + 1);
            let data = rng.bytes(len as usize);
            img.driver().write_at(&data, off).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        let z = rng.below(size - 70_000);
        img.driver().write_zeroes(z, 70_000, false).unwrap();
        model[z as usize..z as usize + 70_000].fill(0);
        img.driver().flush().unwrap();
    }
    let out = twin.img_dir().join("o.raw");
    let conv = qemu_img(&["convert", "-f", "vmdk", "-O", "raw", s(&ov), s(&out)]);
    f.record(
        "engine writes over a parent",
        ensure(conv.success(), || conv.report()).and_then(|()| {
            ensure(std::fs::read(&out).unwrap() == model, || {
                "qemu-img reads other bytes than were written over the parent".into()
            })
        }),
    );
    f.record("overlay check", qemu_check(&ov));
    // The parent changes: reading what the overlay lacks fails in both tools alike.
    qemu_io_cmds(
        &twin.img_dir().join("base.vmdk"),
        "vmdk",
        &["write -P 7 0 512".into()],
    );
    let q = qemu_img(&[
        "convert",
        "-O",
        "raw",
        s(&ov),
        s(&twin.img_dir().join("x.raw")),
    ]);
    let i = Tool::img().run(
        Some(twin.img_dir()),
        &["convert", "-O", "raw", "o.vmdk", "y.raw"],
    );
    f.record(
        "stale parent",
        ensure(!q.success() && i.code == q.code, || {
            format!("{}\n{}", q.report(), i.report())
        })
        .and_then(|()| ensure(i.stderr.contains("Invalid argument"), || i.report())),
    );
    // -b naming a raw file: qemu-img's refusals, with and without -F vmdk.
    qimg(twin.qemu_dir(), "create -q -f raw r.raw 1M");
    qimg(twin.img_dir(), "create -q -f raw r.raw 1M");
    for fmt in ["raw", "vmdk"] {
        let a = ["create", "-f", "vmdk", "-b", "r.raw", "-F", fmt, "n.vmdk"];
        f.record(
            &format!("-b r.raw -F {fmt}"),
            twin.run(&a).compare(Names::Prefix, twin::verbatim),
        );
    }
    f.finish();
}
