//! Transports that carry iSCSI PDUs: TCP (RFC 7143) and iSER (RFC 7145).
//!
//! The session layer hands a transport whole PDUs (a header and, for data
//! PDUs, a range of a request's buffers in guest memory) and gets PDUs back,
//! deciding for each received header where its data segment goes: straight
//! into the guest buffer of the task it belongs to, into a small owned buffer
//! (text, sense), or nowhere (the session refused it).

use std::sync::Arc;

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

/// An outgoing PDU.
pub struct OutPdu {
    /// The Basic Header Segment (DataSegmentLength already set).
    pub bhs: [u8; BHS_LEN],
    /// The data segment.
    pub data: PduData,
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
