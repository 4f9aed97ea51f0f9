#!/usr/bin/python3
"""The complete examples in README.md and docs/ run as written.

A complete example is a ```sh block whose first line sets D= (its scratch directory) and
that cleans up after itself; it refers to the programs as build/daemon/cbtd and
build/tools/cbtctl, so it runs in a directory where build/ is this build.  Other blocks are
fragments (a command line to adapt, a transcript) and are not run.
"""

import os
import re
import subprocess
import tempfile
import time
import unittest

SRCDIR = os.environ['CBT_SRCDIR']
BUILD = os.path.dirname(os.path.dirname(os.path.abspath(os.environ['CBTD'])))
BLOCK = re.compile(r'^```sh\n(.*?)^```', re.S | re.M)


def examples():
    docs = os.path.join(SRCDIR, 'docs')
    files = [os.path.join(SRCDIR, 'README.md')]
    files += [os.path.join(docs, n) for n in sorted(os.listdir(docs)) if n.endswith('.md')]
    for path in files:
        name = os.path.relpath(path, SRCDIR)
        with open(path) as f:
            text = f.read()
        for m in BLOCK.finditer(text):
            if m.group(1).startswith('D='):
                line = text.count('\n', 0, m.start()) + 1
                yield '%s:%d' % (name, line), m.group(1)


class DocExamples(unittest.TestCase):
    def test_examples_run(self):
        found = list(examples())
        # README.md: cbt-backup; user-guide.md: three fleecing ways and TLS; backup-vendors.md:
        # a busy disk's backups, cbt-backup on cbtd and on qemu-storage-daemon.
        self.assertGreaterEqual(len(found), 8)
        for where, script in found:
            with self.subTest(where), tempfile.TemporaryDirectory() as cwd:
                self.run_example(where, script, cwd)

    def run_example(self, where, script, cwd):
        """Runs @script in @cwd with its mktemp -d inside cwd/tmp, so that whatever it
        leaves behind (a file, a daemon still running) is found and fails the test."""
        tmp = os.path.join(cwd, 'tmp')
        os.mkdir(tmp)
        os.symlink(BUILD, os.path.join(cwd, 'build'))
        try:
            # The examples are for a Debian machine: nbdsh runs the python3 found first on
            # PATH, which must be Debian's (its nbd module), whatever the test runner's is.
            env = dict(os.environ, TMPDIR=tmp, PATH='/usr/bin:' + os.environ['PATH'])
            r = subprocess.run(['bash', '-e', '-o', 'pipefail', '-c', script], cwd=cwd,
                               env=env, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=120)
            self.assertEqual(r.returncode, 0, '%s\n%s%s' % (where, r.stdout, r.stderr))
            self.assertTrue(self.gone(tmp), '%s left a process running' % where)
            self.assertEqual(os.listdir(tmp), [], where)
        finally:
            subprocess.run(['pkill', '-KILL', '-f', tmp + '/'])

    @staticmethod
    def gone(tmp, seconds=5):
        """Whether every process naming @tmp in its command line exits within @seconds
        (a daemon told to quit finishes its exit after the reply)."""
        deadline = time.monotonic() + seconds
        while subprocess.run(['pgrep', '-f', tmp + '/'], capture_output=True).returncode == 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

if __name__ == '__main__':
    unittest.main(verbosity=2)
