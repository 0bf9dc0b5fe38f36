//! Partition tables of a guest disk, read through the engine: MBR (with the extended
//! partition's chain of logical partitions) and GPT (header and entry array CRCs checked,
//! the backup header used when the primary one is damaged). Every size and offset read from
//! the disk is checked against the disk before it is used.

use common::BlockDriver;

const SECTOR: u64 = 512;
/// Largest GPT entry array vmm reads (the spec's minimum is 16 KiB; 128 entries of 128 bytes).
const MAX_GPT_ARRAY: u64 = 1 << 20;
/// Most logical partitions followed in an extended partition's chain.
const MAX_LOGICAL: usize = 128;

/// One partition: its number as Linux counts it (sda1 = 1; logical partitions from 5),
/// where it lies in bytes, and its PARTUUID as `root=PARTUUID=` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub start: u64,
    pub len: u64,
    pub part_uuid: String,
    /// GRUB's name for it: `gpt1`, `msdos1`.
    pub grub_name: String,
}

/// Why a partition table cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableError(pub String);

impl std::fmt::Display for TableError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn read(disk: &dyn BlockDriver, offset: u64, len: u64) -> Result<Vec<u8>, TableError> {
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= disk.size())
        .ok_or_else(|| {
            TableError(format!(
                "partition table points past the end of the disk ({offset:#x}+{len:#x})"
            ))
        })?;
    let mut buf = vec![0u8; (end - offset) as usize];
    disk.read_at(&mut buf, offset)
        .map_err(|e| TableError(format!("reading the partition table: {e}")))?;
    Ok(buf)
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Sector 0 when it carries the 0x55 0xaa signature (an MBR, or a BIOS boot sector).
pub fn boot_sector(disk: &dyn BlockDriver) -> Result<Option<Vec<u8>>, TableError> {
    if disk.size() < SECTOR {
        return Ok(None);
    }
    let mbr = read(disk, 0, SECTOR)?;
    Ok((mbr[510..512] == [0x55, 0xaa]).then_some(mbr))
}

/// The partitions of `disk`: Ok(None) when sector 0 has no MBR signature (an unpartitioned
/// disk, perhaps a bare filesystem).
pub fn read_partitions(disk: &dyn BlockDriver) -> Result<Option<Vec<Partition>>, TableError> {
    let Some(mbr) = boot_sector(disk)? else {
        return Ok(None);
    };
    let entries: Vec<&[u8]> = (0..4).map(|i| &mbr[446 + 16 * i..462 + 16 * i]).collect();
    if entries.iter().any(|e| e[4] == 0xee) {
        return read_gpt(disk).map(Some);
    }
    read_mbr(disk, &mbr).map(Some)
}

fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0f | 0x85)
}

/// A partition of an MBR entry whose start is `base` sectors plus its own start.
fn mbr_part(
    disk: &dyn BlockDriver,
    e: &[u8],
    base: u64,
    number: u32,
    sig: u32,
) -> Result<Partition, TableError> {
    let start = (base + u64::from(u32_at(e, 8))) * SECTOR;
    let len = u64::from(u32_at(e, 12)) * SECTOR;
    if start == 0 || start.checked_add(len).is_none_or(|end| end > disk.size()) {
        return Err(TableError(format!(
            "MBR partition {number} ({start:#x}+{len:#x}) lies outside the disk ({:#x} bytes)",
            disk.size()
        )));
    }
    Ok(Partition {
        number,
        start,
        len,
        part_uuid: format!("{sig:08x}-{number:02x}"),
        grub_name: format!("msdos{number}"),
    })
}

fn read_mbr(disk: &dyn BlockDriver, mbr: &[u8]) -> Result<Vec<Partition>, TableError> {
    let sig = u32_at(mbr, 440);
    let mut parts = Vec::new();
    let mut extended = None;
    for i in 0..4 {
        let e = &mbr[446 + 16 * i..462 + 16 * i];
        if e[4] == 0 || u32_at(e, 12) == 0 {
            continue;
        }
        let p = mbr_part(disk, e, 0, i as u32 + 1, sig)?;
        if is_extended(e[4]) {
            if extended.replace(p.start / SECTOR).is_some() {
                return Err(TableError("MBR has two extended partitions".into()));
            }
        } else {
            parts.push(p);
        }
    }
    // Logical partitions: a chain of EBRs, each with the partition (relative to its EBR)
    // and a link to the next EBR (relative to the extended partition).
    if let Some(ext) = extended {
        let mut ebr = ext;
        for n in 0.. {
            if n == MAX_LOGICAL {
                return Err(TableError(format!(
                    "more than {MAX_LOGICAL} logical partitions (a loop in the EBR chain?)"
                )));
            }
            let b = read(disk, ebr * SECTOR, SECTOR)?;
            if b[510..512] != [0x55, 0xaa] {
                return Err(TableError(format!(
                    "extended boot record at sector {ebr} has no signature"
                )));
            }
            let (e, link) = (&b[446..462], &b[462..478]);
            if e[4] != 0 && u32_at(e, 12) != 0 {
                parts.push(mbr_part(disk, e, ebr, 5 + n as u32, sig)?);
            }
            if link[4] == 0 || !is_extended(link[4]) {
                break;
            }
            ebr = ext + u64::from(u32_at(link, 8));
        }
    }
    Ok(parts)
}

/// A GUID in its mixed-endian text form, lower case.
pub fn guid_string(g: &[u8]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{}",
        u32_at(g, 0),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// The GPT header at `lba`, checked: signature, size, CRC, and an entry array that fits
/// the disk and its limit. Returns (entries LBA, count, entry size, entries CRC).
fn gpt_header(disk: &dyn BlockDriver, lba: u64) -> Result<(u64, u32, u32, u32), String> {
    let h = read(disk, lba * SECTOR, SECTOR).map_err(|e| e.0)?;
    if &h[0..8] != b"EFI PART" {
        return Err("no GPT signature".into());
    }
    let size = u32_at(&h, 12) as usize;
    if !(92..=SECTOR as usize).contains(&size) {
        return Err(format!("GPT header size {size} is invalid"));
    }
    let mut c = h[..size].to_vec();
    c[16..20].fill(0);
    if crc32fast::hash(&c) != u32_at(&h, 16) {
        return Err("GPT header CRC mismatch".into());
    }
    if u64_at(&h, 24) != lba {
        return Err(format!(
            "GPT header at LBA {lba} says it is at LBA {}",
            u64_at(&h, 24)
        ));
    }
    let (array, count, esize) = (u64_at(&h, 72), u32_at(&h, 80), u32_at(&h, 84));
    if esize < 128 || esize % 8 != 0 || u64::from(esize) * u64::from(count) > MAX_GPT_ARRAY {
        return Err(format!(
            "GPT entry array of {count} x {esize} bytes is invalid"
        ));
    }
    Ok((array, count, esize, u32_at(&h, 88)))
}

fn read_gpt(disk: &dyn BlockDriver) -> Result<Vec<Partition>, TableError> {
    let last = disk.size() / SECTOR - 1;
    let mut errors = Vec::new();
    // The primary header and its array, else the backup's.
    for lba in [1, last] {
        let (array, count, esize, crc) = match gpt_header(disk, lba) {
            Ok(h) => h,
            Err(e) => {
                errors.push(format!("LBA {lba}: {e}"));
                continue;
            }
        };
        let bytes = u64::from(count) * u64::from(esize);
        let table = match array.checked_mul(SECTOR).map(|o| read(disk, o, bytes)) {
            Some(Ok(t)) => t,
            Some(Err(e)) => {
                errors.push(format!("LBA {lba}: {e}"));
                continue;
            }
            None => {
                errors.push(format!("LBA {lba}: entry array LBA {array} is invalid"));
                continue;
            }
        };
        if crc32fast::hash(&table) != crc {
            errors.push(format!("LBA {lba}: GPT entry array CRC mismatch"));
            continue;
        }
        let mut parts = Vec::new();
        for (i, e) in table.chunks(esize as usize).enumerate() {
            if e[0..16].iter().all(|&b| b == 0) {
                continue;
            }
            let number = i as u32 + 1;
            let (first, end) = (u64_at(e, 32), u64_at(e, 40));
            if first == 0 || end < first || end > last {
                return Err(TableError(format!(
                    "GPT partition {number} (LBA {first} to {end}) lies outside the disk"
                )));
            }
            parts.push(Partition {
                number,
                start: first * SECTOR,
                len: (end - first + 1) * SECTOR,
                part_uuid: guid_string(&e[16..32]),
                grub_name: format!("gpt{number}"),
            });
        }
        return Ok(parts);
    }
    Err(TableError(format!(
        "damaged GPT partition table: {}",
        errors.join("; ")
    )))
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use integration_tests::mem_disk::MemDisk;

    /// A disk image with a GPT of `parts` (first LBA, last LBA), as sgdisk lays it out.
    pub fn gpt_disk(size: usize, parts: &[(u64, u64)]) -> Vec<u8> {
        let mut d = vec![0u8; size];
        let last = (size as u64 / SECTOR) - 1;
        d[446 + 4] = 0xee;
        d[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
        d[510] = 0x55;
        d[511] = 0xaa;
        let mut table = vec![0u8; 128 * 128];
        for (i, &(a, b)) in parts.iter().enumerate() {
            let e = &mut table[i * 128..];
            e[0] = 0xaf; // some type GUID
            e[16] = i as u8 + 1;
            e[32..40].copy_from_slice(&a.to_le_bytes());
            e[40..48].copy_from_slice(&b.to_le_bytes());
        }
        let tcrc = crc32fast::hash(&table);
        for (hdr_lba, array_lba) in [(1u64, 2u64), (last, last - 32)] {
            let mut h = vec![0u8; 92];
            h[0..8].copy_from_slice(b"EFI PART");
            h[8..12].copy_from_slice(&0x10000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&hdr_lba.to_le_bytes());
            h[72..80].copy_from_slice(&array_lba.to_le_bytes());
            h[80..84].copy_from_slice(&128u32.to_le_bytes());
            h[84..88].copy_from_slice(&128u32.to_le_bytes());
            h[88..92].copy_from_slice(&tcrc.to_le_bytes());
            let c = crc32fast::hash(&h);
            h[16..20].copy_from_slice(&c.to_le_bytes());
            let o = (hdr_lba * SECTOR) as usize;
            d[o..o + 92].copy_from_slice(&h);
            let o = (array_lba * SECTOR) as usize;
            d[o..o + table.len()].copy_from_slice(&table);
        }
        d
    }

    pub fn mem(bytes: &[u8]) -> MemDisk {
        let m = MemDisk::new(bytes.len(), false);
        m.write_at(bytes, 0).unwrap();
        m
    }

    #[test]
    fn gpt_primary_and_backup() {
        let d = gpt_disk(4 << 20, &[(2048, 4095), (4096, 8000)]);
        let p = read_partitions(&mem(&d)).unwrap().unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].number, p[0].start, p[0].len),
            (1, 2048 * 512, 2048 * 512)
        );
        assert_eq!(p[1].grub_name, "gpt2");
        assert_eq!(p[0].part_uuid, "00000001-0000-0000-0000-000000000000");
        // Primary header damaged: the backup is used.
        let mut bad = d.clone();
        bad[512 + 40] ^= 1;
        assert_eq!(read_partitions(&mem(&bad)).unwrap().unwrap(), p);
        // Primary array damaged: the backup is used.
        let mut bad = d.clone();
        bad[1024 + 33] ^= 1;
        assert_eq!(read_partitions(&mem(&bad)).unwrap().unwrap(), p);
        // Both damaged: one error naming both.
        let last = d.len() - 512;
        bad[last + 40] ^= 1;
        let e = read_partitions(&mem(&bad)).unwrap_err().0;
        assert!(e.contains("array CRC") && e.contains("header CRC"), "{e}");
    }

    #[test]
    fn mbr_with_logical_partitions() {
        let mut d = vec![0u8; 8 << 20];
        d[440..444].copy_from_slice(&0xdeadbeefu32.to_le_bytes());
        d[510] = 0x55;
        d[511] = 0xaa;
        let entry = |d: &mut [u8], at: usize, t: u8, start: u32, len: u32| {
            d[at + 4] = t;
            d[at + 8..at + 12].copy_from_slice(&start.to_le_bytes());
            d[at + 12..at + 16].copy_from_slice(&len.to_le_bytes());
        };
        entry(&mut d, 446, 0x83, 2048, 4096);
        entry(&mut d, 462, 0x05, 8192, 8192);
        // EBR at 8192: logical at +2048, next EBR at ext+4096.
        let e1 = 8192 * 512;
        d[e1 + 510] = 0x55;
        d[e1 + 511] = 0xaa;
        entry(&mut d, e1 + 446, 0x83, 2048, 1024);
        entry(&mut d, e1 + 462, 0x05, 4096, 4096);
        let e2 = (8192 + 4096) * 512;
        d[e2 + 510] = 0x55;
        d[e2 + 511] = 0xaa;
        entry(&mut d, e2 + 446, 0x82, 2048, 1024);
        let p = read_partitions(&mem(&d)).unwrap().unwrap();
        let got: Vec<_> = p.iter().map(|p| (p.number, p.start / 512)).collect();
        assert_eq!(got, [(1, 2048), (5, 8192 + 2048), (6, 8192 + 4096 + 2048)]);
        assert_eq!(p[0].part_uuid, "deadbeef-01");
        // A loop in the chain is refused, not followed forever.
        entry(&mut d, e2 + 462, 0x05, 0, 4096);
        assert!(read_partitions(&mem(&d)).unwrap_err().0.contains("logical"));
        // No signature: not partitioned.
        assert_eq!(read_partitions(&mem(&[0u8; 4096])).unwrap(), None);
    }

    /// Random damage to MBR and GPT structures: an error or partitions inside the disk,
    /// never a panic or a huge allocation. `TEST_SEED` replays.
    #[test]
    fn hostile_tables() {
        let seed = integration_tests::seed(0x6a7);
        let mut rng = integration_tests::Rng::new(seed);
        let gpt = gpt_disk(1 << 20, &[(34, 100), (200, 1000)]);
        let mut mbr = vec![0u8; 1 << 20];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        mbr[446 + 4] = 0x83;
        mbr[446 + 8] = 1;
        mbr[446 + 12] = 100;
        mbr[462 + 4] = 0x05;
        mbr[462 + 9] = 1;
        mbr[462 + 12] = 200;
        let (mut ok, mut failed) = (0, 0);
        for round in 0..2000 {
            let mut d = if round % 2 == 0 {
                gpt.clone()
            } else {
                mbr.clone()
            };
            for _ in 0..1 + rng.below(4) {
                let at = match rng.below(3) {
                    0 => 440 + rng.below(72) as usize,
                    1 => 512 + rng.below(92) as usize,
                    _ => rng.below(2048) as usize,
                };
                d[at] = rng.next_u64() as u8;
            }
            let r = std::panic::catch_unwind(|| read_partitions(&mem(&d)))
                .unwrap_or_else(|_| panic!("round {round} (TEST_SEED={seed:#x}) panicked"));
            match r {
                Ok(Some(parts)) => {
                    ok += 1;
                    for p in parts {
                        assert!(p.start + p.len <= d.len() as u64, "round {round}: {p:?}");
                    }
                }
                Ok(None) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        assert!(ok > 100 && failed > 100, "{ok} read, {failed} refused");
    }
}
