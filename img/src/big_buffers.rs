//! Where the allocator puts big buffers. glibc serves a buffer above its mmap threshold
//! with its own mapping, but raises that threshold to the largest such buffer freed, so
//! later cluster-sized buffers come from the worker threads' arenas, which keep freed
//! memory: a convert of 2 MiB compressed clusters on 8 workers grew to ~30 MiB above what
//! it held live. A fixed threshold keeps every big buffer in a mapping returned on free.

/// Buffers of at least this many bytes get their own mapping.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 256 << 10;

/// Fix the threshold; call before any thread starts.
pub fn own_mappings() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning; no allocation is in flight on
    // another thread, as none has started.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}
