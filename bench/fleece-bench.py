#!/usr/bin/python3
"""The fleecing benchmark: a point-in-time view's cost, cbtd beside qemu-storage-daemon 7.2.

Usage: fleece-bench.py --build BUILD_DIR [--quick | --smoke] [--reps N] [--only qsd,cbtd-qemu,cbtd-snap]

Three configurations, each on the same page-cached, fully written raw image:
  qsd        QEMU 7.2's fleecing choreography (tests/blockdev/test_fleecing.py): a scratch file
             and raw node, copy-before-write over the source's file node (target = scratch),
             snapshot-access over the filter, a writable NBD export of the filter (the writes)
             and a read-only NBD export of the snapshot-access node (the backup);
  cbtd-qemu  the same QMP calls on cbtd;
  cbtd-snap  cbtd's one call: block-export-add with `snapshot: true` on a raw node over the file
             node (scratch in the temp dir); the writes go on through the raw node's export.
For each: (a) random 4 KiB writes, 32 in flight, before any snapshot; the freeze; (b) the same
load during the view, every write the first one to its 64 KiB cluster (a copy-before-write of
the old data into the scratch); (c) the same offsets written again (no copy); then the backup:
nbdcopy of the snapshot export to null:; then, untimed, sampled blocks of (b) are checked on
the snapshot (the frozen data) and on the disk (the new data). The writes are `nbd-loadgen --spread=CLUSTERS
--count=N`: N requests in N distinct clusters of the image (half of them), the same offsets in
(b) and (c); (a) writes another block of the same clusters. Each daemon is started fresh for each repetition; the configurations take
turns, the order rotating by one each repetition, so a neighbour's load on the shared cores
spreads over all of them. Every point is the median of the repetitions with [min-max]; the
ratios are cbtd's over qsd's. Everything lives in one temp dir, removed at exit; every daemon
is stopped at exit, on a signal, and (PR_SET_PDEATHSIG) if this script itself is killed.
"""
import argparse
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (LIVE, Daemon, fill_image, kv, log, on_signal, run,  # noqa: E402
                      stop_all)

import nbd

MiB = 1 << 20
GiB = 1 << 30
CLUSTER = 64 * 1024
CONFIGS = ("qsd", "cbtd-qemu", "cbtd-snap")
SEED_A, SEED_B = 2, 3  # (a) writes other blocks of the same clusters than (b) and (c)
BS = 4096
CHECKED = 64           # clusters of (b) whose snapshot and live blocks are checked
MASK = (1 << 64) - 1


class Cfg:
    reps = 3             # each configuration once in each position of the rotation (~3 min)
    size = 2 * GiB       # the image; half of its 32,768 clusters are written in each phase


def quick(cfg):
    cfg.reps, cfg.size = 2, 512 * MiB


def smoke(cfg):
    cfg.reps, cfg.size = 1, 64 * MiB


def make_image(path, size):
    """A fully written (not sparse), page-cached image of non-zero data: every copy has real
    data to copy. Written back before any load (see sync_file)."""
    fill_image(path, size)
    sync_file(path)


def sync_file(path):
    """Without it the kernel writes the image's dirty pages back 30 s after they were dirtied
    (vm.dirty_expire_centisecs), in the middle of whichever configuration runs then."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_scratch(path, size):
    if os.path.exists(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.truncate(size)


# ---- what the view must hold (bench/nbd-loadgen.c's offsets and data, as in
# tests/bench/test_loadgen.py) ----

def mix(x):
    x = (x + 0x9e3779b97f4a7c15) & MASK
    x = ((x ^ (x >> 30)) * 0xbf58476d1ce4e5b9) & MASK
    x = ((x ^ (x >> 27)) * 0x94d049bb133111eb) & MASK
    return x ^ (x >> 31)


def spread_offsets(size, n, count, seed):
    stride = size // n
    stride -= stride % (CLUSTER if stride >= CLUSTER else BS)
    step = max(2654435761 % n, 1)
    while math.gcd(step, n) != 1:
        step += 1
    return [(k * step % n) * stride + mix((k * step % n) ^ seed) % (stride // BS) * BS
            for k in range(count)]


def pattern(offset, seed):
    return b"".join(mix((offset + i + seed * 0x100000001b3) & MASK).to_bytes(8, "little")
                    for i in range(0, BS, 8))


ORIGINAL = bytes(range(256)) * (BS // 256)  # any 4 KiB-aligned block of make_image's data


# ---- the configurations -------------------------------------------------------------------

class Config:
    """How one configuration exports the disk, freezes it and exports the view."""

    def __init__(self, name, bench):
        self.name, self.b = name, bench
        self.kind = "qsd" if name == "qsd" else "cbtd"

    def setup(self, d):
        q = d.q
        q.cmd("blockdev-add", driver="file", node_name="src", filename=self.b.image)
        if self.name == "cbtd-snap":
            q.cmd("blockdev-add", driver="raw", node_name="disk", file="src")
            q.cmd("block-export-add", type="nbd", id="live", node_name="disk", name="live",
                  writable=True)
            return "live"
        # Before the view: the source's file node exported directly (the filter, once added,
        # takes over as the only writer).
        q.cmd("block-export-add", type="nbd", id="live0", node_name="src", name="live0",
              writable=True)
        return "live0"

    def freeze(self, d):
        """Take the point-in-time view; returns the writable export to use during it."""
        q = d.q
        if self.name == "cbtd-snap":
            q.cmd("block-export-add", type="nbd", id="snap", node_name="disk", name="snap",
                  snapshot=True, scratch_dir=self.b.tmp)
            return "live"
        # tests/blockdev/test_fleecing.py's choreography, identical on both daemons.
        d.del_export("live0")
        q.cmd("blockdev-add", driver="file", node_name="scrf", filename=self.b.scratch)
        q.cmd("blockdev-add", driver="raw", node_name="scr", file="scrf")
        q.cmd("blockdev-add", driver="copy-before-write", node_name="cbw", file="src",
              target="scr")
        q.cmd("blockdev-add", driver="snapshot-access", node_name="snap", file="cbw")
        q.cmd("block-export-add", type="nbd", id="live", node_name="cbw", name="live",
              writable=True)
        q.cmd("block-export-add", type="nbd", id="snap", node_name="snap", name="snap")
        return "live"


class Bench:
    def __init__(self, args, cfg, tmp):
        self.args, self.cfg, self.tmp = args, cfg, tmp
        self.image = os.path.join(tmp, "image.raw")
        self.scratch = os.path.join(tmp, "scratch.raw")
        self.loadgen_exe = os.path.join(args.build, "bench", "nbd-loadgen")
        self.points = {}  # (row, config) -> [values]
        self.clusters = cfg.size // CLUSTER
        self.writes = self.clusters // 2
        self.argv = {}
        self.only = args.only.split(",")

    def add(self, row, config, value):
        self.points.setdefault((row, config), []).append(value)

    def writes_phase(self, d, export, row, conf):
        c0 = d.cpu()
        seed = SEED_A if row == "a" else SEED_B
        out = run([self.loadgen_exe, d.uri(export), "--op=write", "--depth=32",
                   f"--spread={self.clusters}", f"--count={self.writes}", f"--seed={seed}"])
        cpu = d.cpu() - c0
        r = kv(out.splitlines()[-1])
        if r["ops"] != self.writes:
            raise RuntimeError(f"{conf}: {r['ops']} writes done, {self.writes} expected")
        self.add(f"{row}-iops", conf, r["iops"])
        self.add(f"{row}-cpu", conf, cpu * 1e6 / r["ops"])

    def one(self, name):
        conf = Config(name, self)
        self.restore_image()
        sync_file(self.image)  # clean pages for this configuration
        make_scratch(self.scratch, self.cfg.size)
        d = Daemon(conf.kind, self.tmp, self.args.build)
        self.argv[conf.kind] = d.argv
        d.start()
        try:
            live = conf.setup(d)
            self.writes_phase(d, live, "a", name)
            t0 = time.monotonic()
            live = conf.freeze(d)
            self.add("freeze", name, (time.monotonic() - t0) * 1e3)
            self.writes_phase(d, live, "b", name)
            self.writes_phase(d, live, "c", name)
            c0, t0 = d.cpu(), time.monotonic()
            run(["nbdcopy", "--connections=1", "--requests=8", "--request-size=1048576",
                 d.uri("snap"), "null:"])
            t = time.monotonic() - t0
            self.add("backup", name, self.cfg.size / MiB / t)
            self.add("backup-cpu", name, (d.cpu() - c0) * 1e3 / (self.cfg.size / GiB))
            self.check(d, live, name)
        finally:
            d.stop()

    def restore_image(self):
        """Undo the previous configuration's writes: every configuration starts on the same
        image (and check() knows what its view must hold)."""
        fd = os.open(self.image, os.O_WRONLY)
        try:
            for seed in (SEED_A, SEED_B):
                for off in spread_offsets(self.cfg.size, self.clusters, self.writes, seed):
                    os.pwrite(fd, ORIGINAL, off)
        finally:
            os.close(fd)

    def check(self, d, live, conf):
        """Untimed: the blocks (b) wrote, in CHECKED of its clusters, hold (b)'s data on the
        live export and the data from before the view (the image, or (a)'s write) in the
        snapshot, so the loads above were fleecing, not plain writes."""
        a = set(spread_offsets(self.cfg.size, self.clusters, self.writes, SEED_A))
        b = spread_offsets(self.cfg.size, self.clusters, self.writes, SEED_B)
        hs = {}
        try:
            for export in ("snap", live):
                hs[export] = nbd.NBD()
                hs[export].connect_uri(d.uri(export))
            for off in b[::max(len(b) // CHECKED, 1)]:
                frozen = pattern(off, SEED_A) if off in a else ORIGINAL
                if hs["snap"].pread(BS, off) != frozen:
                    raise RuntimeError(f"{conf}: the snapshot at {off} is not the frozen data")
                if hs[live].pread(BS, off) != pattern(off, SEED_B):
                    raise RuntimeError(f"{conf}: the disk at {off} lacks the write of (b)")
        finally:
            for h in hs.values():
                h.shutdown()

    def run(self):
        for rep in range(self.cfg.reps):
            order = [c for c in CONFIGS[rep % 3:] + CONFIGS[:rep % 3] if c in self.only]
            for name in order:
                self.one(name)
            log(f"repetition {rep + 1}/{self.cfg.reps} done ({', '.join(order)})")

    # ---- the table ----

    def get(self, row, conf):
        v = self.points.get((row, conf))
        return statistics.median(v) if v else None

    def cell(self, row, conf, fmt):
        v = self.points.get((row, conf))
        if not v:
            return "-"
        med = fmt.format(statistics.median(v))
        return med if len(v) == 1 else f"{med} [{fmt.format(min(v))}-{fmt.format(max(v))}]"

    def table(self):
        rows = [
            ("(a) rand write 4K x32, no snapshot", "IOPS", "{:.0f}", "a-iops"),
            ("(b) same, first write per cluster", "IOPS", "{:.0f}", "b-iops"),
            ("(c) same offsets again, no copy", "IOPS", "{:.0f}", "c-iops"),
            ("  server CPU/write (a)", "us", "{:.1f}", "a-cpu"),
            ("  server CPU/write (b)", "us", "{:.1f}", "b-cpu"),
            ("  server CPU/write (c)", "us", "{:.1f}", "c-cpu"),
            ("backup: nbdcopy snapshot -> null:", "MiB/s", "{:.0f}", "backup"),
            ("  server CPU per GiB read", "ms", "{:.0f}", "backup-cpu"),
            ("freeze (QMP calls, wall)", "ms", "{:.1f}", "freeze"),
        ]
        w = 23
        head = f"{'load':36} {'unit':5}" + "".join(f" {c:>{w}}" for c in CONFIGS) \
            + f" {'cbtd-qemu/qsd':>13} {'cbtd-snap/qsd':>13}"
        lines = [head, "-" * len(head)]
        for label, unit, fmt, key in rows:
            cells = "".join(f" {self.cell(key, c, fmt):>{w}}" for c in CONFIGS)
            ref = self.get(key, "qsd")
            rat = []
            for c in ("cbtd-qemu", "cbtd-snap"):
                v = self.get(key, c)
                rat.append(f"{v / ref:.3f}" if v is not None and ref else "-")
            lines.append(f"{label:36} {unit:5}{cells} {rat[0]:>13} {rat[1]:>13}")
        lines.append("")
        lines.append("during the view over before it, per configuration (b/a, c/a):")
        for c in CONFIGS:
            a, b, cc = (self.get(f"{p}-iops", c) for p in "abc")
            if a:
                lines.append(f"  {c:10} b/a {b / a if b else 0:.3f}   c/a {cc / a if cc else 0:.3f}")
        return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", required=True)
    ap.add_argument("--quick", action="store_true", help="2 repetitions, 512 MiB (~20 s)")
    ap.add_argument("--smoke", action="store_true", help="1 repetition, 64 MiB (a few s)")
    ap.add_argument("--reps", type=int, help="repetitions (default 3)")
    ap.add_argument("--only", default=",".join(CONFIGS), help="configurations to run")
    args = ap.parse_args()
    cfg = Cfg()
    if args.smoke:
        smoke(cfg)
    elif args.quick or os.environ.get("BENCH_QUICK"):
        quick(cfg)
    if args.reps:
        cfg.reps = args.reps
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    tmp = tempfile.mkdtemp(prefix="cbt-fleece-")
    try:
        b = Bench(args, cfg, tmp)
        print(f"reps={cfg.reps} (median [min-max]); image {cfg.size // MiB} MiB "
              f"({b.clusters} clusters of 64 KiB), {b.writes} writes per phase, one per cluster; "
              f"configurations interleaved, rotating", flush=True)
        t0 = time.monotonic()
        make_image(b.image, cfg.size)
        log("image written")
        try:
            b.run()
        finally:
            print(b.table())  # what was measured, even when a later load failed
        print(f"(total {time.monotonic() - t0:.0f} s)")
        if os.environ.get("BENCH_CMDLINES"):
            for kind, argv in b.argv.items():
                print(f"{kind}: {' '.join(argv)}")
    finally:
        stop_all(LIVE, "fleece-bench")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
