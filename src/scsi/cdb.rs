//! CDB builders for the commands a block initiator sends (SBC-4, SPC-4).
//!
//! Each builder checks that its arguments fit the command's fields and returns
//! a [`Cdb`]: a fixed 16-byte array plus the real length, so building a command
//! never allocates. The iSCSI layer copies [`Cdb::padded`] into the BHS.

use std::fmt;

use super::error::CdbError;

/// Operation codes used by the builders (SPC-4/SBC-4 opcode tables).
pub mod opcode {
    /// TEST UNIT READY.
    pub const TEST_UNIT_READY: u8 = 0x00;
    /// INQUIRY.
    pub const INQUIRY: u8 = 0x12;
    /// MODE SENSE(6).
    pub const MODE_SENSE_6: u8 = 0x1a;
    /// READ CAPACITY(10).
    pub const READ_CAPACITY_10: u8 = 0x25;
    /// READ(10).
    pub const READ_10: u8 = 0x28;
    /// WRITE(10).
    pub const WRITE_10: u8 = 0x2a;
    /// SYNCHRONIZE CACHE(10).
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    /// WRITE SAME(10).
    pub const WRITE_SAME_10: u8 = 0x41;
    /// UNMAP.
    pub const UNMAP: u8 = 0x42;
    /// MODE SENSE(10).
    pub const MODE_SENSE_10: u8 = 0x5a;
    /// READ(16).
    pub const READ_16: u8 = 0x88;
    /// WRITE(16).
    pub const WRITE_16: u8 = 0x8a;
    /// SYNCHRONIZE CACHE(16).
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    /// WRITE SAME(16).
    pub const WRITE_SAME_16: u8 = 0x93;
    /// SERVICE ACTION IN(16); READ CAPACITY(16) is its service action 0x10.
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    /// REPORT LUNS.
    pub const REPORT_LUNS: u8 = 0xa0;
}

/// Service action of READ CAPACITY(16) under SERVICE ACTION IN(16).
const SA_READ_CAPACITY_16: u8 = 0x10;

/// The largest CDB this module builds.
pub const MAX_CDB_LEN: usize = 16;

/// A built command descriptor block.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cdb {
    bytes: [u8; MAX_CDB_LEN],
    len: u8,
}

impl Cdb {
    /// A zeroed CDB of `len` bytes (6, 10, 12 or 16) with `op` as opcode.
    fn new(op: u8, len: u8) -> Self {
        let mut bytes = [0u8; MAX_CDB_LEN];
        bytes[0] = op;
        Cdb { bytes, len }
    }

    /// The CDB bytes, exactly as long as the command.
    pub fn as_bytes(&self) -> &[u8] {
        // len is only ever set by this module to 6, 10, 12 or 16.
        self.bytes
            .get(..usize::from(self.len))
            .unwrap_or(&self.bytes)
    }

    /// The CDB zero-padded to 16 bytes, as the iSCSI BHS carries it.
    pub fn padded(&self) -> [u8; MAX_CDB_LEN] {
        self.bytes
    }

    /// The CDB length in bytes.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Always false: a CDB has at least an opcode. Present for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The operation code (byte 0).
    pub fn opcode(&self) -> u8 {
        self.bytes[0]
    }

    /// A human name of the command, for log lines.
    pub fn name(&self) -> &'static str {
        if self.opcode() == opcode::SERVICE_ACTION_IN_16
            && self.bytes[1] & 0x1f == SA_READ_CAPACITY_16
        {
            return "READ CAPACITY(16)";
        }
        opcode_name(self.opcode())
    }

    fn set_be16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_be_bytes());
    }

    fn set_be32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn set_be64(&mut self, off: usize, v: u64) {
        self.bytes[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }
}

impl fmt::Debug for Cdb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [", self.name())?;
        for (i, b) in self.as_bytes().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        f.write_str("]")
    }
}

/// The name of an operation code this module knows, for log lines.
pub fn opcode_name(op: u8) -> &'static str {
    match op {
        opcode::TEST_UNIT_READY => "TEST UNIT READY",
        opcode::INQUIRY => "INQUIRY",
        opcode::MODE_SENSE_6 => "MODE SENSE(6)",
        opcode::READ_CAPACITY_10 => "READ CAPACITY(10)",
        opcode::READ_10 => "READ(10)",
        opcode::WRITE_10 => "WRITE(10)",
        opcode::SYNCHRONIZE_CACHE_10 => "SYNCHRONIZE CACHE(10)",
        opcode::WRITE_SAME_10 => "WRITE SAME(10)",
        opcode::UNMAP => "UNMAP",
        opcode::MODE_SENSE_10 => "MODE SENSE(10)",
        opcode::READ_16 => "READ(16)",
        opcode::WRITE_16 => "WRITE(16)",
        opcode::SYNCHRONIZE_CACHE_16 => "SYNCHRONIZE CACHE(16)",
        opcode::WRITE_SAME_16 => "WRITE SAME(16)",
        opcode::SERVICE_ACTION_IN_16 => "SERVICE ACTION IN(16)",
        opcode::REPORT_LUNS => "REPORT LUNS",
        _ => "unknown command",
    }
}

/// Flags of READ and WRITE commands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RwFlags {
    /// Force Unit Access: a write reaches the medium before completion; a
    /// read does not come from a volatile cache.
    pub fua: bool,
    /// Disable Page Out: hint that the data need not stay in cache.
    pub dpo: bool,
}

impl RwFlags {
    fn byte1(self) -> u8 {
        (u8::from(self.dpo) << 4) | (u8::from(self.fua) << 3)
    }
}

fn check_fits(
    command: &'static str,
    field: &'static str,
    value: u64,
    max: u64,
) -> Result<(), CdbError> {
    if value > max {
        return Err(CdbError::OutOfRange {
            command,
            field,
            value,
            max,
        });
    }
    Ok(())
}

/// Refuses ranges whose last block would be past LBA 2^64-1.
fn check_end(command: &'static str, lba: u64, blocks: u64) -> Result<(), CdbError> {
    if blocks > 0 && lba.checked_add(blocks - 1).is_none() {
        return Err(CdbError::Invalid {
            command,
            reason: "the range runs past the largest LBA",
        });
    }
    Ok(())
}

fn nonzero(command: &'static str, blocks: u64) -> Result<(), CdbError> {
    if blocks == 0 {
        return Err(CdbError::Invalid {
            command,
            reason: "zero blocks requested",
        });
    }
    Ok(())
}

fn rw10(
    op: u8,
    command: &'static str,
    lba: u64,
    blocks: u32,
    flags: RwFlags,
) -> Result<Cdb, CdbError> {
    nonzero(command, u64::from(blocks))?;
    check_fits(command, "LBA", lba, u64::from(u32::MAX))?;
    check_fits(
        command,
        "transfer length",
        u64::from(blocks),
        u64::from(u16::MAX),
    )?;
    let mut c = Cdb::new(op, 10);
    c.bytes[1] = flags.byte1();
    c.set_be32(2, lba as u32);
    c.set_be16(7, blocks as u16);
    Ok(c)
}

fn rw16(
    op: u8,
    command: &'static str,
    lba: u64,
    blocks: u32,
    flags: RwFlags,
) -> Result<Cdb, CdbError> {
    nonzero(command, u64::from(blocks))?;
    check_end(command, lba, u64::from(blocks))?;
    let mut c = Cdb::new(op, 16);
    c.bytes[1] = flags.byte1();
    c.set_be64(2, lba);
    c.set_be32(10, blocks);
    Ok(c)
}

/// READ(10): `blocks` logical blocks from `lba`. LBA must fit 32 bits and
/// `blocks` 16 bits (1..=65535).
pub fn read10(lba: u64, blocks: u32, flags: RwFlags) -> Result<Cdb, CdbError> {
    rw10(opcode::READ_10, "READ(10)", lba, blocks, flags)
}

/// READ(16): `blocks` (1..=u32::MAX) logical blocks from `lba`.
pub fn read16(lba: u64, blocks: u32, flags: RwFlags) -> Result<Cdb, CdbError> {
    rw16(opcode::READ_16, "READ(16)", lba, blocks, flags)
}

/// WRITE(10): like [`read10`]; `flags.fua` makes the write durable on completion.
pub fn write10(lba: u64, blocks: u32, flags: RwFlags) -> Result<Cdb, CdbError> {
    rw10(opcode::WRITE_10, "WRITE(10)", lba, blocks, flags)
}

/// WRITE(16): like [`read16`].
pub fn write16(lba: u64, blocks: u32, flags: RwFlags) -> Result<Cdb, CdbError> {
    rw16(opcode::WRITE_16, "WRITE(16)", lba, blocks, flags)
}

/// Whether a read or write fits a 10-byte CDB.
pub fn fits_rw10(lba: u64, blocks: u32) -> bool {
    lba <= u64::from(u32::MAX) && blocks <= u32::from(u16::MAX)
}

/// READ(10) when the request fits it, else READ(16) if `allow16`.
///
/// Ten-byte commands are what every target supports; a caller that saw READ(16)
/// rejected as unsupported passes `allow16 = false`.
pub fn read(lba: u64, blocks: u32, flags: RwFlags, allow16: bool) -> Result<Cdb, CdbError> {
    if fits_rw10(lba, blocks) || !allow16 {
        read10(lba, blocks, flags)
    } else {
        read16(lba, blocks, flags)
    }
}

/// WRITE(10) when the request fits it, else WRITE(16) if `allow16`.
pub fn write(lba: u64, blocks: u32, flags: RwFlags, allow16: bool) -> Result<Cdb, CdbError> {
    if fits_rw10(lba, blocks) || !allow16 {
        write10(lba, blocks, flags)
    } else {
        write16(lba, blocks, flags)
    }
}

/// SYNCHRONIZE CACHE(10). `lba = 0, blocks = 0` flushes the whole medium
/// (0 blocks means "through the last LBA"). IMMED is never set: completion
/// must mean the data is durable.
pub fn synchronize_cache10(lba: u64, blocks: u32) -> Result<Cdb, CdbError> {
    const C: &str = "SYNCHRONIZE CACHE(10)";
    check_fits(C, "LBA", lba, u64::from(u32::MAX))?;
    check_fits(
        C,
        "number of blocks",
        u64::from(blocks),
        u64::from(u16::MAX),
    )?;
    let mut c = Cdb::new(opcode::SYNCHRONIZE_CACHE_10, 10);
    c.set_be32(2, lba as u32);
    c.set_be16(7, blocks as u16);
    Ok(c)
}

/// SYNCHRONIZE CACHE(16); as [`synchronize_cache10`] with 64-bit LBA.
pub fn synchronize_cache16(lba: u64, blocks: u32) -> Result<Cdb, CdbError> {
    check_end("SYNCHRONIZE CACHE(16)", lba, u64::from(blocks))?;
    let mut c = Cdb::new(opcode::SYNCHRONIZE_CACHE_16, 16);
    c.set_be64(2, lba);
    c.set_be32(10, blocks);
    Ok(c)
}

/// One range of an UNMAP parameter list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnmapDescriptor {
    /// First logical block to unmap.
    pub lba: u64,
    /// Number of logical blocks (may be 0, which the target ignores).
    pub blocks: u32,
}

/// Header bytes of the UNMAP parameter list.
pub const UNMAP_HEADER_LEN: usize = 8;
/// Bytes per UNMAP block descriptor.
pub const UNMAP_DESCRIPTOR_LEN: usize = 16;
/// Most descriptors one UNMAP can carry (parameter list length is 16 bits).
pub const UNMAP_MAX_DESCRIPTORS: usize =
    (u16::MAX as usize - UNMAP_HEADER_LEN) / UNMAP_DESCRIPTOR_LEN;

/// Length of the UNMAP parameter list for `n` descriptors.
pub fn unmap_param_list_len(n: usize) -> Result<u16, CdbError> {
    if n == 0 {
        return Err(CdbError::Invalid {
            command: "UNMAP",
            reason: "no block descriptors",
        });
    }
    check_fits(
        "UNMAP",
        "block descriptor count",
        n as u64,
        UNMAP_MAX_DESCRIPTORS as u64,
    )?;
    // n <= 4095 so this cannot overflow u16.
    Ok((UNMAP_HEADER_LEN + n * UNMAP_DESCRIPTOR_LEN) as u16)
}

/// The UNMAP CDB for a parameter list of `param_len` bytes.
pub fn unmap_cdb(param_len: u16) -> Cdb {
    let mut c = Cdb::new(opcode::UNMAP, 10);
    c.set_be16(7, param_len);
    c
}

/// Writes the UNMAP parameter list for `descs` into `out` and returns its
/// length. `out` must hold [`unmap_param_list_len`] bytes.
pub fn write_unmap_param_list(
    descs: &[UnmapDescriptor],
    out: &mut [u8],
) -> Result<usize, CdbError> {
    let len = usize::from(unmap_param_list_len(descs.len())?);
    for d in descs {
        check_end("UNMAP", d.lba, u64::from(d.blocks))?;
    }
    let out = out.get_mut(..len).ok_or(CdbError::Invalid {
        command: "UNMAP",
        reason: "output buffer too small for the parameter list",
    })?;
    out.fill(0);
    let (header, body) = out.split_at_mut(UNMAP_HEADER_LEN);
    // UNMAP DATA LENGTH counts the bytes after itself; the descriptor length
    // counts the descriptors only.
    header[0..2].copy_from_slice(&((len - 2) as u16).to_be_bytes());
    header[2..4].copy_from_slice(&((len - UNMAP_HEADER_LEN) as u16).to_be_bytes());
    for (d, chunk) in descs
        .iter()
        .zip(body.chunks_exact_mut(UNMAP_DESCRIPTOR_LEN))
    {
        chunk[0..8].copy_from_slice(&d.lba.to_be_bytes());
        chunk[8..12].copy_from_slice(&d.blocks.to_be_bytes());
    }
    Ok(len)
}

/// UNMAP for `descs`: the CDB and its parameter list (the Data-Out buffer).
pub fn unmap(descs: &[UnmapDescriptor]) -> Result<(Cdb, Vec<u8>), CdbError> {
    let len = unmap_param_list_len(descs.len())?;
    let mut list = vec![0u8; usize::from(len)];
    write_unmap_param_list(descs, &mut list)?;
    Ok((unmap_cdb(len), list))
}

/// Flags of WRITE SAME.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteSameFlags {
    /// Unmap the blocks if the target can (thin provisioning); the data-out
    /// block should then be zeros.
    pub unmap: bool,
    /// No Data-Out Buffer (WRITE SAME(16) only, SBC-4): the target writes
    /// zeros without a data transfer.
    pub ndob: bool,
}

/// WRITE SAME(10): repeat one logical block over `blocks` (1..=65535) blocks.
///
/// Zero blocks would mean "to the end of the medium" and is refused.
pub fn write_same10(lba: u64, blocks: u32, unmap: bool) -> Result<Cdb, CdbError> {
    const C: &str = "WRITE SAME(10)";
    nonzero(C, u64::from(blocks))?;
    check_fits(C, "LBA", lba, u64::from(u32::MAX))?;
    check_fits(
        C,
        "number of blocks",
        u64::from(blocks),
        u64::from(u16::MAX),
    )?;
    let mut c = Cdb::new(opcode::WRITE_SAME_10, 10);
    c.bytes[1] = u8::from(unmap) << 3;
    c.set_be32(2, lba as u32);
    c.set_be16(7, blocks as u16);
    Ok(c)
}

/// WRITE SAME(16) over `blocks` (>= 1) blocks from `lba`.
///
/// Without `ndob` the Data-Out buffer is one logical block; with it, none.
pub fn write_same16(lba: u64, blocks: u32, flags: WriteSameFlags) -> Result<Cdb, CdbError> {
    const C: &str = "WRITE SAME(16)";
    nonzero(C, u64::from(blocks))?;
    check_end(C, lba, u64::from(blocks))?;
    let mut c = Cdb::new(opcode::WRITE_SAME_16, 16);
    c.bytes[1] = (u8::from(flags.unmap) << 3) | u8::from(flags.ndob);
    c.set_be64(2, lba);
    c.set_be32(10, blocks);
    Ok(c)
}

/// INQUIRY for the standard data. SPC-2 targets read only the low byte of the
/// allocation length, so values up to 255 are the most portable.
pub fn inquiry(alloc_len: u16) -> Cdb {
    let mut c = Cdb::new(opcode::INQUIRY, 6);
    c.set_be16(3, alloc_len);
    c
}

/// INQUIRY with EVPD=1 for vital product data page `page`.
pub fn inquiry_vpd(page: u8, alloc_len: u16) -> Cdb {
    let mut c = inquiry(alloc_len);
    c.bytes[1] = 0x01;
    c.bytes[2] = page;
    c
}

/// READ CAPACITY(10). Its 8-byte answer is parsed by
/// [`super::capacity::ReadCapacity10::parse`].
pub fn read_capacity10() -> Cdb {
    Cdb::new(opcode::READ_CAPACITY_10, 10)
}

/// Bytes of a complete READ CAPACITY(16) answer.
pub const READ_CAPACITY_16_LEN: u32 = 32;

/// READ CAPACITY(16) with the given allocation length (use
/// [`READ_CAPACITY_16_LEN`]).
pub fn read_capacity16(alloc_len: u32) -> Cdb {
    let mut c = Cdb::new(opcode::SERVICE_ACTION_IN_16, 16);
    c.bytes[1] = SA_READ_CAPACITY_16;
    c.set_be32(10, alloc_len);
    c
}

/// REPORT LUNS. `select_report` 0 lists the addressable logical units.
/// SPC-4 requires an allocation length of at least 16 bytes.
pub fn report_luns(select_report: u8, alloc_len: u32) -> Result<Cdb, CdbError> {
    if alloc_len < 16 {
        return Err(CdbError::Invalid {
            command: "REPORT LUNS",
            reason: "allocation length must be at least 16 bytes",
        });
    }
    let mut c = Cdb::new(opcode::REPORT_LUNS, 12);
    c.bytes[2] = select_report;
    c.set_be32(6, alloc_len);
    Ok(c)
}

/// TEST UNIT READY: no data; clears a pending unit attention.
pub fn test_unit_ready() -> Cdb {
    Cdb::new(opcode::TEST_UNIT_READY, 6)
}

/// Which values MODE SENSE returns (the PC field).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PageControl {
    /// The values in effect now.
    #[default]
    Current = 0,
    /// Which bits may be changed.
    Changeable = 1,
    /// The power-on defaults.
    Default = 2,
    /// The saved values.
    Saved = 3,
}

/// Mode page code of the caching page (WCE, RCD).
pub const MODE_PAGE_CACHING: u8 = 0x08;
/// Mode page code meaning "all pages".
pub const MODE_PAGE_ALL: u8 = 0x3f;

fn check_page(command: &'static str, page: u8) -> Result<(), CdbError> {
    check_fits(command, "page code", u64::from(page), 0x3f)
}

/// MODE SENSE(6). `dbd` suppresses block descriptors.
pub fn mode_sense6(
    page: u8,
    subpage: u8,
    pc: PageControl,
    dbd: bool,
    alloc_len: u8,
) -> Result<Cdb, CdbError> {
    check_page("MODE SENSE(6)", page)?;
    let mut c = Cdb::new(opcode::MODE_SENSE_6, 6);
    c.bytes[1] = u8::from(dbd) << 3;
    c.bytes[2] = ((pc as u8) << 6) | page;
    c.bytes[3] = subpage;
    c.bytes[4] = alloc_len;
    Ok(c)
}

/// MODE SENSE(10). `dbd` suppresses block descriptors.
pub fn mode_sense10(
    page: u8,
    subpage: u8,
    pc: PageControl,
    dbd: bool,
    alloc_len: u16,
) -> Result<Cdb, CdbError> {
    check_page("MODE SENSE(10)", page)?;
    let mut c = Cdb::new(opcode::MODE_SENSE_10, 10);
    c.bytes[1] = u8::from(dbd) << 3;
    c.bytes[2] = ((pc as u8) << 6) | page;
    c.bytes[3] = subpage;
    c.set_be16(7, alloc_len);
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::wire::{hex, unhex};

    const NO: RwFlags = RwFlags {
        fua: false,
        dpo: false,
    };

    #[test]
    fn matches_cdbs_captured_from_libiscsi() {
        // Bytes sent by iscsi-inq / iscsi-test-cu to tgtd (strace capture).
        assert_eq!(hex(inquiry(0x40).as_bytes()), "120000004000");
        assert_eq!(hex(inquiry_vpd(0xb0, 0x40).as_bytes()), "1201b0004000");
        assert_eq!(
            hex(read_capacity16(READ_CAPACITY_16_LEN).as_bytes()),
            "9e100000000000000000000000200000"
        );
        assert_eq!(hex(read_capacity10().as_bytes()), "25000000000000000000");
        assert_eq!(
            hex(report_luns(0, 0x10).unwrap().as_bytes()),
            "a0000000000000000010 0000".replace(' ', "")
        );
        assert_eq!(
            hex(
                mode_sense6(MODE_PAGE_ALL, 0, PageControl::Current, false, 0xff)
                    .unwrap()
                    .as_bytes()
            ),
            "1a003f00ff00"
        );
        assert_eq!(
            unmap_cdb(unmap_param_list_len(1).unwrap()).as_bytes(),
            &unhex("42000000000000001800")[..]
        );
        let ws = write_same16(
            0,
            1,
            WriteSameFlags {
                unmap: true,
                ndob: false,
            },
        )
        .unwrap();
        assert_eq!(hex(ws.as_bytes()), "93080000000000000000000000010000");
        assert_eq!(hex(test_unit_ready().as_bytes()), "000000000000");
    }

    #[test]
    fn read_write_layouts() {
        let c = read10(
            0x1234_5678,
            0x100,
            RwFlags {
                fua: true,
                dpo: false,
            },
        )
        .unwrap();
        assert_eq!(hex(c.as_bytes()), "28081234567800010000");
        assert_eq!(c.len(), 10);
        let c = write16(
            0x0102_0304_0506_0708,
            0x0a0b_0c0d,
            RwFlags {
                fua: true,
                dpo: true,
            },
        )
        .unwrap();
        assert_eq!(hex(c.as_bytes()), "8a1801020304050607080a0b0c0d0000");
        assert_eq!(c.padded().len(), 16);
        let c = read16(7, 8, NO).unwrap();
        assert_eq!(c.opcode(), 0x88);
        assert_eq!(
            format!("{c:?}"),
            "READ(16) [88 00 00 00 00 00 00 00 00 07 00 00 00 08 00 00]"
        );
        let c = write10(1, 1, NO).unwrap();
        assert_eq!(c.name(), "WRITE(10)");
    }

    #[test]
    fn ten_byte_limits_are_enforced() {
        assert!(read10(u64::from(u32::MAX), 1, NO).is_ok());
        assert_eq!(
            read10(1 << 32, 1, NO),
            Err(CdbError::OutOfRange {
                command: "READ(10)",
                field: "LBA",
                value: 1 << 32,
                max: u64::from(u32::MAX)
            })
        );
        assert!(write10(0, 65536, NO).is_err());
        assert!(write10(0, 65535, NO).is_ok());
        assert!(read10(0, 0, NO).is_err());
        assert!(read16(0, 0, NO).is_err());
        assert!(read16(u64::MAX, 1, NO).is_ok());
        assert!(read16(u64::MAX, 2, NO).is_err());
        assert!(synchronize_cache10(0, 65536).is_err());
        assert!(synchronize_cache10(1 << 32, 0).is_err());
        assert!(write_same10(0, 0, true).is_err());
        assert!(write_same10(0, 70000, true).is_err());
        assert!(write_same16(0, 0, WriteSameFlags::default()).is_err());
        assert!(mode_sense6(0x40, 0, PageControl::Current, false, 255).is_err());
        assert!(report_luns(0, 15).is_err());
    }

    #[test]
    fn auto_size_selection() {
        assert_eq!(read(5, 8, NO, true).unwrap().opcode(), opcode::READ_10);
        assert_eq!(
            read(1 << 33, 8, NO, true).unwrap().opcode(),
            opcode::READ_16
        );
        assert_eq!(
            write(0, 1 << 20, NO, true).unwrap().opcode(),
            opcode::WRITE_16
        );
        assert!(write(0, 1 << 20, NO, false).is_err());
    }

    #[test]
    fn sync_cache_and_write_same_layouts() {
        assert_eq!(
            hex(synchronize_cache10(0, 0).unwrap().as_bytes()),
            "35000000000000000000"
        );
        assert_eq!(
            hex(synchronize_cache16(0x10, 0x20).unwrap().as_bytes()),
            "91000000000000000010000000200000"
        );
        assert_eq!(
            hex(write_same10(0x20, 8, true).unwrap().as_bytes()),
            "41080000002000000800"
        );
        let c = write_same16(
            9,
            3,
            WriteSameFlags {
                unmap: true,
                ndob: true,
            },
        )
        .unwrap();
        assert_eq!(hex(c.as_bytes()), "93090000000000000009000000030000");
    }

    #[test]
    fn unmap_parameter_list() {
        let d = [
            UnmapDescriptor {
                lba: 0x1122,
                blocks: 8,
            },
            UnmapDescriptor {
                lba: 1 << 40,
                blocks: 0xffff_ffff,
            },
        ];
        let (cdb, list) = unmap(&d).unwrap();
        assert_eq!(hex(cdb.as_bytes()), "42000000000000002800");
        assert_eq!(
            hex(&list),
            "0026002000000000\
             00000000000011220000000800000000\
             0000010000000000ffffffff00000000"
        );
        assert!(unmap(&[]).is_err());
        assert_eq!(unmap_param_list_len(UNMAP_MAX_DESCRIPTORS).unwrap(), 65528);
        assert!(unmap_param_list_len(UNMAP_MAX_DESCRIPTORS + 1).is_err());
        let mut small = [0u8; 20];
        assert!(write_unmap_param_list(&d, &mut small).is_err());
        assert!(unmap(&[UnmapDescriptor {
            lba: u64::MAX,
            blocks: 2
        }])
        .is_err());
    }

    #[test]
    fn mode_sense10_and_vpd_layouts() {
        let c = mode_sense10(MODE_PAGE_CACHING, 0, PageControl::Current, true, 0x200).unwrap();
        assert_eq!(hex(c.as_bytes()), "5a080800000000020000");
        let c = mode_sense6(MODE_PAGE_CACHING, 0, PageControl::Changeable, false, 0xc0).unwrap();
        assert_eq!(hex(c.as_bytes()), "1a004800c000");
        assert_eq!(read_capacity16(32).name(), "READ CAPACITY(16)");
        assert_eq!(opcode_name(0xff), "unknown command");
    }
}
