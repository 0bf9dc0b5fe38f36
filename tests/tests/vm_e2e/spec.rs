//! One guest boot (`VmSpec`), what it produced (`VmOutput`, `Runs`), and the `vmm run`
//! command line for it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::tools::{shell_quote, tail};

/// Guest kernel command line (the same under vmm and QEMU).
/// `printk.devkmsg=on`: the guest reports through /dev/kmsg without rate limiting.
pub const GUEST_CMDLINE: &str = "console=ttyS0 quiet panic=-1 reboot=k printk.devkmsg=on";

/// Time one `vmm run` (one guest boot + its script) may take, in the test host or directly.
pub const VM_TIMEOUT_S: u64 = 120;

/// A disk of a guest boot (the guest sees vda, vdb, ... in order).
#[derive(Clone)]
pub struct Drive {
    /// File name inside the scenario's image directory.
    pub file: String,
    pub readonly: bool,
    pub snapshot: bool,
}

/// One guest boot: machine shape, disks, the script the guest runs, and data files for it.
pub struct VmSpec {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub drives: Vec<Drive>,
    /// Embedded as /test.sh in the guest initramfs.
    pub test_sh: String,
    /// Embedded as /data/<name> in the guest initramfs.
    pub data: Vec<(String, Vec<u8>)>,
    /// Environment for `vmm` (e.g. `VMM_BOOT_NO_PVH=1`, to boot through the 64-bit boot
    /// protocol's zero page instead of PVH).
    pub env: Vec<(&'static str, &'static str)>,
    /// Boot the first disk's own boot entry (no --kernel/--initrd), with QEMU's command line.
    pub disk_boot: bool,
    /// NICs, and the host side of their network.
    pub net: Option<NetRun>,
    /// With `disk_boot`: boot it through firmware, `-bios IMAGE_DIR/bios.bin` (SeaBIOS,
    /// which the scenario copies into its image directory).
    pub firmware: bool,
    /// Kill `vmm` with SIGKILL mid-run (not with `net`).
    pub kill_after: Option<KillAfter>,
}

/// When the runner kills `vmm` with SIGKILL: `delay_ms` after the guest console has shown
/// `count` lines containing `pattern` (the guest goes on meanwhile; nothing waits for it).
pub struct KillAfter {
    pub pattern: String,
    pub count: u32,
    pub delay_ms: u32,
}

/// The wrapper a runner puts around a spec's `vmm` command.
pub enum Wrap<'a> {
    None,
    /// [`NET_WRAPPER`], with the run's scripts in `$NETDIR`.
    Net(&'a NetRun),
    /// [`kill_wrapper`], in a directory of its own where it leaves [`KILLED_FILE`].
    Kill(&'a KillAfter),
}

/// A run with NICs: vmm's extra arguments and the scripts that run where vmm runs, in a
/// network of their own (`$NETDIR`, written `@NETDIR@` in `args`, is a scratch directory).
pub struct NetRun {
    pub args: Vec<String>,
    /// Runs (sh) to completion before vmm starts.
    pub host_setup: String,
    /// Runs (sh) alongside vmm; its output is [`VmOutput::host`]. After both, the runner
    /// appends `R scripts` ($NETDIR/scripts.log, lines joined by "; ") and `R netdevs_after`
    /// (the network interfaces left).
    pub host_sh: String,
    /// Limit for the whole run instead of [`VM_TIMEOUT_S`].
    pub timeout_s: u64,
}

/// The shell commands a runner wraps a [`NetRun`]'s vmm command (`"$@"`) in: setup, the
/// host side in the background, vmm, then the report of scripts and interfaces left.
/// `$NETDIR` must be set; the output goes to `$NETDIR/host`, vmm's exit code is kept.
pub const NET_WRAPPER: &str = r#"
sh $NETDIR/host-setup.sh > $NETDIR/host 2>&1 || echo "R setup_failed $?" >> $NETDIR/host
sh $NETDIR/host.sh >> $NETDIR/host 2>&1 &
hpid=$!
"$@"
rc=$?
# The host side ends by itself (its steps have timeouts); give it a bound anyway.
i=0; while kill -0 $hpid 2>/dev/null && [ $i -lt 600 ]; do sleep 0.5; i=$((i + 1)); done
kill $hpid 2>/dev/null
echo "R scripts $(awk 'BEGIN { ORS = "" } { if (NR > 1) print "; "; print }' $NETDIR/scripts.log 2>/dev/null)" >> $NETDIR/host
echo "R netdevs_after $(ls /sys/class/net | sort | tr '\n' ' ')" >> $NETDIR/host
exit $rc
"#;

/// The file a [`kill_wrapper`] leaves in its directory once it has killed `vmm`: vmm's wait
/// status (137 when SIGKILL ended it).
pub const KILLED_FILE: &str = "killed";

/// The shell script (run as `sh DIR/wrap.sh VMM ARGS...`) that runs vmm with its console
/// copied through to stdout, kills it with SIGKILL `k.delay_ms` after `k.count` console
/// lines contained `k.pattern` (the console still copied meanwhile), and exits with vmm's
/// status, having written it to `DIR/`[`KILLED_FILE`] if it killed vmm.
pub fn kill_wrapper(k: &KillAfter) -> String {
    format!(
        r#"d=$(dirname "$0")
rm -f "$d/console" "$d/{KILLED_FILE}"
mkfifo "$d/console"
"$@" > "$d/console" &
pid=$!
seen=0
killer=
while IFS= read -r line || [ -n "$line" ]; do
    printf '%s\n' "$line"
    case $line in
    *{pattern}*)
        seen=$((seen + 1))
        if [ $seen -eq {count} ]; then (sleep {delay}; kill -9 $pid) & killer=$!; fi ;;
    esac
done < "$d/console"
wait $pid
rc=$?
[ -n "$killer" ] && echo $rc > "$d/{KILLED_FILE}"
exit $rc
"#,
        pattern = shell_quote(&k.pattern),
        count = k.count,
        delay = format_args!("{}.{:03}", k.delay_ms / 1000, k.delay_ms % 1000),
    )
}

impl VmSpec {
    /// Its wrapper; `net` and `kill_after` together are refused.
    pub fn wrap(&self) -> Result<Wrap<'_>, String> {
        match (&self.net, &self.kill_after) {
            (Some(_), Some(_)) => Err(format!("{}: net and kill_after together", self.name)),
            (Some(n), None) => Ok(Wrap::Net(n)),
            (None, Some(k)) => Ok(Wrap::Kill(k)),
            (None, None) => Ok(Wrap::None),
        }
    }

    /// Time its `vmm run` may take in the test host: a run with NICs says; twice
    /// [`VM_TIMEOUT_S`] for a firmware boot, whose bootloader reads the kernel and initrd
    /// through the BIOS's int 13h (a mode switch and a virtio request per 64 KiB, each slow
    /// in the nested test host).
    pub fn timeout_s(&self) -> u64 {
        if let Some(n) = &self.net {
            n.timeout_s
        } else if self.firmware {
            2 * VM_TIMEOUT_S
        } else {
            VM_TIMEOUT_S
        }
    }
}

/// The firmware's file name in a scenario's image directory.
pub const FIRMWARE_FILE: &str = "bios.bin";

/// What one guest boot produced.
#[derive(Default, Debug)]
pub struct VmOutput {
    /// Guest console (vmm's stdout, or QEMU's serial).
    pub console: String,
    /// vmm's stderr.
    pub stderr: String,
    /// The host side's output, for a run with NICs.
    pub host: String,
    /// vmm's exit code (None: killed / timed out / not run).
    pub rc: Option<i32>,
    /// The runner killed vmm with SIGKILL at the spec's [`KillAfter`] point (and SIGKILL
    /// ended it).
    pub killed: bool,
    pub seconds: f64,
}

impl VmOutput {
    pub fn describe(&self) -> String {
        format!(
            "exit code {:?}{} after {:.1}s\nconsole:\n{}stderr:\n{}",
            self.rc,
            if self.killed {
                " (SIGKILLed by the runner)"
            } else {
                ""
            },
            self.seconds,
            tail(&self.console, 40),
            tail(&self.stderr, 20)
        )
    }
}

/// What one batch of `vmm` runs produced (in the test host, or directly on this host).
pub struct Runs {
    /// Per `VmSpec::name`.
    pub vms: BTreeMap<String, VmOutput>,
    /// The images as they were after the runs (copies; the input directory is not touched).
    pub image_dir: PathBuf,
    /// Whether /dev/kvm was there for the runs.
    pub kvm: bool,
    pub log: String,
    pub seconds: f64,
}

/// The `vmm run` command line for `spec` (the single place that knows vmm's flags).
pub fn vmm_args(spec: &VmSpec, kernel: &str, initrd: &str, image_dir: &str) -> Vec<String> {
    if spec.disk_boot {
        // What a qemu-kvm user types: `-m 256 -smp 2 -name t -hda disk.qcow2 -nographic`.
        let mut a: Vec<String> = ["run", "-m"].map(String::from).to_vec();
        a.push(spec.memory_mib.to_string());
        a.extend([
            "-smp".into(),
            spec.cpus.to_string(),
            "-name".into(),
            spec.name.clone(),
        ]);
        for (i, d) in spec.drives.iter().enumerate() {
            let path = format!("{image_dir}/{}", d.file);
            if i == 0 {
                a.extend(["-hda".into(), path]);
            } else {
                a.extend(["-drive".into(), format!("file={path},if=virtio")]);
            }
        }
        if spec.firmware {
            a.extend(["-bios".into(), format!("{image_dir}/{FIRMWARE_FILE}")]);
        }
        a.push("-nographic".into());
        return a;
    }
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
    if let Some(n) = &spec.net {
        a.extend(n.args.iter().cloned());
    }
    a
}
