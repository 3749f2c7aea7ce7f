//! Operational session parameters and their negotiation (RFC 7143 §6.2 and
//! §13, iSER keys of RFC 7145 §6.3).
//!
//! [`ParamOffer`] is what we propose; [`Negotiation`] sends those offers,
//! checks each target answer against the RFC's result function (numerical
//! min/max, boolean AND/OR, list selection) and against what we offered, and
//! answers keys the target offers on its own. A target answer we could not
//! have produced by the rules (a value above our offer for a "min" key, `Yes`
//! for an AND key we offered `No`, a digest we did not list...) is a
//! negotiation error, not something to accept quietly.
//!
//! `Reject`, `NotUnderstood` and `Irrelevant` answers leave the RFC default
//! in force, unless that default is not a possible outcome of our offer
//! (e.g. we force `ImmediateData=No` and the target rejects the key): then
//! the login fails, since we cannot honour what the operator asked for.

use std::collections::HashSet;
use std::fmt;

use thiserror::Error;

/// Smallest and largest data segment / burst lengths (RFC 7143 §13).
pub const MIN_SEGMENT_LEN: u32 = 512;
/// Largest data segment / burst length: 2^24 - 1.
pub const MAX_SEGMENT_LEN: u32 = 0x00ff_ffff;

/// Data segment length allowed before MaxRecvDataSegmentLength is known:
/// the default, which also bounds every login PDU.
pub const DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH: u32 = 8192;

/// A parameter negotiation failure.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum NegotiationError {
    /// The target answered with a value we did not offer or could not have
    /// produced from our offer.
    #[error("target answered {key}={value}, which is outside what we offered ({offered})")]
    OutsideOffer {
        /// The key.
        key: String,
        /// The target's value.
        value: String,
        /// What we offered.
        offered: String,
    },
    /// A value that does not parse or is out of the key's range.
    #[error("target sent an invalid value for {key}: {value:?}")]
    InvalidValue {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// A key that was already negotiated appeared again.
    #[error("target negotiated {0} twice")]
    Duplicate(String),
    /// The target refused a key whose default we cannot accept.
    #[error("target answered {key}={answer}, but we require {required}")]
    Required {
        /// The key.
        key: String,
        /// The target's answer (Reject, NotUnderstood, Irrelevant or a value).
        answer: String,
        /// What we needed.
        required: String,
    },
    /// A key only the initiator may send.
    #[error("target sent {0}, a key only the initiator may send")]
    InitiatorOnlyKey(String),
    /// Negotiated values that contradict each other.
    #[error("negotiated parameters are inconsistent: {0}")]
    Inconsistent(String),
    /// Our own offer is invalid (configuration error).
    #[error("invalid iSCSI parameter proposal: {0}")]
    BadOffer(String),
}

/// A header or data digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DigestKind {
    /// No digest.
    #[default]
    None,
    /// CRC32C.
    Crc32c,
}

impl DigestKind {
    fn as_str(self) -> &'static str {
        match self {
            DigestKind::None => "None",
            DigestKind::Crc32c => "CRC32C",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "None" => Some(DigestKind::None),
            "CRC32C" => Some(DigestKind::Crc32c),
            _ => None,
        }
    }
}

impl fmt::Display for DigestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The parameters in force for a session (and its one connection). Defaults
/// are the RFC's, which apply to any key not negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    /// HeaderDigest.
    pub header_digest: DigestKind,
    /// DataDigest.
    pub data_digest: DigestKind,
    /// The MaxRecvDataSegmentLength we declared: the largest data segment
    /// the target may send us.
    pub initiator_max_recv_data_segment_length: u32,
    /// The MaxRecvDataSegmentLength the target declared: the largest data
    /// segment we may send.
    pub target_max_recv_data_segment_length: u32,
    /// MaxBurstLength.
    pub max_burst_length: u32,
    /// FirstBurstLength.
    pub first_burst_length: u32,
    /// InitialR2T.
    pub initial_r2t: bool,
    /// ImmediateData.
    pub immediate_data: bool,
    /// MaxOutstandingR2T.
    pub max_outstanding_r2t: u16,
    /// MaxConnections.
    pub max_connections: u16,
    /// DefaultTime2Wait (seconds).
    pub default_time2wait: u16,
    /// DefaultTime2Retain (seconds).
    pub default_time2retain: u16,
    /// ErrorRecoveryLevel.
    pub error_recovery_level: u8,
    /// DataPDUInOrder.
    pub data_pdu_in_order: bool,
    /// DataSequenceInOrder.
    pub data_sequence_in_order: bool,
    /// RDMAExtensions (iSER).
    pub rdma_extensions: bool,
    /// InitiatorRecvDataSegmentLength (iSER): largest control-type PDU data
    /// segment the target may send us.
    pub initiator_recv_data_segment_length: u32,
    /// TargetRecvDataSegmentLength (iSER): largest control-type PDU data
    /// segment we may send.
    pub target_recv_data_segment_length: u32,
    /// MaxOutstandingUnexpectedPDUs (iSER, RFC 5046; removed in RFC 7145),
    /// when the target declared it.
    pub max_outstanding_unexpected_pdus: Option<u32>,
    /// TargetPortalGroupTag the target declared.
    pub target_portal_group_tag: Option<u16>,
    /// TargetAlias the target declared.
    pub target_alias: Option<String>,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            header_digest: DigestKind::None,
            data_digest: DigestKind::None,
            initiator_max_recv_data_segment_length: DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
            target_max_recv_data_segment_length: DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            max_connections: 1,
            default_time2wait: 2,
            default_time2retain: 20,
            error_recovery_level: 0,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            rdma_extensions: false,
            initiator_recv_data_segment_length: DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
            target_recv_data_segment_length: DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
            max_outstanding_unexpected_pdus: None,
            target_portal_group_tag: None,
            target_alias: None,
        }
    }
}

/// iSER-specific proposals (RFC 7145 §6.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IserOffer {
    /// InitiatorRecvDataSegmentLength we declare.
    pub initiator_recv_data_segment_length: u32,
    /// TargetRecvDataSegmentLength we propose (some targets expect it).
    pub target_recv_data_segment_length: Option<u32>,
}

impl Default for IserOffer {
    fn default() -> Self {
        IserOffer {
            initiator_recv_data_segment_length: 262_144,
            target_recv_data_segment_length: Some(262_144),
        }
    }
}

/// What we propose in the operational stage. Each value is an offer: the
/// RFC's result functions decide the outcome, so offering `ImmediateData=No`
/// forces No, `InitialR2T=Yes` forces Yes, a digest list of only `CRC32C`
/// forces digests, and burst lengths are upper bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamOffer {
    /// HeaderDigest choices, most preferred first.
    pub header_digest: Vec<DigestKind>,
    /// DataDigest choices, most preferred first.
    pub data_digest: Vec<DigestKind>,
    /// MaxRecvDataSegmentLength we declare.
    pub max_recv_data_segment_length: u32,
    /// MaxBurstLength (upper bound).
    pub max_burst_length: u32,
    /// FirstBurstLength (upper bound, at most `max_burst_length`).
    pub first_burst_length: u32,
    /// InitialR2T.
    pub initial_r2t: bool,
    /// ImmediateData.
    pub immediate_data: bool,
    /// MaxOutstandingR2T (upper bound).
    pub max_outstanding_r2t: u16,
    /// DefaultTime2Wait (lower bound).
    pub default_time2wait: u16,
    /// DefaultTime2Retain (upper bound).
    pub default_time2retain: u16,
    /// DataPDUInOrder.
    pub data_pdu_in_order: bool,
    /// DataSequenceInOrder.
    pub data_sequence_in_order: bool,
    /// iSER keys; `Some` offers RDMAExtensions=Yes and requires it.
    pub iser: Option<IserOffer>,
}

impl Default for ParamOffer {
    fn default() -> Self {
        ParamOffer {
            header_digest: vec![DigestKind::None],
            data_digest: vec![DigestKind::None],
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1_048_576,
            first_burst_length: 262_144,
            initial_r2t: false,
            immediate_data: true,
            max_outstanding_r2t: 1,
            default_time2wait: 2,
            default_time2retain: 0,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            iser: None,
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

fn digest_list(l: &[DigestKind]) -> String {
    l.iter().map(|d| d.as_str()).collect::<Vec<_>>().join(",")
}

impl ParamOffer {
    /// Check the offer against the RFC ranges (a configuration error).
    pub fn validate(&self) -> Result<(), NegotiationError> {
        let bad = |s: String| Err(NegotiationError::BadOffer(s));
        if self.header_digest.is_empty() || self.data_digest.is_empty() {
            return bad("digest lists must not be empty".into());
        }
        for (name, v) in [
            (
                "MaxRecvDataSegmentLength",
                self.max_recv_data_segment_length,
            ),
            ("MaxBurstLength", self.max_burst_length),
            ("FirstBurstLength", self.first_burst_length),
        ] {
            if !(MIN_SEGMENT_LEN..=MAX_SEGMENT_LEN).contains(&v) {
                return bad(format!("{name}={v} is outside 512..16777215"));
            }
        }
        if self.first_burst_length > self.max_burst_length {
            return bad("FirstBurstLength exceeds MaxBurstLength".into());
        }
        if self.max_outstanding_r2t == 0 {
            return bad("MaxOutstandingR2T must be at least 1".into());
        }
        if self.default_time2wait > 3600 || self.default_time2retain > 3600 {
            return bad("DefaultTime2Wait/Retain must be at most 3600".into());
        }
        if let Some(i) = &self.iser {
            for v in [
                Some(i.initiator_recv_data_segment_length),
                i.target_recv_data_segment_length,
            ]
            .into_iter()
            .flatten()
            {
                if !(MIN_SEGMENT_LEN..=MAX_SEGMENT_LEN).contains(&v) {
                    return bad(format!(
                        "iSER data segment length {v} is outside 512..16777215"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Session type (SessionType key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    /// A normal session to one target.
    Normal,
    /// A discovery session (SendTargets only).
    Discovery,
}

/// Negotiated-key result functions (RFC 7143 §6.2.2 and §13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// Numerical minimum within a range.
    Min(u32, u32),
    /// Numerical maximum within a range.
    Max(u32, u32),
    /// Boolean AND.
    And,
    /// Boolean OR.
    Or,
    /// List selection.
    List,
}

fn rule_of(key: &str) -> Option<Rule> {
    Some(match key {
        "HeaderDigest" | "DataDigest" => Rule::List,
        "MaxBurstLength" | "FirstBurstLength" => Rule::Min(MIN_SEGMENT_LEN, MAX_SEGMENT_LEN),
        "MaxOutstandingR2T" | "MaxConnections" => Rule::Min(1, 65535),
        "DefaultTime2Retain" => Rule::Min(0, 3600),
        "DefaultTime2Wait" => Rule::Max(0, 3600),
        "ErrorRecoveryLevel" => Rule::Min(0, 2),
        "ImmediateData" | "RDMAExtensions" | "IFMarker" | "OFMarker" => Rule::And,
        "InitialR2T" | "DataPDUInOrder" | "DataSequenceInOrder" => Rule::Or,
        _ => return None,
    })
}

const ANSWER_WORDS: [&str; 3] = ["Reject", "NotUnderstood", "Irrelevant"];

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

/// Parse a numerical value: decimal, or hex with 0x (RFC 7143 §6.1).
pub fn parse_number(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.is_empty() || h.len() > 16 {
            return None;
        }
        u64::from_str_radix(h, 16).ok()
    } else {
        if v.is_empty() || v.len() > 20 || !v.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        v.parse().ok()
    }
}

/// The operational-stage negotiation of one login.
#[derive(Debug, Clone)]
pub struct Negotiation {
    offer: ParamOffer,
    session_type: SessionType,
    /// Our offers still awaiting an answer: key → offered value.
    offered: Vec<(String, String)>,
    /// Keys settled (answered, declared, or answered by us).
    settled: HashSet<String>,
    /// Our answers to target offers, to send in the next PDU.
    replies: Vec<(String, String)>,
    /// Keys whose value came from the RFC default, not from the target.
    fallback_keys: HashSet<String>,
    result: SessionParams,
}

impl Negotiation {
    /// Start a negotiation with our offer.
    pub fn new(offer: ParamOffer, session_type: SessionType) -> Result<Self, NegotiationError> {
        offer.validate()?;
        let mut offered: Vec<(String, String)> = vec![
            ("HeaderDigest".into(), digest_list(&offer.header_digest)),
            ("DataDigest".into(), digest_list(&offer.data_digest)),
        ];
        if session_type == SessionType::Normal {
            offered.extend([
                ("InitialR2T".into(), yes_no(offer.initial_r2t).into()),
                ("ImmediateData".into(), yes_no(offer.immediate_data).into()),
                ("MaxBurstLength".into(), offer.max_burst_length.to_string()),
                (
                    "FirstBurstLength".into(),
                    offer.first_burst_length.to_string(),
                ),
                (
                    "MaxOutstandingR2T".into(),
                    offer.max_outstanding_r2t.to_string(),
                ),
                ("MaxConnections".into(), "1".into()),
                (
                    "DefaultTime2Wait".into(),
                    offer.default_time2wait.to_string(),
                ),
                (
                    "DefaultTime2Retain".into(),
                    offer.default_time2retain.to_string(),
                ),
                ("ErrorRecoveryLevel".into(), "0".into()),
                (
                    "DataPDUInOrder".into(),
                    yes_no(offer.data_pdu_in_order).into(),
                ),
                (
                    "DataSequenceInOrder".into(),
                    yes_no(offer.data_sequence_in_order).into(),
                ),
            ]);
            if offer.iser.is_some() {
                offered.push(("RDMAExtensions".into(), "Yes".into()));
            }
        }
        let result = SessionParams {
            initiator_max_recv_data_segment_length: offer.max_recv_data_segment_length,
            initiator_recv_data_segment_length: offer
                .iser
                .as_ref()
                .map_or(DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH, |i| {
                    i.initiator_recv_data_segment_length
                }),
            ..SessionParams::default()
        };
        Ok(Negotiation {
            offer,
            session_type,
            offered,
            settled: HashSet::new(),
            replies: Vec::new(),
            fallback_keys: HashSet::new(),
            result,
        })
    }

    /// The pairs to send in our first operational-stage PDU: the negotiated
    /// offers followed by our declarations.
    pub fn initial_pairs(&self) -> Vec<(String, String)> {
        let mut pairs = self.offered.clone();
        pairs.push((
            "MaxRecvDataSegmentLength".into(),
            self.offer.max_recv_data_segment_length.to_string(),
        ));
        if let (SessionType::Normal, Some(i)) = (self.session_type, &self.offer.iser) {
            pairs.push((
                "InitiatorRecvDataSegmentLength".into(),
                i.initiator_recv_data_segment_length.to_string(),
            ));
            if let Some(t) = i.target_recv_data_segment_length {
                pairs.push(("TargetRecvDataSegmentLength".into(), t.to_string()));
            }
        }
        pairs
    }

    /// Our answers to keys the target offered, to send in the next request.
    pub fn take_replies(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.replies)
    }

    /// True while some of our offers have no answer yet.
    pub fn awaiting_answers(&self) -> bool {
        !self.offered.is_empty()
    }

    fn invalid(key: &str, value: &str) -> NegotiationError {
        NegotiationError::InvalidValue {
            key: key.to_string(),
            value: value.chars().take(64).collect(),
        }
    }

    fn number_in(key: &str, value: &str, lo: u32, hi: u32) -> Result<u32, NegotiationError> {
        match parse_number(value) {
            Some(n) if n >= u64::from(lo) && n <= u64::from(hi) => Ok(n as u32),
            _ => Err(Self::invalid(key, value)),
        }
    }

    /// Process one key the target sent (answer, offer or declaration).
    pub fn handle(&mut self, key: &str, value: &str) -> Result<(), NegotiationError> {
        if !self.settled.insert(key.to_string()) {
            return Err(NegotiationError::Duplicate(key.to_string()));
        }
        if let Some(pos) = self.offered.iter().position(|(k, _)| k == key) {
            let (_, ours) = self.offered.remove(pos);
            return self.apply_answer(key, &ours, value);
        }
        self.declaration_or_offer(key, value)
    }

    fn apply_answer(&mut self, key: &str, ours: &str, value: &str) -> Result<(), NegotiationError> {
        let outside = || NegotiationError::OutsideOffer {
            key: key.to_string(),
            value: value.chars().take(64).collect(),
            offered: ours.to_string(),
        };
        if ANSWER_WORDS.contains(&value) {
            return self.fall_back(key, ours, value);
        }
        match rule_of(key) {
            Some(Rule::List) => {
                let d = DigestKind::parse(value).ok_or_else(|| Self::invalid(key, value))?;
                if !ours.split(',').any(|o| o == value) {
                    return Err(outside());
                }
                self.set_digest(key, d);
            }
            Some(Rule::Min(lo, hi)) => {
                let n = Self::number_in(key, value, lo, hi)?;
                let o = parse_number(ours).unwrap_or(0);
                if u64::from(n) > o {
                    return Err(outside());
                }
                self.set_number(key, n);
            }
            Some(Rule::Max(lo, hi)) => {
                let n = Self::number_in(key, value, lo, hi)?;
                let o = parse_number(ours).unwrap_or(u64::MAX);
                if u64::from(n) < o {
                    return Err(outside());
                }
                self.set_number(key, n);
            }
            Some(Rule::And) => {
                let b = parse_bool(value).ok_or_else(|| Self::invalid(key, value))?;
                if b && ours == "No" {
                    return Err(outside());
                }
                self.set_bool(key, b);
            }
            Some(Rule::Or) => {
                let b = parse_bool(value).ok_or_else(|| Self::invalid(key, value))?;
                if !b && ours == "Yes" {
                    return Err(outside());
                }
                self.set_bool(key, b);
            }
            None => return Err(outside()),
        }
        Ok(())
    }

    /// After Reject/NotUnderstood/Irrelevant, or no answer at all, the RFC
    /// default is the target's side: combine it with our offer by the key's
    /// result function (so `ImmediateData=No` stays No, a burst length never
    /// exceeds our offer). Fails only where no acceptable outcome exists:
    /// digests we require and RDMAExtensions for iSER.
    fn fall_back(&mut self, key: &str, ours: &str, answer: &str) -> Result<(), NegotiationError> {
        self.fallback_keys.insert(key.to_string());
        let d = SessionParams::default();
        let required = || NegotiationError::Required {
            key: key.to_string(),
            answer: answer.to_string(),
            required: ours.to_string(),
        };
        match (key, rule_of(key)) {
            ("RDMAExtensions", _) => return Err(required()),
            ("HeaderDigest" | "DataDigest", _) => {
                if !ours.split(',').any(|o| o == "None") {
                    return Err(required());
                }
                self.set_digest(key, DigestKind::None);
            }
            (_, Some(Rule::Min(..))) => {
                let default = u64::from(self.default_number(key, &d));
                let n = parse_number(ours).map_or(default, |o| o.min(default));
                self.set_number(key, n as u32);
            }
            (_, Some(Rule::Max(..))) => {
                let default = u64::from(self.default_number(key, &d));
                let n = parse_number(ours).map_or(default, |o| o.max(default));
                self.set_number(key, n as u32);
            }
            (_, Some(Rule::And)) => {
                let b = ours == "Yes" && self.default_bool(key, &d);
                self.set_bool(key, b);
            }
            (_, Some(Rule::Or)) => {
                let b = ours == "Yes" || self.default_bool(key, &d);
                self.set_bool(key, b);
            }
            _ => {}
        }
        Ok(())
    }

    fn default_number(&self, key: &str, d: &SessionParams) -> u32 {
        match key {
            "MaxBurstLength" => d.max_burst_length,
            "FirstBurstLength" => d.first_burst_length,
            "MaxOutstandingR2T" => d.max_outstanding_r2t.into(),
            "MaxConnections" => d.max_connections.into(),
            "DefaultTime2Wait" => d.default_time2wait.into(),
            "DefaultTime2Retain" => d.default_time2retain.into(),
            _ => 0,
        }
    }

    fn default_bool(&self, key: &str, d: &SessionParams) -> bool {
        match key {
            "ImmediateData" => d.immediate_data,
            "InitialR2T" => d.initial_r2t,
            "DataPDUInOrder" => d.data_pdu_in_order,
            "DataSequenceInOrder" => d.data_sequence_in_order,
            _ => false,
        }
    }

    fn set_digest(&mut self, key: &str, d: DigestKind) {
        if key == "HeaderDigest" {
            self.result.header_digest = d;
        } else {
            self.result.data_digest = d;
        }
    }

    fn set_number(&mut self, key: &str, n: u32) {
        let r = &mut self.result;
        // Ranges were checked by the caller, so the narrowing casts are exact.
        match key {
            "MaxBurstLength" => r.max_burst_length = n,
            "FirstBurstLength" => r.first_burst_length = n,
            "MaxOutstandingR2T" => r.max_outstanding_r2t = n as u16,
            "MaxConnections" => r.max_connections = n as u16,
            "DefaultTime2Wait" => r.default_time2wait = n as u16,
            "DefaultTime2Retain" => r.default_time2retain = n as u16,
            "ErrorRecoveryLevel" => r.error_recovery_level = n as u8,
            _ => {}
        }
    }

    fn set_bool(&mut self, key: &str, b: bool) {
        let r = &mut self.result;
        match key {
            "ImmediateData" => r.immediate_data = b,
            "InitialR2T" => r.initial_r2t = b,
            "DataPDUInOrder" => r.data_pdu_in_order = b,
            "DataSequenceInOrder" => r.data_sequence_in_order = b,
            "RDMAExtensions" => r.rdma_extensions = b,
            _ => {}
        }
    }

    fn declaration_or_offer(&mut self, key: &str, value: &str) -> Result<(), NegotiationError> {
        match key {
            "MaxRecvDataSegmentLength" => {
                self.result.target_max_recv_data_segment_length =
                    Self::number_in(key, value, MIN_SEGMENT_LEN, MAX_SEGMENT_LEN)?;
            }
            "TargetRecvDataSegmentLength" => {
                self.result.target_recv_data_segment_length =
                    Self::number_in(key, value, MIN_SEGMENT_LEN, MAX_SEGMENT_LEN)?;
            }
            "InitiatorRecvDataSegmentLength" => {
                // Some targets answer our declaration with their own limit;
                // keep the smaller (as libiscsi does).
                let n = Self::number_in(key, value, MIN_SEGMENT_LEN, MAX_SEGMENT_LEN)?;
                let r = &mut self.result;
                r.initiator_recv_data_segment_length = r.initiator_recv_data_segment_length.min(n);
            }
            "MaxOutstandingUnexpectedPDUs" => {
                let n = parse_number(value)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| Self::invalid(key, value))?;
                self.result.max_outstanding_unexpected_pdus = Some(n);
            }
            "TargetAlias" => {
                self.result.target_alias = Some(value.to_string());
            }
            "TargetPortalGroupTag" => {
                self.result.target_portal_group_tag =
                    Some(Self::number_in(key, value, 0, 65535)? as u16);
            }
            "InitiatorName" | "InitiatorAlias" | "SessionType" | "TargetName" | "SendTargets" => {
                return Err(NegotiationError::InitiatorOnlyKey(key.to_string()));
            }
            _ => return self.answer_target_offer(key, value),
        }
        Ok(())
    }

    /// The target offers a key we did not: answer it.
    fn answer_target_offer(&mut self, key: &str, value: &str) -> Result<(), NegotiationError> {
        if ANSWER_WORDS.contains(&value) {
            // An answer to something we never offered.
            return Err(NegotiationError::OutsideOffer {
                key: key.to_string(),
                value: value.to_string(),
                offered: "nothing".into(),
            });
        }
        let reply: String = match (key, rule_of(key)) {
            ("IFMarker" | "OFMarker", _) => "No".into(),
            (_, Some(_)) if self.session_type == SessionType::Discovery => "Irrelevant".into(),
            // Every other negotiable key is in our first PDU of a normal
            // session, so a target offer of one is a collision: answer with
            // the value we want, by the same rules.
            ("HeaderDigest" | "DataDigest", _) => {
                let ours = if key == "HeaderDigest" {
                    &self.offer.header_digest
                } else {
                    &self.offer.data_digest
                };
                let pick = ours
                    .iter()
                    .find(|d| value.split(',').any(|v| v == d.as_str()))
                    .copied();
                match pick {
                    Some(d) => {
                        self.set_digest(key, d);
                        d.as_str().into()
                    }
                    None => "Reject".into(),
                }
            }
            (_, Some(Rule::And)) => {
                let theirs = parse_bool(value).ok_or_else(|| Self::invalid(key, value))?;
                let b = theirs && key == "RDMAExtensions" && self.offer.iser.is_some();
                self.set_bool(key, b);
                yes_no(b).into()
            }
            (_, Some(Rule::Or)) => {
                let theirs = parse_bool(value).ok_or_else(|| Self::invalid(key, value))?;
                self.set_bool(key, theirs);
                yes_no(theirs).into()
            }
            (_, Some(Rule::Min(lo, hi))) => {
                let n = Self::number_in(key, value, lo, hi)?;
                let n = if key == "ErrorRecoveryLevel" { 0 } else { n };
                self.set_number(key, n);
                n.to_string()
            }
            (_, Some(Rule::Max(lo, hi))) => {
                let n = Self::number_in(key, value, lo, hi)?;
                self.set_number(key, n);
                n.to_string()
            }
            ("TaskReporting", None) => "RFC3720".into(),
            ("IFMarkInt" | "OFMarkInt", None) => "Irrelevant".into(),
            (_, _) => "NotUnderstood".into(),
        };
        self.replies.push((key.to_string(), reply));
        Ok(())
    }

    /// Finish: check consistency and return the parameters in force. Offers
    /// left unanswered keep the RFC default (checked like a Reject).
    pub fn finish(mut self) -> Result<SessionParams, NegotiationError> {
        for (k, ours) in std::mem::take(&mut self.offered) {
            self.fall_back(&k, &ours, "no answer")?;
        }
        let r = &mut self.result;
        if self.session_type == SessionType::Normal {
            if r.first_burst_length > r.max_burst_length
                && self.fallback_keys.contains("FirstBurstLength")
            {
                // Our fallback, not the target's word: clamp (RFC 7143 §13.14).
                r.first_burst_length = r.max_burst_length;
            }
            if r.first_burst_length > r.max_burst_length {
                return Err(NegotiationError::Inconsistent(format!(
                    "FirstBurstLength {} exceeds MaxBurstLength {}",
                    r.first_burst_length, r.max_burst_length
                )));
            }
            if self.offer.iser.is_some() && !r.rdma_extensions {
                return Err(NegotiationError::Required {
                    key: "RDMAExtensions".into(),
                    answer: "No".into(),
                    required: "Yes (iSER transport)".into(),
                });
            }
        }
        Ok(self.result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal() -> Negotiation {
        Negotiation::new(ParamOffer::default(), SessionType::Normal).unwrap()
    }

    #[test]
    fn defaults_are_rfc() {
        let d = SessionParams::default();
        assert_eq!(d.max_burst_length, 262_144);
        assert_eq!(d.first_burst_length, 65_536);
        assert!(d.initial_r2t && d.immediate_data);
        assert_eq!(d.default_time2wait, 2);
        assert_eq!(d.default_time2retain, 20);
        assert_eq!(d.target_max_recv_data_segment_length, 8192);
    }

    #[test]
    fn initial_pairs_cover_offer() {
        let n = normal();
        let pairs = n.initial_pairs();
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("ImmediateData").as_deref(), Some("Yes"));
        assert_eq!(get("InitialR2T").as_deref(), Some("No"));
        assert_eq!(get("MaxBurstLength").as_deref(), Some("1048576"));
        assert_eq!(get("MaxRecvDataSegmentLength").as_deref(), Some("262144"));
        assert_eq!(get("ErrorRecoveryLevel").as_deref(), Some("0"));
        assert!(get("RDMAExtensions").is_none());
        let d = Negotiation::new(ParamOffer::default(), SessionType::Discovery).unwrap();
        assert_eq!(d.initial_pairs().len(), 3);
    }

    #[test]
    fn typical_tgtd_answers() {
        let mut n = normal();
        for (k, v) in [
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", "8192"),
            ("InitialR2T", "Yes"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "65536"),
            ("MaxOutstandingR2T", "1"),
            ("MaxConnections", "1"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("ErrorRecoveryLevel", "0"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
        ] {
            n.handle(k, v).unwrap();
        }
        assert!(!n.awaiting_answers());
        let p = n.finish().unwrap();
        assert!(p.initial_r2t, "OR of our No and target's Yes");
        assert_eq!(p.max_burst_length, 262_144);
        assert_eq!(p.target_max_recv_data_segment_length, 8192);
        assert_eq!(p.initiator_max_recv_data_segment_length, 262_144);
        assert_eq!(p.default_time2retain, 0);
    }

    #[test]
    fn answers_outside_offer_are_errors() {
        let cases = [
            ("MaxBurstLength", "2097152"),
            ("DefaultTime2Wait", "1"),
            ("HeaderDigest", "CRC32C"),
            ("ErrorRecoveryLevel", "1"),
            ("MaxConnections", "2"),
            ("DataPDUInOrder", "No"),
        ];
        for (k, v) in cases {
            let mut n = normal();
            assert!(
                matches!(n.handle(k, v), Err(NegotiationError::OutsideOffer { .. })),
                "{k}={v}"
            );
        }
        let offer = ParamOffer {
            immediate_data: false,
            ..ParamOffer::default()
        };
        let mut n = Negotiation::new(offer, SessionType::Normal).unwrap();
        assert!(n.handle("ImmediateData", "Yes").is_err());
    }

    #[test]
    fn invalid_values_and_duplicates() {
        let mut n = normal();
        assert!(matches!(
            n.handle("MaxBurstLength", "12x"),
            Err(NegotiationError::InvalidValue { .. })
        ));
        let mut n = normal();
        assert!(n.handle("MaxBurstLength", "100").is_err(), "below 512");
        let mut n = normal();
        assert!(n.handle("MaxRecvDataSegmentLength", "16777216").is_err());
        let mut n = normal();
        n.handle("MaxBurstLength", "0x10000").unwrap();
        assert!(matches!(
            n.handle("MaxBurstLength", "65536"),
            Err(NegotiationError::Duplicate(_))
        ));
        let mut n = normal();
        assert!(matches!(
            n.handle("InitiatorName", "iqn.x"),
            Err(NegotiationError::InitiatorOnlyKey(_))
        ));
    }

    #[test]
    fn forced_values_and_reject_answers() {
        let offer = ParamOffer {
            header_digest: vec![DigestKind::Crc32c],
            immediate_data: false,
            ..ParamOffer::default()
        };
        let mut n = Negotiation::new(offer.clone(), SessionType::Normal).unwrap();
        assert!(matches!(
            n.handle("HeaderDigest", "Reject"),
            Err(NegotiationError::Required { .. })
        ));
        let mut n = Negotiation::new(offer, SessionType::Normal).unwrap();
        n.handle("ImmediateData", "NotUnderstood").unwrap();
        n.handle("HeaderDigest", "CRC32C").unwrap();
        n.handle("DataPDUInOrder", "Irrelevant").unwrap();
        n.handle("MaxBurstLength", "Reject").unwrap();
        let p = n.finish().unwrap();
        assert_eq!(p.header_digest, DigestKind::Crc32c);
        assert!(!p.immediate_data, "AND of our No with the default");
        assert_eq!(p.max_burst_length, 262_144, "min of our offer and default");
        assert_eq!(p.default_time2retain, 0, "unanswered: min(0, 20)");
        assert!(p.initial_r2t, "unanswered: OR(No, default Yes)");
    }

    #[test]
    fn target_offers_are_answered() {
        let mut n = Negotiation::new(ParamOffer::default(), SessionType::Discovery).unwrap();
        n.handle("MaxBurstLength", "262144").unwrap();
        n.handle("IFMarker", "Yes").unwrap();
        n.handle("X-com.example.Foo", "bar").unwrap();
        n.handle("TaskReporting", "ResponseFence,RFC3720").unwrap();
        let r = n.take_replies();
        assert_eq!(
            r,
            vec![
                ("MaxBurstLength".to_string(), "Irrelevant".to_string()),
                ("IFMarker".into(), "No".into()),
                ("X-com.example.Foo".into(), "NotUnderstood".into()),
                ("TaskReporting".into(), "RFC3720".into()),
            ]
        );
        assert!(n.take_replies().is_empty());
        let mut n = normal();
        assert!(n.handle("Foo", "NotUnderstood").is_err());
    }

    #[test]
    fn first_burst_above_max_burst_is_inconsistent() {
        let mut n = normal();
        n.handle("MaxBurstLength", "4096").unwrap();
        n.handle("FirstBurstLength", "8192").unwrap();
        assert!(matches!(n.finish(), Err(NegotiationError::Inconsistent(_))));
    }

    #[test]
    fn iser_keys() {
        let offer = ParamOffer {
            iser: Some(IserOffer::default()),
            ..ParamOffer::default()
        };
        let n = Negotiation::new(offer.clone(), SessionType::Normal).unwrap();
        let pairs = n.initial_pairs();
        assert!(pairs.contains(&("RDMAExtensions".into(), "Yes".into())));
        assert!(pairs.contains(&("InitiatorRecvDataSegmentLength".into(), "262144".into())));
        let mut n = Negotiation::new(offer.clone(), SessionType::Normal).unwrap();
        n.handle("RDMAExtensions", "Yes").unwrap();
        n.handle("TargetRecvDataSegmentLength", "8192").unwrap();
        n.handle("InitiatorRecvDataSegmentLength", "65536").unwrap();
        n.handle("MaxOutstandingUnexpectedPDUs", "0").unwrap();
        let p = n.finish().unwrap();
        assert!(p.rdma_extensions);
        assert_eq!(p.target_recv_data_segment_length, 8192);
        assert_eq!(p.initiator_recv_data_segment_length, 65536);
        assert_eq!(p.max_outstanding_unexpected_pdus, Some(0));
        let mut n = Negotiation::new(offer.clone(), SessionType::Normal).unwrap();
        n.handle("RDMAExtensions", "No").unwrap();
        assert!(n.finish().is_err(), "iSER needs RDMAExtensions=Yes");
        let n = Negotiation::new(offer, SessionType::Normal).unwrap();
        assert!(n.finish().is_err(), "unanswered RDMAExtensions");
    }

    #[test]
    fn bad_offers_rejected() {
        let o = ParamOffer {
            first_burst_length: 2_000_000,
            ..ParamOffer::default()
        };
        assert!(Negotiation::new(o, SessionType::Normal).is_err());
        let o = ParamOffer {
            max_recv_data_segment_length: 100,
            ..ParamOffer::default()
        };
        assert!(Negotiation::new(o, SessionType::Normal).is_err());
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number("0x10"), Some(16));
        assert_eq!(parse_number("42"), Some(42));
        assert_eq!(parse_number("-1"), None);
        assert_eq!(parse_number("0x"), None);
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_number("99999999999999999999999"), None);
    }
}
