//! Any byte stream from a "target", cut into pieces, through the TCP
//! transport twice: once reading one PDU at a time, once with read-ahead
//! (guessing that the reads in flight are answered in order, straight into
//! their buffers). Never a panic, and both must hand out the same PDUs, put
//! the same bytes into the read buffers and end the same way.
//!
//! Input: byte 0 picks digests (bit 0) and the piece sizes (bits 1-7); the
//! rest is the stream.
#![no_main]

use std::io::Write;
use std::net::{Shutdown, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libc::iovec;
use libfuzzer_sys::fuzz_target;
use vhost_iser::blk::buffer::IoBuffers;
use vhost_iser::transport::tcp::TcpConnection;
use vhost_iser::transport::{ExpectedDataIn, RecvPlan, RecvPlanner, Transport, BHS_LEN};

const LENS: [usize; 4] = [4096, 512, 1000, 8192];

/// Four reads in flight (ITT 1..=4), planned like the session plans them.
struct Reads {
    bufs: Vec<IoBuffers>,
    guess: bool,
    started: [bool; 4],
}

impl RecvPlanner for Reads {
    fn plan(&mut self, h: &[u8; BHS_LEN]) -> RecvPlan {
        if h[0] & 0x3f != 0x25 {
            return RecvPlan::Owned;
        }
        let itt = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
        let off = u32::from_be_bytes([h[40], h[41], h[42], h[43]]) as u64;
        let dsl = u32::from_be_bytes([0, h[5], h[6], h[7]]) as u64;
        let Some(b) = (itt as usize).checked_sub(1).and_then(|i| self.bufs.get(i)) else {
            return RecvPlan::Discard;
        };
        if off + dsl > b.len() {
            return RecvPlan::Discard;
        }
        let mut iov = Vec::new();
        b.iovecs_range(off, dsl, &mut iov);
        RecvPlan::Direct(iov)
    }

    fn expected(&mut self, max: usize, out: &mut Vec<ExpectedDataIn>, iov: &mut Vec<iovec>) {
        if !self.guess {
            return;
        }
        for (i, b) in self.bufs.iter().enumerate() {
            if out.len() == max || self.started[i] {
                continue;
            }
            let start = iov.len();
            b.iovecs_range(0, b.len(), iov);
            out.push(ExpectedDataIn {
                itt: i as u32 + 1,
                len: b.len() as u32,
                iov_start: start,
                iov_end: iov.len(),
            });
        }
    }
}

/// PDUs handed out, the bytes each read's Data-In covered, how it ended.
type Outcome = (Vec<([u8; BHS_LEN], Vec<u8>)>, Vec<Vec<u8>>, String);

fn run(stream: &[u8], pieces: &[usize], digests: bool, guess: bool) -> Outcome {
    // One listener for the whole run, and connections closed with a reset:
    // tens of thousands of runs would otherwise use up the ephemeral ports
    // (listeners and TIME_WAIT).
    static LISTENER: OnceLock<TcpListener> = OnceLock::new();
    let l = LISTENER.get_or_init(|| TcpListener::bind("127.0.0.1:0").expect("listen"));
    let addr = l.local_addr().expect("addr").to_string();
    let mut c = TcpConnection::connect(&addr, Duration::from_secs(5)).expect("connect");
    let (mut s, _) = l.accept().expect("accept");
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger value of the right size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    c.set_max_recv_data(16384);
    c.set_digests(digests, digests);
    let mut reads = Reads {
        bufs: LENS
            .iter()
            .map(|&n| IoBuffers::from_vec(vec![0xEE; n]))
            .collect(),
        guess,
        started: [false; 4],
    };
    let mut covered: Vec<Vec<bool>> = LENS.iter().map(|&n| vec![false; n]).collect();
    let mut pdus = Vec::new();
    let (mut at, mut piece) = (0usize, 0usize);
    let deadline = Instant::now() + Duration::from_secs(20);
    let end = loop {
        match c.recv(&mut reads) {
            Ok(Some(p)) => {
                if p.bhs[0] & 0x3f == 0x25 {
                    let h = &p.bhs;
                    let itt = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
                    let off = u32::from_be_bytes([h[40], h[41], h[42], h[43]]) as usize;
                    let dsl = u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize;
                    if (1..=4).contains(&itt) && off + dsl <= LENS[itt - 1] {
                        reads.started[itt - 1] = true;
                        covered[itt - 1][off..off + dsl].fill(true);
                    }
                }
                pdus.push((p.bhs, p.data));
            }
            Ok(None) if at < stream.len() => {
                let n = pieces[piece % pieces.len()].min(stream.len() - at);
                piece += 1;
                s.write_all(&stream[at..at + n]).expect("write");
                at += n;
                if at == stream.len() {
                    s.shutdown(Shutdown::Write).expect("shutdown");
                }
            }
            Ok(None) => {
                if at == 0 {
                    break "empty".to_string();
                }
                Transport::wait(&mut c, false, deadline).expect("stream ended without EOF");
            }
            Err(e) => break e.to_string().replace(&addr, "ADDR"),
        }
    };
    let data = covered
        .iter()
        .enumerate()
        .map(|(i, cov)| {
            let mut all = vec![0u8; LENS[i]];
            reads.bufs[i].read_at(0, &mut all);
            all.iter()
                .zip(cov)
                .filter(|(_, &c)| c)
                .map(|(&b, _)| b)
                .collect()
        })
        .collect();
    (pdus, data, end)
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, stream)) = data.split_first() else {
        return;
    };
    if stream.is_empty() || stream.len() > 64 * 1024 {
        return;
    }
    let digests = flags & 1 == 1;
    let seed = (flags >> 1) as usize;
    let pieces = [1 + seed * 37 % 4000, 48, 1 + seed * 101 % 9000, 4144];
    let plain = run(stream, &pieces, digests, false);
    let ahead = run(stream, &pieces, digests, true);
    assert_eq!(plain.2, ahead.2, "the two readers ended differently");
    assert!(
        plain.0 == ahead.0,
        "the two readers handed out different PDUs"
    );
    assert!(
        plain.1 == ahead.1,
        "the two readers put different data into the reads"
    );
});
