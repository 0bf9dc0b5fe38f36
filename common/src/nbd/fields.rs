//! Big-endian fields read off a received message, every read bounded by what is left.

use crate::error::{Error, Result};

/// The unread rest of one message. Each read fails, instead of panicking, when the message
/// is shorter than the field.
pub struct Fields<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Fields<'a> {
    /// The fields of `buf`, a message of kind `what` (named in errors).
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Fields { rest: buf, what }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.rest.len() {
            return Err(Error::Protocol(format!("{} is truncated", self.what)));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.bytes(2)?.try_into().unwrap()))
    }

    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.bytes(4)?.try_into().unwrap()))
    }

    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.bytes(8)?.try_into().unwrap()))
    }

    /// A string of `len` bytes: at most [`MAX_STRING`](super::consts::MAX_STRING), UTF-8,
    /// no NUL.
    pub fn string(&mut self, len: u32) -> Result<String> {
        if len > super::consts::MAX_STRING {
            return Err(Error::Protocol(format!(
                "{}: string of {len} bytes is too long",
                self.what
            )));
        }
        let raw = self.bytes(len as usize)?;
        match std::str::from_utf8(raw) {
            Ok(s) if !s.contains('\0') => Ok(s.to_string()),
            _ => Err(Error::Protocol(format!(
                "{}: string is not valid UTF-8",
                self.what
            ))),
        }
    }

    /// A string preceded by its 32-bit length.
    pub fn sized_string(&mut self) -> Result<String> {
        let len = self.u32()?;
        self.string(len)
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Fail unless every byte was read.
    pub fn finish(self) -> Result<()> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(Error::Protocol(format!(
                "{} has {} trailing bytes",
                self.what,
                self.rest.len()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_and_refuses_short_or_bad_input() {
        let mut f = Fields::new(&[0, 1, 0, 0, 0, 2, b'h', b'i', 9], "msg");
        assert_eq!(f.u16().unwrap(), 1);
        assert_eq!(f.sized_string().unwrap(), "hi");
        assert_eq!(f.remaining(), 1);
        assert!(f.u16().is_err());
        assert!(matches!(
            Fields::new(&[1], "m").finish(),
            Err(Error::Protocol(_))
        ));
        // A claimed length past the message, or past the string limit, is refused
        // without reading (or allocating) it.
        assert!(Fields::new(&[0, 0, 0, 5, b'a'], "m")
            .sized_string()
            .is_err());
        assert!(Fields::new(&[0xff, 0xff, 0xff, 0xff], "m")
            .sized_string()
            .is_err());
        assert!(Fields::new(&[0, 0, 0, 2, b'a', 0], "m")
            .sized_string()
            .is_err());
        assert!(Fields::new(&[0, 0, 0, 1, 0xff], "m")
            .sized_string()
            .is_err());
    }
}
