//! Arbitrary descriptor tables and guest memory through the virtio-blk request
//! parser: never a panic, and a request that parses stays inside guest memory
//! and the device's capacity. The worker's own ring walk (vhost::ring) yields
//! exactly the descriptors virtio-queue's does, for up to four chains in a
//! row (so its prefetching runs too), with the descriptor table in one
//! memory region or straddling two; the parser is fed the worker's walk.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vhost_iser::blk::buffer::GuestMemoryMmap;
use vhost_iser::blk::request::{parse_request, Request, RequestLimits};
use vhost_iser::blk::target::SharedCapacity;
use vhost_iser::vhost::ring::SplitRing;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const QSIZE: u16 = 16;
/// Two regions, split at `SPLIT`.
const MEM: usize = 0x10000;
const SPLIT: u64 = 0x8000;
const DESC: u64 = 0x0;
/// A descriptor table that straddles the two regions.
const DESC_STRADDLING: u64 = SPLIT - 0x80;
const AVAIL: u64 = 0x200;
const USED: u64 = 0x300;
const CAPACITY_SECTORS: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let mem = Arc::new(
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), SPLIT as usize),
            (GuestAddress(SPLIT), MEM - SPLIT as usize),
        ])
        .unwrap(),
    );
    // Byte 0: bits 0-3 the first head, 4-5 how many more chains, 6 the
    // straddling table, 7 a read-only device. Then the descriptor table
    // (16 x 16 bytes); whatever follows lands at 0x1000 (headers, discard
    // ranges), all controlled by the input.
    let head = data[0] as u16 % QSIZE;
    let chains = 1 + u16::from((data[0] >> 4) & 3);
    let desc = if data[0] & 0x40 != 0 { DESC_STRADDLING } else { DESC };
    let table = &data[1..data.len().min(1 + 16 * QSIZE as usize)];
    mem.write_slice(table, GuestAddress(desc)).unwrap();
    if data.len() > 257 {
        let rest = &data[257..data.len().min(257 + 0x6000)];
        mem.write_slice(rest, GuestAddress(0x1000)).unwrap();
    }
    // avail ring: flags 0, idx = chains, ring[k] = head + 5k.
    mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
    mem.write_obj(chains, GuestAddress(AVAIL + 2)).unwrap();
    for k in 0..chains {
        let h = (head + 5 * k) % QSIZE;
        mem.write_obj(h, GuestAddress(AVAIL + 4 + 2 * u64::from(k)))
            .unwrap();
    }
    let queue = || {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(desc as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        q
    };
    let mut q = queue();
    let limits = RequestLimits {
        capacity_sectors: SharedCapacity::new(CAPACITY_SECTORS),
        seg_max: 14,
        read_only: data[0] & 0x80 != 0,
        discard: Some((4096, 8)),
        write_zeroes: Some((4096, 8)),
    };
    let fresh = queue();
    let mut ring = SplitRing::new(&fresh, &mem);
    let mut iter = q.iter(&*mem).expect("a ready queue");
    for _ in 0..chains {
        let theirs = iter.next().expect("a chain");
        let ours = ring.pop().expect("a ready ring").expect("a chain");
        assert_eq!(ours.head_index(), theirs.head_index());
        let head_index = ours.head_index();
        let ours: Vec<_> = ours.collect();
        let theirs: Vec<_> = theirs.collect();
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(
                (a.addr(), a.len(), a.flags(), a.next()),
                (b.addr(), b.len(), b.flags(), b.next())
            );
        }
        check(&parse_request(head_index, ours, &mem, &limits), &mem);
    }
    assert!(iter.next().is_none());
    assert!(ring.pop().expect("a ready ring").is_none());
});

/// A request that parses stays inside guest memory and the capacity.
fn check(p: &vhost_iser::blk::request::ParsedRequest, mem: &GuestMemoryMmap) {
    let Ok(Request::Block(b)) = &p.request else {
        return;
    };
    assert!(p.status_addr.is_some());
    let end = b.sector + b.data.len() / 512;
    assert!(end <= CAPACITY_SECTORS);
    for v in b.data.iovecs() {
        let a = v.iov_base as usize;
        let inside = mem.iter().any(|r| {
            let base = r.get_host_address(vm_memory::MemoryRegionAddress(0)).unwrap() as usize;
            a >= base && a + v.iov_len <= base + r.len() as usize
        });
        assert!(inside, "iovec outside guest memory");
    }
    for r in &b.ranges {
        assert!(r.sector + r.num_sectors as u64 <= CAPACITY_SECTORS);
    }
}
