//! `img convert` against `qemu-img convert`.
//!
//! Every case runs the same arguments through both tools in twin directories (same
//! sources, made by qemu-img and qemu-io) and checks: exit code, stdout and stderr are
//! qemu-img's; on success img's output passes `qemu-img check`, reports the same `info` as
//! qemu-img's output, reads identically (`qemu-img compare`) to qemu-img's output and to
//! the source, and `qemu-img map` shows no data where the source has none (with `-B`:
//! where the source's top layer has none). Sources include qemu-img's compressed images
//! (zlib and zstd), and qemu-img reads what `img convert -c` writes.

use std::path::Path;

use integration_tests::twin::{map_json, verbatim, Images, Names, Twin};
use integration_tests::*;

/// Guest size of the generated sources.
const SIZE: u64 = 6 << 20;

/// A raw source: random data, text-like data, a 5000-byte period (beyond a 4 KiB
/// deflate window), explicit zero blocks and holes.
fn raw_source(d: &Path, name: &str, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut data = vec![0u8; SIZE as usize];
    rng.fill(&mut data[..1 << 20]);
    for (i, b) in data[(1 << 20)..(2 << 20)].iter_mut().enumerate() {
        *b = b"the quick brown fox jumps over the lazy dog "[i % 44];
    }
    let period = rng.bytes(5000);
    for (i, b) in data[(3 << 20)..(4 << 20)].iter_mut().enumerate() {
        *b = period[i % 5000];
    }
    rng.fill(&mut data[(5 << 20) + 4096..(5 << 20) + 70000]);
    std::fs::write(d.join(name), &data).unwrap();
    // Holes: punch the zero ranges out of the file.
    qemu_io_cmds(
        &d.join(name),
        "raw",
        &[
            "write -z -u 2M 1M".into(),
            "write -z -u 4M 1M".into(),
            "write -z -u 5632k 512k".into(),
        ],
    );
}

/// The sources every twin directory starts with.
fn env() -> Twin {
    Twin::new(|d| {
        raw_source(d, "src.raw", 1);
        let q = |args: &[&str]| {
            qemu_img_in(d, args).ok();
        };
        for (name, opts) in [
            ("c512.qcow2", "cluster_size=512"),
            ("c64k.qcow2", "cluster_size=64k"),
            ("c2m.qcow2", "cluster_size=2M"),
            ("xl2.qcow2", "extended_l2=on,cluster_size=64k"),
        ] {
            q(&["convert", "-O", "qcow2", "-o", opts, "src.raw", name]);
            qemu_io_cmds(
                &d.join(name),
                "qcow2",
                &[
                    "write -z 128k 64k".into(),
                    "discard 1M 64k".into(),
                    "write -P 0x11 4100k 3k".into(),
                ],
            );
        }
        q(&["convert", "-c", "-O", "qcow2", "src.raw", "zlib.qcow2"]);
        q(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "src.raw",
            "zstd.qcow2",
        ]);
        // A chain: base <- mid <- top, each layer with its own writes.
        q(&["convert", "-O", "qcow2", "src.raw", "base.qcow2"]);
        q(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
        ]);
        q(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ]);
        qemu_io_cmds(
            &d.join("mid.qcow2"),
            "qcow2",
            &["write -P 0x22 2M 200k".into(), "write -z 0 64k".into()],
        );
        qemu_io_cmds(
            &d.join("top.qcow2"),
            "qcow2",
            &[
                "write -P 0x33 2100k 64k".into(),
                "write -z 512k 128k".into(),
                "write -c -P 0x44 3M 64k".into(),
            ],
        );
        // An overlay of base only, for -B base.qcow2.
        q(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ov.qcow2",
        ]);
        qemu_io_cmds(
            &d.join("ov.qcow2"),
            "qcow2",
            &[
                "write -P 0x55 64k 128k".into(),
                "write -z 1M 64k".into(),
                "write -P 0 5M 64k".into(),
            ],
        );
    })
}

/// Data extents of a `qemu-img map --output=json` (only those at `depth` 0 if `top_only`).
fn data_extents(map: &serde_json::Value, top_only: bool) -> Vec<(u64, u64)> {
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"].as_bool() == Some(true))
        .filter(|e| !top_only || e["depth"].as_u64() == Some(0))
        .map(|e| {
            let s = e["start"].as_u64().unwrap();
            (s, s + e["length"].as_u64().unwrap())
        })
        .collect()
}

/// No data in img's `out` where neither `src` nor qemu-img's `out` has any, at the
/// output's allocation granularity `grain` (raw outputs of both tools start with one
/// allocated block, as QEMU writes it).
fn sparse_check(
    twin: &Twin,
    src: &str,
    out: &str,
    grain: u64,
    top_only: bool,
) -> Result<(), String> {
    let mut allowed = data_extents(&map_json(twin.img_dir(), src)?, top_only);
    allowed.extend(data_extents(&map_json(twin.qemu_dir(), out)?, true));
    for (s, e) in data_extents(&map_json(twin.img_dir(), out)?, true) {
        let mut g = s / grain * grain;
        while g < e {
            let covered = allowed.iter().any(|&(a, b)| a < g + grain && b > g);
            ensure(covered, || {
                let (gs, ge) = (g.max(s), (g + grain).min(e));
                format!("{out} has data at {gs:#x}..{ge:#x} where {src} has none")
            })?;
            g += grain;
        }
    }
    Ok(())
}

/// Whether every byte of `out` is data (`-S 0` output).
fn fully_allocated(dir: &Path, out: &str, size: u64) -> Result<(), String> {
    let data: u64 = data_extents(&map_json(dir, out)?, false)
        .iter()
        .map(|(s, e)| e - s)
        .sum();
    ensure(data == size, || {
        format!("{out}: {data} of {size} bytes allocated with -S 0")
    })
}

/// `qemu-img compare A B` in `dir` says identical.
fn identical(dir: &Path, a: &str, b: &str) -> Result<(), String> {
    let out = qemu_img_in(dir, &["compare", "-U", a, b]);
    ensure(out.code == Some(0), || {
        format!("{a} and {b} differ:\n{}", out.report())
    })
}

/// One convert case and what to check on success.
struct Case {
    args: Vec<String>,
    /// The source to compare against (and check sparseness against), if one.
    src: Option<String>,
    out: String,
    /// Allocation granularity of the output.
    grain: u64,
    /// The output has a backing file: only the source's top layer is copied.
    top_only: bool,
    sparse_off: bool,
}

fn run_case(twin: &Twin, c: &Case) -> Result<(), String> {
    let pair = twin.run(&c.args);
    let mut errs = pair.differences(Names::Prefix, verbatim);
    if pair.both_succeeded() {
        errs.extend(twin.compare_images(&c.out, Images::default()).err());
        let d = twin.img_dir();
        if let Some(src) = &c.src {
            errs.extend(identical(d, src, &c.out).err());
            if c.sparse_off {
                if !c.out.ends_with(".raw") {
                    errs.extend(fully_allocated(d, &c.out, SIZE).err());
                }
            } else {
                errs.extend(sparse_check(twin, src, &c.out, c.grain, c.top_only).err());
            }
        }
    }
    twin.remove(&c.out);
    pair.verdict(errs)
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

const SOURCES: &[&str] = &[
    "src.raw",
    "c512.qcow2",
    "c64k.qcow2",
    "c2m.qcow2",
    "xl2.qcow2",
    "zlib.qcow2",
    "zstd.qcow2",
    "top.qcow2",
];

/// Every source into raw and qcow2, with cluster sizes, extended L2, compression, -S 0,
/// -W, -m.
#[test]
fn formats_and_options() {
    let twin = env();
    let mut f = Failures::new();
    let variants: &[(&str, &[&str], u64)] = &[
        ("raw", &[], 4096),
        ("raw", &["-S", "0"], 4096),
        ("raw", &["-W", "-m", "16"], 4096),
        ("qcow2", &[], 65536),
        ("qcow2", &["-o", "cluster_size=512"], 4096),
        ("qcow2", &["-o", "cluster_size=2M"], 2 << 20),
        ("qcow2", &["-o", "extended_l2=on"], 65536),
        ("qcow2", &["-S", "0"], 65536),
        ("qcow2", &["-c"], 65536),
        ("qcow2", &["-c", "-W", "-m", "3"], 65536),
        (
            "qcow2",
            &["-c", "-o", "compression_type=zstd,cluster_size=512"],
            512,
        ),
        ("qcow2", &["-c", "-o", "cluster_size=2M"], 2 << 20),
    ];
    for src in SOURCES {
        for (fmt, extra, grain) in variants {
            let out = format!("out.{fmt}");
            let mut a = args(&["convert", "-O", fmt]);
            a.extend(args(extra));
            a.extend([src.to_string(), out.clone()]);
            let name = a.join(" ");
            let c = Case {
                args: a,
                src: Some(src.to_string()),
                out,
                grain: *grain,
                top_only: false,
                sparse_off: extra.contains(&"0"),
            };
            f.record(&name, run_case(&twin, &c));
        }
    }
    f.finish();
}

/// -B targets: only what the source's top layer has is written; several sources; -n into
/// an existing image, with and without --target-is-zero.
#[test]
fn backing_several_sources_and_existing_targets() {
    let twin = env();
    let mut f = Failures::new();
    for extra in [&[][..], &["-c"], &["-o", "cluster_size=512"]] {
        let mut a = args(&["convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"]);
        a.extend(args(extra));
        a.extend(args(&["ov.qcow2", "new.qcow2"]));
        let c = Case {
            src: Some("ov.qcow2".into()),
            out: "new.qcow2".into(),
            grain: if extra.is_empty() || extra[0] == "-c" {
                65536
            } else {
                512
            },
            top_only: true,
            sparse_off: false,
            args: a,
        };
        f.record(&c.args.join(" "), run_case(&twin, &c));
    }
    let c = Case {
        args: args(&[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "backing_file=base.qcow2,backing_fmt=qcow2",
            "ov.qcow2",
            "new.qcow2",
        ]),
        src: Some("ov.qcow2".into()),
        out: "new.qcow2".into(),
        grain: 65536,
        top_only: true,
        sparse_off: false,
    };
    f.record(&c.args.join(" "), run_case(&twin, &c));
    for extra in [&[][..], &["-c"]] {
        for fmt in ["raw", "qcow2"] {
            if fmt == "raw" && !extra.is_empty() {
                continue;
            }
            let out = format!("cat.{fmt}");
            let mut a = args(&["convert", "-O", fmt]);
            a.extend(args(extra));
            a.extend(args(&["src.raw", "zlib.qcow2", "top.qcow2", &out]));
            let pair = twin.run(&a);
            let mut errs = pair.differences(Names::Prefix, verbatim);
            if pair.both_succeeded() {
                errs.extend(twin.compare_images(&out, Images::default()).err());
            }
            twin.remove(&out);
            f.record(&a.join(" "), pair.verdict(errs));
        }
    }
    // -n: the existing target holds data everywhere, so zeroes must be written.
    for (fmt, extra) in [
        ("qcow2", &[][..]),
        ("raw", &[]),
        // (-c is left out: qemu-img fails with EIO on a compressed write to an allocated
        // cluster, img writes it.)
        ("qcow2", &["-S", "0"]),
    ] {
        let out = format!("existing.{fmt}");
        for d in [twin.qemu_dir(), twin.img_dir()] {
            qemu_img_in(d, &["create", "-q", "-f", fmt, &out, "8M"]).ok();
            qemu_io_cmds(&d.join(&out), fmt, &["write -P 0x77 0 8M".into()]);
        }
        let mut a = args(&["convert", "-n", "-O", fmt]);
        a.extend(args(extra));
        a.extend(args(&["c64k.qcow2", &out]));
        let pair = twin.run(&a);
        let mut errs = pair.differences(Names::Prefix, verbatim);
        if pair.both_succeeded() {
            errs.extend(twin.compare_images(&out, Images::default()).err());
            let o = qemu_img_in(twin.img_dir(), &["compare", "-U", "c64k.qcow2", &out]);
            // The target is larger than the source: compare says so, and exits 0 only
            // when the extra part reads as zeroes, which it does not here.
            errs.extend(
                ensure(
                    o.stdout.contains("Content mismatch") || o.code == Some(0),
                    || o.report(),
                )
                .err(),
            );
        }
        twin.remove(&out);
        f.record(&a.join(" "), pair.verdict(errs));
    }
    // --target-is-zero into a fresh, zeroed target.
    for d in [twin.qemu_dir(), twin.img_dir()] {
        qemu_img_in(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "fresh.qcow2",
                &SIZE.to_string(),
            ],
        )
        .ok();
    }
    let c = Case {
        args: args(&[
            "convert",
            "-n",
            "--target-is-zero",
            "-O",
            "qcow2",
            "c64k.qcow2",
            "fresh.qcow2",
        ]),
        src: Some("c64k.qcow2".into()),
        out: "fresh.qcow2".into(),
        grain: 65536,
        top_only: false,
        sparse_off: false,
    };
    f.record(&c.args.join(" "), run_case(&twin, &c));
    f.finish();
}

/// Bad combinations and missing files fail with qemu-img's exit code and words.
#[test]
fn errors_match_qemu() {
    let twin = env();
    let mut f = Failures::new();
    let cases: &[&[&str]] = &[
        &["convert"],
        &["convert", "src.raw"],
        &[
            "convert",
            "-n",
            "-o",
            "cluster_size=4k",
            "src.raw",
            "o.qcow2",
        ],
        &[
            "convert",
            "-O",
            "raw",
            "-B",
            "base.qcow2",
            "src.raw",
            "o.raw",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "src.raw",
            "o.qcow2",
        ],
        &["convert", "-c", "-O", "raw", "src.raw", "o.raw"],
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "preallocation=full",
            "src.raw",
            "o.qcow2",
        ],
        &["convert", "missing.raw", "o.raw"],
        &["convert", "-f", "bogus", "src.raw", "o.raw"],
        &["convert", "-f", "qcow2", "src.raw", "o.raw"],
        &["convert", "-O", "bogus", "src.raw", "o.raw"],
        &["convert", "--target-is-zero", "src.raw", "o.raw"],
        &["convert", "-C", "-c", "-O", "qcow2", "src.raw", "o.qcow2"],
        &["convert", "-C", "-S", "4k", "src.raw", "o.raw"],
        &["convert", "-C", "--salvage", "src.raw", "o.raw"],
        &["convert", "-r", "x", "src.raw", "o.raw"],
        &["convert", "-r", "-1", "src.raw", "o.raw"],
        &[
            "convert",
            "-n",
            "--target-is-zero",
            "-B",
            "base.qcow2",
            "-O",
            "qcow2",
            "src.raw",
            "o.qcow2",
        ],
        &["convert", "-n", "src.raw", "missing.raw"],
        &["convert", "-n", "-O", "qcow2", "src.raw", "mid.qcow2"],
        &["convert", "-n", "-O", "qcow2", "src.raw", "zlib.qcow2"],
        &[
            "convert", "-O", "qcow2", "-B", "nonexist", "-F", "raw", "src.raw", "o.qcow2",
        ],
        &["convert", "-F", "raw", "src.raw", "o.raw"],
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "src.raw",
            "top.qcow2",
            "o.qcow2",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "backing_file=base.qcow2",
            "src.raw",
            "o.qcow2",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=3000",
            "src.raw",
            "o.qcow2",
        ],
        &[
            "convert", "-O", "qcow2", "-o", "bogus=1", "src.raw", "o.qcow2",
        ],
        &["convert", "-o", ",", "src.raw", "o.raw"],
        &["convert", "-m", "0", "src.raw", "o.raw"],
        &["convert", "-m", "17", "src.raw", "o.raw"],
        &["convert", "-m", "x", "src.raw", "o.raw"],
        &["convert", "-S", "x", "src.raw", "o.raw"],
        &["convert", "-S", "100", "src.raw", "o.raw"],
        &["convert", "-S", "-1", "src.raw", "o.raw"],
        &["convert", "-t", "bogus", "src.raw", "o.raw"],
        &["convert", "-T", "bogus", "src.raw", "o.raw"],
        &["convert", "-O", "qcow2", "src.raw", "src.raw"],
    ];
    for a in cases {
        let pair = twin.run(a);
        twin.remove("o.raw");
        twin.remove("o.qcow2");
        f.record(&a.join(" "), pair.compare(Names::Prefix, verbatim));
    }
    f.finish();
}

/// Long-distance repeats (a 5000-byte period) compressed with zlib by img: qemu-img,
/// which inflates with a 4 KiB window, reads them back identically.
#[test]
fn zlib_clusters_are_readable_by_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let mut rng = Rng::new(5000);
    let period = rng.bytes(5000);
    let data: Vec<u8> = period.iter().copied().cycle().take(4 << 20).collect();
    std::fs::write(d.join("p.raw"), &data).unwrap();
    for cs in ["512", "64k", "2M"] {
        let o = format!("cluster_size={cs}");
        img_in(
            d,
            &["convert", "-c", "-O", "qcow2", "-o", &o, "p.raw", "p.qcow2"],
        )
        .ok();
        assert_qemu_check_clean(&d.join("p.qcow2"));
        qemu_img_in(d, &["compare", "p.raw", "p.qcow2"]).ok();
        assert_eq!(qemu_read_all(&d.join("p.qcow2"), None, d), data, "{cs}");
    }
}

/// Random sources written by qemu-io (data, zeroes, discards, compressed clusters, over a
/// backing file), converted through every in/out combination.
#[test]
fn random_sources_through_every_combination() {
    let seed = seed(0xc0417e57);
    let mut rng = Rng::new(seed);
    let dir = tempdir();
    let d = dir.path();
    let mut f = Failures::new();
    for round in 0..3 {
        let cs = *rng.pick(&[512u64, 4096, 65536, 2 << 20]);
        let xl2 = cs >= 16384 && rng.chance(1, 3);
        let ctype = *rng.pick(&["zlib", "zstd"]);
        let size = rng.range(1, 8) * (1 << 20) + rng.below(8) * 512;
        let opts = format!(
            "cluster_size={cs},extended_l2={},compression_type={ctype}",
            if xl2 { "on" } else { "off" }
        );
        let with_backing = rng.chance(1, 2);
        if with_backing {
            qemu_img_in(
                d,
                &["create", "-q", "-f", "qcow2", "b.qcow2", &size.to_string()],
            )
            .ok();
            qemu_io_cmds(
                &d.join("b.qcow2"),
                "qcow2",
                &[format!("write -P 0x{:x} 0 {}", rng.below(256), size / 2)],
            );
            qemu_img_in(
                d,
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &opts,
                    "-b",
                    "b.qcow2",
                    "-F",
                    "qcow2",
                    "s.qcow2",
                    &size.to_string(),
                ],
            )
            .ok();
        } else {
            qemu_img_in(
                d,
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &opts,
                    "s.qcow2",
                    &size.to_string(),
                ],
            )
            .ok();
        }
        let mut cmds = Vec::new();
        for _ in 0..rng.range(5, 40) {
            let off = rng.below(size / 512) * 512;
            let len = (rng.range(1, 512) * 512).min(size - off);
            let pat = rng.below(256);
            cmds.push(match rng.below(4) {
                0 => format!("write -P 0x{pat:x} {off} {len}"),
                1 => format!("write -z {off} {len}"),
                2 => format!("discard {off} {len}"),
                _ => {
                    let c = rng.below(size / cs) * cs;
                    let l = cs.min(size - c);
                    if l == cs {
                        format!("write -c -P 0x{pat:x} {c} {l}")
                    } else {
                        format!("write -P 0x{pat:x} {c} {l}")
                    }
                }
            });
        }
        qemu_io_cmds(&d.join("s.qcow2"), "qcow2", &cmds);
        qemu_img_in(d, &["convert", "-O", "raw", "s.qcow2", "s.raw"]).ok();
        for src in ["s.qcow2", "s.raw"] {
            for out in [
                &["-O", "raw"][..],
                &["-O", "qcow2"],
                &["-O", "qcow2", "-c"],
                &["-O", "qcow2", "-W", "-S", "0"],
            ] {
                let mut a = vec!["convert"];
                a.extend_from_slice(out);
                let o = if out[1] == "raw" { "o.raw" } else { "o.qcow2" };
                a.extend([src, o]);
                let name = format!(
                    "round {round} (seed {seed:#x}, {opts}, backing {with_backing}): {}",
                    a.join(" ")
                );
                let run = img_in(d, &a);
                let r = run.check().and_then(|_| {
                    if o.ends_with("qcow2") {
                        qemu_check(&d.join(o))?;
                    }
                    identical(d, src, o)
                });
                let _ = std::fs::remove_file(d.join(o));
                f.record(&name, r);
            }
        }
        for file in ["s.qcow2", "s.raw", "b.qcow2"] {
            let _ = std::fs::remove_file(d.join(file));
        }
    }
    f.finish();
}

/// `-l`: an internal snapshot of the source is converted instead of its active state, by
/// name, ID or both; what qemu-img refuses is refused in its words.
#[test]
fn snapshots_convert_like_qemu() {
    let twin = Twin::new(|d| {
        raw_source(d, "src.raw", 3);
        qemu_img_in(d, &["convert", "-O", "qcow2", "src.raw", "snap.qcow2"]).ok();
        qemu_img_in(d, &["snapshot", "-c", "s1", "snap.qcow2"]).ok();
        qemu_io_cmds(
            &d.join("snap.qcow2"),
            "qcow2",
            &["write -P 0x66 0 1M".into(), "discard 2M 1M".into()],
        );
        qemu_img_in(d, &["snapshot", "-c", "s2", "snap.qcow2"]).ok();
        qemu_io_cmds(&d.join("snap.qcow2"), "qcow2", &["write -z 4M 1M".into()]);
    });
    let mut f = Failures::new();
    for line in [
        "-l s1 -O raw snap.qcow2 o.raw",
        "-l 2 -O qcow2 snap.qcow2 o.qcow2",
        "-l snapshot.name=s2 -O raw snap.qcow2 o.raw",
        "-l snapshot.id=1,snapshot.name=s1 -c -O qcow2 snap.qcow2 o.qcow2",
        "-l snapshot.id=1,snapshot.name=s2 -O raw snap.qcow2 o.raw",
        "-l nope -O raw snap.qcow2 o.raw",
        "-l snapshot.foo=1 -O raw snap.qcow2 o.raw",
        "-l s1 -O raw snap.qcow2 snap.qcow2 o.raw",
        "-l s1 -f raw -O raw src.raw o.raw",
    ] {
        let a: Vec<&str> = std::iter::once("convert")
            .chain(line.split_whitespace())
            .collect();
        let out = a.last().unwrap().to_string();
        let pair = twin.run(&a);
        let mut errs = pair.differences(Names::Prefix, verbatim);
        if pair.both_succeeded() {
            errs.extend(twin.compare_images(&out, Images::default()).err());
        }
        twin.remove(&out);
        f.record(line, pair.verdict(errs));
    }
    f.finish();
}

/// `-C`: the same output, allocation included (data copied whole, not scanned for
/// zeroes), from every kind of source into raw and qcow2 (but where a compressed cluster
/// makes the copy fall back to reading and writing: which of qemu-img's chunks in flight
/// still offload then depends on its I/O timing, img's never do, so there the contents
/// are compared and not the allocation); `-r`: qemu-img's limit on the
/// write rate; `--salvage`: an unreadable compressed cluster becomes zeroes with
/// qemu-img's warnings, where without it the convert fails with qemu-img's error.
#[test]
fn copy_offload_rate_limit_and_salvage() {
    let twin = env();
    let mut f = Failures::new();
    for src in [
        "src.raw",
        "c64k.qcow2",
        "xl2.qcow2",
        "zlib.qcow2",
        "top.qcow2",
    ] {
        for fmt in ["raw", "qcow2"] {
            let out = format!("out.{fmt}");
            let a = args(&["convert", "-C", "-O", fmt, src, &out]);
            let pair = twin.run(&a);
            let mut errs = pair.differences(Names::Prefix, verbatim);
            if pair.both_succeeded() {
                errs.extend(twin.compare_images(&out, Images::default()).err());
                errs.extend(identical(twin.img_dir(), src, &out).err());
                if !["zlib.qcow2", "top.qcow2"].contains(&src) {
                    errs.extend(twin.compare_maps(&out, |m| m).err());
                }
            }
            twin.remove(&out);
            f.record(&a.join(" "), pair.verdict(errs));
        }
    }
    // 8 MiB of data at 4 MiB/s: qemu-img takes about 1.4 s (a request passes while the
    // bucket holds a tenth of a second's worth), and img must not be faster.
    qemu_img_in(
        twin.img_dir(),
        &["create", "-q", "-f", "raw", "full.raw", "8M"],
    )
    .ok();
    qemu_io_cmds(
        &twin.img_dir().join("full.raw"),
        "raw",
        &["write -P 1 0 8M".into()],
    );
    let start = std::time::Instant::now();
    let a = args(&["convert", "-r", "4M", "-O", "raw", "full.raw", "slow.raw"]);
    let out = Tool::img().run(Some(twin.img_dir()), &a);
    let took = start.elapsed();
    f.record(
        "-r 4M",
        ensure(out.success(), || out.report()).and_then(|()| {
            ensure(took >= std::time::Duration::from_millis(1000), || {
                format!("8 MiB at 4 MiB/s took only {took:?}")
            })
        }),
    );
    // A compressed cluster whose deflate stream is broken.
    for d in [twin.qemu_dir(), twin.img_dir()] {
        qemu_img_in(d, &["create", "-q", "-f", "qcow2", "plain.qcow2", "1M"]).ok();
        qemu_io_cmds(
            &d.join("plain.qcow2"),
            "qcow2",
            &["write -P 0x41 0 1M".into()],
        );
        qemu_img_in(
            d,
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "plain.qcow2",
                "broken.qcow2",
            ],
        )
        .ok();
        let path = d.join("broken.qcow2");
        let mut img = std::fs::read(&path).unwrap();
        let host = first_compressed_offset(&img);
        img[host as usize..host as usize + 64].fill(0xff);
        std::fs::write(&path, img).unwrap();
    }
    for extra in [&["--salvage"][..], &[], &["--salvage", "-q"]] {
        let mut a = args(&["convert"]);
        a.extend(args(extra));
        a.extend(args(&["-O", "raw", "broken.qcow2", "salvaged.raw"]));
        let pair = twin.run(&a);
        let mut errs = pair.differences(Names::Prefix, verbatim);
        if pair.both_succeeded() {
            errs.extend(twin.compare_images("salvaged.raw", Images::default()).err());
        }
        twin.remove("salvaged.raw");
        f.record(&a.join(" "), pair.verdict(errs));
    }
    f.finish();
}

/// Host offset of the compressed data of the first guest cluster of a qcow2 file whose
/// first cluster is compressed (64 KiB clusters).
fn first_compressed_offset(img: &[u8]) -> u64 {
    let be = |at: u64| u64::from_be_bytes(img[at as usize..at as usize + 8].try_into().unwrap());
    let l2 = be(be(40)) & 0x00ff_ffff_ffff_fe00;
    let entry = be(l2);
    assert!(entry & (1 << 62) != 0, "cluster 0 is not compressed");
    // 64 KiB clusters: the offset field is the low 62 - (16 - 8) = 54 bits.
    entry & ((1 << 54) - 1)
}

/// `-n -c` into a target whose clusters hold data: qemu-img's compressed writes never
/// replace stored data and fail with EIO at the first such cluster; img fails the same way
/// and leaves the target as qemu-img leaves it.
#[test]
fn compressed_writes_into_allocated_clusters_fail_like_qemu() {
    let twin = Twin::new(|d| {
        qemu_img_in(d, &["create", "-q", "-f", "qcow2", "src.qcow2", "1M"]).ok();
        qemu_io_cmds(
            &d.join("src.qcow2"),
            "qcow2",
            &["write -P 0x41 0 1M".into()],
        );
        for (name, cmds) in [
            ("first.qcow2", &["write -P 7 0 64k"][..]),
            ("later.qcow2", &["write -P 7 512k 64k", "write -z 0 64k"]),
            ("zeroes.qcow2", &["write -z 0 1M"]),
        ] {
            qemu_img_in(d, &["create", "-q", "-f", "qcow2", name, "1M"]).ok();
            let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
            qemu_io_cmds(&d.join(name), "qcow2", &cmds);
        }
    });
    let mut f = Failures::new();
    for target in ["first.qcow2", "later.qcow2", "zeroes.qcow2"] {
        let a = args(&["convert", "-n", "-c", "-O", "qcow2", "src.qcow2", target]);
        let pair = twin.run(&a);
        let mut errs = pair.differences(Names::Prefix, verbatim);
        errs.extend(twin.compare_images(target, Images::default()).err());
        errs.extend(twin.compare_maps(target, |m| m).err());
        f.record(&a.join(" "), pair.verdict(errs));
    }
    f.finish();
}
