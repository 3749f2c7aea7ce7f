//! virtio-blk: request parsing and validation, the block target trait, the RAM target.
