"""TLS credentials made at test time with certtool and psktool (never checked in).

make_x509(dir) writes, under dir:
  ca/        the CA: ca-cert.pem (and ca-key.pem)
  server/    ca-cert.pem, server-cert.pem (dNSName localhost, IP 127.0.0.1 and ::1),
             server-key.pem: a `tls-creds-x509,endpoint=server` dir (also libnbd's
             tls-certificates dir for the client side: it reads ca-cert.pem)
  client/    ca-cert.pem, client-cert.pem, client-key.pem (CN=client,O=Test): a client dir
  other/     a second, unrelated CA and a client certificate it signed (ca-cert.pem,
             client-cert.pem, client-key.pem, server-cert.pem, server-key.pem)
make_psk(dir, users) writes dir/keys.psk for the usernames given.
"""
import os
import shutil
import subprocess

CLIENT_DN = 'O=Test,CN=client'  # as gnutls_x509_crt_get_dn() (and QEMU) write it


def _certtool(*args):
    subprocess.run(['certtool'] + list(args), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def _template(path, lines):
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return path


def _ca(d, name):
    os.makedirs(d, exist_ok=True)
    key = os.path.join(d, 'ca-key.pem')
    cert = os.path.join(d, 'ca-cert.pem')
    _certtool('--generate-privkey', '--outfile', key)
    t = _template(os.path.join(d, 'ca.info'),
                  ['cn = "%s"' % name, 'ca', 'cert_signing_key', 'expiration_days = 30'])
    _certtool('--generate-self-signed', '--load-privkey', key, '--template', t, '--outfile', cert)
    return key, cert


def _leaf(d, ca_key, ca_cert, kind, lines):
    os.makedirs(d, exist_ok=True)
    key = os.path.join(d, '%s-key.pem' % kind)
    cert = os.path.join(d, '%s-cert.pem' % kind)
    _certtool('--generate-privkey', '--outfile', key)
    t = _template(os.path.join(d, '%s.info' % kind), lines + ['expiration_days = 30'])
    _certtool('--generate-certificate', '--load-privkey', key, '--load-ca-certificate', ca_cert,
              '--load-ca-privkey', ca_key, '--template', t, '--outfile', cert)
    os.unlink(t)
    shutil.copy(ca_cert, os.path.join(d, 'ca-cert.pem'))


SERVER_LINES = ['organization = "Test"', 'cn = "localhost"', 'dns_name = "localhost"',
                'ip_address = "127.0.0.1"', 'ip_address = "::1"', 'tls_www_server',
                'encryption_key', 'signing_key']
CLIENT_LINES = ['organization = "Test"', 'cn = "client"', 'tls_www_client', 'encryption_key',
                'signing_key']


def make_x509(base):
    """The directories above under @base; returns a dict name -> path."""
    ca_key, ca_cert = _ca(os.path.join(base, 'ca'), 'Test CA')
    dirs = {n: os.path.join(base, n) for n in ('ca', 'server', 'client', 'other')}
    _leaf(dirs['server'], ca_key, ca_cert, 'server', SERVER_LINES)
    _leaf(dirs['client'], ca_key, ca_cert, 'client', CLIENT_LINES)
    okey, ocert = _ca(os.path.join(base, 'other-ca'), 'Other CA')
    _leaf(dirs['other'], okey, ocert, 'client', CLIENT_LINES)
    _leaf(dirs['other'], okey, ocert, 'server', SERVER_LINES)
    return dirs


def make_psk(d, users=('alice',)):
    """@d/keys.psk with a random key per user; returns the file's path."""
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, 'keys.psk')
    for u in users:
        subprocess.run(['psktool', '-u', u, '-p', path], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return path
