/* crypto/secret.c — the bytes of a `secret` object: its data or file, in its format, and
 * decrypted when it names a key (QEMU's secret object, qapi/crypto.json and
 * docs/system/secrets.rst of QEMU: AES-256-CBC with the 32-byte key of secret `keyid`, the
 * base64 16-byte `iv`, PKCS#7 padding). Error texts are QEMU's.
 */
#include "crypto/crypto-internal.h"

#include <gnutls/crypto.h>
#include <string.h>

#include "rpc/rpc.h"

#define AES_BLOCK 16
#define AES_256_KEY 32

/* QEMU refuses what g_base64_decode would skip. */
static guchar *
base64_decode(const char *data, gsize len, gsize *out_len, GError **error)
{
  if (memchr(data, '\0', len)) {
    cbt_rpc_fail(error, "Base64 data contains embedded NUL characters");
    return NULL;
  }
  for (gsize i = 0; i < len; i++) {
    if (!g_ascii_isalnum(data[i]) && data[i] != '+' && data[i] != '/' && data[i] != '=') {
      cbt_rpc_fail(error, "Base64 data contains invalid characters");
      return NULL;
    }
  }
  g_autofree char *text = g_strndup(data, len);
  return g_base64_decode(text, out_len);
}

/* Decrypt @in (@len bytes, already out of base64 when the format says so): the plaintext,
 * NUL-terminated, its length in @out_len. */
static char *
decrypt(const char *keyid, const char *iv64, const guchar *in, gsize len, gsize *out_len,
        GError **error)
{
  gsize key_len = 0, iv_len = 0;
  const char *key = cbt_crypto_secret_lookup(keyid, &key_len, error);

  if (!key)
    return NULL;
  if (key_len != AES_256_KEY) {
    cbt_rpc_fail(error, "Key should be 32 bytes in length");
    return NULL;
  }
  if (!iv64) {
    cbt_rpc_fail(error, "IV is required to decrypt secret");
    return NULL;
  }
  g_autofree guchar *iv = base64_decode(iv64, strlen(iv64), &iv_len, error);
  if (!iv)
    return NULL;
  if (iv_len != AES_BLOCK) {
    cbt_rpc_fail(error, "IV should be 16 bytes in length not %zu", iv_len);
    return NULL;
  }
  if (len % AES_BLOCK) {
    cbt_rpc_fail(error, "Length %zu must be a multiple of block size %d", len, AES_BLOCK);
    return NULL;
  }
  gnutls_datum_t k = { (unsigned char *)key, AES_256_KEY }, v = { iv, AES_BLOCK };
  gnutls_cipher_hd_t aes;
  int ret = gnutls_cipher_init(&aes, GNUTLS_CIPHER_AES_256_CBC, &k, &v);
  if (ret < 0) {
    cbt_rpc_fail(error, "Cannot initialize cipher: %s", gnutls_strerror(ret));
    return NULL;
  }
  char *plain = g_malloc0(len + 1);
  ret = len ? gnutls_cipher_decrypt2(aes, in, len, plain, len) : 0;
  gnutls_cipher_deinit(aes);
  if (ret < 0) {
    g_free(plain);
    cbt_rpc_fail(error, "Cannot decrypt data: %s", gnutls_strerror(ret));
    return NULL;
  }
  /* QEMU reads the pad byte of an empty plaintext out of bounds; here it is a pad of 0. */
  guint pad = len ? (guchar)plain[len - 1] : 0;
  if (pad > AES_BLOCK || pad > len || len == 0) {
    memset(plain, 0, len);
    g_free(plain);
    cbt_rpc_fail(error, "Incorrect number of padding bytes (%u) found on decrypted data", pad);
    return NULL;
  }
  *out_len = len - pad;
  plain[*out_len] = '\0';
  return plain;
}

char *
cbt_crypto_secret_decode(const CbtCryptoSecretInput *s, gsize *out_len, GError **error)
{
  g_autofree guchar *decoded = NULL;
  const guchar *in = (const guchar *)s->data;
  gsize len = s->len;

  if (s->base64) {
    if (!(decoded = base64_decode(s->data, s->len, &len, error)))
      return NULL;
    in = decoded;
  }
  if (s->keyid) {
    char *plain = decrypt(s->keyid, s->iv, in, len, out_len, error);
    if (decoded)
      memset(decoded, 0, len);
    return plain;
  }
  char *out = g_malloc(len + 1);
  memcpy(out, in, len);
  out[len] = '\0';
  *out_len = len;
  if (decoded)
    memset(decoded, 0, len);
  return out;
}
