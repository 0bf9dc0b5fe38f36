//! `img snapshot`: list, create, apply or delete internal snapshots, like
//! `qemu-img snapshot`.

use clap::{ArgAction, Args};
use common::open::OpenOptions;
use common::Error;

use crate::errors::{engine_msg, CmdResult, Failure};
use crate::imgopen::open_user_image;
use crate::info_format::{local_date, snapshot_list};
use crate::objects::{self, Objects};

/// `img snapshot [-l | -a NAME | -c NAME | -d NAME] [-f FMT] [-U] [-q] FILE`
#[derive(Args, Debug, Default)]
pub struct SnapshotArgs {
    /// List the snapshots (the default)
    #[arg(short = 'l', action = ArgAction::Count)]
    pub list: u8,
    /// Apply (revert the image to) a snapshot, by ID or name
    #[arg(short = 'a', value_name = "SNAPSHOT", action = ArgAction::Append)]
    pub apply: Vec<String>,
    /// Create a snapshot
    #[arg(short = 'c', value_name = "SNAPSHOT", action = ArgAction::Append)]
    pub create: Vec<String>,
    /// Delete a snapshot, by name
    #[arg(short = 'd', value_name = "SNAPSHOT", action = ArgAction::Append)]
    pub delete: Vec<String>,
    /// Image format (probed when not given)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// FILE is an option string (driver=FMT,file.filename=PATH,...), not a file name
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Define an object (QEMU's --object: only `secret` is taken)
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
    /// Open the image in shared mode (allowed while another process writes it)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Quiet
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// FILE
    #[arg(value_name = "FILE")]
    pub args: Vec<String>,
}

const CMD: &str = "snapshot";

/// What was asked for.
enum Action<'a> {
    List,
    Apply(&'a str),
    Create(&'a str),
    Delete(&'a str),
}

fn action(a: &SnapshotArgs) -> Result<Action<'_>, Failure> {
    let n = usize::from(a.list) + a.apply.len() + a.create.len() + a.delete.len();
    if n > 1 {
        return Err(Failure::usage(CMD, "Cannot mix '-l', '-a', '-c', '-d'"));
    }
    Ok(if let Some(s) = a.apply.first() {
        Action::Apply(s)
    } else if let Some(s) = a.create.first() {
        Action::Create(s)
    } else if let Some(s) = a.delete.first() {
        Action::Delete(s)
    } else {
        Action::List
    })
}

/// qemu-img prints `strerror` for a failed create: the error number's text.
fn create_error(e: &Error) -> String {
    match e {
        Error::InvalidArgument(_) => "Invalid argument".into(),
        e => engine_msg(e),
    }
}

/// Run `img snapshot`.
pub fn run(a: &SnapshotArgs) -> CmdResult {
    if objects::create(&a.object)? == Objects::HelpShown {
        return Ok(0);
    }
    let act = action(a)?;
    if a.args.len() != 1 {
        return Err(Failure::usage(CMD, "Expecting one image file name"));
    }
    let name = &a.args[0];
    let opts = OpenOptions {
        // qemu-img opens read-write unless `-l` was given, even to list by default.
        read_only: a.list > 0,
        force_share: a.force_share,
        ..Default::default()
    };
    let image =
        open_user_image(name, a.format.as_deref(), a.image_opts, opts).map_err(Failure::msg)?;
    let fail = |what: &str, sn: &str, m: String| {
        Failure::msg(format!("Could not {what} snapshot '{sn}': {m}"))
    };
    match act {
        Action::List => {
            let snaps = image
                .snapshots()
                .map_err(|e| Failure::msg(engine_msg(&e)))?;
            if !snaps.is_empty() {
                print!("{}", snapshot_list("", &snaps, &local_date));
            }
        }
        Action::Create(sn) => image
            .snapshot_create(sn)
            .map_err(|e| fail("create", sn, create_error(&e)))?,
        Action::Apply(sn) => image.snapshot_apply(sn).map_err(|e| {
            let m = match e {
                Error::InvalidArgument(_) => "Failed to load snapshot: Invalid argument".into(),
                e => engine_msg(&e),
            };
            fail("apply", sn, m)
        })?,
        Action::Delete(sn) => image
            .snapshot_delete(sn)
            .map_err(|e| fail("delete", sn, engine_msg(&e)))?,
    }
    Ok(0)
}
