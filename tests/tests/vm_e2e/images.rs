//! Disk images: making them with qemu-img/qemu-io, checking and reading them back.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::{run, Output};

use crate::tools::t;

pub const MIB: u64 = 1 << 20;

pub const KIB: u64 = 1 << 10;

pub fn qemu_img(args: &[&str], dir: &Path) -> Result<Output, String> {
    run(
        Command::new(t("qemu-img")).current_dir(dir).args(args),
        Duration::from_secs(120),
    )
    .check()
}

/// Create a qcow2 and fill regions with byte patterns through qemu-io.
pub fn make_patterned_qcow2(
    path: &Path,
    size: u64,
    patterns: &[(u8, u64, u64)],
) -> Result<(), String> {
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
pub fn make_overlay(
    dir: &Path,
    base: &str,
    overlay: &str,
    img: Option<&Path>,
) -> Result<(), String> {
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
    if !o.success() {
        return Err(format!("img create of the overlay failed:\n{}", o.report()));
    }
    qemu_img_check(&dir.join(overlay))
}

pub fn to_raw(image: &Path, out: &Path) -> Result<Vec<u8>, String> {
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

pub fn qemu_img_check(image: &Path) -> Result<(), String> {
    let o = run(
        Command::new(t("qemu-img")).arg("check").arg(image),
        Duration::from_secs(120),
    );
    if o.success() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img check {} is not clean:\n{}",
            image.display(),
            o.report()
        ))
    }
}

pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}
