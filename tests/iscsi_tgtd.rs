//! End to end over iSCSI/TCP: libblkio → vhost-iser → a private tgtd on
//! 127.0.0.1, checking data both through the client and in tgtd's backing file.

mod client;
mod support;

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use blkio::ReqFlags;
use client::{drain, pattern, Backend, Client};
use support::tgtd::{Backing, Tgtd};

const MIB: usize = 1 << 20;

/// Bytes of the LUN's backing file.
fn file_bytes(path: &Path, at: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).expect("backing file");
    f.seek(SeekFrom::Start(at)).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact(&mut v).unwrap();
    v
}

fn target_with_lun(size: u64) -> (Tgtd, u32, std::path::PathBuf) {
    let mut t = Tgtd::start();
    let tid = t.create_target("iqn.2026-11.vhost-iser.test:disk");
    let file = t.add_lun(tid, 1, Backing::File(size)).expect("file LUN");
    t.bind_all(tid);
    (t, tid, file)
}

/// Writes and reads back `cases` through queue `q`, checking the client's view and the target's file.
fn write_verify(c: &mut Client, q: usize, file: &Path, cases: &[(u64, usize)], seed: u8) {
    for (i, &(at, len)) in cases.iter().enumerate() {
        let data = pattern(at, len, seed.wrapping_add(i as u8));
        c.buf()[..len].copy_from_slice(&data);
        assert_eq!(c.write(q, at, 0, len), 0, "write {len} at {at}");
        assert!(
            file_bytes(file, at, len) == data,
            "target file differs after write of {len} at {at}"
        );
        let off = 8 * MIB;
        c.buf()[off..off + len].fill(0xEE);
        assert_eq!(c.read(q, at, off, len), 0, "read {len} at {at}");
        assert!(
            c.buf()[off..off + len] == data[..],
            "read-back differs for {len} at {at}"
        );
    }
}

const SIZES: &[(u64, usize)] = &[
    (0, 512),
    (512 * 9, 4096),
    (1 << 20, 64 * 1024),
    (3 << 20, 256 * 1024),      // = MaxBurstLength
    (5 * 512 + (8 << 20), MIB), // several R2Ts
    (16 << 20, 4 * MIB),        // beyond MaxBurstLength and the 1 MiB max transfer: split
];

#[test]
fn write_verify_512b_to_4mib_one_queue() {
    let (t, tid, file) = target_with_lun(64 << 20);
    let url = t.url(tid, 1);
    let backend = Backend::start(&["--target", &url]);
    let mut c = Client::connect(&backend.socket, 1, 16 * MIB);
    assert_eq!(c.capacity(), 64 << 20);
    write_verify(&mut c, 0, &file, SIZES, 1);
    assert_eq!(c.flush(0), 0);
    assert!(backend
        .log()
        .contains("logged in to iqn.2026-11.vhost-iser.test:disk"));
}

#[test]
fn four_queues_four_sessions_concurrent_verify() {
    four_sessions_verify(&[]);
}

/// The same on two worker threads: each session's completions reach its
/// own queue's worker on the thread that serves it.
#[test]
fn four_queues_on_two_threads_concurrent_verify() {
    four_sessions_verify(&["--threads", "2"]);
}

fn four_sessions_verify(extra: &[&str]) {
    let (t, tid, file) = target_with_lun(128 << 20);
    let url = t.url(tid, 1);
    let mut args = vec!["--target", url.as_str(), "--queues", "4"];
    args.extend_from_slice(extra);
    let backend = Backend::start(&args);
    let log = backend.log();
    assert_eq!(
        log.matches("logged in to").count(),
        4,
        "one session per queue:\n{log}"
    );
    let c = Client::connect(&backend.socket, 4, 16 * MIB);
    let Client {
        queues,
        region,
        blkio,
    } = c;
    let base = region.addr;
    let bs = 64 * 1024;
    let depth = 16;
    let threads: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(qi, mut q)| {
            std::thread::spawn(move || {
                let disk = qi as u64 * (32 << 20);
                for slot in 0..depth {
                    let at = disk + (slot * bs) as u64;
                    let data = pattern(at, bs, 40 + qi as u8);
                    let p = (base + qi * 4 * MIB + slot * bs) as *mut u8;
                    // SAFETY: disjoint slots of the mapped region.
                    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, bs) };
                    q.write(at, p, bs, slot, ReqFlags::empty());
                }
                let done = drain(&mut q, depth);
                assert!(
                    done.iter().all(|&(_, r)| r == 0),
                    "queue {qi}: write failed: {done:?}"
                );
            })
        })
        .collect();
    for th in threads {
        th.join().expect("queue thread");
    }
    drop(blkio);
    for qi in 0..4u64 {
        for slot in 0..depth as u64 {
            let at = qi * (32 << 20) + slot * bs as u64;
            assert!(
                file_bytes(&file, at, bs) == pattern(at, bs, 40 + qi as u8),
                "queue {qi} slot {slot}"
            );
        }
    }
}

#[test]
fn r2t_immediate_data_burst_and_digest_combinations() {
    // (target-side parameters, what the login log line must show)
    let combos: &[(&[(&str, &str)], &str)] = &[
        (
            &[
                ("InitialR2T", "No"),
                ("ImmediateData", "Yes"),
                ("FirstBurstLength", "16384"),
                ("MaxBurstLength", "16384"),
                ("MaxRecvDataSegmentLength", "8192"),
            ],
            "ImmediateData Yes, InitialR2T No",
        ),
        (
            &[
                ("InitialR2T", "Yes"),
                ("ImmediateData", "No"),
                ("FirstBurstLength", "32768"),
                ("MaxBurstLength", "32768"),
            ],
            "ImmediateData No, InitialR2T Yes",
        ),
        (
            &[
                ("InitialR2T", "No"),
                ("ImmediateData", "No"),
                ("FirstBurstLength", "65536"),
            ],
            "ImmediateData No, InitialR2T No",
        ),
        (
            &[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")],
            "header digest",
        ),
    ];
    for (params, expect) in combos {
        let (t, tid, file) = target_with_lun(32 << 20);
        for (k, v) in params.iter() {
            t.update_param(tid, k, v);
        }
        let url = t.url(tid, 1);
        let digests = if expect.contains("digest") {
            "both"
        } else {
            "none"
        };
        let backend = Backend::start(&["--target", &url, "--digests", digests]);
        assert!(
            backend.log().contains(expect),
            "{params:?}: login line lacks {expect:?}:\n{}",
            backend.log()
        );
        let mut c = Client::connect(&backend.socket, 1, 16 * MIB);
        write_verify(
            &mut c,
            0,
            &file,
            &[
                (0, 512),
                (4096, 4096),
                (1 << 20, 100 * 1024),
                (2 << 20, 1 << 20),
            ],
            7,
        );
    }
}

#[test]
fn chap_mutual_chap_and_a_wrong_secret() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("chap.secret");
    std::fs::write(&secret_file, "initiator-secret-123\n").unwrap();
    let target_secret_file = dir.path().join("target.secret");
    std::fs::write(&target_secret_file, "target-secret-4567\n").unwrap();

    // One-way CHAP, secret from a file.
    let (mut t, tid, file) = target_with_lun(16 << 20);
    t.set_chap(tid, "alice", "initiator-secret-123");
    let url = t.url(tid, 1);
    let sf = secret_file.to_str().unwrap();
    let backend = Backend::start(&[
        "--target",
        &url,
        "--chap-user",
        "alice",
        "--chap-secret-file",
        sf,
    ]);
    assert!(backend.log().contains("with CHAP"));
    let mut c = Client::connect(&backend.socket, 1, 16 * MIB);
    write_verify(&mut c, 0, &file, &[(0, 4096)], 3);
    drop(c);
    drop(backend);

    // Mutual CHAP, secrets from the environment.
    t.set_mutual_chap(tid, "target-bob", "target-secret-4567");
    let backend = Backend::start_env(
        &[
            "--target",
            &url,
            "--chap-user",
            "alice",
            "--target-chap-user",
            "target-bob",
        ],
        &[
            ("VHOST_ISER_CHAP_SECRET", "initiator-secret-123"),
            ("VHOST_ISER_TARGET_CHAP_SECRET", "target-secret-4567"),
        ],
    );
    let mut c = Client::connect(&backend.socket, 1, 16 * MIB);
    write_verify(&mut c, 0, &file, &[(8192, 4096)], 4);
    drop(c);
    let log = backend.log();
    assert!(
        !log.contains("initiator-secret-123") && !log.contains("target-secret-4567"),
        "secret in log:\n{log}"
    );
    drop(backend);

    // Mutual CHAP where the target answers with a secret we do not expect.
    let mut b = Backend::spawn(
        &[
            "--target",
            &url,
            "--chap-user",
            "alice",
            "--target-chap-user",
            "target-bob",
        ],
        &[
            ("VHOST_ISER_CHAP_SECRET", "initiator-secret-123"),
            ("VHOST_ISER_TARGET_CHAP_SECRET", "not-the-target-secret"),
        ],
    );
    let st = b.wait_exit(60);
    assert_eq!(st.code(), Some(1), "log:\n{}", b.log());
    assert!(
        b.log().to_lowercase().contains("target"),
        "log:\n{}",
        b.log()
    );

    // Wrong initiator secret: one clear line, exit 1, no secret in the log.
    std::fs::write(&secret_file, "wrong-secret-0000\n").unwrap();
    let mut b = Backend::spawn(
        &[
            "--target",
            &url,
            "--chap-user",
            "alice",
            "--chap-secret-file",
            sf,
        ],
        &[],
    );
    let st = b.wait_exit(60);
    let log = b.log();
    assert_eq!(st.code(), Some(1), "log:\n{log}");
    assert!(log.contains("authentication failure"), "log:\n{log}");
    assert!(log.contains(&t.portal()), "the portal is named:\n{log}");
    assert!(!log.contains("wrong-secret-0000"), "secret in log:\n{log}");
    assert!(
        log.matches("login to").count() <= 3,
        "no retry storm:
{log}"
    );
}

#[test]
fn read_only_lun_is_read_only_for_the_guest() {
    let mut t = Tgtd::start();
    let tid = t.create_target("iqn.2026-11.vhost-iser.test:ro");
    t.add_lun(tid, 1, Backing::ReadOnlyFile(8 << 20));
    t.bind_all(tid);
    let url = t.url(tid, 1);
    let backend = Backend::start(&["--target", &url]);
    assert!(
        backend.log().contains("write-protected"),
        "{}",
        backend.log()
    );
    let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", backend.socket.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    let err = b
        .start()
        .err()
        .expect("a read-write frontend must be refused");
    assert!(format!("{err:?}").contains("read-only"), "{err:?}");
}

#[test]
fn two_luns_are_independent() {
    let mut t = Tgtd::start();
    let tid = t.create_target("iqn.2026-11.vhost-iser.test:multi");
    let f1 = t.add_lun(tid, 1, Backing::File(8 << 20)).unwrap();
    let f2 = t.add_lun(tid, 2, Backing::File(16 << 20)).unwrap();
    t.bind_all(tid);
    let b1 = Backend::start(&["--target", &t.url(tid, 1)]);
    let b2 = Backend::start(&["--target", &t.url(tid, 2)]);
    let mut c1 = Client::connect(&b1.socket, 1, 16 * MIB);
    let mut c2 = Client::connect(&b2.socket, 1, 16 * MIB);
    assert_eq!(c1.capacity(), 8 << 20);
    assert_eq!(c2.capacity(), 16 << 20);
    write_verify(&mut c1, 0, &f1, &[(0, 65536)], 11);
    write_verify(&mut c2, 0, &f2, &[(0, 65536)], 12);
    assert!(file_bytes(&f1, 0, 65536) != file_bytes(&f2, 0, 65536));
}

#[test]
fn target_loss_fails_io_instead_of_hanging() {
    let (t, tid, _file) = target_with_lun(16 << 20);
    let url = t.url(tid, 1);
    let backend = Backend::start(&["--target", &url]);
    let mut c = Client::connect(&backend.socket, 1, 2 * MIB);
    assert_eq!(c.read(0, 0, 0, 4096), 0);
    drop(t); // SIGKILLs tgtd
    let started = std::time::Instant::now();
    let r = c.read(0, 0, 0, 4096);
    assert_ne!(r, 0, "I/O to a dead target must fail");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert!(backend.log().contains("connection to"), "{}", backend.log());
}

/// `vhost-iser discover`: a discovery session and SendTargets against tgtd
/// lists every target the initiator may log in to, one machine-readable
/// "HOST:PORT,TPGT NAME" line per portal.
#[test]
fn discover_lists_the_tgtd_targets() {
    let mut t = Tgtd::start();
    let a = t.create_target("iqn.2026-11.vhost-iser.test:disc-a");
    let b = t.create_target("iqn.2026-11.vhost-iser.test:disc-b");
    t.add_lun(a, 1, Backing::File(1 << 20)).unwrap();
    t.add_lun(b, 1, Backing::File(1 << 20)).unwrap();
    t.bind_all(a);
    t.bind_all(b);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-iser"))
        .args(["discover", "--portal", &t.portal()])
        .output()
        .expect("run vhost-iser discover");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    eprint!("{stdout}");
    let mut lines: Vec<&str> = stdout.lines().collect();
    lines.sort();
    let portal = t.portal();
    assert_eq!(
        lines,
        vec![
            format!("{portal},1 iqn.2026-11.vhost-iser.test:disc-a"),
            format!("{portal},1 iqn.2026-11.vhost-iser.test:disc-b"),
        ],
        "stderr: {stderr}"
    );
}

/// Nothing listens on the portal: one error line and exit status 1.
#[test]
fn discover_fails_clearly_without_a_target() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-iser"))
        .args(["discover", "--portal", &format!("127.0.0.1:{port}")])
        .output()
        .expect("run vhost-iser discover");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains(&format!("discovery at 127.0.0.1:{port}")),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

/// A URL naming a LUN the target does not have: REPORT LUNS at start-up
/// turns it into one clear line and exit status 1.
#[test]
fn missing_lun_is_one_clear_error() {
    let (t, tid, _file) = target_with_lun(1 << 20);
    let url = t.url(tid, 5);
    let mut b = Backend::spawn(&["--target", &url], &[]);
    let st = b.wait_exit(30);
    assert_eq!(st.code(), Some(1), "log:\n{}", b.log());
    let want = format!(
        "target iqn.2026-11.vhost-iser.test:disk on {} has no LUN 5 (it reports LUNs 0, 1)",
        t.portal()
    );
    let log = b.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(errors[0].ends_with(&want), "{log}");
    eprintln!("{}", errors[0]);
}
