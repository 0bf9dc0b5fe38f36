//! The KVM VM: memory layout, in-kernel irqchip and PIT, and the devices on its buses.

use std::io::Write;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use common::BlockDriver;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::Bus;
use crate::devices::cmos::{Cmos, CmosLayout, CMOS_LEN, CMOS_PORT};
use crate::devices::fw_cfg::{FW_CFG_LEN, FW_CFG_PORT};
use crate::devices::legacy::{AcpiPm, Sink, ACPI_PM_BASE, ACPI_PM_LEN, I8042};
use crate::devices::pci::{
    HostBridge, PciBus, PciConfigIo, PciMmio, SharedPciDevice, PCI_MMIO_SIZE, PCI_MMIO_START,
};
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::pci::{VirtioPci, BAR_SIZE};
use crate::devices::virtio::VirtioDevice;
use crate::firmware::Firmware;
use crate::irq::GsiRouting;
use crate::ram::Ram;
use crate::tap::PacketBackend;
use crate::{GuestMem, VmExit};

/// Guest RAM below 4 GiB ends here at the latest; above is the MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const FOUR_GIB: u64 = 1 << 32;
pub const SERIAL_IRQ: u32 = 4;
const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// Where the firmware's PCI memory window ends (the IOAPIC follows).
const FIRMWARE_PCI_END: u64 = 0xfec0_0000;
/// PCI slot of the first disk (the host bridge is slot 0).
pub const FIRST_DISK_SLOT: u8 = 1;

/// A disk as the VM attaches it.
pub struct VmDisk {
    pub driver: Arc<dyn BlockDriver>,
    pub read_only: bool,
    pub serial: String,
}

/// A NIC as the VM attaches it.
pub struct VmNic {
    pub backend: Arc<dyn PacketBackend>,
    pub mac: [u8; 6],
}

/// The machine: VM fd, memory and devices, before or while vCPUs run.
pub struct Machine {
    pub kvm: Kvm,
    pub vm: Arc<VmFd>,
    /// Guest RAM. The machine unmaps it when dropped: clones must not outlive the machine
    /// (the devices' do not: they go with the buses).
    pub mem: GuestMem,
    pub mem_size: u64,
    pub cpus: u8,
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub pci: PciBus,
    pub exit_tx: Sender<VmExit>,
    pub exit_rx: Receiver<VmExit>,
    pub routing: Arc<GsiRouting>,
    /// The mappings behind `mem`; last, so that it is dropped after everything using them.
    ram: Ram,
}

/// RAM ranges for `size` bytes of memory, skipping the MMIO hole below 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (GuestAddress(FOUR_GIB), (size - MMIO_HOLE_START) as usize),
        ]
    }
}

fn kvm_err(what: &str) -> impl Fn(kvm_ioctls::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Machine {
    /// Create the VM with `mem_size` bytes of RAM, `cpus` vCPUs (created later), the
    /// serial console writing to `console`, one virtio-blk device per disk and one
    /// virtio-net device per NIC, for a kernel loaded directly (BARs placed, no
    /// firmware interfaces).
    pub fn new(
        mem_size: u64,
        cpus: u8,
        console: Box<dyn Write + Send>,
        disks: Vec<VmDisk>,
        nics: Vec<VmNic>,
    ) -> Result<Machine, String> {
        Self::build(mem_size, cpus, console, disks, nics, None)
    }

    /// The same machine as QEMU's pc for `firmware`, started at the reset vector: the
    /// image in place (firmware.rs), an i440FX host bridge, CMOS and fw_cfg, and BARs left
    /// for the firmware to place.
    pub fn with_firmware(
        mem_size: u64,
        cpus: u8,
        console: Box<dyn Write + Send>,
        disks: Vec<VmDisk>,
        nics: Vec<VmNic>,
        firmware: &Firmware,
    ) -> Result<Machine, String> {
        Self::build(mem_size, cpus, console, disks, nics, Some(firmware))
    }

    fn build(
        mem_size: u64,
        cpus: u8,
        console: Box<dyn Write + Send>,
        disks: Vec<VmDisk>,
        nics: Vec<VmNic>,
        firmware: Option<&Firmware>,
    ) -> Result<Machine, String> {
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT => {
                "/dev/kvm not found: is KVM enabled (kvm_intel/kvm_amd loaded)?".to_string()
            }
            libc::EACCES | libc::EPERM => {
                "no permission to open /dev/kvm (add the user to the kvm group)".to_string()
            }
            _ => format!("cannot open /dev/kvm: {e}"),
        })?;
        if kvm.get_api_version() != 12 {
            return Err("unsupported KVM API version".into());
        }
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("cannot create VM"))?);

        let mut ranges = ram_ranges(mem_size);
        if let Some(f) = firmware {
            ranges.push((GuestAddress(f.base()), f.image.len()));
            ranges.sort_by_key(|r| r.0);
        }
        let (mem, ram) = Ram::new(&ranges).map_err(|e| {
            format!(
                "cannot allocate {} MiB of guest memory: {e}",
                mem_size >> 20
            )
        })?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| format!("guest memory: {e}"))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region stays mapped for as long as `mem` (kept in Machine) lives,
            // which outlives the VM's use of it.
            unsafe { vm.set_user_memory_region(r) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        if let Some(f) = firmware {
            f.install(&mem)?;
        }

        vm.set_tss_address(TSS_ADDR)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        let _ = vm.set_identity_map_address(IDENTITY_MAP_ADDR);
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        let routing = Arc::new(GsiRouting::new(vm.clone()));
        routing.init()?;

        let (exit_tx, exit_rx) = channel();
        let mut io_bus = Bus::new();
        let mut mmio_bus = Bus::new();

        let serial_evt = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        vm.register_irqfd(&serial_evt, SERIAL_IRQ)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_evt, console)));
        io_bus.insert(0x3f8, 8, serial.clone())?;
        // Other COM ports, so probing them finds nothing rather than floating bits.
        for base in [0x2f8, 0x3e8, 0x2e8] {
            io_bus.insert(base, 8, Arc::new(Mutex::new(Sink)))?;
        }
        io_bus.insert(
            I8042::BASE,
            I8042::LEN,
            Arc::new(Mutex::new(I8042::new(exit_tx.clone()))),
        )?;
        io_bus.insert(
            ACPI_PM_BASE,
            ACPI_PM_LEN,
            Arc::new(Mutex::new(AcpiPm::new(exit_tx.clone()))),
        )?;
        io_bus.insert(0x80, 1, Arc::new(Mutex::new(Sink)))?;
        let low_mem_end = mem_size.min(MMIO_HOLE_START);
        if firmware.is_some() {
            let layout = CmosLayout {
                mem_below_4g: low_mem_end,
                mem_above_4g: mem_size - low_mem_end,
                cpus,
            };
            io_bus.insert(CMOS_PORT, CMOS_LEN, Arc::new(Mutex::new(Cmos::new(layout))))?;
            let fw_cfg = crate::firmware::fw_cfg(&layout, FIRST_DISK_SLOT)?;
            io_bus.insert(FW_CFG_PORT, FW_CFG_LEN, Arc::new(Mutex::new(fw_cfg)))?;
        }

        let mut pci = PciBus::default();
        let bridge = match firmware {
            Some(_) => HostBridge::i440fx(),
            None => HostBridge::new(),
        };
        pci.devices.push(Arc::new(Mutex::new(bridge)));
        let blks = disks.into_iter().map(|d| -> Box<dyn VirtioDevice> {
            Box::new(Block::new(d.driver, d.read_only, &d.serial))
        });
        let nets = nics
            .into_iter()
            .map(|n| -> Box<dyn VirtioDevice> { Box::new(Net::new(n.backend, n.mac)) });
        for (i, virtio) in blks.chain(nets).enumerate() {
            if pci.devices.len() >= crate::devices::pci::PCI_SLOTS {
                return Err("too many drives and NICs".into());
            }
            let bar = firmware
                .is_none()
                .then(|| PCI_MMIO_START + i as u64 * BAR_SIZE);
            let dev = VirtioPci::new(vm.clone(), mem.clone(), routing.clone(), virtio, bar)?;
            let dev: SharedPciDevice = Arc::new(Mutex::new(dev));
            pci.devices.push(dev);
        }
        io_bus.insert(
            PciConfigIo::BASE,
            PciConfigIo::LEN,
            Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
        )?;
        // The firmware places BARs anywhere between RAM and the IOAPIC.
        let (window, window_len) = match firmware {
            Some(_) => (low_mem_end, FIRMWARE_PCI_END - low_mem_end),
            None => (PCI_MMIO_START, PCI_MMIO_SIZE),
        };
        mmio_bus.insert(
            window,
            window_len,
            Arc::new(Mutex::new(PciMmio::new(pci.clone(), window))),
        )?;

        Ok(Machine {
            kvm,
            vm,
            mem,
            mem_size,
            cpus,
            io_bus: Arc::new(io_bus),
            mmio_bus: Arc::new(mmio_bus),
            serial,
            pci,
            exit_tx,
            exit_rx,
            routing,
            ram,
        })
    }

    /// End of RAM below 4 GiB.
    pub fn low_mem_end(&self) -> u64 {
        self.mem_size.min(MMIO_HOLE_START)
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // vCPU threads hold the buses, and through them the devices and their I/O threads;
        // if one of them never stopped, guest memory must stay mapped for it.
        if Arc::strong_count(&self.io_bus) > 1 || Arc::strong_count(&self.mmio_bus) > 1 {
            self.ram.keep();
        }
    }
}
