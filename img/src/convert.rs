//! `img convert`: copy one or more images (concatenated) into a new or existing image,
//! like `qemu-img convert`. The checks run in qemu-img's order with its messages; the copy
//! itself is in `copy`.

use std::path::Path;

use clap::Args;
use common::create::{create, CreateOptions};
use common::open::{Format, Image, OpenOptions};

mod bitmaps;
mod copy;
mod page_buf;
mod sources;
mod throttle;
mod turn;

use crate::create_opts::{
    creatable, has_help_option, help_text, help_text_with_file, is_valid_option_list,
    not_creatable, opts_for, CreateOpts,
};
use crate::errors::{engine_msg, CmdResult, Failure};
use crate::imgopen::Named;
use crate::objects::{self, Objects};
use crate::progress::Progress;
use crate::size::cvtnum;
use crate::snapshot_param::parse_snapshot_param;
use copy::{copy, CopyPlan};
use sources::Sources;

/// `img convert [-f FMT] [-O FMT] [-o OPTS] [-c] [-p] [-q] [-n] [-W] [-m N] [-S SIZE]
/// [-B BACKING [-F FMT]] [--target-is-zero] [-C] [-r RATE] [--salvage]
/// [--bitmaps [--skip-broken-bitmaps]] [-U] [-t CACHE] [-T CACHE] SRC... DST`
#[derive(Args, Debug, Default)]
pub struct ConvertArgs {
    /// Format of the source images (probed when not given)
    #[arg(short = 'f', long = "source-format", value_name = "FMT")]
    pub format: Option<String>,
    /// Each SRC is an option string (driver=FMT,file.filename=PATH,...), not a file name
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// DST is an option string, not a file name (needs -n)
    #[arg(long = "target-image-opts")]
    pub target_image_opts: bool,
    /// Define an object (QEMU's --object: only `secret` is taken)
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
    /// Format of the output image (default raw)
    #[arg(short = 'O', long = "target-format", value_name = "OUTPUT_FMT")]
    pub output_format: Option<String>,
    /// Creation options of the output image, comma separated
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Write the output compressed (qcow2 only)
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// Show progress
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet: no progress
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Do not create the output image; it must exist and be large enough
    #[arg(short = 'n', long = "no-create")]
    pub no_create: bool,
    /// Allow out-of-order writes to the output
    #[arg(short = 'W', long = "parallel-writes")]
    pub out_of_order: bool,
    /// Number of requests in flight (1 to 16, default 8)
    #[arg(
        short = 'm',
        long = "parallel",
        value_name = "NUM_COROUTINES",
        allow_hyphen_values = true
    )]
    pub parallel: Option<String>,
    /// Zero runs of at least this size are not written (default 4k, 0: fully allocate)
    #[arg(
        short = 'S',
        long = "sparse-size",
        value_name = "SPARSE_SIZE",
        allow_hyphen_values = true
    )]
    pub sparse_size: Option<String>,
    /// Backing file of the output image
    #[arg(short = 'B', long = "backing", value_name = "BACKING_FILE")]
    pub backing: Option<String>,
    /// Format of the backing file
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    pub backing_format: Option<String>,
    /// Let the kernel copy data between the files where it can
    #[arg(short = 'C', long = "copy-range-offloading")]
    pub copy_offload: bool,
    /// Write at most this many bytes per second to the output
    #[arg(
        short = 'r',
        long = "rate-limit",
        value_name = "RATE",
        allow_hyphen_values = true
    )]
    pub rate_limit: Option<String>,
    /// Turn what cannot be read from the sources into zeroes, with a warning
    #[arg(long = "salvage")]
    pub salvage: bool,
    /// Also copy the source's persistent dirty bitmaps
    #[arg(long = "bitmaps")]
    pub bitmaps: bool,
    /// With --bitmaps: skip inconsistent bitmaps instead of failing
    #[arg(long = "skip-broken-bitmaps")]
    pub skip_broken_bitmaps: bool,
    /// The existing output image (-n) already reads as zeroes
    #[arg(long = "target-is-zero")]
    pub target_is_zero: bool,
    /// Convert this internal snapshot of the source (NAME, ID or
    /// snapshot.id=ID,snapshot.name=NAME)
    #[arg(short = 'l', long = "snapshot", value_name = "SNAPSHOT_PARAM")]
    pub snapshot: Option<String>,
    /// Open the sources even if another process uses them
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Cache mode of the output
    #[arg(short = 't', long = "target-cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// Cache mode of the sources
    #[arg(short = 'T', long = "source-cache", value_name = "SRC_CACHE")]
    pub src_cache: Option<String>,
    /// SRC... DST
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
}

/// Requests in flight unless `-m` says otherwise (qemu-img's default).
const DEFAULT_IN_FLIGHT: usize = 8;
/// qemu-img's `-S` default: zero runs of 4 KiB are left out.
const DEFAULT_MIN_SPARSE: u64 = 4096;

/// Run `img convert`.
pub fn run(a: &ConvertArgs) -> CmdResult {
    if objects::create(&a.object)? == Objects::HelpShown {
        return Ok(0);
    }
    let snapshot = a
        .snapshot
        .as_deref()
        .map(parse_snapshot_param)
        .transpose()
        .map_err(Failure::msg)?;
    let in_flight = match &a.parallel {
        None => DEFAULT_IN_FLIGHT,
        Some(s) => parse_in_flight(s)?,
    };
    let min_sparse = match &a.sparse_size {
        None => DEFAULT_MIN_SPARSE,
        Some(s) => parse_min_sparse(s)?,
    };
    let rate_limit = match &a.rate_limit {
        None => 0,
        Some(s) => cvtnum("rate limit", s).map_err(Failure::msg)?,
    };
    let options = joined_options(&a.options)?;
    let out_fmt = a.output_format.as_deref().unwrap_or("raw");
    if a.skip_broken_bitmaps && !a.bitmaps {
        return Err(Failure::msg(
            "Use of --skip-broken-bitmaps requires --bitmaps",
        ));
    }
    if a.copy_offload {
        if a.compress {
            return Err(Failure::msg(
                "Cannot enable copy offloading when -c is used",
            ));
        }
        if a.sparse_size.is_some() {
            return Err(Failure::msg(
                "Cannot enable copy offloading when -S is used",
            ));
        }
        if a.salvage {
            return Err(Failure::msg("Cannot use copy offloading in salvaging mode"));
        }
    }
    if a.target_image_opts && !a.no_create {
        return Err(Failure::msg("--target-image-opts requires use of -n flag"));
    }
    if a.no_create && options.is_some() {
        return Err(Failure::msg(
            "-o has no effect when skipping image creation",
        ));
    }
    if a.target_is_zero && !a.no_create {
        return Err(Failure::msg("--target-is-zero requires use of -n flag"));
    }
    if let Some(list) = &options {
        if has_help_option(list) {
            // Like qemu-img, the protocol's options too only once an output file is named
            // after a source.
            if a.files.len() >= 2 {
                print!("{}", help_text_with_file(out_fmt));
            } else {
                print!("{}", help_text(out_fmt));
            }
            return Ok(0);
        }
    }
    let Some((dst, srcs)) = a.files.split_last().filter(|(_, s)| !s.is_empty()) else {
        return Err(Failure::msg("Must specify image file name"));
    };
    if snapshot.is_some() && srcs.len() > 1 {
        return Err(Failure::msg(
            "No support for concatenating multiple snapshot",
        ));
    }
    let src_direct = cache_is_direct(a.src_cache.as_deref()).ok_or_else(|| {
        Failure::msg(format!(
            "Invalid source cache option: {}",
            a.src_cache.as_deref().unwrap_or("")
        ))
    })?;
    let progress = Progress::new(a.progress && !a.quiet);
    let mut images = Vec::with_capacity(srcs.len());
    for name in srcs {
        let opts = OpenOptions {
            read_only: true,
            force_share: a.force_share,
            direct: src_direct,
            ..Default::default()
        };
        let image = Named::resolve(name, a.format.as_deref(), a.image_opts)
            .and_then(|n| n.open(opts))
            .map_err(Failure::msg)?;
        if let Some(key) = &snapshot {
            image.load_snapshot(key).map_err(|e| {
                Failure::msg(format!("Failed to load snapshot: {}", engine_msg(&e)))
            })?;
        }
        images.push(image);
    }
    let sources = Sources::new(images);
    let format = creatable(out_fmt).ok_or_else(|| {
        Failure::msg(not_creatable(
            out_fmt,
            format!("Unknown file format '{out_fmt}'"),
        ))
    })?;
    let target = Target {
        name: dst,
        format,
        fmt_name: out_fmt,
        image_opts: a.target_image_opts,
        // With --target-image-opts the option string names the format.
        fmt_arg: if a.target_image_opts {
            a.output_format.as_deref()
        } else {
            Some(out_fmt)
        },
    };
    let mut opts = CreateOpts::new(opts_for(format));
    let mut backing = a.backing.clone();
    if !a.no_create {
        if let Some(list) = &options {
            opts.parse_list(list).map_err(Failure::msg)?;
        }
        opts.set_int("size", sources.size());
        if let Some(b) = &a.backing {
            set_old_style(&mut opts, "backing_file", b, "Backing file", out_fmt)?;
        }
        if let Some(f) = &a.backing_format {
            set_old_style(&mut opts, "backing_fmt", f, "Backing file format", out_fmt)?;
        }
        if let Some(b) = opts.get_str("backing_file") {
            backing = Some(b.to_string());
        }
    }
    if a.target_is_zero && backing.is_some() {
        // qemu-img reports this one but exits with 0.
        eprintln!("img: Cannot use --target-is-zero when the destination image has a backing file");
        return Ok(0);
    }
    if srcs.len() > 1 && backing.is_some() {
        return Err(Failure::msg(
            "Having a backing file for the target makes no sense when concatenating multiple input images",
        ));
    }
    if !a.no_create && backing.is_some() && opts.get_str("backing_fmt").is_none() {
        return Err(Failure::msg(
            "Use of backing file requires explicit backing format",
        ));
    }
    if a.compress && !a.no_create {
        check_compressible(&opts, format)?;
    }
    let bitmaps = if a.bitmaps {
        if srcs.len() > 1 {
            return Err(Failure::msg(
                "Copying bitmaps only possible with single source",
            ));
        }
        Some(bitmaps::check(sources.first(), a.skip_broken_bitmaps)?)
    } else {
        None
    };
    if !a.no_create {
        target.create(&opts, sources.size())?;
    }
    let direct = cache_is_direct(a.cache.as_deref()).ok_or_else(|| {
        Failure::msg(format!(
            "Invalid cache option: {}",
            a.cache.as_deref().unwrap_or("")
        ))
    })?;
    let image = target.open(direct, cache_ignores_flushes(a.cache.as_deref()))?;
    if bitmaps.is_some() {
        bitmaps::check_target(&image)?;
    }
    if a.compress && !matches!(image.format(), Format::Qcow2 | Format::Vmdk) {
        return Err(Failure::msg(
            "Compression not supported for this file format",
        ));
    }
    let target_size = image.driver().size();
    if a.no_create && target_size < sources.size() {
        return Err(Failure::msg("output file is smaller than input file"));
    }
    // A streamOptimized vmdk takes only compressed grains, with or without -c (QEMU's
    // needs_compressed_writes); into other vmdk subformats -c writes plainly.
    let stream = matches!(
        image.info().ok().and_then(|i| i.specific),
        Some(common::ops::FormatSpecific::Vmdk(v)) if v.create_type == "streamOptimized"
    );
    let plan = CopyPlan {
        compressed: (a.compress && image.format() == Format::Qcow2) || stream,
        min_sparse,
        in_order: !a.out_of_order,
        in_flight,
        // A new image reads as zeroes unless it has a backing file; with -S 0 qemu-img
        // writes every zero explicitly.
        has_zero_init: if a.no_create {
            a.target_is_zero
        } else {
            min_sparse != 0 && backing.is_none()
        },
        target_backing: backing.is_some(),
        // Past the end of a new image's backing file the target reads as zeroes already.
        backing_end: (!a.no_create && backing.is_some())
            .then(|| image.layer(1).map(|b| b.size()))
            .flatten(),
        // qcow2 allocates whole clusters (zero runs inside one save nothing); a VHD or VDI
        // block's zero runs stay holes in the file, so they are skipped at `-S` granularity.
        cluster_size: (image.format() == Format::Qcow2 || stream)
            .then(|| image.info().ok().and_then(|i| i.cluster_size))
            .flatten(),
        offload: a.copy_offload,
        salvage: a.salvage,
        quiet: a.quiet,
        rate_limit,
    };
    copy(&sources, &image, &plan, &progress).map_err(Failure::msg)?;
    if let Some(list) = &bitmaps {
        bitmaps::copy(sources.first(), &image, list)?;
    }
    progress.finish();
    Ok(0)
}

/// The output image by name and format.
struct Target<'a> {
    name: &'a str,
    format: Format,
    fmt_name: &'a str,
    /// `name` is an option string (`--target-image-opts`).
    image_opts: bool,
    /// The format to open it in (`-O`).
    fmt_arg: Option<&'a str>,
}

impl Target<'_> {
    /// Create it from the `-o` values (plus size and backing), as qemu-img's `bdrv_create`.
    fn create(&self, opts: &CreateOpts, size: u64) -> Result<(), Failure> {
        let fail = |e: &common::Error| {
            Failure::msg(format!(
                "{}: error while converting {}: {}",
                self.name,
                self.fmt_name,
                crate::errors::engine_msg(e)
            ))
        };
        let create_opts =
            CreateOptions::from_values(self.format, opts, size).map_err(|e| fail(&e))?;
        create(Path::new(self.name), &create_opts).map_err(|e| fail(&e))
    }

    /// Open it read-write with its backing chain.
    fn open(&self, direct: bool, no_flush: bool) -> Result<Image, Failure> {
        let opts = OpenOptions {
            direct,
            no_flush,
            ..Default::default()
        };
        Named::resolve(self.name, self.fmt_arg, self.image_opts)
            .and_then(|n| n.open(opts))
            .map_err(Failure::msg)
    }
}

/// `-B`/`-F` as creation options, refused for a format without them (QEMU's
/// `add_old_style_options`).
fn set_old_style(
    opts: &mut CreateOpts,
    key: &str,
    value: &str,
    what: &str,
    fmt: &str,
) -> Result<(), Failure> {
    if !opts.accepts(key) {
        return Err(Failure::msg(format!(
            "{what} not supported for file format '{fmt}'"
        )));
    }
    opts.set_text(key, value).map_err(Failure::msg)
}

/// qemu-img's checks of `-c` against the output format and its options.
fn check_compressible(opts: &CreateOpts, format: Format) -> Result<(), Failure> {
    if !matches!(format, Format::Qcow2 | Format::Vmdk) {
        return Err(Failure::msg(
            "Compression not supported for this file format",
        ));
    }
    if opts.get_bool("encryption") == Some(true) {
        return Err(Failure::msg(
            "Compression and encryption not supported at the same time",
        ));
    }
    if opts.get_str("preallocation").is_some_and(|p| p != "off") {
        return Err(Failure::msg(
            "Compression and preallocation not supported at the same time",
        ));
    }
    Ok(())
}

/// All `-o` arguments as one list, each checked as qemu-img does.
fn joined_options(list: &[String]) -> Result<Option<String>, Failure> {
    let mut joined: Option<String> = None;
    for o in list {
        if !is_valid_option_list(o) {
            return Err(Failure::msg(format!("Invalid option list: {o}")));
        }
        joined = Some(match joined {
            Some(prev) => format!("{prev},{o}"),
            None => o.clone(),
        });
    }
    Ok(joined)
}

/// `-m`: 1 to 16 requests in flight.
fn parse_in_flight(s: &str) -> Result<usize, Failure> {
    let n: i64 = s
        .parse()
        .map_err(|_| Failure::msg(format!("Invalid number of coroutines specified: '{s}'.")))?;
    if !(1..=16).contains(&n) {
        return Err(Failure::msg(
            "Invalid number of coroutines specified. Must be between 1 and 16.",
        ));
    }
    Ok(n as usize)
}

/// `-S`: a multiple of 512 up to 16 MiB, or 0.
fn parse_min_sparse(s: &str) -> Result<u64, Failure> {
    let v = cvtnum("buffer size for sparse output", s).map_err(Failure::msg)?;
    if v % 512 != 0 || v > 16 << 20 {
        return Err(Failure::msg(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).",
        ));
    }
    Ok(v)
}

/// Whether convert's target cache mode ignores flushes: `unsafe`, qemu-img's default there.
fn cache_ignores_flushes(mode: Option<&str>) -> bool {
    matches!(mode, None | Some("unsafe"))
}

/// Whether a cache mode bypasses the page cache; `None` for a mode qemu-img does not know.
pub(crate) fn cache_is_direct(mode: Option<&str>) -> Option<bool> {
    match mode {
        None | Some("writeback" | "unsafe" | "writethrough") => Some(false),
        Some("none" | "directsync") => Some(true),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_checked_like_qemu() {
        assert_eq!(parse_in_flight("16").unwrap(), 16);
        assert!(parse_in_flight("0").is_err());
        assert_eq!(
            parse_in_flight("x").unwrap_err().to_string(),
            "img: Invalid number of coroutines specified: 'x'."
        );
        assert_eq!(parse_min_sparse("0").unwrap(), 0);
        assert_eq!(parse_min_sparse("8k").unwrap(), 8192);
        assert!(parse_min_sparse("100").is_err());
        assert!(parse_min_sparse("32M").is_err());
        assert_eq!(cache_is_direct(Some("none")), Some(true));
        assert_eq!(cache_is_direct(Some("bogus")), None);
        assert!(cache_ignores_flushes(None) && cache_ignores_flushes(Some("unsafe")));
        assert!(!cache_ignores_flushes(Some("writeback")) && !cache_ignores_flushes(Some("none")));
    }
}
