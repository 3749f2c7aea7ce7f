//! Test frontend: libblkio's `virtio-blk-vhost-user` driver (the library QEMU
//! itself can use) talking to a real `vhost-iser` process.
#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// A running vhost-iser process, stopped (SIGTERM) when dropped.
pub struct Backend {
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Backend {
    /// Starts `vhost-iser --socket <tmp>/sock <args...>` and waits for the socket.
    pub fn start(args: &[&str]) -> Backend {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("vhost.sock");
        Self::start_at(dir, socket, args)
    }

    pub fn start_at(dir: tempfile::TempDir, socket: PathBuf, args: &[&str]) -> Backend {
        Self::start_full(dir, socket, args, &[])
    }

    /// Starts the backend and returns it without waiting (it may exit: login failures).
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Backend {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("vhost.sock");
        let child = Self::command(&dir, &socket, args, env)
            .spawn()
            .expect("spawn vhost-iser");
        Backend {
            child: Some(child),
            socket,
            dir,
        }
    }

    /// Starts with extra environment variables (secrets) and waits for the socket.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Backend {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("vhost.sock");
        Self::start_full(dir, socket, args, env)
    }

    fn command(
        dir: &tempfile::TempDir,
        socket: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Command {
        let log = std::fs::File::create(dir.path().join("backend.log")).expect("log file");
        let mut c = Command::new(env!("CARGO_BIN_EXE_vhost-iser"));
        c.arg("--socket")
            .arg(socket)
            .args(args)
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }

    /// Waits for the process to exit by itself (within `secs`).
    pub fn wait_exit(&mut self, secs: u64) -> ExitStatus {
        let mut child = self.child.take().expect("backend already stopped");
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("vhost-iser did not exit; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start_full(
        dir: tempfile::TempDir,
        socket: PathBuf,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Backend {
        let child = Self::command(&dir, &socket, args, env)
            .spawn()
            .expect("spawn vhost-iser");
        let b = Backend {
            child: Some(child),
            socket,
            dir,
        };
        b.wait_ready();
        b
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.log().contains(" ERROR ") {
                panic!("vhost-iser failed to start; log:\n{}", self.log());
            }
            if self.log().contains("waiting for a frontend") && self.socket.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("vhost-iser did not start; log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("backend.log")).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("backend already stopped");
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "vhost-iser did not exit after SIGTERM; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A connected libblkio frontend with one shared memory region for buffers.
pub struct Client {
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
    pub blkio: Blkio,
}

impl Client {
    pub fn connect(socket: &Path, num_queues: i32, mem_len: usize) -> Client {
        let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio driver");
        b.set_str("path", socket.to_str().expect("utf8 path"))
            .expect("set path");
        b.connect()
            .unwrap_or_else(|e| panic!("blkio connect: {e:?}"));
        b.set_i32("num-queues", num_queues).expect("set num-queues");
        let outcome = b.start().unwrap_or_else(|e| panic!("blkio start: {e:?}"));
        let region = b.alloc_mem_region(mem_len).expect("alloc region");
        b.map_mem_region(&region).expect("map region");
        Client {
            queues: outcome.queues,
            region,
            blkio: b,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity")
    }

    /// The buffer memory shared with the backend.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is mapped for the client's lifetime; tests use disjoint
        // parts of it per in-flight request.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    pub fn ptr(&self, off: usize) -> *mut u8 {
        assert!(off < self.region.len);
        (self.region.addr + off) as *mut u8
    }

    /// Waits for `n` completions on queue `q`; returns them.
    pub fn wait(&mut self, q: usize, n: usize) -> Vec<(usize, i32)> {
        let mut out = Vec::new();
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..n.max(1)).map(|_| MaybeUninit::uninit()).collect();
        while out.len() < n {
            let mut timeout = Duration::from_secs(30);
            let want = n - out.len();
            let got = self.queues[q]
                .do_io(&mut comps[..want], want.min(1), Some(&mut timeout), None)
                .unwrap_or_else(|e| panic!("do_io: {e:?}"));
            if got == 0 && timeout.is_zero() {
                panic!("timed out waiting for completions ({} of {n})", out.len());
            }
            for c in &comps[..got] {
                // SAFETY: do_io initialised the first `got` entries.
                let c = unsafe { c.assume_init_read() };
                out.push((c.user_data, c.ret));
            }
        }
        out
    }

    /// Synchronous write of buf[off..off+len] to disk offset `at`; returns blkio's ret.
    pub fn write(&mut self, q: usize, at: u64, off: usize, len: usize) -> i32 {
        let p = self.ptr(off);
        self.queues[q].write(at, p, len, 1, ReqFlags::empty());
        self.wait(q, 1)[0].1
    }

    pub fn read(&mut self, q: usize, at: u64, off: usize, len: usize) -> i32 {
        let p = self.ptr(off);
        self.queues[q].read(at, p, len, 1, ReqFlags::empty());
        self.wait(q, 1)[0].1
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(1, ReqFlags::empty());
        self.wait(q, 1)[0].1
    }

    pub fn discard(&mut self, q: usize, at: u64, len: u64) -> i32 {
        self.queues[q].discard(at, len, 1, ReqFlags::empty());
        self.wait(q, 1)[0].1
    }

    pub fn write_zeroes(&mut self, q: usize, at: u64, len: u64) -> i32 {
        self.queues[q].write_zeroes(at, len, 1, ReqFlags::empty());
        self.wait(q, 1)[0].1
    }
}

/// Deterministic test pattern: depends on the disk offset, so misplaced data shows.
pub fn pattern(disk_off: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = disk_off + i;
            ((x / 512).wrapping_mul(31) ^ (x % 512) ^ seed as u64) as u8
        })
        .collect()
}

/// Waits for `n` completions on a queue used from its own thread; returns (user_data, ret).
pub fn drain(q: &mut blkio::Blkioq, n: usize) -> Vec<(usize, i32)> {
    let mut out = Vec::new();
    let mut comps: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
    while out.len() < n {
        let mut timeout = Duration::from_secs(60);
        let k = q
            .do_io(&mut comps[..n - out.len()], 1, Some(&mut timeout), None)
            .expect("do_io");
        assert!(k > 0, "timed out with {} of {n} done", out.len());
        for c in &comps[..k] {
            // SAFETY: do_io initialised the first k entries.
            let c = unsafe { c.assume_init_read() };
            out.push((c.user_data, c.ret));
        }
    }
    out
}
