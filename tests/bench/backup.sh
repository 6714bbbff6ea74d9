#!/usr/bin/env bash
# Backup benchmark: `nbdsnap backup` (full, into a qcow2 file through
# qemu-nbd, with a CRC-32C per block) against `nbdcopy` copying the same
# snapshot export to a local raw file, in the same run; then the bytes an
# incremental backup reads after 1% of the volume changed.
#
#   tests/bench/backup.sh [--size 4G] [--build DIR] [--rounds 3] [--out DIR] [--keep]
#
# The volume is SIZE bytes of random data (fully allocated), served by
# nbdsnapd on a Unix socket; one snapshot is taken and both tools read its
# export VOLUME@s1 with 4 connections. Rounds alternate the order of the
# two; the table shows medians and the ratio of throughputs (target >= 0.8).
# The backup is durable when it ends (fsync before the manifest); plain
# nbdcopy is not, so `nbdcopy --flush` is measured too, for information.
# Incremental: 1% of the volume rewritten in random 64 KiB writes (target:
# bytes read <= 2% of the volume), and, for information, 1% in random 4 KiB
# writes (CBT granularity: each touches a whole 64 KiB block).
# Writes OUT/backup-latest.json (OUT defaults to BUILD/bench).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
size=4G
build=build
rounds=3
out=
keep=0
while [ $# -gt 0 ]; do
  case $1 in
    --size) size=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "backup.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
case $build in /*) ;; *) build=$top/$build ;; esac
out=${out:-$build/bench}
mkdir -p "$out"
for f in "$build/server/nbdsnapd" "$build/client/nbdsnap" "$build/plugin/nbdkit-nbdsnap-plugin.so"; do
  [ -e "$f" ] || { echo "backup.sh: $f is not built (scripts/setup.sh)" >&2; exit 1; }
done
for t in nbdcopy qemu-img qemu-nbd; do
  command -v $t >/dev/null || { echo "backup.sh: $t is not installed (scripts/setup.sh)" >&2; exit 1; }
done

dir=$(mktemp -d "${TMPDIR:-/var/tmp}/nbdsnap-backup-bench.XXXXXX")
daemon=
cleanup() {
  [ -n "$daemon" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
  [ $keep = 1 ] && echo "kept $dir" || rm -rf "$dir"
}
trap cleanup EXIT
export NBDSNAP_API=$dir/api.sock
nbdsnap=$build/client/nbdsnap
bytes=$(numfmt --from=iec "$size")

echo "backup bench: $size of random data in $dir" >&2
head -c 64M /dev/urandom >"$dir/chunk"
: >"$dir/vol0.img"
for _ in $(seq $((bytes / (64 << 20)))); do cat "$dir/chunk" >>"$dir/vol0.img"; done
rm "$dir/chunk"
"$build/server/nbdsnapd" --foreground --state-dir "$dir/state" --api-socket "$dir/api.sock" \
  --nbd-socket "$dir/nbd.sock" --plugin "$build/plugin/nbdkit-nbdsnap-plugin.so" \
  --volume vol0="$dir/vol0.img" 2>"$dir/nbdsnapd.log" &
daemon=$!
for _ in $(seq 100); do "$nbdsnap" version >/dev/null 2>&1 && break; sleep 0.1; done
"$nbdsnap" snapshot create vol0 --name s1 >/dev/null
"$nbdsnap" snapshot take s1 >/dev/null
uri="nbd+unix:///vol0@s1?socket=$dir/nbd.sock"

now() { date +%s.%N; }
run_nbdcopy() {
  rm -f "$dir/copy.raw"
  local t0; t0=$(now)
  nbdcopy --connections=4 "$uri" "$dir/copy.raw"
  sync -f "$dir/copy.raw" 2>/dev/null || true
  echo "$(now) - $t0" | bc
}
run_nbdcopy_flush() {
  rm -f "$dir/copy.raw"
  local t0; t0=$(now)
  nbdcopy --connections=4 --flush "$uri" "$dir/copy.raw"
  echo "$(now) - $t0" | bc
}
run_backup() {
  rm -rf "$dir/full"
  local t0; t0=$(now)
  "$nbdsnap" --json backup s1 --to "$dir/full" --connections 4 >"$dir/full.json"
  echo "$(now) - $t0" | bc
}
copy_times=() flush_times=() backup_times=()
for r in $(seq "$rounds"); do
  if [ $((r % 2)) = 1 ]; then
    copy_times+=("$(run_nbdcopy)"); backup_times+=("$(run_backup)"); flush_times+=("$(run_nbdcopy_flush)")
  else
    flush_times+=("$(run_nbdcopy_flush)"); backup_times+=("$(run_backup)"); copy_times+=("$(run_nbdcopy)")
  fi
  echo "  round $r: nbdcopy ${copy_times[-1]} s, nbdcopy --flush ${flush_times[-1]} s," \
    "nbdsnap backup ${backup_times[-1]} s" >&2
done
cmp -s "$dir/copy.raw" "$dir/vol0.img" || { echo "backup.sh: nbdcopy output differs" >&2; exit 1; }
qemu-img compare -q -f qcow2 -F raw "$dir/full/backup-0001.qcow2" "$dir/vol0.img" \
  || { echo "backup.sh: the backup differs from the volume" >&2; exit 1; }
rm -f "$dir/copy.raw"

# Incrementals: 1% rewritten in 64 KiB writes, then 1% in 4 KiB writes.
change() {  # $1: write size
  /usr/bin/python3 - "$dir/nbd.sock" "$bytes" "$1" <<'PY'
import os, random, sys, nbd
sock, size, bs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD(); h.set_export_name("vol0"); h.connect_unix(sock)
rng = random.Random(42 + bs)
n = size // 100 // bs
for off in rng.sample(range(size // bs), n):
    h.pwrite(os.urandom(bs), off * bs)
h.flush(); h.shutdown()
PY
}
incr() {  # $1: snapshot name
  "$nbdsnap" snapshot create vol0 --name "$1" >/dev/null
  "$nbdsnap" snapshot take "$1" >/dev/null
  "$nbdsnap" --json backup "$1" --to "$dir/full" >"$dir/$1.json"
}
"$nbdsnap" snapshot destroy s1 >/dev/null
change 65536; incr s64k
change 4096; incr s4k
"$nbdsnap" verify "$dir/full" >/dev/null || { echo "backup.sh: verify failed" >&2; exit 1; }

/usr/bin/python3 - "$dir" "$bytes" "$out" "$size" "$rounds" "${copy_times[*]}" "${backup_times[*]}" \
  "${flush_times[*]}" <<'PY'
import json, statistics, sys, time
d, size, out, size_text, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
ct = [float(x) for x in sys.argv[6].split()]
bt = [float(x) for x in sys.argv[7].split()]
ft = [float(x) for x in sys.argv[8].split()]
full = json.load(open(f"{d}/full.json"))
i64 = json.load(open(f"{d}/s64k.json"))
i4 = json.load(open(f"{d}/s4k.json"))
mib = 1 << 20
c_rate, b_rate = size / statistics.median(ct) / mib, size / statistics.median(bt) / mib
f_rate = size / statistics.median(ft) / mib
ratio = b_rate / c_rate
rows = [
    ("nbdcopy to a raw file", f"{c_rate:8.0f} MiB/s", "", ""),
    ("nbdcopy --flush to a raw file", f"{f_rate:8.0f} MiB/s", "", ""),
    ("nbdsnap backup, full (synced)", f"{b_rate:8.0f} MiB/s", "", ""),
    ("full backup / nbdcopy", f"{ratio:8.2f}x", ">= 0.80x", "PASS" if ratio >= 0.8 else "MISS"),
    ("full backup / nbdcopy --flush", f"{b_rate / f_rate:8.2f}x", "(info)", ""),
    ("incremental, 1% in 64K writes: read", f"{100 * i64['bytes_read'] / size:7.2f} %", "<= 2 %",
     "PASS" if i64["bytes_read"] <= 0.02 * size else "MISS"),
    ("incremental, 1% in 4K writes: read", f"{100 * i4['bytes_read'] / size:7.2f} %", "(info)", ""),
]
print(f"backup bench: {size_text} volume, {rounds} rounds, medians, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
for r in rows:
    print(f"{r[0]:40s} {r[1]:>14s}  {r[2]:>9s}  {r[3]}")
res = {"size": size, "rounds": rounds, "nbdcopy_seconds": ct, "nbdcopy_flush_seconds": ft, "backup_seconds": bt,
       "nbdcopy_mib_s": c_rate, "backup_mib_s": b_rate, "ratio": ratio,
       "incremental_64k": {k: i64[k] for k in ("bytes_read", "changed_bytes", "bytes_written", "seconds_ms")},
       "incremental_4k": {k: i4[k] for k in ("bytes_read", "changed_bytes", "bytes_written", "seconds_ms")}}
json.dump(res, open(f"{out}/backup-latest.json", "w"), indent=1)
print(f"JSON: {out}/backup-latest.json")
PY
