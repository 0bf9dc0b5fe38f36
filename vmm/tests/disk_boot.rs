//! `vmm run` without `--kernel`, end to end on /dev/kvm: a GPT disk whose ext4 root holds a
//! fake kernel (a few bytes of 64-bit code that print the first command-line byte) and a
//! grub.cfg, converted with `img convert -O qcow2 -c` and booted through an `img create -b`
//! overlay with QEMU's command line; the entry list, entry choice and the errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use integration_tests::fake_kernel::{bzimage, POWEROFF, PRINT_CMDLINE_BYTE};
use integration_tests::kvm::have_kvm;

fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn sh(cmd: &mut Command) {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The disk: partition 1 BIOS boot, partition 2 ext4 with two kernels and a grub.cfg whose
/// default is the second entry; as a compressed qcow2 under an overlay.
fn disk(dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("boot/grub")).unwrap();
    let k = bzimage(&[PRINT_CMDLINE_BYTE, POWEROFF].concat());
    std::fs::write(tree.join("boot/vmlinuz-a"), &k).unwrap();
    std::fs::write(tree.join("boot/vmlinuz-b"), &k).unwrap();
    std::fs::write(tree.join("boot/initrd-b"), b"07070100").unwrap();
    let uuid = "5a1e0c2d-6b7f-4e3a-9d8c-1f2e3d4c5b6a";
    let cfg = format!(
        "set default=1\n\
         menuentry 'A' {{ search --fs-uuid --set=root {uuid}\n linux /boot/vmlinuz-a Aroot=x }}\n\
         menuentry 'B' {{ search --fs-uuid --set=root {uuid}\n linux /boot/vmlinuz-b Broot=x\n initrd /boot/initrd-b }}\n"
    );
    std::fs::write(tree.join("boot/grub/grub.cfg"), cfg).unwrap();
    let raw = dir.join("disk.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    sh(Command::new(tool("sgdisk").unwrap())
        .args(["-n", "1:2048:+1M", "-t", "1:ef02", "-n", "2:4096:0"])
        .arg(&raw));
    sh(Command::new(tool("mkfs.ext4").unwrap())
        .args(["-q", "-F", "-U", uuid, "-d"])
        .arg(&tree)
        .arg("-E")
        .arg(format!("offset={}", 4096 * 512))
        .arg(&raw)
        .arg("16M"));
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let img = integration_tests::tools::img_bin();
    sh(Command::new(&img)
        .args(["convert", "-c", "-O", "qcow2"])
        .arg(&raw)
        .arg(&base));
    sh(Command::new(&img)
        .args(["create", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&top));
    top
}

fn need_tools() -> bool {
    for t in ["sgdisk", "mkfs.ext4"] {
        if tool(t).is_none() {
            assert!(
                !integration_tests::in_ci(),
                "{t} is missing (CI is set, so this fails; fixtures/install-host-deps.sh installs it)"
            );
            eprintln!("SKIPPED: {t} is missing");
            return false;
        }
    }
    true
}

#[test]
fn boots_the_disks_default_entry_with_qemu_options() {
    if !need_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = disk(dir.path());
    let top = top.to_str().unwrap();
    let list = vmm(&["run", "--list-boot-entries", "-hda", top]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert_eq!(list.status.code(), Some(0), "{list:?}");
    assert!(text.contains("0  A (grub.cfg, partition 2)"), "{text}");
    assert!(text.contains("1* B (grub.cfg, partition 2)"), "{text}");
    assert!(text.contains("initrd partition 2:/boot/initrd-b"), "{text}");
    let e = vmm(&["run", "--boot-entry", "C", "-hda", top]);
    let err = String::from_utf8_lossy(&e.stderr);
    assert_eq!(e.status.code(), Some(1), "{e:?}");
    assert!(
        err.trim().lines().count() == 2 && err.contains("no boot entry 'C'"),
        "{err}"
    );
    if !have_kvm() {
        return;
    }
    // The default entry (B), with its initrd; console=ttyS0 is added to its command line.
    let o = vmm(&[
        "run",
        "-m",
        "256",
        "-smp",
        "2",
        "-name",
        "t",
        "-hda",
        top,
        "-nographic",
    ]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "B\n", "{o:?}");
    let o = vmm(&[
        "run",
        "--boot-entry",
        "0",
        "--drive",
        &format!("file={top}"),
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "A\n", "{o:?}");
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    integration_tests::assert_qemu_check_clean(Path::new(top));
}

/// Both GPT headers damaged: one line naming the table and the CRCs, no panic.
#[test]
fn damaged_partition_table_fails_in_one_line() {
    if !need_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    disk(dir.path());
    let raw = dir.path().join("disk.raw");
    let mut d = std::fs::read(&raw).unwrap();
    let n = d.len();
    d[512 + 16] ^= 1;
    d[n - 512 + 16] ^= 1;
    std::fs::write(&raw, &d).unwrap();
    let o = vmm(&[
        "run",
        "--drive",
        &format!("file={},format=raw", raw.display()),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("damaged GPT partition table") && err.contains("header CRC mismatch"),
        "{err}"
    );
}

#[test]
fn disks_without_an_entry_fail_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.raw");
    std::fs::write(&empty, vec![0u8; 1 << 20]).unwrap();
    let o = vmm(&["run", "-hda", empty.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("vmm: disk '") && last.contains("no Linux boot entry found"),
        "{err}"
    );
    let o = vmm(&["run"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(1) && err.contains("nothing to boot"),
        "{o:?}"
    );
}
