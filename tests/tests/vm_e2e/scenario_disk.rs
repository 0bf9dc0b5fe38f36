//! Disk boot without `--kernel`: bootable disks built here from the guest kernel and
//! initramfs (no loop devices: sgdisk/sfdisk for the table, `mkfs.ext4 -d -E offset=` for
//! the root), each with one kind of boot configuration, converted with
//! `img convert -O qcow2 -c` and booted through an `img create -b` overlay with QEMU's command
//! line (`-m -smp -name -hda -nographic`). The guest mounts its root partition, writes a
//! file and powers off; the host finds the file with debugfs and `qemu-img check` is clean.
//! One disk has no Linux boot entry vmm reads but a BIOS bootloader (syslinux on FAT, from
//! Debian's package): it boots through SeaBIOS (`-bios`), and QEMU boots it the same way.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use integration_tests::{qemu_check, qemu_convert_raw, run, Rng};

use crate::fixtures::{fixtures, guest_initramfs, Bins};
use crate::images::make_overlay;
use crate::report::{expect_kv, finish, guest_ran, GUEST_SH_PRELUDE};
use crate::spec::{Drive, VmOutput, VmSpec, FIRMWARE_FILE};
use crate::tools::t;

/// Which bootable disk.
#[derive(Clone, Copy, Debug)]
pub enum Layout {
    /// GPT, partition 1 BIOS boot, partition 2 ext4 root with Debian-cloud-like grub.cfg.
    GptGrub,
    /// GPT, one ext4 partition with Boot Loader Specification entries.
    GptBls,
    /// MBR, one ext4 partition with extlinux.conf.
    MbrExtlinux,
    /// MBR with syslinux's boot code; partition 1 FAT (syslinux, kernel, initrd,
    /// syslinux.cfg), partition 2 the ext4 root: booted through SeaBIOS.
    MbrSyslinuxBios,
}

/// Size of the FAT partition, MiB.
const FAT_MIB: u64 = 32;

pub struct ScenarioDisk {
    pub layout: Layout,
    pub spec: VmSpec,
    /// The same guest (kernel, initramfs, script) booted with --kernel/--initrd from files,
    /// on its own overlay of the same disk: the time to compare the disk boot with.
    pub kernel_twin: Option<VmSpec>,
    overlay: String,
    /// Byte offset of the root filesystem in the disk.
    root_offset: u64,
    token: String,
}

/// The guest's command line in the boot entry: no console= (vmm adds console=ttyS0).
const ENTRY_CMDLINE: &str = "ro quiet panic=-1 reboot=k printk.devkmsg=on";
const KVER: &str = "6.1.0-e2e-cloud-amd64";
const FS_UUID: &str = "9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d";

fn name(layout: Layout) -> &'static str {
    match layout {
        Layout::GptGrub => "disk-gpt-grub",
        Layout::GptBls => "disk-gpt-bls",
        Layout::MbrExtlinux => "disk-mbr-extlinux",
        Layout::MbrSyslinuxBios => "disk-mbr-syslinux-bios",
    }
}

/// Build the disk for `layout` in `dir` (the images directory) and its spec.
pub fn scenario_disk(
    layout: Layout,
    dir: &Path,
    work: &Path,
    rng: &mut Rng,
    bins: &Bins,
) -> Result<ScenarioDisk, String> {
    let name = name(layout);
    let token = format!("{:016x}", rng.next_u64());
    let part = match layout {
        Layout::GptGrub | Layout::MbrSyslinuxBios => 2,
        _ => 1,
    };
    let mut sh = String::from(GUEST_SH_PRELUDE);
    sh.push_str(&format!(
        "r cmdline \"$(cat /proc/cmdline)\"\n\
         timeout 60 mount -t ext4 /dev/vda{part} /mnt; r mount \"rc=$?\"\n\
         r kernel_there \"$(ls /mnt/boot/vmlinuz-{KVER})\"\n\
         echo 'disk boot {token}' > /mnt/guest.txt; r write \"rc=$?\"\n\
         sync; timeout 60 umount /mnt; r umount \"rc=$?\"\n"
    ));
    let spec = VmSpec {
        name: name.into(),
        cpus: 2,
        memory_mib: 256,
        drives: vec![Drive {
            file: format!("{name}.qcow2"),
            readonly: false,
            snapshot: false,
        }],
        test_sh: sh,
        data: vec![],
        env: vec![],
        disk_boot: true,
        net: None,
        firmware: matches!(layout, Layout::MbrSyslinuxBios),
        kill_after: None,
    };
    let initrd = guest_initramfs(&spec, work)?;
    let tree = work.join(format!("{name}-tree"));
    fs::create_dir_all(tree.join("boot")).unwrap();
    let copy = |from: &Path, to: &str| {
        fs::copy(from, tree.join(to)).map_err(|e| format!("copy to {to}: {e}"))
    };
    copy(&fixtures()?.kernel, &format!("boot/vmlinuz-{KVER}"))?;
    copy(&initrd, &format!("boot/initrd.img-{KVER}"))?;
    let put = |rel: &str, text: String| {
        let p = tree.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    };
    match layout {
        Layout::GptGrub => put(
            "boot/grub/grub.cfg",
            format!(
                "set default=\"0\"\n\
                 if [ x\"${{feature_menuentry_id}}\" = xy ]; then\n  menuentry_id_option=\"--id\"\n\
                 else\n  menuentry_id_option=\"\"\nfi\n\
                 menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple-{FS_UUID}' {{\n\
                 \tinsmod part_gpt\n\tinsmod ext2\n\tset root='hd0,gpt{part}'\n\
                 \tsearch --no-floppy --fs-uuid --set=root {FS_UUID}\n\
                 \techo 'Loading Linux {KVER} ...'\n\
                 \tlinux\t/boot/vmlinuz-{KVER} root=UUID={FS_UUID} {ENTRY_CMDLINE}\n\
                 \tinitrd\t/boot/initrd.img-{KVER}\n}}\n\
                 menuentry 'rescue' {{\n\tlinux /boot/missing single\n}}\n"
            ),
        ),
        Layout::GptBls => {
            put(
                "loader/entries/e2e-old.conf",
                format!("title Old\nversion 5.10.0\nlinux /boot/missing\noptions {ENTRY_CMDLINE}\n"),
            );
            put(
                "loader/entries/e2e.conf",
                format!(
                    "title Debian BLS\nversion {KVER}\nlinux /boot/vmlinuz-{KVER}\n\
                     initrd /boot/initrd.img-{KVER}\noptions root=UUID={FS_UUID}\noptions {ENTRY_CMDLINE}\n"
                ),
            );
        }
        Layout::MbrExtlinux => put(
            "boot/extlinux/extlinux.conf",
            format!(
                "DEFAULT debian\nTIMEOUT 0\nLABEL debian\n  MENU LABEL Debian extlinux\n\
                 \x20 LINUX ../vmlinuz-{KVER}\n  INITRD /boot/initrd.img-{KVER}\n\
                 \x20 APPEND root=/dev/vda1 {ENTRY_CMDLINE}\n"
            ),
        ),
        // Its boot files are on the FAT partition (below).
        Layout::MbrSyslinuxBios => {}
    }
    let fs_mib = 64;
    let raw = work.join(format!("{name}.raw"));
    fs::File::create(&raw)
        .and_then(|f| f.set_len((fs_mib + 4 + FAT_MIB) << 20))
        .map_err(|e| e.to_string())?;
    let root_start: u64 = match layout {
        Layout::GptGrub => {
            run(
                Command::new(t("sgdisk"))
                    .args(["-n", "1:2048:+1M", "-t", "1:ef02", "-n", "2:4096:0"])
                    .arg(&raw),
                Duration::from_secs(60),
            )
            .check()?;
            4096
        }
        Layout::GptBls => {
            run(
                Command::new(t("sgdisk")).args(["-n", "1:2048:0"]).arg(&raw),
                Duration::from_secs(60),
            )
            .check()?;
            2048
        }
        Layout::MbrExtlinux | Layout::MbrSyslinuxBios => {
            let (table, start) = match layout {
                Layout::MbrExtlinux => ("label: dos\nstart=2048, type=83\n".to_string(), 2048),
                _ => {
                    let root = 2048 + FAT_MIB * 2048;
                    let t = format!(
                        "label: dos\nstart=2048, size={}, type=6, bootable\nstart={root}, type=83\n",
                        FAT_MIB * 2048
                    );
                    (t, root)
                }
            };
            let mut c = Command::new(t("sfdisk"))
                .arg("-q")
                .arg(&raw)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| format!("sfdisk: {e}"))?;
            c.stdin
                .take()
                .unwrap()
                .write_all(table.as_bytes())
                .map_err(|e| e.to_string())?;
            if !c.wait().map_err(|e| e.to_string())?.success() {
                return Err("sfdisk failed".into());
            }
            start
        }
    };
    if let Layout::MbrSyslinuxBios = layout {
        syslinux_fat(
            &raw,
            &tree,
            work,
            &format!("root=/dev/vda2 {ENTRY_CMDLINE}"),
        )?;
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        fs::copy(SEABIOS, dir.join(FIRMWARE_FILE)).map_err(|e| format!("copy {SEABIOS}: {e}"))?;
    }
    let root_offset = root_start * 512;
    run(
        Command::new(t("mkfs.ext4"))
            .args(["-q", "-F", "-b", "4096", "-U", FS_UUID, "-d"])
            .arg(&tree)
            .arg("-E")
            .arg(format!("offset={root_offset}"))
            .arg(&raw)
            .arg(format!("{fs_mib}M")),
        Duration::from_secs(120),
    )
    .check()?;
    let base = format!("{name}-base.qcow2");
    let o = run(
        Command::new(&bins.img)
            .args(["convert", "-c", "-O", "qcow2"])
            .arg(&raw)
            .arg(dir.join(&base)),
        Duration::from_secs(300),
    );
    if !o.success() {
        return Err(format!("img convert -c failed:\n{}", o.report()));
    }
    let overlay = format!("{name}.qcow2");
    make_overlay(dir, &base, &overlay, Some(&bins.img))?;
    let kernel_twin = match layout {
        Layout::GptGrub => {
            let file = format!("{name}-kernel.qcow2");
            make_overlay(dir, &base, &file, Some(&bins.img))?;
            Some(VmSpec {
                name: format!("{name}-kernel"),
                drives: vec![Drive {
                    file,
                    readonly: false,
                    snapshot: false,
                }],
                test_sh: spec.test_sh.clone(),
                disk_boot: false,
                net: None,
                firmware: false,
                kill_after: None,
                ..spec_shape(&spec)
            })
        }
        _ => None,
    };
    Ok(ScenarioDisk {
        layout,
        spec,
        kernel_twin,
        overlay,
        root_offset,
        token,
    })
}

/// Debian's bios.bin (the seabios package), which vmm and QEMU boot the BIOS disk with.
pub const SEABIOS: &str = "/usr/share/seabios/bios.bin";

/// Make partition 1 of `raw` (at 1 MiB, [`FAT_MIB`]) a FAT volume that syslinux boots: the
/// kernel and initrd of `tree`'s /boot, a syslinux.cfg printing on the serial console with
/// `append` for the kernel; and syslinux's MBR code in sector 0. With mtools only (no loop
/// devices), from Debian's syslinux packages (fixtures/fetch-guest.sh).
fn syslinux_fat(raw: &Path, tree: &Path, work: &Path, append: &str) -> Result<(), String> {
    let f = fixtures()?;
    let fat = work.join("syslinux-fat.img");
    let _ = fs::remove_file(&fat);
    run(
        Command::new(t("mkfs.vfat"))
            .args(["-C", "-n", "VMMBOOT"])
            .arg(&fat)
            .arg((FAT_MIB * 1024).to_string()),
        Duration::from_secs(60),
    )
    .check()?;
    let cfg = work.join("syslinux.cfg");
    fs::write(
        &cfg,
        format!(
            "SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\n\
             LABEL linux\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND console=ttyS0 {append}\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let boot = tree.join("boot");
    let kernel = boot.join(format!("vmlinuz-{KVER}"));
    let initrd = boot.join(format!("initrd.img-{KVER}"));
    for (from, to) in [
        (&kernel, "::/vmlinuz"),
        (&initrd, "::/initrd.img"),
        (&cfg, "::/syslinux.cfg"),
    ] {
        run(
            Command::new(t("mcopy"))
                .arg("-i")
                .arg(&fat)
                .arg(from)
                .arg(to),
            Duration::from_secs(60),
        )
        .check()?;
    }
    run(
        Command::new(&f.syslinux).arg("--install").arg(&fat),
        Duration::from_secs(60),
    )
    .check()?;
    let image = fs::read(&fat).map_err(|e| e.to_string())?;
    let mbr = fs::read(&f.syslinux_mbr).map_err(|e| e.to_string())?;
    if mbr.len() > 440 {
        return Err(format!(
            "{}: {} bytes, more than 440",
            f.syslinux_mbr.display(),
            mbr.len()
        ));
    }
    use std::os::unix::fs::FileExt;
    let disk = fs::OpenOptions::new()
        .write(true)
        .open(raw)
        .map_err(|e| e.to_string())?;
    disk.write_all_at(&image, 1 << 20)
        .and_then(|_| disk.write_all_at(&mbr, 0))
        .map_err(|e| format!("{}: {e}", raw.display()))
}

/// A spec with `s`'s machine shape and nothing else.
fn spec_shape(s: &VmSpec) -> VmSpec {
    VmSpec {
        name: String::new(),
        cpus: s.cpus,
        memory_mib: s.memory_mib,
        drives: vec![],
        test_sh: String::new(),
        data: vec![],
        env: vec![],
        disk_boot: false,
        net: None,
        firmware: false,
        kill_after: None,
    }
}

/// The guest booted from the disk's entry (its command line, with console=ttyS0 added),
/// wrote its file, and the host reads it back from the overlay.
pub fn check_disk(
    s: &ScenarioDisk,
    out: &VmOutput,
    images: &Path,
    work: &Path,
) -> Result<(), String> {
    let rep = guest_ran(out)?;
    let mut errs = vec![];
    if let Layout::MbrSyslinuxBios = s.layout {
        // Firmware and bootloader print on the serial console, in this order.
        let marks = ["SeaBIOS (version ", "Booting from Hard Disk", "SYSLINUX 6"];
        let at: Vec<Option<usize>> = marks.iter().map(|m| out.console.find(m)).collect();
        if at.iter().any(Option::is_none) || at.windows(2).any(|w| w[0] > w[1]) {
            errs.push(format!(
                "console lacks, in order, {marks:?} (found at {at:?})"
            ));
        }
    }
    match rep.get("cmdline") {
        Ok(c) if c.contains(ENTRY_CMDLINE) && c.contains("console=ttyS0") => {}
        Ok(c) => errs.push(format!(
            "guest command line '{c}' is not the entry's + console=ttyS0"
        )),
        Err(e) => errs.push(e),
    }
    for k in ["mount", "write", "umount"] {
        expect_kv(&rep, k, "rc=0", &mut errs);
    }
    expect_kv(
        &rep,
        "kernel_there",
        &format!("/mnt/boot/vmlinuz-{KVER}"),
        &mut errs,
    );
    if out.rc != Some(0) {
        errs.push(format!("vmm exit code {:?}, expected 0", out.rc));
    }
    let img = images.join(&s.overlay);
    if let Err(e) = qemu_check(&img) {
        errs.push(e);
    }
    let raw = work.join(format!("{}-after.raw", s.spec.name));
    match qemu_convert_raw(&img, None, &raw) {
        Err(e) => errs.push(e),
        Ok(_) => {
            let cat = run(
                Command::new(t("debugfs"))
                    .args(["-R", "cat /guest.txt"])
                    .arg(format!("{}?offset={}", raw.display(), s.root_offset)),
                Duration::from_secs(60),
            );
            let want = format!("disk boot {}\n", s.token);
            if cat.stdout != want {
                errs.push(format!(
                    "debugfs cat /guest.txt: got {:?}, want {want:?} ({})",
                    cat.stdout,
                    cat.stderr.trim()
                ));
            }
        }
    }
    finish(&format!("disk boot ({})", s.spec.name), errs, out)
}
