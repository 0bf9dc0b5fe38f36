//! vCPU setup (CPUID, MSRs, LAPIC, registers) and the per-vCPU run loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::boot::{BootEntry, BOOT_STACK, GDT_ADDR, IDT_ADDR, PML4_ADDR};
use crate::bus::Bus;
use crate::VmExit;

fn kerr(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// CPUID for vCPU `id` of `cpus`: KVM's supported set with our APIC ID and topology
/// (one socket, one thread per core).
fn setup_cpuid(kvm: &Kvm, vcpu: &VcpuFd, id: u8, cpus: u8) -> Result<(), String> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kerr("KVM_GET_SUPPORTED_CPUID"))?;
    let id = id as u32;
    let n = cpus as u32;
    let shift = 32 - (n.max(1) - 1).leading_zeros();
    // KVM emulates the TSC-deadline timer with the in-kernel LAPIC but leaves the bit out
    // of its supported set; without it Linux calibrates the LAPIC timer at boot.
    let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0xffff) | (id << 24) | ((n.next_power_of_two() & 0xff) << 16);
                e.ecx |= 1 << 31; // hypervisor
                if tsc_deadline {
                    e.ecx |= 1 << 24;
                }
                if n > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical processor
                }
            }
            4 => {
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 {
                    n.next_power_of_two() - 1
                } else {
                    0
                };
                e.eax = (e.eax & 0x3fff)
                    | ((sharing & 0xfff) << 14)
                    | (((n.next_power_of_two() - 1) & 0x3f) << 26);
            }
            0xb | 0x1f => {
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = shift;
                        e.ebx = n;
                        e.ecx = (2 << 8) | 1;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
                e.edx = id;
            }
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(kerr("KVM_SET_CPUID2"))
}

fn setup_msrs(vcpu: &VcpuFd) -> Result<(), String> {
    let entries: Vec<kvm_msr_entry> = [
        (0x174u32, 0u64),       // SYSENTER_CS
        (0x175, 0),             // SYSENTER_ESP
        (0x176, 0),             // SYSENTER_EIP
        (0xc000_0081, 0),       // STAR
        (0xc000_0082, 0),       // LSTAR
        (0xc000_0083, 0),       // CSTAR
        (0xc000_0084, 0),       // SYSCALL_MASK
        (0xc000_0102, 0),       // KERNEL_GS_BASE
        (0x10, 0),              // TSC
        (0x1a0, 1),             // MISC_ENABLE: fast strings
        (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
    // Some backends refuse a few of these; that is not fatal for booting.
    vcpu.set_msrs(&msrs).map_err(kerr("KVM_SET_MSRS"))?;
    Ok(())
}

fn setup_lapic(vcpu: &VcpuFd) -> Result<(), String> {
    let mut l = vcpu.get_lapic().map_err(kerr("KVM_GET_LAPIC"))?;
    let get = |l: &kvm_bindings::kvm_lapic_state, off: usize| {
        let b: Vec<u8> = l.regs[off..off + 4].iter().map(|&x| x as u8).collect();
        u32::from_le_bytes(b.try_into().unwrap())
    };
    let set = |l: &mut kvm_bindings::kvm_lapic_state, off: usize, v: u32| {
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            l.regs[off + i] = *b as _;
        }
    };
    // LINT0: ExtINT; LINT1: NMI.
    let lvt0 = get(&l, 0x350);
    set(&mut l, 0x350, (lvt0 & !0x700) | (7 << 8));
    let lvt1 = get(&l, 0x360);
    set(&mut l, 0x360, (lvt1 & !0x700) | (4 << 8));
    vcpu.set_lapic(&l).map_err(kerr("KVM_SET_LAPIC"))
}

fn seg(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Load `code` into CS and `data` into every data segment register.
fn set_flat_segments(sregs: &mut kvm_bindings::kvm_sregs, code: kvm_segment, data: kvm_segment) {
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
}

/// A busy 32/64-bit TSS descriptor at `selector` (VMX entry needs a usable TR).
fn task_segment(limit: u32, selector: u16) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit,
        selector,
        type_: 0xb,
        present: 1,
        s: 0,
        ..Default::default()
    }
}

fn setup_regs(vcpu: &VcpuFd, entry: &BootEntry) -> Result<(), String> {
    let mut sregs = vcpu.get_sregs().map_err(kerr("KVM_GET_SREGS"))?;
    let mut regs = kvm_regs {
        rflags: 2,
        ..Default::default()
    };
    match *entry {
        BootEntry::Linux64 { entry, zero_page } => {
            let code = seg(0x10, 0xb, 1, 0);
            let data = seg(0x18, 0x3, 0, 1);
            set_flat_segments(&mut sregs, code, data);
            sregs.tr = task_segment(0xffff, 0x20);
            sregs.gdt.base = GDT_ADDR;
            sregs.gdt.limit = (crate::boot::GDT.len() * 8 - 1) as u16;
            sregs.idt.base = IDT_ADDR;
            sregs.idt.limit = 7;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= 1 << 5; // PAE
            sregs.cr0 = (sregs.cr0 & !0x6000_0000) | 0x8000_0001 | 0x10; // PG, PE, ET; caches on
            sregs.efer |= 0x500; // LME, LMA
            regs.rip = entry;
            regs.rsi = zero_page;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
        }
        BootEntry::Pvh { entry, start_info } => {
            let code = seg(0x08, 0xb, 0, 1);
            let data = seg(0x10, 0x3, 0, 1);
            set_flat_segments(&mut sregs, code, data);
            sregs.tr = task_segment(0x67, 0x18);
            sregs.cr0 = (sregs.cr0 & !0x6000_0000) | 0x11; // PE, ET
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry as u64;
            regs.rbx = start_info as u64;
        }
        BootEntry::Protected32 { entry } => {
            let code = seg(0x08, 0xb, 0, 1);
            let data = seg(0x10, 0x3, 0, 1);
            set_flat_segments(&mut sregs, code, data);
            sregs.cr0 |= 1;
            regs.rip = entry as u64;
            regs.rsp = 0x8000;
        }
        BootEntry::ResetVector => {}
        BootEntry::Real { ip } => {
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
            regs.rip = ip as u64;
            regs.rsp = 0x8000;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kerr("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(kerr("KVM_SET_REGS"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kerr("KVM_SET_FPU"))
}

/// Create and configure vCPU `id`; the BSP (id 0) gets `entry`, APs wait for INIT/SIPI.
pub fn create_vcpu(
    kvm: &Kvm,
    vm: &VmFd,
    id: u8,
    cpus: u8,
    entry: &BootEntry,
) -> Result<VcpuFd, String> {
    let vcpu = vm
        .create_vcpu(id as u64)
        .map_err(|e| format!("cannot create vCPU {id}: {e}"))?;
    setup_cpuid(kvm, &vcpu, id, cpus)?;
    setup_msrs(&vcpu)?;
    setup_lapic(&vcpu)?;
    if id == 0 && !matches!(entry, BootEntry::ResetVector) {
        setup_regs(&vcpu, entry)?;
    }
    Ok(vcpu)
}

extern "C" fn kick_handler(_: libc::c_int) {}

/// The signal used to knock a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Install the (empty) handler for [`kick_signal`], without SA_RESTART so KVM_RUN
/// returns EINTR.
pub fn install_kick_handler() {
    // SAFETY: installing a handler that does nothing is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = kick_handler as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
    }
}

/// A running vCPU thread.
pub struct VcpuHandle {
    pub thread: JoinHandle<()>,
}

/// Run `vcpu` on its own thread until the VM stops.
pub fn spawn(
    id: u8,
    mut vcpu: VcpuFd,
    io: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Sender<VmExit>,
    stop: Arc<AtomicBool>,
) -> Result<VcpuHandle, String> {
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            let r = run_loop(id, &mut vcpu, &io, &mmio, &stop);
            if let Some(r) = r {
                let _ = exit.send(r);
            }
        })
        .map_err(|e| format!("cannot start vCPU thread: {e}"))?;
    Ok(VcpuHandle { thread })
}

/// Bytes per element of the port I/O exit just taken: a string instruction (`rep insb`,
/// `rep outsw`) hands over all its elements in one exit, each a separate access.
fn io_element_size(vcpu: &mut VcpuFd, total: usize) -> usize {
    // SAFETY: called right after a KVM_EXIT_IO, so `io` is the valid member.
    let size = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.io.size } as usize;
    if size == 0 || !total.is_multiple_of(size) {
        total.max(1)
    } else {
        size
    }
}

fn run_loop(id: u8, vcpu: &mut VcpuFd, io: &Bus, mmio: &Bus, stop: &AtomicBool) -> Option<VmExit> {
    loop {
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let (p, n) = (data.as_ptr(), data.len());
                let size = io_element_size(vcpu, n);
                // SAFETY: `p` points into the vCPU's mmap (the PIO data page, past the
                // kvm_run struct), which lives as long as `vcpu`; nothing else touches it
                // before the next KVM_RUN.
                let data = unsafe { std::slice::from_raw_parts(p, n) };
                for e in data.chunks(size) {
                    io.write(port as u64, e);
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                let (p, n) = (data.as_mut_ptr(), data.len());
                let size = io_element_size(vcpu, n);
                // SAFETY: as above.
                let data = unsafe { std::slice::from_raw_parts_mut(p, n) };
                for e in data.chunks_mut(size) {
                    io.read(port as u64, e);
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                mmio.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio.write(addr, data);
            }
            Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => {}
            Ok(VcpuExit::Hlt) => return Some(VmExit::Error(format!("vCPU {id} halted"))),
            Ok(VcpuExit::Shutdown) => {
                return Some(VmExit::Error(format!("guest triple fault on vCPU {id}")))
            }
            Ok(VcpuExit::SystemEvent(ty, _)) => {
                return Some(match ty {
                    KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::Poweroff,
                    KVM_SYSTEM_EVENT_RESET => VmExit::Reboot,
                    t => VmExit::Error(format!("vCPU {id}: system event {t}")),
                })
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: after an internal-error exit the `internal` member is the valid one.
                let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                let data: Vec<String> = internal.data[..n]
                    .iter()
                    .map(|d| format!("{d:#x}"))
                    .collect();
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                return Some(VmExit::Error(format!(
                    "KVM internal error {} on vCPU {id} at rip {rip:#x} (data [{}])",
                    internal.suberror,
                    data.join(", ")
                )));
            }
            Ok(VcpuExit::FailEntry(reason, _)) => {
                return Some(VmExit::Error(format!(
                    "vCPU {id} failed to enter guest mode (reason {reason:#x})"
                )))
            }
            Ok(other) => {
                return Some(VmExit::Error(format!(
                    "vCPU {id}: unexpected exit {other:?}"
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Some(VmExit::Error(format!("vCPU {id}: KVM_RUN: {e}"))),
        }
    }
}
