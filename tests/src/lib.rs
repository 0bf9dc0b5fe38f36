//! The tests library: helpers every cross-tool test (tests/tests/*.rs, img/tests, vmm/tests)
//! uses, so that each concern lives in one place.
//!
//! - [`process`]: run a command with a timeout, capturing stdout, stderr and the exit status
//!   ([`run`], [`Output`]);
//! - [`tools`]: the one wrapper for `qemu-img`, `qemu-io` and `img` ([`Tool`], [`qemu_img`],
//!   [`qemu_io`], [`img`], [`img_bin`]) and the qemu-side checks ([`qemu_check`],
//!   [`qemu_read_all`], [`qemu_io_cmds`], [`qemu_io_hold`]: an image held locked);
//! - [`twin`]: run `img` and `qemu-img` on the same arguments in twin directories and compare
//!   exit codes, stdout, stderr and the resulting images;
//! - [`qcow2_layout`]: where a qcow2 file keeps its metadata, and patching named fields, for
//!   hostile-image tests;
//! - [`sandbox`]: run a child on hostile input with a memory and a time limit;
//! - [`engine`]: thin adapters over `common`'s public API;
//! - [`mem_disk`]: an in-memory [`common::BlockDriver`] for device tests;
//! - [`nbd`]: an `img serve` or `qemu-nbd` server for a test's length, and a raw NBD client;
//! - [`write_log`]: the write log of a multi-threaded workload and the model of what an image
//!   may read after a crash or at any moment of it;
//! - [`fake_kernel`]: tiny hand-made kernels for `vmm`;
//! - [`fiemap`]: the bytes of a file's data extents (host space without file-system bookkeeping);
//! - [`kvm`]: whether /dev/kvm is there, and whether it runs guests at hardware speed;
//! - here: [`Rng`] and [`seed`] (seeded, replayable randomness), [`text_diff`] and
//!   [`first_mismatch`] (readable differences), [`Failures`] (many cases in one test, every
//!   failing one reported), [`with_deadline`] (hangs become failures), JSON helpers.
//!
//! Environment knobs for the cross tests (tests/tests/*.rs):
//! - `TEST_SEED=<n|0xhex>`: replay a randomized test (the seed is printed by every one);
//! - `PROP_SEQUENCES`, `PROP_OPS`: sequences per configuration and ops per sequence of the
//!   property tests (defaults 2 and 60);
//! - `KEEP_TMP=1`: keep the temporary directories with the images of a run;
//! - `IMG_TEST_BIN=<path>`: use another `img` binary (e.g. a qemu-img wrapper that maps the
//!   `qemu-img: ` prefix to `img: `, to check the tests themselves against the reference);
//! - `CI=true`: a missing prerequisite (qemu-img, /dev/kvm, root) fails instead of skipping.
//!
//! The tests need `qemu-img`/`qemu-io` 10.0.2 on PATH.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod engine;
pub mod fake_kernel;
pub mod fiemap;
pub mod foreign;
pub mod kvm;
pub mod mem_disk;
pub mod nbd;
pub mod process;
pub mod qcow2_bitmaps;
pub mod qcow2_layout;
pub mod sandbox;
pub mod tools;
pub mod twin;
pub mod write_log;

pub use process::{run, Output, TIMEOUT};
pub use tempfile::TempDir;
pub use tools::*;

/// Whether the tests run in CI (`CI` set to anything but empty, `0` or `false`): there a
/// missing prerequisite fails a test instead of skipping it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The target profile directory the running test binary lives in (target/debug, ...).
pub fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.file_name().map(|n| n == "deps").unwrap_or(false) {
        dir.pop();
    }
    dir
}

/// A fresh temporary directory.
pub fn tempdir() -> TempDir {
    // KEEP_TMP=1 keeps the directories (and so every image a failing case made).
    tempfile::Builder::new()
        .prefix("img-it-")
        .disable_cleanup(std::env::var_os("KEEP_TMP").is_some())
        .tempdir()
        .expect("tempdir")
}

/// Path as &str (tests use UTF-8 temp paths only).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

// ---------------------------------------------------------------------------------------------
// Seeded randomness

/// SplitMix64: tiny, fast, good enough for test data, fully reproducible from a seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next_u64() % n
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    /// True with probability `num/den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.fill(&mut v);
        v
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// The seed for a randomized test: `$TEST_SEED` if set, else `default`. Printed so that a
/// failing run can be replayed with `TEST_SEED=<seed>`.
pub fn seed(default: u64) -> u64 {
    let seed = std::env::var("TEST_SEED")
        .ok()
        .and_then(|v| {
            let v = v.trim();
            v.strip_prefix("0x")
                .map(|h| u64::from_str_radix(h, 16).ok())
                .unwrap_or_else(|| v.parse().ok())
        })
        .unwrap_or(default);
    eprintln!("seed: {seed:#x} (replay with TEST_SEED={seed:#x})");
    seed
}

// ---------------------------------------------------------------------------------------------
// Diffs

/// A unified-style line diff of two texts (LCS based), or `None` when they are equal.
pub fn text_diff(
    expected_label: &str,
    expected: &str,
    actual_label: &str,
    actual: &str,
) -> Option<String> {
    if expected == actual {
        return None;
    }
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut out = format!("--- {expected_label}\n+++ {actual_label}\n");
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            out += &format!("  {}\n", a[i]);
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out += &format!("+ {}\n", b[j]);
            j += 1;
        } else {
            out += &format!("- {}\n", a[i]);
            i += 1;
        }
    }
    if a.len() == b.len() && a == b {
        // Only trailing-newline differences.
        out += &format!(
            "(texts differ only in line endings/trailing newline: expected ends with newline: {}, actual: {})\n",
            expected.ends_with('\n'),
            actual.ends_with('\n')
        );
    }
    Some(out)
}

/// Assert two texts are equal, printing a readable diff otherwise.
#[track_caller]
pub fn assert_text_eq(
    what: &str,
    expected_label: &str,
    expected: &str,
    actual_label: &str,
    actual: &str,
) {
    if let Some(d) = text_diff(expected_label, expected, actual_label, actual) {
        panic!("{what}: output differs\n{d}");
    }
}

// ---------------------------------------------------------------------------------------------
// Comparing bytes

/// First index at which two byte slices differ, with a short hexdump for messages.
pub fn first_mismatch(expected: &[u8], actual: &[u8]) -> Option<String> {
    if expected == actual {
        return None;
    }
    if expected.len() != actual.len() {
        let i = expected.iter().zip(actual).position(|(a, b)| a != b);
        return Some(format!(
            "lengths differ: expected {} bytes, got {} (first differing byte in common prefix: {:?})",
            expected.len(),
            actual.len(),
            i
        ));
    }
    let i = expected
        .iter()
        .zip(actual)
        .position(|(a, b)| a != b)
        .unwrap();
    let end = expected[i..]
        .iter()
        .zip(&actual[i..])
        .position(|(a, b)| a == b)
        .map(|k| i + k)
        .unwrap_or(expected.len());
    let show = |v: &[u8]| {
        v[i..(i + 16).min(v.len())]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    Some(format!(
        "first difference at byte {i} ({i:#x}); differing run ends at {end:#x} ({} bytes)\n  expected: {}\n  actual:   {}",
        end - i,
        show(expected),
        show(actual)
    ))
}

// ---------------------------------------------------------------------------------------------
// JSON helpers

/// Remove every object member called `key`, at any depth.
pub fn json_remove_key(v: &mut serde_json::Value, key: &str) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove(key);
            for (_, c) in m.iter_mut() {
                json_remove_key(c, key);
            }
        }
        serde_json::Value::Array(a) => {
            for c in a {
                json_remove_key(c, key);
            }
        }
        _ => {}
    }
}

/// Pretty JSON text (stable member order as produced), for diffing.
pub fn json_pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap() + "\n"
}

/// Collects failures of many cases in one test so that a run reports all of them.
#[derive(Default)]
pub struct Failures {
    pub cases: usize,
    pub failed: Vec<String>,
}

impl Failures {
    pub fn new() -> Self {
        Self::default()
    }
    /// Record one case; `Err(msg)` is a failure.
    pub fn record(&mut self, name: &str, r: Result<(), String>) {
        self.cases += 1;
        match r {
            Ok(()) => eprintln!("ok   {name}"),
            Err(msg) => {
                eprintln!("FAIL {name}");
                self.failed.push(format!("=== case `{name}` ===\n{msg}"));
            }
        }
    }
    /// Panic with every failure, if any.
    #[track_caller]
    pub fn finish(self) {
        assert!(self.cases > 0, "no case ran");
        if !self.failed.is_empty() {
            let n = self.failed.len();
            let mut msg = format!("{n} of {} cases failed:\n", self.cases);
            for f in &self.failed {
                msg += f;
                msg += "\n";
            }
            msg += &format!("{n} of {} cases failed (names above)", self.cases);
            panic!("{msg}");
        }
        eprintln!("all {} cases passed", self.cases);
    }
}

/// `Err` with a message unless `cond`.
pub fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

/// Run `f` on its own thread and wait at most `limit` for it. A hang (deadlock, endless
/// loop) or a panic becomes an `Err` naming what happened; a hung thread is left behind.
pub fn with_deadline<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(r)) => r,
        Ok(Err(p)) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("PANICKED: {msg}"))
        }
        Err(_) => Err(format!(
            "HUNG: no result after {limit:?} (deadlock or endless loop?)"
        )),
    }
}
