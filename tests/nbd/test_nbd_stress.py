"""Abuse the real daemon: 10,000 malformed requests and 300 clients vanishing mid-request or
mid-handshake; afterwards a fresh client is served correctly and the daemon's resident memory grew
by less than RSS_BOUND_KIB (32 MiB: one 32 MiB write buffer in flight is the most a single client
may make it hold; nothing may accumulate per bad request or per dead client).

Also a 1 GiB nbdcopy round trip (must finish well within the test timeout).
Run with /usr/bin/python3; CBTD names the daemon binary.
"""
import os
import shutil
import tempfile
import time
import unittest

import nbd

from nbdtest import RawClient, make_image, random_image, run, sha256_file, start, uri

MiB = 1 << 20
RSS_BOUND_KIB = 32 * 1024


class Stress(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='cbt-nbd-stress-')
        self.daemons = []

    def tearDown(self):
        for d in self.daemons:
            d.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def malformed(self, sock, n):
        """@n bad requests over 10 connections, each answered with the right error."""
        cases = [(100, 0, 0, 512, 22), (0, 0x8000, 0, 512, 22), (0, 0, 3 * MiB, 512, 22),
                 (0, 0, 0, 0, 22), (1, 0, 2 * MiB, 512, 28), (7, 0, 0, 512, 22)]
        per = n // 10
        for _ in range(10):
            c = RawClient(sock)
            c.go('w')
            for base in range(0, per, 100):
                for i in range(base, base + 100):
                    rtype, flags, off, length, _ = cases[i % len(cases)]
                    c.request(rtype, i, off, length, flags, b'\0' * 512 if rtype == 1 else b'')
                for i in range(base, base + 100):
                    self.assertEqual(c.error_of(), (i, cases[i % len(cases)][4]))
            c.close()

    def vanish(self, sock, n):
        for i in range(n):
            c = RawClient(sock)
            if i % 3 == 0:
                c.option(7, b'\0\0')  # GO with a payload it never finishes
            else:
                c.go('w')
                c.request(1, 1, 0, 65536, 0, b'\1' * (i % 1000))  # WRITE, payload cut short
            c.close()

    def check_served(self, sock, img):
        h = nbd.NBD()
        h.set_export_name('w')
        h.connect_unix(sock)
        with open(img, 'rb') as f:
            self.assertEqual(h.pread(MiB, MiB), f.read()[MiB:2 * MiB])
        h.pwrite(b'\xee' * 4096, 8192)
        h.flush()
        self.assertEqual(h.pread(4096, 8192), b'\xee' * 4096)
        h.shutdown()

    def test_malformed_and_vanishing(self):
        img = random_image(os.path.join(self.dir, 'w.img'), 2 * MiB)
        d, sock = start(self.dir, False, [('f0', img, False)],
                        ['id=e0,node-name=f0,name=w,writable=on'])
        self.daemons.append(d)
        self.malformed(sock, 1000)  # warm-up: thread stacks, allocator arenas
        self.vanish(sock, 30)
        time.sleep(0.2)
        before = d.rss_kib()
        self.malformed(sock, 10000)
        self.vanish(sock, 300)
        time.sleep(0.5)
        self.assertTrue(d.alive())
        self.check_served(sock, img)
        after = d.rss_kib()
        print('RSS %d KiB -> %d KiB' % (before, after))
        self.assertLess(after - before, RSS_BOUND_KIB)
        # Nothing left behind: the daemon still answers QMP and lists its export once.
        q = d.qmp()
        self.assertEqual([e['id'] for e in q.execute('query-block-exports')], ['e0'])

    def test_nbdcopy_1g(self):
        size = 1024 * MiB
        src = random_image(os.path.join(self.dir, 'src.raw'), size)
        dst = make_image(os.path.join(self.dir, 'dst.img'), size)
        d, sock = start(self.dir, False, [('f0', dst, False)],
                        ['id=e0,node-name=f0,name=w,writable=on'])
        self.daemons.append(d)
        t0 = time.monotonic()
        run(['nbdcopy', src, uri(sock, 'w')], timeout=60)
        back = os.path.join(self.dir, 'back.raw')
        run(['nbdcopy', uri(sock, 'w'), back], timeout=60)
        elapsed = time.monotonic() - t0
        print('1 GiB there and back in %.1f s' % elapsed)  # a figure, not an assertion
        self.assertEqual(sha256_file(src), sha256_file(back))


if __name__ == '__main__':
    unittest.main(verbosity=2)
