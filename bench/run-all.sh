#!/bin/bash
# run-all.sh - the whole benchmark matrix in one command, then bench/RESULTS.md and the charts.
#
# usage: bench/run-all.sh [--iser] [--quick]
#   --iser   also run the iSER comparison inside the soft-RoCE VM (bench/iser-vm.sh, ~10 min)
#   --quick  one repetition of 5 s per job (a smoke run; numbers are not for publishing)
#
# Runs bench/vhost-layer.sh (vhost layer alone), bench/iscsi-tcp.sh (iSCSI/TCP to tgtd, with
# qemu-storage-daemon + libiscsi and iscsi-perf), bench/guest-fio.sh (a TCG guest running fio),
# each writing bench/results/NAME.json and .md; then refreshes the generated sections of
# bench/RESULTS.md (bench/lib/results_page.py) and draws bench/charts/*.png
# (bench/lib/charts.py, Debian's python3-matplotlib, installed if missing).
# ~35 minutes on 2 cores without --iser.
set -euo pipefail
cd "$(dirname "$0")/.."

ISER=0 QUICK=()
while [ $# -gt 0 ]; do
  case "$1" in
    --iser) ISER=1; shift ;;
    --quick) QUICK=(--reps 1 --runtime 5); shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run-all: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

step() { printf '\n=== %s (%s)\n' "$*" "$(date +%H:%M:%S)"; }

scripts/install-deps.sh
cargo build --release --workspace

step "vhost layer"
bench/vhost-layer.sh --no-build "${QUICK[@]}"
step "iSCSI/TCP"
bench/iscsi-tcp.sh --no-build "${QUICK[@]}"
step "guest fio"
if [ ${#QUICK[@]} -gt 0 ]; then bench/guest-fio.sh --no-build --reps 1; else bench/guest-fio.sh --no-build; fi
if [ "$ISER" = 1 ]; then
  step "iSER in the soft-RoCE VM"
  bench/iser-vm.sh --no-build
fi

step "RESULTS.md and charts"
/usr/bin/python3 bench/lib/results_page.py bench/RESULTS.md
if ! /usr/bin/python3 -c 'import matplotlib' 2>/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-matplotlib >/dev/null
fi
/usr/bin/python3 bench/lib/charts.py bench/results bench/charts
