//! Protection domains, memory regions and a registered buffer pool.
//!
//! Registered memory is shared with the RDMA device and, with remote access
//! rights, with the peer, which may write it at any time. It is therefore
//! never exposed as a Rust reference: [`RegisteredPool`] copies in and out
//! through raw pointers, and [`MemoryRegion::register`] is `unsafe` because
//! the caller vouches for the lifetime of foreign memory.

use super::cm_id::IdInner;
use super::qp::Sge;
use super::{last_err, Result, VerbsError};
use rdma_sys::{
    ibv_access_flags, ibv_alloc_pd, ibv_context, ibv_dealloc_pd, ibv_dereg_mr, ibv_mr, ibv_pd,
    ibv_reg_mr,
};
use std::alloc::Layout;
use std::fmt;
use std::ops::BitOr;
use std::sync::Arc;

/// Owned `ibv_pd`, shared by the MRs and QPs created on it.
pub(crate) struct PdInner {
    pd: *mut ibv_pd,
    _id: Arc<IdInner>,
}

// SAFETY: libibverbs PD calls are thread-safe; pd is a handle owned here.
unsafe impl Send for PdInner {}
// SAFETY: as above.
unsafe impl Sync for PdInner {}

impl Drop for PdInner {
    fn drop(&mut self) {
        // SAFETY: pd came from ibv_alloc_pd and is freed once, after every
        // MR and QP on it (they hold an Arc to self).
        unsafe { ibv_dealloc_pd(self.pd) };
    }
}

/// A protection domain: memory regions and queue pairs of one connection.
#[derive(Clone)]
pub struct ProtectionDomain {
    inner: Arc<PdInner>,
}

impl fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProtectionDomain").finish_non_exhaustive()
    }
}

impl ProtectionDomain {
    pub(crate) fn new(id: Arc<IdInner>) -> Result<Self> {
        let ctx = id.verbs()?;
        // SAFETY: ctx is live (id is held).
        let pd = unsafe { ibv_alloc_pd(ctx) };
        if pd.is_null() {
            return Err(last_err("ibv_alloc_pd"));
        }
        Ok(ProtectionDomain {
            inner: Arc::new(PdInner { pd, _id: id }),
        })
    }

    pub(crate) fn raw(&self) -> *mut ibv_pd {
        self.inner.pd
    }

    pub(crate) fn inner(&self) -> &Arc<PdInner> {
        &self.inner
    }

    pub(crate) fn context(&self) -> *mut ibv_context {
        // SAFETY: pd is live while self is.
        unsafe { (*self.inner.pd).context }
    }
}

/// Access rights of a memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access(u32);

impl Access {
    /// The local device may write (needed for receives and RDMA Read targets).
    pub const LOCAL_WRITE: Access = Access(ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0);
    /// The peer may RDMA Read.
    pub const REMOTE_READ: Access = Access(ibv_access_flags::IBV_ACCESS_REMOTE_READ.0);
    /// The peer may RDMA Write.
    pub const REMOTE_WRITE: Access = Access(ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0);
    /// What iSER data buffers need: LOCAL_WRITE | REMOTE_READ | REMOTE_WRITE.
    pub const ISER_DATA: Access = Access(
        ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0
            | ibv_access_flags::IBV_ACCESS_REMOTE_READ.0
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0,
    );

    /// The raw `ibv_access_flags` bits.
    pub fn bits(self) -> u32 {
        self.0
    }
}

impl BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        Access(self.0 | rhs.0)
    }
}

/// A registered memory region (`ibv_reg_mr`), deregistered on drop.
pub struct MemoryRegion {
    mr: *mut ibv_mr,
    _pd: Arc<PdInner>,
}

// SAFETY: ibv_mr is an immutable handle after registration; dereg is
// thread-safe; the memory itself is governed by register()'s contract.
unsafe impl Send for MemoryRegion {}
// SAFETY: as above; &self only reads the immutable key/address fields.
unsafe impl Sync for MemoryRegion {}

impl fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len())
            .field("lkey", &format_args!("{:#x}", self.lkey()))
            .field("rkey", &format_args!("{:#x}", self.rkey()))
            .finish()
    }
}

impl MemoryRegion {
    /// Registers `len` bytes at `addr` with `access`.
    ///
    /// # Safety
    /// `addr..addr+len` must be mapped memory that stays allocated and
    /// mapped until this region is dropped. The caller accepts that the
    /// device (and, with remote rights, the peer) reads and writes it
    /// asynchronously: it must not hold Rust references into it while an
    /// operation that may write it is outstanding.
    pub unsafe fn register(
        pd: &ProtectionDomain,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<MemoryRegion> {
        if addr.is_null() || len == 0 {
            return Err(VerbsError::InvalidArgument(
                "cannot register an empty or NULL memory range".into(),
            ));
        }
        let access = libc::c_int::try_from(access.0)
            .map_err(|_| VerbsError::InvalidArgument("access flags out of range".into()))?;
        // SAFETY: pd is live; the range is valid per this function's contract.
        let mr = unsafe { ibv_reg_mr(pd.raw(), addr.cast(), len, access) };
        if mr.is_null() {
            return Err(last_err("ibv_reg_mr"));
        }
        Ok(MemoryRegion {
            mr,
            _pd: pd.inner().clone(),
        })
    }

    /// Local key (for SGEs of local work requests).
    pub fn lkey(&self) -> u32 {
        // SAFETY: mr is live while self is; fields are immutable.
        unsafe { (*self.mr).lkey }
    }

    /// Remote key (the STag advertised to the peer).
    pub fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.mr).rkey }
    }

    /// Start address of the region.
    pub fn addr(&self) -> u64 {
        // SAFETY: as above.
        unsafe { (*self.mr).addr as u64 }
    }

    /// Length of the region in bytes.
    pub fn len(&self) -> usize {
        // SAFETY: as above.
        unsafe { (*self.mr).length }
    }

    /// True if the region is empty (never: registration rejects it).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An SGE for `len` bytes at `offset` into the region, bounds checked.
    pub fn sge(&self, offset: usize, len: usize) -> Result<Sge> {
        match range_in(self.len(), offset, len) {
            Some(l) => Ok(Sge::new(self.addr() + offset as u64, l, self.lkey())),
            None => Err(VerbsError::InvalidArgument(format!(
                "SGE {offset}+{len} outside memory region of {} bytes",
                self.len()
            ))),
        }
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: mr came from ibv_reg_mr and is deregistered once.
        unsafe { ibv_dereg_mr(self.mr) };
    }
}

/// Page-aligned heap memory owned by a pool.
struct PoolMem {
    ptr: *mut u8,
    layout: Layout,
}

impl Drop for PoolMem {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in RegisteredPool::new.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// A pool of `count` fixed-size buffers carved from one registered,
/// page-aligned allocation: the home of iSER control PDUs (headers, login
/// buffers) and, in tests, RDMA targets. Buffers are handed out by index.
pub struct RegisteredPool {
    // Field order matters: the MR is deregistered before the memory is freed.
    mr: MemoryRegion,
    mem: PoolMem,
    buf_size: usize,
    count: usize,
    free: Vec<usize>,
    in_use: Vec<bool>,
}

// SAFETY: the pool exclusively owns its allocation; all access goes through
// &self/&mut self methods that copy via raw pointers.
unsafe impl Send for RegisteredPool {}

impl fmt::Debug for RegisteredPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisteredPool")
            .field("buf_size", &self.buf_size)
            .field("count", &self.count)
            .field("free", &self.free.len())
            .field("mr", &self.mr)
            .finish()
    }
}

const PAGE: usize = 4096;

/// `len` as u32 if `offset..offset+len` lies inside a region of `total`
/// bytes (an SGE length is 32 bits).
fn range_in(total: usize, offset: usize, len: usize) -> Option<u32> {
    offset.checked_add(len).filter(|&e| e <= total)?;
    u32::try_from(len).ok()
}

/// Byte offset of `offset..offset+len` inside buffer `idx` of a pool of
/// `count` buffers of `buf_size` bytes, if it fits that buffer.
fn pool_offset(
    count: usize,
    buf_size: usize,
    idx: usize,
    offset: usize,
    len: usize,
) -> Option<usize> {
    if idx >= count {
        return None;
    }
    offset.checked_add(len).filter(|&e| e <= buf_size)?;
    idx.checked_mul(buf_size)?.checked_add(offset)
}

impl RegisteredPool {
    /// Allocates `count` zeroed buffers of `buf_size` bytes and registers
    /// them as one region with `access`.
    pub fn new(
        pd: &ProtectionDomain,
        buf_size: usize,
        count: usize,
        access: Access,
    ) -> Result<RegisteredPool> {
        let total = buf_size
            .checked_mul(count)
            .filter(|&t| t > 0)
            .ok_or_else(|| {
                VerbsError::InvalidArgument(format!(
                    "pool of {count} buffers of {buf_size} bytes is empty or too large"
                ))
            })?;
        let layout = Layout::from_size_align(total, PAGE)
            .map_err(|e| VerbsError::InvalidArgument(format!("pool layout: {e}")))?;
        // SAFETY: layout has non-zero size (checked above).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(VerbsError::InvalidArgument(format!(
                "cannot allocate {total} bytes for a registered pool"
            )));
        }
        let mem = PoolMem { ptr, layout };
        // SAFETY: mem stays allocated until after the MR is dropped (field
        // order of RegisteredPool); it is only accessed via raw copies.
        let mr = unsafe { MemoryRegion::register(pd, mem.ptr, total, access)? };
        Ok(RegisteredPool {
            mr,
            mem,
            buf_size,
            count,
            free: (0..count).rev().collect(),
            in_use: vec![false; count],
        })
    }

    /// Size of each buffer.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// Number of buffers.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Buffers currently free.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// The region (lkey/rkey) covering all buffers.
    pub fn mr(&self) -> &MemoryRegion {
        &self.mr
    }

    /// Takes a free buffer; `None` when all are in use.
    pub fn take(&mut self) -> Option<usize> {
        let i = self.free.pop()?;
        if let Some(u) = self.in_use.get_mut(i) {
            *u = true;
        }
        Some(i)
    }

    /// Returns a buffer taken with [`take`](Self::take).
    pub fn give_back(&mut self, idx: usize) -> Result<()> {
        match self.in_use.get_mut(idx) {
            Some(u) if *u => {
                *u = false;
                self.free.push(idx);
                Ok(())
            }
            Some(_) => Err(VerbsError::InvalidArgument(format!(
                "pool buffer {idx} returned twice"
            ))),
            None => Err(self.bad_index(idx)),
        }
    }

    fn bad_index(&self, idx: usize) -> VerbsError {
        VerbsError::InvalidArgument(format!(
            "pool buffer {idx} out of range (pool has {})",
            self.count
        ))
    }

    fn check(&self, idx: usize, offset: usize, len: usize) -> Result<usize> {
        if idx >= self.count {
            return Err(self.bad_index(idx));
        }
        pool_offset(self.count, self.buf_size, idx, offset, len).ok_or_else(|| {
            VerbsError::InvalidArgument(format!(
                "range {offset}+{len} outside pool buffer of {} bytes",
                self.buf_size
            ))
        })
    }

    /// Device address of buffer `idx` (what goes into an iSER header VA).
    pub fn addr(&self, idx: usize) -> Result<u64> {
        let off = self.check(idx, 0, 0)?;
        Ok(self.mr.addr() + off as u64)
    }

    /// SGE for `len` bytes at the start of buffer `idx`.
    pub fn sge(&self, idx: usize, len: usize) -> Result<Sge> {
        self.sge_at(idx, 0, len)
    }

    /// SGE for `len` bytes at `offset` in buffer `idx`.
    pub fn sge_at(&self, idx: usize, offset: usize, len: usize) -> Result<Sge> {
        let off = self.check(idx, offset, len)?;
        self.mr.sge(off, len)
    }

    /// Raw pointer to `len` bytes at `offset` of buffer `idx`, bounds
    /// checked, for copies straight between guest memory and the pool. The
    /// caller copies through the pointer only (no references) and only while
    /// no operation that writes this buffer is outstanding.
    pub(crate) fn raw_range(&self, idx: usize, offset: usize, len: usize) -> Result<*mut u8> {
        let off = self.check(idx, offset, len)?;
        // SAFETY: off+len lies inside the allocation (checked above).
        Ok(unsafe { self.mem.ptr.add(off) })
    }

    /// Copies `data` into buffer `idx` at `offset`. Only call while no
    /// operation that writes this buffer is outstanding.
    pub fn write(&self, idx: usize, offset: usize, data: &[u8]) -> Result<()> {
        let off = self.check(idx, offset, data.len())?;
        // SAFETY: off+len is inside the allocation (checked); raw copy, no
        // reference into device-shared memory is created.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.mem.ptr.add(off), data.len()) };
        Ok(())
    }

    /// Copies `out.len()` bytes from buffer `idx` at `offset` into `out`.
    /// Only meaningful after the operation that filled it completed.
    pub fn read(&self, idx: usize, offset: usize, out: &mut [u8]) -> Result<()> {
        let off = self.check(idx, offset, out.len())?;
        // SAFETY: as in write.
        unsafe {
            std::ptr::copy_nonoverlapping(self.mem.ptr.add(off), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    /// Copies `len` bytes from buffer `idx` at `offset` into a new vector.
    pub fn read_vec(&self, idx: usize, offset: usize, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read(idx, offset, &mut v)?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_offsets_are_bounded() {
        assert_eq!(pool_offset(4, 100, 0, 0, 100), Some(0));
        assert_eq!(pool_offset(4, 100, 3, 10, 90), Some(310));
        assert_eq!(pool_offset(4, 100, 3, 10, 91), None);
        assert_eq!(pool_offset(4, 100, 4, 0, 0), None);
        assert_eq!(pool_offset(4, 100, 1, usize::MAX, 1), None);
        assert_eq!(pool_offset(usize::MAX, usize::MAX, 2, 0, 0), None);
    }

    #[test]
    fn sge_ranges_are_bounded() {
        assert_eq!(range_in(4096, 0, 4096), Some(4096));
        assert_eq!(range_in(4096, 4000, 96), Some(96));
        assert_eq!(range_in(4096, 4000, 97), None);
        assert_eq!(range_in(usize::MAX, 0, 1 << 32), None); // SGE length is 32-bit
        assert_eq!(range_in(10, usize::MAX, 2), None);
    }

    #[test]
    fn access_flags_match_verbs() {
        assert_eq!(Access::ISER_DATA.bits(), 1 | 2 | 4);
        assert_eq!(
            (Access::LOCAL_WRITE | Access::REMOTE_READ | Access::REMOTE_WRITE),
            Access::ISER_DATA
        );
    }
}
