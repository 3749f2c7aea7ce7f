//! Text key=value data of Login and Text PDUs (RFC 7143 §6.1).
//!
//! Each pair is `key=value` followed by a NUL byte. Keys are at most 63
//! bytes of letters, digits and `.-+@_#`; values are UTF-8 without NUL.
//! A text may span several PDUs (C bit): [`TextAssembler`] joins the pieces
//! before decoding, since a pair may be cut anywhere.

use thiserror::Error;

/// Longest key name (RFC 7143 §6.1).
pub const MAX_KEY_LEN: usize = 63;

/// Longest value we accept. The RFC limits most values to 255 bytes, but
/// binary values (CHAP challenges) may be longer; nothing sensible exceeds
/// a login PDU.
pub const MAX_VALUE_LEN: usize = 8192;

/// Malformed text data.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TextError {
    /// A pair without '='.
    #[error("text pair {0:?} has no '='")]
    MissingEquals(String),
    /// A pair with nothing before '='.
    #[error("text pair with an empty key")]
    EmptyKey,
    /// Key longer than 63 bytes.
    #[error("text key {0:?}... is longer than 63 bytes")]
    KeyTooLong(String),
    /// Key with a character outside the RFC's set.
    #[error("text key {0:?} has an invalid character")]
    InvalidKey(String),
    /// Value too long.
    #[error("value of text key {key} is {len} bytes long (max {MAX_VALUE_LEN})")]
    ValueTooLong {
        /// The key.
        key: String,
        /// The value length.
        len: usize,
    },
    /// A value holding a NUL byte (only when encoding).
    #[error("value of text key {0} contains a NUL byte")]
    NulInValue(String),
    /// Not UTF-8.
    #[error("text data is not valid UTF-8")]
    NotUtf8,
    /// The last pair is not NUL terminated.
    #[error("text data does not end with a NUL byte")]
    Unterminated,
    /// A key that must appear once appeared twice.
    #[error("text key {0} appears more than once")]
    DuplicateKey(String),
    /// The whole text (over several PDUs) is too large.
    #[error("text data exceeds {0} bytes")]
    TooLarge(usize),
}

/// One `key=value` pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
}

fn check_key(key: &str) -> Result<(), TextError> {
    if key.is_empty() {
        return Err(TextError::EmptyKey);
    }
    if key.len() > MAX_KEY_LEN {
        let cut: String = key.chars().take(MAX_KEY_LEN).collect();
        return Err(TextError::KeyTooLong(cut));
    }
    let first_ok = key.bytes().next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = key
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'+' | b'@' | b'_' | b'#'));
    if !first_ok || !rest_ok {
        return Err(TextError::InvalidKey(key.escape_default().to_string()));
    }
    Ok(())
}

fn check_value(key: &str, value: &str) -> Result<(), TextError> {
    if value.len() > MAX_VALUE_LEN {
        return Err(TextError::ValueTooLong {
            key: key.to_string(),
            len: value.len(),
        });
    }
    if value.contains('\0') {
        return Err(TextError::NulInValue(key.to_string()));
    }
    Ok(())
}

/// Decode complete text data into pairs, in order. Repeated keys are kept
/// (SendTargets answers repeat TargetName/TargetAddress); use
/// [`decode_unique`] where each key may appear once. Empty entries (extra
/// NULs, as some targets pad with) are skipped.
pub fn decode(data: &[u8]) -> Result<Vec<Pair>, TextError> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    if data.last() != Some(&0) {
        return Err(TextError::Unterminated);
    }
    let text = std::str::from_utf8(data).map_err(|_| TextError::NotUtf8)?;
    let mut pairs = Vec::new();
    // The text ends with NUL, so the last split piece is empty.
    for entry in text.split('\0').filter(|e| !e.is_empty()) {
        let (key, value) = entry.split_once('=').ok_or_else(|| {
            let cut: String = entry.chars().take(MAX_KEY_LEN).collect();
            TextError::MissingEquals(cut)
        })?;
        check_key(key)?;
        if value.len() > MAX_VALUE_LEN {
            return Err(TextError::ValueTooLong {
                key: key.to_string(),
                len: value.len(),
            });
        }
        pairs.push(Pair {
            key: key.to_string(),
            value: value.to_string(),
        });
    }
    Ok(pairs)
}

/// Decode text data in which every key must appear at most once.
pub fn decode_unique(data: &[u8]) -> Result<Vec<Pair>, TextError> {
    let pairs = decode(data)?;
    let mut seen = std::collections::HashSet::new();
    for p in &pairs {
        if !seen.insert(p.key.as_str()) {
            return Err(TextError::DuplicateKey(p.key.clone()));
        }
    }
    Ok(pairs)
}

/// Builds text data, checking each key and value.
#[derive(Debug, Clone, Default)]
pub struct TextBuilder {
    data: Vec<u8>,
}

impl TextBuilder {
    /// An empty text.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append `key=value\0`.
    pub fn push(&mut self, key: &str, value: &str) -> Result<&mut Self, TextError> {
        check_key(key)?;
        check_value(key, value)?;
        self.data.extend_from_slice(key.as_bytes());
        self.data.push(b'=');
        self.data.extend_from_slice(value.as_bytes());
        self.data.push(0);
        Ok(self)
    }

    /// True when nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The encoded bytes.
    pub fn finish(self) -> Vec<u8> {
        self.data
    }
}

/// Encode pairs in order.
pub fn encode<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Result<Vec<u8>, TextError> {
    let mut b = TextBuilder::new();
    for (k, v) in pairs {
        b.push(k.as_ref(), v.as_ref())?;
    }
    Ok(b.finish())
}

/// Joins the data segments of a text that spans several PDUs (C bit).
#[derive(Debug, Clone)]
pub struct TextAssembler {
    buf: Vec<u8>,
    limit: usize,
}

impl TextAssembler {
    /// An assembler refusing texts longer than `limit` bytes in total.
    pub fn new(limit: usize) -> Self {
        TextAssembler {
            buf: Vec::new(),
            limit,
        }
    }

    /// Add one PDU's data. With `cont` set more is to come and `None` is
    /// returned; otherwise the whole text is returned and the assembler is
    /// empty again.
    pub fn push(&mut self, data: &[u8], cont: bool) -> Result<Option<Vec<u8>>, TextError> {
        let total = self.buf.len().saturating_add(data.len());
        if total > self.limit {
            self.buf.clear();
            return Err(TextError::TooLarge(self.limit));
        }
        self.buf.extend_from_slice(data);
        if cont {
            Ok(None)
        } else {
            Ok(Some(std::mem::take(&mut self.buf)))
        }
    }

    /// True when a partial text is waiting for its continuation.
    pub fn is_pending(&self) -> bool {
        !self.buf.is_empty()
    }
}

/// Split text data into PDU-sized pieces; all but the last go out with the
/// C bit set. Returns one empty piece for empty data.
pub fn split_for_pdus(data: &[u8], max_pdu_data: usize) -> Vec<&[u8]> {
    if data.is_empty() || max_pdu_data == 0 {
        return vec![data];
    }
    data.chunks(max_pdu_data).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let data = encode(&[
            ("HeaderDigest", "CRC32C,None"),
            ("MaxBurstLength", "262144"),
        ])
        .unwrap();
        assert_eq!(data, b"HeaderDigest=CRC32C,None\0MaxBurstLength=262144\0");
        let pairs = decode(&data).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[0].key, "HeaderDigest");
        assert_eq!(pairs[1].value, "262144");
    }

    #[test]
    fn value_may_contain_equals() {
        let p = decode(b"TargetAlias=a=b\0").unwrap();
        assert_eq!(p[0].value, "a=b");
    }

    #[test]
    fn malformed_text_is_an_error() {
        assert_eq!(
            decode(b"NoEquals\0"),
            Err(TextError::MissingEquals("NoEquals".into()))
        );
        assert_eq!(decode(b"=v\0"), Err(TextError::EmptyKey));
        assert_eq!(decode(b"Key=v"), Err(TextError::Unterminated));
        assert_eq!(decode(b"K\xffy=v\0"), Err(TextError::NotUtf8));
        assert!(matches!(
            decode(b"Bad Key=v\0"),
            Err(TextError::InvalidKey(_))
        ));
        let long = format!("{}=v\0", "K".repeat(64));
        assert!(matches!(
            decode(long.as_bytes()),
            Err(TextError::KeyTooLong(_))
        ));
        let ok = format!("{}=v\0", "K".repeat(63));
        assert!(decode(ok.as_bytes()).is_ok());
        let big = format!("K={}\0", "v".repeat(MAX_VALUE_LEN + 1));
        assert!(matches!(
            decode(big.as_bytes()),
            Err(TextError::ValueTooLong { .. })
        ));
    }

    #[test]
    fn duplicates() {
        let data = b"A=1\0B=2\0A=3\0";
        assert_eq!(decode(data).unwrap().len(), 3);
        assert_eq!(
            decode_unique(data),
            Err(TextError::DuplicateKey("A".into()))
        );
    }

    #[test]
    fn extra_nuls_are_skipped() {
        assert_eq!(decode(b"A=1\0\0\0").unwrap().len(), 1);
        assert!(decode(b"").unwrap().is_empty());
    }

    #[test]
    fn builder_rejects_bad_input() {
        let mut b = TextBuilder::new();
        assert!(b.push("Good", "x\0y").is_err());
        assert!(b.push("", "x").is_err());
        assert!(b.push("Bad=Key", "x").is_err());
        assert!(b.is_empty());
    }

    #[test]
    fn reassembly_across_pdus() {
        let data = encode(&[("TargetName", "iqn.2024-01.example:disk"), ("K", "v")]).unwrap();
        let pieces = split_for_pdus(&data, 7);
        assert!(pieces.len() > 3);
        let mut asm = TextAssembler::new(1024);
        let mut out = None;
        for (i, p) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            out = asm.push(p, !last).unwrap();
            assert_eq!(out.is_some(), last);
        }
        assert_eq!(out.unwrap(), data);
        assert!(!asm.is_pending());
    }

    #[test]
    fn reassembly_limit() {
        let mut asm = TextAssembler::new(10);
        assert!(asm.push(b"123456", true).unwrap().is_none());
        assert_eq!(asm.push(b"123456", false), Err(TextError::TooLarge(10)));
    }
}
