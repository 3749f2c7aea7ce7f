//! The real vhost-iser process with the RAM target, driven by libblkio.

mod client;

use std::process::Command;

use blkio::ReqFlags;
use client::{pattern, Backend, Client};

const MIB: usize = 1 << 20;

#[test]
fn write_read_verify_at_many_sizes_and_offsets() {
    let backend = Backend::start(&["--target", "mem:256M"]);
    let mut c = Client::connect(&backend.socket, 1, 8 * MIB);
    assert_eq!(c.capacity(), 256 << 20);
    let cases: &[(u64, usize)] = &[
        (0, 512),
        (512 * 7, 4096),
        (65536 - 512, 8192), // crosses a 64 KiB chunk of the RAM target
        (3 << 20, 128 * 1024),
        (10 << 20, MIB),
        ((256 << 20) - 4096, 4096), // last block
        (17 * 512, 4 * MIB),
    ];
    for (i, &(at, len)) in cases.iter().enumerate() {
        let data = pattern(at, len, i as u8);
        c.buf()[..len].copy_from_slice(&data);
        assert_eq!(c.write(0, at, 0, len), 0, "write {len} at {at}");
        c.buf()[4 * MIB..4 * MIB + len].fill(0xEE);
        assert_eq!(c.read(0, at, 4 * MIB, len), 0, "read {len} at {at}");
        assert!(
            c.buf()[4 * MIB..4 * MIB + len] == data[..],
            "data mismatch for {len} bytes at {at}"
        );
    }
    assert_eq!(c.flush(0), 0);
}

#[test]
fn out_of_range_requests_fail_without_harm() {
    let backend = Backend::start(&["--target", "mem:1M"]);
    let mut c = Client::connect(&backend.socket, 1, MIB);
    // libblkio forwards these; the device must answer IOERR, not crash.
    assert_ne!(c.read(0, 1 << 20, 0, 4096), 0);
    assert_ne!(c.write(0, (1 << 20) - 512, 0, 4096), 0);
    // And keeps serving.
    let data = pattern(0, 4096, 9);
    c.buf()[..4096].copy_from_slice(&data);
    assert_eq!(c.write(0, 0, 0, 4096), 0);
    assert_eq!(c.read(0, 0, 8192, 4096), 0);
    assert!(c.buf()[8192..8192 + 4096] == data[..]);
    assert!(
        backend.log().contains("past the capacity"),
        "log: {}",
        backend.log()
    );
}

#[test]
fn discard_and_write_zeroes_read_back_zeroes() {
    let backend = Backend::start(&["--target", "mem:64M"]);
    let mut c = Client::connect(&backend.socket, 1, 2 * MIB);
    let len = 256 * 1024;
    for (op, at) in [("discard", 1u64 << 20), ("write-zeroes", 8 << 20)] {
        c.buf()[..len].copy_from_slice(&pattern(at, len, 3));
        assert_eq!(c.write(0, at, 0, len), 0);
        let r = if op == "discard" {
            c.discard(0, at + 4096, 65536)
        } else {
            c.write_zeroes(0, at + 4096, 65536)
        };
        assert_eq!(r, 0, "{op}");
        assert_eq!(c.read(0, at, MIB, len), 0);
        let back = &c.buf()[MIB..MIB + len];
        let expect = pattern(at, len, 3);
        assert!(
            back[..4096] == expect[..4096],
            "{op}: data before the range changed"
        );
        assert!(
            back[4096..4096 + 65536].iter().all(|&b| b == 0),
            "{op}: range not zeroed"
        );
        assert!(
            back[4096 + 65536..] == expect[4096 + 65536..],
            "{op}: data after the range changed"
        );
    }
}

#[test]
fn read_only_device_is_advertised_and_refused_by_the_client() {
    let backend = Backend::start(&["--target", "mem:16M", "--read-only"]);
    // A read-write frontend is refused: the device offers VIRTIO_BLK_F_RO.
    // (That the device itself refuses writes is covered by the request unit tests.)
    let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", backend.socket.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    let err = b.start().err().expect("read-write start must fail");
    assert!(format!("{err:?}").contains("read-only"), "{err:?}");
    drop(b);
    let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", backend.socket.to_str().unwrap()).unwrap();
    b.set_bool("read-only", true).unwrap();
    b.connect().unwrap();
    let mut out = b.start().expect("read-only start");
    let region = b.alloc_mem_region(4096).unwrap();
    b.map_mem_region(&region).unwrap();
    out.queues[0].read(0, region.addr as *mut u8, 4096, 1, ReqFlags::empty());
    let mut comps = [std::mem::MaybeUninit::<blkio::Completion>::uninit()];
    let mut timeout = std::time::Duration::from_secs(30);
    assert_eq!(
        out.queues[0]
            .do_io(&mut comps, 1, Some(&mut timeout), None)
            .unwrap(),
        1
    );
    // SAFETY: do_io initialised one completion.
    assert_eq!(unsafe { comps[0].assume_init_read() }.ret, 0);
}

#[test]
fn four_queues_concurrent_load_verified() {
    four_queues_verified(&[], 4);
}

/// Four queues on two worker threads, then on one: every queue still serves
/// its own requests (kicks and completions reach the right queue's worker).
#[test]
fn four_queues_on_fewer_threads_verified() {
    four_queues_verified(&["--threads", "2"], 2);
    four_queues_verified(&["--threads", "1"], 1);
}

/// Worker threads of a running backend (vhost-user-backend names them).
fn worker_threads(backend: &Backend) -> usize {
    let pid = backend.child.as_ref().expect("running").id();
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == "vring_worker")
        .count()
}

fn four_queues_verified(extra: &[&str], expect_threads: usize) {
    let mut args = vec!["--target", "mem:512M", "--queues", "4"];
    args.extend_from_slice(extra);
    let backend = Backend::start(&args);
    let c = Client::connect(&backend.socket, 4, 16 * MIB);
    assert_eq!(worker_threads(&backend), expect_threads, "{extra:?}");
    let Client {
        queues,
        region,
        blkio,
    } = c;
    let base = region.addr;
    let depth = 16usize;
    let bs = 16 * 1024usize;
    let threads: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(qi, mut q)| {
            std::thread::spawn(move || {
                // Each queue owns 4 MiB of the buffer and 64 MiB of the disk.
                let buf_base = base + qi * 4 * MIB;
                let disk_base = (qi as u64) * (64 << 20);
                for round in 0..8u64 {
                    for slot in 0..depth {
                        let at = disk_base + (round * depth as u64 + slot as u64) * bs as u64;
                        let data = pattern(at, bs, qi as u8);
                        let p = (buf_base + slot * bs) as *mut u8;
                        // SAFETY: slot buffers are disjoint parts of the mapped region.
                        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, bs) };
                        q.write(at, p, bs, slot, ReqFlags::empty());
                    }
                    wait_all(&mut q, depth);
                    for slot in 0..depth {
                        let at = disk_base + (round * depth as u64 + slot as u64) * bs as u64;
                        let p = (buf_base + 2 * MIB + slot * bs) as *mut u8;
                        q.read(at, p, bs, slot, ReqFlags::empty());
                    }
                    wait_all(&mut q, depth);
                    for slot in 0..depth {
                        let at = disk_base + (round * depth as u64 + slot as u64) * bs as u64;
                        let p = (buf_base + 2 * MIB + slot * bs) as *const u8;
                        // SAFETY: as above; reads completed.
                        let got = unsafe { std::slice::from_raw_parts(p, bs) };
                        assert!(
                            got == &pattern(at, bs, qi as u8)[..],
                            "queue {qi} data mismatch at {at}"
                        );
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("queue thread");
    }
    drop(blkio);
}

fn wait_all(q: &mut blkio::Blkioq, n: usize) {
    for (req, ret) in client::drain(q, n) {
        assert_eq!(ret, 0, "request {req} failed");
    }
}

#[test]
fn sigterm_drains_and_exits_cleanly() {
    let mut backend = Backend::start(&["--target", "mem:64M", "--queues", "2"]);
    let mut c = Client::connect(&backend.socket, 2, 4 * MIB);
    // Requests in flight when the signal arrives.
    for i in 0..64usize {
        let p = c.ptr((i % 32) * 65536);
        c.queues[i % 2].write((i as u64) * 65536, p, 65536, i, ReqFlags::empty());
    }
    let status = backend.stop();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        backend.log()
    );
    assert!(!backend.socket.exists(), "socket file left behind");
    assert!(backend.log().contains("draining"));
}

#[test]
fn stale_socket_file_is_replaced_and_reconnect_works() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("stale.sock");
    std::fs::write(&socket, b"stale").unwrap();
    let backend = Backend::start_at(dir, socket, &["--target", "mem:8M"]);
    {
        let mut c = Client::connect(&backend.socket, 1, MIB);
        c.buf()[..512].fill(0x5A);
        assert_eq!(c.write(0, 0, 0, 512), 0);
    }
    // A second frontend after the first disconnected sees the same disk.
    let mut c = Client::connect(&backend.socket, 1, MIB);
    assert_eq!(c.read(0, 0, 4096, 512), 0);
    assert!(c.buf()[4096..4608].iter().all(|&b| b == 0x5A));
}

#[test]
fn bad_arguments_exit_2_with_one_clear_line() {
    let bin = env!("CARGO_BIN_EXE_vhost-iser");
    for (args, needle) in [
        (
            vec!["--socket", "/tmp/x.sock", "--target", "nope:1"],
            "invalid target",
        ),
        (
            vec![
                "--socket",
                "/tmp/x.sock",
                "--target",
                "mem:1G",
                "--queues",
                "0",
            ],
            "queues",
        ),
        (
            vec!["--socket", "/tmp/x.sock", "--target", "mem:zz"],
            "invalid target",
        ),
        (vec!["--target", "mem:1G"], "--socket"),
    ] {
        let out = Command::new(bin).args(&args).output().expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
