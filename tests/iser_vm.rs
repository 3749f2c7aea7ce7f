//! End to end over iSER on soft-RoCE: libblkio → vhost-iser (`iser://`) →
//! tgtd (iSER) and LIO (ib_isert), inside the rdma VM.
//!
//! `rdma_vm_iser` (host) boots `qemu/rdma-vm.sh` and runs this same test
//! binary inside it, filtered to `vm_iser_end_to_end`, with
//! `VHOST_ISER_RDMA_VM=1`, and asserts that run exits 0. Inside the VM the
//! test starts both targets (`qemu/rdma/start-targets.sh`), a vhost-iser
//! backend per target and a libblkio client that writes and verifies
//! 4 KiB..1 MiB requests, contiguous and scattered (writev/readv over
//! several separated iovecs), 32 in flight; then kills tgtd, restarts it and
//! checks that I/O recovers. The backend logs its copy counters every few
//! commands (`VHOST_ISER_REPORT_EVERY`): contiguous buffers must copy 0
//! bytes, scattered ones go through bounce buffers; a backend with
//! `VHOST_ISER_SCATTER=split` moves the same scattered requests to tgtd as
//! one command per piece, copying nothing.
//! `VHOST_ISER_SKIP_RDMA_VM=1` skips the VM deliberately (it says so).

mod client;
mod support;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use client::{pattern, Backend, Client};

const VM_ENV: &str = "VHOST_ISER_RDMA_VM";
const INITIATOR: &str = "iqn.2026-11.vhost-iser:vm-test";
const KIB: usize = 1024;
const MIB: usize = 1 << 20;
const DEPTH: usize = 32;
/// Client memory: a write half and a read half.
const MEM: usize = 64 * MIB;
const HALF: usize = MEM / 2;

fn in_vm() -> bool {
    std::env::var(VM_ENV).as_deref() == Ok("1")
}

#[test]
fn rdma_vm_iser() {
    if in_vm() {
        return; // we are the inner run
    }
    if std::env::var("VHOST_ISER_SKIP_RDMA_VM").as_deref() == Ok("1") {
        eprintln!("SKIPPED: iSER end-to-end VM test (VHOST_ISER_SKIP_RDMA_VM=1)");
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let exe = exe.to_str().expect("utf-8 path");
    let run = support::vm::run_script(
        "rdma-vm.sh",
        &[
            "--timeout",
            "400",
            "--mem",
            "1536",
            "--",
            "env",
            "VHOST_ISER_RDMA_VM=1",
            exe,
            "vm_iser_end_to_end",
            "--exact",
            "--test-threads=1",
            "--nocapture",
        ],
    );
    let text = run.text();
    println!("{text}");
    eprintln!("iSER VM run: wall {:.1}s", run.wall.as_secs_f64());
    assert_eq!(run.code, Some(0), "iSER end-to-end run in the VM failed");
}

/// Runs start-targets.sh and returns its exported variables.
fn start_targets(which: &str) -> HashMap<String, String> {
    let script = support::repo_root().join("qemu/rdma/start-targets.sh");
    let out = Command::new(&script)
        .arg(which)
        .env("TGT_EXTRA_INITIATORS", INITIATOR)
        .output()
        .expect("run start-targets.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    println!(
        "start-targets {which}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "start-targets.sh {which} failed");
    stdout
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The copy counters of the backend's last report: (scattered, unregistered).
fn copy_counters(log: &str) -> Option<(u64, u64)> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("bytes for scattered guest buffers"))?;
    let after = line.split("process: ").nth(1)?;
    let mut nums = after
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u64>().ok());
    Some((nums.next()??, nums.next()??))
}

fn wait_ok(c: &mut Client, q: usize, n: usize, what: &str) {
    for (tag, ret) in c.wait(q, n) {
        assert_eq!(ret, 0, "{what}: request {tag} failed with {ret}");
    }
}

/// 32-deep contiguous write + read-back at each size; returns (bytes, secs).
fn contiguous_phase(c: &mut Client, seed: u8) -> (u64, f64) {
    let mut bytes = 0u64;
    let t = Instant::now();
    for &(size, depth) in &[
        (4 * KIB, DEPTH),
        (16 * KIB, DEPTH),
        (64 * KIB, DEPTH),
        (256 * KIB, DEPTH),
        (MIB, 16),
    ] {
        let ts = Instant::now();
        for i in 0..depth {
            let at = (i * size) as u64;
            let data = pattern(at, size, seed);
            c.buf()[i * size..(i + 1) * size].copy_from_slice(&data);
            let p = c.ptr(i * size);
            c.queues[0].write(at, p, size, i, ReqFlags::empty());
        }
        wait_ok(c, 0, depth, "contiguous write");
        c.buf()[HALF..HALF + depth * size].fill(0);
        for i in 0..depth {
            let p = c.ptr(HALF + i * size);
            c.queues[0].read((i * size) as u64, p, size, i, ReqFlags::empty());
        }
        wait_ok(c, 0, depth, "contiguous read");
        for i in 0..depth {
            let at = (i * size) as u64;
            let got = &c.buf()[HALF + i * size..HALF + (i + 1) * size];
            assert!(
                got == pattern(at, size, seed).as_slice(),
                "contiguous {size}-byte read at {at} returned other data"
            );
        }
        let el = ts.elapsed().as_secs_f64();
        println!(
            "  contiguous {:>5} KiB x{depth}: write+read {:.2}s ({:.0} IOPS, {:.1} MiB/s)",
            size / KIB,
            el,
            (2 * depth) as f64 / el,
            (2 * depth * size) as f64 / el / MIB as f64
        );
        bytes += (2 * depth * size) as u64;
    }
    (bytes, t.elapsed().as_secs_f64())
}

/// iovecs for request `i` of `size` bytes in `pieces` parts, separated by
/// 4 KiB gaps, starting at `base` in the client memory.
fn scattered_iov(
    c: &Client,
    base: usize,
    i: usize,
    size: usize,
    pieces: usize,
) -> Vec<libc::iovec> {
    let part = size / pieces;
    let stride = size + pieces * 4 * KIB;
    (0..pieces)
        .map(|k| libc::iovec {
            iov_base: c.ptr(base + i * stride + k * (part + 4 * KIB)).cast(),
            iov_len: part,
        })
        .collect()
}

/// Scattered writev + readv; returns the guest bytes moved.
fn scattered_phase(c: &mut Client, seed: u8, disk_base: u64) -> u64 {
    let mut bytes = 0u64;
    for &(size, pieces, depth) in &[
        (4 * KIB, 4, DEPTH),
        (64 * KIB, 8, DEPTH),
        (256 * KIB, 4, 16),
    ] {
        let ts = Instant::now();
        let mut iovs = Vec::new();
        for i in 0..depth {
            let at = disk_base + (i * size) as u64;
            let data = pattern(at, size, seed);
            let iov = scattered_iov(c, 0, i, size, pieces);
            let mut off = 0;
            for v in &iov {
                // SAFETY: the iovec lies in the client's mapped region.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        data.as_ptr().add(off),
                        v.iov_base.cast(),
                        v.iov_len,
                    )
                };
                off += v.iov_len;
            }
            iovs.push(iov);
        }
        for (i, iov) in iovs.iter().enumerate() {
            let at = disk_base + (i * size) as u64;
            c.queues[1].writev(at, iov.as_ptr(), iov.len() as u32, i, ReqFlags::empty());
        }
        wait_ok(c, 1, depth, "scattered write");
        let mut riovs = Vec::new();
        for i in 0..depth {
            let iov = scattered_iov(c, HALF, i, size, pieces);
            for v in &iov {
                // SAFETY: as above.
                unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
            }
            riovs.push(iov);
        }
        for (i, iov) in riovs.iter().enumerate() {
            let at = disk_base + (i * size) as u64;
            c.queues[1].readv(at, iov.as_ptr(), iov.len() as u32, i, ReqFlags::empty());
        }
        wait_ok(c, 1, depth, "scattered read");
        for (i, iov) in riovs.iter().enumerate() {
            let at = disk_base + (i * size) as u64;
            let mut got = Vec::with_capacity(size);
            for v in iov {
                // SAFETY: as above; the read completed.
                got.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len)
                });
            }
            assert!(
                got == pattern(at, size, seed),
                "scattered {size}-byte readv at {at} returned other data"
            );
        }
        let el = ts.elapsed().as_secs_f64();
        println!(
            "  scattered  {:>5} KiB ({pieces} iovecs) x{depth}: writev+readv {:.2}s ({:.0} IOPS)",
            size / KIB,
            el,
            (2 * depth) as f64 / el
        );
        bytes += (2 * depth * size) as u64;
    }
    bytes
}

fn start_backend(url: &str) -> (Backend, Client) {
    let b = Backend::start_env(
        &[
            "--target",
            url,
            "--initiator-name",
            INITIATOR,
            "--queues",
            "2",
        ],
        &[("VHOST_ISER_REPORT_EVERY", "32")],
    );
    let c = Client::connect(&b.socket, 2, MEM);
    (b, c)
}

/// Contiguous then scattered I/O against one target; checks the counters.
fn exercise(name: &str, url: &str, backing: &str, seed: u8) -> (Backend, Client) {
    println!("== {name}: {url}");
    let (b, mut c) = start_backend(url);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_phases(name, &b, &mut c, backing, seed)
    }));
    if let Err(e) = r {
        println!("--- {name}: backend log ---\n{}", tail(&b.log(), 60));
        std::panic::resume_unwind(e);
    }
    (b, c)
}

fn run_phases(name: &str, b: &Backend, c: &mut Client, backing: &str, seed: u8) {
    let c = &mut *c;
    let (bytes, secs) = contiguous_phase(c, seed);
    println!(
        "{name}: contiguous {:.1} MiB in {secs:.1}s ({:.1} MiB/s)",
        bytes as f64 / MIB as f64,
        bytes as f64 / secs / MIB as f64
    );
    let log = b.log();
    let (scattered, unregistered) = copy_counters(&log)
        .unwrap_or_else(|| panic!("no copy counter line in the backend log:\n{log}"));
    println!(
        "{name}: after contiguous I/O: {scattered} bytes copied for guest buffers, {unregistered} for unregistered (probe) buffers"
    );
    assert_eq!(scattered, 0, "contiguous buffers were copied; log:\n{log}");
    // The target's backing file holds the last (1 MiB x16) writes at the right place.
    check_backing(backing, 0, 16 * MIB, seed);
    assert!(
        log.contains("registered guest memory"),
        "no registration logged:\n{log}"
    );
    let moved = scattered_phase(c, seed.wrapping_add(1), 40 * MIB as u64);
    check_backing(backing, 40 * MIB as u64, 4 * MIB, seed.wrapping_add(1));
    // Make the backend report after the scattered phase: a few more commands.
    for i in 0..DEPTH {
        let p = c.ptr(i * 4 * KIB);
        c.queues[1].read(0, p, 4 * KIB, i, ReqFlags::empty());
    }
    wait_ok(c, 1, DEPTH, "read");
    let log = b.log();
    let (scattered, _) = copy_counters(&log).expect("copy counters");
    println!(
        "{name}: scattered I/O moved {moved} bytes; backend copied {scattered} bytes through bounce buffers"
    );
    assert!(
        scattered > 0,
        "scattered buffers cannot be zero copy; log:\n{log}"
    );
}

/// Scattered I/O with `VHOST_ISER_SCATTER=split`: every piece is whole
/// 512-byte blocks, so each request goes as one command per piece, in
/// place: the data must arrive and nothing may be copied.
fn split_run(url: &str, backing: &str, seed: u8) {
    println!("== split: {url}");
    let b = Backend::start_env(
        &[
            "--target",
            url,
            "--initiator-name",
            INITIATOR,
            "--queues",
            "2",
        ],
        &[
            ("VHOST_ISER_REPORT_EVERY", "32"),
            ("VHOST_ISER_SCATTER", "split"),
        ],
    );
    let mut c = Client::connect(&b.socket, 2, MEM);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let moved = scattered_phase(&mut c, seed, 48 * MIB as u64);
        check_backing(backing, 48 * MIB as u64, 4 * MIB, seed);
        for i in 0..DEPTH {
            let p = c.ptr(i * 4 * KIB);
            c.queues[1].read(0, p, 4 * KIB, i, ReqFlags::empty());
        }
        wait_ok(&mut c, 1, DEPTH, "read");
        let log = b.log();
        let (scattered, _) = copy_counters(&log).expect("copy counters");
        println!("split: scattered I/O moved {moved} bytes; backend copied {scattered} bytes");
        assert!(
            log.contains("split into one command per contiguous run"),
            "split policy not taken:\n{log}"
        );
        assert_eq!(scattered, 0, "split requests were copied; log:\n{log}");
    }));
    if let Err(e) = r {
        println!("--- split: backend log ---\n{}", tail(&b.log(), 60));
        std::panic::resume_unwind(e);
    }
}

/// The target's backing file at `at` holds `pattern(at, len, seed)`.
fn check_backing(path: &str, at: u64, len: usize, seed: u8) {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).expect("backing file");
    f.seek(SeekFrom::Start(at)).expect("seek");
    let mut got = vec![0u8; len];
    f.read_exact(&mut got).expect("read backing file");
    assert!(
        got == pattern(at, len, seed),
        "backing file {path} at {at}+{len} does not hold what was written"
    );
    println!("  backing file {path} at {at}+{len}: matches");
}

fn pidof(name: &str) -> Vec<i32> {
    let out = Command::new("pidof").arg(name).output().expect("pidof");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn vm_iser_end_to_end() {
    if !in_vm() {
        return; // run by rdma_vm_iser inside the VM
    }
    let t0 = Instant::now();
    let env = start_targets("all");
    println!("targets up after {:.1}s", t0.elapsed().as_secs_f64());
    let tgt_url = env.get("TGT_ISER_URL").expect("TGT_ISER_URL").clone();
    let lio_url = env.get("LIO_ISER_URL").expect("LIO_ISER_URL").clone();
    let tgt_backing = env.get("TGT_BACKING").expect("TGT_BACKING").clone();
    let lio_backing = env.get("LIO_BACKING").expect("LIO_BACKING").clone();

    let lio = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (mut b, c) = exercise("LIO", &lio_url, &lio_backing, 7);
        drop(c);
        b.stop();
        b.log()
    }));
    if let Err(e) = &lio {
        println!("LIO run failed: {e:?}");
        let out = Command::new("dmesg").output().expect("dmesg");
        println!(
            "--- kernel log (tail) ---\n{}",
            tail(&String::from_utf8_lossy(&out.stdout), 40)
        );
    }

    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (b, mut c) = exercise("tgtd", &tgt_url, &tgt_backing, 3);
        // Target restart: kill tgtd, I/O fails or waits, restart, I/O recovers.
        let pids = pidof("tgtd");
        assert!(!pids.is_empty(), "tgtd is not running");
        for p in &pids {
            // SAFETY: kill(2) on the tgtd this test started (by pid).
            unsafe { libc::kill(*p, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(500));
        let tk = Instant::now();
        let data = pattern(0, 64 * KIB, 9);
        c.buf()[..64 * KIB].copy_from_slice(&data);
        let p = c.ptr(0);
        c.queues[0].write(0, p, 64 * KIB, 1, ReqFlags::empty());
        let down = c.wait(0, 1)[0].1;
        println!(
            "tgtd down: a 64 KiB write completed with {down} after {:.1}s",
            tk.elapsed().as_secs_f64()
        );
        let tr = Instant::now();
        start_targets("tgt");
        let mut ok = false;
        let mut attempts = 0;
        while tr.elapsed() < Duration::from_secs(60) {
            attempts += 1;
            let p = c.ptr(0);
            c.queues[0].write(0, p, 64 * KIB, 2, ReqFlags::empty());
            if c.wait(0, 1)[0].1 == 0 {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        println!(
            "tgtd restarted: I/O recovered={ok} after {:.1}s ({attempts} attempts)",
            tr.elapsed().as_secs_f64()
        );
        assert!(
            ok,
            "I/O did not recover after the tgtd restart; log:\n{}",
            b.log()
        );
        c.buf()[HALF..HALF + 64 * KIB].fill(0);
        assert_eq!(c.read(0, 0, HALF, 64 * KIB), 0);
        assert!(
            c.buf()[HALF..HALF + 64 * KIB] == data[..],
            "data after reconnect differs"
        );
        let log = b.log();
        assert!(log.contains("reconnected"), "no reconnect logged:\n{log}");
        drop(c);
        drop(b);
        split_run(&tgt_url, &tgt_backing, 11);
    }));
    println!("whole run {:.1}s", t0.elapsed().as_secs_f64());
    if res.is_err() {
        let log = std::fs::read_to_string("/tmp/tgtd.log").unwrap_or_default();
        println!("--- /tmp/tgtd.log (tail) ---\n{}", tail(&log, 40));
    }
    res.expect("tgtd run");
    lio.expect("LIO run");
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `iser://` on a host without RDMA: one clear line naming what was seen, exit 1.
#[test]
fn iser_url_without_rdma_device_exits_1() {
    if in_vm() {
        return;
    }
    let names = vhost_iser::transport::iser::verbs::device_names();
    if !names.is_empty() {
        eprintln!("this host has RDMA devices {names:?}; the no-device check does not apply");
        return;
    }
    let mut b = Backend::spawn(
        &[
            "--target",
            "iser://10.99.0.1:3260/iqn.2026-11.vhost-iser:tgt/1",
        ],
        &[],
    );
    let st = b.wait_exit(30);
    assert_eq!(st.code(), Some(1), "log:\n{}", b.log());
    let log = b.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert_eq!(errors.len(), 1, "log:\n{log}");
    assert!(
        errors[0].contains("no RDMA device found (ibv_get_device_list saw: none)"),
        "{log}"
    );
}
