//! virtio-net: one receive and one transmit queue over a packet backend (a tap), served on
//! an I/O thread. Packets keep their virtio-net header end to end, so checksum and
//! segmentation offloads pass between the guest and the host kernel.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use common::iovec::Front;
use vmm_sys_util::eventfd::EventFd;

use super::cursor::Cursor;
use super::io_thread::IoThread;
use super::queue::{range_ok, Chain};
use super::{ActiveQueue, VirtioDevice, VirtioInterrupt};
use crate::tap::{
    PacketBackend, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO, VNET_HDR_LEN,
};
use crate::GuestMem;

pub const VIRTIO_NET_F_CSUM: u32 = 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
pub const VIRTIO_NET_F_MAC: u32 = 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
pub const VIRTIO_NET_F_GUEST_ECN: u32 = 9;
pub const VIRTIO_NET_F_GUEST_UFO: u32 = 10;
pub const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
pub const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
pub const VIRTIO_NET_F_HOST_ECN: u32 = 13;
pub const VIRTIO_NET_F_HOST_UFO: u32 = 14;
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
pub const VIRTIO_NET_F_STATUS: u32 = 16;

pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Queue size of both queues (QEMU's default too).
pub const NET_QUEUE_SIZE: u16 = 256;
pub const RX: usize = 0;
pub const TX: usize = 1;

/// Largest packet a tap hands over: a 64 KiB GSO frame with its Ethernet and VLAN headers.
const MAX_PACKET: usize = 65535 + 14 + 4;
/// Packets received before the guest is interrupted while the tap keeps delivering.
const RX_BATCH: usize = 64;

/// Offloads the guest takes, as `TUNSETOFFLOAD` flags, from the features it negotiated.
pub fn tap_offloads(features: u64) -> u32 {
    let has = |b: u32| features & (1 << b) != 0;
    let mut f = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        f |= TUN_F_CSUM;
        for (bit, flag) in [
            (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
            (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
            (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
            (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO),
        ] {
            if has(bit) {
                f |= flag;
            }
        }
    }
    f
}

/// A virtio-net device.
pub struct Net {
    backend: Arc<dyn PacketBackend>,
    mac: [u8; 6],
    worker: Option<IoThread>,
}

impl Net {
    pub fn new(backend: Arc<dyn PacketBackend>, mac: [u8; 6]) -> Self {
        Net {
            backend,
            mac,
            worker: None,
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        1
    }
    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_NET_F_MRG_RXBUF;
        if self.backend.vnet_hdr() {
            for b in [
                VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_ECN,
                VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_NET_F_HOST_TSO6,
                VIRTIO_NET_F_HOST_ECN,
            ] {
                f |= 1 << b;
            }
            if self.backend.ufo() {
                f |= 1 << VIRTIO_NET_F_GUEST_UFO | 1 << VIRTIO_NET_F_HOST_UFO;
            }
        }
        f
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![NET_QUEUE_SIZE; 2]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        for (i, d) in data.iter_mut().enumerate() {
            *d = config.get(offset as usize + i).copied().unwrap_or(0);
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
        if queues.len() < 2 {
            return Err("virtio-net started without its receive and transmit queues".into());
        }
        if self.backend.vnet_hdr() {
            self.backend
                .set_offload(tap_offloads(features))
                .map_err(|e| format!("TUNSETOFFLOAD: {e}"))?;
        }
        let worker = Worker::new(
            mem,
            self.backend.clone(),
            features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            queues,
            irq,
        );
        self.worker = Some(IoThread::spawn("virtio-net", move |stop| worker.run(stop))?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}

/// How a receive pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxState {
    /// The backend has nothing more to read.
    Drained,
    /// A packet is waiting for the guest to add receive buffers.
    NoBuffers,
    /// The queue is broken (NEEDS_RESET was signalled).
    Dead,
}

/// The I/O thread's state.
pub struct Worker {
    mem: GuestMem,
    backend: Arc<dyn PacketBackend>,
    mergeable: bool,
    queues: Vec<ActiveQueue>,
    irq: Arc<dyn VirtioInterrupt>,
    dead: [bool; 2],
    /// The packet being received, with a virtio-net header in front whatever the backend.
    packet: Vec<u8>,
    /// Its length, while it waits for receive buffers.
    pending: Option<usize>,
    /// The receive buffers a packet goes into (kept to reuse its allocation).
    rx_chains: Vec<Chain>,
    /// Packets dropped: too big for a guest that does not merge buffers, or refused by the
    /// backend.
    pub dropped: u64,
}

impl Worker {
    pub fn new(
        mem: GuestMem,
        backend: Arc<dyn PacketBackend>,
        mergeable: bool,
        queues: Vec<ActiveQueue>,
        irq: Arc<dyn VirtioInterrupt>,
    ) -> Self {
        Worker {
            mem,
            backend,
            mergeable,
            queues,
            irq,
            dead: [false; 2],
            packet: vec![0; VNET_HDR_LEN + MAX_PACKET],
            pending: None,
            rx_chains: Vec::new(),
            dropped: 0,
        }
    }

    fn run(mut self, stop: EventFd) {
        let mut rx = self.rx();
        self.tx();
        loop {
            let mut fds = [
                (stop.as_raw_fd(), true),
                (self.queues[RX].kick.as_raw_fd(), true),
                (self.queues[TX].kick.as_raw_fd(), true),
                (self.backend.fd(), rx == RxState::Drained),
            ]
            .map(|(fd, on)| libc::pollfd {
                fd: if on { fd } else { -1 },
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
            if fds[0].revents != 0 {
                return;
            }
            if fds[2].revents != 0 {
                let _ = self.queues[TX].kick.read();
                self.tx();
            }
            if fds[1].revents != 0 {
                let _ = self.queues[RX].kick.read();
            }
            if fds[1].revents != 0 || fds[3].revents != 0 {
                rx = self.rx();
            }
        }
    }

    fn fail(&mut self, qi: usize, why: &str) {
        self.dead[qi] = true;
        self.irq.set_needs_reset(why);
    }

    fn interrupt(&mut self, qi: usize) {
        match self.queues[qi].queue.needs_interrupt(&self.mem) {
            Ok(true) => self.irq.notify_queue(qi),
            Ok(false) => {}
            Err(e) => self.fail(qi, &e.to_string()),
        }
    }

    /// Move packets from the backend into receive buffers until the backend is empty or
    /// the buffers run out.
    pub fn rx(&mut self) -> RxState {
        let mut delivered = 0;
        let state = loop {
            if self.dead[RX] {
                break RxState::Dead;
            }
            let len = match self.pending {
                Some(len) => len,
                None => match self.queues[RX].queue.has_more(&self.mem) {
                    Err(e) => {
                        self.fail(RX, &e.to_string());
                        continue;
                    }
                    // Leave the packet in the backend until there is room for it.
                    Ok(false) => match self.rearm_rx() {
                        true => continue,
                        false => break RxState::NoBuffers,
                    },
                    Ok(true) => match self.read_packet() {
                        Some(len) => len,
                        None => break RxState::Drained,
                    },
                },
            };
            match self.deliver(len) {
                Ok(true) => {
                    self.pending = None;
                    delivered += 1;
                    if delivered % RX_BATCH == 0 {
                        self.interrupt(RX);
                    }
                }
                Ok(false) => {
                    self.pending = Some(len);
                    if !self.rearm_rx() {
                        break RxState::NoBuffers;
                    }
                }
                Err(why) => self.fail(RX, &why),
            }
        };
        if delivered % RX_BATCH != 0 && !self.dead[RX] {
            self.interrupt(RX);
        }
        state
    }

    /// Out of receive buffers: ask the driver to notify when it adds one; true if it
    /// already has (look again). The driver is not asked while buffers last.
    fn rearm_rx(&mut self) -> bool {
        match self.queues[RX].queue.rearm(&self.mem) {
            Ok(more) => more,
            Err(e) => {
                self.fail(RX, &e.to_string());
                false
            }
        }
    }

    /// One packet from the backend into `self.packet`; its length with the header. Runts
    /// (shorter than the header the backend promised) are dropped.
    fn read_packet(&mut self) -> Option<usize> {
        let off = if self.backend.vnet_hdr() {
            0
        } else {
            self.packet[..VNET_HDR_LEN].fill(0);
            VNET_HDR_LEN
        };
        loop {
            let buf = &mut self.packet[off..];
            // SAFETY: reading into a buffer we own, of the length given.
            let n = unsafe {
                libc::read(
                    self.backend.fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                )
            };
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if n <= 0 {
                return None;
            }
            let len = off + n as usize;
            if len <= VNET_HDR_LEN {
                self.dropped += 1;
                continue;
            }
            return Some(len);
        }
    }

    /// Put the packet of `len` bytes into receive buffers; Ok(false) when the guest has not
    /// given enough of them yet (they are left available).
    fn deliver(&mut self, len: usize) -> Result<bool, String> {
        let mut chains = std::mem::take(&mut self.rx_chains);
        chains.clear();
        let r = self.deliver_into(len, &mut chains);
        self.rx_chains = chains;
        r
    }

    /// [`Worker::deliver`] with `chains` (empty) to gather the buffers in.
    fn deliver_into(&mut self, len: usize, chains: &mut Vec<Chain>) -> Result<bool, String> {
        let mut room = 0u64;
        while room < len as u64 && (self.mergeable || chains.is_empty()) {
            let chain = match self.queues[RX].queue.pop(&self.mem) {
                Ok(Some(c)) => c,
                Ok(None) => {
                    self.queues[RX].queue.unpop(chains.len() as u16);
                    return Ok(false);
                }
                Err(e) => return Err(e.to_string()),
            };
            if chain.descs.iter().any(|d| !d.writable) {
                return Err("receive buffer with a device-readable descriptor".into());
            }
            if let Some(d) = chain
                .descs
                .iter()
                .find(|d| !range_ok(&self.mem, d.addr, d.len as u64))
            {
                return Err(format!(
                    "receive buffer {:#x}+{:#x} is outside guest memory",
                    d.addr, d.len
                ));
            }
            room += chain.descs.iter().map(|d| d.len as u64).sum::<u64>();
            if chains.is_empty() && room < VNET_HDR_LEN as u64 {
                return Err("receive buffer shorter than the virtio-net header".into());
            }
            chains.push(chain);
        }
        if room < len as u64 {
            // A single buffer too small for the packet (the driver's error): drop the
            // packet rather than hand over part of it.
            self.queues[RX].queue.unpop(chains.len() as u16);
            self.dropped += 1;
            return Ok(true);
        }
        self.packet[10..12].copy_from_slice(&(chains.len() as u16).to_le_bytes());
        let mut at = 0usize;
        for chain in chains.drain(..) {
            let mut w = Cursor::new(&self.mem, chain.descs);
            let n = (w.remaining() as usize).min(len - at);
            w.write(&self.packet[at..at + n])
                .map_err(|_| "receive buffer outside guest memory".to_string())?;
            at += n;
            self.queues[RX]
                .queue
                .add_used(&self.mem, chain.head, n as u32)
                .map_err(|e| e.to_string())?;
        }
        Ok(true)
    }

    /// Send every packet the guest queued.
    pub fn tx(&mut self) {
        let mut used = false;
        while !self.dead[TX] {
            let chain = match self.queues[TX].queue.pop_or_rearm(&self.mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    self.fail(TX, &e.to_string());
                    break;
                }
            };
            let head = chain.head;
            if let Err(why) = self.send(chain) {
                self.fail(TX, &why);
                break;
            }
            if let Err(e) = self.queues[TX].queue.add_used(&self.mem, head, 0) {
                self.fail(TX, &e.to_string());
                break;
            }
            used = true;
        }
        if used && !self.dead[TX] {
            self.interrupt(TX);
        }
    }

    fn send(&mut self, chain: Chain) -> Result<(), String> {
        if chain.descs.iter().any(|d| d.writable) {
            return Err("transmit buffer with a device-writable descriptor".into());
        }
        let c = Cursor::new(&self.mem, chain.descs);
        if c.remaining() < VNET_HDR_LEN as u64 {
            return Err("transmit buffer shorter than the virtio-net header".into());
        }
        let Some(runs) = c.host_runs() else {
            return Err("transmit buffer outside guest memory".into());
        };
        let mut front = Front::new(&runs);
        if !self.backend.vnet_hdr() {
            front.take(VNET_HDR_LEN);
        }
        let iov = front.take(front.remaining());
        loop {
            // SAFETY: IoBufMut has iovec's layout, and every run lies in guest memory
            // mapped for as long as `self.mem` lives.
            let n = unsafe {
                libc::writev(
                    self.backend.fd(),
                    iov.as_ptr() as *const libc::iovec,
                    iov.len().min(libc::c_int::MAX as usize) as libc::c_int,
                )
            };
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if n < 0 {
                // The tap refused it (a full queue, a header the kernel rejects): the
                // packet is lost, as on a wire.
                self.dropped += 1;
            }
            return Ok(());
        }
    }
}
