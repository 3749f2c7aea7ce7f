//! Queue pair posting: Send (inline when small), Receive, RDMA Write/Read,
//! signaled or not, singly or as a linked batch (one doorbell).
//!
//! rdma-sys quirks: `ibv_post_send`/`ibv_post_recv` are `static inline` in
//! verbs.h and re-implemented by rdma-sys through `(*ctx).ops.post_send`;
//! `ibv_send_wr` is hand-written with its unions named `wr: wr_t { rdma,
//! atomic, ud }`, `imm_data_invalidated_rkey_union`, `qp_type` and
//! `bind_mw_tso_union`, and has no `Default`/`Copy` (built zeroed here).
//! Posting only reads the WR chain and SGE arrays; the provider copies
//! everything (including inline data) before returning.

use super::cm_id::IdInner;
use super::cq::CqInner;
use super::mr::PdInner;
use super::{Result, VerbsError};
use rdma_sys::{
    ibv_post_recv, ibv_post_send, ibv_qp, ibv_recv_wr, ibv_send_flags, ibv_send_wr, ibv_sge,
    ibv_wr_opcode, rdma_destroy_qp,
};
use smallvec::SmallVec;
use std::fmt;
use std::io;
use std::ops::BitOr;
use std::sync::Arc;

/// Queue pair capabilities (requested, then as granted by the provider).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCaps {
    /// Outstanding send-queue work requests.
    pub max_send_wr: u32,
    /// Outstanding receive-queue work requests.
    pub max_recv_wr: u32,
    /// SGEs per send WR.
    pub max_send_sge: u32,
    /// SGEs per receive WR.
    pub max_recv_sge: u32,
    /// Largest inline send.
    pub max_inline_data: u32,
}

impl Default for QpCaps {
    /// A small queue suitable for control traffic and tests.
    fn default() -> Self {
        QpCaps {
            max_send_wr: 64,
            max_recv_wr: 64,
            max_send_sge: 4,
            max_recv_sge: 1,
            max_inline_data: 64,
        }
    }
}

/// One scatter/gather entry, laid out as `struct ibv_sge`.
#[repr(transparent)]
#[derive(Clone, Copy)]
pub struct Sge(ibv_sge);

impl Sge {
    /// An SGE over registered memory. The device checks `lkey` and bounds
    /// against the registration, so a wrong value yields an error
    /// completion, not memory corruption.
    pub fn new(addr: u64, length: u32, lkey: u32) -> Sge {
        Sge(ibv_sge { addr, length, lkey })
    }

    /// Address.
    pub fn addr(&self) -> u64 {
        self.0.addr
    }

    /// Length in bytes.
    pub fn length(&self) -> u32 {
        self.0.length
    }

    /// Local key.
    pub fn lkey(&self) -> u32 {
        self.0.lkey
    }
}

impl fmt::Debug for Sge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Sge({:#x}+{} lkey {:#x})",
            self.0.addr, self.0.length, self.0.lkey
        )
    }
}

/// Flags of a send-queue work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SendFlags(u32);

impl SendFlags {
    /// No flags: unsignaled (no completion unless it fails).
    pub const NONE: SendFlags = SendFlags(0);
    /// Generate a completion.
    pub const SIGNALED: SendFlags = SendFlags(ibv_send_flags::IBV_SEND_SIGNALED.0);
    /// Copy the data into the WQE at post time (Send/RDMA Write only).
    pub const INLINE: SendFlags = SendFlags(ibv_send_flags::IBV_SEND_INLINE.0);
    /// Solicited event at the receiver.
    pub const SOLICITED: SendFlags = SendFlags(ibv_send_flags::IBV_SEND_SOLICITED.0);
    /// Wait for prior RDMA Reads to complete first.
    pub const FENCE: SendFlags = SendFlags(ibv_send_flags::IBV_SEND_FENCE.0);

    /// True if every flag of `other` is set.
    pub fn contains(self, other: SendFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Signaled or not, as flags.
    pub fn signaled(on: bool) -> SendFlags {
        if on {
            Self::SIGNALED
        } else {
            Self::NONE
        }
    }
}

impl BitOr for SendFlags {
    type Output = SendFlags;
    fn bitor(self, rhs: SendFlags) -> SendFlags {
        SendFlags(self.0 | rhs.0)
    }
}

/// The operation of a send-queue work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    /// Send to the peer's next posted receive.
    Send,
    /// Write local SGEs into the peer's memory.
    RdmaWrite {
        /// Peer virtual address.
        remote_addr: u64,
        /// Peer rkey (STag).
        rkey: u32,
    },
    /// Read the peer's memory into local SGEs.
    RdmaRead {
        /// Peer virtual address.
        remote_addr: u64,
        /// Peer rkey (STag).
        rkey: u32,
    },
}

/// A send-queue work request for [`QueuePair::post_send_batch`].
#[derive(Debug, Clone, Copy)]
pub struct SendWr<'a> {
    /// Returned in the completion.
    pub wr_id: u64,
    /// Operation.
    pub op: SendOp,
    /// Local memory.
    pub sges: &'a [Sge],
    /// Flags.
    pub flags: SendFlags,
}

/// A receive work request for [`QueuePair::post_recv_batch`].
#[derive(Debug, Clone, Copy)]
pub struct RecvWr<'a> {
    /// Returned in the completion.
    pub wr_id: u64,
    /// Where the incoming Send lands.
    pub sges: &'a [Sge],
}

/// The RC queue pair of a connection. Destroyed (`rdma_destroy_qp`) before
/// its CQs, PD and CM id, which it keeps alive.
pub struct QueuePair {
    qp: *mut ibv_qp,
    caps: QpCaps,
    id: Arc<IdInner>,
    _pd: Arc<PdInner>,
    _send_cq: Arc<CqInner>,
    _recv_cq: Arc<CqInner>,
}

// SAFETY: libibverbs posting is thread-safe (providers lock their queues);
// the pointer is a handle owned by this struct.
unsafe impl Send for QueuePair {}
// SAFETY: as above; &self posting is allowed from several threads.
unsafe impl Sync for QueuePair {}

impl fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueuePair")
            .field("qp_num", &self.qp_num())
            .field("caps", &self.caps)
            .finish()
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: the QP was created by rdma_create_qp on this id and is
        // destroyed once; rdma_destroy_qp also clears id->qp.
        unsafe { rdma_destroy_qp(self.id.raw()) };
    }
}

fn zeroed_send_wr() -> ibv_send_wr {
    // SAFETY: ibv_send_wr is plain C data (integers, pointers, unions of
    // those); all-zero is a valid value (NULL pointers, opcode RDMA_WRITE).
    unsafe { std::mem::zeroed() }
}

fn sge_total(sges: &[Sge]) -> u64 {
    sges.iter().map(|s| u64::from(s.length())).sum()
}

impl QueuePair {
    pub(crate) fn new(
        qp: *mut ibv_qp,
        id: Arc<IdInner>,
        pd: Arc<PdInner>,
        send_cq: Arc<CqInner>,
        recv_cq: Arc<CqInner>,
        caps: QpCaps,
    ) -> Self {
        QueuePair {
            qp,
            caps,
            id,
            _pd: pd,
            _send_cq: send_cq,
            _recv_cq: recv_cq,
        }
    }

    /// QP number.
    pub fn qp_num(&self) -> u32 {
        // SAFETY: qp is live while self is; qp_num is immutable.
        unsafe { (*self.qp).qp_num }
    }

    /// Capabilities granted by the provider.
    pub fn caps(&self) -> QpCaps {
        self.caps
    }

    /// Fills `wr` from `w` after validating it against the QP caps.
    fn fill_send(&self, w: &SendWr<'_>, wr: &mut ibv_send_wr) -> Result<()> {
        if w.sges.len() > self.caps.max_send_sge as usize {
            return Err(VerbsError::InvalidArgument(format!(
                "{} SGEs exceed the QP's max_send_sge of {}",
                w.sges.len(),
                self.caps.max_send_sge
            )));
        }
        let mut flags = w.flags;
        let total = sge_total(w.sges);
        let inline_ok = !matches!(w.op, SendOp::RdmaRead { .. })
            && total <= u64::from(self.caps.max_inline_data);
        if flags.contains(SendFlags::INLINE) && !inline_ok {
            return Err(VerbsError::InvalidArgument(format!(
                "inline {total} bytes not possible (max_inline_data {}, no inline RDMA Read)",
                self.caps.max_inline_data
            )));
        }
        // Small Sends/Writes go inline: no DMA read of the buffer by the
        // device, and the buffer is reusable as soon as post returns.
        if inline_ok && total > 0 {
            flags = flags | SendFlags::INLINE;
        }
        wr.wr_id = w.wr_id;
        wr.sg_list = w.sges.as_ptr() as *mut ibv_sge;
        // Bounded by max_send_sge (u32) above; fits c_int for any real caps.
        wr.num_sge = w.sges.len() as libc::c_int;
        wr.send_flags = flags.0;
        match w.op {
            SendOp::Send => wr.opcode = ibv_wr_opcode::IBV_WR_SEND,
            SendOp::RdmaWrite { remote_addr, rkey } => {
                wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                wr.wr.rdma = rdma_sys::rdma_t { remote_addr, rkey };
            }
            SendOp::RdmaRead { remote_addr, rkey } => {
                wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_READ;
                wr.wr.rdma = rdma_sys::rdma_t { remote_addr, rkey };
            }
        }
        Ok(())
    }

    /// Posts a Send of `sges` (inline automatically when small enough).
    pub fn post_send(&self, wr_id: u64, sges: &[Sge], signaled: bool) -> Result<()> {
        self.post_send_batch(&[SendWr {
            wr_id,
            op: SendOp::Send,
            sges,
            flags: SendFlags::signaled(signaled),
        }])
    }

    /// Posts an inline Send of `data` straight from Rust memory (no memory
    /// registration needed); `data.len()` must not exceed `max_inline_data`.
    pub fn post_send_inline(&self, wr_id: u64, data: &[u8], signaled: bool) -> Result<()> {
        let len = u32::try_from(data.len())
            .ok()
            .filter(|&l| l <= self.caps.max_inline_data)
            .ok_or_else(|| {
                VerbsError::InvalidArgument(format!(
                    "inline send of {} bytes exceeds max_inline_data {}",
                    data.len(),
                    self.caps.max_inline_data
                ))
            })?;
        // lkey is ignored for inline data: the provider copies the bytes
        // during the post call, while `data` is borrowed.
        let sge = [Sge::new(data.as_ptr() as u64, len, 0)];
        self.post_send_batch(&[SendWr {
            wr_id,
            op: SendOp::Send,
            sges: &sge,
            flags: SendFlags::INLINE | SendFlags::signaled(signaled),
        }])
    }

    /// Posts an RDMA Write of local `sges` to the peer's `remote_addr`/`rkey`.
    pub fn post_rdma_write(
        &self,
        wr_id: u64,
        sges: &[Sge],
        remote_addr: u64,
        rkey: u32,
        signaled: bool,
    ) -> Result<()> {
        self.post_send_batch(&[SendWr {
            wr_id,
            op: SendOp::RdmaWrite { remote_addr, rkey },
            sges,
            flags: SendFlags::signaled(signaled),
        }])
    }

    /// Posts an RDMA Read of the peer's `remote_addr`/`rkey` into `sges`.
    pub fn post_rdma_read(
        &self,
        wr_id: u64,
        sges: &[Sge],
        remote_addr: u64,
        rkey: u32,
        signaled: bool,
    ) -> Result<()> {
        self.post_send_batch(&[SendWr {
            wr_id,
            op: SendOp::RdmaRead { remote_addr, rkey },
            sges,
            flags: SendFlags::signaled(signaled),
        }])
    }

    /// Posts `wrs` as one linked chain (a single `ibv_post_send`). On error
    /// [`VerbsError::Post`] tells which request failed; those before it were
    /// posted and will complete.
    pub fn post_send_batch(&self, wrs: &[SendWr<'_>]) -> Result<()> {
        if wrs.is_empty() {
            return Ok(());
        }
        // Inline for the usual single WR: no allocation per post on the
        // data path. Not moved after the links are set below.
        let mut chain: SmallVec<[ibv_send_wr; 2]> = SmallVec::with_capacity(wrs.len());
        for w in wrs {
            let mut wr = zeroed_send_wr();
            self.fill_send(w, &mut wr)?;
            chain.push(wr);
        }
        // Link after the chain is complete so the pointers stay valid.
        let base = chain.as_mut_ptr();
        for i in 1..chain.len() {
            // SAFETY: i < len, so base+i is inside the chain's buffer.
            let next = unsafe { base.add(i) };
            chain[i - 1].next = next;
        }
        let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
        // SAFETY: qp is live; the chain and the SGE arrays it points to are
        // valid for the call and only read by the provider; SGEs reference
        // registered memory (checked by the device) or inline data copied
        // during the call.
        let ret = unsafe { ibv_post_send(self.qp, base, &mut bad) };
        if ret != 0 {
            let index = if bad.is_null() {
                0
            } else {
                // SAFETY: bad points into `chain` per the verbs contract.
                usize::try_from(unsafe { bad.offset_from(base) }).unwrap_or(0)
            };
            return Err(VerbsError::Post {
                index,
                count: wrs.len(),
                source: io::Error::from_raw_os_error(ret.abs()),
            });
        }
        Ok(())
    }

    /// Posts one receive buffer.
    pub fn post_recv(&self, wr_id: u64, sges: &[Sge]) -> Result<()> {
        self.post_recv_batch(&[RecvWr { wr_id, sges }])
    }

    /// Posts receive buffers as one linked chain.
    pub fn post_recv_batch(&self, wrs: &[RecvWr<'_>]) -> Result<()> {
        if wrs.is_empty() {
            return Ok(());
        }
        // Inline for the usual single receive (a repost per message).
        let mut chain: SmallVec<[ibv_recv_wr; 4]> = SmallVec::with_capacity(wrs.len());
        for w in wrs {
            if w.sges.len() > self.caps.max_recv_sge as usize {
                return Err(VerbsError::InvalidArgument(format!(
                    "{} SGEs exceed the QP's max_recv_sge of {}",
                    w.sges.len(),
                    self.caps.max_recv_sge
                )));
            }
            chain.push(ibv_recv_wr {
                wr_id: w.wr_id,
                next: std::ptr::null_mut(),
                sg_list: w.sges.as_ptr() as *mut ibv_sge,
                num_sge: w.sges.len() as libc::c_int,
            });
        }
        let base = chain.as_mut_ptr();
        for i in 1..chain.len() {
            // SAFETY: i < len.
            let next = unsafe { base.add(i) };
            chain[i - 1].next = next;
        }
        let mut bad: *mut ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: as in post_send_batch.
        let ret = unsafe { ibv_post_recv(self.qp, base, &mut bad) };
        if ret != 0 {
            let index = if bad.is_null() {
                0
            } else {
                // SAFETY: bad points into `chain`.
                usize::try_from(unsafe { bad.offset_from(base) }).unwrap_or(0)
            };
            return Err(VerbsError::Post {
                index,
                count: wrs.len(),
                source: io::Error::from_raw_os_error(ret.abs()),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sge_is_layout_compatible() {
        assert_eq!(std::mem::size_of::<Sge>(), std::mem::size_of::<ibv_sge>());
        assert_eq!(std::mem::size_of::<Sge>(), 16);
        let s = Sge::new(0x1000, 28, 0xabc);
        assert_eq!((s.addr(), s.length(), s.lkey()), (0x1000, 28, 0xabc));
        assert!(format!("{s:?}").contains("0x1000+28"));
    }

    #[test]
    fn send_flags_combine() {
        let f = SendFlags::SIGNALED | SendFlags::INLINE;
        assert!(f.contains(SendFlags::SIGNALED));
        assert!(f.contains(SendFlags::INLINE));
        assert!(!f.contains(SendFlags::FENCE));
        assert_eq!(SendFlags::signaled(false), SendFlags::NONE);
        assert_ne!(SendFlags::SIGNALED.0, SendFlags::INLINE.0);
    }

    #[test]
    fn send_wr_layout_matches_c() {
        // struct ibv_send_wr is 128 bytes on x86_64 with rdma-core 44.
        assert_eq!(std::mem::size_of::<ibv_send_wr>(), 128);
        let wr = zeroed_send_wr();
        assert!(wr.next.is_null());
        assert_eq!(sge_total(&[Sge::new(0, 10, 0), Sge::new(0, 5, 0)]), 15);
    }
}
