#!/usr/bin/env bash
# The main job on a default setup: installs what is missing, builds, then
# serves a demo volume through nbdkit + the nbdsnap plugin, writes data,
# takes a snapshot through the control link, changes the origin, shows that
# the snapshot export keeps the old bytes and what change tracking reports,
# backs the snapshot up with nbdcopy and checks the copy, then destroys the
# snapshot. Everything listens on Unix sockets in a temporary directory.
#
#   scripts/demo.sh [--keep]      (--keep leaves the demo directory behind)
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
keep=0
[ "${1:-}" = "--keep" ] && keep=1
build=${NBDSNAP_BUILD:-$top/build}
echo "building in $build (scripts/setup.sh)"
"$top/scripts/setup.sh" "$build" | tail -1

# Debian's python3 has the libnbd module (a pyenv python3 may not).
export PATH=/usr/bin:$PATH
plugin=$build/plugin/nbdkit-nbdsnap-plugin.so
link() { "$build/client/nbdsnap-link" --socket "$dir/control.sock" "$@"; }
step() { printf '\n== %s\n' "$*"; }

dir=$(mktemp -d "${TMPDIR:-/tmp}/nbdsnap-demo.XXXXXX")
nbdkit_pid=
cleanup() {
  [ -n "$nbdkit_pid" ] && kill "$nbdkit_pid" 2>/dev/null && wait "$nbdkit_pid" 2>/dev/null
  if [ $keep = 1 ]; then echo "demo files kept in $dir"; else rm -rf "$dir"; fi
}
trap cleanup EXIT

vol="nbd+unix:///vol0?socket=$dir/nbd.sock"
snap="nbd+unix:///vol0@demo?socket=$dir/nbd.sock"

step "create a 256 MiB volume and 64 MiB of difference storage in $dir"
truncate -s 256M "$dir/vol0.img"
truncate -s 64M "$dir/diff.img"

step "serve it: nbdkit + nbdsnap plugin on a Unix socket"
echo "nbdkit -f -U $dir/nbd.sock $plugin volume=vol0=$dir/vol0.img state=$dir/state control=$dir/control.sock"
nbdkit -f -U "$dir/nbd.sock" "$plugin" volume=vol0="$dir/vol0.img" \
  state="$dir/state" control="$dir/control.sock" 2>"$dir/nbdkit.log" &
nbdkit_pid=$!
for _ in $(seq 100); do [ -S "$dir/nbd.sock" ] && [ -S "$dir/control.sock" ] && break; sleep 0.1; done
link version

step "write 8 MiB of 0xaa at offset 0 over NBD (qemu-io)"
qemu-io -f raw -c 'write -P 0xaa 0 8M' "$vol" | head -1

step "create and take snapshot 'demo'"
id=$(link create vol0 --name demo)
echo "snapshot id $id"
link append-storage demo "$dir/diff.img" 0:64M
link take demo
gen=$(link --json cbt-info vol0 | python3 -c 'import json,sys; print(json.load(sys.stdin)["cbt_info"]["generation"])')
seq=$(link --json info demo | python3 -c 'import json,sys; print(json.load(sys.stdin)["info"]["snapshot"]["sequence"])')
cp --sparse=always "$dir/vol0.img" "$dir/expected.img"   # what the snapshot must show

step "nbdinfo --list: the volume and its snapshot export"
nbdinfo --list "nbd+unix:///?socket=$dir/nbd.sock" | grep -E '^export=|description:'

step "change the origin: 1 MiB of 0x55 at 4 MiB, 64 KiB of 0x77 at 200 MiB"
qemu-io -f raw -c 'write -P 0x55 4M 1M' -c 'write -P 0x77 200M 64K' "$vol" | grep -c wrote | sed 's/^/writes done: /'

step "the snapshot export still has the old bytes (qemu-io -r verifies the pattern)"
qemu-io -r -f raw -c 'read -P 0xaa 4M 1M' -c 'read -P 0x00 200M 64K' "$snap" | grep -E 'read|fail'
echo "origin now:"
qemu-io -r -f raw -c 'read -P 0x55 4M 1M' "$vol" | grep -E 'read|fail'

step "change tracking: what changed since the snapshot (generation $gen, sequence $seq)"
link cbt-changes vol0 --since "$gen:$seq"
echo "the snapshot's own view, since the beginning:"
link cbt-changes vol0 --since "$gen:0" --snapshot demo

step "back the snapshot up over NBD (nbdcopy) and check the copy"
nbdcopy "$snap" "$dir/backup.img"
qemu-img compare -f raw -F raw "$dir/backup.img" "$dir/expected.img"
link info demo

step "destroy the snapshot"
link destroy demo
nbdinfo --list "nbd+unix:///?socket=$dir/nbd.sock" | grep -E '^export='
echo
echo "demo complete: served, snapshotted, tracked and backed up."
