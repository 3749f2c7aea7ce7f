//! Inflight I/O tracking shared with the front-end (vhost-user protocol
//! feature `INFLIGHT_SHMFD`), so that a back-end restarted after a crash
//! resubmits exactly the requests its predecessor had taken from the rings
//! and not yet completed.
//!
//! The region is allocated by us (`GET_INFLIGHT_FD`, a memfd), kept by the
//! front-end across back-end restarts and handed to every back-end that
//! connects (`SET_INFLIGHT_FD`). Its split-ring layout is QEMU's
//! (`docs/interop/vhost-user.rst`, "Inflight I/O tracking"); per queue:
//!
//! ```text
//! struct QueueRegionSplit {            // 16 bytes
//!     u64 features;                    // 0
//!     u16 version;                     // 1; 0 = not initialised yet
//!     u16 desc_num;                    // = queue size
//!     u16 last_batch_head;             // head of the last used batch
//!     u16 used_idx;                    // used->idx after the last batch
//!     DescStateSplit desc[desc_num];   // 16 bytes each:
//! }                                    //   u8 inflight; u8 pad[5]; u16 next; u64 counter
//! ```
//!
//! A head is marked in flight (with an increasing counter) when it is popped
//! and cleared after its used element is published. On recovery, a head
//! whose used element was published but whose flag was not cleared yet
//! (crash in between) is recognised by `used_idx` differing from the ring's.
//!
//! The region is shared with another process that may be hostile: every
//! access is an atomic load or store inside the mapping, and every index read
//! from it is bounds-checked.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use thiserror::Error;

/// Region layout version we write and accept.
pub const INFLIGHT_VERSION: u16 = 1;
const HEADER_BYTES: u64 = 16;
const DESC_BYTES: u64 = 16;
/// Each queue's area starts on this boundary (as QEMU's libvhost-user does).
const QUEUE_ALIGN: u64 = 64;

/// Errors setting up or reading the inflight region.
#[derive(Debug, Error)]
pub enum InflightError {
    /// The front-end asked for an impossible geometry.
    #[error("inflight region for {num_queues} queue(s) of {queue_size} entries refused: {why}")]
    BadGeometry {
        /// Queues asked for.
        num_queues: u16,
        /// Entries per queue asked for.
        queue_size: u16,
        /// What is wrong.
        why: String,
    },
    /// A system call failed.
    #[error("cannot {what} the inflight region")]
    Os {
        /// What we tried.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The region's content does not describe this ring.
    #[error("queue {queue}: inflight region does not match the ring: {why}")]
    Mismatch {
        /// Queue index.
        queue: usize,
        /// What does not match.
        why: String,
    },
}

/// Bytes one queue of `queue_size` entries takes in the region.
pub fn queue_area_bytes(queue_size: u16) -> u64 {
    let raw = HEADER_BYTES + DESC_BYTES * u64::from(queue_size);
    raw.div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN
}

/// A mapped inflight region (all queues).
pub struct InflightRegion {
    ptr: *mut u8,
    len: usize,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is plain shared memory owned by this value until drop;
// all accesses go through atomics, so sharing it between threads is sound.
unsafe impl Send for InflightRegion {}
// SAFETY: as above.
unsafe impl Sync for InflightRegion {}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: ptr/len is exactly the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn check_geometry(
    num_queues: u16,
    queue_size: u16,
    max_queues: usize,
) -> Result<(), InflightError> {
    let bad = |why: String| InflightError::BadGeometry {
        num_queues,
        queue_size,
        why,
    };
    if num_queues == 0 || usize::from(num_queues) > max_queues {
        return Err(bad(format!("the device has {max_queues} queue(s)")));
    }
    if !queue_size.is_power_of_two() {
        return Err(bad("queue size must be a power of two".into()));
    }
    Ok(())
}

impl InflightRegion {
    /// `GET_INFLIGHT_FD`: a fresh zeroed memfd region for `num_queues` queues
    /// of `queue_size` entries (at most `max_queues`). Returns the file to
    /// send and its size.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
        max_queues: usize,
    ) -> Result<(File, u64), InflightError> {
        check_geometry(num_queues, queue_size, max_queues)?;
        let size = queue_area_bytes(queue_size) * u64::from(num_queues);
        // SAFETY: memfd_create with a NUL-terminated name; the fd is owned by
        // the File below.
        let fd = unsafe { libc::memfd_create(c"vhost-iser-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(InflightError::Os {
                what: "create",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(size).map_err(|source| InflightError::Os {
            what: "size",
            source,
        })?;
        // Header fields QEMU's docs say the back-end fills in; version stays
        // 0 until a ring is attached (see `QueueInflight::recover`).
        let region = Self::map(&file, 0, size, num_queues, queue_size)?;
        for q in 0..num_queues {
            if let Some(v) = region.queue(usize::from(q)) {
                v.header_u16(10).store(queue_size, Ordering::Relaxed);
            }
        }
        Ok((file, size))
    }

    /// `SET_INFLIGHT_FD`: maps the region the front-end hands over, after
    /// checking it can hold `num_queues` x `queue_size` and lies in its file.
    pub fn open(
        file: &File,
        mmap_offset: u64,
        mmap_size: u64,
        num_queues: u16,
        queue_size: u16,
        max_queues: usize,
    ) -> Result<Arc<Self>, InflightError> {
        check_geometry(num_queues, queue_size, max_queues)?;
        let bad = |why: String| InflightError::BadGeometry {
            num_queues,
            queue_size,
            why,
        };
        let need = queue_area_bytes(queue_size) * u64::from(num_queues);
        if mmap_size < need {
            return Err(bad(format!("{mmap_size} bytes offered, {need} needed")));
        }
        let file_len = file
            .metadata()
            .map_err(|source| InflightError::Os {
                what: "inspect",
                source,
            })?
            .len();
        match mmap_offset.checked_add(mmap_size) {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(bad(format!(
                "{mmap_size} bytes at offset {mmap_offset} do not fit in the {file_len}-byte file"
            )))
            }
        }
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        if !mmap_offset.is_multiple_of(page) {
            return Err(bad(format!("offset {mmap_offset} is not page aligned")));
        }
        Ok(Arc::new(Self::map(
            file,
            mmap_offset,
            mmap_size,
            num_queues,
            queue_size,
        )?))
    }

    fn map(
        file: &File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let len = usize::try_from(size).map_err(|_| InflightError::BadGeometry {
            num_queues,
            queue_size,
            why: "size does not fit in memory".into(),
        })?;
        // SAFETY: a new shared mapping chosen by the kernel (no MAP_FIXED);
        // the caller checked offset + size lies inside the file.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(InflightError::Os {
                what: "map",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(InflightRegion {
            ptr: ptr.cast(),
            len,
            num_queues,
            queue_size,
        })
    }

    /// Number of queues the region covers.
    pub fn num_queues(&self) -> usize {
        usize::from(self.num_queues)
    }

    fn queue(&self, index: usize) -> Option<QueueView<'_>> {
        if index >= usize::from(self.num_queues) {
            return None;
        }
        let off = queue_area_bytes(self.queue_size) as usize * index;
        Some(QueueView {
            region: self,
            off,
            desc_num: self.queue_size,
        })
    }

    /// The tracker of queue `index`, or None if the region has no such queue.
    pub fn queue_tracker(self: &Arc<Self>, index: usize) -> Option<QueueInflight> {
        self.queue(index)?;
        Some(QueueInflight {
            region: self.clone(),
            index,
            counter: 1,
        })
    }
}

/// Typed atomic accessors over one queue's area.
struct QueueView<'a> {
    region: &'a InflightRegion,
    off: usize,
    desc_num: u16,
}

impl QueueView<'_> {
    fn at<T>(&self, rel: usize) -> &T {
        let pos = self.off + rel;
        assert!(pos + std::mem::size_of::<T>() <= self.region.len);
        // SAFETY: in bounds (checked above) of a live mapping; every field is
        // naturally aligned (queue areas are 64-byte aligned in a page-aligned
        // mapping, fields at their natural offsets); atomics tolerate the
        // other process writing concurrently.
        unsafe { &*(self.region.ptr.add(pos) as *const T) }
    }
    fn header_u16(&self, rel: usize) -> &AtomicU16 {
        self.at(rel)
    }
    fn version(&self) -> &AtomicU16 {
        self.at(8)
    }
    fn desc_num(&self) -> &AtomicU16 {
        self.at(10)
    }
    fn last_batch_head(&self) -> &AtomicU16 {
        self.at(12)
    }
    fn used_idx(&self) -> &AtomicU16 {
        self.at(14)
    }
    fn desc_inflight(&self, head: u16) -> &AtomicU8 {
        self.at(HEADER_BYTES as usize + DESC_BYTES as usize * usize::from(head))
    }
    fn desc_counter(&self, head: u16) -> &AtomicU64 {
        self.at(HEADER_BYTES as usize + DESC_BYTES as usize * usize::from(head) + 8)
    }
}

/// What an inflight region says when a ring is attached to it.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Nobody used the region before: a new one from GET_INFLIGHT_FD, as on
    /// a migration destination or at first start. It knows nothing about
    /// the ring, so the frontend's SET_VRING_BASE stands.
    Fresh,
    /// A previous back-end used the region: the heads it took and did not
    /// complete, oldest first (maybe none).
    InFlight(Vec<u16>),
}

impl Recovery {
    /// The heads to resubmit (none for a fresh region).
    pub fn heads(&self) -> &[u16] {
        match self {
            Recovery::Fresh => &[],
            Recovery::InFlight(h) => h,
        }
    }
}

/// One queue's inflight tracker, owned by that queue's worker.
pub struct QueueInflight {
    region: Arc<InflightRegion>,
    index: usize,
    counter: u64,
}

impl QueueInflight {
    fn view(&self) -> QueueView<'_> {
        // `index` was checked against the region when the tracker was made.
        QueueView {
            region: &self.region,
            off: queue_area_bytes(self.region.queue_size) as usize * self.index,
            desc_num: self.region.queue_size,
        }
    }

    /// Records `head` as taken from the avail ring.
    pub fn popped(&mut self, head: u16) {
        let counter = self.counter;
        let v = self.view();
        if head >= v.desc_num {
            return; // the ring code rejects such heads; nothing to record
        }
        v.desc_counter(head).store(counter, Ordering::Relaxed);
        v.desc_inflight(head).store(1, Ordering::Release);
        self.counter = counter.wrapping_add(1);
    }

    /// Before `head`'s used element is published.
    pub fn before_used(&self, head: u16) {
        let v = self.view();
        if head < v.desc_num {
            v.last_batch_head().store(head, Ordering::Release);
        }
    }

    /// After `head`'s used element is published and the used index is `used_idx`.
    pub fn after_used(&self, head: u16, used_idx: u16) {
        let v = self.view();
        if head < v.desc_num {
            v.desc_inflight(head).store(0, Ordering::Release);
        }
        fence(Ordering::SeqCst);
        v.used_idx().store(used_idx, Ordering::Release);
    }

    /// Called when the ring (of `queue_size` entries, used index
    /// `ring_used_idx`) is attached. Returns what a previous back-end left in
    /// flight, oldest first; an uninitialised region is initialised and
    /// reported as [`Recovery::Fresh`].
    pub fn recover(
        &mut self,
        queue_size: u16,
        ring_used_idx: u16,
    ) -> Result<Recovery, InflightError> {
        let v = self.view();
        let mismatch = |why: String| InflightError::Mismatch {
            queue: self.index,
            why,
        };
        if queue_size != v.desc_num {
            return Err(mismatch(format!(
                "ring has {queue_size} entries, region {}",
                v.desc_num
            )));
        }
        let version = v.version().load(Ordering::Acquire);
        if version == 0 {
            self.reset(queue_size, ring_used_idx);
            return Ok(Recovery::Fresh);
        }
        if version != INFLIGHT_VERSION {
            let e = mismatch(format!("unknown version {version}"));
            self.reset(queue_size, ring_used_idx);
            return Err(e);
        }
        let desc_num = v.desc_num().load(Ordering::Acquire);
        if desc_num != queue_size {
            let e = mismatch(format!(
                "region says {desc_num} entries, ring has {queue_size}"
            ));
            self.reset(queue_size, ring_used_idx);
            return Err(e);
        }
        if v.used_idx().load(Ordering::Acquire) != ring_used_idx {
            // Crashed between publishing the last used element and clearing
            // its flag: that head is done.
            let last = v.last_batch_head().load(Ordering::Acquire);
            if last < desc_num {
                v.desc_inflight(last).store(0, Ordering::Release);
            }
            v.used_idx().store(ring_used_idx, Ordering::Release);
        }
        let mut heads: Vec<(u64, u16)> = (0..desc_num)
            .filter(|&h| v.desc_inflight(h).load(Ordering::Acquire) != 0)
            .map(|h| (v.desc_counter(h).load(Ordering::Acquire), h))
            .collect();
        heads.sort_unstable();
        self.counter = heads.last().map_or(1, |&(c, _)| c.wrapping_add(1));
        Ok(Recovery::InFlight(
            heads.into_iter().map(|(_, h)| h).collect(),
        ))
    }

    fn reset(&mut self, queue_size: u16, ring_used_idx: u16) {
        let v = self.view();
        for h in 0..v.desc_num {
            v.desc_inflight(h).store(0, Ordering::Relaxed);
            v.desc_counter(h).store(0, Ordering::Relaxed);
        }
        v.desc_num().store(queue_size, Ordering::Relaxed);
        v.used_idx().store(ring_used_idx, Ordering::Relaxed);
        v.last_batch_head().store(0, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        v.version().store(INFLIGHT_VERSION, Ordering::Release);
        self.counter = 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(q: u16, size: u16) -> (File, Arc<InflightRegion>) {
        let (file, len) = InflightRegion::create(q, size, 8).unwrap();
        let r = InflightRegion::open(&file, 0, len, q, size, 8).unwrap();
        (file, r)
    }

    #[test]
    fn layout_matches_qemu() {
        // 16-byte header + 16 bytes per entry, rounded up to 64
        assert_eq!(queue_area_bytes(128), 2112);
        assert_eq!(queue_area_bytes(4), 128);
    }

    #[test]
    fn fresh_region_has_nothing_to_resubmit() {
        let (_f, r) = region(2, 8);
        let mut q = r.queue_tracker(1).unwrap();
        assert_eq!(q.recover(8, 5).unwrap(), Recovery::Fresh);
        assert!(r.queue_tracker(2).is_none());
    }

    #[test]
    fn crash_leaves_popped_heads_in_pop_order() {
        let (file, r) = region(1, 8);
        let mut q = r.queue_tracker(0).unwrap();
        assert_eq!(q.recover(8, 0).unwrap(), Recovery::Fresh);
        for h in [5, 2, 7, 0] {
            q.popped(h);
        }
        // 2 completes normally (used idx 1)
        q.before_used(2);
        q.after_used(2, 1);
        // 7 crashes between publishing its used element and clearing the flag
        q.before_used(7);
        // "new process": map the same file again
        drop(q);
        let len = file.metadata().unwrap().len();
        let r2 = InflightRegion::open(&file, 0, len, 1, 8, 8).unwrap();
        let mut q2 = r2.queue_tracker(0).unwrap();
        assert_eq!(q2.recover(8, 2).unwrap().heads(), [5, 0]);
        // ordering continues after the old counters
        q2.popped(3);
        assert_eq!(q2.recover(8, 2).unwrap().heads(), [5, 0, 3]);
    }

    #[test]
    fn hostile_geometry_is_refused() {
        assert!(InflightRegion::create(0, 8, 8).is_err());
        assert!(InflightRegion::create(9, 8, 8).is_err());
        assert!(InflightRegion::create(1, 100, 8).is_err());
        let (file, len) = InflightRegion::create(1, 8, 8).unwrap();
        // larger than the file
        assert!(InflightRegion::open(&file, 0, len * 4, 4, 8, 8).is_err());
        // too small for the geometry
        assert!(InflightRegion::open(&file, 0, len, 1, 64, 8).is_err());
        // unaligned offset
        assert!(InflightRegion::open(&file, 1, len - 1, 1, 4, 8).is_err());
    }

    #[test]
    fn mismatched_queue_size_is_reported_and_reset() {
        let (_f, r) = region(1, 8);
        let mut q = r.queue_tracker(0).unwrap();
        assert!(q.recover(16, 0).is_err());
        q.popped(100); // out of range: ignored, no panic
        q.before_used(100);
        q.after_used(100, 1);
    }
}
