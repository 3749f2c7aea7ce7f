//! A split virtqueue's three areas (descriptor table, available ring, used
//! ring) read and written through host pointers.
//!
//! virtio-queue reads each 16-byte descriptor and each 2-byte ring index
//! through vm-memory's generic accessors: a region lookup, a slice iterator
//! and a `memcpy` per access. At a million requests a second that was 40 % of
//! a worker's time. The three areas are contiguous guest memory, almost always
//! inside one memory region each, so a worker resolves them to host pointers
//! once per batch ([`SplitRing::new`]) and then reads a descriptor as two
//! 64-bit loads (the table is 16-aligned in guest and host memory, else it
//! goes the slow way). An area that straddles two regions, or is misaligned, falls
//! back to vm-memory's accessors, which refuse what is not guest memory: the
//! access fails with a [`RingError`] that the worker logs. The guest wrote
//! its descriptors and headers on another CPU, so [`SplitRing::pop`] also
//! prefetches them a request or two ahead.
//!
//! The guest is not trusted, and the rules are virtio-queue's, so a chain
//! means the same thing on both paths: a chain ends after as many descriptors
//! as its table has entries (a loop is cut there), one level of indirection,
//! an indirect table whose length is a multiple of 16, no index past its
//! table, no chain longer than 4 GiB in all; the available index may run at
//! most one queue size ahead of the device. Where a chain ends early, its last
//! descriptor still says NEXT, which the request parser refuses. The
//! differential test below and the `virtio_chain` fuzz target hold the two
//! walks to the same descriptors.
//!
//! A [`SplitRing`] keeps its own copies of the queue's next-available and
//! next-used indexes; [`SplitRing::store_indexes`] writes them back into the
//! virtio-queue `Queue` (which the vhost-user front-end reads on
//! GET_VRING_BASE) before the vring lock is released.

use std::num::Wrapping;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU64, Ordering};

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::blk::buffer::GuestMemoryMmap;

/// A region of the backend's guest memory.
type GuestRegion = <GuestMemoryMmap as GuestMemoryBackend>::R;

const DESC_BYTES: u64 = 16;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// flags and idx in front of both rings.
const RING_HEADER: u64 = 4;
const AVAIL_ELEM: u64 = 2;
const USED_ELEM: u64 = 8;

/// Why a queue's rings cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RingError {
    /// The front-end has not started the queue (or stopped it).
    #[error("queue is not ready")]
    NotReady,
    /// The guest's available index is more than a queue size ahead of ours.
    #[error("available index {avail} is more than {size} entries ahead of {next}")]
    AvailIndexAhead {
        /// What the guest wrote.
        avail: u16,
        /// Where the device is.
        next: u16,
        /// The queue size.
        size: u16,
    },
    /// A used element names a descriptor the table does not have.
    #[error("descriptor {head} is out of range for a queue of {size}")]
    HeadOutOfRange {
        /// The head index.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// Guest memory refused an access: the area is (partly) outside guest
    /// memory, or misaligned.
    #[error("the {area} at {addr:#x} is not accessible guest memory")]
    Access {
        /// "descriptor table", "available ring" or "used ring".
        area: &'static str,
        /// Guest address of the access.
        addr: u64,
    },
}

/// Where one area lives: host memory (the common case) or, when it straddles
/// regions or is misaligned, guest addresses read through vm-memory.
#[derive(Clone, Copy, Debug)]
enum Area<'m> {
    /// `ptr` is the host address of the area, which starts `start` bytes
    /// into `region` (whose dirty bitmap logs the device's writes).
    Host {
        ptr: *mut u8,
        region: &'m GuestRegion,
        start: usize,
    },
    Guest(GuestAddress),
}

impl<'m> Area<'m> {
    /// Resolves `addr..addr+len`, `align`-aligned for its atomic indexes:
    /// host memory when it lies in one region, else guest addresses whose
    /// accesses vm-memory checks one by one (and refuses outside guest
    /// memory).
    fn resolve(mem: &'m GuestMemoryMmap, addr: GuestAddress, len: u64, align: u64) -> Area<'m> {
        match host_range(mem, addr, len) {
            // The host address is checked too: a front-end may place a
            // region at an odd guest address, and an atomic access through
            // a misaligned pointer is undefined behaviour.
            Some(area @ Area::Host { ptr, .. })
                if addr.0.is_multiple_of(align)
                    && (ptr as usize).is_multiple_of(align as usize) =>
            {
                area
            }
            _ => Area::Guest(addr),
        }
    }

    fn load_u16(
        self,
        mem: &GuestMemoryMmap,
        offset: u64,
        order: Ordering,
        what: &'static str,
    ) -> Result<u16, RingError> {
        match self {
            // SAFETY: `offset + 2` lies inside the area (callers pass offsets
            // within the length `resolve` checked), the host address is
            // 2-aligned (checked in `resolve`; offsets are even) and mapped
            // for as long as the ring's `mem` borrow lives. The guest writes the same
            // u16 concurrently: an atomic access is the right one.
            Area::Host { ptr, .. } => Ok(u16::from_le(unsafe {
                AtomicU16::from_ptr(ptr.add(offset as usize).cast::<u16>()).load(order)
            })),
            Area::Guest(a) => mem
                .load::<u16>(guest_at(a, offset, what)?, order)
                .map(u16::from_le)
                .map_err(|_| access(what, a, offset)),
        }
    }

    fn store_u16(
        self,
        mem: &GuestMemoryMmap,
        offset: u64,
        val: u16,
        order: Ordering,
        what: &'static str,
    ) -> Result<(), RingError> {
        match self {
            Area::Host { ptr, region, start } => {
                // SAFETY: as in `load_u16`; the used ring is device-writable.
                unsafe {
                    AtomicU16::from_ptr(ptr.add(offset as usize).cast::<u16>())
                        .store(val.to_le(), order)
                };
                // What vm-memory does for its own writes: log them for a
                // live migration (one atomic load when nobody logs).
                GuestMemoryRegion::bitmap(region).mark_dirty(start + offset as usize, 2);
                Ok(())
            }
            Area::Guest(a) => mem
                .store(val.to_le(), guest_at(a, offset, what)?, order)
                .map_err(|_| access(what, a, offset)),
        }
    }

    /// The descriptor at `offset` of a descriptor table area.
    fn read_descriptor(
        self,
        mem: &GuestMemoryMmap,
        offset: u64,
        what: &'static str,
    ) -> Result<Descriptor, RingError> {
        match self {
            // SAFETY: `offset + 16` lies inside the area (callers check the
            // index against the table's length, which `resolve` or
            // `enter_indirect` checked), and the host address is 16-aligned
            // (checked there too; offsets are multiples of 16), so both u64
            // halves are aligned; mapped for as long as the ring's `mem`
            // borrow lives. The guest may change the descriptor at any time:
            // atomic loads (plain moves on x86), validated by the caller.
            // Two word loads, not a copy of 16 bytes: a byte array made 16
            // byte loads and stores, and a word load of what was just stored
            // byte by byte stalls (12 % of the worker at depth).
            Area::Host { ptr, .. } => {
                let (lo, hi) = unsafe {
                    let p = ptr.add(offset as usize).cast::<u64>();
                    (
                        AtomicU64::from_ptr(p).load(Ordering::Relaxed),
                        AtomicU64::from_ptr(p.add(1)).load(Ordering::Relaxed),
                    )
                };
                Ok(descriptor_from_words(u64::from_le(lo), u64::from_le(hi)))
            }
            Area::Guest(a) => {
                let mut raw = [0u8; 16];
                mem.read_slice(&mut raw, guest_at(a, offset, what)?)
                    .map_err(|_| access(what, a, offset))?;
                let [a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7] = raw;
                Ok(descriptor_from_words(
                    u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
                    u64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7]),
                ))
            }
        }
    }

    /// Writes the used element at `offset` of the used ring area: the head
    /// index and the length written, as two 32-bit stores (an 8-byte array
    /// was eight byte stores).
    fn write_used_elem(
        self,
        mem: &GuestMemoryMmap,
        offset: u64,
        id: u32,
        len: u32,
        what: &'static str,
    ) -> Result<(), RingError> {
        match self {
            Area::Host { ptr, region, start } => {
                // SAFETY: `offset + 8` lies inside the area (the slot is
                // below the queue size `resolve` checked the length for);
                // the host address is 4-aligned (checked in `resolve`;
                // elements start at 4 + 8 * slot) and mapped for as long as
                // the ring's `mem` borrow lives. The used ring is
                // device-writable memory the guest only reads.
                unsafe {
                    let p = ptr.add(offset as usize).cast::<u32>();
                    AtomicU32::from_ptr(p).store(id.to_le(), Ordering::Relaxed);
                    AtomicU32::from_ptr(p.add(1)).store(len.to_le(), Ordering::Relaxed);
                }
                GuestMemoryRegion::bitmap(region).mark_dirty(start + offset as usize, 8);
                Ok(())
            }
            Area::Guest(a) => {
                let mut elem = [0u8; 8];
                elem[..4].copy_from_slice(&id.to_le_bytes());
                elem[4..].copy_from_slice(&len.to_le_bytes());
                mem.write_slice(&elem, guest_at(a, offset, what)?)
                    .map_err(|_| access(what, a, offset))
            }
        }
    }
}

/// Whether a ring whose guest wrote available index `avail` has entries the
/// device at `next_avail` takes: some, and no more than a ring's worth (a
/// guest that ran further is broken and is not served).
pub fn servable(avail: u16, next_avail: u16, size: u16) -> bool {
    let ahead = avail.wrapping_sub(next_avail);
    ahead != 0 && ahead <= size
}

/// A descriptor from its two words, as they lie in the table (virtio 1.2
/// 2.7.5): the address, then the length, flags and next index.
fn descriptor_from_words(addr: u64, rest: u64) -> Descriptor {
    Descriptor::new(addr, rest as u32, (rest >> 32) as u16, (rest >> 48) as u16)
}

/// `base + offset`, refused when it passes the end of the address space.
fn guest_at(
    base: GuestAddress,
    offset: u64,
    what: &'static str,
) -> Result<GuestAddress, RingError> {
    base.checked_add(offset)
        .ok_or_else(|| access(what, base, offset))
}

fn access(area: &'static str, base: GuestAddress, offset: u64) -> RingError {
    RingError::Access {
        area,
        addr: base.0.wrapping_add(offset),
    }
}

/// `addr..addr+len` in host memory if it lies inside one region.
fn host_range(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Option<Area<'_>> {
    let (region, offset) = mem.to_region_addr(addr)?;
    if offset.0.checked_add(len)? > region.len() {
        return None;
    }
    let ptr = region
        .get_host_address(MemoryRegionAddress(offset.0))
        .ok()?;
    Some(Area::Host {
        ptr,
        region,
        start: usize::try_from(offset.0).ok()?,
    })
}

/// A split virtqueue's rings over one guest memory snapshot, for one batch.
pub struct SplitRing<'m> {
    mem: &'m GuestMemoryMmap,
    size: u16,
    desc: Area<'m>,
    avail: Area<'m>,
    used: Area<'m>,
    event_idx: bool,
    next_avail: Wrapping<u16>,
    next_used: Wrapping<u16>,
    /// The front-end started the queue: requests may be taken from it.
    ready: bool,
    /// The available index last read: pops up to it need no new read.
    avail_seen: Wrapping<u16>,
    /// The region the last prefetched buffer was in.
    buffer_hint: RegionHint,
}

/// A guest memory region's bounds and host address, for prefetch hints.
#[derive(Clone, Copy)]
struct RegionHint {
    guest: u64,
    len: u64,
    host: *mut u8,
}

impl Default for RegionHint {
    /// No region (length 0): every address misses.
    fn default() -> Self {
        RegionHint {
            guest: 0,
            len: 0,
            host: std::ptr::null_mut(),
        }
    }
}

impl RegionHint {
    /// Host address of `addr` if it is in this region.
    fn host(&self, addr: u64) -> Option<*const u8> {
        let off = addr.checked_sub(self.guest)?;
        (off < self.len).then(|| self.host.wrapping_add(off as usize).cast_const())
    }
}

/// Asks the CPU to start loading the cache line at `p`.
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults, whatever the address,
    // and reads nothing into the program.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

impl<'m> SplitRing<'m> {
    /// The rings of `queue` in `mem`, with the queue's indexes. Built also
    /// for a queue that is not ready (stopped by GET_VRING_BASE), whose
    /// in-flight requests still complete into its used ring; only
    /// [`SplitRing::pop`] wants a ready queue.
    pub fn new(queue: &Queue, mem: &'m GuestMemoryMmap) -> Self {
        let size = queue.size();
        let n = u64::from(size);
        let desc = Area::resolve(mem, GuestAddress(queue.desc_table()), DESC_BYTES * n, 16);
        let avail = Area::resolve(
            mem,
            GuestAddress(queue.avail_ring()),
            RING_HEADER + AVAIL_ELEM * n + 2,
            2,
        );
        let used = Area::resolve(
            mem,
            GuestAddress(queue.used_ring()),
            RING_HEADER + USED_ELEM * n + 2,
            4,
        );
        let next_avail = Wrapping(queue.next_avail());
        SplitRing {
            mem,
            size,
            ready: queue.ready() && queue.avail_ring() != 0,
            desc,
            avail,
            used,
            event_idx: queue.event_idx_enabled(),
            next_avail,
            next_used: Wrapping(queue.next_used()),
            avail_seen: next_avail,
            buffer_hint: RegionHint::default(),
        }
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Index of the next available entry the device takes.
    pub fn next_avail(&self) -> u16 {
        self.next_avail.0
    }

    /// Index of the next used entry the device writes.
    pub fn next_used(&self) -> u16 {
        self.next_used.0
    }

    /// Moves the device to available index `idx` (inflight recovery: the
    /// entries before it were taken by a previous back-end).
    pub fn set_next_avail(&mut self, idx: u16) {
        self.next_avail = Wrapping(idx);
        self.avail_seen = self.next_avail;
    }

    /// The used index as the guest sees it.
    pub fn used_idx(&self) -> Result<u16, RingError> {
        self.used
            .load_u16(self.mem, 2, Ordering::Acquire, "used ring")
    }

    /// Writes the ring's indexes back into `queue`.
    pub fn store_indexes(&self, queue: &mut Queue) {
        queue.set_next_avail(self.next_avail.0);
        queue.set_next_used(self.next_used.0);
    }

    /// The guest's available index (acquire: the entries before it and
    /// their descriptors are visible after this read).
    pub fn avail_idx(&self) -> Result<Wrapping<u16>, RingError> {
        self.avail
            .load_u16(self.mem, 2, Ordering::Acquire, "available ring")
            .map(Wrapping)
    }

    /// Whether [`SplitRing::pop`] would give a chain: the queue is ready and
    /// the guest made entries available, no more than a ring's worth (a
    /// guest that ran further is broken and is not served: saying yes here
    /// would have a poller spin on a ring it never takes from).
    pub fn has_available(&self) -> Result<bool, RingError> {
        if !self.ready {
            return Ok(false);
        }
        Ok(servable(self.avail_idx()?.0, self.next_avail.0, self.size))
    }

    /// Takes the next available chain: its head index and its descriptors.
    pub fn pop(&mut self) -> Result<Option<Chain<'_, 'm>>, RingError> {
        if !self.ready {
            return Err(RingError::NotReady);
        }
        if self.next_avail == self.avail_seen {
            let idx = self.avail_idx()?;
            if (idx - self.next_avail).0 > self.size {
                return Err(RingError::AvailIndexAhead {
                    avail: idx.0,
                    next: self.next_avail.0,
                    size: self.size,
                });
            }
            self.avail_seen = idx;
            if idx == self.next_avail {
                return Ok(None);
            }
        }
        let slot = u64::from(self.next_avail.0 % self.size);
        let head = self.avail.load_u16(
            self.mem,
            RING_HEADER + AVAIL_ELEM * slot,
            Ordering::Relaxed,
            "available ring",
        )?;
        self.next_avail += Wrapping(1);
        self.prefetch_ahead();
        Ok(Some(Chain {
            ring: self,
            head,
            table: self.desc,
            table_len: self.size,
            next: head,
            ttl: self.size,
            indirect: false,
            yielded: 0,
        }))
    }

    /// Starts loading what the next pops will read. The guest wrote its
    /// descriptors and request headers on another CPU, so each is a cache
    /// miss; fetched a request or two ahead, they arrive while the current
    /// one is worked on. Two entries ahead: the head descriptor's line. One
    /// ahead: the line its first buffer starts in (the request header),
    /// through the descriptor fetched one pop earlier. Hints only: nothing
    /// read here is trusted or kept.
    fn prefetch_ahead(&mut self) {
        let Area::Host { ptr: table, .. } = self.desc else {
            return;
        };
        let waiting = (self.avail_seen - self.next_avail).0;
        let head_at = |k: u16| -> Option<u16> {
            let slot = u64::from(self.next_avail.0.wrapping_add(k) % self.size);
            let head = self
                .avail
                .load_u16(
                    self.mem,
                    RING_HEADER + AVAIL_ELEM * slot,
                    Ordering::Relaxed,
                    "",
                )
                .ok()?;
            (head < self.size).then_some(head)
        };
        if waiting >= 2 {
            if let Some(head) = head_at(1) {
                // SAFETY: `head` < size, so the offset is inside the table.
                let at = unsafe { table.add(usize::from(head) * DESC_BYTES as usize) };
                prefetch(at);
                // A chain of three (header, data, status) often crosses
                // into the next line.
                prefetch(at.wrapping_add(2 * DESC_BYTES as usize));
            }
        }
        if waiting >= 1 {
            let Some(head) = head_at(0) else {
                return;
            };
            let Ok(desc) = self.desc.read_descriptor(
                self.mem,
                u64::from(head) * DESC_BYTES,
                "descriptor table",
            ) else {
                return;
            };
            let addr = desc.addr().0;
            if let Some(p) = self.buffer_hint.host(addr) {
                prefetch(p);
            } else if let Some(Area::Host { ptr, region, start }) =
                host_range(self.mem, GuestAddress(addr), 1)
            {
                self.buffer_hint = RegionHint {
                    guest: addr - start as u64,
                    len: region.len(),
                    host: ptr.wrapping_sub(start),
                };
                prefetch(ptr);
            }
        }
    }

    /// Publishes `head` as used with `len` bytes written, and the new used
    /// index (release: the status and data written before are visible to a
    /// guest that reads the index). What it writes is marked dirty in the
    /// front-end's log when there is one (live migration), as vm-memory does.
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), RingError> {
        if head >= self.size {
            return Err(RingError::HeadOutOfRange {
                head,
                size: self.size,
            });
        }
        let slot = u64::from(self.next_used.0 % self.size);
        let offset = RING_HEADER + USED_ELEM * slot;
        self.used
            .write_used_elem(self.mem, offset, u32::from(head), len, "used ring")?;
        self.next_used += Wrapping(1);
        self.used.store_u16(
            self.mem,
            2,
            self.next_used.0,
            Ordering::Release,
            "used ring",
        )?;
        Ok(())
    }

    /// Whether the guest wants an interrupt for the `added` used entries
    /// published since the last time it was asked (virtio 1.2 2.7.10: with
    /// event-idx, when the used index passed `used_event`; without, always).
    pub fn needs_notification(&self, added: u16) -> Result<bool, RingError> {
        // The used index stores must be visible before used_event is read,
        // or a guest going to sleep meanwhile is never woken.
        fence(Ordering::SeqCst);
        if !self.event_idx {
            return Ok(true);
        }
        let used_event = Wrapping(self.avail.load_u16(
            self.mem,
            RING_HEADER + AVAIL_ELEM * u64::from(self.size),
            Ordering::Relaxed,
            "available ring",
        )?);
        let new = self.next_used;
        let old = new - Wrapping(added);
        Ok(new - used_event - Wrapping(1) < new - old)
    }

    /// Asks the guest for kicks again; true if entries arrived meanwhile
    /// (the caller goes on popping then).
    pub fn enable_notification(&mut self) -> Result<bool, RingError> {
        self.set_notification(true)?;
        // Re-read the available index after the store, or a kick the guest
        // skipped just before seeing it is lost.
        fence(Ordering::SeqCst);
        self.has_available()
    }

    /// Tells the guest it need not kick while the device is working.
    pub fn disable_notification(&mut self) -> Result<(), RingError> {
        self.set_notification(false)
    }

    fn set_notification(&mut self, enable: bool) -> Result<(), RingError> {
        if self.event_idx {
            // With event-idx a kick is due when the guest passes avail_event:
            // set it to where the device stands. Disabling needs no write
            // (the guest kicks once per avail_event value).
            if enable {
                let at = RING_HEADER + USED_ELEM * u64::from(self.size);
                self.used.store_u16(
                    self.mem,
                    at,
                    self.next_avail.0,
                    Ordering::Relaxed,
                    "used ring",
                )?;
            }
            Ok(())
        } else {
            // VRING_USED_F_NO_NOTIFY in the used ring's flags.
            let flags = if enable { 0 } else { 1 };
            self.used
                .store_u16(self.mem, 0, flags, Ordering::Relaxed, "used ring")
        }
    }
}

/// The descriptors of one chain, in order (virtio-queue's rules, see the
/// module docs). Ends early, with NEXT still set on the last descriptor
/// yielded, when the chain breaks a rule.
pub struct Chain<'r, 'm> {
    ring: &'r SplitRing<'m>,
    head: u16,
    table: Area<'m>,
    table_len: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    yielded: u32,
}

impl Chain<'_, '_> {
    /// The chain's head descriptor index (what the used ring returns).
    pub fn head_index(&self) -> u16 {
        self.head
    }

    /// Switches to the indirect table `desc` names; false if it is not allowed.
    fn enter_indirect(&mut self, addr: u64, len: u32) -> bool {
        if self.indirect || !len.is_multiple_of(DESC_BYTES as u32) {
            return false;
        }
        let entries = len / DESC_BYTES as u32;
        let Ok(entries) = u16::try_from(entries) else {
            return false;
        };
        let mem = self.ring.mem;
        let addr = GuestAddress(addr);
        self.table = match host_range(mem, addr, u64::from(len)) {
            // Aligned in host memory too: descriptors are read as words.
            Some(area @ Area::Host { ptr, .. })
                if addr.0.is_multiple_of(16) && (ptr as usize).is_multiple_of(16) =>
            {
                area
            }
            // Misaligned, straddling regions or outside guest memory: the
            // reads go through vm-memory, which refuses what is not there.
            _ => Area::Guest(addr),
        };
        self.table_len = entries;
        self.next = 0;
        self.ttl = entries;
        self.indirect = true;
        true
    }
}

impl Iterator for Chain<'_, '_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.table_len {
                return None;
            }
            let desc = self
                .table
                .read_descriptor(
                    self.ring.mem,
                    u64::from(self.next) * DESC_BYTES,
                    "descriptor table",
                )
                .ok()?;
            let (len, flags) = (desc.len(), desc.flags());
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                if !self.enter_indirect(desc.addr().0, len) {
                    return None;
                }
                continue;
            }
            self.yielded = self.yielded.checked_add(len)?;
            if flags & VIRTQ_DESC_F_NEXT != 0 {
                self.next = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueOwnedT;

    const F_NEXT: u16 = VIRTQ_DESC_F_NEXT;
    const F_WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap()
    }

    fn same(a: &Descriptor, b: &Descriptor) -> bool {
        a.addr() == b.addr() && a.len() == b.len() && a.flags() == b.flags() && a.next() == b.next()
    }

    /// Random descriptor tables (loops, indirect tables, nested indirect,
    /// indexes past the table, tables outside memory or across regions) at
    /// random ring positions (the 16-bit index wrapping included): both
    /// walks yield the same descriptors, the same heads, stop at the same
    /// point, and refuse the same runaway available indexes.
    #[test]
    fn walks_like_virtio_queue() {
        let mut rng = fastrand::Rng::with_seed(7);
        let (mut compared, mut long_chains, mut refused) = (0, 0, 0);
        for round in 0..2000 {
            let m = mem();
            let size: u16 = 1 << rng.u32(1..5);
            let vq = MockSplitQueue::create(&m, GuestAddress(0x1000), size);
            for i in 0..size {
                let addr = match rng.u32(0..6) {
                    0 => 0x8000 + 16 * rng.u64(0..8), // maybe an indirect table
                    1 => 0xfff8,                      // straddles the two regions
                    2 => 0x2_0000 - 8,                // runs off the end of memory
                    _ => rng.u64(0..0x2_0000),
                };
                let flags = rng.u16(0..8) | if rng.bool() { F_NEXT } else { 0 };
                let len = match rng.u32(0..3) {
                    0 => 16 * rng.u32(0..6),
                    1 => rng.u32(0..64),
                    _ => u32::MAX - rng.u32(0..2),
                };
                let next = rng.u16(0..size + 2);
                let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
                m.write_obj(d, vq.desc_table_addr().unchecked_add(16 * u64::from(i)))
                    .unwrap();
            }
            // Indirect tables full of random bytes (descriptors).
            let junk: Vec<u8> = (0..0x100).map(|_| rng.u8(..)).collect();
            m.write_slice(&junk, GuestAddress(0x8000)).unwrap();
            let heads = rng.u16(1..=size);
            // Anywhere in the index space, wrapping included.
            let start = rng.u16(..);
            for k in 0..heads {
                let head = rng.u16(0..size + 1);
                let slot = start.wrapping_add(k) % size;
                m.write_obj(head, vq.avail_addr().unchecked_add(4 + 2 * u64::from(slot)))
                    .unwrap();
            }
            // Now and then an available index more than a ring ahead:
            // both refuse it.
            let runaway = rng.u32(0..10) == 0;
            let avail_idx = if runaway {
                start.wrapping_add(size + 1 + rng.u16(0..100))
            } else {
                start.wrapping_add(heads)
            };
            m.write_obj(avail_idx, vq.avail_addr().unchecked_add(2))
                .unwrap();
            let mut reference: Queue = vq.create_queue().unwrap();
            reference.set_next_avail(start);
            let mut queue: Queue = vq.create_queue().unwrap();
            queue.set_next_avail(start);
            let mut ring = SplitRing::new(&queue, &m);
            if runaway {
                assert!(reference.iter(&m).is_err(), "round {round}");
                assert!(
                    matches!(ring.pop(), Err(RingError::AvailIndexAhead { .. })),
                    "round {round}"
                );
                assert!(!ring.has_available().unwrap());
                refused += 1;
                continue;
            }
            let mut popped = 0;
            let mut iter = reference.iter(&m).unwrap();
            loop {
                let theirs = iter.next();
                let ours = ring.pop().unwrap();
                match (theirs, ours) {
                    (None, None) => break,
                    (Some(t), Some(o)) => {
                        assert_eq!(t.head_index(), o.head_index(), "round {round}");
                        let t: Vec<Descriptor> = t.collect();
                        let o: Vec<Descriptor> = o.collect();
                        assert_eq!(t.len(), o.len(), "round {round}: {t:?} vs {o:?}");
                        assert!(t.iter().zip(&o).all(|(a, b)| same(a, b)), "round {round}");
                        popped += 1;
                        compared += o.len();
                        long_chains += usize::from(o.len() > 2);
                    }
                    (t, o) => panic!("round {round}: {:?} vs {:?}", t.is_some(), o.is_some()),
                }
            }
            assert_eq!(popped, heads, "round {round}");
            assert_eq!(ring.next_avail(), reference.next_avail());
        }
        // The random tables are not all trivial.
        assert!(
            compared > 5000 && long_chains > 200 && refused > 100,
            "{compared} {long_chains} {refused}"
        );
    }

    /// The used ring: same bytes as virtio-queue's add_used, and the same
    /// interrupt decisions as its needs_notification for every used_event.
    #[test]
    fn used_ring_and_notification_like_virtio_queue() {
        let m = mem();
        let vq = MockSplitQueue::create(&m, GuestAddress(0x1000), 8);
        let raw = [RawDescriptor::from(Descriptor::new(0x4000, 1, F_WRITE, 0))];
        vq.add_desc_chains(&raw, 0).unwrap();
        let mut reference: Queue = vq.create_queue().unwrap();
        reference.set_event_idx(true);
        let other = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let vq2 = MockSplitQueue::create(&other, GuestAddress(0x1000), 8);
        vq2.add_desc_chains(&raw, 0).unwrap();
        let mut queue: Queue = vq2.create_queue().unwrap();
        queue.set_event_idx(true);
        let used_event_at = vq.avail_addr().unchecked_add(4 + 2 * 8);
        let mut added = 0u16;
        for step in 0..40u16 {
            let used_event = step.wrapping_mul(7) % 11;
            m.write_obj(used_event, used_event_at).unwrap();
            other.write_obj(used_event, used_event_at).unwrap();
            let n = step % 3;
            for j in 0..n {
                reference.add_used(&m, j % 8, u32::from(step)).unwrap();
                let mut ring = SplitRing::new(&queue, &other);
                ring.add_used(j % 8, u32::from(step)).unwrap();
                ring.store_indexes(&mut queue);
                added += 1;
            }
            let theirs = reference.needs_notification(&m).unwrap();
            let ring = SplitRing::new(&queue, &other);
            assert_eq!(
                ring.needs_notification(added).unwrap(),
                theirs,
                "step {step}"
            );
            added = 0;
        }
        let mut a = vec![0u8; 4 + 8 * 8 + 2];
        let mut b = a.clone();
        m.read_slice(&mut a, vq.used_addr()).unwrap();
        other.read_slice(&mut b, vq2.used_addr()).unwrap();
        assert_eq!(a, b);
        let mut ring = SplitRing::new(&queue, &other);
        assert_eq!(
            ring.add_used(8, 0),
            Err(RingError::HeadOutOfRange { head: 8, size: 8 })
        );
    }

    #[test]
    fn notification_flags_and_avail_event() {
        let m = mem();
        let vq = MockSplitQueue::create(&m, GuestAddress(0x1000), 4);
        let raw = [RawDescriptor::from(Descriptor::new(0x4000, 1, F_WRITE, 0))];
        vq.add_desc_chains(&raw, 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        // Without event-idx: NO_NOTIFY in the used flags.
        let mut ring = SplitRing::new(&queue, &m);
        ring.disable_notification().unwrap();
        assert_eq!(m.read_obj::<u16>(vq.used_addr()).unwrap(), 1);
        assert!(
            ring.enable_notification().unwrap(),
            "one chain is available"
        );
        assert_eq!(m.read_obj::<u16>(vq.used_addr()).unwrap(), 0);
        let chain = ring.pop().unwrap().unwrap();
        assert_eq!(chain.count(), 1);
        assert!(!ring.enable_notification().unwrap());
        ring.store_indexes(&mut queue);
        assert_eq!(queue.next_avail(), 1);
        // With event-idx: avail_event = next_avail.
        queue.set_event_idx(true);
        let mut ring = SplitRing::new(&queue, &m);
        assert!(!ring.enable_notification().unwrap());
        let avail_event = vq.used_addr().unchecked_add(4 + 8 * 4);
        assert_eq!(m.read_obj::<u16>(avail_event).unwrap(), 1);
    }

    #[test]
    fn refuses_rings_outside_memory_and_runaway_avail_index() {
        let m = mem();
        let vq = MockSplitQueue::create(&m, GuestAddress(0x1000), 4);
        let raw = [RawDescriptor::from(Descriptor::new(0x4000, 1, F_WRITE, 0))];
        vq.add_desc_chains(&raw, 0).unwrap();
        // A used ring running off the end of guest memory.
        let mut queue: Queue = vq.create_queue().unwrap();
        queue.set_used_ring_address(Some(0x1_fff8), Some(0));
        let mut ring = SplitRing::new(&queue, &m);
        assert_eq!(ring.pop().unwrap().unwrap().count(), 1);
        assert!(matches!(
            ring.add_used(0, 1),
            Err(RingError::Access {
                area: "used ring",
                ..
            })
        ));
        // The guest's available index a whole ring ahead.
        let queue: Queue = vq.create_queue().unwrap();
        m.write_obj(9u16, vq.avail_addr().unchecked_add(2)).unwrap();
        let mut ring = SplitRing::new(&queue, &m);
        assert!(matches!(
            ring.pop(),
            Err(RingError::AvailIndexAhead { avail: 9, .. })
        ));
        // A stopped queue gives nothing, but still takes completions.
        let mut not_ready: Queue = vq.create_queue().unwrap();
        not_ready.set_ready(false);
        let mut ring = SplitRing::new(&not_ready, &m);
        assert!(matches!(ring.pop(), Err(RingError::NotReady)));
        ring.add_used(0, 1).unwrap();
        assert_eq!(ring.next_used(), 1);
    }

    /// A region at an odd guest address puts aligned guest addresses at
    /// misaligned host addresses: no atomic access through such a pointer
    /// (undefined behaviour); vm-memory refuses the access instead, as it
    /// does for virtio-queue.
    #[test]
    fn misaligned_host_addresses_go_through_vm_memory() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1001), 0x10000)]).unwrap();
        let mut queue = Queue::new(16).unwrap();
        queue.set_size(16);
        queue.set_desc_table_address(Some(0x2000), Some(0));
        queue.set_avail_ring_address(Some(0x3000), Some(0));
        queue.set_used_ring_address(Some(0x4000), Some(0));
        queue.set_ready(true);
        let mut ring = SplitRing::new(&queue, &m);
        assert!(matches!(ring.avail, Area::Guest(_)));
        assert!(matches!(ring.used, Area::Guest(_)));
        assert!(matches!(ring.pop(), Err(RingError::Access { .. })));
        assert!(matches!(ring.add_used(0, 1), Err(RingError::Access { .. })));
    }

    /// Rings that straddle two regions work through vm-memory.
    #[test]
    fn rings_across_regions() {
        let m = mem();
        // A 16-entry queue whose descriptor table crosses 0x10000.
        let vq = MockSplitQueue::create(&m, GuestAddress(0xff80), 16);
        let raw = [
            RawDescriptor::from(Descriptor::new(0x4000, 16, F_NEXT, 1)),
            RawDescriptor::from(Descriptor::new(0x5000, 1, F_WRITE, 0)),
        ];
        vq.add_desc_chains(&raw, 0).unwrap();
        let queue: Queue = vq.create_queue().unwrap();
        let mut ring = SplitRing::new(&queue, &m);
        assert!(matches!(ring.desc, Area::Guest(_)));
        let d: Vec<Descriptor> = ring.pop().unwrap().unwrap().collect();
        assert_eq!(d.len(), 2);
        assert_eq!(d[1].addr(), GuestAddress(0x5000));
        ring.add_used(0, 1).unwrap();
        assert_eq!(
            m.read_obj::<u16>(vq.used_addr().unchecked_add(2)).unwrap(),
            1
        );
    }
}
