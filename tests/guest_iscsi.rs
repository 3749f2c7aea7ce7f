//! A real Linux guest (QEMU, vhost-user-blk) on vhost-iser, backed by a
//! private tgtd over iSCSI/TCP: fio writes with crc32c checksums and verifies
//! every block, then reads at random; the data must also be in tgtd's file.

mod client;
mod support;

use std::path::Path;

use client::Backend;
use support::tgtd::{Backing, Tgtd};

/// Bytes fio writes and verifies in the guest.
const FIO_BYTES: u64 = 16 << 20;

/// Number of 4 KiB blocks in the first `len` bytes of `file` that are all zero.
fn zero_blocks(file: &Path, len: u64) -> usize {
    let data = std::fs::read(file).expect("read the LUN's backing file");
    data[..len as usize]
        .chunks(4096)
        .filter(|b| b.iter().all(|&x| x == 0))
        .count()
}

fn guest_fio_through_tgtd(queues: u32) {
    let mut t = Tgtd::start();
    let tid = t.create_target("iqn.2026-11.vhost-iser.test:guest");
    let file = t
        .add_lun(tid, 1, Backing::File(256 << 20))
        .expect("file LUN");
    t.bind_all(tid);
    assert_eq!(zero_blocks(&file, FIO_BYTES), 4096, "fresh LUN is not zero");
    let url = t.url(tid, 1);
    let q = queues.to_string();
    let backend = Backend::start(&["--target", &url, "--queues", &q]);

    let out = support::unique_tmp_dir();
    let sock = backend.socket.to_str().expect("utf-8");
    let outdir = out.path().to_str().expect("utf-8");
    let size = format!("SIZE={}m", FIO_BYTES >> 20);
    let run = support::vm::run_script(
        "run-guest.sh",
        &[
            "--sock",
            sock,
            "--queues",
            &q,
            "--mem",
            "512",
            "--timeout",
            "240",
            "--out",
            outdir,
            "--",
            "env",
            &size,
            "RT=3",
            "qemu/guest/fio-verify.sh",
            "iscsi",
        ],
    );
    eprintln!(
        "guest fio over vhost-iser -> tgtd, {queues} queue(s): wall {:.1}s",
        run.wall.as_secs_f64()
    );
    assert_eq!(
        run.code,
        Some(0),
        "guest fio verify failed:\n{}\n--- vhost-iser ---\n{}\n--- tgtd ---\n{}",
        run.text(),
        backend.log(),
        t.log_text()
    );
    let json = std::fs::read_to_string(out.path().join("iscsi/verify.json"))
        .unwrap_or_else(|e| panic!("no fio JSON in --out ({e}):\n{}", run.text()));
    assert!(
        json.contains("\"error\" : 0"),
        "fio reported an error:\n{json}"
    );
    // Both the writes and the verify reads moved every byte.
    let full = format!("\"io_bytes\" : {FIO_BYTES}");
    assert_eq!(
        json.matches(&full).count(),
        2,
        "expected {FIO_BYTES} bytes written and read back:\n{json}"
    );
    let rr = std::fs::read_to_string(out.path().join("iscsi/randread.json")).expect("randread");
    assert!(rr.contains("\"error\" : 0"), "randread failed:\n{rr}");
    // Every 4 KiB block fio wrote reached tgtd's backing file.
    assert_eq!(
        zero_blocks(&file, FIO_BYTES),
        0,
        "some blocks never reached the target"
    );
    // One iSCSI session per queue.
    let logins = backend
        .log()
        .matches("logged in to iqn.2026-11.vhost-iser.test:guest")
        .count();
    assert!(
        logins >= queues as usize,
        "{logins} logins for {queues} queue(s):\n{}",
        backend.log()
    );
}

#[test]
fn guest_fio_verify_one_queue() {
    guest_fio_through_tgtd(1);
}

#[test]
fn guest_fio_verify_two_queues() {
    guest_fio_through_tgtd(2);
}
