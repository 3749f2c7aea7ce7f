//! iSER RDMA CM private data (RFC 7145 §9.1, "iSER CM REQ Message Private
//! Data Format"), the 4-byte `struct iser_cm_hdr { u8 flags; u8 rsvd[3]; }`
//! of Linux `include/scsi/iser.h`.
//!
//! What the peers do with it (read from their sources):
//! - Linux ib_iser (initiator) sends `flags = ZBVA_NOT_SUP` plus
//!   `SEND_W_INV_NOT_SUP` unless its device supports remote invalidation, with
//!   `responder_resources = max_qp_rd_atom`, `initiator_depth = 1`,
//!   `retry_count = 7`, `rnr_retry_count = 6`.
//! - Linux isert (LIO target) reads bit 0x40 of the REQ to decide whether it
//!   may Send-with-Invalidate, and answers in the REP with the same layout:
//!   `0x80` (ZBVA not used) and `0x40` when it will not send with invalidate.
//! - tgtd ignores the REQ private data and accepts with **no** private data.
//!   Over InfiniBand/RoCE the IB CM pads REP private data to 196 bytes of
//!   zeros, so a tgtd REP decodes as "all flags clear" — which is harmless
//!   for an initiator that never relies on ZBVA or remote invalidation.

use thiserror::Error;

/// Length of the iSER CM header.
pub const CM_HDR_LEN: usize = 4;
/// Z bit: the sender does not support Zero Based Virtual Addressing
/// (initiator) / will not use it (target).
pub const ZBVA_NOT_SUPPORTED: u8 = 0x80;
/// I bit: the sender does not support receiving Send with Invalidate
/// (initiator) / will not send it (target).
pub const SEND_W_INV_NOT_SUPPORTED: u8 = 0x40;

/// Errors decoding CM private data received from the peer.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CmHdrError {
    /// Private data is present but shorter than the 4-byte header.
    #[error("iSER CM private data too short: {0} bytes, need {CM_HDR_LEN}")]
    Truncated(usize),
}

/// The iSER CM header carried in the private data of the RDMA CM connect
/// request (initiator) and accept (target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmHdr {
    /// Z: ZBVA not supported / not used.
    pub zbva_not_supported: bool,
    /// I: Send with Invalidate not supported / not used.
    pub send_w_inv_not_supported: bool,
}

impl CmHdr {
    /// What this initiator sends: it always advertises real virtual
    /// addresses (no ZBVA) and does not let the target invalidate its
    /// STags remotely (it never uses fast-registration invalidation).
    pub fn initiator() -> Self {
        CmHdr {
            zbva_not_supported: true,
            send_w_inv_not_supported: true,
        }
    }

    /// Encodes the 4-byte header; the reserved bytes are zero.
    pub fn encode(&self) -> [u8; CM_HDR_LEN] {
        let mut flags = 0;
        if self.zbva_not_supported {
            flags |= ZBVA_NOT_SUPPORTED;
        }
        if self.send_w_inv_not_supported {
            flags |= SEND_W_INV_NOT_SUPPORTED;
        }
        [flags, 0, 0, 0]
    }

    /// Decodes the header from received private data. `Ok(None)` means the
    /// peer sent none (possible on iWARP; on IB/RoCE the CM always delivers
    /// zero-padded data). Bytes after the header (CM padding) and the
    /// reserved bits are ignored, as RFC 7145 requires for reserved fields.
    pub fn decode(private_data: &[u8]) -> Result<Option<Self>, CmHdrError> {
        if private_data.is_empty() {
            return Ok(None);
        }
        let flags = match private_data.get(..CM_HDR_LEN) {
            Some(h) => h[0],
            None => return Err(CmHdrError::Truncated(private_data.len())),
        };
        Ok(Some(CmHdr {
            zbva_not_supported: flags & ZBVA_NOT_SUPPORTED != 0,
            send_w_inv_not_supported: flags & SEND_W_INV_NOT_SUPPORTED != 0,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initiator_header_matches_linux_ib_iser() {
        // ib_iser without remote-invalidate support: ISER_ZBVA_NOT_SUP | ISER_SEND_W_INV_NOT_SUP.
        assert_eq!(CmHdr::initiator().encode(), [0xc0, 0, 0, 0]);
    }

    #[test]
    fn decode_isert_reply() {
        // isert with snd_w_inv: only ISERT_ZBVA_NOT_USED.
        let h = CmHdr::decode(&[0x80, 0, 0, 0]).unwrap().unwrap();
        assert!(h.zbva_not_supported);
        assert!(!h.send_w_inv_not_supported);
        let h = CmHdr::decode(&[0xc0, 0, 0, 0]).unwrap().unwrap();
        assert!(h.send_w_inv_not_supported);
        assert_eq!(h.encode(), [0xc0, 0, 0, 0]);
    }

    #[test]
    fn decode_padded_and_empty_and_short() {
        // tgtd sends nothing; the IB CM pads the REP to 196 zero bytes.
        let padded = [0u8; 196];
        let h = CmHdr::decode(&padded).unwrap().unwrap();
        assert!(!h.zbva_not_supported && !h.send_w_inv_not_supported);
        assert_eq!(CmHdr::decode(&[]), Ok(None));
        assert_eq!(CmHdr::decode(&[0x80, 0]), Err(CmHdrError::Truncated(2)));
        // Reserved bits ignored.
        let h = CmHdr::decode(&[0x3f, 0xff, 0xff, 0xff]).unwrap().unwrap();
        assert_eq!(
            h,
            CmHdr {
                zbva_not_supported: false,
                send_w_inv_not_supported: false
            }
        );
    }
}
