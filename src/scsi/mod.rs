//! SCSI for a block initiator (SBC-4, SPC-4): pure code, no I/O.
//!
//! - [`cdb`]: CDB builders (READ/WRITE 10/16, SYNCHRONIZE CACHE, UNMAP, WRITE
//!   SAME, INQUIRY, READ CAPACITY, REPORT LUNS, MODE SENSE, TEST UNIT READY).
//! - [`status`]: the SCSI status byte.
//! - [`sense`]: sense data decoding, readable ASC/ASCQ text and the
//!   [`sense::SenseAction`] an initiator takes.
//! - [`inquiry`], [`capacity`], [`luns`], [`mode`]: parsers for the data
//!   those commands return.
//! - [`disk`]: combines the answers into the [`disk::LunInfo`] a virtio-blk
//!   device needs, drives the probe sequence ([`disk::LunProber`]) and splits
//!   byte ranges into commands.
//!
//! Every parser treats its input as hostile: short or malformed buffers give
//! a [`ParseError`], never a panic.

#![warn(missing_docs)]

pub mod capacity;
pub mod cdb;
pub mod disk;
mod error;
pub mod inquiry;
pub mod luns;
pub mod mode;
pub mod sense;
pub mod status;
mod wire;

pub use error::{CdbError, ParseError};
pub mod lun;
