//! `img commit`: write what an overlay (and the layers between it and the base) holds into
//! the base, then empty the overlay, like `qemu-img commit`. Data is read through the
//! overlay's chain, so the base ends up with exactly what the overlay showed; zero
//! clusters become zeroes in the base.

use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::Args;
use common::open::{Format, Image, OpenOptions};
use common::prealloc::Preallocation;
use common::{Allocation, BlockDriver, Error};

use crate::chain::{find_backing_image, layer_names};
use crate::convert::cache_is_direct;
use crate::errors::{engine_msg, CmdResult, Failure};
use crate::imgopen::{open_named, Named};
use crate::objects::{self, Objects};
use crate::progress::Progress;
use crate::size::cvtnum;
use crate::workers::for_each_piece;

/// `img commit [-f FMT] [-t CACHE] [-b BASE] [-d] [-p] [-q] [-r RATE] FILE`
#[derive(Args, Debug, Default)]
pub struct CommitArgs {
    /// Image format (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// FILE is an option string (driver=FMT,file.filename=PATH,...), not a file name
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Define an object (QEMU's --object: only `secret` is taken)
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
    /// Cache mode of the images written
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// The image of the backing chain to commit into (default: the backing file); implies -d
    #[arg(short = 'b', long = "base", value_name = "BASE")]
    pub base: Option<String>,
    /// Do not empty FILE afterwards
    #[arg(short = 'd', long = "drop")]
    pub drop: bool,
    /// I/O rate limit in bytes per second
    #[arg(
        short = 'r',
        long = "rate-limit",
        value_name = "RATE",
        allow_hyphen_values = true
    )]
    pub rate: Option<String>,
    /// Show progress
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// FILE
    #[arg(value_name = "FILE")]
    pub args: Vec<String>,
}

const CMD: &str = "commit";

/// What the base gets for a range the layers above it hold.
#[derive(Debug, Clone)]
enum Piece {
    /// The overlay's contents, read through its chain.
    Data(Range<u64>),
    /// Zeroes (the base may unmap).
    Zero(Range<u64>),
    /// Nothing reads there: discarded.
    Discard(Range<u64>),
}

/// Run `img commit`.
pub fn run(a: &CommitArgs) -> CmdResult {
    if objects::create(&a.object)? == Objects::HelpShown {
        return Ok(0);
    }
    let rate = match &a.rate {
        Some(r) => cvtnum("rate limit", r).map_err(Failure::msg)?,
        None => 0,
    };
    if a.args.len() != 1 {
        return Err(Failure::usage(CMD, "Expecting one image file name"));
    }
    let direct = cache_is_direct(a.cache.as_deref()).ok_or_else(|| {
        Failure::msg(format!(
            "Invalid cache option: {}",
            a.cache.as_deref().unwrap_or("")
        ))
    })?;
    let opts = OpenOptions {
        direct,
        no_flush: a.cache.as_deref() == Some("unsafe"),
        ..Default::default()
    };
    let named =
        Named::resolve(&a.args[0], a.format.as_deref(), a.image_opts).map_err(Failure::msg)?;
    let name = &named.name;
    let image = named.open(opts.clone()).map_err(Failure::msg)?;
    let progress = Progress::new(a.progress && !a.quiet);
    let depth = match &a.base {
        Some(base) => find_backing_image(name, &image, base).ok_or_else(|| {
            Failure::msg(format!(
                "Did not find '{base}' in the backing chain of '{name}'"
            ))
        })?,
        None if image.layer(1).is_some() => 1,
        None => return Err(Failure::msg("Image does not have a backing file")),
    };
    let size = image.driver().size();
    let base = image.layer(depth).expect("the base was found in the chain");
    let grow = (base.size() < size).then(|| {
        let name = layer_names(name, &image).swap_remove(depth as usize);
        (name, base.format_name())
    });
    // Open again with the base writable (the lower layers are read-only until now),
    // grown first to the overlay's size as QEMU's commit job does.
    drop(image);
    if let Some((base, format)) = grow {
        grow_base(&base, format, size, &opts)
            .map_err(|e| Failure::msg(format!("Block job failed: {e}")))?;
    }
    let opts = OpenOptions {
        writable_backing: Some(depth),
        ..opts
    };
    let image = named.open(opts).map_err(Failure::msg)?;
    commit(&image, depth, rate, &progress)
        .map_err(|e| Failure::msg(format!("Block job failed: {e}")))?;
    if !(a.drop || a.base.is_some()) {
        match image.make_empty() {
            Ok(()) | Err(Error::Unsupported(_)) => {}
            Err(e) => return Err(Failure::msg(engine_msg(&e))),
        }
    }
    progress.finish();
    image
        .driver()
        .flush()
        .map_err(|e| Failure::msg(format!("Error while closing the image: {}", engine_msg(&e))))?;
    drop(image);
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(0)
}

/// Grow the base (named as QEMU names chain layers) to `size` bytes.
fn grow_base(name: &str, format: &str, size: u64, opts: &OpenOptions) -> Result<(), String> {
    let opts = OpenOptions {
        format: Some(Format::from_name(format).map_err(|e| engine_msg(&e))?),
        ..opts.clone()
    };
    let base = open_named(name, &opts)?;
    base.resize(size, Preallocation::Off)
        .map_err(|e| engine_msg(&e))
}

/// Copy into the layer at `depth` every range the layers above it hold.
fn commit(image: &Image, depth: u32, rate: u64, progress: &Progress) -> Result<(), String> {
    let top = image.driver();
    let base = image.layer(depth).expect("the base was found in the chain");
    let pieces = plan(top, base, depth).map_err(|e| engine_msg(&e))?;
    progress.start(pieces.iter().map(|p| p.range().end - p.range().start).sum());
    let limit = RateLimit::new(rate);
    let buffer = || vec![0u8; MAX_IO.max(granularity(base)) as usize];
    for_each_piece(&pieces, buffer, |buf, p| {
        let r = p.range();
        let n = r.end - r.start;
        match p {
            Piece::Data(r) => {
                limit.wait(n);
                let buf = &mut buf[..n as usize];
                top.read_at(buf, r.start)
                    .and_then(|_| base.write_at(buf, r.start))
            }
            Piece::Zero(r) => base.write_zeroes(r.start, n, true),
            Piece::Discard(r) => base.discard(r.start, n),
        }
        .map_err(|e| engine_msg(&e))?;
        progress.advance(n);
        Ok(())
    })?;
    base.flush().map_err(|e| engine_msg(&e))
}

/// The largest data request (QEMU's mirror job: 1 MiB).
const MAX_IO: u64 = 1 << 20;

/// QEMU's granularity for a commit into `base`: its cluster size within 4 to 64 KiB.
fn granularity(base: &dyn BlockDriver) -> u64 {
    base.clusters()
        .map_or(64 << 10, |c| c.cluster.clamp(4 << 10, 64 << 10))
}

/// What the base gets, as QEMU's commit job decides it, so that the base ends up
/// allocated as qemu-img leaves it: every `granularity` chunk holding anything the layers
/// above `depth` hold is copied; a chunk-aligned run that reads as zeroes (or nothing)
/// throughout, aligned to the base's allocation unit, is zeroed (or discarded) instead.
fn plan(top: &dyn BlockDriver, base: &dyn BlockDriver, depth: u32) -> common::Result<Vec<Piece>> {
    let size = top.size();
    let g = granularity(base);
    let unit = base.clusters().map_or(1, |c| c.subcluster);
    let mut dirty: Vec<Range<u64>> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let st = top.block_status(pos, size - pos)?;
        if st.depth < depth && st.allocation != Allocation::Unallocated {
            let (a, b) = (pos - pos % g, (pos + st.len).next_multiple_of(g).min(size));
            match dirty.last_mut() {
                Some(last) if last.end >= a => last.end = last.end.max(b),
                _ => dirty.push(a..b),
            }
        }
        pos += st.len;
    }
    let mut pieces = Vec::new();
    for run in dirty {
        let mut off = run.start;
        while off < run.end {
            // Asking for more than one request's worth would only map clusters to drop:
            // what comes of it is the same in steps of MAX_IO (a multiple of `g`).
            let st = top.block_status(off, (run.end - off).min(MAX_IO))?;
            // Like QEMU's mirror, data over a hole is still data: copied, not zeroed.
            let data = matches!(
                st.allocation,
                Allocation::Data | Allocation::DataOverHole | Allocation::Undetermined
            );
            let mut io = if data { st.len.min(MAX_IO) } else { st.len };
            io -= io % g;
            let mut whole = None;
            if io < g {
                io = g;
            } else if !data && off % unit == 0 && io % unit == 0 {
                whole = Some(st.allocation);
            }
            let r = off..(off + io).min(size);
            off = r.end;
            pieces.push(match whole {
                Some(Allocation::Zero) => Piece::Zero(r),
                Some(_) => Piece::Discard(r),
                None => Piece::Data(r),
            });
        }
    }
    Ok(pieces)
}

impl Piece {
    fn range(&self) -> &Range<u64> {
        match self {
            Piece::Data(r) | Piece::Zero(r) | Piece::Discard(r) => r,
        }
    }
}

/// `-r`: data requests start no faster than `rate` bytes per second allow (0: no limit).
struct RateLimit {
    rate: u64,
    start: Instant,
    granted: Mutex<u64>,
}

impl RateLimit {
    fn new(rate: u64) -> RateLimit {
        RateLimit {
            rate,
            start: Instant::now(),
            granted: Mutex::new(0),
        }
    }

    /// Wait until `n` more bytes are within the rate.
    fn wait(&self, n: u64) {
        if self.rate == 0 {
            return;
        }
        let due = {
            let mut g = self.granted.lock().unwrap_or_else(|p| p.into_inner());
            let due = Duration::from_secs_f64(*g as f64 / self.rate as f64);
            *g += n;
            due
        };
        if let Some(left) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(left);
        }
    }
}
