//! `vmm` directly on this host, for a /dev/kvm at hardware speed, and the choice between that
//! and the test host.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use integration_tests::kvm::{probe_kvm, KvmSpeed};
use integration_tests::run;

use crate::fixtures::guest_initramfs;
use crate::spec::{vmm_args, Runs, VmOutput, VmSpec, Wrap};
use crate::testhost::{was_killed, write_kill_script, write_net_scripts};
use crate::workdir::WorkDir;

/// Run each spec under `vmm` on this host, one after the other, with `kernel`, on copies of
/// the images in `image_dir` (made in `work/direct-images`). For hosts whose /dev/kvm runs
/// guests at hardware speed; a run past `timeout` is killed (its `rc` is then None).
pub fn run_direct(
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
        // A disk boot's initramfs is inside its disk.
        let initrd = if spec.disk_boot {
            String::new()
        } else {
            utf8(&guest_initramfs(spec, work)?)?
        };
        let mut args = vmm_args(spec, &utf8(kernel)?, &initrd, &utf8(&images)?);
        let netdir = work.join(format!("net-{}", spec.name));
        let killdir = work.join(format!("kill-{}", spec.name));
        let mut cmd = match spec.wrap()? {
            Wrap::None => Command::new(vmm),
            Wrap::Kill(k) => {
                write_kill_script(k, &killdir)?;
                let mut c = Command::new("sh");
                c.arg(killdir.join("wrap.sh")).arg(vmm);
                c
            }
            Wrap::Net(n) => {
                // In a network namespace of its own: the bridges, taps and addresses exist
                // only there.
                write_net_scripts(n, &netdir)?;
                let dir = utf8(&netdir)?;
                for a in &mut args {
                    *a = a.replace("@NETDIR@", &dir);
                }
                let mut c = Command::new("unshare");
                c.args(["-n", "-m", "sh", "-c"])
                    .arg(r#"mount -t sysfs none /sys && exec sh "$NETDIR/wrap.sh" "$@""#)
                    .arg("sh")
                    .arg(vmm)
                    .env("NETDIR", &dir);
                c
            }
        };
        let timeout = spec
            .net
            .as_ref()
            .map_or(timeout, |n| Duration::from_secs(n.timeout_s));
        cmd.args(&args).envs(spec.env.iter().copied());
        let o = run(cmd.current_dir(&images), timeout);
        let killed = spec.kill_after.is_some() && was_killed(&killdir);
        log.push_str(&format!(
            "vmm run {}: exit {:?}{} after {:.1}s\n",
            spec.name,
            o.code,
            if o.timed_out {
                " (killed at the timeout)"
            } else if killed {
                " (SIGKILLed at its kill point)"
            } else {
                ""
            },
            o.elapsed.as_secs_f64()
        ));
        let _ = fs::write(work.join(format!("console-{}.txt", spec.name)), &o.stdout);
        vms.insert(
            spec.name.clone(),
            VmOutput {
                console: o.stdout.clone(),
                stderr: o.stderr.clone(),
                host: fs::read_to_string(netdir.join("host")).unwrap_or_default(),
                rc: if o.timed_out || killed { None } else { o.code },
                killed,
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
pub enum Runner {
    /// On this host: its /dev/kvm runs guests at hardware speed.
    Direct,
    /// Inside the nested-KVM test host ([`crate::testhost::run_in_testhost`]).
    TestHost,
}

/// Decided once per test process. `E2E_RUNNER=direct|testhost` forces one; otherwise the
/// host's /dev/kvm is timed with a small guest loop under `vmm` ([`probe_kvm`]): at hardware
/// speed the runs happen directly, else (emulated, or no usable /dev/kvm) in the test host.
pub fn runner(vmm: &Path) -> Result<Runner, String> {
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
