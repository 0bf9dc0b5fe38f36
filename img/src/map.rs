//! `img map`: the extents of an image and where their data lives, through its backing
//! chain, like `qemu-img map`.

use clap::Args;
use common::driver::{Allocation, BlockDriver};
use common::open::{Image, OpenOptions};

use crate::errors::{engine_msg, CmdResult, Failure};
use crate::imgopen::Named;
use crate::info::parse_output;
use crate::map_format::{DumpError, Dumper, MapEntry};
use crate::objects::{self, Objects};
use crate::paths::path_combine;
use crate::size::cvtnum;

/// `img map [-f FMT] [--output=human|json] [--start-offset=N] [--max-length=N] [-U] FILE`
#[derive(Args, Debug, Default)]
pub struct MapArgs {
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
    /// First guest byte to describe
    #[arg(short = 's', long = "start-offset", value_name = "OFFSET")]
    pub start_offset: Option<String>,
    /// Describe at most this many bytes
    #[arg(short = 'l', long = "max-length", value_name = "LENGTH")]
    pub max_length: Option<String>,
    /// Open the image in shared mode (allowed while another process writes it)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// FILE
    #[arg(value_name = "FILE")]
    pub args: Vec<String>,
}

const CMD: &str = "map";

/// qemu-img asks for at most this much per block-status call.
const MAX_QUERY: u64 = 1 << 30;

/// Run `img map`.
pub fn run(a: &MapArgs) -> CmdResult {
    if objects::create(&a.object)? == Objects::HelpShown {
        return Ok(0);
    }
    let output = parse_output(CMD, a.output.as_deref())?;
    let start = match &a.start_offset {
        Some(s) => cvtnum("start offset", s).map_err(Failure::msg)?,
        None => 0,
    };
    let max_length = match &a.max_length {
        Some(s) => Some(cvtnum("max length", s).map_err(Failure::msg)?),
        None => None,
    };
    if a.args.len() != 1 {
        return Err(Failure::usage(CMD, "Expecting one image file name"));
    }
    let named =
        Named::resolve(&a.args[0], a.format.as_deref(), a.image_opts).map_err(Failure::msg)?;
    let name = &named.name;
    let image = named
        .open(OpenOptions {
            read_only: true,
            force_share: a.force_share,
            ..Default::default()
        })
        .map_err(Failure::msg)?;
    let mapper = Mapper::new(&image, name);
    // QEMU's block layer counts lengths in whole 512-byte sectors.
    let mut length = image.driver().size().next_multiple_of(512);
    if let Some(m) = max_length {
        length = length.min(start.saturating_add(m));
    }
    let stdout = std::io::stdout().lock();
    let mut dumper = Dumper::new(std::io::BufWriter::new(stdout), output, start)
        .map_err(|e| Failure::msg(e.to_string()))?;
    let dumped = (|| {
        while dumper.end() < length {
            let at = dumper.end();
            let e = mapper
                .entry(at, (length - at).min(MAX_QUERY))
                .map_err(|e| Failure::msg(format!("Could not read file metadata: {e}")))?;
            dumper.push(e).map_err(dump_failure)?;
        }
        dumper.finish().map_err(dump_failure)
    })();
    dumped.map(|()| 0)
}

fn dump_failure(e: DumpError) -> Failure {
    match e {
        DumpError::Io(e) => Failure::msg(crate::errors::strip_os_error(&e.to_string())),
        DumpError::NoOffset(n) => Failure::msg(n.to_string()),
    }
}

/// Turns the chain's block status into qemu-img's map entries.
struct Mapper<'a> {
    image: &'a Image,
    /// The file name of each layer, as QEMU names it (backing names combined with the
    /// name of the layer above).
    names: Vec<String>,
}

impl<'a> Mapper<'a> {
    fn new(image: &'a Image, top: &str) -> Mapper<'a> {
        // An NBD export goes by QEMU's normalized URI.
        let top = match common::nbd::uri::parse(top) {
            Ok(t) if common::nbd::uri::is_nbd_uri(top) => t.display_name(),
            _ => top.to_string(),
        };
        let mut names = vec![top];
        let mut layer = image.driver();
        while let (Some(below), Some(r)) = (layer.backing(), layer.backing_ref()) {
            let name = path_combine(names.last().expect("the top name"), &r.name);
            names.push(name);
            layer = below;
        }
        Mapper { image, names }
    }

    /// The entry for the run at `at` (at most `len` bytes), as qemu-img's
    /// `get_block_status` reports it.
    fn entry(&self, at: u64, len: u64) -> Result<MapEntry, String> {
        let top = self.image.driver();
        if at >= top.size() {
            // The tail of the last 512-byte sector of an image of unaligned size.
            return Ok(self.with_file(MapEntry {
                start: at,
                length: len,
                present: true,
                zero: true,
                offset: Some(at),
                ..MapEntry::default()
            }));
        }
        let s = top
            .block_status(at, len.min(top.size() - at))
            .map_err(|e| engine_msg(&e))?;
        let base = MapEntry {
            start: at,
            length: s.len,
            depth: s.depth,
            present: true,
            compressed: s.compressed,
            offset: s.host_offset,
            ..MapEntry::default()
        };
        Ok(self.with_file(match s.allocation {
            Allocation::Data => MapEntry { data: true, ..base },
            Allocation::Zero => MapEntry { zero: true, ..base },
            Allocation::DataOverHole => MapEntry {
                data: true,
                zero: true,
                ..base
            },
            Allocation::Unallocated => MapEntry {
                depth: unallocated_depth(top, at),
                present: false,
                zero: true,
                ..base
            },
            Allocation::Undetermined => MapEntry {
                present: false,
                offset: None,
                ..base
            },
        }))
    }

    /// Name the file of the entry's layer when the entry has an offset in it.
    fn with_file(&self, e: MapEntry) -> MapEntry {
        let extent = || {
            self.image
                .layer(e.depth)
                .and_then(|l| l.extent_file_name(e.start))
        };
        let filename = e
            .offset
            .and_then(|_| extent().or_else(|| self.names.get(e.depth as usize).cloned()));
        MapEntry { filename, ..e }
    }
}

/// The layer that answers for guest offset `at` where no layer has data: the first one
/// without a backing file that reaches `at` (QEMU's layer reporting "zero").
fn unallocated_depth(top: &dyn BlockDriver, at: u64) -> u32 {
    let mut depth = 0;
    let mut layer = top;
    while let Some(below) = layer.backing() {
        if at >= below.size() {
            break;
        }
        depth += 1;
        layer = below;
    }
    depth
}
