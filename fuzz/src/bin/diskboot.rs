//! Any bytes as a raw disk for `vmm`'s disk boot: partition tables, ext2/3/4 and FAT
//! filesystems, BLS/grub.cfg/extlinux/menu.lst entries, then the default entry loaded.

// Links the fuzz crate, whose allocator bounds the heap (`fuzz::heap_limit`).
use fuzz as _;
use std::sync::Arc;

use common::BlockDriver;
use integration_tests::mem_disk::MemDisk;
use vmm::diskboot::DiskBoot;

/// Most initrd bytes one load reads.
const MAX_INITRD: u64 = 16 << 20;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let disk = MemDisk::new(data.len(), false);
        let Ok(()) = disk.write_at(data, 0) else {
            return;
        };
        let Ok(boot) = DiskBoot::find(Arc::new(disk)) else {
            return;
        };
        let _ = boot.describe();
        if let Ok(i) = boot.select(None) {
            let _ = boot.load(i, MAX_INITRD);
        }
    });
}
