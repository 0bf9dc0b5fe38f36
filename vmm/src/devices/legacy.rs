//! Small legacy devices: the i8042 reset line, the ACPI sleep/reset registers, and
//! ports Linux probes that we answer quietly.

use std::sync::mpsc::Sender;

use crate::bus::BusDevice;
use crate::VmExit;

/// Port 0x64 (status/command) and 0x60 (data). Only the CPU reset command (0xfe) does
/// anything: it ends the VM as a reboot. There is no keyboard behind it: the status says a
/// byte is waiting that never goes away, so probes (SeaBIOS's and Linux's flush of the output
/// buffer) give up at once instead of waiting out their command timeouts.
pub struct I8042 {
    exit: Sender<VmExit>,
}

/// Status register bit 0: a byte waits in the output buffer.
const STATUS_OUTPUT_FULL: u8 = 0x01;

impl I8042 {
    pub const BASE: u64 = 0x60;
    pub const LEN: u64 = 5;
    pub fn new(exit: Sender<VmExit>) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status: output buffer full, input buffer empty (so kb_wait() never spins); data 0.
        data.fill(0);
        if offset == 4 {
            data[0] = STATUS_OUTPUT_FULL;
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.first() == Some(&0xfe) {
            let _ = self.exit.send(VmExit::Reboot);
        }
    }
}

/// I/O port of the FADT sleep control register (and sleep status at +1, reset at +2).
pub const ACPI_PM_BASE: u64 = 0x600;
pub const ACPI_PM_LEN: u64 = 4;
/// SLP_TYP value of \_S5 in our DSDT.
pub const S5_SLP_TYP: u8 = 5;
/// Value the guest writes to the reset register.
pub const ACPI_RESET_VALUE: u8 = 1;

/// Hardware-reduced ACPI sleep control / status and reset registers.
pub struct AcpiPm {
    exit: Sender<VmExit>,
}

impl AcpiPm {
    pub fn new(exit: Sender<VmExit>) -> Self {
        AcpiPm { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let v = data[0];
        match offset {
            // SLP_EN is bit 5, SLP_TYP bits 4:2.
            0 if v & 0x20 != 0 && (v >> 2) & 7 == S5_SLP_TYP => {
                let _ = self.exit.send(VmExit::Poweroff);
            }
            2 if v == ACPI_RESET_VALUE => {
                let _ = self.exit.send(VmExit::Reboot);
            }
            _ => {}
        }
    }
}

/// Answers reads with zero and ignores writes (port 0x80 POST codes, PS/2 ports, ...).
pub struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}
