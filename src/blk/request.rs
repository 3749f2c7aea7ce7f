//! Parsing and validation of virtio-blk requests (virtio 1.2, section 5.2.6).
//!
//! A descriptor chain is read as what it is on the wire: a device-readable byte
//! stream (16-byte header, then data for writes, discard and write-zeroes)
//! followed by a device-writable byte stream (data for reads and GET_ID, then
//! the status byte as its very last byte). How the guest splits those streams
//! into descriptors does not matter (VIRTIO_F_ANY_LAYOUT is implied by
//! VERSION_1). Everything the guest wrote is checked before it is used: the
//! guest is not trusted.

use std::sync::Arc;

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::buffer::{read_words_in_region, GuestBuffers, GuestMemoryMmap};
use super::target::{BlockOp, BlockRequest, SectorRange, SharedCapacity};

/// VIRTIO_BLK_T_IN: read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// VIRTIO_BLK_T_OUT: write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// VIRTIO_BLK_T_FLUSH.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// VIRTIO_BLK_T_GET_ID: device serial, up to 20 bytes.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// VIRTIO_BLK_T_DISCARD.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// VIRTIO_BLK_T_WRITE_ZEROES.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the request header (type, ioprio, sector).
pub const HEADER_LEN: u64 = 16;
/// Length of one discard/write-zeroes range descriptor.
const RANGE_LEN: u64 = 16;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Flag bit in a write-zeroes range: the device may deallocate.
const RANGE_FLAG_UNMAP: u32 = 1;

/// What the device allows: the request checks use these.
#[derive(Clone, Debug)]
pub struct RequestLimits {
    /// Capacity in 512-byte sectors (changes when the target's does).
    pub capacity_sectors: SharedCapacity,
    /// Largest number of data descriptors (SEG_MAX).
    pub seg_max: u32,
    /// Writes are refused.
    pub read_only: bool,
    /// Discard limits (None: unsupported).
    pub discard: Option<(u32, u32)>,
    /// Write-zeroes limits (None: unsupported) as (max sectors, max segments).
    pub write_zeroes: Option<(u32, u32)>,
}

/// Why a request was refused. The `Display` text goes into a (rate-limited) log line.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    /// The chain has no device-writable byte for the status: nothing can be reported.
    #[error("descriptor chain has no writable status byte")]
    NoStatus,
    /// The chain did not end (loop or longer than the queue).
    #[error("descriptor chain does not terminate (loop or longer than the queue)")]
    Unterminated,
    /// A descriptor points outside guest memory.
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    BadAddress {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// The header is shorter than 16 bytes.
    #[error("request header is {0} bytes, expected 16")]
    ShortHeader(u64),
    /// Too many descriptors.
    #[error("{got} data segments exceed SEG_MAX {max}")]
    TooManySegments {
        /// Segments in the chain.
        got: u32,
        /// The limit.
        max: u32,
    },
    /// Data in the wrong direction for the request type.
    #[error("request type {ty} carries {bytes} unexpected {dir} bytes")]
    WrongDirection {
        /// Request type.
        ty: u32,
        /// "device-readable" or "device-writable".
        dir: &'static str,
        /// How many.
        bytes: u64,
    },
    /// Data length not a multiple of 512.
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// Range past the end of the device.
    #[error("sectors {sector}+{count} are past the capacity of {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
        /// Capacity.
        capacity: u64,
    },
    /// Write to a read-only device.
    #[error("write request to a read-only device")]
    ReadOnly,
    /// Discard/write-zeroes payload malformed or beyond limits.
    #[error("bad discard/write-zeroes payload: {0}")]
    BadRanges(String),
    /// Unknown or unsupported request type (or flag).
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl RequestError {
    /// The status byte reported to the guest.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// What a valid request asks for. Its buffers borrow the guest memory
/// snapshot it was parsed from.
#[derive(Debug)]
pub enum Request<'m> {
    /// Goes to the target.
    Block(BlockRequest<GuestBuffers<'m>>),
    /// Answered by the device itself: the 20-byte serial goes into `data`.
    GetId {
        /// Where the serial is written.
        data: GuestBuffers<'m>,
    },
}

/// A parsed chain: where to report, and what was asked (or why it was refused).
#[derive(Debug)]
pub struct ParsedRequest<'m> {
    /// Head descriptor index, for the used ring.
    pub head_index: u16,
    /// Guest address of the status byte; None if the chain has none (it is then
    /// returned with length 0 and no status).
    pub status_addr: Option<GuestAddress>,
    /// Bytes the device writes on success (data-in plus the status byte).
    pub used_len: u32,
    /// Guest ranges the device writes data into (reads, GET_ID), without the
    /// status byte: marked dirty for live migration once the data is in.
    pub data_in_ranges: GuestRanges,
    /// The request, or why it is refused.
    pub request: Result<Request<'m>, RequestError>,
}

/// Guest (address, length) ranges; requests have one or two, kept inline.
pub type GuestRanges = smallvec::SmallVec<[(GuestAddress, u32); 2]>;

/// One side (readable or writable) of a chain as (address, length) pieces.
#[derive(Default)]
struct Stream {
    parts: smallvec::SmallVec<[(GuestAddress, u32); 4]>,
    len: u64,
}

impl Stream {
    fn push(&mut self, addr: GuestAddress, len: u32) {
        if len > 0 {
            self.parts.push((addr, len));
            self.len += len as u64;
        }
    }

    /// The first `len` bytes of the stream as guest ranges.
    fn head_ranges(&self, len: u64) -> GuestRanges {
        let mut out = GuestRanges::new();
        let mut left = len;
        for &(addr, plen) in &self.parts {
            if left == 0 {
                break;
            }
            let take = u64::from(plen).min(left);
            out.push((addr, take as u32));
            left -= take;
        }
        out
    }

    /// Buffers over `offset..offset+len` of the stream.
    fn buffers<'m>(
        &self,
        mem: &'m Arc<GuestMemoryMmap>,
        offset: u64,
        len: u64,
    ) -> Result<GuestBuffers<'m>, RequestError> {
        let mut out = GuestBuffers::new(mem);
        let mut skip = offset;
        let mut left = len;
        for &(addr, plen) in &self.parts {
            if left == 0 {
                break;
            }
            let plen = plen as u64;
            if skip >= plen {
                skip -= plen;
                continue;
            }
            let take = (plen - skip).min(left);
            let start = addr.unchecked_add(skip);
            out.push_guest(start, take as u32)
                .map_err(|_| RequestError::BadAddress {
                    addr: start.0,
                    len: take as u32,
                })?;
            left -= take;
            skip = 0;
        }
        Ok(out)
    }

    /// Copies `dst.len()` bytes starting at `offset` out of guest memory.
    fn read(&self, mem: &GuestMemoryMmap, offset: u64, dst: &mut [u8]) -> Result<(), RequestError> {
        let mut skip = offset;
        let mut done = 0usize;
        for &(addr, plen) in &self.parts {
            if done == dst.len() {
                break;
            }
            let plen = plen as u64;
            if skip >= plen {
                skip -= plen;
                continue;
            }
            let take = ((plen - skip) as usize).min(dst.len() - done);
            let start = addr.unchecked_add(skip);
            mem.read_slice(&mut dst[done..done + take], start)
                .map_err(|_| RequestError::BadAddress {
                    addr: start.0,
                    len: take as u32,
                })?;
            done += take;
            skip = 0;
        }
        if done == dst.len() {
            Ok(())
        } else {
            Err(RequestError::ShortHeader(done as u64))
        }
    }
}

/// Parses one descriptor chain popped from a virtqueue: `head_index` and
/// its descriptors in order (a chain cut short by a loop or a bad index ends
/// with a descriptor that still says NEXT, and is refused).
pub fn parse_request<'m, I>(
    head_index: u16,
    chain: I,
    mem: &'m Arc<GuestMemoryMmap>,
    limits: &RequestLimits,
) -> ParsedRequest<'m>
where
    I: IntoIterator<Item = Descriptor>,
{
    let mut readable = Stream::default();
    let mut writable = Stream::default();
    let mut descriptors = 0u32;
    let mut last_has_next = false;
    let mut order_error = false;
    for desc in chain {
        descriptors += 1;
        last_has_next = desc.has_next();
        if desc.is_write_only() {
            writable.push(desc.addr(), desc.len());
        } else {
            if !writable.parts.is_empty() {
                order_error = true;
            }
            readable.push(desc.addr(), desc.len());
        }
    }

    // The status byte is the last byte of the writable stream.
    let status_addr = writable.parts.last().and_then(|&(addr, len)| {
        let a = addr.checked_add(len as u64 - 1)?;
        // One byte: a region lookup, not check_range's walk over slices.
        mem.address_in_range(a).then_some(a)
    });
    let fail = |e: RequestError, status_addr: Option<GuestAddress>| ParsedRequest {
        head_index,
        status_addr,
        used_len: if status_addr.is_some() { 1 } else { 0 },
        data_in_ranges: GuestRanges::new(),
        request: Err(e),
    };
    if last_has_next {
        // A loop or a chain longer than the queue: nothing in it is trustworthy.
        return fail(RequestError::Unterminated, None);
    }
    let Some(status) = status_addr else {
        return fail(RequestError::NoStatus, None);
    };
    if order_error {
        return fail(RequestError::ReadableAfterWritable, Some(status));
    }
    let data_descriptors = descriptors.saturating_sub(2);
    if data_descriptors > limits.seg_max {
        return fail(
            RequestError::TooManySegments {
                got: data_descriptors,
                max: limits.seg_max,
            },
            Some(status),
        );
    }
    if readable.len < HEADER_LEN {
        return fail(RequestError::ShortHeader(readable.len), Some(status));
    }
    // The header: type (le32), reserved/ioprio (le32), sector (le64).
    let fast = match readable.parts.first() {
        Some(&(addr, len)) if len as u64 >= HEADER_LEN => read_words_in_region(mem, addr),
        _ => None,
    };
    let (ty, sector) = match fast {
        Some([first, sector]) => (first as u32, sector),
        None => {
            let mut header = [0u8; HEADER_LEN as usize];
            if let Err(e) = readable.read(mem, 0, &mut header) {
                return fail(e, Some(status));
            }
            let ty = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let sector = u64::from_le_bytes([
                header[8], header[9], header[10], header[11], header[12], header[13], header[14],
                header[15],
            ]);
            (ty, sector)
        }
    };
    let data_out = readable.len - HEADER_LEN;
    let data_in = writable.len - 1;

    match parse_body(
        ty, sector, &readable, &writable, data_out, data_in, mem, limits,
    ) {
        Ok(request) => {
            let data_in_len = match &request {
                Request::Block(b) if b.op == BlockOp::Read => data_in as u32,
                Request::GetId { data } => data.len().min(ID_BYTES as u64) as u32,
                _ => 0,
            };
            ParsedRequest {
                head_index,
                status_addr: Some(status),
                used_len: 1 + data_in_len,
                data_in_ranges: writable.head_ranges(u64::from(data_in_len)),
                request: Ok(request),
            }
        }
        Err(e) => fail(e, Some(status)),
    }
}

#[allow(clippy::too_many_arguments)]
fn parse_body<'m>(
    ty: u32,
    sector: u64,
    readable: &Stream,
    writable: &Stream,
    data_out: u64,
    data_in: u64,
    mem: &'m Arc<GuestMemoryMmap>,
    limits: &RequestLimits,
) -> Result<Request<'m>, RequestError> {
    let no_out = |bytes: u64| -> Result<(), RequestError> {
        if bytes != 0 {
            return Err(RequestError::WrongDirection {
                ty,
                dir: "device-readable",
                bytes,
            });
        }
        Ok(())
    };
    let no_in = |bytes: u64| -> Result<(), RequestError> {
        if bytes != 0 {
            return Err(RequestError::WrongDirection {
                ty,
                dir: "device-writable",
                bytes,
            });
        }
        Ok(())
    };
    let check_range = |sector: u64, bytes: u64| -> Result<(), RequestError> {
        if !bytes.is_multiple_of(512) {
            return Err(RequestError::UnalignedLength(bytes));
        }
        let count = bytes / 512;
        let capacity = limits.capacity_sectors.get();
        match sector.checked_add(count) {
            Some(end) if end <= capacity => Ok(()),
            _ => Err(RequestError::OutOfRange {
                sector,
                count,
                capacity,
            }),
        }
    };
    match ty {
        VIRTIO_BLK_T_IN => {
            no_out(data_out)?;
            check_range(sector, data_in)?;
            Ok(Request::Block(BlockRequest {
                op: BlockOp::Read,
                sector,
                data: writable.buffers(mem, 0, data_in)?,
                ranges: Vec::new(),
            }))
        }
        VIRTIO_BLK_T_OUT => {
            no_in(data_in)?;
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            check_range(sector, data_out)?;
            Ok(Request::Block(BlockRequest {
                op: BlockOp::Write { fua: false },
                sector,
                data: readable.buffers(mem, HEADER_LEN, data_out)?,
                ranges: Vec::new(),
            }))
        }
        VIRTIO_BLK_T_FLUSH => {
            // Linux sends no data with a flush; tolerate none either way.
            no_out(data_out)?;
            no_in(data_in)?;
            Ok(Request::Block(BlockRequest {
                op: BlockOp::Flush,
                sector: 0,
                data: GuestBuffers::new(mem),
                ranges: Vec::new(),
            }))
        }
        VIRTIO_BLK_T_GET_ID => {
            no_out(data_out)?;
            Ok(Request::GetId {
                data: writable.buffers(mem, 0, data_in.min(ID_BYTES as u64))?,
            })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let is_discard = ty == VIRTIO_BLK_T_DISCARD;
            let Some((max_sectors, max_segments)) = (if is_discard {
                limits.discard
            } else {
                limits.write_zeroes
            }) else {
                return Err(RequestError::Unsupported(ty));
            };
            no_in(data_in)?;
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            if data_out == 0 || !data_out.is_multiple_of(RANGE_LEN) {
                return Err(RequestError::BadRanges(format!(
                    "payload of {data_out} bytes is not a non-empty multiple of 16"
                )));
            }
            let count = data_out / RANGE_LEN;
            if count > max_segments as u64 {
                return Err(RequestError::BadRanges(format!(
                    "{count} ranges exceed the limit of {max_segments}"
                )));
            }
            let mut ranges = Vec::with_capacity(count as usize);
            let mut unmap_all = true;
            for i in 0..count {
                let mut raw = [0u8; RANGE_LEN as usize];
                readable.read(mem, HEADER_LEN + i * RANGE_LEN, &mut raw)?;
                let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
                let num = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
                let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
                // Discard must not carry the unmap flag; reserved bits are unsupported.
                let allowed = if is_discard { 0 } else { RANGE_FLAG_UNMAP };
                if flags & !allowed != 0 {
                    return Err(RequestError::Unsupported(ty));
                }
                unmap_all &= flags & RANGE_FLAG_UNMAP != 0;
                if num > max_sectors {
                    return Err(RequestError::BadRanges(format!(
                        "range of {num} sectors exceeds the limit of {max_sectors}"
                    )));
                }
                check_range(sector, num as u64 * 512)?;
                ranges.push(SectorRange {
                    sector,
                    num_sectors: num,
                });
            }
            Ok(Request::Block(BlockRequest {
                op: if is_discard {
                    BlockOp::Discard
                } else {
                    BlockOp::WriteZeroes { unmap: unmap_all }
                },
                sector: 0,
                data: GuestBuffers::new(mem),
                ranges,
            }))
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::GuestAddress;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn mem() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap())
    }

    fn limits() -> RequestLimits {
        RequestLimits {
            capacity_sectors: SharedCapacity::new(2048),
            seg_max: 8,
            read_only: false,
            discard: Some((1024, 4)),
            write_zeroes: Some((1024, 4)),
        }
    }

    fn header(m: &GuestMemoryMmap, at: u64, ty: u32, sector: u64) {
        m.write_obj(ty, GuestAddress(at)).unwrap();
        m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        m.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    /// Builds a chain of (addr, len, flags) descriptors (NEXT is set automatically)
    /// and parses it.
    fn parse<'m>(
        m: &'m Arc<GuestMemoryMmap>,
        descs: &[(u64, u32, u16)],
        l: &RequestLimits,
    ) -> ParsedRequest<'m> {
        let vq = MockSplitQueue::new(&**m, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = if i + 1 < descs.len() { F_NEXT } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(
                    addr,
                    len,
                    flags | next,
                    (i + 1) as u16,
                ))
            })
            .collect();
        vq.add_desc_chains(&raw, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(&**m).unwrap().next().unwrap();
        parse_request(chain.head_index(), chain, m, l)
    }

    #[test]
    fn read_request_with_split_data() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 8);
        let p = parse(
            &m,
            &[
                (0x1000, 16, 0),
                (0x2000, 512, F_WRITE),
                (0x3000, 512, F_WRITE),
                (0x4000, 1, F_WRITE),
            ],
            &limits(),
        );
        assert_eq!(p.status_addr, Some(GuestAddress(0x4000)));
        assert_eq!(p.used_len, 1025);
        match p.request.unwrap() {
            Request::Block(b) => {
                assert_eq!(b.op, BlockOp::Read);
                assert_eq!(b.sector, 8);
                assert_eq!(b.data.len(), 1024);
            }
            _ => panic!("not a block request"),
        }
    }

    #[test]
    fn header_and_data_in_one_descriptor_and_status_inside_data() {
        // ANY_LAYOUT: header+data in one readable descriptor, status alone.
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let p = parse(
            &m,
            &[(0x1000, 16 + 1024, 0), (0x5000, 1, F_WRITE)],
            &limits(),
        );
        match p.request.unwrap() {
            Request::Block(b) => {
                assert_eq!(b.op, BlockOp::Write { fua: false });
                assert_eq!(b.data.len(), 1024);
            }
            _ => panic!(),
        }
        // Read with data and status in one writable descriptor.
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let p = parse(&m, &[(0x1000, 16, 0), (0x6000, 513, F_WRITE)], &limits());
        assert_eq!(p.status_addr, Some(GuestAddress(0x6000 + 512)));
        assert!(p.request.is_ok());
    }

    #[test]
    fn hostile_chains() {
        let m = mem();
        let l = limits();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        // No writable status byte at all: dropped, nothing to report.
        let p = parse(&m, &[(0x1000, 16, 0), (0x2000, 512, 0)], &l);
        assert_eq!(p.request.unwrap_err(), RequestError::NoStatus);
        assert_eq!(p.status_addr, None);
        assert_eq!(p.used_len, 0);
        // Status outside guest memory: dropped.
        let p = parse(&m, &[(0x1000, 16, 0), (0x200000, 1, F_WRITE)], &l);
        assert_eq!(p.request.unwrap_err(), RequestError::NoStatus);
        // Short header.
        let p = parse(&m, &[(0x1000, 8, 0), (0x4000, 1, F_WRITE)], &l);
        assert_eq!(p.request.unwrap_err(), RequestError::ShortHeader(8));
        // Readable after writable.
        let p = parse(
            &m,
            &[
                (0x1000, 16, 0),
                (0x2000, 512, F_WRITE),
                (0x3000, 16, 0),
                (0x4000, 1, F_WRITE),
            ],
            &l,
        );
        assert_eq!(p.request.unwrap_err(), RequestError::ReadableAfterWritable);
        // Read with readable data (wrong direction).
        let p = parse(&m, &[(0x1000, 16 + 512, 0), (0x4000, 1, F_WRITE)], &l);
        assert!(matches!(
            p.request.unwrap_err(),
            RequestError::WrongDirection { .. }
        ));
        assert_eq!(p.status_addr, Some(GuestAddress(0x4000)));
        // Data outside guest memory.
        let p = parse(
            &m,
            &[
                (0x1000, 16, 0),
                (0xFFE00, 0x1000, F_WRITE),
                (0x4000, 1, F_WRITE),
            ],
            &l,
        );
        assert!(matches!(
            p.request.unwrap_err(),
            RequestError::BadAddress { .. }
        ));
        // Length not a multiple of 512.
        let p = parse(
            &m,
            &[
                (0x1000, 16, 0),
                (0x2000, 100, F_WRITE),
                (0x4000, 1, F_WRITE),
            ],
            &l,
        );
        assert_eq!(p.request.unwrap_err(), RequestError::UnalignedLength(100));
        // Past capacity (and overflowing).
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 2047);
        let p = parse(
            &m,
            &[
                (0x1000, 16, 0),
                (0x2000, 1024, F_WRITE),
                (0x4000, 1, F_WRITE),
            ],
            &l,
        );
        assert!(matches!(
            p.request.unwrap_err(),
            RequestError::OutOfRange { .. }
        ));
        header(&m, 0x1000, VIRTIO_BLK_T_IN, u64::MAX);
        let p = parse(
            &m,
            &[
                (0x1000, 16, 0),
                (0x2000, 512, F_WRITE),
                (0x4000, 1, F_WRITE),
            ],
            &l,
        );
        assert!(matches!(
            p.request.unwrap_err(),
            RequestError::OutOfRange { .. }
        ));
        // Too many segments.
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let mut d = vec![(0x1000, 16, 0)];
        for i in 0..9u64 {
            d.push((0x10000 + i * 0x1000, 512, F_WRITE));
        }
        d.push((0x4000, 1, F_WRITE));
        let p = parse(&m, &d, &l);
        assert!(matches!(
            p.request.unwrap_err(),
            RequestError::TooManySegments { got: 9, max: 8 }
        ));
        // Unknown type.
        header(&m, 0x1000, 99, 0);
        let p = parse(&m, &[(0x1000, 16, 0), (0x4000, 1, F_WRITE)], &l);
        assert_eq!(
            p.request.as_ref().unwrap_err().status(),
            VIRTIO_BLK_S_UNSUPP
        );
        // Write to a read-only device.
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let ro = RequestLimits {
            read_only: true,
            ..limits()
        };
        let p = parse(&m, &[(0x1000, 16 + 512, 0), (0x4000, 1, F_WRITE)], &ro);
        assert_eq!(p.request.unwrap_err(), RequestError::ReadOnly);
    }

    #[test]
    fn descriptor_loop_is_dropped() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let vq = MockSplitQueue::new(&*m, 4);
        // 0 -> 1 -> 0 -> ... : a loop.
        let raw = [
            RawDescriptor::from(SplitDescriptor::new(0x1000, 16, F_NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x4000, 1, F_NEXT | F_WRITE, 0)),
        ];
        vq.add_desc_chains(&raw, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(&*m).unwrap().next().unwrap();
        let p = parse_request(chain.head_index(), chain, &m, &limits());
        assert_eq!(p.request.unwrap_err(), RequestError::Unterminated);
        assert_eq!(p.status_addr, None);
    }

    #[test]
    fn discard_and_write_zeroes() {
        let m = mem();
        let l = limits();
        let range = |at: u64, sector: u64, num: u32, flags: u32| {
            m.write_obj(sector, GuestAddress(at)).unwrap();
            m.write_obj(num, GuestAddress(at + 8)).unwrap();
            m.write_obj(flags, GuestAddress(at + 12)).unwrap();
        };
        header(&m, 0x1000, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        range(0x1010, 10, 20, 1);
        range(0x1020, 100, 8, 1);
        let p = parse(&m, &[(0x1000, 48, 0), (0x4000, 1, F_WRITE)], &l);
        match p.request.unwrap() {
            Request::Block(b) => {
                assert_eq!(b.op, BlockOp::WriteZeroes { unmap: true });
                assert_eq!(b.ranges.len(), 2);
                assert_eq!(
                    b.ranges[1],
                    SectorRange {
                        sector: 100,
                        num_sectors: 8
                    }
                );
            }
            _ => panic!(),
        }
        // Discard with the unmap flag: unsupported.
        header(&m, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
        let p = parse(&m, &[(0x1000, 32, 0), (0x4000, 1, F_WRITE)], &l);
        assert_eq!(
            p.request.unwrap_err(),
            RequestError::Unsupported(VIRTIO_BLK_T_DISCARD)
        );
        // Range past capacity.
        range(0x1010, 2040, 16, 0);
        let p = parse(&m, &[(0x1000, 32, 0), (0x4000, 1, F_WRITE)], &l);
        assert!(matches!(
            p.request.unwrap_err(),
            RequestError::OutOfRange { .. }
        ));
        // Payload not a multiple of 16.
        let p = parse(&m, &[(0x1000, 40, 0), (0x4000, 1, F_WRITE)], &l);
        assert!(matches!(p.request.unwrap_err(), RequestError::BadRanges(_)));
        // Too many ranges.
        let p = parse(&m, &[(0x1000, 16 + 5 * 16, 0), (0x4000, 1, F_WRITE)], &l);
        assert!(matches!(p.request.unwrap_err(), RequestError::BadRanges(_)));
        // Not offered: unsupported.
        let none = RequestLimits {
            discard: None,
            ..limits()
        };
        range(0x1010, 0, 8, 0);
        let p = parse(&m, &[(0x1000, 32, 0), (0x4000, 1, F_WRITE)], &none);
        assert_eq!(p.request.unwrap_err().status(), VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn get_id_and_flush() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
        let p = parse(
            &m,
            &[(0x1000, 16, 0), (0x2000, 20, F_WRITE), (0x4000, 1, F_WRITE)],
            &limits(),
        );
        assert_eq!(p.used_len, 21);
        assert!(matches!(p.request.unwrap(), Request::GetId { .. }));
        header(&m, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
        let p = parse(&m, &[(0x1000, 16, 0), (0x4000, 1, F_WRITE)], &limits());
        assert!(matches!(
            p.request.unwrap(),
            Request::Block(BlockRequest {
                op: BlockOp::Flush,
                ..
            })
        ));
    }
}
