//! iSCSI over TCP: PDU framing on a non-blocking socket, with data moved by
//! `readv`/`writev` straight between the socket and guest memory.
//!
//! Sending gathers several queued PDUs (headers, guest data, padding,
//! digests) into one `writev`. Receiving reads a header, asks the session
//! where its data segment goes, then `readv`s the data straight there —
//! together with the next PDU's header, so a stream of Data-In PDUs costs one
//! system call each.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use libc::iovec;

use super::{InPdu, OutPdu, PduData, RecvPlan, Transport, TransportError, BHS_LEN};

const DIGEST_LEN: usize = 4;
/// BHS + the largest AHS (255 words) + header digest.
const MAX_HEADER: usize = BHS_LEN + 255 * 4 + DIGEST_LEN;
/// Most iovecs handed to one writev/readv (IOV_MAX is 1024).
const MAX_IOV: usize = 1024;
/// Scratch size for data the session refused.
const DISCARD_CHUNK: usize = 64 * 1024;

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
                        recv: RecvState {
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
                        },
                        // Allocated on first use: most connections never discard data.
                        discard: Box::default(),
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
    }

    /// Largest data segment we accept (our MaxRecvDataSegmentLength).
    pub fn set_max_recv_data(&mut self, max: u32) {
        self.max_recv_data = max;
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
    /// bytes). `plan` is called once per header with a data segment, to say
    /// where the data goes; a `Direct` plan must cover exactly DataSegmentLength bytes.
    pub fn recv(
        &mut self,
        plan: &mut dyn FnMut(&[u8; BHS_LEN]) -> RecvPlan,
    ) -> Result<Option<InPdu>, TransportError> {
        {
            if !self.recv.in_data {
                // Header phase.
                while self.recv.hdr_got < self.recv.hdr_len {
                    if std::mem::take(&mut self.recv.drained) {
                        return Ok(None);
                    }
                    let r = &mut self.recv;
                    let want = r.hdr_len - r.hdr_got;
                    // SAFETY: reading into our own header buffer within bounds.
                    let n = unsafe {
                        libc::read(
                            self.stream.as_raw_fd(),
                            r.hdr.as_mut_ptr().add(r.hdr_got).cast(),
                            want,
                        )
                    };
                    let n = match read_outcome(n, &self.addr)? {
                        Read::Got(n) => n,
                        Read::WouldBlock => return Ok(None),
                        Read::Interrupted => continue,
                    };
                    let r = &mut self.recv;
                    r.drained = n < want;
                    r.hdr_got += n;
                    if r.hdr_got >= BHS_LEN && r.hdr_len == BHS_LEN {
                        // Now the AHS length is known.
                        r.hdr_len = BHS_LEN
                            + r.hdr[4] as usize * 4
                            + if self.header_digest { DIGEST_LEN } else { 0 };
                    }
                }
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
                    return Ok(Some(InPdu {
                        bhs,
                        data: Vec::new(),
                    }));
                }
                if dsl > self.max_recv_data {
                    return Err(self.malformed(format!(
                        "data segment of {dsl} bytes exceeds our MaxRecvDataSegmentLength {} (opcode {:#04x})",
                        self.max_recv_data,
                        bhs[0] & 0x3f
                    )));
                }
                let dest = match plan(&bhs) {
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
                r.trailer_len =
                    (4 - dsl as usize % 4) % 4 + if self.data_digest { DIGEST_LEN } else { 0 };
                r.trailer_got = 0;
            }
            // Data phase: data, then pad and digest, then (opportunistically) the next header.
            if !self.read_data()? {
                return Ok(None);
            }
        }
        let r = &mut self.recv;
        r.in_data = false;
        let bhs = r.cur_bhs;
        let dest = std::mem::replace(&mut r.dest, DataDest::Discard);
        if self.data_digest {
            self.check_data_digest(&bhs, &dest)?;
        }
        let data = match dest {
            DataDest::Owned(v) => v,
            _ => Vec::new(),
        };
        Ok(Some(InPdu { bhs, data }))
    }

    /// Reads the rest of the current data segment; true when complete.
    fn read_data(&mut self) -> Result<bool, TransportError> {
        loop {
            let r = &mut self.recv;
            if r.data_got == r.data_len && r.trailer_got == r.trailer_len {
                return Ok(true);
            }
            if std::mem::take(&mut r.drained) {
                return Ok(false);
            }
            let mut iov = std::mem::take(&mut self.iov_scratch);
            iov.clear();
            let data_left = r.data_len - r.data_got;
            if data_left > 0 {
                match &mut r.dest {
                    DataDest::Direct(d) => {
                        iov.extend_from_slice(d);
                        trim_front(&mut iov, 0, r.data_got);
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
                        iov.push(iovec {
                            iov_base: self.discard.as_mut_ptr().cast(),
                            iov_len: data_left.min(self.discard.len()),
                        })
                    }
                }
            }
            if r.trailer_got < r.trailer_len {
                iov.push(iovec {
                    // SAFETY: within the trailer array.
                    iov_base: unsafe { r.trailer.as_mut_ptr().add(r.trailer_got) }.cast(),
                    iov_len: r.trailer_len - r.trailer_got,
                });
            }
            // The next header rides along: one syscall per Data-In PDU.
            iov.truncate(MAX_IOV - 1);
            let want_data: usize = iov.iter().map(|v| v.iov_len).sum();
            iov.push(iovec {
                iov_base: r.hdr.as_mut_ptr().cast(),
                iov_len: BHS_LEN,
            });
            // SAFETY: every iovec points into live memory we may write: the task's
            // guest buffer (kept mapped by the task), our own buffers.
            let n = unsafe { libc::readv(self.stream.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
            self.iov_scratch = iov;
            let mut n = match read_outcome(n, &self.addr)? {
                Read::Got(n) => n,
                Read::WouldBlock => return Ok(false),
                Read::Interrupted => continue,
            };
            let r = &mut self.recv;
            r.drained = n < want_data + BHS_LEN;
            let extra = n.saturating_sub(want_data);
            n -= extra;
            let d = n.min(data_left);
            r.data_got += d;
            n -= d;
            r.trailer_got += n;
            if extra > 0 {
                r.hdr_got = extra;
                if extra >= BHS_LEN {
                    r.hdr_len = BHS_LEN
                        + r.hdr[4] as usize * 4
                        + if self.header_digest { DIGEST_LEN } else { 0 };
                }
            }
        }
    }

    fn check_data_digest(
        &self,
        bhs: &[u8; BHS_LEN],
        dest: &DataDest,
    ) -> Result<(), TransportError> {
        let r = &self.recv;
        let pad = r.trailer_len - DIGEST_LEN;
        let mut crc = 0u32;
        match dest {
            DataDest::Direct(iov) => {
                for v in iov {
                    // SAFETY: the iovec covers the task's guest buffer, just written by readv.
                    let s =
                        unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
                    crc = crc32c::crc32c_append(crc, s);
                }
            }
            DataDest::Owned(v) => crc = crc32c::crc32c_append(crc, v),
            // Refused data is not checked: the connection is being dropped anyway.
            DataDest::Discard => return Ok(()),
        }
        crc = crc32c::crc32c_append(crc, &r.trailer[..pad]);
        let got = u32::from_le_bytes(
            r.trailer[pad..pad + DIGEST_LEN]
                .try_into()
                .unwrap_or_default(),
        );
        if crc != got {
            return Err(TransportError::Digest {
                what: "data",
                addr: self.addr.clone(),
                opcode: bhs[0] & 0x3f,
            });
        }
        Ok(())
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
    fn recv(
        &mut self,
        plan: &mut dyn FnMut(&[u8; BHS_LEN]) -> RecvPlan,
    ) -> Result<Option<InPdu>, TransportError> {
        TcpConnection::recv(self, plan)
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

    fn recv_wait(c: &mut TcpConnection, plan: &mut dyn FnMut(&[u8; BHS_LEN]) -> RecvPlan) -> InPdu {
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
        let p = recv_wait(&mut c, &mut |b| {
            assert_eq!(b[0], 0x25);
            RecvPlan::Direct(iov.clone())
        });
        assert_eq!(p.bhs[0], 0x25);
        let mut back = [0u8; 6];
        target.read_at(0, &mut back);
        assert_eq!(back, [9, 8, 7, 6, 5, 4]);
        let p = recv_wait(&mut c, &mut |_| RecvPlan::Discard);
        assert_eq!(p.bhs[0], 0x21);
        let p = recv_wait(&mut c, &mut |_| RecvPlan::Owned);
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
            match c.recv(&mut |_| RecvPlan::Owned) {
                Ok(None) => Transport::wait(&mut c, false, deadline).unwrap(),
                Ok(Some(_)) => panic!("bad digest accepted"),
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("data digest mismatch"), "{err}");
    }

    #[test]
    fn giant_data_segment_and_closed_connection_are_errors() {
        let (mut c, mut s) = pair();
        s.write_all(&bhs(0x24, 0xff_ffff)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let err = loop {
            match c.recv(&mut |_| RecvPlan::Owned) {
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
}
