#!/usr/bin/env bash
# bench.py pool over the runs kept in docs/bench/runs: it must rebuild every
# run's reported ratio from the run's samples (it exits 1 naming the run
# otherwise), print every ratio target, give the same answer from a run's
# "rounds" as from its flat samples, and catch samples out of their layout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
py=/usr/bin/python3
[ -x "$py" ] || py=python3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
runs=("$top"/docs/bench/runs/*.json)
[ ${#runs[@]} -ge 2 ] || { echo "test_pool: fewer than 2 runs in docs/bench/runs"; exit 1; }
fail() { echo "test_pool: $*"; exit 1; }

"$py" "$here/bench.py" pool --trials 300 --out "$tmp/pool.json" "${runs[@]}" >"$tmp/out.txt" 2>"$tmp/err.txt" ||
  { cat "$tmp/out.txt" "$tmp/err.txt"; fail "pool failed on the kept runs"; }
n=$("$py" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["targets"]))' "$tmp/pool.json")
want=$("$py" -c 'import importlib.util, sys
s = importlib.util.spec_from_file_location("bench", sys.argv[1]); m = importlib.util.module_from_spec(s)
s.loader.exec_module(m); print(len(m.RATIO_TARGETS))' "$here/bench.py")
[ "$n" = "$want" ] || fail "pooled $n targets, RATIO_TARGETS has $want"
grep -q "16 snapshots / 1, 4k randwrite" "$tmp/out.txt" || fail "no 16/1 row"
grep -q "^A/A" "$tmp/out.txt" || fail "no A/A section"

# The same run as "rounds" (as run.sh writes it since) instead of flat samples.
last=${runs[-1]}
"$py" - "$here/bench.py" "$last" "$tmp/rounds.json" <<'PY'
import importlib.util, json, sys
s = importlib.util.spec_from_file_location("bench", sys.argv[1]); m = importlib.util.module_from_spec(s)
s.loader.exec_module(m)
d = json.load(open(sys.argv[2]))
d["rounds"] = {f"{c}/{k}": {str(r): v for r, v in rr.items()} for (c, k), rr in m.run_rounds(d).items()}
del d["samples"]
json.dump(d, open(sys.argv[3], "w"))
PY
"$py" "$here/bench.py" pool --trials 300 "$last" >"$tmp/a.txt"
"$py" "$here/bench.py" pool --trials 300 "$tmp/rounds.json" >"$tmp/b.txt"
diff <(tail -n +2 "$tmp/a.txt") <(tail -n +2 "$tmp/b.txt") || fail "rounds and samples of one run disagree"

# Samples that do not give the figures the run reported (one case's scaled
# by 1.5, or one dropped, which leaves the flat list out of its layout), in
# a run with flat samples (the first kept) and in one with "rounds" (the
# last): pool refuses them, naming the run and the target.
for run in "${runs[0]}" "$last"; do
  "$py" - "$run" "$tmp/bad.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
if "rounds" in d:
    r = d["rounds"]["n16/rand_iops"]
    for k in r:
        r[k] = [x * 1.5 for x in r[k]]
else:
    d["samples"]["n16/rand_iops"].pop()
d["run"] = "doctored"
json.dump(d, open(sys.argv[2], "w"))
PY
  if "$py" "$here/bench.py" pool --trials 300 "$tmp/bad.json" >/dev/null 2>"$tmp/err.txt"; then
    fail "pool accepted samples out of their rounds ($(basename "$run"))"
  fi
  grep -q "doctored: 16 snapshots / 1, 4k randwrite" "$tmp/err.txt" || { cat "$tmp/err.txt"; fail "the error names no run and target"; }
done
echo "test_pool: ${#runs[@]} runs, $n targets pooled; rounds = samples; doctored runs (both layouts) are refused"
