//! Opening an image by the name the user gave, with qemu-img's wording for failures.

use std::path::Path;

use common::open::{open_image, Format, Image, JsonBacking, OpenOptions};
use common::ops::OpenWarning;

use crate::errors::engine_msg;
use crate::image_opts::{self, Conflict, ImageSpec};

/// Open `name`; the error is the text qemu-img prints after `Could not open 'NAME': `
/// (or, for the backing file of `create`, after `FILE: `).
pub fn open_named(name: &str, opts: &OpenOptions) -> Result<Image, String> {
    if name.is_empty() {
        return Err("The 'file' block driver requires a file name".into());
    }
    let path = Path::new(name);
    if path.is_dir() {
        return Err(format!(
            "'file' driver requires '{name}' to be a regular file"
        ));
    }
    let opts = OpenOptions {
        json_names: Some(json_backing),
        ..opts.clone()
    };
    let image = open_image(path, &opts).map_err(|e| engine_msg(&e))?;
    print_warnings(&image);
    Ok(image)
}

/// A `json:{...}` backing file name read as qemu-img reads it: the file or NBD server it
/// names, in the format the overlay records or else the one its `driver` gives.
fn json_backing(json: &str, recorded: Option<&str>) -> Result<JsonBacking, String> {
    let spec = image_opts::parse_json(json, recorded)?;
    Ok(JsonBacking {
        no_backing: spec.no_backing(),
        name: spec.name,
        format: spec.format,
    })
}

/// An image as the user named it: a file name (or NBD URI, or QEMU's `json:{...}`) in an
/// optional format, or an `--image-opts` string.
#[derive(Debug, Clone)]
pub struct Named {
    /// The file name or NBD URI to open.
    pub name: String,
    pub format: Option<Format>,
    /// What the user typed, for `Could not open '...'`.
    pub label: String,
    spec: Option<ImageSpec>,
}

impl Named {
    /// `arg` in format `format` (`-f`; probed when `None`), or with `image_opts` an option
    /// string; the error is qemu-img's whole message.
    pub fn resolve(arg: &str, format: Option<&str>, image_opts: bool) -> Result<Named, String> {
        let open_err = |m: String| format!("Could not open '{arg}': {m}");
        if image_opts {
            if format.is_some() {
                return Err("--image-opts and --format are mutually exclusive".into());
            }
            let spec = image_opts::parse(arg).map_err(open_err)?;
            return Ok(Named {
                name: spec.name.clone(),
                format: spec.format,
                label: arg.to_string(),
                spec: Some(spec),
            });
        }
        let fmt_arg = format;
        let format = format
            .map(Format::from_name)
            .transpose()
            .map_err(|e| open_err(engine_msg(&e)))?;
        if let Some(json) = arg.strip_prefix("json:") {
            let spec = image_opts::parse_json(json, fmt_arg).map_err(open_err)?;
            return Ok(Named {
                name: spec.name.clone(),
                format: spec.format,
                label: arg.to_string(),
                spec: Some(spec),
            });
        }
        Ok(Named {
            name: arg.to_string(),
            format,
            label: arg.to_string(),
            spec: None,
        })
    }

    /// `opts` with the format and what an option string asked for; the error is
    /// qemu-img's whole message.
    pub fn options(&self, opts: OpenOptions) -> Result<OpenOptions, String> {
        match &self.spec {
            Some(spec) => spec.open_options(opts).map_err(|c| match c {
                Conflict::ReadOnly => self.open_error("Block node is read-only"),
                Conflict::ForceShare => "--force-share/-U conflicts with image options".into(),
            }),
            None => Ok(OpenOptions {
                format: self.format,
                ..opts
            }),
        }
    }

    /// An option string named a protocol driver (`driver=file`): there is no format
    /// node, the protocol's node is the image.
    pub fn protocol_on_top(&self) -> bool {
        self.spec.as_ref().is_some_and(|s| s.protocol_on_top)
    }

    /// qemu-img's `Could not open 'NAME': MESSAGE`.
    pub fn open_error(&self, m: &str) -> String {
        format!("Could not open '{}': {m}", self.label)
    }

    /// Open it with the rest of `opts`.
    pub fn open(&self, opts: OpenOptions) -> Result<Image, String> {
        let opts = self.options(opts)?;
        let image = open_named(&self.name, &opts).map_err(|m| self.open_error(&m))?;
        if let Some(spec) = &self.spec {
            spec.check_probed(image.driver().format_name())
                .map_err(|m| self.open_error(&m))?;
        }
        Ok(image)
    }
}

/// Open the image the user named (see [`Named::resolve`]) with the rest of `opts`: any
/// failure, an unknown format included, is qemu-img's whole `Could not open 'NAME': ...`
/// text.
pub fn open_user_image(
    name: &str,
    format: Option<&str>,
    image_opts: bool,
    opts: OpenOptions,
) -> Result<Image, String> {
    Named::resolve(name, format, image_opts)?.open(opts)
}

/// Print what qemu-img warns about when it opens `image` (its words; the second line of
/// the bitmaps warning ends without a newline, as QEMU's does).
fn print_warnings(image: &Image) {
    for w in image.open_warnings() {
        match w {
            OpenWarning::StaleBitmaps { v2 } => {
                let first = if v2 {
                    "This qcow2 v2 image contains bitmaps, but they may have been modified by \
                     a program without persistent bitmap support; so now they must all be \
                     considered inconsistent"
                } else {
                    "a program lacking bitmap support modified this file, so all bitmaps are \
                     now considered inconsistent"
                };
                eprint!(
                    "img: warning: {first}\nSome clusters may be leaked, run 'img check -r' on \
                     the image file to fix."
                );
            }
        }
    }
}
