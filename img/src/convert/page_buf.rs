//! A worker's chunk buffer that starts on a page boundary, as qemu-img's buffers do. The
//! kernel copies a chunk twice (from the socket or page cache into it, then from it into
//! the target's page cache); from or into an unaligned buffer both copies split cache lines.

const ALIGN: usize = 4096;

#[derive(Default)]
pub struct PageBuf {
    mem: Vec<u8>,
    len: usize,
}

impl PageBuf {
    /// Where the aligned part of `mem` starts.
    fn start(&self) -> usize {
        (self.mem.as_ptr() as usize).wrapping_neg() % ALIGN
    }

    /// The buffer as `len` bytes (what an earlier use left there, or zeroes).
    pub fn take(&mut self, len: usize) -> &mut [u8] {
        if self.mem.len() < len + ALIGN {
            self.mem = vec![0; len + ALIGN];
        }
        self.len = len;
        let s = self.start();
        &mut self.mem[s..s + len]
    }

    /// The bytes of the last `take` (none before the first).
    pub fn bytes(&self) -> &[u8] {
        if self.mem.is_empty() {
            return &[];
        }
        let s = self.start();
        &self.mem[s..s + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taken_bytes_are_page_aligned_and_kept() {
        let mut b = PageBuf::default();
        assert!(b.bytes().is_empty());
        b.take(5000).fill(7);
        assert_eq!(b.bytes().as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.bytes(), &[7u8; 5000][..]);
        // A smaller take reuses the memory: same start, the old bytes still there.
        let first = b.bytes().as_ptr();
        assert_eq!(b.take(100), &[7u8; 100][..]);
        assert_eq!(b.bytes().as_ptr(), first);
        // A larger one is zeroes, aligned again.
        assert!(b.take(3 << 20).iter().all(|&x| x == 0));
        assert_eq!(b.bytes().as_ptr() as usize % ALIGN, 0);
    }
}
