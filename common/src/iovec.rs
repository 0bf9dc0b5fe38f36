//! Scatter/gather lists: one request's bytes spread over several buffers, in order
//! (`IoSliceMut` to read into, `IoSlice` to write from), as a VMM gets them from a guest.

use std::io::{IoSlice, IoSliceMut};

/// Total length of a list of buffers.
pub fn total_len<B: std::ops::Deref<Target = [u8]>>(bufs: &[B]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

/// Bytes `start..start + len` of the list, as a new list borrowing the same memory.
/// The range must lie within the list.
pub fn sub_mut<'s>(
    bufs: &'s mut [IoSliceMut<'_>],
    start: usize,
    len: usize,
) -> Vec<IoSliceMut<'s>> {
    let mut out = Vec::new();
    let mut skip = start;
    let mut left = len;
    for b in bufs.iter_mut() {
        if left == 0 {
            break;
        }
        let b: &'s mut [u8] = &mut *b;
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let n = (b.len() - skip).min(left);
        out.push(IoSliceMut::new(&mut b[skip..skip + n]));
        skip = 0;
        left -= n;
    }
    assert_eq!(left, 0, "range beyond the end of the buffer list");
    out
}

/// Bytes `start..start + len` of the list, as a new list borrowing the same memory.
/// The range must lie within the list.
pub fn sub<'s>(bufs: &'s [IoSlice<'_>], start: usize, len: usize) -> Vec<IoSlice<'s>> {
    let mut out = Vec::new();
    let mut skip = start;
    let mut left = len;
    for b in bufs {
        if left == 0 {
            break;
        }
        let b: &'s [u8] = b;
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let n = (b.len() - skip).min(left);
        out.push(IoSlice::new(&b[skip..skip + n]));
        skip = 0;
        left -= n;
    }
    assert_eq!(left, 0, "range beyond the end of the buffer list");
    out
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

/// The list as one contiguous slice when it has at most one non-empty buffer, else a
/// gathered copy.
pub fn contiguous<'s>(bufs: &'s [IoSlice<'_>]) -> std::borrow::Cow<'s, [u8]> {
    let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
    match (nonempty.next(), nonempty.next()) {
        (None, _) => std::borrow::Cow::Borrowed(&[]),
        (Some(b), None) => {
            let b: &'s [u8] = b;
            std::borrow::Cow::Borrowed(b)
        }
        _ => {
            let mut v = vec![0u8; total_len(bufs)];
            gather(bufs, &mut v);
            std::borrow::Cow::Owned(v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_ranges_cross_buffer_boundaries() {
        let (mut a, mut b, mut c) = ([1u8, 2, 3], [4u8], [5u8, 6, 7, 8]);
        let mut bufs = [
            IoSliceMut::new(&mut a),
            IoSliceMut::new(&mut b),
            IoSliceMut::new(&mut []),
            IoSliceMut::new(&mut c),
        ];
        assert_eq!(total_len(&bufs), 8);
        let s = sub_mut(&mut bufs, 2, 4);
        let got: Vec<Vec<u8>> = s.iter().map(|b| b.to_vec()).collect();
        assert_eq!(got, vec![vec![3], vec![4], vec![5, 6]]);
        let mut s = sub_mut(&mut bufs, 1, 6);
        scatter(&mut s, &[20, 30, 40, 50, 60, 70]);
        drop(s);
        assert_eq!((a, b, c), ([1, 20, 30], [40], [50, 60, 70, 8]));
    }

    #[test]
    fn gather_zero_and_contiguous() {
        let (x, y) = ([1u8, 2], [3u8, 4, 5]);
        let bufs = [IoSlice::new(&x), IoSlice::new(&[]), IoSlice::new(&y)];
        let s = sub(&bufs, 1, 3);
        let mut out = [0u8; 3];
        gather(&s, &mut out);
        assert_eq!(out, [2, 3, 4]);
        assert!(matches!(
            contiguous(&sub(&bufs, 2, 2)),
            std::borrow::Cow::Borrowed(&[3, 4])
        ));
        assert_eq!(&*contiguous(&bufs), &[1, 2, 3, 4, 5]);
        assert!(contiguous(&bufs[1..2]).is_empty());
        let mut m = [9u8; 4];
        let mut mb = [IoSliceMut::new(&mut m)];
        zero(&mut sub_mut(&mut mb, 1, 2));
        assert_eq!(m, [9, 0, 0, 9]);
    }

    #[test]
    #[should_panic(expected = "beyond the end")]
    fn sub_past_the_end_panics() {
        let x = [0u8; 4];
        let bufs = [IoSlice::new(&x)];
        let _ = sub(&bufs, 2, 3);
    }
}
