//! Transports that carry iSCSI PDUs: TCP (RFC 7143) and iSER (RFC 7145).
pub mod iser;
