//! RAM target (`mem:SIZE`): a sparse in-memory disk shared by all queues.
//!
//! Used by tests, the demo and the benchmark of the vhost layer alone. Storage
//! is allocated in 64 KiB chunks on first write, so a large, mostly unused disk
//! costs nothing; reads of unwritten chunks return zeroes. Chunks are spread
//! over shards, each with its own lock, so queues rarely meet.
//!
//! Without a store it is the null target (`null:SIZE`), QEMU null-co's
//! counterpart: reads return zeroes, writes are dropped.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::RawFd;
use std::sync::{Arc, RwLock};

use super::buffer::{GuestBuffers, IoBuffers};
use super::target::{
    BlockOp, BlockRequest, BlockStatus, Completion, DeviceInfo, QueueTarget, RangeOpLimits, Target,
    TargetError,
};

const CHUNK_SHIFT: u32 = 16;
const CHUNK: u64 = 1 << CHUNK_SHIFT;
const SHARDS: usize = 64;

type Chunk = Box<[u8]>;

/// Hashes a chunk index with one multiplication (Fibonacci hashing). The
/// default SipHash guards against keys chosen to collide; here a key is a
/// chunk number below the disk size, and SipHash cost more than the rest of
/// a 4 KiB read's bookkeeping.
#[derive(Default)]
struct ChunkHasher(u64);

impl Hasher for ChunkHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type ChunkMap = HashMap<u64, Chunk, BuildHasherDefault<ChunkHasher>>;

/// Sparse byte store in 64 KiB chunks.
struct SparseStore {
    shards: Vec<RwLock<ChunkMap>>,
}

impl SparseStore {
    fn new() -> Self {
        SparseStore {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(ChunkMap::default()))
                .collect(),
        }
    }

    fn shard(&self, chunk: u64) -> &RwLock<ChunkMap> {
        &self.shards[(chunk as usize) % SHARDS]
    }

    /// Calls `f(chunk_index, offset_in_chunk, offset_in_request, len)` for each
    /// chunk piece of `start..start+len`.
    fn pieces(start: u64, len: u64, mut f: impl FnMut(u64, usize, u64, usize)) {
        let mut pos = start;
        let end = start + len;
        while pos < end {
            let chunk = pos >> CHUNK_SHIFT;
            let off = (pos & (CHUNK - 1)) as usize;
            let n = ((CHUNK as usize) - off).min((end - pos) as usize);
            f(chunk, off, pos - start, n);
            pos += n as u64;
        }
    }

    fn read(&self, start: u64, len: u64, dst: &IoBuffers) {
        Self::pieces(start, len, |chunk, off, at, n| {
            // A poisoned lock means another thread panicked mid-copy; the bytes are
            // still plain memory, so keep serving rather than cascade the panic.
            let shard = self.shard(chunk).read().unwrap_or_else(|e| e.into_inner());
            match shard.get(&chunk) {
                Some(c) => {
                    dst.write_at(at, &c[off..off + n]);
                }
                None => {
                    dst.fill_zero(at, n as u64);
                }
            }
        });
    }

    fn write(&self, start: u64, len: u64, src: &IoBuffers) {
        Self::pieces(start, len, |chunk, off, at, n| {
            let mut shard = self.shard(chunk).write().unwrap_or_else(|e| e.into_inner());
            let c = shard
                .entry(chunk)
                .or_insert_with(|| vec![0u8; CHUNK as usize].into_boxed_slice());
            src.read_at(at, &mut c[off..off + n]);
        });
    }

    /// Zeroes a range, dropping chunks it covers entirely.
    fn zero(&self, start: u64, len: u64) {
        Self::pieces(start, len, |chunk, off, _at, n| {
            let mut shard = self.shard(chunk).write().unwrap_or_else(|e| e.into_inner());
            if n as u64 == CHUNK {
                shard.remove(&chunk);
            } else if let Some(c) = shard.get_mut(&chunk) {
                c[off..off + n].fill(0);
            }
        });
    }
}

/// The RAM target (`mem:SIZE`), or without storage the null target
/// (`null:SIZE`): reads return zeroes and writes are dropped, like QEMU's
/// `null-co` with `read-zeroes=on` (and Linux's null_blk), so a benchmark of
/// the vhost layer measures the layer and not a RAM store's locks and
/// lookups, and a deployment can check its plumbing without a disk.
pub struct MemTarget {
    info: DeviceInfo,
    /// None: the null target.
    store: Option<Arc<SparseStore>>,
}

impl MemTarget {
    /// A RAM disk of `size` bytes (rounded down to 512).
    pub fn new(size: u64, read_only: bool) -> Self {
        Self::build(size, read_only, true)
    }

    /// A null disk of `size` bytes (rounded down to 512).
    pub fn null(size: u64, read_only: bool) -> Self {
        Self::build(size, read_only, false)
    }

    fn build(size: u64, read_only: bool, stored: bool) -> Self {
        let mut info = DeviceInfo::simple(size);
        info.read_only = read_only;
        info.serial = if stored {
            b"vhost-iser-mem".to_vec()
        } else {
            b"vhost-iser-null".to_vec()
        };
        if !read_only {
            let limits = RangeOpLimits {
                max_sectors: u32::MAX / 512 * 512 / 512,
                max_segments: 64,
                alignment_sectors: 1,
            };
            info.discard = Some(limits);
            info.write_zeroes = Some(limits);
            info.write_zeroes_may_unmap = true;
        }
        MemTarget {
            info,
            store: stored.then(|| Arc::new(SparseStore::new())),
        }
    }

    /// Parses the part after `mem:`: a size like `1G`, `512M`, `4096`.
    pub fn from_spec(spec: &str, read_only: bool) -> Result<Self, TargetError> {
        Ok(Self::new(spec_size("mem", spec)?, read_only))
    }

    /// Parses the part after `null:`: a size like `1G`, `512M`, `4096`.
    pub fn null_from_spec(spec: &str, read_only: bool) -> Result<Self, TargetError> {
        Ok(Self::null(spec_size("null", spec)?, read_only))
    }
}

/// The size in `KIND:SIZE`, at least one sector.
fn spec_size(kind: &str, spec: &str) -> Result<u64, TargetError> {
    let bad = |reason: String| TargetError::BadTarget {
        target: format!("{kind}:{spec}"),
        reason,
    };
    let size = parse_size(spec).ok_or_else(|| bad(format!("expected a size such as {kind}:1G")))?;
    if size < 512 {
        return Err(bad("size must be at least 512 bytes".to_string()));
    }
    Ok(size)
}

/// Parses `123`, `4k`, `512M`, `2G`, `1T` (binary units).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_lowercase() {
                'k' => 1u64 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => return None,
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

impl Target for MemTarget {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    fn open_queue(&self, _index: usize) -> Result<Box<dyn QueueTarget>, TargetError> {
        Ok(Box::new(MemQueue {
            store: self.store.clone(),
            ready: Vec::new(),
        }))
    }
}

/// One queue's view of the RAM (or null) disk: serves every request at once,
/// in `execute` (the worker's path) or in `submit`.
struct MemQueue {
    store: Option<Arc<SparseStore>>,
    ready: Vec<Completion>,
}

impl MemQueue {
    /// Serves `req` (owned or borrowed buffers alike).
    fn serve<D: Borrow<IoBuffers>>(&self, req: &BlockRequest<D>) -> BlockStatus {
        // The blk layer has already checked ranges against the capacity.
        let start = req.sector * 512;
        let data: &IoBuffers = req.data.borrow();
        match (&self.store, req.op) {
            (None, BlockOp::Read) => {
                data.fill_zero(0, data.len());
            }
            (None, _) | (Some(_), BlockOp::Flush) => {}
            (Some(store), BlockOp::Read) => store.read(start, data.len(), data),
            (Some(store), BlockOp::Write { .. }) => store.write(start, data.len(), data),
            (Some(store), BlockOp::Discard | BlockOp::WriteZeroes { .. }) => {
                for r in &req.ranges {
                    store.zero(r.sector * 512, r.num_sectors as u64 * 512);
                }
            }
        }
        BlockStatus::Ok
    }
}

impl QueueTarget for MemQueue {
    fn submit(&mut self, tag: u64, req: BlockRequest) {
        let status = self.serve(&req);
        self.ready.push(Completion { tag, status });
    }

    fn execute(&mut self, req: &BlockRequest<GuestBuffers<'_>>) -> Option<BlockStatus> {
        Some(self.serve(req))
    }

    fn poll(&mut self, done: &mut Vec<Completion>) {
        done.append(&mut self.ready);
    }

    fn event_fd(&self) -> Option<RawFd> {
        None
    }

    fn in_flight(&self) -> usize {
        self.ready.len()
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::blk::buffer::{GuestMemoryMmap, IoBuffers};
    use crate::blk::target::SectorRange;

    fn run(q: &mut dyn QueueTarget, req: BlockRequest) -> BlockStatus {
        q.submit(7, req);
        let mut done = Vec::new();
        q.poll(&mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].tag, 7);
        done[0].status
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("64m"), Some(64 << 20));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("1Q"), None);
        assert_eq!(parse_size("99999999999T"), None);
        assert!(MemTarget::from_spec("100", false).is_err());
    }

    #[test]
    fn write_read_across_chunks_and_zero() {
        let t = MemTarget::new(1 << 20, false);
        let mut a = t.open_queue(0).unwrap();
        let mut b = t.open_queue(1).unwrap();
        let data: Vec<u8> = (0..(CHUNK as usize + 4096))
            .map(|i| (i % 251) as u8)
            .collect();
        let sector = (CHUNK - 2048) / 512;
        let w = BlockRequest {
            op: BlockOp::Write { fua: false },
            sector,
            data: IoBuffers::from_vec(data.clone()),
            ranges: vec![],
        };
        assert_eq!(run(a.as_mut(), w), BlockStatus::Ok);
        // Read through another queue: storage is shared.
        let r = IoBuffers::from_vec(vec![0xAA; data.len()]);
        let mut back = vec![0u8; data.len()];
        let req = BlockRequest {
            op: BlockOp::Read,
            sector,
            data: r,
            ranges: vec![],
        };
        // Keep a view of the buffer to check after completion.
        let view = req.data.iovecs()[0];
        assert_eq!(run(b.as_mut(), req), BlockStatus::Ok);
        let _ = view;
        let r2 = IoBuffers::from_vec(vec![0xAA; data.len()]);
        let req2 = BlockRequest {
            op: BlockOp::Read,
            sector,
            data: r2,
            ranges: vec![],
        };
        b.submit(1, req2);
        let mut done = Vec::new();
        b.poll(&mut done);
        // Reading again via a fresh IoBuffers we own: use a store read directly.
        let out = IoBuffers::from_vec(vec![0u8; data.len()]);
        t.store
            .as_ref()
            .unwrap()
            .read(sector * 512, data.len() as u64, &out);
        out.read_at(0, &mut back);
        assert_eq!(back, data);

        // Zero a range that covers one whole chunk and part of another.
        let z = BlockRequest {
            op: BlockOp::WriteZeroes { unmap: true },
            sector: 0,
            data: IoBuffers::empty(),
            ranges: vec![SectorRange {
                sector: 0,
                num_sectors: (CHUNK / 512) as u32 + 1,
            }],
        };
        assert_eq!(run(a.as_mut(), z), BlockStatus::Ok);
        let out = IoBuffers::from_vec(vec![0xFFu8; 2048]);
        t.store.as_ref().unwrap().read(CHUNK - 2048, 2048, &out);
        let mut tail = vec![0u8; 2048];
        out.read_at(0, &mut tail);
        assert!(tail.iter().all(|&x| x == 0));
        let out = IoBuffers::from_vec(vec![0u8; 512]);
        t.store.as_ref().unwrap().read(CHUNK + 512, 512, &out);
        let mut rest = vec![0u8; 512];
        out.read_at(0, &mut rest);
        assert_eq!(rest, data[2048 + 512..2048 + 1024]);
    }

    #[test]
    fn null_reads_fill_zeroes_and_writes_complete() {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap());
        mem.write_slice(&[0xAA; 0x2000], GuestAddress(0x1000))
            .unwrap();
        let t = MemTarget::null(1 << 20, false);
        let mut q = t.open_queue(0).unwrap();
        // The write is submitted with buffers of its own, completed by poll;
        // the read is served at once through buffers borrowed from `mem`.
        let mut data = GuestBuffers::new(&mem);
        data.push_guest(GuestAddress(0x1000), 0x1000).unwrap();
        q.submit(
            7,
            BlockRequest {
                op: BlockOp::Write { fua: false },
                sector: 0,
                data,
                ranges: vec![],
            }
            .into_owned(),
        );
        let mut data = GuestBuffers::new(&mem);
        data.push_guest(GuestAddress(0x1800), 0x1000).unwrap();
        let read = BlockRequest {
            op: BlockOp::Read,
            sector: 8,
            data,
            ranges: vec![],
        };
        assert_eq!(q.execute(&read), Some(BlockStatus::Ok));
        let mut done = Vec::new();
        q.poll(&mut done);
        assert_eq!(
            done,
            [Completion {
                tag: 7,
                status: BlockStatus::Ok
            }]
        );
        assert_eq!(q.in_flight(), 0);
        let mut back = [0u8; 0x2000];
        mem.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
        // The write left its buffer alone; the read zeroed exactly its own.
        assert!(back[..0x800].iter().all(|&b| b == 0xAA));
        assert!(back[0x800..0x1800].iter().all(|&b| b == 0));
        assert!(back[0x1800..].iter().all(|&b| b == 0xAA));
    }

    #[test]
    fn null_sizes_and_read_only() {
        assert!(MemTarget::null_from_spec("100", false).is_err());
        assert!(MemTarget::null_from_spec("x", false).is_err());
        let t = MemTarget::null_from_spec("1M", false).unwrap();
        assert_eq!(t.info().capacity_sectors, 2048);
        assert!(t.info().discard.is_some());
        let ro = MemTarget::null_from_spec("1M", true).unwrap();
        assert!(ro.info().read_only);
        assert!(ro.info().discard.is_none());
    }
}
