//! Guest data paths of a qcow2 image: read, write (with copy-on-write), write-zeroes,
//! discard and block status.
//!
//! Reads and writes to clusters that are already allocated and unshared hold the metadata
//! lock only for the lookup; writes that allocate or change the mapping hold it throughout.

use std::io::IoSliceMut;
use std::sync::Arc;

use super::entry::{CompressedRun, HostOffset, Kind, L2Entry, ALL_ZEROES, ZERO};
use super::meta::Meta;
use super::Qcow2Image;
use crate::driver::{Allocation, BlockStatus};
use crate::error::{io, Result};
use crate::iovec;

/// A run of guest bytes that map alike.
struct Run {
    kind: Kind,
    len: u64,
}

impl Qcow2Image {
    /// Bits of the allocation unit: the subcluster with extended L2, else the cluster.
    pub(super) fn unit_bits(m: &Meta) -> u32 {
        if m.h.extended_l2() {
            m.h.cluster_bits - 5
        } else {
            m.h.cluster_bits
        }
    }

    /// Kind of the unit holding guest offset `pos`, with `host` moved to `pos` itself.
    fn kind_at(m: &mut Meta, pos: u64) -> Result<(Kind, u64)> {
        let cb = m.h.cluster_bits;
        if m.l2_offset(pos >> cb)?.is_none() {
            // No L2 table: the whole range its L1 entry covers is unallocated.
            let cover = m.h.l1_coverage();
            return Ok((Kind::Unallocated, cover - pos % cover));
        }
        let ub = Self::unit_bits(m);
        let e = m.l2_entry(pos >> cb)?;
        let in_cluster = pos & ((1 << cb) - 1);
        let sc = (in_cluster >> ub) as u32;
        let kind = match e.kind(cb, m.h.extended_l2(), sc) {
            Kind::Data { host } => Kind::Data {
                host: HostOffset(host.0 + (in_cluster & ((1 << ub) - 1))),
            },
            k => k,
        };
        let unit_left = (1 << ub) - (pos & ((1 << ub) - 1));
        Ok((kind, unit_left))
    }

    /// The longest run starting at `pos` (at most `max` bytes) that maps alike.
    fn map_run(m: &mut Meta, pos: u64, max: u64) -> Result<Run> {
        let (kind, mut len) = Self::kind_at(m, pos)?;
        if matches!(kind, Kind::Compressed(_)) {
            return Ok(Run {
                kind,
                len: len
                    .min(max)
                    .min(m.cluster_size() - (pos & (m.cluster_size() - 1))),
            });
        }
        while len < max {
            let (next, unit) = Self::kind_at(m, pos + len)?;
            let same = match (kind, next) {
                (Kind::Unallocated, Kind::Unallocated) => true,
                (Kind::Zero { .. }, Kind::Zero { .. }) => true,
                (Kind::Data { host: a }, Kind::Data { host: b }) => b.0 == a.0 + len,
                _ => false,
            };
            if !same {
                break;
            }
            len += unit;
        }
        Ok(Run {
            kind,
            len: len.min(max),
        })
    }

    /// Read guest bytes at `pos` that this layer does not have: from the backing file
    /// (zeroes past its end), or zeroes without one.
    pub(super) fn read_backing(&self, bufs: &mut [IoSliceMut<'_>], pos: u64) -> Result<()> {
        let len = iovec::total_len(bufs);
        let avail = match &self.backing {
            Some(b) => b.size().saturating_sub(pos).min(len as u64) as usize,
            None => 0,
        };
        let mut front = iovec::FrontMut::new(bufs);
        if let (Some(b), true) = (&self.backing, avail > 0) {
            b.read_vectored_at(&mut front.take(avail), pos)?;
        }
        iovec::zero(&mut front.take(len - avail));
        Ok(())
    }

    /// The decompressed cluster stored at `run`, from a one-entry cache: small sequential
    /// reads of a compressed cluster decompress it once. The cache is dropped whenever
    /// freed clusters may become reusable (at flush), so it never outlives the data.
    fn decompressed(&self, run: CompressedRun) -> Result<Arc<[u8]>> {
        let mut last = self
            .last_compressed
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((off, data)) = &*last {
            if *off == run.offset {
                return Ok(data.clone());
            }
        }
        let mut out = vec![0u8; 1 << self.cluster_bits];
        self.read_compressed(run, &mut out)?;
        let data: Arc<[u8]> = out.into();
        *last = Some((run.offset, data.clone()));
        Ok(data)
    }

    pub(super) fn read_impl(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let total = iovec::total_len(bufs);
        let mut front = iovec::FrontMut::new(bufs);
        while front.remaining() > 0 {
            let want = front.remaining() as u64;
            let pos = offset + (total as u64 - want);
            let (run, cs) = {
                let mut m = self.meta();
                (Self::map_run(&mut m, pos, want)?, m.cluster_size())
            };
            let mut part = front.take(run.len as usize);
            match run.kind {
                Kind::Unallocated => self.read_backing(&mut part, pos)?,
                Kind::Zero { .. } => iovec::zero(&mut part),
                Kind::Data { host } => io(
                    "Could not read image data",
                    self.storage.read_vectored_at(&mut part, host.0),
                )?,
                Kind::Compressed(c) => {
                    let cluster = self.decompressed(c)?;
                    let at = (pos % cs) as usize;
                    iovec::scatter(&mut part, &cluster[at..at + run.len as usize]);
                }
            }
        }
        Ok(())
    }

    pub(super) fn zeroes_impl(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let (version, ub) = {
            let m = self.meta();
            (m.h.version, Self::unit_bits(&m))
        };
        let us = 1u64 << ub;
        let end = offset + len;
        // Whole units get a zero flag (version 3); partial ones are written as zeroes.
        let a_start = offset.next_multiple_of(us).min(end);
        let a_end = if end == self.size {
            end
        } else {
            end - end % us
        }
        .max(a_start);
        self.write_zero_bytes(offset, a_start - offset)?;
        if version >= 3 {
            self.zero_units(a_start, a_end - a_start, may_unmap)?;
        } else {
            self.zero_units_v2(a_start, a_end - a_start)?;
        }
        self.write_zero_bytes(a_end, end - a_end)
    }

    fn write_zero_bytes(&self, mut pos: u64, len: u64) -> Result<()> {
        let end = pos + len;
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64);
            self.write_impl(&[std::io::IoSlice::new(&zeros[..n as usize])], pos)?;
            pos += n;
        }
        Ok(())
    }

    /// Mark whole units as zero, cluster by cluster.
    fn zero_units(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let cb = self.cluster_bits;
        let cs = 1u64 << cb;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gc = pos >> cb;
            let in_cluster = pos - (gc << cb);
            let n = (cs - in_cluster).min(end - pos);
            let whole = n == cs || pos + n == self.size && in_cluster == 0;
            if !self.zero_in_cluster(gc, in_cluster, n, whole, may_unmap)? {
                // Only part of a compressed cluster: write real zeroes (decompresses it).
                self.write_zero_bytes(pos, n)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Set the zero flag (or subcluster zero bits) for `n` bytes at `in_cluster` of guest
    /// cluster `gc`. Returns false when that needs real zeroes written instead.
    fn zero_in_cluster(
        &self,
        gc: u64,
        in_cluster: u64,
        n: u64,
        whole: bool,
        may_unmap: bool,
    ) -> Result<bool> {
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let mut m = self.meta_settled(gc, 1);
        let old = m.l2_entry(gc)?;
        if !whole && old.is_compressed() {
            return Ok(false);
        }
        let allocated = old.is_compressed() || old.host_cluster().is_some();
        let unmap = old.is_compressed() || (may_unmap && allocated && whole);
        let mut new = old;
        if unmap {
            new.word = 0;
        }
        if m.h.extended_l2() {
            let ub = self.cluster_bits - 5;
            let first = in_cluster >> ub;
            let last = (in_cluster + n).div_ceil(1 << ub) - 1;
            let mask = ((1u64 << (last + 1)) - 1) & !((1u64 << first) - 1);
            new.bitmap = if whole {
                ALL_ZEROES
            } else {
                (old.bitmap & !mask) | (mask << 32)
            };
        } else {
            new.word |= ZERO;
        }
        if new != old {
            m.set_l2_entry(gc, new)?;
            if unmap {
                m.free_entry(old);
            }
        }
        Ok(true)
    }

    /// Version 2 has no zero flag: drop clusters when nothing shows through, else write.
    fn zero_units_v2(&self, offset: u64, len: u64) -> Result<()> {
        if self.backing.is_some() {
            return self.write_zero_bytes(offset, len);
        }
        let cs = 1u64 << self.cluster_bits;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let n = (cs - pos % cs).min(end - pos);
            if n == cs || (pos.is_multiple_of(cs) && pos + n == self.size) {
                self.drop_cluster(pos >> self.cluster_bits, false)?;
            } else {
                self.write_zero_bytes(pos, n)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Discard whole clusters like QEMU: v3 images read zeroes afterwards; v2 images drop
    /// the clusters only without a backing file (it would show through), else keep them.
    /// Partial clusters at either end are left alone.
    pub(super) fn discard_impl(&self, offset: u64, len: u64) -> Result<()> {
        let (cb, version) = {
            let m = self.meta();
            (m.h.cluster_bits, m.h.version)
        };
        if version < 3 && self.backing.is_some() {
            return Ok(());
        }
        let cs = 1u64 << cb;
        let end = offset + len;
        let start = offset.next_multiple_of(cs);
        let stop = if end == self.size {
            end
        } else {
            end - end % cs
        };
        let mut pos = start;
        while pos < stop {
            self.drop_cluster(pos >> cb, version >= 3)?;
            pos += cs;
        }
        Ok(())
    }

    /// Release guest cluster `gc`; with `zero` it reads as zeroes afterwards.
    fn drop_cluster(&self, gc: u64, zero: bool) -> Result<()> {
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let mut m = self.meta_settled(gc, 1);
        let old = m.l2_entry(gc)?;
        let allocated = old.is_compressed() || old.host_cluster().is_some();
        if !(self.backing.is_some() || allocated) {
            return Ok(());
        }
        let new = if !zero {
            L2Entry::default()
        } else if m.h.extended_l2() {
            L2Entry {
                word: 0,
                bitmap: ALL_ZEROES,
            }
        } else {
            L2Entry {
                word: ZERO,
                bitmap: 0,
            }
        };
        if new != old {
            m.set_l2_entry(gc, new)?;
            m.free_entry(old);
        }
        Ok(())
    }

    pub(super) fn status_impl(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let run = {
            let mut m = self.meta();
            Self::map_run(&mut m, offset, len.max(1))?
        };
        let status = |allocation, host_offset| BlockStatus {
            len: run.len,
            allocation,
            depth: 0,
            host_offset,
        };
        Ok(match run.kind {
            Kind::Data { host } => status(Allocation::Data, Some(host.0)),
            Kind::Compressed(_) => status(Allocation::Data, None),
            Kind::Zero { host } => status(Allocation::Zero, host.map(|h| h.0)),
            Kind::Unallocated => match &self.backing {
                Some(b) if offset < b.size() => {
                    let mut s = b.block_status(offset, run.len.min(b.size() - offset))?;
                    s.depth += 1;
                    if s.allocation == Allocation::Unallocated {
                        s.depth = 0;
                    }
                    s
                }
                _ => status(Allocation::Unallocated, None),
            },
        })
    }
}
