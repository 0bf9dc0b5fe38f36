//! The copy of `img convert`. The sources' block status decides, extent by extent, whether
//! the target gets data, zeroes or nothing; worker threads read, scan for zeroes and
//! compress in bounded chunks, and write in guest order unless `-W` allows any order.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use common::open::{Format, Image};
use common::ops::CompressedCluster;

use super::page_buf::PageBuf;
use super::sources::{Kind, Run, Sources, SECTOR};
use super::throttle::Throttle;
use super::turn::Turn;
use crate::errors::{engine_msg, io_msg};
use crate::progress::Progress;

/// The most bytes one request moves (qemu-img's buffer size); chunks never cross a
/// multiple of it, so peak memory is this times the number of workers.
const CHUNK: u64 = 2 << 20;
/// Largest chunk when compressing: a worker holds its chunk and the compressed clusters
/// until its turn to write, so small chunks keep memory near qemu-img's.
const COMPRESSED_CHUNK: u64 = 256 << 10;

/// How to copy, decided from the command line and the target.
#[derive(Debug, Clone)]
pub struct CopyPlan {
    /// Write data clusters compressed (`-c`).
    pub compressed: bool,
    /// Zero runs of this many bytes are not written as data (`-S`); 0 writes everything.
    pub min_sparse: u64,
    /// Write in guest order (no `-W`).
    pub in_order: bool,
    /// Requests in flight (`-m`).
    pub in_flight: usize,
    /// The target reads as zeroes already, so zero ranges need no write.
    pub has_zero_init: bool,
    /// The target has a backing file: what the source's top layer does not have is left
    /// to it.
    pub target_backing: bool,
    /// Where the new target's backing file ends; past it zeroes need no write.
    pub backing_end: Option<u64>,
    /// The target's cluster size, for formats with clusters.
    pub cluster_size: Option<u64>,
    /// Let the kernel copy data ranges between the files where it can (`-C`); data so
    /// copied is not scanned for zeroes, as in qemu-img.
    pub offload: bool,
    /// Unreadable source ranges become zeroes with a warning (`--salvage`).
    pub salvage: bool,
    /// No warnings (`-q`).
    pub quiet: bool,
    /// Bytes per second written to the target at most (`-r`), 0 for no limit.
    pub rate_limit: u64,
}

impl CopyPlan {
    fn warn(&self, msg: &str) {
        if !self.quiet {
            eprintln!("img: warning: {msg}");
        }
    }
}

/// One request: a range of the sources and what it needs, numbered in guest order.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    seq: u64,
    offset: u64,
    len: u64,
    kind: Kind,
}

/// Cuts the sources into chunks, asking block status as it goes.
struct Planner<'a> {
    src: &'a Sources,
    plan: &'a CopyPlan,
    pos: u64,
    seq: u64,
    /// The last status answer and where its run starts.
    run: Option<(u64, Run)>,
}

impl Planner<'_> {
    /// The run at `pos`: the last answer while `pos` is inside it, so a long run is
    /// asked for once however many chunks it makes.
    fn run_at(&mut self, pos: u64) -> Result<Run, String> {
        if let Some((start, run)) = self.run {
            if (start..run.end).contains(&pos) {
                return Ok(run);
            }
        }
        let top_only = self.plan.target_backing;
        let mut run = if self.plan.salvage {
            self.src
                .status_salvaging(pos, top_only, &|m| self.plan.warn(m))?
        } else {
            self.src.status(pos, top_only, u64::MAX)?
        };
        if let Some(be) = self.plan.backing_end {
            if pos < be {
                run.end = run.end.min(be);
            } else if run.kind == Kind::Zero {
                run.kind = Kind::Backing;
            }
        }
        self.run = Some((pos, run));
        Ok(run)
    }

    /// The kind of the unit `[start, end)`: one kind throughout, or data when mixed (a
    /// compressed cluster is written whole).
    fn unit_kind(&mut self, start: u64, end: u64) -> Result<Kind, String> {
        let first = self.run_at(start)?.kind;
        let mut p = start;
        while p < end {
            let run = self.run_at(p)?;
            if run.kind != first {
                return Ok(Kind::Data);
            }
            p = run.end;
        }
        Ok(first)
    }

    fn next(&mut self) -> Result<Option<Chunk>, String> {
        let total = self.src.size();
        let pos = self.pos;
        if pos >= total {
            return Ok(None);
        }
        let chunk = if self.plan.compressed {
            COMPRESSED_CHUNK.max(self.plan.cluster_size.unwrap_or(0))
        } else {
            CHUNK
        };
        let limit = ((pos / chunk + 1) * chunk).min(total);
        let (kind, end) = match (self.plan.compressed, self.plan.cluster_size) {
            (true, Some(cs)) => {
                // Whole clusters of one kind.
                let unit_end = |p: u64| ((p / cs + 1) * cs).min(total);
                let kind = self.unit_kind(pos, unit_end(pos))?;
                let mut end = unit_end(pos);
                while end < limit && self.unit_kind(end, unit_end(end))? == kind {
                    end = unit_end(end);
                }
                (kind, end.min(limit))
            }
            _ => {
                let run = self.run_at(pos)?;
                let mut end = run.end;
                if let Some(piece) = run.piece {
                    // Compressed runs that block status reports a cluster at a time are
                    // taken together up to the piece.
                    let stop = (pos + piece).min(limit);
                    while end < stop {
                        let next = self.run_at(end)?;
                        if next.kind != run.kind || next.piece.is_none() {
                            break;
                        }
                        end = next.end;
                    }
                    end = end.min(pos + piece);
                }
                (run.kind, end.min(limit))
            }
        };
        self.pos = end;
        self.seq += 1;
        Ok(Some(Chunk {
            seq: self.seq - 1,
            offset: pos,
            len: end - pos,
            kind,
        }))
    }
}

/// One write to the target, its data (if any) in the worker's buffer.
enum Op {
    Write {
        offset: u64,
        data: Range<usize>,
    },
    Zeroes {
        offset: u64,
        len: u64,
    },
    Compressed {
        offset: u64,
        data: Range<usize>,
        packed: CompressedCluster,
    },
    /// The kernel copies the range from the sources (`-C`).
    Offload {
        offset: u64,
        len: u64,
    },
}

/// What the workers share.
struct Shared<'a> {
    src: &'a Sources,
    target: &'a Image,
    plan: &'a CopyPlan,
    progress: &'a Progress,
    planner: Mutex<Planner<'a>>,
    /// Whose turn it is to write (in-order mode).
    turn: Turn,
    failed: AtomicBool,
    error: Mutex<Option<String>>,
    /// The unit of zero detection.
    zero_unit: u64,
    target_size: u64,
    /// Copy offloading is on: asked for, and not yet refused by the files.
    offload: AtomicBool,
    throttle: Throttle,
}

impl Shared<'_> {
    fn fail(&self, e: String) {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
        self.failed.store(true, Ordering::SeqCst);
        self.turn.stop();
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    fn worker(&self) {
        let mut buf = PageBuf::default();
        while !self.failed() {
            let next = self
                .planner
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .next();
            let chunk = match next {
                Ok(Some(c)) => c,
                Ok(None) => return,
                Err(e) => return self.fail(e),
            };
            let ops = match self.prepare(&chunk, &mut buf) {
                Ok(ops) => ops,
                Err(e) => return self.fail(e),
            };
            if self.plan.in_order && !self.turn.wait(chunk.seq) {
                return;
            }
            let r = match self.execute(ops, buf.bytes()) {
                // As qemu-img: once the files refuse offloading, copy as without -C.
                Ok(false) => {
                    self.offload.store(false, Ordering::Relaxed);
                    self.prepare(&chunk, &mut buf)
                        .and_then(|ops| self.execute(ops, buf.bytes()).map(drop))
                }
                r => r.map(drop),
            };
            // A failed write stops the copy before the next chunk's turn comes: nothing is
            // written past the first failure, as with qemu-img's in-order writes.
            if let Err(e) = r {
                return self.fail(e);
            }
            if self.plan.in_order {
                self.turn.done();
            }
            self.progress.advance(chunk.len);
        }
    }

    /// Read, scan and compress one chunk into the writes it needs.
    fn prepare(&self, c: &Chunk, buf: &mut PageBuf) -> Result<Vec<Op>, String> {
        let len = c.len as usize;
        let plan = self.plan;
        match c.kind {
            Kind::Backing => return Ok(Vec::new()),
            Kind::Zero if plan.min_sparse != 0 => {
                return Ok(self.zeroes(c.offset, c.len).into_iter().collect());
            }
            Kind::Zero => {
                // -S 0: zeroes are written as data.
                buf.take(len).fill(0);
            }
            // The kernel copies into raw files and into qcow2's clusters, as QEMU's copy
            // offloading does.
            Kind::Data
                if self.offload.load(Ordering::Relaxed)
                    && matches!(self.target.format(), Format::Raw | Format::Qcow2) =>
            {
                return Ok(vec![Op::Offload {
                    offset: c.offset,
                    len: c.len,
                }]);
            }
            Kind::Data => {
                let b = buf.take(len);
                if plan.salvage {
                    let warn = |m: &str| plan.warn(m);
                    self.src.read_salvaging(c.offset, b, &warn)?;
                } else {
                    self.src.read(c.offset, b)?;
                }
            }
        }
        let mut ops = Vec::new();
        match (plan.compressed, plan.cluster_size) {
            (true, Some(cs)) => {
                for (i, cluster) in buf.bytes().chunks(cs as usize).enumerate() {
                    let at = i * cs as usize;
                    let offset = c.offset + at as u64;
                    let data = at..at + cluster.len();
                    if plan.min_sparse != 0 && is_zero(cluster) {
                        ops.extend(self.zeroes(offset, cluster.len() as u64));
                    } else if cluster.len() as u64 != cs
                        && offset + cluster.len() as u64 != self.target_size
                    {
                        // A partial cluster that is not the target's last: written plainly.
                        ops.push(Op::Write { offset, data });
                    } else {
                        let packed = self.target.compress_cluster(cluster).map_err(|e| {
                            format!(
                                "error while compressing sector {}: {}",
                                offset / SECTOR,
                                engine_msg(&e)
                            )
                        })?;
                        ops.push(Op::Compressed {
                            offset,
                            data,
                            packed,
                        });
                    }
                }
            }
            _ if plan.min_sparse == 0 => ops.push(Op::Write {
                offset: c.offset,
                data: 0..len,
            }),
            _ => self.split_zero_runs(c.offset, buf.bytes(), &mut ops),
        }
        Ok(ops)
    }

    /// Writes for `data` at `offset`: zero units as zeroes, runs of the others as data.
    fn split_zero_runs(&self, offset: u64, data: &[u8], ops: &mut Vec<Op>) {
        let unit = self.zero_unit;
        let mut run: Option<(bool, usize)> = None;
        let mut at = 0usize;
        let flush = |zero: bool, start: usize, end: usize, ops: &mut Vec<Op>| {
            let o = offset + start as u64;
            if zero {
                ops.extend(self.zeroes(o, (end - start) as u64));
            } else {
                ops.push(Op::Write {
                    offset: o,
                    data: start..end,
                });
            }
        };
        while at < data.len() {
            let abs = offset + at as u64;
            let end = (((abs / unit + 1) * unit - offset) as usize).min(data.len());
            let zero = is_zero(&data[at..end]);
            match run {
                Some((z, _)) if z == zero => {}
                Some((z, start)) => {
                    flush(z, start, at, ops);
                    run = Some((zero, at));
                }
                None => run = Some((zero, at)),
            }
            at = end;
        }
        if let Some((z, start)) = run {
            flush(z, start, data.len(), ops);
        }
    }

    /// The write that makes `len` bytes at `offset` read as zeroes, if one is needed.
    fn zeroes(&self, offset: u64, len: u64) -> Option<Op> {
        (!self.plan.has_zero_init).then_some(Op::Zeroes { offset, len })
    }

    /// Make the writes; `Ok(false)` when the files refused an offloaded copy.
    fn execute(&self, ops: Vec<Op>, buf: &[u8]) -> Result<bool, String> {
        let t = self.target;
        for op in ops {
            let (offset, r) = match op {
                Op::Write { offset, data } => {
                    self.throttle.admit(data.len() as u64);
                    (offset, t.driver().write_at(&buf[data], offset))
                }
                Op::Zeroes { offset, len } => {
                    self.throttle.admit(len);
                    (offset, t.driver().write_zeroes(offset, len, true))
                }
                Op::Compressed {
                    offset,
                    data,
                    packed,
                } => {
                    self.throttle.admit(data.len() as u64);
                    let r = t.write_compressed_prepared(offset, &buf[data], &packed);
                    (offset, r)
                }
                Op::Offload { offset, len } => {
                    // Decided in turn: after the first refusal no later chunk offloads.
                    // Any failure falls back to reading and writing, which reports
                    // whatever is really wrong.
                    if !self.offload.load(Ordering::Relaxed) {
                        return Ok(false);
                    }
                    self.throttle.admit(len);
                    if !self.src.copy_out(offset, len, t).unwrap_or(false) {
                        return Ok(false);
                    }
                    continue;
                }
            };
            r.map_err(|e| format!("error while writing at byte {offset}: {}", io_msg(&e)))?;
        }
        Ok(true)
    }
}

/// Copy `src` into `target` as `plan` says, then flush the target.
pub fn copy(
    src: &Sources,
    target: &Image,
    plan: &CopyPlan,
    progress: &Progress,
) -> Result<(), String> {
    let sparse_unit = match plan.min_sparse {
        0 => SECTOR,
        s => 1 << s.ilog2(),
    };
    let shared = Shared {
        src,
        target,
        plan,
        progress,
        planner: Mutex::new(Planner {
            src,
            plan,
            pos: 0,
            seq: 0,
            run: None,
        }),
        turn: Turn::default(),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        // A cluster is allocated whole anyway: no point in finer zero runs.
        zero_unit: sparse_unit.max(plan.cluster_size.unwrap_or(1)).min(CHUNK),
        target_size: target.driver().size(),
        // QEMU's offloading reaches raw files and qcow2 images; into any other format it
        // is refused at the first try, and the copy goes on as without it.
        offload: AtomicBool::new(
            plan.offload && matches!(target.format(), Format::Raw | Format::Qcow2),
        ),
        throttle: Throttle::new(plan.rate_limit),
    };
    progress.start(src.size());
    let workers = if plan.compressed {
        // Compression is bound by the CPUs: two workers each keep them busy while finished
        // chunks wait for their turn to be written, with little memory held.
        2 * std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        plan.in_flight
    };
    std::thread::scope(|s| {
        for _ in 0..workers {
            std::thread::Builder::new()
                .stack_size(common::open::IO_THREAD_STACK)
                .spawn_scoped(s, || shared.worker())
                .expect("start a copy worker thread");
        }
    });
    if let Some(e) = shared.error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    target
        .driver()
        .flush()
        .map_err(|e| format!("error while flushing: {}", engine_msg(&e)))
}

/// Whether `data` is all zero bytes, eight words at a time.
fn is_zero(data: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u64.
    let (head, words, tail) = unsafe { data.align_to::<u64>() };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && words
            .chunks(8)
            .all(|w| w.iter().fold(0, |acc, &x| acc | x) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_scan() {
        let mut v = vec![0u8; 10000];
        assert!(is_zero(&v));
        assert!(is_zero(&v[3..9999]));
        for i in [0, 1, 7, 8, 63, 64, 5000, 9999] {
            v[i] = 1;
            assert!(!is_zero(&v), "{i}");
            v[i] = 0;
        }
    }

    /// Compressed source data is cut into pieces of one source cluster (at least 64 KiB),
    /// whole clusters each; uncompressed data and zeroes into 2 MiB chunks.
    #[test]
    fn compressed_sources_are_cut_into_whole_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("src.raw");
        let mut data: Vec<u8> = (0..6u32 << 20).map(|i| (i / 97 % 251) as u8).collect();
        data.resize(12 << 20, 0);
        std::fs::write(&raw, &data).unwrap();
        let plan = CopyPlan {
            compressed: false,
            min_sparse: 4096,
            in_order: true,
            in_flight: 1,
            has_zero_init: true,
            target_backing: false,
            backing_end: None,
            cluster_size: None,
            offload: false,
            salvage: false,
            quiet: true,
            rate_limit: 0,
        };
        for (opts, compressed, piece) in [
            ("cluster_size=2M", true, 2u64 << 20),
            ("cluster_size=4k", true, 64 << 10),
            ("cluster_size=64k", false, 2 << 20),
        ] {
            let img = dir.path().join("src.qcow2");
            let mut args = vec!["convert", "-q", "-O", "qcow2", "-o", opts];
            if compressed {
                args.push("-c");
            }
            let made = std::process::Command::new("qemu-img")
                .args(args)
                .arg(&raw)
                .arg(&img)
                .status()
                .unwrap();
            assert!(made.success());
            let opened =
                common::open::open_image(&img, &common::open::OpenOptions::default()).unwrap();
            let src = Sources::new(vec![opened]);
            let mut planner = Planner {
                src: &src,
                plan: &plan,
                pos: 0,
                seq: 0,
                run: None,
            };
            let mut chunks = Vec::new();
            while let Some(c) = planner.next().unwrap() {
                chunks.push((c.offset, c.len, c.kind));
            }
            let data_chunks: Vec<_> = (0..(6 << 20) / piece)
                .map(|i| (i * piece, piece, Kind::Data))
                .collect();
            let zero_chunks: Vec<_> = (3..6).map(|i| (i << 21, 2 << 20, Kind::Zero)).collect();
            assert_eq!(chunks, [data_chunks, zero_chunks].concat(), "{opts}");
        }
    }
}
