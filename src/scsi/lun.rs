//! A remote SCSI logical unit as the block target of the virtio-blk device.
//!
//! [`ScsiLun`] probes the LUN once (INQUIRY, VPD pages, READ CAPACITY, MODE
//! SENSE) to describe the device, then gives every virtqueue its own iSCSI
//! session. [`LunQueue`] turns each block request into SCSI commands: reads
//! and writes split at the LUN's transfer limit, flush as SYNCHRONIZE CACHE,
//! discard as UNMAP (or WRITE SAME with UNMAP), write-zeroes as WRITE SAME.
//! Data never leaves guest memory: the commands point at the request's own
//! buffers.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::cdb::{self, RwFlags, UnmapDescriptor, WriteSameFlags};
use super::disk::{split_at_runs, split_range, Chunk, DiskError, LunInfo, LunProber, ProbeResult};
use super::luns::Lun;
use super::sense::{classify, SenseAction, SenseData, UnitAttention};
use super::status::ScsiStatus;
use crate::blk::buffer::IoBuffers;
use crate::blk::target::{
    BlockOp, BlockRequest, BlockStatus, Completion, DeviceInfo, DeviceNotifier, QueueTarget,
    RangeOpLimits, Target, TargetError,
};
use crate::iscsi::session::{ScsiOutcome, ScsiResult, Session, SessionError, SessionTimeouts};
use crate::iscsi::task::{DataDir, ScsiCommandReq};
use crate::log_limit::{suppressed_note, LogLimiter};

/// Opens iSCSI sessions to the LUN's target, one per queue (and again after a
/// connection is lost).
pub trait SessionFactory: Send + Sync {
    /// Logs in a new session for queue `queue`.
    fn open(&self, queue: usize) -> Result<Session, TargetError>;
    /// The LUN, SAM-encoded as on the wire.
    fn lun(&self) -> u64;
    /// "iqn... lun N at host:port", for log lines.
    fn describe(&self) -> String;
    /// "target iqn... on host:port", for messages about the target as a whole.
    fn describe_target(&self) -> String {
        self.describe()
    }
    /// Guest memory changed: transports that register memory with a NIC
    /// (iSER) do it here, once per region.
    fn update_memory(&self, _mem: &Arc<crate::blk::buffer::GuestMemoryMmap>) {}
    /// A transport limit on the data of one command (iSER: the target's
    /// RDMA buffer), on top of the LUN's own; `None`: no limit.
    fn max_transfer_bytes(&self) -> Option<u32> {
        None
    }
    /// Logs in a new session for queue `queue` after its connection to
    /// `avoid` was lost: the other paths are tried first.
    fn open_avoiding(&self, queue: usize, _avoid: Option<&str>) -> Result<Session, TargetError> {
        self.open(queue)
    }
    /// Logs in a new session for queue `queue` on its preferred portal only
    /// (a failback), failing fast when that portal does not answer.
    fn open_preferred(&self, queue: usize) -> Result<Session, TargetError> {
        self.open(queue)
    }
    /// The portal queue `queue` prefers when the target has several (its
    /// session moves back there once it answers again); `None`: no choice.
    fn preferred_portal(&self, _queue: usize) -> Option<String> {
        None
    }
    /// Whether `portal` answers a connect now (blocking for a second or two:
    /// called on a helper thread, never on the data path).
    fn probe(&self, _portal: &str) -> bool {
        false
    }
    /// Transports that name a command's whole buffer with one address
    /// (iSER), set to split scattered requests rather than bounce them:
    /// true when every segment of `iov` (each a host-contiguous run) lies in
    /// memory the transport names in place, with each segment's length
    /// appended to `runs`; the request is then issued as one command per run
    /// (see [`split_at_runs`]). False (the default): one command for the
    /// whole buffer, however scattered.
    fn registered_runs(&self, _iov: &[libc::iovec], _runs: &mut Vec<u64>) -> bool {
        false
    }
}

/// How many times a command is retried after a transient SCSI condition.
const MAX_RETRIES: u32 = 5;
/// Start-up probe command timeout.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Least time between two reconnect attempts of one queue (doubles up to
/// [`RECONNECT_MAX_INTERVAL`]).
const RECONNECT_INTERVAL: Duration = Duration::from_millis(250);
/// Longest time between two reconnect attempts.
const RECONNECT_MAX_INTERVAL: Duration = Duration::from_secs(1);
/// Period of the queue's timer (pings, deadlines, reconnects, delayed retries).
const TICK: Duration = Duration::from_millis(100);
/// Retries of BUSY / TASK SET FULL / NOT READY / ABORTED COMMAND wait this
/// long, doubled per retry, capped at [`RETRY_MAX_DELAY`].
const RETRY_BASE_DELAY: Duration = Duration::from_millis(50);
/// Longest wait before a retry.
const RETRY_MAX_DELAY: Duration = Duration::from_secs(2);
/// A session away from its preferred portal probes it this often (doubled
/// after each failback that did not land there, up to
/// [`FAILBACK_PROBE_MAX_INTERVAL`]).
const FAILBACK_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// Longest time between two probes of the preferred portal.
const FAILBACK_PROBE_MAX_INTERVAL: Duration = Duration::from_secs(300);
/// A failback holds new commands until the ones in flight finish, at most
/// this long; then it moves anyway and re-issues them on the new session.
const FAILBACK_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Time the target has to answer our Logout before a failback.
const LOGOUT_TIMEOUT: Duration = Duration::from_secs(2);
/// Environment variable that overrides the session timers, e.g.
/// `nop=5,nop_timeout=5,command=30,tmf=10,replacement=30` (seconds).
pub const TIMEOUTS_ENV: &str = "VHOST_ISER_TIMEOUTS";

/// Capacity changes seen by the queues (unit attention 2A/09 followed by a
/// new READ CAPACITY(16)). Each queue's session gets its own unit attention;
/// the first to read a new capacity tells the [`DeviceNotifier`] (the vhost
/// layer, which raises a virtio config-change interrupt), the others find
/// nothing new.
#[derive(Default)]
pub struct CapacityWatch {
    sectors: AtomicU64,
    notifier: Mutex<Option<Arc<dyn DeviceNotifier>>>,
}

impl CapacityWatch {
    fn new(sectors: u64) -> Self {
        CapacityWatch {
            sectors: AtomicU64::new(sectors),
            ..Default::default()
        }
    }

    /// The last capacity seen, in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors.load(Ordering::Acquire)
    }

    fn set(&self, sectors: u64) {
        if self.sectors.swap(sectors, Ordering::AcqRel) == sectors {
            return;
        }
        let notifier = self
            .notifier
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(n) = notifier {
            n.capacity_changed(sectors);
        }
    }
}

/// The session timers: defaults, or [`TIMEOUTS_ENV`].
pub fn session_timeouts() -> Result<SessionTimeouts, TargetError> {
    match std::env::var(TIMEOUTS_ENV) {
        Ok(spec) => SessionTimeouts::parse(&spec).map_err(|reason| TargetError::BadTarget {
            target: format!("{TIMEOUTS_ENV}={spec}"),
            reason,
        }),
        Err(_) => Ok(SessionTimeouts::default()),
    }
}

/// A remote LUN as a block [`Target`].
pub struct ScsiLun {
    factory: Arc<dyn SessionFactory>,
    info: Arc<LunInfo>,
    /// Queue 0's session, opened by the probe and handed over at open_queue(0).
    first: Mutex<Option<Session>>,
    timeouts: SessionTimeouts,
    capacity: Arc<CapacityWatch>,
    /// Counts the queues' successful re-logins (see [`LunQueue::maybe_reconnect`]).
    relogins: Arc<AtomicU64>,
}

impl ScsiLun {
    /// Logs in, probes the LUN and keeps the session for queue 0.
    /// `timeouts`: the session timers (None: defaults, or `$VHOST_ISER_TIMEOUTS`).
    pub fn open(
        factory: Arc<dyn SessionFactory>,
        timeouts: Option<SessionTimeouts>,
    ) -> Result<Self, TargetError> {
        let timeouts = match timeouts {
            Some(t) => t,
            None => session_timeouts()?,
        };
        let mut session = factory.open(0)?;
        session.set_timeouts(timeouts);
        let lun = factory.lun();
        let mut prober = LunProber::checking_lun(Lun::from_encoded(lun));
        let mut tag = 0u64;
        while let Some(cmd) = prober.next_command() {
            tag += 1;
            let buf = Arc::new(IoBuffers::from_vec(vec![0u8; cmd.alloc_len as usize]));
            let mut req = ScsiCommandReq {
                lun: if cmd.to_lun0 { 0 } else { lun },
                cdb: cmd.cdb.padded(),
                cdb_len: cmd.cdb.len() as u8,
                dir: if cmd.alloc_len > 0 {
                    DataDir::Read
                } else {
                    DataDir::None
                },
                buf: Some(buf.clone()),
                offset: 0,
                len: cmd.alloc_len,
                tag,
            };
            if cmd.alloc_len == 0 {
                req.buf = None;
            }
            let out = session
                .execute(req, PROBE_TIMEOUT)
                .map_err(|e| TargetError::Setup {
                    context: format!("probing {} ({})", factory.describe(), cmd.step.name()),
                    source: Box::new(e),
                })?;
            let status = ScsiStatus::from_u8(out.status);
            let result = if status == ScsiStatus::Good {
                let n = (cmd.alloc_len as i64 - out.residual.max(0)).clamp(0, cmd.alloc_len as i64)
                    as usize;
                let mut data = vec![0u8; n];
                buf.read_at(0, &mut data);
                prober.complete(ProbeResult::Data(&data))
            } else {
                let sense = SenseData::parse(&out.sense).ok();
                prober.complete(ProbeResult::Failed {
                    status,
                    sense: sense.as_ref(),
                })
            };
            result.map_err(|e| match e {
                DiskError::NoSuchLun { .. } => {
                    TargetError::NotFound(format!("{} {e}", factory.describe_target()))
                }
                e => TargetError::Setup {
                    context: format!("probing {} ({})", factory.describe(), cmd.step.name()),
                    source: Box::new(e),
                },
            })?;
        }
        let mut info = prober.finish().map_err(|e| TargetError::Setup {
            context: format!("probing {}", factory.describe()),
            source: Box::new(e),
        })?;
        if let Some(limit) = factory.max_transfer_bytes() {
            // Whole blocks, at least one.
            let limit = (limit / info.block_size).max(1) * info.block_size;
            info.max_transfer_bytes = info.max_transfer_bytes.min(limit);
        }
        info!(
            "{}: {} {} {}, {} blocks of {} bytes ({} MiB), max transfer {} KiB{}{}{}",
            factory.describe(),
            info.vendor,
            info.product,
            info.revision,
            info.num_blocks,
            info.block_size,
            info.size_bytes() >> 20,
            info.max_transfer_bytes >> 10,
            if info.unmap.is_some() { ", UNMAP" } else { "" },
            if info.read_only {
                ", write-protected"
            } else {
                ""
            },
            if info.write_cache {
                ", write cache on"
            } else {
                ""
            },
        );
        Ok(ScsiLun {
            factory,
            first: Mutex::new(Some(session)),
            timeouts,
            capacity: Arc::new(CapacityWatch::new(info.capacity_sectors)),
            info: Arc::new(info),
            relogins: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Capacity changes reported by the LUN (for a config-change interrupt).
    pub fn capacity_watch(&self) -> Arc<CapacityWatch> {
        self.capacity.clone()
    }

    /// What the probe found.
    pub fn lun_info(&self) -> &LunInfo {
        &self.info
    }
}

/// Converts the probe's findings into what virtio-blk shows the guest.
pub fn device_info(info: &LunInfo) -> DeviceInfo {
    let bs = info.block_size as u64;
    let to_sectors = |blocks: u64| (blocks * bs / 512).min(u32::MAX as u64) as u32;
    let discard = if let Some(u) = info.unmap {
        Some(RangeOpLimits {
            max_sectors: to_sectors(u.max_blocks as u64),
            max_segments: u.max_descriptors.clamp(1, 256),
            alignment_sectors: to_sectors(u.granularity.max(1) as u64),
        })
    } else if info.write_same.ws16_unmap {
        Some(RangeOpLimits {
            max_sectors: to_sectors(info.write_same.max_blocks),
            max_segments: 1,
            alignment_sectors: to_sectors(1),
        })
    } else {
        None
    };
    let write_zeroes =
        (info.write_same.max_reported || info.write_same.ws16_unmap).then(|| RangeOpLimits {
            max_sectors: to_sectors(info.write_same.max_blocks),
            max_segments: 1,
            alignment_sectors: to_sectors(1),
        });
    DeviceInfo {
        capacity_sectors: info.capacity_sectors,
        logical_block_size: info.block_size,
        physical_block_exp: info.physical_block_exp,
        alignment_offset: info.alignment_offset.min(255) as u8,
        min_io_size: info.min_io_blocks.min(u16::MAX as u32) as u16,
        opt_io_size: info.opt_io_blocks,
        discard,
        write_zeroes,
        write_zeroes_may_unmap: info.write_same.ws16_unmap,
        read_only: info.read_only,
        write_cache: info.write_cache,
        serial: info.serial.as_bytes().to_vec(),
    }
}

impl Target for ScsiLun {
    fn info(&self) -> DeviceInfo {
        device_info(&self.info)
    }

    fn open_queue(&self, index: usize) -> Result<Box<dyn QueueTarget>, TargetError> {
        let first = if index == 0 {
            self.first.lock().unwrap_or_else(|e| e.into_inner()).take()
        } else {
            None
        };
        let mut session = match first {
            Some(s) => s,
            None => self.factory.open(index)?,
        };
        session.set_timeouts(self.timeouts);
        Ok(Box::new(LunQueue::new(
            index,
            session,
            self.factory.clone(),
            self.info.clone(),
            self.capacity.clone(),
            self.relogins.clone(),
        )?))
    }

    fn update_memory(&self, mem: &Arc<crate::blk::buffer::GuestMemoryMmap>) {
        self.factory.update_memory(mem);
    }

    fn set_notifier(&self, notifier: Arc<dyn DeviceNotifier>) {
        *self
            .capacity
            .notifier
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(notifier);
    }
}

/// A block request split into SCSI commands.
struct Parent {
    tag: u64,
    outstanding: u32,
    status: BlockStatus,
    /// Kept so the buffers stay alive until every child is done.
    _data: Option<Arc<IoBuffers>>,
}

/// One queue's half: its own session, its own epoll.
pub struct LunQueue {
    index: usize,
    session: Session,
    factory: Arc<dyn SessionFactory>,
    info: Arc<LunInfo>,
    lun: u64,
    parents: Vec<Option<Parent>>,
    free: Vec<usize>,
    /// Commands in flight by child tag: (parent slot, command, retries).
    children: Vec<Option<(usize, ScsiCommandReq, u32)>>,
    free_children: Vec<usize>,
    results: Vec<ScsiResult>,
    ready: Vec<Completion>,
    epoll: Epoll,
    watched_fd: RawFd,
    watching_out: bool,
    last_reconnect: Option<Instant>,
    /// When the timerfd next expires (its expiries are start + k·TICK; both
    /// clocks are CLOCK_MONOTONIC).
    next_tick: Instant,
    /// A command was handed to the session since the last round.
    sent: bool,
    /// A login in progress on a helper thread.
    login: Option<std::sync::mpsc::Receiver<Result<Session, TargetError>>>,
    /// Current wait between reconnect attempts.
    reconnect_backoff: Duration,
    zero_block: Arc<IoBuffers>,
    timer: OwnedFd,
    /// Retries waiting for their time: (when, parent, command, retries).
    delayed: Vec<(Instant, usize, ScsiCommandReq, u32)>,
    capacity: Arc<CapacityWatch>,
    /// A READ CAPACITY(16) after a capacity-change unit attention is in flight.
    capacity_probe: bool,
    /// Where the session is and wants to be (several portals).
    path: PathState,
    /// Written by the login and probe helper threads when their result is
    /// ready, so it is taken at once rather than at the next tick.
    wake: EventFd,
    /// Helper threads whose wake-up has not been read yet.
    wakes_expected: u64,
    /// Rate limit of the per-request failure lines.
    failure_log: LogLimiter,
    /// Successful re-logins of all queues of the device: when another queue
    /// got back in, the target is reachable again and a queue waiting out its
    /// reconnect backoff tries at once instead of up to
    /// [`RECONNECT_MAX_INTERVAL`] later.
    relogins: Arc<AtomicU64>,
    /// `relogins` when this queue last tried.
    relogins_seen: u64,
    /// The thread that logs in again after a lost connection.
    login_helper: Helper,
    /// The thread that probes the preferred portal.
    probe_helper: Helper,
    /// Scratch list of a scattered request's run lengths (no allocation per request).
    runs: Vec<u64>,
}

/// Which of a queue's helper threads runs a job.
#[derive(Clone, Copy)]
enum HelperKind {
    Login,
    Probe,
}

impl HelperKind {
    fn name(self) -> &'static str {
        match self {
            HelperKind::Login => "login",
            HelperKind::Probe => "probe",
        }
    }
}

/// A job for a helper thread.
type HelperJob = Box<dyn FnOnce() + Send>;

/// A long-lived helper thread of one queue, started on first use; it ends
/// when the queue is dropped (its channel closes). Long-lived on purpose: a
/// session is allocated by the thread that logs it in, and with a new thread
/// per login every reconnect allocated from another glibc malloc arena, so
/// the process grew by ~50 KiB per reconnect (bench/soak.sh) although
/// nothing leaked. One thread per queue keeps each queue's sessions in one
/// arena, where the freed session's memory is reused by the next.
#[derive(Default)]
struct Helper {
    jobs: Option<std::sync::mpsc::Sender<HelperJob>>,
}

impl Helper {
    fn run(&mut self, name: String, job: HelperJob) -> std::io::Result<()> {
        let job = match self.jobs.as_ref() {
            Some(tx) => match tx.send(job) {
                Ok(()) => return Ok(()),
                // The thread is gone (it never panics, but be safe): a new one.
                Err(std::sync::mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = std::sync::mpsc::channel::<HelperJob>();
        std::thread::Builder::new().name(name).spawn(move || {
            for job in rx {
                job();
            }
        })?;
        let _ = tx.send(job);
        self.jobs = Some(tx);
        Ok(())
    }
}

/// Path management of one queue: failover is the reconnect (other portals
/// first); failback probes the preferred portal and moves back cleanly.
#[derive(Default)]
struct PathState {
    /// The portal this queue prefers (`None`: a single portal).
    preferred: Option<String>,
    /// A probe of the preferred portal running on a helper thread.
    probe: Option<std::sync::mpsc::Receiver<bool>>,
    /// When the last probe started.
    last_probe: Option<Instant>,
    /// Current wait between probes.
    probe_interval: Duration,
    /// Failback under way: since when new commands are held while the
    /// commands in flight finish.
    draining: Option<Instant>,
    /// Commands held during a failback, in submission order.
    held: Vec<ScsiCommandReq>,
    /// The login in progress is a planned move back to the preferred portal.
    failing_back: bool,
    /// The portal the next reconnect tries last (default: the lost one).
    avoid_next: Option<String>,
    /// The login in progress returns to the other paths after a refused
    /// failback.
    returning: bool,
}

/// Most SCSI commands one read or write may be split into (1024 x the LUN's
/// max transfer: 64 MiB..1 GiB for the usual 64 KiB..1 MiB limits, far above
/// what guests send: Linux's default max_sectors_kb is 1280). Bigger requests
/// fail with IOERR. This bounds the commands a queue can hold (see
/// [`LunQueue::send_child`]); discard and write-zeroes are bounded by the
/// range limits the device advertises.
const MAX_CHILDREN_PER_REQUEST: u64 = 1024;

/// Parent slot of internal commands (READ CAPACITY after a unit attention).
const INTERNAL: usize = usize::MAX;

fn periodic_timer(period: Duration) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor this function owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let ts = libc::timespec {
        tv_sec: period.as_secs() as libc::time_t,
        tv_nsec: period.subsec_nanos() as libc::c_long,
    };
    let spec = libc::itimerspec {
        it_interval: ts,
        it_value: ts,
    };
    // SAFETY: valid fd and itimerspec; no old value requested.
    if unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(owned)
}

/// Reads a non-blocking timerfd: how many periods expired since the last read.
fn timer_expirations(fd: &OwnedFd) -> u64 {
    let mut n = 0u64;
    // SAFETY: reads 8 bytes into a u64 on the stack.
    let r = unsafe {
        libc::read(
            fd.as_raw_fd(),
            &mut n as *mut u64 as *mut libc::c_void,
            std::mem::size_of::<u64>(),
        )
    };
    if r == std::mem::size_of::<u64>() as isize {
        n
    } else {
        0
    }
}

impl LunQueue {
    fn new(
        index: usize,
        session: Session,
        factory: Arc<dyn SessionFactory>,
        info: Arc<LunInfo>,
        capacity: Arc<CapacityWatch>,
        relogins: Arc<AtomicU64>,
    ) -> Result<Self, TargetError> {
        let setup = |e: std::io::Error| TargetError::Setup {
            context: format!("queue {index}: cannot create its epoll"),
            source: Box::new(e),
        };
        let epoll = Epoll::new().map_err(setup)?;
        let fd = session.fd();
        epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
            .map_err(setup)?;
        // Taken before arming: the first expiry is never earlier than this.
        let first_tick = Instant::now() + TICK;
        let timer = periodic_timer(TICK).map_err(setup)?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 1),
            )
            .map_err(setup)?;
        let wake = EventFd::new(EFD_NONBLOCK).map_err(setup)?;
        epoll
            .ctl(
                ControlOperation::Add,
                wake.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 2),
            )
            .map_err(setup)?;
        let lun = factory.lun();
        let zero_block = Arc::new(IoBuffers::from_vec(vec![0u8; info.block_size as usize]));
        let preferred = factory.preferred_portal(index);
        crate::metrics::set_queue_path(
            index,
            session.portal(),
            preferred.as_deref().is_none_or(|p| p == session.portal()),
        );
        if let Some(p) = preferred.as_deref().filter(|p| *p != session.portal()) {
            warn!(
                "queue {index}: preferred path {p} unavailable, running on {}",
                session.portal()
            );
        }
        Ok(LunQueue {
            index,
            session,
            factory,
            info,
            lun,
            parents: Vec::new(),
            free: Vec::new(),
            children: Vec::new(),
            free_children: Vec::new(),
            results: Vec::new(),
            ready: Vec::new(),
            epoll,
            watched_fd: fd,
            watching_out: false,
            last_reconnect: None,
            next_tick: first_tick,
            sent: false,
            login: None,
            reconnect_backoff: RECONNECT_INTERVAL,
            zero_block,
            timer,
            delayed: Vec::new(),
            capacity,
            capacity_probe: false,
            path: PathState {
                preferred,
                probe_interval: FAILBACK_PROBE_INTERVAL,
                ..PathState::default()
            },
            wake,
            wakes_expected: 0,
            failure_log: LogLimiter::new(),
            relogins_seen: relogins.load(Ordering::Relaxed),
            relogins,
            login_helper: Helper::default(),
            probe_helper: Helper::default(),
            runs: Vec::new(),
        })
    }

    /// Runs `job` on this queue's helper thread `which` (started on first
    /// use, kept for the next job); its result comes back through the
    /// returned channel, and the queue's epoll wakes up for it.
    fn spawn_helper<T: Send + 'static>(
        &mut self,
        which: HelperKind,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<std::sync::mpsc::Receiver<T>> {
        let (tx, rx) = std::sync::mpsc::channel();
        // Without a wake-up the result is still taken, at the next tick.
        let wake = self.wake.try_clone().ok();
        let expect = wake.is_some();
        let name = format!("{}-q{}", which.name(), self.index);
        let helper = match which {
            HelperKind::Login => &mut self.login_helper,
            HelperKind::Probe => &mut self.probe_helper,
        };
        helper.run(
            name,
            Box::new(move || {
                let _ = tx.send(job());
                if let Some(w) = wake {
                    let _ = w.write(1);
                }
            }),
        )?;
        if expect {
            self.wakes_expected += 1;
        }
        Ok(rx)
    }

    fn new_parent(&mut self, tag: u64, data: Option<Arc<IoBuffers>>) -> usize {
        let p = Parent {
            tag,
            outstanding: 0,
            status: BlockStatus::Ok,
            _data: data,
        };
        match self.free.pop() {
            Some(i) => {
                self.parents[i] = Some(p);
                i
            }
            None => {
                self.parents.push(Some(p));
                self.parents.len() - 1
            }
        }
    }

    /// Hands one command of a guest request to the session, which keeps it
    /// while the connection is down (its orphans, re-issued in order by the
    /// next session) or, during a failback, holds it here in `path.held`.
    ///
    /// What is held is bounded without a cap of its own: every command
    /// belongs to a guest request whose descriptor head has not been returned
    /// to the used ring, and the worker pops only heads the driver made
    /// available, so at most queue-size requests (`--queue-size`, 256 by
    /// default; fewer when the driver uses several descriptors per request)
    /// are in flight, lost connection or not. Each request has at most
    /// [`MAX_CHILDREN_PER_REQUEST`] read/write commands, or one per
    /// discard/write-zeroes range (at most the advertised max_segments, and
    /// WRITE SAME pieces of a range no longer than the advertised
    /// max_sectors); retries reuse their slot. While the session is down no
    /// completion frees a head, so the guest cannot add more: the queue
    /// simply stops taking requests once the ring is exhausted.
    fn send_child(&mut self, parent: usize, mut req: ScsiCommandReq, retries: u32) {
        self.sent = true;
        let slot = match self.free_children.pop() {
            Some(i) => i,
            None => {
                self.children.push(None);
                self.children.len() - 1
            }
        };
        req.tag = slot as u64;
        self.children[slot] = Some((parent, req.clone(), retries));
        if let Some(Some(p)) = self.parents.get_mut(parent) {
            if retries == 0 {
                p.outstanding += 1;
            }
        }
        if self.path.draining.is_some() {
            self.path.held.push(req);
        } else {
            self.session.submit(req);
        }
    }

    fn command(
        &self,
        cdb: cdb::Cdb,
        dir: DataDir,
        buf: Option<Arc<IoBuffers>>,
        offset: u64,
        len: u32,
    ) -> ScsiCommandReq {
        ScsiCommandReq {
            lun: self.lun,
            cdb: cdb.padded(),
            cdb_len: cdb.len() as u8,
            dir,
            buf,
            offset,
            len,
            tag: 0,
        }
    }

    fn finish_parent_now(&mut self, parent: usize, status: BlockStatus) {
        if let Some(p) = self.parents.get_mut(parent).and_then(Option::take) {
            self.free.push(parent);
            self.ready.push(Completion {
                tag: p.tag,
                status: if p.status == BlockStatus::Ok {
                    status
                } else {
                    p.status
                },
            });
        }
    }

    /// A scattered read or write as one command per host-contiguous run of
    /// its buffer, when the transport asks for that and can name every run
    /// in place (iSER with `VHOST_ISER_SCATTER=split`), each run is whole
    /// blocks and the commands stay within [`MAX_CHILDREN_PER_REQUEST`].
    /// `None`: issue it as usual (the iSER transport then bounces it).
    fn scattered_chunks(&mut self, start: u64, len: u64, data: &IoBuffers) -> Option<Vec<Chunk>> {
        // Contiguous buffers (most of what Linux guests send) skip the
        // transport's lookup entirely.
        if data.iovecs().len() < 2 {
            return None;
        }
        self.runs.clear();
        if !self.factory.registered_runs(data.iovecs(), &mut self.runs) {
            return None;
        }
        split_at_runs(
            start,
            len,
            &self.runs,
            self.info.block_size,
            self.info.max_transfer_bytes,
            MAX_CHILDREN_PER_REQUEST as usize,
        )
    }

    /// Sends one READ or WRITE of a request's chunk.
    fn send_rw(
        &mut self,
        parent: usize,
        data: &Arc<IoBuffers>,
        dir: DataDir,
        flags: RwFlags,
        c: Chunk,
    ) -> Result<(), String> {
        let cdb = if dir == DataDir::Write {
            cdb::write(c.lba, c.blocks, flags, self.info.cdb16)
        } else {
            cdb::read(c.lba, c.blocks, flags, self.info.cdb16)
        }
        .map_err(|e| e.to_string())?;
        let cmd = self.command(cdb, dir, Some(data.clone()), c.offset, c.len);
        self.send_child(parent, cmd, 0);
        Ok(())
    }

    /// Builds the commands for one request; false if it cannot be expressed.
    fn build(&mut self, parent: usize, req: BlockRequest) -> Result<(), String> {
        let bs = self.info.block_size as u64;
        let cdb16 = self.info.cdb16;
        match req.op {
            BlockOp::Read | BlockOp::Write { .. } => {
                let start = req.sector * 512;
                let len = req.data.len();
                if !start.is_multiple_of(bs) || !len.is_multiple_of(bs) {
                    return Err(format!(
                        "{len} bytes at byte {start} are not aligned to the {bs}-byte block size"
                    ));
                }
                let (dir, fua) = match req.op {
                    // Without a volatile write cache every write is durable:
                    // FUA adds nothing, and LIO refuses it when the LUN does
                    // not advertise DPOFUA ("invalid field in CDB").
                    BlockOp::Write { fua } => (DataDir::Write, fua && self.info.write_cache),
                    _ => (DataDir::Read, false),
                };
                let data = Arc::new(req.data);
                if let Some(Some(p)) = self.parents.get_mut(parent) {
                    p._data = Some(data.clone());
                }
                let flags = RwFlags { fua, dpo: false };
                if let Some(chunks) = self.scattered_chunks(start, len, &data) {
                    crate::metrics::SCATTER_SPLITS.fetch_add(1, Ordering::Relaxed);
                    for c in chunks {
                        self.send_rw(parent, &data, dir, flags, c)?;
                    }
                    return Ok(());
                }
                let chunks = split_range(
                    start,
                    len,
                    self.info.block_size,
                    self.info.max_transfer_bytes,
                )
                .map_err(|e| e.to_string())?;
                let n = len.div_ceil(self.info.max_transfer_bytes.max(1) as u64);
                if n > MAX_CHILDREN_PER_REQUEST {
                    return Err(format!(
                        "{len} bytes would take {n} commands of at most {} bytes (limit {MAX_CHILDREN_PER_REQUEST} per request)",
                        self.info.max_transfer_bytes
                    ));
                }
                for c in chunks {
                    self.send_rw(parent, &data, dir, flags, c)?;
                }
            }
            BlockOp::Flush => {
                let cdb = if cdb16 {
                    cdb::synchronize_cache16(0, 0)
                } else {
                    cdb::synchronize_cache10(0, 0)
                }
                .map_err(|e| e.to_string())?;
                let cmd = self.command(cdb, DataDir::None, None, 0, 0);
                self.send_child(parent, cmd, 0);
            }
            BlockOp::Discard | BlockOp::WriteZeroes { .. } => {
                let mut descs = Vec::new();
                for r in &req.ranges {
                    let start = r.sector * 512;
                    let len = r.num_sectors as u64 * 512;
                    if !start.is_multiple_of(bs) || !len.is_multiple_of(bs) {
                        return Err(format!(
                            "range of {len} bytes at byte {start} is not block-aligned"
                        ));
                    }
                    descs.push((start / bs, (len / bs) as u32));
                }
                let use_unmap = matches!(req.op, BlockOp::Discard) && self.info.unmap.is_some();
                if use_unmap {
                    let list: Vec<UnmapDescriptor> = descs
                        .iter()
                        .filter(|d| d.1 > 0)
                        .map(|&(lba, blocks)| UnmapDescriptor { lba, blocks })
                        .collect();
                    let limits = self.info.unmap.unwrap_or(super::disk::UnmapLimits {
                        max_blocks: u32::MAX,
                        max_descriptors: 1,
                        granularity: 1,
                        alignment: None,
                    });
                    for group in list.chunks(limits.max_descriptors.max(1) as usize) {
                        let (cdb, params) = cdb::unmap(group).map_err(|e| e.to_string())?;
                        let n = params.len() as u32;
                        let cmd = self.command(
                            cdb,
                            DataDir::Write,
                            Some(Arc::new(IoBuffers::from_vec(params))),
                            0,
                            n,
                        );
                        self.send_child(parent, cmd, 0);
                    }
                } else {
                    let unmap = match req.op {
                        BlockOp::Discard => true,
                        BlockOp::WriteZeroes { unmap } => unmap && self.info.write_same.ws16_unmap,
                        _ => false,
                    };
                    let max = self.info.write_same.max_blocks.clamp(1, u32::MAX as u64);
                    for (lba, blocks) in descs {
                        let mut done = 0u64;
                        while done < blocks as u64 {
                            let n = (blocks as u64 - done).min(max) as u32;
                            let cdb = cdb::write_same16(
                                lba + done,
                                n,
                                WriteSameFlags { unmap, ndob: false },
                            )
                            .map_err(|e| e.to_string())?;
                            let cmd = self.command(
                                cdb,
                                DataDir::Write,
                                Some(self.zero_block.clone()),
                                0,
                                bs as u32,
                            );
                            self.send_child(parent, cmd, 0);
                            done += n as u64;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Turns a finished command into the parent's status (or a retry).
    fn on_result(&mut self, r: ScsiResult) {
        let Some((parent, cmd, retries)) =
            self.children.get_mut(r.tag as usize).and_then(Option::take)
        else {
            warn!("queue {}: result for an unknown command", self.index);
            return;
        };
        self.free_children.push(r.tag as usize);
        let status = match r.result {
            Ok(ScsiOutcome {
                status,
                sense,
                residual,
            }) => {
                let st = ScsiStatus::from_u8(status);
                let parsed = SenseData::parse(&sense).ok();
                if parent == INTERNAL {
                    self.on_capacity(st, &cmd, residual);
                    return;
                }
                match classify(st, parsed.as_ref()) {
                    SenseAction::Success if residual == 0 => BlockStatus::Ok,
                    SenseAction::Success => {
                        warn!(
                            "queue {}: {} moved {} bytes less than asked ({} residual)",
                            self.index,
                            cdb::opcode_name(cmd.cdb[0]),
                            residual,
                            residual
                        );
                        BlockStatus::IoError
                    }
                    SenseAction::RetryAfterUnitAttention(ua) if retries < MAX_RETRIES => {
                        if ua == UnitAttention::CapacityChanged {
                            warn!(
                                "queue {}: the LUN's capacity changed; re-reading it",
                                self.index
                            );
                            self.reread_capacity();
                        }
                        info!(
                            "queue {}: retrying {} after {}{}",
                            self.index,
                            cdb::opcode_name(cmd.cdb[0]),
                            st.name(),
                            parsed.map(|s| format!(": {s}")).unwrap_or_default()
                        );
                        self.send_child(parent, cmd, retries + 1);
                        return;
                    }
                    SenseAction::Retry if retries < MAX_RETRIES => {
                        // BUSY, TASK SET FULL, NOT READY (becoming ready),
                        // ABORTED COMMAND: give the target time.
                        let delay = RETRY_BASE_DELAY
                            .saturating_mul(1 << retries.min(16))
                            .min(RETRY_MAX_DELAY);
                        info!(
                            "queue {}: retrying {} in {delay:?} after {}{}",
                            self.index,
                            cdb::opcode_name(cmd.cdb[0]),
                            st.name(),
                            parsed.map(|s| format!(": {s}")).unwrap_or_default()
                        );
                        self.delayed
                            .push((Instant::now() + delay, parent, cmd, retries + 1));
                        return;
                    }
                    SenseAction::Fail(super::sense::IoFailure::ReservationConflict) => {
                        error!(
                            "queue {}: {} failed with RESERVATION CONFLICT: another initiator holds a SCSI reservation on {}",
                            self.index,
                            cdb::opcode_name(cmd.cdb[0]),
                            self.factory.describe()
                        );
                        BlockStatus::IoError
                    }
                    SenseAction::Unsupported => {
                        warn!(
                            "queue {}: target does not support {}{}",
                            self.index,
                            cdb::opcode_name(cmd.cdb[0]),
                            parsed.map(|s| format!(" ({s})")).unwrap_or_default()
                        );
                        BlockStatus::Unsupported
                    }
                    action => {
                        // A full or failing LUN fails every request: a burst
                        // of lines, then a count, not one line per request.
                        if let Some(suppressed) = self.failure_log.allow() {
                            error!(
                                "queue {}: {} failed with {}{} ({action:?}){}",
                                self.index,
                                cdb::opcode_name(cmd.cdb[0]),
                                st.name(),
                                parsed.map(|s| format!(": {s}")).unwrap_or_default(),
                                suppressed_note(suppressed)
                            );
                        }
                        BlockStatus::IoError
                    }
                }
            }
            Err(e) => {
                warn!(
                    "queue {}: {} failed: {e}",
                    self.index,
                    cdb::opcode_name(cmd.cdb[0])
                );
                if parent == INTERNAL {
                    self.capacity_probe = false;
                    return;
                }
                BlockStatus::IoError
            }
        };
        let Some(Some(p)) = self.parents.get_mut(parent) else {
            return;
        };
        if status != BlockStatus::Ok && p.status == BlockStatus::Ok {
            p.status = status;
        }
        p.outstanding = p.outstanding.saturating_sub(1);
        if p.outstanding == 0 {
            self.finish_parent_now(parent, BlockStatus::Ok);
        }
    }

    /// Sends READ CAPACITY(16) (once at a time) after a capacity change.
    fn reread_capacity(&mut self) {
        if self.capacity_probe {
            return;
        }
        self.capacity_probe = true;
        let buf = Arc::new(IoBuffers::from_vec(vec![0u8; 32]));
        let cmd = self.command(cdb::read_capacity16(32), DataDir::Read, Some(buf), 0, 32);
        self.send_child(INTERNAL, cmd, 0);
    }

    fn on_capacity(&mut self, st: ScsiStatus, cmd: &ScsiCommandReq, residual: i64) {
        self.capacity_probe = false;
        if st != ScsiStatus::Good {
            warn!(
                "queue {}: READ CAPACITY(16) after a capacity change failed with {}",
                self.index,
                st.name()
            );
            return;
        }
        let n = (32 - residual.clamp(0, 32)) as usize;
        let mut data = vec![0u8; n];
        if let Some(b) = &cmd.buf {
            b.read_at(0, &mut data);
        }
        match super::capacity::ReadCapacity16::parse(&data) {
            Ok(c) if c.block_len == self.info.block_size => {
                let sectors = c
                    .last_lba
                    .saturating_add(1)
                    .saturating_mul(c.block_len as u64)
                    / 512;
                info!(
                    "queue {}: {} now has {sectors} sectors (was {})",
                    self.index,
                    self.factory.describe(),
                    self.capacity.sectors()
                );
                self.capacity.set(sectors);
            }
            Ok(c) => error!(
                "queue {}: the LUN's block size changed from {} to {}; keeping the old geometry",
                self.index, self.info.block_size, c.block_len
            ),
            Err(e) => warn!("queue {}: bad READ CAPACITY(16) data: {e}", self.index),
        }
    }

    /// Timer tick: session liveness, reconnects, delayed retries.
    fn on_tick(&mut self) {
        let now = Instant::now();
        self.session.on_timer(now);
        self.maybe_reconnect();
        self.manage_path();
        if !self.delayed.is_empty() {
            let mut due = Vec::new();
            self.delayed.retain(|d| {
                if d.0 <= now {
                    due.push((d.1, d.2.clone(), d.3));
                    false
                } else {
                    true
                }
            });
            for (parent, cmd, retries) in due {
                self.send_child(parent, cmd, retries);
            }
        }
    }

    /// After a lost connection: log in again, with backoff, and hand the
    /// lost session's unfinished commands to the new one.
    fn maybe_reconnect(&mut self) {
        if self.session.failure().is_none() {
            return;
        }
        // Commands held for a failback wait with the lost session's.
        self.release_held();
        let attempt = match &self.login {
            Some(rx) => match rx.try_recv() {
                Ok(r) => {
                    self.login = None;
                    r
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => return,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    self.login = None;
                    return;
                }
            },
            None => {
                let relogins = self.relogins.load(Ordering::Relaxed);
                if self
                    .last_reconnect
                    .is_some_and(|t| t.elapsed() < self.reconnect_backoff)
                {
                    if relogins == self.relogins_seen {
                        return;
                    }
                    info!(
                        "queue {}: another queue logged in again; retrying now",
                        self.index
                    );
                }
                self.relogins_seen = relogins;
                self.last_reconnect = Some(Instant::now());
                // Log in on a helper thread: a login can take up to the login
                // timeout, and the queue must keep running its timers meanwhile.
                let (factory, index) = (self.factory.clone(), self.index);
                // After a loss the other paths go first; a failback starts
                // with the preferred one.
                let failing_back = self.path.failing_back;
                let avoid = match self.path.avoid_next.take() {
                    Some(p) => p,
                    None => self.session.portal().to_string(),
                };
                let spawned = self.spawn_helper(HelperKind::Login, move || {
                    if failing_back {
                        factory.open_preferred(index)
                    } else {
                        factory.open_avoiding(index, Some(&avoid))
                    }
                });
                match spawned {
                    Ok(rx) => self.login = Some(rx),
                    Err(e) => warn!("queue {}: cannot start a login thread: {e}", self.index),
                }
                return;
            }
        };
        match attempt {
            Ok(mut s) => {
                self.relogins_seen = self.relogins.fetch_add(1, Ordering::Relaxed) + 1;
                s.set_timeouts(self.session.timeouts());
                // Failures the old session already decided, then its survivors.
                self.session.poll(&mut self.results);
                s.adopt(self.session.take_orphans());
                self.reconnect_backoff = RECONNECT_INTERVAL;
                if self.watched_fd >= 0 {
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        self.watched_fd,
                        EpollEvent::default(),
                    );
                }
                self.watched_fd = s.fd();
                self.watching_out = false;
                if let Err(e) = self.epoll.ctl(
                    ControlOperation::Add,
                    self.watched_fd,
                    EpollEvent::new(EventSet::IN, 0),
                ) {
                    error!("queue {}: cannot watch the new connection: {e}", self.index);
                }
                self.note_new_path(self.session.portal().to_string(), s.portal());
                // The lost session is dropped here.
                self.session = s;
                release_freed_memory();
            }
            Err(e) if std::mem::take(&mut self.path.failing_back) => {
                // Back to the other paths at once; the commands wait meanwhile.
                self.path.probe_interval =
                    (self.path.probe_interval * 2).min(FAILBACK_PROBE_MAX_INTERVAL);
                self.path.avoid_next = self.path.preferred.clone();
                self.path.returning = true;
                self.last_reconnect = None;
                warn!(
                    "queue {}: preferred path {} did not take the session back ({}); returning to the other paths (next try in {:?})",
                    self.index,
                    self.path.preferred.as_deref().unwrap_or("?"),
                    with_cause(&e),
                    self.path.probe_interval
                );
                self.maybe_reconnect();
            }
            Err(e) => {
                crate::metrics::RECONNECT_FAILURES
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!(
                    "queue {}: reconnect to {} failed (next try in {:?}): {}",
                    self.index,
                    self.factory.describe(),
                    self.reconnect_backoff,
                    with_cause(&e)
                );
                self.reconnect_backoff = (self.reconnect_backoff * 2).min(RECONNECT_MAX_INTERVAL);
            }
        }
    }

    /// Logs and counts where a new session landed, compared with the old one.
    fn note_new_path(&mut self, old: String, new: &str) {
        use std::sync::atomic::Ordering::Relaxed;
        let preferred = self.path.preferred.as_deref().is_none_or(|p| p == new);
        crate::metrics::set_queue_path(self.index, new, preferred);
        if std::mem::take(&mut self.path.failing_back) {
            if new != old {
                crate::metrics::PATH_CHANGES.fetch_add(1, Relaxed);
            }
            if preferred {
                self.path.probe_interval = FAILBACK_PROBE_INTERVAL;
                info!("queue {}: back on preferred path {new}", self.index);
            } else {
                self.path.probe_interval =
                    (self.path.probe_interval * 2).min(FAILBACK_PROBE_MAX_INTERVAL);
                warn!(
                    "queue {}: preferred path {} sent the session elsewhere; continuing on {new} (next try in {:?})",
                    self.index,
                    self.path.preferred.as_deref().unwrap_or("?"),
                    self.path.probe_interval
                );
            }
            return;
        }
        if std::mem::take(&mut self.path.returning) {
            if new != old {
                crate::metrics::PATH_CHANGES.fetch_add(1, Relaxed);
            }
            info!("queue {}: continuing on {new}", self.index);
            return;
        }
        crate::metrics::RECONNECTS.fetch_add(1, Relaxed);
        if new != old {
            crate::metrics::PATH_CHANGES.fetch_add(1, Relaxed);
            warn!("queue {}: path {old} down, continuing on {new}", self.index);
        } else {
            info!("queue {}: reconnected to {new}", self.index);
        }
    }

    /// Hands commands held for a failback to the session (a lost one keeps
    /// them for its replacement).
    fn release_held(&mut self) {
        self.path.draining = None;
        for req in std::mem::take(&mut self.path.held) {
            self.session.submit(req);
        }
    }

    /// Failback: probes the preferred portal while the session runs
    /// elsewhere; when it answers, holds new commands, lets the ones in
    /// flight finish and moves (see [`Self::move_to_preferred`]).
    fn manage_path(&mut self) {
        let Some(preferred) = self.path.preferred.clone() else {
            return;
        };
        if self.session.failure().is_some() {
            return;
        }
        if let Some(since) = self.path.draining {
            if self.session.in_flight() == 0 {
                self.move_to_preferred(true);
            } else if since.elapsed() >= FAILBACK_DRAIN_TIMEOUT {
                self.move_to_preferred(false);
            }
            return;
        }
        if self.session.portal() == preferred {
            self.path.probe = None;
            return;
        }
        if let Some(rx) = &self.path.probe {
            match rx.try_recv() {
                Ok(true) => {
                    self.path.probe = None;
                    info!(
                        "queue {}: preferred path {preferred} answers again; moving back once {} command(s) in flight on {} finish",
                        self.index,
                        self.session.in_flight(),
                        self.session.portal()
                    );
                    self.path.draining = Some(Instant::now());
                    if self.session.in_flight() == 0 {
                        self.move_to_preferred(true);
                    }
                }
                Ok(false) | Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    self.path.probe = None
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
            }
            return;
        }
        if self
            .path
            .last_probe
            .is_some_and(|t| t.elapsed() < self.path.probe_interval)
        {
            return;
        }
        self.path.last_probe = Some(Instant::now());
        let factory = self.factory.clone();
        let spawned = self.spawn_helper(HelperKind::Probe, move || factory.probe(&preferred));
        match spawned {
            Ok(rx) => self.path.probe = Some(rx),
            Err(e) => warn!("queue {}: cannot start a path probe: {e}", self.index),
        }
    }

    /// Ends the session on the current portal and logs in again, preferred
    /// portal first. `drained`: nothing is in flight, so a clean Logout
    /// first (a login with our ISID while the old session lives would make
    /// the target reinstate, i.e. kill, it); otherwise the connection is
    /// dropped and its commands are re-issued like after a loss.
    fn move_to_preferred(&mut self, drained: bool) {
        let from = self.session.portal().to_string();
        if drained {
            // Blocks this queue's worker for one round trip (at most
            // LOGOUT_TIMEOUT); its commands are held meanwhile anyway.
            match self.session.logout(LOGOUT_TIMEOUT) {
                Ok(()) => info!(
                    "queue {}: logged out of {from} to move back to the preferred path",
                    self.index
                ),
                Err(e) => warn!(
                    "queue {}: logout from {from} before the failback: {e}; dropping the connection",
                    self.index
                ),
            }
        } else {
            warn!(
                "queue {}: {} command(s) still running on {from} after {:?}; moving anyway, they will be re-issued",
                self.index,
                self.session.in_flight(),
                FAILBACK_DRAIN_TIMEOUT
            );
        }
        self.session.abandon("moving back to the preferred path");
        self.path.failing_back = true;
        self.last_reconnect = None;
        self.reconnect_backoff = RECONNECT_INTERVAL;
        self.maybe_reconnect();
    }

    /// One round: timer work when a tick is due, then the session (`receive`:
    /// also read what the target sent), then the results.
    fn run(&mut self, done: &mut Vec<Completion>, receive: bool) {
        // Read the timerfd only when a tick is due: a read that finds nothing
        // is a wasted system call per event. Skipping it while it is readable
        // would make the worker's epoll spin, so "due" follows the timer's own
        // schedule, not the time we last read it.
        if Instant::now() >= self.next_tick {
            let n = timer_expirations(&self.timer);
            if n > 0 {
                self.next_tick += TICK * n.min(u32::MAX as u64) as u32;
                self.on_tick();
            }
        }
        // A login or probe finished: take its result now. (Only while a
        // helper runs: no system call on the data path otherwise.)
        if self.wakes_expected > 0 {
            if let Ok(n) = self.wake.read() {
                self.wakes_expected = self.wakes_expected.saturating_sub(n);
                self.maybe_reconnect();
                self.manage_path();
            }
        }
        let mut results = std::mem::take(&mut self.results);
        self.sent = false;
        if receive {
            self.session.poll(&mut results);
        } else {
            self.session.send(&mut results);
        }
        for r in results.drain(..) {
            self.on_result(r);
        }
        // Retries queued during on_result go out now (only if there are any).
        if std::mem::take(&mut self.sent) {
            self.session.send(&mut results);
            for r in results.drain(..) {
                self.on_result(r);
            }
        }
        self.results = results;
        if self.path.draining.is_some() && self.session.in_flight() == 0 {
            self.manage_path();
        }
        self.update_interest();
        done.append(&mut self.ready);
    }

    fn update_interest(&mut self) {
        if self.session.failure().is_some() {
            // A dead socket stays readable (EOF): stop watching it, or the
            // worker would spin.
            if self.watched_fd >= 0 {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    self.watched_fd,
                    EpollEvent::default(),
                );
                self.watched_fd = -1;
            }
            return;
        }
        let want = self.session.wants_write();
        if want != self.watching_out {
            let ev = if want {
                EventSet::IN | EventSet::OUT
            } else {
                EventSet::IN
            };
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Modify,
                self.watched_fd,
                EpollEvent::new(ev, 0),
            ) {
                error!("queue {}: epoll update failed: {e}", self.index);
            }
            self.watching_out = want;
        }
    }
}

impl QueueTarget for LunQueue {
    fn submit(&mut self, tag: u64, req: BlockRequest) {
        self.maybe_reconnect();
        let parent = self.new_parent(tag, None);
        if let Err(why) = self.build(parent, req) {
            warn!("queue {}: cannot map request to SCSI: {why}", self.index);
            if let Some(Some(p)) = self.parents.get_mut(parent) {
                p.status = BlockStatus::IoError;
            }
        }
        if let Some(Some(p)) = self.parents.get(parent) {
            if p.outstanding == 0 {
                self.finish_parent_now(parent, BlockStatus::Ok);
            }
        }
    }

    fn poll(&mut self, done: &mut Vec<Completion>) {
        self.run(done, true);
    }

    fn send(&mut self, done: &mut Vec<Completion>) {
        self.run(done, false);
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn in_flight(&self) -> usize {
        self.parents.len() - self.free.len()
    }
}

impl Drop for LunQueue {
    fn drop(&mut self) {
        let n = self.in_flight();
        if n > 0 {
            warn!("queue {}: dropped with {n} requests in flight", self.index);
        }
    }
}

/// Returns the heap memory freed so far to the kernel. Each login runs on a
/// short-lived helper thread, so a session's buffers come from that thread's
/// malloc arena and are freed, at the next reconnect, by the queue's worker;
/// glibc keeps such freed chunks resident in the arena, and every reconnect
/// left the process larger (bench/soak.sh: +50 KiB RSS per tgtd restart).
/// Called once per reconnect, never on the data path.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes
    // no pointers from us and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// "error: its cause", for a log line (a setup error's own text is only
/// what was being done).
fn with_cause(e: &TargetError) -> String {
    match std::error::Error::source(e) {
        Some(c) => format!("{e}: {c}"),
        None => e.to_string(),
    }
}

/// The session-level error for a failed open, as a target error.
pub fn open_error(what: String, e: SessionError) -> TargetError {
    TargetError::Setup {
        context: what,
        source: Box::new(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_runs_every_job_on_one_long_lived_thread() {
        let mut h = Helper::default();
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..3 {
            let tx = tx.clone();
            h.run(
                "login-q7".into(),
                Box::new(move || {
                    let t = std::thread::current();
                    let _ = tx.send((i, t.id(), t.name().map(str::to_string)));
                }),
            )
            .unwrap();
        }
        let got: Vec<_> = (0..3)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(
            got.iter().all(|g| g.1 == got[0].1),
            "jobs ran on several threads"
        );
        assert_ne!(got[0].1, std::thread::current().id());
        assert_eq!(got[0].2.as_deref(), Some("login-q7"));
    }
}
