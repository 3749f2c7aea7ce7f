//! `vhost-iser`: serve one VM's disk from a remote iSCSI LUN (or RAM) as a
//! vhost-user-blk device.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use log::{error, info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use vhost_iser::iscsi::params::{DigestKind, ParamOffer};
use vhost_iser::open::{open_target, OpenOptions};
use vhost_iser::vhost::backend::{serve, BlkBackend, DeviceOptions};

/// Serve a virtual machine's disk from a remote iSCSI target (iSER or TCP)
/// as a vhost-user-blk device.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Unix socket QEMU connects to (created; a stale file is replaced).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,

    /// Target: mem:SIZE, iscsi://[user@]host[:port]/iqn/lun or iser://...
    #[arg(long, value_name = "URL")]
    target: String,

    /// Number of virtqueues, each with its own worker thread (and session).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,

    /// Largest virtqueue size the frontend may choose (power of two).
    #[arg(long, default_value_t = 256)]
    queue_size: u16,

    /// Expose the disk read-only.
    #[arg(long)]
    read_only: bool,

    /// Serial number reported to the guest (default: the target's).
    #[arg(long, value_name = "S")]
    serial: Option<String>,

    /// Our iSCSI initiator name (default: iqn.2026-11.io.vhost-iser:HOSTNAME).
    #[arg(long, value_name = "IQN")]
    initiator_name: Option<String>,

    /// Another portal of the same target (host:port); repeat for several.
    #[arg(long = "portal", value_name = "HOST:PORT")]
    portals: Vec<String>,

    /// CHAP user name (or user@ in the URL).
    #[arg(long, value_name = "NAME")]
    chap_user: Option<String>,

    /// File with the CHAP secret (default: $VHOST_ISER_CHAP_SECRET). Never on the command line.
    #[arg(long, value_name = "FILE")]
    chap_secret_file: Option<PathBuf>,

    /// Offer CHAP with SHA-256 before MD5 (targets that read CHAP_A=7 as SHA-256: LIO, open-iscsi's).
    #[arg(long)]
    chap_sha256: bool,

    /// CRC32C digests to ask for: none, header, data or both.
    #[arg(long, default_value = "none", value_parser = ["none", "header", "data", "both"])]
    digests: String,

    /// Mutual CHAP: the name the target must present.
    #[arg(long, value_name = "NAME")]
    target_chap_user: Option<String>,

    /// Mutual CHAP: file with the target's secret (default: $VHOST_ISER_TARGET_CHAP_SECRET).
    #[arg(long, value_name = "FILE")]
    target_chap_secret_file: Option<PathBuf>,

    /// Log level: error, warn, info, debug, trace (RUST_LOG overrides).
    #[arg(long, default_value = "info", value_name = "L")]
    log_level: log::LevelFilter,
}

fn main() -> ExitCode {
    let args = Args::parse();
    env_logger::Builder::new()
        .filter_level(args.log_level)
        .parse_env("RUST_LOG")
        .format_timestamp_millis()
        .init();

    // Signals go to one thread only, so they never interrupt a worker.
    let mut signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };

    let open_opts = OpenOptions {
        read_only: args.read_only,
        initiator_name: args.initiator_name.clone(),
        extra_portals: args.portals.clone(),
        chap_user: args.chap_user.clone(),
        chap_secret_file: args.chap_secret_file.clone(),
        target_chap_user: args.target_chap_user.clone(),
        target_chap_secret_file: args.target_chap_secret_file.clone(),
        chap_sha256: args.chap_sha256,
        params: Some(param_offer(&args.digests)),
        ..OpenOptions::default()
    };
    let target = match open_target(&args.target, &open_opts) {
        Ok(t) => t,
        Err(e) => {
            error!("{}", error_chain(&e));
            // A bad argument is a usage error (2); an unreachable target is not.
            let usage = matches!(e, vhost_iser::blk::target::TargetError::BadTarget { .. });
            return ExitCode::from(if usage { 2 } else { 1 });
        }
    };
    let opts = DeviceOptions {
        num_queues: args.queues as usize,
        queue_size: args.queue_size as usize,
        read_only: args.read_only,
        serial: args.serial.clone(),
    };
    let backend = match BlkBackend::new(target, &opts) {
        Ok(b) => Arc::new(b),
        Err(e) => {
            error!("{}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let info = backend.info();
    info!(
        "device ready: {} sectors of 512 bytes ({} MiB), block size {}, {} queue(s){}",
        info.capacity_sectors,
        info.capacity_sectors / 2048,
        info.logical_block_size,
        opts.num_queues,
        if info.read_only { ", read-only" } else { "" }
    );

    let drain_backend = backend.clone();
    let socket = args.socket.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                info!("{name}: draining in-flight requests");
                let left = drain_backend.drain(Duration::from_secs(30));
                if left > 0 {
                    warn!("{left} requests did not complete within 30 s");
                }
                let _ = std::fs::remove_file(&socket);
                info!("exiting");
                std::process::exit(if left == 0 { 0 } else { 1 });
            }
        })
        .expect("spawning the signal thread");

    match serve(backend, &args.socket) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{}", error_chain(&e));
            let _ = std::fs::remove_file(&args.socket);
            ExitCode::FAILURE
        }
    }
}

/// Login proposals from the command line.
fn param_offer(digests: &str) -> ParamOffer {
    let want = |on: bool| {
        if on {
            vec![DigestKind::Crc32c, DigestKind::None]
        } else {
            vec![DigestKind::None, DigestKind::Crc32c]
        }
    };
    ParamOffer {
        header_digest: want(matches!(digests, "header" | "both")),
        data_digest: want(matches!(digests, "data" | "both")),
        ..ParamOffer::default()
    }
}

/// "outer: inner: innermost" for a log line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
