//! Shared steps of the cross tests for formats beside qcow2 (vpc, vdi, vmdk): images qemu-io
//! filled with seeded random writes, `img` read-only subcommands run next to qemu-img on
//! the same file, and images the two tools wrote compared (`info` with the format given,
//! `qemu-img compare`, disk usage).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::tools::{qemu_img, qemu_img_in, qemu_io_cmds, Tool};
use crate::twin::{Names, Pair, Twin};
use crate::{json_pretty, json_remove_key, s, seed, tempdir, text_diff, Rng};

/// Blank the host-dependent `disk size:` and `"actual-size"` values of `info` output.
pub fn normalize_info(out: &str) -> String {
    out.lines()
        .map(|l| {
            let t = l.trim_start();
            let ind = &l[..l.len() - t.len()];
            if t.starts_with("disk size:") {
                format!("{ind}disk size: <ignored>")
            } else if t.starts_with("\"actual-size\":") {
                let comma = if t.ends_with(',') { "," } else { "" };
                format!("{ind}\"actual-size\": <ignored>{comma}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + if out.ends_with('\n') { "\n" } else { "" }
}

/// Seeded random writes (patterns, some unaligned, some zero writes) by qemu-io into the
/// `fmt` image at `path` of `size` bytes.
pub fn qemu_io_random(path: &Path, fmt: &str, size: u64, rng: &mut Rng, writes: usize) {
    let mut cmds = Vec::new();
    for _ in 0..writes {
        let len = rng.range(1, (size / 8).clamp(2, 3 << 20));
        let off = rng.below(size - len.min(size) + 1);
        let len = len.min(size - off);
        if len == 0 {
            continue;
        }
        if rng.chance(1, 6) {
            cmds.push(format!("write -z {off} {len}"));
        } else {
            cmds.push(format!("write -P {} {off} {len}", rng.range(1, 255)));
        }
    }
    qemu_io_cmds(path, fmt, &cmds);
}

/// The sources of the foreign formats' convert tests: `a.qcow2` of `qcow2_size` and `b.raw`
/// of `raw_size` bytes, each with ten random qemu-io writes (the seed from `TEST_SEED`, else
/// `default_seed`, printed), copied into both sides of a twin.
pub fn convert_sources(default_seed: u64, qcow2_size: u64, raw_size: u64) -> Twin {
    let seed = seed(default_seed);
    eprintln!("seed {seed:#x}");
    let mut rng = Rng::new(seed);
    let src = tempdir();
    for (name, fmt, size) in [("a.qcow2", "qcow2", qcow2_size), ("b.raw", "raw", raw_size)] {
        qimg(src.path(), &format!("create -q -f {fmt} {name} {size}"));
        qemu_io_random(&src.path().join(name), fmt, size, &mut rng, 10);
    }
    Twin::copied_from(src.path())
}

/// `a.qcow2` in `dir` converted by img through each `(format, file)` in turn and back to
/// `x.qcow2`: qemu-img must find the result equal to the start.
pub fn round_trip(dir: &Path, through: &[(&str, &str)]) -> Result<(), String> {
    let img = Tool::img();
    let mut from = "a.qcow2";
    for &(fmt, file) in through.iter().chain(&[("qcow2", "x.qcow2")]) {
        img.run(Some(dir), &["convert", "-O", fmt, from, file])
            .check()?;
        from = file;
    }
    qemu_img_in(dir, &["compare", "a.qcow2", "x.qcow2"])
        .check()
        .map(drop)
}

/// How one command's stdout is normalized before comparing.
type Normalize = fn(&str) -> String;

/// `img` and `qemu-img` agree on a `fmt` image `file` in `dir`: `info` (human and JSON,
/// probed and with `-f`), `map` (human and JSON), `check` (words and exit code), and
/// `convert -O raw` reads the same bytes.
pub fn read_only_commands_agree(dir: &Path, file: &str, fmt: &str) -> Result<(), String> {
    let mut errs = Vec::new();
    let img = Tool::img();
    let runs: Vec<(Vec<&str>, Normalize)> = vec![
        (vec!["info", file], normalize_info),
        (vec!["info", "--output=json", file], normalize_info),
        (vec!["info", "-f", fmt, file], normalize_info),
        (
            vec!["info", "-f", fmt, "--output=json", file],
            normalize_info,
        ),
        (vec!["map", "-f", fmt, file], crate::twin::verbatim),
        (
            vec!["map", "-f", fmt, "--output=json", file],
            crate::twin::verbatim,
        ),
        (vec!["check", "-f", fmt, file], crate::twin::verbatim),
        (
            vec!["check", "-f", fmt, "--output=json", file],
            crate::twin::verbatim,
        ),
    ];
    for (args, norm) in runs {
        let pair = Pair::run(dir, dir, &img, &args);
        if let Err(e) = pair.compare(Names::Prefix, norm) {
            errs.push(format!("{args:?}: {e}"));
        }
    }
    let (q, i) = (dir.join("qemu.raw"), dir.join("img.raw"));
    let qo = qemu_img(&["convert", "-f", fmt, "-O", "raw", s(&dir.join(file)), s(&q)]);
    let io = img.run(
        Some(dir),
        &["convert", "-f", fmt, "-O", "raw", file, "img.raw"],
    );
    if !qo.success() || !io.success() {
        errs.push(format!(
            "convert -O raw failed:\n{}\n{}",
            qo.report(),
            io.report()
        ));
    } else {
        let (qb, ib) = (std::fs::read(&q).unwrap(), std::fs::read(&i).unwrap());
        if let Some(m) = crate::first_mismatch(&qb, &ib) {
            errs.push(format!("convert -O raw differs: {m}"));
        }
    }
    let _ = std::fs::remove_file(q);
    let _ = std::fs::remove_file(i);
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("\n"))
    }
}

/// `qemu-img info -f FMT --output=json` of `path`, without `actual-size` (and without the
/// file's length unless `file_len`).
fn info_json(path: &Path, fmt: &str, file_len: bool) -> Result<serde_json::Value, String> {
    let out = qemu_img(&["info", "-U", "-f", fmt, "--output=json", s(path)]);
    if !out.success() {
        return Err(format!("qemu-img info failed:\n{}", out.report()));
    }
    let mut v: serde_json::Value = serde_json::from_str(&out.stdout).map_err(|e| e.to_string())?;
    json_remove_key(&mut v, "actual-size");
    // A vmdk's random CID, and its extent files named by their full paths.
    json_remove_key(&mut v, "cid");
    if let Some(extents) = v
        .pointer_mut("/format-specific/data/extents")
        .and_then(|e| e.as_array_mut())
    {
        for e in extents {
            e["filename"] = serde_json::Value::Null;
        }
    }
    v["filename"] = serde_json::Value::Null;
    if let Some(children) = v.get_mut("children").and_then(|c| c.as_array_mut()) {
        for ch in children {
            ch["info"]["filename"] = serde_json::Value::Null;
            if !file_len {
                ch["info"]["virtual-size"] = serde_json::Value::Null;
            }
        }
    }
    Ok(v)
}

/// Bytes of data a file occupies on the host: its data extents where the file system maps
/// them (not its extent-tree blocks, see [`crate::fiemap`]), else its `st_blocks`.
fn disk_usage(path: &Path) -> u64 {
    crate::fiemap::data_bytes(path)
        .unwrap_or_else(|| std::fs::metadata(path).map_or(0, |m| m.blocks() * 512))
}

/// What `img` wrote at `ours` and qemu-img at `theirs` (both `fmt`) are the same image
/// (`du_slack`: how many bytes more disk img's may take for reasons of placement):
/// `qemu-img info -f FMT` the same (host usage and names aside, the file length too when
/// `file_len`: `dd` writes zeroes qemu-img allocates blocks for),
/// `qemu-img compare` identical, `qemu-img check` clean where the format has a check, and
/// img's file takes no more host space than qemu-img's.
pub fn same_image(
    ours: &Path,
    theirs: &Path,
    fmt: &str,
    file_len: bool,
    du_slack: u64,
) -> Result<(), String> {
    let mut errs = Vec::new();
    match (
        info_json(theirs, fmt, file_len),
        info_json(ours, fmt, file_len),
    ) {
        (Ok(q), Ok(i)) => {
            if let Some(d) = text_diff(
                "qemu-img info (qemu-img's image)",
                &json_pretty(&q),
                "qemu-img info (img's image)",
                &json_pretty(&i),
            ) {
                errs.push(format!("info differs:\n{d}"));
            }
        }
        (Err(e), _) | (_, Err(e)) => errs.push(e),
    }
    let cmp = qemu_img(&["compare", "-U", "-f", fmt, "-F", fmt, s(theirs), s(ours)]);
    if cmp.code != Some(0) {
        errs.push(format!("qemu-img compare:\n{}", cmp.report()));
    }
    let check = qemu_img(&["check", "-U", "-f", fmt, s(ours)]);
    let unsupported = check.code == Some(63);
    if !(check.success() || unsupported) {
        errs.push(format!("qemu-img check:\n{}", check.report()));
    }
    let (du_i, du_q) = (disk_usage(ours), disk_usage(theirs));
    if du_i > du_q + du_slack {
        errs.push(format!("img's image takes {du_i} bytes, qemu-img's {du_q}"));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("\n"))
    }
}

/// Run the same `create`/`convert` arguments through both tools in twin directories
/// (`Twin`), compare their output, then [`same_image`] on `out` when both succeeded.
pub fn twin_writes_agree(
    twin: &crate::twin::Twin,
    args: &[&str],
    out: &str,
    fmt: &str,
) -> Result<(), String> {
    let pair = twin.run(args);
    let mut errs = pair.differences(Names::Prefix, crate::twin::verbatim);
    if pair.both_succeeded() && twin.qemu_dir().join(out).exists() {
        // qemu-img dd writes the zeroes it reads, allocating blocks img leaves out.
        let file_len = args[0] != "dd";
        // With -W a dynamic VHD's blocks land in the order the writes come: each block's
        // data sits 512 bytes (its sector bitmap) past a place that depends on that order,
        // so a partly written 4 KiB filesystem block more or less per image block is
        // placement, not what was written.
        let du_slack = if fmt == "vpc" && args.contains(&"-W") {
            let size = crate::qemu_info_json(&twin.qemu_dir().join(out), &["-U"])["virtual-size"]
                .as_u64()
                .unwrap_or(0);
            size.div_ceil(2 << 20) * 4096
        } else {
            0
        };
        let r = same_image(
            &twin.img_dir().join(out),
            &twin.qemu_dir().join(out),
            fmt,
            file_len,
            du_slack,
        );
        errs.extend(r.err());
    }
    twin.remove(out);
    pair.verdict(errs)
}

/// `qemu-img` in `dir` with whitespace-separated `args`, which must succeed.
pub fn qimg(dir: &Path, args: &str) {
    let a: Vec<&str> = args.split_whitespace().collect();
    qemu_img_in(dir, &a).ok();
}
