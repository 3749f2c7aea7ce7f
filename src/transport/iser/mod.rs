//! iSER transport (RFC 7145, RFC 7146): iSCSI PDUs carried in RDMA Sends,
//! data moved by the target with RDMA Read/Write into registered initiator
//! memory.
//!
//! - [`header`]: the iSER header in front of every PDU, Hello/HelloReply.
//! - [`cm`]: the iSER header in the RDMA CM private data.
//! - [`verbs`]: safe wrappers over libibverbs/librdmacm (`rdma-sys`).
//! - [`memory`]: guest memory registered once per region and device.
//! - [`connection`]: [`IserConnection`], the [`crate::transport::Transport`]
//!   over one RC queue pair.

pub mod cm;
pub mod connection;
pub mod header;
pub mod memory;
pub mod verbs;

pub use connection::{bytes_copied, bytes_copied_unregistered, IserConnection};
pub use memory::GuestMemoryRegistration;
