//! Boot Loader Specification type #1 entries (`/loader/entries/*.conf`): `title`,
//! `version`, `linux`, `initrd` (repeatable) and `options` (repeatable, joined), newest
//! version first as systemd-boot sorts them.

use std::cmp::Ordering;

use super::entry::{Entry, FilePath};

/// One entry file, before its paths are resolved.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BlsEntry {
    pub file: String,
    pub title: String,
    pub version: String,
    pub linux: Option<String>,
    pub initrds: Vec<String>,
    pub options: Vec<String>,
}

/// Parse entry file `file` (its name, for sorting and a default title).
pub fn parse(file: &str, text: &str) -> BlsEntry {
    let mut e = BlsEntry {
        file: file.to_string(),
        ..Default::default()
    };
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once(char::is_whitespace)
            .map_or((line, ""), |(k, v)| (k, v.trim()));
        match k {
            "title" => e.title = v.to_string(),
            "version" => e.version = v.to_string(),
            "linux" => e.linux = Some(v.to_string()),
            "initrd" => e.initrds.extend(v.split_whitespace().map(String::from)),
            "options" => e.options.push(v.to_string()),
            _ => {}
        }
    }
    if e.title.is_empty() {
        e.title = file.trim_end_matches(".conf").to_string();
    }
    e
}

/// Compare versions as systemd-boot does, roughly: runs of digits by value, the rest by
/// bytes.
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let o = na.len().cmp(&nb.len()).then(na.cmp(nb));
                if o != Ordering::Equal {
                    return o;
                }
                (a, b) = (&a[da..], &b[db..]);
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                (a, b) = (&a[1..], &b[1..]);
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let n = d.iter().take_while(|&&c| c == b'0').count();
    &d[n..]
}

/// Entries newest first; those without `linux` (an EFI binary, say) are left out. `exists`
/// tells whether a path is on `fs`: a path that is not is tried under `/boot` (entries of a
/// root filesystem that holds /boot).
pub fn entries(mut list: Vec<BlsEntry>, fs: usize, exists: &dyn Fn(&str) -> bool) -> Vec<Entry> {
    list.sort_by(|x, y| {
        version_cmp(&y.version, &x.version).then_with(|| version_cmp(&y.file, &x.file))
    });
    let resolve = |p: &str| {
        let p = if p.starts_with('/') {
            p.to_string()
        } else {
            format!("/{p}")
        };
        let path = if !exists(&p) && exists(&format!("/boot{p}")) {
            format!("/boot{p}")
        } else {
            p
        };
        FilePath { fs, path }
    };
    list.into_iter()
        .filter_map(|e| {
            Some(Entry {
                kernel: resolve(e.linux.as_deref()?),
                initrds: e.initrds.iter().map(|p| resolve(p)).collect(),
                cmdline: e.options.join(" "),
                title: e.title,
                source: "BLS".into(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_newest_first() {
        let a = parse(
            "a-6.1.0.conf",
            "title Linux 6.1\nversion 6.1.0\nlinux /vmlinuz-6.1\ninitrd /initrd-6.1\n\
             initrd /ucode.img\noptions root=UUID=x ro\noptions quiet\n",
        );
        assert_eq!(a.initrds, ["/initrd-6.1", "/ucode.img"]);
        let b = parse(
            "b.conf",
            "version 6.10.2\nlinux vmlinuz-6.10\n# linux nope\n",
        );
        assert_eq!(b.title, "b");
        let c = parse("c.conf", "title EFI\nefi /x.efi\n");
        let exists = |p: &str| p == "/boot/vmlinuz-6.10";
        let e = entries(vec![a, b, c], 3, &exists);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].kernel.path, "/boot/vmlinuz-6.10");
        assert_eq!(e[1].kernel.path, "/vmlinuz-6.1");
        assert_eq!(e[1].cmdline, "root=UUID=x ro quiet");
        assert_eq!(e[1].kernel.fs, 3);
        assert_eq!(version_cmp("6.10.0", "6.9.9"), Ordering::Greater);
        assert_eq!(version_cmp("6.01", "6.1"), Ordering::Equal);
    }
}
