//! Error types shared by the SCSI builders and parsers.

use thiserror::Error;

/// A CDB could not be built because an argument does not fit the command.
///
/// These are programming or sizing errors on our side (the caller picked a
/// command too small for the request), never something a target sent.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CdbError {
    /// A numeric field is larger than the command can carry.
    #[error("{command}: {field} {value} is larger than the maximum {max}")]
    OutOfRange {
        /// Command being built, e.g. "READ(10)".
        command: &'static str,
        /// Field that overflowed, e.g. "LBA".
        field: &'static str,
        /// Value asked for.
        value: u64,
        /// Largest value the field holds.
        max: u64,
    },
    /// The combination of arguments makes no sense for this command.
    #[error("{command}: {reason}")]
    Invalid {
        /// Command being built.
        command: &'static str,
        /// What is wrong, in words.
        reason: &'static str,
    },
}

/// Data returned by a target could not be decoded.
///
/// Every parser in this module returns this for short or malformed input; the
/// caller usually logs it together with the command that produced the data.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// The buffer ends before a field the structure requires.
    ///
    /// When `need` is larger than the allocation length that was used, the
    /// command can be re-issued with `need` as the allocation length.
    #[error("{what} is truncated: {len} bytes received, {need} needed")]
    Truncated {
        /// Structure being decoded, e.g. "VPD page 0x83".
        what: &'static str,
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A field holds a value that the standard does not allow.
    #[error("{what} is malformed: {reason}")]
    Malformed {
        /// Structure being decoded.
        what: &'static str,
        /// What is wrong, in words (may include the offending value).
        reason: String,
    },
}

impl ParseError {
    /// Shorthand for a [`ParseError::Malformed`].
    pub(crate) fn malformed(what: &'static str, reason: impl Into<String>) -> Self {
        ParseError::Malformed {
            what,
            reason: reason.into(),
        }
    }
}
