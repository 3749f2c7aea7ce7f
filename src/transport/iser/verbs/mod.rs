//! Safe RAII wrappers over libibverbs + librdmacm (crate `rdma-sys` 0.3),
//! just enough for an iSER initiator (and a loopback passive side for tests).
//!
//! Ownership: every verbs object holds an `Arc` of what it was created from,
//! so whatever the drop order of the Rust values, the C objects are destroyed
//! in the order the verbs API requires: QP → MR → CQ (+ completion channel) →
//! PD → CM id → CM event channel. librdmacm owns the device context
//! (`ibv_context`) and keeps it open while any CM id on it exists.
//!
//! Memory handed to the device (registered regions) is shared with the
//! hardware and with the remote peer; it is only ever accessed through raw
//! pointer copies, never through Rust references, see [`MemoryRegion`].
//!
//! rdma-sys quirks worth knowing (see also the module docs of each file):
//! - `ibv_post_send`, `ibv_post_recv`, `ibv_poll_cq`, `ibv_req_notify_cq`
//!   are `static inline` in verbs.h; bindgen cannot bind them, rdma-sys
//!   re-implements them in Rust by calling through `(*ctx).ops.<fn>`
//!   (an `Option<fn>` that is `unwrap()`ed: it panics if a provider left it
//!   unset — every real provider sets them).
//! - `ibv_wc`, `ibv_send_wr`, `rdma_cm_event`, `ibv_gid` contain C unions and
//!   are hand-written in rdma-sys (`types.rs`) without `Copy`/`Default`; the
//!   anonymous union members get invented names
//!   (`imm_data_invalidated_rkey_union`, `wr.rdma`, `param.conn`).
//! - bindgen enums: `ibv_wc_status::Type`, `ibv_wr_opcode::Type`,
//!   `rdma_cm_event_type::Type` are modules of `u32` constants;
//!   `ibv_access_flags`/`ibv_send_flags` are bitfield newtypes (`.0`).
//! - `ibv_reg_mr` is a macro over `__ibv_reg_mr`; rdma-sys exports both the
//!   plain exported symbol `ibv_reg_mr` (used here) and `__ibv_reg_mr`.
//! - `pthread_*` types are opaque and no struct derives `Default`/`Debug`:
//!   C structs are built with `std::mem::zeroed()`.

mod cm_id;
mod cq;
mod device;
mod mr;
mod qp;

pub use cm_id::{CmEvent, CmEventKind, CmId, ConnParam, ConnectRequest, Listener};
pub use cq::{CompletionQueue, WcOpcode, WcStatus, WorkCompletion};
pub use device::{device_names, ensure_device, DeviceCaps};
pub use mr::{Access, MemoryRegion, ProtectionDomain, RegisteredPool};
pub use qp::{QpCaps, QueuePair, RecvWr, SendFlags, SendOp, SendWr, Sge};

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Errors of the RDMA verbs / connection manager layer. Messages are meant
/// for the administrator who has to fix the RDMA setup.
#[derive(Debug, Error)]
pub enum VerbsError {
    /// No RDMA device is visible to libibverbs.
    #[error("no RDMA device found (ibv_get_device_list saw: {seen}); is the rdma_rxe/mlx5 module loaded?")]
    NoDevice {
        /// Comma-separated names seen, or "none".
        seen: String,
    },
    /// A verbs or CM call failed.
    #[error("{call} failed")]
    Call {
        /// The C function that failed.
        call: &'static str,
        /// errno.
        #[source]
        source: io::Error,
    },
    /// Nothing arrived within the allowed time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long we waited.
        after: Duration,
    },
    /// The CM could not map the address to a local RDMA device.
    #[error("cannot resolve {addr} to an RDMA device (RDMA devices present: {devices}): {reason}")]
    AddrResolve {
        /// Destination address.
        addr: SocketAddr,
        /// Device names seen by libibverbs.
        devices: String,
        /// Reason from the CM event status.
        reason: io::Error,
    },
    /// The CM could not find a path to the destination.
    #[error("cannot resolve a route to {addr}: {reason}")]
    RouteResolve {
        /// Destination address.
        addr: SocketAddr,
        /// Reason from the CM event status.
        reason: io::Error,
    },
    /// The peer (or its CM) rejected the connection.
    #[error("connection to {peer} rejected: {reason_text} (IB CM reject reason {reason})")]
    Rejected {
        /// Peer address.
        peer: String,
        /// IB CM reject reason code (event status).
        reason: i32,
        /// Readable meaning of `reason`.
        reason_text: &'static str,
        /// Private data of the reject message (may be zero padding).
        private_data: Vec<u8>,
    },
    /// The peer did not answer or a connection error occurred.
    #[error("connection to {peer} failed ({event}): {reason}")]
    Unreachable {
        /// Peer address.
        peer: String,
        /// The CM event name.
        event: &'static str,
        /// Reason from the event status.
        reason: io::Error,
    },
    /// The connection was closed by the peer or the network.
    #[error("RDMA connection to {peer} was disconnected")]
    Disconnected {
        /// Peer address.
        peer: String,
    },
    /// The RDMA device went away (module unloaded, hot-unplug).
    #[error("RDMA device was removed")]
    DeviceRemoved,
    /// A CM event arrived that makes no sense in the current state.
    #[error("unexpected RDMA CM event {got} (status {status}) while waiting for {expected}")]
    UnexpectedEvent {
        /// The event we waited for.
        expected: &'static str,
        /// The event that arrived.
        got: &'static str,
        /// Its status.
        status: i32,
    },
    /// A caller-supplied argument is out of range (bounds, sizes, counts).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Posting a chain of work requests failed at `index`; the requests
    /// before it were posted.
    #[error("posting work request {index} of {count} failed")]
    Post {
        /// Index of the first request not posted.
        index: usize,
        /// Number of requests in the chain.
        count: usize,
        /// errno returned by the provider.
        #[source]
        source: io::Error,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, VerbsError>;

/// Builds a [`VerbsError::Call`] from the current errno.
pub(crate) fn last_err(call: &'static str) -> VerbsError {
    VerbsError::Call {
        call,
        source: io::Error::last_os_error(),
    }
}

/// Builds a [`VerbsError::Call`] from a positive errno returned directly
/// (ibv_post_*, ibv_req_notify_cq return errno instead of setting it).
pub(crate) fn errno_err(call: &'static str, ret: i32) -> VerbsError {
    VerbsError::Call {
        call,
        source: io::Error::from_raw_os_error(ret.abs()),
    }
}

/// Sets O_NONBLOCK on `fd` so it can live in an epoll set and be drained.
pub(crate) fn set_nonblocking(fd: RawFd, call: &'static str) -> Result<()> {
    // SAFETY: fcntl on an fd we own; F_GETFL/F_SETFL touch no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(last_err(call));
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(last_err(call));
    }
    Ok(())
}

/// Waits until `fd` is readable or `deadline` passes. Returns false on
/// timeout. EINTR is retried.
pub(crate) fn wait_readable(fd: RawFd, deadline: Instant) -> Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Round up so a sub-millisecond remainder still waits.
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is a valid pollfd array of length 1 for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            return Ok(true);
        }
        if n == 0 {
            if Instant::now() >= deadline {
                return Ok(false);
            }
            continue;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(VerbsError::Call {
                call: "poll",
                source: e,
            });
        }
    }
}
