#!/usr/bin/python3
"""Helpers of tests/bench/run.sh (Debian's /usr/bin/python3, standard library only).

  bench.py fio FILE                      -> "IOPS MiB/s" of the write side of a fio JSON output
  bench.py report --results TSV ...      -> prints the table and targets, writes the JSON
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys


def fio_json(path):
    text = open(path).read()
    # fio's nbd engine prints "fio: connected to NBD server" before the JSON.
    return json.loads(text[text.index("{"):])


def cmd_fio(args):
    job = fio_json(args.file)["jobs"][0]["write"]
    print(f"{job['iops']:.0f} {job['bw'] / 1024:.1f}")


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 - machine facts are best effort
        return ""


def machine():
    cpu = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "nproc": int(sh("nproc") or 0),
        "cpu": cpu,
        "kernel": platform.release(),
        "free_h": sh("free -h"),
        "nbdkit": sh("nbdkit --version"),
        "fio": sh("fio --version"),
        "nbdcopy": sh("nbdcopy --version | head -1"),
        "git": sh(f"git -C {os.path.dirname(os.path.abspath(__file__))} describe --always --dirty"),
    }


class Results:
    def __init__(self, path):
        self.samples = {}
        self.rounds = {}  # (case, metric) -> {round: [values]}
        for line in open(path):
            case, metric, rnd, value = line.rstrip("\n").split("\t")
            self.samples.setdefault((case, metric), []).append(float(value))
            self.rounds.setdefault((case, metric), {}).setdefault(int(rnd), []).append(float(value))

    def median(self, case, metric):
        s = self.samples.get((case, metric))
        return statistics.median(s) if s else None

    def paired_ratio(self, case, base, metric):
        """Median over rounds of case/base, each side the median of its round:
        cases measured next to each other share the machine's state then."""
        a, b = self.rounds.get((case, metric), {}), self.rounds.get((base, metric), {})
        rs = [statistics.median(a[r]) / statistics.median(b[r]) for r in a if r in b and statistics.median(b[r])]
        return statistics.median(rs) if rs else None

    def spread(self, case, metric):
        s = self.samples.get((case, metric))
        return (min(s), max(s)) if s else None


def fmt(v, unit=""):
    if v is None:
        return "-"
    return f"{v:,.0f}{unit}"


def fmt_ratio(r):
    return "-" if r is None else f"{r:.2f}x"


def cmd_report(args):
    res = Results(args.results)
    m = res.median
    out = {"machine": machine(), "parameters": {
        "size_bytes": args.size, "chunk_bytes": args.chunk, "rounds": args.rounds,
        "randwrite_runtime_s": args.runtime, "quick": bool(args.quick),
        "run_seconds": args.seconds, "waited_for_quiet_seconds": args.waited, "workdir": args.workdir,
        "plugin_sha256_prefix": args.plugin_sha256, "loadavg_before": args.loadavg, "fstype": args.fstype, "build": args.build}}
    lines = []
    p = lines.append
    mach = out["machine"]
    p(f"nbdsnap benchmark, {mach['date']}, {mach['nproc']} cores ({mach['cpu']}), kernel {mach['kernel']}")
    p(f"volume {args.size / 2**30:g} GiB, chunk {args.chunk >> 10} KiB, {args.rounds} round(s), "
      f"medians (min-max), directory on {args.fstype}; {mach['nbdkit']}, {mach['fio']}")
    p("ratio = median over the rounds of (case / baseline measured in the same round)")
    p(f"run took {args.seconds} s, {args.waited} s of it waiting for other processes to leave the machine idle; "
      f"plugin sha256 {args.plugin_sha256}..., git {mach['git']}")
    p("")

    write_rows = [("base", "a) nbdkit file (baseline)"), ("nosnap", "b) plugin, no snapshot"),
                  ("first", "c) plugin, snapshot, first touch"), ("copied", "d) plugin, snapshot, all copied")]
    hdr = f"{'case':<36} {'4k randwrite IOPS':>26} {'ratio':>6}   {'1M seqwrite MiB/s':>22} {'ratio':>6}"
    p(hdr)
    p("-" * len(hdr))
    table = {}

    def cell(case, metric):
        v, sp = m(case, metric), res.spread(case, metric)
        if v is None:
            return "-"
        return f"{fmt(v)} ({fmt(sp[0])}-{fmt(sp[1])})"

    for case, label in write_rows:
        rr, rs = res.paired_ratio(case, "base", "rand_iops"), res.paired_ratio(case, "base", "seq_mibs")
        p(f"{label:<36} {cell(case, 'rand_iops'):>26} {fmt_ratio(rr):>6}   "
          f"{cell(case, 'seq_mibs'):>22} {fmt_ratio(rs):>6}")
        table[case] = {"rand_iops": m(case, "rand_iops"), "rand_ratio": rr,
                       "seq_mibs": m(case, "seq_mibs"), "seq_ratio": rs,
                       "rand_iops_samples": res.samples.get((case, "rand_iops")),
                       "seq_mibs_samples": res.samples.get((case, "seq_mibs"))}
    nf = m("newfile", "seq_mibs")
    if nf is not None:
        p(f"{'  reference: dd 1M blocks to a new file':<36} {'':>26} {'':>6}   {cell('newfile', 'seq_mibs'):>22} "
          f"{fmt_ratio(res.paired_ratio('newfile', 'base', 'seq_mibs')):>6}")
        table["newfile_dd"] = {"seq_mibs": nf, "seq_ratio": res.paired_ratio("newfile", "base", "seq_mibs"),
                               "seq_mibs_samples": res.samples.get(("newfile", "seq_mibs"))}
    copied_in_rand = m("first", "rand_chunks_copied")
    if copied_in_rand is not None:
        chunks = (args.size + args.chunk - 1) // args.chunk
        p(f"  (c randwrite: {copied_in_rand:,.0f} of {chunks:,} chunks copied during the "
          f"{args.runtime} s run; the rest of the run overwrites copied chunks)")
        table["first"]["rand_chunks_copied"] = copied_in_rand
    p("")
    p(f"{f'4k writes, one per {args.chunk >> 10} KiB chunk (first touch)':<52} {'IOPS':>26} {'ratio':>6}")
    for case, label in [("base", "  a) nbdkit file"), ("nosnap", "  b) plugin, no snapshot"),
                        ("first", "  c) plugin, fresh snapshot")]:
        r = res.paired_ratio(case, "base", "touch_iops")
        p(f"{label:<52} {cell(case, 'touch_iops'):>26} {fmt_ratio(r):>6}")
        table.setdefault(case, {})["one_write_per_chunk_iops"] = m(case, "touch_iops")
        table[case]["one_write_per_chunk_ratio"] = r
    p("")

    p(f"{'nbdcopy read to null:':<52} {'MiB/s':>26} {'ratio':>6}")
    reads = {}
    for case, label in [("base_read", "  nbdkit file (baseline)"), ("vol_read", "  plugin volume vol0"),
                        ("snap_fresh_read", "  snapshot export, fresh (reads the origin)"),
                        ("snap_copied_read", "  snapshot export, all copied (diff storage)")]:
        r = res.paired_ratio(case, "base_read", "read_mibs")
        p(f"{label:<52} {cell(case, 'read_mibs'):>26} {fmt_ratio(r):>6}")
        reads[case] = {"mibs": m(case, "read_mibs"), "ratio": r, "samples": res.samples.get((case, "read_mibs"))}
    p("")

    big, tiny = m("rss_big", "vmrss_kib"), m("rss_tiny", "vmrss_kib")
    diff_mib = (big - tiny) / 1024 if big is not None and tiny is not None else None
    p("RSS of nbdkit (VmRSS, after 5 small 4k writes spread over the volume and an nbdinfo connection)")
    rss = {}
    for case, label in [("rss_tiny", "  plugin, 1 MiB volume (empty plugin)"),
                        ("rss_big", "  plugin, sparse 1 TiB volume, no snapshot"),
                        ("rss_file_big", "  nbdkit file, sparse 1 TiB (reference)"),
                        ("rss_big_spread", "  plugin, 1 TiB, one write per 512 MiB (whole CBT map)")]:
        v = m(case, "vmrss_kib")
        if v is None:
            continue
        p(f"  {label:<50} {v / 1024:8.1f} MiB  (peak {m(case, 'vmhwm_kib') / 1024:.1f}, "
          f"anon {m(case, 'rssanon_kib') / 1024:.1f}, file {m(case, 'rssfile_kib') / 1024:.1f})")
        rss[case] = {k: m(case, k) for k in ("vmrss_kib", "vmhwm_kib", "rssanon_kib", "rssfile_kib")}
    if diff_mib is not None:
        p(f"  {'  difference 1 TiB - 1 MiB':<50} {diff_mib:8.1f} MiB")
    cr = m("copied", "rss_kib")
    if cr is not None:
        p(f"  {'  plugin, this volume, snapshot all copied (info)':<50} {cr / 1024:8.1f} MiB")
        rss["bench_volume_all_copied_kib"] = cr
    p("")

    targets = [
        ("no snapshot, 4k randwrite", table["nosnap"]["rand_ratio"], ">=", 0.95, "x"),
        ("no snapshot, 1M seqwrite", table["nosnap"]["seq_ratio"], ">=", 0.95, "x"),
        ("all copied, 4k randwrite", table["copied"]["rand_ratio"], ">=", 0.90, "x"),
        ("all copied, 1M seqwrite", table["copied"]["seq_ratio"], ">=", 0.90, "x"),
        ("snapshot export read, all copied", reads["snap_copied_read"]["ratio"], ">=", 0.90, "x"),
        ("snapshot export read, fresh", reads["snap_fresh_read"]["ratio"], ">=", 0.90, "x"),
        ("first touch, 1M seqwrite", table["first"]["seq_ratio"], ">=", 0.30, "x"),
        ("RSS 1 TiB - 1 MiB volume", diff_mib, "<=", 16.0, " MiB"),
    ]
    p(f"{'target':<36} {'measured':>12} {'target':>12}  result")
    tj = []
    for name, v, op, want, unit in targets:
        ok = v is not None and (v >= want if op == ">=" else v <= want)
        shown = "-" if v is None else (f"{v:.2f}x" if unit == "x" else f"{v:.1f}{unit}")
        p(f"{name:<36} {shown:>12} {op + ' ' + (f'{want:.2f}x' if unit == 'x' else f'{want:g}{unit}'):>12}  "
          f"{'PASS' if ok else 'MISS'}")
        tj.append({"target": name, "measured": v, "op": op, "threshold": want,
                   "unit": unit.strip() or "ratio", "pass": ok})
    p("")

    # CPU used by other processes during the measurements (shared machine).
    other = {k: v for k, v in res.samples.items() if k[1].endswith("_other_cpu_pct")}
    if other:
        allv = [x for v in other.values() for x in v]
        p(f"other CPU load during the measurements (not the server, fio or nbdcopy; % of the machine; "
          f"load average before: {args.loadavg}):")
        names = {"base": "a", "nosnap": "b", "first": "c", "copied": "d", "base_read": "a",
                 "vol_read": "b", "snap_fresh_read": "c", "snap_copied_read": "d"}
        for kind in ("rand", "seq", "touch", "read"):
            cells = [f"{names.get(c, c)} {statistics.median(v):.0f}% (max {max(v):.0f})"
                     for (c, k), v in sorted(other.items(), key=lambda kv: names.get(kv[0][0], "z"))
                     if k == f"{kind}_other_cpu_pct"]
            if cells:
                p(f"  {kind:<6} " + ", ".join(cells))
        if max(allv) > 10:
            p(f"  WARNING: up to {max(allv):.0f}% of the machine was busy with other work during some "
              f"measurements; the medians damp it, but treat ratios near a target as noise.")
        out["other_cpu_pct"] = {f"{c}/{k}": v for (c, k), v in other.items()}
        p("")

    cmds = []
    for line in open(args.commands):
        line = line.rstrip()
        if line and line not in cmds:
            cmds.append(line)
    p(f"commands used (each ran once per case and round), with W={args.workdir}:")
    for c in cmds:
        p("  " + c.replace(args.workdir, "$W"))

    out.update({"writes": table, "reads": reads, "rss": rss, "rss_difference_mib": diff_mib,
                "targets": tj, "commands": cmds,
                "samples": {f"{c}/{k}": v for (c, k), v in res.samples.items()
                            if not k.endswith("_other_cpu_pct")}})
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("fio")
    a.add_argument("file")
    a.set_defaults(fn=cmd_fio)
    a = sub.add_parser("report")
    for k in ("results", "commands", "json", "workdir", "fstype", "build", "plugin-sha256", "loadavg"):
        a.add_argument("--" + k, required=True)
    for k in ("size", "chunk", "rounds", "runtime", "quick", "seconds", "waited"):
        a.add_argument("--" + k, type=int, required=True)
    a.set_defaults(fn=cmd_report)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
