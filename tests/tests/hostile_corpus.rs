//! Every `img` subcommand on every image of the hostile corpus (`fixtures/hostile-corpus.sh`,
//! built afresh into a temporary directory; its INDEX names each image's flaw): `info`,
//! `info --backing-chain`, `check`, `check -r all` (on a copy), `map`, `compare`, `convert`,
//! `measure`, `snapshot -l` and `dd`, each in the sandbox (1 GiB of address space, a
//! deadline). Each must exit on its own, without a panic, and either succeed or fail with
//! one `img: ` line (`check` may also report what it found, exit 2 or 3). Whether `img info`
//! opens the image must agree with `qemu-img info`, except where [`DIFFERS`] says why not.

use integration_tests::sandbox::Sandbox;
use integration_tests::*;
use std::process::Command;
use std::time::{Duration, Instant};

const LIMITS: Sandbox = Sandbox::new(1 << 30, Duration::from_secs(30));

/// Images `img info` opens or refuses otherwise than `qemu-img info`, and why.
const DIFFERS: &[(&str, &str)] = &[
    (
        "vdi-map-offset-near-2^32.vdi",
        "QEMU reads a block map past the end of the file as zeroes, allocating up to 2 GiB \
         for it; img refuses it",
    ),
    (
        "snapshot-l1-size-2^31.qcow2",
        "QEMU refuses a snapshot L1 table over 32 MiB only when the snapshot is used; img \
         refuses the image at open",
    ),
];

/// The subcommands, `F` standing for the image, `C` for a copy of it (`check -r all` repairs
/// that), `O` for an output file.
const RUNS: &[&[&str]] = &[
    &["info", "F"],
    &["info", "--backing-chain", "F"],
    &["check", "F"],
    &["check", "-r", "all", "C"],
    &["map", "--output=json", "F"],
    &["compare", "F", "F"],
    &["convert", "-O", "qcow2", "F", "O"],
    &["measure", "-O", "qcow2", "F"],
    &["snapshot", "-l", "F"],
    &["dd", "if=F", "of=O", "bs=64k", "count=16"],
];

/// What is wrong with how `img ARGS` ended, if anything.
fn misbehaved(args: &[String], out: &Output) -> Option<String> {
    if out.timed_out || out.signal.is_some() || out.stderr.contains("panicked") {
        return Some("did not exit on its own".into());
    }
    let check_report = args[0] == "check" && matches!(out.code, Some(2) | Some(3));
    if out.success() || check_report {
        return None;
    }
    let lines: Vec<&str> = out.stderr.lines().collect();
    let one_line = lines.len() == 1 && lines[0].starts_with("img: ");
    // As qemu-img's: compare exits 2 when it cannot open an image, 3 when block status fails
    // and 4 when a read does; check exits 63 on a format without checks.
    let codes: &[i32] = match args[0].as_str() {
        "compare" => &[2, 3, 4],
        "check" => &[1, 63],
        _ => &[1],
    };
    (!one_line || !out.code.is_some_and(|c| codes.contains(&c)))
        .then(|| format!("not exit {codes:?} with one `img: ` line"))
}

#[test]
fn every_subcommand_on_every_hostile_image() {
    if !have_qemu_img() {
        return;
    }
    let tmp = tempdir();
    let corpus = tmp.path().join("corpus");
    let t0 = Instant::now();
    let built = run(
        Command::new("bash")
            .arg(workspace_root().join("fixtures/hostile-corpus.sh"))
            .arg(&corpus),
        Duration::from_secs(600),
    );
    assert!(
        built.success(),
        "building the corpus failed:\n{}",
        built.report()
    );
    eprintln!("corpus built in {:?}", t0.elapsed());
    let index = std::fs::read_to_string(corpus.join("INDEX")).unwrap();
    let images: Vec<(&str, &str)> = index
        .lines()
        .map(|l| l.split_once('\t').expect("INDEX: FILE<TAB>FLAW"))
        .collect();
    assert!(
        images.len() >= 30,
        "only {} images in the corpus",
        images.len()
    );
    let mut f = Failures::new();
    let t0 = Instant::now();
    for (file, flaw) in &images {
        let path = corpus.join(file);
        let mut problems = Vec::new();
        for run in RUNS {
            let copy = corpus.join(format!("copy-{file}"));
            let out_file = tmp.path().join("out");
            let args: Vec<String> = run
                .iter()
                .map(|a| {
                    a.replace("if=F", &format!("if={}", s(&path)))
                        .replace("of=O", &format!("of={}", s(&out_file)))
                })
                .map(|a| match a.as_str() {
                    "F" => s(&path).to_string(),
                    "C" => s(&copy).to_string(),
                    "O" => s(&out_file).to_string(),
                    _ => a,
                })
                .collect();
            if run.contains(&"C") {
                std::fs::copy(&path, &copy).unwrap();
            }
            let out = LIMITS.run(Command::new(img_bin()).args(&args).current_dir(&corpus));
            let _ = std::fs::remove_file(&copy);
            let _ = std::fs::remove_file(&out_file);
            if let Some(m) = misbehaved(&args, &out) {
                problems.push(format!("img {}: {m}\n{}", run.join(" "), out.report()));
            }
            if run == &["info", "F"] {
                let q = qemu_img(&["info", s(&path)]);
                let known = DIFFERS.iter().any(|(n, _)| n == file);
                if q.success() != out.success() && !known {
                    problems.push(format!(
                        "img info {}opens it, qemu-img info {}:\n{}\n{}",
                        if out.success() { "" } else { "never " },
                        if q.success() { "does" } else { "does not" },
                        out.report(),
                        q.report()
                    ));
                }
            }
        }
        let r = if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        };
        f.record(&format!("{file} ({flaw})"), r);
    }
    // The deep chains: 1000 levels read through (convert's workers recursed past their
    // stack here once), one past the limit refused in one line.
    let raw = tmp.path().join("deep.raw");
    let deep = corpus.join("deep-0999.qcow2");
    let out = LIMITS.run(Command::new(img_bin()).args(["convert", "-O", "raw", s(&deep), s(&raw)]));
    let data = std::fs::read(&raw).unwrap_or_default();
    f.record(
        "deep-0999.qcow2 converts to what its bottom layer holds",
        ensure(
            out.success() && data.len() == 4 << 20 && data[..65536].iter().all(|&b| b == 0x77),
            || out.report(),
        ),
    );
    // bench's threads read through all 1000 levels too.
    let out = LIMITS.run(Command::new(img_bin()).args(["bench", "-c", "64", "-d", "4", s(&deep)]));
    f.record(
        "bench reads through deep-0999.qcow2",
        ensure(out.success(), || out.report()),
    );
    let out = LIMITS.run(Command::new(img_bin()).args(["map", s(&corpus.join("deep-1025.qcow2"))]));
    f.record(
        "deep-1025.qcow2 is refused as too deep",
        ensure(
            out.code == Some(1)
                && out.stderr.lines().count() == 1
                && out
                    .stderr
                    .contains("Backing chain too deep: more than 1024 backing files"),
            || out.report(),
        ),
    );
    eprintln!(
        "{} subcommands on {} images in {:?}",
        RUNS.len() * images.len(),
        images.len(),
        t0.elapsed()
    );
    f.finish();
}
