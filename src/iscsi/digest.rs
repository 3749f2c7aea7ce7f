//! CRC32C header and data digests (RFC 7143 §13.1, Appendix B).
//!
//! The digest is the CRC32C (Castagnoli) of the bytes it covers, sent on the
//! wire least significant byte first. The header digest covers the BHS and
//! AHS; the data digest covers the data segment *including its padding*, so
//! [`DataDigest`] adds the pad bytes itself when finished.

use super::pdu::{pad_len, BHS_LEN, DIGEST_LEN};

/// Incremental CRC32C over any number of byte slices (iovec-like segments).
#[derive(Debug, Clone, Copy, Default)]
pub struct Crc32c {
    crc: u32,
}

impl Crc32c {
    /// A fresh digest.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.crc = crc32c::crc32c_append(self.crc, bytes);
    }

    /// Add several segments in order, as in a scatter/gather list.
    pub fn update_all<'a, I: IntoIterator<Item = &'a [u8]>>(&mut self, segments: I) {
        for s in segments {
            self.update(s);
        }
    }

    /// The CRC32C value.
    pub fn value(&self) -> u32 {
        self.crc
    }

    /// The 4 digest bytes as sent on the wire.
    pub fn to_wire(&self) -> [u8; DIGEST_LEN] {
        self.crc.to_le_bytes()
    }
}

/// Header digest of a BHS and its AHS (empty when there is none).
pub fn header_digest(bhs: &[u8; BHS_LEN], ahs: &[u8]) -> [u8; DIGEST_LEN] {
    let mut c = Crc32c::new();
    c.update(bhs);
    c.update(ahs);
    c.to_wire()
}

/// Incremental data digest: feed the data segment in pieces, then
/// [`DataDigest::finish`] adds the pad bytes up to a 4-byte boundary.
#[derive(Debug, Clone, Copy, Default)]
pub struct DataDigest {
    crc: Crc32c,
    len: u64,
}

impl DataDigest {
    /// A fresh data digest.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add part of the data segment.
    pub fn update(&mut self, bytes: &[u8]) {
        self.crc.update(bytes);
        self.len = self.len.wrapping_add(bytes.len() as u64);
    }

    /// Add several parts of the data segment in order.
    pub fn update_all<'a, I: IntoIterator<Item = &'a [u8]>>(&mut self, segments: I) {
        for s in segments {
            self.update(s);
        }
    }

    /// Add the zero padding and return the 4 wire bytes.
    pub fn finish(mut self) -> [u8; DIGEST_LEN] {
        let pad = pad_len((self.len % 4) as u32);
        self.crc.update(&[0u8; 3][..pad]);
        self.crc.to_wire()
    }
}

/// Data digest of a data segment given as a list of segments.
pub fn data_digest<'a, I: IntoIterator<Item = &'a [u8]>>(segments: I) -> [u8; DIGEST_LEN] {
    let mut d = DataDigest::new();
    d.update_all(segments);
    d.finish()
}

/// Compare a received digest with the computed one.
pub fn digest_matches(received: &[u8], computed: &[u8; DIGEST_LEN]) -> bool {
    received == computed.as_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7143 Appendix B.4 test vectors (CRC value, then its wire bytes).
    #[test]
    fn rfc_vectors() {
        let zeros = [0u8; 32];
        assert_eq!(data_digest([&zeros[..]]), [0xaa, 0x36, 0x91, 0x8a]);
        let ones = [0xffu8; 32];
        assert_eq!(data_digest([&ones[..]]), [0x43, 0xab, 0xa8, 0x62]);
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(data_digest([&inc[..]]), [0x4e, 0x79, 0xdd, 0x46]);
        let dec: Vec<u8> = (0u8..32).rev().collect();
        assert_eq!(data_digest([&dec[..]]), [0x5c, 0xdb, 0x3f, 0x11]);
    }

    #[test]
    fn rfc_read_pdu_vector() {
        // The 48-byte iSCSI SCSI Read (10) command PDU of RFC 7143 B.4.
        let mut pdu = [0u8; BHS_LEN];
        pdu[0] = 0x01;
        pdu[1] = 0xc0;
        pdu[16..20].copy_from_slice(&[0x14, 0, 0, 0]);
        pdu[20..24].copy_from_slice(&[0, 0, 0x04, 0]);
        pdu[24..28].copy_from_slice(&[0, 0, 0, 0x14]);
        pdu[28..32].copy_from_slice(&[0, 0, 0, 0x18]);
        pdu[32] = 0x28;
        pdu[40] = 0x02;
        let d = header_digest(&pdu, &[]);
        assert_eq!(u32::from_le_bytes(d), 0xd996_3a56);
    }

    #[test]
    fn incremental_equals_one_shot() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let one = data_digest([&data[..]]);
        let (a, rest) = data.split_at(3);
        let (b, c) = rest.split_at(500);
        assert_eq!(data_digest([a, b, c]), one);
        let mut d = DataDigest::new();
        for chunk in data.chunks(13) {
            d.update(chunk);
        }
        assert_eq!(d.finish(), one);
    }

    #[test]
    fn padding_is_included() {
        let data = [1u8, 2, 3, 4, 5];
        let padded = [1u8, 2, 3, 4, 5, 0, 0, 0];
        let mut c = Crc32c::new();
        c.update(&padded);
        assert_eq!(data_digest([&data[..]]), c.to_wire());
        assert!(digest_matches(&c.to_wire(), &data_digest([&data[..]])));
        assert!(!digest_matches(&[0, 0, 0, 0], &data_digest([&data[..]])));
    }
}
