"""The block-dirty-bitmap-* commands on cbtd and qemu-storage-daemon 7.2 side by side: every reply
(success or error text) and the resulting query-named-block-nodes `dirty-bitmaps` must be equal.
Where 7.2 crashes (merge with an empty list), cbtd alone is checked for its documented error."""
import unittest

from bitmappair import GiB, Pair

# SHA-256 of 2048 zero bytes: an empty 1 GiB bitmap at 64 KiB granularity.
EMPTY_1G_64K = 'e5a00aa9991ac8a5ee3109844d84a55583bd20572ad3ffcd42792f3c36b183ad'
LOOKUP_CMDS = ('block-dirty-bitmap-remove', 'block-dirty-bitmap-clear',
               'block-dirty-bitmap-enable', 'block-dirty-bitmap-disable',
               'x-debug-block-dirty-bitmap-sha256')


class BitmapQmp(unittest.TestCase):
    def setUp(self):
        self.p = Pair()
        self.addCleanup(self.p.stop)
        self.p.disk('d0')
        self.p.disk('r0', read_only=True)
        self.p.disk('d2', size=2 * GiB)

    def tearDown(self):
        self.assertTrue(self.p.alive(), 'a daemon died')

    def add(self, node, name, **kw):
        args = {'node': node, 'name': name}
        args.update({k.replace('_', '-'): v for k, v in kw.items()})
        return self.p.ok('block-dirty-bitmap-add', args)

    def test_add_defaults_and_query(self):
        self.assertIsNone(self.p.bitmaps()['d0'])
        self.add('d0', 'a')
        self.add('d0', 'b', granularity=512, disabled=True, persistent=False)
        self.add('d0', 'c', granularity=1 << 31)
        self.add('f-d0', 'a')        # protocol node, same name: fine
        self.add('r0', 'a')          # read-only node: transient bitmaps are allowed
        bms = self.p.bitmaps()
        self.assertEqual([b['name'] for b in bms['d0']], ['c', 'b', 'a'])  # newest first
        self.assertEqual(bms['d0'][2], {'name': 'a', 'recording': True, 'persistent': False,
                                        'busy': False, 'granularity': 65536, 'count': 0})
        self.assertIsNone(bms['d2'])
        self.assertEqual(self.p.ok('x-debug-block-dirty-bitmap-sha256',
                                   {'node': 'd0', 'name': 'a'}), {'sha256': EMPTY_1G_64K})
        self.p.ok('x-debug-block-dirty-bitmap-sha256', {'node': 'd0', 'name': 'c'})
        self.p.ok('x-debug-block-dirty-bitmap-sha256', {'node': 'd0', 'name': 'b'})

    def test_add_errors(self):
        self.p.ok('blockdev-add', {'driver': 'null-co', 'node-name': 'n0'})
        self.add('d0', 'a')
        cases = [
            ({'node': 'nope', 'name': '', 'granularity': 3}, 'Bitmap name cannot be empty'),
            ({'node': 'nope', 'name': 'x', 'granularity': 3},
             "Cannot find device='nope' nor node-name='nope'"),
            ({'node': 'd0', 'name': 'a', 'granularity': 3, 'persistent': True},
             'Granularity must be power of 2 and at least 512'),
            ({'node': 'd0', 'name': 'x', 'granularity': 0},
             'Granularity must be power of 2 and at least 512'),
            ({'node': 'd0', 'name': 'x', 'granularity': 256},
             'Granularity must be power of 2 and at least 512'),
            ({'node': 'd0', 'name': 'x', 'granularity': 511},
             'Granularity must be power of 2 and at least 512'),
            ({'node': 'd0', 'name': 'x', 'granularity': 1000},
             'Granularity must be power of 2 and at least 512'),
            # cbtd keeps persistent bitmaps of file and raw nodes (test_bitmap_persist.py);
            # null-co refuses them with qsd's words.
            ({'node': 'n0', 'name': 'a', 'persistent': True},
             "Can't store persistent bitmaps to n0: Operation not supported"),
            ({'node': 'd0', 'name': 'a'}, 'Bitmap already exists: a'),
            ({'node': 'd0', 'name': 'n' * 1024}, 'Bitmap name too long: ' + 'n' * 1024),
        ]
        for args, desc in cases:
            with self.subTest(args=args):
                self.p.fails('block-dirty-bitmap-add', args, desc)
        self.add('d0', 'n' * 1023)
        self.assertEqual(len(self.p.bitmaps()['d0']), 2)

    def test_add_argument_types(self):
        # Validation by the schema: the texts are the QMP visitor's.
        for args in ({'node': 'd0', 'name': 'x', 'granularity': -1},
                     {'node': 'd0', 'name': 'x', 'granularity': 1 << 32},
                     {'node': 'd0', 'name': 'x', 'granularity': 'big'},
                     {'node': 'd0', 'name': 'x', 'granularity': 4096.5},
                     {'node': 'd0', 'name': 'x', 'persistent': 'yes'},
                     {'node': 'd0'},
                     {'node': 'd0', 'name': 'x', 'bogus': 1},
                     {'node': 1, 'name': 'x'}):
            with self.subTest(args=args):
                r = self.p.same('block-dirty-bitmap-add', args)
                self.assertIn('error', r)
        self.assertIsNone(self.p.bitmaps()['d0'])

    def test_lookup_errors(self):
        self.add('d0', 'a')
        for cmd in LOOKUP_CMDS:
            with self.subTest(cmd=cmd):
                self.p.fails(cmd, {'node': 'nope', 'name': 'a'}, "Node 'nope' not found")
                self.p.fails(cmd, {'node': '', 'name': ''}, "Node '' not found")
                self.p.fails(cmd, {'node': 'd0', 'name': 'b'}, "Dirty bitmap 'b' not found")
                self.p.fails(cmd, {'node': 'f-d0', 'name': 'a'}, "Dirty bitmap 'a' not found")
                self.p.fails(cmd, {'node': 'd0', 'name': ''}, "Dirty bitmap '' not found")

    def test_enable_disable_clear_remove(self):
        self.add('d0', 'a')
        self.add('r0', 'a', disabled=True)
        for cmd, node in (('block-dirty-bitmap-disable', 'd0'),
                          ('block-dirty-bitmap-disable', 'd0'),
                          ('block-dirty-bitmap-enable', 'r0'),
                          ('block-dirty-bitmap-enable', 'r0'),
                          ('block-dirty-bitmap-clear', 'd0'),
                          ('block-dirty-bitmap-clear', 'r0'),
                          ('block-dirty-bitmap-enable', 'd0')):
            with self.subTest(cmd=cmd, node=node):
                self.p.ok(cmd, {'node': node, 'name': 'a'})
                self.p.state()
        self.p.ok('block-dirty-bitmap-remove', {'node': 'd0', 'name': 'a'})
        self.p.fails('block-dirty-bitmap-remove', {'node': 'd0', 'name': 'a'},
                     "Dirty bitmap 'a' not found")
        self.p.ok('block-dirty-bitmap-remove', {'node': 'r0', 'name': 'a'})
        bms = self.p.bitmaps()
        self.assertIsNone(bms['d0'])
        self.assertIsNone(bms['r0'])
        self.add('d0', 'a', granularity=4096)  # the name is free again
        self.assertEqual(self.p.bitmaps()['d0'][0]['granularity'], 4096)

    def test_merge(self):
        self.add('d0', 't')
        self.add('d0', 's', granularity=512, disabled=True)
        self.add('f-d0', 's', granularity=4096)
        self.add('d2', 'big')
        self.p.fails('block-dirty-bitmap-merge', {'node': 'nope', 'target': 't', 'bitmaps': ['s']},
                     "Node 'nope' not found")
        self.p.fails('block-dirty-bitmap-merge', {'node': 'd0', 'target': 'x', 'bitmaps': ['s']},
                     "Dirty bitmap 'x' not found")
        self.p.fails('block-dirty-bitmap-merge',
                     {'node': 'd0', 'target': 't', 'bitmaps': ['s', 'nope']},
                     "Dirty bitmap 'nope' not found")
        self.p.fails('block-dirty-bitmap-merge',
                     {'node': 'd0', 'target': 't', 'bitmaps': [{'node': 'zz', 'name': 's'}]},
                     "Node 'zz' not found")
        self.p.fails('block-dirty-bitmap-merge',
                     {'node': 'd0', 'target': 't', 'bitmaps': [{'node': 'd0', 'name': 'zz'}]},
                     "Dirty bitmap 'zz' not found")
        self.p.fails('block-dirty-bitmap-merge',
                     {'node': 'd0', 'target': 't', 'bitmaps': [{'node': 'd2', 'name': 'big'}]},
                     'Bitmaps are of different sizes (destination size is 1073741824, source '
                     'size is 2147483648) and can\'t be merged')
        self.p.fails('block-dirty-bitmap-merge',
                     {'node': 'd2', 'target': 'big', 'bitmaps': [{'node': 'd0', 'name': 's'}]},
                     'Bitmaps are of different sizes (destination size is 2147483648, source '
                     'size is 1073741824) and can\'t be merged')
        before = self.p.state()
        self.p.ok('block-dirty-bitmap-merge',
                  {'node': 'd0', 'target': 't',
                   'bitmaps': ['t', 's', {'node': 'f-d0', 'name': 's'}]})
        self.assertEqual(self.p.state(), before)
        # Wrong element types are the schema's business; both refuse.
        for bad in ([1], [None], [{'node': 'd0'}], 's'):
            with self.subTest(bitmaps=bad):
                r = self.p.same('block-dirty-bitmap-merge',
                                {'node': 'd0', 'target': 't', 'bitmaps': bad})
                self.assertIn('error', r)

    def test_merge_empty_list(self):
        # qsd 7.2 segfaults on this; cbtd refuses with a clear error and stays up.
        self.p.ok('block-dirty-bitmap-add', {'node': 'd0', 'name': 't'})
        r = self.p.one('cbtd', 'block-dirty-bitmap-merge',
                       {'node': 'd0', 'target': 't', 'bitmaps': []})
        self.assertEqual(r, {'error': {'class': 'GenericError',
                                       'desc': "Parameter 'bitmaps' must not be empty"}})
        r = self.p.one('cbtd', 'transaction', {'actions': [
            {'type': 'block-dirty-bitmap-merge',
             'data': {'node': 'd0', 'target': 't', 'bitmaps': []}}]})
        self.assertEqual(r['error']['desc'], "Parameter 'bitmaps' must not be empty")
        self.p.bitmaps()

    def test_node_deletion_drops_bitmaps(self):
        self.add('d0', 'a')
        self.add('f-d0', 'a')
        self.p.fails('blockdev-del', {'node-name': 'f-d0'}, 'Block device f-d0 is in use')
        self.p.ok('blockdev-del', {'node-name': 'd0'})
        self.assertNotIn('d0', self.p.bitmaps())
        self.p.ok('blockdev-add', {'driver': 'raw', 'node-name': 'd0', 'file': 'f-d0'})
        self.assertIsNone(self.p.bitmaps()['d0'])
        self.assertEqual(len(self.p.bitmaps()['f-d0']), 1)


if __name__ == '__main__':
    unittest.main(verbosity=2)
