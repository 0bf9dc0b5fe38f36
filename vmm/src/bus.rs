//! Port I/O and MMIO dispatch from vCPU exits to devices.

use std::sync::{Arc, Mutex};

/// A device reachable through a range of port or MMIO addresses. `offset` is relative to
/// the start of the range the device was registered at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Entry {
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// A fixed set of address ranges, built before the vCPUs start.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register `dev` at `[base, base+len)`. Overlapping ranges are refused.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), String> {
        let end = base
            .checked_add(len)
            .ok_or_else(|| "bus range overflows".to_string())?;
        if len == 0
            || self
                .entries
                .iter()
                .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(format!("bus range {base:#x}+{len:#x} overlaps"));
        }
        self.entries.push(Entry { base, len, dev });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        self.entries.iter().find_map(|e| {
            let off = addr.checked_sub(e.base)?;
            (off < e.len && off + size as u64 <= e.len).then_some((e, off))
        })
    }

    /// Dispatch a read; unclaimed addresses read as all ones. Returns whether a device
    /// answered.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, off)) => {
                e.dev.lock().unwrap().read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatch a write; writes to unclaimed addresses are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, off)) => {
                e.dev.lock().unwrap().write(off, data);
                true
            }
            None => false,
        }
    }
}
