//! `img info`: describe an image (and with `--backing-chain` its backing files), like
//! `qemu-img info`.

use std::collections::HashSet;
use std::path::Path;

use clap::Args;
use common::nbd::uri as nbd_uri;
use common::open::{Format, OpenOptions};
use common::ops::FormatSpecific as EngineSpecific;
use common::storage::is_device;

use crate::errors::{engine_msg, CmdResult, Failure};
use crate::imgopen::Named;
use crate::info_format::{render_human, render_json, FormatSpecific, NodeInfo};
use crate::objects::{self, Objects};
use crate::paths::path_combine;

/// `img info [-f FMT] [--output=human|json] [--backing-chain] [-U] FILE`
#[derive(Args, Debug, Default)]
pub struct InfoArgs {
    /// Image format (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// FILE is an option string (driver=FMT,file.filename=PATH,...), not a file name
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Define an object (QEMU's --object: only `secret` is taken)
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
    /// Output format: human or json
    #[arg(long = "output", value_name = "human|json")]
    pub output: Option<String>,
    /// Also describe every backing file of the chain
    #[arg(short = 'b', long = "backing-chain")]
    pub backing_chain: bool,
    /// Open the image in shared mode (allowed while another process writes it)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// FILE
    #[arg(value_name = "FILE")]
    pub args: Vec<String>,
}

const CMD: &str = "info";

/// Output format of `info` (and later of check, map, measure...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Human,
    Json,
}

/// Parse `--output`, with qemu-img's usage error.
pub fn parse_output(cmd: &'static str, v: Option<&str>) -> Result<OutputFormat, Failure> {
    match v {
        None | Some("human") => Ok(OutputFormat::Human),
        Some("json") => Ok(OutputFormat::Json),
        Some(other) => Err(Failure::usage(
            cmd,
            format!("--output expects 'human' or 'json' not '{other}'"),
        )),
    }
}

/// Run `img info`.
pub fn run(a: &InfoArgs) -> CmdResult {
    if objects::create(&a.object)? == Objects::HelpShown {
        return Ok(0);
    }
    let output = parse_output(CMD, a.output.as_deref())?;
    if a.args.len() != 1 {
        return Err(Failure::usage(CMD, "Expecting one image file name"));
    }
    let top =
        Named::resolve(&a.args[0], a.format.as_deref(), a.image_opts).map_err(Failure::msg)?;
    let nodes =
        collect_image_info_list(top, a.backing_chain, a.force_share).map_err(Failure::msg)?;
    match output {
        OutputFormat::Human => print!("{}", render_human(&nodes)),
        OutputFormat::Json => print!("{}", render_json(&nodes, a.backing_chain)),
    }
    Ok(0)
}

/// Describe `top` and, with `chain`, every image below it. Each image is opened on its
/// own without its backing file, as qemu-img does; a name seen twice is a loop.
pub fn collect_image_info_list(
    top: Named,
    chain: bool,
    force_share: bool,
) -> Result<Vec<NodeInfo>, String> {
    let mut seen: HashSet<String> = HashSet::new();
    let mut list = Vec::new();
    let mut next = Some(top);
    while let Some(named) = next.take() {
        if !seen.insert(named.name.clone()) {
            return Err(format!(
                "Backing file '{}' creates an infinite loop.",
                named.name
            ));
        }
        let info = image_info(&named, force_share)?;
        if chain {
            if let Some(full) = &info.full_backing_filename {
                let fmt = info.backing_filename_format.as_deref();
                next = Some(Named::resolve(full, fmt, false)?);
            }
        }
        list.push(info);
    }
    Ok(list)
}

/// Open one image read-only without its backing file and describe it.
pub fn image_info(named: &Named, force_share: bool) -> Result<NodeInfo, String> {
    let open_err = |m: String| named.open_error(&m);
    let filename = named.name.as_str();
    let path = Path::new(filename);
    let image = named.open(OpenOptions {
        read_only: true,
        force_share,
        no_backing: true,
        metadata_only: true,
        ..Default::default()
    })?;
    let driver = image.driver();
    // QEMU names an NBD export by its normalized URI, and the node under the format is
    // the 'nbd' protocol driver, which knows neither allocation nor a dirty flag.
    let nbd = nbd_uri::is_nbd_uri(filename);
    let shown = match nbd_uri::parse(filename) {
        Ok(t) if nbd => t.display_name(),
        _ => filename.to_string(),
    };
    let actual_size = driver.allocated_file_size().ok();
    let protocol = if nbd {
        "nbd"
    } else {
        let file_type = std::fs::metadata(path)
            .map(|m| m.file_type())
            .map_err(|e| open_err(crate::errors::strip_os_error(&e.to_string())))?;
        // QEMU opens devices with its 'host_device' protocol driver, files with 'file'.
        if is_device(&file_type) {
            "host_device"
        } else {
            "file"
        }
    };
    // QEMU's block layer counts lengths in whole 512-byte sectors.
    let file_len = image
        .file_length()
        .map_err(|e| open_err(engine_msg(&e)))?
        .next_multiple_of(512);
    let mut file = NodeInfo::new(&shown, protocol, file_len);
    file.actual_size = actual_size;
    if nbd {
        file.dirty_flag = None;
    } else {
        file.format_specific = Some(FormatSpecific::File);
    }

    let virtual_size = driver.size().next_multiple_of(512);
    let mut node = NodeInfo::new(&shown, driver.format_name(), virtual_size);
    node.actual_size = actual_size;
    // Snapshots first: with both broken, qemu-img names the snapshot table.
    node.snapshots = image.snapshots().map_err(|e| open_err(engine_msg(&e)))?;
    let info = image.info().map_err(|e| open_err(engine_msg(&e)))?;
    node.cluster_size = info.cluster_size;
    node.encrypted = image.encrypted().then_some(true);
    node.dirty_flag = info.dirty;
    if nbd && image.format() == Format::Raw {
        node.dirty_flag = None;
    }
    if let Some(b) = info.backing {
        node.full_backing_filename = Some(path_combine(filename, &b.name));
        node.backing_filename = Some(b.name);
        node.backing_filename_format = b.format;
    }
    node.format_specific = match info.specific {
        Some(EngineSpecific::Qcow2(q)) => Some(FormatSpecific::Qcow2(q)),
        Some(EngineSpecific::Vmdk(v)) => Some(FormatSpecific::Vmdk(v)),
        None => None,
    };
    if named.protocol_on_top() {
        return Ok(file);
    }
    node.children = vec![("file".to_string(), file)];
    if let Some(FormatSpecific::Vmdk(v)) = &node.format_specific {
        // QEMU lists extent files as child nodes, the last opened first, and the file
        // node's size is the descriptor's own.
        node.children[0].1.actual_size = v.file_allocated;
        for (i, e) in v.extents.iter().enumerate() {
            if let Some((len, allocated)) = e.own_node {
                let mut n = NodeInfo::new(&e.filename, "file", len.next_multiple_of(512));
                n.actual_size = allocated;
                n.format_specific = Some(FormatSpecific::File);
                node.children.insert(0, (format!("extents.{i}"), n));
            }
        }
    }
    Ok(node)
}
