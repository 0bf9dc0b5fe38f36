//! Guest RAM: anonymous host mappings placed so that each guest address and its host
//! address share their offset within a 2 MiB huge page. KVM maps guest memory with huge
//! pages only then (as QEMU arranges for its RAM); otherwise every 4 KiB guest page the
//! guest touches costs its own nested-paging fault.

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestRegionMmap};

use crate::GuestMem;

/// Huge page size the mappings are aligned to.
const HUGE: usize = 2 << 20;

/// The host mappings behind a [`GuestMem`]; unmapped on drop unless [`Ram::keep`] was
/// called (vm-memory does not own mappings it did not make).
pub struct Ram {
    /// (address, length) of each whole mapping, guards included.
    maps: Vec<(usize, usize)>,
    keep: bool,
}

impl Ram {
    /// Map `ranges` (guest address, length) of RAM.
    pub fn new(ranges: &[(GuestAddress, usize)]) -> Result<(GuestMem, Ram), String> {
        let mut ram = Ram {
            maps: Vec::new(),
            keep: false,
        };
        let mut regions = Vec::new();
        for &(gpa, len) in ranges {
            let host = ram.map_aligned(gpa.0 as usize % HUGE, len)?;
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
            // SAFETY: [host, host + len) is a fresh mapping owned by `ram`, which the caller
            // keeps for as long as the returned memory is used.
            let region = unsafe {
                MmapRegionBuilder::new(len)
                    .with_raw_mmap_pointer(host as *mut u8)
                    .with_mmap_prot(prot)
                    .with_mmap_flags(flags)
            }
            .build()
            .map_err(|e| format!("guest memory: {e}"))?;
            let region = GuestRegionMmap::new(region, gpa)
                .ok_or_else(|| format!("guest memory range at {:#x} overflows", gpa.0))?;
            regions.push(region);
        }
        let mem = GuestMem::from_regions(regions).map_err(|e| format!("guest memory: {e}"))?;
        Ok((mem, ram))
    }

    /// Map `len` bytes whose start lies `phase` bytes past a huge-page boundary: map two
    /// huge pages more than needed and turn the slack on both sides into inaccessible
    /// guards (left mapped, so no other mapping settles in a hole next to guest RAM).
    fn map_aligned(&mut self, phase: usize, len: usize) -> Result<usize, String> {
        let total = len
            .checked_add(2 * HUGE)
            .ok_or("guest memory size overflows")?;
        let p = map_anonymous(total).map_err(|e| e.to_string())?;
        let base = p as usize;
        let start = base.next_multiple_of(HUGE) + phase;
        let end = start + len;
        self.maps.push((base, total));
        // SAFETY: both pieces lie inside the mapping just made and outside [start, end).
        unsafe {
            libc::mprotect(p, start - base, libc::PROT_NONE);
            libc::mprotect(
                end as *mut libc::c_void,
                base + total - end,
                libc::PROT_NONE,
            );
            // Back guest RAM with huge pages where the host allows it (fewer faults while
            // loading the kernel, fewer TLB misses later). Advisory: failure is harmless.
            libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
        Ok(start)
    }

    /// Never unmap: something may still use the memory (a vCPU thread that did not stop).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

/// A fresh private, anonymous, read-write mapping of `len` bytes (no swap reserved), at an
/// address of the kernel's choice. The caller unmaps it.
pub(crate) fn map_anonymous(len: usize) -> std::io::Result<*mut libc::c_void> {
    // SAFETY: asks for a new mapping; touches no existing memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(p)
}

impl Drop for Ram {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for &(start, len) in &self.maps {
            // SAFETY: exactly a mapping made by `map_aligned` (guards included), no longer
            // in use.
            unsafe { libc::munmap(start as *mut libc::c_void, len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

    #[test]
    fn host_addresses_share_the_huge_page_offset() {
        let ranges = [
            (GuestAddress(0), 6 << 20),
            (GuestAddress((8 << 20) + 4096), 3 << 20),
        ];
        let (mem, ram) = Ram::new(&ranges).unwrap();
        for r in mem.iter() {
            let host = r.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
            assert_eq!(host % HUGE, r.start_addr().0 as usize % HUGE);
        }
        mem.write_obj(0xabu8, GuestAddress((6 << 20) - 1)).unwrap();
        mem.write_obj(0xcdu8, GuestAddress((11 << 20) + 4095))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress((6 << 20) - 1)).unwrap(),
            0xab
        );
        assert!(mem.read_obj::<u8>(GuestAddress(6 << 20)).is_err());
        drop(mem);
        drop(ram);
    }
}
