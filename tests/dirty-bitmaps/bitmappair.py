"""cbtd and qemu-storage-daemon side by side for the bitmap tests: the same QMP commands and the
same NBD writes go to both, and the tests compare what comes back.

Each daemon has its own temporary directory with its own image files; replies are compared as
JSON values after replacing that directory with $DIR.
"""
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'lib'))
from cbttest import Daemon, make_image, without_identity  # noqa: E402

import nbd  # noqa: E402  (Debian's python3-libnbd)

KINDS = ('cbtd', 'qsd')
GiB = 1 << 30


def act(kind, **data):
    """A transaction action {type, data}; '_' in keywords becomes '-'."""
    return {'type': kind, 'data': {k.replace('_', '-'): v for k, v in data.items()}}


class Pair:
    """Both daemons, each with a QMP client."""

    def __init__(self):
        self.daemons = {}
        self.qmp = {}
        try:
            for kind in KINDS:
                d = Daemon(qsd=(kind == 'qsd'))
                self.daemons[kind] = d
                self.qmp[kind] = self._connect(d)
        except Exception:
            self.stop()
            raise
        self.nbd_started = False

    @staticmethod
    def _connect(d):
        # The socket file appears at bind(), a moment before listen(): retry a refusal briefly.
        deadline = time.monotonic() + 10
        while True:
            try:
                return d.qmp()
            except ConnectionRefusedError:
                if time.monotonic() > deadline or not d.alive():
                    raise
                time.sleep(0.02)

    def stop(self):
        for d in self.daemons.values():
            d.stop()
        self.daemons = {}

    def _subst(self, kind, value):
        text = json.dumps(value).replace('$DIR', self.daemons[kind].dir)
        return json.loads(text)

    def _unsubst(self, kind, value):
        return without_identity(json.loads(json.dumps(value).replace(self.daemons[kind].dir,
                                                                     '$DIR')))

    def both(self, cmd, args=None):
        """{kind: raw reply} of @cmd run on both daemons."""
        out = {}
        for kind in KINDS:
            msg = {'execute': cmd}
            if args is not None:
                msg['arguments'] = self._subst(kind, args)
            reply = self.qmp[kind].request(msg)
            if reply is None:
                raise AssertionError('%s closed the connection on %s %r' % (kind, cmd, args))
            out[kind] = self._unsubst(kind, reply)
        return out

    def same(self, cmd, args=None):
        """Run on both, require equal replies, return it."""
        r = self.both(cmd, args)
        if r['cbtd'] != r['qsd']:
            raise AssertionError('%s %s: cbtd %r != qsd %r' % (cmd, json.dumps(args),
                                                                r['cbtd'], r['qsd']))
        return r['qsd']

    def ok(self, cmd, args=None):
        r = self.same(cmd, args)
        if 'error' in r:
            raise AssertionError('%s %s failed on both: %r' % (cmd, json.dumps(args), r))
        return r['return']

    def fails(self, cmd, args, desc, cls='GenericError'):
        """Both fail with @desc (and class)."""
        r = self.same(cmd, args)
        expected = {'error': {'class': cls, 'desc': desc}}
        if r != expected:
            raise AssertionError('%s %s: got %r, expected %r' % (cmd, json.dumps(args), r,
                                                                  expected))

    def one(self, kind, cmd, args=None):
        return self._unsubst(kind, self.qmp[kind].request({'execute': cmd, 'arguments':
                                                           self._subst(kind, args or {})}))

    # ----------------------------------------------------------------------------------------
    def disk(self, node, size=GiB, discard=None, read_only=False, data=()):
        """An image in each directory, a file node f-<node> and a raw node <node> over it."""
        fargs = {'driver': 'file', 'node-name': 'f-' + node, 'filename': '$DIR/%s.img' % node}
        rargs = {'driver': 'raw', 'node-name': node, 'file': 'f-' + node}
        if discard:
            fargs['discard'] = rargs['discard'] = discard
        if read_only:
            fargs['read-only'] = rargs['read-only'] = True
        for d in self.daemons.values():
            make_image(d.path(node + '.img'), size, data)
        self.ok('blockdev-add', fargs)
        self.ok('blockdev-add', rargs)

    def bitmaps_of(self, kind):
        """{node-name: dirty-bitmaps or None} from query-named-block-nodes on one daemon."""
        nodes = without_identity(self.qmp[kind].execute('query-named-block-nodes'))
        return {n['node-name']: n.get('dirty-bitmaps') for n in nodes}

    def bitmaps(self):
        """bitmaps_of(), required identical on both daemons."""
        per = {kind: self.bitmaps_of(kind) for kind in KINDS}
        if per['cbtd'] != per['qsd']:
            raise AssertionError('dirty-bitmaps differ:\ncbtd %r\nqsd  %r' % (per['cbtd'],
                                                                             per['qsd']))
        return per['qsd']

    def state_of(self, kind):
        """One daemon's bitmaps of every node plus each bitmap's sha256."""
        st = {}
        for node, bms in sorted(self.bitmaps_of(kind).items()):
            st[node] = bms
            for bm in bms or []:
                h = self.qmp[kind].execute('x-debug-block-dirty-bitmap-sha256',
                                           {'node': node, 'name': bm['name']})
                st['%s/%s' % (node, bm['name'])] = h['sha256']
        return st

    def state(self):
        """state_of(), required identical on both daemons."""
        per = {kind: self.state_of(kind) for kind in KINDS}
        if per['cbtd'] != per['qsd']:
            raise AssertionError('bitmap state differs:\ncbtd %r\nqsd  %r' % (per['cbtd'],
                                                                             per['qsd']))
        return per['qsd']

    # NBD ------------------------------------------------------------------------------------
    def nbd_start(self):
        if not self.nbd_started:
            self.ok('nbd-server-start', {'addr': {'type': 'unix',
                                                  'data': {'path': '$DIR/nbd.sock'}}})
            self.nbd_started = True

    def export(self, eid, node, writable=False, bitmaps=None, name=None):
        self.nbd_start()
        args = {'type': 'nbd', 'id': eid, 'node-name': node, 'writable': writable}
        if bitmaps is not None:
            args['bitmaps'] = bitmaps
        if name is not None:
            args['name'] = name
        self.ok('block-export-add', args)

    def unexport(self, eid):
        self.ok('block-export-del', {'id': eid})
        for q in self.qmp.values():
            q.wait_event('BLOCK_EXPORT_DELETED')

    def uri(self, kind, name):
        return 'nbd+unix:///%s?socket=%s' % (name, self.daemons[kind].path('nbd.sock'))

    def io(self, name, ops):
        """Apply @ops to export @name on both daemons through libnbd: ('write', off, len, byte),
        ('zero', off, len), ('trim', off, len), ('flush',)."""
        for kind in KINDS:
            h = nbd.NBD()
            try:
                h.connect_uri(self.uri(kind, name))
                for op in ops:
                    if op[0] == 'write':
                        h.pwrite(bytes([op[3]]) * op[2], op[1])
                    elif op[0] == 'zero':
                        h.zero(op[2], op[1])
                    elif op[0] == 'trim':
                        h.trim(op[2], op[1])
                    elif op[0] == 'flush':
                        h.flush()
                    else:
                        raise ValueError(op)
                h.shutdown()
            finally:
                del h  # libnbd 1.14's python binding closes on deletion

    def nbdinfo_map(self, name, context):
        """`nbdinfo --map=CONTEXT` of export @name, identical on both daemons."""
        out = {}
        for kind in KINDS:
            p = subprocess.run(['nbdinfo', '--map=' + context, self.uri(kind, name)],
                               capture_output=True, text=True, timeout=60)
            if p.returncode != 0:
                raise AssertionError('nbdinfo on %s: %s' % (kind, p.stderr))
            out[kind] = p.stdout
        if out['cbtd'] != out['qsd']:
            raise AssertionError('maps differ for %s:\ncbtd:\n%s\nqsd:\n%s' % (
                context, out['cbtd'], out['qsd']))
        return out['qsd']

    def alive(self):
        return all(d.alive() for d in self.daemons.values())
