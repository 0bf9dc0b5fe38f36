//! Who has a file open, from `/proc`: a target checks that no descriptor of its image
//! outlives an input (a leak in the engine would hold the image's locks), and names the
//! holders when an open is refused for a lock.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The descriptors of process `pid` (`"self"` for this one) open on the file `(dev, ino)`.
fn fds_of(pid: &str, id: (u64, u64)) -> Vec<String> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| fs::metadata(e.path()).is_ok_and(|m| (m.dev(), m.ino()) == id))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// This process's descriptors open on `path` (none if it does not exist).
pub fn own_fds_on(path: &Path) -> Vec<String> {
    file_id(path).map_or_else(Vec::new, |id| fds_of("self", id))
}

/// Every process with a descriptor open on `path`, one line each: its pid, state and
/// parent (`/proc/PID/stat`), command line, and each descriptor with the locks it holds
/// (`/proc/PID/fdinfo`).
pub fn holders(path: &Path) -> Vec<String> {
    let Some(id) = file_id(path) else {
        return vec![format!("{} does not exist", path.display())];
    };
    let Ok(procs) = fs::read_dir("/proc") else {
        return vec!["/proc cannot be read".into()];
    };
    let mut out = Vec::new();
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let fds = fds_of(&pid, id);
        if fds.is_empty() {
            continue;
        }
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // "pid (comm) state ppid ...": the fields after the command's closing parenthesis.
        let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
        let state_ppid: Vec<&str> = after.split(' ').take(2).collect();
        let cmd = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        let locks: Vec<String> = fds
            .iter()
            .map(|fd| {
                let info =
                    fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
                let held: Vec<&str> = info
                    .lines()
                    .filter_map(|l| l.strip_prefix("lock:"))
                    .map(str::trim)
                    .collect();
                format!("fd {fd} [{}]", held.join("; "))
            })
            .collect();
        out.push(format!(
            "pid {pid} (self {}) state/ppid {state_ppid:?} cmd {cmd:?}: {}",
            std::process::id(),
            locks.join(", ")
        ));
    }
    out
}
