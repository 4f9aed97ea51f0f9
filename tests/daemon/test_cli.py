"""The daemon's command line: qemu-storage-daemon's options and error texts, cbtd's shorthands,
--pidfile, --daemonize, the embedded default (--state-dir) and cbtctl."""
import json
import os
import shutil
import signal
import subprocess
import tempfile
import unittest

from cbttest import CBTCTL, CBTD, QSD, QMP, make_image, wait_for


def run(argv, timeout=10):
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


class CommandLineErrors(unittest.TestCase):
    """Bad options: one clear line on stderr, exit 1, nothing left behind; the same text as
    qemu-storage-daemon gives where both know the option."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='cbtd-cli-')
        make_image(os.path.join(self.dir, 'disk.img'), 1 << 20)

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def both(self, args):
        """Run cbtd and qsd with @args; return their stderr with the program name stripped."""
        out = []
        for prog, name in ((CBTD, 'cbtd'), (QSD, 'qemu-storage-daemon')):
            before = set(os.listdir(self.dir))
            try:
                r = run([prog] + args, timeout=5)
            except subprocess.TimeoutExpired:
                self.fail('%s kept running with %r' % (name, args))
            self.assertEqual(r.returncode, 1, '%s %r: %s' % (name, args, r.stderr))
            self.assertEqual(set(os.listdir(self.dir)), before,
                             '%s left files behind for %r' % (name, args))
            lines = r.stderr.strip().splitlines()
            self.assertEqual(len(lines), 1, '%s: %r' % (name, r.stderr))
            # getopt's messages name argv[0] (a full path for qsd), the others the program.
            for prefix in (name + ': ', prog + ': '):
                if lines[0].startswith(prefix):
                    out.append(lines[0][len(prefix):])
                    break
            else:
                self.fail('no program name in %r' % lines[0])
        return out

    def assert_same(self, args):
        cbtd, qsd = self.both(args)
        self.assertEqual(cbtd, qsd)

    def test_unknown_option(self):
        self.assert_same(['--frob'])

    def test_missing_argument(self):
        self.assert_same(['--pidfile'])

    def test_unexpected_argument(self):
        self.assert_same(['foo'])

    def test_missing_file(self):
        self.assert_same(['--blockdev', 'driver=file,node-name=a,filename=%s/nope' % self.dir])

    def test_unknown_member(self):
        self.assert_same(['--blockdev', 'driver=file,node-name=a,filename=%s/disk.img,bogus=1'
                          % self.dir])

    def test_bad_bool(self):
        self.assert_same(['--blockdev', 'driver=null-co,node-name=n,read-only=maybe'])

    def test_keyval_syntax(self):
        self.assert_same(['--blockdev', 'null-co,node-name=n,size'])
        self.assert_same(['--blockdev', 'driver=null-co,node-name=n,a..b=1'])

    def test_json_syntax(self):
        self.assert_same(['--blockdev', '{"driver":"file"'])
        self.assert_same(['--blockdev', '{"driver":"null-co","node-name":"n"} x'])
        self.assert_same(['--blockdev', '{"driver":"null-co","node-name":"n","size":"1"}'])

    def test_monitor_without_chardev(self):
        self.assert_same(['--monitor', 'chardev=m'])

    def test_nbd_server_missing_path(self):
        self.assert_same(['--nbd-server', 'addr.type=unix'])

    def test_export_unknown_node(self):
        self.assert_same(['--export', 'type=nbd,id=e,node-name=c0'])

    def test_export_without_server(self):
        self.assert_same(['--blockdev', 'driver=null-co,node-name=n',
                          '--export', 'type=nbd,id=e,node-name=n'])

    def cbtd_error(self, args):
        """cbtd's one stderr line (without the program name) for options qsd has no text for."""
        before = set(os.listdir(self.dir))
        r = run([CBTD] + args)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertEqual(set(os.listdir(self.dir)), before)
        lines = r.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, r.stderr)
        self.assertTrue(lines[0].startswith('cbtd: '), lines[0])
        return lines[0][len('cbtd: '):]

    def test_unsupported_chardevs_and_objects(self):
        sock = os.path.join(self.dir, 'c.sock')
        self.assertEqual(self.cbtd_error(['--chardev', 'stdio,id=m']),
                         "--chardev stdio,id=m: chardev backend 'stdio' is not supported "
                         "(only socket)")
        self.assertEqual(self.cbtd_error(['--chardev', 'socket,path=' + sock]),
                         "--chardev socket,path=%s: Parameter 'id' is missing" % sock)
        self.assertEqual(self.cbtd_error(['--chardev', 'socket,id=m,host=127.0.0.1,port=1']),
                         '--chardev socket,id=m,host=127.0.0.1,port=1: only unix socket '
                         'chardevs (path=...) are supported')
        self.assertIn('only server=on sockets are supported',
                      self.cbtd_error(['--chardev', 'socket,id=m,path=' + sock]))
        self.assertEqual(self.cbtd_error(['--chardev', 'socket,id=m,path=%s,server=on' % sock,
                                          '--monitor', 'm,mode=readline']),
                         "--monitor m,mode=readline: Parameter 'mode' does not accept value "
                         "'readline'")
        self.assertEqual(self.cbtd_error(['-T', 'nbd_*']),
                         '-T nbd_*: tracing is not supported; use the logs on stderr')

    def test_key_fragments(self):
        """A key fragment is a name or, below the top, an index; '0=x' once crashed cbtd
        (found by tests/fuzz/fuzz-keyval)."""
        for key in ('0', '0x', '_a', '-a', 'a0', 'a._b', 'a.0x', '0.x'):
            self.assert_same(['--blockdev', 'driver=file,%s=1' % key])
        self.assert_same(['--blockdev', '0=x,1=y'])
        self.assert_same(['--object', '0=x'])

    def test_bad_objects(self):
        """--object errors read as qsd's: unknown qom-type, missing secret data."""
        self.assert_same(['--object', 'frob,id=x'])
        self.assert_same(['--object', 'secret,id=s'])
        self.assert_same(['--object', 'tls-creds-x509,id=t,dir=%s/nope,endpoint=server'
                          % self.dir])

    def test_later_failure_removes_sockets(self):
        """A failing option after a monitor and an NBD server were set up leaves no socket."""
        qmp = os.path.join(self.dir, 'q.sock')
        nbd = os.path.join(self.dir, 'n.sock')
        r = run([CBTD, '--qmp', qmp, '--nbd-server', 'addr.type=unix,addr.path=' + nbd,
                 '--blockdev', 'driver=file,node-name=a,filename=/nonexistent'])
        self.assertEqual(r.returncode, 1)
        self.assertIn("Could not open '/nonexistent'", r.stderr)
        self.assertFalse(os.path.exists(qmp))
        self.assertFalse(os.path.exists(nbd))


class CommandLineServes(unittest.TestCase):

    def test_qsd_command_line_unchanged(self):
        """A qemu-storage-daemon command line works unchanged."""
        d = tempfile.mkdtemp(prefix='cbtd-cli-')
        try:
            img = make_image(os.path.join(d, 'disk.img'), 1 << 20)
            qmp = os.path.join(d, 'qmp.sock')
            nbd = os.path.join(d, 'nbd.sock')
            p = subprocess.Popen([CBTD, '--blockdev',
                                  'driver=file,node-name=f0,filename=' + img,
                                  '--blockdev', '{"driver": "raw", "node-name": "d0", '
                                  '"file": "f0"}',
                                  '--chardev', 'socket,id=m0,path=%s,server=on,wait=off' % qmp,
                                  '--monitor', 'chardev=m0',
                                  '--nbd-server', 'addr.type=unix,addr.path=' + nbd,
                                  '--export', 'type=nbd,id=e0,node-name=d0,name=disk,'
                                  'writable=on'],
                                 stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                wait_for(lambda: os.path.exists(qmp) or p.poll() is not None)
                if p.poll() is not None:
                    self.fail(p.stderr.read())
                with QMP(qmp) as q:
                    names = sorted(n['node-name'] for n in q.execute('query-named-block-nodes'))
                    self.assertEqual(names, ['d0', 'f0'])
                    exports = q.execute('query-block-exports')
                    self.assertEqual([e['id'] for e in exports], ['e0'])
                    self.assertEqual(q.execute('quit'), {})
                self.assertEqual(p.wait(10), 0)
                self.assertFalse(os.path.exists(nbd), 'NBD socket left behind')
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def test_pretty_monitor(self):
        d = tempfile.mkdtemp(prefix='cbtd-cli-')
        try:
            qmp = os.path.join(d, 'qmp.sock')
            p = subprocess.Popen([CBTD, '--chardev', 'socket,id=m,path=%s,server=on,wait=off'
                                  % qmp, '--monitor', 'chardev=m,pretty=on'],
                                 stdin=subprocess.DEVNULL)
            try:
                wait_for(lambda: os.path.exists(qmp))
                import socket
                s = socket.socket(socket.AF_UNIX)
                s.connect(qmp)
                s.settimeout(5)
                s.sendall(b'{"execute": "qmp_capabilities"}\n')
                data = b''
                while b'"return"' not in data or not data.endswith(b'}\r\n'):
                    chunk = s.recv(4096)
                    self.assertTrue(chunk, 'connection closed early: %r' % data)
                    data += chunk
                s.close()
                self.assertIn(b'{\r\n    "QMP": {\r\n', data)
                self.assertTrue(data.endswith(b'{\r\n    "return": {\r\n    }\r\n}\r\n'), data)
            finally:
                p.send_signal(signal.SIGTERM)
                self.assertEqual(p.wait(10), 0)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def test_pidfile_and_daemonize(self):
        d = tempfile.mkdtemp(prefix='cbtd-cli-')
        try:
            pidfile = os.path.join(d, 'cbtd.pid')
            qmp = os.path.join(d, 'qmp.sock')
            r = run([CBTD, '--daemonize', '--pidfile', pidfile, '--qmp', qmp])
            self.assertEqual(r.returncode, 0, r.stderr)
            # The parent returns only once start-up finished: both exist already.
            self.assertTrue(os.path.exists(qmp))
            with open(pidfile) as f:
                pid = int(f.read())
            try:
                self.assertTrue(os.path.exists('/proc/%d' % pid))
                second = run([CBTD, '--pidfile', pidfile, '--qmp', os.path.join(d, 'q2.sock')])
                self.assertEqual(second.returncode, 1)
                self.assertEqual(second.stderr.strip(), 'cbtd: cannot create PID file: Cannot '
                                 'lock pid file: Resource temporarily unavailable')
                self.assertFalse(os.path.exists(os.path.join(d, 'q2.sock')))
                with QMP(qmp) as q:
                    q.execute('quit')
                wait_for(lambda: not os.path.exists('/proc/%d' % pid))
                self.assertFalse(os.path.exists(pidfile), 'PID file not removed at exit')
            finally:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def test_daemonize_failure_status(self):
        r = run([CBTD, '--daemonize', '--blockdev', 'driver=file,node-name=a,filename=/nope'])
        self.assertEqual(r.returncode, 1)
        self.assertIn("Could not open '/nope'", r.stderr)

    def test_help_and_version(self):
        r = run([CBTD, '--help'])
        self.assertEqual(r.returncode, 0)
        self.assertIn('--blockdev', r.stdout)
        r = run([CBTD, '-V'])
        self.assertEqual(r.returncode, 0)
        self.assertTrue(r.stdout.startswith('cbtd version '), r.stdout)


class SocketModes(unittest.TestCase):
    """QMP and NBD unix sockets are owner-only (0600) whatever the umask: whoever may connect
    to the NBD socket reads every exported disk."""

    def test_sockets_are_owner_only(self):
        d = tempfile.mkdtemp(prefix='cbtd-modes-')
        self.addCleanup(shutil.rmtree, d, True)
        socks = [os.path.join(d, n) for n in ('q.sock', 'n.sock', 'm.sock')]
        p = subprocess.Popen([CBTD, '--qmp', socks[0],
                              '--nbd-server', 'addr.type=unix,addr.path=' + socks[1],
                              '--chardev', 'socket,id=m,path=%s,server=on,wait=off' % socks[2],
                              '--monitor', 'm'],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, preexec_fn=lambda: os.umask(0))
        try:
            wait_for(lambda: all(os.path.exists(s) for s in socks) or p.poll() is not None)
            self.assertIsNone(p.poll())
            for path in socks:
                self.assertEqual(os.stat(path).st_mode & 0o777, 0o600, path)
            # Sockets made later, over QMP, too.
            later = os.path.join(d, 'later.sock')
            qmp = QMP(socks[0])
            qmp.execute('nbd-server-stop')
            qmp.execute('nbd-server-start', addr={'type': 'unix', 'data': {'path': later}})
            self.assertEqual(os.stat(later).st_mode & 0o777, 0o600)
            qmp.close()
        finally:
            p.terminate()
            p.wait(timeout=10)


    def test_socket_mode_option(self):
        """--socket-mode widens (or keeps) the mode, for every socket made from then on."""
        d = tempfile.mkdtemp(prefix='cbtd-modes-')
        self.addCleanup(shutil.rmtree, d, True)
        q, n = os.path.join(d, 'q.sock'), os.path.join(d, 'n.sock')
        p = subprocess.Popen([CBTD, '--socket-mode', '0660', '--qmp', q,
                              '--nbd-server', 'addr.type=unix,addr.path=' + n],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, preexec_fn=lambda: os.umask(0o077))
        try:
            wait_for(lambda: (os.path.exists(q) and os.path.exists(n)) or p.poll() is not None)
            self.assertIsNone(p.poll())
            self.assertEqual(os.stat(q).st_mode & 0o777, 0o660)
            self.assertEqual(os.stat(n).st_mode & 0o777, 0o660)
        finally:
            p.terminate()
            p.wait(timeout=10)
        for bad in ('0640x', '1777', '0060', '', '9'):
            r = subprocess.run([CBTD, '--socket-mode', bad, '--qmp', os.path.join(d, 'x.sock')],
                               stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=10)
            self.assertEqual(r.returncode, 1, bad)
            self.assertIn("cbtd: --socket-mode '%s': expected an octal mode up to 0777 that keeps "
                          "read and write for the owner (such as 0600 or 0660)" % bad, r.stderr)
            self.assertFalse(os.path.exists(os.path.join(d, 'x.sock')))


class StateDir(unittest.TestCase):
    """The embedded default that `make run` uses, driven with cbtctl."""

    def test_state_dir_default(self):
        d = tempfile.mkdtemp(prefix='cbtd-state-')
        state = os.path.join(d, 'var')
        p = subprocess.Popen([CBTD, '--state-dir', state], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            qmp = os.path.join(state, 'qmp.sock')
            wait_for(lambda: os.path.exists(os.path.join(state, 'nbd.sock')) or
                     p.poll() is not None)
            if p.poll() is not None:
                self.fail(p.stderr.read())
            img = os.path.join(state, 'disk0.img')
            st = os.stat(img)
            self.assertEqual(st.st_size, 10 << 30)
            self.assertLess(st.st_blocks * 512, 1 << 20, 'demo disk is not sparse')

            env = dict(os.environ, CBTD_QMP=qmp)
            r = subprocess.run([CBTCTL, 'query-named-block-nodes'], env=env,
                               capture_output=True, text=True, timeout=10)
            self.assertEqual(r.returncode, 0, r.stderr)
            nodes = json.loads(r.stdout)
            self.assertEqual([n['node-name'] for n in nodes], ['disk0'])
            self.assertEqual(nodes[0]['image']['virtual-size'], 10 << 30)

            r = subprocess.run([CBTCTL, '--qmp', qmp, '--json', 'blockdev-add', 'driver=null-co',
                                'node-name=n1', 'size=1048576'],
                               capture_output=True, text=True, timeout=10)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(json.loads(r.stdout), {'return': {}})

            r = subprocess.run([CBTCTL, '--qmp', qmp, 'blockdev-del', 'node-name=nope'],
                               capture_output=True, text=True, timeout=10)
            self.assertEqual(r.returncode, 1)
            self.assertEqual(r.stderr.strip(),
                             "cbtctl: GenericError: Failed to find node with node-name='nope'")

            r = subprocess.run(['nbdinfo', '--size', 'nbd+unix:///disk0?socket=' +
                                os.path.join(state, 'nbd.sock')],
                               capture_output=True, text=True, timeout=20)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(int(r.stdout), 10 << 30)

            # A second start on the same state directory reuses the disk.
            p.send_signal(signal.SIGTERM)
            self.assertEqual(p.wait(10), 0)
            out = p.stdout.read()
            self.assertIn('QMP listening on', out)
            self.assertIn('NBD listening on', out)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            shutil.rmtree(d, ignore_errors=True)


if __name__ == '__main__':
    unittest.main(verbosity=2)
