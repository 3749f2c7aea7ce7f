//! The vhost-user-blk device: feature negotiation, config space, and the
//! dispatch of queue kicks and target completions to the per-queue workers.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use thiserror::Error;
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Backend, Listener, VhostUserFrontendReqHandler};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::inflight::InflightRegion;
use super::mid_batch::{MidBatch, RunningWorkers};
use super::worker::{spin_pause, QueueStats, QueueWorker, Vring, PASS_BUDGET};
use crate::blk::buffer::GuestMemoryMmap;
use crate::blk::config::{
    config_space, device_features, read_window, set_capacity, WRITEBACK_OFFSET,
};
use crate::blk::request::RequestLimits;
use crate::blk::target::{DeviceInfo, DeviceNotifier, SharedCapacity, Target, TargetError};

/// How long GET_VRING_BASE waits for a queue's in-flight requests: longer
/// than an iSCSI command may take before it is aborted and failed (30 s
/// command timeout, then abort and task management, 10 s).
const STOP_RING_TIMEOUT: Duration = Duration::from_secs(60);

/// Device options from the command line or config file.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Number of virtqueues.
    pub num_queues: usize,
    /// Worker threads: queue `q` runs on thread `q % threads` (1..=num_queues).
    pub threads: usize,
    /// Largest virtqueue size the frontend may pick.
    pub queue_size: usize,
    /// Refuse writes even if the target allows them.
    pub read_only: bool,
    /// Serial reported by GET_ID (default: the target's).
    pub serial: Option<String>,
}

/// Errors starting or running the device.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// A queue's target could not be opened.
    #[error("cannot open queue {index} of the target")]
    OpenQueue {
        /// Queue index.
        index: usize,
        /// Cause.
        #[source]
        source: TargetError,
    },
    /// Bad options.
    #[error("invalid device option: {0}")]
    BadOption(String),
    /// The vhost-user daemon failed.
    #[error("vhost-user daemon on {socket}: {detail}")]
    Daemon {
        /// Socket path.
        socket: String,
        /// What failed.
        detail: String,
    },
}

/// Device changes the target reports, passed on to the frontend: the new
/// capacity goes into the config space and the request checks, then a
/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the backend request channel makes
/// the frontend raise a virtio config-change interrupt.
struct ConfigChanges {
    capacity: SharedCapacity,
    /// The current frontend's backend request channel (None: not offered).
    channel: Mutex<Option<Backend>>,
}

impl ConfigChanges {
    fn set_channel(&self, channel: Option<Backend>) {
        *self.channel.lock().unwrap_or_else(|e| e.into_inner()) = channel;
    }
}

impl DeviceNotifier for ConfigChanges {
    fn capacity_changed(&self, sectors: u64) {
        let old = self.capacity.set(sectors);
        if old == sectors {
            return;
        }
        info!(
            "device capacity changed from {old} to {sectors} sectors ({} MiB)",
            sectors / 2048
        );
        let channel = self
            .channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(channel) = channel else {
            warn!(
                "the frontend did not set up a backend request channel: \
                 the guest sees the new capacity only when it re-reads the config space"
            );
            return;
        };
        // The frontend answers the notice by reading the config space over
        // the main channel and may wait for an ack: not on a queue's thread.
        let sent = std::thread::Builder::new()
            .name("config-change".into())
            .spawn(move || match channel.handle_config_change() {
                Ok(_) => info!("frontend notified of the config change"),
                Err(e) => warn!("cannot notify the frontend of the config change: {e}"),
            });
        if let Err(e) = sent {
            warn!("cannot notify the frontend of the config change: no thread: {e}");
        }
    }
}

/// One queue's worker behind its lock, on cache lines of its own: each is
/// written by its own thread on every request, and neighbours in the
/// `Vec` would otherwise share the lines at their ends.
#[repr(align(128))]
struct QueueSlot(Mutex<QueueWorker>);

/// The vhost-user-blk backend: shared, read-mostly device state plus one
/// worker per queue, each behind its own (uncontended) lock.
pub struct BlkBackend {
    info: DeviceInfo,
    num_queues: usize,
    /// Worker threads; queue `q` is served by thread `q % threads`.
    threads: usize,
    /// Worker threads inside an event now (workers read it to decide on
    /// completions in the middle of a batch: [`MidBatch`]); None where no
    /// worker reads it (a network target, or `VHOST_ISER_MID_BATCH` set).
    running: Option<Arc<RunningWorkers>>,
    queue_size: usize,
    seg_max: u32,
    features: u64,
    event_idx: AtomicBool,
    writeback: Arc<AtomicBool>,
    /// The frontend acked VHOST_F_LOG_ALL: log the pages data is written to.
    dirty_log: Arc<AtomicBool>,
    workers: Vec<QueueSlot>,
    stats: Vec<Arc<QueueStats>>,
    target: Arc<dyn Target>,
    changes: Arc<ConfigChanges>,
}

impl BlkBackend {
    /// Builds the device over `target`, opening one target queue per virtqueue.
    pub fn new(target: Arc<dyn Target>, opts: &DeviceOptions) -> Result<Self, DeviceError> {
        if opts.num_queues == 0 || opts.num_queues > 64 {
            return Err(DeviceError::BadOption(format!(
                "queues must be between 1 and 64, got {}",
                opts.num_queues
            )));
        }
        if opts.threads == 0 || opts.threads > opts.num_queues {
            return Err(DeviceError::BadOption(format!(
                "threads must be between 1 and the number of queues ({}), got {}",
                opts.num_queues, opts.threads
            )));
        }
        if !opts.queue_size.is_power_of_two() || !(4..=32768).contains(&opts.queue_size) {
            return Err(DeviceError::BadOption(format!(
                "queue size must be a power of two between 4 and 32768, got {}",
                opts.queue_size
            )));
        }
        let mut info = target.info();
        if opts.read_only {
            info.read_only = true;
        }
        if let Some(s) = &opts.serial {
            info.serial = s.as_bytes().to_vec();
        }
        // Linux puts the header and the status in descriptors of their own.
        let seg_max = (opts.queue_size as u32).saturating_sub(2).max(1);
        let changes = Arc::new(ConfigChanges {
            capacity: SharedCapacity::new(info.capacity_sectors),
            channel: Mutex::new(None),
        });
        target.set_notifier(changes.clone());
        let limits = Arc::new(RequestLimits {
            capacity_sectors: changes.capacity.clone(),
            seg_max,
            read_only: info.read_only,
            discard: info
                .discard
                .filter(|_| !info.read_only)
                .map(|d| (d.max_sectors, d.max_segments)),
            write_zeroes: info
                .write_zeroes
                .filter(|_| !info.read_only)
                .map(|d| (d.max_sectors, d.max_segments)),
        });
        let writeback = Arc::new(AtomicBool::new(info.write_cache));
        let dirty_log = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::with_capacity(opts.num_queues);
        let mut stats = Vec::with_capacity(opts.num_queues);
        // Sched affinity and cgroup CPU limits count here: the CPUs this
        // process may actually run on.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let running = Arc::new(RunningWorkers::default());
        let mid_batch = MidBatch::from_env_or_auto(running.clone(), cpus);
        let mut inline_target = false;
        for index in 0..opts.num_queues {
            let q = target
                .open_queue(index)
                .map_err(|source| DeviceError::OpenQueue { index, source })?;
            let mut w = QueueWorker::new(
                index,
                q,
                limits.clone(),
                &info.serial,
                writeback.clone(),
                dirty_log.clone(),
            );
            w.set_shares_thread(opts.threads < opts.num_queues);
            w.set_mid_batch(mid_batch.clone());
            inline_target |= w.inline_target();
            stats.push(w.stats());
            workers.push(QueueSlot(Mutex::new(w)));
        }
        // LOG_ALL (with LOG_SHMFD below): the frontend may migrate the VM;
        // every write into guest memory is then logged.
        let features = device_features(&info, opts.num_queues)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits();
        Ok(BlkBackend {
            info,
            num_queues: opts.num_queues,
            threads: opts.threads,
            // Only inline targets complete mid-batch, and only the automatic
            // choice reads the count: others skip its two atomics per event.
            running: (inline_target && matches!(mid_batch, MidBatch::WhileACpuIsFree { .. }))
                .then_some(running),
            queue_size: opts.queue_size,
            seg_max,
            features,
            event_idx: AtomicBool::new(false),
            writeback,
            dirty_log,
            workers,
            stats,
            target,
            changes,
        })
    }

    /// The device as the guest sees it.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Per-queue counters.
    pub fn stats(&self) -> &[Arc<QueueStats>] {
        &self.stats
    }

    fn worker(&self, index: usize) -> MutexGuard<'_, QueueWorker> {
        // Only queue `index`'s thread and the drain path take this lock; a
        // poisoned lock means a worker panicked, and its state is still usable.
        self.workers[index]
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Stops taking new requests and waits (up to `timeout`) for in-flight
    /// ones to complete. Returns the number still in flight.
    pub fn drain(&self, timeout: Duration) -> usize {
        for i in 0..self.num_queues {
            self.worker(i).start_draining();
        }
        self.wait_idle(0..self.num_queues, timeout)
    }

    fn wait_idle(&self, queues: std::ops::Range<usize>, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let busy: usize = queues.clone().map(|i| self.worker(i).in_flight()).sum();
            if busy == 0 || Instant::now() >= deadline {
                return busy;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// After a batch on a thread that serves several queues: watches all of
    /// the thread's rings for the poll window and serves, in turns of one
    /// pass, whichever has requests, restarting the window each time. This
    /// is what a worker with a thread of its own does for its one ring (a
    /// busy guest then queues without a kick and without a wake-up here);
    /// one ring alone would leave the others' kicks waiting while it spins.
    /// The passes leave the guest's kicks off while the thread watches
    /// (the guest queues without kicking, as it does for a worker that
    /// watches its own ring); every way out of the watch turns them back on.
    /// `pending`: a queue whose last pass left requests that no kick will
    /// announce. When the watch ends (no window, or the budget is spent),
    /// each queue still in that state gets a kick from us.
    fn poll_thread_rings(
        &self,
        thread_id: usize,
        vrings: &[Vring],
        event_idx: bool,
        pending: Option<usize>,
    ) {
        let queues = || {
            (0..vrings.len())
                .map(|i| (i, thread_id + i * self.threads, &vrings[i]))
                .filter(|&(_, q, _)| q < self.num_queues)
        };
        // Bit i: the thread's i-th queue has requests no kick will announce.
        let mut waiting: u64 = pending.map_or(0, |q| 1 << (q / self.threads));
        // Every way out of the watch goes through here: the guest's kicks
        // go back on for each ring the watch stood in for, and a queue with
        // requests that no kick will announce gets a kick from us.
        let end_watch = |mut waiting: u64| {
            for (i, q, vring) in queues() {
                let mut worker = self.worker(q);
                if worker.rearm() {
                    waiting |= 1 << i;
                }
                if waiting & (1 << i) != 0 {
                    worker.kick_self(vring);
                }
            }
        };
        let window = queues()
            .map(|(_, q, _)| self.worker(q).poll_window())
            .min()
            .unwrap_or_default();
        if window.is_zero() || !event_idx {
            end_watch(waiting);
            return;
        }
        let started = Instant::now();
        let mut until = started + window;
        loop {
            let mut served = false;
            for (i, q, vring) in queues() {
                let mut worker = self.worker(q);
                if waiting & (1 << i) != 0 || worker.has_available(vring) {
                    if worker.process_queue(vring, event_idx) {
                        waiting |= 1 << i;
                    } else {
                        waiting &= !(1 << i);
                    }
                    served = true;
                }
            }
            let now = Instant::now();
            if now.duration_since(started) >= PASS_BUDGET {
                end_watch(waiting);
                return;
            }
            if served {
                until = now + window;
            } else if now >= until {
                // Nothing served in the last round: nothing is waiting.
                end_watch(0);
                return;
            }
            spin_pause();
        }
    }

    /// The epoll data value for queue `index`'s target fd: above the range
    /// vhost-user-backend reserves for queues and its exit event.
    fn target_event_id(&self, index: usize) -> u64 {
        (self.num_queues + 1 + index) as u64
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn acked_features(&self, features: u64) {
        let on = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        let was = self.dirty_log.swap(on, Ordering::SeqCst);
        if on != was {
            info!(
                "frontend {} dirty page logging (live migration)",
                if on { "turned on" } else { "turned off" }
            );
        }
    }

    fn set_backend_req_fd(&self, channel: Backend) {
        info!("frontend set up a backend request channel (config-change notices)");
        self.changes.set_channel(Some(channel));
    }

    fn get_inflight_fd(&self, req: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        let (file, size) = InflightRegion::create(req.num_queues, req.queue_size, self.num_queues)
            .map_err(|e| {
                warn!("GET_INFLIGHT_FD: {e}");
                io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
            })?;
        info!(
            "inflight region: {size} bytes for {} queue(s) of {} entries",
            req.num_queues, req.queue_size
        );
        Ok((
            VhostUserInflight::new(size, 0, req.num_queues, req.queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&self, req: &VhostUserInflight, file: File) -> io::Result<()> {
        let region = InflightRegion::open(
            &file,
            req.mmap_offset,
            req.mmap_size,
            req.num_queues,
            req.queue_size,
            self.num_queues,
        )
        .map_err(|e| {
            warn!("SET_INFLIGHT_FD: {e}");
            io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
        })?;
        for i in 0..self.num_queues {
            self.worker(i).set_inflight(region.queue_tracker(i));
        }
        Ok(())
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut space = config_space(
            &self.info,
            self.num_queues as u16,
            self.seg_max,
            self.writeback.load(Ordering::Relaxed),
        );
        set_capacity(&mut space, self.changes.capacity.get());
        read_window(&space, offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the writeback byte is writable (VIRTIO_BLK_F_CONFIG_WCE).
        if offset as usize == WRITEBACK_OFFSET && buf.len() == 1 {
            let on = buf[0] != 0;
            info!(
                "guest set the write cache to {}",
                if on { "writeback" } else { "writethrough" }
            );
            self.writeback.store(on, Ordering::Relaxed);
            return Ok(());
        }
        warn!(
            "guest wrote {} bytes at config offset {offset}: refused",
            buf.len()
        );
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.target.update_memory(&mem.memory().into_inner());
        for i in 0..self.num_queues {
            self.worker(i).set_memory(mem.clone());
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.threads)
            .map(|t| {
                (t..self.num_queues)
                    .step_by(self.threads)
                    .fold(0u64, |m, q| m | 1 << q)
            })
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE (the frontend stops the device: migration, shutdown,
        // reset). The ring is already not ready, so nothing new is popped.
        // The frontend reads last_avail_idx from our answer, and during a
        // migration it copies guest memory a last time right after: every
        // request we took must be completed, its data in guest memory and
        // logged, and its used entry published before we answer. A request
        // completing later would write into memory nobody copies any more
        // and the guest on the destination would wait for it forever.
        let q = queue_index as usize;
        if q >= self.num_queues {
            return Ok(());
        }
        let busy = {
            let mut worker = self.worker(q);
            // A thread watching several rings may have this one's kicks off.
            worker.rearm();
            worker.in_flight()
        };
        if busy == 0 {
            return Ok(());
        }
        let started = Instant::now();
        let left = self.wait_idle(q..q + 1, STOP_RING_TIMEOUT);
        if left > 0 {
            error!(
                "queue {q}: the frontend stopped the ring with {busy} requests in flight; \
                 {left} did not complete within {} s and may still write into guest memory \
                 (a migration in progress may lose them)",
                STOP_RING_TIMEOUT.as_secs()
            );
        } else {
            info!(
                "queue {q}: the frontend stopped the ring with {busy} requests in flight; \
                 completed them in {} ms",
                started.elapsed().as_millis()
            );
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Thread t serves queues t, t + threads, t + 2 * threads, ...; its
        // vrings come in that order, and a kick arrives as the position of
        // the vring in that list. A target's events carry the queue number.
        let ev = device_event as usize;
        let (queue, kick) = if ev < self.num_queues {
            (thread_id + ev * self.threads, true)
        } else if ev > self.num_queues {
            (ev - self.num_queues - 1, false)
        } else {
            return Ok(());
        };
        if queue >= self.num_queues || queue % self.threads != thread_id {
            return Ok(());
        }
        let Some(vring) = vrings.get(queue / self.threads) else {
            return Ok(());
        };
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let _running = self.running.as_ref().map(|r| r.enter());
        let pending = {
            let mut worker = self.worker(queue);
            if kick {
                worker.process_queue(vring, event_idx)
            } else {
                worker.process_target(vring);
                false
            }
        };
        if kick && self.threads < self.num_queues {
            self.poll_thread_rings(thread_id, vrings, event_idx, pending.then_some(queue));
        }
        Ok(())
    }
}

/// Serves frontends on `socket` one connection after another until the
/// process is stopped. A stale socket file is replaced.
pub fn serve(backend: Arc<BlkBackend>, socket: &Path) -> Result<(), DeviceError> {
    let socket_name = socket.display().to_string();
    let err = |detail: String| DeviceError::Daemon {
        socket: socket_name.clone(),
        detail,
    };
    // One listening socket for the process's life: a frontend that connects
    // while the previous one is being torn down waits in the backlog instead
    // of being reset.
    let mut listener =
        Listener::new(socket, true).map_err(|e| err(format!("cannot listen: {e}")))?;
    loop {
        let mut daemon = VhostUserDaemon::new(
            "vhost-iser".to_string(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| err(format!("cannot create the device: {e}")))?;
        let handlers = daemon.get_epoll_handlers();
        for i in 0..backend.num_queues {
            let Some(handler) = handlers.get(i % backend.threads) else {
                continue;
            };
            if let Some(fd) = backend.worker(i).target_fd() {
                handler
                    .register_listener(fd, EventSet::IN, backend.target_event_id(i))
                    .map_err(|e| err(format!("cannot watch queue {i}'s target: {e}")))?;
            }
        }
        info!("waiting for a frontend on {socket_name}");
        daemon
            .start(&mut listener)
            .map_err(|e| err(format!("cannot accept a frontend: {e}")))?;
        match daemon.wait() {
            Ok(()) => info!("frontend disconnected"),
            // The frontend closed the socket between messages: it exited,
            // was killed, or reconnects. Not an error of ours or of the guest.
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected,
            )) => info!("frontend disconnected (socket closed)"),
            Err(e) => warn!("frontend connection ended: {e}"),
        }
        backend.changes.set_channel(None);
        for h in &handlers {
            h.send_exit_event();
        }
        // Requests taken from the old rings complete into them before the
        // next frontend may look at the same rings.
        let left = backend.wait_idle(0..backend.num_queues, Duration::from_secs(60));
        if left > 0 {
            warn!("{left} requests still in flight after the frontend left");
        }
    }
}
