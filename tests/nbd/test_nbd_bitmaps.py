"""Dirty-bitmap contexts through the real daemon, side by side with qemu-storage-daemon 7.2:
the same writes give the same `nbdinfo --map=qemu:dirty-bitmap:NAME`, the same contexts, the same
qemu-img x-dirty-bitmap map, and the same export errors for busy/enabled/unknown bitmaps.

Run with /usr/bin/python3; CBTD names the daemon binary.
"""
import os
import shutil
import tempfile
import unittest

import nbd

from nbdtest import make_image, nbdinfo_json, run, start, uri

MiB = 1 << 20
WRITES = [(65536 + 1, 10), (512 * 1024, 65536), (3 * MiB + 100, 70000), (4 * MiB - 1, 1)]


class Bitmaps(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='cbt-nbd-bitmaps-')
        self.daemons = []

    def tearDown(self):
        for d in self.daemons:
            d.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def scenario(self, qsd):
        """Write through a writable export while b0 records, freeze it, export it read-only."""
        tag = 'qsd' if qsd else 'cbtd'
        img = make_image(os.path.join(self.dir, '%s.img' % tag), 4 * MiB)
        d, sock = start(self.dir, qsd, [('f0', img, False)],
                        ['id=w,node-name=f0,name=w,writable=on'])
        self.daemons.append(d)
        q = d.qmp()
        q.execute('block-dirty-bitmap-add', {'node': 'f0', 'name': 'b0', 'granularity': 65536})
        q.execute('block-dirty-bitmap-add', {'node': 'f0', 'name': 'live'})
        h = nbd.NBD()
        h.set_export_name('w')
        h.connect_unix(sock)
        for off, n in WRITES:
            h.pwrite(b'\x42' * n, off)
        h.flush()
        h.shutdown()
        out = {}
        out['enabled-ro'] = q.cmd('block-export-add', {'type': 'nbd', 'id': 'x', 'node-name': 'f0',
                                                       'name': 'x', 'bitmaps': ['live']})
        out['unknown'] = q.cmd('block-export-add', {'type': 'nbd', 'id': 'x', 'node-name': 'f0',
                                                    'name': 'x', 'bitmaps': ['nope']})
        q.execute('block-dirty-bitmap-disable', {'node': 'f0', 'name': 'b0'})
        q.execute('block-export-add', {'type': 'nbd', 'id': 'r', 'node-name': 'f0', 'name': 'r',
                                       'bitmaps': ['b0'], 'allocation-depth': True})
        out['busy-export'] = q.cmd('block-export-add', {'type': 'nbd', 'id': 'y',
                                                        'node-name': 'f0', 'name': 'y',
                                                        'bitmaps': ['b0']})
        out['busy-remove'] = q.cmd('block-dirty-bitmap-remove', {'node': 'f0', 'name': 'b0'})
        out['contexts'] = sorted(nbdinfo_json(uri(sock, 'r'))['exports'][0]['contexts'])
        out['map'] = run(['nbdinfo', '--map=qemu:dirty-bitmap:b0', uri(sock, 'r')]).stdout
        out['qemu-img'] = run(['qemu-img', 'map', '--output=json', '--image-opts',
                               'driver=nbd,export=r,server.type=unix,server.path=%s,'
                               'x-dirty-bitmap=qemu:dirty-bitmap:b0' % sock]).stdout
        # A writable export may publish the recording bitmap; every acknowledged write is
        # already visible to another connection's BLOCK_STATUS.
        q.execute('block-export-add', {'type': 'nbd', 'id': 'l', 'node-name': 'f0', 'name': 'l',
                                       'writable': True, 'bitmaps': ['live']})
        a, b = nbd.NBD(), nbd.NBD()
        a.set_export_name('l')
        b.set_export_name('l')
        b.add_meta_context('qemu:dirty-bitmap:live')
        a.connect_unix(sock)
        b.connect_unix(sock)
        a.pwrite(b'\x01' * 512, 2 * MiB)
        seen = []
        b.block_status(65536, 2 * MiB, lambda ctx, off, ent, err: seen.extend(ent))
        out['live'] = seen
        a.shutdown()
        b.shutdown()
        q.execute('block-export-del', {'id': 'r'})
        q.wait_event('BLOCK_EXPORT_DELETED')
        out['remove-after'] = q.cmd('block-dirty-bitmap-remove', {'node': 'f0', 'name': 'b0'})
        return out

    def test_same_as_qsd(self):
        mine, theirs = self.scenario(False), self.scenario(True)
        self.assertIn('qemu:dirty-bitmap:b0', mine['contexts'])
        self.assertEqual(mine['live'][:2], [65536, 1])
        self.assertIn('1  dirty', mine['map'])
        for key in theirs:
            self.assertEqual(mine[key], theirs[key], key)


if __name__ == '__main__':
    unittest.main(verbosity=2)
