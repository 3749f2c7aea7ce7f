//! Opening a target from its `--target` string and the connection options.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::blk::mem::MemTarget;
use crate::blk::target::{Target, TargetError};
use crate::iscsi::chap::{ChapAlgorithm, ChapCredentials, ChapSecret};
use crate::iscsi::connect::{tcp_dialer, ConnectConfig, Connector, Dialer, PathPolicy};
use crate::iscsi::discovery::{parse_target_address, DiscoveredTarget};
use crate::iscsi::login::MutualChap;
use crate::iscsi::params::{IserOffer, ParamOffer};
use crate::iscsi::session::Session;
use crate::iscsi::url::{default_initiator_name, Scheme, TargetUrl};
use crate::scsi::lun::{ScsiLun, SessionFactory};
use crate::transport::iser::{GuestMemoryRegistration, IserConnection, ScatterPolicy};
use crate::transport::Transport;

/// Environment variable holding the CHAP secret (when no file is given).
pub const CHAP_SECRET_ENV: &str = "VHOST_ISER_CHAP_SECRET";
/// Environment variable holding the mutual CHAP (target) secret.
pub const TARGET_CHAP_SECRET_ENV: &str = "VHOST_ISER_TARGET_CHAP_SECRET";

/// How to reach and authenticate to an iSCSI target.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// Our iSCSI name (default: derived from the host name).
    pub initiator_name: Option<String>,
    /// More portals of the same target ("host:port"), after the URL's.
    pub extra_portals: Vec<String>,
    /// How the queues' sessions use the portals.
    pub path_policy: PathPolicy,
    /// CHAP user name (or `user@` in the URL).
    pub chap_user: Option<String>,
    /// File holding the CHAP secret (else `VHOST_ISER_CHAP_SECRET`).
    pub chap_secret_file: Option<PathBuf>,
    /// Mutual CHAP: the name the target must present.
    pub target_chap_user: Option<String>,
    /// Mutual CHAP: file holding the target's secret (else `VHOST_ISER_TARGET_CHAP_SECRET`).
    pub target_chap_secret_file: Option<PathBuf>,
    /// Offer CHAP with SHA-256 (CHAP_A=7) before MD5. Off by default: tgt and
    /// IET read CHAP_A=7 as SHA-1 and the login fails.
    pub chap_sha256: bool,
    /// Session timers (None: defaults, or `$VHOST_ISER_TIMEOUTS`).
    pub timeouts: Option<crate::iscsi::session::SessionTimeouts>,
    /// Login timeout.
    pub login_timeout: Option<Duration>,
    /// Operational parameter proposals (tests tune bursts and digests).
    pub params: Option<ParamOffer>,
    /// iSER: how scattered guest buffers are carried (None: `$VHOST_ISER_SCATTER`,
    /// else bounce).
    pub iser_scatter: Option<ScatterPolicy>,
}

/// Opens the target named by `spec`:
/// - `mem:SIZE`: a RAM disk (tests, demos, benchmarks of the vhost layer);
/// - `null:SIZE`: reads return zeroes, writes are dropped (benchmarks, plumbing checks);
/// - `iscsi://[user@]host[:port]/iqn/lun`: an iSCSI LUN over TCP;
/// - `iser://[user@]host[:port]/iqn/lun`: an iSCSI LUN over iSER (RDMA).
pub fn open_target(spec: &str, opts: &OpenOptions) -> Result<Arc<dyn Target>, TargetError> {
    if let Some(size) = spec.strip_prefix("mem:") {
        return Ok(Arc::new(MemTarget::from_spec(size, opts.read_only)?));
    }
    if let Some(size) = spec.strip_prefix("null:") {
        return Ok(Arc::new(MemTarget::null_from_spec(size, opts.read_only)?));
    }
    if !(spec.starts_with("iscsi://") || spec.starts_with("iser://")) {
        return Err(TargetError::BadTarget {
            target: spec.to_string(),
            reason: "expected mem:SIZE, null:SIZE, iscsi://host[:port]/iqn/lun or iser://host[:port]/iqn/lun"
                .to_string(),
        });
    }
    let url = TargetUrl::parse(spec).map_err(|e| TargetError::BadTarget {
        target: spec.to_string(),
        reason: e.reason,
    })?;
    let iser = if url.scheme == Scheme::Iser {
        // Say clearly whether this host can do RDMA at all.
        crate::transport::iser::verbs::ensure_device().map_err(|e| TargetError::Setup {
            context: format!("iser://{}", url.portal()),
            source: Box::new(e),
        })?;
        Some(GuestMemoryRegistration::new())
    } else {
        None
    };
    let scatter = match (opts.iser_scatter, &iser) {
        (Some(p), _) => p,
        (None, Some(_)) => ScatterPolicy::from_env().map_err(|reason| TargetError::BadTarget {
            target: spec.to_string(),
            reason,
        })?,
        (None, None) => ScatterPolicy::default(),
    };
    if iser.is_some() && scatter != ScatterPolicy::default() {
        log::info!("iSER: scattered guest buffers are split into one command per contiguous run");
    }
    let mut portals = vec![url.portal()];
    portals.extend(opts.extra_portals.iter().cloned());
    let mut cfg = connect_config(opts, portals, url.target.clone(), url.user.clone())?;
    if let Some(registry) = &iser {
        cfg.params = iser_params(cfg.params);
        cfg.dial = iser_dialer(registry.clone());
        cfg.iser = true;
    }
    let connector = Connector::new(cfg).map_err(|e| setup("preparing the login", Box::new(e)))?;
    let factory = Arc::new(IscsiSessions {
        describe: format!("{} lun {} at {}", url.target, url.lun, url.portal()),
        describe_target: format!("target {} on {}", url.target, url.portal()),
        lun: url.lun_wire(),
        connector,
        memory: iser,
        scatter,
    });
    let lun = ScsiLun::open(factory, opts.timeouts)?;
    Ok(Arc::new(ReadOnlyOverride {
        inner: lun,
        read_only: opts.read_only,
    }))
}

/// `vhost-iser discover`: a discovery session at `portal` (HOST[:PORT],
/// over TCP) and SendTargets=All. Targets without a TargetAddress get the
/// discovery portal.
pub fn discover(portal: &str, opts: &OpenOptions) -> Result<Vec<DiscoveredTarget>, TargetError> {
    let portal = parse_target_address(portal).map_err(|e| TargetError::BadTarget {
        target: portal.to_string(),
        reason: format!("{e}: expected HOST[:PORT]"),
    })?;
    let addr = portal.socket_addr_string();
    let cfg = connect_config(opts, vec![addr.clone()], String::new(), None)?;
    let failed = |e: Box<dyn std::error::Error + Send + Sync>| TargetError::Setup {
        context: format!("discovery at {addr}"),
        source: e,
    };
    let connector = Connector::new(cfg).map_err(|e| failed(Box::new(e)))?;
    let (mut conn, login) = connector
        .discovery_login(&addr)
        .map_err(|e| failed(Box::new(e)))?;
    let deadline = std::time::Instant::now() + login_timeout(opts);
    let mut targets = crate::iscsi::discovery::discover(conn.as_mut(), &login, deadline)
        .map_err(|e| failed(Box::new(e)))?;
    for t in &mut targets {
        if t.portals.is_empty() {
            t.portals.push(portal.clone());
        }
    }
    Ok(targets)
}

fn setup(what: &str, e: Box<dyn std::error::Error + Send + Sync>) -> TargetError {
    TargetError::Setup {
        context: what.to_string(),
        source: e,
    }
}

/// The login settings over TCP (iSER adjusts params, dial and iser);
/// `url_user`: the `user@` of a target URL.
fn connect_config(
    opts: &OpenOptions,
    portals: Vec<String>,
    target_name: String,
    url_user: Option<String>,
) -> Result<ConnectConfig, TargetError> {
    let (chap, mutual_chap) = credentials(opts, url_user)?;
    Ok(ConnectConfig {
        portals,
        target_name,
        initiator_name: opts
            .initiator_name
            .clone()
            .unwrap_or_else(default_initiator_name),
        chap,
        mutual_chap,
        chap_algorithms: if opts.chap_sha256 {
            vec![ChapAlgorithm::Sha256, ChapAlgorithm::Md5]
        } else {
            vec![ChapAlgorithm::Md5]
        },
        params: opts.params.clone().unwrap_or_default(),
        login_timeout: login_timeout(opts),
        dial: tcp_dialer(),
        iser: false,
        path_policy: opts.path_policy,
    })
}

fn login_timeout(opts: &OpenOptions) -> Duration {
    opts.login_timeout.unwrap_or(Duration::from_secs(15))
}

/// CHAP and mutual CHAP from the options (secrets from files or the
/// environment).
fn credentials(
    opts: &OpenOptions,
    url_user: Option<String>,
) -> Result<(Option<ChapCredentials>, Option<MutualChap>), TargetError> {
    let user = opts.chap_user.clone().or(url_user);
    let chap = match user {
        Some(username) => {
            let secret = match &opts.chap_secret_file {
                Some(p) => ChapSecret::from_file(p),
                None => ChapSecret::from_env(CHAP_SECRET_ENV),
            }
            .map_err(|e| setup("reading the CHAP secret", Box::new(e)))?;
            Some(ChapCredentials { username, secret })
        }
        None => None,
    };
    let mutual_chap = if opts.target_chap_secret_file.is_some()
        || opts.target_chap_user.is_some()
        || std::env::var_os(TARGET_CHAP_SECRET_ENV).is_some()
    {
        let secret = match &opts.target_chap_secret_file {
            Some(p) => ChapSecret::from_file(p),
            None => ChapSecret::from_env(TARGET_CHAP_SECRET_ENV),
        }
        .map_err(|e| setup("reading the target's CHAP secret", Box::new(e)))?;
        Some(MutualChap {
            target_username: opts.target_chap_user.clone(),
            secret,
        })
    } else {
        None
    };
    Ok((chap, mutual_chap))
}

/// iSER: the operational parameters we propose. Control-type PDUs (login,
/// responses, immediate data) fit 8 KiB buffers on both sides (isert and
/// tgtd size their receives so), so InitiatorRecvDataSegmentLength,
/// TargetRecvDataSegmentLength and the immediate data (FirstBurstLength)
/// are held to that; command data moves by RDMA, bounded by MaxBurstLength.
fn iser_params(mut p: ParamOffer) -> ParamOffer {
    let max = crate::transport::iser::connection::CONTROL_DATA_MAX as u32;
    p.iser = Some(IserOffer {
        initiator_recv_data_segment_length: max,
        target_recv_data_segment_length: Some(max),
    });
    p.first_burst_length = p.first_burst_length.min(max);
    // RFC 7145 §6.3: no iSCSI digests on iSER (the RDMA fabric checks data).
    let none = vec![crate::iscsi::params::DigestKind::None];
    if p.header_digest != none || p.data_digest != none {
        log::warn!("iSER: CRC32C digests do not apply to iSER (RFC 7145); --digests is ignored");
        p.header_digest = none.clone();
        p.data_digest = none;
    }
    p
}

/// The iSER dialer: RDMA connections whose commands use the guest memory
/// registered in `registry`.
fn iser_dialer(registry: Arc<GuestMemoryRegistration>) -> Dialer {
    Arc::new(move |portal: &str, timeout: Duration| {
        Ok(
            Box::new(IserConnection::connect(portal, timeout, registry.clone())?)
                as Box<dyn Transport>,
        )
    })
}

/// Sessions over TCP or iSER for one LUN.
struct IscsiSessions {
    connector: Connector,
    lun: u64,
    describe: String,
    describe_target: String,
    /// iSER: guest memory registrations shared by the sessions.
    memory: Option<Arc<GuestMemoryRegistration>>,
    /// iSER: bounce or split scattered buffers.
    scatter: ScatterPolicy,
}

impl IscsiSessions {
    fn login_error(&self, queue: usize, e: crate::iscsi::connect::ConnectError) -> TargetError {
        TargetError::Setup {
            context: format!("queue {queue}: cannot log in to {}", self.describe),
            source: Box::new(e),
        }
    }
}

impl SessionFactory for IscsiSessions {
    fn open(&self, queue: usize) -> Result<Session, TargetError> {
        self.open_avoiding(queue, None)
    }

    fn open_avoiding(&self, queue: usize, avoid: Option<&str>) -> Result<Session, TargetError> {
        self.connector
            .open_avoiding(queue, avoid)
            .map_err(|e| self.login_error(queue, e))
    }

    fn open_preferred(&self, queue: usize) -> Result<Session, TargetError> {
        self.connector
            .open_preferred(queue)
            .map_err(|e| self.login_error(queue, e))
    }

    fn preferred_portal(&self, queue: usize) -> Option<String> {
        self.connector.preferred_portal(queue).map(str::to_string)
    }

    fn probe(&self, portal: &str) -> bool {
        self.connector.probe(portal).is_ok()
    }

    fn lun(&self) -> u64 {
        self.lun
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn describe_target(&self) -> String {
        self.describe_target.clone()
    }

    fn update_memory(&self, mem: &Arc<crate::blk::buffer::GuestMemoryMmap>) {
        if let Some(r) = &self.memory {
            r.update(mem);
        }
    }

    fn max_transfer_bytes(&self) -> Option<u32> {
        self.memory
            .as_ref()
            .map(|_| crate::transport::iser::connection::MAX_COMMAND_DATA)
    }

    fn registered_runs(&self, iov: &[libc::iovec], runs: &mut Vec<u64>) -> bool {
        match &self.memory {
            Some(m) if self.scatter == ScatterPolicy::Split => m.registered_runs(iov, runs),
            _ => false,
        }
    }
}

/// `--read-only` on top of a LUN that allows writes.
struct ReadOnlyOverride {
    inner: ScsiLun,
    read_only: bool,
}

impl Target for ReadOnlyOverride {
    fn info(&self) -> crate::blk::target::DeviceInfo {
        let mut i = self.inner.info();
        i.read_only |= self.read_only;
        i
    }

    fn open_queue(
        &self,
        index: usize,
    ) -> Result<Box<dyn crate::blk::target::QueueTarget>, TargetError> {
        self.inner.open_queue(index)
    }

    fn update_memory(&self, mem: &std::sync::Arc<crate::blk::buffer::GuestMemoryMmap>) {
        self.inner.update_memory(mem)
    }

    fn set_notifier(&self, notifier: Arc<dyn crate::blk::target::DeviceNotifier>) {
        self.inner.set_notifier(notifier)
    }
}
