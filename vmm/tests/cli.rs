//! The `vmm` binary end to end, with a fake bzImage whose "kernel" is a few bytes of
//! 64-bit code: boot protocol, serial to stdout, exit status of each way to stop, and the
//! one-line errors.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use integration_tests::fake_kernel::{bzimage, CRASH, POWEROFF, PRINT_CMDLINE_BYTE, RESET, SPIN};
use integration_tests::kvm::have_kvm;

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-cli-{}-{name}", std::process::id()))
}

/// A fake bzImage (see `fake_kernel`) that prints the first command-line byte, then runs
/// `tail`.
fn fake_bzimage(name: &str, tail: &[u8]) -> PathBuf {
    let p = tmp(name);
    std::fs::write(&p, bzimage(&[PRINT_CMDLINE_BYTE, tail].concat())).unwrap();
    p
}

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn one_error_line(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(e.starts_with("vmm: "), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(!e.contains("panicked"), "{e}");
    e
}

#[test]
fn poweroff_reboot_and_crash() {
    if !have_kvm() {
        return;
    }
    let disk = tmp("disk");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let drive = format!("file={},format=raw", disk.display());
    for (name, tail, ok) in [
        ("off", POWEROFF, true),
        ("reset", RESET, true),
        ("crash", CRASH, false),
    ] {
        let k = fake_bzimage(name, tail);
        let o = vmm(&[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--append",
            "Zconsole=ttyS0",
            "--memory",
            "128M",
            "--cpus",
            "2",
            "--drive",
            &drive,
        ]);
        assert_eq!(String::from_utf8_lossy(&o.stdout), "Z\n", "{name}: {o:?}");
        if ok {
            assert_eq!(o.status.code(), Some(0), "{name}: {o:?}");
        } else {
            one_error_line(&o);
        }
        std::fs::remove_file(&k).unwrap();
    }
    std::fs::remove_file(&disk).unwrap();
}

#[test]
fn errors_are_one_line() {
    let e = one_error_line(&vmm(&["run", "--kernel", "/nonexistent/bzImage"]));
    assert!(e.contains("/nonexistent/bzImage"), "{e}");
    let not_kernel = tmp("notkernel");
    std::fs::write(&not_kernel, b"hello").unwrap();
    let nk = not_kernel.to_str().unwrap();
    if have_kvm() {
        one_error_line(&vmm(&["run", "--kernel", nk]));
        let k = fake_bzimage("small", POWEROFF);
        let e = one_error_line(&vmm(&[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--drive",
            "file=/nonexistent/disk.img",
        ]));
        assert!(e.contains("/nonexistent/disk.img"), "{e}");
        std::fs::remove_file(&k).unwrap();
    }
    one_error_line(&vmm(&["run", "--kernel", nk, "--memory", "1000000G"]));
    one_error_line(&vmm(&[
        "run",
        "--kernel",
        nk,
        "--drive",
        "file=x,cache=maybe",
    ]));
    one_error_line(&vmm(&["run", "--kernel", nk, "--cpus", "0"]));
    std::fs::remove_file(&not_kernel).unwrap();
}

/// Usage errors (unknown flag or subcommand, missing or malformed value) are one line too,
/// with exit 1, while `--help` and `--version` print normally and exit 0.
#[test]
fn usage_errors_are_one_line() {
    for (args, mention) in [
        (&["run", "--foo"][..], "--foo"),
        (&["run", "--kernel"], "--kernel"),
        (&["bogus"], "bogus"),
    ] {
        let e = one_error_line(&vmm(args));
        assert!(e.contains(mention) && e.contains("--help"), "{args:?}: {e}");
    }
    for args in [&["--help"][..], &["run", "--help"], &["--version"]] {
        let o = vmm(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {o:?}");
        assert!(
            o.stderr.is_empty() && !o.stdout.is_empty(),
            "{args:?}: {o:?}"
        );
    }
}

/// `vmm` with a time limit: Err when it was still running at `secs` (then killed).
fn vmm_within(args: &[&str], secs: u64) -> Result<Output, String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed().as_secs() >= secs {
            child.kill().unwrap();
            let o = child.wait_with_output().unwrap();
            return Err(format!("still running after {secs}s: {o:?}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(child.wait_with_output().unwrap())
}

/// Boot files that used to hang vmm: a FIFO as --initrd (or --kernel) is refused without
/// waiting for a writer; a huge sparse --kernel is refused from its size, and a bzImage
/// header promising more than the file holds from the header, without reading the file.
#[test]
fn fifo_and_huge_boot_files_fail_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let fifo = fifo.to_str().unwrap();
    let k = fake_bzimage("fifo-kernel", POWEROFF);
    let kernel = k.to_str().unwrap();
    let huge = |name: &str, size: u64, head: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, head).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(size)
            .unwrap();
        p.to_str().unwrap().to_string()
    };
    let t10 = huge("10t", 10 << 40, b"");
    let g3 = huge("3g", 3 << 30, b"");
    // A bzImage header with syssize = 2^32-1 paragraphs in a 900 MiB sparse file.
    let mut head = bzimage(POWEROFF);
    head[0x1f4..0x1f8].copy_from_slice(&u32::MAX.to_le_bytes());
    let liar = huge("liar", 900 << 20, &head);
    for (args, mention) in [
        (
            vec!["run", "--kernel", kernel, "--initrd", fifo],
            "not a regular file",
        ),
        (vec!["run", "--kernel", fifo], "not a regular file"),
        (vec!["run", "--kernel", &t10], "larger than any kernel"),
        (vec!["run", "--kernel", &g3], "larger than any kernel"),
        (vec!["run", "--kernel", &liar], "truncated bzImage"),
    ] {
        let t0 = std::time::Instant::now();
        let o = vmm_within(&args, 10).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let e = one_error_line(&o);
        assert!(e.contains(mention), "{args:?}: {e}");
        assert!(
            t0.elapsed().as_secs() < 3,
            "{args:?} took {:?}",
            t0.elapsed()
        );
    }
    std::fs::remove_file(&k).unwrap();
}

/// One message, naming the real range, for every bad vCPU count.
#[test]
fn cpu_count_errors_name_the_range() {
    for n in ["0", "65", "1000", "x"] {
        let e = one_error_line(&vmm(&["run", "--kernel", "/nonexistent", "--cpus", n]));
        assert!(
            e.contains(&format!("invalid CPU count '{n}'")) && e.contains("1 to 64"),
            "{n}: {e}"
        );
    }
}

/// QEMU's options: an unsupported one is refused in one line naming it; `-hda` is a disk,
/// never `-h` (help, exit 0).
#[test]
fn qemu_options_refused_by_name() {
    for (args, mention) in [
        (&["run", "-vnc", ":1"][..], "-vnc"),
        (&["run", "-net", "nic"], "-net"),
        (&["run", "-cdrom", "x.iso"], "-cdrom"),
        (&["run", "-device", "e1000"], "-device"),
        (&["run", "-smp", "0"], "-smp 0"),
        (
            &["run", "-smp", "1000", "-kernel", "/nonexistent"],
            "'1000'",
        ),
        (&["run", "-drive", "file=x,if=scsi"], "if=scsi"),
        (&["run", "-boot", "order=n"], "-boot order=n"),
    ] {
        let e = one_error_line(&vmm(args));
        assert!(e.contains(mention), "{args:?}: {e}");
    }
    for args in [
        &[
            "run",
            "-hda",
            "/nonexistent/disk.qcow2",
            "-kernel",
            "/nonexistent/k",
        ][..],
        // Without `run`, as qemu-kvm is typed.
        &["-hda", "/nonexistent/disk.qcow2"],
        &["-m", "256", "-hda", "/nonexistent/disk.qcow2"],
    ] {
        let o = vmm(args);
        assert_eq!(o.status.code(), Some(1), "{o:?}");
        assert!(o.stdout.is_empty(), "help printed: {o:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("/nonexistent/"), "{args:?}: {e}");
    }
}

/// The command line a qemu-kvm user types boots (a fake kernel here): memory, CPUs, name,
/// an IDE disk (served as virtio-blk, said once on stderr), and the options vmm always
/// behaves as.
#[test]
fn qemu_command_line_boots() {
    if !have_kvm() {
        return;
    }
    let disk = tmp("qemu-disk");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk2 = tmp("qemu-disk2");
    std::fs::write(&disk2, vec![0u8; 1 << 20]).unwrap();
    let k = fake_bzimage("qemu-kernel", POWEROFF);
    let o = vmm(&[
        "run",
        "-enable-kvm",
        "-m",
        "256",
        "-smp",
        "2,sockets=1,cores=2,threads=1",
        "-name",
        "t",
        "-cpu",
        "host",
        "-hda",
        disk.to_str().unwrap(),
        "-drive",
        &format!(
            "file={},format=raw,if=virtio,cache=writethrough,snapshot=on",
            disk2.display()
        ),
        "-nographic",
        "-serial",
        "stdio",
        "-kernel",
        k.to_str().unwrap(),
        "-append",
        "Qconsole=ttyS0",
    ]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "Q\n", "{o:?}");
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("virtio-blk"), "{e}");
    std::fs::remove_file(&k).unwrap();
    std::fs::remove_file(&disk).unwrap();
    std::fs::remove_file(&disk2).unwrap();
}

/// `--help` says what a bare --memory number means.
#[test]
fn help_says_memory_is_mib() {
    let o = vmm(&["run", "--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("a bare number is MiB"), "{help}");
}

#[test]
fn image_in_use() {
    if !have_kvm() {
        return;
    }
    let disk = tmp("inuse");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let drive = format!("file={},format=raw", disk.display());
    // Hold the image with a guest that never stops, then try a second VM on it.
    let k = fake_bzimage("spin", SPIN);
    let mut first = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args([
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--append",
            "x",
            "--drive",
            &drive,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it printed (so the image is open).
    use std::io::Read;
    let mut b = [0u8; 1];
    first.stdout.as_mut().unwrap().read_exact(&mut b).unwrap();
    let e = one_error_line(&vmm(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--drive",
        &drive,
    ]));
    assert!(e.to_lowercase().contains("lock"), "{e}");
    // SIGTERM stops the first one cleanly.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    let st = first.wait().unwrap();
    assert_eq!(st.code(), Some(0));
    std::fs::remove_file(&k).unwrap();
    std::fs::remove_file(&disk).unwrap();
}

/// A pseudo-terminal: (master, slave).
fn pty() -> (std::fs::File, std::fs::File) {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::FromRawFd;
    // SAFETY: plain libc pty calls; the master descriptor is owned by the File made from it.
    let (master, name) = unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(m >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        assert_eq!(libc::grantpt(m), 0);
        assert_eq!(libc::unlockpt(m), 0);
        let name = std::ffi::CStr::from_ptr(libc::ptsname(m));
        (
            std::fs::File::from_raw_fd(m),
            name.to_str().unwrap().to_string(),
        )
    };
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(name)
        .unwrap();
    (master, slave)
}

/// The modes of a terminal.
fn term_modes(f: &std::fs::File) -> [libc::tcflag_t; 4] {
    use std::os::unix::io::AsRawFd;
    // SAFETY: tcgetattr fills the termios we pass for a valid terminal descriptor.
    let t = unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(f.as_raw_fd(), &mut t), 0);
        t
    };
    [t.c_iflag, t.c_oflag, t.c_cflag, t.c_lflag]
}

/// With a terminal on stdin, vmm runs it in raw mode and gives it back as it found it on
/// every way out: Ctrl-A x, guest poweroff, guest crash, SIGTERM and SIGQUIT.
#[test]
fn terminal_is_raw_while_running_and_restored_on_exit() {
    if !have_kvm() {
        return;
    }
    use std::io::{Read, Write};
    // (case, guest code after printing, how the test ends it, expected exit code)
    let cases: [(&str, &[u8], Option<i32>, i32); 5] = [
        ("ctrl-a x", SPIN, None, 0),
        ("poweroff", POWEROFF, None, 0),
        ("crash", CRASH, None, 1),
        ("sigterm", SPIN, Some(libc::SIGTERM), 0),
        ("sigquit", SPIN, Some(libc::SIGQUIT), 128 + libc::SIGQUIT),
    ];
    for (name, tail, signal, code) in cases {
        let (mut master, slave) = pty();
        let before = term_modes(&slave);
        let k = fake_bzimage(&format!("tty-{}", name.replace(' ', "-")), tail);
        let mut child = Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(["run", "--kernel", k.to_str().unwrap(), "--append", "t"])
            .stdin(slave.try_clone().unwrap())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The guest printed: the terminal was made raw before it started.
        let mut first = [0u8; 1];
        child
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut first)
            .unwrap();
        if tail == SPIN {
            let during = term_modes(&slave);
            assert_eq!(during[3] & libc::ICANON, 0, "{name}: not raw while running");
            match signal {
                Some(sig) => {
                    // SAFETY: signalling our own child.
                    unsafe { libc::kill(child.id() as i32, sig) };
                }
                None => master.write_all(b"\x01x").unwrap(),
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{name}: vmm did not exit");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(code), "{name}");
        assert_eq!(term_modes(&slave), before, "{name}: terminal not restored");
        std::fs::remove_file(&k).unwrap();
    }
}

/// A minimal ELF64 "vmlinux" with a PVH entry note: 32-bit code checks the start-info
/// magic in `ebx`, prints `P` if it matches, then powers off.
fn fake_pvh_elf(name: &str) -> PathBuf {
    let mut f = vec![0u8; 0x1000];
    f[..16].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut put = |off: usize, v: &[u8]| f[off..off + v.len()].copy_from_slice(v);
    put(16, &2u16.to_le_bytes()); // ET_EXEC
    put(18, &0x3eu16.to_le_bytes()); // x86-64
    put(20, &1u32.to_le_bytes());
    put(24, &0x10_0000u64.to_le_bytes()); // e_entry
    put(32, &64u64.to_le_bytes()); // e_phoff
    put(52, &64u16.to_le_bytes()); // e_ehsize
    put(54, &56u16.to_le_bytes()); // e_phentsize
    put(56, &2u16.to_le_bytes()); // e_phnum
    put(58, &64u16.to_le_bytes()); // e_shentsize
    let check_magic: &[u8] = &[
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0x8b, 0x03, // mov eax, [ebx]
        0x3d, 0x78, 0xc5, 0x6e, 0x33, // cmp eax, XEN_HVM_START_MAGIC_VALUE
        0x75, 0x03, // jne +3
        0xb0, b'P', 0xee, // mov al, 'P'; out dx, al
        0xb0, b'\n', 0xee, // newline
    ];
    let code = [check_magic, POWEROFF].concat();
    // PT_LOAD
    let mut ph = Vec::new();
    ph.extend_from_slice(&1u32.to_le_bytes());
    ph.extend_from_slice(&5u32.to_le_bytes());
    for v in [
        0x1000u64,
        0x10_0000,
        0x10_0000,
        code.len() as u64,
        code.len() as u64,
        0x1000,
    ] {
        ph.extend_from_slice(&v.to_le_bytes());
    }
    // PT_NOTE
    ph.extend_from_slice(&4u32.to_le_bytes());
    ph.extend_from_slice(&4u32.to_le_bytes());
    for v in [0x200u64, 0, 0, 20, 20, 4] {
        ph.extend_from_slice(&v.to_le_bytes());
    }
    put(64, &ph);
    // Note: namesz 4, descsz 4, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), "Xen\0", entry.
    let mut note = Vec::new();
    for v in [4u32, 4, 18] {
        note.extend_from_slice(&v.to_le_bytes());
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&0x10_0000u32.to_le_bytes());
    put(0x200, &note);
    f.extend(code);
    let p = tmp(name);
    std::fs::write(&p, f).unwrap();
    p
}

#[test]
fn pvh_elf_kernel() {
    if !have_kvm() {
        return;
    }
    let k = fake_pvh_elf("pvh");
    let o = vmm(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--append",
        "console=ttyS0",
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "P\n", "{o:?}");
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    std::fs::remove_file(&k).unwrap();
}

/// Without /dev/kvm, or without permission to open it, vmm says which in one line. Needs
/// root (to drop to another user, and to hide /dev in a private mount namespace); CI runs
/// as root, so there a missing privilege fails the test.
#[test]
fn no_kvm_or_no_permission() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root || std::env::var_os("CI").is_none(),
        "CI must run as root"
    );
    if !root {
        eprintln!("SKIPPED: not root");
        return;
    }
    // A kernel vmm accepts, so that the check reached is the one of /dev/kvm.
    let kernel = tmp("perm-kernel");
    std::fs::write(&kernel, bzimage(POWEROFF)).unwrap();
    let k = kernel.to_str().unwrap();
    let bin = env!("CARGO_BIN_EXE_vmm");
    let run = |cmd: &mut Command| cmd.stdin(Stdio::null()).output().unwrap();
    // As an unprivileged user (/dev/kvm is root-only here, or that user is not in its group).
    let o = run(Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            bin,
            "run",
        ])
        .args(["--kernel", k]));
    let e = one_error_line(&o);
    assert!(e.contains("no permission to open /dev/kvm"), "{e}");
    // With an empty /dev.
    let o = run(Command::new("unshare").args([
        "-m",
        "sh",
        "-c",
        r#"mount -t tmpfs none /dev && exec "$0" run --kernel "$1""#,
        bin,
        k,
    ]));
    let e = one_error_line(&o);
    assert!(e.contains("/dev/kvm not found"), "{e}");
    std::fs::remove_file(&kernel).unwrap();
}
