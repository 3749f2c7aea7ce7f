//! iSCSI (RFC 7143): PDUs, text negotiation, login, CHAP, discovery.
//!
//! Everything here is sans-I/O: types build the bytes to send and consume
//! the bytes received, and the session code drives them over a transport
//! (`tcp` or `iser`). Every byte from a target is treated as hostile: fields
//! are range-checked and errors are returned, never panics.
//!
//! - [`pdu`]: the 48-byte Basic Header Segment of every PDU, typed.
//! - [`digest`]: CRC32C header and data digests.
//! - [`text`]: `key=value` text data, split over PDUs with the C bit.
//! - [`params`]: operational parameters and their negotiation rules.
//! - [`chap`]: CHAP responses, secrets, mutual authentication helpers.
//! - [`login`]: the login state machine (security, operational, full feature).
//! - [`discovery`]: SendTargets requests and answers.

pub mod chap;
pub mod connect;
pub mod digest;
pub mod discovery;
pub mod login;
pub mod params;
pub mod pdu;
pub mod session;
pub mod task;
pub mod text;
pub mod url;
