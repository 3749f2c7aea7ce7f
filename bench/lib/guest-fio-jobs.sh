#!/bin/bash
# guest-fio-jobs.sh - runs INSIDE the guest (qemu/run-guest.sh -- bench/lib/guest-fio-jobs.sh TAG)
# for bench/guest-fio.sh. Runs the benchmark's fio jobs one after the other on $DEV and writes
# ${VM_OUT}/TAG/JOB.json. Around each fio process it creates JOB.start / JOB.end in the same
# directory (a 9p share the host sees at once): the host reads the backend's CPU time when
# they appear. Each marker holds /sys/block/DEV/stat at that moment (I/Os completed by the
# device, ramp time included), which the host divides the CPU time by, and the number of
# virtio-blk interrupts the guest has taken.
# Knobs (env): DEV (/dev/vda) JOBS ("randwrite randread") RT (12 s per job) RAMP (2 s)
#              QD (16, per fio job) NJ (2 fio jobs, one per vCPU, so both virtqueues work)
#              SPAN (256m: the LBA range the 4k jobs touch) SEQ_BS (128k)
set -u
tag=${1:?usage: guest-fio-jobs.sh TAG}
O=${VM_OUT:?VM_OUT is not set (run-guest.sh --out DIR)}/$tag
DEV=${DEV:-/dev/vda} JOBS=${JOBS:-"randwrite randread"} RT=${RT:-12} RAMP=${RAMP:-2}
QD=${QD:-16} NJ=${NJ:-2} SPAN=${SPAN:-256m} SEQ_BS=${SEQ_BS:-128k}
mkdir -p "$O" || exit 1
[ -b "$DEV" ] || { echo "guest-fio: $DEV is not a block device"; exit 1; }
ncpu=$(nproc)
echo "guest-fio: $DEV, $ncpu vCPUs, jobs: $JOBS" | tee "$O/log.txt"
COMMON=(--eta=never --filename="$DEV" --ioengine=libaio --direct=1 --iodepth="$QD"
        --numjobs="$NJ" --group_reporting --time_based --runtime="$RT" --ramp_time="$RAMP"
        --cpus_allowed="0-$((ncpu - 1))" --cpus_allowed_policy=split --output-format=json)
# marker content: line 1 the device's /sys/block/DEV/stat, line 2 "irq N": interrupts taken
# so far by virtio-blk request queues (/proc/interrupts "virtioN-req.Q"; 9p's are "-requests")
mark() {
  { cat "/sys/block/${DEV#/dev/}/stat"
    awk '/virtio[0-9]+-req\./{for(i=2;i<=NF;i++) if($i ~ /^[0-9]+$/) n+=$i} END{print "irq", n+0}' /proc/interrupts
  } >"$1"
}
rc=0
for job in $JOBS; do
  case "$job" in
    randread|randwrite) args=(--rw="$job" --bs=4k --size="$SPAN" --randrepeat=0) ;;
    seqread) args=(--rw=read --bs="$SEQ_BS" --size="$SPAN" --offset_increment="$SPAN") ;;
    *) echo "guest-fio: unknown job $job"; exit 2 ;;
  esac
  mark "$O/$job.start"
  fio "${COMMON[@]}" --name="$job" "${args[@]}" --output="$O/$job.json"
  r=$?
  mark "$O/$job.end"
  echo "guest-fio: $job rc=$r loadavg $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$O/log.txt"
  [ "$r" = 0 ] || rc=1
  sleep 1   # lets the host's sampler see .end before the next .start
done
exit "$rc"
