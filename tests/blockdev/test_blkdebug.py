#!/usr/bin/python3
"""The blkdebug error-injection driver on cbtd and qemu-storage-daemon 7.2, side by side.

Each scenario builds the same graph on both daemons (a file node, a blkdebug node over it, a
raw node over that where the events of QEMU's raw driver are wanted), exports it over NBD and
runs the same requests with libnbd: the transcript of every request (its data's digest, or the
errno the client saw) and of every QMP reply must be equal. Covered: errors on read, write,
zero-write, discard, flush and block status; `once` against a rule that stays; sector matching;
state transitions; the events of the raw driver, of flushes and of writes to the node itself;
align (padding reads and writes), max-transfer, opt-write-zero; the errno an NBD client sees;
the node serving on after its errors; query-named-block-nodes; blockdev-del; permissions; the
error texts of bad options. Where cbtd refuses what qemu-storage-daemon accepts (a config file,
a negative errno), the refusal is checked on cbtd alone.
"""
import errno
import hashlib
import json
import os
import shutil
import tempfile
import unittest

import nbd

import cbttest
from cbttest import Daemon
from test_blockdev_qmp import connect, normalise  # this script's directory is on sys.path

KiB = 1 << 10
SIZE = 1 << 20


def image_bytes():
    return bytes((i * 7 + i // 4096) & 0xff for i in range(SIZE))


class Env:
    """One daemon with an image, its QMP client and an NBD server on a unix socket."""

    def __init__(self, qsd):
        self.d = Daemon(qsd=qsd)
        self.handles = []
        try:
            self.q = connect(self.d)
            self.img = cbttest.make_image(self.d.path('disk.img'), SIZE, [(0, image_bytes())])
            self.sock = self.d.path('nbd.sock')
            self.q.execute('nbd-server-start',
                           addr={'type': 'unix', 'data': {'path': self.sock}})
        except BaseException:
            self.d.stop()
            raise

    def add(self, args):
        """blockdev-add: 'ok' or the error text."""
        text = json.dumps(args).replace('{img}', self.img)
        r = self.q.cmd('blockdev-add', json.loads(text))
        return 'ok' if 'return' in r else r['error']['desc']

    def export(self, node, writable=True, name='e'):
        self.q.execute('block-export-add', {'type': 'nbd', 'id': name, 'node-name': node,
                                            'name': name, 'writable': writable})

    def client(self, name='e', strict=True, meta=False):
        """Simple replies unless @meta: qemu-storage-daemon 7.2 drops a client with
        structured replies whose READ fails (its sparse read treats the error as a failure to
        send), so errors are compared where it reports them."""
        h = nbd.NBD()
        if meta:
            h.add_meta_context('base:allocation')
        else:
            h.set_request_structured_replies(False)
        if not strict:
            h.set_strict_mode(0)
        h.connect_uri('nbd+unix:///%s?socket=%s' % (name, self.sock))
        self.handles.append(h)
        return h

    def close(self):
        for h in self.handles:
            try:
                h.shutdown()
            except nbd.Error:
                pass
        self.handles = []
        self.d.stop()


def outcome(fn, *args):
    """What a client request did: 'ok' (with a digest of the data read) or the errno name."""
    try:
        r = fn(*args)
    except nbd.Error as e:
        return errno.errorcode.get(e.errno, e.errno)
    if isinstance(r, (bytes, bytearray)):
        return 'ok:' + hashlib.sha256(r).hexdigest()[:16]
    return 'ok'


def ops(h):
    """Shorthands for the transcript: each returns the outcome of one NBD request."""
    return {
        'read': lambda off, n: outcome(h.pread, n, off),
        'write': lambda off, n, fill=0x5a: outcome(h.pwrite, bytes([fill]) * n, off),
        'zero': lambda off, n, flags=0: outcome(h.zero, n, off, flags),
        'trim': lambda off, n: outcome(h.trim, n, off),
        'flush': lambda: outcome(h.flush),
        'status': lambda off, n: outcome(h.block_status, n, off, lambda *a: 0),
    }


def nodes(env):
    """query-named-block-nodes with the daemon's directory and generated names normalised."""
    text = json.dumps(env.q.execute('query-named-block-nodes'), sort_keys=True)
    return normalise(json.loads(text.replace(env.d.dir, '{dir}')))


def blkdebug(image='f0', **members):
    args = {'driver': 'blkdebug', 'node-name': 'dbg', 'image': image}
    args.update({k.replace('_', '-'): v for k, v in members.items()})
    return args


FILE = {'driver': 'file', 'node-name': 'f0', 'filename': '{img}'}
RAW = {'driver': 'raw', 'node-name': 'fmt', 'file': 'dbg', 'discard': 'unmap'}


class Base(unittest.TestCase):
    maxDiff = None

    def both(self, scenario):
        """Run @scenario(env) on qemu-storage-daemon, then on cbtd; the transcripts must be
        equal. Returns cbtd's."""
        out = []
        for qsd in (True, False):
            env = Env(qsd)
            try:
                out.append(scenario(env))
            finally:
                env.close()
        self.assertEqual(out[1], out[0])
        return out[1]

    def graph(self, env, dbg, raw=True, writable=True, **client):
        """FILE, the blkdebug node @dbg over it, RAW over that when @raw, exported."""
        for args in (FILE, dbg) + ((RAW,) if raw else ()):
            self.assertEqual(env.add(args), 'ok', args)
        env.export('fmt' if raw else 'dbg', writable)
        return ops(env.client(**client))


class TestRules(Base):
    def test_read_error_stays_and_arms_writes(self):
        """An error rule on read_aio (raised by the raw node above) fails every read once
        armed, and, being of every kind but block-status by default, the writes, zero-writes
        and flushes too; before the first read nothing fails."""
        def run(env):
            o = self.graph(env, blkdebug(inject_error=[{'event': 'read_aio'}]))
            return [o['write'](0, 4096), o['read'](0, 4096), o['read'](8192, 512),
                    o['write'](0, 4096), o['zero'](0, 4096), o['flush']()]
        t = self.both(run)
        self.assertEqual(t, ['ok', 'EIO', 'EIO', 'EIO', 'EIO', 'EIO'])

    def test_once_against_staying(self):
        """`once` fails one request and the node serves on; without it every request
        fails."""
        def run(env):
            o = self.graph(env, blkdebug(inject_error=[
                {'event': 'read_aio', 'errno': 28, 'once': True, 'iotype': 'read'}]))
            return [o['read'](0, 4096), o['read'](0, 4096), o['read'](4096, 4096)]
        self.assertEqual(self.both(run), ['ENOSPC', 'ok:' + digest(0, 4096),
                                          'ok:' + digest(4096, 4096)])

    def test_sector(self):
        """A rule with a sector fails only the requests that cover it."""
        def run(env):
            o = self.graph(env, blkdebug(inject_error=[
                {'event': 'read_aio', 'sector': 9, 'iotype': 'read'},
                {'event': 'write_aio', 'sector': 20, 'iotype': 'write', 'errno': 1}]))
            return [o['read'](0, 4608), o['read'](0, 4609), o['read'](4608, 512),
                    o['read'](5120, 4096), o['read'](0, 65536),
                    o['write'](0, 10240), o['write'](0, 10241), o['write'](10240, 1)]
        self.assertEqual(self.both(run)[:4], ['ok:' + digest(0, 4608), 'EIO', 'EIO',
                                              'ok:' + digest(5120, 4096)])

    def test_state_transitions(self):
        """set-state moves the node from state 1 on write_aio; the error rule waits for
        state 2; the first matching set-state rule of an event decides."""
        def run(env):
            o = self.graph(env, blkdebug(
                inject_error=[{'event': 'read_aio', 'state': 2, 'iotype': 'read'}],
                set_state=[{'event': 'write_aio', 'state': 1, 'new_state': 2},
                           {'event': 'write_aio', 'new_state': 7},
                           {'event': 'flush_to_disk', 'state': 2, 'new_state': 3}]))
            return [o['read'](0, 512), o['write'](0, 512), o['read'](0, 512),
                    o['flush'](), o['read'](0, 512), o['read'](0, 512)]
        t = self.both(run)
        self.assertEqual(t[1:4], ['ok', 'EIO', 'ok'])

    def test_flush_to_disk_needs_a_write(self):
        """A flush error armed by flush_to_disk: a flush with nothing written raises nothing
        and succeeds; after a write it fails, and again until a flush succeeds."""
        def run(env):
            o = self.graph(env, blkdebug(inject_error=[
                {'event': 'flush_to_disk', 'iotype': 'flush', 'errno': 5}]))
            return [o['flush'](), o['write'](0, 512), o['flush'](), o['flush'](),
                    o['read'](0, 512)]
        self.assertEqual(self.both(run)[:4], ['ok', 'ok', 'EIO', 'EIO'])

    def test_write_events_on_the_node_itself(self):
        """Exported without raw above, the node raises pwritev, pwritev_zero and pwritev_done
        on its own writes, before the request is checked."""
        def run(env):
            o = self.graph(env, blkdebug(
                inject_error=[{'event': 'pwritev', 'iotype': 'write', 'once': True},
                              {'event': 'pwritev_zero', 'iotype': 'write-zeroes',
                               'errno': 28}]), raw=False)
            return [o['read'](0, 512), o['write'](0, 512), o['write'](0, 512),
                    o['zero'](0, 4096), o['zero'](0, 4096), o['write'](0, 512),
                    o['read'](0, 512)]
        self.assertEqual(self.both(run)[:5], ['ok:' + digest(0, 512), 'EIO', 'ok', 'ENOSPC',
                                              'ENOSPC'])

    def test_errno_as_nbd_maps_it(self):
        """The client sees the errno as NBD maps it: EPERM, EIO, ENOMEM, ENOSPC pass;
        EACCES, EINVAL and an unknown number arrive as EINVAL. (ENOTSUP is not compared:
        cbtd sends NBD_ENOTSUP only to a fast zero-write, as the NBD specification asks,
        where qemu-storage-daemon 7.2 sends it to any request: docs/nbd-server.md.)"""
        codes = [1, 5, 12, 28, 13, 22, 1000]
        def run(env):
            o = self.graph(env, blkdebug(inject_error=[
                {'event': 'read_aio', 'errno': e, 'sector': i * 8, 'iotype': 'read'}
                for i, e in enumerate(codes)]))
            return [o['read'](i * 4096, 512) for i in range(len(codes))]
        self.assertEqual(self.both(run), ['EPERM', 'EIO', 'ENOMEM', 'ENOSPC', 'EINVAL',
                                          'EINVAL', 'EINVAL'])

    def test_discard(self):
        """A discard rule fails the discards that reach the node (raw above and the node pass
        them with discard=unmap) and nothing else; a rule with errno 0 armed in its place lets
        them through."""
        def run(env):
            o = self.graph(env, blkdebug(discard='unmap', inject_error=[
                {'event': 'write_aio', 'iotype': 'discard', 'errno': 28},
                {'event': 'read_aio', 'errno': 0}]), meta=True)
            return [o['trim'](0, 65536), o['write'](0, 512), o['read'](4096, 512),
                    o['write'](0, 512), o['trim'](0, 65536), o['zero'](0, 4096),
                    o['flush'](), o['read'](0, 512), o['trim'](0, 65536)]
        self.assertEqual(self.both(run)[3:7], ['ok', 'ENOSPC', 'ok', 'ok'])

    def test_block_status_cbtd(self):
        """A block-status rule fails the node's status lookups. cbtd's NBD server answers a
        failed lookup with "data" (docs/nbd-server.md, "Block status") where
        qemu-storage-daemon 7.2 sends the error, so this is cbtd's alone: the hole of the
        image is reported as a hole until the rule is armed, then as data, and reads go on."""
        env = Env(False)
        try:
            with open(env.img, 'r+b') as f:
                os.truncate(f.fileno(), SIZE // 2)
                os.truncate(f.fileno(), SIZE)
            o = self.graph(env, blkdebug(inject_error=[
                {'event': 'read_aio', 'iotype': 'block-status', 'errno': 12}]), meta=True)
            h = env.handles[-1]

            def hole_at_end():
                seen = []
                h.block_status(SIZE // 2, SIZE // 2,
                               lambda ctx, off, entries, err: seen.extend(entries[1::2]))
                return seen[0] & nbd.STATE_HOLE != 0
            self.assertTrue(hole_at_end())
            self.assertEqual(o['read'](0, 512), 'ok:' + digest(0, 512))
            self.assertFalse(hole_at_end())
            self.assertEqual(o['read'](0, 4096), 'ok:' + digest(0, 4096))
        finally:
            env.close()

    def test_event_none_arms_at_open(self):
        """A rule of the event `none` is armed when the node opens."""
        def run(env):
            o = self.graph(env, blkdebug(inject_error=[{'event': 'none', 'iotype': 'read'}]))
            return [o['read'](0, 512), o['write'](0, 512)]
        self.both(run)


class TestLimits(Base):
    def test_align_pads(self):
        """With align 4096 a read of 512 bytes is a read of its 4 KiB block (a rule on a
        sector of the block fails it), and an unaligned write raises the padding events:
        a write rule they arm fails the write itself."""
        def run(env):
            o = self.graph(env, blkdebug(align=4096, inject_error=[
                {'event': 'none', 'iotype': 'read', 'sector': 15, 'errno': 28},
                {'event': 'pwritev_rmw_after_tail', 'iotype': 'write', 'errno': 1,
                 'once': True}]), raw=False, strict=False)
            return [o['read'](0, 512), o['read'](4096, 512), o['read'](7680, 4096),
                    o['write'](12288, 4096), o['write'](12288, 512), o['write'](12288, 512),
                    o['read'](12288, 4096), o['zero'](16384 + 100, 200),
                    o['read'](16384, 4096)]
        t = self.both(run)
        self.assertEqual(t[:6], ['ok:' + digest(0, 512), 'ENOSPC', 'ENOSPC', 'ok', 'EPERM',
                                 'ok'])

    def test_padding_event_order(self):
        """The order of the padding events, read through state transitions: head, then
        after_head; tail and after_tail around a separate tail read. Each final state arms
        an error rule whose errno tells it."""
        states = [{'event': 'pwritev_rmw_head', 'state': 1, 'new_state': 2},
                  {'event': 'pwritev_rmw_after_head', 'state': 2, 'new_state': 3},
                  {'event': 'pwritev_rmw_head', 'state': 3, 'new_state': 4},
                  {'event': 'pwritev_rmw_after_head', 'state': 4, 'new_state': 5},
                  {'event': 'pwritev_rmw_tail', 'state': 3, 'new_state': 6},
                  {'event': 'pwritev_rmw_after_tail', 'state': 6, 'new_state': 7}]
        errors = [{'event': 'pwritev', 'state': st, 'iotype': 'read', 'errno': e}
                  for st, e in ((1, 1), (2, 12), (3, 5), (4, 28), (5, 108), (6, 22),
                                (7, 13))]
        def run(env):
            out = []
            for n, (off, length) in enumerate(((512, 512), (0, 512), (512, 8192),
                                               (512, 4096))):
                node = 'dbg%d' % n
                env.add(blkdebug({'driver': 'file', 'filename': '{img}'}, node_name=node,
                                 align=4096, set_state=states, inject_error=errors))
                env.export(node, name=node)
                o = ops(env.client(name=node, strict=False))
                out.append([o['write'](off, length), o['write'](65536, 4096),
                            o['read'](0, 4096)])
            return out
        self.assertEqual(self.both(run), [['ok', 'ok', 'EIO'], ['ok', 'ok', 'EPERM'],
                                          ['ok', 'ok', 'EINVAL'], ['ok', 'ok', 'EIO']])

    def test_failed_padding_read_cbtd(self):
        """A read rule that fails the padding read of an unaligned write fails the write and
        leaves the image as it was. (qemu-storage-daemon 7.2 ignores the failed read, answers
        success and writes the unread padding around the data: not compared.)"""
        env = Env(False)
        try:
            o = self.graph(env, blkdebug(align=4096, inject_error=[
                {'event': 'pwritev_rmw_head', 'iotype': 'read', 'errno': 28}]),
                raw=False, strict=False)
            self.assertEqual(o['write'](512, 512), 'ENOSPC')
            self.assertEqual(o['write'](16384 + 512, 8192), 'ENOSPC')
            self.assertEqual(o['write'](32768, 4096), 'ok')
            with open(env.img, 'rb') as f:
                data = f.read()
            ref = bytearray(image_bytes())
            ref[32768:36864] = b'\x5a' * 4096
            self.assertEqual(data, bytes(ref))
        finally:
            env.close()

    def test_opt_write_zero_falls_back_to_writes(self):
        """Pieces of a zero-write not aligned to opt-write-zero are written as data, so a
        write rule fails them; the aligned middle is a zero-write."""
        def run(env):
            o = self.graph(env, blkdebug(opt_write_zero=65536, inject_error=[
                {'event': 'pwritev_zero', 'iotype': 'write', 'errno': 1}]), raw=False)
            return [o['zero'](0, 65536), o['zero'](65536, 131072), o['zero'](4096, 65536),
                    o['zero'](0, 65536 + 512), o['read'](0, 131072)]
        self.assertEqual(self.both(run)[:4], ['ok', 'ok', 'EPERM', 'EPERM'])

    def test_max_transfer(self):
        """max-transfer cuts reads and writes into pieces; each piece is checked, and the
        data stays whole."""
        def run(env):
            o = self.graph(env, blkdebug(max_transfer=65536, inject_error=[
                {'event': 'read_aio', 'sector': 300, 'iotype': 'read', 'once': True}]))
            return [o['read'](0, 262144), o['read'](0, 262144), o['write'](4096, 200000, 7),
                    o['read'](0, 262144)]
        self.assertEqual(self.both(run)[:2], ['EIO', 'ok:' + digest(0, 262144)])


    def test_block_sizes_advertised(self):
        """The NBD export advertises align as the minimum block size and max-transfer (the
        smallest on the way down) as the maximum, as qemu-storage-daemon does; requests
        longer than it are still served. (A raw node over the blkdebug node advertises
        align as its minimum in cbtd, 1 in 7.2, whose raw node has no alignment of its
        own: not compared.)"""
        def run(env):
            out = [env.add(FILE), env.add(blkdebug(max_transfer=65536, align=4096)),
                   env.add(RAW), env.add(blkdebug(node_name='d2', align=512)),
                   env.add({'driver': 'raw', 'node-name': 'r2',
                            'file': {'driver': 'blkdebug', 'image': 'f0',
                                     'max-transfer': 131072}})]
            for node in ('dbg', 'fmt', 'd2', 'r2', 'f0'):
                env.export(node, writable=False, name=node)
                h = env.client(name=node)
                out.append([h.get_block_size(nbd.SIZE_MAXIMUM),
                            h.get_block_size(nbd.SIZE_PREFERRED), h.get_size()])
                if node != 'fmt':
                    out[-1].append(h.get_block_size(nbd.SIZE_MINIMUM))
                out.append(outcome(h.pread, 1 << 20, 0))
            return out
        t = self.both(run)
        self.assertEqual([t[i][0] for i in (5, 7, 9, 11, 13)],
                         [65536, 65536, 32 << 20, 131072, 32 << 20])
        self.assertEqual(t[5][3], 4096)

    def test_max_transfer_nbd_payload(self):
        """A write longer than max-transfer is cut and lands whole."""
        def run(env):
            o = self.graph(env, blkdebug(max_transfer=65536), strict=False)
            return [o['write'](4096, 300000, 3), o['read'](0, SIZE)]
        self.both(run)


class TestNode(Base):
    def test_query_and_del(self):
        """query-named-block-nodes shows the node as qemu-storage-daemon does (its file name
        `blkdebug::FILE`, or json:{...} with rules; the image as its backing image), inline
        images listed newer than the node; blockdev-del removes it with its inline image,
        and refuses it while exported."""
        def run(env):
            out = [env.add(FILE), env.add(blkdebug()), nodes(env)]
            out.append(env.q.cmd('blockdev-del', node_name='f0'))
            out.append(env.q.cmd('blockdev-del', node_name='dbg'))
            out += [env.add(blkdebug(image={'driver': 'file', 'filename': '{img}'},
                                     inject_error=[{'event': 'read_aio', 'sector': 3,
                                                    'once': True, 'iotype': 'read'}],
                                     set_state=[{'event': 'write_aio', 'new_state': 2}],
                                     align=512, max_discard=65536)), nodes(env)]
            env.export('dbg')
            out.append(env.q.cmd('blockdev-del', node_name='dbg'))
            env.q.execute('block-export-del', id='e')
            cbttest.wait_for(lambda: not env.q.execute('query-block-exports'))
            out.append(env.q.cmd('blockdev-del', node_name='dbg'))
            out += [nodes(env), env.add(dict(RAW, file={'driver': 'blkdebug',
                                                         'image': dict(FILE, **{'node-name':
                                                                                'img'})}))]
            out.append(nodes(env))
            return out
        t = self.both(run)
        self.assertEqual(t[2][0]['file'], 'blkdebug::{dir}/disk.img')

    def test_block_resize(self):
        """block_resize of the node (and of a raw node over it) resizes the image and the
        node follows; the rules hold past the old end. (With an export on a node, both
        daemons refuse: the export does not share resize.)"""
        def run(env):
            out = [env.add(FILE), env.add(blkdebug(inject_error=[
                {'event': 'read_aio', 'iotype': 'read', 'sector': (SIZE + 4096) // 512}])),
                env.add(RAW)]
            out += [env.q.cmd('block_resize', node_name='dbg', size=2 * SIZE),
                    [(n['node-name'], n['image']['virtual-size']) for n in nodes(env)],
                    env.q.cmd('block_resize', node_name='fmt', size=3 * SIZE),
                    [(n['node-name'], n['image']['virtual-size']) for n in nodes(env)],
                    os.path.getsize(env.img)]
            env.export('fmt')
            o = ops(env.client())
            out += [o['read'](SIZE, 4096), o['read'](SIZE + 4096, 512), o['read'](0, 512),
                    env.q.cmd('block_resize', node_name='dbg', size=4 * SIZE)]
            return out
        t = self.both(run)
        self.assertEqual(t[7:10], [3 * SIZE, 'ok:' + hashlib.sha256(bytes(4096)).hexdigest()[:16],
                                   'EIO'])

    def test_serves_after_errors(self):
        """After a run of failures the node still reads and writes the image's data."""
        def run(env):
            o = self.graph(env, blkdebug(inject_error=[
                {'event': 'write_aio', 'iotype': 'write', 'once': True},
                {'event': 'read_aio', 'iotype': 'read', 'once': True}]))
            out = [o['read'](0, 4096), o['read'](0, 4096), o['write'](0, 4096, 9),
                   o['write'](0, 4096, 9), o['read'](0, 8192), o['flush']()]
            with open(env.img, 'rb') as f:
                out.append(hashlib.sha256(f.read(8192)).hexdigest()[:16])
            return out
        t = self.both(run)
        self.assertEqual(t[:2], ['EIO', 'ok:' + digest(0, 4096)])
        self.assertEqual(t[2:4], ['EIO', 'ok'])

    def test_permissions(self):
        """unshare-child-perms keeps writers off the image; take-child-perms takes what it
        names."""
        def run(env):
            out = [env.add(FILE), env.add(blkdebug(unshare_child_perms=['write']))]
            out.append(env.q.cmd('block-export-add', type='nbd', id='x', node_name='f0',
                                 writable=True))
            out.append(env.q.cmd('block-export-add', type='nbd', id='y', node_name='f0'))
            out.append(env.add(dict(FILE, **{'node-name': 'ro', 'read-only': True})))
            out.append(env.add(blkdebug('ro', node_name='d2', take_child_perms=['write'])))
            return out
        self.both(run)


class TestUsers(Base):
    def test_padded_writes_race(self):
        """Unaligned writes into the same 4 KiB blocks from four connections at once, 40
        rounds: every one lands (a padded write holds its blocks from its read to its write;
        without that, some rounds lose writes)."""
        def run(env):
            self.graph(env, blkdebug(align=4096), raw=False)
            hs = [env.client(strict=False) for _ in range(4)]
            out = []
            for rnd in range(40):
                for n, h in enumerate(hs):
                    for sector in range(n, 1024, 4):
                        # The completion retires the command (its data is checked below).
                        h.aio_pwrite(bytes([rnd % 15 * 16 + n + 1]) * 512, sector * 512,
                                     completion=lambda err: 1)
                while any(h.aio_in_flight() for h in hs):
                    for h in hs:
                        if h.aio_in_flight():
                            h.poll(0)
                out.append(outcome(hs[0].pread, 1024 * 512, 0))
            return out
        want = [b''.join(bytes([rnd % 15 * 16 + s % 4 + 1]) * 512 for s in range(1024))
                for rnd in range(40)]
        self.assertEqual(self.both(run), ['ok:' + hashlib.sha256(w).hexdigest()[:16]
                                          for w in want])

    def test_copy_before_write_target_fails(self):
        """A failure in the middle of a copy: the scratch target of a copy-before-write filter
        is a blkdebug node whose first write fails, so the guest's write that needed the copy
        fails (break-guest-write) with the target's errno and the snapshot keeps the old data;
        the next write copies and passes."""
        def run(env):
            scratch = cbttest.make_image(env.d.path('scratch.img'), SIZE)
            out = [env.add(FILE),
                   env.add({'driver': 'blkdebug', 'node-name': 'tgt',
                            'image': {'driver': 'file', 'filename': scratch},
                            'inject-error': [{'event': 'pwritev', 'iotype': 'write',
                                              'errno': 28, 'once': True}]}),
                   env.add({'driver': 'copy-before-write', 'node-name': 'cbw', 'file': 'f0',
                            'target': 'tgt'}),
                   env.add({'driver': 'snapshot-access', 'node-name': 'snap', 'file': 'cbw'})]
            env.export('cbw', name='live')
            env.export('snap', writable=False, name='snap')
            live, snap = ops(env.client('live')), ops(env.client('snap'))
            out += [live['write'](0, 4096, 0x33), live['write'](0, 4096, 0x33),
                    live['read'](0, 4096), snap['read'](0, 65536), live['write'](65536, 512),
                    snap['read'](65536, 65536), nodes(env)]
            return out
        t = self.both(run)
        self.assertEqual(t[4:8], ['ENOSPC', 'ok', 'ok:' + hashlib.sha256(b'3' * 4096).hexdigest()[:16],
                                  'ok:' + digest(0, 65536)])


class TestOptions(Base):
    BAD = [
        blkdebug(align=3), blkdebug(align=-1), blkdebug(align=1 << 31),
        blkdebug(align=512, max_transfer=1000), blkdebug(max_transfer=-1),
        blkdebug(align=512, opt_write_zero=1000), blkdebug(opt_write_zero=4096,
                                                           max_write_zero=1000),
        blkdebug(align=512, opt_discard=1000), blkdebug(opt_discard=4096, max_discard=6000),
        blkdebug(max_transfer=4096, align=8192),
        blkdebug(inject_error=[{'event': 'bogus'}]),
        blkdebug(inject_error=[{'event': 'read_aio', 'iotype': 'bogus'}]),
        blkdebug(inject_error=[{}]),
        blkdebug(set_state=[{'event': 'read_aio'}]),
        blkdebug(take_child_perms=['graph-mod']),
        blkdebug('nonexistent', inject_error=[{'event': 'bogus'}]),
        blkdebug('nonexistent', align=3),
        blkdebug(node_name='1x', align=3),
        {'driver': 'blkdebug', 'node-name': 'dbg'},
    ]

    def test_bad_options(self):
        """The same error texts, and nothing is left behind."""
        def run(env):
            out = [env.add(FILE)]
            out += [env.add(args) for args in self.BAD]
            out.append(nodes(env))
            return out
        t = self.both(run)
        self.assertNotIn('ok', t[1:-1])

    def test_command_line(self):
        """--blockdev in keyval form (the rule members as strings, converted as QEMU's keyval
        visitor does) builds the same node as blockdev-add on both daemons."""
        out = []
        for qsd in (True, False):
            tmp = tempfile.mkdtemp(prefix='cbtd-test-')
            img = cbttest.make_image(os.path.join(tmp, 'disk.img'), SIZE, [(0, image_bytes())])
            sock = os.path.join(tmp, 'nbd.sock')
            d = Daemon(qsd=qsd, tmpdir=tmp, extra=[
                '--blockdev', 'driver=file,node-name=f0,filename=' + img,
                '--blockdev', 'driver=blkdebug,node-name=dbg,image=f0,align=4096,'
                'inject-error.0.event=none,inject-error.0.errno=28,inject-error.0.sector=9,'
                'inject-error.0.once=on,inject-error.0.iotype=read,'
                'set-state.0.event=none,set-state.0.new_state=2',
                '--nbd-server', 'addr.type=unix,addr.path=' + sock,
                '--export', 'type=nbd,id=e,node-name=dbg,name=e'])
            try:
                h = nbd.NBD()
                h.set_request_structured_replies(False)
                h.connect_uri('nbd+unix:///e?socket=' + sock)
                o = ops(h)
                row = [o['read'](0, 4096), o['read'](4096, 4096), o['read'](4096, 4096)]
                h.shutdown()
                q = connect(d)
                text = json.dumps(q.execute('query-named-block-nodes'), sort_keys=True)
                row.append(normalise(json.loads(text.replace(tmp, '{dir}'))))
                out.append(row)
            finally:
                d.stop()
                shutil.rmtree(tmp, ignore_errors=True)
        self.assertEqual(out[1], out[0])
        self.assertEqual(out[1][:3], ['ok:' + digest(0, 4096), 'ENOSPC', 'ok:' + digest(4096, 4096)])

    def test_cbtd_refusals(self):
        """What cbtd does not do is refused with a text that names it: a config file, and a
        negative errno (which qemu-storage-daemon 7.2 returns to its caller as success)."""
        env = Env(False)
        try:
            self.assertEqual(env.add(FILE), 'ok')
            self.assertEqual(env.add(blkdebug(config='/dev/null')),
                             'blkdebug: cbtd does not read config files; give the rules as '
                             'inject-error and set-state')
            self.assertEqual(env.add(blkdebug(inject_error=[{'event': 'read_aio',
                                                             'errno': -5}])),
                             'blkdebug: inject-error errno must be between 0 and 2147483647')
            self.assertEqual([n['node-name'] for n in env.q.execute('query-named-block-nodes')],
                             ['f0'])
        finally:
            env.close()


def digest(off, n):
    return hashlib.sha256(image_bytes()[off:off + n]).hexdigest()[:16]


if __name__ == '__main__':
    cbttest.main()
