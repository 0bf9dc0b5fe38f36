//! QEMU's tap scripts: `script=` runs once the tap is open, `downscript=` when vmm is done
//! with it, each with the interface name as its only argument.

use std::path::{Path, PathBuf};
use std::process::Command;

/// QEMU's defaults for `-net tap` and `-netdev tap` without `script=` / `downscript=`.
pub const DEFAULT_SCRIPT: &str = "/etc/qemu-ifup";
pub const DEFAULT_DOWNSCRIPT: &str = "/etc/qemu-ifdown";

/// Run `script IFNAME` and wait for it; anything but exit status 0 is an error.
pub fn run_script(script: &Path, ifname: &str) -> Result<(), String> {
    let status = Command::new(script)
        .arg(ifname)
        .status()
        .map_err(|e| format!("could not launch network script {}: {e}", script.display()))?;
    if !status.success() {
        let how = match status.code() {
            Some(c) => format!("exit status {c}"),
            None => "a signal".to_string(),
        };
        return Err(format!(
            "network script {} failed with {how}",
            script.display()
        ));
    }
    Ok(())
}

/// Runs the downscript when dropped: on every way out of `vmm run` after the up script.
#[derive(Debug)]
pub struct Downscript {
    script: PathBuf,
    ifname: String,
}

impl Downscript {
    pub fn new(script: PathBuf, ifname: &str) -> Downscript {
        Downscript {
            script,
            ifname: ifname.to_string(),
        }
    }
}

impl Drop for Downscript {
    fn drop(&mut self) {
        if let Err(e) = run_script(&self.script, &self.ifname) {
            eprintln!("vmm: {e}");
        }
    }
}
