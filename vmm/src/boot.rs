//! Linux x86_64 64-bit boot protocol: load a bzImage at 1 MiB, build the zero page
//! (setup header, E820 map, command line, initrd), identity page tables and a GDT.
//!
//! A bzImage whose payload is LZ4 (legacy frame, as the Debian cloud kernel has it) is not
//! left to decompress itself in the guest, which is most of a small VM's boot time: the
//! vmlinux ELF is decompressed here (blocks in parallel, straight into guest memory),
//! loaded at its physical addresses and entered through its PVH entry point, or through
//! `startup_64` with a zero page when it has none. Other payload formats boot as bzImage.

use std::path::Path;

mod elf;
pub mod file;
pub mod lz4;

pub use file::Scratch;

use elf::{ElfStream, LoadedElf};

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

/// E820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

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
    /// The reset vector (0xffff_fff0, real mode), as KVM creates a vCPU: firmware boot.
    ResetVector,
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

/// Where an initrd comes from: a host file, or bytes already read (from the guest's disk).
#[derive(Clone, Copy)]
pub enum Initrd<'a> {
    File(&'a Path),
    Bytes { name: &'a str, data: &'a [u8] },
}

impl Initrd<'_> {
    fn name(&self) -> String {
        match self {
            Initrd::File(p) => p.display().to_string(),
            Initrd::Bytes { name, .. } => name.to_string(),
        }
    }
}

/// Load an initrd as high as possible below `max` and above `floor`; returns (addr, size).
/// Its size is checked against guest memory before any of it is read.
fn load_initrd(m: &Machine, initrd: Initrd, floor: u64, max: u64) -> Result<(u64, u64), String> {
    enum Source<'a> {
        File(std::fs::File),
        Bytes(&'a [u8]),
    }
    let mut src = match initrd {
        Initrd::File(p) => Source::File(file::open_boot_file(p, "initrd")?),
        Initrd::Bytes { data, .. } => Source::Bytes(data),
    };
    let size = match &src {
        Source::File(f) => f.metadata().map_err(|e| format!("initrd: {e}"))?.len(),
        Source::Bytes(data) => data.len() as u64,
    };
    let top = m.low_mem_end().min(max);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= floor)
        .ok_or_else(|| {
            format!(
                "initrd '{}' ({} MiB) does not fit in guest memory",
                initrd.name(),
                size >> 20
            )
        })?;
    let r = match &mut src {
        Source::File(f) => m
            .mem
            .read_exact_volatile_from(GuestAddress(addr), f, size as usize)
            .map_err(|e| e.to_string()),
        Source::Bytes(data) => m
            .mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|e| e.to_string()),
    };
    r.map_err(|e| format!("reading initrd '{}': {e}", initrd.name()))?;
    Ok((addr, size))
}

/// Boot a loaded vmlinux (ending at `kernel_end`) through its PVH entry point.
fn setup_pvh(
    m: &Machine,
    kernel_end: u64,
    entry: u32,
    initrd: Option<Initrd>,
    cmdline: &str,
) -> Result<BootEntry, String> {
    write_cmdline(&m.mem, cmdline, 4095)?;
    let err = |e: vm_memory::GuestMemoryError| format!("writing PVH start info: {e}");
    let mut nr_modules = 0u32;
    if let Some(p) = initrd {
        let (addr, size) = load_initrd(m, p, kernel_end.next_multiple_of(0x1000), 0xffff_ffff)?;
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
        entry,
        start_info: PVH_INFO as u32,
    })
}

/// Writers of guest memory for the ELF loader.
fn guest_writer(mem: &GuestMem) -> impl FnMut(u64, &[u8]) -> Result<(), String> + '_ {
    move |a, b| {
        mem.write_slice(b, GuestAddress(a))
            .map_err(|e| format!("loading kernel at {a:#x}: {e}"))
    }
}

fn guest_reader(mem: &GuestMem) -> impl FnMut(u64, &mut [u8]) -> Result<(), String> + '_ {
    move |a, b| {
        mem.read_slice(b, GuestAddress(a))
            .map_err(|e| format!("reading kernel note at {a:#x}: {e}"))
    }
}

fn guest_zeroer(mem: &GuestMem) -> impl FnMut(u64, u64) -> Result<(), String> + '_ {
    move |a, n| {
        let zeros = vec![0u8; 1 << 16];
        let mut done = 0;
        while done < n {
            let k = (n - done).min(zeros.len() as u64);
            mem.write_slice(&zeros[..k as usize], GuestAddress(a + done))
                .map_err(|e| format!("clearing kernel bss at {a:#x}: {e}"))?;
            done += k;
        }
        Ok(())
    }
}

/// Decompress a legacy-LZ4 vmlinux (a bzImage payload) into guest memory: its segments go
/// to their physical addresses, which must lie in [`min`, `max`). The blocks are
/// independent, so they are decompressed on several threads, straight into place where a
/// block lies inside one segment.
pub fn load_lz4_vmlinux(
    payload: &[u8],
    min: u64,
    max: u64,
    mem: &GuestMem,
) -> Result<LoadedElf, String> {
    match load_lz4_parallel(payload, min, max, mem)? {
        Some(k) => Ok(k),
        None => load_lz4_sequential(payload, min, max, mem),
    }
}

/// One block at a time through a buffer.
fn load_lz4_sequential(
    payload: &[u8],
    min: u64,
    max: u64,
    mem: &GuestMem,
) -> Result<LoadedElf, String> {
    let mut dec = lz4::Lz4Legacy::new(payload)?;
    let mut buf = Scratch::new(lz4::BLOCK_SIZE)?;
    let n = dec
        .next_block(&mut buf)?
        .ok_or("compressed kernel is empty")?;
    let mut elf = ElfStream::new(&buf[..n], min, max)?;
    let mut write = guest_writer(mem);
    elf.feed(&buf[..n], &mut write)?;
    while let Some(n) = dec.next_block(&mut buf)? {
        elf.feed(&buf[..n], &mut write)?;
    }
    elf.finish(&mut guest_zeroer(mem), &mut guest_reader(mem))
}

/// `len` bytes of guest memory at `addr` as a slice, if they are in one region.
///
/// # Safety
/// No other reference to those bytes may exist while the slice lives (vCPUs not running,
/// no overlapping slice). Guest memory is shared, interior-mutable memory, hence the
/// mutable slice from a shared reference.
#[allow(clippy::mut_from_ref)]
unsafe fn guest_slice(mem: &GuestMem, addr: u64, len: usize) -> Option<&mut [u8]> {
    use vm_memory::GuestMemoryBackend;
    let vs = mem.get_slice(GuestAddress(addr), len).ok()?;
    let p = vs.ptr_guard_mut().as_ptr();
    Some(std::slice::from_raw_parts_mut(p, len))
}

/// All blocks but the last must be 8 MiB (as `lz4 -l` writes them) so that their file
/// offsets are known before decompressing, and the headers must lie in the first 64 KiB;
/// Ok(None) when they do not. Blocks whose bytes
/// can go to guest memory as one piece are decompressed straight into place (the last one
/// too when the size trailer gives its length); the others through a per-thread buffer,
/// placed by the same thread. Copies are what a nested, emulated host does slowest.
fn load_lz4_parallel(
    payload: &[u8],
    min: u64,
    max: u64,
    mem: &GuestMem,
) -> Result<Option<LoadedElf>, String> {
    let bs = lz4::BLOCK_SIZE;
    let (blocks, trailer) = lz4::split_blocks(payload)?;
    let Some(first_block) = blocks.first() else {
        return Err("compressed kernel is empty".into());
    };
    // The headers from the start of the first block, so that every block (the first one
    // too) can be decompressed in parallel. Headers beyond it: the sequential path.
    let head = lz4::decompress_prefix(first_block, 64 << 10)?;
    if elf::headers_len(&head).is_some_and(|n| n > head.len() as u64) {
        return Ok(None);
    }
    let mut elf = ElfStream::new(&head, min, max)?;

    // Expected decompressed length of each block: 8 MiB, and for the last one what the
    // trailer leaves (unknown without a trailer).
    let full = (blocks.len() as u64 - 1) * bs as u64;
    let last_len = trailer
        .map(|t| u64::from(t).wrapping_sub(full))
        .filter(|&n| n > 0 && n <= bs as u64);
    let ranges: Vec<(u64, u64)> = (0..blocks.len())
        .map(|i| {
            let len = if i + 1 == blocks.len() {
                last_len.unwrap_or(0)
            } else {
                bs as u64
            };
            ((i * bs) as u64, len)
        })
        .collect();
    let targets = elf.direct_targets(&ranges);
    // (index, compressed block, destination in guest memory, or None: through a buffer)
    type Item<'a> = (usize, &'a [u8], Option<&'a mut [u8]>);
    let mut items: Vec<std::sync::Mutex<Option<Item>>> = Vec::new();
    for (k, blk) in blocks.iter().enumerate() {
        let len = ranges[k].1;
        let direct = targets[k]
            .filter(|_| len > 0)
            // SAFETY: the vCPUs are not running; `direct_targets` hands out disjoint guest
            // ranges, clear of every segment the buffered blocks write, so the slices are
            // disjoint from each other and from all other writes until they are gone.
            .and_then(|pa| unsafe { guest_slice(mem, pa, len as usize) });
        items.push(std::sync::Mutex::new(Some((k, blk, direct))));
    }
    // Per block: decompressed length, and the buffer when its notes still need `feed`.
    type Done = (usize, Result<(usize, Option<Scratch>), String>);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let elf_ref = &elf;
    let work = || -> Vec<Done> {
        let mut out = Vec::new();
        let mut buf: Option<Scratch> = None;
        loop {
            let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(slot) = items.get(k) else {
                return out;
            };
            let taken = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            let Some((i, blk, dest)) = taken else {
                continue;
            };
            let r = match dest {
                Some(dst) => lz4::decompress_block(blk, dst).map(|n| (n, None)),
                None => (|| {
                    let mut b = match buf.take() {
                        Some(b) => b,
                        None => Scratch::new(bs)?,
                    };
                    let n = lz4::decompress_block(blk, &mut b)?;
                    let off = (i * bs) as u64;
                    if elf_ref.needs_feed(off, n as u64) {
                        return Ok((n, Some(b)));
                    }
                    elf_ref.place(off, &b[..n], &mut guest_writer(mem))?;
                    buf = Some(b);
                    Ok((n, None))
                })(),
            };
            out.push((i, r));
        }
    };
    let nthreads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(items.len().max(1));
    let mut done: Vec<Done> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..nthreads).map(|_| s.spawn(work)).collect();
        let mut all = work();
        for h in handles {
            all.extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        all
    });
    done.sort_by_key(|d| d.0);
    let mut total = 0u64;
    for (i, r) in done {
        let (n, buf) = r?;
        if i + 1 != blocks.len() && n != bs {
            return Ok(None);
        }
        total += n as u64;
        match buf {
            Some(v) => elf.feed(&v[..n], &mut guest_writer(mem))?,
            None => elf.skip(n as u64),
        }
    }
    if let Some(t) = trailer {
        if t as u64 != total & 0xffff_ffff {
            return Err(format!(
                "LZ4 stream: size trailer says {t} bytes, decompressed {total}"
            ));
        }
    }
    elf.finish(&mut guest_zeroer(mem), &mut guest_reader(mem))
        .map(Some)
}

/// The setup header fields the direct boot needs, from the start of a bzImage.
struct BzHeader {
    version: u16,
    xloadflags: u16,
    payload: std::ops::Range<usize>,
}

fn parse_bzimage_header(data: &[u8]) -> Option<BzHeader> {
    if data.len() < 0x270 || &data[0x202..0x206] != b"HdrS" {
        return None;
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap()) as usize;
    let version = u16_at(0x206);
    if version < 0x0208 {
        return None;
    }
    let setup_sects = match data[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248);
    let end = start.checked_add(u32_at(0x24c))?;
    if end > data.len() {
        return None;
    }
    Some(BzHeader {
        version,
        xloadflags: u16_at(0x236),
        payload: start..end,
    })
}

/// Boot parameters for the 64-bit entry: the setup header as the image has it, then the
/// loader's fields, E820 map and RSDP; written to [`ZERO_PAGE`] with the long-mode tables.
/// `initrd_floor` is the lowest address the initrd may use.
fn setup_zero_page(
    m: &Machine,
    image: &[u8],
    initrd: Option<Initrd>,
    cmdline: &str,
    initrd_floor: u64,
) -> Result<(), String> {
    let mem = &m.mem;
    let mut params = boot_params::default();
    let hdr_len = (0x202 + image[0x201] as usize)
        .min(0x1f1 + std::mem::size_of::<linux_loader::bootparam::setup_header>())
        .min(image.len());
    // SAFETY: boot_params is a plain repr(C) struct of integers; any bytes are valid.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(
            &mut params as *mut boot_params as *mut u8,
            std::mem::size_of::<boot_params>(),
        )
    };
    bytes[0x1f1..hdr_len].copy_from_slice(&image[0x1f1..hdr_len]);
    let hdr = &mut params.hdr;
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
    if let Some(p) = initrd {
        let max = if hdr.version >= 0x0203 {
            hdr.initrd_addr_max as u64 + 1
        } else {
            0x3800_0000
        };
        let (addr, size) = load_initrd(m, p, initrd_floor, max)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
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
    // SAFETY: as above; a read-only view this time.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            &params as *const boot_params as *const u8,
            std::mem::size_of::<boot_params>(),
        )
    };
    mem.write_slice(bytes, GuestAddress(ZERO_PAGE))
        .map_err(|e| format!("writing zero page: {e}"))?;
    write_firmware_tables(m)?;
    setup_long_mode_tables(mem)
}

/// Set `VMM_BOOT_NO_PVH=1` to enter a decompressed kernel at its 64-bit entry even when
/// it has a PVH entry (to exercise that path).
fn pvh_disabled() -> bool {
    std::env::var_os("VMM_BOOT_NO_PVH").is_some_and(|v| v == "1")
}

/// Boot an LZ4-compressed bzImage without its in-guest decompressor: decompress the
/// vmlinux here, load it at its physical addresses, and enter it through PVH or the 64-bit
/// boot protocol. Ok(None) when the image is not of that kind (then the caller boots it as
/// a bzImage).
fn load_decompressed(
    m: &Machine,
    image: &[u8],
    initrd: Option<Initrd>,
    cmdline: &str,
) -> Result<Option<BootEntry>, String> {
    let Some(h) = parse_bzimage_header(image) else {
        return Ok(None);
    };
    let payload = &image[h.payload.clone()];
    if !lz4::is_legacy_frame(payload) {
        return Ok(None);
    }
    let k = load_lz4_vmlinux(payload, HIMEM_START, m.low_mem_end(), &m.mem)
        .map_err(|e| format!("kernel: {e}"))?;
    let floor = k.end.next_multiple_of(0x1000);
    match k.pvh_entry {
        Some(e) if !pvh_disabled() => setup_pvh(m, floor, e, initrd, cmdline).map(Some),
        _ if h.version >= 0x020c && h.xloadflags & 1 != 0 => {
            setup_zero_page(m, image, initrd, cmdline, floor)?;
            Ok(Some(BootEntry::Linux64 {
                entry: k.entry,
                zero_page: ZERO_PAGE,
            }))
        }
        _ => Ok(None),
    }
}

/// Load a kernel (bzImage, or ELF vmlinux with a PVH note; `image` is its file's bytes,
/// `name` what messages call it), initrd, command line and firmware tables; return the BSP
/// entry.
pub fn load_linux(
    m: &Machine,
    image: &[u8],
    name: &str,
    initrd: Option<Initrd>,
    cmdline: &str,
) -> Result<BootEntry, String> {
    let mem = &m.mem;
    let low_end = m.low_mem_end();
    if elf::is_elf(image) {
        let mut s = ElfStream::new(image, HIMEM_START, low_end)
            .map_err(|e| format!("kernel '{name}' cannot be loaded: {e}"))?;
        s.feed(image, &mut guest_writer(mem))?;
        let k = s.finish(&mut guest_zeroer(mem), &mut guest_reader(mem))?;
        let Some(entry) = k.pvh_entry else {
            return Err(format!(
                "ELF kernel '{name}' has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY); use a bzImage"
            ));
        };
        return setup_pvh(m, k.end, entry, initrd, cmdline);
    }
    if let Some(entry) = load_decompressed(m, image, initrd, cmdline)? {
        return Ok(entry);
    }
    let res = BzImage::load(
        mem,
        Some(GuestAddress(HIMEM_START)),
        &mut std::io::Cursor::new(image),
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|e| format!("'{name}' is not a bzImage kernel this vmm can boot ({e})"))?;
    let hdr = res.setup_header.ok_or("kernel has no setup header")?;
    if hdr.version < 0x020c || hdr.xloadflags & 1 == 0 {
        return Err(format!(
            "kernel '{name}' does not support the 64-bit boot protocol"
        ));
    }
    let init_end = HIMEM_START + (hdr.init_size as u64).max(res.kernel_end - HIMEM_START);
    if init_end > low_end {
        return Err(format!(
            "memory size {} MiB is too small for this kernel",
            m.mem_size >> 20
        ));
    }
    setup_zero_page(m, image, initrd, cmdline, init_end)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_mem(size: usize) -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    /// Load through both paths; they must agree.
    fn load_into(payload: &[u8], mem: &GuestMem) -> Result<LoadedElf, String> {
        use vm_memory::GuestMemoryBackend;
        let max = mem.last_addr().0 + 1;
        let seq = guest_mem(max as usize);
        let a = load_lz4_sequential(payload, HIMEM_START, max, &seq);
        let b = load_lz4_parallel(payload, HIMEM_START, max, mem)
            .map(|k| k.expect("8 MiB blocks: the parallel path must be taken"));
        assert_eq!(a.is_ok(), b.is_ok(), "{a:?} vs {b:?}");
        if let (Ok(x), Ok(y)) = (&a, &b) {
            assert_eq!(x, y);
            let mut va = vec![0u8; (y.end - y.start) as usize];
            let mut vb = va.clone();
            seq.read_slice(&mut va, GuestAddress(y.start)).unwrap();
            mem.read_slice(&mut vb, GuestAddress(y.start)).unwrap();
            assert!(va == vb, "parallel and sequential loads differ");
        }
        b
    }

    /// A bzImage-shaped file around `payload` (setup header only, as far as the direct
    /// boot reads it).
    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 2 * 512];
        img[0x1f1] = 1; // setup_sects
        img[0x201] = 0x6a;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
        img[0x248..0x24c].copy_from_slice(&0x40u32.to_le_bytes()); // payload_offset
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.resize(2 * 512 + 0x40, 0);
        img.extend_from_slice(payload);
        img.extend_from_slice(&[0u8; 16]);
        img
    }

    /// Program headers beyond the prefix the parallel loader decodes first: it declines,
    /// and the sequential loader puts the kernel in place.
    #[test]
    fn headers_past_the_prefix_load_sequentially() {
        let code: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let mut vmlinux = elf::build_test_elf(0x100_0000, &code, 0, Some(0x100_0100));
        let phoff = 0x2_0000usize;
        let table = vmlinux[64..64 + 2 * 56].to_vec();
        vmlinux.resize(phoff, 0);
        vmlinux.extend_from_slice(&table);
        vmlinux[32..40].copy_from_slice(&(phoff as u64).to_le_bytes());
        let payload = lz4::compress_legacy(&vmlinux, true);
        let gm = guest_mem(0x200_0000);
        let max = 0x200_0000;
        assert!(load_lz4_parallel(&payload, HIMEM_START, max, &gm)
            .unwrap()
            .is_none());
        let k = load_lz4_vmlinux(&payload, HIMEM_START, max, &gm).unwrap();
        assert_eq!((k.entry, k.pvh_entry), (0x100_0000, Some(0x100_0100)));
        let mut got = vec![0u8; code.len()];
        gm.read_slice(&mut got, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(got, code);
    }

    /// Kernels with random damage (ELF and program headers, the PVH note, segment data,
    /// LZ4 block sizes, data and trailer) load or fail with an error, never a panic, and the
    /// two loaders agree on which. `TEST_SEED` replays a run, `KERNEL_ROUNDS` sets its length.
    #[test]
    fn damaged_kernels_fail_cleanly() {
        let code: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let vmlinux = elf::build_test_elf(0x100_0000, &code, 0x3000, Some(0x100_0100));
        let note = 0x1000 + code.len();
        let seed = integration_tests::seed(0xdead_0e1f);
        let mut rng = integration_tests::Rng::new(seed);
        let (max, a, b) = (0x180_0000, guest_mem(0x180_0000), guest_mem(0x180_0000));
        let junk = |rng: &mut integration_tests::Rng| -> u64 {
            match rng.below(5) {
                0 => 0,
                1 => u64::MAX - rng.below(16),
                2 => 1 << rng.below(64),
                3 => rng.below(0x200_0000),
                _ => rng.next_u64(),
            }
        };
        let (mut loaded, mut failed) = (0, 0);
        let rounds = std::env::var("KERNEL_ROUNDS").map_or(300, |v| v.parse().unwrap());
        for round in 0..rounds {
            let mut elf = vmlinux.clone();
            for _ in 0..1 + rng.below(3) {
                let at = match rng.below(3) {
                    0 => rng.below(64 + 2 * 56) as usize,
                    1 => note + rng.below(48) as usize,
                    _ => rng.below(elf.len() as u64) as usize,
                };
                let n = (*rng.pick(&[1usize, 2, 4, 8])).min(elf.len() - at);
                elf[at..at + n].copy_from_slice(&junk(&mut rng).to_le_bytes()[..n]);
            }
            let mut payload = lz4::compress_legacy(&elf, rng.chance(3, 4));
            if rng.chance(1, 3) {
                let len = payload.len();
                let at = match rng.below(3) {
                    0 => 4,
                    1 => len - 4,
                    _ => rng.below(len as u64) as usize,
                };
                let n = 4.min(len - at);
                payload[at..at + n].copy_from_slice(&junk(&mut rng).to_le_bytes()[..n]);
            }
            if rng.chance(1, 10) {
                payload.truncate(rng.below(payload.len() as u64) as usize);
            }
            let run = |load: &dyn Fn() -> Result<LoadedElf, String>| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)).unwrap_or_else(|_| {
                    panic!("round {round} (TEST_SEED={seed:#x}): the loader panicked")
                })
            };
            let fast = run(&|| load_lz4_vmlinux(&payload, HIMEM_START, max, &a));
            let slow = run(&|| load_lz4_sequential(&payload, HIMEM_START, max, &b));
            assert_eq!(
                fast.as_ref().ok(),
                slow.as_ref().ok(),
                "round {round} (TEST_SEED={seed:#x}): {fast:?} vs {slow:?}"
            );
            if fast.is_ok() {
                loaded += 1;
            } else {
                failed += 1;
            }
        }
        eprintln!("damaged kernels: {loaded} loaded, {failed} failed cleanly");
        // Both outcomes must occur, or the damage is not reaching what it should.
        assert!(
            loaded > 10 && failed > 10,
            "{loaded} loaded, {failed} failed"
        );
    }

    #[test]
    fn lz4_bzimage_payload_loads() {
        // A vmlinux spanning several LZ4 blocks, framed like the kernel build does.
        let code: Vec<u8> = (0..(lz4::BLOCK_SIZE + 4096) as u32)
            .map(|i| (i % 253) as u8)
            .collect();
        let vmlinux = elf::build_test_elf(0x100_0000, &code, 0x3000, Some(0x100_0100));
        let img = fake_bzimage(&lz4::compress_legacy(&vmlinux, true));
        let h = parse_bzimage_header(&img).unwrap();
        assert_eq!((h.version, h.xloadflags), (0x020f, 1));
        let payload = &img[h.payload.clone()];
        assert!(lz4::is_legacy_frame(payload));
        let gm = guest_mem(0x300_0000);
        let k = load_into(payload, &gm).unwrap();
        let mut mem = vec![0u8; 0x300_0000];
        gm.read_slice(&mut mem, GuestAddress(0)).unwrap();
        assert_eq!(k.entry, 0x100_0000);
        assert_eq!(k.pvh_entry, Some(0x100_0100));
        assert_eq!(k.end, 0x100_0000 + code.len() as u64 + 0x3000);
        assert_eq!(&mem[0x100_0000..0x100_0000 + code.len()], &code[..]);
        assert!(mem[0x100_0000 + code.len()..k.end as usize]
            .iter()
            .all(|&b| b == 0));
        // Too little memory: an error, not a panic.
        assert!(load_into(payload, &guest_mem(0x180_0000)).is_err());
        // Not a bzImage.
        assert!(parse_bzimage_header(&vmlinux).is_none());
    }

    /// The Debian cloud kernel the VM tests boot: its LZ4 payload decompresses (size trailer
    /// checked) to a vmlinux that loads at the image's preferred address with a PVH entry.
    #[test]
    fn debian_kernel_decompresses() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
        let k = fixtures.join("cache/vmlinuz");
        if !k.exists() {
            if std::env::var_os("CI").is_none() {
                eprintln!("SKIPPED: no fixtures/cache/vmlinuz (run fixtures/fetch-guest.sh)");
                return;
            }
            let st = std::process::Command::new(fixtures.join("fetch-guest.sh"))
                .status()
                .expect("running fixtures/fetch-guest.sh");
            assert!(st.success(), "fixtures/fetch-guest.sh failed");
        }
        let img = std::fs::read(&k).unwrap();
        let h = parse_bzimage_header(&img).expect("a bzImage");
        let payload = &img[h.payload.clone()];
        assert!(
            lz4::is_legacy_frame(payload),
            "the kernel is not LZ4-compressed"
        );
        let pref = u64::from_le_bytes(img[0x258..0x260].try_into().unwrap());
        let init_size = u32::from_le_bytes(img[0x260..0x264].try_into().unwrap()) as u64;
        let mem = guest_mem((pref + init_size) as usize);
        let l = load_into(payload, &mem).unwrap();
        assert_eq!(l.start, pref);
        assert_eq!(l.entry, pref, "startup_64 is at the start of the image");
        assert!(l.end <= pref + init_size);
        let pvh = l.pvh_entry.expect("Debian's kernel has CONFIG_PVH") as u64;
        assert!(pvh > l.start && pvh < l.end);
    }
}
