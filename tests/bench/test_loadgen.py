"""bench/nbd-loadgen is a measuring tool: check that it does the I/O it reports, where it says."""
import math
import os
import shutil
import subprocess
import tempfile
import unittest

from cbttest import Daemon, make_image

LOADGEN = os.environ['NBD_LOADGEN']
MiB = 1 << 20
SIZE = 64 * MiB
MASK = (1 << 64) - 1


def mix(x):
    """bench/nbd-loadgen.c's splitmix64 finaliser."""
    x = (x + 0x9e3779b97f4a7c15) & MASK
    x = ((x ^ (x >> 30)) * 0xbf58476d1ce4e5b9) & MASK
    x = ((x ^ (x >> 27)) * 0x94d049bb133111eb) & MASK
    return x ^ (x >> 31)


def spread_offsets(size, n, bs, seed):
    """The offsets --spread N / --verify write, computed independently of the tool."""
    stride = size // n
    stride -= stride % (65536 if stride >= 65536 else bs)
    step = max(2654435761 % n, 1)
    while math.gcd(step, n) != 1:
        step += 1
    out = []
    for k in range(n):
        stripe = k * step % n
        out.append(stripe * stride + mix(stripe ^ seed) % (stride // bs) * bs)
    return out


def pattern(offset, bs, seed):
    return b''.join(mix((offset + i + seed * 0x100000001b3) & MASK).to_bytes(8, 'little')
                    for i in range(0, bs, 8))


def loadgen(uri, *args):
    return subprocess.run([LOADGEN, uri] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=60)


def fields(text):
    d = {}
    for w in text.split():
        if '=' in w:
            k, v = w.split('=')
            d[k] = v
    return d


class LoadgenTest(unittest.TestCase):
    def start(self, blockdev):
        sock = os.path.join(self.dir, 'nbd.sock')
        d = Daemon(['--blockdev', blockdev, '--nbd-server', 'addr.type=unix,addr.path=' + sock,
                    '--export', 'type=nbd,id=e,node-name=n,name=e,writable=on'],
                   tmpdir=self.dir)
        self.addCleanup(d.stop)
        return 'nbd+unix:///e?socket=' + sock

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='cbt-loadgen-')
        self.addCleanup(shutil.rmtree, self.dir, True)

    def test_verify_writes_where_it_says(self):
        img = make_image(os.path.join(self.dir, 'img'), SIZE)
        uri = self.start('driver=file,node-name=n,filename=' + img)
        r = loadgen(uri, '--verify', '--count=500', '--depth=16', '--seed=3')
        self.assertEqual(r.returncode, 0, r.stderr)
        last = fields(r.stdout.splitlines()[-1])
        self.assertEqual(last, {'verified': '500', 'mismatches': '0'})
        offsets = spread_offsets(SIZE, 500, 4096, 3)
        self.assertEqual(len(set(offsets)), 500)
        self.assertEqual(len({o // 65536 for o in offsets}), 500)  # distinct 64 KiB chunks
        with open(img, 'rb') as f:
            data = f.read()
        for off in offsets:
            self.assertEqual(data[off:off + 4096], pattern(off, 4096, 3), 'offset %d' % off)
        written = sum(1 for o in range(0, SIZE, 4096) if data[o:o + 4096] != bytes(4096))
        self.assertEqual(written, 500)

    def test_verify_one_at_a_time_polling_on_and_off(self):
        # Depth 1 is where the server's reader spins on a non-blocking recv between requests
        # (adaptive polling); CBTD_NBD_POLL_MAX_NS=0 turns that off. Both must keep every byte,
        # and a value that is not a number of nanoseconds up to 10 ms is refused with a warning
        # (the default cap stays).
        for poll in (None, '0', 'abc', '10000001'):
            with self.subTest(poll=poll):
                img = make_image(os.path.join(self.dir, 'img-%s' % poll), SIZE)
                old = os.environ.pop('CBTD_NBD_POLL_MAX_NS', None)
                if poll is not None:
                    os.environ['CBTD_NBD_POLL_MAX_NS'] = poll
                try:
                    sock = os.path.join(self.dir, 'nbd-%s.sock' % poll)
                    d = Daemon(['--blockdev', 'driver=file,node-name=n,filename=' + img,
                                '--nbd-server', 'addr.type=unix,addr.path=' + sock,
                                '--export', 'type=nbd,id=e,node-name=n,name=e,writable=on'],
                               tmpdir=self.dir)
                finally:
                    os.environ.pop('CBTD_NBD_POLL_MAX_NS', None)
                    if old is not None:
                        os.environ['CBTD_NBD_POLL_MAX_NS'] = old
                self.addCleanup(d.stop)
                r = loadgen('nbd+unix:///e?socket=' + sock, '--verify', '--count=2000',
                            '--depth=1', '--seed=9')
                self.assertEqual(r.returncode, 0, r.stderr)
                self.assertEqual(fields(r.stdout.splitlines()[-1]),
                                 {'verified': '2000', 'mismatches': '0'})
                warned = 'CBTD_NBD_POLL_MAX_NS ignored' in d.stderr_text()
                self.assertEqual(warned, poll in ('abc', '10000001'), d.stderr_text())

    def test_lost_writes_are_caught(self):
        # null-co drops writes and reads zeroes: verify mode must report every block.
        uri = self.start('driver=null-co,node-name=n,size=%d,read-zeroes=on' % SIZE)
        r = loadgen(uri, '--verify', '--count=64', '--depth=4')
        self.assertEqual(r.returncode, 1)
        self.assertEqual(fields(r.stdout.splitlines()[-1]),
                         {'verified': '0', 'mismatches': '64'})
        self.assertIn('data mismatch', r.stderr)

    def test_counts_and_cycles(self):
        img = make_image(os.path.join(self.dir, 'img'), SIZE)
        uri = self.start('driver=file,node-name=n,filename=' + img)
        for op in ('read', 'write'):
            r = loadgen(uri, '--op=' + op, '--depth=32', '--count=1000')
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(fields(r.stdout)['ops'], '1000')
            self.assertTrue(r.stdout.startswith(op + ' '))
        r = loadgen(uri, '--connect-cycles=20')
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(fields(r.stdout)['cycles'], '20')

    def test_bad_options(self):
        for args in (['--op=trim', '--count=1'], ['--depth=0', '--count=1'], ['--bs=7',
                     '--count=1'], [], ['--verify']):
            r = loadgen('nbd+unix:///e?socket=/nonexistent', *args)
            self.assertEqual(r.returncode, 2, args)
        r = loadgen('nbd+unix:///e?socket=' + os.path.join(self.dir, 'none'), '--count=1')
        self.assertEqual(r.returncode, 1)
        self.assertIn('nbd_connect_uri', r.stderr)


if __name__ == '__main__':
    unittest.main(verbosity=2)
