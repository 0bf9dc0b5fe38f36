//! Sequential access to the bytes of a chain's guest buffers, each access checked against
//! guest memory.

use common::IoBufMut;
use vm_memory::{Bytes, GuestAddress};

use super::queue::Desc;
use crate::GuestMem;

/// The buffers end before the bytes asked for, or one lies outside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShortBuffers;

/// Sequential access to the bytes of a list of guest buffers.
pub struct Cursor<'a> {
    mem: &'a GuestMem,
    descs: Vec<Desc>,
    idx: usize,
    off: u32,
}

impl<'a> Cursor<'a> {
    pub fn new(mem: &'a GuestMem, descs: Vec<Desc>) -> Self {
        Cursor {
            mem,
            descs,
            idx: 0,
            off: 0,
        }
    }

    pub fn remaining(&self) -> u64 {
        let total: u64 = self.descs[self.idx.min(self.descs.len())..]
            .iter()
            .map(|d| d.len as u64)
            .sum();
        total - self.off as u64
    }

    /// The remaining buffers as host-contiguous runs of guest memory, if every buffer lies
    /// within one guest memory region. No reference to the memory is formed: the guest may
    /// change it while the engine reads or writes it.
    pub fn host_runs(&self) -> Option<Vec<IoBufMut<'a>>> {
        use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
        let mut runs: Vec<IoBufMut<'a>> = Vec::new();
        for (i, d) in self.descs.iter().enumerate().skip(self.idx) {
            let skip = if i == self.idx { self.off } else { 0 };
            let len = (d.len - skip) as usize;
            if len == 0 {
                continue;
            }
            let addr = d.addr.checked_add(skip as u64)?;
            let r = self.mem.find_region(GuestAddress(addr))?;
            let off = addr - r.start_addr().raw_value();
            if off.checked_add(len as u64)? > r.len() {
                return None;
            }
            let ptr = r.get_host_address(MemoryRegionAddress(off)).ok()?;
            let (start, len) = match runs.last().copied() {
                Some(l) if l.as_mut_ptr().wrapping_add(l.len()) == ptr => {
                    runs.pop();
                    (l.as_mut_ptr(), l.len() + len)
                }
                _ => (ptr, len),
            };
            // SAFETY: [ptr, ptr + len) was just checked to lie inside a mapped region of
            // guest memory (a run it extends lies right before it, inside mapped memory
            // too), and `self.mem` keeps every region mapped for 'a. The guest may access
            // the bytes concurrently, which IoBufMut's contract allows.
            runs.push(unsafe { IoBufMut::new(start, len) });
        }
        Some(runs)
    }

    /// Visit the next `len` bytes as (guest address, length) pieces.
    fn advance(
        &mut self,
        mut len: usize,
        mut f: impl FnMut(u64, usize, usize) -> Result<(), ShortBuffers>,
    ) -> Result<(), ShortBuffers> {
        let mut done = 0usize;
        while len > 0 {
            let d = *self.descs.get(self.idx).ok_or(ShortBuffers)?;
            let avail = (d.len - self.off) as usize;
            if avail == 0 {
                self.idx += 1;
                self.off = 0;
                continue;
            }
            let n = avail.min(len);
            let addr = d.addr.checked_add(self.off as u64).ok_or(ShortBuffers)?;
            f(addr, done, n)?;
            self.off += n as u32;
            done += n;
            len -= n;
        }
        Ok(())
    }

    pub fn read(&mut self, buf: &mut [u8]) -> Result<(), ShortBuffers> {
        let mem = self.mem;
        self.advance(buf.len(), |a, at, n| {
            mem.read_slice(&mut buf[at..at + n], GuestAddress(a))
                .map_err(|_| ShortBuffers)
        })
    }

    pub fn write(&mut self, buf: &[u8]) -> Result<(), ShortBuffers> {
        let mem = self.mem;
        self.advance(buf.len(), |a, at, n| {
            mem.write_slice(&buf[at..at + n], GuestAddress(a))
                .map_err(|_| ShortBuffers)
        })
    }
}
