//! Disk images for the VM tests, made with qemu-img/qemu-io (through the tests library's
//! tool wrapper, which also checks and reads them back: `qemu_check`, `qemu_convert_raw`).

use std::path::Path;
use std::time::Duration;

use integration_tests::{qemu_check, qemu_img_in, run, Tool};

pub const MIB: u64 = 1 << 20;

pub const KIB: u64 = 1 << 10;

/// Create a qcow2 and fill regions with byte patterns through qemu-io.
pub fn make_patterned_qcow2(
    path: &Path,
    size: u64,
    patterns: &[(u8, u64, u64)],
) -> Result<(), String> {
    let dir = path.parent().unwrap();
    let name = path.file_name().unwrap().to_str().unwrap();
    qemu_img_in(
        dir,
        &["create", "-q", "-f", "qcow2", name, &size.to_string()],
    )
    .check()?;
    let mut args = vec!["-f".to_string(), "qcow2".to_string()];
    for (p, off, len) in patterns {
        args.push("-c".into());
        args.push(format!("write -P {p} {off} {len}"));
    }
    args.push(name.into());
    Tool::qemu_io().run(Some(dir), &args).check()?;
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
        return qemu_img_in(dir, &args).check().map(|_| ());
    };
    let o = run(
        &mut Tool::at(img).command(Some(dir), &args),
        Duration::from_secs(60),
    );
    if !o.success() {
        return Err(format!("img create of the overlay failed:\n{}", o.report()));
    }
    qemu_check(&dir.join(overlay))
}

pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}
