//! `img dd`: copy an image, or a part of it, into a new image, like `qemu-img dd`.
//!
//! Sizes follow qemu-img: the input counts in whole 512-byte sectors, `count` caps the input
//! at `count * bs` bytes before `skip` moves the start by `skip * bs` bytes, and the output
//! is created with what remains. Only ranges the input stores data for are written, so the
//! new image stays sparse where the input reads as zeroes.

use std::path::Path;

use clap::Args;
use common::create::{create, CreateOptions};
use common::open::{Format, Image, OpenOptions};
use common::{Allocation, BlockDriver};

use crate::create_opts::{creatable, not_creatable, opts_for, CreateOpts};
use crate::errors::{engine_msg, CmdResult, Failure};
use crate::imgopen::{open_named, open_user_image};
use crate::objects::{self, Objects};
use crate::size::{cvtnum, cvtnum_full};

/// `img dd [-f FMT] [-O OUTPUT_FMT] [-U] [bs=N] [count=N] [skip=N] if=INPUT of=OUTPUT`
#[derive(Args, Debug, Default)]
pub struct DdArgs {
    /// Format of the input (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// FILE is an option string (driver=FMT,file.filename=PATH,...), not a file name
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Define an object (QEMU's --object: only `secret` is taken)
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
    /// Format of the output (raw or qcow2; default raw)
    #[arg(short = 'O', long = "output-format", value_name = "OUTPUT_FMT")]
    pub output_format: Option<String>,
    /// Open the input in shared mode (allowed while another process writes it)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// bs=BLOCK_SIZE count=BLOCKS skip=BLOCKS if=INPUT of=OUTPUT
    #[arg(value_name = "OPERAND")]
    pub operands: Vec<String>,
}

/// The `key=value` operands, as qemu-img reads them.
#[derive(Debug, PartialEq, Eq)]
struct Operands {
    /// Block size in bytes (default 512).
    bs: u64,
    count: Option<u64>,
    skip: Option<u64>,
    input: String,
    output: String,
}

/// Parse the operands in order; the first bad one is the error (text after `img: `).
fn parse_operands(operands: &[String]) -> Result<Operands, String> {
    let (mut bs, mut count, mut skip) = (512, None, None);
    let (mut input, mut output) = (None, None);
    for op in operands {
        let Some((key, value)) = op.split_once('=') else {
            return Err(format!("unrecognized operand {op}"));
        };
        match key {
            "bs" => bs = cvtnum_full("bs", value, 1, i32::MAX as u64)?,
            "count" => count = Some(cvtnum("count", value)?),
            "if" => input = Some(value.to_string()),
            "of" => output = Some(value.to_string()),
            "skip" => skip = Some(cvtnum("skip", value)?),
            _ => return Err(format!("unrecognized operand {key}")),
        }
    }
    match (input, output) {
        (Some(input), Some(output)) => Ok(Operands {
            bs,
            count,
            skip,
            input,
            output,
        }),
        _ => Err("Must specify both input and output files".into()),
    }
}

/// The input range to copy: `(start, end)` in input bytes, and whether `skip` lies past
/// the end (then nothing is copied and qemu-img warns).
fn copy_range(input_size: u64, op: &Operands) -> (u64, u64, bool) {
    let mut end = input_size;
    if let Some(count) = op.count {
        if count <= i64::MAX as u64 / op.bs {
            end = end.min(count * op.bs);
        }
    }
    match op.skip {
        Some(skip) if skip > i64::MAX as u64 / op.bs || end < skip * op.bs => (end, end, true),
        Some(skip) => (skip * op.bs, end, false),
        None => (0, end, false),
    }
}

/// Run `img dd`.
pub fn run(a: &DdArgs) -> CmdResult {
    if objects::create(&a.object)? == Objects::HelpShown {
        return Ok(0);
    }
    let op = parse_operands(&a.operands).map_err(Failure::msg)?;
    let input = open_input(&op.input, a.format.as_deref(), a.image_opts, a.force_share)
        .map_err(Failure::msg)?;
    let out_name = a.output_format.as_deref().unwrap_or("raw");
    let out_format = creatable(out_name)
        .ok_or_else(|| Failure::msg(not_creatable(out_name, "Unknown file format".into())))?;
    // QEMU's block layer counts lengths in whole 512-byte sectors.
    let input_size = input.driver().size().next_multiple_of(512);
    let (start, end, past_end) = copy_range(input_size, &op);
    create_output(&op.output, out_format, end - start).map_err(|m| {
        Failure::msg(format!(
            "{}: error while creating output image: {m}",
            op.output
        ))
    })?;
    let output = open_named(
        &op.output,
        &OpenOptions {
            format: Some(out_format),
            no_backing: true,
            ..Default::default()
        },
    )
    .map_err(|m| Failure::msg(format!("Could not open '{}': {m}", op.output)))?;
    if past_end {
        eprintln!("img: {}: cannot skip to specified offset", op.input);
    }
    copy(input.driver(), output.driver(), start, end).map_err(Failure::msg)?;
    Ok(0)
}

/// Open the input read-only with its backing chain; errors as qemu-img words them.
fn open_input(
    name: &str,
    fmt: Option<&str>,
    image_opts: bool,
    force_share: bool,
) -> Result<Image, String> {
    open_user_image(
        name,
        fmt,
        image_opts,
        OpenOptions {
            read_only: true,
            force_share,
            ..Default::default()
        },
    )
}

/// Create the output image with the format's default options.
fn create_output(name: &str, format: Format, size: u64) -> Result<(), String> {
    let opts = CreateOpts::new(opts_for(format));
    let create_opts =
        CreateOptions::from_values(format, &opts, size).map_err(|e| engine_msg(&e))?;
    create(Path::new(name), &create_opts).map_err(|e| engine_msg(&e))
}

/// Bytes moved per read and write.
const CHUNK: u64 = 1 << 20;

/// Copy input bytes `start..end` to the output from offset 0, skipping what the input
/// reads as zeroes (the new output already does). Input bytes past its own end (up to the
/// next sector) read as zeroes too.
fn copy(
    input: &dyn BlockDriver,
    output: &dyn BlockDriver,
    start: u64,
    end: u64,
) -> Result<(), String> {
    let read_err = |e: common::Error| {
        format!(
            "error while reading from input image file: {}",
            engine_msg(&e)
        )
    };
    let write_err = |e: common::Error| {
        format!(
            "error while writing to output image file: {}",
            engine_msg(&e)
        )
    };
    let data_end = end.min(input.size());
    let mut buf = vec![0u8; CHUNK.min(data_end.saturating_sub(start)) as usize];
    let mut pos = start;
    while pos < data_end {
        let st = input
            .block_status(pos, (data_end - pos).min(CHUNK))
            .map_err(read_err)?;
        let len = st.len.clamp(1, data_end - pos);
        if matches!(st.allocation, Allocation::Data | Allocation::Undetermined) {
            let b = &mut buf[..len as usize];
            input.read_at(b, pos).map_err(read_err)?;
            output.write_at(b, pos - start).map_err(write_err)?;
        }
        pos += len;
    }
    output.flush().map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(list: &str) -> Result<Operands, String> {
        parse_operands(&list.split(' ').map(str::to_string).collect::<Vec<_>>())
    }

    #[test]
    fn operands_as_qemu_img_reads_them() {
        let o = ops("bs=1k count=3 skip=2 if=a of=b").unwrap();
        assert_eq!((o.bs, o.count, o.skip), (1024, Some(3), Some(2)));
        assert_eq!((o.input.as_str(), o.output.as_str()), ("a", "b"));
        assert_eq!(ops("if=a if=c of=").unwrap().input, "c");
        for (list, want) in [
            ("if=a", "Must specify both input and output files"),
            ("foo=bar if=a of=b", "unrecognized operand foo"),
            ("x if=a of=b", "unrecognized operand x"),
            ("=x if=a of=b", "unrecognized operand "),
            (
                "bs=0 if=a of=b",
                "Invalid bs specified. Must be between 1 and 2147483647.",
            ),
            ("bs=abc if=a of=b", "Invalid bs specified: 'abc'."),
            (
                "count=-1",
                "Invalid count specified. Must be between 0 and 9223372036854775807.",
            ),
            ("if=a skip=x", "Invalid skip specified: 'x'."),
        ] {
            assert_eq!(ops(list).unwrap_err(), want, "{list}");
        }
    }

    #[test]
    fn count_caps_before_skip() {
        let o = |list: &str| ops(&format!("{list} if=a of=b")).unwrap();
        assert_eq!(copy_range(1 << 20, &o("bs=512")), (0, 1 << 20, false));
        assert_eq!(
            copy_range(1 << 20, &o("bs=1k count=3 skip=2")),
            (2048, 3072, false)
        );
        assert_eq!(
            copy_range(1 << 20, &o("bs=1M skip=1")),
            (1 << 20, 1 << 20, false)
        );
        assert_eq!(
            copy_range(1 << 20, &o("bs=1M skip=5")),
            (1 << 20, 1 << 20, true)
        );
        assert_eq!(copy_range(1 << 20, &o("count=0")), (0, 0, false));
        assert_eq!(
            copy_range(1 << 20, &o("bs=1G skip=9223372036854775807")),
            (1 << 20, 1 << 20, true)
        );
    }
}
