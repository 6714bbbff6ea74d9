#!/bin/busybox sh
# /init of the test VM (tests/vm/run_vm_test.py builds the initramfs).
#
# Attaches the volume export and the snapshot export with the kernel's NBD
# client (nbd-client, /dev/nbd0 and /dev/nbd1) through virtio-serial ports
# and vm-relay, writes the planned ranges to the volume, and checks by bytes
# what the volume and the snapshot return. Reports on the console:
#   NBDSNAP-VM: PASS NAME
#   NBDSNAP-VM: FAIL NAME: WHY
#   NBDSNAP-VM: DONE            (last; then the VM powers off)
# The host knows which NAMEs to expect; a missing one is a failure too.
#
# /plan.sh (written by the host) sets VOL_EXPORT, SNAP_EXPORT, SIZE, MODULES
# (to insmod, in order) and RANGES ("NAME:MODE:OFFSET:LENGTH ...", MODE
# buffered or direct); /data/NAME.old and /data/NAME.new hold the bytes the
# range has before the writes (and in the snapshot) and after them.

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Kernel messages would interleave with the markers: keep them for dmesg.
echo 1 > /proc/sys/kernel/printk

say() { echo "NBDSNAP-VM: $*"; }
pass() { say "PASS $1"; }
fail() { say "FAIL $1: $2"; failures=$((failures + 1)); }
failures=0

finish() {
  echo "---- guest kernel messages about nbd, virtio, errors ----"
  dmesg | grep -iE 'nbd|virtio|vport|error|fail|warn' | tail -n 40 | sed 's/^/dmesg: /'
  say DONE
  sync
  poweroff -f
  sleep 5
  echo o > /proc/sysrq-trigger
}

. /plan.sh

# -- modules (no modules.dep: the host resolved the order) ---------------
for m in $MODULES; do
  out=$(insmod "/lib/modules/$m.ko" 2>&1) || { fail modules "insmod $m: $out"; finish; }
done
pass modules

# -- find the virtio-serial ports by name (no udev in here) ---------------
port_of() {  # NAME -> /dev/vportNpM
  for d in /sys/class/virtio-ports/*; do
    [ -f "$d/name" ] && [ "$(cat "$d/name")" = "$1" ] && { echo "/dev/${d##*/}"; return 0; }
  done
  return 1
}
for i in $(seq 1 100); do
  p0=$(port_of nbd0) && p1=$(port_of nbd1) && [ -c "$p0" ] && [ -c "$p1" ] && break
  sleep 0.1
done
if [ -c "$p0" ] && [ -c "$p1" ]; then
  pass ports
else
  fail ports "virtio-serial ports nbd0/nbd1 not found: $(ls /sys/class/virtio-ports 2>&1)"
  finish
fi

# -- attach ---------------------------------------------------------------
attach() {  # TEST DEV SOCK PORT EXPORT
  # Not in $(...): the relay stays in the background and keeps its output.
  vm-relay "$3" "$4" </dev/null >/dev/console 2>&1 \
    || { fail "$1" "vm-relay $3 $4 failed (message above)"; return 1; }
  out=$(nbd-client -unix "$3" "$2" -N "$5" -b 4096 2>&1) \
    || { fail "$1" "nbd-client -N $5: $out"; return 1; }
  size=$(blockdev --getsize64 "$2" 2>&1)
  [ "$size" = "$SIZE" ] || { fail "$1" "$2 has size '$size', expected $SIZE"; return 1; }
  pass "$1"
}
attach attach-volume /dev/nbd0 /run/nbd0.sock "$p0" "$VOL_EXPORT" || finish
attach attach-snapshot /dev/nbd1 /run/nbd1.sock "$p1" "$SNAP_EXPORT" || finish

# -- helpers --------------------------------------------------------------
# read_range DEV OFFSET LENGTH OUT: O_DIRECT read of the 4 KiB-aligned window
# around the range (so the bytes come from the server, not the page cache),
# then cut the range out of it.
read_range() {
  a=$(( $2 / 4096 * 4096 ))
  e=$(( ($2 + $3 + 4095) / 4096 * 4096 ))
  dd if="$1" of=/tmp/window bs=4096 skip=$((a / 4096)) count=$(((e - a) / 4096)) \
    iflag=direct status=none 2>/tmp/err || { cat /tmp/err; return 1; }
  dd if=/tmp/window of="$4" bs=4096 skip=$(($2 - a)) count="$3" \
    iflag=skip_bytes,count_bytes status=none 2>/tmp/err || { cat /tmp/err; return 1; }
}

# expect TEST DEV OFFSET LENGTH FILE: the range on DEV holds FILE's bytes.
expect() {
  out=$(read_range "$2" "$3" "$4" /tmp/got 2>&1) || { fail "$1" "read $2 at $3: $out"; return; }
  if cmp -s /tmp/got "$5"; then
    pass "$1"
  else
    fail "$1" "$2 at $3+$4: md5 $(md5sum < /tmp/got | cut -c1-32), expected $(md5sum < "$5" | cut -c1-32) ($5)"
  fi
}

# -- before the writes: both exports show the old bytes -------------------
for r in $RANGES; do
  IFS=: read -r name mode off len <<EOF
$r
EOF
  expect "before-volume-$name" /dev/nbd0 "$off" "$len" "/data/$name.old"
  expect "before-snapshot-$name" /dev/nbd1 "$off" "$len" "/data/$name.old"
done

# -- write the new bytes to the volume ------------------------------------
for r in $RANGES; do
  IFS=: read -r name mode off len <<EOF
$r
EOF
  case $mode in
    # through the page cache, then fsync (FLUSH)
    buffered) flags="oflag=seek_bytes conv=notrunc,fsync" ;;
    # O_DIRECT, one request, then fsync
    direct) flags="oflag=direct,seek_bytes conv=notrunc,fsync" ;;
  esac
  if out=$(dd if="/data/$name.new" of=/dev/nbd0 bs="$len" count=1 seek="$off" $flags status=none 2>&1); then
    pass "write-$name"
  else
    fail "write-$name" "dd $mode at $off+$len: $out"
  fi
done

# -- after: the volume has the new bytes, the snapshot the old ones --------
for r in $RANGES; do
  IFS=: read -r name mode off len <<EOF
$r
EOF
  expect "volume-$name" /dev/nbd0 "$off" "$len" "/data/$name.new"
  expect "snapshot-$name" /dev/nbd1 "$off" "$len" "/data/$name.old"
done

# Buffered reads after dropping the caches: the whole first range again.
blockdev --flushbufs /dev/nbd0 && blockdev --flushbufs /dev/nbd1
echo 3 > /proc/sys/vm/drop_caches
set -- $(echo "${RANGES%% *}" | tr : ' ')
dd if=/dev/nbd0 of=/tmp/got bs=4096 skip="$3" count="$4" iflag=skip_bytes,count_bytes status=none
if cmp -s /tmp/got "/data/$1.new"; then pass buffered-read-volume; else fail buffered-read-volume "$1 differs"; fi
dd if=/dev/nbd1 of=/tmp/got bs=4096 skip="$3" count="$4" iflag=skip_bytes,count_bytes status=none
if cmp -s /tmp/got "/data/$1.old"; then pass buffered-read-snapshot; else fail buffered-read-snapshot "$1 differs"; fi

# -- the snapshot export is read-only --------------------------------------
ro=$(blockdev --getro /dev/nbd1 2>&1)
if [ "$ro" = 1 ]; then pass snapshot-device-ro; else fail snapshot-device-ro "blockdev --getro /dev/nbd1 says '$ro'"; fi
if out=$(dd if="/data/$1.new" of=/dev/nbd1 bs="$4" count=1 seek="$3" oflag=direct,seek_bytes conv=notrunc,fsync 2>&1); then
  fail snapshot-write-refused "a write to /dev/nbd1 succeeded"
else
  pass snapshot-write-refused
  echo "(the refused write said: $out)"
fi
expect snapshot-unchanged-after-write /dev/nbd1 "$3" "$4" "/data/$1.old"

# -- detach -----------------------------------------------------------------
out0=$(nbd-client -d /dev/nbd0 2>&1); rc0=$?
out1=$(nbd-client -d /dev/nbd1 2>&1); rc1=$?
if [ $rc0 = 0 ] && [ $rc1 = 0 ]; then pass detach; else fail detach "nbd-client -d: $out0 $out1"; fi

echo "guest: $failures failure(s)"
finish
