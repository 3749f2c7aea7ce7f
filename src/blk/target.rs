//! The block target: what serves the data behind the virtio-blk device.
//!
//! A [`Target`] describes the device (capacity, limits) and opens one
//! [`QueueTarget`] per virtqueue. The queue's worker drives its `QueueTarget`
//! asynchronously: it submits requests as it pops them, then calls
//! [`QueueTarget::poll`] to push the batch out and collect what has finished.
//! A target that completes later (a network target with hundreds of commands in
//! flight) exposes a file descriptor the worker adds to its epoll; when it turns
//! readable the worker polls again. No threads per request, no locks shared
//! between queues. A target whose work is a copy in memory (RAM, null) serves
//! each request at once instead ([`QueueTarget::execute`]), through buffers
//! borrowed from the worker's guest memory snapshot.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;

use super::buffer::{GuestBuffers, GuestMemoryMmap, IoBuffers};

/// Discard or write-zeroes limits advertised in the virtio config space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeOpLimits {
    /// Largest number of 512-byte sectors in one range.
    pub max_sectors: u32,
    /// Largest number of ranges in one request.
    pub max_segments: u32,
    /// Alignment/granularity in 512-byte sectors (discard only).
    pub alignment_sectors: u32,
}

/// What the guest sees of the device: filled from the target at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Logical block size in bytes (512, 4096, ...).
    pub logical_block_size: u32,
    /// log2(physical block size / logical block size).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Minimum I/O size, in logical blocks.
    pub min_io_size: u16,
    /// Optimal I/O size, in logical blocks.
    pub opt_io_size: u32,
    /// Discard support and limits (None: not offered to the guest).
    pub discard: Option<RangeOpLimits>,
    /// Write-zeroes support and limits (None: not offered to the guest).
    pub write_zeroes: Option<RangeOpLimits>,
    /// Whether write-zeroes may deallocate (unmap) the range.
    pub write_zeroes_may_unmap: bool,
    /// The device refuses writes.
    pub read_only: bool,
    /// The target has a volatile write cache (flush is meaningful).
    pub write_cache: bool,
    /// Serial number for VIRTIO_BLK_T_GET_ID (at most 20 bytes are used).
    pub serial: Vec<u8>,
}

impl DeviceInfo {
    /// A plain device of `capacity_bytes` with 512-byte blocks and no extras.
    pub fn simple(capacity_bytes: u64) -> Self {
        DeviceInfo {
            capacity_sectors: capacity_bytes / 512,
            logical_block_size: 512,
            physical_block_exp: 0,
            alignment_offset: 0,
            min_io_size: 1,
            opt_io_size: 0,
            discard: None,
            write_zeroes: None,
            write_zeroes_may_unmap: false,
            read_only: false,
            write_cache: true,
            serial: Vec::new(),
        }
    }
}

/// The device's capacity in 512-byte sectors, shared by the config space and
/// the request checks so a change shows in both at once.
#[derive(Clone, Debug, Default)]
pub struct SharedCapacity(Arc<AtomicU64>);

impl SharedCapacity {
    /// A capacity of `sectors`.
    pub fn new(sectors: u64) -> Self {
        SharedCapacity(Arc::new(AtomicU64::new(sectors)))
    }

    /// The current capacity.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Sets the capacity; returns the previous one.
    pub fn set(&self, sectors: u64) -> u64 {
        self.0.swap(sectors, Ordering::AcqRel)
    }
}

/// Told by a target when its device changes under the guest. The vhost layer
/// hands one to the target ([`Target::set_notifier`]); it updates the config
/// space and asks the frontend to raise a virtio config-change interrupt.
pub trait DeviceNotifier: Send + Sync {
    /// The device now has `capacity_sectors` 512-byte sectors. Called from any
    /// thread (a queue's, typically), once per change; it must not block on
    /// the queues.
    fn capacity_changed(&self, capacity_sectors: u64);
}

/// A range of sectors, for discard and write-zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorRange {
    /// First 512-byte sector.
    pub sector: u64,
    /// Number of 512-byte sectors.
    pub num_sectors: u32,
}

/// What a request asks the target to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockOp {
    /// Read into the request's buffers.
    Read,
    /// Write from the request's buffers; `fua` forces it to stable storage.
    Write {
        /// Force unit access (the guest turned the write cache off).
        fua: bool,
    },
    /// Make previous writes durable.
    Flush,
    /// Deallocate the ranges (contents become unspecified).
    Discard,
    /// Zero the ranges; `unmap` allows deallocation.
    WriteZeroes {
        /// The guest allows the target to deallocate the zeroed ranges.
        unmap: bool,
    },
}

/// One request for the target. Its data buffers are [`IoBuffers`], which keep
/// guest memory mapped on their own, or, for a request served at once
/// ([`QueueTarget::execute`]), [`GuestBuffers`] borrowed from the worker's
/// memory snapshot.
#[derive(Debug)]
pub struct BlockRequest<D = IoBuffers> {
    /// The operation.
    pub op: BlockOp,
    /// First 512-byte sector (read and write).
    pub sector: u64,
    /// Data buffers in guest memory (read and write).
    pub data: D,
    /// Ranges (discard and write-zeroes).
    pub ranges: Vec<SectorRange>,
}

impl BlockRequest<GuestBuffers<'_>> {
    /// The same request with buffers that keep guest memory mapped on their
    /// own, for a target that completes it later.
    pub fn into_owned(self) -> BlockRequest {
        BlockRequest {
            op: self.op,
            sector: self.sector,
            data: self.data.into_owned(),
            ranges: self.ranges,
        }
    }
}

/// Outcome of a request, as the guest will see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockStatus {
    /// Done.
    Ok,
    /// Failed: VIRTIO_BLK_S_IOERR.
    IoError,
    /// Not supported: VIRTIO_BLK_S_UNSUPP.
    Unsupported,
}

/// A finished request: the tag the worker submitted it with, and its status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The worker's tag.
    pub tag: u64,
    /// Outcome.
    pub status: BlockStatus,
}

/// Errors opening a target or one of its queues.
#[derive(Debug, Error)]
pub enum TargetError {
    /// The `--target` string could not be understood.
    #[error("invalid target {target:?}: {reason}")]
    BadTarget {
        /// The string given.
        target: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The target does not have the device asked for (a LUN it does not
    /// report); the message names the target and what it has.
    #[error("{0}")]
    NotFound(String),
    /// The target could not be reached or set up.
    #[error("{context}")]
    Setup {
        /// What was being done, with the endpoint.
        context: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The per-queue half of a target, owned by one worker thread.
pub trait QueueTarget: Send {
    /// Accepts a request. It completes during a later [`poll`](Self::poll)
    /// (possibly the very next one).
    fn submit(&mut self, tag: u64, req: BlockRequest);

    /// Serves `req` before returning, if this target works that way (the RAM
    /// and null targets: a copy in memory), and gives its status; None if it
    /// does not (the worker then [`submit`](Self::submit)s it). The buffers
    /// are borrowed from the worker's memory snapshot: nothing of the request
    /// may be kept past the call (not even its raw `iovecs`: a target that
    /// hands them on, to a receive plan say, must use `submit`), and no
    /// reference count is paid for it.
    fn execute(&mut self, _req: &BlockRequest<GuestBuffers<'_>>) -> Option<BlockStatus> {
        None
    }

    /// Sends what was submitted and appends every finished request to `done`.
    fn poll(&mut self, done: &mut Vec<Completion>);

    /// Sends what was submitted (after a batch of submits) and appends what is
    /// already finished, without looking for new completions: those arrive
    /// through [`event_fd`](Self::event_fd), so a network target saves a
    /// receive that would find nothing. The default polls.
    fn send(&mut self, done: &mut Vec<Completion>) {
        self.poll(done)
    }

    /// A file descriptor that becomes readable when `poll` has work to do
    /// (None for targets that always complete inside `poll`).
    fn event_fd(&self) -> Option<RawFd>;

    /// Requests submitted and not yet returned by `poll`.
    fn in_flight(&self) -> usize;
}

/// A block target: one device, opened once, shared by all queues.
pub trait Target: Send + Sync {
    /// The device as the guest sees it.
    fn info(&self) -> DeviceInfo;

    /// Opens the target half for virtqueue `index` (its own connection, if any).
    fn open_queue(&self, index: usize) -> Result<Box<dyn QueueTarget>, TargetError>;

    /// Guest memory changed (regions added or removed): targets that register
    /// memory with a NIC do it here, once per region, not per I/O.
    fn update_memory(&self, _mem: &Arc<GuestMemoryMmap>) {}

    /// Where to report device changes (a capacity change seen by a queue).
    /// Called once, before the queues are opened. Targets whose device
    /// cannot change ignore it.
    fn set_notifier(&self, _notifier: Arc<dyn DeviceNotifier>) {}
}
