#!/bin/bash
# test.sh - the whole test suite, from a fresh Debian 12 machine.
#
# usage: scripts/test.sh [--quick]
#   --quick  only compile the fuzz targets instead of running them
#
# Installs the Debian packages it needs (scripts/install-deps.sh), then runs:
#   formatting and lint (cargo fmt --check, cargo clippy -D warnings),
#   unit tests, integration tests against real peers (libblkio frontend,
#   tgtd over TCP, QEMU guests running fio, the soft-RoCE VM with tgtd and LIO),
#   and each fuzz target for a bounded time (FUZZ_SECONDS, default 20).
# Nothing is skipped silently: a missing peer is installed or the run fails.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1

step() { printf '\n=== %s (%s)\n' "$*" "$(date +%H:%M:%S)"; }

step "installing Debian packages"
scripts/install-deps.sh --libvirt

step "format and lint"
cargo fmt --all --check
cargo clippy --all-targets -- -D warnings

step "build"
cargo build --all-targets

step "tests (unit, libblkio, tgtd, QEMU guests, soft-RoCE VM)"
# Two cores: VM tests boot TCG guests; keep parallelism modest.
cargo test --all-targets -- --test-threads="${TEST_THREADS:-3}"

step "benchmark report code (recorded JSON)"
python3 -m unittest discover -s bench/lib -p 'test_*.py'

if [ "$QUICK" = 1 ]; then
  # The fuzz crate is its own workspace: without the fuzzing step nothing
  # else would notice a fuzz target that no longer compiles.
  step "fuzz targets compile"
  cargo check --manifest-path fuzz/Cargo.toml --bins
else
  step "fuzzing (${FUZZ_SECONDS:-20} s per target)"
  scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
fi

step "all tests passed"
