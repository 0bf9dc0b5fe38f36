//! `img bench`: a simple I/O benchmark on an image, like `qemu-img bench`: `count`
//! requests of `bufsize` bytes, `depth` of them in flight (one engine thread each), at
//! offsets that start at `offset` and advance by `step`, wrapping before the end.

use std::sync::{Mutex, RwLock};
use std::time::Instant;

use clap::Args;
use common::open::OpenOptions;
use common::BlockDriver;

use crate::convert::cache_is_direct;
use crate::errors::{engine_msg, CmdResult, Failure};
use crate::imgopen::open_user_image;
use crate::size::{cvtnum, cvtnum_full, parse_c_u64, SizeError};

/// `img bench [-c COUNT] [-d DEPTH] [-f FMT] [-i AIO] [-n] [-o OFFSET] [-q] [-s SIZE]
/// [-S STEP] [-t CACHE] [-w] [--pattern=N] [--flush-interval=N] [--no-drain] [-U] FILE`
#[derive(Args, Debug, Default)]
pub struct BenchArgs {
    /// Number of requests (default 75000)
    #[arg(short = 'c', value_name = "COUNT", allow_hyphen_values = true)]
    pub count: Option<String>,
    /// Requests in flight at once (default 64)
    #[arg(short = 'd', value_name = "DEPTH", allow_hyphen_values = true)]
    pub depth: Option<String>,
    /// Image format (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// FILE is an option string (driver=FMT,file.filename=PATH,...), not a file name
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// AIO mode: threads, native or io_uring (accepted; the engine always uses threads)
    #[arg(short = 'i', value_name = "AIO")]
    pub aio: Option<String>,
    /// Native AIO (accepted; the engine always uses threads)
    #[arg(short = 'n')]
    pub native: bool,
    /// Offset of the first request
    #[arg(short = 'o', value_name = "OFFSET", allow_hyphen_values = true)]
    pub offset: Option<String>,
    /// Quiet (qemu-img still prints the two report lines)
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Bytes per request (default 4096)
    #[arg(short = 's', value_name = "BUFFER_SIZE", allow_hyphen_values = true)]
    pub buffer_size: Option<String>,
    /// Distance between request offsets (default the buffer size)
    #[arg(short = 'S', value_name = "STEP_SIZE", allow_hyphen_values = true)]
    pub step: Option<String>,
    /// Cache mode (none and directsync bypass the page cache)
    #[arg(short = 't', value_name = "CACHE")]
    pub cache: Option<String>,
    /// Write instead of read
    #[arg(short = 'w')]
    pub write: bool,
    /// Byte written by write requests (default 0)
    #[arg(long = "pattern", value_name = "PATTERN", allow_hyphen_values = true)]
    pub pattern: Option<String>,
    /// Flush after every N write requests
    #[arg(long = "flush-interval", value_name = "N", allow_hyphen_values = true)]
    pub flush_interval: Option<String>,
    /// Do not wait for requests in flight before a flush
    #[arg(long = "no-drain")]
    pub no_drain: bool,
    /// Open the image in shared mode
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// FILE
    #[arg(value_name = "FILE")]
    pub args: Vec<String>,
}

const CMD: &str = "bench";
const INT_MAX: u64 = i32::MAX as u64;

/// One benchmark run, as the options describe it.
#[derive(Debug, Clone, Copy)]
struct Plan {
    count: u64,
    depth: u64,
    offset: u64,
    bufsize: u64,
    step: u64,
    write: bool,
    pattern: u8,
    flush_interval: u64,
    drain: bool,
}

/// A plain integer option (C `strtoul`, base 0) between `min` and `max`.
fn int(what: &str, v: &Option<String>, min: u64, max: u64, default: u64) -> Result<u64, Failure> {
    let Some(s) = v else { return Ok(default) };
    match parse_c_u64(s) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Err(SizeError::Invalid) => Err(Failure::msg(format!("Invalid {what} specified: '{s}'."))),
        _ => Err(Failure::msg(format!(
            "Invalid {what} specified. Must be between {min} and {max}."
        ))),
    }
}

/// A size option (qemu-img's `cvtnum_full`) between `min` and `max`.
fn size(what: &str, v: &Option<String>, min: u64, max: u64, default: u64) -> Result<u64, Failure> {
    match v {
        Some(s) => cvtnum_full(what, s, min, max).map_err(Failure::msg),
        None => Ok(default),
    }
}

fn plan(a: &BenchArgs) -> Result<Plan, Failure> {
    let count = int("request count", &a.count, 1, INT_MAX, 75000)?;
    let depth = int("queue depth", &a.depth, 1, INT_MAX, 64)?;
    if let Some(m) = &a.aio {
        if !matches!(m.as_str(), "threads" | "native" | "io_uring") {
            return Err(Failure::msg(format!("Invalid aio option: {m}")));
        }
    }
    let offset = match &a.offset {
        Some(s) => cvtnum("offset", s).map_err(Failure::msg)?,
        None => 0,
    };
    let bufsize = size("buffer size", &a.buffer_size, 1, INT_MAX, 4096)?;
    let step = size("step size", &a.step, 0, INT_MAX, 0)?;
    if cache_is_direct(a.cache.as_deref()).is_none() {
        return Err(Failure::msg("Invalid cache mode"));
    }
    let pattern = int("pattern byte", &a.pattern, 0, 0xff, 0)? as u8;
    let flush_interval = int("flush interval", &a.flush_interval, 0, INT_MAX, 0)?;
    Ok(Plan {
        count,
        depth,
        offset,
        bufsize,
        step: if step == 0 { bufsize } else { step },
        write: a.write,
        pattern,
        flush_interval,
        drain: !a.no_drain,
    })
}

/// Run `img bench`.
pub fn run(a: &BenchArgs) -> CmdResult {
    let p = plan(a)?;
    if a.args.len() != 1 {
        return Err(Failure::usage(CMD, "Expecting one image file name"));
    }
    if !p.write && p.flush_interval > 0 {
        return Err(Failure::msg(
            "--flush-interval is only available in write tests",
        ));
    }
    if p.flush_interval > 0 && p.flush_interval < p.depth {
        return Err(Failure::msg("Flush interval can't be smaller than depth"));
    }
    let name = &a.args[0];
    let image = open_user_image(
        name,
        a.format.as_deref(),
        a.image_opts,
        OpenOptions {
            read_only: !p.write,
            force_share: a.force_share,
            direct: cache_is_direct(a.cache.as_deref()) == Some(true),
            ..Default::default()
        },
    )
    .map_err(Failure::msg)?;
    println!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        p.count,
        if p.write { "write" } else { "read" },
        p.bufsize,
        p.depth,
        p.offset,
        p.step
    );
    if p.flush_interval > 0 {
        println!("Sending flush every {} requests", p.flush_interval);
    }
    let start = Instant::now();
    execute(image.driver(), &p).map_err(|e| Failure::msg(format!("Failed request: {e}")))?;
    println!(
        "Run completed in {:.3} seconds.",
        start.elapsed().as_secs_f64()
    );
    Ok(0)
}

/// Offsets in qemu-img's order: each request `step` after the previous one, modulo the
/// image size (a request that then crosses the end fails, as qemu-img's does).
struct Offsets {
    next: u64,
    issued: u64,
}

impl Offsets {
    fn take(&mut self, p: &Plan, size: u64) -> Option<(u64, bool)> {
        if self.issued == p.count {
            return None;
        }
        let at = self.next;
        self.issued += 1;
        self.next = (at + p.step).checked_rem(size).unwrap_or(0);
        let flush = p.flush_interval > 0 && self.issued.is_multiple_of(p.flush_interval);
        Some((at, flush))
    }
}

/// Issue the requests from `depth` threads; requests hold `gate` shared while in flight,
/// so that a draining flush waits for them by taking it exclusively.
fn execute(d: &dyn BlockDriver, p: &Plan) -> Result<(), String> {
    let size = d.size();
    let offsets = Mutex::new(Offsets {
        next: p.offset,
        issued: 0,
    });
    let gate = RwLock::new(());
    let threads = p.depth.min(p.count) as usize;
    std::thread::scope(|s| {
        let workers: Vec<std::thread::ScopedJoinHandle<'_, Result<(), String>>> = (0..threads)
            .map(|_| {
                // Image I/O threads get the stack a read through the deepest chain needs.
                let thread = std::thread::Builder::new().stack_size(common::open::IO_THREAD_STACK);
                thread.spawn_scoped(s, || -> Result<(), String> {
                    let mut buf = vec![p.pattern; p.bufsize as usize];
                    loop {
                        let Some((at, flush)) = offsets.lock().expect("offsets").take(p, size)
                        else {
                            return Ok(());
                        };
                        if at + p.bufsize > size {
                            return Err("Input/output error".to_string());
                        }
                        let len = p.bufsize as usize;
                        {
                            let _in_flight = gate.read().expect("gate");
                            let r = if p.write {
                                d.write_at(&buf[..len], at)
                            } else {
                                d.read_at(&mut buf[..len], at)
                            };
                            r.map_err(|e| engine_msg(&e))?;
                        }
                        if flush {
                            let _drained = p.drain.then(|| gate.write().expect("gate"));
                            d.flush().map_err(|e| engine_msg(&e))?;
                        }
                    }
                })
            })
            .collect::<Result<_, _>>()
            .map_err(|e| format!("Could not start a bench thread: {e}"))?;
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("bench worker"))
    })?;
    if p.write {
        d.flush().map_err(|e| engine_msg(&e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_wrap_like_qemu() {
        let p = Plan {
            count: 5,
            depth: 1,
            offset: 4096,
            bufsize: 4096,
            step: 8192,
            write: true,
            pattern: 0,
            flush_interval: 2,
            drain: true,
        };
        let mut o = Offsets {
            next: p.offset,
            issued: 0,
        };
        let got: Vec<_> = std::iter::from_fn(|| o.take(&p, 16384)).collect();
        assert_eq!(
            got,
            [
                (4096, false),
                (12288, true),
                (4096, false),
                (12288, true),
                (4096, false)
            ]
        );
    }
}
