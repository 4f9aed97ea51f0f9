#!/usr/bin/python3
"""blockdev-add, blockdev-del and query-named-block-nodes on cbtd and on qemu-storage-daemon 7.2,
side by side: every step of every scenario must get the same reply from both (compared as JSON
values), and image locks must exclude cbtd and QEMU's tools from each other as they exclude two
QEMU processes.

Replies are normalised in one way only: QEMU names inline children "#block" + a counter + two
random digits, so "#blockNNN" is compared without its digits. actual-size is compared as is: both
daemons stat the same files, which no scenario writes to.
"""
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import unittest

import cbttest
from cbttest import Daemon

# The drivers cbtd implements; qemu-storage-daemon knows 42.
IMPLEMENTED = {'file', 'host_device', 'raw', 'null-co', 'null-aio', 'copy-before-write',
               'snapshot-access', 'blkdebug'}


def normalise(reply):
    text = json.dumps(reply, sort_keys=True)
    return json.loads(re.sub(r'#block\d+', '#block', text))


def connect(d):
    """A negotiated QMP client. Retries while the socket file exists but is not listening yet,
    and skips a second greeting: qemu-storage-daemon can send one more to a client that
    connected while its monitor was being set up."""
    deadline = time.monotonic() + 10
    while True:
        try:
            c = d.qmp(negotiate=False)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    reply = c.cmd('qmp_capabilities')
    while reply is not None and 'QMP' in reply:
        reply = c.recv_reply()
    if reply is None or 'return' not in reply:
        raise AssertionError('qmp_capabilities failed: %r' % reply)
    return c


def expand(value, d):
    """Substitute {dir} (the images' directory) and {sock} (a per-daemon path) in strings."""
    if isinstance(value, str):
        return value.format(dir=d['dir'], sock=d['sock'])
    if isinstance(value, list):
        return [expand(v, d) for v in value]
    if isinstance(value, dict):
        return {k: expand(v, d) for k, v in value.items()}
    return value


class Base(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix='cbtd-blockdev-')
        cbttest.make_image(os.path.join(cls.dir, 'img'), 1 << 20, [(65536, b'\xaa' * 4096)])
        cbttest.make_image(os.path.join(cls.dir, 'small'), 1000, [(0, b'\x01' * 1000)])
        cbttest.make_image(os.path.join(cls.dir, 'other'), 4 << 20)
        cbttest.make_image(os.path.join(cls.dir, 'we"ird\\ n\u00e4me\t'), 4096)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def replies(self, qsd, steps, extra=()):
        """Run @steps ([command, args?]) on one daemon; return the normalised replies."""
        out = []
        with Daemon(qsd=qsd, extra=extra) as d:
            q = connect(d)
            subst = {'dir': self.dir, 'sock': d.path('nbd.sock')}
            for step in steps:
                args = expand(step[1], subst) if len(step) > 1 else None
                out.append(normalise(q.cmd(step[0], args)))
            # Whatever happened, the daemon is still there and answers.
            self.assertEqual(q.execute('query-version')['qemu']['major'], 7)
        return out

    def compare(self, steps, extra=()):
        ref = self.replies(True, steps, extra)
        got = self.replies(False, steps, extra)
        for step, want, have in zip(steps, ref, got):
            self.assertEqual(have, want, 'step %s' % json.dumps(step))
        return got


class TestAdd(Base):
    def test_node_names(self):
        self.compare([
            ['blockdev-add', {'driver': 'null-co'}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': '1abc'}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': ''}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': '#x'}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'a b'}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'a' * 32}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'a' * 31}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'x-1.2_3'}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'x-1.2_3'}],
            ['blockdev-add', {'driver': 'raw', 'file': {'driver': 'null-co', 'node-name': 'c'}}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'r',
                              'file': {'driver': 'null-co', 'node-name': 'bad name'}}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'r',
                              'file': {'driver': 'null-co', 'node-name': 'x-1.2_3'}}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'same',
                              'file': {'driver': 'null-co', 'node-name': 'same'}}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'x-1.2_3',
                              'file': {'driver': 'null-co', 'node-name': 'fresh'}}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'r2', 'file': {
                'driver': 'raw', 'node-name': 'r3', 'offset': 512,
                'file': {'driver': 'null-co', 'size': 4096, 'node-name': 'r4'}}}],
            ['query-named-block-nodes'],
            ['blockdev-del', {'node-name': 'r4'}],
            ['blockdev-del', {'node-name': 'r2'}],
            ['query-named-block-nodes'],
        ])

    def test_file(self):
        self.compare([
            ['blockdev-add', {'driver': 'file', 'node-name': 'f0', 'filename': '{dir}/nope'}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'f0', 'filename': '{dir}'}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'f0', 'filename': '{dir}',
                              'read-only': True}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'f0', 'filename': '/dev/null'}],
            ['blockdev-add', {'driver': 'host_device', 'node-name': 'h0',
                              'filename': '{dir}/img'}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'f0', 'filename': '{dir}/img',
                              'aio': 'native'}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'f0', 'filename': '{dir}/img',
                              'pr-manager': 'pr0'}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'f0', 'filename': '{dir}/img',
                              'locking': 'maybe'}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'f0', 'filename': '{dir}/img',
                              'aio': 'io_uring', 'locking': 'on', 'drop-cache': False,
                              'aio-max-batch': 4, 'x-check-cache-dropped': False}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'f0', 'filename': '{dir}/img'}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'f1', 'filename': '{dir}/img',
                              'cache': {'direct': True}, 'aio': 'native'}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'f2', 'filename': '{dir}/img',
                              'read-only': True, 'force-share': True, 'locking': 'off'}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'f3', 'filename': '{dir}/small',
                              'cache': {'no-flush': True}, 'auto-read-only': True}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'f4', 'filename': '{dir}/img',
                              'force-share': True}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'f4', 'filename': '{dir}/img',
                              'detect-zeroes': 'unmap'}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'f4', 'filename': '{dir}/img',
                              'detect-zeroes': 'unmap', 'discard': 'unmap'}],
            ['query-named-block-nodes'],
            ['query-named-block-nodes', {'flat': True}],
        ])

    def test_raw(self):
        self.compare([
            ['blockdev-add', {'driver': 'file', 'node-name': 'f0', 'filename': '{dir}/img'}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd0', 'file': 'nosuch'}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd0', 'file': 'f0',
                              'offset': 1048577}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd0', 'file': 'f0',
                              'offset': 4096, 'size': 1048576}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd0', 'file': 'f0', 'offset': -1}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd0', 'file': 'f0', 'size': -1}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd0', 'file': 'f0', 'size': 4095}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd0', 'file': 'f0', 'offset': 1.5}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd0', 'file': 5}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd0'}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd0', 'file': {'driver': 'file'}}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd0',
                              'file': {'filename': 'x'}}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd0',
                              'file': {'driver': 'file', 'filename': '{dir}/nope'}}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'f0',
                              'file': {'driver': 'file', 'filename': '{dir}/img'}}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd0', 'file': 'f0'}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd1', 'file': 'f0',
                              'offset': 8192}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd2', 'file': 'f0',
                              'offset': 1048576}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd3', 'file': 'f0',
                              'offset': 100, 'size': 1024}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd4', 'file': 'f0', 'size': 0}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd5', 'file': 'd0'}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd6', 'file':
                              {'driver': 'raw', 'file': {'driver': 'file',
                                                         'filename': '{dir}/small'}}}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd7', 'discard': 'unmap',
                              'read-only': True, 'cache': {'direct': True},
                              'file': {'driver': 'file', 'filename': '{dir}/img'}}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd8', 'read-only': True,
                              'file': {'driver': 'file', 'filename': '{dir}/img',
                                       'read-only': False, 'cache': {'no-flush': True}}}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'r0', 'filename': '{dir}/small',
                              'read-only': True}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'r1', 'file': 'r0'}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'q0', 'offset': 512,
                              'file': {'driver': 'file',
                                       'filename': '{dir}/we"ird\\ n\u00e4me\t'}}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'q1', 'filename': ''}],
            ['query-named-block-nodes'],
        ])

    def test_null(self):
        self.compare([
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'n0'}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'n1', 'size': 1000}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'n2', 'size': 4096,
                              'read-zeroes': True, 'latency-ns': 5, 'discard': 'unmap',
                              'detect-zeroes': 'unmap', 'read-only': True,
                              'cache': {'direct': False, 'no-flush': True}}],
            ['blockdev-add', {'driver': 'null-aio', 'node-name': 'n3', 'latency-ns': 0}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'n4', 'size': 1.5}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'n4', 'size': '1k'}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'n4', 'latency-ns': -1}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'n4', 'read-zeroes': 'yes'}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'n4', 'bogus': 1}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'n4', 'cache': {'direct': 1}}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'r0',
                              'file': {'driver': 'null-co', 'read-zeroes': True}}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'r1', 'offset': 512, 'size': 512,
                              'file': {'driver': 'null-co', 'size': 1000}}],
            ['query-named-block-nodes'],
        ])

    def test_host_device(self):
        dev = loop_attach(os.path.join(self.dir, 'other'))
        if dev is None:
            self.skipTest('no usable loop device (/dev/loop-control and losetup needed)')
        try:
            self.compare([
                ['blockdev-add', {'driver': 'host_device', 'node-name': 'h0', 'filename': dev,
                                  'cache': {'direct': True}, 'discard': 'unmap'}],
                ['blockdev-add', {'driver': 'raw', 'node-name': 'd0', 'file': 'h0',
                                  'offset': 4096, 'size': 65536}],
                ['blockdev-add', {'driver': 'raw', 'node-name': 'd1', 'read-only': True,
                                  'file': {'driver': 'host_device', 'filename': dev}}],
                ['blockdev-add', {'driver': 'file', 'node-name': 'f0', 'filename': dev}],
                ['query-named-block-nodes'],
            ])
        finally:
            subprocess.run(['losetup', '-d', dev], check=False)

    def test_order_of_checks(self):
        """With several faults, the one QEMU checks first is reported: children, force-share,
        empty file name, detect-zeroes, node name, then the driver's own options."""
        self.compare([
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'dup'}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'dup', 'force-share': True}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'dup',
                              'detect-zeroes': 'unmap'}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'dup', 'filename': ''}],
            ['blockdev-add', {'driver': 'host_device', 'node-name': 'dup', 'filename': ''}],
            ['blockdev-add', {'driver': 'file', 'node-name': '1bad', 'filename': '/nope'}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'dup', 'filename': '/nope'}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'dup', 'filename': '/nope',
                              'aio': 'native'}],
            ['blockdev-add', {'driver': 'file', 'node-name': '1bad', 'filename': '/nope',
                              'aio': 'native'}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'dup', 'force-share': True,
                              'file': {'driver': 'file', 'filename': '/nope'}}],
            ['blockdev-add', {'driver': 'raw', 'node-name': '1bad', 'detect-zeroes': 'unmap',
                              'file': {'driver': 'file', 'filename': '/nope'}}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'x', 'force-share': True,
                              'read-only': True,
                              'file': {'driver': 'null-co', 'read-only': False}}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'dup', 'latency-ns': -1}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'dup', 'file': 'nosuch'}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'dup', 'file': 'dup',
                              'offset': 99999999999}],
            ['blockdev-add', {'driver': 'file', 'node-name': '1bad', 'filename': '/tmp',
                              'pr-manager': 'x'}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'x', 'filename': '',
                              'force-share': True}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'x', 'filename': '',
                              'detect-zeroes': 'unmap'}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'x', 'filename': '/nope',
                              'force-share': True, 'detect-zeroes': 'unmap'}],
            ['blockdev-add', {'driver': 'file', 'node-name': '1bad', 'filename': ''}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'x', 'force-share': True,
                              'file': 'nosuch'}],
            # A driver cbtd lacks still looks its children up first, as QEMU does.
            ['blockdev-add', {'driver': 'qcow2', 'node-name': 'q', 'file': 'nosuch'}],
            ['query-named-block-nodes'],
        ])

    def test_schema_errors(self):
        self.compare([
            ['blockdev-add', {'node-name': 'x', 'filename': '{dir}/img'}],
            ['blockdev-add', {'driver': 'nosuch', 'node-name': 'x'}],
            ['blockdev-add', {'driver': 7, 'node-name': 'x'}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'x'}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'x', 'filename': 1}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'x', 'discard': 'trim'}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'x', 'detect-zeroes': True}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'x', 'cache': []}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'x', 'cache': {'x': 1}}],
            ['blockdev-del'],
            ['blockdev-del', {'node-name': 1}],
            ['blockdev-del', {'node-name': 'x', 'force': True}],
            ['query-named-block-nodes', {'flat': 'yes'}],
            ['query-named-block-nodes', {'x': 1}],
            ['query-named-block-nodes'],
        ])

    def test_command_line(self):
        """--blockdev in keyval and JSON form reaches the same state as on qsd."""
        extra = ['--blockdev', 'driver=file,node-name=f0,filename=%s/img' % self.dir,
                 '--blockdev', json.dumps({'driver': 'raw', 'node-name': 'd0', 'file': 'f0'}),
                 '--blockdev', 'raw,node-name=d1,file.driver=file,file.filename=%s/small'
                 % self.dir,
                 '--blockdev', 'driver=raw,node-name=d2,offset=512,size=4096,file=f0',
                 '--blockdev', 'driver=null-co,node-name=n0,size=4096,read-zeroes=on',
                 '--blockdev', 'driver=file,node-name=f1,filename=%s/img,read-only=on,'
                 'cache.direct=on,aio=native,locking=off' % self.dir]
        self.compare([['query-named-block-nodes']], extra=extra)


class TestDel(Base):
    def test_rules(self):
        self.compare([
            ['blockdev-add', {'driver': 'file', 'node-name': 'f0', 'filename': '{dir}/img'}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd0', 'file': 'f0'}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd1',
                              'file': {'driver': 'file', 'filename': '{dir}/img',
                                       'node-name': 'ff'}}],
            ['blockdev-del', {'node-name': 'zzz'}],
            ['blockdev-del', {'node-name': 'f0'}],
            ['blockdev-del', {'node-name': 'ff'}],
            ['nbd-server-start', {'addr': {'type': 'unix', 'data': {'path': '{sock}'}}}],
            ['block-export-add', {'type': 'nbd', 'id': 'e0', 'node-name': 'd0'}],
            ['block-export-add', {'type': 'nbd', 'id': 'e1', 'node-name': 'ff'}],
            ['blockdev-del', {'node-name': 'd0'}],
            ['blockdev-del', {'node-name': 'ff'}],
            ['block-export-del', {'id': 'e0'}],
            ['block-export-del', {'id': 'e1'}],
            ['blockdev-del', {'node-name': 'f0'}],
            ['blockdev-del', {'node-name': 'd0'}],
            ['blockdev-del', {'node-name': 'd0'}],
            ['query-named-block-nodes'],
            ['blockdev-del', {'node-name': 'd1'}],
            ['query-named-block-nodes'],
            ['blockdev-del', {'node-name': 'f0'}],
            ['query-named-block-nodes'],
            # The names are free again.
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'ff'}],
            ['blockdev-add', {'driver': 'null-co', 'node-name': 'd0'}],
            ['query-named-block-nodes'],
        ])

    def test_writable_export_on_read_only(self):
        self.compare([
            ['blockdev-add', {'driver': 'file', 'node-name': 'r0', 'filename': '{dir}/img',
                              'read-only': True}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'r1', 'file': 'r0'}],
            ['nbd-server-start', {'addr': {'type': 'unix', 'data': {'path': '{sock}'}}}],
            ['block-export-add', {'type': 'nbd', 'id': 'e0', 'node-name': 'r1',
                                  'writable': True}],
            ['block-export-add', {'type': 'nbd', 'id': 'e0', 'node-name': 'r0',
                                  'writable': True}],
            ['query-block-exports'],
        ])


class TestReadOnlyMedium(Base):
    """A file on a read-only file system (a tmpfs mounted here; needs CAP_SYS_ADMIN): plain open
    fails, auto-read-only opens it read-only, and asking for write permission later (a writable
    export) fails as QEMU's dynamic auto-read-only reopen does."""

    def setUp(self):
        self.mnt = os.path.join(self.dir, 'ro-mnt')
        os.makedirs(self.mnt, exist_ok=True)
        if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', self.mnt],
                          capture_output=True).returncode != 0:
            self.skipTest('cannot mount a tmpfs here')
        cbttest.make_image(os.path.join(self.mnt, 'img'), 1 << 20)
        subprocess.run(['mount', '-o', 'remount,ro', self.mnt], check=True)

    def tearDown(self):
        subprocess.run(['umount', self.mnt], check=False)

    def test_auto_read_only(self):
        img = os.path.join(self.mnt, 'img')
        self.compare([
            ['blockdev-add', {'driver': 'file', 'node-name': 'a', 'filename': img}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'b', 'filename': img,
                              'auto-read-only': True}],
            ['blockdev-add', {'driver': 'file', 'node-name': 'c', 'filename': img,
                              'read-only': True}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd', 'auto-read-only': True,
                              'file': {'driver': 'file', 'filename': img,
                                       'cache': {'direct': True}}}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'e', 'file': 'b'}],
            ['query-named-block-nodes'],
            ['nbd-server-start', {'addr': {'type': 'unix', 'data': {'path': '{sock}'}}}],
            ['block-export-add', {'type': 'nbd', 'id': 'e0', 'node-name': 'b',
                                  'writable': True}],
            ['block-export-add', {'type': 'nbd', 'id': 'e1', 'node-name': 'd',
                                  'writable': True}],
            ['block-export-add', {'type': 'nbd', 'id': 'e2', 'node-name': 'e',
                                  'writable': True}],
            ['block-export-add', {'type': 'nbd', 'id': 'e3', 'node-name': 'd'}],
            ['query-block-exports'],
        ])


class TestCbtdOnly(Base):
    """Answers that differ from qemu-storage-daemon on purpose."""

    def test_unsupported_drivers(self):
        with Daemon(qsd=True) as d:
            ref = driver_enum(connect(d))
        with Daemon() as d:
            q = connect(d)
            self.assertEqual(driver_enum(q), ref)
            self.assertEqual(len(ref), 42)
            q.execute('blockdev-add', driver='null-co', node_name='f0')
            for drv in ref - IMPLEMENTED:
                cls, desc = q.error('blockdev-add', driver=drv, node_name='x',
                                    **minimal_args(drv))
                self.assertEqual((cls, desc),
                                 ('GenericError', "Driver '%s' is not supported by cbtd" % drv))
            # Nothing was added, and the child looked up for the format drivers is not in use.
            self.assertEqual([n['node-name'] for n in q.execute('query-named-block-nodes')],
                             ['f0'])
            q.execute('blockdev-del', node_name='f0')

    def test_null_negative_size(self):
        # qemu-storage-daemon 7.2 aborts on this (parse_option_size assertion).
        with Daemon() as d:
            q = connect(d)
            self.assertEqual(q.error('blockdev-add', driver='null-co', node_name='n', size=-1),
                             ('GenericError',
                              "Parameter 'size' expects a non-negative number below 2^64"))
            self.assertEqual(q.execute('query-named-block-nodes'), [])
            q.execute('blockdev-add', driver='null-co', node_name='n', size=4096)
            self.assertEqual(q.execute('query-named-block-nodes')[0]['image']['virtual-size'],
                             4096)


class TestIntrospection(Base):
    def test_commands_match_qsd(self):
        """query-qmp-schema describes the three commands as qemu-storage-daemon does: same
        members, types, optionality, features and enum values (type names are mangled
        differently, so the types are compared resolved). Of BlockdevOptions' 42 branches the
        implemented ones are compared; the driver enum (all 42) is compared in full."""
        schemas = []
        for qsd in (True, False):
            with Daemon(qsd=qsd) as d:
                schemas.append({e['name']: e for e in connect(d).execute('query-qmp-schema')})
        for cmd in ('blockdev-add', 'blockdev-del', 'query-named-block-nodes'):
            for key in ('arg-type', 'ret-type'):
                want = resolve(schemas[0], schemas[0][cmd][key])
                got = resolve(schemas[1], schemas[1][cmd][key], drop=CBTD_ONLY)
                self.assertEqual(got, want, '%s %s' % (cmd, key))
        # The extensions are there, optional, and nowhere in qsd's schema.
        for name in CBTD_ONLY:
            members = [m for e in schemas[1].values() for m in e.get('members', [])
                       if isinstance(m, dict) and m.get('name') == name]
            self.assertTrue(members and all('default' in m for m in members), name)
            self.assertFalse([m for e in schemas[0].values() for m in e.get('members', [])
                              if isinstance(m, dict) and m.get('name') == name], name)


# cbtd's optional members beyond qsd 7.2: persistent bitmaps of file, host_device and raw
# nodes (BlockdevOptionsFile's bitmap-*, BlockDirtyInfo's recovery report and identity;
# docs/bitmaps.md).
CBTD_ONLY = frozenset(('bitmap-store', 'bitmap-sync-interval', 'bitmap-intent-region',
                       'recovery', 'recovered-widening', 'recovery-reason',
                       'store-degraded', 'bitmap-uuid', 'bitmap-created', 'unbroken',
                       'broken-reason', 'max-clients'))


def resolve(schema, name, seen=(), drop=frozenset()):
    """An introspected type with its mangled names replaced by structure, without the members
    named in @drop."""
    if name.startswith('['):
        return [resolve(schema, name[1:-1], seen, drop)]
    ent = schema[name]
    meta = ent['meta-type']
    if meta == 'builtin':
        return ent['json-type']
    if meta == 'enum':
        return {'enum': ent['values']}
    if name in seen:
        return 'recursion'
    seen = seen + (name,)
    if meta == 'array':
        return [resolve(schema, ent['element-type'], seen, drop)]
    if meta == 'alternate':
        return {'alternate': sorted(json.dumps(resolve(schema, m['type'], seen, drop),
                                               sort_keys=True)
                                    for m in ent['members'])}
    out = {'members': {m['name']: [resolve(schema, m['type'], seen, drop), 'default' in m,
                                   m.get('features', [])]
                       for m in ent['members'] if m['name'] not in drop},
           'features': ent.get('features', [])}
    if 'variants' in ent:
        out['tag'] = ent['tag']
        out['variants'] = {v['case']: resolve(schema, v['type'], seen, drop)
                           for v in ent['variants']
                           if name != schema['blockdev-add']['arg-type'] or
                           v['case'] in IMPLEMENTED}
    return out


def driver_enum(q):
    schema = {e['name']: e for e in q.execute('query-qmp-schema')}
    cmd = schema['blockdev-add']
    arg = schema[cmd['arg-type']]
    member = next(m for m in arg['members'] if m['name'] == 'driver')
    return set(schema[member['type']]['values'])


def minimal_args(drv):
    """Arguments that pass the schema for a driver cbtd does not implement."""
    formats = {'bochs', 'cloop', 'compress', 'dmg', 'parallels', 'vdi', 'vhdx', 'vpc', 'qcow',
               'qcow2', 'qed', 'vmdk'}
    if drv == 'host_cdrom':
        return {'filename': '/nonexistent'}
    return {'file': 'f0'} if drv in formats else {}


def loop_attach(path):
    if not os.access('/dev/loop-control', os.R_OK | os.W_OK) or not shutil.which('losetup'):
        return None
    p = subprocess.run(['losetup', '-f', '--show', path], capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else None


# ---- locking ----------------------------------------------------------------------------------

def run(*argv):
    p = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return p.returncode, p.stderr.strip()


def lock_bytes(image):
    """The bytes of @image under OFD locks (we run one daemon at a time)."""
    ino = ':%d ' % os.stat(image).st_ino
    held = set()
    with open('/proc/locks') as f:
        for line in f:
            fields = line.split()
            if 'OFDLCK' in fields and ino in line + ' ':
                start, end = int(fields[-2]), fields[-1]
                held.update(range(start, (start if end == 'EOF' else int(end)) + 1))
    return sorted(held)


class Holder:
    """A QEMU process holding @image the way qemu-img holds a source it copies: consistent read
    and write unshared. It copies into an nbdkit memory disk whose writes take 60 s each."""

    def __init__(self, image, tmp):
        self.sock = os.path.join(tmp, 'slow.sock')
        self.nbdkit = subprocess.Popen(
            ['nbdkit', '-f', '-U', self.sock, '--filter=delay', 'memory', '16M', 'wdelay=60'],
            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cbttest.wait_for(lambda: os.path.exists(self.sock), what='nbdkit socket')
        self.convert = subprocess.Popen(
            ['qemu-img', 'convert', '-n', '-f', 'raw', '-O', 'raw', image,
             'nbd+unix:///?socket=' + self.sock],
            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cbttest.wait_for(lambda: self.holds(image), what='qemu-img to lock the image')

    @staticmethod
    def holds(image):
        ino = ':%d ' % os.stat(image).st_ino
        with open('/proc/locks') as f:
            return any(ino in line and line.split()[-2] == '201' for line in f)

    def stop(self):
        for p in (self.convert, self.nbdkit):
            p.kill()
            p.wait()


class TestLocking(Base):
    def export_steps(self, writable, node_opts=None):
        opts = {'driver': 'file', 'node-name': 'f0', 'filename': '{dir}/img'}
        opts.update(node_opts or {})
        return [
            ['blockdev-add', opts],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd0', 'file': 'f0'}],
            ['nbd-server-start', {'addr': {'type': 'unix', 'data': {'path': '{sock}'}}}],
            ['block-export-add', {'type': 'nbd', 'id': 'e0', 'node-name': 'd0',
                                  'writable': writable}],
        ]

    def qemu_img_against(self, qsd, writable, argv, node_opts=None):
        """Export the image from one daemon, then run @argv; returns its (status, stderr)."""
        with Daemon(qsd=qsd) as d:
            q = connect(d)
            subst = {'dir': self.dir, 'sock': d.path('nbd.sock')}
            for step in self.export_steps(writable, node_opts):
                q.execute(step[0], expand(step[1], subst))
            result = run(*argv)
            q.execute('block-export-del', id='e0')
            return result

    def test_writable_export_excludes_qemu_img(self):
        out = os.path.join(self.dir, 'copy')
        argv = ['qemu-img', 'convert', '-f', 'raw', '-O', 'raw', self.dir + '/img', out]
        want = self.qemu_img_against(True, True, argv)
        got = self.qemu_img_against(False, True, argv)
        self.assertEqual(got, want)
        self.assertNotEqual(got[0], 0)
        self.assertIn('Failed to get shared "write" lock', got[1])
        # A read-only export lets it copy.
        self.assertEqual(self.qemu_img_against(False, False, argv)[0], 0)
        # So does locking=off.
        self.assertEqual(self.qemu_img_against(False, True, argv, {'locking': 'off'}),
                         self.qemu_img_against(True, True, argv, {'locking': 'off'}))
        os.unlink(out)

    def test_export_excludes_resize(self):
        argv = ['qemu-img', 'resize', '-f', 'raw', self.dir + '/img', '2M']
        want = self.qemu_img_against(True, False, argv)
        got = self.qemu_img_against(False, False, argv)
        self.assertEqual(got, want)
        self.assertIn('Failed to get "resize" lock', got[1])
        self.assertEqual(os.path.getsize(self.dir + '/img'), 1 << 20)

    def test_qemu_holder_excludes_writable_export(self):
        holder = Holder(self.dir + '/img', self.dir)
        try:
            steps = self.export_steps(True) + [
                ['block-export-add', {'type': 'nbd', 'id': 'e1', 'node-name': 'd0',
                                      'name': 'ro'}],
                ['query-block-exports'],
            ]
            got = self.compare(steps)
            self.assertEqual(got[3]['error']['desc'], 'Failed to get "write" lock')
        finally:
            holder.stop()
        # Once it is gone, cbtd may write, and then excludes it in turn.
        with Daemon() as d:
            q = connect(d)
            subst = {'dir': self.dir, 'sock': d.path('nbd.sock')}
            for step in self.export_steps(True):
                q.execute(step[0], expand(step[1], subst))
            status, err = run('qemu-img', 'convert', '-f', 'raw', '-O', 'raw',
                              self.dir + '/img', self.dir + '/copy2')
            self.assertNotEqual(status, 0)
            self.assertIn('Failed to get shared "write" lock', err)

    def test_lock_bytes_match_qsd(self):
        """After every step, cbtd holds exactly the lock bytes qemu-storage-daemon holds."""
        img = os.path.join(self.dir, 'other')
        steps = [
            ['blockdev-add', {'driver': 'file', 'node-name': 'f0', 'filename': img}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd0', 'file': 'f0'}],
            ['nbd-server-start', {'addr': {'type': 'unix', 'data': {'path': '{sock}'}}}],
            ['block-export-add', {'type': 'nbd', 'id': 'e0', 'node-name': 'd0'}],
            ['block-export-add', {'type': 'nbd', 'id': 'e1', 'node-name': 'd0', 'name': 'w',
                                  'writable': True}],
            ['block-export-del', {'id': 'e1'}],
            ['block-export-del', {'id': 'e0'}],
            ['block-export-add', {'type': 'nbd', 'id': 'e2', 'node-name': 'f0',
                                  'writable': True}],
            ['block-export-del', {'id': 'e2'}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'd1', 'file': 'f0',
                              'offset': 4096}],
            ['block-export-add', {'type': 'nbd', 'id': 'e3', 'node-name': 'd1',
                                  'writable': True}],
            ['block-export-del', {'id': 'e3'}],
            ['blockdev-del', {'node-name': 'd1'}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'r0', 'read-only': True,
                              'force-share': True,
                              'file': {'driver': 'file', 'filename': img}}],
            ['block-export-add', {'type': 'nbd', 'id': 'e4', 'node-name': 'r0'}],
            ['block-export-del', {'id': 'e4'}],
            ['blockdev-add', {'driver': 'raw', 'node-name': 'n0', 'offset': 512,
                              'file': {'driver': 'file', 'filename': img, 'locking': 'off'}}],
            ['block-export-add', {'type': 'nbd', 'id': 'e5', 'node-name': 'n0',
                                  'writable': True}],
        ]
        seen = []
        for qsd in (True, False):
            with Daemon(qsd=qsd) as d:
                q = connect(d)
                subst = {'dir': self.dir, 'sock': d.path('nbd.sock')}
                held = []
                for step in steps:
                    q.execute(step[0], expand(step[1], subst))
                    held.append(lock_bytes(img))
                seen.append(held)
        for step, want, got in zip(steps, *seen):
            self.assertEqual(got, want, 'lock bytes after %s' % json.dumps(step))
        self.assertIn([100, 101, 203], seen[1])  # the writable export took write

    def test_two_daemons(self):
        """cbtd and qsd on one image: a writable export of one and a read-only export of the
        other coexist (exports share write), and qemu-img resize is refused, whichever daemon
        came first."""
        def session(first_qsd):
            with Daemon(qsd=first_qsd) as a, Daemon(qsd=not first_qsd) as b:
                qa, qb = connect(a), connect(b)
                replies = []
                for q, d, writable in ((qa, a, True), (qb, b, False)):
                    subst = {'dir': self.dir, 'sock': d.path('nbd.sock')}
                    for step in self.export_steps(writable):
                        replies.append(normalise(q.cmd(step[0], expand(step[1], subst))))
                replies.append(run('qemu-img', 'resize', '-f', 'raw', self.dir + '/img',
                                   '2M'))
                return replies
        self.assertEqual(session(False), session(True))


if __name__ == '__main__':
    cbttest.main()
