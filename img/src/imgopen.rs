//! Opening an image by the name the user gave, with qemu-img's wording for failures.

use std::path::Path;

use common::open::{open_image, Format, Image, OpenOptions};
use common::ops::OpenWarning;

use crate::errors::engine_msg;

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
    let image = open_image(path, opts).map_err(|e| engine_msg(&e))?;
    print_warnings(&image);
    Ok(image)
}

/// Open the image the user named, in format `format` (`-f`; probed when `None`), with the
/// rest of `opts`: any failure, an unknown format included, is qemu-img's whole
/// `Could not open 'NAME': ...` text.
pub fn open_user_image(
    name: &str,
    format: Option<&str>,
    opts: OpenOptions,
) -> Result<Image, String> {
    let open_err = |m: String| format!("Could not open '{name}': {m}");
    let format = format
        .map(Format::from_name)
        .transpose()
        .map_err(|e| open_err(engine_msg(&e)))?;
    open_named(name, &OpenOptions { format, ..opts }).map_err(open_err)
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
