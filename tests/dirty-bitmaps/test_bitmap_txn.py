"""`transaction` with bitmap actions on cbtd and qemu-storage-daemon 7.2 side by side: a failure
injected after every prefix of a list of actions must leave exactly the state before (bitmaps in
query-named-block-nodes and every bitmap's sha256, equal on both daemons), and successful
transactions must leave the same state on both."""
import unittest

from bitmappair import Pair, act

MiB = 1 << 20

# Writes that leave different bits at 512 B, 4 KiB and 64 KiB granularity.
WRITES_1 = [('write', 0, 100, 1), ('write', 3 * MiB + 700, 5000, 2), ('zero', 100 * MiB, 70000)]
WRITES_2 = [('write', 7 * MiB, 1, 3), ('write', 1023 * MiB, MiB, 4)]

STEPS = [
    act('block-dirty-bitmap-add', node='d0', name='n', granularity=512),
    act('block-dirty-bitmap-clear', node='d0', name='b'),
    act('block-dirty-bitmap-merge', node='d0', target='b', bitmaps=['a', {'node': 'f-d0',
                                                                           'name': 'p'}]),
    act('block-dirty-bitmap-enable', node='d0', name='a'),
    act('block-dirty-bitmap-disable', node='d0', name='b'),
    act('block-dirty-bitmap-remove', node='d0', name='a'),
    act('block-dirty-bitmap-merge', node='d0', target='n', bitmaps=['b']),
    act('block-dirty-bitmap-clear', node='f-d0', name='p'),
    act('block-dirty-bitmap-add', node='f-d0', name='n', disabled=True),
    act('block-dirty-bitmap-remove', node='d0', name='n'),
]

# Each fails on its own in the state the STEPS leave behind them (and before them).
# (action, error, whether qsd 7.2 survives it: an enable action whose lookup fails kills 7.2.)
FAILURES = [
    (act('abort'), 'Transaction aborted using Abort action', True),
    (act('block-dirty-bitmap-clear', node='d0', name='zz'), "Dirty bitmap 'zz' not found", True),
    (act('block-dirty-bitmap-disable', node='zz', name='b'), "Node 'zz' not found", True),
    (act('block-dirty-bitmap-enable', node='zz', name='b'), "Node 'zz' not found", False),
    (act('block-dirty-bitmap-enable', node='d0', name='zz'), "Dirty bitmap 'zz' not found", False),
    (act('block-dirty-bitmap-add', node='d0', name='b'), 'Bitmap already exists: b', True),
    (act('block-dirty-bitmap-add', node='d0', name='x', granularity=768),
     'Granularity must be power of 2 and at least 512', True),
    (act('block-dirty-bitmap-merge', node='d0', target='b', bitmaps=['zz']),
     "Dirty bitmap 'zz' not found", True),
    (act('block-dirty-bitmap-merge', node='d0', target='b',
         bitmaps=[{'node': 'd2', 'name': 'big'}]),
     'Bitmaps are of different sizes (destination size is 1073741824, source size is '
     '2147483648) and can\'t be merged', True),
]


class BitmapTransaction(unittest.TestCase):
    def setUp(self):
        self.p = Pair()
        self.addCleanup(self.p.stop)
        p = self.p
        p.disk('d0')
        p.disk('d2', size=2 << 30)
        p.ok('block-dirty-bitmap-add', {'node': 'd0', 'name': 'a', 'granularity': 4096})
        p.ok('block-dirty-bitmap-add', {'node': 'd0', 'name': 'b'})
        p.ok('block-dirty-bitmap-add', {'node': 'f-d0', 'name': 'p', 'granularity': 512})
        p.ok('block-dirty-bitmap-add', {'node': 'd2', 'name': 'big'})
        p.export('w', 'd0', writable=True)
        p.io('d0', WRITES_1)
        p.ok('block-dirty-bitmap-disable', {'node': 'd0', 'name': 'a'})
        p.io('d0', WRITES_2)

    def tearDown(self):
        self.assertTrue(self.p.alive(), 'a daemon died')

    def txn(self, actions, **props):
        args = {'actions': actions}
        if props:
            args['properties'] = {k.replace('_', '-'): v for k, v in props.items()}
        return self.p.same('transaction', args)

    def fails_cleanly(self, actions, desc, **props):
        before = self.p.state()
        r = self.txn(actions, **props)
        self.assertEqual(r, {'error': {'class': 'GenericError', 'desc': desc}})
        self.assertEqual(self.p.state(), before)

    def cbtd_fails_cleanly(self, actions, desc, **props):
        """For inputs where qsd 7.2 misbehaves: cbtd alone must refuse and change nothing."""
        before = self.p.state_of('cbtd')
        args = {'actions': actions}
        if props:
            args['properties'] = {k.replace('_', '-'): v for k, v in props.items()}
        r = self.p.one('cbtd', 'transaction', args)
        self.assertEqual(r, {'error': {'class': 'GenericError', 'desc': desc}})
        self.assertEqual(self.p.state_of('cbtd'), before)

    def test_failure_at_each_position(self):
        for n in range(len(STEPS) + 1):
            for failure, desc, qsd_survives in FAILURES:
                with self.subTest(prefix=n, failure=failure['type'], desc=desc):
                    if qsd_survives:
                        self.fails_cleanly(STEPS[:n] + [failure], desc)
                    else:
                        self.cbtd_fails_cleanly(STEPS[:n] + [failure], desc)
        # ... and the undo restored tracking too: writes still land where they did before.
        self.p.io('d0', [('write', 500 * MiB, 1, 9)])
        self.p.state()

    def test_all_steps_commit(self):
        self.assertEqual(self.txn(STEPS), {'return': {}})
        st = self.p.state()
        self.assertEqual([b['name'] for b in st['d0']], ['b'])
        self.assertEqual([b['name'] for b in st['f-d0']], ['n', 'p'])
        self.p.io('d0', [('write', 900 * MiB, 4096, 5)])
        self.p.state()

    def test_later_actions_see_earlier_ones(self):
        self.assertEqual(self.txn([act('block-dirty-bitmap-add', node='d0', name='tz'),
                                   act('block-dirty-bitmap-remove', node='d0', name='tz')]),
                         {'return': {}})
        self.assertEqual(len(self.p.bitmaps()['d0']), 2)
        self.fails_cleanly([act('block-dirty-bitmap-add', node='d0', name='t4'),
                            act('block-dirty-bitmap-add', node='d0', name='t4')],
                           'Bitmap already exists: t4')
        # A removal takes effect at commit: until then the bitmap is busy.
        self.fails_cleanly([act('block-dirty-bitmap-remove', node='d0', name='b'),
                            act('block-dirty-bitmap-add', node='d0', name='b')],
                           'Bitmap already exists: b')
        busy = "Bitmap 'b' is currently in use by another operation and cannot be used"
        for second in ('block-dirty-bitmap-clear', 'block-dirty-bitmap-remove',
                       'block-dirty-bitmap-disable'):
            with self.subTest(second=second):
                self.fails_cleanly([act('block-dirty-bitmap-remove', node='d0', name='b'),
                                    act(second, node='d0', name='b')], busy)
        # qsd 7.2 answers the same but leaves the recording bitmap b disabled (its enable undo
        # runs although the enable never happened): cbtd keeps b recording.
        self.cbtd_fails_cleanly([act('block-dirty-bitmap-remove', node='d0', name='b'),
                                 act('block-dirty-bitmap-enable', node='d0', name='b')], busy)
        self.fails_cleanly([act('block-dirty-bitmap-remove', node='d0', name='b'),
                            act('block-dirty-bitmap-merge', node='d0', target='a',
                                bitmaps=['b'])], busy)
        self.fails_cleanly([act('block-dirty-bitmap-add', node='d0', name='tz'),
                            act('block-dirty-bitmap-remove', node='d0', name='tz'),
                            act('abort')], 'Transaction aborted using Abort action')
        # Enable/disable undo restores the previous state, whatever it was.
        self.fails_cleanly([act('block-dirty-bitmap-enable', node='d0', name='b'),
                            act('block-dirty-bitmap-disable', node='d0', name='a'),
                            act('abort')], 'Transaction aborted using Abort action')

    def test_properties(self):
        self.assertEqual(self.txn([]), {'return': {}})
        self.assertEqual(self.txn([], completion_mode='grouped'), {'return': {}})
        grouped = "Action '%s' does not support Transaction property completion-mode = grouped"
        for kind in ('block-dirty-bitmap-clear', 'block-dirty-bitmap-disable',
                     'block-dirty-bitmap-remove'):
            with self.subTest(kind=kind):
                self.fails_cleanly([act(kind, node='d0', name='b')], grouped % kind,
                                   completion_mode='grouped')
        # qsd 7.2 crashes on this one (its enable undo runs on a bitmap it never looked up).
        self.cbtd_fails_cleanly([act('block-dirty-bitmap-enable', node='d0', name='b')],
                                grouped % 'block-dirty-bitmap-enable', completion_mode='grouped')
        self.fails_cleanly([act('block-dirty-bitmap-add', node='d0', name='g')],
                           "Action 'block-dirty-bitmap-add' does not support Transaction "
                           'property completion-mode = grouped', completion_mode='grouped')
        self.fails_cleanly([act('block-dirty-bitmap-merge', node='d0', target='b', bitmaps=['a'])],
                           "Action 'block-dirty-bitmap-merge' does not support Transaction "
                           'property completion-mode = grouped', completion_mode='grouped')
        self.fails_cleanly([act('abort')], 'Transaction aborted using Abort action',
                           completion_mode='grouped')
        self.assertEqual(self.txn([act('block-dirty-bitmap-clear', node='d0', name='b')],
                                  completion_mode='individual'), {'return': {}})

    def test_bad_actions(self):
        # Schema-level refusals: nothing runs, both daemons refuse.
        before = self.p.state()
        for actions in ([{'type': 'abort', 'data': {'x': 1}}],
                        [{'type': 'abort'}],
                        [{'type': 'bogus', 'data': {}}],
                        [{'data': {}}],
                        [act('block-dirty-bitmap-add', node='d0', name='ok'),
                         act('block-dirty-bitmap-add', node='d0')],
                        'abort'):
            with self.subTest(actions=actions):
                r = self.p.same('transaction', {'actions': actions})
                self.assertIn('error', r)
        for props in ({'completion-mode': 'both'}, {'x': 1}, []):
            with self.subTest(props=props):
                r = self.p.same('transaction', {'actions': [], 'properties': props})
                self.assertIn('error', r)
        self.assertEqual(self.p.state(), before)

    def test_checkpoint_chain(self):
        # Incremental backup checkpoints: freeze the current bitmap and start a new one at once.
        self.assertEqual(self.txn([act('block-dirty-bitmap-disable', node='d0', name='b'),
                                   act('block-dirty-bitmap-add', node='d0', name='c')]),
                         {'return': {}})
        self.p.io('d0', [('write', 64 * MiB, 65536, 6)])
        self.assertEqual(self.txn([act('block-dirty-bitmap-disable', node='d0', name='c'),
                                   act('block-dirty-bitmap-add', node='d0', name='e')]),
                         {'return': {}})
        self.p.io('d0', [('write', 65 * MiB, 512, 7)])
        # Changes since checkpoint b = b | c | e, gathered into a fresh disabled bitmap.
        self.assertEqual(self.txn([
            act('block-dirty-bitmap-add', node='d0', name='since-b', disabled=True),
            act('block-dirty-bitmap-merge', node='d0', target='since-b',
                bitmaps=['b', 'c', 'e'])]), {'return': {}})
        st = self.p.state()
        counts = {b['name']: b['count'] for b in st['d0']}
        self.assertEqual(counts['c'], 65536)
        self.assertEqual(counts['e'], 65536)
        self.assertGreaterEqual(counts['since-b'], counts['b'] + 65536)


if __name__ == '__main__':
    unittest.main(verbosity=2)
