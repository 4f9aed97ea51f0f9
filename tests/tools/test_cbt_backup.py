#!/usr/bin/python3
"""cbt-backup against the real cbtd and qemu-storage-daemon: full and incremental backups of a
disk under concurrent writers, restored with stock tools and checked against the disk at each
point's instant; refused chains and their reasons; interrupted and killed backups; TLS; verify
and prune. Unix sockets only.

How an instant is checked: the writers of tests/lib/seqwriter.py (each a prefix of its own
numbered writes in any point-in-time view). A restored point must equal the image rebuilt from
its cut byte for byte, and its cut must lie between the writes acknowledged before the backup
command started and those sent before it ended: a point that is torn, stale (an incremental that
missed writes leaves older data, which no cut explains) or from another moment fails.
"""
import hashlib
import json
import os
import pty
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

import nbd

import cbttest
import seqwriter
import tlscerts
from cbttest import Daemon

KiB = 1 << 10
MiB = 1 << 20
SIZE = 32 * MiB
DATA = 24 * MiB        # the initial data; the last 8 MiB are a hole
HOT = 4 * MiB          # the writers write here only
BLOCK = 4 * KiB
WRITERS = 3
BACKUP = os.path.join(os.path.dirname(os.path.abspath(os.environ['CBTCTL'])), 'cbt-backup')


def initial_image():
    rnd = random.Random(7)
    return rnd.randbytes(DATA) + bytes(SIZE - DATA)


def sha(data):
    return hashlib.sha256(data).hexdigest()


class Base:
    """The same scenarios on cbtd and, with qsd = True, on qemu-storage-daemon."""
    qsd = False

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='cbt-backup-test-')
        self.img_path = os.path.join(self.dir, 'disk.img')
        self.initial = initial_image()
        with open(self.img_path, 'wb') as f:
            f.write(self.initial)
        self.repo = os.path.join(self.dir, 'repo')
        self.nbd_sock = os.path.join(self.dir, 'nbd.sock')
        self.start()

    def start(self, extra=()):
        args = ['--nbd-server', 'addr.type=unix,addr.path=' + self.nbd_sock,
                '--blockdev', 'driver=file,node-name=disk0,filename=' + self.img_path,
                '--blockdev', 'driver=raw,node-name=disk,file=disk0',
                '--export', 'type=nbd,id=live,node-name=disk,name=live,writable=on']
        self.tool_qmp = os.path.join(self.dir, 'tool.sock')
        if self.qsd:
            # qsd serves one client per monitor: the tool gets its own.
            args += ['--chardev', 'socket,id=m1,path=%s,server=on,wait=off' % self.tool_qmp,
                     '--monitor', 'chardev=m1']
        self.d = Daemon(extra=list(extra) + args, qsd=self.qsd, tmpdir=self.dir)
        if not self.qsd:
            self.tool_qmp = self.d.qmp_path
        self.q = self.d.qmp()
        cbttest.wait_for(lambda: os.path.exists(self.nbd_sock), what='NBD socket')

    def tearDown(self):
        self.d.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def live_uri(self):
        return 'nbd+unix:///live?socket=' + self.nbd_sock

    def tool(self, cmd, *args, expect=0, timeout=120):
        p = subprocess.run([BACKUP, cmd] + list(args), capture_output=True, text=True,
                           timeout=timeout)
        self.assertEqual(p.returncode, expect, 'cbt-backup %s %s:\n%s%s' % (
            cmd, ' '.join(args), p.stdout, p.stderr))
        return p

    def backup_args(self, kind, *extra):
        return [kind, '--qmp', self.tool_qmp, '--nbd', self.nbd_sock, '--node', 'disk',
                '--repo', self.repo, '--scratch-dir', self.dir, '--progress=json'] + list(extra)

    def backup(self, kind, *extra, expect=0):
        p = self.tool(*self.backup_args(kind, *extra), expect=expect)
        lines = [json.loads(line) for line in p.stdout.splitlines()]
        for line in lines:
            self.assertIn(line['type'], ('progress', 'result', 'error'))
        return lines[-1] if lines else None, p.stderr

    def restored(self, point):
        out = os.path.join(self.dir, 'restore-%d.img' % point)
        self.tool('restore', '--repo', self.repo, '--point', str(point), '--to', out)
        with open(out, 'rb') as f:
            data = f.read()
        os.unlink(out)
        return data

    def check_images(self):
        """Every point's image is a sound qcow2 file to qemu-img (cbt-backup writes them
        itself): no error, no leak, no corruption."""
        images = sorted(f for f in os.listdir(self.repo) if f.endswith('.qcow2'))
        self.assertTrue(images)
        for f in images:
            r = subprocess.run(['qemu-img', 'check', '-f', 'qcow2', os.path.join(self.repo, f)],
                               capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, '%s: %s%s' % (f, r.stdout, r.stderr))
            self.assertIn('No errors were found on the image.', r.stdout, f)

    def read_live(self):
        h = nbd.NBD()
        h.connect_uri(self.live_uri())
        try:
            return b''.join(h.pread(MiB, off) for off in range(0, SIZE, MiB))
        finally:
            h.shutdown()

    def write_live(self, off, data=None, zero=0):
        h = nbd.NBD()
        h.connect_uri(self.live_uri())
        if zero:
            h.zero(zero, off)
        else:
            h.pwrite(data, off)
        h.flush()
        h.shutdown()

    def bitmaps(self):
        for n in self.q.execute('query-named-block-nodes'):
            if n['node-name'] == 'disk':
                return {b['name']: b for b in n.get('dirty-bitmaps', [])}
        raise AssertionError('no node disk')

    def manifest(self, point):
        with open(os.path.join(self.repo, '%04d.json' % point)) as f:
            return json.load(f)

    def assert_server_clean(self, nodes_before):
        """No view, no fleecing node left; the node back on its file child."""
        self.assertEqual([e['id'] for e in self.q.execute('query-block-exports')], ['live'])
        self.assertEqual(sorted(n['node-name'] for n in self.q.execute('query-named-block-nodes')),
                         nodes_before)
        self.assertEqual([f for f in os.listdir(self.dir) if 'scratch' in f], [])

    def node_names(self):
        return sorted(n['node-name'] for n in self.q.execute('query-named-block-nodes'))

    # ---- the scenarios ----------------------------------------------------------------------

    def test_chain_under_writers(self):
        """A full and three incrementals while three writers write: each point restored with
        qemu-img is exactly the disk at an instant inside its command; incrementals copy only
        what changed; the hole stays a hole; verify passes; the server is left clean."""
        nodes_before = self.node_names()
        writers = [seqwriter.Writer(self.live_uri(), w, WRITERS, HOT, BLOCK, pause=0.0005)
                   for w in range(WRITERS)]
        for wr in writers:
            wr.start()
        windows, results = [], []
        try:
            for i in range(4):
                n = [len(wr.log) for wr in writers]
                cbttest.wait_for(lambda: all(len(wr.log) > k + 100 for wr, k in zip(writers, n)),
                                 what='writes')
                t0 = time.monotonic()
                res, _ = self.backup('full' if i == 0 else 'incremental')
                windows.append((t0, time.monotonic()))
                results.append(res)
        finally:
            seqwriter.stop_all(writers)
        for wr in writers:
            self.assertIsNone(wr.error)
        self.assertEqual([r['kind'] for r in results], ['full'] + ['incremental'] * 3)
        self.assertEqual([r['seq'] for r in results], [1, 2, 3, 4])
        self.assertGreaterEqual(results[0]['bytes-written'], DATA - HOT)
        for r in results[1:]:
            self.assertGreater(r['bytes-written'], 0)
            self.assertLessEqual(r['bytes-written'], HOT)
        for point, (t0, t1) in enumerate(windows, 1):
            view = self.restored(point)
            cut = seqwriter.cut_of(view, WRITERS, BLOCK)
            expected = seqwriter.image_at(self.initial, writers, cut, BLOCK)
            self.assertEqual(sha(view), sha(expected), 'point %d is not an instant' % point)
            for wr in writers:
                acked = sum(1 for _, _, _, a in wr.log if a < t0)
                sent = sum(1 for _, _, s, _ in wr.log if s < t1)
                self.assertTrue(acked <= cut[wr.w] <= sent, (point, wr.w, acked, cut, sent))
        # The full kept the hole: qemu-img map of the point shows no data there.
        m = subprocess.run(['qemu-img', 'map', '--output=json', '-f', 'qcow2',
                            os.path.join(self.repo, '0001.qcow2')], capture_output=True,
                           text=True, check=True)
        for e in json.loads(m.stdout):
            if e['data']:
                self.assertLessEqual(e['start'] + e['length'], DATA)
        self.tool('verify', '--repo', self.repo)
        self.check_images()
        # One checkpoint is left on the node: the last point's.
        self.assertEqual(list(self.bitmaps()), [results[-1]['checkpoint']])
        self.assert_server_clean(nodes_before)

    def test_zeroes_mask_older_points(self):
        """Zeroes written after a point are written as zeroes into the next one (an overlay
        would show the older data through a hole); the full skips them."""
        self.write_live(MiB, b'\x5a' * MiB)
        res1, _ = self.backup('full')
        self.write_live(MiB, zero=MiB)
        self.write_live(30 * MiB, b'\xa5' * (64 * KiB))
        res2, _ = self.backup('incremental')
        self.assertGreaterEqual(res2['bytes-zeroed'], MiB)
        self.assertEqual(res2['bytes-written'], 64 * KiB)
        live = self.read_live()
        self.assertEqual(sha(self.restored(2)), sha(live))
        one = self.restored(1)
        self.assertEqual(one[MiB:2 * MiB], b'\x5a' * MiB)
        self.assertEqual(one[30 * MiB:31 * MiB], bytes(MiB))
        self.check_images()

    def test_removed_checkpoint_refused(self):
        """A checkpoint removed on the server cannot carry an incremental: exit 3 and the
        reason; --auto takes a full and records why."""
        res, _ = self.backup('full')
        self.q.execute('block-dirty-bitmap-remove', {'node': 'disk', 'name': res['checkpoint']})
        _, err = self.backup('incremental', expect=3)
        self.assertIn("cannot take an incremental backup: checkpoint '%s' of point 1 is missing "
                      "on node 'disk'" % res['checkpoint'], err)
        res2, _ = self.backup('incremental', '--auto')
        self.assertEqual(res2['kind'], 'full')
        self.assertIn('is missing', res2['fallback-reason'])
        self.assertIn('is missing', self.manifest(2)['fallback-reason'])
        self.assertEqual(self.restored(2), self.read_live())

    def test_restore_into_the_live_export(self):
        """restore --to an NBD URI writes the point into an existing export (here the disk's
        own, in place), checks it with qemu-img compare, and the daemon's checkpoint records
        the restore's writes, so the next incremental holds exactly the restored disk."""
        res1, _ = self.backup('full')
        at_point = self.read_live()
        self.write_live(5 * MiB, b'\xdd' * (2 * MiB))
        self.write_live(28 * MiB, b'\xcc' * MiB)
        self.assertNotEqual(sha(self.read_live()), sha(at_point))
        p = self.tool('restore', '--repo', self.repo, '--point', '1', '--to', self.live_uri())
        self.assertIn('point 1 restored to %s (compared equal)' % self.live_uri(), p.stdout)
        self.assertEqual(sha(self.read_live()), sha(at_point))
        res2, _ = self.backup('incremental')
        self.assertEqual(sha(self.restored(2)), sha(at_point))
        self.assertNotEqual(res1['checkpoint'], res2['checkpoint'])

    def verify_live(self, *extra, expect=0):
        p = self.tool('verify', '--live', '--repo', self.repo, '--qmp', self.tool_qmp,
                      '--nbd', self.nbd_sock, '--scratch-dir', self.dir, '--progress=json',
                      *extra, expect=expect)
        lines = [json.loads(line) for line in p.stdout.splitlines()]
        return [e for e in lines if e['type'] == 'verify'], p.stderr

    def test_verify_live(self):
        """verify --live compares the last point with a frozen view where its checkpoint says
        nothing changed: it passes while writers write (their extents are changed since), finds
        a write that went around the daemon (into the image file) with exit 4, leaves the
        server and the chain as they were, and refuses a chain it cannot prove (exit 3)."""
        nodes_before = self.node_names()
        res1, _ = self.backup('full')
        self.write_live(2 * MiB, b'\x42' * MiB)
        res2, _ = self.backup('incremental')
        writers = [seqwriter.Writer(self.live_uri(), w, WRITERS, HOT, BLOCK, pause=0.0005)
                   for w in range(WRITERS)]
        for wr in writers:
            wr.start()
        try:
            cbttest.wait_for(lambda: all(len(wr.log) > 50 for wr in writers), what='writes')
            (ev,), _ = self.verify_live()
        finally:
            seqwriter.stop_all(writers)
        self.assertEqual((ev['seq'], ev['ok'], ev['live']), (2, True, True))
        self.assertGreater(ev['bytes-changed-since'], 0)
        self.assertLessEqual(ev['bytes-changed-since'], HOT)
        self.assertEqual(ev['bytes-compared'] + ev['bytes-changed-since'], SIZE)
        self.assert_server_clean(nodes_before)
        self.assertEqual(list(self.bitmaps()), [res2['checkpoint']])
        # A write the daemon never saw, outside the writers' area: the point and the disk now
        # differ where the checkpoint says nothing changed.
        with open(self.img_path, 'r+b') as f:
            os.pwrite(f.fileno(), b'\xee' * BLOCK, 20 * MiB + 3 * BLOCK)
        (ev,), err = self.verify_live(expect=4)
        self.assertFalse(ev['ok'])
        self.assertIn('the data at offset %d differs from the live disk' % (20 * MiB + 3 * BLOCK),
                      ev['problem'])
        self.assertIn('does not match the live disk', err)
        self.assert_server_clean(nodes_before)
        # The chain is untouched: the next incremental is taken from the same checkpoint.
        self.assertTrue(self.bitmaps()[res2['checkpoint']]['recording'])
        res3, _ = self.backup('incremental')
        self.assertEqual(res3['kind'], 'incremental')
        # Only the last point's checkpoint records; and a missing one cannot be compared.
        self.verify_live('--point', '1', expect=2)
        self.q.execute('block-dirty-bitmap-remove', {'node': 'disk', 'name': res3['checkpoint']})
        _, err = self.verify_live(expect=3)
        self.assertIn("cannot compare point 3 with the live disk: checkpoint '%s' of point 3 is "
                      "missing" % res3['checkpoint'], err)
        self.assertNotEqual(res1['checkpoint'], res3['checkpoint'])

    def test_interrupted_backup_keeps_the_chain(self):
        """SIGINT in the middle of a copy: exit 130, no point, no partial image, nothing left on
        the server, the old checkpoint still recording; the next incremental works. SIGKILL:
        the leftovers are removed by the next run, which still proves the chain."""
        nodes_before = self.node_names()
        res1, _ = self.backup('full')
        cp1 = res1['checkpoint']
        rnd = random.Random(3)
        self.write_live(0, rnd.randbytes(16 * MiB))
        for sig in (signal.SIGINT, signal.SIGKILL):
            p = subprocess.Popen([BACKUP] + self.backup_args('incremental', '--max-rate', '4M',
                                                             '--connections', '1'),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for line in p.stdout:
                ev = json.loads(line)
                if ev['type'] == 'progress' and ev['done'] > 0:
                    break
            self.assertFalse(os.path.exists(os.path.join(self.repo, '0002.json')))
            p.send_signal(sig)
            rest, err = p.communicate(timeout=30)
            if sig == signal.SIGINT:
                self.assertEqual(p.returncode, 130, err)
                self.assertIn('interrupted by SIGINT', err)
                self.assertEqual(sorted(os.listdir(self.repo)),
                                 ['0001.json', '0001.qcow2', 'lock', 'repo.json'])
                self.assertEqual(list(self.bitmaps()), [cp1])
                self.assertTrue(self.bitmaps()[cp1]['recording'])
                cbttest.wait_for(lambda: [e['id'] for e in self.q.execute('query-block-exports')]
                                 == ['live'], what='the view gone')
                self.assert_server_clean(nodes_before)
            else:
                self.assertEqual(p.returncode, -signal.SIGKILL)
                self.assertIn('0002.qcow2.part', os.listdir(self.repo))
        self.write_live(20 * MiB, b'\x77' * MiB)
        res2, err = self.backup('incremental')
        self.assertIn('left by a run that did not finish', err)
        self.assertEqual(res2['kind'], 'incremental')
        self.assertEqual(res2['seq'], 2)
        self.assertEqual(sha(self.restored(2)), sha(self.read_live()))
        self.assertEqual(list(self.bitmaps()), [res2['checkpoint']])
        self.assert_server_clean(nodes_before)


class TestCbtd(Base, unittest.TestCase):
    def break_and_refuse(self, action, reason):
        shutil.rmtree(self.repo, ignore_errors=True)
        res, _ = self.backup('full')
        action(res['checkpoint'])
        _, err = self.backup('incremental', expect=3)
        self.assertIn('cannot take an incremental backup: ' + reason % res['checkpoint'], err)
        res2, _ = self.backup('incremental', '--auto')
        self.assertEqual(res2['kind'], 'full')
        self.assertIn(reason % res['checkpoint'], res2['fallback-reason'])

    def test_broken_chains(self):
        """Each way a checkpoint stops proving the chain, with the reason cbt-backup gives."""
        q = self.q

        def clear(cp):
            q.execute('block-dirty-bitmap-clear', {'node': 'disk', 'name': cp})

        def disable_enable(cp):
            q.execute('block-dirty-bitmap-disable', {'node': 'disk', 'name': cp})
            q.execute('block-dirty-bitmap-enable', {'node': 'disk', 'name': cp})

        def disable(cp):
            q.execute('block-dirty-bitmap-disable', {'node': 'disk', 'name': cp})

        def replace(cp):
            q.execute('block-dirty-bitmap-remove', {'node': 'disk', 'name': cp})
            q.execute('block-dirty-bitmap-add', {'node': 'disk', 'name': cp})

        with self.subTest('cleared'):
            self.break_and_refuse(clear, "checkpoint '%s' has a break in its record: cleared")
        with self.subTest('disabled and enabled again'):
            self.break_and_refuse(disable_enable,
                                  "checkpoint '%s' has a break in its record: disabled")
        with self.subTest('disabled'):
            self.break_and_refuse(disable, "checkpoint '%s' is not recording")
        with self.subTest('replaced'):
            self.break_and_refuse(replace, "checkpoint '%s' was replaced: its identity is ")

    def test_restart_with_persistence(self):
        """The checkpoint is persistent (in the file node's bitmap store beside the image):
        the chain survives a restart of the daemon, with the same identity, unbroken. A
        checkpoint asked to be in memory only is gone after a restart: refused."""
        res1, _ = self.backup('full')
        self.assertTrue(self.manifest(1)['checkpoint-persistent'])
        self.write_live(5 * MiB, b'\x31' * MiB)
        self.d.stop()
        self.start()
        res2, _ = self.backup('incremental')
        self.assertEqual(res2['kind'], 'incremental')
        self.assertEqual(self.manifest(2)['based-on']['checkpoint-uuid'],
                         self.manifest(1)['checkpoint-uuid'])
        self.assertEqual(sha(self.restored(2)), sha(self.read_live()))
        res3, _ = self.backup('incremental', '--persistent', 'no')
        self.assertFalse(self.manifest(3)['checkpoint-persistent'])
        self.d.stop()
        self.start()
        _, err = self.backup('incremental', expect=3)
        self.assertIn("checkpoint '%s' of point 3 is missing" % res3['checkpoint'], err)

    def test_tls(self):
        """Over an NBD server that requires TLS (PSK): with the key it works, without it the
        backup fails with a clear error and leaves the chain as it was."""
        psk_dir = os.path.join(self.dir, 'psk')
        psk = tlscerts.make_psk(psk_dir, ('backup',))
        self.d.stop()
        if os.path.exists(self.nbd_sock):
            os.unlink(self.nbd_sock)
        args = ['--object', 'tls-creds-psk,id=t0,dir=%s,endpoint=server' % psk_dir,
                '--nbd-server', 'addr.type=unix,addr.path=%s,tls-creds=t0' % self.nbd_sock,
                '--blockdev', 'driver=file,node-name=disk0,filename=' + self.img_path,
                '--blockdev', 'driver=raw,node-name=disk,file=disk0']
        self.d = Daemon(extra=args, tmpdir=self.dir)
        self.tool_qmp = self.d.qmp_path
        self.q = self.d.qmp()
        tls = ['--tls-psk-file', psk, '--tls-username', 'backup']
        res, _ = self.backup('full', *tls)
        self.assertEqual(res['seq'], 1)
        _, err = self.backup('incremental', expect=1)
        self.assertIn('connecting to export', err)
        self.assertEqual(list(self.bitmaps()), [res['checkpoint']])
        self.q.execute('block-export-add', {'type': 'nbd', 'id': 'live', 'node-name': 'disk',
                                            'writable': True, 'name': 'live'})
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_psk_file(psk)
        h.set_tls_username('backup')
        h.connect_uri('nbd+unix:///live?socket=' + self.nbd_sock)
        h.pwrite(b'\x42' * MiB, 7 * MiB)
        h.shutdown()
        self.q.execute('block-export-del', id='live')
        res2, _ = self.backup('incremental', *tls)
        self.assertEqual(res2['bytes-written'], MiB)
        with open(self.img_path, 'rb') as f:
            self.assertEqual(sha(self.restored(2)), sha(f.read()))

    def test_verify_finds_damage(self):
        """verify checks the image file (size, SHA-256 of its header and tables) and re-reads
        every piece: a flipped byte in the data or in the tables, a truncated image, or a
        manifest whose data does not match, is reported with exit 4."""
        self.backup('full')
        self.write_live(3 * MiB, b'\x19' * MiB)
        self.backup('incremental')
        self.tool('verify', '--repo', self.repo)
        path = os.path.join(self.repo, '0002.json')
        with open(path) as f:
            m = json.load(f)
        good = m['pieces'][0][2]
        m['pieces'][0][2] = '0' * 64
        with open(path, 'w') as f:
            json.dump(m, f)
        p = self.tool('verify', '--repo', self.repo, expect=4)
        self.assertIn('point 1: ok', p.stdout)
        self.assertIn('point 2: DAMAGED: the data at offset %d' % m['pieces'][0][0], p.stdout)
        m['pieces'][0][2] = good
        with open(path, 'w') as f:
            json.dump(m, f)
        self.tool('verify', '--repo', self.repo)
        # A flipped bit in the data, then one in the tables (the end of the file), then a
        # truncated image: each found, each undone before the next.
        img = os.path.join(self.repo, '0001.qcow2')
        size = os.path.getsize(img)
        for at, says in ((size // 2, 'DAMAGED: the data at offset'),
                         (size - 100, "DAMAGED: its image's header and tables have the SHA-256")):
            with open(img, 'r+b') as f:
                b = os.pread(f.fileno(), 1, at)
                os.pwrite(f.fileno(), bytes([b[0] ^ 0x10]), at)
                p = self.tool('verify', '--repo', self.repo, '--point', '1', expect=4)
                self.assertIn('point 1: ' + says, p.stdout)
                os.pwrite(f.fileno(), b, at)
        self.tool('verify', '--repo', self.repo)
        os.truncate(img, size - 4096)
        p = self.tool('verify', '--repo', self.repo, '--point', '1', expect=4)
        self.assertIn('point 1: DAMAGED: its image is %d bytes, the manifest says %d'
                      % (size - 4096, size), p.stdout)

    def test_large_sparse_disk_of_odd_size(self):
        """A sparse disk of 3 GiB + 12 KiB: data in several L2 tables' ranges and in the last,
        partial cluster; zeroes and a hole punched after the full. Both images pass qemu-img
        check, stay sparse, and restore to the disk."""
        size = 3 * (1 << 30) + 12 * KiB
        path = os.path.join(self.dir, 'big.img')
        with open(path, 'wb') as f:
            f.truncate(size)
            for off in (0, 700 * MiB + 4 * KiB, 1600 * MiB, size - 12 * KiB):
                os.pwrite(f.fileno(), random.Random(off).randbytes(8 * KiB), off)
        self.q.execute('blockdev-add', {'driver': 'file', 'node-name': 'big0', 'filename': path})
        self.q.execute('blockdev-add', {'driver': 'raw', 'node-name': 'big', 'file': 'big0'})
        self.q.execute('block-export-add', {'type': 'nbd', 'id': 'bigw', 'node-name': 'big',
                                            'name': 'bigw', 'writable': True})
        repo = os.path.join(self.dir, 'bigrepo')
        args = ['--qmp', self.tool_qmp, '--nbd', self.nbd_sock, '--node', 'big', '--repo', repo]
        self.tool('full', *args)
        h = nbd.NBD()
        h.connect_uri('nbd+unix:///bigw?socket=' + self.nbd_sock)
        h.zero(64 * KiB, 0)
        h.pwrite(b'\x61' * KiB, 2900 * MiB + 100)
        h.pwrite(b'\x62' * KiB, size - KiB)
        h.flush()
        h.shutdown()
        p = self.tool('incremental', *args)
        self.assertIn('%d bytes copied, 65536 zeroed' % (64 * KiB + 12 * KiB), p.stdout)
        for f in ('0001.qcow2', '0002.qcow2'):
            r = subprocess.run(['qemu-img', 'check', os.path.join(repo, f)], capture_output=True,
                               text=True)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertLess(os.path.getsize(os.path.join(repo, f)), 2 * MiB)
        out = os.path.join(self.dir, 'big-restored.img')
        self.tool('restore', '--repo', repo, '--to', out)
        subprocess.run(['qemu-img', 'compare', '-q', '-f', 'raw', '-F', 'raw', out, path], check=True)
        self.assertLess(os.stat(out).st_blocks * 512, 4 * MiB)

    def test_progress_bar_on_a_terminal(self):
        """With stderr on a terminal (a pty), --progress=auto draws the bar: phase, percent,
        bytes done and total, rate and time left, ending at 100 %; off a terminal it draws
        nothing."""
        master, slave = pty.openpty()
        args = [BACKUP, 'full', '--qmp', self.tool_qmp, '--nbd', self.nbd_sock, '--node', 'disk',
                '--repo', self.repo, '--max-rate', '24M']
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        out = b''
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the last writer closed the terminal
                break
            if not chunk:
                break
            out += chunk
        os.close(master)
        self.assertEqual(p.wait(timeout=60), 0)
        frames = [f for f in out.decode().split('\r') if f.strip()]
        bar = re.compile(r'copy \[[#-]{30}\] +(\d+\.\d)%  (\S+ \S+) / (\S+ \S+)  (\S+ \S+)/s  '
                         r'ETA (\d+:\d\d|-:--)')
        matched = [bar.match(f.strip()) for f in frames]
        matched = [m for m in matched if m]
        self.assertGreaterEqual(len(matched), 2, out)
        self.assertEqual(matched[-1].group(1), '100.0')
        self.assertEqual(matched[-1].group(2), '32.00 MiB')  # the image file holds no hole
        self.assertEqual(matched[-1].group(3), '32.00 MiB')
        self.assertLess(float(matched[0].group(1)), 100.0)
        self.assertIn('point 1: full backup', p.stdout.read())
        p.stdout.close()
        # Off a terminal: no bar at all.
        self.write_live(0, b'\x01' * KiB)
        p = self.tool('incremental', '--qmp', self.tool_qmp, '--nbd', self.nbd_sock,
                      '--node', 'disk', '--repo', self.repo)
        self.assertNotIn('copy [', p.stderr)

    def test_file_node_refused_with_a_way_out(self):
        """cbtd freezes a raw node over a file node: a file node is refused (exit 1) with the
        daemon's reason and what to do instead, and nothing is left behind."""
        nodes_before = self.node_names()
        p = self.tool('full', '--qmp', self.tool_qmp, '--nbd', self.nbd_sock, '--node', 'disk0',
                      '--repo', os.path.join(self.dir, 'repo0'), expect=1)
        self.assertIn('back up a raw node over the file node instead', p.stderr)
        self.assertIn("node 'disk0' is a 'file' node", p.stderr)
        self.assertEqual(self.bitmaps(), {})
        self.assert_server_clean(nodes_before)

    def test_prune(self):
        """prune --keep 2 of four points: the third becomes a full holding the disk as at its
        instant, the first two go, the fourth still restores, verify passes."""
        disks = []
        for i in range(4):
            if i:
                self.write_live(i * 2 * MiB, bytes([i]) * (512 * KiB))
            self.backup('full' if i == 0 else 'incremental')
            disks.append(sha(self.read_live()))
        p = self.tool('prune', '--repo', self.repo, '--keep', '2')
        self.assertIn('points 1..3 merged into point 3', p.stdout)
        self.assertEqual(sorted(f for f in os.listdir(self.repo) if f[0].isdigit()),
                         ['0003.json', '0003.qcow2', '0004.json', '0004.qcow2'])
        m = self.manifest(3)
        self.assertEqual((m['kind'], m['backing'], m['merged-from']), ('full', None, [1, 2, 3]))
        self.assertEqual(sha(self.restored(3)), disks[2])
        self.assertEqual(sha(self.restored(4)), disks[3])
        self.tool('verify', '--repo', self.repo)
        self.check_images()
        self.write_live(9 * MiB, b'\x09' * KiB)
        res, _ = self.backup('incremental')
        self.assertEqual((res['seq'], res['kind']), (5, 'incremental'))
        lst = json.loads(self.tool('list', '--repo', self.repo, '--json').stdout)
        self.assertEqual([(e['seq'], e['kind']) for e in lst],
                         [(3, 'full'), (4, 'incremental'), (5, 'incremental')])

    def test_prune_interrupted(self):
        """A prune stopped before its new image replaces the old one is undone by the next
        writer; one stopped between the image and its manifest is read right by readers and
        finished by the next writer. Each point still restores to the disk at its instant."""
        disks = []
        for i in range(4):
            if i:
                self.write_live(i * 3 * MiB, bytes([0x30 + i]) * (256 * KiB))
            self.backup('full' if i == 0 else 'incremental')
            disks.append(sha(self.read_live()))
        env = dict(os.environ, CBT_BACKUP_TEST_CRASH='prune-manifest-new')
        p = subprocess.run([BACKUP, 'prune', '--repo', self.repo, '--keep', '2'], env=env,
                           capture_output=True, text=True)
        self.assertEqual(p.returncode, 99, p.stderr)
        self.assertIn('0003.json.new', os.listdir(self.repo))
        self.assertEqual(sha(self.restored(3)), disks[2])  # readers: the old manifest holds
        self.tool('verify', '--repo', self.repo)
        p = self.tool('list', '--repo', self.repo, '--json')
        self.assertEqual([e['seq'] for e in json.loads(p.stdout)], [1, 2, 3, 4])

        env['CBT_BACKUP_TEST_CRASH'] = 'prune-image-renamed'
        p = subprocess.run([BACKUP, 'prune', '--repo', self.repo, '--keep', '2'], env=env,
                           capture_output=True, text=True)
        self.assertEqual(p.returncode, 99, p.stderr)
        self.assertIn('removing', p.stderr)  # the first run's .part
        self.assertIn('0003.json.new', os.listdir(self.repo))
        self.assertNotIn('0003.qcow2.part', os.listdir(self.repo))
        self.tool('verify', '--repo', self.repo)  # point 3 read with its new manifest
        self.assertEqual(sha(self.restored(3)), disks[2])
        self.assertEqual(sha(self.restored(4)), disks[3])
        # The next writer finishes it: point 3 is a full, the older points go at the next prune.
        p = self.tool('prune', '--repo', self.repo, '--keep', '2')
        self.assertIn('finished the prune of', p.stderr)
        self.assertEqual(sorted(f for f in os.listdir(self.repo) if f[0].isdigit()),
                         ['0003.json', '0003.qcow2', '0004.json', '0004.qcow2'])
        self.assertEqual(self.manifest(3)['kind'], 'full')
        self.tool('verify', '--repo', self.repo)
        self.check_images()
        self.assertEqual(sha(self.restored(4)), disks[3])

    def test_usage_and_exit_codes(self):
        p = subprocess.run([BACKUP], capture_output=True, text=True)
        self.assertEqual(p.returncode, 2)
        self.assertIn('usage: cbt-backup', p.stderr)
        self.tool(*self.backup_args('full', '--progress=loud'), expect=2)
        self.tool(*self.backup_args('full', '--max-rate', 'fast'), expect=2)
        _, err = self.backup('incremental', expect=3)
        self.assertIn('has no point yet', err)
        res, _ = self.backup('incremental', '--auto')
        self.assertEqual(res['kind'], 'full')
        p = self.tool('full', '--qmp', self.tool_qmp, '--nbd', self.nbd_sock, '--node', 'disk0',
                      '--repo', self.repo, expect=2)
        self.assertIn("holds backups of node 'disk', not 'disk0'", p.stderr)
        p = self.tool('restore', '--repo', self.repo, '--point', '9', '--to',
                      os.path.join(self.dir, 'x.img'), expect=2)
        self.assertIn('has no point 9', p.stderr)


class TestQsd(Base, unittest.TestCase):
    qsd = True


if __name__ == '__main__':
    cbttest.main()
