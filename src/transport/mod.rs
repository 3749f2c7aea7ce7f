//! Transports that carry iSCSI PDUs: TCP (RFC 7143) and iSER (RFC 7145).
//!
//! The session layer hands a transport whole PDUs (a header and, for data
//! PDUs, a range of a request's buffers in guest memory) and gets PDUs back,
//! deciding for each received header where its data segment goes: straight
//! into the guest buffer of the task it belongs to, into a small owned buffer
//! (text, sense), or nowhere (the session refused it).

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use libc::iovec;
use thiserror::Error;

use crate::blk::buffer::IoBuffers;

pub mod iser;
pub mod tcp;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;

/// The data segment of an outgoing PDU.
pub enum PduData {
    /// No data segment.
    None,
    /// Bytes owned by the PDU (login text, UNMAP parameter lists, ping data).
    Owned(Vec<u8>),
    /// `len` bytes at `offset` of a request's buffers (immediate data, Data-Out).
    Buffer {
        /// The request's buffers.
        buf: Arc<IoBuffers>,
        /// Offset of the segment in the buffers.
        offset: u64,
        /// Length of the segment.
        len: u32,
    },
}

impl PduData {
    /// Length of the data segment (unpadded).
    pub fn len(&self) -> u32 {
        match self {
            PduData::None => 0,
            PduData::Owned(v) => v.len() as u32,
            PduData::Buffer { len, .. } => *len,
        }
    }

    /// Whether there is no data segment.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A SCSI command's whole data buffer, for transports that move command data
/// themselves (iSER advertises it to the target as an STag and address).
pub struct TaskBuffer {
    /// The request's buffers.
    pub buf: Arc<IoBuffers>,
    /// Offset of the command's data in the buffers.
    pub offset: u64,
    /// Expected data transfer length.
    pub len: u32,
    /// True when the target writes into the buffer (a read command).
    pub target_writes: bool,
}

/// An outgoing PDU.
pub struct OutPdu {
    /// The Basic Header Segment (DataSegmentLength already set).
    pub bhs: [u8; BHS_LEN],
    /// The data segment.
    pub data: PduData,
    /// For SCSI Command PDUs: the command's data buffer (used by iSER; TCP
    /// moves data in Data-In/Data-Out PDUs instead).
    pub task: Option<TaskBuffer>,
}

impl OutPdu {
    /// A PDU with a header and an optional data segment.
    pub fn new(bhs: [u8; BHS_LEN], data: PduData) -> Self {
        OutPdu {
            bhs,
            data,
            task: None,
        }
    }
}

/// A connection that carries iSCSI PDUs. One per session, driven by one
/// thread; non-blocking, with a file descriptor for epoll.
pub trait Transport: Send {
    /// The portal, for log lines.
    fn addr(&self) -> &str;
    /// A descriptor that is readable when [`recv`](Self::recv) may make progress
    /// (and writable when [`flush`](Self::flush) may).
    fn fd(&self) -> RawFd;
    /// Turns CRC32C header/data digests on or off (after login).
    fn set_digests(&mut self, header: bool, data: bool);
    /// Largest data segment we accept (our MaxRecvDataSegmentLength).
    fn set_max_recv_data(&mut self, max: u32);
    /// Queues a PDU; [`flush`](Self::flush) sends it.
    fn queue(&mut self, pdu: OutPdu);
    /// Sends what can be sent without blocking; true when nothing is left.
    fn flush(&mut self) -> Result<bool, TransportError>;
    /// Whether queued PDUs wait for the connection.
    fn has_pending_output(&self) -> bool;
    /// Receives the next complete PDU without blocking (Ok(None): not yet).
    /// `planner` says, per header with a data segment, where the data goes.
    fn recv(&mut self, planner: &mut dyn RecvPlanner) -> Result<Option<InPdu>, TransportError>;
    /// The transport moves command data itself (iSER: the target reads and
    /// writes the buffer named with the command); the session then sends no
    /// Data-Out and accepts no Data-In or R2T.
    fn places_data(&self) -> bool {
        false
    }
    /// Wake the receiver only once at least `bytes` have arrived (1: on any
    /// byte). A hint for interrupt coalescing: the session passes the bytes
    /// that responses it is sure to get will bring, so waiting never stalls
    /// while they succeed. The default ignores it.
    fn set_receive_batch(&mut self, bytes: usize) {
        let _ = bytes;
    }
    /// Waits until the connection may make progress (login phase), or the deadline.
    fn wait(&mut self, writable: bool, deadline: Instant) -> Result<(), TransportError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TransportError::Timeout {
                addr: self.addr().to_string(),
                what: if writable { "sending" } else { "a response" },
            });
        }
        let mut pfd = libc::pollfd {
            fd: self.fd(),
            events: if writable {
                libc::POLLOUT
            } else {
                libc::POLLIN
            },
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(TransportError::Io {
                    addr: self.addr().to_string(),
                    source: e,
                });
            }
        }
        Ok(())
    }
    /// Sends one PDU, waiting up to `deadline` (login phase).
    fn send_blocking(&mut self, pdu: OutPdu, deadline: Instant) -> Result<(), TransportError> {
        self.queue(pdu);
        while !self.flush()? {
            self.wait(true, deadline)?;
        }
        Ok(())
    }
    /// Receives one PDU into an owned buffer, waiting up to `deadline` (login phase).
    fn recv_blocking(&mut self, deadline: Instant) -> Result<InPdu, TransportError> {
        loop {
            if let Some(p) = self.recv(&mut |_: &[u8; BHS_LEN]| RecvPlan::Owned)? {
                return Ok(p);
            }
            self.wait(false, deadline)?;
        }
    }
}

/// Decides where received data segments go; the session implements it over
/// its task table (a closure is enough where no read-ahead is wanted).
pub trait RecvPlanner {
    /// Where the data segment of the PDU with this header goes. Called once
    /// per header with a data segment, when the header has arrived.
    fn plan(&mut self, bhs: &[u8; BHS_LEN]) -> RecvPlan;

    /// The Data-In PDUs the target will most likely send next, oldest first:
    /// appends up to `max` guesses to `out`, each naming a task and the guest
    /// buffer its whole data would fill (iovecs appended to `iov`). A
    /// transport may read these ahead in the same system call as the current
    /// PDU; it checks every header against its guess and copies out whatever
    /// landed in the wrong place. Only buffers of commands in flight (that
    /// the device still owns) may be named. The default guesses nothing.
    fn expected(&mut self, max: usize, out: &mut Vec<ExpectedDataIn>, iov: &mut Vec<iovec>) {
        let _ = (max, out, iov);
    }
}

impl<F: FnMut(&[u8; BHS_LEN]) -> RecvPlan + ?Sized> RecvPlanner for F {
    fn plan(&mut self, bhs: &[u8; BHS_LEN]) -> RecvPlan {
        self(bhs)
    }
}

/// A guess of [`RecvPlanner::expected`]: a Data-In carrying all of a read
/// command's data (offset 0, the whole expected length) in one PDU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpectedDataIn {
    /// The command's Initiator Task Tag.
    pub itt: u32,
    /// Its expected data length: the guessed DataSegmentLength.
    pub len: u32,
    /// Its buffer: `iov[iov_start..iov_end]` of the `iov` passed along.
    pub iov_start: usize,
    /// End of its iovecs.
    pub iov_end: usize,
}

/// Where the data segment of a received PDU goes.
pub enum RecvPlan {
    /// Into these iovecs (guest memory of the task), exactly DataSegmentLength bytes.
    Direct(Vec<iovec>),
    /// Into an owned buffer returned with the PDU.
    Owned,
    /// Read and throw away (the session refused the PDU; the connection is
    /// about to be dropped, but the stream must stay in sync until then).
    Discard,
}

/// A received PDU.
pub struct InPdu {
    /// The Basic Header Segment.
    pub bhs: [u8; BHS_LEN],
    /// The data segment when the plan was [`RecvPlan::Owned`].
    pub data: Vec<u8>,
}

/// Transport failures. Each ends the connection.
#[derive(Debug, Error)]
pub enum TransportError {
    /// The connection could not be established.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The portal.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A socket error on an established connection.
    #[error("connection to {addr} failed: {source}")]
    Io {
        /// The portal.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the connection.
    #[error("connection to {addr} closed by the target")]
    Closed {
        /// The portal.
        addr: String,
    },
    /// A header or data digest did not match.
    #[error("{what} digest mismatch on a PDU from {addr} (opcode {opcode:#04x})")]
    Digest {
        /// "header" or "data".
        what: &'static str,
        /// The portal.
        addr: String,
        /// Opcode of the PDU.
        opcode: u8,
    },
    /// The peer sent something the transport cannot frame.
    #[error("malformed PDU from {addr}: {reason}")]
    Malformed {
        /// The portal.
        addr: String,
        /// What is wrong.
        reason: String,
    },
    /// Nothing happened within the deadline (login phase).
    #[error("timed out waiting for {addr} ({what})")]
    Timeout {
        /// The portal.
        addr: String,
        /// What we waited for.
        what: &'static str,
    },
}
