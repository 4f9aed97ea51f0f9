#!/usr/bin/python3
"""cbtd's one-call point-in-time export: block-export-add with `snapshot: true` on a raw node
over a file node, on the real daemon, unix sockets only.

How the instant is checked without pausing the writers: each writer has its own NBD connection
to the live export and its own blocks of the disk, and sends one write at a time, each filling a
4 KiB block with a pattern that names the writer and the write's sequence number. A writer's
writes therefore reach the disk in sequence order, and a point-in-time view holds, for every
writer, exactly a prefix of its writes (its first c_w writes, for some cut c_w), nothing more
and nothing less. The test reads the whole snapshot, takes c_w as the highest sequence number of
writer w found in it, rebuilds the image from the initial content and every writer's first c_w
writes, and requires the snapshot to equal it byte for byte (sha256): a torn view (a later
write of a writer present while an earlier one to another block is missing, or old data where
a write it holds had landed) cannot match. The cut must also lie between the writes that were
acknowledged before block-export-add was sent and the writes that were sent before its reply
came back. The snapshot is read again after the writers have gone on, and must not change.

The same cut checks the bitmaps: the published `c1` (recording since before the writers
started, at 4 KiB granularity) must mark exactly the blocks of the writes inside the cut, and
the `checkpoint` c2 exactly the blocks of the writes after it; the backup plus the blocks c2
marks, read from the disk once the writers stopped, must equal the disk (sha256). Teardown
(block-export-del, nbd-server-stop, a hard delete under a reader, every refused command) must
leave the node list as it was, the node on its file node, no descriptor of the scratch
directory open in the daemon and the checkpoint recording.
"""
import hashlib
import errno
import os
import shutil
import struct
import tempfile
import threading
import time
import unittest

import nbd

import cbttest
import seqwriter
from cbttest import Daemon, QMPError

KiB = 1 << 10
MiB = 1 << 20
SIZE = 8 * MiB
BLOCK = 4 * KiB
WRITERS = 3


def initial_image():
    img = bytearray(SIZE)
    for off in range(0, SIZE, 3 * BLOCK):
        img[off:off + BLOCK] = struct.pack('<Q', off) * (BLOCK // 8)
    return bytes(img)


def pattern(w, seq):
    return struct.pack('<II', w + 1, seq) * (BLOCK // 8)


def decode(block):
    w, seq = struct.unpack_from('<II', block)
    if w == 0 or w > WRITERS or block != pattern(w - 1, seq):
        return None
    return w - 1, seq


class Writer(threading.Thread):
    """Writes its own blocks (every WRITERS-th block, from @w on) in a fixed pseudo-random
    order, one write at a time, logging (seq, block, sent, acked) of each."""

    def __init__(self, uri, w):
        super().__init__()
        self.uri, self.w = uri, w
        self.log = []
        self.stop = threading.Event()
        self.error = None

    def run(self):
        h = nbd.NBD()
        h.connect_uri(self.uri)
        try:
            blocks = list(range(self.w, SIZE // BLOCK, WRITERS))
            seq = 0
            while not self.stop.is_set():
                seq += 1
                b = blocks[(seq * 7919) % len(blocks)]
                sent = time.monotonic()
                h.pwrite(pattern(self.w, seq), b * BLOCK)
                self.log.append((seq, b, sent, time.monotonic()))
        except Exception as e:  # reported by the test
            self.error = e
        finally:
            h.shutdown()


def read_all(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return b''.join(h.pread(MiB, off) for off in range(0, SIZE, MiB))
    finally:
        h.shutdown()


def dirty_blocks(uri, bitmap):
    """The BLOCK-sized blocks that qemu:dirty-bitmap:@bitmap of the export at @uri marks."""
    h = nbd.NBD()
    h.add_meta_context('qemu:dirty-bitmap:' + bitmap)
    h.connect_uri(uri)
    out, pos = set(), 0
    try:
        while pos < SIZE:
            ents = []
            h.block_status(min(SIZE - pos, 4 * MiB), pos,
                           lambda ctx, off, e, err: ents.extend(e))
            for i in range(0, len(ents), 2):
                length, flags = ents[i], ents[i + 1]
                if flags & 1:
                    out.update(range(pos // BLOCK, (pos + length) // BLOCK))
                pos += length
    finally:
        h.shutdown()
    return out


def proc_fds_under(pid, directory):
    """The targets of the daemon's open descriptors that lie in @directory."""
    out = []
    for fd in os.listdir('/proc/%d/fd' % pid):
        try:
            target = os.readlink('/proc/%d/fd/%s' % (pid, fd))
        except OSError:
            continue
        if target.startswith(directory + '/'):
            out.append(target)
    return out


class TestSnapshotExport(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='cbtd-snapexp-')
        self.scratch = os.path.join(self.dir, 'scratch')
        os.mkdir(self.scratch)
        self.img_path = os.path.join(self.dir, 'disk.img')
        self.img = initial_image()
        with open(self.img_path, 'wb') as f:
            f.write(self.img)
        self.d = Daemon()
        self.q = self.d.qmp()
        self.q.execute('blockdev-add', driver='file', node_name='src', filename=self.img_path)
        self.q.execute('blockdev-add', driver='raw', node_name='disk', file='src')
        self.sock = self.d.path('nbd.sock')
        self.q.execute('nbd-server-start', addr={'type': 'unix', 'data': {'path': self.sock}})
        self.q.execute('block-export-add', {'type': 'nbd', 'id': 'live', 'node-name': 'disk',
                                            'name': 'live', 'writable': True})
        self.nodes_before = self.node_names()

    def tearDown(self):
        self.d.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def uri(self, name):
        return 'nbd+unix:///%s?socket=%s' % (name, self.sock)

    def node_names(self):
        return sorted(n['node-name'] for n in self.q.execute('query-named-block-nodes'))

    def add_snapshot(self, **extra):
        args = dict(type='nbd', id='snap', node_name='disk', name='snap', snapshot=True,
                    scratch_dir=self.scratch)
        args.update(extra)
        args = {k: v for k, v in args.items() if v is not None}
        return self.q.execute('block-export-add', {k.replace('_', '-'): v for k, v in args.items()})

    def assert_restored(self):
        """Nothing the snapshot built is left, and the node is back on its file child."""
        self.assertEqual(self.node_names(), self.nodes_before)
        self.assertEqual(proc_fds_under(self.d.proc.pid, self.scratch), [])
        self.assertEqual(os.listdir(self.scratch), [])
        disk = [n for n in self.q.execute('query-named-block-nodes') if n['node-name'] == 'disk']
        self.assertEqual(disk[0]['file'], self.img_path)
        # Writes through the node reach the image file, as before.
        h = nbd.NBD()
        h.connect_uri(self.uri('live'))
        h.pwrite(b'\xee' * BLOCK, SIZE - BLOCK)
        h.flush()
        h.shutdown()
        with open(self.img_path, 'rb') as f:
            f.seek(SIZE - BLOCK)
            self.assertEqual(f.read(BLOCK), b'\xee' * BLOCK)

    def expected_at_cut(self, writers, snap):
        """The image holding every writer's first c_w writes, c_w found in @snap."""
        cut = [0] * WRITERS
        for off in range(0, SIZE, BLOCK):
            ws = decode(snap[off:off + BLOCK])
            if ws:
                cut[ws[0]] = max(cut[ws[0]], ws[1])
        img = bytearray(self.img)
        for wr in writers:
            for seq, b, _, _ in wr.log:
                if seq <= cut[wr.w]:
                    img[b * BLOCK:(b + 1) * BLOCK] = pattern(wr.w, seq)
        return cut, bytes(img)

    def bitmaps_of(self, node):
        for n in self.q.execute('query-named-block-nodes'):
            if n['node-name'] == node:
                return {b['name']: b for b in n.get('dirty-bitmaps', [])}
        raise AssertionError('no node ' + node)

    def test_point_in_time_under_writers(self):
        # c1 is the previous checkpoint: it has seen every write since the writers started.
        self.q.execute('block-dirty-bitmap-add', {'node': 'disk', 'name': 'c1', 'granularity': BLOCK})
        writers = [Writer(self.uri('live'), w) for w in range(WRITERS)]
        for wr in writers:
            wr.start()
        try:
            cbttest.wait_for(lambda: all(len(wr.log) > 200 for wr in writers), what='writes')
            t0 = time.monotonic()
            self.add_snapshot(checkpoint='c2', bitmaps=['c1'])
            t1 = time.monotonic()
            # The scratch is open and already unlinked.
            self.assertEqual(os.listdir(self.scratch), [])
            self.assertEqual(len(proc_fds_under(self.d.proc.pid, self.scratch)), 1)
            self.assertEqual(len(self.node_names()), len(self.nodes_before) + 3)
            exports = {e['id']: e['node-name'] for e in self.q.execute('query-block-exports')}
            self.assertEqual(exports, {'live': 'disk', 'snap': 'disk'})
            first = read_all(self.uri('snap'))
            # Let the writers overwrite much of the disk after the instant.
            n = [len(wr.log) for wr in writers]
            cbttest.wait_for(lambda: all(len(wr.log) > k + 500 for wr, k in zip(writers, n)),
                             what='writes after the instant')
            second = read_all(self.uri('snap'))
            c1_snap = dirty_blocks(self.uri('snap'), 'c1')
        finally:
            seqwriter.stop_all(writers)
        for wr in writers:
            self.assertIsNone(wr.error)
        cut, expected = self.expected_at_cut(writers, first)
        self.assertEqual(hashlib.sha256(first).hexdigest(), hashlib.sha256(expected).hexdigest())
        self.assertEqual(second, first)
        for wr in writers:
            acked_before = sum(1 for _, _, _, acked in wr.log if acked < t0)
            sent_before = sum(1 for _, _, sent, _ in wr.log if sent < t1)
            self.assertGreater(acked_before, 200)
            self.assertTrue(acked_before <= cut[wr.w] <= sent_before,
                            (wr.w, acked_before, cut[wr.w], sent_before))
        # The live disk went on: it holds the last write of every block.
        live = bytearray(self.img)
        for wr in writers:
            for seq, b, _, _ in wr.log:
                live[b * BLOCK:(b + 1) * BLOCK] = pattern(wr.w, seq)
        self.assertEqual(read_all(self.uri('live')), bytes(live))
        self.assertNotEqual(bytes(live), first)
        # The published c1 is c1 at the instant: exactly the blocks written before it.
        before = {b for wr in writers for seq, b, _, _ in wr.log if seq <= cut[wr.w]}
        after = {b for wr in writers for seq, b, _, _ in wr.log if seq > cut[wr.w]}
        self.assertEqual(c1_snap, before)
        self.assertFalse(after <= before)  # so a c1 that went on recording would differ

        self.q.execute('block-export-del', id='snap')
        self.assertEqual(self.q.wait_event('BLOCK_EXPORT_DELETED')['data'], {'id': 'snap'})
        self.assert_restored()  # writes the last block through the node
        live[SIZE - BLOCK:] = b'\xee' * BLOCK
        with open(self.img_path, 'rb') as f:
            self.assertEqual(f.read(), bytes(live))
        # c2 stays on the node, recording: exactly the writes after the instant.
        c2 = self.bitmaps_of('disk')['c2']
        self.assertTrue(c2['recording'])
        self.assertFalse(c2['busy'])
        # At c1's granularity, the chain's: at the default 64 KiB, a block the writers left alone
        # after the instant would read as changed whenever a neighbour was written.
        self.assertEqual(c2['granularity'], BLOCK)
        # The next incremental, the QEMU way: c2 frozen, exported with the node.
        self.q.execute('block-dirty-bitmap-disable', {'node': 'disk', 'name': 'c2'})
        self.q.execute('block-export-add', {'type': 'nbd', 'id': 'inc', 'node-name': 'disk',
                                            'name': 'inc', 'bitmaps': ['c2']})
        c2_dirty = dirty_blocks(self.uri('inc'), 'c2')
        self.assertEqual(c2_dirty, after | {SIZE // BLOCK - 1})
        backup = bytearray(first)
        h = nbd.NBD()
        h.connect_uri(self.uri('inc'))
        for b in sorted(c2_dirty):
            backup[b * BLOCK:(b + 1) * BLOCK] = h.pread(BLOCK, b * BLOCK)
        h.shutdown()
        self.assertEqual(hashlib.sha256(backup).hexdigest(),
                         hashlib.sha256(bytes(live)).hexdigest())

    def test_errors_leave_nothing(self):
        cases = [
            (dict(node_name='nonode'), "Cannot find device='' nor node-name='nonode'"),
            (dict(node_name='src'),
             "cbtd can export a snapshot of a 'raw' node over a 'file' node only; "
             "node 'src' is a 'file' node"),
            (dict(writable=True), 'A snapshot export cannot be writable'),
            (dict(bitmaps=['b0']), "Bitmap 'b0' is not found"),
            (dict(bitmaps=[{'node': 'src', 'name': 'c1'}]),
             "A snapshot export publishes bitmaps of node 'disk' only, not of 'src'"),
            (dict(checkpoint='c1'), 'Bitmap already exists: c1'),
            (dict(checkpoint='c2', bitmaps=['c1', 'b0']), "Bitmap 'b0' is not found"),
            (dict(snapshot=False), "'scratch-dir' needs 'snapshot': true"),
            (dict(snapshot=False, scratch_dir=None, checkpoint='c2'),
             "'checkpoint' needs 'snapshot': true"),
            (dict(snapshot=False, scratch_dir=None, scratch_size=MiB),
             "'scratch-size' needs 'snapshot': true"),
            (dict(scratch_size=0), "'scratch-size' must be at least 1 byte"),
            (dict(checkpoint_persistent=True), "'checkpoint-persistent' needs 'checkpoint'"),
            (dict(checkpoint_granularity=4096), "'checkpoint-granularity' needs 'checkpoint'"),
            (dict(checkpoint='c2', checkpoint_granularity=1000),
             'Granularity must be power of 2 and at least 512'),
            (dict(scratch_dir=os.path.join(self.dir, 'missing')),
             "Cannot create a scratch file in '%s': No such file or directory"
             % os.path.join(self.dir, 'missing')),
        ]
        self.q.execute('blockdev-add', driver='raw', node_name='win', file='src', offset=4096)
        cases.append((dict(node_name='win'),
                      "cbtd cannot export a snapshot of node 'win': its 'offset' or 'size' makes "
                      "it a window of its file node"))
        self.q.execute('block-dirty-bitmap-add', {'node': 'disk', 'name': 'c1'})
        self.nodes_before = self.node_names()
        for extra, text in cases:
            with self.subTest(extra=extra):
                with self.assertRaises(QMPError) as cm:
                    self.add_snapshot(**extra)
                self.assertEqual((cm.exception.cls, cm.exception.desc), ('GenericError', text))
                ids = [e['id'] for e in self.q.execute('query-block-exports')]
                self.assertEqual(ids, ['live'])
                self.assertEqual(sorted(self.bitmaps_of('disk')), ['c1'])
                self.assertFalse(self.bitmaps_of('disk')['c1']['busy'])
                self.assert_restored()
        # The internal nodes are not the monitor's.
        self.add_snapshot()
        extra_nodes = sorted(set(self.node_names()) - set(self.nodes_before))
        self.assertEqual(len(extra_nodes), 3)
        for name in extra_nodes:
            cls, desc = self.q.error('blockdev-del', node_name=name)
            self.assertIn(desc, ('Node %s is in use' % name,
                                 'Node %s is not owned by the monitor' % name))
        self.q.execute('block-export-del', id='snap')
        self.assert_restored()

    def test_scratch_bound(self):
        """A copy past scratch-size breaks the snapshot as a full scratch would: the event
        names the export, the snapshot's reads fail, the guest's writes go on, and the
        checkpoint started at the instant still covers every one of them."""
        self.add_snapshot(checkpoint='c2', scratch_size=MiB)
        view = nbd.NBD()
        view.connect_uri(self.uri('snap'))
        self.assertEqual(view.pread(BLOCK, 64 * KiB), self.img[64 * KiB:64 * KiB + BLOCK])
        h = nbd.NBD()
        h.connect_uri(self.uri('live'))
        clusters = 24  # each first write copies a 64 KiB cluster: 16 fill the MiB
        for i in range(clusters):
            h.pwrite(b'\x5a' * BLOCK, i * 64 * KiB)
        h.flush()
        h.shutdown()
        ev = self.q.wait_event('BLOCK_EXPORT_SNAPSHOT_BROKEN')
        self.assertEqual(ev['data'], {'id': 'snap', 'error': os.strerror(errno.ENOSPC)})
        with self.assertRaises(nbd.Error):
            view.pread(BLOCK, 64 * KiB)
        view.shutdown()
        with open(self.img_path, 'rb') as f:
            for i in range(clusters):
                f.seek(i * 64 * KiB)
                self.assertEqual(f.read(BLOCK), b'\x5a' * BLOCK)
        self.assertEqual(self.bitmaps_of('disk')['c2']['count'], clusters * 64 * KiB)
        self.assertIn('snapshot is broken', self.d.stderr_text())
        self.q.execute('block-export-del', id='snap')
        self.q.wait_event('BLOCK_EXPORT_DELETED')
        self.assert_restored()

    def test_auto_remove(self):
        """With auto-remove the export stays while no client came, and goes (its view undone,
        the checkpoint kept) when its last client leaves: a backup client that only
        disconnects leaves nothing behind."""
        self.add_snapshot(checkpoint='c2', auto_remove=True)
        time.sleep(0.2)
        ids = [e['id'] for e in self.q.execute('query-block-exports')]
        self.assertIn('snap', ids)
        clients = [nbd.NBD() for _ in range(2)]
        for h in clients:
            h.connect_uri(self.uri('snap'))
            self.assertEqual(h.pread(BLOCK, 3 * BLOCK), self.img[3 * BLOCK:4 * BLOCK])
        clients[0].shutdown()
        time.sleep(0.2)  # one client is still reading: the export stays
        self.assertIn('snap', [e['id'] for e in self.q.execute('query-block-exports')])
        clients[1].shutdown()
        self.assertEqual(self.q.wait_event('BLOCK_EXPORT_DELETED')['data'], {'id': 'snap'})
        self.assertNotIn('snap', [e['id'] for e in self.q.execute('query-block-exports')])
        self.assert_restored()
        self.assertTrue(self.bitmaps_of('disk')['c2']['recording'])

    def test_persistent_checkpoint(self):
        """The checkpoint is persistent when a published bitmap is, and not otherwise."""
        self.q.execute('block-dirty-bitmap-add', {'node': 'disk', 'name': 'p1',
                                                  'persistent': True})
        self.q.execute('block-dirty-bitmap-add', {'node': 'disk', 'name': 't1'})
        self.add_snapshot(checkpoint='p2', bitmaps=['t1', 'p1'])
        self.q.execute('block-export-del', id='snap')
        self.add_snapshot(checkpoint='t2', bitmaps=['t1'])
        self.q.execute('block-export-del', id='snap')
        # Asked for: a full backup has no bitmap to take it from, and a chain may change it.
        self.add_snapshot(checkpoint='f1', checkpoint_persistent=True,
                          checkpoint_granularity=16 * KiB)
        self.q.execute('block-export-del', id='snap')
        self.add_snapshot(checkpoint='t3', bitmaps=['p1'], checkpoint_persistent=False)
        self.q.execute('block-export-del', id='snap')
        bitmaps = self.bitmaps_of('disk')
        self.assertEqual({n: b['persistent'] for n, b in bitmaps.items()},
                         {'p1': True, 't1': False, 'p2': True, 't2': False, 'f1': True,
                          't3': False})
        self.assertEqual({n: b['granularity'] for n, b in bitmaps.items()},
                         {'p1': 64 * KiB, 't1': 64 * KiB, 'p2': 64 * KiB, 't2': 64 * KiB,
                          'f1': 16 * KiB, 't3': 64 * KiB})
        self.assertTrue(bitmaps['p2']['recording'])

    def test_server_stop_undoes(self):
        """The export going away with the server undoes the snapshot too."""
        self.add_snapshot(checkpoint='c2')
        self.q.execute('nbd-server-stop')
        # In creation order (schemas/block-export.json, nbd-server-stop).
        self.assertEqual(self.q.wait_event('BLOCK_EXPORT_DELETED')['data'], {'id': 'live'})
        self.assertEqual(self.q.wait_event('BLOCK_EXPORT_DELETED')['data'], {'id': 'snap'})
        self.assertEqual(self.node_names(), self.nodes_before)
        self.assertEqual(proc_fds_under(self.d.proc.pid, self.scratch), [])
        self.assertTrue(self.bitmaps_of('disk')['c2']['recording'])

    def test_delete_while_reading(self):
        self.add_snapshot()
        errors, reads, started = [], [0], threading.Event()

        def reader():
            h = nbd.NBD()
            h.connect_uri(self.uri('snap'))
            try:
                while True:
                    off = (reads[0] * MiB) % SIZE
                    if h.pread(MiB, off) != self.img[off:off + MiB]:
                        errors.append(off)
                    reads[0] += 1
                    started.set()
            except nbd.Error:
                pass  # the export went away under the reader: expected
            finally:
                started.set()
                del h

        t = threading.Thread(target=reader)
        t.start()
        self.assertTrue(started.wait(10))
        cls, desc = self.q.error('block-export-del', id='snap')
        self.assertEqual(desc, "export 'snap' still in use")
        self.q.execute('block-export-del', id='snap', mode='hard')
        self.assertEqual(self.q.wait_event('BLOCK_EXPORT_DELETED')['data'], {'id': 'snap'})
        t.join(10)
        self.assertFalse(t.is_alive())
        self.assertEqual(errors, [])
        self.assertGreater(reads[0], 0)
        self.assert_restored()
        # The id and the node can be used again at once.
        self.add_snapshot()
        self.assertEqual(read_all(self.uri('snap'))[:SIZE - BLOCK], self.img[:SIZE - BLOCK])
        self.q.execute('block-export-del', id='snap')
        self.q.wait_event('BLOCK_EXPORT_DELETED')


if __name__ == '__main__':
    cbttest.main()
