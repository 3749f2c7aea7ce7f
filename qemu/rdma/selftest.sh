#!/bin/bash
# selftest.sh - proves the soft-RoCE VM and both iSER targets work, using libiscsi's tools.
# usage (host): qemu/rdma-vm.sh -- qemu/rdma/selftest.sh
# Inside the VM: starts tgtd + LIO (start-targets.sh all --size 16), then over iser://
# runs iscsi-inq and iscsi-readcapacity16 against each, and iscsi-inq over TCP to LIO.
# Exit 0 iff every check passes. (No WRITEs: libiscsi -> LIO WRITE needs ImmediateData=No,
# which libiscsi's tools cannot set.)
set -u
D=$(cd "$(dirname "$0")" && pwd)
ts() { echo "selftest: [uptime $(cut -d' ' -f1 /proc/uptime)s] $*"; }
fails=0 passes=0
check() {   # name, command...
  local name=$1 out; shift
  if out=$(timeout 60 "$@" 2>&1); then
    passes=$((passes + 1)); echo "PASS: $name"
  else
    fails=$((fails + 1)); echo "FAIL: $name (rc $?)"; echo "$out" | tail -5 | sed 's/^/    /'
  fi
  LAST_OUT=$out
}
[ "${RDMA_VM:-}" = 1 ] || { echo "selftest: run me inside qemu/rdma-vm.sh"; exit 2; }
ts "start"
exports=$("$D/start-targets.sh" all --size 16) || { echo "FAIL: start-targets.sh"; exit 1; }
eval "$exports"
ts "targets ready"
want=$((16 * 1024 * 1024))
for t in TGT LIO; do
  url_var=${t}_ISER_URL; url=${!url_var}
  check "$t iscsi-inq $url" iscsi-inq "$url"
  echo "$LAST_OUT" | grep -q 'DIRECT_ACCESS' || { fails=$((fails + 1)); echo "FAIL: $t INQUIRY is not a disk"; }
  check "$t iscsi-readcapacity16 $url" iscsi-readcapacity16 "$url"
  size=$(echo "$LAST_OUT" | awk -F: '/Total size/{print $2}')
  [ "$size" = "$want" ] || { fails=$((fails + 1)); echo "FAIL: $t capacity '$size' != $want"; }
done
check "LIO iscsi-inq (TCP) $LIO_TCP_URL" iscsi-inq "$LIO_TCP_URL"
ts "end"
echo "$passes passed, $fails failed"
[ "$fails" = 0 ]
