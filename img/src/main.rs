//! `img`: a qemu-img compatible disk image tool.
//!
//! Same subcommands, flags, output and exit codes as qemu-img 10; messages start with
//! `img: ` where qemu-img's start with `qemu-img: `.

mod amend;
mod bench;
mod big_buffers;
mod bitmap;
mod chain;
mod check;
mod check_format;
mod commit;
mod compare;
mod convert;
mod create;
mod create_opts;
mod dd;
mod errors;
mod image_opts;
mod imgopen;
mod info;
mod info_format;
mod map;
mod map_format;
mod measure;
mod objects;
mod paths;
mod progress;
mod qemu_opts;
mod qjson;
mod rebase;
mod resize;
mod serve;
mod size;
mod snapshot;
mod snapshot_param;
mod workers;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Parser, Subcommand};

use errors::{CmdResult, Failure};

/// The qemu-img version whose behaviour `img` follows.
const QEMU_COMPAT_VERSION: &str = "10.0.2";

#[derive(Parser, Debug)]
#[command(
    name = "img",
    about = "Disk image utility (qemu-img compatible)",
    disable_help_subcommand = true,
    disable_version_flag = true,
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Change the format-specific options of an image
    #[command(args_override_self = true)]
    Amend(amend::AmendArgs),
    /// Run a simple image benchmark
    #[command(args_override_self = true)]
    Bench(bench::BenchArgs),
    /// Add, remove, clear, enable, disable or merge persistent dirty bitmaps
    #[command(args_override_self = true)]
    Bitmap(bitmap::BitmapArgs),
    /// Check an image for consistency, and repair it
    #[command(args_override_self = true)]
    Check(check::CheckArgs),
    /// Commit the changes recorded in an image to its backing file
    #[command(args_override_self = true)]
    Commit(commit::CommitArgs),
    /// Check whether two images have the same contents
    #[command(args_override_self = true)]
    Compare(compare::CompareArgs),
    /// Convert an image to another format or into another image
    #[command(args_override_self = true)]
    Convert(convert::ConvertArgs),
    /// Create and format a new image file
    #[command(args_override_self = true)]
    Create(create::CreateArgs),
    /// Copy input to output with optional format conversion
    #[command(args_override_self = true)]
    Dd(dd::DdArgs),
    /// Display information about an image
    #[command(args_override_self = true)]
    Info(info::InfoArgs),
    /// Dump the metadata of an image: where its data lives
    #[command(args_override_self = true)]
    Map(map::MapArgs),
    /// Measure the size a new image needs
    #[command(args_override_self = true)]
    Measure(measure::MeasureArgs),
    /// Change the backing file of an image
    #[command(args_override_self = true)]
    Rebase(rebase::RebaseArgs),
    /// Change the virtual size of an image
    #[command(args_override_self = true)]
    Resize(resize::ResizeArgs),
    /// Export an image over NBD (as qemu-nbd)
    #[command(args_override_self = true)]
    Serve(serve::ServeArgs),
    /// List, create, apply or delete internal snapshots
    #[command(args_override_self = true)]
    Snapshot(snapshot::SnapshotArgs),
}

/// Subcommand names, in qemu-img's list order.
const COMMANDS: &[&str] = &[
    "amend", "bench", "bitmap", "check", "commit", "compare", "convert", "create", "dd", "info",
    "map", "measure", "rebase", "resize", "serve", "snapshot",
];

fn version_text() -> String {
    format!(
        "img version {} (qemu-img {QEMU_COMPAT_VERSION} compatible)\n",
        env!("CARGO_PKG_VERSION")
    )
}

fn top_help() -> String {
    let mut s = version_text();
    s.push_str(
        "Disk image utility.  Usage:\n\n  img [standard options] COMMAND [--help | command options]\n\n\
         Standard options:\n  -h, --help      display this help and exit\n  -V, --version   output version information and exit\n\n\
         Commands:\n",
    );
    for c in COMMANDS {
        s.push_str(&format!("  {c}\n"));
    }
    s.push_str("\nRun 'img COMMAND --help' for the options of a command.\n");
    s
}

/// qemu-img's getopt-style text for a command-line error of `cmd` (a subcommand name, or
/// `None` for the top level).
fn usage_error_text(cmd: Option<&str>, err: &clap::Error, argv: &[String]) -> String {
    let who = match cmd {
        Some(c) => format!("img {c}"),
        None => "img".to_string(),
    };
    let try_line = match cmd {
        Some(c) => format!("Try 'img {c} --help' for more info"),
        None => "Try 'img --help' for more info".to_string(),
    };
    let arg = match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        Some(ContextValue::Strings(v)) => v.first().cloned(),
        _ => None,
    };
    let first = match (err.kind(), arg) {
        (ErrorKind::UnknownArgument, Some(a)) => {
            if let Some(long) = a.strip_prefix("--") {
                let long = long.split('=').next().unwrap_or(long);
                format!("{who}: unrecognized option '--{long}'")
            } else {
                let c = a.trim_start_matches('-').chars().next().unwrap_or('?');
                format!("{who}: invalid option -- '{c}'")
            }
        }
        (ErrorKind::InvalidValue | ErrorKind::NoEquals, Some(a))
            if err.get(ContextKind::InvalidValue).is_none()
                || matches!(err.get(ContextKind::InvalidValue), Some(ContextValue::String(v)) if v.is_empty()) =>
        {
            // clap names the long form; say what the user typed, as getopt does (a
            // missing value is only possible on the last argument).
            let name = match argv.last() {
                Some(l) if l.starts_with('-') => l.clone(),
                _ => a.split([' ', '=', '<']).next().unwrap_or(&a).to_string(),
            };
            if let Some(long) = name.strip_prefix("--") {
                let long = long.split('=').next().unwrap_or(long);
                format!("{who}: option '--{long}' requires an argument")
            } else {
                let c = name.chars().last().unwrap_or('?');
                format!("{who}: option requires an argument -- '{c}'")
            }
        }
        _ => {
            let text = err.to_string();
            let line = text
                .lines()
                .next()
                .unwrap_or("invalid usage")
                .trim_start_matches("error: ")
                .to_string();
            format!("{who}: {line}")
        }
    };
    format!("{first}\n{try_line}")
}

fn run(args: Vec<String>) -> CmdResult {
    let Some(first) = args.get(1) else {
        return Err(Failure::msg(
            "Not enough arguments\nTry 'img --help' for more info",
        ));
    };
    match first.as_str() {
        "-h" | "--help" => {
            print!("{}", top_help());
            return Ok(0);
        }
        "-V" | "--version" => {
            print!("{}", version_text());
            return Ok(0);
        }
        s if s.starts_with("--") => {
            return Err(Failure::msg(format!(
                "unrecognized option '{s}'\nTry 'img --help' for more info"
            )));
        }
        s if s.starts_with('-') && s.len() > 1 => {
            let c = s.chars().nth(1).unwrap_or('?');
            return Err(Failure::msg(format!(
                "invalid option -- '{c}'\nTry 'img --help' for more info"
            )));
        }
        s if !COMMANDS.contains(&s) => {
            return Err(Failure::msg(format!(
                "Command not found: {s}\nTry 'img --help' for more info"
            )));
        }
        _ => {}
    }
    let cmd = COMMANDS.iter().copied().find(|c| c == first);
    let (args, negative) = if cmd == Some("resize") {
        resize::split_negative_size(args)
    } else {
        (args, None)
    };
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                print!("{e}");
                return Ok(0);
            }
            _ => {
                eprintln!("{}", usage_error_text(cmd, &e, &args));
                return Ok(1);
            }
        },
    };
    match &cli.command {
        Command::Amend(a) => amend::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Bitmap(a) => bitmap::run(a),
        Command::Check(a) => check::run(a),
        Command::Commit(a) => commit::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Create(a) => create::run(a),
        Command::Dd(a) => dd::run(a),
        Command::Info(a) => info::run(a),
        Command::Map(a) => map::run(a),
        Command::Measure(a) => measure::run(a),
        Command::Rebase(a) => rebase::run(a),
        Command::Resize(a) => resize::run(a, negative.as_deref()),
        Command::Serve(a) => serve::run(a),
        Command::Snapshot(a) => snapshot::run(a),
    }
}

fn main() {
    // Die quietly on a closed pipe (`img info x | head -1`) like C tools, instead of
    // panicking in `print!`.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    big_buffers::own_mappings();
    let args: Vec<String> = std::env::args().collect();
    let code = match run(args) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("{f}");
            1
        }
    };
    std::process::exit(code);
}
