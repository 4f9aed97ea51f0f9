#!/usr/bin/python3
"""QMP wire behaviour of cbtd, compared byte for byte with qemu-storage-daemon 7.2.

Every case goes to both daemons on a fresh connection; the replies must be the same lines
(member order included: cbtd prints QEMU's order), except the version numbers, which are
normalised. Cases cover malformed JSON and resynchronisation, the request envelope, capability
negotiation, ids of every JSON type, and argument validation of commands both implement.
"""
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'lib'))
import cbttest  # noqa: E402

# After each case: 0xFF forces QEMU's lexer out of any state (an unterminated string, an open
# object), then a request with a known id marks the end of the case's replies.
SYNC = b'\xff\n{"execute": "qmp_capabilities", "id": "sync"}\n'

NEGOTIATE = b'{"execute": "qmp_capabilities"}\n'

# (name, bytes, negotiate first)
CASES = [
    # JSON syntax, lexical errors and resynchronisation
    ('stray', b'@', True),
    ('stray-sign', b'-x', True),
    ('leading-zero', b'{"execute": 065536}', True),
    ('hex', b'{"execute": 0x10000}', True),
    ('duplicate-key', b'{"a": 1, "a": 2}', True),
    ('key-not-string', b'{1: 2}', True),
    ('missing-colon', b'{"a" 2}', True),
    ('list-separator', b'[1 2]', True),
    ('bad-keyword', b'nul ', True),
    ('lone-closer', b']', True),
    ('closers', b'}{', True),
    ('mixed-closers', b'[}', True),
    ('number-only', b'1 ', True),
    ('string-only', b'"hello"', True),
    ('array-only', b'[1, 2]', True),
    ('missing-value', b'{"execute": }', True),
    ('trailing-comma', b'{"execute": "query-version",}', True),
    ('bad-escape', b'{"execute": "\\x"}', True),
    ('lone-high-surrogate', b'{"execute": "x\\ud83d"}', True),
    ('lone-low-surrogate', b'{"execute": "x\\ude00"}', True),
    ('short-unicode', b'{"execute": "x\\u12"}', True),
    ('noncharacter', b'{"execute": "x\\ufffe"}', True),
    ('nul-char', b'{"execute": "x\\u0000y"}', True),
    ('surrogate-pair', b'{"execute": "\\ud83d\\ude00"}', True),
    ('utf8-outside', b'\xc3\xa9', True),
    ('impossible-bytes', b'\xff\xff', True),
    ('impossible-in-string', b'"\xff"', True),
    ('truncated-utf8', b'"a\xc3"', True),
    ('overlong-utf8', b'{"execute": "\xc0\xaf"}', True),
    ('control-in-string', b'"a\nb"', True),
    ('garbage-then-valid', b'@garbage{"execute": "query-version", "id": 1}', True),
    ('two-back-to-back', b'{"execute": "query-version", "id": 1}{"execute": "query-version"}',
     True),
    ('whitespace-only', b'  \r\n\t  ', True),
    ('single-quotes', b"{'execute': 'query-version', 'id': 'it\\'s'}", True),
    ('deep-nesting', b'[' * 1025 + b']' * 3, True),
    ('deep-object', b'{"a": ' * 1025, True),
    ('max-nesting-ok', b'{"execute": "query-version", "id": ' + b'[' * 1023 + b']' * 1023 + b'}',
     True),
    # the request envelope
    ('empty-object', b'{}', True),
    ('execute-not-string', b'{"execute": 1}', True),
    ('arguments-array', b'{"execute": "query-version", "arguments": []}', True),
    ('arguments-null', b'{"execute": "query-version", "arguments": null}', True),
    ('unexpected-member', b'{"execute": "query-version", "foo": 1}', True),
    ('two-unexpected', b'{"foo": 1, "bar": 2, "execute": "query-version"}', True),
    ('several-problems', b'{"execute": 1, "foo": 1, "arguments": 2}', True),
    ('unknown-command', b'{"execute": "frobnicate", "id": "f"}', True),
    ('exec-oob-without-oob', b'{"exec-oob": "query-version"}', True),
    ('execute-and-oob-without-oob', b'{"execute": "query-version", "exec-oob": "x"}', True),
    ('args-for-no-args', b'{"execute": "query-version", "arguments": {"x": 1}}', True),
    # ids
    ('id-number', b'{"execute": "query-version", "id": 1}', True),
    ('id-float', b'{"execute": "query-version", "id": 1.0}', True),
    ('id-fraction', b'{"execute": "query-version", "id": 0.1}', True),
    ('id-negative-zero', b'{"execute": "query-version", "id": -0.0}', True),
    ('id-int-zero', b'{"execute": "query-version", "id": -0}', True),
    ('id-big', b'{"execute": "query-version", "id": 1e20}', True),
    ('id-uint64', b'{"execute": "query-version", "id": 18446744073709551615}', True),
    ('id-int64-min', b'{"execute": "query-version", "id": -9223372036854775808}', True),
    ('id-beyond-uint64', b'{"execute": "query-version", "id": 18446744073709551616}', True),
    ('id-long-int', b'{"execute": "query-version", "id": 123456789012345678901234567890}', True),
    ('id-string', b'{"execute": "query-version", "id": "abc\\u00e9\\ud83d\\ude00\\u007f\\/"}',
     True),
    ('id-object', b'{"execute": "query-version", "id": {"a": [null, true, false]}}', True),
    ('id-null', b'{"execute": "query-version", "id": null}', True),
    ('id-on-error', b'{"execute": "frobnicate", "id": [1, {"b": "c"}]}', True),
    ('id-on-envelope-error', b'{"id": 7}', True),
    # capability negotiation
    ('before-negotiation', b'{"execute": "query-version", "id": 1}', False),
    ('unknown-before-negotiation', b'{"execute": "frobnicate"}', False),
    ('parse-error-before-negotiation', b'@', False),
    ('oob-before-negotiation', b'{"exec-oob": "query-version"}', False),
    ('bad-capability', b'{"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}}',
     False),
    ('capability-not-list',
     b'{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}', False),
    ('capability-not-string', b'{"execute": "qmp_capabilities", "arguments": {"enable": [1]}}',
     False),
    ('capability-unexpected', b'{"execute": "qmp_capabilities", "arguments": {"x": 1}}', False),
    ('negotiate-oob', b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n'
     b'{"exec-oob": "query-version", "id": 2}\n'
     b'{"execute": "query-version", "exec-oob": "query-version"}', False),
    ('negotiate-empty', b'{"execute": "qmp_capabilities", "arguments": {"enable": []}}', False),
    ('negotiate-twice', b'{"execute": "qmp_capabilities"}', True),
    ('negotiate-twice-bad-args',
     b'{"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}}', True),
    # argument validation (before any side effect)
    ('bitmap-add-missing', b'{"execute": "block-dirty-bitmap-add", "arguments": {}}', True),
    ('bitmap-add-name-type', b'{"execute": "block-dirty-bitmap-add", '
     b'"arguments": {"node": "a", "name": 1}}', True),
    ('bitmap-add-granularity-big', b'{"execute": "block-dirty-bitmap-add", '
     b'"arguments": {"node": "a", "name": "b", "granularity": 4294967296}}', True),
    ('bitmap-add-granularity-negative', b'{"execute": "block-dirty-bitmap-add", '
     b'"arguments": {"node": "a", "name": "b", "granularity": -1}}', True),
    ('bitmap-add-granularity-string', b'{"execute": "block-dirty-bitmap-add", '
     b'"arguments": {"node": "a", "name": "b", "granularity": "x"}}', True),
    ('bitmap-add-granularity-float', b'{"execute": "block-dirty-bitmap-add", '
     b'"arguments": {"node": "a", "name": "b", "granularity": 512.0}}', True),
    ('bitmap-add-persistent-type', b'{"execute": "block-dirty-bitmap-add", '
     b'"arguments": {"node": "a", "name": "b", "persistent": "yes"}}', True),
    ('bitmap-add-unexpected', b'{"execute": "block-dirty-bitmap-add", '
     b'"arguments": {"node": "a", "name": "b", "frob": 1, "nic": 2}}', True),
    ('bitmap-remove-missing', b'{"execute": "block-dirty-bitmap-remove", '
     b'"arguments": {"node": "a"}}', True),
    ('merge-element-type', b'{"execute": "block-dirty-bitmap-merge", '
     b'"arguments": {"node": "a", "target": "b", "bitmaps": [1]}}', True),
    ('merge-element-missing', b'{"execute": "block-dirty-bitmap-merge", '
     b'"arguments": {"node": "a", "target": "b", "bitmaps": ["x", {"node": "a"}]}}', True),
    ('merge-element-unexpected', b'{"execute": "block-dirty-bitmap-merge", '
     b'"arguments": {"node": "a", "target": "b", "bitmaps": [{"node": "a", "name": "n", '
     b'"x": 1}]}}', True),
    ('merge-not-list', b'{"execute": "block-dirty-bitmap-merge", '
     b'"arguments": {"node": "a", "target": "b", "bitmaps": "x"}}', True),
    ('blockdev-add-empty', b'{"execute": "blockdev-add", "arguments": {}}', True),
    ('blockdev-add-bad-driver', b'{"execute": "blockdev-add", "arguments": {"driver": "nope"}}',
     True),
    ('blockdev-add-driver-type', b'{"execute": "blockdev-add", "arguments": {"driver": 1}}',
     True),
    ('blockdev-add-child-missing', b'{"execute": "blockdev-add", "arguments": '
     b'{"driver": "raw", "node-name": "x", "file": {"driver": "file"}}}', True),
    ('blockdev-add-child-enum', b'{"execute": "blockdev-add", "arguments": {"driver": "raw", '
     b'"node-name": "x", "file": {"driver": "file", "filename": "/x", "aio": "bogus"}}}', True),
    ('blockdev-add-child-type', b'{"execute": "blockdev-add", "arguments": '
     b'{"driver": "raw", "node-name": "x", "file": 1}}', True),
    ('blockdev-add-size-float', b'{"execute": "blockdev-add", "arguments": '
     b'{"driver": "null-co", "node-name": "x", "size": 1.5}}', True),
    ('blockdev-add-size-string', b'{"execute": "blockdev-add", "arguments": '
     b'{"driver": "null-co", "node-name": "x", "size": "1"}}', True),
    ('blockdev-add-read-only-type', b'{"execute": "blockdev-add", "arguments": '
     b'{"driver": "null-co", "node-name": "x", "read-only": "on"}}', True),
    ('blockdev-add-unexpected', b'{"execute": "blockdev-add", "arguments": '
     b'{"driver": "null-co", "node-name": "x", "foo": 1, "bar": 2}}', True),
    ('blockdev-add-arguments-array', b'{"execute": "blockdev-add", "arguments": []}', True),
    ('blockdev-del-missing', b'{"execute": "blockdev-del", "arguments": {}}', True),
    ('nbd-start-path-type', b'{"execute": "nbd-server-start", "arguments": '
     b'{"addr": {"type": "unix", "data": {"path": 1}}}}', True),
    ('nbd-start-unexpected', b'{"execute": "nbd-server-start", "arguments": '
     b'{"addr": {"type": "unix", "data": {"path": "/x", "foo": 1}}}}', True),
    ('nbd-start-bad-type', b'{"execute": "nbd-server-start", "arguments": '
     b'{"addr": {"type": "nope"}}}', True),
    ('nbd-start-max-connections', b'{"execute": "nbd-server-start", "arguments": '
     b'{"addr": {"type": "unix", "data": {"path": "/x"}}, "max-connections": -1}}', True),
    ('export-add-missing', b'{"execute": "block-export-add", "arguments": {"type": "nbd"}}',
     True),
    ('export-add-bitmaps-type', b'{"execute": "block-export-add", "arguments": {"type": "nbd", '
     b'"id": "e", "node-name": "n", "bitmaps": [1]}}', True),
    ('transaction-not-list', b'{"execute": "transaction", "arguments": {"actions": {}}}', True),
    ('transaction-bad-type', b'{"execute": "transaction", "arguments": '
     b'{"actions": [{"type": "nope"}]}}', True),
    ('transaction-data-missing', b'{"execute": "transaction", "arguments": {"actions": '
     b'[{"type": "block-dirty-bitmap-add", "data": {"node": "a"}}]}}', True),
    ('query-nodes-flat-null', b'{"execute": "query-named-block-nodes", '
     b'"arguments": {"flat": null}}', True),
]

MICRO = re.compile(rb'"micro": \d+')
PACKAGE = re.compile(rb'"package": "[^"]*"')

PRETTY_CASES = [
    b'{"execute": "query-version", "id": {"a": [1, {}, []], "b": {"c": null}}}',
    b'{"execute": "frobnicate", "id": [1, 2]}',
    b'@',
    b'{"execute": "block-dirty-bitmap-add", "arguments": {"node": "a"}}',
]


def normalise(data):
    return PACKAGE.sub(b'"package": "X"', MICRO.sub(b'"micro": 0', data))


class Wire:
    """A raw connection: bytes in, "\\r\\n"-terminated lines out."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b''

    def line(self):
        while b'\r\n' not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:  # closed by the peer with our input unread
                return None
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b'\r\n', 1)
        return line

    def until_sync(self):
        out = []
        while True:
            line = self.line()
            if line is None:
                out.append(b'<EOF>')
                return out
            if b'"id": "sync"' in line:  # (no json.loads: some replies nest 1024 deep)
                return out
            out.append(normalise(line))

    def close(self):
        self.sock.close()


# Command-line options: keyval strings converted per schema type (QEMU's keyval texts), and the
# JSON form validated like QMP. Both daemons must refuse them with the same message.
CLI_CASES = [
    ['--blockdev', 'driver=null-co,node-name=x,size=abc'],
    ['--blockdev', 'driver=null-co,node-name=x,size=1.5'],
    ['--blockdev', 'driver=file,node-name=x,filename=/nonexistent,read-only=maybe'],
    ['--blockdev', 'driver=raw,node-name=x,file.driver=null-co,file.size=abc'],
    ['--blockdev', 'driver=raw,node-name=x,file.driver=nope'],
    ['--blockdev', 'driver=raw,node-name=x,file.driver=null-co,file.read-zeroes=1'],
    ['--blockdev', 'driver=null-co,node-name=x,file.foo=1'],
    ['--blockdev', 'driver=null-co,node-name=x,foo=1,bar=2'],
    ['--blockdev', 'driver=nope,node-name=x'],
    ['--blockdev', '{"driver": "null-co", "node-name": "x", "size": "1"}'],
    ['--blockdev', '{"driver": "null-co", "node-name": 1}'],
    ['--blockdev', '{"driver": "raw", "node-name": "x", "file": {"driver": "file"}}'],
    ['--nbd-server', 'addr.type=unix,addr.path=/nonexistent/s,max-connections=-1'],
    ['--nbd-server', 'addr.type=unix,addr.path=/nonexistent/s,max-connections=abc'],
    ['--nbd-server', 'addr.type=unix,addr.path=/nonexistent/s,max-connections=5000000000'],
    ['--nbd-server', 'addr.type=nope'],
]


def cli_error(argv):
    """The error message of a daemon that must refuse its command line."""
    import subprocess
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=20)
    assert p.returncode != 0, (argv, p.stderr)
    return p.stderr.strip().splitlines()[-1]


def run_case(path, data, negotiate):
    w = Wire(path)
    try:
        greeting = normalise(w.line())
        if negotiate:
            w.sock.sendall(NEGOTIATE)
            assert w.line() == b'{"return": {}}'
        w.sock.sendall(data + SYNC)
        return [greeting] + w.until_sync()
    finally:
        w.close()


def canonical(schema, name, depth=0):
    """A structural form of a SchemaInfo type, with the numbers resolved."""
    if depth > 6:
        return '...'
    if name.startswith('['):
        return ['array', canonical(schema, name[1:-1], depth + 1)]
    info = schema[name]
    mt = info['meta-type']
    if mt == 'builtin':
        return name
    if mt == 'enum':
        return ['enum', sorted(info['values'])]
    if mt == 'alternate':
        return ['alternate', sorted(json.dumps(canonical(schema, m['type'], depth + 1))
                                    for m in info['members'])]
    members = {m['name']: (canonical(schema, m['type'], depth + 1), 'default' in m)
               for m in info['members']}
    variants = {v['case']: canonical(schema, v['type'], depth + 1)
                for v in info.get('variants', [])}
    return ['object', members, info.get('tag'), variants]


class WireTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.daemons = []
        try:
            cls.cbtd = cls.start(cbttest.Daemon)
            cls.qsd = cls.start(cbttest.Daemon, qsd=True)
            cls.cbtd_pretty = cls.start(cls.pretty_daemon, False)
            cls.qsd_pretty = cls.start(cls.pretty_daemon, True)
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def start(cls, factory, *args, **kwargs):
        d = factory(*args, **kwargs)
        cls.daemons.append(d)
        return d

    @staticmethod
    def pretty_daemon(qsd):
        """A daemon with a second, pretty monitor at <dir>/pretty.sock."""
        tmp = tempfile.mkdtemp(prefix='cbtd-test-')
        path = os.path.join(tmp, 'pretty.sock')
        extra = ['--chardev', 'socket,id=p,path=%s,server=on,wait=off' % path,
                 '--monitor', 'chardev=p,pretty=on']
        try:
            d = cbttest.Daemon(extra, qsd=qsd, tmpdir=tmp)
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        d.own_dir = True  # stop() removes the directory
        cbttest.wait_for(lambda: os.path.exists(path), what='pretty monitor')
        return d

    @classmethod
    def tearDownClass(cls):
        for d in cls.daemons:
            d.stop()

    def test_cases(self):
        for name, data, negotiate in CASES:
            with self.subTest(case=name):
                want = run_case(self.qsd.qmp_path, data, negotiate)
                got = run_case(self.cbtd.qmp_path, data, negotiate)
                self.assertEqual(got, want)
        self.assertTrue(self.cbtd.alive())

    def test_pretty(self):
        # A pretty monitor on each daemon: 4-space indents, "\r\n" everywhere, same bytes.
        def pretty_run(d):
            path = d.path('pretty.sock')
            w = Wire(path)
            try:
                w.sock.sendall(b''.join(c + b'\n' for c in PRETTY_CASES) + SYNC)
                data = b''
                while b'"id": "sync"' not in data or not data.endswith(b'\r\n}\r\n'):
                    chunk = w.sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                return normalise(data)
            finally:
                w.close()

        want = pretty_run(self.qsd_pretty)
        got = pretty_run(self.cbtd_pretty)
        self.assertIn(b'{\r\n    "return": {\r\n    },\r\n    "id": "sync"\r\n}\r\n', want)
        self.assertEqual(got, want)

    def test_command_line(self):
        for args in CLI_CASES:
            with self.subTest(args=args):
                want = cli_error([cbttest.QSD] + args)
                prefix = 'qemu-storage-daemon: %s %s: ' % (args[0], args[1])
                self.assertTrue(want.startswith(prefix), want)
                got = cli_error([cbttest.CBTD] + args)
                self.assertTrue(got.endswith(': ' + want[len(prefix):]), (got, want))

    def test_bad_clients_do_not_hurt(self):
        # cbtd only (qsd's limit is 64 MiB, cbtd's CBT_RPC_MAX_MESSAGE 8 MiB): an oversized
        # message gets an error and that connection closes; a garbage flood gets one error per
        # message; a client vanishing mid-message is forgotten; a well-behaved client on the
        # same socket sees none of it and the daemon stays up.
        good = Wire(self.cbtd.qmp_path)
        big = Wire(self.cbtd.qmp_path)
        junk = Wire(self.cbtd.qmp_path)
        try:
            for w in (good, big, junk):
                w.line()
                w.sock.sendall(NEGOTIATE)
                self.assertEqual(w.line(), b'{"return": {}}')
            junk.sock.sendall(b'@\n' * 1000)
            try:
                big.sock.sendall(b'{"execute": "query-version", "id": "' + b'a' * (9 << 20))
            except OSError:
                pass  # the daemon may close while we are still sending
            self.assertEqual(big.line(), b'{"error": {"class": "GenericError", '
                                         b'"desc": "JSON message size limit exceeded"}}')
            self.assertIsNone(big.line())
            for _ in range(1000):
                self.assertIn(b"stray '@'", junk.line())
            vanish = Wire(self.cbtd.qmp_path)
            vanish.line()
            vanish.sock.sendall(b'{"execute": "query-ver')
            vanish.close()
            good.sock.sendall(b'{"execute": "query-version", "id": "ok"}')
            self.assertIn(b'"id": "ok"', good.line())
            self.assertTrue(self.cbtd.alive())
        finally:
            for w in (good, big, junk):
                w.close()

    def test_non_finite_id(self):
        # QEMU prints the non-JSON "inf" for an id of 1e400; cbtd prints null (documented).
        data = b'{"execute": "query-version", "id": 1e400}'
        want = run_case(self.qsd.qmp_path, data, True)
        got = run_case(self.cbtd.qmp_path, data, True)
        self.assertTrue(want[1].endswith(b'"id": inf}'))
        self.assertEqual(got[1], want[1][:-len(b'inf}')] + b'null}')
        self.assertIsNone(json.loads(got[1])['id'])

    def test_interleaved_clients(self):
        # qsd serves one client per monitor at a time; cbtd serves all: each stays independent.
        a, b = Wire(self.cbtd.qmp_path), Wire(self.cbtd.qmp_path)
        try:
            a.line(), b.line()
            a.sock.sendall(NEGOTIATE + b'{"execute": "query-version", "id": "a1"')
            b.sock.sendall(NEGOTIATE + b'{"execute": "query-version", "id": "b1"}')
            self.assertEqual(b.line(), b'{"return": {}}')
            self.assertIn(b'"id": "b1"', b.line())
            a.sock.sendall(b'}')
            self.assertEqual(a.line(), b'{"return": {}}')
            self.assertIn(b'"id": "a1"', a.line())
        finally:
            a.close()
            b.close()

    def test_introspection_matches(self):
        with self.cbtd.qmp() as c, self.qsd.qmp() as q:
            ours = {e['name']: e for e in c.execute('query-qmp-schema')}
            theirs = {e['name']: e for e in q.execute('query-qmp-schema')}
            commands = {x['name'] for x in c.execute('query-commands')}
        # Every entry we publish resolves, and has QEMU's shape.
        for e in ours.values():
            for key in ('arg-type', 'ret-type', 'element-type'):
                if key in e:
                    canonical(ours, e[key])
        self.assertEqual({e['name'] for e in ours.values() if e['meta-type'] == 'command'},
                         commands)
        self.assertEqual(ours['0'], {'name': '0', 'members': [], 'meta-type': 'object'})
        for name in ('qmp_capabilities', 'query-version', 'query-commands',
                     'block-dirty-bitmap-add', 'block-dirty-bitmap-remove',
                     'block-dirty-bitmap-clear', 'block-dirty-bitmap-enable',
                     'block-dirty-bitmap-disable', 'block-dirty-bitmap-merge',
                     'blockdev-del', 'nbd-server-stop', 'block-export-del', 'quit'):
            with self.subTest(command=name):
                self.assertEqual(ours[name].get('features'), theirs[name].get('features'))
                for key in ('arg-type', 'ret-type'):
                    self.assertEqual(canonical(ours, ours[name][key]),
                                     canonical(theirs, theirs[name][key]))


if __name__ == '__main__':
    cbttest.main()
