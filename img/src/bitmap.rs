//! `img bitmap`: add, remove, clear, enable, disable and merge persistent dirty bitmaps,
//! like `qemu-img bitmap`. The operations apply in the order given.

use clap::{ArgAction, ArgMatches, Args, Command, FromArgMatches};
use common::open::OpenOptions;
use common::ops::BitmapOp;

use crate::errors::{engine_msg, CmdResult, Failure};
use crate::imgopen::open_user_image;
use crate::objects::{self, Objects};
use crate::size::cvtnum;

/// The options as clap sees them; [`BitmapArgs`] adds the order of the operations.
#[derive(Args, Debug, Default)]
pub struct BitmapOptions {
    /// Create BITMAP, enabled to record future edits
    #[arg(long = "add", action = ArgAction::Append, num_args = 0, default_missing_value = "true")]
    pub add: Vec<bool>,
    /// Remove BITMAP
    #[arg(long = "remove", action = ArgAction::Append, num_args = 0, default_missing_value = "true")]
    pub remove: Vec<bool>,
    /// Clear BITMAP
    #[arg(long = "clear", action = ArgAction::Append, num_args = 0, default_missing_value = "true")]
    pub clear: Vec<bool>,
    /// Start recording future edits to BITMAP
    #[arg(long = "enable", action = ArgAction::Append, num_args = 0, default_missing_value = "true")]
    pub enable: Vec<bool>,
    /// Stop recording future edits to BITMAP
    #[arg(long = "disable", action = ArgAction::Append, num_args = 0, default_missing_value = "true")]
    pub disable: Vec<bool>,
    /// Merge the contents of bitmap SOURCE into BITMAP
    #[arg(long = "merge", value_name = "SOURCE", action = ArgAction::Append, allow_hyphen_values = true)]
    pub merge: Vec<String>,
    /// Granularity of a bitmap --add creates
    #[arg(
        short = 'g',
        long = "granularity",
        value_name = "SIZE",
        allow_hyphen_values = true
    )]
    pub granularity: Option<String>,
    /// Image file holding the --merge source bitmap
    #[arg(
        short = 'b',
        long = "source-file",
        value_name = "SRC_FILENAME",
        allow_hyphen_values = true
    )]
    pub source_file: Option<String>,
    /// Format of the --merge source file
    #[arg(
        short = 'F',
        long = "source-format",
        value_name = "SRC_FMT",
        allow_hyphen_values = true
    )]
    pub source_format: Option<String>,
    /// Image format (probed when not given)
    #[arg(
        short = 'f',
        long = "format",
        value_name = "FMT",
        allow_hyphen_values = true
    )]
    pub format: Option<String>,
    /// FILE is an option string (driver=FMT,file.filename=PATH,...), not a file name
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Define an object (QEMU's --object: only `secret` is taken)
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
    /// FILENAME BITMAP
    #[arg(value_name = "FILENAME BITMAP")]
    pub args: Vec<String>,
}

/// What was asked for, in command-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Act {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Act {
    /// The word qemu-img uses in "Operation WORD on bitmap ... failed".
    fn word(&self) -> &'static str {
        match self {
            Act::Add => "add",
            Act::Remove => "remove",
            Act::Clear => "clear",
            Act::Enable => "enable",
            Act::Disable => "disable",
            Act::Merge(_) => "merge",
        }
    }
}

/// `img bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
/// [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [-f FMT] FILENAME BITMAP`
#[derive(Debug, Default)]
pub struct BitmapArgs {
    pub opts: BitmapOptions,
    acts: Vec<Act>,
}

impl FromArgMatches for BitmapArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let opts = BitmapOptions::from_arg_matches(m)?;
        let mut acts: Vec<(usize, Act)> = Vec::new();
        for (id, act) in [
            ("add", Act::Add),
            ("remove", Act::Remove),
            ("clear", Act::Clear),
            ("enable", Act::Enable),
            ("disable", Act::Disable),
        ] {
            if let Some(at) = m.indices_of(id) {
                acts.extend(at.map(|i| (i, act.clone())));
            }
        }
        if let Some(at) = m.indices_of("merge") {
            acts.extend(at.zip(&opts.merge).map(|(i, s)| (i, Act::Merge(s.clone()))));
        }
        acts.sort_by_key(|(i, _)| *i);
        Ok(BitmapArgs {
            opts,
            acts: acts.into_iter().map(|(_, a)| a).collect(),
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for BitmapArgs {
    fn augment_args(cmd: Command) -> Command {
        BitmapOptions::augment_args(cmd)
    }
    fn augment_args_for_update(cmd: Command) -> Command {
        BitmapOptions::augment_args_for_update(cmd)
    }
}

/// The name qemu-img gives the image's node in some messages: `#block` and a counter
/// with two random digits.
fn node_name() -> String {
    format!("#block1{:02}", std::process::id() % 100)
}

/// Run `img bitmap`.
pub fn run(a: &BitmapArgs) -> CmdResult {
    if objects::create(&a.opts.object)? == Objects::HelpShown {
        return Ok(0);
    }
    let o = &a.opts;
    // qemu-img parses the granularity with the options, before any other check.
    let granularity = match &o.granularity {
        Some(s) => cvtnum("granularity", s).map_err(Failure::msg)?,
        None => 0,
    };
    if a.acts.is_empty() {
        return Err(Failure::msg(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        ));
    }
    if granularity != 0 && !a.acts.contains(&Act::Add) {
        return Err(Failure::msg("granularity only supported with --add"));
    }
    if o.source_format.is_some() && o.source_file.is_none() {
        return Err(Failure::msg("-F only supported with -b"));
    }
    let merging = a.acts.iter().any(|x| matches!(x, Act::Merge(_)));
    if o.source_file.is_some() && !merging {
        return Err(Failure::msg(
            "Merge bitmap source file only supported with --merge",
        ));
    }
    let [file, bitmap] = o.args.as_slice() else {
        return Err(Failure::msg("Expecting filename and bitmap name"));
    };
    // Bitmaps live in the image itself: no backing chain is opened.
    let image = open_user_image(
        file,
        o.format.as_deref(),
        o.image_opts,
        OpenOptions {
            no_backing: true,
            ..Default::default()
        },
    )
    .map_err(Failure::msg)?;
    let source = match &o.source_file {
        Some(src) => Some(
            open_user_image(
                src,
                o.source_format.as_deref(),
                false,
                OpenOptions {
                    read_only: true,
                    no_backing: true,
                    ..Default::default()
                },
            )
            .map_err(Failure::msg)?,
        ),
        None => None,
    };
    // qemu-img hands the granularity over as 32 bits: 4G becomes 0 and is refused.
    let gran = (granularity != 0).then_some(granularity as u32);
    let ops: Vec<BitmapOp> = a
        .acts
        .iter()
        .map(|x| match x {
            Act::Add => BitmapOp::Add { granularity: gran },
            Act::Remove => BitmapOp::Remove,
            Act::Clear => BitmapOp::Clear,
            Act::Enable => BitmapOp::Enable,
            Act::Disable => BitmapOp::Disable,
            Act::Merge(s) => BitmapOp::Merge { source: s.clone() },
        })
        .collect();
    image
        .bitmap_edit(&node_name(), bitmap, &ops, source.as_ref())
        .map_err(|e| match e.op {
            Some(i) => Failure::msg(format!(
                "Operation {} on bitmap {bitmap} failed: {}",
                a.acts[i].word(),
                engine_msg(&e.error)
            )),
            // qemu-img fails to store its bitmaps when it closes the image, and once more
            // when it drops it.
            None => {
                let lost = engine_msg(&e.error);
                Failure::msg(format!(
                    "{lost}\nimg: Error while closing the image: Invalid argument\nimg: {lost}"
                ))
            }
        })?;
    Ok(0)
}
