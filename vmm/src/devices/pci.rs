//! PCI: configuration mechanism #1 on 0xcf8/0xcfc, a host bridge at 00:00.0, the generic
//! type-0 configuration header with 32-bit memory BARs, and routing of BAR MMIO to devices.

use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;

/// Start of the 32-bit MMIO window handed out to BARs (below the IOAPIC/LAPIC area).
pub const PCI_MMIO_START: u64 = 0xc000_0000;
/// Size of that window.
pub const PCI_MMIO_SIZE: u64 = 0x1000_0000;
/// Number of device slots on bus 0.
pub const PCI_SLOTS: usize = 32;

/// A PCI function on bus 0.
pub trait PciDevice: Send {
    /// The generic configuration header and BAR state.
    fn config(&self) -> &PciConfig;
    fn config_mut(&mut self) -> &mut PciConfig;
    /// A configuration write landed (after the header applied it); `reg` is the dword
    /// index. Devices react to BAR moves and capability writes here.
    fn config_written(&mut self, _reg: usize) {}
    /// MMIO access inside BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// One memory BAR.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bar {
    pub addr: u64,
    pub size: u64,
}

/// Configuration space (256 bytes) with a write mask, and up to 6 32-bit memory BARs.
pub struct PciConfig {
    bytes: [u8; 256],
    wmask: [u8; 256],
    pub bars: [Option<Bar>; 6],
}

pub const PCI_COMMAND: usize = 0x04;
pub const PCI_COMMAND_MEMORY: u16 = 0x2;
pub const PCI_STATUS_CAP_LIST: u16 = 0x10;
pub const PCI_CAP_PTR: usize = 0x34;

impl PciConfig {
    pub fn new(
        vendor: u16,
        device: u16,
        class: u32,
        revision: u8,
        subsys_vendor: u16,
        subsys: u16,
    ) -> Self {
        let mut c = PciConfig {
            bytes: [0; 256],
            wmask: [0; 256],
            bars: [None; 6],
        };
        c.set_u16(0x00, vendor);
        c.set_u16(0x02, device);
        c.bytes[0x08] = revision;
        c.bytes[0x09] = class as u8;
        c.bytes[0x0a] = (class >> 8) as u8;
        c.bytes[0x0b] = (class >> 16) as u8;
        c.set_u16(0x2c, subsys_vendor);
        c.set_u16(0x2e, subsys);
        // Command: I/O, memory, bus master, INTx disable are writable.
        c.wmask[0x04] = 0x07;
        c.wmask[0x05] = 0x04;
        // Cache line size and latency timer.
        c.wmask[0x0c] = 0xff;
        c.wmask[0x0d] = 0xff;
        // Interrupt line.
        c.wmask[0x3c] = 0xff;
        c
    }

    pub fn set_u8(&mut self, off: usize, v: u8) {
        self.bytes[off] = v;
    }
    pub fn set_u16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_u32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.bytes[off..off + 4].try_into().unwrap())
    }
    /// Make bytes at `off` writable by the guest with `mask`.
    pub fn set_wmask(&mut self, off: usize, mask: &[u8]) {
        self.wmask[off..off + mask.len()].copy_from_slice(mask);
    }

    /// Declare BAR `i` as a 32-bit non-prefetchable memory BAR of `size` (a power of two)
    /// placed at `addr` (0: not placed, for the firmware to size and place).
    pub fn add_bar(&mut self, i: usize, addr: u64, size: u64) {
        assert!(
            size.is_power_of_two() && size >= 16 && addr.is_multiple_of(size) && addr < 1 << 32
        );
        self.bars[i] = Some(Bar { addr, size });
        self.set_u32(0x10 + 4 * i, addr as u32);
    }

    /// Add a capability of `body` (without id/next) at `off`, linking it into the list.
    pub fn add_capability(&mut self, off: usize, id: u8, body: &[u8]) {
        assert!(off >= 0x40 && off + 2 + body.len() <= 256);
        self.bytes[off] = id;
        self.bytes[off + 1] = 0;
        self.bytes[off + 2..off + 2 + body.len()].copy_from_slice(body);
        // Append at the end of the chain.
        let status = self.u16_at(0x06) | PCI_STATUS_CAP_LIST;
        self.set_u16(0x06, status);
        let mut ptr = PCI_CAP_PTR;
        while self.bytes[ptr] != 0 {
            ptr = self.bytes[ptr] as usize + 1;
        }
        self.bytes[ptr] = off as u8;
    }

    pub fn memory_enabled(&self) -> bool {
        self.u16_at(PCI_COMMAND) & PCI_COMMAND_MEMORY != 0
    }

    /// The BAR and offset a guest-physical address falls into, when decoding is on.
    pub fn bar_at(&self, addr: u64) -> Option<(usize, u64)> {
        if !self.memory_enabled() {
            return None;
        }
        self.bars.iter().enumerate().find_map(|(i, b)| {
            let b = (*b)?;
            let off = addr.checked_sub(b.addr)?;
            (off < b.size).then_some((i, off))
        })
    }

    pub fn read(&self, reg: usize) -> u32 {
        if reg >= 64 {
            return 0;
        }
        self.u32_at(reg * 4)
    }

    /// Apply a write of `data` at byte `offset` of dword `reg`.
    pub fn write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        let base = reg * 4 + offset;
        if reg >= 64 || offset + data.len() > 4 {
            return;
        }
        if (4..10).contains(&reg) {
            let i = reg - 4;
            let cur = self.u32_at(reg * 4);
            if let Some(bar) = self.bars[i].as_mut() {
                let mut v = cur.to_le_bytes();
                v[offset..offset + data.len()].copy_from_slice(data);
                let v = u32::from_le_bytes(v) as u64;
                bar.addr = v & !(bar.size - 1) & 0xffff_fff0;
                let addr = bar.addr as u32;
                self.set_u32(reg * 4, addr);
            }
            return;
        }
        for (i, b) in data.iter().enumerate() {
            let m = self.wmask[base + i];
            self.bytes[base + i] = (self.bytes[base + i] & !m) | (b & m);
        }
        // Writing 1 to status bits clears them (none are set by us).
    }
}

/// The host bridge at 00:00.0.
pub struct HostBridge {
    cfg: PciConfig,
}

/// The i440FX's PAM registers (0x59..0x5f), which decide whether 0xc0000-0xfffff reads
/// and writes go to RAM or to the BIOS ROM.
const I440FX_PAM: std::ops::RangeInclusive<usize> = 0x59..=0x5f;

impl HostBridge {
    pub fn new() -> Self {
        // Intel vendor and host-bridge class: what Linux's pci_sanity_check looks for.
        HostBridge {
            cfg: PciConfig::new(0x8086, 0x29c0, 0x06_00_00, 0, 0x1af4, 0x1100),
        }
    }

    /// An i440FX (8086:1237) with QEMU's subsystem ids, as SeaBIOS looks for to know its
    /// platform. Its PAM registers take writes; the range they control is RAM whatever
    /// they say (see firmware.rs).
    pub fn i440fx() -> Self {
        let mut cfg = PciConfig::new(0x8086, 0x1237, 0x06_00_00, 2, 0x1af4, 0x1100);
        for r in I440FX_PAM {
            cfg.set_wmask(r, &[0xff]);
        }
        HostBridge { cfg }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.cfg
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.cfg
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Bus 0: slot `i` holds `devices[i]`.
#[derive(Default, Clone)]
pub struct PciBus {
    pub devices: Vec<SharedPciDevice>,
}

impl PciBus {
    fn device(&self, bus: u32, dev: u32, func: u32) -> Option<&SharedPciDevice> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.devices.get(dev as usize)
    }
}

/// The 0xcf8 address register and the 0xcfc..0xcff data window.
pub struct PciConfigIo {
    bus: PciBus,
    address: u32,
}

impl PciConfigIo {
    pub const BASE: u64 = 0xcf8;
    pub const LEN: u64 = 8;
    pub fn new(bus: PciBus) -> Self {
        PciConfigIo { bus, address: 0 }
    }

    fn target(&self) -> Option<(&SharedPciDevice, usize)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (self.address >> 16) & 0xff;
        let dev = (self.address >> 11) & 0x1f;
        let func = (self.address >> 8) & 0x7;
        let reg = ((self.address >> 2) & 0x3f) as usize;
        self.bus.device(bus, dev, func).map(|d| (d, reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(&self.address.to_le_bytes());
            } else {
                data.fill(0xff);
            }
            return;
        }
        let off = (offset - 4) as usize;
        let v = match self.target() {
            Some((d, reg)) => d.lock().unwrap().config().read(reg),
            None => 0xffff_ffff,
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(off + i).copied().unwrap_or(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                self.address = u32::from_le_bytes(data.try_into().unwrap());
            }
            return;
        }
        let off = (offset - 4) as usize;
        if off + data.len() > 4 {
            return;
        }
        if let Some((d, reg)) = self.target() {
            let mut d = d.lock().unwrap();
            d.config_mut().write(reg, off, data);
            d.config_written(reg);
        }
    }
}

/// Routes accesses in a PCI MMIO window to whichever BAR claims them.
pub struct PciMmio {
    bus: PciBus,
    /// Guest address the window starts at.
    base: u64,
}

impl PciMmio {
    pub fn new(bus: PciBus, base: u64) -> Self {
        PciMmio { bus, base }
    }
}

impl BusDevice for PciMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let addr = self.base + offset;
        for d in &self.bus.devices {
            let mut d = d.lock().unwrap();
            if let Some((bar, off)) = d.config().bar_at(addr) {
                d.bar_read(bar, off, data);
                return;
            }
        }
        data.fill(0xff);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let addr = self.base + offset;
        for d in &self.bus.devices {
            let mut d = d.lock().unwrap();
            if let Some((bar, off)) = d.config().bar_at(addr) {
                d.bar_write(bar, off, data);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_sizing() {
        let mut c = PciConfig::new(1, 2, 0, 0, 0, 0);
        c.add_bar(0, 0xc000_0000, 0x8000);
        c.write(4, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read(4), 0xffff_8000);
        c.write(4, 0, &0xc001_0000u32.to_le_bytes());
        assert_eq!(c.read(4), 0xc001_0000);
        assert_eq!(c.bars[0].unwrap().addr, 0xc001_0000);
        // BAR 1 is absent: reads 0 and ignores writes.
        c.write(5, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read(5), 0);
        // Vendor id is read-only.
        c.write(0, 0, &[0xaa, 0xbb]);
        assert_eq!(c.read(0), 0x0002_0001);
        // An unplaced BAR (firmware boot) sizes the same way and takes its address.
        let mut u = PciConfig::new(1, 2, 0, 0, 0, 0);
        u.add_bar(0, 0, 0x8000);
        assert_eq!(u.read(4), 0);
        u.write(4, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(u.read(4), 0xffff_8000);
        u.write(4, 0, &0xfebf_8000u32.to_le_bytes());
        assert_eq!(u.bars[0].unwrap().addr, 0xfebf_8000);
    }

    #[test]
    fn i440fx_ids_and_pam_registers() {
        let mut b = HostBridge::i440fx();
        let c = b.config_mut();
        assert_eq!(c.read(0), 0x1237_8086);
        assert_eq!(c.read(0x2c / 4), 0x1100_1af4);
        // SeaBIOS reads PAM0 (0x59) as 0 at reset, then writes 0x30 / 0x33 and reads back.
        assert_eq!(c.read(0x58 / 4), 0);
        c.write(0x58 / 4, 0, &[0, 0x30, 0x33, 0x33]);
        c.write(0x5c / 4, 0, &[0x33, 0x33, 0x33, 0x33]);
        assert_eq!(c.read(0x58 / 4), 0x3333_3000);
        // 0x5c..0x5f: PAM3-6.
        assert_eq!(c.read(0x5c / 4), 0x3333_3333);
        // 0x58 is not a PAM register.
        c.write(0x58 / 4, 0, &[0xff]);
        assert_eq!(c.read(0x58 / 4) & 0xff, 0);
    }
}
