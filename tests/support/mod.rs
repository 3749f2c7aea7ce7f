//! Shared helpers for the integration tests (`mod support;` in a test file).
//!
//! - [`tgtd::Tgtd`]: a private tgtd (user-space iSCSI target over TCP) per test.
//! - [`qsd::QemuStorageDaemon`]: qemu-storage-daemon as a reference vhost-user-blk backend.
//! - [`netns::Netns`]: a network namespace with several veth links (multipath tests).
//! - [`vm`]: run the project's VM scripts (`qemu/run-guest.sh`, `qemu/rdma-vm.sh`).
//!
//! Missing host tools are a test failure with the fix in the message, never a silent skip.
#![allow(dead_code)] // each test binary uses a different subset

pub mod fake_target;
pub mod netns;
pub mod qsd;
pub mod tgtd;
pub mod vm;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

/// A fresh, private temporary directory, removed (with its contents) when dropped.
pub fn unique_tmp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vhost-iser-test-")
        .tempdir()
        .expect("cannot create a temporary directory under $TMPDIR")
}

/// Polls until `path` exists; returns false if it did not appear within `timeout`.
pub fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if path.exists() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The crate's root directory (where `qemu/` and `scripts/` live).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Finds an executable in $PATH or the sbin directories (tests may run without them in PATH).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// Like [`find_tool`], but a missing tool fails the test with the fix in the message.
pub fn require_tool(name: &str, package: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| {
        panic!("{name} not found (Debian package {package}): run scripts/install-deps.sh")
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// stdout + stderr of a finished command as one printable string.
pub fn output_text(out: &Output) -> String {
    format!(
        "--- stdout ---\n{}--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_for_path_sees_a_file_created_later() {
        let dir = unique_tmp_dir();
        let p = dir.path().join("later");
        let p2 = p.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            std::fs::write(p2, b"x").unwrap();
        });
        assert!(wait_for_path(&p, Duration::from_secs(5)));
        t.join().unwrap();
        assert!(!wait_for_path(
            &dir.path().join("never"),
            Duration::from_millis(50)
        ));
    }

    #[test]
    fn unique_tmp_dirs_differ_and_vanish() {
        let a = unique_tmp_dir();
        let b = unique_tmp_dir();
        assert_ne!(a.path(), b.path());
        let pa = a.path().to_path_buf();
        drop(a);
        assert!(!pa.exists());
    }
}
