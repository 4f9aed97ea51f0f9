/* crypto/tls-creds.c — tls-creds-x509 and tls-creds-psk: the credential files loaded with
 * gnutls when the object is created (so a bad dir fails at object-add, with QEMU's texts), and
 * server sessions with the peer's check.
 *
 * Files in `dir` (QEMU's names): ca-cert.pem, ca-crl.pem (optional), server-cert.pem and
 * server-key.pem (client-cert.pem, client-key.pem, optional, for a client), dh-params.pem
 * (optional); keys.psk (lines "username:hexkey") for PSK.
 */
#include "crypto/crypto-internal.h"

#include <errno.h>
#include <gnutls/x509.h>
#include <unistd.h>

#include "rpc/rpc.h"

#define DEFAULT_PRIORITY "NORMAL"
#define PSK_PRIORITY_SUFFIX ":+ECDHE-PSK:+DHE-PSK:+PSK"

/* @dir/@name in *@path when it exists; a missing required file fails as QEMU does. */
static gboolean
file_path(const char *dir, const char *name, gboolean required, char **path, GError **error)
{
  g_autofree char *p = g_build_filename(dir, name, NULL);

  *path = NULL;
  if (access(p, R_OK) < 0) {
    if (errno == ENOENT && !required)
      return TRUE;
    return cbt_rpc_fail(error, "Unable to access credentials %s: %s", p, g_strerror(errno));
  }
  *path = g_steal_pointer(&p);
  return TRUE;
}

static gboolean
load_dh(CbtCryptoTlsCreds *c, const char *dir, GError **error)
{
  g_autofree char *path = NULL;
  g_autofree char *pem = NULL;
  gsize len;

  if (!file_path(dir, "dh-params.pem", FALSE, &path, error))
    return FALSE;
  if (!path)
    return TRUE; /* gnutls picks known parameters (RFC 7919) */
  if (!g_file_get_contents(path, &pem, &len, NULL))
    return cbt_rpc_fail(error, "Cannot load DH parameters from %s", path);
  gnutls_datum_t d = { (unsigned char *)pem, len };
  int ret = gnutls_dh_params_init(&c->dh);
  if (ret >= 0)
    ret = gnutls_dh_params_import_pkcs3(c->dh, &d, GNUTLS_X509_FMT_PEM);
  if (ret < 0)
    return cbt_rpc_fail(error, "Unable to load DH parameters from %s: %s", path,
                        gnutls_strerror(ret));
  return TRUE;
}

static gboolean
load_x509(CbtCryptoTlsCreds *c, const CbtCryptoTlsParams *p, GError **error)
{
  g_autofree char *ca = NULL, *crl = NULL, *cert = NULL, *key = NULL;
  const char *password = NULL;
  int ret;

  if (!file_path(p->dir, "ca-cert.pem", TRUE, &ca, error) ||
      !file_path(p->dir, "ca-crl.pem", FALSE, &crl, error) ||
      !file_path(p->dir, p->server ? "server-cert.pem" : "client-cert.pem", p->server, &cert,
                 error) ||
      !file_path(p->dir, p->server ? "server-key.pem" : "client-key.pem", p->server, &key, error))
    return FALSE;
  if (p->passwordid && !(password = cbt_crypto_secret_lookup(p->passwordid, NULL, error)))
    return FALSE;

  ret = gnutls_certificate_allocate_credentials(&c->x509);
  if (ret < 0)
    return cbt_rpc_fail(error, "Cannot allocate credentials: %s", gnutls_strerror(ret));
  ret = gnutls_certificate_set_x509_trust_file(c->x509, ca, GNUTLS_X509_FMT_PEM);
  if (ret < 0)
    return cbt_rpc_fail(error, "Cannot load CA certificate '%s': %s", ca, gnutls_strerror(ret));
  if (cert && key) {
    ret =
      gnutls_certificate_set_x509_key_file2(c->x509, cert, key, GNUTLS_X509_FMT_PEM, password, 0);
    if (ret < 0)
      return cbt_rpc_fail(error, "Cannot load certificate '%s' & key '%s': %s", cert, key,
                          gnutls_strerror(ret));
  }
  if (crl) {
    ret = gnutls_certificate_set_x509_crl_file(c->x509, crl, GNUTLS_X509_FMT_PEM);
    if (ret < 0)
      return cbt_rpc_fail(error, "Cannot load CRL '%s': %s", crl, gnutls_strerror(ret));
  }
  if (p->server && !load_dh(c, p->dir, error))
    return FALSE;
  if (c->dh)
    gnutls_certificate_set_dh_params(c->x509, c->dh);
  return TRUE;
}

/* The hex key of @user in a keys.psk file. */
static char *
psk_key_of(const char *path, const char *user, GError **error)
{
  g_autofree char *text = NULL;
  g_autoptr(GError) local = NULL;

  if (!g_file_get_contents(path, &text, NULL, &local)) {
    cbt_rpc_fail(error, "Cannot read PSK file %s: %s", path, local->message);
    return NULL;
  }
  g_auto(GStrv) lines = g_strsplit(text, "\n", -1);
  for (char **l = lines; *l; l++) {
    const char *colon = strchr(*l, ':');
    if (colon && (gsize)(colon - *l) == strlen(user) && strncmp(*l, user, colon - *l) == 0)
      return g_strstrip(g_strdup(colon + 1));
  }
  cbt_rpc_fail(error, "Cannot find key for username '%s' in %s", user, path);
  return NULL;
}

static gboolean
load_psk(CbtCryptoTlsCreds *c, const CbtCryptoTlsParams *p, GError **error)
{
  g_autofree char *path = NULL;
  int ret;

  if (!file_path(p->dir, "keys.psk", TRUE, &path, error))
    return FALSE;
  if (p->server) {
    if (p->username)
      return cbt_rpc_fail(error, "username should not be set when endpoint=server");
    ret = gnutls_psk_allocate_server_credentials(&c->psk_server);
    if (ret >= 0)
      ret = gnutls_psk_set_server_credentials_file(c->psk_server, path);
    if (ret < 0)
      return cbt_rpc_fail(error, "Cannot set PSK server credentials: %s", gnutls_strerror(ret));
    if (!load_dh(c, p->dir, error))
      return FALSE;
    if (c->dh)
      gnutls_psk_set_server_dh_params(c->psk_server, c->dh);
    return TRUE;
  }
  c->username = g_strdup(p->username ? p->username : "qemu");
  g_autofree char *hex = psk_key_of(path, c->username, error);
  if (!hex)
    return FALSE;
  gnutls_datum_t key = { (unsigned char *)hex, strlen(hex) };
  ret = gnutls_psk_allocate_client_credentials(&c->psk_client);
  if (ret >= 0)
    ret = gnutls_psk_set_client_credentials(c->psk_client, c->username, &key, GNUTLS_PSK_KEY_HEX);
  if (ret < 0)
    return cbt_rpc_fail(error, "Cannot set PSK client credentials: %s", gnutls_strerror(ret));
  return TRUE;
}

gboolean
cbt_crypto_tls_creds_load(CbtCryptoTlsCreds *c, const CbtCryptoTlsParams *p, GError **error)
{
  if (!p->dir)
    return cbt_rpc_fail(error, "Missing 'dir' property value");
  c->server = p->server;
  c->verify_peer = p->verify_peer;
  c->psk = p->psk;
  c->priority = g_strconcat(p->priority ? p->priority : DEFAULT_PRIORITY,
                            p->psk ? PSK_PRIORITY_SUFFIX : "", NULL);
  /* Check the priority string now rather than at the first client. */
  gnutls_priority_t prio;
  const char *where = NULL;
  int ret = gnutls_priority_init(&prio, c->priority, &where);
  if (ret < 0)
    return cbt_rpc_fail(error, "Unable to set TLS session priority %s: %s", c->priority,
                        gnutls_strerror(ret));
  gnutls_priority_deinit(prio);
  return p->psk ? load_psk(c, p, error) : load_x509(c, p, error);
}

void
cbt_crypto_tls_creds_clear(CbtCryptoTlsCreds *c)
{
  if (c->x509)
    gnutls_certificate_free_credentials(c->x509);
  if (c->psk_server)
    gnutls_psk_free_server_credentials(c->psk_server);
  if (c->psk_client)
    gnutls_psk_free_client_credentials(c->psk_client);
  if (c->dh)
    gnutls_dh_params_deinit(c->dh);
  g_free(c->priority);
  g_free(c->username);
}

gboolean
cbt_crypto_tls_creds_is_psk(const CbtCryptoTlsCreds *creds)
{
  return creds->psk;
}

gboolean
cbt_crypto_tls_creds_verify_peer(const CbtCryptoTlsCreds *creds)
{
  return creds->verify_peer;
}

gnutls_session_t
cbt_crypto_tls_session_new(CbtCryptoTlsCreds *c, int fd, GError **error)
{
  gnutls_session_t s = NULL;
  int ret = gnutls_init(&s, GNUTLS_SERVER);

  if (ret >= 0)
    ret = gnutls_priority_set_direct(s, c->priority, NULL);
  if (ret >= 0)
    ret = c->psk ? gnutls_credentials_set(s, GNUTLS_CRD_PSK, c->psk_server)
                 : gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, c->x509);
  if (ret < 0) {
    cbt_rpc_fail(error, "Cannot start TLS session: %s", gnutls_strerror(ret));
    if (s)
      gnutls_deinit(s);
    return NULL;
  }
  if (!c->psk && c->verify_peer)
    gnutls_certificate_server_set_request(s, GNUTLS_CERT_REQUIRE);
  gnutls_transport_set_int(s, fd);
  return s;
}

static const char *
verify_reason(unsigned status)
{
  if (status & GNUTLS_CERT_REVOKED)
    return "The certificate has been revoked";
  if (status & GNUTLS_CERT_SIGNER_NOT_FOUND)
    return "The certificate hasn't got a known issuer";
  if (status & GNUTLS_CERT_INSECURE_ALGORITHM)
    return "The certificate uses an insecure algorithm";
  if (status & GNUTLS_CERT_EXPIRED)
    return "The certificate has expired";
  if (status & GNUTLS_CERT_NOT_ACTIVATED)
    return "The certificate is not yet activated";
  return "The certificate is not trusted";
}

static char *
x509_peer(gnutls_session_t s, CbtCryptoTlsCreds *c, GError **error)
{
  unsigned status = 0, n = 0;
  const gnutls_datum_t *certs = gnutls_certificate_get_peers(s, &n);

  if (!c->verify_peer && (!certs || n == 0))
    return g_strdup("");
  if (c->verify_peer) {
    int ret = gnutls_certificate_verify_peers2(s, &status);
    if (ret < 0) {
      cbt_rpc_fail(error, "Verify failed: %s", gnutls_strerror(ret));
      return NULL;
    }
    if (status) {
      cbt_rpc_fail(error, "%s", verify_reason(status));
      return NULL;
    }
    if (!certs || n == 0) {
      cbt_rpc_fail(error, "No certificate peer");
      return NULL;
    }
  }
  gnutls_x509_crt_t crt;
  char dn[1024];
  size_t len = sizeof(dn);
  int ret = gnutls_x509_crt_init(&crt);
  if (ret >= 0)
    ret = gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER);
  if (ret >= 0)
    ret = gnutls_x509_crt_get_dn(crt, dn, &len);
  gnutls_x509_crt_deinit(crt);
  if (ret < 0) {
    cbt_rpc_fail(error, "Cannot read the peer's distinguished name: %s", gnutls_strerror(ret));
    return NULL;
  }
  return g_strdup(dn);
}

char *
cbt_crypto_tls_session_check_peer(gnutls_session_t s, CbtCryptoTlsCreds *c, GError **error)
{
  if (!c->psk)
    return x509_peer(s, c, error);
  const char *user = gnutls_psk_server_get_username(s);
  return g_strdup(user ? user : "");
}
