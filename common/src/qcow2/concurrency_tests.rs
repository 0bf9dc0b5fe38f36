//! Overlapping writers on one qcow2 image: no completed write may be lost, whatever the
//! interleaving of in-place and allocating writes to the same cluster and subcluster.

use std::io;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use super::create::{create_qcow2, Qcow2CreateOptions};
use super::Qcow2Image;
use crate::driver::BlockDriver;
use crate::storage::{FileStorage, Storage};

const CLUSTER: u64 = 65536;
const SUBCLUSTER: u64 = CLUSTER / 32;

/// Per cluster: subcluster 0 is data; thread A rewrites its first half in place with
/// 64-byte writes while thread B writes 2 KiB from the middle of subcluster 0 into the
/// unallocated subcluster 1 (an allocating write that reuses the cluster). A's bytes and
/// B's bytes never overlap, so both must survive. The two threads meet at every cluster.
fn overlapping_writers(extended_l2: bool, clusters: u64) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("race.qcow2");
    let opts = Qcow2CreateOptions {
        size: clusters * CLUSTER,
        extended_l2,
        ..Default::default()
    };
    crate::lock::retry_while_locked(|| create_qcow2(&path, &opts)).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let storage = Arc::new(SlowWrites(FileStorage::new(file)));
    let img = Arc::new(Qcow2Image::open(storage, false).unwrap());
    let base = vec![0x11u8; SUBCLUSTER as usize];
    for c in 0..clusters {
        img.write_at(&base, c * CLUSTER).unwrap();
    }
    let start = Arc::new(Barrier::new(2));
    let a = {
        let (img, start) = (img.clone(), start.clone());
        std::thread::spawn(move || {
            for c in 0..clusters {
                start.wait();
                for k in 0..16u64 {
                    let byte = [0xa0 | k as u8; 64];
                    img.write_at(&byte, c * CLUSTER + k * 64).unwrap();
                }
            }
        })
    };
    let b = {
        let (img, start) = (img.clone(), start.clone());
        std::thread::spawn(move || {
            let data = vec![0xbbu8; 2048];
            for c in 0..clusters {
                start.wait();
                img.write_at(&data, c * CLUSTER + 1024).unwrap();
            }
        })
    };
    a.join().unwrap();
    b.join().unwrap();
    let mut lost = Vec::new();
    let mut got = vec![0u8; 4096];
    for c in 0..clusters {
        img.read_at(&mut got, c * CLUSTER).unwrap();
        let want_a = (0..1024).map(|i| 0xa0 | (i / 64) as u8);
        let want: Vec<u8> = want_a.chain(std::iter::repeat_n(0xbb, 2048)).collect();
        if got[..3072] != want[..] {
            lost.push(format!("cluster {c}"));
        }
    }
    lost
}

/// Storage whose small writes start late and whose 4 KiB writes start later still, so that
/// an in-place write looked up just before an allocating write planned lands between that
/// write's reads and its write-back: the interleaving that loses data if the allocating
/// write copies a unit another writer may hold.
struct SlowWrites(FileStorage);

impl Storage for SlowWrites {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match buf.len() {
            64 => std::thread::sleep(Duration::from_micros(300)),
            4096 => std::thread::sleep(Duration::from_micros(1500)),
            _ => {}
        }
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.punch_hole(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.allocate(offset, len)
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        self.0.next_data(offset)
    }
    fn allocated_size(&self) -> io::Result<u64> {
        self.0.allocated_size()
    }
}

#[test]
fn overlapping_writers_lose_nothing_with_extended_l2() {
    let lost = overlapping_writers(true, 200);
    assert!(lost.is_empty(), "lost writes in {} clusters", lost.len());
}

#[test]
fn overlapping_writers_lose_nothing_with_standard_l2() {
    let lost = overlapping_writers(false, 200);
    assert!(lost.is_empty(), "lost writes in {} clusters", lost.len());
}
