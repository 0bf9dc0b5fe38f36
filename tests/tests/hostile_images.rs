//! Hostile images: the engine must answer a corrupt or malicious qcow2 file with an `Err`
//! (one line), never a panic, a hang or a huge allocation, and a read-write session on a
//! damaged image must never put guest data into cluster 0 or into the image's metadata.
//!
//! Two parts:
//! - a seeded, reproducible mutation fuzzer (`fuzz_*`): small valid images made by qemu-img
//!   and qemu-io with various options, a few random mutations of their metadata (header
//!   fields, extensions, L1/L2 tables, refcount table and blocks, snapshot table and L1
//!   tables, backing file name, truncation), then the engine opens each read-only and
//!   read-write, reads, walks block_status, writes, zeroes, discards, flushes and drops it;
//! - targeted cases (`target_*`) for hostile structures random mutation rarely builds.
//!
//! Where an image's metadata lives, and the patching, come from
//! `integration_tests::qcow2_layout`.
//!
//! Every case runs in a child process (this test binary, re-executed with `HOSTILE_MODE`
//! set) in the tests library's sandbox (`integration_tests::sandbox`: a 1 GiB address
//! space) with a deadline per case: a hang is killed and reported with the operation that
//! hung, an allocation failure or abort is reported with the child's stderr, a panic with
//! its message and location. The child also resets and reads its peak RSS
//! (`/proc/self/clear_refs`, `VmHWM`) around every case.
//!
//! Replay: the seed is printed; `TEST_SEED=<seed> HOSTILE_CASE=<n> cargo test -p
//! integration-tests --test hostile_images <fuzz test name> -- --nocapture` reruns one case,
//! and every failing case's mutated image is saved under `target/tmp/hostile_images/`.

use common::open::{open_image, Format, Image, OpenOptions};
use common::qcow2::header::Header;
use integration_tests::qcow2_layout::{
    be32, be64, get_be, put_be, put_refcount, round_up, Field, Layout, Patch, BACKING_FILE_OFFSET,
    BACKING_FILE_SIZE, CLUSTER_BITS, COMPRESSED, COPIED, EXT_BACKING_FORMAT, EXT_BITMAPS,
    EXT_DATA_FILE, EXT_END, EXT_FEATURE_NAMES, EXT_FULL_DISK_ENCRYPTION, HEADER_FIELDS,
    INCOMPATIBLE_FEATURES, INCOMPAT_DIRTY, NB_SNAPSHOTS, OFFSET_MASK, SNAPSHOT_FIELDS,
    SNAPSHOT_L1_SIZE, ZERO,
};
use integration_tests::sandbox::{Event, Running, Sandbox};
use integration_tests::{qemu_img, qemu_io_cmds, Rng};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Guest data written by the tests: found anywhere in metadata, it is a clobber.
const TAG: &[u8; 8] = b"HOSTILE!";
/// A fuzz case (all its operations) must finish within this time.
const CASE_TIMEOUT: Duration = Duration::from_secs(5);
/// A targeted case must finish within this time.
const TARGET_TIMEOUT: Duration = Duration::from_secs(10);
/// The child processes: a 1 GiB address space, and this time to start and report their
/// first case (each case then gets its own deadline).
const CHILD_LIMITS: Sandbox = Sandbox::new(1 << 30, Duration::from_secs(30));
/// Peak RSS one case may reach.
const HWM_LIMIT_KIB: u64 = 384 << 10;
/// How much a read-write session may grow the file (it writes well under 2 MiB).
const GROWTH_LIMIT: u64 = 256 << 20;
/// The test that the child processes run.
const CHILD_TEST: &str = "zz_child_process_entry";

fn has_tag(b: &[u8]) -> bool {
    b.windows(8).any(|w| w == TAG)
}
fn tag_buf(len: usize) -> Vec<u8> {
    TAG.iter().copied().cycle().take(len).collect()
}

// ------------------------------------------------------------------------------------------
// Base images

fn create(dir: &Path, file: &str, opts: &str, size: &str, backing: Option<(&str, &str)>) {
    let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    if !opts.is_empty() {
        args.push("-o".into());
        args.push(opts.into());
    }
    if let Some((b, f)) = backing {
        args.extend(["-b".into(), b.into(), "-F".into(), f.into()]);
    }
    args.push(dir.join(file).to_str().unwrap().into());
    args.push(size.into());
    qemu_img(&args).ok();
}

fn io(dir: &Path, file: &str, fmt: &str, cmds: &[&str]) {
    let cmds: Vec<String> = cmds.iter().map(|s| s.to_string()).collect();
    qemu_io_cmds(&dir.join(file), fmt, &cmds);
}

fn snapshot(dir: &Path, file: &str, name: &str) {
    qemu_img(&["snapshot", "-c", name, dir.join(file).to_str().unwrap()]).ok();
}

const W64: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 200k 10k",
    "write -z 1M 64k",
    "write -c -P 0x33 2M 64k",
    "write -P 0x44 4092k 4k",
];

/// Build the base image `name` in `dir`; returns its file name.
fn build_base(dir: &Path, name: &str) -> &'static str {
    match name {
        "v3-64k" => {
            create(dir, "v3-64k.qcow2", "cluster_size=65536", "4M", None);
            io(dir, "v3-64k.qcow2", "qcow2", W64);
            "v3-64k.qcow2"
        }
        "v2-64k" => {
            create(dir, "v2-64k.qcow2", "compat=0.10", "4M", None);
            io(
                dir,
                "v2-64k.qcow2",
                "qcow2",
                &[
                    "write -P 0x11 0 64k",
                    "write -P 0x22 200k 10k",
                    "write -c -P 0x33 2M 64k",
                ],
            );
            "v2-64k.qcow2"
        }
        "lazy" => {
            create(dir, "lazy.qcow2", "lazy_refcounts=on", "4M", None);
            io(dir, "lazy.qcow2", "qcow2", W64);
            "lazy.qcow2"
        }
        "zstd" => {
            create(dir, "zstd.qcow2", "compression_type=zstd", "4M", None);
            io(
                dir,
                "zstd.qcow2",
                "qcow2",
                &[
                    "write -c -P 0x11 0 64k",
                    "write -c -P 0x22 64k 64k",
                    "write -P 0x33 1M 10k",
                ],
            );
            "zstd.qcow2"
        }
        "c512-rc1" => {
            create(
                dir,
                "c512.qcow2",
                "cluster_size=512,refcount_bits=1",
                "1M",
                None,
            );
            io(
                dir,
                "c512.qcow2",
                "qcow2",
                &[
                    "write -P 0x11 0 4k",
                    "write -P 0x22 300k 1000",
                    "write -z 600k 2k",
                    "write -c -P 0x33 512k 512",
                    "write -P 0x44 1020k 4k",
                ],
            );
            "c512.qcow2"
        }
        "c4k-rc64" => {
            create(
                dir,
                "c4k.qcow2",
                "cluster_size=4096,refcount_bits=64",
                "4M",
                None,
            );
            io(
                dir,
                "c4k.qcow2",
                "qcow2",
                &[
                    "write -P 0x11 0 16k",
                    "write -P 0x22 200k 10k",
                    "write -z 1M 8k",
                    "write -c -P 0x33 2M 4k",
                    "write -P 0x44 4092k 4k",
                ],
            );
            "c4k.qcow2"
        }
        "c2m-rc8" => {
            create(
                dir,
                "c2m.qcow2",
                "cluster_size=2M,refcount_bits=8",
                "8M",
                None,
            );
            io(
                dir,
                "c2m.qcow2",
                "qcow2",
                // No compressed cluster here: reading one 2 MiB compressed cluster in small
                // chunks decompresses it per chunk (see target_compressed_2m_cluster_small_reads)
                // and would make every case of this base slow.
                &[
                    "write -P 0x11 0 64k",
                    "write -P 0x22 5M 4k",
                    "write -P 0x33 2M 8k",
                ],
            );
            "c2m.qcow2"
        }
        "extl2" => {
            create(
                dir,
                "extl2.qcow2",
                "extended_l2=on,cluster_size=65536",
                "4M",
                None,
            );
            io(
                dir,
                "extl2.qcow2",
                "qcow2",
                &[
                    "write -P 0x11 0 2k",
                    "write -P 0x22 70k 5k",
                    "write -z 1M 64k",
                    "write -c -P 0x33 2M 64k",
                    "write -P 0x44 4092k 4k",
                ],
            );
            "extl2.qcow2"
        }
        "snaps" => {
            create(dir, "snaps.qcow2", "", "4M", None);
            io(dir, "snaps.qcow2", "qcow2", &W64[..2]);
            snapshot(dir, "snaps.qcow2", "s1");
            io(
                dir,
                "snaps.qcow2",
                "qcow2",
                &["write -P 0x55 0 4k", "write -c 2M 64k"],
            );
            snapshot(dir, "snaps.qcow2", "second");
            io(dir, "snaps.qcow2", "qcow2", &["write -P 0x66 3M 64k"]);
            "snaps.qcow2"
        }
        "snaps-4k-v2" => {
            create(
                dir,
                "snaps4k.qcow2",
                "compat=0.10,cluster_size=4096",
                "2M",
                None,
            );
            io(
                dir,
                "snaps4k.qcow2",
                "qcow2",
                &["write -P 0x11 0 8k", "write -P 0x22 1M 4k"],
            );
            snapshot(dir, "snaps4k.qcow2", "s1");
            io(dir, "snaps4k.qcow2", "qcow2", &["write -P 0x33 4k 4k"]);
            "snaps4k.qcow2"
        }
        "backing-q" => {
            create(dir, "bk-base.qcow2", "", "4M", None);
            io(
                dir,
                "bk-base.qcow2",
                "qcow2",
                &["write -P 0x55 0 1M", "write -c -P 0x56 2M 64k"],
            );
            create(
                dir,
                "bk-top.qcow2",
                "",
                "4M",
                Some(("bk-base.qcow2", "qcow2")),
            );
            io(
                dir,
                "bk-top.qcow2",
                "qcow2",
                &[
                    "write -P 0x66 64k 64k",
                    "write -P 0x77 1M 4k",
                    "write -z 2M 64k",
                ],
            );
            "bk-top.qcow2"
        }
        "backing-raw" => {
            fs::write(dir.join("bk-raw.img"), vec![0x5a; 3 << 20]).unwrap();
            create(
                dir,
                "bk-rtop.qcow2",
                "cluster_size=4096",
                "4M",
                Some(("bk-raw.img", "raw")),
            );
            io(
                dir,
                "bk-rtop.qcow2",
                "qcow2",
                &["write -P 0x66 0 6k", "write -P 0x77 1M 4k"],
            );
            "bk-rtop.qcow2"
        }
        other => panic!("unknown base image {other}"),
    }
}

struct Base {
    name: String,
    bytes: Vec<u8>,
    lay: Layout,
}

fn load_base(dir: &Path, name: &str, file: &str) -> Base {
    let bytes = fs::read(dir.join(file)).unwrap();
    let lay = Layout::parse(&bytes);
    Base {
        name: name.to_string(),
        bytes,
        lay,
    }
}

// ------------------------------------------------------------------------------------------
// Mutations

struct Mutator<'a> {
    lay: &'a Layout,
    bytes: Vec<u8>,
    rng: Rng,
    log: Vec<String>,
    truncate_to: Option<u64>,
}

impl Mutator<'_> {
    fn mask(width: u64) -> u64 {
        if width >= 8 {
            u64::MAX
        } else {
            (1u64 << (8 * width)) - 1
        }
    }

    fn target(&mut self) -> (u64, String) {
        let t = self.lay.targets();
        let (o, n) = self.rng.pick(&t).clone();
        (o, n)
    }

    /// An interesting value for a field of `width` bytes that held `old`.
    fn value(&mut self, width: u64, old: u64) -> (u64, String) {
        let cs = self.lay.cluster_size;
        let bits = 8 * width;
        let (v, why) = match self.rng.below(21) {
            0 => (0, "0".to_string()),
            1 => (1, "1".into()),
            2 => (u64::MAX, "all ones".into()),
            3 => (Self::mask(width) >> 1, "signed max".into()),
            4 => (1 << (bits - 1), "sign bit".into()),
            5 => {
                let b = self.rng.below(bits);
                (old ^ (1 << b), format!("flip bit {b}"))
            }
            6 => (old.wrapping_add(1), "+1".into()),
            7 => (old.wrapping_sub(1), "-1".into()),
            8 => (old.wrapping_mul(2), "*2".into()),
            9 => (self.lay.file_len, "file length".into()),
            10 => (round_up(self.lay.file_len, cs) + cs, "past EOF".into()),
            11 => {
                let (o, n) = self.target();
                (o, format!("-> {n}"))
            }
            12 => {
                let (o, n) = self.target();
                (o + 8, format!("-> {n} + 8 (unaligned)"))
            }
            13 => (self.rng.next_u64(), "random".into()),
            14 => (cs, "cluster size".into()),
            15 => (cs - 1, "cluster size - 1".into()),
            16 => (old << 8, "<< 8".into()),
            17 => (old.wrapping_add(cs), "+cluster".into()),
            18 => {
                let b = self.rng.below(bits);
                (1u64 << b, format!("1 << {b}"))
            }
            19 => (1 << 40, "1 TiB".into()),
            _ => (old.wrapping_add(512), "+512".into()),
        };
        (v & Self::mask(width), why)
    }

    fn field_special(&mut self, f: Field) -> Option<(u64, String)> {
        let pick = |rng: &mut Rng, vals: &[u64]| *rng.pick(vals);
        let v = match f.name {
            "version" => pick(&mut self.rng, &[0, 1, 2, 3, 4, u32::MAX as u64]),
            "cluster_bits" => pick(&mut self.rng, &[0, 8, 9, 12, 16, 21, 22, 31, 32, 63, 64]),
            "refcount_order" => pick(&mut self.rng, &[0, 1, 3, 5, 6, 7, 8, 32, u32::MAX as u64]),
            "header_length" => pick(
                &mut self.rng,
                &[
                    0,
                    72,
                    103,
                    104,
                    105,
                    112,
                    self.lay.cluster_size - 1,
                    self.lay.cluster_size,
                    self.lay.cluster_size + 8,
                ],
            ),
            "nb_snapshots" => pick(
                &mut self.rng,
                &[1, 2, 1000, 65535, 65536, 65537, u32::MAX as u64],
            ),
            "l1_size" => pick(
                &mut self.rng,
                &[
                    0,
                    1,
                    2,
                    0x3fff_ffff,
                    4 << 20,
                    (4 << 20) + 1,
                    0x7fff_ffff,
                    u32::MAX as u64,
                ],
            ),
            "size" => pick(
                &mut self.rng,
                &[
                    0,
                    1,
                    511,
                    1 << 30,
                    1 << 40,
                    1 << 50,
                    1 << 61,
                    (1 << 63) - 1,
                    u64::MAX,
                ],
            ),
            "refcount_table_clusters" => pick(
                &mut self.rng,
                &[0, 1, 2, 128, 129, 0x10000, u32::MAX as u64],
            ),
            "incompatible_features" | "compatible_features" | "autoclear_features" => {
                let old = be64(&self.bytes, f.offset);
                let b = *self.rng.pick(&[0u64, 1, 2, 3, 4, 5, 6, 40, 63]);
                old | (1 << b)
            }
            "compression_type" => pick(&mut self.rng, &[0, 1, 2, 0xff]),
            "backing_file_size" => pick(&mut self.rng, &[0, 1, 1023, 1024, 65536, u32::MAX as u64]),
            _ => return None,
        };
        Some((v, "special".into()))
    }

    fn mutate_header(&mut self) {
        let fields: Vec<_> = HEADER_FIELDS
            .iter()
            .filter(|f| self.lay.version >= 3 || f.offset < INCOMPATIBLE_FEATURES.offset)
            .collect();
        let &&f = self.rng.pick(&fields);
        let Field {
            offset: off,
            width,
            name,
        } = f;
        let old = get_be(&self.bytes, off, width);
        let (v, why) = if self.rng.chance(1, 2) {
            self.field_special(f)
                .unwrap_or_else(|| self.value(width, old))
        } else {
            self.value(width, old)
        };
        put_be(&mut self.bytes, off, width, v);
        self.log
            .push(format!("header.{name}: {old:#x} -> {v:#x} ({why})"));
    }

    fn mutate_ext(&mut self) {
        if self.lay.ext_headers.is_empty() || self.rng.chance(1, 4) {
            let (start, end) = (
                self.lay.header_len,
                self.lay.ext_end.max(self.lay.header_len + 8),
            );
            let at = self.rng.range(start, end - 1);
            let v = self.rng.next_u64() as u8;
            put_be(&mut self.bytes, at, 1, v as u64);
            self.log.push(format!("extension byte @{at:#x} := {v:#x}"));
            return;
        }
        let at = *self.rng.pick(&self.lay.ext_headers);
        if self.rng.chance(1, 2) {
            let old = be32(&self.bytes, at);
            let v = *self.rng.pick(&[
                EXT_END,
                EXT_BACKING_FORMAT,
                EXT_FEATURE_NAMES,
                EXT_BITMAPS,
                EXT_FULL_DISK_ENCRYPTION,
                EXT_DATA_FILE,
                0x1234_5678,
            ]);
            put_be(&mut self.bytes, at, 4, v);
            self.log
                .push(format!("extension type @{at:#x}: {old:#x} -> {v:#x}"));
        } else {
            let old = be32(&self.bytes, at + 4);
            let cs = self.lay.cluster_size;
            let v = *self.rng.pick(&[
                0,
                1,
                7,
                old + 8,
                old.wrapping_sub(1),
                cs,
                cs - at,
                u32::MAX as u64,
                0x8000_0000,
            ]);
            put_be(&mut self.bytes, at + 4, 4, v & 0xffff_ffff);
            self.log.push(format!(
                "extension length @{at:#x}: {old:#x} -> {:#x}",
                v & 0xffff_ffff
            ));
        }
    }

    /// An interesting value for a table entry (L1, L2, refcount table) that held `old`.
    fn entry_value(&mut self, old: u64, bitmap: bool) -> (u64, String) {
        let cs = self.lay.cluster_size;
        let cb = self.lay.cluster_bits as u64;
        if bitmap {
            let flip = 1u64 << self.rng.below(64);
            let random = self.rng.next_u64();
            let v = *self.rng.pick(&[
                0,
                u64::MAX,
                0xffff_ffff,
                0xffff_ffff_0000_0000,
                1 | 1 << 32,
                old | 1 << 32,
                old ^ flip,
                random,
            ]);
            return (v, "bitmap".into());
        }
        let eof = round_up(self.lay.file_len, cs);
        let sector_shift = 62 - (cb - 8);
        let sector_mask = ((1u64 << (cb - 8)) - 1) << sector_shift;
        match self.rng.below(20) {
            0 => (0, "0".into()),
            1 => {
                let b = self.rng.below(64);
                (old ^ (1 << b), format!("flip bit {b}"))
            }
            2 | 3 => {
                let (o, n) = self.target();
                (o | COPIED, format!("-> {n} |COPIED"))
            }
            4 => {
                let (o, n) = self.target();
                (o, format!("-> {n}"))
            }
            5 => (COPIED, "offset 0 |COPIED".into()),
            6 => (
                (eof + cs * self.rng.below(4)) | COPIED,
                "past EOF |COPIED".into(),
            ),
            7 => ((1 << 40) | COPIED, "1 TiB |COPIED".into()),
            8 => (
                (OFFSET_MASK & !(cs - 1)) | COPIED,
                "max offset |COPIED".into(),
            ),
            9 => (old.wrapping_add(512), "+512 (unaligned?)".into()),
            10 => (old.wrapping_add(8), "+8 (unaligned)".into()),
            11 => (self.rng.next_u64(), "random".into()),
            12 => (u64::MAX, "all ones".into()),
            13 => (
                COMPRESSED | (self.rng.next_u64() & ((1 << 62) - 1)),
                "compressed, random descriptor".into(),
            ),
            14 => (
                COMPRESSED | sector_mask | self.rng.below(cs),
                "compressed in cluster 0, max sectors".into(),
            ),
            15 => (
                COMPRESSED | sector_mask | (old & ((1 << sector_shift) - 1)),
                "compressed, max sector count".into(),
            ),
            16 => (old | ZERO, "|ZERO".into()),
            17 => (old ^ COPIED, "^COPIED".into()),
            18 => {
                let (o, n) = self.target();
                (o | COPIED | ZERO, format!("-> {n} |COPIED|ZERO"))
            }
            _ => (0x7fff_ffff_ffff_ffff, "i64 max".into()),
        }
    }

    fn mutate_table(&mut self, what: &str, off: u64, len: u64, ext_l2: bool) {
        let n = (len / 8).max(1);
        let nonzero: Vec<u64> = (0..n)
            .filter(|&i| be64(&self.bytes, off + 8 * i) != 0)
            .collect();
        let i = if !nonzero.is_empty() && self.rng.chance(7, 10) {
            *self.rng.pick(&nonzero)
        } else {
            self.rng.below(n.min(64))
        };
        let at = off + 8 * i;
        let old = be64(&self.bytes, at);
        let bitmap = ext_l2 && i % 2 == 1;
        // Sometimes aim at the whole table (every entry alike).
        if what == "reftable" && self.rng.chance(1, 8) {
            let first = be64(&self.bytes, off);
            for k in 0..n {
                put_be(&mut self.bytes, off + 8 * k, 8, first);
            }
            self.log
                .push(format!("{what}@{off:#x}: every entry := {first:#x}"));
            return;
        }
        let (v, why) = self.entry_value(old, bitmap);
        if put_be(&mut self.bytes, at, 8, v) {
            self.log.push(format!(
                "{what}@{off:#x}[{i}] (@{at:#x}): {old:#x} -> {v:#x} ({why})"
            ));
        }
    }

    fn mutate_refblock(&mut self, off: u64) {
        let cs = self.lay.cluster_size;
        let order = self.lay.refcount_order.min(6);
        let bits = 1u64 << order;
        match self.rng.below(5) {
            0 => {
                if (off + cs) as usize <= self.bytes.len() {
                    self.bytes[off as usize..(off + cs) as usize].fill(0);
                }
                self.log
                    .push(format!("refblock@{off:#x}: all refcounts 0 (all free)"));
            }
            1 => {
                if (off + cs) as usize <= self.bytes.len() {
                    self.bytes[off as usize..(off + cs) as usize].fill(0xff);
                }
                self.log
                    .push(format!("refblock@{off:#x}: all refcounts max"));
            }
            2 if off == self.lay.rbs[0] => {
                // The refcount of one metadata cluster (the first block covers them all in
                // these small images).
                let (t, name) = self.target();
                let c = t >> self.lay.cluster_bits;
                if c * bits / 8 >= cs {
                    return;
                }
                let v = *self.rng.pick(&[0u64, 2, u64::MAX]);
                let v = if bits == 64 { v } else { v & ((1 << bits) - 1) };
                put_refcount(&mut self.bytes, off, order, c, v);
                self.log
                    .push(format!("refcount of cluster {c} ({name}) := {v:#x}"));
            }
            3 => {
                let used = (self.lay.file_len.div_ceil(cs) * bits)
                    .div_ceil(8)
                    .clamp(1, cs);
                let at = off + self.rng.below(used);
                let random = self.rng.next_u64() & 0xff;
                let v = *self.rng.pick(&[0u64, 0xff, 1, random]);
                put_be(&mut self.bytes, at, 1, v);
                self.log.push(format!("refblock byte @{at:#x} := {v:#x}"));
            }
            _ => {
                let at = off + 8 * self.rng.below(cs / 8);
                let v = self.rng.next_u64();
                put_be(&mut self.bytes, at, 8, v);
                self.log.push(format!("refblock word @{at:#x} := {v:#x}"));
            }
        }
    }

    fn mutate_snapshot_table(&mut self) {
        let entry = *self.rng.pick(&self.lay.snap_entries);
        let &Field {
            offset: fo,
            width: w,
            name,
        } = self.rng.pick(SNAPSHOT_FIELDS);
        let old = get_be(&self.bytes, entry + fo, w);
        let (v, why) = if name == "l1_size" && self.rng.chance(1, 2) {
            let v = *self
                .rng
                .pick(&[0u64, 0xffff_ffff, 4 << 20, 0x10_0000, 1 << 31]);
            (v, "special".to_string())
        } else {
            self.value(w, old)
        };
        put_be(&mut self.bytes, entry + fo, w, v);
        self.log.push(format!(
            "snapshot entry @{entry:#x}.{name}: {old:#x} -> {v:#x} ({why})"
        ));
    }

    fn mutate_backing_name(&mut self) {
        let cs = self.lay.cluster_size;
        let name: &[u8] = match self.rng.below(4) {
            0 | 1 => b"case.qcow2",
            2 => b"no-such-file.qcow2",
            _ => b"/dev/null",
        };
        let at = match self.lay.backing {
            Some((o, _)) => o,
            None => self.lay.ext_end,
        };
        if at + name.len() as u64 > cs.min(self.bytes.len() as u64) {
            return;
        }
        self.bytes[at as usize..at as usize + name.len()].copy_from_slice(name);
        put_be(&mut self.bytes, 8, 8, at);
        put_be(&mut self.bytes, 16, 4, name.len() as u64);
        self.log.push(format!(
            "backing file name @{at:#x} := {:?}",
            String::from_utf8_lossy(name)
        ));
    }

    fn one(&mut self) {
        let lay = self.lay;
        let mut choices: Vec<(u64, u8)> = vec![(30, 0), (5, 1), (15, 2), (20, 3), (10, 4), (10, 5)];
        if lay.snap_table.is_some() {
            choices.push((8, 6));
            choices.push((5, 7));
        }
        choices.push((3, 8)); // backing name
        choices.push((3, 9)); // dirty bit
        choices.push((3, 10)); // truncate
        let total: u64 = choices.iter().map(|c| c.0).sum();
        let mut r = self.rng.below(total);
        let mut kind = 0;
        for &(w, k) in &choices {
            if r < w {
                kind = k;
                break;
            }
            r -= w;
        }
        match kind {
            0 => self.mutate_header(),
            1 => self.mutate_ext(),
            2 => self.mutate_table("L1", lay.l1.0, lay.l1.1, false),
            3 if !lay.l2s.is_empty() => {
                let o = *self.rng.pick(&lay.l2s);
                self.mutate_table("L2", o, lay.cluster_size, lay.extended_l2)
            }
            4 => {
                let used = lay.rt.1.min(64 * 8);
                self.mutate_table("reftable", lay.rt.0, used, false)
            }
            5 if !lay.rbs.is_empty() => {
                let o = *self.rng.pick(&lay.rbs);
                self.mutate_refblock(o)
            }
            6 => self.mutate_snapshot_table(),
            7 if !lay.snap_l1s.is_empty() => {
                let (o, n) = *self.rng.pick(&lay.snap_l1s);
                self.mutate_table("snapshot L1", o, n, false)
            }
            8 => self.mutate_backing_name(),
            9 if lay.version >= 3 => {
                let at = INCOMPATIBLE_FEATURES.offset;
                let old = be64(&self.bytes, at);
                put_be(&mut self.bytes, at, 8, old | INCOMPAT_DIRTY);
                self.log.push("incompatible_features |= DIRTY".into());
            }
            10 => {
                let len = self.bytes.len() as u64;
                let to = if self.rng.chance(1, 2) {
                    round_up(self.rng.range(1, len - 1), lay.cluster_size).min(len - 1)
                } else {
                    self.rng.range(lay.cluster_size.min(len - 1), len - 1)
                };
                self.truncate_to = Some(self.truncate_to.map_or(to, |t: u64| t.min(to)));
                self.log.push(format!("truncate file to {to:#x}"));
            }
            _ => self.mutate_header(),
        }
    }
}

fn case_rng(seed: u64, case: u64, salt: u64) -> Rng {
    let mut r = Rng::new(seed ^ case.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt);
    r.next_u64();
    r
}

/// The mutated image of fuzz case `case`: which base, the bytes, the mutation list.
fn make_case(bases: &[Base], seed: u64, case: u64) -> (usize, Vec<u8>, Vec<String>) {
    let bi = (case % bases.len() as u64) as usize;
    let base = &bases[bi];
    let mut m = Mutator {
        lay: &base.lay,
        bytes: base.bytes.clone(),
        rng: case_rng(seed, case, 0x6d75_7461),
        log: Vec::new(),
        truncate_to: None,
    };
    let n = match m.rng.below(10) {
        0..=4 => 1,
        5..=7 => 2,
        _ => m.rng.range(3, 5),
    };
    for _ in 0..n {
        m.one();
    }
    if let Some(t) = m.truncate_to {
        m.bytes.truncate(t as usize);
    }
    (bi, m.bytes, m.log)
}

// ------------------------------------------------------------------------------------------
// The child process: running cases

static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "<non-string panic>".into());
        let loc = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        *LAST_PANIC.lock().unwrap_or_else(|p| p.into_inner()) =
            format!("{} at {loc}", msg.replace('\n', " | "));
    }));
}

fn take_panic() -> String {
    std::mem::take(&mut *LAST_PANIC.lock().unwrap_or_else(|p| p.into_inner()))
}

fn reset_hwm() {
    let _ = fs::write("/proc/self/clear_refs", "5");
}

fn vm_hwm_kib() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// One line on stdout for the parent (stdout is line buffered, so it arrives at once).
fn say(line: String) {
    println!("@@{line}");
}

struct Ctx {
    case: u64,
    step: String,
    notes: Vec<String>,
    /// (step, message)
    failures: Vec<(String, String)>,
}

impl Ctx {
    fn step(&mut self, what: &str) {
        self.step = what.to_string();
        say(format!("STEP {} {what}", self.case));
    }
    fn fail(&mut self, msg: String) {
        self.failures.push((self.step.clone(), msg));
    }
    /// Check an engine error: it must be one line of text.
    fn err(&mut self, what: &str, e: &common::Error) {
        let s = e.to_string();
        if s.contains('\n') || s.trim().is_empty() {
            self.fail(format!("{what}: error message is not one line: {s:?}"));
        }
        if self.notes.len() < 12 {
            self.notes.push(format!("{what}: Err({s})"));
        }
    }
    fn res<T>(&mut self, what: &str, r: common::Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.err(what, &e);
                None
            }
        }
    }
}

fn open(path: &Path, read_only: bool) -> common::Result<Image> {
    open_image(
        path,
        &OpenOptions {
            read_only,
            ..Default::default()
        },
    )
}

/// Read-only exercise: reads in odd chunks, block_status, snapshot table.
fn ro_session(cx: &mut Ctx, img: &Image, rng: &mut Rng) {
    let d = img.driver();
    let size = d.size();
    let lim = size.min(4 << 20);
    let chunk = *rng.pick(&[511usize, 4097, 65537, 333_331]);
    cx.step(&format!("read size={size:#x} lim={lim:#x} chunk={chunk}"));
    let mut buf = vec![0u8; chunk];
    let mut pos = 0;
    let mut errors = 0;
    while pos < lim && errors < 16 {
        let n = (lim - pos).min(chunk as u64) as usize;
        if let Err(e) = d.read_at(&mut buf[..n], pos) {
            cx.err("read", &e);
            errors += 1;
        }
        pos += n as u64;
    }
    if size > lim {
        let n = size.min(65536);
        cx.step(&format!("read tail off={:#x} len={n:#x}", size - n));
        let mut t = vec![0u8; n as usize];
        let r = d.read_at(&mut t, size - n);
        cx.res("read tail", r);
    }
    let end = size.min(64 << 20);
    cx.step(&format!("block_status walk end={end:#x}"));
    let mut pos = 0;
    let mut calls = 0;
    while pos < end && calls < 2048 {
        calls += 1;
        match d.block_status(pos, end - pos) {
            Ok(s) => {
                if s.len == 0 || s.len > end - pos {
                    cx.fail(format!(
                        "block_status({pos:#x}, {:#x}) returned len {:#x}",
                        end - pos,
                        s.len
                    ));
                    break;
                }
                pos += s.len;
            }
            Err(e) => {
                cx.err("block_status", &e);
                pos = (pos + 65536) & !65535;
            }
        }
    }
    if size > 0 {
        cx.step("block_status last byte");
        let r = d.block_status(size - 1, 1);
        cx.res("block_status last", r);
    }
    if let Image::Qcow2(q) = img {
        cx.step("snapshots");
        let r = q.snapshots();
        cx.res("snapshots", r);
        let _ = q.header();
    }
}

/// Read-write exercise: writes (tagged data), write_zeroes, discards, flushes.
fn rw_session(cx: &mut Ctx, img: &Image, rng: &mut Rng, cs: u64) {
    let d = img.driver();
    let size = d.size();
    let lim = size.min(6 << 20);
    if lim == 0 {
        cx.step("flush (empty)");
        let r = d.flush();
        cx.res("flush", r);
        return;
    }
    let n = size.min(4096);
    cx.step(&format!("write off=0 len={n:#x}"));
    let r = d.write_at(&tag_buf(n as usize), 0);
    cx.res("write@0", r);
    for _ in 0..6 {
        let op = rng.below(20);
        let mut off = rng.below(lim);
        let mut len = match rng.below(4) {
            0 => rng.range(1, 4096),
            1 => {
                off -= off % cs;
                cs * rng.range(1, 3)
            }
            2 => rng.range(1, 300_000),
            _ => {
                off = size - size.min(rng.range(1, 70_000));
                size - off
            }
        };
        len = len.min(size - off).min(1 << 20);
        if len == 0 {
            continue;
        }
        match op {
            0..=9 => {
                cx.step(&format!("write off={off:#x} len={len:#x}"));
                let r = d.write_at(&tag_buf(len as usize), off);
                cx.res("write", r);
            }
            10..=13 => {
                let unmap = rng.chance(1, 2);
                cx.step(&format!(
                    "write_zeroes off={off:#x} len={len:#x} unmap={unmap}"
                ));
                let r = d.write_zeroes(off, len, unmap);
                cx.res("write_zeroes", r);
            }
            14..=16 => {
                cx.step(&format!("discard off={off:#x} len={len:#x}"));
                let r = d.discard(off, len);
                cx.res("discard", r);
            }
            _ => {
                cx.step("flush");
                let r = d.flush();
                cx.res("flush", r);
            }
        }
    }
    cx.step("read back 0..64k");
    let mut b = vec![0u8; size.min(65536) as usize];
    let r = d.read_at(&mut b, 0);
    cx.res("read back", r);
    cx.step("flush");
    let r = d.flush();
    cx.res("final flush", r);
}

/// After a read-write session: cluster 0 holds no guest data and, if it changed, is still a
/// valid header; the file did not grow hugely.
fn check_after_rw(path: &Path, before: &[u8]) -> Result<(), String> {
    let f = fs::File::open(path).map_err(|e| format!("reopen: {e}"))?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let cb = be32(before, CLUSTER_BITS.offset);
    let cs = if (9..=21).contains(&cb) {
        1u64 << cb
    } else {
        65536
    };
    let mut now = vec![0u8; cs.min(len) as usize];
    f.read_exact_at(&mut now, 0).map_err(|e| e.to_string())?;
    if has_tag(&now) {
        return Err("guest data written into cluster 0 (the header cluster)".into());
    }
    let was = &before[..(cs as usize).min(before.len())];
    if now.as_slice() != was {
        if let Err(e) = Header::parse(&now) {
            let first_diff = now.iter().zip(was).position(|(a, b)| a != b);
            return Err(format!(
                "header cluster changed (first difference at {first_diff:?}, file now \
                 {len:#x} bytes) and no longer parses: {e}"
            ));
        }
    }
    check_growth(path, before)
}

fn check_growth(path: &Path, before: &[u8]) -> Result<(), String> {
    let len = fs::metadata(path).map_err(|e| e.to_string())?.len();
    let limit = before.len() as u64 + GROWTH_LIMIT;
    if len > limit {
        return Err(format!(
            "file grew from {:#x} to {len:#x} bytes in a session that wrote < 2 MiB",
            before.len()
        ));
    }
    Ok(())
}

/// All operations of one fuzz case. Returns a short summary (which opens succeeded).
fn exercise(cx: &mut Ctx, dir: &Path, bytes: &[u8], cs: u64, seed: u64) -> String {
    let path = dir.join("case.qcow2");
    fs::write(&path, bytes).expect("write case image");
    let mut rng = case_rng(seed, cx.case, 0x006f_7073);
    let mut summary = String::new();
    cx.step("open read-only");
    match open(&path, true) {
        Ok(img) => {
            summary.push_str("ro=ok ");
            ro_session(cx, &img, &mut rng);
            cx.step("drop read-only");
            drop(img);
        }
        Err(e) => {
            summary.push_str("ro=err ");
            cx.err("open ro", &e);
        }
    }
    cx.step("open read-write");
    match open(&path, false) {
        Ok(img) => {
            // A mutated version field makes the file probe as raw: then cluster 0 is guest
            // data (see target_probed_raw_write_sector0 for what that allows).
            let raw = matches!(img, Image::Raw(_));
            summary.push_str(if raw { "rw=ok(raw)" } else { "rw=ok" });
            rw_session(cx, &img, &mut rng, cs);
            cx.step("drop read-write");
            drop(img);
            cx.step("check header and file size");
            let r = if raw {
                check_growth(&path, bytes)
            } else {
                check_after_rw(&path, bytes)
            };
            if let Err(e) = r {
                cx.fail(e);
            }
            cx.step("reopen read-only after the session");
            if let Ok(img) = open(&path, true) {
                let d = img.driver();
                let mut b = vec![0u8; d.size().min(1 << 20) as usize];
                let r = d.read_at(&mut b, 0);
                cx.res("reread", r);
            }
        }
        Err(e) => {
            summary.push_str("rw=err");
            cx.err("open rw", &e);
        }
    }
    summary
}

fn child_fuzz(dir: &Path) {
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    let seed: u64 = env("HOSTILE_SEED").parse().unwrap();
    let from: u64 = env("HOSTILE_FROM").parse().unwrap();
    let to: u64 = env("HOSTILE_TO").parse().unwrap();
    let bases: Vec<Base> = env("HOSTILE_BASES")
        .split(',')
        .map(|nf| {
            let (n, f) = nf.split_once('=').unwrap();
            load_base(dir, n, f)
        })
        .collect();
    for case in from..to {
        say(format!("CASE {case}"));
        let (bi, bytes, _) = make_case(&bases, seed, case);
        let mut cx = Ctx {
            case,
            step: String::new(),
            notes: Vec::new(),
            failures: Vec::new(),
        };
        reset_hwm();
        let start = Instant::now();
        let cs = bases[bi].lay.cluster_size;
        let r = catch_unwind(AssertUnwindSafe(|| {
            exercise(&mut cx, dir, &bytes, cs, seed)
        }));
        let summary = match r {
            Ok(s) => s,
            Err(_) => {
                cx.fail(format!("PANIC: {}", take_panic()));
                "panicked".into()
            }
        };
        let hwm = vm_hwm_kib();
        if hwm > HWM_LIMIT_KIB {
            cx.step = "(whole case)".into();
            cx.fail(format!("peak RSS {} MiB during the case", hwm >> 10));
        }
        for (step, f) in &cx.failures {
            say(format!("FAIL {case} {step}\t{f}"));
        }
        say(format!(
            "DONE {case} {} {summary}",
            start.elapsed().as_millis()
        ));
    }
}

fn child_target(dir: &Path) {
    let name = std::env::var("HOSTILE_TARGET").unwrap();
    let t = TARGETS
        .iter()
        .find(|t| t.0 == name)
        .unwrap_or_else(|| panic!("no target {name}"));
    say("CASE 0".into());
    let r = catch_unwind(AssertUnwindSafe(|| (t.2)(dir)));
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => say(format!("FAIL 0 {}", e.replace('\n', " | "))),
        Err(_) => say(format!("FAIL 0 PANIC: {}", take_panic())),
    }
    say("DONE 0 0 target".into());
}

/// Not a test of its own: the entry point of the child processes (a no-op otherwise).
#[test]
fn zz_child_process_entry() {
    let Ok(mode) = std::env::var("HOSTILE_MODE") else {
        return;
    };
    install_panic_hook();
    let dir = PathBuf::from(std::env::var("HOSTILE_DIR").unwrap());
    match mode.as_str() {
        "fuzz" => child_fuzz(&dir),
        "target" => child_target(&dir),
        m => panic!("unknown HOSTILE_MODE {m}"),
    }
}

// ------------------------------------------------------------------------------------------
// The parent: spawning children, deadlines, collecting failures

/// A child process running cases `HOSTILE_FROM..HOSTILE_TO` (and whatever `envs` add)
/// in `dir`, under [`CHILD_LIMITS`].
fn spawn_child(dir: &Path, envs: &[(&str, String)]) -> Running {
    // Through /proc: it still works if a concurrent build replaces the test binary.
    let exe = PathBuf::from(format!("/proc/{}/exe", std::process::id()));
    let mut cmd = Command::new(exe);
    cmd.args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env("HOSTILE_DIR", dir)
        .env("RUST_BACKTRACE", "0");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    CHILD_LIMITS.spawn(&mut cmd)
}

#[derive(Debug, Clone)]
struct Failure {
    case: u64,
    step: String,
    what: String,
}

#[derive(Default)]
struct RunStats {
    done: u64,
    summaries: BTreeMap<String, u64>,
    slowest: (u64, u64),
}

/// Run cases `from..to` in children (restarting after a crash or hang); collect failures.
fn run_children(
    dir: &Path,
    envs: &[(&str, String)],
    from: u64,
    to: u64,
    timeout: Duration,
) -> (Vec<Failure>, RunStats) {
    let mut failures = Vec::new();
    let mut stats = RunStats::default();
    let mut next = from;
    while next < to {
        let mut e: Vec<(&str, String)> = envs.to_vec();
        e.push(("HOSTILE_FROM", next.to_string()));
        e.push(("HOSTILE_TO", to.to_string()));
        let mut child = spawn_child(dir, &e);
        let mut current: Option<u64> = None;
        let mut step = String::from("(start)");
        let mut last_msg = Instant::now();
        let mut cpu = (child.cpu_ticks(), Instant::now());
        loop {
            let line = match child.next_line(Duration::from_millis(250)) {
                Event::Line(l) => l,
                ev @ (Event::Quiet | Event::Expired) => {
                    // A child that has sent nothing for a second, used no CPU meanwhile and
                    // has no runnable thread (so it is not merely starved on a loaded
                    // machine) is blocked: deadlocked, or stuck in a blocking open. No need
                    // to wait longer.
                    let now_ticks = child.cpu_ticks();
                    let mut deadlocked = false;
                    if now_ticks != cpu.0 || child.any_runnable() {
                        cpu = (now_ticks, Instant::now());
                    } else if current.is_some()
                        && last_msg.elapsed() > Duration::from_secs(1)
                        && cpu.1.elapsed() > Duration::from_secs(1)
                    {
                        deadlocked = true;
                    }
                    if matches!(ev, Event::Quiet) && !deadlocked {
                        continue;
                    }
                    let (_, stderr) = child.finish();
                    match current {
                        Some(c) => {
                            failures.push(Failure {
                                case: c,
                                step: step.clone(),
                                what: if deadlocked {
                                    "HANG (blocked, no CPU use: deadlock or blocking open); \
                                     killed during this step"
                                        .to_string()
                                } else {
                                    format!(
                                        "HANG (busy): no progress for {timeout:?}; killed \
                                         during this step"
                                    )
                                },
                            });
                            next = c + 1;
                        }
                        None => panic!(
                            "child process did not start in {:?}: {stderr}",
                            CHILD_LIMITS.timeout
                        ),
                    }
                    break;
                }
                Event::Closed => {
                    let (status, err) = child.finish();
                    if let Some(c) = current {
                        let tail: Vec<&str> = err
                            .lines()
                            .filter(|l| !l.trim().is_empty())
                            .rev()
                            .take(4)
                            .collect();
                        let tail: Vec<&str> = tail.into_iter().rev().collect();
                        failures.push(Failure {
                            case: c,
                            step: step.clone(),
                            what: format!(
                                "CRASH: child died ({status}); stderr: {}",
                                tail.join(" | ")
                            ),
                        });
                        next = c + 1;
                    } else if next < to {
                        panic!(
                            "child exited ({status}) before finishing cases {next}..{to}: {err}"
                        );
                    }
                    break;
                }
            };
            // libtest may print "test name ... " before the first line on the same line.
            let Some(i) = line.find("@@") else { continue };
            last_msg = Instant::now();
            let mut it = line[i + 2..].splitn(3, ' ');
            let (kind, num, rest) = (
                it.next().unwrap_or(""),
                it.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0),
                it.next().unwrap_or("").to_string(),
            );
            match kind {
                "CASE" => {
                    current = Some(num);
                    step = "(start)".into();
                    child.extend_deadline(timeout);
                }
                "STEP" => step = rest,
                "FAIL" => {
                    let (st, what) = match rest.split_once('\t') {
                        Some((s, w)) => (s.to_string(), w.to_string()),
                        None => (step.clone(), rest),
                    };
                    failures.push(Failure {
                        case: num,
                        step: st,
                        what,
                    })
                }
                "DONE" => {
                    current = None;
                    next = num + 1;
                    stats.done += 1;
                    let mut p = rest.splitn(2, ' ');
                    let ms: u64 = p.next().and_then(|m| m.parse().ok()).unwrap_or(0);
                    if ms > stats.slowest.1 {
                        stats.slowest = (num, ms);
                    }
                    *stats
                        .summaries
                        .entry(p.next().unwrap_or("").to_string())
                        .or_default() += 1;
                }
                _ => {}
            }
        }
    }
    (failures, stats)
}

fn work_dir(tag: &str) -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let prefix = format!("hostile-{tag}-");
    let mut b = tempfile::Builder::new();
    b.prefix(&prefix);
    if shm.is_dir() {
        if let Ok(d) = b.tempdir_in(shm) {
            return d;
        }
    }
    b.tempdir().expect("tempdir")
}

fn saved_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hostile_images");
    let _ = fs::create_dir_all(&d);
    d
}

/// Short signature of a failure for grouping: the operation, and the message up to its
/// first number (or the panic location).
fn signature(f: &Failure) -> String {
    let op = f.step.split_whitespace().next().unwrap_or("").to_string();
    let what = match f.what.find(" at ") {
        Some(i) if f.what.starts_with("PANIC") => format!("PANIC at {}", &f.what[i + 4..]),
        _ => f
            .what
            .split(|c: char| c.is_ascii_digit() || c == '(')
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
    };
    format!("[{op}] {what}")
}

fn fuzz(group: &str, base_names: &[&str], iterations: u64, default_seed: u64) {
    let dir = work_dir(group);
    let started = Instant::now();
    let mut bases = Vec::new();
    let mut spec = Vec::new();
    for n in base_names {
        let f = build_base(dir.path(), n);
        spec.push(format!("{n}={f}"));
        bases.push(load_base(dir.path(), n, f));
    }
    let seed = integration_tests::seed(default_seed);
    let (from, to) = match std::env::var("HOSTILE_CASE")
        .ok()
        .and_then(|c| c.parse().ok())
    {
        Some(c) => (c, c + 1),
        None => (
            0,
            std::env::var("HOSTILE_ITERATIONS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(iterations),
        ),
    };
    if to - from == 1 {
        let (bi, _, log) = make_case(&bases, seed, from);
        eprintln!("[{group}] case {from} on {}: {log:#?}", bases[bi].name);
    }
    let envs = [
        ("HOSTILE_MODE", "fuzz".to_string()),
        ("HOSTILE_SEED", seed.to_string()),
        ("HOSTILE_BASES", spec.join(",")),
    ];
    let built = started.elapsed();
    let (failures, stats) = run_children(dir.path(), &envs, from, to, CASE_TIMEOUT);
    eprintln!(
        "[{group}] seed {seed}: {} cases in {:?} (bases built in {built:?}); opens: {:?}; \
         slowest case {} ({} ms); {} failures",
        stats.done,
        started.elapsed(),
        stats.summaries,
        stats.slowest.0,
        stats.slowest.1,
        failures.len()
    );
    if failures.is_empty() {
        return;
    }
    let mut groups: BTreeMap<String, Vec<&Failure>> = BTreeMap::new();
    for f in &failures {
        groups.entry(signature(f)).or_default().push(f);
    }
    let mut report = format!(
        "[{group}] {} failures in {} kinds (seed {seed}; replay one case with \
         TEST_SEED={seed} HOSTILE_CASE=<n>):\n",
        failures.len(),
        groups.len()
    );
    for (sig, fs_) in &groups {
        report.push_str(&format!("\n== {sig}  ({} cases)\n", fs_.len()));
        for f in fs_.iter().take(3) {
            let (bi, bytes, log) = make_case(&bases, seed, f.case);
            let saved = saved_dir().join(format!("{group}-{seed}-case{}.qcow2", f.case));
            let _ = fs::write(&saved, &bytes);
            report.push_str(&format!(
                "  case {} (base {}), during `{}`:\n    {}\n    mutations:\n",
                f.case, bases[bi].name, f.step, f.what
            ));
            for m in &log {
                report.push_str(&format!("      - {m}\n"));
            }
            report.push_str(&format!("    image: {}\n", saved.display()));
        }
    }
    panic!("{report}");
}

// Three groups so that libtest runs them in parallel; 3600 cases in all.

#[test]
fn fuzz_default_clusters() {
    fuzz(
        "default",
        &["v3-64k", "v2-64k", "lazy", "zstd"],
        1200,
        0x4859_0001,
    );
}

#[test]
fn fuzz_small_clusters() {
    fuzz(
        "small",
        &["c512-rc1", "c4k-rc64", "snaps-4k-v2"],
        1200,
        0x4859_0002,
    );
}

#[test]
fn fuzz_features() {
    fuzz(
        "features",
        &["extl2", "snaps", "backing-q", "backing-raw", "c2m-rc8"],
        1200,
        0x4859_0003,
    );
}

// ------------------------------------------------------------------------------------------
// Targeted cases

type Setup = fn(&Path);
type Run = fn(&Path) -> Result<(), String>;

/// Run target `name`: its setup here (qemu-img, patches), its run in a child with a deadline.
fn target(name: &str) {
    let t = TARGETS
        .iter()
        .find(|t| t.0 == name)
        .unwrap_or_else(|| panic!("no target {name}"));
    let dir = work_dir(name);
    (t.1)(dir.path());
    let envs = [
        ("HOSTILE_MODE", "target".to_string()),
        ("HOSTILE_TARGET", name.to_string()),
    ];
    let (failures, _) = run_children(dir.path(), &envs, 0, 1, TARGET_TIMEOUT);
    let notes = fs::read_to_string(dir.path().join("notes.txt")).unwrap_or_default();
    if std::env::var_os("HOSTILE_KEEP").is_some() {
        eprintln!("[{name}] kept {}", dir.path().display());
        std::mem::forget(dir);
    }
    if !notes.is_empty() {
        eprintln!("[{name}] notes:\n{notes}");
    }
    if !failures.is_empty() {
        let mut s = format!("[{name}] failed:\n");
        for f in &failures {
            s.push_str(&format!("  during `{}`: {}\n", f.step, f.what));
        }
        if !notes.is_empty() {
            s.push_str(&format!("  notes:\n{notes}"));
        }
        panic!("{s}");
    }
}

/// A note from a target's child, shown by the parent.
fn note(dir: &Path, msg: String) {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("notes.txt"))
        .unwrap();
    let _ = writeln!(f, "    {msg}");
}

fn tstep(what: &str) {
    say(format!("STEP 0 {what}"));
}

fn p(dir: &Path, f: &str) -> PathBuf {
    dir.join(f)
}

/// The standard 64 KiB-cluster image of the targets: data at 0..64k, 200k, a zero cluster
/// at 1M, a compressed cluster at 2M, data at the end.
fn std_image(dir: &Path, file: &str, opts: &str) -> Layout {
    create(dir, file, opts, "4M", None);
    io(dir, file, "qcow2", W64);
    Layout::of(&p(dir, file))
}

/// Save what an image reads as (through qemu-img) so the child can compare later.
fn save_guest(dir: &Path, file: &str) {
    let raw = integration_tests::qemu_read_all(&p(dir, file), Some("qcow2"), dir);
    fs::write(p(dir, &format!("{file}.guest")), raw).unwrap();
}

/// Clobber check: no metadata cluster of the pre-session layout holds guest data (TAG),
/// and the header cluster is unchanged or still parses.
fn check_clobber(path: &Path, lay: &Layout, before: &[u8]) -> Result<(), String> {
    check_after_rw(path, before)?;
    let now = fs::read(path).map_err(|e| e.to_string())?;
    for (off, len, what) in lay.metadata_ranges() {
        let end = ((off + len) as usize).min(now.len());
        if (off as usize) < end && has_tag(&now[off as usize..end]) {
            return Err(format!(
                "guest data was written into the {what} (at {off:#x}, {len:#x} bytes)"
            ));
        }
    }
    Ok(())
}

/// Open read-write and run `ops` ("w off len", "z off len", "d off len", "f"), recording
/// each result as a note. Returns whether the open succeeded.
fn rw_ops(dir: &Path, path: &Path, ops: &[(&str, u64, u64)]) -> bool {
    rw_ops_acked(dir, path, ops).is_some()
}

/// Like [`rw_ops`]; returns the writes ("w") that returned Ok, or None if the open failed.
fn rw_ops_acked(dir: &Path, path: &Path, ops: &[(&str, u64, u64)]) -> Option<Vec<(u64, u64)>> {
    tstep("open read-write");
    let img = match open(path, false) {
        Ok(i) => i,
        Err(e) => {
            note(dir, format!("open rw: Err({e})"));
            return None;
        }
    };
    let mut acked = Vec::new();
    let d = img.driver();
    for &(op, off, len) in ops {
        tstep(&format!("{op} off={off:#x} len={len:#x}"));
        let r = match op {
            "w" => d.write_at(&tag_buf(len as usize), off),
            "z" => d.write_zeroes(off, len, true),
            "d" => d.discard(off, len),
            "r" => {
                let mut b = vec![0u8; len as usize];
                d.read_at(&mut b, off)
            }
            _ => d.flush(),
        };
        if op == "w" && r.is_ok() {
            acked.push((off, len));
        }
        if op == "d" || op == "z" {
            acked.retain(|&(o, l)| o + l <= off || off + len <= o);
        }
        note(
            dir,
            format!(
                "{op} {off:#x}+{len:#x}: {}",
                r.map_or_else(|e| format!("Err({e})"), |_| "Ok".into())
            ),
        );
    }
    tstep("drop read-write");
    drop(img);
    Some(acked)
}

/// Compare what the image reads as now (through the engine) with what qemu-img read before
/// the session, outside the byte ranges `except`. Returns the first mismatch.
fn guest_mismatch(dir: &Path, path: &Path, file: &str, except: &[(u64, u64)]) -> Option<String> {
    let before = fs::read(p(dir, &format!("{file}.guest"))).ok()?;
    tstep("reopen read-only and compare guest data");
    let img = match open(path, true) {
        Ok(i) => i,
        Err(e) => return Some(format!("image no longer opens: {e}")),
    };
    let d = img.driver();
    let cs = 65536u64;
    let mut buf = vec![0u8; cs as usize];
    let mut pos = 0;
    while pos < before.len() as u64 {
        let n = (before.len() as u64 - pos).min(cs);
        let skip = except.iter().any(|&(o, l)| pos < o + l && o < pos + n);
        if !skip {
            match d.read_at(&mut buf[..n as usize], pos) {
                Ok(()) if buf[..n as usize] == before[pos as usize..(pos + n) as usize] => {}
                Ok(()) => return Some(format!("guest data at {pos:#x} changed")),
                Err(e) => return Some(format!("guest data at {pos:#x} no longer reads: {e}")),
            }
        }
        pos += n;
    }
    None
}

fn file_bytes(dir: &Path, f: &str) -> Vec<u8> {
    fs::read(p(dir, f)).unwrap()
}

/// The common run of the "pointer into metadata" targets: a few writes, then the clobber
/// check against the layout of the unpatched image.
fn run_clobber(dir: &Path, ops: &[(&str, u64, u64)]) -> Result<(), String> {
    let path = p(dir, "t.qcow2");
    let before = file_bytes(dir, "t.qcow2");
    let lay = Layout::parse(&file_bytes(dir, "t.qcow2.orig"));
    let acked = rw_ops_acked(dir, &path, ops).unwrap_or_default();
    tstep("clobber check");
    check_clobber(&path, &lay, &before)?;
    // Writes that returned Ok must read back (if the image still opens and reads).
    tstep("read back acknowledged writes");
    if let Ok(img) = open(&path, true) {
        for (off, len) in acked {
            let mut b = vec![0u8; len as usize];
            if img.driver().read_at(&mut b, off).is_ok() && b != tag_buf(len as usize) {
                return Err(format!(
                    "the write at guest {off:#x} (+{len:#x}) returned Ok but the data did not \
                     survive the session (a stale metadata copy or aliasing overwrote it)"
                ));
            }
        }
    }
    Ok(())
}

fn setup_std(dir: &Path, opts: &str) -> Layout {
    let lay = std_image(dir, "t.qcow2", opts);
    fs::copy(p(dir, "t.qcow2"), p(dir, "t.qcow2.orig")).unwrap();
    save_guest(dir, "t.qcow2");
    lay
}

const WRITE_FIRST: &[(&str, u64, u64)] = &[
    ("w", 0, 4096),
    ("w", 65536, 65536),
    ("w", 512, 512),
    ("f", 0, 0),
];

// --- L1 entry pointing at cluster 0 (offset 0 with COPIED), at the refcount table, at itself

fn s_l1_offset0(dir: &Path) {
    let lay = setup_std(dir, "");
    Patch(&p(dir, "t.qcow2")).put_u64(lay.l1.0, COPIED);
}
fn s_l1_reftable(dir: &Path) {
    let lay = setup_std(dir, "");
    Patch(&p(dir, "t.qcow2")).put_u64(lay.l1.0, lay.rt.0 | COPIED);
}
fn s_l1_self(dir: &Path) {
    let lay = setup_std(dir, "");
    Patch(&p(dir, "t.qcow2")).put_u64(lay.l1.0, lay.l1.0 | COPIED);
}
fn s_l1_refblock(dir: &Path) {
    let lay = setup_std(dir, "");
    Patch(&p(dir, "t.qcow2")).put_u64(lay.l1.0, lay.rbs[0] | COPIED);
}
fn r_write_first(dir: &Path) -> Result<(), String> {
    run_clobber(dir, WRITE_FIRST)
}
/// For L1 aliasing: also the aliased table's first entry must be what it was (the engine
/// must not store an L2 entry into the refcount table or the L1 table).
fn r_l1_alias(dir: &Path) -> Result<(), String> {
    let orig = file_bytes(dir, "t.qcow2.orig");
    let lay = Layout::parse(&orig);
    let r = run_clobber(dir, WRITE_FIRST);
    let now = file_bytes(dir, "t.qcow2");
    let hdr_now = Layout::parse(&now);
    // The refcount table may legitimately move; compare where the header points now.
    if hdr_now.rt.0 == lay.rt.0 && be64(&now, lay.rt.0) != be64(&orig, lay.rt.0) {
        return Err(format!(
            "refcount table entry 0 changed from {:#x} to {:#x}: an L2 entry was stored \
             into the refcount table",
            be64(&orig, lay.rt.0),
            be64(&now, lay.rt.0)
        ));
    }
    // No L1 entry may end up pointing at a cluster of guest data (an L2 entry stored into
    // the L1 table itself makes the data cluster an "L2 table").
    for i in 0..hdr_now.l1.1 / 8 {
        let e = be64(&now, hdr_now.l1.0 + 8 * i) & OFFSET_MASK;
        if e != 0 && (e as usize) < now.len() {
            let c = &now[e as usize..(e as usize + lay.cluster_size as usize).min(now.len())];
            if has_tag(c) {
                return Err(format!(
                    "L1[{i}] on disk now points at {e:#x}, a cluster holding guest data: an L2 \
                     entry was stored into the L1 table"
                ));
            }
        }
    }
    for (i, &rb) in lay.rbs.iter().enumerate() {
        if be64(&now, rb) != be64(&orig, rb) && be64(&now, rb) & COPIED != 0 {
            return Err(format!(
                "refcount block {i} at {rb:#x} now starts with {:#x}: an L2 entry was stored \
                 into a refcount block",
                be64(&now, rb)
            ));
        }
    }
    r
}

// --- L2 entries: data cluster 0, pointing at metadata

fn s_l2_offset0(dir: &Path) {
    let lay = setup_std(dir, "");
    let t = p(dir, "t.qcow2");
    Patch(&t).put_u64(lay.l2_entry(0, 0), COPIED);
    Patch(&t).put_u64(lay.l2_entry(0, 1), COPIED | ZERO);
}
fn s_l2_to_l1(dir: &Path) {
    let lay = setup_std(dir, "");
    Patch(&p(dir, "t.qcow2")).put_u64(lay.l2_entry(0, 0), lay.l1.0 | COPIED);
}
fn s_l2_to_reftable(dir: &Path) {
    let lay = setup_std(dir, "");
    Patch(&p(dir, "t.qcow2")).put_u64(lay.l2_entry(0, 0), lay.rt.0 | COPIED);
}
fn s_l2_to_refblock(dir: &Path) {
    let lay = setup_std(dir, "");
    Patch(&p(dir, "t.qcow2")).put_u64(lay.l2_entry(0, 0), lay.rbs[0] | COPIED);
}
fn s_l2_to_itself(dir: &Path) {
    let lay = setup_std(dir, "");
    Patch(&p(dir, "t.qcow2")).put_u64(lay.l2_entry(0, 0), lay.l2s[0] | COPIED);
}
fn r_write_cluster0(dir: &Path) -> Result<(), String> {
    run_clobber(dir, &[("w", 0, 4096), ("w", 8192, 100), ("f", 0, 0)])
}

// --- Compressed descriptors: offset inside cluster 0; huge sector count

fn s_compressed_in_header(dir: &Path) {
    let lay = setup_std(dir, "");
    // Guest cluster 1 (64k..128k) is unallocated in the standard image.
    Patch(&p(dir, "t.qcow2")).put_u64(lay.l2_entry(0, 1), COMPRESSED | 0x100);
}
fn r_compressed_in_header_discard(dir: &Path) -> Result<(), String> {
    run_clobber(dir, &[("r", 65536, 4096), ("d", 65536, 65536), ("f", 0, 0)])
}
fn r_compressed_in_header_overwrite(dir: &Path) -> Result<(), String> {
    run_clobber(dir, &[("w", 65536, 65536), ("f", 0, 0)])
}
fn r_compressed_in_header_zero(dir: &Path) -> Result<(), String> {
    run_clobber(dir, &[("z", 65536, 65536), ("f", 0, 0)])
}

fn s_compressed_huge_sectors(dir: &Path) {
    let lay = setup_std(dir, "");
    let t = p(dir, "t.qcow2");
    let at = lay.l2_entry(0, 32); // guest 2M: the compressed cluster
    let old = be64(&file_bytes(dir, "t.qcow2"), at);
    assert!(
        old & COMPRESSED != 0,
        "guest 2M is not compressed: {old:#x}"
    );
    let shift = 62 - (16 - 8);
    Patch(&t).put_u64(at, old | (0xff << shift));
}
fn r_compressed_huge_sectors(dir: &Path) -> Result<(), String> {
    let path = p(dir, "t.qcow2");
    let before = file_bytes(dir, "t.qcow2");
    let lay = Layout::parse(&file_bytes(dir, "t.qcow2.orig"));
    tstep("read the hostile compressed cluster");
    if let Ok(img) = open(&path, true) {
        let mut b = vec![0u8; 65536];
        let r = img.driver().read_at(&mut b, 2 << 20);
        note(dir, format!("read 2M: {:?}", r.map_err(|e| e.to_string())));
    }
    rw_ops(dir, &path, &[("d", 2 << 20, 65536), ("f", 0, 0)]);
    tstep("clobber check");
    check_clobber(&path, &lay, &before)?;
    if let Some(m) = guest_mismatch(dir, &path, "t.qcow2", &[(2 << 20, 65536)]) {
        return Err(format!(
            "discarding one compressed cluster whose descriptor claims 256 sectors damaged \
             other data: {m}"
        ));
    }
    Ok(())
}

// --- Extended L2 with both the allocated and the zero bit of a subcluster

fn s_extl2_both_bits(dir: &Path) {
    let lay = setup_std(dir, "extended_l2=on");
    // The subcluster bitmap of guest cluster 0: every zero bit, and allocated subcluster 0.
    let at = lay.l2_entry(0, 0) + 8;
    let old = be64(&file_bytes(dir, "t.qcow2"), at);
    Patch(&p(dir, "t.qcow2")).put_u64(at, old | 0xffff_ffff_0000_0000 | 1);
}
fn r_extl2_both_bits(dir: &Path) -> Result<(), String> {
    let path = p(dir, "t.qcow2");
    tstep("open read-only, read and block_status");
    if let Ok(img) = open(&path, true) {
        let d = img.driver();
        let mut b = vec![0u8; 8192];
        note(
            dir,
            format!(
                "read: {:?}",
                d.read_at(&mut b, 0).map_err(|e| e.to_string())
            ),
        );
        note(
            dir,
            format!(
                "block_status: {:?}",
                d.block_status(0, 1 << 20).map_err(|e| e.to_string())
            ),
        );
    }
    run_clobber(
        dir,
        &[
            ("w", 1024, 1024),
            ("z", 0, 2048),
            ("d", 0, 65536),
            ("w", 0, 65536),
            ("f", 0, 0),
        ],
    )
}

// --- Refcounts that lie

fn s_refblock_all_free(dir: &Path) {
    let lay = setup_std(dir, "");
    Patch(&p(dir, "t.qcow2")).put_bytes(lay.rbs[0], &vec![0u8; lay.cluster_size as usize]);
}
fn r_refblock_all_free(dir: &Path) -> Result<(), String> {
    // Allocating writes (guest 3M is unallocated; guest 64k too), a new L2 table (none
    // covers guest 4M.. in a 4M image, so stay below), and compressed-cluster rewrite.
    let r = run_clobber(
        dir,
        &[
            ("w", 3 << 20, 65536),
            ("w", 65536, 4096),
            ("w", 2 << 20, 4096),
            ("f", 0, 0),
        ],
    );
    let path = p(dir, "t.qcow2");
    if let Some(m) = guest_mismatch(
        dir,
        &path,
        "t.qcow2",
        &[(65536, 65536), (2 << 20, 65536), (3 << 20, 65536)],
    ) {
        note(
            dir,
            format!("OBSERVATION: other guest data did not survive (allocator reused a live data cluster?): {m}"),
        );
    }
    r
}

fn s_reftable_zero(dir: &Path) {
    let lay = setup_std(dir, "");
    Patch(&p(dir, "t.qcow2")).put_u64(lay.rt.0, 0);
}
fn s_reftable_to_l1(dir: &Path) {
    let lay = setup_std(dir, "");
    Patch(&p(dir, "t.qcow2")).put_u64(lay.rt.0, lay.l1.0);
}
fn s_reftable_to_self(dir: &Path) {
    let lay = setup_std(dir, "");
    Patch(&p(dir, "t.qcow2")).put_u64(lay.rt.0, lay.rt.0);
}
fn s_reftable_to_l2(dir: &Path) {
    let lay = setup_std(dir, "");
    Patch(&p(dir, "t.qcow2")).put_u64(lay.rt.0, lay.l2s[0]);
}
fn r_reftable_alias(dir: &Path) -> Result<(), String> {
    let orig = file_bytes(dir, "t.qcow2.orig");
    let lay = Layout::parse(&orig);
    let r = run_clobber(
        dir,
        &[
            ("w", 3 << 20, 65536),
            ("w", 65536, 4096),
            ("d", 0, 65536),
            ("f", 0, 0),
        ],
    );
    let now = file_bytes(dir, "t.qcow2");
    // The table the refcount table entry points at must not have been rewritten as a
    // refcount block (compare its first 64 bytes, the L1/L2 entries in use).
    for (off, what) in [(lay.l1.0, "L1 table"), (lay.l2s[0], "L2 table")] {
        let a = &orig[off as usize..off as usize + 64];
        let b = &now[off as usize..(off as usize + 64).min(now.len())];
        if a != b {
            let l1_moved = Layout::parse(&now).l1.0 != lay.l1.0;
            if !(what == "L1 table" && l1_moved) {
                note(
                    dir,
                    format!("{what} at {off:#x} first 64 bytes before {a:02x?}"),
                );
                note(
                    dir,
                    format!("{what} at {off:#x} first 64 bytes after  {b:02x?}"),
                );
                return Err(format!(
                    "the {what} at {off:#x} was modified by refcount updates through a refcount \
                     table entry that points at it"
                ));
            }
        }
    }
    r
}

fn s_refblocks_all_used(dir: &Path) {
    let lay = setup_std(dir, "");
    let t = p(dir, "t.qcow2");
    Patch(&t).put_bytes(lay.rbs[0], &vec![0xffu8; lay.cluster_size as usize]);
    // Every refcount table entry points at that block: every cluster the table can
    // describe looks in use.
    let n = lay.rt.1 / 8;
    let mut table = Vec::with_capacity(lay.rt.1 as usize);
    for _ in 0..n {
        table.extend_from_slice(&lay.rbs[0].to_be_bytes());
    }
    Patch(&t).put_bytes(lay.rt.0, &table);
}
fn r_alloc_scan(dir: &Path) -> Result<(), String> {
    run_clobber(dir, &[("w", 3 << 20, 65536), ("f", 0, 0)])
}

// --- Snapshot table

fn s_snap_base(dir: &Path) -> Layout {
    create(dir, "t.qcow2", "", "4M", None);
    io(dir, "t.qcow2", "qcow2", &W64[..2]);
    snapshot(dir, "t.qcow2", "s1");
    io(dir, "t.qcow2", "qcow2", &["write -P 0x55 0 4k"]);
    fs::copy(p(dir, "t.qcow2"), p(dir, "t.qcow2.orig")).unwrap();
    Layout::of(&p(dir, "t.qcow2"))
}
fn s_snap_huge_l1(dir: &Path) {
    let lay = s_snap_base(dir);
    Patch(&p(dir, "t.qcow2")).put_u32(lay.snapshot_field(0, SNAPSHOT_L1_SIZE), u32::MAX);
}
fn s_snap_l1_past_eof(dir: &Path) {
    let lay = s_snap_base(dir);
    Patch(&p(dir, "t.qcow2")).put_u32(lay.snapshot_field(0, SNAPSHOT_L1_SIZE), 4 << 20);
}
fn s_snap_huge_l1_dirty(dir: &Path) {
    create(dir, "t.qcow2", "lazy_refcounts=on", "4M", None);
    io(dir, "t.qcow2", "qcow2", &W64[..2]);
    snapshot(dir, "t.qcow2", "s1");
    fs::copy(p(dir, "t.qcow2"), p(dir, "t.qcow2.orig")).unwrap();
    let lay = Layout::of(&p(dir, "t.qcow2"));
    let t = p(dir, "t.qcow2");
    Patch(&t).put_u32(lay.snapshot_field(0, SNAPSHOT_L1_SIZE), 4 << 20);
    Patch(&t).set_incompatible(INCOMPAT_DIRTY);
}
fn s_nb_snapshots_max(dir: &Path) {
    s_snap_base(dir);
    Patch(&p(dir, "t.qcow2")).set(NB_SNAPSHOTS, u32::MAX.into());
}
fn s_nb_snapshots_65536(dir: &Path) {
    s_snap_base(dir);
    Patch(&p(dir, "t.qcow2")).set(NB_SNAPSHOTS, 65536);
}
fn r_snapshots(dir: &Path) -> Result<(), String> {
    let path = p(dir, "t.qcow2");
    tstep("open read-only, list snapshots");
    match open(&path, true) {
        Ok(img) => {
            if let Image::Qcow2(q) = &img {
                note(
                    dir,
                    format!(
                        "snapshots(): {:?}",
                        q.snapshots().map(|s| s.len()).map_err(|e| e.to_string())
                    ),
                );
            }
        }
        Err(e) => note(dir, format!("open ro: Err({e})")),
    }
    run_clobber(
        dir,
        &[
            ("w", 0, 4096),
            ("w", 3 << 20, 65536),
            ("d", 0, 65536),
            ("f", 0, 0),
        ],
    )
}

// --- Backing file name and chains

fn set_backing_name(path: &Path, name: &str) {
    let f = Patch(path);
    let off = f.get(BACKING_FILE_OFFSET);
    assert!(off != 0);
    f.put_bytes(off, name.as_bytes());
    f.set(BACKING_FILE_SIZE, name.len() as u64);
}
fn s_backing_past_cluster(dir: &Path) {
    create(dir, "b.qcow2", "", "4M", None);
    create(dir, "t.qcow2", "", "4M", Some(("b.qcow2", "qcow2")));
    fs::copy(p(dir, "t.qcow2"), p(dir, "t.qcow2.orig")).unwrap();
    Patch(&p(dir, "t.qcow2")).set(BACKING_FILE_OFFSET, 65536 + 16);
}
fn s_backing_straddles_cluster(dir: &Path) {
    s_backing_past_cluster(dir);
    Patch(&p(dir, "t.qcow2")).set(BACKING_FILE_OFFSET, 65536 - 4);
    Patch(&p(dir, "t.qcow2")).set(BACKING_FILE_SIZE, 64);
}
fn s_backing_size_huge(dir: &Path) {
    s_backing_past_cluster(dir);
    let orig = file_bytes(dir, "t.qcow2.orig");
    Patch(&p(dir, "t.qcow2")).set(BACKING_FILE_OFFSET, be64(&orig, BACKING_FILE_OFFSET.offset));
    Patch(&p(dir, "t.qcow2")).set(BACKING_FILE_SIZE, u32::MAX.into());
}
fn s_loop_self(dir: &Path) {
    create(dir, "b.qcow2", "", "4M", None);
    create(dir, "t.qcow2", "", "4M", Some(("b.qcow2", "qcow2")));
    set_backing_name(&p(dir, "t.qcow2"), "t.qcow2");
    fs::copy(p(dir, "t.qcow2"), p(dir, "t.qcow2.orig")).unwrap();
}
fn s_loop_two(dir: &Path) {
    create(dir, "c.qcow2", "", "4M", None);
    create(dir, "b.qcow2", "", "4M", Some(("c.qcow2", "qcow2")));
    create(dir, "t.qcow2", "", "4M", Some(("b.qcow2", "qcow2")));
    set_backing_name(&p(dir, "b.qcow2"), "t.qcow2");
    fs::copy(p(dir, "t.qcow2"), p(dir, "t.qcow2.orig")).unwrap();
}
fn s_loop_symlink(dir: &Path) {
    create(dir, "b.qcow2", "", "4M", None);
    create(dir, "t.qcow2", "", "4M", Some(("b.qcow2", "qcow2")));
    std::os::unix::fs::symlink("t.qcow2", p(dir, "l.qcow2")).unwrap();
    set_backing_name(&p(dir, "t.qcow2"), "l.qcow2");
    fs::copy(p(dir, "t.qcow2"), p(dir, "t.qcow2.orig")).unwrap();
}
fn s_loop_raw_self(dir: &Path) {
    fs::write(p(dir, "b.raw"), vec![0u8; 1 << 20]).unwrap();
    create(dir, "t.qcow2", "", "4M", Some(("b.raw", "raw")));
    set_backing_name(&p(dir, "t.qcow2"), "t.qcow2");
    fs::copy(p(dir, "t.qcow2"), p(dir, "t.qcow2.orig")).unwrap();
}
fn s_backing_fifo(dir: &Path) {
    fs::write(p(dir, "b.raw"), vec![0u8; 1 << 20]).unwrap();
    create(dir, "t.qcow2", "", "4M", Some(("b.raw", "raw")));
    fs::remove_file(p(dir, "b.raw")).unwrap();
    let st = Command::new("mkfifo")
        .arg(p(dir, "b.raw"))
        .status()
        .unwrap();
    assert!(st.success());
    fs::copy(p(dir, "t.qcow2"), p(dir, "t.qcow2.orig")).unwrap();
}
/// Opening must fail (one line), read-only and read-write, and quickly.
fn r_open_fails(dir: &Path) -> Result<(), String> {
    let path = p(dir, "t.qcow2");
    for ro in [true, false] {
        tstep(&format!("open read_only={ro}"));
        match open(&path, ro) {
            Ok(_) => {
                return Err(format!(
                    "open (read_only={ro}) succeeded on a hostile image"
                ))
            }
            Err(e) => {
                let s = e.to_string();
                note(dir, format!("open read_only={ro}: Err({s})"));
                if s.contains('\n') {
                    return Err(format!("error is not one line: {s:?}"));
                }
            }
        }
    }
    Ok(())
}

// --- Work proportional to sizes in the image, not to the file

fn s_huge_sparse(dir: &Path) {
    // An empty 64 TiB image (a 1 MiB L1 table, nothing allocated): legitimate, not hostile.
    create(dir, "t.qcow2", "", "64T", None);
    fs::copy(p(dir, "t.qcow2"), p(dir, "t.qcow2.orig")).unwrap();
}
fn r_block_status_whole(dir: &Path) -> Result<(), String> {
    let img = open(&p(dir, "t.qcow2"), true).map_err(|e| e.to_string())?;
    let d = img.driver();
    tstep(&format!(
        "block_status(0, {:#x}) on an empty image",
        d.size()
    ));
    let t = Instant::now();
    let s = d.block_status(0, d.size()).map_err(|e| e.to_string())?;
    note(
        dir,
        format!("block_status(0, size) = {s:?} in {:?}", t.elapsed()),
    );
    drop(img);
    Ok(())
}

fn s_dirty_repeated_l2(dir: &Path) {
    // 32 TiB virtual with 64 KiB clusters: 65536 L1 entries (512 KiB). Every entry points
    // at the one L2 table; the lazy-refcounts dirty bit makes a read-write open rebuild.
    create(
        dir,
        "t.qcow2",
        "lazy_refcounts=on,refcount_bits=64",
        "32T",
        None,
    );
    io(dir, "t.qcow2", "qcow2", &["write -P 0x11 0 64k"]);
    fs::copy(p(dir, "t.qcow2"), p(dir, "t.qcow2.orig")).unwrap();
    let b = file_bytes(dir, "t.qcow2");
    let lay = Layout::parse(&b);
    let e = be64(&b, lay.l1.0);
    let mut table = Vec::with_capacity(lay.l1.1 as usize);
    for _ in 0..lay.l1.1 / 8 {
        table.extend_from_slice(&(e & !COPIED).to_be_bytes());
    }
    let t = p(dir, "t.qcow2");
    Patch(&t).put_bytes(lay.l1.0, &table);
    Patch(&t).set_incompatible(INCOMPAT_DIRTY);
}
fn r_open_rw_bounded(dir: &Path) -> Result<(), String> {
    let t = Instant::now();
    rw_ops(dir, &p(dir, "t.qcow2"), &[("f", 0, 0)]);
    note(
        dir,
        format!("open rw + flush + drop took {:?}", t.elapsed()),
    );
    Ok(())
}

fn s_l2_far_past_eof(dir: &Path) {
    let lay = setup_std(dir, "");
    Patch(&p(dir, "t.qcow2")).put_u64(lay.l2_entry(0, 0), (1 << 40) | COPIED);
}

// --- A version field the probe does not accept makes a qcow2 file "raw"; a probed raw
// image must not let a guest write turn it into another format (QEMU refuses writes to
// sector 0 of a probed raw image that would change what it probes as).

fn s_probed_raw(dir: &Path) {
    fs::write(p(dir, "t.qcow2"), vec![0u8; 1 << 20]).unwrap();
    fs::copy(p(dir, "t.qcow2"), p(dir, "t.qcow2.orig")).unwrap();
    fs::write(p(dir, "secret.txt"), b"host secret\n").unwrap();
    create(dir, "donor.qcow2", "", "1M", Some(("secret.txt", "raw")));
}
fn r_probed_raw(dir: &Path) -> Result<(), String> {
    let donor = file_bytes(dir, "donor.qcow2");
    let path = p(dir, "t.qcow2");
    tstep("open the raw file read-write, format probed");
    let img = open(&path, false).map_err(|e| e.to_string())?;
    if !matches!(img, Image::Raw(_)) {
        return Err("a zero-filled file did not probe as raw".into());
    }
    tstep("guest writes a qcow2 header (backing file secret.txt) into sector 0");
    let r = img.driver().write_at(&donor[..512], 0);
    note(
        dir,
        format!(
            "write of a qcow2 header at 0: {:?}",
            r.map_err(|e| e.to_string())
        ),
    );
    drop(img);
    tstep("probe again");
    match common::probe::probe_file(&path) {
        Ok(common::open::Format::Qcow2) => Err(
            "a guest write to sector 0 of a probed raw image turned it into a qcow2 image \
             whose backing file is secret.txt: the next probing open exposes a host file \
             to the guest (QEMU refuses this write on probed raw images)"
                .into(),
        ),
        _ => Ok(()),
    }
}

// --- Not hostile at all: a whole-cluster write_zeroes on a version 2 image.

fn s_v2_plain(dir: &Path) {
    create(dir, "t.qcow2", "compat=0.10", "4M", None);
    io(dir, "t.qcow2", "qcow2", &["write -P 0x11 0 128k"]);
    fs::copy(p(dir, "t.qcow2"), p(dir, "t.qcow2.orig")).unwrap();
}
fn r_v2_write_zeroes(dir: &Path) -> Result<(), String> {
    run_clobber(dir, &[("z", 0, 65536), ("f", 0, 0)])
}

// --- Not hostile: small reads of one compressed 2 MiB cluster.

fn s_compressed_2m(dir: &Path) {
    create(dir, "t.qcow2", "cluster_size=2M", "8M", None);
    io(dir, "t.qcow2", "qcow2", &["write -c -P 0x33 2M 2M"]);
    fs::copy(p(dir, "t.qcow2"), p(dir, "t.qcow2.orig")).unwrap();
}
fn r_compressed_2m_small_reads(dir: &Path) -> Result<(), String> {
    let img = open(&p(dir, "t.qcow2"), true).map_err(|e| e.to_string())?;
    let d = img.driver();
    tstep("read 1 MiB of the compressed cluster in 4 KiB reads");
    let t = Instant::now();
    let mut b = vec![0u8; 4096];
    for i in 0..256u64 {
        d.read_at(&mut b, (2 << 20) + i * 4096)
            .map_err(|e| e.to_string())?;
    }
    note(dir, format!("256 reads of 4 KiB took {:?}", t.elapsed()));
    Ok(())
}

type Target = (&'static str, Setup, Run);

const TARGETS: &[Target] = &[
    ("l1_offset0_copied_then_write", s_l1_offset0, r_write_first),
    (
        "l1_points_at_reftable_then_write",
        s_l1_reftable,
        r_l1_alias,
    ),
    ("l1_points_at_l1_table_then_write", s_l1_self, r_l1_alias),
    (
        "l1_points_at_refblock_then_write",
        s_l1_refblock,
        r_l1_alias,
    ),
    ("l2_offset0_then_write", s_l2_offset0, r_write_cluster0),
    (
        "l2_points_at_l1_table_then_write",
        s_l2_to_l1,
        r_write_cluster0,
    ),
    (
        "l2_points_at_reftable_then_write",
        s_l2_to_reftable,
        r_write_cluster0,
    ),
    (
        "l2_points_at_refblock_then_write",
        s_l2_to_refblock,
        r_write_cluster0,
    ),
    (
        "l2_points_at_own_l2_then_write",
        s_l2_to_itself,
        r_write_cluster0,
    ),
    (
        "l2_points_far_past_eof_then_write",
        s_l2_far_past_eof,
        r_write_cluster0,
    ),
    (
        "compressed_in_header_then_discard",
        s_compressed_in_header,
        r_compressed_in_header_discard,
    ),
    (
        "compressed_in_header_then_overwrite",
        s_compressed_in_header,
        r_compressed_in_header_overwrite,
    ),
    (
        "compressed_in_header_then_write_zeroes",
        s_compressed_in_header,
        r_compressed_in_header_zero,
    ),
    (
        "compressed_huge_sector_count_then_discard",
        s_compressed_huge_sectors,
        r_compressed_huge_sectors,
    ),
    (
        "extl2_alloc_and_zero_bits",
        s_extl2_both_bits,
        r_extl2_both_bits,
    ),
    (
        "refblock_all_free_then_write",
        s_refblock_all_free,
        r_refblock_all_free,
    ),
    (
        "reftable_entry_zero_then_write",
        s_reftable_zero,
        r_reftable_alias,
    ),
    (
        "reftable_entry_points_at_l1_then_write",
        s_reftable_to_l1,
        r_reftable_alias,
    ),
    (
        "reftable_entry_points_at_itself_then_write",
        s_reftable_to_self,
        r_reftable_alias,
    ),
    (
        "reftable_entry_points_at_l2_then_write",
        s_reftable_to_l2,
        r_reftable_alias,
    ),
    (
        "refcounts_all_used_allocation_scan",
        s_refblocks_all_used,
        r_alloc_scan,
    ),
    ("snapshot_huge_l1_size", s_snap_huge_l1, r_snapshots),
    ("snapshot_l1_past_eof", s_snap_l1_past_eof, r_snapshots),
    (
        "snapshot_l1_past_eof_dirty_rebuild",
        s_snap_huge_l1_dirty,
        r_snapshots,
    ),
    ("nb_snapshots_u32_max", s_nb_snapshots_max, r_snapshots),
    ("nb_snapshots_65536", s_nb_snapshots_65536, r_snapshots),
    (
        "backing_name_past_first_cluster",
        s_backing_past_cluster,
        r_open_fails,
    ),
    (
        "backing_name_straddles_first_cluster",
        s_backing_straddles_cluster,
        r_open_fails,
    ),
    (
        "backing_name_size_u32_max",
        s_backing_size_huge,
        r_open_fails,
    ),
    ("backing_loop_self", s_loop_self, r_open_fails),
    ("backing_loop_two", s_loop_two, r_open_fails),
    ("backing_loop_via_symlink", s_loop_symlink, r_open_fails),
    (
        "backing_loop_self_raw_format",
        s_loop_raw_self,
        r_open_fails,
    ),
    ("backing_file_is_a_fifo", s_backing_fifo, r_open_fails),
    (
        "block_status_whole_huge_image",
        s_huge_sparse,
        r_block_status_whole,
    ),
    (
        "dirty_rebuild_repeated_l2",
        s_dirty_repeated_l2,
        r_open_rw_bounded,
    ),
    ("probed_raw_write_sector0", s_probed_raw, r_probed_raw),
    (
        "compressed_2m_cluster_small_reads",
        s_compressed_2m,
        r_compressed_2m_small_reads,
    ),
    (
        "v2_write_zeroes_whole_cluster",
        s_v2_plain,
        r_v2_write_zeroes,
    ),
];

macro_rules! targets {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                target(stringify!($name).strip_prefix("target_").unwrap());
            }
        )*
    };
}

targets!(
    target_l1_offset0_copied_then_write,
    target_l1_points_at_reftable_then_write,
    target_l1_points_at_l1_table_then_write,
    target_l1_points_at_refblock_then_write,
    target_l2_offset0_then_write,
    target_l2_points_at_l1_table_then_write,
    target_l2_points_at_reftable_then_write,
    target_l2_points_at_refblock_then_write,
    target_l2_points_at_own_l2_then_write,
    target_l2_points_far_past_eof_then_write,
    target_compressed_in_header_then_discard,
    target_compressed_in_header_then_overwrite,
    target_compressed_in_header_then_write_zeroes,
    target_compressed_huge_sector_count_then_discard,
    target_extl2_alloc_and_zero_bits,
    target_refblock_all_free_then_write,
    target_reftable_entry_zero_then_write,
    target_reftable_entry_points_at_l1_then_write,
    target_reftable_entry_points_at_itself_then_write,
    target_reftable_entry_points_at_l2_then_write,
    target_refcounts_all_used_allocation_scan,
    target_snapshot_huge_l1_size,
    target_snapshot_l1_past_eof,
    target_snapshot_l1_past_eof_dirty_rebuild,
    target_nb_snapshots_u32_max,
    target_nb_snapshots_65536,
    target_backing_name_past_first_cluster,
    target_backing_name_straddles_first_cluster,
    target_backing_name_size_u32_max,
    target_backing_loop_self,
    target_backing_loop_two,
    target_backing_loop_via_symlink,
    target_backing_loop_self_raw_format,
    target_backing_file_is_a_fifo,
    target_block_status_whole_huge_image,
    target_dirty_rebuild_repeated_l2,
    target_probed_raw_write_sector0,
    target_compressed_2m_cluster_small_reads,
    target_v2_write_zeroes_whole_cluster,
);

/// Bitmap structures out of range (the bitmaps extension, directory entries, tables):
/// `img info`, `img check` and `img bitmap` answer each with qemu-img's words and exit
/// code, one line, never a panic, a hang or a large allocation (a 1 GiB address space).
#[test]
fn bitmap_structures_out_of_range() {
    use integration_tests::qcow2_bitmaps;
    use integration_tests::{img_bin, qemu_to_img_prefix, tempdir};
    const LIMITS: Sandbox = Sandbox::new(1 << 30, Duration::from_secs(20));
    let dir = tempdir();
    let d = dir.path();
    let base = d.join("base.qcow2");
    let bs = base.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", bs, "64M"])
        .check()
        .unwrap();
    for name in ["b0", "b1"] {
        qemu_img(&["bitmap", "--add", bs, name]).check().unwrap();
    }
    qemu_io_cmds(&base, "qcow2", &["write 0 64k".to_string()]);
    let b = fs::read(&base).unwrap();
    let bm = qcow2_bitmaps::parse(&b).unwrap();
    let (ext, e0) = (bm.ext_at, bm.entries[0].clone());
    // (what, offset, width, value), applied in order; `IN_USE` first where the bitmap must
    // not be loaded on open for the damage to reach check.
    let in_use = (e0.at + 12, 4, e0.flags | 1);
    type Edits = Vec<(u64, u64, u64)>;
    let cases: Vec<(&str, Edits)> = vec![
        ("zero bitmaps", vec![(ext, 4, 0)]),
        ("65536 bitmaps", vec![(ext, 4, 65536)]),
        ("fewer entries than counted", vec![(ext, 4, 3)]),
        ("more entries than counted", vec![(ext, 4, 1)]),
        ("reserved field", vec![(ext + 4, 4, 1)]),
        ("directory size 0", vec![(ext + 8, 8, 0)]),
        ("directory size 7", vec![(ext + 8, 8, 7)]),
        ("directory size 2^40", vec![(ext + 8, 8, 1 << 40)]),
        (
            "directory size at the limit",
            vec![(ext + 8, 8, 1024 * 65535)],
        ),
        (
            "directory offset unaligned",
            vec![(ext + 16, 8, bm.dir_offset + 8)],
        ),
        ("directory offset 2^62", vec![(ext + 16, 8, 1 << 62)]),
        ("directory past the end", vec![(ext + 16, 8, 1 << 30)]),
        ("extension length 16", vec![(ext - 4, 4, 16)]),
        ("table size 2^27", vec![(e0.at + 8, 4, 0x800_0000)]),
        ("table size 0", vec![(e0.at + 8, 4, 0)]),
        (
            "table size too small",
            vec![(e0.at + 8, 4, 0), (e0.at + 8, 4, 1 << 20)],
        ),
        ("table offset 0", vec![(e0.at, 8, 0)]),
        (
            "table offset unaligned",
            vec![(e0.at, 8, e0.table_offset + 512)],
        ),
        ("name size 0xffff", vec![(e0.at + 18, 2, 0xffff)]),
        ("extra data 2^32-1", vec![(e0.at + 20, 4, 0xffff_ffff)]),
        ("granularity 2^63", vec![(e0.at + 17, 1, 63)]),
        ("type 0", vec![(e0.at + 16, 1, 0)]),
        ("reserved flags", vec![(e0.at + 12, 4, 0x8000_0002)]),
        (
            "table entry reserved bits",
            vec![(e0.table_offset, 8, 1 << 60)],
        ),
        ("table entry unaligned", vec![(e0.table_offset, 8, 0x10200)]),
        (
            "in use, table size 2^27",
            vec![in_use, (e0.at + 8, 4, 0x800_0000)],
        ),
        (
            "in use, table size 8191",
            vec![in_use, (e0.at + 8, 4, 8191)],
        ),
        ("in use, table at 2^55", vec![in_use, (e0.at, 8, 1 << 55)]),
        (
            "in use, data at 2^55",
            vec![in_use, (e0.table_offset, 8, 1 << 55)],
        ),
        (
            "in use, table entry reserved",
            vec![in_use, (e0.table_offset, 8, 1 << 60)],
        ),
    ];
    let img = img_bin();
    let mut failures = Vec::new();
    for (what, edits) in &cases {
        let mut bytes = b.clone();
        for &(at, width, v) in edits {
            assert!(put_be(&mut bytes, at, width, v), "{what}");
        }
        for args in [
            &["info", "t.qcow2"][..],
            &["check", "t.qcow2"],
            &["check", "-r", "all", "t.qcow2"],
            &["bitmap", "--remove", "t.qcow2", "b1"],
        ] {
            let (qd, id) = (d.join("q"), d.join("i"));
            for dd in [&qd, &id] {
                let _ = fs::remove_dir_all(dd);
                fs::create_dir_all(dd).unwrap();
                fs::write(dd.join("t.qcow2"), &bytes).unwrap();
            }
            let q = LIMITS.run(Command::new("qemu-img").args(args).current_dir(&qd));
            let i = LIMITS.run(Command::new(&img).args(args).current_dir(&id));
            let qerr = qemu_to_img_prefix(&q.stderr);
            if i.timed_out || i.signal.is_some() || i.stderr.contains("panicked") {
                failures.push(format!(
                    "{what} {args:?}: img did not fail cleanly\n{}",
                    i.report()
                ));
            } else if (q.code, &q.stdout, &qerr) != (i.code, &i.stdout, &i.stderr) {
                failures.push(format!(
                    "{what} {args:?}:\n--- qemu-img\n{}\n--- img\n{}",
                    q.report(),
                    i.report()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// One hostile file of a format beside qcow2: its name, its bytes, and whether `img`
/// may open it rather than refuse it (qemu-img does the same unless `qemu_opens` says
/// otherwise).
struct Foreign {
    name: &'static str,
    bytes: Vec<u8>,
    opens: bool,
    qemu_opens: Option<bool>,
}

fn put32(b: &mut [u8], at: usize, v: [u8; 4]) {
    b[at..at + 4].copy_from_slice(&v);
}

/// Hostile VHDs, from a dynamic image qemu-img made and qemu-io wrote and a fixed one.
fn hostile_vpc(dir: &Path) -> Vec<Foreign> {
    let (dynamic, fixed) = (dir.join("d.vhd"), dir.join("f.vhd"));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        dynamic.to_str().unwrap(),
        "10M",
    ])
    .check()
    .unwrap();
    qemu_io_cmds(&dynamic, "vpc", &["write -P 7 1M 1M".to_string()]);
    let fx = fixed.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=fixed",
        fx,
        "1M",
    ])
    .check()
    .unwrap();
    let d = fs::read(&dynamic).unwrap();
    let f = fs::read(&fixed).unwrap();
    // The footer's checksum redone after a change.
    let resum = |b: &mut Vec<u8>, at: usize| {
        let sum = b[at..at + 512]
            .iter()
            .enumerate()
            .filter(|(i, _)| !(64..68).contains(i))
            .fold(0u32, |s, (_, &x)| s.wrapping_add(u32::from(x)));
        put32(b, at + 64, (!sum).to_be_bytes());
    };
    let with = |base: &Vec<u8>, edit: &dyn Fn(&mut Vec<u8>)| {
        let mut b = base.clone();
        edit(&mut b);
        b
    };
    let ff = f.len() - 512;
    vec![
        Foreign {
            name: "vpc-truncated-header",
            bytes: d[..300].to_vec(),
            opens: false,
            qemu_opens: None,
        },
        Foreign {
            name: "vpc-bad-checksum",
            bytes: with(&d, &|b| b[40] ^= 0x10),
            opens: false,
            qemu_opens: None,
        },
        Foreign {
            name: "vpc-fixed-bad-checksum",
            bytes: with(&f, &|b| b[ff + 40] ^= 0x10),
            opens: false,
            qemu_opens: None,
        },
        Foreign {
            name: "vpc-truncated-table",
            bytes: d[..1000].to_vec(),
            opens: false,
            qemu_opens: None,
        },
        Foreign {
            name: "vpc-truncated-block",
            bytes: d[..d.len() - 4096].to_vec(),
            opens: false,
            qemu_opens: None,
        },
        Foreign {
            name: "vpc-table-entries-near-2^32",
            bytes: with(&d, &|b| put32(b, 512 + 28, 0xffff_fff0u32.to_be_bytes())),
            opens: false,
            qemu_opens: None,
        },
        Foreign {
            name: "vpc-table-entries-2^29-1",
            bytes: with(&d, &|b| put32(b, 512 + 28, 0x1fff_ffffu32.to_be_bytes())),
            opens: false,
            qemu_opens: None,
        },
        Foreign {
            name: "vpc-table-past-the-end",
            bytes: with(&d, &|b| {
                b[512 + 16..512 + 24].copy_from_slice(&(1u64 << 40).to_be_bytes())
            }),
            opens: false,
            qemu_opens: None,
        },
        Foreign {
            name: "vpc-block-near-2^32-sectors",
            bytes: with(&d, &|b| put32(b, 1536, 0xffff_fffeu32.to_be_bytes())),
            opens: false,
            qemu_opens: None,
        },
        Foreign {
            name: "vpc-block-over-the-header",
            bytes: with(&d, &|b| put32(b, 1536 + 4, 0u32.to_be_bytes())),
            opens: true,
            qemu_opens: None,
        },
        Foreign {
            name: "vpc-block-size-2^31",
            bytes: with(&d, &|b| put32(b, 512 + 32, 0x8000_0000u32.to_be_bytes())),
            opens: false,
            qemu_opens: None,
        },
        Foreign {
            name: "vpc-block-size-odd",
            bytes: with(&d, &|b| put32(b, 512 + 32, 0x0030_0000u32.to_be_bytes())),
            opens: false,
            qemu_opens: None,
        },
        Foreign {
            name: "vpc-header-offset-2^64-1",
            bytes: with(&d, &|b| {
                b[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
                resum(b, 0);
            }),
            opens: false,
            qemu_opens: None,
        },
        Foreign {
            name: "vpc-fixed-2040G-in-1M",
            bytes: with(&f, &|b| {
                b[ff + 28..ff + 32].copy_from_slice(b"qem2");
                b[ff + 48..ff + 56].copy_from_slice(&(2040u64 << 30).to_be_bytes());
                resum(b, ff);
            }),
            opens: true,
            qemu_opens: None,
        },
        Foreign {
            name: "vpc-fixed-size-2^64",
            bytes: with(&f, &|b| {
                b[ff + 28..ff + 32].copy_from_slice(b"qem2");
                b[ff + 48..ff + 56].copy_from_slice(&u64::MAX.to_be_bytes());
                resum(b, ff);
            }),
            opens: false,
            qemu_opens: None,
        },
    ]
}

/// Hostile VDIs, from a dynamic image qemu-img made and qemu-io wrote.
fn hostile_vdi(dir: &Path) -> Vec<Foreign> {
    let path = dir.join("d.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", path.to_str().unwrap(), "10M"])
        .check()
        .unwrap();
    qemu_io_cmds(&path, "vdi", &["write -P 7 1M 2M".to_string()]);
    let d = fs::read(&path).unwrap();
    let with = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut b = d.clone();
        edit(&mut b);
        b
    };
    let le = |v: u32| v.to_le_bytes();
    vec![
        Foreign {
            name: "vdi-truncated-header",
            bytes: d[..300].to_vec(),
            opens: false,
            qemu_opens: None,
        },
        Foreign {
            name: "vdi-truncated-map",
            bytes: d[..600].to_vec(),
            opens: true,
            qemu_opens: None,
        },
        Foreign {
            name: "vdi-truncated-block",
            bytes: d[..d.len() - 4096].to_vec(),
            opens: true,
            qemu_opens: None,
        },
        Foreign {
            name: "vdi-blocks-near-2^32",
            bytes: with(&|b| put32(b, 0x180, le(0xffff_fff0))),
            opens: false,
            qemu_opens: None,
        },
        Foreign {
            name: "vdi-blocks-at-the-limit-map-past-the-end",
            bytes: with(&|b| put32(b, 0x180, le(0x1fff_ff80))),
            opens: false, // QEMU reads a block map past the end of the file as zeroes (allocating
            // up to 2 GiB for it); img refuses it.
            qemu_opens: Some(true),
        },
        Foreign {
            name: "vdi-size-2^64",
            bytes: with(&|b| b[0x170..0x178].copy_from_slice(&u64::MAX.to_le_bytes())),
            opens: false,
            qemu_opens: None,
        },
        Foreign {
            name: "vdi-map-offset-near-2^32",
            bytes: with(&|b| put32(b, 0x154, le(0xffff_fe00))),
            opens: false, // QEMU reads a block map past the end of the file as zeroes (allocating
            // up to 2 GiB for it); img refuses it.
            qemu_opens: Some(true),
        },
        Foreign {
            name: "vdi-data-offset-near-2^32",
            bytes: with(&|b| put32(b, 0x158, le(0xffff_fe00))),
            opens: true,
            qemu_opens: None,
        },
        Foreign {
            name: "vdi-entry-near-2^32",
            bytes: with(&|b| put32(b, 512 + 4, le(0xffff_fffd))),
            opens: true,
            qemu_opens: None,
        },
        Foreign {
            name: "vdi-entries-share-a-block",
            bytes: with(&|b| {
                let e = [b[512 + 4], b[512 + 5], b[512 + 6], b[512 + 7]];
                put32(b, 512 + 20, e);
            }),
            opens: true,
            qemu_opens: None,
        },
        Foreign {
            name: "vdi-count-wrong",
            bytes: with(&|b| put32(b, 0x184, le(0))),
            opens: true,
            qemu_opens: None,
        },
        Foreign {
            name: "vdi-block-size-odd",
            bytes: with(&|b| put32(b, 0x178, le(3 << 19))),
            opens: false,
            qemu_opens: None,
        },
    ]
}

/// Hostile VHDXs, from a dynamic image qemu-img made and qemu-io wrote: headers at 64 and
/// 128 KiB, the region table at 192 KiB, the log at 1 MiB, the BAT at 2 MiB, the metadata
/// table at 3 MiB with its items 64 KiB further. Edited structures are sealed again with
/// their CRC-32C unless the case is about the checksum. (A log entry as long as the log
/// with a bad checksum, which QEMU reads over and over: common's vhdx unit tests.)
fn hostile_vhdx(dir: &Path) -> Vec<Foreign> {
    use common::vhdx::crc::seal;
    let path = dir.join("d.vhdx");
    qemu_img(&["create", "-q", "-f", "vhdx", path.to_str().unwrap(), "10M"])
        .check()
        .unwrap();
    qemu_io_cmds(&path, "vhdx", &["write -P 7 1M 2M".to_string()]);
    let d = fs::read(&path).unwrap();
    const H: [usize; 2] = [64 << 10, 128 << 10];
    const RT: usize = 192 << 10;
    const LOG: usize = 1 << 20;
    const BAT: usize = 2 << 20;
    const MD: usize = 3 << 20;
    const ITEMS: usize = MD + (64 << 10);
    let with = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut b = d.clone();
        edit(&mut b);
        b
    };
    // Edit both headers (whichever is current), then seal them.
    let headers = |b: &mut Vec<u8>, edit: &dyn Fn(&mut [u8])| {
        for h in H {
            edit(&mut b[h..h + 4096]);
            seal(&mut b[h..h + 4096], 4);
        }
    };
    let region = |b: &mut Vec<u8>, edit: &dyn Fn(&mut [u8])| {
        edit(&mut b[RT..RT + (64 << 10)]);
        seal(&mut b[RT..RT + (64 << 10)], 4);
    };
    let put64 = |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let dirty = |b: &mut [u8]| b[48..64].copy_from_slice(b"dirty-log-guid!!");
    // A log entry header for the dirty GUID at the start of the log.
    let entry = |b: &mut Vec<u8>, len: u32, descriptors: u32| {
        let e = &mut b[LOG..LOG + 64];
        e[..4].copy_from_slice(b"loge");
        e[8..12].copy_from_slice(&len.to_le_bytes());
        e[16..24].copy_from_slice(&1u64.to_le_bytes());
        e[24..28].copy_from_slice(&descriptors.to_le_bytes());
        e[32..48].copy_from_slice(b"dirty-log-guid!!");
    };
    let case = |name, bytes, opens, qemu_opens| Foreign {
        name,
        bytes,
        opens,
        qemu_opens,
    };
    vec![
        case(
            "vhdx-truncated-headers",
            d[..100 << 10].to_vec(),
            false,
            None,
        ),
        case("vhdx-truncated-bat", d[..BAT + 100].to_vec(), false, None),
        case(
            "vhdx-headers-bad-crc",
            with(&|b| {
                b[H[0] + 100] ^= 1;
                b[H[1] + 100] ^= 1;
            }),
            false,
            None,
        ),
        case(
            "vhdx-headers-same-sequence",
            with(&|b| headers(b, &|h| put64(h, 8, 5))),
            false,
            None,
        ),
        case(
            "vhdx-region-table-bad-crc",
            with(&|b| b[RT + 40] ^= 1),
            false,
            None,
        ),
        case(
            "vhdx-region-entries-near-2^32",
            with(&|b| {
                region(b, &|r| {
                    r[8..12].copy_from_slice(&0xffff_fff0u32.to_le_bytes())
                })
            }),
            false,
            None,
        ),
        // QEMU names the overlapping regions on a line before its open error; img on one.
        case(
            "vhdx-bat-over-metadata",
            with(&|b| region(b, &|r| put64(r, 32, MD as u64))),
            false,
            Some(false),
        ),
        case(
            "vhdx-bat-over-log",
            with(&|b| region(b, &|r| put64(r, 32, LOG as u64))),
            false,
            Some(false),
        ),
        case(
            "vhdx-bat-length-near-2^32",
            with(&|b| {
                region(b, &|r| {
                    r[40..44].copy_from_slice(&0xfff0_0000u32.to_le_bytes())
                })
            }),
            false,
            Some(false),
        ),
        // QEMU reads a BAT past the end of the file as zeroes; img refuses it.
        case(
            "vhdx-bat-past-the-end",
            with(&|b| region(b, &|r| put64(r, 32, 1 << 40))),
            false,
            Some(true),
        ),
        case(
            "vhdx-metadata-past-the-end",
            with(&|b| region(b, &|r| put64(r, 64, 1 << 40))),
            false,
            None,
        ),
        case(
            "vhdx-metadata-entries-2047",
            with(&|b| b[MD + 10..MD + 12].copy_from_slice(&2047u16.to_le_bytes())),
            true,
            None,
        ),
        case(
            "vhdx-metadata-item-twice",
            with(&|b| {
                let first = b[MD + 32..MD + 48].to_vec();
                b[MD + 64..MD + 80].copy_from_slice(&first);
            }),
            false,
            None,
        ),
        case(
            "vhdx-metadata-item-offset-near-2^32",
            with(&|b| b[MD + 64 + 16..MD + 64 + 20].copy_from_slice(&0xffff_fff0u32.to_le_bytes())),
            false,
            None,
        ),
        case(
            "vhdx-block-size-odd",
            with(&|b| b[ITEMS..ITEMS + 4].copy_from_slice(&(3u32 << 20).to_le_bytes())),
            false,
            None,
        ),
        case(
            "vhdx-block-size-0",
            with(&|b| b[ITEMS..ITEMS + 4].copy_from_slice(&0u32.to_le_bytes())),
            false,
            None,
        ),
        case("vhdx-has-parent", with(&|b| b[ITEMS + 4] |= 2), false, None),
        case(
            "vhdx-size-2^64",
            with(&|b| put64(b, ITEMS + 8, u64::MAX)),
            false,
            None,
        ),
        case(
            "vhdx-blocks-near-2^32",
            with(&|b| put64(b, ITEMS + 8, 0xffff_fff0 << 23)),
            false,
            None,
        ),
        case(
            "vhdx-sector-4096",
            with(&|b| b[ITEMS + 32..ITEMS + 36].copy_from_slice(&4096u32.to_le_bytes())),
            false,
            None,
        ),
        // QEMU says where the block lies on a line before its open error; img on one.
        case(
            "vhdx-block-past-the-end",
            with(&|b| put64(b, BAT, (1u64 << 40) | 6)),
            false,
            Some(false),
        ),
        case(
            "vhdx-block-offset-near-2^64",
            with(&|b| put64(b, BAT, 0xffff_ffff_fff0_0006)),
            false,
            Some(false),
        ),
        case(
            "vhdx-block-over-the-bat",
            with(&|b| put64(b, BAT, BAT as u64 | 6)),
            false,
            Some(false),
        ),
        case(
            "vhdx-block-partially-present",
            with(&|b| b[BAT] |= 7),
            true,
            None,
        ),
        case(
            "vhdx-log-offset-0",
            with(&|b| headers(b, &|h| put64(h, 72, 0))),
            false,
            None,
        ),
        case(
            "vhdx-log-length-odd",
            with(&|b| {
                headers(b, &|h| {
                    dirty(h);
                    h[68..72].copy_from_slice(&12345u32.to_le_bytes());
                })
            }),
            false,
            None,
        ),
        case(
            "vhdx-log-length-near-2^32",
            with(&|b| {
                headers(b, &|h| {
                    dirty(h);
                    h[68..72].copy_from_slice(&0xfff0_0000u32.to_le_bytes());
                })
            }),
            false,
            Some(false),
        ),
        // Entries that lie about their length or descriptors are not valid: nothing to
        // replay, the image opens.
        case(
            "vhdx-log-entry-longer-than-the-log",
            with(&|b| {
                headers(b, &dirty);
                entry(b, 0xffff_f000, 1);
            }),
            true,
            None,
        ),
        case(
            "vhdx-log-entry-descriptors-near-2^32",
            with(&|b| {
                headers(b, &dirty);
                entry(b, 8192, 0xffff_fff0);
            }),
            true,
            None,
        ),
        case(
            "vhdx-metadata-entries-2048",
            with(&|b| b[MD + 10..MD + 12].copy_from_slice(&2048u16.to_le_bytes())),
            false,
            None,
        ),
    ]
}

/// Hostile VMDKs, from a monolithicSparse image qemu-img made and qemu-io wrote (GD at
/// sector 26, its table at 27, grains from 128), a streamOptimized one, and descriptors.
fn hostile_vmdk(dir: &Path) -> Vec<Foreign> {
    let path = dir.join("d.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", path.to_str().unwrap(), "10M"])
        .check()
        .unwrap();
    qemu_io_cmds(&path, "vmdk", &["write -P 7 1M 2M".to_string()]);
    let d = fs::read(&path).unwrap();
    let raw = dir.join("vmdk-src.raw");
    fs::write(&raw, vec![0x5au8; 1 << 20]).unwrap();
    let so = dir.join("so.vmdk");
    qemu_img(&[
        "convert",
        "-q",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        raw.to_str().unwrap(),
        so.to_str().unwrap(),
    ])
    .check()
    .unwrap();
    let st = fs::read(&so).unwrap();
    fs::write(dir.join("hostile-data.bin"), vec![1u8; 1 << 20]).unwrap();
    let le = |v: u32| v.to_le_bytes();
    let put64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let with = |base: &Vec<u8>, edit: &dyn Fn(&mut Vec<u8>)| {
        let mut b = base.clone();
        edit(&mut b);
        b
    };
    let footed = {
        let mut b = st.clone();
        let mut marker = vec![0u8; 512];
        marker[12] = 3;
        b.extend_from_slice(&marker);
        b.extend_from_slice(&st[..512]);
        b.extend_from_slice(&[0u8; 512]);
        put64(&mut b, 56, u64::MAX);
        b
    };
    // The first grain of the stream: its marker is at the header's grain offset.
    let first_grain = u64::from_le_bytes(st[64..72].try_into().unwrap()) as usize * 512;
    let desc = |line: &str| {
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n{line}\n"
        )
        .into_bytes()
    };
    let f = |name, bytes, opens, qemu_opens| Foreign {
        name,
        bytes,
        opens,
        qemu_opens,
    };
    vec![
        // Its directory past the end: QEMU reads zeroes, then misses the CID; img
        // refuses a directory past the end of the file first.
        f(
            "vmdk-truncated-header",
            d[..60].to_vec(),
            false,
            Some(false),
        ),
        f("vmdk-truncated-tables", d[..40000].to_vec(), false, None),
        f(
            "vmdk-truncated-grain",
            d[..d.len() - 4096].to_vec(),
            true,
            None,
        ),
        f(
            "vmdk-gtes-513",
            with(&d, &|b| put32(b, 44, le(513))),
            false,
            None,
        ),
        f(
            "vmdk-gtes-0",
            with(&d, &|b| put32(b, 44, le(0))),
            false,
            None,
        ),
        f(
            "vmdk-grain-1G-plus",
            with(&d, &|b| {
                put64(b, 20, 0x20_0001);
                put32(b, 44, le(1));
            }),
            false,
            None,
        ),
        f(
            "vmdk-version-4",
            with(&d, &|b| put32(b, 4, le(4))),
            false,
            None,
        ),
        // QEMU opens it, then cannot size it.
        f(
            "vmdk-capacity-2^63",
            with(&d, &|b| put64(b, 12, 1 << 63)),
            false,
            Some(false),
        ),
        // A directory of 2^24 entries past the end of a small file: QEMU reads zeroes
        // (and garbage entries, the file's own tables and grains, mapping 512 TiB).
        f(
            "vmdk-gd-16M-entries",
            with(&d, &|b| put64(b, 12, 1 << 40)),
            false,
            Some(true),
        ),
        f(
            "vmdk-gd-33M-entries",
            with(&d, &|b| put64(b, 12, 33 << 36)),
            false,
            None,
        ),
        f(
            "vmdk-gd-offset-2^64",
            with(&d, &|b| put64(b, 56, u64::MAX - 1)),
            false,
            None,
        ),
        f(
            "vmdk-gd-entry-past-the-end",
            with(&d, &|b| put32(b, 26 * 512, le(0xffff_fff0))),
            true,
            None,
        ),
        f(
            "vmdk-gt-entry-past-the-end",
            with(&d, &|b| put32(b, 27 * 512 + 64, le(0xffff_fff0))),
            true,
            None,
        ),
        f(
            "vmdk-gt-entry-over-the-header",
            with(&d, &|b| put32(b, 27 * 512 + 64, le(0))),
            true,
            None,
        ),
        f(
            "vmdk-grain-offset-past-the-end",
            with(&d, &|b| put64(b, 64, 1 << 40)),
            false,
            None,
        ),
        f(
            "vmdk-desc-offset-2^64",
            with(&d, &|b| {
                put64(b, 12, 0);
                put64(b, 28, u64::MAX);
            }),
            false,
            None,
        ),
        f(
            "vmdk-no-cid",
            with(&d, &|b| b[0x200..0x200 + 1024].fill(b' ')),
            false,
            None,
        ),
        f(
            "vmdk-stream-grain-size-2^32",
            with(&st, &|b| put32(b, first_grain + 8, le(u32::MAX))),
            true,
            None,
        ),
        f(
            "vmdk-stream-grain-garbage",
            with(&st, &|b| b[first_grain + 12..first_grain + 200].fill(0xa5)),
            true,
            None,
        ),
        // The header sending readers to a footer (footer marker, the header again with
        // the directory, end-of-stream marker), as VMware ends a stream.
        f("vmdk-stream-footer", footed.clone(), true, None),
        f(
            "vmdk-stream-footer-bad-magic",
            with(&footed, &|b| {
                let at = b.len() - 1024;
                b[at] ^= 0xff;
            }),
            false,
            None,
        ),
        f(
            "vmdk-stream-footer-bad-eos",
            with(&footed, &|b| {
                let at = b.len() - 512 + 12;
                b[at] = 3;
            }),
            false,
            None,
        ),
        f(
            "vmdk-stream-footer-gtes-513",
            with(&footed, &|b| {
                let at = b.len() - 1024 + 44;
                put32(b, at, le(513));
            }),
            false,
            None,
        ),
        // QEMU's own streams have no footer.
        f(
            "vmdk-stream-no-footer",
            with(&st, &|b| put64(b, 56, u64::MAX)),
            false,
            None,
        ),
        f(
            "vmdk-stream-truncated",
            st[..st.len() - 1024].to_vec(),
            true,
            None,
        ),
        f("vmdk-stream-1k", st[..1024].to_vec(), false, None),
        f(
            "vmdk-desc-line-600",
            desc(&format!("RW 2048 FLAT \"{}\" 0", "a".repeat(600))),
            false,
            None,
        ),
        f(
            "vmdk-desc-no-offset",
            desc("RW 2048 FLAT \"hostile-data.bin\""),
            false,
            None,
        ),
        f(
            "vmdk-desc-sectors-2^62",
            desc("RW 4611686018427387904 FLAT \"hostile-data.bin\" 0"),
            false,
            // QEMU opens it, then cannot size it.
            Some(false),
        ),
        f(
            "vmdk-desc-offset-2^62",
            desc("RW 2048 FLAT \"hostile-data.bin\" 4611686018427387904"),
            true,
            None,
        ),
        f(
            "vmdk-desc-past-the-data",
            desc("RW 409600 FLAT \"hostile-data.bin\" 0"),
            true,
            None,
        ),
        f(
            "vmdk-desc-missing-extent",
            desc("RW 2048 FLAT \"no-such-file.bin\" 0"),
            false,
            None,
        ),
        f(
            "vmdk-desc-sparse-not-vmdk",
            desc("RW 2048 SPARSE \"hostile-data.bin\""),
            false,
            None,
        ),
        // Descriptors naming themselves: as a sparse extent (not one), and a sparse
        // header whose embedded descriptor names its own file (QEMU recurses).
        f(
            "vmdk-desc-names-itself",
            desc("RW 2048 SPARSE \"vmdk-desc-names-itself.img\""),
            false,
            None,
        ),
        f(
            "vmdk-embedded-desc-names-itself",
            {
                let mut b = with(&d, &|b| {
                    put64(b, 12, 0);
                    put64(b, 28, 1);
                });
                let text = desc("RW 2048 SPARSE \"vmdk-embedded-desc-names-itself.img\"")
                    .iter()
                    .map(|&c| if c == b'F' { b'F' } else { c })
                    .collect::<Vec<u8>>();
                let text = String::from_utf8(text)
                    .unwrap()
                    .replace("monolithicFlat", "twoGbMaxExtentSparse");
                b[512..512 + text.len()].copy_from_slice(text.as_bytes());
                b[512 + text.len()..1024].fill(0);
                b
            },
            false,
            Some(false),
        ),
        // 2 MiB of comment lines before the fields (QEMU reads the first MiB only).
        f(
            "vmdk-desc-2M",
            {
                let mut b = b"version=1\n".to_vec();
                b.extend(std::iter::repeat_n(b"#comment\n".as_slice(), 1 << 18).flatten());
                b.extend_from_slice(&desc("RW 2048 FLAT \"hostile-data.bin\" 0"));
                b
            },
            false,
            None,
        ),
        // qemu-img fails an assertion.
        f("vmdk-desc-no-extents", desc(""), false, Some(false)),
        f(
            "vmdk-desc-unterminated",
            b"version=1\ncreateType=\"monolithicFlat".to_vec(),
            false,
            None,
        ),
    ]
}

/// A `fmt` image qemu-img made in `dir` (10 MiB over a raw backing file of 0x11 bytes)
/// after qemu-io wrote 2 MiB at 1 MiB: its bytes.
fn image_over_raw(dir: &Path, fmt: &str) -> Vec<u8> {
    let path = dir.join(format!("d.{fmt}"));
    let base = dir.join(format!("{fmt}-base.raw"));
    fs::write(&base, vec![0x11u8; 1 << 20]).unwrap();
    let (b, p) = (base.to_str().unwrap(), path.to_str().unwrap());
    qemu_img(&["create", "-q", "-f", fmt, "-b", b, "-F", "raw", p, "10M"])
        .check()
        .unwrap();
    qemu_io_cmds(&path, fmt, &["write -P 7 1M 2M".to_string()]);
    fs::read(&path).unwrap()
}

/// Hostile qed images, from one qemu-img made (64 KiB clusters, 4-cluster tables, the
/// L1 table at 64 KiB) and qemu-io wrote, with a backing file name.
fn hostile_qed(dir: &Path) -> Vec<Foreign> {
    let d = image_over_raw(dir, "qed");
    let with = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut b = d.clone();
        edit(&mut b);
        b
    };
    let le = |v: u32| v.to_le_bytes();
    let put64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let l1 = u64::from_le_bytes(d[40..48].try_into().unwrap()) as usize;
    let l2 = u64::from_le_bytes(d[l1..l1 + 8].try_into().unwrap()) as usize;
    // The L2 entry of guest offset 1 MiB (cluster 16), which qemu-io wrote.
    let e = l2 + 16 * 8;
    let f = |name, bytes, opens| Foreign {
        name,
        bytes,
        opens,
        qemu_opens: None,
    };
    vec![
        f("qed-truncated-header", d[..30].to_vec(), false),
        f("qed-truncated-l1", d[..l1 + 100].to_vec(), false),
        f("qed-truncated-data", d[..d.len() - 65536].to_vec(), true),
        f(
            "qed-cluster-2^31",
            with(&|b| put32(b, 4, le(1 << 31))),
            false,
        ),
        f(
            "qed-table-size-near-2^32",
            with(&|b| put32(b, 8, le(0xffff_fff0))),
            false,
        ),
        f(
            "qed-header-size-near-2^32",
            with(&|b| put32(b, 12, le(0xffff_ffff))),
            false,
        ),
        f("qed-unknown-feature", with(&|b| b[16] |= 0x10), false),
        f("qed-need-check", with(&|b| b[16] |= 2), true),
        f(
            "qed-l1-past-the-end",
            with(&|b| put64(b, 40, 1 << 40)),
            false,
        ),
        f(
            "qed-l1-offset-near-2^64",
            with(&|b| put64(b, 40, u64::MAX - 0xffff)),
            false,
        ),
        f(
            "qed-size-near-2^64",
            with(&|b| put64(b, 48, u64::MAX - 511)),
            false,
        ),
        f(
            "qed-backing-name-length-2^32",
            with(&|b| put32(b, 60, le(u32::MAX))),
            false,
        ),
        f(
            "qed-backing-name-length-5000",
            with(&|b| put32(b, 60, le(5000))),
            false,
        ),
        f(
            "qed-l2-past-the-end",
            with(&|b| put64(b, l1, 1 << 40)),
            true,
        ),
        f(
            "qed-l2-unaligned",
            with(&|b| put64(b, l1, l2 as u64 + 8)),
            true,
        ),
        f(
            "qed-data-past-the-end",
            with(&|b| put64(b, e, 1 << 40)),
            true,
        ),
        f("qed-data-in-the-header", with(&|b| put64(b, e, 0)), true),
        f(
            "qed-data-near-2^64",
            with(&|b| put64(b, e, u64::MAX - 0xffff)),
            true,
        ),
        f("qed-l2-is-the-l1", with(&|b| put64(b, l1, l1 as u64)), true),
    ]
}

/// Hostile qcow (version 1) images, from one qemu-img made (4 KiB clusters, 512-entry L2
/// tables, a backing file name) and qemu-io wrote, and one with deflated clusters.
fn hostile_qcow(dir: &Path) -> Vec<Foreign> {
    let d = image_over_raw(dir, "qcow");
    let with = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut b = d.clone();
        edit(&mut b);
        b
    };
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let put64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    let cluster_bits = d[32];
    let cover = 1usize << (cluster_bits + d[33]);
    let l1 = be64(&d, 40) as usize;
    // The L1 and L2 entries of guest offset 1 MiB, which qemu-io wrote.
    let l1e = l1 + (1 << 20) / cover * 8;
    let l2 = be64(&d, l1e) as usize;
    let e = l2 + (1 << 20) % cover / (1 << cluster_bits) * 8;
    let compressed = 1u64 << 63;
    let f = |name, bytes, opens| Foreign {
        name,
        bytes,
        opens,
        qemu_opens: None,
    };
    vec![
        f("qcow-truncated-header", d[..30].to_vec(), false),
        f("qcow-truncated-l1", d[..l1 + 4].to_vec(), true),
        f("qcow-truncated-data", d[..d.len() - 8192].to_vec(), true),
        f("qcow-version-7", with(&|b| b[7] = 7), false),
        f("qcow-size-1", with(&|b| put64(b, 24, 1)), false),
        f(
            "qcow-size-near-2^64",
            with(&|b| put64(b, 24, u64::MAX - 100)),
            false,
        ),
        f(
            "qcow-l1-near-2^31-bytes",
            with(&|b| {
                b[32] = 9;
                b[33] = 6;
                put64(b, 24, ((1u64 << 28) - 1) << 15);
            }),
            false,
        ),
        f("qcow-cluster-bits-17", with(&|b| b[32] = 17), false),
        f("qcow-l2-bits-14", with(&|b| b[33] = 14), false),
        f("qcow-crypt-2", with(&|b| b[39] = 2), false),
        f(
            "qcow-backing-name-length-2^32",
            with(&|b| put32(b, 16, u32::MAX.to_be_bytes())),
            false,
        ),
        f(
            "qcow-backing-name-past-the-end",
            with(&|b| put64(b, 8, 1 << 40)),
            true,
        ),
        f(
            "qcow-l1-past-the-end",
            with(&|b| put64(b, 40, 1 << 40)),
            true,
        ),
        f(
            "qcow-l1-near-2^64",
            with(&|b| put64(b, 40, u64::MAX - 7)),
            false,
        ),
        f(
            "qcow-l2-past-the-end",
            with(&|b| put64(b, l1e, 1 << 40)),
            true,
        ),
        f(
            "qcow-l2-near-2^64",
            with(&|b| put64(b, l1e, u64::MAX - 7)),
            true,
        ),
        f(
            "qcow-data-past-the-end",
            with(&|b| put64(b, e, 1 << 40)),
            true,
        ),
        f(
            "qcow-data-near-2^64",
            with(&|b| put64(b, e, (1 << 63) - 8)),
            true,
        ),
        f(
            "qcow-compressed-garbage",
            with(&|b| put64(b, e, compressed | (4000 << (63 - cluster_bits)) | 512)),
            true,
        ),
        f(
            "qcow-compressed-past-the-end",
            with(&|b| put64(b, e, compressed | (100 << (63 - cluster_bits)) | (1 << 40))),
            true,
        ),
    ]
}

/// Hostile parallels images, from one qemu-img made (64 KiB clusters) and qemu-io wrote.
fn hostile_parallels(dir: &Path) -> Vec<Foreign> {
    let path = dir.join("d.hds");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "parallels",
        "-o",
        "cluster_size=64k",
        path.to_str().unwrap(),
        "10M",
    ])
    .check()
    .unwrap();
    qemu_io_cmds(&path, "parallels", &["write -P 7 1M 2M".to_string()]);
    let d = fs::read(&path).unwrap();
    let with = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut b = d.clone();
        edit(&mut b);
        b
    };
    let le = |v: u32| v.to_le_bytes();
    // The table entry of guest offset 1 MiB (cluster 16), which qemu-io wrote.
    let e = 64 + 16 * 4;
    let f = |name, bytes, opens| Foreign {
        name,
        bytes,
        opens,
        qemu_opens: None,
    };
    vec![
        f("parallels-truncated-header", d[..40].to_vec(), true),
        f("parallels-truncated-table", d[..100].to_vec(), true),
        f(
            "parallels-truncated-data",
            d[..d.len() - 65536].to_vec(),
            true,
        ),
        f("parallels-version-3", with(&|b| b[16] = 3), false),
        f(
            "parallels-zero-tracks",
            with(&|b| put32(b, 28, le(0))),
            false,
        ),
        f(
            "parallels-tracks-near-2^32",
            with(&|b| put32(b, 28, le(0xffff_ff80))),
            false,
        ),
        f(
            "parallels-entries-near-2^32",
            with(&|b| put32(b, 32, le(0xffff_fff0))),
            false,
        ),
        f(
            "parallels-entries-near-2^29",
            with(&|b| put32(b, 32, le((1 << 29) - 1))),
            false,
        ),
        f(
            "parallels-table-short-of-the-size",
            with(&|b| put32(b, 32, le(100))),
            true,
        ),
        f(
            "parallels-size-near-2^64",
            with(&|b| b[36..44].copy_from_slice(&(u64::MAX - 511).to_le_bytes())),
            false,
        ),
        f(
            "parallels-ext-off-near-2^64",
            with(&|b| b[56..64].copy_from_slice(&(1u64 << 60).to_le_bytes())),
            false,
        ),
        f(
            "parallels-in-use",
            with(&|b| put32(b, 44, le(0x746f_6e59))),
            true,
        ),
        f(
            "parallels-cluster-past-the-end",
            with(&|b| put32(b, e, le(50_000))),
            true,
        ),
        f(
            "parallels-cluster-near-2^32",
            with(&|b| put32(b, e, le(u32::MAX))),
            true,
        ),
        f(
            "parallels-clusters-shared",
            with(&|b| {
                let v: [u8; 4] = b[e..e + 4].try_into().unwrap();
                put32(b, e + 4, v)
            }),
            true,
        ),
        f(
            "parallels-cluster-in-the-header",
            with(&|b| put32(b, e, le(0))),
            true,
        ),
    ]
}

/// Hostile headers of the formats beside qcow2: `img info`, `map` and a read-write
/// `convert -n` into them (a `convert -O raw` out of those `img` only reads), each in the sandbox (1 GiB address space, a deadline), exit on
/// their own without a panic; a refused file gets one `img: ` line and exit 1, as qemu-img
/// refuses it (qemu-img's exit code must agree).
#[test]
fn foreign_headers_out_of_range() {
    use integration_tests::{img_bin, tempdir};
    const LIMITS: Sandbox = Sandbox::new(1 << 30, Duration::from_secs(20));
    let dir = tempdir();
    let d = dir.path();
    let mut cases = Vec::new();
    cases.extend(hostile_vpc(d).into_iter().map(|c| (c, "vpc")));
    cases.extend(hostile_vdi(d).into_iter().map(|c| (c, "vdi")));
    cases.extend(hostile_vmdk(d).into_iter().map(|c| (c, "vmdk")));
    cases.extend(hostile_vhdx(d).into_iter().map(|c| (c, "vhdx")));
    cases.extend(hostile_qed(d).into_iter().map(|c| (c, "qed")));
    cases.extend(hostile_qcow(d).into_iter().map(|c| (c, "qcow")));
    cases.extend(hostile_parallels(d).into_iter().map(|c| (c, "parallels")));
    let src = d.join("src.raw");
    fs::write(&src, vec![0x3cu8; 3 << 20]).unwrap();
    let mut failures = Vec::new();
    for (case, fmt) in &cases {
        let file = d.join(format!("{}.img", case.name));
        let fs_ = file.to_str().unwrap();
        let out_raw = d.join("out.raw");
        // A format img only reads is read instead of written.
        let write_or_read: &[&str] = if Format::from_name(fmt).unwrap().is_read_only() {
            &[
                "convert",
                "-f",
                fmt,
                "-O",
                "raw",
                fs_,
                out_raw.to_str().unwrap(),
            ]
        } else {
            &["convert", "-n", "-O", fmt, src.to_str().unwrap(), fs_]
        };
        let runs: [&[&str]; 3] = [
            &["info", "-f", fmt, fs_],
            &["map", "-f", fmt, "--output=json", fs_],
            write_or_read,
        ];
        for args in runs {
            fs::write(&file, &case.bytes).unwrap();
            let out = LIMITS.run(Command::new(img_bin()).args(args));
            let what = format!("{} {args:?}", case.name);
            if out.timed_out || out.signal.is_some() || out.stderr.contains("panicked") {
                failures.push(format!("{what}: did not exit on its own\n{}", out.report()));
                continue;
            }
            if args[0] == "info" {
                let q = qemu_img(&["info", "-f", fmt, fs_]);
                // Refused by both: in qemu-img's words.
                let words_differ = case.qemu_opens.is_none()
                    && !q.success()
                    && integration_tests::qemu_to_img_prefix(&q.stderr) != out.stderr;
                if q.success() != case.qemu_opens.unwrap_or(case.opens)
                    || out.success() != case.opens
                    || words_differ
                {
                    failures.push(format!(
                        "{what}: expected to {}open, in qemu-img's words\nqemu-img: {}\nimg: {}",
                        if case.opens { "" } else { "not " },
                        q.report(),
                        out.report()
                    ));
                }
            }
            if !out.success() {
                let lines: Vec<&str> = out.stderr.lines().collect();
                if out.code != Some(1) || lines.len() != 1 || !lines[0].starts_with("img: ") {
                    failures.push(format!("{what}: not one error line\n{}", out.report()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
