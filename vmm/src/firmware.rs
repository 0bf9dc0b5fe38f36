//! Firmware boot (SeaBIOS), as QEMU's pc machine does without `-kernel`: the image is
//! mapped just below 4 GiB and its last 128 KiB again below 1 MiB; the vCPU starts at the
//! reset vector; fw_cfg and the CMOS tell the firmware the memory map, CPU count, boot
//! order and serial console.
//!
//! The low copy (0xe0000-0xfffff) and the rest of 0xc0000-0xfffff are ordinary RAM, the
//! state SeaBIOS puts the i440FX's PAM registers in for its whole run ("shadow RAM
//! writable"): its first write to them copies the image from the high alias, which
//! leaves the same bytes in place. Unlike QEMU, the range is not made read-only again
//! when the firmware locks it, nor is the high flash alias read-only.

use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress};

use crate::boot::{E820_RAM, E820_RESERVED};
use crate::devices::cmos::CmosLayout;
use crate::devices::fw_cfg::{
    FwCfg, KEY_BOOT_MENU, KEY_IRQ0_OVERRIDE, KEY_MAX_CPUS, KEY_NB_CPUS, KEY_NOGRAPHIC,
};
use crate::vm::FOUR_GIB;
use crate::GuestMem;

/// The firmware `vmm run` boots when none is named: Debian's `seabios` package.
pub const DEFAULT_FIRMWARE: &str = "/usr/share/seabios/bios.bin";
/// Smallest and largest image accepted (QEMU's bios.bin is 128 KiB, bios-256k.bin 256 KiB;
/// above that the image would overlap the KVM TSS pages below it).
const MIN_SIZE: usize = 64 << 10;
const MAX_SIZE: usize = 256 << 10;
/// How much of the image's end is also visible below 1 MiB.
const LOW_ALIAS: usize = 128 << 10;
/// The I/O port of the serial console the firmware and bootloaders print to (COM1).
const SERCON_PORT: u16 = 0x3f8;
/// The KVM identity-map and TSS pages (see vm.rs), reserved as QEMU's hard-coded range.
const KVM_PRIVATE: (u64, u64) = (0xfffb_c000, 4 * 4096);

/// A firmware image read from disk.
pub struct Firmware {
    pub path: PathBuf,
    pub image: Vec<u8>,
}

impl Firmware {
    /// Read and check the image at `path`; the error is one line naming the file.
    pub fn load(path: &Path) -> Result<Firmware, String> {
        let name = path.display();
        let meta = std::fs::metadata(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                format!("firmware '{name}' not found (install the seabios package, or give --firmware PATH)")
            } else {
                format!("cannot read firmware '{name}': {e}")
            }
        })?;
        if !meta.is_file() {
            return Err(format!("firmware '{name}' is not a regular file"));
        }
        let len = meta.len();
        if len < MIN_SIZE as u64 || len > MAX_SIZE as u64 || len % (64 << 10) != 0 {
            return Err(format!(
                "firmware '{name}' is {len} bytes: vmm loads images of 64 KiB to 256 KiB, a \
                 multiple of 64 KiB"
            ));
        }
        let image =
            std::fs::read(path).map_err(|e| format!("cannot read firmware '{name}': {e}"))?;
        if image.len() as u64 != len {
            return Err(format!("firmware '{name}' changed size while being read"));
        }
        Ok(Firmware {
            path: path.to_path_buf(),
            image,
        })
    }

    /// Guest address of the image's first byte (it ends at 4 GiB).
    pub fn base(&self) -> u64 {
        FOUR_GIB - self.image.len() as u64
    }

    /// Copy the image to its two places in guest memory (both must be RAM in `mem`).
    pub fn install(&self, mem: &GuestMem) -> Result<(), String> {
        let low = &self.image[self.image.len() - LOW_ALIAS.min(self.image.len())..];
        mem.write_slice(&self.image, GuestAddress(self.base()))
            .and_then(|_| mem.write_slice(low, GuestAddress((1 << 20) - low.len() as u64)))
            .map_err(|e| format!("firmware: {e}"))
    }
}

/// The E820 map fw_cfg's `etc/e820` gives: 20-byte entries (address, length, type).
pub fn e820_table(layout: &CmosLayout) -> Vec<u8> {
    let mut entries = vec![(0, layout.mem_below_4g, E820_RAM)];
    if layout.mem_above_4g > 0 {
        entries.push((FOUR_GIB, layout.mem_above_4g, E820_RAM));
    }
    entries.push((KVM_PRIVATE.0, KVM_PRIVATE.1, E820_RESERVED));
    let mut t = Vec::new();
    for (addr, len, ty) in entries {
        t.extend_from_slice(&u64::to_le_bytes(addr));
        t.extend_from_slice(&u64::to_le_bytes(len));
        t.extend_from_slice(&u32::to_le_bytes(ty));
    }
    t
}

/// fw_cfg's contents for SeaBIOS: CPU counts, no boot menu, the serial console, the memory
/// map, and a boot order naming the first disk (a virtio-blk function in PCI slot
/// `boot_slot`).
pub fn fw_cfg(layout: &CmosLayout, boot_slot: u8) -> Result<FwCfg, String> {
    let mut f = FwCfg::new();
    let cpus = u16::from(layout.cpus);
    f.add_item(KEY_NB_CPUS, cpus.to_le_bytes().to_vec());
    f.add_item(KEY_MAX_CPUS, cpus.to_le_bytes().to_vec());
    f.add_item(KEY_NOGRAPHIC, 1u16.to_le_bytes().to_vec());
    f.add_item(KEY_BOOT_MENU, 0u16.to_le_bytes().to_vec());
    // No IRQ 0 -> pin 2 override in the MP table: vmm routes every ISA IRQ n (the in-kernel
    // PIT's 0 included) to IOAPIC pin n.
    f.add_item(KEY_IRQ0_OVERRIDE, vec![0]);
    let files: [(&str, Vec<u8>); 3] = [
        ("etc/e820", e820_table(layout)),
        ("etc/sercon-port", SERCON_PORT.to_le_bytes().to_vec()),
        (
            "bootorder",
            format!("/pci@i0cf8/scsi@{boot_slot:x}/disk@0,0\n").into_bytes(),
        ),
    ];
    for (name, data) in files {
        f.add_file(name, data).map_err(|e| e.to_string())?;
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_entries() {
        let l = CmosLayout {
            mem_below_4g: 3 << 30,
            mem_above_4g: 1 << 30,
            cpus: 2,
        };
        let t = e820_table(&l);
        assert_eq!(t.len(), 3 * 20);
        let entry = |i: usize| {
            let e = &t[20 * i..20 * (i + 1)];
            (
                u64::from_le_bytes(e[..8].try_into().unwrap()),
                u64::from_le_bytes(e[8..16].try_into().unwrap()),
                u32::from_le_bytes(e[16..].try_into().unwrap()),
            )
        };
        assert_eq!(entry(0), (0, 3 << 30, E820_RAM));
        assert_eq!(entry(1), (1 << 32, 1 << 30, E820_RAM));
        assert_eq!(entry(2), (0xfffb_c000, 0x4000, E820_RESERVED));
    }

    /// What SeaBIOS reads: the file directory's names, the serial console port, the boot
    /// order naming the disk's slot, and the CPU count.
    #[test]
    fn fw_cfg_contents() {
        use crate::bus::BusDevice;
        use crate::devices::fw_cfg::KEY_FILE_DIR;
        let l = CmosLayout {
            mem_below_4g: 256 << 20,
            mem_above_4g: 0,
            cpus: 3,
        };
        let mut f = fw_cfg(&l, 1).unwrap();
        let mut read = |key: u16, len: usize| {
            f.write(0, &key.to_le_bytes());
            let mut v = vec![0u8; len];
            for b in v.iter_mut() {
                let mut x = [0u8];
                f.read(1, &mut x);
                *b = x[0];
            }
            v
        };
        assert_eq!(read(KEY_NB_CPUS, 2), [3, 0]);
        let n = u32::from_be_bytes(read(KEY_FILE_DIR, 4).try_into().unwrap()) as usize;
        let dir = read(KEY_FILE_DIR, 4 + 64 * n);
        let mut files = std::collections::BTreeMap::new();
        for e in dir[4..].chunks(64) {
            let size = u32::from_be_bytes(e[..4].try_into().unwrap()) as usize;
            let key = u16::from_be_bytes(e[4..6].try_into().unwrap());
            let name = String::from_utf8(e[8..].split(|&b| b == 0).next().unwrap().to_vec());
            files.insert(name.unwrap(), read(key, size));
        }
        assert_eq!(files["etc/sercon-port"], [0xf8, 0x03]);
        assert_eq!(files["bootorder"], b"/pci@i0cf8/scsi@1/disk@0,0\n");
        assert_eq!(files["etc/e820"], e820_table(&l));
    }

    #[test]
    fn bad_images() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Firmware::load(&dir.path().join("none.bin")).err().unwrap();
        assert!(missing.contains("not found"), "{missing}");
        let small = dir.path().join("small.bin");
        std::fs::write(&small, vec![0u8; 4096]).unwrap();
        let e = Firmware::load(&small).err().unwrap();
        assert!(e.contains("4096 bytes"), "{e}");
        assert!(Firmware::load(dir.path()).is_err());
        let ok = dir.path().join("ok.bin");
        std::fs::write(&ok, vec![0x90u8; 128 << 10]).unwrap();
        let f = Firmware::load(&ok).unwrap();
        assert_eq!(f.base(), 0xfffe_0000);
    }
}
