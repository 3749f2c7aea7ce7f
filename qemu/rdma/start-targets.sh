#!/bin/bash
# start-targets.sh - run INSIDE the rdma VM (qemu/rdma-vm.sh). Starts iSER targets with a
# RAM-backed (/dev/shm) LUN and prints shell `export` lines describing them:
#     eval "$(qemu/rdma/start-targets.sh [tgt|lio|all] [--size MB])"
#
#   tgt: tgtd --lld iser, portal 10.99.0.1:3260, LUN 1  -> TGT_PORTAL TGT_IQN TGT_LUN TGT_BACKING
#        TGT_ISER_URL TGT_INITIATOR (a name tgtd admits)
#   lio: LIO + ib_isert, portal 10.99.0.1:3261 (iSER; TCP too), LUN 0 -> LIO_PORTAL LIO_IQN
#        LIO_LUN LIO_BACKING LIO_ISER_URL LIO_TCP_URL
#   all: both (default). --size: LUN size in MiB (default 64).
# tgt 1.0.85 admits iSER logins only from listed initiator names (see README): the
# project's names and libiscsi tools' defaults are bound; add more, space-separated,
# in TGT_EXTRA_INITIATORS. LIO accepts any initiator (demo mode, no auth).
# libiscsi -> LIO needs ImmediateData=No (+ InitialR2T=Yes) for WRITEs; see qemu/README.md.
# Logs: /tmp/tgtd.log. Exit 1 with a message on stderr if a target cannot be set up.
set -uo pipefail
die() { echo "start-targets: error: $*" >&2; exit 1; }
log() { echo "start-targets: $*" >&2; }

WHICH=all SIZE_MB=64
while [ $# -gt 0 ]; do
  case "$1" in
    tgt|lio|all) WHICH=$1; shift ;;
    --size) [[ "${2:-}" =~ ^[0-9]+$ ]] || die "--size needs MiB"; SIZE_MB=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done
[ "$(id -u)" = 0 ] || die "must run as root inside the rdma VM"
rdma link show 2>/dev/null | grep -q 'rxe0.*ACTIVE' || die "rxe0 is not active (run this inside qemu/rdma-vm.sh)"

IP=${RDMA_VM_IP:-10.99.0.1}
TGT_IQN=iqn.2026-11.vhost-iser:tgt
LIO_IQN=iqn.2026-11.vhost-iser:lio
TGT_INITIATOR=iqn.2026-11.vhost-iser:initiator
TGT_INITIATORS="$TGT_INITIATOR iqn.2026-11.vhost-iser:kernel-initiator
 iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-inq iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-ls
 iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-readcapacity16 iqn.2010-11.libiscsi:iscsi-perf
 iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2
 ${TGT_EXTRA_INITIATORS:-}"

start_tgt() {
  local img=/dev/shm/tgt-lun1.img pid i
  command -v tgtd >/dev/null || die "tgtd not installed (scripts/install-deps.sh)"
  truncate -s "${SIZE_MB}M" "$img" || die "cannot create $img"
  # iSER listens on every RDMA device at port 3260 (RDMA CM port space). The default
  # 1 GiB registered buffer pool fails to allocate in a small VM: 64 MiB is plenty.
  setsid tgtd -f ${TGTD_DEBUG:+-d 1} --iscsi "portal=$IP:3260" --iser "pool_sz_mb=${TGT_POOL_MB:-64}" \
    </dev/null >/tmp/tgtd.log 2>&1 &
  pid=$!
  for i in $(seq 1 300); do
    tgtadm --mode target --op show >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || { cat /tmp/tgtd.log >&2; die "tgtd exited"; }
    sleep 0.2
  done
  tgtadm --mode target --op show >/dev/null 2>&1 || { tail -20 /tmp/tgtd.log >&2; die "tgtd did not answer tgtadm within 60 s"; }
  A=(tgtadm --lld iser)
  "${A[@]}" --mode target --op new --tid 1 --targetname "$TGT_IQN" || die "tgtadm: new target"
  "${A[@]}" --mode logicalunit --op new --tid 1 --lun 1 --backing-store "$img" --bstype rdwr || die "tgtadm: new lun"
  "${A[@]}" --mode target --op bind --tid 1 --initiator-address ALL || die "tgtadm: bind ALL"
  # tgt <= 1.0.88: an iSER login must match an address ACL AND an initiator-name ACL
  # (fixed upstream in b73c64d), otherwise "Target not found" (login status 02/03).
  for i in $TGT_INITIATORS; do
    "${A[@]}" --mode target --op bind --tid 1 --initiator-name "$i" || die "tgtadm: bind $i"
  done
  log "tgtd: $TGT_IQN at iser://$IP:3260 lun 1 (${SIZE_MB} MiB, $img, log /tmp/tgtd.log)"
  echo "export TGT_PORTAL=$IP:3260 TGT_IQN=$TGT_IQN TGT_LUN=1 TGT_BACKING=$img"
  echo "export TGT_ISER_URL=iser://$IP:3260/$TGT_IQN/1 TGT_INITIATOR=$TGT_INITIATOR"
}

start_lio() {
  local C=/sys/kernel/config/target img=/dev/shm/lio-lun0.img m T
  for m in configfs target_core_mod target_core_file iscsi_target_mod ib_isert; do
    modprobe "$m" || die "modprobe $m failed"
  done
  mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config || die "cannot mount configfs"
  [ -d "$C/iscsi" ] || mkdir "$C/iscsi" || die "LIO iscsi fabric missing in configfs"
  truncate -s "${SIZE_MB}M" "$img" || die "cannot create $img"
  mkdir -p "$C/core/fileio_0/lun0" || die "configfs: backstore"
  echo "fd_dev_name=$img,fd_dev_size=$((SIZE_MB * 1024 * 1024))" >"$C/core/fileio_0/lun0/control" || die "configfs: backstore control"
  echo 1 >"$C/core/fileio_0/lun0/enable" || die "configfs: enable backstore"
  T=$C/iscsi/$LIO_IQN/tpgt_1
  mkdir -p "$T/lun/lun_0" || die "configfs: tpg"
  ln -s "$C/core/fileio_0/lun0" "$T/lun/lun_0/lun0" || die "configfs: lun link"
  mkdir "$T/np/$IP:3261" || die "configfs: portal $IP:3261"
  echo 1 >"$T/np/$IP:3261/iser" || die "configfs: enabling iser on the portal failed (ib_isert? rxe?)"
  echo 0 >"$T/attrib/authentication"
  echo 1 >"$T/attrib/generate_node_acls"     # demo mode: any initiator name
  echo 1 >"$T/attrib/cache_dynamic_acls"
  echo 0 >"$T/attrib/demo_mode_write_protect"
  echo 1 >"$T/enable" || die "configfs: enable tpg"
  log "LIO: $LIO_IQN at iser://$IP:3261 lun 0 (${SIZE_MB} MiB, $img)"
  echo "export LIO_PORTAL=$IP:3261 LIO_IQN=$LIO_IQN LIO_LUN=0 LIO_BACKING=$img"
  echo "export LIO_ISER_URL=iser://$IP:3261/$LIO_IQN/0 LIO_TCP_URL=iscsi://$IP:3261/$LIO_IQN/0"
}

T0=$(date +%s.%N)
case "$WHICH" in
  tgt) start_tgt ;;
  lio) start_lio ;;
  all) start_lio; start_tgt ;;
esac
log "ready in $(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
