//! The vhost-user-blk device: backend, per-queue workers.
