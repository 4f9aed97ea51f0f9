"""Helpers for the NBD integration tests: start cbtd or qemu-storage-daemon with the same file
node and NBD export options, run nbdinfo/nbdcopy/qemu-img, speak raw NBD.

Run with Debian's /usr/bin/python3 (the `nbd` module).
"""
import hashlib
import json
import itertools
import os
import socket
import struct
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'lib'))
from cbttest import CBTD, Daemon, make_image, wait_for  # noqa: E402

CBTD_ARGV = [CBTD]

__all__ = ['CBTD_ARGV', 'Daemon', 'RawClient', 'make_image', 'nbdinfo_json', 'random_image',
           'run', 'sha256_file', 'start', 'uri', 'wait_for']

NBD_MAGIC = 0x4e42444d41474943
IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x0003e889045565a9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668e33ef


def uri(sock, export=''):
    return 'nbd+unix:///%s?socket=%s' % (export, sock)


_socket_names = itertools.count()


def start(tmpdir, qsd, nodes, exports, server_extra=''):
    """A daemon (cbtd, or qsd when @qsd) in @tmpdir serving NBD on <tmpdir>/<kind>-nbd.sock.

    nodes: [(node-name, path, read_only)]; exports: ['id=..,node-name=..,...'] --export values.
    Returns (Daemon, nbd socket path)."""
    kind = 'qsd' if qsd else 'cbtd'
    sock = os.path.join(tmpdir, '%s-nbd-%d.sock' % (kind, next(_socket_names)))
    args = []
    for name, path, ro in nodes:
        args += ['--blockdev', 'driver=file,node-name=%s,filename=%s,read-only=%s'
                 % (name, path, 'on' if ro else 'off')]
    args += ['--nbd-server', 'addr.type=unix,addr.path=%s%s' % (sock, server_extra)]
    for e in exports:
        args += ['--export', 'type=nbd,' + e]
    d = Daemon(extra=args, qsd=qsd, tmpdir=tmpdir)
    wait_for(lambda: os.path.exists(sock), what='NBD socket')
    return d, sock


def run(argv, check=True, **kw):
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=kw.pop('timeout', 120), **kw)
    if check and p.returncode != 0:
        raise AssertionError('%s failed (%d): %s' % (' '.join(argv), p.returncode, p.stderr))
    return p


def nbdinfo_json(*args):
    return json.loads(run(['nbdinfo', '--json'] + list(args)).stdout)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def random_image(path, size, seed=1):
    """@size bytes: random data in every other MiB, holes between."""
    rnd = __import__('random').Random(seed)
    with open(path, 'wb') as f:
        f.truncate(size)
        for off in range(0, size, 2 << 20):
            f.seek(off)
            f.write(rnd.randbytes(min(1 << 20, size - off)))
    return path


class RawClient:
    """Just enough NBD to send what libnbd refuses to."""

    def __init__(self, sock_path, flags=3, timeout=10):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(sock_path)
        magic, opt, gflags = struct.unpack('>QQH', self.recv(18))
        assert magic == NBD_MAGIC and opt == IHAVEOPT and gflags == 3
        self.s.sendall(struct.pack('>I', flags))

    def close(self):
        self.s.close()

    def recv(self, n):
        buf = b''
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise EOFError('server closed')
            buf += chunk
        return buf

    def closed(self):
        try:
            return self.s.recv(1) == b''
        except ConnectionResetError:
            return True

    def option(self, opt, data=b''):
        self.s.sendall(struct.pack('>QII', IHAVEOPT, opt, len(data)) + data)

    def reply(self):
        magic, opt, rtype, length = struct.unpack('>QIII', self.recv(20))
        assert magic == REP_MAGIC
        return opt, rtype, self.recv(length)

    def go(self, name, structured=True):
        if structured:
            self.option(8)
            assert self.reply()[1] == 1
        n = name.encode()
        self.option(7, struct.pack('>I', len(n)) + n + struct.pack('>H', 0))
        while True:
            _, rtype, data = self.reply()
            if rtype == 1:
                return
            assert rtype == 3, hex(rtype)

    def request(self, rtype, cookie, offset, length, flags=0, payload=b''):
        self.s.sendall(struct.pack('>IHHQQI', REQUEST_MAGIC, flags, rtype, cookie, offset, length)
                       + payload)

    def chunk(self):
        """(type, flags, cookie, payload) of the next structured chunk."""
        magic, flags, ctype, cookie, length = struct.unpack('>IHHQI', self.recv(20))
        assert magic == STRUCTURED_MAGIC, hex(magic)
        return ctype, flags, cookie, self.recv(length)

    def error_of(self):
        ctype, flags, cookie, payload = self.chunk()
        assert ctype & 0x8000, ctype
        return cookie, struct.unpack('>I', payload[:4])[0]
