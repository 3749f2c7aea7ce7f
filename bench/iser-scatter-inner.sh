#!/bin/bash
# iser-scatter-inner.sh - runs INSIDE the soft-RoCE VM (qemu/rdma-vm.sh), started by
# bench/iser-scatter.sh. One tgtd with one iSER target and one null LUN (as bench/iser-vm-inner.sh),
# and vhost-iser on iSER in front of it, started fresh for every job with VHOST_ISER_SCATTER set to
# the job's policy. Jobs (the libblkio loadgen, 1 queue):
#   c4k, c64k, c128k         contiguous 4 / 64 / 128 KiB requests (the baselines; policy irrelevant)
#   s32-bounce, s32-split    128 KiB as 32 x 4 KiB separated pieces (--scatter 32)
#   s2-bounce, s2-split      128 KiB as 2 x 64 KiB separated pieces (--scatter 2)
# each as random reads at every depth of $ISER_SCATTER_DEPTHS and random writes at every depth of
# $ISER_SCATTER_WRITE_DEPTHS. Around each measured run (after a warm-up of the same shape): backend
# and tgtd utime+stime from /proc/PID/stat, and the backend's metrics (iSER commands, bytes copied
# through bounce buffers, requests split). Raw results go to $ISER_SCATTER_OUT; the host renders
# them (bench/lib/iser_scatter_report.py). Exit 0 even if a job fails (recorded in status.txt),
# 1 only if the target cannot be set up.
set -uo pipefail
OUT=${ISER_SCATTER_OUT:?ISER_SCATTER_OUT not set}
VI=${ISER_SCATTER_VI:?}   # vhost-iser (absolute host path; the host's / is shared in read-only)
LG=${ISER_SCATTER_LOADGEN:?}
RUNTIME=${ISER_SCATTER_RUNTIME:-15}
DEPTHS=${ISER_SCATTER_DEPTHS:-1 16}
WRITE_DEPTHS=${ISER_SCATTER_WRITE_DEPTHS:-16}
JOBS=${ISER_SCATTER_JOBS:-c4k c64k c128k s32-bounce s32-split s2-bounce s2-split}
WRITE_JOBS=${ISER_SCATTER_WRITE_JOBS:-c128k s32-bounce s32-split s2-bounce s2-split}
IP=${RDMA_VM_IP:-10.99.0.1}
PORT=3260
IQN=iqn.2026-11.vhost-iser:scatter
INIT=iqn.2026-11.vhost-iser:scatter-vhost-iser
SOCK=/tmp/iser-scatter.sock
METRICS=/tmp/iser-scatter.metrics
STATUS=$OUT/status.txt
mkdir -p "$OUT"
: >"$STATUS"
log() { echo "iser-scatter-inner: $(date +%T) $*" >&2; }
status() { echo "$*" >>"$STATUS"; log "$*"; }
# utime and stime (clock ticks, all threads) of a process: fields 14 and 15 of /proc/PID/stat.
ticks() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $12, $13}'; }
for b in "$VI" "$LG"; do
    [ -x "$b" ] || { status "FATAL $b is not executable inside the VM (host path not shared?)"; exit 1; }
done

# --- tgtd: one iSER target, one null LUN ---------------------------------------------------------
setsid tgtd -f --iscsi "portal=$IP:$PORT" --iser "pool_sz_mb=${TGT_POOL_MB:-64}" \
    </dev/null >"$OUT/tgtd.log" 2>&1 &
for _ in $(seq 150); do
    tgtadm --mode target --op show >/dev/null 2>&1 && break
    sleep 0.2
done
tgtadm --mode target --op show >/dev/null 2>&1 || { status "FATAL tgtd did not start"; exit 1; }
tgtd_pid=$(pidof tgtd | awk '{print $1}')
[ -n "$tgtd_pid" ] || { status "FATAL no tgtd pid"; exit 1; }
A=(tgtadm --lld iser)
"${A[@]}" --mode target --op new --tid 1 --targetname "$IQN" || { status "FATAL tgtadm new target"; exit 1; }
"${A[@]}" --mode logicalunit --op new --tid 1 --lun 1 --bstype null --backing-store /dev/null \
    || { status "FATAL tgtadm null lun"; exit 1; }
"${A[@]}" --mode target --op bind --tid 1 --initiator-address ALL
# tgt 1.0.85: iSER logins must match an address ACL and an initiator-name ACL (qemu/README.md).
"${A[@]}" --mode target --op bind --tid 1 --initiator-name "$INIT"
tgtadm --mode target --op show >"$OUT/tgtd-targets.txt" 2>&1
status "target $IQN lun 1: null; tgtd pid $tgtd_pid; $(tgtd --version 2>&1 | head -1)"
getconf CLK_TCK >"$OUT/clk_tck"

shape() { # job -> "policy bs scatter"
    case "$1" in
        c4k) echo "bounce 4096 1" ;;
        c64k) echo "bounce 65536 1" ;;
        c128k) echo "bounce 131072 1" ;;
        s32-bounce) echo "bounce 131072 32" ;;
        s32-split) echo "split 131072 32" ;;
        s2-bounce) echo "bounce 131072 2" ;;
        s2-split) echo "split 131072 2" ;;
    esac
}
# The backend's counters: iSER commands, bytes copied for scattered buffers, requests split.
counters() {
    "$VI" stats --metrics "unix:$METRICS" --raw 2>/dev/null | awk '
        /^vhost_iser_iser_commands_total / {c=$2}
        /^vhost_iser_iser_copied_bytes_total\{reason="scattered"\}/ {b=$2}
        /^vhost_iser_scatter_splits_total / {s=$2}
        END {print c+0, b+0, s+0}'
}
bpid=
stop_backend() {
    [ -n "$bpid" ] || return 0
    kill "$bpid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$bpid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$bpid" 2>/dev/null
    wait "$bpid" 2>/dev/null
    bpid=
}
start_backend() { # $1 policy, $2 log file
    rm -f "$SOCK" "$METRICS"
    env VHOST_ISER_SCATTER="$1" "$VI" --socket "$SOCK" --target "iser://$IP:$PORT/$IQN/1" \
        --initiator-name "$INIT" --queues 1 --queue-size 256 --metrics "unix:$METRICS" \
        --log-level info >"$2" 2>&1 &
    bpid=$!
    local i
    for i in $(seq 300); do
        [ -S "$SOCK" ] && [ -S "$METRICS" ] && return 0
        kill -0 "$bpid" 2>/dev/null || return 1
        sleep 0.2
    done
    return 1
}

run_job() { # $1 job, $2 rw
    local job=$1 rw=$2 policy bs scatter d name
    read -r policy bs scatter <<<"$(shape "$job")"
    [ -n "$policy" ] || { status "FAIL unknown job $job"; return; }
    name="$rw.$job"
    if ! start_backend "$policy" "$OUT/$name.log"; then
        status "FAIL $name: backend did not start: $(tail -3 "$OUT/$name.log" | tr '\n' ' ')"
        stop_backend
        return
    fi
    local lg=("$LG" --socket "$SOCK" --rw "$rw" --bs "$bs" --scatter "$scatter" --size 1073741824 --json)
    if ! timeout 120 "${lg[@]}" --ios 64 --iodepth 4 >"$OUT/$name.warm.json" 2>"$OUT/$name.warm.err"; then
        status "FAIL $name: warm-up failed: $(tr '\n' ' ' <"$OUT/$name.warm.err" | cut -c1-300)"
        stop_backend
        return
    fi
    for d in $DEPTHS_NOW; do
        local b0 t0 c0 b1 t1 c1 rc
        b0=$(ticks "$bpid") t0=$(ticks "$tgtd_pid") c0=$(counters)
        log "$name QD$d ${RUNTIME}s"
        timeout $((RUNTIME + 90)) "${lg[@]}" --iodepth "$d" --runtime "$RUNTIME" \
            >"$OUT/$name.qd$d.json" 2>"$OUT/$name.qd$d.err"
        rc=$?
        b1=$(ticks "$bpid") t1=$(ticks "$tgtd_pid") c1=$(counters)
        # job policy bs scatter rw qd rc | backend utime stime before | after | tgtd before | after
        # | commands copied splits before | after
        echo "$job $policy $bs $scatter $rw $d $rc|$b0|$b1|$t0|$t1|$c0|$c1" >"$OUT/$name.qd$d.raw"
        [ "$rc" = 0 ] || status "FAIL $name QD$d: loadgen rc=$rc: $(tr '\n' ' ' <"$OUT/$name.qd$d.err" | cut -c1-300)"
    done
    stop_backend
    status "done $name ($policy, $bs bytes in $scatter pieces)"
}

DEPTHS_NOW=$DEPTHS
for j in $JOBS; do run_job "$j" randread; done
DEPTHS_NOW=$WRITE_DEPTHS
for j in $WRITE_JOBS; do run_job "$j" randwrite; done
kill -KILL "$tgtd_pid" 2>/dev/null
status "finished"
exit 0
