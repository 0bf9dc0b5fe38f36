//! virtio-blk: request parsing and execution against a [`BlockDriver`], on an I/O thread.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use common::{BlockDriver, IoBuf};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::cursor::Cursor;
use super::io_thread::IoThread;
use super::queue::{range_ok, Chain, Desc, MAX_QUEUE_SIZE};
use super::{ActiveQueue, VirtioDevice, VirtioInterrupt};
use crate::GuestMem;

pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
pub const VIRTIO_BLK_F_RO: u32 = 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

const SECTOR: u64 = 512;
const ID_BYTES: usize = 20;
const MAX_DISCARD_SECTORS: u32 = 0x3f_ffff;
const MAX_SEGS: u32 = 1;

/// A virtio-blk device.
pub struct Block {
    disk: Arc<dyn BlockDriver>,
    read_only: bool,
    serial: Vec<u8>,
    config: [u8; 60],
    worker: Option<IoThread>,
}

impl Block {
    pub fn new(disk: Arc<dyn BlockDriver>, read_only: bool, serial: &str) -> Self {
        let read_only = read_only || disk.is_read_only();
        let mut config = [0u8; 60];
        let mut put = |o: usize, v: &[u8]| config[o..o + v.len()].copy_from_slice(v);
        put(0, &(disk.size() / SECTOR).to_le_bytes());
        put(12, &(MAX_QUEUE_SIZE as u32 - 2).to_le_bytes()); // seg_max
        put(20, &(SECTOR as u32).to_le_bytes()); // blk_size
        put(34, &1u16.to_le_bytes()); // num_queues
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_SEGS.to_le_bytes());
        put(44, &8u32.to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &MAX_SEGS.to_le_bytes());
        config[56] = 1; // write_zeroes_may_unmap
        let mut s = serial.as_bytes().to_vec();
        s.truncate(ID_BYTES);
        Block {
            disk,
            read_only,
            serial: s,
            config,
            worker: None,
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        2
    }
    fn features(&self) -> u64 {
        let mut f =
            1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![MAX_QUEUE_SIZE]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMem,
        features: u64,
        queues: Vec<ActiveQueue>,
        irq: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), String> {
        self.reset();
        let worker = Worker {
            mem,
            disk: self.disk.clone(),
            read_only: self.read_only,
            writethrough: features & (1 << VIRTIO_BLK_F_FLUSH) == 0,
            serial: self.serial.clone(),
            queues,
            irq,
        };
        self.worker = Some(IoThread::spawn("virtio-blk", move |stop| worker.run(stop))?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}

/// The I/O thread's state.
pub struct Worker {
    pub mem: GuestMem,
    pub disk: Arc<dyn BlockDriver>,
    pub read_only: bool,
    /// The driver did not negotiate FLUSH: every write must be durable on completion.
    pub writethrough: bool,
    pub serial: Vec<u8>,
    pub queues: Vec<ActiveQueue>,
    pub irq: Arc<dyn VirtioInterrupt>,
}

/// Why a request could not even be answered with a status.
#[derive(Debug)]
pub struct Unanswerable(pub String);

impl Worker {
    fn run(mut self, stop: EventFd) {
        let mut dead = vec![false; self.queues.len()];
        // Serve anything queued before DRIVER_OK.
        for q in 0..self.queues.len() {
            self.serve(q, &mut dead);
        }
        loop {
            let mut fds: Vec<libc::pollfd> = self
                .queues
                .iter()
                .map(|q| libc::pollfd {
                    fd: q.kick.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            fds.push(libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            // SAFETY: fds is a valid array of pollfd for the duration of the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if r < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if fds.last().unwrap().revents != 0 {
                return;
            }
            for (q, fd) in fds.iter().enumerate().take(self.queues.len()) {
                if fd.revents != 0 {
                    let _ = self.queues[q].kick.read();
                    self.serve(q, &mut dead);
                }
            }
        }
    }

    /// Process everything available on queue `qi`.
    pub fn serve(&mut self, qi: usize, dead: &mut [bool]) {
        if dead[qi] {
            return;
        }
        let mut used_any = false;
        loop {
            let chain = match self.queues[qi].queue.pop_or_rearm(&self.mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    dead[qi] = true;
                    self.irq.set_needs_reset(&e.to_string());
                    return;
                }
            };
            let len = match self.process(&chain) {
                Ok(len) => len,
                Err(Unanswerable(why)) => {
                    dead[qi] = true;
                    self.irq.set_needs_reset(&why);
                    return;
                }
            };
            if let Err(e) = self.queues[qi].queue.add_used(&self.mem, chain.head, len) {
                dead[qi] = true;
                self.irq.set_needs_reset(&e.to_string());
                return;
            }
            used_any = true;
        }
        if used_any {
            match self.queues[qi].queue.needs_interrupt(&self.mem) {
                Ok(true) => self.irq.notify_queue(qi),
                Ok(false) => {}
                Err(e) => {
                    dead[qi] = true;
                    self.irq.set_needs_reset(&e.to_string());
                }
            }
        }
    }

    /// Execute one request; returns the number of bytes written to the driver's buffers.
    pub fn process(&self, chain: &Chain) -> Result<u32, Unanswerable> {
        let descs = &chain.descs;
        // Device-readable buffers first, then device-writable ones; the status byte is the
        // last byte of the last buffer.
        let nread = descs.iter().take_while(|d| !d.writable).count();
        if descs[nread..].iter().any(|d| !d.writable) {
            return Err(Unanswerable(
                "readable descriptor after a writable one".into(),
            ));
        }
        let last = *descs.last().unwrap();
        if !last.writable || last.len == 0 {
            return Err(Unanswerable(
                "request without a writable status byte".into(),
            ));
        }
        let status_addr = last.addr.checked_add(last.len as u64 - 1);
        let Some(status_addr) = status_addr.filter(|&a| range_ok(&self.mem, a, 1)) else {
            return Err(Unanswerable(format!(
                "status byte of buffer {:#x}+{:#x} is outside guest memory",
                last.addr, last.len
            )));
        };
        let mut wdescs: Vec<Desc> = descs[nread..].to_vec();
        let lastw = wdescs.last_mut().unwrap();
        lastw.len -= 1;
        let mut reader = Cursor::new(&self.mem, descs[..nread].to_vec());
        let mut writer = Cursor::new(&self.mem, wdescs);
        let (status, written) = self.execute(&mut reader, &mut writer);
        self.mem
            .write_obj(status, GuestAddress(status_addr))
            .map_err(|_| Unanswerable("status byte write failed".into()))?;
        Ok(written.saturating_add(1))
    }

    fn execute(&self, r: &mut Cursor, w: &mut Cursor) -> (u8, u32) {
        let mut hdr = [0u8; 16];
        if r.read(&mut hdr).is_err() {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let ty = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
        let size = self.disk.size();
        let range = |len: u64| -> Option<u64> {
            let off = sector.checked_mul(SECTOR)?;
            (len.is_multiple_of(SECTOR) && off.checked_add(len)? <= size).then_some(off)
        };
        match ty {
            VIRTIO_BLK_T_IN => {
                let len = w.remaining();
                let Some(off) = range(len) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let Some(runs) = w.host_runs() else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                if self.disk.read_vectored_at(&runs, off).is_err() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                (VIRTIO_BLK_S_OK, len.min(u32::MAX as u64) as u32)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let len = r.remaining();
                let Some(off) = range(len) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let Some(runs) = r.host_runs() else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                // Reuses the list's allocation: the two types have one layout.
                let bufs: Vec<IoBuf<'_>> = runs.into_iter().map(IoBuf::from).collect();
                if self.disk.write_vectored_at(&bufs, off).is_err() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                if self.writethrough && self.disk.flush().is_err() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                (VIRTIO_BLK_S_OK, 0)
            }
            VIRTIO_BLK_T_FLUSH => match self.disk.flush() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(_) => (VIRTIO_BLK_S_IOERR, 0),
            },
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; ID_BYTES];
                id[..self.serial.len()].copy_from_slice(&self.serial);
                let n = (w.remaining() as usize).min(ID_BYTES);
                match w.write(&id[..n]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n as u32),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.read_only {
                    return (VIRTIO_BLK_S_UNSUPP, 0);
                }
                let len = r.remaining();
                if len == 0 || !len.is_multiple_of(16) || len / 16 > MAX_SEGS as u64 {
                    return (VIRTIO_BLK_S_UNSUPP, 0);
                }
                for _ in 0..len / 16 {
                    let mut seg = [0u8; 16];
                    if r.read(&mut seg).is_err() {
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                    let sec = u64::from_le_bytes(seg[0..8].try_into().unwrap());
                    let num = u32::from_le_bytes(seg[8..12].try_into().unwrap());
                    let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
                    let unmap = flags & 1 != 0;
                    if flags & !1 != 0
                        || (ty == VIRTIO_BLK_T_DISCARD && unmap)
                        || num > MAX_DISCARD_SECTORS
                    {
                        return (VIRTIO_BLK_S_UNSUPP, 0);
                    }
                    let off = sec.checked_mul(SECTOR);
                    let blen = num as u64 * SECTOR;
                    let Some(off) = off.filter(|o| o.checked_add(blen).is_some_and(|e| e <= size))
                    else {
                        return (VIRTIO_BLK_S_IOERR, 0);
                    };
                    let res = if ty == VIRTIO_BLK_T_DISCARD {
                        self.disk.discard(off, blen)
                    } else {
                        self.disk.write_zeroes(off, blen, unmap)
                    };
                    if res.is_err() {
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                }
                (VIRTIO_BLK_S_OK, 0)
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }
}
