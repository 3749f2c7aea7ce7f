//! One client thread per virtqueue: keeps `iodepth` requests in flight and measures each.

use crate::pattern::{self, Found};
use crate::stats::LatencyHist;
use blkio::{Blkioq, Completion, ReqFlags};
use std::mem::MaybeUninit;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// How long `do_io` may wait for a single completion before the run is declared hung.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How many mismatches each thread keeps in detail (all are counted).
const MAX_MISMATCH_DETAILS: usize = 8;

/// Width of one timeline bucket.
pub const TIMELINE_BUCKET: Duration = Duration::from_millis(10);

/// Longest timeline kept (later completions are not bucketed): 24 h of 10 ms buckets.
const TIMELINE_MAX_BUCKETS: usize = 24 * 3600 * 100;

/// Access pattern, as in fio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential reads (each queue walks its own slice of the range).
    Read,
    /// Sequential writes (each queue walks its own slice of the range).
    Write,
    /// Random mix of reads and writes (`--rwmixread` percent reads).
    Randrw,
}

impl Rw {
    fn is_random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite | Rw::Randrw)
    }

    /// True when the pattern issues any writes.
    pub fn has_writes(self) -> bool {
        matches!(self, Rw::Randwrite | Rw::Write | Rw::Randrw)
    }
}

/// When a phase ends.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// Stop issuing after this long (in-flight requests are still completed and counted).
    Runtime(Duration),
    /// Stop after this many I/Os in total, spread evenly over the queues.
    Ios(u64),
    /// Each queue covers its own slice of the range exactly once, sequentially.
    OnePass,
}

/// Which block contents a verifying read accepts.
#[derive(Debug, Clone)]
pub enum Accept {
    /// Any of these seeds (while writes run concurrently, a block may hold the old or new one).
    Seeds(Vec<u64>),
    /// `new` for blocks set in the `written` bitmap, `old` for the others.
    ByBitmap {
        /// One bit per block.
        written: Arc<Vec<u64>>,
        /// Seed of blocks written in the main phase.
        new: u64,
        /// Seed of the precondition pass.
        old: u64,
    },
}

/// Verification settings of a phase.
#[derive(Debug, Clone)]
pub struct Verify {
    /// Seed that writes fill blocks with.
    pub fill_seed: u64,
    /// What reads accept.
    pub accept: Accept,
}

/// Everything a queue thread needs to know about a phase.
#[derive(Debug, Clone)]
pub struct Phase {
    /// Access pattern.
    pub rw: Rw,
    /// Bytes per I/O; offsets are multiples of it.
    pub bs: usize,
    /// Number of `bs` blocks in the tested range (which starts at offset 0).
    pub nblocks: u64,
    /// Requests kept in flight on each queue.
    pub iodepth: usize,
    /// Percentage of reads for `Randrw`.
    pub rwmixread: u8,
    /// End condition.
    pub stop: Stop,
    /// Check reads / write patterns.
    pub verify: Option<Verify>,
    /// Base of the random seeds; each queue derives its own stream from it.
    pub rng_seed: u64,
    /// Count completions per [`TIMELINE_BUCKET`] since this instant (fault-injection runs
    /// measure recovery times from it).
    pub timeline: Option<Instant>,
    /// Stop issuing once this file exists (checked every [`STOP_FILE_POLL`]).
    pub stop_file: Option<std::path::PathBuf>,
}

/// How often a queue thread looks for [`Phase::stop_file`].
const STOP_FILE_POLL: Duration = Duration::from_millis(50);

/// A virtqueue together with the I/O buffers the client registered for it.
pub struct QueueCtx {
    /// The libblkio queue.
    pub q: Blkioq,
    /// Start of this queue's buffer area (`iodepth * bs` bytes) inside a mapped memory region.
    pub buf: *mut u8,
    /// Length of the buffer area.
    pub buf_len: usize,
    /// `scatter` iovecs per slot (slot-major) when requests are scattered; empty otherwise.
    pub iovecs: Vec<libc::iovec>,
    /// Pieces per request (1 = one contiguous buffer).
    pub scatter: usize,
}

// SAFETY: `buf` points into a memfd mapping owned by the `Blkio` instance, which outlives every
// queue thread (threads are scoped); each `QueueCtx` has its own disjoint buffer area, so moving
// the context to another thread cannot create aliasing access.
unsafe impl Send for QueueCtx {}

/// A read that returned unexpected data.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Mismatch {
    /// Byte offset on the device.
    pub offset: u64,
    /// What was there instead.
    pub found: Found,
}

/// Counters and histogram of one queue thread (or, after merging, of all of them).
pub struct QueueResult {
    /// Completed I/Os (including failed ones).
    pub ios: u64,
    /// Completed reads.
    pub reads: u64,
    /// Completed writes.
    pub writes: u64,
    /// I/Os that completed with an error.
    pub errors: u64,
    /// Text of the first error.
    pub first_error: Option<String>,
    /// Latency of every completed I/O.
    pub hist: LatencyHist,
    /// Time from the common start to the last completion.
    pub elapsed: Duration,
    /// Reads compared against the pattern.
    pub verified: u64,
    /// Reads that did not match.
    pub mismatches: u64,
    /// The first few mismatches.
    pub mismatch_details: Vec<Mismatch>,
    /// Bitmap of blocks written successfully (only tracked when verifying).
    pub written: Vec<u64>,
    /// Successful completions per timeline bucket (only with [`Phase::timeline`]).
    pub timeline_ok: Vec<u32>,
    /// Failed completions per timeline bucket.
    pub timeline_err: Vec<u32>,
    /// Successful completions per timeline bucket of each queue thread (in queue order).
    pub timeline_queues: Vec<Vec<u32>>,
}

impl QueueResult {
    fn new(bitmap_words: usize) -> Result<Self, JobError> {
        Ok(QueueResult {
            ios: 0,
            reads: 0,
            writes: 0,
            errors: 0,
            first_error: None,
            hist: LatencyHist::new()?,
            elapsed: Duration::ZERO,
            verified: 0,
            mismatches: 0,
            mismatch_details: Vec::new(),
            written: vec![0; bitmap_words],
            timeline_ok: Vec::new(),
            timeline_err: Vec::new(),
            timeline_queues: Vec::new(),
        })
    }

    /// Counts one completion at `now` in the timeline that starts at `origin`.
    fn tick(&mut self, origin: Instant, now: Instant, ok: bool) {
        let b = now.saturating_duration_since(origin).as_nanos() / TIMELINE_BUCKET.as_nanos();
        let Ok(b) = usize::try_from(b) else { return };
        if b >= TIMELINE_MAX_BUCKETS {
            return;
        }
        let line = if ok {
            &mut self.timeline_ok
        } else {
            &mut self.timeline_err
        };
        if line.len() <= b {
            line.resize(b + 1, 0);
        }
        line[b] = line[b].saturating_add(1);
    }

    /// Adds `other` into `self`; the elapsed time is the longer of the two.
    pub fn merge(&mut self, other: QueueResult) {
        self.ios += other.ios;
        self.reads += other.reads;
        self.writes += other.writes;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.hist.merge(&other.hist);
        self.elapsed = self.elapsed.max(other.elapsed);
        self.verified += other.verified;
        self.mismatches += other.mismatches;
        for m in other.mismatch_details {
            if self.mismatch_details.len() < MAX_MISMATCH_DETAILS {
                self.mismatch_details.push(m);
            }
        }
        if self.written.len() < other.written.len() {
            self.written.resize(other.written.len(), 0);
        }
        for (a, b) in self.written.iter_mut().zip(other.written.iter()) {
            *a |= *b;
        }
        add_counts(&mut self.timeline_ok, &other.timeline_ok);
        add_counts(&mut self.timeline_err, &other.timeline_err);
        self.timeline_queues.extend(other.timeline_queues);
    }
}

/// Adds `b` into `a` element by element (growing `a`).
fn add_counts(a: &mut Vec<u32>, b: &[u32]) {
    if a.len() < b.len() {
        a.resize(b.len(), 0);
    }
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.saturating_add(*y);
    }
}

/// Why a queue thread gave up.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// libblkio reported an error while submitting or waiting.
    #[error("Queue {queue}: waiting for completions failed: {source}")]
    DoIo {
        /// Queue index.
        queue: usize,
        /// libblkio's error.
        source: blkio::Error,
    },
    /// The backend completed a request id the client never issued.
    #[error("Queue {queue}: the device completed unknown request id {id}")]
    UnknownCompletion {
        /// Queue index.
        queue: usize,
        /// The id returned.
        id: usize,
    },
    /// The buffer area is too small for iodepth * bs.
    #[error("Queue {queue}: buffer area of {have} bytes is smaller than iodepth x bs = {need}")]
    BufferTooSmall {
        /// Queue index.
        queue: usize,
        /// Bytes available.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The histogram could not be created.
    #[error("Cannot create latency histogram")]
    Histogram(#[from] hdrhistogram::CreationError),
}

#[derive(Clone, Copy)]
struct Slot {
    block: u64,
    write: bool,
    start: Instant,
}

/// Slice `[start, end)` of the blocks that queue `index` of `nqueues` walks sequentially.
pub fn partition(nblocks: u64, index: usize, nqueues: usize) -> (u64, u64) {
    let n = u128::from(nblocks);
    let q = nqueues.max(1) as u128;
    let i = index as u128;
    // (n * i / q) <= n, so it fits back into u64.
    let start = u64::try_from(n * i / q).unwrap_or(nblocks);
    let end = u64::try_from(n * (i + 1) / q).unwrap_or(nblocks);
    (start.min(nblocks), end.min(nblocks))
}

struct Gen {
    rw: Rw,
    rng: fastrand::Rng,
    nblocks: u64,
    part: (u64, u64),
    cursor: u64,
    rwmixread: u8,
}

impl Gen {
    /// Next (block, is_write).
    fn next(&mut self) -> (u64, bool) {
        let block = if self.rw.is_random() {
            self.rng.u64(0..self.nblocks.max(1))
        } else {
            let b = self.cursor;
            self.cursor += 1;
            if self.cursor >= self.part.1 {
                self.cursor = self.part.0;
            }
            b
        };
        let write = match self.rw {
            Rw::Randread | Rw::Read => false,
            Rw::Randwrite | Rw::Write => true,
            Rw::Randrw => self.rng.u8(0..100) >= self.rwmixread,
        };
        (block, write)
    }
}

fn bit(bitmap: &[u64], block: u64) -> bool {
    let word = usize::try_from(block / 64).ok().and_then(|w| bitmap.get(w));
    word.is_some_and(|w| w & (1 << (block % 64)) != 0)
}

fn set_bit(bitmap: &mut [u64], block: u64) {
    if let Some(w) = usize::try_from(block / 64)
        .ok()
        .and_then(|w| bitmap.get_mut(w))
    {
        *w |= 1 << (block % 64);
    }
}

/// Words needed for a bitmap of `nblocks` bits.
pub fn bitmap_words(nblocks: u64) -> usize {
    usize::try_from(nblocks.div_ceil(64)).unwrap_or(usize::MAX)
}

/// Share of `total` I/Os for queue `index` of `nqueues` (the first ones take the remainder).
pub fn ios_share(total: u64, index: usize, nqueues: usize) -> u64 {
    let q = nqueues.max(1) as u64;
    total / q + u64::from((index as u64) < total % q)
}

/// Runs `phase` on queue `index` of `nqueues`. All queue threads wait on `start` so they begin
/// together; every thread passes the barrier exactly once, even when it fails to prepare, so one
/// failing thread cannot leave the others waiting forever.
pub fn run_queue(
    ctx: &mut QueueCtx,
    index: usize,
    nqueues: usize,
    phase: &Phase,
    start: &Barrier,
) -> Result<QueueResult, JobError> {
    match prepare(ctx, index, phase) {
        Ok(res) => {
            start.wait();
            drive(ctx, index, nqueues, phase, res)
        }
        Err(e) => {
            start.wait();
            Err(e)
        }
    }
}

fn prepare(ctx: &QueueCtx, index: usize, phase: &Phase) -> Result<QueueResult, JobError> {
    let need = phase.iodepth.max(1).saturating_mul(phase.bs);
    if ctx.buf_len < need {
        return Err(JobError::BufferTooSmall {
            queue: index,
            have: ctx.buf_len,
            need,
        });
    }
    QueueResult::new(if phase.verify.is_some() && phase.rw.has_writes() {
        bitmap_words(phase.nblocks)
    } else {
        0
    })
}

fn drive(
    ctx: &mut QueueCtx,
    index: usize,
    nqueues: usize,
    phase: &Phase,
    mut res: QueueResult,
) -> Result<QueueResult, JobError> {
    let bs = phase.bs;
    let depth = phase.iodepth.max(1);
    let part = partition(phase.nblocks, index, nqueues);
    let mut gen = Gen {
        rw: phase.rw,
        rng: fastrand::Rng::with_seed(phase.rng_seed ^ (index as u64).wrapping_mul(0x9e37_79b9)),
        nblocks: phase.nblocks,
        part,
        cursor: part.0,
        rwmixread: phase.rwmixread,
    };
    let quota = match phase.stop {
        Stop::Ios(n) => Some(ios_share(n, index, nqueues)),
        Stop::OnePass => Some(part.1 - part.0),
        Stop::Runtime(_) => None,
    };
    let mut slots: Vec<Option<Slot>> = vec![None; depth];
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..depth).map(|_| MaybeUninit::uninit()).collect();
    let mut issued: u64 = 0;
    let mut inflight = 0usize;

    let t0 = Instant::now();
    let deadline = match phase.stop {
        Stop::Runtime(d) => Some(t0 + d),
        _ => None,
    };
    let mut stopped = false;
    let mut next_stop_check = t0;
    let may_issue = |issued: u64, now: Instant, stopped: bool| -> bool {
        !stopped && quota.is_none_or(|q| issued < q) && deadline.is_none_or(|d| now < d)
    };

    for slot in 0..depth {
        if !may_issue(issued, t0, false) {
            break;
        }
        submit(ctx, phase, &mut gen, &mut slots, slot);
        issued += 1;
        inflight += 1;
    }

    while inflight > 0 {
        let mut timeout = STALL_TIMEOUT;
        let n = ctx
            .q
            .do_io(&mut completions, 1, Some(&mut timeout), None)
            .map_err(|source| JobError::DoIo {
                queue: index,
                source,
            })?;
        let now = Instant::now();
        if let Some(f) = phase.stop_file.as_deref() {
            if now >= next_stop_check {
                next_stop_check = now + STOP_FILE_POLL;
                stopped = stopped || f.exists();
            }
        }
        for c in completions.iter().take(n) {
            // SAFETY: do_io() initialised the first `n` elements.
            let c = unsafe { c.assume_init_read() };
            let id = c.user_data;
            let Some(slot) = slots.get_mut(id).and_then(Option::take) else {
                return Err(JobError::UnknownCompletion { queue: index, id });
            };
            inflight -= 1;
            res.ios += 1;
            res.hist
                .record_ns(u64::try_from((now - slot.start).as_nanos()).unwrap_or(u64::MAX));
            if slot.write {
                res.writes += 1;
            } else {
                res.reads += 1;
            }
            if let Some(origin) = phase.timeline {
                res.tick(origin, now, c.ret == 0);
            }
            if c.ret != 0 {
                res.errors += 1;
                if res.first_error.is_none() {
                    let errno = blkio::Errno::from_raw_os_error(c.ret.saturating_neg());
                    res.first_error = Some(format!(
                        "{} of {} bytes at offset {} failed: {}",
                        if slot.write { "write" } else { "read" },
                        bs,
                        slot.block * bs as u64,
                        errno
                    ));
                }
            } else if let Some(v) = &phase.verify {
                if slot.write {
                    set_bit(&mut res.written, slot.block);
                } else {
                    verify_read(ctx, &mut res, v, bs, id, slot.block);
                }
            }
            if may_issue(issued, now, stopped) {
                submit(ctx, phase, &mut gen, &mut slots, id);
                issued += 1;
                inflight += 1;
            }
        }
    }
    res.elapsed = t0.elapsed();
    if phase.timeline.is_some() {
        res.timeline_queues = vec![res.timeline_ok.clone()];
    }
    Ok(res)
}

fn slot_ptr(ctx: &QueueCtx, bs: usize, slot: usize) -> *mut u8 {
    // In bounds: run_queue() checked buf_len >= iodepth * bs and slot < iodepth.
    ctx.buf.wrapping_add(slot * bs)
}

fn submit(ctx: &mut QueueCtx, phase: &Phase, gen: &mut Gen, slots: &mut [Option<Slot>], id: usize) {
    let bs = phase.bs;
    let (block, write) = gen.next();
    let p = slot_ptr(ctx, bs, id);
    if let Some(v) = &phase.verify {
        // SAFETY: `p..p+bs` lies inside this queue's buffer area (see slot_ptr) and no
        // request uses this slot right now, so nothing else reads or writes it.
        let buf = unsafe { std::slice::from_raw_parts_mut(p, bs) };
        if write {
            pattern::fill(buf, v.fill_seed, block);
        } else {
            buf.fill(pattern::POISON);
        }
    }
    let start = Instant::now();
    if let Some(s) = slots.get_mut(id) {
        *s = Some(Slot {
            block,
            write,
            start,
        });
    }
    let offset = block * bs as u64;
    if ctx.scatter > 1 {
        // The slot's iovecs live in ctx.iovecs, untouched until the context is dropped, so
        // they outlive the request; their buffers lie inside the mapped region (main.rs sized
        // it for the gaps).
        let iov = ctx.iovecs[id * ctx.scatter..].as_ptr();
        let n = ctx.scatter as u32;
        if write {
            ctx.q.writev(offset, iov, n, id, ReqFlags::empty());
        } else {
            ctx.q.readv(offset, iov, n, id, ReqFlags::empty());
        }
    } else if write {
        ctx.q.write(offset, p, bs, id, ReqFlags::empty());
    } else {
        ctx.q.read(offset, p, bs, id, ReqFlags::empty());
    }
}

fn verify_read(
    ctx: &QueueCtx,
    res: &mut QueueResult,
    v: &Verify,
    bs: usize,
    id: usize,
    block: u64,
) {
    let p = slot_ptr(ctx, bs, id);
    // SAFETY: the read into this slot has completed, so the device no longer writes it, and the
    // slot is not reused until after this check.
    let buf = unsafe { std::slice::from_raw_parts(p, bs) };
    let one;
    let accepted: &[u64] = match &v.accept {
        Accept::Seeds(s) => s,
        Accept::ByBitmap { written, new, old } => {
            one = [if bit(written, block) { *new } else { *old }];
            &one
        }
    };
    res.verified += 1;
    if let Err(found) = pattern::check(buf, block, accepted) {
        res.mismatches += 1;
        if res.mismatch_details.len() < MAX_MISMATCH_DETAILS {
            res.mismatch_details.push(Mismatch {
                offset: block * bs as u64,
                found,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_cover_range_exactly() {
        for (n, q) in [(10u64, 3usize), (7, 7), (1000, 4), (5, 1)] {
            let mut next = 0;
            for i in 0..q {
                let (s, e) = partition(n, i, q);
                assert_eq!(s, next, "n={n} q={q} i={i}");
                assert!(e >= s);
                next = e;
            }
            assert_eq!(next, n);
        }
    }

    #[test]
    fn sequential_gen_wraps_within_partition() {
        let mut g = Gen {
            rw: Rw::Read,
            rng: fastrand::Rng::with_seed(1),
            nblocks: 100,
            part: (10, 13),
            cursor: 10,
            rwmixread: 50,
        };
        let blocks: Vec<u64> = (0..7).map(|_| g.next().0).collect();
        assert_eq!(blocks, [10, 11, 12, 10, 11, 12, 10]);
    }

    #[test]
    fn random_gen_stays_in_range_and_mixes() {
        let mut g = Gen {
            rw: Rw::Randrw,
            rng: fastrand::Rng::with_seed(2),
            nblocks: 50,
            part: (0, 50),
            cursor: 0,
            rwmixread: 70,
        };
        let mut writes = 0;
        for _ in 0..10_000 {
            let (b, w) = g.next();
            assert!(b < 50);
            writes += u32::from(w);
        }
        assert!((2_500..3_500).contains(&writes), "{writes}");
    }

    #[test]
    fn ios_shares_add_up() {
        for (n, q) in [(10u64, 3usize), (2, 4), (1_000_001, 4)] {
            let sum: u64 = (0..q).map(|i| ios_share(n, i, q)).sum();
            assert_eq!(sum, n);
        }
        assert_eq!(ios_share(10, 0, 3), 4);
        assert_eq!(ios_share(10, 2, 3), 3);
    }

    #[test]
    fn timeline_buckets_and_merge() {
        let t0 = Instant::now();
        let mut a = QueueResult::new(0).unwrap();
        a.tick(t0, t0 + Duration::from_millis(25), true);
        a.tick(t0, t0 + Duration::from_millis(26), true);
        a.tick(t0, t0 + Duration::from_millis(5), false);
        assert_eq!(a.timeline_ok, [0, 0, 2]);
        assert_eq!(a.timeline_err, [1]);
        let mut b = QueueResult::new(0).unwrap();
        b.tick(t0, t0 + Duration::from_millis(41), true);
        a.merge(b);
        assert_eq!(a.timeline_ok, [0, 0, 2, 0, 1]);
    }

    #[test]
    fn bitmap_helpers() {
        let mut bm = vec![0u64; bitmap_words(130)];
        assert_eq!(bm.len(), 3);
        set_bit(&mut bm, 129);
        set_bit(&mut bm, 5000); // out of range: ignored, no panic
        assert!(bit(&bm, 129));
        assert!(!bit(&bm, 128));
        assert!(!bit(&bm, 5000));
    }
}
