//! `img create` against `qemu-img create`.
//!
//! Every case runs the same argument list through both tools, each in its own directory with
//! identical contents (same relative file names: the twin harness,
//! `integration_tests::twin`), and then checks:
//! - exit code, stdout ("Formatting '...', fmt=qcow2 ...") and stderr (with `qemu-img: `
//!   mapped to `img: `) are identical;
//! - on success, the image we made passes `qemu-img check`, `qemu-img info --output=json`
//!   reports the same as for qemu-img's image (only `actual-size` ignored, plus the host
//!   file length when nothing is preallocated), and `qemu-img compare` finds the guest
//!   contents identical;
//! - with preallocation, the file length and `qemu-img map` (offsets aside) match too.

use integration_tests::twin::{info_json, verbatim, Images, Names, Pair, Twin};
use integration_tests::*;
use std::path::Path;

/// Twin directories with the same backing files, made by qemu-img.
fn env() -> Twin {
    Twin::new(|d| {
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::create_dir_all(d.join("deep/er")).unwrap();
        qemu_img_in(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "3M"]).ok();
        qemu_img_in(d, &["create", "-q", "-f", "raw", "base.raw", "2M"]).ok();
        qemu_img_in(d, &["create", "-q", "-f", "qcow2", "sub/base2.qcow2", "5M"]).ok();
        qemu_img_in(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base2.qcow2",
                "-F",
                "qcow2",
                "sub/mid.qcow2",
            ],
        )
        .ok();
        // Some data in the backing files so that `compare` means something.
        qemu_io_cmds(
            &d.join("base.qcow2"),
            "qcow2",
            &["write -P 0x5a 64k 100k".into()],
        );
        qemu_io_cmds(
            &d.join("base.raw"),
            "raw",
            &["write -P 0xa5 1000 3000".into()],
        );
    })
}

#[derive(Clone)]
struct Case {
    name: String,
    args: Vec<String>,
    /// The image file (relative), whose results are compared.
    file: String,
    /// Compare guest contents with `qemu-img compare` (not possible with a missing backing).
    compare: bool,
}

fn case(args: &str) -> Case {
    let args: Vec<String> = shell_split(args);
    // The file is the first non-option argument after the options that take a value.
    let mut file = None;
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if ["-f", "-o", "-b", "-F"].contains(&a.as_str()) {
            i += 2;
            continue;
        }
        if a.starts_with('-') && a.len() > 1 && a != "--" {
            i += 1;
            continue;
        }
        if a == "--" {
            i += 1;
            file = args.get(i).cloned();
            break;
        }
        file = Some(a.clone());
        break;
    }
    Case {
        name: args.join(" "),
        file: file.expect("case has a file"),
        args,
        compare: true,
    }
}

fn shell_split(s: &str) -> Vec<String> {
    s.split_whitespace().map(|w| w.to_string()).collect()
}

fn with_create(c: &Case) -> Vec<String> {
    std::iter::once("create".to_string())
        .chain(c.args.iter().cloned())
        .collect()
}

fn run_case(twin: &Twin, c: &Case) -> Result<(), String> {
    twin.remove(&c.file);
    let pair = twin.run(&with_create(c));
    let mut errs = pair.differences(Names::Prefix, verbatim);
    if pair.both_succeeded() {
        let preallocated = c
            .args
            .iter()
            .any(|a| a.contains("preallocation=") && !a.contains("preallocation=off"));
        let what = Images {
            preallocated,
            contents: c.compare,
        };
        errs.extend(twin.compare_images(&c.file, what).err());
    }
    pair.verdict(errs)
}

fn run_all(cases: Vec<Case>) {
    let env = env();
    let mut f = Failures::new();
    for c in &cases {
        f.record(&c.name, run_case(&env, c));
    }
    f.finish();
}

#[test]
fn create_qcow2_options() {
    let mut cases = vec![
        case("-f qcow2 a.qcow2 1M"),
        case("-f qcow2 -o compat=0.10 a.qcow2 1M"),
        case("-f qcow2 -o compat=1.1 a.qcow2 1M"),
        case("-f qcow2 -o compat=v2 a.qcow2 1M"),
        case("-f qcow2 -o compat=v3 a.qcow2 1M"),
        case("-f qcow2 -o lazy_refcounts=on a.qcow2 1M"),
        case("-f qcow2 -o lazy_refcounts=off a.qcow2 1M"),
        case("-f qcow2 -o compat=1.1,lazy_refcounts=on a.qcow2 1M"),
        case("-f qcow2 -o compression_type=zlib a.qcow2 1M"),
        case("-f qcow2 -o compression_type=zstd a.qcow2 1M"),
        case("-f qcow2 -o compression_type=zstd,cluster_size=4k,lazy_refcounts=on a.qcow2 7M"),
        case("-f qcow2 -o extended_l2=on,cluster_size=16k a.qcow2 1M"),
        case("-f qcow2 -o extended_l2=on a.qcow2 1M"),
        case("-f qcow2 -o extended_l2=on,cluster_size=2M a.qcow2 10M"),
        case("-f qcow2 -o extended_l2=off,cluster_size=16k a.qcow2 1M"),
        case("-f qcow2 -o extended_l2=on,compression_type=zstd,refcount_bits=1,cluster_size=32k a.qcow2 3M"),
        case("-f qcow2 -q a.qcow2 1M"),
        case("-q -f qcow2 -o cluster_size=4096 a.qcow2 1M"),
        case("-f qcow2 -o size=2M a.qcow2"),
        case("-f qcow2 -o cluster_size=8k -o refcount_bits=8 a.qcow2 2M"),
        case("-f qcow2 -o preallocation=off a.qcow2 1M"),
        case("-f qcow2 -o preallocation=metadata a.qcow2 1M"),
        case("-f qcow2 -o preallocation=metadata,cluster_size=512 a.qcow2 300k"),
        case("-f qcow2 -o preallocation=metadata,extended_l2=on a.qcow2 3M"),
        case("-f qcow2 -o preallocation=falloc a.qcow2 1M"),
        case("-f qcow2 -o preallocation=falloc,cluster_size=4k a.qcow2 1000000"),
        case("-f qcow2 -o preallocation=full a.qcow2 1M"),
        case("-f qcow2 -o preallocation=full,cluster_size=2M a.qcow2 5M"),
        case("-f qcow2 -o preallocation=full,refcount_bits=64,cluster_size=1k a.qcow2 200k"),
        case("-f qcow2 -o compat=0.10,preallocation=metadata a.qcow2 1M"),
    ];
    for cs in [
        "512", "1024", "2048", "4096", "8192", "16384", "32768", "65536", "131072", "262144",
        "524288", "1M", "2M", "64k", "4k",
    ] {
        cases.push(case(&format!("-f qcow2 -o cluster_size={cs} a.qcow2 3M")));
    }
    for rb in [1, 2, 4, 8, 16, 32, 64] {
        cases.push(case(&format!("-f qcow2 -o refcount_bits={rb} a.qcow2 3M")));
        cases.push(case(&format!(
            "-f qcow2 -o refcount_bits={rb},cluster_size=512 a.qcow2 1M"
        )));
    }
    run_all(cases);
}

#[test]
fn create_qcow2_sizes() {
    let mut cases = Vec::new();
    for size in [
        "0", "1", "511", "512", "513", "1000", "1k", "1K", "1.5k", "1M", "1.5M", "1.5G", "1G",
        "2G", "1T", "4T", "100T", "1P", "3000000", "65535", "1b", "1024b", "0.5M", "1.25G",
    ] {
        cases.push(case(&format!("-f qcow2 a.qcow2 {size}")));
    }
    // Huge image with tiny clusters: L1 table gets large.
    cases.push(case("-f qcow2 -o cluster_size=512 a.qcow2 1T"));
    cases.push(case("-f qcow2 -o cluster_size=2M a.qcow2 100T"));
    run_all(cases);
}

#[test]
fn create_qcow2_backing() {
    let mut cases = vec![
        case("-f qcow2 -b base.qcow2 -F qcow2 a.qcow2"),
        case("-f qcow2 -b base.qcow2 -F qcow2 a.qcow2 8M"),
        case("-f qcow2 -b base.qcow2 -F qcow2 a.qcow2 1M"),
        case("-f qcow2 -b base.raw -F raw a.qcow2"),
        case("-f qcow2 -b base.raw -F raw a.qcow2 3M"),
        case("-f qcow2 -o backing_file=base.qcow2,backing_fmt=qcow2 a.qcow2"),
        case("-f qcow2 -o backing_file=base.qcow2,backing_fmt=qcow2,cluster_size=4k a.qcow2 5M"),
        case("-f qcow2 -o backing_file=base.raw,backing_fmt=raw,compat=0.10 a.qcow2"),
        // Relative backing paths are relative to the new image's directory.
        case("-f qcow2 -b base2.qcow2 -F qcow2 sub/a.qcow2"),
        case("-f qcow2 -b ../base.qcow2 -F qcow2 sub/a.qcow2"),
        case("-f qcow2 -b ../../sub/mid.qcow2 -F qcow2 deep/er/a.qcow2"),
        case("-f qcow2 -b mid.qcow2 -F qcow2 sub/top.qcow2"),
        case("-f qcow2 -b sub/mid.qcow2 -F qcow2 a.qcow2"),
        case("-f qcow2 -b base.qcow2 -F qcow2 -o extended_l2=on a.qcow2"),
        case(
            "-f qcow2 -b base.qcow2 -F qcow2 -o compression_type=zstd,lazy_refcounts=on a.qcow2 4M",
        ),
        // Errors: missing backing file, missing -F, size needed.
        case("-f qcow2 -b nonexist.qcow2 -F qcow2 a.qcow2 1M"),
        case("-f qcow2 -b base.qcow2 a.qcow2"),
        case("-f qcow2 -b base.qcow2 -F raw a.qcow2"),
        case("-f qcow2 a.qcow2"),
        case("-f qcow2 -b a.qcow2 -F qcow2 a.qcow2 1M"),
    ];
    // -u: backing file need not exist; then a size is required.
    let mut u = case("-f qcow2 -u -b nonexist.qcow2 -F qcow2 a.qcow2 1M");
    u.compare = false;
    cases.push(u);
    cases.push(case("-f qcow2 -u -b nonexist.qcow2 -F qcow2 a.qcow2"));
    cases.push(case("-f qcow2 -u -b base.qcow2 -F qcow2 a.qcow2 2M"));
    cases.push(case("-f qcow2 -u -b base.qcow2 -F qcow2 a.qcow2"));
    // Absolute backing path.
    let env = env();
    let abs = env.qemu_dir().join("base.qcow2");
    // Absolute paths differ between the two directories, so run it separately below.
    let mut f = Failures::new();
    for c in &cases {
        f.record(&c.name, run_case(&env, c));
    }
    // Absolute backing path: each tool gets its own directory's base; compare by substitution.
    let q = qemu_img_in(
        env.qemu_dir(),
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            s(&abs),
            "-F",
            "qcow2",
            "abs.qcow2",
        ],
    );
    let iabs = env.img_dir().join("base.qcow2");
    let i = img_in(
        env.img_dir(),
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            s(&iabs),
            "-F",
            "qcow2",
            "abs.qcow2",
        ],
    );
    let expected = q.stdout.replace(s(env.qemu_dir()), s(env.img_dir()));
    f.record(
        "-f qcow2 -b /abs/base.qcow2 -F qcow2 abs.qcow2",
        ensure(q.success() && i.success() && expected == i.stdout, || {
            format!(
                "{}\n{}\n{}",
                text_diff("qemu-img (path-substituted)", &expected, "img", &i.stdout)
                    .unwrap_or_default(),
                q.report(),
                i.report()
            )
        })
        .and_then(|_| {
            let qj = info_json(env.qemu_dir(), "abs.qcow2", false)?;
            let ij = info_json(env.img_dir(), "abs.qcow2", false)?;
            let qt = json_pretty(&qj).replace(s(env.qemu_dir()), s(env.img_dir()));
            let it = json_pretty(&ij);
            ensure(qt == it, || {
                text_diff("qemu-img info (qemu's)", &qt, "qemu-img info (img's)", &it).unwrap()
            })
        }),
    );
    f.finish();
}

#[test]
fn create_raw() {
    let cases = vec![
        case("-f raw a.raw 1M"),
        case("a.raw 1M"),
        case("a.raw 1.5G"),
        case("-f raw a.raw 0"),
        case("-f raw a.raw 1000"),
        case("-f raw -q a.raw 1M"),
        case("-f raw -o preallocation=off a.raw 1M"),
        case("-f raw -o preallocation=falloc a.raw 1M"),
        case("-f raw -o preallocation=full a.raw 1M"),
        case("-f raw -o preallocation=full a.raw 1001"),
        case("-f raw -o size=3M a.raw"),
        case("-f raw a.raw"),
        case("-f raw -o cluster_size=4k a.raw 1M"),
    ];
    run_all(cases);
}

#[test]
fn create_errors_match_qemu() {
    let cases = vec![
        case("-f qcow2 -o compat=0.10,lazy_refcounts=on a.qcow2 1M"),
        case("-f qcow2 -o compat=0.10,refcount_bits=64 a.qcow2 1M"),
        case("-f qcow2 -o compat=0.10,compression_type=zstd a.qcow2 1M"),
        case("-f qcow2 -o compat=0.10,extended_l2=on a.qcow2 1M"),
        case("-f qcow2 -o compat=1.2 a.qcow2 1M"),
        case("-f qcow2 -o refcount_bits=3 a.qcow2 1M"),
        case("-f qcow2 -o refcount_bits=128 a.qcow2 1M"),
        case("-f qcow2 -o refcount_bits=0 a.qcow2 1M"),
        case("-f qcow2 -o cluster_size=256 a.qcow2 1M"),
        case("-f qcow2 -o cluster_size=4M a.qcow2 1M"),
        case("-f qcow2 -o cluster_size=1000 a.qcow2 1M"),
        case("-f qcow2 -o extended_l2=on,cluster_size=8k a.qcow2 1M"),
        case("-f qcow2 -o compression_type=lz4 a.qcow2 1M"),
        case("-f qcow2 -o preallocation=bogus a.qcow2 1M"),
        case("-f qcow2 -o bogus_option=1 a.qcow2 1M"),
        case("-f qcow2 -o lazy_refcounts=maybe a.qcow2 1M"),
        case("-f qcow2 a.qcow2 99E"),
        case("-f qcow2 a.qcow2 16E"),
        case("-f qcow2 a.qcow2 1.5.5G"),
        case("-f qcow2 a.qcow2 12Q"),
        case("-f qcow2 a.qcow2 abc"),
        case("-f qcow2 -- a.qcow2 -1"),
        case("-f qcow2 -o size=99E a.qcow2"),
        case("-f bogusfmt a.img 1M"),
    ];
    run_all(cases);
}

/// Creating onto files that cannot be resized: /dev/null (qemu-img's 'host_device': it
/// cannot grow, takes no preallocation, and a qcow2 header written there does not read
/// back) and a FIFO (its truncation fails). Messages and exit codes as qemu-img's, and
/// neither tool blocks on the FIFO.
#[test]
fn create_on_devices_and_fifos_matches_qemu() {
    let mut f = Failures::new();
    for args in [
        "-f raw /dev/null 1M",
        "-f raw /dev/null 0",
        "-f raw -o preallocation=full /dev/null 0",
        "-f raw -o preallocation=falloc /dev/null 1M",
        "-f qcow2 /dev/null 1M",
    ] {
        let a = with_create(&case(args));
        let pair = Pair::run(Path::new("/"), Path::new("/"), &Tool::img(), &a);
        f.record(args, pair.compare(Names::Prefix, verbatim));
    }
    let twin = Twin::new(|d| {
        let c = std::ffi::CString::new(s(&d.join("p.fifo"))).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    });
    for args in ["-f raw p.fifo 1M", "-f qcow2 p.fifo 1M"] {
        let pair = twin.run(&with_create(&case(args)));
        f.record(args, pair.compare(Names::Prefix, verbatim));
    }
    f.finish();
}
