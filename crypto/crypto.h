/* crypto/crypto.h — the objects of `--object` / object-add: TLS credentials (x509, PSK),
 * authorization lists and secrets, and what the NBD server needs of them: credentials by id,
 * a server TLS session on a connected socket, the peer's identity and the authz check.
 *
 * Threads: objects are created, looked up and deleted on the main thread; a held
 * CbtCryptoTlsCreds (a reference) may be used from any thread to start sessions.
 */
#pragma once

#include <glib.h>
#include <gnutls/gnutls.h>

typedef struct CbtCryptoTlsCreds CbtCryptoTlsCreds;
typedef struct CbtCryptoAuthz CbtCryptoAuthz;

/* Credentials @id for the server side, with a reference (the object cannot be deleted while
 * it is held): QEMU's "No TLS credentials with id '%s'" and "Expected TLS credentials for a
 * server endpoint" otherwise. */
CbtCryptoTlsCreds *cbt_crypto_tls_creds_get_server(const char *id, GError **error);
/* Another reference to credentials already held (any thread). */
CbtCryptoTlsCreds *cbt_crypto_tls_creds_ref(CbtCryptoTlsCreds *creds);
void cbt_crypto_tls_creds_unref(CbtCryptoTlsCreds *creds);
gboolean cbt_crypto_tls_creds_is_psk(const CbtCryptoTlsCreds *creds);
gboolean cbt_crypto_tls_creds_verify_peer(const CbtCryptoTlsCreds *creds);

/* A server session on connected @fd with the credentials and their priority; the caller runs
 * gnutls_handshake() and owns the session (gnutls_deinit). */
gnutls_session_t cbt_crypto_tls_session_new(CbtCryptoTlsCreds *creds, int fd, GError **error);
/* After the handshake: the peer's certificate checked (when verify-peer is on) and its
 * identity, the x509 distinguished name as gnutls_x509_crt_get_dn() formats it (as QEMU) or
 * the PSK username; NULL with @error when the check fails; "" when there is no identity. */
char *cbt_crypto_tls_session_check_peer(gnutls_session_t session, CbtCryptoTlsCreds *creds,
                                        GError **error);

/* The authz object @id with a reference: "No authorization object with id '%s'". */
CbtCryptoAuthz *cbt_crypto_authz_get(const char *id, GError **error);
CbtCryptoAuthz *cbt_crypto_authz_ref(CbtCryptoAuthz *authz);
void cbt_crypto_authz_unref(CbtCryptoAuthz *authz);
/* Whether @identity may connect: FALSE with @error when refused (QEMU's text, "TLS x509 authz
 * check for %s is denied", with @kind "x509" or "PSK"). */
gboolean cbt_crypto_authz_is_allowed(CbtCryptoAuthz *authz, const char *kind, const char *identity,
                                     GError **error);

/* The pure matching of an authz-list (for tests): rules are CbtQmpQAuthZListRule. */
gboolean cbt_crypto_authz_list_match(gboolean default_allow, GPtrArray *rules,
                                     const char *identity);

/* A secret object's input, as its properties give it. */
typedef struct {
  const char *data; /* the data or the file's contents */
  gsize len;
  gboolean base64;   /* format=base64 */
  const char *keyid; /* encrypted with this secret's key (AES-256-CBC), or NULL */
  const char *iv;    /* base64 */
} CbtCryptoSecretInput;

/* The secret's bytes (NUL-terminated, length in @out_len): decoded from base64 when the format
 * says so, then decrypted when it names a key. secret.c */
char *cbt_crypto_secret_decode(const CbtCryptoSecretInput *s, gsize *out_len, GError **error);

G_DEFINE_AUTOPTR_CLEANUP_FUNC(CbtCryptoTlsCreds, cbt_crypto_tls_creds_unref)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(CbtCryptoAuthz, cbt_crypto_authz_unref)
