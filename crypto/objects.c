/* crypto/objects.c — the object table: object-add / object-del (and --object through them),
 * with QEMU 7.2's error texts, and the lookups by id with references held by users.
 */
#include "crypto/crypto-internal.h"

#include "rpc/rpc.h"
#include "schemas/qmp-commands.h"

static GHashTable *objects; /* id -> CbtCryptoObject * */

static void
object_free(CbtCryptoObject *o)
{
  switch (o->kind) {
  case CBT_CRYPTO_OBJ_AUTHZ:
    g_clear_pointer(&o->u.authz.rules, g_ptr_array_unref);
    break;
  case CBT_CRYPTO_OBJ_SECRET:
    if (o->u.secret.data)
      memset(o->u.secret.data, 0, o->u.secret.len);
    g_free(o->u.secret.data);
    break;
  case CBT_CRYPTO_OBJ_TLS_CREDS:
    cbt_crypto_tls_creds_clear(&o->u.creds);
    break;
  }
  g_free(o->id);
  g_free(o);
}

CbtCryptoObject *
cbt_crypto_object_find(const char *id)
{
  return objects ? g_hash_table_lookup(objects, id) : NULL;
}

static CbtQmpQAuthZListRule *
rule_new(const char *match, CbtQmpQAuthZListPolicy policy)
{
  CbtQmpQAuthZListRule *r = g_new0(CbtQmpQAuthZListRule, 1);
  r->match = g_strdup(match);
  r->policy = policy;
  return r;
}

static GPtrArray *
rules_copy(GPtrArray *in)
{
  GPtrArray *out = g_ptr_array_new_with_free_func((GDestroyNotify)cbt_qmp_q_auth_z_list_rule_free);
  for (guint i = 0; in && i < in->len; i++) {
    CbtQmpQAuthZListRule *src = g_ptr_array_index(in, i);
    CbtQmpQAuthZListRule *r = rule_new(src->match, src->policy);
    r->has_format = src->has_format;
    r->format = src->format;
    g_ptr_array_add(out, r);
  }
  return out;
}

static gboolean
secret_create(CbtCryptoObject *o, const CbtQmpSecretProperties *p, GError **error)
{
  g_autofree char *raw = NULL;

  if (p->data && p->file)
    return cbt_rpc_fail(error, "'file' and 'data' are mutually exclusive");
  if (!p->data && !p->file)
    return cbt_rpc_fail(error, "Either 'file' or 'data' must be provided");
  gsize len = 0;
  if (p->file) {
    g_autoptr(GError) local = NULL;
    if (!g_file_get_contents(p->file, &raw, &len, &local))
      return cbt_rpc_fail(error, "Unable to read %s: %s", p->file, local->message);
  } else {
    raw = g_strdup(p->data);
    len = strlen(raw);
  }
  const CbtCryptoSecretInput in = {
    .data = raw,
    .len = len,
    .base64 = p->has_format && p->format == CBT_QMP_Q_CRYPTO_SECRET_FORMAT_BASE64,
    .keyid = p->keyid,
    .iv = p->iv,
  };
  o->u.secret.data = cbt_crypto_secret_decode(&in, &o->u.secret.len, error);
  memset(raw, 0, len);
  return o->u.secret.data != NULL;
}

static gboolean
object_create(CbtCryptoObject *o, const CbtQmpObjectOptions *args, GError **error)
{
  CbtCryptoTlsParams tp = { 0 };

  switch (args->qom_type) {
  case CBT_QMP_OBJECT_TYPE_AUTHZ_SIMPLE:
    o->kind = CBT_CRYPTO_OBJ_AUTHZ;
    o->u.authz.rules =
      g_ptr_array_new_with_free_func((GDestroyNotify)cbt_qmp_q_auth_z_list_rule_free);
    g_ptr_array_add(o->u.authz.rules,
                    rule_new(args->u.authz_simple.identity, CBT_QMP_Q_AUTH_Z_LIST_POLICY_ALLOW));
    return TRUE;
  case CBT_QMP_OBJECT_TYPE_AUTHZ_LIST:
    o->kind = CBT_CRYPTO_OBJ_AUTHZ;
    o->u.authz.default_allow = args->u.authz_list.has_policy &&
                               args->u.authz_list.policy == CBT_QMP_Q_AUTH_Z_LIST_POLICY_ALLOW;
    o->u.authz.rules = rules_copy(args->u.authz_list.rules);
    return TRUE;
  case CBT_QMP_OBJECT_TYPE_AUTHZ_LISTFILE:
    o->kind = CBT_CRYPTO_OBJ_AUTHZ;
    return cbt_crypto_authz_list_file_load(&o->u.authz, args->u.authz_listfile.filename, error);
  case CBT_QMP_OBJECT_TYPE_SECRET:
    o->kind = CBT_CRYPTO_OBJ_SECRET;
    return secret_create(o, &args->u.secret, error);
  case CBT_QMP_OBJECT_TYPE_TLS_CREDS_X509: {
    const CbtQmpTlsCredsX509Properties *p = &args->u.tls_creds_x509;
    tp = (CbtCryptoTlsParams){ .dir = p->dir,
                               .priority = p->priority,
                               .passwordid = p->passwordid,
                               /* QEMU's defaults: client endpoint, verify-peer on */
                               .server = p->has_endpoint &&
                                         p->endpoint == CBT_QMP_Q_CRYPTO_TLS_CREDS_ENDPOINT_SERVER,
                               .verify_peer = !p->has_verify_peer || p->verify_peer };
    break;
  }
  case CBT_QMP_OBJECT_TYPE_TLS_CREDS_PSK: {
    const CbtQmpTlsCredsPskProperties *p = &args->u.tls_creds_psk;
    tp = (CbtCryptoTlsParams){ .dir = p->dir,
                               .priority = p->priority,
                               .username = p->username,
                               .psk = TRUE,
                               .server = p->has_endpoint &&
                                         p->endpoint == CBT_QMP_Q_CRYPTO_TLS_CREDS_ENDPOINT_SERVER,
                               .verify_peer = !p->has_verify_peer || p->verify_peer };
    break;
  }
  default:
    return cbt_rpc_fail(error, "invalid object type: %s",
                        cbt_qmp_object_type_to_string(args->qom_type));
  }
  o->kind = CBT_CRYPTO_OBJ_TLS_CREDS;
  return cbt_crypto_tls_creds_load(&o->u.creds, &tp, error);
}

gboolean
cbt_qmp_object_add(const CbtQmpObjectOptions *args, GError **error)
{
  if (!objects)
    objects = g_hash_table_new_full(g_str_hash, g_str_equal, NULL, (GDestroyNotify)object_free);
  if (g_hash_table_contains(objects, args->id))
    return cbt_rpc_fail(
      error, "attempt to add duplicate property '%s' to object (type 'container')", args->id);

  CbtCryptoObject *o = g_new0(CbtCryptoObject, 1);
  o->id = g_strdup(args->id);
  if (!object_create(o, args, error)) {
    object_free(o);
    return FALSE;
  }
  g_hash_table_insert(objects, o->id, o);
  return TRUE;
}

gboolean
cbt_qmp_object_del(const CbtQmpObjectDelArg *args, GError **error)
{
  CbtCryptoObject *o = cbt_crypto_object_find(args->id);

  if (!o)
    return cbt_rpc_fail(error, "object '%s' not found", args->id);
  /* Stricter than qemu-storage-daemon 7.2, which lets a running NBD server's credentials
   * go; the text is QEMU's for objects that refuse deletion. */
  if (g_atomic_int_get(&o->users) > 0)
    return cbt_rpc_fail(error, "object '%s' is in use, can not be deleted", args->id);
  g_hash_table_remove(objects, args->id);
  return TRUE;
}

const char *
cbt_crypto_secret_lookup(const char *id, gsize *len, GError **error)
{
  CbtCryptoObject *o = cbt_crypto_object_find(id);

  if (!o) {
    cbt_rpc_fail(error, "No secret with id '%s'", id);
    return NULL;
  }
  if (o->kind != CBT_CRYPTO_OBJ_SECRET) {
    cbt_rpc_fail(error, "Object with id '%s' is not a secret", id);
    return NULL;
  }
  if (len)
    *len = o->u.secret.len;
  return o->u.secret.data;
}

/* Users hold the object, not a copy: its table entry stays while users > 0. */
static CbtCryptoObject *
object_of_creds(CbtCryptoTlsCreds *c)
{
  return (CbtCryptoObject *)((char *)c - G_STRUCT_OFFSET(CbtCryptoObject, u));
}

CbtCryptoTlsCreds *
cbt_crypto_tls_creds_get_server(const char *id, GError **error)
{
  CbtCryptoObject *o = cbt_crypto_object_find(id);

  if (!o) {
    cbt_rpc_fail(error, "No TLS credentials with id '%s'", id);
    return NULL;
  }
  if (o->kind != CBT_CRYPTO_OBJ_TLS_CREDS) {
    cbt_rpc_fail(error, "Object with id '%s' is not TLS credentials", id);
    return NULL;
  }
  if (!o->u.creds.server) {
    cbt_rpc_fail(error, "Expected TLS credentials for a server endpoint");
    return NULL;
  }
  g_atomic_int_inc(&o->users);
  return &o->u.creds;
}

CbtCryptoTlsCreds *
cbt_crypto_tls_creds_ref(CbtCryptoTlsCreds *creds)
{
  if (creds)
    g_atomic_int_inc(&object_of_creds(creds)->users);
  return creds;
}

void
cbt_crypto_tls_creds_unref(CbtCryptoTlsCreds *creds)
{
  if (creds)
    g_atomic_int_add(&object_of_creds(creds)->users, -1);
}

CbtCryptoAuthz *
cbt_crypto_authz_get(const char *id, GError **error)
{
  CbtCryptoObject *o = cbt_crypto_object_find(id);

  if (!o || o->kind != CBT_CRYPTO_OBJ_AUTHZ) {
    cbt_rpc_fail(error, "No authorization object with id '%s'", id);
    return NULL;
  }
  g_atomic_int_inc(&o->users);
  return &o->u.authz;
}

static CbtCryptoObject *
object_of_authz(CbtCryptoAuthz *a)
{
  return (CbtCryptoObject *)((char *)a - G_STRUCT_OFFSET(CbtCryptoObject, u));
}

CbtCryptoAuthz *
cbt_crypto_authz_ref(CbtCryptoAuthz *authz)
{
  if (authz)
    g_atomic_int_inc(&object_of_authz(authz)->users);
  return authz;
}

void
cbt_crypto_authz_unref(CbtCryptoAuthz *authz)
{
  if (authz)
    g_atomic_int_add(&object_of_authz(authz)->users, -1);
}
