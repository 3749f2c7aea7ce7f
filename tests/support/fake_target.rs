//! A small, scriptable iSCSI target on 127.0.0.1 for robustness tests.
//!
//! It logs in (no authentication, one connection per session), serves one
//! in-memory LUN of 512-byte blocks well enough for the backend's start-up
//! probe and for READ/WRITE(10/16), and on request misbehaves in one
//! [`Misbehave`] way at the next READ or WRITE it receives. Every connection
//! runs in its own thread; the listener stops when the value is dropped.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost_iser::iscsi::digest::{data_digest, header_digest};
use vhost_iser::iscsi::pdu::{
    pad_len, peek_lengths, DataIn, InitiatorPdu, LoginResponse, NopIn, R2t, ScsiResponse, SeqNums,
    Stage, TaskMgmtResponse, TmfFunction, TmfResponse, BHS_LEN, U24,
};

/// The target's IQN.
pub const FAKE_IQN: &str = "iqn.2026-11.vhost-iser.test:fake";

/// One way to break the protocol (applied once, at the next READ or WRITE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehave {
    /// Behave.
    None,
    /// Answer with an Initiator Task Tag the initiator never used.
    WrongItt,
    /// Send half a PDU header, then close the connection.
    TruncateThenClose,
    /// A response whose DataSegmentLength is 16 MiB - 1.
    GiantDsl,
    /// A response with a wrong header digest (needs digests negotiated).
    BadHeaderDigest,
    /// A response whose StatSN skips ahead.
    StatSnOutOfOrder,
    /// (WRITE) an R2T for data beyond the command's buffer.
    R2tBeyondBuffer,
    /// (READ) a Data-In with more data than the command asked for.
    DataInOverflow,
    /// Stop answering anything on this connection (pings included).
    Silence,
    /// Ignore this command only; answer pings and task management.
    HangCommand,
    /// Like `HangCommand`, and refuse ABORT TASK (a LUN RESET follows).
    HangCommandRefuseAbort,
    /// Answer BUSY (the initiator retries later).
    Busy,
    /// Answer TASK SET FULL.
    TaskSetFull,
    /// Double the LUN and answer UNIT ATTENTION 2A/09 (capacity data changed).
    CapacityChanged,
    /// Answer RESERVATION CONFLICT.
    ReservationConflict,
}

struct Shared {
    disk: Vec<u8>,
    script: Misbehave,
    /// Apply `script` to every I/O (not just the next one).
    persistent: bool,
    digests: bool,
    /// Apply `script` only to an I/O that starts at this LBA.
    at_lba: Option<u64>,
    connections: usize,
    tmfs: Vec<TmfFunction>,
    nop_outs: usize,
}

/// A running fake target.
pub struct FakeTarget {
    host: String,
    port: u16,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeTarget {
    /// Starts a target with a `size`-byte LUN; `digests` makes it choose CRC32C
    /// header and data digests when the initiator offers them.
    pub fn start(size: usize, digests: bool) -> FakeTarget {
        Self::start_in(None, "127.0.0.1", size, digests)
    }

    /// Like [`start`](Self::start), listening on `addr` inside the network
    /// namespace `netns` (a name under /var/run/netns) when given.
    pub fn start_in(netns: Option<&str>, addr: &str, size: usize, digests: bool) -> FakeTarget {
        let (tx, rx) = std::sync::mpsc::channel();
        let netns = netns.map(|n| format!("/var/run/netns/{n}"));
        let addr = addr.to_string();
        let listen = std::thread::spawn(move || {
            if let Some(ns) = netns {
                let f = std::fs::File::open(&ns).expect("open netns");
                use std::os::fd::AsRawFd;
                // SAFETY: setns on a valid namespace fd; affects this thread only
                // (and the threads it spawns).
                let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns {ns}: {}", std::io::Error::last_os_error());
            }
            let l = TcpListener::bind((addr.as_str(), 0)).expect("bind fake target");
            l.set_nonblocking(true).expect("nonblocking");
            tx.send(l).expect("send listener");
        });
        let listener = rx.recv().expect("fake target listener");
        listen.join().expect("listener thread");
        let port = listener.local_addr().unwrap().port();
        let host = listener.local_addr().unwrap().ip().to_string();
        let shared = Arc::new(Mutex::new(Shared {
            disk: vec![0u8; size],
            script: Misbehave::None,
            persistent: false,
            digests,
            at_lba: None,
            connections: 0,
            tmfs: Vec::new(),
            nop_outs: 0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (shared.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((sock, _)) => {
                        s2.lock().unwrap().connections += 1;
                        let (s3, st3) = (s2.clone(), st2.clone());
                        std::thread::spawn(move || {
                            let mut c = Conn::new(sock, s3, st3);
                            let _ = c.run();
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FakeTarget {
            host,
            port,
            shared,
            stop,
            thread: Some(thread),
        }
    }

    /// `iscsi://127.0.0.1:PORT/IQN/0`.
    pub fn url(&self) -> String {
        format!("iscsi://{}:{}/{FAKE_IQN}/0", self.host, self.port)
    }

    /// The TCP port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Misbehaves at the next READ or WRITE (or at every one, `persistent`).
    pub fn arm(&self, m: Misbehave, persistent: bool) {
        let mut s = self.shared.lock().unwrap();
        s.script = m;
        s.persistent = persistent;
        s.at_lba = None;
    }

    /// Misbehaves at the next READ or WRITE that starts at block `lba`
    /// (other I/O is served normally).
    pub fn arm_at(&self, m: Misbehave, lba: u64) {
        let mut s = self.shared.lock().unwrap();
        s.script = m;
        s.persistent = false;
        s.at_lba = Some(lba);
    }

    /// Connections accepted so far (logins).
    pub fn connections(&self) -> usize {
        self.shared.lock().unwrap().connections
    }

    /// Task management functions received.
    pub fn tmfs(&self) -> Vec<TmfFunction> {
        self.shared.lock().unwrap().tmfs.clone()
    }

    /// NOP-Out pings received.
    pub fn nop_outs(&self) -> usize {
        self.shared.lock().unwrap().nop_outs
    }

    /// Bytes of the LUN.
    pub fn disk(&self, at: usize, len: usize) -> Vec<u8> {
        self.shared.lock().unwrap().disk[at..at + len].to_vec()
    }
}

impl Drop for FakeTarget {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A write waiting for solicited data.
struct PendingWrite {
    itt: u32,
    lun: u64,
    lba_off: usize,
    len: u32,
    received: u32,
    r2t_sn: u32,
    next_ttt: u32,
}

struct Conn {
    sock: TcpStream,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    stat_sn: u32,
    exp_cmd_sn: u32,
    hd: bool,
    dd: bool,
    ffp: bool,
    silent: bool,
    writes: Vec<PendingWrite>,
    hung: Vec<u32>,
    tpgt_sent: bool,
}

struct Pdu {
    bhs: [u8; BHS_LEN],
    data: Vec<u8>,
}

fn sense(key: u8, asc: u8, ascq: u8) -> Vec<u8> {
    let mut s = vec![0u8; 18];
    s[0] = 0x70;
    s[2] = key;
    s[7] = 10;
    s[12] = asc;
    s[13] = ascq;
    s
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

impl Conn {
    fn new(sock: TcpStream, shared: Arc<Mutex<Shared>>, stop: Arc<AtomicBool>) -> Conn {
        sock.set_read_timeout(Some(Duration::from_millis(200))).ok();
        sock.set_nodelay(true).ok();
        Conn {
            sock,
            shared,
            stop,
            stat_sn: 0x1000,
            exp_cmd_sn: 0,
            hd: false,
            dd: false,
            ffp: false,
            silent: false,
            writes: Vec::new(),
            hung: Vec::new(),
            tpgt_sent: false,
        }
    }

    fn seq(&mut self, advance: bool) -> SeqNums {
        let s = SeqNums {
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.exp_cmd_sn.wrapping_add(32),
        };
        if advance {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        s
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        let mut got = 0;
        while got < buf.len() {
            if self.stop.load(Ordering::Relaxed) {
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            match self.sock.read(&mut buf[got..]) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn recv(&mut self) -> std::io::Result<Pdu> {
        let mut bhs = [0u8; BHS_LEN];
        self.read_exact(&mut bhs)?;
        let (ahs, dsl) = peek_lengths(&bhs);
        let mut skip = vec![0u8; ahs + if self.hd { 4 } else { 0 }];
        self.read_exact(&mut skip)?;
        let mut data = vec![0u8; dsl as usize + pad_len(dsl)];
        self.read_exact(&mut data)?;
        data.truncate(dsl as usize);
        if self.dd && dsl > 0 {
            let mut d = [0u8; 4];
            self.read_exact(&mut d)?;
        }
        Ok(Pdu { bhs, data })
    }

    fn send(&mut self, bhs: [u8; BHS_LEN], data: &[u8]) -> std::io::Result<()> {
        let mut out = bhs.to_vec();
        if self.hd {
            out.extend_from_slice(&header_digest(&bhs, &[]));
        }
        out.extend_from_slice(data);
        out.resize(out.len() + pad_len(data.len() as u32), 0);
        if self.dd && !data.is_empty() {
            out.extend_from_slice(&data_digest([data]));
        }
        self.sock.write_all(&out)
    }

    fn run(&mut self) -> std::io::Result<()> {
        loop {
            let pdu = self.recv()?;
            if self.silent {
                continue;
            }
            let decoded = match InitiatorPdu::decode(&pdu.bhs) {
                Ok(d) => d,
                Err(_) => return Ok(()),
            };
            match decoded {
                InitiatorPdu::LoginRequest(r) => self.on_login(r, &pdu.data)?,
                InitiatorPdu::ScsiCommand(c) => {
                    if !c.immediate {
                        self.exp_cmd_sn = c.cmd_sn.wrapping_add(1);
                    }
                    self.on_command(c, pdu.data)?
                }
                InitiatorPdu::DataOut(d) => self.on_data_out(d, &pdu.data)?,
                InitiatorPdu::NopOut(n) => {
                    self.shared.lock().unwrap().nop_outs += 1;
                    if n.itt != 0xffff_ffff {
                        let seq = self.seq(true);
                        let h = NopIn {
                            data_segment_length: U24::ZERO,
                            lun: n.lun,
                            itt: n.itt,
                            ttt: 0xffff_ffff,
                            seq,
                        };
                        self.send(h.encode(), &[])?;
                    }
                }
                InitiatorPdu::TaskMgmtRequest(t) => {
                    let refuse = {
                        let mut s = self.shared.lock().unwrap();
                        s.tmfs.push(t.function);
                        s.script == Misbehave::HangCommandRefuseAbort
                    };
                    let response = match t.function {
                        TmfFunction::AbortTask if refuse => TmfResponse::Rejected,
                        TmfFunction::AbortTask => {
                            self.hung.retain(|&i| i != t.referenced_task_tag);
                            TmfResponse::Complete
                        }
                        TmfFunction::LogicalUnitReset => {
                            self.hung.clear();
                            self.writes.clear();
                            self.shared.lock().unwrap().script = Misbehave::None;
                            TmfResponse::Complete
                        }
                        _ => TmfResponse::Rejected,
                    };
                    let seq = self.seq(true);
                    let h = TaskMgmtResponse {
                        response,
                        itt: t.itt,
                        seq,
                    };
                    self.send(h.encode(), &[])?;
                }
                InitiatorPdu::LogoutRequest(_) | InitiatorPdu::TextRequest(_) => {
                    let _ = self.sock.shutdown(Shutdown::Both);
                    return Ok(());
                }
            }
        }
    }

    fn on_login(
        &mut self,
        r: vhost_iser::iscsi::pdu::LoginRequest,
        data: &[u8],
    ) -> std::io::Result<()> {
        let digests = self.shared.lock().unwrap().digests;
        let mut keys: Vec<String> = Vec::new();
        if !self.tpgt_sent {
            self.tpgt_sent = true;
            keys.push("TargetPortalGroupTag=1".into());
        }
        let mut hd = false;
        let mut dd = false;
        for kv in data.split(|&b| b == 0).filter(|s| !s.is_empty()) {
            let kv = String::from_utf8_lossy(kv).to_string();
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            match k {
                "InitiatorName" | "SessionType" | "TargetName" | "InitiatorAlias" => {}
                "MaxRecvDataSegmentLength" => {
                    keys.push("MaxRecvDataSegmentLength=262144".into());
                }
                "AuthMethod" => keys.push("AuthMethod=None".into()),
                "HeaderDigest" | "DataDigest" => {
                    let pick = if digests && v.split(',').any(|x| x == "CRC32C") {
                        "CRC32C"
                    } else {
                        "None"
                    };
                    if pick == "CRC32C" {
                        if k == "HeaderDigest" {
                            hd = true
                        } else {
                            dd = true
                        }
                    }
                    keys.push(format!("{k}={pick}"));
                }
                _ => keys.push(format!("{k}={v}")),
            }
        }
        if r.csg == Stage::Operational && !keys.iter().any(|k| k.starts_with("MaxRecv")) {
            keys.push("MaxRecvDataSegmentLength=262144".into());
        }
        let mut text = Vec::new();
        for k in keys {
            text.extend_from_slice(k.as_bytes());
            text.push(0);
        }
        let final_ = r.transit && r.nsg == Stage::FullFeature;
        self.exp_cmd_sn = r.cmd_sn;
        let seq = self.seq(final_);
        let h = LoginResponse {
            transit: r.transit,
            cont: false,
            csg: r.csg,
            nsg: if r.transit { r.nsg } else { r.csg },
            version_max: 0,
            version_active: 0,
            data_segment_length: U24::new(text.len() as u32).unwrap(),
            isid: r.isid,
            tsih: 0x1234,
            itt: r.itt,
            seq,
            status_class: 0,
            status_detail: 0,
        };
        self.send(h.encode(), &text)?;
        if final_ {
            self.ffp = true;
            self.hd = hd;
            self.dd = dd;
        }
        Ok(())
    }

    fn respond(
        &mut self,
        itt: u32,
        status: u8,
        sense_data: &[u8],
        residual: i64,
    ) -> std::io::Result<()> {
        let mut data = Vec::new();
        if !sense_data.is_empty() {
            data.extend_from_slice(&(sense_data.len() as u16).to_be_bytes());
            data.extend_from_slice(sense_data);
        }
        let seq = self.seq(true);
        let h = ScsiResponse {
            bidi_overflow: false,
            bidi_underflow: false,
            overflow: residual < 0,
            underflow: residual > 0,
            response: 0,
            status,
            ahs_words: 0,
            data_segment_length: U24::new(data.len() as u32).unwrap(),
            itt,
            snack_tag: 0,
            seq,
            exp_data_sn: 0,
            bidi_read_residual_count: 0,
            residual_count: residual.unsigned_abs() as u32,
        };
        self.send(h.encode(), &data)
    }

    /// Data-In PDUs carrying `payload`, status in the last one.
    fn data_in(&mut self, lun: u64, itt: u32, payload: &[u8], edtl: u32) -> std::io::Result<()> {
        if payload.is_empty() {
            return self.respond(itt, 0, &[], edtl as i64);
        }
        let chunks: Vec<&[u8]> = payload.chunks(65536).collect();
        let n = chunks.len();
        let residual = edtl as i64 - payload.len() as i64;
        for (i, c) in chunks.into_iter().enumerate() {
            let last = i + 1 == n;
            let seq = self.seq(last);
            let h = DataIn {
                final_: last,
                ack: false,
                overflow: last && residual < 0,
                underflow: last && residual > 0,
                status_present: last,
                status: 0,
                ahs_words: 0,
                data_segment_length: U24::new(c.len() as u32).unwrap(),
                lun,
                itt,
                ttt: 0xffff_ffff,
                seq,
                data_sn: i as u32,
                buffer_offset: (i * 65536) as u32,
                residual_count: if last {
                    residual.unsigned_abs() as u32
                } else {
                    0
                },
            };
            let c = c.to_vec();
            self.send(h.encode(), &c)?;
        }
        Ok(())
    }

    /// The script for this I/O (consumed unless persistent).
    fn take_script(&mut self, write: bool, lba: u64) -> Misbehave {
        let mut s = self.shared.lock().unwrap();
        let m = s.script;
        let applies = match m {
            _ if s.at_lba.is_some_and(|at| at != lba) => false,
            Misbehave::DataInOverflow => !write,
            Misbehave::R2tBeyondBuffer => write,
            _ => true,
        };
        if !applies {
            return Misbehave::None;
        }
        if !s.persistent && !matches!(m, Misbehave::HangCommandRefuseAbort) {
            s.script = Misbehave::None;
            s.at_lba = None;
        }
        m
    }

    /// Misbehaviours that replace the answer; true if one was done.
    fn misbehave(&mut self, m: Misbehave, itt: u32) -> std::io::Result<bool> {
        match m {
            Misbehave::WrongItt => {
                self.respond(itt ^ 0x5a5a_0000, 0, &[], 0)?;
            }
            Misbehave::TruncateThenClose => {
                let seq = self.seq(true);
                let h = ScsiResponse {
                    bidi_overflow: false,
                    bidi_underflow: false,
                    overflow: false,
                    underflow: false,
                    response: 0,
                    status: 0,
                    ahs_words: 0,
                    data_segment_length: U24::ZERO,
                    itt,
                    snack_tag: 0,
                    seq,
                    exp_data_sn: 0,
                    bidi_read_residual_count: 0,
                    residual_count: 0,
                }
                .encode();
                self.sock.write_all(&h[..20])?;
                std::thread::sleep(Duration::from_millis(50));
                let _ = self.sock.shutdown(Shutdown::Both);
                return Err(std::io::ErrorKind::ConnectionAborted.into());
            }
            Misbehave::GiantDsl => {
                let seq = self.seq(true);
                let mut h = ScsiResponse {
                    bidi_overflow: false,
                    bidi_underflow: false,
                    overflow: false,
                    underflow: false,
                    response: 0,
                    status: 2,
                    ahs_words: 0,
                    data_segment_length: U24::ZERO,
                    itt,
                    snack_tag: 0,
                    seq,
                    exp_data_sn: 0,
                    bidi_read_residual_count: 0,
                    residual_count: 0,
                }
                .encode();
                h[5] = 0xff;
                h[6] = 0xff;
                h[7] = 0xff;
                let mut out = h.to_vec();
                if self.hd {
                    out.extend_from_slice(&header_digest(&h, &[]));
                }
                out.extend_from_slice(&[0u8; 4096]);
                self.sock.write_all(&out)?;
            }
            Misbehave::BadHeaderDigest => {
                let seq = self.seq(true);
                let h = ScsiResponse {
                    bidi_overflow: false,
                    bidi_underflow: false,
                    overflow: false,
                    underflow: false,
                    response: 0,
                    status: 0,
                    ahs_words: 0,
                    data_segment_length: U24::ZERO,
                    itt,
                    snack_tag: 0,
                    seq,
                    exp_data_sn: 0,
                    bidi_read_residual_count: 0,
                    residual_count: 0,
                }
                .encode();
                let mut out = h.to_vec();
                let mut d = header_digest(&h, &[]);
                d[0] ^= 0xff;
                out.extend_from_slice(&d);
                self.sock.write_all(&out)?;
            }
            Misbehave::StatSnOutOfOrder => {
                self.stat_sn = self.stat_sn.wrapping_add(5);
                self.respond(itt, 0, &[], 0)?;
            }
            Misbehave::Silence => {
                self.silent = true;
            }
            Misbehave::HangCommand | Misbehave::HangCommandRefuseAbort => {
                self.hung.push(itt);
            }
            Misbehave::Busy => self.respond(itt, 0x08, &[], 0)?,
            Misbehave::TaskSetFull => self.respond(itt, 0x28, &[], 0)?,
            Misbehave::ReservationConflict => self.respond(itt, 0x18, &[], 0)?,
            Misbehave::CapacityChanged => {
                {
                    let mut s = self.shared.lock().unwrap();
                    let n = s.disk.len() * 2;
                    s.disk.resize(n, 0);
                }
                self.respond(itt, 2, &sense(6, 0x2a, 0x09), 0)?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn on_command(
        &mut self,
        c: vhost_iser::iscsi::pdu::ScsiCommand,
        immediate: Vec<u8>,
    ) -> std::io::Result<()> {
        let cdb = c.cdb.as_slice().to_vec();
        let edtl = c.expected_data_transfer_length;
        let itt = c.itt;
        let alloc = |n: usize| n.min(edtl as usize);
        let size = self.shared.lock().unwrap().disk.len() as u64;
        let blocks = size / 512;
        match cdb[0] {
            0x00 | 0x35 | 0x91 => self.respond(itt, 0, &[], 0),
            0x12 if cdb[1] & 1 == 0 => {
                let mut d = [0u8; 36];
                d[2] = 5;
                d[3] = 2;
                d[4] = 31;
                d[7] = 0x02; // CmdQue
                d[8..16].copy_from_slice(b"FAKE    ");
                d[16..32].copy_from_slice(b"HOSTILE-TARGET  ");
                d[32..36].copy_from_slice(b"0001");
                let n = alloc(d.len());
                self.data_in(c.lun, itt, &d[..n], edtl)
            }
            0x12 if cdb[2] == 0x00 => {
                let d = [0u8, 0x00, 0, 1, 0x00];
                let n = alloc(d.len());
                self.data_in(c.lun, itt, &d[..n], edtl)
            }
            0x12 => self.respond(itt, 2, &sense(5, 0x24, 0), 0),
            0x25 => {
                let mut d = [0u8; 8];
                d[..4].copy_from_slice(&((blocks - 1).min(0xffff_fffe) as u32).to_be_bytes());
                d[4..8].copy_from_slice(&512u32.to_be_bytes());
                let n = alloc(d.len());
                self.data_in(c.lun, itt, &d[..n], edtl)
            }
            0x9e if cdb[1] & 0x1f == 0x10 => {
                let mut d = [0u8; 32];
                d[..8].copy_from_slice(&(blocks - 1).to_be_bytes());
                d[8..12].copy_from_slice(&512u32.to_be_bytes());
                let n = alloc(d.len());
                self.data_in(c.lun, itt, &d[..n], edtl)
            }
            0x1a => {
                let d = [3u8, 0, 0, 0];
                let n = alloc(d.len());
                self.data_in(c.lun, itt, &d[..n], edtl)
            }
            0x5a => {
                let d = [0u8, 6, 0, 0, 0, 0, 0, 0];
                let n = alloc(d.len());
                self.data_in(c.lun, itt, &d[..n], edtl)
            }
            0x28 | 0x88 | 0x2a | 0x8a => {
                let (lba, nblk) = if cdb[0] & 0x80 != 0 {
                    (be64(&cdb[2..10]), be32(&cdb[10..14]) as u64)
                } else {
                    (
                        be32(&cdb[2..6]) as u64,
                        u16::from_be_bytes([cdb[7], cdb[8]]) as u64,
                    )
                };
                if (lba + nblk) * 512 > size || nblk * 512 != edtl as u64 {
                    return self.respond(itt, 2, &sense(5, 0x21, 0), 0);
                }
                let off = (lba * 512) as usize;
                let write = cdb[0] & 0x02 != 0;
                let script = self.take_script(write, lba);
                if self.misbehave(script, itt)? {
                    return Ok(());
                }
                if !write {
                    let mut d = self.shared.lock().unwrap().disk[off..off + edtl as usize].to_vec();
                    if script == Misbehave::DataInOverflow {
                        d.extend_from_slice(&[0u8; 512]);
                    }
                    return self.data_in(c.lun, itt, &d, edtl);
                }
                let n = immediate.len();
                self.shared.lock().unwrap().disk[off..off + n].copy_from_slice(&immediate);
                if n as u32 >= edtl && script != Misbehave::R2tBeyondBuffer {
                    return self.respond(itt, 0, &[], 0);
                }
                let mut w = PendingWrite {
                    itt,
                    lun: c.lun,
                    lba_off: off,
                    len: edtl,
                    received: n as u32,
                    r2t_sn: 0,
                    next_ttt: 0x100,
                };
                if script == Misbehave::R2tBeyondBuffer {
                    w.received = edtl;
                }
                self.send_r2t(&mut w)?;
                self.writes.push(w);
                Ok(())
            }
            _ => self.respond(itt, 2, &sense(5, 0x20, 0), 0),
        }
    }

    fn send_r2t(&mut self, w: &mut PendingWrite) -> std::io::Result<()> {
        let want = (w.len.saturating_sub(w.received)).clamp(512, 262144);
        let seq = self.seq(false);
        let h = R2t {
            ahs_words: 0,
            lun: w.lun,
            itt: w.itt,
            ttt: w.next_ttt,
            seq,
            r2t_sn: w.r2t_sn,
            buffer_offset: w.received,
            desired_data_transfer_length: want,
        };
        w.r2t_sn += 1;
        w.next_ttt += 1;
        self.send(h.encode(), &[])
    }

    fn on_data_out(
        &mut self,
        d: vhost_iser::iscsi::pdu::DataOut,
        data: &[u8],
    ) -> std::io::Result<()> {
        let Some(i) = self.writes.iter().position(|w| w.itt == d.itt) else {
            return Ok(());
        };
        let off = self.writes[i].lba_off + d.buffer_offset as usize;
        let len = self.writes[i].len;
        if d.buffer_offset as u64 + data.len() as u64 <= len as u64 {
            self.shared.lock().unwrap().disk[off..off + data.len()].copy_from_slice(data);
        }
        let end = d.buffer_offset + data.len() as u32;
        self.writes[i].received = self.writes[i].received.max(end);
        if !d.final_ {
            return Ok(());
        }
        if self.writes[i].received >= len {
            let w = self.writes.swap_remove(i);
            return self.respond(w.itt, 0, &[], 0);
        }
        let mut w = self.writes.swap_remove(i);
        self.send_r2t(&mut w)?;
        self.writes.push(w);
        Ok(())
    }
}
