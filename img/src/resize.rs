//! `img resize`: change an image's virtual size, like `qemu-img resize`.

use clap::Args;
use common::open::OpenOptions;
use common::prealloc::Preallocation;

use crate::errors::{engine_msg, CmdResult, Failure};
use crate::imgopen::open_user_image;
use crate::objects::{self, Objects};
use crate::size::{parse_size, SizeError};

/// `img resize [-f FMT] [--preallocation PREALLOC] [--shrink] [-q] FILE [+-]SIZE`
#[derive(Args, Debug, Default)]
pub struct ResizeArgs {
    /// Image format (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// FILE is an option string (driver=FMT,file.filename=PATH,...), not a file name
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Define an object (QEMU's --object: only `secret` is taken)
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
    /// Preallocation of the added area: off, metadata (qcow2), falloc or full
    #[arg(long = "preallocation", value_name = "PREALLOC")]
    pub preallocation: Option<String>,
    /// Allow shrinking (deletes everything past the new end)
    #[arg(long = "shrink")]
    pub shrink: bool,
    /// Quiet
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// FILE [+-]SIZE
    #[arg(value_name = "FILE")]
    pub args: Vec<String>,
}

const CMD: &str = "resize";

/// qemu-img reads the argument right after the file name as the size even when it looks
/// like an option (`FILE -1G`), if it is a minus sign and a digit. Takes that argument
/// out of `argv` (`img resize ...`) before options are parsed, and returns it.
pub fn split_negative_size(mut argv: Vec<String>) -> (Vec<String>, Option<String>) {
    let mut i = 2;
    while i < argv.len() {
        let a = argv[i].as_str();
        if a == "--" {
            return (argv, None);
        }
        if !a.starts_with('-') || a == "-" {
            break;
        }
        // Options that take their value from the next argument.
        i += if a == "-f" || a == "--preallocation" || a == "--format" {
            2
        } else {
            1
        };
    }
    let negative = argv.get(i + 1).is_some_and(|s| {
        s.strip_prefix('-')
            .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
    });
    let size = negative.then(|| argv.remove(i + 1));
    (argv, size)
}

/// The new size: `SIZE`, or the current size plus or minus it, in qemu-img's signed
/// arithmetic (a result at or below zero is refused later).
fn new_size(spec: &str, current: u64) -> Result<i64, Failure> {
    let (sign, num) = match spec.as_bytes().first() {
        Some(b'+') => (1i64, &spec[1..]),
        Some(b'-') => (-1i64, &spec[1..]),
        _ => (0i64, spec),
    };
    let n = match parse_size(num) {
        Ok(n) => n,
        Err(SizeError::Range) => {
            return Err(Failure::msg(format!(
                "Value '{num}' is out of range for parameter 'size'"
            )))
        }
        Err(SizeError::Invalid) => {
            return Err(Failure::msg(
                "Parameter 'size' expects a non-negative number below 2^64\n\
                 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                 and exabytes, respectively.",
            ))
        }
    };
    Ok(match sign {
        0 => n as i64,
        s => (current as i64).wrapping_add((n as i64).wrapping_mul(s)),
    })
}

/// Run `img resize`; `negative` is a size taken out by [`split_negative_size`].
pub fn run(a: &ResizeArgs, negative: Option<&str>) -> CmdResult {
    if objects::create(&a.object)? == Objects::HelpShown {
        return Ok(0);
    }
    let prealloc = match a.preallocation.as_deref() {
        None => Preallocation::Off,
        Some(p) => Preallocation::from_name(p)
            .map_err(|_| Failure::msg(format!("Invalid preallocation mode '{p}'")))?,
    };
    let (name, spec) = match (a.args.as_slice(), negative) {
        ([name], Some(size)) => (name, size),
        ([name, size], None) => (name, size.as_str()),
        (args, size) if args.len() + usize::from(size.is_some()) > 2 => {
            return Err(Failure::usage(CMD, "Extra argument(s) in command line"))
        }
        _ => return Err(Failure::usage(CMD, "Expecting image file name and size")),
    };
    let image = open_user_image(
        name,
        a.format.as_deref(),
        a.image_opts,
        OpenOptions::default(),
    )
    .map_err(Failure::msg)?;
    let current = image.driver().size();
    let total = new_size(spec, current)?;
    if total <= 0 {
        return Err(Failure::msg("New image size must be positive"));
    }
    let total = total as u64;
    if total <= current && prealloc != Preallocation::Off {
        return Err(Failure::msg(
            "Preallocation can only be used for growing images",
        ));
    }
    if total < current && !a.shrink {
        return Err(Failure::msg(
            "Use the --shrink option to perform a shrink operation.\n\
             img: warning: Shrinking an image will delete all data beyond the shrunken \
             image's end. Before performing such an operation, make sure there is no \
             important data there.",
        ));
    }
    image
        .resize(total, prealloc)
        .map_err(|e| Failure::msg(engine_msg(&e)))?;
    image
        .driver()
        .flush()
        .map_err(|e| Failure::msg(engine_msg(&e)))?;
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(0)
}
