//! `img measure`: the size a new image needs, for a virtual size or to hold a copy of an
//! image, like `qemu-img measure`.

use clap::Args;
use common::measure::{measure, Measurement};
use common::open::{Format, Image, OpenOptions};

use crate::create_opts::{is_valid_option_list, CreateOpts, QCOW2_OPTS, RAW_OPTS};
use crate::errors::{engine_msg, CmdResult, Failure};
use crate::imgopen::open_user_image;
use crate::info::{parse_output, OutputFormat};
use crate::qjson::{to_json_pretty, QDict, QValue};
use crate::size::cvtnum;

/// `img measure [-f FMT] [-O FMT] [-o OPTIONS] [-l SNAPSHOT] [--output=human|json] [-U]
/// (--size N | FILE)`
#[derive(Args, Debug, Default)]
pub struct MeasureArgs {
    /// Format of FILE (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
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

/// Which snapshot `-l` names.
#[derive(Debug, PartialEq, Eq)]
enum SnapshotParam {
    /// An ID or a name (the ID is tried first).
    IdOrName(String),
    /// `snapshot.id=...,snapshot.name=...`: whichever are given must both match.
    Fields {
        id: Option<String>,
        name: Option<String>,
    },
}

fn parse_snapshot(p: &str) -> Result<SnapshotParam, String> {
    if !p.starts_with("snapshot.") {
        return Ok(SnapshotParam::IdOrName(p.to_string()));
    }
    let (mut id, mut name) = (None, None);
    for item in common::option_list::split(p) {
        let (k, v) = item.split_once('=').unwrap_or((&item, "on"));
        match k {
            "snapshot.id" => id = Some(v.to_string()),
            "snapshot.name" => name = Some(v.to_string()),
            _ => {
                return Err(format!(
                    "Invalid parameter '{k}'\nimg: Failed in parsing snapshot param '{p}'"
                ))
            }
        }
    }
    Ok(SnapshotParam::Fields { id, name })
}

/// Run `img measure`.
pub fn run(a: &MeasureArgs) -> CmdResult {
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
        Some(p) => Some(parse_snapshot(p).map_err(Failure::msg)?),
        None => None,
    };
    if a.args.len() > 1 {
        return Err(Failure::msg("At most one filename argument is allowed."));
    }
    let file = a.args.first();
    match (file, size) {
        (None, _) if a.format.is_some() || snapshot.is_some() => {
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
        load_snapshot(src, sn)
            .map_err(|m| Failure::msg(format!("Failed to load snapshot: {m}")))?;
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
        OpenOptions {
            read_only: true,
            force_share: a.force_share,
            ..Default::default()
        },
    )
    .map_err(Failure::msg)
}

/// Find the snapshot `-l` names; measuring a snapshot's own contents is not supported yet,
/// so a snapshot that exists is refused after the lookups qemu-img makes.
fn load_snapshot(src: &Image, sn: &SnapshotParam) -> Result<(), String> {
    if src.format() == Format::Raw {
        return Err(
            "Block format 'raw' used by device '' does not support temporarily \
                    loading internal snapshots"
                .into(),
        );
    }
    let list = src.snapshots().map_err(|e| engine_msg(&e))?;
    let found = list.iter().any(|s| match sn {
        SnapshotParam::IdOrName(x) => &s.id == x || &s.name == x,
        SnapshotParam::Fields { id, name } => {
            id.as_ref().is_none_or(|i| i == &s.id) && name.as_ref().is_none_or(|n| n == &s.name)
        }
    });
    if found {
        Err("measuring an internal snapshot is not supported".into())
    } else {
        Err("Can't find snapshot".into())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_params() {
        assert_eq!(
            parse_snapshot("s1").unwrap(),
            SnapshotParam::IdOrName("s1".into())
        );
        assert_eq!(
            parse_snapshot("snapshot.id=1,snapshot.name=a").unwrap(),
            SnapshotParam::Fields {
                id: Some("1".into()),
                name: Some("a".into())
            }
        );
        assert_eq!(
            parse_snapshot("snapshot.foo=1").unwrap_err(),
            "Invalid parameter 'snapshot.foo'\nimg: Failed in parsing snapshot param 'snapshot.foo=1'"
        );
    }
}
