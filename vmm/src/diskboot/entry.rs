//! A Linux boot entry found on a disk, and what the parsers of boot configurations know
//! about the disk's filesystems to resolve paths in them.

/// A file on one of the disk's filesystems (an index into [`Volume`]s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePath {
    pub fs: usize,
    pub path: String,
}

/// One bootable Linux entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub title: String,
    /// The configuration it comes from ("BLS", "grub.cfg", "extlinux.conf", "menu.lst",
    /// "/vmlinuz").
    pub source: String,
    pub kernel: FilePath,
    /// Loaded one after the other (cpio archives concatenate).
    pub initrds: Vec<FilePath>,
    pub cmdline: String,
}

/// A filesystem as boot configurations name it.
#[derive(Debug, Clone, Default)]
pub struct Volume {
    /// The filesystem UUID (`search --fs-uuid`, `root=UUID=`).
    pub uuid: String,
    /// GRUB's partition name (`gpt2`, `msdos1`), None for an unpartitioned disk.
    pub grub_name: Option<String>,
    /// The partition's number (sda1 = 1).
    pub number: Option<u32>,
}

/// Resolve GRUB's device syntax (`hd0,gpt2`, `(hd0,msdos1)`, `hd0,1`) to a volume index.
pub fn grub_device(volumes: &[Volume], dev: &str) -> Option<usize> {
    let dev = dev.trim_start_matches('(').trim_end_matches(')');
    let (disk, part) = dev.split_once(',').unwrap_or((dev, ""));
    if disk != "hd0" {
        return None;
    }
    if part.is_empty() {
        return volumes.iter().position(|v| v.grub_name.is_none());
    }
    let number: u32 = part
        .trim_start_matches(|c: char| c.is_ascii_alphabetic())
        .parse()
        .ok()?;
    volumes.iter().position(|v| v.number == Some(number))
}

/// A path as a configuration gives it, possibly with a `(device)` prefix, on `default_fs`.
pub fn file_path(volumes: &[Volume], default_fs: usize, path: &str) -> Option<FilePath> {
    if let Some(rest) = path.strip_prefix('(') {
        let (dev, p) = rest.split_once(')')?;
        let fs = grub_device(volumes, dev)?;
        return Some(FilePath {
            fs,
            path: absolute(p),
        });
    }
    Some(FilePath {
        fs: default_fs,
        path: absolute(path),
    })
}

fn absolute(p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else {
        format!("/{p}")
    }
}

/// `cmdline` with `console=ttyS0` added when it names no serial console, so that the
/// guest's console reaches vmm's stdout.
pub fn with_serial_console(cmdline: &str) -> String {
    let serial = cmdline
        .split_whitespace()
        .any(|w| w.starts_with("console=ttyS") || w.starts_with("console=uart"));
    if serial {
        cmdline.to_string()
    } else if cmdline.trim().is_empty() {
        "console=ttyS0".into()
    } else {
        format!("{} console=ttyS0", cmdline.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_consoles() {
        let v = [
            Volume {
                uuid: "a".into(),
                grub_name: Some("gpt1".into()),
                number: Some(1),
            },
            Volume {
                uuid: "b".into(),
                grub_name: Some("gpt2".into()),
                number: Some(2),
            },
        ];
        assert_eq!(grub_device(&v, "hd0,gpt2"), Some(1));
        assert_eq!(grub_device(&v, "(hd0,msdos1)"), Some(0));
        assert_eq!(grub_device(&v, "hd0,1"), Some(0));
        assert_eq!(grub_device(&v, "hd1,1"), None);
        assert_eq!(
            file_path(&v, 0, "(hd0,gpt2)/boot/k"),
            Some(FilePath {
                fs: 1,
                path: "/boot/k".into()
            })
        );
        assert_eq!(file_path(&v, 1, "k").unwrap().path, "/k");
        assert_eq!(with_serial_console("ro quiet"), "ro quiet console=ttyS0");
        assert_eq!(with_serial_console(""), "console=ttyS0");
        assert_eq!(
            with_serial_console("console=tty0 console=ttyS0,115200"),
            "console=tty0 console=ttyS0,115200"
        );
    }
}
