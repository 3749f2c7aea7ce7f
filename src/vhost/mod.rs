//! The vhost-user-blk device: backend (features, config space, event
//! dispatch) and the per-queue workers.

pub mod backend;
pub mod worker;
