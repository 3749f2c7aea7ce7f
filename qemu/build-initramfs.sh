#!/bin/bash
# build-initramfs.sh - fill the VM cache (Debian kernel + modules + busybox initramfs)
# ahead of time, e.g. in CI before the tests run in parallel. Prints the paths.
# usage: qemu/build-initramfs.sh [--rebuild]
# Cache: ${VHOST_ISER_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vhost-iser-vm}
set -euo pipefail
VM_PROG=build-initramfs
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/vm-common.sh
. "$HERE/lib/vm-common.sh"
case "${1:-}" in
  --rebuild) rm -rf "${VM_CACHE:?}"/*/ ;;
  -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) vm_usage_die "unknown option '$1'" ;;
esac
T0=$(date +%s)
vm_prepare
echo "kernel:    $VM_KDIR/vmlinuz ($VM_KVER)"
echo "initramfs: $VM_INITRD"
echo "modules:   $VM_KDIR/lib/modules/$VM_KVER ($(du -sh "$VM_KDIR/lib/modules" | cut -f1))"
echo "ready in $(( $(date +%s) - T0 ))s"
