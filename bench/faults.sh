#!/usr/bin/env bash
# Fault injection against a real peer (issue 6): tgtd (TCP) in its own network namespace inside
# the project's VM (qemu/rdma-vm.sh: its kernel has sch_netem, the host's has not), vhost-iser
# and a libblkio client doing randrw 4k write + verify in front of it, and faults injected while
# the client runs: tc netem loss 5 % / 20 %, delay 100 ms ± 50 ms, reordering, duplication;
# ip link set down/up; kill -9 + restart of tgtd; SIGSTOP/SIGCONT of tgtd (NOP-Out timeout) and
# SIGSTOP with long NOP timers (command timeout -> ABORT TASK -> LUN RESET -> drop). The VM side
# is bench/lib/faults-inner.sh, the table comes from bench/lib/faults_report.py (definitions of
# recovery, stall, rate there).
#
#   bench/faults.sh [--count 5] [--hold 3] [--gap 3] [--plan "kind:n ..."] [--no-build]
#                   [--out-prefix bench/results/faults]
#
# Writes PREFIX.md, PREFIX.json (per kind and per injection) and PREFIX.logs.tar.gz (backend and
# tgtd logs, injection times, VM console); the raw outputs (loadgen reports with their 10 ms
# timelines, ~2 MB) stay in a temporary directory named on stderr. Prints the table.
# Exit: 0 = every kind ran with 0 client errors and 0 mismatches, 1 = a check failed,
# 2 = usage/setup error.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
count=5 hold=3 gap=3 plan= build=1 out_prefix="$repo/bench/results/faults"
die() { echo "faults.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --count) count=$2; shift 2 ;;
    --hold) hold=$2; shift 2 ;;
    --gap) gap=$2; shift 2 ;;
    --plan) plan=$2; shift 2 ;;
    --no-build) build=; shift ;;
    --out-prefix) out_prefix=$2; shift 2 ;;
    -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ "$count" =~ ^[0-9]+$ ]] || die "--count needs a number"
[ -n "$plan" ] || plan=$(for k in loss5 loss20 delay reorder dup link kill stop ladder; do printf '%s:%s ' "$k" "$count"; done)
for t in qemu-system-x86_64 tgtd python3; do
  command -v $t >/dev/null || die "$t not found (scripts/install-deps.sh)"
done
target_dir=${CARGO_TARGET_DIR:-$repo/target}
if [ -n "$build" ]; then
  cargo build --release --quiet --manifest-path "$repo/Cargo.toml" -p vhost-iser --bin vhost-iser >&2 || die "cargo build failed"
  cargo build --release --quiet --manifest-path "$repo/Cargo.toml" -p vhost-iser-loadgen >&2 || die "cargo build failed"
fi
vi=$target_dir/release/vhost-iser lg=$target_dir/release/vhost-iser-loadgen
[ -x "$vi" ] && [ -x "$lg" ] || die "$vi or $lg missing (build or drop --no-build)"

raw=$(mktemp -d /tmp/vhost-iser-faults.XXXXXX)
echo "faults.sh: raw outputs in $raw" >&2
export FAULTS_OUT=$raw FAULTS_VI=$vi FAULTS_LG=$lg FAULTS_PLAN=$plan FAULTS_HOLD=$hold FAULTS_GAP=$gap
start=$(date -u +%FT%TZ)
t0=$(date +%s)
rc=0
(cd "$repo" && qemu/rdma-vm.sh --rw "$raw" --timeout 3000 --mem 1024 -- bench/lib/faults-inner.sh) >"$raw/vm-console.txt" 2>&1 || rc=$?
wall=$(( $(date +%s) - t0 ))
grep -E '^faults-inner:' "$raw/vm-console.txt" >&2 || true
[ "$rc" = 0 ] || { tail -30 "$raw/vm-console.txt" >&2; echo "faults.sh: the VM run failed (rc $rc)" >&2; }
rm -f "$raw"/*.ready "$raw"/*.stop
title="Fault injection: $(git -C "$repo" rev-parse --short HEAD), $start, VM wall ${wall}s, ${hold} s per fault, ${gap} s between"
python3 "$here/lib/faults_report.py" "$raw" --json "$out_prefix.json" --md "$out_prefix.md" --title "$title" \
  | tee "$raw/summary.txt"
cat "$out_prefix.md"
tar -C "$raw" -czf "$out_prefix.logs.tar.gz" --exclude='*.lg.json' . || rc=1
# Pass: every kind ran, 0 client errors, 0 mismatches in reads and in the backing file.
python3 - "$out_prefix.json" <<'EOF' || rc=1
import json, sys
bad = [r["kind"] for r in json.load(open(sys.argv[1]))["kinds"]
       if "error" in r or r["client_errors"] or r["mismatches"] or r["file_mismatches"]
       or r["recovered"] != r["injected"]]
if bad:
    print("faults.sh: FAILED kinds:", " ".join(bad), file=sys.stderr)
    sys.exit(1)
EOF
exit $(( rc == 0 ? 0 : 1 ))
