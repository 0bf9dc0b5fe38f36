//! The guest write path: in-place overwrites, and allocating writes with copy-on-write.
//!
//! Guest data moves outside the metadata lock. An allocating write plans under the lock
//! (takes clusters, marks the guest clusters in flight), copies and writes data without
//! it, then takes the lock again to point the L2 entries at the new clusters. Other
//! requests for guest clusters in flight wait until the mapping is settled.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::MutexGuard;

use super::entry::{CompressedRun, Kind, L2Entry, ALL_ALLOCATED, COPIED, ZERO};
use super::meta::Meta;
use super::units::{ClusterCount, GuestCluster, GuestOffset, HostOffset};
use super::Qcow2Image;
use crate::error::{io, Result};
use crate::iovec::{self, IoBuf, IoBufMut};
use crate::storage::{copy_between, Storage};

/// Largest run of whole clusters one allocating write takes at once.
const MAX_RUN_BYTES: u64 = 16 << 20;

/// Where the old content of one allocation unit comes from, when it must be copied.
#[derive(Clone, Copy)]
enum Source {
    Backing(u64),
    Zero,
    Host(u64),
    Compressed(CompressedRun, u64),
}

/// A partial-cluster write planned under the lock, carried out without it.
struct CowPlan {
    gc: GuestCluster,
    old: L2Entry,
    new: L2Entry,
    reuse: bool,
    /// Host offset where the buffer goes, and the guest offset of its first byte.
    host: u64,
    guest: u64,
    /// Units (offset in buffer, length) to fill before the data is copied in.
    fills: Vec<(usize, usize, Source)>,
    buf_len: usize,
}

/// Where the bytes of a guest write come from.
enum Payload<'a, 'b> {
    Bufs(iovec::Front<'a, IoBuf<'b>>),
    /// `left` bytes of a file from `at` (convert's copy offloading).
    File {
        from: &'a File,
        at: u64,
        left: u64,
    },
}

/// Bytes taken off a [`Payload`] for a copy-on-write.
enum Taken<'b> {
    Bufs(Vec<IoBuf<'b>>),
    Read(Vec<u8>),
}

impl Taken<'_> {
    fn bufs(&self) -> Vec<IoBuf<'_>> {
        match self {
            Taken::Bufs(b) => b.clone(),
            Taken::Read(v) => vec![IoBuf::from(&v[..])],
        }
    }
}

impl<'b> Payload<'_, 'b> {
    fn remaining(&self) -> u64 {
        match self {
            Payload::Bufs(f) => f.remaining() as u64,
            Payload::File { left, .. } => *left,
        }
    }

    /// Write the next `n` bytes at `host` of `storage`: by the kernel from a file where
    /// both files allow it, else through a buffer.
    fn put(&mut self, storage: &dyn Storage, host: u64, n: u64) -> Result<()> {
        if let Payload::File { from, at, left } = self {
            if let Some(to) = storage.file() {
                let copied = copy_between(from, *at, to, host, n);
                if io("Could not write image data", copied)? {
                    (*at, *left) = (*at + n, *left - n);
                    return Ok(());
                }
            }
        }
        let bytes = self.take(n)?;
        io(
            "Could not write image data",
            storage.write_vectored_at(&bytes.bufs(), host),
        )
    }

    /// The next `n` bytes, read in from a file.
    fn take(&mut self, n: u64) -> Result<Taken<'b>> {
        match self {
            Payload::Bufs(f) => Ok(Taken::Bufs(f.take(n as usize))),
            Payload::File { from, at, left } => {
                let mut v = vec![0u8; n as usize];
                io(
                    "Could not read source data",
                    from.read_exact_at(&mut v, *at),
                )?;
                (*at, *left) = (*at + n, *left - n);
                Ok(Taken::Read(v))
            }
        }
    }
}

impl Qcow2Image {
    /// Lock the metadata once no allocation is in flight for guest clusters `gc..gc + n`.
    pub(super) fn meta_settled(&self, gc: GuestCluster, n: u64) -> MutexGuard<'_, Meta> {
        let mut m = self.meta();
        while m.inflight.overlaps(gc, n) {
            m = self.alloc_done.wait(m).unwrap_or_else(|p| p.into_inner());
        }
        m
    }

    pub(super) fn finish_inflight(&self, m: &mut Meta, gc: GuestCluster) {
        m.inflight.remove(gc);
        self.alloc_done.notify_all();
    }

    pub(super) fn write_impl(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        self.write_payload(Payload::Bufs(iovec::Front::new(bufs)), offset)
    }

    /// Copy `len` bytes at `at` of `from` to guest `offset`, the kernel moving the bytes
    /// wherever whole clusters go (convert's copy offloading); a partial cluster is read
    /// in and written as any write.
    pub(super) fn copy_in_impl(&self, from: &File, at: u64, offset: u64, len: u64) -> Result<()> {
        self.write_payload(
            Payload::File {
                from,
                at,
                left: len,
            },
            offset,
        )
    }

    fn write_payload(&self, mut data: Payload<'_, '_>, offset: u64) -> Result<()> {
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let total = data.remaining();
        while data.remaining() > 0 {
            let left = data.remaining();
            let pos = offset + (total - left);
            let mut m = self.meta_settled(self.geo().guest_cluster(GuestOffset(pos)), 1);
            let cs = m.geo().cluster_size();
            let n = (cs - pos % cs).min(left);
            if let Some(host) = Self::overwrite_in_place(&mut m, pos, n)? {
                let n = Self::extend_in_place(&mut m, pos + n, host + n, left - n)? + n;
                drop(m);
                data.put(&*self.storage, host, n)?;
                continue;
            }
            if pos.is_multiple_of(cs) && left >= cs {
                self.write_whole_clusters(m, pos, &mut data)?;
            } else {
                let plan = self.plan_cow(&mut m, pos, n)?;
                drop(m);
                let bytes = data.take(n)?;
                self.run_cow(plan, &bytes.bufs(), pos)?;
            }
        }
        Ok(())
    }

    /// Host offset for writing `len` bytes at `pos` (within one cluster) without any
    /// metadata change: the cluster is allocated, unshared, and every unit touched is data.
    fn overwrite_in_place(m: &mut Meta, pos: u64, len: u64) -> Result<Option<u64>> {
        let g = m.geo();
        let e = m.l2_entry(g.guest_cluster(GuestOffset(pos)))?;
        if !e.is_copied() || e.is_compressed() {
            return Ok(None);
        }
        let Some(host) = e.host_cluster() else {
            return Ok(None);
        };
        let in_cluster = g.in_cluster(GuestOffset(pos));
        if g.extended_l2 {
            let ub = g.unit_bits();
            let first = in_cluster >> ub;
            let last = (in_cluster + len - 1) >> ub;
            let mask = ((1u64 << (last + 1)) - 1) & !((1u64 << first) - 1);
            if e.bitmap & mask != mask {
                return Ok(None);
            }
        } else if e.word & ZERO != 0 {
            return Ok(None);
        }
        m.check_data_cluster(g.host_cluster(host))?;
        Ok(Some(host.0 + in_cluster))
    }

    /// How many more bytes from `pos` (cluster aligned) can be written in place right
    /// after an in-place write ending at `host`: following clusters whose host clusters
    /// continue contiguously, at most `max` bytes.
    fn extend_in_place(m: &mut Meta, pos: u64, host: u64, max: u64) -> Result<u64> {
        let g = m.geo();
        let cs = g.cluster_size();
        let mut more = 0;
        while more < max.min(MAX_RUN_BYTES) {
            let n = cs.min(max - more);
            if m.inflight
                .overlaps(g.guest_cluster(GuestOffset(pos + more)), 1)
            {
                break;
            }
            match Self::overwrite_in_place(m, pos + more, n)? {
                Some(h) if h == host + more => more += n,
                _ => break,
            }
        }
        Ok(more)
    }

    /// Write a run of whole clusters that all need new storage into freshly allocated,
    /// contiguous clusters with one write, taking their data (at least a cluster) off the
    /// front of `data`.
    fn write_whole_clusters(
        &self,
        mut m: MutexGuard<'_, Meta>,
        pos: u64,
        data: &mut Payload<'_, '_>,
    ) -> Result<()> {
        let g = m.geo();
        let cs = g.cluster_size();
        let gc = g.guest_cluster(GuestOffset(pos));
        let max = (data.remaining() / cs)
            .min(MAX_RUN_BYTES / cs)
            .min(g.l2_entries() - g.l2_index(gc) as u64)
            .max(1);
        let mut olds = vec![m.l2_entry(gc)?];
        while (olds.len() as u64) < max {
            let next = gc.plus(olds.len() as u64);
            if m.inflight.overlaps(next, 1)
                || Self::overwrite_in_place(&mut m, g.guest_offset(next).0, cs)?.is_some()
            {
                break;
            }
            olds.push(m.l2_entry(next)?);
        }
        let k = olds.len() as u64;
        let first = m.alloc_clusters(ClusterCount(k))?;
        m.inflight.add(gc, k);
        drop(m);
        let host = g.host_offset(first).0;
        let wrote = data.put(&*self.storage, host, k * cs);
        let mut m = self.meta();
        let mut result = wrote;
        if result.is_ok() {
            for (i, old) in olds.iter().enumerate() {
                let new = L2Entry {
                    word: (host + i as u64 * cs) | COPIED,
                    bitmap: if g.extended_l2 { ALL_ALLOCATED } else { 0 },
                };
                if let Err(e) = m.set_l2_entry(gc.plus(i as u64), new) {
                    result = Err(e);
                    break;
                }
                m.free_entry(*old);
            }
        }
        self.finish_inflight(&mut m, gc);
        result
    }

    /// Plan a write of `len` bytes at `pos` within one cluster whose mapping must change:
    /// which cluster it goes to, and which units to fill from what they showed before.
    fn plan_cow(&self, m: &mut Meta, pos: u64, len: u64) -> Result<CowPlan> {
        let g = m.geo();
        let (cb, cs, ext) = (g.cluster_bits, g.cluster_size(), g.extended_l2);
        let ub = g.unit_bits();
        let us = 1u64 << ub;
        let units = (cs >> ub) as u32;
        let gc = g.guest_cluster(GuestOffset(pos));
        let cluster_start = g.guest_offset(gc).0;
        let in_cluster = pos - cluster_start;
        let old = m.l2_entry(gc)?;
        let first = (in_cluster >> ub) as u32;
        let last = ((in_cluster + len - 1) >> ub) as u32;

        // Reuse the host cluster if it is ours alone; otherwise take a new one. A new one
        // past everything the file held or this session allocated reads as zeroes
        // already, so without a backing file its zero fills need not be written.
        let reuse = old.is_copied() && !old.is_compressed() && old.host_cluster().is_some();
        let fresh_from = m.allocation_end();
        let target = if reuse {
            let host = old.host_cluster().expect("checked");
            m.check_data_cluster(g.host_cluster(host))?;
            host.0
        } else {
            g.host_offset(m.alloc_clusters(ClusterCount(1))?).0
        };
        let fresh = !reuse && g.host_cluster(HostOffset(target)) >= fresh_from;
        let zero_reads = fresh && self.backing.is_none();
        let old_kind = |s: u32| old.kind(cb, ext, s);
        // Units whose old content moves to a new cluster with the written ones.
        let keeps =
            |s: u32| !reuse && matches!(old_kind(s), Kind::Data { .. } | Kind::Compressed(_));
        let span_first = (0..first).find(|&s| keeps(s)).unwrap_or(first);
        let span_last = (last + 1..units).rev().find(|&s| keeps(s)).unwrap_or(last);
        // In a reused cluster a unit that already holds data is never read and written
        // back: another writer may be writing it in place. The write starts or ends
        // inside such a unit instead of filling it.
        let in_place = |s: u32| reuse && matches!(old_kind(s), Kind::Data { .. });

        // Fills as (offset in the cluster, length, source).
        let mut fills = Vec::new();
        for s in span_first..=span_last {
            let u_start = u64::from(s) << ub;
            let covered = u_start >= in_cluster && u_start + us <= in_cluster + len;
            let touched = s >= first && s <= last;
            if covered || in_place(s) || !(touched || keeps(s)) {
                continue;
            }
            let src = match old_kind(s) {
                Kind::Unallocated => Source::Backing(cluster_start + u_start),
                Kind::Zero { .. } => Source::Zero,
                Kind::Data { host } => Source::Host(host.0),
                Kind::Compressed(c) => Source::Compressed(c, u_start),
            };
            if zero_reads && matches!(src, Source::Backing(_) | Source::Zero) {
                continue;
            }
            fills.push((u_start, us, src));
        }
        let unit_edge = |s: u32, end: bool| {
            let at = u64::from(s + u32::from(end)) << ub;
            if in_place(s) {
                if end {
                    in_cluster + len
                } else {
                    in_cluster
                }
            } else {
                at
            }
        };
        let (span_start, span_end) = if zero_reads {
            // Only the data and the units copied from elsewhere are written.
            let lo = fills.iter().map(|f| f.0).fold(in_cluster, u64::min);
            let hi = fills
                .iter()
                .map(|f| f.0 + f.1)
                .fold(in_cluster + len, u64::max);
            (lo, hi)
        } else {
            (unit_edge(span_first, false), unit_edge(span_last, true))
        };
        let fills: Vec<(usize, usize, Source)> = fills
            .into_iter()
            .map(|(at, n, src)| ((at - span_start) as usize, n as usize, src))
            .collect();

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
        m.inflight.add(gc, 1);
        Ok(CowPlan {
            gc,
            old,
            new,
            reuse,
            host: target + span_start,
            guest: cluster_start + span_start,
            fills,
            buf_len: (span_end - span_start) as usize,
        })
    }

    /// Carry out a planned copy-on-write without the lock, then commit the mapping.
    fn run_cow(&self, plan: CowPlan, data: &[IoBuf<'_>], pos: u64) -> Result<()> {
        let written = self.fill_and_write(&plan, data, pos);
        let mut m = self.meta();
        let mut result = written;
        if result.is_ok() {
            result = m.set_l2_entry(plan.gc, plan.new);
            if result.is_ok() && !plan.reuse {
                m.free_entry(plan.old);
            }
        }
        self.finish_inflight(&mut m, plan.gc);
        result
    }

    fn fill_and_write(&self, plan: &CowPlan, data: &[IoBuf<'_>], pos: u64) -> Result<()> {
        let (g, compression) = {
            let m = self.meta();
            (m.geo(), m.h.compression_type)
        };
        let mut buf = vec![0u8; plan.buf_len];
        let mut decompressed: Option<Vec<u8>> = None;
        for &(at, len, src) in &plan.fills {
            let dst = &mut buf[at..at + len];
            match src {
                Source::Backing(guest) => crate::backing::read_below(
                    self.backing.as_deref(),
                    &[IoBufMut::from(dst)],
                    guest,
                )?,
                Source::Zero => dst.fill(0),
                Source::Host(host) => {
                    io("Could not read image data", self.storage.read_at(dst, host))?
                }
                Source::Compressed(run, u_start) => {
                    if decompressed.is_none() {
                        let mut out = vec![0u8; g.cluster_size() as usize];
                        self.read_compressed(run, g, compression, &mut out)?;
                        decompressed = Some(out);
                    }
                    let d = decompressed.as_ref().expect("just set");
                    dst.copy_from_slice(&d[u_start as usize..u_start as usize + len]);
                }
            }
        }
        let at = (pos - plan.guest) as usize;
        iovec::gather(data, &mut buf[at..at + iovec::total_len(data)]);
        io(
            "Could not write image data",
            self.storage.write_at(&buf, plan.host),
        )
    }
}
