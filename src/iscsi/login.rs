//! The login phase as a sans-I/O state machine (RFC 7143 §6.3, §11.12–13).
//!
//! [`LoginNegotiator::start`] gives the first Login Request; each Login
//! Response goes to [`LoginNegotiator::on_response`], which answers with the
//! next request to send, the finished login ([`LoginOutcome`]: negotiated
//! parameters, TSIH, sequence numbers), or a redirect to another portal.
//!
//! Stages: SecurityNegotiation (AuthMethod, then CHAP with optional mutual
//! authentication) → LoginOperationalNegotiation (see [`super::params`]) →
//! FullFeaturePhase. Long texts go out in several PDUs with the C bit, and
//! the target's continued texts are joined before they are read.
//!
//! Every response is checked: ITT and ISID echo ours, the stage never goes
//! backwards, the target never moves on (T bit) unless we asked to, the
//! version is 0, texts are well formed with each key once, and a target
//! that skips mutual CHAP is refused.

use std::collections::HashSet;

use thiserror::Error;

use super::chap::{self, ChapAlgorithm, ChapCredentials, ChapError, ChapSecret};
use super::discovery::{parse_target_address, Portal};
use super::params::{
    Negotiation, NegotiationError, ParamOffer, SessionParams, SessionType,
    DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
};
use super::pdu::{
    serial_lt, LoginRequest, LoginResponse, RejectReason, Stage, TargetPdu, ISCSI_VERSION, U24,
};
use super::text::{self, TextAssembler, TextBuilder, TextError};

/// Most login round trips before we give up on a target that never ends.
pub const MAX_LOGIN_ROUND_TRIPS: u32 = 64;

/// Most login text (over continued PDUs) we accept in one response.
pub const MAX_LOGIN_TEXT: usize = 64 * 1024;

/// Largest data segment of a login PDU (the default MaxRecvDataSegmentLength
/// bounds both directions until login completes; iSER login buffers too).
pub const LOGIN_PDU_DATA_MAX: usize = DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH as usize;

/// Which session to log in to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginTarget {
    /// A normal session to this target name.
    Normal {
        /// The target's iSCSI name.
        target_name: String,
    },
    /// A discovery session.
    Discovery,
}

/// Mutual CHAP: the target must prove it knows this secret.
#[derive(Debug, Clone)]
pub struct MutualChap {
    /// The CHAP_N the target must present, if checked.
    pub target_username: Option<String>,
    /// The target's secret (must differ from the initiator's).
    pub secret: ChapSecret,
}

/// Everything a login needs.
#[derive(Debug, Clone)]
pub struct LoginConfig {
    /// The portal, as shown in error messages (e.g. "127.0.0.1:3260").
    pub portal: String,
    /// Our iSCSI name.
    pub initiator_name: String,
    /// Our alias, if any.
    pub initiator_alias: Option<String>,
    /// Target or discovery.
    pub target: LoginTarget,
    /// Initiator Session ID.
    pub isid: [u8; 6],
    /// TSIH: 0 for a leading login (a new session).
    pub tsih: u16,
    /// Connection ID.
    pub cid: u16,
    /// ITT used by all PDUs of this login.
    pub itt: u32,
    /// CmdSN of the login (the session's first CmdSN for a leading login).
    pub cmd_sn: u32,
    /// ExpStatSN for the first request (anything on a new connection).
    pub exp_stat_sn: u32,
    /// CHAP credentials; `None` offers AuthMethod=None only.
    pub chap: Option<ChapCredentials>,
    /// Mutual CHAP; requires `chap`, and then AuthMethod=None is not offered.
    pub mutual_chap: Option<MutualChap>,
    /// CHAP algorithms offered, preferred first.
    pub chap_algorithms: Vec<ChapAlgorithm>,
    /// Operational parameter proposals.
    pub params: ParamOffer,
    /// iSER: offer RDMAExtensions=Yes and the iSER keys (uses
    /// `params.iser`, or its defaults when that is `None`).
    pub iser: bool,
}

impl LoginConfig {
    /// A configuration with our defaults for the given names.
    pub fn new(portal: &str, initiator_name: &str, target: LoginTarget, isid: [u8; 6]) -> Self {
        LoginConfig {
            portal: portal.to_string(),
            initiator_name: initiator_name.to_string(),
            initiator_alias: None,
            target,
            isid,
            tsih: 0,
            cid: 0,
            itt: 0,
            cmd_sn: 0,
            exp_stat_sn: 0,
            chap: None,
            mutual_chap: None,
            chap_algorithms: vec![ChapAlgorithm::Sha256, ChapAlgorithm::Md5],
            params: ParamOffer::default(),
            iser: false,
        }
    }
}

/// A random ISID of the "random" format (RFC 7143 §11.12.5: type 0x80,
/// 24 random bits, 16-bit qualifier).
pub fn random_isid(qualifier: u16) -> Result<[u8; 6], ChapError> {
    let mut r = [0u8; 3];
    getrandom::fill(&mut r).map_err(|e| ChapError::Random(e.to_string()))?;
    let q = qualifier.to_be_bytes();
    Ok([0x80, r[0], r[1], r[2], q[0], q[1]])
}

/// A failed login.
#[derive(Debug, Error)]
pub enum LoginError {
    /// The target refused the login (status class 2 or 3).
    #[error("login to {portal} rejected: {what}")]
    Rejected {
        /// The portal.
        portal: String,
        /// Status-Class.
        class: u8,
        /// Status-Detail.
        detail: u8,
        /// The status in words.
        what: &'static str,
    },
    /// The target broke the protocol.
    #[error("login to {portal} failed: invalid response from target: {what}")]
    Protocol {
        /// The portal.
        portal: String,
        /// What was wrong.
        what: String,
    },
    /// Parameter negotiation failed.
    #[error("login to {portal} failed: parameter negotiation")]
    Negotiation {
        /// The portal.
        portal: String,
        /// Why.
        #[source]
        source: NegotiationError,
    },
    /// Malformed login text.
    #[error("login to {portal} failed: malformed text from target")]
    Text {
        /// The portal.
        portal: String,
        /// Why.
        #[source]
        source: TextError,
    },
    /// A CHAP value from the target could not be used.
    #[error("login to {portal} failed: CHAP")]
    Chap {
        /// The portal.
        portal: String,
        /// Why.
        #[source]
        source: ChapError,
    },
    /// The target did not prove it knows the mutual CHAP secret.
    #[error("login to {portal} failed: the target failed mutual CHAP authentication ({what})")]
    MutualAuthFailed {
        /// The portal.
        portal: String,
        /// What was wrong.
        what: &'static str,
    },
    /// The target wants an authentication we cannot do.
    #[error("login to {portal} failed: target requires AuthMethod {method}, {why}")]
    AuthUnavailable {
        /// The portal.
        portal: String,
        /// What the target chose.
        method: String,
        /// Why we cannot.
        why: &'static str,
    },
    /// Our own configuration is unusable.
    #[error("invalid login configuration: {0}")]
    Config(String),
    /// The login is over (finished or failed) and got more input.
    #[error("login to {0} already finished")]
    Finished(String),
}

/// Words for a Status-Class/Status-Detail pair (RFC 7143 §11.13.5).
pub fn status_words(class: u8, detail: u8) -> &'static str {
    match (class, detail) {
        (0, 0) => "success",
        (1, 1) => "target moved temporarily",
        (1, 2) => "target moved permanently",
        (2, 0) => "initiator error",
        (2, 1) => "authentication failure",
        (2, 2) => "authorization failure (initiator not allowed to access this target)",
        (2, 3) => "target not found",
        (2, 4) => "target removed",
        (2, 5) => "unsupported iSCSI version",
        (2, 6) => "too many connections",
        (2, 7) => "missing parameter",
        (2, 8) => "cannot include connection in session",
        (2, 9) => "session type not supported",
        (2, 10) => "session does not exist",
        (2, 11) => "invalid request during login",
        (3, 0) => "target error",
        (3, 1) => "service unavailable",
        (3, 2) => "out of resources",
        (1, _) => "unknown redirection status",
        (2, _) => "unknown initiator error status",
        (3, _) => "unknown target error status",
        _ => "unknown status",
    }
}

/// A Login Request to send: header and text data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginPdu {
    /// The header.
    pub header: LoginRequest,
    /// The data segment (unpadded).
    pub data: Vec<u8>,
}

impl LoginPdu {
    /// The 48 BHS bytes.
    pub fn bhs(&self) -> [u8; 48] {
        self.header.encode()
    }
}

/// The result of a successful login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginOutcome {
    /// Negotiated parameters.
    pub params: SessionParams,
    /// TSIH of the session.
    pub tsih: u16,
    /// The next CmdSN to use (the login's own; login PDUs are immediate).
    pub cmd_sn: u32,
    /// ExpStatSN to send next (last StatSN + 1).
    pub exp_stat_sn: u32,
    /// ExpCmdSN from the final response.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN from the final response.
    pub max_cmd_sn: u32,
    /// True when we authenticated with CHAP.
    pub chap_used: bool,
    /// True when the target proved the mutual CHAP secret.
    pub target_authenticated: bool,
}

/// What to do after a Login Response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginStep {
    /// Send this request and feed the response back.
    Send(LoginPdu),
    /// Login complete: full feature phase.
    Done(LoginOutcome),
    /// The target moved: reconnect to this portal and log in again.
    Redirect {
        /// Where to go.
        portal: Portal,
        /// True for "moved permanently".
        permanent: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Sec {
    /// First PDU sent: waiting for the AuthMethod answer.
    AwaitMethod,
    /// CHAP_A sent: waiting for CHAP_A/I/C.
    AwaitChallenge,
    /// CHAP_N/R (and our challenge) sent: waiting for the target's result.
    AwaitChapResult {
        alg: ChapAlgorithm,
        /// Our mutual challenge: id and bytes.
        mutual: Option<(u8, Vec<u8>)>,
    },
    /// Authentication done (or None): waiting for the move to the next stage.
    Done,
}

/// The login state machine.
#[derive(Debug)]
pub struct LoginNegotiator {
    cfg: LoginConfig,
    stage: Stage,
    sec: Sec,
    neg: Option<Negotiation>,
    /// The request we last sent (for T/NSG/CSG checks).
    last: Option<LoginRequest>,
    /// Text still to send after a C-bit PDU, with the T/NSG of its last PDU.
    pending_out: Option<(Vec<u8>, bool, Stage)>,
    asm: TextAssembler,
    exp_stat_sn: u32,
    got_first: bool,
    seen_sec_keys: HashSet<String>,
    chap_used: bool,
    target_authenticated: bool,
    round_trips: u32,
    finished: bool,
    /// Our mutual challenge, injectable for tests.
    forced_challenge: Option<(u8, Vec<u8>)>,
}

impl LoginNegotiator {
    /// Check the configuration and prepare a login.
    pub fn new(mut cfg: LoginConfig) -> Result<Self, LoginError> {
        if cfg.initiator_name.is_empty() {
            return Err(LoginError::Config("initiator name is empty".into()));
        }
        if let LoginTarget::Normal { target_name } = &cfg.target {
            if target_name.is_empty() {
                return Err(LoginError::Config("target name is empty".into()));
            }
        }
        if cfg.mutual_chap.is_some() && cfg.chap.is_none() {
            return Err(LoginError::Config(
                "mutual CHAP needs initiator CHAP credentials too".into(),
            ));
        }
        if let (Some(c), Some(m)) = (&cfg.chap, &cfg.mutual_chap) {
            if c.secret.ct_eq(&m.secret) {
                return Err(LoginError::Config(
                    "the mutual CHAP secret must differ from the initiator's (RFC 7143 §12.1.3)"
                        .into(),
                ));
            }
        }
        if cfg.chap.is_some() && cfg.chap_algorithms.is_empty() {
            return Err(LoginError::Config("no CHAP algorithm offered".into()));
        }
        if cfg.iser {
            cfg.params.iser.get_or_insert_with(Default::default);
        } else {
            cfg.params.iser = None;
        }
        let session_type = match cfg.target {
            LoginTarget::Normal { .. } => SessionType::Normal,
            LoginTarget::Discovery => SessionType::Discovery,
        };
        let neg = Negotiation::new(cfg.params.clone(), session_type)
            .map_err(|e| LoginError::Config(e.to_string()))?;
        Ok(LoginNegotiator {
            exp_stat_sn: cfg.exp_stat_sn,
            cfg,
            stage: Stage::Security,
            sec: Sec::AwaitMethod,
            neg: Some(neg),
            last: None,
            pending_out: None,
            asm: TextAssembler::new(MAX_LOGIN_TEXT),
            got_first: false,
            seen_sec_keys: HashSet::new(),
            chap_used: false,
            target_authenticated: false,
            round_trips: 0,
            finished: false,
            forced_challenge: None,
        })
    }

    /// Use this mutual CHAP identifier and challenge instead of random ones
    /// (tests and fuzzing: makes the exchange reproducible).
    pub fn with_mutual_challenge(mut self, id: u8, challenge: Vec<u8>) -> Self {
        self.forced_challenge = Some((id, challenge));
        self
    }

    fn protocol(&self, what: impl Into<String>) -> LoginError {
        LoginError::Protocol {
            portal: self.cfg.portal.clone(),
            what: what.into(),
        }
    }

    fn text_err(&self, source: TextError) -> LoginError {
        LoginError::Text {
            portal: self.cfg.portal.clone(),
            source,
        }
    }

    fn neg_err(&self, source: NegotiationError) -> LoginError {
        LoginError::Negotiation {
            portal: self.cfg.portal.clone(),
            source,
        }
    }

    fn fail<T>(&mut self, e: LoginError) -> Result<T, LoginError> {
        self.finished = true;
        Err(e)
    }

    /// The first Login Request.
    pub fn start(&mut self) -> Result<LoginPdu, LoginError> {
        if self.last.is_some() || self.finished {
            return Err(LoginError::Finished(self.cfg.portal.clone()));
        }
        let mut t = TextBuilder::new();
        let r = (|| -> Result<(), TextError> {
            t.push("InitiatorName", &self.cfg.initiator_name)?;
            if let Some(a) = &self.cfg.initiator_alias {
                t.push("InitiatorAlias", a)?;
            }
            match &self.cfg.target {
                LoginTarget::Normal { target_name } => {
                    t.push("SessionType", "Normal")?;
                    t.push("TargetName", target_name)?;
                }
                LoginTarget::Discovery => {
                    t.push("SessionType", "Discovery")?;
                }
            }
            let methods = match (&self.cfg.chap, &self.cfg.mutual_chap) {
                (None, _) => "None",
                (Some(_), None) => "CHAP,None",
                (Some(_), Some(_)) => "CHAP",
            };
            t.push("AuthMethod", methods)?;
            Ok(())
        })();
        r.map_err(|e| LoginError::Config(e.to_string()))?;
        // Without CHAP we are ready to leave the security stage at once.
        let transit = self.cfg.chap.is_none();
        Ok(self.request(transit, Stage::Operational, t.finish()))
    }

    /// Build a request in the current stage, splitting long text (C bit).
    fn request(&mut self, transit: bool, nsg: Stage, data: Vec<u8>) -> LoginPdu {
        let (chunk, rest) = if data.len() > LOGIN_PDU_DATA_MAX {
            let mut d = data;
            let rest = d.split_off(LOGIN_PDU_DATA_MAX);
            (d, Some(rest))
        } else {
            (data, None)
        };
        let cont = rest.is_some();
        self.pending_out = rest.map(|r| (r, transit, nsg));
        let header = LoginRequest {
            transit: transit && !cont,
            cont,
            csg: self.stage,
            nsg: if transit && !cont { nsg } else { self.stage },
            version_max: ISCSI_VERSION,
            version_min: ISCSI_VERSION,
            // At most LOGIN_PDU_DATA_MAX bytes, well inside 24 bits.
            data_segment_length: U24::from_len(chunk.len()).unwrap_or(U24::ZERO),
            isid: self.cfg.isid,
            tsih: self.cfg.tsih,
            itt: self.cfg.itt,
            cid: self.cfg.cid,
            cmd_sn: self.cfg.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        };
        self.last = Some(header.clone());
        LoginPdu {
            header,
            data: chunk,
        }
    }

    /// Feed any target PDU received during login (a Reject or another PDU
    /// type ends the login with an error).
    pub fn on_pdu(&mut self, pdu: &TargetPdu, data: &[u8]) -> Result<LoginStep, LoginError> {
        match pdu {
            TargetPdu::LoginResponse(r) => self.on_response(r, data),
            TargetPdu::Reject(r) => {
                let why = match r.reason {
                    RejectReason::ProtocolError => "protocol error",
                    RejectReason::InvalidPduField => "invalid PDU field",
                    RejectReason::CommandNotSupported => "command not supported",
                    _ => "other reason",
                };
                let e = self.protocol(format!("target rejected our login request ({why})"));
                self.fail(e)
            }
            other => {
                let e = self.protocol(format!("unexpected {:?} PDU during login", other.opcode()));
                self.fail(e)
            }
        }
    }

    /// Consume one Login Response and its data segment.
    pub fn on_response(
        &mut self,
        hdr: &LoginResponse,
        data: &[u8],
    ) -> Result<LoginStep, LoginError> {
        if self.finished {
            return Err(LoginError::Finished(self.cfg.portal.clone()));
        }
        match self.step(hdr, data) {
            Ok(s) => {
                if !matches!(s, LoginStep::Send(_)) {
                    self.finished = true;
                }
                Ok(s)
            }
            Err(e) => self.fail(e),
        }
    }

    fn step(&mut self, hdr: &LoginResponse, data: &[u8]) -> Result<LoginStep, LoginError> {
        let Some(last) = self.last.clone() else {
            return Err(self.protocol("Login Response before any Login Request"));
        };
        self.round_trips += 1;
        if self.round_trips > MAX_LOGIN_ROUND_TRIPS {
            return Err(self.protocol(format!(
                "login did not finish after {MAX_LOGIN_ROUND_TRIPS} exchanges"
            )));
        }
        if hdr.itt != self.cfg.itt {
            return Err(self.protocol(format!(
                "initiator task tag {:#x}, expected {:#x}",
                hdr.itt, self.cfg.itt
            )));
        }
        if data.len() != hdr.data_segment_length.get() as usize {
            return Err(self.protocol("data length differs from DataSegmentLength"));
        }
        if data.len() > LOGIN_PDU_DATA_MAX {
            return Err(self.protocol(format!(
                "login data segment of {} bytes exceeds {LOGIN_PDU_DATA_MAX}",
                data.len()
            )));
        }

        // Status first: error and redirect responses carry little else.
        match hdr.status_class {
            0 if hdr.status_detail == 0 => {}
            0 => {
                return Err(self.protocol(format!(
                    "unknown success status detail {:#04x}",
                    hdr.status_detail
                )))
            }
            1 => return self.redirect(hdr, data),
            class => {
                return Err(LoginError::Rejected {
                    portal: self.cfg.portal.clone(),
                    class,
                    detail: hdr.status_detail,
                    what: status_words(class, hdr.status_detail),
                })
            }
        }
        if hdr.version_active != ISCSI_VERSION {
            return Err(self.protocol(format!(
                "unsupported iSCSI version {:#04x} (we speak {ISCSI_VERSION:#04x})",
                hdr.version_active
            )));
        }
        if hdr.isid != self.cfg.isid {
            return Err(self.protocol("ISID differs from ours"));
        }
        // StatSN: the first response starts the connection's numbering;
        // later ones must not go backwards.
        if self.got_first && serial_lt(hdr.seq.stat_sn, self.exp_stat_sn.wrapping_sub(1)) {
            return Err(self.protocol(format!("StatSN went backwards to {:#x}", hdr.seq.stat_sn)));
        }
        self.got_first = true;
        self.exp_stat_sn = hdr.seq.stat_sn.wrapping_add(1);

        if hdr.csg != last.csg {
            return Err(self.protocol(format!(
                "response is for stage {:?}, we are in {:?}",
                hdr.csg, last.csg
            )));
        }
        if hdr.transit {
            if !last.transit {
                return Err(self
                    .protocol("target moved to the next stage (T bit) though we did not ask to"));
            }
            if hdr.nsg <= hdr.csg {
                return Err(self.protocol(format!(
                    "target's next stage {:?} does not follow {:?}",
                    hdr.nsg, hdr.csg
                )));
            }
            if hdr.nsg > last.nsg {
                return Err(self.protocol(format!(
                    "target jumped to stage {:?}, beyond the {:?} we asked for",
                    hdr.nsg, last.nsg
                )));
            }
        }

        // Our own continued text: the target acknowledges each piece with
        // an empty response; send the next piece.
        if let Some((rest, transit, nsg)) = self.pending_out.take() {
            if !data.is_empty() || hdr.cont || hdr.transit {
                return Err(self.protocol("target answered before our continued text was complete"));
            }
            return Ok(LoginStep::Send(self.request(transit, nsg, rest)));
        }

        // The target's continued text: ask for the rest with an empty
        // request that repeats our T/NSG, as our intent has not changed.
        let whole = self
            .asm
            .push(data, hdr.cont)
            .map_err(|e| self.text_err(e))?;
        let Some(text) = whole else {
            return Ok(LoginStep::Send(self.request(
                last.transit,
                last.nsg,
                Vec::new(),
            )));
        };
        let pairs = text::decode_unique(&text).map_err(|e| self.text_err(e))?;

        match self.stage {
            Stage::Security => self.security(hdr, pairs),
            Stage::Operational => self.operational(hdr, pairs),
            Stage::FullFeature => Err(self.protocol("response after full feature phase")),
        }
    }

    fn redirect(&self, hdr: &LoginResponse, data: &[u8]) -> Result<LoginStep, LoginError> {
        if !matches!(hdr.status_detail, 1 | 2) {
            return Err(LoginError::Rejected {
                portal: self.cfg.portal.clone(),
                class: 1,
                detail: hdr.status_detail,
                what: status_words(1, hdr.status_detail),
            });
        }
        let pairs = text::decode_unique(data).map_err(|e| self.text_err(e))?;
        let addr = pairs
            .iter()
            .find(|p| p.key == "TargetAddress")
            .ok_or_else(|| self.protocol("redirect without TargetAddress"))?;
        let portal = parse_target_address(&addr.value).map_err(|e| self.protocol(e.to_string()))?;
        Ok(LoginStep::Redirect {
            portal,
            permanent: hdr.status_detail == 2,
        })
    }

    fn first_seen(&mut self, key: &str) -> Result<(), LoginError> {
        if !self.seen_sec_keys.insert(key.to_string()) {
            return Err(self.protocol(format!("target sent {key} twice")));
        }
        Ok(())
    }

    fn security(
        &mut self,
        hdr: &LoginResponse,
        pairs: Vec<text::Pair>,
    ) -> Result<LoginStep, LoginError> {
        let mut auth_method = None;
        let mut chap_keys: Vec<(String, String)> = Vec::new();
        for p in pairs {
            match p.key.as_str() {
                "AuthMethod" => {
                    self.first_seen(&p.key)?;
                    auth_method = Some(p.value);
                }
                k if k.starts_with("CHAP_") => {
                    self.first_seen(&p.key)?;
                    chap_keys.push((p.key, p.value));
                }
                _ => {
                    let neg = self
                        .neg
                        .as_mut()
                        .ok_or_else(|| LoginError::Finished(self.cfg.portal.clone()))?;
                    if let Err(e) = neg.handle(&p.key, &p.value) {
                        return Err(self.neg_err(e));
                    }
                }
            }
        }
        let chap_get = |k: &str| {
            chap_keys
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };

        let mut reply = TextBuilder::new();
        match self.sec.clone() {
            Sec::AwaitMethod => {
                if !chap_keys.is_empty() {
                    return Err(self.protocol("CHAP keys before AuthMethod was agreed"));
                }
                let method = match auth_method {
                    Some(m) => m,
                    // Only tolerated when None is all we offered.
                    None if self.cfg.chap.is_none() => "None".to_string(),
                    None => return Err(self.protocol("no AuthMethod in the target's answer")),
                };
                match method.as_str() {
                    "None" if self.cfg.mutual_chap.is_none() => {
                        self.sec = Sec::Done;
                    }
                    "CHAP" if self.cfg.chap.is_some() => {
                        let algs: Vec<String> = self
                            .cfg
                            .chap_algorithms
                            .iter()
                            .map(|a| a.code().to_string())
                            .collect();
                        reply
                            .push("CHAP_A", &algs.join(","))
                            .map_err(|e| self.text_err(e))?;
                        self.sec = Sec::AwaitChallenge;
                        self.chap_used = true;
                    }
                    "CHAP" => {
                        return Err(LoginError::AuthUnavailable {
                            portal: self.cfg.portal.clone(),
                            method,
                            why: "but no CHAP credentials are configured",
                        })
                    }
                    "None" => {
                        return Err(LoginError::AuthUnavailable {
                            portal: self.cfg.portal.clone(),
                            method,
                            why: "but mutual CHAP is configured",
                        })
                    }
                    _ => {
                        return Err(LoginError::AuthUnavailable {
                            portal: self.cfg.portal.clone(),
                            method: method.chars().take(64).collect(),
                            why: "which we did not offer",
                        })
                    }
                }
            }
            Sec::AwaitChallenge => {
                if auth_method.is_some() {
                    return Err(self.protocol("AuthMethod sent again"));
                }
                let (Some(a), Some(i), Some(c)) =
                    (chap_get("CHAP_A"), chap_get("CHAP_I"), chap_get("CHAP_C"))
                else {
                    return Err(
                        self.protocol("target's CHAP challenge lacks CHAP_A, CHAP_I or CHAP_C")
                    );
                };
                if chap_keys.len() != 3 {
                    return Err(self.protocol("unexpected CHAP keys with the challenge"));
                }
                let alg = super::params::parse_number(&a)
                    .and_then(ChapAlgorithm::from_code)
                    .filter(|alg| self.cfg.chap_algorithms.contains(alg))
                    .ok_or_else(|| {
                        self.protocol(format!(
                            "target chose CHAP_A={}, which we did not offer",
                            a.chars().take(16).collect::<String>()
                        ))
                    })?;
                let id = super::params::parse_number(&i)
                    .and_then(|n| u8::try_from(n).ok())
                    .ok_or_else(|| self.protocol("CHAP_I is not a number from 0 to 255"))?;
                let challenge =
                    chap::decode_binary("CHAP_C", &c).map_err(|source| LoginError::Chap {
                        portal: self.cfg.portal.clone(),
                        source,
                    })?;
                let creds = self
                    .cfg
                    .chap
                    .as_ref()
                    .ok_or_else(|| LoginError::Config("CHAP credentials vanished".into()))?;
                let response = alg.response(id, &creds.secret, &challenge);
                let r: Result<(), TextError> = (|| {
                    reply.push("CHAP_N", &creds.username)?;
                    reply.push("CHAP_R", &chap::encode_hex(&response))?;
                    Ok(())
                })();
                r.map_err(|e| self.text_err(e))?;
                let mutual = if self.cfg.mutual_chap.is_some() {
                    let (mid, mchal) = match self.forced_challenge.take() {
                        Some(c) => c,
                        None => chap::random_challenge().map_err(|source| LoginError::Chap {
                            portal: self.cfg.portal.clone(),
                            source,
                        })?,
                    };
                    if mchal == challenge {
                        // RFC 7143 §12.1.3: never answer our own challenge.
                        return Err(LoginError::MutualAuthFailed {
                            portal: self.cfg.portal.clone(),
                            what: "target reflected our challenge",
                        });
                    }
                    let r: Result<(), TextError> = (|| {
                        reply.push("CHAP_I", &mid.to_string())?;
                        reply.push("CHAP_C", &chap::encode_hex(&mchal))?;
                        Ok(())
                    })();
                    r.map_err(|e| self.text_err(e))?;
                    Some((mid, mchal))
                } else {
                    None
                };
                self.sec = Sec::AwaitChapResult { alg, mutual };
                // With our response sent we are ready to move on.
                return Ok(LoginStep::Send(self.request(
                    true,
                    Stage::Operational,
                    reply.finish(),
                )));
            }
            Sec::AwaitChapResult { alg, mutual } => {
                if auth_method.is_some() {
                    return Err(self.protocol("AuthMethod sent again"));
                }
                match (&mutual, &self.cfg.mutual_chap) {
                    (Some((mid, mchal)), Some(m)) => {
                        let (Some(n), Some(r)) = (chap_get("CHAP_N"), chap_get("CHAP_R")) else {
                            return Err(LoginError::MutualAuthFailed {
                                portal: self.cfg.portal.clone(),
                                what: "no CHAP_N/CHAP_R answer to our challenge",
                            });
                        };
                        if chap_keys.len() != 2 {
                            return Err(self.protocol("unexpected CHAP keys with the CHAP answer"));
                        }
                        if let Some(expected) = &m.target_username {
                            if &n != expected {
                                return Err(LoginError::MutualAuthFailed {
                                    portal: self.cfg.portal.clone(),
                                    what: "CHAP_N is not the configured target user name",
                                });
                            }
                        }
                        let got = chap::decode_binary("CHAP_R", &r).map_err(|source| {
                            LoginError::Chap {
                                portal: self.cfg.portal.clone(),
                                source,
                            }
                        })?;
                        let want = alg.response(*mid, &m.secret, mchal);
                        if !chap::ct_eq(&got, &want) {
                            return Err(LoginError::MutualAuthFailed {
                                portal: self.cfg.portal.clone(),
                                what: "wrong CHAP_R",
                            });
                        }
                        self.target_authenticated = true;
                        self.sec = Sec::Done;
                    }
                    _ => {
                        if !chap_keys.is_empty() {
                            return Err(self.protocol("unexpected CHAP keys after our response"));
                        }
                        self.sec = Sec::Done;
                    }
                }
            }
            Sec::Done => {
                if auth_method.is_some() || !chap_keys.is_empty() {
                    return Err(self.protocol("security keys after authentication finished"));
                }
            }
        }

        if self.sec == Sec::Done {
            if self.cfg.mutual_chap.is_some() && !self.target_authenticated {
                return Err(LoginError::MutualAuthFailed {
                    portal: self.cfg.portal.clone(),
                    what: "target did not authenticate",
                });
            }
            let replies = self
                .neg
                .as_mut()
                .map(|n| n.take_replies())
                .unwrap_or_default();
            if hdr.transit {
                Self::drop_late_replies(&replies);
                return self.enter(hdr);
            }
            // Stay in the stage until the target agrees to move on.
            for (k, v) in replies {
                reply.push(&k, &v).map_err(|e| self.text_err(e))?;
            }
            return Ok(LoginStep::Send(self.request(
                true,
                Stage::Operational,
                reply.finish(),
            )));
        }
        if hdr.transit {
            return Err(self.protocol("target left the security stage before authentication"));
        }
        Ok(LoginStep::Send(self.request(
            false,
            Stage::Security,
            reply.finish(),
        )))
    }

    /// The target offered keys in the very response that ends the stage, so
    /// our answers can no longer be sent. Every negotiable key that matters
    /// is in our own offer (so the target's value was an answer, checked);
    /// what remains is markers, vendor or unknown keys, whose answers change
    /// nothing we use. tgtd does this with IFMarker/OFMarker.
    fn drop_late_replies(replies: &[(String, String)]) {
        for (k, v) in replies {
            log::debug!(
                "login: target offered {k} while ending the stage; our answer {v} is dropped"
            );
        }
    }

    /// The target moved to `hdr.nsg`.
    fn enter(&mut self, hdr: &LoginResponse) -> Result<LoginStep, LoginError> {
        match hdr.nsg {
            Stage::Operational => {
                self.stage = Stage::Operational;
                let neg = self
                    .neg
                    .as_mut()
                    .ok_or_else(|| LoginError::Finished(self.cfg.portal.clone()))?;
                let mut pairs = neg.initial_pairs();
                pairs.extend(neg.take_replies());
                let data = text::encode(&pairs).map_err(|e| self.text_err(e))?;
                Ok(LoginStep::Send(self.request(
                    true,
                    Stage::FullFeature,
                    data,
                )))
            }
            Stage::FullFeature => self.finish(hdr),
            Stage::Security => Err(self.protocol("stage went backwards")),
        }
    }

    fn operational(
        &mut self,
        hdr: &LoginResponse,
        pairs: Vec<text::Pair>,
    ) -> Result<LoginStep, LoginError> {
        if let Some(p) = pairs
            .iter()
            .find(|p| p.key == "AuthMethod" || p.key.starts_with("CHAP_"))
        {
            return Err(self.protocol(format!("security key {} in the operational stage", p.key)));
        }
        let portal = self.cfg.portal.clone();
        let neg = self
            .neg
            .as_mut()
            .ok_or_else(|| LoginError::Finished(portal.clone()))?;
        for p in &pairs {
            neg.handle(&p.key, &p.value)
                .map_err(|source| LoginError::Negotiation {
                    portal: portal.clone(),
                    source,
                })?;
        }
        let replies = neg.take_replies();
        if hdr.transit {
            Self::drop_late_replies(&replies);
            return self.enter(hdr);
        }
        let data = text::encode(&replies).map_err(|e| self.text_err(e))?;
        Ok(LoginStep::Send(self.request(
            true,
            Stage::FullFeature,
            data,
        )))
    }

    fn finish(&mut self, hdr: &LoginResponse) -> Result<LoginStep, LoginError> {
        if self.cfg.tsih == 0 && hdr.tsih == 0 {
            return Err(self.protocol("no TSIH in the final response of a new session"));
        }
        if self.cfg.tsih != 0 && hdr.tsih != self.cfg.tsih {
            return Err(self.protocol(format!(
                "TSIH {:#x} differs from the session's {:#x}",
                hdr.tsih, self.cfg.tsih
            )));
        }
        let neg = self
            .neg
            .take()
            .ok_or_else(|| LoginError::Finished(self.cfg.portal.clone()))?;
        let params = neg.finish().map_err(|e| self.neg_err(e))?;
        self.stage = Stage::FullFeature;
        Ok(LoginStep::Done(LoginOutcome {
            params,
            tsih: hdr.tsih,
            cmd_sn: self.cfg.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            exp_cmd_sn: hdr.seq.exp_cmd_sn,
            max_cmd_sn: hdr.seq.max_cmd_sn,
            chap_used: self.chap_used,
            target_authenticated: self.target_authenticated,
        }))
    }
}

#[cfg(test)]
mod tests;
