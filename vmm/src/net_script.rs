//! QEMU's tap scripts: `script=` runs once the tap is open, `downscript=` when vmm is done
//! with it, each with the interface name as its only argument.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crate::tap::Tap;

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
/// It holds the tap open until then, so that the script still finds a tap vmm created.
pub struct Downscript {
    script: PathBuf,
    ifname: String,
    _tap: Arc<Tap>,
}

impl Downscript {
    pub fn new(script: PathBuf, tap: Arc<Tap>) -> Downscript {
        Downscript {
            script,
            ifname: tap.name().to_string(),
            _tap: tap,
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
