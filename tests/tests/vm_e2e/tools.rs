//! Host tools for the VM tests: finding them, hashing with them, and trimming their output.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use integration_tests::{run, seed, workspace_root, Rng};

/// The project's fixtures/ directory.
pub fn fixtures_dir() -> PathBuf {
    workspace_root().join("fixtures")
}

/// Find a tool in PATH, or in the sbin directories a non-root PATH may lack.
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// [`tool`], or the bare name (for the error message of a missing tool).
pub fn t(name: &str) -> PathBuf {
    tool(name).unwrap_or_else(|| PathBuf::from(name))
}

/// The last `n` lines of `s`, indented, for failure messages.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut r = String::new();
    if start > 0 {
        r.push_str(&format!("    | ... ({start} lines omitted)\n"));
    }
    for l in &lines[start..] {
        r.push_str("    | ");
        r.push_str(l);
        r.push('\n');
    }
    r
}

/// `s` quoted for sh.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// SHA-256 of a file, in hex.
pub fn sha256_file(path: &Path) -> String {
    let o = run(
        Command::new(t("sha256sum")).arg(path),
        Duration::from_secs(60),
    );
    assert!(o.success(), "sha256sum failed:\n{}", o.report());
    o.stdout.split_whitespace().next().unwrap_or("").to_string()
}

/// SHA-256 of `data`, in hex.
pub fn sha256(data: &[u8]) -> String {
    let mut child = Command::new(t("sha256sum"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn sha256sum");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let w = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("sha256sum");
    w.join().unwrap().expect("write to sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// A generator seeded from `TEST_SEED`, else from the clock (the seed is printed either way).
pub fn seeded_rng() -> Rng {
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    Rng::new(seed(clock))
}
