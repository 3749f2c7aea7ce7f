//! MODE SENSE(6)/(10) data (SPC-4 7.5): the header's write-protect bit and
//! the caching mode page (SBC-4 6.5.5: WCE, RCD).

use super::error::ParseError;
use super::wire::{be16, slice, u8_at};

/// Page code of the caching mode page.
pub const CACHING_PAGE: u8 = 0x08;

/// One mode page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModePage {
    /// Page code (6 bits).
    pub code: u8,
    /// Subpage code (0 for page_0 format pages).
    pub subpage: u8,
    /// Parameters savable (PS).
    pub savable: bool,
    /// Page parameters after the page header.
    pub data: Vec<u8>,
}

/// The caching mode page's two bits an initiator cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachingPage {
    /// Write cache enabled: completed writes may sit in volatile cache
    /// until SYNCHRONIZE CACHE.
    pub wce: bool,
    /// Read cache disabled.
    pub rcd: bool,
}

/// Decoded MODE SENSE data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeSense {
    /// Medium type.
    pub medium_type: u8,
    /// WP: the logical unit is write protected.
    pub write_protected: bool,
    /// DPOFUA: the target honours DPO and FUA.
    pub dpofua: bool,
    /// Length of the block descriptors that were skipped.
    pub block_descriptor_len: usize,
    /// Pages that arrived completely.
    pub pages: Vec<ModePage>,
    /// True when the buffer held less than MODE DATA LENGTH announced.
    pub truncated: bool,
}

impl ModeSense {
    /// Parses MODE SENSE(6) data.
    pub fn parse6(buf: &[u8]) -> Result<Self, ParseError> {
        const W: &str = "MODE SENSE(6) data";
        let total = 1 + usize::from(u8_at(buf, 0, W)?);
        let medium_type = u8_at(buf, 1, W)?;
        let dsp = u8_at(buf, 2, W)?;
        let bdl = usize::from(u8_at(buf, 3, W)?);
        Self::finish(buf, W, total, 4, medium_type, dsp, bdl)
    }

    /// Parses MODE SENSE(10) data.
    pub fn parse10(buf: &[u8]) -> Result<Self, ParseError> {
        const W: &str = "MODE SENSE(10) data";
        let total = 2 + usize::from(be16(buf, 0, W)?);
        let medium_type = u8_at(buf, 2, W)?;
        let dsp = u8_at(buf, 3, W)?;
        let bdl = usize::from(be16(buf, 6, W)?);
        Self::finish(buf, W, total, 8, medium_type, dsp, bdl)
    }

    fn finish(
        buf: &[u8],
        what: &'static str,
        total: usize,
        header_len: usize,
        medium_type: u8,
        dsp: u8,
        bdl: usize,
    ) -> Result<Self, ParseError> {
        if total < header_len {
            return Err(ParseError::malformed(
                what,
                format!("mode data length {total} is shorter than the header"),
            ));
        }
        let truncated = buf.len() < total;
        let data = buf.get(..total.min(buf.len())).unwrap_or(buf);
        let pages_start = header_len + bdl;
        if pages_start > total {
            return Err(ParseError::malformed(
                what,
                format!("block descriptors ({bdl} bytes) run past the mode data ({total} bytes)"),
            ));
        }
        let mut pages = Vec::new();
        let mut off = pages_start;
        while off < data.len() {
            let Some(&b0) = data.get(off) else { break };
            let spf = b0 & 0x40 != 0;
            let (subpage, body_off, len) = if spf {
                match (data.get(off + 1), be16(data, off + 2, what)) {
                    (Some(&sp), Ok(len)) => (sp, off + 4, usize::from(len)),
                    _ if truncated => break,
                    _ => {
                        return Err(ParseError::malformed(
                            what,
                            format!("page header at byte {off} is cut"),
                        ))
                    }
                }
            } else {
                match data.get(off + 1) {
                    Some(&len) => (0, off + 2, usize::from(len)),
                    None if truncated => break,
                    None => {
                        return Err(ParseError::malformed(
                            what,
                            format!("page header at byte {off} is cut"),
                        ))
                    }
                }
            };
            let body = match slice(data, body_off, len, what) {
                Ok(b) => b,
                Err(_) if truncated => break,
                Err(_) => {
                    return Err(ParseError::malformed(
                        what,
                        format!(
                            "page 0x{:02x} at byte {off} runs past the mode data",
                            b0 & 0x3f
                        ),
                    ))
                }
            };
            pages.push(ModePage {
                code: b0 & 0x3f,
                subpage,
                savable: b0 & 0x80 != 0,
                data: body.to_vec(),
            });
            off = body_off + len;
        }
        Ok(Self {
            medium_type,
            write_protected: dsp & 0x80 != 0,
            dpofua: dsp & 0x10 != 0,
            block_descriptor_len: bdl,
            pages,
            truncated,
        })
    }

    /// The page with `code`/`subpage`, if it arrived.
    pub fn page(&self, code: u8, subpage: u8) -> Option<&ModePage> {
        self.pages
            .iter()
            .find(|p| p.code == code && p.subpage == subpage)
    }

    /// WCE and RCD from the caching page, if present and long enough.
    pub fn caching(&self) -> Option<CachingPage> {
        let b2 = *self.page(CACHING_PAGE, 0)?.data.first()?;
        Some(CachingPage {
            wce: b2 & 0x04 != 0,
            rcd: b2 & 0x01 != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::wire::{pseudo_random, unhex};

    /// tgtd, MODE SENSE(6) all pages, plain LUN (iSCSI padding removed).
    /// tgtd lists an empty page 0x00 first.
    const TGTD_MS6: &str = "6900100800000000000002000000020e8080000a0000000000000000000008121400ffff0000ffffffff80140000000000000a0a021000000000000002004a01001c040000000000000000000000000000000000000000000000000000001c0a08000000000000000000";
    /// The same on a readonly=1 LUN: WP set.
    const TGTD_MS6_RO: &str = "6900900800000000000002000000020e8080000a0000000000000000000008121400ffff0000ffffffff80140000000000000a0a021000000000000002004a01001c040000000000000000000000000000000000000000000000000000001c0a08000000000000000000";

    #[test]
    fn tgtd_mode_sense6() {
        assert_eq!(unhex(TGTD_MS6).len(), 0x69 + 1);
        let m = ModeSense::parse6(&unhex(TGTD_MS6)).unwrap();
        assert!(!m.write_protected);
        assert!(m.dpofua);
        assert!(!m.truncated);
        assert_eq!(m.block_descriptor_len, 8);
        let codes: Vec<_> = m.pages.iter().map(|p| (p.code, p.subpage)).collect();
        assert_eq!(
            codes,
            vec![
                (0x00, 0),
                (0x02, 0),
                (0x08, 0),
                (0x0a, 0),
                (0x0a, 1),
                (0x1c, 0)
            ]
        );
        assert_eq!(m.page(0x0a, 1).unwrap().data.len(), 0x1c);
        assert_eq!(
            m.caching(),
            Some(CachingPage {
                wce: true,
                rcd: false
            })
        );

        let m = ModeSense::parse6(&unhex(TGTD_MS6_RO)).unwrap();
        assert!(m.write_protected);
    }

    #[test]
    fn mode_sense10_caching_only() {
        // Header (8), no block descriptors, caching page with WCE=0 RCD=1.
        let m = ModeSense::parse10(&unhex(
            "001a 00 80 00 00 0000 0812 01000000000000000000000000000000 0000",
        ))
        .unwrap();
        assert!(m.write_protected && !m.dpofua);
        assert_eq!(
            m.caching(),
            Some(CachingPage {
                wce: false,
                rcd: true
            })
        );
    }

    #[test]
    fn truncated_and_malformed() {
        // Cut in the middle of the caching page: header still usable.
        let full = unhex(TGTD_MS6);
        let m = ModeSense::parse6(&full[..30]).unwrap();
        assert!(m.truncated);
        assert_eq!(m.caching(), None);
        assert_eq!(m.pages.len(), 2);
        // Page longer than the announced mode data: malformed.
        assert!(ModeSense::parse6(&unhex("07000000 0812 0400")).is_err());
        // Block descriptor length beyond the data.
        assert!(ModeSense::parse6(&unhex("05000010 000000")).is_err());
        // Mode data length smaller than the header.
        assert!(ModeSense::parse10(&unhex("0001 0000 0000 0000")).is_err());
        assert!(ModeSense::parse6(&[3, 0, 0]).is_err());
    }

    #[test]
    fn never_panics() {
        for v in [TGTD_MS6, TGTD_MS6_RO] {
            let v = unhex(v);
            for n in 0..=v.len() {
                let _ = ModeSense::parse6(&v[..n]).map(|m| m.caching());
                let _ = ModeSense::parse10(&v[..n]).map(|m| m.caching());
            }
        }
        for seed in 0..2000 {
            let b = pseudo_random(seed, (seed % 80) as usize);
            let _ = ModeSense::parse6(&b).map(|m| m.caching());
            let _ = ModeSense::parse10(&b).map(|m| m.caching());
        }
    }
}
