//! Runs the project's VM scripts from Rust tests and returns their output.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Result of one VM run.
pub struct VmRun {
    /// The script's exit status code (the guest command's; 124 timeout; 125 harness error).
    pub code: Option<i32>,
    /// Console + script messages.
    pub output: Output,
    /// Wall time of the whole run, boot to power-off.
    pub wall: Duration,
}

impl VmRun {
    /// Console and messages as text, for assertion messages.
    pub fn text(&self) -> String {
        super::output_text(&self.output)
    }
}

/// Runs `qemu/<script> ARGS` from the repository root (so the guest's cwd is the
/// repository too) and waits for it.
pub fn run_script(script: &str, args: &[&str]) -> VmRun {
    let root = super::repo_root();
    let start = Instant::now();
    let output = Command::new("bash")
        .arg(root.join("qemu").join(script))
        .args(args)
        .current_dir(&root)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu/{script}: {e}"));
    VmRun {
        code: output.status.code(),
        output,
        wall: start.elapsed(),
    }
}
