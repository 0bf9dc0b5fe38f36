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

/// A vmlinux being loaded: feed it the file from offset 0, in order, then `finish`.
pub struct ElfStream {
    loads: Vec<Segment>,
    notes: Vec<(Segment, Vec<u8>)>,
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
                PT_NOTE if s.filesz <= 1 << 20 => notes.push((s, Vec::new())),
                _ => {}
            }
        }
        if loads.is_empty() {
            return Err("ELF file has no loadable segment".into());
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
            notes,
            entry,
            pos: 0,
        })
    }

    /// Where file bytes [`off`, `off + len`) go in guest memory, when they all lie in one
    /// segment's file data (and in no note): such a chunk may be put in place by the caller
    /// and then passed over with [`ElfStream::skip`].
    pub fn direct_target(&self, off: u64, len: u64) -> Option<u64> {
        let end = off.checked_add(len)?;
        let in_note = self
            .notes
            .iter()
            .any(|(s, _)| s.offset < end && off < s.offset + s.filesz);
        if in_note {
            return None;
        }
        self.loads
            .iter()
            .find(|s| off >= s.offset && end <= s.offset + s.filesz)
            .map(|s| s.paddr + (off - s.offset))
    }

    /// The next `len` bytes of the file were put in place by the caller.
    pub fn skip(&mut self, len: u64) {
        self.pos += len;
    }

    /// The next chunk of the file; `write(paddr, bytes)` puts segment data in guest memory.
    pub fn feed(&mut self, chunk: &[u8], write: &mut WriteFn<'_>) -> Result<(), String> {
        let (start, end) = (self.pos, self.pos + chunk.len() as u64);
        let overlap = |s: &Segment| {
            let a = s.offset.max(start);
            let b = (s.offset + s.filesz).min(end);
            (a < b).then(|| ((a - start) as usize..(b - start) as usize, a - s.offset))
        };
        for s in &self.loads {
            if let Some((r, seg_off)) = overlap(s) {
                write(s.paddr + seg_off, &chunk[r])?;
            }
        }
        for (s, buf) in &mut self.notes {
            if let Some((r, _)) = overlap(s) {
                buf.extend_from_slice(&chunk[r]);
            }
        }
        self.pos = end;
        Ok(())
    }

    /// Check that every segment was complete, zero what lies beyond each segment's file
    /// data (`zero(paddr, len)`), and describe the kernel.
    pub fn finish(self, zero: &mut ZeroFn<'_>) -> Result<LoadedElf, String> {
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
        s.finish(&mut |a, n| {
            mem[a as usize..(a + n) as usize].fill(0);
            Ok(())
        })
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
