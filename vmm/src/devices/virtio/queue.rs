//! Split virtqueues (virtio 1.2 §2.7), with every guest-supplied index, address and length
//! checked before use.

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress};

use crate::GuestMem;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// Largest queue we offer. The block device's seg_max follows from it (a chain may not be
/// longer than the queue), and 1024 lets a guest send a 1 MiB request of scattered 4 KiB
/// pages in one piece (QEMU's largest virtio-blk queue-size too).
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// Why a queue cannot be processed any more. The device answers with NEEDS_RESET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueError {
    /// A ring or descriptor table lies outside guest memory.
    BadRing(u64),
    /// A descriptor index at or beyond the queue (or indirect table) size.
    BadIndex(u16),
    /// A chain longer than the table (a loop).
    Loop,
    /// Malformed indirect descriptor (nested, bad length, or with NEXT).
    BadIndirect,
    /// The driver made more buffers available than the queue holds.
    TooManyAvailable(u16),
}

impl std::fmt::Display for QueueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueueError::BadRing(a) => write!(f, "virtqueue ring at {a:#x} is outside guest memory"),
            QueueError::BadIndex(i) => write!(f, "descriptor index {i} out of range"),
            QueueError::Loop => write!(f, "descriptor chain loops"),
            QueueError::BadIndirect => write!(f, "malformed indirect descriptor"),
            QueueError::TooManyAvailable(n) => {
                write!(f, "{n} buffers available in a smaller queue")
            }
        }
    }
}

/// One buffer of a chain, as the guest described it (address not yet validated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A chain popped from the available ring.
#[derive(Debug, Clone)]
pub struct Chain {
    pub head: u16,
    pub descs: Vec<Desc>,
}

/// Configuration the driver wrote through the transport.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueConfig {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// Device-side state of one split queue.
pub struct Queue {
    pub cfg: QueueConfig,
    pub event_idx: bool,
    pub indirect: bool,
    next_avail: u16,
    /// The driver's available index as the device last read it.
    seen_avail: u16,
    next_used: u16,
    /// Used index at the last interrupt (for EVENT_IDX suppression).
    signalled_used: Option<u16>,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}
// SAFETY: plain old data with no padding.
unsafe impl vm_memory::ByteValued for RawDesc {}

impl Queue {
    pub fn new(cfg: QueueConfig, event_idx: bool, indirect: bool) -> Self {
        Queue {
            cfg,
            event_idx,
            indirect,
            next_avail: 0,
            seen_avail: 0,
            next_used: 0,
            signalled_used: None,
        }
    }

    /// Check that the three rings lie in guest memory (done once at activation; every
    /// access is still checked).
    pub fn validate(&self, mem: &GuestMem) -> Result<(), QueueError> {
        let n = self.cfg.size as u64;
        if n == 0 || !self.cfg.size.is_power_of_two() || self.cfg.size > MAX_QUEUE_SIZE {
            return Err(QueueError::BadRing(self.cfg.desc));
        }
        for (addr, len, align) in [
            (self.cfg.desc, 16 * n, 16),
            (self.cfg.avail, 6 + 2 * n, 2),
            (self.cfg.used, 6 + 8 * n, 4),
        ] {
            if addr % align != 0 || !range_ok(mem, addr, len) {
                return Err(QueueError::BadRing(addr));
            }
        }
        Ok(())
    }

    fn read_u16(mem: &GuestMem, addr: u64) -> Result<u16, QueueError> {
        mem.read_obj::<u16>(GuestAddress(addr))
            .map_err(|_| QueueError::BadRing(addr))
    }

    fn write_u16(mem: &GuestMem, addr: u64, v: u16) -> Result<(), QueueError> {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|_| QueueError::BadRing(addr))
    }

    /// Take the next available chain, if any. The driver is not asked to notify for
    /// chains it adds meanwhile (no kick per chain while the device is busy): once done,
    /// the caller calls [`Queue::rearm`] (or drains with [`Queue::pop_or_rearm`]).
    pub fn pop(&mut self, mem: &GuestMem) -> Result<Option<Chain>, QueueError> {
        let avail_idx = Self::read_u16(mem, self.cfg.avail + 2)?;
        self.seen_avail = avail_idx;
        let pending = avail_idx.wrapping_sub(self.next_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.cfg.size {
            return Err(QueueError::TooManyAvailable(pending));
        }
        // Read ring entries only after seeing the index.
        fence(Ordering::Acquire);
        let slot = (self.next_avail % self.cfg.size) as u64;
        let head = Self::read_u16(mem, self.cfg.avail + 4 + 2 * slot)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        let descs = self.walk(mem, head)?;
        Ok(Some(Chain { head, descs }))
    }

    /// The next available chain; when there is none, the driver is asked to notify for
    /// the next one (see [`Queue::rearm`]) and `None` returned only if it still has
    /// none: the way to drain a queue.
    pub fn pop_or_rearm(&mut self, mem: &GuestMem) -> Result<Option<Chain>, QueueError> {
        loop {
            match self.pop(mem)? {
                Some(c) => return Ok(Some(c)),
                None if self.rearm(mem)? => continue,
                None => return Ok(None),
            }
        }
    }

    /// Give back the last `n` chains popped, untouched, to be popped again later (a
    /// packet that needs more receive buffers than the driver has made available).
    pub fn unpop(&mut self, n: u16) {
        self.next_avail = self.next_avail.wrapping_sub(n);
    }

    /// Whether chains are available that were not popped.
    pub fn has_more(&mut self, mem: &GuestMem) -> Result<bool, QueueError> {
        self.seen_avail = Self::read_u16(mem, self.cfg.avail + 2)?;
        Ok(self.seen_avail != self.next_avail)
    }

    /// Ask the driver to notify when it makes a chain available past the available
    /// index the device last read (with EVENT_IDX, through avail_event; without, the
    /// driver always notifies), then say whether it already has: the caller looks again
    /// instead of waiting for a notification that may have come before the request.
    pub fn rearm(&mut self, mem: &GuestMem) -> Result<bool, QueueError> {
        if self.event_idx {
            let off = self.cfg.used + 4 + 8 * self.cfg.size as u64;
            Self::write_u16(mem, off, self.seen_avail)?;
        }
        // The driver publishes its index before it reads avail_event: our write must
        // come before our read of the index.
        fence(Ordering::SeqCst);
        Ok(Self::read_u16(mem, self.cfg.avail + 2)? != self.seen_avail)
    }

    fn read_desc(mem: &GuestMem, table: u64, idx: u16) -> Result<RawDesc, QueueError> {
        let addr = table + 16 * idx as u64;
        mem.read_obj::<RawDesc>(GuestAddress(addr))
            .map_err(|_| QueueError::BadRing(addr))
    }

    fn walk(&self, mem: &GuestMem, head: u16) -> Result<Vec<Desc>, QueueError> {
        let size = self.cfg.size;
        if head >= size {
            return Err(QueueError::BadIndex(head));
        }
        let mut out = Vec::new();
        let mut idx = head;
        let mut steps = 0u32;
        loop {
            steps += 1;
            if steps > size as u32 {
                return Err(QueueError::Loop);
            }
            let d = Self::read_desc(mem, self.cfg.desc, idx)?;
            if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                if !self.indirect || d.flags & VIRTQ_DESC_F_NEXT != 0 || !out.is_empty() {
                    return Err(QueueError::BadIndirect);
                }
                return Self::walk_indirect(mem, d);
            }
            out.push(Desc {
                addr: d.addr,
                len: d.len,
                writable: d.flags & VIRTQ_DESC_F_WRITE != 0,
            });
            if d.flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(out);
            }
            if d.next >= size {
                return Err(QueueError::BadIndex(d.next));
            }
            idx = d.next;
        }
    }

    fn walk_indirect(mem: &GuestMem, ind: RawDesc) -> Result<Vec<Desc>, QueueError> {
        if ind.len == 0 || !ind.len.is_multiple_of(16) || ind.len / 16 > u16::MAX as u32 + 1 {
            return Err(QueueError::BadIndirect);
        }
        if !range_ok(mem, ind.addr, ind.len as u64) {
            return Err(QueueError::BadRing(ind.addr));
        }
        let count = ind.len / 16;
        let mut out = Vec::new();
        let mut idx = 0u32;
        loop {
            if out.len() as u32 >= count {
                return Err(QueueError::Loop);
            }
            let d = Self::read_desc(mem, ind.addr, idx as u16)?;
            if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                return Err(QueueError::BadIndirect);
            }
            out.push(Desc {
                addr: d.addr,
                len: d.len,
                writable: d.flags & VIRTQ_DESC_F_WRITE != 0,
            });
            if d.flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(out);
            }
            if d.next as u32 >= count {
                return Err(QueueError::BadIndex(d.next));
            }
            idx = d.next as u32;
        }
    }

    /// Return a chain to the driver with `len` bytes written.
    pub fn add_used(&mut self, mem: &GuestMem, head: u16, len: u32) -> Result<(), QueueError> {
        let slot = (self.next_used % self.cfg.size) as u64;
        let elem = self.cfg.used + 4 + 8 * slot;
        mem.write_obj(head as u32, GuestAddress(elem))
            .map_err(|_| QueueError::BadRing(elem))?;
        mem.write_obj(len, GuestAddress(elem + 4))
            .map_err(|_| QueueError::BadRing(elem))?;
        self.next_used = self.next_used.wrapping_add(1);
        // The element must be visible before the index.
        fence(Ordering::Release);
        Self::write_u16(mem, self.cfg.used + 2, self.next_used)
    }

    /// Whether the driver wants an interrupt for what was used since the last one.
    pub fn needs_interrupt(&mut self, mem: &GuestMem) -> Result<bool, QueueError> {
        fence(Ordering::SeqCst);
        let new = self.next_used;
        if !self.event_idx {
            let flags = Self::read_u16(mem, self.cfg.avail)?;
            return Ok(flags & 1 == 0);
        }
        let used_event = Self::read_u16(mem, self.cfg.avail + 4 + 2 * self.cfg.size as u64)?;
        let old = self.signalled_used.replace(new);
        Ok(match old {
            None => true,
            // vring_need_event()
            Some(old) => new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old),
        })
    }
}

/// Whether `[addr, addr+len)` is entirely guest RAM.
pub fn range_ok(mem: &GuestMem, addr: u64, len: u64) -> bool {
    use vm_memory::GuestMemoryBackend;
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    if len == 0 {
        return true;
    }
    // Walk region by region.
    let mut pos = addr;
    while pos < end {
        let Some(r) = mem.find_region(GuestAddress(pos)) else {
            return false;
        };
        use vm_memory::{Address, GuestMemoryRegion};
        let rend = r.start_addr().raw_value() + r.len();
        pos = rend.min(end);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u16 = 8;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    /// A driver that notifies only when EVENT_IDX says to (Linux's `vring_need_event`).
    struct Driver {
        idx: u16,
    }

    impl Driver {
        /// Make one single-buffer chain available; whether the device must be notified.
        fn add(&mut self, mem: &GuestMem) -> bool {
            let head = self.idx % SIZE;
            let desc = DESC + 16 * head as u64;
            mem.write_obj(0x8000u64 + 0x100 * head as u64, GuestAddress(desc))
                .unwrap();
            mem.write_obj(0x100u32, GuestAddress(desc + 8)).unwrap();
            let slot = AVAIL + 4 + 2 * (self.idx % SIZE) as u64;
            mem.write_obj(head, GuestAddress(slot)).unwrap();
            let old = self.idx;
            self.idx = self.idx.wrapping_add(1);
            mem.write_obj(self.idx, GuestAddress(AVAIL + 2)).unwrap();
            let event: u16 = mem
                .read_obj(GuestAddress(USED + 4 + 8 * SIZE as u64))
                .unwrap();
            self.idx.wrapping_sub(event).wrapping_sub(1) < self.idx.wrapping_sub(old)
        }
    }

    fn queue() -> (GuestMem, Queue) {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let cfg = QueueConfig {
            size: SIZE,
            ready: true,
            desc: DESC,
            avail: AVAIL,
            used: USED,
        };
        (mem, Queue::new(cfg, true, false))
    }

    /// The driver is not asked to notify while the device has chains to take, is asked
    /// again once the device has taken them all and rearmed, and a chain made available
    /// before the device rearms is found by the rearm, not lost.
    #[test]
    fn notifications_wait_for_the_device_to_rearm() {
        let (mem, mut q) = queue();
        let mut d = Driver { idx: 0 };
        assert!(d.add(&mem), "the first chain is notified");
        assert!(q.pop(&mem).unwrap().is_some());
        assert!(!d.add(&mem), "no notification while the device is busy");
        assert!(q.pop(&mem).unwrap().is_some());
        assert!(q.pop(&mem).unwrap().is_none());
        assert!(!q.rearm(&mem).unwrap(), "nothing new");
        assert!(d.add(&mem), "notified after the rearm");
        assert!(q.pop(&mem).unwrap().is_some());
        assert!(q.pop(&mem).unwrap().is_none());
        // The driver adds after the device last looked and before it rearms: its
        // avail_event is old, so it does not notify, and the rearm reports the chain.
        assert!(!d.add(&mem));
        assert!(
            q.rearm(&mem).unwrap(),
            "the chain added meanwhile is reported"
        );
        assert!(q.pop(&mem).unwrap().is_some());
    }

    /// Draining with `pop_or_rearm` leaves the driver asked to notify for its next chain.
    #[test]
    fn a_drained_queue_is_rearmed() {
        let (mem, mut q) = queue();
        let mut d = Driver { idx: 0 };
        d.add(&mem);
        assert!(q.pop(&mem).unwrap().is_some());
        assert!(!d.add(&mem), "busy: no notification");
        assert!(q.pop_or_rearm(&mem).unwrap().is_some());
        assert!(q.pop_or_rearm(&mem).unwrap().is_none());
        assert!(d.add(&mem), "drained: the next chain is notified");
    }

    /// A device that gave chains back (too few receive buffers for a packet) waits for
    /// a chain past those: the rearm does not report the ones it gave back.
    #[test]
    fn chains_given_back_are_not_news() {
        let (mem, mut q) = queue();
        let mut d = Driver { idx: 0 };
        d.add(&mem);
        assert!(q.pop(&mem).unwrap().is_some());
        assert!(q.pop(&mem).unwrap().is_none());
        q.unpop(1);
        assert!(!q.rearm(&mem).unwrap());
        assert!(d.add(&mem), "a new buffer is notified");
        assert!(q.rearm(&mem).unwrap());
    }
}
