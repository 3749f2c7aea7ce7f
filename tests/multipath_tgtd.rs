//! Multipath against a real tgtd: tgtd runs in its own network namespace
//! reached over two veth links (two subnets, two portals of one target).
//! libblkio writes and verifies on every queue without pause while a link is
//! cut (`ip link set down`, the target's side) and restored: no request may fail, the sessions
//! on the cut path move to the other portal, and come back to their
//! preferred portal once it answers again. The data is checked through the
//! client and in tgtd's backing file, and tgtd must hold exactly one session
//! per queue at the end (the moves log out; nothing is left behind).

mod client;
mod support;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use client::{pattern, Backend, Client};
use support::netns::Netns;
use support::tgtd::{Backing, Tgtd};
use vhost_iser::metrics::{self, MetricsAddr};

const MIB: usize = 1 << 20;
/// Bytes per request.
const LEN: usize = 64 * 1024;
/// Short timers: a dead path is noticed by a 1 s ping within about 2 s.
const TIMEOUTS: &str = "nop=1,nop_timeout=1,command=10,tmf=2,replacement=30";
/// Longest wait for a failover or a failback (probes run every 5 s).
const MOVE_TIMEOUT: Duration = Duration::from_secs(30);

struct Rig {
    ns: Netns,
    tgtd: Tgtd,
    tid: u32,
    file: PathBuf,
    backend: Backend,
    client: Client,
    metrics: MetricsAddr,
    /// Holds the metrics socket; declared after `backend`, so dropped after it.
    _dir: tempfile::TempDir,
    /// The two portals, "10.x.y.2:3260" and "10.x.y.6:3260".
    portals: [String; 2],
    queues: usize,
    /// Last data written per disk offset: (seed).
    written: HashMap<u64, u8>,
    round: u32,
    /// Longest time one round of requests took.
    worst: Duration,
}

impl Rig {
    fn new(tag: &str, queues: usize, policy: Option<&str>) -> Rig {
        let ns = Netns::new(tag, 232, 2);
        let mut tgtd = Tgtd::start_in_netns(&ns.name);
        let iqn = "iqn.2026-11.vhost-iser.test:multipath";
        let tid = tgtd.create_target(iqn);
        let file = tgtd.add_lun(tid, 1, Backing::File(64 << 20)).expect("LUN");
        tgtd.bind_all(tid);
        let portals = [0, 1].map(|k| format!("{}:3260", ns.links[k].inner_ip));
        let url = format!("iscsi://{}/{iqn}/1", portals[0]);
        let dir = support::unique_tmp_dir();
        let msock = dir.path().join("metrics.sock");
        let maddr = format!("unix:{}", msock.display());
        let q = queues.to_string();
        let mut args = vec![
            "--target",
            &url,
            "--portal",
            &portals[1],
            "--queues",
            &q,
            "--metrics",
            &maddr,
        ];
        if let Some(p) = policy {
            args.extend(["--path-policy", p]);
        }
        let backend = Backend::start_env(&args, &[("VHOST_ISER_TIMEOUTS", TIMEOUTS)]);
        let client = Client::connect(&backend.socket, queues as i32, 16 * MIB);
        assert_eq!(client.capacity(), 64 << 20);
        let metrics = MetricsAddr::Unix(msock);
        Rig {
            ns,
            tgtd,
            tid,
            file,
            backend,
            client,
            metrics,
            _dir: dir,
            portals,
            queues,
            written: HashMap::new(),
            round: 0,
            worst: Duration::ZERO,
        }
    }

    /// One round: a 64 KiB write on every queue at once, then the reads
    /// back, each checked. Every request must succeed.
    fn io_round(&mut self) {
        let start = Instant::now();
        self.round += 1;
        let seed = self.round as u8;
        let slot = (self.round % 16) as u64;
        let at = |q: usize| (q as u64) * 4 * MIB as u64 + slot * LEN as u64;
        for q in 0..self.queues {
            let data = pattern(at(q), LEN, seed);
            self.client.buf()[q * LEN..(q + 1) * LEN].copy_from_slice(&data);
            let p = self.client.ptr(q * LEN);
            self.client.queues[q].write(at(q), p, LEN, 1, ReqFlags::empty());
        }
        for q in 0..self.queues {
            self.wait_ok(q, "write");
            self.written.insert(at(q), seed);
        }
        let base = 8 * MIB;
        for q in 0..self.queues {
            self.client.buf()[base + q * LEN..base + (q + 1) * LEN].fill(0xEE);
            let p = self.client.ptr(base + q * LEN);
            self.client.queues[q].read(at(q), p, LEN, 1, ReqFlags::empty());
        }
        for q in 0..self.queues {
            self.wait_ok(q, "read");
            let got = &self.client.buf()[base + q * LEN..base + (q + 1) * LEN];
            assert!(
                got == pattern(at(q), LEN, seed).as_slice(),
                "queue {q} read back other data (round {})",
                self.round
            );
        }
        self.worst = self.worst.max(start.elapsed());
    }

    /// Waits for queue `q`'s request, which must succeed.
    fn wait_ok(&mut self, q: usize, what: &str) {
        let r = self.client.wait(q, 1)[0].1;
        assert_eq!(
            r,
            0,
            "{what} on queue {q} failed (round {}); log:\n{}",
            self.round,
            self.backend.log()
        );
    }

    /// Keeps the I/O going for `d`.
    fn io_for(&mut self, d: Duration) {
        let start = Instant::now();
        while start.elapsed() < d {
            self.io_round();
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The backend's log lines about paths and sessions (for the test output).
    fn path_log(&self) -> String {
        self.backend
            .log()
            .lines()
            .filter(|l| {
                [
                    "path",
                    "logged",
                    "re-issuing",
                    "lost",
                    "reconnected",
                    "continuing",
                ]
                .iter()
                .any(|w| l.contains(w))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Keeps the I/O going until `done(log)` holds; returns how long it took.
    fn io_until(&mut self, what: &str, done: impl Fn(&str) -> bool) -> Duration {
        let start = Instant::now();
        loop {
            self.io_round();
            if done(&self.backend.log()) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < MOVE_TIMEOUT,
                "{what}: not seen within {MOVE_TIMEOUT:?}; log:\n{}",
                self.backend.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// (portal, preferred) of every queue, from the metrics endpoint.
    fn paths(&self) -> Vec<(String, bool)> {
        let text = metrics::fetch(&self.metrics).expect("metrics");
        let samples = metrics::parse(&text);
        (0..self.queues)
            .map(|q| {
                let s = samples
                    .iter()
                    .find(|s| {
                        s.name == "vhost_iser_queue_path_info"
                            && s.label("queue") == Some(q.to_string().as_str())
                    })
                    .unwrap_or_else(|| panic!("no path for queue {q} in\n{text}"));
                (
                    s.label("portal").unwrap_or("").to_string(),
                    s.label("preferred") == Some("true"),
                )
            })
            .collect()
    }

    fn path_changes(&self) -> f64 {
        let text = metrics::fetch(&self.metrics).expect("metrics");
        metrics::parse(&text)
            .iter()
            .find(|s| s.name == "vhost_iser_path_changes_total")
            .map(|s| s.value)
            .unwrap_or_else(|| panic!("no path_changes_total in\n{text}"))
    }

    /// Everything written is in tgtd's backing file and reads back.
    fn verify_all(&mut self) {
        for (&at, &seed) in &self.written {
            let want = pattern(at, LEN, seed);
            assert!(
                file_bytes(&self.file, at, LEN) == want,
                "backing file differs at {at}"
            );
            let off = 12 * MIB;
            self.client.buf()[off..off + LEN].fill(0);
            assert_eq!(self.client.read(0, at, off, LEN), 0);
            assert!(self.client.buf()[off..off + LEN] == want[..]);
        }
    }
}

fn file_bytes(path: &Path, at: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).expect("backing file");
    f.seek(SeekFrom::Start(at)).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact(&mut v).unwrap();
    v
}

/// Cuts link `k` from another thread after `after`, while the I/O runs,
/// and keeps the I/O going until `done(log)`; returns the time since the cut.
fn cut_during_io(
    rig: &mut Rig,
    k: usize,
    after: Duration,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> Duration {
    let args = rig.ns.link_args(k, false);
    let cut_at = std::thread::scope(|s| {
        let h = s.spawn(move || {
            std::thread::sleep(after);
            support::netns::ip(&args.iter().map(String::as_str).collect::<Vec<_>>());
            Instant::now()
        });
        let start = Instant::now();
        while start.elapsed() < after + Duration::from_millis(100) {
            rig.io_round();
        }
        h.join().expect("link cutter")
    });
    rig.io_until(what, done);
    cut_at.elapsed()
}

/// What one cut-and-restore of path A measured.
struct Moves {
    /// From the cut until every session on A had moved.
    failover: Duration,
    /// The slowest I/O round across the failover.
    worst: Duration,
    /// From the link's return until every moved session was back.
    failback: Duration,
}

impl Rig {
    /// Cuts path A (link 0) with I/O running: the sessions of `on_a` move to
    /// B and stay there while A is down (6 s: the probes fail); A comes
    /// back: they log out of B and return to A. No request fails meanwhile.
    fn cut_and_restore_a(&mut self, on_a: &[usize]) -> Moves {
        let [a, b] = self.portals.clone();
        let down = format!("path {a} down, continuing on {b}");
        let failover = cut_during_io(self, 0, Duration::from_millis(500), "failover", |log| {
            log.matches(down.as_str()).count() >= on_a.len()
        });
        let worst = self.worst;
        let log = self.backend.log();
        let paths = self.paths();
        for &q in on_a {
            assert!(log.contains(&format!("queue {q}: {down}")), "{log}");
            assert_eq!(paths[q], (b.clone(), false), "queue {q} after the cut");
        }
        self.io_for(Duration::from_secs(6));
        assert_eq!(self.paths(), paths, "moved while path A was down");

        self.ns.set_link(0, true);
        let back = format!("back on preferred path {a}");
        let failback = self.io_until("failback", |log| {
            log.matches(back.as_str()).count() >= on_a.len()
        });
        let log = self.backend.log();
        for &q in on_a {
            let bye = format!("queue {q}: logged out of {b} to move back to the preferred path");
            assert!(
                log.contains(&bye),
                "queue {q} did not log out cleanly:\n{log}"
            );
        }
        assert_eq!(self.path_changes(), 2.0 * on_a.len() as f64);
        for _ in 0..5 {
            self.io_round();
        }
        self.verify_all();
        // One session per queue: the moves left nothing behind at the target.
        assert_eq!(self.tgtd.sessions(), self.queues, "{}", self.tgtd.show());
        eprintln!("{}", self.path_log());
        Moves {
            failover,
            worst,
            failback,
        }
    }
}

#[test]
fn round_robin_spreads_sessions_fails_over_and_back() {
    let mut rig = Rig::new("rr", 4, Some("round-robin"));
    let [a, b] = rig.portals.clone();
    let spread = vec![
        (a.clone(), true),
        (b.clone(), true),
        (a.clone(), true),
        (b.clone(), true),
    ];
    for _ in 0..5 {
        rig.io_round();
    }
    assert_eq!(rig.paths(), spread, "round-robin placement");
    assert_eq!(rig.tgtd.sessions(), 4, "{}", rig.tgtd.show());
    let m = rig.cut_and_restore_a(&[0, 2]);
    assert_eq!(rig.paths(), spread, "after the failback");
    // `vhost-iser stats` shows where each queue is.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-iser"))
        .args(["stats", "--metrics", &rig.metrics.to_string()])
        .output()
        .expect("run vhost-iser stats");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(&format!(
            "paths: q0 {a}, q1 {b}, q2 {a}, q3 {b}   path changes: 4"
        )),
        "{table}"
    );
    eprintln!(
        "round-robin, 4 queues: failover {:?} after the cut (slowest I/O round {:?}); failback {:?} after the link came back; {} rounds",
        m.failover, m.worst, m.failback, rig.round
    );
}

#[test]
fn active_standby_moves_to_standby_and_back() {
    let mut rig = Rig::new("as", 2, None);
    let a = rig.portals[0].clone();
    for _ in 0..5 {
        rig.io_round();
    }
    let all_on_a = vec![(a.clone(), true), (a.clone(), true)];
    assert_eq!(rig.paths(), all_on_a);
    let m = rig.cut_and_restore_a(&[0, 1]);
    assert_eq!(rig.paths(), all_on_a, "after the failback");
    eprintln!(
        "active-standby, 2 queues: failover {:?} after the cut (slowest I/O round {:?}); failback {:?} after the link came back",
        m.failover, m.worst, m.failback
    );
}

/// The preferred path answers the probe but its login is refused: the
/// session goes straight back to the other path (I/O goes on), and moves
/// back on a later probe once logins over that path are allowed again.
#[test]
fn refused_failback_returns_to_the_other_path_and_retries() {
    let mut rig = Rig::new("rf", 1, None);
    let [a, b] = rig.portals.clone();
    rig.io_for(Duration::from_millis(300));
    let down = format!("queue 0: path {a} down, continuing on {b}");
    cut_during_io(&mut rig, 0, Duration::from_millis(300), "failover", |log| {
        log.contains(&down)
    });
    // Only logins arriving over link B are allowed from now on.
    rig.tgtd.address_acl(rig.tid, false, "ALL");
    rig.tgtd
        .address_acl(rig.tid, true, &rig.ns.links[1].host_ip);
    rig.ns.set_link(0, true);
    let refused = format!("queue 0: preferred path {a} did not take the session back");
    let continuing = format!("queue 0: continuing on {b}");
    rig.io_until("refused failback", |log| {
        log.contains(&refused) && log.contains(&continuing)
    });
    rig.io_for(Duration::from_millis(500));
    assert_eq!(rig.paths(), vec![(b.clone(), false)], "{}", rig.path_log());
    // Allowed again: the next probe (10 s: doubled after the refusal) brings it back.
    rig.tgtd.address_acl(rig.tid, true, "ALL");
    let back = format!("queue 0: back on preferred path {a}");
    let took = rig.io_until("failback", |log| log.contains(&back));
    assert_eq!(rig.paths(), vec![(a.clone(), true)]);
    rig.verify_all();
    assert_eq!(rig.tgtd.sessions(), 1, "{}", rig.tgtd.show());
    eprintln!("refused failback: back {took:?} after logins were allowed again");
    eprintln!("{}", rig.path_log());
}

/// Failback with a command that does not finish: new commands are held, the
/// drain gives up after its bound (5 s), the session moves anyway and the
/// hung command is re-issued on the preferred path, where it completes.
#[test]
fn failback_bounded_drain_reissues_a_hung_command() {
    use support::fake_target::{FakeTarget, Misbehave};
    let ns = Netns::new("hg", 232, 2);
    let t = FakeTarget::start_in(Some(&ns.name), "0.0.0.0", 16 * MIB, false);
    let [a, b] = [0, 1].map(|k| format!("{}:{}", ns.links[k].inner_ip, t.port()));
    let url = format!("iscsi://{a}/{}/0", support::fake_target::FAKE_IQN);
    let backend = Backend::start_env(
        &["--target", &url, "--portal", &b],
        &[(
            "VHOST_ISER_TIMEOUTS",
            "nop=1,nop_timeout=1,command=30,tmf=2,replacement=40",
        )],
    );
    let mut c = Client::connect(&backend.socket, 1, 4 * MIB);
    let write = |c: &mut Client, at: u64, seed: u8, off: usize| {
        let data = pattern(at, LEN, seed);
        c.buf()[off..off + LEN].copy_from_slice(&data);
        let p = c.ptr(off);
        c.queues[0].write(at, p, LEN, seed as usize, ReqFlags::empty());
    };
    write(&mut c, 0, 1, 0);
    assert_eq!(c.wait(0, 1)[0].1, 0);

    ns.set_link(0, false);
    write(&mut c, 0, 2, 0);
    assert_eq!(c.wait(0, 1)[0].1, 0, "{}", backend.log());
    assert!(backend
        .log()
        .contains(&format!("queue 0: path {a} down, continuing on {b}")));

    // A command hangs on B; then path A comes back.
    t.arm(Misbehave::HangCommand, false);
    write(&mut c, MIB as u64, 3, 0);
    std::thread::sleep(Duration::from_millis(300));
    ns.set_link(0, true);
    let up = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    write(&mut c, 2 * MIB as u64, 4, LEN);
    let done = c.wait(0, 2);
    let took = up.elapsed();
    assert!(
        done.iter().all(|&(_, r)| r == 0),
        "{done:?}; log:\n{}",
        backend.log()
    );
    let log = backend.log();
    assert!(
        log.contains(&format!(
            "command(s) still running on {b} after 5s; moving anyway"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("queue 0: back on preferred path {a}")),
        "{log}"
    );
    assert_eq!(t.disk(MIB, LEN), pattern(MIB as u64, LEN, 3));
    assert_eq!(t.disk(2 * MIB, LEN), pattern(2 * MIB as u64, LEN, 4));
    eprintln!("failback past a hung command: both writes done {took:?} after the link came back");
}
