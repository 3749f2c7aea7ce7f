#!/usr/bin/env bash
# iSER benchmark in the soft-RoCE VM (issue 4, "P3"): vhost-iser on iSER, vhost-iser on TCP and
# qemu-storage-daemon's iscsi driver (libiscsi) on iSER (and TCP), all against one tgtd null LUN,
# driven by the same libblkio client, in one VM run; plus callgrind instruction counts of
# vhost-iser per 4 KiB I/O on iSER and on TCP. The VM side is bench/iser-vm-inner.sh.
#
# Writes bench/results/iser-vm.json and bench/results/iser-vm.md (or --out-prefix). Progress and
# the VM console go to stderr. Exit status: 0 everything measured, 1 some part failed (the
# results say which), 2 usage/setup error (nothing written).
set -euo pipefail
invocation="$0 $*"

usage() {
    cat <<'EOF'
usage: bench/iser-vm.sh [options]
  --runtime SECS       seconds per throughput job (default 10)
  --depths "1 16"      queue depths (default "1 16")
  --backends LIST      space list of vi-iser vi-tcp qsd-iser qsd-tcp (default: all four)
  --cg-backends LIST   backends measured under callgrind (default "vi-iser vi-tcp qsd-iser";
                       "" = none; vi-iser-poll0 = vi-iser with VHOST_ISER_POLL_US=0)
  --cg-depths "1 16"   queue depths of the callgrind phases (default "1 16")
  --cg-ios "W N1 N2"   callgrind phases: warm-up, then N1, then N2 I/Os (default "50 100 500")
  --timeout SECS       VM timeout (default 900)
  --out-prefix P       write P.json and P.md (default bench/results/iser-vm)
  --no-build           use the existing release binaries
EOF
}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
runtime=10 depths="1 16" backends="vi-iser vi-tcp qsd-iser qsd-tcp" cg_backends="vi-iser vi-tcp qsd-iser" cg_depths="1 16"
cg_ios="50 100 500" vm_timeout=900 out_prefix="$repo/bench/results/iser-vm" build=1
die() { echo "iser-vm.sh: $*" >&2; exit 2; }
log() { echo "iser-vm.sh: $*" >&2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) runtime=$2; shift 2 ;;
        --depths) depths=$2; shift 2 ;;
        --backends) backends=$2; shift 2 ;;
        --cg-backends) cg_backends=$2; shift 2 ;;
        --cg-ios) cg_ios=$2; shift 2 ;;
        --cg-depths) cg_depths=$2; shift 2 ;;
        --timeout) vm_timeout=$2; shift 2 ;;
        --out-prefix) out_prefix=$2; shift 2 ;;
        --no-build) build=; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done
read -r cg_warm cg_n1 cg_n2 <<<"$cg_ios"
for n in "$runtime" "$cg_warm" "$cg_n1" "$cg_n2" "$vm_timeout"; do
    [[ "$n" =~ ^[0-9]+$ ]] || die "'$n' is not a whole number"
done
[ "$cg_n2" -gt "$cg_n1" ] || die "--cg-ios: N2 must be larger than N1"
for b in $backends $cg_backends; do
    case "$b" in vi-iser | vi-tcp | qsd-iser | qsd-tcp | vi-iser-poll0) ;; *) die "unknown backend '$b'" ;; esac
done
for t in valgrind callgrind_control qemu-storage-daemon tgtd objcopy python3; do
    command -v $t >/dev/null || die "$t not found (scripts/install-deps.sh; valgrind: apt-get install valgrind)"
done

target_dir=${CARGO_TARGET_DIR:-$repo/target}
if [ -n "$build" ]; then
    log "building vhost-iser and vhost-iser-loadgen (release)"
    cargo build --release --quiet --manifest-path "$repo/Cargo.toml" --bin vhost-iser -p vhost-iser \
        -p vhost-iser-loadgen >&2 || die "cargo build failed"
fi
vi="$target_dir/release/vhost-iser"
lg="$target_dir/release/vhost-iser-loadgen"
[ -x "$vi" ] && [ -x "$lg" ] || die "$vi or $lg missing (build or drop --no-build)"

work=$(mktemp -d /tmp/iser-vm.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir "$work/out"
# valgrind reads all debug info at start-up, which takes minutes under TCG for a 29 MB binary:
# callgrind gets a copy without debug info (symbols kept). Instruction counts are unaffected.
objcopy --strip-debug "$vi" "$work/vhost-iser.nodebug"

export ISER_VM_OUT="$work/out" ISER_VM_VI="$vi" ISER_VM_VI_CG="$work/vhost-iser.nodebug" ISER_VM_LOADGEN="$lg"
export ISER_VM_RUNTIME="$runtime" ISER_VM_DEPTHS="$depths" ISER_VM_BACKENDS="$backends"
export ISER_VM_CG_BACKENDS="$cg_backends" ISER_VM_CG_WARM="$cg_warm" ISER_VM_CG_N1="$cg_n1" ISER_VM_CG_N2="$cg_n2" ISER_VM_CG_DEPTHS="$cg_depths"
loadavg_before=$(cut -d' ' -f1-3 /proc/loadavg)
t0=$(date +%s)
set +e
"$repo/qemu/rdma-vm.sh" --timeout "$vm_timeout" --mem 1536 --rw "$work/out" -- "$here/iser-vm-inner.sh" >&2
vm_rc=$?
set -e
wall=$(($(date +%s) - t0))
log "VM rc=$vm_rc, wall ${wall}s"
mkdir -p "$(dirname "$out_prefix")"
rc=0
python3 "$here/lib/iser_vm_report.py" "$work/out" "$out_prefix" \
    vm_rc="$vm_rc" vm_wall_s="$wall" loadavg_before="$loadavg_before" \
    loadavg_after="$(cut -d' ' -f1-3 /proc/loadavg)" runtime_s="$runtime" depths="$depths" \
    command="$invocation" cg_ios="$cg_ios" cg_depths="$cg_depths" date="$(date -u "+%Y-%m-%d %H:%M UTC")" git="$(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)" \
    vhost_iser_version="$("$vi" --version 2>/dev/null)" \
    qsd_version="$(qemu-storage-daemon --version | head -1)" \
    valgrind_version="$(valgrind --version)" || rc=$?
if [ -n "${ISER_VM_KEEP:-}" ]; then rm -rf "$ISER_VM_KEEP"; fi
if [ -n "${ISER_VM_KEEP:-}" ]; then cp -a "$work/out" "$ISER_VM_KEEP"; log "raw output copied to $ISER_VM_KEEP"; fi
log "wrote $out_prefix.json and $out_prefix.md"
[ "$vm_rc" = 0 ] && [ "$rc" = 0 ] || exit 1
