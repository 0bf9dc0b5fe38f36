//! Virtio: split queues, the virtio-pci modern transport, and the block and network devices.

pub mod block;
pub mod cursor;
pub mod io_thread;
pub mod net;
pub mod pci;
pub mod queue;

use vmm_sys_util::eventfd::EventFd;

use crate::GuestMem;
pub use queue::{Queue, QueueConfig};

pub const VIRTIO_F_RING_INDIRECT_DESC: u32 = 28;
pub const VIRTIO_F_RING_EVENT_IDX: u32 = 29;
pub const VIRTIO_F_VERSION_1: u32 = 32;

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// "No MSI-X vector" in the common configuration.
pub const NO_VECTOR: u16 = 0xffff;

/// How a device's worker raises interrupts and reports that it gave up.
pub trait VirtioInterrupt: Send + Sync {
    /// Used buffers were added to queue `queue`.
    fn notify_queue(&self, queue: usize);
    /// The configuration changed (or the device needs a reset).
    fn notify_config(&self);
    /// The driver broke the protocol: set DEVICE_NEEDS_RESET and tell it.
    fn set_needs_reset(&self, why: &str);
}

/// A queue handed to a device at activation, with the eventfd the driver kicks.
pub struct ActiveQueue {
    pub queue: Queue,
    pub kick: EventFd,
}

/// The device half of a virtio device; the transport half is [`pci::VirtioPci`].
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u16;
    /// Feature bits offered.
    fn features(&self) -> u64;
    /// Maximum size of each queue (their count is the number of queues).
    fn queue_max_sizes(&self) -> Vec<u16>;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// DRIVER_OK: start serving `queues` with the negotiated `features`.
    fn activate(
        &mut self,
        mem: GuestMem,
        features: u64,
        queues: Vec<ActiveQueue>,
        irq: std::sync::Arc<dyn VirtioInterrupt>,
    ) -> Result<(), String>;
    /// Stop serving (device reset); waits for in-flight work.
    fn reset(&mut self);
}
