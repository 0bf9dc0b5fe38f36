//! Guest data paths of a qcow2 image: read, write (with copy-on-write), write-zeroes,
//! discard and block status.
//!
//! Reads and writes to clusters that are already allocated and unshared hold the metadata
//! lock only for the lookup; writes that allocate or change the mapping hold it throughout.

use super::compress;
use super::entry::{HostOffset, Kind, L2Entry, ALL_ZEROES, COPIED, ZERO};
use super::meta::Meta;
use super::Qcow2Image;
use crate::driver::{Allocation, BlockStatus};
use crate::error::{Error, Result};

/// A run of guest bytes that map alike.
struct Run {
    kind: Kind,
    len: u64,
}

fn io<T>(what: &str, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|e| Error::io(what, e))
}

impl Qcow2Image {
    /// Bits of the allocation unit: the subcluster with extended L2, else the cluster.
    fn unit_bits(m: &Meta) -> u32 {
        if m.h.extended_l2() {
            m.h.cluster_bits - 5
        } else {
            m.h.cluster_bits
        }
    }

    /// Kind of the unit holding guest offset `pos`, with `host` moved to `pos` itself.
    fn kind_at(m: &mut Meta, pos: u64) -> Result<(Kind, u64)> {
        let cb = m.h.cluster_bits;
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

    fn read_backing(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let avail = bsize.saturating_sub(pos).min(buf.len() as u64) as usize;
        if avail > 0 {
            b.read_at(&mut buf[..avail], pos)?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    /// Read a whole compressed cluster into `out` (one cluster long).
    fn read_compressed(
        &self,
        m: &Meta,
        run: super::entry::CompressedRun,
        out: &mut [u8],
    ) -> Result<()> {
        let cs = m.cluster_size();
        let len = run.len.min(2 * cs);
        let mut input = vec![0u8; len as usize];
        io(
            "Could not read compressed cluster",
            self.storage.read_at(&mut input, run.offset),
        )?;
        compress::decompress(m.h.compression_type, &input, out)
    }

    pub(super) fn read_impl(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let want = (buf.len() - done) as u64;
            let (run, cs) = {
                let mut m = self.meta();
                (Self::map_run(&mut m, pos, want)?, m.cluster_size())
            };
            let part = &mut buf[done..done + run.len as usize];
            match run.kind {
                Kind::Unallocated => self.read_backing(part, pos)?,
                Kind::Zero { .. } => part.fill(0),
                Kind::Data { host } => io(
                    "Could not read image data",
                    self.storage.read_at(part, host.0),
                )?,
                Kind::Compressed(c) => {
                    let mut cluster = vec![0u8; cs as usize];
                    {
                        let m = self.meta();
                        self.read_compressed(&m, c, &mut cluster)?;
                    }
                    let at = (pos % cs) as usize;
                    part.copy_from_slice(&cluster[at..at + part.len()]);
                }
            }
            done += run.len as usize;
        }
        Ok(())
    }

    pub(super) fn write_impl(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let mut m = self.meta();
            let cs = m.cluster_size();
            let n = ((cs - pos % cs) as usize).min(buf.len() - done);
            let data = &buf[done..done + n];
            if let Some(host) = Self::overwrite_in_place(&mut m, pos, n as u64)? {
                drop(m);
                io(
                    "Could not write image data",
                    self.storage.write_at(data, host),
                )?;
            } else {
                self.cow_write(&mut m, pos, data)?;
            }
            done += n;
        }
        Ok(())
    }

    /// Host offset for writing `len` bytes at `pos` (within one cluster) without any
    /// metadata change: the cluster is allocated, unshared, and every unit touched is data.
    fn overwrite_in_place(m: &mut Meta, pos: u64, len: u64) -> Result<Option<u64>> {
        let cb = m.h.cluster_bits;
        let e = m.l2_entry(pos >> cb)?;
        if !e.is_copied() || e.is_compressed() {
            return Ok(None);
        }
        let Some(host) = e.host_cluster() else {
            return Ok(None);
        };
        let in_cluster = pos & ((1 << cb) - 1);
        if m.h.extended_l2() {
            let ub = cb - 5;
            let first = in_cluster >> ub;
            let last = (in_cluster + len - 1) >> ub;
            let mask = ((1u64 << (last + 1)) - 1) & !((1u64 << first) - 1);
            if e.bitmap & mask != mask {
                return Ok(None);
            }
        } else if e.word & ZERO != 0 {
            return Ok(None);
        }
        Ok(Some(host.0 + in_cluster))
    }

    /// Write `data` at `pos` (within one cluster) where the mapping must change: allocate
    /// or copy the cluster, fill the units it only partly covers from what they showed
    /// before, then point the L2 entry at it. Holds the metadata lock throughout.
    fn cow_write(&self, m: &mut Meta, pos: u64, data: &[u8]) -> Result<()> {
        let cb = m.h.cluster_bits;
        let cs = m.cluster_size();
        let ext = m.h.extended_l2();
        let ub = Self::unit_bits(m);
        let us = 1u64 << ub;
        let units = (cs >> ub) as u32;
        let gc = pos >> cb;
        let cluster_start = gc << cb;
        let in_cluster = pos - cluster_start;
        let old = m.l2_entry(gc)?;
        let first = (in_cluster >> ub) as u32;
        let last = ((in_cluster + data.len() as u64 - 1) >> ub) as u32;

        // Reuse the host cluster if it is ours alone; otherwise take a new one.
        let reuse = old.is_copied() && !old.is_compressed() && old.host_cluster().is_some();
        let target = if reuse {
            old.host_cluster().expect("checked").0
        } else {
            m.alloc_clusters(1)? << cb
        };
        // Units whose old content must move to a new cluster with them.
        let old_kind = |s: u32| old.kind(cb, ext, s);
        let keeps =
            |s: u32| !reuse && matches!(old_kind(s), Kind::Data { .. } | Kind::Compressed(_));
        let span_first = (0..first).find(|&s| keeps(s)).unwrap_or(first);
        let span_last = (last + 1..units).rev().find(|&s| keeps(s)).unwrap_or(last);

        let mut decompressed: Option<Vec<u8>> = None;
        let span_start = u64::from(span_first) << ub;
        let mut buf = vec![0u8; ((span_last - span_first + 1) as u64 * us) as usize];
        let data_at = (in_cluster - span_start) as usize;
        for s in span_first..=span_last {
            let u_start = u64::from(s) << ub;
            let covered = u_start >= in_cluster && u_start + us <= in_cluster + data.len() as u64;
            let touched = s >= first && s <= last;
            if covered || !(touched || keeps(s)) {
                continue;
            }
            let dst =
                &mut buf[(u_start - span_start) as usize..(u_start - span_start + us) as usize];
            match old_kind(s) {
                Kind::Unallocated => self.read_backing(dst, cluster_start + u_start)?,
                Kind::Zero { .. } => dst.fill(0),
                Kind::Data { host } => io(
                    "Could not read image data",
                    self.storage.read_at(dst, host.0),
                )?,
                Kind::Compressed(c) => {
                    if decompressed.is_none() {
                        let mut out = vec![0u8; cs as usize];
                        self.read_compressed(m, c, &mut out)?;
                        decompressed = Some(out);
                    }
                    let d = decompressed.as_ref().expect("just set");
                    dst.copy_from_slice(&d[u_start as usize..(u_start + us) as usize]);
                }
            }
        }
        buf[data_at..data_at + data.len()].copy_from_slice(data);
        io(
            "Could not write image data",
            self.storage.write_at(&buf, target + span_start),
        )?;

        let mut new = L2Entry {
            word: target | COPIED,
            bitmap: 0,
        };
        if ext {
            let mut bitmap = if old.is_compressed() { 0 } else { old.bitmap };
            for s in span_first..=span_last {
                if (s >= first && s <= last) || keeps(s) {
                    bitmap |= 1 << s;
                    bitmap &= !(1u64 << (32 + s));
                }
            }
            new.bitmap = bitmap;
        }
        m.set_l2_entry(gc, new)?;
        if !reuse {
            m.free_entry(old);
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
            self.write_impl(&zeros[..n as usize], pos)?;
            pos += n;
        }
        Ok(())
    }

    /// Mark whole units as zero, cluster by cluster.
    fn zero_units(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let mut m = self.meta();
        let cb = m.h.cluster_bits;
        let cs = m.cluster_size();
        let ext = m.h.extended_l2();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gc = pos >> cb;
            let in_cluster = pos - (gc << cb);
            let n = (cs - in_cluster).min(end - pos);
            let old = m.l2_entry(gc)?;
            let whole = n == cs || pos + n == self.size && in_cluster == 0;
            if !whole && old.is_compressed() {
                // Only part of a compressed cluster: write real zeroes (decompresses it).
                self.cow_write(&mut m, pos, &vec![0u8; n as usize])?;
                pos += n;
                continue;
            }
            let allocated = old.is_compressed() || old.host_cluster().is_some();
            let unmap = old.is_compressed() || (may_unmap && allocated && whole);
            let mut new = old;
            if unmap {
                new.word = 0;
            }
            if ext {
                let ub = cb - 5;
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
            pos += n;
        }
        Ok(())
    }

    /// Version 2 has no zero flag: drop clusters when nothing shows through, else write.
    fn zero_units_v2(&self, offset: u64, len: u64) -> Result<()> {
        if self.backing.is_some() {
            return self.write_zero_bytes(offset, len);
        }
        let cs = self.meta().cluster_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let n = (cs - pos % cs).min(end - pos);
            if n == cs || (pos % cs == 0 && pos + n == self.size) {
                self.drop_cluster(pos >> self.meta().h.cluster_bits, false)?;
            } else {
                self.write_zero_bytes(pos, n)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Discard whole clusters like QEMU: v3 images read zeroes afterwards, v2 images show
    /// the backing file again. Partial clusters at either end are left alone.
    pub(super) fn discard_impl(&self, offset: u64, len: u64) -> Result<()> {
        let (cb, version) = {
            let m = self.meta();
            (m.h.cluster_bits, m.h.version)
        };
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
        let mut m = self.meta();
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
