//! Image locking compatible with QEMU's `file-posix` byte-range layout.
//!
//! QEMU (and therefore `qemu-img`, `qemu-io` and running VMs) locks single bytes of an
//! image file with open-file-description locks (`F_OFD_SETLK`), always as *read* (shared)
//! locks:
//!
//! * byte `100 + bit` for each permission the opener **holds**;
//! * byte `200 + bit` for each permission the opener does **not share** with others.
//!
//! Permission bits (QEMU 10, `BLK_PERM_ALL = 0x0f`): consistent read = 0, write = 1,
//! write unchanged = 2, resize = 3. Before committing, an opener probes with `F_OFD_GETLK`
//! and a *write* lock type: for each permission it wants, byte `200 + bit` must be free of
//! other descriptions' locks ("Failed to get \"write\" lock"); for each permission it does
//! not share, byte `100 + bit` must be free ("Failed to get shared \"write\" lock").
//!
//! What QEMU 10 holds on a qcow2 image (verified with strace and `/proc/locks`):
//!
//! | opener                                   | held bytes             |
//! |------------------------------------------|------------------------|
//! | read-write (`qemu-io`, `commit`, `resize`) | 100 101 103, 201 203 |
//! | read-only with I/O (`check`, `map`, `convert` source, `qemu-io -r`) | 100, 201 203 |
//! | `info` (no I/O)                          | 201 203                |
//! | `-U` / force-share (`qemu-io -r -U`)     | 100                    |
//! | `create` (while formatting)              | 101 103, 203           |
//!
//! Locks belong to the open file description: they vanish when the file is closed, and
//! two descriptions of one file conflict even inside one process.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};

/// First byte of the "permission held" range.
pub const LOCK_PERM_BASE: i64 = 100;
/// First byte of the "permission not shared" range.
pub const LOCK_SHARED_BASE: i64 = 200;

/// `BLK_PERM_CONSISTENT_READ`.
pub const PERM_CONSISTENT_READ: u64 = 0x01;
/// `BLK_PERM_WRITE`.
pub const PERM_WRITE: u64 = 0x02;
/// `BLK_PERM_WRITE_UNCHANGED`.
pub const PERM_WRITE_UNCHANGED: u64 = 0x04;
/// `BLK_PERM_RESIZE`.
pub const PERM_RESIZE: u64 = 0x08;
/// `BLK_PERM_ALL` in QEMU 10 (`GRAPH_MOD`, bit 4, is gone).
pub const PERM_ALL: u64 = 0x0f;

const PERM_BITS: u32 = 4;

/// A permission set in QEMU's sense: what an opener uses, and what it lets others use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    /// Permissions held (`perm`).
    pub perm: u64,
    /// Permissions shared with other openers (`shared_perm`).
    pub shared: u64,
}

impl Perms {
    /// What QEMU takes on a qcow2 image opened read-write.
    pub const READ_WRITE: Perms = Perms {
        perm: PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
        shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
    };
    /// What QEMU takes on a qcow2 image opened read-only to read data (check, map, convert).
    pub const READ_ONLY: Perms = Perms {
        perm: PERM_CONSISTENT_READ,
        shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
    };
    /// What `qemu-img info` takes on a qcow2 image (opened without I/O).
    pub const INFO: Perms = Perms {
        perm: 0,
        shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
    };
    /// What a read-only open with `-U` (force-share) takes.
    pub const FORCE_SHARE: Perms = Perms {
        perm: PERM_CONSISTENT_READ,
        shared: PERM_ALL,
    };
    /// What `qemu-img create` takes on the file while formatting it.
    pub const CREATE: Perms = Perms {
        perm: PERM_WRITE | PERM_RESIZE,
        shared: PERM_ALL & !PERM_RESIZE,
    };

    /// The permissions for an image open, as `lock_image` uses them.
    pub fn for_open(read_only: bool, force_share: bool) -> Perms {
        match (read_only, force_share) {
            (false, _) => Perms::READ_WRITE,
            (true, false) => Perms::READ_ONLY,
            (true, true) => Perms::FORCE_SHARE,
        }
    }
}

/// QEMU's name of one permission bit (`bdrv_perm_names`).
pub fn perm_name(bit: u64) -> &'static str {
    match bit {
        PERM_CONSISTENT_READ => "consistent read",
        PERM_WRITE => "write",
        PERM_WRITE_UNCHANGED => "write unchanged",
        PERM_RESIZE => "resize",
        _ => "unknown",
    }
}

/// The message QEMU prints when another opener holds a conflicting lock, without the
/// `Could not open '...': ` prefix. `shared` selects the "shared" variant (someone holds a
/// permission we do not share) over the plain one (someone does not share what we want).
pub fn conflict_message(path: &Path, bit: u64, shared: bool) -> String {
    format!(
        "Failed to get {}\"{}\" lock\nIs another process using the image [{}]?",
        if shared { "shared " } else { "" },
        perm_name(bit),
        path.display()
    )
}

fn flock_for(ty: libc::c_int, start: i64) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = 1;
    fl
}

/// Take (`F_RDLCK`) or release (`F_UNLCK`) the OFD lock on one byte.
fn set_byte(file: &File, byte: i64, ty: libc::c_int) -> io::Result<()> {
    let mut fl = flock_for(ty, byte);
    // SAFETY: fcntl with a valid fd and a pointer to a properly initialised flock.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether another open file description holds a lock on `byte` that would conflict with
/// a write lock (i.e. any lock at all).
fn byte_locked_by_other(file: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock_for(libc::F_WRLCK, byte);
    // SAFETY: fcntl with a valid fd and a pointer to a properly initialised flock.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

fn bits(mask: u64) -> impl Iterator<Item = (u32, u64)> {
    (0..PERM_BITS)
        .map(|i| (i, 1u64 << i))
        .filter(move |(_, b)| mask & b != 0)
}

/// The bytes a given permission set locks, in the order they are taken.
pub fn held_bytes(perms: Perms) -> Vec<i64> {
    let mut v: Vec<i64> = bits(perms.perm)
        .map(|(i, _)| LOCK_PERM_BASE + i as i64)
        .collect();
    v.extend(bits(!perms.shared & PERM_ALL).map(|(i, _)| LOCK_SHARED_BASE + i as i64));
    v
}

/// An fcntl failure, worded like QEMU's `raw_lock_error_setg_errno`: EAGAIN/EACCES mean
/// "someone else holds it" and print without the errno text. `hint` adds QEMU's "Is another
/// process using the image" line (QEMU adds it to probe failures, not to `F_OFD_SETLK` ones).
fn lock_io_error(path: &Path, what: String, e: io::Error, hint: bool) -> Error {
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) if hint => Error::Locked(format!(
            "{what}\nIs another process using the image [{}]?",
            path.display()
        )),
        Some(libc::EAGAIN) | Some(libc::EACCES) => Error::Locked(what),
        _ => Error::io(what, e),
    }
}

fn unlock_bytes(file: &File, bytes: &[i64]) {
    for &b in bytes {
        // Releasing a lock cannot conflict; ignore odd filesystem errors like QEMU does.
        let _ = set_byte(file, b, libc::F_UNLCK);
    }
}

/// Lock `file` for the permission set `perms`, the way QEMU's `raw_handle_perm_lock` does:
/// take the read locks on every byte the set implies, then probe for conflicts; on a
/// conflict, release what was taken and return [`Error::Locked`] with QEMU's wording.
///
/// `path_for_messages` is printed as given (QEMU prints the file name as the user typed it).
///
/// Call it once per open file description (on failure it releases every byte of `perms`);
/// use [`relock_image`] to change the permissions of a description that holds locks.
pub fn lock_image_perms(file: &File, path_for_messages: &Path, perms: Perms) -> Result<()> {
    let bytes = held_bytes(perms);
    for (n, &b) in bytes.iter().enumerate() {
        if let Err(e) = set_byte(file, b, libc::F_RDLCK) {
            unlock_bytes(file, &bytes[..n]);
            return Err(lock_io_error(
                path_for_messages,
                format!("Failed to lock byte {b}"),
                e,
                false,
            ));
        }
    }
    match check_conflicts(file, path_for_messages, perms) {
        Ok(()) => Ok(()),
        Err(e) => {
            unlock_bytes(file, &bytes);
            Err(e)
        }
    }
}

/// Probe for locks of other openers that conflict with `perms` (QEMU's
/// `raw_check_lock_bytes`), without taking anything.
pub fn check_conflicts(file: &File, path_for_messages: &Path, perms: Perms) -> Result<()> {
    let probe = |byte: i64, bit: u64, shared: bool| -> Result<()> {
        match byte_locked_by_other(file, byte) {
            Ok(false) => Ok(()),
            Ok(true) => Err(Error::Locked(conflict_message(
                path_for_messages,
                bit,
                shared,
            ))),
            Err(e) => {
                let what = format!(
                    "Failed to get {}\"{}\" lock",
                    if shared { "shared " } else { "" },
                    perm_name(bit)
                );
                Err(lock_io_error(path_for_messages, what, e, true))
            }
        }
    };
    for (i, bit) in bits(perms.perm) {
        probe(LOCK_SHARED_BASE + i as i64, bit, false)?;
    }
    for (i, bit) in bits(!perms.shared & PERM_ALL) {
        probe(LOCK_PERM_BASE + i as i64, bit, true)?;
    }
    Ok(())
}

/// Lock an image for an open: read-write takes what `qemu-io`/`qemu-img commit` take on a
/// qcow2 image, read-only what `qemu-img check`/`convert` take, and read-only with
/// `force_share` (`-U`) only the shared "consistent read" byte.
///
/// `force_share` with a read-write open is refused like QEMU refuses it.
pub fn lock_image(
    file: &File,
    path_for_messages: &Path,
    read_only: bool,
    force_share: bool,
) -> Result<()> {
    if force_share && !read_only {
        return Err(Error::invalid(
            "force-share=on can only be used with read-only images",
        ));
    }
    lock_image_perms(
        file,
        path_for_messages,
        Perms::for_open(read_only, force_share),
    )
}

/// Release every lock byte QEMU's layout uses on `file` (100..=103 and 200..=203).
pub fn unlock_image(file: &File) {
    let all: Vec<i64> = (0..PERM_BITS as i64)
        .flat_map(|i| [LOCK_PERM_BASE + i, LOCK_SHARED_BASE + i])
        .collect();
    unlock_bytes(file, &all);
}

/// Change the locks held on `file` from `old` to `new` (e.g. a reopen read-write for
/// `commit`): takes the union first, probes `new`, then drops what `new` does not need. On
/// a conflict the old locks are kept.
pub fn relock_image(file: &File, path_for_messages: &Path, old: Perms, new: Perms) -> Result<()> {
    let union = Perms {
        perm: old.perm | new.perm,
        shared: old.shared & new.shared,
    };
    let old_bytes = held_bytes(old);
    let union_bytes = held_bytes(union);
    for (n, &b) in union_bytes.iter().enumerate() {
        if let Err(e) = set_byte(file, b, libc::F_RDLCK) {
            let extra: Vec<i64> = union_bytes[..n]
                .iter()
                .copied()
                .filter(|x| !old_bytes.contains(x))
                .collect();
            unlock_bytes(file, &extra);
            return Err(lock_io_error(
                path_for_messages,
                format!("Failed to lock byte {b}"),
                e,
                false,
            ));
        }
    }
    let new_bytes = held_bytes(new);
    let result = check_conflicts(file, path_for_messages, new);
    let keep = if result.is_ok() {
        &new_bytes
    } else {
        &old_bytes
    };
    let drop: Vec<i64> = union_bytes
        .iter()
        .copied()
        .filter(|x| !keep.contains(x))
        .collect();
    unlock_bytes(file, &drop);
    result
}

/// Test helper: retry `f` while it fails with [`Error::Locked`], for up to two seconds.
///
/// A lock outlives `close` for a moment when another thread of the test binary forks a
/// child (e.g. `qemu-img`) in between: the child holds a copy of every descriptor until
/// its `exec` closes them. Tests that reopen right after closing use this.
#[cfg(test)]
pub(crate) fn retry_while_locked<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let start = std::time::Instant::now();
    loop {
        match f() {
            Err(Error::Locked(_)) if start.elapsed() < std::time::Duration::from_secs(2) => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    fn tmpfile(dir: &tempfile::TempDir, name: &str) -> std::path::PathBuf {
        let p = dir.path().join(name);
        let f = File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        p
    }

    fn open(p: &Path, rw: bool) -> File {
        OpenOptions::new().read(true).write(rw).open(p).unwrap()
    }

    fn locked_msg(r: Result<()>) -> String {
        match r {
            Err(Error::Locked(m)) => m,
            other => panic!("expected Locked, got {other:?}"),
        }
    }

    #[test]
    fn held_bytes_match_qemu() {
        assert_eq!(held_bytes(Perms::READ_WRITE), vec![100, 101, 103, 201, 203]);
        assert_eq!(held_bytes(Perms::READ_ONLY), vec![100, 201, 203]);
        assert_eq!(held_bytes(Perms::INFO), vec![201, 203]);
        assert_eq!(held_bytes(Perms::FORCE_SHARE), vec![100]);
        assert_eq!(held_bytes(Perms::CREATE), vec![101, 103, 203]);
    }

    #[test]
    fn rw_excludes_rw_and_ro_in_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let p = tmpfile(&dir, "a.img");
        let a = open(&p, true);
        lock_image(&a, Path::new("a.img"), false, false).unwrap();

        let b = open(&p, true);
        let m = locked_msg(lock_image(&b, Path::new("a.img"), false, false));
        assert_eq!(
            m,
            "Failed to get \"write\" lock\nIs another process using the image [a.img]?"
        );
        let c = open(&p, false);
        let m = locked_msg(lock_image(&c, Path::new("a.img"), true, false));
        assert_eq!(
            m,
            "Failed to get shared \"write\" lock\nIs another process using the image [a.img]?"
        );
        // Force-share readers get in.
        lock_image(&c, Path::new("a.img"), true, true).unwrap();
        // A failed attempt leaves nothing behind: after closing a, b can lock.
        drop(a);
        retry_while_locked(|| lock_image(&b, Path::new("a.img"), false, false)).unwrap();
    }

    #[test]
    fn readers_share_but_exclude_writers() {
        let dir = tempfile::tempdir().unwrap();
        let p = tmpfile(&dir, "b.img");
        let r1 = open(&p, false);
        let r2 = open(&p, false);
        lock_image(&r1, &p, true, false).unwrap();
        lock_image(&r2, &p, true, false).unwrap();
        let w = open(&p, true);
        let m = locked_msg(lock_image(&w, Path::new("b.img"), false, false));
        assert!(m.starts_with("Failed to get \"write\" lock\n"), "{m}");
        drop(r1);
        drop(r2);
        retry_while_locked(|| lock_image(&w, &p, false, false)).unwrap();
    }

    #[test]
    fn force_share_rw_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = tmpfile(&dir, "c.img");
        let f = open(&p, true);
        let e = lock_image(&f, &p, false, true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "force-share=on can only be used with read-only images"
        );
    }

    #[test]
    fn relock_upgrade_and_downgrade() {
        let dir = tempfile::tempdir().unwrap();
        let p = tmpfile(&dir, "d.img");
        let a = open(&p, true);
        lock_image_perms(&a, &p, Perms::READ_ONLY).unwrap();
        let r = open(&p, false);
        lock_image_perms(&r, &p, Perms::READ_ONLY).unwrap();
        // Upgrade fails while another reader unshares write; old locks are kept.
        locked_msg(relock_image(&a, &p, Perms::READ_ONLY, Perms::READ_WRITE));
        let w = open(&p, true);
        locked_msg(lock_image_perms(&w, &p, Perms::READ_WRITE));
        drop(r);
        retry_while_locked(|| relock_image(&a, &p, Perms::READ_ONLY, Perms::READ_WRITE)).unwrap();
        locked_msg(lock_image_perms(&w, &p, Perms::READ_ONLY));
        relock_image(&a, &p, Perms::READ_WRITE, Perms::READ_ONLY).unwrap();
        // Another reader can join now, a writer still cannot.
        lock_image_perms(&w, &p, Perms::READ_ONLY).unwrap();
        unlock_image(&w);
        unlock_image(&a);
        retry_while_locked(|| lock_image_perms(&w, &p, Perms::READ_WRITE)).unwrap();
    }

    fn have(cmd: &str) -> bool {
        Command::new(cmd)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    struct Holder(Child);
    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Start `qemu-io <args> -c 'sleep 100000' path` and wait until it holds `byte`.
    fn qemu_io_holding(args: &[&str], path: &Path, byte: i64) -> Holder {
        let child = Command::new("qemu-io")
            .args(args)
            .args(["-c", "sleep 100000"])
            .arg(path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let h = Holder(child);
        let probe = open(path, false);
        let start = Instant::now();
        while !byte_locked_by_other(&probe, byte).unwrap() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "qemu-io never locked"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        h
    }

    fn qemu_img(args: &[&str]) -> (bool, String) {
        let o = Command::new("qemu-img").args(args).output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    #[test]
    fn interop_with_qemu() {
        if !have("qemu-io") || !have("qemu-img") {
            assert!(
                std::env::var_os("CI").is_none(),
                "missing in CI: never skip there"
            );
            eprintln!("qemu-io/qemu-img not installed; skipping");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.qcow2");
        let (ok, err) = qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "1M"]);
        assert!(ok, "{err}");

        // qemu-io read-write holds the image: we can neither write nor read it.
        {
            let _h = qemu_io_holding(&[], &p, 101);
            let f = open(&p, true);
            let m = locked_msg(lock_image(&f, &p, false, false));
            assert!(m.starts_with("Failed to get \"write\" lock"), "{m}");
            let m = locked_msg(lock_image(&f, &p, true, false));
            assert!(m.starts_with("Failed to get shared \"write\" lock"), "{m}");
            retry_while_locked(|| lock_image(&f, &p, true, true)).unwrap();
        }
        // qemu-io read-only: we can read, not write.
        {
            let _h = qemu_io_holding(&["-r"], &p, 100);
            let f = open(&p, true);
            locked_msg(lock_image(&f, &p, false, false));
            retry_while_locked(|| lock_image(&f, &p, true, false)).unwrap();
        }
        // We hold it read-write: qemu-img refuses with the same text we produce.
        {
            let f = open(&p, true);
            retry_while_locked(|| lock_image(&f, &p, false, false)).unwrap();
            let ps = p.to_str().unwrap();
            let (ok, err) = qemu_img(&["check", ps]);
            assert!(!ok);
            assert_eq!(
                err,
                format!(
                    "qemu-img: Could not open '{ps}': {}\n",
                    conflict_message(&p, PERM_WRITE, true)
                )
            );
            let (ok, err) = qemu_img(&["resize", ps, "2M"]);
            assert!(!ok);
            assert_eq!(
                err,
                format!(
                    "qemu-img: Could not open '{ps}': {}\n",
                    conflict_message(&p, PERM_WRITE, false)
                )
            );
            let (ok, err) = qemu_img(&["info", "-U", ps]);
            assert!(ok, "{err}");
        }
        // We hold it read-only: qemu-img can read, cannot write.
        {
            let f = open(&p, false);
            retry_while_locked(|| lock_image(&f, &p, true, false)).unwrap();
            let ps = p.to_str().unwrap();
            let (ok, err) = qemu_img(&["check", ps]);
            assert!(ok, "{err}");
            let (ok, _) = qemu_img(&["resize", ps, "2M"]);
            assert!(!ok);
        }
        // Closed: free for everyone (retry: a concurrently forked child may briefly
        // hold a copy of our descriptor).
        let start = Instant::now();
        loop {
            let (ok, err) = qemu_img(&["resize", p.to_str().unwrap(), "2M"]);
            if ok {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(2), "{err}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
