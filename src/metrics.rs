//! Counters in Prometheus text format, served on a loopback TCP port or a
//! unix socket, and read back by `vhost-iser stats`.
//!
//! The workers only touch atomics ([`QueueStats`], [`LatencyHistogram`]); the
//! metrics thread reads them when a client asks. Nothing here takes a lock
//! the data path also takes.
//!
//! Protocol: HTTP/1.0 `GET /metrics` (any path is accepted on the unix
//! socket). On the unix socket a client that sends nothing within 200 ms, or
//! shuts down its write side, gets the bare text without HTTP headers
//! (`nc -U PATH </dev/null`).

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{info, warn};
use thiserror::Error;

use crate::blk::request::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use crate::blk::target::BlockOp;
use crate::vhost::worker::QueueStats;

/// The build's git commit (`unknown` when built outside a git checkout).
pub const GIT_COMMIT: &str = env!("VHOST_ISER_GIT_COMMIT");

/// Upper bounds of the latency buckets in nanoseconds (1-2.5-5 per decade,
/// 2.5 µs to 25 s); a last, implicit bucket holds everything slower.
pub const LATENCY_BOUNDS_NS: [u64; 22] = [
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    25_000_000_000,
];

/// The `le` labels of [`LATENCY_BOUNDS_NS`], in seconds.
const LATENCY_LE: [&str; 22] = [
    "2.5e-06", "5e-06", "1e-05", "2.5e-05", "5e-05", "0.0001", "0.00025", "0.0005", "0.001",
    "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "25",
];

/// A counter with one writer (a queue's worker) and any number of readers.
///
/// The writer adds with a load and a store instead of an atomic
/// read-modify-write: on x86 a `lock` instruction is a full barrier that
/// waits for every store before it (a 4 KiB read's data among them), and a
/// worker updated seven counters per request. Readers see a value that is
/// never torn, at most a few updates old. Two writers would lose counts
/// (never memory safety): each queue's counters are written by its worker
/// only, under the worker's lock.
#[derive(Debug, Default)]
pub struct OwnedCounter(AtomicU64);

impl OwnedCounter {
    /// Adds `n` (the single writer only).
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// Subtracts `n` (the single writer only).
    #[inline]
    pub fn sub(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_sub(n),
            Ordering::Relaxed,
        );
    }

    /// The current value, from any thread.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A latency histogram with fixed buckets; lock-free, one writer (the
/// queue's worker) and any number of readers.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Per-bucket (not cumulative) counts; the last one is `+Inf`.
    buckets: [OwnedCounter; LATENCY_BOUNDS_NS.len() + 1],
    sum_ns: OwnedCounter,
    count: OwnedCounter,
}

impl LatencyHistogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_NS.partition_point(|&b| b < ns);
        self.buckets[i].add(1);
        self.sum_ns.add(ns);
        self.count.add(1);
    }

    /// Cumulative counts per bucket (the last is `+Inf`), sum in seconds, count.
    pub fn snapshot(&self) -> (Vec<u64>, f64, u64) {
        let mut acc = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                acc += b.get();
                acc
            })
            .collect();
        let sum = self.sum_ns.get() as f64 / 1e9;
        (cumulative, sum, self.count.get())
    }
}

/// The `op` label of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatOp {
    /// VIRTIO_BLK_T_IN.
    Read,
    /// VIRTIO_BLK_T_OUT.
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
    /// VIRTIO_BLK_T_GET_ID (answered by the backend itself).
    GetId,
}

impl StatOp {
    /// Every operation, in label order.
    pub const ALL: [StatOp; 6] = [
        StatOp::Read,
        StatOp::Write,
        StatOp::Flush,
        StatOp::Discard,
        StatOp::WriteZeroes,
        StatOp::GetId,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            StatOp::Read => "read",
            StatOp::Write => "write",
            StatOp::Flush => "flush",
            StatOp::Discard => "discard",
            StatOp::WriteZeroes => "write_zeroes",
            StatOp::GetId => "get_id",
        }
    }

    /// The label of a block request.
    pub fn of(op: &BlockOp) -> StatOp {
        match op {
            BlockOp::Read => StatOp::Read,
            BlockOp::Write { .. } => StatOp::Write,
            BlockOp::Flush => StatOp::Flush,
            BlockOp::Discard => StatOp::Discard,
            BlockOp::WriteZeroes { .. } => StatOp::WriteZeroes,
        }
    }
}

/// The `status` label values, indexed like the virtio-blk status byte.
pub const STATUS_NAMES: [&str; 3] = ["ok", "ioerr", "unsupp"];

/// Index into [`STATUS_NAMES`] of a virtio-blk status byte.
pub fn status_index(status: u8) -> usize {
    match status {
        VIRTIO_BLK_S_OK => 0,
        VIRTIO_BLK_S_IOERR => 1,
        _ => 2,
    }
}

/// What the worker keeps in a request's in-flight slot for the counters.
#[derive(Clone, Copy, Debug)]
pub struct StatStamp {
    /// The request's operation.
    pub op: StatOp,
    /// Data bytes (read and write).
    pub bytes: u64,
    /// When the request was handed to the target.
    pub started: std::time::Instant,
}

/// Successful reconnects of any queue's session to its target.
pub static RECONNECTS: AtomicU64 = AtomicU64::new(0);
/// Failed reconnect attempts.
pub static RECONNECT_FAILURES: AtomicU64 = AtomicU64::new(0);
/// Scattered reads and writes issued as one command per host-contiguous run
/// of their buffer (iSER, `VHOST_ISER_SCATTER=split`).
pub static SCATTER_SPLITS: AtomicU64 = AtomicU64::new(0);
/// Sessions that moved to another portal (failover) or back to their
/// preferred one (failback).
pub static PATH_CHANGES: AtomicU64 = AtomicU64::new(0);

/// The portal a queue's session uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuePath {
    /// "host:port".
    pub portal: String,
    /// Whether it is the queue's preferred portal (false: failed over).
    pub preferred: bool,
}

/// Current portal per queue, indexed by queue. Written only when a session
/// is opened or moves (never on the data path), read by the metrics thread.
static PATHS: Mutex<Vec<Option<QueuePath>>> = Mutex::new(Vec::new());

/// Records the portal queue `queue`'s session now uses.
pub fn set_queue_path(queue: usize, portal: &str, preferred: bool) {
    let mut paths = PATHS.lock().unwrap_or_else(|e| e.into_inner());
    if paths.len() <= queue {
        paths.resize(queue + 1, None);
    }
    paths[queue] = Some(QueuePath {
        portal: portal.to_string(),
        preferred,
    });
}

/// The portal of every queue that has a session, by queue.
pub fn queue_paths() -> Vec<(usize, QueuePath)> {
    let paths = PATHS.lock().unwrap_or_else(|e| e.into_inner());
    paths
        .iter()
        .enumerate()
        .filter_map(|(q, p)| Some((q, p.clone()?)))
        .collect()
}

/// Renders every metric in Prometheus text format (version 0.0.4).
pub fn render(queues: &[Arc<QueueStats>]) -> String {
    let mut s = String::with_capacity(4096 + queues.len() * 4096);
    let head = |s: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(
            s,
            "# HELP vhost_iser_{name} {help}\n# TYPE vhost_iser_{name} {kind}"
        );
    };
    head(
        &mut s,
        "build_info",
        "gauge",
        "Version and git commit of the running binary.",
    );
    let _ = writeln!(
        s,
        "vhost_iser_build_info{{version=\"{}\",commit=\"{GIT_COMMIT}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    head(
        &mut s,
        "requests_total",
        "counter",
        "Requests completed to the guest, by queue, operation and virtio-blk status.",
    );
    for (q, st) in queues.iter().enumerate() {
        for op in StatOp::ALL {
            for (si, status) in STATUS_NAMES.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "vhost_iser_requests_total{{queue=\"{q}\",op=\"{}\",status=\"{status}\"}} {}",
                    op.name(),
                    st.requests(op, si)
                );
            }
        }
    }
    head(
        &mut s,
        "bytes_total",
        "counter",
        "Data bytes of successful requests, by queue and direction (read: to the guest).",
    );
    for (q, st) in queues.iter().enumerate() {
        for (dir, v) in [("read", &st.read_bytes), ("write", &st.write_bytes)] {
            let _ = writeln!(
                s,
                "vhost_iser_bytes_total{{queue=\"{q}\",dir=\"{dir}\"}} {}",
                v.get()
            );
        }
    }
    head(
        &mut s,
        "in_flight",
        "gauge",
        "Requests handed to the target and not yet completed.",
    );
    for (q, st) in queues.iter().enumerate() {
        let _ = writeln!(
            s,
            "vhost_iser_in_flight{{queue=\"{q}\"}} {}",
            st.in_flight.get()
        );
    }
    head(
        &mut s,
        "request_latency_seconds",
        "histogram",
        "Time from taking a request off the ring to its completion by the target.",
    );
    for (q, st) in queues.iter().enumerate() {
        let (cum, sum, count) = st.latency.snapshot();
        for (le, c) in LATENCY_LE.iter().chain(["+Inf"].iter()).zip(&cum) {
            let _ = writeln!(
                s,
                "vhost_iser_request_latency_seconds_bucket{{queue=\"{q}\",le=\"{le}\"}} {c}"
            );
        }
        let _ = writeln!(
            s,
            "vhost_iser_request_latency_seconds_sum{{queue=\"{q}\"}} {sum}\n\
             vhost_iser_request_latency_seconds_count{{queue=\"{q}\"}} {count}"
        );
    }
    head(
        &mut s,
        "bad_requests_total",
        "counter",
        "Requests refused before the target (malformed, out of range); not in requests_total.",
    );
    let bad: u64 = queues.iter().map(|q| q.bad_requests.get()).sum();
    let _ = writeln!(s, "vhost_iser_bad_requests_total {bad}");
    head(
        &mut s,
        "reconnects_total",
        "counter",
        "Sessions re-established after a lost connection.",
    );
    let _ = writeln!(
        s,
        "vhost_iser_reconnects_total {}",
        RECONNECTS.load(Ordering::Relaxed)
    );
    head(
        &mut s,
        "reconnect_failures_total",
        "counter",
        "Reconnect attempts that failed.",
    );
    let _ = writeln!(
        s,
        "vhost_iser_reconnect_failures_total {}",
        RECONNECT_FAILURES.load(Ordering::Relaxed)
    );
    head(
        &mut s,
        "iser_commands_total",
        "counter",
        "SCSI commands sent over iSER (all connections).",
    );
    let _ = writeln!(
        s,
        "vhost_iser_iser_commands_total {}",
        crate::transport::iser::connection::commands_sent()
    );
    head(
        &mut s,
        "iser_copied_bytes_total",
        "counter",
        "Bytes the CPU copied through iSER bounce buffers: reason=\"scattered\" guest buffers \
         not contiguous in host memory, reason=\"unregistered\" buffers outside registered memory.",
    );
    let _ = writeln!(
        s,
        "vhost_iser_iser_copied_bytes_total{{reason=\"scattered\"}} {}\n\
         vhost_iser_iser_copied_bytes_total{{reason=\"unregistered\"}} {}",
        crate::transport::iser::bytes_copied(),
        crate::transport::iser::bytes_copied_unregistered()
    );
    head(
        &mut s,
        "scatter_splits_total",
        "counter",
        "Scattered requests issued as one command per contiguous run (iSER split policy).",
    );
    let _ = writeln!(
        s,
        "vhost_iser_scatter_splits_total {}",
        SCATTER_SPLITS.load(Ordering::Relaxed)
    );
    head(
        &mut s,
        "queue_path_info",
        "gauge",
        "The portal each queue's session uses (preferred=\"false\": failed over to another path).",
    );
    for (q, p) in queue_paths() {
        let _ = writeln!(
            s,
            "vhost_iser_queue_path_info{{queue=\"{q}\",portal=\"{}\",preferred=\"{}\"}} 1",
            p.portal, p.preferred
        );
    }
    head(
        &mut s,
        "path_changes_total",
        "counter",
        "Sessions moved to another portal (failover) or back to their preferred one (failback).",
    );
    let _ = writeln!(
        s,
        "vhost_iser_path_changes_total {}",
        PATH_CHANGES.load(Ordering::Relaxed)
    );
    s
}

/// Errors of the metrics endpoint and its client.
#[derive(Debug, Error)]
pub enum MetricsError {
    /// The `--metrics` value is not understood or not allowed.
    #[error("invalid metrics address {addr:?}: {reason}")]
    BadAddress {
        /// What was given.
        addr: String,
        /// Why it is refused.
        reason: String,
    },
    /// Binding, connecting, reading or writing failed.
    #[error("metrics endpoint {addr}: {what}")]
    Io {
        /// The endpoint.
        addr: String,
        /// The operation that failed.
        what: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The endpoint answered something else than metrics.
    #[error("metrics endpoint {addr}: {reason}")]
    BadResponse {
        /// The endpoint.
        addr: String,
        /// What was wrong.
        reason: String,
    },
}

/// Where metrics are served: `unix:PATH` or a loopback `IP:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    /// A unix socket.
    Unix(PathBuf),
    /// A loopback TCP address (port 0: any free port).
    Tcp(SocketAddr),
}

impl FromStr for MetricsAddr {
    type Err = MetricsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| MetricsError::BadAddress {
            addr: s.to_string(),
            reason: reason.to_string(),
        };
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(bad("expected unix:PATH"));
            }
            return Ok(MetricsAddr::Unix(PathBuf::from(p)));
        }
        let a: SocketAddr = s.parse().map_err(|_| {
            bad("expected unix:PATH, 127.0.0.1:PORT or [::1]:PORT (a numeric loopback address)")
        })?;
        if !a.ip().is_loopback() {
            return Err(bad(
                "only loopback addresses are allowed (the endpoint has no authentication); \
                 use 127.0.0.1:PORT or a unix socket and let a local agent forward it",
            ));
        }
        Ok(MetricsAddr::Tcp(a))
    }
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            MetricsAddr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

enum Listening {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// The metrics endpoint, served by a thread of its own.
pub struct MetricsServer {
    addr: MetricsAddr,
}

impl MetricsServer {
    /// Binds `addr` and serves [`render`] of `queues` from a new thread.
    /// A stale unix socket file is replaced; any other file there is an error.
    pub fn start(
        addr: &MetricsAddr,
        queues: Vec<Arc<QueueStats>>,
    ) -> Result<MetricsServer, MetricsError> {
        let io_err = |what: &str, source| MetricsError::Io {
            addr: addr.to_string(),
            what: what.to_string(),
            source,
        };
        let (listening, bound) = match addr {
            MetricsAddr::Unix(p) => {
                if let Ok(m) = std::fs::symlink_metadata(p) {
                    if !m.file_type().is_socket() {
                        return Err(MetricsError::BadAddress {
                            addr: addr.to_string(),
                            reason: "the path exists and is not a socket".into(),
                        });
                    }
                    std::fs::remove_file(p)
                        .map_err(|e| io_err("cannot remove the stale socket", e))?;
                }
                let l = UnixListener::bind(p).map_err(|e| io_err("cannot listen", e))?;
                (Listening::Unix(l), addr.clone())
            }
            MetricsAddr::Tcp(a) => {
                let l = TcpListener::bind(a).map_err(|e| io_err("cannot listen", e))?;
                let local = l.local_addr().map_err(|e| io_err("cannot listen", e))?;
                (Listening::Tcp(l), MetricsAddr::Tcp(local))
            }
        };
        info!("serving metrics on {bound}");
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(listening, &queues))
            .map_err(|e| io_err("cannot start the metrics thread", e))?;
        Ok(MetricsServer { addr: bound })
    }

    /// The bound address (the real port when 0 was asked for).
    pub fn addr(&self) -> &MetricsAddr {
        &self.addr
    }

    /// Removes the unix socket file, if any (at exit).
    pub fn remove_socket(&self) {
        if let MetricsAddr::Unix(p) = &self.addr {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Answers one client after another (they are local and quick; each has
/// short timeouts so a stuck one cannot hold the endpoint for long).
fn serve(listening: Listening, queues: &[Arc<QueueStats>]) {
    loop {
        let r = match &listening {
            Listening::Unix(l) => l.accept().and_then(|(s, _)| {
                s.set_read_timeout(Some(Duration::from_millis(200)))?;
                s.set_write_timeout(Some(Duration::from_secs(2)))?;
                answer(s, true, queues)
            }),
            Listening::Tcp(l) => l.accept().and_then(|(s, _)| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.set_write_timeout(Some(Duration::from_secs(2)))?;
                answer(s, false, queues)
            }),
        };
        if let Err(e) = r {
            warn!("metrics client: {e}");
            if e.kind() != io::ErrorKind::WouldBlock
                && e.kind() != io::ErrorKind::TimedOut
                && e.kind() != io::ErrorKind::BrokenPipe
                && e.kind() != io::ErrorKind::ConnectionReset
            {
                // accept() itself failing (EMFILE...): do not spin.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads the request head (up to 4 KiB): `None` if the client sent nothing.
fn read_head(s: &mut impl Read, bare_ok: bool) -> io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = match s.read(&mut chunk) {
            Ok(n) => n,
            Err(e)
                if bare_ok
                    && buf.is_empty()
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n")
            || buf.windows(2).any(|w| w == b"\n\n")
            || buf.len() >= 4096
        {
            break;
        }
    }
    if buf.is_empty() {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

fn answer<S: Read + Write>(mut s: S, unix: bool, queues: &[Arc<QueueStats>]) -> io::Result<()> {
    let Some(head) = read_head(&mut s, unix)? else {
        if unix {
            return s.write_all(render(queues).as_bytes());
        }
        return Ok(());
    };
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (code, body) = match method {
        "GET" | "HEAD" if unix || path == "/metrics" || path.starts_with("/metrics?") => {
            ("200 OK", render(queues))
        }
        "GET" | "HEAD" => ("404 Not Found", "only /metrics is served\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "only GET /metrics is served\n".to_string(),
        ),
    };
    let mut out = format!(
        "HTTP/1.0 {code}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        out.push_str(&body);
    }
    s.write_all(out.as_bytes())
}

/// Fetches the metrics text from a running vhost-iser.
pub fn fetch(addr: &MetricsAddr) -> Result<String, MetricsError> {
    let io_err = |what: &str, source| MetricsError::Io {
        addr: addr.to_string(),
        what: what.to_string(),
        source,
    };
    let request = b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n";
    let mut raw = Vec::new();
    let timeout = Some(Duration::from_secs(5));
    match addr {
        MetricsAddr::Unix(p) => {
            let mut s = UnixStream::connect(p).map_err(|e| io_err("cannot connect", e))?;
            s.set_read_timeout(timeout)
                .and_then(|_| s.write_all(request))
                .and_then(|_| s.read_to_end(&mut raw))
                .map_err(|e| io_err("cannot read the metrics", e))?;
        }
        MetricsAddr::Tcp(a) => {
            let mut s = TcpStream::connect_timeout(a, Duration::from_secs(5))
                .map_err(|e| io_err("cannot connect", e))?;
            s.set_read_timeout(timeout)
                .and_then(|_| s.write_all(request))
                .and_then(|_| s.read_to_end(&mut raw))
                .map_err(|e| io_err("cannot read the metrics", e))?;
        }
    }
    let bad = |reason: String| MetricsError::BadResponse {
        addr: addr.to_string(),
        reason,
    };
    let text = String::from_utf8(raw).map_err(|_| bad("the answer is not UTF-8".into()))?;
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(bad("no HTTP header in the answer".into()));
    };
    let status = head.lines().next().unwrap_or("");
    if !status.starts_with("HTTP/1.") || status.split_whitespace().nth(1) != Some("200") {
        return Err(bad(format!("answered {status:?}")));
    }
    Ok(body.to_string())
}

/// One sample of the text format.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name (with `_bucket`, `_sum`... suffixes).
    pub name: String,
    /// Labels in order.
    pub labels: Vec<(String, String)>,
    /// Value.
    pub value: f64,
}

impl Sample {
    /// The value of label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the text format as [`render`] writes it (comments skipped;
/// label values without escapes). Lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().ok()?,
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => {
                    let inner = rest.strip_suffix('}')?;
                    let labels = inner
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .filter_map(|p| {
                            let (k, v) = p.split_once("=\"")?;
                            Some((k.to_string(), v.trim_end_matches('"').to_string()))
                        })
                        .collect();
                    (n, labels)
                }
                None => (series, Vec::new()),
            };
            Some(Sample {
                name: name.to_string(),
                labels,
                value,
            })
        })
        .collect()
}

/// The smallest bucket bound (seconds) below which a `q` share of the
/// observations fall; `None` without observations.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
}

fn fmt_latency(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(s) if s.is_infinite() => ">25s".into(),
        Some(s) if s < 1e-3 => format!("<={:.1}us", s * 1e6),
        Some(s) if s < 1.0 => format!("<={:.1}ms", s * 1e3),
        Some(s) => format!("<={s:.1}s"),
    }
}

/// A table of the metrics for a person (`vhost-iser stats`).
pub fn table(samples: &[Sample]) -> String {
    let queues: Vec<String> = {
        let mut v: Vec<String> = samples
            .iter()
            .filter(|s| s.name == "vhost_iser_in_flight")
            .filter_map(|s| s.label("queue").map(str::to_string))
            .collect();
        v.sort_by_key(|q| q.parse::<u64>().unwrap_or(u64::MAX));
        v.dedup();
        v
    };
    let sum = |name: &str, filter: &dyn Fn(&Sample) -> bool| -> f64 {
        samples
            .iter()
            .filter(|s| s.name == name && filter(s))
            .map(|s| s.value)
            .sum()
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<6} {:>10} {:>10} {:>8} {:>8} {:>8} {:>10} {:>10} {:>6} {:>10} {:>10}",
        "queue",
        "reads",
        "writes",
        "flushes",
        "other",
        "errors",
        "read MiB",
        "write MiB",
        "busy",
        "p50",
        "p99"
    );
    // One row per queue (Some(queue)), then all queues together (None).
    let mut rows: Vec<Option<&str>> = queues.iter().map(|q| Some(q.as_str())).collect();
    if queues.len() > 1 {
        rows.push(None);
    }
    for sel in rows {
        let name = sel.unwrap_or("all");
        let inq = |s: &Sample| sel.is_none_or(|q| s.label("queue") == Some(q));
        let req = |op: Option<&str>, ok: Option<bool>| {
            sum("vhost_iser_requests_total", &|s: &Sample| {
                inq(s)
                    && op.is_none_or(|o| s.label("op") == Some(o))
                    && ok.is_none_or(|ok| (s.label("status") == Some("ok")) == ok)
            })
        };
        let all = req(None, None);
        let (r, w, f) = (
            req(Some("read"), None),
            req(Some("write"), None),
            req(Some("flush"), None),
        );
        let errors = req(None, Some(false));
        let bytes = |dir: &str| {
            sum("vhost_iser_bytes_total", &|s: &Sample| {
                inq(s) && s.label("dir") == Some(dir)
            }) / (1024.0 * 1024.0)
        };
        // Merge the buckets of the selected queues.
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        for s in samples
            .iter()
            .filter(|s| s.name == "vhost_iser_request_latency_seconds_bucket" && inq(s))
        {
            let le = match s.label("le") {
                Some("+Inf") => f64::INFINITY,
                Some(v) => v.parse().unwrap_or(f64::INFINITY),
                None => continue,
            };
            match buckets.iter_mut().find(|(b, _)| *b == le) {
                Some(b) => b.1 += s.value,
                None => buckets.push((le, s.value)),
            }
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let _ = writeln!(
            out,
            "{:<6} {:>10} {:>10} {:>8} {:>8} {:>8} {:>10.1} {:>10.1} {:>6} {:>10} {:>10}",
            name,
            r,
            w,
            f,
            all - r - w - f,
            errors,
            bytes("read"),
            bytes("write"),
            sum("vhost_iser_in_flight", &|s: &Sample| inq(s)),
            fmt_latency(quantile(&buckets, 0.5)),
            fmt_latency(quantile(&buckets, 0.99)),
        );
    }
    let one = |name: &str| sum(name, &|_: &Sample| true);
    let _ = writeln!(
        out,
        "bad requests: {}   reconnects: {} ({} failed attempts)",
        one("vhost_iser_bad_requests_total"),
        one("vhost_iser_reconnects_total"),
        one("vhost_iser_reconnect_failures_total"),
    );
    let paths: Vec<String> = samples
        .iter()
        .filter(|s| s.name == "vhost_iser_queue_path_info")
        .map(|s| {
            format!(
                "q{} {}{}",
                s.label("queue").unwrap_or("?"),
                s.label("portal").unwrap_or("?"),
                if s.label("preferred") == Some("false") {
                    " (failed over)"
                } else {
                    ""
                }
            )
        })
        .collect();
    if !paths.is_empty() {
        let _ = writeln!(
            out,
            "paths: {}   path changes: {}",
            paths.join(", "),
            one("vhost_iser_path_changes_total")
        );
    }
    if let Some(b) = samples.iter().find(|s| s.name == "vhost_iser_build_info") {
        let _ = writeln!(
            out,
            "version {} (git {})",
            b.label("version").unwrap_or("?"),
            b.label("commit").unwrap_or("?")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_bounded() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_nanos(2_500)); // on the first bound
        h.observe(Duration::from_micros(7));
        h.observe(Duration::from_secs(100)); // +Inf
        let (cum, sum, count) = h.snapshot();
        assert_eq!(cum.len(), LATENCY_BOUNDS_NS.len() + 1);
        assert_eq!(cum[0], 1);
        assert_eq!(cum[1], 1);
        assert_eq!(cum[2], 2);
        assert_eq!(cum[cum.len() - 2], 2);
        assert_eq!(cum[cum.len() - 1], 3);
        assert_eq!(count, 3);
        assert!((sum - 100.0000095).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn le_labels_match_the_bounds() {
        for (ns, le) in LATENCY_BOUNDS_NS.iter().zip(LATENCY_LE) {
            let s: f64 = le.parse().unwrap();
            assert!((s * 1e9 - *ns as f64).abs() < 0.5, "{le} vs {ns}");
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(
            "unix:/run/m.sock".parse::<MetricsAddr>().unwrap(),
            MetricsAddr::Unix("/run/m.sock".into())
        );
        assert!(matches!(
            "127.0.0.1:9100".parse::<MetricsAddr>().unwrap(),
            MetricsAddr::Tcp(_)
        ));
        assert!(matches!(
            "[::1]:9100".parse::<MetricsAddr>().unwrap(),
            MetricsAddr::Tcp(_)
        ));
        let e = "0.0.0.0:9100".parse::<MetricsAddr>().unwrap_err();
        assert!(e.to_string().contains("loopback"), "{e}");
        assert!("192.0.2.1:9100".parse::<MetricsAddr>().is_err());
        assert!("localhost:9100".parse::<MetricsAddr>().is_err());
        assert!("unix:".parse::<MetricsAddr>().is_err());
    }

    #[test]
    fn render_parses_back_and_tabulates() {
        let q = Arc::new(QueueStats::default());
        let t = std::time::Instant::now();
        for _ in 0..3 {
            q.record_submit();
            q.record_done(
                StatStamp {
                    op: StatOp::Write,
                    bytes: 4096,
                    started: t,
                },
                VIRTIO_BLK_S_OK,
                std::time::Instant::now(),
            );
        }
        q.record_submit();
        q.record_done(
            StatStamp {
                op: StatOp::Read,
                bytes: 512,
                started: t,
            },
            VIRTIO_BLK_S_IOERR,
            std::time::Instant::now(),
        );
        let text = render(&[q.clone(), Arc::new(QueueStats::default())]);
        let samples = parse(&text);
        let get = |name: &str, labels: &[(&str, &str)]| {
            samples
                .iter()
                .find(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(v)))
                .unwrap_or_else(|| panic!("{name} {labels:?} missing in\n{text}"))
                .value
        };
        let w = [("queue", "0"), ("op", "write"), ("status", "ok")];
        assert_eq!(get("vhost_iser_requests_total", &w), 3.0);
        let r = [("queue", "0"), ("op", "read"), ("status", "ioerr")];
        assert_eq!(get("vhost_iser_requests_total", &r), 1.0);
        let wb = [("queue", "0"), ("dir", "write")];
        assert_eq!(get("vhost_iser_bytes_total", &wb), 12288.0);
        // The iSER counters are there (process-wide; no iSER connection in unit tests).
        assert_eq!(get("vhost_iser_iser_commands_total", &[]), 0.0);
        let sc = [("reason", "scattered")];
        assert_eq!(get("vhost_iser_iser_copied_bytes_total", &sc), 0.0);
        get(
            "vhost_iser_iser_copied_bytes_total",
            &[("reason", "unregistered")],
        );
        get("vhost_iser_scatter_splits_total", &[]);
        // Failed requests move no bytes.
        let rb = [("queue", "0"), ("dir", "read")];
        assert_eq!(get("vhost_iser_bytes_total", &rb), 0.0);
        assert_eq!(get("vhost_iser_in_flight", &[("queue", "0")]), 0.0);
        let inf = [("queue", "0"), ("le", "+Inf")];
        assert_eq!(get("vhost_iser_request_latency_seconds_bucket", &inf), 4.0);
        assert_eq!(
            get(
                "vhost_iser_request_latency_seconds_count",
                &[("queue", "0")]
            ),
            4.0
        );
        let table = table(&samples);
        let row0 = table.lines().find(|l| l.starts_with("0 ")).expect(&table);
        let cols: Vec<&str> = row0.split_whitespace().collect();
        assert_eq!(&cols[..7], ["0", "1", "3", "0", "0", "1", "0.0"], "{table}");
        assert!(table.lines().any(|l| l.starts_with("all ")), "{table}");
    }

    #[test]
    fn queue_paths_render_and_tabulate() {
        set_queue_path(41, "10.0.1.2:3260", true);
        set_queue_path(42, "[fd00::2]:3260", false);
        let samples = parse(&render(&[]));
        let path = |q: &str| {
            samples
                .iter()
                .find(|s| s.name == "vhost_iser_queue_path_info" && s.label("queue") == Some(q))
                .map(|s| {
                    (
                        s.label("portal").map(str::to_string),
                        s.label("preferred").map(str::to_string),
                    )
                })
        };
        assert_eq!(
            path("41"),
            Some((Some("10.0.1.2:3260".into()), Some("true".into())))
        );
        assert_eq!(
            path("42"),
            Some((Some("[fd00::2]:3260".into()), Some("false".into())))
        );
        let t = table(&samples);
        assert!(t.contains("q42 [fd00::2]:3260 (failed over)"), "{t}");
    }
}
