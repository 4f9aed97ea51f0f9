#!/usr/bin/python3
"""The I/O path end to end, on cbtd and on qemu-storage-daemon side by side: the same NBD writes,
zero-writes, trims and flushes on the same node graphs must leave the same bits in the dirty
bitmaps of the format node and of the protocol node below it (count and sha256), the same
allocation (base:allocation) and the same data.

This checks blockdev's marking rules against QEMU: every write and zero-write marks, a trim
marks only where discard=unmap lets it through (inline children default to unmap, so the raw
node's policy decides; a file node added on its own defaults to ignore), and a raw window marks
the protocol node at the shifted offset.
"""
import os
import shutil
import tempfile
import unittest

import nbd

import cbttest
from cbttest import Daemon
from test_blockdev_qmp import connect  # this script's directory is on sys.path

MiB = 1 << 20


class TestMarking(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='cbtd-blockdev-io-')

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def run_session(self, qsd, nodes, export, bitmaps, io):
        """Fresh image; add @nodes, @bitmaps ([node, name, granularity]), export @export
        writable, run @io(h) over NBD; return bitmap states, allocation map and data."""
        # A new file for each daemon, flushed to disk: what SEEK_DATA reports over unwritten
        # extents depends on the page cache, so both must start from the same state.
        img = os.path.join(self.dir, 'img-qsd' if qsd else 'img-cbtd')
        cbttest.make_image(img, 4 * MiB, [(0, b'\x11' * MiB), (3 * MiB, b'\x22' * MiB)])
        fd = os.open(img, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        with Daemon(qsd=qsd) as d:
            q = connect(d)
            for n in nodes:
                q.execute('blockdev-add', cbttest_expand(n, img))
            for node, name, gran in bitmaps:
                q.execute('block-dirty-bitmap-add',
                          {'node': node, 'name': name, 'granularity': gran})
            sock = d.path('nbd.sock')
            q.execute('nbd-server-start', addr={'type': 'unix', 'data': {'path': sock}})
            q.execute('block-export-add', type='nbd', id='e0', node_name=export,
                      writable=True)
            h = nbd.NBD()
            h.add_meta_context('base:allocation')
            h.set_export_name(export)
            h.connect_unix(sock)
            io(h)
            size = h.get_size()
            extents = []

            def collect(ctx, offset, entries, err):
                if ctx == 'base:allocation':
                    extents.extend(entries)
                return 0
            h.block_status(size, 0, collect)
            data = h.pread(size, 0)
            h.shutdown()
            state = []
            for node, name, _ in bitmaps:
                info = q.execute('x-debug-block-dirty-bitmap-sha256', {'node': node, 'name': name})
                listed = [b for n in q.execute('query-named-block-nodes')
                          if n['node-name'] == node for b in n.get('dirty-bitmaps', [])
                          if b['name'] == name]
                state.append((node, name, listed[0]['count'], info['sha256']))
            q.execute('block-export-del', id='e0')
            return state, extents, data

    def compare(self, nodes, export, bitmaps, io):
        want = self.run_session(True, nodes, export, bitmaps, io)
        got = self.run_session(False, nodes, export, bitmaps, io)
        self.assertEqual(got[0], want[0], 'bitmaps')
        self.assertEqual(got[1], want[1], 'base:allocation')
        self.assertTrue(got[2] == want[2], 'data differs')
        return got

    @staticmethod
    def workload(h):
        h.pwrite(b'\x33' * 100, MiB + 1000)                       # one chunk, unaligned
        h.pwrite(b'\x44' * 70000, 1000, nbd.CMD_FLAG_FUA)         # spans chunks
        h.trim(65536 * 2, 2 * MiB)                                # may be dropped
        h.zero(8192, 3 * MiB + 4096, nbd.CMD_FLAG_NO_HOLE)        # zero, keep allocated
        h.zero(65536, 3 * MiB + 131072)                           # zero, may punch
        h.flush()
        h.cache(4096, 0)

    def test_raw_over_inline_file(self):
        for discard in ('ignore', 'unmap'):
            with self.subTest(discard=discard):
                got = self.compare(
                    [{'driver': 'raw', 'node-name': 'd0', 'discard': discard,
                      'file': {'driver': 'file', 'node-name': 'f0', 'filename': '{img}'}}],
                    'd0', [['d0', 'b0', 65536], ['f0', 'b1', 4096], ['d0', 'b2', 512]],
                    self.workload)
                self.assertGreater(got[0][0][2], 0)

    def test_raw_over_named_file(self):
        # f0 added on its own keeps discard=ignore: a trim through d0 (unmap) is dropped there.
        self.compare(
            [{'driver': 'file', 'node-name': 'f0', 'filename': '{img}'},
             {'driver': 'raw', 'node-name': 'd0', 'discard': 'unmap', 'file': 'f0'}],
            'd0', [['d0', 'b0', 65536], ['f0', 'b1', 65536]], self.workload)

    def test_raw_window(self):
        self.compare(
            [{'driver': 'file', 'node-name': 'f0', 'filename': '{img}', 'discard': 'unmap'},
             {'driver': 'raw', 'node-name': 'w0', 'discard': 'unmap', 'file': 'f0',
              'offset': MiB, 'size': 2 * MiB}],
            'w0', [['w0', 'b0', 65536], ['f0', 'b1', 65536]],
            lambda h: (h.pwrite(b'\x55' * 512, 0), h.trim(65536, MiB),
                       h.zero(4096, 2 * MiB - 4096)))

    def test_detect_zeroes(self):
        def io(h):
            h.pwrite(bytes(65536), MiB)          # zeroes over zeroes
            h.pwrite(bytes(131072), 3 * MiB)     # zeroes over data
            h.pwrite(b'\x01' + bytes(4095), 0)  # not all zero
        for mode, discard in (('on', 'ignore'), ('on', 'unmap'), ('unmap', 'unmap')):
            with self.subTest(mode=mode, discard=discard):
                self.compare(
                    [{'driver': 'raw', 'node-name': 'd0', 'detect-zeroes': mode,
                      'discard': discard,
                      'file': {'driver': 'file', 'node-name': 'f0', 'filename': '{img}'}}],
                    'd0', [['d0', 'b0', 65536], ['f0', 'b1', 4096]], io)

    def test_file_export(self):
        self.compare(
            [{'driver': 'file', 'node-name': 'f0', 'filename': '{img}', 'discard': 'unmap'}],
            'f0', [['f0', 'b0', 65536]], self.workload)


def cbttest_expand(opts, img):
    if isinstance(opts, dict):
        return {k: cbttest_expand(v, img) for k, v in opts.items()}
    return opts.format(img=img) if isinstance(opts, str) else opts


if __name__ == '__main__':
    cbttest.main()
