//! The guest read path of a qcow2 image, and block status: both map a run of guest bytes
//! that behave alike, holding the metadata lock only for the lookup.

use std::sync::Arc;

use super::entry::{CompressedRun, HostOffset, Kind};
use super::header::CompressionType;
use super::meta::Meta;
use super::units::{Geometry, GuestOffset};
use super::Qcow2Image;
use crate::driver::{Allocation, BlockStatus};
use crate::error::{io, Result};
use crate::iovec::{self, IoBufMut};

/// A run of guest bytes that map alike.
struct Run {
    kind: Kind,
    len: u64,
    /// For an unallocated run inside allocated clusters (extended L2), where its storage
    /// is: QEMU reports that offset when no backing file answers.
    reserved: Option<HostOffset>,
}

impl Qcow2Image {
    /// Kind of the unit holding guest offset `pos`, with `host` moved to `pos` itself, the
    /// bytes left in the unit, and the storage of an unallocated unit in an allocated
    /// cluster.
    fn kind_at(m: &mut Meta, pos: u64) -> Result<(Kind, u64, Option<HostOffset>)> {
        let g = m.geo();
        let gc = g.guest_cluster(GuestOffset(pos));
        if m.l2_offset(gc)?.is_none() {
            // No L2 table: the whole range its L1 entry covers is unallocated.
            let cover = g.l1_coverage();
            return Ok((Kind::Unallocated, cover - pos % cover, None));
        }
        let ub = g.unit_bits();
        let e = m.l2_entry(gc)?;
        let in_cluster = g.in_cluster(GuestOffset(pos));
        let sc = (in_cluster >> ub) as u32;
        let within = in_cluster & ((1 << ub) - 1);
        let kind = match e.kind(g.cluster_bits, g.extended_l2, sc) {
            Kind::Data { host } => Kind::Data {
                host: HostOffset(host.0 + within),
            },
            Kind::Zero { host: Some(host) } => Kind::Zero {
                host: Some(HostOffset(host.0 + within)),
            },
            k => k,
        };
        let reserved = match kind {
            Kind::Unallocated => e.host_cluster().map(|h| HostOffset(h.0 + in_cluster)),
            _ => None,
        };
        let unit_left = (1 << ub) - (pos & ((1 << ub) - 1));
        Ok((kind, unit_left, reserved))
    }

    /// The longest run starting at `pos` (at most `max` bytes) that maps alike.
    fn map_run(m: &mut Meta, pos: u64, max: u64) -> Result<Run> {
        let (kind, mut len, reserved) = Self::kind_at(m, pos)?;
        if matches!(kind, Kind::Compressed(_)) {
            let g = m.geo();
            return Ok(Run {
                kind,
                len: len
                    .min(max)
                    .min(g.cluster_size() - g.in_cluster(GuestOffset(pos))),
                reserved,
            });
        }
        while len < max {
            let (next, unit, next_reserved) = Self::kind_at(m, pos + len)?;
            let same = match (kind, next) {
                (Kind::Unallocated, Kind::Unallocated) => match (reserved, next_reserved) {
                    (None, None) => true,
                    (Some(a), Some(b)) => b.0 == a.0 + len,
                    _ => false,
                },
                // Zero units with storage behind them merge only where it is contiguous,
                // as QEMU's block status reports them.
                (Kind::Zero { host: None }, Kind::Zero { host: None }) => true,
                (Kind::Zero { host: Some(a) }, Kind::Zero { host: Some(b) }) => b.0 == a.0 + len,
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
            reserved,
        })
    }

    /// The decompressed cluster stored at `run`, from a one-entry cache: small sequential
    /// reads of a compressed cluster decompress it once. The cache is dropped whenever
    /// freed clusters may become reusable (at flush), so it never outlives the data. The
    /// cache is not locked while decompressing, so that readers on several threads
    /// decompress in parallel.
    fn decompressed(
        &self,
        run: CompressedRun,
        g: Geometry,
        compression: CompressionType,
    ) -> Result<Arc<[u8]>> {
        let last = || {
            self.last_compressed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        };
        if let Some((off, data)) = &*last() {
            if *off == run.offset {
                return Ok(data.clone());
            }
        }
        let mut data: Arc<[u8]> = vec![0u8; g.cluster_size() as usize].into();
        let out = Arc::get_mut(&mut data).expect("a new Arc has no other owner");
        self.read_compressed(run, g, compression, out)?;
        *last() = Some((run.offset, data.clone()));
        Ok(data)
    }

    pub(super) fn read_impl(&self, bufs: &[IoBufMut<'_>], offset: u64) -> Result<()> {
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let total = iovec::total_len(bufs);
        let mut front = iovec::Front::new(bufs);
        while front.remaining() > 0 {
            let want = front.remaining() as u64;
            let pos = offset + (total as u64 - want);
            let (run, g, compression) = {
                let mut m = self.meta();
                (
                    Self::map_run(&mut m, pos, want)?,
                    m.geo(),
                    m.h.compression_type,
                )
            };
            let part = front.take(run.len as usize);
            match run.kind {
                Kind::Unallocated => {
                    crate::backing::read_below(self.backing.as_deref(), &part, pos)?
                }
                Kind::Zero { .. } => iovec::zero(&part),
                Kind::Data { host } => io(
                    "Could not read image data",
                    self.storage.read_vectored_at(&part, host.0),
                )?,
                Kind::Compressed(c) => {
                    let cluster = self.decompressed(c, g, compression)?;
                    let at = g.in_cluster(GuestOffset(pos)) as usize;
                    iovec::scatter(&part, &cluster[at..at + run.len as usize]);
                }
            }
        }
        Ok(())
    }

    pub(super) fn status_impl(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let run = {
            let mut m = self.meta();
            // Like QEMU, a run ends where the guest range one L2 table maps ends.
            let cover = m.geo().l1_coverage();
            Self::map_run(&mut m, offset, len.max(1).min(cover - offset % cover))?
        };
        let status = |allocation, host_offset| BlockStatus {
            len: run.len,
            allocation,
            depth: 0,
            host_offset,
            compressed: false,
        };
        Ok(match run.kind {
            Kind::Data { host } => {
                let (hole, len) = if self.reads_holes() {
                    self.host_run(host.0, run.len)?
                } else {
                    (false, run.len)
                };
                BlockStatus {
                    len,
                    ..status(
                        if hole {
                            Allocation::DataOverHole
                        } else {
                            Allocation::Data
                        },
                        Some(host.0),
                    )
                }
            }
            Kind::Compressed(_) => BlockStatus {
                compressed: true,
                ..status(Allocation::Data, None)
            },
            Kind::Zero { host } => status(Allocation::Zero, host.map(|h| h.0)),
            Kind::Unallocated => {
                crate::backing::status_below(self.backing.as_deref(), offset, run.len)?
                    .unwrap_or_else(|| status(Allocation::Unallocated, run.reserved.map(|h| h.0)))
            }
        })
    }

    /// Whether the `len` bytes of the file at `host` start over a hole (or past its end),
    /// and for how many bytes that holds: QEMU asks the file the same way.
    pub(super) fn host_run(&self, host: u64, len: u64) -> Result<(bool, u64)> {
        let next = io("Failed to query allocation", self.storage.next_data(host))?;
        Ok(match next {
            Some((start, stop)) if start <= host => {
                (false, stop.saturating_sub(host).clamp(1, len))
            }
            Some((start, _)) => (true, (start - host).min(len)),
            None => (true, len),
        })
    }
}
