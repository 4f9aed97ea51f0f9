#!/usr/bin/python3
"""Fleecing the QEMU way, on cbtd and qemu-storage-daemon 7.2 side by side: a file source, a
scratch file with a raw node, copy-before-write over the source's file node, snapshot-access
over the filter, a writable NBD export of the filter and a read-only export of the snapshot.
A writer then overwrites, zeroes and trims the disk through the writable export while a reader
checks every byte it reads from the snapshot export against the image as it was.

Asserted for both daemons: every snapshot read (on 7.2 only reads inside one cluster: see
read_snapshot_while_writing) and the whole snapshot afterwards equal the
frozen image; the live disk equals the writes applied to it; the replies and error texts of
every QMP command used are equal (query-named-block-nodes included, before and after the
writes, with paths and generated names normalised); the snapshot's `nbdinfo --map` before the
writes is equal. After the writes cbtd's snapshot map is still the frozen one, while 7.2
answers block status of a request that starts in a copied cluster from the live disk (a bug
fixed in QEMU 8.0), so that map is compared with the frozen one for cbtd only. A writer that
would bypass the filter (an export of the source or of a format node over it) is refused
with QEMU's permission-conflict texts on both. Where 7.2
asserts and dies (a target smaller than the source, an unaligned discard of the snapshot),
cbtd's refusals are checked on cbtd alone.
"""
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import threading
import unittest

import nbd

import cbttest
from cbttest import Daemon
from test_blockdev_qmp import connect  # this script's directory is on sys.path

KiB = 1 << 10
MiB = 1 << 20
SIZE = 8 * MiB
CLUSTER = 64 * KiB


def frozen_image():
    """The source's content: data in about half of the 64 KiB blocks (some blocks only
    partly), holes elsewhere."""
    rnd = random.Random(11)
    img = bytearray(SIZE)
    for off in range(0, SIZE, CLUSTER):
        kind = rnd.randrange(3)
        if kind == 1:
            img[off:off + CLUSTER] = bytes([rnd.randrange(1, 256)]) * CLUSTER
        elif kind == 2:
            start = rnd.randrange(0, CLUSTER // 4096) * 4096
            img[off + start:off + start + 4096] = b'\x5a' * 4096
    return bytes(img)


def write_image(path, img):
    with open(path, 'wb') as f:
        f.truncate(len(img))
        for off in range(0, len(img), 4096):
            block = img[off:off + 4096]
            if block.count(0) != len(block):
                f.seek(off)
                f.write(block)
        f.flush()
        os.fsync(f.fileno())


def writer_ops(seed=5, n=300):
    """The same writes, zero-writes and trims for both daemons, most of them unaligned."""
    rnd = random.Random(seed)
    ops = []
    for _ in range(n):
        length = rnd.choice([512, 4096, 5000, CLUSTER, 3 * CLUSTER + 77])
        off = rnd.randrange(0, SIZE - length)
        ops.append((rnd.choice(['write', 'write', 'zero', 'trim']), off, length,
                    rnd.randrange(1, 256)))
    return ops


def apply_ops(img, ops):
    live = bytearray(img)
    for kind, off, length, byte in ops:
        live[off:off + length] = (bytes([byte]) if kind == 'write' else b'\0') * length
    return bytes(live)


def nbd_map(uri):
    out = subprocess.run(['nbdinfo', '--map', uri], capture_output=True, text=True, check=True)
    return out.stdout


class Session:
    """One daemon running the choreography; records every QMP reply in @log."""

    def __init__(self, d, img_path, scratch_path):
        self.d = d
        self.q = connect(d)
        self.log = []
        self.paths = {img_path: 'SRC', scratch_path: 'SCRATCH', d.dir: 'DIR'}

    @staticmethod
    def scratch_unsized(reply):
        # 7.2 writes the zeroes of a copied cluster to the scratch; cbtd records them and leaves
        # the scratch sparse, so the scratch's allocated size differs (nothing else does).
        for node in reply.get('return', []) if isinstance(reply.get('return'), list) else []:
            image = node.get('image', {})
            if image.get('filename', '').startswith('SCRATCH'):
                image['actual-size'] = 'scratch'

    def normalise(self, reply):
        text = json.dumps(cbttest.without_identity(reply))
        for path, name in self.paths.items():
            text = text.replace(path, name)
        reply = json.loads(re.sub(r'#block\d+', '#block', text))
        self.scratch_unsized(reply)
        return json.dumps(reply, indent=1)

    def cmd(self, command, **args):
        name = command
        reply = self.q.cmd(name, {k.replace('_', '-'): v for k, v in args.items()})
        self.log.append((name, self.normalise(reply)))
        return reply

    def ok(self, command, **args):
        name = command
        reply = self.cmd(name, **args)
        if 'return' not in reply:
            raise AssertionError('%s: %r' % (name, reply))
        return reply['return']


class TestFleecing(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='cbtd-fleecing-')
        self.img = frozen_image()
        self.ops = writer_ops()

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def build_graph(self, s, src, scratch):
        s.ok('blockdev-add', driver='file', node_name='src', filename=src, discard='unmap')
        s.ok('blockdev-add', driver='file', node_name='scrf', filename=scratch)
        s.ok('blockdev-add', driver='raw', node_name='scr', file='scrf', discard='unmap')
        # Refusals that 7.2 answers (rather than asserting), before the real filter.
        s.cmd('blockdev-add', driver='copy-before-write', node_name='bad', file='src',
              target='nope')
        s.cmd('blockdev-add', driver='copy-before-write', node_name='bad', file='src',
              target='scr', bitmap={'node': 'nonode', 'name': 'b'})
        s.cmd('blockdev-add', driver='copy-before-write', node_name='bad', file='src',
              target='scr', bitmap={'node': 'src', 'name': 'nobitmap'})
        s.ok('blockdev-add', driver='copy-before-write', node_name='cbw', file='src',
             target='scr', discard='unmap')
        s.ok('blockdev-add', driver='snapshot-access', node_name='snap', file='cbw')
        sock = s.d.path('nbd.sock')
        s.ok('nbd-server-start', addr={'type': 'unix', 'data': {'path': sock}})
        s.ok('block-export-add', type='nbd', id='live', node_name='cbw', name='live',
             writable=True)
        s.ok('block-export-add', type='nbd', id='snap', node_name='snap')
        return sock

    def read_snapshot_while_writing(self, sock, live_h, spanning):
        """Run the writer on @live_h; meanwhile read the snapshot in random pieces, each
        checked against the frozen image. With @spanning the pieces are unaligned and many run
        across clusters; without, each lies inside one cluster (7.2 serves a read that starts
        in a copied cluster and runs past it from the live disk: a bug fixed in QEMU 8.0).
        Returns the number of reads."""
        errors, reads, done = [], [0], threading.Event()

        def reader():
            h = nbd.NBD()
            h.connect_uri('nbd+unix:///snap?socket=' + sock)
            rnd = random.Random(7)
            try:
                while not done.is_set() or reads[0] < 50:
                    if spanning:
                        length = rnd.choice([4096, 100000, 3 * CLUSTER])
                        off = rnd.randrange(0, SIZE - length)
                    else:
                        length = rnd.choice([4096, CLUSTER])
                        off = rnd.randrange(0, SIZE // length) * length
                    if h.pread(length, off) != self.img[off:off + length]:
                        errors.append((off, length))
                    reads[0] += 1
            except Exception as e:  # reported in the main thread
                errors.append(e)
            finally:
                h.shutdown()
                del h

        t = threading.Thread(target=reader)
        t.start()
        try:
            for kind, off, length, byte in self.ops:
                if kind == 'write':
                    live_h.pwrite(bytes([byte]) * length, off)
                elif kind == 'zero':
                    live_h.zero(length, off)
                else:
                    live_h.trim(length, off)
        finally:
            done.set()
            t.join()
        self.assertEqual(errors, [])
        self.assertGreaterEqual(reads[0], 50)
        return reads[0]

    def teardown_graph(self, s):
        # Everything in use is refused, with QEMU's texts, then torn down in reverse.
        for node in ('snap', 'cbw', 'scr', 'src'):
            s.cmd('blockdev-del', node_name=node)
        s.ok('block-export-del', id='snap')
        s.ok('block-export-del', id='live')
        cbttest.wait_for(lambda: s.q.execute('query-block-exports') == [], what='exports gone')
        for node in ('snap', 'cbw', 'scr', 'scrf', 'src'):
            s.ok('blockdev-del', node_name=node)
        s.ok('query-named-block-nodes')

    def run_session(self, qsd):
        kind = 'qsd' if qsd else 'cbtd'
        src = os.path.join(self.dir, 'src-' + kind)
        scratch = os.path.join(self.dir, 'scratch-' + kind)
        write_image(src, self.img)
        cbttest.make_image(scratch, SIZE)
        out = {}
        with Daemon(qsd=qsd) as d:
            s = Session(d, src, scratch)
            sock = self.build_graph(s, src, scratch)
            s.ok('query-named-block-nodes')
            snap_uri = 'nbd+unix:///snap?socket=' + sock
            out['map-before'] = nbd_map(snap_uri)
            h = nbd.NBD()
            h.connect_uri('nbd+unix:///live?socket=' + sock)
            out['reads'] = self.read_snapshot_while_writing(sock, h, spanning=not qsd)
            out['live'] = hashlib.sha256(h.pread(SIZE, 0)).hexdigest()
            h.shutdown()
            del h
            r = nbd.NBD()
            r.connect_uri(snap_uri)
            # In one request on cbtd; a cluster at a time on 7.2 (its bug, as above).
            if qsd:
                data = b''.join(r.pread(CLUSTER, off) for off in range(0, SIZE, CLUSTER))
            else:
                data = r.pread(SIZE, 0)
            out['snapshot'] = hashlib.sha256(data).hexdigest()
            r.shutdown()
            del r
            out['map-after'] = nbd_map(snap_uri)
            s.ok('query-named-block-nodes')
            self.teardown_graph(s)
            out['log'] = s.log
        return out

    def test_choreography(self):
        ref = self.run_session(qsd=True)
        got = self.run_session(qsd=False)
        frozen = hashlib.sha256(self.img).hexdigest()
        live = hashlib.sha256(apply_ops(self.img, self.ops)).hexdigest()
        for name, out in (('qsd', ref), ('cbtd', got)):
            self.assertEqual(out['snapshot'], frozen, name)
            self.assertEqual(out['live'], live, name)
        self.assertEqual([c for c, _ in got['log']], [c for c, _ in ref['log']])
        for (cmd, mine), (_, theirs) in zip(got['log'], ref['log']):
            self.assertEqual(mine, theirs, cmd)
        self.assertEqual(got['map-before'], ref['map-before'])
        # The frozen view's map does not move under the writer on cbtd (see the docstring).
        self.assertEqual(got['map-after'], got['map-before'])
        self.assertIn('hole', got['map-before'])
        self.assertIn('data', got['map-before'])


class TestReopen(unittest.TestCase):
    """The QEMU way as management layers script it on 7.2: the disk's raw node is exported
    writable first; the filter goes in under it with blockdev-reopen (the freeze) and comes out
    again the same way. Same replies and error texts on both daemons (the refusals 7.2 answers
    rather than asserting on), the snapshot equals the source at the freeze while a writer
    overwrites the disk, and the disk has every write."""

    def setUp(self):
        self.img = frozen_image()
        self.ops = writer_ops(seed=6, n=200)

    def reopen(self, s, node, file, **extra):
        entry = dict(driver='raw', node_name=node, file=file, discard='unmap', **extra)
        return s.cmd('blockdev-reopen',
                     options=[{k.replace('_', '-'): v for k, v in entry.items()}])

    def refusals(self, s):
        s.cmd('blockdev-reopen', options=[{'driver': 'raw', 'file': 'cbw', 'discard': 'unmap'}])
        s.cmd('blockdev-reopen', options=[{'driver': 'raw', 'node-name': 'nope', 'file': 'cbw',
                                           'discard': 'unmap'}])
        s.cmd('blockdev-reopen', options=[{'driver': 'null-co', 'node-name': 'fmt'}])
        s.cmd('blockdev-reopen', options=[{'driver': 'raw', 'node-name': 'fmt', 'discard': 'unmap'}])
        self.reopen(s, 'fmt', 'nonode')
        self.reopen(s, 'fmt', 'fmt')
        self.reopen(s, 'fmt', 'cbw', force_share=True, read_only=True)
        self.reopen(s, 'scr', 'cbw')
        self.reopen(s, 'fmt', {'driver': 'null-co'})
        s.cmd('blockdev-reopen', options=[
            {'driver': 'raw', 'node-name': 'fmt', 'file': 'cbw', 'discard': 'unmap'},
            {'driver': 'raw', 'node-name': 'scr', 'file': 'nonode', 'discard': 'unmap'}])

    def session(self, qsd):
        with Daemon(qsd=qsd) as d:
            src, scratch = d.path('src'), d.path('scratch')
            write_image(src, self.img)
            cbttest.make_image(scratch, SIZE)
            s = Session(d, src, scratch)
            sock = d.path('nbd.sock')
            s.ok('blockdev-add', driver='file', node_name='src', filename=src, discard='unmap')
            s.ok('blockdev-add', driver='raw', node_name='fmt', file='src', discard='unmap')
            s.ok('nbd-server-start', addr={'type': 'unix', 'data': {'path': sock}})
            s.ok('block-export-add', type='nbd', id='live', node_name='fmt', name='live',
                 writable=True)
            s.ok('blockdev-add', driver='file', node_name='scrf', filename=scratch)
            s.ok('blockdev-add', driver='raw', node_name='scr', file='scrf', discard='unmap')
            s.ok('blockdev-add', driver='copy-before-write', node_name='cbw', file='src',
                 target='scr', discard='unmap')
            self.refusals(s)
            s.ok('query-named-block-nodes')
            # The freeze: the writer is paused (no request in flight) while it runs.
            s.ok('blockdev-reopen', options=[{'driver': 'raw', 'node-name': 'fmt',
                                              'file': 'cbw', 'discard': 'unmap'}])
            s.ok('blockdev-add', driver='snapshot-access', node_name='snap', file='cbw')
            s.ok('block-export-add', type='nbd', id='snap', node_name='snap')
            s.ok('query-named-block-nodes')
            live = nbd.NBD()
            live.connect_uri('nbd+unix:///live?socket=' + sock)
            TestFleecing.read_snapshot_while_writing(self, sock, live, spanning=False)
            out = {'live': hashlib.sha256(live.pread(SIZE, 0)).hexdigest()}
            snap = nbd.NBD()
            snap.connect_uri('nbd+unix:///snap?socket=' + sock)
            out['snapshot'] = hashlib.sha256(b''.join(
                snap.pread(CLUSTER, off) for off in range(0, SIZE, CLUSTER))).hexdigest()
            snap.shutdown()
            del snap
            # While the snapshot is used the filter unshares write on src: no way back yet.
            self.reopen(s, 'fmt', 'src')
            s.ok('block-export-del', id='snap')
            cbttest.wait_for(lambda: len(s.q.execute('query-block-exports')) == 1,
                             what='snapshot export gone')
            s.ok('blockdev-del', node_name='snap')
            s.ok('blockdev-reopen', options=[{'driver': 'raw', 'node-name': 'fmt',
                                              'file': 'src', 'discard': 'unmap'}])
            s.ok('query-named-block-nodes')
            live.pwrite(b'\x99' * 4096, 0)  # the disk is written directly again
            out['first-block'] = hashlib.sha256(live.pread(4096, 0)).hexdigest()
            live.shutdown()
            del live
            for node in ('cbw', 'scr', 'scrf'):
                s.ok('blockdev-del', node_name=node)
            s.cmd('blockdev-del', node_name='fmt')
            s.ok('block-export-del', id='live')
            cbttest.wait_for(lambda: s.q.execute('query-block-exports') == [],
                             what='exports gone')
            s.ok('blockdev-del', node_name='fmt')
            s.ok('blockdev-del', node_name='src')
            s.ok('query-named-block-nodes')
            out['log'] = s.log
            return out

    def test_reopen_choreography(self):
        ref = self.session(qsd=True)
        got = self.session(qsd=False)
        for name, out in (('qsd', ref), ('cbtd', got)):
            self.assertEqual(out['snapshot'], hashlib.sha256(self.img).hexdigest(), name)
            self.assertEqual(out['live'],
                             hashlib.sha256(apply_ops(self.img, self.ops)).hexdigest(), name)
            self.assertEqual(out['first-block'], hashlib.sha256(b'\x99' * 4096).hexdigest())
        self.assertEqual([c for c, _ in got['log']], [c for c, _ in ref['log']])
        for (cmd, mine), (_, theirs) in zip(got['log'], ref['log']):
            self.assertEqual(mine, theirs, cmd)
        errors = [r for c, r in got['log'] if c == 'blockdev-reopen' and '"error"' in r]
        self.assertEqual(len(errors), 11)


class TestBitmapsAtTheFreeze(unittest.TestCase):
    """The QEMU 7.2 way with bitmaps, as a management layer scripts an incremental backup: a
    transaction starts the next checkpoint c3 and freezes a copy b2 of the old one c2; with
    the writer paused, blockdev-reopen puts the filter under the disk's node (the freeze); the
    writer goes on; the snapshot is exported publishing b2 given as {node, name}. On both
    daemons: the same replies (queries included), the same b2 map (exactly the writes before
    the freeze), the same view (the disk at the freeze) and the same c3 count (the writes
    after it)."""

    BEFORE = [(0, 4096, 0x41), (5 * CLUSTER + 100, 3 * CLUSTER, 0x42), (40 * CLUSTER, 512, 0x43)]
    AFTER = [(0, 4096, 0x51), (20 * CLUSTER, CLUSTER, 0x52), (40 * CLUSTER + 512, 512, 0x53)]

    def session(self, qsd):
        img = frozen_image()
        with Daemon(qsd=qsd) as d:
            src, scratch = d.path('src'), d.path('scratch')
            write_image(src, img)
            cbttest.make_image(scratch, SIZE)
            s = Session(d, src, scratch)
            sock = d.path('nbd.sock')
            uri = 'nbd+unix:///%s?socket=' + sock
            s.ok('blockdev-add', driver='file', node_name='disk0', filename=src)
            s.ok('blockdev-add', driver='raw', node_name='disk', file='disk0')
            s.ok('block-dirty-bitmap-add', node='disk', name='c2', granularity=CLUSTER)
            s.ok('nbd-server-start', addr={'type': 'unix', 'data': {'path': sock}})
            s.ok('block-export-add', type='nbd', id='live', node_name='disk', name='live',
                 writable=True)
            live = nbd.NBD()
            live.connect_uri(uri % 'live')
            for off, length, byte in self.BEFORE:
                live.pwrite(bytes([byte]) * length, off)
            live.flush()
            # The writer is paused from here to the reopen (no request in flight).
            s.ok('transaction', actions=[
                {'type': 'block-dirty-bitmap-add', 'data': {'node': 'disk', 'name': 'c3',
                                                            'granularity': CLUSTER}},
                {'type': 'block-dirty-bitmap-add', 'data': {'node': 'disk', 'name': 'b2',
                                                            'granularity': CLUSTER,
                                                            'disabled': True}},
                {'type': 'block-dirty-bitmap-merge',
                 'data': {'node': 'disk', 'target': 'b2', 'bitmaps': ['c2']}},
                {'type': 'block-dirty-bitmap-remove', 'data': {'node': 'disk', 'name': 'c2'}}])
            s.ok('blockdev-add', driver='file', node_name='scrf', filename=scratch)
            s.ok('blockdev-add', driver='raw', node_name='scr', file='scrf')
            s.ok('blockdev-add', driver='copy-before-write', node_name='cbw', file='disk0',
                 target='scr')
            s.ok('blockdev-reopen', options=[{'driver': 'raw', 'node-name': 'disk',
                                              'file': 'cbw'}])
            for off, length, byte in self.AFTER:
                live.pwrite(bytes([byte]) * length, off)
            live.flush()
            s.ok('blockdev-add', driver='snapshot-access', node_name='snap', file='cbw')
            s.ok('block-export-add', type='nbd', id='snap', node_name='snap', name='snap',
                 bitmaps=[{'node': 'disk', 'name': 'b2'}])
            s.ok('query-named-block-nodes')
            out = {'b2': nbd_map_context(uri % 'snap', 'qemu:dirty-bitmap:b2')}
            snap = nbd.NBD()
            snap.connect_uri(uri % 'snap')
            out['view'] = hashlib.sha256(b''.join(
                snap.pread(CLUSTER, off) for off in range(0, SIZE, CLUSTER))).hexdigest()
            out['live'] = hashlib.sha256(live.pread(SIZE, 0)).hexdigest()
            snap.shutdown()
            live.shutdown()
            del snap, live
            s.ok('block-export-del', id='snap')
            cbttest.wait_for(lambda: len(s.q.execute('query-block-exports')) == 1,
                             what='snapshot export gone')
            s.ok('blockdev-del', node_name='snap')
            s.ok('blockdev-reopen', options=[{'driver': 'raw', 'node-name': 'disk',
                                              'file': 'disk0'}])
            for node in ('cbw', 'scr', 'scrf'):
                s.ok('blockdev-del', node_name=node)
            s.ok('block-dirty-bitmap-remove', node='disk', name='b2')
            s.ok('query-named-block-nodes')
            out['log'] = s.log
            return out, img

    @staticmethod
    def apply(img, writes):
        img = bytearray(img)
        for off, length, byte in writes:
            img[off:off + length] = bytes([byte]) * length
        return bytes(img)

    def test_bitmaps_at_the_freeze(self):
        ref, img = self.session(qsd=True)
        got, _ = self.session(qsd=False)
        frozen = self.apply(img, self.BEFORE)
        for name, out in (('qsd', ref), ('cbtd', got)):
            self.assertEqual(out['view'], hashlib.sha256(frozen).hexdigest(), name)
            self.assertEqual(out['live'],
                             hashlib.sha256(self.apply(frozen, self.AFTER)).hexdigest(), name)
        dirty = sorted((off, length) for off, length, kind in got['b2'] if kind == 1)
        self.assertEqual(dirty, [(0, CLUSTER), (5 * CLUSTER, 4 * CLUSTER),
                                 (40 * CLUSTER, CLUSTER)])
        self.assertEqual(got['b2'], ref['b2'])
        self.assertEqual([c for c, _ in got['log']], [c for c, _ in ref['log']])
        for (cmd, mine), (_, theirs) in zip(got['log'], ref['log']):
            self.assertEqual(mine, theirs, cmd)
        counts = [json.loads(r) for c, r in got['log'] if c == 'query-named-block-nodes'][0]
        disk = [n for n in counts['return'] if n['node-name'] == 'disk'][0]
        c3 = [b for b in disk['dirty-bitmaps'] if b.get('name') == 'c3'][0]
        self.assertEqual(c3['count'], 3 * CLUSTER)  # the writes after the freeze, and only they


def nbd_map_context(uri, context):
    """[(offset, length, type)] of @context over the whole export."""
    out = subprocess.run(['nbdinfo', '--json', '--map=' + context, uri], capture_output=True,
                         text=True, check=True).stdout
    return [(e['offset'], e['length'], e['type']) for e in json.loads(out)]


class TestPermissions(unittest.TestCase):
    """No writer may bypass the filter: once the filter is used, it unshares write on its
    source, and a conflict is refused with QEMU's text, on both daemons alike."""

    def session(self, qsd):
        with Daemon(qsd=qsd) as d:
            src = cbttest.make_image(d.path('src'), MiB)
            scratch = cbttest.make_image(d.path('scratch'), MiB)
            s = Session(d, src, scratch)
            s.ok('blockdev-add', driver='file', node_name='src', filename=src)
            s.ok('blockdev-add', driver='raw', node_name='fmt', file='src')
            s.ok('blockdev-add', driver='file', node_name='scrf', filename=scratch)
            s.ok('blockdev-add', driver='raw', node_name='scr', file='scrf')
            sock = d.path('nbd.sock')
            s.ok('nbd-server-start', addr={'type': 'unix', 'data': {'path': sock}})
            s.ok('block-export-add', type='nbd', id='e0', node_name='fmt', writable=True)
            s.ok('blockdev-add', driver='copy-before-write', node_name='cbw', file='src',
                 target='scr')
            # fmt writes src directly: the filter may not get a user.
            s.cmd('blockdev-add', driver='snapshot-access', node_name='snap', file='cbw')
            s.cmd('block-export-add', type='nbd', id='e1', node_name='cbw', writable=True)
            s.ok('block-export-del', id='e0')
            cbttest.wait_for(lambda: len(s.q.execute('query-block-exports')) == 0,
                             what='export gone')
            s.ok('blockdev-add', driver='snapshot-access', node_name='snap', file='cbw')
            # Now the filter is used: nobody else may write its source.
            s.cmd('block-export-add', type='nbd', id='e2', node_name='src', writable=True)
            s.cmd('block-export-add', type='nbd', id='e3', node_name='fmt', writable=True)
            s.ok('block-export-add', type='nbd', id='e4', node_name='fmt')  # reading is fine
            s.ok('block-export-add', type='nbd', id='e5', node_name='scr', writable=True)
            s.ok('query-named-block-nodes')
            return s.log

    def test_bypass_refused(self):
        ref = self.session(qsd=True)
        got = self.session(qsd=False)
        self.assertEqual(got, ref)
        errors = [r for _, r in got if '"error"' in r]
        self.assertEqual(len(errors), 4)
        self.assertTrue(all('Permission conflict on node' in e for e in errors), errors)


class TestBitmap(unittest.TestCase):
    """copy-before-write's `bitmap`: only the regions set in it are copied and readable, on both
    daemons alike (replies, queries with the filter's anonymous bitmaps, read results)."""

    def session(self, qsd):
        with Daemon(qsd=qsd) as d:
            src = cbttest.make_image(d.path('src'), 4 * MiB, [(0, b'\x33' * 4 * MiB)])
            scratch = cbttest.make_image(d.path('scratch'), 4 * MiB)
            s = Session(d, src, scratch)
            sock = d.path('nbd.sock')
            s.ok('blockdev-add', driver='file', node_name='src', filename=src)
            s.ok('block-dirty-bitmap-add', node='src', name='b0', granularity=CLUSTER)
            s.ok('nbd-server-start', addr={'type': 'unix', 'data': {'path': sock}})
            s.ok('block-export-add', type='nbd', id='e0', node_name='src', writable=True)
            h = nbd.NBD()
            h.connect_uri('nbd+unix:///src?socket=' + sock)
            h.pwrite(b'\x44' * 4096, MiB + 100)
            h.shutdown()
            del h
            s.ok('block-export-del', id='e0')
            cbttest.wait_for(lambda: s.q.execute('query-block-exports') == [], what='export gone')
            s.ok('blockdev-add', driver='file', node_name='scr', filename=scratch)
            s.ok('blockdev-add', driver='copy-before-write', node_name='cbw', file='src',
                 target='scr', bitmap={'node': 'src', 'name': 'b0'})
            s.ok('blockdev-add', driver='snapshot-access', node_name='snap', file='cbw')
            s.ok('block-export-add', type='nbd', id='live', node_name='cbw', name='live',
                 writable=True)
            s.ok('block-export-add', type='nbd', id='snap', node_name='snap')
            live = nbd.NBD()
            live.connect_uri('nbd+unix:///live?socket=' + sock)
            live.pwrite(b'\x55' * 3 * CLUSTER, MiB - CLUSTER)  # one cluster in the bitmap
            snap = nbd.NBD()
            snap.connect_uri('nbd+unix:///snap?socket=' + sock)
            results = []
            for off, length in ((MiB, CLUSTER), (MiB + CLUSTER, 4096), (0, 4096)):
                try:
                    data = snap.pread(length, off)
                    results.append(hashlib.sha256(data).hexdigest())
                except nbd.Error:
                    results.append('refused')
            s.ok('query-named-block-nodes')
            snap.shutdown()
            live.shutdown()
            del snap, live
            return s.log, results

    def test_bitmap_limits_the_view(self):
        ref = self.session(qsd=True)
        got = self.session(qsd=False)
        self.assertEqual(got, ref)
        frozen = b'\x33' * 100 + b'\x44' * 4096 + b'\x33' * (CLUSTER - 4196)
        self.assertEqual(got[1], [hashlib.sha256(frozen).hexdigest(), 'refused', 'refused'])


class TestCbwTimeout(unittest.TestCase):
    """cbw-timeout: a copy slower than the timeout fails for the write that waits on it, and
    on-cbw-error decides, on both daemons alike. The target is a null-co node whose every
    request takes 2 s; the timeout is 1 s (none in the control run)."""

    def session(self, qsd, timeout, on_error):
        with Daemon(qsd=qsd) as d:
            src = cbttest.make_image(d.path('src'), MiB, [(0, b'\x33' * MiB)])
            s = Session(d, src, d.path('none'))
            sock = d.path('nbd.sock')
            s.ok('blockdev-add', driver='file', node_name='src', filename=src)
            s.ok('blockdev-add', driver='null-co', node_name='slow', size=MiB,
                 latency_ns=2 * 10**9)
            cbw = dict(driver='copy-before-write', node_name='cbw', file='src', target='slow',
                       on_cbw_error=on_error)
            if timeout:
                cbw['cbw_timeout'] = timeout
            s.ok('blockdev-add', **cbw)
            s.ok('blockdev-add', driver='snapshot-access', node_name='snap', file='cbw')
            s.ok('nbd-server-start', addr={'type': 'unix', 'data': {'path': sock}})
            s.ok('block-export-add', type='nbd', id='live', node_name='cbw', name='live',
                 writable=True)
            s.ok('block-export-add', type='nbd', id='snap', node_name='snap')
            live = nbd.NBD()
            live.connect_uri('nbd+unix:///live?socket=' + sock)
            results = []
            try:
                live.pwrite(b'\x44' * 4096, 0)
                results.append('written')
            except nbd.Error:
                results.append('write failed')
            snap = nbd.NBD()
            snap.connect_uri('nbd+unix:///snap?socket=' + sock)
            try:  # a cluster never written: read from the source unless the snapshot broke
                results.append(snap.pread(4096, 4 * CLUSTER)[:1].hex())
            except nbd.Error:
                results.append('snapshot read failed')
            results.append(live.pread(1, 0).hex())
            snap.shutdown()
            live.shutdown()
            del snap, live
            return results

    def test_timeout_and_on_cbw_error(self):
        cases = [(0, 'break-guest-write', ['written', '33', '44']),
                 (1, 'break-guest-write', ['write failed', '33', '33']),
                 (1, 'break-snapshot', ['written', 'snapshot read failed', '44'])]
        for timeout, on_error, expected in cases:
            with self.subTest(timeout=timeout, on_error=on_error):
                ref = self.session(True, timeout, on_error)
                got = self.session(False, timeout, on_error)
                self.assertEqual(got, ref)
                self.assertEqual(got, expected)


class TestCbtdRefusals(unittest.TestCase):
    """Where qemu-storage-daemon 7.2 asserts, cbtd refuses."""

    def test_reopen_empty_list(self):
        with Daemon() as d:
            q = connect(d)
            self.assertEqual(q.error('blockdev-reopen', options=[]),
                             ('GenericError',
                              'blockdev-reopen needs the options of at least one node'))
            self.assertEqual(q.execute('query-named-block-nodes'), [])

    def test_target_too_small_and_unaligned_discard(self):
        with Daemon() as d:
            q = connect(d)
            src = cbttest.make_image(d.path('src'), 4 * MiB, [(0, b'\x11' * MiB)])
            small = cbttest.make_image(d.path('small'), 2 * MiB)
            scratch = cbttest.make_image(d.path('scratch'), 4 * MiB)
            q.execute('blockdev-add', driver='file', node_name='src', filename=src)
            q.execute('blockdev-add', driver='file', node_name='small', filename=small)
            self.assertEqual(
                q.error('blockdev-add', driver='copy-before-write', node_name='cbw',
                        file='src', target='small'),
                ('GenericError', "Target node 'small' (2097152 bytes) is smaller than the "
                 "source 'src' (4194304 bytes)"))
            q.execute('blockdev-add', driver='file', node_name='scr', filename=scratch,
                      discard='unmap')
            q.execute('blockdev-add', driver='copy-before-write', node_name='cbw', file='src',
                      target='scr')
            q.execute('blockdev-add', driver='snapshot-access', node_name='snap', file='cbw',
                      discard='unmap')
            sock = d.path('nbd.sock')
            q.execute('nbd-server-start', addr={'type': 'unix', 'data': {'path': sock}})
            q.execute('block-export-add', type='nbd', id='snap', node_name='snap',
                      writable=True)
            h = nbd.NBD()
            h.connect_uri('nbd+unix:///snap?socket=' + sock)
            with self.assertRaises(nbd.Error):
                h.trim(1000, 512)
            self.assertEqual(h.pread(4096, 0), b'\x11' * 4096)  # still readable
            h.trim(CLUSTER, 0)  # aligned: the cluster leaves the view
            with self.assertRaises(nbd.Error):
                h.pread(4096, 0)
            self.assertEqual(h.pread(4096, CLUSTER), b'\x11' * 4096)
            with self.assertRaises(nbd.Error):
                h.pwrite(b'x' * 512, CLUSTER)  # the view is never written
            h.shutdown()
            del h


if __name__ == '__main__':
    cbttest.main()
