//! Emulated devices.

pub mod legacy;
pub mod pci;
pub mod serial;
pub mod virtio;
