"""Bitmaps and NBD on cbtd and qemu-storage-daemon 7.2 side by side: identical writes through a
writable export must leave identical bitmaps (count, sha256, and `nbdinfo --map` of the
qemu:dirty-bitmap context on a read-only export), and exporting bitmaps must follow qsd's rules
and texts. Where 7.2 accepts something broken or crashes, cbtd alone is checked for a refusal."""
import unittest

from bitmappair import GiB, Pair

MiB = 1 << 20
KiB = 1 << 10

# Writes of every alignment, including the first and last byte of the disk.
WRITES = [
    ('write', 0, 1, 1),
    ('write', 40 * MiB + 1000, 100, 2),
    ('write', 5 * MiB + 3, MiB, 3),
    ('write', 64 * KiB - 1, 2, 4),
    ('zero', 100 * MiB, 70000),
    ('zero', 300 * MiB, 4 * MiB),
    ('write', 512 * MiB - 512, 1024, 5),
    ('write', GiB - 1, 1, 6),
    ('flush',),
]
GRANULARITIES = (512, 4096, 65536, 1 << 31)
BUSY = "Bitmap '%s' is currently in use by another operation and cannot be used"


class BitmapNbd(unittest.TestCase):
    def setUp(self):
        self.p = Pair()
        self.addCleanup(self.p.stop)
        self.p.disk('d0')

    def tearDown(self):
        self.assertTrue(self.p.alive(), 'a daemon died')

    def add(self, node, name, **kw):
        args = {'node': node, 'name': name}
        args.update({k.replace('_', '-'): v for k, v in kw.items()})
        self.p.ok('block-dirty-bitmap-add', args)

    def maps(self, export, names):
        return {n: self.p.nbdinfo_map(export, 'qemu:dirty-bitmap:' + n) for n in names}

    def test_granularities(self):
        names = ['g%d' % g for g in GRANULARITIES]
        for g, name in zip(GRANULARITIES, names):
            self.add('d0', name, granularity=g)
        self.p.export('w', 'd0', writable=True)
        self.p.io('d0', WRITES)
        st = self.p.state()
        counts = {b['name']: b['count'] for b in st['d0']}
        self.assertEqual(counts['g2147483648'], 1 << 31)  # not clipped to the disk
        self.assertEqual(counts['g512'], 512 * (1 + 2 + 2049 + 2 + 137 + 8192 + 2 + 1))
        for name in names:
            self.p.ok('block-dirty-bitmap-disable', {'node': 'd0', 'name': name})
        self.p.export('ro', 'd0', bitmaps=names, name='ro')
        maps = self.maps('ro', names)
        self.assertIn('dirty', maps['g512'])
        self.assertEqual(maps['g2147483648'].split(), ['0', str(GiB), '1', 'dirty'])
        # Exported bitmaps are busy; only queries and the checksum work.
        self.assertTrue(all(b['busy'] for b in self.p.bitmaps()['d0']))
        self.p.fails('block-dirty-bitmap-clear', {'node': 'd0', 'name': 'g512'}, BUSY % 'g512')
        self.p.state()

    def test_recording_on_writable_export(self):
        # A bitmap exported by a writable export goes on recording (and is busy).
        self.add('d0', 'live', granularity=4096)
        self.p.export('w', 'd0', writable=True, bitmaps=['live'])
        self.p.io('d0', WRITES[:4])
        self.assertEqual(self.p.bitmaps()['d0'][0]['busy'], True)
        self.maps('d0', ['live'])
        self.p.io('d0', WRITES[4:])
        self.maps('d0', ['live'])
        self.p.state()

    def test_trim(self):
        # discard=ignore drops a trim before it reaches the bitmaps; discard=unmap marks them.
        self.p.disk('u0', discard='unmap')
        for node in ('d0', 'u0'):
            self.add(node, 'b', granularity=4096)
            self.p.export('w-' + node, node, writable=True, name=node)
            self.p.io(node, [('write', 8 * MiB, 8 * MiB, 7)])
            self.p.ok('block-dirty-bitmap-clear', {'node': node, 'name': 'b'})
            self.p.io(node, [('trim', 2 * MiB + 512, MiB), ('trim', 8 * MiB, 4 * MiB),
                             ('flush',)])
        st = self.p.state()
        self.assertEqual(st['d0'][0]['count'], 0)
        self.assertGreater(st['u0'][0]['count'], 0)
        self.p.ok('block-dirty-bitmap-disable', {'node': 'u0', 'name': 'b'})
        self.p.export('ro', 'u0', bitmaps=['b'], name='ro')
        self.maps('ro', ['b'])

    def test_merge(self):
        self.add('d0', 'a', granularity=4096)
        self.p.export('w', 'd0', writable=True)
        self.p.io('d0', WRITES[:3])
        self.add('d0', 'b', granularity=65536)
        self.p.io('d0', WRITES[3:])
        self.add('d0', 'm', granularity=512, disabled=True)
        self.add('d0', 'big', granularity=1 << 31, disabled=True)
        self.p.ok('transaction', {'actions': [
            {'type': 'block-dirty-bitmap-disable', 'data': {'node': 'd0', 'name': 'a'}},
            {'type': 'block-dirty-bitmap-disable', 'data': {'node': 'd0', 'name': 'b'}},
            {'type': 'block-dirty-bitmap-merge',
             'data': {'node': 'd0', 'target': 'm', 'bitmaps': ['a', 'b']}},
            {'type': 'block-dirty-bitmap-merge',
             'data': {'node': 'd0', 'target': 'big', 'bitmaps': ['m']}}]})
        self.p.ok('block-dirty-bitmap-merge', {'node': 'd0', 'target': 'a', 'bitmaps': ['b']})
        self.p.state()
        self.p.export('ro', 'd0', bitmaps=['a', 'b', 'm', 'big'], name='ro')
        self.maps('ro', ['a', 'b', 'm', 'big'])

    def test_odd_sizes(self):
        # A partial last chunk counts whole; an empty node still hashes one 64-bit word.
        for size in (0, 512, 100000):
            node = 'n%d' % size
            self.p.ok('blockdev-add', {'driver': 'null-co', 'node-name': node, 'size': size})
            for g in (512, 65536, 1 << 31):
                self.add(node, 'g%d' % g, granularity=g)
            if size:
                self.p.export(node, node, writable=True, name=node)
                self.p.io(node, [('write', 0, 1, 1), ('write', size - 1, 1, 2)])
        st = self.p.state()
        self.assertEqual({b['name']: b['count'] for b in st['n100000']},
                         {'g512': 1024, 'g65536': 131072, 'g2147483648': 1 << 31})

    def test_export_rules(self):
        p = self.p
        p.disk('r0', read_only=True)
        self.add('d0', 'rec')
        self.add('d0', 'off', disabled=True)
        self.add('f-d0', 'proto', disabled=True)
        self.add('r0', 'rec')
        p.nbd_start()

        def export_fails(desc, **kw):
            args = {'type': 'nbd', 'id': 'x', 'node-name': 'd0'}
            args.update(kw)
            p.fails('block-export-add', args, desc)

        export_fails("Bitmap 'nope' is not found", bitmaps=['nope'])
        export_fails("Bitmap 'proto' is not found", bitmaps=['proto'])  # not below raw's file
        export_fails("Dirty bitmap 'nope' not found", bitmaps=[{'node': 'd0', 'name': 'nope'}])
        export_fails("Node 'zz' not found", bitmaps=[{'node': 'zz', 'name': 'rec'}])
        export_fails("Enabled bitmap 'rec' incompatible with readonly export", bitmaps=['rec'])
        export_fails("Enabled bitmap 'rec' incompatible with readonly export",
                     bitmaps=['off', 'rec'])
        self.assertFalse(any(b['busy'] for b in p.bitmaps()['d0']))  # nothing left held

        p.export('e1', 'd0', bitmaps=['off', {'node': 'f-d0', 'name': 'proto'}], name='e1')
        p.export('e2', 'd0', writable=True, bitmaps=['rec'], name='e2')
        p.export('e3', 'r0', bitmaps=['rec'], name='e3')  # read-only node: recording is fine
        bms = p.bitmaps()
        self.assertTrue(all(b['busy'] for b in bms['d0'] + bms['f-d0'] + bms['r0']))
        export_fails(BUSY % 'off', bitmaps=['off'])
        export_fails(BUSY % 'rec', writable=True, bitmaps=['rec'])
        for cmd in ('block-dirty-bitmap-remove', 'block-dirty-bitmap-clear',
                    'block-dirty-bitmap-enable', 'block-dirty-bitmap-disable'):
            with self.subTest(cmd=cmd):
                p.fails(cmd, {'node': 'd0', 'name': 'off'}, BUSY % 'off')
        self.add('d0', 't')
        p.fails('block-dirty-bitmap-merge', {'node': 'd0', 'target': 't', 'bitmaps': ['off']},
                BUSY % 'off')
        p.fails('block-dirty-bitmap-merge', {'node': 'd0', 'target': 'off', 'bitmaps': ['t']},
                BUSY % 'off')
        p.fails('transaction', {'actions': [
            {'type': 'block-dirty-bitmap-remove', 'data': {'node': 'd0', 'name': 'rec'}}]},
            BUSY % 'rec')
        p.state()
        self.maps('e1', ['off', 'proto'])

        for eid in ('e1', 'e2', 'e3'):
            p.unexport(eid)
        self.assertFalse(any(b['busy'] for b in p.bitmaps()['d0']))
        p.ok('block-dirty-bitmap-remove', {'node': 'd0', 'name': 'off'})
        p.ok('block-dirty-bitmap-remove', {'node': 'f-d0', 'name': 'proto'})

    def test_cbtd_refuses_what_qsd_accepts(self):
        # 7.2 accepts these silently (docs/bitmaps.md, "Where cbtd differs"); cbtd refuses them.
        p = self.p
        p.disk('d2', size=2 * GiB)
        self.add('d0', 'rec')
        self.add('d2', 'big', disabled=True)
        p.nbd_start()
        for args, desc in (
                ({'bitmaps': [{'node': 'd0', 'name': 'rec'}]},
                 "Enabled bitmap 'rec' incompatible with readonly export"),
                ({'bitmaps': [{'node': 'd2', 'name': 'big'}]},
                 "Bitmap 'big' covers 2147483648 bytes but the export's node 'd0' has "
                 '1073741824')):
            with self.subTest(desc=desc):
                a = {'type': 'nbd', 'id': 'x', 'node-name': 'd0'}
                a.update(args)
                r = p.one('cbtd', 'block-export-add', a)
                self.assertEqual(r, {'error': {'class': 'GenericError', 'desc': desc}})
        self.assertFalse(any(b['busy'] for b in p.bitmaps_of('cbtd')['d2']))

    def test_cbtd_node_delete_while_exported(self):
        # 7.2 aborts when the node of a bitmap exported through another node's export goes away.
        p = self.p
        p.disk('d9')
        self.add('d9', 'b', disabled=True)
        p.nbd_start()
        r = p.one('cbtd', 'block-export-add', {'type': 'nbd', 'id': 'e', 'node-name': 'd0',
                                               'bitmaps': [{'node': 'd9', 'name': 'b'}]})
        self.assertEqual(r, {'return': {}})
        r = p.one('cbtd', 'blockdev-del', {'node-name': 'd9'})
        self.assertEqual(r, {'error': {'class': 'GenericError', 'desc': 'Node d9 is in use'}})
        self.assertTrue(p.bitmaps_of('cbtd')['d9'][0]['busy'])
        r = p.one('cbtd', 'block-export-del', {'id': 'e'})
        self.assertEqual(r, {'return': {}})
        p.qmp['cbtd'].wait_event('BLOCK_EXPORT_DELETED')
        self.assertFalse(p.bitmaps_of('cbtd')['d9'][0]['busy'])
        self.assertEqual(p.one('cbtd', 'blockdev-del', {'node-name': 'd9'}), {'return': {}})


if __name__ == '__main__':
    unittest.main(verbosity=2)
