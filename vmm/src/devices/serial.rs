//! 8250 UART on 0x3f8 (IRQ 4), backed by vm-superio; input comes from a host thread.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Raises the UART's interrupt line through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

pub type Uart = Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

/// The UART as a bus device.
pub struct SerialDevice(pub Uart);

impl SerialDevice {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice(Serial::new(IrqTrigger(irq), out))
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() == 1 && offset < 8 {
            data[0] = self.0.read(offset as u8);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            let _ = self.0.write(offset as u8, data[0]);
        }
    }
}

/// Push `input` into the UART's receive FIFO as space allows, waiting when it is full.
/// Returns when everything was queued.
pub fn feed_input(dev: &Arc<Mutex<SerialDevice>>, mut input: &[u8]) {
    while !input.is_empty() {
        let n = {
            let mut d = dev.lock().unwrap();
            let room = d.0.fifo_capacity();
            let n = room.min(input.len());
            if n > 0 {
                let _ = d.0.enqueue_raw_bytes(&input[..n]);
            }
            n
        };
        input = &input[n..];
        if n == 0 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

/// A `Write` that appends to a shared buffer, for tests and capture.
#[derive(Clone, Default)]
pub struct SharedBuf(pub Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Standard output, flushed after every write so the console is interactive.
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut o = std::io::stdout().lock();
        o.write_all(buf)?;
        o.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}
