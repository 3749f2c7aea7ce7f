//! READ CAPACITY(10) and (16) data (SBC-4 5.15, 5.16).

use super::error::ParseError;
use super::wire::{be32, be64, u8_at};

/// Answer to READ CAPACITY(10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadCapacity10 {
    /// The last LBA; 0xFFFF_FFFF means "too large, use READ CAPACITY(16)".
    pub last_lba: u32,
    /// Logical block length in bytes.
    pub block_len: u32,
}

impl ReadCapacity10 {
    /// Parses the 8-byte READ CAPACITY(10) data.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        const W: &str = "READ CAPACITY(10) data";
        Ok(Self {
            last_lba: be32(buf, 0, W)?,
            block_len: be32(buf, 4, W)?,
        })
    }

    /// True when the capacity does not fit and READ CAPACITY(16) is needed.
    pub fn needs_16(&self) -> bool {
        self.last_lba == u32::MAX
    }
}

/// Answer to READ CAPACITY(16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadCapacity16 {
    /// The last LBA.
    pub last_lba: u64,
    /// Logical block length in bytes.
    pub block_len: u32,
    /// Protection type minus one (P_TYPE), meaningful when `prot_en`.
    pub p_type: u8,
    /// Protection information enabled.
    pub prot_en: bool,
    /// Protection information intervals exponent.
    pub p_i_exponent: u8,
    /// Logical blocks per physical block, as a power of two.
    pub lb_per_pb_exponent: u8,
    /// Logical block provisioning management enabled (thin provisioning).
    pub lbpme: bool,
    /// Unmapped blocks read as zeros.
    pub lbprz: bool,
    /// First LBA aligned to a physical block.
    pub lowest_aligned_lba: u16,
}

impl ReadCapacity16 {
    /// Parses READ CAPACITY(16) data. The first 12 bytes (last LBA, block
    /// length) are required; the flag bytes 12..16 read as 0 when absent.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        const W: &str = "READ CAPACITY(16) data";
        let last_lba = be64(buf, 0, W)?;
        let block_len = be32(buf, 8, W)?;
        let b = |i| u8_at(buf, i, W).unwrap_or(0);
        let (b12, b13, b14, b15) = (b(12), b(13), b(14), b(15));
        Ok(Self {
            last_lba,
            block_len,
            p_type: (b12 >> 1) & 0x07,
            prot_en: b12 & 0x01 != 0,
            p_i_exponent: b13 >> 4,
            lb_per_pb_exponent: b13 & 0x0f,
            lbpme: b14 & 0x80 != 0,
            lbprz: b14 & 0x40 != 0,
            lowest_aligned_lba: u16::from_be_bytes([b14 & 0x3f, b15]),
        })
    }

    /// The protection type (1, 2 or 3) if protection is enabled.
    pub fn protection_type(&self) -> Option<u8> {
        self.prot_en.then_some(self.p_type + 1)
    }
}

/// The capacity from either command, as [`super::disk`] consumes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// The last LBA.
    pub last_lba: u64,
    /// Logical block length in bytes.
    pub block_len: u32,
    /// READ CAPACITY(16) details, when that command worked.
    pub details: Option<ReadCapacity16>,
}

impl From<ReadCapacity16> for Capacity {
    fn from(r: ReadCapacity16) -> Self {
        Self {
            last_lba: r.last_lba,
            block_len: r.block_len,
            details: Some(r),
        }
    }
}

impl From<ReadCapacity10> for Capacity {
    fn from(r: ReadCapacity10) -> Self {
        Self {
            last_lba: u64::from(r.last_lba),
            block_len: r.block_len,
            details: None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::scsi::wire::{pseudo_random, unhex};

    // Captured from tgtd 1.0.85: 64 MiB file LUN with 512-byte blocks
    // (reports 4 KiB physical blocks), the same with thin_provisioning=1, and
    // a LUN with --blocksize=4096.
    pub(crate) const TGTD_RC16: &str =
        "000000000001ffff000002000003000000000000000000000000000000000000";
    pub(crate) const TGTD_RC16_THIN: &str =
        "000000000001ffff000002000003c00000000000000000000000000000000000";
    pub(crate) const TGTD_RC16_4K: &str =
        "0000000000003fff000010000000000000000000000000000000000000000000";
    pub(crate) const TGTD_RC10: &str = "0001ffff00000200";
    pub(crate) const TGTD_RC10_4K: &str = "00003fff00001000";

    #[test]
    fn tgtd_read_capacity() {
        // iscsi-readcapacity16 printed: LBA 131071, 512, P_TYPE 0 PROT_EN 0,
        // exponent 3, LBPME 0 LBPRZ 0, lowest aligned 0.
        let r = ReadCapacity16::parse(&unhex(TGTD_RC16)).unwrap();
        assert_eq!(r.last_lba, 131_071);
        assert_eq!(r.block_len, 512);
        assert_eq!(r.lb_per_pb_exponent, 3);
        assert!(!r.prot_en && !r.lbpme && !r.lbprz);
        assert_eq!(r.protection_type(), None);
        assert_eq!(r.lowest_aligned_lba, 0);

        let r = ReadCapacity16::parse(&unhex(TGTD_RC16_THIN)).unwrap();
        assert!(r.lbpme && r.lbprz);

        let r = ReadCapacity16::parse(&unhex(TGTD_RC16_4K)).unwrap();
        assert_eq!(
            (r.last_lba, r.block_len, r.lb_per_pb_exponent),
            (16383, 4096, 0)
        );

        let r = ReadCapacity10::parse(&unhex(TGTD_RC10)).unwrap();
        assert_eq!((r.last_lba, r.block_len), (131_071, 512));
        assert!(!r.needs_16());
        let c: Capacity = ReadCapacity10::parse(&unhex(TGTD_RC10_4K)).unwrap().into();
        assert_eq!((c.last_lba, c.block_len, c.details), (16383, 4096, None));
    }

    #[test]
    fn protection_and_alignment_bits() {
        let r = ReadCapacity16::parse(&unhex("00000001000000000000020005 23 bf ff")).unwrap();
        assert_eq!(r.last_lba, 1 << 32);
        assert_eq!(r.protection_type(), Some(3));
        assert_eq!(r.p_i_exponent, 2);
        assert_eq!(r.lb_per_pb_exponent, 3);
        assert!(r.lbpme && !r.lbprz);
        assert_eq!(r.lowest_aligned_lba, 0x3fff);
        // 12 bytes is enough; flags default to 0.
        let r = ReadCapacity16::parse(&unhex("00000000000000ff00000200")).unwrap();
        assert_eq!(r.last_lba, 255);
        assert!(!r.lbpme);
        assert!(ReadCapacity10::parse(&unhex("ffffffff00000200"))
            .unwrap()
            .needs_16());
    }

    #[test]
    fn never_panics() {
        for v in [TGTD_RC16, TGTD_RC10] {
            let v = unhex(v);
            for n in 0..v.len() {
                let _ = ReadCapacity16::parse(&v[..n]);
                let _ = ReadCapacity10::parse(&v[..n]);
            }
        }
        assert!(ReadCapacity16::parse(&[0; 11]).is_err());
        assert!(ReadCapacity10::parse(&[0; 7]).is_err());
        for seed in 0..500 {
            let b = pseudo_random(seed, (seed % 40) as usize);
            let _ = ReadCapacity16::parse(&b).map(|r| r.protection_type());
        }
    }
}
