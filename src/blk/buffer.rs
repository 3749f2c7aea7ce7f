//! Data buffers of a request, as host-virtual iovecs into guest memory.
//!
//! A virtio-blk request's data lives in guest memory that QEMU shared with us
//! (memfd). Targets move data straight between that memory and the network
//! (`readv`/`writev` on TCP, RDMA on iSER), so a request carries its buffers as
//! host addresses rather than as copies. This module is the guest-memory edge:
//! it is the only place that turns guest addresses into host pointers. The
//! [`GuestBuffers`] it builds borrow the worker's memory snapshot (a target that
//! serves the request at once is done before the borrow ends); the
//! [`IoBuffers`] they turn into keep the guest memory mapping alive for as long
//! as a target may touch it, even if the frontend replaces the memory table
//! meanwhile.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use libc::iovec;
use smallvec::SmallVec;
use thiserror::Error;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// The guest memory type used throughout the backend. Each region carries a
/// dirty-page bitmap that the frontend's log (live migration) can be plugged
/// into: writes through vm-memory (used ring, status bytes) mark it by
/// themselves, the data the targets move behind vm-memory's back is marked
/// with [`mark_dirty`].
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<BitmapMmapRegion>;

/// Marks the guest range `addr..addr+len` dirty in the frontend's log, so a
/// live migration copies it again. For data written into guest memory without
/// vm-memory (`readv`, RDMA by the target, copies through host pointers); call
/// it after the bytes are written and before the request's used entry is
/// published. Parts outside guest memory are ignored (nothing was written
/// there). Costs a region lookup per range: callers check whether logging is on
/// first.
pub fn mark_dirty(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) {
    let mut cur = addr;
    let mut left = len;
    while left > 0 {
        let Some((region, offset)) = mem.to_region_addr(cur) else {
            return;
        };
        let take = (region.len() - offset.0).min(left);
        region.bitmap().mark_dirty(offset.0 as usize, take as usize);
        left -= take;
        match cur.checked_add(take) {
            Some(next) => cur = next,
            None => return,
        }
    }
}

/// Reads the 16 bytes at `addr` of guest memory as two little-endian words,
/// when they lie inside one region (None otherwise: the caller falls back to
/// vm-memory's general path). For the request header, read once per request:
/// vm-memory's `read_slice` walks an iterator of slices and calls memcpy for
/// 16 bytes, and a byte-array copy is 16 byte loads and stores whose fields
/// are then loaded back as words, which stalls (both were a tenth of the
/// worker's time at depth).
pub fn read_words_in_region(mem: &GuestMemoryMmap, addr: GuestAddress) -> Option<[u64; 2]> {
    let (region, offset) = mem.to_region_addr(addr)?;
    if offset.0.checked_add(16)? > region.len() {
        return None;
    }
    let ptr = region.get_host_address(offset).ok()?;
    let misalign = (ptr as usize) % 8;
    if misalign == 0 {
        // SAFETY: `ptr..ptr+16` lies inside the region's mapping (checked
        // above), which the memory snapshot `mem` keeps mapped, and is
        // 8-aligned. The guest may write these bytes concurrently: atomic
        // loads (plain moves on x86) take one copy of each word and the
        // caller validates what it got.
        let (lo, hi) = unsafe {
            let p = ptr.cast::<u64>();
            (
                AtomicU64::from_ptr(p).load(Ordering::Relaxed),
                AtomicU64::from_ptr(p.add(1)).load(Ordering::Relaxed),
            )
        };
        return Some([u64::from_le(lo), u64::from_le(hi)]);
    }
    // Misaligned (libblkio's headers are): the three aligned words around
    // the 16 bytes, shifted together, when they too lie inside the region.
    let inside = offset
        .0
        .checked_sub(misalign as u64)
        .is_some_and(|start| start + 24 <= region.len());
    if cfg!(target_endian = "little") && inside {
        // SAFETY: `ptr - misalign .. +24` lies inside the region's mapping
        // (checked just above: the offsets are inside the region), which
        // `mem` keeps mapped, and is 8-aligned by construction. Atomic
        // loads for the reason above.
        let (w0, w1, w2) = unsafe {
            let p = ptr.sub(misalign).cast::<u64>();
            (
                AtomicU64::from_ptr(p).load(Ordering::Relaxed),
                AtomicU64::from_ptr(p.add(1)).load(Ordering::Relaxed),
                AtomicU64::from_ptr(p.add(2)).load(Ordering::Relaxed),
            )
        };
        // Little-endian: the byte at `ptr` is the low byte of the result.
        let sh = (misalign * 8) as u32;
        let join = |a: u64, b: u64| (a >> sh) | (b << (64 - sh));
        return Some([join(w0, w1), join(w1, w2)]);
    }
    // SAFETY: `ptr..ptr+16` lies inside the mapping (checked above); [u8;
    // 16] has alignment 1 and a volatile read takes one copy.
    let b = unsafe { std::ptr::read_volatile(ptr.cast::<[u8; 16]>()) };
    let word = |i: usize| {
        u64::from_le_bytes([
            b[i],
            b[i + 1],
            b[i + 2],
            b[i + 3],
            b[i + 4],
            b[i + 5],
            b[i + 6],
            b[i + 7],
        ])
    };
    Some([word(0), word(8)])
}

/// Writes one byte at `addr` of guest memory and logs it dirty, as
/// vm-memory's `write_obj` does, through one region lookup and a plain store
/// (the status byte of every request; vm-memory's generic path costs a slice
/// iterator and a `memcpy` call). False if `addr` is not guest memory.
pub fn write_byte(mem: &GuestMemoryMmap, addr: GuestAddress, value: u8) -> bool {
    let Some((region, offset)) = mem.to_region_addr(addr) else {
        return false;
    };
    let Ok(ptr) = region.get_host_address(offset) else {
        return false;
    };
    // SAFETY: `ptr` is the host address of a byte inside the region's
    // mapping (`to_region_addr` found it there), which the snapshot `mem`
    // keeps mapped. The guest may access the byte concurrently: a volatile
    // store of one byte.
    unsafe { std::ptr::write_volatile(ptr, value) };
    region.bitmap().mark_dirty(offset.0 as usize, 1);
    true
}

/// Why a guest buffer could not be added to a request.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum BufferError {
    /// Part of the range is not backed by any guest memory region.
    #[error("guest address range {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange {
        /// Guest address of the descriptor.
        addr: u64,
        /// Length of the descriptor.
        len: u32,
    },
}

/// Scatter-gather list of one request's data, in host-virtual addresses.
///
/// Holds a reference to the memory mapping it points into, so the pointers stay
/// valid until the request is dropped. (Inside a [`GuestBuffers`] it holds
/// none: the borrow of the snapshot does that job.)
pub struct IoBuffers {
    /// Most requests have one to four segments: keep them inline, no allocation.
    iov: SmallVec<[iovec; 4]>,
    len: u64,
    /// Keeps the mapping (guest memory, or a test's own buffer) alive.
    _owner: Option<Arc<dyn Any + Send + Sync>>,
}

// SAFETY: the raw pointers in `iov` point into a mapping owned by `_owner`
// (shared guest memory or a heap buffer), which is Send + Sync, or, inside a
// GuestBuffers, borrowed for its lifetime from a Send + Sync snapshot; an IoBuffers is
// used by one request at a time, so moving it between threads is sound.
unsafe impl Send for IoBuffers {}

// SAFETY: shared access only reads the iovec list; the bytes behind it are
// guest memory, which the guest itself may change at any time, so copies in
// and out through `&IoBuffers` are byte copies of shared memory, never
// references into it.
unsafe impl Sync for IoBuffers {}

impl std::fmt::Debug for IoBuffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuffers")
            .field("segments", &self.iov.len())
            .field("len", &self.len)
            .finish()
    }
}

impl IoBuffers {
    /// An empty buffer list that owns nothing (requests without data).
    pub fn empty() -> Self {
        IoBuffers {
            iov: SmallVec::new(),
            len: 0,
            _owner: None,
        }
    }

    /// A buffer list over a heap buffer owned by the list (tests, bounce buffers).
    pub fn from_vec(buf: Vec<u8>) -> Self {
        let mut buf = buf.into_boxed_slice();
        let len = buf.len();
        let base = buf.as_mut_ptr();
        let owner: Arc<dyn Any + Send + Sync> = Arc::new(OwnedBuf(buf));
        IoBuffers {
            iov: if len == 0 {
                SmallVec::new()
            } else {
                smallvec::smallvec![iovec {
                    iov_base: base.cast(),
                    iov_len: len,
                }]
            },
            len: len as u64,
            _owner: Some(owner),
        }
    }

    fn push_raw(&mut self, base: *mut u8, len: usize) {
        if len == 0 {
            return;
        }
        // Merge with the previous segment when the guest buffer is contiguous in
        // host memory: fewer iovecs and, on iSER, fewer commands.
        if let Some(last) = self.iov.last_mut() {
            // SAFETY: pointer arithmetic only, no dereference; the result is compared.
            let end = unsafe { last.iov_base.cast::<u8>().add(last.iov_len) };
            if end == base {
                last.iov_len += len;
                self.len += len as u64;
                return;
            }
        }
        self.iov.push(iovec {
            iov_base: base.cast(),
            iov_len: len,
        });
        self.len += len as u64;
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there is no data.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segments, for `readv`/`writev` or memory registration lookups.
    pub fn iovecs(&self) -> &[iovec] {
        &self.iov
    }

    /// Appends to `out` the iovecs that cover `offset..offset+len` of this buffer.
    ///
    /// Returns the number of bytes covered (less than `len` if the range runs past the end).
    pub fn iovecs_range(&self, mut offset: u64, len: u64, out: &mut Vec<iovec>) -> u64 {
        let mut left = len;
        for seg in &self.iov {
            if left == 0 {
                break;
            }
            let seg_len = seg.iov_len as u64;
            if offset >= seg_len {
                offset -= seg_len;
                continue;
            }
            let take = (seg_len - offset).min(left);
            out.push(iovec {
                // SAFETY: offset < seg_len, so the pointer stays inside the segment.
                iov_base: unsafe { seg.iov_base.cast::<u8>().add(offset as usize) }.cast(),
                iov_len: take as usize,
            });
            left -= take;
            offset = 0;
        }
        len - left
    }

    /// Copies bytes out of the buffer starting at `offset` into `dst`; returns bytes copied.
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) -> usize {
        let mut done = 0;
        self.for_each_range(offset, dst.len() as u64, |ptr, n| {
            // SAFETY: `ptr..ptr+n` lies inside a live segment (see for_each_range)
            // and `dst[done..done+n]` is in bounds; guest memory may change
            // concurrently, which only affects the bytes read, not soundness of u8 copies.
            unsafe { std::ptr::copy_nonoverlapping(ptr, dst.as_mut_ptr().add(done), n) };
            done += n;
        });
        done
    }

    /// Copies `src` into the buffer starting at `offset`; returns bytes copied.
    pub fn write_at(&self, offset: u64, src: &[u8]) -> usize {
        let mut done = 0;
        self.for_each_range(offset, src.len() as u64, |ptr, n| {
            // SAFETY: as in read_at; the segment is writable guest memory or our own buffer.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), ptr, n) };
            done += n;
        });
        done
    }

    /// Fills `offset..offset+len` with zeroes; returns bytes written.
    pub fn fill_zero(&self, offset: u64, len: u64) -> u64 {
        let mut done = 0u64;
        self.for_each_range(offset, len, |ptr, n| {
            // SAFETY: as in write_at.
            unsafe { std::ptr::write_bytes(ptr, 0, n) };
            done += n as u64;
        });
        done
    }

    fn for_each_range(&self, offset: u64, len: u64, mut f: impl FnMut(*mut u8, usize)) {
        let mut skip = offset;
        let mut left = len;
        for seg in &self.iov {
            if left == 0 {
                break;
            }
            let seg_len = seg.iov_len as u64;
            if skip >= seg_len {
                skip -= seg_len;
                continue;
            }
            let n = (seg_len - skip).min(left);
            // SAFETY: skip < seg_len, the pointer stays inside the segment.
            let ptr = unsafe { seg.iov_base.cast::<u8>().add(skip as usize) };
            f(ptr, n as usize);
            left -= n;
            skip = 0;
        }
    }
}

/// A request's buffers while the worker holds the guest memory snapshot they
/// point into: borrowed from it, so building one costs no reference count.
///
/// Every request is parsed into one. A target that serves requests at once
/// ([`QueueTarget::execute`](super::target::QueueTarget::execute)) reads and
/// writes through it and is done before the borrow ends; for a target that
/// keeps requests, [`GuestBuffers::into_owned`] makes the [`IoBuffers`] that
/// keeps the mapping alive. Why not always own: the reference count is an
/// atomic increment at parse and a decrement at drop, and right after a
/// 4 KiB copy into guest memory the decrement waits for those stores to
/// drain (2-3 % of the IOPS of one queue at depth 128, null target).
pub struct GuestBuffers<'m> {
    mem: &'m Arc<GuestMemoryMmap>,
    /// Owns nothing: `mem` outlives it, and only `&IoBuffers` is lent out
    /// (an `IoBuffers` cannot be cloned), so no copy of the data outlives the
    /// borrow. Its raw `iovecs` can be copied, though: they must not go to
    /// anything that uses them after the borrow (a receive plan of the
    /// transports); such users take owned buffers.
    bufs: IoBuffers,
}

impl std::fmt::Debug for GuestBuffers<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.bufs.fmt(f)
    }
}

impl<'m> GuestBuffers<'m> {
    /// An empty buffer list over the snapshot `mem`.
    pub fn new(mem: &'m Arc<GuestMemoryMmap>) -> Self {
        GuestBuffers {
            mem,
            bufs: IoBuffers::empty(),
        }
    }

    /// Adds the guest range `addr..addr+len`, split at memory region boundaries.
    pub fn push_guest(&mut self, addr: GuestAddress, len: u32) -> Result<(), BufferError> {
        let mem: &GuestMemoryMmap = self.mem;
        let err = BufferError::OutOfRange { addr: addr.0, len };
        let mut cur = addr;
        let mut left = len as usize;
        while left > 0 {
            let (region, offset) = mem.to_region_addr(cur).ok_or_else(|| err.clone())?;
            let avail = (region.len() - offset.0) as usize;
            let take = avail.min(left);
            let host = region.get_host_address(offset).map_err(|_| err.clone())?;
            self.bufs.push_raw(host, take);
            left -= take;
            cur = cur.checked_add(take as u64).ok_or_else(|| err.clone())?;
        }
        Ok(())
    }

    /// The same buffers, keeping the mapping alive on their own (for a
    /// target that completes later, on its own schedule).
    pub fn into_owned(self) -> IoBuffers {
        // No data (flush, discard): nothing to keep mapped.
        let owner: Option<Arc<dyn Any + Send + Sync>> = if self.bufs.iov.is_empty() {
            None
        } else {
            Some(self.mem.clone())
        };
        IoBuffers {
            _owner: owner,
            ..self.bufs
        }
    }
}

impl std::borrow::Borrow<IoBuffers> for GuestBuffers<'_> {
    fn borrow(&self) -> &IoBuffers {
        &self.bufs
    }
}

impl std::ops::Deref for GuestBuffers<'_> {
    type Target = IoBuffers;

    fn deref(&self) -> &IoBuffers {
        &self.bufs
    }
}

struct OwnedBuf(#[allow(dead_code)] Box<[u8]>);

#[cfg(test)]
mod tests {
    use super::*;

    fn two_region_mem() -> Arc<GuestMemoryMmap> {
        Arc::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0x1000), 0x1000),
                (GuestAddress(0x2000), 0x1000),
                (GuestAddress(0x10000), 0x1000),
            ])
            .unwrap(),
        )
    }

    #[test]
    fn read_words_only_inside_one_region() {
        let mem = two_region_mem();
        let bytes: Vec<u8> = (0..32u8).collect();
        vm_memory::Bytes::write_slice(&*mem, &bytes, GuestAddress(0x1fe0)).unwrap();
        let words = |at: usize| {
            let w = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
            Some([w(at), w(at + 8)])
        };
        // Aligned (word loads) and misaligned (three words shifted
        // together) give the same. (The byte copy is for regions whose host
        // address or length is not a multiple of 8, which mmap does not make.)
        for at in 0..8 {
            assert_eq!(
                read_words_in_region(&mem, GuestAddress(0x1fe0 + at as u64)),
                words(at),
                "at +{at}"
            );
        }
        assert_eq!(read_words_in_region(&mem, GuestAddress(0x1ff0)), words(16));
        // The third word ends exactly at the region's end.
        assert_eq!(read_words_in_region(&mem, GuestAddress(0x1fef)), words(15));
        // Crossing into the next region: the caller's general path must do it.
        assert_eq!(read_words_in_region(&mem, GuestAddress(0x1ff8)), None);
        assert_eq!(read_words_in_region(&mem, GuestAddress(0x1ff1)), None);
        // Outside guest memory, and at the very top of the address space.
        assert_eq!(read_words_in_region(&mem, GuestAddress(0x3000)), None);
        assert_eq!(read_words_in_region(&mem, GuestAddress(u64::MAX - 4)), None);
        assert_eq!(read_words_in_region(&mem, GuestAddress(0x10ff8)), None);
    }

    #[test]
    fn write_byte_inside_guest_memory_only() {
        use vm_memory::Bytes;
        let mem = two_region_mem();
        assert!(write_byte(&mem, GuestAddress(0x2fff), 0xab));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2fff)).unwrap(), 0xab);
        assert!(write_byte(&mem, GuestAddress(0x10000), 7));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10000)).unwrap(), 7);
        // Between the regions and past the end: refused, nothing written.
        assert!(!write_byte(&mem, GuestAddress(0x3000), 1));
        assert!(!write_byte(&mem, GuestAddress(0x11000), 1));
        assert!(!write_byte(&mem, GuestAddress(u64::MAX), 1));
    }

    #[test]
    fn splits_at_region_boundary_and_roundtrips() {
        let mem = two_region_mem();
        let mut b = GuestBuffers::new(&mem);
        b.push_guest(GuestAddress(0x1f00), 0x200).unwrap();
        assert_eq!(b.len(), 0x200);
        // Two distinct mmaps are not contiguous in host memory (in general).
        assert!(!b.iovecs().is_empty());
        let data: Vec<u8> = (0..0x200u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(b.write_at(0, &data), 0x200);
        let mut back = vec![0u8; 0x200];
        assert_eq!(b.read_at(0, &mut back), 0x200);
        assert_eq!(back, data);
        let mut vm_back = vec![0u8; 0x200];
        vm_memory::Bytes::read_slice(&*mem, &mut vm_back, GuestAddress(0x1f00)).unwrap();
        assert_eq!(vm_back, data);
    }

    #[test]
    fn borrowed_buffers_take_no_reference_and_owned_ones_keep_the_mapping() {
        let mem = two_region_mem();
        let mut b = GuestBuffers::new(&mem);
        b.push_guest(GuestAddress(0x1100), 0x200).unwrap();
        assert_eq!(Arc::strong_count(&mem), 1, "parsing takes no reference");
        assert_eq!(b.write_at(0, &[7u8; 0x200]), 0x200);
        let owned = b.into_owned();
        assert_eq!(
            Arc::strong_count(&mem),
            2,
            "an owned list keeps the mapping"
        );
        drop(mem);
        // The mapping is still there for the owned list alone.
        let mut back = [0u8; 0x200];
        assert_eq!(owned.read_at(0, &mut back), 0x200);
        assert!(back.iter().all(|&x| x == 7));

        // Without data (flush, discard) there is nothing to keep mapped.
        let mem = two_region_mem();
        let empty = GuestBuffers::new(&mem).into_owned();
        assert!(empty.is_empty());
        assert_eq!(Arc::strong_count(&mem), 1);
    }

    #[test]
    fn rejects_out_of_range() {
        let mem = two_region_mem();
        let mut b = GuestBuffers::new(&mem);
        assert!(b.push_guest(GuestAddress(0x2f00), 0x200).is_err());
        assert!(b.push_guest(GuestAddress(0x5000), 1).is_err());
        assert!(b.push_guest(GuestAddress(u64::MAX - 10), 100).is_err());
    }

    #[test]
    fn iovecs_range_and_partial_copies() {
        let b = IoBuffers::from_vec((0..100u8).collect());
        let mut out = Vec::new();
        assert_eq!(b.iovecs_range(10, 20, &mut out), 20);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].iov_len, 20);
        out.clear();
        assert_eq!(b.iovecs_range(90, 20, &mut out), 10);
        let mut dst = [0u8; 8];
        assert_eq!(b.read_at(96, &mut dst), 4);
        assert_eq!(&dst[..4], &[96, 97, 98, 99]);
        assert_eq!(b.fill_zero(98, 10), 2);
        assert_eq!(b.read_at(96, &mut dst), 4);
        assert_eq!(&dst[..4], &[96, 97, 0, 0]);
    }
}
