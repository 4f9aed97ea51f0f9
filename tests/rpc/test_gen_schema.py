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
        for f in ('control', 'block-core', 'block-export', 'dirty-bitmap', 'qom', 'job')]

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
    ('clashes with a type', [{'struct': 'CArg', 'data': {}}, {'command': 'c', 'data': {}}]),
    ('clashes with', [{'struct': 'Foo', 'data': {}}, {'command': 'foo-free'}]),
    ('not supported', [{'struct': 'S', 'data': {'*l': {'type': ['str'], 'default': []}}}]),
]


def read(path):
    with open(path, encoding='utf-8') as fh:
        return fh.read()


def run(files, outdir=None):
    with tempfile.TemporaryDirectory() as d:
        return subprocess.run([sys.executable, GEN, outdir or d] + files,
                              capture_output=True, text=True)


class GenSchemaTest(unittest.TestCase):
    def test_real_schema(self):
        r = run(REAL)
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_c_output(self):
        """The C a small schema becomes: names, has_ flags, defaults, mangled C keywords, one
        marshaller per command of its own file and none for builtins, typed emitters."""
        ents = [ENUM, {'struct': 'S', 'data': {'x': 'str', '*n': 'uint32', '*unix': 'bool',
                                             '*e': {'type': 'E', 'default': 'b'},
                                             '*s': 'S'}},
                {'command': 'do-it', 'data': 'S', 'returns': ['S']},
                {'command': 'query-x', 'builtin': True},
                {'event': 'SOMETHING_HAPPENED', 'data': {'id': 'str', '*n': 'int'}}]
        with tempfile.TemporaryDirectory() as d, \
                tempfile.NamedTemporaryFile('w', suffix='.json', dir=d) as f:
            json.dump(ents, f)
            f.flush()
            r = run([f.name], d)
            self.assertEqual(r.returncode, 0, r.stderr)
            group = os.path.splitext(os.path.basename(f.name))[0]
            types_h = read(os.path.join(d, 'qmp-types.h'))
            types_c = read(os.path.join(d, 'qmp-types.c'))
            cmds_h = read(os.path.join(d, 'qmp-commands.h'))
            cmds_c = read(os.path.join(d, 'qmp-commands-%s.c' % group.replace('_', '-')))
            events_h = read(os.path.join(d, 'qmp-events.h'))
        self.assertIn('  CBT_QMP_E_A,\n  CBT_QMP_E_B,\n  CBT_QMP_E__MAX,\n} CbtQmpE;', types_h)
        self.assertIn('struct CbtQmpS {\n  char *x;\n  gboolean has_n;\n  guint32 n;\n'
                      '  gboolean has_q_unix;\n  gboolean q_unix;\n  gboolean has_e;\n'
                      '  CbtQmpE e;\n  CbtQmpS *s;\n};', types_h)
        self.assertIn('typedef GPtrArray CbtQmpSList;', types_h)
        self.assertIn('p->e = CBT_QMP_E_B;', types_c)
        self.assertIn('CbtQmpSList *cbt_qmp_do_it(const CbtQmpS *args, GError **error);', cmds_h)
        self.assertNotIn('query_x', cmds_h + cmds_c)
        self.assertIn('{ "do-it", marshal_do_it },', cmds_c)
        self.assertIn('void cbt_qmp_event_something_happened(const char *id, gboolean has_n, '
                      'gint64 n);', events_h)

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
