//! GRUB 2's `grub.cfg`, as far as finding its Linux entries needs: words with GRUB's
//! quoting and `$var`/`${var}` expansion, `set` and `name=value`, `search --set`, `menuentry`
//! and `submenu` blocks with their `linux` and `initrd` lines, and `set default`. Both
//! branches of an `if` are run and functions are skipped: the commands that matter in
//! generated configurations (`search`, `set root`) give the same result either way.

use std::collections::HashMap;

use super::entry::{file_path, Entry, Volume};

/// Most commands interpreted, and deepest block nesting, so a hostile file cannot make
/// the parser run long or deep.
const MAX_COMMANDS: usize = 100_000;
const MAX_DEPTH: usize = 32;
/// Most bytes variable expansion produces over a whole file (16 times the largest
/// configuration read): `set a=$a$a` doubles a value per line, and 30 such lines would
/// otherwise ask for gigabytes. Past it, variables expand to nothing.
const MAX_EXPANDED: usize = 16 << 20;

/// Split a script into commands (each a list of words) with GRUB's quoting: `'...'` is
/// literal, `"..."` expands variables, `\` escapes one character, `#` starts a comment at
/// the start of a word, and newlines and `;` end a command. `{` and `}` are words of their
/// own. Variables are expanded when a command runs, so words keep `$` markers: an
/// expandable `$` is stored as `\u{0}`.
fn tokenize(text: &str) -> Vec<Vec<String>> {
    let mut cmds = Vec::new();
    let mut cmd: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars().peekable();
    let end_word = |cmd: &mut Vec<String>, word: &mut String, in_word: &mut bool| {
        if *in_word {
            cmd.push(std::mem::take(word));
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    word.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(n) = chars.next() {
                                word.push(n);
                            }
                        }
                        '$' => word.push('\0'),
                        c => word.push(c),
                    }
                }
            }
            '\\' => {
                if let Some(n) = chars.next() {
                    if n != '\n' {
                        in_word = true;
                        word.push(n);
                    }
                }
            }
            '#' if !in_word => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
                end_word(&mut cmd, &mut word, &mut in_word);
                if !cmd.is_empty() {
                    cmds.push(std::mem::take(&mut cmd));
                }
            }
            '\n' | ';' => {
                end_word(&mut cmd, &mut word, &mut in_word);
                if !cmd.is_empty() {
                    cmds.push(std::mem::take(&mut cmd));
                }
            }
            '{' | '}' if !in_word => {
                cmd.push(c.to_string());
                if c == '{' {
                    cmds.push(std::mem::take(&mut cmd));
                }
            }
            c if c.is_whitespace() => end_word(&mut cmd, &mut word, &mut in_word),
            '$' => {
                in_word = true;
                word.push('\0');
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    end_word(&mut cmd, &mut word, &mut in_word);
    if !cmd.is_empty() {
        cmds.push(cmd);
    }
    // A `}` ends its own command, so that `linux ...}` on one line still closes the block.
    let mut out = Vec::new();
    for c in cmds {
        let mut cur = Vec::new();
        for w in c {
            if w == "}" {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                out.push(vec![w]);
            } else {
                cur.push(w);
            }
        }
        if !cur.is_empty() {
            out.push(cur);
        }
    }
    out
}

/// Expand `\0name` and `\0{name}` markers with `vars`, taking the values' bytes from
/// `budget` (what is left of [`MAX_EXPANDED`]); a value larger than what is left expands to
/// nothing.
fn expand(word: &str, vars: &HashMap<String, String>, budget: &mut usize) -> String {
    let mut out = String::new();
    let mut chars = word.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\0' {
            out.push(c);
            continue;
        }
        let mut name = String::new();
        if chars.peek() == Some(&'{') {
            chars.next();
            for c in chars.by_ref() {
                if c == '}' {
                    break;
                }
                name.push(c);
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' || (name.is_empty() && c.is_ascii_digit())
                {
                    name.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
        }
        if let Some(v) = vars.get(&name).filter(|v| v.len() <= *budget) {
            *budget -= v.len();
            out.push_str(v);
        }
    }
    out
}

/// An entry while it is being read.
#[derive(Default)]
struct Pending {
    title: String,
    id: Option<String>,
    /// Index among the top-level items (entries and submenus), and within a submenu.
    top: usize,
    sub: Option<usize>,
    linux: Option<(usize, String, String)>,
    initrds: Vec<(usize, String)>,
}

/// The Linux entries of `text` (a grub.cfg on volume `cfg_fs`), and the index of the
/// default one.
pub fn parse(text: &str, volumes: &[Volume], cfg_fs: usize) -> (Vec<Entry>, usize) {
    let cmds = tokenize(text);
    let mut vars: HashMap<String, String> = HashMap::new();
    let mut root = cfg_fs;
    // Block stack: what each open `{` was.
    #[derive(PartialEq)]
    enum Block {
        Entry,
        Submenu,
        Other,
    }
    let mut stack: Vec<Block> = Vec::new();
    let mut entries: Vec<Pending> = Vec::new();
    let mut current: Option<Pending> = None;
    let (mut top, mut sub) = (0usize, 0usize);
    let mut root_outside = root;
    let mut skip_depth: Option<usize> = None;
    let mut budget = MAX_EXPANDED;
    for raw in cmds.iter().take(MAX_COMMANDS) {
        if raw[0] == "}" {
            if skip_depth == Some(stack.len()) {
                skip_depth = None;
            }
            match stack.pop() {
                Some(Block::Entry) => {
                    if let Some(p) = current.take() {
                        entries.push(p);
                    }
                    root = root_outside;
                    if stack.last() == Some(&Block::Submenu) {
                        sub += 1;
                    } else {
                        top += 1;
                    }
                }
                Some(Block::Submenu) => top += 1,
                _ => {}
            }
            continue;
        }
        let opens = raw.last().is_some_and(|w| w == "{");
        if skip_depth.is_some() {
            if opens {
                stack.push(Block::Other);
            }
            continue;
        }
        let words: Vec<String> = raw
            .iter()
            .filter(|w| w.as_str() != "{")
            .map(|w| expand(w, &vars, &mut budget))
            .collect();
        // `then`/`else`/`do` introduce a command on the same line; conditions are not run.
        let words: &[String] = match words.first().map(String::as_str) {
            Some("then" | "else" | "do") => &words[1..],
            _ => &words,
        };
        if opens && stack.len() >= MAX_DEPTH {
            break;
        }
        let Some(cmd) = words.first() else {
            if opens {
                stack.push(Block::Other);
            }
            continue;
        };
        match cmd.as_str() {
            "menuentry" if opens && current.is_none() => {
                let title = words.get(1).cloned().unwrap_or_default();
                let id = words
                    .windows(2)
                    .find(|w| w[0] == "--id")
                    .map(|w| w[1].clone())
                    .or_else(|| {
                        // `$menuentry_id_option 'id'` expanded to `--id 'id'`; when the
                        // variable is empty, the id is the last word.
                        words.get(2..).and_then(|r| r.last()).cloned()
                    });
                let in_sub = stack.last() == Some(&Block::Submenu);
                current = Some(Pending {
                    title,
                    id,
                    top,
                    sub: in_sub.then_some(sub),
                    ..Default::default()
                });
                root_outside = root;
                stack.push(Block::Entry);
            }
            "submenu" if opens && current.is_none() && stack.is_empty() => {
                sub = 0;
                stack.push(Block::Submenu);
            }
            "function" if opens => {
                stack.push(Block::Other);
                skip_depth = Some(stack.len());
            }
            _ if opens => stack.push(Block::Other),
            "if" | "elif" | "fi" | "while" | "until" | "done" | "[" => {}
            "set" => {
                for w in &words[1..] {
                    if let Some((k, v)) = w.split_once('=') {
                        assign(&mut vars, &mut root, volumes, k, v);
                    }
                }
            }
            "search" | "search.fs_uuid" | "search.fs_label" | "search.file" => {
                search(words, volumes, &mut vars, &mut root);
            }
            "linux" | "linux16" | "linuxefi" => {
                if let (Some(p), Some(path)) = (current.as_mut(), words.get(1)) {
                    if let Some(f) = file_path(volumes, root, path) {
                        p.linux = Some((f.fs, f.path, words[2..].join(" ")));
                    }
                }
            }
            "initrd" | "initrd16" | "initrdefi" => {
                if let Some(p) = current.as_mut() {
                    p.initrds = words[1..]
                        .iter()
                        .filter_map(|w| file_path(volumes, root, w))
                        .map(|f| (f.fs, f.path))
                        .collect();
                }
            }
            w if w.contains('=') && !w.starts_with('=') => {
                let (k, v) = w.split_once('=').unwrap_or_default();
                assign(&mut vars, &mut root, volumes, k, v);
            }
            _ => {}
        }
    }
    let default = default_index(&entries, vars.get("default").map(String::as_str));
    let entries = entries
        .into_iter()
        .filter_map(|p| {
            let (fs, path, args) = p.linux?;
            Some(Entry {
                title: p.title,
                source: "grub.cfg".into(),
                kernel: super::entry::FilePath { fs, path },
                initrds: p
                    .initrds
                    .into_iter()
                    .map(|(fs, path)| super::entry::FilePath { fs, path })
                    .collect(),
                cmdline: args,
            })
        })
        .collect::<Vec<_>>();
    (entries, default)
}

fn assign(
    vars: &mut HashMap<String, String>,
    root: &mut usize,
    volumes: &[Volume],
    k: &str,
    v: &str,
) {
    if k == "root" {
        if let Some(i) = super::entry::grub_device(volumes, v) {
            *root = i;
        }
    }
    vars.insert(k.to_string(), v.to_string());
}

/// `search [--no-floppy] [--fs-uuid|-u] [--set[=VAR]|-s VAR] [--hint...] NAME`: VAR (root by
/// default) becomes the volume with that filesystem UUID.
fn search(
    words: &[String],
    volumes: &[Volume],
    vars: &mut HashMap<String, String>,
    root: &mut usize,
) {
    let mut var = "root".to_string();
    let mut by_uuid = words[0] == "search.fs_uuid";
    let mut names = Vec::new();
    let mut it = words[1..].iter();
    while let Some(w) = it.next() {
        match w.as_str() {
            "--fs-uuid" | "-u" => by_uuid = true,
            "--set" | "-s" => {
                if let Some(v) = it.clone().next().filter(|v| !v.starts_with('-')) {
                    // `--set root UUID` or `--set UUID`: a following UUID is the name.
                    if volumes.iter().all(|vol| !vol.uuid.eq_ignore_ascii_case(v)) {
                        var = v.clone();
                        it.next();
                    }
                }
            }
            w if w.starts_with("--set=") => var = w["--set=".len()..].to_string(),
            w if w.starts_with('-') => {}
            w => names.push(w.to_string()),
        }
    }
    if !by_uuid {
        return;
    }
    for n in names {
        if let Some(i) = volumes.iter().position(|v| v.uuid.eq_ignore_ascii_case(&n)) {
            let dev = match &volumes[i].grub_name {
                Some(g) => format!("hd0,{g}"),
                None => "hd0".into(),
            };
            if var == "root" {
                *root = i;
            }
            vars.insert(var.clone(), dev);
            return;
        }
    }
}

/// GRUB's `default`: a number, `N>M` into a submenu, a title or an id; otherwise 0.
fn default_index(entries: &[Pending], default: Option<&str>) -> usize {
    let usable: Vec<&Pending> = entries.iter().filter(|p| p.linux.is_some()).collect();
    let Some(d) = default.map(str::trim) else {
        return 0;
    };
    let first = d.split('>').next().unwrap_or("");
    let pos = if let Ok(n) = first.parse::<usize>() {
        let want_sub: Option<usize> = d.split('>').nth(1).and_then(|s| s.parse().ok());
        usable
            .iter()
            .position(|p| p.top == n && (want_sub.is_none() || p.sub == want_sub))
    } else {
        usable
            .iter()
            .position(|p| p.title == d || p.id.as_deref() == Some(d))
    };
    pos.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vols() -> Vec<Volume> {
        vec![
            Volume {
                uuid: "1111".into(),
                grub_name: Some("gpt1".into()),
                number: Some(1),
            },
            Volume {
                uuid: "2222-aa".into(),
                grub_name: Some("gpt2".into()),
                number: Some(2),
            },
        ]
    }

    /// Shaped like the grub.cfg of Debian's cloud images.
    const DEBIAN: &str = r#"
if [ -s $prefix/grubenv ]; then
  set have_grubenv=true
  load_env
fi
if [ "${next_entry}" ] ; then
   set default="${next_entry}"
   set next_entry=
   save_env next_entry
   set boot_once=true
else
   set default="0"
fi
if [ x"${feature_menuentry_id}" = xy ]; then
  menuentry_id_option="--id"
else
  menuentry_id_option=""
fi
function load_video {
  if [ x$feature_all_video_module = xy ]; then
    insmod all_video
  fi
}
set linux_gfx_mode=
export linux_gfx_mode
menuentry 'Debian GNU/Linux' --class debian --class gnu-linux $menuentry_id_option 'gnulinux-simple-2222-aa' {
	load_video
	insmod part_gpt
	insmod ext2
	set root='hd0,gpt1'
	if [ x$feature_platform_search_hint = xy ]; then
	  search --no-floppy --fs-uuid --set=root --hint-bios=hd0,gpt2 2222-aa
	else
	  search --no-floppy --fs-uuid --set=root 2222-aa
	fi
	echo	'Loading Linux 6.1.0-28-cloud-amd64 ...'
	linux	/boot/vmlinuz-6.1.0-28-cloud-amd64 root=PARTUUID=abc ro console=tty0 console=ttyS0,115200
	echo	'Loading initial ramdisk ...'
	initrd	/boot/initrd.img-6.1.0-28-cloud-amd64
}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-2222-aa' {
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-28-cloud-amd64' --class debian $menuentry_id_option 'gnulinux-6.1.0-28-advanced' {
		search --no-floppy --fs-uuid --set=root 2222-aa
		linux	/boot/vmlinuz-6.1.0-28-cloud-amd64 root=PARTUUID=abc ro
		initrd	/boot/initrd.img-6.1.0-28-cloud-amd64
	}
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-28-cloud-amd64 (recovery mode)' {
		set root=(hd0,gpt2)
		linux	/boot/vmlinuz-6.1.0-28-cloud-amd64 root=PARTUUID=abc ro single
		initrd	/boot/initrd.img-6.1.0-28-cloud-amd64
	}
}
"#;

    #[test]
    fn debian_cloud_config() {
        let (e, d) = parse(DEBIAN, &vols(), 0);
        assert_eq!(e.len(), 3, "{e:#?}");
        assert_eq!(d, 0);
        assert_eq!(e[0].title, "Debian GNU/Linux");
        assert_eq!(e[0].kernel.fs, 1, "search --fs-uuid set root");
        assert_eq!(e[0].kernel.path, "/boot/vmlinuz-6.1.0-28-cloud-amd64");
        assert_eq!(
            e[0].initrds[0].path,
            "/boot/initrd.img-6.1.0-28-cloud-amd64"
        );
        assert_eq!(
            e[0].cmdline,
            "root=PARTUUID=abc ro console=tty0 console=ttyS0,115200"
        );
        assert!(e[2].cmdline.ends_with("single"));
        let with = |d: &str| parse(&DEBIAN.replace("set default=\"0\"", d), &vols(), 0).1;
        assert_eq!(with("set default=\"1>1\""), 2);
        assert_eq!(with("set default=1"), 1);
        assert_eq!(with("set default=gnulinux-6.1.0-28-advanced"), 1);
        assert_eq!(with("set default='Debian GNU/Linux'"), 0);
        assert_eq!(with("set default=nonsense"), 0);
    }

    #[test]
    fn variables_quotes_and_devices() {
        let cfg = "set v=\"/boot\"; set k=vmlinuz\nmenuentry \"a b\" { linux ${v}/$k x=\"1 2\" 'y$z'\n initrd (hd0,gpt2)/i1 /i2 }\n";
        let (e, _) = parse(cfg, &vols(), 0);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].title, "a b");
        assert_eq!(e[0].kernel.path, "/boot/vmlinuz");
        assert_eq!(e[0].cmdline, "x=1 2 y$z");
        assert_eq!(
            e[0].initrds
                .iter()
                .map(|f| (f.fs, f.path.as_str()))
                .collect::<Vec<_>>(),
            [(1, "/i1"), (0, "/i2")]
        );
        // No linux line: not an entry. Unbalanced braces and deep nesting end cleanly.
        assert!(parse("menuentry x { echo hi }", &vols(), 0).0.is_empty());
        assert!(parse(&"if x; then {\n".repeat(10_000), &vols(), 0)
            .0
            .is_empty());
        assert!(parse("}}}} menuentry {", &vols(), 0).0.is_empty());
    }

    /// `set a=$a$a` doubles a value per line: 40 lines would ask for a TiB. Expansion stops
    /// at its budget, so the entry comes out with a bounded command line.
    #[test]
    fn doubling_variables_are_bounded() {
        let cfg = format!(
            "set a=xxxxxxxx\n{}menuentry t {{ linux /vmlinuz $a $a }}\n",
            "set a=$a$a\n".repeat(40)
        );
        let (e, _) = parse(&cfg, &vols(), 0);
        assert_eq!(e.len(), 1);
        assert!(e[0].cmdline.len() <= MAX_EXPANDED, "{}", e[0].cmdline.len());
    }
}
