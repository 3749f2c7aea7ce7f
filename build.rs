//! Records the git commit for `--version` and the metrics' build info.
//!
//! `VHOST_ISER_GIT_COMMIT` in the environment wins (builds from a tarball);
//! otherwise `git rev-parse --short HEAD`, or "unknown" without git.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=VHOST_ISER_GIT_COMMIT");
    let commit = std::env::var("VHOST_ISER_GIT_COMMIT")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| git(&["rev-parse", "--short", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=VHOST_ISER_GIT_COMMIT={commit}");

    // Build again when HEAD moves: HEAD itself (branch switch), the branch's
    // ref (commit) and packed-refs. Only existing files: a missing one would
    // make cargo rerun this script on every build.
    let mut watch = Vec::new();
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        watch.push(Path::new(&dir).join("HEAD"));
    }
    if let Some(common) = git(&["rev-parse", "--git-common-dir"]) {
        if let Some(r) = git(&["rev-parse", "--symbolic-full-name", "HEAD"]) {
            watch.push(Path::new(&common).join(r));
        }
        watch.push(Path::new(&common).join("packed-refs"));
    }
    for p in watch.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}
