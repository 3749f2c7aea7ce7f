//! End-to-end tests of the load generator against qemu-storage-daemon, an independent
//! vhost-user-blk backend. Skipped (with a message) when qemu-storage-daemon is not installed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LOADGEN: &str = env!("CARGO_BIN_EXE_vhost-iser-loadgen");

/// A qemu-storage-daemon serving one vhost-user-blk export; killed on drop.
struct Qsd {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Qsd {
    /// Starts qsd with the given --blockdev (node-name must be `n0`), or None if qsd is missing.
    fn start(blockdev: &str, dir: tempfile::TempDir) -> Option<Qsd> {
        let sock = dir.path().join("vub.sock");
        let export = format!(
            "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={},writable=on,num-queues=4",
            sock.display()
        );
        let child = match Command::new("qemu-storage-daemon")
            .args(["--blockdev", blockdev, "--export", &export])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skipping: cannot run qemu-storage-daemon: {e}");
                return None;
            }
        };
        let mut q = Qsd {
            child,
            sock,
            _dir: dir,
        };
        let t0 = Instant::now();
        while !q.sock.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "qemu-storage-daemon did not create its socket"
            );
            assert!(
                q.child.try_wait().ok().flatten().is_none(),
                "qemu-storage-daemon exited"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(q)
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn loadgen(sock: &Path, args: &[&str]) -> (i32, serde_json::Value) {
    let out = Command::new(LOADGEN)
        .arg("--socket")
        .arg(sock)
        .arg("--json")
        .args(args)
        .output()
        .expect("run loadgen");
    let code = out.status.code().unwrap_or(-1);
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "loadgen printed no JSON ({e}); rc={code} stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, json)
}

#[test]
fn verify_passes_on_a_real_disk_for_every_pattern() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let bd = format!("driver=file,node-name=n0,filename={}", img.display());
    let Some(q) = Qsd::start(&bd, dir) else {
        return;
    };
    for rw in ["randwrite", "randrw", "write", "read", "randread"] {
        let (code, j) = loadgen(
            &q.sock,
            &[
                "--rw",
                rw,
                "--queues",
                "2",
                "--iodepth",
                "8",
                "--ios",
                "3000",
                "--verify",
            ],
        );
        assert_eq!(code, 0, "{rw}: {j}");
        assert_eq!(j["ios"], 3000, "{rw}");
        assert_eq!(j["errors"], 0, "{rw}");
        assert_eq!(j["verify"]["mismatches"], 0, "{rw}");
        // The precondition pass covered the whole 8 MiB disk once.
        assert_eq!(j["verify"]["precondition_ios"], 2048, "{rw}");
        assert!(j["verify"]["reads_checked"].as_u64().unwrap() > 0, "{rw}");
        assert!(j["lat_us"]["p50"].as_f64().unwrap() > 0.0, "{rw}");
    }
}

#[test]
fn verify_catches_a_backend_that_drops_data() {
    // null-co with read-zeroes=off completes reads without touching the buffer and throws
    // writes away: every verified read must be reported.
    let dir = tempfile::tempdir().unwrap();
    let Some(q) = Qsd::start("driver=null-co,node-name=n0,size=4194304", dir) else {
        return;
    };
    let (code, j) = loadgen(
        &q.sock,
        &[
            "--rw",
            "randread",
            "--ios",
            "500",
            "--iodepth",
            "4",
            "--verify",
        ],
    );
    assert_eq!(code, 1, "{j}");
    assert_eq!(j["verify"]["mismatches"], j["verify"]["reads_checked"]);
    assert_eq!(
        j["verify"]["first_mismatches"][0]["found"]["kind"],
        "buffer_untouched"
    );
}

#[test]
fn runtime_mode_poll_and_multiqueue() {
    let dir = tempfile::tempdir().unwrap();
    let Some(q) = Qsd::start("driver=null-co,node-name=n0,size=1073741824", dir) else {
        return;
    };
    let (code, j) = loadgen(
        &q.sock,
        &["--queues", "4", "--iodepth", "128", "--runtime", "0.5"],
    );
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["queue_size"], 512, "QD128 needs 384 descriptors");
    let secs = j["runtime_s"].as_f64().unwrap();
    assert!((0.5..5.0).contains(&secs), "{secs}");
    assert!(j["iops"].as_f64().unwrap() > 1000.0);
    let (code, j) = loadgen(&q.sock, &["--poll", "--ios", "2000", "--iodepth", "2"]);
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["completion"], "poll");
    assert_eq!(j["ios"], 2000);
    // More queues than the backend has: a clear error, not a hang.
    let out = Command::new(LOADGEN)
        .arg("--socket")
        .arg(&q.sock)
        .args(["--queues", "5", "--ios", "10"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("offers only 4 queue"));
}
