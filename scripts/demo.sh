#!/bin/bash
# demo.sh - vhost-iser end to end in one command:
#   Linux guest (QEMU) --vhost-user-blk--> vhost-iser --iSCSI/TCP--> tgtd (LUN in RAM)
#
# usage: scripts/demo.sh [--queues N] [--size 1G] [--keep]
#   --queues N   virtqueues / iSCSI sessions (default 2)
#   --size S     LUN size (default 1G; a sparse file on /dev/shm)
#   --keep       keep the work directory (logs, fio JSON) instead of removing it
# Env knobs for the guest's fio (qemu/guest/fio-verify.sh): SIZE (64m) QD (16) RT (10).
#
# Steps: install Debian packages (scripts/install-deps.sh), cargo build --release,
# a private tgtd on 127.0.0.1 (free port, private control port), vhost-iser against it,
# a throw-away guest (qemu/run-guest.sh) running fio randwrite + crc32c verify and a
# randread job, a summary. Everything started here is stopped on exit (also on Ctrl-C).
# Needs root (tgtd, apt) and a Rust toolchain (cargo).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

QUEUES=2 LUN_SIZE=1G KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --queues) QUEUES=${2:?--queues needs a value}; shift 2 ;;
    --size) LUN_SIZE=${2:?--size needs a value}; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

T_START=$(date +%s.%N)
elapsed() { awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
say() { printf '[demo %6ss] %s\n' "$(elapsed)" "$*"; }
die() { say "FAILED: $*" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vhost-iser-demo.XXXXXX")
BACKING=/dev/shm/vhost-iser-demo-$$.img
TGTD_PID="" BACKEND_PID=""
cleanup() {
  local rc=$?
  set +e
  if [ -n "$BACKEND_PID" ] && kill -0 "$BACKEND_PID" 2>/dev/null; then
    kill -TERM "$BACKEND_PID" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$BACKEND_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$BACKEND_PID" 2>/dev/null
  fi
  # tgtd ignores SIGTERM
  [ -n "$TGTD_PID" ] && kill -KILL "$TGTD_PID" 2>/dev/null
  wait 2>/dev/null
  rm -f "$BACKING"
  if [ "$KEEP" = 1 ] || [ "$rc" != 0 ]; then
    echo "demo: logs and fio JSON kept in $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || die "run as root (tgtd and package installation need it)"

say "installing Debian packages if missing"
scripts/install-deps.sh >"$WORK/install.log" 2>&1 || { cat "$WORK/install.log" >&2; die "scripts/install-deps.sh"; }
command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (https://rustup.rs)"

say "building vhost-iser (release)"
cargo build --release --quiet --bin vhost-iser 2>"$WORK/build.log" || { cat "$WORK/build.log" >&2; die "cargo build"; }
BIN=$(cargo metadata --format-version 1 --no-deps 2>/dev/null |
      sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/vhost-iser
[ -x "$BIN" ] || BIN=$ROOT/target/release/vhost-iser

# --- tgtd: a private instance (own control port), iSCSI over TCP on 127.0.0.1 ---
listening() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
PORT=""
for _ in $(seq 50); do
  p=$(( 20000 + RANDOM % 30000 ))
  listening "$p" || { PORT=$p; break; }
done
[ -n "$PORT" ] || die "no free TCP port found"
CTL=$(( 1000 + (PORT + $$) % 30000 ))
IQN=iqn.2026-11.io.vhost-iser:demo
mkdir -p /var/run/tgtd
say "starting tgtd on 127.0.0.1:$PORT (control port $CTL), $LUN_SIZE LUN on $BACKING"
truncate -s "$LUN_SIZE" "$BACKING"
tgtd -f -C "$CTL" --iscsi "portal=127.0.0.1:$PORT" >"$WORK/tgtd.log" 2>&1 &
TGTD_PID=$!
tgtadm() { command tgtadm -C "$CTL" --lld iscsi "$@"; }
for _ in $(seq 100); do
  kill -0 "$TGTD_PID" 2>/dev/null || { cat "$WORK/tgtd.log" >&2; die "tgtd exited"; }
  listening "$PORT" && tgtadm --op show --mode target >/dev/null 2>&1 && break
  sleep 0.1
done
listening "$PORT" || die "tgtd does not listen on $PORT (see $WORK/tgtd.log)"
tgtadm --op new --mode target --tid 1 -T "$IQN"
tgtadm --op new --mode logicalunit --tid 1 --lun 1 -b "$BACKING"
tgtadm --op bind --mode target --tid 1 -I ALL

# --- vhost-iser ---
SOCK=$WORK/vhost-iser.sock
URL=iscsi://127.0.0.1:$PORT/$IQN/1
say "starting vhost-iser: $URL, $QUEUES queue(s)"
"$BIN" --socket "$SOCK" --target "$URL" --queues "$QUEUES" >"$WORK/vhost-iser.log" 2>&1 &
BACKEND_PID=$!
for _ in $(seq 200); do
  kill -0 "$BACKEND_PID" 2>/dev/null || { cat "$WORK/vhost-iser.log" >&2; die "vhost-iser exited"; }
  grep -q "waiting for a frontend" "$WORK/vhost-iser.log" && [ -S "$SOCK" ] && break
  sleep 0.1
done
[ -S "$SOCK" ] || die "vhost-iser did not create $SOCK (see $WORK/vhost-iser.log)"
grep -m1 "device ready" "$WORK/vhost-iser.log" | sed 's/^.*\] /    /'

# --- the guest ---
say "booting the guest (TCG) and running fio write+verify and randread inside"
export SIZE=${SIZE:-64m} QD=${QD:-16} RT=${RT:-10}
set +e
qemu/run-guest.sh --sock "$SOCK" --queues "$QUEUES" --mem 512 --timeout 300 --out "$WORK/out" \
  -- qemu/guest/fio-verify.sh demo >"$WORK/guest.log" 2>&1
GUEST_RC=$?
set -e
grep '^fio-verify:' "$WORK/guest.log" | sed 's/^/    /' || true
[ "$GUEST_RC" = 0 ] || { tail -n 30 "$WORK/guest.log" >&2; die "guest fio exited with $GUEST_RC"; }

# --- summary ---
# "<iops> <mean latency us>" of direction $2 in fio JSON $1 (no python/jq needed)
fio_stat() {
  awk -v want="$2" '
    /^ *"(read|write|trim|sync)" : \{/ { d=$1; gsub(/"/,"",d) }
    d==want && /"iops" :/ && iops=="" { v=$3; sub(/,$/,"",v); iops=v }
    d==want && /"lat_ns" : \{/ { inlat=1 }
    d==want && inlat && /"mean" :/ { v=$3; sub(/,$/,"",v); lat=v/1000; inlat=0 }
    END { printf "%.0f %.0f\n", iops, lat }' "$1"
}
J=$WORK/out/demo
read -r W_IOPS W_LAT < <(fio_stat "$J/verify.json" write)
read -r V_IOPS V_LAT < <(fio_stat "$J/verify.json" read)
read -r R_IOPS R_LAT < <(fio_stat "$J/randread.json" read)
VERIFY=FAILED
grep -q '"error" : 0' "$J/verify.json" && ! grep -q '"error" : [1-9]' "$J/verify.json" && VERIFY=OK
WRITTEN=$(du -k "$BACKING" | cut -f1)
cat <<EOF

=== vhost-iser demo: guest -> vhost-user-blk -> vhost-iser -> iSCSI/TCP -> tgtd ===
  4k randwrite QD$QD ($SIZE):    $W_IOPS IOPS, mean latency $W_LAT us
  crc32c verify read:       $V_IOPS IOPS, mean latency $V_LAT us   -> verify $VERIFY
  4k randread QD$QD x2, ${RT}s:  $R_IOPS IOPS, mean latency $R_LAT us
  target LUN: ${WRITTEN} KiB written to $BACKING
  (TCG guest on $(nproc) host cores: the guest CPU is the bottleneck, not vhost-iser)
  total time: $(elapsed) s
EOF
[ "$VERIFY" = OK ] || die "fio verify did not pass"
