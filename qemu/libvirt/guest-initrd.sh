#!/bin/bash
# guest-initrd.sh - kernel + initramfs for a libvirt-started guest that checks
# its vhost-iser disk (/dev/vda) and reports on the serial console.
#
# usage: qemu/libvirt/guest-initrd.sh DIR
#   Copies vmlinuz and initrd.gz into DIR (world-readable: QEMU runs as
#   libvirt-qemu and cannot reach the harness cache under /root).
#   Prints "KERNEL=<path>" and "INITRD=<path>".
#
# Uses the VM harness cache (qemu/lib/vm-common.sh: Debian kernel, busybox);
# only /init differs: no 9p shares (a libvirt domain has none), it runs the
# disk check itself. Kernel command line parameters it reads:
#   vi_token=T   the patterns are "vhost-iser-libvirt host T\n" (expected in
#                the disk's first MiB, written there by the host) and
#                "vhost-iser-libvirt guest T\n" (written to the second MiB),
#                each repeated and cut to 1 MiB
# Console lines: VHOST-ISER-LIBVIRT-SIZE=<bytes of vda>,
#   VHOST-ISER-LIBVIRT-RESULT=OK or VHOST-ISER-LIBVIRT-RESULT=FAIL <why>;
# then the guest powers off (on_poweroff=destroy ends the domain).
set -euo pipefail
VM_PROG=libvirt-initrd
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../lib/vm-common.sh
. "$HERE/../lib/vm-common.sh"

[ $# -eq 1 ] && [ -d "$1" ] || vm_usage_die "usage: guest-initrd.sh DIR (an existing directory)"
OUTDIR=$(cd "$1" && pwd -P)

VM_INIT_MODULES="virtio_pci virtio_blk"
# replaces vm-common's /init (vm_prepare names the initramfs by a hash of it)
vm_write_init() {
cat >"$1" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /tmp; mount -t tmpfs tmp /tmp
R=VHOST-ISER-LIBVIRT-RESULT
done_() { echo "$R=$*"; sync; poweroff -f; sleep 10; }
while read -r m; do insmod "/mods/$m" || done_ "FAIL insmod $m"; done </mods/order
TOKEN=
for a in $(cat /proc/cmdline); do case "$a" in vi_token=*) TOKEN=${a#vi_token=} ;; esac; done
[ -n "$TOKEN" ] || done_ "FAIL no vi_token= on the kernel command line"
i=0
while [ ! -b /dev/vda ]; do
  i=$((i+1)); [ $i -lt 300 ] || done_ "FAIL /dev/vda did not appear in 30 s"; sleep 0.1
done
echo "VHOST-ISER-LIBVIRT-SIZE=$(( $(cat /sys/block/vda/size) * 512 ))"
# pattern NAME FILE: "vhost-iser-libvirt NAME TOKEN\n" repeated, cut to 1 MiB
pattern() {
  echo "vhost-iser-libvirt $1 $TOKEN" >/tmp/p
  while [ "$(wc -c </tmp/p)" -lt 1048576 ]; do cat /tmp/p /tmp/p >/tmp/p2; mv /tmp/p2 /tmp/p; done
  head -c 1048576 /tmp/p >"$2"; rm -f /tmp/p
}
pattern host /tmp/host; pattern guest /tmp/guest
# 1. read what the host put on the LUN (the read path: tgtd -> vhost-iser -> guest)
dd if=/dev/vda of=/tmp/r1 bs=65536 count=16 iflag=direct 2>/tmp/dd.log || done_ "FAIL read of MiB 0: $(cat /tmp/dd.log)"
cmp -s /tmp/r1 /tmp/host || done_ "FAIL MiB 0 does not hold the host's pattern: $(head -c 60 /tmp/r1 | tr -c '[:print:]' .)"
# 2. write our pattern to MiB 1, bypassing the page cache, and read it back
dd if=/tmp/guest of=/dev/vda bs=65536 seek=16 count=16 oflag=direct conv=fsync,notrunc 2>/tmp/dd.log \
  || done_ "FAIL write of MiB 1: $(cat /tmp/dd.log)"
echo 3 >/proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/r2 bs=65536 skip=16 count=16 iflag=direct 2>/tmp/dd.log || done_ "FAIL read-back of MiB 1: $(cat /tmp/dd.log)"
cmp -s /tmp/r2 /tmp/guest || done_ "FAIL MiB 1 read back differs from what was written"
done_ OK
EOF
chmod 755 "$1"
}

vm_prepare
install -m 0644 "$VM_KDIR/vmlinuz" "$OUTDIR/vmlinuz"
install -m 0644 "$VM_INITRD" "$OUTDIR/initrd.gz"
echo "KERNEL=$OUTDIR/vmlinuz"
echo "INITRD=$OUTDIR/initrd.gz"
