//! The vhost-user-blk device: backend (features, config space, event
//! dispatch), the per-queue workers and inflight I/O tracking.

pub mod backend;
pub mod inflight;
pub mod mid_batch;
pub mod ring;
pub mod worker;
