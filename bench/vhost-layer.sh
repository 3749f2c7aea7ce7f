#!/usr/bin/env bash
# Benchmark of the vhost layer alone: vhost-iser with its null target (null:, or the RAM target
# mem: with --iser-target mem) against qemu-storage-daemon's null-co vhost-user-blk export, driven by the same libblkio client
# (bench/loadgen) with the same jobs, interleaved in one run. See bench/README.md.
#
# Writes bench/results/vhost-layer.json and .md (also printed to stdout); progress goes
# to stderr. Exit status: 0 all jobs ran, 1 a job failed or returned I/O errors, 2 usage or
# setup error (e.g. vhost-iser is not built or does not support --target null:).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bench/vhost-layer.sh [options]
  --backends LIST        comma list of vhost-iser,qsd (default: vhost-iser,qsd)
  --runtime SECS         seconds per job (default 10)
  --reps N               repetitions of every job; the median by IOPS is tabled (default 1)
  --size BYTES           disk size for both backends (default 1073741824)
  --jobs LIST            comma list of QUEUESxDEPTH (default 1x1,1x32,1x128,4x1,4x32,4x128)
  --cpus LIST            taskset CPU list for both backend and client (default: no pinning)
  --backend-cpus LIST    taskset CPU list for the backend only
  --client-cpus LIST     taskset CPU list for the client only
  --poll                 client busy-polls for completions (default: sleeps on the eventfd)
  --vhost-iser-bin PATH  use this vhost-iser binary instead of building this checkout's
  --qsd-read-zeroes on|off  null-co read-zeroes (default on: like null: and mem:, it fills the buffer)
  --iser-target null|mem vhost-iser's target: null (default; no storage, like null-co) or mem
  --iser-threads N       vhost-iser --threads N (default: one worker thread per queue;
                         1 runs all queues on one thread, as qsd does)
                         (its sparse RAM disk: adds a lock and a lookup per request)
  --ring-poll-us N       vhost-iser's ring poll window after a batch, in microseconds
                         (VHOST_ISER_RING_POLL_US; default: the backend's own, 20 for null:/mem:;
                         0 sleeps until the guest kicks: the one-queue depth-1 trade-off)
  --out FILE             JSON output (default bench/results/vhost-layer.json)
  --no-build             do not run cargo (binaries must already exist)
Environment: VHOST_ISER_GIT=<rev> is recorded in the JSON as the vhost-iser revision measured.
EOF
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

backends=vhost-iser,qsd
runtime=10
reps=1
size=1073741824
jobs_list=1x1,1x32,1x128,4x1,4x32,4x128
backend_cpus=
client_cpus=
poll=
iser_bin=
qsd_read_zeroes=on
iser_target=null
iser_threads=
ring_poll_us=
out="$repo/bench/results/vhost-layer.json"
build=1
backend_queues=4
backend_queue_size=1024

die() { echo "vhost-layer.sh: $*" >&2; exit 2; }
log() { echo "vhost-layer.sh: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --backends) backends=$2; shift 2 ;;
        --iser-target) iser_target=$2; shift 2 ;;
        --iser-threads) iser_threads=$2; shift 2 ;;
        --runtime) runtime=$2; shift 2 ;;
        --reps) reps=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --jobs) jobs_list=$2; shift 2 ;;
        --cpus) backend_cpus=$2; client_cpus=$2; shift 2 ;;
        --backend-cpus) backend_cpus=$2; shift 2 ;;
        --client-cpus) client_cpus=$2; shift 2 ;;
        --poll) poll=--poll; shift ;;
        --vhost-iser-bin) iser_bin=$2; shift 2 ;;
        --qsd-read-zeroes) qsd_read_zeroes=$2; shift 2 ;;
        --ring-poll-us) ring_poll_us=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --no-build) build=; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done

[[ "$size" =~ ^[0-9]+$ ]] || die "--size must be a number of bytes"
[[ "$runtime" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--runtime must be a number of seconds"
[[ "$reps" =~ ^[1-9][0-9]*$ ]] || die "--reps must be a positive integer"
case "$qsd_read_zeroes" in on|off) ;; *) die "--qsd-read-zeroes must be on or off" ;; esac
case "$ring_poll_us" in '' | [0-9] | [1-9][0-9] | [1-9][0-9][0-9] | [1-9][0-9][0-9][0-9]) ;; *) die "--ring-poll-us must be 0-9999 (microseconds)" ;; esac
case "$iser_target" in null|mem) ;; *) die "--iser-target must be null or mem" ;; esac
[ -z "$iser_threads" ] || [[ "$iser_threads" =~ ^[1-9][0-9]*$ ]] || die "--iser-threads must be a positive number"
IFS=, read -r -a backend_arr <<<"$backends"
for b in "${backend_arr[@]}"; do
    case "$b" in vhost-iser|qsd) ;; *) die "unknown backend '$b' (vhost-iser, qsd)" ;; esac
done
IFS=, read -r -a job_arr <<<"$jobs_list"
for j in "${job_arr[@]}"; do
    [[ "$j" =~ ^([0-9]+)x([0-9]+)$ ]] || die "bad job '$j' (want QUEUESxDEPTH, e.g. 4x32)"
    [ "${BASH_REMATCH[1]}" -le "$backend_queues" ] || die "job '$j': at most $backend_queues queues"
done
for c in "$backend_cpus" "$client_cpus"; do
    if [ -n "$c" ]; then command -v taskset >/dev/null || die "taskset not found (util-linux)"; fi
done

# --- build -------------------------------------------------------------------------------
target_dir=${CARGO_TARGET_DIR:-$repo/target}
if [ -n "$build" ]; then
    log "building vhost-iser-loadgen (release)"
    cargo build --release --quiet --manifest-path "$repo/Cargo.toml" -p vhost-iser-loadgen >&2 \
        || die "cargo build of vhost-iser-loadgen failed"
fi
loadgen="$target_dir/release/vhost-iser-loadgen"
[ -x "$loadgen" ] || die "$loadgen not found (build it or drop --no-build)"

want() { case ",$backends," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

if want vhost-iser; then
    if [ -z "$iser_bin" ]; then
        if [ -n "$build" ]; then
            log "building vhost-iser (release)"
            cargo build --release --quiet --manifest-path "$repo/Cargo.toml" --bin vhost-iser >&2 \
                || die "cargo build of vhost-iser failed"
        fi
        iser_bin="$target_dir/release/vhost-iser"
    fi
    [ -x "$iser_bin" ] || die "vhost-iser binary $iser_bin does not exist; cannot benchmark it (use --backends qsd to measure qsd alone)"
    # The null:/mem: targets are what make this a benchmark of the vhost layer alone; refuse to go on
    # (and never report numbers) if this build does not have it.
    if ! "$iser_bin" --help 2>&1 | grep -q -- '--target'; then
        die "$iser_bin has no --target option: vhost-iser's RAM and null targets are not built yet; no numbers for vhost-iser (use --backends qsd)"
    fi
fi
# A freshly built binary's page-cache pages are dirty until written back, and while mapped they
# count as the process's Private_Dirty: write them back so the memory numbers are the backend's.
sync "$loadgen" ${iser_bin:+"$iser_bin"} 2>/dev/null || true
if want qsd; then
    command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon not found (package qemu-system-common)"
fi

# --- helpers -----------------------------------------------------------------------------
work=$(mktemp -d /tmp/vhost-layer.XXXXXX)
backend_pid=
monitor_pid=
cleanup() {
    [ -n "$monitor_pid" ] && kill "$monitor_pid" 2>/dev/null || true
    [ -n "$backend_pid" ] && kill "$backend_pid" 2>/dev/null || true
    [ -n "$backend_pid" ] && wait "$backend_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

clk_tck=$(getconf CLK_TCK)
# utime + stime of all threads of a process, in clock ticks (fields 14 and 15 of stat; the
# command name in field 2 may contain spaces, so count from the closing parenthesis).
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

pin() { if [ -n "$1" ]; then echo "taskset -c $1"; fi; }

backend_cmd() {
    local b=$1 sock=$2
    case "$b" in
        vhost-iser)
            echo "${ring_poll_us:+env VHOST_ISER_RING_POLL_US=$ring_poll_us }$iser_bin --socket $sock --target $iser_target:$size --queues $backend_queues${iser_threads:+ --threads $iser_threads} --queue-size $backend_queue_size --log-level warn" ;;
        qsd)
            echo "qemu-storage-daemon --blockdev driver=null-co,node-name=null0,size=$size,read-zeroes=$qsd_read_zeroes --export type=vhost-user-blk,id=exp0,node-name=null0,addr.type=unix,addr.path=$sock,writable=on,num-queues=$backend_queues" ;;
    esac
}

# shellcheck source=bench/lib/backend.sh
. "$here/lib/backend.sh"

# --- preflight: every requested backend must start and serve I/O before anything is measured --
for b in "${backend_arr[@]}"; do
    sock="$work/$b.sock"
    # shellcheck disable=SC2046  # word splitting of the command is intended
    if ! start_backend "$sock" "$work/$b.preflight.log" $(pin "$backend_cpus") $(backend_cmd "$b" "$sock"); then
        log "backend $b did not start; its output:"
        tail -n 20 "$work/$b.preflight.log" >&2 || true
        stop_backend
        die "backend $b failed to start ($(backend_cmd "$b" "$sock")); no numbers reported"
    fi
    if ! "$loadgen" --socket "$sock" --ios 1000 --iodepth 4 --rw randread --json >"$work/pre.json" 2>"$work/pre.err"; then
        cat "$work/pre.err" >&2
        stop_backend
        die "backend $b does not serve 4 KiB reads; no numbers reported"
    fi
    stop_backend
    log "preflight ok: $b"
done

# --- run ---------------------------------------------------------------------------------
runs="$work/runs.jsonl"
: >"$runs"
failed=0
loadavg_before=$(cut -d' ' -f1-3 /proc/loadavg)
for rep in $(seq "$reps"); do
    for j in "${job_arr[@]}"; do
        q=${j%x*}
        d=${j#*x}
        name="4k randread ${q}q QD${d}"
        # Backends alternate per job (and their order flips every rep) so that background load
        # on this shared machine hits both alike.
        order=("${backend_arr[@]}")
        if [ $((rep % 2)) -eq 0 ]; then
            order=()
            for ((i = ${#backend_arr[@]} - 1; i >= 0; i--)); do order+=("${backend_arr[$i]}"); done
        fi
        for b in "${order[@]}"; do
            sock="$work/$b.sock"
            tag="$b.$q.$d.$rep"
            # shellcheck disable=SC2046  # word splitting of the command is intended
            if ! start_backend "$sock" "$work/$tag.backend.log" $(pin "$backend_cpus") $(backend_cmd "$b" "$sock"); then
                python3 "$here/lib/report.py" record "$runs" backend="$b" job="$name" queues="$q" \
                    iodepth="$d" rep="$rep" error="backend did not start"
                failed=1
                continue
            fi
            python3 "$here/lib/procmon.py" "$backend_pid" "$work/$tag.mem.json" 0.2 &
            monitor_pid=$!
            sleep 0.3 # the monitor's first sample is the idle backend
            t0=$(cpu_ticks "$backend_pid")
            log "$name on $b (rep $rep)"
            # shellcheck disable=SC2046
            if $(pin "$client_cpus") "$loadgen" --socket "$sock" --queues "$q" --iodepth "$d" \
                --rw randread --bs 4096 --runtime "$runtime" $poll --json \
                >"$work/$tag.json" 2>"$work/$tag.err"; then
                t1=$(cpu_ticks "$backend_pid")
                kill "$monitor_pid" 2>/dev/null || true
                wait "$monitor_pid" 2>/dev/null || true
                monitor_pid=
                python3 "$here/lib/report.py" record "$runs" backend="$b" job="$name" queues="$q" \
                    iodepth="$d" rep="$rep" loadgen="$work/$tag.json" procmon="$work/$tag.mem.json" \
                    ticks0="$t0" ticks1="$t1" clk_tck="$clk_tck"
            else
                kill "$monitor_pid" 2>/dev/null || true
                wait "$monitor_pid" 2>/dev/null || true
                monitor_pid=
                err=$(tr '\n' ' ' <"$work/$tag.err" | cut -c1-200)
                log "job failed on $b: $err"
                if [ -s "$work/$tag.json" ]; then
                    err="I/O errors: $err"
                fi
                python3 "$here/lib/report.py" record "$runs" backend="$b" job="$name" queues="$q" \
                    iodepth="$d" rep="$rep" error="${err:-loadgen failed}"
                failed=1
            fi
            stop_backend
        done
    done
done

# --- report ------------------------------------------------------------------------------
cmds_json=$(for b in "${backend_arr[@]}"; do
    printf '%s\t%s\n' "$b" "$(pin "$backend_cpus")$(backend_cmd "$b" SOCK)"
done | python3 -c 'import json,sys; print(json.dumps(dict(l.rstrip("\n").split("\t",1) for l in sys.stdin)))')
python3 - "$work/meta.json" <<EOF
import json, sys, socket, datetime, subprocess, os
def sh(*c):
    try: return subprocess.run(c, capture_output=True, text=True).stdout.strip()
    except OSError: return ""
json.dump({
    "title": "4 KiB randread, libblkio client (bench/loadgen), RAM/null backends",
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "host": socket.gethostname(), "nproc": os.cpu_count(),
    "loadavg_before": "$loadavg_before", "loadavg_after": open("/proc/loadavg").read().split()[:3],
    "runtime_s": $runtime, "reps": $reps, "size": $size, "jobs": "$jobs_list",
    "completion": "${poll:+poll}" or "interrupt (completion eventfd)",
    "backend_cpus": "$backend_cpus", "client_cpus": "$client_cpus",
    "backend_cmds": json.loads('''$cmds_json'''),
    "git": sh("git", "-C", "$repo", "describe", "--always", "--dirty"),
    "vhost_iser_bin": "$iser_bin",
    "vhost_iser_version": sh("$iser_bin", "--version") if "$iser_bin" else None,
    "vhost_iser_git": os.environ.get("VHOST_ISER_GIT"),
    "qsd_version": sh("qemu-storage-daemon", "--version").splitlines()[0] if "$backends".find("qsd") >= 0 else None,
}, open(sys.argv[1], "w"), indent=1)
EOF
mkdir -p "$(dirname "$out")"
python3 "$here/lib/report.py" render "$runs" "$work/meta.json" "$out" | tee "${out%.json}.md"
log "wrote $out and ${out%.json}.md"
exit "$failed"
