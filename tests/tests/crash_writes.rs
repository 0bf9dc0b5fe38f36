//! SIGKILL during a write-heavy workload through the engine.
//!
//! A child process (this test binary re-executed, [`zz_crash_child`]) opens a qcow2 image over
//! a backing chain (top.qcow2 over mid.qcow2 over base.raw) and has several writer threads
//! issue random writes of random lengths and alignments, zero writes (with and without
//! unmap), discards and flushes, some of them in a small window every thread shares, so that
//! concurrent writes overlap. The parent kills it with SIGKILL at a random moment (mostly
//! while the workload runs, sometimes while it is still opening the image, which repairs a
//! dirty lazy-refcount image), then:
//! - `qemu-img check` must find no corruption: leaks are allowed, and `img check -r leaks`
//!   must then leave the image clean. With lazy refcounts the image is dirty after a crash
//!   and its refcounts are stale by design: QEMU's check then repairs nothing, so `img check
//!   -r all` must rebuild them and leave the image clean;
//! - the image must read as the write log allows ([`Log::verify`]).
//!
//! The write log is exact. Before an operation each thread appends a `B` record (what, where,
//! the seed of its data), after it returns an `E` record; a flush is bracketed by `F` and `G`.
//! Each record is one `write(2)` on a file opened with `O_APPEND`, so the file orders them
//! as they happened, and a SIGKILL loses none that was written (the kernel keeps the page
//! cache of a killed process; only the engine's own unwritten state dies with it, which is
//! what is tested). The one record being written at the kill may be torn (the kernel's
//! copy stops between pages once the signal is pending); its write never returned, so
//! nothing relied on it, and the log leaves it out. An operation whose `E` precedes the `F` of a flush whose `G` is in the
//! log is durable: it must read back, unless a later durable operation (begun after it
//! ended) covers it. Everything else that was begun may or may not have reached the image,
//! per byte: concurrent overlapping operations in either order. A byte no durable operation
//! covers may also read as before the run.
//!
//! The next run goes on with the same (checked, repaired) image, so damage accumulates.
//! Configurations: 512 B, 4 KiB, 64 KiB and 2 MiB clusters, refcount widths 1, 16 and 64,
//! with and without lazy refcounts and extended L2.
//!
//! `CRASH_KILLS=<n>` sets the total kills (default 210, spread over the configurations;
//! 10000 for a long run); the seed is printed and `TEST_SEED` replays the workload and the
//! kill delays (not the threads' interleaving).

use integration_tests::sandbox::{Event, Sandbox};
use integration_tests::write_log::{data, Kind, Log};
use integration_tests::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The test the child runs.
const CHILD_TEST: &str = "zz_crash_child";
/// The line the child prints once the image is open.
const READY: &str = "CRASH-CHILD-READY";
/// The child: its address space, and the time it has to open the image.
const CHILD_LIMITS: Sandbox = Sandbox::new(4 << 30, Duration::from_secs(60));
/// A child that has not been killed by then stops with an error.
const CHILD_RUN_LIMIT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug)]
struct Config {
    cluster: u64,
    refcount_bits: u32,
    extended_l2: bool,
    lazy: bool,
    /// Virtual size.
    size: u64,
    threads: usize,
}

impl Config {
    fn options(&self) -> String {
        format!(
            "cluster_size={},refcount_bits={},extended_l2={},lazy_refcounts={}",
            self.cluster,
            self.refcount_bits,
            if self.extended_l2 { "on" } else { "off" },
            if self.lazy { "on" } else { "off" }
        )
    }
}

const CONFIGS: &[Config] = &[
    Config {
        cluster: 512,
        refcount_bits: 1,
        extended_l2: false,
        lazy: false,
        size: 4 << 20,
        threads: 3,
    },
    Config {
        cluster: 512,
        refcount_bits: 64,
        extended_l2: false,
        lazy: true,
        size: 4 << 20,
        threads: 2,
    },
    Config {
        cluster: 4096,
        refcount_bits: 16,
        extended_l2: false,
        lazy: false,
        size: 8 << 20,
        threads: 4,
    },
    Config {
        cluster: 65536,
        refcount_bits: 64,
        extended_l2: true,
        lazy: false,
        size: 16 << 20,
        threads: 3,
    },
    Config {
        cluster: 65536,
        refcount_bits: 1,
        extended_l2: true,
        lazy: true,
        size: 16 << 20,
        threads: 2,
    },
    Config {
        cluster: 2 << 20,
        refcount_bits: 64,
        extended_l2: true,
        lazy: false,
        size: 16 << 20,
        threads: 3,
    },
    Config {
        cluster: 2 << 20,
        refcount_bits: 1,
        extended_l2: false,
        lazy: true,
        size: 16 << 20,
        threads: 2,
    },
];

// ------------------------------------------------------------------------------------------
// Operations and their data

/// One operation a writer thread issues (`None`: a flush).
fn gen_op(rng: &mut Rng, cfg: &Config) -> Option<(Kind, u64, u64, u64)> {
    let size = cfg.size;
    let kind = match rng.below(20) {
        0..=11 => Kind::Write,
        12 => Kind::Zero,
        13 => Kind::ZeroUnmap,
        14..=15 => Kind::Discard,
        _ => return None,
    };
    let align = *rng.pick(&[1, 512, 4096, cfg.cluster]);
    let max_len = *rng.pick(&[4096, (3 * cfg.cluster).min(1 << 20), 256 << 10]);
    // A third of the operations go to a window of a few clusters all threads share.
    let window = if rng.chance(1, 3) {
        (4 * cfg.cluster).min(size)
    } else {
        size
    };
    let off = rng.below(window) / align * align;
    let mut len = rng.range(1, (size - off).min(max_len));
    if len >= align {
        len = len / align * align;
    }
    Some((kind, off, len, rng.next_u64()))
}

// ------------------------------------------------------------------------------------------
// The child

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"))
}

/// One record, one `write(2)` on the `O_APPEND` log.
fn record(log: &std::fs::File, line: String) {
    let mut f = log;
    f.write_all(line.as_bytes())
        .expect("append to the write log");
}

/// The child process: opens `CRASH_IMAGE` read-write and runs `CRASH_THREADS` writer
/// threads until it is killed. Does nothing in a normal test run.
#[test]
fn zz_crash_child() {
    let Ok(image) = std::env::var("CRASH_IMAGE") else {
        return;
    };
    let cfg = CONFIGS[env("CRASH_CONFIG").parse::<usize>().unwrap()];
    let seed: u64 = env("CRASH_CHILD_SEED").parse().unwrap();
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(env("CRASH_LOG"))
        .unwrap();
    let img = engine::open(Path::new(&image), false).expect("open the image read-write");
    let d = img.driver();
    println!("{READY}");
    std::io::stdout().flush().unwrap();
    let start = Instant::now();
    std::thread::scope(|sc| {
        for t in 0..cfg.threads {
            let log = &log;
            sc.spawn(move || {
                let mut rng = Rng::new(seed ^ (t as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F));
                for n in 0u64.. {
                    assert!(start.elapsed() < CHILD_RUN_LIMIT, "never killed");
                    let id = (t as u64) << 40 | n;
                    let Some((kind, off, len, dseed)) = gen_op(&mut rng, &cfg) else {
                        record(log, format!("F {id}\n"));
                        d.flush().expect("flush");
                        record(log, format!("G {id}\n"));
                        continue;
                    };
                    record(log, format!("B {id} {} {off} {len} {dseed}\n", kind.code()));
                    let r = match kind {
                        Kind::Write => d.write_at(&data(dseed, off, len), off),
                        Kind::Zero => d.write_zeroes(off, len, false),
                        Kind::ZeroUnmap => d.write_zeroes(off, len, true),
                        Kind::Discard => d.discard(off, len),
                    };
                    if let Err(e) = r {
                        panic!("{kind:?} {off:#x}+{len:#x} failed: {e}");
                    }
                    record(log, format!("E {id}\n"));
                }
            });
        }
    });
}

// ------------------------------------------------------------------------------------------
// The parent

/// The chain: base.raw (random data over its first part, holes, shorter than the guest),
/// mid.qcow2 (patterns over part of it) and top.qcow2 in the configuration under test.
fn make_chain(dir: &Path, cfg: &Config, rng: &mut Rng) -> PathBuf {
    let mut base = vec![0u8; (cfg.size * 3 / 4) as usize];
    for chunk in base.chunks_mut(64 << 10) {
        if rng.chance(3, 4) {
            rng.fill(chunk);
        }
    }
    std::fs::write(dir.join("base.raw"), &base).unwrap();
    let create = |file: &str, opts: &str, backing: &str, fmt: &str| {
        qemu_img_in(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                opts,
                "-b",
                backing,
                "-F",
                fmt,
                file,
                &cfg.size.to_string(),
            ],
        )
        .ok();
    };
    create("mid.qcow2", "cluster_size=65536", "base.raw", "raw");
    let mut cmds = Vec::new();
    let mut pos = 0;
    while pos < cfg.size {
        let len = rng.range(1, 300_000).min(cfg.size - pos);
        if rng.chance(1, 3) {
            cmds.push(format!("write -q -P {} {pos} {len}", rng.range(1, 255)));
        } else if rng.chance(1, 6) {
            cmds.push(format!("write -q -z {pos} {len}"));
        }
        pos += len;
    }
    qemu_io_cmds(&dir.join("mid.qcow2"), "qcow2", &cmds);
    create("top.qcow2", &cfg.options(), "mid.qcow2", "qcow2");
    dir.join("top.qcow2")
}

/// What one kill found, for the summary.
#[derive(Default)]
struct Stats {
    kills: usize,
    before_ready: usize,
    ops: usize,
    in_flight: usize,
    flushes: usize,
    leaked: usize,
    dirty: usize,
}

/// Kill the child `kills` times on one chain; `Err` describes the first failure.
fn run_config(ci: usize, kills: usize, seed: u64, dir: &Path) -> Result<Stats, String> {
    let cfg = &CONFIGS[ci];
    let mut rng = Rng::new(seed);
    let top = make_chain(dir, cfg, &mut rng);
    let log_path = dir.join("writes.log");
    let exe = PathBuf::from(format!("/proc/{}/exe", std::process::id()));
    let mut before = qemu_read_all(&top, Some("qcow2"), dir);
    let mut stats = Stats::default();
    for k in 0..kills {
        let _ = std::fs::remove_file(&log_path);
        let child_seed = rng.next_u64();
        let ctx = |m: String| format!("kill {k} (child seed {child_seed}): {m}");
        let mut cmd = Command::new(&exe);
        cmd.args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env("CRASH_IMAGE", &top)
            .env("CRASH_LOG", &log_path)
            .env("CRASH_CONFIG", ci.to_string())
            .env("CRASH_CHILD_SEED", child_seed.to_string())
            .env("RUST_BACKTRACE", "0");
        let early = rng.chance(1, 10);
        // Debug builds: a few hundred operations in that time.
        let delay = Duration::from_micros(rng.range(if early { 0 } else { 2_000 }, 250_000));
        let child = CHILD_LIMITS.spawn(&mut cmd);
        if early {
            std::thread::sleep(delay);
        } else {
            loop {
                match child.next_line(Duration::from_secs(1)) {
                    // libtest prints "test NAME ... " on the same line first.
                    Event::Line(l) if l.ends_with(READY) => break,
                    Event::Line(_) | Event::Quiet => {}
                    Event::Expired | Event::Closed => {
                        let (status, stderr) = child.finish();
                        return Err(ctx(format!(
                            "the child did not open the image: {status}\n{stderr}"
                        )));
                    }
                }
            }
            std::thread::sleep(delay);
        }
        let (status, stderr) = child.finish();
        use std::os::unix::process::ExitStatusExt;
        if status.signal() != Some(libc::SIGKILL) {
            return Err(ctx(format!(
                "the child ended before the kill: {status}\n{stderr}"
            )));
        }
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if early && text.is_empty() {
            stats.before_ready += 1;
        }
        let log = Log::parse(&text, cfg.cluster).map_err(&ctx)?;
        stats.kills += 1;
        stats.ops += log.begun;
        stats.in_flight += log.in_flight;
        stats.flushes += log.flushes;
        let dirty = cfg.lazy && qcow2_is_dirty(&top);
        if check_after_kill(&Tool::img(), &top, cfg.lazy)
            .map_err(&ctx)?
            .is_some()
        {
            if dirty {
                stats.dirty += 1;
            } else {
                stats.leaked += 1;
            }
        }
        let got = qemu_read_all(&top, Some("qcow2"), dir);
        log.verify(&before, &got).map_err(|m| {
            ctx(format!(
                "{m}\n  ({} operations begun, {} in flight, {} flushes completed)",
                log.begun, log.in_flight, log.flushes
            ))
        })?;
        before = got;
    }
    Ok(stats)
}

#[test]
fn sigkill_during_writes_loses_no_flushed_write() {
    if !have_qemu_img() {
        return;
    }
    let total: usize = std::env::var("CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(210);
    let per = total.div_ceil(CONFIGS.len());
    let seed = seed(0xc4a5_0217);
    let tmp = tempdir();
    let mut f = Failures::new();
    let (mut kills, mut in_flight) = (0, 0);
    for (ci, cfg) in CONFIGS.iter().enumerate() {
        let dir = tmp.path().join(format!("config-{ci}"));
        std::fs::create_dir(&dir).unwrap();
        let s = seed.wrapping_mul(31).wrapping_add(ci as u64);
        let start = Instant::now();
        let name = format!("{} ({} threads)", cfg.options(), cfg.threads);
        let r = run_config(ci, per, s, &dir).map(|st| {
            eprintln!(
                "{name}: {} kills in {:?} ({} before the open finished): {} operations begun, \
                 {} in flight at the kill, {} flushes completed; {} left leaks, {} dirty",
                st.kills,
                start.elapsed(),
                st.before_ready,
                st.ops,
                st.in_flight,
                st.flushes,
                st.leaked,
                st.dirty
            );
            kills += st.kills;
            in_flight += st.in_flight;
        });
        f.record(&name, r);
    }
    f.finish();
    assert!(kills >= total, "only {kills} of {total} kills ran");
    // Most kills must land mid-operation, or the test shows little.
    assert!(
        in_flight * 2 >= kills,
        "only {in_flight} operations in flight over {kills} kills"
    );
}
