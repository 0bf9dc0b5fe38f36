//! Firmware boot on /dev/kvm: SeaBIOS (Debian's bios.bin) boots a hand-made boot sector
//! from a compressed qcow2 under an overlay; the sector prints through int 10h (SeaBIOS's
//! serial console), reads sector 1 with int 13h (SeaBIOS's virtio-blk driver, so the read
//! goes through the engine) and prints it, then powers off. No Linux: this runs even where
//! /dev/kvm is emulated. Also the errors: a missing or malformed firmware file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::kvm::have_kvm;
use integration_tests::process::run;

const SEABIOS: &str = "/usr/share/seabios/bios.bin";

/// The boot sector's code, at 0x7c00 (assembled with GNU as, `.code16`):
/// ```text
///   cli; xor ax,ax; mov ds,ax; mov es,ax; mov ss,ax; mov sp,0x7c00; sti
///   mov si,msg1; call print
///   mov ax,0x0201; mov cx,2; xor dh,dh; mov bx,0x8000; int 0x13   ; sector 1 to 0:8000
///   jc fail
///   mov si,0x8000; call print
///   mov ax,[0x46c]; add ax,3                    ; wait 3 timer ticks, in which SeaBIOS
/// wait: sti; hlt; cmp [0x46c],ax; jb wait       ; sends the console's last characters
///   mov dx,0x600; mov al,0x34; out dx,al        ; vmm's ACPI S5 (SLP_TYP 5 | SLP_EN)
///   mov dx,0x604; mov ax,0x2000; out dx,ax      ; QEMU's PIIX4 S5
/// halt: hlt; jmp halt
/// fail: mov si,msgf; call print; jmp halt
/// print: lodsb; test al,al; jz 1f; mov ah,0x0e; mov bx,7; int 0x10; jmp print; 1: ret
/// msg1: "vmm-mbr: boot sector runs\r\n\0"   msgf: "vmm-mbr: int13 failed\r\n\0"
/// ```
const BOOT_CODE: &[u8] = &[
    0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0xbc, 0x00, 0x7c, 0xfb, 0xbe, 0x5d, 0x7c,
    0xe8, 0x3b, 0x00, 0xb8, 0x01, 0x02, 0xb9, 0x02, 0x00, 0x30, 0xf6, 0xbb, 0x00, 0x80, 0xcd, 0x13,
    0x72, 0x24, 0xbe, 0x00, 0x80, 0xe8, 0x26, 0x00, 0xa1, 0x6c, 0x04, 0x83, 0xc0, 0x03, 0xfb, 0xf4,
    0x39, 0x06, 0x6c, 0x04, 0x72, 0xf8, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xba, 0x04, 0x06, 0xb8,
    0x00, 0x20, 0xef, 0xf4, 0xeb, 0xfd, 0xbe, 0x79, 0x7c, 0xe8, 0x02, 0x00, 0xeb, 0xf5, 0xac, 0x84,
    0xc0, 0x74, 0x09, 0xb4, 0x0e, 0xbb, 0x07, 0x00, 0xcd, 0x10, 0xeb, 0xf2, 0xc3,
];
const MSG_RUNS: &str = "vmm-mbr: boot sector runs\r\n";
const MSG_FAIL: &str = "vmm-mbr: int13 failed\r\n";
/// What sector 1 holds: the boot sector prints it after reading it with int 13h.
const SECTOR1: &str = "vmm-mbr: int13 read sector 1 through virtio-blk\r\n";

/// A 1 MiB disk: the boot sector (no partition table, no filesystem) and sector 1.
fn boot_sector_disk(dir: &Path) -> PathBuf {
    let mut d = vec![0u8; 1 << 20];
    let code = [
        BOOT_CODE,
        MSG_RUNS.as_bytes(),
        &[0],
        MSG_FAIL.as_bytes(),
        &[0],
    ]
    .concat();
    d[..code.len()].copy_from_slice(&code);
    d[510] = 0x55;
    d[511] = 0xaa;
    d[512..512 + SECTOR1.len()].copy_from_slice(SECTOR1.as_bytes());
    let raw = dir.join("mbr.raw");
    std::fs::write(&raw, &d).unwrap();
    let img = integration_tests::tools::img_bin();
    let base = dir.join("mbr.qcow2");
    let top = dir.join("top.qcow2");
    run(
        Command::new(&img)
            .args(["convert", "-c", "-O", "qcow2"])
            .arg(&raw)
            .arg(&base),
        Duration::from_secs(60),
    )
    .ok();
    run(
        Command::new(&img)
            .args(["create", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg(&top),
        Duration::from_secs(60),
    )
    .ok();
    top
}

fn have_seabios() -> bool {
    let ok = Path::new(SEABIOS).is_file();
    assert!(
        ok || !integration_tests::in_ci(),
        "{SEABIOS} is missing (CI is set, so this fails; fixtures/install-host-deps.sh installs seabios)"
    );
    if !ok {
        eprintln!("SKIPPED: {SEABIOS} is missing (apt-get install seabios)");
    }
    ok
}

/// Without `--kernel` or `--firmware`, a disk with a boot sector and no Linux boot entry
/// boots through the default firmware; `-bios` names it explicitly, as in QEMU.
#[test]
fn seabios_boots_a_boot_sector_from_qcow2() {
    if !have_seabios() || !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = boot_sector_disk(dir.path());
    // The software /dev/kvm runs SeaBIOS's POST in ~15 s; hardware in well under one.
    let o = run(
        Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(["-m", "128", "-nographic", "-hda"])
            .arg(&top),
        Duration::from_secs(300),
    );
    assert_eq!(o.code, Some(0), "{}", o.report());
    assert!(
        o.stderr.contains("no Linux boot entry found")
            && o.stderr
                .contains("booting its boot sector through /usr/share/seabios/bios.bin"),
        "{}",
        o.report()
    );
    let out = &o.stdout;
    let at = |s: &str| {
        out.find(s)
            .unwrap_or_else(|| panic!("'{}' missing:\n{}", s.trim(), o.report()))
    };
    // In this order: the firmware's banner, its boot message, then the boot sector's lines.
    let banner = at("SeaBIOS (version ");
    let booting = at("Booting from Hard Disk...");
    let runs = at(MSG_RUNS);
    let read = at(SECTOR1);
    assert!(banner < booting && booting < runs && runs < read, "{out}");
    assert!(!out.contains(MSG_FAIL), "{out}");
}

#[test]
fn missing_or_malformed_firmware_fails_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let small = dir.path().join("small.bin");
    std::fs::write(&small, vec![0u8; 1000]).unwrap();
    let cases = [
        (dir.path().join("none.bin"), "not found"),
        (small, "is 1000 bytes"),
        (dir.path().to_path_buf(), "not a regular file"),
    ];
    for (fw, want) in cases {
        let o = run(
            Command::new(env!("CARGO_BIN_EXE_vmm"))
                .arg("run")
                .arg("--firmware")
                .arg(&fw)
                .arg("--drive")
                .arg(format!("file={},format=raw", disk.display())),
            Duration::from_secs(60),
        );
        assert_eq!(o.code, Some(1), "{}", o.report());
        let err = o.stderr.trim();
        assert_eq!(err.lines().count(), 1, "{}", o.report());
        assert!(
            err.starts_with("vmm: firmware '") && err.contains(want),
            "{}",
            o.report()
        );
    }
    // An empty disk has neither a Linux entry nor a boot sector: an error, not a firmware
    // that would wait for a bootable device forever.
    let o = run(
        Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(["run", "--drive"])
            .arg(format!("file={},format=raw", disk.display())),
        Duration::from_secs(60),
    );
    assert_eq!(o.code, Some(1), "{}", o.report());
    assert!(
        o.stderr.contains("no Linux boot entry found") && o.stderr.contains("no BIOS boot sector"),
        "{}",
        o.report()
    );
}
