#!/usr/bin/env python3
"""The data-path benchmark: cbtd side by side with qemu-storage-daemon, qemu-nbd and nbdkit.

Usage: nbd-bench.py --build BUILD_DIR [--quick] [--only cbtd,qsd,...] [--phases main,tls,sparse]

Every server runs on the same image behind a unix socket and is driven by the same clients
(nbdcopy, nbdinfo, bench/nbd-loadgen, bench/qmp-ping); the `tls` phase runs cbtd, qsd and
nbdkit again with the same x509 credentials (made with certtool at run time, in the temp dir),
over a unix socket and over TCP on 127.0.0.1. Each point is the median of REPS runs
with [min-max]; the table ends with the ratio cbtd / reference and PASS/MISS against the
targets of docs/performance.md. Everything lives in one temp dir, removed at exit; every server
is stopped at exit, on a signal, and (PR_SET_PDEATHSIG) if this script itself is killed.
"""
import argparse
import os
import signal
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (Qmp, cpu_seconds, die_with_parent, fill_image, kv, log, on_signal,  # noqa: E402
                      run, stop_all, stop_process, vm_hwm_kib)

GiB = 1 << 30
NULL_SIZE = 4 * GiB  # the null-co node of the bitmap rows
TiB = 1 << 40
SERVERS = ("cbtd", "qsd", "qemu-nbd", "nbdkit")
ANCHORS = ("qsd", "qemu-nbd", "nbdkit")
TLS_SERVERS = ("cbtd", "qsd", "nbdkit")  # qemu-nbd's TLS is qsd's code: one QEMU is enough
TLS_ANCHORS = ("qsd", "nbdkit")
MiB = 1 << 20


class Cfg:
    reps = 3            # repetitions per point
    seq_reps = 2        # the QEMU servers need ~20 s per 4 GiB pass: 2 keep make bench < 10 min
    rand_secs = 1.0     # fixed duration of each random-I/O point
    seq_size = 4 * GiB  # the page-cached image
    cycles = 1000       # connect/GO/disconnect cycles per point
    qmp_rts = 10000     # QMP round trips per point
    dirty = 100000      # scattered dirty chunks / data extents in the 1 TiB device
    bitmaps = (0, 1, 8)
    dmap_batch = 30     # dirty-bitmap maps per point (time and CPU are per map)
    tls_size = 1 * GiB  # the TLS phase's image: 4 GiB through gnutls is ~5 s a pass per server


def quick(cfg):
    cfg.reps, cfg.seq_reps, cfg.rand_secs, cfg.seq_size = 1, 1, 0.5, 1 * GiB
    cfg.cycles, cfg.qmp_rts, cfg.dirty, cfg.dmap_batch = 200, 1000, 10000, 2
    cfg.tls_size = 256 << 20


# ---- processes ----------------------------------------------------------------------------

_live = []


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process on one image; `argv` documents the exact command line. With `tls`
    (an x509 dir: ca-cert.pem, server-cert.pem, server-key.pem) it requires TLS; with `port`
    it listens on 127.0.0.1:port instead of its unix socket."""

    def __init__(self, kind, tmp, image, build, read_only=False, tls=None, port=None):
        self.kind, self.tmp, self.image = kind, tmp, image
        self.tls, self.port = tls, port
        self.sock = os.path.join(tmp, f"{kind}.nbd")
        self.qmp_path = os.path.join(tmp, f"{kind}.qmp")
        self.argv = self.command(build, read_only)
        self.proc = None
        self.qmp = None

    def command(self, build, ro):
        img, sock = self.image, self.sock
        if self.kind in ("cbtd", "qsd"):
            exe = os.path.join(build, "daemon", "cbtd") if self.kind == "cbtd" \
                else "qemu-storage-daemon"
            addr = f"addr.type=inet,addr.host=127.0.0.1,addr.port={self.port}" if self.port \
                else f"addr.type=unix,addr.path={sock}"
            tls = []
            if self.tls:
                # Server authentication only (verify-peer=off), as nbdkit without
                # --tls-verify-peer: the client sends no certificate to any of them.
                tls = ["--object", f"tls-creds-x509,id=tls0,dir={self.tls},endpoint=server,"
                       "verify-peer=off"]
                addr += ",tls-creds=tls0"
            # Identical options: cbtd takes qemu-storage-daemon's command line.
            return [exe] + tls + [
                    "--chardev", f"socket,id=m,path={self.qmp_path},server=on,wait=off",
                    "--monitor", "chardev=m",
                    # A QEMU chardev serves one client at a time: qmp-ping gets its own.
                    "--chardev", f"socket,id=m2,path={self.qmp_path}2,server=on,wait=off",
                    "--monitor", "chardev=m2",
                    "--blockdev", f"driver=file,node-name=disk,filename={img}",
                    "--nbd-server", addr,
                    "--export", "type=nbd,id=e,node-name=disk,name=e,"
                    + ("writable=off" if ro else "writable=on"),
                    # qsd 7.2 advertises multi-conn only on read-only exports.
                    "--export", "type=nbd,id=ro,node-name=disk,name=ro,writable=off",
                    # The bitmap rows: a device whose writes cost nothing but the server's
                    # own path, so what tracking adds is not lost in page-cache noise.
                    "--blockdev", f"driver=null-co,node-name=nul,size={NULL_SIZE}",
                    "--export", "type=nbd,id=n,node-name=nul,name=n,writable=on"]
        if self.kind == "qemu-nbd":
            if self.tls or self.port:
                raise ValueError("qemu-nbd runs on a plain unix socket only")
            return ["qemu-nbd", "-f", "raw", "-t", "--cache=writeback", "--aio=threads",
                    "-e", "8", "-x", "e", "-k", sock] + (["-r"] if ro else []) + [img]
        listen = ["-i", "127.0.0.1", "-p", str(self.port)] if self.port else ["-U", sock]
        tls = ["--tls=require", f"--tls-certificates={self.tls}"] if self.tls else []
        return ["nbdkit", "-f"] + listen + tls + (["-r"] if ro else []) + ["file", img]

    def uri(self, export="e"):
        if self.kind in ("qemu-nbd", "nbdkit"):
            export = "e"  # one export; nbdkit's file plugin ignores the name
        scheme = "nbds" if self.tls else "nbd"
        if self.port:
            uri = f"{scheme}://127.0.0.1:{self.port}/{export}"
        else:
            uri = f"{scheme}+unix:///{export}?socket={self.sock}"
        if self.tls:
            # libnbd reads ca-cert.pem there (and would send client-cert.pem if it were);
            # it checks the server's name (127.0.0.1, in the certificate) over TCP only.
            uri += ("&" if "?" in uri else "?") + f"tls-certificates={self.tls}"
        return uri

    def start(self):
        for path in (self.sock, self.qmp_path, self.qmp_path + "2"):
            if os.path.exists(path):  # left by the previous instance of this server
                os.unlink(path)
        self.log = open(os.path.join(self.tmp, f"{self.kind}.log"), "wb")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        _live.append(self)
        wait_for = [("127.0.0.1", self.port) if self.port else self.sock] \
            + ([self.qmp_path] if self.kind in ("cbtd", "qsd") else [])
        deadline = time.monotonic() + 20
        while not all(self._accepts(p) for p in wait_for):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} did not start: {' '.join(self.argv)}\n"
                                   + self.tail())
            time.sleep(0.02)
        if self.kind in ("cbtd", "qsd"):
            self.qmp = Qmp(self.qmp_path)
        return self

    @staticmethod
    def _accepts(path):
        """A unix socket path or a (host, port): a bare connect, closed before any TLS, which
        every server drops as a client that went away."""
        family = socket.AF_INET if isinstance(path, tuple) else socket.AF_UNIX
        if family == socket.AF_UNIX and not os.path.exists(path):
            return False
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.connect(path)
                return True
            except OSError:
                return False

    def tail(self):
        with open(os.path.join(self.tmp, f"{self.kind}.log"), "rb") as f:
            return f.read()[-2000:].decode(errors="replace")

    def cpu(self):
        return cpu_seconds(self.proc.pid)

    def hwm_mib(self):
        return vm_hwm_kib(self.proc.pid) / 1024

    def stop(self):
        if self.qmp:
            self.qmp.close()
            self.qmp = None
        stop_process(self.proc)
        if self in _live:
            _live.remove(self)
        self.log.close()


def timed(argv, server=None):
    """Wall time of argv, and the server's CPU seconds over it."""
    c0 = server.cpu() if server else 0
    t0 = time.monotonic()
    out = run(argv)
    t = time.monotonic() - t0
    return t, (server.cpu() - c0 if server else 0), out


# ---- results ------------------------------------------------------------------------------

class Results:
    def __init__(self):
        self.points = {}  # (row, server) -> [values]

    def add(self, row, server, value):
        self.points.setdefault((row, server), []).append(value)

    def get(self, row, server):
        v = self.points.get((row, server))
        return statistics.median(v) if v else None

    def cell(self, row, server, fmt):
        v = self.points.get((row, server))
        if not v:
            return "-"
        med = fmt.format(statistics.median(v))
        return med if len(v) == 1 else f"{med} [{fmt.format(min(v))}-{fmt.format(max(v))}]"


# ---- loads --------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, cfg, tmp):
        self.args, self.cfg, self.tmp = args, cfg, tmp
        self.build = args.build
        self.res = Results()
        self.tool = lambda name: os.path.join(self.build, "bench", name)
        self.cmdlines = {}

    def loadgen(self, uri, *opts):
        return kv(run([self.tool("nbd-loadgen"), uri] + list(opts)).splitlines()[-1])

    def ceiling(self):
        for _ in range(self.cfg.reps):
            out = kv(run([self.tool("sock-ceiling"), str(self.cfg.seq_size // GiB)]))
            self.res.add("ceiling", "-", out["gibps"])

    def seq_read(self, srv):
        for conns in (1, 4):
            uri = srv.uri("ro" if conns > 1 else "e")
            t, _, _ = timed(["nbdcopy", "--requests=8", "--request-size=1048576",
                             f"--connections={conns}", uri, "null:"])
            self.res.add(f"seq{conns}", srv.kind, self.cfg.seq_size / t / GiB)

    def random_io(self, srv):
        for op in ("read", "write"):
            for depth in (1, 32):
                r = self.loadgen(srv.uri(), f"--op={op}", f"--depth={depth}",
                                 f"--seconds={self.cfg.rand_secs}", "--seed=7")
                self.res.add(f"rand-{op}{depth}", srv.kind, r["iops"])

    def connects(self, srv):
        r = self.loadgen(srv.uri(), f"--connect-cycles={self.cfg.cycles}")
        self.res.add("connect", srv.kind, r["per_cycle_us"])

    def qmp_rtt(self, srv):
        out = kv(run([self.tool("qmp-ping"), srv.qmp_path + "2", str(self.cfg.qmp_rts)]))
        self.res.add("qmp", srv.kind, out["per_rt_us"])

    def bitmap_writes(self, srv, have, rep):
        """Random 4 KiB writes, 32 in flight, with n recording bitmaps; `have` tracks them.
        They go to a null-co node of the image's size (export `n`): on the file the cost of a
        buffered write drifts with the page cache's state (which folios are dirty, how large
        they are) by +-15 % between neighbouring seconds, far more than 8 marks cost, while on
        null-co the server's own path is all there is, so tracking weighs the most there. Each
        point is four slices of rand_secs in mirrored order (0,1,8,8,1,0,0,1,8,8,1,0: a
        linear drift cancels), and each repetition starts the rotation one place further."""
        order = list(self.cfg.bitmaps)
        k = rep % len(order)
        order = order[k:] + order[:k]
        ops, cpu, secs = {}, {}, {}
        for n in (order + order[::-1]) * 2:
            while len(have) < n:
                name = f"b{len(have)}"
                srv.qmp.cmd("block-dirty-bitmap-add", node="nul", name=name,
                            granularity=65536)
                have.append(name)
            while len(have) > n:
                srv.qmp.cmd("block-dirty-bitmap-remove", node="nul", name=have.pop())
            c0 = srv.cpu()
            r = self.loadgen(srv.uri("n"), "--op=write", "--depth=32",
                             f"--seconds={self.cfg.rand_secs}", "--seed=11")
            cpu[n] = cpu.get(n, 0) + srv.cpu() - c0
            ops[n] = ops.get(n, 0) + r["ops"]
            secs[n] = secs.get(n, 0) + r["seconds"]
        for n in order:
            self.res.add(f"bm{n}-iops", srv.kind, ops[n] / secs[n])
            self.res.add(f"bm{n}-cpu", srv.kind, cpu[n] * 1e6 / ops[n])

    def main_image(self, image):
        """Every load on the 4 GiB page-cached image, one server at a time."""
        for kind in self.kinds:
            srv = Server(kind, self.tmp, image, self.build)
            self.cmdlines[f"{kind} (4 GiB image)"] = srv.argv
            srv.start()
            try:
                have = []
                for rep in range(self.cfg.reps):
                    if rep < self.cfg.seq_reps:
                        self.seq_read(srv)
                    self.random_io(srv)
                    self.connects(srv)
                    if kind in ("cbtd", "qsd"):
                        self.qmp_rtt(srv)
                        self.bitmap_writes(srv, have, rep)
                self.res.add("rss", kind, srv.hwm_mib())
            finally:
                srv.stop()
            log(f"{kind}: 4 GiB image loads done")

    def persistence(self, image):
        """cbtd alone: random 4 KiB writes x32 on the file with one persistent bitmap beside
        the same with one in-memory bitmap (both 64 KiB; only one records at a time), in steady
        state: each is warmed with the same offsets first. Slices in mirrored order, as the
        null-co rows, each after a short unmeasured warm-up. Then the widening that recovery
        reports after kill -9 under that load."""
        cfg = self.cfg
        srv = Server("cbtd", self.tmp, image, self.build).start()
        q = srv.qmp
        try:
            q.cmd("block-dirty-bitmap-add", node="disk", name="mem", granularity=65536,
                  disabled=True)
            q.cmd("block-dirty-bitmap-add", node="disk", name="pers", granularity=65536,
                  persistent=True, disabled=True)
            on = {"mem": False, "pers": False}

            def use(which):
                for name in on:
                    if on[name] != (name == which):
                        verb = "enable" if name == which else "disable"
                        q.cmd(f"block-dirty-bitmap-{verb}", node="disk", name=name)
                        on[name] = name == which

            def slice_(secs):
                c0 = srv.cpu()
                r = self.loadgen(srv.uri(), "--op=write", "--depth=32", f"--seconds={secs}",
                                 "--seed=11")
                return r, srv.cpu() - c0

            for which in on:
                use(which)
                slice_(2 * cfg.rand_secs)
            for rep in range(cfg.reps):
                order = ["mem", "pers"] if rep % 2 == 0 else ["pers", "mem"]
                ops, cpu, secs = {}, {}, {}
                for which in (order + order[::-1]) * 2:
                    use(which)
                    # Unmeasured: an enable starts with the intent regions the syncer retired
                    # while the bitmap was off (the first-write cost, store-bench's row).
                    slice_(max(cfg.rand_secs / 2, 0.3))
                    r, c = slice_(cfg.rand_secs)
                    ops[which] = ops.get(which, 0) + r["ops"]
                    secs[which] = secs.get(which, 0) + r["seconds"]
                    cpu[which] = cpu.get(which, 0) + c
                for which in on:
                    self.res.add(f"{which}-iops", "cbtd", ops[which] / secs[which])
                    self.res.add(f"{which}-cpu", "cbtd", cpu[which] * 1e6 / ops[which])
            use("pers")
            for _ in range(cfg.reps):
                # kill -9 in the middle of a write load; the restart reports the widening.
                load = subprocess.Popen([self.tool("nbd-loadgen"), srv.uri(), "--op=write",
                                         "--depth=32", "--seconds=3", "--seed=13"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)
                srv.proc.kill()
                srv.proc.wait()
                load.wait()
                srv.stop()
                srv = Server("cbtd", self.tmp, image, self.build).start()
                q = srv.qmp
                nodes = q.cmd("query-named-block-nodes")
                info = [b for n in nodes if n["node-name"] == "disk"
                        for b in n.get("dirty-bitmaps", []) if b.get("name") == "pers"]
                if not info or "recovered-widening" not in info[0]:
                    raise RuntimeError(f"no recovery report after kill -9: {nodes}")
                self.res.add("kill-widen", "cbtd", info[0]["recovered-widening"] / 1024)
                self.res.add("kill-count", "cbtd", info[0]["count"] / (1 << 20))
                on = {"mem": False, "pers": True}
                if not any(b.get("name") == "mem" for b in info):
                    on.pop("mem")  # in-memory: gone with the process
        finally:
            srv.stop()
        log("cbtd: persistent bitmap loads done")

    def sparse_device(self, image):
        """1 TiB: dirty 100,000 scattered chunks through NBD, then map bitmap and allocation."""
        cfg = self.cfg
        for kind in self.kinds:
            ro = kind in ("qemu-nbd", "nbdkit")
            srv = Server(kind, self.tmp, image, self.build, read_only=ro)
            self.cmdlines[f"{kind} (1 TiB sparse)"] = srv.argv
            srv.start()
            try:
                if not ro:
                    self.dirty(srv)
                for _ in range(cfg.reps):
                    if not ro:
                        # Several maps per point: the kernel counts CPU in 10 ms ticks.
                        c0, t = srv.cpu(), 0
                        for _ in range(cfg.dmap_batch):
                            dt, _, out = timed(["nbdinfo", "--map=qemu:dirty-bitmap:d",
                                                srv.uri("ro")])
                            self.check_map(out, "dirty", kind)
                            t += dt
                        self.res.add("dmap-time", kind, t / cfg.dmap_batch)
                        self.res.add("dmap-cpu", kind, (srv.cpu() - c0) * 1e3 / cfg.dmap_batch)
                    t, cpu, out = timed(["nbdinfo", "--map", srv.uri("ro")], srv)
                    self.check_map(out, "data", kind)
                    self.res.add("amap-time", kind, t)
                    self.res.add("amap-cpu", kind, cpu * 1e3)
                if not ro:
                    self.res.add("rss-tib", kind, srv.hwm_mib())
            finally:
                srv.stop()
            log(f"{kind}: 1 TiB maps done")

    def tls_image(self, image):
        """cbtd, qsd and nbdkit requiring TLS with the same x509 credentials, over a unix
        socket and then over TCP on 127.0.0.1: sequential read (MiB/s) and random 4 KiB reads
        at depth 1 and 32, and the depth-1 latency. Depth 1 over TCP is where a Nagle /
        delayed-ACK stall shows, one request at a time (qsd 7.2: ~44 ms a request)."""
        cfg = self.cfg
        # The test suite's certificates (tests/lib/tlscerts.py): a CA, and a server dir with
        # ca-cert.pem, server-cert.pem (localhost, 127.0.0.1), server-key.pem. The servers
        # read that dir; so does libnbd, which takes ca-cert.pem from it.
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                        "tests", "lib"))
        import tlscerts
        certs = tlscerts.make_x509(os.path.join(self.tmp, "tls"))["server"]
        for transport in ("unix", "tcp"):
            for kind in (k for k in self.kinds if k in TLS_SERVERS):
                srv = Server(kind, self.tmp, image, self.build, tls=certs,
                             port=free_port() if transport == "tcp" else None)
                self.cmdlines[f"{kind} (TLS, {transport})"] = srv.argv
                srv.start()
                try:
                    for rep in range(cfg.reps):
                        if rep < cfg.seq_reps:
                            t, _, _ = timed(["nbdcopy", "--requests=8", "--request-size=1048576",
                                             "--connections=1", srv.uri(), "null:"])
                            self.res.add(f"tls-{transport}-seq", kind, cfg.tls_size / t / MiB)
                        for depth in (1, 32):
                            r = self.loadgen(srv.uri(), "--op=read", f"--depth={depth}",
                                             f"--seconds={cfg.rand_secs}", "--seed=7")
                            self.res.add(f"tls-{transport}-rand{depth}", kind, r["iops"])
                            if depth == 1:
                                self.res.add(f"tls-{transport}-lat1", kind,
                                             r["seconds"] * 1e6 / max(r["ops"], 1))
                finally:
                    srv.stop()
            log(f"TLS over {transport}: loads done")

    def dirty(self, srv):
        q = srv.qmp
        q.cmd("block-dirty-bitmap-add", node="disk", name="d", granularity=65536)
        self.loadgen(srv.uri(), "--op=write", "--depth=32", f"--spread={self.cfg.dirty}",
                     f"--count={self.cfg.dirty}", "--seed=5")
        q.cmd("block-dirty-bitmap-disable", node="disk", name="d")
        # A backup's point-in-time view: a read-only export publishing the frozen bitmap.
        q.cmd("block-export-del", id="ro")
        deadline = time.monotonic() + 10
        while any(e.get("id") == "ro" for e in q.cmd("query-block-exports")):
            if time.monotonic() > deadline:
                raise RuntimeError("export ro did not go away")
            time.sleep(0.01)
        q.cmd("block-export-add", type="nbd", id="ro", **{"node-name": "disk"}, name="ro",
              writable=False, bitmaps=["d"])

    def check_map(self, out, what, kind):
        """The map must cover exactly the chunks/extents written, or the timing means nothing.
        (Two dirty chunks in neighbouring stripes may merge into one run: count bytes.)"""
        want_type, unit = ("1", 65536) if what == "dirty" else ("0", 4096)
        got = sum(int(f[1]) for f in (line.split() for line in out.splitlines())
                  if len(f) >= 3 and f[2] == want_type)
        if got != self.cfg.dirty * unit:
            raise RuntimeError(f"{kind}: {what} map covers {got} bytes, "
                               f"expected {self.cfg.dirty} x {unit}")



# ---- the table ----------------------------------------------------------------------------

def ref_best(res, row, anchors, higher):
    vals = [(res.get(row, a), a) for a in anchors if res.get(row, a) is not None]
    if not vals:
        return None, None
    return (max if higher else min)(vals)


def table(res, cfg):
    rows = []  # (label, unit, fmt, row key, servers, ratio, ref name, target text, ok)

    def vs_anchor(label, unit, fmt, key, higher, target, anchors=ANCHORS, servers=SERVERS):
        ref, name = ref_best(res, key, anchors, higher)
        mine = res.get(key, "cbtd")
        ratio = mine / ref if mine is not None and ref else None
        ok = None
        if ratio is not None and target is not None:
            ok = ratio >= target if target > 0 else ratio <= -target
        rows.append((label, unit, fmt, key, servers, ratio, name, target, ok))

    def vs_own(label, unit, fmt, key, base_key, target, higher):
        mine, base = res.get(key, "cbtd"), res.get(base_key, "cbtd")
        ratio = mine / base if mine is not None and base else None
        ok = None
        if ratio is not None and target is not None:
            ok = ratio >= target if higher else ratio <= target
        if target is not None and not higher:
            target = -target
        rows.append((label, unit, fmt, key, ("cbtd", "qsd"), ratio, "cbtd 0 bm", target, ok))

    vs_anchor("seq read 1M x8, 1 conn", "GiB/s", "{:.2f}", "seq1", True, 1.2)
    vs_anchor("seq read 1M x8, 4 conns", "GiB/s", "{:.2f}", "seq4", True, 1.2)
    ceiling = res.get("ceiling", "-")
    for conns in (1, 4):
        mine = res.get(f"seq{conns}", "cbtd")
        ratio = mine / ceiling if mine and ceiling else None
        rows.append((f"  {conns} conn(s) / socket ceiling", "", "", None, (), ratio, "ceiling",
                     0.7, None if ratio is None else ratio >= 0.7))
    for op in ("read", "write"):
        for depth in (1, 32):
            vs_anchor(f"rand {op} 4K, {depth} in flight", "IOPS", "{:.0f}", f"rand-{op}{depth}",
                      True, 1.2)
    for n in cfg.bitmaps:
        if n == 0:
            vs_anchor("null-co write 4K x32, 0 bitmaps", "IOPS", "{:.0f}", "bm0-iops", True, None,
                      ("qsd",), ("cbtd", "qsd"))
        else:
            vs_own(f"null-co write 4K x32, {n} bitmap(s)", "IOPS", "{:.0f}", f"bm{n}-iops",
                   "bm0-iops", 0.98 if n == 8 else None, True)
    for n in cfg.bitmaps:
        if n == 0:
            vs_anchor("  server CPU/write, 0 bitmaps", "us", "{:.2f}", "bm0-cpu", False, None,
                      ("qsd",), ("cbtd", "qsd"))
        else:
            vs_own(f"  server CPU/write, {n} bitmap(s)", "us", "{:.2f}", f"bm{n}-cpu", "bm0-cpu",
                   1.03 if n == 8 else None, False)
    for key, label, unit, fmt, target, higher in (
            ("pers-iops", "file write 4K x32, persistent bitmap", "IOPS", "{:.0f}", 0.95, True),
            ("pers-cpu", "  server CPU/write", "us", "{:.2f}", 1.05, False)):
        base = key.replace("pers", "mem")
        mine, ref = res.get(key, "cbtd"), res.get(base, "cbtd")
        ratio = mine / ref if mine is not None and ref else None
        ok = None if ratio is None else (ratio >= target if higher else ratio <= target)
        rows.append((label, unit, fmt, key, ("cbtd",), ratio, "in-memory",
                     target if higher else -target, ok))
    rows.append(("  widening after kill -9", "KiB", "{:.0f}", "kill-widen", ("cbtd",), None,
                 None, None, None))
    rows.append(("  dirty at the kill (for scale)", "MiB", "{:.0f}", "kill-count", ("cbtd",),
                 None, None, None, None))
    vs_anchor("map dirty-bitmap 1 TiB, time", "s", "{:.3f}", "dmap-time", False, -1.0,
              ("qsd",), ("cbtd", "qsd"))
    vs_anchor("  server CPU", "ms", "{:.1f}", "dmap-cpu", False, -0.5, ("qsd",), ("cbtd", "qsd"))
    vs_anchor("map base:allocation 1 TiB, time", "s", "{:.3f}", "amap-time", False, -1 / 1.5)
    vs_anchor("  server CPU", "ms", "{:.0f}", "amap-cpu", False, None)
    vs_anchor("connect/GO/disconnect", "us", "{:.0f}", "connect", False, -1.0, ("qsd",))
    vs_anchor("QMP query-version round trip", "us", "{:.1f}", "qmp", False, None, ("qsd",),
              ("cbtd", "qsd"))
    vs_anchor("peak RSS (VmHWM), 4 GiB image", "MiB", "{:.1f}", "rss", False, -1.0, ("qsd",))
    vs_anchor("peak RSS (VmHWM), 1 TiB + bitmap", "MiB", "{:.1f}", "rss-tib", False, -1.0,
              ("qsd",), ("cbtd", "qsd"))
    for transport, name in (("unix", "unix"), ("tcp", "TCP")):
        key = f"tls-{transport}-"
        vs_anchor(f"TLS {name}: seq read 1M x8, 1 conn", "MiB/s", "{:.0f}", key + "seq", True,
                  None, TLS_ANCHORS, TLS_SERVERS)
        for depth in (1, 32):
            vs_anchor(f"  rand read 4K, {depth} in flight", "IOPS", "{:.0f}", key + f"rand{depth}",
                      True, None, TLS_ANCHORS, TLS_SERVERS)
        vs_anchor("  read 4K latency, 1 in flight", "us", "{:.0f}", key + "lat1", False, None,
                  TLS_ANCHORS, TLS_SERVERS)

    head = f"{'load':34} {'unit':5}" + "".join(f" {s:>21}" for s in SERVERS) \
        + f" {'cbtd/ref':>8} {'ref':>9} {'target':>7}"
    lines = [head, "-" * len(head)]
    for label, unit, fmt, key, servers, ratio, ref, target, ok in rows:
        cells = "".join(f" {res.cell(key, s, fmt) if s in servers else '':>21}"
                        for s in SERVERS)
        tgt = "" if target is None else (f">={target:.2f}" if target > 0 else f"<={-target:.2f}")
        verdict = "" if ok is None else ("PASS" if ok else "MISS")
        rat = "-" if ratio is None else f"{ratio:.3f}"
        lines.append(f"{label:34} {unit:5}{cells} {rat:>8} {ref or '':>9} {tgt:>7} {verdict}")
    cell = res.cell("ceiling", "-", "{:.2f}")
    lines.append(f"socket ceiling (2 processes, unix socket, 1 MiB writes): {cell} GiB/s")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(SERVERS), help="servers to run")
    ap.add_argument("--phases", default="main,persist,tls,sparse",
                    help="main (4 GiB image), persist (cbtd's persistent bitmaps), "
                    "tls (cbtd, qsd, nbdkit over TLS), sparse (1 TiB)")
    args = ap.parse_args()
    cfg = Cfg()
    if args.quick or os.environ.get("BENCH_QUICK"):
        quick(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    tmp = tempfile.mkdtemp(prefix="cbt-bench-")
    try:
        b = Bench(args, cfg, tmp)
        b.kinds = [k for k in SERVERS if k in args.only.split(",")]
        print(f"reps={cfg.reps} (median [min-max]; seq read {cfg.seq_reps}); "
              f"random points {cfg.rand_secs} s each; "
              f"seq image {cfg.seq_size // GiB} GiB (TLS {cfg.tls_size // MiB} MiB); "
              f"{cfg.cycles} connects; "
              f"{cfg.qmp_rts} QMP round trips; {cfg.dirty} dirty chunks in 1 TiB", flush=True)
        t0 = time.monotonic()
        b.ceiling()
        image = os.path.join(tmp, "image.raw")
        if "main" in args.phases:
            fill_image(image, cfg.seq_size)
            log("image written")
        try:
            if "main" in args.phases:
                b.main_image(image)
            if "persist" in args.phases and "cbtd" in b.kinds:
                if not os.path.exists(image):
                    fill_image(image, cfg.seq_size)
                b.persistence(image)
            if os.path.exists(image):
                os.unlink(image)
            if "tls" in args.phases:
                tls_image = os.path.join(tmp, "tls.raw")
                fill_image(tls_image, cfg.tls_size)
                b.tls_image(tls_image)
                os.unlink(tls_image)
            sparse = os.path.join(tmp, "sparse.raw")
            with open(sparse, "wb") as f:
                f.truncate(TiB)
            if "sparse" in args.phases:
                b.sparse_device(sparse)
        finally:
            print(table(b.res, cfg))  # what was measured, even when a later load failed
        print(f"(total {time.monotonic() - t0:.0f} s)")
        if os.environ.get("BENCH_CMDLINES"):
            for what, argv in b.cmdlines.items():
                print(f"{what}: {' '.join(argv)}")
    finally:
        stop_all(_live, "nbd-bench")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
