//! Scatter/gather lists: one request's bytes spread over several buffers, in order
//! (`IoSliceMut` to read into, `IoSlice` to write from), as a VMM gets them from a guest.

use std::io::{IoSlice, IoSliceMut};

/// Total length of a list of buffers.
pub fn total_len<B: std::ops::Deref<Target = [u8]>>(bufs: &[B]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

/// Takes consecutive byte ranges off the front of a list of buffers to write from; each
/// take costs time in proportion to the buffers it spans, never a rescan of the list.
pub struct Front<'a, 'b> {
    bufs: &'a [IoSlice<'b>],
    idx: usize,
    off: usize,
    left: usize,
}

impl<'a, 'b> Front<'a, 'b> {
    pub fn new(bufs: &'a [IoSlice<'b>]) -> Self {
        let left = total_len(bufs);
        Front {
            bufs,
            idx: 0,
            off: 0,
            left,
        }
    }

    /// Bytes not taken yet.
    pub fn remaining(&self) -> usize {
        self.left
    }

    /// The next `len` bytes (at most [`Front::remaining`]) as a list over the same memory.
    pub fn take(&mut self, len: usize) -> Vec<IoSlice<'a>> {
        assert!(len <= self.left, "range beyond the end of the buffer list");
        self.left -= len;
        let mut out = Vec::new();
        let mut want = len;
        while want > 0 {
            let b: &'a [u8] = &self.bufs[self.idx];
            let n = (b.len() - self.off).min(want);
            out.push(IoSlice::new(&b[self.off..self.off + n]));
            want -= n;
            self.off += n;
            if self.off == b.len() {
                self.idx += 1;
                self.off = 0;
            }
        }
        out
    }
}

/// [`Front`] for a list of buffers to read into.
pub struct FrontMut<'a, 'b> {
    bufs: &'a mut [IoSliceMut<'b>],
    idx: usize,
    off: usize,
    left: usize,
}

impl<'a, 'b> FrontMut<'a, 'b> {
    pub fn new(bufs: &'a mut [IoSliceMut<'b>]) -> Self {
        let left = total_len(bufs);
        FrontMut {
            bufs,
            idx: 0,
            off: 0,
            left,
        }
    }

    /// Bytes not taken yet.
    pub fn remaining(&self) -> usize {
        self.left
    }

    /// The next `len` bytes (at most [`FrontMut::remaining`]) as a list over the same memory.
    pub fn take(&mut self, len: usize) -> Vec<IoSliceMut<'_>> {
        assert!(len <= self.left, "range beyond the end of the buffer list");
        self.left -= len;
        let (first, first_off) = (self.idx, self.off);
        // Move the front past the range first, then lend the range out.
        let mut want = len;
        while want > 0 {
            let n = (self.bufs[self.idx].len() - self.off).min(want);
            want -= n;
            self.off += n;
            if self.off == self.bufs[self.idx].len() {
                self.idx += 1;
                self.off = 0;
            }
        }
        let mut out = Vec::new();
        let mut want = len;
        for (i, b) in self.bufs[first..].iter_mut().enumerate() {
            if want == 0 {
                break;
            }
            let from = if i == 0 { first_off } else { 0 };
            let b: &mut [u8] = b;
            let n = (b.len() - from).min(want);
            out.push(IoSliceMut::new(&mut b[from..from + n]));
            want -= n;
        }
        out
    }
}

/// Set every byte of the list to zero.
pub fn zero(bufs: &mut [IoSliceMut<'_>]) {
    for b in bufs {
        b.fill(0);
    }
}

/// Copy `src` into the list, in order; `src` must be as long as the list.
pub fn scatter(bufs: &mut [IoSliceMut<'_>], src: &[u8]) {
    let mut at = 0;
    for b in bufs {
        let n = b.len();
        b.copy_from_slice(&src[at..at + n]);
        at += n;
    }
    debug_assert_eq!(at, src.len());
}

/// Copy the list, in order, into `dst`; `dst` must be as long as the list.
pub fn gather(bufs: &[IoSlice<'_>], dst: &mut [u8]) {
    let mut at = 0;
    for b in bufs {
        dst[at..at + b.len()].copy_from_slice(b);
        at += b.len();
    }
    debug_assert_eq!(at, dst.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_takes_ranges_across_buffer_boundaries() {
        let (mut a, mut b, mut c) = ([1u8, 2, 3], [4u8], [5u8, 6, 7, 8]);
        let mut bufs = [
            IoSliceMut::new(&mut a),
            IoSliceMut::new(&mut b),
            IoSliceMut::new(&mut []),
            IoSliceMut::new(&mut c),
        ];
        assert_eq!(total_len(&bufs), 8);
        let mut f = FrontMut::new(&mut bufs);
        let got: Vec<Vec<u8>> = f.take(2).iter().map(|b| b.to_vec()).collect();
        assert_eq!(got, vec![vec![1, 2]]);
        let got: Vec<u8> = f.take(4).iter().flat_map(|b| b.to_vec()).collect();
        assert_eq!(got, vec![3, 4, 5, 6]);
        scatter(&mut f.take(2), &[70, 80]);
        assert!(f.take(0).is_empty());
        assert_eq!(c, [5, 6, 70, 80]);

        let (x, y) = ([1u8, 2], [3u8, 4, 5]);
        let bufs = [IoSlice::new(&x), IoSlice::new(&[]), IoSlice::new(&y)];
        let mut f = Front::new(&bufs);
        assert_eq!(f.remaining(), 5);
        let mut out = [0u8; 3];
        gather(&f.take(3), &mut out);
        assert_eq!((out, f.remaining()), ([1, 2, 3], 2));
        let mut out = [0u8; 2];
        gather(&f.take(2), &mut out);
        assert_eq!(out, [4, 5]);
        let mut m = [9u8; 4];
        let mut mb = [IoSliceMut::new(&mut m)];
        let mut f = FrontMut::new(&mut mb);
        f.take(1);
        zero(&mut f.take(2));
        assert_eq!(m, [9, 0, 0, 9]);
    }

    #[test]
    #[should_panic(expected = "beyond the end")]
    fn taking_past_the_end_panics() {
        let x = [0u8; 4];
        let bufs = [IoSlice::new(&x)];
        let mut f = Front::new(&bufs);
        f.take(3);
        f.take(2);
    }
}
