"""Differential test: the bitmap's count and sha256 against qemu-storage-daemon 7.2.

The same guest writes go to qsd (null-co nodes written over NBD) and to bitmap-replay (our
CbtDirtyBitmap/CbtBitmap); then enable/disable, clear and cross-granularity merges. Every
bitmap's BlockDirtyInfo count and x-debug-block-dirty-bitmap-sha256 must agree.

Usage: test_bitmap_qsd.py BITMAP_REPLAY
"""
import random
import subprocess
import sys
import unittest

import nbd

from cbttest import Daemon

REPLAY = None
GRANS = [512, 4096, 65536, 2 << 20, 1 << 31]
SIZES = {'d0': 1 << 30, 'd1': 100000, 'd2': (1 << 30) + 12345}


class BitmapAgainstQsd(unittest.TestCase):
    def setUp(self):
        self.script = []
        self.daemon = None

    def tearDown(self):
        if self.daemon:
            self.daemon.stop()

    def start(self):
        args = []
        for node, size in SIZES.items():
            args += ['--blockdev', 'driver=null-co,node-name=%s,size=%d' % (node, size)]
        self.daemon = Daemon(args, qsd=True)
        self.nbd_path = self.daemon.path('nbd.sock')
        self.qmp = self.daemon.qmp()
        self.qmp.execute('nbd-server-start',
                         addr={'type': 'unix', 'data': {'path': self.nbd_path}})
        for node in SIZES:
            self.qmp.execute('block-export-add', type='nbd', id='e' + node, node_name=node,
                             writable=True)

    def both(self, line):
        self.script.append(line)

    def add(self, node, name, gran):
        self.qmp.execute('block-dirty-bitmap-add', {'node': node, 'name': name,
                                                     'granularity': gran})
        self.both('new %s/%s %d %d' % (node, name, SIZES[node], gran))

    def writes(self, rng, handles, count):
        for _ in range(count):
            node = rng.choice(list(SIZES))
            size = SIZES[node]
            off = rng.randrange(size)
            length = min(rng.choice([1, 100, 512, 4096, 65536 + 7, 300000, 3 << 20]), size - off)
            if rng.random() < 0.2:
                handles[node].zero(length, off)
            else:
                handles[node].pwrite(b'\xa5' * length, off)
            self.script.append('write@%s %d %d' % (node, off, length))

    def replay(self, queries):
        # A write marks the recording bitmaps of its own node only.
        lines, disabled = [], set()
        nodes = {}
        for line in self.script:
            w = line.split()
            if w[0] == 'new':
                nodes.setdefault(w[1].split('/')[0], []).append(w[1])
                lines.append(line)
            elif w[0].startswith('write@'):
                node = w[0].split('@')[1]
                # Disable everything of other nodes around the write.
                others = [b for n, bs in nodes.items() if n != node for b in bs
                          if b not in disabled]
                lines += ['disable ' + b for b in others]
                lines.append('write %s %s' % (w[1], w[2]))
                lines += ['enable ' + b for b in others]
            else:
                if w[0] == 'disable':
                    disabled.add(w[1])
                elif w[0] == 'enable':
                    disabled.discard(w[1])
                lines.append(line)
        lines += queries
        out = subprocess.run([REPLAY], input='\n'.join(lines) + '\n', capture_output=True,
                             text=True, check=True).stdout
        return out.split()

    def qsd_info(self):
        info = {}
        for n in self.qmp.execute('query-named-block-nodes'):
            for b in n.get('dirty-bitmaps', []):
                info['%s/%s' % (n['node-name'], b['name'])] = b
        return info

    def compare(self):
        names = sorted(self.qsd_info())
        queries = []
        for full in names:
            queries += ['count ' + full, 'sha256 ' + full]
        ours = self.replay(queries)
        info = self.qsd_info()
        for i, full in enumerate(names):
            node, name = full.split('/')
            sha = self.qmp.execute('x-debug-block-dirty-bitmap-sha256',
                                   {'node': node, 'name': name})['sha256']
            self.assertEqual(int(ours[2 * i]), info[full]['count'], 'count of ' + full)
            self.assertEqual(ours[2 * i + 1], sha, 'sha256 of ' + full)
        return len(names)

    def test_writes_clear_merge(self):
        self.start()
        rng = random.Random(20261124)
        for node in SIZES:
            for g in GRANS:
                self.add(node, 'g%d' % g, g)
        handles = {}
        try:
            for node in SIZES:
                h = nbd.NBD()
                h.set_export_name(node)
                h.connect_unix(self.nbd_path)
                handles[node] = h
            self.writes(rng, handles, 60)
            self.assertEqual(self.compare(), 15)

            # Disable one, clear another, write more.
            self.qmp.execute('block-dirty-bitmap-disable', {'node': 'd0', 'name': 'g65536'})
            self.both('disable d0/g65536')
            self.qmp.execute('block-dirty-bitmap-clear', {'node': 'd2', 'name': 'g4096'})
            self.both('clear d2/g4096')
            self.writes(rng, handles, 40)
            self.compare()

            # Merge every granularity into every other, on each node.
            for node in SIZES:
                for g in GRANS:
                    tgt = 'm%d' % g
                    self.add(node, tgt, g)
                    self.qmp.execute('block-dirty-bitmap-disable', {'node': node, 'name': tgt})
                    self.both('disable %s/%s' % (node, tgt))
                    for src in GRANS:
                        self.qmp.execute('block-dirty-bitmap-merge', node=node, target=tgt,
                                         bitmaps=['g%d' % src])
                        self.both('merge %s/%s %s/g%d' % (node, tgt, node, src))
            self.assertEqual(self.compare(), 30)
        finally:
            for h in handles.values():
                h.shutdown()


if __name__ == '__main__':
    REPLAY = sys.argv.pop(1)
    unittest.main(verbosity=2)
