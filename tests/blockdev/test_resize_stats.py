#!/usr/bin/python3
"""block_resize, block-set-write-threshold with BLOCK_WRITE_THRESHOLD, and query-blockstats, on
cbtd and qemu-storage-daemon 7.2 side by side.

Asserted: every reply and error text of the commands equals qsd's (paths normalised), for file,
raw (plain, with an offset, with a size), null-co, read-only and host_device nodes and under
exports; a node exported (or below an export) cannot be resized, and an export added after a
resize serves the new size. Dirty bitmaps follow a grow and a shrink: the dirty extents read
through NBD qemu:dirty-bitmap equal qsd's after each step (in-memory bitmaps on a raw node and on
its file node), and persistent bitmaps (cbtd only) come back the same after a clean restart and
after SIGKILL. The threshold events of an NBD workload (writes that stay below, then cross it on
two nodes, zero-writes and trims) are qsd's, in order, and disarm the threshold. The statistics
after a known NBD workload: the member sets are qsd's at every level, `wr_highest_offset` and the
file driver's discard counters equal qsd's, and cbtd's counts (which qsd leaves at 0 for NBD I/O)
are exactly the workload's, on the node and on its export.
"""
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import unittest

import nbd

import cbttest
from cbttest import Daemon
from test_blockdev_qmp import connect, loop_attach  # this script's directory is on sys.path

KiB = 1 << 10
MiB = 1 << 20
GRAN = 64 * KiB


def normalise(reply, d):
    text = json.dumps(reply, sort_keys=True).replace(d.dir, 'DIR')
    return json.loads(re.sub(r'#block\d+', '#block', text))


def nbd_client(sock, name, contexts=()):
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.set_export_name(name)
    h.connect_unix(sock)
    return h


def dirty_extents(sock, export, bitmap):
    """[(offset, length, flags)] of qemu:dirty-bitmap:@bitmap over the whole export."""
    ctx = 'qemu:dirty-bitmap:' + bitmap
    h = nbd_client(sock, export, [ctx])
    size = h.get_size()
    out = []
    pos = 0
    while pos < size:
        got = []

        def cb(meta, off, entries, err):
            if meta == ctx:
                got.extend(entries)
            return 0
        h.block_status(size - pos, pos, cb)
        for i in range(0, len(got), 2):
            out.append((pos, got[i], got[i + 1]))
            pos += got[i]
    h.shutdown()
    # Neighbours of equal state are one run (servers may split them differently).
    merged = []
    for off, length, flags in out:
        if merged and merged[-1][2] == flags:
            merged[-1] = (merged[-1][0], merged[-1][1] + length, flags)
        else:
            merged.append((off, length, flags))
    return size, merged


def start_nbd(q, d):
    sock = d.path('nbd.sock')
    q.execute('nbd-server-start', addr={'type': 'unix', 'data': {'path': sock}})
    return sock


class Base(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='cbtd-resize-')

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def image(self, name, size, data=()):
        return cbttest.make_image(os.path.join(self.dir, name), size, data)


class TestResizeQmp(Base):
    def replies(self, qsd, steps, prepare=None):
        out = []
        with Daemon(qsd=qsd) as d:
            q = connect(d)
            img = self.image('a-%s.img' % qsd, 1 * MiB)
            self.image('b-%s.img' % qsd, 1 * MiB)
            sock = d.path('nbd.sock')
            for step in steps:
                args = json.loads(json.dumps(step[1] if len(step) > 1 else {})
                                  .replace('{img}', img).replace('{sock}', sock)
                                  .replace('{b}', os.path.join(self.dir, 'b-%s.img' % qsd)))
                if step[0] == 'nbd-size':
                    h = nbd_client(sock, args['name'])
                    out.append(('size', h.get_size()))
                    h.shutdown()
                    continue
                if step[0] == 'file-size':
                    out.append(('file', os.path.getsize(img)))
                    continue
                r = q.cmd(step[0], args)
                text = repr(normalise(r, d)).replace(img, 'IMG')
                out.append(text.replace('b-%s.img' % qsd, 'B'))
            self.assertTrue(q.execute('query-version'))
            # A resize raises no event (QEMU has none); export deletions do, at their pace.
            out.append(('events', [e['event'] for e in q.events
                                   if e['event'] != 'BLOCK_EXPORT_DELETED']))
        return out

    def compare(self, steps):
        want = self.replies(True, steps)
        got = self.replies(False, steps)
        for step, w, g in zip(steps, want, got):
            self.assertEqual(g, w, 'step %s' % json.dumps(step))
        return got

    def test_file_and_raw(self):
        got = self.compare([
            ['blockdev-add', {'driver': 'file', 'filename': '{img}', 'node-name': 'f0'}],
            ['blockdev-add', {'driver': 'raw', 'file': 'f0', 'node-name': 'r0'}],
            ['block_resize', {'node-name': 'r0', 'size': 2 * MiB}],
            ['file-size'],
            ['block_resize', {'node-name': 'r0', 'size': 2 * MiB + 100}],
            ['file-size'],
            ['query-named-block-nodes'],
            ['block_resize', {'node-name': 'f0', 'size': 512 * KiB}],
            ['file-size'],
            ['block_resize', {'device': 'r0', 'node-name': 'r0', 'size': MiB}],
            ['block_resize', {'node-name': 'r0', 'size': -1}],
            ['block_resize', {'node-name': 'nope', 'size': 1}],
            ['block_resize', {'device': 'nope', 'size': 1}],
            ['block_resize', {'size': 1}],
            ['block_resize', {'node-name': 'r0', 'size': 1 << 62}],
            ['block_resize', {'node-name': 'r0', 'size': 1 << 63}],
            ['block_resize', {'node-name': 'r0'}],
            ['blockdev-add', {'driver': 'raw', 'file': 'f0', 'offset': 4096, 'node-name': 'w0'}],
            ['block_resize', {'node-name': 'w0', 'size': 4 * MiB}],
            ['file-size'],
            ['block_resize', {'node-name': 'f0', 'size': 4 * MiB}],
            ['query-named-block-nodes'],
            ['blockdev-del', {'node-name': 'w0'}],
            ['blockdev-add', {'driver': 'raw', 'file': 'f0', 'size': 4096, 'node-name': 'w1'}],
            ['block_resize', {'node-name': 'w1', 'size': 8192}],
            ['blockdev-del', {'node-name': 'w1'}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'n0'}],
            ['block_resize', {'node-name': 'n0', 'size': 8192}],
            ['blockdev-add', {'driver': 'file', 'filename': '{b}', 'node-name': 'ro',
                              'read-only': True}],
            ['block_resize', {'node-name': 'ro', 'size': 8192}],
            ['query-named-block-nodes'],
        ])
        self.assertIn(('file', 2 * MiB), got)
        self.assertIn(('file', 4 * MiB + 4096), got)

    def test_exports_refuse_and_new_clients_see_the_new_size(self):
        got = self.compare([
            ['blockdev-add', {'driver': 'file', 'filename': '{img}', 'node-name': 'f0'}],
            ['blockdev-add', {'driver': 'raw', 'file': 'f0', 'node-name': 'r0'}],
            ['nbd-server-start', {'addr': {'type': 'unix', 'data': {'path': '{sock}'}}}],
            ['block-export-add', {'type': 'nbd', 'id': 'e0', 'node-name': 'r0',
                                  'writable': True}],
            ['nbd-size', {'name': 'r0'}],
            ['block_resize', {'node-name': 'r0', 'size': 4 * MiB}],
            ['block_resize', {'node-name': 'f0', 'size': 4 * MiB}],
            ['nbd-size', {'name': 'r0'}],
            ['block-export-del', {'id': 'e0'}],
            ['block-export-add', {'type': 'nbd', 'id': 'e1', 'node-name': 'f0'}],
            ['block_resize', {'node-name': 'r0', 'size': 4 * MiB}],
            ['block_resize', {'node-name': 'f0', 'size': 4 * MiB}],
            ['block-export-del', {'id': 'e1'}],
            ['block_resize', {'node-name': 'r0', 'size': 3 * MiB}],
            ['block-export-add', {'type': 'nbd', 'id': 'e2', 'node-name': 'r0'}],
            ['nbd-size', {'name': 'r0'}],
            ['query-named-block-nodes'],
        ])
        self.assertEqual([g for g in got if isinstance(g, tuple)],
                         [('size', MiB), ('size', MiB), ('size', 3 * MiB),
                          ('events', [])])

    def test_fleecing_nodes(self):
        """The filter's children and the snapshot cannot be resized, with qsd's texts; a
        raw node over null-co neither. qsd 7.2 resizes the filter's source through the filter
        (leaving its target and snapshot smaller); cbtd refuses that too."""
        fleece = [
            ['blockdev-add', {'driver': 'file', 'filename': '{img}', 'node-name': 'f0'}],
            ['blockdev-add', {'driver': 'file', 'filename': '{b}', 'node-name': 's0'}],
            ['blockdev-add', {'driver': 'copy-before-write', 'file': 'f0', 'target': 's0',
                              'node-name': 'cbw'}],
            ['blockdev-add', {'driver': 'snapshot-access', 'file': 'cbw', 'node-name': 'snap'}],
        ]
        self.compare(fleece + [
            ['block_resize', {'node-name': 'snap', 'size': 2 * MiB}],
            ['block_resize', {'node-name': 's0', 'size': 2 * MiB}],
            ['block_resize', {'node-name': 'f0', 'size': 2 * MiB}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'n0'}],
            ['blockdev-add', {'driver': 'raw', 'file': 'n0', 'node-name': 'rn'}],
            ['block_resize', {'node-name': 'rn', 'size': 2 * MiB}],
            ['query-named-block-nodes'],
        ])
        got = self.replies(False, fleece + [['block_resize', {'node-name': 'cbw', 'size': 2 * MiB}],
                                            ['file-size']])
        self.assertIn('Image format driver does not support resize', got[4])
        self.assertEqual(got[5], ('file', MiB))

    def test_host_device(self):
        backing = self.image('dev.img', 4 * MiB)
        dev = loop_attach(backing)
        if dev is None:
            self.skipTest('no usable loop device (/dev/loop-control and losetup needed)')
        try:
            steps = [
                ['blockdev-add', {'driver': 'host_device', 'filename': dev, 'node-name': 'h0'}],
                ['block_resize', {'node-name': 'h0', 'size': 8 * MiB}],
                ['block_resize', {'node-name': 'h0', 'size': 2 * MiB}],
                ['block_resize', {'node-name': 'h0', 'size': 4 * MiB}],
                ['query-named-block-nodes'],
            ]
            got = self.compare(steps)
            self.assertIn('Cannot grow device files', got[1])
            self.assertIn("'virtual-size': 4194304", got[4])
        finally:
            subprocess.run(['losetup', '-d', dev], check=False)


class TestResizeBitmaps(Base):
    """In-memory bitmaps on a raw node and its file node across grow and shrink, read through
    qemu:dirty-bitmap, the same on both daemons."""

    def session(self, qsd):
        img = self.image('bm-%s.img' % qsd, 4 * MiB)
        maps = []
        with Daemon(qsd=qsd) as d:
            q = connect(d)
            sock = start_nbd(q, d)
            q.execute('blockdev-add', {'driver': 'file', 'filename': img, 'node-name': 'f0'})
            q.execute('blockdev-add', {'driver': 'raw', 'file': 'f0', 'node-name': 'r0'})
            q.execute('block-dirty-bitmap-add', {'node': 'r0', 'name': 'b0', 'granularity': GRAN})
            q.execute('block-dirty-bitmap-add', {'node': 'f0', 'name': 'b1', 'granularity': GRAN})

            def export_and(fn):
                q.execute('block-export-add', type='nbd', id='e', node_name='r0',
                          writable=True, bitmaps=['b0'])
                h = nbd_client(sock, 'r0')
                fn(h)
                h.shutdown()
                b0 = dirty_extents(sock, 'r0', 'b0')
                q.execute('block-export-del', id='e')
                cbttest.wait_for(lambda: not q.execute('query-block-exports'))
                maps.append((b0, self.file_map(q, sock)))

            def first(h):
                h.pwrite(b'\x01' * 4096, 4096)                  # chunk 0
                h.pwrite(b'\x02' * 4096, 4 * MiB - 4096)        # the last chunk
                h.zero(GRAN, 2 * MiB)                           # one more chunk
            export_and(first)
            self.assertEqual(q.execute('block_resize', node_name='r0', size=6 * MiB + 512 * 3), {})

            def second(h):
                h.pwrite(b'\x03' * 512, 5 * MiB)                # in the new area
            export_and(second)
            self.assertEqual(q.execute('block_resize', node_name='r0', size=3 * MiB + 4096), {})
            export_and(lambda h: None)
            self.assertEqual(q.execute('block_resize', node_name='r0', size=5 * MiB), {})
            export_and(lambda h: h.pwrite(b'\x04' * 512, 5 * MiB - 512))
            counts = sorted((n['node-name'], b['name'], b['count'])
                            for n in q.execute('query-named-block-nodes')
                            for b in n.get('dirty-bitmaps', []))
        return maps, counts

    def file_map(self, q, sock):
        q.execute('block-export-add', {'type': 'nbd', 'id': 'fx', 'node-name': 'f0',
                                       'name': 'f0', 'writable': True, 'bitmaps': ['b1']})
        m = dirty_extents(sock, 'f0', 'b1')
        q.execute('block-export-del', id='fx')
        cbttest.wait_for(lambda: not q.execute('query-block-exports'))
        return m

    def test_grow_and_shrink(self):
        want = self.session(True)
        got = self.session(False)
        self.assertEqual(got, want)
        maps, counts = got
        old = [(0, GRAN, 1), (2 * MiB, GRAN, 1), (4 * MiB - GRAN, GRAN, 1)]
        for (size, b0), (fsize, b1) in maps:
            self.assertEqual(fsize, size)
            self.assertEqual(b1, b0)  # the file node's bitmap saw the same writes
        # Grown: the old bits, the new area clean; the write there marked only its chunk.
        (size, b0), _ = maps[0]
        self.assertEqual((size, [e for e in b0 if e[2]]), (4 * MiB, old))
        (size, b0), _ = maps[1]
        self.assertEqual(size, 6 * MiB + 1536)
        self.assertEqual([e for e in b0 if e[2]], old + [(5 * MiB, GRAN, 1)])
        # Shrunk: what lay past the end is gone, and stays gone when it grows again.
        (size, b0), _ = maps[2]
        self.assertEqual((size, [e for e in b0 if e[2]]), (3 * MiB + 4096, old[:2]))
        (size, b0), _ = maps[3]
        self.assertEqual((size, [e for e in b0 if e[2]]),
                         (5 * MiB, old[:2] + [(5 * MiB - GRAN, GRAN, 1)]))
        self.assertEqual(counts, [('f0', 'b1', 3 * GRAN), ('r0', 'b0', 3 * GRAN)])


class TestResizePersistent(Base):
    """Persistent bitmaps (cbtd only): the store follows a resize, across restarts and a
    SIGKILL."""

    def start(self, img):
        d = Daemon()
        q = connect(d)
        q.execute('blockdev-add', {'driver': 'file', 'filename': img, 'node-name': 'f0'})
        q.execute('blockdev-add', {'driver': 'raw', 'file': 'f0', 'node-name': 'r0'})
        return d, q

    def dirty(self, d, q, writes=()):
        sock = start_nbd(q, d)
        q.execute('block-export-add', type='nbd', id='e', node_name='r0', writable=True,
                  bitmaps=['p0', 'm0'] if any(b['name'] == 'm0' for b in self.bitmaps(q)) else
                  ['p0'])
        h = nbd_client(sock, 'r0')
        for off, length in writes:
            h.pwrite(b'\x07' * length, off)
        h.shutdown()
        got = dirty_extents(sock, 'r0', 'p0')
        q.execute('block-export-del', id='e')
        cbttest.wait_for(lambda: not q.execute('query-block-exports'))
        q.execute('nbd-server-stop')
        return got

    @staticmethod
    def bitmaps(q):
        return [b for n in q.execute('query-named-block-nodes') if n['node-name'] == 'r0'
                for b in n.get('dirty-bitmaps', [])]

    def test_grow_shrink_restart(self):
        img = self.image('p.img', 4 * MiB)
        d, q = self.start(img)
        try:
            q.execute('block-dirty-bitmap-add', {'node': 'r0', 'name': 'p0', 'granularity': GRAN,
                                                 'persistent': True})
            before = self.dirty(d, q, [(0, 512), (4 * MiB - 512, 512)])
            self.assertEqual(q.execute('block_resize', node_name='r0', size=8 * MiB), {})
            grown = self.dirty(d, q, [(6 * MiB, 512)])
            self.assertEqual(grown[0], 8 * MiB)
            self.assertEqual([e for e in grown[1] if e[2]],
                             [e for e in before[1] if e[2]] + [(6 * MiB, GRAN, 1)])
        finally:
            d.stop()
        d, q = self.start(img)
        try:
            self.assertEqual(self.dirty(d, q), grown)
            self.assertEqual(q.execute('block_resize', node_name='r0', size=2 * MiB), {})
            shrunk = self.dirty(d, q, [(MiB, 512)])
            self.assertEqual([e for e in shrunk[1] if e[2]],
                             [(0, GRAN, 1), (MiB, GRAN, 1)])
            self.assertEqual(q.execute('block_resize', node_name='r0', size=3 * MiB), {})
            regrown = self.dirty(d, q)
            d.proc.kill()  # no clean stop: the store must already hold the resize
            d.proc.wait()
        finally:
            d.stop()
        d, q = self.start(img)
        try:
            self.assertEqual(self.dirty(d, q), regrown)
            self.assertEqual(regrown[0], 3 * MiB)
            self.assertEqual([e for e in regrown[1] if e[2]], [(0, GRAN, 1), (MiB, GRAN, 1)])
            self.assertEqual(self.bitmaps(q)[0]['count'], 2 * GRAN)
        finally:
            d.stop()


class TestWriteThreshold(Base):
    def session(self, qsd):
        img = self.image('t-%s.img' % qsd, 4 * MiB)
        with Daemon(qsd=qsd) as d:
            q = connect(d)
            sock = start_nbd(q, d)
            out = []
            q.execute('blockdev-add', {'driver': 'file', 'filename': img, 'node-name': 'f0',
                                       'discard': 'unmap'})
            q.execute('blockdev-add', {'driver': 'raw', 'file': 'f0', 'node-name': 'r0',
                                       'discard': 'unmap'})
            for args in ({'node-name': 'nope', 'write-threshold': 1},
                         {'node-name': 'r0', 'write-threshold': MiB},
                         {'node-name': 'f0', 'write-threshold': 2 * MiB}):
                out.append(q.cmd('block-set-write-threshold', args))
            q.execute('block-export-add', type='nbd', id='e', node_name='r0', writable=True)
            h = nbd_client(sock, 'r0')

            def events():
                h.flush()
                q.execute('query-version')
                # An event raised on an I/O thread may still be on its way: listen a while.
                q.sock.settimeout(0.3)
                try:
                    while True:
                        msg = q.recv()
                        if msg is None:
                            break
                        q.events.append(msg)
                except OSError:
                    pass
                q.sock.settimeout(10)
                got = [(e['event'], e['data']) for e in q.events]
                q.events.clear()
                return got
            h.pwrite(b'\x01' * 4096, MiB - 4096)     # ends at the threshold: no event
            h.zero(MiB, 0)                            # below too
            out.append(events())
            h.pwrite(b'\x02' * 512, MiB)             # r0 crosses by 512
            h.pwrite(b'\x02' * 512, MiB + 4096)      # disarmed: no second event
            out.append(events())
            out.append(sorted((n['node-name'], n['write_threshold'])
                              for n in q.execute('query-named-block-nodes')))
            h.zero(8192, 2 * MiB - 4096)             # f0 crosses by 4096 with a zero-write
            out.append(events())
            q.execute('block-set-write-threshold', node_name='r0', write_threshold=3 * MiB)
            q.execute('block-set-write-threshold', node_name='f0', write_threshold=3 * MiB)
            q.execute('block-set-write-threshold', node_name='f0', write_threshold=0)
            h.trim(MiB, 3 * MiB - 4096)              # a discard crosses r0's; f0's is off
            out.append(events())
            out.append(sorted((n['node-name'], n['write_threshold'])
                              for n in q.execute('query-named-block-nodes')))
            h.shutdown()
        return out

    def test_events_as_qsd(self):
        want = self.session(True)
        got = self.session(False)
        self.assertEqual(got, want)
        self.assertEqual(got[3], [])
        self.assertEqual(got[4], [('BLOCK_WRITE_THRESHOLD', {
            'node-name': 'r0', 'amount-exceeded': 512, 'write-threshold': MiB})])
        self.assertEqual(got[5], [('f0', 2 * MiB), ('r0', 0)])
        self.assertEqual(got[6], [('BLOCK_WRITE_THRESHOLD', {
            'node-name': 'f0', 'amount-exceeded': 4096, 'write-threshold': 2 * MiB})])
        self.assertEqual(len(got[7]), 1)
        self.assertEqual(got[8], [('f0', 0), ('r0', 0)])


COUNTED = ('rd_bytes', 'wr_bytes', 'unmap_bytes', 'rd_operations', 'wr_operations',
           'flush_operations', 'unmap_operations', 'rd_total_time_ns', 'wr_total_time_ns',
           'flush_total_time_ns', 'unmap_total_time_ns', 'invalid_rd_operations',
           'invalid_wr_operations', 'invalid_flush_operations', 'invalid_unmap_operations',
           'failed_rd_operations', 'failed_wr_operations', 'failed_flush_operations',
           'failed_unmap_operations')


def shape(v):
    """Member names at every level, values gone (what must be qsd's exactly)."""
    if isinstance(v, dict):
        return {k: shape(x) for k, x in v.items()}
    if isinstance(v, list):
        return [shape(x) for x in v]
    return type(v).__name__


class TestBlockstats(Base):
    def session(self, qsd):
        img = self.image('s-%s.img' % qsd, 4 * MiB, [(0, b'\x05' * MiB)])
        with Daemon(qsd=qsd) as d:
            q = connect(d)
            sock = start_nbd(q, d)
            q.execute('blockdev-add', {'driver': 'file', 'filename': img, 'node-name': 'f0',
                                       'discard': 'unmap'})
            q.execute('blockdev-add', {'driver': 'raw', 'file': 'f0', 'node-name': 'r0',
                                       'discard': 'unmap'})
            empty = q.execute('query-blockstats', query_nodes=True)
            q.execute('block-export-add', type='nbd', id='e0', node_name='r0', writable=True)
            h = nbd_client(sock, 'r0')
            h.set_strict_mode(0)
            for i in range(5):
                h.pread(4096, i * 65536)                 # 5 reads, 20 KiB
            h.pread(MiB, 0)                              # one long read
            for i in range(3):
                h.pwrite(b'\x09' * 8192, MiB + i * 8192)  # 3 writes, 24 KiB
            h.zero(65536, 2 * MiB)                       # a zero-write, 64 KiB
            h.flush()
            after_zero = q.execute('query-blockstats', query_nodes=True)
            h.pwrite(b'\x0a' * 4096, 3 * MiB - 4096)    # the highest write: data
            h.trim(131072, 3 * MiB)                      # 2 trims, 192 KiB
            h.trim(65536, 3 * MiB + 131072)
            h.flush()
            for kind in ('pread', 'pwrite', 'trim'):    # past the end: invalid
                try:
                    if kind == 'pread':
                        h.pread(4096, 4 * MiB)
                    elif kind == 'pwrite':
                        h.pwrite(b'x' * 4096, 4 * MiB)
                    else:
                        h.trim(4096, 4 * MiB)
                except nbd.Error:
                    pass
            h.shutdown()
            all_nodes = q.execute('query-blockstats', query_nodes=True)
            devices = q.execute('query-blockstats')
            explicit = q.execute('query-blockstats', query_nodes=False)
        return empty, all_nodes, devices, explicit, after_zero

    def test_counts_after_a_workload(self):
        want = self.session(True)
        got = self.session(False)
        self.assertEqual(got[0], want[0])          # no I/O yet: identical
        self.assertEqual(got[2], want[2])
        self.assertEqual(got[2], [])
        self.assertEqual(got[3], [])
        nodes = {s['node-name']: s for s in got[1]}
        ref = {s['node-name']: s for s in want[1]}
        r0 = nodes['r0']
        exports = r0.pop('exports')
        self.assertEqual([e['id'] for e in exports], ['e0'])
        # Where qsd counts 0 for NBD I/O, cbtd counts; the shape is qsd's, with idle_time_ns.
        stats = r0['stats']
        self.assertGreater(stats.pop('idle_time_ns'), 0)
        self.assertEqual(shape(r0), shape(ref['r0']))
        self.assertEqual(shape(nodes['f0']), shape(ref['f0']))
        expect = {'rd_operations': 6, 'rd_bytes': 5 * 4096 + MiB,
                  'wr_operations': 5, 'wr_bytes': 3 * 8192 + 65536 + 4096,
                  'unmap_operations': 2, 'unmap_bytes': 196608,
                  'flush_operations': 2,
                  'invalid_rd_operations': 1, 'invalid_wr_operations': 1,
                  'invalid_unmap_operations': 1, 'invalid_flush_operations': 0,
                  'failed_rd_operations': 0, 'failed_wr_operations': 0,
                  'failed_flush_operations': 0, 'failed_unmap_operations': 0}
        for k, v in expect.items():
            self.assertEqual(stats[k], v, k)
        for k in ('rd_total_time_ns', 'wr_total_time_ns', 'unmap_total_time_ns',
                  'flush_total_time_ns'):
            self.assertGreater(stats[k], 0, k)
        # The export's own block counts the same requests.
        e = dict(exports[0]['stats'])
        self.assertGreater(e.pop('idle_time_ns'), 0)
        for k in COUNTED:
            self.assertEqual(e[k], stats[k], k)
        # What qsd counts too is equal: the highest write offset on both nodes, the file
        # driver's discards; everything else qsd reports is 0 and so is cbtd's below r0.
        for name in ('r0', 'f0'):
            for where in (nodes[name], nodes['r0']['parent'] if name == 'f0' else nodes[name]):
                self.assertEqual(where['stats']['wr_highest_offset'],
                                 ref[name]['stats']['wr_highest_offset'])
        self.assertEqual(ref['r0']['stats']['wr_highest_offset'], 3 * MiB)
        highest = [[s['stats']['wr_highest_offset'] for s in r[4]] for r in (got, want)]
        self.assertEqual(highest[0], highest[1])
        self.assertEqual(highest[0], [2 * MiB + 65536] * 2)
        self.assertEqual(nodes['f0']['driver-specific'], ref['f0']['driver-specific'])
        self.assertEqual(nodes['f0']['driver-specific']['discard-nb-ok'], 2)
        self.assertEqual(nodes['f0']['driver-specific']['discard-bytes-ok'], 196608)
        stats.update({k: 0 for k in COUNTED})
        self.assertEqual(r0, ref['r0'])
        self.assertEqual(nodes['f0'], ref['f0'])



class TestConcurrentCounting(Base):
    """cbtd only: counters without a lock stay exact under writers on several connections (and
    their worker threads), and a threshold they all cross fires once."""

    def test_many_writers(self):
        img = self.image('c.img', 64 * MiB)
        with Daemon() as d:
            q = connect(d)
            sock = start_nbd(q, d)
            q.execute('blockdev-add', {'driver': 'file', 'filename': img, 'node-name': 'f0'})
            q.execute('blockdev-add', {'driver': 'raw', 'file': 'f0', 'node-name': 'r0'})
            q.execute('block-set-write-threshold', node_name='r0', write_threshold=MiB)
            q.execute('block-export-add', type='nbd', id='e0', node_name='r0', writable=True)
            q.execute('block-export-add', {'type': 'nbd', 'id': 'e1', 'node-name': 'r0',
                                           'name': 'other', 'writable': True})
            per, conns = 400, 4
            errors = []

            def writer(n):
                try:
                    h = nbd_client(sock, 'r0' if n % 2 == 0 else 'other')
                    done = []
                    for i in range(per):
                        off = (n * per + i) * 8192 + 2 * MiB
                        # Several in flight at once, so the workers run them in parallel.
                        done.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(4096)),
                                                 off))
                        if len(done) >= 16:
                            while h.aio_in_flight() > 0:
                                h.poll(-1)
                            done.clear()
                    while h.aio_in_flight() > 0:
                        h.poll(-1)
                    h.shutdown()
                except Exception as e:  # reported below
                    errors.append(e)
            threads = [threading.Thread(target=writer, args=(n,)) for n in range(conns)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.assertEqual(errors, [])
            ev = q.wait_event('BLOCK_WRITE_THRESHOLD')
            self.assertEqual(ev['data']['write-threshold'], MiB)
            q.execute('query-version')
            q.sock.settimeout(0.5)
            with self.assertRaises(OSError):  # no second event
                while True:
                    msg = q.recv()
                    if msg and msg.get('event') == 'BLOCK_WRITE_THRESHOLD':
                        raise AssertionError('a second threshold event: %r' % msg)
            q.sock.settimeout(10)
            stats = {s['node-name']: s for s in q.execute('query-blockstats', query_nodes=True)}
            r0 = stats['r0']
            self.assertEqual(r0['stats']['wr_operations'], per * conns)
            self.assertEqual(r0['stats']['wr_bytes'], per * conns * 4096)
            by_id = {e['id']: e['stats'] for e in r0['exports']}
            self.assertEqual(sorted(by_id), ['e0', 'e1'])
            for eid in ('e0', 'e1'):
                self.assertEqual(by_id[eid]['wr_operations'], per * conns // 2)
            self.assertEqual(r0['stats']['wr_highest_offset'],
                             ((conns - 1) * per + per - 1) * 8192 + 2 * MiB + 4096)
            self.assertNotIn('exports', stats['f0'])

if __name__ == '__main__':
    cbttest.main()
