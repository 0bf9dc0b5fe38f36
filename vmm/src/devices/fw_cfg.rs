//! QEMU's firmware configuration device (fw_cfg), the I/O-port interface: a 16-bit selector
//! at 0x510 picks an item, reads of the data port at 0x511 return its bytes one after the
//! other. Items are the legacy numbered keys plus named files listed in the file directory
//! (key 0x19). No DMA interface (the ID item says so), and writes to items are ignored.

use std::collections::BTreeMap;

use crate::bus::BusDevice;

/// First I/O port: the selector; the data port follows.
pub const FW_CFG_PORT: u64 = 0x510;
pub const FW_CFG_LEN: u64 = 2;

pub const KEY_SIGNATURE: u16 = 0x00;
pub const KEY_ID: u16 = 0x01;
pub const KEY_NOGRAPHIC: u16 = 0x04;
pub const KEY_NB_CPUS: u16 = 0x05;
pub const KEY_BOOT_MENU: u16 = 0x0e;
pub const KEY_MAX_CPUS: u16 = 0x0f;
pub const KEY_FILE_DIR: u16 = 0x19;
pub const KEY_IRQ0_OVERRIDE: u16 = 0x8002;
/// Keys of named files start here.
const KEY_FILE_FIRST: u16 = 0x20;
/// Room for a file name in a directory entry, terminating NUL included.
const FILE_NAME_LEN: usize = 56;
/// QEMU's limit on the number of files.
const MAX_FILES: usize = 0x1000 - KEY_FILE_FIRST as usize;

/// Why a file could not be added.
#[derive(Debug, PartialEq, Eq)]
pub enum FwCfgError {
    NameTooLong(String),
    Duplicate(String),
    TooManyFiles,
    TooLarge(String),
}

impl std::fmt::Display for FwCfgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FwCfgError::NameTooLong(n) => write!(f, "fw_cfg file name '{n}' is too long"),
            FwCfgError::Duplicate(n) => write!(f, "fw_cfg file '{n}' given twice"),
            FwCfgError::TooManyFiles => write!(f, "too many fw_cfg files"),
            FwCfgError::TooLarge(n) => write!(f, "fw_cfg file '{n}' is larger than 4 GiB"),
        }
    }
}

/// The device: items by key, the names of the files, and the read cursor.
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    files: Vec<String>,
    selected: u16,
    offset: usize,
}

impl Default for FwCfg {
    fn default() -> Self {
        Self::new()
    }
}

impl FwCfg {
    /// The signature, the ID (traditional interface only) and an empty file directory.
    pub fn new() -> Self {
        let mut d = FwCfg {
            items: BTreeMap::new(),
            files: Vec::new(),
            selected: KEY_SIGNATURE,
            offset: 0,
        };
        d.items.insert(KEY_SIGNATURE, b"QEMU".to_vec());
        d.items.insert(KEY_ID, 1u32.to_le_bytes().to_vec());
        d.items.insert(KEY_FILE_DIR, 0u32.to_be_bytes().to_vec());
        d
    }

    /// Set the legacy item `key` (not one of the file keys).
    pub fn add_item(&mut self, key: u16, data: Vec<u8>) {
        debug_assert!(!(KEY_FILE_FIRST..0x8000).contains(&key));
        self.items.insert(key, data);
    }

    /// Add the named file, listed in the directory; files get consecutive keys.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<(), FwCfgError> {
        if name.len() >= FILE_NAME_LEN {
            return Err(FwCfgError::NameTooLong(name.into()));
        }
        if self.files.iter().any(|f| f == name) {
            return Err(FwCfgError::Duplicate(name.into()));
        }
        if self.files.len() >= MAX_FILES {
            return Err(FwCfgError::TooManyFiles);
        }
        if u32::try_from(data.len()).is_err() {
            return Err(FwCfgError::TooLarge(name.into()));
        }
        let key = KEY_FILE_FIRST + self.files.len() as u16;
        self.items.insert(key, data);
        self.files.push(name.into());
        self.rebuild_directory();
        Ok(())
    }

    /// Directory: a big-endian count, then per file a big-endian size and key, two
    /// reserved bytes and the NUL-padded name.
    fn rebuild_directory(&mut self) {
        let mut dir = (self.files.len() as u32).to_be_bytes().to_vec();
        for (i, name) in self.files.iter().enumerate() {
            let key = KEY_FILE_FIRST + i as u16;
            dir.extend_from_slice(&(self.items[&key].len() as u32).to_be_bytes());
            dir.extend_from_slice(&key.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut n = [0u8; FILE_NAME_LEN];
            n[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&n);
        }
        self.items.insert(KEY_FILE_DIR, dir);
    }

    fn select(&mut self, key: u16) {
        self.selected = key;
        self.offset = 0;
    }

    /// The next byte of the selected item; 0 past its end or for a key with no item.
    fn next_byte(&mut self) -> u8 {
        let b = self
            .items
            .get(&self.selected)
            .and_then(|d| d.get(self.offset).copied());
        if b.is_some() {
            self.offset += 1;
        }
        b.unwrap_or(0)
    }
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 1 {
            for b in data.iter_mut() {
                *b = self.next_byte();
            }
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            match *data {
                [lo, hi] => self.select(u16::from_le_bytes([lo, hi])),
                [lo] => self.select(lo as u16),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_item(d: &mut FwCfg, key: u16, len: usize) -> Vec<u8> {
        d.write(0, &key.to_le_bytes());
        let mut v = vec![0u8; len];
        for b in v.iter_mut() {
            let mut x = [0u8];
            d.read(1, &mut x);
            *b = x[0];
        }
        v
    }

    #[test]
    fn signature_and_id() {
        let mut d = FwCfg::new();
        assert_eq!(read_item(&mut d, KEY_SIGNATURE, 4), b"QEMU");
        // Traditional interface (bit 0), no DMA (bit 1).
        assert_eq!(read_item(&mut d, KEY_ID, 4), [1, 0, 0, 0]);
        // Reading past the end, or an absent key, gives zeros.
        assert_eq!(read_item(&mut d, KEY_SIGNATURE, 6), b"QEMU\0\0");
        assert_eq!(read_item(&mut d, KEY_BOOT_MENU, 2), [0, 0]);
    }

    #[test]
    fn file_directory() {
        let mut d = FwCfg::new();
        d.add_file("etc/sercon-port", 0x3f8u16.to_le_bytes().to_vec())
            .unwrap();
        d.add_file("bootorder", b"/pci@i0cf8/*@1\n".to_vec())
            .unwrap();
        assert_eq!(
            d.add_file("bootorder", vec![]),
            Err(FwCfgError::Duplicate("bootorder".into()))
        );
        assert!(matches!(
            d.add_file(&"x".repeat(56), vec![]),
            Err(FwCfgError::NameTooLong(_))
        ));
        let dir = read_item(&mut d, KEY_FILE_DIR, 4 + 2 * 64);
        assert_eq!(u32::from_be_bytes(dir[..4].try_into().unwrap()), 2);
        let e = &dir[4 + 64..4 + 128];
        let size = u32::from_be_bytes(e[..4].try_into().unwrap());
        let key = u16::from_be_bytes(e[4..6].try_into().unwrap());
        assert_eq!(size, 15);
        assert_eq!(&e[8..17], b"bootorder");
        assert!(e[17..].iter().all(|&b| b == 0));
        assert_eq!(read_item(&mut d, key, 15), b"/pci@i0cf8/*@1\n");
        let first = u16::from_be_bytes(dir[8..10].try_into().unwrap());
        assert_eq!(read_item(&mut d, first, 2), [0xf8, 0x03]);
    }

    #[test]
    fn string_reads_and_reselect() {
        let mut d = FwCfg::new();
        d.add_item(KEY_NB_CPUS, 3u16.to_le_bytes().to_vec());
        d.write(0, &KEY_SIGNATURE.to_le_bytes());
        // A wider read returns consecutive bytes.
        let mut two = [0u8; 2];
        d.read(1, &mut two);
        assert_eq!(&two, b"QE");
        // Selecting again restarts at offset 0.
        d.write(0, &KEY_NB_CPUS.to_le_bytes());
        d.read(1, &mut two);
        assert_eq!(two, [3, 0]);
        // Writes to the data port change nothing.
        d.write(1, &[9]);
        d.write(0, &KEY_NB_CPUS.to_le_bytes());
        d.read(1, &mut two);
        assert_eq!(two, [3, 0]);
    }
}
