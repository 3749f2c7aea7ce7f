//! vhost-iser: a vhost-user-blk backend that turns virtio-blk requests into
//! iSCSI commands to a remote target, over iSER (RDMA) or TCP.
//!
//! Data flows one way through the layers; each module knows only the one below:
//!
//! `vhost` (vhost-user device, queues, workers) → `blk` (virtio-blk requests,
//! the [`blk::target::Target`] trait and the RAM target) → `scsi` (CDBs, sense)
//! → `iscsi` (PDUs, login, session, task table) → `transport` (`tcp`, `iser`).

#![deny(unsafe_op_in_unsafe_fn)]

pub mod blk;
pub mod config;
pub mod iscsi;
pub mod log_limit;
pub mod metrics;
pub mod open;
pub mod scsi;
pub mod transport;
pub mod vhost;
