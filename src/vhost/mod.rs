//! The vhost-user-blk device: backend (features, config space, event
//! dispatch), the per-queue workers, the split ring, inflight I/O tracking
//! and the cadence of completions during a batch.

pub mod backend;
pub mod inflight;
pub mod mid_batch;
pub mod ring;
pub mod worker;
