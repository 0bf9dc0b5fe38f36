//! Compressed clusters: reading one back, and writing a whole guest cluster compressed,
//! packed byte by byte after the previous compressed cluster (see `Meta::alloc_bytes`).

use super::compress;
use super::entry::{CompressedRun, L2Entry, OFFSET_MASK};
use super::header::CompressionType;
use super::units::{Geometry, GuestOffset, HostOffset};
use super::Qcow2Image;
use crate::error::{io, Error, Result, Structure};

impl Qcow2Image {
    /// Decompress the compressed cluster `run` into `out` (one cluster long).
    pub(super) fn read_compressed(
        &self,
        run: CompressedRun,
        g: Geometry,
        compression: CompressionType,
        out: &mut [u8],
    ) -> Result<()> {
        let len = run.len.min(2 * g.cluster_size());
        let mut input = vec![0u8; len as usize];
        io(
            "Could not read compressed cluster",
            self.storage.read_at(&mut input, run.offset),
        )?;
        compress::decompress(compression, &input, out)
            .map_err(|e| e.located(Structure::CompressedCluster, run.offset))
    }

    /// Write one guest cluster compressed, as `qemu-img convert -c` does: `offset` is
    /// cluster aligned and `data` a whole cluster, or the rest of the image for its last
    /// cluster. A cluster that does not shrink is written uncompressed.
    pub fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        let packed = self.compress_cluster(data)?;
        self.write_packed(offset, data, packed.as_deref())
    }

    /// Compress `data` (at most one cluster, zero-padded to one) with the image's
    /// compression type, without holding any lock: `None` when it does not shrink.
    pub fn compress_cluster(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        let (cs, kind) = {
            let m = self.meta();
            (m.geo().cluster_size(), m.h.compression_type)
        };
        if data.is_empty() || data.len() as u64 > cs {
            return Err(Error::invalid(format!(
                "compressed writes take one whole cluster (length {})",
                data.len()
            )));
        }
        let mut cluster = data.to_vec();
        cluster.resize(cs as usize, 0);
        compress::compress(kind, &cluster)
    }

    /// Write the guest cluster at `offset` (rules of [`Self::write_compressed`]) as
    /// `packed`, the output of [`Self::compress_cluster`] for `data`; plainly when `None`.
    pub fn write_packed(&self, offset: u64, data: &[u8], packed: Option<&[u8]>) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.before_guest_write(offset, data.len() as u64)?;
        let (g, size) = {
            let m = self.meta();
            (m.geo(), m.h.size)
        };
        let cs = g.cluster_size();
        let len = data.len() as u64;
        let whole = len == cs || offset.checked_add(len) == Some(size);
        if !offset.is_multiple_of(cs) || len == 0 || len > cs || !whole {
            return Err(Error::invalid(format!(
                "compressed writes take one whole cluster (offset {offset}, length {len})"
            )));
        }
        crate::driver::check_range(offset, len, size)?;
        let Some(packed) = packed else {
            return self.write_impl(&[data.into()], offset);
        };
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let gc = g.guest_cluster(GuestOffset(offset));
        let mut m = self.meta_settled(gc, 1);
        let old = m.l2_entry(gc)?;
        if old.word & OFFSET_MASK != 0 {
            // As in QEMU: a compressed write never replaces stored data.
            return Err(Error::io(
                "Compressed writes cannot overwrite allocated clusters",
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        let host: HostOffset = m.alloc_bytes(packed.len() as u64)?;
        m.inflight.add(gc, 1);
        drop(m);
        let wrote = io(
            "Could not write compressed data",
            self.storage.write_at(packed, host.0),
        );
        let mut m = self.meta();
        let mut result = wrote;
        if result.is_ok() {
            let run = CompressedRun {
                offset: host.0,
                len: packed.len() as u64,
            };
            let new = L2Entry {
                word: run.encode(g.cluster_bits),
                bitmap: 0,
            };
            result = m.set_l2_entry(gc, new);
            if result.is_ok() {
                m.free_entry(old);
            }
        }
        self.finish_inflight(&mut m, gc);
        result
    }
}
