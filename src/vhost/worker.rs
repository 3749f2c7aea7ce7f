//! The per-queue worker: pops requests, hands them to the queue's target,
//! completes them into the used ring and notifies the guest once per batch.
//!
//! Each virtqueue has exactly one worker, run by its own thread (the epoll
//! thread vhost-user-backend creates for it), so nothing here is shared
//! between queues.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestRegionMmap,
};

use crate::blk::buffer::{mark_dirty, write_byte, GuestMemoryMmap};
use crate::blk::request::{
    parse_request, GuestRanges, ParsedRequest, Request, RequestLimits, ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use crate::blk::target::{BlockOp, BlockStatus, Completion, QueueTarget};
use crate::log_limit::{suppressed_note, LogLimiter};
use crate::metrics::{self, LatencyHistogram, OwnedCounter, StatOp, StatStamp};

use super::inflight::{QueueInflight, Recovery};
use super::mid_batch::{mid_batch_from_env, MidBatch, MidBatchChoice, EVERY};
use super::ring::{servable, RingError, SplitRing};

/// A virtqueue over the backend's guest memory (regions with dirty bitmaps).
pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMemoryMmap>>;

/// The state behind a [`Vring`]'s lock.
type VringState = vhost_user_backend::VringState<GuestMemoryAtomic<GuestMemoryMmap>>;

/// How long a worker watches its ring for more requests after a batch:
/// `VHOST_ISER_RING_POLL_US` if set; else 20 µs for targets that complete
/// inline (RAM) and off for network targets, whose responses would wait
/// behind the window.
fn ring_poll(inline_target: bool) -> Duration {
    static FROM_ENV: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    let env = *FROM_ENV.get_or_init(|| {
        std::env::var("VHOST_ISER_RING_POLL_US")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_micros)
    });
    env.unwrap_or(if inline_target {
        Duration::from_micros(20)
    } else {
        Duration::ZERO
    })
}

/// One turn of a ring-polling spin. The thread yields its CPU: the client
/// or vCPU thread whose next request the spin waits for may be queued on
/// this very CPU, and spinning through its time slice delays the request
/// it is waiting for. With nobody else runnable the yield returns at once.
/// Measured with 4 queues, 4 worker and 4 client threads on 2 CPUs, depth 1:
/// 272k -> 464k IOPS, backend CPU per I/O 5.0 -> 2.1 us; one queue: no change.
pub(crate) fn spin_pause() {
    std::thread::yield_now();
}

/// Counters of one queue, written by its worker only and readable from
/// other threads (metrics); single-writer atomics, no locks and no locked
/// instructions.
#[derive(Default, Debug)]
pub struct QueueStats {
    /// Completed requests by [`StatOp`] and status (see [`metrics::STATUS_NAMES`]).
    requests: [[OwnedCounter; 3]; StatOp::ALL.len()],
    /// Chains refused as malformed.
    pub bad_requests: OwnedCounter,
    /// Bytes read by the guest (successful requests).
    pub read_bytes: OwnedCounter,
    /// Bytes written by the guest (successful requests).
    pub write_bytes: OwnedCounter,
    /// Requests handed to the target and not completed yet.
    pub in_flight: OwnedCounter,
    /// Time from taking a request off the ring to its completion.
    pub latency: LatencyHistogram,
}

impl QueueStats {
    /// Completed requests of `op` with status index `status` (0 ok, 1 ioerr, 2 unsupp).
    pub fn requests(&self, op: StatOp, status: usize) -> u64 {
        self.requests[op as usize]
            .get(status)
            .map_or(0, OwnedCounter::get)
    }

    /// A request was handed to the target.
    pub fn record_submit(&self) {
        self.in_flight.add(1);
    }

    /// A request handed to the target completed with virtio-blk `status`
    /// (`now`: read once per batch of completions, clock reads are not free).
    pub fn record_done(&self, stamp: StatStamp, status: u8, now: Instant) {
        self.in_flight.sub(1);
        self.latency
            .observe(now.saturating_duration_since(stamp.started));
        self.record_answer(stamp.op, stamp.bytes, status);
    }

    /// A request was answered (by the target or by the backend itself).
    pub fn record_answer(&self, op: StatOp, bytes: u64, status: u8) {
        self.requests[op as usize][metrics::status_index(status)].add(1);
        if status == VIRTIO_BLK_S_OK {
            match op {
                StatOp::Read => self.read_bytes.add(bytes),
                StatOp::Write => self.write_bytes.add(bytes),
                _ => {}
            }
        }
    }
}

/// How long one [`QueueWorker::process_queue`] call (or a thread's watch
/// over its rings) may keep serving busy rings before it lets the event loop,
/// and the main thread's requests for the worker, in.
pub const PASS_BUDGET: Duration = Duration::from_millis(2);

/// With an inline target, the clock is read for the latency of mid-batch
/// completions once every this many requests, not at each: with
/// completions after every request, a read each cost 7-9 % of the IOPS at
/// one queue, depth 8-32 (`clock_gettime` is slow on this VM). Their
/// recorded latency is short by at most the time of this many requests.
const CLOCK_EVERY: usize = 8;

/// How [`QueueWorker::pop_and_submit`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PopEnd {
    /// The ring is empty.
    Drained,
    /// One ring's worth was taken; more may be waiting.
    CutShort,
    /// The ring cannot be served: stopped, or its available index is broken.
    Refused,
}

/// A request handed to the target, waiting for its completion.
struct InFlight {
    head_index: u16,
    status_addr: GuestAddress,
    used_len: u32,
    stat: StatStamp,
    /// Where the target writes data (reads): logged dirty at completion.
    data_in: GuestRanges,
}

/// One virtqueue's worker state.
pub struct QueueWorker {
    index: usize,
    target: Box<dyn QueueTarget>,
    limits: Arc<RequestLimits>,
    serial: [u8; ID_BYTES],
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    /// Completions to publish: those an inline target served at once
    /// (`QueueTarget::execute`) wait here for the next `complete`, which
    /// adds the target's own.
    done: Vec<Completion>,
    bad_input_log: LogLimiter,
    /// When set, no new requests are taken from the ring (shutdown drain).
    draining: bool,
    /// The guest's write cache setting (CONFIG_WCE), shared with the backend.
    writeback: Arc<AtomicBool>,
    /// Used entries added since the last interrupt decision (event-idx
    /// compares the guest's used_event with this window).
    unsignalled: u16,
    /// The frontend logs dirty pages (VHOST_F_LOG_ALL: live migration), set
    /// by the backend; read once per completed request that wrote data.
    dirty_log: Arc<AtomicBool>,
    /// Guest memory, set when the frontend sends its memory table.
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    /// This worker's own copy of the current memory table (the same
    /// regions, a table object of its own), and the shared table it was
    /// copied from. Every request handed to a target that keeps it holds a
    /// reference to the table it was parsed against, so that its buffers
    /// stay mapped (one served at once borrows it instead); on the shared table
    /// those reference counts, moved by every worker, sit in the cache line
    /// that each region lookup reads, and with several workers that line
    /// went back and forth between the CPUs on every request (4 queues on
    /// 4 threads: a quarter of the worker's samples in lookups and in dropping
    /// requests). Made anew when the front-end's table changes.
    own_mem: Option<(Weak<GuestMemoryMmap>, Arc<GuestMemoryMmap>)>,
    stats: Arc<QueueStats>,
    /// Inflight tracking shared with the front-end (INFLIGHT_SHMFD).
    inflight: Option<QueueInflight>,
    /// The inflight region arrived: check it for requests a previous
    /// back-end left in flight before taking new ones.
    recover_pending: bool,
    /// The worker thread serves other queues too (`--threads` below
    /// `--queues`): one pass per call, and the thread, not this worker,
    /// watches the rings (`BlkBackend::poll_thread_rings`).
    shares_thread: bool,
    /// How long the ring is watched after a batch ([`ring_poll`]).
    poll_window: Duration,
    /// The target completes requests as they are submitted (`mem:`,
    /// `null:`): it has no event fd.
    inline_target: bool,
    /// When inline completions go back to the guest during a deep batch.
    mid_batch: MidBatchChoice,
    /// How long one `process_queue` call may go on ([`PASS_BUDGET`]; tests
    /// that count passes lift it, as a loaded machine may stretch a pass).
    pass_budget: Duration,
    /// A pass ended with the guest's kicks left off because the thread
    /// watches this ring: the ring, for [`QueueWorker::rearm`] to turn them
    /// back on when the watch ends or the front-end stops the ring.
    kicks_off: Option<Vring>,
    /// Passes of `process_batch` so far (tests count them).
    #[cfg(test)]
    passes: usize,
}

impl QueueWorker {
    /// A worker for queue `index`, driving `target`.
    pub fn new(
        index: usize,
        target: Box<dyn QueueTarget>,
        limits: Arc<RequestLimits>,
        serial: &[u8],
        writeback: Arc<AtomicBool>,
        dirty_log: Arc<AtomicBool>,
    ) -> Self {
        let inline_target = target.event_fd().is_none();
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial[..n]);
        QueueWorker {
            index,
            target,
            limits,
            serial: id,
            slots: Vec::new(),
            free_slots: Vec::new(),
            done: Vec::new(),
            bad_input_log: LogLimiter::new(),
            draining: false,
            writeback,
            unsignalled: 0,
            dirty_log,
            mem: None,
            own_mem: None,
            stats: Arc::new(QueueStats::default()),
            inflight: None,
            recover_pending: false,
            shares_thread: false,
            inline_target,
            poll_window: ring_poll(inline_target),
            mid_batch: MidBatchChoice::new(
                MidBatch::Every(mid_batch_from_env().unwrap_or(EVERY)),
                inline_target,
            ),
            pass_budget: PASS_BUDGET,
            kicks_off: None,
            #[cfg(test)]
            passes: 0,
        }
    }

    /// Tells the worker its thread serves other queues too: it takes turns
    /// of one pass and leaves the ring watch to the thread.
    pub fn set_shares_thread(&mut self, shares: bool) {
        self.shares_thread = shares;
        self.mid_batch.set_shares_thread(shares);
    }

    /// Sets when inline completions go back to the guest during a batch.
    pub fn set_mid_batch(&mut self, mid_batch: MidBatch) {
        self.mid_batch = MidBatchChoice::new(mid_batch, self.inline_target);
        self.mid_batch.set_shares_thread(self.shares_thread);
    }

    /// The queue's counters.
    pub fn stats(&self) -> Arc<QueueStats> {
        self.stats.clone()
    }

    /// The target's event fd, for the worker's epoll.
    pub fn target_fd(&self) -> Option<std::os::fd::RawFd> {
        self.target.event_fd()
    }

    /// Whether the target completes requests as they are submitted.
    pub fn inline_target(&self) -> bool {
        self.inline_target
    }

    /// Requests handed to the target and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    fn alloc_slot(&mut self, e: InFlight) -> u64 {
        match self.free_slots.pop() {
            Some(i) => {
                self.slots[i] = Some(e);
                i as u64
            }
            None => {
                self.slots.push(Some(e));
                (self.slots.len() - 1) as u64
            }
        }
    }

    /// Handles a kick: takes every available request, submits them, completes
    /// what is done. Event-idx: notifications stay off while we work, and we
    /// re-check the ring after turning them back on so no kick is lost.
    ///
    /// The vring lock is held for one batch at a time: the rings are read
    /// through host pointers resolved once per batch ([`SplitRing`]), and the
    /// front-end's GET_VRING_BASE (which takes the lock) sees the indexes of
    /// a finished batch, never those of a half-popped one.
    ///
    /// Returns true when it stopped with requests waiting that no kick will
    /// announce: a worker that shares its thread does one pass per call, so
    /// that the thread's queues take turns, and its caller serves it again
    /// or calls [`QueueWorker::kick_self`].
    pub fn process_queue(&mut self, vring: &Vring, event_idx: bool) -> bool {
        if self.draining {
            return false;
        }
        let Some(mem) = self.mem.clone() else {
            warn!(
                "queue {}: kicked before the frontend sent its memory table",
                self.index
            );
            return false;
        };
        // One batch per pass, each with the current memory table and the
        // vring lock held for the pass only: a busy guest can keep this loop
        // going for a long time, and the front-end's GET_VRING_BASE (which
        // takes the lock) must get in between. The worker's own lock (which
        // the main thread takes for a new memory table, the inflight region,
        // a stop or a drain) is held by our caller for the whole call, so
        // the call ends after PASS_BUDGET with a kick to ourselves: the
        // event loop comes back here, and the main thread gets in between.
        let started = Instant::now();
        while self.process_batch(vring, &mem, event_idx) {
            if self.shares_thread {
                return true;
            }
            if started.elapsed() >= self.pass_budget {
                self.kick_self(vring);
                return false;
            }
        }
        false
    }

    /// Makes the queue's kick eventfd readable, as a guest kick does, so the
    /// event loop calls [`QueueWorker::process_queue`] again.
    pub fn kick_self(&self, vring: &Vring) {
        let state = vring.get_ref();
        let Some(kick) = state.get_kick() else {
            return;
        };
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer to the kick fd,
        // which `state` keeps open for the duration of the call.
        let n = unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if n != one.len() as isize {
            warn!(
                "queue {}: cannot re-arm the kick eventfd: {}",
                self.index,
                std::io::Error::last_os_error()
            );
        }
    }

    /// One pass of [`QueueWorker::process_queue`]: takes up to one ring's
    /// worth of requests, completes what is done, watches the ring for the
    /// poll window. True if more requests are waiting.
    fn process_batch(
        &mut self,
        vring: &Vring,
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
        event_idx: bool,
    ) -> bool {
        let snapshot = self.memory_snapshot(mem);
        let mut state = vring.get_mut();
        let mut ring = SplitRing::new(state.get_queue(), &snapshot);
        if std::mem::take(&mut self.recover_pending) {
            self.resubmit_inflight(&mut ring, &state, &snapshot);
        }
        // With event-idx, notifications need no disabling: the guest kicks
        // once per avail_event value, which only enable_notification moves.
        let first = ring.next_avail();
        let end = self.pop_and_submit(&mut ring, &state, &snapshot);
        self.mid_batch
            .took(ring.next_avail().wrapping_sub(first).into());
        self.complete(&mut ring, &state, &snapshot, false, None);
        #[cfg(test)]
        {
            self.passes += 1;
        }
        let more = if end == PopEnd::CutShort {
            true
        } else if end == PopEnd::Refused || !event_idx {
            // A stopped or broken ring: nothing to poll for; the next kick
            // (after the front-end restarts the queue) comes back here.
            false
        } else if self.shares_thread && !self.poll_window.is_zero() {
            // The thread watches this ring with its others and turns the
            // guest's kicks back on when its watch ends (`rearm`, called by
            // `BlkBackend::poll_thread_rings`): a guest that queues more
            // meanwhile need not kick. Re-arming after every pass cost the
            // client a kick for every other request (4 queues on 1 thread).
            if self.kicks_off.is_none() {
                self.kicks_off = Some(vring.clone());
            }
            false
        } else if self.ring_poll_window(&ring) {
            // Adaptive ring polling: a busy guest usually queues more within
            // a few microseconds; looking at the avail index for a short
            // window saves the kick (an eventfd write in the guest, a wake-up
            // and a read here). An idle queue pays one window per batch.
            true
        } else {
            match ring.enable_notification() {
                Ok(more) => more, // true: requests arrived meanwhile
                Err(e) => {
                    warn!("queue {}: cannot enable notifications: {e}", self.index);
                    false
                }
            }
        };
        ring.store_indexes(state.get_queue_mut());
        more
    }

    /// How long this queue's ring is watched after a batch ([`ring_poll`]).
    pub fn poll_window(&self) -> Duration {
        self.poll_window
    }

    /// Whether the guest made requests available that this worker would
    /// take (a cheap look for a thread that watches several rings): the
    /// queue is ready and the available index at most a ring ahead, the
    /// rules of [`SplitRing::has_available`].
    pub fn has_available(&self, vring: &Vring) -> bool {
        if self.draining {
            return false;
        }
        let Some(mem) = &self.mem else {
            return false;
        };
        let snapshot = mem.memory();
        let state = vring.get_ref();
        let q = state.get_queue();
        q.ready()
            && q.avail_idx(&*snapshot, Ordering::Acquire)
                .is_ok_and(|idx| servable(idx.0, q.next_avail(), q.size()))
    }

    /// Spins up to [`ring_poll`]'s window for new available descriptors;
    /// true if some came.
    fn ring_poll_window(&self, ring: &SplitRing) -> bool {
        let window = self.poll_window();
        // A thread that serves other queues too watches all their rings
        // (`BlkBackend::poll_thread_rings`), not this one alone, or their
        // kicks would wait while it spins.
        if window.is_zero() || self.shares_thread {
            return false;
        }
        let until = Instant::now() + window;
        loop {
            if ring.has_available().unwrap_or(false) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            spin_pause();
        }
    }

    /// Turns the guest's kicks back on if a pass left them off for the
    /// thread's watch (see `kicks_off`): when the watch ends, and when the
    /// front-end stops the ring (GET_VRING_BASE), which may come in the
    /// middle of a watch: a ring stopped with kicks off would, once started
    /// again, wait for a kick the guest never sends. True if requests
    /// arrived meanwhile, which no kick will announce (never on a stopped
    /// ring). Called with the worker locked, as every pass is: after the
    /// stop has re-armed, no pass can turn kicks off again, since a stopped
    /// ring gives nothing to pop.
    pub fn rearm(&mut self) -> bool {
        let Some(vring) = self.kicks_off.take() else {
            return false;
        };
        let Some(mem) = &self.mem else {
            return false;
        };
        let snapshot = mem.memory();
        // Exclusive, as for a pass: this writes the ring (avail_event).
        let state = vring.get_mut();
        let mut ring = SplitRing::new(state.get_queue(), &snapshot);
        match ring.enable_notification() {
            Ok(more) => more,
            Err(e) => {
                warn!("queue {}: cannot enable notifications: {e}", self.index);
                false
            }
        }
    }

    /// Handles the target's event fd: collects completions.
    pub fn process_target(&mut self, vring: &Vring) {
        let Some(mem) = self.mem.clone() else {
            return;
        };
        let snapshot = self.memory_snapshot(&mem);
        let mut state = vring.get_mut();
        let mut ring = SplitRing::new(state.get_queue(), &snapshot);
        self.complete(&mut ring, &state, &snapshot, true, None);
        ring.store_indexes(state.get_queue_mut());
    }

    /// Records the frontend's guest memory.
    pub fn set_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) {
        self.mem = Some(mem);
        // Regions the front-end removed must not stay mapped because an
        // idle queue still holds a copy of the old table.
        self.own_mem = None;
    }

    /// The current memory table as this worker's own copy ([`Self::own_mem`]).
    fn memory_snapshot(
        &mut self,
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> Arc<GuestMemoryMmap> {
        // A load guard, not a clone of the shared table's reference.
        let current = mem.memory();
        if let Some((from, own)) = &self.own_mem {
            // The Weak keeps the shared table's allocation, so its address
            // cannot be reused by a later table while it is compared.
            if std::ptr::eq(from.as_ptr(), &*current) {
                return own.clone();
            }
        }
        let own = Arc::new(GuestMemoryMmap::clone(&current));
        let from = Arc::downgrade(&current.into_inner());
        self.own_mem = Some((from, own.clone()));
        own
    }

    /// Attaches the queue's inflight tracker (SET_INFLIGHT_FD); the next kick
    /// first resubmits what a previous back-end left in flight.
    pub fn set_inflight(&mut self, tracker: Option<QueueInflight>) {
        self.recover_pending = tracker.is_some();
        self.inflight = tracker;
    }

    /// Stops taking new requests from the ring (in-flight ones still complete).
    pub fn start_draining(&mut self) {
        self.draining = true;
    }

    /// Takes and submits what the ring has, at most one ring's worth (a
    /// guest refilling as fast as we complete would otherwise keep one pass
    /// going without end).
    fn pop_and_submit(
        &mut self,
        ring: &mut SplitRing,
        state: &VringState,
        snapshot: &Arc<GuestMemoryMmap>,
    ) -> PopEnd {
        // One clock read per batch: latency is measured from the batch start.
        let batch_start = Instant::now();
        let inline_target = self.inline_target;
        let mid_batch = self.mid_batch.for_batch(batch_start);
        let mut since_complete = 0usize;
        // The time mid-batch completions are recorded at: read again once
        // at least CLOCK_EVERY requests went by (a read per completion cost
        // 7-9 % of the IOPS with completions after every request).
        let mut clock = batch_start;
        let mut since_clock = 0usize;
        for _ in 0..ring.size() {
            let parsed = match ring.pop() {
                Ok(Some(chain)) => parse_request(chain.head_index(), chain, snapshot, &self.limits),
                Ok(None) => return PopEnd::Drained,
                // Stopped by the front-end (GET_VRING_BASE): not news.
                Err(RingError::NotReady) => return PopEnd::Refused,
                Err(e) => {
                    if let Some(suppressed) = self.bad_input_log.allow() {
                        warn!(
                            "queue {}: cannot take requests from the ring: {e}{}",
                            self.index,
                            suppressed_note(suppressed)
                        );
                    }
                    return PopEnd::Refused;
                }
            };
            self.submit_parsed(ring, parsed, snapshot, batch_start);
            // A target that completes inline has finished these already:
            // hand them back while the rest of a deep batch is worked on, so
            // the guest reaps and refills in parallel instead of waiting for
            // the whole batch (the signal is still suppressed while the guest
            // is busy, by event-idx).
            since_complete += 1;
            since_clock += 1;
            if inline_target && since_complete == mid_batch {
                since_complete = 0;
                if since_clock >= CLOCK_EVERY {
                    since_clock = 0;
                    clock = Instant::now();
                }
                self.complete(ring, state, snapshot, false, Some(clock));
            }
        }
        PopEnd::CutShort
    }

    /// Re-reads the heads a previous back-end process had taken and not
    /// completed (recorded in the inflight region), submits them again in
    /// their original order, and moves the ring past them.
    fn resubmit_inflight(
        &mut self,
        ring: &mut SplitRing,
        state: &VringState,
        snapshot: &Arc<GuestMemoryMmap>,
    ) {
        let Some(tracker) = self.inflight.as_mut() else {
            return;
        };
        let (size, desc_table, used_idx) = {
            let q = state.get_queue();
            match ring.used_idx() {
                Ok(u) => (q.size(), q.desc_table(), u),
                Err(e) => {
                    warn!(
                        "queue {}: cannot read the used index, inflight requests not resubmitted: {e}",
                        self.index
                    );
                    return;
                }
            }
        };
        let heads = match tracker.recover(size, used_idx) {
            Ok(Recovery::InFlight(h)) => h,
            Ok(Recovery::Fresh) => {
                // A new region (first start, migration destination) knows
                // nothing: the frontend's SET_VRING_BASE stands. Rewinding to
                // the used index here would run again, into guest memory the
                // guest may have reused, any request the previous back-end
                // took and whose completion is not in the used ring.
                let base = ring.next_avail();
                if base != used_idx {
                    warn!(
                        "queue {}: the ring starts at avail index {base} with used index \
                         {used_idx}: {} request(s) taken by a previous back-end have no \
                         completion in the used ring; continuing from the frontend's index",
                        self.index,
                        base.wrapping_sub(used_idx)
                    );
                }
                return;
            }
            Err(e) => {
                warn!("{e}; continuing without resubmission");
                return;
            }
        };
        if heads.len() > usize::from(size) {
            warn!("queue {}: inflight region lists too many heads", self.index);
            return;
        }
        // Everything between the used index and used + in-flight was taken.
        ring.set_next_avail(used_idx.wrapping_add(heads.len() as u16));
        if heads.is_empty() {
            return;
        }
        let replay = match ReplayRing::new(snapshot, desc_table, size, &heads) {
            Ok(r) => r,
            Err(e) => {
                error!(
                    "queue {}: cannot rebuild {} inflight requests: {e}",
                    self.index,
                    heads.len()
                );
                return;
            }
        };
        let mut queue = replay.queue;
        let mut n = 0usize;
        let started = Instant::now();
        while let Some(chain) = queue.pop_descriptor_chain(&replay.mem) {
            let parsed = parse_request(chain.head_index(), chain, snapshot, &self.limits);
            self.submit_parsed(ring, parsed, snapshot, started);
            n += 1;
        }
        info!(
            "queue {}: resubmitted {n} inflight requests left by the previous back-end",
            self.index
        );
    }

    /// Hands one parsed request to the target (or answers it).
    fn submit_parsed(
        &mut self,
        ring: &mut SplitRing,
        parsed: ParsedRequest,
        snapshot: &Arc<GuestMemoryMmap>,
        batch_start: Instant,
    ) {
        if let Some(t) = self.inflight.as_mut() {
            t.popped(parsed.head_index);
        }
        let request = match parsed.request {
            Ok(r) => r,
            Err(e) => {
                self.stats.bad_requests.add(1);
                if let Some(suppressed) = self.bad_input_log.allow() {
                    warn!(
                        "queue {}: bad request from guest (descriptor {}): {e}{}",
                        self.index,
                        parsed.head_index,
                        suppressed_note(suppressed)
                    );
                }
                match parsed.status_addr {
                    Some(addr) => {
                        self.finish(ring, snapshot, parsed.head_index, addr, 1, e.status())
                    }
                    // No status byte: return the chain unanswered so the ring keeps moving.
                    None => self.add_used(ring, parsed.head_index, 0),
                }
                return;
            }
        };
        let Some(status_addr) = parsed.status_addr else {
            return; // parse_request never returns Ok without a status byte
        };
        match request {
            Request::GetId { data } => {
                data.write_at(0, &self.serial);
                self.log_data_in(snapshot, &parsed.data_in_ranges);
                self.stats.record_answer(StatOp::GetId, 0, VIRTIO_BLK_S_OK);
                self.finish(
                    ring,
                    snapshot,
                    parsed.head_index,
                    status_addr,
                    parsed.used_len,
                    VIRTIO_BLK_S_OK,
                );
            }
            Request::Block(mut req) => {
                if let BlockOp::Write { .. } = req.op {
                    if !self.writeback.load(Ordering::Relaxed) {
                        req.op = BlockOp::Write { fua: true };
                    }
                }
                let stat = StatStamp {
                    op: StatOp::of(&req.op),
                    bytes: req.data.len(),
                    started: batch_start,
                };
                self.stats.record_submit();
                let tag = self.alloc_slot(InFlight {
                    head_index: parsed.head_index,
                    status_addr,
                    used_len: parsed.used_len,
                    stat,
                    data_in: parsed.data_in_ranges,
                });
                // A target that serves requests at once does it through the
                // borrowed buffers: no reference count on the snapshot per
                // request (see GuestBuffers). Its completion is collected
                // with the target's own in `complete`. (Only inline targets
                // are asked: a network target's answer is always None.)
                if self.inline_target {
                    if let Some(status) = self.target.execute(&req) {
                        self.done.push(Completion { tag, status });
                        return;
                    }
                }
                self.target.submit(tag, req.into_owned());
            }
        }
    }

    /// Completes what the target has finished. `receive`: look for new
    /// completions (the target's fd fired); after submits only send. `at`:
    /// the time to record the completions at, if the caller has one; else
    /// the clock is read. An inline target's completions in the middle of
    /// a batch take a time read at most [`CLOCK_EVERY`] requests earlier.
    fn complete(
        &mut self,
        ring: &mut SplitRing,
        state: &VringState,
        snapshot: &GuestMemoryMmap,
        receive: bool,
        at: Option<Instant>,
    ) {
        let mut done = std::mem::take(&mut self.done);
        if receive {
            self.target.poll(&mut done);
        } else {
            self.target.send(&mut done);
        }
        if done.is_empty() {
            self.done = done;
            self.signal(ring, state);
            return;
        }
        let now = at.unwrap_or_else(Instant::now);
        for c in done.drain(..) {
            let Some(entry) = self.slots.get_mut(c.tag as usize).and_then(Option::take) else {
                error!(
                    "queue {}: target completed unknown tag {}",
                    self.index, c.tag
                );
                continue;
            };
            self.free_slots.push(c.tag as usize);
            let (status, len) = match c.status {
                BlockStatus::Ok => (VIRTIO_BLK_S_OK, entry.used_len),
                BlockStatus::IoError => (VIRTIO_BLK_S_IOERR, 1),
                BlockStatus::Unsupported => (VIRTIO_BLK_S_UNSUPP, 1),
            };
            self.stats.record_done(entry.stat, status, now);
            // The target wrote the data behind vm-memory's back (readv, RDMA,
            // copies): log it before the used entry tells the guest. Also on
            // errors, which may come after part of the data arrived.
            self.log_data_in(snapshot, &entry.data_in);
            self.finish(
                ring,
                snapshot,
                entry.head_index,
                entry.status_addr,
                len,
                status,
            );
        }
        self.done = done;
        self.signal(ring, state);
    }

    /// Marks `ranges` dirty in the frontend's log if it is logging (live
    /// migration); otherwise one relaxed load.
    fn log_data_in(&self, mem: &GuestMemoryMmap, ranges: &GuestRanges) {
        if ranges.is_empty() || !self.dirty_log.load(Ordering::Relaxed) {
            return;
        }
        for &(addr, len) in ranges {
            mark_dirty(mem, addr, u64::from(len));
        }
    }

    fn finish(
        &mut self,
        ring: &mut SplitRing,
        mem: &GuestMemoryMmap,
        head: u16,
        status_addr: GuestAddress,
        len: u32,
        status: u8,
    ) {
        if !write_byte(mem, status_addr, status) {
            // The guest changed its memory map under an in-flight request.
            warn!(
                "queue {}: cannot write status at {:#x}: not guest memory any more",
                self.index, status_addr.0
            );
        }
        self.add_used(ring, head, len);
    }

    fn add_used(&mut self, ring: &mut SplitRing, head: u16, len: u32) {
        if let Some(t) = &self.inflight {
            t.before_used(head);
        }
        match ring.add_used(head, len) {
            Ok(()) => self.unsignalled = self.unsignalled.wrapping_add(1),
            Err(e) => warn!(
                "queue {}: cannot add descriptor {head} to the used ring: {e}",
                self.index
            ),
        }
        if let Some(t) = &self.inflight {
            t.after_used(head, ring.next_used());
        }
    }

    /// One interrupt per batch, and only if the guest asked for it (event-idx).
    fn signal(&mut self, ring: &SplitRing, state: &VringState) {
        if self.unsignalled == 0 {
            return;
        }
        let added = std::mem::take(&mut self.unsignalled);
        match ring.needs_notification(added) {
            Ok(true) => {
                if let Err(e) = state.signal_used_queue() {
                    warn!("queue {}: cannot signal the guest: {e}", self.index);
                }
            }
            Ok(false) => {}
            Err(e) => warn!("queue {}: cannot check notification: {e}", self.index),
        }
    }
}

/// A private copy of a ring's avail side listing given heads, so the heads a
/// crashed back-end left in flight can be popped again through virtio-queue's
/// own (bounds-checked) descriptor walking. The descriptor table stays the
/// guest's; only the avail and used rings live in a scratch region placed
/// above the guest's memory in a private copy of the memory map.
struct ReplayRing {
    mem: GuestMemoryMmap,
    queue: Queue,
}

impl ReplayRing {
    fn new(
        guest: &GuestMemoryMmap,
        desc_table: u64,
        size: u16,
        heads: &[u16],
    ) -> Result<Self, String> {
        const PAGE: u64 = 4096;
        let avail_bytes = 6 + 2 * u64::from(size);
        let used_off = avail_bytes.div_ceil(4) * 4;
        let len = (used_off + 6 + 8 * u64::from(size)).div_ceil(PAGE) * PAGE;
        let base = guest
            .last_addr()
            .0
            .checked_add(1)
            .and_then(|a| a.checked_next_multiple_of(PAGE))
            .filter(|a| a.checked_add(len).is_some())
            .ok_or("no address space left above guest memory")?;
        let region = GuestRegionMmap::from_range(GuestAddress(base), len as usize, None)
            .map_err(|e| format!("scratch ring: {e}"))?;
        let mem = guest
            .insert_region(Arc::new(region))
            .map_err(|e| format!("scratch ring: {e}"))?;
        let avail = GuestAddress(base);
        let put = |off: u64, v: u16| {
            mem.write_obj(v.to_le(), avail.unchecked_add(off))
                .map_err(|e| format!("scratch ring: {e}"))
        };
        for (i, &h) in heads.iter().enumerate() {
            put(4 + 2 * i as u64, h)?;
        }
        put(2, heads.len() as u16)?;
        let mut queue = Queue::new(size).map_err(|e| format!("replay queue: {e}"))?;
        queue.set_size(size);
        queue
            .try_set_desc_table_address(GuestAddress(desc_table))
            .map_err(|e| format!("descriptor table: {e}"))?;
        queue
            .try_set_avail_ring_address(avail)
            .map_err(|e| format!("replay ring: {e}"))?;
        queue
            .try_set_used_ring_address(avail.unchecked_add(used_off))
            .map_err(|e| format!("replay ring: {e}"))?;
        queue.set_ready(true);
        Ok(ReplayRing { mem, queue })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::mem::MemTarget;
    use crate::blk::request::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use crate::blk::target::Target;
    use crate::vhost::inflight::InflightRegion;
    use vhost_user_backend::VringT;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const QSIZE: u16 = 16;

    /// A vring of QSIZE entries on the mock queue's rings, not yet ready.
    fn vring_on(
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
        vq: &MockSplitQueue<GuestMemoryMmap>,
    ) -> Vring {
        let vring = Vring::new(mem.clone(), QSIZE).unwrap();
        vring.set_queue_size(QSIZE);
        vring
            .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .unwrap();
        vring
    }

    fn hdr(at: u64) -> GuestAddress {
        GuestAddress(0x10000 + at * 0x100)
    }
    fn data(at: u64) -> GuestAddress {
        GuestAddress(0x20000 + at * 0x1000)
    }
    fn status(at: u64) -> GuestAddress {
        GuestAddress(0x30000 + at)
    }

    /// Request `i` (descriptors 3i..3i+2, head 3i): `ty` on sector `i`.
    fn chain(m: &GuestMemoryMmap, i: u16, ty: u32) -> [RawDescriptor; 3] {
        let n = u64::from(i);
        m.write_obj(ty, hdr(n)).unwrap();
        m.write_obj(0u32, hdr(n).unchecked_add(4)).unwrap();
        m.write_obj(n, hdr(n).unchecked_add(8)).unwrap();
        m.write_obj(0xEEu8, status(n)).unwrap();
        let data_flags = if ty == VIRTIO_BLK_T_IN { F_WRITE } else { 0 };
        [
            RawDescriptor::from(SplitDescriptor::new(hdr(n).0, 16, F_NEXT, 3 * i + 1)),
            RawDescriptor::from(SplitDescriptor::new(
                data(n).0,
                512,
                F_NEXT | data_flags,
                3 * i + 2,
            )),
            RawDescriptor::from(SplitDescriptor::new(status(n).0, 1, F_WRITE, 0)),
        ]
    }

    fn worker(mem: &GuestMemoryAtomic<GuestMemoryMmap>) -> QueueWorker {
        let target = MemTarget::new(1 << 20, false);
        let limits = Arc::new(RequestLimits {
            capacity_sectors: crate::blk::target::SharedCapacity::new(2048),
            seg_max: 8,
            read_only: false,
            discard: None,
            write_zeroes: None,
        });
        let mut w = QueueWorker::new(
            0,
            target.open_queue(0).unwrap(),
            limits,
            b"serial",
            Arc::new(AtomicBool::new(true)),
            Arc::new(AtomicBool::new(false)),
        );
        w.set_memory(mem.clone());
        w
    }

    fn used_elem(m: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>, i: u64) -> u32 {
        m.read_obj::<u32>(vq.used_addr().unchecked_add(4 + 8 * i))
            .unwrap()
    }

    /// Three valid reads (heads 0, 3, 6) and seven chains of a lone status
    /// byte (heads 9..=15, refused with IOERR), on rings of our own: the
    /// mock's rings have room for 8 available entries only (its used ring
    /// starts after them).
    fn mixed_ring(gm: &GuestMemoryMmap) -> (Vring, GuestAddress, GuestAddress, [u16; 10]) {
        let vq = MockSplitQueue::new(gm, QSIZE);
        let mut descs = Vec::new();
        for i in 0..3 {
            descs.extend(chain(gm, i, VIRTIO_BLK_T_IN));
        }
        for i in 9..16u64 {
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                status(i).0,
                1,
                F_WRITE,
                0,
            )));
        }
        vq.add_desc_chains(&descs, 0).unwrap();
        let (avail, used) = (GuestAddress(0x1000), GuestAddress(0x2000));
        let mem = GuestMemoryAtomic::new(gm.clone());
        let vring = vring_on(&mem, &vq);
        vring
            .set_queue_info(vq.desc_table_addr().0, avail.0, used.0)
            .unwrap();
        vring.set_queue_event_idx(true);
        vring.set_queue_ready(true);
        (vring, avail, used, [0, 3, 6, 9, 10, 11, 12, 13, 14, 15])
    }

    /// Fills the available ring with QSIZE heads, taken in turn from `heads`
    /// starting `skip` entries in, and sets the available index to `idx`.
    fn offer_full_ring(
        gm: &GuestMemoryMmap,
        avail: GuestAddress,
        heads: &[u16],
        skip: usize,
        idx: u16,
    ) {
        for k in 0..QSIZE {
            let head = heads[(skip + usize::from(k)) % heads.len()];
            gm.write_obj(head, avail.unchecked_add(4 + 2 * u64::from(k)))
                .unwrap();
        }
        gm.write_obj(idx, avail.unchecked_add(2)).unwrap();
    }

    /// The cadence trial of a worker with the automatic rule counts every
    /// request a pass takes (its rates are requests per second), and the
    /// pass gives every request its completion whatever the cadence.
    #[test]
    fn the_cadence_trial_counts_every_request_taken() {
        let gm = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let (vring, avail, used, heads) = mixed_ring(&gm);
        let mem = GuestMemoryAtomic::new(gm.clone());
        let mut w = worker(&mem);
        w.set_mid_batch(MidBatch::WhileACpuIsFree {
            running: Arc::new(crate::vhost::mid_batch::RunningWorkers::default()),
            cpus: 2,
        });
        offer_full_ring(&gm, avail, &heads, 0, QSIZE);
        w.process_queue(&vring, true);
        assert_eq!(w.mid_batch.counted(), u64::from(QSIZE));
        let used_idx: u16 = gm.read_obj(used.unchecked_add(2)).unwrap();
        assert_eq!(used_idx, QSIZE);
        assert_eq!(w.in_flight(), 0);
    }

    /// A worker copies the shared memory table once per table, takes a new
    /// copy when the table changes, and lets go of it on set_memory.
    #[test]
    fn the_worker_copies_the_memory_table_once_per_change() {
        let gm = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let mem = GuestMemoryAtomic::new(gm);
        let mut w = worker(&mem);
        let a = w.memory_snapshot(&mem);
        let b = w.memory_snapshot(&mem);
        // One copy per table, and not the shared one.
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!std::ptr::eq(Arc::as_ptr(&a), &*mem.memory()));
        assert_eq!(a.num_regions(), 1);

        // The front-end adds a region: the handler swaps the shared table
        // (and then calls set_memory, below).
        let bigger = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x100000),
            (GuestAddress(0x200000), 0x10000),
        ])
        .unwrap();
        mem.lock().unwrap().replace(bigger);
        let c = w.memory_snapshot(&mem);
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(c.num_regions(), 2);
        assert!(c.address_in_range(GuestAddress(0x200000)));

        // set_memory lets go of the copy: an idle worker keeps no removed
        // region mapped. A request in flight keeps the table it was parsed
        // against (here `a`).
        let weak_c = Arc::downgrade(&c);
        drop(c);
        w.set_memory(mem.clone());
        assert!(weak_c.upgrade().is_none());
        assert_eq!(a.num_regions(), 1);
        let d = w.memory_snapshot(&mem);
        assert_eq!(d.num_regions(), 2);
    }

    /// Full rings (16 entries at once, twice, the second round wrapping the
    /// ring) are served completely, each entry once, in passes of at most one
    /// ring's worth: two passes per round (the full ring, then the empty
    /// one that re-arms notifications).
    #[test]
    fn full_rings_are_served_in_bounded_passes() {
        let gm = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let (vring, avail, used, heads) = mixed_ring(&gm);
        let mem = GuestMemoryAtomic::new(gm.clone());
        let mut w = worker(&mem);
        // Counted passes: a pass preempted past the 2 ms budget would end
        // the call early (seen once, on a loaded machine).
        w.pass_budget = Duration::from_secs(60);
        let mut n = 0u64;
        for round in 1..=2u16 {
            offer_full_ring(&gm, avail, &heads, n as usize, round * QSIZE);
            w.process_queue(&vring, true);
            assert_eq!(w.passes, 2 * usize::from(round), "round {round}");
            assert_eq!(vring.queue_next_avail(), round * QSIZE, "round {round}");
            let used_idx: u16 = gm.read_obj(used.unchecked_add(2)).unwrap();
            assert_eq!(used_idx, round * QSIZE, "round {round}");
            // Refused chains are answered at once, reads when the target
            // completes them: the same entries, not in the same order.
            let mut want: Vec<[u32; 2]> = (0..u64::from(QSIZE))
                .map(|i| {
                    let head = heads[(n + i) as usize % heads.len()];
                    [u32::from(head), if head < 9 { 513 } else { 1 }]
                })
                .collect();
            let mut got: Vec<[u32; 2]> = (0..u64::from(QSIZE))
                .map(|i| gm.read_obj(used.unchecked_add(4 + 8 * i)).unwrap())
                .collect();
            want.sort_unstable();
            got.sort_unstable();
            assert_eq!(got, want, "round {round}");
            n += u64::from(QSIZE);
            // Notifications re-armed where the device stands (avail_event).
            let avail_event: u16 = gm.read_obj(used.unchecked_add(4 + 8 * 16)).unwrap();
            assert_eq!(avail_event, round * QSIZE);
        }
        assert_eq!(gm.read_obj::<u8>(status(0)).unwrap(), VIRTIO_BLK_S_OK);
        assert_eq!(gm.read_obj::<u8>(status(9)).unwrap(), VIRTIO_BLK_S_IOERR);
        assert_eq!(w.in_flight(), 0);
    }

    /// Requests the guest queues while the worker watches its ring are
    /// served (a pass whose poll found work goes on, or, past the pass
    /// budget, the worker kicks itself and the event loop brings it back),
    /// and serving ends with notifications re-armed behind them.
    #[test]
    fn requests_found_by_the_ring_poll_are_served() {
        use std::os::fd::{FromRawFd, IntoRawFd};
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let gm = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let (vring, avail, used, heads) = mixed_ring(&gm);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        // SAFETY: the fd is a fresh duplicate that the File takes over.
        let file = unsafe { std::fs::File::from_raw_fd(kick.try_clone().unwrap().into_raw_fd()) };
        vring.set_kick(Some(file));
        let put = |k: u16| {
            let head = heads[usize::from(k) % heads.len()];
            gm.write_obj(head, avail.unchecked_add(4 + 2 * u64::from(k % QSIZE)))
                .unwrap();
        };
        for k in 0..4 {
            put(k);
        }
        gm.write_obj(4u16, avail.unchecked_add(2)).unwrap();
        let mem = GuestMemoryAtomic::new(gm.clone());
        let mut w = worker(&mem);
        // Long enough for the other thread to queue more after the first
        // batch, whatever the machine's load.
        w.poll_window = Duration::from_secs(2);
        let v = vring.clone();
        let worker_thread = std::thread::spawn(move || {
            // The event loop: serve, and again while the kick fd is set.
            let mut calls = 0;
            loop {
                w.process_queue(&v, true);
                calls += 1;
                if kick.read().is_err() {
                    break;
                }
            }
            (w.passes, calls)
        });
        let used_idx = || gm.read_obj::<u16>(used.unchecked_add(2)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while used_idx() < 4 {
            assert!(Instant::now() < deadline, "first batch not served");
            std::thread::yield_now();
        }
        for k in 4..9 {
            put(k);
        }
        gm.write_obj(9u16, avail.unchecked_add(2)).unwrap();
        let (passes, calls) = worker_thread.join().unwrap();
        assert_eq!(used_idx(), 9, "requests queued during the poll window");
        assert_eq!(vring.queue_next_avail(), 9);
        assert!(passes >= 2, "{passes} passes in {calls} calls");
        let avail_event: u16 = gm.read_obj(used.unchecked_add(4 + 8 * 16)).unwrap();
        assert_eq!(avail_event, 9, "notifications re-armed at the end");
    }

    /// A worker that shares its thread takes one pass per call, so the
    /// thread's queues take turns, and says when it left requests waiting.
    #[test]
    fn a_worker_sharing_its_thread_takes_turns() {
        let gm = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let (vring, avail, used, heads) = mixed_ring(&gm);
        for k in 0..QSIZE {
            gm.write_obj(
                heads[usize::from(k) % heads.len()],
                avail.unchecked_add(4 + 2 * u64::from(k)),
            )
            .unwrap();
        }
        gm.write_obj(QSIZE, avail.unchecked_add(2)).unwrap();
        let mem = GuestMemoryAtomic::new(gm.clone());
        let mut w = worker(&mem);
        w.set_shares_thread(true);
        // One ring's worth, then back to the caller with more possibly waiting.
        assert!(w.process_queue(&vring, true));
        assert_eq!(w.passes, 1);
        assert_eq!(gm.read_obj::<u16>(used.unchecked_add(2)).unwrap(), QSIZE);
        // The next turn finds the ring empty and leaves the guest's kicks
        // off: the thread watches the ring.
        assert!(!w.process_queue(&vring, true));
        assert_eq!(w.passes, 2);
        let avail_event = || gm.read_obj::<u16>(used.unchecked_add(4 + 8 * 16)).unwrap();
        assert_eq!(avail_event(), 0, "kicks stay off during the thread's watch");
        // The watch ends: kicks back on where the device stands, and a
        // request queued meanwhile is reported (no kick will announce it).
        gm.write_obj(heads[0], avail.unchecked_add(4)).unwrap();
        gm.write_obj(QSIZE + 1, avail.unchecked_add(2)).unwrap();
        assert!(w.rearm(), "a request queued during the watch");
        assert_eq!(avail_event(), QSIZE);
        assert!(!w.rearm(), "re-armed once per watch");
        assert!(!w.process_queue(&vring, true));
        assert_eq!(
            gm.read_obj::<u16>(used.unchecked_add(2)).unwrap(),
            QSIZE + 1
        );
        assert!(!w.rearm());
        assert_eq!(avail_event(), QSIZE + 1);
        // The front-end stops the ring in the middle of a watch: the stop
        // re-arms (a restarted ring must not wait for a kick that never
        // comes), and a stopped ring reports nothing to serve.
        gm.write_obj(heads[1], avail.unchecked_add(4 + 2)).unwrap();
        gm.write_obj(QSIZE + 2, avail.unchecked_add(2)).unwrap();
        assert!(!w.process_queue(&vring, true));
        assert_eq!(avail_event(), QSIZE + 1, "kicks off during the watch");
        vring.set_queue_ready(false);
        assert!(!w.rearm(), "nothing to serve on a stopped ring");
        assert_eq!(avail_event(), QSIZE + 2);
    }

    /// Runs `f` on a thread; false if it has not returned within 5 s.
    fn returns_in_time(f: impl FnOnce() + Send + 'static) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            f();
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(5)).is_ok()
    }

    /// A kick on a ring the worker must not serve (set up by `spoil`)
    /// returns after one pass, takes nothing and answers nothing.
    fn one_pass_takes_nothing(spoil: impl FnOnce(&GuestMemoryMmap, GuestAddress, &Vring)) {
        let gm = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let (vring, avail, used, _) = mixed_ring(&gm);
        spoil(&gm, avail, &vring);
        let mem = GuestMemoryAtomic::new(gm.clone());
        let mut w = worker(&mem);
        let v = vring.clone();
        assert!(
            returns_in_time(move || {
                w.process_queue(&v, true);
                // One pass, not a spin cut short by the pass budget.
                assert_eq!(w.passes, 1);
                assert!(!w.has_available(&v));
            }),
            "process_queue spins on the ring"
        );
        assert_eq!(gm.read_obj::<u16>(used.unchecked_add(2)).unwrap(), 0);
        assert_eq!(vring.queue_next_avail(), 0);
    }

    /// A guest whose available index runs more than a ring ahead is not
    /// served, and the worker does not spin on it (with event-idx, the ring
    /// poll and the re-arm saw "more" on every pass and never returned).
    #[test]
    fn runaway_avail_index_is_refused_without_spinning() {
        one_pass_takes_nothing(|gm, avail, _| {
            gm.write_obj(QSIZE + 1, avail.unchecked_add(2)).unwrap();
        });
    }

    /// A kick that arrives after the front-end stopped the ring (ready
    /// false, entries still available) returns at once and takes nothing.
    #[test]
    fn stopped_ring_with_entries_is_left_alone() {
        one_pass_takes_nothing(|gm, avail, vring| {
            gm.write_obj(0u16, avail.unchecked_add(4)).unwrap();
            gm.write_obj(1u16, avail.unchecked_add(2)).unwrap();
            vring.set_queue_ready(false);
        });
    }

    /// A "previous back-end" took three writes and completed only the
    /// middle one; the new worker resubmits the other two (in pop order),
    /// does not re-run the completed one, and continues the ring after them.
    #[test]
    fn resubmits_inflight_heads_then_continues_the_ring() {
        let gm = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let vq = MockSplitQueue::new(&gm, QSIZE);
        let mut descs = Vec::new();
        for i in 0..3 {
            gm.write_slice(&[0xA0 + i as u8; 512], data(u64::from(i)))
                .unwrap();
            descs.extend(chain(&gm, i, VIRTIO_BLK_T_OUT));
        }
        vq.add_desc_chains(&descs, 0).unwrap();

        let (file, len) = InflightRegion::create(1, QSIZE, 1).unwrap();
        let region = InflightRegion::open(&file, 0, len, 1, QSIZE, 1).unwrap();
        {
            let mut old = region.queue_tracker(0).unwrap();
            assert_eq!(old.recover(QSIZE, 0).unwrap(), Recovery::Fresh);
            for head in [0, 3, 6] {
                old.popped(head);
            }
            // head 3 completed: used elem 0 = head 3, used idx 1
            old.before_used(3);
            gm.write_obj(3u32, vq.used_addr().unchecked_add(4)).unwrap();
            gm.write_obj(1u16, vq.used_addr().unchecked_add(2)).unwrap();
            old.after_used(3, 1);
            gm.write_obj(VIRTIO_BLK_S_OK, status(1)).unwrap();
        }

        let mem = GuestMemoryAtomic::new(gm.clone());
        let vring = vring_on(&mem, &vq);
        // QEMU rewinds to the used index when the back-end died.
        vring.set_queue_next_avail(1);
        vring.set_queue_next_used(1);
        vring.set_queue_ready(true);

        let mut w = worker(&mem);
        w.set_inflight(region.queue_tracker(0));
        w.process_queue(&vring, false);

        assert_eq!(
            vring.queue_next_avail(),
            3,
            "ring continues after the replayed heads"
        );
        let used_idx: u16 = gm.read_obj(vq.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(used_idx, 3);
        assert_eq!(used_elem(&gm, &vq, 1), 0, "oldest in-flight head first");
        assert_eq!(used_elem(&gm, &vq, 2), 6);
        for i in 0..3 {
            assert_eq!(gm.read_obj::<u8>(status(i)).unwrap(), VIRTIO_BLK_S_OK);
        }
        // Nothing is left in flight in the region.
        let mut again = region.queue_tracker(0).unwrap();
        assert!(again.recover(QSIZE, 3).unwrap().heads().is_empty());

        // The ring goes on: a read of sector 2 returns what head 6 wrote.
        vq.add_desc_chains(&chain(&gm, 3, VIRTIO_BLK_T_IN), 9)
            .unwrap();
        gm.write_obj(2u64, hdr(3).unchecked_add(8)).unwrap();
        w.process_queue(&vring, false);
        assert_eq!(gm.read_obj::<u8>(status(3)).unwrap(), VIRTIO_BLK_S_OK);
        let mut back = [0u8; 512];
        gm.read_slice(&mut back, data(3)).unwrap();
        assert_eq!(back, [0xA2; 512]);
    }

    /// A fresh region (a migration destination's) knows nothing: the ring
    /// continues at the frontend's SET_VRING_BASE even when the used index
    /// lags behind it. Rewinding to the used index would run a request the
    /// source already took again, writing into a buffer the guest may have
    /// reused (seen as a destination guest oops before this was fixed).
    #[test]
    fn fresh_region_keeps_the_frontends_ring_base() {
        let gm = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let vq = MockSplitQueue::new(&gm, QSIZE);
        let mut descs = Vec::new();
        for i in 0..2 {
            gm.write_slice(&[0xB0 + i as u8; 512], data(u64::from(i)))
                .unwrap();
            descs.extend(chain(&gm, i, VIRTIO_BLK_T_OUT));
        }
        vq.add_desc_chains(&descs, 0).unwrap();
        let (file, len) = InflightRegion::create(1, QSIZE, 1).unwrap();
        let region = InflightRegion::open(&file, 0, len, 1, QSIZE, 1).unwrap();

        let mem = GuestMemoryAtomic::new(gm.clone());
        let vring = vring_on(&mem, &vq);
        // The source took request 0 (used index still 0 in guest memory);
        // the frontend hands over avail index 1.
        vring.set_queue_next_avail(1);
        vring.set_queue_next_used(0);
        vring.set_queue_ready(true);

        let mut w = worker(&mem);
        w.set_inflight(region.queue_tracker(0));
        w.process_queue(&vring, false);

        assert_eq!(vring.queue_next_avail(), 2, "only request 1 was run");
        assert_eq!(gm.read_obj::<u8>(status(1)).unwrap(), VIRTIO_BLK_S_OK);
        assert_ne!(
            gm.read_obj::<u8>(status(0)).unwrap(),
            VIRTIO_BLK_S_OK,
            "request 0 belongs to the source and must not run again"
        );
        let used_idx: u16 = gm.read_obj(vq.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(used_idx, 1);
        assert_eq!(used_elem(&gm, &vq, 0), 3, "head of request 1");
    }

    /// Heads the region claims in flight whose descriptors are garbage are
    /// answered like any bad request: no panic, the ring keeps moving.
    #[test]
    fn garbage_inflight_heads_are_answered_not_trusted() {
        let gm = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let vq = MockSplitQueue::new(&gm, QSIZE);
        gm.write_slice(&[0x55; 512], data(0)).unwrap();
        vq.add_desc_chains(&chain(&gm, 0, VIRTIO_BLK_T_OUT), 0)
            .unwrap();
        // descriptor 12: points outside guest memory, no status byte
        vq.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                0xFFFF_0000_0000,
                64,
                0,
                0,
            ))],
            12,
        )
        .unwrap();

        let (file, len) = InflightRegion::create(1, QSIZE, 1).unwrap();
        let region = InflightRegion::open(&file, 0, len, 1, QSIZE, 1).unwrap();
        {
            let mut old = region.queue_tracker(0).unwrap();
            old.recover(QSIZE, 0).unwrap();
            old.popped(12);
            old.popped(0);
            old.popped(15); // never a chain: an all-zero descriptor
        }
        let mem = GuestMemoryAtomic::new(gm.clone());
        let vring = vring_on(&mem, &vq);
        vring.set_queue_ready(true);
        let mut w = worker(&mem);
        w.set_inflight(region.queue_tracker(0));
        w.process_queue(&vring, false);
        let used_idx: u16 = gm.read_obj(vq.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(used_idx, 3, "every replayed head is answered");
        assert_eq!(gm.read_obj::<u8>(status(0)).unwrap(), VIRTIO_BLK_S_OK);
        assert_eq!(vring.queue_next_avail(), 3);
    }

    /// A dirty log plugged into every region of `mem`, as SET_LOG_BASE does;
    /// returns the log file (one bit per 4 KiB page).
    fn plug_log(mem: &GuestMemoryMmap) -> std::fs::File {
        use std::os::fd::AsFd;
        use vhost_user_backend::bitmap::{
            AtomicBitmapMmap, BitmapReplace, MemRegionBitmap, MmapLogReg,
        };
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();
        let log = Arc::new(MmapLogReg::from_file(file.as_fd(), 0, 4096).unwrap());
        for region in mem.iter() {
            let bitmap = AtomicBitmapMmap::new(region, log.clone()).unwrap();
            vm_memory::MmapRegion::bitmap(region).replace(bitmap);
        }
        file
    }

    /// Pages whose bit is set in the log, clearing them (as the frontend's sync does).
    fn take_dirty_pages(log: &std::fs::File) -> Vec<u64> {
        use std::os::unix::fs::FileExt;
        let mut bits = [0u8; 4096];
        log.read_exact_at(&mut bits, 0).unwrap();
        log.write_all_at(&[0u8; 4096], 0).unwrap();
        let mut pages = Vec::new();
        for (i, byte) in bits.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    pages.push((i * 8 + bit) as u64);
                }
            }
        }
        pages
    }

    /// A read of two sectors into a buffer that straddles pages 0x20/0x21.
    fn straddling_read(gm: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>, first: u16) {
        gm.write_obj(VIRTIO_BLK_T_IN, hdr(0)).unwrap();
        gm.write_obj(0u32, hdr(0).unchecked_add(4)).unwrap();
        gm.write_obj(0u64, hdr(0).unchecked_add(8)).unwrap();
        vq.add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(hdr(0).0, 16, F_NEXT, first + 1)),
                RawDescriptor::from(SplitDescriptor::new(
                    0x20e00,
                    0x400,
                    F_NEXT | F_WRITE,
                    first + 2,
                )),
                RawDescriptor::from(SplitDescriptor::new(status(0).0, 1, F_WRITE, 0)),
            ],
            first,
        )
        .unwrap();
    }

    /// While the frontend logs (live migration), a read marks exactly the
    /// pages the device wrote: the two data pages (written by the target
    /// behind vm-memory), the status byte's and the used ring's (vm-memory),
    /// not the header's or any other; once logging stops nothing is marked.
    #[test]
    fn dirty_log_marks_exactly_the_pages_written() {
        let gm = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let vq = MockSplitQueue::new(&gm, QSIZE);
        // The ring lives in page 0 (descriptors, avail and used rings).
        assert!(vq.used_addr().0 < 0x1000);
        straddling_read(&gm, &vq, 0);
        let log = plug_log(&gm);
        assert!(take_dirty_pages(&log).is_empty());

        let mem = GuestMemoryAtomic::new(gm.clone());
        let vring = vring_on(&mem, &vq);
        vring.set_queue_ready(true);
        let mut w = worker(&mem);
        w.dirty_log.store(true, Ordering::Relaxed);
        w.process_queue(&vring, false);
        assert_eq!(gm.read_obj::<u8>(status(0)).unwrap(), VIRTIO_BLK_S_OK);
        assert_eq!(take_dirty_pages(&log), vec![0, 0x20, 0x21, 0x30]);

        // Without the worker's flag only vm-memory's own writes are logged:
        // the data marks above came from the completion path.
        w.dirty_log.store(false, Ordering::Relaxed);
        straddling_read(&gm, &vq, 3);
        take_dirty_pages(&log);
        w.process_queue(&vring, false);
        assert_eq!(take_dirty_pages(&log), vec![0, 0x30]);

        // Logging stopped (SET_FEATURES without LOG_ALL): nothing is marked.
        for region in gm.iter() {
            use vhost_user_backend::bitmap::BitmapReplace;
            vm_memory::MmapRegion::bitmap(region).clear();
        }
        straddling_read(&gm, &vq, 6);
        take_dirty_pages(&log);
        w.dirty_log.store(true, Ordering::Relaxed);
        w.process_queue(&vring, false);
        assert_eq!(
            gm.read_obj::<u16>(vq.used_addr().unchecked_add(2)).unwrap(),
            3
        );
        assert!(take_dirty_pages(&log).is_empty());
    }

    /// GET_ID's serial is copied through a host pointer: logged too.
    #[test]
    fn dirty_log_marks_get_id() {
        let gm = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let vq = MockSplitQueue::new(&gm, QSIZE);
        gm.write_obj(crate::blk::request::VIRTIO_BLK_T_GET_ID, hdr(0))
            .unwrap();
        vq.add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(hdr(0).0, 16, F_NEXT, 1)),
                RawDescriptor::from(SplitDescriptor::new(0x45ff8, 20, F_NEXT | F_WRITE, 2)),
                RawDescriptor::from(SplitDescriptor::new(status(0).0, 1, F_WRITE, 0)),
            ],
            0,
        )
        .unwrap();
        let log = plug_log(&gm);
        let mem = GuestMemoryAtomic::new(gm.clone());
        let vring = vring_on(&mem, &vq);
        vring.set_queue_ready(true);
        let mut w = worker(&mem);
        w.dirty_log.store(true, Ordering::Relaxed);
        w.process_queue(&vring, false);
        let mut serial = [0u8; 6];
        gm.read_slice(&mut serial, GuestAddress(0x45ff8)).unwrap();
        assert_eq!(&serial, b"serial");
        assert_eq!(take_dirty_pages(&log), vec![0, 0x30, 0x45, 0x46]);
    }
}
