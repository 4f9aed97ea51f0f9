"""An attacker's campaign against one daemon, and what it leaves in memory.

About 10,000 malformed NBD handshakes and requests and 1,000 malformed QMP messages, from
several clients at once (each kind of thread the daemon has: connection readers, request
workers, the main loop), measured from a freshly started daemon: no warm-up, since an attacker
gives none. Afterwards the daemon must be alive, serve a fresh client correctly, and its
resident memory may have grown by less than GROWTH_BOUND_KIB (64 MiB, the bound
docs/user-guide.md "Limits and bad input" promises). The figure is printed either way.

The campaign is built to make memory stay behind, not only to be refused: 32 MiB writes whose
payload never comes, 32 MiB reads of clients that vanish before the reply, options of up to
the 1 MiB the server reads before refusing, QMP messages just under and over the 8 MiB limit
with many small values (one parsed node each), deep nesting.

Run with /usr/bin/python3; CBTD names the daemon binary.
"""
import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import unittest

import nbd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'nbd'))
from nbdtest import IHAVEOPT, RawClient, random_image, start  # noqa: E402

MiB = 1 << 20
GROWTH_BOUND_KIB = 64 * 1024
CLIENTS = 8  # at once: more threads than the allocator has arenas for 2 cores


def nbd_session(sock, i):
    """One malformed NBD client; which kind depends on @i."""
    kind = i % 10
    try:
        if kind == 0:  # not NBD at all
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(sock)
            s.recv(18)
            s.sendall(os.urandom(64))
            s.close()
            return
        c = RawClient(sock, flags=3 if kind != 1 else 0xffffffff)
        if kind == 1:  # unknown client flags
            c.closed()
        elif kind == 2:  # an option of 1 MiB, then gone
            c.s.sendall(struct.pack('>QII', IHAVEOPT, 99, MiB) + b'\xaa' * MiB)
        elif kind == 3:  # a GO whose export name claims to be huge
            c.option(7, struct.pack('>I', 0xfffffff0) + b'x' * 100)
        elif kind == 4:  # 32 MiB write, half the payload, gone
            c.go('w')
            c.request(1, i, 0, 32 * MiB, 0, b'\x55' * (16 * MiB))
        elif kind == 5:  # 32 MiB read, gone before the reply
            c.go('w')
            c.request(0, i, 0, 32 * MiB)
        elif kind == 6:  # requests out of range and of unknown types, pipelined
            c.go('w')
            for j in range(20):
                c.request(j % 12, j, 1 << 40, 4096, 0x8000 if j % 3 else 0)
        elif kind == 7:  # a bad magic after a few good requests
            c.go('w')
            c.request(0, 1, 0, 65536)
            c.request(7, 2, 0, 2 * MiB)
            c.s.sendall(struct.pack('>IHHQQI', 0xdeadbeef, 0, 0, 3, 0, 512))
        elif kind == 8:  # too many options
            for _ in range(100):
                c.option(3)
        else:  # trims and zeroes beyond the limits
            c.go('w')
            c.request(4, 1, 0, 0xffffffff)
            c.request(6, 2, 0, 0xfffff000, 2)
            c.request(1, 3, 0, 33 * MiB)
        c.close()
    except (OSError, EOFError, AssertionError):
        pass  # the server may hang up first: that is one of the right answers


def qmp_session(path, i):
    """100 malformed QMP messages over one connection, two of them large; a reader drains the
    replies meanwhile (a client that does not read is only slowed down: the daemon stops
    reading it while its replies wait)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    small = [
        b'{"execute": "qmp_capabilities"}',
        b'{"execute": ',  # cut, then a new message
        b'}}}]]]',
        b'{"execute": "block-dirty-bitmap-add", "arguments": {"node": 5, "name": []}}',
        b'{"execute": "nope", "id": "' + b'i' * 100000 + b'"}',
        b'[' * 1025 + b']' * 1025,
        b'"\\ud800 \\u0000 \xff\xfe"',
        b'{"execute": "query-version", "arguments": {"x": 1}, "id": {"a": [1, 2.5e308, null]}}',
    ]
    large = [
        # 1,000,001 values: one parsed node each
        b'{"execute": "query-version", "arguments": {"a": [' + b'1,' * 1_000_000 + b'1]}}',
        b"{'execute': 'transaction', 'arguments': {'actions': [" + b"{'type': 'x'}," * 50000
        + b"{}]}}",
    ]
    drain = threading.Thread(target=lambda: _drain(s))
    try:
        s.recv(4096)
        drain.start()
        for j in range(98):
            s.sendall(small[(i + j) % len(small)] + b'\n')
        for m in large:
            s.sendall(b'\n' + m + b'\n')
        if i % 4 == 0:  # and one over the limit, which ends the connection
            s.sendall(b'{"execute": "x", "arguments": {"s": "' + b'y' * (9 * MiB) + b'"}}\n')
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    if drain.is_alive() or drain.ident:
        drain.join()
    s.close()


def _drain(s):
    try:
        while s.recv(1 << 20):
            pass
    except OSError:
        pass


def in_parallel(fn, target, n):
    it = iter(range(n))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next(it, None)
            if i is None:
                return
            fn(target, i)

    threads = [threading.Thread(target=worker) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class HostileMemory(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='cbt-hostile-')
        self.daemon = None

    def tearDown(self):
        if self.daemon:
            self.daemon.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def test_campaign(self):
        img = random_image(os.path.join(self.dir, 'w.img'), 64 * MiB)
        d, sock = start(self.dir, False, [('f0', img, False)],
                        ['id=e0,node-name=f0,name=w,writable=on'])
        self.daemon = d
        q = d.qmp()
        before = d.rss_kib()
        t0 = time.monotonic()
        in_parallel(nbd_session, sock, 2500)  # 2,500 bad handshakes or sessions, ~10,000 messages
        in_parallel(qmp_session, d.qmp_path, 10)  # 1,000 malformed QMP messages
        elapsed = time.monotonic() - t0
        time.sleep(1)  # connection threads finish and park
        self.assertTrue(d.alive())
        h = nbd.NBD()
        h.set_export_name('w')
        h.connect_unix(sock)
        with open(img, 'rb') as f:
            self.assertEqual(h.pread(MiB, 0), f.read(MiB))
        h.shutdown()
        self.assertEqual([e['id'] for e in q.execute('query-block-exports')], ['e0'])
        after = d.rss_kib()
        print('RSS %d KiB -> %d KiB (+%d KiB) after %.1f s of attack'
              % (before, after, after - before, elapsed))
        self.assertLess(after - before, GROWTH_BOUND_KIB)


if __name__ == '__main__':
    unittest.main(verbosity=2)
