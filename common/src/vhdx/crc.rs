//! CRC-32C (Castagnoli), the checksum of VHDX headers, region tables and log entries.

/// The reflected Castagnoli polynomial.
const POLY: u32 = 0x82f6_3b78;

const TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// A running CRC-32C.
#[derive(Debug, Clone, Copy)]
pub struct Crc(u32);

impl Default for Crc {
    fn default() -> Crc {
        Crc(0xffff_ffff)
    }
}

impl Crc {
    /// Add `data`.
    pub fn update(&mut self, data: &[u8]) {
        let mut c = self.0;
        for &b in data {
            c = TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
        }
        self.0 = c;
    }

    /// Add `data` with its 4 bytes at `at` read as zeroes (where its own checksum lies).
    pub fn update_skipping(&mut self, data: &[u8], at: usize) {
        self.update(&data[..at]);
        self.update(&[0; 4]);
        self.update(&data[at + 4..]);
    }

    pub fn value(self) -> u32 {
        !self.0
    }
}

/// The checksum of `data` whose checksum field (4 bytes at `at`) counts as zero.
pub fn checksum(data: &[u8], at: usize) -> u32 {
    let mut c = Crc::default();
    c.update_skipping(data, at);
    c.value()
}

/// Whether the little-endian checksum stored at `at` of `data` is right.
pub fn is_valid(data: &[u8], at: usize) -> bool {
    checksum(data, at) == u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"))
}

/// Store the checksum of `data` at `at`.
pub fn seal(data: &mut [u8], at: usize) {
    let c = checksum(data, at);
    data[at..at + 4].copy_from_slice(&c.to_le_bytes());
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_value() {
        // The standard CRC-32C check value.
        let mut c = super::Crc::default();
        c.update(b"123456789");
        assert_eq!(c.value(), 0xe306_9283);
    }

    #[test]
    fn seal_then_valid() {
        let mut b = vec![7u8; 100];
        super::seal(&mut b, 4);
        assert!(super::is_valid(&b, 4));
        b[50] ^= 1;
        assert!(!super::is_valid(&b, 4));
    }
}
