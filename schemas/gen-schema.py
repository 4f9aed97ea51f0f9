#!/usr/bin/env python3
"""Merge the schema files into the compiled-in schema, the RPC reference (Markdown) and the
C types, marshallers and event emitters (gen_c.py).

Usage: gen-schema.py OUTDIR SCHEMA.json...

Writes OUTDIR/schema-data.c, OUTDIR/rpc.md and the files gen_c.generate() names.

The check here is structural (every referenced type exists, no name twice, a union's
discriminator is a required enum member of its base and its branches are structs named by
values of that enum, an alternate has at most one branch per JSON type, no member twice); the
runtime validator in rpc/ trusts it.
"""
import json
import os
import sys

import gen_c
from gen_c import kind_of, member_type

BUILTINS = {'str', 'int', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32',
            'uint64', 'size', 'number', 'bool', 'null', 'any'}


def type_refs(t):
    if isinstance(t, list):
        if len(t) != 1:
            raise SystemExit('schema: array type must have one element: %r' % t)
        return type_refs(t[0])
    return [t]


def check(entities):
    names = {}
    for ent in entities:
        k = kind_of(ent)
        key = ('event:' if k == 'event' else 'command:' if k == 'command' else 'type:') + ent[k]
        if key in names:
            raise SystemExit('schema: %s defined twice' % key)
        names[key] = ent
    types = {n[5:] for n in names if n.startswith('type:')}

    def need(t, where):
        for ref in type_refs(t):
            if ref not in BUILTINS and ref not in types:
                raise SystemExit('schema: %s refers to unknown type %r' % (where, ref))

    def need_members(data, where):
        if isinstance(data, str):
            need(data, where)
            return
        for m, spec in data.items():
            need(member_type(spec), '%s.%s' % (where, m.lstrip('*')))

    for ent in entities:
        k = kind_of(ent)
        where = '%s %s' % (k, ent[k])
        if k in ('struct', 'command', 'event') and 'data' in ent:
            need_members(ent['data'], where)
        if k in ('struct', 'union') and 'base' in ent:
            need_members(ent['base'], where)
        if k == 'union':
            for case, t in ent['data'].items():
                need(t, '%s branch %s' % (where, case))
        if k == 'alternate':
            for case, t in ent['data'].items():
                need(t, '%s branch %s' % (where, case))
        if k == 'command' and 'returns' in ent:
            need(ent['returns'], where + ' returns')
    check_shapes(entities, {e[kind_of(e)]: e for e in entities
                            if kind_of(e) not in ('command', 'event')})


def json_kind(t, named):
    """The JSON type a value of schema type @t has (for alternate branches)."""
    if isinstance(t, list):
        return 'array'
    if t in BUILTINS:
        return {'str': 'string', 'bool': 'boolean', 'null': 'null', 'any': 'any'}.get(t, 'number')
    k = kind_of(named[t])
    return {'enum': 'string', 'struct': 'object', 'union': 'object'}.get(k, k)


def flat_members(data, named, where):
    """Member name -> (optional, type) of inline members or a named struct (with its bases)."""
    if isinstance(data, str):
        ent = named[data]
        if kind_of(ent) != 'struct':
            raise SystemExit('schema: %s: %s is not a struct' % (where, data))
        out = flat_members(ent['base'], named, where) if 'base' in ent else {}
        own = flat_members(ent.get('data', {}), named, where)
    else:
        out, own = {}, {m.lstrip('*'): (m.startswith('*'), member_type(spec))
                        for m, spec in data.items()}
        if len(own) != len(data):
            raise SystemExit('schema: %s: a member is listed twice' % where)
    for m in own:
        if m in out:
            raise SystemExit('schema: %s: member %s is also in the base' % (where, m))
    out.update(own)
    return out


def check_shapes(entities, named):
    for ent in entities:
        k = kind_of(ent)
        where = '%s %s' % (k, ent[k])
        if k == 'struct':
            flat_members(ent[k], named, where)
        elif k == 'union':
            base = flat_members(ent['base'], named, where)
            tag = base.get(ent.get('discriminator'))
            if not tag or tag[0] or isinstance(tag[1], list) or tag[1] in BUILTINS or \
                    kind_of(named[tag[1]]) != 'enum':
                raise SystemExit('schema: %s: discriminator must be a required enum member of '
                                 'the base' % where)
            values = named[tag[1]]['data']
            for case, t in ent['data'].items():
                if case not in values:
                    raise SystemExit('schema: %s: branch %s is not a value of %s'
                                     % (where, case, tag[1]))
                branch = flat_members(t, named, '%s branch %s' % (where, case))
                clash = set(branch) & set(base)
                if clash:
                    raise SystemExit('schema: %s branch %s repeats %s' % (where, case, clash))
        elif k == 'alternate':
            seen = {}
            for case, t in ent['data'].items():
                kind = json_kind(t, named)
                if kind in seen or kind == 'any':
                    raise SystemExit('schema: %s: branches %s and %s cannot be told apart'
                                     % (where, seen.get(kind, case), case))
                seen[kind] = case
        elif k in ('command', 'event') and isinstance(ent.get('data'), str):
            target = named[ent['data']]
            if kind_of(target) not in ('struct', 'union'):
                raise SystemExit('schema: %s: data must name a struct or union' % where)
            if kind_of(target) == 'union' and not ent.get('boxed') and k == 'command':
                raise SystemExit('schema: %s: a union as arguments needs "boxed": true' % where)
        elif k in ('command', 'event') and 'data' in ent:
            flat_members(ent['data'], named, where)


def fmt_type(t):
    if isinstance(t, list):
        return '[%s]' % fmt_type(t[0])
    return '`%s`' % t if t in BUILTINS else '[`%s`](#%s)' % (t, t.lower())


TYPES = {}


def fmt_members(data, docs):
    if isinstance(data, str):
        ent = TYPES.get(data)
        if ent and 'struct' in ent and isinstance(ent.get('data'), dict):
            inner = dict(ent.get('member-docs', {}))
            inner.update(docs)
            return ['Members of %s:' % fmt_type(data), ''] + fmt_members(ent['data'], inner)
        return ['All members of %s.' % fmt_type(data), '']
    if not data:
        return ['No members.', '']
    lines = ['| member | type | optional | description |', '|---|---|---|---|']
    for m, spec in data.items():
        name = m.lstrip('*')
        opt = m.startswith('*')
        desc = docs.get(name, '')
        if isinstance(spec, dict):
            desc = spec.get('doc', desc)
            if 'default' in spec:
                desc += ' (default: `%s`)' % json.dumps(spec['default'])
        lines.append('| `%s` | %s | %s | %s |' % (name, fmt_type(member_type(spec)),
                                                  'yes' if opt else 'no', desc))
    return lines + ['']


def markdown(entities):
    for ent in entities:
        k = kind_of(ent)
        if k not in ('command', 'event'):
            TYPES[ent[k]] = ent
    out = ['# cbtd RPC reference', '',
           'Generated from `schemas/*.json` by `schemas/gen-schema.py`; do not edit by hand '
           '(`make docs` regenerates it, and a test checks it is current).', '',
           'The wire protocol is QMP: see the user guide for framing, the greeting and '
           'capabilities negotiation.', '']
    sections = [('Commands', 'command'), ('Events', 'event'),
                ('Types', ('struct', 'union', 'alternate', 'enum'))]
    for title, kinds in sections:
        out += ['## ' + title, '']
        ents = [e for e in entities if kind_of(e) in
                (kinds if isinstance(kinds, tuple) else (kinds,))]
        for ent in sorted(ents, key=lambda e: e[kind_of(e)]):
            k = kind_of(ent)
            out += ['### %s' % ent[k], '']
            feats = ent.get('features', [])
            if feats:
                out += ['*Features: %s*' % ', '.join(feats), '']
            if ent.get('doc'):
                out += [ent['doc'], '']
            docs = ent.get('member-docs', {})
            if k == 'enum':
                out += ['Values: ' + ', '.join('`%s`' % v for v in ent['data']), '']
            elif k == 'alternate':
                out += ['One of: ' + ', '.join(fmt_type(t) for t in ent['data'].values()), '']
            elif k == 'union':
                out += ['Base:', ''] + fmt_members(ent['base'], docs)
                out += ['Discriminator `%s`; branches: ' % ent['discriminator'] +
                        ', '.join('`%s` → %s' % (c, fmt_type(t)) for c, t in ent['data'].items()),
                        '']
            elif k == 'command':
                if ent.get('boxed'):
                    out += ['Arguments (boxed): %s' % fmt_type(ent['data']), '']
                else:
                    out += ['Arguments:', ''] + fmt_members(ent.get('data', {}), docs)
                out += ['Returns: %s' % (fmt_type(ent['returns']) if 'returns' in ent
                                         else '`{}`'), '']
            else:
                if 'base' in ent:
                    out += ['Base: %s' % fmt_type(ent['base']), '']
                out += fmt_members(ent.get('data', {}), docs)
    return '\n'.join(out).rstrip() + '\n'


def c_source(doc):
    text = json.dumps(doc, separators=(',', ':'), sort_keys=False)
    chunks = [text[i:i + 100] for i in range(0, len(text), 100)]
    body = '\n'.join('  "%s"' % c.replace('\\', '\\\\').replace('"', '\\"') for c in chunks)
    return ('/* Generated by schemas/gen-schema.py: do not edit. */\n'
            '#include "rpc/schema-data.h"\n\n'
            'const char cbt_schema_json[] =\n%s;\n' % body)


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    outdir, files = sys.argv[1], sys.argv[2:]
    entities, groups = [], []
    for f in files:
        with open(f, encoding='utf-8') as fh:
            try:
                part = json.load(fh)
            except json.JSONDecodeError as e:
                raise SystemExit('%s: %s' % (f, e))
        if not isinstance(part, list):
            raise SystemExit('%s: top level must be an array' % f)
        entities += part
        group = os.path.splitext(os.path.basename(f))[0].replace('-', '_')
        groups.append((group, [e for e in part if 'command' in e]))
    check(entities)
    outputs = {'schema-data.c': c_source(entities), 'rpc.md': markdown(entities)}
    outputs.update(gen_c.generate(entities, groups))
    for name, text in outputs.items():
        with open(os.path.join(outdir, name), 'w', encoding='utf-8') as fh:
            fh.write(text)


if __name__ == '__main__':
    main()
