//! A LUN that grows under a running device: the scripted fake target answers
//! a READ with UNIT ATTENTION 2A/09 (capacity data has changed) and reports
//! twice the blocks from then on. The real `vhost-iser` binary must re-read
//! the capacity, put it in the virtio-blk config space, let the guest address
//! the new blocks, and send VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the
//! backend request channel so the frontend raises a config-change interrupt.
//!
//! The frontend here is the vhost crate's (`Frontend` on the main channel,
//! `FrontendReqHandler` on the backend channel: QEMU's part), with one split
//! virtqueue built by hand in a memfd.

mod client;
mod support;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::Backend;
use support::fake_target::{FakeTarget, Misbehave};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const MIB: usize = 1 << 20;
const QSIZE: u16 = 8;
const MEM_LEN: usize = MIB;
// Layout of the shared memory (guest-physical address 0 = offset 0).
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x400;
const USED: u64 = 0x800;
const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0x3000;

const F_VERSION_1: u64 = 1 << 32;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// The backend-channel side: counts config-change notices.
#[derive(Default)]
struct Notices(AtomicUsize);

impl VhostUserFrontendReqHandler for Notices {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(0)
    }
}

/// Guest memory: a memfd mapped here and sent to the backend.
struct Memory {
    file: File,
    ptr: *mut u8,
}

impl Memory {
    fn new() -> Memory {
        // SAFETY: memfd_create with a NUL-terminated name; the fd is owned by the File.
        let fd = unsafe { libc::memfd_create(c"capacity".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(MEM_LEN as u64).unwrap();
        // SAFETY: maps MEM_LEN bytes of our own memfd, shared; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Memory {
            file,
            ptr: ptr.cast(),
        }
    }

    fn uaddr(&self, gpa: u64) -> u64 {
        self.ptr as u64 + gpa
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa as usize + bytes.len() <= MEM_LEN);
        // SAFETY: in bounds of the mapping (checked above); the backend only
        // touches buffers of requests we have not yet published or that it
        // completed, and the ring fields are written whole.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(gpa as usize), bytes.len())
        };
    }

    fn read_u16(&self, gpa: u64) -> u16 {
        assert!(gpa as usize + 2 <= MEM_LEN);
        // SAFETY: in bounds and 2-byte aligned (ring layout above); volatile
        // because the backend writes it from another process.
        unsafe { std::ptr::read_volatile(self.ptr.add(gpa as usize).cast::<u16>()) }
    }

    fn read_u8(&self, gpa: u64) -> u8 {
        assert!((gpa as usize) < MEM_LEN);
        // SAFETY: in bounds; volatile as above.
        unsafe { std::ptr::read_volatile(self.ptr.add(gpa as usize)) }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.cast(), MEM_LEN) };
    }
}

/// One vhost-user-blk frontend with one queue.
struct Device {
    fe: Frontend,
    mem: Memory,
    kick: EventFd,
    _call: EventFd,
    next_avail: u16,
}

impl Device {
    /// Sets the device up; `backend_channel`: offer BACKEND_REQ and hand
    /// the backend a channel whose notices `notices` counts.
    fn connect(b: &Backend, backend_channel: Option<Arc<Notices>>) -> Device {
        let mut fe = Frontend::connect(&b.socket, 1).expect("connect to vhost-iser");
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        assert!(offered & F_PROTOCOL_FEATURES != 0);
        fe.set_features(F_VERSION_1 | F_PROTOCOL_FEATURES).unwrap();
        let proto = fe.get_protocol_features().unwrap();
        assert!(
            proto.contains(VhostUserProtocolFeatures::BACKEND_REQ),
            "BACKEND_REQ not offered: {proto:?}"
        );
        let mut want = VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK;
        if backend_channel.is_some() {
            want |= VhostUserProtocolFeatures::BACKEND_REQ;
        }
        fe.set_protocol_features(want).unwrap();
        if let Some(notices) = backend_channel {
            let mut handler = FrontendReqHandler::new(notices).unwrap();
            handler.set_reply_ack_flag(true);
            fe.set_backend_request_fd(&handler.get_tx_raw_fd()).unwrap();
            std::thread::spawn(move || while handler.handle_request().is_ok() {});
        }
        let mem = Memory::new();
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_LEN as u64,
            userspace_addr: mem.uaddr(0),
            mmap_offset: 0,
            mmap_handle: mem.file.as_raw_fd(),
        }])
        .unwrap();
        fe.set_vring_num(0, QSIZE).unwrap();
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: mem.uaddr(DESC),
                used_ring_addr: mem.uaddr(USED),
                avail_ring_addr: mem.uaddr(AVAIL),
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(0, 0).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        fe.set_vring_enable(0, true).unwrap();
        Device {
            fe,
            mem,
            kick,
            _call: call,
            next_avail: 0,
        }
    }

    /// The config space's capacity field, in 512-byte sectors.
    fn capacity(&mut self) -> u64 {
        let (_, buf) = self
            .fe
            .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
            .expect("GET_CONFIG");
        u64::from_le_bytes(buf[..8].try_into().unwrap())
    }

    /// Reads one sector at `sector`; returns the virtio-blk status byte.
    fn read_sector(&mut self, sector: u64) -> u8 {
        let mut hdr = 0u32.to_le_bytes().to_vec(); // VIRTIO_BLK_T_IN
        hdr.extend(0u32.to_le_bytes());
        hdr.extend(sector.to_le_bytes());
        self.mem.write(HDR, &hdr);
        self.mem.write(STATUS, &[0xff]);
        let desc = |addr: u64, len: u32, flags: u16, next: u16| {
            let mut d = addr.to_le_bytes().to_vec();
            d.extend(len.to_le_bytes());
            d.extend(flags.to_le_bytes());
            d.extend(next.to_le_bytes());
            d
        };
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        self.mem.write(DESC, &desc(HDR, 16, NEXT, 1));
        self.mem.write(DESC + 16, &desc(DATA, 512, NEXT | WRITE, 2));
        self.mem.write(DESC + 32, &desc(STATUS, 1, WRITE, 0));
        let slot = AVAIL + 4 + 2 * u64::from(self.next_avail % QSIZE);
        self.mem.write(slot, &0u16.to_le_bytes());
        std::sync::atomic::fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.mem.write(AVAIL + 2, &self.next_avail.to_le_bytes());
        std::sync::atomic::fence(Ordering::SeqCst);
        self.kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.mem.read_u16(USED + 2) != self.next_avail {
            assert!(Instant::now() < deadline, "request not completed");
            std::thread::sleep(Duration::from_millis(2));
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        self.mem.read_u8(STATUS)
    }
}

fn wait_for(what: &str, b: &Backend, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "{what}; log:\n{}", b.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Grows the LUN under a running device; returns the device, with the
/// capacity checked in the config space and the new blocks readable.
fn grow(t: &FakeTarget, b: &Backend, notices: Option<Arc<Notices>>) -> Device {
    let mut d = Device::connect(b, notices);
    let old = 16 * MIB as u64 / 512;
    assert_eq!(d.capacity(), old);
    assert_eq!(d.read_sector(0), 0, "first read; log:\n{}", b.log());
    // Beyond the end: refused by the backend itself (VIRTIO_BLK_S_IOERR).
    assert_eq!(d.read_sector(old), 1);
    t.arm(Misbehave::CapacityChanged, false);
    // This read meets the unit attention, is retried, and completes.
    assert_eq!(d.read_sector(8), 0, "read after the UA; log:\n{}", b.log());
    wait_for("config space still shows the old capacity", b, || {
        d.capacity() == 2 * old
    });
    // The new blocks are addressable.
    assert_eq!(d.read_sector(2 * old - 1), 0, "log:\n{}", b.log());
    assert_eq!(d.read_sector(2 * old), 1);
    d
}

#[test]
fn capacity_change_sends_a_config_change_notice() {
    let t = FakeTarget::start(16 * MIB, false);
    let url = t.url();
    let b = Backend::start(&["--target", &url]);
    let notices = Arc::new(Notices::default());
    let _d = grow(&t, &b, Some(notices.clone()));
    wait_for("no config-change notice", &b, || {
        notices.0.load(Ordering::SeqCst) > 0
    });
    // One change, one notice (however many sessions see the unit attention).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(notices.0.load(Ordering::SeqCst), 1);
    let log = b.log();
    assert!(
        log.contains("device capacity changed from 32768 to 65536 sectors"),
        "{log}"
    );
    assert!(
        log.contains("frontend notified of the config change"),
        "{log}"
    );
}

#[test]
fn capacity_change_without_a_backend_channel_still_updates_the_config_space() {
    let t = FakeTarget::start(16 * MIB, false);
    let url = t.url();
    let b = Backend::start(&["--target", &url]);
    let _d = grow(&t, &b, None);
    let log = b.log();
    assert!(
        log.contains("did not set up a backend request channel"),
        "{log}"
    );
}
