//! `img check`: check (and with `-r` repair) an image's consistency, like `qemu-img check`.

use std::io::Write;

use clap::Args;
use common::check::{CheckReport, Fix};
use common::open::OpenOptions;
use common::Error;

use crate::check_format::{render_human, render_json, repaired_text};
use crate::errors::{engine_msg, CmdResult, Failure};
use crate::imgopen::open_user_image;
use crate::info::{parse_output, OutputFormat};
use crate::objects::{self, Objects};

/// `img check [-f FMT] [-r leaks|all] [--output=human|json] [-T CACHE] [-U] [-q] FILE`
#[derive(Args, Debug, Default)]
pub struct CheckArgs {
    /// Image format (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// FILE is an option string (driver=FMT,file.filename=PATH,...), not a file name
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Define an object (QEMU's --object: only `secret` is taken)
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
    /// Repair leaks, or all inconsistencies
    #[arg(short = 'r', long = "repair", value_name = "leaks|all")]
    pub repair: Option<String>,
    /// Output format: human or json
    #[arg(long = "output", value_name = "human|json")]
    pub output: Option<String>,
    /// Cache mode of the image (accepted; the check reads through the page cache)
    #[arg(short = 'T', long = "source-cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// Open the image in shared mode (allowed while another process writes it)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Quiet: print nothing on stdout
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// FILE
    #[arg(value_name = "FILE")]
    pub args: Vec<String>,
}

const CMD: &str = "check";

fn parse_fix(v: Option<&str>) -> Result<Fix, Failure> {
    match v {
        None => Ok(Fix::default()),
        Some("leaks") => Ok(Fix {
            leaks: true,
            errors: false,
        }),
        Some("all") => Ok(Fix {
            leaks: true,
            errors: true,
        }),
        Some(other) => Err(Failure::usage(
            CMD,
            format!("--repair (-r) expects 'leaks' or 'all' not '{other}'"),
        )),
    }
}

/// Run `img check`.
pub fn run(a: &CheckArgs) -> CmdResult {
    if objects::create(&a.object)? == Objects::HelpShown {
        return Ok(0);
    }
    let fix = parse_fix(a.repair.as_deref())?;
    let output = parse_output(CMD, a.output.as_deref())?;
    if a.args.len() != 1 {
        return Err(Failure::usage(CMD, "Expecting one image file name"));
    }
    let name = &a.args[0];
    let opts = OpenOptions {
        read_only: !fix.any(),
        force_share: a.force_share,
        check: true,
        ..Default::default()
    };
    let image =
        open_user_image(name, a.format.as_deref(), a.image_opts, opts).map_err(Failure::msg)?;
    let mut report = match image.check(fix) {
        Ok(r) => r,
        Err(Error::Unsupported(_)) => {
            eprintln!(
                "{}",
                Failure::msg("This image format does not support checks")
            );
            return Ok(63);
        }
        Err(e) => return Err(Failure::msg(format!("Check failed: {}", engine_msg(&e)))),
    };
    let format_name = image.format().name();
    print_messages(&report);
    if report.failure.is_none() && (report.corruptions_fixed != 0 || report.leaks_fixed != 0) {
        if output == OutputFormat::Human && !a.quiet {
            print!("{}", repaired_text(&report));
        }
        let (leaks_fixed, corruptions_fixed) = (report.leaks_fixed, report.corruptions_fixed);
        report = image
            .check(Fix::default())
            .map_err(|e| Failure::msg(engine_msg(&e)))?;
        print_messages(&report);
        report.leaks_fixed = leaks_fixed;
        report.corruptions_fixed = corruptions_fixed;
    }
    if let Some(e) = &report.failure {
        let text = common::error::os_message(e);
        return Err(Failure::msg(format!("Check failed: {text}")));
    }
    if !a.quiet {
        match output {
            OutputFormat::Human => print!("{}", render_human(&report)),
            OutputFormat::Json => print!("{}", render_json(&report, name, format_name)),
        }
    }
    if report.check_errors != 0 {
        return Err(Failure::msg("Check failed"));
    }
    Ok(if report.corruptions != 0 {
        2
    } else if report.leaks != 0 {
        3
    } else {
        0
    })
}

/// The check's messages on stderr, buffered: a damaged image can have a hundred thousand.
fn print_messages(r: &CheckReport) {
    let mut err = std::io::BufWriter::new(std::io::stderr().lock());
    for m in &r.messages {
        let _ = writeln!(err, "{m}");
    }
    let _ = err.flush();
}
