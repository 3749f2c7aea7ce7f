//! `vhost-iser`: serve one VM's disk from a remote iSCSI LUN (or RAM) as a
//! vhost-user-blk device.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use log::{error, info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use vhost_iser::config::{Cli, Command, DiscoverArgs, Options};
use vhost_iser::metrics::{self, MetricsAddr, MetricsServer};
use vhost_iser::open::{discover as discover_targets, open_target};
use vhost_iser::vhost::backend::{serve, BlkBackend};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Stats { metrics, raw }) => return stats(&metrics, raw),
        Some(Command::Man) => return man(),
        Some(Command::Discover(args)) => return discover(&args),
        None => {}
    }
    let opts = match cli.serve.resolve() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vhost-iser: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    init_logging(opts.log_level);
    run(&opts)
}

/// `TIMESTAMP LEVEL module: message`, one line per event.
fn init_logging(level: log::LevelFilter) {
    env_logger::Builder::new()
        .filter_level(level)
        .parse_env("RUST_LOG")
        .format(|buf, rec| {
            writeln!(
                buf,
                "{} {:<5} {}: {}",
                buf.timestamp_millis(),
                rec.level(),
                rec.target(),
                rec.args()
            )
        })
        .init();
}

fn run(opts: &Options) -> ExitCode {
    info!(
        "vhost-iser {} starting: target {}, socket {}",
        vhost_iser::config::VERSION,
        opts.target,
        opts.socket.display()
    );
    // Signals go to one thread only, so they never interrupt a worker.
    let mut signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let target = match open_target(&opts.target, &opts.open_options()) {
        Ok(t) => t,
        Err(e) => {
            error!("{}", error_chain(&e));
            // A bad argument is a usage error (2); an unreachable target is not.
            let usage = matches!(e, vhost_iser::blk::target::TargetError::BadTarget { .. });
            return ExitCode::from(if usage { 2 } else { 1 });
        }
    };
    let dev = opts.device_options();
    let backend = match BlkBackend::new(target, &dev) {
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
        dev.num_queues,
        if info.read_only { ", read-only" } else { "" }
    );
    let metrics_server = match &opts.metrics {
        Some(addr) => match MetricsServer::start(addr, backend.stats().to_vec()) {
            Ok(s) => Some(s),
            Err(e) => {
                error!("{}", error_chain(&e));
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };

    let drain_backend = backend.clone();
    let socket = opts.socket.clone();
    let metrics_socket = metrics_server.as_ref().map(|m| m.addr().clone());
    if let Err(e) = std::thread::Builder::new()
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
                if let Some(MetricsAddr::Unix(p)) = &metrics_socket {
                    let _ = std::fs::remove_file(p);
                }
                info!("exiting");
                std::process::exit(if left == 0 { 0 } else { 1 });
            }
        })
    {
        error!("cannot start the signal thread: {e}");
        return ExitCode::FAILURE;
    }

    match serve(backend, &opts.socket) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{}", error_chain(&e));
            let _ = std::fs::remove_file(&opts.socket);
            if let Some(m) = &metrics_server {
                m.remove_socket();
            }
            ExitCode::FAILURE
        }
    }
}

/// `vhost-iser stats`: the counters of a running instance as a table.
fn stats(addr: &MetricsAddr, raw: bool) -> ExitCode {
    match metrics::fetch(addr) {
        Ok(text) if raw => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Ok(text) => {
            print!("{}", metrics::table(&metrics::parse(&text)));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vhost-iser: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// `vhost-iser man`: the manual page, for man/vhost-iser.1.
fn man() -> ExitCode {
    match vhost_iser::config::man_page().and_then(|p| std::io::stdout().write_all(&p)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-iser: cannot write the manual page: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `vhost-iser discover`: one "HOST:PORT,TPGT TARGET-NAME" line per portal.
fn discover(args: &DiscoverArgs) -> ExitCode {
    init_logging(log::LevelFilter::Warn);
    match discover_targets(&args.portal, &args.open_options()) {
        Ok(targets) => {
            let mut out = std::io::stdout().lock();
            for t in &targets {
                for p in &t.portals {
                    if writeln!(out, "{p} {}", t.name).is_err() {
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vhost-iser: {}", error_chain(&e));
            let usage = matches!(e, vhost_iser::blk::target::TargetError::BadTarget { .. });
            ExitCode::from(if usage { 2 } else { 1 })
        }
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
