"""Bitmap identity (docs/bitmaps.md, "Identity"): every named bitmap has a UUID and a creation
time from its creation, and `unbroken` says whether it has recorded every write since. On the
real daemon: what breaks the record (clear, disable, creation disabled) and what does not
(enable again, merge into it, an aborted transaction, crash recovery that widens it), a new
identity for a bitmap added again under the same name, and the identity and the break kept by
a persistent bitmap across a clean stop and kill -9, and what an NBD reader of an export
sees of it.

Run with /usr/bin/python3; CBTD names the daemon binary.
"""
import os
import re
import sys
import time
import unittest

import nbd

sys.path.insert(0, os.path.dirname(__file__))
from test_bitmap_persist import Base  # noqa: E402

UUID = re.compile(r'^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$')


class Identity(Base):
    def identity(self, n, name):
        b = n.bitmaps()[name]
        return b['bitmap-uuid'], b['bitmap-created'], b['unbroken'], b.get('broken-reason')

    def test_what_breaks_the_record(self):
        n = self.node().start()
        before = int(time.time())
        for name in ('rec', 'cleared', 'disabled', 'off', 'merged'):
            n.add(name)
        n.add('born-off', disabled=True)
        uuid, created, unbroken, reason = self.identity(n, 'rec')
        self.assertRegex(uuid, UUID)
        self.assertTrue(before - 1 <= created <= time.time() + 1)
        self.assertEqual((unbroken, reason), (True, None))
        self.assertEqual(len({self.identity(n, b)[0] for b in n.bitmaps()}), 6)  # all distinct

        n.ok('block-dirty-bitmap-clear', node='d0', name='cleared')
        n.ok('block-dirty-bitmap-disable', node='d0', name='disabled')
        n.ok('block-dirty-bitmap-disable', node='d0', name='off')
        n.ok('block-dirty-bitmap-enable', node='d0', name='off')  # re-enabled: still broken
        n.ok('block-dirty-bitmap-merge', node='d0', target='merged', bitmaps=['born-off'])
        got = {b: self.identity(n, b)[2:] for b in n.bitmaps()}
        self.assertEqual(got, {'rec': (True, None), 'cleared': (False, 'cleared'),
                               'disabled': (False, 'disabled'), 'off': (False, 'disabled'),
                               'merged': (True, None), 'born-off': (False, 'created disabled')})
        # The first reason stays.
        n.ok('block-dirty-bitmap-clear', node='d0', name='disabled')
        self.assertEqual(self.identity(n, 'disabled')[3], 'disabled')

        # An aborted transaction breaks nothing.
        reply = n.q.cmd('transaction', actions=[
            {'type': 'block-dirty-bitmap-clear', 'data': {'node': 'd0', 'name': 'rec'}},
            {'type': 'block-dirty-bitmap-disable', 'data': {'node': 'd0', 'name': 'merged'}},
            {'type': 'block-dirty-bitmap-clear', 'data': {'node': 'd0', 'name': 'nope'}}])
        self.assertIn('error', reply)
        self.assertEqual(self.identity(n, 'rec')[2:], (True, None))
        self.assertEqual(self.identity(n, 'merged')[2:], (True, None))

        # The same name again is another bitmap.
        old = self.identity(n, 'rec')[0]
        n.ok('block-dirty-bitmap-remove', node='d0', name='rec')
        n.add('rec')
        self.assertNotEqual(self.identity(n, 'rec')[0], old)

    def test_persistent_identity_survives_stops(self):
        n = self.node().start()
        n.add('p', persistent=True)
        n.add('q', persistent=True)
        n.add('r', persistent=True)
        n.ok('block-dirty-bitmap-clear', node='d0', name='q')
        n.ok('block-dirty-bitmap-disable', node='d0', name='r')
        first = {b: self.identity(n, b) for b in ('p', 'q', 'r')}
        n.stop()
        n.start()
        self.assertEqual({b: self.identity(n, b) for b in ('p', 'q', 'r')}, first)
        self.assertEqual(first['p'][2:], (True, None))
        self.assertEqual(first['q'][2:], (False, 'cleared'))
        self.assertEqual(first['r'][2:], (False, 'disabled'))

        # A kill -9 with writes in flight: recovered (exact or wider), still the same bitmap
        # and still unbroken.
        h = nbd.NBD()
        h.set_export_name('vm')
        h.connect_unix(n.nbd_sock)
        for i in range(64):
            h.pwrite(b'\x5a' * 65536, i * 1048576)
        h.shutdown()
        n.kill9()
        n.start()
        self.assertIn(n.bitmaps()['p']['recovery'], ('process', 'system'))
        self.assertEqual(self.identity(n, 'p'), first['p'])
        self.assertGreaterEqual(n.bitmaps()['p']['count'], 64 * 65536)

    def test_nbd_readers_see_it(self):
        """LIST_META_CONTEXT of `cbtd:` names each published bitmap's identity as it was when
        the export was made; such a name cannot be selected."""
        n = self.node().start()
        n.add('c1')
        n.add('old')
        n.ok('block-dirty-bitmap-disable', node='d0', name='old')
        uuid = self.identity(n, 'c1')[0]
        n.ok('block-export-add', type='nbd', id='snap', node_name='d0', name='snap',
             snapshot=True, bitmaps=['c1', 'old'], checkpoint='c2')
        uri = 'nbd+unix:///snap?socket=' + n.nbd_sock
        self.assertEqual(list_contexts(uri, 'cbtd:'), [
            'cbtd:bitmap-identity:c1:%s:unbroken' % uuid,
            'cbtd:bitmap-identity:old:%s:broken' % self.identity(n, 'old')[0]])
        self.assertEqual(list_contexts(uri, 'cbtd:bitmap-identity:c1'),
                         ['cbtd:bitmap-identity:c1:%s:unbroken' % uuid])
        self.assertEqual(list_contexts(uri, 'cbtd:bitmap-identity:nope'), [])
        h = nbd.NBD()
        h.add_meta_context('cbtd:bitmap-identity:c1:%s:unbroken' % uuid)
        h.add_meta_context('qemu:dirty-bitmap:c1')
        h.connect_uri(uri)
        self.assertFalse(h.can_meta_context('cbtd:bitmap-identity:c1:%s:unbroken' % uuid))
        self.assertTrue(h.can_meta_context('qemu:dirty-bitmap:c1'))
        h.shutdown()
        # The export froze c1 and started c2: c2 is a new, unbroken bitmap.
        self.assertEqual(self.identity(n, 'c2')[2:], (True, None))
        self.assertNotEqual(self.identity(n, 'c2')[0], uuid)


def list_contexts(uri, query):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    h.add_meta_context(query)
    got = []
    h.opt_list_meta_context(lambda name: got.append(name))
    h.opt_abort()
    return got


if __name__ == '__main__':
    unittest.main(verbosity=2)
