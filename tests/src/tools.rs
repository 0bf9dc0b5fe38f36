//! The reference tools (`qemu-img`, `qemu-io`) and ours (`img`): the one place that builds
//! their command lines, plus the qemu-side checks the tests make on images.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::process::{run, Output, TIMEOUT};
use crate::{in_ci, s, target_profile_dir, workspace_root};

/// A program the tests run: `qemu-img`, `qemu-io`, `img`, or another binary standing in
/// for one of them.
#[derive(Clone, Debug)]
pub struct Tool {
    program: PathBuf,
}

impl Tool {
    pub fn qemu_img() -> Tool {
        Tool::at("qemu-img")
    }

    pub fn qemu_io() -> Tool {
        Tool::at("qemu-io")
    }

    /// Our `img` ([`img_bin`]).
    pub fn img() -> Tool {
        Tool::at(img_bin())
    }

    /// The program at `program` (a path, or a name looked up in PATH).
    pub fn at(program: impl Into<PathBuf>) -> Tool {
        Tool {
            program: program.into(),
        }
    }

    /// The command line `program ARGS`, run in `dir` when given, in the C locale (the
    /// reference tools' messages are compared in it).
    pub fn command<S: AsRef<OsStr>>(&self, dir: Option<&Path>, args: &[S]) -> Command {
        let mut c = Command::new(&self.program);
        c.args(args).env("LC_ALL", "C");
        if let Some(d) = dir {
            c.current_dir(d);
        }
        c
    }

    /// Run once, with the default timeout.
    pub fn run_once<S: AsRef<OsStr>>(&self, dir: Option<&Path>, args: &[S]) -> Output {
        run(&mut self.command(dir, args), TIMEOUT)
    }

    /// Run with the default timeout; a lock conflict is retried for up to 2 s.
    ///
    /// The test threads of one binary spawn child processes, and a child holds a copy of
    /// every descriptor of this process until its exec, so an image another thread has
    /// just closed can look locked for a moment. Real conflicts (a holder that stays) still
    /// fail, only later. Use [`Tool::run_once`] where the conflict is the point.
    pub fn run<S: AsRef<OsStr>>(&self, dir: Option<&Path>, args: &[S]) -> Output {
        let start = Instant::now();
        loop {
            let out = self.run_once(dir, args);
            if out.stderr.contains("Is another process using the image")
                && start.elapsed() < Duration::from_secs(2)
            {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            return out;
        }
    }
}

/// `qemu-img ARGS`.
pub fn qemu_img<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Tool::qemu_img().run(None, args)
}

/// `qemu-img ARGS` run inside `dir`.
pub fn qemu_img_in<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> Output {
    Tool::qemu_img().run(Some(dir), args)
}

/// `qemu-io ARGS`.
pub fn qemu_io<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Tool::qemu_io().run(None, args)
}

/// `img ARGS` (our binary, built on first use).
pub fn img<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Tool::img().run(None, args)
}

/// `img ARGS` run inside `dir`.
pub fn img_in<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> Output {
    Tool::img().run(Some(dir), args)
}

/// Whether `qemu-img` can be run. Outside CI a test without it is skipped loudly; in CI its
/// absence fails the test.
pub fn have_qemu_img() -> bool {
    let ok = Tool::qemu_img()
        .command(None, &["--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok || !in_ci(), "qemu-img is missing in CI");
    if !ok {
        eprintln!("SKIPPED: qemu-img not installed");
    }
    ok
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

/// `qemu-img info --output=json` of `path` parsed.
pub fn qemu_info_json(path: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["info", "--output=json"];
    args.extend_from_slice(extra);
    args.push(s(path));
    let out = qemu_img(&args).ok();
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON from qemu-img info: {e}\n{}", out.stdout))
}

/// `Ok` when `qemu-img check` finds the image clean (exit 0, no error or leak reported).
/// Raw images are the caller's business (qemu-img check does not support raw).
pub fn qemu_check(path: &Path) -> Result<(), String> {
    let out = qemu_img(&["check", s(path)]);
    if out.success() && !out.stdout.contains("ERROR") && !out.stdout.contains("Leaked") {
        Ok(())
    } else {
        Err(format!(
            "qemu-img check of {} is not clean:\n{}",
            path.display(),
            out.report()
        ))
    }
}

/// Whether a qcow2 file's header has the dirty bit (lazy refcounts in use, not closed).
pub fn qcow2_is_dirty(path: &Path) -> bool {
    use crate::qcow2_layout::{get_be, INCOMPATIBLE_FEATURES, INCOMPAT_DIRTY};
    let mut head = [0u8; 80];
    std::io::Read::read_exact(&mut std::fs::File::open(path).unwrap(), &mut head).unwrap();
    get_be(
        &head,
        INCOMPATIBLE_FEATURES.offset,
        INCOMPATIBLE_FEATURES.width,
    ) & INCOMPAT_DIRTY
        != 0
}

/// The check of an image whose writer was killed: `qemu-img check` finds no corruption
/// (leaks are allowed; so are the stale refcounts of a dirty image when `dirty_allowed`),
/// and after `img check -r leaks` (`-r all` for a dirty image) run with `img` the image is
/// clean. Returns the repair made (`None`: clean as it was).
pub fn check_after_kill(
    img: &Tool,
    path: &Path,
    dirty_allowed: bool,
) -> Result<Option<&'static str>, String> {
    let dirty = dirty_allowed && qcow2_is_dirty(path);
    let chk = qemu_img(&["check", s(path)]);
    let mode = match chk.code {
        Some(0) => return Ok(None),
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
    let rep = img.run(None, &["check", "-r", mode, s(path)]);
    let again = qemu_img(&["check", s(path)]);
    if !again.success() {
        return Err(format!(
            "not clean after img check -r {mode}:\n{}\n{}",
            rep.report(),
            again.report()
        ));
    }
    Ok(Some(mode))
}

/// Assert `qemu-img check` reports the image clean ([`qemu_check`]).
#[track_caller]
pub fn assert_qemu_check_clean(path: &Path) {
    if let Err(e) = qemu_check(path) {
        panic!("{e}");
    }
}

/// `qemu-img convert [-f FMT] -O raw IMAGE OUT`, then the bytes of `out`: the guest-visible
/// contents of an image.
pub fn qemu_convert_raw(image: &Path, fmt: Option<&str>, out: &Path) -> Result<Vec<u8>, String> {
    let mut args = vec!["convert"];
    if let Some(f) = fmt {
        args.extend(["-f", f]);
    }
    args.extend(["-O", "raw", s(image), s(out)]);
    qemu_img(&args).check()?;
    std::fs::read(out).map_err(|e| format!("{}: {e}", out.display()))
}

/// The guest-visible contents of an image, via `qemu-img convert -O raw` into a scratch
/// file in `dir` (removed afterwards).
#[track_caller]
pub fn qemu_read_all(path: &Path, fmt: Option<&str>, dir: &Path) -> Vec<u8> {
    let out_path = dir.join(format!(
        "convert-{}.raw",
        path.file_name().unwrap().to_string_lossy()
    ));
    let data = qemu_convert_raw(path, fmt, &out_path).unwrap_or_else(|e| panic!("{e}"));
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
        let mut child = Tool::qemu_io()
            .command(None, &["-c", "sleep 600000", s(path)])
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
