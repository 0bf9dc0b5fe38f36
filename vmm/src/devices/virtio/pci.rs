//! virtio-pci modern transport: capabilities for common/notify/ISR/device configuration
//! and an MSI-X table, all in BAR 0; notifications through ioeventfds, interrupts through
//! irqfds on MSI routes.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActiveQueue, Queue, QueueConfig, VirtioDevice, VirtioInterrupt, NO_VECTOR, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK, STATUS_NEEDS_RESET, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
};
use crate::devices::pci::{PciConfig, PciDevice};
use crate::irq::GsiRouting;
use crate::GuestMem;

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFF: u64 = 0x0000;
const COMMON_LEN: u64 = 0x40;
const ISR_OFF: u64 = 0x1000;
const DEVICE_OFF: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY_OFF: u64 = 0x3000;
const NOTIFY_MULT: u32 = 4;
const MSIX_TABLE_OFF: u64 = 0x4000;
const MSIX_PBA_OFF: u64 = 0x5000;

const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
const PCI_CAP_ID_VNDR: u8 = 0x09;
const PCI_CAP_ID_MSIX: u8 = 0x11;
const MSIX_CAP_OFF: usize = 0x84;

#[derive(Clone, Copy, Default)]
struct MsixEntry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
}

impl MsixEntry {
    fn masked(&self) -> bool {
        self.ctrl & 1 != 0
    }
}

struct MsixState {
    enabled: bool,
    func_masked: bool,
    table: Vec<MsixEntry>,
    pending: Vec<bool>,
    config_vector: u16,
    queue_vectors: Vec<u16>,
}

/// MSI-X vectors, ISR and NEEDS_RESET shared between the transport (vCPU threads) and
/// the device worker.
pub struct Msix {
    routing: Arc<GsiRouting>,
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
    st: Mutex<MsixState>,
    isr: AtomicU8,
    needs_reset: AtomicBool,
}

impl Msix {
    fn new(
        vm: &VmFd,
        routing: Arc<GsiRouting>,
        nvec: usize,
        nqueues: usize,
    ) -> Result<Self, String> {
        let mut gsis = Vec::new();
        let mut irqfds = Vec::new();
        for _ in 0..nvec {
            let gsi = routing.allocate_gsi();
            let fd = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
            vm.register_irqfd(&fd, gsi)
                .map_err(|e| format!("KVM_IRQFD: {e}"))?;
            gsis.push(gsi);
            irqfds.push(fd);
        }
        Ok(Msix {
            routing,
            gsis,
            irqfds,
            st: Mutex::new(MsixState {
                enabled: false,
                func_masked: false,
                table: vec![
                    MsixEntry {
                        ctrl: 1,
                        ..Default::default()
                    };
                    nvec
                ],
                pending: vec![false; nvec],
                config_vector: NO_VECTOR,
                queue_vectors: vec![NO_VECTOR; nqueues],
            }),
            isr: AtomicU8::new(0),
            needs_reset: AtomicBool::new(false),
        })
    }

    fn signal_vector(&self, st: &mut MsixState, v: u16) {
        let v = v as usize;
        if v >= st.table.len() || !st.enabled {
            return;
        }
        if st.func_masked || st.table[v].masked() {
            st.pending[v] = true;
        } else {
            let _ = self.irqfds[v].write(1);
        }
    }

    /// Bring the KVM routes in line with the table, and deliver pending vectors that got
    /// unmasked.
    fn sync(&self, st: &mut MsixState) {
        for v in 0..st.table.len() {
            let e = st.table[v];
            let live = st.enabled && !e.masked();
            let msg = live.then_some((((e.addr_hi as u64) << 32) | e.addr_lo as u64, e.data));
            if let Err(err) = self.routing.set_msi(self.gsis[v], msg) {
                eprintln!("vmm: {err}");
            }
            if live && !st.func_masked && st.pending[v] {
                st.pending[v] = false;
                let _ = self.irqfds[v].write(1);
            }
        }
    }
}

impl VirtioInterrupt for Msix {
    fn notify_queue(&self, queue: usize) {
        self.isr.fetch_or(1, Ordering::SeqCst);
        let mut st = self.st.lock().unwrap();
        if let Some(&v) = st.queue_vectors.get(queue) {
            self.signal_vector(&mut st, v);
        }
    }
    fn notify_config(&self) {
        self.isr.fetch_or(2, Ordering::SeqCst);
        let mut st = self.st.lock().unwrap();
        let v = st.config_vector;
        self.signal_vector(&mut st, v);
    }
    fn set_needs_reset(&self, why: &str) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            eprintln!("vmm: virtio device needs reset: {why}\r");
            self.notify_config();
        }
    }
}

/// A virtio device on PCI.
pub struct VirtioPci {
    cfg: PciConfig,
    vm: Arc<VmFd>,
    mem: GuestMem,
    dev: Box<dyn VirtioDevice>,
    msix: Arc<Msix>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    max_sizes: Vec<u16>,
    queues: Vec<QueueConfig>,
    kicks: Vec<EventFd>,
    /// Address the ioeventfds are registered at, when they are.
    ioevent_base: Option<u64>,
    active: bool,
}

impl VirtioPci {
    /// Create the function with BAR 0 at `bar_addr` (aligned to [`BAR_SIZE`]) and decoding
    /// on, as firmware would leave it; or, with `None`, unplaced and off, for the firmware.
    pub fn new(
        vm: Arc<VmFd>,
        mem: GuestMem,
        routing: Arc<GsiRouting>,
        dev: Box<dyn VirtioDevice>,
        bar_addr: Option<u64>,
    ) -> Result<Self, String> {
        let max_sizes = dev.queue_max_sizes();
        let nq = max_sizes.len();
        let nvec = nq + 1;
        let ty = dev.device_type();
        let class = match ty {
            1 => 0x02_00_00, // Ethernet controller
            2 => 0x01_00_00, // mass storage (SCSI), as QEMU does for virtio-blk
            _ => 0xff_00_00,
        };
        let mut cfg = PciConfig::new(0x1af4, 0x1040 + ty, class, 1, 0x1af4, 0x1100);
        cfg.add_bar(0, bar_addr.unwrap_or(0), BAR_SIZE);
        let cap = |ty: u8, off: u64, len: u64, extra: &[u8]| {
            // cap_len, cfg_type, bar, id, padding[2], offset, length
            let mut b = vec![16 + extra.len() as u8, ty, 0, 0, 0, 0];
            b.extend_from_slice(&(off as u32).to_le_bytes());
            b.extend_from_slice(&(len as u32).to_le_bytes());
            b.extend_from_slice(extra);
            b
        };
        cfg.add_capability(
            0x40,
            PCI_CAP_ID_VNDR,
            &cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFF, COMMON_LEN, &[]),
        );
        cfg.add_capability(
            0x50,
            PCI_CAP_ID_VNDR,
            &cap(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_OFF,
                NOTIFY_MULT as u64 * nq as u64,
                &NOTIFY_MULT.to_le_bytes(),
            ),
        );
        cfg.add_capability(
            0x64,
            PCI_CAP_ID_VNDR,
            &cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFF, 1, &[]),
        );
        cfg.add_capability(
            0x74,
            PCI_CAP_ID_VNDR,
            &cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFF, DEVICE_LEN, &[]),
        );
        let mut msix = Vec::new();
        msix.extend_from_slice(&((nvec - 1) as u16).to_le_bytes());
        msix.extend_from_slice(&(MSIX_TABLE_OFF as u32).to_le_bytes());
        msix.extend_from_slice(&(MSIX_PBA_OFF as u32).to_le_bytes());
        cfg.add_capability(MSIX_CAP_OFF, PCI_CAP_ID_MSIX, &msix);
        // Message control: enable (bit 15) and function mask (bit 14) are writable.
        cfg.set_wmask(MSIX_CAP_OFF + 3, &[0xc0]);
        if bar_addr.is_some() {
            // Memory decoding and bus mastering on.
            cfg.set_u16(0x04, 0x0006);
        }

        let msix = Arc::new(Msix::new(&vm, routing, nvec, nq)?);
        let mut kicks = Vec::new();
        for _ in 0..nq {
            kicks.push(EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?);
        }
        let mut d = VirtioPci {
            cfg,
            vm,
            mem,
            dev,
            msix,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: max_sizes
                .iter()
                .map(|&s| QueueConfig {
                    size: s,
                    ..Default::default()
                })
                .collect(),
            max_sizes,
            kicks,
            ioevent_base: None,
            active: false,
        };
        d.update_ioevents();
        Ok(d)
    }

    fn offered_features(&self) -> u64 {
        self.dev.features()
            | 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_F_RING_EVENT_IDX
            | 1 << VIRTIO_F_RING_INDIRECT_DESC
    }

    /// Keep the ioeventfds at the BAR's current address while memory decoding is on.
    fn update_ioevents(&mut self) {
        let want = if self.cfg.memory_enabled() {
            self.cfg.bars[0]
                .map(|b| b.addr)
                .filter(|&a| a != 0 && a < 1 << 32)
        } else {
            None
        };
        if want == self.ioevent_base {
            return;
        }
        if let Some(old) = self.ioevent_base.take() {
            for (q, fd) in self.kicks.iter().enumerate() {
                let a = IoEventAddress::Mmio(old + NOTIFY_OFF + NOTIFY_MULT as u64 * q as u64);
                let _ = self.vm.unregister_ioevent(fd, &a, NoDatamatch);
            }
        }
        if let Some(new) = want {
            let mut ok = true;
            for (q, fd) in self.kicks.iter().enumerate() {
                let a = IoEventAddress::Mmio(new + NOTIFY_OFF + NOTIFY_MULT as u64 * q as u64);
                if let Err(e) = self.vm.register_ioevent(fd, &a, NoDatamatch) {
                    eprintln!("vmm: ioeventfd: {e}");
                    ok = false;
                }
            }
            if ok {
                self.ioevent_base = Some(new);
            }
        }
    }

    fn device_status(&self) -> u8 {
        let mut s = self.status;
        if self.msix.needs_reset.load(Ordering::SeqCst) {
            s |= STATUS_NEEDS_RESET;
        }
        s
    }

    fn reset(&mut self) {
        if self.active {
            self.dev.reset();
            self.active = false;
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        for (q, &s) in self.queues.iter_mut().zip(&self.max_sizes) {
            *q = QueueConfig {
                size: s,
                ..Default::default()
            };
        }
        self.msix.needs_reset.store(false, Ordering::SeqCst);
        self.msix.isr.store(0, Ordering::SeqCst);
        let mut st = self.msix.st.lock().unwrap();
        st.config_vector = NO_VECTOR;
        st.queue_vectors.iter_mut().for_each(|v| *v = NO_VECTOR);
    }

    fn set_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v & !STATUS_NEEDS_RESET;
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.offered_features();
            if self.driver_features & !offered != 0
                || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0
            {
                v &= !STATUS_FEATURES_OK;
            }
        }
        let newly_ok = v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = v;
        if newly_ok && !self.active {
            if self.status & STATUS_FEATURES_OK == 0 {
                self.msix.set_needs_reset("DRIVER_OK without FEATURES_OK");
                return;
            }
            self.activate();
        }
    }

    fn activate(&mut self) {
        let f = self.driver_features;
        let mut queues = Vec::new();
        for (i, qc) in self.queues.iter().enumerate() {
            if !qc.ready {
                continue;
            }
            let q = Queue::new(
                *qc,
                f & (1 << VIRTIO_F_RING_EVENT_IDX) != 0,
                f & (1 << VIRTIO_F_RING_INDIRECT_DESC) != 0,
            );
            if let Err(e) = q.validate(&self.mem) {
                self.msix.set_needs_reset(&format!("queue {i}: {e}"));
                return;
            }
            let kick = match self.kicks[i].try_clone() {
                Ok(k) => k,
                Err(e) => {
                    self.msix.set_needs_reset(&format!("eventfd: {e}"));
                    return;
                }
            };
            queues.push((i, ActiveQueue { queue: q, kick }));
        }
        // Devices see queues by index; disabled queues are skipped but keep numbering
        // simple by requiring them in order.
        if queues.iter().enumerate().any(|(n, (i, _))| n != *i) {
            self.msix.set_needs_reset("queues must be enabled in order");
            return;
        }
        let qs = queues.into_iter().map(|(_, q)| q).collect();
        let irq: Arc<dyn VirtioInterrupt> = self.msix.clone();
        match self.dev.activate(self.mem.clone(), f, qs, irq) {
            Ok(()) => self.active = true,
            Err(e) => self.msix.set_needs_reset(&e),
        }
    }

    fn common_read(&self, off: u64, data: &mut [u8]) {
        let mut b = [0u8; COMMON_LEN as usize];
        let feat = self.offered_features();
        let st = self.msix.st.lock().unwrap();
        let qs = self.queue_select as usize;
        let q = self.queues.get(qs).copied().unwrap_or_default();
        let put = |b: &mut [u8], o: usize, v: &[u8]| b[o..o + v.len()].copy_from_slice(v);
        put(&mut b, 0x00, &self.device_feature_select.to_le_bytes());
        let df = match self.device_feature_select {
            0 => feat as u32,
            1 => (feat >> 32) as u32,
            _ => 0,
        };
        put(&mut b, 0x04, &df.to_le_bytes());
        put(&mut b, 0x08, &self.driver_feature_select.to_le_bytes());
        let drf = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(&mut b, 0x0c, &drf.to_le_bytes());
        put(&mut b, 0x10, &st.config_vector.to_le_bytes());
        put(&mut b, 0x12, &(self.queues.len() as u16).to_le_bytes());
        b[0x14] = self.device_status();
        b[0x15] = self.config_generation;
        put(&mut b, 0x16, &self.queue_select.to_le_bytes());
        if qs < self.queues.len() {
            put(&mut b, 0x18, &q.size.to_le_bytes());
            put(&mut b, 0x1a, &st.queue_vectors[qs].to_le_bytes());
            put(&mut b, 0x1c, &(q.ready as u16).to_le_bytes());
            put(&mut b, 0x1e, &(qs as u16).to_le_bytes());
            put(&mut b, 0x20, &q.desc.to_le_bytes());
            put(&mut b, 0x28, &q.avail.to_le_bytes());
            put(&mut b, 0x30, &q.used.to_le_bytes());
        } else {
            put(&mut b, 0x1a, &NO_VECTOR.to_le_bytes());
        }
        let o = off as usize;
        for (i, d) in data.iter_mut().enumerate() {
            *d = b.get(o + i).copied().unwrap_or(0);
        }
    }

    fn common_write(&mut self, off: u64, data: &[u8]) {
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        let val = u64::from_le_bytes(v);
        let qs = self.queue_select as usize;
        // Queue fields only change before DRIVER_OK.
        let q_writable = qs < self.queues.len() && self.status & STATUS_DRIVER_OK == 0;
        let set_lo = |f: &mut u64, x: u64| *f = (*f & !0xffff_ffff) | (x & 0xffff_ffff);
        let set_hi = |f: &mut u64, x: u64| *f = (*f & 0xffff_ffff) | (x << 32);
        match (off, data.len()) {
            (0x00, 4) => self.device_feature_select = val as u32,
            (0x08, 4) => self.driver_feature_select = val as u32,
            (0x0c, 4) if self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    0 => set_lo(&mut self.driver_features, val),
                    1 => set_hi(&mut self.driver_features, val),
                    _ => {}
                }
            }
            (0x10, 2) => {
                let mut st = self.msix.st.lock().unwrap();
                let nvec = st.table.len() as u64;
                st.config_vector = if val < nvec { val as u16 } else { NO_VECTOR };
            }
            (0x14, 1) => self.set_status(val as u8),
            (0x16, 2) => self.queue_select = val as u16,
            (0x18, 2) if q_writable => {
                // Power of two, at most the maximum; anything else leaves it unchanged.
                let s = val as u16;
                if s.is_power_of_two() && s <= self.max_sizes[qs] {
                    self.queues[qs].size = s;
                }
            }
            (0x1a, 2) if qs < self.queues.len() => {
                let mut st = self.msix.st.lock().unwrap();
                let nvec = st.table.len() as u64;
                st.queue_vectors[qs] = if val < nvec { val as u16 } else { NO_VECTOR };
            }
            (0x1c, 2) if q_writable => self.queues[qs].ready = val & 1 == 1,
            (0x20, 4) if q_writable => set_lo(&mut self.queues[qs].desc, val),
            (0x24, 4) if q_writable => set_hi(&mut self.queues[qs].desc, val),
            (0x28, 4) if q_writable => set_lo(&mut self.queues[qs].avail, val),
            (0x2c, 4) if q_writable => set_hi(&mut self.queues[qs].avail, val),
            (0x30, 4) if q_writable => set_lo(&mut self.queues[qs].used, val),
            (0x34, 4) if q_writable => set_hi(&mut self.queues[qs].used, val),
            (0x20, 8) if q_writable => self.queues[qs].desc = val,
            (0x28, 8) if q_writable => self.queues[qs].avail = val,
            (0x30, 8) if q_writable => self.queues[qs].used = val,
            _ => {}
        }
    }

    fn msix_table_read(&self, off: u64, data: &mut [u8]) {
        let st = self.msix.st.lock().unwrap();
        data.fill(0);
        if data.len() != 4 && data.len() != 8 {
            return;
        }
        for (k, chunk) in data.chunks_mut(4).enumerate() {
            let o = off + 4 * k as u64;
            let (v, w) = ((o / 16) as usize, (o % 16) / 4);
            if let Some(e) = st.table.get(v) {
                let x = [e.addr_lo, e.addr_hi, e.data, e.ctrl][w as usize];
                chunk.copy_from_slice(&x.to_le_bytes());
            }
        }
    }

    fn msix_table_write(&self, off: u64, data: &[u8]) {
        if data.len() != 4 && data.len() != 8 {
            return;
        }
        let mut st = self.msix.st.lock().unwrap();
        for (k, chunk) in data.chunks(4).enumerate() {
            let o = off + 4 * k as u64;
            let (v, w) = ((o / 16) as usize, (o % 16) / 4);
            let x = u32::from_le_bytes(chunk.try_into().unwrap());
            if let Some(e) = st.table.get_mut(v) {
                match w {
                    0 => e.addr_lo = x & !3,
                    1 => e.addr_hi = x,
                    2 => e.data = x,
                    _ => e.ctrl = x & 1,
                }
            }
        }
        self.msix.sync(&mut st);
    }

    fn msix_pba_read(&self, off: u64, data: &mut [u8]) {
        let st = self.msix.st.lock().unwrap();
        let mut bits = 0u64;
        for (i, p) in st.pending.iter().enumerate().take(64) {
            if *p {
                bits |= 1 << i;
            }
        }
        let b = bits.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = b.get(off as usize + i).copied().unwrap_or(0);
        }
    }
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &PciConfig {
        &self.cfg
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.cfg
    }
    fn config_written(&mut self, reg: usize) {
        match reg {
            1 | 4 => self.update_ioevents(),
            r if r == MSIX_CAP_OFF / 4 => {
                let ctrl = self.cfg.u16_at(MSIX_CAP_OFF + 2);
                let mut st = self.msix.st.lock().unwrap();
                st.enabled = ctrl & 0x8000 != 0;
                st.func_masked = ctrl & 0x4000 != 0;
                self.msix.sync(&mut st);
            }
            _ => {}
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_OFF + COMMON_LEN => self.common_read(o - COMMON_OFF, data),
            ISR_OFF => {
                data[0] = self.msix.isr.swap(0, Ordering::SeqCst);
            }
            o if (DEVICE_OFF..DEVICE_OFF + DEVICE_LEN).contains(&o) => {
                self.dev.read_config(o - DEVICE_OFF, data)
            }
            o if (MSIX_TABLE_OFF..MSIX_PBA_OFF).contains(&o) => {
                self.msix_table_read(o - MSIX_TABLE_OFF, data)
            }
            o if (MSIX_PBA_OFF..BAR_SIZE).contains(&o) => {
                self.msix_pba_read(o - MSIX_PBA_OFF, data)
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_OFF + COMMON_LEN => self.common_write(o - COMMON_OFF, data),
            o if (DEVICE_OFF..DEVICE_OFF + DEVICE_LEN).contains(&o) => {
                self.dev.write_config(o - DEVICE_OFF, data)
            }
            o if (NOTIFY_OFF..MSIX_TABLE_OFF).contains(&o) => {
                // Reached only when the ioeventfd is not (yet) registered.
                let q = ((o - NOTIFY_OFF) / NOTIFY_MULT as u64) as usize;
                if let Some(k) = self.kicks.get(q) {
                    let _ = k.write(1);
                }
            }
            o if (MSIX_TABLE_OFF..MSIX_PBA_OFF).contains(&o) => {
                self.msix_table_write(o - MSIX_TABLE_OFF, data)
            }
            _ => {}
        }
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        if self.active {
            self.dev.reset();
        }
    }
}
