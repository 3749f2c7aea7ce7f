#!/bin/bash
# faults-inner.sh - runs INSIDE the project's VM (qemu/rdma-vm.sh), as root; driven by
# bench/faults.sh and tests/faults_vm.rs. Fault injection against a real peer:
#
#   [root netns]  libblkio client (vhost-iser-loadgen, write + verify)
#        |        vhost-iser  --target iscsi://10.98.0.2:3260/...
#        |  fh0 10.98.0.1 ---- veth ---- ft0 10.98.0.2   [netns "ftgt"]  tgtd (TCP), LUN on /dev/shm
#
# For each kind in FAULTS_PLAN ("kind:count ...") it starts a fresh vhost-iser (timers of that
# kind), runs one loadgen job (randrw 4k, --verify with a new seed, per-10-ms completion
# timeline, backing file checked block by block at the end), and, once the job's main phase has
# started, injects the fault `count` times: FAULTS_GAP s of normal I/O, the fault for
# FAULTS_HOLD s, the fault removed. Kinds:
#   loss5 loss20   tc netem loss 5 % / 20 % on both veth ends (both directions)
#   delay          tc netem delay 100ms 50ms (normal jitter) on both ends
#   reorder        tc netem delay 10ms reorder 25% 50% on both ends
#   dup            tc netem duplicate 20% on both ends
#   link           ip link set fh0 down ... up
#   kill           kill -9 tgtd ... tgtd restarted and its target configured again
#   stop           kill -STOP tgtd ... -CONT (NOP-Out timeout drops the connection)
#   ladder         kill -STOP tgtd ... -CONT with long NOP timers: command timeout -> ABORT TASK
#                  -> LUN RESET -> connection dropped
# Outputs in FAULTS_OUT: KIND.lg.json (loadgen report with timeline), KIND.vi.log (backend log),
# KIND.inj.jsonl (one line per injection: start/end wall-clock times), KIND.tgtd.log, env.txt.
# bench/lib/faults_report.py turns them into the table. Knobs (env): FAULTS_PLAN, FAULTS_HOLD (s
# each fault lasts, default 3), FAULTS_GAP (s of normal I/O before each fault and after the last,
# default 3), FAULTS_QUEUES (2), FAULTS_IODEPTH (8), FAULTS_SIZE_MB (LUN and range, 8).
# Exit: 0 = every job ran (the report decides pass/fail); 1 = setup failed or a job did not run.
set -uo pipefail
die() { echo "faults-inner: error: $*" >&2; exit 1; }
log() { echo "faults-inner: $(date -u +%T.%3N) $*" >&2; }

OUT=${FAULTS_OUT:?FAULTS_OUT}
VI=${FAULTS_VI:?FAULTS_VI}
LG=${FAULTS_LG:?FAULTS_LG}
PLAN=${FAULTS_PLAN:-"loss5:1 loss20:1 delay:1 reorder:1 dup:1 link:1 kill:1 stop:1 ladder:1"}
HOLD=${FAULTS_HOLD:-3}
GAP=${FAULTS_GAP:-3}
QUEUES=${FAULTS_QUEUES:-2}
IODEPTH=${FAULTS_IODEPTH:-8}
SIZE_MB=${FAULTS_SIZE_MB:-8}
IQN=iqn.2026-11.vhost-iser:faults
NS=ftgt
HOST_IP=10.98.0.1 TGT_IP=10.98.0.2 PORT=3260
IMG=/dev/shm/faults-lun.img
TGTD_PID=
VI_PID=

[ "$(id -u)" = 0 ] || die "must run as root inside the VM"
[ -x "$VI" ] && [ -x "$LG" ] || die "$VI or $LG is not executable"
command -v tgtd >/dev/null && command -v tgtadm >/dev/null || die "tgtd/tgtadm missing (scripts/install-deps.sh)"
mkdir -p "$OUT" /var/run/tgtd

cleanup() {
  [ -n "$VI_PID" ] && kill -9 "$VI_PID" 2>/dev/null
  [ -n "$TGTD_PID" ] && { kill -CONT "$TGTD_PID"; kill -9 "$TGTD_PID"; } 2>/dev/null
  ip netns del "$NS" 2>/dev/null
  ip link del fh0 2>/dev/null
  true
}
trap cleanup EXIT

# --- network: a namespace for tgtd, joined by a veth pair; netem must work ---
modprobe sch_netem || die "modprobe sch_netem failed"
ip netns add "$NS" || die "ip netns add"
ip link add fh0 type veth peer name ft0 || die "ip link add veth"
ip link set ft0 netns "$NS" || die "move ft0"
ip addr add "$HOST_IP/24" dev fh0 && ip link set fh0 up || die "fh0 address"
ip netns exec "$NS" sh -c "ip link set lo up && ip addr add $TGT_IP/24 dev ft0 && ip link set ft0 up" || die "ft0 address"
tc qdisc add dev fh0 root netem delay 1ms || die "tc netem does not work in the VM (sch_netem)"
tc qdisc del dev fh0 root
{ uname -r; tc -V; tgtd --version 2>&1 | head -1; nproc; } >"$OUT/env.txt" 2>&1

netem_both() { # netem_both add|del ARGS...: the same qdisc on both ends (both directions)
  local op=$1; shift
  tc qdisc "$op" dev fh0 root ${1:+netem} "$@" && ip netns exec "$NS" tc qdisc "$op" dev ft0 root ${1:+netem} "$@"
}

tgtd_up() {
  local i
  rm -f /var/run/tgtd/socket.0 /var/run/tgtd/socket.0.lock
  ip netns exec "$NS" setsid tgtd -f --iscsi "portal=$TGT_IP:$PORT" </dev/null >>"$OUT/$KIND.tgtd.log" 2>&1 &
  TGTD_PID=$!
  for i in $(seq 1 300); do
    tgtadm --mode target --op show >/dev/null 2>&1 && break
    kill -0 "$TGTD_PID" 2>/dev/null || { tail "$OUT/$KIND.tgtd.log" >&2; die "tgtd exited"; }
    sleep 0.05
  done
  tgtadm --lld iscsi --mode target --op new --tid 1 -T "$IQN" &&
    tgtadm --lld iscsi --mode logicalunit --op new --tid 1 --lun 1 --bstype rdwr --backing-store "$IMG" &&
    tgtadm --lld iscsi --mode target --op bind --tid 1 -I ALL || die "tgtadm configuration failed"
  TGT_READY_AT=$(now)
  for i in $(seq 1 100); do # listening inside the namespace?
    ip netns exec "$NS" ss -ltn "sport = :$PORT" | grep -q LISTEN && return 0
    sleep 0.05
  done
  die "tgtd does not listen on $TGT_IP:$PORT"
}

tgtd_down() {
  [ -n "$TGTD_PID" ] || return 0
  kill -CONT "$TGTD_PID" 2>/dev/null; kill -9 "$TGTD_PID" 2>/dev/null
  wait "$TGTD_PID" 2>/dev/null
  TGTD_PID=
}

now() { date +%s.%N; }

# Backend timers per kind: short, so every recovery happens within seconds.
timeouts_for() {
  case "$1" in
    ladder) echo "nop=60,nop_timeout=60,command=1,tmf=0.5,replacement=30" ;;
    *) echo "nop=1,nop_timeout=1,command=5,tmf=2,replacement=30" ;;
  esac
}

inject() { # inject KIND on|off
  case "$1:$2" in
    loss5:on) netem_both add loss 5% ;;
    loss20:on) netem_both add loss 20% ;;
    delay:on) netem_both add delay 100ms 50ms distribution normal ;;
    reorder:on) netem_both add delay 10ms reorder 25% 50% ;;
    dup:on) netem_both add duplicate 20% ;;
    loss5:off | loss20:off | delay:off | reorder:off | dup:off) netem_both del ;;
    link:on) ip link set fh0 down ;;
    link:off) ip link set fh0 up ;;
    kill:on) tgtd_down ;;
    kill:off) tgtd_up ;;
    stop:on | ladder:on) kill -STOP "$TGTD_PID" ;;
    stop:off | ladder:off) kill -CONT "$TGTD_PID" ;;
    *) die "unknown fault kind '$1'" ;;
  esac
}

truncate -s "${SIZE_MB}M" "$IMG" || die "cannot create $IMG"
KIND=setup
tgtd_up
log "tgtd up in netns $NS at $TGT_IP:$PORT; netem works; plan: $PLAN; hold ${HOLD}s gap ${GAP}s"

failed=0
for item in $PLAN; do
  KIND=${item%%:*} COUNT=${item#*:}
  [[ "$COUNT" =~ ^[0-9]+$ ]] || die "bad plan item '$item' (kind:count)"
  case "$KIND" in loss5 | loss20 | delay | reorder | dup | link | kill | stop | ladder) ;; *) die "unknown fault kind '$KIND'" ;; esac
  [ -n "$TGTD_PID" ] && kill -0 "$TGTD_PID" 2>/dev/null || tgtd_up
  sock=/run/faults-$KIND.sock
  rm -f "$sock" "$OUT/$KIND.ready" "$OUT/$KIND.inj.jsonl"
  "$VI" --socket "$sock" --target "iscsi://$TGT_IP:$PORT/$IQN/1" --queues "$QUEUES" \
    --timeouts "$(timeouts_for "$KIND")" --log-level info >"$OUT/$KIND.vi.log" 2>&1 &
  VI_PID=$!
  for _ in $(seq 1 300); do [ -S "$sock" ] && break; sleep 0.05; done
  [ -S "$sock" ] || { cat "$OUT/$KIND.vi.log" >&2; die "vhost-iser did not start"; }
  # The job runs until the stop file appears (GAP s after the last fault); --runtime is a bound.
  rm -f "$OUT/$KIND.stop"
  log "$KIND: $COUNT injection(s)"
  "$LG" --socket "$sock" --queues "$QUEUES" --iodepth "$IODEPTH" --rw randrw --bs 4k \
    --size "${SIZE_MB}m" --runtime 900 --stop-file "$OUT/$KIND.stop" \
    --verify --timeline --ready-file "$OUT/$KIND.ready" \
    --check-file "$IMG" --json >"$OUT/$KIND.lg.json" 2>"$OUT/$KIND.lg.err" &
  lg=$!
  for _ in $(seq 1 1200); do [ -e "$OUT/$KIND.ready" ] && break; kill -0 $lg 2>/dev/null || break; sleep 0.05; done
  if [ -e "$OUT/$KIND.ready" ]; then
    for i in $(seq 1 "$COUNT"); do
      sleep "$GAP"
      kill -0 $lg 2>/dev/null || { log "$KIND: loadgen ended early"; break; }
      t0=$(now); inject "$KIND" on; t1=$(now)
      sleep "$HOLD"
      t2=$(now); inject "$KIND" off; t3=$(now)
      # End of the fault: removal started; for kill, tgtd restarted and configured.
      end=$t2; [ "$KIND" = kill ] && end=$TGT_READY_AT
      printf '{"kind":"%s","n":%d,"start":%s,"applied":%s,"removing":%s,"end":%s,"removed":%s,"hold_s":%s}\n' \
        "$KIND" "$i" "$t0" "$t1" "$t2" "$end" "$t3" "$HOLD" >>"$OUT/$KIND.inj.jsonl"
      log "$KIND #$i: fault from $t0 to $end"
    done
    sleep "$GAP"
    touch "$OUT/$KIND.stop"
  else
    log "$KIND: the loadgen main phase never started"; failed=1
    kill $lg 2>/dev/null
  fi
  wait $lg; rc=$?
  log "$KIND: loadgen exit $rc"
  [ "$rc" -le 1 ] || { failed=1; cat "$OUT/$KIND.lg.err" >&2; }
  kill -TERM "$VI_PID" 2>/dev/null
  for _ in $(seq 1 100); do kill -0 "$VI_PID" 2>/dev/null || break; sleep 0.05; done
  kill -9 "$VI_PID" 2>/dev/null
  wait "$VI_PID" 2>/dev/null
  VI_PID=
done
exit $failed
