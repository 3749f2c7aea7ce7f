#!/bin/bash
# fio-initrd.sh - kernel + a self-contained initramfs (busybox, fio and its
# libraries, no 9p share) for guests that must be migratable: QEMU refuses to
# migrate a guest that has a 9p share mounted, which run-guest.sh's guests do.
#
# usage: qemu/guest/fio-initrd.sh DIR
#   Copies vmlinuz and initrd.gz into DIR; prints "KERNEL=<path>" and
#   "INITRD=<path>". The initramfs is cached next to the harness kernel
#   (qemu/lib/vm-common.sh), named by a hash of /init and the fio binary.
#
# The guest's /init reads from the kernel command line:
#   vi_mode=migrate  fio loops over /dev/vda for vi_secs=N seconds (default
#                    30): each loop is a 16k random write of 16 MiB with a
#                    crc32c header per block, then reads all of it back and
#                    verifies it (verify_fatal), then "VI-READS n" and three
#                    more read+verify passes (fio verify_only: reads only).
#                    "VI-FIO-START" on the console when the first loop
#                    starts, "VI-LOOP n" after each.
#   vi_mode=write    the same job once (write + verify, fixed seed), then
#                    "VI-WRITTEN", then random reads until the VM is killed.
#   vi_mode=verify   only verifies what vi_mode=write wrote (fio verify_only).
# Last line: VI-RESULT=OK or VI-RESULT=FAIL <why> (fio's output before it),
# then the guest powers off.
set -euo pipefail
VM_PROG=fio-initrd
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../lib/vm-common.sh
. "$HERE/../lib/vm-common.sh"

[ $# -eq 1 ] && [ -d "$1" ] || vm_usage_die "usage: fio-initrd.sh DIR (an existing directory)"
OUTDIR=$(cd "$1" && pwd -P)
FIO=$(command -v fio) || vm_die "fio not found (Debian package fio): run scripts/install-deps.sh"

VM_INIT_MODULES="virtio_pci virtio_blk"
# replaces vm-common's /init (vm_prepare names the initramfs by a hash of it)
vm_write_init() {
cat >"$1" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu/ceph
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /tmp /dev/shm; mount -t tmpfs tmp /tmp; mount -t tmpfs shm /dev/shm
R=VI-RESULT
done_() { echo "$R=$*"; sync; poweroff -f; sleep 10; }
while read -r m; do insmod "/mods/$m" || done_ "FAIL insmod $m"; done </mods/order
MODE= SECS=30
for a in $(cat /proc/cmdline); do
  case "$a" in vi_mode=*) MODE=${a#vi_mode=} ;; vi_secs=*) SECS=${a#vi_secs=} ;; esac
done
i=0
while [ ! -b /dev/vda ]; do
  i=$((i+1)); [ $i -lt 300 ] || done_ "FAIL /dev/vda did not appear in 30 s"; sleep 0.1
done
# one job for every mode, so verify_only checks what write wrote
job() {
  seed=$1; shift
  fio --name=vi --filename=/dev/vda --thread --direct=1 --ioengine=libaio --iodepth=16 \
      --rw=randwrite --bs=16k --size=16m --verify=crc32c --verify_fatal=1 \
      --randseed="$seed" "$@" >/tmp/fio.out 2>&1
}
failed() { cat /tmp/fio.out; done_ "FAIL $1"; }
up() { cut -d. -f1 /proc/uptime; }
case "$MODE" in
  migrate)
    start=$(up) n=0
    echo VI-FIO-START
    while [ $(( $(up) - start )) -lt "$SECS" ]; do
      n=$((n+1))
      job "$n" || failed "fio loop $n"
      grep -q "err= 0" /tmp/fio.out || failed "fio loop $n reported an error"
      # a read-only phase the host can aim at (tests/guest_migration.rs)
      echo "VI-READS $n"
      for k in 1 2 3; do
        job "$n" --verify_only || failed "fio loop $n, verify pass $k"
        grep -q "err= 0" /tmp/fio.out || failed "fio loop $n, verify pass $k reported an error"
      done
      echo "VI-LOOP $n at $(cut -d' ' -f1 /proc/uptime)s"
    done
    cat /tmp/fio.out
    done_ "OK loops=$n" ;;
  write)
    job 42 || failed "fio write"
    grep -q "err= 0" /tmp/fio.out || failed "fio write reported an error"
    echo VI-WRITTEN
    while :; do
      fio --name=rr --filename=/dev/vda --thread --direct=1 --ioengine=libaio --iodepth=16 \
          --rw=randread --bs=4k --size=16m --time_based --runtime=60 >/dev/null 2>&1
    done ;;
  verify)
    job 42 --verify_only || failed "fio verify_only"
    grep -q "err= 0" /tmp/fio.out || failed "fio verify_only reported an error"
    cat /tmp/fio.out
    done_ OK ;;
  *) done_ "FAIL unknown vi_mode '$MODE'" ;;
esac
EOF
chmod 755 "$1"
}

vm_prepare
# fio and every library it loads, at the paths the loader looks for them
sum=$( { vm_write_init /dev/stdout; md5sum "$FIO"; ldd "$FIO"; } | md5sum | cut -c1-12)
FIO_INITRD=$VM_KDIR/fio-initrd-$sum.gz
exec 8>"$VM_CACHE/.lock"
flock -w 1200 8 || vm_die "timed out waiting for the cache lock $VM_CACHE/.lock"
if [ ! -f "$FIO_INITRD" ]; then
  vm_log "building $FIO_INITRD (fio and its libraries)"
  tmp=$(mktemp -d "$VM_CACHE/.fio.XXXXXX")
  mkdir -p "$tmp/root/usr/bin"
  cp -L "$FIO" "$tmp/root/usr/bin/fio"
  for lib in $(ldd "$FIO" | awk '/=>/ {print $3} /^\t\// {print $1}'); do
    mkdir -p "$tmp/root$(dirname "$lib")"
    cp -L "$lib" "$tmp/root$lib"
  done
  # the kernel unpacks concatenated cpio archives in order
  ( cd "$tmp/root" && find . | cpio -o -H newc --quiet | gzip -1 ) >"$tmp/extra.gz" \
    || { rm -rf "$tmp"; vm_die "packing fio into the initramfs failed"; }
  cat "$VM_INITRD" "$tmp/extra.gz" >"$FIO_INITRD.tmp" && mv "$FIO_INITRD.tmp" "$FIO_INITRD"
  rm -rf "$tmp"
fi
flock -u 8; exec 8>&-
install -m 0644 "$VM_KDIR/vmlinuz" "$OUTDIR/vmlinuz"
install -m 0644 "$FIO_INITRD" "$OUTDIR/initrd.gz"
echo "KERNEL=$OUTDIR/vmlinuz"
echo "INITRD=$OUTDIR/initrd.gz"
