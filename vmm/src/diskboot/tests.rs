//! Disk boot on real disks: partition tables written by sgdisk and sfdisk, ext4 filesystems
//! by `mkfs.ext4 -d` (no loop devices), qcow2 by qemu-img, read through the engine; and
//! hostile disks (damaged tables, randomly corrupted ext4) that must fail cleanly.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::open::{open_image, OpenOptions};
use common::BlockDriver;

use super::DiskBoot;

/// A missing tool: a failure in CI, a skip elsewhere.
macro_rules! need_tools {
    ($($t:expr),*) => {
        for t in [$($t),*] {
            if tool(t).is_none() {
                assert!(!integration_tests::in_ci(), "{t} is missing (CI is set, so this fails; fixtures/install-host-deps.sh installs it)");
                eprintln!("SKIPPED: {t} is missing (fixtures/install-host-deps.sh)");
                return;
            }
        }
    };
}

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

fn tool_cmd(name: &str) -> Command {
    Command::new(tool(name).unwrap_or_else(|| name.into()))
}

/// `mkfs.ext4 -d tree` into `disk` at byte `offset`, `mib` MiB, with filesystem UUID `uuid`.
fn mkfs(disk: &Path, offset: u64, mib: u64, uuid: &str, tree: &Path) {
    mkfs_with(disk, offset, mib, uuid, tree, &[]);
}

fn mkfs_with(disk: &Path, offset: u64, mib: u64, uuid: &str, tree: &Path, extra: &[&str]) {
    sh(tool_cmd("mkfs.ext4")
        .args(["-q", "-F", "-U", uuid])
        .args(extra)
        .arg("-d")
        .arg(tree)
        .arg("-E")
        .arg(format!("offset={offset}"))
        .arg(disk)
        .arg(format!("{mib}M")));
}

fn open(path: &Path) -> Arc<dyn BlockDriver> {
    let opts = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    Arc::from(open_image(path, &opts).unwrap().into_driver())
}

fn write(tree: &Path, rel: &str, data: &[u8]) {
    let p = tree.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

fn bytes(seed: u64, n: usize) -> Vec<u8> {
    integration_tests::Rng::new(seed).bytes(n)
}

const UUID2: &str = "0d2c6f1e-8f2a-4d7b-9e1c-3a5b7c9d1e2f";

/// A GPT disk like Debian's cloud images: partition 1 empty (BIOS boot), partition 2 an
/// ext4 root with /boot/grub/grub.cfg that finds its root by `search --fs-uuid`.
fn debian_like_gpt(dir: &Path, kernel: &[u8], initrd: &[u8]) -> PathBuf {
    debian_like_gpt_with(dir, kernel, initrd, 40, &[])
}

/// [`debian_like_gpt`] with a root of `mib` MiB made with `mkfs_args`.
fn debian_like_gpt_with(
    dir: &Path,
    kernel: &[u8],
    initrd: &[u8],
    mib: u64,
    mkfs_args: &[&str],
) -> PathBuf {
    let tree = dir.join("tree");
    write(&tree, "boot/vmlinuz-6.1.0-9-cloud-amd64", kernel);
    write(&tree, "boot/initrd.img-6.1.0-9-cloud-amd64", initrd);
    let cfg = format!(
        "set default=\"0\"\n\
         menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple-{UUID2}' {{\n\
         \tinsmod part_gpt\n\tset root='hd0,gpt1'\n\
         \tsearch --no-floppy --fs-uuid --set=root {UUID2}\n\
         \tlinux\t/boot/vmlinuz-6.1.0-9-cloud-amd64 root=PARTUUID=x ro console=tty0 quiet\n\
         \tinitrd\t/boot/initrd.img-6.1.0-9-cloud-amd64\n}}\n"
    );
    write(&tree, "boot/grub/grub.cfg", cfg.as_bytes());
    let disk = dir.join(format!("gpt-{mib}.raw"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len((mib + 8) << 20)
        .unwrap();
    sh(tool_cmd("sgdisk")
        .args(["-n", "1:2048:+1M", "-t", "1:ef02"])
        .arg("-n")
        .arg(format!("2:4096:+{mib}M"))
        .arg(&disk));
    mkfs_with(&disk, 4096 * 512, mib, UUID2, &tree, mkfs_args);
    disk
}

#[test]
fn gpt_grub_cfg_through_a_compressed_qcow2_overlay() {
    need_tools!("sgdisk", "mkfs.ext4", "qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let (kernel, initrd) = (bytes(1, 300_000), bytes(2, 100_000));
    let raw = debian_like_gpt(dir.path(), &kernel, &initrd);
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    sh(tool_cmd("qemu-img")
        .args(["convert", "-c", "-O", "qcow2"])
        .arg(&raw)
        .arg(&base));
    sh(tool_cmd("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&top));
    let found = DiskBoot::find(open(&top)).unwrap();
    assert_eq!(found.entries.len(), 1);
    let e = &found.entries[0];
    assert_eq!((e.source.as_str(), e.kernel.fs), ("grub.cfg", 0));
    let l = found.load(0, 1 << 30).unwrap();
    assert!(l.kernel == kernel && l.initrd.as_deref() == Some(&initrd[..]));
    assert_eq!(
        l.cmdline,
        "root=PARTUUID=x ro console=tty0 quiet console=ttyS0"
    );
    assert!(found
        .describe()
        .contains("0* Debian GNU/Linux (grub.cfg, partition 2)"));
    // An initrd larger than guest memory can hold is refused before it is read.
    let e = found.load(0, 50_000).err().unwrap();
    assert!(e.contains("more than"), "{e}");
}

#[test]
fn gpt_bls_entries_newest_first() {
    need_tools!("sgdisk", "mkfs.ext4");
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    for v in ["6.1.0", "6.10.0"] {
        write(&tree, &format!("vmlinuz-{v}"), v.as_bytes());
        write(&tree, &format!("initrd-{v}"), b"cpio");
        let e = format!(
            "title Linux {v}\nversion {v}\nlinux /vmlinuz-{v}\ninitrd /initrd-{v}\n\
             options root=UUID=abc ro\noptions console=ttyS0,115200\n"
        );
        write(&tree, &format!("loader/entries/m-{v}.conf"), e.as_bytes());
    }
    let disk = dir.path().join("bls.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(24 << 20)
        .unwrap();
    sh(tool_cmd("sgdisk").args(["-n", "1:2048:0"]).arg(&disk));
    mkfs(&disk, 2048 * 512, 20, UUID2, &tree);
    let found = DiskBoot::find(open(&disk)).unwrap();
    let titles: Vec<&str> = found.entries.iter().map(|e| e.title.as_str()).collect();
    assert_eq!(titles, ["Linux 6.10.0", "Linux 6.1.0"]);
    let l = found.load(found.select(None).unwrap(), 1 << 20).unwrap();
    assert_eq!(l.kernel, b"6.10.0");
    assert_eq!(l.cmdline, "root=UUID=abc ro console=ttyS0,115200");
    let i = found.select(Some("Linux 6.1.0")).unwrap();
    assert_eq!(found.load(i, 1 << 20).unwrap().kernel, b"6.1.0");
    assert_eq!(found.select(Some("1")).unwrap(), 1);
    assert!(found
        .select(Some("7"))
        .unwrap_err()
        .contains("no boot entry '7'"));
}

#[test]
fn mbr_extlinux_and_bare_filesystem_fallback() {
    need_tools!("sfdisk", "mkfs.ext4");
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    write(&tree, "boot/vmlinuz-a", b"kernel-a");
    write(&tree, "boot/extlinux/initrd-a", b"initrd-a");
    write(
        &tree,
        "boot/extlinux/extlinux.conf",
        b"DEFAULT a\nLABEL a\n  MENU LABEL Alpine-ish\n  LINUX /boot/vmlinuz-a\n  INITRD initrd-a\n  APPEND root=/dev/vda1\n",
    );
    let disk = dir.path().join("mbr.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(24 << 20)
        .unwrap();
    let mut child = tool_cmd("sfdisk")
        .arg("-q")
        .arg(&disk)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\nstart=2048, type=83\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    mkfs(&disk, 2048 * 512, 20, UUID2, &tree);
    let found = DiskBoot::find(open(&disk)).unwrap();
    let l = found.load(0, 1 << 20).unwrap();
    assert_eq!(
        (&l.kernel[..], l.initrd.as_deref()),
        (&b"kernel-a"[..], Some(&b"initrd-a"[..]))
    );
    assert_eq!(l.cmdline, "root=/dev/vda1 console=ttyS0");
    assert_eq!(found.entries[0].title, "Alpine-ish");

    // No partition table, no configuration: /vmlinuz (a symlink) and /initrd.img.
    let tree = dir.path().join("tree2");
    write(&tree, "boot/vmlinuz-6", b"k6");
    write(&tree, "boot/initrd.img-6", b"i6");
    std::os::unix::fs::symlink("boot/vmlinuz-6", tree.join("vmlinuz")).unwrap();
    std::os::unix::fs::symlink("boot/initrd.img-6", tree.join("initrd.img")).unwrap();
    let bare = dir.path().join("bare.raw");
    std::fs::File::create(&bare)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    mkfs(&bare, 0, 8, UUID2, &tree);
    let found = DiskBoot::find(open(&bare)).unwrap();
    let l = found.load(0, 1 << 20).unwrap();
    assert_eq!(
        (&l.kernel[..], l.initrd.as_deref()),
        (&b"k6"[..], Some(&b"i6"[..]))
    );
    assert_eq!(l.cmdline, format!("root=UUID={UUID2} ro console=ttyS0"));
}

/// A damaged partition table, a disk with no filesystem, and a filesystem with no kernel
/// each give one clear line.
#[test]
fn disks_without_a_boot_entry() {
    need_tools!("sgdisk", "mkfs.ext4");
    let dir = tempfile::tempdir().unwrap();
    let disk = debian_like_gpt(dir.path(), b"k", b"i");
    let mut d = std::fs::read(&disk).unwrap();
    let len = d.len();
    d[512 + 20] ^= 0xff;
    d[len - 512 + 20] ^= 0xff;
    let damaged = dir.path().join("damaged.raw");
    std::fs::write(&damaged, &d).unwrap();
    let e = DiskBoot::find(open(&damaged)).err().unwrap();
    assert!(e.contains("damaged GPT") && e.contains("CRC"), "{e}");
    let empty = dir.path().join("empty.raw");
    std::fs::write(&empty, vec![0u8; 1 << 20]).unwrap();
    let e = DiskBoot::find(open(&empty)).err().unwrap();
    assert!(e.contains("no ext2/3/4 or FAT filesystem"), "{e}");
    let tree = dir.path().join("t");
    write(&tree, "etc/hostname", b"x");
    let nokernel = dir.path().join("nokernel.raw");
    std::fs::File::create(&nokernel)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    mkfs(&nokernel, 0, 8, UUID2, &tree);
    let e = DiskBoot::find(open(&nokernel)).err().unwrap();
    assert!(e.contains("no Linux boot entry"), "{e}");
}

/// Random corruption of real ext4 filesystems (with and without metadata checksums, so
/// that damage reaches the parsers behind the checksum checks) holding a boot configuration:
/// every round finds and loads an entry or fails with a one-line error; never a panic or a
/// hang. Damage goes to the non-zero bytes of the metadata area (the structures, not the
/// empty inode table). `TEST_SEED` replays, `EXT4_ROUNDS` sets the length.
#[test]
fn hostile_ext4_fails_cleanly() {
    need_tools!("sgdisk", "mkfs.ext4");
    let dir = tempfile::tempdir().unwrap();
    let fs_start = 4096 * 512;
    let mut goods = Vec::new();
    for (name, args) in [("csum", &[][..]), ("nocsum", &["-O", "^metadata_csum"][..])] {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let disk = debian_like_gpt_with(&d, &bytes(3, 40_000), &bytes(4, 20_000), 4, args);
        let good = std::fs::read(&disk).unwrap();
        let hot: Vec<usize> = (fs_start..fs_start + (1 << 20))
            .filter(|&i| good[i] != 0)
            .collect();
        goods.push((good, hot));
    }
    let seed = integration_tests::seed(0xe474);
    let mut rng = integration_tests::Rng::new(seed);
    let rounds = std::env::var("EXT4_ROUNDS").map_or(300, |v| v.parse().unwrap());
    let (mut ok, mut failed) = (0, 0);
    let path = dir.path().join("hostile.raw");
    for round in 0..rounds {
        let (good, hot) = &goods[round % 2];
        let mut d = good.clone();
        for _ in 0..1 + rng.below(4) {
            let at = *rng.pick(hot);
            d[at] = match rng.below(3) {
                0 => rng.next_u64() as u8,
                1 => 0xff,
                _ => 0,
            };
        }
        std::fs::write(&path, &d).unwrap();
        let disk = open(&path);
        let t0 = std::time::Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            DiskBoot::find(disk).and_then(|f| f.load(f.default, 1 << 26).map(|_| ()))
        }))
        .unwrap_or_else(|_| panic!("round {round} (TEST_SEED={seed:#x}): panic"));
        assert!(
            t0.elapsed().as_secs() < 5,
            "round {round} (TEST_SEED={seed:#x}) took {:?}",
            t0.elapsed()
        );
        match r {
            Ok(()) => ok += 1,
            Err(e) => {
                assert!(!e.contains('\n'), "{e}");
                failed += 1
            }
        }
    }
    eprintln!("hostile ext4: {ok} booted, {failed} refused");
    assert!(failed > 10 && ok > 10, "{ok} booted, {failed} refused");
}

/// `mkfs.vfat` at sector `offset` of `disk` (`kib` KiB, FAT type `fat`), then `mcopy -s`
/// of `tree`'s top-level entries onto it.
fn mkfat(disk: &Path, offset: u64, kib: u64, fat: &str, tree: &Path) {
    sh(tool_cmd("mkfs.vfat")
        .args(["-F", fat, "-i", "1234ABCD", "--offset"])
        .arg(offset.to_string())
        .arg(disk)
        .arg(kib.to_string()));
    let mut c = tool_cmd("mcopy");
    c.arg("-s")
        .arg("-i")
        .arg(format!("{}@@{}", disk.display(), offset * 512));
    for e in std::fs::read_dir(tree).unwrap() {
        c.arg(e.unwrap().path());
    }
    sh(c.arg("::/"));
}

/// An EFI system partition (FAT32) laid out as systemd-boot has it: BLS entries, kernel and
/// initrd on the ESP, the root filesystem (ext4) in partition 2.
#[test]
fn esp_with_systemd_boot_entries() {
    need_tools!("sgdisk", "mkfs.ext4", "mkfs.vfat", "mcopy");
    let dir = tempfile::tempdir().unwrap();
    let esp = dir.path().join("esp");
    let (kernel, initrd) = (bytes(5, 70_000), bytes(6, 30_000));
    write(&esp, "EFI/debian/vmlinuz-6.12.0", &kernel);
    write(&esp, "EFI/debian/initrd.img-6.12.0", &initrd);
    write(
        &esp,
        "loader/entries/debian-6.12.0-with-a-long-name.conf",
        format!(
            "title Debian (ESP)\nversion 6.12.0\nlinux /EFI/debian/vmlinuz-6.12.0\n\
             initrd /EFI/debian/initrd.img-6.12.0\noptions root=UUID={UUID2} rw\n"
        )
        .as_bytes(),
    );
    let root = dir.path().join("root");
    write(&root, "etc/hostname", b"esp-test");
    let disk = dir.path().join("esp.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(72 << 20)
        .unwrap();
    sh(tool_cmd("sgdisk")
        .args(["-n", "1:2048:+40M", "-t", "1:ef00", "-n", "2:0:0"])
        .arg(&disk));
    mkfat(&disk, 2048, 40 * 1024, "32", &esp);
    let p2 = (2048 + 40 * 2048) * 512;
    mkfs(&disk, p2, 24, UUID2, &root);
    let found = DiskBoot::find(open(&disk)).unwrap();
    assert_eq!(found.entries.len(), 1, "{}", found.describe());
    assert_eq!(found.entries[0].title, "Debian (ESP)");
    assert!(
        found.describe().contains("(BLS, partition 1)"),
        "{}",
        found.describe()
    );
    let l = found.load(0, 1 << 20).unwrap();
    assert!(l.kernel == kernel && l.initrd.as_deref() == Some(&initrd[..]));
    assert_eq!(l.cmdline, format!("root=UUID={UUID2} rw console=ttyS0"));
}

/// A bare FAT16 volume (no partition table) with /vmlinuz; then random damage to its boot
/// sector, FAT and directories: a boot or a one-line error, never a panic or a hang.
#[test]
fn hostile_fat_fails_cleanly() {
    need_tools!("mkfs.vfat", "mcopy");
    let dir = tempfile::tempdir().unwrap();
    // Files of zeros but for their first bytes: the non-zero bytes the damage goes to are
    // then the boot sector, the FATs and the directories.
    let tree = dir.path().join("t");
    let kernel = [&bytes(7, 16)[..], &[0u8; 50_000]].concat();
    write(&tree, "vmlinuz", &kernel);
    write(
        &tree,
        "initrd.img",
        &[&bytes(8, 16)[..], &[0u8; 9_000]].concat(),
    );
    write(
        &tree,
        "loader/entries/x.conf",
        b"title FAT\nlinux /vmlinuz\ninitrd /initrd.img\n",
    );
    let disk = dir.path().join("fat.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    mkfat(&disk, 0, 16 * 1024, "16", &tree);
    let found = DiskBoot::find(open(&disk)).unwrap();
    assert_eq!(found.load(0, 1 << 20).unwrap().kernel, kernel);
    let good = std::fs::read(&disk).unwrap();
    let hot: Vec<usize> = (0..1 << 20).filter(|&i| good[i] != 0).collect();
    let seed = integration_tests::seed(0xfa7);
    let mut rng = integration_tests::Rng::new(seed);
    let (mut ok, mut failed) = (0, 0);
    let path = dir.path().join("hostile.raw");
    for round in 0..300 {
        let mut d = good.clone();
        for _ in 0..1 + rng.below(4) {
            let at = *rng.pick(&hot);
            d[at] = match rng.below(3) {
                0 => rng.next_u64() as u8,
                1 => 0xff,
                _ => 0,
            };
        }
        std::fs::write(&path, &d).unwrap();
        let disk = open(&path);
        let t0 = std::time::Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            DiskBoot::find(disk).and_then(|f| f.load(f.default, 1 << 26).map(|_| ()))
        }))
        .unwrap_or_else(|_| panic!("round {round} (TEST_SEED={seed:#x}): panic"));
        assert!(
            t0.elapsed().as_secs() < 5,
            "round {round} (TEST_SEED={seed:#x})"
        );
        match r {
            Ok(()) => ok += 1,
            Err(e) => {
                assert!(!e.contains('\n'), "{e}");
                failed += 1
            }
        }
    }
    eprintln!("hostile FAT: {ok} booted, {failed} refused");
    assert!(failed > 10 && ok > 10, "{ok} booted, {failed} refused");
}

/// A FAT boot sector claiming 2 TiB of 512-byte clusters (on a sparse 2 TiB disk): the
/// decoded table is bounded by the FAT's own size, and a FAT larger than the limit is
/// refused before it is read.
#[test]
fn huge_fat_geometry_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("huge.raw");
    let mut b = vec![0u8; 512];
    b[11..13].copy_from_slice(&512u16.to_le_bytes());
    b[13] = 1; // sectors per cluster
    b[14] = 32; // reserved
    b[16] = 2; // FATs
    b[32..36].copy_from_slice(&u32::MAX.to_le_bytes()); // total sectors
    b[82..87].copy_from_slice(b"FAT32");
    b[510] = 0x55;
    b[511] = 0xaa;
    for (fat_sectors, ok) in [(32768u32, true), (1 << 20, false)] {
        b[36..40].copy_from_slice(&fat_sectors.to_le_bytes());
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(2 << 40).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &b, 0).unwrap();
        drop(f);
        let t0 = std::time::Instant::now();
        let e = DiskBoot::find(open(&p)).err().unwrap();
        assert!(t0.elapsed().as_secs() < 5, "{:?}", t0.elapsed());
        if !ok {
            assert!(e.contains("too large"), "{e}");
        }
    }
}

/// An ext2 superblock whose block count and blocks per group make 2^32 block groups (the
/// diskboot fuzz target's find): refused with one line before ext4-view sizes a descriptor
/// list from it (it allocated 64 GiB and aborted).
#[test]
fn ext_superblock_with_huge_group_count_is_refused() {
    let mut disk = vec![0u8; 64 << 10];
    let sb = &mut disk[1024..2048];
    sb[0x4..0x8].copy_from_slice(&u32::MAX.to_le_bytes()); // blocks, low half
    sb[0x14..0x18].copy_from_slice(&1u32.to_le_bytes()); // first data block
    sb[0x20..0x24].copy_from_slice(&1u32.to_le_bytes()); // blocks per group
    sb[0x28..0x2c].copy_from_slice(&8u32.to_le_bytes()); // inodes per group
    sb[0x38..0x3a].copy_from_slice(&0xef53u16.to_le_bytes());
    let err = DiskBoot::find(Arc::new(super::partitions::tests::mem(&disk)))
        .err()
        .expect("a disk whose only filesystem is unreadable has no boot entry");
    assert!(
        err.contains("block count 4294967295 exceeds the partition (64 blocks)"),
        "{err}"
    );
    // Within the partition but in far too many groups of one block each.
    let mut disk = vec![0u8; 2 << 20];
    disk[1024..2048].copy_from_slice(&{
        let mut sb = [0u8; 1024];
        sb[0x4..0x8].copy_from_slice(&2048u32.to_le_bytes());
        sb[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        sb[0x20..0x24].copy_from_slice(&0u32.to_le_bytes());
        sb[0x28..0x2c].copy_from_slice(&8u32.to_le_bytes());
        sb[0x38..0x3a].copy_from_slice(&0xef53u16.to_le_bytes());
        sb
    });
    let err = DiskBoot::find(Arc::new(super::partitions::tests::mem(&disk)))
        .err()
        .unwrap();
    assert!(err.contains("blocks per group 0 is invalid"), "{err}");
}

/// A bare ext4 with a `/vmlinuz` symlink to the kernel and a `/loader` symlink to /boot,
/// then `debugfs -w -R` commands run on it (the disk-boot fuzz target's finds: sizes in
/// inodes that no real file has).
fn bare_ext4_with(dir: &Path, debugfs: &[&str]) -> PathBuf {
    let tree = dir.join("tree");
    write(&tree, "boot/vmlinuz-6", b"k6");
    std::os::unix::fs::symlink("boot/vmlinuz-6", tree.join("vmlinuz")).unwrap();
    std::os::unix::fs::symlink("boot", tree.join("loader")).unwrap();
    let disk = dir.join("bare.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    mkfs(&disk, 0, 8, UUID2, &tree);
    for c in debugfs {
        sh(tool_cmd("debugfs").args(["-w", "-R", c]).arg(&disk));
    }
    disk
}

/// Symlinks whose inodes claim a 1 TiB target (size_hi 0x100): ext4-view read a target
/// whole into a buffer of that size, and aborted (the fuzz target's four crashes: listing
/// /loader/entries through such a /loader). vmm resolves links itself and refuses one
/// longer than PATH_MAX: the BLS directory is then not there, and the /vmlinuz fallback
/// is not either.
#[test]
fn symlink_with_huge_size_is_refused() {
    need_tools!("mkfs.ext4", "debugfs");
    let dir = tempfile::tempdir().unwrap();
    let disk = bare_ext4_with(&dir.path().join("a"), &["sif /loader size_hi 0x100"]);
    let l = DiskBoot::find(open(&disk))
        .unwrap()
        .load(0, 1 << 20)
        .unwrap();
    assert_eq!(l.kernel, b"k6");
    let disk = bare_ext4_with(&dir.path().join("b"), &["sif /vmlinuz size_hi 0x100"]);
    let err = DiskBoot::find(open(&disk)).err().unwrap();
    assert!(err.contains("no /vmlinuz"), "{err}");
}

/// A kernel whose inode says 1 GiB (within the kernel limit) on an 8 MiB filesystem: it
/// can only be holes, so it is refused from its size before a buffer is allocated, instead
/// of a GiB of zeroes being allocated and filled.
#[test]
fn file_larger_than_its_filesystem_is_refused() {
    need_tools!("mkfs.ext4", "debugfs");
    let dir = tempfile::tempdir().unwrap();
    let disk = bare_ext4_with(dir.path(), &["sif /boot/vmlinuz-6 size 0x3fffffff"]);
    let found = DiskBoot::find(open(&disk)).unwrap();
    let err = found.load(0, 1 << 20).err().unwrap();
    assert!(
        err.contains("/vmlinuz is 1073741823 bytes, more than the 8388608 vmm reads"),
        "{err}"
    );
}
