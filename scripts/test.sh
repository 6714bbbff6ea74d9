#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds, and runs
#   1. every test (unit, concurrency, integration through nbdkit + libnbd),
#   2. the unit and concurrency tests under ASan + UBSan,
#   3. the concurrency tests under TSan (the engine's threads),
#   4. the backup suite again with the nbdsnap CLI (its copy threads) built
#      with ASan + UBSan, then with TSan.
# Prints "N passed, N failed, N skipped" last; exits non-zero on any failure.
#
#   scripts/test.sh [--no-sanitizers]
set -uo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
sanitizers=1
[ "${1:-}" = "--no-sanitizers" ] && sanitizers=0
export PATH=/usr/bin:$PATH   # Debian's python3 (libnbd module) for tools that need it

status=0
logs=()

run_suite() {  # BUILD_DIR [meson test args...]
  local dir=$1; shift
  echo "== meson test -C $dir $*"
  meson test -C "$dir" --print-errorlogs --num-processes 2 "$@" || status=1
  logs+=("$dir/meson-logs/testlog.json")
}

# Builds only the executables of the tests in SUITE (sanitizer builds need
# nothing else), then runs that suite.
build_and_run_suite() {  # BUILD_DIR SUITE
  local dir=$1 suite=$2 targets
  targets=$(meson introspect "$dir" --tests | python3 -c '
import json, os, sys
d, suite = sys.argv[1], sys.argv[2]
tests = json.load(sys.stdin)
names = {os.path.relpath(t["cmd"][0], d) for t in tests
         if suite in [s.split(":")[-1] for s in t["suite"]]}
print(" ".join(sorted(names)))' "$dir" "$suite")
  echo "== ninja -C $dir $targets"
  ninja -C "$dir" $targets || { status=1; return; }
  run_suite "$dir" --no-rebuild --suite "$suite"
}

configure() {  # BUILD_DIR meson options...
  local dir=$1; shift
  [ -f "$dir/build.ninja" ] || meson setup "$dir" "$@" >/dev/null || exit 1
}

# -g1: line tables only (backtraces and sanitizer reports keep file:line);
# compiles about a third faster than -g. Only a new build directory gets it.
if [ -f build/build.ninja ]; then
  scripts/setup.sh build || exit 1
else
  scripts/setup.sh build -Dcpp_args=-g1 || exit 1
fi
run_suite build

if [ $sanitizers = 1 ]; then
  # The engine under the sanitizers (the plugin itself runs inside an
  # uninstrumented nbdkit, so the integration suite runs in build/ only).
  # ASan at -O0 compiles in half the time of -O1 and its tests stay short;
  # TSan stays at -O1: there the tests are the slow part (40 s against a 28 s build).
  sanitizer_opts=(-Db_lundef=false -Dplugin=disabled -Ddebug=false)
  configure build-asan -Db_sanitize=address,undefined -Doptimization=0 "${sanitizer_opts[@]}"
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 ASAN_OPTIONS=detect_leaks=1 \
    build_and_run_suite build-asan unit
  configure build-tsan -Db_sanitize=thread -Doptimization=1 "${sanitizer_opts[@]}"
  TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
    build_and_run_suite build-tsan concurrency
  # The backup suite with a sanitized CLI against the normal daemon.
  for san in asan tsan; do
    echo "== ninja -C build-$san client/nbdsnap"
    ninja -C "build-$san" client/nbdsnap || { status=1; continue; }
    echo "== meson test -C build --suite backup (nbdsnap from build-$san)"
    NBDSNAP_CLI_SANITIZED=$top/build-$san/client/nbdsnap \
      UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:exitcode=66 ASAN_OPTIONS=detect_leaks=1:exitcode=66 \
      TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:exitcode=66 \
      meson test -C build --no-rebuild --print-errorlogs --suite backup --logbase "backup-$san" || status=1
    logs+=("build/meson-logs/backup-$san.json")
  done
fi

python3 - "${logs[@]}" <<'PY'
import json, sys
counts = {"OK": 0, "FAIL": 0, "SKIP": 0}
for path in sys.argv[1:]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        r = json.loads(line).get("result", "")
        if r in ("OK", "EXPECTEDFAIL"): counts["OK"] += 1
        elif r == "SKIP": counts["SKIP"] += 1
        else: counts["FAIL"] += 1
print(f"{counts['OK']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
PY
exit $status
