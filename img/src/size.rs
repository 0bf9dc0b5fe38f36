//! Sizes as qemu-img reads and prints them.
//!
//! [`parse_size`] follows QEMU's `qemu_strtosz`: a decimal integer (or `0x` hex without
//! fraction or suffix), an optional decimal fraction, and an optional one-letter binary
//! suffix (`b`/`B` bytes, `k`/`K` KiB, `M`, `G`, `T`, `P`, `E`). A fraction needs a suffix
//! other than bytes. [`size_to_str`] is QEMU's `size_to_str` (`1 GiB`, `1.5 MiB`, `196 KiB`).

/// Why a size string was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// Not a size at all (`-EINVAL`).
    Invalid,
    /// A size, but negative or beyond 2^64 - 1 (`-ERANGE`).
    Range,
}

fn is_c_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

/// Multiplier of a suffix letter, with 1024 as the unit.
fn suffix_mul(c: Option<u8>) -> Option<u64> {
    let shift = match c?.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        b'P' => 50,
        b'E' => 60,
        _ => return None,
    };
    Some(1u64 << shift)
}

/// Result of C `strtoull` on a byte string: value, end index, overflow, negative sign seen.
struct Strtoull {
    value: u64,
    end: usize,
    overflow: bool,
    negative: bool,
}

/// C `strtoull` for base 0 (prefix decides), 10 or 16 (with optional `0x` prefix).
fn strtoull(s: &[u8], base: u32) -> Strtoull {
    let mut i = 0;
    while i < s.len() && is_c_space(s[i]) {
        i += 1;
    }
    let mut negative = false;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        negative = s[i] == b'-';
        i += 1;
    }
    let mut base = base;
    if base == 0 {
        base = if s.get(i) == Some(&b'0') {
            if s.get(i + 1).is_some_and(|c| c | 0x20 == b'x')
                && s.get(i + 2).is_some_and(|c| c.is_ascii_hexdigit())
            {
                16
            } else {
                8
            }
        } else {
            10
        };
    }
    if base == 16
        && i + 1 < s.len()
        && s[i] == b'0'
        && (s[i + 1] | 0x20) == b'x'
        && s.get(i + 2).is_some_and(|c| c.is_ascii_hexdigit())
    {
        i += 2;
    }
    let start = i;
    let mut value: u64 = 0;
    let mut overflow = false;
    while i < s.len() {
        let Some(d) = (s[i] as char).to_digit(base) else {
            break;
        };
        match value
            .checked_mul(u64::from(base))
            .and_then(|v| v.checked_add(u64::from(d)))
        {
            Some(v) => value = v,
            None => overflow = true,
        }
        i += 1;
    }
    if i == start {
        return Strtoull {
            value: 0,
            end: 0,
            overflow: false,
            negative: false,
        };
    }
    if overflow {
        value = u64::MAX;
    } else if negative {
        value = value.wrapping_neg();
    }
    Strtoull {
        value,
        end: i,
        overflow,
        negative,
    }
}

/// `qemu_strtou64(s, NULL, 0)`: a whole C integer (decimal, `0x` hex or `0` octal, an
/// optional sign; negative values wrap like `strtoull`).
pub fn parse_c_u64(s: &str) -> Result<u64, SizeError> {
    let r = strtoull(s.as_bytes(), 0);
    if r.end == 0 || r.end < s.len() {
        Err(SizeError::Invalid)
    } else if r.overflow {
        Err(SizeError::Range)
    } else {
        Ok(r.value)
    }
}

/// C `strtod` on a string holding no exponent letters: returns (value, bytes consumed).
/// Handles what can reach it here: spaces, a sign, digits and one decimal point.
fn strtod_simple(s: &[u8]) -> Option<(f64, usize)> {
    let mut i = 0;
    while i < s.len() && is_c_space(s[i]) {
        i += 1;
    }
    let num_start = i;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        i += 1;
    }
    let lower: Vec<u8> = s[i..].iter().map(|c| c.to_ascii_lowercase()).collect();
    if lower.starts_with(b"inf") || lower.starts_with(b"nan") {
        // qemu_strtod_finite rejects these.
        return None;
    }
    let mut digits = 0;
    while i < s.len() && s[i].is_ascii_digit() {
        i += 1;
        digits += 1;
    }
    if i < s.len() && s[i] == b'.' {
        i += 1;
        while i < s.len() && s[i].is_ascii_digit() {
            i += 1;
            digits += 1;
        }
    }
    if digits == 0 {
        return None;
    }
    let text = std::str::from_utf8(&s[num_start..i]).ok()?;
    let text = text.strip_prefix('+').unwrap_or(text);
    let text = if let Some(rest) = text.strip_prefix("-.") {
        format!("-0.{rest}")
    } else if let Some(rest) = text.strip_prefix('.') {
        format!("0.{rest}")
    } else {
        text.to_string()
    };
    let v: f64 = text.parse().ok()?;
    Some((v, i))
}

/// Parse a size like `qemu_strtosz` (unit 1024, default suffix bytes), requiring the
/// whole string to be consumed.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let b = s.as_bytes();
    let at = |i: usize| b.get(i).copied();

    let int = strtoull(b, 10);
    let mut end = int.end;
    let mut val;
    let mut valf: u64 = 0;
    let mut err: Option<SizeError> = None;
    if int.end == 0 {
        err = Some(SizeError::Invalid);
        val = 0;
    } else if int.overflow || int.negative {
        return finish(b, end, Err(SizeError::Range));
    } else {
        val = int.value;
    }

    if err.is_none() && val == 0 && matches!(at(end), Some(b'x') | Some(b'X')) {
        // Looks like hex: reparse, and insist on no fraction or suffix.
        let hex = strtoull(b, 16);
        if hex.overflow {
            return finish(b, hex.end, Err(SizeError::Range));
        }
        end = hex.end;
        val = hex.value;
        if at(end) == Some(b'.') || suffix_mul(at(end)).is_some() {
            return Err(SizeError::Invalid);
        }
    } else if at(end) == Some(b'.') || (end == 0 && b.contains(&b'.')) {
        // A fraction: parse it without letting strtod see 'e' as an exponent.
        let frac_start = end;
        let fraction;
        if err.is_none()
            && at(end) == Some(b'.')
            && !at(end + 1).is_some_and(|c| c.is_ascii_digit())
        {
            end += 1;
            fraction = 0.0;
        } else {
            let tail = &b[end..];
            let cut = tail
                .iter()
                .position(|&c| c == b'e' || c == b'E')
                .unwrap_or(tail.len());
            match strtod_simple(&tail[..cut]) {
                Some((f, n)) => {
                    end += n;
                    err = None;
                    if f.is_sign_negative() {
                        return finish(b, end, Err(SizeError::Range));
                    }
                    fraction = f;
                }
                None => return Err(SizeError::Invalid),
            }
        }
        if fraction == 1.0 {
            val = val.checked_add(1).ok_or(SizeError::Range)?;
        } else {
            // Convert to a 64-bit fixed-point fraction; any non-zero fraction stays non-zero.
            valf = (fraction * 18446744073709551616.0) as u64;
            // Non-zero digits that underflowed (strtod's ERANGE) still count.
            let nonzero = b[frac_start..end].iter().any(|c| (b'1'..=b'9').contains(c));
            if valf == 0 && (fraction > 0.0 || nonzero) {
                valf = 1;
            }
        }
    }
    if let Some(e) = err {
        return Err(e);
    }

    let mul = match suffix_mul(at(end)) {
        Some(m) => {
            end += 1;
            m
        }
        None => 1,
    };
    let result = if mul == 1 {
        if valf != 0 {
            return Err(SizeError::Invalid);
        }
        Ok(val)
    } else {
        // Exact 64.64 fixed point times an integer, rounding half up.
        let whole = u128::from(val) * u128::from(mul);
        let frac = u128::from(valf) * u128::from(mul);
        let total = whole + (frac >> 64) + ((frac >> 63) & 1);
        u64::try_from(total).map_err(|_| SizeError::Range)
    };
    finish(b, end, result)
}

/// Without an end pointer, trailing characters make any result invalid.
fn finish(b: &[u8], end: usize, r: Result<u64, SizeError>) -> Result<u64, SizeError> {
    if end < b.len() {
        Err(SizeError::Invalid)
    } else {
        r
    }
}

/// Parse a positional size argument like qemu-img's `cvtnum("image size", ...)`: between
/// 0 and `i64::MAX`. The error is the message after the `img: ` prefix.
pub fn cvtnum(what: &str, s: &str) -> Result<u64, String> {
    cvtnum_full(what, s, 0, i64::MAX as u64)
}

/// qemu-img's `cvtnum_full`: a size between `min` and `max`, with its two messages.
pub fn cvtnum_full(what: &str, s: &str, min: u64, max: u64) -> Result<u64, String> {
    match parse_size(s) {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        Err(SizeError::Invalid) => Err(format!("Invalid {what} specified: '{s}'.")),
        _ => Err(format!(
            "Invalid {what} specified. Must be between {min} and {max}."
        )),
    }
}

/// C `printf("%.3g", v)` for finite, non-negative values.
pub fn format_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    // Round to 3 significant digits first; the exponent of the rounded value decides.
    let sci = format!("{v:.2e}");
    let (mant, exp) = sci.split_once('e').expect("exponent");
    let exp: i32 = exp.parse().expect("exponent value");
    if !(-4..3).contains(&exp) {
        let mant = strip_zeros(mant);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mant}e{sign}{:02}", exp.abs())
    } else {
        let prec = (2 - exp) as usize;
        strip_zeros(&format!("{v:.prec$}")).to_string()
    }
}

fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// The exponent C `frexp` returns: `x = m * 2^e` with `0.5 <= m < 1` (0 for 0).
fn frexp_exponent(x: f64) -> i32 {
    if x == 0.0 || !x.is_finite() {
        return 0;
    }
    let bits = x.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i32;
    if biased == 0 {
        // Subnormal: normalise first.
        return frexp_exponent(x * 2f64.powi(64)) - 64;
    }
    biased - 1022
}

/// QEMU's `size_to_str`: IEC units, three significant digits, switching to the next unit
/// once the number would reach 1000.
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let scaled = val as f64 / (1000.0 / 1024.0);
    // frexp's exponent: scaled = m * 2^e with 0.5 <= m < 1.
    let e = frexp_exponent(scaled);
    // C integer division truncates toward zero.
    let i = ((e - 1) / 10).clamp(0, 6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", format_g3(val as f64 / div), SUFFIXES[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_qemu_accepts() {
        let ok = [
            ("0", 0),
            ("1k", 1024),
            ("1.5G", 1610612736),
            ("1b", 1),
            ("512B", 512),
            (" 5", 5),
            ("+5", 5),
            ("0x10", 16),
            ("0X10", 16),
            ("1.5k", 1536),
            (".5k", 512),
            ("1.k", 1024),
            ("1.0", 1),
            ("1.0k", 1024),
            ("0.0001k", 0),
            ("0.0004k", 0),
            ("0.0005k", 1),
            (concat!("0.", "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000", "1k"), 0),
            ("00010", 10),
            ("1.9999999999999999999k", 2048),
            ("1.5e", 1729382256910270464),
            ("8191P", 9222246136947933184),
            ("2P", 2251799813685248),
            ("9223372036854775807", 9223372036854775807),
            ("18446744073709551615", u64::MAX),
        ];
        for (s, want) in ok {
            assert_eq!(parse_size(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn sizes_qemu_rejects() {
        let invalid = [
            "1.5.5G", "abc", "1.5", "0.5", "1.3", "1e3", "5x", "5 ", "0x", "0x1.8k", "0x10k",
            "inf", "nan", "1.5 G", "--5", "1kb", "", "1.5.5", "1..5k", "1.-5k", ".k", "1_0", "１",
        ];
        for s in invalid {
            assert_eq!(parse_size(s), Err(SizeError::Invalid), "{s}");
        }
        for s in ["-0", " -5", "-1", "18446744073709551616", "16E", "99E"] {
            assert_eq!(parse_size(s), Err(SizeError::Range), "{s}");
        }
    }

    #[test]
    fn c_integers() {
        assert_eq!(parse_c_u64("16"), Ok(16));
        assert_eq!(parse_c_u64("0x10"), Ok(16));
        assert_eq!(parse_c_u64("010"), Ok(8));
        assert_eq!(parse_c_u64("-1"), Ok(u64::MAX));
        assert_eq!(parse_c_u64("16k"), Err(SizeError::Invalid));
        assert_eq!(parse_c_u64("abc"), Err(SizeError::Invalid));
        assert_eq!(parse_c_u64(""), Err(SizeError::Invalid));
        assert_eq!(parse_c_u64("99999999999999999999"), Err(SizeError::Range));
    }

    #[test]
    fn cvtnum_messages() {
        assert_eq!(
            cvtnum("image size", "1.5.5G").unwrap_err(),
            "Invalid image size specified: '1.5.5G'."
        );
        let range = "Invalid image size specified. Must be between 0 and 9223372036854775807.";
        for s in ["99E", "16E", "8E", "-0", "9223372036854775808"] {
            assert_eq!(cvtnum("image size", s).unwrap_err(), range, "{s}");
        }
        assert_eq!(cvtnum("image size", "7E"), Ok(7 << 60));
    }

    #[test]
    fn human_sizes() {
        let cases = [
            (0, "0 B"),
            (512, "512 B"),
            (999, "999 B"),
            (1000, "0.977 KiB"),
            (1024, "1 KiB"),
            (4096, "4 KiB"),
            (200704, "196 KiB"),
            (197120, "192 KiB"),
            (459264, "448 KiB"),
            (1572864, "1.5 MiB"),
            (1048576, "1 MiB"),
            (1073741824, "1 GiB"),
            (10485760, "10 MiB"),
            (u64::MAX, "16 EiB"),
        ];
        for (v, want) in cases {
            assert_eq!(size_to_str(v), want, "{v}");
        }
    }

    #[test]
    fn g3_formatting() {
        assert_eq!(format_g3(999.6), "1e+03");
        assert_eq!(format_g3(1.25), "1.25");
        assert_eq!(format_g3(1.255), "1.25");
        assert_eq!(format_g3(12.0), "12");
        assert_eq!(format_g3(0.5), "0.5");
    }
}
