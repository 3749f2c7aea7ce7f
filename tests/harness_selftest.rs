//! Tests of the test infrastructure itself: the tgtd helper (checked with libiscsi's
//! command-line tools), the vhost-user-blk guest VM (qemu-storage-daemon backend, fio
//! verify) and the soft-RoCE VM (iSER to tgtd and LIO).
//!
//! Nothing here skips: a missing tool fails with "run scripts/install-deps.sh".
//! Timings (2 busy cores, TCG): tgtd tests < 1 s each; guest VM ~35-45 s;
//! rdma VM ~40-90 s.

mod support;

use std::process::{Command, Output, Stdio};
use support::qsd::QemuStorageDaemon;
use support::tgtd::{Backing, Tgtd, NULL_LUN_SIZE};

/// Runs a libiscsi-bin tool (under `timeout 60`, they can hang on a dead target).
fn iscsi(tool: &str, args: &[&str]) -> Output {
    let bin = support::require_tool(tool, "libiscsi-bin");
    Command::new("timeout")
        .arg("60")
        .arg(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"))
}

fn ok(out: &Output, what: &str, t: &Tgtd) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\n--- tgtd log ---\n{}",
        support::output_text(out),
        t.log_text()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// "Total size:N" of iscsi-readcapacity16.
fn capacity(t: &Tgtd, url: &str) -> u64 {
    let out = ok(
        &iscsi("iscsi-readcapacity16", &[url]),
        "iscsi-readcapacity16",
        t,
    );
    out.lines()
        .find_map(|l| l.strip_prefix("Total size:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no 'Total size:' in {out}"))
}

#[test]
fn tgtd_file_lun_answers_inquiry_and_capacity() {
    let mut t = Tgtd::start();
    let tid = t.create_target("iqn.2026-11.vhost-iser.test:file");
    let file = t
        .add_lun(tid, 1, Backing::File(8 << 20))
        .expect("file-backed");
    assert!(file.starts_with("/dev/shm"), "{}", file.display());
    t.bind_all(tid);
    let inq = ok(&iscsi("iscsi-inq", &[&t.url(tid, 1)]), "iscsi-inq", &t);
    assert!(inq.contains("DIRECT_ACCESS"), "{inq}");
    assert_eq!(capacity(&t, &t.url(tid, 1)), 8 << 20);
}

#[test]
fn tgtd_null_and_read_only_luns() {
    let mut t = Tgtd::start();
    let tid = t.create_target("iqn.2026-11.vhost-iser.test:null");
    assert!(t.add_lun(tid, 1, Backing::Null).is_none());
    t.add_lun(tid, 2, Backing::ReadOnlyFile(1 << 20));
    t.bind_all(tid);
    assert_eq!(capacity(&t, &t.url(tid, 1)), NULL_LUN_SIZE);
    assert_eq!(capacity(&t, &t.url(tid, 2)), 1 << 20);
    let show = t.show();
    let lun2 = show.split("LUN: 2").nth(1).expect("LUN 2 in show");
    assert!(lun2.contains("Readonly: Yes"), "{show}");
    let lun1 = show.split("LUN: 1").nth(1).expect("LUN 1 in show");
    assert!(lun1.contains("Backing store type: null"), "{show}");
}

#[test]
fn tgtd_discovery_lists_every_target() {
    let mut t = Tgtd::start();
    let a = t.create_target("iqn.2026-11.vhost-iser.test:disc-a");
    let b = t.create_target("iqn.2026-11.vhost-iser.test:disc-b");
    assert_eq!((a, b), (1, 2));
    for tid in [a, b] {
        t.add_lun(tid, 1, Backing::Null);
        t.bind_all(tid);
    }
    let out = ok(
        &iscsi("iscsi-ls", &[&format!("iscsi://{}", t.portal())]),
        "iscsi-ls",
        &t,
    );
    for tid in [a, b] {
        let want = format!("Target:{} Portal:{}", t.iqn(tid), t.portal());
        assert!(out.contains(&want), "missing {want} in:\n{out}");
    }
}

#[test]
fn tgtd_chap_one_way_and_mutual() {
    let mut t = Tgtd::start();
    let tid = t.create_target("iqn.2026-11.vhost-iser.test:chap");
    t.add_lun(tid, 1, Backing::Null);
    t.bind_all(tid);
    t.set_chap(tid, "alice", "alice-secret-12");
    let (portal, iqn) = (t.portal(), t.iqn(tid).to_string());
    let with = |cred: &str, query: &str| format!("iscsi://{cred}@{portal}/{iqn}/1{query}");
    let plain = t.url(tid, 1);
    assert!(
        !iscsi("iscsi-inq", &[&plain]).status.success(),
        "login without CHAP must fail"
    );
    let wrong = with("alice%wrong-secret-12", "");
    assert!(
        !iscsi("iscsi-inq", &[&wrong]).status.success(),
        "wrong secret must fail"
    );
    ok(
        &iscsi("iscsi-inq", &[&with("alice%alice-secret-12", "")]),
        "one-way CHAP",
        &t,
    );

    t.set_mutual_chap(tid, "target-bob", "bob-secret-1234");
    let good = with(
        "alice%alice-secret-12",
        "?target_user=target-bob&target_password=bob-secret-1234",
    );
    ok(&iscsi("iscsi-inq", &[&good]), "mutual CHAP", &t);
    let bad = with(
        "alice%alice-secret-12",
        "?target_user=target-bob&target_password=not-bobs-1234",
    );
    let out = iscsi("iscsi-inq", &[&bad]);
    assert!(
        !out.status.success(),
        "initiator must reject a target with the wrong secret"
    );
    // the helper's own error messages never carry a secret
    let err = t.tgtadm(&[
        "--mode",
        "account",
        "--op",
        "new",
        "--user",
        "alice",
        "--password",
        "s3cr3t-v4lue",
    ]);
    assert!(!err.expect_err("duplicate account").contains("s3cr3t-v4lue"));
}

#[test]
fn tgtd_initiator_name_acl() {
    let mut t = Tgtd::start();
    let tid = t.create_target("iqn.2026-11.vhost-iser.test:acl");
    t.add_lun(tid, 1, Backing::Null);
    t.bind_initiator(tid, "iqn.2026-11.vhost-iser.test:allowed");
    let url = t.url(tid, 1);
    let denied = iscsi(
        "iscsi-inq",
        &["-i", "iqn.2026-11.vhost-iser.test:other", &url],
    );
    assert!(
        !denied.status.success(),
        "unlisted initiator must be refused"
    );
    ok(
        &iscsi(
            "iscsi-inq",
            &["-i", "iqn.2026-11.vhost-iser.test:allowed", &url],
        ),
        "ACL",
        &t,
    );
}

#[test]
fn tgtd_update_param_is_applied() {
    let mut t = Tgtd::start();
    let tid = t.create_target("iqn.2026-11.vhost-iser.test:params");
    t.add_lun(tid, 1, Backing::File(1 << 20));
    t.bind_all(tid);
    assert!(t.show_target(tid).contains("MaxBurstLength=262144"));
    t.update_param(tid, "MaxBurstLength", "16384");
    t.update_param(tid, "ImmediateData", "No");
    let show = t.show_target(tid);
    assert!(show.contains("MaxBurstLength=16384"), "{show}");
    assert!(show.contains("ImmediateData=No"), "{show}");
    assert_eq!(capacity(&t, &t.url(tid, 1)), 1 << 20);
    assert!(t
        .tgtadm(&[
            "--mode",
            "target",
            "--op",
            "update",
            "--tid",
            "1",
            "-n",
            "NoSuchParam",
            "-v",
            "1"
        ])
        .is_err());
}

#[test]
fn tgtd_drop_kills_it_and_removes_files() {
    let mut t = Tgtd::start();
    let tid = t.create_target("iqn.2026-11.vhost-iser.test:drop");
    let file = t.add_lun(tid, 1, Backing::File(1 << 20)).expect("file");
    let pid = t.pid();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(t);
    assert!(
        !file.exists(),
        "backing file {} left behind",
        file.display()
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "tgtd {pid} still alive"
    );
}

#[test]
fn tgtd_instances_run_in_parallel() {
    let handles: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let mut t = Tgtd::start();
                let tid = t.create_target(&format!("iqn.2026-11.vhost-iser.test:par{i}"));
                t.add_lun(tid, 1, Backing::File((i + 1) << 20));
                t.bind_all(tid);
                assert_eq!(capacity(&t, &t.url(tid, 1)), (i + 1) << 20);
                t.port()
            })
        })
        .collect();
    let mut ports: Vec<u16> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 4, "ports must differ");
}

/// Boots the guest VM on a qemu-storage-daemon disk and runs a short fio write+verify.
#[test]
fn guest_vm_fio_verify_on_qemu_storage_daemon() {
    let qsd = QemuStorageDaemon::start(64 << 20, 2);
    let out = support::unique_tmp_dir();
    let sock = qsd.sock().to_str().expect("utf-8");
    let outdir = out.path().to_str().expect("utf-8");
    let run = support::vm::run_script(
        "run-guest.sh",
        &[
            "--sock",
            sock,
            "--queues",
            "2",
            "--mem",
            "512",
            "--timeout",
            "180",
            "--out",
            outdir,
            "--",
            "env",
            "SIZE=16m",
            "RT=3",
            "qemu/guest/fio-verify.sh",
            "harness",
        ],
    );
    eprintln!("guest VM + fio: wall {:.1}s", run.wall.as_secs_f64());
    assert_eq!(
        run.code,
        Some(0),
        "guest fio verify failed:\n{}\n--- qsd ---\n{}",
        run.text(),
        qsd.log()
    );
    let json = std::fs::read_to_string(out.path().join("harness/verify.json"))
        .unwrap_or_else(|e| panic!("no fio JSON in --out ({e}):\n{}", run.text()));
    assert!(json.contains("\"error\" : 0"), "{json}");
}

/// The guest's exit status comes back unchanged, and a missing socket is a usage error.
#[test]
fn guest_vm_reports_exit_status_and_rejects_bad_sockets() {
    let bad = support::vm::run_script(
        "run-guest.sh",
        &["--sock", "/nonexistent.sock", "--", "true"],
    );
    assert_eq!(bad.code, Some(2), "{}", bad.text());
    let qsd = QemuStorageDaemon::start(1 << 20, 1);
    let sock = qsd.sock().to_str().expect("utf-8");
    let run = support::vm::run_script(
        "run-guest.sh",
        &[
            "--sock",
            sock,
            "--queues",
            "1",
            "--mem",
            "256",
            "--timeout",
            "120",
            "--",
            "sh",
            "-c",
            "test -b /dev/vda && test \"$VHOST_ISER_VM\" = 1 && exit 42",
        ],
    );
    eprintln!(
        "guest VM trivial command: wall {:.1}s",
        run.wall.as_secs_f64()
    );
    assert_eq!(run.code, Some(42), "{}", run.text());
    // a hung guest is killed at --timeout and reported as 124
    let hung = support::vm::run_script(
        "run-guest.sh",
        &[
            "--sock",
            sock,
            "--queues",
            "1",
            "--timeout",
            "3",
            "--",
            "sleep",
            "600",
        ],
    );
    assert_eq!(hung.code, Some(124), "{}", hung.text());
}

/// Soft-RoCE VM: tgtd and LIO answer libiscsi over iser://.
#[test]
fn rdma_vm_selftest() {
    let run = support::vm::run_script(
        "rdma-vm.sh",
        &["--timeout", "400", "--", "qemu/rdma/selftest.sh"],
    );
    eprintln!("rdma VM selftest: wall {:.1}s", run.wall.as_secs_f64());
    assert_eq!(run.code, Some(0), "rdma selftest failed:\n{}", run.text());
    let stdout = String::from_utf8_lossy(&run.output.stdout);
    assert!(
        stdout.contains("PASS: TGT iscsi-inq") && stdout.contains("PASS: LIO iscsi-inq"),
        "{stdout}"
    );
}
