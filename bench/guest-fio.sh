#!/bin/bash
# guest-fio.sh - the same fio jobs in the same TCG Linux guest, through two vhost-user-blk
# backends that reach the SAME tgtd LUN over iSCSI/TCP on 127.0.0.1:
#   vhost-iser  --target iscsi://127.0.0.1:PORT/IQN/1                (one session per queue)
#   qsd         qemu-storage-daemon --blockdev driver=iscsi (libiscsi) --export vhost-user-blk
#
# usage: bench/guest-fio.sh [--reps 3] [--runtime 12] [--jobs "randwrite randread seqread"]
#          [--queues 2] [--bin PATH] [--no-build] [--keep] [--out-prefix bench/results/guest-fio]
#
# Per repetition each backend is started fresh, a guest (qemu/run-guest.sh, 2 vCPUs,
# --queues 2) boots and runs bench/lib/guest-fio-jobs.sh; the backends alternate and their
# order flips every repetition. bench/lib/cpu_markers.py reads the backend's and tgtd's CPU
# time when each guest job starts and ends. bench/lib/guest_fio_report.py writes
# OUT-PREFIX.json (every run) and OUT-PREFIX.md (medians, ratios vhost-iser/qsd).
# Needs root (tgtd), qemu-storage-daemon with block-iscsi, fio, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

REPS=3 RT=12 JOBS="randwrite randread seqread" QUEUES=2 BIN="" BUILD=1 KEEP=0
OUTP=bench/results/guest-fio
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) REPS=${2:?}; shift 2 ;;
    --runtime) RT=${2:?}; shift 2 ;;
    --jobs) JOBS=${2:?}; shift 2 ;;
    --queues) QUEUES=${2:?}; shift 2 ;;
    --bin) BIN=${2:?}; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    --out-prefix) OUTP=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "guest-fio: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

T0=$(date +%s)
say() { printf '[guest-fio %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (tgtd needs it)"
for c in tgtd tgtadm qemu-storage-daemon fio python3 ss; do
  command -v "$c" >/dev/null || die "$c not found (scripts/install-deps.sh)"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/guest-fio.XXXXXX")
BACKING=/dev/shm/guest-fio-$$.img
TGTD_PID="" BE_PID="" MON_PID=""
stop_pid() {   # stop_pid PID SIGNAL: signal, wait up to 5 s, then SIGKILL
  local p=$1
  [ -n "$p" ] && kill -0 "$p" 2>/dev/null || return 0
  kill "-$2" "$p" 2>/dev/null
  for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  set +e
  stop_pid "$MON_PID" TERM
  stop_pid "$BE_PID" TERM
  [ -n "$TGTD_PID" ] && kill -KILL "$TGTD_PID" 2>/dev/null   # tgtd ignores SIGTERM
  wait 2>/dev/null
  rm -f "$BACKING"
  if [ "$KEEP" = 1 ] || [ "$rc" != 0 ]; then say "work directory kept: $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "$BIN" ]; then
  if [ "$BUILD" = 1 ]; then
    say "building vhost-iser (release)"
    cargo build --release --quiet --bin vhost-iser 2>"$WORK/build.log" || { cat "$WORK/build.log" >&2; die "cargo build"; }
  fi
  BIN=$(cargo metadata --format-version 1 --no-deps 2>/dev/null |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/vhost-iser
  [ -x "$BIN" ] || BIN=$ROOT/target/release/vhost-iser
fi
[ -x "$BIN" ] || die "no vhost-iser binary at $BIN"

# --- tgtd: private instance, one 1 GiB LUN on /dev/shm, first 256 MiB filled with data ---
listening() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
PORT=""
for _ in $(seq 50); do p=$(( 20000 + RANDOM % 30000 )); listening "$p" || { PORT=$p; break; }; done
[ -n "$PORT" ] || die "no free TCP port"
CTL=$(( 1000 + (PORT + $$) % 30000 ))
IQN=iqn.2026-11.io.vhost-iser:guest-fio
head -c 256M /dev/urandom >"$BACKING"
truncate -s 1G "$BACKING"
mkdir -p /var/run/tgtd
say "tgtd on 127.0.0.1:$PORT (control port $CTL), LUN $BACKING"
tgtd -f -C "$CTL" --iscsi "portal=127.0.0.1:$PORT" >"$WORK/tgtd.log" 2>&1 &
TGTD_PID=$!
tgtadm() { command tgtadm -C "$CTL" --lld iscsi "$@"; }
for _ in $(seq 100); do
  kill -0 "$TGTD_PID" 2>/dev/null || { cat "$WORK/tgtd.log" >&2; die "tgtd exited"; }
  listening "$PORT" && tgtadm --op show --mode target >/dev/null 2>&1 && break
  sleep 0.1
done
listening "$PORT" || die "tgtd does not listen on $PORT"
tgtadm --op new --mode target --tid 1 -T "$IQN"
tgtadm --op new --mode logicalunit --tid 1 --lun 1 -b "$BACKING"
tgtadm --op bind --mode target --tid 1 -I ALL

# --- backends ---
start_backend() {   # start_backend NAME SOCK LOG -> BE_PID
  local name=$1 sock=$2 log=$3
  rm -f "$sock"
  case "$name" in
    vhost-iser)
      "$BIN" --socket "$sock" --target "iscsi://127.0.0.1:$PORT/$IQN/1" --queues "$QUEUES" \
        --initiator-name iqn.2026-11.io.vhost-iser:bench-viser >"$log" 2>&1 &
      ;;
    qsd)
      qemu-storage-daemon \
        --blockdev "driver=iscsi,node-name=n0,transport=tcp,portal=127.0.0.1:$PORT,target=$IQN,lun=1,initiator-name=iqn.2026-11.io.vhost-iser:bench-qsd" \
        --export "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$sock,writable=on,num-queues=$QUEUES" \
        >"$log" 2>&1 &
      ;;
  esac
  BE_PID=$!
  for _ in $(seq 300); do
    kill -0 "$BE_PID" 2>/dev/null || { cat "$log" >&2; die "$name exited at start"; }
    [ -S "$sock" ] && break
    sleep 0.1
  done
  [ -S "$sock" ] || die "$name did not create $sock"
}

order=(vhost-iser qsd)
for rep in $(seq "$REPS"); do
  for name in "${order[@]}"; do
    run=$WORK/runs/$rep-$name
    mkdir -p "$run/out/g"
    start_backend "$name" "$run/sock" "$run/backend.log"
    python3 bench/lib/cpu_markers.py "$run/out/g" "$run/cpu.json" "backend=$BE_PID" "tgtd=$TGTD_PID" &
    MON_PID=$!
    say "rep $rep/$REPS: $name (pid $BE_PID), jobs: $JOBS, load $(cut -d' ' -f1-3 /proc/loadavg)"
    set +e
    JOBS=$JOBS RT=$RT qemu/run-guest.sh --sock "$run/sock" --queues "$QUEUES" --cpus 2 --mem 512 \
      --timeout 600 --out "$run/out" -- bench/lib/guest-fio-jobs.sh g >"$run/guest.log" 2>&1
    grc=$?
    set -e
    echo "$grc" >"$run/guest.rc"
    stop_pid "$MON_PID" TERM; MON_PID=""
    stop_pid "$BE_PID" TERM; BE_PID=""
    grep '^guest-fio:' "$run/guest.log" | sed 's/^/    /' >&2 || true
    [ "$grc" = 0 ] || { tail -n 20 "$run/guest.log" >&2; say "WARNING: guest exited $grc ($name, rep $rep)"; }
  done
  order=("${order[1]}" "${order[0]}")
done

say "writing $OUTP.json and $OUTP.md"
META=$(printf '{"host_cpus": %s, "uname": "%s", "qemu": "%s", "tgtd": "%s", "vhost_iser_bin": "%s", "git": "%s", "date": "%s", "reps": %s, "runtime_s": %s, "queues": %s}' \
  "$(nproc)" "$(uname -r)" "$(qemu-storage-daemon --version | head -1)" \
  "$(dpkg-query -W -f '${Version}' tgt 2>/dev/null || echo '?')" "$BIN" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo '?')" "$(date -u +%FT%TZ)" "$REPS" "$RT" "$QUEUES")
python3 bench/lib/guest_fio_report.py "$WORK/runs" "$OUTP" "$META"
say "done"
