//! `img rebase`: put an image on another backing file (or none), like `qemu-img rebase`.
//! Safe mode first copies into the image every range it does not hold where the old and
//! the new backing file read differently (`rebase_copy`), so the guest sees no change;
//! then the header names the new file. `-u` only rewrites the name.

use clap::Args;
use common::backing::BackingRef;
use common::open::{Format, Image, OpenOptions};
use common::{BlockDriver, Error};

use crate::chain::{find_backing_image, has_protocol};
use crate::convert::cache_is_direct;
use crate::errors::{engine_msg, CmdResult, Failure};
use crate::imgopen::{open_named, Named};
use crate::objects::{self, Objects};
use crate::paths::path_combine;
use crate::progress::Progress;

mod copy;

/// `img rebase [-f FMT] [-t CACHE] [-T SRC_CACHE] [-b BACKING [-F FMT]] [-u] [-c] [-U] [-p]
/// [-q] FILE`
#[derive(Args, Debug, Default)]
pub struct RebaseArgs {
    /// Image format (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// FILE is an option string (driver=FMT,file.filename=PATH,...), not a file name
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Define an object (QEMU's --object: only `secret` is taken)
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
    /// Cache mode of the image
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// The new backing file ("" for none)
    #[arg(short = 'b', long = "backing", value_name = "BACKING_FILENAME")]
    pub backing: Option<String>,
    /// Format of the new backing file
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    pub backing_format: Option<String>,
    /// Cache mode of the backing files
    #[arg(short = 'T', long = "backing-cache", value_name = "CACHE")]
    pub src_cache: Option<String>,
    /// Unsafe: only change the name, do not compare the backing files
    #[arg(short = 'u', long = "backing-unsafe")]
    pub unsafe_: bool,
    /// Write what is copied compressed
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// Open the new backing file even if another process uses it
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Show progress
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// FILE
    #[arg(value_name = "FILENAME")]
    pub args: Vec<String>,
}

const CMD: &str = "rebase";

/// Run `img rebase`.
pub fn run(a: &RebaseArgs) -> CmdResult {
    if objects::create(&a.object)? == Objects::HelpShown {
        return Ok(0);
    }
    if a.args.len() != 1 {
        return Err(Failure::usage(CMD, "Expecting one image file name"));
    }
    if !a.unsafe_ && a.backing.is_none() {
        return Err(Failure::usage(
            CMD,
            "Must specify backing file (-b) or use unsafe mode (-u)",
        ));
    }
    let progress = Progress::new(a.progress && !a.quiet);
    let direct = cache_is_direct(a.cache.as_deref()).ok_or_else(|| {
        Failure::msg(format!(
            "Invalid cache option: {}",
            a.cache.as_deref().unwrap_or("")
        ))
    })?;
    let src_direct = cache_is_direct(a.src_cache.as_deref()).ok_or_else(|| {
        Failure::msg(format!(
            "Invalid source cache option: {}",
            a.src_cache.as_deref().unwrap_or("")
        ))
    })?;
    let opts = OpenOptions {
        direct,
        no_flush: a.cache.as_deref() == Some("unsafe"),
        // The old backing file need not open to be renamed.
        no_backing: a.unsafe_,
        ..Default::default()
    };
    let named =
        Named::resolve(&a.args[0], a.format.as_deref(), a.image_opts).map_err(Failure::msg)?;
    let name = &named.name;
    let image = named.open(opts).map_err(Failure::msg)?;
    if a.compress && image.format() != Format::Qcow2 {
        return Err(Failure::msg(
            "Compression not supported for this file format",
        ));
    }
    if let Some(f) = &a.backing_format {
        Format::from_name(f).map_err(|_| Failure::msg(format!("Invalid format name: '{f}'")))?;
    }
    let new_name = a.backing.as_deref().filter(|b| !b.is_empty());
    if !a.unsafe_ {
        let source = BackingSource {
            name,
            new_name,
            format: a.backing_format.as_deref(),
            force_share: a.force_share,
            direct: src_direct,
        };
        let opened;
        let new: Option<NewBacking<'_>> = match source.find_in_chain(&image) {
            Some(depth) => Some(NewBacking::InChain(depth)),
            None => match source.open()? {
                Some(img) => {
                    opened = img;
                    Some(NewBacking::Opened(opened.driver()))
                }
                None => None,
            },
        };
        copy::copy_differences(&image, new.as_ref(), a.compress, &progress)
            .map_err(Failure::msg)?;
    }
    let shown = a.backing.as_deref().unwrap_or("(null)");
    let fail = |m: &str| {
        Failure::msg(format!(
            "Could not change the backing file to '{shown}': {m}"
        ))
    };
    let backing = match new_name {
        Some(n) => {
            let Some(format) = &a.backing_format else {
                return Err(fail("backing format must be specified"));
            };
            Some(BackingRef {
                name: n.to_string(),
                format: Some(format.clone()),
            })
        }
        None => None,
    };
    image
        .change_backing_file(backing.as_ref())
        .map_err(|e| fail(&errno_text(&e)))?;
    progress.finish();
    Ok(0)
}

/// Where the new backing file's contents come from.
pub enum NewBacking<'a> {
    /// A layer of the image's own chain, at this depth (QEMU reuses it).
    InChain(u32),
    /// Opened for the rebase.
    Opened(&'a dyn BlockDriver),
}

/// The new backing file as the user named it.
struct BackingSource<'a> {
    /// The image being rebased, as named.
    name: &'a str,
    new_name: Option<&'a str>,
    format: Option<&'a str>,
    force_share: bool,
    direct: bool,
}

impl BackingSource<'_> {
    /// The new name relative to the image's directory, as QEMU resolves it.
    fn resolved(&self, new: &str) -> String {
        if has_protocol(new) {
            new.to_string()
        } else {
            path_combine(self.name, new)
        }
    }

    /// The depth of the layer of `image`'s chain the new name names, if any.
    fn find_in_chain(&self, image: &Image) -> Option<u32> {
        let new = self.new_name?;
        find_backing_image(self.name, image, &self.resolved(new))
    }

    /// Open the new backing file (read-only), or `None` for no backing file.
    fn open(&self) -> Result<Option<Image>, Failure> {
        let Some(new) = self.new_name else {
            return Ok(None);
        };
        let opts = OpenOptions {
            read_only: true,
            force_share: self.force_share,
            direct: self.direct,
            format: self
                .format
                .map(Format::from_name)
                .transpose()
                .ok()
                .flatten(),
            ..Default::default()
        };
        open_named(&self.resolved(new), &opts)
            .map(Some)
            .map_err(|e| Failure::msg(format!("Could not open new backing file '{new}': {e}")))
    }
}

/// The C `strerror` text qemu-img prints for a failed header update.
fn errno_text(e: &Error) -> String {
    match e {
        Error::NoSpace(_) => "No space left in the file header".into(),
        Error::InvalidArgument(_) => "Invalid argument".into(),
        Error::Unsupported(_) => "Operation not supported".into(),
        Error::ReadOnly => "Permission denied".into(),
        e => engine_msg(e),
    }
}
