//! Fault injection against a real peer, inside the project's VM
//! (`qemu/rdma-vm.sh`, whose kernel has `sch_netem`; the host's has not).
//!
//! `bench/lib/faults-inner.sh` puts tgtd (TCP, LUN on tmpfs) in its own
//! network namespace behind a veth pair, runs vhost-iser against it and a
//! libblkio client (`vhost-iser-loadgen --verify`, the backing file checked
//! block by block at the end), and injects each kind of fault (outages twice): netem
//! loss / delay / reordering / duplication, the link set down, `kill -9` of
//! tgtd and a restart, SIGSTOP of tgtd (NOP-Out timeout) and SIGSTOP with long
//! NOP timers (command timeout: ABORT TASK, LUN RESET, connection dropped).
//! `bench/lib/faults_report.py` sums it up per kind; this test requires, for
//! every kind: every injection done and recovered from, no client-visible
//! error (the outages stay well inside the replacement timeout), no verify
//! mismatch in reads or in the backing file, no panic, and for the outages
//! the recoveries in the backend's log. `bench/faults.sh` runs the long
//! version and writes the table to bench/RESULTS.md.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

/// Kinds and injections per kind of the short run.
const PLAN: &str = "loss20:1 delay:1 reorder:1 dup:1 link:2 kill:2 stop:2 ladder:2";

/// Builds the loadgen (the same profile as this test) and returns its path.
fn build_loadgen() -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = support::repo_root();
    let out = Command::new(&cargo)
        .args(["build", "--quiet", "-p", "vhost-iser-loadgen"])
        .current_dir(&root)
        .output()
        .expect("run cargo build -p vhost-iser-loadgen");
    assert!(
        out.status.success(),
        "cargo build -p vhost-iser-loadgen failed:\n{}",
        support::output_text(&out)
    );
    // The test binary lives in <target>/debug/deps.
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory");
    let lg = profile_dir.join("vhost-iser-loadgen");
    assert!(lg.exists(), "{} missing after the build", lg.display());
    lg.to_string_lossy().into_owned()
}

/// `FAULT kind=K key=value ...` lines of the report, by kind.
fn summary(text: &str) -> HashMap<String, HashMap<String, String>> {
    text.lines()
        .filter_map(|l| l.strip_prefix("FAULT "))
        .map(|l| {
            let kv: HashMap<String, String> = l
                .split_whitespace()
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            (kv.get("kind").cloned().unwrap_or_default(), kv)
        })
        .collect()
}

fn num(kv: &HashMap<String, String>, key: &str) -> f64 {
    kv.get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {key} in {kv:?}"))
}

#[test]
fn faults_in_vm() {
    support::require_tool("tgtd", "tgt");
    support::require_tool("qemu-system-x86_64", "qemu-system-x86");
    let python = support::require_tool("python3", "python3");
    let vi = env!("CARGO_BIN_EXE_vhost-iser");
    let lg = build_loadgen();
    let out = tempfile::Builder::new()
        .prefix("faults-vm.")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let out_s = out.path().to_str().expect("utf-8 path").to_string();
    let run = support::vm::run_script(
        "rdma-vm.sh",
        &[
            "--timeout",
            "600",
            "--mem",
            "1024",
            "--rw",
            &out_s,
            "--",
            "env",
            &format!("FAULTS_OUT={out_s}"),
            &format!("FAULTS_VI={vi}"),
            &format!("FAULTS_LG={lg}"),
            &format!("FAULTS_PLAN={PLAN}"),
            "FAULTS_HOLD=3",
            "FAULTS_GAP=2",
            "FAULTS_SIZE_MB=2",
            "bench/lib/faults-inner.sh",
        ],
    );
    let text = run.text();
    println!("{text}");
    eprintln!(
        "fault-injection VM run: wall {:.1}s",
        run.wall.as_secs_f64()
    );
    assert_eq!(
        run.code,
        Some(0),
        "the fault-injection run in the VM failed"
    );

    let rep = Command::new(python)
        .arg(support::repo_root().join("bench/lib/faults_report.py"))
        .arg(&out_s)
        .env("FAULTS_GAP", "2")
        .output()
        .expect("run faults_report.py");
    let rep_text = String::from_utf8_lossy(&rep.stdout).to_string();
    println!("{rep_text}{}", String::from_utf8_lossy(&rep.stderr));
    assert!(rep.status.success(), "faults_report.py failed");
    let by_kind = summary(&rep_text);
    let log_of = |kind: &str| {
        std::fs::read_to_string(out.path().join(format!("{kind}.vi.log"))).unwrap_or_default()
    };
    for item in PLAN.split_whitespace() {
        let (kind, n) = item.split_once(':').expect("kind:count");
        let n: f64 = n.parse().expect("count");
        let kv = by_kind
            .get(kind)
            .unwrap_or_else(|| panic!("no results for {kind}:\n{rep_text}"));
        let ctx = || format!("{kind}: {kv:?}\n--- backend log ---\n{}", log_of(kind));
        assert!(!kv.contains_key("error"), "{}", ctx());
        assert_eq!(num(kv, "injected"), n, "{}", ctx());
        assert_eq!(num(kv, "recovered"), n, "I/O did not resume: {}", ctx());
        assert_eq!(num(kv, "errors"), 0.0, "client saw I/O errors: {}", ctx());
        assert_eq!(num(kv, "mismatches"), 0.0, "read verify: {}", ctx());
        assert_eq!(num(kv, "file_mismatches"), 0.0, "backing file: {}", ctx());
        assert!(
            num(kv, "file_blocks") > 0.0,
            "backing file unchecked: {}",
            ctx()
        );
        assert!(num(kv, "ios") > 0.0, "{}", ctx());
        assert_eq!(num(kv, "panics"), 0.0, "{}", ctx());
        assert_eq!(num(kv, "gave_up"), 0.0, "{}", ctx());
        match kind {
            // Every outage ends each queue's session: a reconnect per queue
            // (2 queues) and injection, the kept commands re-issued.
            "link" | "kill" | "stop" | "ladder" => {
                assert!(num(kv, "reconnects") >= 2.0 * n, "{}", ctx());
                assert!(num(kv, "reissues") >= n, "{}", ctx());
            }
            _ => {}
        }
        if kind == "stop" {
            assert!(num(kv, "nop_timeouts") >= n, "{}", ctx());
        }
        if kind == "ladder" {
            assert!(num(kv, "aborts") >= n, "no ABORT TASK: {}", ctx());
            assert!(num(kv, "lun_resets") >= n, "no LUN RESET: {}", ctx());
        }
    }
}
