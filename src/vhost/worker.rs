//! The per-queue worker: pops requests, hands them to the queue's target,
//! completes them into the used ring and notifies the guest once per batch.
//!
//! Each virtqueue has exactly one worker, run by its own thread (the epoll
//! thread vhost-user-backend creates for it), so nothing here is shared
//! between queues.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use crate::blk::buffer::GuestMemoryMmap;
use crate::blk::request::{
    parse_request, Request, RequestLimits, ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
};
use crate::blk::target::{BlockOp, BlockStatus, Completion, QueueTarget};
use crate::metrics::{self, LatencyHistogram, StatOp, StatStamp};

/// Counters of one queue, written by its worker only and readable from
/// other threads (metrics); atomics, no locks.
#[derive(Default, Debug)]
pub struct QueueStats {
    /// Completed requests by [`StatOp`] and status (see [`metrics::STATUS_NAMES`]).
    requests: [[AtomicU64; 3]; StatOp::ALL.len()],
    /// Chains refused as malformed.
    pub bad_requests: AtomicU64,
    /// Bytes read by the guest (successful requests).
    pub read_bytes: AtomicU64,
    /// Bytes written by the guest (successful requests).
    pub write_bytes: AtomicU64,
    /// Requests handed to the target and not completed yet.
    pub in_flight: AtomicU64,
    /// Time from taking a request off the ring to its completion.
    pub latency: LatencyHistogram,
}

impl QueueStats {
    /// Completed requests of `op` with status index `status` (0 ok, 1 ioerr, 2 unsupp).
    pub fn requests(&self, op: StatOp, status: usize) -> u64 {
        self.requests[op as usize]
            .get(status)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// A request was handed to the target.
    pub fn record_submit(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request handed to the target completed with virtio-blk `status`
    /// (`now`: read once per batch of completions, clock reads are not free).
    pub fn record_done(&self, stamp: StatStamp, status: u8, now: Instant) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.latency
            .observe(now.saturating_duration_since(stamp.started));
        self.record_answer(stamp.op, stamp.bytes, status);
    }

    /// A request was answered (by the target or by the backend itself).
    pub fn record_answer(&self, op: StatOp, bytes: u64, status: u8) {
        self.requests[op as usize][metrics::status_index(status)].fetch_add(1, Ordering::Relaxed);
        if status == VIRTIO_BLK_S_OK {
            match op {
                StatOp::Read => self.read_bytes.fetch_add(bytes, Ordering::Relaxed),
                StatOp::Write => self.write_bytes.fetch_add(bytes, Ordering::Relaxed),
                _ => 0,
            };
        }
    }
}

/// A request handed to the target, waiting for its completion.
struct InFlight {
    head_index: u16,
    status_addr: GuestAddress,
    used_len: u32,
    stat: StatStamp,
}

/// Limits the log lines a misbehaving guest can cause: a burst, then one line
/// per interval with the count of suppressed ones.
struct LogLimiter {
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
}

impl LogLimiter {
    const BURST: u32 = 10;
    const WINDOW: Duration = Duration::from_secs(5);

    fn new() -> Self {
        LogLimiter {
            window_start: Instant::now(),
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Returns Some(number of lines suppressed before this one) if a line may be logged.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if now.duration_since(self.window_start) > Self::WINDOW {
            self.window_start = now;
            self.in_window = 0;
        }
        if self.in_window < Self::BURST {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// One virtqueue's worker state.
pub struct QueueWorker {
    index: usize,
    target: Box<dyn QueueTarget>,
    limits: Arc<RequestLimits>,
    serial: [u8; ID_BYTES],
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    done: Vec<Completion>,
    bad_input_log: LogLimiter,
    /// When set, no new requests are taken from the ring (shutdown drain).
    draining: bool,
    /// The guest's write cache setting (CONFIG_WCE), shared with the backend.
    writeback: Arc<AtomicBool>,
    /// Used entries were added since the last interrupt decision.
    pending_signal: bool,
    /// Guest memory, set when the frontend sends its memory table.
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    stats: Arc<QueueStats>,
}

impl QueueWorker {
    /// A worker for queue `index`, driving `target`.
    pub fn new(
        index: usize,
        target: Box<dyn QueueTarget>,
        limits: Arc<RequestLimits>,
        serial: &[u8],
        writeback: Arc<AtomicBool>,
    ) -> Self {
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
            pending_signal: false,
            mem: None,
            stats: Arc::new(QueueStats::default()),
        }
    }

    /// The queue's counters.
    pub fn stats(&self) -> Arc<QueueStats> {
        self.stats.clone()
    }

    /// The target's event fd, for the worker's epoll.
    pub fn target_fd(&self) -> Option<std::os::fd::RawFd> {
        self.target.event_fd()
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
    pub fn process_queue(&mut self, vring: &VringRwLock, event_idx: bool) {
        if self.draining {
            return;
        }
        let Some(mem) = self.mem.clone() else {
            warn!(
                "queue {}: kicked before the frontend sent its memory table",
                self.index
            );
            return;
        };
        let mem = &mem;
        loop {
            if event_idx {
                if let Err(e) = vring.disable_notification() {
                    warn!("queue {}: cannot disable notifications: {e}", self.index);
                }
            }
            self.pop_and_submit(vring, mem);
            self.complete(vring, mem);
            if !event_idx {
                break;
            }
            match vring.enable_notification() {
                Ok(true) => continue, // more requests arrived meanwhile
                Ok(false) => break,
                Err(e) => {
                    warn!("queue {}: cannot enable notifications: {e}", self.index);
                    break;
                }
            }
        }
    }

    /// Handles the target's event fd: collects completions.
    pub fn process_target(&mut self, vring: &VringRwLock) {
        let Some(mem) = self.mem.clone() else {
            return;
        };
        self.complete(vring, &mem);
    }

    /// Records the frontend's guest memory.
    pub fn set_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) {
        self.mem = Some(mem);
    }

    /// Stops taking new requests from the ring (in-flight ones still complete).
    pub fn start_draining(&mut self) {
        self.draining = true;
    }

    fn pop_and_submit(&mut self, vring: &VringRwLock, mem: &GuestMemoryAtomic<GuestMemoryMmap>) {
        let guard = mem.memory();
        let snapshot: Arc<GuestMemoryMmap> = guard.into_inner();
        let batch_start = Instant::now();
        loop {
            let chain = {
                let mut state = vring.get_mut();
                match state.get_queue_mut().pop_descriptor_chain(&*snapshot) {
                    Some(c) => c,
                    None => break,
                }
            };
            let parsed = parse_request(chain, &snapshot, &self.limits);
            let request = match parsed.request {
                Ok(r) => r,
                Err(e) => {
                    self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = self.bad_input_log.allow() {
                        warn!(
                            "queue {}: bad request from guest (descriptor {}): {e}{}",
                            self.index,
                            parsed.head_index,
                            if suppressed > 0 {
                                format!(" ({suppressed} similar lines suppressed)")
                            } else {
                                String::new()
                            }
                        );
                    }
                    match parsed.status_addr {
                        Some(addr) => {
                            self.finish(vring, &snapshot, parsed.head_index, addr, 1, e.status())
                        }
                        // No status byte: return the chain unanswered so the ring keeps moving.
                        None => self.add_used(vring, parsed.head_index, 0),
                    }
                    continue;
                }
            };
            let Some(status_addr) = parsed.status_addr else {
                continue; // parse_request never returns Ok without a status byte
            };
            match request {
                Request::GetId { data } => {
                    data.write_at(0, &self.serial);
                    self.stats.record_answer(StatOp::GetId, 0, VIRTIO_BLK_S_OK);
                    self.finish(
                        vring,
                        &snapshot,
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
                    });
                    self.target.submit(tag, req);
                }
            }
        }
    }

    fn complete(&mut self, vring: &VringRwLock, mem: &GuestMemoryAtomic<GuestMemoryMmap>) {
        let mut done = std::mem::take(&mut self.done);
        self.target.poll(&mut done);
        if done.is_empty() {
            self.done = done;
            self.signal(vring);
            return;
        }
        let snapshot = mem.memory();
        let now = Instant::now();
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
            self.finish(
                vring,
                &snapshot,
                entry.head_index,
                entry.status_addr,
                len,
                status,
            );
        }
        self.done = done;
        self.signal(vring);
    }

    fn finish(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryMmap,
        head: u16,
        status_addr: GuestAddress,
        len: u32,
        status: u8,
    ) {
        if let Err(e) = mem.write_obj(status, status_addr) {
            // The guest changed its memory map under an in-flight request.
            warn!(
                "queue {}: cannot write status at {:#x}: {e}",
                self.index, status_addr.0
            );
        }
        self.add_used(vring, head, len);
    }

    fn add_used(&mut self, vring: &VringRwLock, head: u16, len: u32) {
        if let Err(e) = vring.add_used(head, len) {
            warn!(
                "queue {}: cannot add descriptor {head} to the used ring: {e}",
                self.index
            );
        }
        self.pending_signal = true;
    }

    /// One interrupt per batch, and only if the guest asked for it (event-idx).
    fn signal(&mut self, vring: &VringRwLock) {
        if !std::mem::take(&mut self.pending_signal) {
            return;
        }
        match vring.needs_notification() {
            Ok(true) => {
                if let Err(e) = vring.signal_used_queue() {
                    warn!("queue {}: cannot signal the guest: {e}", self.index);
                }
            }
            Ok(false) => {}
            Err(e) => warn!("queue {}: cannot check notification: {e}", self.index),
        }
    }
}
