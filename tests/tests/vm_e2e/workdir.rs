//! Work directories under target/vm-e2e/.

use std::fs;
use std::path::{Path, PathBuf};

use integration_tests::workspace_root;

/// A work directory under target/vm-e2e/, named `<tag>-<pid>-<n>`. Removed on drop unless
/// E2E_KEEP is set or the test is failing (then its path is printed). Directories left by test
/// processes that no longer run (the shared suite's lives in a static, never dropped) are
/// removed when the next one is made.
pub struct WorkDir(PathBuf);

impl WorkDir {
    pub fn new(tag: &str) -> WorkDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let base = workspace_root().join("target").join("vm-e2e");
        fs::create_dir_all(&base).unwrap();
        if std::env::var_os("E2E_KEEP").is_none() {
            for e in fs::read_dir(&base).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let pid = name.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
                if let Some(pid) = pid {
                    if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                        let _ = fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = base.join(format!("{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        eprintln!("vm_e2e: work dir {}", p.display());
        WorkDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "vm_e2e: keeping work dir {} for inspection",
                self.0.display()
            );
        } else if std::env::var_os("E2E_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}
