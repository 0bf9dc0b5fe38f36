//! Any bytes as guest memory under a virtio-blk queue: the virtqueue walker (rings, direct
//! and indirect chains) and the request parser and executor over an in-memory disk.
//!
//! Input: byte 0 picks the queue size (2^(b % 11)), byte 1 the features (bit 0 EVENT_IDX,
//! bit 1 INDIRECT_DESC, bit 2 a read-only disk, bit 3 writethrough); the rest is the first
//! guest RAM region (descriptor table at 0, available ring at 0x4000, used ring at 0x5000).
//! A second region, after a hole, is zeroed.

// Links the fuzz crate, whose allocator bounds the heap (`fuzz::heap_limit`).
use fuzz as _;
use std::sync::Arc;

use common::BlockDriver;
use integration_tests::mem_disk::MemDisk;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::block::Worker;
use vmm::devices::virtio::{ActiveQueue, Queue, QueueConfig, VirtioInterrupt};
use vmm::GuestMem;
use vmm_sys_util::eventfd::EventFd;

const RAM: [(u64, usize); 2] = [(0, 0x10000), (0x20000, 0x10000)];
const DISK_SIZE: usize = 1 << 20;

/// Interrupts go nowhere.
struct NoIrq;

impl VirtioInterrupt for NoIrq {
    fn notify_queue(&self, _queue: usize) {}
    fn notify_config(&self) {}
    fn set_needs_reset(&self, _why: &str) {}
}

fn main() {
    let mem = GuestMem::from_ranges(&RAM.map(|(a, l)| (GuestAddress(a), l))).unwrap();
    afl::fuzz!(|data: &[u8]| {
        let [size_sel, features, ram @ ..] = data else {
            return;
        };
        for (a, l) in RAM {
            mem.write_slice(&vec![0; l], GuestAddress(a)).unwrap();
        }
        let ram = &ram[..ram.len().min(RAM[0].1)];
        mem.write_slice(ram, GuestAddress(0)).unwrap();
        let cfg = QueueConfig {
            size: 1 << (size_sel % 11),
            ready: true,
            desc: 0,
            avail: 0x4000,
            used: 0x5000,
        };
        let disk: Arc<dyn BlockDriver> = Arc::new(MemDisk::new(DISK_SIZE, false));
        let queue = Queue::new(cfg, features & 1 != 0, features & 2 != 0);
        if queue.validate(&mem).is_err() {
            return;
        }
        let mut worker = Worker {
            mem: mem.clone(),
            disk,
            read_only: features & 4 != 0,
            writethrough: features & 8 != 0,
            serial: b"fuzz-serial".to_vec(),
            queues: vec![ActiveQueue {
                queue,
                kick: EventFd::new(0).unwrap(),
            }],
            irq: Arc::new(NoIrq),
        };
        let mut dead = [false];
        worker.serve(0, &mut dead);
        // A second kick: the walker continues from where the first stopped.
        worker.serve(0, &mut dead);
    });
}
