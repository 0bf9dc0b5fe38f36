//! Write-zeroes and discard of a qcow2 image: whole units get a zero flag or lose their
//! clusters, partial ones are written as zeroes.

use super::entry::{L2Entry, ALL_ZEROES, ZERO};
use super::units::{GuestCluster, GuestOffset};
use super::Qcow2Image;
use crate::error::Result;

impl Qcow2Image {
    pub(super) fn zeroes_impl(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let size = self.meta().h.size;
        self.zeroes_within(offset, len, may_unmap, size)
    }

    /// Zero `len` bytes at `offset` of an image whose end is `size` (the virtual size, or
    /// the size a resize is about to set): a partial unit at `size` counts as whole.
    pub(super) fn zeroes_within(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        size: u64,
    ) -> Result<()> {
        let (version, ub) = {
            let m = self.meta();
            (m.h.version, m.geo().unit_bits())
        };
        let us = 1u64 << ub;
        let end = offset + len;
        // Whole units get a zero flag (version 3); partial ones are written as zeroes.
        let a_start = offset.next_multiple_of(us).min(end);
        let a_end = if end == size { end } else { end - end % us }.max(a_start);
        self.write_zero_bytes(offset, a_start - offset)?;
        if version >= 3 {
            self.zero_units(a_start, a_end - a_start, may_unmap, size)?;
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
            self.write_impl(&[zeros[..n as usize].into()], pos)?;
            pos += n;
        }
        Ok(())
    }

    /// Mark whole units as zero, cluster by cluster.
    fn zero_units(&self, offset: u64, len: u64, may_unmap: bool, size: u64) -> Result<()> {
        let g = self.geo();
        let cs = g.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gc = g.guest_cluster(GuestOffset(pos));
            let in_cluster = g.in_cluster(GuestOffset(pos));
            let n = (cs - in_cluster).min(end - pos);
            let whole = n == cs || pos + n == size && in_cluster == 0;
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
        gc: GuestCluster,
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
        if m.geo().extended_l2 {
            let ub = m.geo().unit_bits();
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
        let (g, size) = self.geo_and_size();
        let cs = g.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let n = (cs - pos % cs).min(end - pos);
            if n == cs || (pos.is_multiple_of(cs) && pos + n == size) {
                self.drop_cluster(g.guest_cluster(GuestOffset(pos)), false)?;
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
        let (g, size, version) = {
            let m = self.meta();
            (m.geo(), m.h.size, m.h.version)
        };
        if version < 3 && self.backing.is_some() {
            return Ok(());
        }
        let cs = g.cluster_size();
        let end = offset + len;
        let start = offset.next_multiple_of(cs);
        let stop = if end == size { end } else { end - end % cs };
        let mut pos = start;
        while pos < stop {
            self.drop_cluster(g.guest_cluster(GuestOffset(pos)), version >= 3)?;
            pos += cs;
        }
        Ok(())
    }

    /// Release guest cluster `gc`; with `zero` it reads as zeroes afterwards.
    fn drop_cluster(&self, gc: GuestCluster, zero: bool) -> Result<()> {
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let mut m = self.meta_settled(gc, 1);
        let old = m.l2_entry(gc)?;
        let allocated = old.is_compressed() || old.host_cluster().is_some();
        if !(self.backing.is_some() || allocated) {
            return Ok(());
        }
        let new = if !zero {
            L2Entry::default()
        } else if m.geo().extended_l2 {
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
}
