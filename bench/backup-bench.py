#!/usr/bin/python3
"""The backup benchmark: cbt-backup beside the same backups done with stock tools.

Usage: backup-bench.py --build BUILD_DIR [--quick | --smoke] [--reps N]

One cbtd serves a fully written raw image (4 GiB; 1 GiB with --quick, 64 MiB with --smoke) as
a raw node over a file node, with a writable export. Each repetition, in a fresh repository:
  full         `cbt-backup full` (freeze, copy into a qcow2 point, commit, release), beside the
               whole frozen view (a `snapshot: true` export, made before the clock starts)
               copied by `nbdcopy` into a raw file and by `qemu-img convert -O qcow2`;
  incremental  after 10 % of the image is rewritten (256 KiB writes at distinct random
               offsets, through the export), `cbt-backup incremental` beside the whole view
               copied again by both tools (what a backup without a bitmap costs), and beside a
               virtnbdbackup-like extent loop: one libnbd connection asks
               `qemu:dirty-bitmap:` of the view for its dirty extents and reads them one by one
               into a sparse file.
Every copy is made durable before its clock stops (cbt-backup fsyncs its point; the stock
tools' output is synced, the extent loop fsyncs). cbt-backup's times include its freeze and
teardown; the stock tools' do not (their view is made before the clock starts). Each figure is the median of the repetitions [min-max]; the ratio is
the tool's time over cbt-backup's (above 1: cbt-backup is faster). Untimed checks: the
incremental copied exactly the rewritten bytes, and (last repetition) the last point restored
with `cbt-backup restore` equals the disk. Everything lives in one temp dir, removed at exit;
the daemon is stopped at exit, on a signal, and (PR_SET_PDEATHSIG) if this script is killed.
"""
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (Qmp, bench_args, die_with_parent, fill_image, log, on_signal,  # noqa: E402
                      run, stop_process)

import nbd

MiB = 1 << 20
GiB = 1 << 30
WRITE = 256 * 1024
PY = "/usr/bin/python3"

# The extent loop, as a backup script without cbt-backup does it (virtnbdbackup's way): one
# connection, dirty extents from block status, each read and written in turn.
EXTENT_LOOP = r"""
import os, sys, nbd
uri, ctx, out, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
h = nbd.NBD()
h.add_meta_context(ctx)
h.connect_uri(uri)
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.ftruncate(fd, size)
runs, pos = [], 0
def got(c, off, ents, err):
    global pos
    if c == ctx:
        for i in range(0, len(ents), 2):
            if ents[i + 1] & 1:
                runs.append((off, ents[i]))
            off += ents[i]
        pos = off
    return 0
while pos < size:
    h.block_status(min(size - pos, 1 << 30), pos, got)
n = 0
for off, length in runs:
    for o in range(off, off + length, 32 << 20):
        k = min(32 << 20, off + length - o)
        os.pwrite(fd, h.pread(k, o), o)
        n += k
os.fsync(fd)
os.close(fd)
print(n)
"""


class Bench:
    def __init__(self, args, tmp):
        self.args, self.tmp = args, tmp
        self.img = os.path.join(tmp, "disk.img")
        self.qmp_path = os.path.join(tmp, "qmp.sock")
        self.nbd_path = os.path.join(tmp, "nbd.sock")
        self.tool = os.path.join(args.build, "tools", "cbt-backup")
        self.proc = None
        self.times = {}

    def uri(self, name):
        return f"nbd+unix:///{name}?socket={self.nbd_path}"

    def start(self):
        cbtd = os.path.join(self.args.build, "daemon", "cbtd")
        self.proc = subprocess.Popen(
            [cbtd, "--qmp", self.qmp_path, "--nbd-server",
             f"addr.type=unix,addr.path={self.nbd_path}",
             "--blockdev", f"driver=file,node-name=disk0,filename={self.img}",
             "--blockdev", "driver=raw,node-name=disk,file=disk0",
             "--export", "type=nbd,id=live,node-name=disk,name=live,writable=on"],
            preexec_fn=die_with_parent, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not (os.path.exists(self.qmp_path) and os.path.exists(self.nbd_path)):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("cbtd did not start")
            time.sleep(0.02)
        self.qmp = Qmp(self.qmp_path)

    def timed(self, key, argv, durable=None):
        """Runs @argv; the time includes an fsync of @durable (a backup must be on the medium
        before it counts: cbt-backup syncs each point)."""
        t0 = time.monotonic()
        out = run(argv)
        if durable:
            run(["sync", durable])
        self.times.setdefault(key, []).append(time.monotonic() - t0)
        return out

    def backup(self, key, kind, repo):
        out = self.timed(key, [self.tool, kind, "--qmp", self.qmp_path, "--nbd",
                               "unix:" + self.nbd_path, "--node", "disk", "--repo", repo,
                               "--scratch-dir", self.tmp, "--progress=json"])
        return json.loads(out.splitlines()[-1])

    def view(self, bitmap=None):
        """A frozen view for the stock tools (no checkpoint of its own)."""
        args = {"type": "nbd", "id": "view", "name": "view", "node-name": "disk",
                "snapshot": True, "scratch-dir": self.tmp}
        if bitmap:
            args["bitmaps"] = [bitmap]
        self.qmp.cmd("block-export-add", **args)

    def drop_view(self):
        self.qmp.cmd("block-export-del", id="view", mode="hard")
        while any(e["id"] == "view" for e in self.qmp.cmd("query-block-exports")):
            time.sleep(0.01)

    def stock_copies(self, phase):
        out = os.path.join(self.tmp, "out.img")
        self.timed(f"{phase} nbdcopy", ["nbdcopy", "--requests=8", self.uri("view"), out], out)
        os.unlink(out)
        self.timed(f"{phase} qemu-img", ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2",
                                         self.uri("view"), out], out)
        os.unlink(out)

    def rewrite(self, rnd):
        """10 % of the image, in 256 KiB writes at distinct offsets; returns the bytes."""
        slots = self.args.size // WRITE
        chosen = rnd.sample(range(slots), slots // 10)
        h = nbd.NBD()
        h.connect_uri(self.uri("live"))
        data = rnd.randbytes(WRITE)
        for s in chosen:
            h.pwrite(data, s * WRITE)
        h.flush()
        h.shutdown()
        return len(chosen) * WRITE

    def rep(self, i, last):
        repo = os.path.join(self.tmp, f"repo{i}")
        self.backup("full cbt-backup", "full", repo)
        self.view()
        self.stock_copies("full")
        self.drop_view()
        dirty = self.rewrite(random.Random(i))
        cp = json.load(open(os.path.join(repo, "0001.json")))["checkpoint"]
        self.view(cp)
        self.stock_copies("incremental")
        out = os.path.join(self.tmp, "out.img")
        n = int(self.timed("incremental extent loop",
                           [PY, "-c", EXTENT_LOOP, self.uri("view"), "qemu:dirty-bitmap:" + cp,
                            out, str(self.args.size)]))
        os.unlink(out)
        self.drop_view()
        res = self.backup("incremental cbt-backup", "incremental", repo)
        if res["bytes-written"] != dirty or n != dirty:
            raise RuntimeError(f"incremental copied {res['bytes-written']} (loop {n}), "
                               f"{dirty} were written")
        if last:
            restored = os.path.join(self.tmp, "restored.img")
            run([self.tool, "restore", "--repo", repo, "--to", restored])
            run(["cmp", restored, self.img])
            os.unlink(restored)
            log("check: the last point restored equals the disk")
        shutil.rmtree(repo)
        self.dirty = dirty


def fmt(xs):
    m = statistics.median(xs)
    return f"{m:7.3f} s [{min(xs):.3f}-{max(xs):.3f}]"


def report(b):
    print(f"backup benchmark: {b.args.size // MiB} MiB image, fully written; incremental: "
          f"{b.dirty // MiB} MiB rewritten (10 %); {b.args.reps} repetitions, median [min-max]")
    for phase, data in (("full", b.args.size), ("incremental", b.dirty)):
        ours = statistics.median(b.times[f"{phase} cbt-backup"])
        print(f"{phase:12} cbt-backup        {fmt(b.times[phase + ' cbt-backup'])}  "
              f"{data / MiB / ours:8.0f} MiB/s of {'data' if phase == 'full' else 'changes'}")
        for tool in ("nbdcopy", "qemu-img", "extent loop"):
            key = f"{phase} {tool}"
            if key not in b.times:
                continue
            t = statistics.median(b.times[key])
            print(f"{'':12} {tool:17} {fmt(b.times[key])}  ratio {t / ours:5.2f}x "
                  f"(tool / cbt-backup)")


def main():
    args = bench_args(64 * MiB, GiB, 4 * GiB)
    signal.signal(signal.SIGTERM, on_signal)
    tmp = tempfile.mkdtemp(prefix="cbt-backup-bench-")
    b = Bench(args, tmp)
    try:
        log(f"filling a {args.size // MiB} MiB image")
        fill_image(b.img, args.size)
        b.start()
        for i in range(args.reps):
            log(f"repetition {i + 1} of {args.reps}")
            b.rep(i, i == args.reps - 1)
        report(b)
    finally:
        stop_process(b.proc)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
