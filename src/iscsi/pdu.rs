//! The 48-byte Basic Header Segment (BHS) of every iSCSI PDU (RFC 7143 §11).
//!
//! Each PDU type has a typed header struct with `encode` (to the 48 wire
//! bytes) and a decoder. Initiator PDUs are what we send; target PDUs are what
//! we receive and are decoded through [`TargetPdu::decode`], which checks
//! every field a hostile target could get wrong. Target PDUs can be encoded
//! too, and initiator PDUs decoded, so tests and fake targets can produce real
//! byte sequences and round trips can be checked.
//!
//! Data segments, AHS and digests are not part of the BHS: use
//! [`peek_lengths`] and [`pdu_wire_length`] to know how many bytes follow.

use std::cmp::Ordering;

use thiserror::Error;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;

/// Length of a header or data digest (CRC32C) on the wire.
pub const DIGEST_LEN: usize = 4;

/// The reserved tag value (ITT or TTT) meaning "no task" (RFC 7143 §11.18.2).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Largest value of the 24-bit DataSegmentLength field.
pub const MAX_DATA_SEGMENT_LENGTH: u32 = 0x00ff_ffff;

/// The only iSCSI version defined (RFC 7143 §11.12.4: Version-max/min 0x00).
pub const ISCSI_VERSION: u8 = 0x00;

const IMMEDIATE_BIT: u8 = 0x40;
const OPCODE_MASK: u8 = 0x3f;
const FINAL_BIT: u8 = 0x80;

/// A malformed or unsupported PDU header.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PduError {
    /// The opcode is not one RFC 7143 defines.
    #[error("unknown iSCSI opcode {0:#04x}")]
    UnknownOpcode(u8),
    /// A vendor-specific opcode, which this initiator does not speak.
    #[error("unsupported vendor-specific iSCSI opcode {0:#04x}")]
    VendorOpcode(u8),
    /// An initiator opcode arrived where a target PDU was expected, or the
    /// other way round.
    #[error("iSCSI opcode {opcode:?} is not valid from the {expected}")]
    WrongDirection {
        /// The opcode received.
        opcode: Opcode,
        /// Who was expected to send it ("target" or "initiator").
        expected: &'static str,
    },
    /// A field holds a value outside its defined range.
    #[error("invalid {field} {value:#x} in iSCSI {pdu} header")]
    InvalidField {
        /// PDU type name.
        pdu: &'static str,
        /// Field name.
        field: &'static str,
        /// The offending value.
        value: u32,
    },
    /// A combination of flags the RFC forbids.
    #[error("invalid flags in iSCSI {pdu} header: {why}")]
    InvalidFlags {
        /// PDU type name.
        pdu: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// A length that does not fit its wire field.
    #[error("{what} of {value} bytes does not fit an iSCSI PDU (max {max})")]
    TooLong {
        /// What was too long.
        what: &'static str,
        /// Its length.
        value: usize,
        /// The largest allowed.
        max: usize,
    },
}

/// iSCSI opcodes (RFC 7143 §11.2.1.2), initiator (0x00–0x1f) and target
/// (0x20–0x3f). Vendor-specific opcodes are rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// NOP-Out.
    NopOut = 0x00,
    /// SCSI Command.
    ScsiCommand = 0x01,
    /// SCSI Task Management Function Request.
    TaskMgmtRequest = 0x02,
    /// Login Request.
    LoginRequest = 0x03,
    /// Text Request.
    TextRequest = 0x04,
    /// SCSI Data-Out.
    DataOut = 0x05,
    /// Logout Request.
    LogoutRequest = 0x06,
    /// SNACK Request (not built by this initiator).
    SnackRequest = 0x10,
    /// NOP-In.
    NopIn = 0x20,
    /// SCSI Response.
    ScsiResponse = 0x21,
    /// SCSI Task Management Function Response.
    TaskMgmtResponse = 0x22,
    /// Login Response.
    LoginResponse = 0x23,
    /// Text Response.
    TextResponse = 0x24,
    /// SCSI Data-In.
    DataIn = 0x25,
    /// Logout Response.
    LogoutResponse = 0x26,
    /// Ready To Transfer.
    R2t = 0x31,
    /// Asynchronous Message.
    AsyncMessage = 0x32,
    /// Reject.
    Reject = 0x3f,
}

impl Opcode {
    /// Parse the low six bits of BHS byte 0.
    pub fn from_u8(v: u8) -> Result<Self, PduError> {
        Ok(match v & OPCODE_MASK {
            0x00 => Self::NopOut,
            0x01 => Self::ScsiCommand,
            0x02 => Self::TaskMgmtRequest,
            0x03 => Self::LoginRequest,
            0x04 => Self::TextRequest,
            0x05 => Self::DataOut,
            0x06 => Self::LogoutRequest,
            0x10 => Self::SnackRequest,
            0x20 => Self::NopIn,
            0x21 => Self::ScsiResponse,
            0x22 => Self::TaskMgmtResponse,
            0x23 => Self::LoginResponse,
            0x24 => Self::TextResponse,
            0x25 => Self::DataIn,
            0x26 => Self::LogoutResponse,
            0x31 => Self::R2t,
            0x32 => Self::AsyncMessage,
            0x3f => Self::Reject,
            o @ (0x1c..=0x1e | 0x3c..=0x3e) => return Err(PduError::VendorOpcode(o)),
            o => return Err(PduError::UnknownOpcode(o)),
        })
    }

    /// True for opcodes an initiator sends.
    pub fn is_initiator(self) -> bool {
        (self as u8) < 0x20
    }
}

/// A 24-bit length (the DataSegmentLength field), checked at construction so
/// encoding can never truncate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
pub struct U24(u32);

impl U24 {
    /// Zero.
    pub const ZERO: U24 = U24(0);

    /// Check that `v` fits 24 bits.
    pub fn new(v: u32) -> Result<Self, PduError> {
        if v > MAX_DATA_SEGMENT_LENGTH {
            return Err(PduError::TooLong {
                what: "data segment",
                value: v as usize,
                max: MAX_DATA_SEGMENT_LENGTH as usize,
            });
        }
        Ok(U24(v))
    }

    /// Same as [`U24::new`] for a `usize` length.
    pub fn from_len(len: usize) -> Result<Self, PduError> {
        match u32::try_from(len) {
            Ok(v) => Self::new(v),
            Err(_) => Err(PduError::TooLong {
                what: "data segment",
                value: len,
                max: MAX_DATA_SEGMENT_LENGTH as usize,
            }),
        }
    }

    /// The value.
    pub fn get(self) -> u32 {
        self.0
    }
}

/// A SCSI CDB of at most 16 bytes (longer CDBs need an extended-CDB AHS,
/// which this initiator does not build).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cdb {
    bytes: [u8; 16],
    len: u8,
}

impl Cdb {
    /// Copy a CDB; errors if it is longer than 16 bytes.
    pub fn new(cdb: &[u8]) -> Result<Self, PduError> {
        let mut bytes = [0u8; 16];
        let dst = bytes.get_mut(..cdb.len()).ok_or(PduError::TooLong {
            what: "CDB",
            value: cdb.len(),
            max: 16,
        })?;
        dst.copy_from_slice(cdb);
        Ok(Cdb {
            bytes,
            len: cdb.len() as u8,
        })
    }

    /// The CDB bytes as given (a decoded CDB is always 16 bytes long, as the
    /// wire does not carry the CDB length).
    pub fn as_slice(&self) -> &[u8] {
        self.bytes
            .get(..usize::from(self.len))
            .unwrap_or(&self.bytes)
    }

    /// The 16-byte field as on the wire (zero padded).
    pub fn wire(&self) -> [u8; 16] {
        self.bytes
    }
}

/// Login stage (CSG/NSG, RFC 7143 §11.12.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Stage {
    /// SecurityNegotiation.
    Security = 0,
    /// LoginOperationalNegotiation.
    Operational = 1,
    /// FullFeaturePhase.
    FullFeature = 3,
}

impl Stage {
    fn from_bits(pdu: &'static str, field: &'static str, v: u8) -> Result<Self, PduError> {
        match v & 3 {
            0 => Ok(Stage::Security),
            1 => Ok(Stage::Operational),
            3 => Ok(Stage::FullFeature),
            other => Err(PduError::InvalidField {
                pdu,
                field,
                value: other.into(),
            }),
        }
    }
}

/// SCSI task attribute (RFC 7143 §11.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum TaskAttr {
    /// Untagged.
    Untagged = 0,
    /// Simple (the usual one).
    #[default]
    Simple = 1,
    /// Ordered.
    Ordered = 2,
    /// Head of queue.
    HeadOfQueue = 3,
    /// ACA.
    Aca = 4,
}

/// Logout reason code (RFC 7143 §11.14.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LogoutReason {
    /// Close the session.
    CloseSession = 0,
    /// Close the connection.
    CloseConnection = 1,
    /// Remove the connection for recovery.
    RemoveForRecovery = 2,
}

/// Task management function (RFC 7143 §11.5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TmfFunction {
    /// ABORT TASK.
    AbortTask = 1,
    /// ABORT TASK SET.
    AbortTaskSet = 2,
    /// CLEAR ACA.
    ClearAca = 3,
    /// CLEAR TASK SET.
    ClearTaskSet = 4,
    /// LOGICAL UNIT RESET.
    LogicalUnitReset = 5,
    /// TARGET WARM RESET.
    TargetWarmReset = 6,
    /// TARGET COLD RESET.
    TargetColdReset = 7,
    /// TASK REASSIGN.
    TaskReassign = 8,
}

/// Task management response (RFC 7143 §11.6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TmfResponse {
    /// Function complete.
    Complete = 0,
    /// Task does not exist.
    TaskDoesNotExist = 1,
    /// LUN does not exist.
    LunDoesNotExist = 2,
    /// Task still allegiant.
    TaskStillAllegiant = 3,
    /// Task allegiance reassignment not supported.
    ReassignNotSupported = 4,
    /// Task management function not supported.
    NotSupported = 5,
    /// Function authorization failed.
    AuthorizationFailed = 6,
    /// Function rejected.
    Rejected = 255,
}

/// Logout response code (RFC 7143 §11.15.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LogoutResponseCode {
    /// Connection or session closed successfully.
    Closed = 0,
    /// CID not found.
    CidNotFound = 1,
    /// Connection recovery is not supported.
    RecoveryNotSupported = 2,
    /// Cleanup failed for various reasons.
    CleanupFailed = 3,
}

/// Reject reason (RFC 7143 §11.17.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RejectReason {
    /// Reserved value 0x01 (kept: some targets still send it).
    Reserved = 0x01,
    /// Data (payload) digest error.
    DataDigestError = 0x02,
    /// SNACK reject.
    SnackReject = 0x03,
    /// Protocol error.
    ProtocolError = 0x04,
    /// Command not supported.
    CommandNotSupported = 0x05,
    /// Immediate command rejected: too many immediate commands.
    ImmediateCommandReject = 0x06,
    /// Task in progress.
    TaskInProgress = 0x07,
    /// Invalid data ACK.
    InvalidDataAck = 0x08,
    /// Invalid PDU field.
    InvalidPduField = 0x09,
    /// Long operation reject: cannot generate a target transfer tag.
    LongOperationReject = 0x0a,
    /// Deprecated (negotiation reset).
    NegotiationReset = 0x0b,
    /// Waiting for logout.
    WaitingForLogout = 0x0c,
}

/// Asynchronous event code (RFC 7143 §11.9.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AsyncEvent {
    /// A SCSI asynchronous event; sense data is in the data segment.
    ScsiEvent = 0,
    /// The target asks us to log out.
    LogoutRequested = 1,
    /// The target will drop this connection.
    ConnectionDropped = 2,
    /// The target will drop all connections of the session.
    SessionDropped = 3,
    /// The target asks for parameter renegotiation.
    NegotiationRequested = 4,
    /// The target signals a task termination (RFC 7143: 5).
    TaskTermination = 5,
    /// Vendor specific.
    Vendor = 255,
}

macro_rules! u8_enum_from {
    ($name:ident, $pdu:expr, $field:expr, [$($variant:ident),* $(,)?]) => {
        impl $name {
            fn decode(v: u8) -> Result<Self, PduError> {
                $(if v == $name::$variant as u8 { return Ok($name::$variant); })*
                Err(PduError::InvalidField { pdu: $pdu, field: $field, value: v.into() })
            }
        }
    };
}

u8_enum_from!(
    TaskAttr,
    "SCSI Command",
    "task attribute",
    [Untagged, Simple, Ordered, HeadOfQueue, Aca]
);
u8_enum_from!(
    LogoutReason,
    "Logout Request",
    "reason",
    [CloseSession, CloseConnection, RemoveForRecovery]
);
u8_enum_from!(
    TmfFunction,
    "Task Management Request",
    "function",
    [
        AbortTask,
        AbortTaskSet,
        ClearAca,
        ClearTaskSet,
        LogicalUnitReset,
        TargetWarmReset,
        TargetColdReset,
        TaskReassign
    ]
);
u8_enum_from!(
    TmfResponse,
    "Task Management Response",
    "response",
    [
        Complete,
        TaskDoesNotExist,
        LunDoesNotExist,
        TaskStillAllegiant,
        ReassignNotSupported,
        NotSupported,
        AuthorizationFailed,
        Rejected
    ]
);
u8_enum_from!(
    LogoutResponseCode,
    "Logout Response",
    "response",
    [Closed, CidNotFound, RecoveryNotSupported, CleanupFailed]
);
u8_enum_from!(
    RejectReason,
    "Reject",
    "reason",
    [
        Reserved,
        DataDigestError,
        SnackReject,
        ProtocolError,
        CommandNotSupported,
        ImmediateCommandReject,
        TaskInProgress,
        InvalidDataAck,
        InvalidPduField,
        LongOperationReject,
        NegotiationReset,
        WaitingForLogout
    ]
);
u8_enum_from!(
    AsyncEvent,
    "Async Message",
    "event",
    [
        ScsiEvent,
        LogoutRequested,
        ConnectionDropped,
        SessionDropped,
        NegotiationRequested,
        TaskTermination,
        Vendor
    ]
);

// ---- byte helpers: all offsets are constants below 48, never input-driven.

fn get16(b: &[u8; BHS_LEN], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn get32(b: &[u8; BHS_LEN], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn get64(b: &[u8; BHS_LEN], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

fn put16(b: &mut [u8; BHS_LEN], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn put32(b: &mut [u8; BHS_LEN], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8; BHS_LEN], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn get_dsl(b: &[u8; BHS_LEN]) -> U24 {
    U24(u32::from_be_bytes([0, b[5], b[6], b[7]]))
}

/// Fill the common fields: opcode/immediate, flags, AHS length, DSL.
fn header(opcode: Opcode, immediate: bool, flags: u8, ahs_words: u8, dsl: U24) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = opcode as u8 | if immediate { IMMEDIATE_BIT } else { 0 };
    b[1] = flags;
    b[4] = ahs_words;
    let d = dsl.0.to_be_bytes();
    b[5..8].copy_from_slice(&d[1..4]);
    b
}

fn flag(b: &[u8; BHS_LEN], bit: u8) -> bool {
    b[1] & bit != 0
}

fn require_final(b: &[u8; BHS_LEN], pdu: &'static str) -> Result<(), PduError> {
    if flag(b, FINAL_BIT) {
        Ok(())
    } else {
        Err(PduError::InvalidFlags {
            pdu,
            why: "F bit must be 1",
        })
    }
}

fn require_no_data(b: &[u8; BHS_LEN], pdu: &'static str) -> Result<(), PduError> {
    match get_dsl(b).0 {
        0 => Ok(()),
        value => Err(PduError::InvalidField {
            pdu,
            field: "DataSegmentLength",
            value,
        }),
    }
}

/// AHS length (bytes) and data segment length (bytes, unpadded) of a raw BHS,
/// read without decoding the rest, so a transport knows how much follows
/// even for a PDU it will then reject.
pub fn peek_lengths(b: &[u8; BHS_LEN]) -> (usize, u32) {
    (usize::from(b[4]) * 4, get_dsl(b).0)
}

/// Length of a data segment padded to a 4-byte boundary (RFC 7143 §11.2.3).
pub fn padded_len(len: u32) -> u64 {
    (u64::from(len) + 3) & !3
}

/// Number of pad bytes after a data segment of `len` bytes.
pub fn pad_len(len: u32) -> usize {
    ((4 - (len % 4)) % 4) as usize
}

/// Total bytes of a PDU on the wire: BHS, AHS, optional header digest, padded
/// data segment and optional data digest (present only when data is).
pub fn pdu_wire_length(
    ahs_bytes: usize,
    data_segment_length: u32,
    header_digest: bool,
    data_digest: bool,
) -> u64 {
    let mut n = BHS_LEN as u64 + ahs_bytes as u64 + padded_len(data_segment_length);
    if header_digest {
        n += DIGEST_LEN as u64;
    }
    if data_digest && data_segment_length > 0 {
        n += DIGEST_LEN as u64;
    }
    n
}

// ---- serial number arithmetic (RFC 1982, SERIAL_BITS = 32) ----

/// Compare two sequence numbers (CmdSN, StatSN...) with RFC 1982 serial
/// arithmetic. `None` when they are exactly 2^31 apart (undefined).
pub fn serial_cmp(a: u32, b: u32) -> Option<Ordering> {
    let d = b.wrapping_sub(a);
    match d {
        0 => Some(Ordering::Equal),
        0x8000_0000 => None,
        d if d < 0x8000_0000 => Some(Ordering::Less),
        _ => Some(Ordering::Greater),
    }
}

/// `a < b` in serial arithmetic.
pub fn serial_lt(a: u32, b: u32) -> bool {
    serial_cmp(a, b) == Some(Ordering::Less)
}

/// `a <= b` in serial arithmetic.
pub fn serial_le(a: u32, b: u32) -> bool {
    matches!(serial_cmp(a, b), Some(Ordering::Less | Ordering::Equal))
}

/// `a > b` in serial arithmetic.
pub fn serial_gt(a: u32, b: u32) -> bool {
    serial_cmp(a, b) == Some(Ordering::Greater)
}

/// `a >= b` in serial arithmetic.
pub fn serial_ge(a: u32, b: u32) -> bool {
    matches!(serial_cmp(a, b), Some(Ordering::Greater | Ordering::Equal))
}

// ======================= initiator PDUs =======================

/// SCSI Command (opcode 0x01, RFC 7143 §11.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiCommand {
    /// Immediate delivery (I bit).
    pub immediate: bool,
    /// F bit: no unsolicited Data-Out follows.
    pub final_: bool,
    /// R bit: data is expected from the target.
    pub read: bool,
    /// W bit: data is expected to the target.
    pub write: bool,
    /// Task attribute.
    pub attr: TaskAttr,
    /// TotalAHSLength in 4-byte words.
    pub ahs_words: u8,
    /// Length of the immediate data that follows.
    pub data_segment_length: U24,
    /// LUN (8 bytes, SAM encoding as on the wire).
    pub lun: u64,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Expected Data Transfer Length.
    pub expected_data_transfer_length: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// The CDB.
    pub cdb: Cdb,
}

impl ScsiCommand {
    /// The 48 wire bytes.
    pub fn encode(&self) -> [u8; BHS_LEN] {
        let flags = if self.final_ { FINAL_BIT } else { 0 }
            | if self.read { 0x40 } else { 0 }
            | if self.write { 0x20 } else { 0 }
            | self.attr as u8;
        let mut b = header(
            Opcode::ScsiCommand,
            self.immediate,
            flags,
            self.ahs_words,
            self.data_segment_length,
        );
        put64(&mut b, 8, self.lun);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.expected_data_transfer_length);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        b[32..48].copy_from_slice(&self.cdb.wire());
        b
    }

    fn decode(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        let mut cdb = [0u8; 16];
        cdb.copy_from_slice(&b[32..48]);
        Ok(ScsiCommand {
            immediate: b[0] & IMMEDIATE_BIT != 0,
            final_: flag(b, FINAL_BIT),
            read: flag(b, 0x40),
            write: flag(b, 0x20),
            attr: TaskAttr::decode(b[1] & 7)?,
            ahs_words: b[4],
            data_segment_length: get_dsl(b),
            lun: get64(b, 8),
            itt: get32(b, 16),
            expected_data_transfer_length: get32(b, 20),
            cmd_sn: get32(b, 24),
            exp_stat_sn: get32(b, 28),
            cdb: Cdb {
                bytes: cdb,
                len: 16,
            },
        })
    }
}

/// SCSI Data-Out (opcode 0x05, RFC 7143 §11.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOut {
    /// F bit: last PDU of this sequence.
    pub final_: bool,
    /// Length of the data that follows.
    pub data_segment_length: U24,
    /// LUN (copied from the R2T, or the command's for unsolicited data).
    pub lun: u64,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag (from the R2T; 0xffffffff for unsolicited data).
    pub ttt: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// DataSN within this sequence.
    pub data_sn: u32,
    /// Buffer offset of this data in the command's buffer.
    pub buffer_offset: u32,
}

impl DataOut {
    /// The 48 wire bytes.
    pub fn encode(&self) -> [u8; BHS_LEN] {
        let flags = if self.final_ { FINAL_BIT } else { 0 };
        let mut b = header(Opcode::DataOut, false, flags, 0, self.data_segment_length);
        put64(&mut b, 8, self.lun);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.ttt);
        put32(&mut b, 28, self.exp_stat_sn);
        put32(&mut b, 36, self.data_sn);
        put32(&mut b, 40, self.buffer_offset);
        b
    }

    fn decode(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        Ok(DataOut {
            final_: flag(b, FINAL_BIT),
            data_segment_length: get_dsl(b),
            lun: get64(b, 8),
            itt: get32(b, 16),
            ttt: get32(b, 20),
            exp_stat_sn: get32(b, 28),
            data_sn: get32(b, 36),
            buffer_offset: get32(b, 40),
        })
    }
}

/// NOP-Out (opcode 0x00, RFC 7143 §11.18).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NopOut {
    /// Immediate delivery (I bit); a reply to a NOP-In is always immediate.
    pub immediate: bool,
    /// Length of the ping data that follows.
    pub data_segment_length: U24,
    /// LUN (copied from the NOP-In when answering one).
    pub lun: u64,
    /// Initiator Task Tag; 0xffffffff when answering a target NOP-In.
    pub itt: u32,
    /// Target Transfer Tag; the NOP-In's when answering, else 0xffffffff.
    pub ttt: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
}

impl NopOut {
    /// The 48 wire bytes.
    pub fn encode(&self) -> [u8; BHS_LEN] {
        let mut b = header(
            Opcode::NopOut,
            self.immediate,
            FINAL_BIT,
            0,
            self.data_segment_length,
        );
        put64(&mut b, 8, self.lun);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.ttt);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        b
    }

    fn decode(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        require_final(b, "NOP-Out")?;
        Ok(NopOut {
            immediate: b[0] & IMMEDIATE_BIT != 0,
            data_segment_length: get_dsl(b),
            lun: get64(b, 8),
            itt: get32(b, 16),
            ttt: get32(b, 20),
            cmd_sn: get32(b, 24),
            exp_stat_sn: get32(b, 28),
        })
    }
}

/// Login Request (opcode 0x03, always immediate, RFC 7143 §11.12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRequest {
    /// T bit: we are ready to move to `nsg`.
    pub transit: bool,
    /// C bit: the text continues in the next PDU.
    pub cont: bool,
    /// Current stage.
    pub csg: Stage,
    /// Next stage (meaningful only with `transit`).
    pub nsg: Stage,
    /// Version-max.
    pub version_max: u8,
    /// Version-min.
    pub version_min: u8,
    /// Length of the login text that follows.
    pub data_segment_length: U24,
    /// Initiator Session ID.
    pub isid: [u8; 6],
    /// Target Session Identifying Handle (0 for a new session).
    pub tsih: u16,
    /// Initiator Task Tag (the same for all PDUs of one login).
    pub itt: u32,
    /// Connection ID.
    pub cid: u16,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
}

fn stage_flags(transit: bool, cont: bool, csg: Stage, nsg: Stage) -> u8 {
    (if transit { 0x80 } else { 0 })
        | (if cont { 0x40 } else { 0 })
        | ((csg as u8) << 2)
        | if transit { nsg as u8 } else { 0 }
}

impl LoginRequest {
    /// The 48 wire bytes.
    pub fn encode(&self) -> [u8; BHS_LEN] {
        let mut b = header(
            Opcode::LoginRequest,
            true,
            stage_flags(self.transit, self.cont, self.csg, self.nsg),
            0,
            self.data_segment_length,
        );
        b[2] = self.version_max;
        b[3] = self.version_min;
        b[8..14].copy_from_slice(&self.isid);
        put16(&mut b, 14, self.tsih);
        put32(&mut b, 16, self.itt);
        put16(&mut b, 20, self.cid);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        b
    }

    fn decode(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        let mut isid = [0u8; 6];
        isid.copy_from_slice(&b[8..14]);
        let transit = flag(b, 0x80);
        let cont = flag(b, 0x40);
        if transit && cont {
            return Err(PduError::InvalidFlags {
                pdu: "Login Request",
                why: "T and C both set",
            });
        }
        let csg = Stage::from_bits("Login Request", "CSG", b[1] >> 2)?;
        Ok(LoginRequest {
            transit,
            cont,
            csg,
            nsg: if transit {
                Stage::from_bits("Login Request", "NSG", b[1])?
            } else {
                csg
            },
            version_max: b[2],
            version_min: b[3],
            data_segment_length: get_dsl(b),
            isid,
            tsih: get16(b, 14),
            itt: get32(b, 16),
            cid: get16(b, 20),
            cmd_sn: get32(b, 24),
            exp_stat_sn: get32(b, 28),
        })
    }
}

/// Text Request (opcode 0x04, RFC 7143 §11.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRequest {
    /// Immediate delivery (I bit).
    pub immediate: bool,
    /// F bit: last PDU of this text exchange from us.
    pub final_: bool,
    /// C bit: our text continues in the next PDU.
    pub cont: bool,
    /// Length of the text that follows.
    pub data_segment_length: U24,
    /// LUN (reserved for most texts; 0).
    pub lun: u64,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag: 0xffffffff to start, else the target's to continue.
    pub ttt: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
}

impl TextRequest {
    /// The 48 wire bytes.
    pub fn encode(&self) -> [u8; BHS_LEN] {
        let flags = (if self.final_ { FINAL_BIT } else { 0 }) | if self.cont { 0x40 } else { 0 };
        let mut b = header(
            Opcode::TextRequest,
            self.immediate,
            flags,
            0,
            self.data_segment_length,
        );
        put64(&mut b, 8, self.lun);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.ttt);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        b
    }

    fn decode(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        let final_ = flag(b, FINAL_BIT);
        let cont = flag(b, 0x40);
        if final_ && cont {
            return Err(PduError::InvalidFlags {
                pdu: "Text Request",
                why: "F and C both set",
            });
        }
        Ok(TextRequest {
            immediate: b[0] & IMMEDIATE_BIT != 0,
            final_,
            cont,
            data_segment_length: get_dsl(b),
            lun: get64(b, 8),
            itt: get32(b, 16),
            ttt: get32(b, 20),
            cmd_sn: get32(b, 24),
            exp_stat_sn: get32(b, 28),
        })
    }
}

/// Logout Request (opcode 0x06, RFC 7143 §11.14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutRequest {
    /// Immediate delivery (I bit).
    pub immediate: bool,
    /// Why we log out.
    pub reason: LogoutReason,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Connection to close (reserved for CloseSession).
    pub cid: u16,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
}

impl LogoutRequest {
    /// The 48 wire bytes.
    pub fn encode(&self) -> [u8; BHS_LEN] {
        let mut b = header(
            Opcode::LogoutRequest,
            self.immediate,
            FINAL_BIT | self.reason as u8,
            0,
            U24::ZERO,
        );
        put32(&mut b, 16, self.itt);
        put16(&mut b, 20, self.cid);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        b
    }

    fn decode(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        require_final(b, "Logout Request")?;
        require_no_data(b, "Logout Request")?;
        Ok(LogoutRequest {
            immediate: b[0] & IMMEDIATE_BIT != 0,
            reason: LogoutReason::decode(b[1] & 0x7f)?,
            itt: get32(b, 16),
            cid: get16(b, 20),
            cmd_sn: get32(b, 24),
            exp_stat_sn: get32(b, 28),
        })
    }
}

/// Task Management Function Request (opcode 0x02, RFC 7143 §11.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    /// Immediate delivery (I bit); usual for TMFs.
    pub immediate: bool,
    /// The function.
    pub function: TmfFunction,
    /// LUN the function applies to.
    pub lun: u64,
    /// Initiator Task Tag of this request.
    pub itt: u32,
    /// ITT of the task to abort (ABORT TASK), else 0xffffffff.
    pub referenced_task_tag: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// CmdSN of the task to abort (ABORT TASK).
    pub ref_cmd_sn: u32,
    /// ExpDataSN (TASK REASSIGN only; 0 otherwise).
    pub exp_data_sn: u32,
}

impl TaskMgmtRequest {
    /// The 48 wire bytes.
    pub fn encode(&self) -> [u8; BHS_LEN] {
        let mut b = header(
            Opcode::TaskMgmtRequest,
            self.immediate,
            FINAL_BIT | self.function as u8,
            0,
            U24::ZERO,
        );
        put64(&mut b, 8, self.lun);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.referenced_task_tag);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        put32(&mut b, 32, self.ref_cmd_sn);
        put32(&mut b, 36, self.exp_data_sn);
        b
    }

    fn decode(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        require_final(b, "Task Management Request")?;
        require_no_data(b, "Task Management Request")?;
        Ok(TaskMgmtRequest {
            immediate: b[0] & IMMEDIATE_BIT != 0,
            function: TmfFunction::decode(b[1] & 0x7f)?,
            lun: get64(b, 8),
            itt: get32(b, 16),
            referenced_task_tag: get32(b, 20),
            cmd_sn: get32(b, 24),
            exp_stat_sn: get32(b, 28),
            ref_cmd_sn: get32(b, 32),
            exp_data_sn: get32(b, 36),
        })
    }
}

/// Any PDU an initiator sends (decoded, e.g. by a fake target in tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitiatorPdu {
    /// SCSI Command.
    ScsiCommand(ScsiCommand),
    /// SCSI Data-Out.
    DataOut(DataOut),
    /// NOP-Out.
    NopOut(NopOut),
    /// Login Request.
    LoginRequest(LoginRequest),
    /// Text Request.
    TextRequest(TextRequest),
    /// Logout Request.
    LogoutRequest(LogoutRequest),
    /// Task Management Function Request.
    TaskMgmtRequest(TaskMgmtRequest),
}

impl InitiatorPdu {
    /// Decode an initiator BHS (SNACK is not supported).
    pub fn decode(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        let op = Opcode::from_u8(b[0])?;
        Ok(match op {
            Opcode::ScsiCommand => Self::ScsiCommand(ScsiCommand::decode(b)?),
            Opcode::DataOut => Self::DataOut(DataOut::decode(b)?),
            Opcode::NopOut => Self::NopOut(NopOut::decode(b)?),
            Opcode::LoginRequest => Self::LoginRequest(LoginRequest::decode(b)?),
            Opcode::TextRequest => Self::TextRequest(TextRequest::decode(b)?),
            Opcode::LogoutRequest => Self::LogoutRequest(LogoutRequest::decode(b)?),
            Opcode::TaskMgmtRequest => Self::TaskMgmtRequest(TaskMgmtRequest::decode(b)?),
            opcode => {
                return Err(PduError::WrongDirection {
                    opcode,
                    expected: "initiator",
                })
            }
        })
    }

    /// The 48 wire bytes.
    pub fn encode(&self) -> [u8; BHS_LEN] {
        match self {
            Self::ScsiCommand(p) => p.encode(),
            Self::DataOut(p) => p.encode(),
            Self::NopOut(p) => p.encode(),
            Self::LoginRequest(p) => p.encode(),
            Self::TextRequest(p) => p.encode(),
            Self::LogoutRequest(p) => p.encode(),
            Self::TaskMgmtRequest(p) => p.encode(),
        }
    }
}

// ======================= target PDUs =======================

/// The fields every target response carries for sequence accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SeqNums {
    /// StatSN (not valid in every PDU: see each type).
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
}

fn get_seq(b: &[u8; BHS_LEN]) -> SeqNums {
    SeqNums {
        stat_sn: get32(b, 24),
        exp_cmd_sn: get32(b, 28),
        max_cmd_sn: get32(b, 32),
    }
}

fn put_seq(b: &mut [u8; BHS_LEN], s: &SeqNums) {
    put32(b, 24, s.stat_sn);
    put32(b, 28, s.exp_cmd_sn);
    put32(b, 32, s.max_cmd_sn);
}

/// SCSI Response (opcode 0x21, RFC 7143 §11.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResponse {
    /// o bit: bidirectional read residual overflow.
    pub bidi_overflow: bool,
    /// u bit: bidirectional read residual underflow.
    pub bidi_underflow: bool,
    /// O bit: residual overflow.
    pub overflow: bool,
    /// U bit: residual underflow.
    pub underflow: bool,
    /// iSCSI response: 0x00 command completed at target, 0x01 target
    /// failure, 0x80–0xff vendor specific.
    pub response: u8,
    /// SCSI status (valid only when `response` is 0).
    pub status: u8,
    /// TotalAHSLength in 4-byte words.
    pub ahs_words: u8,
    /// Length of the sense / response data that follows.
    pub data_segment_length: U24,
    /// Initiator Task Tag.
    pub itt: u32,
    /// SNACK tag (0 unless R-Data SNACK was used).
    pub snack_tag: u32,
    /// StatSN, ExpCmdSN, MaxCmdSN.
    pub seq: SeqNums,
    /// ExpDataSN.
    pub exp_data_sn: u32,
    /// Bidirectional read residual count.
    pub bidi_read_residual_count: u32,
    /// Residual count.
    pub residual_count: u32,
}

impl ScsiResponse {
    /// The 48 wire bytes.
    pub fn encode(&self) -> [u8; BHS_LEN] {
        let flags = FINAL_BIT
            | if self.bidi_overflow { 0x10 } else { 0 }
            | if self.bidi_underflow { 0x08 } else { 0 }
            | if self.overflow { 0x04 } else { 0 }
            | if self.underflow { 0x02 } else { 0 };
        let mut b = header(
            Opcode::ScsiResponse,
            false,
            flags,
            self.ahs_words,
            self.data_segment_length,
        );
        b[2] = self.response;
        b[3] = self.status;
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.snack_tag);
        put_seq(&mut b, &self.seq);
        put32(&mut b, 36, self.exp_data_sn);
        put32(&mut b, 40, self.bidi_read_residual_count);
        put32(&mut b, 44, self.residual_count);
        b
    }

    fn decode(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        const P: &str = "SCSI Response";
        require_final(b, P)?;
        let r = ScsiResponse {
            bidi_overflow: flag(b, 0x10),
            bidi_underflow: flag(b, 0x08),
            overflow: flag(b, 0x04),
            underflow: flag(b, 0x02),
            response: b[2],
            status: b[3],
            ahs_words: b[4],
            data_segment_length: get_dsl(b),
            itt: get32(b, 16),
            snack_tag: get32(b, 20),
            seq: get_seq(b),
            exp_data_sn: get32(b, 36),
            bidi_read_residual_count: get32(b, 40),
            residual_count: get32(b, 44),
        };
        if r.overflow && r.underflow {
            return Err(PduError::InvalidFlags {
                pdu: P,
                why: "both residual overflow and underflow",
            });
        }
        if r.bidi_overflow && r.bidi_underflow {
            return Err(PduError::InvalidFlags {
                pdu: P,
                why: "both bidirectional overflow and underflow",
            });
        }
        if (0x02..0x80).contains(&r.response) {
            return Err(PduError::InvalidField {
                pdu: P,
                field: "response",
                value: r.response.into(),
            });
        }
        Ok(r)
    }
}

/// SCSI Data-In (opcode 0x25, RFC 7143 §11.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataIn {
    /// F bit: last PDU of this sequence.
    pub final_: bool,
    /// A bit: the target asks for a DataACK SNACK (ERL > 0 only).
    pub ack: bool,
    /// O bit: residual overflow (only with `status_present`).
    pub overflow: bool,
    /// U bit: residual underflow (only with `status_present`).
    pub underflow: bool,
    /// S bit: this PDU carries the command's status (phase collapse).
    pub status_present: bool,
    /// SCSI status (valid only with `status_present`).
    pub status: u8,
    /// TotalAHSLength in 4-byte words.
    pub ahs_words: u8,
    /// Length of the data that follows.
    pub data_segment_length: U24,
    /// LUN (valid with the A bit).
    pub lun: u64,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag (with the A bit), else 0xffffffff.
    pub ttt: u32,
    /// StatSN (valid only with `status_present`), ExpCmdSN, MaxCmdSN.
    pub seq: SeqNums,
    /// DataSN.
    pub data_sn: u32,
    /// Offset of this data in the command's buffer.
    pub buffer_offset: u32,
    /// Residual count (valid only with `status_present`).
    pub residual_count: u32,
}

impl DataIn {
    /// The 48 wire bytes.
    pub fn encode(&self) -> [u8; BHS_LEN] {
        let flags = if self.final_ { FINAL_BIT } else { 0 }
            | if self.ack { 0x40 } else { 0 }
            | if self.overflow { 0x04 } else { 0 }
            | if self.underflow { 0x02 } else { 0 }
            | if self.status_present { 0x01 } else { 0 };
        let mut b = header(
            Opcode::DataIn,
            false,
            flags,
            self.ahs_words,
            self.data_segment_length,
        );
        b[3] = self.status;
        put64(&mut b, 8, self.lun);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.ttt);
        put_seq(&mut b, &self.seq);
        put32(&mut b, 36, self.data_sn);
        put32(&mut b, 40, self.buffer_offset);
        put32(&mut b, 44, self.residual_count);
        b
    }

    fn decode(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        const P: &str = "Data-In";
        let d = DataIn {
            final_: flag(b, FINAL_BIT),
            ack: flag(b, 0x40),
            overflow: flag(b, 0x04),
            underflow: flag(b, 0x02),
            status_present: flag(b, 0x01),
            status: b[3],
            ahs_words: b[4],
            data_segment_length: get_dsl(b),
            lun: get64(b, 8),
            itt: get32(b, 16),
            ttt: get32(b, 20),
            seq: get_seq(b),
            data_sn: get32(b, 36),
            buffer_offset: get32(b, 40),
            residual_count: get32(b, 44),
        };
        if d.status_present && !d.final_ {
            return Err(PduError::InvalidFlags {
                pdu: P,
                why: "S bit set without F bit",
            });
        }
        if d.overflow && d.underflow {
            return Err(PduError::InvalidFlags {
                pdu: P,
                why: "both residual overflow and underflow",
            });
        }
        if (d.overflow || d.underflow) && !d.status_present {
            return Err(PduError::InvalidFlags {
                pdu: P,
                why: "residual flag without status",
            });
        }
        Ok(d)
    }
}

/// Ready To Transfer (opcode 0x31, RFC 7143 §11.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct R2t {
    /// TotalAHSLength in 4-byte words.
    pub ahs_words: u8,
    /// LUN.
    pub lun: u64,
    /// Initiator Task Tag of the write command.
    pub itt: u32,
    /// Target Transfer Tag to copy into the Data-Out PDUs.
    pub ttt: u32,
    /// StatSN (the next one; not advanced), ExpCmdSN, MaxCmdSN.
    pub seq: SeqNums,
    /// R2TSN.
    pub r2t_sn: u32,
    /// Offset of the requested data in the command's buffer.
    pub buffer_offset: u32,
    /// Desired Data Transfer Length (never 0).
    pub desired_data_transfer_length: u32,
}

impl R2t {
    /// The 48 wire bytes.
    pub fn encode(&self) -> [u8; BHS_LEN] {
        let mut b = header(Opcode::R2t, false, FINAL_BIT, self.ahs_words, U24::ZERO);
        put64(&mut b, 8, self.lun);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.ttt);
        put_seq(&mut b, &self.seq);
        put32(&mut b, 36, self.r2t_sn);
        put32(&mut b, 40, self.buffer_offset);
        put32(&mut b, 44, self.desired_data_transfer_length);
        b
    }

    fn decode(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        const P: &str = "R2T";
        require_final(b, P)?;
        require_no_data(b, P)?;
        let r = R2t {
            ahs_words: b[4],
            lun: get64(b, 8),
            itt: get32(b, 16),
            ttt: get32(b, 20),
            seq: get_seq(b),
            r2t_sn: get32(b, 36),
            buffer_offset: get32(b, 40),
            desired_data_transfer_length: get32(b, 44),
        };
        if r.ttt == RESERVED_TAG {
            return Err(PduError::InvalidField {
                pdu: P,
                field: "target transfer tag",
                value: r.ttt,
            });
        }
        if r.desired_data_transfer_length == 0 {
            return Err(PduError::InvalidField {
                pdu: P,
                field: "desired data transfer length",
                value: 0,
            });
        }
        Ok(r)
    }
}

/// NOP-In (opcode 0x20, RFC 7143 §11.19).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NopIn {
    /// Length of the ping data that follows.
    pub data_segment_length: U24,
    /// LUN (copy into the NOP-Out answer).
    pub lun: u64,
    /// ITT of our NOP-Out when answering one, else 0xffffffff.
    pub itt: u32,
    /// Not 0xffffffff when the target wants a NOP-Out answer.
    pub ttt: u32,
    /// StatSN, ExpCmdSN, MaxCmdSN.
    pub seq: SeqNums,
}

impl NopIn {
    /// The 48 wire bytes.
    pub fn encode(&self) -> [u8; BHS_LEN] {
        let mut b = header(Opcode::NopIn, false, FINAL_BIT, 0, self.data_segment_length);
        put64(&mut b, 8, self.lun);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.ttt);
        put_seq(&mut b, &self.seq);
        b
    }

    fn decode(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        require_final(b, "NOP-In")?;
        let n = NopIn {
            data_segment_length: get_dsl(b),
            lun: get64(b, 8),
            itt: get32(b, 16),
            ttt: get32(b, 20),
            seq: get_seq(b),
        };
        if n.itt != RESERVED_TAG && n.ttt != RESERVED_TAG {
            return Err(PduError::InvalidFlags {
                pdu: "NOP-In",
                why: "both ITT and TTT set (answer and ping at once)",
            });
        }
        Ok(n)
    }

    /// True when the target pings us and expects a NOP-Out answer.
    pub fn wants_reply(&self) -> bool {
        self.ttt != RESERVED_TAG
    }
}

/// Login Response (opcode 0x23, RFC 7143 §11.13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResponse {
    /// T bit: the target moves to `nsg`.
    pub transit: bool,
    /// C bit: the text continues in the next response.
    pub cont: bool,
    /// Current stage.
    pub csg: Stage,
    /// Next stage (meaningful only with `transit`; equals `csg` otherwise).
    pub nsg: Stage,
    /// Version-max.
    pub version_max: u8,
    /// Version-active.
    pub version_active: u8,
    /// Length of the login text that follows.
    pub data_segment_length: U24,
    /// Initiator Session ID (echoed).
    pub isid: [u8; 6],
    /// Target Session Identifying Handle.
    pub tsih: u16,
    /// Initiator Task Tag (echoed).
    pub itt: u32,
    /// StatSN (valid with status class 0), ExpCmdSN, MaxCmdSN.
    pub seq: SeqNums,
    /// Status-Class (0 success, 1 redirect, 2 initiator error, 3 target error).
    pub status_class: u8,
    /// Status-Detail.
    pub status_detail: u8,
}

impl LoginResponse {
    /// The 48 wire bytes.
    pub fn encode(&self) -> [u8; BHS_LEN] {
        let mut b = header(
            Opcode::LoginResponse,
            false,
            stage_flags(self.transit, self.cont, self.csg, self.nsg),
            0,
            self.data_segment_length,
        );
        b[2] = self.version_max;
        b[3] = self.version_active;
        b[8..14].copy_from_slice(&self.isid);
        put16(&mut b, 14, self.tsih);
        put32(&mut b, 16, self.itt);
        put_seq(&mut b, &self.seq);
        b[36] = self.status_class;
        b[37] = self.status_detail;
        b
    }

    fn decode(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        const P: &str = "Login Response";
        let transit = flag(b, 0x80);
        let cont = flag(b, 0x40);
        if transit && cont {
            return Err(PduError::InvalidFlags {
                pdu: P,
                why: "T and C both set",
            });
        }
        let csg = Stage::from_bits(P, "CSG", b[1] >> 2)?;
        let nsg = if transit {
            Stage::from_bits(P, "NSG", b[1])?
        } else {
            csg
        };
        let mut isid = [0u8; 6];
        isid.copy_from_slice(&b[8..14]);
        if b[36] > 3 {
            return Err(PduError::InvalidField {
                pdu: P,
                field: "status class",
                value: b[36].into(),
            });
        }
        Ok(LoginResponse {
            transit,
            cont,
            csg,
            nsg,
            version_max: b[2],
            version_active: b[3],
            data_segment_length: get_dsl(b),
            isid,
            tsih: get16(b, 14),
            itt: get32(b, 16),
            seq: get_seq(b),
            status_class: b[36],
            status_detail: b[37],
        })
    }
}

/// Text Response (opcode 0x24, RFC 7143 §11.11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextResponse {
    /// F bit: the target's text is complete.
    pub final_: bool,
    /// C bit: the text continues in the next response.
    pub cont: bool,
    /// Length of the text that follows.
    pub data_segment_length: U24,
    /// LUN (reserved for most texts).
    pub lun: u64,
    /// Initiator Task Tag (echoed).
    pub itt: u32,
    /// Target Transfer Tag: not 0xffffffff when more text is to be asked for.
    pub ttt: u32,
    /// StatSN, ExpCmdSN, MaxCmdSN.
    pub seq: SeqNums,
}

impl TextResponse {
    /// The 48 wire bytes.
    pub fn encode(&self) -> [u8; BHS_LEN] {
        let flags = (if self.final_ { FINAL_BIT } else { 0 }) | if self.cont { 0x40 } else { 0 };
        let mut b = header(
            Opcode::TextResponse,
            false,
            flags,
            0,
            self.data_segment_length,
        );
        put64(&mut b, 8, self.lun);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.ttt);
        put_seq(&mut b, &self.seq);
        b
    }

    fn decode(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        let final_ = flag(b, FINAL_BIT);
        let cont = flag(b, 0x40);
        if final_ && cont {
            return Err(PduError::InvalidFlags {
                pdu: "Text Response",
                why: "F and C both set",
            });
        }
        Ok(TextResponse {
            final_,
            cont,
            data_segment_length: get_dsl(b),
            lun: get64(b, 8),
            itt: get32(b, 16),
            ttt: get32(b, 20),
            seq: get_seq(b),
        })
    }
}

/// Logout Response (opcode 0x26, RFC 7143 §11.15).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutResponse {
    /// The outcome.
    pub response: LogoutResponseCode,
    /// Initiator Task Tag (echoed).
    pub itt: u32,
    /// StatSN, ExpCmdSN, MaxCmdSN.
    pub seq: SeqNums,
    /// Seconds to wait before reconnecting.
    pub time2wait: u16,
    /// Seconds the target keeps the connection's state.
    pub time2retain: u16,
}

impl LogoutResponse {
    /// The 48 wire bytes.
    pub fn encode(&self) -> [u8; BHS_LEN] {
        let mut b = header(Opcode::LogoutResponse, false, FINAL_BIT, 0, U24::ZERO);
        b[2] = self.response as u8;
        put32(&mut b, 16, self.itt);
        put_seq(&mut b, &self.seq);
        put16(&mut b, 40, self.time2wait);
        put16(&mut b, 42, self.time2retain);
        b
    }

    fn decode(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        require_final(b, "Logout Response")?;
        require_no_data(b, "Logout Response")?;
        Ok(LogoutResponse {
            response: LogoutResponseCode::decode(b[2])?,
            itt: get32(b, 16),
            seq: get_seq(b),
            time2wait: get16(b, 40),
            time2retain: get16(b, 42),
        })
    }
}

/// Task Management Function Response (opcode 0x22, RFC 7143 §11.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMgmtResponse {
    /// The outcome.
    pub response: TmfResponse,
    /// Initiator Task Tag of the TMF request.
    pub itt: u32,
    /// StatSN, ExpCmdSN, MaxCmdSN.
    pub seq: SeqNums,
}

impl TaskMgmtResponse {
    /// The 48 wire bytes.
    pub fn encode(&self) -> [u8; BHS_LEN] {
        let mut b = header(Opcode::TaskMgmtResponse, false, FINAL_BIT, 0, U24::ZERO);
        b[2] = self.response as u8;
        put32(&mut b, 16, self.itt);
        put_seq(&mut b, &self.seq);
        b
    }

    fn decode(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        require_final(b, "Task Management Response")?;
        require_no_data(b, "Task Management Response")?;
        Ok(TaskMgmtResponse {
            response: TmfResponse::decode(b[2])?,
            itt: get32(b, 16),
            seq: get_seq(b),
        })
    }
}

/// Reject (opcode 0x3f, RFC 7143 §11.17). The data segment holds the
/// rejected PDU's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// Why the PDU was rejected.
    pub reason: RejectReason,
    /// Length of the data segment (the rejected header).
    pub data_segment_length: U24,
    /// StatSN, ExpCmdSN, MaxCmdSN.
    pub seq: SeqNums,
    /// DataSN/R2TSN (for SNACK rejects), else 0.
    pub data_sn: u32,
}

impl Reject {
    /// The 48 wire bytes.
    pub fn encode(&self) -> [u8; BHS_LEN] {
        let mut b = header(
            Opcode::Reject,
            false,
            FINAL_BIT,
            0,
            self.data_segment_length,
        );
        b[2] = self.reason as u8;
        put32(&mut b, 16, RESERVED_TAG);
        put_seq(&mut b, &self.seq);
        put32(&mut b, 36, self.data_sn);
        b
    }

    fn decode(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        require_final(b, "Reject")?;
        Ok(Reject {
            reason: RejectReason::decode(b[2])?,
            data_segment_length: get_dsl(b),
            seq: get_seq(b),
            data_sn: get32(b, 36),
        })
    }
}

/// Asynchronous Message (opcode 0x32, RFC 7143 §11.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsyncMessage {
    /// Length of the data segment (sense data and/or iSCSI event data).
    pub data_segment_length: U24,
    /// LUN (for SCSI events).
    pub lun: u64,
    /// StatSN, ExpCmdSN, MaxCmdSN.
    pub seq: SeqNums,
    /// The event.
    pub event: AsyncEvent,
    /// Vendor code (for vendor events).
    pub vcode: u8,
    /// Parameter1 (e.g. CID to drop, or seconds before logout).
    pub param1: u16,
    /// Parameter2 (Time2Wait for drop events).
    pub param2: u16,
    /// Parameter3 (Time2Retain for drop events).
    pub param3: u16,
}

impl AsyncMessage {
    /// The 48 wire bytes.
    pub fn encode(&self) -> [u8; BHS_LEN] {
        let mut b = header(
            Opcode::AsyncMessage,
            false,
            FINAL_BIT,
            0,
            self.data_segment_length,
        );
        put64(&mut b, 8, self.lun);
        put32(&mut b, 16, RESERVED_TAG);
        put_seq(&mut b, &self.seq);
        b[36] = self.event as u8;
        b[37] = self.vcode;
        put16(&mut b, 38, self.param1);
        put16(&mut b, 40, self.param2);
        put16(&mut b, 42, self.param3);
        b
    }

    fn decode(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        require_final(b, "Async Message")?;
        Ok(AsyncMessage {
            data_segment_length: get_dsl(b),
            lun: get64(b, 8),
            seq: get_seq(b),
            event: AsyncEvent::decode(b[36])?,
            vcode: b[37],
            param1: get16(b, 38),
            param2: get16(b, 40),
            param3: get16(b, 42),
        })
    }
}

/// Any PDU a target sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPdu {
    /// SCSI Response.
    ScsiResponse(ScsiResponse),
    /// SCSI Data-In.
    DataIn(DataIn),
    /// R2T.
    R2t(R2t),
    /// NOP-In.
    NopIn(NopIn),
    /// Login Response.
    LoginResponse(LoginResponse),
    /// Text Response.
    TextResponse(TextResponse),
    /// Logout Response.
    LogoutResponse(LogoutResponse),
    /// Task Management Function Response.
    TaskMgmtResponse(TaskMgmtResponse),
    /// Reject.
    Reject(Reject),
    /// Asynchronous Message.
    AsyncMessage(AsyncMessage),
}

impl TargetPdu {
    /// Decode and check a target BHS. Unknown, vendor-specific and initiator
    /// opcodes are errors.
    pub fn decode(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        let op = Opcode::from_u8(b[0])?;
        Ok(match op {
            Opcode::ScsiResponse => Self::ScsiResponse(ScsiResponse::decode(b)?),
            Opcode::DataIn => Self::DataIn(DataIn::decode(b)?),
            Opcode::R2t => Self::R2t(R2t::decode(b)?),
            Opcode::NopIn => Self::NopIn(NopIn::decode(b)?),
            Opcode::LoginResponse => Self::LoginResponse(LoginResponse::decode(b)?),
            Opcode::TextResponse => Self::TextResponse(TextResponse::decode(b)?),
            Opcode::LogoutResponse => Self::LogoutResponse(LogoutResponse::decode(b)?),
            Opcode::TaskMgmtResponse => Self::TaskMgmtResponse(TaskMgmtResponse::decode(b)?),
            Opcode::Reject => Self::Reject(Reject::decode(b)?),
            Opcode::AsyncMessage => Self::AsyncMessage(AsyncMessage::decode(b)?),
            opcode => {
                return Err(PduError::WrongDirection {
                    opcode,
                    expected: "target",
                })
            }
        })
    }

    /// The 48 wire bytes.
    pub fn encode(&self) -> [u8; BHS_LEN] {
        match self {
            Self::ScsiResponse(p) => p.encode(),
            Self::DataIn(p) => p.encode(),
            Self::R2t(p) => p.encode(),
            Self::NopIn(p) => p.encode(),
            Self::LoginResponse(p) => p.encode(),
            Self::TextResponse(p) => p.encode(),
            Self::LogoutResponse(p) => p.encode(),
            Self::TaskMgmtResponse(p) => p.encode(),
            Self::Reject(p) => p.encode(),
            Self::AsyncMessage(p) => p.encode(),
        }
    }

    /// The opcode of this PDU.
    pub fn opcode(&self) -> Opcode {
        match self {
            Self::ScsiResponse(_) => Opcode::ScsiResponse,
            Self::DataIn(_) => Opcode::DataIn,
            Self::R2t(_) => Opcode::R2t,
            Self::NopIn(_) => Opcode::NopIn,
            Self::LoginResponse(_) => Opcode::LoginResponse,
            Self::TextResponse(_) => Opcode::TextResponse,
            Self::LogoutResponse(_) => Opcode::LogoutResponse,
            Self::TaskMgmtResponse(_) => Opcode::TaskMgmtResponse,
            Self::Reject(_) => Opcode::Reject,
            Self::AsyncMessage(_) => Opcode::AsyncMessage,
        }
    }

    /// Length in bytes of the data segment that follows (unpadded).
    pub fn data_segment_length(&self) -> u32 {
        match self {
            Self::ScsiResponse(p) => p.data_segment_length.get(),
            Self::DataIn(p) => p.data_segment_length.get(),
            Self::R2t(_) => 0,
            Self::NopIn(p) => p.data_segment_length.get(),
            Self::LoginResponse(p) => p.data_segment_length.get(),
            Self::TextResponse(p) => p.data_segment_length.get(),
            Self::LogoutResponse(_) | Self::TaskMgmtResponse(_) => 0,
            Self::Reject(p) => p.data_segment_length.get(),
            Self::AsyncMessage(p) => p.data_segment_length.get(),
        }
    }

    /// The sequence numbers carried (all target PDUs carry them).
    pub fn seq(&self) -> SeqNums {
        match self {
            Self::ScsiResponse(p) => p.seq,
            Self::DataIn(p) => p.seq,
            Self::R2t(p) => p.seq,
            Self::NopIn(p) => p.seq,
            Self::LoginResponse(p) => p.seq,
            Self::TextResponse(p) => p.seq,
            Self::LogoutResponse(p) => p.seq,
            Self::TaskMgmtResponse(p) => p.seq,
            Self::Reject(p) => p.seq,
            Self::AsyncMessage(p) => p.seq,
        }
    }
}

/// Encode a LUN number in SAM single-level form: peripheral addressing for
/// LUNs below 256, flat space addressing up to 16383 (SAM-5 §4.7).
pub fn lun_from_index(lun: u16) -> Result<u64, PduError> {
    match lun {
        0..=255 => Ok(u64::from(lun) << 48),
        256..=0x3fff => Ok((0x4000 | u64::from(lun)) << 48),
        _ => Err(PduError::InvalidField {
            pdu: "SCSI Command",
            field: "LUN",
            value: lun.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq() -> SeqNums {
        SeqNums {
            stat_sn: 0x1122_3344,
            exp_cmd_sn: 0x5566_7788,
            max_cmd_sn: 0x99aa_bbcc,
        }
    }

    fn target_samples() -> Vec<TargetPdu> {
        vec![
            TargetPdu::ScsiResponse(ScsiResponse {
                bidi_overflow: false,
                bidi_underflow: true,
                overflow: true,
                underflow: false,
                response: 0,
                status: 2,
                ahs_words: 0,
                data_segment_length: U24::new(18).unwrap(),
                itt: 7,
                snack_tag: 0,
                seq: seq(),
                exp_data_sn: 3,
                bidi_read_residual_count: 5,
                residual_count: 512,
            }),
            TargetPdu::DataIn(DataIn {
                final_: true,
                ack: false,
                overflow: false,
                underflow: true,
                status_present: true,
                status: 0,
                ahs_words: 0,
                data_segment_length: U24::new(4096).unwrap(),
                lun: 0,
                itt: 9,
                ttt: RESERVED_TAG,
                seq: seq(),
                data_sn: 1,
                buffer_offset: 8192,
                residual_count: 100,
            }),
            TargetPdu::R2t(R2t {
                ahs_words: 0,
                lun: 1 << 48,
                itt: 3,
                ttt: 0x10,
                seq: seq(),
                r2t_sn: 2,
                buffer_offset: 65536,
                desired_data_transfer_length: 262144,
            }),
            TargetPdu::NopIn(NopIn {
                data_segment_length: U24::ZERO,
                lun: 0,
                itt: RESERVED_TAG,
                ttt: 0x42,
                seq: seq(),
            }),
            TargetPdu::LoginResponse(LoginResponse {
                transit: true,
                cont: false,
                csg: Stage::Operational,
                nsg: Stage::FullFeature,
                version_max: 0,
                version_active: 0,
                data_segment_length: U24::new(100).unwrap(),
                isid: [0x80, 1, 2, 3, 4, 5],
                tsih: 0x0102,
                itt: 0,
                seq: seq(),
                status_class: 0,
                status_detail: 0,
            }),
            TargetPdu::TextResponse(TextResponse {
                final_: false,
                cont: true,
                data_segment_length: U24::new(8192).unwrap(),
                lun: 0,
                itt: 4,
                ttt: 0x77,
                seq: seq(),
            }),
            TargetPdu::LogoutResponse(LogoutResponse {
                response: LogoutResponseCode::Closed,
                itt: 8,
                seq: seq(),
                time2wait: 2,
                time2retain: 20,
            }),
            TargetPdu::TaskMgmtResponse(TaskMgmtResponse {
                response: TmfResponse::Rejected,
                itt: 12,
                seq: seq(),
            }),
            TargetPdu::Reject(Reject {
                reason: RejectReason::ProtocolError,
                data_segment_length: U24::new(48).unwrap(),
                seq: seq(),
                data_sn: 0,
            }),
            TargetPdu::AsyncMessage(AsyncMessage {
                data_segment_length: U24::ZERO,
                lun: 0,
                seq: seq(),
                event: AsyncEvent::LogoutRequested,
                vcode: 0,
                param1: 5,
                param2: 0,
                param3: 0,
            }),
        ]
    }

    fn initiator_samples() -> Vec<InitiatorPdu> {
        vec![
            InitiatorPdu::ScsiCommand(ScsiCommand {
                immediate: false,
                final_: true,
                read: true,
                write: false,
                attr: TaskAttr::Simple,
                ahs_words: 0,
                data_segment_length: U24::ZERO,
                lun: 0,
                itt: 0xdead_beef,
                expected_data_transfer_length: 4096,
                cmd_sn: 10,
                exp_stat_sn: 20,
                cdb: Cdb::new(&[0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0]).unwrap(),
            }),
            InitiatorPdu::DataOut(DataOut {
                final_: true,
                data_segment_length: U24::new(512).unwrap(),
                lun: 0,
                itt: 1,
                ttt: 2,
                exp_stat_sn: 3,
                data_sn: 4,
                buffer_offset: 5,
            }),
            InitiatorPdu::NopOut(NopOut {
                immediate: true,
                data_segment_length: U24::ZERO,
                lun: 0,
                itt: RESERVED_TAG,
                ttt: 0x42,
                cmd_sn: 1,
                exp_stat_sn: 2,
            }),
            InitiatorPdu::LoginRequest(LoginRequest {
                transit: true,
                cont: false,
                csg: Stage::Security,
                nsg: Stage::Operational,
                version_max: 0,
                version_min: 0,
                data_segment_length: U24::new(77).unwrap(),
                isid: [0x80, 0, 0, 0, 0, 1],
                tsih: 0,
                itt: 0,
                cid: 0,
                cmd_sn: 0,
                exp_stat_sn: 0,
            }),
            InitiatorPdu::TextRequest(TextRequest {
                immediate: true,
                final_: true,
                cont: false,
                data_segment_length: U24::new(16).unwrap(),
                lun: 0,
                itt: 5,
                ttt: RESERVED_TAG,
                cmd_sn: 1,
                exp_stat_sn: 1,
            }),
            InitiatorPdu::LogoutRequest(LogoutRequest {
                immediate: true,
                reason: LogoutReason::CloseSession,
                itt: 6,
                cid: 0,
                cmd_sn: 100,
                exp_stat_sn: 200,
            }),
            InitiatorPdu::TaskMgmtRequest(TaskMgmtRequest {
                immediate: true,
                function: TmfFunction::AbortTask,
                lun: 0,
                itt: 7,
                referenced_task_tag: 3,
                cmd_sn: 9,
                exp_stat_sn: 9,
                ref_cmd_sn: 8,
                exp_data_sn: 0,
            }),
        ]
    }

    #[test]
    fn target_pdus_round_trip() {
        for p in target_samples() {
            let b = p.encode();
            assert_eq!(Opcode::from_u8(b[0]).unwrap(), p.opcode());
            assert_eq!(TargetPdu::decode(&b).unwrap(), p, "{p:?}");
            assert_eq!(peek_lengths(&b).1, p.data_segment_length());
        }
    }

    #[test]
    fn initiator_pdus_round_trip() {
        for p in initiator_samples() {
            let b = p.encode();
            assert_eq!(InitiatorPdu::decode(&b).unwrap(), p, "{p:?}");
            // And the target decoder refuses them.
            assert!(matches!(
                TargetPdu::decode(&b),
                Err(PduError::WrongDirection { .. })
            ));
        }
    }

    #[test]
    fn scsi_command_layout() {
        let cmd = ScsiCommand {
            immediate: false,
            final_: true,
            read: false,
            write: true,
            attr: TaskAttr::Ordered,
            ahs_words: 0,
            data_segment_length: U24::new(0x012345).unwrap(),
            lun: 0x0001_0000_0000_0000,
            itt: 0x0a0b_0c0d,
            expected_data_transfer_length: 0x10000,
            cmd_sn: 1,
            exp_stat_sn: 2,
            cdb: Cdb::new(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0]).unwrap(),
        };
        let b = cmd.encode();
        assert_eq!(b[0], 0x01);
        assert_eq!(b[1], 0x80 | 0x20 | 2);
        assert_eq!(&b[5..8], &[0x01, 0x23, 0x45]);
        assert_eq!(&b[8..16], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[16..20], &[0x0a, 0x0b, 0x0c, 0x0d]);
        assert_eq!(&b[20..24], &[0, 1, 0, 0]);
        assert_eq!(b[32], 0x2a);
        assert_eq!(b[40], 1);
        assert_eq!(&b[42..48], &[0; 6]);
    }

    #[test]
    fn login_request_layout() {
        let r = LoginRequest {
            transit: true,
            cont: false,
            csg: Stage::Operational,
            nsg: Stage::FullFeature,
            version_max: 0,
            version_min: 0,
            data_segment_length: U24::new(300).unwrap(),
            isid: [0x80, 0x12, 0x34, 0x56, 0x78, 0x9a],
            tsih: 0,
            itt: 0x1000,
            cid: 3,
            cmd_sn: 5,
            exp_stat_sn: 6,
        };
        let b = r.encode();
        assert_eq!(b[0], 0x43, "login is always immediate");
        assert_eq!(b[1], 0x87);
        assert_eq!(&b[8..14], &[0x80, 0x12, 0x34, 0x56, 0x78, 0x9a]);
        assert_eq!(&b[20..22], &[0, 3]);
    }

    #[test]
    fn cdb_too_long_is_error() {
        assert!(Cdb::new(&[0u8; 17]).is_err());
        assert_eq!(Cdb::new(&[1, 2, 3]).unwrap().as_slice(), &[1, 2, 3]);
    }

    #[test]
    fn u24_checks_range() {
        assert!(U24::new(0x00ff_ffff).is_ok());
        assert!(U24::new(0x0100_0000).is_err());
        assert!(U24::from_len(usize::MAX).is_err());
    }

    #[test]
    fn every_opcode_decodes_or_errors() {
        for op in 0u8..=255 {
            let mut b = [0u8; BHS_LEN];
            b[0] = op;
            b[1] = 0x80;
            // Both decoders must return, never panic, for every opcode.
            let _ = TargetPdu::decode(&b);
            let _ = InitiatorPdu::decode(&b);
        }
        let mut b = [0u8; BHS_LEN];
        b[0] = 0x3c;
        assert_eq!(TargetPdu::decode(&b), Err(PduError::VendorOpcode(0x3c)));
        b[0] = 0x30;
        assert_eq!(TargetPdu::decode(&b), Err(PduError::UnknownOpcode(0x30)));
    }

    #[test]
    fn hostile_flag_combinations_rejected() {
        let mut login = target_samples()[4].encode();
        login[1] |= 0x40; // T and C
        assert!(TargetPdu::decode(&login).is_err());
        let mut login = target_samples()[4].encode();
        login[1] = 0x80 | (1 << 2) | 2; // NSG 2 is reserved
        assert!(TargetPdu::decode(&login).is_err());
        let mut login = target_samples()[4].encode();
        login[36] = 4;
        assert!(TargetPdu::decode(&login).is_err());

        let mut data_in = target_samples()[1].encode();
        data_in[1] = 0x01; // S without F
        assert!(TargetPdu::decode(&data_in).is_err());
        data_in[1] = 0x80 | 0x04 | 0x02 | 0x01; // O and U
        assert!(TargetPdu::decode(&data_in).is_err());
        data_in[1] = 0x80 | 0x02; // U without S
        assert!(TargetPdu::decode(&data_in).is_err());

        let mut r2t = target_samples()[2].encode();
        r2t[44..48].copy_from_slice(&[0; 4]);
        assert!(TargetPdu::decode(&r2t).is_err());
        let mut r2t = target_samples()[2].encode();
        r2t[7] = 4; // data segment on an R2T
        assert!(TargetPdu::decode(&r2t).is_err());
        let mut r2t = target_samples()[2].encode();
        r2t[20..24].copy_from_slice(&[0xff; 4]);
        assert!(TargetPdu::decode(&r2t).is_err());

        let mut rsp = target_samples()[0].encode();
        rsp[1] = 0x80 | 0x04 | 0x02;
        assert!(TargetPdu::decode(&rsp).is_err());
        let mut rsp = target_samples()[0].encode();
        rsp[2] = 0x05; // reserved response code
        assert!(TargetPdu::decode(&rsp).is_err());
        rsp[2] = 0x80; // vendor specific is fine
        assert!(TargetPdu::decode(&rsp).is_ok());

        let mut nop = target_samples()[3].encode();
        nop[16..20].copy_from_slice(&[0, 0, 0, 1]); // ITT and TTT both set
        assert!(TargetPdu::decode(&nop).is_err());

        let mut tmf = target_samples()[7].encode();
        tmf[2] = 9;
        assert!(TargetPdu::decode(&tmf).is_err());
        let mut rej = target_samples()[8].encode();
        rej[2] = 0x0d;
        assert!(TargetPdu::decode(&rej).is_err());
        let mut asy = target_samples()[9].encode();
        asy[36] = 6;
        assert!(TargetPdu::decode(&asy).is_err());
        let mut logout = target_samples()[6].encode();
        logout[2] = 4;
        assert!(TargetPdu::decode(&logout).is_err());
        // PDUs without a data segment must announce none (found by fuzzing).
        for i in [6, 7] {
            let mut b = target_samples()[i].encode();
            b[6] = 0x31;
            assert!(TargetPdu::decode(&b).is_err(), "{i}");
        }
    }

    #[test]
    fn lengths_and_padding() {
        assert_eq!(padded_len(0), 0);
        assert_eq!(padded_len(1), 4);
        assert_eq!(padded_len(4), 4);
        assert_eq!(padded_len(0xff_ffff), 0x100_0000);
        assert_eq!(pad_len(5), 3);
        assert_eq!(pad_len(8), 0);
        assert_eq!(pdu_wire_length(0, 0, true, true), 52);
        assert_eq!(pdu_wire_length(8, 5, true, true), 48 + 8 + 4 + 8 + 4);
        assert_eq!(pdu_wire_length(0, 5, false, false), 56);
        let mut b = [0u8; BHS_LEN];
        b[4] = 2;
        b[5..8].copy_from_slice(&[0, 1, 2]);
        assert_eq!(peek_lengths(&b), (8, 0x102));
    }

    #[test]
    fn serial_arithmetic() {
        assert!(serial_lt(1, 2));
        assert!(serial_lt(0xffff_fff0, 5), "wraps");
        assert!(serial_gt(5, 0xffff_fff0));
        assert!(serial_le(7, 7));
        assert!(serial_ge(7, 7));
        assert!(!serial_lt(7, 7));
        assert_eq!(serial_cmp(0, 0x8000_0000), None);
        assert!(!serial_lt(0, 0x8000_0000) && !serial_gt(0, 0x8000_0000));
        assert!(serial_lt(0, 0x7fff_ffff));
        assert!(serial_gt(0, 0x8000_0001));
    }

    #[test]
    fn lun_encoding() {
        assert_eq!(lun_from_index(0).unwrap(), 0);
        assert_eq!(lun_from_index(1).unwrap(), 0x0001_0000_0000_0000);
        assert_eq!(lun_from_index(256).unwrap(), 0x4100_0000_0000_0000);
        assert!(lun_from_index(0x4000).is_err());
    }
}
