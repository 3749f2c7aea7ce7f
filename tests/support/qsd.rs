//! qemu-storage-daemon as a reference vhost-user-blk backend (a stand-in for vhost-iser
//! in harness tests, and a known-good peer to compare against).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A qemu-storage-daemon exporting one file over vhost-user-blk; killed on drop.
pub struct QemuStorageDaemon {
    child: Child,
    sock: PathBuf,
    image: PathBuf,
    _dir: tempfile::TempDir,
}

impl QemuStorageDaemon {
    /// Exports a fresh zero-filled `size`-byte file on tmpfs (/dev/shm), writable, with
    /// `queues` queues, on a socket in a private temporary directory.
    pub fn start(size: u64, queues: u32) -> QemuStorageDaemon {
        let bin = super::require_tool("qemu-storage-daemon", "qemu-system-common");
        let dir = super::unique_tmp_dir();
        let sock = dir.path().join("vub.sock");
        let image = PathBuf::from(format!(
            "/dev/shm/{}.img",
            dir.path()
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("vhost-iser-qsd")
        ));
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", image.display()));
        let log = std::fs::File::create(dir.path().join("qsd.log")).expect("qsd log");
        let mut cmd = Command::new(bin);
        cmd.arg("--blockdev")
            .arg(format!("driver=file,node-name=f0,filename={}", image.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                sock.display()
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("qsd log"))
            .stderr(log)
            .process_group(0);
        let child = cmd.spawn().expect("cannot spawn qemu-storage-daemon");
        let mut q = QemuStorageDaemon {
            child,
            sock,
            image,
            _dir: dir,
        };
        if !super::wait_for_path(&q.sock, Duration::from_secs(20)) {
            let _ = q.child.kill();
            panic!(
                "qemu-storage-daemon did not create {}: {}",
                q.sock.display(),
                q.log()
            );
        }
        q
    }

    /// The vhost-user socket to give to `qemu/run-guest.sh --sock`.
    pub fn sock(&self) -> &Path {
        &self.sock
    }

    /// The exported file.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// qemu-storage-daemon's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("qsd.log")).unwrap_or_default()
    }
}

impl Drop for QemuStorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.image);
    }
}
