//! Hostile and corrupt images: `img info` must fail cleanly (one line on stderr starting
//! with `img: `, exit code 1 like qemu-img), never panic, hang or allocate without bound;
//! the engine's `open_image` must return `Err`.

use integration_tests::qcow2_layout::{self as q, Field, Patch};
use integration_tests::sandbox::Sandbox;
use integration_tests::twin::{verbatim, Names, Twin};
use integration_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Limits for `img info` on a hostile image: a hostile size must not make it allocate
/// gigabytes, nor loop.
const IMG_LIMITS: Sandbox = Sandbox::new(2 << 30, Duration::from_secs(20));
/// Limits for the child that opens a hostile image through the engine.
const ENGINE_LIMITS: Sandbox = Sandbox::new(2 << 30, Duration::from_secs(30));

fn img_limited(dir: &Path, args: &[&str]) -> Output {
    IMG_LIMITS.run(&mut Tool::img().command(Some(dir), args))
}

/// One change to a fresh `qemu-img create -f qcow2 ... 1M` image.
#[derive(Clone, Copy)]
enum Edit {
    Set(Field, u64),
    Bytes(u64, &'static [u8]),
    Truncate(u64),
    /// Set one more incompatible-feature bit.
    IncompatBit(u32),
}
use Edit::*;

fn apply(p: &Patch, e: Edit) {
    match e {
        Set(f, v) => p.set(f, v),
        Bytes(off, b) => p.put_bytes(off, b),
        Truncate(len) => p.truncate(len),
        IncompatBit(bit) => p.set_incompatible(1 << bit),
    }
}

/// Header damage: (name, whether qemu-img rejects the image at open, extra `info`
/// arguments, the edits). Where qemu-img opens the image (it fails only later, on I/O),
/// `img info` must behave like it, and the engine may open it but must not panic or hang
/// when reading it all.
#[rustfmt::skip]
const HEADER_CASES: &[(&str, bool, &[&str], &[Edit])] = &[
    ("truncated header (50 bytes)", true, &[], &[Truncate(50)]),
    ("truncated header -f qcow2", true, &["-f", "qcow2"], &[Truncate(50)]),
    ("truncated to 8 bytes -f qcow2", true, &["-f", "qcow2"], &[Truncate(8)]),
    ("truncated v3 header (90 bytes)", true, &[], &[Truncate(90)]),
    ("bad magic -f qcow2", true, &["-f", "qcow2"], &[Bytes(0, b"QFIX")]),
    ("version 1 -f qcow2", true, &["-f", "qcow2"], &[Set(q::VERSION, 1)]),
    ("version 4", true, &[], &[Set(q::VERSION, 4)]),
    ("version 0xffffffff", true, &[], &[Set(q::VERSION, u32::MAX as u64)]),
    ("cluster_bits 8", true, &[], &[Set(q::CLUSTER_BITS, 8)]),
    ("cluster_bits 22", true, &[], &[Set(q::CLUSTER_BITS, 22)]),
    ("cluster_bits 64", true, &[], &[Set(q::CLUSTER_BITS, 64)]),
    ("cluster_bits 0xffffffff", true, &[], &[Set(q::CLUSTER_BITS, u32::MAX as u64)]),
    ("huge l1_size 0x7fffffff", true, &[], &[Set(q::L1_SIZE, 0x7fff_ffff)]),
    ("huge l1_size 0xffffffff", true, &[], &[Set(q::L1_SIZE, 0xffff_ffff)]),
    ("l1_size too small for virtual size", true, &[], &[Set(q::SIZE, 1 << 40)]),
    ("virtual size 2^63-1", true, &[], &[Set(q::SIZE, i64::MAX as u64)]),
    ("l1_table_offset past EOF", false, &[], &[Set(q::L1_TABLE_OFFSET, 1 << 40)]),
    ("l1_table_offset unaligned", true, &[], &[Set(q::L1_TABLE_OFFSET, 0x30001)]),
    ("l1_table_offset 2^63", true, &[], &[Set(q::L1_TABLE_OFFSET, 1 << 63)]),
    ("refcount table past EOF", false, &[], &[Set(q::REFCOUNT_TABLE_OFFSET, 1 << 40)]),
    ("refcount table unaligned", true, &[], &[Set(q::REFCOUNT_TABLE_OFFSET, 0x10008)]),
    ("refcount table offset 0", false, &[], &[Set(q::REFCOUNT_TABLE_OFFSET, 0)]),
    ("refcount_table_clusters huge", true, &[], &[Set(q::REFCOUNT_TABLE_CLUSTERS, 0xff_ffff)]),
    ("refcount_table_clusters 0xffffffff", true, &[], &[Set(q::REFCOUNT_TABLE_CLUSTERS, u32::MAX as u64)]),
    ("refcount_order 7", true, &[], &[Set(q::REFCOUNT_ORDER, 7)]),
    ("refcount_order 0xffffffff", true, &[], &[Set(q::REFCOUNT_ORDER, u32::MAX as u64)]),
    ("header_length 50 (too small)", true, &[], &[Set(q::HEADER_LENGTH, 50)]),
    ("header_length 0x100000 (past cluster)", true, &[], &[Set(q::HEADER_LENGTH, 0x10_0000)]),
    ("header_length 0xffffffff", true, &[], &[Set(q::HEADER_LENGTH, u32::MAX as u64)]),
    ("header_length unaligned 105", false, &[], &[Set(q::HEADER_LENGTH, 105)]),
    ("snapshots_offset garbage (past EOF)", false, &[], &[Set(q::NB_SNAPSHOTS, 1), Set(q::SNAPSHOTS_OFFSET, 1 << 50)]),
    ("snapshots_offset unaligned", true, &[], &[Set(q::NB_SNAPSHOTS, 1), Set(q::SNAPSHOTS_OFFSET, 0x123)]),
    ("nb_snapshots 0xffffffff", true, &[], &[Set(q::NB_SNAPSHOTS, u32::MAX as u64), Set(q::SNAPSHOTS_OFFSET, 0x10000)]),
    ("backing_file_size huge", true, &[], &[Set(q::BACKING_FILE_OFFSET, 0x200), Set(q::BACKING_FILE_SIZE, 0xffff_ffff)]),
    ("backing_file_offset past EOF", true, &[], &[Set(q::BACKING_FILE_OFFSET, 1 << 40), Set(q::BACKING_FILE_SIZE, 10)]),
    ("unknown incompatible bit without name", true, &[], &[IncompatBit(21)]),
];

struct BadCase {
    name: &'static str,
    file: PathBuf,
    /// Extra `info` arguments before the file name.
    args: Vec<&'static str>,
    /// Text the one-line message must contain (case-insensitive), beyond the prefix.
    must_contain: Vec<String>,
    /// Whether the engine's `open_image` (read-only, following backing files) must fail.
    engine_fails: bool,
}

fn mk(dir: &Path, name: &str, create: &str, patch: impl FnOnce(&Patch)) -> PathBuf {
    let file = dir.join(format!("{}.qcow2", name.replace([' ', '/'], "_")));
    let mut args: Vec<&str> = create.split_whitespace().collect();
    args.push(s(&file));
    args.insert(0, "create");
    args.insert(1, "-q");
    if !create.contains("-b ") {
        args.push("1M");
    }
    qemu_img(&args).ok();
    patch(&Patch(&file));
    file
}

fn cases(dir: &Path) -> Vec<BadCase> {
    let q = "-f qcow2";
    let mut v = Vec::new();
    // Cases QEMU itself opens come last.
    let mut lenient = Vec::new();
    for (i, &(name, rejected, args, edits)) in HEADER_CASES.iter().enumerate() {
        let file = mk(dir, &format!("header{i:02}"), q, |p| {
            edits.iter().for_each(|&e| apply(p, e))
        });
        let c = BadCase {
            name,
            file,
            args: args.to_vec(),
            must_contain: vec![],
            engine_fails: rejected,
        };
        if rejected {
            v.push(c);
        } else {
            lenient.push(c);
        }
    }
    v.extend(lenient);
    // Unknown incompatible feature that the feature-name table names: rewrite the last
    // table entry (autoclear "raw external data") as incompatible bit 20 "my-new-feature".
    let named = mk(dir, "incompat20named", q, |p| {
        let (first, n) = p
            .layout()
            .feature_names
            .expect("qemu-img writes a feature name table");
        let mut entry = [0u8; q::FEATURE_NAME_ENTRY as usize];
        entry[0] = 0; // incompatible
        entry[1] = 20;
        entry[2..2 + 14].copy_from_slice(b"my-new-feature");
        p.put_bytes(first + q::FEATURE_NAME_ENTRY * (n - 1), &entry);
        p.set_incompatible(1 << 20);
    });
    v.push(BadCase {
        name: "unknown incompatible bit named in feature table",
        file: named,
        args: vec![],
        must_contain: vec!["my-new-feature".into()],
        engine_fails: true,
    });
    // Backing loops: `info` alone does not open the backing file (qemu-img exits 0), but
    // `--backing-chain` and the engine must detect the loop.
    let selfb = dir.join("self.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "self.qcow2",
        "-F",
        "qcow2",
        s(&dir.join("tmp-self.qcow2")),
        "1M",
    ])
    .ok();
    std::fs::rename(dir.join("tmp-self.qcow2"), &selfb).unwrap();
    v.push(BadCase {
        name: "backing file is itself (--backing-chain)",
        file: selfb.clone(),
        args: vec!["--backing-chain"],
        must_contain: vec![],
        engine_fails: true,
    });
    let a = dir.join("loop-a.qcow2");
    let b = dir.join("loop-b.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "loop-b.qcow2",
        "-F",
        "qcow2",
        s(&a),
        "1M",
    ])
    .ok();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "loop-a.qcow2",
        "-F",
        "qcow2",
        s(&b),
        "1M",
    ])
    .ok();
    v.push(BadCase {
        name: "backing loop A->B->A (--backing-chain)",
        file: a.clone(),
        args: vec!["--backing-chain"],
        must_contain: vec![],
        engine_fails: true,
    });
    v.push(BadCase {
        name: "backing loop A->B->A (--backing-chain --output=json)",
        file: a,
        args: vec!["--backing-chain", "--output=json"],
        must_contain: vec![],
        engine_fails: true,
    });
    v
}

fn check_case(dir: &Path, c: &BadCase) -> Result<(), String> {
    let mut args: Vec<&str> = vec!["info"];
    args.extend(c.args.iter().copied());
    args.push(s(&c.file));
    let q = qemu_img_in(dir, &args);
    let i = img_limited(dir, &args);
    let mut errs = Vec::new();
    // The reference must reject it too, or the case is not what we think it is (except the
    // lenient cases, which QEMU opens).
    if q.code != Some(1) && c.engine_fails {
        errs.push(format!(
            "TEST BUG: qemu-img exit {:?}, expected 1:\n{}",
            q.code,
            q.report()
        ));
    }
    if i.timed_out {
        errs.push("img hung (killed after timeout)".into());
    }
    if let Some(sig) = i.signal {
        errs.push(format!(
            "img killed by signal {sig} (abort/overflow/out of memory?)"
        ));
    }
    if i.stderr.contains("panicked") {
        errs.push("img panicked".into());
    }
    let lines: Vec<&str> = i.stderr.lines().collect();
    let one_line_error = i.code == Some(1)
        && lines.len() == 1
        && lines[0].starts_with("img: ")
        && i.stdout.is_empty();
    if q.code == Some(0) {
        // QEMU opens these (it only fails later, on I/O). Accept either the same report as
        // qemu-img, or a clean one-line rejection (the engine validates offsets against
        // the file at open, which DESIGN.md asks for).
        let norm = |s: &str| {
            s.lines()
                .filter(|l| !l.trim_start().starts_with("disk size:"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        if i.code == Some(0) {
            if let Some(d) = text_diff("qemu-img", &norm(&q.stdout), "img", &norm(&i.stdout)) {
                errs.push(format!(
                    "img accepted the image like qemu-img, but stdout differs:\n{d}"
                ));
            }
        } else if !one_line_error {
            errs.push(format!("qemu-img accepts this image; img neither matches it nor fails with exit 1 and one `img: ` line (exit {:?})", i.code));
        }
    } else {
        if i.code != q.code {
            errs.push(format!(
                "exit code: qemu-img {:?}, img {:?}",
                q.code, i.code
            ));
        }
        if lines.len() != 1 || !lines[0].starts_with("img: ") {
            errs.push(format!(
                "stderr is not exactly one line starting with `img: `: {:?}",
                i.stderr
            ));
        }
        if !i.stdout.is_empty() {
            errs.push(format!("unexpected stdout: {:?}", i.stdout));
        }
    }
    for m in &c.must_contain {
        if !i.stderr.to_lowercase().contains(&m.to_lowercase()) {
            errs.push(format!("message does not mention {m:?}"));
        }
    }
    if errs.is_empty() {
        eprintln!("     qemu-img: {}     img:      {}", q.stderr, i.stderr);
        Ok(())
    } else {
        Err(format!(
            "{}\n--- qemu-img said: {}--- img run:\n{}",
            errs.join("\n"),
            q.stderr,
            i.report()
        ))
    }
}

#[test]
fn img_info_rejects_corrupt_images() {
    let tmp = tempdir();
    let dir = tmp.path();
    let mut f = Failures::new();
    for c in cases(dir) {
        let r = check_case(dir, &c);
        f.record(c.name, r);
    }
    f.finish();
}

/// `open_image` on each hostile image returns `Err`. Each open runs in a child process (this
/// test binary, running the ignored `engine_open_child` test) under an address-space limit
/// and a timeout, so a hang, a panic or an unbounded allocation shows up as a failure.
#[test]
fn engine_open_rejects_corrupt_images() {
    let tmp = tempdir();
    let dir = tmp.path();
    let mut f = Failures::new();
    // Control: the unmodified image opens, or this test would prove nothing.
    let good = mk(dir, "good", "-f qcow2", |_| {});
    let control = engine_open_in_child(&good, None, false);
    assert!(
        control.success()
            && control.stdout.contains("RESULT: opened")
            && control.stdout.contains("1 passed"),
        "open_image fails on a valid qcow2 image (in the child), so rejections prove nothing:\n{}",
        control.report()
    );
    for c in cases(dir) {
        let lenient = !c.engine_fails;
        let fmt = if c.args.contains(&"-f") {
            Some("qcow2")
        } else {
            None
        };
        let out = engine_open_in_child(&c.file, fmt, lenient);
        let result = out
            .stdout
            .lines()
            .find_map(|l| l.find("RESULT: ").map(|i| l[i + 8..].to_string()));
        let r = if out.timed_out {
            Err(format!(
                "open_image hung (killed after timeout):\n{}",
                out.report()
            ))
        } else if !out.success() || out.stderr.contains("panicked") {
            Err(format!(
                "child crashed (panic, abort or allocation failure under a {} MiB address space):\n{}",
                ENGINE_LIMITS.memory >> 20,
                out.report()
            ))
        } else if !out.stdout.contains("1 passed") {
            Err(format!(
                "child did not run engine_open_child:\n{}",
                out.report()
            ))
        } else {
            match result.as_deref() {
                Some(r) if r.starts_with("error: ") => {
                    let msg = &r["error: ".len()..];
                    eprintln!("     engine: {msg}");
                    ensure(!msg.is_empty(), || "empty error message".into())
                }
                Some(r) if r.starts_with("opened") && lenient => {
                    eprintln!("     engine: {r}");
                    Ok(())
                }
                Some(r) => Err(format!("open_image succeeded on a corrupt image ({r})")),
                None => Err(format!("child printed no RESULT line:\n{}", out.report())),
            }
        };
        f.record(c.name, r);
    }
    f.finish();
}

fn engine_open_in_child(file: &Path, fmt: Option<&str>, read_all: bool) -> Output {
    let exe = std::env::current_exe().unwrap();
    let mut c = Command::new(exe);
    c.args([
        "--ignored",
        "--exact",
        "engine_open_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("BAD_INPUT_FILE", file)
    .env("BAD_INPUT_FORMAT", fmt.unwrap_or(""))
    .env("BAD_INPUT_READ_ALL", if read_all { "1" } else { "" });
    ENGINE_LIMITS.run(&mut c)
}

/// Helper run by `engine_open_rejects_corrupt_images` in a child process (not a test on its
/// own: it fails when run without its environment).
#[test]
#[ignore = "child process of engine_open_rejects_corrupt_images"]
fn engine_open_child() {
    let file =
        std::env::var_os("BAD_INPUT_FILE").expect("run by engine_open_rejects_corrupt_images only");
    let fmt = std::env::var("BAD_INPUT_FORMAT").unwrap();
    let fmt = (!fmt.is_empty()).then_some(fmt.as_str());
    let read = std::env::var("BAD_INPUT_READ_ALL").unwrap() == "1";
    match engine::open_with(Path::new(&file), true, fmt, false) {
        Err(e) => println!("RESULT: error: {}", e.to_string().replace('\n', "\\n")),
        Ok(img) => {
            if read {
                // Lenient cases may open; reading everything must then not crash or hang.
                let r = engine::read_all(img.driver(), 1 << 20, 0);
                println!(
                    "RESULT: opened; full read: {:?}",
                    r.map(|_| ()).map_err(|e| e.to_string())
                );
            } else {
                println!("RESULT: opened");
            }
        }
    }
}

/// `img create` with sizes qemu-img rejects: same message (prefix mapped) and exit code.
#[test]
fn create_rejects_bad_sizes_like_qemu() {
    let twin = Twin::new(|_| {});
    let mut f = Failures::new();
    for size in [
        "99E",
        "-1",
        "1.5.5G",
        "16E",
        "8E",
        "9223372036854775808",
        "18446744073709551616",
        "1Z",
        "0x10",
        "",
        "1e3",
        " 1M",
        "1.5",
    ] {
        let pair = twin.run(&["create", "-f", "qcow2", "--", "x.qcow2", size]);
        f.record(
            &format!(
                "create -f qcow2 x.qcow2 {size:?} (qemu-img exit {:?})",
                pair.qemu.code
            ),
            pair.compare(Names::Prefix, verbatim),
        );
    }
    f.finish();
}

/// An image with the corrupt bit set cannot be written: opening read-write fails (as in
/// QEMU) or, at the latest, the write does; the file is left unchanged.
#[test]
fn write_to_corrupt_image_fails() {
    let tmp = tempdir();
    let p = tmp.path().join("corrupt.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "1M"]).ok();
    Patch(&p).set(q::INCOMPATIBLE_FEATURES, q::INCOMPAT_CORRUPT);
    // QEMU refuses it read-write:
    let q = qemu_io(&["-c", "write 0 512", s(&p)]);
    assert!(
        !q.success() || q.stderr.contains("corrupt") || q.stdout.contains("corrupt"),
        "qemu-io wrote to a corrupt image?\n{}",
        q.report()
    );
    let before = std::fs::read(&p).unwrap();
    match engine::open(&p, false) {
        Err(e) => eprintln!("RW open refused: {e}"),
        Ok(img) => {
            let r = img
                .driver()
                .write_at(&[1u8; 512], 0)
                .and_then(|_| img.driver().flush());
            assert!(
                r.is_err(),
                "write to an image with the corrupt bit succeeded"
            );
        }
    }
    assert_eq!(
        std::fs::read(&p).unwrap(),
        before,
        "corrupt image was modified"
    );
    // Read-only open still works (like qemu-img info / convert).
    let ro = engine::open(&p, true).map(|_| ());
    assert!(
        ro.is_ok(),
        "read-only open of a corrupt-bit image failed: {:?}",
        ro.err().map(|e| e.to_string())
    );
}

/// While `qemu-io` holds an image open read-write, an RW open through the engine fails with
/// a lock message, and so does `img info` (like qemu-img); a read-only `-U` open works.
#[test]
fn open_locked_by_qemu_fails() {
    let tmp = tempdir();
    let p = tmp.path().join("locked.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "1M"]).ok();
    let holder = qemu_io_hold(&p);
    let rw = engine::open(&p, false)
        .map(|_| ())
        .map_err(|e| e.to_string());
    let i = img(&["info", s(&p)]);
    let u = img(&["info", "-U", s(&p)]);
    drop(holder);
    let msg = rw.expect_err("engine RW open of an image locked by qemu-io succeeded");
    let low = msg.to_lowercase();
    assert!(
        low.contains("lock") || low.contains("in use"),
        "RW open error does not say lock/in use: {msg}"
    );
    assert_eq!(
        i.code,
        Some(1),
        "img info on a locked image:\n{}",
        i.report()
    );
    assert!(
        i.stderr.starts_with("img: ")
            && i.stderr.to_lowercase().contains("lock")
            && !i.stderr.contains("panicked"),
        "img info on a locked image: expected an `img: ...lock...` message:\n{}",
        i.report()
    );
    assert!(
        u.success(),
        "img info -U on a locked image failed:\n{}",
        u.report()
    );
}

/// The other direction: while the engine has an image open read-write, QEMU cannot write it
/// (QEMU's byte-range lock layout, DESIGN.md); after close it can.
#[test]
fn qemu_sees_engine_lock() {
    let tmp = tempdir();
    let p = tmp.path().join("mine.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "1M"]).ok();
    let img = engine::open(&p, false).expect("engine RW open");
    let w = qemu_io(&["-c", "write 0 512", s(&p)]);
    let held = !w.success()
        && format!("{}{}", w.stdout, w.stderr)
            .to_lowercase()
            .contains("lock");
    drop(img);
    assert!(
        held,
        "qemu-io could write an image the engine has open read-write:\n{}",
        w.report()
    );
    let w2 = qemu_io(&["-c", "write 0 512", s(&p)]);
    assert!(
        w2.success(),
        "after the engine closed the image, qemu-io still cannot write:\n{}",
        w2.report()
    );
}

/// `create` over a file another process is using, as qemu-img does it: a qcow2 create
/// fails on the writer's lock (and the truncated file is removed), a raw create, which only
/// takes qemu-img's create locks, succeeds. Same exit code, stdout, stderr and whether the
/// file is left, for img and qemu-img. (Run once each: the helpers' lock retry would find
/// the removed file gone and create a fresh one.)
#[test]
fn create_over_an_image_in_use_like_qemu() {
    let tmp = tempdir();
    for fmt in ["qcow2", "raw"] {
        let outcome = |name: &str, tool: Tool| {
            let p = tmp.path().join(format!("in-use-{fmt}-{name}.img"));
            std::fs::write(&p, vec![0x5a; 64 << 10]).unwrap();
            let holder = qemu_io_hold(&p);
            let o = tool.run_once(None, &["create", "-f", fmt, s(&p), "1M"]);
            drop(holder);
            let name = s(&p).to_string();
            let text = |t: &str| qemu_to_img_prefix(t).replace(&name, "IMAGE");
            (o.code, text(&o.stdout), text(&o.stderr), p.exists())
        };
        let want = outcome("qemu", Tool::qemu_img());
        let got = outcome("img", Tool::img());
        assert_eq!(got, want, "-f {fmt}: img (left) vs qemu-img (right)");
        let (code, left) = if fmt == "qcow2" {
            (1, false)
        } else {
            (0, true)
        };
        assert_eq!(
            (want.0, want.3),
            (Some(code), left),
            "-f {fmt}: qemu-img: {want:?}"
        );
    }
}
