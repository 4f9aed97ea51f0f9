"""cbtd's NBD server with stock clients (nbdinfo, nbdcopy, qemu-img, libnbd's Python binding),
and side by side with qemu-storage-daemon 7.2 on the same images.

Run with /usr/bin/python3; CBTD names the daemon binary.
"""
import os
import shutil
import socket
import struct
import tempfile
import time
import unittest

import nbd

from nbdtest import (CBTD_ARGV, Daemon, RawClient, make_image, nbdinfo_json, random_image, run,
                     sha256_file, start, uri)

MiB = 1 << 20
OPT_GO, REP_ERR_POLICY = 7, 0x80000002


def layout_image(path):
    """4 MiB: data at [1 MiB, 1 MiB + 128 KiB) and [3 MiB, 3 MiB + 4 KiB), holes elsewhere."""
    return make_image(path, 4 * MiB, [(1 * MiB, os.urandom(128 * 1024)),
                                      (3 * MiB, b'\x5a' * 4096)])


class Base(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='cbt-nbd-interop-')
        self.daemons = []

    def tearDown(self):
        for d in self.daemons:
            d.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.dir, name)

    def start(self, nodes, exports, qsd=False, extra=''):
        d, sock = start(self.dir, qsd, nodes, exports, extra)
        self.daemons.append(d)
        return d, sock


class TestClients(Base):
    def test_nbdinfo_list_and_content(self):
        img = layout_image(self.path('a.img'))
        _, sock = self.start([('f0', img, False)],
                             ['id=e0,node-name=f0,name=disk,description=first disk',
                              'id=e1,node-name=f0,name=other,writable=on'])
        info = nbdinfo_json('--list', uri(sock))
        self.assertEqual(info['protocol'], 'newstyle-fixed')
        self.assertTrue(info['structured'])
        ex = {e['export-name']: e for e in info['exports']}
        self.assertEqual(sorted(ex), ['disk', 'other'])
        self.assertEqual(ex['disk']['description'], 'first disk')
        self.assertEqual(ex['disk']['export-size'], 4 * MiB)
        self.assertTrue(ex['disk']['is_read_only'])
        self.assertFalse(ex['other']['is_read_only'])
        self.assertTrue(ex['other']['can_trim'])
        self.assertEqual(ex['disk']['contexts'], ['base:allocation'])
        out = run(['nbdinfo', '--content', uri(sock, 'disk')]).stdout
        self.assertIn('content:', out)
        self.assertIn('export-size: 4194304', out)

    def test_nbdinfo_map(self):
        img = layout_image(self.path('a.img'))
        _, sock = self.start([('f0', img, True)], ['id=e0,node-name=f0,name=disk'])
        out = run(['nbdinfo', '--map', uri(sock, 'disk')]).stdout.split('\n')
        rows = [line.split() for line in out if line.strip()]
        self.assertEqual(rows, [
            ['0', str(1 * MiB), '3', 'hole,zero'],
            [str(1 * MiB), '131072', '0', 'data'],
            [str(1 * MiB + 131072), str(2 * MiB - 131072), '3', 'hole,zero'],
            [str(3 * MiB), '4096', '0', 'data'],
            [str(3 * MiB + 4096), str(1 * MiB - 4096), '3', 'hole,zero']])

    def test_nbdcopy_round_trip(self):
        src = random_image(self.path('src.raw'), 64 * MiB)
        dst = make_image(self.path('dst.img'), 64 * MiB)
        _, sock = self.start([('f0', dst, False)], ['id=e0,node-name=f0,name=disk,writable=on'])
        run(['nbdcopy', src, uri(sock, 'disk')])
        back = self.path('back.raw')
        run(['nbdcopy', uri(sock, 'disk'), back])
        self.assertEqual(sha256_file(src), sha256_file(back))
        self.assertEqual(sha256_file(src), sha256_file(dst))

    def test_qemu_img(self):
        src = random_image(self.path('src.raw'), 8 * MiB, seed=7)
        _, sock = self.start([('f0', src, True)], ['id=e0,node-name=f0,name=disk'])
        info = nbdinfo_json(uri(sock, 'disk'))
        self.assertEqual(info['exports'][0]['export-size'], 8 * MiB)
        qi = run(['qemu-img', 'info', '--output=json', uri(sock, 'disk')]).stdout
        self.assertIn('"virtual-size": %d' % (8 * MiB), qi)
        out = self.path('out.raw')
        run(['qemu-img', 'convert', '-f', 'raw', '-O', 'raw', uri(sock, 'disk'), out])
        self.assertEqual(sha256_file(src), sha256_file(out))
        run(['qemu-img', 'compare', '-f', 'raw', '-F', 'raw', src, uri(sock, 'disk')])
        # qemu-img as a writer: convert into a writable export.
        dst = make_image(self.path('dst.img'), 8 * MiB)
        _, sock2 = self.start([('g0', dst, False)], ['id=e1,node-name=g0,name=w,writable=on'])
        run(['qemu-img', 'convert', '-n', '-f', 'raw', '-O', 'raw', src, uri(sock2, 'w')])
        self.assertEqual(sha256_file(src), sha256_file(dst))

    def test_python_libnbd_bitmapless_contexts(self):
        img = layout_image(self.path('a.img'))
        _, sock = self.start([('f0', img, True)],
                             ['id=e0,node-name=f0,name=disk,allocation-depth=on'])
        h = nbd.NBD()
        h.add_meta_context('base:allocation')
        h.add_meta_context('qemu:allocation-depth')
        h.connect_uri(uri(sock, 'disk'))
        seen = {}

        def cb(ctx, offset, entries, err):
            seen[ctx] = list(entries)
            return 0
        h.block_status(4 * MiB, 0, cb)
        self.assertEqual(seen['qemu:allocation-depth'], [4 * MiB, 1])
        self.assertEqual(seen['base:allocation'][:4], [1 * MiB, 3, 131072, 0])
        self.assertEqual(h.pread(4096, 3 * MiB), b'\x5a' * 4096)
        h.shutdown()

    def test_inet_loopback(self):
        img = layout_image(self.path('a.img'))
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        d = Daemon(extra=['--blockdev', 'driver=file,node-name=f0,filename=%s' % img],
                   tmpdir=self.dir)
        self.daemons.append(d)
        q = d.qmp()
        q.execute('nbd-server-start', {'addr': {'type': 'inet', 'data': {
            'host': '127.0.0.1', 'port': str(port)}}})
        q.execute('block-export-add', {'type': 'nbd', 'id': 'e0', 'node-name': 'f0',
                                       'name': 'disk', 'writable': True})
        url = 'nbd://127.0.0.1:%d/disk' % port
        self.assertEqual(nbdinfo_json(url)['exports'][0]['export-size'], 4 * MiB)
        h = nbd.NBD()
        h.connect_uri(url)
        h.pwrite(b'\x77' * 65536, 2 * MiB)
        h.flush()
        self.assertEqual(h.pread(65536, 2 * MiB), b'\x77' * 65536)
        self.assertEqual(h.pread(4096, 3 * MiB), b'\x5a' * 4096)
        h.shutdown()
        self.assertEqual(q.error('nbd-server-start', {'addr': {'type': 'inet', 'data': {
            'host': '127.0.0.1', 'port': str(port)}}})[1], 'NBD server already running')
        q.execute('nbd-server-stop')
        self.assertEqual(q.wait_event('BLOCK_EXPORT_DELETED')['data'], {'id': 'e0'})

    def test_socket_activation(self):
        img = layout_image(self.path('a.img'))
        h = nbd.NBD()
        h.set_export_name('disk')
        h.connect_systemd_socket_activation(
            CBTD_ARGV + ['--blockdev', 'driver=file,node-name=f0,filename=%s,read-only=on' % img,
                         '--export', 'type=nbd,id=e0,node-name=f0,name=disk'])
        self.assertEqual(h.get_size(), 4 * MiB)
        self.assertEqual(h.pread(4096, 3 * MiB), b'\x5a' * 4096)
        h.shutdown()
        del h


class TestMaxClients(Base):
    """block-export-add's max-clients (cbtd's own): a client past the limit is refused at GO
    with ERR_POLICY and a text that says so, the others go on, a freed place is taken again,
    and a limit of 1 withdraws multi-conn; exports without a limit are not affected."""

    def test_limit(self):
        img = layout_image(self.path('a.img'))
        _, sock = self.start([('f0', img, True)],
                             ['id=one,node-name=f0,name=one,max-clients=1',
                              'id=two,node-name=f0,name=two,max-clients=2',
                              'id=any,node-name=f0,name=any'])

        def client(name):
            h = nbd.NBD()
            h.set_export_name(name)
            h.connect_unix(sock)
            return h

        first = client('one')
        self.assertFalse(first.can_multi_conn())
        with self.assertRaises(nbd.Error) as refused:
            client('one')
        self.assertIn('server policy prevents NBD_OPT_GO', str(refused.exception))
        c = RawClient(sock)  # the reply itself, with its text
        c.option(OPT_GO, struct.pack('>I', 3) + b'one' + struct.pack('>H', 0))
        _, rtype, text = c.reply()
        self.assertEqual((rtype, text), (REP_ERR_POLICY,
                                         b"export 'one' has reached its limit of 1 clients"))
        c.close()
        self.assertEqual(first.pread(4096, MiB), open(img, 'rb').read()[MiB:MiB + 4096])
        first.shutdown()
        # The place is free again once the server has seen the client go.
        deadline = time.monotonic() + 10
        while True:
            try:
                client('one').shutdown()
                break
            except nbd.Error:
                self.assertLess(time.monotonic(), deadline, 'the freed place never came back')
                time.sleep(0.01)

        pair = [client('two'), client('two')]
        self.assertTrue(pair[0].can_multi_conn())
        with self.assertRaises(nbd.Error):
            client('two')
        many = [client('any') for _ in range(5)]
        for h in pair + many:
            h.shutdown()


class TestSideBySide(Base):
    """The same image and options on cbtd and qemu-storage-daemon give the same answers."""

    FIELDS = ('export-name', 'description', 'export-size', 'contexts', 'is_read_only',
              'is_rotational', 'can_cache', 'can_df', 'can_fast_zero', 'can_flush', 'can_fua',
              'can_trim', 'can_zero', 'block_size_minimum', 'block_size_preferred',
              'block_size_maximum')

    def both(self, nodes, exports):
        return [self.start(nodes, exports, qsd=q)[1] for q in (False, True)]

    def test_list(self):
        img = layout_image(self.path('a.img'))
        socks = self.both([('f0', img, False)],
                          ['id=e0,node-name=f0,name=disk,description=the disk',
                           'id=e1,node-name=f0,name=depth,allocation-depth=on',
                           'id=e2,node-name=f0,writable=on'])
        lists = []
        for sock in socks:
            exports = nbdinfo_json('--list', uri(sock))['exports']
            lists.append(sorted(({k: e.get(k) for k in self.FIELDS} for e in exports),
                                key=lambda e: e['export-name']))
        self.assertEqual(lists[0], lists[1])

    def test_multi_conn(self):
        """Connections to one export see one state, whatever the image's size: CAN_MULTI_CONN
        on writable and read-only exports, also of an image whose size is not a multiple of
        512 (the node pads it), withdrawn by max-connections=1, as on qemu-storage-daemon; and
        nbdcopy then copies over four connections."""
        odd = make_image(self.path('odd.img'), 1000000)
        exports = ['id=e0,node-name=f0,name=w,writable=on', 'id=e1,node-name=f0,name=r']
        for extra in ('', ',max-connections=1'):
            flags = []
            for qsd in (False, True):
                _, sock = self.start([('f0', odd, False)], exports, qsd=qsd, extra=extra)
                flags.append({e['export-name']: (e['can_multi_conn'],
                                                 {k: e.get(k) for k in self.FIELDS})
                              for e in nbdinfo_json('--list', uri(sock))['exports']})
                self.daemons.pop().stop()
            self.assertEqual(flags[0], flags[1], extra)
            self.assertEqual(flags[0]['w'][0], extra == '', extra)
        src = random_image(self.path('src.raw'), 1000000, seed=3)
        _, sock = self.start([('f0', odd, False)], exports)
        run(['nbdcopy', '--connections=4', src, uri(sock, 'w')])
        with open(odd, 'rb') as f, open(src, 'rb') as g:
            self.assertEqual(f.read(), g.read())

    def test_map(self):
        img = layout_image(self.path('a.img'))
        socks = self.both([('f0', img, True)],
                          ['id=e0,node-name=f0,name=disk,allocation-depth=on'])
        for ctx in ('base:allocation', 'qemu:allocation-depth'):
            maps = [run(['nbdinfo', '--map=' + ctx, uri(s, 'disk')]).stdout for s in socks]
            self.assertEqual(maps[0], maps[1], ctx)
            totals = [run(['nbdinfo', '--map=' + ctx, '--totals', uri(s, 'disk')]).stdout
                      for s in socks]
            self.assertEqual(totals[0], totals[1], ctx)

    def test_map_extents(self):
        """Every kind of extent SEEK_DATA tells apart, in more extents than one FIEMAP call of
        cbtd's maps: holes, data written back, data not yet written back (delayed allocation),
        a preallocated range partly written (dirty), partly only read (cached zeroes) and partly
        untouched, blocks preallocated past the end of the file, and an end of file that is not
        a multiple of 512. Both daemons serve the same file at once, so they see the same page
        cache, and must give the same base:allocation map."""
        img = self.path('extents.img')
        size = 24 * MiB + 1000
        fd = os.open(img, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            os.pwrite(fd, b'\x11' * 65536, 0)
            os.fsync(fd)
            os.posix_fallocate(fd, 1 * MiB, 2 * MiB)
            os.pwrite(fd, b'\x22' * 4096, 1 * MiB + 8192)
            os.pwrite(fd, b'\x33' * 100, 2 * MiB + 300)
            os.pread(fd, 8192, 2 * MiB + 65536)
            os.pwrite(fd, b'\x44' * 12288, 4 * MiB)
            for i in range(600):
                os.pwrite(fd, b'\x55' * 4096, 5 * MiB + i * 16384 + (i % 3) * 4096)
            os.pwrite(fd, b'\x66' * 5096, size - 5096)
        finally:
            os.close(fd)
        socks = self.both([('f0', img, True)], ['id=e0,node-name=f0,name=disk'])
        maps = [nbdinfo_json('--map', uri(s, 'disk')) for s in socks]
        self.assertGreater(len(maps[1]), 600)
        self.assertEqual(maps[0], maps[1])

    def test_qmp_errors(self):
        img = make_image(self.path('q.img'), 1 * MiB)
        long_name = 'x' * 4097
        cases = [
            ('block-export-add', {'type': 'nbd', 'id': '1bad', 'node-name': 'f0'}),
            ('block-export-add', {'type': 'nbd', 'id': 'e0', 'node-name': 'f0'}),
            ('block-export-add', {'type': 'nbd', 'id': 'n1', 'node-name': 'nope'}),
            ('block-export-add', {'type': 'nbd', 'id': 'n1', 'node-name': 'r0',
                                  'writable': True}),
            ('block-export-add', {'type': 'nbd', 'id': 'n1', 'node-name': 'f0',
                                  'iothread': 'x'}),
            ('block-export-add', {'type': 'nbd', 'id': 'n1', 'node-name': 'f0'}),
            ('block-export-add', {'type': 'nbd', 'id': 'n1', 'node-name': 'f0',
                                  'name': long_name}),
            ('block-export-add', {'type': 'nbd', 'id': 'n1', 'node-name': 'f0', 'name': 'n',
                                  'description': long_name}),
            ('block-export-add', {'type': 'nbd', 'id': 'n1', 'node-name': 'f0', 'name': 'n',
                                  'bitmaps': ['nope']}),
            ('block-export-add', {'type': 'nbd', 'id': 'n1', 'node-name': 'f0', 'name': 'n',
                                  'bitmap': 'x'}),
            ('block-export-add', {'type': 'nbd', 'id': 'n1', 'node-name': 'f0', 'name': 'n',
                                  'bitmaps': [1]}),
            ('block-export-add', {'type': 'nbd', 'id': 'n1', 'name': 'n'}),
            ('block-export-add', {'type': 'nope', 'id': 'n1', 'node-name': 'f0'}),
            ('block-export-del', {'id': 'nope'}),
            ('block-export-del', {'id': 'e0', 'mode': 'soft'}),
            ('nbd-server-remove', {'name': 'nope'}),
            ('nbd-server-add', {'device': 'nope'}),
            ('nbd-server-add', {'device': 'f0'}),
            ('nbd-server-start', {'addr': {'type': 'unix', 'data': {'path': '/tmp/x'}}}),
            ('nbd-server-start', {'addr': {'type': 'unix', 'path': '/tmp/x'}}),
            ('nbd-server-start', {'addr': {'type': 'inet', 'data': {'host': 'h', 'port': '1'}},
                                  'max-connections': -1}),
        ]
        replies = []
        for qsd in (False, True):
            d, _ = self.start([('f0', img, False), ('r0', img, True)],
                              ['id=e0,node-name=f0,name=f0'], qsd=qsd)
            q = d.qmp()
            replies.append([q.cmd(c, a).get('error') for c, a in cases])
            q.execute('nbd-server-stop')
            replies[-1].append(q.cmd('nbd-server-stop').get('error'))
            replies[-1].append(q.cmd('block-export-add', {'type': 'nbd', 'id': 'z',
                                                          'node-name': 'f0'}).get('error'))
            replies[-1].append(q.cmd('nbd-server-start', {'addr': {'type': 'unix', 'data': {
                'path': '/nonexistent/dir/x.sock'}}}).get('error'))
            replies[-1].append(q.cmd('nbd-server-start', {'addr': {'type': 'unix', 'data': {
                'path': self.path('y.sock')}}, 'tls-creds': 'nope'}).get('error'))
        for i, (a, b) in enumerate(zip(*replies)):
            what = cases[i] if i < len(cases) else i
            self.assertIsNotNone(a, what)
            self.assertEqual(a, b, what)

    def test_events_and_deletion(self):
        img = make_image(self.path('e.img'), 1 * MiB)
        transcripts = []
        for qsd in (False, True):
            d, sock = self.start([('f0', img, False)],
                                 ['id=e0,node-name=f0,name=a', 'id=e1,node-name=f0,name=b',
                                  'id=e2,node-name=f0,name=c'], qsd=qsd)
            q = d.qmp()
            t = []
            h = nbd.NBD()
            h.set_export_name('a')
            h.connect_unix(sock)
            t.append(q.cmd('block-export-del', {'id': 'e0'}).get('error'))
            t.append(q.execute('query-block-exports'))
            t.append(q.cmd('block-export-del', {'id': 'e0', 'mode': 'hard'}))
            t.append(q.wait_event('BLOCK_EXPORT_DELETED')['data'])
            try:
                h.pread(512, 0)
                t.append('read after hard delete succeeded')
            except nbd.Error:
                t.append('read failed')
            del h
            t.append(sorted(e['id'] for e in q.execute('query-block-exports')))
            t.append(q.execute('nbd-server-stop'))
            t.append([q.wait_event('BLOCK_EXPORT_DELETED')['data']['id'] for _ in range(2)])
            t.append(q.execute('query-block-exports'))
            transcripts.append(t)
        self.assertEqual(transcripts[0][0]['desc'], "export 'e0' still in use")
        for i, (a, b) in enumerate(zip(*transcripts)):
            if isinstance(a, list) and a and isinstance(a[0], dict):
                a = sorted(a, key=lambda e: e['id'])
                b = sorted(b, key=lambda e: e['id'])
            self.assertEqual(a, b, 'step %d' % i)

    def test_raw_probe_answers(self):
        """The same malformed requests get the same error codes, except where cbtd chose
        otherwise (docs/nbd-server.md: EPERM on a read-only export, EINVAL for a zero-length
        READ)."""
        img = layout_image(self.path('a.img'))
        socks = self.both([('f0', img, True)], ['id=e0,node-name=f0,name=disk'])
        answers = []
        for sock in socks:
            c = RawClient(sock)
            c.option(99)
            a = [c.reply()[1]]
            c.option(5)
            a.append(c.reply()[1])
            c.option(10, b'\0\0\0\0\0\0\0\0')
            a.append(c.reply()[1])
            c.go('disk')
            for cookie, (rtype, off, length, flags) in enumerate([
                    (42, 0, 512, 0), (0, 4 * MiB - 10, 20, 0), (0, 0, 512, 0x80),
                    (0, 0, 512, 8), (0, 0, 33 * MiB, 0), (7, 0, 0, 0), (7, 4 * MiB, 1, 0),
                    (8, 0, 0, 0)]):
                c.request(rtype, cookie, off, length, flags)
                a.append(c.error_of())
            c.request(2, 99, 0, 0)
            a.append(c.closed())
            c.close()
            answers.append(a)
        self.assertEqual(answers[0], answers[1])


if __name__ == '__main__':
    unittest.main(verbosity=2)
