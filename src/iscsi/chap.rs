//! CHAP for the initiator (RFC 7143 §12.1.3, RFC 1994).
//!
//! The response to a challenge is `H(identifier || secret || challenge)`
//! with H = MD5 (`CHAP_A=5`) or SHA-256 (`CHAP_A=7`, the number IANA's PPP
//! authentication algorithm registry gives it, as RFC 7143 refers to that
//! registry; Linux LIO uses the same numbers). Binary values travel as hex
//! (`0x...`) or base64 (`0b...`).
//!
//! Secrets shorter than 12 bytes (96 bits, the RFC's recommended minimum)
//! are refused with an error rather than a warning: a short CHAP secret can
//! be recovered offline from one captured exchange, and a misconfiguration
//! is better caught at start-up than after a breach. Secrets never appear in
//! Debug output or error messages.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;
use md5::{Digest, Md5};
use sha2::Sha256;
use thiserror::Error;

/// Shortest CHAP secret accepted (RFC 7143 §12.1.3 recommends 96 bits).
pub const MIN_SECRET_LEN: usize = 12;

/// Longest CHAP secret accepted (an arbitrary bound against mistakes such
/// as pointing at the wrong file).
pub const MAX_SECRET_LEN: usize = 1024;

/// Longest binary value (challenge or response) we accept from a target.
pub const MAX_BINARY_LEN: usize = 1024;

/// Length of the challenges we generate for mutual CHAP.
pub const CHALLENGE_LEN: usize = 16;

/// CHAP configuration and protocol errors.
#[derive(Debug, Error)]
pub enum ChapError {
    /// Secret shorter than [`MIN_SECRET_LEN`].
    #[error("CHAP secret from {source_name} is {len} bytes long; at least {MIN_SECRET_LEN} bytes (96 bits) are required")]
    SecretTooShort {
        /// Where it came from (file path or variable name).
        source_name: String,
        /// Its length.
        len: usize,
    },
    /// Secret longer than [`MAX_SECRET_LEN`].
    #[error("CHAP secret from {source_name} is {len} bytes long; at most {MAX_SECRET_LEN} bytes are accepted")]
    SecretTooLong {
        /// Where it came from.
        source_name: String,
        /// Its length.
        len: usize,
    },
    /// The secret file could not be read.
    #[error("cannot read CHAP secret file {path}")]
    SecretFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The environment variable is not set or not valid.
    #[error("environment variable {0} with the CHAP secret is not set or not valid UTF-8")]
    EnvMissing(String),
    /// A binary value that is neither 0x hex nor 0b base64, or is too long.
    #[error("CHAP key {key} has an invalid binary value")]
    BadBinary {
        /// The key.
        key: &'static str,
    },
    /// No random bytes available for a challenge.
    #[error("cannot get random bytes for the CHAP challenge: {0}")]
    Random(String),
}

/// CHAP hash algorithm (CHAP_A).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChapAlgorithm {
    /// MD5, CHAP_A=5.
    Md5,
    /// SHA-256, CHAP_A=7.
    Sha256,
}

impl ChapAlgorithm {
    /// The CHAP_A number.
    pub fn code(self) -> u8 {
        match self {
            ChapAlgorithm::Md5 => 5,
            ChapAlgorithm::Sha256 => 7,
        }
    }

    /// From a CHAP_A number.
    pub fn from_code(code: u64) -> Option<Self> {
        match code {
            5 => Some(ChapAlgorithm::Md5),
            7 => Some(ChapAlgorithm::Sha256),
            _ => None,
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            ChapAlgorithm::Md5 => 16,
            ChapAlgorithm::Sha256 => 32,
        }
    }

    /// `H(id || secret || challenge)`.
    pub fn response(self, id: u8, secret: &ChapSecret, challenge: &[u8]) -> Vec<u8> {
        fn run<D: Digest>(id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
            let mut h = D::new();
            h.update([id]);
            h.update(secret);
            h.update(challenge);
            h.finalize().to_vec()
        }
        match self {
            ChapAlgorithm::Md5 => run::<Md5>(id, &secret.0, challenge),
            ChapAlgorithm::Sha256 => run::<Sha256>(id, &secret.0, challenge),
        }
    }
}

/// A CHAP secret. Its Debug output is `<redacted>`; it has no Display.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapSecret(Vec<u8>);

impl fmt::Debug for ChapSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Drop for ChapSecret {
    fn drop(&mut self) {
        // Best effort: do not leave the secret in freed memory.
        self.0.fill(0);
        std::hint::black_box(&self.0);
    }
}

impl ChapSecret {
    /// A secret from bytes; `source_name` names its origin in errors.
    pub fn new(bytes: Vec<u8>, source_name: &str) -> Result<Self, ChapError> {
        let s = ChapSecret(bytes);
        if s.0.len() < MIN_SECRET_LEN {
            return Err(ChapError::SecretTooShort {
                source_name: source_name.to_string(),
                len: s.0.len(),
            });
        }
        if s.0.len() > MAX_SECRET_LEN {
            return Err(ChapError::SecretTooLong {
                source_name: source_name.to_string(),
                len: s.0.len(),
            });
        }
        Ok(s)
    }

    /// Read a secret from a file; one trailing newline (LF or CRLF) is
    /// removed, as editors add one.
    pub fn from_file(path: &Path) -> Result<Self, ChapError> {
        let mut bytes = std::fs::read(path).map_err(|source| ChapError::SecretFile {
            path: path.to_path_buf(),
            source,
        })?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        Self::new(bytes, &path.display().to_string())
    }

    /// Read a secret from an environment variable.
    pub fn from_env(var: &str) -> Result<Self, ChapError> {
        let v = std::env::var(var).map_err(|_| ChapError::EnvMissing(var.to_string()))?;
        Self::new(v.into_bytes(), var)
    }

    /// Same secret (constant time)?
    pub fn ct_eq(&self, other: &ChapSecret) -> bool {
        ct_eq(&self.0, &other.0)
    }
}

/// A CHAP user name and secret.
#[derive(Debug, Clone)]
pub struct ChapCredentials {
    /// CHAP_N: the name.
    pub username: String,
    /// The secret.
    pub secret: ChapSecret,
}

/// Constant-time equality of two byte strings (the length is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Encode a binary value as `0x` + lowercase hex.
pub fn encode_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Decode a binary value: `0x`/`0X` hex (an odd digit count means a leading
/// zero nibble) or `0b`/`0B` base64 (RFC 7143 §6.1).
pub fn decode_binary(key: &'static str, v: &str) -> Result<Vec<u8>, ChapError> {
    let bad = || ChapError::BadBinary { key };
    let out = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.is_empty() || h.len() > MAX_BINARY_LEN * 2 {
            return Err(bad());
        }
        let digits: Vec<u8> = h
            .bytes()
            .map(hex_val)
            .collect::<Option<_>>()
            .ok_or_else(bad)?;
        let mut out = Vec::with_capacity(digits.len().div_ceil(2));
        let mut iter = digits.iter();
        if digits.len() % 2 == 1 {
            out.extend(iter.next().copied());
        }
        while let (Some(hi), Some(lo)) = (iter.next(), iter.next()) {
            out.push(hi << 4 | lo);
        }
        out
    } else if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        if b.is_empty() || b.len() > MAX_BINARY_LEN * 2 {
            return Err(bad());
        }
        base64::engine::general_purpose::STANDARD
            .decode(b)
            .map_err(|_| bad())?
    } else {
        return Err(bad());
    };
    if out.is_empty() || out.len() > MAX_BINARY_LEN {
        return Err(bad());
    }
    Ok(out)
}

/// Fresh random challenge bytes and identifier for mutual CHAP.
pub fn random_challenge() -> Result<(u8, Vec<u8>), ChapError> {
    let mut buf = [0u8; CHALLENGE_LEN + 1];
    getrandom::fill(&mut buf).map_err(|e| ChapError::Random(e.to_string()))?;
    let (id, challenge) = buf.split_first().map_or((0, &[][..]), |(a, b)| (*a, b));
    Ok((id, challenge.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> ChapSecret {
        ChapSecret::new(s.as_bytes().to_vec(), "test").unwrap()
    }

    // Expected values computed independently with Python's hashlib:
    // hashlib.md5(b'\x01secretsecret12\x01\x02\x03').hexdigest()
    // hashlib.sha256(b'\x2aabcdefghijkl' + b'chal').hexdigest()
    #[test]
    fn md5_response_vector() {
        let r = ChapAlgorithm::Md5.response(1, &secret("secretsecret12"), &[1, 2, 3]);
        assert_eq!(encode_hex(&r), "0x3e862503b5bf66e853bfc23a25ecfcbb");
    }

    #[test]
    fn sha256_response_vector() {
        let r = ChapAlgorithm::Sha256.response(0x2a, &secret("abcdefghijkl"), b"chal");
        assert_eq!(
            encode_hex(&r),
            "0x01c67659e2d995e8e54e9808048ff78aaffcce2fef51fc08ee0449527543391c"
        );
    }

    #[test]
    fn debug_redacts() {
        let s = secret("verysecretpassword");
        assert_eq!(format!("{s:?}"), "<redacted>");
        let c = ChapCredentials {
            username: "user".into(),
            secret: s,
        };
        assert!(!format!("{c:?}").contains("verysecret"));
    }

    #[test]
    fn short_secret_refused() {
        let e = ChapSecret::new(b"short".to_vec(), "/etc/secret").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("5 bytes") && msg.contains("12 bytes"), "{msg}");
        assert!(!msg.contains("short\""));
    }

    #[test]
    fn secret_from_file_trims_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, b"0123456789abcdef\r\n").unwrap();
        let s = ChapSecret::from_file(&p).unwrap();
        assert!(s.ct_eq(&secret("0123456789abcdef")));
        std::fs::write(&p, b"0123456789ab\n\n").unwrap();
        let s = ChapSecret::from_file(&p).unwrap();
        assert!(
            s.ct_eq(&secret("0123456789ab\n")),
            "only one newline trimmed"
        );
        assert!(ChapSecret::from_file(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn secret_from_env() {
        std::env::set_var("VHOST_ISER_TEST_CHAP_SECRET", "env-secret-123");
        let s = ChapSecret::from_env("VHOST_ISER_TEST_CHAP_SECRET").unwrap();
        assert!(s.ct_eq(&secret("env-secret-123")));
        assert!(matches!(
            ChapSecret::from_env("VHOST_ISER_TEST_CHAP_UNSET"),
            Err(ChapError::EnvMissing(_))
        ));
    }

    #[test]
    fn binary_encodings() {
        assert_eq!(
            decode_binary("CHAP_C", "0x0102ff").unwrap(),
            vec![1, 2, 255]
        );
        assert_eq!(decode_binary("CHAP_C", "0XABC").unwrap(), vec![0x0a, 0xbc]);
        assert_eq!(decode_binary("CHAP_C", "0bAQL/").unwrap(), vec![1, 2, 255]);
        assert!(decode_binary("CHAP_C", "0x").is_err());
        assert!(decode_binary("CHAP_C", "0xzz").is_err());
        assert!(decode_binary("CHAP_C", "0b!!").is_err());
        assert!(decode_binary("CHAP_C", "1234").is_err());
        let long = format!("0x{}", "00".repeat(MAX_BINARY_LEN + 1));
        assert!(decode_binary("CHAP_C", &long).is_err());
        assert_eq!(encode_hex(&[0, 0xab]), "0x00ab");
        assert_eq!(
            decode_binary("CHAP_R", &encode_hex(&[9, 8, 7])).unwrap(),
            vec![9, 8, 7]
        );
    }

    #[test]
    fn constant_time_eq() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }

    #[test]
    fn random_challenges_differ() {
        let (_, a) = random_challenge().unwrap();
        let (_, b) = random_challenge().unwrap();
        assert_eq!(a.len(), CHALLENGE_LEN);
        assert_ne!(a, b);
    }

    #[test]
    fn algorithm_codes() {
        assert_eq!(ChapAlgorithm::from_code(5), Some(ChapAlgorithm::Md5));
        assert_eq!(ChapAlgorithm::from_code(7), Some(ChapAlgorithm::Sha256));
        assert_eq!(ChapAlgorithm::from_code(6), None);
        assert_eq!(ChapAlgorithm::Sha256.code(), 7);
    }
}
