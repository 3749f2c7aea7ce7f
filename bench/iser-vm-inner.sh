#!/bin/bash
# iser-vm-inner.sh - runs INSIDE the soft-RoCE VM (qemu/rdma-vm.sh), started by bench/iser-vm.sh.
# One tgtd (iSER on every RDMA device + iSCSI/TCP on 10.99.0.1:3260), one null LUN, and the same
# libblkio client (vhost-iser-loadgen) against each backend in turn:
#   vi-iser   vhost-iser --target iser://10.99.0.1:3260/IQN/1
#   vi-tcp    vhost-iser --target iscsi://10.99.0.1:3260/IQN/1
#   qsd-iser  qemu-storage-daemon --blockdev driver=iscsi,transport=iser,... (libiscsi)
#   qsd-tcp   the same with transport=tcp
# Throughput: 4 KiB randread at each depth for RUNTIME s, backend utime+stime from /proc/PID/stat.
# Instructions: each CG backend under valgrind --tool=callgrind; per CG depth, callgrind_control
# --dump after a warm-up, after N1 and after N2 more I/Os: (Ir(N2) - Ir(N1)) / (N2 - N1) is per
# I/O, with start-up, login and the client's connect/disconnect cancelled out. Raw results go to $ISER_VM_OUT (the host renders them); exit 0 even if a
# backend fails (recorded in $ISER_VM_OUT/status.txt), 1 only if the target cannot be set up.
set -uo pipefail
OUT=${ISER_VM_OUT:?ISER_VM_OUT not set}
VI=${ISER_VM_VI:?}          # vhost-iser binary
VI_CG=${ISER_VM_VI_CG:-$VI} # vhost-iser for callgrind (debug info stripped: faster start)
LG=${ISER_VM_LOADGEN:?}
RUNTIME=${ISER_VM_RUNTIME:-10}
DEPTHS=${ISER_VM_DEPTHS:-1 16}
BACKENDS=${ISER_VM_BACKENDS:-vi-iser vi-tcp qsd-iser qsd-tcp}
CG_BACKENDS=${ISER_VM_CG_BACKENDS:-vi-iser vi-tcp qsd-iser}
CG_WARM=${ISER_VM_CG_WARM:-50}
CG_N1=${ISER_VM_CG_N1:-100}
CG_N2=${ISER_VM_CG_N2:-500}
CG_DEPTHS=${ISER_VM_CG_DEPTHS:-1 16}
CG_TIMEOUT=${ISER_VM_CG_TIMEOUT:-150}
IP=${RDMA_VM_IP:-10.99.0.1}
PORT=3260
IQN=iqn.2026-11.vhost-iser:bench
INIT_VI=iqn.2026-11.vhost-iser:bench-vhost-iser
INIT_QSD=iqn.2026-11.vhost-iser:bench-qsd
SOCK=/tmp/iser-vm-bench.sock
TCP_IQN=$IQN
STATUS=$OUT/status.txt
mkdir -p "$OUT"
: >"$STATUS"
log() { echo "iser-vm-inner: $(date +%T) $*" >&2; }
status() { echo "$*" >>"$STATUS"; log "$*"; }
# utime and stime (clock ticks, all threads) of a process: fields 14 and 15 of /proc/PID/stat.
ticks() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $12, $13}'; }

# --- tgtd: one target, one null LUN, iSER + TCP ------------------------------------------------
setsid tgtd -f --iscsi "portal=$IP:$PORT" --iser "pool_sz_mb=${TGT_POOL_MB:-64}" \
    </dev/null >"$OUT/tgtd.log" 2>&1 &
tgtd_pid=$!
for _ in $(seq 150); do
    tgtadm --mode target --op show >/dev/null 2>&1 && break
    sleep 0.2
done
tgtadm --mode target --op show >/dev/null 2>&1 || { status "FATAL tgtd did not start"; exit 1; }
A=(tgtadm --lld iser)
"${A[@]}" --mode target --op new --tid 1 --targetname "$IQN" || { status "FATAL tgtadm new target"; exit 1; }
lun_kind=null
if ! "${A[@]}" --mode logicalunit --op new --tid 1 --lun 1 --bstype null --backing-store /dev/null; then
    lun_kind="rdwr file /dev/shm/bench.img (null LUN refused)"
    truncate -s 1G /dev/shm/bench.img
    "${A[@]}" --mode logicalunit --op new --tid 1 --lun 1 --bstype rdwr --backing-store /dev/shm/bench.img \
        || { status "FATAL tgtadm new lun"; exit 1; }
fi
"${A[@]}" --mode target --op bind --tid 1 --initiator-address ALL
# tgt 1.0.85: iSER logins must match an address ACL and an initiator-name ACL (qemu/README.md).
for i in "$INIT_VI" "$INIT_QSD"; do "${A[@]}" --mode target --op bind --tid 1 --initiator-name "$i"; done
tgtadm --mode target --op show >"$OUT/tgtd-targets.txt" 2>&1
status "target $IQN lun 1: $lun_kind; tgtd $(tgtd --version 2>&1 | head -1)"
ss -ltn >"$OUT/listen.txt" 2>&1
# TCP to the target created under lld iser: check with libiscsi first.
if iscsi-inq -i "$INIT_VI" "iscsi://$IP:$PORT/$IQN/1" >"$OUT/tcp-inq.txt" 2>&1; then
    status "TCP login to the same target: ok"
else
    # tgt keeps targets per transport (lld): TCP needs its own target, with its own null LUN.
    TCP_IQN=$IQN-tcp
    B=(tgtadm --lld iscsi)
    if "${B[@]}" --mode target --op new --tid 2 --targetname "$TCP_IQN" &&
        "${B[@]}" --mode logicalunit --op new --tid 2 --lun 1 --bstype null --backing-store /dev/null &&
        "${B[@]}" --mode target --op bind --tid 2 --initiator-address ALL &&
        iscsi-inq -i "$INIT_VI" "iscsi://$IP:$PORT/$TCP_IQN/1" >"$OUT/tcp-inq2.txt" 2>&1; then
        status "TCP: target 1 (lld iser) is not reachable over TCP; target 2 $TCP_IQN (lld iscsi, null LUN) is"
        echo "separate TCP target $TCP_IQN (lld iscsi), also a null LUN" >"$OUT/tcp_target"
    else
        status "FAIL TCP target: neither target 1 nor a separate lld-iscsi target answers iscsi-inq"
    fi
    tgtadm --mode target --op show >"$OUT/tgtd-targets.txt" 2>&1
fi
echo "$lun_kind" >"$OUT/lun_kind"

url_of() {
    case "$1" in
        vi-iser) echo "iser://$IP:$PORT/$IQN/1" ;;
        vi-tcp) echo "iscsi://$IP:$PORT/$TCP_IQN/1" ;;
        vi-iser-poll0) echo "iser://$IP:$PORT/$IQN/1" ;;
    esac
}
qsd_iqn() { if [ "$1" = qsd-tcp ]; then echo "$TCP_IQN"; else echo "$IQN"; fi; }
backend_cmd() { # $1 backend, $2 vhost-iser binary
    case "$1" in
        vi-*) echo "$2 --socket $SOCK --target $(url_of "$1") --initiator-name $INIT_VI --queues 1 --queue-size 256 --log-level info" ;;
        qsd-iser | qsd-tcp)
            echo "qemu-storage-daemon --blockdev driver=iscsi,node-name=n0,transport=${1#qsd-},portal=$IP:$PORT,target=$(qsd_iqn "$1"),lun=1,initiator-name=$INIT_QSD --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1" ;;
    esac
}
bpid=
wait_sock() { # $1 pid, $2 seconds
    local i
    for i in $(seq $(($2 * 5))); do
        [ -S "$SOCK" ] && return 0
        kill -0 "$1" 2>/dev/null || return 1
        sleep 0.2
    done
    return 1
}
stop_backend() {
    [ -n "$bpid" ] || return 0
    kill "$bpid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$bpid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$bpid" 2>/dev/null
    wait "$bpid" 2>/dev/null
    bpid=
}
lg() { "$LG" --socket "$SOCK" --rw randread --bs 4096 --size 1073741824 --json "$@"; }

# --- throughput + CPU ---------------------------------------------------------------------------
for b in $BACKENDS; do
    cmd=$(backend_cmd "$b" "$VI")
    echo "$cmd" >"$OUT/cmd.$b"
    rm -f "$SOCK"
    # shellcheck disable=SC2086
    env VHOST_ISER_REPORT_EVERY=1000 $cmd >"$OUT/$b.log" 2>&1 &
    bpid=$!
    if ! wait_sock "$bpid" 60; then
        status "FAIL $b: backend did not start (socket missing after 60 s)"
        stop_backend
        continue
    fi
    if ! timeout 60 "$LG" --socket "$SOCK" --rw randread --bs 4096 --size 1073741824 --ios 200 --iodepth 4 --json \
        >"$OUT/$b.warm.json" 2>"$OUT/$b.warm.err"; then
        status "FAIL $b: warm-up reads failed: $(tr '\n' ' ' <"$OUT/$b.warm.err" | cut -c1-300)"
        stop_backend
        continue
    fi
    for d in $DEPTHS; do
        t0=$(ticks "$bpid")
        log "$b QD$d ${RUNTIME}s"
        timeout $((RUNTIME + 60)) "$LG" --socket "$SOCK" --rw randread --bs 4096 --size 1073741824 \
            --iodepth "$d" --runtime "$RUNTIME" --json >"$OUT/$b.qd$d.json" 2>"$OUT/$b.qd$d.err"
        rc=$?
        t1=$(ticks "$bpid")
        echo "$t0 $t1 $rc" >"$OUT/$b.qd$d.ticks"
        [ "$rc" = 0 ] || status "FAIL $b QD$d: loadgen rc=$rc: $(tr '\n' ' ' <"$OUT/$b.qd$d.err" | cut -c1-300)"
    done
    stop_backend
    status "done $b"
done
getconf CLK_TCK >"$OUT/clk_tck"

# --- callgrind: instructions per I/O ------------------------------------------------------------
for b in $CG_BACKENDS; do
    cmd=$(backend_cmd "$b" "$VI_CG")
    rm -f "$SOCK" "$OUT/cg.$b.out"*
    t_start=$(date +%s)
    # shellcheck disable=SC2086
    # vi-iser-poll0: vhost-iser on iSER without its adaptive CQ polling window.
    extra=
    [ "$b" = vi-iser-poll0 ] && extra=VHOST_ISER_POLL_US=0
    env VHOST_ISER_REPORT_EVERY=100 $extra valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.$b.out" \
        $cmd >"$OUT/cg.$b.log" 2>&1 &
    bpid=$!
    if ! wait_sock "$bpid" "$CG_TIMEOUT"; then
        status "FAIL callgrind $b: backend did not start under valgrind within $CG_TIMEOUT s"
        stop_backend
        continue
    fi
    log "callgrind $b: up after $(($(date +%s) - t_start)) s"
    ok=1
    phases=
    for d in $CG_DEPTHS; do phases="$phases warm$d:$CG_WARM:$d n1qd$d:$CG_N1:$d n2qd$d:$CG_N2:$d"; done
    for phase in $phases; do
        IFS=: read -r p n d <<<"$phase"
        t0=$(date +%s.%N)
        if ! timeout "$CG_TIMEOUT" "$LG" --socket "$SOCK" --rw randread --bs 4096 --size 1073741824 \
            --ios "$n" --iodepth "$d" --json >"$OUT/cg.$b.$p.json" 2>"$OUT/cg.$b.$p.err"; then
            status "FAIL callgrind $b: $p ($n I/Os) failed: $(tr '\n' ' ' <"$OUT/cg.$b.$p.err" | cut -c1-300)"
            ok=
            break
        fi
        if ! timeout 60 callgrind_control --dump="$p" "$bpid" >"$OUT/cg.$b.$p.ctl" 2>&1; then
            status "FAIL callgrind $b: callgrind_control -d after $p: $(tr '\n' ' ' <"$OUT/cg.$b.$p.ctl" | cut -c1-300)"
            ok=
            break
        fi
        log "callgrind $b: $p $n I/Os in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
    done
    stop_backend
    [ -n "$ok" ] && status "done callgrind $b"
done
kill -KILL -- "-$tgtd_pid" 2>/dev/null
status "finished"
exit 0
