//! One iSER connection (RFC 7145): a reliable-connected queue pair carrying
//! iSCSI control-type PDUs in RDMA Sends, each behind the 28-byte iSER
//! header, while the target moves command data itself with RDMA Read (SCSI
//! writes) and RDMA Write (SCSI reads) against registered initiator memory.
//!
//! - **Setup**: resolve the portal with the RDMA CM, one CQ (send and receive
//!   completions) with a completion channel, one RC QP, receive buffers
//!   posted *before* connecting (tgtd sends as soon as it is established),
//!   CM private data = [`CmHdr::initiator`].
//! - **Zero copy**: a SCSI command's [`TaskBuffer`] is advertised in the
//!   iSER header as (rkey of the registered guest memory region, host
//!   virtual address of the buffer), see [`super::memory`]. iSER has one
//!   STag per direction, so this needs the command's buffer to be one
//!   contiguous host range (adjacent guest segments are merged). Otherwise
//!   (a scattered buffer, or memory not registered yet) the command goes
//!   through a bounce buffer from a registered pool: write data is copied in
//!   before the command is sent, read data copied out when the SCSI
//!   Response arrives. Copied bytes are counted ([`bytes_copied`], also in
//!   the metrics).
//! - **Scattered requests** ([`super::ScatterPolicy`], `VHOST_ISER_SCATTER`):
//!   `bounce` (the default) as above, one command per request; `split` has
//!   the SCSI layer send one command per host-contiguous run instead, each
//!   named in place, when every run is whole blocks and lies in registered
//!   memory ([`super::GuestMemoryRegistration::registered_runs`]), else it
//!   bounces. Measured in the soft-RoCE VM (`bench/results/iser-scatter.md`,
//!   128 KiB requests, split / bounce): 32 × 4 KiB pieces 0.44–0.88× the
//!   IOPS at 1.4–4.2× the backend CPU per MiB (32 commands instead of one
//!   128 KiB copy); 2 × 64 KiB pieces 0.97–1.13× the IOPS at 0.6–1.3× the
//!   CPU, a tie. Split does not win clearly, so bounce stays the default.
//!   Vendor fast registration (one MR per request) is not available through
//!   rdma-sys (no mlx5dv) nor on soft-RoCE.
//! - **Immediate data** (LIO offers ImmediateData=Yes) rides in the same
//!   Send as the command: extra SGEs pointing into registered guest memory
//!   (zero copy) or, failing that, a copy into the send buffer.
//! - **Flow control**: at most [`MAX_COMMANDS`] commands await their
//!   response, so the posted receives ([`MAX_COMMANDS`] + [`UNEXPECTED`] for
//!   NOP-In/Async/Reject) always cover what the target may send; Sends wait
//!   in a queue when the send queue is full ([`Transport::has_pending_output`]).
//! - **Events**: [`Transport::fd`] is an epoll fd holding the completion
//!   channel and the CM event channel; on each wake-up one `poll(2)` says
//!   which of the two has an event, and only that one is read (a blind read
//!   of each cost a system call, ~0.7k instructions for the CM one, per
//!   wake-up). Completions are reaped by polling the
//!   CQ until empty, then polling on for a short window
//!   ([`POLL_WINDOW_ENV`], default [`DEFAULT_POLL_WINDOW_US`] µs) before
//!   re-arming, then polling once more to close the arm race.
//! - **Allocations**: none per command in this transport on the usual path
//!   (contiguous buffer, no immediate data): reused scratch lists for a
//!   command's segments and a received message, SGEs and work-request
//!   chains inline (`SmallVec`). Received data segments (sense, text) are
//!   still owned vectors.
//! - **Failures**: a bad completion status, a CM DISCONNECTED/DEVICE_REMOVAL,
//!   or a malformed iSER header ends the connection with a
//!   [`TransportError`]; the QP is moved to the error state at once so the
//!   target cannot touch guest memory after the session failed the commands.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libc::iovec;
use log::{info, warn};
use smallvec::SmallVec;

use super::cm::CmHdr;
use super::header::{ControlHeader, ControlMessage, RemoteBuffer, CONTROL_HEADER_LEN};
use super::memory::{find, GuestMemoryRegistration, RegionReg, Regions};
use super::verbs::{
    Access, CmEventKind, CmId, CompletionQueue, ConnParam, ProtectionDomain, QpCaps, QueuePair,
    RegisteredPool, SendFlags, SendOp, SendWr, Sge, VerbsError, WcOpcode, WcStatus, WorkCompletion,
};
use crate::blk::buffer::IoBuffers;
use crate::transport::{
    InPdu, OutPdu, PduData, RecvPlan, RecvPlanner, TaskBuffer, Transport, TransportError, BHS_LEN,
};

/// Commands that may await their response at once on one connection.
pub const MAX_COMMANDS: usize = 128;
/// Receives kept for PDUs the target sends on its own (NOP-In, Async,
/// Reject), on top of one per command.
pub const UNEXPECTED: usize = 16;
/// Largest data segment of a control-type PDU we send or accept: the login
/// limit (RFC 7143 §6.1), also our InitiatorRecvDataSegmentLength.
pub const CONTROL_DATA_MAX: usize = 8192;
/// Largest data transfer of one command: tgtd's iSER RDMA buffers are
/// 512 KiB ("rdma-rd size too big" and a dropped connection beyond), and
/// Linux ib_iser sends at most 512 KiB (max_sectors 1024) too.
pub const MAX_COMMAND_DATA: u32 = 512 * 1024;
/// Environment variable: microseconds to keep polling the CQ after a
/// completion before sleeping on the completion channel (0 = never spin).
pub const POLL_WINDOW_ENV: &str = "VHOST_ISER_POLL_US";
/// Default adaptive polling window.
pub const DEFAULT_POLL_WINDOW_US: u64 = 20;
/// Environment variable: log the copy counters every N commands of a
/// connection (default: after 1024, 4096, 16384, ... commands).
pub const REPORT_EVERY_ENV: &str = "VHOST_ISER_REPORT_EVERY";

const HDRS: usize = CONTROL_HEADER_LEN + BHS_LEN;
/// Receive and send buffer size: headers + control data, cache-line rounded.
const MSG_BUF: usize = (HDRS + CONTROL_DATA_MAX + 63) & !63;
const RECVS: usize = MAX_COMMANDS + UNEXPECTED;
const SENDS: usize = MAX_COMMANDS + UNEXPECTED;
/// Bounce buffers: count and size (larger commands get a buffer of their own).
const BOUNCE_COUNT: usize = 8;
const BOUNCE_SIZE: usize = 1 << 20;
const RECV_TAG: u64 = 1 << 62;
const SEND_TAG: u64 = 2 << 62;

static BYTES_COPIED: AtomicU64 = AtomicU64::new(0);
static BYTES_COPIED_UNREGISTERED: AtomicU64 = AtomicU64::new(0);
static COMMANDS_SENT: AtomicU64 = AtomicU64::new(0);

/// SCSI commands sent on all iSER connections of the process (with
/// [`bytes_copied`], the copy cost per command).
pub fn commands_sent() -> u64 {
    COMMANDS_SENT.load(Ordering::Relaxed)
}

/// Bytes of guest data copied through bounce buffers because a command's
/// buffer was not contiguous in host memory (all iSER connections of the
/// process). Zero when every buffer could be used in place.
pub fn bytes_copied() -> u64 {
    BYTES_COPIED.load(Ordering::Relaxed)
}

/// Bytes copied through bounce buffers because a buffer was outside
/// registered guest memory (start-up probes, memory not registered yet).
pub fn bytes_copied_unregistered() -> u64 {
    BYTES_COPIED_UNREGISTERED.load(Ordering::Relaxed)
}

fn poll_window() -> Duration {
    let us = std::env::var(POLL_WINDOW_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(DEFAULT_POLL_WINDOW_US)
        .min(10_000);
    Duration::from_micros(us)
}

/// An empty list of iovecs kept for its capacity.
#[derive(Default)]
struct IovScratch(Vec<iovec>);

// SAFETY: the list is cleared before it is stored (see
// IserConnection::map_task), so it never holds a pointer while the
// connection moves between threads; only its allocation moves.
unsafe impl Send for IovScratch {}

/// Where a bounced command's data lives.
enum Bounce {
    /// A buffer of the connection's bounce pool.
    Pool(usize),
    /// A pool of its own (commands larger than the pool's buffers).
    Own(RegisteredPool),
}

/// A SCSI command awaiting its response.
struct Pending {
    /// Keeps the region's MR (and mapping) alive while the target may use it.
    _region: Option<Arc<RegionReg>>,
    bounce: Option<Bounce>,
    /// For bounced reads: where the data goes when the response arrives.
    read_back: Option<(Arc<IoBuffers>, u64, u32)>,
}

/// An iSER connection; see the module docs.
pub struct IserConnection {
    addr: String,
    // Verbs objects keep what they were created from alive; the QP goes first.
    qp: QueuePair,
    cq: CompletionQueue,
    recv: RegisteredPool,
    send: RegisteredPool,
    bounce: Option<RegisteredPool>,
    pd: ProtectionDomain,
    id: CmId,
    epoll: OwnedFd,
    registry: Arc<GuestMemoryRegistration>,
    regions: Regions,
    epoch: u64,
    out: VecDeque<OutPdu>,
    ready: VecDeque<([u8; BHS_LEN], Vec<u8>)>,
    pending: HashMap<u32, Pending>,
    sq_free: usize,
    wcs: Vec<WorkCompletion>,
    /// Scratch list of a command's buffer segments (reused, no allocation per command).
    iov_scratch: IovScratch,
    /// Scratch copy of a received message (reused, no allocation per message).
    rx_scratch: Vec<u8>,
    poll_window: Duration,
    failed: Option<String>,
    commands: u64,
    copied: u64,
    next_report: u64,
    report_every: Option<u64>,
}

fn verbs_err(addr: &str, e: VerbsError) -> TransportError {
    TransportError::Connect {
        addr: addr.to_string(),
        source: std::io::Error::other(e),
    }
}

fn resolve(portal: &str) -> Result<SocketAddr, TransportError> {
    portal
        .to_socket_addrs()
        .map_err(|e| TransportError::Connect {
            addr: portal.to_string(),
            source: e,
        })?
        .next()
        .ok_or_else(|| TransportError::Connect {
            addr: portal.to_string(),
            source: std::io::Error::other("the name resolves to no address"),
        })
}

/// Whether the completion channel `cq_fd` and the CM event channel `cm_fd`
/// have something to read, without blocking. An error or hang-up condition
/// counts as readable (the read then reports it); an interrupted poll
/// reports both readable, which only costs the reads it was meant to save.
fn readable(cq_fd: RawFd, cm_fd: RawFd) -> std::io::Result<(bool, bool)> {
    let mut fds = [cq_fd, cm_fd].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: two valid pollfds for the duration of the call; timeout 0.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, 0) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted {
            Ok((true, true))
        } else {
            Err(e)
        };
    }
    let ready = |p: &libc::pollfd| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0;
    Ok((ready(&fds[0]), ready(&fds[1])))
}

/// Merges adjacent iovecs; returns the single host range if they form one.
fn contiguous(iov: &[iovec]) -> Option<(u64, u64)> {
    let first = iov.first()?;
    let start = first.iov_base as u64;
    let mut end = start + first.iov_len as u64;
    for v in &iov[1..] {
        if v.iov_base as u64 != end {
            return None;
        }
        end += v.iov_len as u64;
    }
    Some((start, end - start))
}

impl IserConnection {
    /// Connects to `portal` ("host:port") over RDMA within `timeout`, ready
    /// for the login phase. `registry` holds the guest memory registrations
    /// shared by every connection of the process.
    pub fn connect(
        portal: &str,
        timeout: Duration,
        registry: Arc<GuestMemoryRegistration>,
    ) -> Result<Self, TransportError> {
        let dst = resolve(portal)?;
        let e = |err| verbs_err(portal, err);
        let mut id = CmId::resolve(dst, timeout).map_err(e)?;
        let caps = id.query_device().map_err(e)?;
        let pd = registry.pd_for(&id).map_err(e)?;
        let cq = id.create_cq((RECVS + SENDS + 16) as u32).map_err(e)?;
        let qp = id
            .create_qp(
                &pd,
                &cq,
                &cq,
                QpCaps {
                    max_send_wr: SENDS as u32,
                    max_recv_wr: RECVS as u32,
                    max_send_sge: caps.max_sge.clamp(1, 16),
                    max_recv_sge: 1,
                    max_inline_data: 128,
                },
            )
            .map_err(e)?;
        let recv = RegisteredPool::new(&pd, MSG_BUF, RECVS, Access::LOCAL_WRITE).map_err(e)?;
        let send = RegisteredPool::new(&pd, MSG_BUF, SENDS, Access::LOCAL_WRITE).map_err(e)?;
        for i in 0..RECVS {
            let sge = recv.sge(i, MSG_BUF).map_err(e)?;
            qp.post_recv(RECV_TAG | i as u64, &[sge]).map_err(e)?;
        }
        id.connect(
            &ConnParam {
                private_data: CmHdr::initiator().encode().to_vec(),
                // The target RDMA-Reads write data from us.
                responder_resources: caps.max_qp_rd_atom.min(16) as u8,
                initiator_depth: caps.max_qp_init_rd_atom.min(1) as u8,
                retry_count: 7,
                rnr_retry_count: 6,
            },
            timeout,
        )
        .map_err(e)?;
        // SAFETY: plain syscall; the fd is owned by the OwnedFd below.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(TransportError::Connect {
                addr: portal.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: ep is a fresh fd nobody else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(ep) };
        for fd in [cq.as_raw_fd(), id.as_raw_fd()] {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: fd as u64,
            };
            // SAFETY: both fds are live for the life of the connection; ev is valid.
            if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
                return Err(TransportError::Connect {
                    addr: portal.to_string(),
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        cq.arm().map_err(e)?;
        let (epoch, regions) = registry.snapshot(&pd);
        let sq_free = qp.caps().max_send_wr as usize;
        let report_every = std::env::var(REPORT_EVERY_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&n| n > 0);
        info!(
            "iSER: connected to {portal} via {} (QP {}, {} receives of {} bytes)",
            id.device_name().unwrap_or_default(),
            qp.qp_num(),
            RECVS,
            MSG_BUF
        );
        Ok(IserConnection {
            addr: portal.to_string(),
            qp,
            cq,
            recv,
            send,
            bounce: None,
            pd,
            id,
            epoll,
            registry,
            regions,
            epoch,
            out: VecDeque::new(),
            ready: VecDeque::new(),
            pending: HashMap::new(),
            sq_free,
            wcs: WorkCompletion::batch(32),
            iov_scratch: IovScratch(Vec::with_capacity(16)),
            rx_scratch: Vec::with_capacity(MSG_BUF),
            poll_window: poll_window(),
            failed: None,
            commands: 0,
            copied: 0,
            next_report: report_every.unwrap_or(1024),
            report_every,
        })
    }

    /// Bytes this connection copied through bounce buffers.
    pub fn copied(&self) -> u64 {
        self.copied
    }

    fn error(&self) -> TransportError {
        match &self.failed {
            Some(r) if r == "closed" => TransportError::Closed {
                addr: self.addr.clone(),
            },
            Some(r) => TransportError::Io {
                addr: self.addr.clone(),
                source: std::io::Error::other(r.clone()),
            },
            None => TransportError::Closed {
                addr: self.addr.clone(),
            },
        }
    }

    /// Marks the connection failed and stops the QP (no more RDMA into
    /// guest memory), returning the error to report.
    fn fail(&mut self, reason: String) -> TransportError {
        if self.failed.is_none() {
            warn!("iSER connection to {}: {reason}", self.addr);
            self.failed = Some(reason);
            let _ = self.id.disconnect();
        }
        self.error()
    }

    fn malformed(&mut self, reason: String) -> TransportError {
        let e = TransportError::Malformed {
            addr: self.addr.clone(),
            reason: reason.clone(),
        };
        self.fail(format!("malformed PDU: {reason}"));
        e
    }

    fn refresh_regions(&mut self) {
        if self.registry.epoch() != self.epoch {
            let (epoch, regions) = self.registry.snapshot(&self.pd);
            self.epoch = epoch;
            self.regions = regions;
        }
    }

    fn count_copy(&mut self, n: u64, registered: bool) {
        self.copied += n;
        if registered {
            BYTES_COPIED.fetch_add(n, Ordering::Relaxed);
        } else {
            BYTES_COPIED_UNREGISTERED.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Reads CM events: anything but TIMEWAIT_EXIT ends the connection.
    fn check_cm(&mut self) -> Result<(), TransportError> {
        loop {
            match self.id.poll_event() {
                Ok(None) => return Ok(()),
                Ok(Some(ev)) if ev.kind == CmEventKind::TimewaitExit => continue,
                Ok(Some(ev)) if ev.kind == CmEventKind::Disconnected => {
                    self.failed.get_or_insert_with(|| "closed".into());
                    // Answer the target's DREQ so it is not left waiting.
                    let _ = self.id.disconnect();
                    warn!(
                        "iSER connection to {}: disconnected by the target",
                        self.addr
                    );
                    return Err(self.error());
                }
                Ok(Some(ev)) => {
                    let msg = self.id.event_error("nothing", ev).to_string();
                    return Err(self.fail(msg));
                }
                Err(e) => return Err(self.fail(e.to_string())),
            }
        }
    }

    /// Reaps completions: poll until empty, spin for the poll window, arm,
    /// poll again.
    fn progress(&mut self) -> Result<(), TransportError> {
        // One poll(2) says which channel has something: reading an empty
        // channel blindly costs a system call each (the CM read alone ~0.7k
        // user-space instructions in librdmacm), and progress() runs on
        // every wake-up and every receive attempt. The CQ is drained below
        // whether or not its channel has an event; the event only needs
        // reading (and acknowledging) when there is one.
        let (cq_ready, cm_ready) = match readable(self.cq.as_raw_fd(), self.id.as_raw_fd()) {
            Ok(r) => r,
            Err(e) => return Err(self.fail(format!("poll on the event channels failed: {e}"))),
        };
        if cq_ready {
            if let Err(e) = self.cq.get_events() {
                return Err(self.fail(e.to_string()));
            }
        }
        // A disconnect or error also flushes the queue pair (error
        // completions below), but DEVICE_REMOVAL and a DREQ with nothing
        // posted come only here.
        if cm_ready {
            self.check_cm()?;
        }
        loop {
            let got = self.drain_cq()?;
            if got > 0 && !self.poll_window.is_zero() {
                let until = Instant::now() + self.poll_window;
                while Instant::now() < until {
                    let n = self.drain_cq()?;
                    if n > 0 && !self.ready.is_empty() {
                        break;
                    }
                    // Give the CPU to any thread queued on it (a vCPU, another
                    // queue's worker, the soft-RoCE kernel threads): spinning
                    // through its time slice delays it and gains nothing here.
                    // With nobody else runnable the yield returns at once.
                    std::thread::yield_now();
                }
            }
            if let Err(e) = self.cq.arm() {
                return Err(self.fail(e.to_string()));
            }
            if self.drain_cq()? == 0 {
                return Ok(());
            }
        }
    }

    fn drain_cq(&mut self) -> Result<usize, TransportError> {
        let mut total = 0;
        loop {
            let mut wcs = std::mem::take(&mut self.wcs);
            let n = match self.cq.poll(&mut wcs) {
                Ok(n) => n,
                Err(e) => {
                    self.wcs = wcs;
                    return Err(self.fail(e.to_string()));
                }
            };
            let mut res = Ok(());
            for wc in &wcs[..n] {
                if res.is_ok() {
                    res = self.on_completion(wc);
                }
            }
            self.wcs = wcs;
            res?;
            total += n;
            if n < self.wcs.len() {
                return Ok(total);
            }
        }
    }

    fn on_completion(&mut self, wc: &WorkCompletion) -> Result<(), TransportError> {
        let tag = wc.wr_id() & (3 << 62);
        let idx = (wc.wr_id() & !(3 << 62)) as usize;
        if !wc.is_ok() {
            if self.failed.is_some() || wc.status() == WcStatus::WR_FLUSH_ERR {
                // Flushes after a disconnect: the cause was reported already,
                // or the CM event explains it.
                if self.failed.is_none() {
                    let _ = self.check_cm();
                }
                return Err(self.fail("queue pair flushed (connection lost)".into()));
            }
            let what = if tag == RECV_TAG { "receive" } else { "send" };
            return Err(self.fail(format!(
                "{what} completion failed: {} (vendor error {:#x})",
                wc.status(),
                wc.vendor_err()
            )));
        }
        match tag {
            SEND_TAG => {
                self.sq_free += 1;
                let _ = self.send.give_back(idx);
                Ok(())
            }
            RECV_TAG if wc.opcode() == WcOpcode::Recv => self.on_recv(idx, wc.byte_len() as usize),
            _ => Err(self.fail(format!("unexpected completion {wc:?}"))),
        }
    }

    fn on_recv(&mut self, idx: usize, len: usize) -> Result<(), TransportError> {
        // Copied into the connection's scratch buffer (no allocation per
        // message), so the receive can be reposted before parsing.
        let mut msg = std::mem::take(&mut self.rx_scratch);
        msg.clear();
        msg.resize(len.min(MSG_BUF), 0);
        let r = match self.recv.read(idx, 0, &mut msg) {
            Ok(()) => self.on_recv_in(idx, &msg),
            Err(e) => Err(self.fail(e.to_string())),
        };
        self.rx_scratch = msg;
        r
    }

    fn on_recv_in(&mut self, idx: usize, msg: &[u8]) -> Result<(), TransportError> {
        // Repost at once: the buffer's content is copied out.
        let repost = self
            .recv
            .sge(idx, MSG_BUF)
            .and_then(|sge| self.qp.post_recv(RECV_TAG | idx as u64, &[sge]));
        if let Err(e) = repost {
            return Err(self.fail(format!("cannot repost a receive: {e}")));
        }
        let (bhs, data) = match ControlMessage::parse(msg) {
            Ok(m) => (m.bhs, m.data.to_vec()),
            Err(e) => return Err(self.malformed(format!("bad iSER message: {e}"))),
        };
        let itt = u32::from_be_bytes([bhs[16], bhs[17], bhs[18], bhs[19]]);
        match bhs[0] & 0x3f {
            // SCSI Response: the target is done with the buffer.
            0x21 => self.finish_command(itt, &bhs)?,
            // Reject: the rejected header is in the data segment.
            0x3f => {
                if let Some(r) = data.get(16..20) {
                    let itt = u32::from_be_bytes([r[0], r[1], r[2], r[3]]);
                    if let Some(p) = self.pending.remove(&itt) {
                        self.release(p);
                    }
                }
            }
            _ => {}
        }
        self.ready.push_back((bhs, data));
        Ok(())
    }

    /// A command's response arrived: copy bounced read data into the guest
    /// buffer, release the bounce buffer and the region reference.
    fn finish_command(&mut self, itt: u32, bhs: &[u8; BHS_LEN]) -> Result<(), TransportError> {
        let Some(mut p) = self.pending.remove(&itt) else {
            return Ok(()); // the session judges unknown ITTs
        };
        if let (Some((buf, offset, len)), Some(b)) = (p.read_back.take(), &p.bounce) {
            // Underflow (U bit): only len - residual bytes were written.
            let residual = u32::from_be_bytes([bhs[44], bhs[45], bhs[46], bhs[47]]);
            let n = if bhs[1] & 0x02 != 0 {
                len.saturating_sub(residual)
            } else {
                len
            };
            let src = match b {
                Bounce::Pool(i) => self
                    .bounce
                    .as_ref()
                    .map(|pool| pool.raw_range(*i, 0, n as usize)),
                Bounce::Own(pool) => Some(pool.raw_range(0, 0, n as usize)),
            };
            match src {
                Some(Ok(src)) => {
                    let mut iov = Vec::new();
                    buf.iovecs_range(offset, n as u64, &mut iov);
                    let mut done = 0usize;
                    for v in &iov {
                        // SAFETY: src..src+n is inside the bounce buffer
                        // (raw_range checked) and no operation writes it any
                        // more (the response came); v is a segment of the
                        // command's guest buffer, kept mapped by `buf`.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                src.add(done),
                                v.iov_base.cast(),
                                v.iov_len,
                            )
                        };
                        done += v.iov_len;
                    }
                    let registered = find(
                        &self.regions,
                        iov.first().map_or(0, |v| v.iov_base as u64),
                        1,
                    )
                    .is_some();
                    self.count_copy(done as u64, registered);
                }
                _ => return Err(self.fail("bounce buffer vanished".into())),
            }
        }
        self.release(p);
        Ok(())
    }

    fn release(&mut self, p: Pending) {
        if let (Some(Bounce::Pool(i)), Some(pool)) = (p.bounce, self.bounce.as_mut()) {
            let _ = pool.give_back(i);
        }
    }

    /// Maps a command's buffer: (STag, VA) and what to keep until the
    /// response. `None` when no bounce buffer is free (retry later).
    fn map_task(
        &mut self,
        t: &TaskBuffer,
        immediate: u32,
    ) -> Result<Option<(RemoteBuffer, Pending)>, TransportError> {
        // The connection's scratch list: no allocation per command.
        let mut iov = std::mem::take(&mut self.iov_scratch.0);
        let r = self.map_task_in(t, immediate, &mut iov);
        iov.clear();
        self.iov_scratch = IovScratch(iov);
        r
    }

    fn map_task_in(
        &mut self,
        t: &TaskBuffer,
        immediate: u32,
        iov: &mut Vec<iovec>,
    ) -> Result<Option<(RemoteBuffer, Pending)>, TransportError> {
        let covered = t.buf.iovecs_range(t.offset, t.len as u64, iov);
        if covered != t.len as u64 {
            return Err(self.fail(format!(
                "command buffer holds {covered} bytes, {} expected",
                t.len
            )));
        }
        if let Some((addr, len)) = contiguous(iov) {
            if let Some(r) = find(&self.regions, addr, len) {
                let stag = r.rkey();
                return Ok(Some((
                    RemoteBuffer {
                        stag,
                        va: addr + immediate as u64,
                    },
                    Pending {
                        _region: Some(r.clone()),
                        bounce: None,
                        read_back: None,
                    },
                )));
            }
        }
        let registered = iov
            .iter()
            .all(|v| find(&self.regions, v.iov_base as u64, v.iov_len as u64).is_some());
        if !registered {
            let first = iov.first().map_or(0, |v| v.iov_base as u64);
            self.registry.warn_unregistered_once(first, t.len as u64);
        }
        let len = t.len as usize;
        let bounce = if len <= BOUNCE_SIZE {
            if self.bounce.is_none() {
                let pool =
                    RegisteredPool::new(&self.pd, BOUNCE_SIZE, BOUNCE_COUNT, Access::ISER_DATA)
                        .map_err(|e| self.fail(format!("cannot register bounce buffers: {e}")))?;
                self.bounce = Some(pool);
            }
            match self.bounce.as_mut().and_then(|p| p.take()) {
                Some(i) => Bounce::Pool(i),
                None => return Ok(None),
            }
        } else {
            let pool = RegisteredPool::new(&self.pd, len, 1, Access::ISER_DATA).map_err(|e| {
                self.fail(format!("cannot register a {len}-byte bounce buffer: {e}"))
            })?;
            Bounce::Own(pool)
        };
        let (pool, idx) = match &bounce {
            Bounce::Pool(i) => (self.bounce.as_ref(), *i),
            Bounce::Own(p) => (Some(p), 0),
        };
        let Some(pool) = pool else {
            return Err(self.fail("bounce pool missing".into()));
        };
        let (va, rkey, dst) = match (pool.addr(idx), pool.raw_range(idx, 0, len)) {
            (Ok(a), Ok(d)) => (a, pool.mr().rkey(), d),
            (Err(e), _) | (_, Err(e)) => return Err(self.fail(e.to_string())),
        };
        if !t.target_writes {
            let mut done = 0usize;
            for v in iov.iter() {
                // SAFETY: dst..dst+len is the bounce buffer (raw_range
                // checked len); nothing reads it yet; v is a live segment of
                // the guest buffer held by t.buf.
                unsafe {
                    std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), dst.add(done), v.iov_len)
                };
                done += v.iov_len;
            }
            self.count_copy(done as u64, registered);
        }
        Ok(Some((
            RemoteBuffer {
                stag: rkey,
                va: va + immediate as u64,
            },
            Pending {
                _region: None,
                bounce: Some(bounce),
                read_back: t.target_writes.then(|| (t.buf.clone(), t.offset, t.len)),
            },
        )))
    }

    /// Posts the PDU at the head of the queue. Ok(false): it must wait
    /// (send queue, receive budget or bounce buffers exhausted).
    fn post_head(&mut self) -> Result<bool, TransportError> {
        let Some(pdu) = self.out.front() else {
            return Ok(false);
        };
        let is_cmd = pdu.bhs[0] & 0x3f == 0x01;
        if self.sq_free == 0 || self.send.available() == 0 {
            return Ok(false);
        }
        if is_cmd && self.pending.len() >= MAX_COMMANDS {
            return Ok(false);
        }
        let itt = u32::from_be_bytes([pdu.bhs[16], pdu.bhs[17], pdu.bhs[18], pdu.bhs[19]]);
        let immediate = pdu.data.len();
        self.refresh_regions();
        // Take the head out; put it back if it has to wait.
        let Some(pdu) = self.out.pop_front() else {
            return Ok(false);
        };
        let mut hdr = ControlHeader::default();
        let mut pending = None;
        if let Some(t) = pdu.task.as_ref().filter(|t| t.len > 0) {
            let wants_stag = t.target_writes || immediate < t.len;
            if wants_stag {
                match self.map_task(t, if t.target_writes { 0 } else { immediate })? {
                    Some((rb, p)) => {
                        if t.target_writes {
                            hdr.read = Some(rb);
                        } else {
                            hdr.write = Some(rb);
                        }
                        pending = Some(p);
                    }
                    None => {
                        self.out.push_front(pdu);
                        return Ok(false);
                    }
                }
            }
        }
        let Some(sidx) = self.send.take() else {
            self.out.push_front(pdu);
            return Ok(false);
        };
        let mut head = [0u8; HDRS];
        head[..CONTROL_HEADER_LEN].copy_from_slice(&hdr.encode());
        head[CONTROL_HEADER_LEN..].copy_from_slice(&pdu.bhs);
        // Header + a few immediate-data segments inline: no allocation per Send.
        let mut sges: SmallVec<[Sge; 8]> = SmallVec::new();
        let res = (|| -> Result<(), String> {
            self.send.write(sidx, 0, &head).map_err(|e| e.to_string())?;
            let mut msg_len = HDRS;
            match &pdu.data {
                PduData::None => {}
                PduData::Owned(v) => {
                    if v.len() > MSG_BUF - HDRS {
                        return Err(format!(
                            "{}-byte data segment exceeds {}",
                            v.len(),
                            MSG_BUF - HDRS
                        ));
                    }
                    self.send.write(sidx, HDRS, v).map_err(|e| e.to_string())?;
                    msg_len += v.len();
                }
                PduData::Buffer { buf, offset, len } => {
                    let mut iov = Vec::new();
                    let got = buf.iovecs_range(*offset, *len as u64, &mut iov);
                    if got != *len as u64 {
                        return Err(format!("data segment buffer holds {got} of {len} bytes"));
                    }
                    let max_sge = self.qp.caps().max_send_sge as usize;
                    let regs: Option<Vec<u32>> = iov
                        .iter()
                        .map(|v| {
                            find(&self.regions, v.iov_base as u64, v.iov_len as u64)
                                .map(|r| r.lkey())
                        })
                        .collect();
                    match regs {
                        Some(keys) if iov.len() < max_sge => {
                            // Zero copy: the data segment straight from guest memory.
                            sges.push(self.send.sge(sidx, HDRS).map_err(|e| e.to_string())?);
                            for (v, k) in iov.iter().zip(keys) {
                                sges.push(Sge::new(v.iov_base as u64, v.iov_len as u32, k));
                            }
                            return Ok(());
                        }
                        _ => {
                            if *len as usize > MSG_BUF - HDRS {
                                return Err(format!(
                                    "{len}-byte immediate data exceeds {}",
                                    MSG_BUF - HDRS
                                ));
                            }
                            let dst = self
                                .send
                                .raw_range(sidx, HDRS, *len as usize)
                                .map_err(|e| e.to_string())?;
                            let mut done = 0usize;
                            for v in &iov {
                                // SAFETY: dst..dst+len is inside send buffer
                                // sidx (checked), not posted yet; v is a live
                                // guest segment held by `buf`.
                                unsafe {
                                    std::ptr::copy_nonoverlapping(
                                        v.iov_base.cast::<u8>(),
                                        dst.add(done),
                                        v.iov_len,
                                    )
                                };
                                done += v.iov_len;
                            }
                            msg_len += done;
                        }
                    }
                }
            }
            sges.push(self.send.sge(sidx, msg_len).map_err(|e| e.to_string())?);
            Ok(())
        })();
        if let Err(reason) = res {
            let _ = self.send.give_back(sidx);
            if let Some(p) = pending {
                self.release(p);
            }
            return Err(self.fail(format!("cannot build a Send: {reason}")));
        }
        if let PduData::Buffer { buf, offset, .. } = &pdu.data {
            if sges.len() > 1 && pending.is_none() {
                // Zero-copy immediate data: keep its region registered until
                // the response (the Send has completed by then).
                let mut first = Vec::new();
                buf.iovecs_range(*offset, 1, &mut first);
                let region = first
                    .first()
                    .and_then(|v| find(&self.regions, v.iov_base as u64, 1))
                    .cloned();
                pending = Some(Pending {
                    _region: region,
                    bounce: None,
                    read_back: None,
                });
            }
            if sges.len() == 1 {
                // Immediate data copied into the send buffer.
                let mut first = Vec::new();
                buf.iovecs_range(*offset, 1, &mut first);
                let registered = first
                    .first()
                    .is_some_and(|v| find(&self.regions, v.iov_base as u64, 1).is_some());
                self.count_copy(pdu.data.len() as u64, registered);
            }
        }
        let post = self.qp.post_send_batch(&[SendWr {
            wr_id: SEND_TAG | sidx as u64,
            op: SendOp::Send,
            sges: &sges,
            flags: SendFlags::SIGNALED,
        }]);
        if let Err(e) = post {
            let _ = self.send.give_back(sidx);
            return Err(self.fail(format!("posting a Send failed: {e}")));
        }
        self.sq_free -= 1;
        if is_cmd {
            self.commands += 1;
            COMMANDS_SENT.fetch_add(1, Ordering::Relaxed);
            self.pending.insert(
                itt,
                pending.unwrap_or(Pending {
                    _region: None,
                    bounce: None,
                    read_back: None,
                }),
            );
            if self.commands >= self.next_report {
                self.next_report = match self.report_every {
                    Some(n) => self.next_report.saturating_add(n),
                    None => self.next_report.saturating_mul(4),
                };
                info!(
                    "iSER to {}: {} commands, {} bytes copied (process: {} bytes for scattered guest buffers, {} for unregistered buffers)",
                    self.addr,
                    self.commands,
                    self.copied,
                    bytes_copied(),
                    bytes_copied_unregistered()
                );
            }
        }
        // pdu (with its buffer Arcs) drops here; `pending` keeps the region.
        Ok(true)
    }
}

impl Transport for IserConnection {
    fn addr(&self) -> &str {
        &self.addr
    }

    fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn set_digests(&mut self, header: bool, data: bool) {
        if header || data {
            warn!(
                "iSER connection to {}: digests do not apply to iSER (RFC 7145 §6.3); ignored",
                self.addr
            );
        }
    }

    fn set_max_recv_data(&mut self, _max: u32) {
        // iSER control PDUs are bounded by InitiatorRecvDataSegmentLength,
        // which we declare as CONTROL_DATA_MAX; receive buffers fit it.
    }

    fn queue(&mut self, pdu: OutPdu) {
        self.out.push_back(pdu);
    }

    fn flush(&mut self) -> Result<bool, TransportError> {
        if self.failed.is_some() {
            return Err(self.error());
        }
        if !self.out.is_empty() && (self.sq_free == 0 || self.send.available() == 0) {
            // Reap send completions to free slots.
            self.progress()?;
        }
        while self.post_head()? {}
        Ok(self.out.is_empty())
    }

    fn has_pending_output(&self) -> bool {
        !self.out.is_empty()
    }

    fn recv(&mut self, planner: &mut dyn RecvPlanner) -> Result<Option<InPdu>, TransportError> {
        if self.ready.is_empty() {
            if self.failed.is_some() {
                return Err(self.error());
            }
            self.progress()?;
        }
        let Some((bhs, data)) = self.ready.pop_front() else {
            return Ok(None);
        };
        if data.is_empty() {
            return Ok(Some(InPdu { bhs, data }));
        }
        match planner.plan(&bhs) {
            RecvPlan::Owned => Ok(Some(InPdu { bhs, data })),
            RecvPlan::Discard => Ok(Some(InPdu {
                bhs,
                data: Vec::new(),
            })),
            RecvPlan::Direct(iov) => {
                let mut done = 0usize;
                for v in &iov {
                    let n = v.iov_len.min(data.len() - done);
                    // SAFETY: the session hands out iovecs inside the task's
                    // guest buffer, sized to the data segment; n is bounded by
                    // what is left of `data`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(data.as_ptr().add(done), v.iov_base.cast(), n)
                    };
                    done += n;
                }
                Ok(Some(InPdu {
                    bhs,
                    data: Vec::new(),
                }))
            }
        }
    }

    fn places_data(&self) -> bool {
        true
    }

    fn wait(&mut self, _writable: bool, deadline: Instant) -> Result<(), TransportError> {
        // Send completions arrive on the CQ too: always wait for readability.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TransportError::Timeout {
                addr: self.addr.clone(),
                what: "a response",
            });
        }
        let mut pfd = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe {
            libc::poll(
                &mut pfd,
                1,
                left.as_millis().clamp(1, i32::MAX as u128) as i32,
            )
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(TransportError::Io {
                    addr: self.addr.clone(),
                    source: e,
                });
            }
        }
        Ok(())
    }
}

impl Drop for IserConnection {
    fn drop(&mut self) {
        info!(
            "iSER: connection to {} closed after {} commands; {} bytes copied through bounce buffers \
             (process: {} bytes for scattered guest buffers, {} for unregistered buffers)",
            self.addr,
            self.commands,
            self.copied,
            bytes_copied(),
            bytes_copied_unregistered()
        );
        if self.failed.is_none() {
            // Stop the QP before its buffers go: the target must not touch
            // guest memory after the commands are gone.
            let _ = self.id.disconnect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(base: u64, len: usize) -> iovec {
        iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: len,
        }
    }

    #[test]
    fn readable_reports_each_fd() {
        // SAFETY: plain syscalls; the fds are owned below.
        let (a, b) = unsafe {
            (
                libc::eventfd(0, libc::EFD_NONBLOCK),
                libc::eventfd(0, libc::EFD_NONBLOCK),
            )
        };
        assert!(a >= 0 && b >= 0);
        // SAFETY: fresh fds nobody else owns.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(a), OwnedFd::from_raw_fd(b)) };
        let one = 1u64.to_ne_bytes();
        let (ra, rb) = (a.as_raw_fd(), b.as_raw_fd());
        assert_eq!(readable(ra, rb).unwrap(), (false, false));
        // SAFETY: writing 8 bytes from a live buffer to an eventfd.
        assert_eq!(unsafe { libc::write(rb, one.as_ptr().cast(), 8) }, 8);
        assert_eq!(readable(ra, rb).unwrap(), (false, true));
        // SAFETY: as above.
        assert_eq!(unsafe { libc::write(ra, one.as_ptr().cast(), 8) }, 8);
        assert_eq!(readable(ra, rb).unwrap(), (true, true));
        // poll(2) ignores a negative fd: never reported readable.
        assert_eq!(readable(-1, rb).unwrap(), (false, true));
    }

    #[test]
    fn adjacent_segments_merge() {
        assert_eq!(contiguous(&[]), None);
        assert_eq!(contiguous(&[v(0x1000, 512)]), Some((0x1000, 512)));
        assert_eq!(
            contiguous(&[v(0x1000, 512), v(0x1200, 4096)]),
            Some((0x1000, 4608))
        );
        assert_eq!(contiguous(&[v(0x1000, 512), v(0x2000, 512)]), None);
    }

    // Buffers hold a whole login PDU; receives cover every response.
    const _: () = assert!(MSG_BUF >= HDRS + CONTROL_DATA_MAX && MSG_BUF.is_multiple_of(64));
    const _: () = assert!(RECVS >= MAX_COMMANDS + UNEXPECTED);
}
