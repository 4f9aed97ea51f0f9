"""Replay one management-layer QMP session against qemu-storage-daemon 7.2 and cbtd and compare
every reply as a JSON value. Differences allowed, each for a stated reason:
- version numbers and package strings (different programs);
- temporary paths (each daemon gets its own directory; replaced by $DIR);
- query-qmp-schema and query-commands contents (cbtd implements a subset of qsd's commands:
  both are checked for shape and for the commands cbtd claims, not for equality);
- image actual-size (allocation of two different files may differ in filesystem detail).
"""
import os
import unittest

from cbttest import Daemon, make_image

# (raw request text, note). Raw text so malformed input is replayed byte for byte.
SESSION = [
    # Before negotiation.
    '{"execute": "query-version", "id": 1}',
    '{"execute": "frobnicate"}',
    '{"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}}',
    '{"execute": "qmp_capabilities", "id": "neg"}',
    '{"execute": "qmp_capabilities"}',
    # Wire errors.
    '{"arguments": {}}',
    '{"execute": 1}',
    '{"execute": "query-version", "arguments": []}',
    '{"execute": "query-version", "foo": 1}',
    '[1, 2]',
    '"hello"',
    '{"execute": }',
    '{"execute": "frobnicate", "id": {"a": [1, null, true]}}',
    '{"execute": "query-version", "exec-oob": "query-version"}',
    '{"exec-oob": "query-version"}',
    # Blockdev.
    '{"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "$DIR/a.img"}}',
    '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "1abc", '
    '"filename": "$DIR/a.img"}}',
    '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f0", '
    '"filename": "$DIR/nope.img"}}',
    '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f0", '
    '"filename": "$DIR/a.img", "bogus": 1}}',
    '{"execute": "blockdev-add", "arguments": {"driver": "frob", "node-name": "f0"}}',
    '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f0"}}',
    '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f0", '
    '"filename": "$DIR/a.img", "read-only": "yes"}}',
    '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f0", '
    '"filename": "$DIR/a.img"}}',
    '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f0", '
    '"filename": "$DIR/a.img"}}',
    '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "d0", '
    '"file": "f0"}}',
    '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "d1", '
    '"file": "nosuch"}}',
    '{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n0", '
    '"size": 1048576}}',
    '{"execute": "query-named-block-nodes", "arguments": {"flat": true}}',
    '{"execute": "blockdev-del", "arguments": {"node-name": "f0"}}',
    '{"execute": "blockdev-del", "arguments": {"node-name": "zzz"}}',
    # NBD server and exports.
    '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", '
    '"node-name": "d0"}}',
    '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", '
    '"data": {"path": "$DIR/nbd.sock"}}}}',
    '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", '
    '"data": {"path": "$DIR/nbd2.sock"}}}}',
    '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", '
    '"node-name": "nope"}}',
    '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", '
    '"node-name": "d0", "writable": true}}',
    '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", '
    '"node-name": "n0"}}',
    '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e1", '
    '"node-name": "n0", "name": "d0"}}',
    '{"execute": "query-block-exports"}',
    '{"execute": "blockdev-del", "arguments": {"node-name": "d0"}}',
    '{"execute": "block-export-del", "arguments": {"id": "nope"}}',
    '{"execute": "block-export-del", "arguments": {"id": "e0"}}',
    '{"execute": "query-block-exports"}',
    '{"execute": "nbd-server-stop"}',
    '{"execute": "nbd-server-stop"}',
    '{"execute": "blockdev-del", "arguments": {"node-name": "d0"}}',
    '{"execute": "blockdev-del", "arguments": {"node-name": "f0"}}',
    '{"execute": "query-named-block-nodes"}',
]


def normalise(value, d):
    """Replace the daemon's directory by $DIR and drop fields that legitimately differ."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in ('actual-size',):  # filesystem allocation detail
                continue
            out[k] = normalise(v, d)
        return out
    if isinstance(value, list):
        return [normalise(v, d) for v in value]
    if isinstance(value, str):
        return value.replace(d, '$DIR')
    return value


class SessionVsQsd(unittest.TestCase):

    def replay(self, daemon):
        os.makedirs(daemon.dir, exist_ok=True)
        make_image(daemon.path('a.img'), 1 << 20, [(65536, b'x' * 4096)])
        q = daemon.qmp(negotiate=False)
        replies = [normalise(q.greeting, daemon.dir)]
        for text in SESSION:
            q.send_raw(text.replace('$DIR', daemon.dir) + '\n')
            msg = q.recv_reply()
            replies.append(normalise(msg, daemon.dir))
        events = [normalise(e, daemon.dir) for e in q.events]
        return replies, events

    def test_session(self):
        with Daemon(qsd=True) as qsd, Daemon() as cbtd:
            want, want_events = self.replay(qsd)
            got, got_events = self.replay(cbtd)
            self.assertTrue(cbtd.alive())
        # Greeting: same shape, different versions.
        self.assertEqual(set(got[0]['QMP']), set(want[0]['QMP']))
        self.assertEqual(got[0]['QMP']['capabilities'], want[0]['QMP']['capabilities'])
        self.assertEqual(set(got[0]['QMP']['version']['qemu']), {'major', 'minor', 'micro'})
        for i, text in enumerate(SESSION, start=1):
            self.assertEqual(got[i], want[i], 'reply to %s' % text)
        strip = lambda evs: [{k: v for k, v in e.items() if k != 'timestamp'} for e in evs]
        self.assertEqual(strip(got_events), strip(want_events))


if __name__ == '__main__':
    unittest.main(verbosity=2)
