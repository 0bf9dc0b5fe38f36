//! virtio-blk over virtio-pci, driven from the host side through the same MMIO bus the
//! vCPUs use (and once from a guest, through the ioeventfd): requests of every type,
//! and malformed chains that must end in an error status or NEEDS_RESET, never a crash.

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::BlockDriver;
use integration_tests::fake_kernel::RESET;
use integration_tests::kvm::have_kvm;
use integration_tests::mem_disk::MemDisk;
use vm_memory::{Bytes, GuestAddress};
use vmm::boot::BootEntry;
use vmm::devices::serial::SharedBuf;
use vmm::vm::{Machine, VmDisk};
use vmm::VmExit;

const BAR: u64 = 0xc000_0000;
const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x11000;
const USED: u64 = 0x12000;
const QSIZE: u16 = 32;
const HDR: u64 = 0x20000;
const DATA: u64 = 0x21000;
const STATUS: u64 = 0x30000;

const F_WRITE: u16 = 2;
const F_NEXT: u16 = 1;
const F_INDIRECT: u16 = 4;

struct Driver {
    m: Machine,
    disk: Arc<MemDisk>,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    fn new(read_only: bool) -> Driver {
        let disk = Arc::new(MemDisk::new(1 << 20, read_only));
        let m = Machine::new(
            64 << 20,
            1,
            Box::new(SharedBuf::default()),
            vec![VmDisk {
                driver: disk.clone(),
                read_only,
                serial: "SERIAL-123".into(),
            }],
            vec![],
        )
        .unwrap();
        let mut d = Driver {
            m,
            disk,
            avail_idx: 0,
            used_seen: 0,
        };
        d.init(1 << 28 | 1 << 29);
        d
    }

    fn w(&self, off: u64, v: &[u8]) {
        assert!(self.m.mmio_bus.write(BAR + off, v));
    }
    fn r(&self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        assert!(self.m.mmio_bus.read(BAR + off, &mut b[..len]));
        u64::from_le_bytes(b)
    }
    fn status(&self) -> u8 {
        self.r(0x14, 1) as u8
    }

    fn features(&self) -> u64 {
        self.w(0x00, &0u32.to_le_bytes());
        let lo = self.r(0x04, 4);
        self.w(0x00, &1u32.to_le_bytes());
        let hi = self.r(0x04, 4);
        hi << 32 | lo
    }

    /// Reset and bring the device up with `extra` ring features (plus VERSION_1).
    fn init(&mut self, extra: u64) {
        self.w(0x14, &[0]);
        assert_eq!(self.status(), 0);
        self.w(0x14, &[1 | 2]);
        let offered = self.features();
        assert!(offered & (1 << 32) != 0, "VERSION_1 offered");
        let want = (offered & (extra | 0xffff_ffff)) | (1 << 32);
        self.w(0x08, &0u32.to_le_bytes());
        self.w(0x0c, &(want as u32).to_le_bytes());
        self.w(0x08, &1u32.to_le_bytes());
        self.w(0x0c, &((want >> 32) as u32).to_le_bytes());
        self.w(0x14, &[1 | 2 | 8]);
        assert_eq!(self.status() & 8, 8, "FEATURES_OK accepted");
        // Clear rings.
        self.m
            .mem
            .write_slice(&[0u8; 0x3000], GuestAddress(DESC))
            .unwrap();
        self.w(0x16, &0u16.to_le_bytes());
        assert_eq!(self.r(0x18, 2), 1024);
        self.w(0x18, &QSIZE.to_le_bytes());
        self.w(0x20, &(DESC as u32).to_le_bytes());
        self.w(0x24, &0u32.to_le_bytes());
        self.w(0x28, &(AVAIL as u32).to_le_bytes());
        self.w(0x2c, &0u32.to_le_bytes());
        self.w(0x30, &(USED as u32).to_le_bytes());
        self.w(0x34, &0u32.to_le_bytes());
        self.w(0x1a, &1u16.to_le_bytes());
        self.w(0x10, &0u16.to_le_bytes());
        self.w(0x1c, &1u16.to_le_bytes());
        self.w(0x14, &[1 | 2 | 8 | 4]);
        assert_eq!(self.status(), 0xf);
        self.avail_idx = 0;
        self.used_seen = 0;
    }

    fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.set_desc_at(DESC, i, addr, len, flags, next)
    }
    fn set_desc_at(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = Vec::new();
        b.extend_from_slice(&addr.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&next.to_le_bytes());
        self.m
            .mem
            .write_slice(&b, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }

    fn header(&self, ty: u32, sector: u64) {
        let mut b = Vec::new();
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&sector.to_le_bytes());
        self.m.mem.write_slice(&b, GuestAddress(HDR)).unwrap();
        self.m.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Publish `head`, kick, and wait for it to be used. Returns (used len, status byte).
    fn submit(&mut self, head: u16) -> Option<(u32, u8)> {
        let slot = (self.avail_idx % QSIZE) as u64;
        self.m
            .mem
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.m
            .mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        self.w(0x3000, &0u16.to_le_bytes());
        self.wait_used()
    }

    fn wait_used(&mut self) -> Option<(u32, u8)> {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            let idx: u16 = self.m.mem.read_obj(GuestAddress(USED + 2)).unwrap();
            if idx != self.used_seen {
                let slot = (self.used_seen % QSIZE) as u64;
                let len: u32 = self
                    .m
                    .mem
                    .read_obj(GuestAddress(USED + 4 + 8 * slot + 4))
                    .unwrap();
                self.used_seen = self.used_seen.wrapping_add(1);
                return Some((len, self.m.mem.read_obj(GuestAddress(STATUS)).unwrap()));
            }
            if self.status() & 0x40 != 0 {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("request not completed and device not broken");
    }

    /// A three-descriptor request: header, data (`len` bytes at DATA), status.
    fn simple(&mut self, ty: u32, sector: u64, len: u32, data_writable: bool) -> Option<(u32, u8)> {
        self.header(ty, sector);
        self.set_desc(0, HDR, 16, F_NEXT, 1);
        let f = if data_writable { F_WRITE } else { 0 };
        self.set_desc(1, DATA, len, f | F_NEXT, 2);
        self.set_desc(2, STATUS, 1, F_WRITE, 0);
        self.submit(0)
    }

    fn wait_broken(&self) {
        let t = Instant::now();
        while self.status() & 0x40 == 0 {
            assert!(t.elapsed() < Duration::from_secs(5), "NEEDS_RESET not set");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[test]
fn requests() {
    if !have_kvm() {
        return;
    }
    let mut d = Driver::new(false);
    // Device config: capacity in sectors.
    assert_eq!(d.r(0x2000, 8), (1 << 20) / 512);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    d.m.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    assert_eq!(d.simple(1, 3, 1024, false), Some((1, 0)));
    assert_eq!(&d.disk.contents()[3 * 512..5 * 512], &pattern[..]);

    d.m.mem
        .write_slice(&[0u8; 1024], GuestAddress(DATA))
        .unwrap();
    assert_eq!(d.simple(0, 3, 1024, true), Some((1025, 0)));
    let mut back = vec![0u8; 1024];
    d.m.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);

    // GET_ID
    assert_eq!(d.simple(8, 0, 20, true), Some((21, 0)));
    let mut id = [0u8; 20];
    d.m.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..10], b"SERIAL-123");
    assert_eq!(id[10..], [0u8; 10]);

    // FLUSH (header + status only)
    d.header(4, 0);
    d.set_desc(0, HDR, 16, F_NEXT, 2);
    d.set_desc(2, STATUS, 1, F_WRITE, 0);
    assert_eq!(d.submit(0), Some((1, 0)));

    // WRITE_ZEROES sector 4 (one sector) and DISCARD.
    let mut seg = Vec::new();
    seg.extend_from_slice(&4u64.to_le_bytes());
    seg.extend_from_slice(&1u32.to_le_bytes());
    seg.extend_from_slice(&0u32.to_le_bytes());
    d.m.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    assert_eq!(d.simple(13, 0, 16, false), Some((1, 0)));
    assert_eq!(&d.disk.contents()[3 * 512..4 * 512], &pattern[..512]);
    assert_eq!(&d.disk.contents()[4 * 512..5 * 512], &[0u8; 512][..]);
    assert_eq!(d.simple(11, 0, 16, false), Some((1, 0)));

    // Unknown request type -> UNSUPP; past the end -> IOERR; buffer outside RAM -> IOERR.
    assert_eq!(d.simple(99, 0, 512, true), Some((1, 2)));
    assert_eq!(d.simple(0, 2047, 1024, true), Some((1, 1)));
    assert_eq!(d.simple(0, u64::MAX / 256, 512, true), Some((1, 1)));
    d.header(0, 0);
    d.set_desc(1, 0x7_0000_0000, 512, F_WRITE | F_NEXT, 2);
    assert_eq!(d.submit(0), Some((1, 1)));
    d.set_desc(1, 0x3ff_ffff, 0xffff_0000, F_NEXT, 2);
    d.header(1, 0);
    assert_eq!(d.submit(0), Some((1, 1)));

    // A scattered request (one vectored engine call over 12 host runs): 12 segments of 512
    // bytes, every other 4 KiB page, written and read back.
    let segs = 12u16;
    let scattered: Vec<u8> = (0..512 * segs as usize)
        .map(|i| (i * 13 + 5) as u8)
        .collect();
    d.header(1, 20);
    d.set_desc(0, HDR, 16, F_NEXT, 1);
    for i in 0..segs {
        let a = 0x50000 + 0x2000 * i as u64;
        d.m.mem
            .write_slice(
                &scattered[512 * i as usize..512 * (i as usize + 1)],
                GuestAddress(a),
            )
            .unwrap();
        d.set_desc(1 + i, a, 512, F_NEXT, 2 + i);
    }
    d.set_desc(1 + segs, STATUS, 1, F_WRITE, 0);
    assert_eq!(d.submit(0), Some((1, 0)));
    assert_eq!(
        &d.disk.contents()[20 * 512..(20 + segs as usize) * 512],
        &scattered[..]
    );
    d.header(0, 20);
    for i in 0..segs {
        let a = 0x50000 + 0x2000 * i as u64;
        d.m.mem.write_slice(&[0u8; 512], GuestAddress(a)).unwrap();
        d.set_desc(1 + i, a, 512, F_NEXT | F_WRITE, 2 + i);
    }
    assert_eq!(d.submit(0), Some((512 * segs as u32 + 1, 0)));
    for i in 0..segs {
        let mut b = [0u8; 512];
        d.m.mem
            .read_slice(&mut b, GuestAddress(0x50000 + 0x2000 * i as u64))
            .unwrap();
        assert_eq!(&b[..], &scattered[512 * i as usize..512 * (i as usize + 1)]);
    }

    // Indirect descriptors.
    let table = 0x40000;
    d.header(0, 3);
    d.set_desc_at(table, 0, HDR, 16, F_NEXT, 1);
    d.set_desc_at(table, 1, DATA, 512, F_WRITE | F_NEXT, 2);
    d.set_desc_at(table, 2, STATUS, 1, F_WRITE, 0);
    d.set_desc(5, table, 48, F_INDIRECT, 0);
    assert_eq!(d.submit(5), Some((513, 0)));
    d.m.mem
        .read_slice(&mut back[..512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(back[..512], pattern[..512]);
    assert_eq!(d.status() & 0x40, 0);
}

#[test]
fn read_only_drive() {
    if !have_kvm() {
        return;
    }
    let mut d = Driver::new(true);
    assert!(d.features() & (1 << 5) != 0, "VIRTIO_BLK_F_RO offered");
    assert_eq!(d.simple(1, 0, 512, false), Some((1, 1)));
    assert_eq!(d.simple(0, 0, 512, true), Some((513, 0)));
}

/// Writes a malformed request into the rings and returns its head index.
type Case = Box<dyn Fn(&Driver) -> u16>;

#[test]
fn malformed_chains_set_needs_reset() {
    if !have_kvm() {
        return;
    }
    let mut d = Driver::new(false);
    let cases: Vec<Case> = vec![
        // A loop.
        Box::new(|d| {
            d.set_desc(0, HDR, 16, F_NEXT, 1);
            d.set_desc(1, DATA, 512, F_NEXT | F_WRITE, 0);
            0
        }),
        // next out of range.
        Box::new(|d| {
            d.set_desc(0, HDR, 16, F_NEXT, 200);
            0
        }),
        // Head out of range.
        Box::new(|_| 77),
        // Status not writable.
        Box::new(|d| {
            d.set_desc(0, HDR, 16, F_NEXT, 1);
            d.set_desc(1, STATUS, 1, 0, 0);
            0
        }),
        // Readable after writable.
        Box::new(|d| {
            d.set_desc(0, HDR, 16, F_WRITE | F_NEXT, 1);
            d.set_desc(1, STATUS, 1, 0, 0);
            0
        }),
        // Status byte outside guest memory.
        Box::new(|d| {
            d.set_desc(0, HDR, 16, F_NEXT, 1);
            d.set_desc(1, u64::MAX, 1, F_WRITE, 0);
            0
        }),
        // A status buffer whose end wraps around the address space into RAM.
        Box::new(|d| {
            d.set_desc(0, HDR, 16, F_NEXT, 1);
            d.set_desc(1, u64::MAX - 7, 0x100, F_WRITE, 0);
            0
        }),
        // Nested indirect / indirect with a bad length / indirect table outside RAM.
        Box::new(|d| {
            d.set_desc_at(0x40000, 0, 0x40000, 16, F_INDIRECT, 0);
            d.set_desc(0, 0x40000, 16, F_INDIRECT, 0);
            0
        }),
        Box::new(|d| {
            d.set_desc(0, 0x40000, 17, F_INDIRECT, 0);
            0
        }),
        Box::new(|d| {
            d.set_desc(0, 0xffff_ffff_ffff_0000, 64, F_INDIRECT, 0);
            0
        }),
        // Indirect chain looping on itself.
        Box::new(|d| {
            d.set_desc_at(0x40000, 0, HDR, 16, F_NEXT, 1);
            d.set_desc_at(0x40000, 1, DATA, 16, F_NEXT, 0);
            d.set_desc(0, 0x40000, 32, F_INDIRECT, 0);
            0
        }),
    ];
    for (i, case) in cases.iter().enumerate() {
        d.init(1 << 28 | 1 << 29);
        d.header(0, 0);
        let head = case(&d);
        assert_eq!(d.submit(head), None, "case {i}");
        d.wait_broken();
        // The device still answers, and works again after a reset.
        d.init(1 << 28 | 1 << 29);
        assert_eq!(
            d.simple(0, 0, 512, true),
            Some((513, 0)),
            "case {i} after reset"
        );
    }
    // The driver claims more buffers than the queue has.
    d.init(0);
    d.m.mem.write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
    d.w(0x3000, &0u16.to_le_bytes());
    d.wait_broken();
    // Rings outside memory at DRIVER_OK.
    d.w(0x14, &[0]);
    d.w(0x14, &[3]);
    d.w(0x0c, &0u32.to_le_bytes());
    d.w(0x08, &1u32.to_le_bytes());
    d.w(0x0c, &1u32.to_le_bytes());
    d.w(0x14, &[0xb]);
    d.w(0x16, &0u16.to_le_bytes());
    d.w(0x20, &0xffff_f000u32.to_le_bytes());
    d.w(0x24, &0xffffu32.to_le_bytes());
    d.w(0x1c, &1u16.to_le_bytes());
    d.w(0x14, &[0xf]);
    d.wait_broken();
}

#[test]
fn feature_negotiation() {
    if !have_kvm() {
        return;
    }
    let d = Driver::new(false);
    d.w(0x14, &[0]);
    d.w(0x14, &[3]);
    // Without VERSION_1 FEATURES_OK is refused.
    d.w(0x08, &0u32.to_le_bytes());
    d.w(0x0c, &0u32.to_le_bytes());
    d.w(0x14, &[0xb]);
    assert_eq!(d.status() & 8, 0);
    // A feature that was not offered is refused too.
    d.w(0x14, &[0]);
    d.w(0x14, &[3]);
    d.w(0x08, &1u32.to_le_bytes());
    d.w(0x0c, &(1u32 | 1 << 20).to_le_bytes());
    d.w(0x14, &[0xb]);
    assert_eq!(d.status() & 8, 0);
}

#[test]
fn guest_kicks_through_ioeventfd() {
    if !have_kvm() {
        return;
    }
    let d = Driver::new(false);
    d.m.mem
        .write_slice(&[0x5au8; 512], GuestAddress(DATA))
        .unwrap();
    d.header(1, 7);
    d.set_desc(0, HDR, 16, F_NEXT, 1);
    d.set_desc(1, DATA, 512, F_NEXT, 2);
    d.set_desc(2, STATUS, 1, F_WRITE, 0);
    d.m.mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
    d.m.mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    // 32-bit guest: mov word [BAR+0x3000], 0; spin until used->idx == 1; reset.
    let mut code = vec![0x66, 0xc7, 0x05];
    code.extend_from_slice(&((BAR + 0x3000) as u32).to_le_bytes());
    code.extend_from_slice(&[0, 0]);
    let spin = code.len();
    code.extend_from_slice(&[0x66, 0x83, 0x3d]);
    code.extend_from_slice(&((USED + 2) as u32).to_le_bytes());
    code.push(1);
    let rel = spin as i32 - (code.len() as i32 + 2);
    code.extend_from_slice(&[0x75, rel as i8 as u8]);
    code.extend_from_slice(RESET);
    d.m.mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
    let r = d.m.start(BootEntry::Protected32 { entry: 0x1000 }).unwrap();
    let why = d.m.wait(Some(Duration::from_secs(60)));
    r.stop();
    assert_eq!(why, Some(VmExit::Reboot));
    assert_eq!(d.m.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    assert_eq!(&d.disk.contents()[7 * 512..8 * 512], &[0x5au8; 512][..]);
    let _ = d.disk.flush();
}

/// A driver that writes junk of every width to every register of the transport (common,
/// ISR, device and notify areas, the MSI-X table and PBA, PCI configuration space), brings
/// the device up with random queue sizes, features and rings, and kicks it with junk in the
/// rings while it keeps writing: vmm must not panic or hang, and after a reset the device
/// works as before.
#[test]
fn transport_survives_register_abuse() {
    if !have_kvm() {
        return;
    }
    let seed = integration_tests::seed(0x7a11_5eed);
    let r = integration_tests::with_deadline(Duration::from_secs(120), move || {
        abuse_transport(&mut integration_tests::Rng::new(seed));
        Ok(())
    });
    if let Err(e) = r {
        panic!("TEST_SEED={seed:#x}: {e}");
    }
}

/// The transport's registers in BAR 0 (offset, width): common configuration, ISR, the
/// first words of the device configuration, the queue notification, MSI-X table and PBA.
const REGISTERS: [(u64, usize); 27] = [
    (0x00, 4),
    (0x04, 4),
    (0x08, 4),
    (0x0c, 4),
    (0x10, 2),
    (0x12, 2),
    (0x14, 1),
    (0x15, 1),
    (0x16, 2),
    (0x18, 2),
    (0x1a, 2),
    (0x1c, 2),
    (0x1e, 2),
    (0x20, 4),
    (0x24, 4),
    (0x28, 4),
    (0x2c, 4),
    (0x30, 4),
    (0x34, 4),
    (0x1000, 1),
    (0x2000, 8),
    (0x3000, 2),
    (0x4000, 4),
    (0x4008, 4),
    (0x400c, 4),
    (0x401c, 4),
    (0x5000, 8),
];

fn abuse_transport(rng: &mut integration_tests::Rng) {
    let mut d = Driver::new(false);
    let areas: [(u64, u64); 6] = [
        (0x0000, 0x40), // common configuration
        (0x1000, 0x4),  // ISR
        (0x2000, 0x40), // device configuration
        (0x3000, 0x10), // notifications
        (0x4000, 0x30), // MSI-X table
        (0x5000, 0x8),  // MSI-X PBA
    ];
    let (mut started, mut broken) = (0, 0);
    for _ in 0..4000 {
        let width = *rng.pick(&[1usize, 2, 3, 4, 8]);
        let value = rng.next_u64().to_le_bytes();
        match rng.below(20) {
            0..=9 => {
                // Mostly a real register at its own width; else any offset and width.
                let (off, w) = if rng.chance(3, 4) {
                    *rng.pick(&REGISTERS)
                } else {
                    let &(base, len) = rng.pick(&areas);
                    (base + rng.below(len), width)
                };
                // Small numbers and status bits are the interesting values; junk too.
                let v = if rng.chance(1, 2) {
                    rng.below(16).to_le_bytes()
                } else {
                    value
                };
                d.m.mmio_bus.write(BAR + off, &v[..w]);
            }
            10..=13 => {
                let (off, w) = if rng.chance(3, 4) {
                    *rng.pick(&REGISTERS)
                } else {
                    let &(base, len) = rng.pick(&areas);
                    (base + rng.below(len), width)
                };
                let mut b = [0u8; 8];
                d.m.mmio_bus.read(BAR + off, &mut b[..w]);
            }
            14 => {
                // Bring-up with random features, queue size and rings.
                d.w(0x14, &[0]);
                d.w(0x14, &[1 | 2]);
                // A random subset of what is offered (plus VERSION_1), sometimes more.
                let offered = d.features();
                let extra = if rng.chance(1, 5) { rng.next_u64() } else { 0 };
                let want = (offered & rng.next_u64()) | 1 << 32 | extra;
                for (sel, bits) in [(0u32, want as u32), (1, (want >> 32) as u32)] {
                    d.w(0x08, &sel.to_le_bytes());
                    d.w(0x0c, &bits.to_le_bytes());
                }
                d.w(0x14, &[1 | 2 | 8]);
                d.w(0x16, &0u16.to_le_bytes());
                let size = *rng.pick(&[QSIZE, QSIZE, QSIZE, QSIZE, 1024, 0, 1, 3, 2048]);
                d.w(0x18, &size.to_le_bytes());
                for (reg, good) in [(0x20u64, DESC), (0x28, AVAIL), (0x30, USED)] {
                    let junk = rng.next_u64();
                    let bad = *rng.pick(&[good + 1, 64 << 20, u64::MAX - 0xf, junk]);
                    let addr = if rng.chance(5, 6) { good } else { bad };
                    d.w(reg, &(addr as u32).to_le_bytes());
                    d.w(reg + 4, &((addr >> 32) as u32).to_le_bytes());
                }
                d.w(0x1c, &1u16.to_le_bytes());
                d.w(0x14, &[1 | 2 | 8 | 4]);
                started += usize::from(d.status() == 0xf);
            }
            15..=17 => {
                // Junk in the rings (or a few plausible descriptors), then a kick.
                if rng.chance(1, 2) {
                    let junk = rng.bytes(0x3000);
                    d.m.mem.write_slice(&junk, GuestAddress(DESC)).unwrap();
                } else {
                    let i = rng.below(QSIZE as u64) as u16;
                    let (addr, len) = (*rng.pick(&[HDR, DATA, STATUS, 64 << 20]), rng.below(4096));
                    d.set_desc(
                        i,
                        addr,
                        len as u32,
                        rng.below(8) as u16,
                        rng.below(40) as u16,
                    );
                    let idx = d.avail_idx.wrapping_add(rng.below(3) as u16);
                    d.m.mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
                }
                d.m.mmio_bus.write(BAR + 0x3000, &0u16.to_le_bytes());
                broken += usize::from(d.status() & 0x40 != 0);
            }
            _ => {
                // PCI configuration space of the device (bus 0, device 1), except the
                // command register and the BARs, which would move the device away.
                let reg = loop {
                    let r = rng.below(0x100) & !3;
                    if r != 0x04 && !(0x10..0x28).contains(&r) {
                        break r;
                    }
                };
                let addr = 0x8000_0000u32 | 1 << 11 | reg as u32;
                d.m.io_bus.write(0xcf8, &addr.to_le_bytes());
                let at = 0xcfc + rng.below(4);
                d.m.io_bus.write(at, &value[..width.min(4)]);
            }
        }
    }
    eprintln!("register abuse: device started {started} times, seen broken {broken} times");
    assert!(
        started > 10 && broken > 10,
        "the abuse missed the running device"
    );
    d.init(1 << 28 | 1 << 29);
    let pattern = [0x3cu8; 1024];
    d.m.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    assert_eq!(d.simple(1, 9, 1024, false), Some((1, 0)));
    assert_eq!(&d.disk.contents()[9 * 512..11 * 512], &pattern[..]);
}
