//! Integration tests of the iSER RDMA building blocks.
//!
//! - On a host without RDMA: the clear "no RDMA device" error.
//! - `rdma_vm_suite` boots the soft-RoCE VM (rdma_rxe) with the VM runner and
//!   runs this same test binary inside it, filtered to the `vm_*` tests, with
//!   `VHOST_ISER_RDMA_VM=1`; it asserts the in-VM run exits 0. The `vm_*`
//!   tests return early (trivially pass) only outside that run, so they can
//!   never pass silently without the launcher having run them.
//!   Set `VHOST_ISER_SKIP_RDMA_VM=1` to skip the VM deliberately (it prints
//!   so), `VHOST_ISER_RDMA_VM_RUNNER` to use another runner script.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use vhost_iser::transport::iser::cm::CmHdr;
use vhost_iser::transport::iser::header::{ControlHeader, RemoteBuffer, CONTROL_HEADER_LEN};
use vhost_iser::transport::iser::verbs::{
    self, Access, CmId, CompletionQueue, ConnParam, Listener, QpCaps, RegisteredPool, SendFlags,
    SendOp, SendWr, VerbsError, WcOpcode, WcStatus, WorkCompletion,
};

const VM_ENV: &str = "VHOST_ISER_RDMA_VM";
const DEFAULT_RUNNER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/qemu/rdma-vm.sh");
const START_TARGETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/qemu/rdma/start-targets.sh");
const VM_TESTS: [&str; 2] = ["vm_loopback_send_write_read", "vm_tgtd_login"];
const T: Duration = Duration::from_secs(10);

fn in_vm() -> bool {
    std::env::var(VM_ENV).as_deref() == Ok("1")
}

#[test]
fn host_without_rdma_reports_clear_error() {
    if in_vm() {
        return;
    }
    let names = verbs::device_names();
    if !names.is_empty() {
        eprintln!("this host has RDMA devices {names:?}; the no-device check does not apply");
        return;
    }
    let msg = verbs::ensure_device().unwrap_err().to_string();
    assert_eq!(
        msg,
        "no RDMA device found (ibv_get_device_list saw: none); is the rdma_rxe/mlx5 module loaded?"
    );
    let err = CmId::resolve("10.99.0.1:3260".parse().unwrap(), T).unwrap_err();
    assert!(matches!(err, VerbsError::NoDevice { .. }), "{err}");
    assert_eq!(err.to_string(), msg);
}

#[test]
fn rdma_vm_suite() {
    if in_vm() {
        return; // we are the inner run
    }
    if std::env::var("VHOST_ISER_SKIP_RDMA_VM").as_deref() == Ok("1") {
        eprintln!("SKIPPED: soft-RoCE VM tests (VHOST_ISER_SKIP_RDMA_VM=1)");
        return;
    }
    let runner =
        std::env::var("VHOST_ISER_RDMA_VM_RUNNER").unwrap_or_else(|_| DEFAULT_RUNNER.to_string());
    assert!(
        std::path::Path::new(&runner).exists(),
        "RDMA VM runner {runner} not found; set VHOST_ISER_RDMA_VM_RUNNER or VHOST_ISER_SKIP_RDMA_VM=1"
    );
    let exe = std::env::current_exe().expect("test binary path");
    let start = Instant::now();
    let status = Command::new(&runner)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["--timeout", "300", "--mem", "1024", "--"])
        .arg(&exe)
        .args(VM_TESTS)
        .args(["--exact", "--test-threads=1", "--nocapture"])
        .env(VM_ENV, "1")
        .status()
        .expect("spawn the RDMA VM runner");
    eprintln!("RDMA VM run took {:?}", start.elapsed());
    assert!(
        status.success(),
        "tests inside the RDMA VM failed: {status}"
    );
}

/// Waits for the next completion on `cq` using the completion channel fd in
/// an epoll set (the way the transport will): poll, arm, poll, wait.
fn next_wc(cq: &CompletionQueue, timeout: Duration) -> WorkCompletion {
    let deadline = Instant::now() + timeout;
    let mut wcs = WorkCompletion::batch(1);
    // SAFETY: plain epoll syscalls on fds we own; ev is a valid pointer.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0);
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: 1,
    };
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, cq.as_raw_fd(), &mut ev) },
        0
    );
    let wc = loop {
        if cq.poll(&mut wcs).unwrap() == 1 {
            break wcs[0].clone();
        }
        cq.arm().unwrap();
        if cq.poll(&mut wcs).unwrap() == 1 {
            break wcs[0].clone();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no completion within {timeout:?}");
        let mut out = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: out is a valid array of 1.
        let n = unsafe { libc::epoll_wait(ep, &mut out, 1, left.as_millis() as i32 + 1) };
        if n == 1 {
            assert!(cq.get_events().unwrap() >= 1);
        }
    };
    // SAFETY: closing our own epoll fd.
    unsafe { libc::close(ep) };
    wc
}

fn expect_ok(wc: &WorkCompletion, wr_id: u64, op: WcOpcode) {
    assert!(wc.is_ok(), "completion {wc:?} failed: {}", wc.status());
    assert_eq!(wc.wr_id(), wr_id, "{wc:?}");
    assert_eq!(wc.opcode(), op, "{wc:?}");
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

const BUF: usize = 4096;
// Buffer roles (same indices on both sides). Receives use buffers 6..=9,
// the wr_id of a receive is its buffer index.
const SEND: usize = 1; // send staging
const EXPOSE_READ: usize = 2; // peer RDMA-Reads this
const EXPOSE_WRITE: usize = 3; // peer RDMA-Writes this
const LOCAL_DST: usize = 4; // our RDMA Read lands here
const LOCAL_SRC: usize = 5; // our RDMA Write comes from here

struct Side {
    id: CmId,
    scq: CompletionQueue,
    rcq: CompletionQueue,
    qp: verbs::QueuePair,
    pool: RegisteredPool,
}

fn setup(id: CmId) -> Side {
    let pd = id.alloc_pd().unwrap();
    let scq = id.create_cq(32).unwrap();
    let rcq = id.create_cq(32).unwrap();
    let qp = id.create_qp(&pd, &scq, &rcq, QpCaps::default()).unwrap();
    let pool = RegisteredPool::new(&pd, BUF, 10, Access::ISER_DATA).unwrap();
    Side {
        id,
        scq,
        rcq,
        qp,
        pool,
    }
}

impl Side {
    fn post_recv(&self, buf: usize) {
        self.qp
            .post_recv(buf as u64, &[self.pool.sge(buf, BUF).unwrap()])
            .unwrap();
    }

    fn advert(&self) -> ControlHeader {
        let rkey = self.pool.mr().rkey();
        ControlHeader {
            write: Some(RemoteBuffer {
                stag: rkey,
                va: self.pool.addr(EXPOSE_READ).unwrap(),
            }),
            read: Some(RemoteBuffer {
                stag: rkey,
                va: self.pool.addr(EXPOSE_WRITE).unwrap(),
            }),
        }
    }

    /// Stages `hdr + text` in the SEND buffer and returns its length.
    fn stage(&self, hdr: &ControlHeader, text: &[u8]) -> usize {
        self.pool.write(SEND, 0, &hdr.encode()).unwrap();
        self.pool.write(SEND, CONTROL_HEADER_LEN, text).unwrap();
        CONTROL_HEADER_LEN + text.len()
    }

    /// Receives one message: returns the peer's header and text.
    fn recv_msg(&self, buf: usize) -> (ControlHeader, Vec<u8>) {
        let wc = next_wc(&self.rcq, T);
        expect_ok(&wc, buf as u64, WcOpcode::Recv);
        let len = wc.byte_len() as usize;
        let msg = self.pool.read_vec(buf, 0, len).unwrap();
        let hdr = ControlHeader::decode(&msg).unwrap();
        (hdr, msg[CONTROL_HEADER_LEN..].to_vec())
    }

    /// RDMA Read the peer's exposed buffer, check it, then RDMA Write ours
    /// into the peer, Write unsignaled and linked with a signaled Send (RC
    /// ordering: the Write lands before the Send is delivered).
    fn rdma_roundtrip(&self, peer: &ControlHeader, expect: &[u8], mine: &[u8], text: &[u8]) {
        let w = peer.write.unwrap();
        let r = peer.read.unwrap();
        self.qp
            .post_rdma_read(
                10,
                &[self.pool.sge(LOCAL_DST, BUF).unwrap()],
                w.va,
                w.stag,
                true,
            )
            .unwrap();
        let wc = next_wc(&self.scq, T);
        expect_ok(&wc, 10, WcOpcode::RdmaRead);
        assert_eq!(self.pool.read_vec(LOCAL_DST, 0, BUF).unwrap(), expect);

        self.pool.write(LOCAL_SRC, 0, mine).unwrap();
        let len = self.stage(&ControlHeader::default(), text);
        let src = [self.pool.sge(LOCAL_SRC, BUF).unwrap()];
        let msg = [self.pool.sge(SEND, len).unwrap()];
        self.qp
            .post_send_batch(&[
                SendWr {
                    wr_id: 11,
                    op: SendOp::RdmaWrite {
                        remote_addr: r.va,
                        rkey: r.stag,
                    },
                    sges: &src,
                    flags: SendFlags::NONE,
                },
                SendWr {
                    wr_id: 12,
                    op: SendOp::Send,
                    sges: &msg,
                    flags: SendFlags::SIGNALED,
                },
            ])
            .unwrap();
        let wc = next_wc(&self.scq, T);
        expect_ok(&wc, 12, WcOpcode::Send);
    }
}

#[test]
fn vm_loopback_send_write_read() {
    if !in_vm() {
        return; // run by rdma_vm_suite inside the VM
    }
    println!("RDMA devices: {:?}", verbs::device_names());
    let addr: SocketAddr = "10.99.0.1:18515".parse().unwrap();
    let mut listener = Listener::bind(addr, 4).unwrap();
    println!("listening on {:?}", listener.local_addr());

    // Nobody listens on this port: the CM rejects with reason 8.
    let mut lonely = CmId::resolve("10.99.0.1:18516".parse().unwrap(), T).unwrap();
    let lonely_side = setup_nothing(&lonely);
    let err = lonely
        .connect(
            &ConnParam {
                private_data: CmHdr::initiator().encode().to_vec(),
                ..ConnParam::default()
            },
            T,
        )
        .unwrap_err();
    println!("connect to a closed port: {err}");
    assert!(
        matches!(err, VerbsError::Rejected { reason: 8, .. }),
        "{err:?}"
    );
    drop(lonely_side);
    drop(lonely);

    let (a, b, c, d) = (
        pattern(1, BUF),
        pattern(2, BUF),
        pattern(3, BUF),
        pattern(4, BUF),
    );
    let (a2, b2, c2, d2) = (a.clone(), b.clone(), c.clone(), d.clone());

    let server = thread::spawn(move || {
        let req = listener.get_request(T).unwrap();
        let hdr = CmHdr::decode(&req.private_data).unwrap().unwrap();
        assert_eq!(hdr, CmHdr::initiator());
        println!(
            "server: request from {:?} on {}: {hdr:?}, rr={} depth={}",
            req.id.peer_addr(),
            req.id.device_name().unwrap(),
            req.responder_resources,
            req.initiator_depth
        );
        let mut s = setup(req.id);
        s.pool.write(EXPOSE_READ, 0, &c2).unwrap();
        s.post_recv(6);
        s.post_recv(7);
        s.post_recv(8);
        let caps = s.id.query_device().unwrap();
        s.id.accept(
            &ConnParam {
                private_data: CmHdr {
                    zbva_not_supported: true,
                    send_w_inv_not_supported: true,
                }
                .encode()
                .to_vec(),
                responder_resources: req.initiator_depth.min(caps.max_qp_rd_atom as u8),
                initiator_depth: req.responder_resources.min(caps.max_qp_init_rd_atom as u8),
                retry_count: 7,
                rnr_retry_count: 7,
            },
            T,
        )
        .unwrap();
        // 1. client's advert + PING
        let (peer, text) = s.recv_msg(6);
        assert_eq!(text, b"PING");
        // 2. read client's A, write B into it, send PONG with our advert
        s.rdma_roundtrip(&peer, &a2, &b2, b"");
        // (rdma_roundtrip sent an empty text; now the real PONG + advert)
        let len = s.stage(&s.advert(), b"PONG");
        s.qp.post_send(13, &[s.pool.sge(SEND, len).unwrap()], true)
            .unwrap();
        expect_ok(&next_wc(&s.scq, T), 13, WcOpcode::Send);
        // 3. DONE after the client's RDMA write of D into our EXPOSE_WRITE
        let (_, text) = s.recv_msg(7);
        assert_eq!(text, b"DONE");
        assert_eq!(s.pool.read_vec(EXPOSE_WRITE, 0, BUF).unwrap(), d2);
        // 4. the client's inline Send (no MR on its side)
        let (_, text) = s.recv_msg(8);
        assert_eq!(text, b"BYE!");
        s.id.wait_disconnected(T).unwrap();
        println!("server: peer disconnected");
        s
    });

    let id = CmId::resolve(addr, T).unwrap();
    println!(
        "client: resolved {addr} on {} (local {:?})",
        id.device_name().unwrap(),
        id.local_addr()
    );
    let caps = id.query_device().unwrap();
    println!("client: device caps {caps:?}");
    let mut c_side = setup(id);
    println!("client: QP {:?}", c_side.qp);
    c_side.pool.write(EXPOSE_READ, 0, &a).unwrap();
    c_side.post_recv(6);
    c_side.post_recv(7);
    let rep = c_side
        .id
        .connect(
            &ConnParam {
                private_data: CmHdr::initiator().encode().to_vec(),
                responder_resources: caps.max_qp_rd_atom.min(16) as u8,
                initiator_depth: caps.max_qp_init_rd_atom.min(16) as u8,
                retry_count: 7,
                rnr_retry_count: 7,
            },
            T,
        )
        .unwrap();
    let rep_hdr = CmHdr::decode(&rep).unwrap();
    println!(
        "client: ESTABLISHED, REP private data {} bytes, {rep_hdr:?}",
        rep.len()
    );
    assert_eq!(rep_hdr, Some(CmHdr::initiator()));

    // PING with our advert: 28 + 4 bytes, goes inline automatically.
    let len = c_side.stage(&c_side.advert(), b"PING");
    c_side
        .qp
        .post_send(1, &[c_side.pool.sge(SEND, len).unwrap()], true)
        .unwrap();
    expect_ok(&next_wc(&c_side.scq, T), 1, WcOpcode::Send);
    // Server's empty message after its RDMA write of B.
    let (_, text) = c_side.recv_msg(6);
    assert!(text.is_empty());
    assert_eq!(c_side.pool.read_vec(EXPOSE_WRITE, 0, BUF).unwrap(), b);
    c_side.post_recv(8);
    let (peer, text) = c_side.recv_msg(7);
    assert_eq!(text, b"PONG");
    c_side.rdma_roundtrip(&peer, &c, &d, b"DONE");
    // Inline Send straight from Rust memory (no MR) to the server's recv 8.
    let mut bye = ControlHeader::default().encode().to_vec();
    bye.extend_from_slice(b"BYE!");
    c_side.qp.post_send_inline(2, &bye, true).unwrap();
    expect_ok(&next_wc(&c_side.scq, T), 2, WcOpcode::Send);

    c_side.id.disconnect().unwrap();
    c_side.id.wait_disconnected(T).unwrap();
    // Our recv 8 was never consumed: the disconnect flushes it.
    let wc = next_wc(&c_side.rcq, T);
    assert_eq!(wc.wr_id(), 8);
    assert_eq!(wc.status(), WcStatus::WR_FLUSH_ERR, "{wc:?}");
    println!("client: after disconnect recv 8 -> {}", wc.status());
    let s = server.join().expect("server thread");
    drop(s);
    drop(c_side);
    println!("loopback OK");
}

/// Just a QP for the rejected-connect check (connect needs one).
fn setup_nothing(id: &CmId) -> (verbs::QueuePair, CompletionQueue) {
    let pd = id.alloc_pd().unwrap();
    let cq = id.create_cq(4).unwrap();
    let qp = id.create_qp(&pd, &cq, &cq, QpCaps::default()).unwrap();
    (qp, cq)
}

/// Builds a Login Request (RFC 7143 §11.12) behind an iSER control header.
fn login_request(itt: u32, csg: u8, nsg: u8, exp_stat_sn: u32, text: &str) -> Vec<u8> {
    let data = text.as_bytes();
    let mut pdu = ControlHeader::default().encode().to_vec();
    let mut bhs = [0u8; 48];
    bhs[0] = 0x43; // Immediate | Login Request
    bhs[1] = 0x80 | (csg << 2) | nsg; // Transit
    let dlen = (data.len() as u32).to_be_bytes();
    bhs[5..8].copy_from_slice(&dlen[1..4]);
    bhs[8..14].copy_from_slice(&[0x00, 0x02, 0x3d, 0x00, 0x00, 0x01]); // ISID
    bhs[16..20].copy_from_slice(&itt.to_be_bytes());
    bhs[24..28].copy_from_slice(&1u32.to_be_bytes()); // CmdSN
    bhs[28..32].copy_from_slice(&exp_stat_sn.to_be_bytes());
    pdu.extend_from_slice(&bhs);
    pdu.extend_from_slice(data);
    while pdu.len() % 4 != 0 {
        pdu.push(0);
    }
    pdu
}

struct LoginResponse {
    flags: u8,
    stat_sn: u32,
    status_class: u8,
    status_detail: u8,
    text: String,
}

fn parse_login_response(msg: &[u8], itt: u32) -> LoginResponse {
    let hdr = ControlHeader::decode(msg).unwrap();
    assert_eq!(
        hdr,
        ControlHeader::default(),
        "target sent STags in a login response"
    );
    let bhs = &msg[CONTROL_HEADER_LEN..CONTROL_HEADER_LEN + 48];
    assert_eq!(
        bhs[0] & 0x3f,
        0x23,
        "not a Login Response: {:02x?}",
        &bhs[..8]
    );
    assert_eq!(u32::from_be_bytes(bhs[16..20].try_into().unwrap()), itt);
    let dlen = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
    let data = &msg[CONTROL_HEADER_LEN + 48..CONTROL_HEADER_LEN + 48 + dlen];
    LoginResponse {
        flags: bhs[1],
        stat_sn: u32::from_be_bytes(bhs[24..28].try_into().unwrap()),
        status_class: bhs[36],
        status_detail: bhs[37],
        text: String::from_utf8_lossy(data).replace('\0', " "),
    }
}

#[test]
fn vm_tgtd_login() {
    if !in_vm() {
        return; // run by rdma_vm_suite inside the VM
    }
    let out = Command::new(START_TARGETS)
        .arg("tgt")
        .output()
        .expect("run start-targets.sh");
    println!(
        "start-targets: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success());
    let result = std::panic::catch_unwind(tgtd_login_inner);
    if result.is_err() {
        let log = std::fs::read_to_string("/tmp/tgtd.log").unwrap_or_default();
        println!("--- /tmp/tgtd.log ---\n{log}");
    }
    result.unwrap();
}

fn tgtd_login_inner() {
    let initiator = "iqn.2026-11.vhost-iser:initiator";
    // Discovery session: tgtd completes the login but answers
    // RDMAExtensions=No (iSER does not apply to discovery).
    let rsp = tgtd_login(&format!(
        "InitiatorName={initiator}\0SessionType=Discovery\0AuthMethod=None\0"
    ));
    assert!(rsp.text.contains("RDMAExtensions="), "{}", rsp.text);
    // Normal session to the iSER target: RDMAExtensions=Yes negotiated.
    let rsp = tgtd_login(&format!(
        "InitiatorName={initiator}\0TargetName=iqn.2026-11.vhost-iser:tgt\0SessionType=Normal\0AuthMethod=None\0"
    ));
    assert!(rsp.text.contains("RDMAExtensions=Yes"), "{}", rsp.text);
    println!("tgtd login over iSER OK");
}

/// One connection to tgtd: RDMA CM connect with the iSER CM header, then a
/// two-step login (security → operational → full feature) with hand-built
/// Login Request PDUs behind iSER control headers. Returns the last
/// response (status already checked).
fn tgtd_login(security_keys: &str) -> LoginResponse {
    let portal: SocketAddr = "10.99.0.1:3260".parse().unwrap();
    let id = CmId::resolve(portal, T).unwrap();
    let caps = id.query_device().unwrap();
    let pd = id.alloc_pd().unwrap();
    let scq = id.create_cq(16).unwrap();
    let rcq = id.create_cq(16).unwrap();
    let qp = id.create_qp(&pd, &scq, &rcq, QpCaps::default()).unwrap();
    // Receive buffers: iSER header + BHS + 8 KiB login data, rounded up.
    const RBUF: usize = 16384;
    let mut pool = RegisteredPool::new(&pd, RBUF, 4, Access::LOCAL_WRITE).unwrap();
    let r0 = pool.take().unwrap();
    let r1 = pool.take().unwrap();
    let sbuf = pool.take().unwrap();
    qp.post_recv(r0 as u64, &[pool.sge(r0, RBUF).unwrap()])
        .unwrap();
    qp.post_recv(r1 as u64, &[pool.sge(r1, RBUF).unwrap()])
        .unwrap();
    let mut id = id;
    let rep = id
        .connect(
            &ConnParam {
                private_data: CmHdr::initiator().encode().to_vec(),
                responder_resources: caps.max_qp_rd_atom.min(16) as u8,
                initiator_depth: 1,
                retry_count: 7,
                rnr_retry_count: 7,
            },
            T,
        )
        .unwrap();
    println!(
        "tgtd: ESTABLISHED on {}; REP private data {} bytes, first 8 {:02x?}, decoded {:?}",
        id.device_name().unwrap(),
        rep.len(),
        &rep[..rep.len().min(8)],
        CmHdr::decode(&rep)
    );

    let exchange = |itt: u32, csg: u8, nsg: u8, exp_stat_sn: u32, text: &str, rbuf: usize| {
        let pdu = login_request(itt, csg, nsg, exp_stat_sn, text);
        pool.write(sbuf, 0, &pdu).unwrap();
        qp.post_send(50 + itt as u64, &[pool.sge(sbuf, pdu.len()).unwrap()], true)
            .unwrap();
        expect_ok(&next_wc(&scq, T), 50 + itt as u64, WcOpcode::Send);
        let wc = next_wc(&rcq, T);
        expect_ok(&wc, rbuf as u64, WcOpcode::Recv);
        let msg = pool.read_vec(rbuf, 0, wc.byte_len() as usize).unwrap();
        let rsp = parse_login_response(&msg, itt);
        println!(
            "tgtd: login rsp ITT {itt}: {} bytes, flags {:#04x}, StatSN {}, status {}/{}, text: {}",
            wc.byte_len(),
            rsp.flags,
            rsp.stat_sn,
            rsp.status_class,
            rsp.status_detail,
            rsp.text
        );
        assert_eq!(rsp.status_class, 0, "tgtd refused the login: {}", rsp.text);
        rsp
    };
    // Security stage → operational, no authentication.
    let rsp = exchange(1, 0, 1, 0, security_keys, r0);
    assert_eq!(
        rsp.flags & 0x8f,
        0x81,
        "expected Transit security → operational"
    );
    // Operational stage → full feature, with the iSER keys (RFC 7145 §6).
    // tgtd may answer without Transit, offering keys of its own (it forces
    // ImmediateData=No on iSER): echo them back until it transits.
    let mut keys = "RDMAExtensions=Yes\0HeaderDigest=None\0DataDigest=None\0MaxRecvDataSegmentLength=8192\0InitiatorRecvDataSegmentLength=8192\0TargetRecvDataSegmentLength=8192\0".to_string();
    let mut stat_sn = rsp.stat_sn;
    let mut all_text = String::new();
    let mut rbuf = r1;
    let mut spare = r0;
    for round in 0.. {
        assert!(round < 4, "tgtd did not finish the operational stage");
        let rsp = exchange(1, 1, 3, stat_sn.wrapping_add(1), &keys, rbuf);
        all_text.push_str(&rsp.text);
        if rsp.flags & 0x80 != 0 {
            assert_eq!(
                rsp.flags & 0x8f,
                0x87,
                "expected Transit operational → full feature"
            );
            break;
        }
        // Re-post the consumed buffer, answer the keys the target offered.
        std::mem::swap(&mut rbuf, &mut spare);
        qp.post_recv(rbuf as u64, &[pool.sge(rbuf, RBUF).unwrap()])
            .unwrap();
        keys = rsp
            .text
            .split(' ')
            .filter(|kv| kv.starts_with("ImmediateData=") || kv.starts_with("InitialR2T="))
            .map(|kv| format!("{kv}\0"))
            .collect();
        stat_sn = rsp.stat_sn;
    }
    let rsp = LoginResponse {
        flags: 0x87,
        stat_sn,
        status_class: 0,
        status_detail: 0,
        text: all_text,
    };
    id.disconnect().unwrap();
    id.wait_disconnected(T).unwrap();
    pool.give_back(sbuf).unwrap();
    drop(qp);
    rsp
}
