//! REPORT LUNS data (SPC-4 6.33) and LUN addressing (SAM-5 4.7).

use std::fmt;

use super::error::ParseError;
use super::wire::{array, be32, hex};

/// An 8-byte SCSI LUN as it travels in iSCSI PDUs and REPORT LUNS data.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lun(pub [u8; 8]);

/// How the first level of a LUN is addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressMethod {
    /// 00b: peripheral device addressing (bus 0: LUNs 0..=255).
    Peripheral,
    /// 01b: flat space addressing (LUNs 0..=16383).
    Flat,
    /// 10b: logical unit addressing (target/bus/lun).
    LogicalUnit,
    /// 11b: extended addressing (well-known LUNs, extended flat space).
    Extended,
}

impl Lun {
    /// The LUN a target with `n` logical units most likely uses for number
    /// `n`: peripheral addressing below 256, flat space up to 16383 (what
    /// Linux and libiscsi send). None above 16383.
    pub fn from_number(n: u16) -> Option<Self> {
        let mut b = [0u8; 8];
        match n {
            0..=255 => b[1] = n as u8,
            256..=0x3fff => {
                b[0] = 0x40 | (n >> 8) as u8;
                b[1] = n as u8;
            }
            _ => return None,
        }
        Some(Self(b))
    }

    /// The LUN as one big-endian u64 (the raw 8 bytes).
    pub fn encoded(&self) -> u64 {
        u64::from_be_bytes(self.0)
    }

    /// Builds a LUN from its big-endian u64 form.
    pub fn from_encoded(v: u64) -> Self {
        Self(v.to_be_bytes())
    }

    /// Address method of the first level.
    pub fn address_method(&self) -> AddressMethod {
        match self.0[0] >> 6 {
            0 => AddressMethod::Peripheral,
            1 => AddressMethod::Flat,
            2 => AddressMethod::LogicalUnit,
            _ => AddressMethod::Extended,
        }
    }

    /// True when only the first level (2 bytes) is used.
    pub fn is_single_level(&self) -> bool {
        self.0[2..].iter().all(|&b| b == 0)
    }

    /// The readable LUN number for single-level peripheral (bus 0), flat
    /// space and extended flat space LUNs; None for other forms.
    pub fn number(&self) -> Option<u32> {
        let b = self.0;
        match self.address_method() {
            AddressMethod::Peripheral if b[0] == 0 && self.is_single_level() => {
                Some(u32::from(b[1]))
            }
            AddressMethod::Flat if self.is_single_level() => {
                Some(u32::from(u16::from_be_bytes([b[0] & 0x3f, b[1]])))
            }
            // Extended flat space: length 01b (4 bytes), method 2: 0xD2.
            AddressMethod::Extended if b[0] == 0xd2 && b[4..].iter().all(|&x| x == 0) => {
                Some(u32::from_be_bytes([0, b[1], b[2], b[3]]))
            }
            _ => None,
        }
    }

    /// The integer Linux shows for this LUN (scsilun_to_int): the 2-byte
    /// levels swapped so a single-level LUN reads as its first two bytes.
    pub fn linux_id(&self) -> u64 {
        (0..4).fold(0u64, |acc, i| {
            let level = u64::from(u16::from_be_bytes([self.0[2 * i], self.0[2 * i + 1]]));
            acc | (level << (16 * i))
        })
    }
}

impl fmt::Debug for Lun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lun({self})")
    }
}

impl fmt::Display for Lun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.number() {
            Some(n) => write!(f, "{n}"),
            None => write!(f, "0x{}", hex(&self.0)),
        }
    }
}

/// Decoded REPORT LUNS data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportLuns {
    /// The LUNs that arrived.
    pub luns: Vec<Lun>,
    /// Bytes the full answer needs (8 + LUN LIST LENGTH): re-issue REPORT
    /// LUNS with this allocation length when `complete` is false.
    pub required_len: usize,
    /// True when every LUN the target listed arrived.
    pub complete: bool,
}

impl ReportLuns {
    /// Parses REPORT LUNS data. A list cut by a small allocation length is
    /// not an error (see `complete`); a list length that is not a multiple of
    /// 8 is.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        const W: &str = "REPORT LUNS data";
        let list_len = be32(buf, 0, W)? as usize;
        array::<8>(buf, 0, W)?;
        if !list_len.is_multiple_of(8) {
            return Err(ParseError::malformed(
                W,
                format!("LUN list length {list_len} is not a multiple of 8"),
            ));
        }
        let required_len = list_len.saturating_add(8);
        let avail = buf.len().min(required_len);
        let body = buf.get(8..avail).unwrap_or(&[]);
        let luns = body
            .chunks_exact(8)
            .filter_map(|c| <[u8; 8]>::try_from(c).ok())
            .map(Lun)
            .collect::<Vec<_>>();
        Ok(Self {
            complete: luns.len() * 8 == list_len,
            luns,
            required_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::wire::{pseudo_random, unhex};

    /// tgtd with LUNs 0..=4, first with a 16-byte then a 48-byte allocation
    /// (iscsi-ls -s).
    const TGTD_SHORT: &str = "00000028000000000000000000000000";
    const TGTD_FULL: &str = "000000280000000000000000000000000001000000000000000200000000000000030000000000000004000000000000";

    #[test]
    fn tgtd_report_luns() {
        let r = ReportLuns::parse(&unhex(TGTD_SHORT)).unwrap();
        assert!(!r.complete);
        assert_eq!(r.required_len, 48);
        assert_eq!(r.luns, vec![Lun([0; 8])]);
        let r = ReportLuns::parse(&unhex(TGTD_FULL)).unwrap();
        assert!(r.complete);
        let numbers: Vec<_> = r.luns.iter().map(|l| l.number().unwrap()).collect();
        assert_eq!(numbers, vec![0, 1, 2, 3, 4]);
        assert_eq!(r.luns[1], Lun::from_number(1).unwrap());
        assert_eq!(r.luns[1].encoded(), 0x0001_0000_0000_0000);
        assert_eq!(r.luns[1].linux_id(), 1);
    }

    #[test]
    fn addressing_methods() {
        let flat = Lun::from_number(300).unwrap();
        assert_eq!(flat.0, [0x41, 0x2c, 0, 0, 0, 0, 0, 0]);
        assert_eq!(flat.address_method(), AddressMethod::Flat);
        assert_eq!(flat.number(), Some(300));
        assert_eq!(flat.linux_id(), 0x412c);
        assert_eq!(flat.to_string(), "300");
        assert_eq!(Lun::from_number(0x4000), None);
        // Flat addressing of a small number still reads as that number.
        assert_eq!(Lun([0x40, 0x05, 0, 0, 0, 0, 0, 0]).number(), Some(5));
        // Extended flat space.
        let ext = Lun([0xd2, 0x01, 0x02, 0x03, 0, 0, 0, 0]);
        assert_eq!(ext.address_method(), AddressMethod::Extended);
        assert_eq!(ext.number(), Some(0x010203));
        // REPORT LUNS well-known LUN has no number.
        let wl = Lun([0xc1, 0x01, 0, 0, 0, 0, 0, 0]);
        assert_eq!(wl.number(), None);
        assert_eq!(wl.to_string(), "0xc101000000000000");
        // Peripheral addressing on bus 1, and a two-level LUN.
        assert_eq!(Lun([0x01, 0x02, 0, 0, 0, 0, 0, 0]).number(), None);
        let two = Lun([0x00, 0x01, 0x00, 0x02, 0, 0, 0, 0]);
        assert_eq!(two.number(), None);
        assert_eq!(two.linux_id(), 0x0002_0001);
        assert_eq!(Lun::from_encoded(two.encoded()), two);
    }

    #[test]
    fn malformed_and_short() {
        assert!(ReportLuns::parse(&unhex("0000000900000000")).is_err());
        assert!(ReportLuns::parse(&unhex("00000008000000")).is_err());
        let r = ReportLuns::parse(&unhex("00000000 00000000")).unwrap();
        assert!(r.complete && r.luns.is_empty());
        // A partial entry is dropped.
        let r = ReportLuns::parse(&unhex("00000010 00000000 0001000000000000 0002")).unwrap();
        assert_eq!(r.luns.len(), 1);
        assert!(!r.complete);
    }

    #[test]
    fn never_panics() {
        let v = unhex(TGTD_FULL);
        for n in 0..v.len() {
            let _ = ReportLuns::parse(&v[..n]);
        }
        for seed in 0..500 {
            let b = pseudo_random(seed, (seed % 50) as usize);
            if let Ok(r) = ReportLuns::parse(&b) {
                for l in r.luns {
                    let _ = (l.number(), l.linux_id(), l.to_string());
                }
            }
        }
        let _ = Lun([0xff; 8]).linux_id();
    }
}
