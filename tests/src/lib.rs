//! Helpers shared by the cross-crate tests.
//!
//! - [`run`]: run a command with a timeout, capturing stdout, stderr and the exit status;
//! - [`qemu_img`], [`qemu_io`], [`img`]: wrappers for the reference tools and for ours;
//! - [`img_bin`]: locate (and build once per test process) the `img` binary;
//! - [`Rng`]: a small seeded generator, so every random test is reproducible;
//! - [`text_diff`]: a readable line diff for failure messages;
//! - [`engine`]: thin adapters over `common`'s public API;
//! - [`Failures`]: run many cases in one test and report every failing one;
//! - [`qemu_io_hold`]: a qemu-io process holding an image locked;
//! - [`with_deadline`]: run engine code with a deadline (hangs become failures);
//! - [`fake_kernel`]: tiny hand-made kernels for `vmm`;
//! - [`kvm`]: whether /dev/kvm is there, and whether it runs guests at hardware speed;
//! - [`mem_disk`]: an in-memory [`common::BlockDriver`] for device tests.
//!
//! Environment knobs for the cross tests (tests/tests/*.rs):
//! - `TEST_SEED=<n|0xhex>`: replay a randomized test (the seed is printed by every one);
//! - `PROP_SEQUENCES`, `PROP_OPS`: sequences per configuration and ops per sequence of the
//!   property tests (defaults 2 and 60);
//! - `KEEP_TMP=1`: keep the temporary directories with the images of a run;
//! - `IMG_TEST_BIN=<path>`: use another `img` binary (e.g. a qemu-img wrapper that maps the
//!   `qemu-img: ` prefix to `img: `, to check the tests themselves against the reference).
//!
//! The tests need `qemu-img`/`qemu-io` 10.0.2 and `prlimit` (util-linux) on PATH.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod engine;
pub mod fake_kernel;
pub mod kvm;
pub mod mem_disk;

/// Whether the tests run in CI (`CI` set to anything but empty, `0` or `false`): there a
/// missing prerequisite fails a test instead of skipping it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Default timeout for one external command.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// What a finished (or killed) command left behind.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, for messages.
    pub cmdline: String,
    /// Exit code; `None` when killed by a signal or by the timeout.
    pub code: Option<i32>,
    /// The signal that ended the process, if any.
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Whether we killed it because it ran past its timeout.
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }

    /// Panic with a full report unless the command exited 0.
    #[track_caller]
    pub fn ok(self) -> Output {
        if !self.success() {
            panic!("command failed:\n{}", self.report());
        }
        self
    }

    /// `Err` with the full report unless the command exited 0.
    pub fn check(self) -> Result<Output, String> {
        if self.success() {
            Ok(self)
        } else {
            Err(format!("command failed:\n{}", self.report()))
        }
    }

    /// A multi-line description for failure messages.
    pub fn report(&self) -> String {
        format!(
            "  $ {}\n  exit: {:?}{}{}\n  stdout:\n{}\n  stderr:\n{}",
            self.cmdline,
            self.code,
            self.signal
                .map(|s| format!(" (signal {s})"))
                .unwrap_or_default(),
            if self.timed_out {
                " (TIMED OUT, killed)"
            } else {
                ""
            },
            indent(&self.stdout),
            indent(&self.stderr)
        )
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    | {l}\n")).collect()
}

fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Run `cmd` (stdin from /dev/null, in a process group of its own) to completion or until
/// `timeout`, capturing everything. At the timeout the whole group is killed, and whatever is
/// left of it when the command exits is killed too (a leftover child would keep the output
/// pipes open): this never hangs.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let cmdline = std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| quote(&a.to_string_lossy())))
        .collect::<Vec<_>>()
        .join(" ");
    let cmdline = match cmd.get_current_dir() {
        Some(d) => format!("(cd {} && {cmdline})", d.display()),
        None => cmdline,
    };
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmdline}: {e}"));
    let kill_group = |pid: u32| {
        // SAFETY: kill has no memory-safety preconditions; a group that is gone is ESRCH.
        unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
    };
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let mut timed_out = false;
    let status = loop {
        match child.try_wait().expect("wait") {
            Some(st) => break st,
            None if start.elapsed() > timeout => {
                timed_out = true;
                kill_group(child.id());
                break child.wait().expect("wait after kill");
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    kill_group(child.id());
    use std::os::unix::process::ExitStatusExt;
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap()).into_owned();
    Output {
        cmdline,
        code: status.code(),
        signal: status.signal(),
        stdout,
        stderr,
        timed_out,
        elapsed: start.elapsed(),
    }
}

/// Run a program with arguments (in `dir`, when given) and the default timeout.
///
/// A lock conflict is retried for up to 2 s: the test threads of one binary spawn child
/// processes, and a child holds a copy of every descriptor of this process until its exec,
/// so an image another thread has just closed can look locked for a moment. Real conflicts
/// (a holder that stays) still fail, only later.
pub fn run_in<S: AsRef<std::ffi::OsStr>>(dir: Option<&Path>, prog: &Path, args: &[S]) -> Output {
    let start = std::time::Instant::now();
    loop {
        let mut c = Command::new(prog);
        c.args(args);
        // Reference tools print in C locale; keep ours the same.
        c.env("LC_ALL", "C");
        if let Some(d) = dir {
            c.current_dir(d);
        }
        let out = run(&mut c, TIMEOUT);
        if out.stderr.contains("Is another process using the image")
            && start.elapsed() < Duration::from_secs(2)
        {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        return out;
    }
}

/// `qemu-img ARGS`.
pub fn qemu_img<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    run_in(None, Path::new("qemu-img"), args)
}

/// `qemu-img ARGS` run inside `dir`.
pub fn qemu_img_in<S: AsRef<std::ffi::OsStr>>(dir: &Path, args: &[S]) -> Output {
    run_in(Some(dir), Path::new("qemu-img"), args)
}

/// `qemu-io ARGS`.
pub fn qemu_io<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    run_in(None, Path::new("qemu-io"), args)
}

/// `img ARGS` (our binary, built on first use).
pub fn img<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    run_in(None, &img_bin(), args)
}

/// `img ARGS` run inside `dir`.
pub fn img_in<S: AsRef<std::ffi::OsStr>>(dir: &Path, args: &[S]) -> Output {
    run_in(Some(dir), &img_bin(), args)
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

/// Build a workspace binary once per process and return its path.
fn build_bin(name: &str, cell: &'static OnceLock<PathBuf>) -> PathBuf {
    cell.get_or_init(|| {
        let dir = target_profile_dir();
        let profile = dir.file_name().unwrap().to_string_lossy().into_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut c = Command::new(cargo);
        c.current_dir(workspace_root())
            .args(["build", "-q", "-p", name, "--bin", name]);
        match profile.as_str() {
            "debug" => {}
            "release" => {
                c.arg("--release");
            }
            p => {
                c.args(["--profile", p]);
            }
        }
        // Build into the same target dir the tests run from.
        if let Some(target) = dir.parent() {
            c.arg("--target-dir").arg(target);
        }
        let out = run(&mut c, Duration::from_secs(1800));
        assert!(out.success(), "building {name} failed:\n{}", out.report());
        let bin = dir.join(name);
        assert!(bin.exists(), "{} not found after build", bin.display());
        bin
    })
    .clone()
}

/// Path of the `img` binary, built (once per test process) if needed.
///
/// `IMG_TEST_BIN=/path` uses that binary instead (e.g. a qemu-img wrapper, to validate the
/// tests themselves against the reference).
pub fn img_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("IMG_TEST_BIN") {
        return PathBuf::from(p);
    }
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    build_bin("img", &CELL)
}

/// A fresh temporary directory.
pub fn tempdir() -> tempfile::TempDir {
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
// qemu-side helpers

/// `qemu-img info --output=json` of `path` parsed.
pub fn qemu_info_json(path: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["info", "--output=json"];
    args.extend_from_slice(extra);
    args.push(s(path));
    let out = qemu_img(&args).ok();
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON from qemu-img info: {e}\n{}", out.stdout))
}

/// Assert `qemu-img check` reports the image clean (exit 0). Raw images are skipped by the
/// caller (qemu-img check does not support raw).
#[track_caller]
pub fn assert_qemu_check_clean(path: &Path) {
    let out = qemu_img(&["check", s(path)]);
    assert!(
        out.success() && !out.stdout.contains("ERROR") && !out.stdout.contains("Leaked"),
        "qemu-img check of {} is not clean:\n{}",
        path.display(),
        out.report()
    );
}

/// The guest-visible contents of an image, via `qemu-img convert -O raw`.
pub fn qemu_read_all(path: &Path, fmt: Option<&str>, dir: &Path) -> Vec<u8> {
    let out_path = dir.join(format!(
        "convert-{}.raw",
        path.file_name().unwrap().to_string_lossy()
    ));
    let mut args = vec!["convert".to_string()];
    if let Some(f) = fmt {
        args.push("-f".into());
        args.push(f.into());
    }
    args.extend([
        "-O".into(),
        "raw".into(),
        s(path).into(),
        s(&out_path).into(),
    ]);
    qemu_img(&args).ok();
    let data = std::fs::read(&out_path).expect("read converted raw");
    let _ = std::fs::remove_file(&out_path);
    data
}

/// Run one or more qemu-io commands on an image (opened read-write).
#[track_caller]
pub fn qemu_io_cmds(path: &Path, fmt: &str, cmds: &[String]) {
    for batch in cmds.chunks(200) {
        let mut args: Vec<String> = vec!["-f".into(), fmt.into()];
        for c in batch {
            args.push("-c".into());
            args.push(c.clone());
        }
        args.push(s(path).into());
        let out = qemu_io(&args).ok();
        // qemu-io reports per-command errors on stdout/stderr but still exits 0 at times.
        for line in out.stdout.lines().chain(out.stderr.lines()) {
            assert!(
                !(line.contains("failed") || line.contains("error") || line.contains("Error")),
                "qemu-io command failed: {line}\n{}",
                out.report()
            );
        }
    }
}

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

/// Map qemu-img's message prefix to ours, so that error text can be compared.
pub fn qemu_to_img_prefix(stderr: &str) -> String {
    stderr
        .lines()
        .map(|l| match l.strip_prefix("qemu-img: ") {
            Some(rest) => format!("img: {rest}"),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + if stderr.ends_with('\n') { "\n" } else { "" }
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

// ---------------------------------------------------------------------------------------------
// A qemu-io process holding an image open read-write (and so locked)

/// `qemu-io` holding an image open read-write; killed on drop.
pub struct QemuIoHolder {
    child: std::process::Child,
}

impl Drop for QemuIoHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether some process holds a byte-range (OFD or POSIX) lock on the file's inode.
fn inode_locked(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = match std::fs::metadata(path) {
        Ok(m) => m.ino(),
        Err(_) => return false,
    };
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let needle = format!(":{ino} ");
    locks.lines().any(|l| l.contains(&needle))
}

/// Start `qemu-io` on `path` (read-write, sleeping) and wait until its locks are visible in
/// /proc/locks. Polling with qemu-img itself would race with qemu-io taking its lock.
pub fn qemu_io_hold(path: &Path) -> QemuIoHolder {
    let mut last_err = String::new();
    for _attempt in 0..5 {
        let err_path =
            std::env::temp_dir().join(format!("qemu-io-holder-{}.err", std::process::id()));
        let mut child = Command::new("qemu-io")
            .args(["-c", "sleep 600000", s(path)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .expect("start qemu-io");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if inode_locked(path) {
                let _ = std::fs::remove_file(&err_path);
                return QemuIoHolder { child };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        last_err = std::fs::read_to_string(&err_path).unwrap_or_default();
        let _ = std::fs::remove_file(&err_path);
    }
    panic!("qemu-io never locked {}: {last_err}", path.display());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A command that outlives its timeout is killed with its children, and `run` returns
    /// promptly (a hung guest or tool must fail a test, not hang CI). So does a command that
    /// exits while a child it left behind still holds the output pipes.
    #[test]
    fn run_kills_the_whole_group() {
        let t0 = Instant::now();
        let o = run(
            Command::new("sh").args(["-c", "sleep 100 & sleep 100; echo never"]),
            Duration::from_millis(500),
        );
        assert!(o.timed_out && o.code.is_none(), "{}", o.report());
        assert!(!o.stdout.contains("never"), "{}", o.report());
        let o = run(
            Command::new("sh").args(["-c", "sleep 100 & echo started"]),
            Duration::from_secs(60),
        );
        assert!(o.success() && o.stdout == "started\n", "{}", o.report());
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "run() did not return promptly"
        );
    }
}
