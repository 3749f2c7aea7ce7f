//! iSCSI over TCP: PDU framing on a non-blocking socket, with data moved by
//! `readv`/`writev` straight between the socket and guest memory.
//!
//! Sending gathers several queued PDUs (headers, guest data, padding,
//! digests) into one `writev`. Receiving reads a header, asks the session
//! where its data segment goes, then `readv`s the data straight there.
//!
//! Receiving reads ahead: the session names the Data-In PDUs it expects next
//! (its reads in the order they were sent, which is the order tgt and LIO
//! answer in), and one `readv` asks for the current PDU's data, then for each
//! expected PDU its header, its data straight into that read's guest buffer,
//! its pad and digest, and finally one more header. A stream of Data-In
//! PDUs then costs one system call per batch. Each guess is checked against
//! the header that actually arrived; from the first wrong one on, the bytes
//! are copied out, zeroed where they landed (buffers of reads still in
//! flight, which must not keep another read's data), and framed again from
//! the copy. A guessed PDU cut short by the end of the read is treated the
//! same way: the rest of it is planned only after the PDUs before it have
//! reached the session, which may have ended that read meanwhile. No two
//! guesses, and no guess and the PDU being received, name overlapping memory.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use libc::iovec;

use super::{
    ExpectedDataIn, InPdu, OutPdu, PduData, RecvPlan, RecvPlanner, Transport, TransportError,
    BHS_LEN,
};

const DIGEST_LEN: usize = 4;
/// BHS + the largest AHS (255 words) + header digest.
const MAX_HEADER: usize = BHS_LEN + 255 * 4 + DIGEST_LEN;
/// Most iovecs handed to one writev/readv (IOV_MAX is 1024).
const MAX_IOV: usize = 1024;
/// Scratch size for data the session refused.
const DISCARD_CHUNK: usize = 64 * 1024;
/// Most Data-In PDUs guessed ahead in one read.
const MAX_GUESSES: usize = 32;
/// Most bytes of guessed PDUs in one read (more than a socket buffer holds).
const MAX_READ_AHEAD: usize = 1 << 20;

/// A queued outgoing PDU with its framing.
struct Outgoing {
    head: [u8; BHS_LEN + DIGEST_LEN],
    head_len: usize,
    data: PduData,
    trailer: [u8; 3 + DIGEST_LEN],
    trailer_len: usize,
}

impl Outgoing {
    fn total(&self) -> usize {
        self.head_len + self.data.len() as usize + self.trailer_len
    }

    /// Appends this PDU's iovecs, skipping its first `skip` bytes.
    fn push_iovecs(&self, skip: usize, out: &mut Vec<iovec>) {
        let start = out.len();
        out.push(iovec {
            iov_base: self.head.as_ptr() as *mut _,
            iov_len: self.head_len,
        });
        match &self.data {
            PduData::None => {}
            PduData::Owned(v) => {
                if !v.is_empty() {
                    out.push(iovec {
                        iov_base: v.as_ptr() as *mut _,
                        iov_len: v.len(),
                    })
                }
            }
            PduData::Buffer { buf, offset, len } => {
                buf.iovecs_range(*offset, *len as u64, out);
            }
        }
        if self.trailer_len > 0 {
            out.push(iovec {
                iov_base: self.trailer.as_ptr() as *mut _,
                iov_len: self.trailer_len,
            });
        }
        trim_front(out, start, skip);
    }
}

/// Drops the first `skip` bytes of `iov[start..]`.
fn trim_front(iov: &mut Vec<iovec>, start: usize, mut skip: usize) {
    let mut i = start;
    while skip > 0 && i < iov.len() {
        if iov[i].iov_len <= skip {
            skip -= iov[i].iov_len;
            i += 1;
        } else {
            // SAFETY: skip < iov_len, the pointer stays inside the segment.
            iov[i].iov_base = unsafe { iov[i].iov_base.cast::<u8>().add(skip) }.cast();
            iov[i].iov_len -= skip;
            skip = 0;
        }
    }
    iov.drain(start..i);
}

/// Where the current data segment is going.
enum DataDest {
    Direct(Vec<iovec>),
    Owned(Vec<u8>),
    Discard,
}

/// Receive state: reading a header, or reading a data segment (+pad+digest).
struct RecvState {
    /// The header being received, in stream order (BHS, AHS, digest).
    hdr: Box<[u8; MAX_HEADER]>,
    hdr_got: usize,
    hdr_len: usize,
    /// The header whose data segment is being read.
    cur_bhs: [u8; BHS_LEN],
    in_data: bool,
    dest: DataDest,
    data_len: usize,
    data_got: usize,
    trailer: [u8; 3 + DIGEST_LEN],
    trailer_len: usize,
    trailer_got: usize,
    /// The last read returned less than it asked for: the socket had nothing
    /// more, so the next read would only find EAGAIN. Skip it; the worker's
    /// level-triggered epoll reports the socket again when data arrives.
    drained: bool,
    /// Complete PDUs from one read, handed out one per `recv`.
    ready: VecDeque<InPdu>,
    /// Bytes read from the socket ahead of where they belong (a guessed
    /// Data-In was another PDU): consumed before the socket is read again.
    replay: Vec<u8>,
    replay_pos: usize,
    /// Scratch for the read-ahead: guesses, their iovecs, and the headers and
    /// trailers of guessed PDUs.
    guesses: Vec<ExpectedDataIn>,
    guess_iov: Vec<iovec>,
    slot_hdrs: Vec<[u8; BHS_LEN + DIGEST_LEN]>,
    slot_trailers: Vec<[u8; 3 + DIGEST_LEN]>,
    slots: Vec<Slot>,
    /// Guest memory a read-ahead already names (start, end), so that no
    /// two parts of one read land in the same bytes.
    taken: Vec<(usize, usize)>,
}

impl RecvState {
    fn new() -> Self {
        RecvState {
            hdr: Box::new([0u8; MAX_HEADER]),
            hdr_got: 0,
            hdr_len: BHS_LEN,
            cur_bhs: [0u8; BHS_LEN],
            in_data: false,
            dest: DataDest::Discard,
            data_len: 0,
            data_got: 0,
            trailer: [0u8; 3 + DIGEST_LEN],
            trailer_len: 0,
            trailer_got: 0,
            drained: false,
            ready: VecDeque::new(),
            replay: Vec::new(),
            replay_pos: 0,
            guesses: Vec::new(),
            guess_iov: Vec::new(),
            slot_hdrs: Vec::new(),
            slot_trailers: Vec::new(),
            slots: Vec::new(),
            taken: Vec::new(),
        }
    }

    /// Accounts `n` more header bytes; once the BHS is in, the full header
    /// length (AHS, digest) is known.
    fn got_header_bytes(&mut self, n: usize, header_digest: bool) {
        self.hdr_got += n;
        if self.hdr_got >= BHS_LEN && self.hdr_len == BHS_LEN {
            self.hdr_len =
                BHS_LEN + self.hdr[4] as usize * 4 + if header_digest { DIGEST_LEN } else { 0 };
        }
    }
}

/// One guessed PDU of a read-ahead: where its header, data and trailer go.
struct Slot {
    /// Index into `guesses`, or None for the plain header that ends the read.
    guess: Option<usize>,
    /// Offset of its header in the bytes the readv asked for.
    start: usize,
    data_len: usize,
    trailer_len: usize,
}

/// Pad and digest bytes after a data segment of `len` bytes.
fn trailer_len(len: usize, data_digest: bool) -> usize {
    (4 - len % 4) % 4 + if data_digest { DIGEST_LEN } else { 0 }
}

/// Calls `f(pointer, n)` for each piece of the `len` bytes that start `skip`
/// bytes into the area `iov` describes.
fn pieces(iov: &[iovec], mut skip: usize, mut len: usize, mut f: impl FnMut(*mut u8, usize)) {
    for v in iov {
        if len == 0 {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - skip).min(len);
        // SAFETY: skip < iov_len, so the pointer stays inside the iovec.
        f(unsafe { v.iov_base.cast::<u8>().add(skip) }, n);
        len -= n;
        skip = 0;
    }
}

/// Copies `len` bytes, starting `skip` bytes into the area `iov` describes, to `out`.
fn gather(iov: &[iovec], skip: usize, len: usize, out: &mut Vec<u8>) {
    pieces(iov, skip, len, |p, n| {
        // SAFETY: the iovec was just filled by readv and points into memory we
        // may read (our buffers, or guest buffers of commands in flight); the
        // piece lies inside it.
        out.extend_from_slice(unsafe { std::slice::from_raw_parts(p, n) });
    });
}

/// Zeroes `len` bytes, starting `skip` bytes into the area `iov` describes.
fn zero(iov: &[iovec], skip: usize, len: usize) {
    pieces(iov, skip, len, |p, n| {
        // SAFETY: as in `gather`; memory we may write (our buffers, or guest
        // buffers of commands in flight, which readv just wrote).
        unsafe { std::ptr::write_bytes(p, 0, n) };
    });
}

/// Copies bytes from `src` into the area `iov` describes; returns how many.
fn scatter(src: &[u8], iov: &[iovec]) -> usize {
    let mut done = 0;
    for v in iov {
        if done == src.len() {
            break;
        }
        let n = v.iov_len.min(src.len() - done);
        // SAFETY: the iovec points into memory we may write (our buffers, or
        // the guest buffer of a command in flight), at least n bytes long.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), v.iov_base.cast(), n) };
        done += n;
    }
    done
}

/// Whether two iovec lists name the same memory, piece by piece.
fn same_iovecs(a: &[iovec], b: &[iovec]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.iov_base == y.iov_base && x.iov_len == y.iov_len)
}

/// CRC32C of the data the iovecs hold followed by `pad` bytes.
fn data_crc(iov: &[iovec], pad: &[u8]) -> u32 {
    let mut crc = 0u32;
    for v in iov {
        // SAFETY: the iovec covers a buffer just written by readv or a copy.
        let s = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
        crc = crc32c::crc32c_append(crc, s);
    }
    crc32c::crc32c_append(crc, pad)
}

/// One TCP connection to a portal.
pub struct TcpConnection {
    stream: TcpStream,
    addr: String,
    header_digest: bool,
    data_digest: bool,
    max_recv_data: u32,
    send_q: VecDeque<Outgoing>,
    sent_of_front: usize,
    iov_scratch: Vec<iovec>,
    recv: RecvState,
    discard: Box<[u8]>,
    /// readv calls on the socket (the read-ahead's measure of success).
    socket_reads: u64,
    /// The socket's SO_RCVLOWAT (see [`Transport::set_receive_batch`]).
    rcvlowat: usize,
}

// SAFETY: the raw pointers held in iovecs point into buffers owned by queued
// PDUs (Arc<IoBuffers> keeps guest memory mapped) or by the session's tasks,
// which outlive any read into them; the connection is used by one thread at a time.
unsafe impl Send for TcpConnection {}

impl TcpConnection {
    /// Connects to `addr` ("host:port") within `timeout`.
    pub fn connect(addr: &str, timeout: Duration) -> Result<Self, TransportError> {
        let err = |source| TransportError::Connect {
            addr: addr.to_string(),
            source,
        };
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs().map_err(err)?.collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        for a in addrs {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    s.set_nodelay(true).map_err(err)?;
                    s.set_nonblocking(true).map_err(err)?;
                    return Ok(TcpConnection {
                        stream: s,
                        addr: addr.to_string(),
                        header_digest: false,
                        data_digest: false,
                        max_recv_data: 8192,
                        send_q: VecDeque::new(),
                        sent_of_front: 0,
                        iov_scratch: Vec::with_capacity(64),
                        recv: RecvState::new(),
                        // Allocated on first use: most connections never discard data.
                        discard: Box::default(),
                        socket_reads: 0,
                        rcvlowat: 1,
                    });
                }
                Err(e) => last = e,
            }
        }
        Err(err(last))
    }

    /// The portal, for log lines.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Turns CRC32C header/data digests on or off (after login negotiated them).
    pub fn set_digests(&mut self, header: bool, data: bool) {
        self.header_digest = header;
        self.data_digest = data;
        // A header that already arrived (read along with the last login
        // response) is as long as the new setting says.
        let r = &mut self.recv;
        if !r.in_data && r.hdr_got >= BHS_LEN {
            r.hdr_len = BHS_LEN + r.hdr[4] as usize * 4 + if header { DIGEST_LEN } else { 0 };
        }
    }

    /// Largest data segment we accept (our MaxRecvDataSegmentLength).
    pub fn set_max_recv_data(&mut self, max: u32) {
        self.max_recv_data = max;
    }

    /// Sets SO_RCVLOWAT: epoll reports the socket readable once `bytes` are
    /// queued (reads still take whatever is there). Only changes cost a
    /// system call.
    pub fn set_receive_batch(&mut self, bytes: usize) {
        let bytes = bytes.clamp(1, i32::MAX as usize);
        if bytes == self.rcvlowat {
            return;
        }
        let v = bytes as libc::c_int;
        // SAFETY: a valid socket and a c_int option value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        // On failure the mark stays as it was and the next call tries again.
        if rc == 0 {
            self.rcvlowat = bytes;
        }
    }

    /// How many times the socket was read so far.
    pub fn socket_reads(&self) -> u64 {
        self.socket_reads
    }

    /// The socket, for epoll.
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Whether PDUs are waiting for the socket to accept them.
    pub fn has_pending_output(&self) -> bool {
        !self.send_q.is_empty()
    }

    /// Queues a PDU; [`flush`](Self::flush) sends it.
    pub fn queue(&mut self, pdu: OutPdu) {
        let mut head = [0u8; BHS_LEN + DIGEST_LEN];
        head[..BHS_LEN].copy_from_slice(&pdu.bhs);
        let mut head_len = BHS_LEN;
        if self.header_digest {
            let d = crc32c::crc32c(&pdu.bhs);
            head[BHS_LEN..].copy_from_slice(&d.to_le_bytes());
            head_len += DIGEST_LEN;
        }
        let len = pdu.data.len() as usize;
        let pad = (4 - len % 4) % 4;
        let mut trailer = [0u8; 3 + DIGEST_LEN];
        let mut trailer_len = pad;
        if self.data_digest && len > 0 {
            let mut crc = 0u32;
            match &pdu.data {
                PduData::None => {}
                PduData::Owned(v) => crc = crc32c::crc32c_append(crc, v),
                PduData::Buffer { buf, offset, len } => {
                    let mut iov = Vec::new();
                    buf.iovecs_range(*offset, *len as u64, &mut iov);
                    for v in &iov {
                        // SAFETY: the iovec covers live guest memory held by `buf`;
                        // reading it as bytes is sound even if the guest writes concurrently
                        // (the digest then simply won't match on the target side).
                        let s = unsafe {
                            std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                        };
                        crc = crc32c::crc32c_append(crc, s);
                    }
                }
            }
            crc = crc32c::crc32c_append(crc, &[0u8; 3][..pad]);
            trailer[pad..pad + DIGEST_LEN].copy_from_slice(&crc.to_le_bytes());
            trailer_len += DIGEST_LEN;
        }
        self.send_q.push_back(Outgoing {
            head,
            head_len,
            data: pdu.data,
            trailer,
            trailer_len,
        });
    }

    /// Sends as much of the queue as the socket takes, several PDUs per
    /// `writev`. Returns true when the queue is empty.
    pub fn flush(&mut self) -> Result<bool, TransportError> {
        while !self.send_q.is_empty() {
            let mut iov = std::mem::take(&mut self.iov_scratch);
            iov.clear();
            let mut skip = self.sent_of_front;
            for pdu in &self.send_q {
                if iov.len() + 3 > MAX_IOV {
                    break;
                }
                pdu.push_iovecs(skip, &mut iov);
                skip = 0;
            }
            iov.truncate(MAX_IOV);
            // SAFETY: every iovec points into memory owned by a queued PDU (its
            // header array, its Vec, or guest memory kept mapped by its Arc<IoBuffers>).
            let n = unsafe { libc::writev(self.fd(), iov.as_ptr(), iov.len() as i32) };
            self.iov_scratch = iov;
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(false),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(self.io_err(e)),
                }
            }
            let mut n = n as usize;
            while n > 0 {
                let Some(front) = self.send_q.front() else {
                    break;
                };
                let left = front.total() - self.sent_of_front;
                if n >= left {
                    n -= left;
                    self.sent_of_front = 0;
                    self.send_q.pop_front();
                } else {
                    self.sent_of_front += n;
                    n = 0;
                }
            }
        }
        Ok(true)
    }

    fn io_err(&self, source: io::Error) -> TransportError {
        io_error(&self.addr, source)
    }

    fn malformed(&self, reason: String) -> TransportError {
        TransportError::Malformed {
            addr: self.addr.clone(),
            reason,
        }
    }

    /// Receives the next complete PDU without blocking (Ok(None): need more
    /// bytes). `planner` is asked once per header with a data segment where
    /// the data goes; a `Direct` plan must cover exactly DataSegmentLength bytes.
    ///
    /// Reads ahead: a read also asks for the next header and, when the planner
    /// names the Data-In PDUs it expects next, for those PDUs whole, their data
    /// straight into their tasks' buffers, so a stream of Data-In PDUs costs one
    /// system call per batch rather than one or two per PDU. Each guess is
    /// checked against the header that arrived before its PDU is handed out;
    /// from the first wrong guess on, the bytes are copied out and read again
    /// from that copy.
    pub fn recv(&mut self, planner: &mut dyn RecvPlanner) -> Result<Option<InPdu>, TransportError> {
        loop {
            if let Some(p) = self.recv.ready.pop_front() {
                return Ok(Some(p));
            }
            let r = &self.recv;
            if !r.in_data && r.hdr_got >= r.hdr_len {
                self.start_pdu(planner)?;
                continue;
            }
            if r.in_data && r.data_got == r.data_len && r.trailer_got == r.trailer_len {
                self.finish_pdu()?;
                continue;
            }
            if !self.read_more(planner)? {
                return Ok(None);
            }
        }
    }

    /// A whole header is in `recv.hdr`: checks it and starts its data segment
    /// (or queues the PDU when it has none).
    fn start_pdu(&mut self, planner: &mut dyn RecvPlanner) -> Result<(), TransportError> {
        let r = &mut self.recv;
        let ahs = r.hdr[4] as usize * 4;
        if self.header_digest {
            let got = u32::from_le_bytes(
                r.hdr[BHS_LEN + ahs..BHS_LEN + ahs + 4]
                    .try_into()
                    .unwrap_or_default(),
            );
            if crc32c::crc32c(&r.hdr[..BHS_LEN + ahs]) != got {
                return Err(TransportError::Digest {
                    what: "header",
                    addr: self.addr.clone(),
                    opcode: r.hdr[0] & 0x3f,
                });
            }
        }
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(&r.hdr[..BHS_LEN]);
        r.hdr_got = 0;
        r.hdr_len = BHS_LEN;
        let dsl = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]);
        if dsl == 0 {
            r.ready.push_back(InPdu {
                bhs,
                data: Vec::new(),
            });
            return Ok(());
        }
        if dsl > self.max_recv_data {
            return Err(self.malformed(format!(
                "data segment of {dsl} bytes exceeds our MaxRecvDataSegmentLength {} (opcode {:#04x})",
                self.max_recv_data,
                bhs[0] & 0x3f
            )));
        }
        let dest = match planner.plan(&bhs) {
            RecvPlan::Direct(iov) => {
                let covered: usize = iov.iter().map(|v| v.iov_len).sum();
                if covered != dsl as usize {
                    return Err(self.malformed(format!(
                        "internal: receive plan covers {covered} of {dsl} bytes"
                    )));
                }
                DataDest::Direct(iov)
            }
            RecvPlan::Owned => DataDest::Owned(vec![0u8; dsl as usize]),
            RecvPlan::Discard => DataDest::Discard,
        };
        let r = &mut self.recv;
        r.cur_bhs = bhs;
        r.in_data = true;
        r.dest = dest;
        r.data_len = dsl as usize;
        r.data_got = 0;
        r.trailer_len = trailer_len(dsl as usize, self.data_digest);
        r.trailer_got = 0;
        Ok(())
    }

    /// The current data segment is complete: checks its digest, queues the PDU.
    fn finish_pdu(&mut self) -> Result<(), TransportError> {
        let r = &mut self.recv;
        r.in_data = false;
        let bhs = r.cur_bhs;
        let dest = std::mem::replace(&mut r.dest, DataDest::Discard);
        if self.data_digest {
            let pad = r.trailer_len - DIGEST_LEN;
            let crc = match &dest {
                DataDest::Direct(iov) => Some(data_crc(iov, &r.trailer[..pad])),
                DataDest::Owned(v) => {
                    Some(crc32c::crc32c_append(crc32c::crc32c(v), &r.trailer[..pad]))
                }
                // Refused data is not checked: the connection is being dropped anyway.
                DataDest::Discard => None,
            };
            let got = u32::from_le_bytes(
                r.trailer[pad..pad + DIGEST_LEN]
                    .try_into()
                    .unwrap_or_default(),
            );
            if crc.is_some_and(|c| c != got) {
                return Err(TransportError::Digest {
                    what: "data",
                    addr: self.addr.clone(),
                    opcode: bhs[0] & 0x3f,
                });
            }
        }
        let data = match dest {
            DataDest::Owned(v) => v,
            _ => Vec::new(),
        };
        self.recv.ready.push_back(InPdu { bhs, data });
        Ok(())
    }

    /// Appends iovecs for what the current PDU still lacks: the rest of its
    /// header, or the rest of its data segment and trailer. True when they end
    /// where the next PDU begins.
    fn need_iovecs(&mut self, iov: &mut Vec<iovec>) -> bool {
        let r = &mut self.recv;
        if !r.in_data {
            iov.push(iovec {
                // SAFETY: hdr_got < hdr_len <= MAX_HEADER, inside the header buffer.
                iov_base: unsafe { r.hdr.as_mut_ptr().add(r.hdr_got) }.cast(),
                iov_len: r.hdr_len - r.hdr_got,
            });
            return false;
        }
        let data_left = r.data_len - r.data_got;
        let mut whole = true;
        if data_left > 0 {
            match &mut r.dest {
                DataDest::Direct(d) => {
                    let start = iov.len();
                    iov.extend_from_slice(d);
                    trim_front(iov, start, r.data_got);
                }
                DataDest::Owned(v) => iov.push(iovec {
                    // SAFETY: data_got < len of the owned buffer.
                    iov_base: unsafe { v.as_mut_ptr().add(r.data_got) }.cast(),
                    iov_len: data_left,
                }),
                DataDest::Discard => {
                    if self.discard.is_empty() {
                        self.discard = vec![0u8; DISCARD_CHUNK].into_boxed_slice();
                    }
                    let n = data_left.min(self.discard.len());
                    whole = n == data_left;
                    iov.push(iovec {
                        iov_base: self.discard.as_mut_ptr().cast(),
                        iov_len: n,
                    })
                }
            }
        }
        // Room for the trailer and a header after it.
        if iov.len() > MAX_IOV - 2 {
            iov.truncate(MAX_IOV - 2);
            whole = false;
        }
        if whole && r.trailer_got < r.trailer_len {
            iov.push(iovec {
                // SAFETY: within the trailer array.
                iov_base: unsafe { r.trailer.as_mut_ptr().add(r.trailer_got) }.cast(),
                iov_len: r.trailer_len - r.trailer_got,
            });
        }
        whole
    }

    /// Accounts `n` bytes read into what [`need_iovecs`](Self::need_iovecs) described.
    fn advance(&mut self, n: usize) {
        let r = &mut self.recv;
        if !r.in_data {
            let take = n.min(r.hdr_len - r.hdr_got);
            r.got_header_bytes(take, self.header_digest);
            return;
        }
        let d = n.min(r.data_len - r.data_got);
        r.data_got += d;
        r.trailer_got += (n - d).min(r.trailer_len - r.trailer_got);
    }

    /// Reads more of the current PDU: from bytes read ahead earlier if any are
    /// waiting, else from the socket (with read-ahead). False when nothing can
    /// be read now.
    fn read_more(&mut self, planner: &mut dyn RecvPlanner) -> Result<bool, TransportError> {
        let mut iov = std::mem::take(&mut self.iov_scratch);
        iov.clear();
        if self.recv.replay_pos < self.recv.replay.len() {
            self.need_iovecs(&mut iov);
            let r = &mut self.recv;
            let n = scatter(&r.replay[r.replay_pos..], &iov);
            r.replay_pos += n;
            if r.replay_pos == r.replay.len() {
                r.replay.clear();
                r.replay_pos = 0;
            }
            self.iov_scratch = iov;
            self.advance(n);
            return Ok(true);
        }
        if std::mem::take(&mut self.recv.drained) {
            self.iov_scratch = iov;
            return Ok(false);
        }
        // Between PDUs the read starts with the next header, in a read-ahead slot.
        let at_boundary = if !self.recv.in_data && self.recv.hdr_got == 0 {
            true
        } else {
            self.need_iovecs(&mut iov)
        };
        let want: usize = iov.iter().map(|v| v.iov_len).sum();
        let mut slots = std::mem::take(&mut self.recv.slots);
        slots.clear();
        if at_boundary {
            self.plan_read_ahead(planner, &mut iov, want, &mut slots);
        }
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        // SAFETY: every iovec points into live memory we may write: our header,
        // trailer and scratch buffers, or guest buffers of commands in flight
        // (kept mapped by their tasks, which the planner borrows for this call).
        let n = unsafe { libc::readv(self.stream.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        self.socket_reads += 1;
        let n = match read_outcome(n, &self.addr)? {
            Read::Got(n) => n,
            Read::WouldBlock => {
                self.iov_scratch = iov;
                self.recv.slots = slots;
                return Ok(false);
            }
            Read::Interrupted => {
                self.iov_scratch = iov;
                self.recv.slots = slots;
                return Ok(true);
            }
        };
        self.recv.drained = n < total;
        self.advance(n.min(want));
        if n > want {
            // The current PDU is whole; the rest belongs to the read-ahead.
            if self.recv.in_data {
                self.finish_pdu()?;
            }
            self.take_read_ahead(planner, &iov, &slots, n);
        }
        self.iov_scratch = iov;
        self.recv.slots = slots;
        Ok(true)
    }

    /// Appends read-ahead iovecs after the `want` bytes already listed: for
    /// each Data-In the planner expects, a header slot, the task's buffer and a
    /// trailer slot; then a slot for one more header.
    fn plan_read_ahead(
        &mut self,
        planner: &mut dyn RecvPlanner,
        iov: &mut Vec<iovec>,
        want: usize,
        slots: &mut Vec<Slot>,
    ) {
        if iov.len() >= MAX_IOV {
            return;
        }
        let hl = self.slot_header_len();
        let r = &mut self.recv;
        r.guesses.clear();
        r.guess_iov.clear();
        planner.expected(MAX_GUESSES, &mut r.guesses, &mut r.guess_iov);
        // The Data-In being received is not yet known to the session, which
        // may guess it again: its buffer must not be read into twice. Nor may
        // any other buffer be (a planner listing a task twice).
        let current = (r.in_data && r.cur_bhs[0] & 0x3f == 0x25).then(|| {
            u32::from_be_bytes([r.cur_bhs[16], r.cur_bhs[17], r.cur_bhs[18], r.cur_bhs[19]])
        });
        let mut seen = 0;
        while seen < r.guesses.len() {
            let itt = r.guesses[seen].itt;
            if Some(itt) == current || r.guesses[..seen].iter().any(|g| g.itt == itt) {
                r.guesses.remove(seen);
            } else {
                seen += 1;
            }
        }
        let n_slots = r.guesses.len().min(MAX_GUESSES) + 1;
        if r.slot_hdrs.len() < n_slots {
            r.slot_hdrs.resize(n_slots, [0u8; BHS_LEN + DIGEST_LEN]);
            r.slot_trailers.resize(n_slots, [0u8; 3 + DIGEST_LEN]);
        }
        // Guest buffers may overlap (two reads into one buffer are legal):
        // bytes of one PDU must never land where another part of the same
        // read goes, or a wrong guess would hand one read's data to another.
        r.taken.clear();
        if r.in_data {
            if let DataDest::Direct(d) = &r.dest {
                r.taken.extend(d.iter().map(|v| {
                    let a = v.iov_base as usize;
                    (a, a + v.iov_len)
                }));
            }
        }
        let mut pos = want;
        let mut budget = MAX_READ_AHEAD;
        for (gi, g) in r.guesses.iter().enumerate().take(MAX_GUESSES) {
            let len = g.len as usize;
            let tl = trailer_len(len, self.data_digest);
            let Some(data) = r.guess_iov.get(g.iov_start..g.iov_end) else {
                break;
            };
            let covered: usize = data.iter().map(|v| v.iov_len).sum();
            if len == 0
                || len > self.max_recv_data as usize
                || covered != len
                || hl + len + tl > budget
                || iov.len() + data.len() + 3 > MAX_IOV
            {
                break;
            }
            let overlaps = data.iter().any(|v| {
                let (a, b) = (v.iov_base as usize, v.iov_base as usize + v.iov_len);
                r.taken.iter().any(|&(x, y)| a < y && x < b)
            });
            if overlaps {
                break;
            }
            r.taken.extend(data.iter().map(|v| {
                let a = v.iov_base as usize;
                (a, a + v.iov_len)
            }));
            let k = slots.len();
            iov.push(iovec {
                iov_base: r.slot_hdrs[k].as_mut_ptr().cast(),
                iov_len: hl,
            });
            iov.extend_from_slice(data);
            if tl > 0 {
                iov.push(iovec {
                    iov_base: r.slot_trailers[k].as_mut_ptr().cast(),
                    iov_len: tl,
                });
            }
            slots.push(Slot {
                guess: Some(gi),
                start: pos,
                data_len: len,
                trailer_len: tl,
            });
            pos += hl + len + tl;
            budget -= hl + len + tl;
        }
        let k = slots.len();
        iov.push(iovec {
            iov_base: r.slot_hdrs[k].as_mut_ptr().cast(),
            iov_len: hl,
        });
        slots.push(Slot {
            guess: None,
            start: pos,
            data_len: 0,
            trailer_len: 0,
        });
    }

    /// Header bytes a read-ahead slot takes: the BHS and, if negotiated, its digest.
    fn slot_header_len(&self) -> usize {
        BHS_LEN + if self.header_digest { DIGEST_LEN } else { 0 }
    }

    /// Whether a read-ahead header is the Data-In that was guessed: digest
    /// good, no AHS, that task, all of its data at offset 0.
    fn guess_matches(&self, hdr: &[u8; BHS_LEN + DIGEST_LEN], g: &ExpectedDataIn) -> bool {
        if self.header_digest {
            let got = u32::from_le_bytes([hdr[48], hdr[49], hdr[50], hdr[51]]);
            if crc32c::crc32c(&hdr[..BHS_LEN]) != got {
                return false;
            }
        }
        let itt = u32::from_be_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]);
        let dsl = u32::from_be_bytes([0, hdr[5], hdr[6], hdr[7]]);
        let offset = u32::from_be_bytes([hdr[40], hdr[41], hdr[42], hdr[43]]);
        hdr[0] & 0x3f == 0x25 && hdr[4] == 0 && itt == g.itt && dsl == g.len && offset == 0
    }

    /// Sorts out the bytes a read brought past the current PDU (`n` in all):
    /// PDUs whose guess was right and that came whole are queued; from the
    /// first other one on, every byte is set aside to be framed again; a
    /// header cut short by the end of the read continues in the header buffer.
    fn take_read_ahead(
        &mut self,
        planner: &mut dyn RecvPlanner,
        iov: &[iovec],
        slots: &[Slot],
        n: usize,
    ) {
        let hl = self.slot_header_len();
        for (k, slot) in slots.iter().enumerate() {
            if n <= slot.start {
                return;
            }
            let got = n - slot.start;
            let hdr = self.recv.slot_hdrs[k];
            let guess = slot.guess.map(|gi| self.recv.guesses[gi]);
            let Some(g) = guess.filter(|_| got >= hl) else {
                // A plain header, or a guessed one cut short: go on with it
                // in the header buffer.
                let m = got.min(hl);
                let r = &mut self.recv;
                r.hdr[..m].copy_from_slice(&hdr[..m]);
                r.hdr_got = 0;
                r.hdr_len = BHS_LEN;
                r.got_header_bytes(m, self.header_digest);
                return;
            };
            let mut bhs = [0u8; BHS_LEN];
            bhs.copy_from_slice(&hdr[..BHS_LEN]);
            // Taken as it is only when it is the guessed Data-In, whole, the
            // session still plans it into the guessed buffer, and its digest
            // holds. Anything else is set aside, with all after it, and framed
            // again later: another PDU came first (its bytes went to the
            // guessed buffer), or the PDU is cut short (the rest is planned
            // only after the PDUs before it reached the session, which may end
            // the read meanwhile: a hostile target can answer it twice), or
            // its digest is bad (reported by the ordinary path, after the PDUs
            // before it).
            let whole = got - hl >= slot.data_len + slot.trailer_len;
            let planned = (whole && self.guess_matches(&hdr, &g))
                .then(|| planner.plan(&bhs))
                .and_then(|p| match p {
                    RecvPlan::Direct(p)
                        if same_iovecs(&p, &self.recv.guess_iov[g.iov_start..g.iov_end]) =>
                    {
                        Some(p)
                    }
                    _ => None,
                });
            let taken = planned.is_some_and(|plan| {
                !self.data_digest || {
                    let t = &self.recv.slot_trailers[k];
                    let pad = slot.trailer_len - DIGEST_LEN;
                    let want = u32::from_le_bytes([t[pad], t[pad + 1], t[pad + 2], t[pad + 3]]);
                    data_crc(&plan, &t[..pad]) == want
                }
            });
            if !taken {
                self.set_aside(iov, slot.start, got);
                return;
            }
            self.recv.ready.push_back(InPdu {
                bhs,
                data: Vec::new(),
            });
        }
    }

    /// Copies `len` bytes of a read-ahead, from `start` on, out to be framed
    /// again, and zeroes them where they landed: a guessed buffer must not
    /// keep another read's bytes (its own read may yet fail or come short).
    fn set_aside(&mut self, iov: &[iovec], start: usize, len: usize) {
        let r = &mut self.recv;
        r.replay.clear();
        r.replay_pos = 0;
        gather(iov, start, len, &mut r.replay);
        zero(iov, start, len);
    }
}

/// What a read/readv returned.
enum Read {
    Got(usize),
    WouldBlock,
    Interrupted,
}

/// Interprets a read(2)/readv(2) result: end of stream and errors become
/// transport errors.
fn read_outcome(n: isize, addr: &str) -> Result<Read, TransportError> {
    if n > 0 {
        return Ok(Read::Got(n as usize));
    }
    if n == 0 {
        return Err(TransportError::Closed {
            addr: addr.to_string(),
        });
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::WouldBlock => Ok(Read::WouldBlock),
        io::ErrorKind::Interrupted => Ok(Read::Interrupted),
        _ => Err(io_error(addr, e)),
    }
}

/// A socket error as a transport error; resets and broken pipes mean the peer left.
fn io_error(addr: &str, source: io::Error) -> TransportError {
    if matches!(
        source.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    ) {
        return TransportError::Closed {
            addr: addr.to_string(),
        };
    }
    TransportError::Io {
        addr: addr.to_string(),
        source,
    }
}

impl Transport for TcpConnection {
    fn addr(&self) -> &str {
        TcpConnection::addr(self)
    }
    fn fd(&self) -> RawFd {
        TcpConnection::fd(self)
    }
    fn set_digests(&mut self, header: bool, data: bool) {
        TcpConnection::set_digests(self, header, data)
    }
    fn set_max_recv_data(&mut self, max: u32) {
        TcpConnection::set_max_recv_data(self, max)
    }
    fn queue(&mut self, pdu: OutPdu) {
        TcpConnection::queue(self, pdu)
    }
    fn flush(&mut self) -> Result<bool, TransportError> {
        TcpConnection::flush(self)
    }
    fn has_pending_output(&self) -> bool {
        TcpConnection::has_pending_output(self)
    }
    fn set_receive_batch(&mut self, bytes: usize) {
        TcpConnection::set_receive_batch(self, bytes)
    }
    fn recv(&mut self, planner: &mut dyn RecvPlanner) -> Result<Option<InPdu>, TransportError> {
        TcpConnection::recv(self, planner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::buffer::IoBuffers;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::time::Instant;

    fn pair() -> (TcpConnection, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let c = TcpConnection::connect(&addr, Duration::from_secs(5)).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    fn bhs(opcode: u8, dsl: u32) -> [u8; BHS_LEN] {
        let mut b = [0u8; BHS_LEN];
        b[0] = opcode;
        b[5..8].copy_from_slice(&dsl.to_be_bytes()[1..]);
        b
    }

    fn recv_wait(c: &mut TcpConnection, plan: &mut dyn RecvPlanner) -> InPdu {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(p) = c.recv(plan).unwrap() {
                return p;
            }
            Transport::wait(c, false, deadline).unwrap();
        }
    }

    #[test]
    fn send_gathers_guest_data_with_padding_and_digests() {
        for digests in [false, true] {
            let (mut c, mut s) = pair();
            c.set_digests(digests, digests);
            let buf = Arc::new(IoBuffers::from_vec((0..100u8).collect()));
            c.queue(OutPdu::new(
                bhs(0x05, 10),
                PduData::Buffer {
                    buf: buf.clone(),
                    offset: 5,
                    len: 10,
                },
            ));
            c.queue(OutPdu::new(bhs(0x00, 0), PduData::None));
            c.send_blocking(
                OutPdu::new(bhs(0x04, 3), PduData::Owned(vec![1, 2, 3])),
                Instant::now() + Duration::from_secs(5),
            )
            .unwrap();
            let hd = if digests { 4 } else { 0 };
            let expect = (48 + hd + 12 + hd) + (48 + hd) + (48 + hd + 4 + hd);
            let mut got = vec![0u8; expect];
            s.read_exact(&mut got).unwrap();
            let d0 = &got[48 + hd..48 + hd + 12];
            assert_eq!(&d0[..10], &(5..15u8).collect::<Vec<_>>()[..]);
            assert_eq!(&d0[10..], &[0, 0]);
            if digests {
                let hcrc = u32::from_le_bytes(got[48..52].try_into().unwrap());
                assert_eq!(hcrc, crc32c::crc32c(&got[..48]));
                let dcrc = u32::from_le_bytes(got[52 + 12..52 + 16].try_into().unwrap());
                assert_eq!(dcrc, crc32c::crc32c(d0));
            }
        }
    }

    #[test]
    fn receives_data_straight_into_buffers_and_detects_bad_digest() {
        let (mut c, mut s) = pair();
        c.set_max_recv_data(1 << 20);
        // Two Data-In-like PDUs back to back, one response without data.
        let mut wire = Vec::new();
        wire.extend_from_slice(&bhs(0x25, 6));
        wire.extend_from_slice(&[9, 8, 7, 6, 5, 4, 0, 0]);
        wire.extend_from_slice(&bhs(0x21, 0));
        wire.extend_from_slice(&bhs(0x24, 2));
        wire.extend_from_slice(&[1, 2, 0, 0]);
        s.write_all(&wire).unwrap();
        let target = IoBuffers::from_vec(vec![0u8; 6]);
        let iov = target.iovecs().to_vec();
        let p = recv_wait(&mut c, &mut |b: &[u8; BHS_LEN]| {
            assert_eq!(b[0], 0x25);
            RecvPlan::Direct(iov.clone())
        });
        assert_eq!(p.bhs[0], 0x25);
        let mut back = [0u8; 6];
        target.read_at(0, &mut back);
        assert_eq!(back, [9, 8, 7, 6, 5, 4]);
        let p = recv_wait(&mut c, &mut |_: &[u8; BHS_LEN]| RecvPlan::Discard);
        assert_eq!(p.bhs[0], 0x21);
        let p = recv_wait(&mut c, &mut |_: &[u8; BHS_LEN]| RecvPlan::Owned);
        assert_eq!(p.bhs[0], 0x24);
        assert_eq!(p.data, vec![1, 2]);

        // Data digest mismatch is an error.
        c.set_digests(false, true);
        let mut wire = bhs(0x24, 4).to_vec();
        wire.extend_from_slice(&[1, 2, 3, 4]);
        wire.extend_from_slice(&0xdeadbeefu32.to_le_bytes());
        s.write_all(&wire).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let err = loop {
            match c.recv(&mut |_: &[u8; BHS_LEN]| RecvPlan::Owned) {
                Ok(None) => Transport::wait(&mut c, false, deadline).unwrap(),
                Ok(Some(_)) => panic!("bad digest accepted"),
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("data digest mismatch"), "{err}");
    }

    /// A Data-In header for task `itt`: `dsl` bytes at `offset`.
    fn data_in(itt: u32, dsl: u32, offset: u32) -> [u8; BHS_LEN] {
        let mut b = bhs(0x25, dsl);
        b[16..20].copy_from_slice(&itt.to_be_bytes());
        b[40..44].copy_from_slice(&offset.to_be_bytes());
        b
    }

    /// Appends a PDU as a target would send it.
    fn put(wire: &mut Vec<u8>, h: &[u8; BHS_LEN], data: &[u8], digests: bool) {
        wire.extend_from_slice(h);
        if digests {
            wire.extend_from_slice(&crc32c::crc32c(h).to_le_bytes());
        }
        if data.is_empty() {
            return;
        }
        let pad = (4 - data.len() % 4) % 4;
        wire.extend_from_slice(data);
        wire.extend_from_slice(&[0u8; 3][..pad]);
        if digests {
            let crc = crc32c::crc32c_append(crc32c::crc32c(data), &[0u8; 3][..pad]);
            wire.extend_from_slice(&crc.to_le_bytes());
        }
    }

    /// Read tasks with buffers, guessed in task order; counts plan calls.
    struct Reads {
        bufs: Vec<(u32, IoBuffers)>,
        plans: usize,
        /// Tasks whose data has all come (the session's data_in check).
        done: Vec<u32>,
    }

    impl Reads {
        fn new(lens: &[(u32, usize)]) -> Self {
            Reads {
                bufs: lens
                    .iter()
                    .map(|&(itt, len)| (itt, IoBuffers::from_vec(vec![0xEE; len])))
                    .collect(),
                plans: 0,
                done: Vec::new(),
            }
        }

        fn data(&self, itt: u32) -> Vec<u8> {
            let b = &self.bufs.iter().find(|(i, _)| *i == itt).unwrap().1;
            let mut v = vec![0u8; b.len() as usize];
            b.read_at(0, &mut v);
            v
        }
    }

    impl RecvPlanner for Reads {
        fn plan(&mut self, h: &[u8; BHS_LEN]) -> RecvPlan {
            self.plans += 1;
            if h[0] != 0x25 {
                return RecvPlan::Owned;
            }
            let itt = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let off = u32::from_be_bytes(h[40..44].try_into().unwrap()) as u64;
            let dsl = u32::from_be_bytes([0, h[5], h[6], h[7]]) as u64;
            let b = &self.bufs.iter().find(|(i, _)| *i == itt).unwrap().1;
            let mut iov = Vec::new();
            assert_eq!(b.iovecs_range(off, dsl, &mut iov), dsl);
            RecvPlan::Direct(iov)
        }

        fn expected(&mut self, max: usize, out: &mut Vec<ExpectedDataIn>, iov: &mut Vec<iovec>) {
            for (itt, b) in self
                .bufs
                .iter()
                .filter(|(i, _)| !self.done.contains(i))
                .take(max)
            {
                let start = iov.len();
                b.iovecs_range(0, b.len(), iov);
                out.push(ExpectedDataIn {
                    itt: *itt,
                    len: b.len() as u32,
                    iov_start: start,
                    iov_end: iov.len(),
                });
            }
        }
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| seed.wrapping_add((i * 7) as u8)).collect()
    }

    /// Receives until `count` PDUs came; returns their opcodes and ITTs.
    fn recv_all(c: &mut TcpConnection, p: &mut Reads, count: usize) -> Vec<(u8, u32)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        while got.len() < count {
            match c.recv(p).unwrap() {
                Some(pdu) => {
                    let itt = u32::from_be_bytes(pdu.bhs[16..20].try_into().unwrap());
                    p.done.push(itt);
                    got.push((pdu.bhs[0] & 0x3f, itt));
                }
                None => Transport::wait(c, false, deadline).unwrap(),
            }
        }
        got
    }

    #[test]
    fn read_ahead_in_order_out_of_order_and_interleaved() {
        for digests in [false, true] {
            // In the guessed order; out of order; a response without data
            // first; a guessed task answered in two pieces.
            let cases: Vec<Vec<(u32, u32, u32)>> = vec![
                vec![(1, 4096, 0), (2, 4096, 0), (3, 1000, 0)],
                vec![(3, 1000, 0), (1, 4096, 0), (2, 4096, 0)],
                vec![(9, 0, 0), (2, 4096, 0), (1, 4096, 0), (3, 1000, 0)],
                vec![(1, 2048, 0), (2, 4096, 0), (1, 2048, 2048), (3, 1000, 0)],
            ];
            for case in cases {
                let (mut c, mut s) = pair();
                c.set_max_recv_data(1 << 20);
                c.set_digests(digests, digests);
                let mut reads = Reads::new(&[(1, 4096), (2, 4096), (3, 1000)]);
                let mut wire = Vec::new();
                for &(itt, dsl, off) in &case {
                    if dsl == 0 {
                        let mut h = bhs(0x21, 0);
                        h[16..20].copy_from_slice(&itt.to_be_bytes());
                        put(&mut wire, &h, &[], digests);
                    } else {
                        let all = pattern(itt as u8, 4096);
                        let data = &all[off as usize..(off + dsl) as usize];
                        put(&mut wire, &data_in(itt, dsl, off), data, digests);
                    }
                }
                s.write_all(&wire).unwrap();
                // Let loopback deliver it all, so one read can take it.
                std::thread::sleep(Duration::from_millis(20));
                let got = recv_all(&mut c, &mut reads, case.len());
                let want: Vec<(u8, u32)> = case
                    .iter()
                    .map(|&(itt, dsl, _)| (if dsl == 0 { 0x21 } else { 0x25 }, itt))
                    .collect();
                assert_eq!(got, want, "digests {digests}, case {case:?}");
                assert_eq!(reads.data(1), pattern(1, 4096), "case {case:?}");
                assert_eq!(reads.data(2), pattern(2, 4096), "case {case:?}");
                assert_eq!(reads.data(3), pattern(3, 1000), "case {case:?}");
                // Every header with data was planned; right guesses only once.
                let with_data = case.iter().filter(|c| c.1 > 0).count();
                assert!(reads.plans >= with_data, "case {case:?}");
                if case[0].0 == 1 && case[0].1 == 4096 {
                    assert_eq!(reads.plans, with_data, "a right guess is planned once");
                    // Three PDUs as guessed: all of them in one system call.
                    assert_eq!(c.socket_reads(), 1, "digests {digests}");
                }
            }
        }
    }

    #[test]
    fn read_ahead_across_partial_reads_and_bad_digest() {
        let (mut c, mut s) = pair();
        c.set_max_recv_data(1 << 20);
        c.set_digests(true, true);
        let mut reads = Reads::new(&[(1, 4096), (2, 4096)]);
        let mut wire = Vec::new();
        put(&mut wire, &data_in(1, 4096, 0), &pattern(1, 4096), true);
        put(&mut wire, &data_in(2, 4096, 0), &pattern(2, 4096), true);
        // Dribble the stream in pieces that end inside headers, data and digests.
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        for chunk in wire.chunks(1500) {
            s.write_all(chunk).unwrap();
            std::thread::sleep(Duration::from_millis(2));
            while let Some(p) = c.recv(&mut reads).unwrap() {
                let itt = u32::from_be_bytes(p.bhs[16..20].try_into().unwrap());
                reads.done.push(itt);
                got.push(itt);
            }
        }
        while got.len() < 2 {
            Transport::wait(&mut c, false, deadline).unwrap();
            while let Some(p) = c.recv(&mut reads).unwrap() {
                let itt = u32::from_be_bytes(p.bhs[16..20].try_into().unwrap());
                reads.done.push(itt);
                got.push(itt);
            }
        }
        assert_eq!(got, vec![1, 2]);
        assert_eq!(reads.data(1), pattern(1, 4096));
        assert_eq!(reads.data(2), pattern(2, 4096));

        // A guessed PDU whose data digest is wrong is refused like any other,
        // and only after the good PDU read with it in the same call.
        let mut reads = Reads::new(&[(1, 4096), (2, 4096)]);
        let mut wire = Vec::new();
        put(&mut wire, &data_in(1, 4096, 0), &pattern(1, 4096), true);
        put(&mut wire, &data_in(2, 4096, 0), &pattern(2, 4096), true);
        let n = wire.len();
        wire[n - 1] ^= 0xff;
        s.write_all(&wire).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut good = Vec::new();
        let err = loop {
            match c.recv(&mut reads) {
                Ok(None) => Transport::wait(&mut c, false, deadline).unwrap(),
                Ok(Some(p)) => {
                    let itt = u32::from_be_bytes(p.bhs[16..20].try_into().unwrap());
                    reads.done.push(itt);
                    good.push(itt);
                }
                Err(e) => break e,
            }
        };
        assert_eq!(good, vec![1], "the PDU before the bad one is handed out");
        assert!(err.to_string().contains("data digest mismatch"), "{err}");
    }

    /// A small deterministic generator (xorshift64*), for random streams.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// What a receiver saw: every PDU (header, owned data) and, per task,
    /// the bytes the stream's Data-In PDUs covered.
    type Seen = (Vec<([u8; BHS_LEN], Vec<u8>)>, Vec<Vec<u8>>, u64);

    fn receive_stream(wire: &[u8], chunks: &[usize], guess: bool, digests: bool) -> Seen {
        let lens = [4096usize, 4096, 1000, 8192];
        let (mut c, mut s) = pair();
        c.set_max_recv_data(1 << 20);
        c.set_digests(digests, digests);
        let mut reads = Reads::new(&[(1, 4096), (2, 4096), (3, 1000), (4, 8192)]);
        let mut pdus = Vec::new();
        let mut covered = vec![vec![false; 8192]; 4];
        let mut at = 0;
        let mut next_chunk = chunks.iter().cycle();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = if guess {
                c.recv(&mut reads).unwrap()
            } else {
                c.recv(&mut |h: &[u8; BHS_LEN]| reads.plan(h)).unwrap()
            };
            match got {
                Some(p) => {
                    if p.bhs[0] & 0x3f == 0x25 {
                        let itt = u32::from_be_bytes(p.bhs[16..20].try_into().unwrap());
                        let off = u32::from_be_bytes(p.bhs[40..44].try_into().unwrap()) as usize;
                        let dsl = u32::from_be_bytes([0, p.bhs[5], p.bhs[6], p.bhs[7]]) as usize;
                        reads.done.push(itt);
                        covered[(itt - 1) as usize][off..off + dsl].fill(true);
                    }
                    pdus.push((p.bhs, p.data));
                }
                None if at < wire.len() => {
                    let n = (*next_chunk.next().unwrap()).min(wire.len() - at);
                    s.write_all(&wire[at..at + n]).unwrap();
                    at += n;
                }
                None => {
                    if pdus.len() == wire_pdus(wire, digests) {
                        break;
                    }
                    Transport::wait(&mut c, false, deadline).unwrap();
                }
            }
        }
        let data = (0..4)
            .map(|t| {
                let all = reads.data(t as u32 + 1);
                (0..lens[t])
                    .filter(|&i| covered[t][i])
                    .map(|i| all[i])
                    .collect()
            })
            .collect();
        (pdus, data, c.socket_reads())
    }

    /// Counts the PDUs in a well-formed stream.
    fn wire_pdus(wire: &[u8], digests: bool) -> usize {
        let hd = if digests { 4 } else { 0 };
        let (mut at, mut n) = (0, 0);
        while at < wire.len() {
            let dsl = u32::from_be_bytes([0, wire[at + 5], wire[at + 6], wire[at + 7]]) as usize;
            at += BHS_LEN + hd;
            if dsl > 0 {
                at += dsl + (4 - dsl % 4) % 4 + hd;
            }
            n += 1;
        }
        n
    }

    #[test]
    fn read_ahead_receives_exactly_what_plain_reads_do() {
        // Random streams of Data-In (whole, split, out of order), responses
        // with and without sense data and pings, cut into random pieces: with
        // read-ahead the PDUs, their order and the data in the tasks' buffers
        // must be those of reading one PDU at a time.
        let lens = [4096u32, 4096, 1000, 8192];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut plain_reads, mut ahead_reads) = (0, 0);
        for round in 0..60 {
            let digests = round % 3 == 0;
            let mut wire = Vec::new();
            let mut order: Vec<u32> = (1..=4).collect();
            if rng.below(2) == 0 {
                order.swap(rng.below(4) as usize, rng.below(4) as usize);
            }
            for &itt in &order {
                let len = lens[(itt - 1) as usize];
                let data = pattern(itt as u8 + round as u8, len as usize);
                match rng.below(4) {
                    0 => {
                        // In two pieces.
                        let cut = (rng.below(len as u64 / 4 - 1) as u32 + 1) * 4;
                        put(
                            &mut wire,
                            &data_in(itt, cut, 0),
                            &data[..cut as usize],
                            digests,
                        );
                        put(
                            &mut wire,
                            &data_in(itt, len - cut, cut),
                            &data[cut as usize..],
                            digests,
                        );
                    }
                    1 => {
                        // A response with sense data instead of data.
                        let mut h = bhs(0x21, 18);
                        h[16..20].copy_from_slice(&itt.to_be_bytes());
                        put(&mut wire, &h, &[0x70; 18], digests);
                    }
                    _ => put(&mut wire, &data_in(itt, len, 0), &data, digests),
                }
                if rng.below(4) == 0 {
                    put(&mut wire, &bhs(0x20, 0), &[], digests);
                }
            }
            let chunks: Vec<usize> = (0..5).map(|_| 1 + rng.below(6000) as usize).collect();
            let plain = receive_stream(&wire, &chunks, false, digests);
            let ahead = receive_stream(&wire, &chunks, true, digests);
            assert_eq!(plain.0.len(), wire_pdus(&wire, digests), "round {round}");
            assert!(plain.0 == ahead.0, "round {round}: PDUs differ");
            assert!(plain.1 == ahead.1, "round {round}: task data differs");
            plain_reads += plain.2;
            ahead_reads += ahead.2;
        }
        // And it saved system calls, or it would be pointless.
        assert!(
            ahead_reads * 3 < plain_reads * 2,
            "{ahead_reads} reads with read-ahead, {plain_reads} without"
        );
    }

    #[test]
    fn giant_data_segment_and_closed_connection_are_errors() {
        let (mut c, mut s) = pair();
        s.write_all(&bhs(0x24, 0xff_ffff)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let err = loop {
            match c.recv(&mut |_: &[u8; BHS_LEN]| RecvPlan::Owned) {
                Ok(None) => Transport::wait(&mut c, false, deadline).unwrap(),
                Ok(Some(_)) => panic!("accepted"),
                Err(e) => break e,
            }
        };
        assert!(
            err.to_string()
                .contains("exceeds our MaxRecvDataSegmentLength"),
            "{err}"
        );
        let (mut c, s) = pair();
        drop(s);
        let err = c
            .recv_blocking(Instant::now() + Duration::from_secs(5))
            .err()
            .unwrap();
        assert!(err.to_string().contains("closed by the target"), "{err}");
    }

    /// A wrong guess leaves no other read's bytes in the guessed buffer.
    #[test]
    fn wrong_guess_leaves_no_foreign_bytes() {
        let (mut c, mut s) = pair();
        c.set_max_recv_data(1 << 20);
        let mut reads = Reads::new(&[(1, 4096), (2, 4096)]);
        let mut wire = Vec::new();
        put(&mut wire, &data_in(2, 4096, 0), &pattern(2, 4096), false);
        s.write_all(&wire).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let got = recv_all(&mut c, &mut reads, 1);
        assert_eq!(got, vec![(0x25, 2)]);
        assert_eq!(reads.data(2), pattern(2, 4096));
        // Read 1 was guessed first and got read 2's bytes; they are gone.
        assert!(reads.data(1).iter().all(|&b| b == 0 || b == 0xEE));
    }

    /// Reads 1 and 2 share one guest buffer (legal: two reads into the same
    /// memory); read 3 has its own. `alive1` false: read 1 has completed.
    struct Alias<'a> {
        shared: &'a IoBuffers,
        own: &'a IoBuffers,
        done: Vec<u32>,
        alive1: bool,
        log: Vec<String>,
    }
    impl<'a> Alias<'a> {
        fn new(shared: &'a IoBuffers, own: &'a IoBuffers, done: Vec<u32>) -> Self {
            Alias {
                shared,
                own,
                done,
                alive1: true,
                log: vec![],
            }
        }
    }

    fn alias_buf() -> IoBuffers {
        IoBuffers::from_vec(vec![0xEE; 4096])
    }

    impl RecvPlanner for Alias<'_> {
        fn plan(&mut self, h: &[u8; BHS_LEN]) -> RecvPlan {
            let itt = u32::from_be_bytes(h[16..20].try_into().unwrap());
            self.log.push(format!("plan op {:#x} itt {itt}", h[0]));
            if h[0] != 0x25 {
                return RecvPlan::Owned;
            }
            if itt == 1 && !self.alive1 {
                return RecvPlan::Discard;
            }
            let off = u32::from_be_bytes(h[40..44].try_into().unwrap()) as u64;
            let dsl = u32::from_be_bytes([0, h[5], h[6], h[7]]) as u64;
            let b = if itt == 3 { self.own } else { self.shared };
            let mut iov = Vec::new();
            assert_eq!(b.iovecs_range(off, dsl, &mut iov), dsl);
            RecvPlan::Direct(iov)
        }
        fn expected(&mut self, _max: usize, out: &mut Vec<ExpectedDataIn>, iov: &mut Vec<iovec>) {
            for itt in [1u32, 2] {
                if self.done.contains(&itt) || (itt == 1 && !self.alive1) {
                    continue;
                }
                let start = iov.len();
                self.shared.iovecs_range(0, 4096, iov);
                out.push(ExpectedDataIn {
                    itt,
                    len: 4096,
                    iov_start: start,
                    iov_end: iov.len(),
                });
            }
        }
    }

    /// Data-In 3, 1, 2 with 1 and 2 guessed into the same memory: the guess
    /// for 2 must not be read into it too, or read 3's data (set aside from
    /// there after the wrong guess) would be read 1's.
    #[test]
    fn read_ahead_never_reads_twice_into_one_buffer() {
        let (mut c, mut s) = pair();
        c.set_max_recv_data(1 << 20);
        let (shared, own) = (alias_buf(), alias_buf());
        let mut p = Alias::new(&shared, &own, vec![]);
        let mut wire = Vec::new();
        put(&mut wire, &data_in(3, 4096, 0), &pattern(3, 4096), false);
        put(&mut wire, &data_in(1, 4096, 0), &pattern(1, 4096), false);
        put(&mut wire, &data_in(2, 4096, 0), &pattern(2, 4096), false);
        s.write_all(&wire).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let deadline = Instant::now() + Duration::from_secs(5);
        let first = loop {
            if let Some(pdu) = c.recv(&mut p).unwrap() {
                break pdu;
            }
            Transport::wait(&mut c, false, deadline).unwrap();
        };
        assert_eq!(u32::from_be_bytes(first.bhs[16..20].try_into().unwrap()), 3);
        let mut v = vec![0u8; 4096];
        own.read_at(0, &mut v);
        assert_eq!(
            v,
            pattern(3, 4096),
            "task 3 (own buffer) got someone else's data"
        );
    }

    /// A hostile target answers read 1 with a response and then sends its
    /// Data-In, cut short by the read: after the response is handed out the
    /// session has completed read 1 and the guest owns the buffer again, so
    /// the rest must not be written there (it is planned again, refused).
    #[test]
    fn read_ahead_cut_short_is_planned_again_after_earlier_pdus() {
        let (mut c, mut s) = pair();
        c.set_max_recv_data(1 << 20);
        let (shared, own) = (alias_buf(), alias_buf());
        let mut p = Alias::new(&shared, &own, vec![2]);
        // SCSI Response for task 1 with 20 bytes of sense: header first.
        let mut resp = bhs(0x21, 20);
        resp[16..20].copy_from_slice(&1u32.to_be_bytes());
        let mut wire = Vec::new();
        put(&mut wire, &resp, &[0x70; 20], false);
        put(&mut wire, &data_in(1, 4096, 0), &pattern(1, 4096), false);
        s.write_all(&wire[..48]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(c.recv(&mut p).unwrap().is_none());
        s.write_all(&wire[48..48 + 20 + 48 + 100]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let r = c.recv(&mut p).unwrap().expect("response");
        assert_eq!(r.bhs[0], 0x21);
        // The session completes task 1: the guest owns its buffer again.
        p.alive1 = false;
        shared.write_at(0, &[0x11; 4096]);
        let _ = c.recv(&mut p).unwrap();
        s.write_all(&wire[48 + 20 + 48 + 100..]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let d = c.recv(&mut p).unwrap().expect("data-in");
        assert_eq!(d.bhs[0], 0x25);
        let mut v = vec![0u8; 4096];
        shared.read_at(0, &mut v);
        assert!(
            v.iter().all(|&b| b == 0x11),
            "completed task's buffer written after completion: {:?}",
            &v[100..110]
        );
    }
}
