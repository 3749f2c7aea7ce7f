# vm-common.sh - shared functions of the vhost-iser VM harness (sourced, not run).
#
# One kernel (Debian's linux-image-amd64), one initramfs, two users:
#   qemu/run-guest.sh  guest with vhost-user-blk disks (fio, end-to-end tests)
#   qemu/rdma-vm.sh    soft-RoCE (rdma_rxe) VM for iSER against tgtd / LIO
#
# The initramfs /init mounts the host's / read-only over 9p under a tmpfs
# overlay (writes allowed, lost at power-off), chroots into it and runs
# /run/vm-ctl/inner.sh, a script the host writes per run into a "control" 9p
# share. inner.sh restores the caller's environment and cwd, runs the command
# and writes its exit status to the control share; /init also prints it on the
# console (VM_RC_MARKER) as a fallback, then powers off.
#
# Caller contract (set before vm_run):
#   VM_PROG        name for messages
#   VM_MEM VM_CPUS VM_TIMEOUT   MiB, count, seconds
#   VM_RW=()       host dirs made writable in the VM (same path)
#   VM_QEMU=()     extra qemu arguments (devices)
#   VM_PRELUDE     shell text run as root in the VM before the command
#   VM_VERBOSE     1 = kernel messages on the console, print the qemu command
# Exit codes: the command's; 124 timeout; 125 harness error; 2 usage error.

VM_PROG=${VM_PROG:-vm}
VM_CACHE=${VHOST_ISER_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vhost-iser-vm}
VM_RC_MARKER=VHOST-ISER-VM-RC=
# insmod'ed by /init, in dependency order (modprobe --show-depends resolves it)
VM_INIT_MODULES="virtio_pci virtio_blk 9pnet_virtio 9p overlay"
# module trees nobody here needs: dropped from the cache (~60% of its size)
VM_PRUNE="sound drivers/gpu drivers/media drivers/net/wireless drivers/staging drivers/bluetooth
  net/bluetooth net/wireless net/mac80211 drivers/iio drivers/usb drivers/hid drivers/input
  drivers/video drivers/platform drivers/hwmon drivers/mtd drivers/isdn drivers/net/can net/can"
VM_MEM=${VM_MEM:-1024} VM_CPUS=${VM_CPUS:-2} VM_TIMEOUT=${VM_TIMEOUT:-600} VM_VERBOSE=${VM_VERBOSE:-0}
VM_PRELUDE=${VM_PRELUDE:-}
[ -n "${VM_RW+x}" ] || VM_RW=()
[ -n "${VM_QEMU+x}" ] || VM_QEMU=()
PATH=$PATH:/usr/sbin:/sbin

vm_log() { echo "$VM_PROG: $*" >&2; }
vm_die() { echo "$VM_PROG: error: $*" >&2; exit 125; }
vm_usage_die() { echo "$VM_PROG: $* (see --help)" >&2; exit 2; }
vm_is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# vm_require_tools: fail early, with the fix, when a host tool is missing.
vm_require_tools() {
  local t missing=()
  for t in qemu-system-x86_64 apt-get dpkg-deb depmod modprobe cpio gzip timeout flock md5sum; do
    command -v "$t" >/dev/null || missing+=("$t")
  done
  [ ${#missing[@]} -eq 0 ] || vm_die "missing host tools: ${missing[*]} (run scripts/install-deps.sh)"
}

# vm_kernel_pkg: name of the versioned kernel package linux-image-amd64 depends on.
vm_kernel_pkg() {
  local p
  if [ -n "${VHOST_ISER_VM_KERNEL_PKG:-}" ]; then echo "$VHOST_ISER_VM_KERNEL_PKG"; return; fi
  p=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  if [ -z "$p" ] && [ "$(id -u)" = 0 ]; then   # fresh machine: empty package lists
    apt-get -qq -o DPkg::Lock::Timeout=300 update >/dev/null 2>&1 || true
    p=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  fi
  echo "$p"
}

# vm_write_init FILE: the initramfs /init (busybox sh, PID 1).
vm_write_init() {
cat >"$1" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
fail() {
  echo "VM-INIT: $*"; echo 125 >/ctl/rc 2>/dev/null; sync
  echo "VHOST-ISER-VM-RC=125"; poweroff -f; sleep 10
}
while read -r m; do insmod "/mods/$m" || fail "insmod $m failed"; done </mods/order
O="trans=virtio,version=9p2000.L,msize=262144"
mount -t 9p -o "$O" ctl /ctl || fail "cannot mount the control share"
# cache=loose: ~20% faster; files changed on the host during a run may look stale
mount -t 9p -o "$O,ro,cache=loose" host /host || fail "cannot mount the host root"
mount -t tmpfs -o mode=755 ovl /ovl && mkdir /ovl/u /ovl/w || fail "tmpfs"
mount -t overlay -o lowerdir=/host,upperdir=/ovl/u,workdir=/ovl/w root /newroot || fail "overlay mount failed"
R=/newroot
mount -t proc proc $R/proc; mount -t sysfs sys $R/sys; mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm $R/run
mount -t devpts devpts $R/dev/pts; mount -t tmpfs shm $R/dev/shm; mount -t tmpfs -o mode=755 run $R/run
mount -t configfs configfs $R/sys/kernel/config 2>/dev/null
mkdir -p $R/run/vm-ctl $R/lib/modules
mount -o bind /ctl $R/run/vm-ctl || fail "bind control share"
MODS=$(cat /ctl/modules)
mount -o bind "/host$MODS" $R/lib/modules || fail "bind $MODS"
i=0
while read -r d; do
  [ -n "$d" ] || continue
  mkdir -p "$R$d"
  mount -t 9p -o "$O" "rw$i" "$R$d" || fail "cannot mount writable share $d"
  i=$((i+1))
done </ctl/rw
# modules the kernel itself requests (crypto, net families) come from the chroot
printf '#!/bin/sh\nexec chroot /newroot /sbin/modprobe "$@"\n' >/bin/vm-modprobe
chmod 755 /bin/vm-modprobe; echo /bin/vm-modprobe >/proc/sys/kernel/modprobe
chroot $R /bin/bash /run/vm-ctl/inner.sh
rc=$?
[ -s /ctl/rc ] || echo "$rc" >/ctl/rc
sync
while read -r d; do [ -n "$d" ] && umount "$R$d" 2>/dev/null; done </ctl/rw
echo "VHOST-ISER-VM-RC=$(cat /ctl/rc)"
poweroff -f
sleep 10
EOF
chmod 755 "$1"
}

# vm_fetch_kernel KPKG DIR: download + unpack the kernel and busybox into DIR.
vm_fetch_kernel() {
  local kpkg=$1 dir=$2 kver=${1#linux-image-} tmp d
  vm_log "first use: fetching $kpkg + busybox-static into $dir (~75 MB)"
  tmp=$(mktemp -d "$VM_CACHE/.build.XXXXXX")
  chmod 755 "$tmp"; chown _apt "$tmp" 2>/dev/null || true   # apt's download sandbox user
  ( cd "$tmp" && timeout 900 apt-get -qq download "$kpkg" busybox-static ) >"$tmp/apt.log" 2>&1 \
    || { cat "$tmp/apt.log" >&2; rm -rf "$tmp"; vm_die "apt-get download $kpkg busybox-static failed (package lists stale? run apt-get update)"; }
  dpkg-deb -x "$tmp"/linux-image-*.deb "$tmp/k" || { rm -rf "$tmp"; vm_die "cannot unpack $kpkg"; }
  dpkg-deb -x "$tmp"/busybox-static_*.deb "$tmp/bb" || { rm -rf "$tmp"; vm_die "cannot unpack busybox-static"; }
  local mroot=$tmp/k
  [ -d "$mroot/lib/modules/$kver" ] || mroot=$tmp/k/usr
  [ -f "$tmp/k/boot/vmlinuz-$kver" ] && [ -d "$mroot/lib/modules/$kver" ] \
    || { rm -rf "$tmp"; vm_die "$kpkg has no vmlinuz-$kver / lib/modules/$kver"; }
  for d in $VM_PRUNE; do rm -rf "$mroot/lib/modules/$kver/kernel/$d"; done
  depmod -b "$mroot" "$kver" || { rm -rf "$tmp"; vm_die "depmod failed"; }
  mkdir -p "$tmp/out/lib/modules"
  mv "$mroot/lib/modules/$kver" "$tmp/out/lib/modules/$kver"
  mv "$tmp/k/boot/vmlinuz-$kver" "$tmp/out/vmlinuz"
  mv "$tmp/bb/bin/busybox" "$tmp/out/busybox"
  echo "$kver" >"$tmp/out/kver"
  rm -rf "$dir"; mv "$tmp/out" "$dir"; rm -rf "$tmp"
}

# vm_build_initrd DIR OUT: busybox + early modules + /init, packed as newc cpio.gz.
vm_build_initrd() {
  local dir=$1 out=$2 kver ir m line ko base
  kver=$(cat "$dir/kver")
  ir=$(mktemp -d "$VM_CACHE/.initrd.XXXXXX")
  mkdir -p "$ir"/{bin,dev,proc,sys,ctl,host,ovl,newroot,mods}
  cp "$dir/busybox" "$ir/bin/busybox"
  : >"$ir/mods/order"
  for m in $VM_INIT_MODULES; do
    modprobe -d "$dir" -S "$kver" --show-depends "$m" >"$ir/deps" 2>&1 \
      || { cat "$ir/deps" >&2; rm -rf "$ir"; vm_die "cannot resolve module $m for $kver"; }
    while read -r line; do
      case "$line" in insmod\ *) ko=${line#insmod }; ko=${ko%% *} ;; *) continue ;; esac
      base=$(basename "$ko"); base=${base%.xz}; base=${base%.zst}; base=${base%.gz}
      grep -qx "$base" "$ir/mods/order" && continue
      case "$ko" in      # busybox insmod cannot read compressed modules
        *.xz) xz -dc "$ko" >"$ir/mods/$base" ;;
        *.zst) zstd -qdc "$ko" >"$ir/mods/$base" ;;
        *.gz) gzip -dc "$ko" >"$ir/mods/$base" ;;
        *) cp "$ko" "$ir/mods/$base" ;;
      esac || { rm -rf "$ir"; vm_die "cannot copy module $ko"; }
      echo "$base" >>"$ir/mods/order"
    done <"$ir/deps"
  done
  rm -f "$ir/deps"
  vm_write_init "$ir/init"
  ( cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1 ) >"$out.tmp" \
    || { rm -rf "$ir" "$out.tmp"; vm_die "packing the initramfs failed"; }
  mv "$out.tmp" "$out"; rm -rf "$ir"
}

# vm_prepare: make sure kernel, modules and initramfs are cached.
# Sets VM_KDIR VM_KVER VM_INITRD. Safe to run concurrently (flock).
vm_prepare() {
  local kpkg sum
  vm_require_tools
  mkdir -p "$VM_CACHE" || vm_die "cannot create cache dir $VM_CACHE"
  VM_CACHE=$(cd "$VM_CACHE" && pwd -P)
  exec 8>"$VM_CACHE/.lock"
  flock -w 1200 8 || vm_die "timed out waiting for the cache lock $VM_CACHE/.lock"
  kpkg=$(vm_kernel_pkg)
  if [ -n "$kpkg" ]; then
    VM_KDIR=$VM_CACHE/${kpkg#linux-image-}
    [ -f "$VM_KDIR/kver" ] || vm_fetch_kernel "$kpkg" "$VM_KDIR"
  else   # no package lists and not root: use the newest cached kernel
    VM_KDIR=$(ls -d "$VM_CACHE"/*/kver 2>/dev/null | sort -V | tail -1)
    [ -n "$VM_KDIR" ] || vm_die "cannot find Debian's kernel package (apt-cache depends linux-image-amd64 is empty; run apt-get update)"
    VM_KDIR=${VM_KDIR%/kver}
  fi
  VM_KVER=$(cat "$VM_KDIR/kver")
  # the initramfs is named by a hash of what goes into it: edits rebuild it
  sum=$( { vm_write_init /dev/stdout; echo "$VM_INIT_MODULES $VM_KVER"; } | md5sum | cut -c1-12)
  VM_INITRD=$VM_KDIR/initrd-$sum.gz
  [ -f "$VM_INITRD" ] || { vm_log "building initramfs $VM_INITRD"; vm_build_initrd "$VM_KDIR" "$VM_INITRD"; }
  flock -u 8; exec 8>&-
}

# vm_run CMD...: boot, run CMD (in the caller's cwd and environment), exit with its status.
vm_run() {
  local ctl qrc rc start wall d i accel cpu append
  vm_prepare
  ctl=$(mktemp -d "${TMPDIR:-/tmp}/vhost-iser-vm.XXXXXX") || vm_die "mktemp failed"
  # shellcheck disable=SC2064
  VM_QPID=""
  trap "[ -n \"\${VM_QPID:-}\" ] && kill \$VM_QPID 2>/dev/null; rm -rf '$ctl'" EXIT
  trap 'exit 130' INT TERM
  echo "$VM_KDIR/lib/modules" >"$ctl/modules"
  : >"$ctl/rw"
  for d in "${VM_RW[@]}"; do printf '%s\n' "$d" >>"$ctl/rw"; done
  {
    echo '# generated by vm-common.sh: runs as root in the VM chroot'
    echo 'exec </dev/null'
    # caller's environment, minus what describes the host shell or terminal
    export -p | grep -vE '^declare -x (PWD|OLDPWD|SHLVL|_|TERM|TMPDIR|DISPLAY|SHELLOPTS|BASHOPTS|SSH_[A-Z_]*|XDG_RUNTIME_DIR)(=|$)' || true
    echo 'export TERM=dumb VHOST_ISER_VM=1'
    echo 'export PATH=${PATH:-/usr/bin:/bin}:/usr/local/sbin:/usr/sbin:/sbin'
    echo 'vm_setup_fail() { echo "VM-SETUP: $*"; echo 125 >/run/vm-ctl/rc; exit 125; }'
    echo 'read -r up _ </proc/uptime'
    printf '%s\n' "$VM_PRELUDE"
    echo 'read -r up2 _ </proc/uptime; echo "vm: ready at uptime ${up2}s (init ${up}s)" >&2'
    printf 'cd %q || vm_setup_fail "cannot cd to %q"\n' "$PWD" "$PWD"
    printf '%q ' "$@"; echo
    echo 'rc=$?; echo $rc >/run/vm-ctl/rc; exit $rc'
  } >"$ctl/inner.sh"

  accel=${VHOST_ISER_ACCEL:-tcg}
  cpu=max; [ "$accel" = kvm ] && cpu=host
  append="console=ttyS0 panic=-1 oops=panic mitigations=off"
  [ "$VM_VERBOSE" = 1 ] || append="$append quiet loglevel=1"
  local q=(qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot
    -accel "$accel" -cpu "$cpu" -smp "$VM_CPUS"
    -object "memory-backend-memfd,id=mem,size=${VM_MEM}M,share=on"
    -machine q35,memory-backend=mem -m "${VM_MEM}M"
    -kernel "$VM_KDIR/vmlinuz" -initrd "$VM_INITRD" -append "$append"
    -chardev "stdio,id=ser0,signal=off,logfile=$ctl/console.log" -serial chardev:ser0
    -virtfs "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap"
    -virtfs "local,path=$ctl,mount_tag=ctl,security_model=none,multidevs=remap")
  i=0
  for d in "${VM_RW[@]}"; do
    q+=(-virtfs "local,path=$d,mount_tag=rw$i,security_model=none,multidevs=remap"); i=$((i+1))
  done
  q+=("${VM_QEMU[@]}")
  [ "$VM_VERBOSE" = 1 ] && vm_log "${q[*]}"

  start=$(date +%s.%N)
  set +e
  # console: CRs stripped, line-buffered (plain tr would block-buffer)
  timeout -k 10 "$VM_TIMEOUT" "${q[@]}" </dev/null > >(sed -u 's/\r$//') 2>&1 &
  VM_QPID=$!
  wait "$VM_QPID"; qrc=$?
  VM_QPID=""
  set -e
  sleep 0.1   # let sed flush
  wall=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
    vm_log "TIMEOUT after ${VM_TIMEOUT}s (qemu killed), wall ${wall}s"; exit 124
  fi
  rc=$(tr -dc 0-9 <"$ctl/rc" 2>/dev/null || true)
  if [ -z "$rc" ]; then
    rc=$(grep -a -o "${VM_RC_MARKER}[0-9]*" "$ctl/console.log" 2>/dev/null | tail -1 || true)
    rc=${rc#"$VM_RC_MARKER"}
  fi
  [ -n "$rc" ] || vm_die "the VM reported no exit status (qemu rc=$qrc, wall ${wall}s): see the console output above"
  vm_log "command rc=$rc, wall ${wall}s"
  exit "$rc"
}
