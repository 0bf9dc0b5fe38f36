//! virtio-net without KVM: guest memory and both queues are laid out here the way a driver
//! would, the backend is one end of a `SOCK_SEQPACKET` socket pair (one packet per message,
//! as a tap), and the device's I/O worker serves the queues. Checked:
//! - transmitted chains (direct and indirect, split at any byte) reach the backend as one
//!   packet each, with or without the virtio-net header as the backend wants;
//! - received packets fill the driver's buffers, merged over several when MRG_RXBUF was
//!   negotiated (num_buffers in the header), in order and without loss while the guest is
//!   out of buffers: the device then stops reading the backend until buffers come;
//! - hostile chains on either queue (addresses outside memory, loops, bad indexes, wrong
//!   directions, short headers) end in NEEDS_RESET, never a panic or a hang;
//! - the I/O thread and the offloads and configuration the device presents.
//!
//! `TEST_SEED=<n>` replays a run.

use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration_tests::{seed, with_deadline, Rng};
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::net::{
    tap_offloads, Net, RxState, Worker, RX, TX, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_S_LINK_UP,
};
use vmm::devices::virtio::queue::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use vmm::devices::virtio::{ActiveQueue, Queue, QueueConfig, VirtioDevice, VirtioInterrupt};
use vmm::tap::{PacketBackend, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};
use vmm::GuestMem;
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM: two regions with a hole between them.
const REGIONS: [(u64, u64); 2] = [(0, 0x80000), (0x90000, 0x80000)];
/// Rings of the receive and transmit queues: descriptor table, available, used.
const RINGS: [(u64, u64, u64); 2] = [(0x0, 0x1000, 0x2000), (0x3000, 0x4000, 0x5000)];
const INDIRECT: (u64, u64) = (0x6000, 0x8000);
const DATA: [(u64, u64); 2] = [(0x8000, 0x80000), (0x90000, 0x110000)];
const QSIZE: u16 = 64;

/// Records what the worker signalled.
#[derive(Default)]
struct Irq {
    needs_reset: Mutex<Option<String>>,
    notified: [AtomicUsize; 2],
}

impl VirtioInterrupt for Irq {
    fn notify_queue(&self, queue: usize) {
        self.notified[queue].fetch_add(1, Ordering::SeqCst);
    }
    fn notify_config(&self) {}
    fn set_needs_reset(&self, why: &str) {
        *self.needs_reset.lock().unwrap() = Some(why.to_string());
    }
}

/// One end of a socket pair as the device's backend.
struct Sock {
    fd: OwnedFd,
    vnet: bool,
    ufo: bool,
    offloads: Mutex<Vec<u32>>,
}

impl PacketBackend for Sock {
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    fn vnet_hdr(&self) -> bool {
        self.vnet
    }
    fn ufo(&self) -> bool {
        self.ufo
    }
    fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        self.offloads.lock().unwrap().push(flags);
        Ok(())
    }
}

/// The backend for the device and the other end (the "network") for the test.
fn socket_pair(vnet: bool, ufo: bool) -> (Arc<Sock>, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills the two-element array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just created and are ours alone.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let sock = Sock {
        fd: a,
        vnet,
        ufo,
        offloads: Mutex::new(vec![]),
    };
    (Arc::new(sock), b)
}

fn send(fd: &OwnedFd, pkt: &[u8]) {
    // SAFETY: sending from a live buffer.
    let n = unsafe { libc::send(fd.as_raw_fd(), pkt.as_ptr() as *const _, pkt.len(), 0) };
    assert_eq!(n, pkt.len() as isize, "{}", std::io::Error::last_os_error());
}

/// The next packet on `fd`, if one is waiting.
fn recv(fd: &OwnedFd) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 1 << 17];
    // SAFETY: receiving into a live buffer of the given length.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut _,
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    (n >= 0).then(|| {
        buf.truncate(n as usize);
        buf
    })
}

fn guest_mem(rng: &mut Rng) -> GuestMem {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(s, l)| (GuestAddress(s), l as usize))
        .collect();
    let mem = GuestMem::from_ranges(&ranges).unwrap();
    for &(start, len) in &REGIONS {
        mem.write_slice(&rng.bytes(len as usize), GuestAddress(start))
            .unwrap();
    }
    for &(d, a, u) in &RINGS {
        for (addr, len) in [(d, 16 * QSIZE as usize), (a, 0x1000), (u, 0x1000)] {
            mem.write_slice(&vec![0; len], GuestAddress(addr)).unwrap();
        }
    }
    mem
}

/// One guest buffer of a chain.
#[derive(Clone, Copy, Debug)]
struct Buf {
    addr: u64,
    len: u32,
    writable: bool,
}

/// The driver's side of one queue.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_seen: u16,
    next_desc: u16,
}

impl Ring {
    fn new(q: usize) -> Ring {
        let (desc, avail, used) = RINGS[q];
        Ring {
            desc,
            avail,
            used,
            avail_idx: 0,
            used_seen: 0,
            next_desc: 0,
        }
    }

    fn config(&self) -> QueueConfig {
        QueueConfig {
            size: QSIZE,
            ready: true,
            desc: self.desc,
            avail: self.avail,
            used: self.used,
        }
    }

    fn write_desc(mem: &GuestMem, at: u64, b: &Buf, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&b.addr.to_le_bytes());
        d[8..12].copy_from_slice(&b.len.to_le_bytes());
        let f = flags | if b.writable { VIRTQ_DESC_F_WRITE } else { 0 };
        d[12..14].copy_from_slice(&f.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, GuestAddress(at)).unwrap();
    }

    /// Make a chain of `bufs` available (through an indirect table at `indirect` if
    /// given); returns its head.
    fn add(&mut self, mem: &GuestMem, bufs: &[Buf], indirect: Option<u64>) -> u16 {
        let head = self.next_desc;
        match indirect {
            Some(table) => {
                for (i, b) in bufs.iter().enumerate() {
                    let last = i + 1 == bufs.len();
                    let flags = if last { 0 } else { VIRTQ_DESC_F_NEXT };
                    Self::write_desc(mem, table + 16 * i as u64, b, flags, i as u16 + 1);
                }
                let t = Buf {
                    addr: table,
                    len: 16 * bufs.len() as u32,
                    writable: false,
                };
                Self::write_desc(
                    mem,
                    self.desc + 16 * head as u64,
                    &t,
                    VIRTQ_DESC_F_INDIRECT,
                    0,
                );
                self.next_desc = (head + 1) % QSIZE;
            }
            None => {
                for (i, b) in bufs.iter().enumerate() {
                    let idx = (head + i as u16) % QSIZE;
                    let last = i + 1 == bufs.len();
                    let flags = if last { 0 } else { VIRTQ_DESC_F_NEXT };
                    Self::write_desc(
                        mem,
                        self.desc + 16 * idx as u64,
                        b,
                        flags,
                        (idx + 1) % QSIZE,
                    );
                }
                self.next_desc = (head + bufs.len() as u16) % QSIZE;
            }
        }
        let slot = (self.avail_idx % QSIZE) as u64;
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// Used entries (head, length) since the last call.
    fn used(&mut self, mem: &GuestMem) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = vec![];
        while self.used_seen != idx {
            let e = self.used + 4 + 8 * (self.used_seen % QSIZE) as u64;
            let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// Bump allocator over the data areas.
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
    fn take(&mut self, rng: &mut Rng, len: u64) -> u64 {
        let r = rng.below(2) as usize;
        let start = self.next[r] + rng.below(16);
        assert!(start + len <= DATA[r].1, "test data area full");
        self.next[r] = start + len;
        start
    }
    fn table(&mut self, n: u64) -> u64 {
        let start = self.indirect;
        assert!(start + 16 * n <= INDIRECT.1);
        self.indirect += 16 * n;
        start
    }
}

/// `len` split at random points into at most `max` non-empty parts.
fn split(rng: &mut Rng, len: u64, max: u64) -> Vec<u64> {
    let parts = (1 + rng.below(max)).min(len);
    let mut cuts: Vec<u64> = (1..parts).map(|_| rng.range(1, len - 1)).collect();
    cuts.sort();
    cuts.dedup();
    let mut out = vec![];
    let mut prev = 0;
    for c in cuts.into_iter().chain([len]) {
        out.push(c - prev);
        prev = c;
    }
    out
}

struct Setup {
    mem: GuestMem,
    worker: Worker,
    irq: Arc<Irq>,
    peer: OwnedFd,
    rings: [Ring; 2],
}

fn setup(rng: &mut Rng, vnet: bool, mergeable: bool) -> Setup {
    let mem = guest_mem(rng);
    let (backend, peer) = socket_pair(vnet, false);
    let rings = [Ring::new(RX), Ring::new(TX)];
    let event_idx = rng.chance(1, 2);
    let queues = rings
        .iter()
        .map(|r| {
            let q = Queue::new(r.config(), event_idx, true);
            q.validate(&mem).unwrap();
            ActiveQueue {
                queue: q,
                kick: EventFd::new(0).unwrap(),
            }
        })
        .collect();
    let irq = Arc::new(Irq::default());
    let worker = Worker::new(mem.clone(), backend, mergeable, queues, irq.clone());
    Setup {
        mem,
        worker,
        irq,
        peer,
        rings,
    }
}

/// A packet as the backend carries it: with a header when `vnet`.
fn packet(rng: &mut Rng, vnet: bool) -> Vec<u8> {
    let len = if rng.chance(1, 10) {
        rng.range(2000, 20000)
    } else {
        rng.range(1, 1600)
    } as usize;
    let mut p = rng.bytes(len + if vnet { VNET_HDR_LEN } else { 0 });
    if vnet {
        // num_buffers is the device's to fill in; the rest of the header passes through.
        p[10..12].fill(0);
    }
    p
}

fn check_transmit(seed: u64, vnet: bool) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let mut s = setup(&mut rng, vnet, true);
    for round in 0..60 {
        let mut a = Alloc::new();
        let mut expect = vec![];
        let mut heads = vec![];
        for _ in 0..rng.range(1, 6) {
            let mut pkt = packet(&mut rng, true);
            // The guest always sends a header; the backend gets it only with vnet.
            let mut bufs = vec![];
            let mut at = 0;
            for n in split(&mut rng, pkt.len() as u64, 4) {
                let addr = a.take(&mut rng, n);
                s.mem
                    .write_slice(&pkt[at..at + n as usize], GuestAddress(addr))
                    .unwrap();
                at += n as usize;
                bufs.push(Buf {
                    addr,
                    len: n as u32,
                    writable: false,
                });
            }
            let table = rng.chance(1, 3).then(|| a.table(bufs.len() as u64));
            heads.push(s.rings[TX].add(&s.mem, &bufs, table));
            if !vnet {
                pkt.drain(..VNET_HDR_LEN);
            }
            expect.push(pkt);
        }
        s.worker.tx();
        if let Some(e) = s.irq.needs_reset.lock().unwrap().as_ref() {
            return Err(format!("round {round}: needs reset: {e}"));
        }
        let used = s.rings[TX].used(&s.mem);
        let want: Vec<(u16, u32)> = heads.iter().map(|&h| (h, 0)).collect();
        if used != want {
            return Err(format!("round {round}: used {used:?}, expected {want:?}"));
        }
        for (i, e) in expect.iter().enumerate() {
            let got = recv(&s.peer).ok_or(format!("round {round}: packet {i} not sent"))?;
            if &got != e {
                return Err(format!(
                    "round {round}: packet {i}: {} bytes sent, {} expected, or other bytes",
                    got.len(),
                    e.len()
                ));
            }
        }
        if recv(&s.peer).is_some() {
            return Err(format!("round {round}: an extra packet"));
        }
    }
    if s.irq.notified[TX].load(Ordering::SeqCst) == 0 {
        return Err("no transmit interrupt".into());
    }
    Ok(())
}

#[test]
fn transmit() {
    for vnet in [true, false] {
        let seed = seed(0x7e7 + vnet as u64);
        with_deadline(Duration::from_secs(120), move || check_transmit(seed, vnet))
            .unwrap_or_else(|e| panic!("vnet={vnet} (TEST_SEED={seed:#x}): {e}"));
    }
}

/// Add `n` receive buffers of sizes in `size`; returns the head and buffers of each.
fn post(
    s: &mut Setup,
    a: &mut Alloc,
    rng: &mut Rng,
    n: usize,
    size: (u64, u64),
) -> Vec<(u16, Vec<Buf>)> {
    let mut out = vec![];
    for _ in 0..n {
        let len = rng.range(size.0, size.1);
        let bufs: Vec<Buf> = split(rng, len, 2)
            .into_iter()
            .map(|l| Buf {
                addr: a.take(rng, l),
                len: l as u32,
                writable: true,
            })
            .collect();
        let table = rng.chance(1, 4).then(|| a.table(bufs.len() as u64));
        let head = s.rings[RX].add(&s.mem, &bufs, table);
        out.push((head, bufs));
    }
    out
}

fn read_bufs(mem: &GuestMem, bufs: &[Buf], mut len: usize) -> Vec<u8> {
    let mut out = vec![];
    for b in bufs {
        let n = (b.len as usize).min(len);
        let mut v = vec![0u8; n];
        mem.read_slice(&mut v, GuestAddress(b.addr)).unwrap();
        out.extend(v);
        len -= n;
    }
    out
}

/// Smallest receive buffer the model posts (so that a one-byte packet takes one).
const MIN_RX_BUF: u64 = 64;

/// The packets the used entries since the last call complete, each from its buffers;
/// `posted` holds the buffers not used yet, in the order they were made available.
fn received(
    s: &mut Setup,
    posted: &mut std::collections::VecDeque<(u16, Vec<Buf>)>,
    mergeable: bool,
) -> Result<Vec<Vec<u8>>, String> {
    let used = s.rings[RX].used(&s.mem);
    let mut filled = vec![];
    for (head, len) in used {
        let (h, bufs) = posted.pop_front().ok_or("more used buffers than posted")?;
        if h != head {
            return Err(format!("buffer {head} used out of order (expected {h})"));
        }
        filled.push((bufs, len));
    }
    let mut out = vec![];
    let mut i = 0;
    while i < filled.len() {
        let hdr = read_bufs(&s.mem, &filled[i].0, VNET_HDR_LEN);
        let n = u16::from_le_bytes([hdr[10], hdr[11]]) as usize;
        if n == 0 || (!mergeable && n != 1) || i + n > filled.len() {
            return Err(format!("num_buffers {n} with {} used", filled.len() - i));
        }
        let mut p = vec![];
        for (bufs, len) in &filled[i..i + n] {
            p.extend(read_bufs(&s.mem, bufs, *len as usize));
        }
        out.push(p);
        i += n;
    }
    Ok(out)
}

fn check_receive(seed: u64, vnet: bool, mergeable: bool) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let mut s = setup(&mut rng, vnet, mergeable);
    // Merged: buffers of any size; else each holds the largest packet.
    let size = if mergeable {
        (MIN_RX_BUF, 3000)
    } else {
        (20012, 20100)
    };
    let hdr = if vnet { VNET_HDR_LEN } else { 0 };
    for round in 0..40 {
        let mut a = Alloc::new();
        let sent: Vec<Vec<u8>> = (0..rng.range(1, 8))
            .map(|_| packet(&mut rng, vnet))
            .collect();
        for p in &sent {
            send(&s.peer, p);
        }
        // Buffers come in small batches (none at first): packets wait for them.
        let mut posted = std::collections::VecDeque::new();
        let mut got = vec![];
        let mut passes = 0;
        while got.len() < sent.len() {
            passes += 1;
            if passes > 400 {
                return Err(format!("round {round}: packets never delivered"));
            }
            let state = s.worker.rx();
            if let Some(e) = s.irq.needs_reset.lock().unwrap().as_ref() {
                return Err(format!("round {round}: needs reset: {e}"));
            }
            got.extend(
                received(&mut s, &mut posted, mergeable)
                    .map_err(|e| format!("round {round}: {e}"))?,
            );
            if got.len() < sent.len() && state != RxState::NoBuffers {
                return Err(format!("round {round}: rx {state:?} with packets left"));
            }
            let room = QSIZE as usize / 2 - posted.len();
            let n = (rng.range(1, 3) as usize).min(room);
            posted.extend(post(&mut s, &mut a, &mut rng, n, size));
        }
        for (i, (g, p)) in got.iter().zip(&sent).enumerate() {
            let mut want = [vec![0u8; VNET_HDR_LEN - hdr], p.clone()].concat();
            want[10..12].copy_from_slice(&g[10..12]);
            if *g != want {
                return Err(format!(
                    "round {round}: packet {i}: {} bytes received, {} expected, or other bytes",
                    g.len(),
                    want.len()
                ));
            }
        }
        // Use up the buffers left with one-byte packets, so the next round starts afresh.
        let left = posted.len();
        for _ in 0..left {
            send(&s.peer, &vec![7u8; hdr + 1]);
        }
        s.worker.rx();
        let n = received(&mut s, &mut posted, mergeable)
            .map_err(|e| format!("round {round}: {e}"))?
            .len();
        if n != left || !posted.is_empty() {
            return Err(format!(
                "round {round}: {n} of {left} leftover buffers used"
            ));
        }
    }
    if s.worker.dropped != 0 {
        return Err(format!("{} packets dropped", s.worker.dropped));
    }
    if s.irq.notified[RX].load(Ordering::SeqCst) == 0 {
        return Err("no receive interrupt".into());
    }
    Ok(())
}

#[test]
fn receive() {
    for (vnet, mergeable) in [(true, true), (true, false), (false, true), (false, false)] {
        let seed = seed(0x7ec + 2 * vnet as u64 + mergeable as u64);
        with_deadline(Duration::from_secs(120), move || {
            check_receive(seed, vnet, mergeable)
        })
        .unwrap_or_else(|e| panic!("vnet={vnet} mergeable={mergeable} (TEST_SEED={seed:#x}): {e}"));
    }
}

/// Without MRG_RXBUF a packet larger than the buffer is dropped, and the buffer serves the
/// next packet that fits.
#[test]
fn undersized_buffer_drops_the_packet() {
    let mut rng = Rng::new(seed(0xd60));
    let mut s = setup(&mut rng, true, false);
    let mut a = Alloc::new();
    let posted = post(&mut s, &mut a, &mut rng, 1, (100, 100));
    send(&s.peer, &[1u8; 500]);
    send(&s.peer, &[2u8; 50]);
    assert_eq!(s.worker.rx(), RxState::NoBuffers);
    assert_eq!(s.worker.dropped, 1);
    assert_eq!(s.rings[RX].used(&s.mem), [(posted[0].0, 50)]);
    let got = read_bufs(&s.mem, &posted[0].1, 50);
    assert_eq!(got[12..], [2u8; 38]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
}

/// Ways a driver can break a chain; `true`: the device must answer with NEEDS_RESET.
#[derive(Clone, Copy, Debug)]
enum Break {
    AddrOutside,
    AddrInHole,
    HugeLen,
    WrongDirection,
    ShortHeader,
    NextOutOfRange,
    Loop,
    TooManyAvailable,
    HeadOutOfRange,
    IndirectBadLen,
    IndirectNested,
    Junk,
}

const BREAKS: [Break; 12] = [
    Break::AddrOutside,
    Break::AddrInHole,
    Break::HugeLen,
    Break::WrongDirection,
    Break::ShortHeader,
    Break::NextOutOfRange,
    Break::Loop,
    Break::TooManyAvailable,
    Break::HeadOutOfRange,
    Break::IndirectBadLen,
    Break::IndirectNested,
    Break::Junk,
];

fn check_hostile(seed: u64) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    for round in 0..300 {
        let vnet = rng.chance(1, 2);
        let mergeable = rng.chance(1, 2);
        let mut s = setup(&mut rng, vnet, mergeable);
        let q = rng.below(2) as usize;
        let how = *rng.pick(&BREAKS);
        let mut a = Alloc::new();
        // One valid chain on each queue (two descriptors), and a packet to receive.
        let rx: Vec<Buf> = (0..2)
            .map(|_| Buf {
                addr: a.take(&mut rng, 1000),
                len: 1000,
                writable: true,
            })
            .collect();
        s.rings[RX].add(&s.mem, &rx, None);
        let tx: Vec<Buf> = (0..2)
            .map(|_| Buf {
                addr: a.take(&mut rng, 60),
                len: 60,
                writable: false,
            })
            .collect();
        s.rings[TX].add(&s.mem, &tx, None);
        send(&s.peer, &[5u8; 80]);
        let (desc, avail, _) = RINGS[q];
        let put = |off: u64, v: &[u8]| s.mem.write_slice(v, GuestAddress(off)).unwrap();
        let must_fail = match how {
            Break::AddrOutside => {
                put(desc, &0x7_0000_0000u64.to_le_bytes());
                true
            }
            Break::AddrInHole => {
                put(desc, &(REGIONS[0].1 + 0x100).to_le_bytes());
                true
            }
            Break::HugeLen => {
                put(desc + 8, &0xffff_fff0u32.to_le_bytes());
                true
            }
            Break::WrongDirection => {
                let flags = VIRTQ_DESC_F_NEXT | if q == RX { 0 } else { VIRTQ_DESC_F_WRITE };
                put(desc + 12, &flags.to_le_bytes());
                true
            }
            Break::ShortHeader => {
                // The first buffer (and the whole chain, for transmit) under 12 bytes.
                put(desc + 8, &4u32.to_le_bytes());
                put(desc + 12, &0u16.to_le_bytes());
                true
            }
            Break::NextOutOfRange => {
                put(desc + 14, &(QSIZE + 3).to_le_bytes());
                true
            }
            Break::Loop => {
                put(desc + 16 + 12, &VIRTQ_DESC_F_NEXT.to_le_bytes());
                put(desc + 16 + 14, &0u16.to_le_bytes());
                true
            }
            Break::TooManyAvailable => {
                put(avail + 2, &(QSIZE + 1).to_le_bytes());
                true
            }
            Break::HeadOutOfRange => {
                put(avail + 4, &999u16.to_le_bytes());
                true
            }
            Break::IndirectBadLen => {
                let t = a.table(1);
                put(desc, &t.to_le_bytes());
                put(desc + 8, &20u32.to_le_bytes());
                put(desc + 12, &VIRTQ_DESC_F_INDIRECT.to_le_bytes());
                true
            }
            Break::IndirectNested => {
                let t = a.table(1);
                let mut d = [0u8; 16];
                d[..8].copy_from_slice(&t.to_le_bytes());
                d[8..12].copy_from_slice(&16u32.to_le_bytes());
                d[12..14].copy_from_slice(&VIRTQ_DESC_F_INDIRECT.to_le_bytes());
                put(t, &d);
                put(desc, &t.to_le_bytes());
                put(desc + 8, &16u32.to_le_bytes());
                put(desc + 12, &VIRTQ_DESC_F_INDIRECT.to_le_bytes());
                true
            }
            Break::Junk => {
                put(desc, &rng.bytes(16 * QSIZE as usize));
                false
            }
        };
        for _ in 0..3 {
            s.worker.rx();
            s.worker.tx();
        }
        let reset = s.irq.needs_reset.lock().unwrap().clone();
        if must_fail && reset.is_none() {
            return Err(format!(
                "round {round}: {how:?} on queue {q} was not refused"
            ));
        }
        // The other queue still works when it is not the broken one.
        if must_fail && q == RX && recv(&s.peer).is_none() {
            return Err(format!("round {round}: {how:?} on rx stopped transmit"));
        }
    }
    Ok(())
}

#[test]
fn hostile_chains_on_both_queues() {
    let seed = seed(0xbad_c4a1);
    with_deadline(Duration::from_secs(120), move || check_hostile(seed))
        .unwrap_or_else(|e| panic!("TEST_SEED={seed:#x}: {e}"));
}

/// The device as the transport sees it: features, configuration, offloads set at
/// activation, and its I/O thread, which leaves a packet in the backend until the guest
/// kicks with a buffer.
#[test]
fn io_thread_and_configuration() {
    let mut rng = Rng::new(seed(0x10));
    let mac = [0x52, 0x54, 0, 1, 2, 3];
    let (no_vnet, _) = socket_pair(false, false);
    let f = Net::new(no_vnet, mac).features();
    assert_eq!(
        f & (1 << VIRTIO_NET_F_HOST_TSO4 | 1 << VIRTIO_NET_F_GUEST_CSUM),
        0
    );
    assert_ne!(f & (1 << VIRTIO_NET_F_MRG_RXBUF), 0);
    let (no_ufo, _) = socket_pair(true, false);
    let f = Net::new(no_ufo, mac).features();
    assert_ne!(f & (1 << VIRTIO_NET_F_HOST_TSO4), 0);
    assert_eq!(
        f & (1 << VIRTIO_NET_F_HOST_UFO | 1 << VIRTIO_NET_F_GUEST_UFO),
        0
    );

    let (backend, peer) = socket_pair(true, true);
    let mut net = Net::new(backend.clone(), mac);
    let offered = net.features();
    assert_ne!(offered & (1 << VIRTIO_NET_F_GUEST_UFO), 0);
    let mut cfg = [0u8; 8];
    net.read_config(0, &mut cfg);
    assert_eq!(cfg[..6], mac);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), VIRTIO_NET_S_LINK_UP);

    let mem = guest_mem(&mut rng);
    let mut rings = [Ring::new(RX), Ring::new(TX)];
    let kicks: Vec<EventFd> = (0..2).map(|_| EventFd::new(0).unwrap()).collect();
    let queues = rings
        .iter()
        .zip(&kicks)
        .map(|(r, k)| ActiveQueue {
            queue: Queue::new(r.config(), true, true),
            kick: k.try_clone().unwrap(),
        })
        .collect();
    let features = 1 << VIRTIO_NET_F_GUEST_CSUM
        | 1 << VIRTIO_NET_F_GUEST_TSO4
        | 1 << VIRTIO_NET_F_GUEST_TSO6
        | 1 << VIRTIO_NET_F_MRG_RXBUF
        | 1u64 << 32;
    assert_eq!(tap_offloads(features), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6);
    // Segmentation offloads without checksum offload are not taken.
    assert_eq!(
        tap_offloads(1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_UFO),
        0
    );
    let irq = Arc::new(Irq::default());
    net.activate(mem.clone(), features, queues, irq.clone())
        .unwrap();
    assert_eq!(
        *backend.offloads.lock().unwrap(),
        [TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6]
    );

    let pkt = [vec![0u8; VNET_HDR_LEN], vec![9u8; 300]].concat();
    send(&peer, &pkt);
    std::thread::sleep(Duration::from_millis(200));
    let mut b = [0u8; 1];
    // SAFETY: peeking into a live one-byte buffer.
    let n = unsafe {
        libc::recv(
            backend.fd(),
            b.as_mut_ptr() as *mut _,
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    assert_eq!(n, 1, "the device read the packet without a buffer for it");
    let mut a = Alloc::new();
    let buf = Buf {
        addr: a.take(&mut rng, 2048),
        len: 2048,
        writable: true,
    };
    let head = rings[RX].add(&mem, &[buf], None);
    kicks[RX].write(1).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let used = loop {
        let u = rings[RX].used(&mem);
        if !u.is_empty() || std::time::Instant::now() > deadline {
            break u;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(used, [(head, pkt.len() as u32)]);
    let mut got = read_bufs(&mem, &[buf], pkt.len());
    assert_eq!(got[10..12], 1u16.to_le_bytes());
    got[10..12].fill(0);
    assert_eq!(got, pkt);

    let out = Buf {
        addr: a.take(&mut rng, 100),
        len: 100,
        writable: false,
    };
    mem.write_slice(&[3u8; 100], GuestAddress(out.addr))
        .unwrap();
    rings[TX].add(&mem, &[out], None);
    kicks[TX].write(1).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let sent = loop {
        if let Some(p) = recv(&peer) {
            break Some(p);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(sent, Some(vec![3u8; 100]));
    net.reset();
    assert!(irq.needs_reset.lock().unwrap().is_none());
    assert!(irq.notified[RX].load(Ordering::SeqCst) > 0);
}
