//! The reference: a guest booted directly under QEMU (TCG).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::run;

use crate::fixtures::{fixtures, guest_initramfs};
use crate::spec::{VmOutput, VmSpec, FIRMWARE_FILE, GUEST_CMDLINE};
use crate::tools::t;

/// Time a guest booted directly under QEMU TCG may take.
const QEMU_GUEST_TIMEOUT_S: u64 = 120;

/// Boot `spec` directly under QEMU (TCG), on the images in `image_dir` (modified in place,
/// like vmm would). The reference run.
pub fn run_under_qemu(spec: &VmSpec, image_dir: &Path, work: &Path) -> Result<VmOutput, String> {
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
    finish(spec, cmd, work)
}

/// Boot `spec`'s first disk under QEMU (TCG) through the firmware in `image_dir`, as vmm
/// does with `-bios`: no -kernel, the disk on virtio-blk-pci, no graphics (so SeaBIOS prints
/// on the serial console, as it does under vmm).
pub fn run_disk_under_qemu(
    spec: &VmSpec,
    image_dir: &Path,
    work: &Path,
) -> Result<VmOutput, String> {
    let disk = spec.drives.first().ok_or("no disk to boot")?;
    let mut cmd = Command::new(t("qemu-system-x86_64"));
    cmd.args(["-machine", "pc,graphics=off"]);
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
    .arg("-bios")
    .arg(image_dir.join(FIRMWARE_FILE))
    .arg("-drive")
    .arg(format!(
        "file={},format=qcow2,if=none,id=d0,cache=writeback",
        image_dir.join(&disk.file).display()
    ))
    .args(["-device", "virtio-blk-pci,drive=d0"]);
    finish(spec, cmd, work)
}

/// Run `cmd` (a QEMU booting `spec`) and collect what it printed.
fn finish(spec: &VmSpec, mut cmd: Command, work: &Path) -> Result<VmOutput, String> {
    let o = run(&mut cmd, Duration::from_secs(QEMU_GUEST_TIMEOUT_S));
    eprintln!(
        "vm_e2e: qemu guest '{}' ran {:.1}s",
        spec.name,
        o.elapsed.as_secs_f64()
    );
    let _ = fs::write(work.join(format!("console-{}.txt", spec.name)), &o.stdout);
    Ok(VmOutput {
        console: o.stdout.clone(),
        stderr: o.stderr.clone(),
        rc: if o.timed_out { None } else { o.code },
        seconds: o.elapsed.as_secs_f64(),
        host: String::new(),
        killed: false,
    })
}
