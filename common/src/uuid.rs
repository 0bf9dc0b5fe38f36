//! Random (version 4) UUIDs for the headers of formats that carry one (VHD, VDI).

use std::io::Read;

/// A new random UUID in RFC 4122 byte order, version 4, variant 1.
pub fn random_v4() -> crate::Result<[u8; 16]> {
    let mut u = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut u))
        .map_err(|e| crate::Error::io("Could not generate a UUID", e))?;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    Ok(u)
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_and_variant_bits() {
        let a = super::random_v4().unwrap();
        let b = super::random_v4().unwrap();
        assert_ne!(a, b);
        assert_eq!(a[6] >> 4, 4);
        assert_eq!(a[8] >> 6, 2);
    }
}
