//! Scatter/gather lists: one request's bytes spread over several buffers, in order, as a
//! VMM gets them from a guest.
//!
//! The buffers are raw ([`IoBufMut`] to read into, [`IoBuf`] to write from), so memory a
//! guest may change at any moment can be passed without ever forming a Rust reference to
//! it: the engine only copies into and out of them with `ptr::copy_nonoverlapping` and
//! `ptr::write_bytes`, or hands them to `preadv`/`pwritev` (they have `iovec`'s layout).

use std::marker::PhantomData;
use std::ptr;

/// Bytes to write from: a raw (pointer, length) pair with the layout of `libc::iovec`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IoBuf<'a> {
    ptr: *const u8,
    len: usize,
    _mem: PhantomData<&'a [u8]>,
}

/// Bytes to read into: a raw (pointer, length) pair with the layout of `libc::iovec`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IoBufMut<'a> {
    ptr: *mut u8,
    len: usize,
    _mem: PhantomData<&'a mut [u8]>,
}

const _: () = {
    use std::mem::{align_of, size_of};
    assert!(size_of::<IoBuf<'_>>() == size_of::<libc::iovec>());
    assert!(align_of::<IoBuf<'_>>() == align_of::<libc::iovec>());
    assert!(size_of::<IoBufMut<'_>>() == size_of::<libc::iovec>());
    assert!(align_of::<IoBufMut<'_>>() == align_of::<libc::iovec>());
};

// SAFETY: the buffers are plain memory that the engine only copies to and from; their
// contract (see `new`) already allows the bytes to change concurrently.
unsafe impl Send for IoBuf<'_> {}
// SAFETY: as for Send.
unsafe impl Sync for IoBuf<'_> {}
// SAFETY: as for IoBuf.
unsafe impl Send for IoBufMut<'_> {}
// SAFETY: as for IoBuf.
unsafe impl Sync for IoBufMut<'_> {}

impl<'a> IoBuf<'a> {
    /// A buffer over `len` bytes at `ptr`.
    ///
    /// # Safety
    /// The bytes must stay mapped and readable for `'a` (for as long as any I/O call that
    /// gets the buffer runs). They may change concurrently (guest memory): no reference to
    /// them is ever formed, they are only copied.
    pub unsafe fn new(ptr: *const u8, len: usize) -> Self {
        IoBuf {
            ptr,
            len,
            _mem: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// Copy the buffer into `dst`, which must be as long.
    pub fn copy_to(&self, dst: &mut [u8]) {
        assert_eq!(
            dst.len(),
            self.len,
            "copy between buffers of different lengths"
        );
        // SAFETY: `new`'s contract makes `len` bytes at `ptr` readable; `dst` is a distinct
        // Rust slice of the same length, so the ranges cannot overlap.
        unsafe { ptr::copy_nonoverlapping(self.ptr, dst.as_mut_ptr(), self.len) }
    }
}

impl<'a> IoBufMut<'a> {
    /// A buffer over `len` bytes at `ptr`.
    ///
    /// # Safety
    /// The bytes must stay mapped and writable for `'a` (for as long as any I/O call that
    /// gets the buffer runs). They may be read or written concurrently (guest memory): no
    /// reference to them is ever formed, they are only copied into and zeroed.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        IoBufMut {
            ptr,
            len,
            _mem: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Copy `src`, which must be as long, into the buffer.
    pub fn copy_from(&self, src: &[u8]) {
        assert_eq!(
            src.len(),
            self.len,
            "copy between buffers of different lengths"
        );
        // SAFETY: `new`'s contract makes `len` bytes at `ptr` writable; `src` is a Rust
        // slice, which cannot overlap memory only reachable through raw pointers.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), self.ptr, self.len) }
    }

    /// Set every byte to zero.
    pub fn zero(&self) {
        // SAFETY: `new`'s contract makes `len` bytes at `ptr` writable.
        unsafe { ptr::write_bytes(self.ptr, 0, self.len) }
    }
}

impl<'a> From<&'a [u8]> for IoBuf<'a> {
    fn from(b: &'a [u8]) -> Self {
        // SAFETY: the slice is readable for 'a and, being shared, does not change.
        unsafe { IoBuf::new(b.as_ptr(), b.len()) }
    }
}

impl<'a> From<&'a mut [u8]> for IoBufMut<'a> {
    fn from(b: &'a mut [u8]) -> Self {
        // SAFETY: the slice is writable for 'a and borrowed exclusively for it.
        unsafe { IoBufMut::new(b.as_mut_ptr(), b.len()) }
    }
}

impl<'a> From<IoBufMut<'a>> for IoBuf<'a> {
    /// Memory one may write into may be written from.
    fn from(b: IoBufMut<'a>) -> Self {
        // SAFETY: IoBufMut's contract (writable for 'a) includes IoBuf's (readable for 'a).
        unsafe { IoBuf::new(b.ptr, b.len) }
    }
}

/// A buffer of a list: [`IoBuf`] or [`IoBufMut`].
pub trait Segment: Copy {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The `len` bytes at `off` of this buffer (which must hold them).
    fn sub(&self, off: usize, len: usize) -> Self;
}

impl Segment for IoBuf<'_> {
    fn len(&self) -> usize {
        self.len
    }
    fn sub(&self, off: usize, len: usize) -> Self {
        assert!(off.checked_add(len).is_some_and(|e| e <= self.len));
        // SAFETY: a part of this buffer, under the same contract.
        unsafe { IoBuf::new(self.ptr.add(off), len) }
    }
}

impl Segment for IoBufMut<'_> {
    fn len(&self) -> usize {
        self.len
    }
    fn sub(&self, off: usize, len: usize) -> Self {
        assert!(off.checked_add(len).is_some_and(|e| e <= self.len));
        // SAFETY: a part of this buffer, under the same contract.
        unsafe { IoBufMut::new(self.ptr.add(off), len) }
    }
}

/// Total length of a list of buffers.
pub fn total_len<B: Segment>(bufs: &[B]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

/// Takes consecutive byte ranges off the front of a list of buffers; each take costs time
/// in proportion to the buffers it spans, never a rescan of the list.
pub struct Front<'a, B> {
    bufs: &'a [B],
    /// The buffer the front is in, and the offset in it.
    idx: usize,
    off: usize,
    /// Bytes not taken yet.
    left: usize,
}

impl<'a, B: Segment> Front<'a, B> {
    pub fn new(bufs: &'a [B]) -> Self {
        Front {
            bufs,
            idx: 0,
            off: 0,
            left: total_len(bufs),
        }
    }

    /// Bytes not taken yet.
    pub fn remaining(&self) -> usize {
        self.left
    }

    /// The next `len` bytes (at most [`Front::remaining`]) as a list over the same memory.
    pub fn take(&mut self, len: usize) -> Vec<B> {
        assert!(len <= self.left, "range beyond the end of the buffer list");
        self.left -= len;
        let mut out = Vec::new();
        let mut want = len;
        while want > 0 {
            let b = self.bufs[self.idx];
            let n = (b.len() - self.off).min(want);
            if n > 0 {
                out.push(b.sub(self.off, n));
            }
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

/// Set every byte of the list to zero.
pub fn zero(bufs: &[IoBufMut<'_>]) {
    for b in bufs {
        b.zero();
    }
}

/// Copy `src` into the list, in order; `src` must be as long as the list.
pub fn scatter(bufs: &[IoBufMut<'_>], src: &[u8]) {
    let mut at = 0;
    for b in bufs {
        b.copy_from(&src[at..at + b.len()]);
        at += b.len();
    }
    assert_eq!(at, src.len(), "scatter of a source longer than the list");
}

/// Copy the list, in order, into `dst`; `dst` must be as long as the list.
pub fn gather(bufs: &[IoBuf<'_>], dst: &mut [u8]) {
    let mut at = 0;
    for b in bufs {
        b.copy_to(&mut dst[at..at + b.len()]);
        at += b.len();
    }
    assert_eq!(
        at,
        dst.len(),
        "gather into a destination longer than the list"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(bufs: &[IoBufMut<'_>]) -> Vec<u8> {
        let mut out = vec![0u8; total_len(bufs)];
        let ro: Vec<IoBuf<'_>> = bufs.iter().map(|&b| b.into()).collect();
        gather(&ro, &mut out);
        out
    }

    #[test]
    fn front_takes_ranges_across_buffer_boundaries() {
        let (mut a, mut b, mut c) = ([1u8, 2, 3], [4u8], [5u8, 6, 7, 8]);
        let bufs = [
            IoBufMut::from(&mut a[..]),
            IoBufMut::from(&mut b[..]),
            IoBufMut::from(&mut [][..]),
            IoBufMut::from(&mut c[..]),
        ];
        assert_eq!(total_len(&bufs), 8);
        let mut f = Front::new(&bufs);
        let first = f.take(2);
        assert_eq!((first.len(), bytes(&first)), (1, vec![1, 2]));
        let mid = f.take(4);
        assert_eq!((mid.len(), bytes(&mid)), (3, vec![3, 4, 5, 6]));
        scatter(&f.take(2), &[70, 80]);
        assert!(f.take(0).is_empty());
        assert_eq!(c, [5, 6, 70, 80]);

        let (x, y) = ([1u8, 2], [3u8, 4, 5]);
        let bufs = [
            IoBuf::from(&x[..]),
            IoBuf::from(&[][..]),
            IoBuf::from(&y[..]),
        ];
        let mut f = Front::new(&bufs);
        assert_eq!(f.remaining(), 5);
        let mut out = [0u8; 3];
        gather(&f.take(3), &mut out);
        assert_eq!((out, f.remaining()), ([1, 2, 3], 2));
        let mut out = [0u8; 2];
        gather(&f.take(2), &mut out);
        assert_eq!(out, [4, 5]);
        let mut m = [9u8; 4];
        let mb = [IoBufMut::from(&mut m[..])];
        let mut f = Front::new(&mb);
        f.take(1);
        zero(&f.take(2));
        assert_eq!(m, [9, 0, 0, 9]);
    }

    #[test]
    #[should_panic(expected = "beyond the end")]
    fn taking_past_the_end_panics() {
        let x = [0u8; 4];
        let bufs = [IoBuf::from(&x[..])];
        let mut f = Front::new(&bufs);
        f.take(3);
        f.take(2);
    }
}
