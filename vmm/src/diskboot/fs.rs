//! The filesystems of a guest disk, read-only through the engine: ext2/3/4 with the
//! `ext4-view` crate (journal replayed in memory, checksums verified), FAT (an EFI system
//! partition) with [`super::fat`]. File sizes come from the disk, so every read is bounded
//! by the caller's limit before anything is allocated.

use std::sync::Arc;

use common::BlockDriver;
use ext4_view::{Ext4, Ext4Read};

use super::fat::Fat;
use super::partitions::Partition;
use super::readahead::ReadAhead;

/// ext2/3/4 superblock magic, at byte 56 of the superblock (which starts at byte 1024).
const EXT_MAGIC: u16 = 0xef53;

/// Most block groups a filesystem may have (a 128 TiB filesystem of 4 KiB blocks): ext4-view
/// sizes its descriptor list from the superblock before reading any descriptor.
const MAX_BLOCK_GROUPS: u64 = 1 << 20;

/// The superblock's geometry checked against the partition before ext4-view sizes anything
/// from it, as the Linux kernel checks it on mount: the block count within the partition,
/// and at most [`MAX_BLOCK_GROUPS`] groups of at most 8 blocks per byte of a block.
fn check_geometry(disk: &dyn BlockDriver, start: u64, len: u64) -> Result<(), String> {
    let mut sb = [0u8; 1024];
    disk.read_at(&mut sb, start + 1024)
        .map_err(|e| format!("cannot read the superblock: {e}"))?;
    let u32_at = |o: usize| u64::from(u32::from_le_bytes(sb[o..o + 4].try_into().unwrap()));
    let log_block = u32_at(0x18);
    if log_block > 6 {
        return Err(format!(
            "ext2/3/4 block size 2^{} is invalid",
            log_block + 10
        ));
    }
    let block = 1024u64 << log_block;
    // ext4-view reads the high half of the count whatever the 64bit feature says.
    let blocks = (u32_at(0x150) << 32) | u32_at(0x4);
    if blocks > len / block {
        return Err(format!(
            "ext2/3/4 block count {blocks} exceeds the partition ({} blocks)",
            len / block
        ));
    }
    let per_group = u32_at(0x20);
    if per_group == 0 || per_group > 8 * block {
        return Err(format!("ext2/3/4 blocks per group {per_group} is invalid"));
    }
    let groups = blocks.saturating_sub(u32_at(0x14)).div_ceil(per_group);
    if groups > MAX_BLOCK_GROUPS {
        return Err(format!("ext2/3/4 block group count {groups} is too large"));
    }
    Ok(())
}

/// A byte range of the disk (a partition) as ext4-view reads it, with read-ahead.
struct PartReader {
    disk: ReadAhead,
    len: u64,
}

impl Ext4Read for PartReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        if start_byte
            .checked_add(dst.len() as u64)
            .is_none_or(|end| end > self.len)
        {
            return Err("read past the end of the partition".into());
        }
        self.disk.read(dst, start_byte)?;
        Ok(())
    }
}

/// Longest symlink target followed (Linux's PATH_MAX); ext4-view reads a target whole,
/// sized by what the inode says.
const MAX_SYMLINK: u64 = 4096;
/// Most symlinks followed in one path, as Linux does.
const MAX_SYMLINKS: usize = 40;

/// One mounted (read-only) filesystem, and the partition it is on (None: the whole disk).
pub struct Fs {
    pub part: Option<Partition>,
    /// Its size in bytes: no file holds more data than that.
    len: u64,
    kind: Kind,
}

enum Kind {
    Ext4(Box<Ext4>),
    Fat(Box<Fat>),
}

/// Whether the byte range holds an ext2/3/4 superblock.
fn is_ext(disk: &dyn BlockDriver, start: u64, len: u64) -> bool {
    let mut m = [0u8; 2];
    len >= 2048
        && disk.read_at(&mut m, start + 1024 + 56).is_ok()
        && u16::from_le_bytes(m) == EXT_MAGIC
}

impl Fs {
    /// Mount the filesystem at `part` (None: the whole disk): Ok(None) when it is neither
    /// ext2/3/4 nor FAT.
    pub fn open(disk: Arc<dyn BlockDriver>, part: Option<Partition>) -> Result<Option<Fs>, String> {
        let (start, len) = part.as_ref().map_or((0, disk.size()), |p| (p.start, p.len));
        if super::fat::is_fat(&*disk, start, len) {
            let fat = Fat::open(disk, start, len).map_err(|e| format!("{}: {e}", where_(&part)))?;
            return Ok(Some(Fs {
                part,
                len,
                kind: Kind::Fat(Box::new(fat)),
            }));
        }
        if !is_ext(&*disk, start, len) {
            return Ok(None);
        }
        check_geometry(&*disk, start, len).map_err(|e| format!("{}: {e}", where_(&part)))?;
        let reader = PartReader {
            disk: ReadAhead::new(disk, start, len),
            len,
        };
        let ext4 = Ext4::load(Box::new(reader)).map_err(|e| format!("{}: {e}", where_(&part)))?;
        Ok(Some(Fs {
            part,
            len,
            kind: Kind::Ext4(Box::new(ext4)),
        }))
    }

    /// Where this filesystem is, for messages.
    pub fn describe(&self) -> String {
        where_(&self.part)
    }

    /// The filesystem UUID, as `root=UUID=` and GRUB's `search --fs-uuid` name it.
    pub fn uuid(&self) -> String {
        match &self.kind {
            Kind::Ext4(e) => e.uuid().to_string(),
            Kind::Fat(f) => f.uuid(),
        }
    }

    /// Whether `path` (absolute) exists, following symlinks.
    pub fn exists(&self, path: &str) -> bool {
        match &self.kind {
            Kind::Ext4(e) => resolve(e, path).is_ok_and(|p| e.exists(p.as_str()).unwrap_or(false)),
            Kind::Fat(f) => f.exists(path),
        }
    }

    /// Names in directory `dir` (empty when it is missing or unreadable).
    pub fn list(&self, dir: &str) -> Vec<String> {
        let ext4 = match &self.kind {
            Kind::Ext4(e) => e,
            Kind::Fat(f) => {
                let mut names = f.list(dir);
                names.sort();
                return names;
            }
        };
        let Ok(rd) =
            resolve(ext4, dir).and_then(|d| ext4.read_dir(d.as_str()).map_err(|e| e.to_string()))
        else {
            return vec![];
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().as_str().ok().map(str::to_string))
            .filter(|n| n != "." && n != "..")
            .collect();
        names.sort();
        names
    }

    /// The contents of the regular file `path`, refused when larger than `max` bytes or
    /// than its filesystem (before anything is allocated).
    pub fn read(&self, path: &str, max: u64) -> Result<Vec<u8>, String> {
        let max = max.min(self.len);
        let ext4 = match &self.kind {
            Kind::Ext4(e) => e,
            Kind::Fat(f) => {
                return f
                    .read(path, max)
                    .map_err(|e| format!("{}{e}", self.prefix()))
            }
        };
        let err = |e: ext4_view::Ext4Error| format!("{}{path}: {e}", self.prefix());
        let real = resolve(ext4, path).map_err(|e| format!("{}{path}: {e}", self.prefix()))?;
        let mut f = ext4.open(real.as_str()).map_err(err)?;
        let len = f.metadata().len();
        if len > max {
            return Err(format!(
                "{}{path} is {} bytes, more than the {max} vmm reads from this filesystem",
                self.prefix(),
                len
            ));
        }
        let mut out = vec![0u8; len as usize];
        let mut done = 0;
        while done < out.len() {
            match f.read_bytes(&mut out[done..]).map_err(err)? {
                0 => return Err(format!("{}{path}: short read", self.prefix())),
                n => done += n,
            }
        }
        Ok(out)
    }

    fn prefix(&self) -> String {
        format!("{}:", self.describe())
    }
}

/// `path` with its symlinks replaced by their targets, component by component as the kernel
/// resolves it, so that ext4-view never follows a link itself: it would read a target of
/// any size the inode claims into memory. The result names no symlink.
fn resolve(ext4: &Ext4, path: &str) -> Result<String, String> {
    let mut todo: Vec<String> = path.split('/').rev().map(str::to_string).collect();
    let mut done: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(c) = todo.pop() {
        match c.as_str() {
            "" | "." => continue,
            ".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        let here = format!(
            "{}/{c}",
            done.iter().map(|d| format!("/{d}")).collect::<String>()
        );
        let md = ext4
            .symlink_metadata(here.as_str())
            .map_err(|e| e.to_string())?;
        if !md.is_symlink() {
            done.push(c);
            continue;
        }
        links += 1;
        if links > MAX_SYMLINKS {
            return Err(format!("more than {MAX_SYMLINKS} symlinks (a loop?)"));
        }
        if md.len() > MAX_SYMLINK {
            return Err(format!("symlink {here} has a {}-byte target", md.len()));
        }
        let target = ext4.read_link(here.as_str()).map_err(|e| e.to_string())?;
        let target = target.to_str().map_err(|e| e.to_string())?;
        if target.starts_with('/') {
            done.clear();
        }
        todo.extend(target.split('/').rev().map(str::to_string));
    }
    Ok(format!("/{}", done.join("/")))
}

fn where_(part: &Option<Partition>) -> String {
    match part {
        Some(p) => format!("partition {}", p.number),
        None => "disk".into(),
    }
}
