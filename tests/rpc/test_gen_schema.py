#!/usr/bin/python3
"""schemas/gen-schema.py refuses structurally broken schemas (the runtime loader in rpc/
trusts it) and accepts the real one."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

SRC = os.environ.get('CBT_SRCDIR', os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                '..', '..'))
GEN = os.path.join(SRC, 'schemas', 'gen-schema.py')
REAL = [os.path.join(SRC, 'schemas', f + '.json')
        for f in ('control', 'block-core', 'block-export', 'dirty-bitmap')]

ENUM = {'enum': 'E', 'data': ['a', 'b']}
BASE = {'struct': 'B', 'data': {'t': 'E'}}
S = {'struct': 'S', 'data': {'x': 'str'}}

BAD = [
    ('unknown type', [{'struct': 'X', 'data': {'m': 'Nope'}}]),
    ('defined twice', [S, S]),
    ('is not a value', [ENUM, BASE, S,
                        {'union': 'U', 'base': 'B', 'discriminator': 't', 'data': {'c': 'S'}}]),
    ('discriminator must be', [ENUM, {'struct': 'B', 'data': {'*t': 'E'}}, S,
                               {'union': 'U', 'base': 'B', 'discriminator': 't',
                                'data': {'a': 'S'}}]),
    ('discriminator must be', [ENUM, {'struct': 'B', 'data': {'t': 'str'}}, S,
                               {'union': 'U', 'base': 'B', 'discriminator': 't',
                                'data': {'a': 'S'}}]),
    ('is not a struct', [ENUM, BASE, {'union': 'U', 'base': 'B', 'discriminator': 't',
                                      'data': {'a': 'E'}}]),
    ('repeats', [ENUM, BASE, {'struct': 'S', 'data': {'t': 'int'}},
                 {'union': 'U', 'base': 'B', 'discriminator': 't', 'data': {'a': 'S'}}]),
    ('cannot be told apart', [ENUM, {'alternate': 'A', 'data': {'x': 'str', 'y': 'E'}}]),
    ('cannot be told apart', [{'alternate': 'A', 'data': {'x': 'int', 'y': 'number'}}]),
    ('listed twice', [{'struct': 'S', 'data': {'x': 'str', '*x': 'int'}}]),
    ('also in the base', [S, {'struct': 'T', 'base': 'S', 'data': {'x': 'int'}}]),
    ('needs "boxed"', [ENUM, BASE, {'union': 'U', 'base': 'B', 'discriminator': 't',
                                    'data': {}}, {'command': 'c', 'data': 'U'}]),
    ('must name a struct', [ENUM, {'command': 'c', 'data': 'E'}]),
]


def run(files):
    with tempfile.TemporaryDirectory() as d:
        return subprocess.run([sys.executable, GEN, os.path.join(d, 'o.c'),
                               os.path.join(d, 'o.md')] + files,
                              capture_output=True, text=True)


class GenSchemaTest(unittest.TestCase):
    def test_real_schema(self):
        r = run(REAL)
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_bad_schemas(self):
        for want, ents in BAD:
            with self.subTest(want=want), tempfile.NamedTemporaryFile('w', suffix='.json') as f:
                json.dump(ents, f)
                f.flush()
                r = run([f.name])
                self.assertNotEqual(r.returncode, 0)
                self.assertIn(want, r.stderr)


if __name__ == '__main__':
    unittest.main(verbosity=2)
