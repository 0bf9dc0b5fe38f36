//! `img compare`: whether two images read the same, like `qemu-img compare` (exit 0 the
//! same, 1 different, 2 an error opening them, 3 or 4 an error reading them).
//!
//! Ranges both chains report as zero are skipped; the rest is read in bounded chunks.
//! Offsets are reported as qemu-img does: the 512-byte sector holding the first difference.

use clap::Args;
use common::driver::{Allocation, BlockDriver};
use common::open::{Image, OpenOptions};

use crate::errors::{engine_msg, CmdResult, Failure};
use crate::imgopen::open_user_image;
use crate::objects::{self, Objects};

/// `img compare [-f FMT] [-F FMT] [-T SRC_CACHE] [-p] [-q] [-s] [-U] FILE1 FILE2`
#[derive(Args, Debug, Default)]
pub struct CompareArgs {
    /// Format of the first image (probed when not given)
    #[arg(short = 'f', value_name = "FMT")]
    pub format1: Option<String>,
    /// FILE is an option string (driver=FMT,file.filename=PATH,...), not a file name
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Define an object (QEMU's --object: only `secret` is taken)
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
    /// Format of the second image (probed when not given)
    #[arg(short = 'F', value_name = "FMT")]
    pub format2: Option<String>,
    /// Cache mode for reading both images
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    pub cache: Option<String>,
    /// Show progress
    #[arg(short = 'p')]
    pub progress: bool,
    /// Print nothing but errors
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Strict: sizes and allocation must match too
    #[arg(short = 's')]
    pub strict: bool,
    /// Open the images in shared mode (allowed while another process writes them)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// FILE1 FILE2
    #[arg(value_name = "FILE")]
    pub args: Vec<String>,
}

const CMD: &str = "compare";

/// qemu-img's `IO_BUF_SIZE`: data is read and compared this much at a time.
const CHUNK: u64 = 2 << 20;

const SECTOR: u64 = 512;

/// Exit codes of `qemu-img compare`.
const DIFFERENT: i32 = 1;
const OPEN_ERROR: i32 = 2;
const STATUS_ERROR: i32 = 3;
const READ_ERROR: i32 = 4;

/// Run `img compare`.
pub fn run(a: &CompareArgs) -> CmdResult {
    if objects::create(&a.object)? == Objects::HelpShown {
        return Ok(0);
    }
    if a.args.len() != 2 {
        return Err(Failure::usage(CMD, "Expecting two image file names"));
    }
    let direct = match a.cache.as_deref() {
        None | Some("writeback") | Some("unsafe") | Some("writethrough") => false,
        Some("none") | Some("directsync") => true,
        Some(other) => {
            eprintln!(
                "{}",
                Failure::msg(format!("Invalid source cache option: {other}"))
            );
            return Ok(OPEN_ERROR);
        }
    };
    let open = |name: &str, fmt: Option<&str>| -> Result<Side, Failure> {
        let opts = OpenOptions {
            read_only: true,
            force_share: a.force_share,
            direct,
            ..Default::default()
        };
        let image = open_user_image(name, fmt, a.image_opts, opts).map_err(Failure::msg)?;
        Ok(Side::new(image, name))
    };
    let sides = open(&a.args[0], a.format1.as_deref())
        .and_then(|one| Ok((one, open(&a.args[1], a.format2.as_deref())?)));
    let (one, two) = match sides {
        Ok(s) => s,
        Err(f) => {
            eprintln!("{f}");
            return Ok(OPEN_ERROR);
        }
    };
    let mut cmp = Comparison {
        quiet: a.quiet,
        progress: Progress::new(a.progress && !a.quiet),
    };
    let code = match cmp.run(&one, &two, a.strict) {
        Ok(code) => code,
        Err((code, msg)) => {
            eprintln!("{}", Failure::msg(msg));
            code
        }
    };
    cmp.progress.end();
    Ok(code)
}

/// One of the two images.
struct Side {
    image: Image,
    name: String,
    /// The size qemu-img sees: whole 512-byte sectors.
    size: u64,
}

/// The block status qemu-img compares in strict mode (QEMU's `BDRV_BLOCK_*` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flags {
    data: bool,
    zero: bool,
    offset_valid: bool,
    allocated: bool,
    eof: bool,
    compressed: bool,
}

/// A run of guest bytes with one status.
struct Run {
    len: u64,
    flags: Flags,
}

type Fail = (i32, String);

impl Side {
    fn new(image: Image, name: &str) -> Side {
        let size = image.driver().size().next_multiple_of(SECTOR);
        Side {
            image,
            name: name.to_string(),
            size,
        }
    }

    /// Status of the chain at `at`, for a run of at most `len` bytes.
    fn status(&self, at: u64, len: u64) -> Result<Run, Fail> {
        let top = self.image.driver();
        let eof = |len: u64| at + len == self.size;
        if at >= top.size() {
            // The tail of the last sector of an image of unaligned size reads as zero.
            let len = self.size - at;
            return Ok(Run {
                len,
                flags: Flags {
                    data: false,
                    zero: true,
                    offset_valid: true,
                    allocated: true,
                    eof: true,
                    compressed: false,
                },
            });
        }
        let s = top
            .block_status(at, len.min(top.size() - at))
            .map_err(|_| {
                (
                    STATUS_ERROR,
                    format!("Sector allocation test failed for {}", self.name),
                )
            })?;
        let flags = Flags {
            data: matches!(s.allocation, Allocation::Data | Allocation::DataOverHole),
            zero: !matches!(s.allocation, Allocation::Data | Allocation::Undetermined),
            offset_valid: s.host_offset.is_some(),
            // qemu-img counts an undetermined run as unallocated and then reads only the
            // other side, as if this one read zeroes: img reads and compares both.
            allocated: match s.allocation {
                Allocation::Unallocated => beyond_short_backing(top, at),
                _ => true,
            },
            eof: eof(s.len),
            compressed: s.compressed,
        };
        Ok(Run { len: s.len, flags })
    }

    /// Read `buf.len()` bytes at `at`; bytes past the engine's size read as zero.
    fn read(&self, buf: &mut [u8], at: u64) -> Result<(), Fail> {
        let d = self.image.driver();
        let avail = d.size().saturating_sub(at).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        if !head.is_empty() {
            d.read_at(head, at).map_err(|e| {
                (
                    READ_ERROR,
                    format!(
                        "Error while reading offset {at} of {}: {}",
                        self.name,
                        engine_msg(&e)
                    ),
                )
            })?;
        }
        tail.fill(0);
        Ok(())
    }
}

/// Whether QEMU counts an unallocated offset as allocated: some layer's backing file ends
/// before `at`, and QEMU's block layer makes the zeroes past its end belong to it.
fn beyond_short_backing(top: &dyn BlockDriver, at: u64) -> bool {
    let mut layer = top;
    while let Some(below) = layer.backing() {
        if at >= below.size() {
            return true;
        }
        layer = below;
    }
    false
}

/// A comparison under way: its output settings and buffers.
struct Comparison {
    quiet: bool,
    progress: Progress,
}

impl Comparison {
    fn say(&self, msg: &str) {
        if !self.quiet {
            println!("{msg}");
        }
    }

    /// Compare and print the verdict; `Ok` is the exit code.
    fn run(&mut self, one: &Side, two: &Side, strict: bool) -> Result<i32, Fail> {
        if strict && one.size != two.size {
            self.say("Strict mode: Image size mismatch!");
            return Ok(DIFFERENT);
        }
        let common = one.size.min(two.size);
        let total = one.size.max(two.size);
        let mut buf1 = vec![0u8; CHUNK as usize];
        let mut buf2 = vec![0u8; CHUNK as usize];
        self.progress.advance(0.0);
        let mut at = 0;
        while at < common {
            let s1 = one.status(at, one.size - at)?;
            let s2 = two.status(at, two.size - at)?;
            let mut chunk = s1.len.min(s2.len);
            if strict && s1.flags != s2.flags {
                self.say(&format!("Strict mode: Offset {at} block status mismatch!"));
                return Ok(DIFFERENT);
            }
            let (f1, f2) = (s1.flags, s2.flags);
            if !(f1.zero && f2.zero) {
                chunk = chunk.min(CHUNK);
                let n = chunk as usize;
                let diff = if f1.allocated == f2.allocated {
                    one.read(&mut buf1[..n], at)?;
                    two.read(&mut buf2[..n], at)?;
                    first_different_sector(&buf1[..n], &buf2[..n])
                } else {
                    // Only one side has the range: it must read as zeroes.
                    let side = if f1.allocated { one } else { two };
                    side.read(&mut buf1[..n], at)?;
                    first_nonzero_sector(&buf1[..n])
                };
                if let Some(i) = diff {
                    self.say(&format!("Content mismatch at offset {}!", at + i));
                    return Ok(DIFFERENT);
                }
            }
            at += chunk;
            self.progress.advance(chunk as f32 / total as f32 * 100.0);
        }
        if one.size != two.size {
            self.say("Warning: Image size mismatch!");
            let over = if one.size > two.size { one } else { two };
            while at < total {
                let s = over.status(at, total - at)?;
                let mut chunk = s.len;
                if s.flags.allocated && !s.flags.zero {
                    chunk = chunk.min(CHUNK);
                    let n = chunk as usize;
                    over.read(&mut buf1[..n], at)?;
                    if let Some(i) = first_nonzero_sector(&buf1[..n]) {
                        self.say(&format!("Content mismatch at offset {}!", at + i));
                        return Ok(DIFFERENT);
                    }
                }
                at += chunk;
                self.progress.advance(chunk as f32 / total as f32 * 100.0);
            }
        }
        self.say("Images are identical.");
        Ok(0)
    }
}

/// Offset of the first 512-byte sector (from the buffer's start) where `a` and `b` differ.
fn first_different_sector(a: &[u8], b: &[u8]) -> Option<u64> {
    a.chunks(SECTOR as usize)
        .zip(b.chunks(SECTOR as usize))
        .position(|(x, y)| x != y)
        .map(|i| i as u64 * SECTOR)
}

/// Offset of the first 512-byte sector (from the buffer's start) holding a non-zero byte.
fn first_nonzero_sector(a: &[u8]) -> Option<u64> {
    a.chunks(SECTOR as usize)
        .position(|x| x.iter().any(|&b| b != 0))
        .map(|i| i as u64 * SECTOR)
}

/// qemu-img's simple progress display (`-p`): `    (P/100%)` and a carriage return,
/// reprinted every 2 percent, a newline at the end.
struct Progress {
    enabled: bool,
    current: f32,
    last_print: f32,
}

impl Progress {
    fn new(enabled: bool) -> Progress {
        Progress {
            enabled,
            current: 0.0,
            last_print: 0.0,
        }
    }

    fn advance(&mut self, delta: f32) {
        if !self.enabled {
            return;
        }
        self.current = (self.current + delta).min(100.0);
        let c = self.current;
        if c > self.last_print + 2.0 || c < self.last_print - 2.0 || c == 0.0 || c == 100.0 {
            self.last_print = c;
            use std::io::Write;
            print!("    ({c:3.2}/100%)\r");
            let _ = std::io::stdout().flush();
        }
    }

    fn end(&self) {
        if self.enabled {
            println!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sectors_of_first_difference() {
        let a = vec![0u8; 2048];
        let mut b = a.clone();
        assert_eq!(first_different_sector(&a, &b), None);
        b[1009] = 1;
        assert_eq!(first_different_sector(&a, &b), Some(512));
        assert_eq!(first_nonzero_sector(&b), Some(512));
        b[3] = 1;
        assert_eq!(first_nonzero_sector(&b), Some(0));
        assert_eq!(first_nonzero_sector(&a[..100]), None);
    }
}
