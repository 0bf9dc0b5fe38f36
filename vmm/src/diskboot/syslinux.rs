//! `extlinux.conf`/`syslinux.cfg` (`DEFAULT`, `LABEL`, `MENU LABEL`, `MENU DEFAULT`,
//! `KERNEL`/`LINUX`, `INITRD`, `APPEND` with its `initrd=`) and GRUB legacy's `menu.lst`
//! (`default`, `title`, `root (hd0,N)`, `kernel`, `initrd`).

use super::entry::{file_path, Entry, FilePath, Volume};

/// A path in a syslinux configuration: absolute from the filesystem root, else relative to
/// the configuration's directory.
fn syslinux_path(fs: usize, dir: &str, p: &str) -> FilePath {
    let path = if p.starts_with('/') {
        p.to_string()
    } else {
        format!("{}/{p}", dir.trim_end_matches('/'))
    };
    FilePath { fs, path }
}

/// A `LABEL` block being read.
struct Label {
    name: String,
    title: Option<String>,
    entry: Option<Entry>,
}

/// The Linux entries of a syslinux configuration at `dir` on volume `fs`, and the default.
pub fn parse_syslinux(text: &str, fs: usize, dir: &str) -> (Vec<Entry>, usize) {
    let mut entries: Vec<Entry> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let mut default_label = None;
    let mut menu_default = None;
    let mut cur: Option<Label> = None;
    let finish = |cur: &mut Option<Label>, entries: &mut Vec<Entry>, names: &mut Vec<String>| {
        if let Some(Label {
            name,
            title,
            entry: Some(mut e),
        }) = cur.take()
        {
            e.title = title.unwrap_or_else(|| name.clone());
            names.push(name);
            entries.push(e);
        }
    };
    for line in text.lines() {
        let line = line.trim();
        let (k, v) = line
            .split_once(char::is_whitespace)
            .map_or((line, ""), |(k, v)| (k, v.trim()));
        let k = k.to_ascii_lowercase();
        if k == "default" {
            default_label = Some(v.to_string());
            continue;
        }
        if k == "label" {
            finish(&mut cur, &mut entries, &mut names);
            cur = Some(Label {
                name: v.to_string(),
                title: None,
                entry: None,
            });
            continue;
        }
        let Some(l) = cur.as_mut() else { continue };
        match k.as_str() {
            "menu" => {
                let (mk, mv) = v.split_once(char::is_whitespace).unwrap_or((v, ""));
                match mk.to_ascii_lowercase().as_str() {
                    "label" => l.title = Some(mv.trim().to_string()),
                    "default" => menu_default = Some(entries.len()),
                    _ => {}
                }
            }
            "kernel" | "linux" => {
                l.entry = Some(Entry {
                    title: String::new(),
                    source: "extlinux.conf".into(),
                    kernel: syslinux_path(fs, dir, v),
                    initrds: vec![],
                    cmdline: String::new(),
                })
            }
            "initrd" => {
                if let Some(e) = l.entry.as_mut() {
                    e.initrds = v
                        .split(',')
                        .map(|p| syslinux_path(fs, dir, p.trim()))
                        .collect();
                }
            }
            "append" => {
                if let Some(e) = l.entry.as_mut() {
                    let mut args = Vec::new();
                    for w in v.split_whitespace() {
                        match w.strip_prefix("initrd=") {
                            Some(list) => e
                                .initrds
                                .extend(list.split(',').map(|p| syslinux_path(fs, dir, p))),
                            None => args.push(w),
                        }
                    }
                    e.cmdline = args.join(" ");
                }
            }
            _ => {}
        }
    }
    finish(&mut cur, &mut entries, &mut names);
    let by_label = default_label.and_then(|d| names.iter().position(|n| *n == d));
    let default = menu_default
        .or(by_label)
        .unwrap_or(0)
        .min(entries.len().saturating_sub(1));
    (entries, default)
}

/// The entries of a GRUB legacy `menu.lst` on volume `fs`, and the default.
pub fn parse_menu_lst(text: &str, volumes: &[Volume], fs: usize) -> (Vec<Entry>, usize) {
    let mut entries: Vec<Entry> = Vec::new();
    let mut default = 0;
    let mut title: Option<String> = None;
    let mut root = fs;
    for line in text.lines() {
        let line = line.trim();
        let (k, v) = line
            .split_once(|c: char| c.is_whitespace() || c == '=')
            .map_or((line, ""), |(k, v)| (k, v.trim()));
        match k {
            "default" => default = v.parse().unwrap_or(0),
            "title" => {
                title = Some(v.to_string());
                root = fs;
            }
            "root" => {
                // GRUB legacy counts partitions from 0: (hd0,0) is the first.
                let dev = v.trim_start_matches('(').trim_end_matches(')');
                if let Some((_, n)) = dev.split_once(',') {
                    if let Ok(n) = n.parse::<u32>() {
                        let dev = format!("hd0,{}", n.saturating_add(1));
                        if let Some(i) = super::entry::grub_device(volumes, &dev) {
                            root = i;
                        }
                    }
                }
            }
            "kernel" => {
                let mut w = v.split_whitespace();
                let path = w.next().and_then(|p| file_path(volumes, root, p));
                if let (Some(t), Some(kernel)) = (title.take(), path) {
                    entries.push(Entry {
                        title: t,
                        source: "menu.lst".into(),
                        kernel,
                        initrds: vec![],
                        cmdline: w.collect::<Vec<_>>().join(" "),
                    });
                }
            }
            "initrd" => {
                if let (Some(e), Some(p)) = (entries.last_mut(), v.split_whitespace().next()) {
                    e.initrds = file_path(volumes, root, p).into_iter().collect();
                }
            }
            _ => {}
        }
    }
    let default = default.min(entries.len().saturating_sub(1));
    (entries, default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extlinux() {
        let cfg = "DEFAULT rescue\nTIMEOUT 1\nLABEL linux\n  MENU LABEL Debian\n  LINUX /boot/vmlinuz\n  INITRD /boot/initrd.img\n  APPEND root=/dev/vda1 ro\nlabel rescue\n kernel vmlinuz-r\n append initrd=initrd-r,extra.img single\n";
        let (e, d) = parse_syslinux(cfg, 0, "/boot/extlinux");
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(d, 1);
        assert_eq!(e[0].title, "Debian");
        assert_eq!(e[0].cmdline, "root=/dev/vda1 ro");
        assert_eq!(e[1].kernel.path, "/boot/extlinux/vmlinuz-r");
        assert_eq!(e[1].initrds.len(), 2);
        assert_eq!(e[1].cmdline, "single");
        let (_, d) = parse_syslinux(
            &cfg.replace("  MENU LABEL Debian", "  MENU DEFAULT"),
            0,
            "/",
        );
        assert_eq!(d, 0);
        assert_eq!(
            parse_syslinux("garbage\nLABEL\nAPPEND x", 0, "/").0.len(),
            0
        );
    }

    #[test]
    fn menu_lst() {
        let v = [
            Volume {
                uuid: "u".into(),
                grub_name: Some("msdos1".into()),
                number: Some(1),
            },
            Volume {
                uuid: "w".into(),
                grub_name: Some("msdos2".into()),
                number: Some(2),
            },
        ];
        let cfg = "default 1\ntimeout 0\ntitle A\nroot (hd0,0)\nkernel /vmlinuz-a root=/dev/vda1\ninitrd /initrd-a\ntitle B\nroot (hd0,1)\nkernel /boot/vmlinuz-b ro\n";
        let (e, d) = parse_menu_lst(cfg, &v, 0);
        assert_eq!((e.len(), d), (2, 1));
        assert_eq!((e[0].kernel.fs, e[1].kernel.fs), (0, 1));
        assert_eq!(e[0].initrds[0].path, "/initrd-a");
        assert_eq!(e[1].cmdline, "ro");
    }
}
