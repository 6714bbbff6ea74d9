#!/bin/bash
# A/B of two plugin builds on the same data: each iteration starts one nbdkit
# per build, each on its own copy of the same 1 GiB of random data (the two
# files swap between iterations: a volume file's place on disk alone moves
# the figures), and runs the chosen fio workloads on both, in alternating
# order, with the page cache dropped and read back before every run.
#
#   tests/bench/ab.sh [--iterations N] BUILD_A BUILD_B [KIND...]
#
# BUILD_A, BUILD_B: build directories (their plugin/nbdkit-nbdsnap-plugin.so
# and client/nbdsnap-link), or plugin .so files (nbdsnap-link then comes from
# $NBDSNAP_BENCH_BUILD, else build/). KIND: rand (4k randwrite qd32, 3 s),
# snaprand (the same, first touch of a fresh snapshot), seq (1M writes,
# 4 passes), snapseq (the same, fresh snapshot), touch (one 4k write per
# 256 KiB, fresh snapshot), rread (4k randread qd32, 3 s). Default: rand
# snaprand seq touch. Prints one line per iteration and kind with B/A, then
# the median ratio per kind. Servers listen on Unix sockets in the work
# directory ($TMPDIR, else /var/tmp), removed at the end.
set -euo pipefail
iterations=4
while [ $# -gt 0 ]; do
  case $1 in
    --iterations) iterations=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) break ;;
  esac
done
[ $# -ge 2 ] || { echo "usage: ab.sh [--iterations N] BUILD_A BUILD_B [KIND...]" >&2; exit 2; }
root=$(cd "$(dirname "$0")/../.." && pwd)
declare -A plugin link
side() {  # A|B PATH
  if [ -d "$2" ]; then plugin[$1]=$2/plugin/nbdkit-nbdsnap-plugin.so; link[$1]=$2/client/nbdsnap-link
  else plugin[$1]=$2; link[$1]=${NBDSNAP_BENCH_BUILD:-$root/build}/client/nbdsnap-link; fi
  [ -f "${plugin[$1]}" ] && [ -x "${link[$1]}" ] || { echo "ab.sh: no plugin or nbdsnap-link for $2" >&2; exit 2; }
}
side A "$1"; side B "$2"; shift 2
kinds=("$@"); [ ${#kinds[@]} -gt 0 ] || kinds=(rand snaprand seq touch)
for t in nbdkit fio python3; do command -v $t >/dev/null || { echo "ab.sh: $t is not installed" >&2; exit 77; }; done

w=$(mktemp -d "${TMPDIR:-/var/tmp}/nbdsnap-ab.XXXXXX")
declare -A pid
cleanup() {
  local s
  for s in "${!pid[@]}"; do kill "${pid[$s]}" 2>/dev/null || true; wait "${pid[$s]}" 2>/dev/null || true; done
  rm -rf "$w"
}
trap cleanup EXIT
head -c 1G /dev/urandom >"$w/src.img"
for f in x y; do cp --sparse=never "$w/src.img" "$w/$f.img"; done
rm -f "$w/src.img"

settle() { sync; local f; for f in "$@"; do dd if="$f" iflag=nocache count=0 status=none; done; cat "$@" >/dev/null; }
start() {  # A|B FILE
  local s=$1 i
  rm -rf "$w/$s.state" "$w/$s.sock" "$w/$s.ctl"
  nbdkit -f -U "$w/$s.sock" "${plugin[$s]}" volume=vol0="$w/$2" state="$w/$s.state" control="$w/$s.ctl" 2>"$w/$s.log" &
  pid[$s]=$!
  for i in $(seq 200); do [ -S "$w/$s.ctl" ] && return 0; kill -0 "${pid[$s]}" 2>/dev/null || break; sleep 0.05; done
  echo "ab.sh: nbdkit ($s) did not start:" >&2; cat "$w/$s.log" >&2; exit 1
}
stop() { kill "${pid[$1]}"; wait "${pid[$1]}" || true; unset "pid[$1]"; }
lnk() { local s=$1; shift; "${link[$s]}" --socket "$w/$s.ctl" "$@" >/dev/null; }
run() {  # A|B KIND FILE: prints IOPS or MiB/s
  local s=$1 k=$2 f=$3 args
  case $k in
    rand|snaprand) args=(--rw=randwrite --bs=4k --iodepth=32 --time_based --runtime=3 --size=1G) ;;
    seq|snapseq) args=(--rw=write --bs=1M --iodepth=8 --size=1G --loops=4) ;;
    touch) args=(--rw=write:258048 --bs=4k --iodepth=32 --size=1G --number_ios=4096) ;;
    rread) args=(--rw=randread --bs=4k --iodepth=32 --time_based --runtime=3 --size=1G) ;;
    *) echo "ab.sh: unknown kind $k" >&2; exit 2 ;;
  esac
  case $k in
    snap*|touch)
      rm -f "$w/$s.diff"; truncate -s 1G "$w/$s.diff"
      lnk "$s" create vol0 --name t; lnk "$s" append-storage t "$w/$s.diff" 0:1073741824
      settle "$w/$f"; lnk "$s" take t ;;
    *) settle "$w/$f" ;;
  esac
  fio --name="$k" --ioengine=nbd --output-format=json --uri="nbd+unix:///vol0?socket=$w/$s.sock" "${args[@]}" \
    >"$w/fio.json" 2>"$w/fio.err" || { cat "$w/fio.err" "$w/$s.log" >&2; exit 1; }
  case $k in snap*|touch) lnk "$s" destroy t; rm -f "$w/$s.diff" ;; esac
  /usr/bin/python3 - "$w/fio.json" "$k" <<'PY'
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index("{"):])["jobs"][0]
k = sys.argv[2]
d = j["read" if k == "rread" else "write"]
print(round(d["bw"] / 1024) if k in ("seq", "snapseq") else round(d["iops"]))
PY
}

declare -A ratios
for i in $(seq "$iterations"); do
  if [ $((i % 2)) = 1 ]; then fa=x.img fb=y.img; else fa=y.img fb=x.img; fi
  start A "$fa"; start B "$fb"
  for k in "${kinds[@]}"; do
    if [ $((i % 2)) = 1 ]; then a=$(run A "$k" "$fa"); b=$(run B "$k" "$fb")
    else b=$(run B "$k" "$fb"); a=$(run A "$k" "$fa"); fi
    r=$(/usr/bin/python3 -c "print(f'{$b / $a:.2f}')")
    ratios[$k]="${ratios[$k]:-} $r"
    unit=IOPS; case $k in seq|snapseq) unit=MiB/s ;; esac
    echo "iteration $i  $k: A $a, B $b $unit, B/A ${r}x"
  done
  stop A; stop B
done
for k in "${kinds[@]}"; do
  /usr/bin/python3 -c "import statistics, sys; v = [float(x) for x in sys.argv[2:]]; print(f'{sys.argv[1]}: B/A median {statistics.median(v):.2f}x (min {min(v):.2f}, max {max(v):.2f})')" "$k" ${ratios[$k]}
done
