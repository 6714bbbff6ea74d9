#!/usr/bin/python3
"""Helpers of tests/bench/run.sh (Debian's /usr/bin/python3, standard library only).

  bench.py fio FILE [--read]             -> "IOPS MiB/s" of the write (or read) side of a fio JSON output
  bench.py linkinfo SOCKET ID            -> JSON of a snapshot's info over the plugin's control link
  bench.py takepause ...                 -> take pause as 4 origin writers see it (libnbd, processes)
  bench.py cbt ...                       -> time and bytes of the API's cbt changes on a volume
  bench.py report --results TSV ...      -> prints the table and targets, writes the JSON and the chart
  bench.py chart --json FILE --chart PNG -> draws the chart again from a run's JSON
  bench.py pool JSON...                  -> the ratio targets over several runs: per-round ratios
                                            pooled, how often one run misses, and the A/A noise

The control link and the public API are spoken directly (a few lines of raw
protobuf below: Debian's python3 has no protobuf module installed by default).
"""
import argparse
import datetime
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time


# ----------------------------------------------------------- raw protobuf
def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb(*fields):
    """Encodes (number, value) pairs: int -> varint, str/bytes -> length-delimited."""
    out = bytearray()
    for num, v in fields:
        if v is None:
            continue
        if isinstance(v, int):
            out += _varint(num << 3) + _varint(v)
        else:
            b = v.encode() if isinstance(v, str) else bytes(v)
            out += _varint(num << 3 | 2) + _varint(len(b)) + b
    return bytes(out)


def unpb(buf):
    """Decodes a message into {number: [values]} (varints as int, the rest as bytes)."""
    out, i = {}, 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _read_varint(buf, i)
        elif wt == 2:
            n, i = _read_varint(buf, i)
            v, i = bytes(buf[i:i + n]), i + n
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wt}")
        out.setdefault(num, []).append(v)
    return out


def _read_varint(buf, i):
    shift = n = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def one(d, num, default=None):
    v = d.get(num)
    return v[0] if v else default


class Framed:
    """One connection to the control link or the API: varint-delimited frames.
    Counts the bytes sent and received (frames included)."""

    def __init__(self, path, api=False):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.api = api
        self.tag = 0
        self.sent = self.received = 0
        self.buf = bytearray()

    def call(self, op_field, body):
        self.tag += 1
        req = pb((1, self.tag), (2, 1) if self.api else (2, None), (op_field, body))
        frame = _varint(len(req)) + req
        self.s.sendall(frame)
        self.sent += len(frame)
        while True:  # the length prefix, then the message
            try:
                n, i = _read_varint(self.buf, 0)
                if len(self.buf) >= i + n:
                    msg = bytes(self.buf[i:i + n])
                    del self.buf[:i + n]
                    self.received += i + n
                    self.t_received = time.perf_counter()  # before decoding
                    break
            except IndexError:
                pass
            chunk = self.s.recv(1 << 20)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk
        resp = unpb(msg)
        code = one(resp, 2, 0)
        if code:
            code = code - (1 << 64) if code >= 1 << 63 else code
            raise RuntimeError(f"error {code}: {one(resp, 3, b'').decode()}")
        return unpb(one(resp, op_field, b""))

    def close(self):
        self.s.close()


# Control link (proto/link.proto) operations used here.
def link_create(c, volume, name):
    return one(c.call(12, pb((1, volume), (2, name))), 1).decode()


def link_append(c, sid, path, length):
    c.call(13, pb((1, sid), (2, path), (3, pb((1, 0), (2, length)))))


def link_take(c, sid):
    r = c.call(14, pb((1, sid)))
    return one(r, 1, 0), one(r, 2, 0)  # sequence, pause_us


def link_destroy(c, sid):
    c.call(18, pb((1, sid)))


def link_info(c, sid):
    s = unpb(one(c.call(15, pb((1, sid))), 1, b""))
    return {"name": one(s, 2, b"").decode(), "chunks_copied": one(s, 12, 0),
            "storage_used": one(s, 10, 0), "chunk_table_bytes": one(s, 14, 0),
            "saved_stamps_bytes": one(s, 15, 0)}


def cmd_linkinfo(args):
    c = Framed(args.socket)
    print(json.dumps(link_info(c, args.id)))
    c.close()


def pct(values, p):
    v = sorted(values)
    if not v:
        return None
    k = (len(v) - 1) * p / 100
    f = int(k)
    return v[f] + (v[min(f + 1, len(v) - 1)] - v[f]) * (k - f)


# ------------------------------------------------------------- take pause
def _writer(uri, size, deadline, stop, path, seed):
    import array
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    rnd = random.Random(seed)
    buf = bytes([seed & 0xFF]) * 4096
    blocks = size // 4096
    starts, ends = array.array("q"), array.array("q")
    mono = time.monotonic_ns
    while mono() < deadline and not stop.is_set():
        off = rnd.randrange(blocks) * 4096
        t0 = mono()
        h.pwrite(buf, off)
        starts.append(t0)
        ends.append(mono())
    h.shutdown()
    with open(path, "wb") as f:
        starts.tofile(f)
        ends.tofile(f)


def cmd_takepause(args):
    """4 writer processes (one libnbd connection each, 4k random writes at
    queue depth 1, every write timed) while the main process takes snapshots
    over the control link. The pause a take causes is, as writers see it, the
    longest write that overlapped the take call; also reported: the plugin's
    own pause_us, and the writers' latency away from takes."""
    import array
    import multiprocessing as mp
    n_takes, writers = args.takes, args.writers
    # The writers stop once the takes are done; the deadline only bounds a
    # run whose takes hang. A take cycle costs its two sleeps plus create,
    # append, take and destroy: about 0.1 s on an idle disk, 0.6 s on average
    # in run L, with the disk behind the copies (186 of 200 takes within a
    # bound of 0.5 s per cycle); the bound is 2 s per cycle.
    deadline = time.monotonic_ns() + int((1.0 + n_takes * (args.spacing * 2 + 2.0) + 5.0) * 1e9)
    stop = mp.Event()
    procs = []
    for w in range(writers):
        p = mp.Process(target=_writer, args=(args.uri, args.size, deadline, stop, f"{args.dir}/writer{w}.bin", w + 1))
        p.start()
        procs.append(p)
    c = Framed(args.socket)
    time.sleep(1.0)
    takes, prev = [], None
    for i in range(n_takes):
        name = f"tp{i}"
        diff = f"{args.dir}/tp{i}.diff"
        with open(diff, "wb") as f:
            f.truncate(args.size)
        sid = link_create(c, args.volume, name)
        link_append(c, sid, diff, args.size)
        time.sleep(args.spacing)
        t0 = time.monotonic_ns()
        _, pause_us = link_take(c, sid)
        t1 = time.monotonic_ns()
        takes.append((t0, t1, pause_us))
        time.sleep(args.spacing)
        if prev:  # keep one snapshot held: writes after each take are first touches
            link_destroy(c, prev[0])
            os.unlink(prev[1])
        prev = (sid, diff)
        if time.monotonic_ns() > deadline - int(2e9):
            break
    if prev:
        link_destroy(c, prev[0])
        os.unlink(prev[1])
    c.close()
    stop.set()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"takepause: a writer failed ({p.exitcode})")
    lat = []  # (start, end) of every write
    for w in range(writers):
        a = array.array("q")
        path = f"{args.dir}/writer{w}.bin"
        with open(path, "rb") as f:
            a.fromfile(f, os.path.getsize(path) // 8)
        n = len(a) // 2
        lat += list(zip(a[:n], a[n:]))
        os.unlink(path)
    lat.sort()
    seen = []
    for t0, t1, _ in takes:
        worst = max((e - s for s, e in lat if s < t1 and e > t0), default=0)
        seen.append(worst / 1e6)
    away = [(e - s) / 1e6 for s, e in lat if not any(s < t1 + 20e6 and e > t0 - 20e6 for t0, t1, _ in takes)]
    res = {"takes": len(takes), "writers": writers, "writes": len(lat),
           "seen_ms": seen, "plugin_pause_us": [p for _, _, p in takes],
           "call_ms": [(t1 - t0) / 1e6 for t0, t1, _ in takes],
           "seen_p50_ms": pct(seen, 50), "seen_p99_ms": pct(seen, 99), "seen_max_ms": max(seen),
           "plugin_p50_ms": pct([p / 1000 for _, _, p in takes], 50),
           "plugin_p99_ms": pct([p / 1000 for _, _, p in takes], 99),
           "write_p50_ms_away": pct(away, 50), "write_p99_ms_away": pct(away, 99),
           "writes_per_s": len(lat) / ((lat[-1][1] - lat[0][0]) / 1e9) if lat else 0}
    print(json.dumps(res))


# -------------------------------------------------------------------- CBT
def cmd_cbt(args):
    """Through nbdsnapd's public API: cbt info, 1% of the CBT blocks written
    (one 4 KiB write each, random blocks), a snapshot taken, then `cbt changes
    --since` the sequence before the writes, timed (round trip on the Unix
    socket, an upper bound of the server time) and its bytes on the wire."""
    import nbd
    c = Framed(args.api, api=True)
    for _ in range(100):  # until the data plane runs
        if one(c.call(10, b""), 3, b"") == b"running":
            break
        time.sleep(0.1)

    def take(name):  # snapshot create + take through the API; returns (id, closed sequence)
        sid = one(unpb(one(c.call(14, pb((1, args.volume), (2, name))), 1)), 1).decode()
        return sid, one(unpb(one(c.call(16, pb((1, sid))), 1)), 4)

    info = c.call(21, pb((1, args.volume)))
    gen = one(info, 1).decode()
    bsize, bcount = one(info, 3), one(info, 4)
    # The previous backup's snapshot, destroyed once read (its sequence stays
    # valid for --since): the writes below then copy nothing.
    base, seq0 = take("cbt-base")
    c.call(20, pb((1, base)))
    rnd = random.Random(5)
    blocks = sorted(rnd.sample(range(bcount), max(1, bcount * args.percent // 100)))
    h = nbd.NBD()
    h.connect_uri(args.uri)
    buf = nbd.Buffer.from_bytearray(bytearray(b"\x5a" * 4096))
    for b in blocks:  # pipelined: 64 writes in flight, retired by the callback
        while h.aio_in_flight() >= 64:
            h.poll(-1)
        h.aio_pwrite(buf, b * bsize, completion=lambda err: 1)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    h.flush()
    h.shutdown()
    take("cbt")
    out = {"volume_bytes": bcount * bsize, "block_size": bsize, "block_count": bcount,
           "blocks_written": len(blocks)}
    for label, snapshot in (("snapshot", "cbt"), ("live", None)):
        times, sent, recv, ranges, changed = [], 0, 0, 0, 0
        for _ in range(args.repeat):
            s0, r0 = c.sent, c.received
            t0 = time.perf_counter()
            r = c.call(23, pb((1, args.volume), (2, gen), (3, seq0), (4, snapshot)))
            times.append((c.t_received - t0) * 1000)  # request sent -> last byte of the reply
            sent, recv = c.sent - s0, c.received - r0
            ranges, changed = len(r.get(3, [])), one(r, 4, 0)
        out[label] = {"ms_p50": pct(times, 50), "ms_min": min(times), "ms_max": max(times),
                      "bytes_sent": sent, "bytes_received": recv, "ranges": ranges,
                      "changed_bytes": changed, "samples_ms": times}
    c.close()
    print(json.dumps(out))


def fio_json(path):
    text = open(path).read()
    # fio's nbd engine prints "fio: connected to NBD server" before the JSON.
    return json.loads(text[text.index("{"):])


def cmd_fio(args):
    job = fio_json(args.file)["jobs"][0]["read" if args.read else "write"]
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
        "qemu": sh("qemu-storage-daemon --version | head -1"),
        "git": sh(f"git -C {os.path.dirname(os.path.abspath(__file__))} describe --always --dirty"),
    }


def ratios_of(rounds, case, base, metric):
    """case/base per round, each side the median of its round; rounds:
    (case, metric) -> {round: [values]}."""
    a, b = rounds.get((case, metric), {}), rounds.get((base, metric), {})
    return [statistics.median(a[r]) / statistics.median(b[r]) for r in sorted(a) if r in b and statistics.median(b[r])]


def misses(value, op, want):
    return not {">=": value >= want, ">": value > want, "<=": value <= want}[op]


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

    def round_ratios(self, case, base, metric):
        return ratios_of(self.rounds, case, base, metric)

    def paired_ratio(self, case, base, metric):
        """Median over rounds of case/base, each side the median of its round:
        cases measured next to each other share the machine's state then."""
        rs = self.round_ratios(case, base, metric)
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


# The targets that are a paired ratio of two cases (tests/bench/run.sh names
# the cases): name, case, the case it is divided by, metric, op, threshold.
# The names are the JSON's "targets" names, which bench.py pool matches.
RATIO_TARGETS = [
    # issue 2: the plugin against nbdkit file
    ("no snapshot, 4k randwrite / file", "nosnap", "base", "rand_iops", ">=", 0.95),
    ("no snapshot, 1M seqwrite / file", "nosnap", "base", "seq_mibs", ">=", 0.95),
    ("no snapshot, 4k randread / file", "nosnap", "base", "rread_iops", ">=", 0.95),
    ("all copied, 4k randwrite / file", "copied", "base", "rand_iops", ">=", 0.90),
    ("all copied, 1M seqwrite / file", "copied", "base", "seq_mibs", ">=", 0.90),
    ("first touch, 1M seqwrite / file", "first", "base", "seq_mibs", ">=", 0.30),
    ("snapshot read fresh, 1 conn / file", "snap_fresh_read", "base_read", "read_mibs", ">=", 0.90),
    ("snapshot read fresh, 4 conn / file", "snap_fresh_read", "base_read", "read4_mibs", ">=", 0.90),
    ("snapshot read copied, 1 conn / file", "snap_copied_read", "base_read", "read_mibs", ">=", 0.90),
    ("snapshot read copied, 4 conn / file", "snap_copied_read", "base_read", "read4_mibs", ">=", 0.90),
] + [
    # issue 5: with a snapshot held, against QEMU's copy-before-write
    (f"{work}, snapshot, {state} / QEMU", ours, theirs, metric, ">", 1.0)
    for work, metric in (("4k randwrite", "rand_iops"), ("1M seqwrite", "seq_mibs"), ("4k randread", "rread_iops"))
    for state, ours, theirs in (("first touch", "first", "qfirst"), ("all copied", "copied", "qcopied"))
] + [
    (f"snapshot read, {state}, {conns} / QEMU", ours, theirs, metric, ">", 1.0)
    for state, ours, theirs in (("fresh", "snap_fresh_read", "qsnap_fresh_read"),
                                ("all copied", "snap_copied_read", "qsnap_copied_read"))
    for conns, metric in (("1 connection", "read_mibs"), ("4 connections", "read4_mibs"))
] + [
    # issue 5: write cost with 16 snapshots held against 1
    ("16 snapshots / 1, 4k randwrite", "n16", "n1", "rand_iops", ">=", 0.90),
    ("16 snapshots / 1, 1M seqwrite", "n16", "n1", "seq_mibs", ">=", 0.90),
]


def cmd_report(args):
    res = Results(args.results)
    m = res.median
    pr = res.paired_ratio
    out = {"machine": machine(), "parameters": {
        "size_bytes": args.size, "chunk_bytes": args.chunk, "rounds": args.rounds,
        "fio_runtime_s": args.runtime, "quick": bool(args.quick),
        "run_seconds": args.seconds, "waited_for_quiet_seconds": args.waited, "workdir": args.workdir,
        "plugin_sha256_prefix": args.plugin_sha256, "loadavg_before": args.loadavg, "fstype": args.fstype, "build": args.build}}
    lines = []
    p = lines.append
    mach = out["machine"]
    p(f"nbdsnap benchmark, {mach['date']}, {mach['nproc']} cores ({mach['cpu']}), kernel {mach['kernel']}")
    p(f"volume {args.size / 2**30:g} GiB, chunk {args.chunk >> 10} KiB, {args.rounds} round(s), {args.runtime} s fio runs, "
      f"medians (min-max), directory on {args.fstype}; {mach['nbdkit']}, {mach['fio']}, {mach['qemu']}")
    p("ratio = median over the rounds of (case / other case measured in the same round)")
    p(f"run took {args.seconds} s, {args.waited} s of it waiting for other processes to leave the machine idle; "
      f"plugin sha256 {args.plugin_sha256}..., git {mach['git']}")
    p("")

    def cell(case, metric):
        v, sp = m(case, metric), res.spread(case, metric)
        if v is None:
            return "-"
        return f"{fmt(v)} ({fmt(sp[0])}-{fmt(sp[1])})"

    # ---- writes and random reads against nbdkit file
    write_rows = [("base", "a) nbdkit file (baseline)"), ("nosnap", "b) plugin, no snapshot"),
                  ("first", "c) plugin, snapshot, first touch"), ("copied", "d) plugin, snapshot, all copied"),
                  ("n1", "   nsnap: 1 snapshot, first touch"), ("n4", "   nsnap: 4 snapshots, first touch"),
                  ("n16", "   nsnap: 16 snapshots, first touch"),
                  ("qnbd", "q) qemu-nbd, no snapshot"), ("qfirst", "q) QEMU cbw, first touch"),
                  ("qcopied", "q) QEMU cbw, all copied")]
    hdr = (f"{'case':<36} {'4k randwrite IOPS':>24} {'ratio':>6}  {'1M seqwrite MiB/s':>20} {'ratio':>6}  "
           f"{'4k randread IOPS':>24} {'ratio':>6}")
    p(hdr)
    p("-" * len(hdr))
    table = {}
    for case, label in write_rows:
        rr, rs, rq = pr(case, "base", "rand_iops"), pr(case, "base", "seq_mibs"), pr(case, "base", "rread_iops")
        p(f"{label:<36} {cell(case, 'rand_iops'):>24} {fmt_ratio(rr):>6}  {cell(case, 'seq_mibs'):>20} {fmt_ratio(rs):>6}  "
          f"{cell(case, 'rread_iops'):>24} {fmt_ratio(rq):>6}")
        table[case] = {"rand_iops": m(case, "rand_iops"), "rand_ratio": rr,
                       "seq_mibs": m(case, "seq_mibs"), "seq_ratio": rs,
                       "rread_iops": m(case, "rread_iops"), "rread_ratio": rq,
                       "rand_iops_samples": res.samples.get((case, "rand_iops")),
                       "seq_mibs_samples": res.samples.get((case, "seq_mibs")),
                       "rread_iops_samples": res.samples.get((case, "rread_iops"))}
    nf = m("newfile", "seq_mibs")
    if nf is not None:
        p(f"{'  reference: dd 1M blocks to a new file':<36} {'':>24} {'':>6}  {cell('newfile', 'seq_mibs'):>20} "
          f"{fmt_ratio(pr('newfile', 'base', 'seq_mibs')):>6}")
        table["newfile_dd"] = {"seq_mibs": nf, "seq_ratio": pr("newfile", "base", "seq_mibs"),
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
                        ("first", "  c) plugin, fresh snapshot"),
                        ("first64", "  c) the same, 64 KiB chunks (chunk_minimum_shift=16)"),
                        ("firstz", "  c) the same, diff_storage_zero_fill=1"),
                        ("first64z", "  c) the same, 64 KiB chunks and zero-fill"),
                        ("qfirst", "  q) QEMU cbw, fresh"),
                        ("diskref", f"  reference: O_DIRECT {args.chunk >> 10} KiB writes/s, no NBD")]:
        if m(case, "touch_iops") is None:  # variants and references not run
            continue
        r = pr(case, "base", "touch_iops")
        p(f"{label:<52} {cell(case, 'touch_iops'):>26} {fmt_ratio(r):>6}")
        table.setdefault(case, {})["one_write_per_chunk_iops"] = m(case, "touch_iops")
        table[case]["one_write_per_chunk_ratio"] = r
    p("")

    # ---- nbdcopy reads
    p(f"{'nbdcopy read to null: MiB/s':<46} {'1 connection':>22} {'ratio':>6}  {'4 connections':>22} {'ratio':>6}")
    reads = {}
    for case, label in [("base_read", "  a) nbdkit file (baseline)"), ("vol_read", "  b) plugin volume vol0"),
                        ("snap_fresh_read", "  c) snapshot, fresh (reads the origin)"),
                        ("snap_copied_read", "  d) snapshot, all copied (diff storage)"),
                        ("qnbd_read", "  q) qemu-nbd"),
                        ("qsnap_fresh_read", "  q) QEMU snapshot-access, fresh"),
                        ("qsnap_copied_read", "  q) QEMU snapshot-access, all copied")]:
        r1, r4 = pr(case, "base_read", "read_mibs"), pr(case, "base_read", "read4_mibs")
        p(f"{label:<46} {cell(case, 'read_mibs'):>22} {fmt_ratio(r1):>6}  {cell(case, 'read4_mibs'):>22} {fmt_ratio(r4):>6}")
        reads[case] = {"mibs": m(case, "read_mibs"), "ratio": r1, "samples": res.samples.get((case, "read_mibs")),
                       "mibs4": m(case, "read4_mibs"), "ratio4": r4, "samples4": res.samples.get((case, "read4_mibs"))}
        for conns, pre in (("", "read"), ("4", "read4")):
            for who in ("server", "nbdcopy"):
                reads[case][f"{who}_cpu_s_per_gib{conns}"] = m(case, f"{pre}_{who}_cpu_s_per_gib")
    # What each GiB cost in CPU (all threads, user + system): with the cores
    # the limit, a server can only be faster by doing less per byte.
    if any(v.get("server_cpu_s_per_gib") is not None for v in reads.values()):
        p(f"{'  CPU seconds per GiB read, server + nbdcopy':<46} {'1 connection':>22} {'':>6}  {'4 connections':>22}")
        for case, label in [("base_read", "a) nbdkit file"), ("snap_fresh_read", "c) snapshot, fresh"),
                            ("snap_copied_read", "d) snapshot, all copied"),
                            ("qsnap_fresh_read", "q) QEMU, fresh"), ("qsnap_copied_read", "q) QEMU, all copied")]:
            r = reads[case]

            def cpu(conns):
                a, b = r.get(f"server_cpu_s_per_gib{conns}"), r.get(f"nbdcopy_cpu_s_per_gib{conns}")
                return "-" if a is None or b is None else f"{a:.3f} + {b:.3f}"
            p(f"{'    ' + label:<46} {cpu(''):>22} {'':>6}  {cpu('4'):>22}")
    p("")

    # ---- nbdsnap vs QEMU, paired
    vsq = [(f"{work}, {state}", ours, theirs, metric)
           for work, metric in (("4k randwrite", "rand_iops"), ("1M seqwrite", "seq_mibs"),
                                ("4k randread", "rread_iops"))
           for state, ours, theirs in (("no snapshot (qemu-nbd)", "nosnap", "qnbd"),
                                       ("snapshot, first touch", "first", "qfirst"),
                                       ("snapshot, all copied", "copied", "qcopied"))]
    vsq.append(("4k one write per chunk, first touch", "first", "qfirst", "touch_iops"))
    vsq += [(f"snapshot read, {state}, {conns}", ours, theirs, metric)
            for state, ours, theirs in (("fresh", "snap_fresh_read", "qsnap_fresh_read"),
                                        ("all copied", "snap_copied_read", "qsnap_copied_read"))
            for conns, metric in (("1 connection", "read_mibs"), ("4 connections", "read4_mibs"))]
    # Not targets: the plugin with other parameters than its defaults.
    vsq_info = [("4k one write per chunk, 64 KiB chunks", "first64", "qfirst", "touch_iops"),
                ("4k one write per chunk, zero-filled storage", "firstz", "qfirst", "touch_iops"),
                ("4k one write per chunk, 64 KiB, zero-fill", "first64z", "qfirst", "touch_iops")]
    p(f"{'nbdsnap vs QEMU (same round)':<44} {'nbdsnap':>10} {'QEMU':>10} {'ratio':>7}")
    vs = {}
    for label, ours, theirs, metric, info in [(*v, False) for v in vsq] + [(*v, True) for v in vsq_info]:
        if info and m(ours, metric) is None:
            continue
        r = pr(ours, theirs, metric)
        unit = "MiB/s" if "mibs" in metric else "IOPS"
        p(f"  {label:<42} {fmt(m(ours, metric)):>10} {fmt(m(theirs, metric)):>10} {fmt_ratio(r):>7}  {unit}"
          f"{'  (info)' if info else ''}")
        vs[label] = {"nbdsnap": m(ours, metric), "qemu": m(theirs, metric), "ratio": r, "unit": unit}
    p("")

    # ---- N snapshots
    p(f"{'write cost with N snapshots held (first touch, one volume)':<48} {'4k randwrite IOPS':>18} {'ratio':>6}  {'1M seqwrite MiB/s':>18} {'ratio':>6}")
    multi = {}
    for case, label in [("n1", "  1 snapshot"), ("n4", "  4 snapshots"), ("n16", "  16 snapshots")]:
        rr, rs = pr(case, "n1", "rand_iops"), pr(case, "n1", "seq_mibs")
        p(f"{label:<48} {fmt(m(case, 'rand_iops')):>18} {fmt_ratio(rr):>6}  {fmt(m(case, 'seq_mibs')):>18} {fmt_ratio(rs):>6}")
        multi[case] = {"rand_iops": m(case, "rand_iops"), "rand_ratio": rr, "seq_mibs": m(case, "seq_mibs"), "seq_ratio": rs}
    p("")

    # ---- take pause
    tp = json.load(open(args.takepause)) if args.takepause and os.path.exists(args.takepause) else None
    if tp:
        p(f"take under a running write load ({tp['writers']} writers, 4k random writes at queue depth 1, "
          f"{tp['takes']} takes, {tp['writes_per_s']:,.0f} writes/s)")
        p(f"  pause as writers see it (longest write overlapping a take)  p50 {tp['seen_p50_ms']:.2f} ms  "
          f"p99 {tp['seen_p99_ms']:.2f} ms  max {tp['seen_max_ms']:.2f} ms")
        p(f"  pause reported by the plugin (close to open, drain incl.)  p50 {tp['plugin_p50_ms']:.2f} ms  "
          f"p99 {tp['plugin_p99_ms']:.2f} ms")
        p(f"  for reference, writes away from takes                      p50 {tp['write_p50_ms_away']:.2f} ms  "
          f"p99 {tp['write_p99_ms_away']:.2f} ms")
        p("")

    # ---- CBT
    cbt = json.load(open(args.cbt)) if args.cbt and os.path.exists(args.cbt) else None
    if cbt:
        p(f"cbt changes through nbdsnapd's API, sparse {cbt['volume_bytes'] / 2**40:g} TiB volume, "
          f"{cbt['blocks_written']:,} of {cbt['block_count']:,} CBT blocks ({cbt['block_size'] >> 10} KiB) changed")
        for k, label in (("snapshot", "--since SEQ --snapshot S"), ("live", "--since SEQ (live map)")):
            d = cbt[k]
            p(f"  {label:<26} {d['ranges']:,} ranges, {d['changed_bytes'] / 2**30:.1f} GiB; round trip p50 "
              f"{d['ms_p50']:.1f} ms (min {d['ms_min']:.1f}, max {d['ms_max']:.1f}); on the wire "
              f"{d['bytes_sent']:,} bytes sent, {d['bytes_received']:,} received")
        p("")

    # ---- memory
    big, tiny = m("rss_big", "vmrss_kib"), m("rss_tiny", "vmrss_kib")
    diff_mib = (big - tiny) / 1024 if big is not None and tiny is not None else None
    qbig, qtiny = m("rss_qsd_big", "vmrss_kib"), m("rss_qsd_tiny", "vmrss_kib")
    qdiff_mib = (qbig - qtiny) / 1024 if qbig is not None and qtiny is not None else None
    p("RSS (VmRSS, after 5 small 4k writes spread over the volume and an nbdinfo connection)")
    rss = {}
    for case, label in [("rss_tiny", "  plugin, 1 MiB volume (empty plugin)"),
                        ("rss_big", "  plugin, sparse 1 TiB volume, no snapshot"),
                        ("rss_file_big", "  nbdkit file, sparse 1 TiB (reference)"),
                        ("rss_big_spread", "  plugin, 1 TiB, one write per 512 MiB (whole CBT map)"),
                        ("rss_qsd_tiny", "  QEMU cbw, 1 MiB volume"),
                        ("rss_qsd_big", "  QEMU cbw, sparse 1 TiB volume")]:
        v = m(case, "vmrss_kib")
        if v is None:
            continue
        p(f"  {label:<50} {v / 1024:8.1f} MiB  (peak {m(case, 'vmhwm_kib') / 1024:.1f}, "
          f"anon {m(case, 'rssanon_kib') / 1024:.1f}, file {m(case, 'rssfile_kib') / 1024:.1f})")
        rss[case] = {k: m(case, k) for k in ("vmrss_kib", "vmhwm_kib", "rssanon_kib", "rssfile_kib")}
    if diff_mib is not None:
        p(f"  {'  RSS per TiB of origin, plugin (1 TiB - 1 MiB)':<50} {diff_mib:8.1f} MiB")
    if qdiff_mib is not None:
        p(f"  {'  RSS per TiB of origin, QEMU cbw (1 TiB - 1 MiB)':<50} {qdiff_mib:8.1f} MiB")
    for case, label in (("copied", "plugin"), ("qcopied", "QEMU cbw")):
        cr = m(case, "rss_kib")
        if cr is not None:
            p(f"  {f'  {label}, this volume, all copied (info)':<50} {cr / 1024:8.1f} MiB")
            rss[f"{case}_all_copied_kib"] = cr
    gib = args.size / 2**30
    mem = {}
    for case, label in (("mem_plugin", "plugin"), ("mem_qsd", "QEMU cbw")):
        a0, a1 = m(case, "anon0_kib"), m(case, "anon1_kib")
        if a0 is None:
            continue
        per = (a1 - a0) / 1024 / gib
        mem[case] = {"anon_before_kib": a0, "anon_after_kib": a1, "mib_per_gib_copied": per}
        p(f"  {f'  RssAnon growth per GiB copied, {label}':<50} {per:8.1f} MiB  ({a0 / 1024:.1f} -> {a1 / 1024:.1f} MiB "
          f"over a first-touch pass of {gib:g} GiB)")
    tb, nch, sb = m("mem_plugin", "table_bytes"), m("mem_plugin", "chunks"), m("mem_plugin", "stamps_bytes")
    per_chunk = tb / nch if tb is not None and nch else None
    if per_chunk is not None:
        mem["chunk_table_bytes"] = tb
        mem["chunks"] = nch
        mem["chunk_table_bytes_per_chunk"] = per_chunk
        mem["saved_stamps_bytes"] = sb
        p(f"  {'  chunk table per copied chunk (plugin statistic)':<50} {per_chunk:8.1f} bytes  ({tb:,.0f} bytes, "
          f"{nch:,.0f} chunks; saved CBT stamps {sb:,.0f} bytes)")
    p("")

    # ---- A/A control: two identical servers (nbdkit file, each on its own
    # copy) in the same round. Their ratio is 1.0 but for noise: a row that
    # compares the plugin with a server doing the same work per byte can
    # miss its target by as much as this one strays.
    aa = {}
    if (("base2", "rand_iops") in res.rounds or ("base2_read", "read_mibs") in res.rounds):
        p("A/A control: nbdkit file a2) / nbdkit file a), same round (identical servers; not a target)")
        p(f"  {'workload':<30} {'A/A ratio':>9} {'per round':>14}   {'plugin b) / a)':>14} {'per round':>14}")
        for label, a2, a, b, metric in (("4k randwrite", "base2", "base", "nosnap", "rand_iops"),
                                        ("1M seqwrite", "base2", "base", "nosnap", "seq_mibs"),
                                        ("4k randread", "base2", "base", "nosnap", "rread_iops"),
                                        ("read, 1 connection", "base2_read", "base_read", "vol_read", "read_mibs"),
                                        ("read, 4 connections", "base2_read", "base_read", "vol_read", "read4_mibs")):
            rr, pr_ = res.round_ratios(a2, a, metric), res.round_ratios(b, a, metric)

            def rng(v):
                return f"{min(v):.2f}-{max(v):.2f}" if v else "-"
            p(f"  {label:<30} {fmt_ratio(pr(a2, a, metric)):>9} {rng(rr):>14}   "
              f"{fmt_ratio(pr(b, a, metric)):>14} {rng(pr_):>14}")
            aa[label] = {"aa_ratio": pr(a2, a, metric), "aa_round_ratios": rr,
                         "plugin_ratio": pr(b, a, metric), "plugin_round_ratios": pr_}
        p("")

    def get(d, *ks):
        for k in ks:
            if d is None:
                return None
            d = d.get(k)
        return d

    # Ratio targets (RATIO_TARGETS), each the paired ratio of two cases; the
    # one-write-per-chunk workload is not one of the (4k random
    # writes, 1M sequential writes, 4k random reads): shown with the targets,
    # not counted (docs/benchmarks.md, "The row that cannot hold here").
    targets = [(name, pr(ours, base, metric), op, want, "x") for name, ours, base, metric, op, want in RATIO_TARGETS]
    outside = [("4k one write per chunk, first touch / QEMU", vs["4k one write per chunk, first touch"]["ratio"],
                ">", 1.0, "x")]
    targets += [
        ("take pause p99, 4 writers", get(tp, "seen_p99_ms"), "<=", 10.0, " ms"),
        ("cbt changes, 1 TiB, 1% (p50)", get(cbt, "snapshot", "ms_p50"), "<=", 50.0, " ms"),
        ("chunk table per copied chunk", per_chunk, "<=", 32.0, " B"),
        ("RSS per TiB of origin", diff_mib, "<=", 16.0, " MiB"),
    ]
    p(f"{'target':<52} {'measured':>10} {'target':>10}  result")
    tj, oj = [], []
    for rows, dst in ((targets, tj), (outside, oj)):
        if dst is oj and rows:
            p("outside the issue's workloads (shown, not counted):")
        for name, v, op, want, unit in rows:
            ok = v is not None and not misses(v, op, want)
            shown = "-" if v is None else (f"{v:.2f}x" if unit == "x" else f"{v:.1f}{unit}")
            p(f"{name:<52} {shown:>10} {op + ' ' + (f'{want:.2f}x' if unit == 'x' else f'{want:g}{unit}'):>10}  "
              f"{'PASS' if ok else 'MISS'}")
            dst.append({"target": name, "measured": v, "op": op, "threshold": want,
                        "unit": unit.strip() or "ratio", "pass": ok})
    p(f"{sum(t['pass'] for t in tj)} of {len(tj)} targets met"
      + (f"; outside the issue's workloads {sum(t['pass'] for t in oj)} of {len(oj)}" if oj else ""))
    p("")

    # CPU used by other processes during the measurements (shared machine).
    other = {k: v for k, v in res.samples.items() if k[1].endswith("_other_cpu_pct")}
    if other:
        allv = [x for v in other.values() for x in v]
        p(f"other CPU load during the measurements (not the server, fio or nbdcopy; % of the machine; "
          f"load average before: {args.loadavg}): median {statistics.median(allv):.0f}%, max {max(allv):.0f}%")
        if max(allv) > 10:
            busy = sorted(((max(v), f"{c}/{k[:-len('_other_cpu_pct')]}") for (c, k), v in other.items()), reverse=True)[:6]
            p(f"  WARNING: up to {max(allv):.0f}% of the machine was busy with other work during some "
              f"measurements ({', '.join(f'{n} {x:.0f}%' for x, n in busy)}); the medians damp it, "
              f"but treat ratios near a target as noise.")
        out["other_cpu_pct"] = {f"{c}/{k}": v for (c, k), v in other.items()}
        p("")

    cmds = []
    for line in open(args.commands):
        line = line.rstrip()
        if line and line not in cmds:
            cmds.append(line)
    if args.verbose:
        p(f"commands used (each ran once per case and round), with W={args.workdir}:")
        for c in cmds:
            p("  " + c.replace(args.workdir, "$W"))
    else:
        p(f"{len(cmds)} distinct commands ran: see \"commands\" in the JSON (W={args.workdir})")

    out.update({"aa_control": aa, "writes": table, "reads": reads, "vs_qemu": vs, "snapshots_held": multi, "take_pause": tp,
                "cbt": cbt, "rss": rss, "memory": mem, "rss_difference_mib": diff_mib,
                "rss_difference_qsd_mib": qdiff_mib, "targets": tj, "outside_targets": oj,
                "commands": [c.replace(args.workdir, "$W") for c in cmds],
                "samples": {f"{c}/{k}": v for (c, k), v in res.samples.items()
                            if not k.endswith("_other_cpu_pct")},
                "rounds": {f"{c}/{k}": {str(r): v for r, v in sorted(d.items())} for (c, k), d in res.rounds.items()
                           if not k.endswith("_other_cpu_pct") and k != "rss_kib" and c not in ("mem_plugin", "mem_qsd")
                           and not c.startswith("rss_")}})
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print("\n".join(lines))
    if args.chart:
        chart(args, table, reads, vs, multi, out)


def chart(args, table, reads, vs, multi, out):
    """Two panels: throughput relative to nbdkit file per workload and server;
    nbdsnap relative to QEMU's copy-before-write per workload (gnuplot)."""
    if not subprocess.run("command -v gnuplot", shell=True, capture_output=True).stdout:
        print("no gnuplot: no chart", file=sys.stderr)
        return
    d = os.path.dirname(os.path.abspath(args.json))
    dat1, dat2, gp = (os.path.join(d, n) for n in ("chart-file.dat", "chart-qemu.dat", "chart.gp"))
    series = [("nosnap", "nbdsnap, no snapshot"), ("first", "nbdsnap, first touch"), ("copied", "nbdsnap, all copied"),
              ("qnbd", "qemu-nbd"), ("qfirst", "QEMU cbw, first touch"), ("qcopied", "QEMU cbw, all copied")]
    rmap = {"nosnap": "vol_read", "first": "snap_fresh_read", "copied": "snap_copied_read",
            "qnbd": "qnbd_read", "qfirst": "qsnap_fresh_read", "qcopied": "qsnap_copied_read"}

    def v(x):
        return "NaN" if x is None else f"{x:.3f}"
    with open(dat1, "w") as f:
        f.write("workload " + " ".join(f'"{lab}"' for _, lab in series) + "\n")
        for wl, key in (("4k randwrite", "rand_ratio"), ("1M seqwrite", "seq_ratio"), ("4k randread", "rread_ratio"),
                        ("4k one per chunk", "one_write_per_chunk_ratio")):
            f.write(f'"{wl}" ' + " ".join(v(table.get(c, {}).get(key)) for c, _ in series) + "\n")
        for wl, key in (("nbdcopy 1 conn", "ratio"), ("nbdcopy 4 conn", "ratio4")):
            f.write(f'"{wl}" ' + " ".join(v(reads.get(rmap[c], {}).get(key)) for c, _ in series) + "\n")
    # Short labels; the one-write-per-chunk rows are not the workloads.
    short = {"4k one write per chunk, first touch": "4k one per chunk (not counted)",
             "4k one write per chunk, 64 KiB chunks": "one per chunk, 64K (info)",
             "4k one write per chunk, zero-filled storage": "one per chunk, zero-fill (info)",
             "4k one write per chunk, 64 KiB, zero-fill": "one per chunk, 64K+zero-fill (info)"}
    with open(dat2, "w") as f:
        for label, r in vs.items():
            if "no snapshot" in label:
                continue
            name = short.get(label) or (label.replace("snapshot, ", "").replace("snapshot read", "snap read")
                                        .replace("connection", "conn"))
            f.write(f'"{name}" {v(r["ratio"])}\n')
    mach = out["machine"]
    title = (f"nbdsnap vs nbdkit file and QEMU copy-before-write - {mach['date'][:16]}, {mach['nproc']} cores, "
             f"{args.size / 2**30:g} GiB volume, {args.rounds} round(s)")
    with open(gp, "w") as f:
        f.write(f"""set terminal pngcairo size 1400,1100 font "DejaVu Sans,10"
set output "{args.chart}"
set multiplot layout 2,1 title "{title}"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set grid ytics
set key outside right top vertical
set ylabel "throughput / nbdkit file (same round)"
set yrange [0:*]
set xtics nomirror
plot "{dat1}" using 2:xtic(1) title columnheader(2) lc rgb "#1f77b4", \\
     "" using 3 title columnheader(3) lc rgb "#4a9fe0", \\
     "" using 4 title columnheader(4) lc rgb "#9ccbf0", \\
     "" using 5 title columnheader(5) lc rgb "#7f7f7f", \\
     "" using 6 title columnheader(6) lc rgb "#d62728", \\
     "" using 7 title columnheader(7) lc rgb "#f29b9b", \\
     1 notitle dt 2 lc rgb "black"
unset key
set ylabel "nbdsnap / QEMU cbw (same round), log scale"
set logscale y
set yrange [0.1:*]
set xtics rotate by -30 left
set rmargin 24
set style fill solid 0.85 border -1
set boxwidth 0.6
plot "{dat2}" using 0:2:xtic(1) with boxes lc rgb "#1f77b4", \\
     "" using 0:2:(sprintf("%.2fx", $2)) with labels offset 0,0.7 notitle, \\
     1 notitle dt 2 lw 2 lc rgb "red"
unset multiplot
""")
    os.makedirs(os.path.dirname(os.path.abspath(args.chart)), exist_ok=True)
    r = subprocess.run(["gnuplot", gp], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"gnuplot failed: {r.stderr}", file=sys.stderr)


def cmd_chart(args):
    """Draws the chart again from a run's JSON (bench.py chart --json FILE --chart PNG)."""
    out = json.load(open(args.json))
    args.size, args.rounds = out["parameters"]["size_bytes"], out["parameters"]["rounds"]
    chart(args, out["writes"], out["reads"], out["vs_qemu"], out["snapshots_held"], out)


def run_rounds(d):
    """(case, metric) -> {round: [values]} of a run's JSON: its "rounds", or
    for a run from before the JSON had them, its flat "samples" cut into
    rounds by the harness's layout: every case measured the same number of
    times in each round, in order, except nsnap's counts (1 4 16 1 in odd
    rounds, 16 4 1 16 in even ones; for seq that sequence three times)."""
    if "rounds" in d:
        return {tuple(k.split("/", 1)): {int(r): v for r, v in rr.items()} for k, rr in d["rounds"].items()}
    n = d["parameters"]["rounds"]
    out = {}
    for key, v in d.get("samples", {}).items():
        case, metric = key.split("/", 1)
        if case in ("n1", "n16") and metric in ("rand_iops", "seq_mibs"):
            times = 1 if metric == "rand_iops" else 3
            per = [times * (2 if (r % 2 == 1) == (case == "n1") else 1) for r in range(1, n + 1)]
        elif len(v) % n == 0:
            per = [len(v) // n] * n
        else:
            continue  # measured in some rounds only (RSS, memory)
        if sum(per) != len(v):
            continue
        rounds, i = {}, 0
        for r, k in enumerate(per, 1):
            rounds[r], i = v[i:i + k], i + k
        out[(case, metric)] = rounds
    return out


def repeat_ratios(rounds, case, metric):
    """The same server measured twice in one round (nsnap's count measured
    first and again last): last / first, an A/A ratio 3 runs apart."""
    out = []
    for v in rounds.get((case, metric), {}).values():
        seqs = 1 if metric == "rand_iops" else 3
        if len(v) == 2 * seqs:
            out += [v[2 * k + 1] / v[2 * k] for k in range(seqs)]
    return out


def p_run_misses(pool, n, op, want, rng, trials):
    """Chance that one run of n rounds misses: the median of n per-round
    ratios drawn (with replacement) from the pooled ones."""
    return sum(misses(statistics.median(rng.choices(pool, k=n)), op, want) for _ in range(trials)) / trials


def pooled_ci(pool, rng, trials):
    """95% bootstrap interval of the median of the pooled per-round ratios."""
    meds = sorted(statistics.median(rng.choices(pool, k=len(pool))) for _ in range(trials))
    return meds[int(0.025 * trials)], meds[int(0.975 * trials) - 1]


def cmd_pool(args):
    """The ratio targets over several runs: each run's measured value, the
    per-round ratios of all runs pooled (median, 95% interval), and how often
    a run of as many rounds misses, drawn from that pool; then the same for
    A/A pairs (identical servers, or one server twice in a round), whose true
    ratio is 1: how often noise alone misses a threshold."""
    rng = random.Random(args.seed)
    runs = []
    for path in args.json:
        d = json.load(open(path))
        label = d.get("run") or os.path.splitext(os.path.basename(path))[0].replace("bench-", "")
        runs.append((label, d, run_rounds(d)))
    n = int(statistics.median(d["parameters"]["rounds"] for _, d, _ in runs))
    out = {"runs": [{"run": lab, "git": d["machine"].get("git"), "plugin_sha256_prefix": d["parameters"].get("plugin_sha256_prefix"),
                     "rounds": d["parameters"]["rounds"]} for lab, d, _ in runs], "rounds_per_run": n, "targets": [], "aa": []}
    short = all(len(lab) <= 5 for lab, _, _ in runs)
    cols = [lab if short else str(i + 1) for i, (lab, _, _) in enumerate(runs)]
    print(f"{len(runs)} runs: " + ", ".join(
        f"{lab} (git {d['machine'].get('git')}, plugin {d['parameters'].get('plugin_sha256_prefix', '?')[:8]})"
        if short else f"{i + 1}={lab}" for i, (lab, d, _) in enumerate(runs)))
    print(f"pooled: the per-round ratios of all runs; P(miss): chance that one run of {n} rounds misses "
          f"(its median drawn from the pool, {args.trials} draws)")
    print()
    hdr = (f"{'target':<46} {'want':>7} " + " ".join(f"{c:>5}" for c in cols)
           + f" {'pooled':>7} {'95% interval':>13} {'P(miss)':>7} {'missed':>7}")
    print(hdr)
    bad_rounds = []  # the rounds do not give what the run reported: wrong layout
    for name, case, base, metric, op, want in RATIO_TARGETS:
        cells, pool, missed, counted = [], [], 0, 0
        for lab, d, rounds in runs:
            t = next((t for t in d.get("targets", []) if t["target"] == name), None)
            rr = ratios_of(rounds, case, base, metric)
            if t and t.get("measured") is not None and rr and abs(statistics.median(rr) - t["measured"]) > 1e-9:
                bad_rounds.append(f"{lab}: {name}: the rounds give {statistics.median(rr):.6f}, "
                                  f"the run measured {t['measured']:.6f}")
            elif t and t.get("measured") is not None and not rr:
                bad_rounds.append(f"{lab}: {name}: no per-round figures (samples not in the harness's layout)")
            v = t["measured"] if t and t.get("measured") is not None else (statistics.median(rr) if rr else None)
            if v is None:
                cells.append(f"{'-':>5}")
                continue
            bad = misses(v, op, want)
            missed += bad
            counted += 1
            pool += rr
            cells.append(f"{v:4.2f}{'!' if bad else ' '}")
        if not pool:
            continue
        lo, hi = pooled_ci(pool, rng, args.trials)
        pm = p_run_misses(pool, n, op, want, rng, args.trials)
        med = statistics.median(pool)
        print(f"{name:<46} {op + f'{want:.2f}':>7} " + " ".join(cells)
              + f" {med:6.3f}x {lo:5.3f}-{hi:5.3f}x {pm:7.3f} {missed:>3}/{counted:<3}")
        out["targets"].append({"target": name, "op": op, "threshold": want, "measured": [c.strip() for c in cells],
                               "pooled_rounds": len(pool), "pooled_median": med, "pooled_ci95": [lo, hi],
                               "p_run_misses": pm, "runs_missed": missed, "runs": counted})
    print("(! = that run missed)")
    # The rows as if independent: how often a run misses at least one.
    p_all = 1.0
    for t in out["targets"]:
        p_all *= 1 - t["p_run_misses"]
    runs_missing = sum(any(misses(t["measured"], t["op"], t["threshold"]) for t in d.get("targets", [])
                           if t.get("unit") == "x" and t.get("measured") is not None
                           and any(t["target"] == r[0] for r in RATIO_TARGETS)) for _, d, _ in runs)
    print(f"a run of {n} rounds misses at least one ratio target: {1 - p_all:.2f} from the pool (rows taken as "
          f"independent); {runs_missing} of {len(runs)} runs did")
    out["p_run_misses_any"] = 1 - p_all
    out["runs_missing_any"] = runs_missing
    print()
    print(f"A/A: pairs whose true ratio is 1; P(<x): chance that the median of {n} such ratios is below x")
    print(f"  {'pair':<53} {'ratios':>6} {'median':>7} {'p10-p90':>11} {'P(<0.95)':>8} {'P(<0.90)':>8}")
    pairs = [(f"nbdkit file a2) / a), {label}", metric, "aa") for label, metric in
             (("4k randwrite", "rand_iops"), ("1M seqwrite", "seq_mibs"), ("4k randread", "rread_iops"),
              ("nbdcopy read, 1 conn", "read_mibs"), ("nbdcopy read, 4 conn", "read4_mibs"))]
    pairs += [(f"plugin, {c[1:]} snapshot{'s' if c != 'n1' else ''}, twice in a round, {label}", metric, c)
              for label, metric in (("4k randwrite", "rand_iops"), ("1M seqwrite", "seq_mibs")) for c in ("n1", "n16")]
    for label, metric, src in pairs:
        pool, per_run = [], 0
        for lab, d, rounds in runs:
            if src == "aa":
                a2, a = ("base2_read", "base_read") if metric.startswith("read") else ("base2", "base")
                rr = ratios_of(rounds, a2, a, metric)
            else:
                rr = repeat_ratios(rounds, src, metric)
            per_run += bool(rr)
            pool += rr
        if not pool:
            continue
        q = sorted(pool)
        p95 = p_run_misses(pool, n, ">=", 0.95, rng, args.trials)
        p90 = p_run_misses(pool, n, ">=", 0.90, rng, args.trials)
        print(f"  {label:<53} {len(pool):>6} {statistics.median(pool):6.3f}x "
              f"{q[len(q) // 10]:4.2f}-{q[(9 * len(q)) // 10]:4.2f} {p95:8.3f} {p90:8.3f}   ({per_run} runs)")
        out["aa"].append({"pair": label, "ratios": len(pool), "runs": per_run, "median": statistics.median(pool),
                          "p10": q[len(q) // 10], "p90": q[(9 * len(q)) // 10],
                          "p_median_below_095": p95, "p_median_below_090": p90})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    if bad_rounds:
        print("bench.py pool: these runs' rounds do not give the ratios they reported "
              "(their samples are not in the layout run_rounds expects):\n  " + "\n  ".join(bad_rounds), file=sys.stderr)
        return 1
    return 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("fio")
    a.add_argument("file")
    a.add_argument("--read", action="store_true")
    a.set_defaults(fn=cmd_fio)
    a = sub.add_parser("chart")
    a.add_argument("--json", required=True)
    a.add_argument("--chart", required=True)
    a.set_defaults(fn=cmd_chart)
    a = sub.add_parser("linkinfo")
    a.add_argument("socket")
    a.add_argument("id")
    a.set_defaults(fn=cmd_linkinfo)
    a = sub.add_parser("takepause")
    for k in ("uri", "socket", "volume", "dir"):
        a.add_argument("--" + k, required=True)
    a.add_argument("--size", type=int, required=True)
    a.add_argument("--takes", type=int, default=40)
    a.add_argument("--writers", type=int, default=4)
    a.add_argument("--spacing", type=float, default=0.15)
    a.set_defaults(fn=cmd_takepause)
    a = sub.add_parser("cbt")
    for k in ("api", "uri", "volume"):
        a.add_argument("--" + k, required=True)
    a.add_argument("--percent", type=int, default=1)
    a.add_argument("--repeat", type=int, default=10)
    a.set_defaults(fn=cmd_cbt)
    a = sub.add_parser("report")
    for k in ("results", "commands", "json", "workdir", "fstype", "build", "plugin-sha256", "loadavg"):
        a.add_argument("--" + k, required=True)
    for k in ("takepause", "cbt", "chart"):
        a.add_argument("--" + k)
    a.add_argument("--verbose", action="store_true", help="print every command")
    for k in ("size", "chunk", "rounds", "runtime", "quick", "seconds", "waited"):
        a.add_argument("--" + k, type=int, required=True)
    a.set_defaults(fn=cmd_report)
    a = sub.add_parser("pool", help="the ratio targets over several runs (JSON files of run.sh)")
    a.add_argument("json", nargs="+", help="JSON files of run.sh runs (BUILD/bench/bench-*.json, docs/bench/runs/*.json)")
    a.add_argument("--out", help="also write the result as JSON")
    a.add_argument("--trials", type=int, default=10000, help="bootstrap draws (default 10000)")
    a.add_argument("--seed", type=int, default=1, help="seed of the draws (default 1: the same output for the same runs)")
    a.set_defaults(fn=cmd_pool)
    args = ap.parse_args()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
