//! Sense data (SPC-4 4.5): fixed (0x70/0x71) and descriptor (0x72/0x73)
//! formats, readable ASC/ASCQ text, and what an initiator should do about it.
//!
//! Log lines built from [`SenseData`]'s `Display` read like
//! `sense key MEDIUM ERROR, asc/ascq 11/00 (unrecovered read error)`.

use std::fmt;

use super::error::ParseError;
use super::status::ScsiStatus;
use super::wire::{be32, be64, u8_at};

/// The sense key: the broad class of the condition (SPC-4 table 48).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SenseKey {
    /// 0x0: no specific sense key (may carry FILEMARK/EOM/ILI or progress).
    NoSense,
    /// 0x1: the command completed after the target recovered an error.
    RecoveredError,
    /// 0x2: the logical unit is not accessible now.
    NotReady,
    /// 0x3: unrecovered error on the medium.
    MediumError,
    /// 0x4: non-recoverable hardware failure.
    HardwareError,
    /// 0x5: the command or its parameters were not acceptable.
    IllegalRequest,
    /// 0x6: something changed (reset, capacity, parameters); command not executed.
    UnitAttention,
    /// 0x7: the operation is not allowed on these blocks (write protect...).
    DataProtect,
    /// 0x8: blank or formatted-only medium encountered.
    BlankCheck,
    /// 0x9: vendor specific.
    VendorSpecific,
    /// 0xA: EXTENDED COPY was aborted.
    CopyAborted,
    /// 0xB: the target aborted the command; retrying may succeed.
    AbortedCommand,
    /// 0xC: reserved (formerly EQUAL).
    Reserved,
    /// 0xD: a buffered device reached the end of the partition.
    VolumeOverflow,
    /// 0xE: source data did not match the medium (COMPARE AND WRITE, VERIFY).
    Miscompare,
    /// 0xF: completed (ATA pass-through information available).
    Completed,
}

impl SenseKey {
    /// Decodes the low four bits of `v`.
    pub fn from_u8(v: u8) -> Self {
        match v & 0x0f {
            0x0 => Self::NoSense,
            0x1 => Self::RecoveredError,
            0x2 => Self::NotReady,
            0x3 => Self::MediumError,
            0x4 => Self::HardwareError,
            0x5 => Self::IllegalRequest,
            0x6 => Self::UnitAttention,
            0x7 => Self::DataProtect,
            0x8 => Self::BlankCheck,
            0x9 => Self::VendorSpecific,
            0xa => Self::CopyAborted,
            0xb => Self::AbortedCommand,
            0xc => Self::Reserved,
            0xd => Self::VolumeOverflow,
            0xe => Self::Miscompare,
            _ => Self::Completed,
        }
    }

    /// The SPC name, for log lines.
    pub fn name(self) -> &'static str {
        match self {
            Self::NoSense => "NO SENSE",
            Self::RecoveredError => "RECOVERED ERROR",
            Self::NotReady => "NOT READY",
            Self::MediumError => "MEDIUM ERROR",
            Self::HardwareError => "HARDWARE ERROR",
            Self::IllegalRequest => "ILLEGAL REQUEST",
            Self::UnitAttention => "UNIT ATTENTION",
            Self::DataProtect => "DATA PROTECT",
            Self::BlankCheck => "BLANK CHECK",
            Self::VendorSpecific => "VENDOR SPECIFIC",
            Self::CopyAborted => "COPY ABORTED",
            Self::AbortedCommand => "ABORTED COMMAND",
            Self::Reserved => "RESERVED",
            Self::VolumeOverflow => "VOLUME OVERFLOW",
            Self::Miscompare => "MISCOMPARE",
            Self::Completed => "COMPLETED",
        }
    }
}

impl fmt::Display for SenseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which of the two sense data formats the target used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenseFormat {
    /// Response codes 0x70/0x71.
    Fixed,
    /// Response codes 0x72/0x73.
    Descriptor,
}

/// The decoded three sense-key-specific bytes (SPC-4 4.5.2.4), valid only
/// when the target set SKSV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenseKeySpecific {
    /// ILLEGAL REQUEST: which byte (and bit) of the CDB or parameter list was wrong.
    FieldPointer {
        /// True if the error is in the CDB, false if in the parameter data.
        in_cdb: bool,
        /// Bit within the byte, when the target reported one (BPV).
        bit: Option<u8>,
        /// Byte offset of the field.
        byte: u16,
    },
    /// RECOVERED/MEDIUM/HARDWARE ERROR: retries the target made.
    ActualRetryCount(u16),
    /// NO SENSE / NOT READY: progress of a long operation, in 1/65536 units.
    Progress(u16),
    /// COPY ABORTED: where in the segment descriptors the error is.
    SegmentPointer {
        /// Segment descriptor (true) or parameter list (false).
        segment_descriptor: bool,
        /// Bit within the byte, when reported.
        bit: Option<u8>,
        /// Byte offset.
        byte: u16,
    },
    /// UNIT ATTENTION: the target's unit attention queue overflowed.
    UnitAttentionQueueOverflow(bool),
    /// Any other key: the raw bytes (SKSV bit cleared).
    Other([u8; 3]),
}

impl SenseKeySpecific {
    /// Decodes the three bytes for `key`; None when SKSV (bit 7 of the first
    /// byte) is clear.
    pub fn decode(key: SenseKey, b: [u8; 3]) -> Option<Self> {
        if b[0] & 0x80 == 0 {
            return None;
        }
        let low = u16::from_be_bytes([b[1], b[2]]);
        let bit = if b[0] & 0x08 != 0 {
            Some(b[0] & 0x07)
        } else {
            None
        };
        Some(match key {
            SenseKey::IllegalRequest => Self::FieldPointer {
                in_cdb: b[0] & 0x40 != 0,
                bit,
                byte: low,
            },
            SenseKey::RecoveredError | SenseKey::MediumError | SenseKey::HardwareError => {
                Self::ActualRetryCount(low)
            }
            SenseKey::NoSense | SenseKey::NotReady => Self::Progress(low),
            SenseKey::CopyAborted => Self::SegmentPointer {
                segment_descriptor: b[0] & 0x20 != 0,
                bit,
                byte: low,
            },
            SenseKey::UnitAttention => Self::UnitAttentionQueueOverflow(b[0] & 0x01 != 0),
            _ => Self::Other([b[0] & 0x7f, b[1], b[2]]),
        })
    }
}

/// Decoded sense data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenseData {
    /// Fixed or descriptor format.
    pub format: SenseFormat,
    /// Deferred error (0x71/0x73): it belongs to an earlier command, e.g. a
    /// write the target had acknowledged from its cache.
    pub deferred: bool,
    /// Sense key.
    pub key: SenseKey,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// INFORMATION field when valid: for medium errors usually the first LBA
    /// in error.
    pub information: Option<u64>,
    /// COMMAND-SPECIFIC INFORMATION when non-zero (e.g. EXTENDED COPY).
    pub command_specific: Option<u64>,
    /// Sense-key-specific bytes when SKSV is set.
    pub key_specific: Option<SenseKeySpecific>,
    /// Field replaceable unit code (0 = none).
    pub fru: u8,
    /// Incorrect length indicator.
    pub ili: bool,
    /// FILEMARK (stream devices).
    pub filemark: bool,
    /// End of medium (stream devices).
    pub eom: bool,
}

const WHAT: &str = "sense data";
/// Descriptor types in descriptor-format sense data (SPC-4 table 29).
const DESC_INFORMATION: u8 = 0x00;
const DESC_COMMAND_SPECIFIC: u8 = 0x01;
const DESC_KEY_SPECIFIC: u8 = 0x02;
const DESC_FRU: u8 = 0x03;
const DESC_STREAM: u8 = 0x04;
const DESC_BLOCK: u8 = 0x05;

impl SenseData {
    /// Parses sense data as returned in a SCSI response (without the iSCSI
    /// 2-byte SenseLength prefix).
    ///
    /// The data may be shorter than the header's ADDITIONAL SENSE LENGTH says
    /// (truncated by a small buffer): fields that did not arrive stay empty.
    /// Unknown response codes and malformed descriptors are errors.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        let code = u8_at(buf, 0, WHAT)? & 0x7f;
        match code {
            0x70 | 0x71 => Self::parse_fixed(buf, code == 0x71),
            0x72 | 0x73 => Self::parse_descriptor(buf, code == 0x73),
            other => Err(ParseError::malformed(
                WHAT,
                format!("unsupported response code 0x{other:02x}"),
            )),
        }
    }

    /// The part of `buf` that the header's ADDITIONAL SENSE LENGTH covers.
    fn effective(buf: &[u8]) -> Result<&[u8], ParseError> {
        let additional = usize::from(u8_at(buf, 7, WHAT)?);
        let total = (8 + additional).min(buf.len());
        Ok(buf.get(..total).unwrap_or(buf))
    }

    fn parse_fixed(buf: &[u8], deferred: bool) -> Result<Self, ParseError> {
        // Bytes 0..8 carry the key; anything shorter is useless.
        let b = Self::effective(buf)?;
        let valid = u8_at(b, 0, WHAT)? & 0x80 != 0;
        let b2 = u8_at(b, 2, WHAT)?;
        let key = SenseKey::from_u8(b2);
        let info = be32(b, 3, WHAT)?;
        let cmd_specific = be32(b, 8, WHAT).ok().filter(|&v| v != 0);
        let key_specific = match (b.get(15), b.get(16), b.get(17)) {
            (Some(&x), Some(&y), Some(&z)) => SenseKeySpecific::decode(key, [x, y, z]),
            _ => None,
        };
        Ok(SenseData {
            format: SenseFormat::Fixed,
            deferred,
            key,
            asc: b.get(12).copied().unwrap_or(0),
            ascq: b.get(13).copied().unwrap_or(0),
            information: valid.then_some(u64::from(info)),
            command_specific: cmd_specific.map(u64::from),
            key_specific,
            fru: b.get(14).copied().unwrap_or(0),
            ili: b2 & 0x20 != 0,
            filemark: b2 & 0x80 != 0,
            eom: b2 & 0x40 != 0,
        })
    }

    fn parse_descriptor(buf: &[u8], deferred: bool) -> Result<Self, ParseError> {
        let b = Self::effective(buf)?;
        let key = SenseKey::from_u8(u8_at(b, 1, WHAT)?);
        let mut s = SenseData {
            format: SenseFormat::Descriptor,
            deferred,
            key,
            asc: u8_at(b, 2, WHAT)?,
            ascq: u8_at(b, 3, WHAT)?,
            information: None,
            command_specific: None,
            key_specific: None,
            fru: 0,
            ili: false,
            filemark: false,
            eom: false,
        };
        // A buffer shorter than the declared length was cut by the allocation
        // length: a partial last descriptor is then expected, not an error.
        let truncated = buf.len() < 8 + usize::from(u8_at(buf, 7, WHAT)?);
        let mut off = 8usize;
        while off < b.len() {
            let (Some(&dtype), Some(&dlen)) = (b.get(off), b.get(off + 1)) else {
                break; // a lone trailing byte
            };
            let end = off + 2 + usize::from(dlen);
            let Some(d) = b.get(off..end) else {
                if truncated {
                    break;
                }
                return Err(ParseError::malformed(
                    WHAT,
                    format!("descriptor 0x{dtype:02x} at byte {off} runs past the end"),
                ));
            };
            s.apply_descriptor(dtype, d)?;
            off = end;
        }
        Ok(s)
    }

    /// Applies one descriptor (`d` includes its 2-byte header).
    fn apply_descriptor(&mut self, dtype: u8, d: &[u8]) -> Result<(), ParseError> {
        let need = |len: usize| -> Result<(), ParseError> {
            if d.len() < len {
                Err(ParseError::malformed(
                    WHAT,
                    format!("descriptor 0x{dtype:02x} is {} bytes, needs {len}", d.len()),
                ))
            } else {
                Ok(())
            }
        };
        match dtype {
            DESC_INFORMATION => {
                need(12)?;
                if u8_at(d, 2, WHAT)? & 0x80 != 0 {
                    self.information = Some(be64(d, 4, WHAT)?);
                }
            }
            DESC_COMMAND_SPECIFIC => {
                need(12)?;
                self.command_specific = Some(be64(d, 4, WHAT)?).filter(|&v| v != 0);
            }
            DESC_KEY_SPECIFIC => {
                need(7)?;
                let b = [u8_at(d, 4, WHAT)?, u8_at(d, 5, WHAT)?, u8_at(d, 6, WHAT)?];
                self.key_specific = SenseKeySpecific::decode(self.key, b);
            }
            DESC_FRU => {
                need(4)?;
                self.fru = u8_at(d, 3, WHAT)?;
            }
            DESC_STREAM => {
                need(4)?;
                let f = u8_at(d, 3, WHAT)?;
                self.filemark = f & 0x80 != 0;
                self.eom = f & 0x40 != 0;
                self.ili = f & 0x20 != 0;
            }
            DESC_BLOCK => {
                need(4)?;
                self.ili = u8_at(d, 3, WHAT)? & 0x20 != 0;
            }
            // Other descriptors (ATA return, progress, vendor...) carry
            // nothing a block initiator acts on.
            _ => {}
        }
        Ok(())
    }

    /// ASC/ASCQ text, e.g. "unrecovered read error".
    pub fn description(&self) -> &'static str {
        asc_ascq_description(self.asc, self.ascq)
    }

    /// True for ASC/ASCQ `asc`/`ascq`.
    pub fn is(&self, asc: u8, ascq: u8) -> bool {
        self.asc == asc && self.ascq == ascq
    }

    /// What the initiator should do about this sense data.
    pub fn action(&self) -> SenseAction {
        classify_sense(self)
    }
}

impl fmt::Display for SenseData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.deferred {
            f.write_str("deferred error, ")?;
        }
        write!(
            f,
            "sense key {}, asc/ascq {:02x}/{:02x} ({})",
            self.key,
            self.asc,
            self.ascq,
            self.description()
        )?;
        if let Some(info) = self.information {
            write!(f, ", information 0x{info:x}")?;
        }
        match self.key_specific {
            Some(SenseKeySpecific::FieldPointer { in_cdb, bit, byte }) => {
                let place = if in_cdb { "CDB" } else { "parameter list" };
                write!(f, ", field at {place} byte {byte}")?;
                if let Some(bit) = bit {
                    write!(f, " bit {bit}")?;
                }
            }
            Some(SenseKeySpecific::Progress(p)) => {
                write!(f, ", progress {}%", u32::from(p) * 100 / 65536)?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// The text SPC-4 (Annex D) gives an ASC/ASCQ pair, for the codes a block
/// initiator is likely to meet; unknown pairs fall back to their ASC's family.
pub fn asc_ascq_description(asc: u8, ascq: u8) -> &'static str {
    if let Some(&(_, _, text)) = ASC_TABLE.iter().find(|&&(a, q, _)| a == asc && q == ascq) {
        return text;
    }
    if asc >= 0x80 {
        return "vendor specific";
    }
    match asc {
        0x04 => "logical unit not ready",
        0x0c => "write error",
        0x10 => "protection information check failed",
        0x11 => "unrecovered read error",
        0x20 => "invalid command operation code",
        0x21 => "logical block address out of range",
        0x24 => "invalid field in CDB",
        0x26 => "invalid field in parameter list",
        0x27 => "write protected",
        0x29 => "power on, reset, or bus device reset occurred",
        0x2a => "parameters changed",
        0x2f => "commands cleared",
        0x38 => "thin provisioning condition",
        0x3a => "medium not present",
        0x3f => "target operating conditions have changed",
        0x44 => "internal target failure",
        0x47 => "transport error",
        0x4b => "data phase error",
        0x55 => "system resource failure",
        0x5d => "failure prediction threshold exceeded",
        _ => "unknown additional sense code",
    }
}

/// (ASC, ASCQ, text) from SPC-4 Annex D.
const ASC_TABLE: &[(u8, u8, &str)] = &[
    (0x00, 0x00, "no additional sense information"),
    (0x00, 0x06, "I/O process terminated"),
    (0x00, 0x16, "operation in progress"),
    (0x00, 0x1d, "ATA pass through information available"),
    (0x02, 0x00, "no seek complete"),
    (0x03, 0x00, "peripheral device write fault"),
    (0x04, 0x00, "logical unit not ready, cause not reportable"),
    (0x04, 0x01, "logical unit is in process of becoming ready"),
    (
        0x04,
        0x02,
        "logical unit not ready, initializing command required",
    ),
    (
        0x04,
        0x03,
        "logical unit not ready, manual intervention required",
    ),
    (0x04, 0x04, "logical unit not ready, format in progress"),
    (0x04, 0x05, "logical unit not ready, rebuild in progress"),
    (
        0x04,
        0x06,
        "logical unit not ready, recalculation in progress",
    ),
    (0x04, 0x07, "logical unit not ready, operation in progress"),
    (0x04, 0x08, "logical unit not ready, long write in progress"),
    (0x04, 0x09, "logical unit not ready, self-test in progress"),
    (
        0x04,
        0x0a,
        "logical unit not accessible, asymmetric access state transition",
    ),
    (
        0x04,
        0x0b,
        "logical unit not accessible, target port in standby state",
    ),
    (
        0x04,
        0x0c,
        "logical unit not accessible, target port in unavailable state",
    ),
    (
        0x04,
        0x0d,
        "logical unit not ready, structure check required",
    ),
    (
        0x04,
        0x10,
        "logical unit not ready, auxiliary memory not accessible",
    ),
    (
        0x04,
        0x11,
        "logical unit not ready, notify (enable spinup) required",
    ),
    (0x04, 0x12, "logical unit not ready, offline"),
    (
        0x04,
        0x13,
        "logical unit not ready, SA creation in progress",
    ),
    (
        0x04,
        0x14,
        "logical unit not ready, space allocation in progress",
    ),
    (0x04, 0x1b, "logical unit not ready, sanitize in progress"),
    (
        0x04,
        0x1c,
        "logical unit not ready, additional power use not yet granted",
    ),
    (0x05, 0x00, "logical unit does not respond to selection"),
    (0x08, 0x00, "logical unit communication failure"),
    (0x08, 0x01, "logical unit communication time-out"),
    (0x08, 0x02, "logical unit communication parity error"),
    (0x0b, 0x00, "warning"),
    (0x0b, 0x01, "warning - specified temperature exceeded"),
    (0x0c, 0x00, "write error"),
    (0x0c, 0x02, "write error - auto reallocation failed"),
    (0x0c, 0x03, "write error - recommend reassignment"),
    (0x0c, 0x07, "write error - recovery needed"),
    (0x0c, 0x08, "write error - recovery failed"),
    (0x0e, 0x01, "information unit too short"),
    (0x0e, 0x02, "information unit too long"),
    (0x0e, 0x03, "invalid field in command information unit"),
    (0x10, 0x00, "ID CRC or ECC error"),
    (0x10, 0x01, "logical block guard check failed"),
    (0x10, 0x02, "logical block application tag check failed"),
    (0x10, 0x03, "logical block reference tag check failed"),
    (0x11, 0x00, "unrecovered read error"),
    (0x11, 0x01, "read retries exhausted"),
    (0x11, 0x02, "error too long to correct"),
    (
        0x11,
        0x04,
        "unrecovered read error - auto reallocate failed",
    ),
    (0x11, 0x0a, "miscorrected error"),
    (
        0x11,
        0x0b,
        "unrecovered read error - recommend reassignment",
    ),
    (
        0x11,
        0x0c,
        "unrecovered read error - recommend rewrite the data",
    ),
    (
        0x11,
        0x14,
        "read error - LBA marked bad by application client",
    ),
    (0x14, 0x01, "record not found"),
    (0x15, 0x00, "random positioning error"),
    (0x16, 0x00, "data synchronization mark error"),
    (
        0x17,
        0x00,
        "recovered data with no error correction applied",
    ),
    (0x17, 0x01, "recovered data with retries"),
    (0x18, 0x00, "recovered data with error correction applied"),
    (0x1a, 0x00, "parameter list length error"),
    (0x1d, 0x00, "miscompare during verify operation"),
    (0x20, 0x00, "invalid command operation code"),
    (0x20, 0x02, "access denied - no access rights"),
    (0x20, 0x09, "access denied - invalid LU identifier"),
    (0x21, 0x00, "logical block address out of range"),
    (0x21, 0x01, "invalid element address"),
    (0x21, 0x02, "invalid address for write"),
    (0x21, 0x04, "unaligned write command"),
    (0x21, 0x05, "write boundary violation"),
    (0x24, 0x00, "invalid field in CDB"),
    (0x24, 0x01, "CDB decryption error"),
    (0x25, 0x00, "logical unit not supported"),
    (0x26, 0x00, "invalid field in parameter list"),
    (0x26, 0x01, "parameter not supported"),
    (0x26, 0x02, "parameter value invalid"),
    (0x26, 0x03, "threshold parameters not supported"),
    (0x26, 0x04, "invalid release of persistent reservation"),
    (0x27, 0x00, "write protected"),
    (0x27, 0x01, "hardware write protected"),
    (0x27, 0x02, "logical unit software write protected"),
    (0x27, 0x03, "associated write protect"),
    (0x27, 0x04, "persistent write protect"),
    (0x27, 0x05, "permanent write protect"),
    (0x27, 0x06, "conditional write protect"),
    (0x27, 0x07, "space allocation failed write protect"),
    (0x27, 0x08, "zone is read only"),
    (
        0x28,
        0x00,
        "not ready to ready change, medium may have changed",
    ),
    (0x29, 0x00, "power on, reset, or bus device reset occurred"),
    (0x29, 0x01, "power on occurred"),
    (0x29, 0x02, "SCSI bus reset occurred"),
    (0x29, 0x03, "bus device reset function occurred"),
    (0x29, 0x04, "device internal reset"),
    (0x29, 0x05, "transceiver mode changed to single-ended"),
    (0x29, 0x06, "transceiver mode changed to LVD"),
    (0x29, 0x07, "I_T nexus loss occurred"),
    (0x2a, 0x00, "parameters changed"),
    (0x2a, 0x01, "mode parameters changed"),
    (0x2a, 0x02, "log parameters changed"),
    (0x2a, 0x03, "reservations preempted"),
    (0x2a, 0x04, "reservations released"),
    (0x2a, 0x05, "registrations preempted"),
    (0x2a, 0x06, "asymmetric access state changed"),
    (
        0x2a,
        0x07,
        "implicit asymmetric access state transition failed",
    ),
    (0x2a, 0x08, "priority changed"),
    (0x2a, 0x09, "capacity data has changed"),
    (0x2a, 0x10, "timestamp changed"),
    (0x2c, 0x00, "command sequence error"),
    (0x2f, 0x00, "commands cleared by another initiator"),
    (0x2f, 0x01, "commands cleared by power loss notification"),
    (0x2f, 0x02, "commands cleared by device server"),
    (0x31, 0x00, "medium format corrupted"),
    (0x31, 0x01, "format command failed"),
    (0x32, 0x00, "no defect spare location available"),
    (0x37, 0x00, "rounded parameter"),
    (0x38, 0x07, "thin provisioning soft threshold reached"),
    (0x39, 0x00, "saving parameters not supported"),
    (0x3a, 0x00, "medium not present"),
    (0x3a, 0x01, "medium not present - tray closed"),
    (0x3a, 0x02, "medium not present - tray open"),
    (0x3e, 0x00, "logical unit has not self-configured yet"),
    (0x3e, 0x01, "logical unit failure"),
    (0x3e, 0x02, "timeout on logical unit"),
    (0x3e, 0x03, "logical unit failed self-test"),
    (0x3f, 0x00, "target operating conditions have changed"),
    (0x3f, 0x01, "microcode has been changed"),
    (0x3f, 0x02, "changed operating definition"),
    (0x3f, 0x03, "inquiry data has changed"),
    (0x3f, 0x04, "component device attached"),
    (0x3f, 0x05, "device identifier changed"),
    (0x3f, 0x0e, "reported luns data has changed"),
    (0x3f, 0x0f, "echo buffer overwritten"),
    (0x43, 0x00, "message error"),
    (0x44, 0x00, "internal target failure"),
    (0x45, 0x00, "select or reselect failure"),
    (0x47, 0x00, "SCSI parity error"),
    (0x47, 0x01, "data phase CRC error detected"),
    (0x47, 0x03, "information unit iuCRC error detected"),
    (0x47, 0x05, "protocol service CRC error"),
    (0x48, 0x00, "initiator detected error message received"),
    (0x49, 0x00, "invalid message error"),
    (0x4a, 0x00, "command phase error"),
    (0x4b, 0x00, "data phase error"),
    (0x4b, 0x01, "invalid target port transfer tag received"),
    (0x4b, 0x02, "too much write data"),
    (0x4b, 0x03, "ACK/NAK timeout"),
    (0x4b, 0x04, "NAK received"),
    (0x4b, 0x05, "data offset error"),
    (0x4b, 0x06, "initiator response timeout"),
    (0x4b, 0x07, "connection lost"),
    (0x4c, 0x00, "logical unit failed self-configuration"),
    (0x4e, 0x00, "overlapped commands attempted"),
    (0x55, 0x00, "system resource failure"),
    (0x55, 0x03, "insufficient resources"),
    (0x55, 0x04, "insufficient registration resources"),
    (0x5d, 0x00, "failure prediction threshold exceeded"),
    (0x5e, 0x00, "low power condition on"),
];

/// The kind of unit attention, so the caller knows what to re-read before
/// retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitAttention {
    /// 29/xx: power on, reset, I_T nexus loss. Nothing to re-read.
    PowerOnReset,
    /// 2A/09: the capacity changed: re-read READ CAPACITY and tell the guest.
    CapacityChanged,
    /// 2A/01: mode parameters changed (e.g. write cache setting).
    ModeParametersChanged,
    /// 2A/06 and 2A/07: ALUA state changed.
    AsymmetricAccessChanged,
    /// Other 2A/xx: some parameters changed (reservations...).
    ParametersChanged,
    /// 3F/0E: the LUN inventory changed.
    ReportedLunsChanged,
    /// 3F/03 and 3F/05: INQUIRY or device identification changed.
    InquiryDataChanged,
    /// Other 3F/xx: target operating conditions changed.
    OperatingConditionsChanged,
    /// 38/07: thin provisioning soft threshold reached (space running low).
    ThinProvisioningThreshold,
    /// 2F/xx: our commands were cleared by another initiator or the target.
    CommandsCleared,
    /// 28/00: medium may have changed.
    MediumChanged,
    /// Anything else.
    Other,
}

impl UnitAttention {
    /// True when the LUN's geometry or settings may differ now and the
    /// caller should probe the LUN again.
    pub fn needs_rescan(self) -> bool {
        matches!(
            self,
            Self::CapacityChanged
                | Self::ModeParametersChanged
                | Self::ParametersChanged
                | Self::InquiryDataChanged
                | Self::MediumChanged
        )
    }

    fn from_codes(asc: u8, ascq: u8) -> Self {
        match (asc, ascq) {
            (0x29, _) => Self::PowerOnReset,
            (0x2a, 0x09) => Self::CapacityChanged,
            (0x2a, 0x01) => Self::ModeParametersChanged,
            (0x2a, 0x06) | (0x2a, 0x07) => Self::AsymmetricAccessChanged,
            (0x2a, _) => Self::ParametersChanged,
            (0x3f, 0x0e) => Self::ReportedLunsChanged,
            (0x3f, 0x03) | (0x3f, 0x05) => Self::InquiryDataChanged,
            (0x3f, _) => Self::OperatingConditionsChanged,
            (0x38, 0x07) => Self::ThinProvisioningThreshold,
            (0x2f, _) => Self::CommandsCleared,
            (0x28, 0x00) => Self::MediumChanged,
            _ => Self::Other,
        }
    }
}

/// Why a command failed for good, to pick an error status and a log message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoFailure {
    /// Medium error (read or write).
    Medium,
    /// Hardware error in the target.
    Hardware,
    /// The LBA range is beyond the capacity (21/00).
    OutOfRange,
    /// Illegal request other than an unsupported command.
    InvalidRequest,
    /// The logical unit does not exist (25/00).
    LunNotSupported,
    /// Protection information check failed (10/xx): data corruption.
    DataIntegrity,
    /// COMPARE/VERIFY found different data.
    Miscompare,
    /// The logical unit is not ready and will not become ready by itself.
    NotReady,
    /// A thin-provisioned LUN ran out of space (27/07).
    NoSpace,
    /// Access was denied (DATA PROTECT other than write protection).
    AccessDenied,
    /// Another initiator holds a reservation.
    ReservationConflict,
    /// Anything else (including CHECK CONDITION without sense data).
    Other,
}

/// What to do about a failed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenseAction {
    /// The command did its work (GOOD, or RECOVERED ERROR, whose data is valid).
    Success,
    /// Transient: retry the same command, a bounded number of times, ideally
    /// after a short delay.
    Retry,
    /// A unit attention was reported and the command was not executed: act on
    /// the kind (e.g. re-read capacity), then retry.
    RetryAfterUnitAttention(UnitAttention),
    /// The command cannot succeed; fail the request.
    Fail(IoFailure),
    /// The target does not implement this command (20/00) or the opcode /
    /// service action byte (24/00 pointing at CDB byte 0 or 1): the caller
    /// may fall back (16 → 10 byte CDBs) or stop using the feature.
    Unsupported,
    /// The LUN is write protected: fail the write and treat the disk as
    /// read-only.
    WriteProtected,
}

fn classify_sense(s: &SenseData) -> SenseAction {
    use SenseAction::*;
    match s.key {
        SenseKey::NoSense => match (s.asc, s.ascq) {
            // Linux treats CHECK CONDITION with NO SENSE 00/00 as retryable.
            (0x00, 0x00) => Retry,
            (0x5d, _) => Success, // failure prediction: informational
            _ => Retry,
        },
        SenseKey::RecoveredError | SenseKey::Completed => Success,
        SenseKey::NotReady => match (s.asc, s.ascq) {
            (0x04, 0x01 | 0x04 | 0x05 | 0x06 | 0x07 | 0x08 | 0x09 | 0x0a | 0x13 | 0x14 | 0x1b) => {
                Retry
            }
            _ => Fail(IoFailure::NotReady),
        },
        SenseKey::MediumError | SenseKey::BlankCheck => Fail(IoFailure::Medium),
        SenseKey::HardwareError => Fail(IoFailure::Hardware),
        SenseKey::IllegalRequest => match (s.asc, s.ascq) {
            (0x20, 0x00) => Unsupported,
            (0x24, 0x00) => match s.key_specific {
                // The opcode or service action byte was refused: the target
                // does not know this command.
                Some(SenseKeySpecific::FieldPointer {
                    in_cdb: true,
                    byte: 0 | 1,
                    ..
                }) => Unsupported,
                _ => Fail(IoFailure::InvalidRequest),
            },
            (0x21, _) => Fail(IoFailure::OutOfRange),
            (0x25, 0x00) => Fail(IoFailure::LunNotSupported),
            (0x10, _) => Fail(IoFailure::DataIntegrity),
            _ => Fail(IoFailure::InvalidRequest),
        },
        SenseKey::UnitAttention => {
            RetryAfterUnitAttention(UnitAttention::from_codes(s.asc, s.ascq))
        }
        SenseKey::DataProtect => match (s.asc, s.ascq) {
            (0x27, 0x07) => Fail(IoFailure::NoSpace),
            (0x27, _) => WriteProtected,
            _ => Fail(IoFailure::AccessDenied),
        },
        SenseKey::AbortedCommand => match s.asc {
            0x10 => Fail(IoFailure::DataIntegrity),
            _ => Retry,
        },
        SenseKey::Miscompare => Fail(IoFailure::Miscompare),
        SenseKey::VendorSpecific
        | SenseKey::CopyAborted
        | SenseKey::Reserved
        | SenseKey::VolumeOverflow => Fail(IoFailure::Other),
    }
}

/// Classifies a completed command from its status and (for CHECK
/// CONDITION) its sense data.
pub fn classify(status: ScsiStatus, sense: Option<&SenseData>) -> SenseAction {
    match status {
        ScsiStatus::Good | ScsiStatus::ConditionMet => SenseAction::Success,
        ScsiStatus::CheckCondition => match sense {
            Some(s) => s.action(),
            // Without sense data there is nothing to base a retry on;
            // failing avoids retrying forever.
            None => SenseAction::Fail(IoFailure::Other),
        },
        ScsiStatus::Busy | ScsiStatus::TaskSetFull | ScsiStatus::TaskAborted => SenseAction::Retry,
        ScsiStatus::ReservationConflict => SenseAction::Fail(IoFailure::ReservationConflict),
        ScsiStatus::AcaActive | ScsiStatus::Other(_) => SenseAction::Fail(IoFailure::Other),
    }
}

/// Convenience for tests and callers: parse then classify; a malformed
/// sense buffer counts as CHECK CONDITION without sense data.
pub fn classify_raw(status: ScsiStatus, sense: &[u8]) -> SenseAction {
    let parsed = if sense.is_empty() {
        None
    } else {
        SenseData::parse(sense).ok()
    };
    classify(status, parsed.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::wire::{pseudo_random, unhex};

    /// Unit attention tgtd sent to TEST UNIT READY after login (iSCSI
    /// SenseLength prefix 0x0012 stripped).
    const TGTD_UA_POWER_ON: &str = "700006000000000a00000000290000000000";
    /// tgtd's answer to READ(16) beyond the end of the LUN.
    const TGTD_LBA_OUT_OF_RANGE: &str = "700005000000000a00000000210000000000";
    /// tgtd's answer to WRITE(10) on a read-only LUN.
    const TGTD_WRITE_PROTECT: &str = "700007000000000a00000000270000000000";
    /// tgtd's answer to WRITE SAME(16) with the ANCHOR bit.
    const TGTD_INVALID_FIELD: &str = "700005000000000a00000000240000000000";

    #[test]
    fn tgtd_fixed_sense() {
        let s = SenseData::parse(&unhex(TGTD_UA_POWER_ON)).unwrap();
        assert_eq!(s.format, SenseFormat::Fixed);
        assert_eq!(s.key, SenseKey::UnitAttention);
        assert_eq!((s.asc, s.ascq), (0x29, 0x00));
        assert_eq!(s.information, None);
        assert_eq!(
            s.action(),
            SenseAction::RetryAfterUnitAttention(UnitAttention::PowerOnReset)
        );
        assert_eq!(
            s.to_string(),
            "sense key UNIT ATTENTION, asc/ascq 29/00 (power on, reset, or bus device reset occurred)"
        );

        let s = SenseData::parse(&unhex(TGTD_LBA_OUT_OF_RANGE)).unwrap();
        assert_eq!(s.action(), SenseAction::Fail(IoFailure::OutOfRange));
        let s = SenseData::parse(&unhex(TGTD_WRITE_PROTECT)).unwrap();
        assert_eq!(s.action(), SenseAction::WriteProtected);
        let s = SenseData::parse(&unhex(TGTD_INVALID_FIELD)).unwrap();
        assert_eq!(s.action(), SenseAction::Fail(IoFailure::InvalidRequest));
    }

    #[test]
    fn fixed_with_information_and_field_pointer() {
        // Medium error at LBA 0x12345678, VALID set, retry count 3.
        let s = SenseData::parse(&unhex("f00003123456780a00000000110000800003")).unwrap();
        assert_eq!(s.information, Some(0x1234_5678));
        assert_eq!(s.key_specific, Some(SenseKeySpecific::ActualRetryCount(3)));
        assert_eq!(
            s.to_string(),
            "sense key MEDIUM ERROR, asc/ascq 11/00 (unrecovered read error), information 0x12345678"
        );
        assert_eq!(s.action(), SenseAction::Fail(IoFailure::Medium));

        // Invalid field in CDB, byte 1 bit 3: the FUA bit refused.
        let s = SenseData::parse(&unhex("700005000000000a00000000240000cb0001")).unwrap();
        assert_eq!(
            s.key_specific,
            Some(SenseKeySpecific::FieldPointer {
                in_cdb: true,
                bit: Some(3),
                byte: 1
            })
        );
        assert_eq!(s.action(), SenseAction::Unsupported);
        assert!(s.to_string().ends_with("field at CDB byte 1 bit 3"));

        // Same code pointing at byte 2 is a real invalid field.
        let s = SenseData::parse(&unhex("700005000000000a00000000240000c00002")).unwrap();
        assert_eq!(s.action(), SenseAction::Fail(IoFailure::InvalidRequest));

        // Invalid opcode, deferred flag via 0x71.
        let s = SenseData::parse(&unhex("710005000000000a00000000200000000000")).unwrap();
        assert!(s.deferred);
        assert_eq!(s.action(), SenseAction::Unsupported);
        assert!(s.to_string().starts_with("deferred error, "));
    }

    #[test]
    fn short_fixed_sense_keeps_what_arrived() {
        // Additional length claims 10 bytes but only 8+4 arrived: no ASC.
        let s = SenseData::parse(&unhex("700002000000000a00000000")).unwrap();
        assert_eq!(s.key, SenseKey::NotReady);
        assert_eq!(s.asc, 0);
        // Additional length 4: ASC/ASCQ are outside the valid range.
        let s = SenseData::parse(&unhex("70000600000000040000000029000000")).unwrap();
        assert_eq!((s.asc, s.ascq), (0, 0));
    }

    #[test]
    fn descriptor_format() {
        // 0x72, MEDIUM ERROR 11/00, information descriptor (LBA 0x1_0000_0000),
        // sense-key-specific (retry 5), block command descriptor with ILI.
        let raw = unhex(
            "7203110000000018\
             000a800000000001 00000000\
             0206000080000500\
             05020020",
        );
        let s = SenseData::parse(&raw).unwrap();
        assert_eq!(s.format, SenseFormat::Descriptor);
        assert_eq!(s.key, SenseKey::MediumError);
        assert_eq!(s.information, Some(0x1_0000_0000));
        assert_eq!(s.key_specific, Some(SenseKeySpecific::ActualRetryCount(5)));
        assert!(s.ili);
        // Descriptor-format capacity change UA without descriptors.
        let s = SenseData::parse(&unhex("72062a0900000000")).unwrap();
        match s.action() {
            SenseAction::RetryAfterUnitAttention(k) => {
                assert_eq!(k, UnitAttention::CapacityChanged);
                assert!(k.needs_rescan());
            }
            other => panic!("unexpected {other:?}"),
        }
        // Progress indication on NOT READY 04/04.
        let s = SenseData::parse(&unhex("7202040400000008 0206000080800000")).unwrap();
        assert_eq!(s.key_specific, Some(SenseKeySpecific::Progress(0x8000)));
        assert_eq!(s.action(), SenseAction::Retry);
        assert!(s.to_string().ends_with("progress 50%"));
    }

    #[test]
    fn malformed_descriptors_are_errors() {
        // Information descriptor claiming 2 bytes.
        assert!(SenseData::parse(&unhex("7203110000000004 00020000")).is_err());
        // Descriptor runs past the declared additional length.
        assert!(SenseData::parse(&unhex("7203110000000004 000a8000 0000000000000000")).is_err());
        // Unknown response code.
        assert!(SenseData::parse(&unhex("7f0000000000000000")).is_err());
        assert!(SenseData::parse(&[]).is_err());
        assert!(SenseData::parse(&[0x70, 0, 5]).is_err());
    }

    #[test]
    fn classification_table() {
        let mk = |key: u8, asc: u8, ascq: u8| {
            let mut b = unhex("700000000000000a00000000000000000000");
            b[2] = key;
            b[12] = asc;
            b[13] = ascq;
            SenseData::parse(&b).unwrap()
        };
        assert_eq!(mk(2, 4, 1).action(), SenseAction::Retry);
        assert_eq!(mk(2, 4, 3).action(), SenseAction::Fail(IoFailure::NotReady));
        assert_eq!(
            mk(2, 0x3a, 0).action(),
            SenseAction::Fail(IoFailure::NotReady)
        );
        assert_eq!(
            mk(7, 0x27, 7).action(),
            SenseAction::Fail(IoFailure::NoSpace)
        );
        assert_eq!(mk(0xb, 0x47, 1).action(), SenseAction::Retry);
        assert_eq!(
            mk(0xb, 0x10, 1).action(),
            SenseAction::Fail(IoFailure::DataIntegrity)
        );
        assert_eq!(mk(1, 0x17, 1).action(), SenseAction::Success);
        assert_eq!(
            mk(5, 0x25, 0).action(),
            SenseAction::Fail(IoFailure::LunNotSupported)
        );
        assert_eq!(
            mk(6, 0x3f, 0x0e).action(),
            SenseAction::RetryAfterUnitAttention(UnitAttention::ReportedLunsChanged)
        );
        assert_eq!(
            mk(6, 0x38, 0x07).action(),
            SenseAction::RetryAfterUnitAttention(UnitAttention::ThinProvisioningThreshold)
        );
        assert_eq!(
            mk(4, 0x44, 0).action(),
            SenseAction::Fail(IoFailure::Hardware)
        );
        assert_eq!(classify(ScsiStatus::Busy, None), SenseAction::Retry);
        assert_eq!(classify(ScsiStatus::Good, None), SenseAction::Success);
        assert_eq!(
            classify(ScsiStatus::ReservationConflict, None),
            SenseAction::Fail(IoFailure::ReservationConflict)
        );
        assert_eq!(
            classify(ScsiStatus::CheckCondition, None),
            SenseAction::Fail(IoFailure::Other)
        );
        assert_eq!(
            classify_raw(ScsiStatus::CheckCondition, &unhex(TGTD_WRITE_PROTECT)),
            SenseAction::WriteProtected
        );
    }

    #[test]
    fn descriptions() {
        assert_eq!(asc_ascq_description(0x11, 0x00), "unrecovered read error");
        assert_eq!(
            asc_ascq_description(0x27, 0x07),
            "space allocation failed write protect"
        );
        assert_eq!(
            asc_ascq_description(0x38, 0x07),
            "thin provisioning soft threshold reached"
        );
        assert_eq!(asc_ascq_description(0x11, 0x77), "unrecovered read error");
        assert_eq!(asc_ascq_description(0x90, 0x00), "vendor specific");
        assert_eq!(
            asc_ascq_description(0x7e, 0x00),
            "unknown additional sense code"
        );
        for &(a, q, t) in ASC_TABLE {
            assert!(!t.is_empty());
            assert_eq!(
                ASC_TABLE.iter().filter(|e| e.0 == a && e.1 == q).count(),
                1,
                "dup {a:02x}/{q:02x}"
            );
        }
    }

    #[test]
    fn never_panics() {
        let valid = [
            unhex(TGTD_UA_POWER_ON),
            unhex("7203110000000018000a8000000000010000000002060000800005000502 0020"),
        ];
        for v in &valid {
            for n in 0..=v.len() {
                let _ = SenseData::parse(&v[..n]).map(|s| s.to_string());
            }
        }
        for seed in 0..3000u64 {
            let mut b = pseudo_random(seed, (seed % 64) as usize);
            if let Some(f) = b.first_mut() {
                *f = 0x70 | (seed as u8 & 3);
            }
            let _ = SenseData::parse(&b).map(|s| (s.to_string(), s.action()));
        }
    }
}
