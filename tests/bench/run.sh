#!/usr/bin/env bash
# Benchmark harness: the nbdsnap plugin side by side with `nbdkit file`,
# `qemu-nbd` and QEMU's copy-before-write (fleecing) in qemu-storage-daemon,
# in one run, on the same file size and in the same directory.
#
#   tests/bench/run.sh [--size 1G] [--build DIR] [--out DIR] [--chart FILE]
#                      [--quick] [--keep] [--rounds N] [--max-wait SECONDS]
#                      [--plugin-param KEY=VALUE]...
#
# Servers, each on its own copy of the same random data:
#   a) nbdkit file (baseline)          b) plugin, no snapshot
#   a2) a second nbdkit file: the A/A control (two identical servers, each
#      on its own copy, measured in the same round: the noise of a ratio)
#   c) plugin, a fresh snapshot taken right before each run (first touch)
#   d) plugin, a snapshot held whose every chunk is already copied
#   q) qemu-nbd (no snapshot); QEMU copy-before-write + snapshot-access in
#      qemu-storage-daemon, started fresh before each run (first touch) and
#      one long-lived whose every cluster is copied
#   nsnap) plugin, one volume measured with 1, 4 and 16 snapshots held (the
#      older ones hold copies; the newest is fresh: the run's copy target)
#   first64, firstz, first64z) plugin with 64 KiB chunks, with difference
#      storage zero-filled at append (diff_storage_zero_fill=1), and with
#      both; first touch, the one-write-per-chunk workload only
# and the measurements alternate between them, round after round (the order
# reversed every other round); the tables show medians and paired ratios.
# Measured: fio 4k randwrite qd32, 1M sequential writes (looping over the
# volume for the run time; one pass where it must be a first touch),
# 4k randread qd32; 4k writes one per chunk (every write a first touch),
# with the disk's O_DIRECT chunk-write rate as the reference;
# nbdcopy reads to null: with 1 and 4 connections (MiB/s, and the CPU
# seconds per GiB of the server and of nbdcopy); the pause of origin
# writes around takes (4 writers); `cbt changes` through nbdsnapd's API on a
# sparse 1 TiB volume with 1% of its blocks changed; RSS per TiB of origin
# and per GiB of copied chunks, chunk table bytes per copied chunk.
# docs/benchmarks.md explains it.
#
# Prints the tables with ratios and the targets (PASS/MISS; the one-write-per-
# chunk row is shown below them, not counted); writes OUT/bench-DATE.json, OUT/latest.json (OUT defaults to
# BUILD/bench; the exact commands are in the JSON) and the chart (PNG,
# --chart; default docs/bench/benchmarks.png, OUT/benchmarks.png with --quick)
# with a copy of the JSON next to it, this machine's paths replaced.
# Exits 0 even if a target is missed; non-zero only if the harness itself
# fails. --quick: one short round, 2 s runs (a smoke run, about 5 minutes);
# full: 6 rounds, 5 s runs (about 36 minutes); --rounds N overrides.
# --build (or $NBDSNAP_BENCH_BUILD) picks the build directory (default build).
# Before each measurement the harness waits (20 s at most, --max-wait in all,
# default 60 s, 15 s with --quick) for other processes to leave the machine
# mostly idle, and reports how busy it was during each measurement.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
size=1G
build=${NBDSNAP_BENCH_BUILD:-build}
out=
chart=
quick=0
keep=0
max_wait=
rounds_opt=
plugin_params=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case $1 in
    --size) size=$2; shift 2 ;;
    --size=*) size=${1#*=}; shift ;;
    --build) build=$2; shift 2 ;;
    --build=*) build=${1#*=}; shift ;;
    --out) out=$2; shift 2 ;;
    --out=*) out=${1#*=}; shift ;;
    --chart) chart=$2; shift 2 ;;
    --chart=*) chart=${1#*=}; shift ;;
    --quick) quick=1; shift ;;
    --rounds) rounds_opt=$2; shift 2 ;;
    --rounds=*) rounds_opt=${1#*=}; shift ;;
    --max-wait) max_wait=$2; shift 2 ;;
    --max-wait=*) max_wait=${1#*=}; shift ;;
    --keep) keep=1; shift ;;
    --plugin-param) plugin_params+=("$2"); shift 2 ;;
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
# The chart of a full run is the one docs/benchmarks.md shows; a quick
# run's stays next to its JSON.
[ -n "$chart" ] || { [ $quick = 1 ] && chart=$out/benchmarks.png || chart=$top/docs/bench/benchmarks.png; }
case $chart in /*) ;; *) chart=$PWD/$chart ;; esac
plugin=$build/plugin/nbdkit-nbdsnap-plugin.so
linkbin=$build/client/nbdsnap-link
daemonbin=$build/server/nbdsnapd
for f in "$plugin" "$linkbin" "$daemonbin"; do
  [ -e "$f" ] || { echo "run.sh: $f missing: build first (ninja -C $build)" >&2; exit 1; }
done
for t in nbdkit fio nbdcopy nbdinfo nbdsh numfmt qemu-storage-daemon qemu-nbd fallocate; do
  command -v $t >/dev/null || { echo "run.sh: $t not found (scripts/setup.sh installs it)" >&2; exit 1; }
done
command -v gnuplot >/dev/null || echo "run.sh: warning: gnuplot not found: no chart (apt-get install gnuplot-nox)" >&2

size_bytes=$(numfmt --from=iec "${size^^}")
size_bytes=$((size_bytes / 1048576 * 1048576))
[ "$size_bytes" -ge $((64 << 20)) ] || { echo "run.sh: --size must be at least 64M" >&2; exit 2; }
# The plugin's default chunk: 256 KiB, doubled until the count fits 2^21.
chunk=$((256 << 10))
while [ $((size_bytes / chunk)) -gt 2097152 ]; do chunk=$((chunk * 2)); done
chunks=$(((size_bytes + chunk - 1) / chunk))

if [ $quick = 1 ]; then rounds=1; runtime=2; copies=2; takes=40; else rounds=6; runtime=5; copies=4; takes=200; fi
[ -z "$rounds_opt" ] || rounds=$rounds_opt
# Total seconds the run may spend waiting for other work to calm down.
[ -n "$max_wait" ] || { [ $quick = 1 ] && max_wait=15 || max_wait=60; }

# ------------------------------------------------------------- work directory
# Not tmpfs: the cases must pay the same page-cache + file-system costs as a
# real volume. $TMPDIR first, then /var/tmp, then /tmp. Needs about 28 x size:
# the random data, ten volumes, difference files, QEMU targets, the disk
# reference file (the 16 snapshots of nsnap keep up to 5 x size).
need=$((size_bytes * 28 + (256 << 20)))
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
cp "$plugin" "$linkbin" "$daemonbin" "$work/bin/"
plugin_sum=$(sha256sum "$plugin" | cut -c1-16)
plugin=$work/bin/$(basename "$plugin")
linkbin=$work/bin/$(basename "$linkbin")
daemonbin=$work/bin/$(basename "$daemonbin")

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
stop_nbdkit() {  # S (any server started here)
  local s=$1 rc=0
  kill -TERM "${pid[$s]}"
  wait "${pid[$s]}" || rc=$?
  unset "pid[$s]"
  # qemu-nbd and qemu-storage-daemon exit with 143 (or 0) on SIGTERM.
  [ $rc = 0 ] || { [ $rc = 143 ] && [ -e "$work/qemu-$s.log" ]; } ||
    { echo "run.sh: server $s exited with $rc:" >&2; cat "$work/nbdkit-$s.log" "$work/qemu-$s.log" 2>/dev/null >&2; exit 1; }
  rm -f "$(sock "$s")" "$work/$s.ctl" "$work/$s.pid"
}
wait_started() {  # S FILE...: until every FILE exists (or the server dies)
  local s=$1 i f ok; shift
  for i in $(seq 200); do
    ok=1
    for f in "$@"; do [ -e "$f" ] || ok=0; done
    [ $ok = 0 ] || return 0
    kill -0 "${pid[$s]}" 2>/dev/null || break
    sleep 0.05
  done
  echo "run.sh: server $s did not start:" >&2
  cat "$work/qemu-$s.log" >&2
  exit 1
}
# QEMU's fleecing stack (docs/benchmarks.md): copy-before-write over the
# origin with TARGET receiving old data, snapshot-access over it, NBD exports
# vol0 (the origin through the cbw filter, writable) and snap (the snapshot
# view, read-only). The snapshot point is the start of the daemon.
start_qsd() {  # S VOLUME_PATH TARGET_PATH
  local s=$1 sk; sk=$(sock "$1")
  rm -f "$sk" "$work/$s.pid"
  local args=(--nbd-server "addr.type=unix,addr.path=$sk"
    --blockdev "{\"driver\":\"file\",\"node-name\":\"origin-file\",\"filename\":\"$2\",\"aio\":\"io_uring\"}"
    --blockdev '{"driver":"raw","node-name":"origin","file":"origin-file"}'
    --blockdev "{\"driver\":\"file\",\"node-name\":\"target-file\",\"filename\":\"$3\",\"aio\":\"io_uring\"}"
    --blockdev '{"driver":"raw","node-name":"target","file":"target-file"}'
    --blockdev '{"driver":"copy-before-write","node-name":"cbw","file":"origin","target":"target"}'
    --blockdev '{"driver":"snapshot-access","node-name":"snap","file":"cbw"}'
    --export '{"type":"nbd","id":"origin","node-name":"cbw","name":"vol0","writable":true}'
    --export '{"type":"nbd","id":"snap","node-name":"snap","name":"snap"}'
    --pidfile "$work/$s.pid")
  note qemu-storage-daemon "${args[@]}"
  qemu-storage-daemon "${args[@]}" 2>"$work/qemu-$s.log" &
  pid[$s]=$!
  wait_started "$s" "$work/$s.pid" "$sk"
}
# A fresh QEMU snapshot: a new target (preallocated like the plugin's
# difference storage), then a new daemon over the volume.
start_qsd_fresh() {  # S VOLUME_PATH
  rm -f "$work/$1-target.img"
  run fallocate -l "$size_bytes" "$work/$1-target.img"
  start_qsd "$1" "$2" "$work/$1-target.img"
}
start_qemu_nbd() {  # S VOLUME_PATH
  local s=$1 sk; sk=$(sock "$1")
  rm -f "$sk"
  local args=(--format=raw --cache=writeback --aio=io_uring --shared=8 --persistent
    --socket="$sk" --export-name=vol0 "$2")
  note qemu-nbd "${args[@]}"
  qemu-nbd "${args[@]}" 2>"$work/qemu-$s.log" &
  pid[$s]=$!
  wait_started "$s" "$sk"
}
start_plugin() {  # S VOLUME_PATH [KEY=VALUE...]: after --plugin-param's
  local s=$1 v=$2; shift 2
  rm -rf "$work/$s.state"
  start_nbdkit "$s" "$plugin" volume=vol0="$v" state="$work/$s.state" control="$work/$s.ctl" \
    ${plugin_params[@]+"${plugin_params[@]}"} "$@"
}
lnk() { local s=$1; shift; run "$linkbin" --socket "$work/$s.ctl" "$@"; }
alive() {  # every server still running (a crash must not go unnoticed)
  local s
  for s in "${!pid[@]}"; do
    kill -0 "${pid[$s]}" 2>/dev/null || { echo "run.sh: nbdkit ($s) died:" >&2; cat "$work/nbdkit-$s.log" >&2; exit 1; }
  done
}

take_snapshot() {  # S NAME [BYTES]: difference storage = one file of the volume's size
  local diff=$work/$1-$2.diff bytes=${3:-$size_bytes}
  rm -f "$diff"
  run truncate -s "$bytes" "$diff"
  lnk "$1" create vol0 --name "$2" >/dev/null
  lnk "$1" append-storage "$2" "$diff" "0:$bytes" >/dev/null
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
# The page cache is dropped first and read back with cat, so every case
# meets the same page-cache state (cached pages written by an earlier run or
# by cp are laid out differently from pages read ahead: a 4k write into them
# and a copy-before-write read of them cost up to 4x more or less).
settle() {  # FILES...
  sync
  local f
  for f in "$@"; do dd if="$f" iflag=nocache count=0 status=none; done
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
# load_end also leaves the server's and the children's CPU seconds since
# load_begin in srv_cpu_s and kids_cpu_s (nbdcopy_read records them per GiB).
load_end() {  # CASE KIND S
  times >"$work/times1"
  local _c u n s i w q sq st _r busy total srv
  read -r _c u n s i w q sq st _r </proc/stat
  busy=$((u + n + s + q + sq + st)); total=$((busy + i + w))
  srv=$(awk '{print $14 + $15}' "/proc/${pid[$3]}/stat")
  local other
  read -r other srv_cpu_s kids_cpu_s < <($py - "$work/times0" "$work/times1" <<PY
import re, sys
def child(path):  # second line of bash's times: children user, system
    return sum(int(m) * 60 + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", open(path).read().splitlines()[1]))
kids = (child(sys.argv[2]) - child(sys.argv[1])) * $hz
other = ($busy - $busy0) - ($srv - $srv0) - kids
print(round(max(0.0, other) * 100 / max(1, $total - $total0), 1), ($srv - $srv0) / $hz, kids / $hz)
PY
)
  record "$1" "${2}_other_cpu_pct" "$other"
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
# One sequential pass over the volume (fills, and first-touch runs, where every
# chunk must be copied once); the timed runs loop over it for RUNTIME seconds
# (a single 1 GiB pass takes under half a second here: one hiccup decided it).
fio_seq=(--rw=write --bs=1M --iodepth=8 --size="$size_bytes")
fio_seqloop=("${fio_seq[@]}" --time_based --runtime="$runtime")
fio_randread=(--rw=randread --bs=4k --iodepth=32 --time_based --runtime="$runtime" --size="$size_bytes")
# One 4k write at the start of every chunk, ascending: each is a first touch.
fio_touch=(--rw=write:$((chunk - 4096)) --bs=4k --iodepth=32 --size="$size_bytes" --number_ios="$chunks")

fio_run() {  # CASE S EXPORT KIND(rand|seq|seqpass|touch|rread)
  local c=$1 s=$2 export=$3 kind=$4 args json=$work/fio.json side=
  case $kind in
    rand) args=("${fio_rand[@]}") ;;
    seq) args=("${fio_seqloop[@]}") ;;
    seqpass) args=("${fio_seq[@]}") ;;
    touch) args=("${fio_touch[@]}") ;;
    rread) args=("${fio_randread[@]}"); side=--read ;;
  esac
  load_begin "$s"
  run fio --name="$kind" "${fio_common[@]}" --uri="$(uri "$s" "$export")" "${args[@]}" >"$json" 2>"$work/fio.err" ||
    { cat "$work/fio.err" "$json" >&2; exit 1; }
  load_end "$c" "$kind" "$s"
  local iops mibs
  read -r iops mibs < <($py "$here/bench.py" fio $side "$json")
  case $kind in
    rand) record "$c" rand_iops "$iops"; log "  $c: 4k randwrite $iops IOPS" ;;
    seq|seqpass) record "$c" seq_mibs "$mibs"; log "  $c: 1M seqwrite $mibs MiB/s" ;;
    touch) record "$c" touch_iops "$iops"; log "  $c: 4k one write per chunk $iops IOPS" ;;
    rread) record "$c" rread_iops "$iops"; log "  $c: 4k randread $iops IOPS" ;;
  esac
  alive
}

# Also records the CPU time per GiB read of the server (user + system, all its
# threads) and of nbdcopy: the reads run at the speed of these copies when the
# machine's cores are the limit.
nbdcopy_read() {  # CASE S EXPORT CONNECTIONS
  local i mibs metric=read_mibs stamps=()
  [ "$4" = 1 ] || metric=read${4}_mibs
  load_begin "$2"
  for i in $(seq "$copies"); do
    stamps+=("$EPOCHREALTIME")
    run nbdcopy --connections="$4" "$(uri "$2" "$3")" null:
    stamps+=("$EPOCHREALTIME")
  done
  load_end "$1" "read$4" "$2"   # before any other child: only nbdcopy counts
  for mibs in $($py -c "import sys; t = [float(x) for x in sys.argv[1:]]
for a, b in zip(t[::2], t[1::2]): print(round($size_bytes / 1048576 / (b - a), 1))" "${stamps[@]}"); do
    record "$1" "$metric" "$mibs"
  done
  local scpu ncpu
  read -r scpu ncpu < <($py -c "g = $copies * $size_bytes / 2**30; print(round($srv_cpu_s / g, 4), round($kids_cpu_s / g, 4))")
  record "$1" "${metric%_mibs}_server_cpu_s_per_gib" "$scpu"
  record "$1" "${metric%_mibs}_nbdcopy_cpu_s_per_gib" "$ncpu"
  log "  $1: nbdcopy read, $4 connection(s): $(awk -v r="$round" -v m="$metric" '$1 == c && $2 == m && $3 == r {printf "%s ", $4}' c="$1" "$results")MiB/s; CPU s per GiB: server $scpu, nbdcopy $ncpu"
  alive
}

# Write measurements with N snapshots held, all on one server and volume
# file (nsnap), so the 1-, 4- and 16-snapshot figures share the file's page
# cache and disk placement: the server holds N-1 older snapshots that hold
# copies (older ones taken one after another, 1/8 of the volume written
# between two takes); each run takes a fresh one (the Nth, the copy target:
# every chunk the run touches is a first touch), which then stays as an older
# one. Odd rounds go 1, 4, 16, 1, even rounds 16, 4, 1, 16 (destroying the
# oldest down to the count, or taking older ones up to it).
nheld=()   # names, oldest first
npass=0
nsnap_build() {  # COUNT: take older snapshots, with a write pass after each
  local name
  while [ ${#nheld[@]} -lt "$1" ]; do
    npass=$((npass + 1)); name=o$npass
    take_snapshot nsnap "$name" $((size_bytes / 4))
    nheld+=("$name")
    run fio --name=pass "${fio_common[@]}" --uri="$(uri nsnap vol0)" --rw=write --bs=1M --iodepth=8 \
      --offset=$((npass % 8 * size_bytes / 8)) --size=$((size_bytes / 8)) >/dev/null 2>&1
  done
}
nsnap_shrink() {  # COUNT: destroy the oldest down to COUNT
  while [ ${#nheld[@]} -gt "$1" ]; do
    destroy_snapshot nsnap "${nheld[0]}"
    nheld=("${nheld[@]:1}")
  done
}
mruns=0
multi_run() {  # N KIND
  mruns=$((mruns + 1))
  local n=$1 kind=$2 name=m$mruns
  if [ ${#nheld[@]} -lt $((n - 1)) ]; then nsnap_build $((n - 1)); else nsnap_shrink $((n - 1)); fi
  take_snapshot nsnap "$name"
  nheld+=("$name")
  settle "$work/nsnap.img"
  # Every run is a first touch of the newest snapshot: one pass for seq.
  fio_run "n$n" nsnap vol0 "${kind/#seq/seqpass}"
}

# One measurement of one case. KIND: rand, seq, rread (fio), touch (one write
# per chunk), read1, read4 (nbdcopy with 1 or 4 connections).
measure() {  # CASE KIND
  local c=$1 kind=$2 conns=
  case $kind in read1) conns=1 ;; read4) conns=4 ;; esac
  case $c in
    base|base2)
      [ "$kind" != touch ] || [ "$c" = base ] || return 0
      settle "$work/$c.img"
      if [ -n "$conns" ]; then nbdcopy_read "${c}_read" "$c" "" "$conns"; else fio_run "$c" "$c" "" "$kind"; fi ;;
    nosnap)
      settle "$work/nosnap.img"
      if [ -n "$conns" ]; then nbdcopy_read vol_read nosnap vol0 "$conns"; else fio_run nosnap nosnap vol0 "$kind"; fi ;;
    first|first64|firstz|first64z)
      # A fresh snapshot of data already written: the run copies every chunk
      # it touches for the first time. The variants run the
      # one-write-per-chunk workload only.
      [ "$c" = first ] || { [ "$kind" = touch ] && [[ " ${variants[*]-} " = *" $c "* ]]; } || return 0
      take_snapshot "$c" fresh
      settle "$work/$c.img"
      case $kind in
        read1|read4) nbdcopy_read snap_fresh_read first vol0@fresh "$conns" ;;
        rand) fio_run first first vol0 rand
              record first rand_chunks_copied "$(chunks_copied first fresh)" ;;
        rread) fio_run first first vol0 rread ;;
        seq) fio_run first first vol0 seqpass
             [ "$(chunks_copied first fresh)" = "$chunks" ] ||
               { echo "run.sh: first-touch seqwrite copied $(chunks_copied first fresh) of $chunks chunks" >&2; exit 1; } ;;
        touch) fio_run "$c" "$c" vol0 touch
               [ "$(chunks_copied "$c" fresh)" = "$chunks" ] ||
                 { echo "run.sh: one write per chunk ($c) copied $(chunks_copied "$c" fresh) of $chunks chunks" >&2; exit 1; } ;;
      esac
      destroy_snapshot "$c" fresh ;;
    diskref)
      # Reference, no NBD: how many chunk-sized O_DIRECT writes per second
      # this disk takes into freshly preallocated blocks (4 writers), the
      # ceiling of first-touch copies into difference storage.
      [ "$kind" = touch ] || return 0
      rm -f "$work/diskref.img"
      run fallocate -l "$size_bytes" "$work/diskref.img"
      settle
      run fio --name=diskref --filename="$work/diskref.img" --ioengine=psync --direct=1 --rw=write \
        --bs="$chunk" --numjobs=4 --size=$((size_bytes / 4)) --offset_increment=$((size_bytes / 4)) \
        --group_reporting --output-format=json >"$work/fio.json" 2>"$work/fio.err" ||
        { cat "$work/fio.err" >&2; exit 1; }
      local iops mibs
      read -r iops mibs < <($py "$here/bench.py" fio "$work/fio.json")
      record diskref touch_iops "$iops"
      log "  diskref: O_DIRECT $((chunk >> 10)) KiB writes into preallocated blocks $iops/s"
      rm -f "$work/diskref.img" ;;
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
      if [ -n "$conns" ]; then nbdcopy_read snap_copied_read copied vol0@held "$conns"
      elif [ "$kind" != touch ]; then fio_run copied copied vol0 "$kind"; fi ;;
    qnbd)
      [ "$kind" != touch ] || return 0
      settle "$work/qnbd.img"
      if [ -n "$conns" ]; then nbdcopy_read qnbd_read qnbd vol0 "$conns"; else fio_run qnbd qnbd vol0 "$kind"; fi ;;
    qfirst)
      # QEMU's snapshot point is the start of the daemon: a new one (and a new
      # target) before each run.
      start_qsd_fresh qfirst "$work/qfirst.img"
      settle "$work/qfirst.img"
      if [ -n "$conns" ]; then nbdcopy_read qsnap_fresh_read qfirst snap "$conns"; else fio_run qfirst qfirst vol0 "${kind/#seq/seqpass}"; fi
      stop_nbdkit qfirst ;;
    qcopied)
      [ "$kind" != touch ] || return 0
      settle "$work/qcopied.img" "$work/qcopied-target.img"
      if [ -n "$conns" ]; then nbdcopy_read qsnap_copied_read qcopied snap "$conns"; else fio_run qcopied qcopied vol0 "$kind"; fi ;;
    nsnap)
      [ "$kind" = rand ] || [ "$kind" = seq ] || return 0
      local n
      # The count measured first is measured again last, so that a drift
      # along the round (page cache, disk) weighs on 1 and 16 alike.
      # A seq run is one first-touch pass of under a second (it cannot loop:
      # a second pass copies nothing): the sequence three times.
      local norder=(1 4 16 1) times=1
      [ $((round % 2)) = 1 ] || norder=(16 4 1 16)
      [ "$kind" = rand ] || times=3
      for _ in $(seq $times); do for n in "${norder[@]}"; do multi_run "$n" "$kind"; done; done ;;
  esac
}

# ------------------------------------------------------------------------ RSS
# nbdkit + plugin on a sparse volume, after a few small writes spread over it
# and an nbdinfo connection. VmRSS (and VmHWM, the peak) from /proc.
# With STRIDE, one 4k write every STRIDE bytes instead (touches every page of
# the CBT map when STRIDE = 1024 CBT blocks: the map's worst case).
rss_case() {  # NAME SIZE SERVER(plugin|file|qsd) [STRIDE]
  local name=$1 sz=$2 server=$3 stride=${4:-} img=$work/rss-$1.img s=rss-$1
  rm -f "$img" "$work/rss-$1-target.img"
  run truncate -s "$sz" "$img"
  case $server in
    plugin) start_plugin "$s" "$img" ;;
    file) start_nbdkit "$s" file "$img" ;;
    qsd) run truncate -s "$sz" "$work/rss-$1-target.img"; start_qsd "$s" "$img" "$work/rss-$1-target.img" ;;
  esac
  local export=vol0; [ "$server" != file ] || export=
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
  rm -f "$img" "$work/rss-$1-target.img"
}

# ------------------------------------------------------------------------ main
t_start=$SECONDS
loadavg0=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average before the run: $loadavg0 (other jobs on this machine distort the figures)"
log "work directory $work ($fstype), volume $size ($size_bytes bytes, $chunks chunks of $((chunk >> 10)) KiB)"
log "$rounds round(s), fio randwrite runtime ${runtime}s, $copies nbdcopy reads per case and round"
log "setup: random data, one copy per volume, the servers"
run dd if=/dev/urandom of="$fill" bs=1M count=$((size_bytes >> 20)) status=none
vols=(base base2 nosnap first copied qnbd qfirst qcopied nsnap)
# Variants of c) for the one-write-per-chunk workload only: 64 KiB chunks
# (QEMU's copy granularity), difference storage zero-filled when appended,
# and both. A variant is skipped when --plugin-param sets one of its keys.
declare -A variant_params=([first64]="chunk_minimum_shift=16" [firstz]="diff_storage_zero_fill=1"
                           [first64z]="chunk_minimum_shift=16 diff_storage_zero_fill=1")
variants=()
for v in first64 firstz first64z; do
  skip=
  for kv in ${variant_params[$v]}; do
    case " ${plugin_params[*]-} " in *" ${kv%%=*}="*) skip=1 ;; esac
  done
  [ -n "$skip" ] || variants+=("$v")
done
vols+=(${variants[@]+"${variants[@]}"})
for v in "${vols[@]}"; do run cp --sparse=never "$fill" "$work/$v.img"; done
rm -f "$fill"
sync
start_nbdkit base file "$work/base.img"
start_nbdkit base2 file "$work/base2.img"
start_plugin nosnap "$work/nosnap.img"
start_plugin first "$work/first.img"
start_plugin copied "$work/copied.img"
start_qemu_nbd qnbd "$work/qnbd.img"
# d): a snapshot held, then a full sequential write pass copies every chunk.
take_snapshot copied held
run fio --name=fill "${fio_common[@]}" --uri="$(uri copied vol0)" "${fio_seq[@]}" >/dev/null 2>&1
[ "$(chunks_copied copied held)" = "$chunks" ] ||
  { echo "run.sh: the write pass copied $(chunks_copied copied held) of $chunks chunks" >&2; exit 1; }
# The same for QEMU: a daemon (its snapshot point), then a full write pass.
run fallocate -l "$size_bytes" "$work/qcopied-target.img"
start_qsd qcopied "$work/qcopied.img" "$work/qcopied-target.img"
run fio --name=fill "${fio_common[@]}" --uri="$(uri qcopied vol0)" "${fio_seq[@]}" >/dev/null 2>&1
start_plugin nsnap "$work/nsnap.img"
for v in ${variants[@]+"${variants[@]}"}; do
  # shellcheck disable=SC2086  # the variant's KEY=VALUE words
  start_plugin "$v" "$work/$v.img" ${variant_params[$v]}
done

# base2 sits on the other side of base from nosnap: the A/A ratio and the
# plugin's ratio to base are taken at the same distance in the order.
cases=(base2 base nosnap first ${variants[@]+"${variants[@]}"} copied qnbd qfirst qcopied nsnap newfile diskref)
for round in $(seq "$rounds"); do
  log "round $round of $rounds"
  order=("${cases[@]}")
  if [ $((round % 2)) = 0 ]; then order=(); for c in "${cases[@]}"; do order=("$c" ${order[@]+"${order[@]}"}); done; fi
  for kind in rand seq rread touch read1 read4; do
    for c in "${order[@]}"; do measure "$c" "$kind"; done
  done
  if [ "$round" -le 2 ]; then
    rss_case big 1T plugin
    rss_case tiny 1M plugin
    if [ "$round" = 1 ]; then
      rss_case file_big 1T file
      # 1 TiB: CBT blocks of 512 KiB, 4 bytes each; a 4 KiB page of the map
      # covers 1024 blocks = 512 MiB.
      rss_case big_spread 1T plugin $((512 << 20))
      rss_case qsd_big 1T qsd
      rss_case qsd_tiny 1M qsd
    fi
  fi
done
round=0
record copied rss_kib "$(awk '$1 == "VmRSS:" {print $2}' "/proc/${pid[copied]}/status")"
record qcopied rss_kib "$(awk '$1 == "VmRSS:" {print $2}' "/proc/${pid[qcopied]}/status")"

# ------------------------------------------------- memory per copied GiB
# Anonymous memory of the server before a fresh snapshot and after a
# first-touch pass over the whole volume; the chunk tables' own size from the
# plugin's statistics (control link). The same for QEMU's fresh daemon.
rss_anon() { awk '$1 == "RssAnon:" {print $2}' "/proc/${pid[$1]}/status"; }
log "memory per copied chunk"
settle "$work/first.img"
a0=$(rss_anon first)
take_snapshot first mem
run fio --name=mem "${fio_common[@]}" --uri="$(uri first vol0)" "${fio_seq[@]}" >/dev/null 2>&1
a1=$(rss_anon first)
note "$py" tests/bench/bench.py linkinfo "$work/first.ctl" mem
$py "$here/bench.py" linkinfo "$work/first.ctl" mem >"$work/meminfo.json"
record mem_plugin anon0_kib "$a0"
record mem_plugin anon1_kib "$a1"
record mem_plugin chunks "$($py -c "import json; print(json.load(open('$work/meminfo.json'))['chunks_copied'])")"
record mem_plugin table_bytes "$($py -c "import json; print(json.load(open('$work/meminfo.json'))['chunk_table_bytes'])")"
record mem_plugin stamps_bytes "$($py -c "import json; print(json.load(open('$work/meminfo.json'))['saved_stamps_bytes'])")"
destroy_snapshot first mem
start_qsd_fresh qfirst "$work/qfirst.img"
settle "$work/qfirst.img"
a0=$(rss_anon qfirst)
run fio --name=mem "${fio_common[@]}" --uri="$(uri qfirst vol0)" "${fio_seq[@]}" >/dev/null 2>&1
record mem_qsd anon0_kib "$a0"
record mem_qsd anon1_kib "$(rss_anon qfirst)"
stop_nbdkit qfirst
log "  plugin: RssAnon $a0 -> $a1 KiB, $(cat "$work/meminfo.json")"

# ------------------------------------------------------------ take pause
# 4 writers (libnbd, one connection each, 4k random writes at queue depth 1,
# every write timed) on the volume of b) while snapshots are taken.
log "take pause: $takes takes under 4 writers"
settle "$work/nosnap.img"
note "$py" tests/bench/bench.py takepause --uri "$(uri nosnap vol0)" --socket "$work/nosnap.ctl" --volume vol0 \
  --dir "$work" --size "$size_bytes" --takes "$takes" --writers 4
$py "$here/bench.py" takepause --uri "$(uri nosnap vol0)" --socket "$work/nosnap.ctl" --volume vol0 \
  --dir "$work" --size "$size_bytes" --takes "$takes" --writers 4 >"$work/takepause.json"
log "  $($py -c "import json; d = json.load(open('$work/takepause.json')); print('seen p50 %.2f ms, p99 %.2f ms; plugin pause p50 %.2f ms, p99 %.2f ms' % (d['seen_p50_ms'], d['seen_p99_ms'], d['plugin_p50_ms'], d['plugin_p99_ms']))")"

log "  nsnap: ${#nheld[@]} snapshots held at the end"
for s in base base2 nosnap first copied qnbd qcopied nsnap ${variants[@]+"${variants[@]}"}; do stop_nbdkit "$s"; done

# ------------------------------------------------------------------- CBT
# nbdsnapd (which runs nbdkit + the plugin) on a sparse 1 TiB volume; 1% of
# its CBT blocks written; `cbt changes` through the public API, timed.
log "cbt changes on a sparse 1 TiB volume, 1% of the blocks changed"
run truncate -s 1T "$work/cbt.img"
rm -f "$work/cbt-api.sock" "$work/cbt-nbd.sock"
note "$daemonbin" --foreground --state-dir "$work/cbt.state" --api-socket "$work/cbt-api.sock" \
  --nbd-socket "$work/cbt-nbd.sock" --volume "big=$work/cbt.img" --plugin "$plugin"
"$daemonbin" --foreground --state-dir "$work/cbt.state" --api-socket "$work/cbt-api.sock" \
  --nbd-socket "$work/cbt-nbd.sock" --volume "big=$work/cbt.img" --plugin "$plugin" 2>"$work/nbdsnapd.log" &
pid[cbt]=$!
wait_started cbt "$work/cbt-api.sock" "$work/cbt-nbd.sock"
note "$py" tests/bench/bench.py cbt --api "$work/cbt-api.sock" --uri "nbd+unix:///big?socket=$work/cbt-nbd.sock" --volume big
$py "$here/bench.py" cbt --api "$work/cbt-api.sock" --uri "nbd+unix:///big?socket=$work/cbt-nbd.sock" \
  --volume big --repeat 20 >"$work/cbt.json" || { cat "$work/nbdsnapd.log" >&2; exit 1; }
[ -s "$work/cbt.json" ] || { cat "$work/cbt.err" "$work/nbdsnapd.log" >&2; exit 1; }
kill -TERM "${pid[cbt]}"; wait "${pid[cbt]}" || true; unset "pid[cbt]"
rm -f "$work/cbt.img"
log "  $($py -c "import json; d = json.load(open('$work/cbt.json'))['snapshot']; print('%d ranges, p50 %.1f ms, max %.1f ms, %d bytes received' % (d['ranges'], d['ms_p50'], d['ms_max'], d['bytes_received']))")"

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
  --plugin-sha256 "$plugin_sum" --loadavg "$loadavg0" --waited "$waited" \
  --takepause "$work/takepause.json" --cbt "$work/cbt.json" --chart "$chart"
cp "$json" "$out/latest.json"
# Next to the chart, a copy of the JSON without this machine's paths (the
# chart and this copy are what docs/benchmarks.md shows).
chart_json=${chart%.png}.json
$py - "$json" "$chart_json" "$work" "$build" "$top" <<'PY'
import sys
src, dst, work, build, top = sys.argv[1:]
text = open(src).read().replace(work, "$W").replace(build, "BUILD").replace(top, ".")
open(dst, "w").write(text)
PY
echo "results: $json (and $out/latest.json), chart: $chart, $chart_json"
