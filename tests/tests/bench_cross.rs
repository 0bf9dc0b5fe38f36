//! `img bench` against `qemu-img bench`: the report lines (timings blanked), the option
//! errors word for word and the exit codes, for reads and writes (with a pattern, flush
//! intervals), on raw and qcow2 images. Writes go to twin copies, which then read back alike.

use integration_tests::twin::{Images, Names, Twin};
use integration_tests::*;

/// Blank the timing of `Run completed in N.NNN seconds.`
fn no_time(out: &str) -> String {
    out.lines()
        .map(|l| match l.strip_prefix("Run completed in ") {
            Some(_) => "Run completed in <time> seconds.".to_string(),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn setup(dir: &std::path::Path) {
    for (f, fmt) in [("a.qcow2", "qcow2"), ("a.raw", "raw")] {
        assert!(qemu_img_in(dir, &["create", "-q", "-f", fmt, f, "4M"]).success());
    }
}

#[test]
fn bench_matches_qemu() {
    let mut f = Failures::new();
    let cases: &[&[&str]] = &[
        &["-c", "1000", "a.qcow2"],
        &[
            "-c", "100", "-d", "4", "-o", "4k", "-S", "8k", "-s", "1k", "a.qcow2",
        ],
        &["-c", "0x10", "-d", "010", "-f", "raw", "a.raw"],
        &[
            "-w",
            "-c",
            "500",
            "--pattern=0x41",
            "-d",
            "8",
            "-s",
            "64k",
            "-f",
            "qcow2",
            "a.qcow2",
        ],
        &[
            "-w",
            "-c",
            "300",
            "--pattern=7",
            "-S",
            "12k",
            "-f",
            "raw",
            "a.raw",
        ],
        &[
            "-w",
            "-c",
            "200",
            "--flush-interval=64",
            "-f",
            "qcow2",
            "a.qcow2",
        ],
        &[
            "-w",
            "-c",
            "200",
            "--flush-interval=64",
            "--no-drain",
            "-f",
            "raw",
            "a.raw",
        ],
        &[
            "-c", "50", "-q", "-U", "-n", "-i", "io_uring", "-t", "none", "a.qcow2",
        ],
        &["-c", "50", "-i", "threads", "-t", "unsafe", "a.raw"],
        &["-c", "10", "-o", "1G", "a.qcow2"],
        &[
            "-w", "-c", "3", "-d", "1", "-s", "64k", "-S", "160k", "-o", "4000k", "a.qcow2",
        ],
        &[
            "-w", "-c", "2", "-s", "64k", "-o", "4100k", "-f", "raw", "a.raw",
        ],
        &["-c", "10", "-s", "8M", "a.raw"],
        &["-c", "10", "--flush-interval=64", "a.qcow2"],
        &["-c", "10", "-w", "--flush-interval=3", "a.qcow2"],
        &["-c", "x", "a.qcow2"],
        &["-c", "-1", "a.qcow2"],
        &["-c", "1k", "a.qcow2"],
        &["-d", "0", "a.qcow2"],
        &["-d", "x", "a.qcow2"],
        &["-i", "foo", "a.qcow2"],
        &["-o", "-1", "a.qcow2"],
        &["-s", "3G", "a.qcow2"],
        &["-S", "x", "a.qcow2"],
        &["-t", "foo", "a.qcow2"],
        &["--pattern=256", "a.qcow2"],
        &["--flush-interval=x", "a.qcow2"],
        &["-x", "a.qcow2"],
        &[],
        &["a", "b"],
        &["-c", "5", "nofile"],
    ];
    for args in cases {
        let twin = Twin::new(setup);
        let mut full = vec!["bench"];
        full.extend_from_slice(args);
        let pair = twin.run(&full);
        let mut errs = pair.differences(Names::Everywhere, no_time);
        if pair.both_succeeded() && args.contains(&"-w") {
            let file = args.last().expect("a file");
            errs.extend(twin.compare_images(file, Images::default()).err());
        }
        f.record(&format!("{args:?}"), pair.verdict(errs));
    }
    f.finish();
}
