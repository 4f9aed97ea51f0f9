"""Checkpoints taken while a workload writes: `transaction [disable old, add new]` must split the
writes between the two bitmaps atomically. Every write lands in exactly one checkpoint bitmap
(never none: that would be a false negative, i.e. data missing from an incremental backup), and
the timing decides which one where it can: a write that ended before checkpoint k began is not
in bitmap k or later, and a write that began after checkpoint k returned is in bitmap k or later.
Run on cbtd and, as a check of the test itself, on qemu-storage-daemon."""
import threading
import time
import unittest

import nbd

from bitmappair import KINDS, Pair, act

CHUNK = 64 * 1024
WRITERS = 2
WRITES_PER_WRITER = 2000
CHECKPOINTS = 12


class ConcurrentCheckpoints(unittest.TestCase):
    def setUp(self):
        self.p = Pair()
        self.addCleanup(self.p.stop)
        self.p.disk('d0')
        self.p.ok('block-dirty-bitmap-add', {'node': 'd0', 'name': 'ck0'})
        self.p.export('w', 'd0', writable=True)

    def tearDown(self):
        self.assertTrue(self.p.alive(), 'a daemon died')

    def writer(self, kind, first, log):
        h = nbd.NBD()
        h.connect_uri(self.p.uri(kind, 'd0'))
        buf = b'\xa5' * 4096
        for i in range(first, first + WRITES_PER_WRITER):
            t0 = time.monotonic()
            h.pwrite(buf, i * CHUNK + 512)
            log.append((i, t0, time.monotonic()))
        h.shutdown()
        del h

    def dirty_chunks(self, kind, name):
        h = nbd.NBD()
        h.add_meta_context('qemu:dirty-bitmap:' + name)
        h.connect_uri(self.p.uri(kind, 'ro-' + name))
        size = h.get_size()
        dirty = set()

        def extents(ctx, offset, entries, err):
            for j in range(0, len(entries), 2):
                length, flags = entries[j], entries[j + 1]
                if flags & 1:
                    dirty.update(range(offset // CHUNK, (offset + length) // CHUNK))
                offset += length
            return 0
        off = 0
        while off < size:
            n = min(size - off, 1 << 30)
            before = len(dirty)
            h.block_status(n, off, extents)
            off += n
            self.assertGreaterEqual(len(dirty), before)
        h.shutdown()
        del h
        return dirty

    def run_one(self, kind):
        q = self.p.qmp[kind]
        log = []
        threads = [threading.Thread(target=self.writer,
                                    args=(kind, w * WRITES_PER_WRITER, log))
                   for w in range(WRITERS)]
        for t in threads:
            t.start()
        marks = []  # (k, start, end) of the transaction that created ck<k>
        for k in range(1, CHECKPOINTS + 1):
            time.sleep(0.005)
            t0 = time.monotonic()
            q.execute('transaction', {'actions': [
                act('block-dirty-bitmap-disable', node='d0', name='ck%d' % (k - 1)),
                act('block-dirty-bitmap-add', node='d0', name='ck%d' % k)]})
            marks.append((k, t0, time.monotonic()))
        for t in threads:
            t.join()
        q.execute('block-dirty-bitmap-disable', {'node': 'd0', 'name': 'ck%d' % CHECKPOINTS})
        owner = {}
        for k in range(CHECKPOINTS + 1):
            name = 'ck%d' % k
            q.execute('block-export-add', {'type': 'nbd', 'id': 'ro-' + name, 'node-name': 'd0',
                                           'name': 'ro-' + name, 'bitmaps': [name]})
            for chunk in self.dirty_chunks(kind, name):
                if chunk in owner:
                    self.fail('%s: chunk %d in ck%d and %s' % (kind, chunk, owner[chunk], name))
                owner[chunk] = k
        self.assertEqual(len(log), WRITERS * WRITES_PER_WRITER)
        written = {i for i, _, _ in log}
        if set(owner) != written:
            self.fail('%s: written but clean %s, dirty but unwritten %s' % (
                kind, sorted(written - set(owner))[:10], sorted(set(owner) - written)[:10]))
        for i, w0, w1 in log:
            for k, c0, c1 in marks:
                if w1 < c0:
                    self.assertLess(owner[i], k, '%s: write %d ended before ck%d' % (kind, i, k))
                if w0 > c1:
                    self.assertGreaterEqual(owner[i], k,
                                            '%s: write %d began after ck%d' % (kind, i, k))
        return len({owner[i] for i, _, _ in log})

    def test_checkpoints_during_writes(self):
        for kind in KINDS:
            with self.subTest(daemon=kind):
                used = self.run_one(kind)
                # The writes really were spread over several checkpoints.
                self.assertGreater(used, 2)


if __name__ == '__main__':
    unittest.main(verbosity=2)
