#!/usr/bin/python3
"""The push-mode backup benchmark: blockdev-backup jobs, cbtd beside qemu-storage-daemon 7.2.

Usage: job-bench.py --build BUILD_DIR [--quick | --smoke] [--reps N] [--only qsd,cbtd]

Each daemon, started fresh for each repetition on the same fully written raw image (2 GiB;
512 MiB with --quick, 64 MiB with --smoke): a file node `src`, a raw node `disk` over it, a
writable NBD export `live` of `disk`, and over QMP:
  base         the writer alone: `nbd-loadgen --op=write --depth=32` random 4 KiB writes in
               0.1 s slices (IOPS);
  full         a `transaction` of block-dirty-bitmap-add b0 and blockdev-backup sync=full
               into a sparse raw file node of the same size, untimed (the first copy of a
               run costs either daemon about twice the next ones); then a full, timed from
               the command until query-jobs says concluded (polled every 2 ms; the job's
               total-progress is the bytes); then one more with the writer running slices
               while it runs (every slice that starts inside the job counts);
  incremental  10 % of the image rewritten (256 KiB writes, one in each of as many stripes),
               then blockdev-backup sync=bitmap bitmap=b0 bitmap-mode=never (the copy
               sync=incremental makes, but b0 stays as it was, so it can run twice): timed
               alone, then again under the writer.
The figures are MiB/s of the job (its bytes over its time) and the writer's IOPS during the job
beside its IOPS alone. Each figure is the median over the repetitions [min-max]; the ratios
are cbtd's over qsd's. Untimed check: every job concluded without error and copied what its
sync mode says (the whole image; the rewritten bytes, rounded out to b0's granularity).
Everything lives in one temp dir, removed at exit; every daemon is stopped at exit, on a
signal, and (PR_SET_PDEATHSIG) if this script is killed.
"""
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (LIVE, Daemon, bench_args, fill_image, kv, log, on_signal,  # noqa: E402
                      stop_all)

MiB = 1 << 20
GiB = 1 << 30
REWRITE = 256 * 1024
SLICE = 0.1


class Run:
    def __init__(self, args, tmp):
        self.args, self.tmp = args, tmp
        self.img = os.path.join(tmp, "disk.img")
        self.loadgen = os.path.join(args.build, "bench", "nbd-loadgen")
        self.res = {}

    def note(self, kind, key, value):
        self.res.setdefault((kind, key), []).append(value)

    def slice(self, d, seed):
        out = subprocess.run([self.loadgen, d.uri("live"), "--op=write", "--depth=32",
                              f"--seconds={SLICE}", f"--seed={seed}"], capture_output=True,
                             text=True, check=True).stdout
        return kv(out)["iops"]

    def target(self, d, name):
        path = os.path.join(self.tmp, name + ".img")
        with open(path, "wb") as f:
            f.truncate(self.args.size)
        d.q.cmd("blockdev-add", driver="file", node_name=name, filename=path)
        return name, path

    def drop_target(self, d, name, path):
        d.q.cmd("blockdev-del", node_name=name)
        os.unlink(path)

    def wait_job(self, d, jid, t0, writer_seed=None):
        """Polls the job (started at @t0) until it concludes; with @writer_seed, runs writer
        slices meanwhile and returns the IOPS of those wholly inside the job. Returns
        (seconds, bytes, iops)."""
        iops = []
        while True:
            job = next(j for j in d.q.cmd("query-jobs") if j["id"] == jid)
            if job["status"] == "concluded":
                break
            if writer_seed is not None:
                # Every slice that starts inside the job counts, however long the job makes
                # it wait: a daemon that stalls the writer shows it (at most the last one
                # also runs a little after the job).
                iops.append(self.slice(d, writer_seed + len(iops)))
            else:
                time.sleep(0.002)
        t = time.monotonic() - t0
        if job.get("error"):
            raise RuntimeError(f"{d.kind}: job {jid}: {job['error']}")
        d.q.cmd("job-dismiss", id=jid)
        return t, job["total-progress"], iops

    def backup(self, d, jid, sync, writer_seed=None, first=False):
        name, path = self.target(d, jid)
        args = {"job-id": jid, "device": "disk", "target": name, "sync": sync,
                "auto-dismiss": False}
        if sync == "bitmap":
            args.update(bitmap="b0", **{"bitmap-mode": "never"})
        t0 = time.monotonic()
        if first:
            d.q.cmd("transaction", actions=[
                {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "b0"}},
                {"type": "blockdev-backup", "data": args}])
        else:
            d.q.cmd("blockdev-backup", **args)
        r = self.wait_job(d, jid, t0, writer_seed)
        self.drop_target(d, name, path)
        return r

    def rewrite(self, d):
        n = self.args.size // REWRITE // 10
        subprocess.run([self.loadgen, d.uri("live"), "--op=write", f"--bs={REWRITE}",
                        "--depth=8", f"--spread={n}", f"--count={n}", "--seed=5"],
                       capture_output=True, check=True)
        return n * REWRITE

    def one(self, kind):
        d = Daemon(kind, self.tmp, self.args.build).start()
        try:
            d.q.cmd("blockdev-add", driver="file", node_name="src", filename=self.img)
            d.q.cmd("blockdev-add", driver="raw", node_name="disk", file="src")
            d.q.cmd("block-export-add", type="nbd", id="live", node_name="disk", name="live",
                    writable=True)
            base = [self.slice(d, 100 + i) for i in range(4)]
            self.note(kind, "base iops", statistics.median(base))
            # A first full, untimed: it starts b0, and the first copy of a run costs both
            # daemons about twice what the next ones do (new page-cache memory).
            self.backup(d, "full0", "full", first=True)
            t, n, _ = self.backup(d, "full1", "full")
            if n != self.args.size:
                raise RuntimeError(f"{kind}: the full copied {n} of {self.args.size} bytes")
            self.note(kind, "full MiB/s", n / MiB / t)
            t2, _, iops = self.backup(d, "full2", "full", writer_seed=200)
            log(f"{kind}: full alone {t:.2f} s, under the writer {t2:.2f} s, {len(iops)} slices")
            if iops:
                self.note(kind, "full writer iops", statistics.median(iops))
            # b0 now holds the writer's blocks too; clear it, then rewrite 10 %.
            d.q.cmd("block-dirty-bitmap-clear", node="disk", name="b0")
            want = self.rewrite(d)
            t, n, _ = self.backup(d, "inc1", "bitmap")
            if not want <= n <= want + self.args.size // 16:
                raise RuntimeError(f"{kind}: the incremental copied {n}, {want} were rewritten")
            self.note(kind, "inc MiB/s", n / MiB / t)
            _, _, iops = self.backup(d, "inc2", "bitmap", writer_seed=300)
            if iops:
                self.note(kind, "inc writer iops", statistics.median(iops))
        finally:
            d.stop()


def fmt(xs):
    return f"{statistics.median(xs):10.0f} [{min(xs):.0f}-{max(xs):.0f}]" if xs else "n/a"


def report(r, kinds):
    print(f"push-mode backup: {r.args.size // MiB} MiB image, fully written; incremental: 10 % "
          f"rewritten; {r.args.reps} repetitions, median [min-max]; writer = random 4 KiB "
          f"writes x32 through NBD")
    rows = [("full MiB/s", "full: job throughput (MiB/s)"),
            ("base iops", "writer alone (IOPS)"),
            ("full writer iops", "writer during the full (IOPS)"),
            ("inc MiB/s", "incremental: job throughput (MiB/s)"),
            ("inc writer iops", "writer during the incremental (IOPS)")]
    print(f"{'row':40}" + "".join(f"{k:>28}" for k in kinds) + "   cbtd/qsd")
    for key, label in rows:
        vals = [r.res.get((k, key), []) for k in kinds]
        line = f"{label:40}" + "".join(f"{fmt(v):>28}" for v in vals)
        if len(kinds) == 2 and all(vals):
            line += f"   {statistics.median(vals[1]) / statistics.median(vals[0]):8.2f}"
        print(line)
    for k in kinds:
        base = r.res.get((k, "base iops"))
        for key in ("full writer iops", "inc writer iops"):
            during = r.res.get((k, key))
            if base and during:
                print(f"  {k}: {key} / alone = "
                      f"{statistics.median(during) / statistics.median(base):.2f}")


def main():
    args = bench_args(64 * MiB, 512 * MiB, 2 * GiB, only="qsd,cbtd")
    kinds = [k for k in ("qsd", "cbtd") if k in args.only.split(",")]
    signal.signal(signal.SIGTERM, on_signal)
    tmp = tempfile.mkdtemp(prefix="cbt-job-bench-")
    try:
        log(f"filling a {args.size // MiB} MiB image")
        fill_image(os.path.join(tmp, "disk.img"), args.size)
        # On the medium before any job: otherwise the kernel writes it back during the first.
        fd = os.open(os.path.join(tmp, "disk.img"), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        r = Run(args, tmp)
        for i in range(args.reps):
            order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]
            for k in order:
                log(f"repetition {i + 1} of {args.reps}: {k}")
                r.one(k)
        report(r, kinds)
    finally:
        stop_all(LIVE, "job-bench")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
