"""Persistent bitmaps of file and raw nodes on the real daemon (docs/bitmaps.md, "Persistence"):
restart round trips of every state after a clean stop and after kill -9, a kill -9 campaign
under concurrent NBD writers with zero false negatives, damaged, foreign, missing and busy
stores, and a store that runs out of space.

Every check compares against what the test itself wrote (the image file read directly, or the
checksum taken before the stop), so a missing mark fails it."""
import hashlib
import os
import random
import shutil
import signal
import tempfile
import threading
import time
import unittest

from cbttest import Daemon, make_image, wait_for

import nbd

MiB = 1 << 20
GiB = 1 << 30


class Node:
    """One daemon over DIR/disk.img: file node f0, raw node d0 on it, exported writable as
    `vm` over a unix socket. The directory outlives restarts; the test removes it."""

    def __init__(self, test, size=256 * MiB, image='disk.img', extra_file='', dirpath=None,
                 export=True):
        self.test = test
        self.dir = dirpath or test.dir
        self.image = os.path.join(self.dir, image)
        self.store = self.image + '.cbt'
        self.nbd_sock = os.path.join(self.dir, 'nbd-%s.sock' % image)
        if not os.path.exists(self.image):
            make_image(self.image, size)
        self.args = ['--blockdev', 'driver=file,node-name=f0,filename=%s%s' % (self.image,
                                                                               extra_file),
                     '--blockdev', 'driver=raw,node-name=d0,file=f0']
        if export:
            self.args += ['--nbd-server', 'addr.type=unix,addr.path=' + self.nbd_sock,
                          '--export', 'type=nbd,id=vm,node-name=d0,name=vm,writable=on']
        self.d = None
        self.q = None

    def start(self):
        self.d = Daemon(self.args, tmpdir=self.dir)
        self.q = self.d.qmp()
        return self

    def kill9(self):
        self.d.proc.send_signal(signal.SIGKILL)
        self.d.proc.wait()
        self.d.stop()  # closes the log; nothing left to stop

    def stop(self):
        if self.d:
            self.d.stop()
            self.d = None

    def log(self):
        return self.d.stderr_text()

    def bitmaps(self, node='d0'):
        for n in self.q.execute('query-named-block-nodes'):
            if n['node-name'] == node:
                return {b['name']: b for b in n.get('dirty-bitmaps', [])}
        raise KeyError(node)

    def sha(self, name, node='d0'):
        return self.q.execute('x-debug-block-dirty-bitmap-sha256',
                              {'node': node, 'name': name})['sha256']

    def ok(self, cmd, **args):
        return self.q.execute(cmd, {k.replace('_', '-'): v for k, v in args.items()})

    def add(self, name, **args):
        return self.ok('block-dirty-bitmap-add', node='d0', name=name, **args)

    def nbd(self, export='vm', contexts=()):
        h = nbd.NBD()
        for c in contexts:
            h.add_meta_context(c)
        h.set_export_name(export)
        h.connect_unix(self.nbd_sock)
        return h

    def write(self, pairs):
        h = self.nbd()
        for off, data in pairs:
            h.pwrite(data, off)
        h.shutdown()

    def dirty_map(self, name, size, granularity):
        """The set of dirty chunk indexes of @name, read over NBD from a second export."""
        self.ok('block-export-add', type='nbd', id='bk', node_name='d0', name='bk',
                writable=True, bitmaps=[name])
        ctx = 'qemu:dirty-bitmap:' + name
        h = self.nbd('bk', [ctx])
        dirty = set()
        pos = 0

        def cb(meta, off, entries, err):
            nonlocal pos
            if meta != ctx:
                return 0
            for i in range(0, len(entries), 2):
                n, flags = entries[i], entries[i + 1]
                if flags & 1:
                    first = pos // granularity
                    last = (pos + n - 1) // granularity
                    dirty.update(range(first, last + 1))
                pos += n
            return 0
        while pos < size:
            h.block_status(min(size - pos, 1 << 30), pos, cb)
        h.shutdown()
        self.ok('block-export-del', id='bk')
        wait_for(lambda: all(e['id'] != 'bk' for e in self.q.execute('query-block-exports')),
                 what='export bk gone')
        return dirty


class Base(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='cbtd-persist-')
        self.nodes = []
        self.addCleanup(shutil.rmtree, self.dir, True)

    def tearDown(self):
        for n in self.nodes:
            n.stop()

    def node(self, **kw):
        n = Node(self, **kw)
        self.nodes.append(n)
        return n


def chunk_hashes(path, granularity):
    out = []
    with open(path, 'rb') as f:
        while True:
            b = f.read(granularity)
            if not b:
                return out
            out.append(hashlib.sha1(b).digest())


class RoundTrip(Base):
    """Every state comes back: same name, granularity, recording, bits, persistent: true."""

    def build_states(self, n, g):
        size = 4 * GiB
        n.add('rec', granularity=g, persistent=True)
        n.add('dis', granularity=g, persistent=True)
        n.add('clr', granularity=g, persistent=True)
        n.add('mrg', granularity=g, persistent=True, disabled=True)
        n.add('gone', granularity=g, persistent=True)
        n.add('mem', granularity=g)  # in memory only: gone after a restart
        n.write([(0, b'a' * 4096), (3 * GiB + 12345, b'b' * 70000), (size - 512, b'c' * 512)])
        n.ok('block-dirty-bitmap-disable', node='d0', name='dis')
        n.ok('block-dirty-bitmap-clear', node='d0', name='clr')
        n.write([(GiB + 7, b'd' * 100)])  # after the disable and the clear
        n.ok('block-dirty-bitmap-merge', node='d0', target='mrg', bitmaps=['dis', 'clr'])
        n.ok('block-dirty-bitmap-remove', node='d0', name='gone')
        # A transaction: one action kept, and an aborted one that must leave nothing behind.
        n.ok('transaction', actions=[
            {'type': 'block-dirty-bitmap-add',
             'data': {'node': 'd0', 'name': 'txn', 'granularity': g, 'persistent': True}}])
        err = n.q.error('transaction', {'actions': [
            {'type': 'block-dirty-bitmap-add',
             'data': {'node': 'd0', 'name': 'never', 'persistent': True}},
            {'type': 'block-dirty-bitmap-clear', 'data': {'node': 'd0', 'name': 'rec'}},
            {'type': 'abort', 'data': {}}]})
        self.assertEqual(err[1], 'Transaction aborted using Abort action')
        n.write([(2 * GiB, b'e' * 512)])

    def snapshot(self, n):
        bms = n.bitmaps()
        keep = ('recording', 'persistent', 'granularity', 'count', 'busy')
        return {name: ({k: b[k] for k in keep}, n.sha(name)) for name, b in bms.items()
                if name != 'mem'}

    def check_round_trip(self, g, how):
        n = self.node(size=4 * GiB).start()
        self.build_states(n, g)
        before = self.snapshot(n)
        self.assertEqual(set(before), {'rec', 'dis', 'clr', 'mrg', 'txn'})
        for name, (info, _) in before.items():
            self.assertTrue(info['persistent'], name)
        # Each state differs from the others, so a swapped or empty bitmap cannot pass (at 2 GiB
        # the 4 GiB node has two chunks, and every bitmap but the merge target has both set).
        if g < GiB:
            self.assertNotEqual(before['rec'][1], before['clr'][1])
            self.assertNotEqual(before['dis'][1], before['clr'][1])
        self.assertGreater(before['dis'][0]['count'], 0)
        self.assertGreater(before['rec'][0]['count'], 0)
        if how == 'sigterm':
            n.stop()
        elif how == 'quit':
            n.q.cmd('quit')
            n.d.proc.wait(20)
            self.assertEqual(n.d.proc.returncode, 0)
            n.stop()
        else:
            n.kill9()
        n.start()
        after = self.snapshot(n)
        self.assertEqual(after, before)
        bms = n.bitmaps()
        self.assertNotIn('mem', bms)
        want = 'process' if how == 'kill' else 'clean'
        for name, b in bms.items():
            self.assertEqual(b.get('recovery'), want, name)
            self.assertEqual(b.get('recovered-widening'), 0, name)
            self.assertIn('node d0: bitmap %s loaded from %s' % (name, n.store), n.log())
        # The recording ones go on recording (cleared first: at 2 GiB every chunk is set), the
        # disabled ones do not.
        n.add('empty', granularity=g, disabled=True)
        n.ok('block-dirty-bitmap-clear', node='d0', name='rec')
        self.assertEqual(n.sha('rec'), n.sha('empty'))
        n.write([(GiB // 2, b'f' * 512)])
        self.assertNotEqual(n.sha('rec'), n.sha('empty'))
        self.assertEqual(n.sha('dis'), before['dis'][1])
        self.assertEqual(n.sha('mrg'), before['mrg'][1])
        n.stop()

    def test_granularities_and_stops(self):
        for g in (512, 65536, 2 * GiB):
            for how in ('sigterm', 'quit', 'kill'):
                with self.subTest(granularity=g, stop=how):
                    try:
                        self.check_round_trip(g, how)
                    finally:
                        for n in self.nodes:
                            n.stop()
                        for f in os.listdir(self.dir):
                            os.unlink(os.path.join(self.dir, f))

    def test_query_and_null_refusal(self):
        n = Node(self, export=False)
        n.args += ['--blockdev', 'driver=null-co,node-name=n0']
        self.nodes.append(n)
        n.start()
        self.assertEqual(n.q.error('block-dirty-bitmap-add',
                                   {'node': 'n0', 'name': 'a', 'persistent': True})[1],
                         "Can't store persistent bitmaps to n0: Operation not supported")
        self.assertFalse(os.path.exists(n.store))
        n.add('a', persistent=True)
        self.assertTrue(os.path.exists(n.store))  # created by the first persistent bitmap
        self.assertTrue(n.bitmaps()['a']['persistent'])
        self.assertNotIn('recovery', n.bitmaps()['a'])  # not loaded: nothing to report
        # The file node below cannot have a store at the same path.
        err = n.q.error('block-dirty-bitmap-add', {'node': 'f0', 'name': 'b', 'persistent': True})
        self.assertIn("bitmap store '%s' is used by node 'd0'" % n.store, err[1])


class Lifecycle(Base):
    """blockdev-add loads a store (with an event a client sees), blockdev-del closes it cleanly,
    aborted transactions leave the store as they found it, a node grown or shrunk while the
    daemon was down keeps its bits, a read-only node refuses."""

    def plain(self):
        """A daemon with no nodes yet."""
        n = Node(self, export=False)
        n.args = []
        self.nodes.append(n)
        return n.start()

    def blockdev_add(self, n, read_only=False):
        n.ok('blockdev-add', driver='file', node_name='f0', filename=n.image,
             read_only=read_only)
        n.ok('blockdev-add', driver='raw', node_name='d0', file='f0', read_only=read_only)

    def test_blockdev_add_event_and_del(self):
        n = self.plain()
        self.blockdev_add(n)
        n.add('b', persistent=True)
        n.add('off', persistent=True, disabled=True)
        n.ok('blockdev-del', node_name='d0')
        n.ok('blockdev-del', node_name='f0')
        self.blockdev_add(n)
        ev = {e['data']['name']: e['data'] for e in
              (n.q.wait_event('BLOCK_DIRTY_BITMAP_LOADED') for _ in range(2))}
        self.assertEqual(ev['b'], {'node': 'd0', 'name': 'b', 'recording': True,
                                   'inconsistent': False, 'widened': 0, 'stop': 'clean'})
        self.assertEqual(ev['off']['recording'], False)
        b = n.bitmaps()['b']
        self.assertEqual((b['recovery'], b['recovered-widening']), ('clean', 0))
        self.assertNotIn('recovery-reason', b)
        # Loaded after a kill -9: "process", on the event and in the query.
        n.kill9()
        n = self.plain()
        self.blockdev_add(n)
        self.assertEqual(n.q.wait_event('BLOCK_DIRTY_BITMAP_LOADED')['data']['stop'], 'process')
        self.assertEqual(n.bitmaps()['b']['recovery'], 'process')
        self.assertEqual(n.bitmaps()['b']['recovered-widening'], 0)

    def test_aborted_transactions(self):
        n = self.node().start()
        n.add('a', persistent=True)
        n.add('d', persistent=True, disabled=True)
        n.write([(0, b'x' * 512), (50 * MiB, b'y' * 512)])
        n.ok('block-dirty-bitmap-merge', node='d0', target='d', bitmaps=['a'])
        before = {name: (b['recording'], n.sha(name)) for name, b in n.bitmaps().items()}
        for actions in (
                [('block-dirty-bitmap-remove', 'a')],
                [('block-dirty-bitmap-remove', 'd')],
                [('block-dirty-bitmap-disable', 'a'), ('block-dirty-bitmap-enable', 'd')],
                [('block-dirty-bitmap-clear', 'a'), ('block-dirty-bitmap-clear', 'd')]):
            with self.subTest(actions=actions):
                acts = [{'type': t, 'data': {'node': 'd0', 'name': name}}
                        for t, name in actions] + [{'type': 'abort', 'data': {}}]
                n.q.error('transaction', {'actions': acts})
                got = {name: (b['recording'], n.sha(name)) for name, b in n.bitmaps().items()}
                self.assertEqual(got, before)
        n.kill9()
        n.start()
        got = {name: (b['recording'], n.sha(name)) for name, b in n.bitmaps().items()}
        self.assertEqual(got, before)
        # And the recording one still records: a write lands in a only.
        n.write([(100 * MiB, b'z' * 512)])
        self.assertNotEqual(n.sha('a'), before['a'][1])
        self.assertEqual(n.sha('d'), before['d'][1])

    def test_resized_while_down(self):
        n = self.node(size=256 * MiB).start()
        n.add('b', persistent=True)
        n.write([(0, b'x' * 512), (200 * MiB, b'y' * 512)])
        n.stop()
        with open(n.image, 'r+b') as f:
            f.truncate(512 * MiB)
        n.start()
        dirty = n.dirty_map('b', 512 * MiB, 65536)
        self.assertEqual(dirty, {0, 200 * MiB // 65536})
        n.write([(400 * MiB, b'z' * 512)])
        n.stop()
        with open(n.image, 'r+b') as f:
            f.truncate(300 * MiB)
        n.start()
        self.assertEqual(n.dirty_map('b', 300 * MiB, 65536), {0, 200 * MiB // 65536})

    def test_read_only_node(self):
        n = self.node().start()
        n.add('b', persistent=True)
        n.stop()
        n = self.plain()
        self.blockdev_add(n, read_only=True)
        self.assertEqual(n.bitmaps(), {})
        err = n.q.error('block-dirty-bitmap-add', {'node': 'd0', 'name': 'c', 'persistent': True})
        self.assertIn('the node is read-only', err[1])

    def test_exported_persistent_bitmap_records(self):
        n = self.node().start()
        n.add('b', persistent=True)
        n.ok('block-export-add', type='nbd', id='bk', node_name='d0', name='bk',
             writable=True, bitmaps=['b'])
        self.assertTrue(n.bitmaps()['b']['busy'])
        n.write([(MiB, b'q' * 512)])
        self.assertEqual(n.bitmaps()['b']['count'], 65536)
        err = n.q.error('block-dirty-bitmap-remove', {'node': 'd0', 'name': 'b'})
        self.assertIn('currently in use', err[1])


class HostDevice(Base):
    """A host device keeps its store where bitmap-store says, else under --state-dir, else
    persistent bitmaps are refused with an error naming the option. (/dev/zero stands in for a
    device: host_device takes character devices too.)"""

    def daemon(self, extra, opts=''):
        d = Daemon(extra + ['--blockdev', 'driver=host_device,node-name=h0,filename=/dev/zero' +
                            opts], tmpdir=self.dir)
        self.addCleanup(d.stop)
        return d, d.qmp()

    def add(self, q):
        return q.cmd('block-dirty-bitmap-add', {'node': 'h0', 'name': 'b', 'persistent': True})

    def test_refused_without_a_place(self):
        d, q = self.daemon([])
        r = self.add(q)
        self.assertIn("Can't store persistent bitmaps to h0: host device '/dev/zero' has no place "
                      "for a bitmap store: set the node option bitmap-store", r['error']['desc'])

    def test_state_dir(self):
        state = os.path.join(self.dir, 'state')
        d, q = self.daemon(['--state-dir', state])
        self.assertEqual(self.add(q), {'return': {}})
        self.assertTrue(os.path.exists(os.path.join(state, 'bitmaps', 'h0.cbt')))

    def test_bitmap_store_option(self):
        where = os.path.join(self.dir, 'h0.store')
        d, q = self.daemon([], ',bitmap-store=' + where)
        self.assertEqual(self.add(q), {'return': {}})
        self.assertTrue(os.path.exists(where))


class KillCampaign(Base):
    """Writers over NBD, kill -9 at random points, restart: every chunk whose content changed
    since the last backup point is dirty in the recovered bitmap."""

    SIZE = 64 * MiB
    G = 65536
    ITERATIONS = 40
    WRITERS = 4

    def writer(self, n, seed, stop):
        rnd = random.Random(seed)
        try:
            h = n.nbd()
        except nbd.Error:
            return
        k = 0
        try:
            while not stop.is_set():
                k += 1
                length = rnd.choice((512, 4096, 65536, 100000, 300000))
                off = rnd.randrange(0, self.SIZE - length) // 512 * 512
                if rnd.random() < 0.1:
                    h.zero(length, off)
                else:
                    tag = ('%d:%d:%d;' % (seed, k, off)).encode()
                    h.pwrite((tag * (length // len(tag) + 1))[:length], off)
        except nbd.Error:
            pass  # the daemon was killed under us
        finally:
            try:
                h.close()
            except Exception:
                pass

    def test_kill9_campaign(self):
        seed = int(os.environ.get('CBT_SEED', time.time()))  # CBT_SEED=N replays a run
        rnd = random.Random(seed)
        n = self.node(size=self.SIZE).start()
        n.add('b', persistent=True)
        base = chunk_hashes(n.image, self.G)
        total_changed = total_widened = store_widened = 0
        deadline = time.monotonic() + 25
        for it in range(self.ITERATIONS):
            n.ok('block-dirty-bitmap-clear', node='d0', name='b')
            base = chunk_hashes(n.image, self.G)  # the backup point: no writer runs
            stop = threading.Event()
            threads = [threading.Thread(target=self.writer, args=(n, rnd.random(), stop))
                       for _ in range(self.WRITERS)]
            for t in threads:
                t.start()
            time.sleep(rnd.uniform(0.02, 0.4))
            n.kill9()
            stop.set()
            for t in threads:
                t.join(10)
            n.start()
            bm = n.bitmaps()['b']
            self.assertEqual(bm['recovery'], 'process')
            store_widened += bm['recovered-widening']
            dirty = n.dirty_map('b', self.SIZE, self.G)
            now = chunk_hashes(n.image, self.G)
            changed = {i for i, (a, b) in enumerate(zip(base, now)) if a != b}
            missing = changed - dirty
            self.assertEqual(missing, set(), 'seed %d, iteration %d: changed chunks not dirty'
                             % (seed, it))
            total_changed += len(changed)
            total_widened += len(dirty - changed)
            if time.monotonic() > deadline:
                break
        # The campaign must have exercised something, or it proves nothing.
        self.assertGreater(total_changed, 0)
        print('kill -9 campaign (seed %d): %d iterations, %d changed chunks, all dirty; %d '
              'chunks (%d KiB) dirty but unchanged (writes in flight at the kill, rewrites of '
              'equal data); recovery itself widened by %d bytes'
              % (seed, it + 1, total_changed, total_widened, total_widened * self.G // 1024,
                 store_widened))
        n.stop()


class DamagedStores(Base):
    """The daemon starts, the node opens, and a store that cannot be trusted never yields a
    bitmap with fewer bits than it had."""

    def prepared(self, kill=False, **kw):
        n = self.node(**kw).start()
        n.add('b', persistent=True)
        n.write([(0, b'x' * 4096), (100 * MiB, b'y' * 4096)])
        sha = n.sha('b')
        if kill:
            n.kill9()
        else:
            n.stop()
        return n, sha

    def assert_refused(self, n, words):
        err = n.q.error('block-dirty-bitmap-add', {'node': 'd0', 'name': 'new',
                                                   'persistent': True})[1]
        self.assertIn("Can't store persistent bitmaps to d0", err)
        self.assertIn(n.store, err)
        self.assertIn(words, err)

    def test_corrupt_headers_keep_directory(self):
        n, _ = self.prepared()
        with open(n.store, 'r+b') as f:
            f.write(os.urandom(8192))  # both header copies
        n.start()
        # Without a header the store cannot check its identity (the directory does not hold
        # it), so the file node, which opens first, takes the raw node's store: the bitmap
        # comes back inconsistent there. Either node is acceptable; a usable bitmap is not.
        on = [node for node in ('d0', 'f0') if 'b' in n.bitmaps(node)]
        self.assertEqual(len(on), 1, on)
        b = n.bitmaps(on[0])['b']
        self.assertTrue(b.get('inconsistent'))
        self.assertFalse(b['recording'])
        self.assertEqual(b['count'], 0)
        self.assertIn('bitmap b from %s is inconsistent' % n.store, n.log())
        self.assertEqual(n.q.error('block-dirty-bitmap-clear', {'node': on[0], 'name': 'b'})[1],
                         "Bitmap 'b' is inconsistent and cannot be used")
        n.ok('block-dirty-bitmap-remove', node=on[0], name='b')
        n.stop()
        n.start()
        self.assertNotIn('b', n.bitmaps(on[0]))

    def test_corrupt_beyond_use(self):
        n, _ = self.prepared()
        with open(n.store, 'r+b') as f:
            f.write(os.urandom(4 * MiB))  # headers and both directories
        n.start()
        self.assertEqual(n.bitmaps(), {})
        self.assertIn('is corrupt', n.log())
        self.assertIn(n.store, n.log())
        self.assert_refused(n, 'corrupt')
        n.ok('block-dirty-bitmap-add', node='d0', name='mem')  # the node works
        n.write([(0, b'z')])

    def test_truncated_metadata(self):
        self.check_truncated((0, 4096, 8192 + 4096))

    def test_truncated_area(self):
        # After a clean stop the area's checksum catches the cut, after a kill the area's last
        # byte, written when the area is placed (docs/bitmaps.md, "Reading a damaged store").
        self.check_truncated((None,))
        self.check_truncated((None,), kill=True)

    def check_truncated(self, cuts, kill=False):
        for cut in cuts:
            with self.subTest(cut=cut):
                n, sha = self.prepared(kill=kill)
                size = os.path.getsize(n.store)
                with open(n.store, 'r+b') as f:
                    f.truncate(size // 2 if cut is None else cut)
                n.start()
                b = n.bitmaps().get('b')
                if b is not None and not b.get('inconsistent'):
                    # Loaded as consistent: then it must have every bit it had.
                    self.assertEqual(n.sha('b'), sha)
                else:
                    self.assertIn(n.store, n.log())  # absent or inconsistent: said why
                n.stop()
                for f in os.listdir(self.dir):
                    os.unlink(os.path.join(self.dir, f))

    def test_foreign(self):
        n, _ = self.prepared()
        other = os.path.join(self.dir, 'other.img')
        make_image(other, 256 * MiB)
        shutil.copy(n.store, other + '.cbt')
        m = self.node(image='other.img').start()
        self.assertEqual(m.bitmaps(), {})
        self.assertIn('belongs to another device', m.log())
        self.assert_refused(m, 'belongs to another device')
        m.stop()
        n.start()  # the original is untouched
        self.assertIn('b', n.bitmaps())

    def test_missing(self):
        n, _ = self.prepared()
        os.unlink(n.store)
        n.start()
        self.assertEqual(n.bitmaps(), {})
        n.add('b2', persistent=True)
        n.stop()
        n.start()
        self.assertEqual(set(n.bitmaps()), {'b2'})

    def test_busy(self):
        n, _ = self.prepared()
        n.start()
        second = Node(self, export=False)
        second.args[1] += ',locking=off'
        self.nodes.append(second)
        second.start()
        self.assertEqual(second.bitmaps(), {})
        self.assertIn("Bitmap store '%s' is in use by another process" % n.store, second.log())
        self.assert_refused(second, 'in use by another process')
        second.stop()
        self.assertIn('b', n.bitmaps())

    def test_bitmap_store_option_and_bad_options(self):
        where = os.path.join(self.dir, 'elsewhere', 'my.cbt')
        n = self.node(extra_file=',bitmap-store=%s,bitmap-sync-interval=500,'
                      'bitmap-intent-region=2M' % where).start()
        n.add('b', persistent=True)
        self.assertTrue(os.path.exists(where))
        self.assertFalse(os.path.exists(n.store))
        n.stop()
        n.start()
        self.assertIn('b', n.bitmaps())
        n.stop()
        bad = Node(self, extra_file=',bitmap-intent-region=3M', export=False)
        with self.assertRaises(RuntimeError) as cm:
            bad.start()
        self.assertIn("'bitmap-intent-region' must be a power of two of at least 1 MiB",
                      str(cm.exception))


class FullDisk(Base):
    """ENOSPC on the store (the I/O layer's fault injection, CBTD_STORE_FAULT_FILE): an event
    and a log line, the writes go on, and the restart finds every written chunk dirty."""

    def test_enospc(self):
        fault = os.path.join(self.dir, 'fault')
        os.environ['CBTD_STORE_FAULT_FILE'] = fault
        self.addCleanup(os.environ.pop, 'CBTD_STORE_FAULT_FILE', None)
        n = self.node(size=256 * MiB).start()
        # At 512 B a page of the store's map covers 16 MiB: writes 17 MiB apart each need a new
        # block of the store, which the full disk refuses.
        # The injection fails writes into holes of the store file, not appends past its end:
        # a second bitmap written at the device's end puts b's map inside the file.
        g = 512
        n.add('b', persistent=True, granularity=g)
        n.add('pad', persistent=True, granularity=g)
        n.write([(0, b'a' * 4096), (256 * MiB - 512, b'z' * 512)])
        with open(fault, 'w') as f:
            f.write('enospc')
        offsets = [i * 17 * MiB + 4096 * i for i in range(1, 15)]
        n.write([(off, b'w' * 4096) for off in offsets])  # every write succeeds
        ev = n.q.wait_event('BLOCK_DIRTY_BITMAP_STORE_ERROR')
        self.assertEqual(ev['data']['node'], 'd0')
        self.assertEqual(ev['data']['store'], n.store)
        self.assertEqual(ev['data']['error'], os.strerror(28))
        self.assertIn('node d0: bitmap store %s' % n.store, n.log())
        # For a client that connects later, the query says so too.
        self.assertTrue(n.bitmaps()['b'].get('store-degraded'))
        dirty_before = n.dirty_map('b', 256 * MiB, g)
        for off in [0] + offsets:
            self.assertIn(off // g, dirty_before)
        n.kill9()
        os.unlink(fault)
        n.start()
        b = n.bitmaps()['b']
        self.assertNotIn('store-degraded', b)
        self.assertNotEqual(b['recovery'], 'clean')
        dirty = n.dirty_map('b', 256 * MiB, g)
        self.assertEqual({off // g for off in [0] + offsets} - dirty, set())
        print('ENOSPC: recovery %s, widened by %d bytes (%s)' % (
            b['recovery'], b['recovered-widening'], b.get('recovery-reason')))
        n.stop()

    def test_read_only_file_system(self):
        """The store's file system turns read-only (fault injection: every write, sync and
        open for writing of the store fails with EROFS). The event and the log say so, NBD
        writes go on, and after kill -9 and a restart with the file system writable again the
        bitmap comes back inconsistent, never short of the writes made meanwhile."""
        fault = os.path.join(self.dir, 'fault')
        os.environ['CBTD_STORE_FAULT_FILE'] = fault
        os.environ['CBTD_RUN_DIR'] = self.dir
        self.addCleanup(os.environ.pop, 'CBTD_STORE_FAULT_FILE', None)
        self.addCleanup(os.environ.pop, 'CBTD_RUN_DIR', None)
        n = self.node(size=256 * MiB).start()
        n.add('b', persistent=True, granularity=65536)
        n.write([(0, b'a' * 4096)])
        with open(fault, 'w') as f:
            f.write('erofs')
        offsets = [i * 65 * MiB for i in range(1, 4)]  # new intent regions
        n.write([(off, b'w' * 4096) for off in offsets])  # every write succeeds
        ev = n.q.wait_event('BLOCK_DIRTY_BITMAP_STORE_ERROR')
        self.assertEqual(ev['data']['error'], os.strerror(30))
        self.assertIn(os.strerror(30), n.log())
        self.assertTrue(n.bitmaps()['b'].get('store-degraded'))
        self.assertEqual(len([p for p in os.listdir(self.dir) if p.endswith('.store-failed')]), 1)
        n.kill9()
        os.unlink(fault)
        n.start()
        b = n.bitmaps()['b']
        self.assertTrue(b.get('inconsistent'))
        self.assertEqual(b['recovery-reason'],
                         'the store could not be written before the last stop')
        self.assertIn('inconsistent', n.log())
        self.assertEqual([p for p in os.listdir(self.dir) if p.endswith('.store-failed')], [])
        n.ok('block-dirty-bitmap-remove', node='d0', name='b')  # only remove works
        n.stop()

    def test_enospc_fails_a_merge_cleanly(self):
        """A command whose durable step fails fails, with memory as it was and the store not
        bringing back a bitmap with fewer bits than memory had."""
        fault = os.path.join(self.dir, 'fault')
        os.environ['CBTD_STORE_FAULT_FILE'] = fault
        self.addCleanup(os.environ.pop, 'CBTD_STORE_FAULT_FILE', None)
        n = self.node(size=256 * MiB).start()
        n.add('tgt', persistent=True, granularity=512, disabled=True)
        n.add('pad', persistent=True, granularity=512)  # puts tgt's map inside the file
        n.add('src', granularity=512)
        n.write([(256 * MiB - 512, b'z' * 512)])
        n.ok('block-dirty-bitmap-disable', node='d0', name='pad')
        empty = n.sha('tgt')
        n.write([(i * 17 * MiB, b'w' * 512) for i in range(1, 15)])
        with open(fault, 'w') as f:
            f.write('enospc')
        err = n.q.error('block-dirty-bitmap-merge', {'node': 'd0', 'target': 'tgt',
                                                     'bitmaps': ['src']})[1]
        self.assertIn("Bitmap 'tgt' of node 'd0'", err)
        self.assertIn(os.strerror(28), err)
        self.assertIn('the bitmap is unchanged and no longer persistent', err)
        self.assertEqual(n.sha('tgt'), empty)
        self.assertFalse(n.bitmaps()['tgt']['persistent'])
        self.assertTrue(n.bitmaps()['pad']['persistent'])
        os.unlink(fault)
        n.stop()
        n.start()
        self.assertEqual(set(n.bitmaps()), {'pad'})


if __name__ == '__main__':
    unittest.main(verbosity=2)
