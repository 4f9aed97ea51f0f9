"""Shared helpers for cbtd's integration tests: start the real daemon (or qemu-storage-daemon) in
a temporary directory, talk QMP to it, and clean up every process and file afterwards.

Run with Debian's /usr/bin/python3 (the only one with the `nbd` module). The build tree's
programs come from the environment: CBTD (the daemon), CBTCTL (the client).
"""
import ctypes
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest

CBTD = os.environ.get('CBTD', 'build/daemon/cbtd')
CBTCTL = os.environ.get('CBTCTL', 'build/tools/cbtctl')
QSD = shutil.which('qemu-storage-daemon') or '/usr/bin/qemu-storage-daemon'

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_test():
    # PR_SET_PDEATHSIG: a daemon must not outlive a test process that is itself killed (a
    # meson timeout, ^C), when no teardown runs.
    _libc.prctl(1, signal.SIGKILL)


# BlockDirtyInfo members only cbtd has (docs/bitmaps.md, "Identity"): a bitmap's identity.
IDENTITY_MEMBERS = ('bitmap-uuid', 'bitmap-created', 'unbroken', 'broken-reason')


def without_identity(value):
    """@value (a QMP reply or part of one) without cbtd's bitmap identity members, for
    comparisons with qemu-storage-daemon; tests of the identity look at it directly."""
    if isinstance(value, list):
        return [without_identity(v) for v in value]
    if isinstance(value, dict):
        return {k: without_identity(v) for k, v in value.items() if k not in IDENTITY_MEMBERS}
    return value


def cpu_seconds(pid):
    """User and system CPU time process @pid has used, from /proc."""
    with open('/proc/%d/stat' % pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def wait_for(pred, timeout=10.0, what='condition'):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise TimeoutError('timed out waiting for ' + what)


class QMPError(Exception):
    def __init__(self, cls, desc):
        super().__init__('%s: %s' % (cls, desc))
        self.cls = cls
        self.desc = desc


class QMP:
    """A minimal QMP client over a unix socket."""

    def __init__(self, path, negotiate=True, timeout=10.0, extra_greetings=False):
        # qemu-storage-daemon greets a client that connected while it was starting up twice;
        # with @extra_greetings such repeats are dropped (cbtd's clients stay strict).
        self.extra_greetings = extra_greetings
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b''
        self.events = []
        self.greeting = self.recv()
        if negotiate:
            self.execute('qmp_capabilities')

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send_raw(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def recv(self):
        """The next message (event or reply) as a dict; None at EOF."""
        while b'\n' not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b'\n', 1)
        return json.loads(line)

    def recv_reply(self):
        """The next reply, setting events aside."""
        while True:
            msg = self.recv()
            if msg is not None and self.extra_greetings and 'QMP' in msg:
                continue
            if msg is None or 'event' not in msg:
                return msg
            self.events.append(msg)

    def request(self, msg):
        """Send a request object, return the raw reply dict."""
        self.send_raw(json.dumps(msg) + '\n')
        return self.recv_reply()

    def cmd(self, name, args=None, **kwargs):
        """Raw reply for command @name (arguments from @args or keywords, '_' -> '-')."""
        msg = {'execute': name}
        a = dict(args or {})
        a.update({k.replace('_', '-'): v for k, v in kwargs.items()})
        if a:
            msg['arguments'] = a
        return self.request(msg)

    def execute(self, name, args=None, **kwargs):
        """Return value of @name, or raise QMPError."""
        reply = self.cmd(name, args, **kwargs)
        if reply is None:
            raise ConnectionError('connection closed')
        if 'error' in reply:
            raise QMPError(reply['error']['class'], reply['error']['desc'])
        if 'return' not in reply:
            raise AssertionError('unexpected reply to %s: %r' % (name, reply))
        return reply['return']

    def error(self, name, args=None, **kwargs):
        """(class, desc) of the error @name must fail with."""
        reply = self.cmd(name, args, **kwargs)
        if reply is None or 'error' not in reply:
            raise AssertionError('%s did not fail: %r' % (name, reply))
        return reply['error']['class'], reply['error']['desc']

    def wait_event(self, name, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev['event'] == name:
                    return self.events.pop(i)
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            msg = self.recv()
            if msg is None:
                raise ConnectionError('connection closed waiting for ' + name)
            if 'event' in msg:
                self.events.append(msg)
            if time.monotonic() > deadline:
                raise TimeoutError('no event ' + name)


_instances = itertools.count()


class Daemon:
    """cbtd (or qemu-storage-daemon with qsd=True) in its own temporary directory.

    extra: further command-line arguments. The QMP socket is <dir>/qmp.sock. preexec: a function
    the child runs before exec (resource limits)."""

    def __init__(self, extra=(), qsd=False, tmpdir=None, wait=True, preexec=None):
        self.own_dir = tmpdir is None
        self.dir = tmpdir or tempfile.mkdtemp(prefix='cbtd-test-')
        kind = 'qsd' if qsd else 'cbtd'
        n = next(_instances)
        self.qmp_path = os.path.join(self.dir, 'qmp-%s-%d.sock' % (kind, n))
        self.qsd = qsd
        if qsd:
            argv = [QSD, '--chardev', 'socket,id=m0,path=%s,server=on,wait=off' % self.qmp_path,
                    '--monitor', 'chardev=m0']
        else:
            argv = [CBTD, '--qmp', self.qmp_path]
        self.argv = argv + list(extra)
        self.stderr_path = os.path.join(self.dir, 'stderr-%s-%d.log' % (kind, n))
        self.stderr = open(self.stderr_path, 'w+')
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.stderr,
                                     preexec_fn=lambda: (_die_with_test(), preexec and preexec()))
        self.clients = []
        if wait:
            try:
                wait_for(lambda: os.path.exists(self.qmp_path) or self.proc.poll() is not None,
                         what='QMP socket')
                if self.proc.poll() is not None:
                    raise RuntimeError('daemon exited: ' + self.stderr_text())
                # Both daemons apply every option before their main loop answers QMP, so one
                # round trip means start-up (exports included) is complete.
                self.qmp().close()
                self.clients.pop()
            except OSError as e:
                # The daemon listens on QMP before it applies its later options, so a failing
                # option can close the first connection: that is an exit, not a hang.
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.stop()
                    raise e
                text = self.stderr_text()
                self.stop()
                raise RuntimeError('daemon exited: ' + text) from e
            except BaseException:
                self.stop()
                raise

    def path(self, name):
        return os.path.join(self.dir, name)

    def stderr_text(self):
        self.stderr.flush()
        with open(self.stderr_path) as f:
            return f.read()

    def qmp(self, negotiate=True):
        # The socket file can appear a moment before the daemon listens on it (qsd binds, then
        # listens): retry a refused connection briefly. No probe connection is made, because
        # qsd serves one client at a time and a probe disturbs the next client's greeting.
        deadline = time.monotonic() + 10
        while True:
            try:
                c = QMP(self.qmp_path, negotiate=negotiate, extra_greetings=self.qsd)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline or not self.alive():
                    raise
                time.sleep(0.02)
        self.clients.append(c)
        return c

    def alive(self):
        return self.proc.poll() is None

    def rss_kib(self):
        with open('/proc/%d/status' % self.proc.pid) as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1])
        return 0

    def stop(self):
        for c in self.clients:
            c.close()
        self.clients = []
        problem = None
        if self.proc.poll() is None:
            # A clean shutdown is part of every test: SIGTERM must end the daemon with status 0
            # (a sanitizer report or a crash at exit shows up here).
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(20)
                if rc != 0:
                    problem = 'exited with status %d after SIGTERM' % rc
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                problem = 'did not exit within 20 s of SIGTERM'
        text = self.stderr_text() if problem else ''
        self.stderr.close()
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        if problem:
            raise AssertionError('%s %s:\n%s' % (os.path.basename(self.argv[0]), problem, text))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def make_image(path, size, data=()):
    """A sparse raw image of @size bytes; @data: (offset, bytes) pairs written into it."""
    with open(path, 'wb') as f:
        f.truncate(size)
        for off, buf in data:
            f.seek(off)
            f.write(buf)
    return path


def main():
    unittest.main(verbosity=2)
