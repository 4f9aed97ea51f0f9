"""After WRITE_ZEROES, reads near and inside the zeroed range leave its map alone, as on
qemu-storage-daemon 7.2: cbtd and qsd serve the same qemu-io sequence on equal images and
`nbdinfo --map` and `qemu-img map` must print the same.

On ext4 and xfs, WRITE_ZEROES with NO_HOLE (what qemu-io `write -z` sends) becomes
FALLOC_FL_ZERO_RANGE: unwritten extents, which SEEK_DATA reports as holes unless their pages
are in the page cache. A server that reads zeroes it need not read (a read before block
status, readahead started by a read attempt) turns them into data. qsd reads only the data
runs block status reports; cbtd must leave the page cache as qsd does. (tmpfs keeps such a
range a hole whatever is read: the test then skips.)

Run with /usr/bin/python3; CBTD names the daemon binary.
"""
import os
import shutil
import tempfile
import unittest

from nbdtest import make_image, run, start, uri

KiB = 1 << 10
MiB = 1 << 20

# 8 MiB: data in [0, 4 MiB), a hole after. Zeroed: [1 MiB, 2 MiB) inside the data, [5 MiB,
# 6 MiB) inside the hole.
ZEROED = [(1 * MiB, 1 * MiB), (5 * MiB, 1 * MiB)]
# Reads next to the zeroed ranges, uncached: a long one ending where zeroes start, one across
# that start, two in the hole just before the second range.
NEARBY = [(768 * KiB, 256 * KiB), (1 * MiB - 512, 4 * KiB), (5 * MiB - 8 * KiB, 4 * KiB),
          (5 * MiB - 4 * KiB, 4 * KiB)]
INSIDE = [(1 * MiB + 512 * KiB, 4 * KiB), (5 * MiB + 256 * KiB, 4 * KiB)]


def drop_cache(path):
    """Take @path's pages out of the page cache, so every read starts from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def qemu_io(sock, command):
    run(['qemu-io', '-f', 'raw', '-c', command, uri(sock, 'disk')])


def maps(sock):
    return (run(['nbdinfo', '--map', uri(sock, 'disk')]).stdout,
            run(['qemu-img', 'map', '--output=json', '-f', 'raw', uri(sock, 'disk')]).stdout)


class TestZeroedRangeMap(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='cbt-nbd-zero-map-')
        self.daemons = []
        self.data = os.urandom(4 * MiB)

    def tearDown(self):
        for d in self.daemons:
            d.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def serve(self, qsd):
        """The sequence on one daemon: the maps after the nearby reads and after the reads
        inside the ranges."""
        kind = 'qsd' if qsd else 'cbtd'
        img = make_image(os.path.join(self.dir, kind + '.img'), 8 * MiB, [(0, self.data)])
        drop_cache(img)
        d, sock = start(self.dir, qsd, [('f0', img, False)],
                        ['id=e0,node-name=f0,name=disk,writable=on'])
        self.daemons.append(d)
        for off, length in ZEROED:
            qemu_io(sock, 'write -z %d %d' % (off, length))
        zeroed = maps(sock)
        for off, length in NEARBY:
            qemu_io(sock, 'read %d %d' % (off, length))
        nearby = maps(sock)
        for off, length in INSIDE:
            qemu_io(sock, 'read %d %d' % (off, length))
        inside = maps(sock)
        self.daemons.remove(d)
        d.stop()
        return zeroed, nearby, inside

    def test_reads_leave_zeroed_ranges_holes(self):
        qsd = self.serve(True)
        rows = [line.split() for line in qsd[0][0].splitlines()]
        if ['%d' % (1 * MiB), '%d' % (1 * MiB), '3', 'hole,zero'] not in rows:
            self.skipTest('this file system does not keep a zeroed range a hole: %r' % rows)
        cbtd = self.serve(False)
        for when, c, q in zip(('after write -z', 'after nearby reads', 'after reads inside'),
                              cbtd, qsd):
            self.assertEqual(c[0], q[0], 'nbdinfo --map %s' % when)
            self.assertEqual(c[1], q[1], 'qemu-img map %s' % when)


if __name__ == '__main__':
    unittest.main(verbosity=2)
