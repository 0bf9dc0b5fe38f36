//! `img commit`: write what an overlay (and the layers between it and the base) holds into
//! the base, then empty the overlay, like `qemu-img commit`. Data is read through the
//! overlay's chain, so the base ends up with exactly what the overlay showed; zero
//! clusters become zeroes in the base.

use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::Args;
use common::open::{Image, OpenOptions};
use common::{Allocation, BlockDriver, Error};

use crate::chain::find_backing_image;
use crate::convert::cache_is_direct;
use crate::errors::{engine_msg, CmdResult, Failure};
use crate::imgopen::open_user_image;
use crate::progress::Progress;
use crate::size::cvtnum;
use crate::workers::for_each_piece;

/// `img commit [-f FMT] [-t CACHE] [-b BASE] [-d] [-p] [-q] [-r RATE] FILE`
#[derive(Args, Debug, Default)]
pub struct CommitArgs {
    /// Image format (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
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
/// The most bytes one request moves.
const CHUNK: u64 = 2 << 20;

/// What the base gets for a range the layers above it hold.
#[derive(Debug, Clone)]
enum Piece {
    Data(Range<u64>),
    Zero(Range<u64>),
}

/// Run `img commit`.
pub fn run(a: &CommitArgs) -> CmdResult {
    let rate = match &a.rate {
        Some(r) => cvtnum("rate limit", r).map_err(Failure::msg)?,
        None => 0,
    };
    if a.args.len() != 1 {
        return Err(Failure::usage(CMD, "Expecting one image file name"));
    }
    let name = &a.args[0];
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
    let image = open_user_image(name, a.format.as_deref(), opts.clone()).map_err(Failure::msg)?;
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
    // Open again with the base writable (the lower layers are read-only until now).
    drop(image);
    let opts = OpenOptions {
        writable_backing: Some(depth),
        ..opts
    };
    let image = open_user_image(name, a.format.as_deref(), opts).map_err(Failure::msg)?;
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

/// Copy into the layer at `depth` every range the layers above it hold.
fn commit(image: &Image, depth: u32, rate: u64, progress: &Progress) -> Result<(), String> {
    let top = image.driver();
    let base = image.layer(depth).expect("the base was found in the chain");
    if top.size() > base.size() {
        return Err(format!(
            "Committing into a smaller base image ({} bytes, the overlay has {}) is not supported",
            base.size(),
            top.size()
        ));
    }
    let pieces = plan(top, depth).map_err(|e| engine_msg(&e))?;
    progress.start(pieces.iter().map(|p| p.range().end - p.range().start).sum());
    let limit = RateLimit::new(rate);
    let buffer = || vec![0u8; CHUNK as usize];
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
        }
        .map_err(|e| engine_msg(&e))?;
        progress.advance(n);
        Ok(())
    })?;
    base.flush().map_err(|e| engine_msg(&e))
}

/// The ranges the layers above `depth` hold, data split into requests of `CHUNK` bytes.
fn plan(top: &dyn BlockDriver, depth: u32) -> common::Result<Vec<Piece>> {
    let size = top.size();
    let mut pieces = Vec::new();
    let mut pos = 0;
    while pos < size {
        let st = top.block_status(pos, size - pos)?;
        let end = pos + st.len;
        if st.depth < depth {
            match st.allocation {
                Allocation::Data => {
                    let mut at = pos;
                    while at < end {
                        let next = (at + CHUNK).min(end);
                        pieces.push(Piece::Data(at..next));
                        at = next;
                    }
                }
                Allocation::Zero => pieces.push(Piece::Zero(pos..end)),
                Allocation::Unallocated => {}
            }
        }
        pos = end;
    }
    Ok(pieces)
}

impl Piece {
    fn range(&self) -> &Range<u64> {
        match self {
            Piece::Data(r) | Piece::Zero(r) => r,
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
