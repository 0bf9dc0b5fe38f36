//! `img create`: make a new raw or qcow2 image, like `qemu-img create`.

use std::path::Path;

use clap::Args;
use common::create::{create, CreateOptions};
use common::open::{Format, OpenOptions};

use crate::create_opts::{
    creatable, has_help_option, help_text, help_text_with_file, is_valid_option_list,
    not_creatable, opts_for, CreateOpts,
};
use crate::errors::{engine_msg, CmdResult, Failure};
use crate::imgopen::open_named;
use crate::objects::{self, Objects};
use crate::paths::path_combine;
use crate::size::cvtnum;

/// `img create [-f FMT] [-o OPTS] [-b BACKING [-F BACKING_FMT]] [-u] [-q] FILE [SIZE]`
#[derive(Args, Debug, Default)]
pub struct CreateArgs {
    /// Image format (raw or qcow2; default raw)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Define an object (QEMU's --object: only `secret` is taken)
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
    /// Format options, comma separated (`-o help` lists them)
    #[arg(short = 'o', long = "options", value_name = "FMT_OPTS")]
    pub options: Vec<String>,
    /// Backing file of the new image
    #[arg(short = 'b', long = "backing", value_name = "BACKING_FILE")]
    pub backing: Option<String>,
    /// Format of the backing file
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    pub backing_format: Option<String>,
    /// Do not open the backing file (its size is then not known)
    #[arg(short = 'u', long = "backing-unsafe")]
    pub unsafe_backing: bool,
    /// Do not print the "Formatting ..." line
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// FILE [SIZE]
    #[arg(value_name = "FILE [SIZE]")]
    pub args: Vec<String>,
}

const CMD: &str = "create";

/// Run `img create`.
pub fn run(a: &CreateArgs) -> CmdResult {
    if objects::create(&a.object)? == Objects::HelpShown {
        return Ok(0);
    }
    let mut options: Option<String> = None;
    for o in &a.options {
        if !is_valid_option_list(o) {
            return Err(Failure::msg(format!("Invalid option list: {o}")));
        }
        options = Some(match options {
            Some(prev) => format!("{prev},{o}"),
            None => o.clone(),
        });
    }
    let fmt = a.format.clone().unwrap_or_else(|| "raw".to_string());
    let mut pos = a.args.iter();
    let filename = pos.next();
    if let Some(list) = &options {
        if has_help_option(list) {
            let text = match filename {
                Some(_) => help_text_with_file(&fmt),
                None => help_text(&fmt),
            };
            print!("{text}");
            return Ok(0);
        }
    }
    let Some(filename) = filename else {
        return Err(Failure::usage(CMD, "Expecting image file name"));
    };
    let img_size = match pos.next() {
        Some(s) => Some(cvtnum("image size", s).map_err(Failure::msg)?),
        None => None,
    };
    if let Some(extra) = pos.next() {
        return Err(Failure::usage(CMD, format!("Unexpected argument: {extra}")));
    }
    let req = Request {
        filename,
        fmt: &fmt,
        options: options.as_deref(),
        backing: a.backing.as_deref(),
        backing_fmt: a.backing_format.as_deref(),
        unsafe_backing: a.unsafe_backing,
        quiet: a.quiet,
        img_size,
    };
    img_create(&req).map_err(|m| Failure::msg(format!("{filename}: {m}")))?;
    Ok(0)
}

/// What to create, after the command line is checked.
struct Request<'a> {
    filename: &'a str,
    fmt: &'a str,
    options: Option<&'a str>,
    backing: Option<&'a str>,
    backing_fmt: Option<&'a str>,
    unsafe_backing: bool,
    quiet: bool,
    img_size: Option<u64>,
}

/// QEMU's `bdrv_img_create`; errors are the text after `img: FILE: `.
fn img_create(r: &Request) -> Result<(), String> {
    let format = creatable(r.fmt)
        .ok_or_else(|| not_creatable(r.fmt, format!("Unknown file format '{}'", r.fmt)))?;
    let mut opts = CreateOpts::new(opts_for(format));
    if let Some(list) = r.options {
        opts.parse_list(list)?;
    }
    if opts.get("size").is_none() {
        // qemu-img stores "no size" as -1 and only complains later.
        opts.set_int("size", r.img_size.unwrap_or(u64::MAX));
    } else if r.img_size.is_some() {
        return Err("The image size must be specified only once".into());
    }
    if let Some(b) = r.backing {
        if !opts.accepts("backing_file") {
            return Err(format!(
                "Backing file not supported for file format '{}'",
                r.fmt
            ));
        }
        opts.set_text("backing_file", b)?;
    }
    if let Some(f) = r.backing_fmt {
        if !opts.accepts("backing_fmt") {
            return Err(format!(
                "Backing file format not supported for file format '{}'",
                r.fmt
            ));
        }
        opts.set_text("backing_fmt", f)?;
    }
    let backing_file = opts.get_str("backing_file").map(str::to_string);
    let backing_fmt = opts.get_str("backing_fmt").map(str::to_string);
    if let Some(b) = &backing_file {
        if b == r.filename {
            return Err(
                "Error: Trying to create an image with the same filename as the backing file"
                    .into(),
            );
        }
        if b.is_empty() {
            return Err("Expected backing file name, got empty string".into());
        }
    }
    let mut size = opts.get_int("size").unwrap_or(u64::MAX);
    match &backing_file {
        Some(b) if !r.unsafe_backing => {
            let full = path_combine(r.filename, b);
            let hint = "\nCould not open backing image.";
            let bfmt = match &backing_fmt {
                Some(f) => Some(Format::from_name(f).map_err(|e| engine_msg(&e) + hint)?),
                None => None,
            };
            let image = open_named(
                &full,
                &OpenOptions {
                    read_only: true,
                    force_share: true,
                    format: bfmt,
                    no_backing: true,
                    ..Default::default()
                },
            )
            .map_err(|e| e + hint)?;
            if backing_fmt.is_none() {
                return Err(format!(
                    "Backing file specified without backing format\nDetected format of {}.",
                    image.driver().format_name()
                ));
            }
            if size == u64::MAX {
                // QEMU's block layer counts lengths in whole 512-byte sectors.
                size = image.driver().size().next_multiple_of(512);
                opts.set_int("size", size);
            }
        }
        Some(_) if backing_fmt.is_none() => {
            return Err("Backing file specified without backing format".into());
        }
        _ => {}
    }
    if size == u64::MAX {
        return Err("Image creation needs a size parameter".into());
    }
    if !r.quiet {
        println!(
            "Formatting '{}', fmt={} {}",
            r.filename,
            r.fmt,
            opts.print_line()
        );
    }
    let create_opts =
        CreateOptions::from_values(format, &opts, size).map_err(|e| engine_msg(&e))?;
    create(Path::new(r.filename), &create_opts).map_err(|e| engine_msg(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create_opts::QCOW2_OPTS;

    use common::create::{CompressionType, Preallocation, Qcow2CreateOptions};

    fn check(list: &str, size: u64) -> Result<Qcow2CreateOptions, String> {
        let mut o = CreateOpts::new(QCOW2_OPTS);
        if !list.is_empty() {
            o.parse_list(list).unwrap();
        }
        match CreateOptions::from_values(Format::Qcow2, &o, size) {
            Ok(CreateOptions::Qcow2(q)) => Ok(q),
            Ok(other) => panic!("qcow2 options expected, got {other:?}"),
            Err(e) => Err(engine_msg(&e)),
        }
    }

    #[test]
    fn qcow2_checks_in_qemu_order() {
        // Each expectation captured from qemu-img 10.0.2.
        let cases = [
            ("compat=2", "Parameter 'version' does not accept value '2'"),
            ("preallocation=bad,compat=bad", "Parameter 'version' does not accept value 'bad'"),
            ("compat=0.10,lazy_refcounts=on,refcount_bits=3", "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"),
            ("cluster_size=3000,extended_l2=on,compat=0.10", "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)"),
            ("extended_l2=on,cluster_size=4k", "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"),
            ("cluster_size=4M", "Cluster size must be a power of two between 512 and 2048k"),
            ("cluster_size=256", "Cluster size must be a power of two between 512 and 2048k"),
            ("refcount_bits=128", "Refcount width must be a power of two and may not exceed 64 bits"),
            ("refcount_bits=0", "Refcount width must be a power of two and may not exceed 64 bits"),
            ("refcount_bits=-1", "Refcount width must be a power of two and may not exceed 64 bits"),
            ("compat=0.10,refcount_bits=8,compression_type=zstd", "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"),
            ("compression_type=zstd,compat=0.10", "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)"),
            ("compression_type=lz4", "Parameter 'compression-type' does not accept value 'lz4'"),
            ("backing_fmt=raw,lazy_refcounts=on,compat=0.10", "Backing format cannot be used without backing file"),
            ("backing_file=b,backing_fmt=raw,preallocation=full", "Backing file and preallocation can only be used at the same time if extended_l2 is on"),
        ];
        for (list, want) in cases {
            assert_eq!(check(list, 1 << 20).unwrap_err(), want, "{list}");
        }
        assert!(check(
            "backing_file=b,backing_fmt=raw,preallocation=full,extended_l2=on",
            1 << 20
        )
        .is_ok());
    }

    #[test]
    fn qcow2_size_limits() {
        assert_eq!(check("", 2 << 50).unwrap().size, 2 << 50);
        assert_eq!(
            check("", (2 << 50) + 512).unwrap_err(),
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
        );
        assert!(check("cluster_size=2M", 8191 << 50).is_err());
        assert_eq!(check("", 5).unwrap().size, 512);
        assert_eq!(
            check("", 9 << 60).unwrap_err(),
            "Could not resize image: Image size cannot be negative"
        );
    }

    #[test]
    fn qcow2_values() {
        let q = check(
            "compat=v3,cluster_size=512,lazy_refcounts=on,refcount_bits=8,compression_type=zstd,preallocation=metadata",
            1 << 20,
        )
        .unwrap();
        assert_eq!(q.version, 3);
        assert_eq!(q.cluster_size, 512);
        assert!(q.lazy_refcounts);
        assert_eq!(q.refcount_bits, 8);
        assert_eq!(q.compression_type, CompressionType::Zstd);
        assert_eq!(q.preallocation, Preallocation::Metadata);
        assert_eq!(check("compat=0.10", 1).unwrap().version, 2);
    }
}
