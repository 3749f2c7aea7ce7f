//! Recovery against a real tgtd: the target crashes (SIGKILL) and comes back
//! on the same port during a write+verify loop, and a LUN whose backing
//! store is full. libblkio → vhost-iser → tgtd on 127.0.0.1.

mod client;
mod support;

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

use client::{pattern, Backend, Client};
use support::tgtd::{Backing, Tgtd};

const MIB: usize = 1 << 20;
const IQN: &str = "iqn.2026-11.vhost-iser.test:recovery";

fn file_bytes(path: &Path, at: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).expect("backing file");
    f.seek(SeekFrom::Start(at)).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact(&mut v).unwrap();
    v
}

#[test]
fn tgtd_killed_and_restarted_during_write_verify_loop() {
    let mut t = Tgtd::start();
    let tid = t.create_target(IQN);
    let file = t
        .add_lun(tid, 1, Backing::File(64 << 20))
        .expect("file LUN");
    t.bind_all(tid);
    let url = t.url(tid, 1);
    let backend = Backend::start_env(
        &["--target", &url],
        &[("VHOST_ISER_TIMEOUTS", "nop=1,nop_timeout=2,replacement=30")],
    );
    // I/O in its own thread; tgtd is killed and restarted from this one (tgtd
    // dies with the thread that spawned it: PR_SET_PDEATHSIG).
    let socket = backend.socket.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let len = 256 * 1024;
    let io = std::thread::spawn(move || {
        let mut c = Client::connect(&socket, 1, 16 * MIB);
        let mut i = 0u64;
        let mut completions: Vec<Instant> = Vec::new();
        let mut written = Vec::new();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let at = (i % 32) * len as u64;
            let data = pattern(at, len, i as u8);
            c.buf()[..len].copy_from_slice(&data);
            assert_eq!(c.write(0, at, 0, len), 0, "write {i}");
            let off = 4 * MIB;
            c.buf()[off..off + len].fill(0xEE);
            assert_eq!(c.read(0, at, off, len), 0, "read {i}");
            assert!(c.buf()[off..off + len] == data[..], "data {i} differs");
            completions.push(Instant::now());
            written.push((at, data));
            i += 1;
        }
        (i, completions, written)
    });
    std::thread::sleep(Duration::from_secs(1));
    t.kill9();
    let killed = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    t.restart();
    let restarted = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (i, completions, last_written) = match io.join() {
        Ok(r) => r,
        Err(_) => panic!("I/O thread failed; log:\n{}", backend.log()),
    };
    let first_after = completions
        .iter()
        .find(|&&x| x > restarted)
        .copied()
        .expect("no I/O completed after the restart");
    let recovery = first_after - restarted;
    let stall = completions
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    eprintln!(
        "tgtd restart: {i} write+verify rounds, longest stall {stall:?} (outage {:?}), first I/O {recovery:?} after tgtd was back",
        restarted - killed
    );
    assert!(
        recovery < Duration::from_secs(6),
        "recovery took {recovery:?}"
    );
    // The target's file has what the guest last wrote at each offset.
    let mut latest = std::collections::HashMap::new();
    for (at, d) in last_written {
        latest.insert(at, d);
    }
    for (at, d) in latest {
        assert!(
            file_bytes(&file, at, len) == d,
            "target file differs at {at}"
        );
    }
    let log = backend.log();
    assert!(log.contains("reconnected to"), "{log}");
    assert!(!log.contains("replacement timeout"), "{log}");
    drop(t);
}

/// A LUN on a 1 MiB tmpfs that claims 8 MiB: writes past what fits fail with
/// an error the guest sees; the rest of the disk keeps working.
#[test]
fn full_backing_store_gives_io_errors_and_nothing_else_breaks() {
    let mnt = support::unique_tmp_dir();
    let m = mnt.path().to_str().unwrap().to_string();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs", &m])
        .status()
        .expect("mount");
    assert!(st.success(), "cannot mount a tmpfs (needs root)");
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(m.clone());
    let img = format!("{m}/lun.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();

    let mut t = Tgtd::start();
    let tid = t.create_target(IQN);
    t.tgtadm(&[
        "--mode",
        "logicalunit",
        "--op",
        "new",
        "--tid",
        &tid.to_string(),
        "--lun",
        "1",
        "--bstype",
        "rdwr",
        "--backing-store",
        &img,
    ])
    .expect("add LUN");
    t.bind_all(tid);
    let url = t.url(tid, 1);
    let backend = Backend::start(&["--target", &url]);
    let mut c = Client::connect(&backend.socket, 1, 4 * MIB);
    assert_eq!(c.capacity(), 8 << 20);

    // 512 KiB fits.
    let good = pattern(0, 512 * 1024, 1);
    c.buf()[..good.len()].copy_from_slice(&good);
    assert_eq!(c.write(0, 0, 0, good.len()), 0);
    // 2 MiB more does not.
    let mut failures = 0;
    for k in 0..4u64 {
        let at = (2 + k) * MIB as u64;
        let d = pattern(at, 512 * 1024, 2);
        c.buf()[..d.len()].copy_from_slice(&d);
        if c.write(0, at, 0, d.len()) != 0 {
            failures += 1;
        }
    }
    assert!(
        failures > 0,
        "writes to a full store all succeeded; log:\n{}",
        backend.log()
    );
    // The data that fit is still there and the session still works.
    let off = 2 * MIB;
    assert_eq!(c.read(0, 0, off, good.len()), 0);
    assert!(c.buf()[off..off + good.len()] == good[..]);
    assert_eq!(c.flush(0), 0);
    let log = backend.log();
    assert!(log.contains("WRITE"), "{log}");
    assert!(
        !log.contains("reconnected"),
        "a full store must not cost the session:\n{log}"
    );
    eprintln!(
        "full store: {failures} of 4 writes failed; log lines:\n{}",
        log.lines()
            .filter(|l| l.contains("WRITE"))
            .take(2)
            .collect::<Vec<_>>()
            .join("\n")
    );
}
