"""NBD over TLS: cbtd with nbdinfo, nbdcopy, qemu-img and a raw client, x509 (with and without
client certificates), PSK and tls-authz, side by side with qemu-storage-daemon 7.2 given the
same options. Where cbtd is deliberately stricter (docs/user-guide.md, "TLS") the difference
is asserted.

Run with /usr/bin/python3; CBTD names the daemon binary.
"""
import base64
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import time
import unittest

import cbttest
import tlscerts
from nbdtest import Daemon, RawClient, random_image, run, sha256_file, wait_for

MiB = 1 << 20
OPT_LIST, OPT_STARTTLS, OPT_STRUCTURED_REPLY, OPT_GO = 3, 5, 8, 7
REP_ACK, REP_SERVER = 1, 2
REP_ERR_INVALID, REP_ERR_TLS_REQD = 0x80000003, 0x80000005


def free_port(family=socket.AF_INET, host='127.0.0.1'):
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Base(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.certs_dir = tempfile.mkdtemp(prefix='cbt-tls-certs-')
        cls.x509 = tlscerts.make_x509(cls.certs_dir)
        cls.psk_dir = os.path.join(cls.certs_dir, 'psk')
        cls.psk_file = tlscerts.make_psk(cls.psk_dir, ('alice', 'bob'))
        cls.bad_psk = tlscerts.make_psk(os.path.join(cls.certs_dir, 'badpsk'), ('alice',))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.certs_dir, ignore_errors=True)

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='cbt-nbd-tls-')
        self.daemons = []
        self.img = random_image(os.path.join(self.dir, 'a.img'), 4 * MiB)

    def tearDown(self):
        for d in self.daemons:
            self.assertTrue(d.alive(), 'daemon died')
            d.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def start(self, qsd, objects, server, addr=None):
        """A daemon with --object @objects, the image as node f0 exported as e0 on @addr
        (default: a unix socket), and @server appended to --nbd-server. Returns (daemon, sock
        or (host, port))."""
        kind = 'qsd' if qsd else 'cbtd'
        args = []
        for o in objects:
            args += ['--object', o]
        args += ['--blockdev', 'driver=file,node-name=f0,filename=%s,read-only=on' % self.img]
        if addr is None:
            addr = os.path.join(self.dir, '%s-%d.sock' % (kind, len(self.daemons)))
            spec = 'addr.type=unix,addr.path=' + addr
        else:
            spec = 'addr.type=inet,addr.host=%s,addr.port=%d' % addr
        args += ['--nbd-server', spec + server, '--export', 'type=nbd,id=e0,node-name=f0,name=e0']
        d = Daemon(extra=args, qsd=qsd, tmpdir=self.dir)
        self.daemons.append(d)
        if isinstance(addr, str):
            wait_for(lambda: os.path.exists(addr), what='NBD socket')
        return d, addr

    def x509_obj(self, name='server', verify='off'):
        return 'tls-creds-x509,id=t0,dir=%s,endpoint=server,verify-peer=%s' % (
            self.x509[name], verify)

    def psk_obj(self):
        return 'tls-creds-psk,id=t0,dir=%s,endpoint=server' % self.psk_dir

    def nbdinfo(self, url):
        return run(['nbdinfo', '--size', url], check=False, timeout=30)

    def unix_url(self, sock, certs, user=None):
        q = ('tls-psk-file=%s' % certs) if user else ('tls-certificates=%s' % certs)
        return 'nbds+unix://%s/e0?socket=%s&%s' % ((user + '@') if user else '', sock, q)

    def qemu_img(self, sock, certs):
        return run(['qemu-img', 'info', '--output=json', '--object',
                    'tls-creds-x509,id=c,dir=%s,endpoint=client' % certs, '--image-opts',
                    'driver=nbd,server.type=unix,server.path=%s,export=e0,tls-creds=c,'
                    'tls-hostname=localhost' % sock], check=False, timeout=30)

    def both(self, fn):
        """Run @fn(qsd) for cbtd and for qsd; return (cbtd result, qsd result)."""
        return fn(False), fn(True)


class TestX509(Base):
    def test_nbdinfo_and_nbdcopy_over_unix(self):
        for qsd in (False, True):
            _, sock = self.start(qsd, [self.x509_obj()], ',tls-creds=t0')
            p = self.nbdinfo(self.unix_url(sock, self.x509['server']))
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertEqual(p.stdout.strip(), str(4 * MiB))
            out = os.path.join(self.dir, 'copy-%d.img' % qsd)
            run(['nbdcopy', self.unix_url(sock, self.x509['server']), out])
            self.assertEqual(sha256_file(out), sha256_file(self.img))

    def test_plaintext_refused_with_tls_reqd(self):
        for qsd in (False, True):
            d, sock = self.start(qsd, [self.x509_obj()], ',tls-creds=t0')
            c = RawClient(sock)
            for opt in (OPT_LIST, OPT_STRUCTURED_REPLY, OPT_GO):
                payload = struct.pack('>I', 2) + b'e0' + struct.pack('>H', 0) if opt == OPT_GO \
                    else b''
                c.option(opt, payload)
                _, rtype, _ = c.reply()
                self.assertEqual(rtype, REP_ERR_TLS_REQD, (qsd, opt))
            c.close()
            p = self.nbdinfo('nbd+unix:///e0?socket=' + sock)
            self.assertNotEqual(p.returncode, 0)
            self.assertTrue(d.alive())

    def tls_raw(self, sock):
        c = RawClient(sock)
        c.option(OPT_STARTTLS)
        self.assertEqual(c.reply()[1], REP_ACK)
        ctx = ssl.create_default_context(cafile=os.path.join(self.x509['server'], 'ca-cert.pem'))
        c.s = ctx.wrap_socket(c.s, server_hostname='localhost')
        return c

    def test_broken_handshakes_drop_that_client_only(self):
        """After STARTTLS's ack: bytes that are not TLS, a ClientHello cut short, a client
        that vanishes, one that never speaks. Each is dropped; the next client reads."""
        hello_start = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03])
        d, sock = self.start(False, [self.x509_obj()], ',tls-creds=t0')
        for junk in (b'GET / HTTP/1.0\r\n\r\n' * 8, hello_start, b''):
            c = RawClient(sock)
            c.option(OPT_STARTTLS)
            self.assertEqual(c.reply()[1], REP_ACK)
            c.s.sendall(junk)
            c.close()
        idle = RawClient(sock)
        idle.option(OPT_STARTTLS)
        self.assertEqual(idle.reply()[1], REP_ACK)
        p = self.nbdinfo(self.unix_url(sock, self.x509['server']))
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout.strip(), str(4 * MiB))
        idle.close()
        self.assertTrue(d.alive())

    def test_record_arriving_in_pieces(self):
        """A TLS record that arrives in two pieces, a second apart: the daemon waits for the
        rest without spinning (its CPU time stays far below the wait) and then answers it;
        records that arrive together are all answered."""
        d, sock = self.start(False, [self.x509_obj()], ',tls-creds=t0')
        c = RawClient(sock)
        c.option(OPT_STARTTLS)
        self.assertEqual(c.reply()[1], REP_ACK)
        ctx = ssl.create_default_context(cafile=os.path.join(self.x509['server'], 'ca-cert.pem'))
        rd, wr = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(rd, wr, server_hostname='localhost')
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                c.s.sendall(wr.read())
                rd.write(c.s.recv(65536))
        c.s.sendall(wr.read())

        def option_records(n):
            for _ in range(n):
                tls.write(struct.pack('>QII', 0x49484156454F5054, OPT_LIST, 0))
            return wr.read()

        def replies(n):
            got = b''
            while got.count(b'e0') < n:  # each LIST reply names export e0
                try:
                    got += tls.read(65536)
                except ssl.SSLWantReadError:
                    rd.write(c.s.recv(65536))
            return got

        record = option_records(1)
        cpu0 = cbttest.cpu_seconds(d.proc.pid)
        c.s.sendall(record[:len(record) // 2])
        time.sleep(1)
        self.assertLess(cbttest.cpu_seconds(d.proc.pid) - cpu0, 0.3)  # waited, did not spin
        c.s.sendall(record[len(record) // 2:])
        replies(1)
        c.s.sendall(option_records(5))  # five records in one send: all read, none left behind
        replies(5)
        c.close()
        self.assertTrue(d.alive())

    def test_second_starttls_refused(self):
        for qsd in (False, True):
            _, sock = self.start(qsd, [self.x509_obj()], ',tls-creds=t0')
            c = self.tls_raw(sock)
            c.option(OPT_STARTTLS)
            self.assertEqual(c.reply()[1], REP_ERR_INVALID, qsd)
            c.option(OPT_LIST)
            names = []
            while True:
                _, rtype, data = c.reply()
                if rtype == REP_ACK:
                    break
                self.assertEqual(rtype, REP_SERVER)
                names.append(data[4:].decode())
            self.assertEqual(names, ['e0'])
            c.close()

    def test_tcp_checks_the_server_certificate(self):
        # ::1 is left out: libnbd sends the SNI name "[::1]", which gnutls refuses as a
        # server name in cbtd and qsd alike ("A disallowed SNI server name");
        # test_ipv6_with_qemu_img covers ::1.
        for family, host in ((socket.AF_INET, '127.0.0.1'),):
            for qsd in (False, True):
                port = free_port(family, host)
                d, _ = self.start(qsd, [self.x509_obj()], ',tls-creds=t0', addr=(host, port))
                h = '[%s]' % host if ':' in host else host
                ok = self.nbdinfo('nbds://%s:%d/e0?tls-certificates=%s' % (h, port,
                                                                           self.x509['server']))
                self.assertEqual(ok.returncode, 0, (qsd, host, ok.stderr))
                # A client trusting another CA refuses this server.
                bad = self.nbdinfo('nbds://%s:%d/e0?tls-certificates=%s' % (h, port,
                                                                            self.x509['other']))
                self.assertNotEqual(bad.returncode, 0)
                self.assertTrue(d.alive())
                d.stop()
                self.daemons.remove(d)

    def test_ipv6_with_qemu_img(self):
        """::1 over TLS, with a client that names the server by host name (qemu-img's
        tls-hostname), on both daemons."""
        for qsd in (False, True):
            port = free_port(socket.AF_INET6, '::1')
            d, _ = self.start(qsd, [self.x509_obj()], ',tls-creds=t0', addr=('::1', port))
            out = []
            for certs in (self.x509['server'], self.x509['other']):
                p = run(['qemu-img', 'info', '--output=json', '--object',
                         'tls-creds-x509,id=c,dir=%s,endpoint=client' % certs, '--image-opts',
                         'driver=nbd,server.type=inet,server.host=::1,server.port=%d,'
                         'export=e0,tls-creds=c,tls-hostname=localhost' % port],
                        check=False, timeout=30)
                out.append(p)
            self.assertEqual(out[0].returncode, 0, (qsd, out[0].stderr))
            self.assertEqual(json.loads(out[0].stdout)['virtual-size'], 4 * MiB)
            self.assertNotEqual(out[1].returncode, 0, qsd)  # another CA: refused
            self.assertTrue(d.alive())
            d.stop()
            self.daemons.remove(d)

    def test_verify_peer_needs_a_client_certificate_from_the_ca(self):
        for qsd in (False, True):
            d, sock = self.start(qsd, [self.x509_obj(verify='on')], ',tls-creds=t0')
            ok = self.qemu_img(sock, self.x509['client'])
            self.assertEqual(ok.returncode, 0, (qsd, ok.stderr))
            # no client certificate
            self.assertNotEqual(self.qemu_img(sock, self.x509['server']).returncode, 0)
            # a certificate of another CA (the client trusts the server's CA)
            mixed = os.path.join(self.dir, 'mixed-%d' % qsd)
            os.makedirs(mixed)
            shutil.copy(os.path.join(self.x509['server'], 'ca-cert.pem'), mixed)
            for f in ('client-cert.pem', 'client-key.pem'):
                shutil.copy(os.path.join(self.x509['other'], f), mixed)
            self.assertNotEqual(self.qemu_img(sock, mixed).returncode, 0)
            self.assertTrue(d.alive())
            self.assertEqual(self.qemu_img(sock, self.x509['client']).returncode, 0)

    def test_authz_of_the_client_dn(self):
        for qsd in (False, True):
            for identity, allowed in ((tlscerts.CLIENT_DN, True), ('CN=nobody', False)):
                d, sock = self.start(qsd, [self.x509_obj(verify='on'),
                                           'authz-simple,id=a0,identity=' + identity.replace(',', ',,')],
                                     ',tls-creds=t0,tls-authz=a0')
                p = self.qemu_img(sock, self.x509['client'])
                self.assertEqual(p.returncode == 0, allowed, (qsd, identity, p.stderr))
                self.assertTrue(d.alive())

    def test_authz_list_glob(self):
        for qsd in (False, True):
            rules = ('authz-list,id=a0,policy=deny,rules.0.match=*CN=client,'
                     'rules.0.policy=allow,rules.0.format=glob')
            d, sock = self.start(qsd, [self.x509_obj(verify='on'), rules],
                                 ',tls-creds=t0,tls-authz=a0')
            p = self.qemu_img(sock, self.x509['client'])
            self.assertEqual(p.returncode, 0, (qsd, p.stderr))


class TestPsk(Base):
    def test_psk_user_and_wrong_key(self):
        for qsd in (False, True):
            d, sock = self.start(qsd, [self.psk_obj()], ',tls-creds=t0')
            ok = self.nbdinfo(self.unix_url(sock, self.psk_file, 'alice'))
            self.assertEqual(ok.returncode, 0, (qsd, ok.stderr))
            self.assertEqual(ok.stdout.strip(), str(4 * MiB))
            bad = self.nbdinfo(self.unix_url(sock, self.bad_psk, 'alice'))
            self.assertNotEqual(bad.returncode, 0)
            self.assertTrue(d.alive())

    def test_psk_authz_enforced_by_cbtd_only(self):
        results = {}
        for qsd in (False, True):
            _, sock = self.start(qsd, [self.psk_obj(), 'authz-simple,id=a0,identity=bob'],
                                 ',tls-creds=t0,tls-authz=a0')
            alice = self.nbdinfo(self.unix_url(sock, self.psk_file, 'alice')).returncode == 0
            bob = self.nbdinfo(self.unix_url(sock, self.psk_file, 'bob')).returncode == 0
            results[qsd] = (alice, bob)
        self.assertEqual(results[False], (False, True))   # cbtd: only bob
        self.assertEqual(results[True], (True, True))     # qsd 7.2 ignores tls-authz for PSK


class TestQmp(Base):
    def start_start(self, qsd, objects, **args):
        d = Daemon(extra=sum((['--object', o] for o in objects), []), qsd=qsd, tmpdir=self.dir)
        self.daemons.append(d)
        q = d.qmp()
        a = {'addr': {'type': 'unix',
                      'data': {'path': os.path.join(self.dir, 'q%d.sock' % len(self.daemons))}}}
        a.update(args)
        r = q.cmd('nbd-server-start', a)
        return q, r

    def test_same_errors_as_qsd(self):
        for args in ({'tls-creds': 'nope'}, {'tls-creds': 'a0'}, {'tls-creds': 'c0'}):
            replies = []
            for qsd in (False, True):
                _, r = self.start_start(qsd, ['authz-simple,id=a0,identity=x',
                                              'tls-creds-x509,id=c0,dir=%s,endpoint=client'
                                              % self.x509['client']], **args)
                replies.append(r)
            self.assertEqual(replies[0], replies[1], args)
            self.assertIn('error', replies[0])

    def test_stricter_than_qsd(self):
        cases = [({'tls-authz': 'a0'}, 'tls-authz is not supported without tls-creds'),
                 ({'tls-creds': 't0', 'tls-authz': 'a0'}, 'tls-authz needs TLS credentials'),
                 ({'tls-creds': 't1', 'tls-authz': 'zz'}, "No authorization object with id 'zz'")]
        for args, text in cases:
            objs = ['authz-simple,id=a0,identity=x', self.x509_obj(),
                    self.x509_obj(verify='on').replace('id=t0', 'id=t1')]
            _, mine = self.start_start(False, objs, **args)
            _, ref = self.start_start(True, objs, **args)
            self.assertEqual(ref, {'return': {}}, args)
            self.assertIn(text, mine['error']['desc'])

    def test_object_in_use_not_deleted(self):
        q, r = self.start_start(False, [self.x509_obj(), 'authz-simple,id=a0,identity=x'],
                                **{'tls-creds': 't0'})
        self.assertEqual(r, {'return': {}})
        for oid in ('t0',):
            self.assertEqual(q.error('object-del', id=oid),
                             ('GenericError', "object 't0' is in use, can not be deleted"))
        q.execute('object-del', id='a0')
        q.execute('nbd-server-stop')
        q.execute('object-del', id='t0')
        self.assertEqual(q.error('object-del', id='t0'),
                         ('GenericError', "object 't0' not found"))


class TestObjectsBesideQsd(Base):
    """object-add and object-del over QMP: the same replies as qsd, error texts included."""

    def replies(self, qsd, calls):
        d = Daemon(qsd=qsd, tmpdir=self.dir)
        self.daemons.append(d)
        q = d.qmp()
        return [q.cmd(name, args) for name, args in calls]

    def test_same_replies(self):
        x509 = {'qom-type': 'tls-creds-x509', 'id': 't0', 'dir': self.x509['server'],
                'endpoint': 'server'}
        calls = [
            ('object-add', x509),
            ('object-add', x509),                                   # duplicate id
            ('object-add', dict(x509, id='t1', dir=self.dir + '/nope')),
            ('object-add', {'qom-type': 'frob', 'id': 'f'}),
            ('object-add', {'qom-type': 'authz-simple', 'id': 'a0'}),  # no identity
            ('object-add', {'qom-type': 'authz-simple', 'id': 'a1', 'identity': 'CN=x'}),
            ('object-add', {'qom-type': 'authz-list', 'id': 'l0', 'policy': 'maybe'}),
            ('object-add', {'qom-type': 'authz-list', 'id': 'l1', 'policy': 'deny',
                            'rules': [{'match': 'CN=*', 'policy': 'allow',
                                       'format': 'glob'}]}),
            ('object-add', {'qom-type': 'secret', 'id': 's0', 'data': 'pw'}),
            ('object-add', {'qom-type': 'secret', 'id': 's1'}),
            ('object-del', {'id': 'a1'}),
            ('object-del', {'id': 'a1'}),                           # gone
            ('object-del', {'id': 'nope'}),
        ]
        mine, ref = self.replies(False, calls), self.replies(True, calls)
        for call, a, b in zip(calls, mine, ref):
            self.assertEqual(a, b, call)
        self.assertIn('error', mine[1])
        self.assertEqual(mine[0], {'return': {}})

    def test_encrypted_secrets(self):
        """secret with keyid and iv: AES-256-CBC as QEMU decrypts it, with its texts."""
        key, iv = os.urandom(32), os.urandom(16)
        ct = encrypt(key, iv, b'a pass phrase')
        bad_pad = encrypt(key, iv, b'x' * 15 + b'\x20', pad=False)
        b64 = lambda b: base64.b64encode(b).decode()
        enc = {'qom-type': 'secret', 'format': 'base64', 'keyid': 'k0', 'iv': b64(iv)}
        calls = [
            ('object-add', {'qom-type': 'secret', 'id': 'k0', 'data': b64(key),
                            'format': 'base64'}),
            ('object-add', {'qom-type': 'secret', 'id': 'k1', 'data': b64(key[:16]),
                            'format': 'base64'}),
            ('object-add', {'qom-type': 'authz-simple', 'id': 'z', 'identity': 'x'}),
            ('object-add', dict(enc, id='s0', data=b64(ct))),              # decrypts
            ('object-add', dict(enc, id='s1', data=b64(ct), iv=b64(iv[:8]))),
            ('object-add', {'qom-type': 'secret', 'id': 's2', 'data': b64(ct),
                            'format': 'base64', 'keyid': 'k0'}),          # no iv
            ('object-add', dict(enc, id='s3', data=b64(ct[:-1]))),         # not whole blocks
            ('object-add', dict(enc, id='s4', data=b64(ct), keyid='k1')),  # 16-byte key
            ('object-add', dict(enc, id='s5', data=b64(ct), keyid='nope')),
            ('object-add', dict(enc, id='s6', data=b64(ct), keyid='z')),   # not a secret
            ('object-add', dict(enc, id='s7', data=b64(bad_pad))),
            ('object-add', dict(enc, id='s8', data='not base64!')),
            ('object-add', dict(enc, id='s9', data=b64(ct), iv='@@@@')),
        ]
        mine, ref = self.replies(False, calls), self.replies(True, calls)
        for call, a, b in zip(calls, mine, ref):
            self.assertEqual(a, b, call)
        self.assertEqual(mine[3], {'return': {}})
        self.assertEqual(sum('error' in r for r in mine), 9)

    def test_encrypted_secret_unlocks_a_key(self):
        """The decrypted bytes are the right ones: as passwordid, they open an encrypted
        private key, and clients get through."""
        key, iv = os.urandom(32), os.urandom(16)
        creds = os.path.join(self.dir, 'enc-creds')
        shutil.copytree(self.x509['server'], creds)
        run(['openssl', 'pkcs8', '-topk8', '-v2', 'aes-256-cbc', '-passout', 'pass:p4ss w0rd',
             '-in', os.path.join(self.x509['server'], 'server-key.pem'),
             '-out', os.path.join(creds, 'server-key.pem')])
        b64 = lambda b: base64.b64encode(b).decode()
        objects = ['secret,id=k0,format=base64,data=' + b64(key),
                   'secret,id=pw,format=base64,keyid=k0,iv=%s,data=%s'
                   % (b64(iv), b64(encrypt(key, iv, b'p4ss w0rd'))),
                   'tls-creds-x509,id=t0,dir=%s,endpoint=server,verify-peer=off,passwordid=pw'
                   % creds]
        for qsd in (False, True):
            _, sock = self.start(qsd, objects, ',tls-creds=t0')
            p = self.nbdinfo(self.unix_url(sock, self.x509['server']))
            self.assertEqual(p.returncode, 0, (qsd, p.stderr))
            self.assertEqual(p.stdout.strip(), str(4 * MiB))


def encrypt(key, iv, plain, pad=True):
    """AES-256-CBC with openssl(1): PKCS#7 padding unless @pad is False."""
    argv = ['openssl', 'enc', '-aes-256-cbc', '-K', key.hex(), '-iv', iv.hex()]
    if not pad:
        argv.append('-nopad')
    return subprocess.run(argv, input=plain, stdout=subprocess.PIPE, check=True).stdout


if __name__ == '__main__':
    unittest.main(verbosity=2)
