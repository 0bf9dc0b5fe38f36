//! Opening `--drive` images as [`BlockDriver`]s: `snapshot=on` puts a temporary qcow2
//! overlay on top (QEMU's `-snapshot`), `cache=unsafe` a flush-ignoring layer,
//! `cache=writethrough|directsync` a layer that makes each write durable before it completes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::create::{create_and_open, Qcow2CreateOptions};
use common::open::{open_image, OpenOptions};
use common::{BlockDriver, BlockStatus, Error, IoBuf, IoBufMut, Result};

use crate::config::{CacheMode, DriveConfig};

/// A drive that could not be opened: which one, and the engine's error (whose kind callers
/// match on, e.g. [`Error::Locked`] for an image in use).
#[derive(Debug)]
pub struct DriveError {
    pub path: PathBuf,
    pub error: Error,
}

impl std::fmt::Display for DriveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "drive '{}': {}", self.path.display(), self.error)
    }
}

/// Open one drive as the guest will see it.
pub fn open_drive(cfg: &DriveConfig) -> std::result::Result<Arc<dyn BlockDriver>, DriveError> {
    let opened = if cfg.snapshot && !cfg.read_only {
        open_snapshot(cfg)
    } else {
        open_base(cfg, cfg.read_only)
    };
    let base = opened.map_err(|error| DriveError {
        path: cfg.path.clone(),
        error,
    })?;
    let mut drv: Arc<dyn BlockDriver> = Arc::from(base);
    match cfg.cache {
        CacheMode::Unsafe => drv = Arc::new(FlushPolicy(drv, Flushes::Ignored)),
        CacheMode::Writethrough | CacheMode::DirectSync => {
            drv = Arc::new(FlushPolicy(drv, Flushes::AfterEachWrite))
        }
        CacheMode::Writeback | CacheMode::None => {}
    }
    Ok(drv)
}

fn open_base(cfg: &DriveConfig, read_only: bool) -> Result<Box<dyn BlockDriver>> {
    Ok(open_image_of(cfg, read_only)?.into_driver())
}

fn open_image_of(cfg: &DriveConfig, read_only: bool) -> Result<common::open::Image> {
    let opts = OpenOptions {
        read_only,
        format: cfg.format,
        // cache=none: bypass the host page cache, as QEMU does.
        direct: matches!(cfg.cache, CacheMode::None | CacheMode::DirectSync),
        ..Default::default()
    };
    open_image(&cfg.path, &opts)
}

/// `snapshot=on`: a qcow2 overlay in the temporary directory whose backing file is the
/// image (opened read-only through the chain). The overlay file is unlinked as soon as it
/// is open, so it goes away when vmm exits, however it exits.
fn open_snapshot(cfg: &DriveConfig) -> Result<Box<dyn BlockDriver>> {
    // The overlay names its backing file absolutely; an NBD URI already is.
    let base = match cfg.path.to_str() {
        Some(uri) if common::nbd::uri::is_nbd_uri(uri) => PathBuf::from(uri),
        _ => std::fs::canonicalize(&cfg.path)
            .map_err(|e| Error::io(format!("Could not open '{}'", cfg.path.display()), e))?,
    };
    let (format, size) = {
        let image = open_image_of(cfg, true)?;
        (image.format(), image.driver().size())
    };
    let overlay = temp_overlay_path();
    let opts = Qcow2CreateOptions {
        size,
        backing_file: Some(base.to_string_lossy().into_owned()),
        backing_format: Some(format.name().to_string()),
        ..Default::default()
    };
    let opened = create_and_open(&overlay, &opts);
    let _ = std::fs::remove_file(&overlay);
    Ok(opened?.into_driver())
}

fn temp_overlay_path() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = format!(
        "vmm-snapshot-{}-{}-{nanos}.qcow2",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    Path::new(&std::env::temp_dir()).join(name)
}

/// How a [`FlushPolicy`] layer treats flushes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Flushes {
    /// `cache=unsafe`: flushes from the guest are acknowledged without reaching the disk.
    Ignored,
    /// `cache=writethrough`/`directsync`: every write, write-zeroes and discard is flushed
    /// before it completes (QEMU opens the file O_DSYNC for that).
    AfterEachWrite,
}

/// A layer that changes when the image below is flushed.
pub struct FlushPolicy(pub Arc<dyn BlockDriver>, pub Flushes);

impl FlushPolicy {
    fn written(&self, r: Result<()>) -> Result<()> {
        r?;
        if self.1 == Flushes::AfterEachWrite {
            self.0.flush()?;
        }
        Ok(())
    }
}

impl BlockDriver for FlushPolicy {
    fn format_name(&self) -> &'static str {
        self.0.format_name()
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn is_read_only(&self) -> bool {
        self.0.is_read_only()
    }
    fn read_vectored_at(&self, bufs: &[IoBufMut<'_>], offset: u64) -> Result<()> {
        self.0.read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        self.written(self.0.write_vectored_at(bufs, offset))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.written(self.0.write_zeroes(offset, len, may_unmap))
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.written(self.0.discard(offset, len))
    }
    fn flush(&self) -> Result<()> {
        match self.1 {
            Flushes::Ignored => Ok(()),
            Flushes::AfterEachWrite => self.0.flush(),
        }
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.0.block_status(offset, len)
    }
    fn allocated_file_size(&self) -> Result<u64> {
        self.0.allocated_file_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held by every test that opens a `snapshot=on` drive: one test looks for overlay
    /// files left in the temporary directory, and another test's overlay lives there for
    /// the moment between its creation and its unlink.
    static SNAPSHOT_OVERLAYS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn snapshot_lock() -> std::sync::MutexGuard<'static, ()> {
        SNAPSHOT_OVERLAYS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn temp_image(name: &str, size: usize) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("vmm-disk-{}-{name}", std::process::id()));
        std::fs::write(&p, vec![0x11u8; size]).unwrap();
        p
    }

    fn drive(path: &std::path::Path, extra: &str) -> DriveConfig {
        crate::config::parse_drive(&format!("file={},format=raw{extra}", path.display())).unwrap()
    }

    /// A disk that counts its flushes.
    struct Counting(
        integration_tests::mem_disk::MemDisk,
        std::sync::atomic::AtomicU32,
    );

    impl BlockDriver for Counting {
        fn format_name(&self) -> &'static str {
            "raw"
        }
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn is_read_only(&self) -> bool {
            false
        }
        fn read_vectored_at(&self, b: &[IoBufMut<'_>], o: u64) -> Result<()> {
            self.0.read_vectored_at(b, o)
        }
        fn write_vectored_at(&self, b: &[IoBuf<'_>], o: u64) -> Result<()> {
            self.0.write_vectored_at(b, o)
        }
        fn write_zeroes(&self, o: u64, n: u64, u: bool) -> Result<()> {
            self.0.write_zeroes(o, n, u)
        }
        fn discard(&self, o: u64, n: u64) -> Result<()> {
            self.0.discard(o, n)
        }
        fn flush(&self) -> Result<()> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        fn block_status(&self, o: u64, n: u64) -> Result<BlockStatus> {
            self.0.block_status(o, n)
        }
        fn allocated_file_size(&self) -> Result<u64> {
            Ok(0)
        }
    }

    #[test]
    fn flush_policies() {
        use std::sync::atomic::Ordering::SeqCst;
        let disk = Arc::new(Counting(
            integration_tests::mem_disk::MemDisk::new(1 << 16, false),
            0.into(),
        ));
        let flushes = || disk.1.load(SeqCst);
        let wt = FlushPolicy(disk.clone(), Flushes::AfterEachWrite);
        wt.write_at(&[1; 512], 0).unwrap();
        wt.write_zeroes(512, 512, false).unwrap();
        wt.discard(1024, 512).unwrap();
        assert_eq!(flushes(), 3);
        wt.read_at(&mut [0; 512], 0).unwrap();
        wt.flush().unwrap();
        assert_eq!(flushes(), 4);
        let un = FlushPolicy(disk.clone(), Flushes::Ignored);
        un.write_at(&[1; 512], 0).unwrap();
        un.flush().unwrap();
        assert_eq!(flushes(), 4);
        for (mode, want) in [
            ("writethrough", CacheMode::Writethrough),
            ("directsync", CacheMode::DirectSync),
        ] {
            let d = crate::config::parse_drive(&format!("file=x,cache={mode}")).unwrap();
            assert_eq!(d.cache, want);
        }
    }

    /// Disks in the engine's other formats (vpc, vdi, vhdx), named with `format=` or
    /// probed: what the guest writes, qemu-io reads back from the file.
    #[test]
    fn vpc_and_vdi_drives_are_written_through_the_engine() {
        for (fmt, opts) in [
            ("vpc", "subformat=dynamic"),
            ("vpc", "subformat=fixed"),
            ("vdi", "static=off"),
            ("vhdx", "subformat=dynamic"),
            ("vhdx", "subformat=fixed"),
        ] {
            let p =
                std::env::temp_dir().join(format!("vmm-disk-{}-{fmt}-{opts}", std::process::id()));
            let ps = p.to_str().unwrap();
            let made = std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", fmt, "-o", opts, ps, "4M"])
                .status()
                .unwrap();
            assert!(made.success());
            // A fixed VHD probes as raw, as in QEMU: only `format=vpc` opens it as vpc.
            for extra in [format!(",format={fmt}"), String::new()] {
                let cfg = crate::config::parse_drive(&format!("file={ps}{extra}")).unwrap();
                let d = open_drive(&cfg).unwrap();
                if fmt != "vpc" || opts != "subformat=fixed" || !extra.is_empty() {
                    assert_eq!(d.format_name(), fmt, "{opts}{extra}");
                }
                d.write_at(&[0x5a; 4096], 1 << 20).unwrap();
                d.flush().unwrap();
            }
            let out = std::process::Command::new("qemu-io")
                .args(["-f", fmt, "-c", "read -P 0x5a 1M 4k", ps])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && !text.contains("Pattern verification failed"),
                "{text}"
            );
            std::fs::remove_file(&p).unwrap();
        }
        let bad = crate::config::parse_drive("file=x,format=bogus").unwrap_err();
        assert_eq!(bad, "unsupported drive format 'bogus'");
    }

    /// Formats the engine only reads: a drive opens with `readonly=on` (the guest reads
    /// what qemu-io wrote) or `snapshot=on` (writes go to the overlay), and a writable
    /// drive is refused in one line naming the format.
    #[test]
    fn read_only_format_drives() {
        let _overlays = snapshot_lock();
        for fmt in ["qed", "qcow", "parallels"] {
            let p = std::env::temp_dir().join(format!("vmm-disk-{}-ro-{fmt}", std::process::id()));
            let ps = p.to_str().unwrap();
            for args in [
                vec!["qemu-img", "create", "-q", "-f", fmt, ps, "4M"],
                vec!["qemu-io", "-f", fmt, "-c", "write -P 0x5a 1M 4k", ps],
            ] {
                let ok = std::process::Command::new(args[0])
                    .args(&args[1..])
                    .stdout(std::process::Stdio::null())
                    .status()
                    .unwrap();
                assert!(ok.success(), "{args:?}");
            }
            let mut b = [0u8; 4096];
            for extra in [",readonly=on", ",snapshot=on"] {
                let d =
                    open_drive(&crate::config::parse_drive(&format!("file={ps}{extra}")).unwrap())
                        .unwrap();
                d.read_at(&mut b, 1 << 20).unwrap();
                assert_eq!(b, [0x5a; 4096], "{fmt}{extra}");
                assert_eq!(d.write_at(&[1; 512], 0).is_ok(), extra == ",snapshot=on");
            }
            let e = open_drive(&crate::config::parse_drive(&format!("file={ps}")).unwrap())
                .err()
                .expect("a writable drive of a read-only format");
            assert!(
                e.to_string()
                    .contains(&format!("The {fmt} format is read-only")),
                "{e}"
            );
            std::fs::remove_file(&p).unwrap();
        }
    }

    #[test]
    fn snapshot_on_leaves_the_file_alone() {
        let _overlays = snapshot_lock();
        let p = temp_image("snap", 1 << 16);
        let d = open_drive(&drive(&p, ",snapshot=on")).unwrap();
        assert!(!d.is_read_only());
        d.write_at(&[0x22; 1000], 100).unwrap();
        let mut b = [0u8; 4];
        d.read_at(&mut b, 98).unwrap();
        assert_eq!(b, [0x11, 0x11, 0x22, 0x22]);
        drop(d);
        assert_eq!(std::fs::read(&p).unwrap(), vec![0x11u8; 1 << 16]);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn read_only_and_locking() {
        let p = temp_image("lock", 1 << 16);
        let ro = open_drive(&drive(&p, ",readonly=on")).unwrap();
        assert!(ro.is_read_only());
        assert!(ro.write_at(&[1], 0).is_err());
        // As in QEMU, a reader blocks writers (it wants a consistent image).
        let err = open_drive(&drive(&p, "")).err().expect("writer refused");
        assert!(matches!(err.error, Error::Locked(_)), "{err}");
        drop(ro);
        // Retried for a moment: another test thread's child process can hold a copy of the
        // descriptor just closed (and its lock) until it execs.
        let start = std::time::Instant::now();
        let rw = loop {
            match open_drive(&drive(&p, "")) {
                Err(DriveError {
                    error: Error::Locked(_),
                    ..
                }) if start.elapsed().as_secs() < 2 => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                r => break r.unwrap(),
            }
        };
        // A second writer is refused while the first one is open.
        let err = open_drive(&drive(&p, ""))
            .err()
            .expect("second writer refused");
        assert!(matches!(err.error, Error::Locked(_)), "{err}");
        drop(rw);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn snapshot_overlay_is_qcow2_over_the_image_and_leaves_no_file() {
        let _overlays = snapshot_lock();
        let p = temp_image("snapq", 3 * 4096 + 512);
        let ours = format!("vmm-snapshot-{}-", std::process::id());
        let before: Vec<_> = std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&ours))
            .map(|e| e.path())
            .collect();
        let d = open_drive(&drive(&p, ",snapshot=on")).unwrap();
        assert_eq!(d.format_name(), "qcow2");
        assert_eq!(d.size(), 3 * 4096 + 512);
        d.write_at(&[1u8; 5], 4093).unwrap();
        d.write_zeroes(0, 4096, true).unwrap();
        let mut buf = [0u8; 12];
        d.read_at(&mut buf, 4088).unwrap();
        assert_eq!(buf, [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0x11, 0x11]);
        // The image is opened read-only below the overlay: a writer is refused.
        assert!(open_drive(&drive(&p, "")).is_err());
        let after: Vec<_> = std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&ours))
            .map(|e| e.path())
            .filter(|p| !before.contains(p))
            .collect();
        assert!(after.is_empty(), "overlay file left behind: {after:?}");
        drop(d);
        assert_eq!(std::fs::read(&p).unwrap(), vec![0x11u8; 3 * 4096 + 512]);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn cache_none_opens_with_o_direct_and_keeps_unaligned_bytes() {
        // tmpfs has no O_DIRECT: use the build's target directory, which is on disk.
        let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).unwrap();
        let p = dir.path().join("direct.raw");
        std::fs::write(&p, vec![0x11u8; 1 << 16]).unwrap();
        let d = open_drive(&drive(&p, ",cache=none")).unwrap();
        d.write_at(&[0x22; 3], 5).unwrap();
        d.flush().unwrap();
        let mut b = [0u8; 5];
        d.read_at(&mut b, 4).unwrap();
        assert_eq!(b, [0x11, 0x22, 0x22, 0x22, 0x11]);
        // The descriptor really has O_DIRECT.
        let canonical = std::fs::canonicalize(&p).unwrap();
        let fds = std::fs::read_dir("/proc/self/fd").unwrap();
        let direct = fds.filter_map(|e| e.ok()).any(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t == canonical)
                && std::fs::read_to_string(format!(
                    "/proc/self/fdinfo/{}",
                    e.file_name().to_string_lossy()
                ))
                .ok()
                .and_then(|info| {
                    let flags = info.lines().find(|l| l.starts_with("flags:"))?;
                    u32::from_str_radix(flags.trim_start_matches("flags:").trim(), 8).ok()
                })
                .is_some_and(|f| f & libc::O_DIRECT as u32 != 0)
        });
        assert!(direct, "no O_DIRECT descriptor for {}", p.display());
        drop(d);
        assert_eq!(
            &std::fs::read(&p).unwrap()[4..9],
            &[0x11, 0x22, 0x22, 0x22, 0x11]
        );
    }
}
