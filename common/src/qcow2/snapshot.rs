//! The internal snapshot table: parse and encode.
//!
//! Layout of one entry (QEMU `docs/interop/qcow2.rst`, "Snapshot table"), big endian:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..8 | offset of the snapshot's L1 table |
//! | 8..12 | number of L1 entries |
//! | 12..14 | length of the unique ID string |
//! | 14..16 | length of the name |
//! | 16..20 | date, seconds since the epoch |
//! | 20..24 | date, nanoseconds |
//! | 24..32 | guest clock, nanoseconds |
//! | 32..36 | size of the saved VM state (low 32 bits) |
//! | 36..40 | size of the extra data that follows |
//! | 40.. | extra data: VM state size (64 bit), disk size, icount, then anything newer |
//! | | the ID string, the name (not NUL terminated), padding to a multiple of 8 |

use super::header::{be32, be64, Header, MAX_SNAPSHOTS};
use crate::error::{Error, Result, Structure};
use crate::storage::Storage;

/// Fixed part of a snapshot table entry.
const ENTRY_HEADER_LEN: usize = 40;
/// Extra data this engine understands: vm_state_size_large, disk_size, icount.
const KNOWN_EXTRA_LEN: usize = 24;
/// Largest extra data QEMU accepts per entry.
pub const MAX_EXTRA_DATA: usize = 1024;
/// Largest snapshot table QEMU accepts (1 KiB per possible snapshot).
pub const MAX_TABLE_BYTES: u64 = 1024 * MAX_SNAPSHOTS as u64;
/// Largest L1 table of a snapshot, as for the active one (32 MiB of entries).
const MAX_L1_BYTES: u64 = 32 << 20;

/// One entry of the snapshot table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    /// Guest disk size when the snapshot was taken. [`read_table`] fills in the image's
    /// current size when the entry does not record it, as QEMU does; [`encode_table`]
    /// writes 0 for `None`.
    pub disk_size: Option<u64>,
    /// Instruction count, if recorded (stored as -1 when not).
    pub icount: Option<u64>,
    /// Extra data beyond what this engine knows, kept verbatim.
    pub unknown_extra: Vec<u8>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn read(storage: &dyn Storage, buf: &mut [u8], offset: u64) -> Result<()> {
    storage
        .read_at(buf, offset)
        .map_err(|e| Error::io("Failed to read snapshot table", e))
}

/// Bytes of the table one read brings in.
const READ_WINDOW: usize = 64 << 10;

/// The table read front to back through one window: a read per window, not two per entry
/// (a hostile table of 65 536 tiny entries took 130 000 reads each time it was loaded).
struct TableReader<'a> {
    storage: &'a dyn Storage,
    window: Vec<u8>,
    start: u64,
}

impl TableReader<'_> {
    fn read(&mut self, out: &mut [u8], offset: u64) -> Result<()> {
        if out.len() >= READ_WINDOW {
            return read(self.storage, out, offset);
        }
        let held = self.start..self.start + self.window.len() as u64;
        if !(held.contains(&offset) && offset + out.len() as u64 <= held.end) {
            self.window.resize(READ_WINDOW, 0);
            read(self.storage, &mut self.window, offset)?;
            self.start = offset;
        }
        let i = (offset - self.start) as usize;
        out.copy_from_slice(&self.window[i..i + out.len()]);
        Ok(())
    }
}

/// Read and validate the snapshot table the header points at.
///
/// Every length and offset is checked before it is used: the number of snapshots, the
/// table's position and total size, each entry's extra data, ID and name lengths and its
/// L1 table. Like QEMU, a table (or an entry's L1 table) past the end of the file is not
/// refused here: it reads as zeroes. Nothing larger than one entry is allocated at once, and
/// the table's total size is bounded.
pub fn read_table(storage: &dyn Storage, header: &Header) -> Result<Vec<Snapshot>> {
    let count = header.nb_snapshots;
    if count == 0 {
        return Ok(Vec::new());
    }
    if count > MAX_SNAPSHOTS {
        return Err(Error::corrupt_at(
            Structure::Header,
            0,
            "Too many snapshots",
        ));
    }
    let cluster_size = header.cluster_size();
    let table_offset = header.snapshots_offset;
    if !table_offset.is_multiple_of(cluster_size) {
        return Err(Error::corrupt_at(
            Structure::SnapshotTable,
            table_offset,
            "Snapshot table offset invalid",
        ));
    }
    let mut snapshots = Vec::with_capacity(count.min(1024) as usize);
    let mut table = TableReader {
        storage,
        window: Vec::new(),
        start: 0,
    };
    let mut offset = table_offset;
    for i in 0..count {
        let entry_start = offset;
        let mut fixed = [0u8; ENTRY_HEADER_LEN];
        check_within(entry_start, ENTRY_HEADER_LEN as u64, table_offset)?;
        table.read(&mut fixed, offset)?;
        offset += ENTRY_HEADER_LEN as u64;

        let l1_table_offset = be64(&fixed, 0);
        let l1_size = be32(&fixed, 8);
        let id_len = be16(&fixed, 12) as usize;
        let name_len = be16(&fixed, 14) as usize;
        let date_sec = be32(&fixed, 16);
        let date_nsec = be32(&fixed, 20);
        let vm_clock_nsec = be64(&fixed, 24);
        let vm_state_size_small = be32(&fixed, 32);
        let extra_len = be32(&fixed, 36) as usize;
        if extra_len > MAX_EXTRA_DATA {
            return Err(Error::corrupt_at(
                Structure::SnapshotTable,
                entry_start,
                format!("Too much extra metadata in snapshot table entry {i}"),
            ));
        }
        let var_len = extra_len + id_len + name_len;
        check_within(offset, var_len as u64, table_offset)?;
        let mut var = vec![0u8; var_len];
        table.read(&mut var, offset)?;
        offset += var_len as u64;

        let extra = &var[..extra_len];
        let vm_state_size = if extra_len >= 8 {
            be64(extra, 0)
        } else {
            u64::from(vm_state_size_small)
        };
        let disk_size = if extra_len >= 16 {
            be64(extra, 8)
        } else {
            header.size
        };
        let icount = if extra_len >= 24 {
            Some(be64(extra, 16)).filter(|&v| v != u64::MAX)
        } else {
            None
        };
        let unknown_extra = extra.get(KNOWN_EXTRA_LEN..).unwrap_or(&[]).to_vec();
        let id = String::from_utf8_lossy(&var[extra_len..extra_len + id_len]).into_owned();
        let name = String::from_utf8_lossy(&var[extra_len + id_len..]).into_owned();

        if !l1_table_offset.is_multiple_of(cluster_size) {
            return Err(Error::corrupt_at(
                Structure::L1Table,
                l1_table_offset,
                format!("Snapshot {i} L1 table offset invalid"),
            ));
        }
        let l1_bytes = u64::from(l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::corrupt_at(
                Structure::L1Table,
                l1_table_offset,
                format!("Snapshot {i} L1 table too large"),
            ));
        }

        snapshots.push(Snapshot {
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            disk_size: Some(disk_size),
            icount,
            unknown_extra,
        });
        offset = offset.next_multiple_of(8);
        if offset - table_offset > MAX_TABLE_BYTES {
            return Err(Error::corrupt_at(
                Structure::SnapshotTable,
                table_offset,
                "Snapshot table too large",
            ));
        }
    }
    Ok(snapshots)
}

/// Check that `len` bytes at `at` are part of a table that starts at `table_offset`,
/// stays within [`MAX_TABLE_BYTES`].
fn check_within(at: u64, len: u64, table_offset: u64) -> Result<()> {
    let corrupt = |msg| Error::corrupt_at(Structure::SnapshotTable, table_offset, msg);
    let end = at
        .checked_add(len)
        .ok_or_else(|| corrupt("Snapshot table too large"))?;
    if end - table_offset > MAX_TABLE_BYTES {
        return Err(corrupt("Snapshot table too large"));
    }
    Ok(())
}

/// Validate one entry before it is written: lengths must fit their on-disk fields.
fn check_entry(sn: &Snapshot) -> Result<()> {
    if sn.id.len() > u16::MAX as usize || sn.name.len() > u16::MAX as usize {
        return Err(Error::invalid("Snapshot ID or name too long"));
    }
    if KNOWN_EXTRA_LEN + sn.unknown_extra.len() > MAX_EXTRA_DATA {
        return Err(Error::invalid(
            "Too much extra metadata in snapshot table entry",
        ));
    }
    Ok(())
}

/// Size in bytes of the encoded table (what [`encode_table`] returns), for allocation.
pub fn encoded_len(snapshots: &[Snapshot]) -> u64 {
    snapshots
        .iter()
        .map(|sn| {
            let n = ENTRY_HEADER_LEN
                + KNOWN_EXTRA_LEN
                + sn.unknown_extra.len()
                + sn.id.len()
                + sn.name.len();
            n.next_multiple_of(8) as u64
        })
        .sum()
}

/// Encode the table as QEMU writes it: every entry with 24 bytes of known extra data
/// (plus any unknown extra data kept from reading), padded to 8 bytes.
pub fn encode_table(snapshots: &[Snapshot]) -> Vec<u8> {
    try_encode_table(snapshots).expect("snapshot entry fields exceed their on-disk widths")
}

/// Like [`encode_table`], but fails instead of panicking on IDs or names longer than
/// 65535 bytes, too much extra data, or too many snapshots.
pub fn try_encode_table(snapshots: &[Snapshot]) -> Result<Vec<u8>> {
    if snapshots.len() > MAX_SNAPSHOTS as usize {
        return Err(Error::invalid("Too many snapshots"));
    }
    let total = encoded_len(snapshots);
    if total > MAX_TABLE_BYTES {
        return Err(Error::invalid("Snapshot table too large"));
    }
    let mut out = Vec::with_capacity(total as usize);
    for sn in snapshots {
        check_entry(sn)?;
        let extra_len = KNOWN_EXTRA_LEN + sn.unknown_extra.len();
        out.extend_from_slice(&sn.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&sn.l1_size.to_be_bytes());
        out.extend_from_slice(&(sn.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(sn.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&sn.date_sec.to_be_bytes());
        out.extend_from_slice(&sn.date_nsec.to_be_bytes());
        out.extend_from_slice(&sn.vm_clock_nsec.to_be_bytes());
        // The 32-bit field holds the low bits; the full value is in the extra data.
        out.extend_from_slice(&(sn.vm_state_size as u32).to_be_bytes());
        out.extend_from_slice(&(extra_len as u32).to_be_bytes());
        out.extend_from_slice(&sn.vm_state_size.to_be_bytes());
        out.extend_from_slice(&sn.disk_size.unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&sn.icount.unwrap_or(u64::MAX).to_be_bytes());
        out.extend_from_slice(&sn.unknown_extra);
        out.extend_from_slice(sn.id.as_bytes());
        out.extend_from_slice(sn.name.as_bytes());
        out.resize(out.len().next_multiple_of(8), 0);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::Mutex;

    /// A storage in memory, counting its reads.
    struct Mem(Mutex<Vec<u8>>, std::sync::atomic::AtomicUsize);

    impl Storage for Mem {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let d = self.0.lock().unwrap();
            for (i, b) in buf.iter_mut().enumerate() {
                *b = d.get(offset as usize + i).copied().unwrap_or(0);
            }
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            let mut d = self.0.lock().unwrap();
            let end = offset as usize + buf.len();
            if d.len() < end {
                d.resize(end, 0);
            }
            d[offset as usize..end].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn len(&self) -> io::Result<u64> {
            Ok(self.0.lock().unwrap().len() as u64)
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.0.lock().unwrap().resize(len as usize, 0);
            Ok(())
        }
        fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }
        fn allocate(&self, _offset: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }
        fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
            let len = self.len()?;
            Ok((offset < len).then_some((offset, len)))
        }
        fn allocated_size(&self) -> io::Result<u64> {
            self.len()
        }
    }

    /// The snapshot table of an image made by
    /// `qemu-img create -f qcow2 t.qcow2 1M; qemu-img snapshot -c snap1 t.qcow2;
    ///  qemu-img snapshot -c 'second one' t.qcow2` (qemu-img 10.0.2), at offset 0x70000.
    /// qemu-img does not pad the last entry: the file ends with it.
    const QEMU_TABLE: &str = concat!(
        "000000000004000000000001000100056b060333178c9468000000000000000000000000",
        "0000001800000000000000000000000000100000000000000000000031736e6170310000",
        "000000000006000000000001000100",
        "0a6b0603331838746800000000000000000000000000000018000000000000000000000000",
        "001000000000000000000000327365636f6e64206f6e65",
    );

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn header(nb: u32, offset: u64, size: u64) -> Header {
        let mut h = Header::parse(&minimal_header()).unwrap();
        h.nb_snapshots = nb;
        h.snapshots_offset = offset;
        h.size = size;
        h
    }

    /// A valid v3 header with 64 KiB clusters, refcount table at 0x10000, L1 at 0x30000.
    fn minimal_header() -> Vec<u8> {
        let mut b = vec![0u8; 1 << 16];
        b[0..4].copy_from_slice(&0x5146_49fbu32.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        b[36..40].copy_from_slice(&1u32.to_be_bytes());
        b[40..48].copy_from_slice(&0x30000u64.to_be_bytes());
        b[48..56].copy_from_slice(&0x10000u64.to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b
    }

    fn storage_with(table: &[u8], at: usize, len: usize) -> Mem {
        let mut d = vec![0u8; len.max(at + table.len())];
        d[at..at + table.len()].copy_from_slice(table);
        Mem(Mutex::new(d), Default::default())
    }

    #[test]
    fn parses_qemu_table_and_round_trips() {
        let table = unhex(QEMU_TABLE);
        let st = storage_with(&table, 0x70000, 0);
        let h = header(2, 0x70000, 1 << 20);
        let snaps = read_table(&st, &h).unwrap();
        assert_eq!(snaps.len(), 2);
        assert_eq!(snaps[0].id, "1");
        assert_eq!(snaps[0].name, "snap1");
        assert_eq!(snaps[0].l1_table_offset, 0x40000);
        assert_eq!(snaps[0].l1_size, 1);
        assert_eq!(snaps[0].disk_size, Some(1 << 20));
        assert_eq!(snaps[0].icount, Some(0));
        assert_eq!(snaps[0].vm_state_size, 0);
        assert_eq!(snaps[1].id, "2");
        assert_eq!(snaps[1].name, "second one");
        assert_eq!(snaps[1].date_sec, 0x6b06_0333);
        assert_eq!(snaps[1].date_nsec, 0x1838_7468);
        let mut padded = table.clone();
        padded.resize(table.len().next_multiple_of(8), 0);
        assert_eq!(encode_table(&snaps), padded);
        assert_eq!(encoded_len(&snaps), padded.len() as u64);
    }

    fn sample() -> Snapshot {
        Snapshot {
            l1_table_offset: 0x50000,
            l1_size: 1,
            id: "7".into(),
            name: "n".into(),
            date_sec: 1,
            date_nsec: 2,
            vm_clock_nsec: 3_000_000_123,
            vm_state_size: 1 << 33,
            disk_size: Some(1 << 20),
            icount: Some(42),
            unknown_extra: vec![9; 5],
        }
    }

    #[test]
    fn round_trips_large_state_icount_and_unknown_extra() {
        let snaps = vec![
            sample(),
            Snapshot {
                icount: None,
                unknown_extra: vec![],
                ..sample()
            },
        ];
        let bytes = encode_table(&snaps);
        let st = storage_with(&bytes, 0x60000, 0x70000);
        let parsed = read_table(&st, &header(2, 0x60000, 1 << 20)).unwrap();
        assert_eq!(parsed, snaps);
    }

    #[test]
    fn old_entries_without_extra_data() {
        // extra_data_size 0: vm state size from the 32-bit field, disk size from the header.
        let mut e = vec![0u8; 40];
        e[0..8].copy_from_slice(&0x50000u64.to_be_bytes());
        e[8..12].copy_from_slice(&1u32.to_be_bytes());
        e[12..14].copy_from_slice(&1u16.to_be_bytes());
        e[14..16].copy_from_slice(&2u16.to_be_bytes());
        e[32..36].copy_from_slice(&77u32.to_be_bytes());
        e.extend_from_slice(b"1ab");
        let st = storage_with(&e, 0x60000, 0x70000);
        let s = read_table(&st, &header(1, 0x60000, 5 << 20)).unwrap();
        assert_eq!(s[0].vm_state_size, 77);
        assert_eq!(s[0].disk_size, Some(5 << 20));
        assert_eq!(s[0].icount, None);
        assert_eq!(s[0].name, "ab");
    }

    /// Found by fuzzing (qcow2_parts): 65 536 tiny entries were read with two reads each.
    #[test]
    fn a_table_of_many_entries_is_read_in_windows() {
        let mut e = [0u8; 40];
        e[0..8].copy_from_slice(&0x50000u64.to_be_bytes());
        let table = e.repeat(MAX_SNAPSHOTS as usize);
        let st = storage_with(&table, 0x60000, 0x60000 + table.len());
        let h = header(MAX_SNAPSHOTS, 0x60000, 1 << 20);
        assert_eq!(read_table(&st, &h).unwrap().len(), MAX_SNAPSHOTS as usize);
        let reads = st.1.load(std::sync::atomic::Ordering::Relaxed);
        assert!(reads <= table.len() / READ_WINDOW + 2, "{reads} reads");
    }

    #[test]
    fn rejects_hostile_tables() {
        let good = encode_table(&[sample()]);
        let read = |bytes: &[u8], nb: u32, off: u64, len: usize| {
            let st = storage_with(bytes, off as usize, len);
            read_table(&st, &header(nb, off, 1 << 20))
        };
        assert!(read(&good, 1, 0x60000, 0x70000).is_ok());
        // Too many snapshots.
        assert!(read(&good, MAX_SNAPSHOTS + 1, 0x60000, 0x70000).is_err());
        // More entries than the file holds: like QEMU, the rest read as zeroes (empty
        // entries); a table beyond the maximum size is refused.
        assert_eq!(read(&good, 5000, 0x60000, 0x70000).unwrap().len(), 5000);
        assert!(read(&good, MAX_SNAPSHOTS, 0x60000, 0x70000).is_ok());
        // Unaligned table.
        assert!(read(&good, 1, 0x60008, 0x70000).is_err());
        // Table past the end of the file: one empty entry, as qemu-img info shows it.
        let st = storage_with(&[], 0, 0x10000);
        let s = read_table(&st, &header(1, 0x80000, 1 << 20)).unwrap();
        assert_eq!(
            (s[0].id.as_str(), s[0].name.as_str(), s[0].l1_size),
            ("", "", 0)
        );
        // Huge extra data.
        let mut bad = good.clone();
        bad[36..40].copy_from_slice(&0x10_0000u32.to_be_bytes());
        assert!(read(&bad, 1, 0x60000, 0x70000).is_err());
        // Name running past the end of the file: zeroes, like QEMU; the read is bounded.
        let mut bad = good.clone();
        bad[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
        assert_eq!(
            read(&bad, 1, 0x60000, 0x60100).unwrap()[0].name.len(),
            0xffff
        );
        // Unaligned or oversized snapshot L1 table.
        let mut bad = good.clone();
        bad[0..8].copy_from_slice(&0x50001u64.to_be_bytes());
        assert!(read(&bad, 1, 0x60000, 0x70000).is_err());
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(read(&bad, 1, 0x60000, 0x70000).is_err());
        // An L1 table past the end of the file is read (as zeroes) when used, not here.
        let mut far = good.clone();
        far[0..8].copy_from_slice(&0x7fff_0000u64.to_be_bytes());
        assert!(read(&far, 1, 0x60000, 0x70000).is_ok());
    }

    #[test]
    fn encode_rejects_oversized_fields() {
        let long = Snapshot {
            name: "x".repeat(70000),
            ..sample()
        };
        assert!(try_encode_table(&[long]).is_err());
        let extra = Snapshot {
            unknown_extra: vec![0; 1020],
            ..sample()
        };
        assert!(try_encode_table(&[extra]).is_err());
    }
}
