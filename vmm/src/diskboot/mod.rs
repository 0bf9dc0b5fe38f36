//! Booting a disk without `--kernel`: look into the first disk through the engine (any
//! format and backing chain it reads) as the guest's bootloader would, and find the kernel,
//! initrd and command line of its boot entry.
//!
//! Partition tables (`partitions`), ext2/3/4 and FAT filesystems (`fs`, `fat`: an EFI system
//! partition with systemd-boot's entries and kernels), and the configurations, in
//! the order tried on each filesystem: Boot Loader Specification entries (`bls`), GRUB 2's
//! grub.cfg (`grub`), extlinux/syslinux and GRUB legacy's menu.lst (`syslinux`); last, a
//! `/vmlinuz` (+ `/initrd.img`) with `root=UUID=` of its filesystem.

mod bls;
pub mod entry;
mod fat;
mod fs;
mod grub;
pub mod partitions;
mod readahead;
mod syslinux;

use std::sync::Arc;

use common::BlockDriver;

use crate::boot::file::MAX_KERNEL_FILE;
pub use entry::Entry;
use entry::{FilePath, Volume};
use fs::Fs;

const BLS_DIRS: &[&str] = &["/loader/entries", "/boot/loader/entries"];
const GRUB_CFGS: &[&str] = &[
    "/boot/grub/grub.cfg",
    "/grub/grub.cfg",
    "/boot/grub2/grub.cfg",
    "/grub2/grub.cfg",
];
const SYSLINUX_CFGS: &[&str] = &[
    "/boot/extlinux/extlinux.conf",
    "/extlinux/extlinux.conf",
    "/boot/syslinux/syslinux.cfg",
    "/syslinux/syslinux.cfg",
    "/extlinux.conf",
    "/syslinux.cfg",
];
const MENU_LSTS: &[&str] = &["/boot/grub/menu.lst", "/grub/menu.lst"];
/// Largest configuration file read (grub.cfg of a system with many kernels is ~20 KiB).
const MAX_CONFIG: u64 = 1 << 20;
/// Most BLS entry files read.
const MAX_BLS_ENTRIES: usize = 256;

/// The boot entries of a disk, and its filesystems to load them from.
pub struct DiskBoot {
    pub entries: Vec<Entry>,
    pub default: usize,
    fss: Vec<Fs>,
}

/// A boot entry's files, read from the disk.
pub struct Loaded {
    pub kernel: Vec<u8>,
    /// The initrds, concatenated (each padded to 4 bytes, as GRUB places them).
    pub initrd: Option<Vec<u8>>,
    pub cmdline: String,
    /// What messages call the kernel and initrds: `partition 1:/boot/vmlinuz-...`.
    pub kernel_name: String,
    pub initrd_name: String,
}

/// What [`DiskBoot::search`] found on a disk.
pub enum Search {
    Found(DiskBoot),
    /// Every filesystem read cleanly (or there is none) and none has a Linux boot entry:
    /// why, in words.
    NoEntry(String),
}

impl DiskBoot {
    /// Look for boot entries on `disk`. An error is one line: a damaged partition table,
    /// a filesystem that cannot be read, or no Linux boot entry at all.
    pub fn find(disk: Arc<dyn BlockDriver>) -> Result<DiskBoot, String> {
        match Self::search(disk)? {
            Search::Found(d) => Ok(d),
            Search::NoEntry(why) => Err(format!("no Linux boot entry found ({why})")),
        }
    }

    /// Like [`DiskBoot::find`], but a disk whose filesystems all read cleanly and hold no
    /// entry is not an error (the caller may boot it another way).
    pub fn search(disk: Arc<dyn BlockDriver>) -> Result<Search, String> {
        // A FAT boot sector has the MBR's signature too: a bare FAT volume is no table.
        let parts = if fat::is_fat(&*disk, 0, disk.size()) {
            None
        } else {
            partitions::read_partitions(&*disk).map_err(|e| e.to_string())?
        };
        let places: Vec<Option<partitions::Partition>> = match parts {
            Some(p) => p.into_iter().map(Some).collect(),
            None => vec![None],
        };
        let mut fss = Vec::new();
        let mut errors = Vec::new();
        for p in places {
            match Fs::open(disk.clone(), p) {
                Ok(Some(f)) => fss.push(f),
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        let volumes: Vec<Volume> = fss
            .iter()
            .map(|f| Volume {
                uuid: f.uuid(),
                grub_name: f.part.as_ref().map(|p| p.grub_name.clone()),
                number: f.part.as_ref().map(|p| p.number),
            })
            .collect();
        for (i, f) in fss.iter().enumerate() {
            if let Some((entries, default)) = configured(f, i, &volumes) {
                return Ok(Search::Found(DiskBoot {
                    entries,
                    default,
                    fss,
                }));
            }
        }
        for (i, f) in fss.iter().enumerate() {
            if let Some(e) = fallback(f, i) {
                return Ok(Search::Found(DiskBoot {
                    entries: vec![e],
                    default: 0,
                    fss,
                }));
            }
        }
        if !errors.is_empty() {
            return Err(format!("no Linux boot entry found ({})", errors.join("; ")));
        }
        Ok(Search::NoEntry(if fss.is_empty() {
            "no ext2/3/4 or FAT filesystem on it".into()
        } else {
            "no boot configuration and no /vmlinuz".into()
        }))
    }

    /// The entry `--boot-entry` names: its number in the list, or its title.
    pub fn select(&self, which: Option<&str>) -> Result<usize, String> {
        let Some(w) = which else {
            return Ok(self.default);
        };
        if let Ok(n) = w.parse::<usize>() {
            if n < self.entries.len() {
                return Ok(n);
            }
        }
        self.entries
            .iter()
            .position(|e| e.title == w)
            .ok_or_else(|| {
                format!(
                    "no boot entry '{w}' (the disk has {}: see --list-boot-entries)",
                    self.entries.len()
                )
            })
    }

    /// The list `--list-boot-entries` prints: number (`*` for the default), title, where
    /// it was found, then its kernel, initrds and command line.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for (i, e) in self.entries.iter().enumerate() {
            let mark = if i == self.default { '*' } else { ' ' };
            s.push_str(&format!(
                "{i}{mark} {} ({}, {})\n    kernel {}\n",
                e.title,
                e.source,
                self.fss[e.kernel.fs].describe(),
                self.name(&e.kernel)
            ));
            for r in &e.initrds {
                s.push_str(&format!("    initrd {}\n", self.name(r)));
            }
            s.push_str(&format!("    cmdline {}\n", e.cmdline));
        }
        s
    }

    fn name(&self, f: &FilePath) -> String {
        format!("{}:{}", self.fss[f.fs].describe(), f.path)
    }

    /// Read entry `i`'s kernel and initrds; the initrds together may take at most
    /// `max_initrd` bytes (what guest memory can hold).
    pub fn load(&self, i: usize, max_initrd: u64) -> Result<Loaded, String> {
        let e = &self.entries[i];
        let kernel = self.fss[e.kernel.fs].read(&e.kernel.path, MAX_KERNEL_FILE)?;
        let mut initrd: Option<Vec<u8>> = None;
        for r in &e.initrds {
            let buf = initrd.get_or_insert_with(Vec::new);
            buf.resize(buf.len().next_multiple_of(4), 0);
            let left = max_initrd.saturating_sub(buf.len() as u64);
            buf.extend(self.fss[r.fs].read(&r.path, left)?);
        }
        Ok(Loaded {
            kernel,
            initrd,
            cmdline: entry::with_serial_console(&e.cmdline),
            kernel_name: self.name(&e.kernel),
            initrd_name: e
                .initrds
                .iter()
                .map(|r| self.name(r))
                .collect::<Vec<_>>()
                .join(" + "),
        })
    }
}

/// The entries of the first boot configuration on `f` (volume `i`) that has any.
fn configured(f: &Fs, i: usize, volumes: &[Volume]) -> Option<(Vec<Entry>, usize)> {
    let read = |p: &str| {
        f.read(p, MAX_CONFIG)
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    for dir in BLS_DIRS {
        let list: Vec<bls::BlsEntry> = f
            .list(dir)
            .into_iter()
            .filter(|n| n.ends_with(".conf"))
            .take(MAX_BLS_ENTRIES)
            .filter_map(|n| Some(bls::parse(&n, &read(&format!("{dir}/{n}"))?)))
            .collect();
        let e = bls::entries(list, i, &|p: &str| f.exists(p));
        if !e.is_empty() {
            return Some((e, 0));
        }
    }
    let found = |(e, d): (Vec<Entry>, usize)| (!e.is_empty()).then_some((e, d));
    for p in GRUB_CFGS {
        if let Some(r) = read(p).and_then(|t| found(grub::parse(&t, volumes, i))) {
            return Some(r);
        }
    }
    for p in SYSLINUX_CFGS {
        let dir = &p[..p.rfind('/').unwrap_or(0).max(1)];
        if let Some(r) = read(p).and_then(|t| found(syslinux::parse_syslinux(&t, i, dir))) {
            return Some(r);
        }
    }
    for p in MENU_LSTS {
        if let Some(r) = read(p).and_then(|t| found(syslinux::parse_menu_lst(&t, volumes, i))) {
            return Some(r);
        }
    }
    None
}

/// `/vmlinuz` (Debian's symlink; `/boot/vmlinuz` too) with `/initrd.img` beside it, and
/// the filesystem's UUID as root.
fn fallback(f: &Fs, i: usize) -> Option<Entry> {
    for dir in ["", "/boot"] {
        let kernel = format!("{dir}/vmlinuz");
        if !f.exists(&kernel) {
            continue;
        }
        let initrd = format!("{dir}/initrd.img");
        return Some(Entry {
            title: kernel.clone(),
            source: "/vmlinuz".into(),
            kernel: FilePath {
                fs: i,
                path: kernel,
            },
            initrds: f
                .exists(&initrd)
                .then_some(FilePath {
                    fs: i,
                    path: initrd,
                })
                .into_iter()
                .collect(),
            cmdline: format!("root=UUID={} ro", f.uuid()),
        });
    }
    None
}

#[cfg(test)]
mod tests;
