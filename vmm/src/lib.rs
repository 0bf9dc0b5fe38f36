//! `vmm`: a minimal KVM hypervisor that boots a Linux bzImage with virtio-blk disks served
//! by the shared image engine.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod config;
pub mod devices;
pub mod disk;
pub mod diskboot;
pub mod firmware;
pub mod irq;
pub mod net_script;
pub mod qemu_args;
pub mod qemu_net;
pub mod ram;
pub mod run;
pub mod tap;
pub mod vcpu;
pub mod vm;

/// Guest memory as every part of vmm sees it.
pub type GuestMem = vm_memory::GuestMemoryMmap<()>;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5).
    Poweroff,
    /// The guest asked for a reset (i8042, ACPI reset register, KVM system event).
    Reboot,
    /// The user quit from the console (Ctrl-A x).
    Quit,
    /// SIGTERM, SIGINT or SIGHUP arrived (QEMU-style: stop cleanly, exit 0).
    Signal(i32),
    /// Something went wrong: a triple fault, an emulation failure, a host error.
    Error(String),
}

impl VmExit {
    /// Process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::Poweroff | VmExit::Reboot | VmExit::Quit | VmExit::Signal(_) => 0,
            VmExit::Error(_) => 1,
        }
    }
}
