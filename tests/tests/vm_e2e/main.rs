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
//! A spec with a kill point ([`spec::KillAfter`]) runs under a wrapper (in the test host or
//! on this host) that copies vmm's console through and SIGKILLs vmm once the console has
//! shown the given lines; its [`VmOutput`] says `killed`.
//!
//! Modules: `spec` (a guest boot and its outputs), `report` (the guest scripts' report),
//! `direct`, `testhost` and `qemu` (the three ways to run a guest), `fixtures`, `images`,
//! `tools`, `workdir`, and one module per scenario with its checks.
//!
//! Tests:
//! - `reference_guest_under_qemu`: the same guest scenarios booted directly under QEMU (TCG,
//!   virtio-blk-pci). Needs no `vmm`; it proves the fixtures, the guest scripts and the checks.
//! - `testhost_provides_kvm`: the test host boots and has `/dev/kvm` after loading the modules.
//! - `vmm_*`: one shared batch runs twelve `vmm run`s ("boot": 2 CPUs, 512M, no disks;
//!   "boot64": the same through the 64-bit boot protocol instead of PVH; "a":
//!   qcow2 overlay on a patterned base + ext4 disk; "b": readonly=on and snapshot=on disks;
//!   "disk-gpt-grub", "disk-gpt-bls", "disk-mbr-extlinux": disks booted without --kernel
//!   through QEMU's command line, and "disk-gpt-grub-kernel", the first of them booted with
//!   --kernel for the time comparison; "net": two virtio-net NICs on bridged taps;
//!   "disk-mbr-syslinux-bios", an MBR disk with syslinux on FAT booted through SeaBIOS
//!   with `-bios`; "kill-fsync", "kill-fsync-lazy": vmm SIGKILLed by the runner while the
//!   guest writes with fsync, the image then checked and every synced write read back); each
//!   test checks one aspect of the shared results.
//! - `reference_bios_disk_under_qemu`: the SeaBIOS disk booted by QEMU with the same bios.bin.
//! - `vmm_rejects_bad_inputs`: runs `vmm` on this host directly.
//! - `direct_runner_reports_each_run`, `kvm_probe_guest_stops_and_probe_decides`: the direct
//!   path and the probe, with fake kernels (so on any /dev/kvm).
//!
//! Prerequisites (qemu-system-x86_64, cpio, qemu-img/qemu-io, e2fsprogs, network for
//! `apt-get download`): missing ones make a test FAIL when `CI` is set, and print
//! "SKIPPED: reason" otherwise. `fixtures/install-host-deps.sh` installs them.
//!
//! Environment: `TEST_SEED=<n>` reproduces the random data/offsets, `E2E_KEEP=1` keeps the work
//! directories (their paths are printed; under target/vm-e2e/), `E2E_VMM=<path>` uses that
//! (static) vmm binary instead of building one, `E2E_RUNNER=direct|testhost` skips the probe.
//!
//! Assumed `vmm` interface (one place: [`spec::vmm_args`]; disk boots use
//! `vmm run -m M -smp N -name NAME -hda DISK -nographic` instead):
//! `vmm run --kernel K --initrd I --append CMDLINE --cpus N --memory 512M
//!  --drive file=P,format=qcow2[,readonly=on][,snapshot=on] ...`; drives appear as vda, vdb, ...
//! in order; the guest console (8250 ttyS0) goes to vmm's stdout; the guest ends with
//! `reboot -f` under `reboot=k` (i8042 reset), after which vmm exits 0.

mod direct;
mod fixtures;
mod images;
mod qemu;
mod report;
mod scenario_a;
mod scenario_b;
mod scenario_boot;
mod scenario_disk;
mod scenario_kill;
mod scenario_net;
mod spec;
mod testhost;
mod tools;
mod workdir;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use integration_tests::kvm::{have_kvm, probe_kvm, KvmSpeed};
use integration_tests::{fake_kernel, in_ci, qemu_check, run, Rng};

use crate::direct::{run_direct, runner, Runner};
use crate::fixtures::{fixtures, static_bins};
use crate::images::{make_patterned_qcow2, MIB};
use crate::qemu::{run_disk_under_qemu, run_under_qemu};
use crate::scenario_a::{check_ext4, check_overlay, scenario_a, ScenarioA};
use crate::scenario_b::{check_readonly, check_snapshot, scenario_b, ScenarioB};
use crate::scenario_boot::{
    check_boot, check_tty, loader_type, scenario_boot, scenario_boot_64bit,
};
use crate::scenario_disk::{check_disk, scenario_disk, Layout, ScenarioDisk};
use crate::scenario_kill::{check_kill, scenarios_kill, ScenarioKill};
use crate::scenario_net::{check_net, scenario_net};
use crate::spec::{Drive, KillAfter, Runs, VmOutput, VmSpec, VM_TIMEOUT_S};
use crate::testhost::run_in_testhost;
use crate::tools::{seeded_rng, sha256_file};
use crate::workdir::WorkDir;

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

/// Reference: the guest scenarios under QEMU itself. Validates the fixtures (module loading,
/// the guest scripts, the results path) and the checks, independent of vmm.
#[test]
fn reference_guest_under_qemu() {
    require!(fixtures());
    let work = WorkDir::new("qemuref");
    let mut rng = seeded_rng();
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
    boot64: VmSpec,
    a: ScenarioA,
    b: ScenarioB,
    /// Disk boots without --kernel, one per boot configuration kind.
    disks: Vec<ScenarioDisk>,
    net: VmSpec,
    /// vmm killed with SIGKILL while its guest writes with fsync.
    kills: Vec<ScenarioKill>,
    out: Runs,
    work: WorkDir,
}

fn vmm_suite() -> Result<&'static Suite, String> {
    static S: OnceLock<Result<Suite, String>> = OnceLock::new();
    S.get_or_init(|| {
        let bins = static_bins()?;
        let work = WorkDir::new("vmm");
        let mut rng = seeded_rng();
        let dir = work.path().join("images");
        let a = scenario_a(&dir, work.path(), &mut rng, Some(bins))?;
        let b = scenario_b(&dir, work.path(), &mut rng)?;
        let boot = scenario_boot();
        let boot64 = scenario_boot_64bit();
        let disks = [
            Layout::GptGrub,
            Layout::GptBls,
            Layout::MbrExtlinux,
            Layout::MbrSyslinuxBios,
        ]
        .into_iter()
        .map(|l| scenario_disk(l, &dir, work.path(), &mut rng, bins))
        .collect::<Result<Vec<_>, _>>()?;
        let net = scenario_net();
        let kills = scenarios_kill(&dir, &mut rng)?;
        let mut specs = vec![&boot, &boot64, &a.spec, &b.spec, &net];
        specs.extend(disks.iter().map(|d| &d.spec));
        specs.extend(disks.iter().filter_map(|d| d.kernel_twin.as_ref()));
        specs.extend(kills.iter().map(|k| &k.spec));
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
            boot64,
            a,
            b,
            disks,
            net,
            kills,
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

/// The same boot entered through the 64-bit boot protocol (zero page: E820 map, command
/// line, initrd) instead of PVH; the kernel's recorded loader type tells the two apart.
#[test]
fn vmm_boots_through_the_64bit_boot_protocol() {
    let s = suite!();
    let out = vm(s, &s.boot64.name);
    check_boot(out)
        .and_then(|_| check_tty(out))
        .unwrap_or_else(|e| panic!("{e}"));
    let via_zero_page = loader_type(out).unwrap_or_else(|e| panic!("{e}"));
    let via_pvh = loader_type(vm(s, &s.boot.name)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(via_zero_page, "ff", "{}", out.describe());
    assert_ne!(via_pvh, "ff", "the default boot did not go through PVH");
}

#[test]
fn vmm_guest_userspace_console_output() {
    let s = suite!();
    check_tty(vm(s, &s.boot.name)).unwrap_or_else(|e| panic!("{e}"));
}

/// Two virtio-net NICs on taps, bridged where vmm runs: pings both ways, link down/up,
/// 64 MiB over TCP each way with digests checked (see `scenario_net`).
#[test]
fn vmm_networking_two_nics_on_taps() {
    let s = suite!();
    let out = vm(s, &s.net.name);
    check_net(out).unwrap_or_else(|e| panic!("{e}"));
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

/// Disk boot without --kernel, QEMU's command line (`-m 256 -smp 2 -name N -hda
/// DISK.qcow2 -nographic`): the kernel, initramfs and command line of the disk's grub.cfg /
/// BLS entry / extlinux.conf boot; the guest's write lands in the overlay.
fn disk_boot(layout: usize) {
    let s = suite!();
    let d = &s.disks[layout];
    check_disk(d, vm(s, &d.spec.name), &s.out.image_dir, s.work.path())
        .unwrap_or_else(|e| panic!("{e}"));
    // The same guest with --kernel/--initrd from files: it must run too, and the two
    // times (whole runs: boot, script, poweroff) are printed side by side.
    if let Some(twin) = &d.kernel_twin {
        let k = vm(s, &twin.name);
        assert_eq!(k.rc, Some(0), "{}", k.describe());
        let t_disk = vm(s, &d.spec.name).seconds;
        eprintln!(
            "vm_e2e: {}: {t_disk:.1}s from the disk's entry vs {:.1}s with --kernel ({:.2}x)",
            d.spec.name,
            k.seconds,
            t_disk / k.seconds
        );
    }
}

#[test]
fn vmm_boots_a_gpt_disk_through_its_grub_cfg() {
    disk_boot(0);
}

#[test]
fn vmm_boots_a_gpt_disk_through_its_bls_entry() {
    disk_boot(1);
}

#[test]
fn vmm_boots_an_mbr_disk_through_its_extlinux_conf() {
    disk_boot(2);
}

/// `-bios bios.bin`: SeaBIOS boots the disk's MBR, syslinux on its FAT partition loads the
/// kernel through SeaBIOS's virtio-blk driver (int 13h, served by the engine); firmware and
/// bootloader messages reach the console.
#[test]
fn vmm_boots_a_bios_disk_through_seabios() {
    disk_boot(3);
}

/// SIGKILL of vmm while its guest writes blocks with O_DIRECT and fsync: the image has no
/// corruption, and every block whose fsync returned (SYNCED on the console) reads back (see
/// `scenario_kill`).
fn killed_mid_write(run: usize) {
    let s = suite!();
    let k = &s.kills[run];
    let img = &static_bins().unwrap_or_else(|e| panic!("{e}")).img;
    let summary = check_kill(k, vm(s, &k.spec.name), &s.out.image_dir, s.work.path(), img)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("vm_e2e: {summary}");
}

/// 64 KiB clusters over a backing file, killed early.
#[test]
fn vmm_sigkill_keeps_every_fsynced_write() {
    killed_mid_write(0);
}

/// 4 KiB clusters, 64-bit refcounts, lazy_refcounts=on, killed later.
#[test]
fn vmm_sigkill_keeps_every_fsynced_write_lazy_refcounts() {
    killed_mid_write(1);
}

/// The reference for the BIOS disk: QEMU (TCG) boots the same kind of disk with the same
/// SeaBIOS, and the same checks pass.
#[test]
fn reference_bios_disk_under_qemu() {
    require!(fixtures());
    let bins = static_bins().unwrap_or_else(|e| panic!("{e}"));
    let work = WorkDir::new("qemubios");
    let dir = work.path().join("images");
    let d = scenario_disk(
        Layout::MbrSyslinuxBios,
        &dir,
        work.path(),
        &mut seeded_rng(),
        bins,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = run_disk_under_qemu(&d.spec, &dir, work.path()).unwrap_or_else(|e| panic!("{e}"));
    check_disk(&d, &out, &dir, work.path()).unwrap_or_else(|e| panic!("{e}"));
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
    fs::write(&garbage, Rng::new(0x1234_5678).bytes(1 << 20)).unwrap();
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
        let err = o.stderr.clone();
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
/// back under its name, the images it ran on are copies, a guest that never stops is
/// killed at the timeout, and one with a kill point is SIGKILLed there.
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
        env: vec![],
        disk_boot: false,
        net: None,
        firmware: false,
        kill_after: None,
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
    let spin_kernel = kernel("spin.bz", fake_kernel::SPIN);
    let hung = run_one(&spin, &spin_kernel, "w2");
    // The same spinning guest, killed by the kill wrapper once its console has shown "c".
    let kill = VmSpec {
        kill_after: Some(KillAfter {
            pattern: "c".into(),
            count: 1,
            delay_ms: 100,
        }),
        ..spec("kill")
    };
    let killed = run_one(&kill, &spin_kernel, "w3");

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
    qemu_check(&ok.image_dir.join("disk.qcow2")).unwrap();

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

    let vm = &killed.vms["kill"];
    assert_eq!(
        (vm.rc, vm.killed, vm.console.as_str()),
        (None, true, "c\n"),
        "{}",
        vm.describe()
    );
    assert!(vm.seconds < timeout.as_secs_f64(), "{}", vm.describe());
    assert!(
        killed.log.contains("SIGKILLed at its kill point"),
        "{}",
        killed.log
    );
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
            o.success() && o.stdout.is_empty(),
            "{n} iterations:\n{}",
            o.report()
        );
    }
    let p = probe_kvm(&bins.vmm, work.path());
    eprintln!("vm_e2e: probe: {:?}: {}", p.speed, p.detail);
    assert_ne!(p.speed, KvmSpeed::Unusable, "{}", p.detail);
}
