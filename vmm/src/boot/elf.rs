//! Loading an ELF64 vmlinux into guest memory from a stream of file chunks (so that a
//! compressed kernel can be decompressed block by block straight into place): PT_LOAD
//! segments go to their physical addresses, PT_NOTE segments are searched for the Xen PVH
//! entry (XEN_ELFNOTE_PHYS32_ENTRY).

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Puts bytes at a guest physical address.
pub type WriteFn<'a> = dyn FnMut(u64, &[u8]) -> Result<(), String> + 'a;
/// Zeroes `len` bytes at a guest physical address.
pub type ZeroFn<'a> = dyn FnMut(u64, u64) -> Result<(), String> + 'a;

#[derive(Debug, Clone, Copy)]
struct Segment {
    offset: u64,
    filesz: u64,
    vaddr: u64,
    paddr: u64,
    memsz: u64,
}

impl Segment {
    /// The part of file bytes [`start`, `end`) that holds this segment's file data.
    fn file_overlap(&self, start: u64, end: u64) -> Option<std::ops::Range<u64>> {
        let a = self.offset.max(start);
        let b = (self.offset + self.filesz).min(end);
        (a < b).then_some(a..b)
    }
}

/// What the loaded kernel looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedElf {
    /// The 64-bit entry point (physical).
    pub entry: u64,
    /// The PVH entry point (32-bit, physical), when the kernel has one.
    pub pvh_entry: Option<u32>,
    /// Lowest and end of the highest physical address the segments occupy.
    pub start: u64,
    pub end: u64,
}

/// Reads bytes at a guest physical address.
pub type ReadFn<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), String> + 'a;

/// A vmlinux being loaded: feed it the file from offset 0, in order, then `finish`.
pub struct ElfStream {
    loads: Vec<Segment>,
    /// PT_NOTE segments outside every PT_LOAD's file data, collected from fed chunks.
    notes: Vec<(Segment, Vec<u8>)>,
    /// PT_NOTE segments inside a PT_LOAD's file data: (guest address, length), read back
    /// from guest memory by `finish`.
    loaded_notes: Vec<(u64, u64)>,
    entry: u64,
    pos: u64,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Whether `data` starts with an ELF magic.
pub fn is_elf(data: &[u8]) -> bool {
    data.starts_with(b"\x7fELF")
}

/// How many bytes from the start of an ELF64 file hold its ELF and program headers (at
/// least 64), judging by the ELF header in `first`; None when `first` is no ELF64 header.
pub fn headers_len(first: &[u8]) -> Option<u64> {
    if first.len() < 64 || !is_elf(first) {
        return None;
    }
    let phoff = u64_at(first, 32);
    let table = u64::from(u16_at(first, 54)) * u64::from(u16_at(first, 56));
    phoff.checked_add(table).map(|e| e.max(64))
}

impl ElfStream {
    /// Parse the ELF and program headers, which must lie in `first` (the start of the
    /// file). Every PT_LOAD segment must fit in guest physical [`min`, `max`).
    pub fn new(first: &[u8], min: u64, max: u64) -> Result<ElfStream, String> {
        if first.len() < 64 || !is_elf(first) {
            return Err("not an ELF file".into());
        }
        if first[4] != 2 || first[5] != 1 || u16_at(first, 18) != 62 {
            return Err("not a little-endian x86_64 ELF64 file".into());
        }
        let entry = u64_at(first, 24);
        let phoff = u64_at(first, 32);
        let phentsize = u16_at(first, 54) as u64;
        let phnum = u16_at(first, 56) as u64;
        if phentsize < 56 || phnum == 0 {
            return Err("ELF file has no usable program headers".into());
        }
        let ph_end = phoff
            .checked_add(phentsize * phnum)
            .filter(|&e| e <= first.len() as u64)
            .ok_or("ELF program headers out of range")?;
        let _ = ph_end;
        let mut loads = Vec::new();
        let mut notes = Vec::new();
        for i in 0..phnum {
            let p = (phoff + i * phentsize) as usize;
            let ty = u32_at(first, p);
            let s = Segment {
                offset: u64_at(first, p + 8),
                vaddr: u64_at(first, p + 16),
                paddr: u64_at(first, p + 24),
                filesz: u64_at(first, p + 32),
                memsz: u64_at(first, p + 40),
            };
            if s.offset.checked_add(s.filesz).is_none() {
                return Err(format!("ELF segment {i} has a bad file range"));
            }
            match ty {
                PT_LOAD => {
                    if s.filesz > s.memsz {
                        return Err(format!("ELF segment {i}: file size above memory size"));
                    }
                    let end = s.paddr.checked_add(s.memsz);
                    if s.paddr < min || end.is_none_or(|e| e > max) {
                        return Err(format!(
                            "ELF segment {i} at {:#x}+{:#x} does not fit in guest memory \
                             [{min:#x}, {max:#x})",
                            s.paddr, s.memsz
                        ));
                    }
                    loads.push(s);
                }
                PT_NOTE if s.filesz <= 1 << 20 => notes.push(s),
                _ => {}
            }
        }
        if loads.is_empty() {
            return Err("ELF file has no loadable segment".into());
        }
        let mut loaded_notes = Vec::new();
        let mut fed_notes = Vec::new();
        for n in notes {
            let inside = loads
                .iter()
                .find(|l| n.offset >= l.offset && n.offset + n.filesz <= l.offset + l.filesz);
            match inside {
                Some(l) => loaded_notes.push((l.paddr + (n.offset - l.offset), n.filesz)),
                None => fed_notes.push((n, Vec::new())),
            }
        }
        for (i, a) in loads.iter().enumerate() {
            for b in &loads[i + 1..] {
                if a.paddr < b.paddr + b.memsz && b.paddr < a.paddr + a.memsz {
                    return Err("ELF segments overlap in physical memory".into());
                }
            }
        }
        Ok(ElfStream {
            loads,
            notes: fed_notes,
            loaded_notes,
            entry,
            pos: 0,
        })
    }

    /// For each file range (offset, length), where it may be put in guest memory as one
    /// piece, so that a caller can decompress it straight into place and then pass over it
    /// with [`ElfStream::skip`]; None where it must go through [`ElfStream::feed`].
    ///
    /// A range qualifies when every PT_LOAD segment it touches maps file offsets to guest
    /// addresses with the same displacement, no fed note lies in it, and its guest image
    /// (file padding between those segments included) stays between the lowest and the
    /// highest segment, clear of segments placed differently and of the other ranges'
    /// images. The padding thus lands inside the memory the kernel reserves for itself.
    pub fn direct_targets(&self, ranges: &[(u64, u64)]) -> Vec<Option<u64>> {
        let lo = self.loads.iter().map(|s| s.paddr).min().unwrap_or(0);
        let hi = self
            .loads
            .iter()
            .map(|s| s.paddr + s.memsz)
            .max()
            .unwrap_or(0);
        let mut taken: Vec<(u64, u64)> = Vec::new();
        let overlaps = |a: u64, b: u64, c: u64, d: u64| a < d && c < b;
        ranges
            .iter()
            .map(|&(off, len)| {
                let end = off.checked_add(len)?;
                let touched: Vec<&Segment> = self
                    .loads
                    .iter()
                    .filter(|s| s.file_overlap(off, end).is_some())
                    .collect();
                let first = touched.first()?;
                let shift = |s: &Segment| s.paddr as i128 - s.offset as i128;
                if touched.iter().any(|s| shift(s) != shift(first)) {
                    return None;
                }
                let in_note = self
                    .notes
                    .iter()
                    .any(|(s, _)| s.file_overlap(off, end).is_some());
                let start = u64::try_from(off as i128 + shift(first)).ok()?;
                let stop = start.checked_add(len)?;
                let clash = self.loads.iter().any(|s| {
                    shift(s) != shift(first) && overlaps(start, stop, s.paddr, s.paddr + s.memsz)
                }) || taken.iter().any(|&(a, b)| overlaps(start, stop, a, b));
                if in_note || clash || start < lo || stop > hi {
                    return None;
                }
                taken.push((start, stop));
                Some(start)
            })
            .collect()
    }

    /// Put the segment data of file bytes `chunk` (at file offset `off`) in guest memory
    /// with `write(paddr, bytes)`; notes are not collected (see [`ElfStream::feed`]).
    pub fn place(&self, off: u64, chunk: &[u8], write: &mut WriteFn<'_>) -> Result<(), String> {
        let end = off + chunk.len() as u64;
        for s in &self.loads {
            if let Some(r) = s.file_overlap(off, end) {
                let bytes = &chunk[(r.start - off) as usize..(r.end - off) as usize];
                write(s.paddr + (r.start - s.offset), bytes)?;
            }
        }
        Ok(())
    }

    /// Whether file bytes [`off`, `off + len`) hold part of a note that only
    /// [`ElfStream::feed`] collects.
    pub fn needs_feed(&self, off: u64, len: u64) -> bool {
        self.notes
            .iter()
            .any(|(s, _)| s.file_overlap(off, off + len).is_some())
    }

    /// The next `len` bytes of the file were put in place by the caller.
    pub fn skip(&mut self, len: u64) {
        self.pos += len;
    }

    /// The next chunk of the file; `write(paddr, bytes)` puts segment data in guest memory.
    pub fn feed(&mut self, chunk: &[u8], write: &mut WriteFn<'_>) -> Result<(), String> {
        let (start, end) = (self.pos, self.pos + chunk.len() as u64);
        self.place(start, chunk, write)?;
        for (s, buf) in &mut self.notes {
            if let Some(r) = s.file_overlap(start, end) {
                buf.extend_from_slice(&chunk[(r.start - start) as usize..(r.end - start) as usize]);
            }
        }
        self.pos = end;
        Ok(())
    }

    /// Check that every segment was complete, zero what lies beyond each segment's file
    /// data (`zero(paddr, len)`), and describe the kernel (notes inside loaded segments
    /// are read back with `read(paddr, buf)`).
    pub fn finish(self, zero: &mut ZeroFn<'_>, read: &mut ReadFn<'_>) -> Result<LoadedElf, String> {
        for s in self.loads.iter().chain(self.notes.iter().map(|(s, _)| s)) {
            if s.offset + s.filesz > self.pos {
                return Err(format!(
                    "ELF file is truncated ({} bytes, a segment ends at {})",
                    self.pos,
                    s.offset + s.filesz
                ));
            }
        }
        for s in &self.loads {
            if s.memsz > s.filesz {
                zero(s.paddr + s.filesz, s.memsz - s.filesz)?;
            }
        }
        let start = self.loads.iter().map(|s| s.paddr).min().unwrap();
        let end = self.loads.iter().map(|s| s.paddr + s.memsz).max().unwrap();
        let in_phys = |a: u64| {
            self.loads
                .iter()
                .any(|s| a >= s.paddr && a - s.paddr < s.memsz)
        };
        let entry = if in_phys(self.entry) {
            self.entry
        } else {
            self.loads
                .iter()
                .find(|s| self.entry >= s.vaddr && self.entry - s.vaddr < s.memsz)
                .map(|s| s.paddr + (self.entry - s.vaddr))
                .ok_or_else(|| format!("ELF entry point {:#x} is in no segment", self.entry))?
        };
        let mut pvh_entry = None;
        for (_, n) in &self.notes {
            pvh_entry = pvh_entry.or(find_pvh_note(n)?);
        }
        for &(paddr, len) in &self.loaded_notes {
            let mut n = vec![0u8; len as usize];
            read(paddr, &mut n)?;
            pvh_entry = pvh_entry.or(find_pvh_note(&n)?);
        }
        Ok(LoadedElf {
            entry,
            pvh_entry,
            start,
            end,
        })
    }
}

/// XEN_ELFNOTE_PHYS32_ENTRY in a note segment.
fn find_pvh_note(mut n: &[u8]) -> Result<Option<u32>, String> {
    while n.len() >= 12 {
        let namesz = u32_at(n, 0) as usize;
        let descsz = u32_at(n, 4) as usize;
        let ty = u32_at(n, 8);
        let name_end = 12 + namesz.next_multiple_of(4);
        let desc_end = name_end.checked_add(descsz.next_multiple_of(4));
        let Some(desc_end) = desc_end.filter(|&e| e <= n.len() && name_end <= n.len()) else {
            return Err("ELF note segment is malformed".into());
        };
        if &n[12..12 + namesz] == b"Xen\0" && ty == XEN_ELFNOTE_PHYS32_ENTRY {
            let d = &n[name_end..name_end + descsz];
            let v = match descsz {
                4 => u32_at(d, 0) as u64,
                8 => u64_at(d, 0),
                _ => return Err("PVH entry note has a bad size".into()),
            };
            return u32::try_from(v)
                .map(Some)
                .map_err(|_| format!("PVH entry {v:#x} is above 4 GiB"));
        }
        n = &n[desc_end..];
    }
    Ok(None)
}

/// A minimal vmlinux-like ELF (tests): one PT_LOAD at `paddr` holding `payload`, with
/// `bss` zero bytes after it, and optionally a PVH note.
#[cfg(test)]
pub fn build_test_elf(paddr: u64, payload: &[u8], bss: u64, pvh: Option<u32>) -> Vec<u8> {
    let phnum = 2u16;
    let data_off = 0x1000u64;
    let mut note = Vec::new();
    if let Some(e) = pvh {
        // An unrelated note first, then the PVH entry (8-byte descriptor, as Linux has).
        for (name, ty, desc) in [
            (&b"Xen\0"[..], 6u32, &b"linux\0\0\0"[..]),
            (
                &b"Xen\0"[..],
                XEN_ELFNOTE_PHYS32_ENTRY,
                &(e as u64).to_le_bytes()[..],
            ),
        ] {
            note.extend_from_slice(&(name.len() as u32).to_le_bytes());
            note.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            note.extend_from_slice(&ty.to_le_bytes());
            note.extend_from_slice(name);
            note.extend_from_slice(desc);
        }
    }
    let note_off = data_off + payload.len() as u64;
    let mut f = vec![0u8; 64];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&62u16.to_le_bytes());
    f[24..32].copy_from_slice(&paddr.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&phnum.to_le_bytes());
    let ph = |ty: u32, off: u64, vaddr: u64, paddr: u64, filesz: u64, memsz: u64| {
        let mut p = Vec::new();
        p.extend_from_slice(&ty.to_le_bytes());
        p.extend_from_slice(&7u32.to_le_bytes());
        for v in [off, vaddr, paddr, filesz, memsz, 0x1000] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        p
    };
    let len = payload.len() as u64;
    f.extend(ph(
        PT_LOAD,
        data_off,
        0xffff_ffff_8000_0000 + paddr,
        paddr,
        len,
        len + bss,
    ));
    let nl = note.len() as u64;
    f.extend(ph(PT_NOTE, note_off, 0, paddr + len, nl, nl));
    f.resize(data_off as usize, 0);
    f.extend_from_slice(payload);
    f.extend_from_slice(&note);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(elf: &[u8], chunk: usize, mem: &mut [u8]) -> Result<LoadedElf, String> {
        let mut s = ElfStream::new(&elf[..chunk.min(elf.len())], 0x1000, mem.len() as u64)?;
        let mut write = |a: u64, b: &[u8]| {
            mem[a as usize..a as usize + b.len()].copy_from_slice(b);
            Ok(())
        };
        for c in elf.chunks(chunk) {
            s.feed(c, &mut write)?;
        }
        let mem = std::cell::RefCell::new(mem);
        s.finish(
            &mut |a, n| {
                mem.borrow_mut()[a as usize..(a + n) as usize].fill(0);
                Ok(())
            },
            &mut |a, b| {
                b.copy_from_slice(&mem.borrow()[a as usize..a as usize + b.len()]);
                Ok(())
            },
        )
    }

    #[test]
    fn loads_segments_in_any_chunking_and_finds_pvh() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let elf = build_test_elf(0x10_0000, &payload, 0x800, Some(0x10_0040));
        for chunk in [0x1000, 0x1003, 4096 * 3 + 1, elf.len()] {
            let mut mem = vec![0xeeu8; 0x20_0000];
            let l = load(&elf, chunk, &mut mem).unwrap();
            assert_eq!(
                l,
                LoadedElf {
                    entry: 0x10_0000,
                    pvh_entry: Some(0x10_0040),
                    start: 0x10_0000,
                    end: 0x10_0000 + payload.len() as u64 + 0x800,
                }
            );
            assert_eq!(&mem[0x10_0000..0x10_0000 + payload.len()], &payload[..]);
            let bss = 0x10_0000 + payload.len();
            assert!(mem[bss..bss + 0x800].iter().all(|&b| b == 0));
            assert_eq!(mem[bss + 0x800], 0xee);
        }
        let elf = build_test_elf(0x10_0000, &payload, 0, None);
        let mut mem = vec![0u8; 0x20_0000];
        assert_eq!(load(&elf, 0x1000, &mut mem).unwrap().pvh_entry, None);
    }

    /// An ELF with three PT_LOADs, laid out like vmlinux: two sharing one file-to-memory
    /// displacement with padding between them, one placed differently, and the PVH note
    /// inside the first segment's file data.
    fn three_segment_elf() -> Vec<u8> {
        // (file offset, paddr, size)
        let segs = [
            (0x1000u64, 0x10_0000u64, 0x2000u64),
            (0x4000, 0x10_3000, 0x1000),
            (0x5000, 0x20_0000, 0x800),
        ];
        let mut f = vec![0u8; 0x5800];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&4u16.to_le_bytes());
        let note_off = 0x1800u64;
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&0x10_0100u32.to_le_bytes());
        let mut phs = Vec::new();
        for &(off, pa, n) in &segs {
            phs.push((PT_LOAD, off, pa, n));
        }
        phs.push((PT_NOTE, note_off, 0x10_0800, note.len() as u64));
        for (i, &(ty, off, pa, n)) in phs.iter().enumerate() {
            let p = 64 + i * 56;
            f[p..p + 4].copy_from_slice(&ty.to_le_bytes());
            for (j, v) in [off, pa, pa, n, n].iter().enumerate() {
                f[p + 8 + j * 8..p + 16 + j * 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        for &(off, _, n) in &segs {
            for (k, b) in f[off as usize..(off + n) as usize].iter_mut().enumerate() {
                *b = (k % 253) as u8 + 1;
            }
        }
        f[note_off as usize..note_off as usize + note.len()].copy_from_slice(&note);
        f
    }

    #[test]
    fn direct_targets_follow_the_segment_layout() {
        let elf = three_segment_elf();
        let s = ElfStream::new(&elf, 0x1000, 0x40_0000).unwrap();
        let t = s.direct_targets(&[
            (0x1000, 0x3800), // both same-displacement segments and the padding between
            (0x4800, 0x1000), // spans two displacements
            (0x5000, 0x800),  // the third segment alone
            (0x0, 0x800),     // headers only: no segment
        ]);
        assert_eq!(t, vec![Some(0x10_0000), None, Some(0x20_0000), None]);
        // Overlapping images are handed out once; images stay within the kernel's memory
        // (headers before the first segment, padding past the last one go through `feed`).
        assert_eq!(
            s.direct_targets(&[(0x1000, 0x1000), (0x1800, 0x800)]),
            vec![Some(0x10_0000), None]
        );
        assert_eq!(
            s.direct_targets(&[(0x5000, 0x1000), (0x800, 0x1000)]),
            vec![None, None]
        );
        // Loading through `place` + `skip` equals feeding, and the note is read back.
        let mut a = vec![0u8; 0x40_0000];
        let la = load(&elf, 0x1000, &mut a).unwrap();
        assert_eq!(la.pvh_entry, Some(0x10_0100));
        let mut b = vec![0u8; 0x40_0000];
        let mut s = ElfStream::new(&elf, 0x1000, 0x40_0000).unwrap();
        s.place(0, &elf, &mut |pa, d| {
            b[pa as usize..pa as usize + d.len()].copy_from_slice(d);
            Ok(())
        })
        .unwrap();
        assert!(
            !s.needs_feed(0, elf.len() as u64),
            "the note is inside a PT_LOAD"
        );
        s.skip(elf.len() as u64);
        let b = std::cell::RefCell::new(b);
        let lb = s
            .finish(&mut |_, _| Ok(()), &mut |pa, d| {
                d.copy_from_slice(&b.borrow()[pa as usize..pa as usize + d.len()]);
                Ok(())
            })
            .unwrap();
        assert_eq!(la, lb);
        assert!(a == *b.borrow());
    }

    #[test]
    fn rejects_bad_files() {
        let payload = vec![1u8; 5000];
        let elf = build_test_elf(0x10_0000, &payload, 0, Some(0x10_0000));
        let mut mem = vec![0u8; 0x20_0000];
        // Truncated.
        assert!(load(&elf[..elf.len() - 10], 0x1000, &mut mem)
            .unwrap_err()
            .contains("truncated"));
        // Does not fit in memory.
        let mut small = vec![0u8; 0x10_0800];
        assert!(load(&elf, 0x1000, &mut small)
            .unwrap_err()
            .contains("does not fit"));
        // Below the allowed minimum.
        let low = build_test_elf(0x800, &payload, 0, None);
        assert!(load(&low, 0x1000, &mut mem).is_err());
        // Not ELF / wrong machine.
        assert!(ElfStream::new(&[0u8; 64], 0, u64::MAX).is_err());
        let mut m = elf.clone();
        m[18] = 3;
        assert!(ElfStream::new(&m, 0, u64::MAX).is_err());
        // Program headers beyond the first chunk.
        assert!(ElfStream::new(&elf[..100], 0, u64::MAX).is_err());
    }
}
