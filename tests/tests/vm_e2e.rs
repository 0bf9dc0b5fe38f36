//! VM end-to-end tests: boot the Debian cloud kernel with a busybox initramfs under `vmm` and
//! check, from the host, what the guest saw and wrote.
//!
//! Where `vmm` runs is decided once per test process by timing a small guest loop on the
//! host's /dev/kvm (`integration_tests::kvm::probe_kvm`):
//! - at hardware speed (real VT-x/AMD-V), `vmm` runs directly on this host ([`run_direct`]);
//! - otherwise, as on this project's machines and CI, whose /dev/kvm emulates guest kernel
//!   code far too slowly to boot Linux, `vmm` runs inside a *test host*: `qemu-system-x86_64
//!   -accel tcg -cpu max` booting the same kernel with an initramfs
//!   (fixtures/initramfs/testhost-init) that loads kvm-amd (nested SVM), runs `/run.sh` (written
//!   here: it invokes a statically linked `/vmm`), and writes `/results` (vmm's console, stderr
//!   and exit code per run, plus the disk images after the run) as a tar archive to a raw
//!   results disk ([`run_in_testhost`]).
//!
//! Both produce the same [`Runs`], which the checks read.
//!
//! Tests:
//! - `reference_guest_under_qemu`: the same guest scenarios booted directly under QEMU (TCG,
//!   virtio-blk-pci). Needs no `vmm`; it proves the fixtures, the guest scripts and the checks.
//! - `testhost_provides_kvm`: the test host boots and has `/dev/kvm` after loading the modules.
//! - `vmm_*`: one shared batch runs three `vmm run`s ("boot": 2 CPUs, 512M, no disks; "a":
//!   qcow2 overlay on a patterned base + ext4 disk; "b": readonly=on and snapshot=on disks);
//!   each test checks one aspect of the shared results.
//! - `vmm_rejects_bad_inputs`: runs `vmm` on this host directly.
//! - `direct_runner_reports_each_run`, `kvm_probe_guest_stops_and_probe_decides`: the direct
//!   path and the probe, with fake kernels (so on any /dev/kvm).
//!
//! Prerequisites (qemu-system-x86_64, cpio, qemu-img/qemu-io, e2fsprogs, network for
//! `apt-get download`): missing ones make a test FAIL when `CI` is set, and print
//! "SKIPPED: reason" otherwise. `fixtures/install-host-deps.sh` installs them.
//!
//! Environment: `E2E_SEED=<n>` reproduces the random data/offsets, `E2E_KEEP=1` keeps the work
//! directories (their paths are printed; under target/vm-e2e/), `E2E_VMM=<path>` uses that
//! (static) vmm binary instead of building one, `E2E_RUNNER=direct|testhost` skips the probe.
//!
//! Assumed `vmm` interface (one place: [`vmm_args`]):
//! `vmm run --kernel K --initrd I --append CMDLINE --cpus N --memory 512M
//!  --drive file=P,format=qcow2[,readonly=on][,snapshot=on] ...`; drives appear as vda, vdb, ...
//! in order; the guest console (8250 ttyS0) goes to vmm's stdout; the guest ends with
//! `reboot -f` under `reboot=k` (i8042 reset), after which vmm exits 0.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use integration_tests::fake_kernel;
use integration_tests::in_ci;
use integration_tests::kvm::{have_kvm, probe_kvm, KvmSpeed};

// ---------------------------------------------------------------------------------------------
// Basics: prerequisites, commands with timeouts, hashing
// ---------------------------------------------------------------------------------------------

/// Guest kernel command line (the same under vmm and QEMU).
/// `printk.devkmsg=on`: the guest reports through /dev/kmsg without rate limiting.
const GUEST_CMDLINE: &str = "console=ttyS0 quiet panic=-1 reboot=k printk.devkmsg=on";
/// Time one `vmm run` (one guest boot + its checks) may take inside the test host.
const VM_TIMEOUT_S: u64 = 120;
/// Time a guest booted directly under QEMU TCG may take.
const QEMU_GUEST_TIMEOUT_S: u64 = 120;

/// A missing prerequisite: FAIL in CI, otherwise print why and skip.
macro_rules! require {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(reason) => {
                if in_ci() {
                    panic!("prerequisite missing (CI is set, so this is a failure): {reason}");
                }
                eprintln!("SKIPPED: {reason}");
                return;
            }
        }
    };
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn fixtures_dir() -> PathBuf {
    workspace_root().join("fixtures")
}

/// Find a tool in PATH, or in the sbin directories a non-root PATH may lack.
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn t(name: &str) -> PathBuf {
    tool(name).unwrap_or_else(|| PathBuf::from(name))
}

/// What a finished (or killed) command left behind.
struct Out {
    cmdline: String,
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    timed_out: bool,
    elapsed: Duration,
}

impl Out {
    fn ok(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    fn report(&self) -> String {
        format!(
            "$ {}\nexit: {:?}{} after {:.1}s\nstdout:\n{}\nstderr:\n{}",
            self.cmdline,
            self.code,
            if self.timed_out {
                " (TIMED OUT, killed)"
            } else {
                ""
            },
            self.elapsed.as_secs_f64(),
            tail(&self.stdout(), 60),
            tail(&self.stderr(), 60)
        )
    }
    /// Err with the report unless it exited 0.
    fn check(self) -> Result<Out, String> {
        if self.ok() {
            Ok(self)
        } else {
            Err(format!("command failed:\n{}", self.report()))
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut r = String::new();
    if start > 0 {
        r.push_str(&format!("    | ... ({start} lines omitted)\n"));
    }
    for l in &lines[start..] {
        r.push_str("    | ");
        r.push_str(l);
        r.push('\n');
    }
    r
}

/// Run `cmd` (stdin from /dev/null, in its own process group) until it exits or `timeout`
/// passes; then the whole group is killed. Never hangs.
fn run(cmd: &mut Command, timeout: Duration) -> Out {
    let cmdline = format!("{cmd:?}");
    let start = Instant::now();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Out {
                cmdline,
                code: None,
                stdout: vec![],
                stderr: format!("cannot spawn: {e}").into_bytes(),
                timed_out: false,
                elapsed: start.elapsed(),
            }
        }
    };
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let ho = std::thread::spawn(move || {
        let mut v = vec![];
        let _ = so.read_to_end(&mut v);
        v
    });
    let he = std::thread::spawn(move || {
        let mut v = vec![];
        let _ = se.read_to_end(&mut v);
        v
    });
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) => {}
            Err(_) => break None,
        }
        if start.elapsed() >= timeout {
            timed_out = true;
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            break child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Whatever is left of the group (e.g. children of a shell) must not keep the pipes open.
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    Out {
        cmdline,
        code: status.and_then(|s| s.code()),
        stdout: ho.join().unwrap_or_default(),
        stderr: he.join().unwrap_or_default(),
        timed_out,
        elapsed: start.elapsed(),
    }
}

fn sha256_file(path: &Path) -> String {
    let o = run(
        Command::new(t("sha256sum")).arg(path),
        Duration::from_secs(60),
    );
    assert!(o.ok(), "sha256sum failed:\n{}", o.report());
    o.stdout()
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

fn sha256(data: &[u8]) -> String {
    let mut child = Command::new(t("sha256sum"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn sha256sum");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let w = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("sha256sum");
    w.join().unwrap().expect("write to sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);
impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("E2E_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("vm_e2e: random seed {seed} (reproduce with E2E_SEED={seed})");
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// A work directory under target/vm-e2e/, named `<tag>-<pid>-<n>`. Removed on drop unless
/// E2E_KEEP is set or the test is failing (then its path is printed). Directories left by test
/// processes that no longer run (the shared suite's lives in a static, never dropped) are
/// removed when the next one is made.
struct WorkDir(PathBuf);
impl WorkDir {
    fn new(tag: &str) -> WorkDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let base = workspace_root().join("target").join("vm-e2e");
        fs::create_dir_all(&base).unwrap();
        if std::env::var_os("E2E_KEEP").is_none() {
            for e in fs::read_dir(&base).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let pid = name.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
                if let Some(pid) = pid {
                    if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                        let _ = fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = base.join(format!("{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        eprintln!("vm_e2e: work dir {}", p.display());
        WorkDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}
impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "vm_e2e: keeping work dir {} for inspection",
                self.0.display()
            );
        } else if std::env::var_os("E2E_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures: tools, guest kernel + busybox, static vmm, initramfs images
// ---------------------------------------------------------------------------------------------

struct Fixtures {
    /// The Debian cloud kernel (guest and test host).
    kernel: PathBuf,
}

/// Check the host tools and fetch the kernel and busybox (once per test process).
fn fixtures() -> Result<&'static Fixtures, String> {
    static F: OnceLock<Result<Fixtures, String>> = OnceLock::new();
    F.get_or_init(|| {
        let needed = [
            (
                "qemu-system-x86_64",
                "qemu-system-x86 (from bookworm-backports)",
            ),
            ("qemu-img", "qemu-utils"),
            ("qemu-io", "qemu-utils"),
            ("cpio", "cpio"),
            ("mkfs.ext4", "e2fsprogs"),
            ("debugfs", "e2fsprogs"),
            ("e2fsck", "e2fsprogs"),
            ("apt-get", "apt"),
            ("dpkg", "dpkg"),
            ("gzip", "gzip"),
            ("tar", "tar"),
            ("sha256sum", "coreutils"),
        ];
        let missing: Vec<String> = needed
            .iter()
            .filter(|(n, _)| tool(n).is_none())
            .map(|(n, p)| format!("{n} (package {p})"))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "missing tools: {}; run fixtures/install-host-deps.sh",
                missing.join(", ")
            ));
        }
        let o = run(
            Command::new("bash").arg(fixtures_dir().join("fetch-guest.sh")),
            Duration::from_secs(600),
        );
        if !o.ok() {
            return Err(format!(
                "cannot fetch the guest kernel/busybox (network or apt problem?):\n{}",
                o.report()
            ));
        }
        let cache = fixtures_dir().join("cache");
        let kernel = cache.join("vmlinuz");
        if !kernel.is_file() {
            return Err(format!("{} missing after fetch-guest.sh", kernel.display()));
        }
        Ok(Fixtures { kernel })
    })
    .as_ref()
    .map_err(|e| e.clone())
}

/// The binaries under test.
struct Bins {
    /// Statically linked `vmm` (it runs inside the test host).
    vmm: PathBuf,
    /// `img`, for `img create` of the overlay.
    img: PathBuf,
}

/// Build the statically linked `vmm` (and `img`) once per test process, into target/static
/// (`RUSTFLAGS=-C target-feature=+crt-static`, explicit `--target` so build scripts and proc
/// macros stay dynamic) so the normal build cache is not invalidated. A build failure is a test
/// failure, not a skip. `E2E_VMM=/path/to/static/vmm` uses that binary instead of building.
fn static_bins() -> Result<&'static Bins, String> {
    static B: OnceLock<Result<Bins, String>> = OnceLock::new();
    B.get_or_init(|| {
        let root = workspace_root();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let triple = "x86_64-unknown-linux-gnu";
        let build = |pkg: &str| {
            run(
                Command::new(&cargo)
                    .current_dir(&root)
                    .env_remove("CARGO_ENCODED_RUSTFLAGS")
                    .env("RUSTFLAGS", "-C target-feature=+crt-static")
                    .env("CARGO_TARGET_DIR", root.join("target/static"))
                    .args(["build", "-p", pkg, "--bin", pkg, "--target", triple]),
                Duration::from_secs(1800),
            )
        };
        let dir = root.join("target/static").join(triple).join("debug");
        let vmm = match std::env::var_os("E2E_VMM") {
            Some(p) => PathBuf::from(p),
            None => {
                let t0 = Instant::now();
                let o = build("vmm");
                if !o.ok() {
                    return Err(format!("static build of vmm failed:\n{}", o.report()));
                }
                eprintln!(
                    "vm_e2e: static vmm built in {:.1}s",
                    t0.elapsed().as_secs_f64()
                );
                dir.join("vmm")
            }
        };
        let o = build("img");
        if !o.ok() {
            return Err(format!("static build of img failed:\n{}", o.report()));
        }
        Ok(Bins {
            vmm,
            img: dir.join("img"),
        })
    })
    .as_ref()
    .map_err(|e| e.clone())
}

fn build_initramfs(mode: &str, out: &Path, extra: &Path) -> Result<(), String> {
    run(
        Command::new("bash")
            .arg(fixtures_dir().join("build-initramfs.sh"))
            .arg(mode)
            .arg(out)
            .arg(extra),
        Duration::from_secs(300),
    )
    .check()
    .map(|_| ())
}

// ---------------------------------------------------------------------------------------------
// VM description, and the two ways to run it (under vmm in the test host; under QEMU)
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Drive {
    /// File name inside the scenario's image directory.
    file: String,
    readonly: bool,
    snapshot: bool,
}

/// One guest boot: machine shape, disks, the script the guest runs, and data files for it.
struct VmSpec {
    name: String,
    cpus: u32,
    memory_mib: u32,
    drives: Vec<Drive>,
    /// Embedded as /test.sh in the guest initramfs.
    test_sh: String,
    /// Embedded as /data/<name> in the guest initramfs.
    data: Vec<(String, Vec<u8>)>,
}

/// What one guest boot produced.
#[derive(Default, Debug)]
struct VmOutput {
    /// Guest console (vmm's stdout, or QEMU's serial).
    console: String,
    /// vmm's stderr.
    stderr: String,
    /// vmm's exit code (None: killed / timed out / not run).
    rc: Option<i32>,
    seconds: f64,
}

impl VmOutput {
    fn describe(&self) -> String {
        format!(
            "exit code {:?} after {:.1}s\nconsole:\n{}stderr:\n{}",
            self.rc,
            self.seconds,
            tail(&self.console, 40),
            tail(&self.stderr, 20)
        )
    }
}

/// Guest-side report. The guest writes `E2E: R <key> <value...>`, `E2E: WARN ...` and
/// `E2E: END rc=N` through /dev/kmsg (the kernel prints them on the console with polled UART
/// writes, behind a timestamp), and `E2E-TTY-OK` through the tty (needs the UART interrupt).
struct Report {
    values: BTreeMap<String, String>,
    warnings: Vec<String>,
    end_rc: Option<i32>,
    tty_ok: bool,
}

impl Report {
    fn parse(console: &str) -> Report {
        let mut r = Report {
            values: BTreeMap::new(),
            warnings: vec![],
            end_rc: None,
            tty_ok: false,
        };
        for line in console.lines() {
            let line = line.trim_end_matches('\r');
            if line.contains("E2E-TTY-OK") {
                r.tty_ok = true;
            }
            let Some(at) = line.find("E2E: ") else {
                continue;
            };
            let msg = line[at + 5..].trim();
            if let Some(rest) = msg.strip_prefix("R ") {
                let mut it = rest.splitn(2, ' ');
                let k = it.next().unwrap_or("").to_string();
                let v = it.next().unwrap_or("").trim().to_string();
                r.values.insert(k, v);
            } else if let Some(rc) = msg.strip_prefix("END rc=") {
                r.end_rc = rc.trim().parse().ok();
            } else if msg.starts_with("WARN") {
                r.warnings.push(msg.to_string());
            }
        }
        r
    }
    fn get(&self, k: &str) -> Result<&str, String> {
        self.values.get(k).map(|s| s.as_str()).ok_or_else(|| {
            let mut m = format!("guest did not report '{k}'");
            if !self.warnings.is_empty() {
                m.push_str(&format!(" (guest warnings: {})", self.warnings.join("; ")));
            }
            m
        })
    }
}

/// The guest initramfs for `spec`, with /test.sh, /data/* and /etc/e2e-disks.
fn guest_initramfs(spec: &VmSpec, work: &Path) -> Result<PathBuf, String> {
    let extra = work.join(format!("guest-extra-{}", spec.name));
    fs::create_dir_all(extra.join("data")).unwrap();
    fs::create_dir_all(extra.join("etc")).unwrap();
    fs::write(extra.join("test.sh"), &spec.test_sh).unwrap();
    let disks: Vec<String> = (0..spec.drives.len())
        .map(|i| format!("vd{}", (b'a' + i as u8) as char))
        .collect();
    fs::write(extra.join("etc/e2e-disks"), disks.join(" ")).unwrap();
    for (name, bytes) in &spec.data {
        fs::write(extra.join("data").join(name), bytes).unwrap();
    }
    let out = work.join(format!("guest-{}.cpio.gz", spec.name));
    build_initramfs("guest", &out, &extra)?;
    Ok(out)
}

/// The `vmm run` command line for `spec` (the single place that knows vmm's flags).
fn vmm_args(spec: &VmSpec, kernel: &str, initrd: &str, image_dir: &str) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        kernel.into(),
        "--initrd".into(),
        initrd.into(),
        "--append".into(),
        GUEST_CMDLINE.into(),
        "--cpus".into(),
        spec.cpus.to_string(),
        "--memory".into(),
        format!("{}M", spec.memory_mib),
    ];
    for d in &spec.drives {
        let mut v = format!("file={}/{},format=qcow2", image_dir, d.file);
        if d.readonly {
            v.push_str(",readonly=on");
        }
        if d.snapshot {
            v.push_str(",snapshot=on");
        }
        a.push("--drive".into());
        a.push(v);
    }
    a
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Boot `spec` directly under QEMU (TCG), on the images in `image_dir` (modified in place,
/// like vmm would). The reference run.
fn run_under_qemu(spec: &VmSpec, image_dir: &Path, work: &Path) -> Result<VmOutput, String> {
    let f = fixtures()?;
    let initrd = guest_initramfs(spec, work)?;
    let mut cmd = Command::new(t("qemu-system-x86_64"));
    cmd.args([
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-nodefaults",
        "-no-user-config",
    ])
    .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
    .args([
        "-smp",
        &spec.cpus.to_string(),
        "-m",
        &format!("{}M", spec.memory_mib),
    ])
    .arg("-kernel")
    .arg(&f.kernel)
    .arg("-initrd")
    .arg(&initrd)
    .args(["-append", GUEST_CMDLINE]);
    for (i, d) in spec.drives.iter().enumerate() {
        let mut v = format!(
            "file={},format=qcow2,if=none,id=d{i},cache=writeback",
            image_dir.join(&d.file).display()
        );
        if d.readonly {
            v.push_str(",readonly=on");
        }
        if d.snapshot {
            v.push_str(",snapshot=on");
        }
        cmd.arg("-drive")
            .arg(v)
            .arg("-device")
            .arg(format!("virtio-blk-pci,drive=d{i}"));
    }
    let o = run(&mut cmd, Duration::from_secs(QEMU_GUEST_TIMEOUT_S));
    eprintln!(
        "vm_e2e: qemu guest '{}' ran {:.1}s",
        spec.name,
        o.elapsed.as_secs_f64()
    );
    let _ = fs::write(work.join(format!("console-{}.txt", spec.name)), &o.stdout);
    Ok(VmOutput {
        console: o.stdout(),
        stderr: o.stderr(),
        rc: if o.timed_out { None } else { o.code },
        seconds: o.elapsed.as_secs_f64(),
    })
}

/// What one batch of `vmm` runs produced (in the test host, or directly on this host).
struct Runs {
    /// Per `VmSpec::name`.
    vms: BTreeMap<String, VmOutput>,
    /// The images as they were after the runs (copies; the input directory is not touched).
    image_dir: PathBuf,
    /// Whether /dev/kvm was there for the runs.
    kvm: bool,
    log: String,
    seconds: f64,
}

/// Boot the test host (QEMU TCG, nested SVM) and run each spec under the static `vmm`, one
/// after the other, on the images of `image_dir` (copied in; modified copies come back in
/// `Runs::image_dir`). `vmm` = None boots the test host without running anything.
fn run_in_testhost(
    specs: &[&VmSpec],
    image_dir: &Path,
    vmm: Option<&Path>,
    work: &Path,
) -> Result<Runs, String> {
    let f = fixtures()?;
    let extra = work.join("testhost-extra");
    let res_images = extra.join("results/images");
    fs::create_dir_all(&res_images).unwrap();
    fs::create_dir_all(extra.join("guest")).unwrap();
    fs::copy(&f.kernel, extra.join("guest/vmlinuz")).map_err(|e| e.to_string())?;
    let mut image_bytes = 0u64;
    for e in fs::read_dir(image_dir).unwrap() {
        let e = e.unwrap();
        image_bytes += e.metadata().unwrap().len();
        fs::copy(e.path(), res_images.join(e.file_name())).map_err(|e| e.to_string())?;
    }
    let mut script = String::from(
        "# generated by tests/tests/vm_e2e.rs\n\
         run_vm() {\n\
         \x20   name=$1; shift\n\
         \x20   mkdir -p /results/vm-$name\n\
         \x20   t0=$(cut -d' ' -f1 /proc/uptime)\n\
         \x20   echo \"TESTHOST: vmm run $name\"\n\
         \x20   timeout -s KILL $VM_TIMEOUT /vmm \"$@\" </dev/null >/results/vm-$name/console 2>/results/vm-$name/stderr\n\
         \x20   echo $? >/results/vm-$name/rc\n\
         \x20   t1=$(cut -d' ' -f1 /proc/uptime)\n\
         \x20   echo \"$t0 $t1\" >/results/vm-$name/time\n\
         \x20   echo \"TESTHOST: vmm run $name: rc=$(cat /results/vm-$name/rc) ($t0 -> $t1)\"\n\
         }\n\
         cd /results/images\n",
    );
    script.push_str(&format!("VM_TIMEOUT={VM_TIMEOUT_S}\n"));
    if let Some(vmm) = vmm {
        fs::copy(vmm, extra.join("vmm")).map_err(|e| format!("copy vmm: {e}"))?;
        for spec in specs {
            let initrd = guest_initramfs(spec, work)?;
            fs::copy(&initrd, extra.join(format!("guest/{}.cpio.gz", spec.name))).unwrap();
            let args = vmm_args(
                spec,
                "/guest/vmlinuz",
                &format!("/guest/{}.cpio.gz", spec.name),
                "/results/images",
            );
            let q: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
            script.push_str(&format!("run_vm {} {}\n", spec.name, q.join(" ")));
        }
    }
    fs::write(extra.join("run.sh"), script).unwrap();
    let initrd = work.join("testhost.cpio.gz");
    build_initramfs("testhost", &initrd, &extra)?;

    // Results disk: a tar of /results, images included.
    let results = work.join("results.img");
    let size = (64u64 << 20) + 2 * image_bytes;
    fs::File::create(&results).unwrap().set_len(size).unwrap();

    let timeout = Duration::from_secs(60 + VM_TIMEOUT_S * specs.len() as u64);
    let mut cmd = Command::new(t("qemu-system-x86_64"));
    cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
        ])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(&f.kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=res",
            results.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=res"]);
    let o = run(&mut cmd, timeout);
    eprintln!("vm_e2e: test host ran {:.1}s", o.elapsed.as_secs_f64());
    let out_dir = work.join("out");
    fs::create_dir_all(&out_dir).unwrap();
    let x = run(
        Command::new(t("tar"))
            .arg("-xf")
            .arg(&results)
            .arg("-C")
            .arg(&out_dir),
        Duration::from_secs(120),
    );
    if !out_dir.join("zz-complete").exists() {
        return Err(format!(
            "the test host did not write its results (tar: {})\n--- test host:\n{}",
            x.stderr().trim(),
            o.report()
        ));
    }
    let rd = |p: &Path| fs::read_to_string(p).unwrap_or_default();
    let mut vms = BTreeMap::new();
    for spec in specs {
        let d = out_dir.join(format!("vm-{}", spec.name));
        let times: Vec<f64> = rd(&d.join("time"))
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect();
        let rc: Option<i32> = rd(&d.join("rc")).trim().parse().ok();
        vms.insert(
            spec.name.clone(),
            VmOutput {
                console: rd(&d.join("console")),
                stderr: rd(&d.join("stderr")),
                // 137 = killed by `timeout -s KILL`.
                rc: rc.filter(|&c| c != 137),
                seconds: if times.len() == 2 {
                    times[1] - times[0]
                } else {
                    0.0
                },
            },
        );
    }
    Ok(Runs {
        vms,
        image_dir: out_dir.join("images"),
        kvm: rd(&out_dir.join("kvm")).trim() == "yes",
        log: format!(
            "{}\n--- run.log:\n{}\n--- test host console:\n{}",
            rd(&out_dir.join("testhost.log")),
            rd(&out_dir.join("run.log")),
            tail(&o.stdout(), 40)
        ),
        seconds: o.elapsed.as_secs_f64(),
    })
}

/// Run each spec under `vmm` on this host, one after the other, with `kernel`, on copies of
/// the images in `image_dir` (made in `work/direct-images`). For hosts whose /dev/kvm runs
/// guests at hardware speed; a run past `timeout` is killed (its `rc` is then None).
fn run_direct(
    specs: &[&VmSpec],
    kernel: &Path,
    image_dir: &Path,
    vmm: &Path,
    work: &Path,
    timeout: Duration,
) -> Result<Runs, String> {
    let t0 = Instant::now();
    let images = work.join("direct-images");
    fs::create_dir_all(&images).map_err(|e| format!("{}: {e}", images.display()))?;
    for e in fs::read_dir(image_dir).map_err(|e| format!("{}: {e}", image_dir.display()))? {
        let e = e.map_err(|e| e.to_string())?;
        fs::copy(e.path(), images.join(e.file_name())).map_err(|e| format!("copy image: {e}"))?;
    }
    let utf8 = |p: &Path| p.to_str().map(String::from).ok_or("non-UTF-8 path");
    let mut vms = BTreeMap::new();
    let mut log = String::new();
    for spec in specs {
        let initrd = guest_initramfs(spec, work)?;
        let args = vmm_args(spec, &utf8(kernel)?, &utf8(&initrd)?, &utf8(&images)?);
        let o = run(Command::new(vmm).args(&args).current_dir(&images), timeout);
        log.push_str(&format!(
            "vmm run {}: exit {:?}{} after {:.1}s\n",
            spec.name,
            o.code,
            if o.timed_out {
                " (killed at the timeout)"
            } else {
                ""
            },
            o.elapsed.as_secs_f64()
        ));
        let _ = fs::write(work.join(format!("console-{}.txt", spec.name)), &o.stdout);
        vms.insert(
            spec.name.clone(),
            VmOutput {
                console: o.stdout(),
                stderr: o.stderr(),
                rc: if o.timed_out { None } else { o.code },
                seconds: o.elapsed.as_secs_f64(),
            },
        );
    }
    Ok(Runs {
        vms,
        image_dir: images,
        kvm: true,
        log,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Where the suite's `vmm` runs happen.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Runner {
    /// On this host: its /dev/kvm runs guests at hardware speed.
    Direct,
    /// Inside the nested-KVM test host ([`run_in_testhost`]).
    TestHost,
}

/// Decided once per test process. `E2E_RUNNER=direct|testhost` forces one; otherwise the
/// host's /dev/kvm is timed with a small guest loop under `vmm` ([`probe_kvm`]): at hardware
/// speed the runs happen directly, else (emulated, or no usable /dev/kvm) in the test host.
fn runner(vmm: &Path) -> Result<Runner, String> {
    static R: OnceLock<Result<Runner, String>> = OnceLock::new();
    R.get_or_init(|| {
        let forced = std::env::var("E2E_RUNNER").unwrap_or_default();
        let r = match forced.as_str() {
            "direct" => Runner::Direct,
            "testhost" => Runner::TestHost,
            "" => {
                let work = WorkDir::new("probe");
                let p = probe_kvm(vmm, work.path());
                let r = if p.speed == KvmSpeed::Hardware {
                    Runner::Direct
                } else {
                    Runner::TestHost
                };
                eprintln!("vm_e2e: /dev/kvm probe: {:?}, {}: {r:?}", p.speed, p.detail);
                return Ok(r);
            }
            other => return Err(format!("E2E_RUNNER={other}: expected direct or testhost")),
        };
        eprintln!("vm_e2e: E2E_RUNNER: {r:?}");
        Ok(r)
    })
    .clone()
}

// ---------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

fn qemu_img(args: &[&str], dir: &Path) -> Result<Out, String> {
    run(
        Command::new(t("qemu-img")).current_dir(dir).args(args),
        Duration::from_secs(120),
    )
    .check()
}

/// Create a qcow2 and fill regions with byte patterns through qemu-io.
fn make_patterned_qcow2(path: &Path, size: u64, patterns: &[(u8, u64, u64)]) -> Result<(), String> {
    let dir = path.parent().unwrap();
    let name = path.file_name().unwrap().to_str().unwrap();
    qemu_img(
        &["create", "-q", "-f", "qcow2", name, &size.to_string()],
        dir,
    )?;
    let mut cmd = Command::new(t("qemu-io"));
    cmd.current_dir(dir).args(["-f", "qcow2"]);
    for (p, off, len) in patterns {
        cmd.arg("-c").arg(format!("write -P {p} {off} {len}"));
    }
    cmd.arg(name);
    run(&mut cmd, Duration::from_secs(120)).check()?;
    Ok(())
}

/// `img create -f qcow2 -b BASE -F qcow2 OVERLAY` (our tool), or qemu-img if img cannot.
/// The overlay for vda: made by `img create` when `img` is given (the vmm runs: the issue
/// asks for an overlay made by `img`), by qemu-img for the QEMU reference run.
fn make_overlay(dir: &Path, base: &str, overlay: &str, img: Option<&Path>) -> Result<(), String> {
    let args = [
        "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay,
    ];
    let Some(img) = img else {
        return qemu_img(&args, dir).map(|_| ());
    };
    let o = run(
        Command::new(img).current_dir(dir).args(args),
        Duration::from_secs(60),
    );
    if !o.ok() {
        return Err(format!("img create of the overlay failed:\n{}", o.report()));
    }
    qemu_img_check(&dir.join(overlay))
}

fn to_raw(image: &Path, out: &Path) -> Result<Vec<u8>, String> {
    run(
        Command::new(t("qemu-img"))
            .args(["convert", "-O", "raw"])
            .arg(image)
            .arg(out),
        Duration::from_secs(120),
    )
    .check()?;
    fs::read(out).map_err(|e| e.to_string())
}

fn qemu_img_check(image: &Path) -> Result<(), String> {
    let o = run(
        Command::new(t("qemu-img")).arg("check").arg(image),
        Duration::from_secs(120),
    );
    if o.ok() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img check {} is not clean:\n{}",
            image.display(),
            o.report()
        ))
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

// ---------------------------------------------------------------------------------------------
// Scenario A: CPUs/memory, qcow2 overlay on a patterned base (vda), ext4 (vdb)
// ---------------------------------------------------------------------------------------------

const BASE_SIZE: u64 = 64 * MIB;
/// (pattern byte, offset, length) written into base.qcow2 with qemu-io.
const BASE_PATTERNS: &[(u8, u64, u64)] = &[
    (0xa5, 0, MIB),
    (0x5a, 4 * MIB, MIB),
    (0x3c, 32 * MIB - 64 * KIB, 192 * KIB),
    (0xc3, BASE_SIZE - 256 * KIB, 256 * KIB),
];

struct ScenarioA {
    spec: VmSpec,
    /// The guest's writes to vda: (offset, data).
    writes: Vec<(u64, Vec<u8>)>,
    /// The base image's guest-visible content.
    base_raw: Vec<u8>,
    base_sha_before: String,
    /// Text of /host/hello.txt on the ext4 disk.
    host_text: String,
    /// Token the guest writes into /guest/from-guest.txt.
    token: String,
}

fn scenario_a(
    dir: &Path,
    work: &Path,
    rng: &mut Rng,
    bins: Option<&Bins>,
) -> Result<ScenarioA, String> {
    fs::create_dir_all(dir).unwrap();
    // vda: overlay.qcow2 -> base.qcow2 (relative backing name: the pair moves together).
    make_patterned_qcow2(&dir.join("base.qcow2"), BASE_SIZE, BASE_PATTERNS)?;
    make_overlay(
        dir,
        "base.qcow2",
        "overlay.qcow2",
        bins.map(|b| b.img.as_path()),
    )?;
    let base_raw = to_raw(&dir.join("base.qcow2"), &work.join("base-a.raw"))?;
    let base_sha_before = sha256_file(&dir.join("base.qcow2"));

    // vdb: ext4 built on the host, converted to qcow2.
    let token = format!("{:016x}", rng.next());
    let host_text = format!("hello from the host, token {:016x}\n", rng.next());
    let tree = work.join("ext4-tree");
    fs::create_dir_all(tree.join("host")).unwrap();
    fs::create_dir_all(tree.join("guest")).unwrap();
    fs::write(tree.join("host/hello.txt"), &host_text).unwrap();
    let raw = work.join("data.raw");
    run(
        Command::new(t("mkfs.ext4"))
            .args(["-q", "-F", "-L", "e2e", "-d"])
            .arg(&tree)
            .arg(&raw)
            .arg("32M"),
        Duration::from_secs(60),
    )
    .check()?;
    qemu_img(
        &[
            "convert",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            dir.join("data.qcow2").to_str().unwrap(),
        ],
        dir,
    )?;

    // The guest's writes: fixed interesting places (partial clusters over backing data,
    // crossing a pattern edge, crossing a cluster boundary, unallocated space, the last block)
    // plus random ones; all 4 KiB aligned and non-overlapping.
    let mut places: Vec<(u64, u64)> = vec![
        (0, 4 * KIB),
        (MIB - 4 * KIB, 8 * KIB),
        (4 * MIB + 60 * KIB, 8 * KIB),
        (20 * MIB + 4 * KIB * rng.below(64), 128 * KIB),
        (32 * MIB - 4 * KIB, 12 * KIB),
        (BASE_SIZE - 4 * KIB, 4 * KIB),
    ];
    while places.len() < 10 {
        let len = 4 * KIB * (1 + rng.below(16));
        let off = 4 * KIB * rng.below((BASE_SIZE - len) / (4 * KIB));
        if places.iter().all(|&(o, l)| off + len <= o || o + l <= off) {
            places.push((off, len));
        }
    }
    let writes: Vec<(u64, Vec<u8>)> = places
        .iter()
        .map(|&(o, l)| (o, rng.bytes(l as usize)))
        .collect();

    let mut sh = String::from(GUEST_SH_PRELUDE);
    sh.push_str("r vda_sectors \"$(cat /sys/block/vda/size)\"\n");
    // The base, read through the overlay before any write.
    for (i, (_, off, len)) in BASE_PATTERNS.iter().enumerate() {
        sh.push_str(&format!("r base.{i} \"$(hash_dev vda {off} {len})\"\n"));
    }
    for (i, (off, data)) in writes.iter().enumerate() {
        sh.push_str(&format!(
            "write_dev vda {off} /data/w{i}; r write.{i} \"off={off} len={} rc=$? sha=$(sha /data/w{i})\"\n",
            data.len()
        ));
    }
    for (i, (off, data)) in writes.iter().enumerate() {
        sh.push_str(&format!(
            "r readback.{i} \"$(hash_dev vda {off} {})\"\n",
            data.len()
        ));
    }
    sh.push_str(&format!(
        "timeout 60 mount -t ext4 /dev/vdb /mnt; r mount_vdb \"rc=$?\"\n\
         r host_sha \"$(sha /mnt/host/hello.txt)\"\n\
         echo 'written by the guest, token {token}' > /mnt/guest/from-guest.txt; r guest_write \"rc=$?\"\n\
         cp /data/w0 /mnt/guest/blob.bin; r guest_blob \"rc=$?\"\n\
         sync; r sync_vdb \"rc=$?\"\n\
         timeout 60 umount /mnt; r umount_vdb \"rc=$?\"\n"
    ));
    let data = writes
        .iter()
        .enumerate()
        .map(|(i, (_, d))| (format!("w{i}"), d.clone()))
        .collect();
    Ok(ScenarioA {
        spec: VmSpec {
            name: "a".into(),
            cpus: 2,
            memory_mib: 512,
            drives: vec![
                Drive {
                    file: "overlay.qcow2".into(),
                    readonly: false,
                    snapshot: false,
                },
                Drive {
                    file: "data.qcow2".into(),
                    readonly: false,
                    snapshot: false,
                },
            ],
            test_sh: sh,
            data,
        },
        writes,
        base_raw,
        base_sha_before,
        host_text,
        token,
    })
}

/// Helpers for the guest scripts. Every step reports `R key value` on the console.
const GUEST_SH_PRELUDE: &str = r#"
say() { echo "<2>E2E: $*" > /dev/kmsg; }
r() { k=$1; shift; say "R $k $*"; }
sha() { sha256sum < "$1" | cut -d' ' -f1; }
# hash_dev DEV OFFSET LEN (4K aligned), read with O_DIRECT
hash_dev() {
    timeout 60 dd if=/dev/$1 bs=4096 skip=$(($2 / 4096)) count=$(($3 / 4096)) iflag=direct 2>/dev/null \
        | sha256sum | cut -d' ' -f1
}
# write_dev DEV OFFSET FILE (4K aligned), O_DIRECT + fsync
write_dev() {
    timeout 60 dd if=$3 of=/dev/$1 bs=4096 seek=$(($2 / 4096)) oflag=direct conv=fsync,notrunc 2>/tmp/dd.err
    rc=$?
    [ $rc -ne 0 ] && say "WARN dd of=/dev/$1 seek=$2: $(tr '\n' ' ' </tmp/dd.err)"
    return $rc
}
"#;

fn expect_kv(rep: &Report, key: &str, want: &str, errs: &mut Vec<String>) {
    match rep.get(key) {
        Ok(v) if v == want => {}
        Ok(v) => errs.push(format!("{key}: guest reported '{v}', expected '{want}'")),
        Err(e) => errs.push(e),
    }
}

fn guest_ran(out: &VmOutput) -> Result<Report, String> {
    let rep = Report::parse(&out.console);
    if rep.end_rc.is_none() {
        return Err(format!(
            "the guest did not finish its script (no 'E2E: END' on the console)\n{}",
            out.describe()
        ));
    }
    Ok(rep)
}

fn finish(what: &str, errs: Vec<String>, out: &VmOutput) -> Result<(), String> {
    if errs.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{what}:\n  - {}\n{}",
            errs.join("\n  - "),
            out.describe()
        ))
    }
}

/// The plainest boot: 2 vCPUs, 512M, no disks; the guest reports CPUs and memory.
fn scenario_boot() -> VmSpec {
    let mut sh = String::from(GUEST_SH_PRELUDE);
    sh.push_str(
        "r cpus_online \"$(cat /sys/devices/system/cpu/online)\"\n\
         r nproc \"$(grep -c '^processor' /proc/cpuinfo)\"\n\
         r memtotal_kb \"$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)\"\n",
    );
    VmSpec {
        name: "boot".into(),
        cpus: 2,
        memory_mib: 512,
        drives: vec![],
        test_sh: sh,
        data: vec![],
    }
}

fn check_boot(out: &VmOutput) -> Result<(), String> {
    let rep = guest_ran(out)?;
    let mut errs = vec![];
    expect_kv(&rep, "cpus_online", "0-1", &mut errs);
    expect_kv(&rep, "nproc", "2", &mut errs);
    match rep.get("memtotal_kb").map(|v| v.parse::<u64>()) {
        Ok(Ok(kb)) if kb > 400 * 1024 && kb <= 512 * 1024 => {}
        Ok(v) => errs.push(format!("MemTotal {v:?} kB is not plausible for 512M")),
        Err(e) => errs.push(e),
    }
    if out.rc != Some(0) {
        errs.push(format!(
            "exit code {:?}, expected 0 after the guest's reboot",
            out.rc
        ));
    }
    finish("boot (2 CPUs, 512M)", errs, out)
}

/// Userspace writes to the console (the tty layer: interrupt-driven UART transmit, unlike the
/// kernel's polled console writes that carry the reports) reach the host.
fn check_tty(out: &VmOutput) -> Result<(), String> {
    let rep = guest_ran(out)?;
    if rep.tty_ok {
        Ok(())
    } else {
        Err(format!(
            "userspace console output is missing: /init's `echo E2E-TTY-OK` (through the tty, \
             i.e. interrupt-driven UART transmit on IRQ 4) never reached the console, while the \
             kernel's polled console writes did\n{}",
            out.describe()
        ))
    }
}

fn check_overlay(a: &ScenarioA, out: &VmOutput, images: &Path, work: &Path) -> Result<(), String> {
    let rep = guest_ran(out)?;
    let mut errs = vec![];
    expect_kv(
        &rep,
        "vda_sectors",
        &(BASE_SIZE / 512).to_string(),
        &mut errs,
    );
    for (i, (_, off, len)) in BASE_PATTERNS.iter().enumerate() {
        let want = sha256(&a.base_raw[*off as usize..(off + len) as usize]);
        expect_kv(&rep, &format!("base.{i}"), &want, &mut errs);
    }
    for (i, (off, data)) in a.writes.iter().enumerate() {
        let sha = sha256(data);
        expect_kv(
            &rep,
            &format!("write.{i}"),
            &format!("off={off} len={} rc=0 sha={sha}", data.len()),
            &mut errs,
        );
        expect_kv(&rep, &format!("readback.{i}"), &sha, &mut errs);
    }
    for f in ["overlay.qcow2", "base.qcow2"] {
        if let Err(e) = qemu_img_check(&images.join(f)) {
            errs.push(e);
        }
    }
    let base_after = sha256_file(&images.join("base.qcow2"));
    if base_after != a.base_sha_before {
        errs.push("base.qcow2 (the backing file) was modified".into());
    }
    // Byte-compare the whole overlay (as the guest sees it) with base + the guest's writes.
    let mut expected = a.base_raw.clone();
    for (off, data) in &a.writes {
        expected[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    match to_raw(
        &images.join("overlay.qcow2"),
        &work.join("overlay-after.raw"),
    ) {
        Ok(got) => {
            if let Some(at) = first_difference(&got, &expected) {
                errs.push(format!(
                    "overlay content differs from base + guest writes at byte {at} (0x{at:x}); \
                     sizes {} vs {}",
                    got.len(),
                    expected.len()
                ));
            }
        }
        Err(e) => errs.push(e),
    }
    finish("qcow2 overlay (vda)", errs, out)
}

fn check_ext4(a: &ScenarioA, out: &VmOutput, images: &Path, work: &Path) -> Result<(), String> {
    let rep = guest_ran(out)?;
    let mut errs = vec![];
    expect_kv(&rep, "mount_vdb", "rc=0", &mut errs);
    expect_kv(&rep, "host_sha", &sha256(a.host_text.as_bytes()), &mut errs);
    for k in ["guest_write", "guest_blob", "sync_vdb", "umount_vdb"] {
        expect_kv(&rep, k, "rc=0", &mut errs);
    }
    let img = images.join("data.qcow2");
    if let Err(e) = qemu_img_check(&img) {
        errs.push(e);
    }
    let raw = work.join("data-after.raw");
    if let Err(e) = to_raw(&img, &raw) {
        errs.push(e);
        return finish("ext4 disk (vdb)", errs, out);
    }
    let fsck = run(
        Command::new(t("e2fsck")).arg("-fn").arg(&raw),
        Duration::from_secs(120),
    );
    if !fsck.ok() {
        errs.push(format!("e2fsck -fn is not clean:\n{}", fsck.report()));
    }
    let cat = run(
        Command::new(t("debugfs"))
            .args(["-R", "cat /guest/from-guest.txt"])
            .arg(&raw),
        Duration::from_secs(60),
    );
    let want = format!("written by the guest, token {}\n", a.token);
    if cat.stdout() != want {
        errs.push(format!(
            "debugfs cat /guest/from-guest.txt: got {:?}, want {want:?}",
            cat.stdout()
        ));
    }
    let blob = work.join("blob.bin");
    let _ = run(
        Command::new(t("debugfs"))
            .arg("-R")
            .arg(format!("dump /guest/blob.bin {}", blob.display()))
            .arg(&raw),
        Duration::from_secs(60),
    );
    if fs::read(&blob).ok().as_deref() != Some(&a.writes[0].1[..]) {
        errs.push(
            "/guest/blob.bin (dumped with debugfs) differs from what the guest copied".into(),
        );
    }
    finish("ext4 disk (vdb)", errs, out)
}

// ---------------------------------------------------------------------------------------------
// Scenario B: readonly=on (vda), snapshot=on (vdb)
// ---------------------------------------------------------------------------------------------

const RS_SIZE: u64 = 16 * MIB;

struct ScenarioB {
    spec: VmSpec,
    ro_sha: String,
    snap_sha: String,
    /// Guest-visible content of the readonly and snapshot images.
    ro_raw: Vec<u8>,
    snap_raw: Vec<u8>,
    /// What the guest writes to the snapshot disk: (offset, data).
    snap_write: (u64, Vec<u8>),
}

fn scenario_b(dir: &Path, work: &Path, rng: &mut Rng) -> Result<ScenarioB, String> {
    fs::create_dir_all(dir).unwrap();
    make_patterned_qcow2(
        &dir.join("ro.qcow2"),
        RS_SIZE,
        &[(0x77, 0, MIB), (0x78, 8 * MIB, MIB)],
    )?;
    make_patterned_qcow2(
        &dir.join("snap.qcow2"),
        RS_SIZE,
        &[(0x99, 0, MIB), (0x9a, 8 * MIB, MIB)],
    )?;
    let ro_raw = to_raw(&dir.join("ro.qcow2"), &work.join("ro.raw"))?;
    let snap_raw = to_raw(&dir.join("snap.qcow2"), &work.join("snap.raw"))?;
    let w = rng.bytes(64 * KIB as usize);
    let snap_off = 8 * MIB - 32 * KIB; // crosses into the 0x9a region
    let mut sh = String::from(GUEST_SH_PRELUDE);
    sh.push_str(&format!(
        "r ro_flag \"$(cat /sys/block/vda/ro)\"\n\
         r ro_read \"$(hash_dev vda 0 {mib})\"\n\
         write_dev vda 0 /data/w; r ro_write \"rc=$?\"\n\
         write_dev vda {off8} /data/w; r ro_write2 \"rc=$?\"\n\
         r ro_read_after \"$(hash_dev vda 0 {mib})\"\n\
         r snap_read \"$(hash_dev vdb 0 {mib})\"\n\
         write_dev vdb {snap_off} /data/w; r snap_write \"rc=$?\"\n\
         r snap_readback \"$(hash_dev vdb {snap_off} {wlen})\"\n\
         r snap_read2 \"$(hash_dev vdb 0 {mib})\"\n",
        mib = MIB,
        off8 = 8 * MIB,
        wlen = w.len(),
    ));
    Ok(ScenarioB {
        spec: VmSpec {
            name: "b".into(),
            cpus: 1,
            memory_mib: 256,
            drives: vec![
                Drive {
                    file: "ro.qcow2".into(),
                    readonly: true,
                    snapshot: false,
                },
                Drive {
                    file: "snap.qcow2".into(),
                    readonly: false,
                    snapshot: true,
                },
            ],
            test_sh: sh,
            data: vec![("w".into(), w.clone())],
        },
        ro_sha: sha256_file(&dir.join("ro.qcow2")),
        snap_sha: sha256_file(&dir.join("snap.qcow2")),
        ro_raw,
        snap_raw,
        snap_write: (snap_off, w),
    })
}

fn check_readonly(b: &ScenarioB, out: &VmOutput, images: &Path) -> Result<(), String> {
    let rep = guest_ran(out)?;
    let mut errs = vec![];
    expect_kv(&rep, "ro_flag", "1", &mut errs);
    let want = sha256(&b.ro_raw[..MIB as usize]);
    expect_kv(&rep, "ro_read", &want, &mut errs);
    expect_kv(&rep, "ro_read_after", &want, &mut errs);
    for k in ["ro_write", "ro_write2"] {
        match rep.get(k) {
            Ok("rc=0") => errs.push(format!("{k}: a write to the readonly=on disk succeeded")),
            Ok(_) => {}
            Err(e) => errs.push(e),
        }
    }
    let img = images.join("ro.qcow2");
    if let Err(e) = qemu_img_check(&img) {
        errs.push(e);
    }
    if sha256_file(&img) != b.ro_sha {
        errs.push("ro.qcow2 changed although it was attached readonly=on".into());
    }
    finish("readonly=on disk", errs, out)
}

fn check_snapshot(b: &ScenarioB, out: &VmOutput, images: &Path) -> Result<(), String> {
    let rep = guest_ran(out)?;
    let mut errs = vec![];
    let want = sha256(&b.snap_raw[..MIB as usize]);
    expect_kv(&rep, "snap_read", &want, &mut errs);
    expect_kv(&rep, "snap_read2", &want, &mut errs);
    expect_kv(&rep, "snap_write", "rc=0", &mut errs);
    expect_kv(&rep, "snap_readback", &sha256(&b.snap_write.1), &mut errs);
    let img = images.join("snap.qcow2");
    if let Err(e) = qemu_img_check(&img) {
        errs.push(e);
    }
    if sha256_file(&img) != b.snap_sha {
        errs.push("snap.qcow2 changed although it was attached snapshot=on".into());
    }
    finish("snapshot=on disk", errs, out)
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// Reference: the guest scenarios under QEMU itself. Validates the fixtures (module loading,
/// the guest scripts, the results path) and the checks, independent of vmm.
#[test]
fn reference_guest_under_qemu() {
    require!(fixtures());
    let work = WorkDir::new("qemuref");
    let mut rng = Rng::from_env();
    let dir_a = work.path().join("images-a");
    let dir_b = work.path().join("images-b");
    let a = scenario_a(&dir_a, work.path(), &mut rng, None).unwrap();
    let b = scenario_b(&dir_b, work.path(), &mut rng).unwrap();
    let boot = scenario_boot();
    let out_boot = run_under_qemu(&boot, &dir_a, work.path()).unwrap();
    let out_a = run_under_qemu(&a.spec, &dir_a, work.path()).unwrap();
    let out_b = run_under_qemu(&b.spec, &dir_b, work.path()).unwrap();
    // QEMU exits 0 on the guest's reset (-no-reboot).
    let mut errs = vec![];
    for r in [
        check_overlay(&a, &out_a, &dir_a, work.path()),
        check_ext4(&a, &out_a, &dir_a, work.path()),
        check_readonly(&b, &out_b, &dir_b),
        check_snapshot(&b, &out_b, &dir_b),
    ] {
        if let Err(e) = r {
            errs.push(e);
        }
    }
    if let Err(e) = check_boot(&out_boot).and_then(|_| check_tty(&out_boot)) {
        errs.push(e);
    }
    assert!(
        errs.is_empty(),
        "reference run under QEMU failed:\n{}",
        errs.join("\n\n")
    );
}

/// The test host boots under TCG and, after loading irqbypass/kvm/kvm-amd, has /dev/kvm.
#[test]
fn testhost_provides_kvm() {
    require!(fixtures());
    let work = WorkDir::new("testhost");
    let images = work.path().join("images");
    fs::create_dir_all(&images).unwrap();
    let out = run_in_testhost(&[], &images, None, work.path()).unwrap();
    eprintln!("vm_e2e: empty test host boot took {:.1}s", out.seconds);
    assert!(
        out.kvm,
        "no /dev/kvm in the test host after loading the modules:\n{}",
        out.log
    );
}

/// Results of the one shared test-host boot that runs scenarios A and B under vmm.
struct Suite {
    boot: VmSpec,
    a: ScenarioA,
    b: ScenarioB,
    out: Runs,
    work: WorkDir,
}

fn vmm_suite() -> Result<&'static Suite, String> {
    static S: OnceLock<Result<Suite, String>> = OnceLock::new();
    S.get_or_init(|| {
        let bins = static_bins()?;
        let work = WorkDir::new("vmm");
        let mut rng = Rng::from_env();
        let dir = work.path().join("images");
        let a = scenario_a(&dir, work.path(), &mut rng, Some(bins))?;
        let b = scenario_b(&dir, work.path(), &mut rng)?;
        let boot = scenario_boot();
        let specs = [&boot, &a.spec, &b.spec];
        let (out, place) = match runner(&bins.vmm)? {
            Runner::Direct => {
                let kernel = &fixtures()?.kernel;
                let timeout = Duration::from_secs(VM_TIMEOUT_S);
                let out = run_direct(&specs, kernel, &dir, &bins.vmm, work.path(), timeout)?;
                (out, "on this host")
            }
            Runner::TestHost => {
                let out = run_in_testhost(&specs, &dir, Some(&bins.vmm), work.path())?;
                if !out.kvm {
                    return Err(format!("no /dev/kvm in the test host:\n{}", out.log));
                }
                (out, "in the test host")
            }
        };
        for (name, vm) in &out.vms {
            eprintln!(
                "vm_e2e: vmm run '{name}': exit {:?}, {:.1}s {place}",
                vm.rc, vm.seconds
            );
        }
        Ok(Suite {
            boot,
            a,
            b,
            out,
            work,
        })
    })
    .as_ref()
    .map_err(|e| e.clone())
}

/// Prerequisites decide skip/fail; after that, any error is a failure.
macro_rules! suite {
    () => {{
        require!(fixtures());
        match vmm_suite() {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }};
}

fn vm<'a>(s: &'a Suite, name: &str) -> &'a VmOutput {
    &s.out.vms[name]
}

#[test]
fn vmm_boots_with_2_cpus_and_512m() {
    let s = suite!();
    check_boot(vm(s, &s.boot.name)).unwrap_or_else(|e| panic!("{e}\n--- runs:\n{}", s.out.log));
}

#[test]
fn vmm_guest_userspace_console_output() {
    let s = suite!();
    check_tty(vm(s, &s.boot.name)).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn vmm_qcow2_overlay_disk() {
    let s = suite!();
    check_overlay(&s.a, vm(s, "a"), &s.out.image_dir, s.work.path())
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn vmm_ext4_disk() {
    let s = suite!();
    check_ext4(&s.a, vm(s, "a"), &s.out.image_dir, s.work.path()).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn vmm_readonly_disk() {
    let s = suite!();
    check_readonly(&s.b, vm(s, "b"), &s.out.image_dir).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn vmm_snapshot_disk() {
    let s = suite!();
    check_snapshot(&s.b, vm(s, "b"), &s.out.image_dir).unwrap_or_else(|e| panic!("{e}"));
}

/// Bad inputs: non-zero exit, exactly one clear error line on stderr, no panic. Runs vmm on
/// this host directly (every case must fail before a vCPU runs).
#[test]
fn vmm_rejects_bad_inputs() {
    let f = require!(fixtures());
    let bins = static_bins().unwrap_or_else(|e| panic!("{e}"));
    let vmm = &bins.vmm;
    let work = WorkDir::new("badinputs");
    let garbage = work.path().join("garbage-kernel");
    fs::write(&garbage, Rng(0x1234_5678).bytes(1 << 20)).unwrap();
    let kernel = f.kernel.to_str().unwrap().to_string();
    let missing = work.path().join("no-such-file");
    let missing = missing.to_str().unwrap();
    let drive = format!(
        "file={}/no-such-image.qcow2,format=qcow2",
        work.path().display()
    );
    // (what, arguments after `run`, the error line must mention one of these, any case)
    let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        (
            "missing kernel",
            vec!["--kernel".into(), missing.into()],
            vec!["no-such-file"],
        ),
        (
            "garbage kernel",
            vec!["--kernel".into(), garbage.to_str().unwrap().into()],
            vec!["garbage-kernel", "kernel"],
        ),
        (
            "memory too large",
            vec![
                "--kernel".into(),
                kernel.clone(),
                "--memory".into(),
                "64T".into(),
            ],
            vec!["memory", "64T"],
        ),
        (
            "no such image",
            vec!["--kernel".into(), kernel.clone(), "--drive".into(), drive],
            vec!["no-such-image.qcow2"],
        ),
    ];
    let mut errs = vec![];
    for (what, args, must_mention) in cases {
        let o = run(
            Command::new(vmm)
                .arg("run")
                .args(&args)
                .env("RUST_BACKTRACE", "0"),
            Duration::from_secs(30),
        );
        let err = o.stderr();
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        let problem = if o.timed_out {
            Some("did not exit within 30s".to_string())
        } else if o.code.is_none() {
            Some("killed by a signal".into())
        } else if o.code == Some(0) {
            Some("exit code 0".into())
        } else if o.code == Some(101) || err.contains("panicked") {
            Some("panicked".into())
        } else if lines.len() != 1 {
            Some(format!(
                "expected one error line on stderr, got {}",
                lines.len()
            ))
        } else if !must_mention
            .iter()
            .any(|m| lines[0].to_lowercase().contains(&m.to_lowercase()))
        {
            Some(format!(
                "the error line does not mention any of {must_mention:?}"
            ))
        } else {
            None
        };
        match problem {
            Some(p) => errs.push(format!("{what}: {p}\n{}", o.report())),
            None => eprintln!("vm_e2e: {what}: exit {:?}: {}", o.code, lines[0]),
        }
    }
    assert!(errs.is_empty(), "bad inputs:\n{}", errs.join("\n\n"));
}

/// The direct path (taken where /dev/kvm runs at hardware speed), exercised here with fake
/// kernels so that it runs on any /dev/kvm: each run's console, stderr and exit code come
/// back under its name, the images it ran on are copies, and a guest that never stops is
/// killed at the timeout.
#[test]
fn direct_runner_reports_each_run() {
    require!(fixtures());
    if !have_kvm() {
        return;
    }
    let bins = static_bins().unwrap_or_else(|e| panic!("{e}"));
    let work = WorkDir::new("direct");
    let images = work.path().join("images");
    fs::create_dir_all(&images).unwrap();
    let disk = images.join("disk.qcow2");
    make_patterned_qcow2(&disk, 4 * MIB, &[(0x5a, 0, MIB)]).unwrap();
    let before = sha256_file(&disk);
    let spec = |name: &str| VmSpec {
        name: name.into(),
        cpus: 1,
        memory_mib: 128,
        drives: vec![Drive {
            file: "disk.qcow2".into(),
            readonly: false,
            snapshot: false,
        }],
        test_sh: String::new(),
        data: vec![],
    };
    let kernel = |name: &str, tail: &[u8]| {
        let p = work.path().join(name);
        let code = [fake_kernel::PRINT_CMDLINE_BYTE, tail].concat();
        fs::write(&p, fake_kernel::bzimage(&code)).unwrap();
        p
    };
    let (reset, spin) = (spec("reset"), spec("spin"));
    let timeout = Duration::from_secs(3);
    let run_one = |spec: &VmSpec, k: &Path, dir: &str| {
        let w = work.path().join(dir);
        fs::create_dir_all(&w).unwrap();
        run_direct(&[spec], k, &images, &bins.vmm, &w, timeout).unwrap()
    };
    let ok = run_one(&reset, &kernel("reset.bz", fake_kernel::RESET), "w1");
    let hung = run_one(&spin, &kernel("spin.bz", fake_kernel::SPIN), "w2");

    // GUEST_CMDLINE starts with "console=": the fake kernel prints its first byte.
    let vm = &ok.vms["reset"];
    assert_eq!(
        (vm.rc, vm.console.as_str()),
        (Some(0), "c\n"),
        "{}",
        vm.describe()
    );
    assert!(vm.stderr.is_empty(), "{}", vm.describe());
    assert!(ok.kvm && ok.image_dir != images, "{}", ok.log);
    assert!(ok.image_dir.join("disk.qcow2").is_file(), "{}", ok.log);
    qemu_img_check(&ok.image_dir.join("disk.qcow2")).unwrap();

    let vm = &hung.vms["spin"];
    assert_eq!(
        (vm.rc, vm.console.as_str()),
        (None, "c\n"),
        "{}",
        vm.describe()
    );
    assert!(
        vm.seconds >= timeout.as_secs_f64() && vm.seconds < 30.0,
        "{}",
        vm.describe()
    );
    assert!(hung.log.contains("killed at the timeout"), "{}", hung.log);
    assert_eq!(sha256_file(&disk), before, "the input image changed");
}

/// The /dev/kvm probe's guest loop stops after its count (also when the count is 0) and
/// powers off, and the probe gives a verdict on this host: any /dev/kvm that passes
/// `have_kvm` runs the probe guests, fast or slow.
#[test]
fn kvm_probe_guest_stops_and_probe_decides() {
    if !have_kvm() {
        return;
    }
    let bins = static_bins().unwrap_or_else(|e| panic!("{e}"));
    let work = WorkDir::new("probe-test");
    for n in [0u32, 1, 1000] {
        let k = work.path().join(format!("loop-{n}"));
        let code = [&fake_kernel::count_down(n)[..], fake_kernel::POWEROFF].concat();
        fs::write(&k, fake_kernel::bzimage(&code)).unwrap();
        let o = run(
            Command::new(&bins.vmm).arg("run").arg("--kernel").arg(&k),
            Duration::from_secs(30),
        );
        assert!(
            o.ok() && o.stdout.is_empty(),
            "{n} iterations:\n{}",
            o.report()
        );
    }
    let p = probe_kvm(&bins.vmm, work.path());
    eprintln!("vm_e2e: probe: {:?}: {}", p.speed, p.detail);
    assert_ne!(p.speed, KvmSpeed::Unusable, "{}", p.detail);
}

/// The harness itself: a command that outlives its timeout is killed with its children, and
/// `run` returns promptly (a hung guest must fail a test, not hang CI).
#[test]
fn harness_kills_commands_past_their_timeout() {
    let t0 = Instant::now();
    let o = run(
        Command::new("sh").args(["-c", "sleep 100 & sleep 100; echo never"]),
        Duration::from_millis(500),
    );
    assert!(o.timed_out && o.code.is_none(), "{}", o.report());
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "run() did not return promptly"
    );
    assert!(!o.stdout().contains("never"));
}
