#!/usr/bin/env bash
# iSCSI/TCP benchmark: vhost-iser (--target iscsi://) against qemu-storage-daemon with QEMU's
# libiscsi driver, both exporting vhost-user-blk to the same libblkio client (bench/loadgen),
# and libiscsi's iscsi-perf straight to the target as the ceiling. One tgtd, one null LUN, for
# everything, in one run; jobs interleaved across backends. See bench/README.md.
#
# Writes bench/results/iscsi-tcp.json, .md (also printed) and .strace.txt (progress on
# stderr). Exit status: 0 all jobs ran, 1 a job failed, 2 usage or setup error.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bench/iscsi-tcp.sh [options]
  --backends LIST        comma list of vhost-iser,qsd,iscsi-perf (default: all three)
  --runtime SECS         seconds per job (default 10)
  --reps N               repetitions of every job; the median by IOPS is tabled (default 3)
  --jobs LIST            comma list of RW/BS/QUEUESxDEPTH (default
                         randread/4k/1x1,randread/4k/1x32,randread/4k/1x128,read/128k/1x8,randread/4k/4x32)
  --no-syscalls          do not count the backends' system calls (perf stat)
  --strace JOB           after the runs, one 5 s run of JOB (default randread/4k/1x32) per
                         backend under `strace -c -f`: which system calls (written to
                         OUT with .json replaced by .strace.txt); --strace none to skip
  --vhost-iser-bin PATH  use this vhost-iser binary instead of building this checkout's
  --out FILE             JSON output (default bench/results/iscsi-tcp.json; the markdown
                         goes next to it as .md, the strace tables as .strace.txt)
  --no-build             do not run cargo (binaries must already exist)
Environment: VHOST_ISER_GIT=<rev> is recorded in the JSON as the vhost-iser revision measured.
EOF
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

backends=vhost-iser,qsd,iscsi-perf
runtime=10
reps=3
jobs_list=randread/4k/1x1,randread/4k/1x32,randread/4k/1x128,read/128k/1x8,randread/4k/4x32
syscalls=1
strace_job=randread/4k/1x32
iser_bin=
out="$repo/bench/results/iscsi-tcp.json"
build=1
backend_queue_size=1024
iqn=iqn.2026-11.io.vhost-iser:bench-null
initiator_base=iqn.2026-11.io.vhost-iser:bench

die() { echo "iscsi-tcp.sh: $*" >&2; exit 2; }
log() { echo "iscsi-tcp.sh: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --backends) backends=$2; shift 2 ;;
        --runtime) runtime=$2; shift 2 ;;
        --reps) reps=$2; shift 2 ;;
        --jobs) jobs_list=$2; shift 2 ;;
        --no-syscalls) syscalls=; shift ;;
        --strace) strace_job=$2; shift 2 ;;
        --vhost-iser-bin) iser_bin=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --no-build) build=; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done

[[ "$runtime" =~ ^[0-9]+$ ]] && [ "$runtime" -ge 4 ] || die "--runtime must be a whole number of seconds >= 4"
[[ "$reps" =~ ^[1-9][0-9]*$ ]] || die "--reps must be a positive integer"
IFS=, read -r -a backend_arr <<<"$backends"
for b in "${backend_arr[@]}"; do
    case "$b" in vhost-iser|qsd|iscsi-perf) ;; *) die "unknown backend '$b' (vhost-iser, qsd, iscsi-perf)" ;; esac
done
IFS=, read -r -a job_arr <<<"$jobs_list"
bytes() { # 4k, 128k, 1m, 512 -> bytes
    local n=${1%[kKmM]} u=${1##*[0-9]}
    case "$u" in k|K) echo $((n * 1024)) ;; m|M) echo $((n * 1048576)) ;; "") echo "$n" ;; esac
}
for j in "${job_arr[@]}"; do
    [[ "$j" =~ ^(randread|read)/([0-9]+[kKmM]?)/([0-9]+)x([0-9]+)$ ]] \
        || die "bad job '$j' (want RW/BS/QUEUESxDEPTH with RW randread or read, e.g. randread/4k/1x32)"
    [ $(($(bytes "${BASH_REMATCH[2]}") % 512)) -eq 0 ] || die "job '$j': block size must be a multiple of 512"
done

if [ "$strace_job" != none ]; then
    [[ "$strace_job" =~ ^(randread|read)/([0-9]+[kKmM]?)/([0-9]+)x([0-9]+)$ ]] || die "bad --strace job '$strace_job'"
    command -v strace >/dev/null || die "strace not found (package strace), or pass --strace none"
fi

want() { case ",$backends," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
for t in tgtd tgtadm; do command -v $t >/dev/null || die "$t not found (Debian package tgt)"; done
if want iscsi-perf; then command -v iscsi-perf >/dev/null || die "iscsi-perf not found (Debian package libiscsi-bin)"; fi
if want qsd; then
    command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon not found (package qemu-system-common)"
fi
if [ -n "$syscalls" ]; then
    command -v perf >/dev/null || die "perf not found (package linux-perf), or pass --no-syscalls"
fi

# --- build -------------------------------------------------------------------------------
target_dir=${CARGO_TARGET_DIR:-$repo/target}
if [ -n "$build" ]; then
    log "building vhost-iser-loadgen (release)"
    cargo build --release --quiet --manifest-path "$repo/Cargo.toml" -p vhost-iser-loadgen >&2 \
        || die "cargo build of vhost-iser-loadgen failed"
fi
loadgen="$target_dir/release/vhost-iser-loadgen"
[ -x "$loadgen" ] || die "$loadgen not found (build it or drop --no-build)"
if want vhost-iser; then
    if [ -z "$iser_bin" ]; then
        if [ -n "$build" ]; then
            log "building vhost-iser (release)"
            cargo build --release --quiet --manifest-path "$repo/Cargo.toml" --bin vhost-iser >&2 \
                || die "cargo build of vhost-iser failed"
        fi
        iser_bin="$target_dir/release/vhost-iser"
    fi
    [ -x "$iser_bin" ] || die "vhost-iser binary $iser_bin does not exist (use --backends qsd,iscsi-perf to measure the others)"
fi
# dirty page-cache pages of a fresh binary would count as the process's Private_Dirty
sync "$loadgen" ${iser_bin:+"$iser_bin"} 2>/dev/null || true

# --- helpers -----------------------------------------------------------------------------
work=$(mktemp -d /tmp/iscsi-tcp.XXXXXX)
backend_pid=
monitor_pid=
tgtd_pid=
perf_pids=()
cleanup() {
    for p in "${perf_pids[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -n "$monitor_pid" ] && kill "$monitor_pid" 2>/dev/null || true
    [ -n "$backend_pid" ] && kill "$backend_pid" 2>/dev/null || true
    [ -n "$backend_pid" ] && wait "$backend_pid" 2>/dev/null || true
    # tgtd ignores SIGTERM; it leads its own process group (setsid)
    [ -n "$tgtd_pid" ] && kill -KILL -- "-$tgtd_pid" 2>/dev/null || true
    [ -n "$tgtd_pid" ] && wait "$tgtd_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

clk_tck=$(getconf CLK_TCK)
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
stime_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $13}'; }

# --- tgtd: one target, one null LUN (reads return zeroes, nothing is stored) --------------
port=
for try in $(seq 8); do
    cand=$((20000 + RANDOM % 20000))
    ctl=$((1000 + cand % 31000))
    mkdir -p /var/run/tgtd
    setsid tgtd -f -C "$ctl" --iscsi "portal=127.0.0.1:$cand" >"$work/tgtd.log" 2>&1 </dev/null &
    tgtd_pid=$!
    for i in $(seq 50); do
        if grep -q "unable to bind" "$work/tgtd.log" || ! kill -0 "$tgtd_pid" 2>/dev/null; then break; fi
        if tgtadm -C "$ctl" --lld iscsi --mode sys --op show >/dev/null 2>&1 \
            && grep -q ":$(printf '%04X' "$cand") 00000000:0000 0A" /proc/net/tcp; then
            port=$cand
            break 2
        fi
        sleep 0.1
    done
    kill -KILL -- "-$tgtd_pid" 2>/dev/null || true
    wait "$tgtd_pid" 2>/dev/null || true
    tgtd_pid=
done
[ -n "$port" ] || die "tgtd did not start: $(tail -n 5 "$work/tgtd.log" 2>/dev/null)"
tgtadm_() { tgtadm -C "$ctl" --lld iscsi "$@" >/dev/null || die "tgtadm $* failed"; }
tgtadm_ --mode target --op new --tid 1 -T "$iqn"
tgtadm_ --mode logicalunit --op new --tid 1 --lun 1 --bstype null --backing-store /dev/null
tgtadm_ --mode target --op bind --tid 1 -I ALL
url="iscsi://127.0.0.1:$port/$iqn/1"
log "tgtd $tgtd_pid on 127.0.0.1:$port, LUN $url (null, 1 TiB)"

backend_cmd() {
    local b=$1 sock=$2 q=$3
    case "$b" in
        vhost-iser)
            echo "$iser_bin --socket $sock --target $url --queues $q --queue-size $backend_queue_size --initiator-name $initiator_base:vhost-iser --log-level warn" ;;
        qsd)
            echo "qemu-storage-daemon --blockdev driver=iscsi,node-name=n0,transport=tcp,portal=127.0.0.1:$port,target=$iqn,lun=1,initiator-name=$initiator_base:qsd --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$sock,writable=on,num-queues=$q" ;;
    esac
}

# shellcheck source=bench/lib/backend.sh
. "$here/lib/backend.sh"

# Counts the system calls of process $1 (all threads) for $2 seconds into file $3 (perf stat,
# in-kernel counting of tracepoints: no ptrace, little overhead): all of them, and the ones an
# I/O path uses by name.
sc_events=raw_syscalls:sys_enter
for n in read readv write writev recvfrom sendto recvmsg sendmsg epoll_wait epoll_pwait ppoll poll futex io_uring_enter; do
    sc_events+=",syscalls:sys_enter_$n"
done
count_syscalls() {
    perf stat -x, -e "$sc_events" -p "$1" -o "$3" -- sleep "$2" >/dev/null 2>&1 &
    perf_pids+=($!)
}
wait_perf() {
    for p in "${perf_pids[@]}"; do wait "$p" 2>/dev/null || true; done
    perf_pids=()
}

# The syscall window: from 1 s after the start to 1 s before the end of a job (all threads of
# the backend exist by then, and no connection set-up or tear-down falls inside it).
sc_window=$((runtime - 2))

# --- preflight -----------------------------------------------------------------------------
for b in "${backend_arr[@]}"; do
    if [ "$b" = iscsi-perf ]; then
        python3 "$here/lib/iscsiperf.py" "$work/pre.json" "$work/pre.pid" -- \
            iscsi-perf -i "$initiator_base:iscsi-perf" -m 4 -b 8 -r -t 1 "$url" >/dev/null \
            || die "iscsi-perf against $url failed: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("error"))' "$work/pre.json" 2>/dev/null)"
    else
        sock="$work/$b.sock"
        # shellcheck disable=SC2046  # word splitting of the command is intended
        if ! start_backend "$sock" "$work/$b.preflight.log" $(backend_cmd "$b" "$sock" 1); then
            tail -n 20 "$work/$b.preflight.log" >&2 || true
            stop_backend
            die "backend $b failed to start ($(backend_cmd "$b" "$sock" 1)); no numbers reported"
        fi
        if ! "$loadgen" --socket "$sock" --ios 1000 --iodepth 4 --rw randread --json >"$work/pre.json" 2>"$work/pre.err"; then
            cat "$work/pre.err" "$work/$b.preflight.log" >&2
            stop_backend
            die "backend $b does not serve 4 KiB reads from $url; no numbers reported"
        fi
        stop_backend
    fi
    log "preflight ok: $b"
done

# --- run ---------------------------------------------------------------------------------
runs="$work/runs.jsonl"
: >"$runs"
failed=0
loadavg_before=$(cut -d' ' -f1-3 /proc/loadavg)
record() { python3 "$here/lib/iscsi_report.py" record "$runs" "$@"; }
for rep in $(seq "$reps"); do
    for j in "${job_arr[@]}"; do
        IFS=/ read -r rw bsz qd <<<"$j"
        q=${qd%x*}
        d=${qd#*x}
        bs=$(bytes "$bsz")
        name="$bsz $rw ${q}q QD${d}"
        order=("${backend_arr[@]}")
        if [ $((rep % 2)) -eq 0 ]; then
            order=()
            for ((i = ${#backend_arr[@]} - 1; i >= 0; i--)); do order+=("${backend_arr[$i]}"); done
        fi
        for b in "${order[@]}"; do
            tag="$b.$rw.$bs.$q.$d.$rep"
            common=(backend="$b" job="$name" rw="$rw" bs="$bs" queues="$q" iodepth="$d" rep="$rep" clk_tck="$clk_tck")
            if [ "$b" = iscsi-perf ]; then
                # iscsi-perf has one session and no notion of queues
                ((q > 1)) && continue
                log "$name on $b (rep $rep)"
                rflag=
                [ "$rw" = randread ] && rflag=-r
                g0=$(cpu_ticks "$tgtd_pid")
                python3 "$here/lib/iscsiperf.py" "$work/$tag.json" "$work/$tag.pid" -- \
                    iscsi-perf -i "$initiator_base:iscsi-perf" -m "$d" -b $((bs / 512)) $rflag \
                    -t "$runtime" "$url" &
                runner=$!
                sc=()
                if [ -n "$syscalls" ]; then
                    sleep 1
                    for i in $(seq 30); do [ -s "$work/$tag.pid" ] && break; sleep 0.1; done
                    count_syscalls "$(cat "$work/$tag.pid" 2>/dev/null)" "$sc_window" "$work/$tag.sc"
                    count_syscalls "$tgtd_pid" "$sc_window" "$work/$tag.tsc"
                fi
                if wait "$runner"; then
                    g1=$(cpu_ticks "$tgtd_pid")
                    wait_perf
                    [ -n "$syscalls" ] && sc=(syscalls_file="$work/$tag.sc" tgtd_syscalls_file="$work/$tag.tsc" syscall_window_s="$sc_window")
                    record "${common[@]}" iscsiperf="$work/$tag.json" tgtd0="$g0" tgtd1="$g1" "${sc[@]}"
                else
                    wait_perf
                    err=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("error"))' "$work/$tag.json" 2>/dev/null || echo "iscsi-perf failed")
                    log "job failed on $b: $err"
                    record "${common[@]}" error="$err"
                    failed=1
                fi
                continue
            fi
            log "$name on $b (rep $rep)"
            sock="$work/$b.sock"
            # shellcheck disable=SC2046  # word splitting of the command is intended
            if ! start_backend "$sock" "$work/$tag.backend.log" $(backend_cmd "$b" "$sock" "$q"); then
                record "${common[@]}" error="backend did not start: $(tail -n 3 "$work/$tag.backend.log" | tr '\n' ' ')"
                failed=1
                continue
            fi
            python3 "$here/lib/procmon.py" "$backend_pid" "$work/$tag.mem.json" 0.2 &
            monitor_pid=$!
            sleep 0.3 # the monitor's first sample is the idle backend
            t0=$(cpu_ticks "$backend_pid")
            s0=$(stime_ticks "$backend_pid")
            g0=$(cpu_ticks "$tgtd_pid")
            "$loadgen" --socket "$sock" --queues "$q" --iodepth "$d" --rw "$rw" --bs "$bs" \
                --runtime "$runtime" --json >"$work/$tag.json" 2>"$work/$tag.err" &
            lg=$!
            if [ -n "$syscalls" ]; then
                sleep 1
                count_syscalls "$backend_pid" "$sc_window" "$work/$tag.sc"
                count_syscalls "$tgtd_pid" "$sc_window" "$work/$tag.tsc"
            fi
            if wait "$lg"; then
                t1=$(cpu_ticks "$backend_pid")
                s1=$(stime_ticks "$backend_pid")
                g1=$(cpu_ticks "$tgtd_pid")
                wait_perf
                kill "$monitor_pid" 2>/dev/null || true
                wait "$monitor_pid" 2>/dev/null || true
                monitor_pid=
                sc=()
                [ -n "$syscalls" ] && sc=(syscalls_file="$work/$tag.sc" tgtd_syscalls_file="$work/$tag.tsc" syscall_window_s="$sc_window")
                record "${common[@]}" loadgen="$work/$tag.json" procmon="$work/$tag.mem.json" \
                    ticks0="$t0" ticks1="$t1" sticks0="$s0" sticks1="$s1" tgtd0="$g0" tgtd1="$g1" "${sc[@]}"
            else
                wait_perf
                kill "$monitor_pid" 2>/dev/null || true
                wait "$monitor_pid" 2>/dev/null || true
                monitor_pid=
                err=$(tr '\n' ' ' <"$work/$tag.err" | cut -c1-200)
                [ -s "$work/$tag.json" ] && err="I/O errors: $err"
                log "job failed on $b: $err"
                record "${common[@]}" error="${err:-loadgen failed}"
                failed=1
            fi
            stop_backend
        done
    done
done

# --- system calls by name, under strace (slows the backend down: counts, not speed) -------
strace_out="${out%.json}.strace.txt"
if [ "$strace_job" != none ]; then
    IFS=/ read -r rw bsz qd <<<"$strace_job"
    q=${qd%x*}
    d=${qd#*x}
    {
        echo "# strace -c -f -p BACKEND attached before a 5 s job $strace_job and stopped after it"
        echo "# ($(date -u '+%Y-%m-%d %H:%M UTC'), git $(git -C "$repo" describe --always --dirty)); includes the client's"
        echo "# connection set-up and tear-down. strace slows the backend down: more requests per wake-up."
    } >"$work/strace.txt"
    for b in "${backend_arr[@]}"; do
        [ "$b" = iscsi-perf ] && continue
        sock="$work/$b.sock"
        # shellcheck disable=SC2046  # word splitting of the command is intended
        start_backend "$sock" "$work/strace.$b.log" $(backend_cmd "$b" "$sock" "$q") || { log "strace: $b did not start"; failed=1; continue; }
        log "strace: $strace_job on $b"
        strace -c -f -p "$backend_pid" -o "$work/strace.$b.txt" 2>/dev/null &
        st=$!
        sleep 0.5
        if "$loadgen" --socket "$sock" --queues "$q" --iodepth "$d" --rw "$rw" --bs "$(bytes "$bsz")" \
            --runtime 5 --json >"$work/strace.$b.json" 2>"$work/strace.$b.err"; then
            sleep 0.2
            kill -INT "$st" 2>/dev/null || true
            wait "$st" 2>/dev/null || true
            read -r iops ios < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["iops"], d["ios"])' "$work/strace.$b.json")
            total=$(awk '$NF == "total" {print $4}' "$work/strace.$b.txt")
            {
                echo
                echo "## $b: $(printf '%.0f' "$iops") IOPS under strace, $total syscalls for $ios I/Os = $(python3 -c "print(f'{$total / $ios:.2f}')") per I/O"
                cat "$work/strace.$b.txt"
            } >>"$work/strace.txt"
        else
            kill -INT "$st" 2>/dev/null || true
            wait "$st" 2>/dev/null || true
            log "strace: job failed on $b"
            failed=1
        fi
        stop_backend
    done
    mkdir -p "$(dirname "$strace_out")"
    cp "$work/strace.txt" "$strace_out"
    log "wrote $strace_out"
fi

# --- report ------------------------------------------------------------------------------
cmds_json=$(for b in "${backend_arr[@]}"; do
    case "$b" in
        iscsi-perf) printf '%s\t%s\n' "$b" "iscsi-perf -i $initiator_base:iscsi-perf -m QD -b BS/512 [-r] -t $runtime $url" ;;
        *) printf '%s\t%s\n' "$b" "$(backend_cmd "$b" SOCK Q)" ;;
    esac
done | python3 -c 'import json,sys; print(json.dumps(dict(l.rstrip("\n").split("\t",1) for l in sys.stdin)))')
python3 - "$work/meta.json" <<EOF
import json, sys, socket, datetime, subprocess, os
def sh(*c):
    try: return subprocess.run(c, capture_output=True, text=True).stdout.strip()
    except OSError: return ""
json.dump({
    "title": "iSCSI/TCP to one tgtd null LUN: vhost-iser vs qemu-storage-daemon (libiscsi) vs iscsi-perf",
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "host": socket.gethostname(), "nproc": os.cpu_count(),
    "loadavg_before": "$loadavg_before", "loadavg_after": " ".join(open("/proc/loadavg").read().split()[:3]),
    "runtime_s": $runtime, "reps": $reps, "jobs": "$jobs_list",
    "syscall_window_s": $sc_window if "$syscalls" else None,
    "target": "tgtd (tgt " + sh("dpkg-query", "-W", "-f", "\${Version}", "tgt") + ") --bstype null, $url",
    "backend_cmds": json.loads('''$cmds_json'''),
    "git": sh("git", "-C", "$repo", "describe", "--always", "--dirty"),
    "vhost_iser_bin": "$iser_bin",
    "vhost_iser_version": sh("$iser_bin", "--version") if "$iser_bin" else None,
    "vhost_iser_git": os.environ.get("VHOST_ISER_GIT"),
    "qsd_version": sh("qemu-storage-daemon", "--version").splitlines()[0] if "$backends".find("qsd") >= 0 else None,
    "libiscsi_version": sh("dpkg-query", "-W", "-f", "\${Version}", "libiscsi7"),
}, open(sys.argv[1], "w"), indent=1)
EOF
mkdir -p "$(dirname "$out")"
python3 "$here/lib/iscsi_report.py" render "$runs" "$work/meta.json" "$out" | tee "${out%.json}.md"
log "wrote $out and ${out%.json}.md"
exit "$failed"
