//! Emptying a qcow2 image (QEMU's `make_empty`, what `commit` does to the overlay it
//! committed): the active L1 drops every L2 table, so each guest cluster reads through to
//! the backing file again; the tables and the data they mapped lose that reference.
//! Snapshots keep what they share.
//!
//! Crash safety is the flush order of every metadata change: the cleared L1 reaches the
//! file before any refcount is lowered, so a crash leaves the old mapping with everything
//! still referenced, or the empty one with at worst leaked clusters.

use super::meta::Meta;
use super::units::{ClusterCount, GuestCluster};
use super::Qcow2Image;
use crate::error::{Error, Result, Structure};

impl Qcow2Image {
    /// Make the image read as its backing file (or as zeroes without one), durably.
    pub(crate) fn make_empty(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let _g = self.gate.write().unwrap_or_else(|p| p.into_inner());
        self.forget_decompressed();
        let mut m = self.meta();
        m.mark_dirty_if_lazy()?;
        m.drop_active_l2_tables()?;
        m.flush()
    }
}

impl Meta {
    /// Clear every active L1 entry; the table and each cluster its entries reference lose
    /// one reference at the next flush, after the L1 is written.
    fn drop_active_l2_tables(&mut self) -> Result<()> {
        let g = self.geo();
        for i in 0..self.l1.entries.len() {
            let first = g.first_cluster_of_l1(i);
            let Some(table) = self.l2_offset(first)? else {
                if self.l1.entries[i] != 0 {
                    // Flags without a table: nothing is referenced.
                    self.l1.entries[i] = 0;
                    self.l1.dirty = true;
                }
                continue;
            };
            // Read (and validate) every entry before anything changes for this table.
            let mut entries = Vec::new();
            for j in 0..g.l2_entries() {
                let e = self.l2_entry(GuestCluster(first.0 + j))?;
                if e.word != 0 {
                    entries.push(e);
                }
            }
            for e in entries {
                self.free_entry(e);
            }
            let c = g.host_cluster(table);
            if c.0 == 0 {
                return Err(Error::corrupt_at(
                    Structure::L1Table,
                    self.h.l1_table_offset + i as u64 * 8,
                    "L2 table in cluster 0",
                ));
            }
            self.refs.defer(c, ClusterCount(1), -1);
            self.overlap.remove_l2(c);
            // Its cached contents (dirty or not) are never written: nothing points at it.
            self.l2.remove(table.0);
            self.l1.entries[i] = 0;
            self.l1.dirty = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::open::{open_image, OpenOptions};
    use crate::test_tools::{qemu, qemu_ok};

    fn io(p: &str, cmd: &str) {
        qemu_ok("qemu-io", &["-f", "qcow2", "-c", cmd, p]);
    }

    /// After make_empty the overlay maps nothing, reads its backing file, checks clean
    /// (no leak), and a snapshot taken before still reads what it held.
    #[test]
    fn empties_the_active_mapping_and_keeps_snapshots() {
        for opts in [
            "cluster_size=65536",
            "extended_l2=on",
            "cluster_size=4096,refcount_bits=1",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let b = dir.path().join("b.qcow2");
            let t = dir.path().join("t.qcow2");
            let (bs, ts) = (b.to_str().unwrap(), t.to_str().unwrap());
            qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", bs, "4M"]);
            io(bs, "write -P 1 0 4M");
            let create = [
                "create", "-q", "-f", "qcow2", "-o", opts, "-b", bs, "-F", "qcow2", ts,
            ];
            qemu_ok("qemu-img", &create);
            io(ts, "write -P 2 0 1M");
            io(ts, "write -z 1M 64k");
            io(ts, "write -c -P 3 2M 64k");
            io(ts, "discard 3M 64k");
            if !opts.contains("refcount_bits=1") {
                qemu_ok("qemu-img", &["snapshot", "-c", "s", ts]);
                io(ts, "write -P 4 0 64k");
            }
            let img = crate::lock::retry_while_locked(|| open_image(&t, &OpenOptions::default()))
                .unwrap();
            img.make_empty().unwrap();
            let mut buf = vec![0u8; 4 << 20];
            img.driver().read_at(&mut buf, 0).unwrap();
            assert!(
                buf.iter().all(|&x| x == 1),
                "{opts}: reads the backing file"
            );
            drop(img);
            let (code, out) = qemu("qemu-img", &["check", ts]);
            assert_eq!(code, 0, "{opts}: {out}");
            assert!(out.contains("No errors were found"), "{opts}: {out}");
            let map = qemu_ok("qemu-img", &["map", "--output=json", ts]);
            assert!(!map.contains("\"depth\": 0"), "{opts}: {map}");
            if !opts.contains("refcount_bits=1") {
                let raw = dir.path().join("s.raw");
                let rs = raw.to_str().unwrap();
                qemu_ok(
                    "qemu-img",
                    &["convert", "-l", "snapshot.name=s", "-O", "raw", ts, rs],
                );
                let s = std::fs::read(&raw).unwrap();
                assert!(
                    s[..1 << 20].iter().all(|&x| x == 2),
                    "{opts}: snapshot data"
                );
                assert!(s[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 0));
                assert!(s[2 << 20..(2 << 20) + 65536].iter().all(|&x| x == 3));
                assert!(s[(2 << 20) + 65536..3 << 20].iter().all(|&x| x == 1));
            }
        }
    }

    /// A crash at any point of make_empty (any subset of the writes after the last flush
    /// reaching the disk) leaves an image that checks without corruption and reads either
    /// as before or as empty, never a mix.
    #[test]
    fn a_crash_reads_as_before_or_as_empty() {
        use crate::fault_storage::FaultStorage;
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.qcow2");
        let ps = p.to_str().unwrap();
        qemu_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096",
                ps,
                "4M",
            ],
        );
        io(ps, "write -P 5 0 3M");
        io(ps, "write -c -P 6 3M 64k");
        io(ps, "write -z 3200k 64k");
        let read = |file: &str| {
            let raw = dir.path().join("r.raw");
            qemu_ok(
                "qemu-img",
                &["convert", "-O", "raw", file, raw.to_str().unwrap()],
            );
            std::fs::read(&raw).unwrap()
        };
        let before = read(ps);
        let fault = FaultStorage::with_content(std::fs::read(&p).unwrap());
        let img = super::Qcow2Image::open(Arc::new(fault.clone()), false).unwrap();
        fault.reset_log().unwrap();
        img.make_empty().unwrap();
        drop(img);
        let log_len = fault.log().len();
        assert!(log_len > 0);
        let crash = dir.path().join("crash.qcow2");
        let cs = crash.to_str().unwrap();
        for k in 0..=log_len {
            for (i, image) in fault.crash_images(k).into_iter().enumerate() {
                std::fs::write(&crash, image).unwrap();
                let (code, out) = qemu("qemu-img", &["check", cs]);
                assert!(
                    code == 0 || code == 3,
                    "crash at {k}/{log_len} ({i}): {out}"
                );
                let now = read(cs);
                let empty = now.iter().all(|&b| b == 0);
                assert!(
                    now == before || empty,
                    "crash at {k}/{log_len} ({i}): a mix"
                );
            }
        }
    }
}
