//! SendTargets discovery (RFC 7143 Appendix C) and TargetAddress parsing.
//!
//! [`SendTargets`] builds the `SendTargets=All` Text Request, follows the
//! target's continuations (C bit / F=0 with a Target Transfer Tag) and
//! parses the answer into targets and their portals. [`discover`] runs the
//! exchange on a discovery session's connection and logs out.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use thiserror::Error;

use super::login::LoginOutcome;
use super::pdu::{
    serial_lt, LogoutReason, LogoutRequest, TargetPdu, TextRequest, TextResponse, RESERVED_TAG, U24,
};
use super::text::{self, TextAssembler, TextError};
use crate::transport::{OutPdu, PduData, Transport, TransportError};

/// Default iSCSI TCP port.
pub const DEFAULT_PORT: u16 = 3260;

/// Longest iSCSI name (RFC 7143 §4.2.7.1).
pub const MAX_NAME_LEN: usize = 223;

/// Most text a SendTargets answer may total (over all continuations).
pub const MAX_SENDTARGETS_TEXT: usize = 1 << 20;

/// A discovery failure.
#[derive(Debug, Error)]
pub enum DiscoveryError {
    /// A TargetAddress value we cannot parse.
    #[error("invalid TargetAddress {0:?}")]
    BadAddress(String),
    /// A TargetName that is empty or too long.
    #[error("invalid TargetName {0:?}")]
    BadName(String),
    /// A TargetAddress before any TargetName.
    #[error("SendTargets answer has a TargetAddress before any TargetName")]
    AddressWithoutTarget,
    /// The text is malformed.
    #[error("malformed SendTargets answer")]
    Text(#[from] TextError),
    /// The Text Response does not belong to our request.
    #[error("Text Response has initiator task tag {got:#x}, expected {expected:#x}")]
    WrongItt {
        /// Received ITT.
        got: u32,
        /// Our ITT.
        expected: u32,
    },
    /// Flags/tags contradict each other.
    #[error("invalid Text Response: {0}")]
    Protocol(&'static str),
    /// More responses after the exchange finished.
    #[error("Text Response after the SendTargets exchange finished")]
    Finished,
    /// The connection failed or timed out.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The target sent something other than a Text Response.
    #[error("target answered SendTargets with {0}")]
    Unexpected(String),
}

/// A portal: host (IPv4, IPv6 or DNS name), port and portal group tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Portal {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Target portal group tag, when given.
    pub tpgt: Option<u16>,
}

impl Portal {
    /// `host:port` (IPv6 in brackets) for connecting and for messages.
    pub fn socket_addr_string(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Portal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.socket_addr_string())?;
        if let Some(t) = self.tpgt {
            write!(f, ",{t}")?;
        }
        Ok(())
    }
}

fn valid_dns_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_')
}

/// Parse a TargetAddress value: `host[:port][,tpgt]`, where host is a DNS
/// name, an IPv4 address or a bracketed IPv6 address (`[fe80::1]:3260,1`).
pub fn parse_target_address(v: &str) -> Result<Portal, DiscoveryError> {
    let bad = || DiscoveryError::BadAddress(v.chars().take(300).collect());
    let (addr, tpgt) = match v.rsplit_once(',') {
        Some((a, t)) => {
            let t: u16 = if !t.is_empty() && t.len() <= 5 && t.bytes().all(|c| c.is_ascii_digit()) {
                t.parse().map_err(|_| bad())?
            } else {
                return Err(bad());
            };
            (a, Some(t))
        }
        None => (v, None),
    };
    let parse_port = |p: &str| -> Result<u16, DiscoveryError> {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(bad()),
            Ok(n) => Ok(n),
        }
    };
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        h.parse::<Ipv6Addr>().map_err(|_| bad())?;
        let port = match after {
            "" => DEFAULT_PORT,
            p => parse_port(p.strip_prefix(':').ok_or_else(bad)?)?,
        };
        (h.to_string(), port)
    } else {
        let (h, port) = match addr.split_once(':') {
            Some((h, p)) => (h, parse_port(p)?),
            None => (addr, DEFAULT_PORT),
        };
        if h.parse::<Ipv4Addr>().is_err() && !valid_dns_name(h) {
            return Err(bad());
        }
        (h.to_string(), port)
    };
    Ok(Portal { host, port, tpgt })
}

/// One target of a SendTargets answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredTarget {
    /// The iSCSI name.
    pub name: String,
    /// Its portals; empty means "the portal of the discovery session"
    /// (RFC 7143 Appendix C).
    pub portals: Vec<Portal>,
}

/// Parse complete SendTargets answer text.
pub fn parse_send_targets(data: &[u8]) -> Result<Vec<DiscoveredTarget>, DiscoveryError> {
    let mut out: Vec<DiscoveredTarget> = Vec::new();
    for p in text::decode(data)? {
        match p.key.as_str() {
            "TargetName" => {
                if p.value.is_empty() || p.value.len() > MAX_NAME_LEN {
                    return Err(DiscoveryError::BadName(p.value.chars().take(300).collect()));
                }
                out.push(DiscoveredTarget {
                    name: p.value,
                    portals: Vec::new(),
                });
            }
            "TargetAddress" => {
                let portal = parse_target_address(&p.value)?;
                out.last_mut()
                    .ok_or(DiscoveryError::AddressWithoutTarget)?
                    .portals
                    .push(portal);
            }
            // TargetAlias and vendor keys carry nothing we need.
            _ => {}
        }
    }
    Ok(out)
}

/// What to do after a Text Response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendTargetsStep {
    /// Send this (empty) Text Request to get the rest of the answer.
    Send(TextRequest),
    /// The answer is complete.
    Done(Vec<DiscoveredTarget>),
}

/// A SendTargets=All exchange on a discovery (or normal) session.
#[derive(Debug, Clone)]
pub struct SendTargets {
    itt: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
    asm: TextAssembler,
    done: bool,
}

impl SendTargets {
    /// Start an exchange with this task tag and the session's current CmdSN
    /// and ExpStatSN. The requests are immediate, so CmdSN does not advance.
    pub fn new(itt: u32, cmd_sn: u32, exp_stat_sn: u32) -> Self {
        SendTargets {
            itt,
            cmd_sn,
            exp_stat_sn,
            asm: TextAssembler::new(MAX_SENDTARGETS_TEXT),
            done: false,
        }
    }

    /// The first request: header and its data segment.
    pub fn request(&self) -> (TextRequest, Vec<u8>) {
        let data = b"SendTargets=All\0".to_vec();
        let hdr = TextRequest {
            immediate: true,
            final_: true,
            cont: false,
            data_segment_length: U24::from_len(data.len()).unwrap_or(U24::ZERO),
            lun: 0,
            itt: self.itt,
            ttt: RESERVED_TAG,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        };
        (hdr, data)
    }

    /// ExpStatSN to use after the last response.
    pub fn exp_stat_sn(&self) -> u32 {
        self.exp_stat_sn
    }

    /// Consume one Text Response and its data segment.
    pub fn on_response(
        &mut self,
        hdr: &TextResponse,
        data: &[u8],
    ) -> Result<SendTargetsStep, DiscoveryError> {
        if self.done {
            return Err(DiscoveryError::Finished);
        }
        if hdr.itt != self.itt {
            return Err(DiscoveryError::WrongItt {
                got: hdr.itt,
                expected: self.itt,
            });
        }
        if data.len() != hdr.data_segment_length.get() as usize {
            return Err(DiscoveryError::Protocol(
                "data length differs from DataSegmentLength",
            ));
        }
        if hdr.final_ && hdr.ttt != RESERVED_TAG {
            return Err(DiscoveryError::Protocol(
                "F bit set with a target transfer tag",
            ));
        }
        if !hdr.final_ && hdr.ttt == RESERVED_TAG {
            return Err(DiscoveryError::Protocol(
                "more text announced without a target transfer tag",
            ));
        }
        if !serial_lt(hdr.seq.stat_sn, self.exp_stat_sn) {
            self.exp_stat_sn = hdr.seq.stat_sn.wrapping_add(1);
        }
        let whole = self.asm.push(data, !hdr.final_)?;
        match whole {
            None => Ok(SendTargetsStep::Send(TextRequest {
                immediate: true,
                final_: true,
                cont: false,
                data_segment_length: U24::ZERO,
                lun: 0,
                itt: self.itt,
                ttt: hdr.ttt,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
            })),
            Some(text) => {
                self.done = true;
                Ok(SendTargetsStep::Done(parse_send_targets(&text)?))
            }
        }
    }
}

/// Runs SendTargets=All on a discovery session's connection (just logged
/// in: `login`), then logs out. Targets without a TargetAddress are at the
/// discovery portal.
pub fn discover(
    conn: &mut dyn Transport,
    login: &LoginOutcome,
    deadline: Instant,
) -> Result<Vec<DiscoveredTarget>, DiscoveryError> {
    const ITT: u32 = 1;
    let mut st = SendTargets::new(ITT, login.cmd_sn, login.exp_stat_sn);
    let (hdr, data) = st.request();
    conn.send_blocking(OutPdu::new(hdr.encode(), PduData::Owned(data)), deadline)?;
    let targets = loop {
        let pdu = conn.recv_blocking(deadline)?;
        let resp = match TargetPdu::decode(&pdu.bhs) {
            Ok(TargetPdu::TextResponse(r)) => r,
            // Unsolicited pings and messages are not answers.
            Ok(TargetPdu::NopIn(_)) | Ok(TargetPdu::AsyncMessage(_)) => continue,
            Ok(_) => {
                return Err(DiscoveryError::Unexpected(format!(
                    "a PDU of opcode {:#04x}",
                    pdu.bhs[0] & 0x3f
                )))
            }
            Err(e) => return Err(DiscoveryError::Unexpected(e.to_string())),
        };
        match st.on_response(&resp, &pdu.data)? {
            SendTargetsStep::Send(next) => {
                conn.send_blocking(OutPdu::new(next.encode(), PduData::None), deadline)?
            }
            SendTargetsStep::Done(t) => break t,
        }
    };
    // Polite logout; the answer is already in hand, so failures here only
    // mean the target closes first.
    let logout = LogoutRequest {
        immediate: true,
        reason: LogoutReason::CloseSession,
        itt: ITT + 1,
        cid: 0,
        cmd_sn: login.cmd_sn,
        exp_stat_sn: st.exp_stat_sn(),
    };
    if conn
        .send_blocking(OutPdu::new(logout.encode(), PduData::None), deadline)
        .is_ok()
    {
        let _ = conn.recv_blocking(deadline);
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::pdu::SeqNums;

    #[test]
    fn addresses() {
        let p = parse_target_address("10.0.0.1:3260,1").unwrap();
        assert_eq!(
            p,
            Portal {
                host: "10.0.0.1".into(),
                port: 3260,
                tpgt: Some(1)
            }
        );
        assert_eq!(p.to_string(), "10.0.0.1:3260,1");
        let p = parse_target_address("[fe80::1]:3261,2").unwrap();
        assert_eq!(p.host, "fe80::1");
        assert_eq!(p.port, 3261);
        assert_eq!(p.socket_addr_string(), "[fe80::1]:3261");
        let p = parse_target_address("[::1]").unwrap();
        assert_eq!((p.port, p.tpgt), (3260, None));
        let p = parse_target_address("storage.example.com,7").unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.tpgt),
            ("storage.example.com", 3260, Some(7))
        );
        for bad in [
            "",
            "10.0.0.1:",
            "10.0.0.1:70000",
            "10.0.0.1:0",
            "10.0.0.1:3260,",
            "10.0.0.1:3260,x",
            "10.0.0.1:3260,65536",
            "[fe80::1",
            "[notv6]:3260",
            "fe80::1:3260",
            "host name:3260",
            "[::1]x3260",
        ] {
            assert!(parse_target_address(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn send_targets_answer() {
        let data = b"TargetName=iqn.2024-01.com.example:a\0TargetAddress=127.0.0.1:3260,1\0\
TargetAddress=[::1]:3260,1\0TargetName=iqn.2024-01.com.example:b\0";
        let t = parse_send_targets(data).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].name, "iqn.2024-01.com.example:a");
        assert_eq!(t[0].portals.len(), 2);
        assert_eq!(t[0].portals[1].host, "::1");
        assert!(t[1].portals.is_empty());
        assert!(matches!(
            parse_send_targets(b"TargetAddress=1.2.3.4\0"),
            Err(DiscoveryError::AddressWithoutTarget)
        ));
        assert!(parse_send_targets(b"TargetName=\0").is_err());
        assert!(parse_send_targets(b"").unwrap().is_empty());
    }

    fn rsp(final_: bool, cont: bool, ttt: u32, data: &[u8], stat_sn: u32) -> TextResponse {
        TextResponse {
            final_,
            cont,
            data_segment_length: U24::from_len(data.len()).unwrap(),
            lun: 0,
            itt: 5,
            ttt,
            seq: SeqNums {
                stat_sn,
                exp_cmd_sn: 2,
                max_cmd_sn: 2,
            },
        }
    }

    #[test]
    fn exchange_with_continuation() {
        let mut st = SendTargets::new(5, 2, 1);
        let (req, data) = st.request();
        assert_eq!(data, b"SendTargets=All\0");
        assert!(req.final_ && req.immediate);
        assert_eq!(req.ttt, RESERVED_TAG);
        let part1 = b"TargetName=iqn.x:a\0TargetAddr";
        let part2 = b"ess=127.0.0.1:3260,1\0";
        let step = st
            .on_response(&rsp(false, true, 0x99, part1, 1), part1)
            .unwrap();
        match step {
            SendTargetsStep::Send(r) => {
                assert_eq!(r.ttt, 0x99);
                assert_eq!(r.exp_stat_sn, 2);
                assert_eq!(r.data_segment_length.get(), 0);
            }
            other => panic!("{other:?}"),
        }
        let step = st
            .on_response(&rsp(true, false, RESERVED_TAG, part2, 2), part2)
            .unwrap();
        assert_eq!(
            step,
            SendTargetsStep::Done(vec![DiscoveredTarget {
                name: "iqn.x:a".into(),
                portals: vec![parse_target_address("127.0.0.1:3260,1").unwrap()]
            }])
        );
        assert_eq!(st.exp_stat_sn(), 3);
        assert!(st
            .on_response(&rsp(true, false, RESERVED_TAG, b"", 3), b"")
            .is_err());
    }

    #[test]
    fn hostile_text_responses() {
        let mut st = SendTargets::new(5, 2, 1);
        let mut r = rsp(true, false, RESERVED_TAG, b"", 1);
        r.itt = 6;
        assert!(matches!(
            st.on_response(&r, b""),
            Err(DiscoveryError::WrongItt { .. })
        ));
        let r = rsp(true, false, 0x10, b"", 1);
        assert!(st.on_response(&r, b"").is_err());
        let r = rsp(false, false, RESERVED_TAG, b"", 1);
        assert!(st.on_response(&r, b"").is_err());
        let r = rsp(true, false, RESERVED_TAG, b"A=1\0", 1);
        assert!(st.on_response(&r, b"A=1").is_err(), "length mismatch");
    }
}
