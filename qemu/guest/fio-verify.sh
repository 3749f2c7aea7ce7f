#!/bin/bash
# fio-verify.sh - runs INSIDE the guest (qemu/run-guest.sh -- qemu/guest/fio-verify.sh TAG).
# 1. 4k random writes with crc32c checksums, then a full verify read (verify_fatal);
# 2. a time-based 4k random read job.
# fio JSON goes to ${VM_OUT:-/tmp/fio-out}/TAG/{verify,randread}.json.
# Knobs (env): DEV (/dev/vda) SIZE (64m) QD (16) RT (15, randread seconds; 0 = skip)
#              NJ (2, randread jobs). Exit 0 iff both jobs succeed and every block verifies.
set -u
tag=${1:-run}
O=${VM_OUT:-/tmp/fio-out}/$tag
DEV=${DEV:-/dev/vda} SIZE=${SIZE:-64m} QD=${QD:-16} RT=${RT:-15} NJ=${NJ:-2}
mkdir -p "$O" || exit 1
[ -b "$DEV" ] || { echo "fio-verify: $DEV is not a block device"; ls -l /dev/vd* 2>&1; exit 1; }
up() { cut -d' ' -f1 /proc/uptime; }
# one "name: read/write IOPS" line from a fio JSON file, without python or jq
summary() {
  awk -v n="$2" '/"(read|write)" : \{/{d=$1; gsub(/"/,"",d)} /"iops" :/ && d!=""{v=$3; sub(/,$/,"",v); i[d]=v; d=""}
       /"verify_errors"/{ve=$3}
       END{printf "fio-verify: %s: write %.0f IOPS, read %.0f IOPS%s\n", n, i["write"], i["read"], (ve!=""?", verify_errors "ve:"")}' "$1"
}
echo "fio-verify: $DEV $(cat /sys/block/"${DEV#/dev/}"/size 2>/dev/null) sectors, start at uptime $(up)s" | tee "$O/log.txt"
COMMON=(--eta=never --filename="$DEV" --bs=4k --ioengine=libaio --direct=1 --iodepth="$QD" --output-format=json)
fio "${COMMON[@]}" --name=verify --rw=randwrite --size="$SIZE" \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --output="$O/verify.json"
r1=$?
[ -s "$O/verify.json" ] && summary "$O/verify.json" "randwrite+verify" | tee -a "$O/log.txt"
r2=0
if [ "$RT" != 0 ]; then
  fio "${COMMON[@]}" --name=randread --rw=randread --size="$SIZE" --numjobs="$NJ" --group_reporting \
      --time_based --runtime="$RT" --output="$O/randread.json"
  r2=$?
  [ -s "$O/randread.json" ] && summary "$O/randread.json" "randread" | tee -a "$O/log.txt"
fi
echo "fio-verify: end at uptime $(up)s, rc verify=$r1 randread=$r2" | tee -a "$O/log.txt"
[ "$r1" = 0 ] && [ "$r2" = 0 ]
