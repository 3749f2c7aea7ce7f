//! The iSER header (RFC 7145 §9.2–9.4) that precedes every message carried
//! in an RDMA Send.
//!
//! Byte 0 holds a 4-bit opcode in its high nibble:
//! - `0x1` iSCSI control-type PDU: 28-byte header (flags W/R, write STag + VA,
//!   read STag + VA, all big-endian), then the iSCSI BHS, AHS and data.
//! - `0x2` iSER Hello and `0x3` iSER HelloReply: 12-byte messages used only
//!   when the RDMA CM cannot carry private data (iWARP without MPA private
//!   data). Linux iser/isert and tgtd never send them on InfiniBand/RoCE,
//!   where the CM private data ([`super::cm`]) plays that role.

use thiserror::Error;

use crate::transport::BHS_LEN;

/// Length of the iSER header of an iSCSI control-type PDU.
pub const CONTROL_HEADER_LEN: usize = 28;
/// Length of an iSER Hello or HelloReply message.
pub const HELLO_LEN: usize = 12;
/// The iSER protocol version defined by RFC 7145 (and RFC 5046 before it).
pub const ISER_VERSION: u8 = 1;

/// W flag: the write STag/VA fields are valid (initiator memory the target
/// reads with RDMA Read to get the data of a SCSI write).
const FLAG_WSV: u8 = 0x08;
/// R flag: the read STag/VA fields are valid (initiator memory the target
/// writes with RDMA Write to return the data of a SCSI read).
const FLAG_RSV: u8 = 0x04;
/// Reserved low bits of byte 0 of a control-type header.
const CONTROL_RSVD_MASK: u8 = 0x03;
/// RJ (reject) bit of a HelloReply.
const HELLO_REPLY_RJ: u8 = 0x01;
/// Reserved bits of byte 0 of a HelloReply (between opcode and RJ).
const HELLO_REPLY_RSVD_MASK: u8 = 0x0e;
/// Reserved low nibble of byte 0 of a Hello.
const HELLO_RSVD_MASK: u8 = 0x0f;

/// Errors decoding or encoding an iSER header. Every received header comes
/// from the remote peer and is checked field by field.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// The buffer is shorter than the header it should hold.
    #[error("iSER header truncated: need {need} bytes, got {got}")]
    Truncated {
        /// Bytes the header needs.
        need: usize,
        /// Bytes available.
        got: usize,
    },
    /// The opcode nibble is not one RFC 7145 defines.
    #[error(
        "iSER header has unknown opcode {0:#x} (expected 0x1 control, 0x2 Hello or 0x3 HelloReply)"
    )]
    BadOpcode(u8),
    /// A reserved field is not zero.
    #[error("iSER {what} header has non-zero reserved bits (byte {byte} = {value:#04x})")]
    ReservedBits {
        /// Which message kind.
        what: &'static str,
        /// Offset of the offending byte.
        byte: usize,
        /// Its value.
        value: u8,
    },
    /// The versions in a Hello/HelloReply are inconsistent or out of range.
    #[error("iSER {what} carries an invalid version range (max {max}, min/current {min})")]
    BadVersion {
        /// Which message kind.
        what: &'static str,
        /// MaxVer field.
        max: u8,
        /// MinVer (Hello) or CurVer (HelloReply) field.
        min: u8,
    },
    /// A control-type message too short to hold the iSCSI BHS after the
    /// iSER header.
    #[error(
        "iSER message of {len} bytes is shorter than its headers ({CONTROL_HEADER_LEN} iSER + {BHS_LEN} BHS)"
    )]
    ShortPdu {
        /// Bytes received.
        len: usize,
    },
    /// The BHS declares more AHS or data than the message holds.
    #[error(
        "iSCSI PDU declares {ahs} AHS and {data} data bytes but the iSER message has {len} bytes"
    )]
    SegmentsBeyondMessage {
        /// AHS bytes declared (TotalAHSLength × 4).
        ahs: usize,
        /// DataSegmentLength declared.
        data: usize,
        /// Bytes received.
        len: usize,
    },
    /// The message has a valid opcode but is not the kind the caller expected.
    #[error("expected an iSER {expected} message, got opcode {got:#x}")]
    UnexpectedOpcode {
        /// Message kind the caller asked for.
        expected: &'static str,
        /// Opcode received.
        got: u8,
    },
}

/// The iSER opcode (high nibble of byte 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// An iSCSI control-type PDU follows the 28-byte header.
    Control,
    /// iSER Hello (initiator → target, iWARP only).
    Hello,
    /// iSER HelloReply (target → initiator, iWARP only).
    HelloReply,
}

impl Opcode {
    /// The 4-bit wire value.
    pub fn nibble(self) -> u8 {
        match self {
            Opcode::Control => 0x1,
            Opcode::Hello => 0x2,
            Opcode::HelloReply => 0x3,
        }
    }

    /// Reads the opcode from byte 0 of a message.
    pub fn from_byte(b: u8) -> Result<Self, HeaderError> {
        match b >> 4 {
            0x1 => Ok(Opcode::Control),
            0x2 => Ok(Opcode::Hello),
            0x3 => Ok(Opcode::HelloReply),
            other => Err(HeaderError::BadOpcode(other)),
        }
    }
}

/// A remote buffer advertised in a control header: STag (rkey) and base
/// virtual address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteBuffer {
    /// The STag (rkey) the peer uses for RDMA on this buffer.
    pub stag: u32,
    /// The buffer's base address (tagged offset) in the owner's address space.
    pub va: u64,
}

/// iSER header of an iSCSI control-type PDU (RFC 7145 §9.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ControlHeader {
    /// Write STag/VA (W flag): where the target RDMA-Reads write data from.
    pub write: Option<RemoteBuffer>,
    /// Read STag/VA (R flag): where the target RDMA-Writes read data to.
    pub read: Option<RemoteBuffer>,
}

impl ControlHeader {
    /// Encodes the header into the first [`CONTROL_HEADER_LEN`] bytes of `out`.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<(), HeaderError> {
        let got = out.len();
        let out = out
            .get_mut(..CONTROL_HEADER_LEN)
            .ok_or(HeaderError::Truncated {
                need: CONTROL_HEADER_LEN,
                got,
            })?;
        out.copy_from_slice(&self.encode());
        Ok(())
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; CONTROL_HEADER_LEN] {
        let mut b = [0u8; CONTROL_HEADER_LEN];
        let mut flags = Opcode::Control.nibble() << 4;
        // Fields whose flag is clear are sent as zero, as Linux and tgtd do.
        if let Some(w) = self.write {
            flags |= FLAG_WSV;
            b[4..8].copy_from_slice(&w.stag.to_be_bytes());
            b[8..16].copy_from_slice(&w.va.to_be_bytes());
        }
        if let Some(r) = self.read {
            flags |= FLAG_RSV;
            b[16..20].copy_from_slice(&r.stag.to_be_bytes());
            b[20..28].copy_from_slice(&r.va.to_be_bytes());
        }
        b[0] = flags;
        b
    }

    /// Decodes a control-type header from the start of `buf` (the iSCSI
    /// BHS follows at offset [`CONTROL_HEADER_LEN`]).
    pub fn decode(buf: &[u8]) -> Result<Self, HeaderError> {
        let b: &[u8; CONTROL_HEADER_LEN] = buf
            .get(..CONTROL_HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(HeaderError::Truncated {
                need: CONTROL_HEADER_LEN,
                got: buf.len(),
            })?;
        match Opcode::from_byte(b[0])? {
            Opcode::Control => {}
            other => {
                return Err(HeaderError::UnexpectedOpcode {
                    expected: "control-type",
                    got: other.nibble(),
                })
            }
        }
        check_reserved("control-type", 0, b[0] & CONTROL_RSVD_MASK)?;
        for (i, &v) in b.iter().enumerate().take(4).skip(1) {
            check_reserved("control-type", i, v)?;
        }
        // Unflagged STag/VA fields are not meaningful; they are ignored.
        let write = (b[0] & FLAG_WSV != 0).then(|| RemoteBuffer {
            stag: be32(&b[4..8]),
            va: be64(&b[8..16]),
        });
        let read = (b[0] & FLAG_RSV != 0).then(|| RemoteBuffer {
            stag: be32(&b[16..20]),
            va: be64(&b[20..28]),
        });
        Ok(ControlHeader { write, read })
    }
}

/// A received control-type message split into its parts: the iSER header,
/// the iSCSI BHS, and the AHS and data segment that the BHS declares. Every
/// length comes from the target and is checked against the bytes received
/// before a slice is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlMessage<'a> {
    /// The iSER header (STags are meaningless in messages from a target).
    pub header: ControlHeader,
    /// The iSCSI Basic Header Segment.
    pub bhs: [u8; BHS_LEN],
    /// The Additional Header Segments (TotalAHSLength × 4 bytes).
    pub ahs: &'a [u8],
    /// The data segment (DataSegmentLength bytes; iSER does not pad it, and
    /// bytes after it in the message are ignored).
    pub data: &'a [u8],
}

impl<'a> ControlMessage<'a> {
    /// Splits the `msg` a Receive completed with (its first `len` bytes).
    pub fn parse(msg: &'a [u8]) -> Result<Self, HeaderError> {
        let header = ControlHeader::decode(msg)?;
        let bhs: [u8; BHS_LEN] = msg
            .get(CONTROL_HEADER_LEN..CONTROL_HEADER_LEN + BHS_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(HeaderError::ShortPdu { len: msg.len() })?;
        let ahs_len = usize::from(bhs[4]) * 4;
        let data_len = usize::from(bhs[5]) << 16 | usize::from(bhs[6]) << 8 | usize::from(bhs[7]);
        let ahs_start = CONTROL_HEADER_LEN + BHS_LEN;
        let data_start = ahs_start + ahs_len;
        let beyond = HeaderError::SegmentsBeyondMessage {
            ahs: ahs_len,
            data: data_len,
            len: msg.len(),
        };
        let ahs = msg.get(ahs_start..data_start).ok_or(beyond.clone())?;
        let data = msg.get(data_start..data_start + data_len).ok_or(beyond)?;
        Ok(ControlMessage {
            header,
            bhs,
            ahs,
            data,
        })
    }
}

/// iSER Hello message (RFC 7145 §9.3), sent by the initiator in iWARP mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Highest iSER version the initiator supports (4 bits).
    pub max_ver: u8,
    /// Lowest iSER version the initiator supports (4 bits).
    pub min_ver: u8,
    /// iSER-IRD: RDMA Read credits the initiator grants the target.
    pub ird: u16,
}

impl Hello {
    /// Encodes the 12-byte message; fails if a version does not fit 4 bits
    /// or `min_ver > max_ver`.
    pub fn encode(&self) -> Result<[u8; HELLO_LEN], HeaderError> {
        check_versions("Hello", self.max_ver, self.min_ver)?;
        let mut b = [0u8; HELLO_LEN];
        b[0] = Opcode::Hello.nibble() << 4;
        b[1] = (self.max_ver << 4) | self.min_ver;
        b[2..4].copy_from_slice(&self.ird.to_be_bytes());
        Ok(b)
    }

    /// Decodes a Hello from the start of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Self, HeaderError> {
        let b = hello_bytes(buf)?;
        expect_opcode(b[0], Opcode::Hello, "Hello")?;
        check_reserved("Hello", 0, b[0] & HELLO_RSVD_MASK)?;
        check_tail_reserved("Hello", b)?;
        let (max_ver, min_ver) = (b[1] >> 4, b[1] & 0x0f);
        check_versions("Hello", max_ver, min_ver)?;
        Ok(Hello {
            max_ver,
            min_ver,
            ird: u16::from_be_bytes([b[2], b[3]]),
        })
    }
}

/// iSER HelloReply message (RFC 7145 §9.4), the target's answer to a Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloReply {
    /// RJ bit: the target rejects the initiator's version range.
    pub reject: bool,
    /// Highest iSER version the target supports (4 bits).
    pub max_ver: u8,
    /// Version the target will use (4 bits; meaningless when `reject`).
    pub cur_ver: u8,
    /// iSER-ORD: RDMA Reads the target will keep outstanding.
    pub ord: u16,
}

impl HelloReply {
    /// Encodes the 12-byte message; fails if a version does not fit 4 bits
    /// or, when accepting, `cur_ver > max_ver`.
    pub fn encode(&self) -> Result<[u8; HELLO_LEN], HeaderError> {
        check_reply_versions(self.reject, self.max_ver, self.cur_ver)?;
        let mut b = [0u8; HELLO_LEN];
        b[0] = (Opcode::HelloReply.nibble() << 4) | u8::from(self.reject);
        b[1] = (self.max_ver << 4) | self.cur_ver;
        b[2..4].copy_from_slice(&self.ord.to_be_bytes());
        Ok(b)
    }

    /// Decodes a HelloReply from the start of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Self, HeaderError> {
        let b = hello_bytes(buf)?;
        expect_opcode(b[0], Opcode::HelloReply, "HelloReply")?;
        check_reserved("HelloReply", 0, b[0] & HELLO_REPLY_RSVD_MASK)?;
        check_tail_reserved("HelloReply", b)?;
        let reject = b[0] & HELLO_REPLY_RJ != 0;
        let (max_ver, cur_ver) = (b[1] >> 4, b[1] & 0x0f);
        check_reply_versions(reject, max_ver, cur_ver)?;
        Ok(HelloReply {
            reject,
            max_ver,
            cur_ver,
            ord: u16::from_be_bytes([b[2], b[3]]),
        })
    }
}

/// Any iSER message, as found at the start of a received Send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// Control-type header; the iSCSI PDU starts at [`CONTROL_HEADER_LEN`].
    Control(ControlHeader),
    /// Hello.
    Hello(Hello),
    /// HelloReply.
    HelloReply(HelloReply),
}

impl Message {
    /// Decodes whichever message `buf` starts with; returns it with the
    /// number of bytes its header occupies.
    pub fn decode(buf: &[u8]) -> Result<(Self, usize), HeaderError> {
        let first = *buf
            .first()
            .ok_or(HeaderError::Truncated { need: 1, got: 0 })?;
        Ok(match Opcode::from_byte(first)? {
            Opcode::Control => (
                Message::Control(ControlHeader::decode(buf)?),
                CONTROL_HEADER_LEN,
            ),
            Opcode::Hello => (Message::Hello(Hello::decode(buf)?), HELLO_LEN),
            Opcode::HelloReply => (Message::HelloReply(HelloReply::decode(buf)?), HELLO_LEN),
        })
    }
}

fn be32(s: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(s);
    u32::from_be_bytes(a)
}

fn be64(s: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    u64::from_be_bytes(a)
}

fn hello_bytes(buf: &[u8]) -> Result<&[u8; HELLO_LEN], HeaderError> {
    buf.get(..HELLO_LEN)
        .and_then(|s| s.try_into().ok())
        .ok_or(HeaderError::Truncated {
            need: HELLO_LEN,
            got: buf.len(),
        })
}

fn expect_opcode(b0: u8, want: Opcode, what: &'static str) -> Result<(), HeaderError> {
    let got = Opcode::from_byte(b0)?;
    if got != want {
        return Err(HeaderError::UnexpectedOpcode {
            expected: what,
            got: got.nibble(),
        });
    }
    Ok(())
}

fn check_reserved(what: &'static str, byte: usize, value: u8) -> Result<(), HeaderError> {
    if value != 0 {
        return Err(HeaderError::ReservedBits { what, byte, value });
    }
    Ok(())
}

fn check_tail_reserved(what: &'static str, b: &[u8; HELLO_LEN]) -> Result<(), HeaderError> {
    for (i, &v) in b.iter().enumerate().skip(4) {
        check_reserved(what, i, v)?;
    }
    Ok(())
}

fn check_versions(what: &'static str, max: u8, min: u8) -> Result<(), HeaderError> {
    if max > 0x0f || min > 0x0f || min > max {
        return Err(HeaderError::BadVersion { what, max, min });
    }
    Ok(())
}

fn check_reply_versions(reject: bool, max: u8, cur: u8) -> Result<(), HeaderError> {
    if max > 0x0f || cur > 0x0f || (!reject && cur > max) {
        return Err(HeaderError::BadVersion {
            what: "HelloReply",
            max,
            min: cur,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_header_matches_linux_layout() {
        let h = ControlHeader {
            write: Some(RemoteBuffer {
                stag: 0x1122_3344,
                va: 0x0102_0304_0506_0708,
            }),
            read: Some(RemoteBuffer {
                stag: 0xaabb_ccdd,
                va: 0xf0e0_d0c0_b0a0_9080,
            }),
        };
        let b = h.encode();
        // flags: opcode 1 << 4 | W 0x08 | R 0x04, as ISCSI_CTRL|ISER_WSV|ISER_RSV.
        assert_eq!(b[0], 0x1c);
        assert_eq!(&b[1..4], &[0, 0, 0]);
        assert_eq!(&b[4..8], &[0x11, 0x22, 0x33, 0x44]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[16..20], &[0xaa, 0xbb, 0xcc, 0xdd]);
        assert_eq!(
            &b[20..28],
            &[0xf0, 0xe0, 0xd0, 0xc0, 0xb0, 0xa0, 0x90, 0x80]
        );
        assert_eq!(ControlHeader::decode(&b).unwrap(), h);
    }

    #[test]
    fn control_header_without_buffers_is_0x10_and_zeros() {
        let b = ControlHeader::default().encode();
        assert_eq!(b[0], 0x10);
        assert!(b[1..].iter().all(|&x| x == 0));
        let d = ControlHeader::decode(&b).unwrap();
        assert_eq!(d, ControlHeader::default());
    }

    #[test]
    fn control_header_ignores_unflagged_fields() {
        let mut b = ControlHeader::default().encode();
        b[4..8].copy_from_slice(&[9, 9, 9, 9]);
        b[0] |= FLAG_RSV;
        b[16..20].copy_from_slice(&7u32.to_be_bytes());
        let d = ControlHeader::decode(&b).unwrap();
        assert_eq!(d.write, None);
        assert_eq!(d.read, Some(RemoteBuffer { stag: 7, va: 0 }));
    }

    #[test]
    fn control_header_rejects_bad_input() {
        let good = ControlHeader::default().encode();
        assert_eq!(
            ControlHeader::decode(&good[..27]),
            Err(HeaderError::Truncated { need: 28, got: 27 })
        );
        let mut b = good;
        b[0] = 0x50;
        assert_eq!(ControlHeader::decode(&b), Err(HeaderError::BadOpcode(5)));
        let mut b = good;
        b[0] = 0x11;
        assert!(matches!(
            ControlHeader::decode(&b),
            Err(HeaderError::ReservedBits { byte: 0, .. })
        ));
        let mut b = good;
        b[2] = 1;
        assert!(matches!(
            ControlHeader::decode(&b),
            Err(HeaderError::ReservedBits { byte: 2, .. })
        ));
        let mut b = good;
        b[0] = 0x20;
        assert!(matches!(
            ControlHeader::decode(&b),
            Err(HeaderError::UnexpectedOpcode { got: 2, .. })
        ));
        let mut out = [0u8; 10];
        assert!(ControlHeader::default().encode_into(&mut out).is_err());
        let mut out = [0xffu8; 30];
        ControlHeader::default().encode_into(&mut out).unwrap();
        assert_eq!(out[0], 0x10);
        assert_eq!(out[28], 0xff);
    }

    #[test]
    fn hello_roundtrip_and_layout() {
        let h = Hello {
            max_ver: 1,
            min_ver: 1,
            ird: 0x0102,
        };
        let b = h.encode().unwrap();
        assert_eq!(b, [0x20, 0x11, 0x01, 0x02, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(Hello::decode(&b).unwrap(), h);
        let (m, n) = Message::decode(&b).unwrap();
        assert_eq!((m, n), (Message::Hello(h), HELLO_LEN));
    }

    #[test]
    fn hello_rejects_bad_versions_and_reserved() {
        let bad = Hello {
            max_ver: 1,
            min_ver: 2,
            ird: 0,
        };
        assert!(matches!(bad.encode(), Err(HeaderError::BadVersion { .. })));
        let big = Hello {
            max_ver: 16,
            min_ver: 0,
            ird: 0,
        };
        assert!(big.encode().is_err());
        let mut b = [0x20, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            Hello::decode(&b),
            Err(HeaderError::BadVersion { max: 1, min: 2, .. })
        ));
        b[1] = 0x11;
        b[11] = 1;
        assert!(matches!(
            Hello::decode(&b),
            Err(HeaderError::ReservedBits { byte: 11, .. })
        ));
        b[11] = 0;
        b[0] = 0x21;
        assert!(matches!(
            Hello::decode(&b),
            Err(HeaderError::ReservedBits { byte: 0, .. })
        ));
        assert!(matches!(
            Hello::decode(&b[..11]),
            Err(HeaderError::Truncated { need: 12, got: 11 })
        ));
    }

    #[test]
    fn hello_reply_rj_bit_and_versions() {
        let r = HelloReply {
            reject: true,
            max_ver: 1,
            cur_ver: 0,
            ord: 16,
        };
        let b = r.encode().unwrap();
        assert_eq!(&b[..4], &[0x31, 0x10, 0x00, 0x10]);
        assert_eq!(HelloReply::decode(&b).unwrap(), r);
        let ok = HelloReply {
            reject: false,
            max_ver: 1,
            cur_ver: 1,
            ord: 4,
        };
        let b = ok.encode().unwrap();
        assert_eq!(b[0], 0x30);
        assert_eq!(
            Message::decode(&b).unwrap(),
            (Message::HelloReply(ok), HELLO_LEN)
        );
        let mut bad = b;
        bad[0] = 0x32;
        assert!(matches!(
            HelloReply::decode(&bad),
            Err(HeaderError::ReservedBits { byte: 0, .. })
        ));
        let mut bad = b;
        bad[1] = 0x12;
        assert!(matches!(
            HelloReply::decode(&bad),
            Err(HeaderError::BadVersion { .. })
        ));
        assert!(matches!(
            HelloReply::decode(
                &Hello {
                    max_ver: 1,
                    min_ver: 1,
                    ird: 1
                }
                .encode()
                .unwrap()
            ),
            Err(HeaderError::UnexpectedOpcode { got: 2, .. })
        ));
    }

    #[test]
    fn message_decode_dispatches_and_checks_empty() {
        assert_eq!(
            Message::decode(&[]),
            Err(HeaderError::Truncated { need: 1, got: 0 })
        );
        assert_eq!(Message::decode(&[0x00]), Err(HeaderError::BadOpcode(0)));
        let mut pdu = ControlHeader::default().encode().to_vec();
        pdu.extend_from_slice(&[0x43; 48]);
        let (m, n) = Message::decode(&pdu).unwrap();
        assert_eq!(n, CONTROL_HEADER_LEN);
        assert_eq!(m, Message::Control(ControlHeader::default()));
    }

    fn control_message(ahs_words: u8, dsl: usize, extra: usize) -> Vec<u8> {
        let mut m = ControlHeader::default().encode().to_vec();
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = 0x21; // SCSI Response
        bhs[4] = ahs_words;
        bhs[5..8].copy_from_slice(&(dsl as u32).to_be_bytes()[1..]);
        m.extend_from_slice(&bhs);
        m.extend((0..usize::from(ahs_words) * 4 + dsl + extra).map(|i| i as u8));
        m
    }

    #[test]
    fn control_message_splits_ahs_and_data() {
        let m = control_message(1, 18, 0);
        let p = ControlMessage::parse(&m).unwrap();
        assert_eq!(p.bhs[0], 0x21);
        assert_eq!(p.ahs, &[0, 1, 2, 3]);
        assert_eq!(p.data.len(), 18);
        assert_eq!(p.data[0], 4);
        // Bytes after the data segment (a target padding it) are ignored.
        let m = control_message(0, 5, 3);
        assert_eq!(ControlMessage::parse(&m).unwrap().data, &[0, 1, 2, 3, 4]);
    }

    #[test]
    fn control_message_refuses_lengths_beyond_the_message() {
        let mut m = control_message(0, 100, 0);
        m.truncate(m.len() - 1);
        assert_eq!(
            ControlMessage::parse(&m),
            Err(HeaderError::SegmentsBeyondMessage {
                ahs: 0,
                data: 100,
                len: CONTROL_HEADER_LEN + BHS_LEN + 99
            })
        );
        let mut m = control_message(255, 0, 0);
        m.truncate(CONTROL_HEADER_LEN + BHS_LEN + 16);
        assert!(matches!(
            ControlMessage::parse(&m),
            Err(HeaderError::SegmentsBeyondMessage { ahs: 1020, .. })
        ));
        // The largest DataSegmentLength a BHS can declare, in a tiny message.
        let mut m = control_message(0, 0, 0);
        m[CONTROL_HEADER_LEN + 5..CONTROL_HEADER_LEN + 8].copy_from_slice(&[0xff; 3]);
        assert!(ControlMessage::parse(&m).is_err());
        let m = control_message(0, 0, 0);
        assert_eq!(
            ControlMessage::parse(&m[..CONTROL_HEADER_LEN + 47]),
            Err(HeaderError::ShortPdu {
                len: CONTROL_HEADER_LEN + 47
            })
        );
        let mut m = control_message(0, 0, 0);
        m[0] = 0x20; // Hello where a control-type PDU must be
        assert!(matches!(
            ControlMessage::parse(&m),
            Err(HeaderError::UnexpectedOpcode { .. })
        ));
    }
}
