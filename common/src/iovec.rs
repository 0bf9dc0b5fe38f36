//! Scatter/gather lists: one request's bytes spread over several buffers, in order
//! (`IoSliceMut` to read into, `IoSlice` to write from), as a VMM gets them from a guest.

use std::io::{IoSlice, IoSliceMut};

/// Total length of a list of buffers.
pub fn total_len<B: std::ops::Deref<Target = [u8]>>(bufs: &[B]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

/// The front of a buffer list: the buffer it is in, the offset in that buffer, and the
/// bytes left after it.
struct Pos {
    idx: usize,
    off: usize,
    left: usize,
}

impl Pos {
    fn new(left: usize) -> Pos {
        Pos {
            idx: 0,
            off: 0,
            left,
        }
    }

    /// Move past `len` bytes of buffers whose lengths `buf_len` gives; returns where they
    /// start (buffer, offset).
    fn skip(&mut self, len: usize, buf_len: impl Fn(usize) -> usize) -> (usize, usize) {
        assert!(len <= self.left, "range beyond the end of the buffer list");
        let start = (self.idx, self.off);
        self.left -= len;
        let mut want = len;
        while want > 0 {
            let n = (buf_len(self.idx) - self.off).min(want);
            want -= n;
            self.off += n;
            if self.off == buf_len(self.idx) {
                self.idx += 1;
                self.off = 0;
            }
        }
        start
    }
}

/// Takes consecutive byte ranges off the front of a list of buffers to write from; each
/// take costs time in proportion to the buffers it spans, never a rescan of the list.
pub struct Front<'a, 'b> {
    bufs: &'a [IoSlice<'b>],
    pos: Pos,
}

impl<'a, 'b> Front<'a, 'b> {
    pub fn new(bufs: &'a [IoSlice<'b>]) -> Self {
        let pos = Pos::new(total_len(bufs));
        Front { bufs, pos }
    }

    /// Bytes not taken yet.
    pub fn remaining(&self) -> usize {
        self.pos.left
    }

    /// The next `len` bytes (at most [`Front::remaining`]) as a list over the same memory.
    pub fn take(&mut self, len: usize) -> Vec<IoSlice<'a>> {
        let bufs = self.bufs;
        let (first, mut from) = self.pos.skip(len, |i| bufs[i].len());
        let mut out = Vec::new();
        let mut want = len;
        for b in &bufs[first..] {
            if want == 0 {
                break;
            }
            let b: &'a [u8] = b;
            let n = (b.len() - from).min(want);
            out.push(IoSlice::new(&b[from..from + n]));
            (want, from) = (want - n, 0);
        }
        out
    }
}

/// [`Front`] for a list of buffers to read into.
pub struct FrontMut<'a, 'b> {
    bufs: &'a mut [IoSliceMut<'b>],
    pos: Pos,
}

impl<'a, 'b> FrontMut<'a, 'b> {
    pub fn new(bufs: &'a mut [IoSliceMut<'b>]) -> Self {
        let pos = Pos::new(total_len(bufs));
        FrontMut { bufs, pos }
    }

    /// Bytes not taken yet.
    pub fn remaining(&self) -> usize {
        self.pos.left
    }

    /// The next `len` bytes (at most [`FrontMut::remaining`]) as a list over the same memory.
    pub fn take(&mut self, len: usize) -> Vec<IoSliceMut<'_>> {
        let bufs = &*self.bufs;
        let (first, mut from) = self.pos.skip(len, |i| bufs[i].len());
        let mut out = Vec::new();
        let mut want = len;
        for b in self.bufs[first..].iter_mut() {
            if want == 0 {
                break;
            }
            let b: &mut [u8] = b;
            let n = (b.len() - from).min(want);
            out.push(IoSliceMut::new(&mut b[from..from + n]));
            (want, from) = (want - n, 0);
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
