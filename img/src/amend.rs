//! `img amend`: change a qcow2 image's options in place, like `qemu-img amend`.

use std::io::Write;

use clap::{ArgAction, Args};
use common::open::{Format, OpenOptions};
use common::ops::AmendOptions;

use crate::create_opts::{
    has_help_option, is_valid_option_list, CreateOpts, QCOW2_AMEND_HELP, QCOW2_AMEND_OPTS,
    QCOW2_CREATE_ONLY,
};
use crate::errors::{engine_msg, CmdResult, Failure};
use crate::imgopen::open_user_image;
use crate::objects::{self, Objects};

/// `img amend [-f FMT] [-t CACHE] [-p] [-q] [--force] -o OPTIONS FILE`
#[derive(Args, Debug, Default)]
pub struct AmendArgs {
    /// Image format (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// FILE is an option string (driver=FMT,file.filename=PATH,...), not a file name
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Define an object (QEMU's --object: only `secret` is taken)
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
    /// Options to change (`-o help` lists them); several -o are joined
    #[arg(short = 'o', long = "options", value_name = "OPTIONS", action = ArgAction::Append)]
    pub options: Vec<String>,
    /// Cache mode of the image (accepted for compatibility)
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// Show progress
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Allow changes that can lose data (encryption keyslots; no effect here)
    #[arg(long = "force")]
    pub force: bool,
    /// FILE
    #[arg(value_name = "FILE")]
    pub args: Vec<String>,
}

const CMD: &str = "amend";

/// The options of the `-o` list, parsed against qcow2's amend table.
fn parse(list: &str) -> Result<AmendOptions, Failure> {
    let mut opts = CreateOpts::new(QCOW2_AMEND_OPTS);
    opts.parse_list(list).map_err(|e| {
        let name = e
            .strip_prefix("Invalid parameter '")
            .and_then(|r| r.strip_suffix('\''));
        match name {
            Some(n) if QCOW2_CREATE_ONLY.contains(&n) => Failure::msg(format!(
                "{e}\nThis option is only supported for image creation"
            )),
            _ => Failure::msg(e),
        }
    })?;
    Ok(AmendOptions {
        compat: opts.get_str("compat").map(str::to_string),
        size: opts.get_int("size"),
        backing_file: opts.get_str("backing_file").map(str::to_string),
        backing_fmt: opts.get_str("backing_fmt").map(str::to_string),
        data_file: opts.get_str("data_file").map(str::to_string),
        data_file_raw: opts.get_bool("data_file_raw"),
        lazy_refcounts: opts.get_bool("lazy_refcounts"),
        refcount_bits: opts.get_int("refcount_bits"),
        encrypt: QCOW2_AMEND_OPTS
            .iter()
            .any(|d| d.name.starts_with("encrypt.") && opts.get(d.name).is_some()),
    })
}

/// `-o help` for a format.
fn help(format: Format) -> CmdResult {
    match format {
        Format::Qcow2 => {
            print!("{QCOW2_AMEND_HELP}");
            Ok(0)
        }
        f => Err(unsupported(f)),
    }
}

fn unsupported(f: Format) -> Failure {
    Failure::msg(format!(
        "Format driver '{}' does not support option amendment",
        f.name()
    ))
}

/// qemu-img's progress line on stdout.
fn show_progress(pct: f64) {
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "    ({pct:.2}/100%)\r");
    let _ = out.flush();
}

/// Run `img amend`.
pub fn run(a: &AmendArgs) -> CmdResult {
    if objects::create(&a.object)? == Objects::HelpShown {
        return Ok(0);
    }
    for o in &a.options {
        if !is_valid_option_list(o) {
            return Err(Failure::msg(format!("Invalid option list: {o}")));
        }
    }
    if a.options.is_empty() {
        return Err(Failure::usage(CMD, "Must specify options (-o)"));
    }
    let list = a.options.join(",");
    let format = a
        .format
        .as_deref()
        .map(Format::from_name)
        .transpose()
        .map_err(|e| Failure::msg(engine_msg(&e)))?;
    if let (Some(f), true) = (format, has_help_option(&list)) {
        return help(f);
    }
    let [name] = a.args.as_slice() else {
        return Err(Failure::msg("Expecting one image file name"));
    };
    let image = open_user_image(
        name,
        a.format.as_deref(),
        a.image_opts,
        OpenOptions::default(),
    )
    .map_err(Failure::msg)?;
    if image.format() != Format::Qcow2 {
        return Err(unsupported(image.format()));
    }
    if has_help_option(&list) {
        return help(image.format());
    }
    let opts = parse(&list)?;
    let shown = a.progress && !a.quiet;
    if shown {
        show_progress(0.0);
    }
    let mut progress = |pct: f64| {
        if shown {
            show_progress(pct);
        }
    };
    image
        .amend(&opts, &mut progress)
        .map_err(|e| Failure::msg(engine_msg(&e)))?;
    if shown {
        show_progress(100.0);
        println!();
    }
    Ok(0)
}
