//! A guest started by real libvirtd (qemu:///system, TCG) from the example
//! domain XML (qemu/libvirt/vhost-iser-domain.xml) reads and writes its
//! `<disk type='vhostuser'>` served by vhost-iser -> tgtd over iSCSI/TCP.
//!
//! The host puts a pattern into the first MiB of tgtd's backing file; the guest
//! (qemu/libvirt/guest-initrd.sh) must read it from /dev/vda, then writes its
//! own pattern to the second MiB with O_DIRECT, reads it back and reports on
//! the serial console (a file, through virtlogd). The test then checks that the
//! guest's pattern is in tgtd's backing file.
//!
//! vhost-iser runs like qemu/systemd/vhost-iser@.service runs it: group kvm,
//! umask 0007, so the socket is srwxrwx--- root:kvm and QEMU (libvirt-qemu,
//! member of kvm) connects with libvirt's default qemu.conf.
//!
//! libvirtd and virtlogd are started by the test when none is running (this
//! container has no systemd) and stopped at the end. Needs root and
//! libvirt-daemon-system (`scripts/install-deps.sh --libvirt`); anything
//! missing is a test failure with the reason, never a skip.

mod support;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::tgtd::{Backing, Tgtd};

const MIB: usize = 1 << 20;
const LUN_BYTES: u64 = 64 << 20;
const URI: &str = "qemu:///system";
const LIBVIRT_SOCK: &str = "/run/libvirt/libvirt-sock";
const VIRTLOGD_SOCK: &str = "/run/libvirt/virtlogd-sock";
/// Boot + check, TCG on a busy 2-core host.
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// `vhost-iser-libvirt NAME TOKEN\n` repeated and cut to 1 MiB (the guest's
/// /init builds the same bytes).
fn pattern(name: &str, token: &str) -> Vec<u8> {
    let line = format!("vhost-iser-libvirt {name} {token}\n");
    line.as_bytes().iter().copied().cycle().take(MIB).collect()
}

/// Runs `virsh -c qemu:///system ARGS` (bounded by `timeout`); Ok(stdout) or Err(text).
///
/// The bound is generous: libvirt 9.0 re-probes QEMU's capabilities (a TCG
/// `qemu-system-i386` and `-x86_64` under QMP) when a domain is defined, which
/// took ~48 s per `virsh define` on a loaded 2-core machine without KVM.
fn virsh(args: &[&str]) -> Result<String, String> {
    let out = Command::new("timeout")
        .args(["-k", "5", "240", "virsh", "-c", URI])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run virsh: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "virsh {} failed ({}): {}",
            args.join(" "),
            out.status,
            support::output_text(&out)
        ))
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("({}: {e})", path.display()));
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// The libvirt daemons: reused when already running, else started here (in the
/// foreground, as children) and stopped on drop.
struct Libvirt {
    children: Vec<(&'static str, Child)>,
    logdir: tempfile::TempDir,
}

impl Libvirt {
    fn socket_alive(path: &str) -> bool {
        UnixStream::connect(path).is_ok()
    }

    fn start() -> Libvirt {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!(
                "the libvirt test needs root (qemu:///system, tgtd, vhost-user socket ownership)"
            );
        }
        let libvirtd = support::require_tool(
            "libvirtd",
            "libvirt-daemon-system (scripts/install-deps.sh --libvirt)",
        );
        let virtlogd = support::require_tool(
            "virtlogd",
            "libvirt-daemon-system (scripts/install-deps.sh --libvirt)",
        );
        support::require_tool(
            "virsh",
            "libvirt-clients (scripts/install-deps.sh --libvirt)",
        );
        let mut lv = Libvirt {
            children: Vec::new(),
            logdir: support::unique_tmp_dir(),
        };
        // virtlogd first: libvirtd hands it the domain's log and file-backed serial.
        for (name, bin, sock) in [
            ("virtlogd", &virtlogd, VIRTLOGD_SOCK),
            ("libvirtd", &libvirtd, LIBVIRT_SOCK),
        ] {
            if Self::socket_alive(sock) {
                eprintln!("libvirt test: {name} already running ({sock}), using it");
                continue;
            }
            let log = lv.logdir.path().join(format!("{name}.log"));
            let f = fs::File::create(&log).expect("daemon log file");
            let child = Command::new(bin)
                .stdin(Stdio::null())
                .stdout(f.try_clone().expect("dup"))
                .stderr(f)
                // errors and warnings of the daemon itself go to its stderr
                .env("LIBVIRT_LOG_OUTPUTS", "3:stderr")
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            lv.children.push((name, child));
            let deadline = Instant::now() + Duration::from_secs(30);
            while !Self::socket_alive(sock) {
                let (_, c) = lv.children.last_mut().expect("just pushed");
                if let Ok(Some(st)) = c.try_wait() {
                    panic!(
                        "{name} exited at start ({st}); libvirt cannot run here:\n{}",
                        tail(&log, 40)
                    );
                }
                if Instant::now() > deadline {
                    panic!(
                        "{name} did not listen on {sock} within 30 s:\n{}",
                        tail(&log, 40)
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // the daemon answers and knows QEMU
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match virsh(&["version"]) {
                Ok(v) if v.contains("QEMU") => break,
                r if Instant::now() > deadline => panic!(
                    "libvirtd does not answer on {URI}: {r:?}\nlibvirtd log:\n{}",
                    lv.log("libvirtd")
                ),
                _ => std::thread::sleep(Duration::from_millis(500)),
            }
        }
        lv
    }

    fn log(&self, name: &str) -> String {
        tail(&self.logdir.path().join(format!("{name}.log")), 40)
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        // libvirtd before virtlogd (reverse start order)
        while let Some((name, mut c)) = self.children.pop() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while !matches!(c.try_wait(), Ok(Some(_))) {
                if Instant::now() > deadline {
                    eprintln!("libvirt test: {name} ignored SIGTERM, killing it");
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// vhost-iser started as the systemd unit starts it: group kvm, umask 0007.
struct Backend {
    child: Option<Child>,
    log: PathBuf,
}

impl Backend {
    fn start(socket: &Path, log: PathBuf, url: &str) -> Backend {
        let setpriv = support::require_tool("setpriv", "util-linux");
        let f = fs::File::create(&log).expect("backend log");
        let child = Command::new(setpriv)
            .args(["--regid", "kvm", "--clear-groups", "--", "sh", "-c"])
            .arg(r#"umask 0007 && exec "$@""#)
            .arg("sh")
            .arg(env!("CARGO_BIN_EXE_vhost-iser"))
            .arg("--socket")
            .arg(socket)
            .args(["--target", url, "--queues", "2"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn setpriv vhost-iser");
        let b = Backend {
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(socket.exists() && b.log().contains("waiting for a frontend")) {
            if b.log().contains(" ERROR ") || Instant::now() > deadline {
                panic!("vhost-iser did not start; log:\n{}", b.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        b
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(40);
            while !matches!(c.try_wait(), Ok(Some(_))) {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// A defined domain: destroyed and undefined on drop.
struct Domain {
    name: String,
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        if let Err(e) = virsh(&["undefine", &self.name]) {
            eprintln!("libvirt test: {e}");
        }
    }
}

/// Replaces `from` (which must occur in the example) with `to`.
fn subst(xml: String, from: &str, to: &str) -> String {
    assert!(
        xml.contains(from),
        "qemu/libvirt/vhost-iser-domain.xml no longer contains {from:?}: update this test"
    );
    xml.replace(from, to)
}

/// Replaces the element starting at `start` up to and including `end`.
fn subst_block(xml: String, start: &str, end: &str, to: &str) -> String {
    let a = xml
        .find(start)
        .unwrap_or_else(|| panic!("example domain has no {start:?}: update this test"));
    let b = a
        + xml[a..]
            .find(end)
            .unwrap_or_else(|| panic!("example domain has no {end:?} after {start:?}"))
        + end.len();
    format!("{}{}{}", &xml[..a], to, &xml[b..])
}

/// The example domain, adapted to this host: TCG (no KVM here), direct kernel
/// boot of the check initramfs, no network (no "default" network without
/// systemd), serial console to a file, small RAM. The disk, memoryBacking and
/// reconnect parts are the example's, unchanged but for the socket path.
fn domain_xml(
    name: &str,
    sock: &Path,
    kernel: &str,
    initrd: &str,
    console: &Path,
    token: &str,
) -> String {
    let example = support::repo_root().join("qemu/libvirt/vhost-iser-domain.xml");
    let xml = fs::read_to_string(&example).expect("read qemu/libvirt/vhost-iser-domain.xml");
    let xml = subst(xml, "<domain type='kvm'>", "<domain type='qemu'>");
    let xml = subst(xml, "<name>vm1</name>", &format!("<name>{name}</name>"));
    let xml = subst(
        xml,
        "<memory unit='MiB'>1024</memory>",
        "<memory unit='MiB'>256</memory>",
    );
    let xml = subst(
        xml,
        "<currentMemory unit='MiB'>1024</currentMemory>",
        "<currentMemory unit='MiB'>256</currentMemory>",
    );
    let xml = subst(
        xml,
        "<boot dev='hd'/>",
        &format!(
            "<kernel>{kernel}</kernel><initrd>{initrd}</initrd>\
             <cmdline>console=ttyS0 panic=-1 quiet loglevel=1 mitigations=off vi_token={token}</cmdline>"
        ),
    );
    let xml = subst(
        xml,
        "<vcpu placement='static'>2</vcpu>",
        "<vcpu placement='static'>1</vcpu>",
    );
    let xml = subst(xml, "<cpu mode='host-passthrough'/>", "");
    let xml = subst(
        xml,
        "<on_reboot>restart</on_reboot>",
        "<on_reboot>destroy</on_reboot>",
    );
    let xml = subst(
        xml,
        "/run/vhost-iser/vm1.sock",
        sock.to_str().expect("utf-8 socket path"),
    );
    let xml = subst_block(xml, "<interface type='network'>", "</interface>", "");
    subst_block(
        xml,
        "<serial type='pty'>",
        "</console>",
        &format!(
            "<serial type='file'><source path='{}'/><target port='0'/></serial>",
            console.display()
        ),
    )
}

fn read_range(file: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut f = fs::File::open(file).expect("open backing file");
    f.seek(SeekFrom::Start(off)).expect("seek");
    let mut v = vec![0u8; len];
    f.read_exact(&mut v).expect("read backing file");
    v
}

#[test]
fn libvirt_guest_reads_and_writes_its_vhost_iser_disk() {
    let t0 = Instant::now();
    let libvirt = Libvirt::start();
    eprintln!(
        "libvirt test: daemons up after {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    // tgtd LUN with the host's pattern in MiB 0
    let token = format!(
        "{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let mut tgt = Tgtd::start();
    let tid = tgt.create_target("iqn.2026-11.vhost-iser.test:libvirt");
    let backing = tgt
        .add_lun(tid, 1, Backing::File(LUN_BYTES))
        .expect("file LUN");
    tgt.bind_all(tid);
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(&backing)
            .expect("open backing");
        f.write_all(&pattern("host", &token))
            .expect("write host pattern");
        f.sync_all().expect("fsync backing");
    }

    // a directory QEMU (libvirt-qemu, group kvm) can traverse, like
    // RuntimeDirectory=vhost-iser with RuntimeDirectoryMode=0750 + Group=kvm
    let dir = support::unique_tmp_dir();
    let kvm_gid = Command::new("getent")
        .args(["group", "kvm"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.split(':')
                .nth(2)
                .and_then(|g| g.trim().parse::<u32>().ok())
        })
        .expect("group kvm does not exist (Debian's qemu/libvirt packages create it)");
    std::os::unix::fs::chown(dir.path(), Some(0), Some(kvm_gid)).expect("chown test dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o750)).expect("chmod test dir");

    let out = Command::new("bash")
        .arg(support::repo_root().join("qemu/libvirt/guest-initrd.sh"))
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("run qemu/libvirt/guest-initrd.sh");
    assert!(
        out.status.success(),
        "guest-initrd.sh failed:\n{}",
        support::output_text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let get = |k: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| panic!("guest-initrd.sh printed no {k}:\n{stdout}"))
            .to_string()
    };
    let (kernel, initrd) = (get("KERNEL="), get("INITRD="));

    let sock = dir.path().join("vm.sock");
    let backend = Backend::start(&sock, dir.path().join("backend.log"), &tgt.url(tid, 1));
    let mode = fs::metadata(&sock).expect("socket metadata");
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(mode.gid(), kvm_gid, "socket is not in group kvm");
        assert_eq!(
            mode.mode() & 0o777,
            0o770,
            "socket mode is not 0770 (umask 0007)"
        );
    }

    let name = format!("vhost-iser-test-{token}");
    let console = dir.path().join("console.log");
    let xml = domain_xml(&name, &sock, &kernel, &initrd, &console, &token);
    let xml_path = dir.path().join("domain.xml");
    fs::write(&xml_path, &xml).expect("write domain xml");
    virsh(&["define", xml_path.to_str().expect("utf-8")])
        .unwrap_or_else(|e| panic!("{e}\nXML:\n{xml}"));
    let domain = Domain { name: name.clone() };
    let qemu_log = PathBuf::from(format!("/var/log/libvirt/qemu/{name}.log"));

    let diag = |what: &str| -> String {
        format!(
            "{what}\n--- console ({}) ---\n{}\n--- {} ---\n{}\n--- vhost-iser ---\n{}\n--- libvirtd ---\n{}\n--- tgtd ---\n{}",
            console.display(),
            tail(&console, 40),
            qemu_log.display(),
            tail(&qemu_log, 40),
            backend.log(),
            libvirt.log("libvirtd"),
            tgt.log_text()
        )
    };

    let t_start = Instant::now();
    if let Err(e) = virsh(&["start", &name]) {
        panic!("{}", diag(&format!("virsh start failed: {e}")));
    }
    eprintln!("libvirt test: domain {name} started");
    // QEMU must run unprivileged (Debian: libvirt-qemu): the socket's group
    // kvm + mode 0770 is what lets it connect, not root
    let pidfile = format!("/run/libvirt/qemu/{name}.pid");
    let qemu_uid = fs::read_to_string(&pidfile)
        .ok()
        .and_then(|p| fs::read_to_string(format!("/proc/{}/status", p.trim())).ok())
        .and_then(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| {
                    u.split_whitespace()
                        .nth(1)
                        .and_then(|e| e.parse::<u32>().ok())
                })
        });
    match qemu_uid {
        Some(0) => panic!("{}", diag("QEMU runs as root: qemu.conf has user = \"root\"; this test checks the unprivileged setup")),
        Some(uid) => eprintln!("libvirt test: QEMU runs as uid {uid}"),
        // the guest may already have finished (fast host): the result still counts
        None => eprintln!("libvirt test: QEMU already gone, uid not checked ({pidfile})"),
    }
    let result = loop {
        let text = fs::read_to_string(&console).unwrap_or_default();
        if let Some(r) = text.lines().find_map(|l| {
            l.trim_end_matches('\r')
                .strip_prefix("VHOST-ISER-LIBVIRT-RESULT=")
        }) {
            break r.to_string();
        }
        let state = virsh(&["domstate", &name]).unwrap_or_default();
        if state.trim() == "shut off" {
            // the last lines may land just after the domain stops
            std::thread::sleep(Duration::from_millis(500));
            let text = fs::read_to_string(&console).unwrap_or_default();
            if let Some(r) = text.lines().find_map(|l| {
                l.trim_end_matches('\r')
                    .strip_prefix("VHOST-ISER-LIBVIRT-RESULT=")
            }) {
                break r.to_string();
            }
            panic!("{}", diag("the domain stopped without reporting a result"));
        }
        if t_start.elapsed() > GUEST_TIMEOUT {
            panic!(
                "{}",
                diag(&format!(
                    "no result from the guest within {GUEST_TIMEOUT:?}"
                ))
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let guest_wall = t_start.elapsed();
    assert_eq!(
        result.trim(),
        "OK",
        "{}",
        diag("the guest's disk check failed")
    );
    let text = fs::read_to_string(&console).unwrap_or_default();
    let size = text
        .lines()
        .find_map(|l| {
            l.trim_end_matches('\r')
                .strip_prefix("VHOST-ISER-LIBVIRT-SIZE=")
        })
        .and_then(|s| s.trim().parse::<u64>().ok());
    assert_eq!(
        size,
        Some(LUN_BYTES),
        "{}",
        diag("/dev/vda is not the LUN's size")
    );

    // the guest's write reached tgtd's file; the host's pattern is untouched
    let guest_bytes = read_range(&backing, MIB as u64, MIB);
    assert!(
        guest_bytes == pattern("guest", &token),
        "{}",
        diag(&format!(
            "tgtd's backing file does not hold the guest's pattern at MiB 1 (starts {:?})",
            String::from_utf8_lossy(&guest_bytes[..60])
        ))
    );
    assert!(
        read_range(&backing, 0, MIB) == pattern("host", &token),
        "MiB 0 changed"
    );

    drop(domain);
    let _ = fs::remove_file(&qemu_log); // kept only when the test fails
    drop(backend);
    drop(tgt);
    drop(libvirt);
    eprintln!(
        "libvirt test: PASS; guest start->result {:.1}s, test wall {:.1}s",
        guest_wall.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
