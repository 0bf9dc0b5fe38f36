//! Linux x86_64 64-bit boot protocol: load a bzImage at 1 MiB, build the zero page
//! (setup header, E820 map, command line, initrd), identity page tables and a GDT.

use std::fs::File;
use std::path::Path;

use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress};

use crate::vm::{Machine, FOUR_GIB, MMIO_HOLE_START};
use crate::GuestMem;

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const ZERO_PAGE: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
pub const EBDA_START: u64 = 0x9_fc00;
pub const HIMEM_START: u64 = 0x10_0000;

/// The GDT Linux's boot protocol expects: __BOOT_CS = 0x10, __BOOT_DS = 0x18.
pub const GDT: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Where the BSP starts.
#[derive(Debug, Clone, Copy)]
pub enum BootEntry {
    /// 64-bit Linux entry: long mode, paging on, `rsi` = zero page.
    Linux64 { entry: u64, zero_page: u64 },
    /// PVH entry of an ELF vmlinux: flat 32-bit protected mode, paging off,
    /// `ebx` = hvm_start_info.
    Pvh { entry: u32, start_info: u32 },
    /// Flat 32-bit protected mode at `entry` (tests).
    Protected32 { entry: u32 },
    /// Real mode at 0:`ip` (tests).
    Real { ip: u16 },
}

/// Write identity page tables for the first 4 GiB (2 MiB pages) and the GDT.
pub fn setup_long_mode_tables(mem: &GuestMem) -> Result<(), String> {
    let err = |e: vm_memory::GuestMemoryError| format!("writing page tables: {e}");
    mem.write_obj(PDPT_ADDR | 3, GuestAddress(PML4_ADDR))
        .map_err(err)?;
    for i in 0..4u64 {
        mem.write_obj((PD_ADDR + i * 0x1000) | 3, GuestAddress(PDPT_ADDR + i * 8))
            .map_err(err)?;
        for j in 0..512u64 {
            let addr = ((i * 512 + j) << 21) | 0x83;
            mem.write_obj(addr, GuestAddress(PD_ADDR + i * 0x1000 + j * 8))
                .map_err(err)?;
        }
    }
    for (i, d) in GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(err)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR)).map_err(err)?;
    Ok(())
}

fn read_file(path: &Path, what: &str) -> Result<File, String> {
    let f =
        File::open(path).map_err(|e| format!("cannot open {what} '{}': {e}", path.display()))?;
    let md = f
        .metadata()
        .map_err(|e| format!("cannot stat {what} '{}': {e}", path.display()))?;
    if !md.is_file() {
        return Err(format!("{what} '{}' is not a regular file", path.display()));
    }
    Ok(f)
}

/// Where the PVH start info, module list and memory map go.
pub const PVH_INFO: u64 = 0x6000;
const PVH_MODLIST: u64 = 0x6040;
const PVH_MEMMAP: u64 = 0x6080;

/// The E820 map of `m`: (address, size, type).
fn e820_map(m: &Machine) -> Vec<(u64, u64, u32)> {
    let low_end = m.low_mem_end();
    let mut e820 = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa_0000 - EBDA_START, E820_RESERVED),
        (
            crate::acpi::ACPI_START,
            HIMEM_START - crate::acpi::ACPI_START,
            E820_RESERVED,
        ),
        (HIMEM_START, low_end - HIMEM_START, E820_RAM),
    ];
    if m.mem_size > MMIO_HOLE_START {
        e820.push((FOUR_GIB, m.mem_size - MMIO_HOLE_START, E820_RAM));
    }
    e820
}

fn write_cmdline(mem: &GuestMem, cmdline: &str, max: usize) -> Result<(), String> {
    if cmdline.len() > max || cmdline.contains('\0') {
        return Err(format!(
            "kernel command line is too long ({} bytes, the kernel accepts {max})",
            cmdline.len()
        ));
    }
    let mut cl = cmdline.as_bytes().to_vec();
    cl.push(0);
    mem.write_slice(&cl, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| format!("writing command line: {e}"))
}

/// Load an initrd as high as possible below `max` and above `floor`; returns (addr, size).
fn load_initrd(m: &Machine, p: &Path, floor: u64, max: u64) -> Result<(u64, u64), String> {
    let mut f = read_file(p, "initrd")?;
    let size = f.metadata().map_err(|e| format!("initrd: {e}"))?.len();
    let top = m.low_mem_end().min(max);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= floor)
        .ok_or_else(|| {
            format!(
                "initrd '{}' ({} MiB) does not fit in guest memory",
                p.display(),
                size >> 20
            )
        })?;
    m.mem
        .read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| format!("reading initrd '{}': {e}", p.display()))?;
    Ok((addr, size))
}

/// Boot an ELF vmlinux through its PVH entry point.
fn load_pvh(
    m: &Machine,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<BootEntry, String> {
    use linux_loader::loader::elf::{Elf, PvhBootCapability};
    let mut kf = read_file(kernel, "kernel")?;
    let res = Elf::load(&m.mem, None, &mut kf, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| format!("kernel '{}' cannot be loaded: {e}", kernel.display()))?;
    let PvhBootCapability::PvhEntryPresent(entry) = res.pvh_boot_cap else {
        return Err(format!(
            "ELF kernel '{}' has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY); use a bzImage",
            kernel.display()
        ));
    };
    if res.kernel_end > m.low_mem_end() {
        return Err(format!(
            "memory size {} MiB is too small for this kernel",
            m.mem_size >> 20
        ));
    }
    write_cmdline(&m.mem, cmdline, 4095)?;
    let err = |e: vm_memory::GuestMemoryError| format!("writing PVH start info: {e}");
    let mut nr_modules = 0u32;
    if let Some(p) = initrd {
        let (addr, size) = load_initrd(m, p, res.kernel_end.next_multiple_of(0x1000), 0xffff_ffff)?;
        let mut e = Vec::new();
        for v in [addr, size, 0, 0] {
            e.extend_from_slice(&v.to_le_bytes());
        }
        m.mem
            .write_slice(&e, GuestAddress(PVH_MODLIST))
            .map_err(err)?;
        nr_modules = 1;
    }
    let map = e820_map(m);
    let mut mm = Vec::new();
    for (addr, size, ty) in &map {
        mm.extend_from_slice(&addr.to_le_bytes());
        mm.extend_from_slice(&size.to_le_bytes());
        mm.extend_from_slice(&ty.to_le_bytes());
        mm.extend_from_slice(&0u32.to_le_bytes());
    }
    m.mem
        .write_slice(&mm, GuestAddress(PVH_MEMMAP))
        .map_err(err)?;
    let mut si = Vec::new();
    si.extend_from_slice(&0x336e_c578u32.to_le_bytes()); // XEN_HVM_START_MAGIC_VALUE
    si.extend_from_slice(&1u32.to_le_bytes()); // version
    si.extend_from_slice(&0u32.to_le_bytes()); // flags
    si.extend_from_slice(&nr_modules.to_le_bytes());
    si.extend_from_slice(&PVH_MODLIST.to_le_bytes());
    si.extend_from_slice(&CMDLINE_ADDR.to_le_bytes());
    si.extend_from_slice(&crate::acpi::ACPI_START.to_le_bytes());
    si.extend_from_slice(&PVH_MEMMAP.to_le_bytes());
    si.extend_from_slice(&(map.len() as u32).to_le_bytes());
    si.extend_from_slice(&0u32.to_le_bytes());
    m.mem
        .write_slice(&si, GuestAddress(PVH_INFO))
        .map_err(err)?;
    write_firmware_tables(m)?;
    Ok(BootEntry::Pvh {
        entry: entry.0 as u32,
        start_info: PVH_INFO as u32,
    })
}

/// Load the kernel (bzImage, or ELF vmlinux with a PVH note), initrd, command line and
/// firmware tables; return the BSP entry.
pub fn load_linux(
    m: &Machine,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<BootEntry, String> {
    let mem = &m.mem;
    let low_end = m.low_mem_end();
    let mut kf = read_file(kernel, "kernel")?;
    let mut magic = [0u8; 4];
    if std::io::Read::read_exact(&mut kf, &mut magic).is_ok() && &magic == b"\x7fELF" {
        return load_pvh(m, kernel, initrd, cmdline);
    }
    let res = BzImage::load(
        mem,
        Some(GuestAddress(HIMEM_START)),
        &mut kf,
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|e| {
        format!(
            "'{}' is not a bzImage kernel this vmm can boot ({e})",
            kernel.display()
        )
    })?;
    let mut hdr = res.setup_header.ok_or("kernel has no setup header")?;
    if hdr.version < 0x020c || hdr.xloadflags & 1 == 0 {
        return Err(format!(
            "kernel '{}' does not support the 64-bit boot protocol",
            kernel.display()
        ));
    }
    let init_end = HIMEM_START + (hdr.init_size as u64).max(res.kernel_end - HIMEM_START);
    if init_end > low_end {
        return Err(format!(
            "memory size {} MiB is too small for this kernel",
            m.mem_size >> 20
        ));
    }

    let max_cmdline = if hdr.version >= 0x0206 {
        hdr.cmdline_size as usize
    } else {
        255
    };
    write_cmdline(mem, cmdline, max_cmdline)?;

    hdr.type_of_loader = 0xff;
    hdr.loadflags |= 0x80; // CAN_USE_HEAP
    hdr.heap_end_ptr = 0xfe00;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = cmdline.len() as u32;
    hdr.code32_start = HIMEM_START as u32;

    // Initrd at the top of low memory, below what the kernel accepts.
    if let Some(p) = initrd {
        let max = if hdr.version >= 0x0203 {
            hdr.initrd_addr_max as u64 + 1
        } else {
            0x3800_0000
        };
        let (addr, size) = load_initrd(m, p, init_end, max)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }

    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    let e820 = e820_map(m);
    for (i, &(addr, size, type_)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = e820.len() as u8;
    params.acpi_rsdp_addr = crate::acpi::ACPI_START;

    // SAFETY: boot_params is a plain repr(C) struct; viewing it as bytes is sound.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            &params as *const boot_params as *const u8,
            std::mem::size_of::<boot_params>(),
        )
    };
    mem.write_slice(bytes, GuestAddress(ZERO_PAGE))
        .map_err(|e| format!("writing zero page: {e}"))?;

    write_firmware_tables(m)?;
    setup_long_mode_tables(mem)?;
    Ok(BootEntry::Linux64 {
        entry: HIMEM_START + 0x200,
        zero_page: ZERO_PAGE,
    })
}

/// ACPI tables describing the vCPUs, power control and the PCI root.
pub fn write_firmware_tables(m: &Machine) -> Result<(), String> {
    let t = crate::acpi::build(m.cpus);
    m.mem
        .write_slice(&t, GuestAddress(crate::acpi::ACPI_START))
        .map_err(|e| format!("writing ACPI tables: {e}"))
}
