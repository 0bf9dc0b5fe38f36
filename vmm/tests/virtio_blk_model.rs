//! virtio-blk against a model, without KVM. Random batches of requests are laid out in guest
//! memory the way a driver would (direct and indirect chains, buffers split at any byte, the
//! status byte alone or at the end of a data buffer), the device's I/O worker serves them,
//! and then:
//! - for well-formed requests, the status, the used length, the data read and the disk's
//!   contents must match a plain in-memory model (over an in-memory disk, a read-only device,
//!   and a qcow2 image of the shared engine);
//! - for hostile batches (a descriptor, ring entry or index overwritten with junk), the worker
//!   must return (no panic, no hang);
//! - always, the device must leave every guest byte alone that is not in a buffer the driver
//!   marked device-writable or in the used ring.
//!
//! `TEST_SEED=<n>` replays a run; `MODEL_BATCHES=<n>` sets the batches per configuration.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::create::{create_and_open, Qcow2CreateOptions};
use common::BlockDriver;
use integration_tests::mem_disk::MemDisk;
use integration_tests::{seed, with_deadline, Rng};
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::block::{
    Block, Worker, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use vmm::devices::virtio::queue::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use vmm::devices::virtio::{ActiveQueue, Queue, QueueConfig, VirtioDevice, VirtioInterrupt};
use vmm::GuestMem;
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM: two regions with a hole between them.
const REGIONS: [(u64, u64); 2] = [(0, 0x40000), (0x50000, 0x40000)];
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// Indirect tables of one batch are allocated here.
const INDIRECT: (u64, u64) = (0x3000, 0x4000);
/// Headers and data buffers of one batch are allocated here.
const DATA: [(u64, u64); 2] = [(0x4000, 0x40000), (0x50000, 0x90000)];
const SERIAL: &str = "model-serial";
const SECTOR: u64 = 512;

/// Records what the worker signalled.
#[derive(Default)]
struct Irq {
    needs_reset: Mutex<Option<String>>,
    notified: AtomicUsize,
}

impl VirtioInterrupt for Irq {
    fn notify_queue(&self, _queue: usize) {
        self.notified.fetch_add(1, Ordering::SeqCst);
    }
    fn notify_config(&self) {}
    fn set_needs_reset(&self, why: &str) {
        *self.needs_reset.lock().unwrap() = Some(why.to_string());
    }
}

/// One guest buffer of a chain.
#[derive(Clone, Copy, Debug)]
struct Buf {
    addr: u64,
    len: u32,
    writable: bool,
}

/// What a well-formed request must produce.
struct Expect {
    head: u16,
    status: u8,
    used_len: u32,
    status_addr: u64,
    /// Data the device must have written to the driver's buffers (IN, GET_ID).
    data: Vec<(Buf, Vec<u8>)>,
}

/// The device under test and the driver's view of its queue.
struct Device {
    worker: Worker,
    dead: Vec<bool>,
    irq: Arc<Irq>,
    size: u16,
    avail_idx: u16,
    used_idx: u16,
    indirect: bool,
}

/// What the device advertises for DISCARD / WRITE_ZEROES sizes.
struct Limits {
    max_discard: u32,
    max_write_zeroes: u32,
}

struct Setup {
    mem: GuestMem,
    disk: Arc<dyn BlockDriver>,
    read_only: bool,
    model: Vec<u8>,
    limits: Limits,
}

fn new_device(s: &Setup, rng: &mut Rng) -> Device {
    let size = *rng.pick(&[2u16, 4, 16, 256]);
    let indirect = rng.chance(2, 3);
    let event_idx = rng.chance(1, 2);
    s.mem
        .write_slice(&vec![0u8; (INDIRECT.0 - DESC) as usize], GuestAddress(DESC))
        .unwrap();
    let cfg = QueueConfig {
        size,
        ready: true,
        desc: DESC,
        avail: AVAIL,
        used: USED,
    };
    let queue = Queue::new(cfg, event_idx, indirect);
    queue.validate(&s.mem).unwrap();
    let irq = Arc::new(Irq::default());
    let worker = Worker {
        mem: s.mem.clone(),
        disk: s.disk.clone(),
        read_only: s.read_only,
        writethrough: rng.chance(1, 4),
        serial: SERIAL.as_bytes().to_vec(),
        queues: vec![ActiveQueue {
            queue,
            kick: EventFd::new(0).unwrap(),
        }],
        irq: irq.clone(),
    };
    Device {
        worker,
        dead: vec![false],
        irq,
        size,
        avail_idx: 0,
        used_idx: 0,
        indirect,
    }
}

/// Bump allocator over the batch's data areas.
struct Alloc {
    next: [u64; 2],
    indirect: u64,
}

impl Alloc {
    fn new() -> Alloc {
        Alloc {
            next: [DATA[0].0, DATA[1].0],
            indirect: INDIRECT.0,
        }
    }
    /// `len` bytes at a random byte offset in a random data area, or None when full.
    fn take(&mut self, rng: &mut Rng, len: u64) -> Option<u64> {
        let r = rng.below(2) as usize;
        let start = self.next[r] + rng.below(64);
        (start + len <= DATA[r].1).then(|| {
            self.next[r] = start + len;
            start
        })
    }
    fn table(&mut self, n: u64) -> Option<u64> {
        let start = self.indirect;
        (start + 16 * n <= INDIRECT.1).then(|| {
            self.indirect += 16 * n;
            start
        })
    }
}

/// Pieces of `len` bytes, split at random points into at most `max` parts.
fn split(rng: &mut Rng, len: u64, max: u64) -> Vec<u64> {
    let parts = 1 + rng.below(max);
    let mut cuts: Vec<u64> = (1..parts).map(|_| rng.below(len + 1)).collect();
    cuts.sort();
    let mut out = vec![];
    let mut prev = 0;
    for c in cuts.into_iter().chain([len]) {
        out.push(c - prev);
        prev = c;
    }
    out
}

/// Lay `bytes` out in guest memory as readable buffers.
fn readable(s: &Setup, a: &mut Alloc, rng: &mut Rng, bytes: &[u8], max: u64) -> Option<Vec<Buf>> {
    let mut out = vec![];
    let mut at = 0usize;
    for n in split(rng, bytes.len() as u64, max) {
        let addr = a.take(rng, n)?;
        s.mem
            .write_slice(&bytes[at..at + n as usize], GuestAddress(addr))
            .unwrap();
        out.push(Buf {
            addr,
            len: n as u32,
            writable: false,
        });
        at += n as usize;
    }
    Some(out)
}

/// Writable buffers for `len` bytes, filled with junk the device must overwrite.
fn writable(s: &Setup, a: &mut Alloc, rng: &mut Rng, len: u64, max: u64) -> Option<Vec<Buf>> {
    let mut out = vec![];
    for n in split(rng, len, max) {
        let addr = a.take(rng, n)?;
        s.mem
            .write_slice(&rng.bytes(n as usize), GuestAddress(addr))
            .unwrap();
        out.push(Buf {
            addr,
            len: n as u32,
            writable: true,
        });
    }
    Some(out)
}

fn header(ty: u32, sector: u64) -> Vec<u8> {
    let mut h = ty.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

/// A sector number: mostly inside the disk for `sectors` sectors, sometimes just past its
/// end, sometimes one whose byte offset overflows.
fn sector(rng: &mut Rng, disk_sectors: u64, sectors: u64) -> u64 {
    match rng.below(10) {
        0 => disk_sectors - sectors.min(disk_sectors) + 1 + rng.below(4),
        1 => u64::MAX / SECTOR + 1 + rng.below(1000),
        _ => rng.below(disk_sectors - sectors.min(disk_sectors) + 1),
    }
}

/// Whether `len` bytes at `sector` are a valid disk range; its byte offset if so.
fn disk_range(sector: u64, len: u64, disk_len: u64) -> Option<u64> {
    let off = sector.checked_mul(SECTOR)?;
    (len.is_multiple_of(SECTOR) && off.checked_add(len)? <= disk_len).then_some(off)
}

/// A discard still to be resolved after the batch: the engine may drop whole clusters only,
/// so each byte reads back as before or as zero.
struct Discarded {
    off: usize,
    old: Vec<u8>,
}

/// The body of a request (before its status byte) and its outcome.
struct Body {
    bufs: Vec<Buf>,
    status: u8,
    /// Bytes the device writes to the driver's buffers on success.
    written: u32,
    /// What those bytes must be, buffer by buffer.
    data: Vec<(Buf, Vec<u8>)>,
}

impl Body {
    fn answer(bufs: Vec<Buf>, status: u8) -> Body {
        Body {
            bufs,
            status,
            written: 0,
            data: vec![],
        }
    }
}

/// A data length of `sectors` sectors, now and then not a whole number of sectors.
fn data_len(rng: &mut Rng, sectors: u64) -> u64 {
    let odd = if rng.chance(1, 20) {
        1 + rng.below(511)
    } else {
        0
    };
    sectors * SECTOR + odd
}

/// IN: the data comes from the model.
fn read_request(s: &Setup, a: &mut Alloc, rng: &mut Rng) -> Option<Body> {
    let disk_len = s.model.len() as u64;
    let sectors = rng.below(17);
    let sec = sector(rng, disk_len / SECTOR, sectors);
    let len = data_len(rng, sectors);
    let mut bufs = readable(s, a, rng, &header(VIRTIO_BLK_T_IN, sec), 2)?;
    let w = writable(s, a, rng, len, 6)?;
    let Some(off) = disk_range(sec, len, disk_len) else {
        bufs.extend(w);
        return Some(Body::answer(bufs, VIRTIO_BLK_S_IOERR));
    };
    let mut at = off as usize;
    let data = w
        .iter()
        .map(|b| {
            let d = s.model[at..at + b.len as usize].to_vec();
            at += b.len as usize;
            (*b, d)
        })
        .collect();
    bufs.extend(w);
    Some(Body {
        bufs,
        status: VIRTIO_BLK_S_OK,
        written: len as u32,
        data,
    })
}

/// OUT: the header and the data may share buffers; the model takes the data.
fn write_request(s: &mut Setup, a: &mut Alloc, rng: &mut Rng) -> Option<Body> {
    let disk_len = s.model.len() as u64;
    let sectors = rng.below(17);
    let sec = sector(rng, disk_len / SECTOR, sectors);
    let len = data_len(rng, sectors);
    let payload = rng.bytes(len as usize);
    let mut bytes = header(VIRTIO_BLK_T_OUT, sec);
    bytes.extend_from_slice(&payload);
    let bufs = readable(s, a, rng, &bytes, 6)?;
    let status = match disk_range(sec, len, disk_len) {
        _ if s.read_only => VIRTIO_BLK_S_IOERR,
        Some(off) => {
            s.model[off as usize..(off + len) as usize].copy_from_slice(&payload);
            VIRTIO_BLK_S_OK
        }
        None => VIRTIO_BLK_S_IOERR,
    };
    Some(Body::answer(bufs, status))
}

/// GET_ID into 0 to 32 bytes of buffers: the serial, zero-padded to 20 bytes, cut to fit.
fn get_id_request(s: &Setup, a: &mut Alloc, rng: &mut Rng) -> Option<Body> {
    let len = rng.below(33);
    let mut bufs = readable(s, a, rng, &header(VIRTIO_BLK_T_GET_ID, 0), 2)?;
    let w = writable(s, a, rng, len, 3)?;
    let mut id = SERIAL.as_bytes().to_vec();
    id.resize(20, 0);
    let n = (len as usize).min(20);
    let mut at = 0usize;
    let data = w
        .iter()
        .filter_map(|b| {
            let take = (b.len as usize).min(n - at);
            let d = id[at..at + take].to_vec();
            at += take;
            let b = Buf {
                len: take as u32,
                ..*b
            };
            (take > 0).then_some((b, d))
        })
        .collect();
    bufs.extend(w);
    Some(Body {
        bufs,
        status: VIRTIO_BLK_S_OK,
        written: n as u32,
        data,
    })
}

/// DISCARD or WRITE_ZEROES with one segment (the device takes one), sometimes with flags or
/// a length it must refuse.
fn zeroing_request(
    s: &mut Setup,
    a: &mut Alloc,
    rng: &mut Rng,
    discarded: &mut Option<Discarded>,
) -> Option<Body> {
    let disk_len = s.model.len() as u64;
    let discard = rng.chance(1, 2);
    let (ty, max) = if discard {
        (VIRTIO_BLK_T_DISCARD, s.limits.max_discard)
    } else {
        (VIRTIO_BLK_T_WRITE_ZEROES, s.limits.max_write_zeroes)
    };
    let num = if rng.chance(1, 20) {
        max + 1
    } else {
        rng.below(disk_len / SECTOR / 4 + 1) as u32
    };
    let sec = sector(rng, disk_len / SECTOR, num as u64);
    let flags = match rng.below(10) {
        0 => 1u32 << (1 + rng.below(31)),
        1..=4 => 1,
        _ => 0,
    };
    let mut bytes = header(ty, 0);
    bytes.extend_from_slice(&sec.to_le_bytes());
    bytes.extend_from_slice(&num.to_le_bytes());
    bytes.extend_from_slice(&flags.to_le_bytes());
    let bufs = readable(s, a, rng, &bytes, 3)?;
    let bad_flags = flags & !1 != 0 || (discard && flags & 1 != 0);
    if s.read_only || bad_flags || num > max {
        return Some(Body::answer(bufs, VIRTIO_BLK_S_UNSUPP));
    }
    let Some(off) = disk_range(sec, num as u64 * SECTOR, disk_len) else {
        return Some(Body::answer(bufs, VIRTIO_BLK_S_IOERR));
    };
    let range = off as usize..off as usize + num as usize * SECTOR as usize;
    if discard {
        *discarded = Some(Discarded {
            off: range.start,
            old: s.model[range.clone()].to_vec(),
        });
    }
    s.model[range].fill(0);
    Some(Body::answer(bufs, VIRTIO_BLK_S_OK))
}

/// Build one well-formed request (and apply it to the model): its buffers in order, and
/// what it must produce (the head is filled in by the caller).
fn request(
    s: &mut Setup,
    a: &mut Alloc,
    rng: &mut Rng,
    discarded: &mut Option<Discarded>,
) -> Option<(Vec<Buf>, Expect)> {
    let kind = rng.below(100);
    let mut body = if kind < 35 {
        read_request(s, a, rng)?
    } else if kind < 70 {
        write_request(s, a, rng)?
    } else if kind < 75 {
        let bufs = readable(s, a, rng, &header(VIRTIO_BLK_T_FLUSH, 0), 2)?;
        Body::answer(bufs, VIRTIO_BLK_S_OK)
    } else if kind < 80 {
        get_id_request(s, a, rng)?
    } else if kind < 95 {
        zeroing_request(s, a, rng, discarded)?
    } else {
        let ty = *rng.pick(&[2u32, 3, 5, 7, 9, 10, 12, 0xffff_ffff]);
        let bufs = readable(s, a, rng, &header(ty, 0), 2)?;
        Body::answer(bufs, VIRTIO_BLK_S_UNSUPP)
    };
    let status_addr = status_byte(s, a, rng, &mut body.bufs)?;
    let written = if body.status == VIRTIO_BLK_S_OK {
        body.written
    } else {
        0
    };
    let e = Expect {
        head: 0,
        status: body.status,
        used_len: written + 1,
        status_addr,
        data: body.data,
    };
    Some((body.bufs, e))
}

/// Add the status byte: its own buffer, or the last byte of the last writable buffer when
/// that one ends where its area's free space begins. Returns its address.
fn status_byte(s: &Setup, a: &mut Alloc, rng: &mut Rng, bufs: &mut Vec<Buf>) -> Option<u64> {
    let merged = match bufs.last_mut() {
        Some(b) if b.writable && rng.chance(1, 3) => {
            let end = b.addr + b.len as u64;
            match a.next.iter().position(|&n| n == end) {
                Some(r) if end < DATA[r].1 => {
                    a.next[r] += 1;
                    b.len += 1;
                    Some(end)
                }
                _ => None,
            }
        }
        _ => None,
    };
    let addr = match merged {
        Some(addr) => addr,
        None => {
            let addr = a.take(rng, 1)?;
            bufs.push(Buf {
                addr,
                len: 1,
                writable: true,
            });
            addr
        }
    };
    // Not a status value: the device must overwrite it.
    s.mem.write_obj(0xeeu8, GuestAddress(addr)).unwrap();
    Some(addr)
}

fn write_desc(mem: &GuestMem, table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = addr.to_le_bytes().to_vec();
    d.extend_from_slice(&len.to_le_bytes());
    d.extend_from_slice(&flags.to_le_bytes());
    d.extend_from_slice(&next.to_le_bytes());
    mem.write_slice(&d, GuestAddress(table + 16 * i)).unwrap();
}

/// Put `bufs` in the descriptor table (direct, at free indices from `free`) or in an indirect
/// table; returns the head index.
fn place(
    mem: &GuestMem,
    dev: &Device,
    a: &mut Alloc,
    rng: &mut Rng,
    bufs: &[Buf],
    free: &mut Vec<u16>,
) -> Option<u16> {
    let flags = |b: &Buf| if b.writable { VIRTQ_DESC_F_WRITE } else { 0 };
    let direct = !dev.indirect || (bufs.len() <= free.len() && rng.chance(1, 2));
    if direct {
        if bufs.len() > free.len() {
            return None;
        }
        let idx: Vec<u16> = (0..bufs.len())
            .map(|_| free.swap_remove(rng.below(free.len() as u64) as usize))
            .collect();
        for (k, b) in bufs.iter().enumerate() {
            let (f, next) = match idx.get(k + 1) {
                Some(&n) => (flags(b) | VIRTQ_DESC_F_NEXT, n),
                None => (flags(b), rng.below(0x10000) as u16),
            };
            write_desc(mem, DESC, idx[k] as u64, b.addr, b.len, f, next);
        }
        Some(idx[0])
    } else {
        let head = free.pop()?;
        let n = bufs.len() as u64;
        let table = a.table(n)?;
        for (k, b) in bufs.iter().enumerate() {
            let more = (k as u64) + 1 < n;
            let f = flags(b) | if more { VIRTQ_DESC_F_NEXT } else { 0 };
            write_desc(mem, table, k as u64, b.addr, b.len, f, k as u16 + 1);
        }
        write_desc(
            mem,
            DESC,
            head as u64,
            table,
            16 * n as u32,
            VIRTQ_DESC_F_INDIRECT,
            0,
        );
        Some(head)
    }
}

/// Overwrite one ring or descriptor field with junk.
fn mutate(mem: &GuestMem, dev: &Device, rng: &mut Rng) {
    let junk_addr = |rng: &mut Rng| match rng.below(6) {
        0 => rng.next_u64(),
        1 => u64::MAX - rng.below(64),
        2 => REGIONS[0].1 - rng.below(64),
        3 => REGIONS[1].0 - 1 - rng.below(64),
        4 => REGIONS[1].0 + REGIONS[1].1 - rng.below(64),
        _ => rng.below(REGIONS[0].1),
    };
    let size = dev.size as u64;
    let desc_at = |rng: &mut Rng| {
        if rng.chance(1, 3) {
            INDIRECT.0 + 16 * rng.below((INDIRECT.1 - INDIRECT.0) / 16)
        } else {
            DESC + 16 * rng.below(size)
        }
    };
    match rng.below(8) {
        0 => {
            let at = desc_at(rng);
            mem.write_obj(junk_addr(rng), GuestAddress(at)).unwrap();
        }
        1 => {
            let len = *rng.pick(&[0u32, 1, 15, 17, u32::MAX, 0x8000_0000, 0x10_0000]);
            mem.write_obj(len, GuestAddress(desc_at(rng) + 8)).unwrap();
        }
        2 => {
            let flags = rng.below(8) as u16;
            mem.write_obj(flags, GuestAddress(desc_at(rng) + 12))
                .unwrap();
        }
        3 => {
            let next = if rng.chance(1, 2) {
                rng.below(size) as u16
            } else {
                rng.below(0x10000) as u16
            };
            mem.write_obj(next, GuestAddress(desc_at(rng) + 14))
                .unwrap();
        }
        4 => {
            let idx = dev.avail_idx.wrapping_add(rng.below(2 * size + 2) as u16);
            mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
        }
        5 => {
            let slot = AVAIL + 4 + 2 * rng.below(size);
            mem.write_obj(rng.below(0x10000) as u16, GuestAddress(slot))
                .unwrap();
        }
        6 => {
            // A loop: a descriptor whose chain comes back to itself.
            let i = rng.below(size);
            let at = DESC + 16 * i;
            mem.write_obj(VIRTQ_DESC_F_NEXT, GuestAddress(at + 12))
                .unwrap();
            mem.write_obj(i as u16, GuestAddress(at + 14)).unwrap();
        }
        _ => {
            // The same in the batch's first indirect table.
            let i = rng.below(4);
            let at = INDIRECT.0 + 16 * i;
            mem.write_obj(VIRTQ_DESC_F_NEXT, GuestAddress(at + 12))
                .unwrap();
            mem.write_obj(i as u16, GuestAddress(at + 14)).unwrap();
        }
    }
}

fn snapshot(mem: &GuestMem) -> Vec<Vec<u8>> {
    REGIONS
        .iter()
        .map(|&(start, len)| {
            let mut v = vec![0u8; len as usize];
            mem.read_slice(&mut v, GuestAddress(start)).unwrap();
            v
        })
        .collect()
}

/// Every buffer some descriptor marks device-writable: the main table's, and those of every
/// indirect table it points to (a superset of what the device may write).
fn writable_ranges(mem: &GuestMem, size: u16) -> Vec<(u64, u64)> {
    let read_desc = |table: u64, i: u64| -> Option<(u64, u32, u16)> {
        let mut d = [0u8; 16];
        mem.read_slice(&mut d, GuestAddress(table.checked_add(16 * i)?))
            .ok()?;
        let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
        let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
        Some((addr, len, u16::from_le_bytes(d[12..14].try_into().unwrap())))
    };
    let mut out = vec![(USED, 6 + 8 * size as u64)];
    for i in 0..size as u64 {
        let Some((addr, len, flags)) = read_desc(DESC, i) else {
            continue;
        };
        if flags & VIRTQ_DESC_F_WRITE != 0 {
            out.push((addr, len as u64));
        }
        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            for k in 0..(len / 16).min(0x10000) as u64 {
                match read_desc(addr, k) {
                    Some((a, l, f)) if f & VIRTQ_DESC_F_WRITE != 0 => out.push((a, l as u64)),
                    Some(_) => {}
                    None => break,
                }
            }
        }
    }
    out
}

/// Every guest byte that changed outside `allowed`.
fn stray_writes(before: &[Vec<u8>], after: &[Vec<u8>], allowed: &[(u64, u64)]) -> Vec<u64> {
    let mut stray = vec![];
    for (r, &(start, _)) in REGIONS.iter().enumerate() {
        for (i, (x, y)) in before[r].iter().zip(&after[r]).enumerate() {
            let addr = start + i as u64;
            if x != y && !allowed.iter().any(|&(a, l)| addr >= a && addr - a < l) {
                stray.push(addr);
            }
        }
    }
    stray
}

/// Run `batches` random batches against `s`; returns a description of the first failure.
fn run_model(mut s: Setup, rng: &mut Rng, batches: usize) -> Result<(), String> {
    let mut dev = new_device(&s, rng);
    let (mut served, mut hostile_batches, mut resets) = (0usize, 0usize, 0usize);
    for batch in 0..batches {
        let hostile = rng.chance(1, 5);
        let mut a = Alloc::new();
        let mut free: Vec<u16> = (0..dev.size).collect();
        let mut expects = vec![];
        let mut discarded = None;
        for _ in 0..1 + rng.below(4) {
            // A request that finds no room is dropped, and with it its effect on the model.
            let model = s.model.clone();
            let placed = request(&mut s, &mut a, rng, &mut discarded).and_then(|(bufs, e)| {
                place(&s.mem, &dev, &mut a, rng, &bufs, &mut free).map(|head| (head, e))
            });
            let Some((head, mut e)) = placed else {
                s.model = model;
                discarded = None;
                break;
            };
            e.head = head;
            let slot = AVAIL + 4 + 2 * (dev.avail_idx % dev.size) as u64;
            s.mem.write_obj(head, GuestAddress(slot)).unwrap();
            dev.avail_idx = dev.avail_idx.wrapping_add(1);
            expects.push(e);
            if discarded.is_some() {
                break;
            }
        }
        s.mem
            .write_obj(dev.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        if hostile {
            for _ in 0..1 + rng.below(3) {
                mutate(&s.mem, &dev, rng);
            }
        }
        let mut allowed = writable_ranges(&s.mem, dev.size);
        let before = snapshot(&s.mem);
        dev.worker.serve(0, &mut dev.dead);
        let after = snapshot(&s.mem);
        // A hostile chain may read into a descriptor table and so make new buffers writable.
        allowed.extend(writable_ranges(&s.mem, dev.size));
        let stray = stray_writes(&before, &after, &allowed);
        if !stray.is_empty() {
            return Err(format!(
                "batch {batch} (hostile: {hostile}): the device wrote {} guest bytes outside \
                 writable buffers, first at {:#x}",
                stray.len(),
                stray[0]
            ));
        }
        let reset = dev.irq.needs_reset.lock().unwrap().clone();
        if hostile {
            hostile_batches += 1;
            resets += usize::from(reset.is_some());
            // Start over with a fresh queue, and take the disk as it now is: a hostile chain
            // may have written anything.
            s.model = read_disk(&*s.disk)?;
            dev = new_device(&s, rng);
            continue;
        }
        if let Some(why) = reset {
            return Err(format!(
                "batch {batch}: well-formed requests reset the device: {why}"
            ));
        }
        check_batch(&s, &mut dev, &expects).map_err(|e| format!("batch {batch}: {e}"))?;
        if let Some(d) = discarded {
            resolve_discard(&mut s, d)?;
        }
        served += expects.len();
        let check_disk = batch % 16 == 0 || batch + 1 == batches;
        if check_disk && read_disk(&*s.disk)? != s.model {
            return Err(format!("batch {batch}: the disk differs from the model"));
        }
    }
    eprintln!(
        "{batches} batches: {served} well-formed requests checked; {hostile_batches} hostile \
         batches, {resets} of them made the device ask for a reset"
    );
    if served < batches || resets == 0 || resets == hostile_batches {
        return Err("the random batches missed a kind of request or of damage".into());
    }
    Ok(())
}

/// Used ring entries, statuses and data read for a batch of well-formed requests.
fn check_batch(s: &Setup, dev: &mut Device, expects: &[Expect]) -> Result<(), String> {
    let used_idx: u16 = s.mem.read_obj(GuestAddress(USED + 2)).unwrap();
    let want_idx = dev.used_idx.wrapping_add(expects.len() as u16);
    if used_idx != want_idx {
        return Err(format!("used.idx {used_idx}, expected {want_idx}"));
    }
    for e in expects {
        let elem = USED + 4 + 8 * (dev.used_idx % dev.size) as u64;
        dev.used_idx = dev.used_idx.wrapping_add(1);
        let id: u32 = s.mem.read_obj(GuestAddress(elem)).unwrap();
        let len: u32 = s.mem.read_obj(GuestAddress(elem + 4)).unwrap();
        let status: u8 = s.mem.read_obj(GuestAddress(e.status_addr)).unwrap();
        if (id, len, status) != (e.head as u32, e.used_len, e.status) {
            return Err(format!(
                "used element (id {id}, len {len}), status {status}; expected (id {}, len {}), \
                 status {}",
                e.head, e.used_len, e.status
            ));
        }
        for (b, want) in &e.data {
            let mut got = vec![0u8; want.len()];
            s.mem.read_slice(&mut got, GuestAddress(b.addr)).unwrap();
            if &got != want {
                return Err(format!("data read into {b:?} differs from the model"));
            }
        }
    }
    Ok(())
}

/// After a discard, each byte reads as before or as zero; the model takes what is there.
fn resolve_discard(s: &mut Setup, d: Discarded) -> Result<(), String> {
    let mut now = vec![0u8; d.old.len()];
    s.disk
        .read_at(&mut now, d.off as u64)
        .map_err(|e| e.to_string())?;
    if let Some(i) = (0..now.len()).find(|&i| now[i] != 0 && now[i] != d.old[i]) {
        return Err(format!(
            "byte {} after a discard is neither old nor zero",
            d.off + i
        ));
    }
    s.model[d.off..d.off + now.len()].copy_from_slice(&now);
    Ok(())
}

fn read_disk(disk: &dyn BlockDriver) -> Result<Vec<u8>, String> {
    let mut v = vec![0u8; disk.size() as usize];
    disk.read_at(&mut v, 0).map_err(|e| e.to_string())?;
    Ok(v)
}

fn guest_mem() -> GuestMem {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(s, l)| (GuestAddress(s), l as usize))
        .collect();
    GuestMem::from_ranges(&ranges).unwrap()
}

fn limits(disk: Arc<dyn BlockDriver>, read_only: bool) -> Limits {
    let block = Block::new(disk, read_only, SERIAL);
    let word = |off| {
        let mut b = [0u8; 4];
        block.read_config(off, &mut b);
        u32::from_le_bytes(b)
    };
    Limits {
        max_discard: word(36),
        max_write_zeroes: word(48),
    }
}

fn setup(disk: Arc<dyn BlockDriver>, read_only: bool, rng: &mut Rng) -> Setup {
    let mem = guest_mem();
    // Fill guest memory with junk, so that stray writes of zeros show too.
    for &(start, len) in &REGIONS {
        mem.write_slice(&rng.bytes(len as usize), GuestAddress(start))
            .unwrap();
    }
    let model = read_disk(&*disk).unwrap();
    Setup {
        mem,
        limits: limits(disk.clone(), read_only),
        disk,
        read_only,
        model,
    }
}

fn batches() -> usize {
    std::env::var("MODEL_BATCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

fn run_config(name: &'static str, make: fn(&mut Rng) -> (Arc<dyn BlockDriver>, bool)) {
    let seed = seed(0x5eed_b10c ^ name.len() as u64);
    let r = with_deadline(Duration::from_secs(300), move || {
        let mut rng = Rng::new(seed);
        let (disk, read_only) = make(&mut rng);
        let s = setup(disk, read_only, &mut rng);
        run_model(s, &mut rng, batches())
    });
    if let Err(e) = r {
        panic!("{name} (TEST_SEED={seed:#x}): {e}");
    }
}

fn patterned(len: usize, rng: &mut Rng) -> Arc<MemDisk> {
    let d = MemDisk::new(len, false);
    d.write_at(&rng.bytes(len), 0).unwrap();
    Arc::new(d)
}

#[test]
fn memory_disk() {
    run_config("memory disk", |rng| (patterned(256 << 10, rng), false));
}

#[test]
fn read_only_device() {
    run_config("read-only device", |rng| (patterned(128 << 10, rng), true));
}

#[test]
fn qcow2_disk() {
    run_config("qcow2 disk", |rng| {
        let dir = tempfile::tempdir().unwrap();
        let opts = Qcow2CreateOptions {
            size: 512 << 10,
            cluster_size: *rng.pick(&[512u64, 4096, 65536]),
            ..Default::default()
        };
        let img = create_and_open(&dir.path().join("model.qcow2"), &opts).unwrap();
        // The open image keeps its file; the directory may go.
        drop(dir);
        (Arc::from(img.into_driver()), false)
    });
}
