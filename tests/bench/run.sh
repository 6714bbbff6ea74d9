#!/usr/bin/env bash
# Benchmark harness: the nbdsnap plugin side by side with `nbdkit file`, in
# one run, on the same file size and in the same directory.
#
#   tests/bench/run.sh [--size 1G] [--build DIR] [--out DIR] [--quick] [--keep]
#                      [--rounds N] [--max-wait SECONDS]
#
# Four servers run at once, each on its own copy of the same random data:
#   a) nbdkit file (baseline)          b) plugin, no snapshot
#   c) plugin, a fresh snapshot taken right before each run (first touch)
#   d) plugin, a snapshot held whose every chunk is already copied
# and the measurements alternate between them, round after round (the order
# reversed every other round); the table shows medians. Measured: fio 4k
# randwrite qd32 (time based) and 1M sequential write of the whole volume;
# 4k writes one per chunk (every write a first touch); nbdcopy reads to null:
# of nbdkit file, the plugin volume, a fresh snapshot (reads the origin) and
# the copied snapshot (reads difference storage); the RSS of nbdkit + plugin
# on a sparse 1 TiB volume vs a 1 MiB one. docs/benchmarks.md explains it.
#
# Prints the table with ratios to the baseline, the targets (PASS/MISS) and
# the exact commands; writes OUT/bench-DATE.json and OUT/latest.json (OUT
# defaults to BUILD/bench). Exits 0 even if a target is missed; non-zero only
# if the harness itself fails. --quick: one short round, 3 s runs (a smoke
# run); --rounds N overrides the number of rounds (default 5).
# Before each measurement the harness waits (20 s at most, --max-wait in all,
# default 120 s, 15 s with --quick) for other processes to leave the machine
# mostly idle, and reports how busy it was during each measurement.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
size=1G
build=build
out=
quick=0
keep=0
max_wait=
rounds_opt=

usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case $1 in
    --size) size=$2; shift 2 ;;
    --size=*) size=${1#*=}; shift ;;
    --build) build=$2; shift 2 ;;
    --build=*) build=${1#*=}; shift ;;
    --out) out=$2; shift 2 ;;
    --out=*) out=${1#*=}; shift ;;
    --quick) quick=1; shift ;;
    --rounds) rounds_opt=$2; shift 2 ;;
    --rounds=*) rounds_opt=${1#*=}; shift ;;
    --max-wait) max_wait=$2; shift 2 ;;
    --max-wait=*) max_wait=${1#*=}; shift ;;
    --keep) keep=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

# Debian's python3 (the libnbd module for nbdsh); a pyenv python3 may lack it.
export PATH=/usr/bin:/usr/sbin:$PATH
export LC_ALL=C
py=/usr/bin/python3
case $build in /*) ;; *) build=$top/$build ;; esac
[ -n "$out" ] || out=$build/bench
case $out in /*) ;; *) out=$PWD/$out ;; esac
plugin=$build/plugin/nbdkit-nbdsnap-plugin.so
linkbin=$build/client/nbdsnap-link
for f in "$plugin" "$linkbin"; do
  [ -e "$f" ] || { echo "run.sh: $f missing: build first (ninja -C $build)" >&2; exit 1; }
done
for t in nbdkit fio nbdcopy nbdinfo nbdsh numfmt; do
  command -v $t >/dev/null || { echo "run.sh: $t not found (scripts/setup.sh installs it)" >&2; exit 1; }
done

size_bytes=$(numfmt --from=iec "${size^^}")
size_bytes=$((size_bytes / 1048576 * 1048576))
[ "$size_bytes" -ge $((64 << 20)) ] || { echo "run.sh: --size must be at least 64M" >&2; exit 2; }
# The plugin's default chunk: 256 KiB, doubled until the count fits 2^21.
chunk=$((256 << 10))
while [ $((size_bytes / chunk)) -gt 2097152 ]; do chunk=$((chunk * 2)); done
chunks=$(((size_bytes + chunk - 1) / chunk))

if [ $quick = 1 ]; then rounds=1; runtime=3; copies=2; else rounds=5; runtime=10; copies=3; fi
[ -z "$rounds_opt" ] || rounds=$rounds_opt
# Total seconds the run may spend waiting for other work to calm down.
[ -n "$max_wait" ] || { [ $quick = 1 ] && max_wait=15 || max_wait=120; }

# ------------------------------------------------------------- work directory
# Not tmpfs: the cases must pay the same page-cache + file-system costs as a
# real volume. $TMPDIR first, then /var/tmp, then /tmp. Needs about 7 x size:
# the random data, four volumes, two difference files.
need=$((size_bytes * 7 + (256 << 20)))
dir=
for cand in ${TMPDIR:-} /var/tmp /tmp; do
  [ -d "$cand" ] && [ -w "$cand" ] || continue
  fstype=$(stat -f -c %T "$cand")
  avail=$(($(df --output=avail -k "$cand" | tail -1) * 1024))
  if [ "$fstype" != tmpfs ] && [ "$avail" -ge "$need" ]; then dir=$cand; break; fi
done
if [ -z "$dir" ]; then
  dir=${TMPDIR:-/var/tmp}
  echo "run.sh: warning: no non-tmpfs directory with $((need >> 20)) MiB free; using $dir" >&2
fi
work=$(mktemp -d "$dir/nbdsnap-bench.XXXXXX")
fstype=$(stat -f -c %T "$work")
mkdir -p "$out"

declare -A pid=()
cleanup() {
  local rc=$? s
  for s in "${!pid[@]}"; do
    kill -TERM "${pid[$s]}" 2>/dev/null || true
    wait "${pid[$s]}" 2>/dev/null || true
  done
  if [ $keep = 1 ]; then
    echo "work files kept in $work" >&2
  elif [ $rc != 0 ]; then  # keep the logs, not the gigabytes
    rm -rf "$work"/*.img "$work"/*.diff "$work"/*.state "$work/bin"
    echo "run.sh: failed; logs kept in $work" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

# Private copies of the binaries: a rebuild during the run cannot change them.
mkdir -p "$work/bin"
cp "$plugin" "$linkbin" "$work/bin/"
plugin_sum=$(sha256sum "$plugin" | cut -c1-16)
plugin=$work/bin/$(basename "$plugin")
linkbin=$work/bin/$(basename "$linkbin")

fill=$work/fill.img
results=$work/results.tsv
cmdlog=$work/commands.txt
: >"$results"
: >"$cmdlog"
round=0

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
# Records the exact command line (shell-quoted) and runs it.
note() { printf '%q ' "$@" | sed 's/ $//' >>"$cmdlog"; echo >>"$cmdlog"; }
run() { note "$@"; "$@"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$round" "$3" >>"$results"; }  # CASE METRIC VALUE

# --------------------------------------------------------------- nbdkit life
# Server S listens on $work/S.sock; a plugin server's control link is
# $work/S.ctl and its state directory $work/S.state.
sock() { echo "$work/$1.sock"; }
start_nbdkit() {  # S ARGS... (after the socket)
  local s=$1; shift
  local sk; sk=$(sock "$s")
  rm -f "$sk" "$work/$s.ctl"   # nbdkit leaves its socket file behind
  note nbdkit -f -U "$sk" "$@"
  nbdkit -f -U "$sk" "$@" 2>"$work/nbdkit-$s.log" &
  pid[$s]=$!
  local i
  for i in $(seq 200); do
    if [ -S "$sk" ]; then
      case " $* " in *" control="*) [ -S "$work/$s.ctl" ] && return 0 ;; *) return 0 ;; esac
    fi
    kill -0 "${pid[$s]}" 2>/dev/null || break
    sleep 0.05
  done
  echo "run.sh: nbdkit ($s) did not start:" >&2
  cat "$work/nbdkit-$s.log" >&2
  exit 1
}
stop_nbdkit() {  # S
  local s=$1 rc=0
  kill -TERM "${pid[$s]}"
  wait "${pid[$s]}" || rc=$?
  unset "pid[$s]"
  [ $rc = 0 ] || { echo "run.sh: nbdkit ($s) exited with $rc:" >&2; cat "$work/nbdkit-$s.log" >&2; exit 1; }
  rm -f "$(sock "$s")" "$work/$s.ctl"
}
start_plugin() {  # S VOLUME_PATH
  rm -rf "$work/$1.state"
  start_nbdkit "$1" "$plugin" volume=vol0="$2" state="$work/$1.state" control="$work/$1.ctl"
}
lnk() { local s=$1; shift; run "$linkbin" --socket "$work/$s.ctl" "$@"; }
alive() {  # every server still running (a crash must not go unnoticed)
  local s
  for s in "${!pid[@]}"; do
    kill -0 "${pid[$s]}" 2>/dev/null || { echo "run.sh: nbdkit ($s) died:" >&2; cat "$work/nbdkit-$s.log" >&2; exit 1; }
  done
}

take_snapshot() {  # S NAME: difference storage = one file of the volume's size
  local diff=$work/$1-$2.diff
  rm -f "$diff"
  run truncate -s "$size_bytes" "$diff"
  lnk "$1" create vol0 --name "$2" >/dev/null
  lnk "$1" append-storage "$2" "$diff" "0:$size_bytes" >/dev/null
  lnk "$1" take "$2" >/dev/null
}
destroy_snapshot() {  # S NAME
  lnk "$1" destroy "$2" >/dev/null
  rm -f "$work/$1-$2.diff"
}
chunks_copied() {  # S NAME
  "$linkbin" --socket "$work/$1.ctl" info "$2" | awk '/^chunks:/ {print $2}'
}

# Before each measured run: write dirty pages back (no writeback competes
# with the run) and read the run's files so every case starts with them in
# the page cache (this machine's page cache also shrinks on its own).
settle() {  # FILES...
  sync
  [ $# = 0 ] || cat "$@" >/dev/null
  wait_quiet
}

# CPU used by everything except the measured server and our own children
# (fio, nbdcopy) while a measurement runs, in % of the whole machine: other
# jobs on a shared machine distort the figures, so the report shows it.
hz=$(getconf CLK_TCK)
load_begin() {  # S
  times >"$work/times0"
  local _c u n s i w q sq st _r
  read -r _c u n s i w q sq st _r </proc/stat
  busy0=$((u + n + s + q + sq + st)); total0=$((busy0 + i + w))
  srv0=$(awk '{print $14 + $15}' "/proc/${pid[$1]}/stat")
}
load_end() {  # CASE KIND S
  times >"$work/times1"
  local _c u n s i w q sq st _r busy total srv
  read -r _c u n s i w q sq st _r </proc/stat
  busy=$((u + n + s + q + sq + st)); total=$((busy + i + w))
  srv=$(awk '{print $14 + $15}' "/proc/${pid[$3]}/stat")
  record "$1" "${2}_other_cpu_pct" "$($py - "$work/times0" "$work/times1" <<PY
import re, sys
def child(path):  # second line of bash's times: children user, system
    return sum(int(m) * 60 + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", open(path).read().splitlines()[1]))
kids = (child(sys.argv[2]) - child(sys.argv[1])) * $hz
other = ($busy - $busy0) - ($srv - $srv0) - kids
print(round(max(0.0, other) * 100 / max(1, $total - $total0), 1))
PY
)"
}

# Waits (bounded) until other processes leave the machine mostly idle: on a
# shared machine a burst of someone else's work halves a run.
waited=0
busy_pct() {  # % of the machine busy over 0.5 s
  local _c u n s i w q sq st _r b0 t0
  read -r _c u n s i w q sq st _r </proc/stat
  b0=$((u + n + s + q + sq + st)); t0=$((b0 + i + w))
  sleep 0.5
  read -r _c u n s i w q sq st _r </proc/stat
  echo $(((u + n + s + q + sq + st - b0) * 100 / (u + n + s + q + sq + st + i + w - t0 + 1)))
}
wait_quiet() {
  local pct t0=$SECONDS
  pct=$(busy_pct)
  [ "$pct" -gt 20 ] || return 0
  if [ "$waited" -ge "$max_wait" ]; then
    log "  machine ${pct}% busy with other work (no waiting left: --max-wait $max_wait)"
    return 0
  fi
  log "  machine ${pct}% busy with other work: waiting (20 s at most; $((max_wait - waited)) s left in all)"
  while [ "$pct" -gt 20 ] && [ $((SECONDS - t0)) -lt 20 ] && [ $((waited + SECONDS - t0)) -lt "$max_wait" ]; do
    sleep 1
    pct=$(busy_pct)
  done
  waited=$((waited + SECONDS - t0))
  [ "$pct" -le 20 ] || log "  still ${pct}% busy: measuring anyway"
}

# ---------------------------------------------------------------- measurements
uri() { echo "nbd+unix:///$2?socket=$(sock "$1")"; }   # S EXPORT

fio_common=(--ioengine=nbd --output-format=json)
fio_rand=(--rw=randwrite --bs=4k --iodepth=32 --time_based --runtime="$runtime" --size="$size_bytes")
fio_seq=(--rw=write --bs=1M --iodepth=8 --size="$size_bytes")
# One 4k write at the start of every chunk, ascending: each is a first touch.
fio_touch=(--rw=write:$((chunk - 4096)) --bs=4k --iodepth=32 --size="$size_bytes" --number_ios="$chunks")

fio_run() {  # CASE S EXPORT KIND(rand|seq|touch)
  local c=$1 s=$2 export=$3 kind=$4 args json=$work/fio.json
  case $kind in
    rand) args=("${fio_rand[@]}") ;;
    seq) args=("${fio_seq[@]}") ;;
    touch) args=("${fio_touch[@]}") ;;
  esac
  load_begin "$s"
  run fio --name="$kind" "${fio_common[@]}" --uri="$(uri "$s" "$export")" "${args[@]}" >"$json" 2>"$work/fio.err" ||
    { cat "$work/fio.err" "$json" >&2; exit 1; }
  load_end "$c" "$kind" "$s"
  local iops mibs
  read -r iops mibs < <($py "$here/bench.py" fio "$json")
  case $kind in
    rand) record "$c" rand_iops "$iops"; log "  $c: 4k randwrite $iops IOPS" ;;
    seq) record "$c" seq_mibs "$mibs"; log "  $c: 1M seqwrite $mibs MiB/s" ;;
    touch) record "$c" touch_iops "$iops"; log "  $c: 4k one write per chunk $iops IOPS" ;;
  esac
  alive
}

nbdcopy_read() {  # CASE S EXPORT
  local i t0 t1 mibs
  load_begin "$2"
  for i in $(seq "$copies"); do
    t0=$EPOCHREALTIME
    run nbdcopy "$(uri "$2" "$3")" null:
    t1=$EPOCHREALTIME
    mibs=$($py -c "print(round($size_bytes / 1048576 / ($t1 - $t0), 1))")
    record "$1" read_mibs "$mibs"
  done
  load_end "$1" read "$2"
  log "  $1: nbdcopy read $(awk -v r="$round" '$1 == c && $2 == "read_mibs" && $3 == r {printf "%s ", $4}' c="$1" "$results")MiB/s"
  alive
}

# One measurement of one case: KIND is rand, seq, touch or read.
measure() {  # CASE KIND
  local c=$1 kind=$2
  case $c in
    base)
      settle "$work/base.img"
      if [ "$kind" = read ]; then nbdcopy_read base_read base ""; else fio_run base base "" "$kind"; fi ;;
    nosnap)
      settle "$work/nosnap.img"
      if [ "$kind" = read ]; then nbdcopy_read vol_read nosnap vol0; else fio_run nosnap nosnap vol0 "$kind"; fi ;;
    first)
      # A fresh snapshot of data already written: the run copies every chunk
      # it touches for the first time.
      take_snapshot first fresh
      settle "$work/first.img"
      case $kind in
        read) nbdcopy_read snap_fresh_read first vol0@fresh ;;
        rand) fio_run first first vol0 rand
              record first rand_chunks_copied "$(chunks_copied first fresh)" ;;
        seq) fio_run first first vol0 seq
             [ "$(chunks_copied first fresh)" = "$chunks" ] ||
               { echo "run.sh: first-touch seqwrite copied $(chunks_copied first fresh) of $chunks chunks" >&2; exit 1; } ;;
        touch) fio_run first first vol0 touch
               [ "$(chunks_copied first fresh)" = "$chunks" ] ||
                 { echo "run.sh: one write per chunk copied $(chunks_copied first fresh) of $chunks chunks" >&2; exit 1; } ;;
      esac
      destroy_snapshot first fresh ;;
    newfile)
      # Reference, no NBD: the cost of new page cache on this machine (what
      # first-touch copies pay for the difference storage file).
      [ "$kind" = seq ] || return 0
      rm -f "$work/newfile.img"
      settle
      local t0 t1
      t0=$EPOCHREALTIME
      run dd if=/dev/zero of="$work/newfile.img" bs=1M count=$((size_bytes >> 20)) status=none
      t1=$EPOCHREALTIME
      record newfile seq_mibs "$($py -c "print(round($size_bytes / 1048576 / ($t1 - $t0), 1))")"
      log "  newfile: dd to a new file $(awk '$1 == "newfile" {v = $4} END {print v}' "$results") MiB/s"
      rm -f "$work/newfile.img" ;;
    copied)
      settle "$work/copied.img" "$work/copied-held.diff"
      if [ "$kind" = read ]; then nbdcopy_read snap_copied_read copied vol0@held
      elif [ "$kind" != touch ]; then fio_run copied copied vol0 "$kind"; fi ;;
  esac
}

# ------------------------------------------------------------------------ RSS
# nbdkit + plugin on a sparse volume, after a few small writes spread over it
# and an nbdinfo connection. VmRSS (and VmHWM, the peak) from /proc.
# With STRIDE, one 4k write every STRIDE bytes instead (touches every page of
# the CBT map when STRIDE = 1024 CBT blocks: the map's worst case).
rss_case() {  # NAME SIZE SERVER(plugin|file) [STRIDE]
  local name=$1 sz=$2 server=$3 stride=${4:-} img=$work/rss-$1.img s=rss-$1
  rm -f "$img"
  run truncate -s "$sz" "$img"
  if [ "$server" = plugin ]; then start_plugin "$s" "$img"; else start_nbdkit "$s" file "$img"; fi
  local export=vol0; [ "$server" = plugin ] || export=
  if [ -n "$stride" ]; then
    run nbdsh -u "$(uri "$s" "$export")" -c "
for off in range(0, h.get_size(), $stride):
    h.pwrite(b'\\xa5' * 4096, off)
h.flush()"
  else
    run nbdsh -u "$(uri "$s" "$export")" -c '
size = h.get_size()
for off in (0, size // 4, size // 2, 3 * size // 4, size - 4096):
    h.pwrite(b"\xa5" * 4096, off)
h.flush()'
  fi
  run nbdinfo "$(uri "$s" "$export")" >/dev/null
  local k
  for k in VmRSS VmHWM RssAnon RssFile; do
    record "rss_$name" "${k,,}_kib" "$(awk -v k="$k:" '$1 == k {print $2}' "/proc/${pid[$s]}/status")"
  done
  log "  RSS $name ($sz, $server): $(awk '$1 == "VmRSS:" {print $2, $3}' "/proc/${pid[$s]}/status")"
  stop_nbdkit "$s"
  rm -f "$img"
}

# ------------------------------------------------------------------------ main
t_start=$SECONDS
loadavg0=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average before the run: $loadavg0 (other jobs on this machine distort the figures)"
log "work directory $work ($fstype), volume $size ($size_bytes bytes, $chunks chunks of $((chunk >> 10)) KiB)"
log "$rounds round(s), fio randwrite runtime ${runtime}s, $copies nbdcopy reads per case and round"
log "setup: random data, four copies, four servers"
run dd if=/dev/urandom of="$fill" bs=1M count=$((size_bytes >> 20)) status=none
for v in base nosnap first copied; do run cp --sparse=never "$fill" "$work/$v.img"; done
rm -f "$fill"
sync
start_nbdkit base file "$work/base.img"
start_plugin nosnap "$work/nosnap.img"
start_plugin first "$work/first.img"
start_plugin copied "$work/copied.img"
# d): a snapshot held, then a full sequential write pass copies every chunk.
take_snapshot copied held
run fio --name=fill "${fio_common[@]}" --uri="$(uri copied vol0)" "${fio_seq[@]}" >/dev/null 2>&1
[ "$(chunks_copied copied held)" = "$chunks" ] ||
  { echo "run.sh: the write pass copied $(chunks_copied copied held) of $chunks chunks" >&2; exit 1; }

cases=(base nosnap first copied newfile)
for round in $(seq "$rounds"); do
  log "round $round of $rounds"
  order=("${cases[@]}")
  if [ $((round % 2)) = 0 ]; then order=(newfile copied first nosnap base); fi
  for kind in rand seq touch read; do
    for c in "${order[@]}"; do measure "$c" "$kind"; done
  done
  if [ "$round" -le 3 ]; then
    rss_case big 1T plugin
    rss_case tiny 1M plugin
    if [ "$round" = 1 ]; then
      rss_case file_big 1T file
      # 1 TiB: CBT blocks of 512 KiB, 4 bytes each; a 4 KiB page of the map
      # covers 1024 blocks = 512 MiB.
      rss_case big_spread 1T plugin $((512 << 20))
    fi
  fi
done
round=0
record copied rss_kib "$(awk '$1 == "VmRSS:" {print $2}' "/proc/${pid[copied]}/status")"
for s in base nosnap first copied; do stop_nbdkit "$s"; done
# Server-side errors would make every figure suspect: show them.
if grep -H -i 'error' "$work"/nbdkit-*.log >&2; then
  log "WARNING: the servers logged errors (above)"
fi
log "done in $((SECONDS - t_start)) s ($waited s of it waiting for other work to calm down)"

stamp=$(date +%Y%m%d-%H%M%S)
json=$out/bench-$stamp.json
$py "$here/bench.py" report --results "$results" --commands "$cmdlog" --json "$json" \
  --size "$size_bytes" --chunk "$chunk" --rounds "$rounds" --runtime "$runtime" \
  --quick "$quick" --workdir "$work" --fstype "$fstype" --build "$build" --seconds $((SECONDS - t_start)) \
  --plugin-sha256 "$plugin_sum" --loadavg "$loadavg0" --waited "$waited"
cp "$json" "$out/latest.json"
echo "results: $json (and $out/latest.json)"
