//! A hostile vhost-user front-end: raw protocol messages over a real unix
//! socket to the real `vhost-iser` binary. Each malformed message must be
//! refused (an error reply or the connection closed), the process must stay
//! alive, and afterwards a well-behaved libblkio client must still be served.
//! The same raw front-end also drives the live-migration messages
//! (SET_LOG_BASE, VHOST_F_LOG_ALL on and off) and checks the dirty log.

mod client;

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use client::{pattern, Backend, Client};

// Front-end request codes (QEMU docs/interop/vhost-user.rst).
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const GET_CONFIG: u32 = 24;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
const ADD_MEM_REG: u32 = 37;

const VERSION: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;

const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const F_VERSION_1: u64 = 1 << 32;
const P_MQ: u64 = 1 << 0;
const P_REPLY_ACK: u64 = 1 << 3;
const P_CONFIG: u64 = 1 << 9;
const P_INFLIGHT: u64 = 1 << 12;
const P_MEM_SLOTS: u64 = 1 << 15;

/// One raw vhost-user connection.
struct Conn {
    s: UnixStream,
}

/// What the back-end did with a request.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Replied with a zero ack (accepted).
    Accepted,
    /// Replied with a non-zero ack.
    Refused,
    /// Closed the connection.
    Closed,
}

impl Conn {
    fn connect(path: &Path) -> Conn {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    return Conn { s };
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot connect to {}: {e}", path.display()),
            }
        }
    }

    /// Sends a header (with `size` as declared) + payload + fds in one sendmsg.
    fn send_sized(
        &mut self,
        req: u32,
        flags: u32,
        size: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> bool {
        let mut buf = Vec::with_capacity(12 + payload.len());
        buf.extend_from_slice(&req.to_le_bytes());
        buf.extend_from_slice(&(flags | VERSION).to_le_bytes());
        buf.extend_from_slice(&size.to_le_bytes());
        buf.extend_from_slice(payload);
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let fd_bytes = std::mem::size_of_val(fds);
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8).max(1)];
        // SAFETY: msghdr is plain data; zeroed is a valid starting value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: msg_control points at `space` bytes we own, enough for
            // one cmsg with `fds.len()` descriptors (CMSG_SPACE above).
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(c),
                    fd_bytes,
                );
            }
        }
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(self.s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        n == buf.len() as isize
    }

    fn send(&mut self, req: u32, flags: u32, payload: &[u8], fds: &[RawFd]) -> bool {
        self.send_sized(req, flags, payload.len() as u32, payload, fds)
    }

    /// Reads one reply: Some(payload) or None if the connection closed.
    fn recv(&mut self) -> Option<Vec<u8>> {
        let mut hdr = [0u8; 12];
        match self.s.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
                ) =>
            {
                return None
            }
            Err(e) => panic!("no reply and no close from the back-end: {e}"),
        }
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
        assert!(size <= 4096, "reply of {size} bytes");
        let mut p = vec![0u8; size];
        self.s.read_exact(&mut p).ok()?;
        Some(p)
    }

    fn get_u64(&mut self, req: u32) -> u64 {
        assert!(self.send(req, 0, &[], &[]));
        let p = self.recv().expect("reply");
        u64::from_le_bytes(p[..8].try_into().unwrap())
    }

    /// Sends with NEED_REPLY and classifies the answer.
    fn request(&mut self, req: u32, payload: &[u8], fds: &[RawFd]) -> Outcome {
        if !self.send(req, NEED_REPLY, payload, fds) {
            return Outcome::Closed;
        }
        self.outcome()
    }

    fn outcome(&mut self) -> Outcome {
        match self.recv() {
            None => Outcome::Closed,
            Some(p) if p.len() == 8 && p.iter().all(|&b| b == 0) => Outcome::Accepted,
            Some(_) => Outcome::Refused,
        }
    }

    /// SET_OWNER, features, protocol features (REPLY_ACK, MEM_SLOTS, ...).
    fn handshake(path: &Path) -> Conn {
        let mut c = Conn::connect(path);
        assert!(c.send(SET_OWNER, 0, &[], &[]));
        let f = c.get_u64(GET_FEATURES);
        assert!(f & F_PROTOCOL_FEATURES != 0);
        let p = c.get_u64(GET_PROTOCOL_FEATURES);
        assert!(p & P_INFLIGHT != 0, "INFLIGHT_SHMFD not offered");
        let want = p & (P_MQ | P_REPLY_ACK | P_CONFIG | P_INFLIGHT | P_MEM_SLOTS);
        assert_eq!(
            c.request(SET_PROTOCOL_FEATURES, &want.to_le_bytes(), &[]),
            Outcome::Accepted
        );
        assert_eq!(
            c.request(
                SET_FEATURES,
                &(f & (F_PROTOCOL_FEATURES | F_VERSION_1)).to_le_bytes(),
                &[]
            ),
            Outcome::Accepted
        );
        c
    }
}

fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c"hostile".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh descriptor nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

fn eventfd() -> File {
    // SAFETY: plain eventfd(2); the fd is owned by the File.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh descriptor nobody else owns.
    unsafe { File::from_raw_fd(fd) }
}

fn region(gpa: u64, size: u64, uaddr: u64, off: u64) -> Vec<u8> {
    [gpa, size, uaddr, off]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn add_mem_reg(gpa: u64, size: u64, uaddr: u64, off: u64) -> Vec<u8> {
    let mut v = 0u64.to_le_bytes().to_vec();
    v.extend(region(gpa, size, uaddr, off));
    v
}

fn mem_table(regions: &[Vec<u8>]) -> Vec<u8> {
    let mut v = (regions.len() as u32).to_le_bytes().to_vec();
    v.extend(0u32.to_le_bytes());
    for r in regions {
        v.extend(r);
    }
    v
}

fn vring_state(index: u32, num: u32) -> Vec<u8> {
    let mut v = index.to_le_bytes().to_vec();
    v.extend(num.to_le_bytes());
    v
}

fn vring_addr(index: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut v = index.to_le_bytes().to_vec();
    v.extend(0u32.to_le_bytes());
    for x in [desc, used, avail, 0] {
        v.extend(x.to_le_bytes());
    }
    v
}

fn inflight(size: u64, off: u64, nq: u16, qs: u16) -> Vec<u8> {
    let mut v = size.to_le_bytes().to_vec();
    v.extend(off.to_le_bytes());
    v.extend(nq.to_le_bytes());
    v.extend(qs.to_le_bytes());
    v.extend([0u8; 4]);
    v
}

fn refused(o: Outcome, what: &str) {
    assert_ne!(o, Outcome::Accepted, "{what}: accepted");
}

fn assert_alive(b: &mut Backend, what: &str) {
    std::thread::sleep(Duration::from_millis(50));
    let st = b.child.as_mut().unwrap().try_wait().unwrap();
    assert!(
        st.is_none(),
        "vhost-iser died after {what} ({st:?}):\n{}",
        b.log()
    );
}

const UADDR: u64 = 0x7f00_0000_0000;
const MEM: u64 = 1 << 20;

#[test]
fn malformed_messages_are_refused_and_the_backend_survives() {
    let mut b = Backend::start(&["--target", "mem:16M", "--queues", "2"]);
    let sock = b.socket.clone();

    // 1. Sizes that do not match the request.
    {
        let mut c = Conn::handshake(&sock);
        assert!(c.send(SET_VRING_NUM, NEED_REPLY, &[0u8; 4], &[]));
        refused(c.outcome(), "SET_VRING_NUM with 4 payload bytes");
    }
    assert_alive(&mut b, "a short SET_VRING_NUM");
    {
        let mut c = Conn::handshake(&sock);
        // declares 1 MiB of payload, sends 8 bytes and waits
        let _ = c.send_sized(SET_VRING_BASE, NEED_REPLY, 1 << 20, &[0u8; 8], &[]);
        drop(c);
    }
    assert_alive(&mut b, "a header declaring 1 MiB of payload");
    {
        let mut c = Conn::handshake(&sock);
        refused(
            c.request(GET_CONFIG, &[0xffu8; 12], &[]),
            "GET_CONFIG with an absurd size",
        );
    }
    assert_alive(&mut b, "GET_CONFIG with an absurd size");
    {
        let mut c = Conn::connect(&sock);
        refused(c.request(999, &[1, 2, 3], &[]), "unknown request 999");
    }
    assert_alive(&mut b, "an unknown request");

    // 2. A memory region larger than the file behind it (would SIGBUS on use).
    {
        let mut c = Conn::handshake(&sock);
        let f = memfd(64 << 10);
        refused(
            c.request(
                ADD_MEM_REG,
                &add_mem_reg(0, 16 << 20, UADDR, 0),
                &[f.as_raw_fd()],
            ),
            "ADD_MEM_REG of 16 MiB on a 64 KiB memfd",
        );
    }
    assert_alive(&mut b, "an oversized ADD_MEM_REG");
    {
        let mut c = Conn::handshake(&sock);
        let f = memfd(MEM);
        refused(
            c.request(
                SET_MEM_TABLE,
                &mem_table(&[region(0, MEM, UADDR, MEM / 2)]),
                &[f.as_raw_fd()],
            ),
            "SET_MEM_TABLE region past the end of its file (offset)",
        );
    }
    assert_alive(&mut b, "an oversized SET_MEM_TABLE");

    // 3. Overlapping regions.
    {
        let mut c = Conn::handshake(&sock);
        let (f1, f2) = (memfd(MEM), memfd(MEM));
        refused(
            c.request(
                SET_MEM_TABLE,
                &mem_table(&[
                    region(0, MEM, UADDR, 0),
                    region(MEM / 2, MEM, UADDR + 2 * MEM, 0),
                ]),
                &[f1.as_raw_fd(), f2.as_raw_fd()],
            ),
            "overlapping regions",
        );
    }
    assert_alive(&mut b, "overlapping regions");
    {
        let mut c = Conn::handshake(&sock);
        let (f1, f2) = (memfd(MEM), memfd(MEM));
        assert_eq!(
            c.request(
                ADD_MEM_REG,
                &add_mem_reg(0, MEM, UADDR, 0),
                &[f1.as_raw_fd()]
            ),
            Outcome::Accepted
        );
        refused(
            c.request(
                ADD_MEM_REG,
                &add_mem_reg(MEM - 4096, MEM, UADDR + 4 * MEM, 0),
                &[f2.as_raw_fd()],
            ),
            "ADD_MEM_REG overlapping an existing region",
        );
    }
    assert_alive(&mut b, "an overlapping ADD_MEM_REG");

    // 4. Bad vring addresses; rings that run off the end of memory, kicked.
    {
        let mut c = Conn::handshake(&sock);
        let f = memfd(MEM);
        assert_eq!(
            c.request(
                ADD_MEM_REG,
                &add_mem_reg(0, MEM, UADDR, 0),
                &[f.as_raw_fd()]
            ),
            Outcome::Accepted
        );
        assert_eq!(
            c.request(SET_VRING_NUM, &vring_state(0, 256), &[]),
            Outcome::Accepted
        );
        refused(
            c.request(
                SET_VRING_ADDR,
                &vring_addr(0, 0xdead_0000, UADDR, UADDR),
                &[],
            ),
            "descriptor table outside guest memory",
        );
    }
    assert_alive(&mut b, "a vring outside guest memory");
    {
        let mut c = Conn::handshake(&sock);
        let f = memfd(MEM);
        assert_eq!(
            c.request(
                ADD_MEM_REG,
                &add_mem_reg(0, MEM, UADDR, 0),
                &[f.as_raw_fd()]
            ),
            Outcome::Accepted
        );
        assert_eq!(
            c.request(SET_VRING_NUM, &vring_state(0, 256), &[]),
            Outcome::Accepted
        );
        // Tables start inside but end past the region; the avail ring is misaligned.
        let end = UADDR + MEM;
        let o = c.request(
            SET_VRING_ADDR,
            &vring_addr(0, end - 16, end - 8, end - 3),
            &[],
        );
        if o == Outcome::Accepted {
            // If the addresses are taken, using them must still be safe.
            let (k, call) = (eventfd(), eventfd());
            let _ = c.request(SET_VRING_BASE, &vring_state(0, 0), &[]);
            let _ = c.request(SET_VRING_CALL, &0u64.to_le_bytes(), &[call.as_raw_fd()]);
            let _ = c.request(SET_VRING_KICK, &0u64.to_le_bytes(), &[k.as_raw_fd()]);
            let _ = c.request(SET_VRING_ENABLE, &vring_state(0, 1), &[]);
            // SAFETY: write(2) of 8 bytes from a live buffer to our eventfd.
            unsafe { libc::write(k.as_raw_fd(), [1u8, 0, 0, 0, 0, 0, 0, 0].as_ptr().cast(), 8) };
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert_alive(&mut b, "rings running off the end of guest memory");

    // 5. Bad queue indexes.
    for (what, req, payload) in [
        (
            "SET_VRING_NUM queue 200",
            SET_VRING_NUM,
            vring_state(200, 128),
        ),
        ("SET_VRING_BASE queue 2", SET_VRING_BASE, vring_state(2, 0)),
        (
            "SET_VRING_ENABLE queue 64",
            SET_VRING_ENABLE,
            vring_state(64, 1),
        ),
        (
            "SET_VRING_ADDR queue 9",
            SET_VRING_ADDR,
            vring_addr(9, UADDR, UADDR, UADDR),
        ),
    ] {
        let mut c = Conn::handshake(&sock);
        refused(c.request(req, &payload, &[]), what);
        assert_alive(&mut b, what);
    }
    {
        let mut c = Conn::handshake(&sock);
        let k = eventfd();
        refused(
            c.request(SET_VRING_KICK, &63u64.to_le_bytes(), &[k.as_raw_fd()]),
            "SET_VRING_KICK queue 63",
        );
    }
    assert_alive(&mut b, "SET_VRING_KICK on queue 63");
    {
        let mut c = Conn::handshake(&sock);
        assert!(c.send(GET_VRING_BASE, 0, &vring_state(77, 0), &[]));
        let r = c.recv();
        assert!(
            r.is_none()
                || r.as_deref().map(|p| p.len()) != Some(8)
                || r.unwrap()[..4] != 77u32.to_le_bytes(),
            "GET_VRING_BASE of queue 77 answered as if it existed"
        );
    }
    assert_alive(&mut b, "GET_VRING_BASE on queue 77");

    // 6. Inflight messages with impossible geometry.
    {
        let mut c = Conn::handshake(&sock);
        assert!(c.send(GET_INFLIGHT_FD, 0, &inflight(0, 0, 1000, 128), &[]));
        let r = c.recv();
        assert!(
            r.is_none(),
            "GET_INFLIGHT_FD for 1000 queues answered: {r:?}"
        );
    }
    assert_alive(&mut b, "GET_INFLIGHT_FD for 1000 queues");
    {
        let mut c = Conn::handshake(&sock);
        let f = memfd(4096);
        refused(
            c.request(
                SET_INFLIGHT_FD,
                &inflight(1 << 20, 0, 2, 128),
                &[f.as_raw_fd()],
            ),
            "SET_INFLIGHT_FD larger than its file",
        );
    }
    assert_alive(&mut b, "an oversized SET_INFLIGHT_FD");

    // A well-behaved client is still served, with correct data.
    let mut c = Client::connect(&sock, 2, 1 << 20);
    let data = pattern(8192, 65536, 7);
    c.buf()[..65536].copy_from_slice(&data);
    assert_eq!(c.write(1, 8192, 0, 65536), 0);
    c.buf()[65536..131072].fill(0);
    assert_eq!(c.read(0, 8192, 65536, 65536), 0);
    assert!(c.buf()[65536..131072] == data[..], "read-back differs");
    drop(c);
    assert_alive(&mut b, "the good client");
    let log = b.log();
    assert!(
        log.contains("does not fit in its"),
        "no log line for the oversized region:\n{log}"
    );
    assert!(!log.contains("panicked"), "a thread panicked:\n{log}");
}

const SET_LOG_BASE: u32 = 6;
const F_LOG_ALL: u64 = 1 << 26;
const P_LOG_SHMFD: u64 = 1 << 1;

/// Pages whose bit is set in a vhost dirty log, clearing the log afterwards.
fn take_dirty_pages(log: &File) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    let mut bits = [0u8; 4096];
    log.read_exact_at(&mut bits, 0).unwrap();
    log.write_all_at(&[0u8; 4096], 0).unwrap();
    let mut pages = Vec::new();
    for (i, byte) in bits.iter().enumerate() {
        for bit in 0..8 {
            if byte & (1 << bit) != 0 {
                pages.push((i * 8 + bit) as u64);
            }
        }
    }
    pages
}

/// The migration half of the protocol, as QEMU drives it: SET_LOG_BASE, a
/// region added after it (ADD_MEM_REG), VHOST_F_LOG_ALL on, a read whose data
/// lands in that region; then LOG_ALL off (a cancelled migration) and a
/// second read. The log must hold exactly the pages the back-end wrote while
/// logging (data, status byte, used ring), and nothing afterwards.
#[test]
fn dirty_log_follows_log_all_and_covers_regions_added_later() {
    let b = Backend::start(&["--target", "mem:16M"]);
    let mut c = Conn::connect(&b.socket);
    assert!(c.send(SET_OWNER, 0, &[], &[]));
    let features = c.get_u64(GET_FEATURES);
    assert!(features & F_LOG_ALL != 0, "VHOST_F_LOG_ALL not offered");
    let proto = c.get_u64(GET_PROTOCOL_FEATURES);
    assert!(proto & P_LOG_SHMFD != 0, "LOG_SHMFD not offered");
    let want = proto & (P_MQ | P_REPLY_ACK | P_CONFIG | P_MEM_SLOTS | P_LOG_SHMFD);
    assert_eq!(
        c.request(SET_PROTOCOL_FEATURES, &want.to_le_bytes(), &[]),
        Outcome::Accepted
    );
    let base = features & (F_PROTOCOL_FEATURES | F_VERSION_1);
    assert_eq!(
        c.request(SET_FEATURES, &base.to_le_bytes(), &[]),
        Outcome::Accepted
    );

    // Guest memory: two 1 MiB regions of one memfd, the second added after
    // the log. Mapped here too, to play the guest.
    let f = memfd(2 * MEM);
    // SAFETY: a fresh shared mapping of our own 2 MiB memfd.
    let guest = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            2 * MEM as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(guest, libc::MAP_FAILED);
    let guest = guest.cast::<u8>();
    let put = |gpa: u64, bytes: &[u8]| {
        assert!(gpa as usize + bytes.len() <= 2 * MEM as usize);
        // SAFETY: in bounds of the 2 MiB mapping (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), guest.add(gpa as usize), bytes.len())
        };
    };
    let get_u16 = |gpa: u64| -> u16 {
        // SAFETY: in bounds of the mapping; the back-end writes it concurrently.
        unsafe { std::ptr::read_volatile(guest.add(gpa as usize).cast::<u16>()) }
    };
    assert_eq!(
        c.request(
            ADD_MEM_REG,
            &add_mem_reg(0, MEM, UADDR, 0),
            &[f.as_raw_fd()]
        ),
        Outcome::Accepted
    );
    let log = memfd(4096);
    let mut msg = 4096u64.to_le_bytes().to_vec();
    msg.extend(0u64.to_le_bytes());
    assert!(c.send(SET_LOG_BASE, 0, &msg, &[log.as_raw_fd()]));
    assert!(c.recv().is_some(), "no reply to SET_LOG_BASE:\n{}", b.log());
    assert_eq!(
        c.request(
            ADD_MEM_REG,
            &add_mem_reg(MEM, MEM, UADDR + MEM, MEM),
            &[f.as_raw_fd()]
        ),
        Outcome::Accepted
    );
    assert_eq!(
        c.request(SET_FEATURES, &(base | F_LOG_ALL).to_le_bytes(), &[]),
        Outcome::Accepted
    );

    // Ring of 16: descriptors in page 0, avail ring page 1, used ring page 2.
    const QSZ: u32 = 16;
    let (desc, avail, used) = (0u64, 0x1000u64, 0x2000u64);
    assert_eq!(
        c.request(SET_VRING_NUM, &vring_state(0, QSZ), &[]),
        Outcome::Accepted
    );
    assert_eq!(
        c.request(
            SET_VRING_ADDR,
            &vring_addr(0, UADDR + desc, UADDR + used, UADDR + avail),
            &[]
        ),
        Outcome::Accepted
    );
    assert_eq!(
        c.request(SET_VRING_BASE, &vring_state(0, 0), &[]),
        Outcome::Accepted
    );
    let (kick, call) = (eventfd(), eventfd());
    assert_eq!(
        c.request(SET_VRING_CALL, &0u64.to_le_bytes(), &[call.as_raw_fd()]),
        Outcome::Accepted
    );
    assert_eq!(
        c.request(SET_VRING_KICK, &0u64.to_le_bytes(), &[kick.as_raw_fd()]),
        Outcome::Accepted
    );
    assert_eq!(
        c.request(SET_VRING_ENABLE, &vring_state(0, 1), &[]),
        Outcome::Accepted
    );
    take_dirty_pages(&log);

    // Request n: header in page 4, data (4 KiB, device-writable) at `data`,
    // status byte in page 5; descriptors 3n..3n+2.
    let read = |c: &mut Conn, n: u16, data: u64| {
        let _ = c;
        let mut hdr = 0u32.to_le_bytes().to_vec(); // VIRTIO_BLK_T_IN
        hdr.extend(0u32.to_le_bytes());
        hdr.extend(u64::from(n).to_le_bytes());
        put(0x4000, &hdr);
        let d = |addr: u64, len: u32, flags: u16, next: u16| {
            let mut v = addr.to_le_bytes().to_vec();
            v.extend(len.to_le_bytes());
            v.extend(flags.to_le_bytes());
            v.extend(next.to_le_bytes());
            v
        };
        let first = 3 * n;
        put(desc + 16 * u64::from(first), &d(0x4000, 16, 1, first + 1));
        put(
            desc + 16 * u64::from(first + 1),
            &d(data, 4096, 1 | 2, first + 2),
        );
        put(
            desc + 16 * u64::from(first + 2),
            &d(0x5000 + u64::from(n), 1, 2, 0),
        );
        put(avail + 4 + 2 * u64::from(n), &first.to_le_bytes());
        put(avail + 2, &(n + 1).to_le_bytes());
        // SAFETY: write(2) of 8 bytes from a live buffer to our eventfd.
        unsafe { libc::write(kick.as_raw_fd(), 1u64.to_le_bytes().as_ptr().cast(), 8) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while get_u16(used + 2) != n + 1 {
            assert!(
                Instant::now() < deadline,
                "request {n} not completed:\n{}",
                b.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    // Logging: data page 0x103 (in the region added after SET_LOG_BASE), the
    // status byte's page 5, the used ring's page 2; not the header's page 4.
    read(&mut c, 0, MEM + 0x3000);
    assert_eq!(take_dirty_pages(&log), vec![2, 5, 0x103], "{}", b.log());

    // LOG_ALL off (migration cancelled): nothing is logged any more.
    assert_eq!(
        c.request(SET_FEATURES, &base.to_le_bytes(), &[]),
        Outcome::Accepted
    );
    read(&mut c, 1, MEM + 0x5000);
    assert_eq!(take_dirty_pages(&log), Vec::<u64>::new(), "{}", b.log());
    assert!(
        b.log().contains("dirty page logging stopped"),
        "{}",
        b.log()
    );
    // SAFETY: unmapping our own mapping; nothing uses it any more.
    unsafe { libc::munmap(guest.cast(), 2 * MEM as usize) };
}
