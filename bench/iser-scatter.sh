#!/usr/bin/env bash
# Scattered requests on iSER (issue 4): bounce buffer vs one command per contiguous piece
# (VHOST_ISER_SCATTER=bounce|split), against contiguous baselines, all against one tgtd null LUN
# in one run of the soft-RoCE VM (qemu/rdma-vm.sh, the same harness as bench/iser-vm.sh). The VM
# side is bench/iser-scatter-inner.sh; the report bench/lib/iser_scatter_report.py.
#
# Writes bench/results/iser-scatter.json and .md (or --out-prefix). Exit status: 0 everything
# measured, 1 some part failed (the results say which), 2 usage/setup error (nothing written).
set -euo pipefail
invocation="$0 $*"

usage() {
    cat <<'EOF'
usage: bench/iser-scatter.sh [options]
  --runtime SECS         seconds per measured run (default 15)
  --depths "1 16"        queue depths of the random-read runs (default "1 16")
  --write-depths "16"    queue depths of the random-write runs (default "16"; "" = no writes)
  --jobs LIST            read jobs (default "c4k c64k c128k s32-bounce s32-split s2-bounce s2-split")
  --write-jobs LIST      write jobs (default "c128k s32-bounce s32-split s2-bounce s2-split")
  --timeout SECS         VM timeout (default 1500)
  --out-prefix P         write P.json and P.md (default bench/results/iser-scatter)
  --no-build             use the existing release binaries
EOF
}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
runtime=15 depths="1 16" write_depths="16" vm_timeout=1500 build=1
jobs="c4k c64k c128k s32-bounce s32-split s2-bounce s2-split"
write_jobs="c128k s32-bounce s32-split s2-bounce s2-split"
out_prefix="$repo/bench/results/iser-scatter"
die() { echo "iser-scatter.sh: $*" >&2; exit 2; }
log() { echo "iser-scatter.sh: $*" >&2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) runtime=$2; shift 2 ;;
        --depths) depths=$2; shift 2 ;;
        --write-depths) write_depths=$2; shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        --write-jobs) write_jobs=$2; shift 2 ;;
        --timeout) vm_timeout=$2; shift 2 ;;
        --out-prefix) out_prefix=$2; shift 2 ;;
        --no-build) build=; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done
for n in "$runtime" "$vm_timeout" $depths $write_depths; do
    [[ "$n" =~ ^[0-9]+$ ]] || die "'$n' is not a whole number"
done
for j in $jobs $write_jobs; do
    case "$j" in c4k | c64k | c128k | s32-bounce | s32-split | s2-bounce | s2-split) ;; *) die "unknown job '$j'" ;; esac
done
for t in tgtd python3; do command -v $t >/dev/null || die "$t not found (scripts/install-deps.sh)"; done

target_dir=${CARGO_TARGET_DIR:-$repo/target}
if [ -n "$build" ]; then
    log "building vhost-iser and vhost-iser-loadgen (release)"
    cargo build --release --quiet --manifest-path "$repo/Cargo.toml" --bin vhost-iser -p vhost-iser \
        -p vhost-iser-loadgen >&2 || die "cargo build failed"
fi
# Absolute paths: the VM sees the host's / at the same paths (read-only), so these work inside.
vi=$(cd "$(dirname "$target_dir/release/vhost-iser")" && pwd -P)/vhost-iser
lg=$(cd "$(dirname "$target_dir/release/vhost-iser-loadgen")" && pwd -P)/vhost-iser-loadgen
[ -x "$vi" ] && [ -x "$lg" ] || die "$vi or $lg missing (build or drop --no-build)"

work=$(mktemp -d /tmp/iser-scatter.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir "$work/out"
export ISER_SCATTER_OUT="$work/out" ISER_SCATTER_VI="$vi" ISER_SCATTER_LOADGEN="$lg"
export ISER_SCATTER_RUNTIME="$runtime" ISER_SCATTER_DEPTHS="$depths" ISER_SCATTER_WRITE_DEPTHS="$write_depths"
export ISER_SCATTER_JOBS="$jobs" ISER_SCATTER_WRITE_JOBS="$write_jobs"
loadavg_before=$(cut -d' ' -f1-3 /proc/loadavg)
t0=$(date +%s)
set +e
"$repo/qemu/rdma-vm.sh" --timeout "$vm_timeout" --mem 1536 --rw "$work/out" -- "$here/iser-scatter-inner.sh" >&2
vm_rc=$?
set -e
wall=$(($(date +%s) - t0))
log "VM rc=$vm_rc, wall ${wall}s"
mkdir -p "$(dirname "$out_prefix")"
rc=0
python3 "$here/lib/iser_scatter_report.py" "$work/out" "$out_prefix" \
    vm_rc="$vm_rc" vm_wall_s="$wall" loadavg_before="$loadavg_before" \
    loadavg_after="$(cut -d' ' -f1-3 /proc/loadavg)" runtime_s="$runtime" \
    command="$invocation" date="$(date -u "+%Y-%m-%d %H:%M UTC")" \
    git="$(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)" \
    vhost_iser_version="$("$vi" --version 2>/dev/null)" || rc=$?
if [ -n "${ISER_SCATTER_KEEP:-}" ]; then
    rm -rf "$ISER_SCATTER_KEEP"
    cp -a "$work/out" "$ISER_SCATTER_KEEP"
    log "raw output copied to $ISER_SCATTER_KEEP"
fi
log "wrote $out_prefix.json and $out_prefix.md"
[ "$vm_rc" = 0 ] && [ "$rc" = 0 ] || exit 1
