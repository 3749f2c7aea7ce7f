//! Command line and config file: both fill the same [`ServeArgs`]; the
//! command line wins, then defaults apply and [`Options`] comes out, from
//! which [`OpenOptions`] and [`DeviceOptions`] are built.
//!
//! The config file is TOML with the long option names as keys (`socket`,
//! `queue-size`, `portal = [..]` ...). Relative paths in it are relative to
//! the file's directory. Secrets never go in it: only the names of files
//! holding them (`chap-secret-file`, `target-chap-secret-file`).

use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

use crate::iscsi::connect::PathPolicy;
use crate::iscsi::params::{DigestKind, ParamOffer};
use crate::iscsi::session::SessionTimeouts;
use crate::metrics::MetricsAddr;
use crate::open::OpenOptions;
use crate::vhost::backend::DeviceOptions;

/// `--version`: the crate version and the git commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("VHOST_ISER_GIT_COMMIT"),
    ")"
);

const EXAMPLES: &str = "\
Examples:
  A RAM disk (tests, demos):
    vhost-iser --socket /run/vm1-disk.sock --target mem:1G

  An iSCSI LUN over TCP, CHAP secret read from a file (never on the command line):
    vhost-iser --socket /run/vm1-disk.sock \\
        --target iscsi://vm1@192.0.2.10/iqn.2003-01.org.example:store/0 \\
        --chap-secret-file /etc/vhost-iser/vm1.secret

  An iSCSI LUN over iSER (RDMA), 4 queues, metrics on a unix socket:
    vhost-iser --socket /run/vm1-disk.sock --queues 4 \\
        --target iser://192.0.2.10/iqn.2003-01.org.example:store/1 \\
        --metrics unix:/run/vm1-disk.metrics

  Everything from a file (command-line options override it):
    vhost-iser --config /etc/vhost-iser/vm1.toml

  Counters of a running instance:
    vhost-iser stats --metrics unix:/run/vm1-disk.metrics

  The targets a portal offers (one \"HOST:PORT,TPGT NAME\" line each):
    vhost-iser discover --portal 192.0.2.10

  The QEMU side (guest RAM must be shared):
    qemu-system-x86_64 ... \\
        -object memory-backend-memfd,id=mem,size=4G,share=on -numa node,memdev=mem \\
        -chardev socket,id=disk0,path=/run/vm1-disk.sock \\
        -device vhost-user-blk-pci,chardev=disk0,num-queues=4";

const CONFIG_HELP: &str = "\
Read options from a TOML file. Keys are the long option names:
socket, target, queues, threads, queue-size, read-only, serial, log-level,
initiator-name, portal (an array), path-policy, chap-user, chap-secret-file, target-chap-user,
target-chap-secret-file, digests, chap-sha256, timeouts, metrics.
Options on the command line override the file. Relative paths are relative to the
file's directory. Secrets are refused: name a file holding them (chap-secret-file).

Example:
  socket = \"/run/vm1-disk.sock\"
  target = \"iscsi://vm1@192.0.2.10/iqn.2003-01.org.example:store/0\"
  portal = [\"192.0.2.11:3260\"]
  path-policy = \"round-robin\"
  chap-secret-file = \"vm1.secret\"
  queues = 4
  metrics = \"unix:/run/vm1-disk.metrics\"";

const MAN_DESCRIPTION: &str = "\
vhost-iser serves one virtual machine's disk as a vhost-user-blk device: QEMU (or any \
vhost-user frontend, such as libblkio) connects to the unix socket given with --socket, and \
every virtio-blk request of the guest becomes an iSCSI command to a remote target, over iSER \
(RDMA) or TCP. Each virtqueue has its own worker thread and its own iSCSI session; a lost \
connection is re-established.

Multipath: the target's portals (the URL's, then each --portal) are paths to the same LUN. \
With --path-policy active-standby (the default) every queue's session runs on the first \
portal; with round-robin queue i prefers portal i mod n, spreading the sessions over the \
paths. When a path fails, its sessions log in again on another portal and re-issue their \
unfinished commands in order; I/O continues. A session away from its preferred portal \
probes it every 5 s (a bare connect, off the data path); when it answers, the session \
holds new commands, lets the ones in flight finish (at most 5 s, after which they are \
re-issued), logs out and logs in on the preferred portal again. If that login fails, the \
session returns to the other portals at once and the probe interval doubles (up to 5 min).

A mem:SIZE target keeps the disk in RAM, for tests and demos; a null:SIZE target returns \
zeroes and drops writes (like QEMU's null-co), for measuring the vhost layer alone.

Secrets are read from files (--chap-secret-file) or the environment, never from the \
command line or the config file.";

/// Extra manual page sections, as (title, body) with body lines kept as written.
const MAN_SECTIONS: &[(&str, &str)] = &[
    (
        "SUBCOMMANDS",
        "vhost-iser stats --metrics ADDR [--raw]
    Prints the counters of a running instance (its --metrics address) as a
    table; --raw prints the Prometheus text as received.

vhost-iser discover --portal HOST[:PORT] [--initiator-name IQN]
        [--chap-user NAME] [--chap-secret-file FILE] [--chap-sha256]
        [--target-chap-user NAME] [--target-chap-secret-file FILE]
    Logs in a discovery session at the portal (TCP, port 3260 by default),
    asks SendTargets=All and prints one line per portal of each target the
    initiator may use: HOST:PORT,TPGT TARGET-NAME. CHAP secrets come from
    files or the environment as for serving. Exit status 1 when the portal
    cannot be reached, refuses the login or answers nonsense; 2 for a
    malformed --portal.",
    ),
    (
        "CONFIGURATION FILE",
        "--config FILE reads TOML; the keys are the long option names:
  socket, target, queues, threads, queue-size, read-only, serial, log-level,
  initiator-name, portal (an array of \"host:port\"), path-policy, chap-user,
  chap-secret-file, target-chap-user, target-chap-secret-file, digests,
  chap-sha256, timeouts, metrics.
Options on the command line override the file (--portal replaces the
file's list; --read-only=false undoes read-only = true). Relative paths are
relative to the file's directory. An unknown key, a value of the wrong type
or out of range is an error naming the file, the line and the key. The keys
chap-secret and target-chap-secret are refused: write the secret to a file
only the service can read and name it with chap-secret-file.",
    ),
    (
        "METRICS",
        "--metrics unix:PATH or --metrics 127.0.0.1:PORT (loopback only; [::1]
works too) serves the counters in Prometheus text format. TCP speaks
HTTP/1.0: GET /metrics. The unix socket answers an HTTP request on any path,
and a client that sends nothing (or shuts down its write side) within
200 ms gets the bare text (nc -U PATH </dev/null).

  vhost_iser_requests_total{queue,op,status}   requests answered; op: read,
      write, flush, discard, write_zeroes, get_id; status: ok, ioerr, unsupp
  vhost_iser_bytes_total{queue,dir}            dir: read, write (successful
      requests only)
  vhost_iser_in_flight{queue}                  requests at the target now
  vhost_iser_request_latency_seconds{queue}    histogram (_bucket{le},
      _sum, _count), from taking a request off the ring to its completion;
      buckets 2.5 us to 25 s, 1-2.5-5 per decade
  vhost_iser_bad_requests_total                requests refused before the
      target (malformed, out of range); not in requests_total
  vhost_iser_reconnects_total                  sessions re-established
  vhost_iser_reconnect_failures_total          failed reconnect attempts
  vhost_iser_queue_path_info{queue,portal,preferred}  the portal each
      queue's session uses; preferred=\"false\" while failed over
  vhost_iser_path_changes_total                sessions moved to another
      portal (failover) or back to their preferred one (failback)
  vhost_iser_iser_commands_total               SCSI commands sent over iSER
  vhost_iser_iser_copied_bytes_total{reason}   bytes copied through iSER
      bounce buffers; reason: scattered (guest buffer not contiguous in host
      memory), unregistered (outside registered memory)
  vhost_iser_scatter_splits_total              scattered requests sent as
      one command per contiguous run (VHOST_ISER_SCATTER=split)
  vhost_iser_build_info{version,commit}        always 1",
    ),
    (
        "LOGGING",
        "One line per event on standard error:
  TIMESTAMP LEVEL module: message
e.g. 2026-11-25T15:38:32.123Z INFO  vhost_iser::iscsi::connect: logged in to ...
Session events (login, connection lost, reconnect) are logged at info or
above. Path changes read e.g.
  queue 1: path 10.0.1.2:3260 down, continuing on 10.0.2.2:3260
  queue 1: back on preferred path 10.0.1.2:3260 RUST_LOG (env_logger syntax) overrides --log-level.",
    ),
    (
        "ENVIRONMENT",
        "VHOST_ISER_CHAP_SECRET           the CHAP secret, when no --chap-secret-file
VHOST_ISER_TARGET_CHAP_SECRET    the mutual CHAP secret, when no --target-chap-secret-file
VHOST_ISER_SCATTER               iSER: bounce (default) or split; how a request whose
                                 guest buffer is scattered in host memory is sent:
                                 one command through a registered bounce buffer
                                 (copied), or one command per contiguous run when
                                 every run is whole blocks (no copy, more commands)
VHOST_ISER_POLL_US               iSER: microseconds to poll the completion queue
                                 after a completion before sleeping (default 20)
VHOST_ISER_RING_POLL_US          microseconds a worker watches its avail ring after
                                 a batch before sleeping (default 20 for the mem: and
                                 null: targets, 0 for network targets)
VHOST_ISER_MID_BATCH             mem: and null: targets: hand completions back to the
                                 guest every N requests of a deep batch (0: only at
                                 the end of the batch). Default: 0 while at least as
                                 many worker threads run as there are CPUs, else 8;
                                 a worker with its own thread tries 1, 8 and 32 and
                                 keeps the one that takes the most requests/s
VHOST_ISER_RECEIVE_BATCH         iSCSI/TCP: most read responses a queue waits for
                                 before it wakes, at depth (default 16; 1: wake on
                                 every response); see DATA PATH
RUST_LOG                         log filter (overrides --log-level)",
    ),
    (
        "DEVICE CHANGES",
        "At start-up REPORT LUNS (to LUN 0) checks that the URL's LUN exists; if
not, vhost-iser exits with status 1 and one line naming the target, the
portal and the LUNs it has. A LUN that grows or shrinks while served
answers a command with UNIT ATTENTION 2A/09 (capacity data has changed):
vhost-iser re-reads the capacity, serves the new size, and when the
front-end set up the back-end request channel (QEMU does:
VHOST_USER_PROTOCOL_F_BACKEND_REQ) sends it a config-change notice, so the
guest sees the new size at once (Linux logs \"detected capacity change\").
Without that channel the guest sees it when it next reads the config space.",
    ),
    (
        "DATA PATH",
        "Over TCP, data moves between the socket and guest memory with readv and
writev, no copy. One readv takes the current PDU and, ahead, the Data-In
PDUs of the reads in flight in the order they were sent (each straight into
its guest buffer); a guess that turns out wrong is copied out and framed
again. With many commands in flight a queue sets SO_RCVLOWAT to the bytes
of the next few reads' responses, so it wakes once per batch of responses
instead of once per response (VHOST_ISER_RECEIVE_BATCH caps the batch; 1
turns this off). If the responses come back short (failed reads), the
queue's 100 ms timer takes what arrived and coalescing pauses for 1 s.",
    ),
    (
        "SIGNALS",
        "SIGINT or SIGTERM: stop taking requests, wait up to 30 s for the ones in
flight, remove the sockets and exit.",
    ),
    (
        "EXIT STATUS",
        "0 after a clean shutdown; 1 when the target cannot be reached or the
device fails, or requests were still in flight at shutdown; 2 for invalid
options, config file or target URL.",
    ),
];

/// Roff for a block kept as written (no filling, no hyphenation).
fn roff_block(title: &str, body: &str) -> String {
    let mut s = format!(".SH \"{title}\"\n.nf\n");
    for line in body.lines() {
        let esc = line.replace('\\', "\\e").replace('-', "\\-");
        if esc.starts_with('.') || esc.starts_with('\'') {
            s.push_str("\\&");
        }
        s.push_str(&esc);
        s.push('\n');
    }
    s.push_str(".fi\n");
    s
}

/// Whether `target` names a network target (iSCSI over TCP or iSER), whose
/// workers mostly wait on the network.
fn is_network_target(target: &str) -> bool {
    target.starts_with("iscsi://") || target.starts_with("iser://")
}

/// Worker threads when `--threads` is not given. RAM and null targets: one
/// per queue, as their work is the copy itself and spreads over the CPUs.
/// Network targets: one per two queues. Their workers mostly wait on
/// sockets, one thread drives several sessions through its epoll, and a
/// thread per queue mostly adds wake-ups and context switches that compete
/// with the guest's vCPUs. Measured on a 2-CPU host (bench/RESULTS.md, the
/// guest fio comparison): a TCG guest on two queues through tgtd got 0.77x qsd's 4 KiB
/// IOPS at 1.18x its CPU per I/O with two threads, 1.10x at 0.69x with one;
/// the loadgen on four sessions was as fast on two threads as on four (QD1
/// and QD32), and 15 % slower at QD1 on one.
pub fn default_threads(queues: u16, network_target: bool) -> u16 {
    if network_target {
        queues.div_ceil(2)
    } else {
        queues
    }
}

/// The manual page (roff), as committed in man/vhost-iser.1. Carries the
/// crate version only, so it does not change with every commit.
pub fn man_page() -> std::io::Result<Vec<u8>> {
    let cmd = Cli::command()
        .version(env!("CARGO_PKG_VERSION"))
        .long_about(MAN_DESCRIPTION);
    let man = clap_mangen::Man::new(cmd);
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    for (title, body) in MAN_SECTIONS {
        out.extend_from_slice(roff_block(title, body).as_bytes());
    }
    out.extend_from_slice(
        roff_block("EXAMPLES", EXAMPLES.trim_start_matches("Examples:\n")).as_bytes(),
    );
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// Serve a virtual machine's disk from a remote iSCSI LUN (over iSER or TCP)
/// or from RAM, as a vhost-user-blk device for QEMU.
#[derive(Parser, Debug)]
#[command(
    name = "vhost-iser",
    version = VERSION,
    long_about = None,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Something else than serving a disk.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Serving options.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the counters of a running vhost-iser as a table.
    Stats {
        /// Where that instance serves metrics (its --metrics).
        #[arg(long, value_name = "ADDR")]
        metrics: MetricsAddr,
        /// Print the Prometheus text as received.
        #[arg(long)]
        raw: bool,
    },
    /// Ask a portal which targets it offers (an iSCSI discovery session,
    /// SendTargets=All) and print one "HOST:PORT,TPGT TARGET-NAME" line per
    /// portal of each target.
    Discover(DiscoverArgs),
    /// Print the manual page (roff) on standard output.
    #[command(hide = true)]
    Man,
}

/// `vhost-iser discover` options.
#[derive(Args, Clone, Debug, Default, PartialEq)]
pub struct DiscoverArgs {
    /// The portal to ask (IPv6 in brackets; port 3260 when not given).
    #[arg(long, value_name = "HOST[:PORT]")]
    pub portal: String,

    /// Our iSCSI initiator name [default: iqn.2026-11.io.vhost-iser:HOSTNAME].
    #[arg(long, value_name = "IQN")]
    pub initiator_name: Option<String>,

    /// CHAP user name for the discovery session.
    #[arg(long, value_name = "NAME", help_heading = "Authentication")]
    pub chap_user: Option<String>,

    /// File holding the CHAP secret [default: $VHOST_ISER_CHAP_SECRET]. Never on the command line.
    #[arg(long, value_name = "FILE", help_heading = "Authentication")]
    pub chap_secret_file: Option<PathBuf>,

    /// Offer CHAP with SHA-256 before MD5.
    #[arg(long, help_heading = "Authentication")]
    pub chap_sha256: bool,

    /// Mutual CHAP: the name the target must present.
    #[arg(long, value_name = "NAME", help_heading = "Authentication")]
    pub target_chap_user: Option<String>,

    /// Mutual CHAP: file holding the target's secret [default: $VHOST_ISER_TARGET_CHAP_SECRET].
    #[arg(long, value_name = "FILE", help_heading = "Authentication")]
    pub target_chap_secret_file: Option<PathBuf>,
}

impl DiscoverArgs {
    /// The login options of the discovery session.
    pub fn open_options(&self) -> OpenOptions {
        OpenOptions {
            initiator_name: self.initiator_name.clone(),
            chap_user: self.chap_user.clone(),
            chap_secret_file: self.chap_secret_file.clone(),
            target_chap_user: self.target_chap_user.clone(),
            target_chap_secret_file: self.target_chap_secret_file.clone(),
            chap_sha256: self.chap_sha256,
            ..OpenOptions::default()
        }
    }
}

/// CRC32C digests to ask for at login.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Digests {
    /// No digests.
    #[default]
    None,
    /// Header digest only.
    Header,
    /// Data digest only.
    Data,
    /// Header and data digests.
    Both,
}

/// The serving options, from the command line or a config file; `None` is
/// "not given".
#[derive(Args, Clone, Debug, Default, PartialEq)]
pub struct ServeArgs {
    /// Read options from a TOML file (see --help for the keys).
    #[arg(long, value_name = "FILE", long_help = CONFIG_HELP)]
    pub config: Option<PathBuf>,

    /// Unix socket QEMU connects to (created; a stale file is replaced).
    #[arg(long, value_name = "PATH", help_heading = "Device")]
    pub socket: Option<PathBuf>,

    /// Number of virtqueues, each with its own iSCSI session [default: 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64), help_heading = "Device")]
    pub queues: Option<u16>,

    /// Worker threads; the queues are spread over them round robin
    /// [default: one per queue for mem: and null:, one per two queues for
    /// iscsi:// and iser://].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64), help_heading = "Device")]
    pub threads: Option<u16>,

    /// Largest virtqueue size the frontend may choose, a power of two [default: 256].
    #[arg(long, value_name = "N", help_heading = "Device")]
    pub queue_size: Option<u16>,

    /// Expose the disk read-only (--read-only=false undoes it from a config file).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", hide_possible_values = true,
          help_heading = "Device")]
    pub read_only: Option<bool>,

    /// Serial number reported to the guest [default: the target's].
    #[arg(long, value_name = "S", help_heading = "Device")]
    pub serial: Option<String>,

    /// Target: mem:SIZE, null:SIZE, iscsi://[user@]host[:port]/iqn/lun or iser://[user@]host[:port]/iqn/lun.
    #[arg(long, value_name = "URL", help_heading = "Target")]
    pub target: Option<String>,

    /// Another portal of the same target (host:port), a path after the URL's; repeatable.
    #[arg(long = "portal", value_name = "HOST:PORT", help_heading = "Target")]
    pub portals: Vec<String>,

    /// How the queues' sessions use the portals: active-standby (all on the first, the
    /// others take over when it fails) or round-robin (queue i prefers portal i mod n);
    /// a session moves back to its preferred portal when it answers again [default: active-standby].
    #[arg(long, value_name = "POLICY", value_parser = parse_path_policy, help_heading = "Target")]
    pub path_policy: Option<PathPolicy>,

    /// Our iSCSI initiator name [default: iqn.2026-11.io.vhost-iser:HOSTNAME].
    #[arg(long, value_name = "IQN", help_heading = "Target")]
    pub initiator_name: Option<String>,

    /// CRC32C digests to ask for [default: none].
    #[arg(long, value_name = "WHICH", help_heading = "Target")]
    pub digests: Option<Digests>,

    /// Session timers in seconds: nop (keepalive interval), nop_timeout, command
    /// (then ABORT TASK), tmf (then LUN RESET, then drop), replacement (how long
    /// commands wait for a new session) [default: nop=5,nop_timeout=5,command=30,tmf=10,replacement=20].
    #[arg(long, value_name = "SPEC", value_parser = parse_timeouts, help_heading = "Target")]
    pub timeouts: Option<SessionTimeouts>,

    /// CHAP user name (or user@ in the URL).
    #[arg(long, value_name = "NAME", help_heading = "Authentication")]
    pub chap_user: Option<String>,

    /// File holding the CHAP secret [default: $VHOST_ISER_CHAP_SECRET]. Never on the command line.
    #[arg(long, value_name = "FILE", help_heading = "Authentication")]
    pub chap_secret_file: Option<PathBuf>,

    /// Offer CHAP with SHA-256 before MD5 (for targets that read CHAP_A=7 as SHA-256: LIO).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", hide_possible_values = true,
          help_heading = "Authentication")]
    pub chap_sha256: Option<bool>,

    /// Mutual CHAP: the name the target must present.
    #[arg(long, value_name = "NAME", help_heading = "Authentication")]
    pub target_chap_user: Option<String>,

    /// Mutual CHAP: file holding the target's secret [default: $VHOST_ISER_TARGET_CHAP_SECRET].
    #[arg(long, value_name = "FILE", help_heading = "Authentication")]
    pub target_chap_secret_file: Option<PathBuf>,

    /// Log level: error, warn, info, debug or trace; RUST_LOG overrides [default: info].
    #[arg(long, value_name = "LEVEL", help_heading = "Operation")]
    pub log_level: Option<log::LevelFilter>,

    /// Serve Prometheus metrics on unix:PATH or 127.0.0.1:PORT (loopback only).
    #[arg(long, value_name = "ADDR", help_heading = "Operation")]
    pub metrics: Option<MetricsAddr>,
}

/// The effective options, after the file, the command line and the defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// vhost-user socket.
    pub socket: PathBuf,
    /// Target URL.
    pub target: String,
    /// Number of queues.
    pub queues: u16,
    /// Worker threads (at most `queues`).
    pub threads: u16,
    /// Largest queue size.
    pub queue_size: u16,
    /// Read-only device.
    pub read_only: bool,
    /// Serial override.
    pub serial: Option<String>,
    /// Log level.
    pub log_level: log::LevelFilter,
    /// Initiator name override.
    pub initiator_name: Option<String>,
    /// Extra portals.
    pub portals: Vec<String>,
    /// Which portal each queue prefers.
    pub path_policy: PathPolicy,
    /// CHAP user.
    pub chap_user: Option<String>,
    /// CHAP secret file.
    pub chap_secret_file: Option<PathBuf>,
    /// Mutual CHAP user.
    pub target_chap_user: Option<String>,
    /// Mutual CHAP secret file.
    pub target_chap_secret_file: Option<PathBuf>,
    /// Digests to ask for.
    pub digests: Digests,
    /// Offer CHAP SHA-256 first.
    pub chap_sha256: bool,
    /// Session timers (None: defaults or $VHOST_ISER_TIMEOUTS).
    pub timeouts: Option<SessionTimeouts>,
    /// Metrics endpoint.
    pub metrics: Option<MetricsAddr>,
}

/// Errors in the options.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read the config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A key of the config file is unknown, malformed or has a bad value.
    #[error("{path}:{line}: {}{message}", key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The key, when known.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A required option is missing from both the command line and the file.
    #[error("missing --{0} (or `{0}` in the config file)")]
    Missing(&'static str),
}

/// Every key the config file accepts.
pub const KEYS: [&str; 19] = [
    "socket",
    "target",
    "queues",
    "threads",
    "queue-size",
    "read-only",
    "serial",
    "log-level",
    "initiator-name",
    "portal",
    "path-policy",
    "chap-user",
    "chap-secret-file",
    "target-chap-user",
    "target-chap-secret-file",
    "digests",
    "chap-sha256",
    "timeouts",
    "metrics",
];

/// The file as written (values checked afterwards, with their spans).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    socket: Option<PathBuf>,
    target: Option<String>,
    queues: Option<Spanned<i64>>,
    threads: Option<Spanned<i64>>,
    queue_size: Option<Spanned<i64>>,
    read_only: Option<bool>,
    serial: Option<String>,
    log_level: Option<Spanned<String>>,
    initiator_name: Option<String>,
    portal: Option<Vec<String>>,
    path_policy: Option<Spanned<String>>,
    chap_user: Option<String>,
    chap_secret_file: Option<PathBuf>,
    target_chap_user: Option<String>,
    target_chap_secret_file: Option<PathBuf>,
    digests: Option<Spanned<String>>,
    chap_sha256: Option<bool>,
    timeouts: Option<Spanned<String>>,
    metrics: Option<Spanned<String>>,
    // Refused with a message of their own.
    chap_secret: Option<Spanned<toml::Value>>,
    target_chap_secret: Option<Spanned<toml::Value>>,
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The key assigned on the line holding `offset`, or on the nearest line
/// above it that starts an assignment (multi-line arrays); none past a
/// table header.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let line = line_of(text, offset);
    let lines: Vec<&str> = text.lines().take(line).collect();
    for l in lines.iter().rev() {
        let t = l.trim_start();
        if t.starts_with('[') && !t.contains('=') {
            return None;
        }
        let Some((k, _)) = t.split_once('=') else {
            continue;
        };
        let k = k.trim().trim_matches('"');
        if !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Some(k.to_string());
        }
    }
    None
}

/// Parses a config file's text; `path` names it in messages and anchors
/// its relative paths.
pub fn parse_file(text: &str, path: &Path) -> Result<ServeArgs, ConfigError> {
    let invalid = |line: usize, key: Option<&str>, message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        line,
        key: key.map(str::to_string),
        message,
    };
    let f: FileConfig = toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        let line = line_of(text, offset);
        let msg = e
            .message()
            .trim_end()
            .replace("expected i64", "expected an integer");
        if let Some(rest) = msg.strip_prefix("unknown field `") {
            let key = rest.split('`').next().unwrap_or("");
            let alt = key.replace('_', "-");
            let hint = if alt != key && KEYS.contains(&alt.as_str()) {
                format!("unknown key; did you mean `{alt}`?")
            } else {
                format!("unknown key (known keys: {})", KEYS.join(", "))
            };
            return invalid(line, Some(key), hint);
        }
        invalid(line, key_at(text, offset).as_deref(), msg)
    })?;
    let at = |span: std::ops::Range<usize>| line_of(text, span.start);
    for (key, v) in [
        ("chap-secret", &f.chap_secret),
        ("target-chap-secret", &f.target_chap_secret),
    ] {
        if let Some(v) = v {
            return Err(invalid(
                at(v.span()),
                Some(key),
                format!(
                    "secrets are not accepted in the config file; write the secret to a file \
                     only this service can read and name it with `{key}-file`"
                ),
            ));
        }
    }
    let base = path.parent().unwrap_or(Path::new(""));
    let rel = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
    let ranged = |key: &str, v: &Option<Spanned<i64>>, ok: &dyn Fn(i64) -> bool, what: &str| {
        v.as_ref()
            .map(|v| {
                let n = *v.get_ref();
                if ok(n) {
                    Ok(n as u16)
                } else {
                    Err(invalid(at(v.span()), Some(key), format!("{what}, got {n}")))
                }
            })
            .transpose()
    };
    let queues = ranged(
        "queues",
        &f.queues,
        &|n| (1..=64).contains(&n),
        "must be between 1 and 64",
    )?;
    let threads = ranged(
        "threads",
        &f.threads,
        &|n| (1..=64).contains(&n),
        "must be between 1 and 64",
    )?;
    let queue_size = ranged(
        "queue-size",
        &f.queue_size,
        &|n| (4..=32768).contains(&n) && (n as u64).is_power_of_two(),
        "must be a power of two between 4 and 32768",
    )?;
    let log_level = f
        .log_level
        .map(|v| {
            v.get_ref().parse::<log::LevelFilter>().map_err(|_| {
                invalid(
                    at(v.span()),
                    Some("log-level"),
                    format!(
                        "expected off, error, warn, info, debug or trace, got {:?}",
                        v.get_ref()
                    ),
                )
            })
        })
        .transpose()?;
    let digests = f
        .digests
        .map(|v| {
            Digests::from_str(v.get_ref(), false).map_err(|_| {
                invalid(
                    at(v.span()),
                    Some("digests"),
                    format!("expected none, header, data or both, got {:?}", v.get_ref()),
                )
            })
        })
        .transpose()?;
    let path_policy = f
        .path_policy
        .map(|v| {
            v.get_ref()
                .parse::<PathPolicy>()
                .map_err(|e| invalid(at(v.span()), Some("path-policy"), e))
        })
        .transpose()?;
    let timeouts = f
        .timeouts
        .map(|v| {
            SessionTimeouts::parse(v.get_ref())
                .map_err(|e| invalid(at(v.span()), Some("timeouts"), e))
        })
        .transpose()?;
    let metrics = f
        .metrics
        .map(|v| {
            let a = v
                .get_ref()
                .parse::<MetricsAddr>()
                .map_err(|e| invalid(at(v.span()), Some("metrics"), e.to_string()))?;
            Ok(match a {
                MetricsAddr::Unix(p) => MetricsAddr::Unix(rel(p)),
                tcp => tcp,
            })
        })
        .transpose()?;
    Ok(ServeArgs {
        config: None,
        socket: f.socket.map(rel),
        queues,
        threads,
        queue_size,
        read_only: f.read_only,
        serial: f.serial,
        target: f.target,
        portals: f.portal.unwrap_or_default(),
        path_policy,
        initiator_name: f.initiator_name,
        digests,
        chap_user: f.chap_user,
        chap_secret_file: f.chap_secret_file.map(rel),
        chap_sha256: f.chap_sha256,
        timeouts,
        target_chap_user: f.target_chap_user,
        target_chap_secret_file: f.target_chap_secret_file.map(rel),
        log_level,
        metrics,
    })
}

fn parse_timeouts(s: &str) -> Result<SessionTimeouts, String> {
    SessionTimeouts::parse(s)
}

fn parse_path_policy(s: &str) -> Result<PathPolicy, String> {
    s.parse()
}

/// Reads and parses a config file.
pub fn load_file(path: &Path) -> Result<ServeArgs, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_file(&text, path)
}

impl ServeArgs {
    /// These options over `file`'s: each option given here wins; `portal`
    /// given here replaces the file's list.
    pub fn over(self, file: ServeArgs) -> ServeArgs {
        ServeArgs {
            config: self.config.or(file.config),
            socket: self.socket.or(file.socket),
            queues: self.queues.or(file.queues),
            threads: self.threads.or(file.threads),
            queue_size: self.queue_size.or(file.queue_size),
            read_only: self.read_only.or(file.read_only),
            serial: self.serial.or(file.serial),
            target: self.target.or(file.target),
            portals: if self.portals.is_empty() {
                file.portals
            } else {
                self.portals
            },
            path_policy: self.path_policy.or(file.path_policy),
            initiator_name: self.initiator_name.or(file.initiator_name),
            digests: self.digests.or(file.digests),
            chap_user: self.chap_user.or(file.chap_user),
            chap_secret_file: self.chap_secret_file.or(file.chap_secret_file),
            chap_sha256: self.chap_sha256.or(file.chap_sha256),
            timeouts: self.timeouts.or(file.timeouts),
            target_chap_user: self.target_chap_user.or(file.target_chap_user),
            target_chap_secret_file: self
                .target_chap_secret_file
                .or(file.target_chap_secret_file),
            log_level: self.log_level.or(file.log_level),
            metrics: self.metrics.or(file.metrics),
        }
    }

    /// The effective options: the config file (if `--config` was given)
    /// under these, then the defaults.
    pub fn resolve(self) -> Result<Options, ConfigError> {
        let merged = match &self.config {
            Some(p) => {
                let file = load_file(p)?;
                self.over(file)
            }
            None => self,
        };
        merged.with_defaults()
    }

    /// Applies the defaults; `socket` and `target` are required.
    pub fn with_defaults(self) -> Result<Options, ConfigError> {
        let queues = self.queues.unwrap_or(1);
        let network = self.target.as_deref().is_some_and(is_network_target);
        let threads = self
            .threads
            .unwrap_or_else(|| default_threads(queues, network))
            .min(queues);
        Ok(Options {
            socket: self.socket.ok_or(ConfigError::Missing("socket"))?,
            target: self.target.ok_or(ConfigError::Missing("target"))?,
            queues,
            threads,
            queue_size: self.queue_size.unwrap_or(256),
            read_only: self.read_only.unwrap_or(false),
            serial: self.serial,
            log_level: self.log_level.unwrap_or(log::LevelFilter::Info),
            initiator_name: self.initiator_name,
            portals: self.portals,
            path_policy: self.path_policy.unwrap_or_default(),
            chap_user: self.chap_user,
            chap_secret_file: self.chap_secret_file,
            target_chap_user: self.target_chap_user,
            target_chap_secret_file: self.target_chap_secret_file,
            digests: self.digests.unwrap_or_default(),
            chap_sha256: self.chap_sha256.unwrap_or(false),
            timeouts: self.timeouts,
            metrics: self.metrics,
        })
    }
}

impl Options {
    /// How to open the target.
    pub fn open_options(&self) -> OpenOptions {
        let want = |on: bool| {
            if on {
                vec![DigestKind::Crc32c, DigestKind::None]
            } else {
                vec![DigestKind::None, DigestKind::Crc32c]
            }
        };
        OpenOptions {
            read_only: self.read_only,
            initiator_name: self.initiator_name.clone(),
            extra_portals: self.portals.clone(),
            path_policy: self.path_policy,
            chap_user: self.chap_user.clone(),
            chap_secret_file: self.chap_secret_file.clone(),
            target_chap_user: self.target_chap_user.clone(),
            target_chap_secret_file: self.target_chap_secret_file.clone(),
            chap_sha256: self.chap_sha256,
            timeouts: self.timeouts,
            params: Some(ParamOffer {
                header_digest: want(matches!(self.digests, Digests::Header | Digests::Both)),
                data_digest: want(matches!(self.digests, Digests::Data | Digests::Both)),
                ..ParamOffer::default()
            }),
            ..OpenOptions::default()
        }
    }

    /// The device's shape.
    pub fn device_options(&self) -> DeviceOptions {
        DeviceOptions {
            num_queues: self.queues as usize,
            threads: self.threads as usize,
            queue_size: self.queue_size as usize,
            read_only: self.read_only,
            serial: self.serial.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse_file(text, Path::new("/etc/v.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn network_targets_default_to_a_thread_per_two_queues() {
        let threads = |target: &str, queues: u16, threads: Option<u16>| {
            ServeArgs {
                socket: Some("/s".into()),
                target: Some(target.into()),
                queues: Some(queues),
                threads,
                ..ServeArgs::default()
            }
            .with_defaults()
            .unwrap()
            .threads
        };
        assert_eq!(threads("mem:1M", 4, None), 4);
        assert_eq!(threads("null:1M", 3, None), 3);
        assert_eq!(threads("iscsi://h/iqn.x:t/1", 1, None), 1);
        assert_eq!(threads("iscsi://h/iqn.x:t/1", 2, None), 1);
        assert_eq!(threads("iser://h/iqn.x:t/1", 5, None), 3);
        // Given, it wins (up to the number of queues).
        assert_eq!(threads("iscsi://h/iqn.x:t/1", 4, Some(4)), 4);
        assert_eq!(threads("mem:1M", 2, Some(1)), 1);
        assert_eq!(threads("mem:1M", 2, Some(8)), 2);
    }

    #[test]
    fn keys_cover_the_file_struct() {
        // Every key in KEYS parses (so the hint list is not stale).
        for k in KEYS {
            let v = match k {
                "queues" | "threads" => "2",
                "queue-size" => "128",
                "read-only" | "chap-sha256" => "true",
                "portal" => "[\"h:1\"]",
                "log-level" => "\"debug\"",
                "digests" => "\"both\"",
                "path-policy" => "\"round-robin\"",
                "metrics" => "\"127.0.0.1:9\"",
                "timeouts" => "\"nop=2,replacement=10\"",
                _ => "\"x\"",
            };
            parse_file(&format!("{k} = {v}\n"), Path::new("/c.toml"))
                .unwrap_or_else(|e| panic!("{k}: {e}"));
        }
    }

    #[test]
    fn errors_name_key_and_line() {
        let e = err("socket = \"/s\"\n\nqueue_size = 64\n");
        assert_eq!(
            e,
            "/etc/v.toml:3: key `queue_size`: unknown key; did you mean `queue-size`?"
        );
        let e = err("socket = \"/s\"\nqueues = \"two\"\n");
        assert!(e.starts_with("/etc/v.toml:2: key `queues`: "), "{e}");
        let e = err("portal = [\n  \"a:1\",\n  3,\n]\n");
        assert!(e.starts_with("/etc/v.toml:3: key `portal`: "), "{e}");
        let e = err("queues = 65\n");
        assert_eq!(
            e,
            "/etc/v.toml:1: key `queues`: must be between 1 and 64, got 65"
        );
        let e = err("\nqueue-size = 100\n");
        assert!(
            e.starts_with("/etc/v.toml:2: key `queue-size`: must be a power"),
            "{e}"
        );
        let e = err("metrics = \"0.0.0.0:9100\"\n");
        assert!(
            e.contains(":1: key `metrics`: ") && e.contains("loopback"),
            "{e}"
        );
        let e = err("target = \"mem:1M\"\n[foo\n");
        assert!(e.starts_with("/etc/v.toml:2: unclosed table"), "{e}");
        let e = err("digests = \"crc\"\n");
        assert!(e.contains(":1: key `digests`: expected none"), "{e}");
        let e = err("\npath-policy = \"random\"\n");
        assert!(
            e.starts_with("/etc/v.toml:2: key `path-policy`: unknown path policy"),
            "{e}"
        );
    }

    #[test]
    fn literal_secrets_are_refused_without_echo() {
        let e = err("chap-user = \"u\"\nchap-secret = \"hunter2hunter2\"\n");
        assert!(e.starts_with("/etc/v.toml:2: key `chap-secret`: secrets are not accepted"));
        assert!(
            e.contains("chap-secret-file") && !e.contains("hunter2"),
            "{e}"
        );
        let e = err("target-chap-secret = 5\n");
        assert!(e.contains("key `target-chap-secret`"), "{e}");
        let e = err("chap_secret = \"hunter2hunter2\"\n");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn relative_paths_follow_the_file() {
        let a = parse_file(
            "socket = \"s.sock\"\nchap-secret-file = \"/abs\"\nmetrics = \"unix:m.sock\"\n",
            Path::new("/etc/vi/a.toml"),
        )
        .unwrap();
        assert_eq!(a.socket, Some(PathBuf::from("/etc/vi/s.sock")));
        assert_eq!(a.chap_secret_file, Some(PathBuf::from("/abs")));
        assert_eq!(
            a.metrics,
            Some(MetricsAddr::Unix(PathBuf::from("/etc/vi/m.sock")))
        );
    }
}
