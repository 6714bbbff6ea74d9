#!/usr/bin/env bash
# The main job on a default setup: installs what is missing, builds, then
# starts nbdsnapd (which runs nbdkit + the nbdsnap plugin) on a demo volume,
# writes data, takes a snapshot with the nbdsnap CLI, shows the exports with
# nbdinfo, changes the origin, shows that the snapshot export keeps the old
# bytes and what change tracking reports, backs the snapshot up with
# `nbdsnap backup` (full), takes a second snapshot and backs it up
# incrementally (only the changed blocks are read), verifies the chain,
# restores both points and compares them with copies taken at each
# snapshot, then destroys the snapshots and stops the daemon.
# Everything listens on Unix sockets in a temporary directory.
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
dir=$(mktemp -d "${TMPDIR:-/tmp}/nbdsnap-demo.XXXXXX")
export NBDSNAP_API=$dir/api.sock
nbdsnap() { "$build/client/nbdsnap" "$@"; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
step() { printf '\n== %s\n' "$*"; }

daemon_pid=
cleanup() {
  if [ -n "$daemon_pid" ]; then kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null; fi
  if [ $keep = 1 ]; then echo "demo files kept in $dir"; else rm -rf "$dir"; fi
}
trap cleanup EXIT

vol="nbd+unix:///vol0?socket=$dir/nbd.sock"
snap="nbd+unix:///vol0@demo?socket=$dir/nbd.sock"

step "create a 256 MiB demo volume in $dir"
truncate -s 256M "$dir/vol0.img"

step "start nbdsnapd: API on $dir/api.sock, NBD on $dir/nbd.sock"
echo "nbdsnapd --foreground --state-dir $dir/state --api-socket $dir/api.sock --nbd-socket $dir/nbd.sock --volume vol0=$dir/vol0.img --param diff_storage_minimum=131072"
"$build/server/nbdsnapd" --foreground --state-dir "$dir/state" --api-socket "$dir/api.sock" \
  --nbd-socket "$dir/nbd.sock" --plugin "$build/plugin/nbdkit-nbdsnap-plugin.so" \
  --volume vol0="$dir/vol0.img" --param diff_storage_minimum=131072 2>"$dir/nbdsnapd.log" &
daemon_pid=$!
for _ in $(seq 100); do nbdsnap version >/dev/null 2>&1 && break; sleep 0.1; done
nbdsnap version
nbdsnap volume list

step "write 8 MiB of 0xaa at offset 0 over NBD (qemu-io)"
qemu-io -f raw -c 'write -P 0xaa 0 8M' "$vol" | head -1

step "create and take snapshot 'demo' (managed difference storage)"
nbdsnap snapshot create vol0 --name demo
nbdsnap snapshot take demo
gen=$(nbdsnap --json cbt info vol0 | json 'd["generation"]')
seq=$(nbdsnap --json snapshot info demo | json 'd["sequence"]')
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
nbdsnap cbt changes vol0 --since "$gen:$seq"
echo "the snapshot's own view, since the beginning:"
nbdsnap cbt changes vol0 --since "$gen:0" --snapshot demo

step "full backup of the snapshot over NBD into a qcow2 chain (nbdsnap backup)"
nbdsnap backup demo --to "$dir/backups"
nbdsnap snapshot info demo | grep -E 'state|sequence|storage'

step "second snapshot, then an incremental backup: only the changed CBT blocks are read"
nbdsnap snapshot create vol0 --name demo2 >/dev/null
nbdsnap snapshot take demo2 >/dev/null
cp --sparse=always "$dir/vol0.img" "$dir/expected2.img"
nbdsnap backup demo2 --to "$dir/backups"
ls "$dir/backups"
qemu-img info --backing-chain "$dir/backups/backup-0002.qcow2" | grep -E '^image:|^backing file:'

step "verify the chain, restore both points and compare with the copies taken at each snapshot"
nbdsnap verify "$dir/backups"
nbdsnap restore "$dir/backups" --backup 1 --to "$dir/restored1.img"
nbdsnap restore "$dir/backups" --backup 2 --to "$dir/restored2.img"
qemu-img compare -f raw -F raw "$dir/restored1.img" "$dir/expected.img"
qemu-img compare -f raw -F raw "$dir/restored2.img" "$dir/expected2.img"
echo "qemu-img reads a point of the chain by itself:"
qemu-img compare -f qcow2 -F raw "$dir/backups/backup-0002.qcow2" "$dir/expected2.img"

step "destroy the snapshots"
nbdsnap snapshot destroy demo
nbdsnap snapshot destroy demo2
nbdinfo --list "nbd+unix:///?socket=$dir/nbd.sock" | grep -E '^export='
echo
echo "demo complete: served, snapshotted, tracked, backed up (full + incremental) and restored."
