#!/bin/bash
# install-deps.sh - install every Debian package vhost-iser's build and tests need.
#
# usage: scripts/install-deps.sh [--libvirt] [--check]
#   --libvirt  also install libvirt-daemon-system (libvirt-based tests)
#   --check    only report what is missing; exit 1 if anything is
#
# Idempotent: installed packages are left alone; `apt-get update` runs once,
# only when something has to be installed. Needs root (or sudo) for installing.
set -euo pipefail

PKGS=(
  # VM harness (qemu/): guest + soft-RoCE VM, qemu-storage-daemon, kernel download
  qemu-system-x86 qemu-block-extra qemu-utils kmod cpio iproute2 busybox-static
  # iSCSI / iSER peers and tools
  tgt libiscsi-bin libiscsi-dev fio
  # RDMA user space (rdma-sys build, librxe provider, rping/ibv_devices)
  libibverbs-dev librdmacm-dev ibverbs-providers ibverbs-utils rdmacm-utils
  # bindgen (rdma-sys)
  libclang-dev clang
)
CHECK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --libvirt) PKGS+=(libvirt-daemon-system); shift ;;
    --check) CHECK=1; shift ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-deps: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PKGS[@]} packages present"
  exit 0
fi
if [ "$CHECK" = 1 ]; then
  echo "install-deps: missing: ${missing[*]}" >&2
  exit 1
fi

SUDO=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root to install: ${missing[*]}" >&2; exit 1; }
  SUDO=(sudo)
fi
LOG=$(mktemp "${TMPDIR:-/tmp}/install-deps.XXXXXX.log")
export DEBIAN_FRONTEND=noninteractive
# Wait for other apt/dpkg users instead of failing at once on the lock.
APT=("${SUDO[@]}" apt-get -q -y -o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0)
run() {
  if ! "$@" >>"$LOG" 2>&1; then
    echo "install-deps: FAILED: $*" >&2
    tail -n 25 "$LOG" >&2
    echo "install-deps: full log: $LOG" >&2
    exit 1
  fi
}
echo "install-deps: installing ${missing[*]}"
T0=$(date +%s)
run "${APT[@]}" update
run "${APT[@]}" install --no-install-recommends "${missing[@]}"
rm -f "$LOG"
echo "install-deps: done in $(( $(date +%s) - T0 ))s"
