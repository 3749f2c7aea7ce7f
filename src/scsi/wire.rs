//! Bounds-checked big-endian field access for target-supplied buffers.
//!
//! Every read goes through these helpers so a short buffer turns into a
//! [`ParseError::Truncated`] instead of a panic.

use super::error::ParseError;

/// Borrows `len` bytes at `off`, or reports how many bytes were needed.
pub(crate) fn slice<'a>(
    buf: &'a [u8],
    off: usize,
    len: usize,
    what: &'static str,
) -> Result<&'a [u8], ParseError> {
    let end = off.checked_add(len).ok_or(ParseError::Truncated {
        what,
        len: buf.len(),
        need: usize::MAX,
    })?;
    buf.get(off..end).ok_or(ParseError::Truncated {
        what,
        len: buf.len(),
        need: end,
    })
}

/// Reads a fixed-size array at `off`.
pub(crate) fn array<const N: usize>(
    buf: &[u8],
    off: usize,
    what: &'static str,
) -> Result<[u8; N], ParseError> {
    let s = slice(buf, off, N, what)?;
    let mut out = [0u8; N];
    out.copy_from_slice(s);
    Ok(out)
}

/// Reads the byte at `off`.
pub(crate) fn u8_at(buf: &[u8], off: usize, what: &'static str) -> Result<u8, ParseError> {
    Ok(array::<1>(buf, off, what)?[0])
}

/// Reads a big-endian u16 at `off`.
pub(crate) fn be16(buf: &[u8], off: usize, what: &'static str) -> Result<u16, ParseError> {
    Ok(u16::from_be_bytes(array(buf, off, what)?))
}

/// Reads a big-endian u32 at `off`.
pub(crate) fn be32(buf: &[u8], off: usize, what: &'static str) -> Result<u32, ParseError> {
    Ok(u32::from_be_bytes(array(buf, off, what)?))
}

/// Reads a big-endian u64 at `off`.
pub(crate) fn be64(buf: &[u8], off: usize, what: &'static str) -> Result<u64, ParseError> {
    Ok(u64::from_be_bytes(array(buf, off, what)?))
}

/// Byte at `off` if present, else 0: for optional trailing fields that a
/// shorter (older standard) page leaves out, where 0 means "not reported".
pub(crate) fn u8_or_zero(buf: &[u8], off: usize) -> u8 {
    buf.get(off).copied().unwrap_or(0)
}

/// Big-endian u32 at `off` if all four bytes are present, else 0.
pub(crate) fn be32_or_zero(buf: &[u8], off: usize) -> u32 {
    be32(buf, off, "").unwrap_or(0)
}

/// Turns a fixed-width ASCII field into a printable, trimmed string.
///
/// Targets pad with spaces (sometimes NULs); anything outside printable ASCII
/// is replaced so hostile bytes cannot reach log lines as control characters.
pub(crate) fn ascii_field(bytes: &[u8]) -> String {
    let s: String = bytes
        .iter()
        .map(|&b| match b {
            0x20..=0x7e => b as char,
            0 => ' ',
            _ => '?',
        })
        .collect();
    s.trim().to_string()
}

/// Lower-case hex of a byte string, for identifiers and log lines.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Decodes a hex string (test helper for captured byte sequences).
#[cfg(test)]
pub(crate) fn unhex(s: &str) -> Vec<u8> {
    let s: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    s.chunks(2)
        .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 16).unwrap())
        .collect()
}

/// Deterministic pseudo-random bytes for the no-panic tests (xorshift).
#[cfg(test)]
pub(crate) fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounds_checked() {
        let b = [1u8, 2, 3, 4, 5];
        assert_eq!(be16(&b, 0, "x").unwrap(), 0x0102);
        assert_eq!(be32(&b, 1, "x").unwrap(), 0x0203_0405);
        assert_eq!(
            be32(&b, 2, "x"),
            Err(ParseError::Truncated {
                what: "x",
                len: 5,
                need: 6
            })
        );
        assert!(slice(&b, usize::MAX, 2, "x").is_err());
        assert!(be64(&b, 0, "x").is_err());
        assert_eq!(be32_or_zero(&b, 3), 0);
        assert_eq!(u8_or_zero(&b, 9), 0);
    }

    #[test]
    fn ascii_field_trims_and_sanitizes() {
        assert_eq!(ascii_field(b"IET     "), "IET");
        assert_eq!(ascii_field(b"  a\x1bb\0\0"), "a?b");
        assert_eq!(hex(&[0x0a, 0xff]), "0aff");
        assert_eq!(unhex("0a ff"), vec![0x0a, 0xff]);
    }
}
