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
//! what is tested). An operation whose `E` precedes the `F` of a flush whose `G` is in the
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `write_at` of [`data`] bytes.
    Write,
    /// `write_zeroes`, `may_unmap` false / true.
    Zero,
    ZeroUnmap,
    /// `discard`: the clusters it covers whole read zero, the partial ones at either end
    /// may read zero or as they were.
    Discard,
}

impl Kind {
    fn code(self) -> char {
        match self {
            Kind::Write => 'w',
            Kind::Zero => 'z',
            Kind::ZeroUnmap => 'u',
            Kind::Discard => 'd',
        }
    }
    fn from_code(c: &str) -> Option<Kind> {
        Some(match c {
            "w" => Kind::Write,
            "z" => Kind::Zero,
            "u" => Kind::ZeroUnmap,
            "d" => Kind::Discard,
            _ => return None,
        })
    }
}

/// The byte a write with data seed `seed` puts at guest offset `pos`. A function of the
/// guest offset, so that any part of a write's data is cheap to recompute; one seed in
/// eight writes a repeated byte (one in sixteen zeroes).
fn data_byte(seed: u64, pos: u64) -> u8 {
    if seed.is_multiple_of(8) {
        return if seed.is_multiple_of(16) {
            0
        } else {
            (seed >> 8) as u8
        };
    }
    let word = Rng::new(seed ^ (pos / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64();
    word.to_le_bytes()[(pos % 8) as usize]
}

fn data(seed: u64, off: u64, len: u64) -> Vec<u8> {
    if seed.is_multiple_of(8) {
        return vec![data_byte(seed, 0); len as usize];
    }
    // Word by word: the test's debug build checks megabytes of it after each kill.
    let mut out = Vec::with_capacity(len as usize + 16);
    for w in off / 8..(off + len).div_ceil(8) {
        let word = Rng::new(seed ^ w.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64();
        out.extend_from_slice(&word.to_le_bytes());
    }
    let skip = (off % 8) as usize;
    out.drain(..skip);
    out.truncate(len as usize);
    out
}

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
// The model

/// What one operation may have left at the bytes it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Effect {
    /// Its data (a write) or zeroes (zero writes, the whole clusters of a discard).
    Data,
    Zeroes,
    /// Zeroes or nothing: the partial clusters at a discard's ends. Never makes what was
    /// there before impossible.
    MaybeZeroes,
}

/// A piece of a logged operation, with the positions of its records in the log.
#[derive(Clone, Debug)]
struct Piece {
    effect: Effect,
    off: u64,
    len: u64,
    seed: u64,
    /// The operation, for messages.
    what: String,
    begin: usize,
    end: Option<usize>,
}

/// The write log of one child, parsed.
struct Log {
    pieces: Vec<Piece>,
    /// The `F` position of the last flush that completed (0: none).
    flushed_before: usize,
    /// Operations begun, begun and not ended (in flight at the kill), flushes completed.
    begun: usize,
    in_flight: usize,
    flushes: usize,
}

impl Log {
    fn parse(text: &str, cluster: u64) -> Result<Log, String> {
        use std::collections::HashMap;
        let mut open: HashMap<u64, Vec<usize>> = HashMap::new();
        let mut flush_begin: HashMap<u64, usize> = HashMap::new();
        let mut pieces = Vec::new();
        let (mut flushed_before, mut flushes) = (0, 0);
        // A torn last line (the kill hit mid-record) cannot happen with one write(2) per
        // record; reject it rather than guess.
        if !text.is_empty() && !text.ends_with('\n') {
            return Err("the write log ends in a partial record".into());
        }
        for (pos, line) in text.lines().enumerate() {
            let pos = pos + 1;
            let f: Vec<&str> = line.split(' ').collect();
            let bad = || format!("bad log record {pos}: {line:?}");
            let id: u64 = f.get(1).and_then(|v| v.parse().ok()).ok_or_else(bad)?;
            match f[0] {
                "B" if f.len() == 6 => {
                    let kind = Kind::from_code(f[2]).ok_or_else(bad)?;
                    let n = |i: usize| f[i].parse::<u64>().map_err(|_| bad());
                    let (off, len, seed) = (n(3)?, n(4)?, n(5)?);
                    let what = format!(
                        "{kind:?} {off:#x}+{len:#x} (thread {}, op {})",
                        id >> 40,
                        id & 0xff_ffff_ffff
                    );
                    let mut add = |effect, off: u64, end: u64| {
                        if end > off {
                            open.entry(id).or_default().push(pieces.len());
                            pieces.push(Piece {
                                effect,
                                off,
                                len: end - off,
                                seed,
                                what: what.clone(),
                                begin: pos,
                                end: None,
                            });
                        }
                    };
                    match kind {
                        Kind::Write => add(Effect::Data, off, off + len),
                        Kind::Zero | Kind::ZeroUnmap => add(Effect::Zeroes, off, off + len),
                        Kind::Discard => {
                            let end = off + len;
                            let a = off.div_ceil(cluster) * cluster;
                            let b = end / cluster * cluster;
                            if a < b {
                                add(Effect::MaybeZeroes, off, a);
                                add(Effect::Zeroes, a, b);
                                add(Effect::MaybeZeroes, b, end);
                            } else {
                                add(Effect::MaybeZeroes, off, end);
                            }
                        }
                    }
                    open.entry(id).or_default();
                }
                "E" => {
                    for i in open.remove(&id).ok_or_else(bad)? {
                        pieces[i].end = Some(pos);
                    }
                }
                "F" => {
                    flush_begin.insert(id, pos);
                }
                "G" => {
                    flushed_before = flushed_before.max(flush_begin.remove(&id).ok_or_else(bad)?);
                    flushes += 1;
                }
                _ => return Err(bad()),
            }
        }
        let begun = text.lines().filter(|l| l.starts_with("B ")).count();
        Ok(Log {
            pieces,
            flushed_before,
            begun,
            in_flight: open.len(),
            flushes,
        })
    }

    /// Whether `p` completed before a flush that completed began.
    fn durable(&self, p: &Piece) -> bool {
        p.effect != Effect::MaybeZeroes && p.end.is_some_and(|e| e < self.flushed_before)
    }

    /// Check `got` (the image after the kill) against `before` (the image before the run):
    /// every byte must hold what one of the operations allowed there left, or what was
    /// there before when no durable operation covers it.
    fn verify(&self, before: &[u8], got: &[u8]) -> Result<(), String> {
        if before.len() != got.len() {
            return Err(format!("size changed: {} -> {}", before.len(), got.len()));
        }
        let size = got.len() as u64;
        // Elementary intervals: the same operations cover every byte of one.
        let mut cuts: Vec<u64> = vec![0, size];
        for p in &self.pieces {
            cuts.push(p.off);
            cuts.push(p.off + p.len);
        }
        cuts.sort_unstable();
        cuts.dedup();
        let mut starts: Vec<usize> = (0..self.pieces.len()).collect();
        starts.sort_by_key(|&i| self.pieces[i].off);
        let mut next = 0;
        let mut active: Vec<usize> = Vec::new();
        for w in cuts.windows(2) {
            let (lo, hi) = (w[0], w[1]);
            active.retain(|&i| self.pieces[i].off + self.pieces[i].len > lo);
            while next < starts.len() && self.pieces[starts[next]].off <= lo {
                active.push(starts[next]);
                next += 1;
            }
            self.verify_interval(lo, hi, &active, before, got)?;
        }
        Ok(())
    }

    fn verify_interval(
        &self,
        lo: u64,
        hi: u64,
        active: &[usize],
        before: &[u8],
        got: &[u8],
    ) -> Result<(), String> {
        let p = |i: usize| &self.pieces[i];
        // `b` began after `a` ended: `a` cannot have landed over `b`.
        let after = |a: &Piece, b: &Piece| a.end.is_some_and(|e| e < b.begin);
        let durable: Vec<usize> = active
            .iter()
            .copied()
            .filter(|&i| self.durable(p(i)))
            .collect();
        let allowed: Vec<usize> = active
            .iter()
            .copied()
            .filter(|&i| !durable.iter().any(|&d| after(p(i), p(d))))
            .collect();
        let range = lo as usize..hi as usize;
        let got = &got[range.clone()];
        let mut candidates: Vec<Vec<u8>> = Vec::new();
        if durable.is_empty() {
            candidates.push(before[range].to_vec());
        }
        for &i in &allowed {
            candidates.push(match p(i).effect {
                Effect::Data => data(p(i).seed, lo, hi - lo),
                Effect::Zeroes | Effect::MaybeZeroes => vec![0; (hi - lo) as usize],
            });
        }
        if candidates.iter().any(|c| c == got) {
            return Ok(());
        }
        // Mixed: per byte, any candidate (concurrent writes, a write torn by the kill).
        let Some(k) = (0..got.len()).find(|&k| !candidates.iter().any(|c| c[k] == got[k])) else {
            return Ok(());
        };
        let at = lo + k as u64;
        let mut msg = format!(
            "guest byte {at:#x} reads {:#04x}; allowed there: {}",
            got[k],
            if durable.is_empty() {
                format!("{:#04x} (as before the run)", before[at as usize])
            } else {
                "nothing from before the run".into()
            }
        );
        let describe = |i: usize| {
            let q = p(i);
            format!(
                "{} [{:?}, records {}..{}{}]",
                q.what,
                q.effect,
                q.begin,
                q.end.map_or("(in flight)".to_string(), |e| e.to_string()),
                if self.durable(q) { ", durable" } else { "" }
            )
        };
        for &i in active {
            let byte = match p(i).effect {
                Effect::Data => data_byte(p(i).seed, at),
                _ => 0,
            };
            msg += &format!(
                "\n  {} {byte:#04x} from {}",
                if allowed.contains(&i) {
                    "allowed"
                } else {
                    "superseded"
                },
                describe(i)
            );
        }
        msg += &format!(
            "\n  last completed flush began at record {}",
            self.flushed_before
        );
        Err(msg)
    }
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

/// Whether the image's header has the dirty bit (lazy refcounts in use).
fn is_dirty(path: &Path) -> bool {
    use integration_tests::qcow2_layout::{get_be, INCOMPATIBLE_FEATURES, INCOMPAT_DIRTY};
    let mut head = [0u8; 80];
    std::io::Read::read_exact(&mut std::fs::File::open(path).unwrap(), &mut head).unwrap();
    get_be(
        &head,
        INCOMPATIBLE_FEATURES.offset,
        INCOMPATIBLE_FEATURES.width,
    ) & INCOMPAT_DIRTY
        != 0
}

/// `qemu-img check` finds no corruption (leaks allowed; a dirty image must be repaired
/// by `img check -r all`), and after the repair the image is clean.
fn check_after_kill(path: &Path, dirty_allowed: bool, stats: &mut Stats) -> Result<(), String> {
    let dirty = dirty_allowed && is_dirty(path);
    let chk = qemu_img(&["check", s(path)]);
    let mode = match chk.code {
        Some(0) => return Ok(()),
        Some(3) => "leaks",
        Some(2) if dirty => "all",
        _ => {
            return Err(format!(
                "qemu-img check finds corruption{}:\n{}",
                if dirty { " (dirty image)" } else { "" },
                chk.report()
            ))
        }
    };
    if dirty {
        stats.dirty += 1;
    } else {
        stats.leaked += 1;
    }
    let rep = img(&["check", "-r", mode, s(path)]);
    let again = qemu_img(&["check", s(path)]);
    if !again.success() {
        return Err(format!(
            "not clean after img check -r {mode}:\n{}\n{}",
            rep.report(),
            again.report()
        ));
    }
    Ok(())
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
        check_after_kill(&top, cfg.lazy, &mut stats).map_err(&ctx)?;
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

/// The model itself: a flushed write must read back, an unflushed one may or may not, a
/// write superseded by a later durable one may not, overlapping concurrent ones either way.
#[test]
fn model_self_test() {
    let log = |t: &str| Log::parse(t, 512).unwrap();
    let before = vec![7u8; 4096];
    let with = |seed, off: u64, len: u64, mut img: Vec<u8>| {
        img[off as usize..(off + len) as usize].copy_from_slice(&data(seed, off, len));
        img
    };
    // Written then flushed: must be there.
    let l = log("B 1 w 100 50 3\nE 1\nF 2\nG 2\n");
    assert!(l.verify(&before, &with(3, 100, 50, before.clone())).is_ok());
    assert!(l.verify(&before, &before).is_err());
    // Written, flush begun before the write ended: not durable, either way.
    let l = log("B 1 w 100 50 3\nF 2\nE 1\nG 2\n");
    assert!(l.verify(&before, &before).is_ok());
    assert!(l.verify(&before, &with(3, 100, 50, before.clone())).is_ok());
    // Superseded: the second write began after the first ended and is durable.
    let l = log("B 1 w 0 512 3\nE 1\nB 2 w 0 512 5\nE 2\nF 3\nG 3\n");
    assert!(l.verify(&before, &with(3, 0, 512, before.clone())).is_err());
    assert!(l.verify(&before, &with(5, 0, 512, before.clone())).is_ok());
    // Concurrent and both durable: either, or a mix.
    let l = log("B 1 w 0 512 3\nB 2 w 0 512 5\nE 1\nE 2\nF 3\nG 3\n");
    assert!(l.verify(&before, &with(3, 0, 512, before.clone())).is_ok());
    assert!(l
        .verify(&before, &with(5, 0, 256, with(3, 0, 512, before.clone())))
        .is_ok());
    assert!(l.verify(&before, &before).is_err());
    // A discard: the whole cluster reads zero once durable, the partial ends either way.
    let l = log("B 1 d 256 1024 0\nE 1\nF 2\nG 2\n");
    let mut z = before.clone();
    z[512..1024].fill(0);
    assert!(l.verify(&before, &z).is_ok());
    z[256..300].fill(0);
    assert!(l.verify(&before, &z).is_ok());
    assert!(l.verify(&before, &before).is_err());
    // The data of a piece of a write is that piece of the write's data.
    for seed in [3, 8, 16, 0x1234_5677] {
        let whole = data(seed, 0, 100);
        for (off, len) in [(0, 100), (3, 50), (8, 8), (13, 1), (97, 3)] {
            let want: Vec<u8> = (off..off + len).map(|p| data_byte(seed, p)).collect();
            assert_eq!(data(seed, off, len), want);
            assert_eq!(want, whole[off as usize..(off + len) as usize]);
        }
    }
    // A partial record cannot come from one write(2).
    assert!(Log::parse("B 1 w 0 1", 512).is_err());
}
