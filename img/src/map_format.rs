//! `img map` output: qemu-img's map entries, when two of them merge, and their human and
//! JSON forms, written as they come so that memory does not grow with the image.

use std::io::{self, Write};

use crate::info::OutputFormat;

/// One extent as qemu-img's `MapEntry` describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: u32,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    /// Host offset in the file of the layer at `depth`, when known.
    pub offset: Option<u64>,
    /// That layer's file name (only with an offset).
    pub filename: Option<String>,
}

impl MapEntry {
    /// qemu-img's `entry_mergeable`: `next` extends `self` without changing what it says.
    fn mergeable(&self, next: &MapEntry) -> bool {
        if self.length == 0 {
            return false;
        }
        let same = self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.depth == next.depth
            && self.present == next.present
            && self.filename == next.filename;
        same && match (self.offset, next.offset) {
            (None, None) => true,
            (Some(a), Some(b)) => a + self.length == b,
            _ => false,
        }
    }
}

/// Why the human form cannot show an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoOffset;

impl std::fmt::Display for NoOffset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("File contains external, encrypted or compressed clusters.")
    }
}

/// A rendering failure: the output could not be written, or the human form cannot show
/// an extent.
#[derive(Debug)]
pub enum DumpError {
    Io(io::Error),
    NoOffset(NoOffset),
}

impl From<io::Error> for DumpError {
    fn from(e: io::Error) -> Self {
        DumpError::Io(e)
    }
}

/// Merges entries and writes each finished one, as qemu-img's map loop does.
pub struct Dumper<W: Write> {
    out: W,
    format: OutputFormat,
    curr: MapEntry,
}

impl<W: Write> Dumper<W> {
    /// Start the output (the table head, or `[`); the first entry is the empty one at
    /// `start`, which qemu-img prints alone when nothing follows.
    pub fn new(mut out: W, format: OutputFormat, start: u64) -> io::Result<Self> {
        match format {
            OutputFormat::Human => writeln!(
                out,
                "{:<16}{:<16}{:<16}File",
                "Offset", "Length", "Mapped to"
            )?,
            OutputFormat::Json => write!(out, "[")?,
        }
        Ok(Dumper {
            out,
            format,
            curr: MapEntry {
                start,
                ..MapEntry::default()
            },
        })
    }

    /// Where the next entry starts.
    pub fn end(&self) -> u64 {
        self.curr.start + self.curr.length
    }

    /// Add the entry that starts at [`Dumper::end`].
    pub fn push(&mut self, next: MapEntry) -> Result<(), DumpError> {
        if self.curr.mergeable(&next) {
            self.curr.length += next.length;
            return Ok(());
        }
        let mut next = next;
        if self.curr.length > 0 {
            self.dump(Some(&mut next))?;
        }
        self.curr = next;
        Ok(())
    }

    /// Write the last entry and close the output.
    pub fn finish(mut self) -> Result<(), DumpError> {
        self.dump(None)?;
        if self.format == OutputFormat::Json {
            writeln!(self.out, "]")?;
        }
        self.out.flush()?;
        Ok(())
    }

    /// qemu-img's `dump_map_entry` of the current entry; the human form also relabels
    /// `next` so that zero and unallocated extents merge.
    fn dump(&mut self, next: Option<&mut MapEntry>) -> Result<(), DumpError> {
        let e = &self.curr;
        match self.format {
            OutputFormat::Human => {
                if e.data && e.offset.is_none() {
                    self.out.flush()?;
                    return Err(DumpError::NoOffset(NoOffset));
                }
                if e.data && !e.zero {
                    writeln!(
                        self.out,
                        "{:<16}{:<16}{:<16}{}",
                        hex(e.start),
                        hex(e.length),
                        hex(e.offset.unwrap_or(0)),
                        e.filename.as_deref().unwrap_or("")
                    )?;
                }
                if let Some(n) = next {
                    if !n.data || n.zero {
                        n.data = false;
                        n.zero = true;
                    }
                }
            }
            OutputFormat::Json => {
                write!(self.out, "{}", json_entry(e))?;
                if next.is_some() {
                    writeln!(self.out, ",")?;
                }
            }
        }
        Ok(())
    }
}

/// C's `%#x`: `0` for zero, `0x...` otherwise.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}

/// One entry of `--output=json`, in qemu-img's key order.
fn json_entry(e: &MapEntry) -> String {
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    );
    if let Some(o) = e.offset {
        s.push_str(&format!(", \"offset\": {o}"));
    }
    s.push('}');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(start: u64, length: u64, offset: u64) -> MapEntry {
        MapEntry {
            start,
            length,
            present: true,
            data: true,
            offset: Some(offset),
            filename: Some("a".into()),
            ..MapEntry::default()
        }
    }

    fn render(format: OutputFormat, entries: Vec<MapEntry>) -> (String, bool) {
        let mut out = Vec::new();
        let mut d = Dumper::new(&mut out, format, 0).unwrap();
        let mut ok = true;
        for e in entries {
            if d.push(e).is_err() {
                ok = false;
                break;
            }
        }
        if ok {
            ok = d.finish().is_ok();
        }
        (String::from_utf8(out).unwrap(), ok)
    }

    #[test]
    fn merges_contiguous_data_only() {
        let (s, ok) = render(
            OutputFormat::Json,
            vec![data(0, 512, 4096), data(512, 512, 4608), data(1024, 512, 0)],
        );
        assert!(ok);
        assert_eq!(
            s,
            "[{ \"start\": 0, \"length\": 1024, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 4096},\n\
             { \"start\": 1024, \"length\": 512, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 0}]\n"
        );
    }

    #[test]
    fn human_table_and_compressed_error() {
        let zero = MapEntry {
            start: 0x10000,
            length: 0x10000,
            present: true,
            zero: true,
            ..MapEntry::default()
        };
        let (s, ok) = render(OutputFormat::Human, vec![data(0, 0x10000, 0x50000), zero]);
        assert!(ok);
        assert_eq!(
            s,
            "Offset          Length          Mapped to       File\n0               0x10000         0x50000         a\n"
        );
        let compressed = MapEntry {
            compressed: true,
            offset: None,
            filename: None,
            ..data(0x10000, 0x10000, 0)
        };
        let (_, ok) = render(
            OutputFormat::Human,
            vec![data(0, 0x10000, 0x50000), compressed],
        );
        assert!(!ok, "compressed data has no offset for the table");
    }

    #[test]
    fn empty_range_prints_one_empty_entry() {
        let (s, _) = render(OutputFormat::Json, vec![]);
        assert_eq!(s, "[{ \"start\": 0, \"length\": 0, \"depth\": 0, \"present\": false, \"zero\": false, \"data\": false, \"compressed\": false}]\n");
    }
}
