//! The fuzz targets' allocator: the system allocator, but a process whose live heap would
//! pass [`HEAP_LIMIT`] aborts, so that AFL records the input as a crash (its `-m` limit
//! counts address space, which the guest-memory mappings of some targets already use).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The most heap one input may hold at once.
pub const HEAP_LIMIT: usize = 1 << 30;

/// Counts live heap bytes, aborting past [`HEAP_LIMIT`].
pub struct HeapLimit {
    live: AtomicUsize,
}

#[global_allocator]
static ALLOC: HeapLimit = HeapLimit {
    live: AtomicUsize::new(0),
};

impl HeapLimit {
    fn take(&self, n: usize) {
        if self.live.fetch_add(n, Ordering::Relaxed) + n > HEAP_LIMIT {
            eprintln!("fuzz: the heap passed 1 GiB");
            std::process::abort();
        }
    }

    fn give(&self, n: usize) {
        self.live.fetch_sub(n, Ordering::Relaxed);
    }
}

// SAFETY: every call goes to the system allocator unchanged; only a counter is kept.
unsafe impl GlobalAlloc for HeapLimit {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.take(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.take(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.give(layout.size());
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            self.take(new_size - layout.size());
        } else {
            self.give(layout.size() - new_size);
        }
        System.realloc(ptr, layout, new_size)
    }
}
