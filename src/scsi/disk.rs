//! What a virtio-blk device needs to know about a SCSI logical unit, the
//! command sequence that finds it out, and request splitting.
//!
//! [`LunProber`] yields the probe commands one at a time (TEST UNIT READY,
//! INQUIRY, VPD pages, READ CAPACITY, MODE SENSE) and takes their results; it
//! tolerates targets that refuse optional commands (conservative defaults)
//! and rejects malformed answers. [`LunInfo::from_probe`] does the combining
//! for callers that issue the commands themselves.

use std::collections::VecDeque;

use thiserror::Error;

use super::capacity::{Capacity, ReadCapacity10, ReadCapacity16};
use super::cdb::{self, Cdb, PageControl, UNMAP_MAX_DESCRIPTORS};
use super::error::ParseError;
use super::inquiry::{
    self, BlockDeviceCharacteristics, BlockLimits, DeviceIdentification, LogicalBlockProvisioning,
    StandardInquiry, SupportedVpdPages, UnitSerial,
};
use super::luns::{Lun, ReportLuns};
use super::mode::ModeSense;
use super::sense::{classify, IoFailure, SenseAction, SenseData};
use super::status::ScsiStatus;
use super::wire::hex;

/// Bytes of the virtio-blk serial (VIRTIO_BLK_T_GET_ID answer).
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// Largest transfer per command when the target does not report one
/// (VPD 0xB0 absent or 0): 1 MiB, a size every target handles.
pub const DEFAULT_MAX_TRANSFER_BYTES: u32 = 1 << 20;
/// WRITE SAME length assumed when the target reports none: what fits WRITE
/// SAME(10), as Linux does.
pub const DEFAULT_MAX_WRITE_SAME_BLOCKS: u64 = 0xffff;
/// Retries of one probe command on transient errors and unit attentions.
pub const PROBE_RETRIES: u32 = 8;

/// Why a logical unit cannot be used, or a request not be split.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DiskError {
    /// The peripheral qualifier says there is no logical unit here.
    #[error("No logical unit is connected at this LUN (peripheral qualifier {0})")]
    NotConnected(u8),
    /// The logical unit is not a direct-access block device.
    #[error("The logical unit is a {name} (device type 0x{device_type:02x}), not a disk")]
    NotADisk {
        /// Peripheral device type.
        device_type: u8,
        /// Its readable name.
        name: &'static str,
    },
    /// Block size not usable by virtio-blk.
    #[error("Unsupported logical block size of {0} bytes (need a power of two from 512 to 65536)")]
    UnsupportedBlockSize(u32),
    /// Type 2 protection forbids READ/WRITE(10/16).
    #[error("The logical unit is formatted with protection type {0}, which needs 32-byte CDBs")]
    UnsupportedProtection(u8),
    /// Capacity arithmetic overflowed.
    #[error("The reported capacity (last LBA {last_lba}, {block_len}-byte blocks) is too large")]
    CapacityOverflow {
        /// Last LBA.
        last_lba: u64,
        /// Block length.
        block_len: u32,
    },
    /// READ CAPACITY(10) says "too large" but READ CAPACITY(16) failed.
    #[error("The disk is larger than 2 TiB blocks but the target refused READ CAPACITY(16)")]
    CapacityNeeds16,
    /// A required probe command failed.
    #[error("{step} failed: {reason}")]
    CommandFailed {
        /// Probe step.
        step: &'static str,
        /// Status and sense, in words.
        reason: String,
    },
    /// A probe command kept failing with transient errors.
    #[error("{step} still failing after {retries} retries: {reason}")]
    TooManyRetries {
        /// Probe step.
        step: &'static str,
        /// Retries made.
        retries: u32,
        /// Last status and sense, in words.
        reason: String,
    },
    /// The target returned data that cannot be decoded.
    #[error("{step} returned unusable data")]
    BadData {
        /// Probe step.
        step: &'static str,
        /// The decoding error.
        #[source]
        source: ParseError,
    },
    /// REPORT LUNS does not list the LUN we were asked to use.
    #[error("has no LUN {lun} (it reports {})", reported_list(.reported))]
    NoSuchLun {
        /// The LUN asked for.
        lun: Lun,
        /// The LUNs the target reported.
        reported: Vec<Lun>,
    },
    /// `finish` was called before the probe ended or without required data.
    #[error("The LUN probe is incomplete: {0}")]
    Incomplete(&'static str),
    /// A byte range is not a multiple of the logical block size.
    #[error("Range at byte {offset}, {len} bytes, is not aligned to the {block_size}-byte logical block")]
    Unaligned {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// Logical block size.
        block_size: u32,
    },
    /// A byte range ends past the disk.
    #[error("Range at byte {offset}, {len} bytes, ends beyond the disk ({capacity} bytes)")]
    OutOfRange {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// Disk size in bytes.
        capacity: u64,
    },
    /// Splitting parameters that cannot work.
    #[error("Cannot split requests with block size {block_size} and maximum transfer {max_transfer} bytes")]
    BadSplit {
        /// Logical block size.
        block_size: u32,
        /// Maximum transfer in bytes.
        max_transfer: u32,
    },
}

/// UNMAP limits, in logical blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnmapLimits {
    /// Most blocks one UNMAP may cover (sum over its descriptors).
    pub max_blocks: u32,
    /// Most block descriptors per UNMAP (capped to what one CDB can carry).
    pub max_descriptors: u32,
    /// Optimal unmap granularity (at least 1).
    pub granularity: u32,
    /// LBA of the first granularity-aligned block, when reported.
    pub alignment: Option<u32>,
}

/// WRITE SAME usability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteSameInfo {
    /// WRITE SAME(16) with the UNMAP bit deallocates blocks (LBPME + LBPWS).
    pub ws16_unmap: bool,
    /// WRITE SAME(10) with the UNMAP bit deallocates blocks (LBPME + LBPWS10).
    pub ws10_unmap: bool,
    /// Most blocks per WRITE SAME: reported by VPD 0xB0, else
    /// [`DEFAULT_MAX_WRITE_SAME_BLOCKS`].
    pub max_blocks: u64,
    /// True when `max_blocks` came from the target.
    pub max_reported: bool,
}

/// Everything a virtio-blk device needs about one logical unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunInfo {
    /// Vendor, product and revision from INQUIRY, for logs.
    pub vendor: String,
    /// Product identification.
    pub product: String,
    /// Product revision.
    pub revision: String,
    /// Logical block size in bytes (power of two, 512..=65536).
    pub block_size: u32,
    /// Number of logical blocks.
    pub num_blocks: u64,
    /// Capacity in 512-byte sectors (virtio-blk `capacity`).
    pub capacity_sectors: u64,
    /// Logical blocks per physical block, as a power of two.
    pub physical_block_exp: u8,
    /// First physically aligned LBA (virtio-blk `alignment_offset`).
    pub alignment_offset: u16,
    /// Minimum I/O size in logical blocks (virtio-blk `min_io_size`).
    pub min_io_blocks: u32,
    /// Optimal I/O size in logical blocks, 0 if not reported (`opt_io_size`).
    pub opt_io_blocks: u32,
    /// Largest transfer of one command in bytes (a multiple of `block_size`).
    pub max_transfer_bytes: u32,
    /// READ/WRITE(16) usable (READ CAPACITY(16) worked or the disk needs it).
    pub cdb16: bool,
    /// UNMAP usable, with its limits.
    pub unmap: Option<UnmapLimits>,
    /// WRITE SAME usability.
    pub write_same: WriteSameInfo,
    /// Unmapped blocks read back as zeros.
    pub unmap_reads_zeros: bool,
    /// The LUN is write protected (MODE SENSE WP).
    pub read_only: bool,
    /// Volatile write cache enabled (caching page WCE); true when unknown so
    /// the guest keeps sending flushes.
    pub write_cache: bool,
    /// The target honours FUA (MODE SENSE DPOFUA).
    pub fua: bool,
    /// Rotational medium, when reported (VPD 0xB1).
    pub rotational: Option<bool>,
    /// Protection type (1 or 3) when enabled; transparent to us with 10/16-byte CDBs.
    pub protection_type: Option<u8>,
    /// Serial for virtio GET_ID: at most 20 bytes of printable ASCII.
    pub serial: String,
}

/// The answers [`LunInfo::from_probe`] combines. Optional pages are `None`
/// when the target does not support them.
#[derive(Debug, Clone, Default)]
pub struct LunProbe {
    /// Standard INQUIRY (required).
    pub inquiry: Option<StandardInquiry>,
    /// VPD 0x00.
    pub supported_vpd: Option<SupportedVpdPages>,
    /// VPD 0x80.
    pub unit_serial: Option<UnitSerial>,
    /// VPD 0x83.
    pub device_id: Option<DeviceIdentification>,
    /// VPD 0xB0.
    pub block_limits: Option<BlockLimits>,
    /// VPD 0xB1.
    pub characteristics: Option<BlockDeviceCharacteristics>,
    /// VPD 0xB2.
    pub provisioning: Option<LogicalBlockProvisioning>,
    /// READ CAPACITY(16) or (10) (required).
    pub capacity: Option<Capacity>,
    /// MODE SENSE (caching page requested).
    pub mode: Option<ModeSense>,
}

impl LunInfo {
    /// Combines probe answers. Fails on a missing INQUIRY or capacity, a LUN
    /// that is not a disk, or values virtio-blk cannot express.
    pub fn from_probe(p: &LunProbe) -> Result<Self, DiskError> {
        let inq = p
            .inquiry
            .as_ref()
            .ok_or(DiskError::Incomplete("no INQUIRY data"))?;
        if !inq.is_connected() {
            return Err(DiskError::NotConnected(inq.peripheral_qualifier));
        }
        if inq.device_type != inquiry::DEVICE_TYPE_DISK {
            return Err(DiskError::NotADisk {
                device_type: inq.device_type,
                name: inq.device_type_name(),
            });
        }
        let cap = p
            .capacity
            .ok_or(DiskError::Incomplete("no READ CAPACITY data"))?;
        let bs = cap.block_len;
        if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
            return Err(DiskError::UnsupportedBlockSize(bs));
        }
        let overflow = DiskError::CapacityOverflow {
            last_lba: cap.last_lba,
            block_len: bs,
        };
        let num_blocks = cap.last_lba.checked_add(1).ok_or(overflow.clone())?;
        let capacity_sectors = num_blocks
            .checked_mul(u64::from(bs / 512))
            .ok_or(overflow.clone())?;
        // The byte size must fit u64 for range checks.
        num_blocks.checked_mul(u64::from(bs)).ok_or(overflow)?;

        let rc16 = cap.details;
        let protection_type = rc16.and_then(|r| r.protection_type());
        if protection_type == Some(2) {
            return Err(DiskError::UnsupportedProtection(2));
        }
        let cdb16 = rc16.is_some();
        // Physical exponents beyond 2^15 blocks per physical block are nonsense.
        let physical_block_exp = rc16.map_or(0, |r| r.lb_per_pb_exponent).min(15);
        let alignment_offset = rc16.map_or(0, |r| r.lowest_aligned_lba);

        let bl = p.block_limits;
        let min_io_blocks = match bl.map_or(0, |b| b.optimal_transfer_granularity) {
            0 => 1u32 << physical_block_exp,
            g => u32::from(g),
        };
        let opt_io_blocks = bl.map_or(0, |b| b.optimal_transfer_len);

        // Max transfer: what the target reports, else the default; never more
        // than a 10-byte CDB can carry when 16-byte ones are unavailable.
        let reported = bl.map_or(0, |b| b.max_transfer_len);
        let mut max_blocks = if reported == 0 {
            u64::from(DEFAULT_MAX_TRANSFER_BYTES / bs).max(1)
        } else {
            u64::from(reported)
        };
        if !cdb16 {
            max_blocks = max_blocks.min(u64::from(u16::MAX));
        }
        let max_blocks = max_blocks.min(u64::from(u32::MAX / bs)).max(1);
        let max_transfer_bytes = (max_blocks * u64::from(bs)) as u32;

        let lbpme = rc16.is_some_and(|r| r.lbpme);
        let prov = p.provisioning;
        let unmap = match (lbpme, prov, bl) {
            (true, Some(pr), Some(b))
                if pr.lbpu && b.max_unmap_lba_count > 0 && b.max_unmap_descriptors > 0 =>
            {
                Some(UnmapLimits {
                    max_blocks: b.max_unmap_lba_count,
                    max_descriptors: b.max_unmap_descriptors.min(UNMAP_MAX_DESCRIPTORS as u32),
                    granularity: b.optimal_unmap_granularity.max(1),
                    alignment: b.unmap_granularity_alignment,
                })
            }
            _ => None,
        };
        let ws_reported = bl.map_or(0, |b| b.max_write_same_len);
        let write_same = WriteSameInfo {
            ws16_unmap: lbpme && prov.is_some_and(|p| p.lbpws),
            ws10_unmap: lbpme && prov.is_some_and(|p| p.lbpws10),
            max_blocks: if ws_reported == 0 {
                DEFAULT_MAX_WRITE_SAME_BLOCKS
            } else {
                ws_reported
            },
            max_reported: ws_reported != 0,
        };
        let unmap_reads_zeros = lbpme
            && (prov.is_some_and(|p| p.reads_zeros_after_unmap()) || rc16.is_some_and(|r| r.lbprz));

        let caching = p.mode.as_ref().and_then(|m| m.caching());
        Ok(LunInfo {
            vendor: inq.vendor.clone(),
            product: inq.product.clone(),
            revision: inq.revision.clone(),
            block_size: bs,
            num_blocks,
            capacity_sectors,
            physical_block_exp,
            alignment_offset,
            min_io_blocks,
            opt_io_blocks,
            max_transfer_bytes,
            cdb16,
            unmap,
            write_same,
            unmap_reads_zeros,
            read_only: p.mode.as_ref().is_some_and(|m| m.write_protected),
            write_cache: caching.is_none_or(|c| c.wce),
            fua: p.mode.as_ref().is_some_and(|m| m.dpofua),
            rotational: p.characteristics.and_then(|c| c.rotational()),
            protection_type,
            serial: serial_for(p),
        })
    }

    /// Disk size in bytes.
    pub fn size_bytes(&self) -> u64 {
        // Checked in from_probe.
        self.num_blocks.saturating_mul(u64::from(self.block_size))
    }

    /// Splits the byte range [`offset`, `offset + len`) into commands no
    /// larger than `max_transfer_bytes`, after checking it lies on the disk.
    pub fn split(&self, offset: u64, len: u64) -> Result<Chunks, DiskError> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.size_bytes()) {
            return Err(DiskError::OutOfRange {
                offset,
                len,
                capacity: self.size_bytes(),
            });
        }
        split_range(offset, len, self.block_size, self.max_transfer_bytes)
    }

    /// The serial as the 20 bytes of a virtio GET_ID answer (NUL padded).
    pub fn virtio_id(&self) -> [u8; VIRTIO_BLK_ID_BYTES] {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
        for (d, s) in id.iter_mut().zip(self.serial.bytes()) {
            *d = s;
        }
        id
    }
}

/// Picks the serial: VPD 0x80, else the best LUN designator of VPD 0x83,
/// keeping the last 20 characters (the unique end of long identifiers).
fn serial_for(p: &LunProbe) -> String {
    let from_serial = p
        .unit_serial
        .as_ref()
        .map(|s| s.0.clone())
        .filter(|s| !s.is_empty());
    let from_designator = || {
        p.device_id
            .as_ref()
            .and_then(|d| d.best_lun_designator())
            .map(|d| match d.code_set {
                inquiry::CodeSet::Ascii | inquiry::CodeSet::Utf8 => d.text(),
                // Hex without the "naa." prefix: it would waste 4 of 20 bytes.
                _ => hex(&d.value),
            })
    };
    let s = from_serial.or_else(from_designator).unwrap_or_default();
    // text() and UnitSerial are printable ASCII already, so byte == char.
    let s: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .collect();
    let s = s.trim();
    let skip = s.len().saturating_sub(VIRTIO_BLK_ID_BYTES);
    s.get(skip..).unwrap_or_default().to_string()
}

/// One command's share of a split byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// First logical block.
    pub lba: u64,
    /// Logical blocks (at least 1).
    pub blocks: u32,
    /// Byte offset of this chunk within the original range.
    pub offset: u64,
    /// Bytes (`blocks * block_size`).
    pub len: u32,
}

/// Iterator over the [`Chunk`]s of a range; see [`split_range`].
#[derive(Debug, Clone)]
pub struct Chunks {
    lba: u64,
    remaining: u64,
    done: u64,
    block_size: u32,
    max_blocks: u32,
}

impl Iterator for Chunks {
    type Item = Chunk;

    fn next(&mut self) -> Option<Chunk> {
        if self.remaining == 0 {
            return None;
        }
        let blocks = self.remaining.min(u64::from(self.max_blocks)) as u32;
        let len = blocks.checked_mul(self.block_size)?;
        let c = Chunk {
            lba: self.lba,
            blocks,
            offset: self.done,
            len,
        };
        self.lba = self.lba.checked_add(u64::from(blocks))?;
        self.remaining -= u64::from(blocks);
        self.done = self.done.checked_add(u64::from(len))?;
        Some(c)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.remaining.div_ceil(u64::from(self.max_blocks.max(1)));
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        (n, Some(n))
    }
}

/// Splits [`offset`, `offset + len`) (bytes) into block-aligned commands of
/// at most `max_transfer` bytes (rounded down to whole blocks).
pub fn split_range(
    offset: u64,
    len: u64,
    block_size: u32,
    max_transfer: u32,
) -> Result<Chunks, DiskError> {
    if block_size == 0 || !block_size.is_power_of_two() || max_transfer < block_size {
        return Err(DiskError::BadSplit {
            block_size,
            max_transfer,
        });
    }
    let bs = u64::from(block_size);
    if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
        return Err(DiskError::Unaligned {
            offset,
            len,
            block_size,
        });
    }
    if offset.checked_add(len).is_none() {
        return Err(DiskError::OutOfRange {
            offset,
            len,
            capacity: u64::MAX,
        });
    }
    Ok(Chunks {
        lba: offset / bs,
        remaining: len / bs,
        done: 0,
        block_size,
        max_blocks: max_transfer / block_size,
    })
}

/// Splits a read or write of `len` bytes at byte `offset` whose buffer is
/// made of `runs` (the lengths of its host-contiguous pieces, in order) into
/// commands that each cover part of one run, at most `max_transfer` bytes:
/// iSER's "split" strategy for scattered buffers, since one command names
/// one contiguous range. Chunk offsets are relative to the request.
///
/// `None` when splitting does not apply and the request goes as one buffer
/// (which the iSER transport bounces): fewer than two runs, a run that is
/// empty or not a whole number of `block_size` blocks (a command cannot end
/// mid-block), runs that do not add up to `len`, bad geometry, or more than
/// `max_commands` commands.
pub fn split_at_runs(
    offset: u64,
    len: u64,
    runs: &[u64],
    block_size: u32,
    max_transfer: u32,
    max_commands: usize,
) -> Option<Vec<Chunk>> {
    if runs.len() < 2 || block_size == 0 {
        return None;
    }
    let bs = u64::from(block_size);
    let total = runs.iter().try_fold(0u64, |a, &r| a.checked_add(r))?;
    if total != len || runs.iter().any(|&r| r == 0 || !r.is_multiple_of(bs)) {
        return None;
    }
    let mut out = Vec::with_capacity(runs.len());
    let mut done = 0u64;
    for &r in runs {
        for mut c in split_range(offset.checked_add(done)?, r, block_size, max_transfer).ok()? {
            if out.len() >= max_commands {
                return None;
            }
            c.offset = c.offset.checked_add(done)?;
            out.push(c);
        }
        done += r;
    }
    Some(out)
}

/// "LUNs 0, 1", "LUN 0", "no LUNs" (the first 16, then "...").
fn reported_list(luns: &[Lun]) -> String {
    match luns.len() {
        0 => "no LUNs".to_string(),
        n => {
            let mut s = if n == 1 { "LUN " } else { "LUNs " }.to_string();
            let shown: Vec<String> = luns.iter().take(16).map(|l| l.to_string()).collect();
            s.push_str(&shown.join(", "));
            if n > 16 {
                s.push_str(&format!(", ... ({n} in all)"));
            }
            s
        }
    }
}

/// Largest REPORT LUNS answer we ask for (8 + 8 × 4096 LUNs).
const REPORT_LUNS_MAX_ALLOC: u32 = 8 + 8 * 4096;

/// One step of the LUN probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeStep {
    /// REPORT LUNS (sent to LUN 0): is the LUN there at all?
    ReportLuns,
    /// TEST UNIT READY: absorbs the power-on unit attention.
    TestUnitReady,
    /// Standard INQUIRY.
    Inquiry,
    /// INQUIRY for a VPD page.
    Vpd(u8),
    /// READ CAPACITY(16).
    ReadCapacity16,
    /// READ CAPACITY(10), after READ CAPACITY(16) was refused.
    ReadCapacity10,
    /// MODE SENSE(10) for the caching page.
    ModeSense10,
    /// MODE SENSE(6), after MODE SENSE(10) was refused.
    ModeSense6,
}

impl ProbeStep {
    /// The step's name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::ReportLuns => "REPORT LUNS",
            Self::TestUnitReady => "TEST UNIT READY",
            Self::Inquiry => "INQUIRY",
            Self::Vpd(inquiry::page::SUPPORTED) => "INQUIRY VPD 0x00",
            Self::Vpd(inquiry::page::UNIT_SERIAL) => "INQUIRY VPD 0x80",
            Self::Vpd(inquiry::page::DEVICE_ID) => "INQUIRY VPD 0x83",
            Self::Vpd(inquiry::page::BLOCK_LIMITS) => "INQUIRY VPD 0xB0",
            Self::Vpd(inquiry::page::BLOCK_CHARACTERISTICS) => "INQUIRY VPD 0xB1",
            Self::Vpd(inquiry::page::PROVISIONING) => "INQUIRY VPD 0xB2",
            Self::Vpd(_) => "INQUIRY VPD",
            Self::ReadCapacity16 => "READ CAPACITY(16)",
            Self::ReadCapacity10 => "READ CAPACITY(10)",
            Self::ModeSense10 => "MODE SENSE(10)",
            Self::ModeSense6 => "MODE SENSE(6)",
        }
    }
}

/// A probe command to send: the CDB and the Data-In buffer size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeCommand {
    /// Which step this is.
    pub step: ProbeStep,
    /// The CDB.
    pub cdb: Cdb,
    /// Expected Data-In length (the allocation length).
    pub alloc_len: u32,
    /// Send to LUN 0 instead of the probed LUN (REPORT LUNS).
    pub to_lun0: bool,
}

/// The outcome of a probe command.
#[derive(Debug, Clone, Copy)]
pub enum ProbeResult<'a> {
    /// GOOD status with the Data-In bytes actually received (empty for
    /// TEST UNIT READY).
    Data(&'a [u8]),
    /// Any other status, with the sense data if it was CHECK CONDITION.
    Failed {
        /// The status.
        status: ScsiStatus,
        /// Decoded sense data, if any.
        sense: Option<&'a SenseData>,
    },
}

/// The VPD pages worth reading, in order.
const WANTED_VPD: [u8; 5] = [
    inquiry::page::UNIT_SERIAL,
    inquiry::page::DEVICE_ID,
    inquiry::page::BLOCK_LIMITS,
    inquiry::page::BLOCK_CHARACTERISTICS,
    inquiry::page::PROVISIONING,
];
/// First allocation length for INQUIRY and VPD pages: fits one byte for
/// SPC-2 targets and holds every page but long 0x83 ones.
const INQUIRY_ALLOC: u32 = 0xff;
const MODE_ALLOC: u32 = 0xff;

/// Drives the probe of one logical unit. Loop: [`next_command`](Self::next_command),
/// send it, [`complete`](Self::complete) with the result; when
/// `next_command` returns `None`, call [`finish`](Self::finish).
#[derive(Debug, Clone)]
pub struct LunProber {
    current: Option<(ProbeStep, u32)>,
    queue: VecDeque<ProbeStep>,
    retries: u32,
    probe: LunProbe,
    /// The LUN REPORT LUNS must list (None: not checked).
    lun: Option<Lun>,
}

impl Default for LunProber {
    fn default() -> Self {
        Self::new()
    }
}

impl LunProber {
    /// A probe starting with TEST UNIT READY.
    pub fn new() -> Self {
        let queue = [
            ProbeStep::Inquiry,
            ProbeStep::Vpd(inquiry::page::SUPPORTED),
            ProbeStep::ReadCapacity16,
            ProbeStep::ModeSense10,
        ]
        .into_iter()
        .collect();
        Self {
            current: Some((ProbeStep::TestUnitReady, 0)),
            queue,
            retries: 0,
            probe: LunProbe::default(),
            lun: None,
        }
    }

    /// A probe that first asks LUN 0 for REPORT LUNS and stops with
    /// [`DiskError::NoSuchLun`] when `lun` is not listed. A target that
    /// refuses REPORT LUNS is probed as by [`new`](Self::new).
    pub fn checking_lun(lun: Lun) -> Self {
        let mut p = Self::new();
        p.queue.push_front(ProbeStep::TestUnitReady);
        p.current = Some((
            ProbeStep::ReportLuns,
            Self::alloc_for(ProbeStep::ReportLuns),
        ));
        p.lun = Some(lun);
        p
    }

    /// The command to send now, or `None` when the probe is over.
    pub fn next_command(&self) -> Option<ProbeCommand> {
        let (step, alloc) = self.current?;
        let a16 = u16::try_from(alloc).unwrap_or(u16::MAX);
        let cdb = match step {
            ProbeStep::ReportLuns => cdb::report_luns(0, alloc).ok()?,
            ProbeStep::TestUnitReady => cdb::test_unit_ready(),
            ProbeStep::Inquiry => cdb::inquiry(a16),
            ProbeStep::Vpd(page) => cdb::inquiry_vpd(page, a16),
            ProbeStep::ReadCapacity16 => cdb::read_capacity16(alloc),
            ProbeStep::ReadCapacity10 => cdb::read_capacity10(),
            // Page 0x08 is below 0x40, so these cannot fail.
            ProbeStep::ModeSense10 => {
                cdb::mode_sense10(cdb::MODE_PAGE_CACHING, 0, PageControl::Current, true, a16)
                    .ok()?
            }
            ProbeStep::ModeSense6 => cdb::mode_sense6(
                cdb::MODE_PAGE_CACHING,
                0,
                PageControl::Current,
                true,
                u8::try_from(alloc).unwrap_or(u8::MAX),
            )
            .ok()?,
        };
        Some(ProbeCommand {
            step,
            cdb,
            alloc_len: alloc,
            to_lun0: step == ProbeStep::ReportLuns,
        })
    }

    fn advance(&mut self) {
        self.retries = 0;
        self.current = self.queue.pop_front().map(|s| (s, Self::alloc_for(s)));
    }

    fn alloc_for(step: ProbeStep) -> u32 {
        match step {
            // Room for 31 LUNs; a longer list is asked for again.
            ProbeStep::ReportLuns => 256,
            ProbeStep::TestUnitReady => 0,
            ProbeStep::Inquiry | ProbeStep::Vpd(_) => INQUIRY_ALLOC,
            ProbeStep::ReadCapacity16 => cdb::READ_CAPACITY_16_LEN,
            ProbeStep::ReadCapacity10 => 8,
            ProbeStep::ModeSense10 | ProbeStep::ModeSense6 => MODE_ALLOC,
        }
    }

    /// Records the result of the command from [`next_command`](Self::next_command).
    ///
    /// Returns an error when the LUN cannot be used; the probe is then over.
    pub fn complete(&mut self, result: ProbeResult<'_>) -> Result<(), DiskError> {
        let Some((step, alloc)) = self.current else {
            return Err(DiskError::Incomplete("no command was outstanding"));
        };
        match result {
            ProbeResult::Data(data) => self.on_data(step, alloc, data),
            ProbeResult::Failed { status, sense } => self.on_failure(step, status, sense),
        }
    }

    fn on_data(&mut self, step: ProbeStep, alloc: u32, data: &[u8]) -> Result<(), DiskError> {
        let bad = |source: ParseError| DiskError::BadData {
            step: step.name(),
            source,
        };
        // A truncated VPD page: ask again with the size the target announced.
        let retry_bigger = |e: &ParseError| match e {
            ParseError::Truncated { need, .. }
                if (*need as u64) > u64::from(alloc) && *need <= 0xffff =>
            {
                Some(*need as u32)
            }
            _ => None,
        };
        match step {
            ProbeStep::ReportLuns => {
                let r = ReportLuns::parse(data).map_err(bad)?;
                if !r.complete {
                    let need = u32::try_from(r.required_len).unwrap_or(u32::MAX);
                    if need > alloc && alloc < REPORT_LUNS_MAX_ALLOC {
                        self.current = Some((step, need.min(REPORT_LUNS_MAX_ALLOC)));
                        return Ok(());
                    }
                }
                if let Some(lun) = self.lun {
                    // A target may list its LUNs in another addressing
                    // method than ours (flat space for small numbers).
                    let listed = r
                        .luns
                        .iter()
                        .any(|l| *l == lun || (l.number().is_some() && l.number() == lun.number()));
                    if !listed && r.complete {
                        return Err(DiskError::NoSuchLun {
                            lun,
                            reported: r.luns,
                        });
                    }
                }
            }
            ProbeStep::TestUnitReady => {}
            ProbeStep::Inquiry => {
                let inq = StandardInquiry::parse(data).map_err(bad)?;
                if !inq.is_connected() {
                    return Err(DiskError::NotConnected(inq.peripheral_qualifier));
                }
                if inq.device_type != inquiry::DEVICE_TYPE_DISK {
                    return Err(DiskError::NotADisk {
                        device_type: inq.device_type,
                        name: inq.device_type_name(),
                    });
                }
                self.probe.inquiry = Some(inq);
            }
            ProbeStep::Vpd(page) => {
                let parsed = match page {
                    inquiry::page::SUPPORTED => SupportedVpdPages::parse(data).map(|p| {
                        // Queue the interesting pages right after this one.
                        for &w in WANTED_VPD.iter().rev() {
                            if p.contains(w) {
                                self.queue.push_front(ProbeStep::Vpd(w));
                            }
                        }
                        self.probe.supported_vpd = Some(p);
                    }),
                    inquiry::page::UNIT_SERIAL => {
                        UnitSerial::parse(data).map(|p| self.probe.unit_serial = Some(p))
                    }
                    inquiry::page::DEVICE_ID => {
                        DeviceIdentification::parse(data).map(|p| self.probe.device_id = Some(p))
                    }
                    inquiry::page::BLOCK_LIMITS => {
                        BlockLimits::parse(data).map(|p| self.probe.block_limits = Some(p))
                    }
                    inquiry::page::BLOCK_CHARACTERISTICS => BlockDeviceCharacteristics::parse(data)
                        .map(|p| self.probe.characteristics = Some(p)),
                    inquiry::page::PROVISIONING => LogicalBlockProvisioning::parse(data)
                        .map(|p| self.probe.provisioning = Some(p)),
                    _ => Ok(()),
                };
                if let Err(e) = parsed {
                    if let Some(need) = retry_bigger(&e) {
                        self.current = Some((step, need));
                        return Ok(());
                    }
                    return Err(bad(e));
                }
            }
            ProbeStep::ReadCapacity16 => {
                self.probe.capacity = Some(ReadCapacity16::parse(data).map_err(bad)?.into());
            }
            ProbeStep::ReadCapacity10 => {
                let r = ReadCapacity10::parse(data).map_err(bad)?;
                if r.needs_16() {
                    return Err(DiskError::CapacityNeeds16);
                }
                self.probe.capacity = Some(r.into());
            }
            ProbeStep::ModeSense10 => {
                self.probe.mode = Some(ModeSense::parse10(data).map_err(bad)?)
            }
            ProbeStep::ModeSense6 => self.probe.mode = Some(ModeSense::parse6(data).map_err(bad)?),
        }
        self.advance();
        Ok(())
    }

    fn on_failure(
        &mut self,
        step: ProbeStep,
        status: ScsiStatus,
        sense: Option<&SenseData>,
    ) -> Result<(), DiskError> {
        let reason = || match sense {
            Some(s) => format!("status {status}, {s}"),
            None => format!("status {status}"),
        };
        let action = classify(status, sense);
        match action {
            SenseAction::Success => {
                // GOOD without data, or RECOVERED ERROR: only TUR expects no data.
                if step == ProbeStep::TestUnitReady {
                    self.advance();
                    return Ok(());
                }
                return Err(DiskError::CommandFailed {
                    step: step.name(),
                    reason: "completed without returning data".into(),
                });
            }
            SenseAction::Retry | SenseAction::RetryAfterUnitAttention(_) => {
                self.retries += 1;
                if self.retries > PROBE_RETRIES && step == ProbeStep::ReportLuns {
                    // Only a check: go on without it.
                    self.advance();
                    return Ok(());
                }
                if self.retries > PROBE_RETRIES {
                    return Err(DiskError::TooManyRetries {
                        step: step.name(),
                        retries: PROBE_RETRIES,
                        reason: reason(),
                    });
                }
                return Ok(());
            }
            _ => {}
        }
        let refused = matches!(
            action,
            SenseAction::Unsupported | SenseAction::Fail(IoFailure::InvalidRequest)
        );
        match step {
            // Optional: carry on without them.
            ProbeStep::ReportLuns => self.advance(),
            ProbeStep::Vpd(_) if refused => self.advance(),
            ProbeStep::ModeSense6 if refused => self.advance(),
            ProbeStep::ReadCapacity16 if refused => {
                self.queue.push_front(ProbeStep::ReadCapacity10);
                self.advance();
            }
            ProbeStep::ModeSense10 if refused => {
                self.queue.push_front(ProbeStep::ModeSense6);
                self.advance();
            }
            _ => {
                return Err(DiskError::CommandFailed {
                    step: step.name(),
                    reason: reason(),
                })
            }
        }
        Ok(())
    }

    /// The answers gathered so far.
    pub fn probe(&self) -> &LunProbe {
        &self.probe
    }

    /// Combines the answers once [`next_command`](Self::next_command) returned `None`.
    pub fn finish(&self) -> Result<LunInfo, DiskError> {
        if self.current.is_some() {
            return Err(DiskError::Incomplete("commands are still to be sent"));
        }
        LunInfo::from_probe(&self.probe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::capacity::tests::{TGTD_RC10, TGTD_RC16, TGTD_RC16_4K, TGTD_RC16_THIN};
    use crate::scsi::inquiry::tests::*;
    use crate::scsi::wire::unhex;

    const TGTD_MS6_CACHING: &str =
        "1f00100800000000000002000812 1400ffff0000ffffffff8014000000000000";

    /// Answers of tgtd LUN 2 (thin provisioned) to what the prober asks.
    fn tgtd_answer(step: ProbeStep, thin: bool, four_k: bool) -> Option<Vec<u8>> {
        Some(unhex(match step {
            ProbeStep::TestUnitReady => "",
            ProbeStep::Inquiry => TGTD_STD_INQUIRY,
            ProbeStep::Vpd(0x00) => TGTD_VPD00,
            ProbeStep::Vpd(0x80) => TGTD_VPD80,
            ProbeStep::Vpd(0x83) => TGTD_VPD83,
            ProbeStep::Vpd(0xb0) if thin => TGTD_VPDB0_THIN,
            ProbeStep::Vpd(0xb0) => TGTD_VPDB0,
            ProbeStep::Vpd(0xb1) => TGTD_VPDB1,
            ProbeStep::Vpd(0xb2) if thin => TGTD_VPDB2_THIN,
            ProbeStep::Vpd(0xb2) => TGTD_VPDB2,
            ProbeStep::ReadCapacity16 if four_k => TGTD_RC16_4K,
            ProbeStep::ReadCapacity16 if thin => TGTD_RC16_THIN,
            ProbeStep::ReadCapacity16 => TGTD_RC16,
            ProbeStep::ReadCapacity10 => TGTD_RC10,
            ProbeStep::ModeSense10 => return None, // tgtd 1.0.85 answers MODE SENSE(6) in the test
            ProbeStep::ModeSense6 => TGTD_MS6_CACHING,
            ProbeStep::Vpd(_) | ProbeStep::ReportLuns => return None,
        }))
    }

    fn sense(hexs: &str) -> SenseData {
        SenseData::parse(&unhex(hexs)).unwrap()
    }

    fn run(thin: bool, four_k: bool) -> (LunInfo, Vec<ProbeStep>) {
        let mut p = LunProber::new();
        let mut steps = vec![];
        let ua = sense("700006000000000a00000000290000000000");
        let invalid_opcode = sense("700005000000000a00000000200000000000");
        let mut first = true;
        while let Some(cmd) = p.next_command() {
            steps.push(cmd.step);
            assert!(steps.len() < 50, "probe loops: {steps:?}");
            if first {
                // tgtd's power-on unit attention on the first command.
                first = false;
                p.complete(ProbeResult::Failed {
                    status: ScsiStatus::CheckCondition,
                    sense: Some(&ua),
                })
                .unwrap();
                continue;
            }
            let r = match tgtd_answer(cmd.step, thin, four_k) {
                Some(d) if cmd.step == ProbeStep::TestUnitReady => {
                    assert!(d.is_empty());
                    p.complete(ProbeResult::Failed {
                        status: ScsiStatus::Good,
                        sense: None,
                    })
                }
                Some(d) => {
                    let n = d.len().min(cmd.alloc_len as usize);
                    p.complete(ProbeResult::Data(&d[..n]))
                }
                None => p.complete(ProbeResult::Failed {
                    status: ScsiStatus::CheckCondition,
                    sense: Some(&invalid_opcode),
                }),
            };
            r.unwrap();
        }
        (p.finish().unwrap(), steps)
    }

    #[test]
    fn probe_tgtd_plain_lun() {
        let (info, steps) = run(false, false);
        assert_eq!(steps[0], ProbeStep::TestUnitReady);
        assert_eq!(steps[1], ProbeStep::TestUnitReady);
        assert!(steps.contains(&ProbeStep::ModeSense6));
        assert_eq!(
            (info.vendor.as_str(), info.product.as_str()),
            ("IET", "VIRTUAL-DISK")
        );
        assert_eq!(info.block_size, 512);
        assert_eq!(info.num_blocks, 131_072);
        assert_eq!(info.capacity_sectors, 131_072);
        assert_eq!(info.size_bytes(), 64 << 20);
        assert_eq!(info.physical_block_exp, 3);
        assert_eq!(info.min_io_blocks, 8);
        assert_eq!(info.opt_io_blocks, 0);
        assert_eq!(info.max_transfer_bytes, DEFAULT_MAX_TRANSFER_BYTES);
        assert!(info.cdb16);
        assert_eq!(info.unmap, None);
        assert!(!info.write_same.ws16_unmap);
        assert!(!info.read_only);
        assert!(info.write_cache);
        assert!(info.fua);
        assert_eq!(info.serial, "beaf11");
        assert_eq!(&info.virtio_id()[..7], b"beaf11\0");
    }

    #[test]
    fn probe_tgtd_thin_lun() {
        let (info, _) = run(true, false);
        let u = info.unmap.expect("UNMAP usable on thin LUN");
        assert_eq!(u.max_blocks, u32::MAX);
        assert_eq!(u.max_descriptors, UNMAP_MAX_DESCRIPTORS as u32);
        assert_eq!(u.granularity, 1);
        assert!(info.write_same.ws16_unmap && info.write_same.ws10_unmap);
        assert_eq!(info.write_same.max_blocks, DEFAULT_MAX_WRITE_SAME_BLOCKS);
        assert!(!info.write_same.max_reported);
        assert!(info.unmap_reads_zeros);
    }

    #[test]
    fn probe_tgtd_4k_lun() {
        let (info, _) = run(false, true);
        assert_eq!(info.block_size, 4096);
        assert_eq!(info.num_blocks, 16384);
        assert_eq!(info.capacity_sectors, 16384 * 8);
        assert_eq!(info.min_io_blocks, 1);
        assert_eq!(info.max_transfer_bytes, DEFAULT_MAX_TRANSFER_BYTES);
    }

    #[test]
    fn probe_minimal_target_falls_back() {
        // A target that knows only INQUIRY, READ CAPACITY(10), TUR.
        let mut p = LunProber::new();
        let invalid = sense("700005000000000a00000000240000c00002");
        let mut steps = vec![];
        while let Some(cmd) = p.next_command() {
            steps.push(cmd.step);
            let res = match cmd.step {
                ProbeStep::TestUnitReady => ProbeResult::Failed {
                    status: ScsiStatus::Good,
                    sense: None,
                },
                ProbeStep::Inquiry => ProbeResult::Data(&[]),
                ProbeStep::ReadCapacity10 => ProbeResult::Data(&[]),
                _ => ProbeResult::Failed {
                    status: ScsiStatus::CheckCondition,
                    sense: Some(&invalid),
                },
            };
            let inq = unhex(TGTD_STD_INQUIRY);
            let rc10 = unhex("0000ffff00000200");
            let res = match (cmd.step, res) {
                (ProbeStep::Inquiry, _) => ProbeResult::Data(&inq),
                (ProbeStep::ReadCapacity10, _) => ProbeResult::Data(&rc10),
                (_, r) => r,
            };
            // Borrow of locals ends with complete().
            p.complete(res).unwrap();
        }
        assert_eq!(
            steps,
            vec![
                ProbeStep::TestUnitReady,
                ProbeStep::Inquiry,
                ProbeStep::Vpd(0),
                ProbeStep::ReadCapacity16,
                ProbeStep::ReadCapacity10,
                ProbeStep::ModeSense10,
                ProbeStep::ModeSense6,
            ]
        );
        let info = p.finish().unwrap();
        assert!(!info.cdb16);
        assert_eq!(info.num_blocks, 0x1_0000);
        assert_eq!(info.serial, "");
        assert!(
            info.write_cache,
            "unknown cache mode must assume write-back"
        );
        assert!(!info.read_only);
        assert_eq!(info.physical_block_exp, 0);
    }

    #[test]
    fn probe_retries_truncated_vpd_83() {
        let mut p = LunProber::new();
        p.complete(ProbeResult::Failed {
            status: ScsiStatus::Good,
            sense: None,
        })
        .unwrap();
        p.complete(ProbeResult::Data(&unhex(TGTD_STD_INQUIRY)))
            .unwrap();
        p.complete(ProbeResult::Data(&unhex("0000000183"))).unwrap();
        let cmd = p.next_command().unwrap();
        assert_eq!(cmd.step, ProbeStep::Vpd(0x83));
        assert_eq!(cmd.alloc_len, 0xff);
        // Pretend the target cut the page at 64 bytes although 0xff was asked
        // (it must then be reissued only if the page needs more than asked).
        let err = p
            .complete(ProbeResult::Data(&unhex(TGTD_VPD83_TRUNCATED)))
            .unwrap_err();
        assert!(matches!(
            err,
            DiskError::BadData {
                step: "INQUIRY VPD 0x83",
                ..
            }
        ));

        // With a small first allocation the prober re-asks with the announced size.
        let mut p = LunProber::new();
        p.current = Some((ProbeStep::Vpd(0x83), 64));
        p.complete(ProbeResult::Data(&unhex(TGTD_VPD83_TRUNCATED)))
            .unwrap();
        let cmd = p.next_command().unwrap();
        assert_eq!((cmd.step, cmd.alloc_len), (ProbeStep::Vpd(0x83), 76));
        assert_eq!(cmd.cdb.as_bytes(), &unhex("120183004c00")[..]);
    }

    #[test]
    fn probe_errors() {
        // Endless unit attentions give up.
        let mut p = LunProber::new();
        let ua = sense("700006000000000a000000002a0900000000");
        let mut n = 0;
        let err = loop {
            n += 1;
            if let Err(e) = p.complete(ProbeResult::Failed {
                status: ScsiStatus::CheckCondition,
                sense: Some(&ua),
            }) {
                break e;
            }
        };
        assert_eq!(n, PROBE_RETRIES + 1);
        assert!(
            err.to_string().contains("capacity data has changed"),
            "{err}"
        );

        // Not ready, medium not present: fatal.
        let mut p = LunProber::new();
        let nr = sense("700002000000000a000000003a0000000000");
        let err = p
            .complete(ProbeResult::Failed {
                status: ScsiStatus::CheckCondition,
                sense: Some(&nr),
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "TEST UNIT READY failed: status CHECK CONDITION (0x02), sense key NOT READY, asc/ascq 3a/00 (medium not present)"
        );

        // A controller LUN is refused right at INQUIRY.
        let mut p = LunProber::new();
        p.complete(ProbeResult::Failed {
            status: ScsiStatus::Good,
            sense: None,
        })
        .unwrap();
        let err = p
            .complete(ProbeResult::Data(&unhex(TGTD_STD_INQUIRY_LUN0)))
            .unwrap_err();
        assert_eq!(
            err,
            DiskError::NotADisk {
                device_type: 0x0c,
                name: "storage array controller"
            }
        );
        assert!(p.finish().is_err());

        // Garbage INQUIRY.
        let mut p = LunProber::new();
        p.current = Some((ProbeStep::Inquiry, 0xff));
        assert!(matches!(
            p.complete(ProbeResult::Data(&[0; 10])),
            Err(DiskError::BadData { .. })
        ));
    }

    #[test]
    fn report_luns_check() {
        // tgtd with LUNs 0..=4 (see luns.rs), asked for LUN 1: listed, the
        // probe goes on with TEST UNIT READY on the LUN itself.
        const TGTD_LUNS: &str = "000000280000000000000000000000000001000000000000000200000000000000030000000000000004000000000000";
        let mut p = LunProber::checking_lun(Lun::from_number(1).unwrap());
        let cmd = p.next_command().unwrap();
        assert_eq!(cmd.step, ProbeStep::ReportLuns);
        assert!(cmd.to_lun0);
        assert_eq!(cmd.cdb.as_bytes()[0], 0xa0);
        p.complete(ProbeResult::Data(&unhex(TGTD_LUNS))).unwrap();
        let cmd = p.next_command().unwrap();
        assert_eq!(cmd.step, ProbeStep::TestUnitReady);
        assert!(!cmd.to_lun0);

        // LUN 7 is not there.
        let mut p = LunProber::checking_lun(Lun::from_number(7).unwrap());
        let err = p
            .complete(ProbeResult::Data(&unhex(TGTD_LUNS)))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "has no LUN 7 (it reports LUNs 0, 1, 2, 3, 4)"
        );

        // A cut list is asked for again, whole.
        let mut p = LunProber::checking_lun(Lun::from_number(4).unwrap());
        p.current = Some((ProbeStep::ReportLuns, 16));
        p.complete(ProbeResult::Data(&unhex(TGTD_LUNS)[..16]))
            .unwrap();
        assert_eq!(p.next_command().unwrap().alloc_len, 48);
        p.complete(ProbeResult::Data(&unhex(TGTD_LUNS))).unwrap();
        assert_eq!(p.next_command().unwrap().step, ProbeStep::TestUnitReady);

        // Flat addressing of the same number counts as listed.
        let mut p = LunProber::checking_lun(Lun([0x40, 0x03, 0, 0, 0, 0, 0, 0]));
        p.complete(ProbeResult::Data(&unhex(TGTD_LUNS))).unwrap();

        // A target that refuses REPORT LUNS is probed anyway.
        let mut p = LunProber::checking_lun(Lun::from_number(9).unwrap());
        p.complete(ProbeResult::Failed {
            status: ScsiStatus::CheckCondition,
            sense: Some(&sense("700005000000000a00000000200000000000")),
        })
        .unwrap();
        assert_eq!(p.next_command().unwrap().step, ProbeStep::TestUnitReady);

        assert_eq!(reported_list(&[]), "no LUNs");
        assert_eq!(reported_list(&[Lun::from_number(0).unwrap()]), "LUN 0");
        let many: Vec<Lun> = (0..20).map(|n| Lun::from_number(n).unwrap()).collect();
        assert!(reported_list(&many).ends_with("15, ... (20 in all)"));
    }

    fn base_probe() -> LunProbe {
        LunProbe {
            inquiry: Some(StandardInquiry::parse(&unhex(TGTD_STD_INQUIRY)).unwrap()),
            capacity: Some(
                ReadCapacity16::parse(&unhex(TGTD_RC16_THIN))
                    .unwrap()
                    .into(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn from_probe_limits_and_serial() {
        let mut p = base_probe();
        let mut bl = BlockLimits::parse(&unhex(TGTD_VPDB0_THIN)).unwrap();
        bl.max_transfer_len = 2048;
        bl.optimal_transfer_len = 256;
        bl.optimal_transfer_granularity = 16;
        bl.max_unmap_lba_count = 0x1000;
        bl.max_unmap_descriptors = 32;
        bl.optimal_unmap_granularity = 8;
        bl.unmap_granularity_alignment = Some(0);
        bl.max_write_same_len = 0x8000;
        p.block_limits = Some(bl);
        // Without VPD 0xB2 no UNMAP, even with LBPME.
        let i = LunInfo::from_probe(&p).unwrap();
        assert_eq!(i.unmap, None);
        assert_eq!(i.max_transfer_bytes, 2048 * 512);
        assert_eq!((i.min_io_blocks, i.opt_io_blocks), (16, 256));
        assert!(i.write_same.max_reported);
        assert_eq!(i.write_same.max_blocks, 0x8000);
        // Serial from the best designator (NAA, hex) when VPD 0x80 is absent.
        p.device_id = Some(DeviceIdentification::parse(&unhex(TGTD_VPD83)).unwrap());
        assert_eq!(LunInfo::from_probe(&p).unwrap().serial, "3000000100000001");
        p.provisioning = Some(LogicalBlockProvisioning::parse(&unhex(TGTD_VPDB2_THIN)).unwrap());
        let i = LunInfo::from_probe(&p).unwrap();
        assert_eq!(
            i.unmap,
            Some(UnmapLimits {
                max_blocks: 0x1000,
                max_descriptors: 32,
                granularity: 8,
                alignment: Some(0)
            })
        );
        // A long VPD 0x80 serial keeps its last 20 characters.
        p.unit_serial = Some(UnitSerial("ABCDEFGHIJ0123456789XYZ".into()));
        assert_eq!(
            LunInfo::from_probe(&p).unwrap().serial,
            "DEFGHIJ0123456789XYZ"
        );
        // Read-only LUN via MODE SENSE WP, write cache off.
        p.mode = Some(
            ModeSense::parse10(&unhex(
                "001a 00 80 00 00 0000 0812 01000000000000000000000000000000 0000",
            ))
            .unwrap(),
        );
        let i = LunInfo::from_probe(&p).unwrap();
        assert!(i.read_only && !i.write_cache && !i.fua);
    }

    #[test]
    fn from_probe_rejects_bad_geometry() {
        let mut p = base_probe();
        p.capacity = Some(
            ReadCapacity10 {
                last_lba: 10,
                block_len: 520,
            }
            .into(),
        );
        assert_eq!(
            LunInfo::from_probe(&p).unwrap_err(),
            DiskError::UnsupportedBlockSize(520)
        );
        p.capacity = Some(
            ReadCapacity10 {
                last_lba: 10,
                block_len: 256,
            }
            .into(),
        );
        assert!(LunInfo::from_probe(&p).is_err());
        p.capacity = Some(Capacity {
            last_lba: u64::MAX,
            block_len: 512,
            details: None,
        });
        assert!(matches!(
            LunInfo::from_probe(&p),
            Err(DiskError::CapacityOverflow { .. })
        ));
        p.capacity = Some(Capacity {
            last_lba: u64::MAX / 256,
            block_len: 4096,
            details: None,
        });
        assert!(matches!(
            LunInfo::from_probe(&p),
            Err(DiskError::CapacityOverflow { .. })
        ));
        let mut rc = ReadCapacity16::parse(&unhex(TGTD_RC16)).unwrap();
        rc.prot_en = true;
        rc.p_type = 1;
        p.capacity = Some(rc.into());
        assert_eq!(
            LunInfo::from_probe(&p).unwrap_err(),
            DiskError::UnsupportedProtection(2)
        );
        rc.p_type = 0;
        p.capacity = Some(rc.into());
        assert_eq!(LunInfo::from_probe(&p).unwrap().protection_type, Some(1));
        p.capacity = None;
        assert!(matches!(
            LunInfo::from_probe(&p),
            Err(DiskError::Incomplete(_))
        ));
        // Without 16-byte CDBs the transfer is capped at 65535 blocks.
        let mut p = base_probe();
        p.capacity = Some(ReadCapacity10::parse(&unhex(TGTD_RC10)).unwrap().into());
        let mut bl = BlockLimits::parse(&unhex(TGTD_VPDB0)).unwrap();
        bl.max_transfer_len = 1 << 20;
        p.block_limits = Some(bl);
        assert_eq!(
            LunInfo::from_probe(&p).unwrap().max_transfer_bytes,
            65535 * 512
        );
    }

    #[test]
    fn split_at_runs_block_aligned() {
        // 128 KiB as 32 x 4 KiB runs at LBA 8 (512-byte blocks): one command per run.
        let runs = [4096u64; 32];
        let c = split_at_runs(4096, 128 << 10, &runs, 512, 512 << 10, 1024).unwrap();
        assert_eq!(c.len(), 32);
        for (i, ch) in c.iter().enumerate() {
            assert_eq!(ch.offset, i as u64 * 4096);
            assert_eq!(ch.lba, 8 + i as u64 * 8);
            assert_eq!((ch.blocks, ch.len), (8, 4096));
        }
        // Uneven runs, the second longer than the transfer limit: split again
        // inside the run, never across runs.
        let c = split_at_runs(0, 3 * 4096, &[4096, 8192], 4096, 4096, 1024).unwrap();
        let got: Vec<_> = c.iter().map(|c| (c.lba, c.offset, c.len)).collect();
        assert_eq!(got, [(0, 0, 4096), (1, 4096, 4096), (2, 8192, 4096)]);
    }

    #[test]
    fn split_at_runs_falls_back() {
        // One run: contiguous, nothing to split.
        assert!(split_at_runs(0, 8192, &[8192], 512, 1 << 20, 1024).is_none());
        assert!(split_at_runs(0, 0, &[], 512, 1 << 20, 1024).is_none());
        // A run that is not a whole number of blocks (a 4 KiB block LUN with
        // 2 KiB pieces; 512-byte blocks with a 1000-byte piece): bounce.
        assert!(split_at_runs(0, 8192, &[2048; 4], 4096, 1 << 20, 1024).is_none());
        assert!(split_at_runs(0, 1536, &[1000, 536], 512, 1 << 20, 1024).is_none());
        // The same pieces on a 512-byte LUN split fine.
        assert_eq!(
            split_at_runs(0, 8192, &[2048; 4], 512, 1 << 20, 1024).map(|c| c.len()),
            Some(4)
        );
        // Runs that do not cover the request, an empty run, overflow.
        assert!(split_at_runs(0, 8192, &[4096, 2048], 512, 1 << 20, 1024).is_none());
        assert!(split_at_runs(0, 4096, &[4096, 0], 512, 1 << 20, 1024).is_none());
        assert!(split_at_runs(0, 0, &[u64::MAX - 511, 1024], 512, 1 << 20, 1024).is_none());
        // More commands than allowed.
        assert!(split_at_runs(0, 4 * 512, &[512; 4], 512, 1 << 20, 3).is_none());
        assert!(split_at_runs(0, 4 * 512, &[512; 4], 512, 1 << 20, 4).is_some());
        // Bad geometry.
        assert!(split_at_runs(0, 1024, &[512, 512], 0, 1 << 20, 1024).is_none());
        assert!(split_at_runs(0, 1024, &[512, 512], 512, 256, 1024).is_none());
        // A range off the end of the LBA space.
        assert!(split_at_runs(u64::MAX - 511, 1024, &[512, 512], 512, 4096, 1024).is_none());
    }

    #[test]
    fn splitting() {
        let chunks: Vec<_> = split_range(4096, 10 * 4096, 4096, 16384).unwrap().collect();
        assert_eq!(chunks.len(), 3);
        assert_eq!(
            chunks[0],
            Chunk {
                lba: 1,
                blocks: 4,
                offset: 0,
                len: 16384
            }
        );
        assert_eq!(chunks[2].lba, 9);
        assert_eq!(chunks[2].blocks, 2);
        assert_eq!(chunks[2].offset, 8 * 4096);
        assert_eq!(
            chunks.iter().map(|c| u64::from(c.len)).sum::<u64>(),
            10 * 4096
        );
        // Max transfer not a block multiple rounds down.
        let c: Vec<_> = split_range(0, 3 * 512, 512, 1000).unwrap().collect();
        assert_eq!(c.len(), 3);
        assert_eq!(split_range(0, 0, 512, 4096).unwrap().count(), 0);
        assert_eq!(
            split_range(0, 1 << 20, 512, 1 << 16).unwrap().size_hint(),
            (16, Some(16))
        );
        assert!(matches!(
            split_range(100, 512, 512, 4096),
            Err(DiskError::Unaligned { .. })
        ));
        assert!(matches!(
            split_range(0, 100, 512, 4096),
            Err(DiskError::Unaligned { .. })
        ));
        assert!(matches!(
            split_range(0, 512, 512, 256),
            Err(DiskError::BadSplit { .. })
        ));
        assert!(matches!(
            split_range(0, 512, 0, 256),
            Err(DiskError::BadSplit { .. })
        ));
        assert!(split_range(u64::MAX - 511, 1024, 512, 4096).is_err());
        // A single huge request with a u32::MAX transfer limit stays within u32 lengths.
        let c: Vec<_> = split_range(0, 1 << 33, 512, u32::MAX).unwrap().collect();
        assert!(c.iter().all(|c| c.len % 512 == 0));
        assert_eq!(c.iter().map(|c| u64::from(c.len)).sum::<u64>(), 1 << 33);

        let (info, _) = run(false, false);
        assert_eq!(info.split(0, 64 << 20).unwrap().count(), 64);
        assert!(matches!(
            info.split(512, 64 << 20),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(info.split(u64::MAX, 2).is_err());
    }
}
