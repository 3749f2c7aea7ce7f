//! Opening sessions: connect to a portal, run the login state machine over
//! the connection, follow redirects, try the next portal on failure.

use std::time::{Duration, Instant};

use log::{info, warn};
use thiserror::Error;

use super::chap::ChapCredentials;
use super::login::{
    LoginConfig, LoginError, LoginNegotiator, LoginOutcome, LoginPdu, LoginStep, LoginTarget,
    MutualChap,
};
use super::params::ParamOffer;
use super::pdu::TargetPdu;
use super::session::{Session, SessionStart};
use crate::transport::tcp::TcpConnection;
use crate::transport::{OutPdu, PduData, Transport, TransportError};

/// How many redirects one login follows.
const MAX_REDIRECTS: u32 = 4;
/// Time a path probe (a bare connect to a portal) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How the sessions of a target's queues use its portals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PathPolicy {
    /// Every queue prefers the first portal; the others stand by.
    #[default]
    ActiveStandby,
    /// Queue `i` prefers portal `i mod n`: the sessions spread over the paths.
    RoundRobin,
}

impl PathPolicy {
    /// The name on the command line and in the config file.
    pub fn name(self) -> &'static str {
        match self {
            PathPolicy::ActiveStandby => "active-standby",
            PathPolicy::RoundRobin => "round-robin",
        }
    }
}

impl std::str::FromStr for PathPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active-standby" => Ok(PathPolicy::ActiveStandby),
            "round-robin" => Ok(PathPolicy::RoundRobin),
            _ => Err(format!(
                "unknown path policy {s:?} (active-standby or round-robin)"
            )),
        }
    }
}

/// Why a session could not be opened.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// TCP connect or I/O during login failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The target refused the login or broke the login protocol.
    #[error(transparent)]
    Login(#[from] LoginError),
    /// The target's answer could not be decoded.
    #[error("login to {portal}: undecodable response: {reason}")]
    BadResponse {
        /// The portal.
        portal: String,
        /// What was wrong.
        reason: String,
    },
    /// Redirect loop.
    #[error("login to {portal}: more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects {
        /// The first portal.
        portal: String,
    },
    /// No portal answered.
    #[error("no portal of {target} accepted a login: {last}")]
    AllPortalsFailed {
        /// Target name.
        target: String,
        /// The last error.
        last: Box<ConnectError>,
    },
}

/// Opens a transport connection to a portal ("host:port") within a timeout.
pub type Dialer = std::sync::Arc<
    dyn Fn(&str, Duration) -> Result<Box<dyn Transport>, TransportError> + Send + Sync,
>;

/// The TCP dialer.
pub fn tcp_dialer() -> Dialer {
    std::sync::Arc::new(|portal: &str, timeout: Duration| {
        Ok(Box::new(TcpConnection::connect(portal, timeout)?) as Box<dyn Transport>)
    })
}

/// What every session of one target shares.
#[derive(Clone)]
pub struct ConnectConfig {
    /// Portals ("host:port"), tried in order.
    pub portals: Vec<String>,
    /// Target name.
    pub target_name: String,
    /// Our initiator name.
    pub initiator_name: String,
    /// CHAP, if the target wants it.
    pub chap: Option<ChapCredentials>,
    /// Mutual CHAP.
    pub mutual_chap: Option<MutualChap>,
    /// CHAP algorithms to offer, preferred first. CHAP_A=7 means SHA-256 to
    /// open-iscsi and LIO but SHA-1 to tgt and IET, so SHA-256 is opt-in.
    pub chap_algorithms: Vec<super::chap::ChapAlgorithm>,
    /// Operational parameters to propose.
    pub params: ParamOffer,
    /// Time allowed for connect + login.
    pub login_timeout: Duration,
    /// How to open a connection (TCP or iSER).
    pub dial: Dialer,
    /// Negotiate iSER (RDMAExtensions=Yes and the iSER keys).
    pub iser: bool,
    /// Which portal each queue prefers.
    pub path_policy: PathPolicy,
}

impl std::fmt::Debug for ConnectConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectConfig")
            .field("portals", &self.portals)
            .field("target_name", &self.target_name)
            .field("initiator_name", &self.initiator_name)
            .field("chap", &self.chap.as_ref().map(|c| &c.username))
            .field("iser", &self.iser)
            .field("path_policy", &self.path_policy)
            .finish()
    }
}

/// Opens sessions for the queues of one target.
pub struct Connector {
    cfg: ConnectConfig,
    /// Random part of our ISIDs, one per process; the qualifier is the queue.
    isid_base: [u8; 6],
}

impl Connector {
    /// A connector with a fresh random ISID base.
    pub fn new(cfg: ConnectConfig) -> Result<Self, ConnectError> {
        let isid_base = super::login::random_isid(0).map_err(|e| {
            ConnectError::Login(LoginError::Config(format!(
                "cannot draw a random ISID: {e}"
            )))
        })?;
        Ok(Connector { cfg, isid_base })
    }

    /// The configuration.
    pub fn config(&self) -> &ConnectConfig {
        &self.cfg
    }

    /// The index of the portal queue `queue` prefers.
    fn preferred_index(&self, queue: usize) -> usize {
        match self.cfg.path_policy {
            PathPolicy::ActiveStandby => 0,
            PathPolicy::RoundRobin => queue % self.cfg.portals.len().max(1),
        }
    }

    /// The portal queue `queue` prefers; `None` with a single portal (no
    /// choice to make).
    pub fn preferred_portal(&self, queue: usize) -> Option<&str> {
        if self.cfg.portals.len() < 2 {
            return None;
        }
        self.cfg
            .portals
            .get(self.preferred_index(queue))
            .map(String::as_str)
    }

    /// The portals in the order queue `queue` tries them: its preferred one
    /// first, then the next ones round the list; `avoid` (the path just
    /// lost) last, so a dead path does not delay the move to a live one.
    pub fn portal_order(&self, queue: usize, avoid: Option<&str>) -> Vec<&str> {
        let n = self.cfg.portals.len();
        let first = self.preferred_index(queue);
        let mut order: Vec<&str> = (0..n)
            .map(|i| self.cfg.portals[(first + i) % n].as_str())
            .collect();
        if let Some(a) = avoid {
            if let Some(i) = order.iter().position(|p| *p == a) {
                let p = order.remove(i);
                order.push(p);
            }
        }
        order
    }

    /// Logs in a session for queue `queue` (ISID qualifier = queue), trying
    /// each portal in turn, preferred first.
    pub fn open(&self, queue: usize) -> Result<Session, ConnectError> {
        self.open_avoiding(queue, None)
    }

    /// Like [`open`](Self::open), trying `avoid` (a path that just failed) last.
    pub fn open_avoiding(
        &self,
        queue: usize,
        avoid: Option<&str>,
    ) -> Result<Session, ConnectError> {
        let isid = self.isid(queue);
        let mut last = None;
        for portal in self.portal_order(queue, avoid) {
            match self.login_following_redirects(portal, isid, self.cfg.login_timeout) {
                Ok(s) => return Ok(s),
                Err(e) => {
                    warn!("queue {queue}: {e}");
                    // A refused login (bad secret, no such target) will not get
                    // better on another portal of the same target.
                    if matches!(e, ConnectError::Login(LoginError::Rejected { .. })) {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        Err(match last {
            Some(e) if self.cfg.portals.len() == 1 => e,
            Some(e) => ConnectError::AllPortalsFailed {
                target: self.cfg.target_name.clone(),
                last: Box::new(e),
            },
            None => ConnectError::BadResponse {
                portal: String::new(),
                reason: "no portal configured".into(),
            },
        })
    }

    /// Logs in a session for queue `queue` on its preferred portal only,
    /// allowing the connect no more than the probe's time (a failback: the
    /// portal just answered a probe; if it no longer does, the queue should
    /// not wait the whole login timeout before going back to another path).
    pub fn open_preferred(&self, queue: usize) -> Result<Session, ConnectError> {
        let portal = &self.cfg.portals[self.preferred_index(queue)];
        let dial_timeout = PROBE_TIMEOUT.min(self.cfg.login_timeout);
        self.login_following_redirects(portal, self.isid(queue), dial_timeout)
    }

    /// Our ISID for queue `queue`: the process's random part, the queue as
    /// qualifier. The same on every portal, so a session keeps its I_T nexus
    /// identity (and SCSI reservations) when it moves.
    fn isid(&self, queue: usize) -> [u8; 6] {
        let mut isid = self.isid_base;
        isid[4..6].copy_from_slice(&(queue as u16).to_be_bytes());
        isid
    }

    /// Whether `portal` answers a connect (TCP, or RDMA CM for iSER) within
    /// a short timeout; the connection is closed at once, without a login.
    pub fn probe(&self, portal: &str) -> Result<(), TransportError> {
        (self.cfg.dial)(portal, PROBE_TIMEOUT).map(drop)
    }

    fn login_following_redirects(
        &self,
        first: &str,
        isid: [u8; 6],
        dial_timeout: Duration,
    ) -> Result<Session, ConnectError> {
        let mut portal = first.to_string();
        for _ in 0..=MAX_REDIRECTS {
            match self.login_once(&portal, isid, dial_timeout)? {
                LoginResult::Session(s) => return Ok(*s),
                LoginResult::Redirect(to) => {
                    info!("login to {portal}: redirected to {to}");
                    portal = to;
                }
            }
        }
        Err(ConnectError::TooManyRedirects {
            portal: first.to_string(),
        })
    }

    /// Logs in a discovery session at `portal` (following redirects) and
    /// returns its connection in full feature phase, for SendTargets.
    pub fn discovery_login(
        &self,
        portal: &str,
    ) -> Result<(Box<dyn Transport>, LoginOutcome), ConnectError> {
        let mut at = portal.to_string();
        for _ in 0..=MAX_REDIRECTS {
            match self.login_raw(
                &at,
                self.isid_base,
                LoginTarget::Discovery,
                self.cfg.login_timeout,
            )? {
                RawLogin::Done(conn, outcome) => return Ok((conn, outcome)),
                RawLogin::Redirect(to) => {
                    info!("discovery login to {at}: redirected to {to}");
                    at = to;
                }
            }
        }
        Err(ConnectError::TooManyRedirects {
            portal: portal.to_string(),
        })
    }

    fn login_once(
        &self,
        portal: &str,
        isid: [u8; 6],
        dial_timeout: Duration,
    ) -> Result<LoginResult, ConnectError> {
        let target = LoginTarget::Normal {
            target_name: self.cfg.target_name.clone(),
        };
        let (conn, outcome) = match self.login_raw(portal, isid, target, dial_timeout)? {
            RawLogin::Done(conn, outcome) => (conn, outcome),
            RawLogin::Redirect(to) => return Ok(LoginResult::Redirect(to)),
        };
        info!(
            "logged in to {} at {portal}{} (TSIH {:#06x}, MaxBurstLength {}, ImmediateData {}, InitialR2T {}{})",
            self.cfg.target_name,
            if outcome.chap_used { " with CHAP" } else { "" },
            outcome.tsih,
            outcome.params.max_burst_length,
            if outcome.params.immediate_data { "Yes" } else { "No" },
            if outcome.params.initial_r2t { "Yes" } else { "No" },
            match (
                outcome.params.header_digest == super::params::DigestKind::Crc32c,
                outcome.params.data_digest == super::params::DigestKind::Crc32c
            ) {
                (true, true) => ", header digest, data digest",
                (true, false) => ", header digest",
                (false, true) => ", data digest",
                _ => "",
            },
        );
        let start = SessionStart {
            cmd_sn: outcome.cmd_sn,
            exp_stat_sn: outcome.exp_stat_sn,
            max_cmd_sn: outcome.max_cmd_sn,
        };
        let session = Session::new(conn, outcome.params, start);
        Ok(LoginResult::Session(Box::new(session)))
    }

    /// One login exchange on a new connection to `portal`.
    fn login_raw(
        &self,
        portal: &str,
        isid: [u8; 6],
        target: LoginTarget,
        dial_timeout: Duration,
    ) -> Result<RawLogin, ConnectError> {
        let deadline = Instant::now() + self.cfg.login_timeout;
        let mut conn = (self.cfg.dial)(portal, dial_timeout)?;
        let mut lc = LoginConfig::new(portal, &self.cfg.initiator_name, target, isid);
        lc.chap = self.cfg.chap.clone();
        lc.chap_algorithms = self.cfg.chap_algorithms.clone();
        lc.mutual_chap = self.cfg.mutual_chap.clone();
        lc.params = self.cfg.params.clone();
        lc.iser = self.cfg.iser;
        let mut neg = LoginNegotiator::new(lc)?;
        let mut pdu = neg.start()?;
        loop {
            send(conn.as_mut(), pdu, deadline)?;
            let resp = conn.recv_blocking(deadline)?;
            let decoded = TargetPdu::decode(&resp.bhs).map_err(|e| ConnectError::BadResponse {
                portal: portal.to_string(),
                reason: e.to_string(),
            })?;
            match neg.on_pdu(&decoded, &resp.data)? {
                LoginStep::Send(next) => pdu = next,
                LoginStep::Done(outcome) => return Ok(RawLogin::Done(conn, outcome)),
                LoginStep::Redirect { portal: to, .. } => {
                    let addr = if to.host.contains(':') {
                        format!("[{}]:{}", to.host, to.port)
                    } else {
                        format!("{}:{}", to.host, to.port)
                    };
                    return Ok(RawLogin::Redirect(addr));
                }
            }
        }
    }
}

enum LoginResult {
    Session(Box<Session>),
    Redirect(String),
}

enum RawLogin {
    Done(Box<dyn Transport>, LoginOutcome),
    Redirect(String),
}

fn send(conn: &mut dyn Transport, pdu: LoginPdu, deadline: Instant) -> Result<(), ConnectError> {
    let bhs = pdu.bhs();
    let data = if pdu.data.is_empty() {
        PduData::None
    } else {
        PduData::Owned(pdu.data)
    };
    conn.send_blocking(OutPdu::new(bhs, data), deadline)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connector(portals: &[&str], path_policy: PathPolicy) -> Connector {
        Connector::new(ConnectConfig {
            portals: portals.iter().map(|p| p.to_string()).collect(),
            target_name: "iqn.2026-11.test:t".into(),
            initiator_name: "iqn.2026-11.test:i".into(),
            chap: None,
            mutual_chap: None,
            chap_algorithms: Vec::new(),
            params: ParamOffer::default(),
            login_timeout: Duration::from_secs(1),
            dial: tcp_dialer(),
            iser: false,
            path_policy,
        })
        .unwrap()
    }

    #[test]
    fn round_robin_spreads_the_queues_and_tries_the_lost_path_last() {
        let c = connector(&["a:1", "b:1", "c:1"], PathPolicy::RoundRobin);
        assert_eq!(c.preferred_portal(0), Some("a:1"));
        assert_eq!(c.preferred_portal(1), Some("b:1"));
        assert_eq!(c.preferred_portal(4), Some("b:1"));
        assert_eq!(c.portal_order(1, None), ["b:1", "c:1", "a:1"]);
        assert_eq!(c.portal_order(1, Some("b:1")), ["c:1", "a:1", "b:1"]);
        assert_eq!(c.portal_order(2, Some("x:1")), ["c:1", "a:1", "b:1"]);
    }

    #[test]
    fn active_standby_prefers_the_first_portal() {
        let c = connector(&["a:1", "b:1"], PathPolicy::ActiveStandby);
        for q in 0..4 {
            assert_eq!(c.preferred_portal(q), Some("a:1"));
            assert_eq!(c.portal_order(q, None), ["a:1", "b:1"]);
        }
        assert_eq!(c.portal_order(3, Some("a:1")), ["b:1", "a:1"]);
        // One portal: nothing to prefer, nothing to fail back to.
        let one = connector(&["a:1"], PathPolicy::RoundRobin);
        assert_eq!(one.preferred_portal(1), None);
        assert_eq!(one.portal_order(1, Some("a:1")), ["a:1"]);
    }

    #[test]
    fn policy_names_round_trip() {
        for p in [PathPolicy::ActiveStandby, PathPolicy::RoundRobin] {
            assert_eq!(p.name().parse::<PathPolicy>(), Ok(p));
        }
        assert!("random".parse::<PathPolicy>().is_err());
    }
}
