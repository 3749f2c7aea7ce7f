//! Config file, metrics endpoint, `stats`, `--version` and the man page,
//! against the real binary driven by libblkio.

mod client;
mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use client::{pattern, Backend, Client};
use vhost_iser::config::{parse_file, Cli, Digests, Options};
use vhost_iser::metrics::{self, MetricsAddr, Sample};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-iser");
const MIB: usize = 1 << 20;

fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write file");
    p
}

/// The value of the sample `name` whose labels include `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(v)))
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    found[0].value
}

#[test]
fn config_file_round_trip_and_command_line_override() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        "vm1.toml",
        r#"
# vm1's disk
socket = "vm1.sock"
target = "iscsi://vm1@192.0.2.10/iqn.2003-01.org.example:store/0"
queues = 4
threads = 2
queue-size = 128
read-only = true
serial = "VM1DISK"
log-level = "debug"
initiator-name = "iqn.2026-11.org.example:host1"
portal = [
    "192.0.2.11:3260",
    "192.0.2.12:3260",
]
chap-user = "vm1"
chap-secret-file = "secrets/vm1"
target-chap-user = "store"
target-chap-secret-file = "/etc/vhost-iser/store.secret"
digests = "header"
path-policy = "round-robin"
chap-sha256 = true
timeouts = "nop=2,command=15,replacement=40"
metrics = "unix:vm1.metrics"
"#,
    );
    let base = dir.path();
    let expect = Options {
        socket: base.join("vm1.sock"),
        target: "iscsi://vm1@192.0.2.10/iqn.2003-01.org.example:store/0".into(),
        queues: 4,
        threads: 2,
        queue_size: 128,
        read_only: true,
        serial: Some("VM1DISK".into()),
        log_level: log::LevelFilter::Debug,
        initiator_name: Some("iqn.2026-11.org.example:host1".into()),
        portals: vec!["192.0.2.11:3260".into(), "192.0.2.12:3260".into()],
        path_policy: vhost_iser::iscsi::connect::PathPolicy::RoundRobin,
        chap_user: Some("vm1".into()),
        chap_secret_file: Some(base.join("secrets/vm1")),
        target_chap_user: Some("store".into()),
        target_chap_secret_file: Some("/etc/vhost-iser/store.secret".into()),
        digests: Digests::Header,
        chap_sha256: true,
        timeouts: Some(
            vhost_iser::iscsi::session::SessionTimeouts::parse("nop=2,command=15,replacement=40")
                .unwrap(),
        ),
        metrics: Some(MetricsAddr::Unix(base.join("vm1.metrics"))),
    };
    let cli = |args: &[&str]| {
        let mut v = vec!["vhost-iser", "--config", file.to_str().unwrap()];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).expect("parse").serve.resolve()
    };
    let from_file = cli(&[]).expect("file alone");
    assert_eq!(from_file, expect);

    let o = from_file.open_options();
    assert!(o.read_only && o.chap_sha256);
    assert_eq!(o.extra_portals, expect.portals);
    assert_eq!(o.chap_secret_file, expect.chap_secret_file);
    let p = o.params.expect("params");
    assert_eq!(
        p.header_digest[0],
        vhost_iser::iscsi::params::DigestKind::Crc32c
    );
    assert_eq!(
        p.data_digest[0],
        vhost_iser::iscsi::params::DigestKind::None
    );
    let d = from_file.device_options();
    assert_eq!((d.num_queues, d.queue_size, d.read_only), (4, 128, true));
    assert_eq!(d.serial.as_deref(), Some("VM1DISK"));

    // The command line wins, option by option; the rest stays from the file.
    let over = cli(&[
        "--socket",
        "/run/other.sock",
        "--queues",
        "2",
        "--read-only=false",
        "--portal",
        "198.51.100.1:3260",
        "--digests",
        "both",
        "--metrics",
        "127.0.0.1:9100",
        "--log-level",
        "warn",
    ])
    .expect("override");
    let mut want = expect.clone();
    want.socket = "/run/other.sock".into();
    want.queues = 2;
    want.read_only = false;
    want.portals = vec!["198.51.100.1:3260".into()];
    want.digests = Digests::Both;
    want.metrics = Some(MetricsAddr::Tcp("127.0.0.1:9100".parse().unwrap()));
    want.log_level = log::LevelFilter::Warn;
    assert_eq!(over, want);

    // Without a file: the defaults, and the two required options.
    let plain = Cli::try_parse_from(["vhost-iser", "--socket", "/s", "--target", "mem:1M"])
        .unwrap()
        .serve
        .resolve()
        .unwrap();
    assert_eq!(
        (
            plain.queues,
            plain.queue_size,
            plain.read_only,
            plain.digests
        ),
        (1, 256, false, Digests::None)
    );
    assert_eq!(plain.log_level, log::LevelFilter::Info);
    let e = Cli::try_parse_from(["vhost-iser", "--socket", "/s"])
        .unwrap()
        .serve
        .resolve()
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "missing --target (or `target` in the config file)"
    );
}

/// Runs the binary; returns (exit code, stderr).
fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run vhost-iser");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_errors_name_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        (
            "socket = \"/s\"\ntarget = \"mem:1M\"\nqueus = 2\n",
            ":3: key `queus`: unknown key (known keys: socket, target, queues,",
            "unknown key",
        ),
        (
            "target = \"mem:1M\"\n\n\nqueue_size = 64\n",
            ":4: key `queue_size`: unknown key; did you mean `queue-size`?",
            "underscore",
        ),
        (
            "target = \"mem:1M\"\nqueues = \"four\"\n",
            ":2: key `queues`: invalid type: string \"four\", expected an integer",
            "wrong type",
        ),
        (
            "target = \"mem:1M\"\nread-only = \"yes\"\n",
            ":2: key `read-only`: invalid type: string \"yes\", expected a boolean",
            "wrong type (bool)",
        ),
        (
            "target = \"mem:1M\"\nportal = [\n  \"a:1\",\n  7,\n]\n",
            ":4: key `portal`: invalid type: integer `7`, expected a string",
            "array element",
        ),
        (
            "target = \"mem:1M\"\nmetrics = \"0.0.0.0:9100\"\n",
            ":2: key `metrics`: invalid metrics address \"0.0.0.0:9100\": only loopback",
            "non-loopback metrics",
        ),
        (
            "target = \"mem:1M\"\nlog-level = \"loud\"\n",
            ":2: key `log-level`: expected off, error, warn, info, debug or trace, got \"loud\"",
            "bad level",
        ),
        (
            "target = \"mem:1M\"\ntarget = \"mem:2M\"\n",
            ":2: key `target`: duplicate key",
            "duplicate",
        ),
    ];
    for (i, (text, want, what)) in cases.iter().enumerate() {
        let file = write_file(dir.path(), &format!("c{i}.toml"), text);
        let (code, err) = run(&["--config", file.to_str().unwrap(), "--socket", "/tmp/x"]);
        assert_eq!(code, 2, "{what}: {err}");
        let want = format!("vhost-iser: {}{want}", file.display());
        assert!(err.starts_with(&want), "{what}:\n got {err}\nwant {want}");
    }
    // A missing file.
    let (code, err) = run(&["--config", "/nonexistent/vm.toml"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot read the config file /nonexistent/vm.toml: No such file"),
        "{err}"
    );
}

#[test]
fn literal_secrets_in_the_config_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for key in ["chap-secret", "target-chap-secret"] {
        let file = write_file(
            dir.path(),
            "s.toml",
            &format!(
                "target = \"iscsi://u@127.0.0.1/iqn.x:y/0\"\nchap-user = \"u\"\n{key} = \"hunter2hunter2\"\n"
            ),
        );
        let (code, err) = run(&["--config", file.to_str().unwrap(), "--socket", "/tmp/x"]);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains(&format!(
                "s.toml:3: key `{key}`: secrets are not accepted in the config file"
            )) && err.contains(&format!("`{key}-file`")),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "the secret was echoed: {err}");
    }
    // The library says the same, for callers that embed it.
    let e = parse_file("chap-secret = 'x'\n", Path::new("f.toml")).unwrap_err();
    assert!(
        e.to_string().starts_with("f.toml:1: key `chap-secret`"),
        "{e}"
    );
}

/// Writes `n` blocks of `len` bytes, then reads `m` blocks back, on queue `q`.
fn drive(c: &mut Client, q: usize, n: usize, m: usize, len: usize) {
    for i in 0..n {
        let at = (i * len) as u64;
        let data = pattern(at, len, 5);
        c.buf()[..len].copy_from_slice(&data);
        assert_eq!(c.write(q, at, 0, len), 0, "write {i}");
    }
    for i in 0..m {
        let at = (i * len) as u64;
        assert_eq!(c.read(q, at, MIB, len), 0, "read {i}");
        assert!(c.buf()[MIB..MIB + len] == pattern(at, len, 5)[..]);
    }
}

/// The log layout: `TIMESTAMP LEVEL module: message`.
fn assert_log_layout(log: &str) {
    assert!(!log.is_empty());
    for line in log.lines() {
        let mut it = line.splitn(3, ' ');
        let (ts, level, rest) = (it.next().unwrap(), it.next().unwrap_or(""), it.next());
        let ok_ts = ts.len() == 24
            && ts.ends_with('Z')
            && ts.as_bytes()[10] == b'T'
            && ts.as_bytes()[19] == b'.';
        let ok_level = ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level);
        let rest = rest.unwrap_or("").trim_start();
        let ok_module = rest
            .split_once(": ")
            .is_some_and(|(m, _)| m.starts_with("vhost_iser") || !m.contains(' '));
        assert!(
            ok_ts && ok_level && ok_module,
            "log line out of layout: {line:?}"
        );
    }
}

#[test]
fn unix_metrics_count_the_requests_made() {
    let dir = tempfile::tempdir().unwrap();
    let msock = dir.path().join("m.sock");
    // Target and metrics from the config file, the socket from the command line.
    let cfg = write_file(
        dir.path(),
        "vm.toml",
        "target = \"mem:64M\"\nqueues = 2\nmetrics = \"unix:m.sock\"\n",
    );
    let backend = Backend::start(&["--config", cfg.to_str().unwrap()]);
    assert!(msock.exists(), "log: {}", backend.log());
    let mut c = Client::connect(&backend.socket, 2, 2 * MIB);
    drive(&mut c, 0, 100, 30, 4096);
    drive(&mut c, 1, 10, 0, 65536);
    assert_eq!(c.flush(1), 0);
    // Past the end: refused before the target, counted as a bad request only.
    assert_ne!(c.read(1, 64 << 20, 0, 4096), 0);

    let addr = MetricsAddr::Unix(msock.clone());
    let text = metrics::fetch(&addr).expect("fetch");
    let s = metrics::parse(&text);
    let req = |q: &str, op: &str, st: &str| {
        value(
            &s,
            "vhost_iser_requests_total",
            &[("queue", q), ("op", op), ("status", st)],
        )
    };
    assert_eq!(req("0", "write", "ok"), 100.0, "{text}");
    assert_eq!(req("0", "read", "ok"), 30.0);
    assert_eq!(req("1", "write", "ok"), 10.0);
    assert_eq!(req("1", "flush", "ok"), 1.0);
    assert_eq!(req("1", "read", "ioerr"), 0.0);
    assert_eq!(req("1", "read", "ok"), 0.0);
    assert_eq!(req("0", "flush", "ok"), 0.0);
    let bytes =
        |q: &str, dir: &str| value(&s, "vhost_iser_bytes_total", &[("queue", q), ("dir", dir)]);
    assert_eq!(bytes("0", "write"), 409600.0);
    assert_eq!(bytes("0", "read"), 30.0 * 4096.0);
    assert_eq!(bytes("1", "write"), 655360.0);
    assert_eq!(bytes("1", "read"), 0.0);
    for q in ["0", "1"] {
        assert_eq!(value(&s, "vhost_iser_in_flight", &[("queue", q)]), 0.0);
    }
    // Every request that reached the target is in the histogram, whose
    // buckets are cumulative and end with +Inf == count.
    let count = |q: &str| {
        value(
            &s,
            "vhost_iser_request_latency_seconds_count",
            &[("queue", q)],
        )
    };
    assert_eq!(count("0"), 130.0);
    let buckets: Vec<f64> = s
        .iter()
        .filter(|x| {
            x.name == "vhost_iser_request_latency_seconds_bucket" && x.label("queue") == Some("1")
        })
        .map(|x| x.value)
        .collect();
    assert_eq!(buckets.len(), metrics::LATENCY_BOUNDS_NS.len() + 1);
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    // Requests refused before the target (the out-of-range read) have no latency.
    assert_eq!(*buckets.last().unwrap(), count("1"));
    assert_eq!(count("1"), 11.0);
    let sum = value(
        &s,
        "vhost_iser_request_latency_seconds_sum",
        &[("queue", "0")],
    );
    assert!(sum > 0.0 && sum < 130.0, "{sum}");
    assert_eq!(value(&s, "vhost_iser_bad_requests_total", &[]), 1.0);
    assert_eq!(value(&s, "vhost_iser_reconnects_total", &[]), 0.0);
    assert_eq!(
        value(
            &s,
            "vhost_iser_build_info",
            &[("commit", metrics::GIT_COMMIT)]
        ),
        1.0
    );
    assert!(s.iter().all(|x| x.name.starts_with("vhost_iser_")));

    // A client that sends nothing gets the bare text.
    let mut raw = UnixStream::connect(&msock).unwrap();
    raw.shutdown(std::net::Shutdown::Write).unwrap();
    let mut bare = String::new();
    raw.read_to_string(&mut bare).unwrap();
    assert!(bare.starts_with("# HELP vhost_iser_"), "{bare}");
    assert!(
        bare.contains("vhost_iser_requests_total{queue=\"0\",op=\"write\",status=\"ok\"} 100\n")
    );

    // `stats` shows the same numbers to a person.
    let out = Command::new(BIN)
        .args(["stats", "--metrics", &format!("unix:{}", msock.display())])
        .output()
        .unwrap();
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    let row = |q: &str| -> Vec<String> {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(q))
            .unwrap_or_else(|| panic!("no row {q}:\n{table}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    // queue reads writes flushes other errors readMiB writeMiB busy p50 p99
    assert_eq!(
        row("0")[..9],
        ["0", "30", "100", "0", "0", "0", "0.1", "0.4", "0"],
        "{table}"
    );
    assert_eq!(
        row("1")[..9],
        ["1", "0", "10", "1", "0", "0", "0.0", "0.6", "0"],
        "{table}"
    );
    assert_eq!(row("all")[1..3], ["30", "110"], "{table}");
    assert!(table.contains("bad requests: 1   reconnects: 0"), "{table}");

    let mut backend = backend;
    assert!(backend.stop().success());
    assert!(!msock.exists(), "the metrics socket outlived the process");
    assert_log_layout(&backend.log());
}

#[test]
fn tcp_metrics_on_loopback() {
    let backend = Backend::start(&["--target", "mem:64M", "--metrics", "127.0.0.1:0"]);
    let log = backend.log();
    let port: u16 = log
        .lines()
        .find_map(|l| l.split("serving metrics on 127.0.0.1:").nth(1))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"));
    let addr = format!("127.0.0.1:{port}");
    let mut c = Client::connect(&backend.socket, 1, 2 * MIB);
    drive(&mut c, 0, 100, 0, 4096);

    let s = metrics::parse(&metrics::fetch(&addr.parse().unwrap()).unwrap());
    assert_eq!(
        value(
            &s,
            "vhost_iser_requests_total",
            &[("queue", "0"), ("op", "write"), ("status", "ok")]
        ),
        100.0
    );
    assert_eq!(
        value(
            &s,
            "vhost_iser_bytes_total",
            &[("queue", "0"), ("dir", "write")]
        ),
        409600.0
    );

    // Plain HTTP: the headers Prometheus expects; other paths and methods refused.
    let http = |req: &str| {
        let mut t = std::net::TcpStream::connect(&addr).unwrap();
        t.write_all(req.as_bytes()).unwrap();
        let mut r = String::new();
        t.read_to_string(&mut r).unwrap();
        r
    };
    let ok = http("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(ok.starts_with("HTTP/1.0 200 OK\r\n"), "{ok}");
    assert!(
        ok.contains("Content-Type: text/plain; version=0.0.4"),
        "{ok}"
    );
    let body = ok.split_once("\r\n\r\n").unwrap().1;
    let len: usize = ok
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(body.len(), len);
    assert!(http("GET / HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 404"));
    assert!(http("POST /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 405"));

    let out = Command::new(BIN)
        .args(["stats", "--metrics", &addr])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|l| l.split_whitespace().take(3).eq(["0", "0", "100"])),
        "{table}"
    );
    let raw = Command::new(BIN)
        .args(["stats", "--raw", "--metrics", &addr])
        .output()
        .unwrap();
    let raw = String::from_utf8(raw.stdout).unwrap();
    assert!(raw.starts_with("# HELP vhost_iser_build_info "), "{raw}");
    assert!(raw.contains("vhost_iser_bytes_total{queue=\"0\",dir=\"write\"} 409600\n"));
}

#[test]
fn reconnects_are_counted() {
    use support::tgtd::{Backing, Tgtd};
    let mut t = Tgtd::start();
    let tid = t.create_target("iqn.2026-11.vhost-iser.test:metrics");
    t.add_lun(tid, 1, Backing::File(16 << 20)).expect("LUN");
    t.bind_all(tid);
    let mdir = tempfile::tempdir().unwrap();
    let maddr = MetricsAddr::Unix(mdir.path().join("m.sock"));
    let backend = Backend::start(&["--target", &t.url(tid, 1), "--metrics", &maddr.to_string()]);
    let mut c = Client::connect(&backend.socket, 1, 2 * MIB);
    drive(&mut c, 0, 4, 4, 4096);

    // tgtd closes our connection (the session's I_T nexus).
    let show = t.show();
    let sid = show
        .lines()
        .find_map(|l| l.trim().strip_prefix("I_T nexus: "))
        .unwrap_or_else(|| panic!("no session in\n{show}"))
        .trim()
        .to_string();
    t.tgtadm(&[
        "--mode",
        "conn",
        "--op",
        "delete",
        "--tid",
        &tid.to_string(),
        "--sid",
        &sid,
        "--cid",
        "0",
    ])
    .expect("delete the connection");
    // The next requests fail or succeed; within a few seconds they succeed
    // again over a new session.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut failed = 0;
    loop {
        if c.read(0, 0, MIB, 4096) == 0 {
            break;
        }
        failed += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "no reconnect; log:\n{}",
            backend.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(c.buf()[MIB..MIB + 4096] == pattern(0, 4096, 5)[..]);
    let s = metrics::parse(&metrics::fetch(&maddr).unwrap());
    assert_eq!(
        value(&s, "vhost_iser_reconnects_total", &[]),
        1.0,
        "log:\n{}",
        backend.log()
    );
    let ioerr = value(
        &s,
        "vhost_iser_requests_total",
        &[("queue", "0"), ("op", "read"), ("status", "ioerr")],
    );
    assert_eq!(ioerr, failed as f64);
    let log = backend.log();
    assert!(log.contains("reconnected to"), "{log}");
    assert_log_layout(&log);
}

#[test]
fn metrics_addresses_are_checked() {
    let (code, err) = run(&[
        "--socket",
        "/tmp/x",
        "--target",
        "mem:1M",
        "--metrics",
        "192.0.2.1:9100",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("only loopback addresses are allowed"), "{err}");
    // `stats` against nothing: a clear error, not a panic.
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("none.sock");
    let out = Command::new(BIN)
        .args(["stats", "--metrics", &format!("unix:{}", gone.display())])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect") && err.contains("none.sock"),
        "{err}"
    );
}

#[test]
fn version_names_the_git_commit() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    let v = String::from_utf8(out.stdout).unwrap();
    let head = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let commit = head.unwrap_or_else(|| "unknown".into());
    assert_eq!(
        v.trim(),
        format!("vhost-iser {} (git {commit})", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn committed_man_page_is_current() {
    let out = Command::new(BIN).arg("man").output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).unwrap();
    let committed =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("man/vhost-iser.1"))
            .expect("man/vhost-iser.1");
    assert!(
        page == committed,
        "man/vhost-iser.1 is stale: run `vhost-iser man > man/vhost-iser.1`"
    );
    for section in [
        ".SH NAME",
        ".SH OPTIONS",
        "CONFIGURATION FILE",
        "METRICS",
        "EXAMPLES",
    ] {
        assert!(page.contains(section), "{section}");
    }
    // The help a person reads: examples for the three kinds of target.
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for s in [
        "--target mem:",
        "--target iscsi://",
        "--chap-secret-file",
        "--target iser://",
    ] {
        assert!(help.contains(s), "--help lacks {s}");
    }
}
