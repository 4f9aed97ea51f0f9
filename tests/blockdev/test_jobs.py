#!/usr/bin/python3
"""Jobs and push-mode backup (blockdev-backup), on cbtd and qemu-storage-daemon 7.2 side by side.

Every scenario runs on both daemons: the replies and error texts of every command, and the
events (JOB_STATUS_CHANGE, BLOCK_JOB_*) in order, are compared after normalisation: progress
numbers (offset, len, current/total-progress) and timestamps are dropped, and qsd's
paused/running pairs that come from its internal drains (every graph change pauses a job for
a moment) are removed, as is cbtd's matching pair of a user pause. What the target holds is
checked on each daemon: a full backup and two incrementals of a raw image taken while writers
overwrite it through an NBD export each equal the source at its job's instant
(tests/lib/seqwriter.py). A target that fails (the daemon runs with RLIMIT_FSIZE, so writes of
the target past the limit fail with EFBIG) and cancellation check the bitmap rules.
"""
import os
import resource
import shutil
import signal
import tempfile
import time
import unittest

import cbttest
import seqwriter
from cbttest import Daemon
from test_blockdev_qmp import connect  # this script's directory is on sys.path

KiB = 1 << 10
MiB = 1 << 20
SIZE = 4 * MiB
PROGRESS = ('offset', 'len', 'current-progress', 'total-progress', 'busy')


def norm(value):
    if isinstance(value, list):
        return [norm(v) for v in value]
    if isinstance(value, dict):
        return {k: norm(v) for k, v in value.items() if k not in PROGRESS and k != 'timestamp'}
    return value


def norm_events(events):
    """The job events, without the pause/resume pairs a drain makes: a job's `paused` whose next
    event of that job is `running`."""
    out = [norm(e) for e in events if e['event'].startswith(('JOB_', 'BLOCK_JOB_'))]

    def job_of(e):
        return e['data'].get('id', e['data'].get('device'))

    def status(e):
        return e['data'].get('status') if e['event'] == 'JOB_STATUS_CHANGE' else None

    i = 0
    while i < len(out):
        if status(out[i]) == 'paused':
            nxt = next((k for k in range(i + 1, len(out)) if job_of(out[k]) == job_of(out[i])),
                       None)
            if nxt is not None and status(out[nxt]) == 'running':
                del out[nxt]
                del out[i]
                continue
        i += 1
    return out


def fill(path, size, seed, dense=False):
    """An image with data in most 64 KiB blocks (@dense: in all), holes in the others."""
    with open(path, 'wb') as f:
        f.truncate(size)
        for off in range(0, size, 64 * KiB):
            if dense or (off // (64 * KiB) + seed) % 5:
                f.seek(off)
                f.write(bytes([(off // (64 * KiB) * 7 + seed) % 251 + 1]) * (64 * KiB))


def read(path):
    with open(path, 'rb') as f:
        return f.read()


class Side:
    """One daemon with a source (raw 'src' over file 'f0') and targets t1..tN (raw over file)."""

    def __init__(self, qsd, targets=1, size=SIZE, preexec=None, seed=3, dense=False):
        self.d = Daemon(qsd=qsd, preexec=preexec)
        self.q = connect(self.d)
        self.size = size
        fill(self.d.path('src.img'), size, seed, dense)
        self.q.execute('blockdev-add', {'driver': 'file', 'node-name': 'f0',
                                        'filename': self.d.path('src.img')})
        self.q.execute('blockdev-add', {'driver': 'raw', 'node-name': 'src', 'file': 'f0'})
        for i in range(1, targets + 1):
            self.add_target('t%d' % i)

    def add_target(self, name, size=None, content=None):
        path = self.d.path(name + '.img')
        if content is not None:
            shutil.copyfile(content, path)
        else:
            cbttest.make_image(path, size or self.size, [(0, b'\xee' * 4096)])
        self.q.execute('blockdev-add', {'driver': 'file', 'node-name': name + 'f',
                                        'filename': path})
        self.q.execute('blockdev-add', {'driver': 'raw', 'node-name': name, 'file': name + 'f'})
        return path

    def reply(self, cmd, args=None):
        return norm(self.q.cmd(cmd, args))

    def wait_gone(self, job, timeout=30):
        deadline = time.monotonic() + timeout
        while any(j['id'] == job for j in self.q.execute('query-jobs')):
            if time.monotonic() > deadline:
                raise TimeoutError('job %s did not end' % job)
            time.sleep(0.02)

    def wait_status(self, job, status, timeout=30):
        cbttest.wait_for(lambda: any(j['id'] == job and j['status'] == status
                                     for j in self.q.execute('query-jobs')),
                         timeout, 'job %s %s' % (job, status))

    def wait_progress(self, job, done, timeout=30):
        cbttest.wait_for(lambda: any(j['id'] == job and j['current-progress'] >= done
                                     for j in self.q.execute('query-jobs')),
                         timeout, 'job %s at %d bytes' % (job, done))

    def events(self):
        # Pick up what is queued without a command of its own.
        self.q.cmd('query-jobs')
        ev, self.q.events = self.q.events, []
        return norm_events(ev)

    def bitmap(self, name, node='src'):
        for n in self.q.execute('query-named-block-nodes'):
            if n['node-name'] == node:
                for b in n.get('dirty-bitmaps', []):
                    if b.get('name') == name:
                        return {k: b[k] for k in ('count', 'busy', 'recording')}
        return None

    def write(self, offset, data):
        """A write through the daemon (an NBD export), so bitmaps see it."""
        import nbd
        if not getattr(self, 'nbd_up', False):
            self.sock = self.d.path('nbd.sock')
            self.q.execute('nbd-server-start', addr={'type': 'unix',
                                                     'data': {'path': self.sock}})
            self.q.execute('block-export-add', {'type': 'nbd', 'id': 'live', 'node-name': 'src',
                                                'writable': True})
            self.nbd_up = True
        h = nbd.NBD()
        h.connect_uri('nbd+unix:///src?socket=' + self.sock)
        h.pwrite(data, offset)
        h.shutdown()

    def stop(self):
        self.d.stop()


class Both(unittest.TestCase):
    def sides(self, **kw):
        sides = [Side(False, **kw), Side(True, **kw)]
        for s in sides:
            self.addCleanup(s.stop)
        return sides

    def same(self, sides, fn):
        """Run @fn on each side; its results must be equal."""
        results = [fn(s) for s in sides]
        self.maxDiff = None
        self.assertEqual(results[0], results[1])
        return results[0]


class Errors(Both):
    def test_backup_refusals(self):
        def run(s):
            s.q.execute('block-dirty-bitmap-add', {'node': 'src', 'name': 'b'})
            s.add_target('small', size=SIZE // 2)
            out = []
            base = {'job-id': 'j', 'device': 'src', 'target': 't1', 'sync': 'full'}
            for extra in [{'job-id': None}, {'device': 'nope'}, {'target': 'nope'},
                          {'sync': 'incremental'}, {'sync': 'bitmap'},
                          {'bitmap': 'b'}, {'bitmap-mode': 'always'},
                          {'sync': 'incremental', 'bitmap': 'b', 'bitmap-mode': 'always'},
                          {'sync': 'none', 'bitmap': 'b', 'bitmap-mode': 'on-success'},
                          {'sync': 'top', 'bitmap': 'b', 'bitmap-mode': 'never'},
                          {'bitmap': 'zz', 'bitmap-mode': 'never'},
                          {'target': 'src'}, {'target': 'small'}, {'job-id': '1j'},
                          {'job-id': 'a b'}, {'speed': -1}, {'compress': True},
                          {'sync': 'sideways'}, {'on-source-error': 'maybe'},
                          {'x-perf': {'max-workers': 0}}, {'x-perf': {'max-workers': 1 << 40}},
                          {'x-perf': {'max-chunk': -1}}, {'x-perf': {'max-chunk': 4096}},
                          {'x-perf': {'bogus': 1}}]:
                args = dict(base, **extra)
                args = {k: v for k, v in args.items() if v is not None}
                out.append((extra, s.reply('blockdev-backup', args)))
            # A running job: its target and its id are taken; its bitmap is busy.
            out.append(s.reply('blockdev-backup', dict(base, speed=1, bitmap='b',
                                                       **{'bitmap-mode': 'on-success'})))
            out.append(s.reply('blockdev-backup', dict(base, **{'job-id': 'k'})))
            out.append(s.reply('blockdev-backup', dict(base, target='small')))
            s.add_target('t2')
            out.append(s.reply('blockdev-backup', dict(base, target='t2')))
            out.append(s.reply('block-dirty-bitmap-remove', {'node': 'src', 'name': 'b'}))
            out.append(s.reply('block-dirty-bitmap-clear', {'node': 'src', 'name': 'b'}))
            out.append(s.bitmap('b'))
            out.append(s.reply('job-cancel', {'id': 'j'}))
            s.wait_gone('j')
            out.append(s.bitmap('b'))
            out.append(s.events())
            return out
        self.same(self.sides(), run)

    def test_unknown_jobs(self):
        def run(s):
            out = [s.reply(c, {'id': 'x'}) for c in
                   ('job-pause', 'job-resume', 'job-cancel', 'job-complete', 'job-finalize',
                    'job-dismiss')]
            out += [s.reply(c, {'device': 'x'}) for c in
                    ('block-job-pause', 'block-job-resume', 'block-job-cancel',
                     'block-job-complete')]
            out += [s.reply(c, {'id': 'x'}) for c in ('block-job-finalize', 'block-job-dismiss')]
            out.append(s.reply('block-job-set-speed', {'device': 'x', 'speed': 1}))
            out.append(s.reply('query-jobs'))
            out.append(s.reply('query-block-jobs'))
            return out
        self.same(self.sides(), run)


class Lifecycle(Both):
    def backup(self, s, **kw):
        args = {'job-id': 'j', 'device': 'src', 'target': 't1', 'sync': 'full'}
        args.update({k.replace('_', '-'): v for k, v in kw.items()})
        return s.reply('blockdev-backup', args)

    def test_full_backup_events_and_data(self):
        def run(s):
            src = read(s.d.path('src.img'))
            out = [self.backup(s)]
            s.wait_gone('j')
            out.append(s.events())
            self.assertEqual(read(s.d.path('t1.img')), src)
            s.add_target('t2')
            out.append(self.backup(s, target='t2',
                                   x_perf={'max-workers': 2, 'max-chunk': 64 * KiB,
                                           'use-copy-range': False}))
            s.wait_gone('j')
            self.assertEqual(read(s.d.path('t2.img')), src)
            out.append(s.reply('query-named-block-nodes', {'flat': True}) and
                       sorted(n['node-name'] for n in s.q.execute('query-named-block-nodes')))
            return out
        self.same(self.sides(), run)

    def test_verbs_in_each_state(self):
        """A job paused, resumed, cancelled and finalized in each state it reaches."""
        verbs = [('job-pause', {}), ('job-resume', {}), ('job-complete', {}),
                 ('block-job-set-speed', {'speed': 0}, 'device')]

        def try_all(s, job):
            out = []
            for v in verbs:
                key = v[2] if len(v) > 2 else 'id'
                out.append((v[0], s.reply(v[0], dict(v[1], **{key: job}))))
            return out

        def run(s):
            out = [self.backup(s, speed=1, auto_finalize=False, auto_dismiss=False)]
            s.wait_status('j', 'running')
            # running: pause; paused: everything; resume; then pause and cancel while paused
            out.append(s.reply('job-pause', {'id': 'j'}))
            s.wait_status('j', 'paused')
            out.append(s.reply('job-pause', {'id': 'j'}))
            out.append(s.reply('block-job-pause', {'device': 'j'}))
            out.append(s.reply('job-complete', {'id': 'j'}))
            out.append(s.reply('job-finalize', {'id': 'j'}))
            out.append(s.reply('job-dismiss', {'id': 'j'}))
            out.append(s.reply('query-block-jobs'))
            out.append(s.reply('job-resume', {'id': 'j'}))
            s.wait_status('j', 'running')
            out.append(s.reply('job-resume', {'id': 'j'}))
            out.append(s.reply('block-job-pause', {'device': 'j'}))
            s.wait_status('j', 'paused')
            out.append(s.reply('block-job-resume', {'device': 'j'}))
            s.wait_status('j', 'running')
            # to pending: unlimited speed
            out.append(s.reply('block-job-set-speed', {'device': 'j', 'speed': 0}))
            s.wait_status('j', 'pending')
            out.append(try_all(s, 'j'))
            out.append(s.reply('job-dismiss', {'id': 'j'}))
            out.append(s.reply('query-block-jobs'))
            out.append(s.reply('job-finalize', {'id': 'j'}))
            s.wait_status('j', 'concluded')
            out.append(try_all(s, 'j'))
            out.append(s.reply('job-finalize', {'id': 'j'}))
            out.append(s.reply('job-cancel', {'id': 'j'}))
            out.append(s.reply('query-jobs'))
            out.append(s.reply('block-job-dismiss', {'id': 'j'}))
            out.append(s.reply('query-jobs'))
            out.append(s.events())
            # cancel while paused, then cancel in pending
            out.append(self.backup(s, job_id='c1', speed=1))
            out.append(s.reply('job-pause', {'id': 'c1'}))
            s.wait_status('c1', 'paused')
            out.append(s.reply('job-cancel', {'id': 'c1'}))
            s.wait_gone('c1')
            out.append(self.backup(s, job_id='c2', auto_finalize=False, auto_dismiss=False))
            s.wait_status('c2', 'pending')
            out.append(s.reply('block-job-cancel', {'device': 'c2'}))
            out.append(s.reply('query-jobs'))
            out.append(s.reply('job-dismiss', {'id': 'c2'}))
            out.append(s.events())
            return out
        self.same(self.sides(), run)

    def test_exit_with_jobs(self):
        """SIGTERM with a running, a paused and a pending job: the daemon ends them and exits 0
        (Daemon.stop checks the status), leaving the source's graph as it was."""
        for s in self.sides():
            s.add_target('t2')
            s.add_target('t3')
            self.backup(s, speed=1)
            self.backup(s, job_id='p', target='t2', speed=1)
            s.q.execute('job-pause', id='p')
            self.backup(s, job_id='f', target='t3', auto_finalize=False)
            s.wait_status('f', 'pending')
            s.stop()

    def test_speed_limit(self):
        """1 MiB/s over 4 MiB: seen running part way, then done, in about the time it asks."""
        def run(s):
            t0 = time.monotonic()
            out = [self.backup(s, speed=MiB)]
            time.sleep(1.5)
            info = s.q.execute('query-block-jobs')[0]
            self.assertEqual(info['status'], 'running')
            self.assertEqual(info['speed'], MiB)
            self.assertGreater(info['offset'], 0)
            self.assertLess(info['offset'], info['len'])
            s.q.wait_event('BLOCK_JOB_COMPLETED', timeout=20)
            elapsed = time.monotonic() - t0
            self.assertGreater(elapsed, 2.5)
            self.assertLess(elapsed, 10)
            s.wait_gone('j')
            self.assertEqual(read(s.d.path('t1.img')), read(s.d.path('src.img')))
            out.append(s.events())
            return out
        self.same(self.sides(), run)


def fsize_limit(limit):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


class Nodes(Both):
    def test_nodes_of_a_running_job(self):
        """blockdev-del of every node a job uses, other jobs over them, a second backup of the
        same source, the filter under its given name."""
        def run(s):
            base = {'job-id': 'j', 'device': 'src', 'target': 't1', 'sync': 'full', 'speed': 1}
            out = [s.reply('blockdev-backup', dict(base, **{'filter-node-name': 'flt'}))]
            for n in ('t1', 't1f', 'src', 'f0', 'flt'):
                out.append((n, s.reply('blockdev-del', {'node-name': n})))
            out.append(sorted((n['node-name'], n['drv'])
                              for n in s.q.execute('query-named-block-nodes')))
            out.append(s.reply('blockdev-backup', dict(base, **{'job-id': 'k', 'device': 'flt'})))
            s.add_target('t2')
            out.append(s.reply('blockdev-backup', dict(base, **{'job-id': 'k', 'device': 't1',
                                                                'target': 't2'})))
            out.append(s.reply('blockdev-backup', dict(base, **{'job-id': 'k', 'target': 't2'})))
            out.append(s.reply('blockdev-backup', dict(base, **{'job-id': 'n', 'device': 'f0',
                                                                'sync': 'none'})))
            out.append(s.reply('query-jobs'))
            for j in ('k', 'j'):
                out.append(s.reply('job-cancel', {'id': j}))
                s.wait_gone(j)
            out.append(sorted(n['node-name'] for n in s.q.execute('query-named-block-nodes')))
            out.append([s.reply('blockdev-del', {'node-name': n}) for n in ('t1', 't1f')])
            out.append(s.events())
            return out
        self.same(self.sides(), run)

    def test_two_backups_of_one_source(self):
        """Two filters stacked on one raw node; the lower one's job ends first, and writes after
        it still reach the upper filter first."""
        def run(s):
            img = read(s.d.path('src.img'))
            s.write(0, img[:4096])  # the export, before the filters (qsd moves it onto them)
            s.add_target('t2')
            base = {'device': 'src', 'sync': 'full', 'speed': 1}
            out = [s.reply('blockdev-backup', dict(base, **{'job-id': 'j', 'target': 't1'})),
                   s.reply('blockdev-backup', dict(base, **{'job-id': 'k', 'target': 't2'}))]
            s.write(MiB, b'\x66' * 8192)
            out.append(s.reply('block-job-set-speed', {'device': 'j', 'speed': 0}))
            s.wait_gone('j')
            s.write(2 * MiB, b'\x77' * 8192)
            out.append(s.reply('block-job-set-speed', {'device': 'k', 'speed': 0}))
            s.wait_gone('k')
            self.assertEqual(read(s.d.path('t1.img')), img)
            self.assertEqual(read(s.d.path('t2.img')), img)
            src = read(s.d.path('src.img'))
            self.assertEqual(src[2 * MiB:2 * MiB + 8192], b'\x77' * 8192)
            out.append(sorted(n['node-name'] for n in s.q.execute('query-named-block-nodes')))
            out.append(s.events())
            return out
        self.same(self.sides(), run)

    def test_file_node_source(self):
        """A node that is not a raw node gets the filter on top (nothing else writes it)."""
        def run(s):
            out = [s.reply('blockdev-backup', {'job-id': 'j', 'device': 'f0', 'target': 't1',
                                               'sync': 'top'})]
            s.wait_gone('j')
            self.assertEqual(read(s.d.path('t1.img')), read(s.d.path('src.img')))
            out.append(sorted(n['node-name'] for n in s.q.execute('query-named-block-nodes')))
            out.append(s.events())
            return out
        self.same(self.sides(), run)

    def test_sync_none(self):
        """sync none copies only what is overwritten during the job, and lasts until cancelled."""
        def run(s):
            before = read(s.d.path('src.img'))
            t1_before = read(s.d.path('t1.img'))
            s.write(0, before[:4096])  # the export first (qsd's filter then takes it over)
            out = [s.reply('blockdev-backup', {'job-id': 'j', 'device': 'src', 'target': 't1',
                                               'sync': 'none'})]
            s.write(MiB + 100, b'\x55' * 5000)
            time.sleep(0.2)
            out.append(s.reply('query-jobs'))
            out.append(s.reply('job-cancel', {'id': 'j'}))
            s.wait_gone('j')
            t1 = read(s.d.path('t1.img'))
            self.assertEqual(t1[MiB:MiB + 64 * KiB], before[MiB:MiB + 64 * KiB])
            self.assertEqual(t1[:MiB], t1_before[:MiB])
            self.assertEqual(t1[MiB + 64 * KiB:], t1_before[MiB + 64 * KiB:])
            out.append(s.events())
            return out
        self.same(self.sides(), run)

    def test_qmp_answers_while_io_is_slow(self):
        """A target whose every request takes 0.3 s: QMP still answers at once, job-pause soon."""
        def run(s):
            s.q.execute('blockdev-add', {'driver': 'null-co', 'node-name': 'slow',
                                         'size': SIZE, 'latency-ns': 300 * 1000 * 1000})
            out = [s.reply('blockdev-backup', {'job-id': 'j', 'device': 'src', 'target': 'slow',
                                               'sync': 'full'})]
            time.sleep(0.1)
            # Waiting for the job's I/O, five queries would take 1.5 s at least.
            t0 = time.monotonic()
            for _ in range(5):
                s.q.execute('query-block-jobs')
            self.assertLess(time.monotonic() - t0, 0.75)
            t0 = time.monotonic()
            out.append(s.reply('job-pause', {'id': 'j'}))
            self.assertLess(time.monotonic() - t0, 1.0)
            s.wait_status('j', 'paused')
            # paused means no I/O: the progress stands still
            time.sleep(0.35)
            before = s.q.execute('query-jobs')[0]['current-progress']
            time.sleep(0.7)
            self.assertEqual(s.q.execute('query-jobs')[0]['current-progress'], before)
            out.append(s.reply('job-cancel', {'id': 'j'}))
            s.wait_gone('j')
            out.append(s.events())
            return out
        self.same(self.sides(), run)


class Bitmaps(Both):
    """QEMU's bitmap rules on success, cancel and failure."""

    def start(self, s, mode, sync='full', **kw):
        args = {'job-id': 'j', 'device': 'src', 'target': 't1', 'sync': sync, 'bitmap': 'b',
                'bitmap-mode': mode}
        args.update({k.replace('_', '-'): v for k, v in kw.items()})
        return s.reply('blockdev-backup', args)

    def prepare(self, s, add=True):
        if add:
            s.q.execute('block-dirty-bitmap-add', {'node': 'src', 'name': 'b'})
        # Single clusters apart, so both daemons copy exactly one before their rate limit.
        for off in (0, MiB, 3 * MiB):
            s.write(off, b'\x11' * 4096)

    def test_success_and_cancel(self):
        def run(s):
            self.prepare(s)
            out = [s.bitmap('b')]
            for mode, sync in [('on-success', 'bitmap'), ('always', 'bitmap'),
                               ('never', 'bitmap'), ('on-success', 'full')]:
                # cancelled after the first cluster (16 KiB/s: the next one waits 4 s)
                self.prepare(s, add=False)
                out.append(self.start(s, mode, sync, speed=16 * KiB))
                s.wait_progress('j', 64 * KiB)
                s.write(2 * MiB, b'\x33' * 4096)   # during the job: kept in every mode
                out.append(s.bitmap('b'))
                out.append(s.reply('job-cancel', {'id': 'j'}))
                s.wait_gone('j')
                out.append((mode, sync, 'cancelled', s.bitmap('b')))
                # completed
                out.append(self.start(s, mode, sync))
                s.wait_gone('j')
                out.append((mode, sync, 'done', s.bitmap('b')))
                s.write(0, b'\x44' * 4096)
            out.append(s.events())
            return out
        self.same(self.sides(), run)

    def test_fine_granularity_and_disabled(self):
        """A 4 KiB bitmap: the job copies whole 64 KiB clusters and, with always after a cancel,
        sets the 4 KiB chunks of every cluster it did not copy; a disabled bitmap's successor
        records nothing."""
        def run(s):
            s.q.execute('block-dirty-bitmap-add', {'node': 'src', 'name': 'b',
                                                   'granularity': 4096})
            for off in (0, MiB, 3 * MiB + 8192):
                s.write(off, b'\x11' * 4096)
            out = [s.bitmap('b'),
                   s.reply('blockdev-backup', {'job-id': 'j', 'device': 'src', 'target': 't1',
                                               'sync': 'bitmap', 'bitmap': 'b',
                                               'bitmap-mode': 'always', 'speed': 16 * KiB})]
            s.wait_progress('j', 64 * KiB)
            out.append(s.reply('job-cancel', {'id': 'j'}))
            s.wait_gone('j')
            out.append(s.bitmap('b'))
            out.append(s.reply('block-dirty-bitmap-disable', {'node': 'src', 'name': 'b'}))
            out.append(s.reply('blockdev-backup', {'job-id': 'j', 'device': 'src', 'target': 't1',
                                                   'sync': 'bitmap', 'bitmap': 'b',
                                                   'bitmap-mode': 'on-success', 'speed': 16 * KiB}))
            s.wait_progress('j', 64 * KiB)
            s.write(2 * MiB, b'\x22' * 4096)
            out.append(s.bitmap('b'))
            out.append(s.reply('block-job-set-speed', {'device': 'j', 'speed': 0}))
            s.wait_gone('j')
            out.append(s.bitmap('b'))
            out.append(s.events())
            return out
        self.same(self.sides(), run)

    def test_incremental_copies_only_the_bitmap(self):
        def run(s):
            self.prepare(s)
            src = read(s.d.path('src.img'))
            before = read(s.d.path('t1.img'))
            out = [s.reply('blockdev-backup', {'job-id': 'j', 'device': 'src', 'target': 't1',
                                               'sync': 'incremental', 'bitmap': 'b'})]
            s.wait_gone('j')
            t1 = read(s.d.path('t1.img'))
            for off in range(0, SIZE, 64 * KiB):
                copied = off in (0, MiB, 3 * MiB)
                want = src if copied else before
                self.assertEqual(t1[off:off + 64 * KiB], want[off:off + 64 * KiB], off)
            out.append(s.bitmap('b'))
            out.append(s.events())
            return out
        self.same(self.sides(), run)

    def test_failing_target(self):
        """Writes of the target past 2 MiB fail (EFBIG): report fails the job, stop pauses it;
        the bitmap is kept (on-success) or left with what was not copied (always)."""
        def run(s):
            s.q.execute('block-dirty-bitmap-add', {'node': 'src', 'name': 'b'})
            s.write(0, b'\x11' * 4096)
            out = []
            for mode in ('on-success', 'always'):
                out.append(self.start(s, mode))
                s.wait_gone('j')
                out.append((mode, s.bitmap('b')))
            out.append(self.start(s, 'on-success', **{'on-target-error': 'ignore'}))
            ev = s.q.wait_event('BLOCK_JOB_ERROR')
            out.append(ev['data'])
            out.append(s.reply('job-cancel', {'id': 'j'}))
            s.wait_gone('j')
            s.q.events = [e for e in s.q.events if e['event'] != 'BLOCK_JOB_ERROR']
            out.append(s.bitmap('b'))
            out.append(self.start(s, 'on-success', **{'on-target-error': 'stop'}))
            s.q.wait_event('BLOCK_JOB_ERROR')
            s.wait_status('j', 'paused')
            info = s.q.execute('query-block-jobs')[0]
            out.append((info['io-status'], info['paused'], info['status']))
            out.append(s.reply('job-cancel', {'id': 'j'}))
            s.wait_gone('j')
            out.append(s.bitmap('b'))
            out.append(s.events())
            return out
        # Data everywhere: qsd copies chunks in parallel, cbtd one after the other, so the
        # clusters left are the same only when every chunk past the limit fails.
        self.same(self.sides(preexec=fsize_limit(2 * MiB), dense=True), run)


class CbtdGraph(unittest.TestCase):
    """cbtd's own refusals where a graph change would cut a backup's filter out (qsd's graph
    differs: its filter sits above the node)."""

    def test_refusals(self):
        s = Side(False)
        self.addCleanup(s.stop)
        s.write(0, read(s.d.path('src.img'))[:4096])
        s.q.execute('blockdev-backup', {'job-id': 'j', 'device': 'src', 'target': 't1',
                                        'sync': 'full', 'speed': 1, 'filter-node-name': 'flt'})
        err = s.q.error('blockdev-reopen', options=[{'driver': 'raw', 'node-name': 'src',
                                                     'file': 'f0'}])
        self.assertEqual(err[1], "cbtd cannot reopen node 'src' while a backup job's filter "
                                 "'flt' is under it")
        err = s.q.error('block-export-add', {'type': 'nbd', 'id': 'snap', 'node-name': 'src',
                                             'name': 'snap', 'snapshot': True,
                                             'scratch-dir': s.d.dir})
        self.assertIn("over a 'file' node only", err[1])
        s.q.execute('job-cancel', id='j')
        s.wait_gone('j')
        s.q.execute('block-export-add', {'type': 'nbd', 'id': 'snap', 'node-name': 'src',
                                         'name': 'snap', 'snapshot': True,
                                         'scratch-dir': s.d.dir})
        err = s.q.error('blockdev-backup', {'job-id': 'j', 'device': 'src', 'target': 't1',
                                            'sync': 'full'})
        self.assertRegex(err[1], "^cbtd cannot back up node 'src' while its snapshot filter "
                                 "'#block[0-9]+' is under it$")
        s.q.execute('block-export-del', id='snap')


class Persistent(unittest.TestCase):
    """cbtd's persistent bitmaps (docs/bitmaps.md) through a backup: the store takes the job's
    result, keeps every bit on cancel, and a kill -9 during the job loses no write."""

    def daemon(self, dirpath):
        img = os.path.join(dirpath, 'src.img')
        d = Daemon(['--blockdev', 'driver=file,node-name=f0,filename=' + img,
                    '--blockdev', 'driver=raw,node-name=src,file=f0'], tmpdir=dirpath)
        s = Side.__new__(Side)
        s.d, s.q, s.size = d, connect(d), SIZE
        return s

    def count(self, s):
        return s.bitmap('b')['count']

    def test_store_follows_the_job(self):
        dirpath = tempfile.mkdtemp(prefix='cbtd-jobs-')
        self.addCleanup(shutil.rmtree, dirpath, True)
        fill(os.path.join(dirpath, 'src.img'), SIZE, 1)
        s = self.daemon(dirpath)
        s.add_target('t1')
        s.q.execute('block-dirty-bitmap-add', {'node': 'src', 'name': 'b', 'persistent': True})
        for off in (0, MiB, 3 * MiB):
            s.write(off, b'\x11' * 4096)
        self.assertEqual(self.count(s), 3 * 64 * KiB)
        args = {'job-id': 'j', 'device': 'src', 'target': 't1', 'sync': 'incremental',
                'bitmap': 'b', 'speed': 16 * KiB}
        # cancelled: every bit stays, the write during the job too
        s.q.execute('blockdev-backup', args)
        s.wait_progress('j', 64 * KiB)
        s.write(2 * MiB, b'\x22' * 4096)
        s.q.execute('job-cancel', id='j')
        s.wait_gone('j')
        self.assertEqual(self.count(s), 4 * 64 * KiB)
        # done: only the write during the job stays, in the store as well
        s.q.execute('blockdev-backup', args)
        s.wait_progress('j', 64 * KiB)
        s.write(3 * MiB + 64 * KiB, b'\x33' * 4096)
        s.q.execute('block-job-set-speed', device='j', speed=0)
        s.wait_gone('j')
        self.assertEqual(self.count(s), 64 * KiB)
        s.d.stop()
        s = self.daemon(dirpath)
        self.assertEqual(self.count(s), 64 * KiB)
        # kill -9 during a job: the bitmap still holds its bits and the writes since
        s.add_target('t2')
        s.write(0, b'\x44' * 4096)
        s.q.execute('blockdev-backup', dict(args, target='t2', speed=1))
        s.wait_progress('j', 64 * KiB)
        s.write(MiB, b'\x55' * 4096)
        time.sleep(0.1)
        s.d.proc.send_signal(signal.SIGKILL)
        s.d.proc.wait()
        s.d.stop()
        s = self.daemon(dirpath)
        self.addCleanup(s.d.stop)
        self.assertEqual(self.count(s), 3 * 64 * KiB)


class Transaction(Both):
    def test_atomic_with_bitmap_actions(self):
        def run(s):
            out = [s.reply('transaction', {'actions': [
                {'type': 'block-dirty-bitmap-add', 'data': {'node': 'src', 'name': 'b0'}},
                {'type': 'blockdev-backup', 'data': {'job-id': 'j', 'device': 'src',
                                                     'target': 't1', 'sync': 'full'}}]})]
            s.wait_gone('j')
            out.append(s.bitmap('b0'))
            # a failing transaction undoes the job and the bitmap
            s.add_target('t2')
            out.append(s.reply('transaction', {'actions': [
                {'type': 'block-dirty-bitmap-add', 'data': {'node': 'src', 'name': 'b1'}},
                {'type': 'blockdev-backup', 'data': {'job-id': 'k', 'device': 'src',
                                                     'target': 't2', 'sync': 'full'}},
                {'type': 'abort', 'data': {}}]}))
            out.append(s.bitmap('b1'))
            out.append(s.reply('query-jobs'))
            out.append(sorted(n['node-name'] for n in s.q.execute('query-named-block-nodes')))
            out.append(s.events())
            return out
        self.same(self.sides(), run)


class Grouped(Both):
    """completion-mode grouped: the jobs of one transaction end together. Which job of a group
    finishes its copy first is a race, so each job's own events are compared in order, and the
    group's rule is checked on each daemon: no job goes on before all have got as far."""

    def txn(self, s, jobs, extra=(), **kw):
        acts = [{'type': 'blockdev-backup',
                 'data': dict({'job-id': j, 'device': 'src', 'target': t, 'sync': 'full'},
                              **{k.replace('_', '-'): v for k, v in kw.items()})}
                for j, t in jobs]
        return s.reply('transaction', {'actions': acts + list(extra),
                                       'properties': {'completion-mode': 'grouped'}})

    def per_job(self, events, first_after, last_before):
        """Each job's events; every @last_before state change comes before any @first_after."""
        def at(status):
            return [i for i, e in enumerate(events) if e['event'] == 'JOB_STATUS_CHANGE' and
                    e['data']['status'] == status]
        self.assertTrue(at(last_before) and at(first_after))
        self.assertLess(max(at(last_before)), min(at(first_after)), events)
        return {j: [e for e in events if j in (e['data'].get('id'), e['data'].get('device'))]
                for j in ('j', 'k')}

    def test_grouped(self):
        def run(s):
            s.add_target('t2')
            out = [self.txn(s, [('j', 't1'), ('k', 't2')])]
            s.wait_gone('j')
            s.wait_gone('k')
            out.append(self.per_job(s.events(), 'pending', 'waiting'))
            # one cancelled: both are
            out.append(self.txn(s, [('j', 't1'), ('k', 't2')], speed=1))
            out.append(s.reply('job-cancel', {'id': 'k'}))
            s.wait_gone('j')
            ev = s.events()
            self.assertEqual([e['event'] for e in ev].count('BLOCK_JOB_CANCELLED'), 2)
            out.append(ev)
            # both done, finalized together by one job-finalize
            out.append(self.txn(s, [('j', 't1'), ('k', 't2')], auto_finalize=False))
            s.wait_status('j', 'pending')
            s.wait_status('k', 'pending')
            out.append(s.reply('job-finalize', {'id': 'k'}))
            out.append(s.reply('query-jobs'))
            out.append(self.per_job(s.events(), 'pending', 'waiting'))
            # a bitmap action refuses the mode
            out.append(self.txn(s, [('j', 't1')], [{'type': 'block-dirty-bitmap-add',
                                                    'data': {'node': 'src', 'name': 'b'}}]))
            out.append(s.reply('query-jobs'))
            out.append(sorted(n['node-name'] for n in s.q.execute('query-named-block-nodes')))
            out.append(s.events())
            return out
        self.same(self.sides(), run)

    def test_failing_action_undoes_the_group(self):
        """qemu-storage-daemon 7.2 hangs here (a grouped job that never started waits for
        itself), so cbtd alone: both jobs are undone, nothing is left of them."""
        s = self.sides()[0]
        s.add_target('t2')
        before = sorted(n['node-name'] for n in s.q.execute('query-named-block-nodes'))
        reply = self.txn(s, [('j', 't1'), ('k', 't2')], [{'type': 'abort', 'data': {}}])
        self.assertEqual(reply['error']['desc'], 'Transaction aborted using Abort action')
        self.assertEqual(s.q.execute('query-jobs'), [])
        self.assertEqual(sorted(n['node-name'] for n in s.q.execute('query-named-block-nodes')),
                         before)
        ev = [(e['data']['id'], e['data']['status']) for e in s.events()]
        self.assertEqual(sorted(ev), sorted([(j, st) for j in 'jk' for st in
                                             ('created', 'aborting', 'concluded', 'null')]))


class PushChain(unittest.TestCase):
    """A full backup and two incrementals of a raw image while writers overwrite it."""

    BLOCK = 4096
    WRITERS = 3

    def chain(self, qsd):
        s = Side(qsd, targets=0, size=8 * MiB)
        self.addCleanup(s.stop)
        s.sock = s.d.path('nbd.sock')
        s.q.execute('nbd-server-start', addr={'type': 'unix', 'data': {'path': s.sock}})
        s.q.execute('block-export-add', {'type': 'nbd', 'id': 'live', 'node-name': 'src',
                                         'writable': True})
        initial = read(s.d.path('src.img'))
        uri = 'nbd+unix:///src?socket=' + s.sock
        writers = [seqwriter.Writer(uri, w, self.WRITERS, s.size, self.BLOCK, pause=0.001)
                   for w in range(self.WRITERS)]
        for w in writers:
            w.start()
        try:
            time.sleep(0.2)
            s.add_target('full')
            s.q.execute('transaction', actions=[
                {'type': 'block-dirty-bitmap-add', 'data': {'node': 'src', 'name': 'b0'}},
                {'type': 'blockdev-backup', 'data': {'job-id': 'full', 'device': 'src',
                                                     'target': 'full', 'sync': 'full',
                                                     'speed': 16 * MiB}}])
            s.wait_gone('full')
            views = [read(s.d.path('full.img'))]
            prev = s.d.path('full.img')
            for i in (1, 2):
                time.sleep(0.3)
                name = 'inc%d' % i
                s.add_target(name, content=prev)
                s.q.execute('blockdev-backup', {'job-id': name, 'device': 'src', 'target': name,
                                                'sync': 'incremental', 'bitmap': 'b0',
                                                'speed': 16 * MiB})
                s.wait_gone(name)
                prev = s.d.path(name + '.img')
                views.append(read(prev))
        finally:
            seqwriter.stop_all(writers)
        for w in writers:
            self.assertIsNone(w.error)
            self.assertGreater(len(w.log), 10)
        cuts = []
        for view in views:
            cut = seqwriter.cut_of(view, self.WRITERS, self.BLOCK)
            self.assertEqual(view, seqwriter.image_at(initial, writers, cut, self.BLOCK),
                             'not the source at one instant (cut %r)' % cut)
            cuts.append(cut)
        for a, b in zip(cuts, cuts[1:]):
            self.assertTrue(all(x < y for x, y in zip(a, b)), (a, b))
        return cuts

    def test_cbtd(self):
        self.chain(False)

    def test_qsd(self):
        self.chain(True)


if __name__ == '__main__':
    cbttest.main()
