//! Arbitrary descriptor tables and guest memory through the virtio-blk request
//! parser: never a panic, and a request that parses stays inside guest memory
//! and the device's capacity. The worker's own ring walk (vhost::ring) yields
//! exactly the descriptors virtio-queue's does.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vhost_iser::blk::buffer::GuestMemoryMmap;
use vhost_iser::blk::request::{parse_request, Request, RequestLimits};
use vhost_iser::blk::target::SharedCapacity;
use vhost_iser::vhost::ring::SplitRing;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const QSIZE: u16 = 16;
const MEM: usize = 0x10000;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x200;
const USED: u64 = 0x300;
const CAPACITY_SECTORS: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap());
    // Descriptor table first (16 x 16 bytes), then whatever follows lands at 0x1000
    // (headers, discard ranges), all controlled by the input.
    let head = data[0] as u16 % QSIZE;
    let table = &data[1..data.len().min(1 + 16 * QSIZE as usize)];
    mem.write_slice(table, GuestAddress(DESC)).unwrap();
    if data.len() > 257 {
        let rest = &data[257..data.len().min(257 + 0x8000)];
        mem.write_slice(rest, GuestAddress(0x1000)).unwrap();
    }
    // avail ring: flags 0, idx 1, ring[0] = head.
    mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    mem.write_obj(head, GuestAddress(AVAIL + 4)).unwrap();
    let queue = || {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
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
    let Ok(mut iter) = q.iter(&*mem) else {
        return;
    };
    let Some(chain) = iter.next() else {
        return;
    };
    let theirs: Vec<_> = chain.clone().collect();
    let mut ring = SplitRing::new(&fresh, &mem);
    let ours = ring.pop().expect("a ready ring").expect("one chain");
    assert_eq!(ours.head_index(), chain.head_index());
    let ours: Vec<_> = ours.collect();
    assert_eq!(ours.len(), theirs.len());
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(
            (a.addr(), a.len(), a.flags(), a.next()),
            (b.addr(), b.len(), b.flags(), b.next())
        );
    }
    let p = parse_request(chain.head_index(), chain, &mem, &limits);
    if let Ok(Request::Block(b)) = &p.request {
        assert!(p.status_addr.is_some());
        let end = b.sector + b.data.len() / 512;
        assert!(end <= CAPACITY_SECTORS);
        for v in b.data.iovecs() {
            let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
            let a = v.iov_base as usize;
            assert!(
                a >= base && a + v.iov_len <= base + MEM,
                "iovec outside guest memory"
            );
        }
        for r in &b.ranges {
            assert!(r.sector + r.num_sectors as u64 <= CAPACITY_SECTORS);
        }
    }
});
