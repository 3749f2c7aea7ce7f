//! A hostile iSCSI target: the real vhost-iser binary, driven by libblkio,
//! against a scripted fake target that breaks the protocol in one way per
//! test. Each time the backend must name what was wrong in its log, never
//! hang beyond its timeouts, never crash, and recover: the I/O completes
//! after a new login (or fails cleanly when the target keeps misbehaving),
//! and I/O works again afterwards.

mod client;
mod support;

use std::time::{Duration, Instant};

use client::{pattern, Backend, Client};
use support::fake_target::{FakeTarget, Misbehave};
use vhost_iser::iscsi::pdu::TmfFunction;

const MIB: usize = 1 << 20;
/// Short timers so a test takes seconds: ping after 1 s idle, 1 s to answer,
/// commands abort after 2 s, task management 1 s, 8 s to reconnect.
const TIMEOUTS: &str = "nop=1,nop_timeout=1,command=2,tmf=1,replacement=8";

fn setup(digests: bool) -> (FakeTarget, Backend, Client) {
    let t = FakeTarget::start(16 * MIB, digests);
    let url = t.url();
    let mut args = vec!["--target", url.as_str()];
    if digests {
        args.extend(["--digests", "both"]);
    }
    let b = Backend::start_env(&args, &[("VHOST_ISER_TIMEOUTS", TIMEOUTS)]);
    let c = Client::connect(&b.socket, 1, 4 * MIB);
    assert_eq!(c.capacity(), 16 * MIB as u64);
    (t, b, c)
}

/// Writes then reads back `len` bytes at `at`; returns (write ret, read ret, data matched).
fn write_read(c: &mut Client, at: u64, len: usize, seed: u8) -> (i32, i32, bool) {
    let data = pattern(at, len, seed);
    c.buf()[..len].copy_from_slice(&data);
    let w = c.write(0, at, 0, len);
    let off = 2 * MIB;
    c.buf()[off..off + len].fill(0xEE);
    let r = c.read(0, at, off, len);
    (w, r, c.buf()[off..off + len] == data[..])
}

/// Runs one misbehaviour once: the I/O recovers through a reconnect, the log
/// names the problem, and plain I/O works afterwards.
fn recovers(m: Misbehave, digests: bool, len: usize, expect_log: &str) {
    let (t, b, mut c) = setup(digests);
    assert_eq!(write_read(&mut c, 0, 4096, 1), (0, 0, true));
    let logins = t.connections();
    t.arm(m, false);
    let start = Instant::now();
    let (w, r, ok) = write_read(&mut c, 64 * 1024, len, 2);
    let took = start.elapsed();
    assert_eq!(
        (w, r, ok),
        (0, 0, true),
        "{m:?}: I/O not recovered; log:\n{}",
        b.log()
    );
    assert!(
        took < Duration::from_secs(15),
        "{m:?}: recovery took {took:?}"
    );
    assert_eq!(
        t.disk(64 * 1024, len),
        pattern(64 * 1024, len, 2),
        "{m:?}: target data"
    );
    let log = b.log();
    assert!(
        log.contains(expect_log),
        "{m:?}: log lacks {expect_log:?}:\n{log}"
    );
    assert!(t.connections() > logins, "{m:?}: no new login; log:\n{log}");
    assert!(log.contains("reconnected to"), "{m:?}: {log}");
    assert_eq!(
        write_read(&mut c, 8 * MIB as u64, 128 * 1024, 3),
        (0, 0, true)
    );
    eprintln!("{m:?}: recovered in {took:?}");
}

#[test]
fn wrong_itt_recovers() {
    recovers(Misbehave::WrongItt, false, 4096, "for unknown task");
}

#[test]
fn truncated_pdu_then_close_recovers() {
    recovers(
        Misbehave::TruncateThenClose,
        false,
        4096,
        "connection to 127.0.0.1",
    );
}

#[test]
fn giant_data_segment_length_recovers() {
    recovers(Misbehave::GiantDsl, false, 4096, "16777215");
}

#[test]
fn bad_header_digest_recovers() {
    recovers(Misbehave::BadHeaderDigest, true, 4096, "digest");
}

#[test]
fn statsn_out_of_order_recovers() {
    recovers(Misbehave::StatSnOutOfOrder, false, 4096, "out of order");
}

#[test]
fn r2t_beyond_buffer_recovers() {
    // 128 KiB: 64 KiB immediate data, the rest solicited by R2T.
    recovers(Misbehave::R2tBeyondBuffer, false, 128 * 1024, "beyond the");
}

#[test]
fn data_in_overflow_recovers() {
    recovers(Misbehave::DataInOverflow, false, 4096, "overflows");
}

#[test]
fn silent_target_is_detected_by_ping_and_recovers() {
    recovers(
        Misbehave::Silence,
        false,
        4096,
        "did not answer a NOP-Out ping",
    );
}

#[test]
fn hung_command_is_aborted_and_fails_cleanly() {
    let (t, b, mut c) = setup(false);
    assert_eq!(write_read(&mut c, 0, 4096, 1), (0, 0, true));
    t.arm(Misbehave::HangCommand, false);
    let start = Instant::now();
    let (w, _, _) = write_read(&mut c, 4096, 4096, 2);
    let took = start.elapsed();
    assert_ne!(w, 0, "a command the target never finished must not succeed");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(t.tmfs(), vec![TmfFunction::AbortTask]);
    assert!(b.log().contains("sending ABORT TASK"), "{}", b.log());
    assert_eq!(write_read(&mut c, 8192, 4096, 3), (0, 0, true));
}

#[test]
fn refused_abort_escalates_to_lun_reset() {
    let (t, b, mut c) = setup(false);
    assert_eq!(write_read(&mut c, 0, 4096, 1), (0, 0, true));
    t.arm(Misbehave::HangCommandRefuseAbort, false);
    let (w, _, _) = write_read(&mut c, 4096, 4096, 2);
    assert_ne!(w, 0);
    assert_eq!(
        t.tmfs(),
        vec![TmfFunction::AbortTask, TmfFunction::LogicalUnitReset]
    );
    let log = b.log();
    assert!(log.contains("resetting the LUN"), "{log}");
    assert!(log.contains("LUN reset done"), "{log}");
    assert_eq!(write_read(&mut c, 8192, 4096, 3), (0, 0, true));
}

#[test]
fn persistent_misbehaviour_fails_the_io_instead_of_looping() {
    let (t, b, mut c) = setup(false);
    assert_eq!(write_read(&mut c, 0, 4096, 1), (0, 0, true));
    t.arm(Misbehave::WrongItt, true);
    let start = Instant::now();
    let data = pattern(0, 4096, 9);
    c.buf()[..4096].copy_from_slice(&data);
    let w = c.write(0, 0, 0, 4096);
    assert_ne!(w, 0, "a write the target never acknowledged must fail");
    assert!(start.elapsed() < Duration::from_secs(20));
    t.arm(Misbehave::None, false);
    assert_eq!(
        write_read(&mut c, 4096, 4096, 3),
        (0, 0, true),
        "{}",
        b.log()
    );
}

#[test]
fn idle_session_is_pinged() {
    let (t, _b, _c) = setup(false);
    std::thread::sleep(Duration::from_millis(3500));
    assert!(t.nop_outs() >= 2, "NOP-Outs: {}", t.nop_outs());
    assert_eq!(t.connections(), 1);
}

/// BUSY and TASK SET FULL: retried after a delay, and the I/O succeeds on
/// the same session.
#[test]
fn busy_and_task_set_full_are_retried_later() {
    let (t, b, mut c) = setup(false);
    for m in [Misbehave::Busy, Misbehave::TaskSetFull] {
        t.arm(m, false);
        assert_eq!(write_read(&mut c, 4096, 4096, 5), (0, 0, true), "{m:?}");
    }
    let log = b.log();
    assert!(log.contains("retrying WRITE(10) in"), "{log}");
    assert!(log.contains("BUSY"), "{log}");
    assert!(log.contains("TASK SET FULL"), "{log}");
    assert_eq!(t.connections(), 1, "no reconnect for a busy target");
}

/// UNIT ATTENTION 2A/09: the command is retried and the new capacity read.
#[test]
fn capacity_change_is_re_read() {
    let (t, b, mut c) = setup(false);
    t.arm(Misbehave::CapacityChanged, false);
    assert_eq!(write_read(&mut c, 4096, 4096, 6), (0, 0, true));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !b.log().contains("now has 65536 sectors") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        b.log().contains("now has 65536 sectors (was 32768)"),
        "{}",
        b.log()
    );
}

/// RESERVATION CONFLICT: an error for the guest with a log line that says why.
#[test]
fn reservation_conflict_is_reported() {
    let (t, b, mut c) = setup(false);
    t.arm(Misbehave::ReservationConflict, false);
    let (w, r, _) = write_read(&mut c, 4096, 4096, 7);
    assert_ne!(w, 0);
    assert_eq!(r, 0);
    assert!(
        b.log()
            .contains("RESERVATION CONFLICT: another initiator holds a SCSI reservation"),
        "{}",
        b.log()
    );
}

/// A network namespace with a veth pair to the host: `10.231.N.1` here,
/// `10.231.N.2` inside (a test host of this run's own). Removed when dropped.
struct Netns {
    name: String,
    host_if: String,
    inner_ip: String,
}

fn ip(args: &[&str]) {
    let st = std::process::Command::new(support::require_tool("ip", "iproute2"))
        .args(args)
        .status()
        .expect("run ip");
    assert!(
        st.success(),
        "ip {args:?} failed (network namespaces need root)"
    );
}

impl Netns {
    fn new() -> Netns {
        let id = std::process::id() % 250;
        let name = format!("vhiser-test-{}", std::process::id());
        let host_if = format!("vhi{id}a");
        let inner_if = format!("vhi{id}b");
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &host_if])
            .status();
        ip(&["netns", "add", &name]);
        let n = Netns {
            name: name.clone(),
            host_if: host_if.clone(),
            inner_ip: format!("10.231.{id}.2"),
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &inner_if,
        ]);
        ip(&["link", "set", &inner_if, "netns", &name]);
        ip(&["addr", "add", &format!("10.231.{id}.1/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        let inner = |a: &[&str]| {
            let mut v = vec!["netns", "exec", name.as_str(), "ip"];
            v.extend_from_slice(a);
            ip(&v);
        };
        inner(&[
            "addr",
            "add",
            &format!("10.231.{id}.2/30"),
            "dev",
            &inner_if,
        ]);
        inner(&["link", "set", &inner_if, "up"]);
        inner(&["link", "set", "lo", "up"]);
        n
    }

    fn link(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The target sits behind a veth link that goes down for 4 s in the middle
/// of a write: the ping notices, the session reconnects once the link is
/// back, the write completes and lands on the target.
#[test]
fn network_partition_heals_and_io_completes() {
    let ns = Netns::new();
    let t = FakeTarget::start_in(Some(&ns.name), &ns.inner_ip, 16 * MIB, false);
    let url = t.url();
    let b = Backend::start_env(
        &["--target", &url],
        &[(
            "VHOST_ISER_TIMEOUTS",
            "nop=1,nop_timeout=1,command=20,replacement=30",
        )],
    );
    let mut c = Client::connect(&b.socket, 1, 4 * MIB);
    assert_eq!(write_read(&mut c, 0, 4096, 1), (0, 0, true));
    ns.link(false);
    let down = Instant::now();
    let len = 64 * 1024;
    let data = pattern(MIB as u64, len, 4);
    c.buf()[..len].copy_from_slice(&data);
    let p = c.ptr(0);
    c.queues[0].write(MIB as u64, p, len, 1, blkio::ReqFlags::empty());
    std::thread::sleep(Duration::from_secs(4));
    ns.link(true);
    let up = Instant::now();
    let r = c.wait(0, 1)[0].1;
    let recovered = up.elapsed();
    assert_eq!(r, 0, "write across the partition failed; log:\n{}", b.log());
    assert_eq!(t.disk(MIB, len), data);
    let log = b.log();
    assert!(
        log.contains("did not answer a NOP-Out ping") || log.contains("lost"),
        "{log}"
    );
    assert!(log.contains("reconnected to"), "{log}");
    assert!(
        recovered < Duration::from_secs(15),
        "took {recovered:?} after the link came back"
    );
    eprintln!(
        "partition of {:?}: write completed {recovered:?} after the link came back",
        up - down
    );
    assert_eq!(write_read(&mut c, 2 * MIB as u64, 4096, 5), (0, 0, true));
}

/// The target goes away for good: commands wait for the replacement
/// timeout (8 s here), then fail; nothing hangs.
#[test]
fn target_gone_for_good_fails_after_the_replacement_timeout() {
    let (t, b, mut c) = setup(false);
    assert_eq!(write_read(&mut c, 0, 4096, 1), (0, 0, true));
    drop(t);
    let start = Instant::now();
    let data = pattern(0, 4096, 9);
    c.buf()[..4096].copy_from_slice(&data);
    let w = c.write(0, 0, 0, 4096);
    let took = start.elapsed();
    assert_ne!(w, 0, "a write to a vanished target must fail");
    assert!(
        took >= Duration::from_secs(7) && took < Duration::from_secs(12),
        "failed after {took:?}, expected about the 8 s replacement timeout"
    );
    let log = b.log();
    assert!(log.contains("replacement timeout"), "{log}");
    // New requests fail at once now.
    let start = Instant::now();
    assert_ne!(c.read(0, 0, 0, 4096), 0);
    assert!(start.elapsed() < Duration::from_secs(2));
}

/// Coalesced receive at depth (the backend waits for the bytes of several
/// reads before waking): when every read fails with a short response, the
/// bytes it waits for never come. The wait must give up within a timer tick
/// or two, not hang until the commands time out.
#[test]
fn coalesced_wait_gives_up_when_reads_fail_short() {
    let (t, b, mut c) = setup(false);
    assert_eq!(write_read(&mut c, 0, 4096, 1), (0, 0, true));
    t.arm(Misbehave::ReservationConflict, true);
    let n = 64;
    let start = Instant::now();
    for i in 0..n {
        let p = c.ptr(i * 4096);
        c.queues[0].read((i * 4096) as u64, p, 4096, i, blkio::ReqFlags::empty());
    }
    let done = c.wait(0, n);
    let took = start.elapsed();
    assert_eq!(done.len(), n);
    assert!(done.iter().all(|&(_, ret)| ret != 0), "{done:?}");
    // The command timeout here is 2 s: a wait that did not give up would end
    // only through aborts.
    assert!(
        took < Duration::from_millis(1000),
        "{n} failing reads took {took:?}; log:\n{}",
        b.log()
    );
    t.arm(Misbehave::None, false);
    assert_eq!(write_read(&mut c, 8192, 4096, 2), (0, 0, true));
}
