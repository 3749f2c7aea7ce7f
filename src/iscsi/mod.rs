//! iSCSI (RFC 7143): PDUs, text negotiation, login, CHAP, session, task table.
