"""What the benchmark scripts share: processes that never outlive the benchmark, their CPU and
memory from /proc, a minimal QMP client, running a tool, and images of real data.

Imported by bench/nbd-bench.py, bench/fleece-bench.py and bench/job-bench.py (their directory is on sys.path when
they run)."""
import argparse
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent():
    """preexec_fn of every server: PR_SET_PDEATHSIG, so none outlives the benchmark."""
    _libc.prctl(1, signal.SIGKILL)


def on_signal(signum, frame):
    raise SystemExit(128 + signum)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def vm_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM")


class Qmp:
    """Blocking QMP over a unix socket; keyword arguments may spell '-' as '_'."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.f = self.sock.makefile("rwb")
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, command, **args):
        msg = {"execute": command}
        if args:
            msg["arguments"] = {k.replace("_", "-"): v for k, v in args.items()}
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"{command}: {reply['error']['desc']}")

    def close(self):
        self.f.close()
        self.sock.close()


def stop_process(proc, timeout=10):
    """Terminate @proc, killing it if it does not exit within @timeout seconds."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Every Daemon started and not yet stopped (stop_all(LIVE, ...) at exit).
LIVE = []

class Daemon:
    """cbtd or qemu-storage-daemon with one QMP monitor; everything else is built over QMP."""

    def __init__(self, kind, tmp, build):
        self.kind, self.tmp = kind, tmp
        self.qmp_path = os.path.join(tmp, "qmp.sock")
        self.sock = os.path.join(tmp, "nbd.sock")
        exe = os.path.join(build, "daemon", "cbtd") if kind == "cbtd" else "qemu-storage-daemon"
        self.argv = [exe, "--chardev", f"socket,id=m,path={self.qmp_path},server=on,wait=off",
                     "--monitor", "chardev=m"]
        self.proc = self.q = None

    def start(self):
        for p in (self.qmp_path, self.sock):
            if os.path.exists(p):
                os.unlink(p)
        self.log = open(os.path.join(self.tmp, f"{self.kind}.log"), "ab")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        LIVE.append(self)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.q = Qmp(self.qmp_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.kind} did not start: {' '.join(self.argv)}")
                time.sleep(0.02)
        self.q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": self.sock}})
        return self

    def uri(self, export):
        return f"nbd+unix:///{export}?socket={self.sock}"

    def cpu(self):
        return cpu_seconds(self.proc.pid)

    def del_export(self, eid):
        self.q.cmd("block-export-del", id=eid)
        deadline = time.monotonic() + 10
        while any(e.get("id") == eid for e in self.q.cmd("query-block-exports")):
            if time.monotonic() > deadline:
                raise RuntimeError(f"export {eid} did not go away")
            time.sleep(0.005)

    def stop(self):
        if self.q:
            self.q.close()
            self.q = None
        stop_process(self.proc)
        if self in LIVE:
            LIVE.remove(self)
        self.log.close()


def stop_all(live, prog):
    """stop() every server in @live, whatever the others do."""
    for s in list(live):
        try:
            s.stop()
        except Exception as e:  # keep stopping the others
            print(f"{prog}: stopping {s.kind}: {e}", file=sys.stderr)


def bench_args(smoke, quick, full, only=None):
    """The command line every side-by-side benchmark takes: --build, --quick, --smoke, --reps
    (and --only when @only gives its default); args.size is @smoke, @quick or @full bytes and
    args.reps 1, 2 or 3 unless given."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reps", type=int)
    if only:
        ap.add_argument("--only", default=only)
    args = ap.parse_args()
    args.size = smoke if args.smoke else quick if args.quick else full
    args.reps = args.reps or (1 if args.smoke else 2 if args.quick else 3)
    return args


def run(argv, **kw):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r.stdout


def kv(line):
    """The key=value words of a tool's output line, as numbers."""
    return {k: float(v) for k, v in (w.split("=") for w in line.split() if "=" in w)}


def log(msg):
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fill_image(path, size):
    """A fully written (not sparse), page-cached image of non-zero data."""
    block = bytes(range(256)) * 4096  # 1 MiB
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
