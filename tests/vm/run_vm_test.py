#!/usr/bin/python3
"""vm-kernel-nbd: the Linux kernel's NBD client against nbdsnapd, in a VM.

Starts nbdsnapd (NBDSNAPD, with NBDSNAP_PLUGIN) on a 64 MiB volume vol0 whose
bytes the test chose, takes snapshot snap1 with the nbdsnap CLI
(NBDSNAP_CLI), then boots a Debian kernel under QEMU TCG with an initramfs
built here: busybox, nbd-client and its libraries, the nbd and virtio
modules, vm-relay (NBDSNAP_VM_RELAY) and guest_init.sh as /init. No guest
network: each NBD connection is a virtio-serial port whose host end is a
socket chardev connected to the daemon's NBD socket. In the guest,
nbd-client attaches vol0 as /dev/nbd0 and vol0@snap1 as /dev/nbd1, writes
ranges to nbd0 (buffered, O_DIRECT, across chunk boundaries, unaligned) and
checks by bytes that nbd0 returns the new bytes and nbd1 the old ones, and
that nbd1 refuses writes. The guest prints "NBDSNAP-VM: PASS|FAIL NAME" on
its serial console; this script requires every expected PASS, then checks
the origin file and both exports from the host (nbdcopy).

Assets (see scripts/setup.sh, download_vm_assets): $NBDSNAP_VM_ASSETS, else
$NBDSNAP_VM_ASSETS_DEFAULT (set by meson to BUILD/vm-assets); it holds root/,
the unpacked linux-image and nbd-client (+ libnl) packages.

Exit: 0 pass, 1 fail, 77 skip (no qemu-system-x86_64, or no assets).
NBDSNAP_VM_KEEP=1 keeps the temporary directory.
"""

import glob
import json
import os
import random
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time

TOTAL_BUDGET = 120.0      # seconds for the whole test
VOLUME_SIZE = 64 << 20
MARK = re.compile(r"NBDSNAP-VM: (PASS|FAIL) ([A-Za-z0-9_.-]+)(?::\s*(.*))?$")
START = time.monotonic()
HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(f"[{time.monotonic() - START:6.1f}s] {msg}", flush=True)


def skip(why):
    print(f"SKIP: {why}", flush=True)
    sys.exit(77)


class Failure(Exception):
    pass


def remaining():
    return TOTAL_BUDGET - (time.monotonic() - START)


# ---------------------------------------------------------------- assets

def find_assets():
    qemu = os.environ.get("QEMU") or shutil.which("qemu-system-x86_64")
    if not qemu:
        skip("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    assets = os.environ.get("NBDSNAP_VM_ASSETS") or os.environ.get("NBDSNAP_VM_ASSETS_DEFAULT")
    if not assets:
        skip("neither NBDSNAP_VM_ASSETS nor NBDSNAP_VM_ASSETS_DEFAULT is set")
    root = os.path.join(assets, "root")
    hint = "(scripts/setup.sh downloads them; or set NBDSNAP_VM_ASSETS)"
    kernels = sorted(glob.glob(os.path.join(root, "boot", "vmlinuz-*")))
    if not kernels:
        skip(f"no kernel in {root}/boot: VM assets not downloaded {hint}")
    kernel = kernels[-1]
    version = os.path.basename(kernel)[len("vmlinuz-"):]
    moddir = os.path.join(root, "lib", "modules", version)
    if not os.path.isdir(moddir):
        skip(f"no {moddir}: VM assets incomplete {hint}")
    nbd_client = None
    for p in ("sbin/nbd-client", "usr/sbin/nbd-client"):
        if os.path.exists(os.path.join(root, p)):
            nbd_client = os.path.join(root, p)
    if not nbd_client:
        skip(f"no nbd-client in {root}: VM assets not downloaded {hint}")
    return qemu, root, kernel, moddir, nbd_client


def need_env(name):
    v = os.environ.get(name)
    if not v or not os.path.exists(v):
        raise Failure(f"{name} is not set or does not exist ({v!r}); run the test with meson test")
    return v


# ---------------------------------------------------------------- ELF bits

def elf_sections(path):
    """{name: bytes} of an ELF64 little-endian file's sections."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise Failure(f"{path}: not an ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    heads = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = heads[shstrndx]
    names = data[strtab[4]:strtab[4] + strtab[5]]
    out = {}
    for h in heads:
        name = names[h[0]:names.index(b"\0", h[0])].decode()
        out[name] = data[h[4]:h[4] + h[5]]
    return out


def elf_interp(path):
    """The PT_INTERP of an ELF64 file, or None if it is static."""
    with open(path, "rb") as f:
        data = f.read(65536)
    if data[:4] != b"\x7fELF":
        raise Failure(f"{path}: not an ELF file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            with open(path, "rb") as f:
                f.seek(p_offset)
                return f.read(p_filesz).rstrip(b"\0").decode()
    return None


def module_order(moddir, wanted):
    """insmod order for the wanted modules and their dependencies (from each
    module's .modinfo depends=, as the package has no modules.dep)."""
    paths = {}
    for dirpath, _, files in os.walk(os.path.join(moddir, "kernel")):
        for fn in files:
            if fn.endswith(".ko"):
                paths[fn[:-3].replace("-", "_")] = os.path.join(dirpath, fn)
            elif fn.endswith((".ko.xz", ".ko.zst", ".ko.gz")):
                raise Failure(f"{fn}: compressed modules are not supported by this test")
    order, seen = [], set()

    def visit(name, chain):
        if name in seen:
            return
        if name not in paths:
            raise Failure(f"kernel module {name} not found under {moddir} (needed by {chain})")
        info = elf_sections(paths[name]).get(".modinfo", b"")
        deps = []
        for entry in info.split(b"\0"):
            if entry.startswith(b"depends="):
                deps = [d for d in entry[8:].decode().split(",") if d]
        for d in deps:
            visit(d, chain + [name])
        seen.add(name)
        order.append(name)

    for w in wanted:
        visit(w, [])
    return [(n, paths[n]) for n in order]


def builtin(root, kernel, option):
    cfg = os.path.join(root, "boot", "config-" + os.path.basename(kernel)[len("vmlinuz-"):])
    try:
        with open(cfg) as f:
            return f"{option}=y\n" in f.read()
    except OSError:
        return False


def shared_libs(binary, libdirs):
    """Resolved shared libraries (soname, path) of binary, the packages'
    directories first, then the host's (ldd)."""
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(libdirs))
    r = subprocess.run(["ldd", binary], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise Failure(f"ldd {binary}: {r.stderr.strip() or r.stdout.strip()}")
    libs = []
    for line in r.stdout.splitlines():
        line = line.strip()
        if "not found" in line:
            raise Failure(f"{os.path.basename(binary)} needs a library that is missing: {line}")
        m = re.match(r"(\S+) => (\S+) \(", line)
        if m:
            libs.append((m.group(1), m.group(2)))
    return libs


# ---------------------------------------------------------------- initramfs

class Cpio:
    """A "newc" cpio archive (the initramfs format), built in memory."""

    def __init__(self):
        self.parts, self.ino = [], 1

    def _entry(self, name, mode, data=b""):
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0))
        self.ino += 1
        rec = hdr.encode() + name_b
        rec += b"\0" * (-len(rec) % 4)
        rec += data + b"\0" * (-len(data) % 4)
        self.parts.append(rec)

    def dir(self, name):
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name, data, mode=0o644):
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name, target):
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def bytes(self):
        self._entry("TRAILER!!!", 0)
        out = b"".join(self.parts)
        return out + b"\0" * (-len(out) % 512)


def build_initramfs(path, busybox, relay, nbd_client, libs, interp, modules, plan, data_files):
    a = Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "lib", "lib/x86_64-linux-gnu",
              "lib/modules", "lib64", "data", "dev", "proc", "sys", "tmp", "run"):
        a.dir(d)
    read = lambda p: open(p, "rb").read()
    a.file("init", read(os.path.join(HERE, "guest_init.sh")), 0o755)
    a.file("bin/busybox", read(busybox), 0o755)
    a.file("bin/vm-relay", read(relay), 0o755)
    a.file("sbin/nbd-client", read(nbd_client), 0o755)
    for soname, p in libs:
        a.file("lib/x86_64-linux-gnu/" + soname, read(p), 0o755)
    a.file(interp.lstrip("/"), read(interp), 0o755)
    for name, p in modules:
        a.file(f"lib/modules/{name}.ko", read(p))
    a.file("plan.sh", plan.encode())
    for name, data in data_files.items():
        a.file("data/" + name, data)
    blob = a.bytes()
    with open(path, "wb") as f:
        f.write(blob)
    return len(blob)


# ---------------------------------------------------------------- host side

def run(cmd, timeout=30, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode != 0:
        raise Failure(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def plan_ranges(chunk, size):
    """(name, mode, offset, length): O_DIRECT ranges are 4 KiB-aligned."""
    ranges = [
        ("buffered", "buffered", 64 << 10, 8 << 10),
        ("direct", "direct", chunk + (16 << 10), 64 << 10),
        ("cross-buffered", "buffered", 3 * chunk - (8 << 10), 16 << 10),
        ("cross-direct", "direct", 5 * chunk - (64 << 10), 128 << 10),
        ("cross-unaligned", "buffered", 7 * chunk - 1000, 3000),
        ("last-block", "direct", size - 4096, 4096),
    ]
    for name, _, off, length in ranges:
        if off < 0 or off + length > size:
            raise Failure(f"range {name} {off}+{length} outside the volume (chunk size {chunk})")
    return ranges


def main():
    qemu, root, kernel, moddir, nbd_client = find_assets()
    nbdsnapd = need_env("NBDSNAPD")
    cli = need_env("NBDSNAP_CLI")
    plugin = need_env("NBDSNAP_PLUGIN")
    relay = need_env("NBDSNAP_VM_RELAY")
    busybox = os.environ.get("BUSYBOX") or "/bin/busybox"
    if not os.path.exists(busybox):
        raise Failure(f"{busybox} not found: apt-get install busybox-static")
    if elf_interp(busybox):
        raise Failure(f"{busybox} is dynamically linked: apt-get install busybox-static")
    if elf_interp(relay):
        raise Failure(f"{relay} is not static")
    nbdcopy = shutil.which("nbdcopy")
    if not nbdcopy:
        raise Failure("nbdcopy not found (apt-get install libnbd-bin)")

    keep = os.environ.get("NBDSNAP_VM_KEEP") == "1"
    tmp = tempfile.mkdtemp(prefix="nbdsnap-vm-")
    nbd_sock = os.path.join(tmp, "nbd.sock")
    api_sock = os.path.join(tmp, "api.sock")
    if len(nbd_sock) > 100:
        raise Failure(f"temporary directory {tmp} is too long for a Unix socket path (set TMPDIR)")
    daemon = qemu_proc = None
    ok = False
    try:
        # -- the volume: random old bytes, known to this script
        rng = random.Random(20241124)
        old_image = bytearray(rng.randbytes(VOLUME_SIZE))
        vol = os.path.join(tmp, "vol0.img")
        with open(vol, "wb") as f:
            f.write(old_image)

        # -- the daemon
        daemon_log = open(os.path.join(tmp, "nbdsnapd.log"), "w+")
        daemon = subprocess.Popen(
            [nbdsnapd, "--foreground", "--state-dir", os.path.join(tmp, "state"),
             "--api-socket", api_sock, "--nbd-socket", nbd_sock,
             "--plugin", plugin, "--volume", "vol0=" + vol],
            stdout=daemon_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        api = [cli, "--api", api_sock]
        deadline = time.monotonic() + 30
        while True:
            if daemon.poll() is not None:
                raise Failure(f"nbdsnapd exited {daemon.returncode} at start")
            if os.path.exists(api_sock) and subprocess.run(
                    api + ["version"], capture_output=True).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise Failure("nbdsnapd not ready within 30 s")
            time.sleep(0.1)
        log(f"nbdsnapd ready (NBD socket {nbd_sock})")

        volumes = json.loads(run(api + ["--json", "volume", "list"]))["volumes"]
        v = next(v for v in volumes if v["name"] == "vol0")
        if int(v["size"]) != VOLUME_SIZE:
            raise Failure(f"vol0 has size {v['size']}, expected {VOLUME_SIZE}")
        chunk = int(v["chunk_size"])
        ranges = plan_ranges(chunk, VOLUME_SIZE)
        log(f"vol0: {VOLUME_SIZE} bytes, chunk size {chunk}")

        # -- the snapshot, BEFORE the guest writes
        run(api + ["snapshot", "create", "vol0", "--name", "snap1"])
        run(api + ["snapshot", "take", "snap1"])
        info = json.loads(run(api + ["--json", "snapshot", "info", "snap1"]))
        if info.get("state") != "taken" or "vol0@snap1" not in info.get("exports", []):
            raise Failure(f"snapshot snap1 not taken as expected: {info}")
        log("snapshot snap1 taken: export vol0@snap1")

        # -- what the guest writes, and what everything should hold afterwards
        new_image = bytearray(old_image)
        data_files = {}
        for name, mode, off, length in ranges:
            new = rng.randbytes(length)
            data_files[name + ".old"] = bytes(old_image[off:off + length])
            data_files[name + ".new"] = new
            new_image[off:off + length] = new

        # -- the initramfs
        wanted = [m for m, cfg in (("virtio_pci", "CONFIG_VIRTIO_PCI"),
                                   ("virtio_console", "CONFIG_VIRTIO_CONSOLE"),
                                   ("nbd", "CONFIG_BLK_DEV_NBD"))
                  if not builtin(root, kernel, cfg)]
        modules = module_order(moddir, wanted)
        libdirs = [os.path.join(root, d) for d in
                   ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")]
        libs = shared_libs(nbd_client, libdirs)
        interp = elf_interp(nbd_client)
        plan = "".join([
            "VOL_EXPORT=vol0\n",
            "SNAP_EXPORT='vol0@snap1'\n",
            f"SIZE={VOLUME_SIZE}\n",
            f"MODULES='{' '.join(n for n, _ in modules)}'\n",
            "RANGES='" + " ".join(f"{n}:{m}:{o}:{l}" for n, m, o, l in ranges) + "'\n",
        ])
        initrd = os.path.join(tmp, "initramfs.cpio")
        n = build_initramfs(initrd, busybox, relay, nbd_client, libs, interp, modules,
                            plan, data_files)
        log(f"initramfs: {n >> 10} KiB, modules {' '.join(m for m, _ in modules)}, "
            f"kernel {os.path.basename(kernel)}")

        expected = ["modules", "ports", "attach-volume", "attach-snapshot"]
        for name, *_ in ranges:
            expected += [f"before-volume-{name}", f"before-snapshot-{name}"]
        expected += [f"write-{name}" for name, *_ in ranges]
        for name, *_ in ranges:
            expected += [f"volume-{name}", f"snapshot-{name}"]
        expected += ["buffered-read-volume", "buffered-read-snapshot", "snapshot-device-ro",
                     "snapshot-write-refused", "snapshot-unchanged-after-write", "detach"]

        # -- the VM: no network; one virtio-serial port per NBD connection
        cmd = [qemu, "-accel", "tcg", "-nodefaults", "-nic", "none", "-no-reboot",
               "-machine", "pc", "-m", "256", "-smp", "1", "-display", "none",
               "-kernel", kernel, "-initrd", initrd,
               "-append", "console=ttyS0 quiet panic=-1 rdinit=/init",
               "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
               "-device", "virtio-serial-pci,id=vser0"]
        for i in range(2):
            cmd += ["-chardev", f"socket,id=c{i},path={nbd_sock}",
                    "-device", f"virtserialport,bus=vser0.0,chardev=c{i},name=nbd{i}"]
        vm_budget = min(90.0, remaining() - 15)
        log(f"starting the VM (TCG, {vm_budget:.0f} s at most)")
        vm_start = time.monotonic()
        qemu_proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        results, lines, done = {}, [], threading.Event()

        def reader():
            for raw in qemu_proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                lines.append(line)
                print("guest| " + line, flush=True)
                m = MARK.search(line)
                if m:
                    results.setdefault(m.group(2), (m.group(1), m.group(3) or ""))
                if "NBDSNAP-VM: DONE" in line:
                    done.set()
            done.set()

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        timed_out = False
        try:
            qemu_proc.wait(timeout=vm_budget)
        except subprocess.TimeoutExpired:
            timed_out = True
            qemu_proc.kill()
            qemu_proc.wait()
        t.join(5)
        log(f"VM ended after {time.monotonic() - vm_start:.1f} s, "
            f"qemu exit {qemu_proc.returncode}")

        # -- the verdict from the guest
        problems = []
        if timed_out:
            problems.append(f"timeout: the VM did not finish within {vm_budget:.0f} s")
        if not any("NBDSNAP-VM: DONE" in l for l in lines):
            problems.append("the guest never printed NBDSNAP-VM: DONE")
        for name, (verdict, why) in results.items():
            if verdict == "FAIL":
                problems.append(f"guest FAIL {name}: {why}")
        missing = [n for n in expected if n not in results]
        if missing:
            problems.append(f"guest never reported: {', '.join(missing)}")
        unexpected = [n for n in results if n not in expected]
        if unexpected:
            problems.append(f"guest reported unknown tests: {', '.join(unexpected)}")
        passed = sum(1 for n in expected if results.get(n, ("",))[0] == "PASS")
        log(f"guest: {passed}/{len(expected)} PASS")
        if problems:
            raise Failure("in the VM:\n  " + "\n  ".join(problems))

        # -- the host's view: origin file and both exports, by bytes
        def compare(what, got, want):
            if got == want:
                log(f"host: {what}: all {len(want)} bytes as expected")
                return
            first = next(i for i in range(min(len(got), len(want))) if got[i] != want[i]) \
                if len(got) == len(want) else min(len(got), len(want))
            raise Failure(f"host: {what} differs from the expected bytes "
                          f"(first difference at offset {first}, sizes {len(got)}/{len(want)})")

        with open(vol, "rb") as f:
            compare("origin file vol0.img", f.read(), bytes(new_image))
        # Copy-before-write preserved exactly the chunks the guest wrote.
        touched = {c for _, _, off, length in ranges
                   for c in range(off // chunk, (off + length - 1) // chunk + 1)}
        info = json.loads(run(api + ["--json", "snapshot", "info", "snap1"]))
        if info.get("state") != "taken" or int(info.get("chunks_copied", -1)) != len(touched):
            raise Failure(f"host: snapshot snap1 after the VM: state {info.get('state')}, "
                          f"chunks_copied {info.get('chunks_copied')}, expected {len(touched)} "
                          f"(the chunks the guest wrote)")
        log(f"host: snap1 still taken, {len(touched)} chunks copied before write")
        for export, want in (("vol0", new_image), ("vol0@snap1", old_image)):
            out = os.path.join(tmp, "copy.img")
            run([nbdcopy, f"nbd+unix:///{export}?socket={nbd_sock}", out], timeout=60)
            with open(out, "rb") as f:
                compare(f"export {export} (nbdcopy)", f.read(), bytes(want))
            os.unlink(out)
        ok = True
    finally:
        if qemu_proc and qemu_proc.poll() is None:
            qemu_proc.kill()
            qemu_proc.wait()
        if daemon:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
            if not ok or daemon.returncode != 0:
                daemon_log.seek(0)
                tail = daemon_log.read().splitlines()[-30:]
                print("---- nbdsnapd log (last 30 lines) ----\n" + "\n".join(tail), flush=True)
            if ok and daemon.returncode != 0:
                ok = False
                print(f"FAIL: nbdsnapd exited {daemon.returncode} on SIGTERM", flush=True)
        if keep:
            print(f"kept {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if not ok:
        sys.exit(1)
    log("PASS: kernel NBD client in a VM: volume read-write, snapshot read-only with the old bytes")


def interrupted(signum, _frame):
    # meson test's timeout sends SIGTERM: clean up (the finally blocks) and fail.
    raise Failure(f"interrupted by signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    try:
        main()
    except Failure as e:
        print(f"FAIL: {e}", flush=True)
        sys.exit(1)
    except subprocess.TimeoutExpired as e:
        print(f"FAIL: timeout: {e}", flush=True)
        sys.exit(1)
