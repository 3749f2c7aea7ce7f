#!/bin/bash
# run-guest.sh - boot a throw-away guest (QEMU, TCG) whose virtio-blk disks are served
# by already running vhost-user-blk backends, run one command in it, return its status.
#
# usage: qemu/run-guest.sh --sock PATH [--sock PATH]... [options] -- COMMAND [ARG]...
#   --sock PATH        vhost-user-blk socket (repeatable; /dev/vda, /dev/vdb, ... in order)
#   --queues N         num-queues of each device (default 2; must be <= the backend's)
#   --queue-size N     virtqueue size (QEMU default 128)
#   --reconnect SECS   chardev reconnect=SECS (QEMU reconnects to a restarted backend)
#   --disk FILE        QEMU's built-in virtio-blk on FILE (comparison runs; after --sock disks)
#   --mem MB           guest RAM (default 1024)     --cpus N    guest CPUs (default 2)
#   --timeout SEC      kill the VM after SEC s (default 600) -> exit 124
#   --out DIR          host DIR writable in the guest at the same path; $VM_OUT names it
#   --rw DIR           another writable host dir (repeatable)
#   --qemu-arg ARG     extra qemu argument (repeatable)
#   -v, --verbose      kernel messages on the console, print the qemu command
# Guest: host / read-only under a tmpfs overlay, root, caller's cwd and environment.
# Exit: the command's status; 124 timeout; 125 harness error (no status); 2 usage error.
# Env: VHOST_ISER_ACCEL=kvm (default tcg), VHOST_ISER_VM_CACHE, VHOST_ISER_VM_KERNEL_PKG.
set -euo pipefail
VM_PROG=run-guest
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/vm-common.sh
. "$HERE/lib/vm-common.sh"

SOCKS=() DISKS=() VM_RW=() VM_QEMU=()
QUEUES=2 QSIZE="" RECONNECT="" OUT=""
need() { [ $# -ge 2 ] && [ -n "$2" ] || vm_usage_die "$1 needs a value"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --sock) need "$@"; SOCKS+=("$2"); shift 2 ;;
    --disk) need "$@"; DISKS+=("$2"); shift 2 ;;
    --queues) need "$@"; QUEUES=$2; shift 2 ;;
    --queue-size) need "$@"; QSIZE=$2; shift 2 ;;
    --reconnect) need "$@"; RECONNECT=$2; shift 2 ;;
    --mem) need "$@"; VM_MEM=$2; shift 2 ;;
    --cpus) need "$@"; VM_CPUS=$2; shift 2 ;;
    --timeout) need "$@"; VM_TIMEOUT=$2; shift 2 ;;
    --out) need "$@"; OUT=$2; shift 2 ;;
    --rw) need "$@"; [ -d "$2" ] || vm_usage_die "--rw $2: not a directory"; VM_RW+=("$(cd "$2" && pwd -P)"); shift 2 ;;
    --qemu-arg) need "$@"; VM_QEMU+=("$2"); shift 2 ;;
    -v|--verbose) VM_VERBOSE=1; shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) vm_usage_die "unknown option '$1' (put -- before the guest command)" ;;
  esac
done
[ $# -gt 0 ] || vm_usage_die "no guest command given (... -- COMMAND ARGS)"
[ ${#SOCKS[@]} -gt 0 ] || [ ${#DISKS[@]} -gt 0 ] || vm_usage_die "need --sock PATH (or --disk FILE)"
for n in "$QUEUES" "$VM_MEM" "$VM_CPUS" "$VM_TIMEOUT" ${QSIZE:+"$QSIZE"} ${RECONNECT:+"$RECONNECT"}; do
  vm_is_uint "$n" || vm_usage_die "'$n' is not a number"
done
for s in "${SOCKS[@]}"; do
  # without reconnect QEMU refuses to start when nobody listens: say so clearly
  [ -S "$s" ] || [ -n "$RECONNECT" ] || vm_usage_die "$s is not a unix socket (is the backend running?)"
done
for d in "${DISKS[@]}"; do [ -e "$d" ] || vm_usage_die "--disk $d does not exist"; done
if [ -n "$OUT" ]; then
  mkdir -p "$OUT" || vm_usage_die "cannot create --out $OUT"
  OUT=$(cd "$OUT" && pwd -P); VM_RW+=("$OUT"); export VM_OUT=$OUT
fi

i=0
for s in "${SOCKS[@]}"; do
  VM_QEMU+=(-chardev "socket,id=vub$i,path=$s${RECONNECT:+,reconnect=$RECONNECT}"
            -device "vhost-user-blk-pci,chardev=vub$i,num-queues=$QUEUES${QSIZE:+,queue-size=$QSIZE}")
  i=$((i+1))
done
for d in "${DISKS[@]}"; do   # /dev/shm has no O_DIRECT: cache=writeback
  VM_QEMU+=(-drive "file=$d,if=none,id=drv$i,format=raw,cache=writeback"
            -device "virtio-blk-pci,drive=drv$i,num-queues=$QUEUES${QSIZE:+,queue-size=$QSIZE}")
  i=$((i+1))
done
vm_run "$@"
