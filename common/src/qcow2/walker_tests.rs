//! The walker and the allocator, on images qemu-img made (snapshots, compressed clusters,
//! subclusters, shared L2 tables) and on fresh ones.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::allocator::When;
use super::meta::Meta;
use super::units::{ClusterCount, HostCluster, HostOffset};
use super::walker::{Finding, Flow, L1Source, Structure, Visit};
use super::Qcow2Image;
use crate::driver::BlockDriver;
use crate::fault_storage::FaultStorage;

use crate::test_tools::qemu_ok as run;

/// An image qemu made: writes, a compressed write, snapshots between them.
fn qemu_image(dir: &Path, opts: &str) -> Vec<u8> {
    let p = dir.join(format!("w-{}.qcow2", opts.replace([',', '='], "-")));
    let f = p.to_str().unwrap();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", opts, f, "8M"],
    );
    run(
        "qemu-io",
        &["-c", "write -P 1 0 300k", "-c", "write -c -P 2 1M 64k", f],
    );
    run("qemu-img", &["snapshot", "-c", "s1", f]);
    run(
        "qemu-io",
        &["-c", "write -P 3 64k 8k", "-c", "write -P 4 4M 100k", f],
    );
    run("qemu-img", &["snapshot", "-c", "s2", f]);
    run(
        "qemu-io",
        &["-c", "write -c -P 5 2M 64k", "-c", "discard 0 64k", f],
    );
    run("qemu-img", &["snapshot", "-c", "s3", f]);
    std::fs::read(&p).unwrap()
}

fn meta_of(bytes: Vec<u8>) -> Meta {
    let storage = Arc::new(FaultStorage::with_content(bytes));
    let h = super::read_header(&*storage).unwrap();
    Meta::load(storage, h, true).unwrap()
}

/// Every visit of a walk.
fn visits(m: &mut Meta) -> Vec<Visit> {
    let mut all = Vec::new();
    m.walk(&mut |v| {
        all.push(v);
        Flow::Continue
    })
    .unwrap();
    all
}

/// Counting every reference the walker reports gives exactly the refcounts qemu-img
/// stored: each reference is visited once, none is missed.
#[test]
fn walker_recount_matches_qemus_refcounts() {
    let dir = tempfile::tempdir().unwrap();
    for opts in [
        "cluster_size=65536",
        "cluster_size=4096,refcount_bits=8",
        "cluster_size=65536,extended_l2=on",
        "cluster_size=16384,refcount_bits=64,compression_type=zstd",
    ] {
        let mut m = meta_of(qemu_image(dir.path(), opts));
        let g = m.geo();
        let mut counts: HashMap<u64, u64> = HashMap::new();
        let mut add = |off: HostOffset, bytes: u64, n: u64| {
            for c in g.clusters_touched(off, bytes) {
                *counts.entry(c).or_default() += n;
            }
        };
        for v in visits(&mut m) {
            match v {
                Visit::Structure { offset, bytes, .. } => add(offset, bytes, 1),
                Visit::L2Table { offset, .. } => add(offset, g.cluster_size(), 1),
                Visit::Entry { extent, .. } => {
                    let (h, len) = extent.unwrap();
                    add(h, len, 1);
                }
                Visit::Finding(f) => panic!("{opts}: finding in a clean image: {f:?}"),
            }
        }
        let end = m.refs.end.0;
        for c in 0..end {
            let stored = m.refcount(HostCluster(c)).unwrap();
            let seen = counts.get(&c).copied().unwrap_or(0);
            assert_eq!(stored, seen, "{opts}: cluster {c}");
        }
    }
}

/// The snapshots' L1 tables share L2 tables with the active one: the walker visits such a
/// table once for each L1 entry that points at it, and its entries each time.
#[test]
fn walker_visits_shared_l2_tables_once_per_l1() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = meta_of(qemu_image(dir.path(), "cluster_size=65536"));
    let all = visits(&mut m);
    let tables = |src: L1Source| -> Vec<HostOffset> {
        all.iter()
            .filter_map(|v| match v {
                Visit::L2Table { l1, offset, .. } if *l1 == src => Some(*offset),
                _ => None,
            })
            .collect()
    };
    let entries = |src: L1Source| {
        all.iter()
            .filter(|v| matches!(v, Visit::Entry { l1, .. } if *l1 == src))
            .count()
    };
    // 8 MiB with 64 KiB clusters fits one L2 table. A snapshot copies the L1 table only,
    // so it shares the L2 table until the active image writes again (then copied): s1 and
    // s2 each kept their own, s3 still shares the active one.
    let (s1, s2, s3, act) = (
        tables(L1Source::Snapshot(0)),
        tables(L1Source::Snapshot(1)),
        tables(L1Source::Snapshot(2)),
        tables(L1Source::Active),
    );
    assert_eq!((s1.len(), s2.len(), s3.len(), act.len()), (1, 1, 1, 1));
    assert!(s1 != s2 && s2 != act && s1 != act);
    assert_eq!(s3, act);
    assert_eq!(entries(L1Source::Snapshot(2)), entries(L1Source::Active));
    // s1: 300k of data (5 clusters) + one compressed; s2 adds 4M..4M+100k (2 clusters).
    assert_eq!(entries(L1Source::Snapshot(0)), 6);
    assert_eq!(entries(L1Source::Snapshot(1)), 8);
    // Active: cluster 0 discarded, one more compressed cluster.
    assert_eq!(entries(L1Source::Active), 8);
    let kinds: Vec<Structure> = all
        .iter()
        .filter_map(|v| match v {
            Visit::Structure { kind, .. } => Some(*kind),
            _ => None,
        })
        .collect();
    for k in [
        Structure::Header,
        Structure::L1Table(L1Source::Active),
        Structure::L1Table(L1Source::Snapshot(0)),
        Structure::L1Table(L1Source::Snapshot(1)),
        Structure::L1Table(L1Source::Snapshot(2)),
        Structure::RefcountTable,
        Structure::RefcountBlock(0),
        Structure::SnapshotTable,
    ] {
        assert_eq!(kinds.iter().filter(|&&x| x == k).count(), 1, "{k:?}");
    }
}

/// A damaged image: the walker reports each problem and goes on to the rest.
#[test]
fn walker_reports_every_finding_and_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = qemu_image(dir.path(), "cluster_size=65536");
    let m = meta_of(bytes.clone());
    let l2 = m.l1.entries[0] & super::entry::OFFSET_MASK;
    // Entry 1 unaligned, entry 2 far past the end of the file.
    let e1 = (l2 + 8) as usize;
    let e2 = (l2 + 16) as usize;
    bytes[e1..e1 + 8].copy_from_slice(&(super::entry::COPIED | 0x50200).to_be_bytes());
    bytes[e2..e2 + 8].copy_from_slice(&(super::entry::COPIED | (1u64 << 40)).to_be_bytes());
    let mut m = meta_of(bytes);
    let all = visits(&mut m);
    let findings: Vec<_> = all
        .iter()
        .filter_map(|v| match v {
            Visit::Finding(f) => Some(f.clone()),
            _ => None,
        })
        .collect();
    // The damaged table is the active one, which snapshot s3 shares: each problem is
    // reported once per L1 table that references it.
    assert_eq!(findings.len(), 4, "{findings:?}");
    assert_eq!(findings[..2], findings[2..], "{findings:?}");
    assert!(
        matches!(findings[0], Finding::DataUnaligned { offset: 0x50200 }),
        "{findings:?}"
    );
    assert!(
        matches!(findings[1], Finding::BeyondEnd { offset, .. } if offset == 1 << 40),
        "{findings:?}"
    );
    // The walk went on: the snapshots' tables were still visited.
    assert!(all.iter().any(|v| matches!(
        v,
        Visit::L2Table {
            l1: L1Source::Snapshot(1),
            ..
        }
    )));
    // A rebuild refuses the damaged image instead of guessing.
    assert!(m.count_references().is_err());
}

fn fresh(size: u64) -> (FaultStorage, Qcow2Image) {
    let fault = FaultStorage::in_memory();
    let opts = super::create::Qcow2CreateOptions {
        size,
        ..Default::default()
    };
    super::create::format_qcow2(Arc::new(fault.clone()), &opts).unwrap();
    let img = Qcow2Image::open(Arc::new(fault.clone()), false).unwrap();
    (fault, img)
}

/// Compressed data is packed byte by byte: the next extent starts where the last ended,
/// runs on into the following cluster when that one is the next free cluster, and every
/// cluster an extent touches holds one reference for it.
#[test]
fn allocator_packs_compressed_bytes_like_qemu() {
    let (_fault, img) = fresh(16 << 20);
    let mut m = img.meta();
    let cs = m.geo().cluster_size();
    let a = m.alloc_bytes(1000).unwrap();
    let b = m.alloc_bytes(2000).unwrap();
    assert!(m.geo().is_cluster_aligned(a));
    assert_eq!(b.0, a.0 + 1000);
    let c = m.alloc_bytes(cs - 2000).unwrap();
    assert_eq!(c.0, a.0 + 3000, "runs on into the next cluster");
    let first = m.geo().host_cluster(a);
    assert_eq!(m.refcount(first).unwrap(), 3);
    assert_eq!(m.refcount(first.plus(1)).unwrap(), 1);
    // A plain allocation in between breaks the run: the next extent starts afresh.
    let plain = m.alloc_clusters(ClusterCount(1)).unwrap();
    let d = m.alloc_bytes(cs - 100).unwrap();
    assert!(m.geo().is_cluster_aligned(d));
    assert!(m.geo().host_cluster(d) > plain);
}

/// Refcount ranges apply now or at the next flush; a deferred free is not reused before
/// that flush, and is afterwards.
#[test]
fn allocator_updates_ranges_now_or_at_flush() {
    let (_fault, img) = fresh(16 << 20);
    let mut m = img.meta();
    let first = m.alloc_clusters(ClusterCount(3)).unwrap();
    m.update_refcount(first, ClusterCount(3), 2, When::Now)
        .unwrap();
    for c in first.run(ClusterCount(3)) {
        assert_eq!(m.refcount(c).unwrap(), 3);
    }
    m.update_refcount(first, ClusterCount(3), -3, When::Deferred)
        .unwrap();
    assert_eq!(m.refcount(first).unwrap(), 3, "deferred until the flush");
    let other = m.alloc_clusters(ClusterCount(1)).unwrap();
    assert!(
        other > first.plus(2),
        "a cluster waiting to be freed is not reused"
    );
    m.flush().unwrap();
    assert_eq!(m.refcount(first).unwrap(), 0);
    let again = m.alloc_clusters(ClusterCount(3)).unwrap();
    assert_eq!(again, first, "freed clusters are reused after the flush");
    assert!(m
        .update_refcount(other, ClusterCount(1), -2, When::Now)
        .is_err());
}

/// Compressed writes through the engine read back identically with qemu-img, pass its
/// check, and are listed as compressed by its map.
#[test]
fn compressed_writes_read_back_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for kind in ["zlib", "zstd"] {
        let path = dir.path().join(format!("c-{kind}.qcow2"));
        let f = path.to_str().unwrap();
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("compression_type={kind}"),
                f,
                "1000k",
            ],
        );
        let mut model = vec![0u8; 1000 << 10];
        {
            let img = crate::lock::retry_while_locked(|| {
                super::tests::open_qcow2(&path, &crate::open::OpenOptions::default())
            })
            .unwrap();
            for (i, chunk) in model.chunks_mut(65536).enumerate() {
                let text = format!("cluster {i} says hello; ").repeat(4000);
                chunk.copy_from_slice(&text.as_bytes()[..chunk.len()]);
                if i % 3 == 1 {
                    // Incompressible: written plainly.
                    for (j, b) in chunk.iter_mut().enumerate() {
                        *b = (j as u32).wrapping_mul(2654435761).to_be_bytes()[0];
                    }
                }
                img.write_compressed(i as u64 * 65536, chunk).unwrap();
            }
            // Overwrite part of a compressed cluster: it is decompressed and rewritten.
            img.write_at(&[9u8; 100], 65536 * 2 + 10).unwrap();
            model[65536 * 2 + 10..65536 * 2 + 110].fill(9);
            assert!(img.write_compressed(100, &model[..65536]).is_err());
        }
        run("qemu-img", &["check", f]);
        let raw = dir.path().join("c.raw");
        run(
            "qemu-img",
            &["convert", "-O", "raw", f, raw.to_str().unwrap()],
        );
        assert!(
            std::fs::read(&raw).unwrap() == model,
            "{kind}: data differs"
        );
        let map = run("qemu-img", &["map", "--output=json", f]);
        assert!(map.contains("\"compressed\": true"), "{map}");
    }
}

/// Walking one L1 table visits what the whole walk visits for that table: the same L2
/// tables, and the same entries counted as often (shared tables once, with their uses).
#[test]
fn walking_one_table_matches_the_whole_walk() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = meta_of(qemu_image(dir.path(), "cluster_size=4096"));
    let all = visits(&mut m);
    let snaps = super::snapshot::read_table(&**m.storage(), &m.h).unwrap();
    let mut sources = vec![(L1Source::Active, m.h.l1_table_offset, m.l1.entries.clone())];
    for (i, s) in snaps.iter().enumerate() {
        let l1 = super::meta::read_u64_table(
            &**m.storage(),
            s.l1_table_offset,
            s.l1_size as usize,
            "l1",
        )
        .unwrap();
        sources.push((L1Source::Snapshot(i), s.l1_table_offset, l1));
    }
    for (src, off, table) in sources {
        let mut expected: HashMap<(u64, usize), u64> = HashMap::new();
        let mut tables = Vec::new();
        for v in &all {
            match v {
                Visit::Entry {
                    l1, table, index, ..
                } if *l1 == src => *expected.entry((table.0, *index)).or_default() += 1,
                Visit::L2Table { l1, offset, .. } if *l1 == src => tables.push(*offset),
                _ => {}
            }
        }
        let mut got: HashMap<(u64, usize), u64> = HashMap::new();
        let mut got_tables = Vec::new();
        m.walk_table(src, (off, &table), true, &mut |v| {
            match v {
                Visit::Entry {
                    table, index, uses, ..
                } => *got.entry((table.0, index)).or_default() += uses,
                Visit::L2Table { offset, .. } => got_tables.push(offset),
                Visit::Finding(f) => panic!("clean image: {f:?}"),
                Visit::Structure { .. } => {}
            }
            Flow::Continue
        })
        .unwrap();
        assert!(!expected.is_empty(), "{src:?} references data");
        assert_eq!(got, expected, "{src:?}");
        assert_eq!(got_tables, tables, "{src:?}");
    }
}

/// Snapshot operations count references with the walker and refuse metadata it finds
/// fault with, before changing a byte of the file.
#[test]
fn snapshot_operations_refuse_damaged_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = qemu_image(dir.path(), "cluster_size=65536");
    let l2 = meta_of(bytes.clone()).l1.entries[0] & super::entry::OFFSET_MASK;
    let e1 = (l2 + 8) as usize;
    bytes[e1..e1 + 8].copy_from_slice(&(super::entry::COPIED | 0x50200).to_be_bytes());
    let fault = FaultStorage::with_content(bytes.clone());
    let img = Qcow2Image::open(Arc::new(fault.clone()), false).unwrap();
    for (what, r) in [
        ("create", img.snapshot_create("new")),
        ("apply", img.snapshot_apply("s1")),
        ("delete", img.snapshot_delete("s3")),
    ] {
        let e = r.expect_err(what);
        assert!(
            matches!(e, crate::error::Error::Corrupt { .. }),
            "{what}: {e}"
        );
        assert!(e.to_string().contains("check -r all"), "{what}: {e}");
    }
    drop(img);
    assert!(fault.content().unwrap() == bytes, "the file is unchanged");
}

/// Loading a snapshot makes the image read as qemu-img reads that snapshot, by ID, name
/// or both, and leaves the file alone; an unknown one and a writable image are refused.
#[test]
fn loaded_snapshot_reads_like_qemu() {
    use super::snapshot_ops::SnapshotKey;
    let dir = tempfile::tempdir().unwrap();
    let bytes = qemu_image(dir.path(), "cluster_size=4096");
    let path = dir.path().join("img.qcow2");
    std::fs::write(&path, &bytes).unwrap();
    let f = path.to_str().unwrap();
    for (key, name) in [
        (SnapshotKey::IdOrName("s1".into()), "s1"),
        (SnapshotKey::IdOrName("2".into()), "s2"),
        (
            SnapshotKey::Exact {
                id: Some("3".into()),
                name: Some("s3".into()),
            },
            "s3",
        ),
    ] {
        let want = dir.path().join(format!("{name}.raw"));
        run(
            "qemu-img",
            &[
                "convert",
                "-l",
                name,
                "-O",
                "raw",
                f,
                want.to_str().unwrap(),
            ],
        );
        let img =
            Qcow2Image::open(Arc::new(FaultStorage::with_content(bytes.clone())), true).unwrap();
        img.load_snapshot(&key).unwrap();
        let want = std::fs::read(&want).unwrap();
        assert_eq!(img.size(), want.len() as u64);
        let mut got = vec![0u8; want.len()];
        img.read_at(&mut got, 0).unwrap();
        assert!(got == want, "{name} reads differently");
    }
    let img = Qcow2Image::open(Arc::new(FaultStorage::with_content(bytes.clone())), true).unwrap();
    let missing = SnapshotKey::Exact {
        id: Some("1".into()),
        name: Some("s2".into()),
    };
    assert!(matches!(
        img.load_snapshot(&missing),
        Err(crate::error::Error::NotFound(_))
    ));
    let rw = Qcow2Image::open(Arc::new(FaultStorage::with_content(bytes)), false).unwrap();
    assert!(rw
        .load_snapshot(&SnapshotKey::IdOrName("s1".into()))
        .is_err());
}

/// A storage that counts reads starting at or past its end.
struct PastEndReads {
    inner: FaultStorage,
    count: std::sync::atomic::AtomicU64,
}

impl crate::storage::Storage for PastEndReads {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset >= self.inner.len()? {
            self.count
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.allocate(offset, len)
    }
    fn next_data(&self, offset: u64) -> std::io::Result<Option<(u64, u64)>> {
        self.inner.next_data(offset)
    }
    fn allocated_size(&self) -> std::io::Result<u64> {
        self.inner.allocated_size()
    }
}

/// An L1 table naming thousands of L2 tables past the end of the file (a fuzzer's slow
/// input): each is reported, and walked as zeroes without a read of the file for it.
#[test]
fn walker_reads_no_l2_table_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("far.qcow2");
    let f = p.to_str().unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            f,
            "1G",
        ],
    );
    run("qemu-io", &["-c", "write -P 7 0 4k", f]);
    let mut bytes = std::fs::read(&p).unwrap();
    let h = super::read_header(&FaultStorage::with_content(bytes.clone())).unwrap();
    let l1 = h.l1_table_offset as usize;
    let far: usize = 400;
    for i in 1..=far {
        let e = (1u64 << 40) + (i as u64) * 4096;
        bytes[l1 + 8 * i..l1 + 8 * i + 8].copy_from_slice(&e.to_be_bytes());
    }
    let storage = Arc::new(PastEndReads {
        inner: FaultStorage::with_content(bytes),
        count: Default::default(),
    });
    let h = super::read_header(&*storage).unwrap();
    let mut m = Meta::load(storage.clone(), h, true).unwrap();
    let beyond = visits(&mut m)
        .iter()
        .filter(|v| matches!(v, Visit::Finding(Finding::BeyondEnd { .. })))
        .count();
    assert_eq!(beyond, far);
    assert_eq!(storage.count.load(std::sync::atomic::Ordering::Relaxed), 0);
}
