//! Backend restart without loss: vhost-iser is killed with SIGKILL in the
//! middle of a guest's fio write+verify (through tgtd over iSCSI/TCP) and
//! started again on the same socket. QEMU (chardev reconnect=1) reconnects and
//! hands the new process the inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMEM)
//! the old one filled; the new process resubmits the requests recorded there.
//! fio must finish without an I/O error and every block must verify.
//! tgtd is frozen (SIGSTOP) for half a second before the kill so the guest's
//! queue depth is in flight in the backend when it dies.

mod client;
mod support;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use client::Backend;
use support::tgtd::{Backing, Tgtd};

const FIO_MIB: u64 = 64;

/// Sum of N over "queue Q: resubmitted N inflight requests ..." log lines.
fn resubmitted(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(" inflight requests"))
        .filter_map(|l| {
            let rest = &l[l.find("resubmitted ")? + "resubmitted ".len()..];
            rest.split_whitespace().next()?.parse::<usize>().ok()
        })
        .sum()
}

#[test]
fn kill_9_mid_fio_then_restart_loses_nothing() {
    let mut t = Tgtd::start();
    let tid = t.create_target("iqn.2026-11.vhost-iser.test:restart");
    let file = t
        .add_lun(tid, 1, Backing::File(256 << 20))
        .expect("file LUN");
    t.bind_all(tid);
    let url = t.url(tid, 1);
    let args = ["--target", url.as_str(), "--queues", "2"];

    let sockdir = support::unique_tmp_dir();
    let socket = sockdir.path().join("vhost.sock");
    let mut first = Backend::start_at(tempfile::tempdir().unwrap(), socket.clone(), &args);

    let out = support::unique_tmp_dir();
    let sock_s = socket.to_str().expect("utf-8").to_string();
    let out_s = out.path().to_str().expect("utf-8").to_string();
    let vm = std::thread::spawn(move || {
        support::vm::run_script(
            "run-guest.sh",
            &[
                "--sock",
                &sock_s,
                "--queues",
                "2",
                "--reconnect",
                "1",
                "--mem",
                "512",
                "--timeout",
                "300",
                "--out",
                &out_s,
                "--",
                "env",
                &format!("SIZE={FIO_MIB}m"),
                "RT=2",
                "qemu/guest/fio-verify.sh",
                "restart",
            ],
        )
    });

    // Wait until the guest's writes are well under way: a quarter of fio's
    // area has reached tgtd's file (tmpfs allocates blocks as they are written).
    let started = Instant::now();
    let threshold = FIO_MIB * 1024 * 1024 / 4;
    loop {
        let allocated = std::fs::metadata(&file).unwrap().blocks() * 512;
        if allocated >= threshold {
            break;
        }
        assert!(
            !vm.is_finished(),
            "the guest finished before the backend was killed"
        );
        assert!(
            started.elapsed() < Duration::from_secs(200),
            "guest writes never started; backend log:\n{}",
            first.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Freeze the target for a moment so the guest's queue depth piles up in
    // the backend: the kill then always finds requests in flight.
    let tgtd_pid = t.pid() as i32;
    // SAFETY: kill(2) on our own tgtd child.
    unsafe { libc::kill(tgtd_pid, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_millis(500));
    let mut child = first.child.take().expect("first backend");
    child.kill().expect("SIGKILL vhost-iser");
    let st = child.wait().unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(tgtd_pid, libc::SIGCONT) };
    let killed_at = started.elapsed();
    eprintln!(
        "killed vhost-iser ({st}) at {:.1}s, {} MiB on the target",
        killed_at.as_secs_f64(),
        (std::fs::metadata(&file).unwrap().blocks() * 512) >> 20
    );
    // Stay away a moment: QEMU notices, retries every second.
    std::thread::sleep(Duration::from_millis(1500));
    let second = Backend::start_at(tempfile::tempdir().unwrap(), socket.clone(), &args);

    let run = vm.join().expect("VM thread");
    eprintln!(
        "guest fio with a backend kill -9 + restart: wall {:.1}s",
        run.wall.as_secs_f64()
    );
    let log2 = second.log();
    assert_eq!(
        run.code,
        Some(0),
        "guest fio failed across the restart:\n{}\n--- first vhost-iser ---\n{}\n--- second vhost-iser ---\n{log2}",
        run.text(),
        first.log()
    );
    let json = std::fs::read_to_string(out.path().join("restart/verify.json"))
        .unwrap_or_else(|e| panic!("no fio JSON ({e}):\n{}", run.text()));
    assert!(json.contains("\"error\" : 0"), "fio error:\n{json}");
    let full = format!("\"io_bytes\" : {}", FIO_MIB << 20);
    assert_eq!(
        json.matches(&full).count(),
        2,
        "fio did not write and verify all {FIO_MIB} MiB:\n{json}"
    );
    for bad in ["bad request", "cannot add descriptor", "unknown tag"] {
        assert!(!log2.contains(bad), "'{bad}' after the restart:\n{log2}");
    }
    // The replay came from the inflight region the first process filled.
    let n = resubmitted(&log2);
    eprintln!("second backend resubmitted {n} inflight requests");
    assert!(
        n >= 8,
        "{n} requests resubmitted from the inflight region (the guest had a queue depth of 16 \
         waiting on a frozen target):\n{log2}"
    );
}
