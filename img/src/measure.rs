//! `img measure`: the size a new image needs, for a virtual size or to hold a copy of an
//! image, like `qemu-img measure`.

use clap::Args;
use common::measure::{measure, Measurement};
use common::open::{Format, Image, OpenOptions};

use crate::create_opts::{is_valid_option_list, CreateOpts, QCOW2_OPTS, RAW_OPTS};
use crate::errors::{engine_msg, CmdResult, Failure};
use crate::imgopen::open_user_image;
use crate::info::{parse_output, OutputFormat};
use crate::objects::{self, Objects};
use crate::qjson::{to_json_pretty, QDict, QValue};
use crate::size::cvtnum;
use crate::snapshot_param::parse_snapshot_param;

/// `img measure [-f FMT] [-O FMT] [-o OPTIONS] [-l SNAPSHOT] [--output=human|json] [-U]
/// (--size N | FILE)`
#[derive(Args, Debug, Default)]
pub struct MeasureArgs {
    /// Format of FILE (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// FILE is an option string (driver=FMT,file.filename=PATH,...), not a file name
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Define an object (QEMU's --object: only `secret` is taken)
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
    /// Format of the image to measure for (default raw)
    #[arg(short = 'O', long = "target-format", value_name = "OUTPUT_FMT")]
    pub output_format: Option<String>,
    /// Creation options of the target format (repeatable)
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Measure this internal snapshot of FILE (NAME, ID or snapshot.id=,snapshot.name=)
    #[arg(short = 'l', long = "snapshot", value_name = "SNAPSHOT_PARAM")]
    pub snapshot: Option<String>,
    /// Output format: human or json
    #[arg(long = "output", value_name = "human|json")]
    pub output: Option<String>,
    /// Measure for a new image of this virtual size
    #[arg(long = "size", value_name = "SIZE", allow_hyphen_values = true)]
    pub size: Option<String>,
    /// Open FILE in shared mode (allowed while another process writes it)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// FILE
    #[arg(value_name = "FILE")]
    pub args: Vec<String>,
}

const CMD: &str = "measure";

/// Run `img measure`.
pub fn run(a: &MeasureArgs) -> CmdResult {
    if objects::create(&a.object)? == Objects::HelpShown {
        return Ok(0);
    }
    let output = parse_output(CMD, a.output.as_deref())?;
    let size = match &a.size {
        Some(s) => Some(cvtnum("image size", s).map_err(Failure::msg)?),
        None => None,
    };
    for o in &a.options {
        if !is_valid_option_list(o) {
            return Err(Failure::msg(format!("Invalid option list: {o}")));
        }
    }
    let snapshot = match &a.snapshot {
        Some(p) => Some(parse_snapshot_param(p).map_err(Failure::msg)?),
        None => None,
    };
    if a.args.len() > 1 {
        return Err(Failure::msg("At most one filename argument is allowed."));
    }
    let file = a.args.first();
    match (file, size) {
        (None, _) if a.image_opts || a.format.is_some() || snapshot.is_some() => {
            return Err(Failure::msg(
                "--image-opts, -f, and -l require a filename argument.",
            ))
        }
        (Some(_), Some(_)) => {
            return Err(Failure::msg(
                "--size N cannot be used together with a filename.",
            ))
        }
        (None, None) => {
            return Err(Failure::msg(
                "Either --size N or one filename must be specified.",
            ))
        }
        _ => {}
    }
    let source = match file {
        Some(name) => Some(open_source(name, a)?),
        None => None,
    };
    if let (Some(src), Some(sn)) = (&source, &snapshot) {
        src.load_snapshot(sn)
            .map_err(|e| Failure::msg(format!("Failed to load snapshot: {}", engine_msg(&e))))?;
    }
    let out_fmt = a.output_format.as_deref().unwrap_or("raw");
    let (target, descs) = match out_fmt {
        "raw" => (Format::Raw, RAW_OPTS),
        "qcow2" => (Format::Qcow2, QCOW2_OPTS),
        f if NO_MEASURE.contains(&f) => {
            return Err(Failure::msg(format!(
                "Block driver '{f}' does not support size measurement"
            )))
        }
        f if NO_CREATE.contains(&f) => {
            return Err(Failure::msg(format!(
                "Format driver '{f}' does not support image creation"
            )))
        }
        f => return Err(Failure::msg(format!("Unknown file format '{f}'"))),
    };
    let mut opts = CreateOpts::new(descs);
    if !a.options.is_empty() {
        opts.parse_list(&a.options.join(",")).map_err(|m| {
            Failure::msg(format!(
                "{m}\nimg: Invalid options for file format '{out_fmt}'"
            ))
        })?;
    }
    if let Some(s) = size {
        opts.set_int("size", s);
    }
    let opt_size = opts.get_int("size").unwrap_or(0);
    let m = measure(target, &opts, opt_size, source.as_ref())
        .map_err(|e| Failure::msg(engine_msg(&e)))?;
    print!("{}", render(&m, output));
    Ok(0)
}

/// Formats qemu-img knows that can create images but not measure them.
const NO_MEASURE: &[&str] = &["parallels", "qcow", "qed", "vdi", "vhdx", "vmdk", "vpc"];
/// Formats qemu-img knows that cannot create images.
const NO_CREATE: &[&str] = &["bochs", "cloop", "dmg", "vvfat"];

fn open_source(name: &str, a: &MeasureArgs) -> Result<Image, Failure> {
    open_user_image(
        name,
        a.format.as_deref(),
        a.image_opts,
        OpenOptions {
            read_only: true,
            force_share: a.force_share,
            ..Default::default()
        },
    )
    .map_err(Failure::msg)
}

fn render(m: &Measurement, output: OutputFormat) -> String {
    match output {
        OutputFormat::Human => {
            let mut s = format!(
                "required size: {}\nfully allocated size: {}\n",
                m.required, m.fully_allocated
            );
            if let Some(b) = m.bitmaps {
                s.push_str(&format!("bitmaps size: {b}\n"));
            }
            s
        }
        OutputFormat::Json => {
            let mut d = QDict::new();
            d.put_int("required", m.required as i64);
            d.put_int("fully-allocated", m.fully_allocated as i64);
            if let Some(b) = m.bitmaps {
                d.put_int("bitmaps", b as i64);
            }
            format!("{}\n", to_json_pretty(&QValue::Dict(d)))
        }
    }
}
