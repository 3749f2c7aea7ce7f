//! A private tgtd (Linux SCSI target framework, user space) per test, iSCSI over TCP
//! on 127.0.0.1.
//!
//! Each [`Tgtd`] gets its own free TCP port and its own control port (`tgtd -C N`), so
//! tests run in parallel, also next to a system tgtd. Dropping it SIGKILLs tgtd's whole
//! process group (tgtd ignores SIGTERM) and removes its backing files (in /dev/shm).
//!
//! Facts about tgt 1.0.85 (Debian 12) this relies on:
//! - tgtd does not exit when its portal cannot be bound ("unable to bind server socket"):
//!   readiness is proven by finding the listening socket among tgtd's own fds.
//! - `--bstype null` LUNs are always 1 TiB (reads return zeros, writes are dropped).
//! - a LUN is made read-only by `--op update --mode logicalunit --params readonly=1`.

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Size in bytes of a `--bstype null` LUN (fixed by tgt).
pub const NULL_LUN_SIZE: u64 = 1 << 40;

/// How long `Tgtd::start` waits for tgtd to listen and answer tgtadm.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// What a LUN is backed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// A zero-filled file of this many bytes on tmpfs (`/dev/shm`), read-write.
    File(u64),
    /// tgt's null store: no storage, always [`NULL_LUN_SIZE`] bytes; reads return zeros.
    Null,
    /// Like `File`, but the LUN is read-only (WRITEs fail with DATA PROTECT).
    ReadOnlyFile(u64),
}

/// A running tgtd owned by one test.
pub struct Tgtd {
    child: Child,
    port: u16,
    control_port: u16,
    tgtadm: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
    targets: Vec<(u32, String)>,
    accounts: HashSet<String>,
    backing_files: Vec<PathBuf>,
    /// Every configuring tgtadm command, replayed by [`Tgtd::restart`].
    history: std::sync::Mutex<Vec<Vec<String>>>,
}

/// Unique-per-process counter mixed into port choice and file names.
static SEQ: AtomicU32 = AtomicU32::new(0);

impl Tgtd {
    /// Starts tgtd on a free 127.0.0.1 port and waits until it listens and answers tgtadm.
    /// Panics (test failure) if tgt is not installed or tgtd does not come up.
    pub fn start() -> Tgtd {
        let tgtd = super::require_tool("tgtd", "tgt");
        let tgtadm = super::require_tool("tgtadm", "tgt");
        // tgtd puts its control socket and lock there; it is not always created for us
        let _ = fs::create_dir_all("/var/run/tgtd");
        let mut last_err = String::new();
        for _attempt in 0..8 {
            let port = free_port();
            match Self::try_start(&tgtd, &tgtadm, port) {
                Ok(t) => return t,
                Err(e) => last_err = e,
            }
        }
        panic!("tgtd did not start after 8 attempts: {last_err}");
    }

    fn try_start(tgtd: &Path, tgtadm: &Path, port: u16) -> Result<Tgtd, String> {
        // The control port (tgtd accepts 0..=32767) only has to be unique among live
        // tgtds; derive it from the unique TCP port. A clash makes tgtd exit ("another
        // tgtd is using ...lock") and start() retries with another port.
        let control_port = 1000 + port % 31000;
        let portal = format!("127.0.0.1:{port}");
        Self::try_start_at(tgtd, tgtadm, &portal, None, port, control_port)
    }

    /// Starts tgtd with its portal at `portal` (port `port`), in the network
    /// namespace open at `netns` when given, and waits until it is ready.
    fn try_start_at(
        tgtd: &Path,
        tgtadm: &Path,
        portal: &str,
        netns: Option<std::os::fd::RawFd>,
        port: u16,
        control_port: u16,
    ) -> Result<Tgtd, String> {
        let dir = super::unique_tmp_dir();
        let log = dir.path().join("tgtd.log");
        let child = Self::spawn_in(tgtd, portal, netns, control_port, &log)?;
        let mut t = Tgtd {
            child,
            port,
            control_port,
            tgtadm: tgtadm.to_path_buf(),
            log,
            _dir: dir,
            targets: Vec::new(),
            accounts: HashSet::new(),
            backing_files: Vec::new(),
            history: Default::default(),
        };
        // on the Err returns below `t` is dropped: tgtd killed, files removed
        t.wait_listening()?;
        Ok(t)
    }

    fn spawn(tgtd: &Path, port: u16, control_port: u16, log: &Path) -> Result<Child, String> {
        Self::spawn_in(tgtd, &format!("127.0.0.1:{port}"), None, control_port, log)
    }

    /// Starts tgtd inside the network namespace `netns` (a name under
    /// /var/run/netns), listening on every address there (0.0.0.0:3260), so
    /// each of the namespace's links is a path (portal) to the same targets.
    /// Its portals are the namespace's addresses; [`Tgtd::portal`] and
    /// [`Tgtd::url`] (127.0.0.1) and [`Tgtd::restart`] do not apply.
    pub fn start_in_netns(netns: &str) -> Tgtd {
        let tgtd = super::require_tool("tgtd", "tgt");
        let tgtadm = super::require_tool("tgtadm", "tgt");
        let _ = fs::create_dir_all("/var/run/tgtd");
        let ns_path = format!("/var/run/netns/{netns}");
        let ns = fs::File::open(&ns_path).unwrap_or_else(|e| panic!("open {ns_path}: {e}"));
        let port = 3260;
        let portal = format!("0.0.0.0:{port}");
        let mut last_err = String::new();
        for _attempt in 0..8 {
            // Unique among live tgtds (they share /var/run/tgtd): from a free port.
            let control_port = 1000 + free_port() % 31000;
            use std::os::fd::AsRawFd;
            let fd = Some(ns.as_raw_fd());
            match Self::try_start_at(&tgtd, &tgtadm, &portal, fd, port, control_port) {
                Ok(t) => return t,
                Err(e) => last_err = e,
            }
        }
        panic!("tgtd did not start in netns {netns}: {last_err}");
    }

    /// The number of sessions (I_T nexus) tgtd holds, over all its targets.
    pub fn sessions(&self) -> usize {
        self.show()
            .lines()
            .filter(|l| l.trim_start().starts_with("I_T nexus:"))
            .count()
    }

    /// Spawns tgtd with its iSCSI portal at `portal`, in the network namespace
    /// open at `netns` when given.
    fn spawn_in(
        tgtd: &Path,
        portal: &str,
        netns: Option<std::os::fd::RawFd>,
        control_port: u16,
        log: &Path,
    ) -> Result<Child, String> {
        let logf = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("create {}: {e}", log.display()))?;
        let logf2 = logf.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(tgtd);
        cmd.args(["-f", "-C", &control_port.to_string(), "--iscsi"])
            .arg(format!("portal={portal}"))
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(logf2)
            .process_group(0);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of
        // the parent; it makes the kernel kill tgtd if the test process dies abruptly.
        // setns(2) is a plain system call on a descriptor the parent keeps open.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if let Some(fd) = netns {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd.spawn()
            .map_err(|e| format!("spawn {}: {e}", tgtd.display()))
    }

    /// Kills tgtd with SIGKILL, as a crash would; its port, backing files and
    /// configuration record stay for [`Tgtd::restart`].
    pub fn kill9(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain syscall on tgtd's own process group (see Drop).
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let sock = format!("/var/run/tgtd/socket.{}", self.control_port);
        let _ = fs::remove_file(format!("{sock}.lock"));
        let _ = fs::remove_file(sock);
    }

    /// Starts tgtd again (after [`Tgtd::kill9`], or kills it first) on the same
    /// port and replays the tgtadm commands that configured it.
    pub fn restart(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill9();
        }
        let tgtd = super::require_tool("tgtd", "tgt");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.child = Self::spawn(&tgtd, self.port, self.control_port, &self.log)
                .unwrap_or_else(|e| panic!("{e}"));
            match self.wait_listening() {
                Ok(()) => break,
                Err(e) if Instant::now() >= deadline => panic!("tgtd restart failed: {e}"),
                Err(_) => {
                    self.kill9();
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        let history = self.history.lock().unwrap().clone();
        for cmd in history {
            let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
            self.tgtadm(&args)
                .unwrap_or_else(|e| panic!("replaying tgtadm after restart: {e}"));
        }
    }

    fn wait_listening(&mut self) -> Result<(), String> {
        let t = self;
        let port = t.port;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(st)) = t.child.try_wait() {
                return Err(format!(
                    "tgtd exited ({st}) during start:\n{}",
                    t.log_text()
                ));
            }
            if t.log_text().contains("unable to bind") {
                return Err(format!("port {port} taken:\n{}", t.log_text()));
            }
            if listens(t.child.id(), port) && t.tgtadm(&["--mode", "sys", "--op", "show"]).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "tgtd not ready after {START_TIMEOUT:?}:\n{}",
                    t.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn portal(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The iSCSI TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// tgtd's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// tgtd's stdout + stderr so far (for assertion messages).
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// `iscsi://127.0.0.1:PORT/IQN/LUN` for a target made by [`Tgtd::create_target`].
    pub fn url(&self, tid: u32, lun: u32) -> String {
        format!("iscsi://{}/{}/{lun}", self.portal(), self.iqn(tid))
    }

    /// The IQN of target `tid`.
    pub fn iqn(&self, tid: u32) -> &str {
        self.targets
            .iter()
            .find(|(t, _)| *t == tid)
            .map(|(_, iqn)| iqn.as_str())
            .unwrap_or_else(|| panic!("no target with tid {tid} was created"))
    }

    /// Creates a target and returns its tid (1, 2, ...). No initiator may log in until
    /// [`Tgtd::bind_all`] or [`Tgtd::bind_initiator`].
    pub fn create_target(&mut self, iqn: &str) -> u32 {
        let tid = self.targets.iter().map(|(t, _)| *t).max().unwrap_or(0) + 1;
        self.must(&[
            "--mode",
            "target",
            "--op",
            "new",
            "--tid",
            &tid.to_string(),
            "-T",
            iqn,
        ]);
        self.targets.push((tid, iqn.to_string()));
        tid
    }

    /// Adds LUN `lun` (>= 1; LUN 0 is tgt's controller) to target `tid`. Returns the
    /// backing file for file-backed LUNs (removed when the Tgtd is dropped).
    pub fn add_lun(&mut self, tid: u32, lun: u32, backing: Backing) -> Option<PathBuf> {
        let (tid_s, lun_s) = (tid.to_string(), lun.to_string());
        let base = [
            "--mode",
            "logicalunit",
            "--op",
            "new",
            "--tid",
            &tid_s,
            "--lun",
            &lun_s,
        ];
        match backing {
            Backing::Null => {
                let mut a = base.to_vec();
                a.extend(["--bstype", "null", "--backing-store", "/dev/null"]);
                self.must(&a);
                None
            }
            Backing::File(size) | Backing::ReadOnlyFile(size) => {
                let path = PathBuf::from(format!(
                    "/dev/shm/vhost-iser-test-{}-{}-{}.img",
                    std::process::id(),
                    self.port,
                    SEQ.fetch_add(1, Ordering::Relaxed)
                ));
                let f = fs::File::create(&path)
                    .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
                f.set_len(size)
                    .unwrap_or_else(|e| panic!("cannot size {}: {e}", path.display()));
                self.backing_files.push(path.clone());
                let p = path.to_str().expect("utf-8 path");
                let mut a = base.to_vec();
                a.extend(["--bstype", "rdwr", "--backing-store", p]);
                self.must(&a);
                if matches!(backing, Backing::ReadOnlyFile(_)) {
                    self.must(&[
                        "--mode",
                        "logicalunit",
                        "--op",
                        "update",
                        "--tid",
                        &tid_s,
                        "--lun",
                        &lun_s,
                        "--params",
                        "readonly=1",
                    ]);
                }
                Some(path)
            }
        }
    }

    /// Lets any initiator address log in to `tid`.
    pub fn bind_all(&self, tid: u32) {
        self.must(&[
            "--mode",
            "target",
            "--op",
            "bind",
            "--tid",
            &tid.to_string(),
            "-I",
            "ALL",
        ]);
    }

    /// Lets initiator `iqn` log in to `tid` (an initiator-name ACL; once any name is
    /// bound, other names are refused).
    pub fn bind_initiator(&self, tid: u32, iqn: &str) {
        let t = tid.to_string();
        self.must(&[
            "--mode",
            "target",
            "--op",
            "bind",
            "--tid",
            &t,
            "--initiator-name",
            iqn,
        ]);
    }

    /// Allows (`allow`) or stops allowing logins to `tid` from initiator
    /// address `address` ("ALL": any). Sessions already open stay.
    pub fn address_acl(&self, tid: u32, allow: bool, address: &str) {
        let t = tid.to_string();
        let op = if allow { "bind" } else { "unbind" };
        self.must(&["--mode", "target", "--op", op, "--tid", &t, "-I", address]);
    }

    /// Requires one-way CHAP on `tid`: the initiator must answer as `user`/`secret`.
    pub fn set_chap(&mut self, tid: u32, user: &str, secret: &str) {
        self.new_account(user, secret);
        let t = tid.to_string();
        self.must(&[
            "--mode", "account", "--op", "bind", "--tid", &t, "--user", user,
        ]);
    }

    /// Mutual CHAP: the target proves itself to the initiator as `user`/`secret`
    /// (use together with [`Tgtd::set_chap`]).
    pub fn set_mutual_chap(&mut self, tid: u32, user: &str, secret: &str) {
        self.new_account(user, secret);
        let t = tid.to_string();
        self.must(&[
            "--mode",
            "account",
            "--op",
            "bind",
            "--tid",
            &t,
            "--user",
            user,
            "--outgoing",
        ]);
    }

    fn new_account(&mut self, user: &str, secret: &str) {
        if self.accounts.insert(user.to_string()) {
            self.must(&[
                "--mode",
                "account",
                "--op",
                "new",
                "--user",
                user,
                "--password",
                secret,
            ]);
        }
    }

    /// Sets an iSCSI login parameter of `tid` (e.g. "MaxBurstLength", "16384");
    /// it applies to later logins.
    pub fn update_param(&self, tid: u32, name: &str, value: &str) {
        let t = tid.to_string();
        self.must(&[
            "--mode", "target", "--op", "update", "--tid", &t, "-n", name, "-v", value,
        ]);
    }

    /// `tgtadm --op show --mode target --tid N`: the target's login parameters
    /// (`MaxBurstLength=262144`, ...), one per line.
    pub fn show_target(&self, tid: u32) -> String {
        self.must(&[
            "--mode",
            "target",
            "--op",
            "show",
            "--tid",
            &tid.to_string(),
        ])
    }

    /// `tgtadm --op show --mode target`: every target with its LUNs (size, backing
    /// store, `Readonly: Yes/No`), sessions, accounts and ACLs.
    pub fn show(&self) -> String {
        self.must(&["--mode", "target", "--op", "show"])
    }

    /// Runs `tgtadm -C <control port> --lld iscsi ARGS`; Ok(stdout) or Err(message).
    /// Passwords are redacted from the message.
    pub fn tgtadm(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.tgtadm)
            .args(["-C", &self.control_port.to_string(), "--lld", "iscsi"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.tgtadm.display()))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "tgtadm {} failed ({}): {}",
                redact(args),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn must(&self, args: &[&str]) -> String {
        let out = self.tgtadm(args).unwrap_or_else(|e| panic!("{e}"));
        if let Ok(mut h) = self.history.lock() {
            h.push(args.iter().map(|a| a.to_string()).collect());
        }
        out
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain syscall; tgtd leads its own process group (process_group(0)),
        // so -pid reaches it and anything it forked, and nothing else.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for f in &self.backing_files {
            let _ = fs::remove_file(f);
        }
        // SIGKILL leaves the control socket and its lock file behind
        let sock = format!("/var/run/tgtd/socket.{}", self.control_port);
        let _ = fs::remove_file(format!("{sock}.lock"));
        let _ = fs::remove_file(sock);
    }
}

/// A TCP port nobody listens on right now (the kernel's pick, so parallel tests differ).
fn free_port() -> u16 {
    // Below the kernel's ephemeral range (32768-60999 by default): a port
    // taken from that range can be handed to an outgoing connection of a
    // test running in parallel before tgtd binds it.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    for _ in 0..500 {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = 20000 + (seed.wrapping_add(n.wrapping_mul(7919)) % 12000) as u16;
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// True if process `pid` owns a socket listening on 127.0.0.1:`port` or *:`port`.
fn listens(pid: u32, port: u16) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let inodes: HashSet<String> = fds
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let s = l.to_str()?;
            Some(s.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    // The process's own view: right also when it runs in another network namespace.
    let Ok(tcp) = fs::read_to_string(format!("/proc/{pid}/net/tcp")) else {
        return false;
    };
    let want = [
        format!("0100007F:{port:04X}"),
        format!("00000000:{port:04X}"),
    ];
    tcp.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() > 9 && want.iter().any(|w| w == f[1]) && f[3] == "0A" && inodes.contains(f[9])
    })
}

/// The arguments as one string, with the value after `--password` replaced.
fn redact(args: &[&str]) -> String {
    let mut out = Vec::with_capacity(args.len());
    let mut hide = false;
    for a in args {
        out.push(if hide { "<redacted>" } else { a });
        hide = *a == "--password";
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_only_the_password() {
        let s = redact(&[
            "--op",
            "new",
            "--user",
            "bob",
            "--password",
            "hunter2hunter2",
        ]);
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("bob") && s.contains("<redacted>"), "{s}");
    }

    #[test]
    fn free_ports_are_usable() {
        let p = free_port();
        assert!((20000..32000).contains(&p), "{p}");
        assert!(TcpListener::bind(("127.0.0.1", p)).is_ok());
    }
}
