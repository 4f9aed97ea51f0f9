/* crypto/crypto-internal.h — the object table shared by the files of crypto/. */
#pragma once

#include "crypto/crypto.h"
#include "schemas/qmp-types.h"

typedef enum {
  CBT_CRYPTO_OBJ_AUTHZ,
  CBT_CRYPTO_OBJ_SECRET,
  CBT_CRYPTO_OBJ_TLS_CREDS,
} CbtCryptoObjKind;

struct CbtCryptoAuthz {
  gboolean default_allow;
  GPtrArray *rules; /* of CbtQmpQAuthZListRule * */
};

struct CbtCryptoTlsCreds {
  gboolean server, verify_peer, psk;
  char *priority;
  char *username; /* PSK client */
  gnutls_certificate_credentials_t x509;
  gnutls_psk_server_credentials_t psk_server;
  gnutls_psk_client_credentials_t psk_client;
  gnutls_dh_params_t dh;
};

/* One object of the table; `users` counts references held by users (the NBD server). */
typedef struct {
  CbtCryptoObjKind kind;
  char *id;
  gint users;
  union {
    CbtCryptoAuthz authz;
    CbtCryptoTlsCreds creds;
    struct {
      char *data; /* NUL-terminated too */
      gsize len;
    } secret;
  } u;
} CbtCryptoObject;

CbtCryptoObject *cbt_crypto_object_find(const char *id);
/* The bytes of secret @id (NUL-terminated; their length in @len when not NULL), with QEMU's
 * texts when there is none. */
const char *cbt_crypto_secret_lookup(const char *id, gsize *len, GError **error);

/* The members every TLS credentials object has, taken from either properties type. */
typedef struct {
  const char *dir, *priority, *username, *passwordid;
  gboolean server, verify_peer, psk;
} CbtCryptoTlsParams;

gboolean cbt_crypto_tls_creds_load(CbtCryptoTlsCreds *c, const CbtCryptoTlsParams *p,
                                   GError **error);
void cbt_crypto_tls_creds_clear(CbtCryptoTlsCreds *c);
gboolean cbt_crypto_authz_list_file_load(CbtCryptoAuthz *a, const char *filename, GError **error);
