//! Property test: random sequences of write / write_zeroes / discard / read / flush (reads and
//! writes a third of the time as scatter lists through the vectored calls) through
//! the engine, checked against an in-memory model, on qcow2 images of several cluster sizes
//! (512, 4K, 64K, 2M), refcount widths (1, 16, 64), with and without extended L2, with and
//! without a qcow2 backing file full of random data.
//!
//! Semantics modelled (verified against qemu-io 10.0.2 on v3 images):
//! - `write` stores the bytes; `write_zeroes` makes exactly the range read zero;
//! - `discard` of whole clusters makes them read zero, with or without a backing file (QEMU
//!   sets the zero flag in v3 images; without backing an unallocated cluster reads zero);
//!   QEMU ignores the partial clusters at the head and tail of an unaligned discard, and
//!   the trait allows zeroing them, so those bytes may read either unchanged or zero (the
//!   first read decides, later reads must agree).
//!
//! - `make_empty` (the format operation `commit` applies to its overlay) makes the whole
//!   image read as its backing file again (zeroes without one).
//!
//! Every read is checked as it happens. After each sequence: `qemu-img check` is clean,
//! `qemu-img compare` of the image against the model (as a raw file) says identical, and a
//! fresh engine open reads the model.
//!
//! Concurrency: `prop_concurrent_threads` runs sequences from several threads on disjoint,
//! cluster-aligned slices of one image; `prop_concurrent_overlapping_writers` has 2 to 4
//! threads write small pieces of their own bytes where the bytes of different threads share
//! clusters and subclusters (with and without extended L2, through the page cache and with
//! O_DIRECT), and checks that no write was lost; `prop_concurrent_overlapping_ops` has 2 to
//! 4 threads write, zero, discard, read and flush the same bytes at once, checked against
//! the write-log model of `integration_tests::write_log` (operations in flight together land
//! in either order), every read as well as the end result, over many seeds.
//!
//! Reproduce: the seed is printed; `TEST_SEED=<seed>` replays it, `PROP_SEQUENCES=<n>` sets
//! the sequences per configuration (default 2), `PROP_OPS=<n>` the ops per sequence (default 60).

use integration_tests::*;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
enum Op {
    /// `split` != 0: the buffer goes as a scatter list cut at points drawn from that seed.
    Write {
        off: u64,
        len: u64,
        fill: u64,
        split: u64,
    },
    Zero {
        off: u64,
        len: u64,
        unmap: bool,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Read {
        off: u64,
        len: u64,
        split: u64,
    },
    Flush,
    /// Change the virtual size (shrinking drops what lies past the new end; what a grow
    /// adds reads as zeroes).
    Resize {
        size: u64,
    },
    /// The format operation `Image::make_empty` (sequences only, not the threaded tests).
    MakeEmpty,
}

struct Model {
    data: Vec<u8>,
    /// Bytes that may read as their `data` value or as zero (partial discards).
    maybe_zero: Vec<bool>,
}

impl Model {
    fn apply(&mut self, op: &Op, buf: &[u8], discard_unit: u64) {
        match *op {
            Op::Write { off, len, .. } => {
                self.data[off as usize..(off + len) as usize].copy_from_slice(buf);
                self.maybe_zero[off as usize..(off + len) as usize].fill(false);
            }
            Op::Zero { off, len, .. } => {
                self.data[off as usize..(off + len) as usize].fill(0);
                self.maybe_zero[off as usize..(off + len) as usize].fill(false);
            }
            Op::Discard { off, len } => {
                let size = self.data.len() as u64;
                let end = off + len;
                let first_full = off.div_ceil(discard_unit) * discard_unit;
                // The last (partial) cluster of an image counts as whole when the discard
                // reaches the end of the image.
                let last_full = if end == size {
                    end
                } else {
                    end / discard_unit * discard_unit
                };
                for i in off..end {
                    if i >= first_full && i < last_full {
                        self.data[i as usize] = 0;
                        self.maybe_zero[i as usize] = false;
                    } else if self.data[i as usize] != 0 {
                        self.maybe_zero[i as usize] = true;
                    }
                }
            }
            Op::Resize { size } => {
                self.data.resize(size as usize, 0);
                self.maybe_zero.resize(size as usize, false);
            }
            Op::Read { .. } | Op::Flush | Op::MakeEmpty => {}
        }
    }

    /// Check `got` against the model at `off`, resolving maybe-zero bytes.
    fn check_read(&mut self, off: u64, got: &[u8]) -> Result<(), String> {
        for (k, &b) in got.iter().enumerate() {
            let i = off as usize + k;
            let want = self.data[i];
            if b == want {
                self.maybe_zero[i] = false;
            } else if self.maybe_zero[i] && b == 0 {
                self.data[i] = 0;
                self.maybe_zero[i] = false;
            } else {
                let end = (k..got.len())
                    .find(|&j| {
                        got[j] == self.data[off as usize + j]
                            || (self.maybe_zero[off as usize + j] && got[j] == 0)
                    })
                    .unwrap_or(got.len());
                return Err(format!(
                    "byte {i} ({i:#x}) reads {b:#04x}, model says {want:#04x}{}; {} wrong bytes in a row",
                    if self.maybe_zero[i] { " or 0" } else { "" },
                    end - k
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Config {
    cluster: u64,
    refcount_bits: u32,
    extended_l2: bool,
    backing: bool,
    /// More `-o` options (compat=0.10, lazy_refcounts=on, ...).
    extra: &'static str,
}

impl Config {
    fn size(&self) -> u64 {
        match self.cluster {
            512 => 1 << 20,
            4096 => 3 << 20,
            65536 => 8 << 20,
            _ => 16 << 20,
        }
    }
    fn name(&self) -> String {
        format!(
            "cluster_size={},refcount_bits={},extended_l2={},backing={}{}{}",
            self.cluster,
            self.refcount_bits,
            if self.extended_l2 { "on" } else { "off" },
            self.backing,
            if self.extra.is_empty() { "" } else { "," },
            self.extra
        )
    }
}

/// A random op on an image of `size` bytes; `resizable` allows resizes (up to `max_size`).
fn gen_op(rng: &mut Rng, size: u64, cluster: u64, resizable: Option<u64>) -> Op {
    if let Some(max) = resizable {
        if rng.chance(1, 30) {
            return Op::Resize {
                size: rng.range(1, max / 512) * 512,
            };
        }
    }
    let align = match rng.below(4) {
        0 | 1 => 1,
        2 => 512,
        _ => cluster,
    };
    let max_len = match rng.below(4) {
        0 => 4096,
        1 | 2 => (3 * cluster).min(1 << 20),
        _ => 1 << 20,
    };
    let mut off = rng.below(size) / align * align;
    if rng.chance(1, 20) {
        off = size - rng.range(1, size.min(cluster * 2)); // near the end
    }
    let mut len = rng.range(1, (size - off).min(max_len));
    if align > 1 && len >= align {
        len = len / align * align;
    }
    let split = if rng.chance(1, 3) {
        rng.next_u64() | 1
    } else {
        0
    };
    match rng.below(20) {
        0..=6 => Op::Write {
            off,
            len,
            fill: rng.next_u64(),
            split,
        },
        7..=9 => Op::Zero {
            off,
            len,
            unmap: rng.chance(1, 2),
        },
        10..=12 => Op::Discard { off, len },
        13..=18 => Op::Read { off, len, split },
        _ => Op::Flush,
    }
}

/// Lengths of the pieces a buffer of `len` bytes is cut into for a vectored request (one
/// piece when `split` is 0; otherwise 2..=9 pieces, some possibly empty).
fn pieces(split: u64, len: u64) -> Vec<usize> {
    if split == 0 {
        return vec![len as usize];
    }
    let mut r = Rng::new(split);
    let mut cuts: Vec<u64> = (0..r.range(1, 8)).map(|_| r.below(len + 1)).collect();
    cuts.push(0);
    cuts.push(len);
    cuts.sort_unstable();
    cuts.windows(2).map(|w| (w[1] - w[0]) as usize).collect()
}

/// Write `buf` at `off`: with `write_at`, or cut up with `write_vectored_at`.
fn write_split(
    d: &dyn common::BlockDriver,
    buf: &[u8],
    off: u64,
    split: u64,
) -> common::Result<()> {
    if split == 0 {
        return d.write_at(buf, off);
    }
    let mut rest = buf;
    let mut bufs = Vec::new();
    for n in pieces(split, buf.len() as u64) {
        let (a, b) = rest.split_at(n);
        bufs.push(common::IoBuf::from(a));
        rest = b;
    }
    d.write_vectored_at(&bufs, off)
}

/// Read into `buf` from `off`: with `read_at`, or cut up with `read_vectored_at`.
fn read_split(
    d: &dyn common::BlockDriver,
    buf: &mut [u8],
    off: u64,
    split: u64,
) -> common::Result<()> {
    if split == 0 {
        return d.read_at(buf, off);
    }
    let len = buf.len() as u64;
    let mut rest = buf;
    let mut bufs = Vec::new();
    for n in pieces(split, len) {
        let (a, b) = std::mem::take(&mut rest).split_at_mut(n);
        bufs.push(common::IoBufMut::from(a));
        rest = b;
    }
    d.read_vectored_at(&bufs, off)
}

fn fill_buf(fill: u64, len: u64) -> Vec<u8> {
    let mut r = Rng::new(fill);
    let mut b = vec![0u8; len as usize];
    if fill.is_multiple_of(4) {
        // Sometimes a buffer that is all zeroes, or a single byte repeated.
        let v = (fill >> 8) as u8 & if fill.is_multiple_of(8) { 0 } else { 0xff };
        b.fill(v);
    } else {
        r.fill(&mut b);
    }
    b
}

/// Create the image (and its backing file), return the path and the initial guest contents.
fn make_image(cfg: &Config, dir: &Path, rng: &mut Rng, idx: usize) -> (PathBuf, Vec<u8>) {
    let size = cfg.size();
    let p = dir.join(format!("prop-{idx}.qcow2"));
    let mut opts = format!(
        "cluster_size={},refcount_bits={},extended_l2={}",
        cfg.cluster,
        cfg.refcount_bits,
        if cfg.extended_l2 { "on" } else { "off" }
    );
    if !cfg.extra.is_empty() {
        opts = format!("{opts},{}", cfg.extra);
    }
    if !cfg.backing {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opts,
            s(&p),
            &size.to_string(),
        ])
        .ok();
        return (p, vec![0u8; size as usize]);
    }
    let b = dir.join(format!("prop-{idx}-base.qcow2"));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536",
        s(&b),
        &size.to_string(),
    ])
    .ok();
    // Random data over most of the backing file, leaving some holes.
    let src = dir.join("random.bin");
    let mut data = vec![0u8; 1_000_003];
    rng.fill(&mut data);
    std::fs::write(&src, &data).unwrap();
    let mut cmds = Vec::new();
    let mut pos = 0;
    while pos < size {
        let len = rng.range(1, 300_000).min(size - pos);
        if rng.chance(4, 5) {
            cmds.push(format!("write -q -s {} {pos} {len}", s(&src)));
        }
        pos += len;
    }
    qemu_io_cmds(&b, "qcow2", &cmds);
    let base = qemu_read_all(&b, Some("qcow2"), dir);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &opts,
        "-b",
        s(&b),
        "-F",
        "qcow2",
        s(&p),
    ])
    .ok();
    (p, base)
}

fn fmt_ops(ops: &[Op]) -> String {
    ops.iter()
        .enumerate()
        .map(|(i, o)| format!("  #{i}: {o:?}\n"))
        .collect()
}

/// Run one sequence; `Err` explains the first failure.
fn run_sequence(
    cfg: &Config,
    dir: &Path,
    seed: u64,
    nops: usize,
    idx: usize,
) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let (path, initial) = make_image(cfg, dir, &mut rng, idx);
    let size = cfg.size();
    let backing = initial.clone();
    let mut model = Model {
        maybe_zero: vec![false; initial.len()],
        data: initial,
    };
    let discard_unit = cfg.cluster;
    let mut done: Vec<Op> = Vec::new();
    // Each op is logged before it runs, so that a hang can be reported with the op it hung in.
    let mut oplog = std::fs::File::create(ops_log(dir, idx)).unwrap();
    let ctx = |done: &[Op], msg: String| {
        format!("{msg}\nops so far ({}):\n{}", done.len(), fmt_ops(done))
    };
    {
        let img = engine::open(&path, false).map_err(|e| format!("open_image (rw) failed: {e}"))?;
        let d = img.driver();
        if d.size() != size {
            return Err(format!("engine size {} != {size}", d.size()));
        }
        // v2 images cannot grow over a longer backing file (no zero clusters), as in QEMU.
        let resizable = (!(cfg.backing && cfg.extra.contains("compat=0.10"))).then_some(2 * size);
        let mut size = size;
        for _ in 0..nops {
            let op = if rng.chance(1, 40) {
                Op::MakeEmpty
            } else {
                gen_op(&mut rng, size, cfg.cluster, resizable)
            };
            done.push(op.clone());
            {
                use std::io::Write;
                let _ = writeln!(oplog, "  #{}: {op:?}", done.len() - 1);
            }
            let res = match op {
                Op::Write {
                    off,
                    len,
                    fill,
                    split,
                } => {
                    let buf = fill_buf(fill, len);
                    let r = write_split(d, &buf, off, split);
                    model.apply(&op, &buf, discard_unit);
                    r
                }
                Op::Zero { off, len, unmap } => {
                    let r = d.write_zeroes(off, len, unmap);
                    model.apply(&op, &[], discard_unit);
                    r
                }
                Op::Discard { off, len } => {
                    let r = d.discard(off, len);
                    model.apply(&op, &[], discard_unit);
                    r
                }
                Op::Read { off, len, split } => {
                    let mut buf = vec![0xa5u8; len as usize];
                    match read_split(d, &mut buf, off, split) {
                        Ok(()) => model
                            .check_read(off, &buf)
                            .map_err(|e| ctx(&done, format!("read mismatch: {e}")))?,
                        Err(e) => return Err(ctx(&done, format!("read failed: {e}"))),
                    }
                    Ok(())
                }
                Op::Flush => d.flush(),
                Op::Resize { size: new } => {
                    let r = img.resize(new, common::prealloc::Preallocation::Off);
                    model.apply(&op, &[], discard_unit);
                    size = new;
                    r
                }
                Op::MakeEmpty => {
                    // The backing file (zeroes past its end, or without one) shows again.
                    let n = model.data.len().min(backing.len());
                    model.data[..n].copy_from_slice(&backing[..n]);
                    model.data[n..].fill(0);
                    model.maybe_zero.fill(false);
                    img.make_empty()
                }
            };
            if let Err(e) = res {
                return Err(ctx(&done, format!("operation failed: {e}")));
            }
        }
        // Read everything back before closing (resolves maybe-zero bytes).
        let all = engine::read_all(d, 1 << 20, 0)
            .map_err(|e| ctx(&done, format!("final read failed: {e}")))?;
        model
            .check_read(0, &all)
            .map_err(|e| ctx(&done, format!("final read mismatch: {e}")))?;
        d.flush()
            .map_err(|e| ctx(&done, format!("final flush failed: {e}")))?;
    }
    // The image is closed: QEMU must find it clean and identical to the model.
    let chk = qemu_img(&["check", s(&path)]);
    if !chk.success() {
        return Err(ctx(
            &done,
            format!("qemu-img check not clean:\n{}", chk.report()),
        ));
    }
    let model_path = dir.join(format!("prop-{idx}-model.raw"));
    std::fs::write(&model_path, &model.data).unwrap();
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        s(&path),
        s(&model_path),
    ]);
    if cmp.code != Some(0) {
        return Err(ctx(
            &done,
            format!("qemu-img compare image vs model:\n{}", cmp.report()),
        ));
    }
    // Reopen with the engine and compare again.
    let img = engine::open(&path, true).map_err(|e| format!("reopen failed: {e}"))?;
    let again =
        engine::read_all(img.driver(), 65536 + 3, 17).map_err(|e| format!("reread failed: {e}"))?;
    if let Some(m) = first_mismatch(&model.data, &again) {
        return Err(ctx(&done, format!("after reopen: {m}")));
    }
    let _ = std::fs::remove_file(&model_path);
    Ok(())
}

fn ops_log(dir: &Path, idx: usize) -> PathBuf {
    dir.join(format!("prop-{idx}.ops"))
}

/// How long one sequence may take before it counts as hung.
const SEQ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn configs(cluster: u64) -> Vec<Config> {
    let mut v = Vec::new();
    for rb in [1, 16, 64] {
        for backing in [false, true] {
            for el2 in [false, true] {
                if el2 && cluster < 16384 {
                    continue;
                }
                v.push(Config {
                    cluster,
                    refcount_bits: rb,
                    extended_l2: el2,
                    backing,
                    extra: "",
                });
            }
        }
    }
    v
}

fn run_configs(cluster: u64, default_seed: u64) {
    run_config_list(configs(cluster), default_seed);
}

fn run_config_list(list: Vec<Config>, default_seed: u64) {
    let seed = seed(default_seed);
    let seqs = env_usize("PROP_SEQUENCES", 2);
    let nops = env_usize("PROP_OPS", 60);
    let tmp = tempdir();
    let mut f = Failures::new();
    let mut idx = 0;
    for cfg in list {
        for k in 0..seqs {
            idx += 1;
            let s = seed.wrapping_mul(31).wrapping_add(idx as u64);
            let dir = tmp.path().to_path_buf();
            let r = with_deadline(SEQ_DEADLINE, move || run_sequence(&cfg, &dir, s, nops, idx));
            let hung = matches!(&r, Err(m) if m.starts_with("HUNG"));
            let r = r.map_err(|m| {
                if hung {
                    let log = std::fs::read_to_string(ops_log(tmp.path(), idx)).unwrap_or_default();
                    format!("{m}\nops started (the last one hung):\n{log}")
                } else {
                    m
                }
            });
            f.record(
                &format!(
                    "{} sequence {k} (TEST_SEED={seed:#x}, sequence seed {s:#x})",
                    cfg.name()
                ),
                r,
            );
            if hung {
                // Don't wait out the deadline again for the same configuration.
                break;
            }
        }
    }
    f.finish();
}

/// Other header options: v2 images (no zero flag: zeroes must be written or clusters
/// deallocated; no backing file here, as QEMU's v2 discard semantics with a backing file
/// differ) and lazy refcounts (dirty bit while open, consistent after close).
#[test]
fn prop_v2_and_lazy_refcounts() {
    let c = |cluster, refcount_bits, extended_l2, backing, extra| Config {
        cluster,
        refcount_bits,
        extended_l2,
        backing,
        extra,
    };
    run_config_list(
        vec![
            c(65536, 16, false, false, "compat=0.10"),
            c(4096, 16, false, false, "compat=0.10"),
            c(65536, 16, false, false, "lazy_refcounts=on"),
            c(4096, 1, false, true, "lazy_refcounts=on"),
            c(65536, 64, true, true, "lazy_refcounts=on"),
        ],
        0x9e0_1a27,
    );
}

#[test]
fn prop_cluster_512() {
    run_configs(512, 0x9e0_0512);
}

#[test]
fn prop_cluster_4k() {
    run_configs(4096, 0x9e0_4096);
}

#[test]
fn prop_cluster_64k() {
    run_configs(65536, 0x9e0_6553);
}

#[test]
fn prop_cluster_2m() {
    run_configs(2 << 20, 0x9e0_0002);
}

/// The model itself: discard and maybe-zero resolution behave as documented (so that a
/// green property run means something).
#[test]
fn model_self_test() {
    let mut m = Model {
        data: vec![7u8; 4096],
        maybe_zero: vec![false; 4096],
    };
    m.apply(
        &Op::Discard {
            off: 100,
            len: 2000,
        },
        &[],
        1024,
    );
    // 1024..2048 fully covered: zero. 100..1024 and 2048..2100 partial: maybe zero.
    assert_eq!(m.data[1024..2048], [0u8; 1024][..]);
    assert!(m.maybe_zero[100] && m.maybe_zero[1023] && m.maybe_zero[2048] && m.maybe_zero[2099]);
    assert!(!m.maybe_zero[99] && !m.maybe_zero[2100]);
    assert!(m.check_read(100, &[7, 0]).is_ok());
    assert!(
        m.check_read(100, &[0]).is_err(),
        "resolved byte must stay as first read"
    );
    assert!(
        m.check_read(2100, &[0]).is_err(),
        "untouched byte must not read zero"
    );
    // Discard reaching the end of the image covers the partial last unit.
    let mut m = Model {
        data: vec![7u8; 3000],
        maybe_zero: vec![false; 3000],
    };
    m.apply(
        &Op::Discard {
            off: 2048,
            len: 952,
        },
        &[],
        1024,
    );
    assert!(m.data[2048..].iter().all(|&b| b == 0));
    m.apply(
        &Op::Zero {
            off: 1,
            len: 2,
            unmap: true,
        },
        &[],
        1024,
    );
    assert_eq!(&m.data[..4], &[7, 0, 0, 7]);
}

/// Several threads at once on disjoint, cluster-aligned slices of one image (the engine is
/// `&self` and thread-safe by design): per-thread models, then the same final checks. This
/// is where an allocator handing out a cluster twice, or a discard racing a write, shows.
fn run_concurrent(
    cfg: &Config,
    dir: &Path,
    seed: u64,
    threads: usize,
    nops: usize,
    idx: usize,
) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let (path, initial) = make_image(cfg, dir, &mut rng, idx);
    let size = cfg.size();
    let slice = size / threads as u64 / cfg.cluster * cfg.cluster;
    assert!(slice > 0);
    let img = engine::open(&path, false).map_err(|e| format!("open_image (rw) failed: {e}"))?;
    let d = img.driver();
    let results: Vec<(Model, Result<(), String>)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let base = t as u64 * slice;
                let len = if t == threads - 1 { size - base } else { slice };
                let mut model = Model {
                    data: initial[base as usize..(base + len) as usize].to_vec(),
                    maybe_zero: vec![false; len as usize],
                };
                let mut trng = Rng::new(seed ^ ((t as u64 + 1) << 32));
                sc.spawn(move || {
                    let mut done = Vec::new();
                    let r = (|| {
                        for _ in 0..nops {
                            let op = gen_op(&mut trng, len, cfg.cluster, None);
                            done.push(op.clone());
                            let e = |e: common::Error| format!("thread {t}: {op:?} (slice base {base:#x}) failed: {e}");
                            match op {
                                Op::Write { off, len, fill, split } => {
                                    let buf = fill_buf(fill, len);
                                    write_split(d, &buf, base + off, split).map_err(e)?;
                                    model.apply(&op, &buf, cfg.cluster);
                                }
                                Op::Zero { off, len, unmap } => {
                                    d.write_zeroes(base + off, len, unmap).map_err(e)?;
                                    model.apply(&op, &[], cfg.cluster);
                                }
                                Op::Discard { off, len } => {
                                    d.discard(base + off, len).map_err(e)?;
                                    model.apply(&op, &[], cfg.cluster);
                                }
                                Op::Read { off, len, split } => {
                                    let mut buf = vec![0u8; len as usize];
                                    read_split(d, &mut buf, base + off, split).map_err(e)?;
                                    model
                                        .check_read(off, &buf)
                                        .map_err(|m| format!("thread {t} (slice base {base:#x}): read mismatch (offsets relative to slice): {m}"))?;
                                }
                                Op::Flush => d.flush().map_err(e)?,
                                Op::Resize { .. } => unreachable!("threads do not resize"),
                                Op::MakeEmpty => unreachable!("gen_op never empties the image"),
                            }
                        }
                        Ok::<(), String>(())
                    })();
                    let r = r.map_err(|m| format!("{m}\nthread {t} ops:\n{}", fmt_ops(&done)));
                    (model, r)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread panicked"))
            .collect()
    });
    let mut full = Vec::with_capacity(size as usize);
    let mut maybe = Vec::with_capacity(size as usize);
    for (m, r) in results {
        r?;
        full.extend_from_slice(&m.data);
        maybe.extend_from_slice(&m.maybe_zero);
    }
    let mut model = Model {
        data: full,
        maybe_zero: maybe,
    };
    let all = engine::read_all(d, 1 << 20, 0).map_err(|e| format!("final read failed: {e}"))?;
    model
        .check_read(0, &all)
        .map_err(|e| format!("final read mismatch: {e}"))?;
    d.flush().map_err(|e| format!("final flush failed: {e}"))?;
    drop(img);
    let chk = qemu_img(&["check", s(&path)]);
    if !chk.success() {
        return Err(format!(
            "qemu-img check not clean after concurrent run:\n{}",
            chk.report()
        ));
    }
    let model_path = dir.join(format!("prop-{idx}-model.raw"));
    std::fs::write(&model_path, &model.data).unwrap();
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        s(&path),
        s(&model_path),
    ]);
    if cmp.code != Some(0) {
        return Err(format!(
            "qemu-img compare image vs model:\n{}",
            cmp.report()
        ));
    }
    Ok(())
}

#[test]
fn prop_concurrent_threads() {
    let seed = seed(0xc0c0_0001);
    let seqs = env_usize("PROP_SEQUENCES", 2);
    let nops = env_usize("PROP_OPS", 60);
    let tmp = tempdir();
    let mut f = Failures::new();
    let mut idx = 1000;
    for cfg in [
        Config {
            cluster: 512,
            refcount_bits: 1,
            extended_l2: false,
            backing: false,
            extra: "",
        },
        Config {
            cluster: 4096,
            refcount_bits: 16,
            extended_l2: false,
            backing: true,
            extra: "",
        },
        Config {
            cluster: 65536,
            refcount_bits: 64,
            extended_l2: true,
            backing: false,
            extra: "",
        },
        Config {
            cluster: 65536,
            refcount_bits: 16,
            extended_l2: false,
            backing: true,
            extra: "",
        },
    ] {
        for k in 0..seqs {
            idx += 1;
            let s = seed.wrapping_mul(31).wrapping_add(idx as u64);
            let dir = tmp.path().to_path_buf();
            let r = with_deadline(SEQ_DEADLINE, move || {
                run_concurrent(&cfg, &dir, s, 4, nops, idx)
            });
            f.record(
                &format!(
                    "{} concurrent sequence {k} (TEST_SEED={seed:#x}, sequence seed {s:#x})",
                    cfg.name()
                ),
                r,
            );
        }
    }
    f.finish();
}

/// A byte range one writer thread owns: guest offset, length, thread.
#[derive(Clone, Copy, Debug)]
struct Segment {
    off: u64,
    len: u64,
    owner: usize,
}

/// One configuration of the overlapping-writers test.
#[derive(Clone, Copy, Debug)]
struct Overlap {
    cluster: u64,
    extended_l2: bool,
    /// Open with O_DIRECT (QEMU's cache=none, as `vmm --drive cache=none` does): every
    /// write then takes a disk round trip, and a race window between two of them is that
    /// much wider than through the page cache.
    direct: bool,
    /// Guest clusters the writers go through, one round each.
    clusters: u64,
}

impl Overlap {
    fn name(&self) -> String {
        format!(
            "cluster_size={},extended_l2={},cache={},clusters={}",
            self.cluster,
            if self.extended_l2 { "on" } else { "off" },
            if self.direct { "none" } else { "writeback" },
            self.clusters
        )
    }

    /// The allocation unit: a subcluster with extended L2, else a cluster.
    fn unit(&self) -> u64 {
        if self.extended_l2 {
            self.cluster / 32
        } else {
            self.cluster
        }
    }
}

/// Cut a window of guest cluster `c` (2 to 6 allocation units, or 2 KiB pieces of a cluster
/// where that is smaller, somewhere in it) into segments of 64 bytes to 4 KiB, owned by
/// `threads` writers in turn (neighbours never share an owner), with the odd unowned gap:
/// every unit in the window is shared by several writers.
fn plan_cluster(cfg: &Overlap, c: u64, threads: usize, rng: &mut Rng) -> Vec<Segment> {
    let grain = cfg.unit().min(2048);
    let grains = cfg.cluster / grain;
    let win = rng.range(2, 6).min(grains);
    let start = rng.below(grains - win + 1) * grain;
    let end = start + win * grain;
    let base = c * cfg.cluster;
    let mut segs = Vec::new();
    let mut pos = start + rng.below(64);
    let mut last_owner = threads;
    while pos + 64 <= end {
        let max = 64 << rng.below(7);
        let len = rng.range(64, max).min(end - pos);
        let mut owner = rng.below(threads as u64) as usize;
        if owner == last_owner {
            owner = (owner + 1) % threads;
        }
        last_owner = owner;
        segs.push(Segment {
            off: base + pos,
            len,
            owner,
        });
        pos += len;
        if rng.chance(1, 8) {
            pos += rng.range(1, 256);
        }
    }
    segs
}

/// Writes as (guest offset, data), in the order they were issued.
type Writes = Vec<(u64, Vec<u8>)>;

/// The writes of one thread in one cluster, in two phases: first one piece of some of its
/// segments (allocating the units they fall in), then, once every thread is through its
/// first phase, the other pieces (a segment goes in 1 to 4 pieces of at least 64 bytes)
/// interleaved across segments, and some pieces again: in place where a unit is allocated
/// by then, allocating (copy-on-write of the rest of the unit) where it is not.
fn thread_writes(segs: &[Segment], t: usize, rng: &mut Rng) -> [Writes; 2] {
    let (mut first, mut rest) = (Vec::new(), Vec::new());
    for s in segs.iter().filter(|s| s.owner == t) {
        let k = rng.range(1, 4).min(s.len / 64).max(1);
        let early = rng.chance(1, 2);
        for i in 0..k {
            let a = s.off + i * s.len / k;
            let b = s.off + (i + 1) * s.len / k;
            let w = (a, rng.bytes((b - a) as usize));
            if i == 0 && early {
                first.push(w);
            } else {
                rest.push(w);
            }
        }
    }
    // Shuffle (Fisher-Yates), then repeat some.
    for i in (1..rest.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        rest.swap(i, j);
    }
    let all: Vec<(u64, usize)> = first
        .iter()
        .chain(&rest)
        .map(|(o, d)| (*o, d.len()))
        .collect();
    for _ in 0..all.len() / 2 {
        let (off, len) = all[rng.below(all.len() as u64) as usize];
        rest.push((off, rng.bytes(len)));
    }
    [first, rest]
}

/// Where `got` differs from `expected`: how many clusters, and the first few differing runs
/// with the thread whose bytes they are.
fn lost_writes(
    cfg: &Overlap,
    plan: &[Vec<Segment>],
    expected: &[u8],
    got: &[u8],
) -> Option<String> {
    if expected.len() != got.len() {
        return Some(format!(
            "size: expected {} bytes, got {}",
            expected.len(),
            got.len()
        ));
    }
    let cs = cfg.cluster as usize;
    let mut bad = Vec::new();
    for (c, (e, g)) in expected.chunks(cs).zip(got.chunks(cs)).enumerate() {
        if e != g {
            bad.push(c);
        }
    }
    if bad.is_empty() {
        return None;
    }
    let mut msg = format!(
        "{} of {} clusters do not read what their writers last wrote",
        bad.len(),
        plan.len()
    );
    for &c in bad.iter().take(4) {
        let base = (c * cs) as u64;
        let (e, g) = (&expected[c * cs..][..cs], &got[c * cs..][..cs]);
        let mut i = 0;
        let mut runs = 0;
        while i < cs && runs < 3 {
            if e[i] == g[i] {
                i += 1;
                continue;
            }
            let j = (i..cs).find(|&j| e[j] == g[j]).unwrap_or(cs);
            let at = base + i as u64;
            let whose = plan[c]
                .iter()
                .find(|s| s.off <= at && at < s.off + s.len)
                .map_or("no writer's (never written)".to_string(), |s| {
                    format!("thread {}'s segment {:#x}+{:#x}", s.owner, s.off, s.len)
                });
            let show = |b: &[u8]| {
                b[i..j.min(i + 8)]
                    .iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<String>()
            };
            msg += &format!(
                "\n  cluster {c}: guest {at:#x}+{:#x} (unit {}, {whose}) reads {}.., last written {}..",
                j - i,
                (i as u64) / cfg.unit(),
                show(g),
                show(e)
            );
            runs += 1;
            i = j;
        }
    }
    Some(msg)
}

/// Writer threads (2 to 4) on one open image, all in the same cluster at a time (barriers
/// between clusters and between the two phases of [`thread_writes`]), each writing only its
/// own bytes, but bytes of different threads share clusters and subclusters: small writes,
/// allocating (the first into a unit) and in place. Every byte must then read what its one
/// writer wrote last, through the engine (the same open, and a fresh one) and through
/// `qemu-img convert -O raw`, and `qemu-img check` must be clean. This is where a write that
/// reads a unit another thread is writing in place and writes it back (read-modify-write of
/// a partly covered subcluster) loses that write.
///
/// The seed fixes the threads, the segments and the data; which write wins a race is up to
/// the scheduler, so a replay runs the same writes, not necessarily the same interleaving.
fn run_overlapping(cfg: &Overlap, dir: &Path, seed: u64, idx: usize) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let threads = rng.range(2, 4) as usize;
    let size = cfg.clusters * cfg.cluster;
    let path = dir.join(format!("overlap-{idx}.qcow2"));
    let opts = format!(
        "cluster_size={},extended_l2={}",
        cfg.cluster,
        if cfg.extended_l2 { "on" } else { "off" }
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &opts,
        s(&path),
        &size.to_string(),
    ])
    .ok();
    let plan: Vec<Vec<Segment>> = (0..cfg.clusters)
        .map(|c| plan_cluster(cfg, c, threads, &mut rng))
        .collect();
    let seeds: Vec<u64> = (0..threads).map(|_| rng.next_u64()).collect();
    let open = common::open::OpenOptions {
        direct: cfg.direct,
        ..Default::default()
    };
    let img = common::open::open_image(&path, &open)
        .map_err(|e| format!("open_image (rw) failed: {e}"))?;
    let d = img.driver();
    let barrier = std::sync::Barrier::new(threads);
    let logs: Vec<Result<Writes, String>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (plan, barrier, seed) = (&plan, &barrier, seeds[t]);
                sc.spawn(move || {
                    let mut trng = Rng::new(seed);
                    let mut log = Vec::new();
                    let mut failed = None;
                    for segs in plan {
                        for writes in thread_writes(segs, t, &mut trng) {
                            if failed.is_none() {
                                for (off, data) in &writes {
                                    if let Err(e) = d.write_at(data, *off) {
                                        failed = Some(format!(
                                            "thread {t}: write {off:#x}+{:#x} failed: {e}",
                                            data.len()
                                        ));
                                        break;
                                    }
                                }
                            }
                            log.extend(writes);
                            // Every thread passes every barrier, failed or not.
                            barrier.wait();
                        }
                    }
                    failed.map_or(Ok(log), Err)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("writer thread panicked"))
            .collect()
    });
    let mut expected = vec![0u8; size as usize];
    for log in logs {
        for (off, data) in log? {
            expected[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
    }
    let ctx = |what: &str, m: String| format!("{what} ({threads} threads): {m}");
    let got = engine::read_all(d, 1 << 20, 0).map_err(|e| format!("read back failed: {e}"))?;
    if let Some(m) = lost_writes(cfg, &plan, &expected, &got) {
        return Err(ctx("engine, same open", m));
    }
    d.flush().map_err(|e| format!("flush failed: {e}"))?;
    drop(img);
    qemu_check(&path)?;
    let raw = qemu_convert_raw(
        &path,
        Some("qcow2"),
        &dir.join(format!("overlap-{idx}.raw")),
    )?;
    if let Some(m) = lost_writes(cfg, &plan, &expected, &raw) {
        return Err(ctx("qemu-img convert -O raw", m));
    }
    let img = engine::open(&path, true).map_err(|e| format!("reopen failed: {e}"))?;
    let again =
        engine::read_all(img.driver(), 65536 + 3, 17).map_err(|e| format!("reread failed: {e}"))?;
    if let Some(m) = lost_writes(cfg, &plan, &expected, &again) {
        return Err(ctx("engine, reopened", m));
    }
    let _ = std::fs::remove_file(dir.join(format!("overlap-{idx}.raw")));
    Ok(())
}

/// [`run_overlapping`] with and without extended L2, through the page cache and with
/// O_DIRECT (where each write's disk round trip makes a lost write likely enough to show in
/// a run of a few seconds).
#[test]
fn prop_concurrent_overlapping_writers() {
    let seed = seed(0x0e71_a900);
    let tmp = tempdir();
    let mut f = Failures::new();
    let c = |cluster, extended_l2, direct, clusters| Overlap {
        cluster,
        extended_l2,
        direct,
        clusters,
    };
    let configs = [
        c(65536, true, true, 150),
        c(16384, true, true, 250),
        c(65536, true, false, 600),
        c(65536, false, true, 100),
        c(4096, false, true, 150),
        c(65536, false, false, 400),
    ];
    for (i, cfg) in configs.into_iter().enumerate() {
        let s = seed.wrapping_mul(31).wrapping_add(i as u64);
        let dir = tmp.path().to_path_buf();
        let r = with_deadline(SEQ_DEADLINE, move || run_overlapping(&cfg, &dir, s, i));
        f.record(
            &format!("{} (TEST_SEED={seed:#x}, sequence seed {s:#x})", cfg.name()),
            r,
        );
    }
    f.finish();
}

/// The log of [`run_overlapping_ops`]: records appended under one lock (so their order is
/// the order they happened in), and how many there are.
#[derive(Default)]
struct Recorder(std::sync::Mutex<(String, usize)>);

impl Recorder {
    /// Append `line`; the number of records then.
    fn record(&self, line: String) -> usize {
        let mut g = self.0.lock().unwrap();
        g.0 += &line;
        g.1 += 1;
        g.1
    }
    fn count(&self) -> usize {
        self.0.lock().unwrap().1
    }
}

/// A read one thread made: where, what it got, and the records before it began and once it
/// returned.
struct SeenRead {
    off: u64,
    got: Vec<u8>,
    began_after: usize,
    ended_before: usize,
}

/// 2 to 4 threads issue random writes (some vectored), zero writes, discards, reads and
/// flushes on one open image, half of them in a window of four clusters they all share, so
/// that operations on the same bytes overlap in time. Checked against the write log model
/// ([`integration_tests::write_log`]: overlapping operations in flight together land in
/// either order, per byte): every read, the image through the same open once every thread
/// is done, and after close `qemu-img check` clean and `qemu-img convert` reading the same.
fn run_overlapping_ops(
    cfg: &Config,
    dir: &Path,
    seed: u64,
    nops: usize,
    idx: usize,
) -> Result<(), String> {
    use integration_tests::write_log::{data, Kind, Log, Moment};
    let mut rng = Rng::new(seed);
    let (path, before) = make_image(cfg, dir, &mut rng, idx);
    let size = cfg.size();
    let threads = rng.range(2, 4) as usize;
    let window = (4 * cfg.cluster).min(size);
    let img = engine::open(&path, false).map_err(|e| format!("open_image (rw) failed: {e}"))?;
    let d = img.driver();
    let rec = Recorder::default();
    let seeds: Vec<u64> = (0..threads).map(|_| rng.next_u64()).collect();
    let results: Vec<Result<Vec<SeenRead>, String>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (rec, seed) = (&rec, seeds[t]);
                sc.spawn(move || {
                    let mut rng = Rng::new(seed);
                    let mut reads = Vec::new();
                    for n in 0..nops {
                        let id = (t as u64) << 40 | n as u64;
                        let span = if rng.chance(1, 2) { window } else { size };
                        let op = gen_op(&mut rng, span, cfg.cluster, None);
                        let logged = |kind: Kind, off: u64, len: u64, seed: u64| {
                            rec.record(format!("B {id} {} {off} {len} {seed}\n", kind.code()));
                        };
                        let r = match op {
                            Op::Write {
                                off,
                                len,
                                fill,
                                split,
                            } => {
                                logged(Kind::Write, off, len, fill);
                                write_split(d, &data(fill, off, len), off, split)
                            }
                            Op::Zero { off, len, unmap } => {
                                let kind = if unmap { Kind::ZeroUnmap } else { Kind::Zero };
                                logged(kind, off, len, 0);
                                d.write_zeroes(off, len, unmap)
                            }
                            Op::Discard { off, len } => {
                                logged(Kind::Discard, off, len, 0);
                                d.discard(off, len)
                            }
                            Op::Read { off, len, split } => {
                                let began_after = rec.count();
                                let mut got = vec![0xa5u8; len as usize];
                                let r = read_split(d, &mut got, off, split);
                                reads.push(SeenRead {
                                    off,
                                    got,
                                    began_after,
                                    ended_before: rec.count() + 1,
                                });
                                r.map_err(|e| format!("thread {t}: read {off:#x}+{len:#x}: {e}"))?;
                                continue;
                            }
                            Op::Flush => {
                                rec.record(format!("F {id}\n"));
                                d.flush().map_err(|e| format!("thread {t}: flush: {e}"))?;
                                rec.record(format!("G {id}\n"));
                                continue;
                            }
                            Op::Resize { .. } | Op::MakeEmpty => unreachable!("not generated"),
                        };
                        r.map_err(|e| format!("thread {t}: {op:?}: {e}"))?;
                        rec.record(format!("E {id}\n"));
                    }
                    Ok(reads)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread panicked"))
            .collect()
    });
    let text = rec.0.lock().unwrap().0.clone();
    let log = Log::parse(&text, cfg.cluster)?;
    let ctx = |m: String| format!("{threads} threads, {} records: {m}", log.begun);
    for (t, r) in results.into_iter().enumerate() {
        for read in r? {
            let moment = Moment {
                must: &|p| {
                    p.effect != integration_tests::write_log::Effect::MaybeZeroes
                        && p.end.is_some_and(|e| e <= read.began_after)
                },
                may: &|p| p.begin < read.ended_before,
            };
            log.verify_range(read.off, &before, &read.got, &moment)
                .map_err(|m| {
                    ctx(format!(
                        "thread {t}: read {:#x}+{:#x} (after record {}): {m}",
                        read.off,
                        read.got.len(),
                        read.began_after
                    ))
                })?;
        }
    }
    let done = Moment {
        must: &|p| p.effect != integration_tests::write_log::Effect::MaybeZeroes,
        may: &|_| true,
    };
    let all = engine::read_all(d, 1 << 20, 0).map_err(|e| format!("final read failed: {e}"))?;
    log.verify_range(0, &before, &all, &done)
        .map_err(|m| ctx(format!("the image once every thread is done: {m}")))?;
    d.flush().map_err(|e| format!("final flush failed: {e}"))?;
    drop(img);
    qemu_check(&path)?;
    let raw = qemu_convert_raw(&path, Some("qcow2"), &dir.join(format!("ops-{idx}.raw")))?;
    let _ = std::fs::remove_file(dir.join(format!("ops-{idx}.raw")));
    ensure(raw == all, || {
        ctx(format!(
            "qemu-img convert reads otherwise than the engine did before close: {}",
            first_mismatch(&all, &raw).unwrap_or_default()
        ))
    })
}

/// [`run_overlapping_ops`] over many seeds (`PROP_SEQUENCES`, default 4 per
/// configuration; `PROP_OPS` operations per thread, default 60).
#[test]
fn prop_concurrent_overlapping_ops() {
    let seed = seed(0x0e71_0b5e);
    let seqs = env_usize("PROP_SEQUENCES", 4);
    let nops = env_usize("PROP_OPS", 60);
    let tmp = tempdir();
    let mut f = Failures::new();
    let c = |cluster, refcount_bits, extended_l2, backing, extra| Config {
        cluster,
        refcount_bits,
        extended_l2,
        backing,
        extra,
    };
    let mut idx = 2000;
    for cfg in [
        c(512, 1, false, true, ""),
        c(4096, 16, false, false, "lazy_refcounts=on"),
        c(65536, 64, true, true, ""),
        c(65536, 16, false, false, ""),
        c(2 << 20, 16, true, true, ""),
    ] {
        for k in 0..seqs {
            idx += 1;
            let s = seed.wrapping_mul(31).wrapping_add(idx as u64);
            let dir = tmp.path().to_path_buf();
            let r = with_deadline(SEQ_DEADLINE, move || {
                run_overlapping_ops(&cfg, &dir, s, nops, idx)
            });
            f.record(
                &format!(
                    "{} overlapping ops {k} (TEST_SEED={seed:#x}, sequence seed {s:#x})",
                    cfg.name()
                ),
                r,
            );
        }
    }
    f.finish();
}
