//! Null target (`null:SIZE`): reads return zeroes, writes are dropped.
//!
//! The counterpart of QEMU's `null-co` driver with `read-zeroes=on` (and of
//! Linux's null_blk): no storage, so a benchmark of the vhost layer measures
//! the layer and not a RAM store's locks and lookups, and a deployment can
//! check its plumbing without a disk. Every request completes inside `submit`.

use std::os::fd::RawFd;

use super::mem::parse_size;
use super::target::{
    BlockOp, BlockRequest, BlockStatus, Completion, DeviceInfo, QueueTarget, RangeOpLimits, Target,
    TargetError,
};

/// The null target.
pub struct NullTarget {
    info: DeviceInfo,
}

impl NullTarget {
    /// A null disk of `size` bytes (rounded down to 512).
    pub fn new(size: u64, read_only: bool) -> Self {
        let mut info = DeviceInfo::simple(size);
        info.read_only = read_only;
        info.serial = b"vhost-iser-null".to_vec();
        if !read_only {
            let limits = RangeOpLimits {
                max_sectors: u32::MAX / 512,
                max_segments: 64,
                alignment_sectors: 1,
            };
            info.discard = Some(limits);
            info.write_zeroes = Some(limits);
            info.write_zeroes_may_unmap = true;
        }
        NullTarget { info }
    }

    /// Parses the part after `null:`: a size such as `1G`, `512M`, `4096`.
    pub fn from_spec(spec: &str, read_only: bool) -> Result<Self, TargetError> {
        let bad = |reason: &str| TargetError::BadTarget {
            target: format!("null:{spec}"),
            reason: reason.to_string(),
        };
        let size = parse_size(spec).ok_or_else(|| bad("expected a size such as null:1G"))?;
        if size < 512 {
            return Err(bad("size must be at least 512 bytes"));
        }
        Ok(Self::new(size, read_only))
    }
}

impl Target for NullTarget {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    fn open_queue(&self, _index: usize) -> Result<Box<dyn QueueTarget>, TargetError> {
        Ok(Box::new(NullQueue { ready: Vec::new() }))
    }
}

/// One queue of the null disk.
struct NullQueue {
    ready: Vec<Completion>,
}

impl QueueTarget for NullQueue {
    fn submit(&mut self, tag: u64, req: BlockRequest) {
        if req.op == BlockOp::Read {
            req.data.fill_zero(0, req.data.len());
        }
        self.ready.push(Completion {
            tag,
            status: BlockStatus::Ok,
        });
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
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::blk::buffer::{GuestMemoryMmap, IoBuffers};

    #[test]
    fn reads_fill_zeroes_and_writes_complete() {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap());
        mem.write_slice(&[0xAA; 0x2000], GuestAddress(0x1000))
            .unwrap();
        let t = NullTarget::new(1 << 20, false);
        let mut q = t.open_queue(0).unwrap();
        let mut data = IoBuffers::new(mem.clone());
        data.push_guest(&mem, GuestAddress(0x1000), 0x1000).unwrap();
        q.submit(
            7,
            BlockRequest {
                op: BlockOp::Write { fua: false },
                sector: 0,
                data,
                ranges: vec![],
            },
        );
        let mut data = IoBuffers::new(mem.clone());
        data.push_guest(&mem, GuestAddress(0x1800), 0x1000).unwrap();
        q.submit(
            8,
            BlockRequest {
                op: BlockOp::Read,
                sector: 8,
                data,
                ranges: vec![],
            },
        );
        let mut done = Vec::new();
        q.poll(&mut done);
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|c| c.status == BlockStatus::Ok));
        assert_eq!(q.in_flight(), 0);
        let mut back = [0u8; 0x2000];
        mem.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
        // The write left its buffer alone; the read zeroed exactly its own.
        assert!(back[..0x800].iter().all(|&b| b == 0xAA));
        assert!(back[0x800..0x1800].iter().all(|&b| b == 0));
        assert!(back[0x1800..].iter().all(|&b| b == 0xAA));
    }

    #[test]
    fn sizes_and_read_only() {
        assert!(NullTarget::from_spec("100", false).is_err());
        assert!(NullTarget::from_spec("x", false).is_err());
        let t = NullTarget::from_spec("1M", false).unwrap();
        assert_eq!(t.info().capacity_sectors, 2048);
        assert!(t.info().discard.is_some());
        let ro = NullTarget::from_spec("1M", true).unwrap();
        assert!(ro.info().read_only);
        assert!(ro.info().discard.is_none());
    }
}
