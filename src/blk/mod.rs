//! virtio-blk: request parsing and validation, the config space, the block
//! target trait, and the RAM and null targets.

pub mod buffer;
pub mod config;
pub mod mem;
pub mod request;
pub mod target;
