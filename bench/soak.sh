#!/usr/bin/env bash
# Soak test: vhost-iser over iSCSI/TCP to a private tgtd on 127.0.0.1, a
# libblkio client (bench/loadgen) doing verified random read/write in rounds,
# and tgtd killed (SIGKILL) and restarted on the same port every
# --kill-every seconds. Bounded: stops after --duration seconds (default 600).
#
# Reports: I/Os, errors, verify mismatches, recoveries (reconnects logged by
# vhost-iser) and vhost-iser's RSS at start and end (a leak shows as growth).
#
#   bench/soak.sh [--duration 600] [--round 20] [--kill-every 60] [--queues 2] [--iodepth 16]
#                 [--out-prefix bench/results/soak]
#
# Memory: VmRSS and the Anonymous total of /proc/PID/smaps_rollup are sampled
# after every round (the client has disconnected then, so its shared buffers
# are unmapped and each sample is the backend's own memory). "Start" is the
# sample after the first clean round that follows the first tgtd kill, i.e.
# after one complete fault cycle (loss, reconnect, re-issue, normal I/O):
# the first connection of a client, the first reconnect's login helper thread
# (its stack, glibc's stack cache and its malloc arena) and the first re-issue
# allocate once and are kept for reuse; counting them as growth would call a
# warm-up a leak. "End" is the last sample. The growth end/start must stay
# below 1 % (printed as PASS/FAIL; every sample is kept in the report).
#
# Exit status: 0 when every round verified, no I/O error reached the client
# and RSS grew less than 1 %; 1 otherwise. Needs tgt (tgtd, tgtadm), root.
set -euo pipefail

DURATION=600 ROUND=20 KILL_EVERY=60 QUEUES=2 IODEPTH=16 SIZE=$((256 << 20)) OUT_PREFIX=
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift 2 ;;
    --round) ROUND=$2; shift 2 ;;
    --kill-every) KILL_EVERY=$2; shift 2 ;;
    --queues) QUEUES=$2; shift 2 ;;
    --iodepth) IODEPTH=$2; shift 2 ;;
    --out-prefix) OUT_PREFIX=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
command -v tgtd >/dev/null || { echo "tgtd not found (Debian package tgt): scripts/install-deps.sh" >&2; exit 2; }
cargo build --release --quiet
cargo build --release --quiet --manifest-path bench/loadgen/Cargo.toml
VHOST=$ROOT/target/release/vhost-iser
LOADGEN=
for c in "$ROOT"/bench/loadgen/target/release/vhost-iser-loadgen "$ROOT"/target/release/vhost-iser-loadgen; do
  if [ -x "$c" ]; then LOADGEN=$c; break; fi
done
[ -n "$LOADGEN" ] || { echo "vhost-iser-loadgen not built" >&2; exit 2; }

WORK=$(mktemp -d /tmp/vhost-iser-soak.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
CTL=$((1000 + PORT % 31000))
IQN=iqn.2026-11.vhost-iser.soak:disk
IMG=/dev/shm/vhost-iser-soak-$$.img
TGTD_PID= VHOST_PID=
mkdir -p /var/run/tgtd

cleanup() {
  [ -n "$VHOST_PID" ] && kill "$VHOST_PID" 2>/dev/null || true
  [ -n "$TGTD_PID" ] && kill -9 "$TGTD_PID" 2>/dev/null || true
  rm -f "$IMG" "/var/run/tgtd/socket.$CTL" "/var/run/tgtd/socket.$CTL.lock"
  echo "logs kept in $WORK"
}
trap cleanup EXIT

start_tgtd() {
  rm -f "/var/run/tgtd/socket.$CTL" "/var/run/tgtd/socket.$CTL.lock"
  tgtd -f -C "$CTL" --iscsi "portal=127.0.0.1:$PORT" >>"$WORK/tgtd.log" 2>&1 &
  TGTD_PID=$!
  for _ in $(seq 100); do
    tgtadm -C "$CTL" --lld iscsi --mode sys --op show >/dev/null 2>&1 && break
    sleep 0.05
  done
  tgtadm -C "$CTL" --lld iscsi --mode target --op new --tid 1 -T "$IQN"
  tgtadm -C "$CTL" --lld iscsi --mode logicalunit --op new --tid 1 --lun 1 --bstype rdwr --backing-store "$IMG"
  tgtadm -C "$CTL" --lld iscsi --mode target --op bind --tid 1 -I ALL
}

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
anon_kib() { awk '/^Anonymous/ {print $2}' "/proc/$1/smaps_rollup"; }

truncate -s "$SIZE" "$IMG"
start_tgtd
VHOST_ISER_TIMEOUTS="nop=2,nop_timeout=3,command=20,replacement=30" \
  "$VHOST" --socket "$WORK/vhost.sock" --target "iscsi://127.0.0.1:$PORT/$IQN/1" \
  --queues "$QUEUES" >"$WORK/vhost-iser.log" 2>&1 &
VHOST_PID=$!
for _ in $(seq 200); do [ -S "$WORK/vhost.sock" ] && break; sleep 0.05; done
[ -S "$WORK/vhost.sock" ] || { cat "$WORK/vhost-iser.log"; exit 1; }

RSS_IDLE=$(rss_kib "$VHOST_PID")
RSS_START= ANON_START= WARM_ROUND= SAMPLES=
START=$(date +%s)
NEXT_KILL=$((START + KILL_EVERY))
ROUNDS=0 IOS=0 ERRORS=0 MISMATCHES=0 KILLS=0 FAILED_ROUNDS=0
while [ $(( $(date +%s) - START )) -lt "$DURATION" ]; do
  LEFT=$((DURATION - ($(date +%s) - START)))
  R=$(( LEFT < ROUND ? LEFT : ROUND ))
  [ "$R" -ge 2 ] || break
  # The killer runs beside the round: tgtd down for 3 s in the middle of it.
  KILLED=0
  if [ "$(date +%s)" -ge "$NEXT_KILL" ]; then
    ( sleep $((R / 3)); kill -9 "$TGTD_PID"; sleep 3; echo restart >"$WORK/restart.flag" ) &
    KILLER=$!
    KILLED=1
  fi
  "$LOADGEN" --socket "$WORK/vhost.sock" --queues "$QUEUES" --iodepth "$IODEPTH" \
    --rw randrw --bs 4k --size $((64 << 20)) --runtime "$R" --verify --json \
    >"$WORK/round.json" 2>>"$WORK/loadgen.log" &
  LG=$!
  if [ "$KILLED" = 1 ]; then
    wait "$KILLER"
    wait "$TGTD_PID" 2>/dev/null || true
    start_tgtd
    rm -f "$WORK/restart.flag"
    KILLS=$((KILLS + 1))
    NEXT_KILL=$(( $(date +%s) + KILL_EVERY ))
  fi
  wait "$LG" || FAILED_ROUNDS=$((FAILED_ROUNDS + 1))
  read -r ios errs mism < <(python3 -c '
import json,sys
r=json.load(open(sys.argv[1]))
v=r.get("verify") or {}
print(r["ios"], r["errors"] + v.get("readback_errors",0) + v.get("precondition_errors",0), v.get("mismatches",0))' "$WORK/round.json" 2>/dev/null || echo "0 1 0")
  [ -n "${SOAK_SMAPS:-}" ] && cp "/proc/$VHOST_PID/smaps" "$WORK/smaps.$((ROUNDS + 1))"
  ROUNDS=$((ROUNDS + 1)) IOS=$((IOS + ios)) ERRORS=$((ERRORS + errs)) MISMATCHES=$((MISMATCHES + mism))
  rss=$(rss_kib "$VHOST_PID") anon=$(anon_kib "$VHOST_PID")
  SAMPLES="$SAMPLES$ROUNDS $(( $(date +%s) - START )) $KILLED $rss $anon $ios $errs $mism"$'\n'
  # Start of the measurement: after the first clean round that follows the first kill.
  if [ -z "$RSS_START" ] && [ "$KILLS" -gt 0 ] && [ "$KILLED" = 0 ]; then
    RSS_START=$rss ANON_START=$anon WARM_ROUND=$ROUNDS
  fi
  echo "round $ROUNDS: ${R}s, $ios I/Os, $errs errors, $mism mismatches$([ $KILLED = 1 ] && echo ', tgtd killed and restarted'), RSS $rss KiB, anonymous $anon KiB, threads $(awk '/^Threads/ {print $2}' /proc/$VHOST_PID/status)"
done
RSS_END=$(rss_kib "$VHOST_PID") ANON_END=$(anon_kib "$VHOST_PID")
RECOVERIES=$(grep -c "reconnected to" "$WORK/vhost-iser.log" || true)
PANICS=$(grep -c "panicked" "$WORK/vhost-iser.log" || true)
GROWTH=n/a MEM_OK=0
if [ -n "$RSS_START" ]; then
  GROWTH=$(awk -v a="$RSS_START" -v b="$RSS_END" 'BEGIN{printf "%.2f", (b-a)*100/a}')
  awk -v g="$GROWTH" 'BEGIN{exit !(g < 1.0)}' && MEM_OK=1
fi
RSS_MAX=$(printf '%s' "$SAMPLES" | awk -v w="${WARM_ROUND:-0}" '$1>=w && $4>m {m=$4} END{print m+0}')
VERDICT=FAIL; [ "$MEM_OK" = 1 ] && VERDICT=PASS
REPORT="soak: $(( $(date +%s) - START )) s, $ROUNDS rounds of ${ROUND} s, $IOS I/Os, $ERRORS I/O errors, $MISMATCHES verify mismatches, $FAILED_ROUNDS failed rounds
tgtd kills: $KILLS (every ${KILL_EVERY} s, 3 s down), session recoveries (reconnects): $RECOVERIES, panics: $PANICS
vhost-iser RSS: idle before any I/O ${RSS_IDLE} KiB; start (after round ${WARM_ROUND:-?}, the first fault cycle) ${RSS_START:-?} KiB, end ${RSS_END} KiB, max after start ${RSS_MAX} KiB: growth ${GROWTH} % ($VERDICT, limit 1 %)
vhost-iser anonymous memory: start ${ANON_START:-?} KiB, end ${ANON_END} KiB"
echo "$REPORT"
if [ -n "$OUT_PREFIX" ]; then
  {
    echo "# Soak: $(git rev-parse --short HEAD), $(date -u +%FT%TZ), queues $QUEUES, iodepth $IODEPTH"
    echo
    echo '```'
    echo "$REPORT"
    echo '```'
    echo
    echo "Per round (RSS and anonymous memory in KiB, sampled after the round, client disconnected):"
    echo
    echo "| round | t (s) | tgtd killed | RSS | anonymous | I/Os | errors | mismatches |"
    echo "|---|---|---|---|---|---|---|---|"
    printf '%s' "$SAMPLES" | awk '{printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", $1,$2,($3?"yes":""),$4,$5,$6,$7,$8}'
  } >"$OUT_PREFIX.md"
  cp "$WORK/vhost-iser.log" "$OUT_PREFIX.vhost-iser.log"
  echo "written $OUT_PREFIX.md"
fi
kill -0 "$VHOST_PID" 2>/dev/null || { echo "vhost-iser died"; exit 1; }
[ "$MISMATCHES" = 0 ] && [ "$ERRORS" = 0 ] && [ "$PANICS" = 0 ] && [ "$FAILED_ROUNDS" = 0 ] && [ "$MEM_OK" = 1 ] || exit 1
