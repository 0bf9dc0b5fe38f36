//! FAT12/16/32 read-only, for an EFI system partition (systemd-boot's layout: BLS entries
//! and kernels on the ESP): boot sector, the FAT, cluster chains, directories with long
//! names. Every field comes from the disk: geometry is range-checked, chains are followed
//! at most as many steps as the volume has clusters, and reads are bounded by the caller.

use std::sync::Arc;

use common::BlockDriver;

/// Largest FAT read into memory (a 2 GiB ESP with 4 KiB clusters has a 2 MiB FAT32).
const MAX_FAT: u64 = 16 << 20;
/// Most entries read from one directory.
const MAX_DIR_ENTRIES: usize = 65536;

const ATTR_DIR: u8 = 0x10;
const ATTR_LFN: u8 = 0x0f;
const ATTR_VOLUME: u8 = 0x08;

/// One mounted FAT volume.
pub struct Fat {
    disk: Arc<dyn BlockDriver>,
    /// Byte offset of the volume, of the data area (cluster 2), and cluster size.
    start: u64,
    data: u64,
    cluster: u64,
    clusters: u32,
    /// The FAT, decoded: next cluster of each (>= 0x0fff_fff8: end, 0: free).
    next: Vec<u32>,
    /// FAT12/16's fixed root directory (offset, bytes), or FAT32's root cluster.
    root: Root,
    serial: u32,
}

enum Root {
    Fixed(u64, u64),
    Cluster(u32),
}

/// A directory entry.
#[derive(Debug, Clone)]
struct DirEntry {
    name: String,
    dir: bool,
    first: u32,
    size: u32,
}

fn le16(b: &[u8], o: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[o], b[o + 1]]))
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

/// Whether the byte range starts with a FAT boot sector.
pub fn is_fat(disk: &dyn BlockDriver, start: u64, len: u64) -> bool {
    let mut b = [0u8; 512];
    if len < 512 * 16 || disk.read_at(&mut b, start).is_err() || b[510..512] != [0x55, 0xaa] {
        return false;
    }
    (&b[54..59] == b"FAT12" || &b[54..59] == b"FAT16" || &b[82..87] == b"FAT32")
        && le16(&b, 11).is_power_of_two()
}

impl Fat {
    /// Mount the volume at `start`, `len` bytes.
    pub fn open(disk: Arc<dyn BlockDriver>, start: u64, len: u64) -> Result<Fat, String> {
        let mut b = [0u8; 512];
        disk.read_at(&mut b, start).map_err(|e| e.to_string())?;
        let bps = le16(&b, 11);
        let spc = u64::from(b[13]);
        let reserved = le16(&b, 14);
        let nfats = u64::from(b[16]);
        let root_entries = le16(&b, 17);
        let total = match le16(&b, 19) {
            0 => u64::from(le32(&b, 32)),
            n => n,
        };
        let fat_sectors = match le16(&b, 22) {
            0 => u64::from(le32(&b, 36)),
            n => n,
        };
        if !(512..=4096).contains(&bps)
            || !bps.is_power_of_two()
            || spc == 0
            || !spc.is_power_of_two()
            || reserved == 0
            || nfats == 0
            || fat_sectors == 0
            || total * bps > len
        {
            return Err("FAT boot sector has an invalid geometry".into());
        }
        let root_bytes = root_entries * 32;
        let root_at = (reserved + nfats * fat_sectors) * bps;
        let data = root_at + root_bytes.next_multiple_of(bps);
        if data >= total * bps {
            return Err("FAT volume has no data area".into());
        }
        let clusters = ((total * bps - data) / (spc * bps)).min(0x0fff_fff5) as u32;
        let fat_bytes = fat_sectors * bps;
        if fat_bytes > MAX_FAT {
            return Err(format!("FAT of {} MiB is too large", fat_bytes >> 20));
        }
        // The type goes by the cluster count; the count is then capped by what the FAT can
        // describe, so the decoded table is never larger than the FAT read.
        let per_entry_x2 = match clusters {
            0..4085 => 3,
            4085..65525 => 4,
            _ => 8,
        };
        let fat32 = clusters >= 65525;
        let fat12 = clusters < 4085;
        let clusters = clusters.min(((fat_bytes * 2 / per_entry_x2).saturating_sub(2)) as u32);
        let mut raw = vec![0u8; fat_bytes as usize];
        disk.read_at(&mut raw, start + reserved * bps)
            .map_err(|e| e.to_string())?;
        let count = clusters as usize + 2;
        let next: Vec<u32> = if fat12 {
            (0..count)
                .map(|n| {
                    let o = n * 3 / 2;
                    let v = raw.get(o..o + 2).map_or(0xfff, |w| {
                        let v = u32::from(u16::from_le_bytes([w[0], w[1]]));
                        if n % 2 == 0 {
                            v & 0xfff
                        } else {
                            v >> 4
                        }
                    });
                    if v >= 0xff8 {
                        0x0fff_ffff
                    } else {
                        v
                    }
                })
                .collect()
        } else if !fat32 {
            (0..count)
                .map(|n| {
                    let v = raw
                        .get(2 * n..2 * n + 2)
                        .map_or(0xffff, |w| u32::from(u16::from_le_bytes([w[0], w[1]])));
                    if v >= 0xfff8 {
                        0x0fff_ffff
                    } else {
                        v
                    }
                })
                .collect()
        } else {
            (0..count)
                .map(|n| {
                    raw.get(4 * n..4 * n + 4)
                        .map_or(0x0fff_ffff, |w| le32(w, 0) & 0x0fff_ffff)
                })
                .collect()
        };
        let root = if fat32 {
            Root::Cluster(le32(&b, 44))
        } else {
            Root::Fixed(root_at, root_bytes)
        };
        let serial = if fat32 { le32(&b, 67) } else { le32(&b, 39) };
        Ok(Fat {
            disk,
            start,
            data,
            cluster: spc * bps,
            clusters,
            next,
            root,
            serial,
        })
    }

    /// The volume serial as Linux shows it (`root=UUID=ABCD-1234`).
    pub fn uuid(&self) -> String {
        format!("{:04X}-{:04X}", self.serial >> 16, self.serial & 0xffff)
    }

    /// The clusters of a chain from `first`, at most `limit` of them.
    fn chain(&self, first: u32, limit: u64) -> Result<Vec<u32>, String> {
        let mut out = Vec::new();
        let mut c = first;
        while (2..self.clusters + 2).contains(&c) {
            if out.len() as u64 >= limit.min(u64::from(self.clusters)) {
                return Err("FAT cluster chain is longer than the volume (a loop?)".into());
            }
            out.push(c);
            c = self.next[c as usize];
        }
        if c < 0x0fff_fff8 && !out.is_empty() {
            return Err(format!("FAT cluster chain points at cluster {c:#x}"));
        }
        Ok(out)
    }

    /// `len` bytes of the chain from `first` (all of it when `len` is None, bounded by `max`).
    fn read_chain(&self, first: u32, len: Option<u64>, max: u64) -> Result<Vec<u8>, String> {
        let limit = len.unwrap_or(max).div_ceil(self.cluster).max(1);
        let chain = self.chain(first, limit + u64::from(len.is_none()))?;
        let want = len.unwrap_or(chain.len() as u64 * self.cluster);
        if want > chain.len() as u64 * self.cluster {
            return Err("FAT file is larger than its cluster chain".into());
        }
        let mut out = vec![0u8; want as usize];
        for (i, piece) in out.chunks_mut(self.cluster as usize).enumerate() {
            let at = self.start + self.data + u64::from(chain[i] - 2) * self.cluster;
            self.disk.read_at(piece, at).map_err(|e| e.to_string())?;
        }
        Ok(out)
    }

    fn dir_entries(&self, dir: Option<u32>) -> Result<Vec<DirEntry>, String> {
        let first = match (dir, &self.root) {
            (Some(c), _) => Some(c),
            (None, Root::Cluster(c)) => Some(*c),
            (None, Root::Fixed(..)) => None,
        };
        let bytes = match (first, &self.root) {
            (Some(c), _) => self.read_chain(c, None, MAX_DIR_ENTRIES as u64 * 32)?,
            (None, Root::Cluster(_)) => vec![],
            (None, Root::Fixed(at, len)) => {
                let mut b = vec![0u8; *len as usize];
                self.disk
                    .read_at(&mut b, self.start + at)
                    .map_err(|e| e.to_string())?;
                b
            }
        };
        let mut out = Vec::new();
        let mut lfn: Vec<(u8, String)> = Vec::new();
        for e in bytes.chunks_exact(32).take(MAX_DIR_ENTRIES) {
            match e[0] {
                0 => break,
                0xe5 => {
                    lfn.clear();
                    continue;
                }
                _ => {}
            }
            if e[11] == ATTR_LFN {
                let units: Vec<u16> = [1..11, 14..26, 28..32]
                    .into_iter()
                    .flat_map(|r| e[r].chunks(2).map(|w| u16::from_le_bytes([w[0], w[1]])))
                    .take_while(|&u| u != 0 && u != 0xffff)
                    .collect();
                lfn.push((e[0] & 0x1f, String::from_utf16_lossy(&units)));
                continue;
            }
            if e[11] & ATTR_VOLUME != 0 {
                lfn.clear();
                continue;
            }
            let name = if lfn.is_empty() {
                let base = String::from_utf8_lossy(&e[0..8]).trim_end().to_string();
                let ext = String::from_utf8_lossy(&e[8..11]).trim_end().to_string();
                if ext.is_empty() {
                    base
                } else {
                    format!("{base}.{ext}")
                }
            } else {
                lfn.sort_by_key(|(n, _)| *n);
                lfn.drain(..).map(|(_, s)| s).collect()
            };
            out.push(DirEntry {
                name,
                dir: e[11] & ATTR_DIR != 0,
                first: ((le16(e, 20) as u32) << 16) | le16(e, 26) as u32,
                size: le32(e, 28),
            });
        }
        Ok(out)
    }

    /// The entry at absolute `path` (None: the root directory), names compared without case.
    fn lookup(&self, path: &str) -> Result<Option<DirEntry>, String> {
        let mut cur: Option<DirEntry> = None;
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            if cur.as_ref().is_some_and(|d| !d.dir) {
                return Err(format!("{path}: not a directory"));
            }
            let list = self.dir_entries(cur.as_ref().map(|d| d.first))?;
            cur = Some(
                list.into_iter()
                    .find(|e| e.name.eq_ignore_ascii_case(part))
                    .ok_or_else(|| format!("{path}: not found"))?,
            );
        }
        Ok(cur)
    }

    pub fn exists(&self, path: &str) -> bool {
        self.lookup(path).is_ok()
    }

    pub fn list(&self, dir: &str) -> Vec<String> {
        match self.lookup(dir) {
            Ok(Some(d)) if d.dir => self.dir_entries(Some(d.first)),
            Ok(None) => self.dir_entries(None),
            _ => return vec![],
        }
        .map(|l| {
            l.into_iter()
                .filter(|e| e.name != "." && e.name != "..")
                .map(|e| e.name)
                .collect()
        })
        .unwrap_or_default()
    }

    /// The contents of file `path`, refused when larger than `max` bytes.
    pub fn read(&self, path: &str, max: u64) -> Result<Vec<u8>, String> {
        let e = self
            .lookup(path)?
            .filter(|e| !e.dir)
            .ok_or_else(|| format!("{path}: not a file"))?;
        if u64::from(e.size) > max {
            return Err(format!(
                "{path} is {} bytes, more than the {max} vmm reads from this filesystem",
                e.size
            ));
        }
        if e.size == 0 {
            return Ok(vec![]);
        }
        self.read_chain(e.first, Some(u64::from(e.size)), max)
            .map_err(|m| format!("{path}: {m}"))
    }
}
