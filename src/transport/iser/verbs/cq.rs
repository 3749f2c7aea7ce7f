//! Completion queues with a completion channel whose fd goes into epoll.
//!
//! Usage (race free): `arm()`, then `poll()` until it returns 0, then wait
//! for the fd; when it is readable call `get_events()` (drains and acks),
//! `arm()` again and `poll()` again.
//!
//! rdma-sys quirk: `ibv_poll_cq` and `ibv_req_notify_cq` are `static inline`
//! in verbs.h; rdma-sys provides Rust versions calling
//! `(*(*cq).context).ops.poll_cq/req_notify_cq`.

use super::cm_id::IdInner;
use super::{errno_err, last_err, set_nonblocking, Result, VerbsError};
use rdma_sys::{
    ibv_ack_cq_events, ibv_comp_channel, ibv_context, ibv_cq, ibv_create_comp_channel,
    ibv_create_cq, ibv_destroy_comp_channel, ibv_destroy_cq, ibv_get_cq_event, ibv_poll_cq,
    ibv_req_notify_cq, ibv_wc, ibv_wc_opcode, ibv_wc_status, ibv_wc_status_str,
};
use std::ffi::CStr;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

/// Owned CQ + completion channel; shared by the QPs that use the CQ.
pub(crate) struct CqInner {
    cq: *mut ibv_cq,
    channel: *mut ibv_comp_channel,
    entries: u32,
    _id: Arc<IdInner>,
}

// SAFETY: libibverbs CQ and completion-channel calls are thread-safe; the
// pointers are handles owned by this struct.
unsafe impl Send for CqInner {}
// SAFETY: as above; shared use only calls thread-safe verbs.
unsafe impl Sync for CqInner {}

impl Drop for CqInner {
    fn drop(&mut self) {
        // SAFETY: cq and channel were created in CompletionQueue::new and are
        // destroyed once, after every QP using the cq (QPs hold an Arc to
        // self); get_events acks every event it takes, so destroy cannot
        // block on unacked events.
        unsafe {
            ibv_destroy_cq(self.cq);
            ibv_destroy_comp_channel(self.channel);
        }
    }
}

/// A completion queue and its completion channel.
pub struct CompletionQueue {
    inner: Arc<CqInner>,
}

impl fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionQueue")
            .field("entries", &self.inner.entries)
            .field("fd", &self.as_raw_fd())
            .finish()
    }
}

impl CompletionQueue {
    pub(crate) fn new(id: Arc<IdInner>, entries: u32) -> Result<Self> {
        let ctx = id.verbs()?;
        let want = libc::c_int::try_from(entries)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                VerbsError::InvalidArgument(format!("CQ size {entries} must be 1..=i32::MAX"))
            })?;
        // SAFETY: ctx is live (id is held).
        let channel = unsafe { ibv_create_comp_channel(ctx) };
        if channel.is_null() {
            return Err(last_err("ibv_create_comp_channel"));
        }
        // SAFETY: channel was just created; fd is valid.
        let fd = unsafe { (*channel).fd };
        if let Err(e) = set_nonblocking(fd, "fcntl(O_NONBLOCK) on the completion channel") {
            // SAFETY: channel is unused; destroyed once.
            unsafe { ibv_destroy_comp_channel(channel) };
            return Err(e);
        }
        // SAFETY: ctx and channel are live; no cq_context; vector 0.
        let cq = unsafe { ibv_create_cq(ctx, want, std::ptr::null_mut(), channel, 0) };
        if cq.is_null() {
            let e = last_err("ibv_create_cq");
            // SAFETY: channel is unused; destroyed once.
            unsafe { ibv_destroy_comp_channel(channel) };
            return Err(e);
        }
        // SAFETY: cq is live; the provider may round the size up.
        let granted = u32::try_from(unsafe { (*cq).cqe }).unwrap_or(entries);
        Ok(CompletionQueue {
            inner: Arc::new(CqInner {
                cq,
                channel,
                entries: granted,
                _id: id,
            }),
        })
    }

    pub(crate) fn raw(&self) -> *mut ibv_cq {
        self.inner.cq
    }

    pub(crate) fn inner(&self) -> &Arc<CqInner> {
        &self.inner
    }

    pub(crate) fn context(&self) -> *mut ibv_context {
        // SAFETY: cq is live while self is.
        unsafe { (*self.inner.cq).context }
    }

    /// Number of entries the provider granted (≥ the requested size).
    pub fn entries(&self) -> u32 {
        self.inner.entries
    }

    /// Requests a completion event for the next completion
    /// (`ibv_req_notify_cq(cq, 0)`).
    pub fn arm(&self) -> Result<()> {
        self.req_notify(false)
    }

    /// Requests an event only for the next solicited or error completion.
    pub fn arm_solicited(&self) -> Result<()> {
        self.req_notify(true)
    }

    fn req_notify(&self, solicited_only: bool) -> Result<()> {
        // SAFETY: cq is live.
        let ret = unsafe { ibv_req_notify_cq(self.inner.cq, i32::from(solicited_only)) };
        if ret != 0 {
            return Err(errno_err("ibv_req_notify_cq", ret));
        }
        Ok(())
    }

    /// Drains all pending completion events from the (nonblocking) channel
    /// and acknowledges them; returns how many there were. Call after the fd
    /// became readable, then [`arm`](Self::arm) and [`poll`](Self::poll).
    pub fn get_events(&self) -> Result<u32> {
        let mut got = 0u32;
        let mut failure = None;
        loop {
            let mut cq: *mut ibv_cq = std::ptr::null_mut();
            let mut ctx: *mut libc::c_void = std::ptr::null_mut();
            // SAFETY: channel is live; out pointers valid.
            if unsafe { ibv_get_cq_event(self.inner.channel, &mut cq, &mut ctx) } != 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock {
                    failure = Some(VerbsError::Call {
                        call: "ibv_get_cq_event",
                        source: e,
                    });
                }
                break;
            }
            // Only our CQ uses this channel.
            got = got.saturating_add(1);
        }
        if got > 0 {
            // One ack for the batch: acking takes a mutex in libibverbs.
            // SAFETY: cq is live; we ack exactly the events taken above.
            unsafe { ibv_ack_cq_events(self.inner.cq, got) };
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(got),
        }
    }

    /// Polls up to `wcs.len()` completions into the caller's array and
    /// returns how many were written (0 when the CQ is empty).
    pub fn poll(&self, wcs: &mut [WorkCompletion]) -> Result<usize> {
        let n = i32::try_from(wcs.len()).unwrap_or(i32::MAX);
        if n == 0 {
            return Ok(0);
        }
        // SAFETY: cq is live; WorkCompletion is repr(transparent) over
        // ibv_wc, so wcs is a writable array of at least n ibv_wc.
        let ret = unsafe { ibv_poll_cq(self.inner.cq, n, wcs.as_mut_ptr().cast::<ibv_wc>()) };
        if ret < 0 {
            return Err(errno_err("ibv_poll_cq", ret));
        }
        // ret <= n by the verbs contract; clamp anyway.
        Ok(usize::try_from(ret).unwrap_or(0).min(wcs.len()))
    }
}

impl AsRawFd for CompletionQueue {
    fn as_raw_fd(&self) -> RawFd {
        // SAFETY: channel is live while self is.
        unsafe { (*self.inner.channel).fd }
    }
}

/// One work completion, laid out exactly as `struct ibv_wc` so
/// [`CompletionQueue::poll`] writes straight into the caller's array.
/// For error completions only `wr_id`, `status`, `vendor_err` and `qp_num`
/// are meaningful (the opcode is undefined).
#[repr(transparent)]
pub struct WorkCompletion(ibv_wc);

impl Default for WorkCompletion {
    fn default() -> Self {
        // SAFETY: ibv_wc is plain C data (integers and an integer union);
        // all-zero is a valid value.
        WorkCompletion(unsafe { std::mem::zeroed() })
    }
}

impl Clone for WorkCompletion {
    fn clone(&self) -> Self {
        // SAFETY: ibv_wc is plain old data without pointers or drop glue
        // (rdma-sys only omits Copy because of its union).
        WorkCompletion(unsafe { std::ptr::read(&self.0) })
    }
}

impl WorkCompletion {
    /// A zeroed array to poll into.
    pub fn batch(n: usize) -> Vec<WorkCompletion> {
        (0..n).map(|_| WorkCompletion::default()).collect()
    }

    /// The `wr_id` given when the work request was posted.
    pub fn wr_id(&self) -> u64 {
        self.0.wr_id
    }

    /// Completion status.
    pub fn status(&self) -> WcStatus {
        WcStatus(self.0.status)
    }

    /// True when the work request completed successfully.
    pub fn is_ok(&self) -> bool {
        self.0.status == ibv_wc_status::IBV_WC_SUCCESS
    }

    /// What kind of work request completed (valid only when successful).
    pub fn opcode(&self) -> WcOpcode {
        WcOpcode::from_raw(self.0.opcode)
    }

    /// Bytes received (receives) or transferred (RDMA Read).
    pub fn byte_len(&self) -> u32 {
        self.0.byte_len
    }

    /// Local QP number.
    pub fn qp_num(&self) -> u32 {
        self.0.qp_num
    }

    /// Vendor specific error syndrome.
    pub fn vendor_err(&self) -> u32 {
        self.0.vendor_err
    }
}

impl fmt::Debug for WorkCompletion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkCompletion")
            .field("wr_id", &self.wr_id())
            .field("status", &self.status())
            .field("opcode", &self.opcode())
            .field("byte_len", &self.byte_len())
            .field("qp_num", &self.qp_num())
            .finish()
    }
}

/// Kind of completed work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcOpcode {
    /// Send.
    Send,
    /// RDMA Write.
    RdmaWrite,
    /// RDMA Read.
    RdmaRead,
    /// Atomic compare and swap.
    CompSwap,
    /// Atomic fetch and add.
    FetchAdd,
    /// Memory window bind.
    BindMw,
    /// Local invalidate.
    LocalInv,
    /// Receive.
    Recv,
    /// Receive of an RDMA Write with immediate.
    RecvRdmaWithImm,
    /// Anything else.
    Other(u32),
}

impl WcOpcode {
    fn from_raw(v: ibv_wc_opcode::Type) -> Self {
        use ibv_wc_opcode::*;
        match v {
            IBV_WC_SEND => Self::Send,
            IBV_WC_RDMA_WRITE => Self::RdmaWrite,
            IBV_WC_RDMA_READ => Self::RdmaRead,
            IBV_WC_COMP_SWAP => Self::CompSwap,
            IBV_WC_FETCH_ADD => Self::FetchAdd,
            IBV_WC_BIND_MW => Self::BindMw,
            IBV_WC_LOCAL_INV => Self::LocalInv,
            IBV_WC_RECV => Self::Recv,
            IBV_WC_RECV_RDMA_WITH_IMM => Self::RecvRdmaWithImm,
            other => Self::Other(other),
        }
    }
}

/// Status of a work completion (`enum ibv_wc_status`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct WcStatus(pub u32);

impl WcStatus {
    /// Success.
    pub const SUCCESS: WcStatus = WcStatus(ibv_wc_status::IBV_WC_SUCCESS);
    /// Flushed because the QP went to the error state (disconnect).
    pub const WR_FLUSH_ERR: WcStatus = WcStatus(ibv_wc_status::IBV_WC_WR_FLUSH_ERR);
    /// The peer's memory key or bounds were wrong.
    pub const REM_ACCESS_ERR: WcStatus = WcStatus(ibv_wc_status::IBV_WC_REM_ACCESS_ERR);
    /// A local key or bounds were wrong.
    pub const LOC_PROT_ERR: WcStatus = WcStatus(ibv_wc_status::IBV_WC_LOC_PROT_ERR);
    /// The received message did not fit the receive buffer.
    pub const LOC_LEN_ERR: WcStatus = WcStatus(ibv_wc_status::IBV_WC_LOC_LEN_ERR);
    /// The peer stopped answering (transport retries exhausted).
    pub const RETRY_EXC_ERR: WcStatus = WcStatus(ibv_wc_status::IBV_WC_RETRY_EXC_ERR);
    /// The peer had no receive posted (RNR retries exhausted).
    pub const RNR_RETRY_EXC_ERR: WcStatus = WcStatus(ibv_wc_status::IBV_WC_RNR_RETRY_EXC_ERR);

    /// libibverbs' description (`ibv_wc_status_str`), e.g.
    /// "transport retry counter exceeded".
    pub fn name(self) -> String {
        // SAFETY: ibv_wc_status_str accepts any value and returns a pointer
        // to a static NUL-terminated string ("unknown" for unknown values).
        let s = unsafe { ibv_wc_status_str(self.0) };
        if s.is_null() {
            return "unknown".into();
        }
        // SAFETY: non-NULL static NUL-terminated string.
        unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
    }
}

impl fmt::Display for WcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (status {})", self.name(), self.0)
    }
}

impl fmt::Debug for WcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_completion_is_layout_compatible_with_ibv_wc() {
        assert_eq!(
            std::mem::size_of::<WorkCompletion>(),
            std::mem::size_of::<ibv_wc>()
        );
        // struct ibv_wc is 48 bytes on x86_64 Linux.
        assert_eq!(std::mem::size_of::<ibv_wc>(), 48);
    }

    #[test]
    fn default_completion_reads_as_success_send() {
        let wc = WorkCompletion::default();
        assert!(wc.is_ok());
        assert_eq!(wc.status(), WcStatus::SUCCESS);
        assert_eq!(wc.opcode(), WcOpcode::Send);
        assert_eq!(wc.wr_id(), 0);
        let mut w2 = wc.clone();
        w2.0.wr_id = 7;
        w2.0.status = ibv_wc_status::IBV_WC_WR_FLUSH_ERR;
        w2.0.opcode = ibv_wc_opcode::IBV_WC_RECV;
        assert_eq!(w2.wr_id(), 7);
        assert!(!w2.is_ok());
        assert_eq!(w2.opcode(), WcOpcode::Recv);
        assert_eq!(WorkCompletion::batch(3).len(), 3);
    }

    #[test]
    fn status_names_are_readable() {
        assert_eq!(WcStatus::SUCCESS.name(), "success");
        assert!(WcStatus::WR_FLUSH_ERR
            .name()
            .to_lowercase()
            .contains("flush"));
        assert!(WcStatus::RETRY_EXC_ERR
            .to_string()
            .to_lowercase()
            .contains("retry"));
        assert!(WcStatus(9999).to_string().contains("9999"));
        assert_eq!(WcOpcode::from_raw(4242), WcOpcode::Other(4242));
    }
}
