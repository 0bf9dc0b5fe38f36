//! Side-by-side benchmark of the engine's `BlockDriver` path against `qemu-img bench`.
//!
//! Not a test. Run it through `fixtures/bench.sh`, or directly:
//!
//! ```text
//! cargo run --release -p common --example bench -- IMAGE [options]
//!   -f, --format raw|qcow2      image format (default: probe)
//!   -w, --workloads LIST        comma list of rand-read,rand-write,seq-read,seq-write
//!                               (default: all four)
//!   -c, --count N               requests per 4K run (default 50000)
//!       --seq-count N           requests per sequential run (default: one pass over the
//!                               image, at least 2 GiB, wrapping like qemu-img bench)
//!       --seq-size BYTES        request size of sequential runs (default 1M)
//!   -d, --depth LIST            comma list of queue depths (ours: threads) (default 1,8)
//!   -t, --cache writeback|none  (none = O_DIRECT; ours supports it for raw only)
//!   -r, --repeat N              best of N runs per side, alternating sides (default 3)
//!       --flush-interval N      flush after every N requests (writes)
//!       --no-qemu               only run ours
//!       --no-copy               run on IMAGE itself instead of a fresh copy per run
//! ```
//!
//! Request offsets follow `qemu-img bench` exactly: request `i` goes to
//! `(offset + i * step) % image_size` (QEMU 10.0's rule). "rand" workloads use a 4 KiB
//! request with a step of 7919 * 4 KiB, which on a power-of-two image visits every 4 KiB
//! block once in a scattered order (qemu-img bench has no random mode, so this is the
//! comparable "random" pattern). Every run (ours and qemu's) starts from a fresh sparse
//! copy of IMAGE so write runs see the same allocation state.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use common::{BlockDriver, Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cache {
    Writeback,
    None,
}

#[derive(Debug, Clone)]
struct Params {
    count: u64,
    depth: usize,
    bufsize: u64,
    step: u64,
    offset: u64,
    write: bool,
    pattern: u8,
    flush_interval: u64,
    cache: Cache,
}

impl Params {
    /// Offset of request `i`, as `qemu-img bench` computes it.
    fn offset_of(&self, i: u64, size: u64) -> u64 {
        if i == 0 {
            return self.offset;
        }
        if size == 0 {
            return 0;
        }
        let off = ((self.offset as u128 + i as u128 * self.step as u128) % size as u128) as u64;
        if off + self.bufsize > size {
            0
        } else {
            off
        }
    }
}

struct Opts {
    image: PathBuf,
    format: Option<String>,
    workloads: Vec<String>,
    count: u64,
    seq_count: Option<u64>,
    seq_size: u64,
    depths: Vec<usize>,
    cache: Cache,
    repeat: usize,
    flush_interval: u64,
    qemu: bool,
    copy: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench IMAGE [-f raw|qcow2] [-w rand-read,rand-write,seq-read,seq-write] \
         [-c COUNT] [--seq-count N] [--seq-size BYTES] [-d DEPTHS] [-t writeback|none] \
         [-r REPEAT] [--flush-interval N] [--no-qemu] [--no-copy]"
    );
    std::process::exit(2)
}

fn parse_size(s: &str) -> u64 {
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().unwrap_or_else(|_| usage()) * mul
}

fn parse_args() -> Opts {
    let mut args = std::env::args().skip(1);
    let mut o = Opts {
        image: PathBuf::new(),
        format: None,
        workloads: ["rand-read", "rand-write", "seq-read", "seq-write"]
            .map(String::from)
            .to_vec(),
        count: 50_000,
        seq_count: None,
        seq_size: 1 << 20,
        depths: vec![1, 8],
        cache: Cache::Writeback,
        repeat: 3,
        flush_interval: 0,
        qemu: true,
        copy: true,
    };
    let mut image = None;
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "-f" | "--format" => o.format = Some(val()),
            "-w" | "--workloads" => o.workloads = val().split(',').map(String::from).collect(),
            "-c" | "--count" => o.count = parse_size(&val()),
            "--seq-count" => o.seq_count = Some(parse_size(&val())),
            "--seq-size" => o.seq_size = parse_size(&val()),
            "-d" | "--depth" => {
                o.depths = val()
                    .split(',')
                    .map(|d| d.parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            "-t" | "--cache" => {
                o.cache = match val().as_str() {
                    "writeback" => Cache::Writeback,
                    "none" => Cache::None,
                    _ => usage(),
                }
            }
            "-r" | "--repeat" => o.repeat = val().parse().unwrap_or_else(|_| usage()),
            "--flush-interval" => o.flush_interval = parse_size(&val()),
            "--no-qemu" => o.qemu = false,
            "--no-copy" => o.copy = false,
            "-h" | "--help" => usage(),
            s if s.starts_with('-') => usage(),
            s => image = Some(PathBuf::from(s)),
        }
    }
    o.image = image.unwrap_or_else(|| usage());
    o.repeat = o.repeat.max(1);
    o
}

/// A buffer of `len` bytes aligned to 4 KiB (for O_DIRECT).
struct AlignedBuf {
    v: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize, fill: u8) -> Self {
        let mut v = vec![fill; len + 4096];
        let start = v.as_mut_ptr().align_offset(4096);
        AlignedBuf { v, start, len }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.v[self.start..self.start + self.len]
    }
}

fn open_ours(path: &Path, format: &str, write: bool, cache: Cache) -> Result<Box<dyn BlockDriver>> {
    if cache == Cache::None {
        if format != "raw" {
            return Err(Error::Unsupported(
                "cache=none: the engine has no O_DIRECT open for this format".into(),
            ));
        }
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| Error::io(format!("Could not open '{}'", path.display()), e))?;
        common::lock::lock_image(&file, path, !write, false)?;
        let storage = common::storage::FileStorage::new(file);
        return Ok(Box::new(common::raw::RawImage::from_storage(
            Box::new(storage),
            !write,
        )?));
    }
    open_engine(path, format, write)
}

fn open_engine(path: &Path, format: &str, write: bool) -> Result<Box<dyn BlockDriver>> {
    let opts = common::open::OpenOptions {
        read_only: !write,
        format: Some(common::open::Format::from_name(format)?),
        ..Default::default()
    };
    Ok(common::open::open_image(path, &opts)?.into_driver())
}

/// Run the workload through the engine; returns the seconds the I/O took.
fn run_ours(path: &Path, format: &str, p: &Params) -> Result<f64> {
    let img = open_ours(path, format, p.write, p.cache)?;
    let size = img.size();
    if size < p.bufsize {
        return Err(Error::invalid("image smaller than the request size"));
    }
    let next = AtomicU64::new(0);
    let failed = std::sync::Mutex::new(None::<Error>);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..p.depth.max(1) {
            s.spawn(|| {
                let mut buf = AlignedBuf::new(p.bufsize as usize, p.pattern);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= p.count {
                        break;
                    }
                    let off = p.offset_of(i, size);
                    let r = if p.write {
                        img.write_at(buf.get(), off)
                    } else {
                        img.read_at(buf.get(), off)
                    };
                    let r = r.and_then(|()| {
                        if p.flush_interval > 0 && (i + 1).is_multiple_of(p.flush_interval) {
                            img.flush()
                        } else {
                            Ok(())
                        }
                    });
                    if let Err(e) = r {
                        *failed.lock().unwrap() = Some(e);
                        next.store(p.count, Ordering::Relaxed);
                        break;
                    }
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    if let Some(e) = failed.into_inner().unwrap() {
        return Err(e);
    }
    Ok(secs)
}

/// Run the same workload with `qemu-img bench`; returns the seconds it reports.
fn run_qemu(path: &Path, format: &str, p: &Params) -> Result<f64> {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("bench")
        .args(["-f", format])
        .args(["-c", &p.count.to_string()])
        .args(["-d", &p.depth.to_string()])
        .args(["-s", &p.bufsize.to_string()])
        .args(["-S", &p.step.to_string()])
        .args(["-o", &p.offset.to_string()])
        .args([
            "-t",
            match p.cache {
                Cache::Writeback => "writeback",
                Cache::None => "none",
            },
        ]);
    if p.write {
        cmd.arg("-w").args(["--pattern", &p.pattern.to_string()]);
        if p.flush_interval > 0 {
            cmd.args(["--flush-interval", &p.flush_interval.to_string()]);
        }
    }
    cmd.arg(path);
    let out = cmd
        .output()
        .map_err(|e| Error::io("Could not run qemu-img bench", e))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(Error::invalid(format!(
            "qemu-img bench failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")
                .and_then(|r| r.strip_suffix(" seconds."))
                .and_then(|n| n.parse::<f64>().ok())
        })
        .ok_or_else(|| Error::invalid(format!("unexpected qemu-img bench output: {stdout}")))
}

fn fresh_copy(template: &Path, work: &Path) -> Result<()> {
    let st = Command::new("cp")
        .args(["--sparse=always", "--reflink=never"])
        .arg(template)
        .arg(work)
        .status()
        .map_err(|e| Error::io("Could not run cp", e))?;
    if !st.success() {
        return Err(Error::invalid("cp failed"));
    }
    std::fs::File::open(work)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io("Could not sync the copy", e))
}

type RunResult = std::result::Result<f64, String>;
/// One timed run on an image path, returning seconds.
type Runner<'a> = &'a dyn Fn(&Path) -> Result<f64>;

/// Best time of `o.repeat` runs per side, alternating ours and qemu's so that neither
/// side always runs on a page cache the other one just warmed or dirtied.
fn best_of_interleaved(
    o: &Opts,
    work: &Path,
    ours: Runner<'_>,
    qemu: Option<Runner<'_>>,
) -> (RunResult, Option<RunResult>) {
    let one = |run: &dyn Fn(&Path) -> Result<f64>| -> RunResult {
        let target = if o.copy {
            fresh_copy(&o.image, work).map_err(|e| e.to_string())?;
            work
        } else {
            &o.image
        };
        run(target).map_err(|e| e.to_string())
    };
    let fold = |acc: RunResult, r: RunResult| match (acc, r) {
        (Err(e), _) | (_, Err(e)) => Err(e),
        (Ok(a), Ok(b)) => Ok(a.min(b)),
    };
    let mut best_ours: RunResult = Ok(f64::INFINITY);
    let mut best_qemu: Option<RunResult> = qemu.map(|_| Ok(f64::INFINITY));
    for i in 0..o.repeat {
        // Alternate who goes first.
        let order: [bool; 2] = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_ours in order {
            if is_ours {
                if best_ours.is_ok() {
                    best_ours = fold(best_ours, one(ours));
                }
            } else if let (Some(q), Some(acc)) = (qemu, best_qemu.take()) {
                best_qemu = Some(if acc.is_ok() { fold(acc, one(q)) } else { acc });
            }
        }
    }
    (best_ours, best_qemu)
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{}M", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{}K", bytes >> 10)
    } else {
        bytes.to_string()
    }
}

/// Virtual size from `qemu-img info` ("virtual size: 1 GiB (1073741824 bytes)").
fn image_size(image: &Path, format: &str) -> u64 {
    Command::new("qemu-img")
        .args(["info", "-U", "-f", format])
        .arg(image)
        .output()
        .ok()
        .and_then(|out| {
            let s = String::from_utf8_lossy(&out.stdout).into_owned();
            let line = s.lines().find(|l| l.starts_with("virtual size:"))?;
            let open = line.rfind('(')?;
            line[open + 1..].split(' ').next()?.parse::<u64>().ok()
        })
        .unwrap_or_else(|| std::fs::metadata(image).map(|m| m.len()).unwrap_or(0))
}

fn main() {
    let o = parse_args();
    let format = match &o.format {
        Some(f) => f.clone(),
        None => match common::probe::probe_file(&o.image) {
            Ok(f) => f.name().to_string(),
            Err(e) => {
                eprintln!("bench: {e}");
                std::process::exit(1)
            }
        },
    };
    let size = image_size(&o.image, &format);
    let mut work = o.image.clone().into_os_string();
    work.push(".bench-work");
    let work = PathBuf::from(work);

    println!(
        "image: {} (format {format}, virtual size {}), cache={}, best of {}, {} CPUs",
        o.image.display(),
        human(size),
        if o.cache == Cache::None {
            "none"
        } else {
            "writeback"
        },
        o.repeat,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    println!(
        "{:<11} {:>5} {:>5} {:>7} {:>12} {:>10} {:>12} {:>10} {:>9}",
        "workload",
        "bs",
        "depth",
        "count",
        "ours ops/s",
        "ours MB/s",
        "qemu ops/s",
        "qemu MB/s",
        "ours/qemu"
    );
    for w in &o.workloads {
        let (bufsize, step, write) = match w.as_str() {
            "rand-read" => (4096, 4096 * 7919, false),
            "rand-write" => (4096, 4096 * 7919, true),
            "seq-read" => (o.seq_size, o.seq_size, false),
            "seq-write" => (o.seq_size, o.seq_size, true),
            other => {
                eprintln!("bench: unknown workload '{other}'");
                continue;
            }
        };
        let count = if bufsize == 4096 {
            o.count
        } else {
            o.seq_count
                .unwrap_or((size / bufsize).max(2048 * (1 << 20) / bufsize))
        };
        for &depth in &o.depths {
            let p = Params {
                count,
                depth,
                bufsize,
                step,
                offset: 0,
                write,
                pattern: 0xa5,
                flush_interval: if write { o.flush_interval } else { 0 },
                cache: o.cache,
            };
            let run_q = |path: &Path| run_qemu(path, &format, &p);
            let (ours, qemu) = best_of_interleaved(
                &o,
                &work,
                &|path| run_ours(path, &format, &p),
                o.qemu.then_some(&run_q as &dyn Fn(&Path) -> Result<f64>),
            );
            let cell = |r: &std::result::Result<f64, String>| match r {
                Ok(t) if *t < 0.001 => ("<1ms run".into(), "-".into()),
                Ok(t) => {
                    let ops = count as f64 / t;
                    (
                        format!("{ops:.0}"),
                        format!("{:.1}", ops * bufsize as f64 / 1e6),
                    )
                }
                Err(_) => ("error".into(), "-".into()),
            };
            let (oo, om) = cell(&ours);
            let (qo, qm) = qemu.as_ref().map_or(("-".into(), "-".into()), cell);
            let ratio = match (&ours, &qemu) {
                (Ok(a), Some(Ok(b))) if *a >= 0.001 && *b >= 0.001 => format!("{:.2}", b / a),
                _ => "-".into(),
            };
            println!(
                "{w:<11} {:>5} {depth:>5} {count:>7} {oo:>12} {om:>10} {qo:>12} {qm:>10} {ratio:>9}",
                human(bufsize)
            );
            if let Err(e) = &ours {
                println!("  ours: {e}");
            }
            if let Some(Err(e)) = &qemu {
                println!("  qemu: {e}");
            }
        }
    }
    if o.copy {
        let _ = std::fs::remove_file(&work);
    }
}
