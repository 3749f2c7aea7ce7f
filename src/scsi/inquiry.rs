//! INQUIRY data (SPC-4 6.6) and the vital product data pages a block
//! initiator reads: 0x00, 0x80, 0x83 (SPC-4 7.8) and 0xB0, 0xB1, 0xB2 (SBC-4 6.6).
//!
//! VPD parsers require the whole page (4 + PAGE LENGTH bytes): a shorter
//! buffer returns [`ParseError::Truncated`] whose `need` is the allocation
//! length to retry with. Bytes after the page are ignored.

use std::fmt;

use super::error::ParseError;
use super::wire::{ascii_field, be16, be32, be32_or_zero, be64, hex, slice, u8_at, u8_or_zero};

/// Peripheral device type of a disk (SBC direct-access block device).
pub const DEVICE_TYPE_DISK: u8 = 0x00;

/// VPD page codes.
pub mod page {
    /// Supported VPD pages.
    pub const SUPPORTED: u8 = 0x00;
    /// Unit serial number.
    pub const UNIT_SERIAL: u8 = 0x80;
    /// Device identification.
    pub const DEVICE_ID: u8 = 0x83;
    /// Block limits (SBC).
    pub const BLOCK_LIMITS: u8 = 0xb0;
    /// Block device characteristics (SBC).
    pub const BLOCK_CHARACTERISTICS: u8 = 0xb1;
    /// Logical block provisioning (SBC).
    pub const PROVISIONING: u8 = 0xb2;
}

/// Standard INQUIRY data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandardInquiry {
    /// 0 = a logical unit is connected; 1 = supported but not connected;
    /// 3 = no logical unit at this LUN.
    pub peripheral_qualifier: u8,
    /// Device type (0 = disk, 5 = CD/DVD, 0x0c = storage array controller...).
    pub device_type: u8,
    /// Removable medium.
    pub removable: bool,
    /// VERSION: the SPC revision claimed (3 = SPC, 4 = SPC-2, 5 = SPC-3, 6 = SPC-4, 7 = SPC-5).
    pub version: u8,
    /// NORMACA support.
    pub normaca: bool,
    /// Hierarchical LUN addressing support.
    pub hisup: bool,
    /// RESPONSE DATA FORMAT (2 for any modern target).
    pub response_data_format: u8,
    /// Embedded storage array controller.
    pub sccs: bool,
    /// Access controls coordinator.
    pub acc: bool,
    /// Target port group support (ALUA): 0 none, 1 implicit, 2 explicit, 3 both.
    pub tpgs: u8,
    /// Third-party copy (EXTENDED COPY) support.
    pub three_pc: bool,
    /// Protection information support.
    pub protect: bool,
    /// Enclosure services.
    pub encserv: bool,
    /// Multi-port device.
    pub multip: bool,
    /// Command queuing supported.
    pub cmdque: bool,
    /// T10 vendor identification, trimmed.
    pub vendor: String,
    /// Product identification, trimmed.
    pub product: String,
    /// Product revision level, trimmed.
    pub revision: String,
    /// Non-zero version descriptors (standards claimed), if returned.
    pub version_descriptors: Vec<u16>,
}

/// Length of the mandatory part of standard INQUIRY data.
pub const STANDARD_INQUIRY_MIN_LEN: usize = 36;

impl StandardInquiry {
    /// Parses standard INQUIRY data. Needs at least the 36 mandatory bytes.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        const W: &str = "standard INQUIRY data";
        slice(buf, 0, STANDARD_INQUIRY_MIN_LEN, W)?;
        let b0 = u8_at(buf, 0, W)?;
        let b1 = u8_at(buf, 1, W)?;
        let b3 = u8_at(buf, 3, W)?;
        let b5 = u8_at(buf, 5, W)?;
        let b6 = u8_at(buf, 6, W)?;
        let b7 = u8_at(buf, 7, W)?;
        // Version descriptors live at 58..74, within ADDITIONAL LENGTH.
        let end = (5 + usize::from(u8_at(buf, 4, W)?)).min(buf.len());
        let version_descriptors = (58..74)
            .step_by(2)
            .filter(|&o| o + 2 <= end)
            .filter_map(|o| be16(buf, o, W).ok())
            .filter(|&v| v != 0)
            .collect();
        Ok(StandardInquiry {
            peripheral_qualifier: b0 >> 5,
            device_type: b0 & 0x1f,
            removable: b1 & 0x80 != 0,
            version: u8_at(buf, 2, W)?,
            normaca: b3 & 0x20 != 0,
            hisup: b3 & 0x10 != 0,
            response_data_format: b3 & 0x0f,
            sccs: b5 & 0x80 != 0,
            acc: b5 & 0x40 != 0,
            tpgs: (b5 >> 4) & 0x03,
            three_pc: b5 & 0x08 != 0,
            protect: b5 & 0x01 != 0,
            encserv: b6 & 0x40 != 0,
            multip: b6 & 0x10 != 0,
            cmdque: b7 & 0x02 != 0,
            vendor: ascii_field(slice(buf, 8, 8, W)?),
            product: ascii_field(slice(buf, 16, 16, W)?),
            revision: ascii_field(slice(buf, 32, 4, W)?),
            version_descriptors,
        })
    }

    /// Bytes the target has in total (5 + ADDITIONAL LENGTH), to re-issue
    /// INQUIRY with a larger allocation length.
    pub fn full_length(buf: &[u8]) -> Result<usize, ParseError> {
        Ok(5 + usize::from(u8_at(buf, 4, "standard INQUIRY data")?))
    }

    /// True when a logical unit is connected at this LUN.
    pub fn is_connected(&self) -> bool {
        self.peripheral_qualifier == 0
    }

    /// A readable name of the device type.
    pub fn device_type_name(&self) -> &'static str {
        device_type_name(self.device_type)
    }
}

/// A readable name of a peripheral device type.
pub fn device_type_name(t: u8) -> &'static str {
    match t {
        0x00 => "disk",
        0x01 => "tape",
        0x05 => "CD/DVD",
        0x07 => "optical memory",
        0x08 => "medium changer",
        0x0c => "storage array controller",
        0x0d => "enclosure services",
        0x0e => "simplified direct-access",
        0x11 => "object storage",
        0x14 => "host managed zoned disk",
        0x1e => "well known logical unit",
        0x1f => "unknown",
        _ => "other",
    }
}

/// Checks the VPD header and returns the page body (after the 4-byte header).
fn vpd_body<'a>(buf: &'a [u8], code: u8, what: &'static str) -> Result<&'a [u8], ParseError> {
    let got = u8_at(buf, 1, what)?;
    if got != code {
        return Err(ParseError::malformed(
            what,
            format!("page code is 0x{got:02x}, expected 0x{code:02x}"),
        ));
    }
    let len = usize::from(be16(buf, 2, what)?);
    slice(buf, 4, len, what)
}

/// Total length of a VPD page (4 + PAGE LENGTH), to re-issue INQUIRY with a
/// larger allocation length.
pub fn vpd_full_length(buf: &[u8]) -> Result<usize, ParseError> {
    Ok(4 + usize::from(be16(buf, 2, "VPD page header")?))
}

/// VPD page 0x00: the pages the target supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupportedVpdPages(pub Vec<u8>);

impl SupportedVpdPages {
    /// Parses VPD page 0x00.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        Ok(Self(
            vpd_body(buf, page::SUPPORTED, "VPD page 0x00")?.to_vec(),
        ))
    }

    /// True when `page` is listed.
    pub fn contains(&self, page: u8) -> bool {
        self.0.contains(&page)
    }
}

/// VPD page 0x80: the unit serial number, trimmed of padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitSerial(pub String);

impl UnitSerial {
    /// Parses VPD page 0x80.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        Ok(Self(ascii_field(vpd_body(
            buf,
            page::UNIT_SERIAL,
            "VPD page 0x80",
        )?)))
    }
}

/// Character set of a designator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeSet {
    /// Binary bytes.
    Binary,
    /// Printable ASCII.
    Ascii,
    /// UTF-8.
    Utf8,
    /// Reserved value.
    Reserved(u8),
}

/// What a designator identifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Association {
    /// The logical unit (the disk itself).
    LogicalUnit,
    /// The target port the command arrived on.
    TargetPort,
    /// The SCSI target device.
    TargetDevice,
    /// Reserved value.
    Reserved,
}

/// Designator types (SPC-4 table 459).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DesignatorType {
    /// 0: vendor specific.
    VendorSpecific,
    /// 1: T10 vendor ID based.
    T10VendorId,
    /// 2: EUI-64 based.
    Eui64,
    /// 3: NAA.
    Naa,
    /// 4: relative target port identifier.
    RelativeTargetPort,
    /// 5: target port group.
    TargetPortGroup,
    /// 6: logical unit group.
    LogicalUnitGroup,
    /// 7: MD5 logical unit identifier.
    Md5LogicalUnit,
    /// 8: SCSI name string (e.g. an iSCSI name).
    ScsiName,
    /// 9: protocol specific port identifier.
    ProtocolSpecificPort,
    /// 0xA: UUID (SPC-5).
    Uuid,
    /// Reserved value.
    Reserved(u8),
}

impl DesignatorType {
    fn from_u8(v: u8) -> Self {
        match v & 0x0f {
            0 => Self::VendorSpecific,
            1 => Self::T10VendorId,
            2 => Self::Eui64,
            3 => Self::Naa,
            4 => Self::RelativeTargetPort,
            5 => Self::TargetPortGroup,
            6 => Self::LogicalUnitGroup,
            7 => Self::Md5LogicalUnit,
            8 => Self::ScsiName,
            9 => Self::ProtocolSpecificPort,
            0xa => Self::Uuid,
            other => Self::Reserved(other),
        }
    }
}

/// One designation descriptor of VPD page 0x83.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Designator {
    /// Protocol identifier (5 = iSCSI), meaningful when `piv` is set.
    pub protocol_id: u8,
    /// Protocol identifier valid.
    pub piv: bool,
    /// Character set of `value`.
    pub code_set: CodeSet,
    /// What the designator names.
    pub association: Association,
    /// Designator type.
    pub designator_type: DesignatorType,
    /// Raw designator bytes.
    pub value: Vec<u8>,
}

impl Designator {
    /// The designator as text: ASCII/UTF-8 designators trimmed, binary ones
    /// in hex with their conventional prefix (`naa.`, `eui.`).
    pub fn text(&self) -> String {
        match self.code_set {
            CodeSet::Ascii | CodeSet::Utf8 => {
                // SCSI name strings are NUL-terminated and padded.
                let end = self
                    .value
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(self.value.len());
                ascii_field(self.value.get(..end).unwrap_or(&[]))
            }
            _ => match self.designator_type {
                DesignatorType::Naa => format!("naa.{}", hex(&self.value)),
                DesignatorType::Eui64 => format!("eui.{}", hex(&self.value)),
                _ => hex(&self.value),
            },
        }
    }
}

impl fmt::Display for Designator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// VPD page 0x83: device identification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentification {
    /// Designators in the order the target listed them.
    pub designators: Vec<Designator>,
}

impl DeviceIdentification {
    /// Parses VPD page 0x83; any designator running past the page, or with a
    /// length its type does not allow, is an error.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        const W: &str = "VPD page 0x83";
        let body = vpd_body(buf, page::DEVICE_ID, W)?;
        let mut designators = Vec::new();
        let mut off = 0usize;
        while off < body.len() {
            let hdr = slice(body, off, 4, W)?;
            let (b0, b1, len) = (hdr[0], hdr[1], usize::from(hdr[3]));
            let value = slice(body, off + 4, len, W)?.to_vec();
            let designator_type = DesignatorType::from_u8(b1);
            let ok = match designator_type {
                DesignatorType::Naa => matches!(len, 8 | 16),
                DesignatorType::Eui64 => matches!(len, 8 | 12 | 16),
                DesignatorType::T10VendorId => len >= 8,
                DesignatorType::RelativeTargetPort
                | DesignatorType::TargetPortGroup
                | DesignatorType::LogicalUnitGroup => len == 4,
                DesignatorType::Md5LogicalUnit => len == 16,
                _ => true,
            };
            if !ok {
                return Err(ParseError::malformed(
                    W,
                    format!(
                        "designator {designator_type:?} at byte {} has length {len}",
                        off + 4
                    ),
                ));
            }
            designators.push(Designator {
                protocol_id: b0 >> 4,
                piv: b1 & 0x80 != 0,
                code_set: match b0 & 0x0f {
                    1 => CodeSet::Binary,
                    2 => CodeSet::Ascii,
                    3 => CodeSet::Utf8,
                    other => CodeSet::Reserved(other),
                },
                association: match (b1 >> 4) & 0x03 {
                    0 => Association::LogicalUnit,
                    1 => Association::TargetPort,
                    2 => Association::TargetDevice,
                    _ => Association::Reserved,
                },
                designator_type,
                value,
            });
            off += 4 + len;
        }
        Ok(Self { designators })
    }

    /// The best designator for the logical unit, preferring globally unique
    /// kinds: NAA, EUI-64, SCSI name, then T10 vendor ID.
    pub fn best_lun_designator(&self) -> Option<&Designator> {
        let rank = |t: DesignatorType| match t {
            DesignatorType::Naa => 0,
            DesignatorType::Eui64 => 1,
            DesignatorType::Uuid => 2,
            DesignatorType::ScsiName => 3,
            DesignatorType::T10VendorId => 4,
            DesignatorType::Md5LogicalUnit => 5,
            DesignatorType::VendorSpecific => 6,
            _ => 99,
        };
        self.designators
            .iter()
            .filter(|d| d.association == Association::LogicalUnit && rank(d.designator_type) < 99)
            .min_by_key(|d| rank(d.designator_type))
    }
}

/// VPD page 0xB0: block limits. Counts are in logical blocks; 0 means "not
/// reported" unless noted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockLimits {
    /// PAGE LENGTH: 0x0c on SBC-2 targets (fields after byte 15 absent), 0x3c since SBC-3.
    pub page_length: u16,
    /// WRITE SAME NON-ZERO: WRITE SAME with 0 blocks is refused.
    pub wsnz: bool,
    /// Maximum COMPARE AND WRITE length.
    pub max_compare_and_write_len: u8,
    /// Optimal transfer length granularity.
    pub optimal_transfer_granularity: u16,
    /// Maximum transfer length of one command.
    pub max_transfer_len: u32,
    /// Optimal transfer length.
    pub optimal_transfer_len: u32,
    /// Maximum PRE-FETCH length.
    pub max_prefetch_len: u32,
    /// Maximum UNMAP LBA count: 0 = UNMAP not implemented, 0xFFFF_FFFF = no limit.
    pub max_unmap_lba_count: u32,
    /// Maximum UNMAP block descriptor count: 0 = UNMAP not implemented,
    /// 0xFFFF_FFFF = no limit.
    pub max_unmap_descriptors: u32,
    /// Optimal unmap granularity.
    pub optimal_unmap_granularity: u32,
    /// Unmap granularity alignment, when the target reported it (UGAVALID).
    pub unmap_granularity_alignment: Option<u32>,
    /// Maximum WRITE SAME length.
    pub max_write_same_len: u64,
}

impl BlockLimits {
    /// Parses VPD page 0xB0. Fields beyond a short (SBC-2) page read as 0.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        const W: &str = "VPD page 0xB0";
        let body = vpd_body(buf, page::BLOCK_LIMITS, W)?;
        // `body` starts at page byte 4; offsets below are page offsets - 4.
        if body.len() < 12 {
            return Err(ParseError::malformed(
                W,
                format!("page length {} is below the minimum 12", body.len()),
            ));
        }
        let uga = be32_or_zero(body, 28);
        Ok(BlockLimits {
            page_length: body.len() as u16,
            wsnz: u8_or_zero(body, 0) & 0x01 != 0,
            max_compare_and_write_len: u8_or_zero(body, 1),
            optimal_transfer_granularity: be16(body, 2, W)?,
            max_transfer_len: be32(body, 4, W)?,
            optimal_transfer_len: be32(body, 8, W)?,
            max_prefetch_len: be32_or_zero(body, 12),
            max_unmap_lba_count: be32_or_zero(body, 16),
            max_unmap_descriptors: be32_or_zero(body, 20),
            optimal_unmap_granularity: be32_or_zero(body, 24),
            unmap_granularity_alignment: (uga & 0x8000_0000 != 0).then_some(uga & 0x7fff_ffff),
            max_write_same_len: be64(body, 32, W).unwrap_or(0),
        })
    }
}

/// VPD page 0xB1: block device characteristics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDeviceCharacteristics {
    /// 0 = not reported, 1 = non-rotating (SSD), 0x0401..=0xFFFE = RPM.
    pub rotation_rate: u16,
    /// Nominal form factor (0 = not reported).
    pub form_factor: u8,
}

impl BlockDeviceCharacteristics {
    /// Parses VPD page 0xB1.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        const W: &str = "VPD page 0xB1";
        let body = vpd_body(buf, page::BLOCK_CHARACTERISTICS, W)?;
        Ok(Self {
            rotation_rate: be16(body, 0, W)?,
            form_factor: u8_or_zero(body, 3) & 0x0f,
        })
    }

    /// Some(false) for non-rotating media, Some(true) for disks that spin,
    /// None when not reported.
    pub fn rotational(&self) -> Option<bool> {
        match self.rotation_rate {
            0 => None,
            1 => Some(false),
            0x0401..=0xfffe => Some(true),
            _ => None,
        }
    }
}

/// Provisioning type of VPD page 0xB2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProvisioningType {
    /// 0: fully provisioned (or not reported).
    Full,
    /// 1: resource provisioned.
    Resource,
    /// 2: thin provisioned.
    Thin,
    /// Reserved value.
    Reserved(u8),
}

/// VPD page 0xB2: logical block provisioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogicalBlockProvisioning {
    /// Threshold exponent (thresholds are in units of 2^exp blocks).
    pub threshold_exponent: u8,
    /// UNMAP supported.
    pub lbpu: bool,
    /// WRITE SAME(16) with UNMAP supported.
    pub lbpws: bool,
    /// WRITE SAME(10) with UNMAP supported.
    pub lbpws10: bool,
    /// LBPRZ (3 bits in SBC-4; SBC-3's 1-bit field reads as 0 or 1):
    /// 1 = unmapped blocks read as zeros.
    pub lbprz: u8,
    /// ANCHOR supported.
    pub anc_sup: bool,
    /// A provisioning group descriptor follows.
    pub dp: bool,
    /// Provisioning type.
    pub provisioning_type: ProvisioningType,
}

impl LogicalBlockProvisioning {
    /// Parses VPD page 0xB2.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        const W: &str = "VPD page 0xB2";
        let body = vpd_body(buf, page::PROVISIONING, W)?;
        let flags = u8_at(body, 1, W)?;
        Ok(Self {
            threshold_exponent: u8_at(body, 0, W)?,
            lbpu: flags & 0x80 != 0,
            lbpws: flags & 0x40 != 0,
            lbpws10: flags & 0x20 != 0,
            lbprz: (flags >> 2) & 0x07,
            anc_sup: flags & 0x02 != 0,
            dp: flags & 0x01 != 0,
            provisioning_type: match u8_or_zero(body, 2) & 0x07 {
                0 => ProvisioningType::Full,
                1 => ProvisioningType::Resource,
                2 => ProvisioningType::Thin,
                other => ProvisioningType::Reserved(other),
            },
        })
    }

    /// True when unmapped blocks read back as zeros.
    pub fn reads_zeros_after_unmap(&self) -> bool {
        self.lbprz == 1
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::scsi::wire::{pseudo_random, unhex};

    // Captured from tgtd 1.0.85 (strace of iscsi-inq), LUN 1 (plain file)
    // and LUN 2 (thin_provisioning=1).
    pub(crate) const TGTD_STD_INQUIRY: &str = "000005123d00000249455420202020205649525455414c2d4449534b20202020303030310000000000000000000000000000000000000000000004c00960030000000000";
    pub(crate) const TGTD_STD_INQUIRY_LUN0: &str = "0c0005123d0000024945542020202020436f6e74726f6c6c6572202020202020303030310000000000000000000000000000000000000000000004c0096001fb";
    pub(crate) const TGTD_VPD00: &str = "00000006008083b0b1b2";
    pub(crate) const TGTD_VPD80: &str =
        "00800024202020202020202020202020202020202020202020202020202020202020626561663131";
    pub(crate) const TGTD_VPD83: &str = "00830048020100244945542020202020303030313030303100000000000000000000000000000000000000000103000830000001000000010103001060000000000000000e00000000010001";
    pub(crate) const TGTD_VPD83_TRUNCATED: &str = "00830048020100244945542020202020303030313030303100000000000000000000000000000000000000000103000830000001000000010103001060000000";
    pub(crate) const TGTD_VPDB0: &str = "00b0003c008000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000";
    pub(crate) const TGTD_VPDB0_THIN: &str = "00b0003c00800000000000000000000000000000ffffffffffffffff000000000000000000000000000000000000000000000000000000000000000000000000";
    pub(crate) const TGTD_VPDB1: &str = "00b1004000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000";
    pub(crate) const TGTD_VPDB2: &str = "00b2000400000000";
    pub(crate) const TGTD_VPDB2_THIN: &str = "00b2000400e40200";

    #[test]
    fn tgtd_standard_inquiry() {
        let i = StandardInquiry::parse(&unhex(TGTD_STD_INQUIRY)).unwrap();
        // Matches iscsi-inq's output for the same LUN.
        assert_eq!(i.peripheral_qualifier, 0);
        assert_eq!(i.device_type, DEVICE_TYPE_DISK);
        assert!(!i.removable);
        assert_eq!(i.version, 5);
        assert!(i.hisup);
        assert_eq!(i.response_data_format, 2);
        assert!(!i.three_pc && !i.protect && !i.multip);
        assert!(i.cmdque);
        assert_eq!(i.vendor, "IET");
        assert_eq!(i.product, "VIRTUAL-DISK");
        assert_eq!(i.revision, "0001");
        assert_eq!(i.version_descriptors, vec![0x04c0, 0x0960, 0x0300]);
        assert_eq!(
            StandardInquiry::full_length(&unhex(TGTD_STD_INQUIRY)).unwrap(),
            66
        );

        let c = StandardInquiry::parse(&unhex(TGTD_STD_INQUIRY_LUN0)).unwrap();
        assert_eq!(c.device_type, 0x0c);
        assert_eq!(c.device_type_name(), "storage array controller");
        assert_eq!(c.product, "Controller");
        // Only 64 bytes arrived: the fourth descriptor at 64 is cut off.
        assert_eq!(c.version_descriptors, vec![0x04c0, 0x0960, 0x01fb]);
    }

    #[test]
    fn tgtd_vpd_pages() {
        let p = SupportedVpdPages::parse(&unhex(TGTD_VPD00)).unwrap();
        assert_eq!(p.0, vec![0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
        assert!(p.contains(0xb2) && !p.contains(0xb3));

        assert_eq!(UnitSerial::parse(&unhex(TGTD_VPD80)).unwrap().0, "beaf11");

        let id = DeviceIdentification::parse(&unhex(TGTD_VPD83)).unwrap();
        assert_eq!(id.designators.len(), 3);
        let t10 = &id.designators[0];
        assert_eq!(t10.designator_type, DesignatorType::T10VendorId);
        assert_eq!(t10.code_set, CodeSet::Ascii);
        assert_eq!(t10.association, Association::LogicalUnit);
        assert_eq!(t10.text(), "IET     00010001");
        assert_eq!(id.designators[1].text(), "naa.3000000100000001");
        assert_eq!(
            id.designators[2].text(),
            "naa.60000000000000000e00000000010001"
        );
        assert_eq!(id.designators[2].code_set, CodeSet::Binary);
        assert_eq!(
            id.best_lun_designator().unwrap().text(),
            "naa.3000000100000001"
        );

        // libiscsi first asked for 64 bytes and got a cut page: the error says
        // how much to ask for (it then re-issued with 0x4c).
        assert_eq!(
            DeviceIdentification::parse(&unhex(TGTD_VPD83_TRUNCATED)),
            Err(ParseError::Truncated {
                what: "VPD page 0x83",
                len: 64,
                need: 76
            })
        );
        assert_eq!(vpd_full_length(&unhex(TGTD_VPD83_TRUNCATED)).unwrap(), 76);
    }

    #[test]
    fn tgtd_block_limits_and_provisioning() {
        let b = BlockLimits::parse(&unhex(TGTD_VPDB0)).unwrap();
        assert_eq!(b.page_length, 0x3c);
        assert_eq!(b.max_compare_and_write_len, 128);
        assert_eq!(b.max_transfer_len, 0);
        assert_eq!(b.max_unmap_lba_count, 0);
        assert_eq!(b.unmap_granularity_alignment, None);

        let b = BlockLimits::parse(&unhex(TGTD_VPDB0_THIN)).unwrap();
        assert_eq!(b.max_unmap_lba_count, u32::MAX);
        assert_eq!(b.max_unmap_descriptors, u32::MAX);
        assert_eq!(b.optimal_unmap_granularity, 0);

        let c = BlockDeviceCharacteristics::parse(&unhex(TGTD_VPDB1)).unwrap();
        assert_eq!(c.rotation_rate, 0);
        assert_eq!(c.rotational(), None);

        let p = LogicalBlockProvisioning::parse(&unhex(TGTD_VPDB2)).unwrap();
        assert!(!p.lbpu && !p.lbpws && !p.lbpws10);
        assert_eq!(p.provisioning_type, ProvisioningType::Full);

        let p = LogicalBlockProvisioning::parse(&unhex(TGTD_VPDB2_THIN)).unwrap();
        assert!(p.lbpu && p.lbpws && p.lbpws10);
        assert!(p.reads_zeros_after_unmap());
        assert!(!p.anc_sup && !p.dp);
        assert_eq!(p.provisioning_type, ProvisioningType::Thin);
    }

    #[test]
    fn hand_built_block_limits() {
        // SBC-4 layout with every field set.
        let raw = unhex(
            "00b0003c 01 20 0008 00000800 00000100 00000000 \
             00400000 00000100 00000800 80000010 0000000000100000 00000000 00000000 00000000 00000000 00000000",
        );
        let b = BlockLimits::parse(&raw).unwrap();
        assert!(b.wsnz);
        assert_eq!(b.max_compare_and_write_len, 0x20);
        assert_eq!(b.optimal_transfer_granularity, 8);
        assert_eq!(b.max_transfer_len, 0x800);
        assert_eq!(b.optimal_transfer_len, 0x100);
        assert_eq!(b.max_unmap_lba_count, 0x40_0000);
        assert_eq!(b.max_unmap_descriptors, 0x100);
        assert_eq!(b.optimal_unmap_granularity, 0x800);
        assert_eq!(b.unmap_granularity_alignment, Some(0x10));
        assert_eq!(b.max_write_same_len, 0x10_0000);

        // SBC-2 short page: only the transfer lengths.
        let b = BlockLimits::parse(&unhex("00b0000c 0000 0001 00000400 00000080")).unwrap();
        assert_eq!(b.page_length, 12);
        assert_eq!(b.max_transfer_len, 0x400);
        assert_eq!(b.max_unmap_lba_count, 0);
        assert_eq!(b.max_write_same_len, 0);
        // A page shorter than that is malformed.
        assert!(BlockLimits::parse(&unhex("00b00004 00000000")).is_err());
    }

    #[test]
    fn hand_built_designators() {
        // EUI-64, iSCSI SCSI name string (target device), UUID.
        let raw = unhex(
            "00830028 \
             01020008 0011223344556677 \
             53a80010 69716e2e323032362d31313a780000 00 \
             010a0004 deadbeef",
        );
        let id = DeviceIdentification::parse(&raw).unwrap();
        assert_eq!(id.designators[0].text(), "eui.0011223344556677");
        let name = &id.designators[1];
        assert_eq!(name.protocol_id, 5);
        assert!(name.piv);
        assert_eq!(name.association, Association::TargetDevice);
        assert_eq!(name.code_set, CodeSet::Utf8);
        assert_eq!(name.text(), "iqn.2026-11:x");
        assert_eq!(id.designators[2].designator_type, DesignatorType::Uuid);
        assert_eq!(
            id.best_lun_designator().unwrap().text(),
            "eui.0011223344556677"
        );

        // NAA with length 5 is malformed.
        assert!(DeviceIdentification::parse(&unhex("00830009 01030005 0102030405")).is_err());
        // Designator longer than the page.
        assert!(DeviceIdentification::parse(&unhex("00830008 01030008 01020304")).is_err());
        // Wrong page code.
        assert!(DeviceIdentification::parse(&unhex(TGTD_VPD80)).is_err());
    }

    #[test]
    fn rotation_rate() {
        let c = BlockDeviceCharacteristics::parse(&unhex("00b1003c0001000300")).unwrap_err();
        assert!(matches!(c, ParseError::Truncated { .. }));
        let c = BlockDeviceCharacteristics::parse(&unhex("00b10004 00010003")).unwrap();
        assert_eq!(c.rotational(), Some(false));
        assert_eq!(c.form_factor, 3);
        let c = BlockDeviceCharacteristics::parse(&unhex("00b10004 1c200000")).unwrap();
        assert_eq!(c.rotational(), Some(true));
    }

    #[test]
    fn never_panics() {
        let all = [
            TGTD_STD_INQUIRY,
            TGTD_STD_INQUIRY_LUN0,
            TGTD_VPD00,
            TGTD_VPD80,
            TGTD_VPD83,
            TGTD_VPDB0_THIN,
            TGTD_VPDB1,
            TGTD_VPDB2_THIN,
        ];
        let parse_all = |b: &[u8]| {
            let _ = StandardInquiry::parse(b);
            let _ = StandardInquiry::full_length(b);
            let _ = SupportedVpdPages::parse(b);
            let _ = UnitSerial::parse(b);
            let _ = DeviceIdentification::parse(b).map(|d| {
                d.designators.iter().map(|x| x.text().len()).sum::<usize>()
                    + d.best_lun_designator().iter().count()
            });
            let _ = BlockLimits::parse(b);
            let _ = BlockDeviceCharacteristics::parse(b);
            let _ = LogicalBlockProvisioning::parse(b);
            let _ = vpd_full_length(b);
        };
        for v in all {
            let v = unhex(v);
            for n in 0..v.len() {
                parse_all(&v[..n]);
            }
        }
        // Every strict prefix of a VPD page must be refused, the whole page accepted.
        type Check = fn(&[u8]) -> bool;
        let strict: [(&str, Check); 6] = [
            (TGTD_VPD00, |b| SupportedVpdPages::parse(b).is_ok()),
            (TGTD_VPD80, |b| UnitSerial::parse(b).is_ok()),
            (TGTD_VPD83, |b| DeviceIdentification::parse(b).is_ok()),
            (TGTD_VPDB0_THIN, |b| BlockLimits::parse(b).is_ok()),
            (TGTD_VPDB1, |b| BlockDeviceCharacteristics::parse(b).is_ok()),
            (TGTD_VPDB2_THIN, |b| {
                LogicalBlockProvisioning::parse(b).is_ok()
            }),
        ];
        for (hexs, ok) in strict {
            let v = unhex(hexs);
            assert!(ok(&v), "{hexs}");
            for n in 0..v.len() {
                assert!(!ok(&v[..n]), "prefix {n} of {hexs}");
            }
        }
        for seed in 0..3000u64 {
            let mut b = pseudo_random(seed, (seed % 96) as usize);
            // Steer the page code so each parser gets real work.
            let codes = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];
            if b.len() > 3 {
                b[1] = codes[(seed % 6) as usize];
                b[2] = 0;
                b[3] = b[3].min((b.len() - 4) as u8);
            }
            parse_all(&b);
        }
    }
}
