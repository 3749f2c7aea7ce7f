//! iSER transport (RFC 7145, RFC 7146): iSCSI PDUs carried in RDMA Sends,
//! data moved by the target with RDMA Read/Write into registered initiator
//! memory.
//!
//! - [`header`]: the iSER header in front of every PDU, Hello/HelloReply.
//! - [`cm`]: the iSER header in the RDMA CM private data.
//! - [`verbs`]: safe wrappers over libibverbs/librdmacm (`rdma-sys`).

pub mod cm;
pub mod header;
pub mod verbs;
