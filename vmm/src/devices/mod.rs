//! Emulated devices.

pub mod cmos;
pub mod fw_cfg;
pub mod legacy;
pub mod pci;
pub mod serial;
pub mod virtio;
