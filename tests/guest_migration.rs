//! Real QEMU (7.2, TCG) guests whose disk is vhost-iser -> tgtd (iSCSI/TCP):
//!
//! - `live_migration_keeps_the_disk_consistent`: a guest runs fio loops
//!   (16 KiB random writes with a crc32c header per block, then reads of all
//!   of them with verification) while it is live-migrated over QMP from a
//!   QEMU on backend A to a QEMU started with `-incoming` on backend B (a
//!   second vhost-iser process, its own initiator name, the same LUN). The
//!   bandwidth is capped so the migration takes several seconds and fio's
//!   reads land in guest memory (readv into guest buffers, behind QEMU's
//!   back) while pages are being copied; those pages reach the destination
//!   only through vhost-iser's dirty log. fio must finish on the destination
//!   with every block verified.
//!
//!   Once the migration has completed, both QEMUs are paused (the
//!   destination is started with `-S`): the test dumps their guest RAM with
//!   QMP `pmemsave` and requires the two to be identical, page for page,
//!   before it lets the destination run.
//!
//!   How we know this test can fail: with VHOST_F_LOG_ALL not offered,
//!   QEMU refuses the `migrate` command ("Migration disabled: vhost lacks
//!   VHOST_F_LOG_ALL feature"), which fails the test at the migrate step.
//!   The tgtd freeze at the switch-over makes reads in flight at the stop
//!   certain: the backend then logs "stopped the ring with 16 requests in
//!   flight", which the test requires.
//!
//!   Why it is `#[ignore]`d: under TCG on this host, QEMU's live migration
//!   itself loses guest-CPU writes. The RAM check finds differing pages in
//!   about 1 run in 3 (4 of 11 with vhost-iser; 1 of 5 in the control
//!   below), and in about 1 run in 5 the destination guest oopses right
//!   after the switch-over (NULL function pointers, list corruption in
//!   timers and RCU). The pages that differ hold kernel data, counters and
//!   list pointers, which only the guest CPU writes, and the control, with
//!   no vhost-user device at all, loses them too (and oopsed): the losses
//!   are TCG's own dirty tracking. They hide whatever the back-end's dirty
//!   log might miss, so this test cannot vouch for it here (the unit tests
//!   and vhost_user_hostile check the pages it marks). Two back-end bugs
//!   found by reading the code on the way are fixed: a SET_VRING_ADDR on a
//!   running ring could lose a completion (vendored vhost-user-backend,
//!   PATCHED.md item 4), and a fresh inflight region rewound the ring to the
//!   used index. Run it with `--ignored` where KVM exists.
//!
//!   `VI_MIGRATION_CONTROL=qemu-iscsi` runs the same test with QEMU's own
//!   virtio-blk on its libiscsi driver instead of vhost-iser (the control).
//!   `VI_TCG_THREAD=single` runs the guest CPU single-threaded (`-accel
//!   tcg,thread=single`), which rules out races between multi-threaded TCG
//!   and the migration thread: the RAM still differed in 1 of 5 runs
//!   (10 pages of kernel data, 2026-12-07), so that is not the cause.
//!
//!   Libvirt cannot do this on one host (it refuses to migrate to the same
//!   host), so the test drives two QEMU processes over QMP itself.
//!
//! - `qemu_killed_and_restarted_on_a_running_backend`: a guest writes and
//!   verifies 16 MiB, then keeps reading; QEMU is killed with SIGKILL; a new
//!   QEMU on the same backend socket (which kept running) verifies the data
//!   with fio's verify_only. The backend must log the disconnect as a clean
//!   one and serve the second QEMU.
//!
//! The guests boot `qemu/guest/fio-initrd.sh`'s kernel and initramfs: fio in
//! the initramfs and no 9p share (QEMU refuses to migrate a guest with a
//! mounted 9p share, which `run-guest.sh`'s guests have).

mod client;
mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use client::Backend;
use support::tgtd::{Backing, Tgtd};
use vhost_iser::metrics::{self, MetricsAddr};

/// Guest RAM: room for the initramfs (fio and its ~80 MiB of libraries).
const GUEST_MIB: u32 = 384;

/// Kernel and initramfs for the guests.
struct GuestImage {
    kernel: PathBuf,
    initrd: PathBuf,
}

fn guest_image(dir: &Path) -> GuestImage {
    let script = support::repo_root().join("qemu/guest/fio-initrd.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(dir)
        .output()
        .expect("run qemu/guest/fio-initrd.sh");
    assert!(
        out.status.success(),
        "fio-initrd.sh failed:\n{}",
        support::output_text(&out)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("fio-initrd.sh printed no {key}:\n{text}"))
    };
    GuestImage {
        kernel: value("KERNEL="),
        initrd: value("INITRD="),
    }
}

/// QEMU arguments for a disk served by the vhost-user back-end at `socket`.
fn vhost_user_disk(socket: &Path) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id=disk0,path={},reconnect=1", socket.display()),
        "-device".into(),
        "vhost-user-blk-pci,chardev=disk0,num-queues=1".into(),
    ]
}

/// QEMU arguments for the control: QEMU's own virtio-blk on its libiscsi
/// driver, no vhost-user device at all.
fn qemu_iscsi_disk(url: &str, initiator: &str) -> Vec<String> {
    vec![
        "-iscsi".into(),
        format!("initiator-name={initiator}"),
        "-drive".into(),
        format!("file={url},if=none,id=d0,format=raw,cache=none"),
        "-device".into(),
        "virtio-blk-pci,drive=d0,num-queues=1".into(),
    ]
}

/// Guest RAM pages (4 KiB) that differ between two `pmemsave` dumps, as
/// "address (bytes that differ)".
fn differing_pages(a: &[u8], b: &[u8]) -> Vec<String> {
    a.chunks(4096)
        .zip(b.chunks(4096))
        .enumerate()
        .filter(|(_, (pa, pb))| pa != pb)
        .map(|(i, (pa, pb))| {
            let n = pa.iter().zip(pb.iter()).filter(|(x, y)| x != y).count();
            format!("{:#x} ({n} B)", i * 4096)
        })
        .collect()
}

/// The TCG accelerator option: `tcg`, or `tcg,thread=single` with
/// `VI_TCG_THREAD=single` (one thread runs the guest CPU and the migration
/// under one lock; multi-threaded TCG is the suspect in the lost writes
/// described in the module docs).
fn tcg_accel() -> String {
    match std::env::var("VI_TCG_THREAD") {
        Ok(t) if t == "single" || t == "multi" => format!("tcg,thread={t}"),
        _ => "tcg".to_string(),
    }
}

/// One QEMU process: console in a file, QMP on a unix socket; killed on drop.
struct Qemu {
    child: Child,
    console: PathBuf,
    qmp: PathBuf,
    stderr: PathBuf,
}

impl Qemu {
    /// Starts a guest on the vhost-user socket `disk` running `mode`.
    fn start(
        name: &str,
        dir: &Path,
        image: &GuestImage,
        disk: &[String],
        append: &str,
        extra: &[&str],
    ) -> Qemu {
        let qemu = support::require_tool("qemu-system-x86_64", "qemu-system-x86");
        let console = dir.join(format!("{name}.console"));
        let qmp = dir.join(format!("{name}.qmp"));
        let stderr = dir.join(format!("{name}.stderr"));
        let mem = format!("{GUEST_MIB}M");
        let child = Command::new(qemu)
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-no-reboot")
            .args(["-accel", &tcg_accel()])
            .args(["-cpu", "max", "-smp", "1"])
            .arg("-object")
            .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
            .args(["-machine", "q35,memory-backend=mem", "-m", &mem])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .arg("-append")
            .arg(format!("console=ttyS0 panic=-1 quiet {append}"))
            .arg("-chardev")
            .arg(format!("file,id=ser0,path={}", console.display()))
            .args(["-serial", "chardev:ser0"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(disk)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("qemu stderr file"))
            .spawn()
            .expect("spawn qemu-system-x86_64");
        Qemu {
            child,
            console,
            qmp,
            stderr,
        }
    }

    fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    fn describe(&self, name: &str) -> String {
        format!(
            "--- {name} console ---\n{}\n--- {name} stderr ---\n{}",
            self.console_text(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Waits until the console shows `marker`; an error after `timeout` or if QEMU exits.
    fn wait_console(&mut self, marker: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console_text().contains(marker) {
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!("QEMU exited ({st}) before '{marker}'"));
            }
            if Instant::now() >= deadline {
                return Err(format!("no '{marker}' within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for QEMU to exit by itself (guest power-off).
    fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    fn connect_qmp(&self) -> Qmp {
        Qmp::connect(&self.qmp)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal QMP client: one command at a time, events skipped.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot connect to QMP at {}: {e}",
                        path.display()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let greeting = q.line();
        assert!(greeting.contains("\"QMP\""), "QMP greeting: {greeting}");
        let r = q.execute(r#"{"execute": "qmp_capabilities"}"#);
        assert!(r.contains("\"return\""), "qmp_capabilities: {r}");
        q
    }

    fn line(&mut self) -> String {
        let mut s = String::new();
        self.reader.read_line(&mut s).expect("QMP read");
        s
    }

    /// Sends one command; returns its answer line (`return` or `error`).
    fn execute(&mut self, cmd: &str) -> String {
        self.writer
            .write_all(format!("{cmd}\n").as_bytes())
            .unwrap_or_else(|e| panic!("QMP write of {cmd}: {e}"));
        loop {
            let l = self.line();
            assert!(
                !l.is_empty(),
                "QMP closed while waiting for the answer to {cmd}"
            );
            if l.contains("\"return\"") || l.contains("\"error\"") {
                return l;
            }
        }
    }
}

/// The number in `"key": N` of a QMP answer.
fn json_number(text: &str, key: &str) -> Option<u64> {
    let at = text.find(&format!("\"{key}\": "))? + key.len() + 4;
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Bytes the backend read from the target into guest memory, from its metrics.
fn read_bytes(metrics_sock: &Path) -> f64 {
    let text = metrics::fetch(&MetricsAddr::Unix(metrics_sock.to_path_buf())).expect("metrics");
    metrics::parse(&text)
        .iter()
        .filter(|s| s.name == "vhost_iser_bytes_total" && s.label("dir") == Some("read"))
        .map(|s| s.value)
        .sum()
}

/// Requests backend A has handed to the target and not completed yet.
fn in_flight(metrics_sock: &Path) -> f64 {
    let text = metrics::fetch(&MetricsAddr::Unix(metrics_sock.to_path_buf())).expect("metrics");
    metrics::parse(&text)
        .iter()
        .filter(|s| s.name == "vhost_iser_in_flight")
        .map(|s| s.value)
        .sum()
}

fn start_backend(dir: &Path, name: &str, url: &str, initiator: &str) -> Backend {
    let socket = dir.join(format!("{name}.sock"));
    let metrics = format!("unix:{}", dir.join(format!("{name}.metrics")).display());
    Backend::start_at(
        tempfile::tempdir().unwrap(),
        socket,
        &[
            "--target",
            url,
            "--initiator-name",
            initiator,
            "--metrics",
            &metrics,
        ],
    )
}

fn lun() -> (Tgtd, String) {
    let mut t = Tgtd::start();
    let tid = t.create_target("iqn.2026-11.vhost-iser.test:migration");
    t.add_lun(tid, 1, Backing::File(64 << 20))
        .expect("file LUN");
    t.bind_all(tid);
    let url = t.url(tid, 1);
    (t, url)
}

#[test]
#[ignore = "TCG migration on this host loses guest-CPU writes in ~1 run in 5 (also with no vhost-user device: see the module docs); run with --ignored, reliable only with KVM"]
fn live_migration_keeps_the_disk_consistent() {
    let started = Instant::now();
    let (tgtd, url) = lun();
    let dir = support::unique_tmp_dir();
    let image = guest_image(dir.path());
    let src_backend = start_backend(dir.path(), "a", &url, "iqn.2026-11.vhost-iser.test:src");
    let dst_backend = start_backend(dir.path(), "b", &url, "iqn.2026-11.vhost-iser.test:dst");
    let migsock = dir.path().join("migrate.sock");
    let append = "vi_mode=migrate vi_secs=25";
    // VI_MIGRATION_CONTROL=qemu-iscsi runs the same migration with QEMU's own
    // virtio-blk on its libiscsi driver (no vhost-user device): the control
    // that tells TCG's losses from the back-end's. The back-end checks are
    // skipped then.
    let control = std::env::var("VI_MIGRATION_CONTROL").is_ok_and(|v| v == "qemu-iscsi");
    let (src_disk, dst_disk) = if control {
        (
            qemu_iscsi_disk(&url, "iqn.2026-11.vhost-iser.test:qemu-src"),
            qemu_iscsi_disk(&url, "iqn.2026-11.vhost-iser.test:qemu-dst"),
        )
    } else {
        (
            vhost_user_disk(&src_backend.socket),
            vhost_user_disk(&dst_backend.socket),
        )
    };

    let mut src = Qemu::start("src", dir.path(), &image, &src_disk, append, &[]);
    let incoming = format!("unix:{}", migsock.display());
    // -S: the destination stays paused after the migration, so its RAM can
    // be compared with the paused source's before it runs.
    let mut dst = Qemu::start(
        "dst",
        dir.path(),
        &image,
        &dst_disk,
        append,
        &["-incoming", &incoming, "-S"],
    );
    let context = |src: &Qemu, dst: &Qemu| {
        format!(
            "{}\n{}\n--- backend A ---\n{}\n--- backend B ---\n{}\n--- tgtd ---\n{}",
            src.describe("source"),
            dst.describe("destination"),
            src_backend.log(),
            dst_backend.log(),
            tgtd.log_text()
        )
    };

    src.wait_console("VI-FIO-START", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}:\n{}", context(&src, &dst)));
    // Let the first loop get into its writes and reads.
    std::thread::sleep(Duration::from_secs(2));
    let mut qmp = src.connect_qmp();
    let mut dst_qmp = dst.connect_qmp();
    let r = dst_qmp.execute(r#"{"execute": "query-status"}"#);
    assert!(r.contains("inmigrate"), "destination not waiting: {r}");
    // 16 MiB/s: the first pass over the ~190 MiB QEMU sends takes 10 s or more.
    let r = qmp.execute(
        r#"{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 16777216}}"#,
    );
    assert!(r.contains("\"return\""), "migrate-set-parameters: {r}");
    let a_metrics = dir.path().join("a.metrics");
    let read_before = if control { 0.0 } else { read_bytes(&a_metrics) };
    let mig_start = Instant::now();
    let r = qmp.execute(&format!(
        r#"{{"execute": "migrate", "arguments": {{"uri": "{incoming}"}}}}"#
    ));
    assert!(
        r.contains("\"return\""),
        "QEMU refused to migrate: {r}\n{}",
        context(&src, &dst)
    );
    // Poll until done. Once the guest is in a read-only phase, 2 s or more
    // after the start (before the first pass over RAM is through): freeze tgtd, lift the
    // cap, and thaw tgtd 3 s later. The guest's reads then pile up in
    // backend A, the migration converges (the guest waits, it dirties
    // little) and QEMU stops the device with them in flight: GET_VRING_BASE
    // must wait for them, and their data must still reach the destination.
    let mut thaw: Option<std::thread::JoinHandle<()>> = None;
    let tgtd_pid = tgtd.pid() as i32;
    let answer = loop {
        std::thread::sleep(Duration::from_millis(50));
        let r = qmp.execute(r#"{"execute": "query-migrate"}"#);
        if r.contains("\"status\": \"completed\"") {
            break r;
        }
        assert!(
            !r.contains("\"status\": \"failed\"") && !r.contains("\"status\": \"cancelled\""),
            "migration failed: {r}\n{}",
            context(&src, &dst)
        );
        // In a read-only phase: the guest's last marker is "VI-READS n".
        let in_reads = src
            .console_text()
            .lines()
            .rev()
            .find(|l| l.starts_with("VI-"))
            .is_some_and(|l| l.starts_with("VI-READS"));
        if thaw.is_none() && in_reads && mig_start.elapsed() > Duration::from_secs(2) {
            // SAFETY: kill(2) on our own tgtd child.
            unsafe { libc::kill(tgtd_pid, libc::SIGSTOP) };
            // fio may be between two runs: wait until its reads are stuck
            // in backend A, so the switch-over cannot find it idle.
            let deadline = Instant::now() + Duration::from_secs(20);
            if control {
                std::thread::sleep(Duration::from_secs(1));
            }
            while !control && in_flight(&a_metrics) < 1.0 {
                assert!(
                    Instant::now() < deadline,
                    "the guest's I/O did not pile up behind the frozen tgtd:\n{}",
                    context(&src, &dst)
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let r = qmp.execute(
                r#"{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 1073741824}}"#,
            );
            assert!(r.contains("\"return\""), "migrate-set-parameters: {r}");
            thaw = Some(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(3));
                // SAFETY: as above.
                unsafe { libc::kill(tgtd_pid, libc::SIGCONT) };
            }));
        }
        assert!(
            mig_start.elapsed() < Duration::from_secs(90),
            "migration did not complete in 90 s: {r}\n{}",
            context(&src, &dst)
        );
    };
    if let Some(t) = thaw {
        t.join().unwrap();
    }
    let mig_wall = mig_start.elapsed();
    let read_during = if control {
        0.0
    } else {
        read_bytes(&a_metrics) - read_before
    };
    let total_ms = json_number(&answer, "total-time").unwrap_or(0);
    let downtime_ms = json_number(&answer, "downtime").unwrap_or(0);
    let transferred = json_number(&answer, "transferred").unwrap_or(0);
    eprintln!(
        "migration completed: {:.1} s wall (QEMU: total {total_ms} ms, downtime {downtime_ms} ms, \
         {} MiB sent); the guest read {:.1} MiB through backend A meanwhile",
        mig_wall.as_secs_f64(),
        transferred >> 20,
        read_during / f64::from(1 << 20)
    );
    // Both sides are paused now: their guest RAM must be identical. The
    // source's last device writes (the reads completed while GET_VRING_BASE
    // waited) reach the destination only through the dirty log.
    let size = u64::from(GUEST_MIB) << 20;
    let pmemsave = |q: &mut Qmp, file: &Path| {
        let r = q.execute(&format!(
            r#"{{"execute": "pmemsave", "arguments": {{"val": 0, "size": {size}, "filename": "{}"}}}}"#,
            file.display()
        ));
        assert!(r.contains("\"return\""), "pmemsave: {r}");
        std::fs::read(file).expect("read the RAM dump")
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = dst_qmp.execute(r#"{"execute": "query-status"}"#);
        if r.contains("\"paused\"") || r.contains("\"prelaunch\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "destination not paused after the migration: {r}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let differing = {
        let a = pmemsave(&mut qmp, &dir.path().join("src.ram"));
        let b = pmemsave(&mut dst_qmp, &dir.path().join("dst.ram"));
        differing_pages(&a, &b)
    };
    let _ = std::fs::remove_file(dir.path().join("src.ram"));
    let _ = std::fs::remove_file(dir.path().join("dst.ram"));
    eprintln!(
        "guest RAM after the migration: {} of {} pages differ between source and destination",
        differing.len(),
        size / 4096
    );
    let r = dst_qmp.execute(r#"{"execute": "cont"}"#);
    assert!(r.contains("\"return\""), "cont on the destination: {r}");
    let src_console = src.console_text();
    let r = qmp.execute(r#"{"execute": "query-status"}"#);
    assert!(r.contains("postmigrate"), "source after migration: {r}");
    // QEMU may close the socket before its answer is read: not checked.
    let _ = qmp.writer.write_all(b"{\"execute\": \"quit\"}\n");

    // The guest goes on on the destination and finishes its fio loops.
    assert!(
        dst.wait_exit(Duration::from_secs(150)),
        "destination guest did not finish:\n{}",
        context(&src, &dst)
    );
    let dst_console = dst.console_text();
    let ctx = context(&src, &dst);
    assert!(
        differing.is_empty(),
        "guest RAM differs between the paused source and destination in {} pages \
         (first: {:?}); the destination then said:\n{ctx}",
        differing.len(),
        &differing[..differing.len().min(20)]
    );
    assert!(
        dst_console.contains("VI-RESULT=OK"),
        "fio on the destination failed:\n{ctx}"
    );
    // fio was busy when the switch-over came: the loop running on the
    // source finished on the destination (some loops on each side).
    let loops = |text: &str| text.lines().filter(|l| l.starts_with("VI-LOOP")).count();
    let (before, after) = (loops(&src_console), loops(&dst_console));
    eprintln!("fio loops (write 16 MiB + verify 16 MiB): {before} finished on the source, {after} on the destination");
    assert!(
        after >= 1,
        "no fio loop finished on the destination:\n{ctx}"
    );
    if control {
        return;
    }
    assert!(
        read_during > 0.0,
        "the guest read nothing during the migration: the test proves nothing:\n{ctx}"
    );
    let log_a = src_backend.log();
    assert!(
        log_a.contains("dirty page logging started"),
        "backend A never got a dirty log:\n{log_a}"
    );
    assert!(
        log_a.contains("the frontend stopped the ring with"),
        "QEMU stopped the device with no request in flight in backend A (tgtd was frozen): \
         the wait in GET_VRING_BASE was not exercised:\n{ctx}"
    );
    for l in log_a.lines().filter(|l| {
        l.contains("stopped the ring")
            || l.contains("dirty page logging")
            || l.contains("dirty log")
    }) {
        eprintln!("backend A: {l}");
    }
    for bad in [
        "bad request",
        "cannot add descriptor",
        "unknown tag",
        " ERROR ",
        // backend B found requests backend A took and never completed
        "have no completion in the used ring",
    ] {
        assert!(!log_a.contains(bad), "backend A logged '{bad}':\n{ctx}");
        assert!(
            !dst_backend.log().contains(bad),
            "backend B logged '{bad}':\n{ctx}"
        );
    }
    eprintln!(
        "live migration test: wall {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn qemu_killed_and_restarted_on_a_running_backend() {
    let started = Instant::now();
    let (tgtd, url) = lun();
    let dir = support::unique_tmp_dir();
    let image = guest_image(dir.path());
    let mut backend = start_backend(dir.path(), "r", &url, "iqn.2026-11.vhost-iser.test:restart");

    let mut first = Qemu::start(
        "first",
        dir.path(),
        &image,
        &vhost_user_disk(&backend.socket),
        "vi_mode=write",
        &[],
    );
    first
        .wait_console("VI-WRITTEN", Duration::from_secs(150))
        .unwrap_or_else(|e| {
            panic!(
                "{e}:\n{}\n--- backend ---\n{}\n--- tgtd ---\n{}",
                first.describe("first"),
                backend.log(),
                tgtd.log_text()
            )
        });
    // Reads are under way: kill QEMU in the middle of them.
    std::thread::sleep(Duration::from_secs(1));
    first.child.kill().expect("SIGKILL qemu");
    let st = first.child.wait().unwrap();
    eprintln!("killed the first QEMU ({st})");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !backend.log().contains("frontend disconnected") {
        assert!(
            Instant::now() < deadline,
            "backend did not notice the frontend going away:\n{}",
            backend.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = backend.log();
    assert!(
        log.contains("frontend disconnected (socket closed)"),
        "not a clean disconnect:\n{log}"
    );
    assert!(
        backend
            .child
            .as_mut()
            .unwrap()
            .try_wait()
            .unwrap()
            .is_none(),
        "backend exited:\n{log}"
    );

    let mut second = Qemu::start(
        "second",
        dir.path(),
        &image,
        &vhost_user_disk(&backend.socket),
        "vi_mode=verify",
        &[],
    );
    let ok = second.wait_exit(Duration::from_secs(150));
    let ctx = format!(
        "{}\n--- backend ---\n{}\n--- tgtd ---\n{}",
        second.describe("second"),
        backend.log(),
        tgtd.log_text()
    );
    assert!(ok, "the second guest did not finish:\n{ctx}");
    assert!(
        second.console_text().contains("VI-RESULT=OK"),
        "the second guest did not read back what the first wrote:\n{ctx}"
    );
    let log = backend.log();
    let served = log.matches("waiting for a frontend").count();
    assert!(
        served >= 3,
        "backend did not serve a second frontend:\n{log}"
    );
    for bad in [
        "bad request",
        "cannot add descriptor",
        "unknown tag",
        " ERROR ",
    ] {
        assert!(!log.contains(bad), "backend logged '{bad}':\n{ctx}");
    }
    let st = backend.stop();
    assert!(st.success(), "backend exit after SIGTERM: {st}\n{log}");
    eprintln!(
        "QEMU restart test: wall {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
