//! Fixtures: the guest kernel and busybox, the static `vmm` and `img`, initramfs images.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use integration_tests::{run, workspace_root};

use crate::spec::VmSpec;
use crate::tools::{fixtures_dir, tool};

pub struct Fixtures {
    /// The Debian cloud kernel (guest and test host).
    pub kernel: PathBuf,
    /// syslinux's installer (mtools) and MBR boot code, for the BIOS-booted disk.
    pub syslinux: PathBuf,
    pub syslinux_mbr: PathBuf,
}

/// Check the host tools and fetch the kernel and busybox (once per test process).
pub fn fixtures() -> Result<&'static Fixtures, String> {
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
            ("sgdisk", "gdisk"),
            ("sfdisk", "fdisk"),
            ("mkfs.vfat", "dosfstools"),
            ("mcopy", "mtools"),
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
        if !o.success() {
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
        let syslinux = cache.join("syslinux");
        let syslinux_mbr = cache.join("syslinux-mbr.bin");
        if !syslinux.is_file() || !syslinux_mbr.is_file() {
            return Err("syslinux missing after fetch-guest.sh".into());
        }
        Ok(Fixtures {
            kernel,
            syslinux,
            syslinux_mbr,
        })
    })
    .as_ref()
    .map_err(|e| e.clone())
}

/// The binaries under test.
pub struct Bins {
    /// Statically linked `vmm` (it runs inside the test host).
    pub vmm: PathBuf,
    /// `img`, for `img create` of the overlay.
    pub img: PathBuf,
}

/// Build the statically linked `vmm` (and `img`) once per test process, into target/static
/// (`RUSTFLAGS=-C target-feature=+crt-static`, explicit `--target` so build scripts and proc
/// macros stay dynamic) so the normal build cache is not invalidated. A build failure is a test
/// failure, not a skip. `E2E_VMM=/path/to/static/vmm` uses that binary instead of building.
pub fn static_bins() -> Result<&'static Bins, String> {
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
                if !o.success() {
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
        if !o.success() {
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

pub fn build_initramfs(mode: &str, out: &Path, extra: &Path) -> Result<(), String> {
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

/// The guest initramfs for `spec`, with /test.sh, /data/* and /etc/e2e-disks.
pub fn guest_initramfs(spec: &VmSpec, work: &Path) -> Result<PathBuf, String> {
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
