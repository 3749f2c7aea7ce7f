//! An iSCSI session in full feature phase: the command window, the task
//! table, the data-out machinery (immediate data, unsolicited Data-Out, R2T)
//! and the handling of every PDU a target sends.
//!
//! One session serves one virtqueue and is driven by that queue's worker
//! thread only: no locks. Anything a target does that the protocol forbids
//! (an unknown ITT, data beyond a command's buffer, a StatSN out of order, an
//! R2T beyond the buffer) ends the connection with a log line that says what
//! was wrong; guest memory outside the command's own buffer is never touched.
//!
//! Liveness and recovery (ErrorRecoveryLevel 0): [`Session::on_timer`] pings
//! an idle target with NOP-Out and drops the connection when the answer does
//! not come; a command past its deadline is aborted (ABORT TASK), then the
//! LUN is reset, then the connection is dropped. When the connection is lost
//! the commands that had not completed are kept, in CmdSN order, for the next
//! session ([`Session::take_orphans`] / [`Session::adopt`]) and fail only when
//! no new session took them within the replacement timeout.

use libc::iovec;
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use thiserror::Error;

use super::params::{DigestKind, SessionParams};
use super::pdu::{
    serial_ge, serial_gt, serial_le, AsyncEvent, Cdb, DataIn, DataOut, LogoutReason, LogoutRequest,
    LogoutResponseCode, NopIn, NopOut, R2t, ScsiCommand, ScsiResponse, SeqNums, TargetPdu,
    TaskAttr, TaskMgmtRequest, TaskMgmtResponse, TmfFunction, TmfResponse, RESERVED_TAG, U24,
};
use super::task::{DataDir, ScsiCommandReq, Task, TaskTable, NOP_ITT_INDEX, TMF_ITT_INDEX};
use crate::transport::{
    ExpectedDataIn, OutPdu, PduData, RecvPlan, RecvPlanner, TaskBuffer, Transport, TransportError,
    BHS_LEN,
};

/// Why a command or the session failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SessionError {
    /// The connection failed or the target broke the protocol.
    #[error("connection to {portal} lost: {reason}")]
    ConnectionLost {
        /// The portal.
        portal: String,
        /// What happened.
        reason: String,
    },
    /// The target refused the command (Reject PDU or iSCSI response code).
    #[error("target {portal} rejected the command: {reason}")]
    Rejected {
        /// The portal.
        portal: String,
        /// Why.
        reason: String,
    },
    /// The command did not complete in time.
    #[error("command timed out on {portal}")]
    Timeout {
        /// The portal.
        portal: String,
    },
}

/// Liveness and recovery timers of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionTimeouts {
    /// Ping the target with NOP-Out after this long without a PDU from it.
    pub nop_interval: Duration,
    /// Drop the connection when a ping is not answered within this.
    pub nop_timeout: Duration,
    /// A command not finished after this is aborted (ABORT TASK).
    pub command_timeout: Duration,
    /// A task management request not answered within this escalates
    /// (ABORT TASK → LUN RESET → drop the connection).
    pub tmf_timeout: Duration,
    /// After a lost connection, commands wait this long for a new session
    /// before they fail.
    pub replacement_timeout: Duration,
}

impl Default for SessionTimeouts {
    fn default() -> Self {
        SessionTimeouts {
            nop_interval: Duration::from_secs(5),
            nop_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(30),
            tmf_timeout: Duration::from_secs(10),
            replacement_timeout: Duration::from_secs(20),
        }
    }
}

impl SessionTimeouts {
    /// Parses "nop=5,nop_timeout=5,command=30,tmf=10,replacement=30"
    /// (seconds, decimals allowed; keys may be left out).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut t = SessionTimeouts::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("timeout setting {item:?} is not key=seconds"))?;
            let secs: f64 = v
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s >= 0.0 && *s < 1e6)
                .ok_or_else(|| format!("timeout {k}={v:?} is not a number of seconds"))?;
            let d = Duration::from_secs_f64(secs);
            match k {
                "nop" => t.nop_interval = d,
                "nop_timeout" => t.nop_timeout = d,
                "command" => t.command_timeout = d,
                "tmf" => t.tmf_timeout = d,
                "replacement" => t.replacement_timeout = d,
                _ => {
                    return Err(format!(
                        "unknown timeout {k:?} (nop, nop_timeout, command, tmf, replacement)"
                    ))
                }
            }
        }
        Ok(t)
    }
}

/// Commands a lost session had not finished, for the next session.
#[derive(Default)]
pub struct Orphans {
    cmds: VecDeque<(ScsiCommandReq, u8)>,
}

impl Orphans {
    /// Number of commands.
    pub fn len(&self) -> usize {
        self.cmds.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }
}

/// How many times one command is re-issued after lost connections.
const MAX_REISSUE: u8 = 3;

/// A task management request in flight.
#[derive(Clone, Copy, Debug)]
struct PendingTmf {
    itt: u32,
    function: TmfFunction,
    /// ITT of the task it is about (ABORT TASK).
    ref_itt: u32,
    sent: Instant,
}

/// What a command returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiOutcome {
    /// SCSI status byte (0 = GOOD, 2 = CHECK CONDITION, ...).
    pub status: u8,
    /// Sense data (CHECK CONDITION), without the 2-byte length prefix.
    pub sense: Vec<u8>,
    /// Residual: positive for underflow (less data moved than expected),
    /// negative for overflow.
    pub residual: i64,
}

/// A finished command.
#[derive(Debug)]
pub struct ScsiResult {
    /// The caller's tag.
    pub tag: u64,
    /// The outcome.
    pub result: Result<ScsiOutcome, SessionError>,
}

/// Sequence numbers right after login.
#[derive(Clone, Copy, Debug)]
pub struct SessionStart {
    /// First CmdSN to use.
    pub cmd_sn: u32,
    /// Next expected StatSN.
    pub exp_stat_sn: u32,
    /// MaxCmdSN from the last login response.
    pub max_cmd_sn: u32,
}

/// A coalesced receive (see `Session::update_receive_batch`) that has heard
/// nothing for this long gives up at the next timer tick.
const COALESCE_GIVE_UP: Duration = Duration::from_millis(50);
/// ... and the session does not coalesce again for this long.
const COALESCE_PAUSE: Duration = Duration::from_secs(1);

/// Environment variable capping how many read responses the transport may
/// wait for before waking the queue (power of two; 1 turns coalescing off).
pub const RECEIVE_BATCH_ENV: &str = "VHOST_ISER_RECEIVE_BATCH";

/// The most read responses one wake-up waits for: `$VHOST_ISER_RECEIVE_BATCH`,
/// else 16.
fn max_receive_batch() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var(RECEIVE_BATCH_ENV)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map(|v| v.clamp(1, 256).next_power_of_two())
            .unwrap_or(16)
    })
}

/// One iSCSI session (one connection, ErrorRecoveryLevel 0).
pub struct Session {
    conn: Box<dyn Transport>,
    portal: String,
    params: SessionParams,
    cmd_sn: u32,
    exp_stat_sn: u32,
    max_cmd_sn: u32,
    tasks: TaskTable,
    /// ITTs of read commands in the order they were sent: the order in which
    /// their Data-In most likely comes back (see [`DataInPlanner::expected`]).
    /// Entries of finished commands are dropped lazily.
    read_order: VecDeque<u32>,
    /// How many read responses the transport waits for before waking us
    /// (interrupt coalescing; see [`Session::update_receive_batch`]).
    batch_reads: usize,
    /// After a coalesced wait gave up, none until this time.
    coalesce_after: Option<Instant>,
    /// When coalescing last started (the give-up counts from here or the
    /// last PDU, whichever is later).
    batch_raised_at: Instant,
    /// Why the planner refused a PDU's data (kept until that PDU is handed
    /// out, which may be several receive calls later).
    refused: Option<String>,
    /// Commands waiting for the CmdSN window or a free slot.
    waiting: VecDeque<(ScsiCommandReq, u8)>,
    failed: Option<SessionError>,
    /// Results produced outside `poll` (failures), handed out at the next poll.
    ready: Vec<ScsiResult>,
    timeouts: SessionTimeouts,
    /// Last time a PDU came from the target (or the session started).
    last_rx: Instant,
    /// Outstanding ping: ITT and when it was sent.
    nop: Option<(u32, Instant)>,
    /// Generation counter of the special ITTs.
    special_gen: u16,
    tmf: Option<PendingTmf>,
    /// Commands kept after the connection was lost (CmdSN order).
    orphans: VecDeque<(ScsiCommandReq, u8)>,
    lost_at: Option<Instant>,
    /// The replacement timeout passed: new commands fail at once.
    gave_up: bool,
}

/// Tells the transport where Data-In goes: straight into the guest buffer of
/// the read it belongs to. Everything else is small and comes back owned.
struct DataInPlanner<'a> {
    tasks: &'a mut TaskTable,
    read_order: &'a mut VecDeque<u32>,
    /// Why a Data-In was refused (the session then drops the connection).
    refused: &'a mut Option<String>,
}

impl RecvPlanner for DataInPlanner<'_> {
    fn plan(&mut self, bhs: &[u8; BHS_LEN]) -> RecvPlan {
        if bhs[0] & 0x3f != 0x25 {
            return RecvPlan::Owned;
        }
        let itt = u32::from_be_bytes([bhs[16], bhs[17], bhs[18], bhs[19]]);
        let offset = u32::from_be_bytes([bhs[40], bhs[41], bhs[42], bhs[43]]) as u64;
        let dsl = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as u64;
        let Some(task) = self.tasks.get_mut(itt) else {
            *self.refused = Some(format!("Data-In for unknown task {itt:#010x}"));
            return RecvPlan::Discard;
        };
        if task.req.dir != DataDir::Read {
            *self.refused = Some(format!("Data-In for non-read task {itt:#010x}"));
            return RecvPlan::Discard;
        }
        if offset + dsl > task.req.len as u64 {
            *self.refused = Some(format!(
                "Data-In of {dsl} bytes at offset {offset} overflows the {}-byte buffer of task {itt:#010x}",
                task.req.len
            ));
            return RecvPlan::Discard;
        }
        let Some(buf) = &task.req.buf else {
            *self.refused = Some(format!("Data-In for task {itt:#010x} without a buffer"));
            return RecvPlan::Discard;
        };
        let mut iov = Vec::with_capacity(2);
        let covered = buf.iovecs_range(task.req.offset + offset, dsl, &mut iov);
        if covered != dsl {
            *self.refused = Some(format!("task {itt:#010x} buffer shorter than its length"));
            return RecvPlan::Discard;
        }
        RecvPlan::Direct(iov)
    }

    /// Reads that have received nothing yet, in the order they were sent:
    /// a target that answers in order (tgt, LIO with a fast backing store)
    /// sends their Data-In next, one PDU each when it fits.
    fn expected(&mut self, max: usize, out: &mut Vec<ExpectedDataIn>, iov: &mut Vec<iovec>) {
        while let Some(&itt) = self.read_order.front() {
            if self.tasks.get(itt).is_some_and(Task::awaits_data_in) {
                break;
            }
            self.read_order.pop_front();
        }
        // Bounded: reads answered out of order leave finished entries behind
        // the first waiting one.
        for &itt in self.read_order.iter().take(4 * max + 64) {
            if out.len() >= max {
                break;
            }
            let Some(task) = self.tasks.get(itt).filter(|t| t.awaits_data_in()) else {
                continue;
            };
            let Some(buf) = &task.req.buf else {
                continue;
            };
            let start = iov.len();
            let len = task.req.len;
            if buf.iovecs_range(task.req.offset, u64::from(len), iov) != u64::from(len) {
                iov.truncate(start);
                continue;
            }
            out.push(ExpectedDataIn {
                itt,
                len,
                iov_start: start,
                iov_end: iov.len(),
            });
        }
    }
}

impl Session {
    /// A session over a connection that just completed login.
    pub fn new(mut conn: Box<dyn Transport>, params: SessionParams, start: SessionStart) -> Self {
        conn.set_digests(
            params.header_digest == DigestKind::Crc32c,
            params.data_digest == DigestKind::Crc32c,
        );
        conn.set_max_recv_data(params.initiator_max_recv_data_segment_length);
        let portal = conn.addr().to_string();
        Session {
            conn,
            portal,
            params,
            cmd_sn: start.cmd_sn,
            exp_stat_sn: start.exp_stat_sn,
            max_cmd_sn: start.max_cmd_sn,
            tasks: TaskTable::default(),
            read_order: VecDeque::new(),
            batch_reads: 1,
            coalesce_after: None,
            batch_raised_at: Instant::now(),
            refused: None,
            waiting: VecDeque::new(),
            failed: None,
            ready: Vec::new(),
            timeouts: SessionTimeouts::default(),
            last_rx: Instant::now(),
            nop: None,
            special_gen: 0,
            tmf: None,
            orphans: VecDeque::new(),
            lost_at: None,
            gave_up: false,
        }
    }

    /// Sets the liveness and recovery timers.
    pub fn set_timeouts(&mut self, t: SessionTimeouts) {
        self.timeouts = t;
    }

    /// The liveness and recovery timers.
    pub fn timeouts(&self) -> SessionTimeouts {
        self.timeouts
    }

    /// Takes the commands a lost session kept (CmdSN order), for
    /// [`adopt`](Self::adopt) by its replacement.
    pub fn take_orphans(&mut self) -> Orphans {
        Orphans {
            cmds: std::mem::take(&mut self.orphans),
        }
    }

    /// Re-issues a lost session's commands first, in their order.
    pub fn adopt(&mut self, o: Orphans) {
        if o.cmds.is_empty() {
            return;
        }
        info!(
            "iSCSI session to {}: re-issuing {} command(s) from the lost connection",
            self.portal,
            o.cmds.len()
        );
        for c in o.cmds.into_iter().rev() {
            self.waiting.push_front(c);
        }
    }

    fn next_special_itt(&mut self, index: u32) -> u32 {
        self.special_gen = self.special_gen.wrapping_add(1);
        (self.special_gen as u32) << 16 | index
    }

    /// Timer tick: pings, command deadlines, task management escalation,
    /// the replacement timeout. Results (failures) come out of the next
    /// [`poll`](Self::poll).
    pub fn on_timer(&mut self, now: Instant) {
        // A coalesced wait that has heard nothing for a while may be waiting
        // for bytes that will not come (reads that failed with short
        // responses): take whatever is there now.
        let quiet_since = self.last_rx.max(self.batch_raised_at);
        if self.batch_reads > 1 && now.saturating_duration_since(quiet_since) >= COALESCE_GIVE_UP {
            self.batch_reads = 1;
            self.conn.set_receive_batch(1);
            self.coalesce_after = Some(now + COALESCE_PAUSE);
        }
        if self.failed.is_some() {
            let expired = self.lost_at.is_some_and(|t| {
                now.saturating_duration_since(t) >= self.timeouts.replacement_timeout
            });
            if expired {
                self.gave_up = true;
            }
            if expired && !self.orphans.is_empty() {
                error!(
                    "iSCSI session to {}: no new connection within the replacement timeout ({:?}); failing {} command(s)",
                    self.portal,
                    self.timeouts.replacement_timeout,
                    self.orphans.len()
                );
                let e = SessionError::ConnectionLost {
                    portal: self.portal.clone(),
                    reason: format!(
                        "no new connection within the replacement timeout ({:?})",
                        self.timeouts.replacement_timeout
                    ),
                };
                for (r, _) in self.orphans.drain(..) {
                    self.ready.push(ScsiResult {
                        tag: r.tag,
                        result: Err(e.clone()),
                    });
                }
            }
            return;
        }
        let mut done = Vec::new();
        if let Err(e) = self.timer_checks(now) {
            self.fail(e, &mut done);
        } else if let Err(e) = self.flush() {
            self.fail(e, &mut done);
        }
        self.ready.append(&mut done);
    }

    fn timer_checks(&mut self, now: Instant) -> Result<(), SessionError> {
        let t = self.timeouts;
        // Liveness.
        match self.nop {
            Some((_, sent)) if now.saturating_duration_since(sent) >= t.nop_timeout => {
                return Err(SessionError::ConnectionLost {
                    portal: self.portal.clone(),
                    reason: format!(
                        "the target did not answer a NOP-Out ping within {:?}",
                        t.nop_timeout
                    ),
                });
            }
            None if now.saturating_duration_since(self.last_rx) >= t.nop_interval => {
                let itt = self.next_special_itt(NOP_ITT_INDEX);
                let h = NopOut {
                    immediate: true,
                    data_segment_length: U24::ZERO,
                    lun: 0,
                    itt,
                    ttt: RESERVED_TAG,
                    cmd_sn: self.cmd_sn,
                    exp_stat_sn: self.exp_stat_sn,
                };
                self.conn.queue(OutPdu::new(h.encode(), PduData::None));
                self.nop = Some((itt, now));
            }
            _ => {}
        }
        // Task management escalation.
        if let Some(tmf) = self.tmf {
            if now.saturating_duration_since(tmf.sent) >= t.tmf_timeout {
                self.tmf = None;
                match tmf.function {
                    TmfFunction::AbortTask => {
                        warn!(
                            "iSCSI session to {}: ABORT TASK for task {:#010x} not answered within {:?}; resetting the LUN",
                            self.portal, tmf.ref_itt, t.tmf_timeout
                        );
                        self.send_lun_reset(now);
                    }
                    _ => {
                        return Err(SessionError::ConnectionLost {
                            portal: self.portal.clone(),
                            reason: format!(
                                "{:?} not answered within {:?}",
                                tmf.function, t.tmf_timeout
                            ),
                        })
                    }
                }
            }
            return Ok(());
        }
        // Command deadlines: abort the oldest late command.
        let late = self
            .tasks
            .iter()
            .filter(|x| {
                !x.aborting && now.saturating_duration_since(x.started) >= t.command_timeout
            })
            .min_by_key(|x| x.started)
            .map(|x| (x.itt, x.cmd_sn, x.req.lun, x.req.cdb[0]));
        if let Some((ref_itt, ref_cmd_sn, lun, op)) = late {
            warn!(
                "iSCSI session to {}: command {op:#04x} (task {ref_itt:#010x}) not finished after {:?}; sending ABORT TASK",
                self.portal, t.command_timeout
            );
            if let Some(task) = self.tasks.get_mut(ref_itt) {
                task.aborting = true;
            }
            let itt = self.next_special_itt(TMF_ITT_INDEX);
            let h = TaskMgmtRequest {
                immediate: true,
                function: TmfFunction::AbortTask,
                lun,
                itt,
                referenced_task_tag: ref_itt,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
                ref_cmd_sn,
                exp_data_sn: 0,
            };
            self.conn.queue(OutPdu::new(h.encode(), PduData::None));
            self.tmf = Some(PendingTmf {
                itt,
                function: TmfFunction::AbortTask,
                ref_itt,
                sent: now,
            });
        }
        Ok(())
    }

    fn send_lun_reset(&mut self, now: Instant) {
        let lun = self.tasks.iter().next().map(|x| x.req.lun).unwrap_or(0);
        for itt in self.tasks.iter().map(|x| x.itt).collect::<Vec<_>>() {
            if let Some(task) = self.tasks.get_mut(itt) {
                if now.saturating_duration_since(task.started) >= self.timeouts.command_timeout {
                    task.aborting = true;
                }
            }
        }
        let itt = self.next_special_itt(TMF_ITT_INDEX);
        let h = TaskMgmtRequest {
            immediate: true,
            function: TmfFunction::LogicalUnitReset,
            lun,
            itt,
            referenced_task_tag: RESERVED_TAG,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            ref_cmd_sn: 0,
            exp_data_sn: 0,
        };
        self.conn.queue(OutPdu::new(h.encode(), PduData::None));
        self.tmf = Some(PendingTmf {
            itt,
            function: TmfFunction::LogicalUnitReset,
            ref_itt: RESERVED_TAG,
            sent: now,
        });
    }

    fn timed_out(&self) -> SessionError {
        SessionError::Timeout {
            portal: self.portal.clone(),
        }
    }

    fn on_tmf_response(
        &mut self,
        r: TaskMgmtResponse,
        done: &mut Vec<ScsiResult>,
    ) -> Result<(), SessionError> {
        self.update_seq(&r.seq, true)?;
        let Some(tmf) = self.tmf.filter(|t| t.itt == r.itt) else {
            return Err(self.violation(format!(
                "Task Management Response for unknown ITT {:#010x}",
                r.itt
            )));
        };
        self.tmf = None;
        match (tmf.function, r.response) {
            (TmfFunction::AbortTask, TmfResponse::Complete | TmfResponse::TaskDoesNotExist) => {
                if let Some(task) = self.tasks.remove(tmf.ref_itt) {
                    warn!(
                        "iSCSI session to {}: task {:#010x} aborted after its timeout",
                        self.portal, tmf.ref_itt
                    );
                    done.push(ScsiResult {
                        tag: task.req.tag,
                        result: Err(self.timed_out()),
                    });
                }
            }
            (TmfFunction::AbortTask, other) => {
                warn!(
                    "iSCSI session to {}: ABORT TASK refused ({other:?}); resetting the LUN",
                    self.portal
                );
                self.send_lun_reset(Instant::now());
            }
            (TmfFunction::LogicalUnitReset, TmfResponse::Complete) => {
                // Every task of the LUN is gone: late ones fail, the others go out again.
                let all = self.tasks.drain();
                warn!(
                    "iSCSI session to {}: LUN reset done; {} task(s) ended by it",
                    self.portal,
                    all.len()
                );
                for t in all.into_iter().rev() {
                    if t.aborting {
                        done.push(ScsiResult {
                            tag: t.req.tag,
                            result: Err(self.timed_out()),
                        });
                    } else {
                        self.waiting.push_front((t.req, t.reissued));
                    }
                }
            }
            (f, other) => {
                return Err(SessionError::ConnectionLost {
                    portal: self.portal.clone(),
                    reason: format!("task management {f:?} failed: {other:?}"),
                })
            }
        }
        Ok(())
    }

    /// The negotiated parameters.
    pub fn params(&self) -> &SessionParams {
        &self.params
    }

    /// The portal this session is connected to.
    pub fn portal(&self) -> &str {
        &self.portal
    }

    /// The socket, for the worker's epoll.
    pub fn fd(&self) -> RawFd {
        self.conn.fd()
    }

    /// Whether output is waiting for the socket (watch it for writability).
    pub fn wants_write(&self) -> bool {
        self.conn.has_pending_output()
    }

    /// Commands accepted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.tasks.len() + self.waiting.len() + self.ready.len() + self.orphans.len()
    }

    /// Why the session is down, if it is.
    pub fn failure(&self) -> Option<&SessionError> {
        self.failed.as_ref()
    }

    /// Accepts a command; it goes out at the next [`poll`](Self::poll).
    /// On a lost session it waits for the replacement (up to the
    /// replacement timeout), then fails. Nothing here bounds the commands
    /// kept meanwhile: the caller does (the block layer submits only
    /// commands of guest requests still in the virtqueue, at most
    /// queue-size of them; see `LunQueue::send_child` in src/scsi/lun.rs).
    pub fn submit(&mut self, req: ScsiCommandReq) {
        if let Some(e) = &self.failed {
            let waiting = !self.gave_up
                && self
                    .lost_at
                    .is_some_and(|t| t.elapsed() < self.timeouts.replacement_timeout);
            if waiting {
                self.orphans.push_back((req, 0));
            } else {
                self.ready.push(ScsiResult {
                    tag: req.tag,
                    result: Err(e.clone()),
                });
            }
            return;
        }
        self.waiting.push_back((req, 0));
    }

    /// Sends what can be sent, receives what has arrived, appends finished commands.
    pub fn poll(&mut self, done: &mut Vec<ScsiResult>) {
        done.append(&mut self.ready);
        if self.failed.is_some() {
            return;
        }
        if let Err(e) = self.poll_inner(done) {
            self.fail(e, done);
        }
    }

    /// Sends waiting commands without looking for responses (they arrive
    /// through the connection's fd): no receive that would find nothing.
    pub fn send(&mut self, done: &mut Vec<ScsiResult>) {
        done.append(&mut self.ready);
        if self.failed.is_some() {
            return;
        }
        self.start_waiting();
        if let Err(e) = self.flush() {
            self.fail(e, done);
            return;
        }
        self.update_receive_batch();
    }

    fn poll_inner(&mut self, done: &mut Vec<ScsiResult>) -> Result<(), SessionError> {
        self.start_waiting();
        self.flush()?;
        loop {
            let got = self.receive_one(done)?;
            // Responses open the window and R2Ts queue data: send before reading more
            // so the target is never starved.
            self.start_waiting();
            self.flush()?;
            if !got {
                self.update_receive_batch();
                return Ok(());
            }
        }
    }

    fn flush(&mut self) -> Result<(), SessionError> {
        self.conn.flush().map(|_| ()).map_err(|e| self.lost(e))
    }

    fn lost(&self, e: TransportError) -> SessionError {
        SessionError::ConnectionLost {
            portal: self.portal.clone(),
            reason: e.to_string(),
        }
    }

    fn violation(&self, reason: String) -> SessionError {
        SessionError::ConnectionLost {
            portal: self.portal.clone(),
            reason: format!("protocol violation: {reason}"),
        }
    }

    /// Marks the session down. Unfinished commands are kept for the next
    /// session (a command re-issued too often fails).
    fn fail(&mut self, e: SessionError, done: &mut Vec<ScsiResult>) {
        let keep = !self.timeouts.replacement_timeout.is_zero();
        let mut failed = 0usize;
        for t in self.tasks.drain() {
            // A command being aborted is in an unknown state too: re-issue it
            // like the others (the count bounds a command that always hangs).
            if keep && t.reissued < MAX_REISSUE {
                self.orphans.push_back((t.req, t.reissued + 1));
            } else {
                failed += 1;
                done.push(ScsiResult {
                    tag: t.req.tag,
                    result: Err(if t.aborting {
                        self.timed_out()
                    } else {
                        e.clone()
                    }),
                });
            }
        }
        for (r, n) in self.waiting.drain(..) {
            if keep {
                self.orphans.push_back((r, n));
            } else {
                failed += 1;
                done.push(ScsiResult {
                    tag: r.tag,
                    result: Err(e.clone()),
                });
            }
        }
        error!(
            "iSCSI session to {}: {e}; failing {failed} command(s), keeping {} for a new connection (up to {:?})",
            self.portal,
            self.orphans.len(),
            self.timeouts.replacement_timeout
        );
        self.failed = Some(e);
        self.lost_at = Some(Instant::now());
        self.nop = None;
        self.tmf = None;
    }

    /// Starts waiting commands while the CmdSN window and the task table allow.
    fn start_waiting(&mut self) {
        while !self.waiting.is_empty()
            && serial_le(self.cmd_sn, self.max_cmd_sn)
            && self.tasks.has_room()
        {
            let Some((req, reissued)) = self.waiting.pop_front() else {
                break;
            };
            self.send_command(req, reissued);
        }
    }

    fn send_command(&mut self, req: ScsiCommandReq, reissued: u8) {
        let cmd_sn = self.cmd_sn;
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        let len = req.len;
        let is_write = req.dir == DataDir::Write && len > 0;
        // Immediate data and unsolicited Data-Out, as negotiated (RFC 7143 §3.2.4.2).
        let first_burst = if is_write && (self.params.immediate_data || !self.params.initial_r2t) {
            len.min(self.params.first_burst_length)
        } else {
            0
        };
        let max_seg = self.params.target_max_recv_data_segment_length.max(512);
        let immediate = if is_write && self.params.immediate_data {
            first_burst.min(max_seg)
        } else {
            0
        };
        // iSER: the target fetches write data itself (RDMA Read); only
        // immediate data rides with the command.
        let unsolicited_out = if is_write && !self.params.initial_r2t && !self.conn.places_data() {
            first_burst - immediate
        } else {
            0
        };
        let Some(cdb) = Cdb::new(&req.cdb[..req.cdb_len as usize]).ok() else {
            self.ready.push(ScsiResult {
                tag: req.tag,
                result: Err(SessionError::Rejected {
                    portal: self.portal.clone(),
                    reason: "CDB longer than 16 bytes".into(),
                }),
            });
            return;
        };
        let task = Task {
            req,
            itt: 0,
            cmd_sn,
            data_in: 0,
            exp_data_sn: 0,
            data_out: (immediate + unsolicited_out) as u64,
            exp_r2t_sn: 0,
            started: Instant::now(),
            reissued,
            aborting: false,
        };
        let lun = task.req.lun;
        let buf = task.req.buf.clone();
        let offset = task.req.offset;
        let dir = task.req.dir;
        let tag = task.req.tag;
        let Some(itt) = self.tasks.insert(task) else {
            // has_room() was checked by the caller.
            warn!("task table full on {}", self.portal);
            return;
        };
        let header = ScsiCommand {
            immediate: false,
            final_: unsolicited_out == 0,
            read: dir == DataDir::Read,
            write: dir == DataDir::Write,
            attr: TaskAttr::Simple,
            ahs_words: 0,
            data_segment_length: U24::new(immediate).unwrap_or(U24::ZERO),
            lun,
            itt,
            expected_data_transfer_length: len,
            cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb,
        };
        let data = match (&buf, immediate) {
            (Some(b), n) if n > 0 => PduData::Buffer {
                buf: b.clone(),
                offset,
                len: n,
            },
            _ => PduData::None,
        };
        let _ = tag;
        let task = match (&buf, self.conn.places_data() && len > 0) {
            (Some(b), true) => Some(TaskBuffer {
                buf: b.clone(),
                offset,
                len,
                target_writes: dir == DataDir::Read,
            }),
            _ => None,
        };
        self.conn.queue(OutPdu {
            bhs: header.encode(),
            data,
            task,
        });
        if dir == DataDir::Read && len > 0 && !self.conn.places_data() {
            self.note_read_sent(itt);
        }
        if unsolicited_out > 0 {
            if let Some(b) = buf {
                self.queue_data_out(
                    lun,
                    itt,
                    RESERVED_TAG,
                    &b,
                    offset,
                    immediate,
                    unsolicited_out,
                );
            }
        }
    }

    /// Interrupt coalescing at depth: with many commands in flight, ask the
    /// transport to wake us only when the Data-In of the next few reads (in
    /// the order sent) has arrived, rather than for every response. The batch
    /// doubles while commands in flight are at least 4 per batched read and
    /// halves when they fall below 2 per batched read, so it is stable under
    /// a steady queue depth (8 at QD32) and never counts on more than half
    /// of what is in flight. The bytes waited for are those of reads in flight:
    /// if they succeed, the wait ends. If they fail with short responses, the
    /// timer tick drops the batch (see [`on_timer`](Self::on_timer)).
    fn update_receive_batch(&mut self) {
        let n = self.tasks.len();
        let mut max = max_receive_batch();
        if let Some(t) = self.coalesce_after {
            if Instant::now() < t {
                max = 1;
            } else {
                self.coalesce_after = None;
            }
        }
        let mut k = self.batch_reads.clamp(1, max.max(1));
        while k < max && n >= 4 * k {
            k *= 2;
        }
        while k > 1 && n < 2 * k {
            k /= 2;
        }
        let was = self.batch_reads;
        self.batch_reads = k;
        let mut bytes = 0usize;
        if k > 1 {
            let (mut found, mut largest) = (0, 0);
            for &itt in self.read_order.iter().take(4 * k + 64) {
                if found == k {
                    break;
                }
                if let Some(t) = self.tasks.get(itt) {
                    if t.awaits_data_in() {
                        let pdu = BHS_LEN + t.req.len as usize;
                        bytes += pdu;
                        largest = largest.max(pdu);
                        found += 1;
                    }
                }
            }
            // Part of one response may already be in: the transport may be in
            // the middle of any PDU. Count one fewer, so the wait always ends
            // when these reads are answered.
            bytes -= largest;
        }
        if k > 1 && was <= 1 {
            self.batch_raised_at = Instant::now();
        }
        self.conn.set_receive_batch(bytes.max(1));
    }

    /// Records a read command sent, for the transport's read-ahead.
    fn note_read_sent(&mut self, itt: u32) {
        if self.read_order.len() >= 2 * crate::iscsi::task::MAX_TASKS {
            // Finished entries are normally dropped from the front as Data-In
            // arrives; a target answering out of order can leave them behind.
            let tasks = &self.tasks;
            self.read_order
                .retain(|&i| tasks.get(i).is_some_and(Task::awaits_data_in));
        }
        self.read_order.push_back(itt);
    }

    /// Queues Data-Out PDUs for `len` bytes at `buf_off` of the task's data
    /// (one sequence: DataSN from 0, F on the last).
    #[allow(clippy::too_many_arguments)]
    fn queue_data_out(
        &mut self,
        lun: u64,
        itt: u32,
        ttt: u32,
        buf: &std::sync::Arc<crate::blk::buffer::IoBuffers>,
        base: u64,
        buf_off: u32,
        len: u32,
    ) {
        let max_seg = self.params.target_max_recv_data_segment_length.max(512);
        let mut sent = 0u32;
        let mut data_sn = 0u32;
        while sent < len {
            let n = (len - sent).min(max_seg);
            let h = DataOut {
                final_: sent + n == len,
                data_segment_length: U24::new(n).unwrap_or(U24::ZERO),
                lun,
                itt,
                ttt,
                exp_stat_sn: self.exp_stat_sn,
                data_sn,
                buffer_offset: buf_off + sent,
            };
            self.conn.queue(OutPdu::new(
                h.encode(),
                PduData::Buffer {
                    buf: buf.clone(),
                    offset: base + (buf_off + sent) as u64,
                    len: n,
                },
            ));
            sent += n;
            data_sn += 1;
        }
    }

    /// Receives and handles one PDU. Returns false when nothing is available.
    fn receive_one(&mut self, done: &mut Vec<ScsiResult>) -> Result<bool, SessionError> {
        let received = {
            let mut planner = DataInPlanner {
                tasks: &mut self.tasks,
                read_order: &mut self.read_order,
                refused: &mut self.refused,
            };
            self.conn.recv(&mut planner)
        };
        let pdu = match received {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(false),
            Err(e) => return Err(self.lost(e)),
        };
        self.last_rx = Instant::now();
        // A refusal is made when a header arrives; its PDU may be handed out
        // by a later call, once its data has been read (and discarded).
        if let Some(reason) = self.refused.take() {
            return Err(self.violation(reason));
        }
        let decoded = TargetPdu::decode(&pdu.bhs)
            .map_err(|e| self.violation(format!("undecodable PDU: {e}")))?;
        match decoded {
            TargetPdu::DataIn(d) => self.on_data_in(d, done)?,
            TargetPdu::ScsiResponse(r) => self.on_response(r, &pdu.data, done)?,
            TargetPdu::R2t(r) => self.on_r2t(r)?,
            TargetPdu::NopIn(n) => self.on_nop_in(n, pdu.data)?,
            TargetPdu::TaskMgmtResponse(r) => self.on_tmf_response(r, done)?,
            TargetPdu::Reject(r) => {
                self.update_seq(&r.seq, false)?;
                let itt = pdu
                    .data
                    .get(16..20)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                warn!(
                    "target {} rejected a PDU: {:?} (rejected ITT {:?})",
                    self.portal, r.reason, itt
                );
                if let Some(task) = itt.and_then(|i| self.tasks.remove(i)) {
                    done.push(ScsiResult {
                        tag: task.req.tag,
                        result: Err(SessionError::Rejected {
                            portal: self.portal.clone(),
                            reason: format!("{:?}", r.reason),
                        }),
                    });
                } else {
                    return Err(
                        self.violation(format!("Reject ({:?}) of a PDU we cannot match", r.reason))
                    );
                }
            }
            TargetPdu::AsyncMessage(a) => {
                self.update_seq(&a.seq, true)?;
                match a.event {
                    AsyncEvent::ScsiEvent => {
                        info!(
                            "target {} sent a SCSI asynchronous event ({} bytes of sense)",
                            self.portal,
                            pdu.data.len()
                        )
                    }
                    other => {
                        return Err(SessionError::ConnectionLost {
                            portal: self.portal.clone(),
                            reason: format!("target requested {other:?}"),
                        })
                    }
                }
            }
            other => {
                return Err(self.violation(format!(
                    "unexpected PDU in full feature phase: {:?}",
                    opcode_name(&other)
                )));
            }
        }
        Ok(true)
    }

    /// Applies StatSN/ExpCmdSN/MaxCmdSN from a target PDU. `status` is true for
    /// PDUs that carry a StatSN of their own (it must be the next one).
    fn update_seq(&mut self, seq: &SeqNums, status: bool) -> Result<(), SessionError> {
        if status {
            if seq.stat_sn != self.exp_stat_sn {
                return Err(self.violation(format!(
                    "StatSN {} out of order (expected {})",
                    seq.stat_sn, self.exp_stat_sn
                )));
            }
            self.exp_stat_sn = seq.stat_sn.wrapping_add(1);
        }
        // RFC 7143 §4.2.2.1: ignore MaxCmdSN < ExpCmdSN - 1; only move forward.
        if serial_ge(seq.max_cmd_sn, seq.exp_cmd_sn.wrapping_sub(1))
            && serial_gt(seq.max_cmd_sn, self.max_cmd_sn)
        {
            self.max_cmd_sn = seq.max_cmd_sn;
        }
        Ok(())
    }

    fn on_data_in(&mut self, d: DataIn, done: &mut Vec<ScsiResult>) -> Result<(), SessionError> {
        if self.conn.places_data() {
            return Err(self.violation("Data-In PDU on an iSER connection".into()));
        }
        let portal = self.portal.clone();
        let dsl = d.data_segment_length.get() as u64;
        let Some(task) = self.tasks.get_mut(d.itt) else {
            return Err(self.violation(format!("Data-In for unknown task {:#010x}", d.itt)));
        };
        if d.data_sn != task.exp_data_sn {
            let exp = task.exp_data_sn;
            return Err(self.violation(format!("Data-In DataSN {} (expected {exp})", d.data_sn)));
        }
        task.exp_data_sn = task.exp_data_sn.wrapping_add(1);
        task.data_in += dsl;
        if d.status_present {
            self.update_seq(&d.seq, true)?;
            let residual = if d.underflow {
                d.residual_count as i64
            } else if d.overflow {
                -(d.residual_count as i64)
            } else {
                0
            };
            if let Some(task) = self.tasks.remove(d.itt) {
                done.push(ScsiResult {
                    tag: task.req.tag,
                    result: Ok(ScsiOutcome {
                        status: d.status,
                        sense: Vec::new(),
                        residual,
                    }),
                });
            }
        } else {
            self.update_seq(&d.seq, false)?;
        }
        let _ = portal;
        Ok(())
    }

    fn on_response(
        &mut self,
        r: ScsiResponse,
        data: &[u8],
        done: &mut Vec<ScsiResult>,
    ) -> Result<(), SessionError> {
        self.update_seq(&r.seq, true)?;
        let Some(task) = self.tasks.remove(r.itt) else {
            return Err(self.violation(format!("SCSI Response for unknown task {:#010x}", r.itt)));
        };
        let tag = task.req.tag;
        if r.response != 0 {
            done.push(ScsiResult {
                tag,
                result: Err(SessionError::Rejected {
                    portal: self.portal.clone(),
                    reason: format!("iSCSI response {:#04x} (target failure)", r.response),
                }),
            });
            return Ok(());
        }
        // Sense data: 2-byte SenseLength, then the sense bytes.
        let sense = match data.get(0..2) {
            Some(l) => {
                let n = u16::from_be_bytes([l[0], l[1]]) as usize;
                data.get(2..2 + n)
                    .map(|s| s.to_vec())
                    .unwrap_or_else(|| data[2..].to_vec())
            }
            None => Vec::new(),
        };
        let residual = if r.underflow {
            r.residual_count as i64
        } else if r.overflow {
            -(r.residual_count as i64)
        } else {
            0
        };
        done.push(ScsiResult {
            tag,
            result: Ok(ScsiOutcome {
                status: r.status,
                sense,
                residual,
            }),
        });
        Ok(())
    }

    fn on_r2t(&mut self, r: R2t) -> Result<(), SessionError> {
        if self.conn.places_data() {
            return Err(self.violation("R2T PDU on an iSER connection".into()));
        }
        self.update_seq(&r.seq, false)?;
        let max_burst = self.params.max_burst_length;
        let Some(task) = self.tasks.get_mut(r.itt) else {
            return Err(self.violation(format!("R2T for unknown task {:#010x}", r.itt)));
        };
        let end = r.buffer_offset as u64 + r.desired_data_transfer_length as u64;
        let (len, dir, exp_sn) = (task.req.len, task.req.dir, task.exp_r2t_sn);
        if dir != DataDir::Write || end > len as u64 {
            return Err(self.violation(format!(
                "R2T for {} bytes at offset {} beyond the {len}-byte write of task {:#010x}",
                r.desired_data_transfer_length, r.buffer_offset, r.itt
            )));
        }
        if r.desired_data_transfer_length > max_burst {
            return Err(self.violation(format!(
                "R2T asks for {} bytes, more than MaxBurstLength {max_burst}",
                r.desired_data_transfer_length
            )));
        }
        if r.r2t_sn != exp_sn {
            return Err(self.violation(format!("R2TSN {} (expected {exp_sn})", r.r2t_sn)));
        }
        task.exp_r2t_sn = task.exp_r2t_sn.wrapping_add(1);
        task.data_out += r.desired_data_transfer_length as u64;
        let (lun, base, buf) = (task.req.lun, task.req.offset, task.req.buf.clone());
        let Some(buf) = buf else {
            return Err(self.violation("R2T for a task without data".into()));
        };
        self.queue_data_out(
            lun,
            r.itt,
            r.ttt,
            &buf,
            base,
            r.buffer_offset,
            r.desired_data_transfer_length,
        );
        Ok(())
    }

    fn on_nop_in(&mut self, n: NopIn, data: Vec<u8>) -> Result<(), SessionError> {
        if n.itt != RESERVED_TAG {
            // The answer to our ping (RFC 7143 §11.19): it carries a StatSN
            // of its own. Some targets do not advance it; accept both.
            match self.nop {
                Some((itt, _)) if itt == n.itt => self.nop = None,
                _ => {
                    return Err(
                        self.violation(format!("NOP-In answers unknown ping {:#010x}", n.itt))
                    )
                }
            }
            let status = n.seq.stat_sn == self.exp_stat_sn;
            if !status && n.seq.stat_sn != self.exp_stat_sn.wrapping_sub(1) {
                return Err(self.violation(format!(
                    "StatSN {} out of order (expected {})",
                    n.seq.stat_sn, self.exp_stat_sn
                )));
            }
            self.update_seq(&n.seq, status)?;
            return Ok(());
        }
        self.update_seq(&n.seq, false)?;
        if n.ttt != RESERVED_TAG {
            // The target pings us: answer with its TTT and its data.
            let h = NopOut {
                immediate: true,
                data_segment_length: U24::new(data.len() as u32).unwrap_or(U24::ZERO),
                lun: n.lun,
                itt: RESERVED_TAG,
                ttt: n.ttt,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
            };
            let data = if data.is_empty() {
                PduData::None
            } else {
                PduData::Owned(data)
            };
            self.conn.queue(OutPdu::new(h.encode(), data));
        }
        Ok(())
    }

    /// Ends the session on purpose with a Logout Request (close the session),
    /// waiting up to `timeout` for the target's answer. Only an idle session
    /// (nothing in flight) logs out; a busy one is left alone and the call
    /// fails. Afterwards the session is down as if lost, with nothing to
    /// re-issue: commands submitted from now on wait for the replacement
    /// ([`take_orphans`](Self::take_orphans)), so the same ISID can log in
    /// again without reinstating (killing) a live session.
    pub fn logout(&mut self, timeout: Duration) -> Result<(), SessionError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if !self.tasks.is_empty() || !self.waiting.is_empty() {
            return Err(SessionError::Rejected {
                portal: self.portal.clone(),
                reason: format!(
                    "logout with {} command(s) in flight",
                    self.tasks.len() + self.waiting.len()
                ),
            });
        }
        let deadline = Instant::now() + timeout;
        let itt = self.next_special_itt(TMF_ITT_INDEX);
        let req = LogoutRequest {
            immediate: true,
            reason: LogoutReason::CloseSession,
            itt,
            cid: 0,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        };
        let result = self.logout_exchange(req, deadline);
        self.failed = Some(SessionError::ConnectionLost {
            portal: self.portal.clone(),
            reason: "logged out".into(),
        });
        self.lost_at = Some(Instant::now());
        self.nop = None;
        self.tmf = None;
        result
    }

    fn logout_exchange(
        &mut self,
        req: LogoutRequest,
        deadline: Instant,
    ) -> Result<(), SessionError> {
        self.conn
            .send_blocking(OutPdu::new(req.encode(), PduData::None), deadline)
            .map_err(|e| self.lost(e))?;
        loop {
            let pdu = self
                .conn
                .recv_blocking(deadline)
                .map_err(|e| self.lost(e))?;
            // Late NOP-Ins and asynchronous messages may come first.
            if let Ok(TargetPdu::LogoutResponse(r)) = TargetPdu::decode(&pdu.bhs) {
                if r.itt != req.itt {
                    return Err(
                        self.violation(format!("Logout Response for unknown ITT {:#010x}", r.itt))
                    );
                }
                return match r.response {
                    LogoutResponseCode::Closed => Ok(()),
                    other => Err(SessionError::Rejected {
                        portal: self.portal.clone(),
                        reason: format!("logout refused: {other:?}"),
                    }),
                };
            }
        }
    }

    /// Drops the connection on purpose (e.g. to move to another portal),
    /// keeping the unfinished commands for the next session exactly as a
    /// lost connection does.
    pub fn abandon(&mut self, reason: &str) {
        if self.failed.is_some() {
            return;
        }
        let e = SessionError::ConnectionLost {
            portal: self.portal.clone(),
            reason: reason.to_string(),
        };
        let mut done = Vec::new();
        self.fail(e, &mut done);
        self.ready.append(&mut done);
    }

    /// Runs one command to completion, blocking (start-up probes: INQUIRY,
    /// READ CAPACITY). Other commands may be in flight; their results are kept.
    pub fn execute(
        &mut self,
        req: ScsiCommandReq,
        timeout: Duration,
    ) -> Result<ScsiOutcome, SessionError> {
        let tag = req.tag;
        self.submit(req);
        let deadline = Instant::now() + timeout;
        let mut done = Vec::new();
        loop {
            self.poll(&mut done);
            if let Some(e) = self.failed.clone() {
                self.orphans.retain(|o| o.0.tag != tag);
                if let Some(i) = done.iter().position(|r| r.tag == tag) {
                    done.swap_remove(i);
                }
                self.ready.extend(done);
                return Err(e);
            }
            if let Some(i) = done.iter().position(|r| r.tag == tag) {
                let r = done.swap_remove(i);
                self.ready.extend(done);
                return r.result;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.ready.extend(done);
                return Err(SessionError::Timeout {
                    portal: self.portal.clone(),
                });
            }
            let mut pfd = libc::pollfd {
                fd: self.fd(),
                events: libc::POLLIN | if self.wants_write() { libc::POLLOUT } else { 0 },
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(100) as i32) };
        }
    }
}

fn opcode_name(p: &TargetPdu) -> &'static str {
    match p {
        TargetPdu::ScsiResponse(_) => "SCSI Response",
        TargetPdu::DataIn(_) => "Data-In",
        TargetPdu::R2t(_) => "R2T",
        TargetPdu::NopIn(_) => "NOP-In",
        TargetPdu::LoginResponse(_) => "Login Response",
        TargetPdu::TextResponse(_) => "Text Response",
        TargetPdu::LogoutResponse(_) => "Logout Response",
        TargetPdu::TaskMgmtResponse(_) => "Task Management Response",
        TargetPdu::Reject(_) => "Reject",
        TargetPdu::AsyncMessage(_) => "Async Message",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::pdu::InitiatorPdu;
    use crate::transport::InPdu;
    use std::sync::{Arc, Mutex};

    /// What the mock connection saw and what it will deliver.
    #[derive(Default)]
    struct Wire {
        sent: Vec<InitiatorPdu>,
        inbox: VecDeque<InPdu>,
        closed: bool,
    }

    struct Mock(Arc<Mutex<Wire>>);

    impl Transport for Mock {
        fn addr(&self) -> &str {
            "mock:3260"
        }
        fn fd(&self) -> RawFd {
            -1
        }
        fn set_digests(&mut self, _: bool, _: bool) {}
        fn set_max_recv_data(&mut self, _: u32) {}
        fn queue(&mut self, pdu: OutPdu) {
            let d = InitiatorPdu::decode(&pdu.bhs).expect("session sent a valid PDU");
            self.0.lock().unwrap().sent.push(d);
        }
        fn flush(&mut self) -> Result<bool, TransportError> {
            Ok(true)
        }
        fn has_pending_output(&self) -> bool {
            false
        }
        fn recv(
            &mut self,
            _plan: &mut dyn crate::transport::RecvPlanner,
        ) -> Result<Option<InPdu>, TransportError> {
            let mut w = self.0.lock().unwrap();
            if w.closed {
                return Err(TransportError::Closed {
                    addr: "mock:3260".into(),
                });
            }
            Ok(w.inbox.pop_front())
        }
    }

    fn session(t: SessionTimeouts) -> (Session, Arc<Mutex<Wire>>) {
        let wire = Arc::new(Mutex::new(Wire::default()));
        let mut s = Session::new(
            Box::new(Mock(wire.clone())),
            SessionParams::default(),
            SessionStart {
                cmd_sn: 1,
                exp_stat_sn: 100,
                max_cmd_sn: 64,
            },
        );
        s.set_timeouts(t);
        (s, wire)
    }

    fn tur(tag: u64) -> ScsiCommandReq {
        ScsiCommandReq {
            lun: 0,
            cdb: [0; 16],
            cdb_len: 6,
            dir: DataDir::None,
            buf: None,
            offset: 0,
            len: 0,
            tag,
        }
    }

    fn commands(w: &Arc<Mutex<Wire>>) -> Vec<(u32, u32)> {
        w.lock()
            .unwrap()
            .sent
            .iter()
            .filter_map(|p| match p {
                InitiatorPdu::ScsiCommand(c) => Some((c.itt, c.cmd_sn)),
                _ => None,
            })
            .collect()
    }

    fn fast() -> SessionTimeouts {
        SessionTimeouts {
            nop_interval: Duration::from_secs(1),
            nop_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(3),
            tmf_timeout: Duration::from_secs(1),
            replacement_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn idle_ping_then_drop_when_unanswered() {
        let (mut s, w) = session(fast());
        let t0 = Instant::now();
        s.on_timer(t0);
        assert!(
            w.lock().unwrap().sent.is_empty(),
            "no ping before the interval"
        );
        s.on_timer(t0 + Duration::from_millis(1100));
        let itt = match w.lock().unwrap().sent.last() {
            Some(InitiatorPdu::NopOut(n)) => {
                assert!(n.immediate);
                assert_eq!(n.ttt, RESERVED_TAG);
                n.itt
            }
            other => panic!("expected a NOP-Out, got {other:?}"),
        };
        assert_eq!(itt & 0xffff, NOP_ITT_INDEX);
        s.on_timer(t0 + Duration::from_millis(2200));
        let e = s.failure().expect("unanswered ping drops the connection");
        assert!(e.to_string().contains("NOP-Out"), "{e}");
    }

    #[test]
    fn lost_connection_keeps_commands_and_reissues_them_in_order() {
        let (mut s, w) = session(fast());
        for tag in 1..=3 {
            s.submit(tur(tag));
        }
        let mut done = Vec::new();
        s.poll(&mut done);
        assert_eq!(commands(&w).len(), 3);
        w.lock().unwrap().closed = true;
        s.poll(&mut done);
        assert!(done.is_empty(), "nothing fails at once: {done:?}");
        assert!(s.failure().is_some());
        s.submit(tur(4)); // arrives during the outage
        s.poll(&mut done);
        assert!(done.is_empty());
        assert_eq!(s.in_flight(), 4);

        let (mut s2, w2) = session(fast());
        s2.adopt(s.take_orphans());
        s2.poll(&mut done);
        let sent = commands(&w2);
        assert_eq!(sent.len(), 4);
        let sns: Vec<u32> = sent.iter().map(|c| c.1).collect();
        assert_eq!(sns, vec![1, 2, 3, 4], "re-issued in order");
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn replacement_timeout_fails_kept_commands() {
        let (mut s, w) = session(fast());
        s.submit(tur(7));
        let mut done = Vec::new();
        s.poll(&mut done);
        w.lock().unwrap().closed = true;
        s.poll(&mut done);
        assert!(done.is_empty());
        s.on_timer(Instant::now() + Duration::from_secs(11));
        s.poll(&mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].tag, 7);
        let e = done[0].result.as_ref().unwrap_err().to_string();
        assert!(e.contains("replacement timeout"), "{e}");
        // After the timeout, new commands fail at once.
        s.submit(tur(8));
        s.poll(&mut done);
        assert_eq!(done.len(), 2);
    }

    #[test]
    fn late_command_is_aborted_then_lun_reset_then_dropped() {
        let (mut s, w) = session(SessionTimeouts {
            nop_interval: Duration::from_secs(3600),
            ..fast()
        });
        s.submit(tur(1));
        let mut done = Vec::new();
        s.poll(&mut done);
        let (itt, cmd_sn) = commands(&w)[0];
        let t0 = Instant::now();
        s.on_timer(t0 + Duration::from_secs(4));
        let tmf = |w: &Arc<Mutex<Wire>>| match w.lock().unwrap().sent.last() {
            Some(InitiatorPdu::TaskMgmtRequest(t)) => t.clone(),
            other => panic!("expected a TMF, got {other:?}"),
        };
        let abort = tmf(&w);
        assert_eq!(abort.function, TmfFunction::AbortTask);
        assert_eq!(abort.referenced_task_tag, itt);
        assert_eq!(abort.ref_cmd_sn, cmd_sn);
        assert_eq!(abort.itt & 0xffff, TMF_ITT_INDEX);
        s.on_timer(t0 + Duration::from_secs(6));
        assert_eq!(tmf(&w).function, TmfFunction::LogicalUnitReset);
        assert!(s.failure().is_none());
        s.on_timer(t0 + Duration::from_secs(8));
        let e = s
            .failure()
            .expect("unanswered LUN RESET drops the connection");
        assert!(e.to_string().contains("LogicalUnitReset"), "{e}");
    }

    #[test]
    fn abort_answered_fails_only_that_command() {
        let (mut s, w) = session(SessionTimeouts {
            nop_interval: Duration::from_secs(3600),
            ..fast()
        });
        s.submit(tur(1));
        let mut done = Vec::new();
        s.poll(&mut done);
        s.on_timer(Instant::now() + Duration::from_secs(4));
        let abort = match w.lock().unwrap().sent.last() {
            Some(InitiatorPdu::TaskMgmtRequest(t)) => t.clone(),
            other => panic!("expected ABORT TASK, got {other:?}"),
        };
        let rsp = TaskMgmtResponse {
            response: TmfResponse::Complete,
            itt: abort.itt,
            seq: SeqNums {
                stat_sn: 100,
                exp_cmd_sn: 2,
                max_cmd_sn: 64,
            },
        };
        w.lock().unwrap().inbox.push_back(InPdu {
            bhs: rsp.encode(),
            data: Vec::new(),
        });
        s.poll(&mut done);
        assert_eq!(done.len(), 1);
        assert!(matches!(done[0].result, Err(SessionError::Timeout { .. })));
        assert!(s.failure().is_none(), "the session survives");
    }

    #[test]
    fn timeouts_parse() {
        let t = SessionTimeouts::parse("nop=2, command=0.5,replacement=60").unwrap();
        assert_eq!(t.nop_interval, Duration::from_secs(2));
        assert_eq!(t.command_timeout, Duration::from_millis(500));
        assert_eq!(t.replacement_timeout, Duration::from_secs(60));
        assert_eq!(t.nop_timeout, SessionTimeouts::default().nop_timeout);
        assert!(SessionTimeouts::parse("nop=-1").is_err());
        assert!(SessionTimeouts::parse("bogus=1").is_err());
        assert!(SessionTimeouts::parse("nop").is_err());
    }
}
