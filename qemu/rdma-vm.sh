#!/bin/bash
# rdma-vm.sh - run a command as root inside a throw-away QEMU (TCG) VM with soft-RoCE
# (rdma_rxe) devices; the host's / is visible read-only under a tmpfs overlay.
#
# usage: qemu/rdma-vm.sh [options] -- COMMAND [ARG]...
#   --mem MB        guest RAM (default 1536)      --cpus N   guest CPUs (default 2)
#   --timeout SEC   kill the VM after SEC s (default 900) -> exit 124
#   --rw DIR        host DIR writable inside the VM at the same path (repeatable)
#   --qemu-arg ARG  extra qemu argument (repeatable)
#   -v, --verbose   kernel messages on the console, print the qemu command
# Inside: veth0 10.99.0.1/24 <-> veth1 10.99.0.2/24, rdma devices rxe0 (veth0), rxe1 (veth1);
# connect to 10.99.0.1 without binding a source (both ends then use rxe0).
# `modprobe` works (the guest kernel's modules are at /lib/modules); configfs is mounted; sch_netem
# is loaded (tc netem: bench/faults.sh).
# Start iSER targets with:  eval "$(qemu/rdma/start-targets.sh all)"
# Exit: the command's status; 124 timeout; 125 harness/VM setup error; 2 usage error.
set -euo pipefail
VM_PROG=rdma-vm
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/vm-common.sh
. "$HERE/lib/vm-common.sh"

VM_MEM=1536 VM_TIMEOUT=900 VM_RW=() VM_QEMU=()
need() { [ $# -ge 2 ] && [ -n "$2" ] || vm_usage_die "$1 needs a value"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --mem) need "$@"; VM_MEM=$2; shift 2 ;;
    --cpus|--smp) need "$@"; VM_CPUS=$2; shift 2 ;;
    --timeout) need "$@"; VM_TIMEOUT=$2; shift 2 ;;
    --rw) need "$@"; [ -d "$2" ] || vm_usage_die "--rw $2: not a directory"; VM_RW+=("$(cd "$2" && pwd -P)"); shift 2 ;;
    --qemu-arg) need "$@"; VM_QEMU+=("$2"); shift 2 ;;
    -v|--verbose) VM_VERBOSE=1; shift ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) vm_usage_die "unknown option '$1' (put -- before the command)" ;;
  esac
done
[ $# -gt 0 ] || vm_usage_die "no command given (... -- COMMAND ARGS)"
for n in "$VM_MEM" "$VM_CPUS" "$VM_TIMEOUT"; do vm_is_uint "$n" || vm_usage_die "'$n' is not a number"; done
command -v rdma >/dev/null || vm_die "'rdma' (iproute2) missing on the host: run scripts/install-deps.sh"
[ -e /etc/libibverbs.d/rxe.driver ] || vm_die "librxe provider missing (ibverbs-providers): run scripts/install-deps.sh"

# crc32_generic: without it `rdma link add` only says "failed to add".
VM_PRELUDE='
for m in crc32_generic crc32c_generic configfs veth ib_uverbs rdma_ucm rdma_rxe sch_netem; do
  modprobe $m || vm_setup_fail "modprobe $m"
done
mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config
ip link set lo up
ip link add veth0 type veth peer name veth1 || vm_setup_fail "ip link add veth"
ip addr add 10.99.0.1/24 dev veth0 && ip addr add 10.99.0.2/24 dev veth1 &&
  ip link set veth0 up && ip link set veth1 up || vm_setup_fail "veth addresses"
rdma link add rxe0 type rxe netdev veth0 && rdma link add rxe1 type rxe netdev veth1 ||
  vm_setup_fail "rdma link add rxe"
export RDMA_VM=1 RDMA_VM_IP=10.99.0.1
'
vm_run "$@"
