//! Tiny real guests on /dev/kvm: serial output, i8042 reset, ACPI poweroff, PCI config
//! space through 0xcf8/0xcfc, and a virtio-blk queue kicked through the ioeventfd.

use std::sync::Arc;
use std::time::Duration;

use integration_tests::fake_kernel::RESET;
use integration_tests::kvm::have_kvm;
use integration_tests::mem_disk::MemDisk;
use vm_memory::{Bytes, GuestAddress};
use vmm::boot::BootEntry;
use vmm::devices::serial::SharedBuf;
use vmm::vm::{Machine, VmDisk};
use vmm::VmExit;

fn machine(disks: Vec<VmDisk>) -> (Machine, SharedBuf) {
    let out = SharedBuf::default();
    let m = Machine::new(64 << 20, 1, Box::new(out.clone()), disks, vec![]).expect("machine");
    (m, out)
}

/// Run 16-bit `code` loaded at 0x1000 until the VM stops.
fn run_real(m: &Machine, code: &[u8]) -> VmExit {
    m.mem.write_slice(code, GuestAddress(0x1000)).unwrap();
    let r = m.start(BootEntry::Real { ip: 0x1000 }).unwrap();
    let why = m
        .wait(Some(Duration::from_secs(60)))
        .expect("guest did not stop in time");
    r.stop();
    why
}

#[test]
fn serial_output_and_i8042_reset() {
    if !have_kvm() {
        return;
    }
    let (m, out) = machine(vec![]);
    let mut code = vec![0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for &c in b"Hello\n" {
        code.extend_from_slice(&[0xb0, c, 0xee]); // mov al, c; out dx, al
    }
    code.extend_from_slice(RESET);
    assert_eq!(run_real(&m, &code), VmExit::Reboot);
    assert_eq!(&*out.0.lock().unwrap(), b"Hello\n");
}

/// The guest's CPUID leaf 1 shows the TSC-deadline timer whenever KVM can emulate it (it
/// is not in KVM's supported set, so vmm has to add it; Linux otherwise calibrates the
/// LAPIC timer at boot) and the hypervisor bit.
#[test]
fn cpuid_shows_tsc_deadline_and_hypervisor() {
    if !have_kvm() {
        return;
    }
    let (m, out) = machine(vec![]);
    let mut code = vec![
        0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
        0x66, 0x31, 0xc9, // xor ecx, ecx
        0x0f, 0xa2, // cpuid
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
    ];
    for shift in [24u8, 31] {
        code.extend_from_slice(&[
            0x66, 0x89, 0xc8, // mov eax, ecx
            0x66, 0xc1, 0xe8, shift, // shr eax, shift
            0x24, 0x01, // and al, 1
            0x04, b'0', // add al, '0'
            0xee, // out dx, al
        ]);
    }
    code.extend_from_slice(RESET);
    assert_eq!(run_real(&m, &code), VmExit::Reboot);
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    let want = format!("{}1", deadline as u8);
    assert_eq!(String::from_utf8_lossy(&out.0.lock().unwrap()), want);
}

/// Guest RAM stays mapped after the machine is gone while something still holds its buses
/// (as a vCPU thread that could not be stopped does); reading it then must not fault.
#[test]
fn ram_stays_mapped_while_the_buses_are_shared() {
    if !have_kvm() {
        return;
    }
    let (m, _) = machine(vec![]);
    let bus = m.io_bus.clone();
    let mem = m.mem.clone();
    mem.write_obj(7u8, GuestAddress(0x1234)).unwrap();
    drop(m);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1234)).unwrap(), 7);
    drop(bus);
}

#[test]
fn acpi_poweroff() {
    if !have_kvm() {
        return;
    }
    let (m, _) = machine(vec![]);
    // mov dx, 0x600; mov al, SLP_EN | SLP_TYP(5) << 2; out dx, al; hlt
    let code = [0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4, 0xeb, 0xfd];
    assert_eq!(run_real(&m, &code), VmExit::Poweroff);
}

#[test]
fn triple_fault_is_an_error() {
    if !have_kvm() {
        return;
    }
    let (m, _) = machine(vec![]);
    // lidt [zero-limit descriptor]; int3 -> triple fault.
    m.mem.write_slice(&[0u8; 6], GuestAddress(0x3000)).unwrap();
    let code = [0x0f, 0x01, 0x1e, 0x00, 0x30, 0xcc, 0xf4];
    // Real KVM reports a triple fault; the software backend on some hosts reports an
    // emulation failure instead. Either way it is an error exit, not a clean stop.
    match run_real(&m, &code) {
        VmExit::Error(e) => assert!(!e.is_empty()),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn pci_config_space() {
    if !have_kvm() {
        return;
    }
    let disk = Arc::new(MemDisk::new(1 << 20, false));
    let (m, _) = machine(vec![VmDisk {
        driver: disk,
        read_only: false,
        serial: "x".into(),
    }]);
    let mut code = Vec::new();
    // For each (address, store-to): mov eax, addr; mov dx, 0xcf8; out dx, eax;
    // mov dx, 0xcfc; in eax, dx; mov [store], eax
    let probes: [(u32, u16); 6] = [
        (0x8000_0000, 0x2000), // 00:00.0 vendor/device
        (0x8000_0008, 0x2004), // 00:00.0 class
        (0x8000_0800, 0x2008), // 00:01.0 vendor/device
        (0x8000_0834, 0x200c), // 00:01.0 capability pointer
        (0x8000_1000, 0x2010), // 00:02.0: nothing there
        (0x8000_0810, 0x2014), // 00:01.0 BAR0
    ];
    for (addr, store) in probes {
        code.extend_from_slice(&[0x66, 0xb8]);
        code.extend_from_slice(&addr.to_le_bytes());
        code.extend_from_slice(&[0xba, 0xf8, 0x0c, 0x66, 0xef, 0xba, 0xfc, 0x0c, 0x66, 0xed]);
        code.extend_from_slice(&[0x66, 0xa3]);
        code.extend_from_slice(&store.to_le_bytes());
    }
    // BAR sizing from the guest: write all ones to 00:01.0 BAR0, read back.
    code.extend_from_slice(&[0x66, 0xb8]);
    code.extend_from_slice(&0x8000_0810u32.to_le_bytes());
    code.extend_from_slice(&[0xba, 0xf8, 0x0c, 0x66, 0xef]);
    code.extend_from_slice(&[
        0x66, 0xb8, 0xff, 0xff, 0xff, 0xff, 0xba, 0xfc, 0x0c, 0x66, 0xef,
    ]);
    code.extend_from_slice(&[0x66, 0xed, 0x66, 0xa3, 0x18, 0x20]);
    code.extend_from_slice(RESET);
    assert_eq!(run_real(&m, &code), VmExit::Reboot);
    let rd = |a: u64| m.mem.read_obj::<u32>(GuestAddress(a)).unwrap();
    assert_eq!(rd(0x2000), 0x29c0_8086);
    assert_eq!(rd(0x2004) >> 8, 0x06_00_00);
    assert_eq!(rd(0x2008), 0x1042_1af4);
    assert_eq!(rd(0x200c) & 0xff, 0x40);
    assert_eq!(rd(0x2010), 0xffff_ffff);
    assert_eq!(rd(0x2014), 0xc000_0000);
    assert_eq!(rd(0x2018), 0xffff_8000);
}

#[test]
fn long_mode_entry_like_linux() {
    if !have_kvm() {
        return;
    }
    let (m, out) = machine(vec![]);
    vmm::boot::setup_long_mode_tables(&m.mem).unwrap();
    // 64-bit code: mov dx,0x3f8; mov al,'L'; out dx,al; mov eax,esi; shr eax,8; out dx,al;
    // then touch memory above 32 MiB through the identity map and reset.
    let code = [
        &[
            0x66, 0xba, 0xf8, 0x03, 0xb0, b'L', 0xee, 0x89, 0xf0, 0xc1, 0xe8, 0x08,
            0xee, // print
            0xc6, 0x04, 0x25, 0x00, 0x00, 0x00, 0x03, 0x2a, // mov byte [0x3000000], 42
        ],
        RESET,
    ]
    .concat();
    m.mem.write_slice(&code, GuestAddress(0x10_0200)).unwrap();
    let r = m
        .start(BootEntry::Linux64 {
            entry: 0x10_0200,
            zero_page: 0x7000,
        })
        .unwrap();
    let why = m.wait(Some(Duration::from_secs(60)));
    r.stop();
    assert_eq!(why, Some(VmExit::Reboot));
    assert_eq!(&*out.0.lock().unwrap(), b"Lp");
    assert_eq!(m.mem.read_obj::<u8>(GuestAddress(0x300_0000)).unwrap(), 42);
}

#[test]
fn serial_input_reaches_the_guest() {
    if !have_kvm() {
        return;
    }
    let (m, out) = machine(vec![]);
    // Echo every received byte until '!': poll LSR.DR, read RBR, write THR.
    let mut code = vec![
        0xba, 0xfd, 0x03, // 0: mov dx, 0x3fd
        0xec, // 3: in al, dx
        0xa8, 0x01, // test al, 1
        0x74, 0xfb, // jz 3
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xec, 0xee, // in al, dx; out dx, al
        0x3c, b'!', // cmp al, '!'
        0x75, 0xef, // jne 0
    ];
    code.extend_from_slice(RESET);
    m.mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
    let r = m.start(BootEntry::Real { ip: 0x1000 }).unwrap();
    // More than the 64-byte FIFO, so feeding has to wait for the guest.
    let mut input: Vec<u8> = (0..200).map(|i| b'a' + (i % 26) as u8).collect();
    input.push(b'!');
    vmm::devices::serial::feed_input(&m.serial, &input);
    let why = m.wait(Some(Duration::from_secs(120)));
    r.stop();
    assert_eq!(why, Some(VmExit::Reboot));
    assert_eq!(*out.0.lock().unwrap(), input);
}

#[test]
fn memory_above_4g_skips_the_mmio_hole() {
    if !have_kvm() {
        return;
    }
    let m = Machine::new(5 << 30, 1, Box::new(SharedBuf::default()), vec![], vec![]).unwrap();
    assert_eq!(m.low_mem_end(), 0xc000_0000);
    // RAM resumes at 4 GiB; the hole (PCI window, IOAPIC, LAPIC) is not RAM.
    m.mem
        .write_obj(7u64, GuestAddress((1 << 32) + (2 << 30) - 8))
        .unwrap();
    assert!(m.mem.write_obj(7u64, GuestAddress(0xc000_0000)).is_err());
    assert!(m
        .mem
        .write_obj(7u64, GuestAddress((1 << 32) + (2 << 30)))
        .is_err());
}

/// A guest that pokes junk of every width at every port and at the PCI MMIO window (UART,
/// i8042, ACPI PM, PCI configuration including BARs and the command register, the virtio
/// BAR wherever it moved): vmm must not panic or hang, and the buses still answer.
#[test]
fn port_and_mmio_junk_is_harmless() {
    if !have_kvm() {
        return;
    }
    use vmm::devices::legacy::{ACPI_PM_BASE, I8042};
    use vmm::devices::pci::{PCI_MMIO_SIZE, PCI_MMIO_START};
    let seed = integration_tests::seed(0x9047_5eed);
    let mut rng = integration_tests::Rng::new(seed);
    let disk = Arc::new(MemDisk::new(1 << 20, false));
    let (m, _) = machine(vec![VmDisk {
        driver: disk,
        read_only: false,
        serial: "junk".into(),
    }]);
    let host_bridge_id = |m: &Machine| {
        m.io_bus.write(0xcf8, &0x8000_0000u32.to_le_bytes());
        let mut id = [0u8; 4];
        m.io_bus.read(0xcfc, &mut id);
        id
    };
    let before = host_bridge_id(&m);
    let ports: [(u64, u64); 7] = [
        (0x3f8, 8),
        (0x2f8, 8),
        (I8042::BASE, I8042::LEN),
        (ACPI_PM_BASE, 4),
        (0x80, 1),
        (0xcf8, 8),
        (0, 0x10000),
    ];
    for _ in 0..20_000 {
        let width = *rng.pick(&[1usize, 2, 3, 4, 8]);
        let v = rng.next_u64().to_le_bytes();
        let write = rng.chance(2, 3);
        let (bus, addr) = if rng.chance(3, 4) {
            let &(base, len) = rng.pick(&ports);
            let addr = if base == 0xcf8 && rng.chance(1, 2) {
                // A configuration address: enable bit, bus 0, a device, any register.
                let a = 0x8000_0000u32 | (rng.below(4) as u32) << 11 | rng.below(0x100) as u32;
                m.io_bus.write(0xcf8, &a.to_le_bytes());
                0xcfc + rng.below(4)
            } else {
                base + rng.below(len)
            };
            (&m.io_bus, addr)
        } else {
            let near_bar = PCI_MMIO_START + rng.below(0x8000);
            let anywhere = PCI_MMIO_START + rng.below(PCI_MMIO_SIZE);
            (&m.mmio_bus, *rng.pick(&[near_bar, anywhere]))
        };
        if write {
            bus.write(addr, &v[..width]);
        } else {
            let mut b = [0u8; 8];
            bus.read(addr, &mut b[..width]);
        }
    }
    assert_eq!(host_bridge_id(&m), before, "TEST_SEED={seed:#x}");
}
