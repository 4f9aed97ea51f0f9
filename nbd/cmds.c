/* nbd/cmds.c — nbd-server-start/-stop, block-export-add/-del, query-block-exports and the
 * deprecated nbd-server-add/-remove, with qemu-storage-daemon 7.2's error texts.
 *
 * Arguments arrive checked against schemas/block-export.json; sockets come from common/.
 */
#include "nbd/nbd-internal.h"

#include <unistd.h>

#include "common/sockets.h"
#include "schemas/qmp-commands.h"

static char *unix_path; /* socket file to unlink when the server stops */
/* The running server's TLS objects (references, so object-del refuses them); under
 * cbt_nbd_lock, as handshakes read them. */
static CbtCryptoTlsCreds *tls_creds;
static CbtCryptoAuthz *tls_authz;

gboolean
cbt_nbd_tls_get(CbtCryptoTlsCreds **creds, CbtCryptoAuthz **authz)
{
  cbt_mutex_lock(&cbt_nbd_lock);
  *creds = cbt_crypto_tls_creds_ref(tls_creds);
  *authz = cbt_crypto_authz_ref(tls_authz);
  cbt_mutex_unlock(&cbt_nbd_lock);
  return *creds != NULL;
}

static void
tls_set(CbtCryptoTlsCreds *creds, CbtCryptoAuthz *authz)
{
  cbt_mutex_lock(&cbt_nbd_lock);
  CbtCryptoTlsCreds *old_creds = tls_creds;
  CbtCryptoAuthz *old_authz = tls_authz;
  tls_creds = creds;
  tls_authz = authz;
  cbt_mutex_unlock(&cbt_nbd_lock);
  cbt_crypto_tls_creds_unref(old_creds);
  cbt_crypto_authz_unref(old_authz);
}

/* The TLS objects of a new server. Stricter than qemu-storage-daemon 7.2 (docs/user-guide.md,
 * "TLS"): tls-authz needs tls-creds, and x509 credentials that verify the peer (without a
 * checked certificate there is no identity to authorize); the authz object must exist. */
static gboolean
tls_lookup(const char *creds_id, const char *authz_id, CbtCryptoTlsCreds **creds,
           CbtCryptoAuthz **authz, GError **error)
{
  *creds = NULL;
  *authz = NULL;
  if (authz_id && !creds_id)
    return cbt_rpc_fail(error, "tls-authz is not supported without tls-creds");
  if (!creds_id)
    return TRUE;
  g_autoptr(CbtCryptoTlsCreds) c = cbt_crypto_tls_creds_get_server(creds_id, error);
  if (!c)
    return FALSE;
  if (authz_id && !cbt_crypto_tls_creds_is_psk(c) && !cbt_crypto_tls_creds_verify_peer(c))
    return cbt_rpc_fail(error,
                        "tls-authz needs TLS credentials with verify-peer=on: '%s' does not verify "
                        "client certificates",
                        creds_id);
  if (authz_id && !(*authz = cbt_crypto_authz_get(authz_id, error)))
    return FALSE;
  *creds = g_steal_pointer(&c);
  return TRUE;
}

/* @flags: CBT_SOCKET_ALLOW_FD on the command line. */
static gboolean
server_start(const CbtQmpSocketAddress *addr, const char *creds_id, const char *authz_id,
             gboolean has_max, guint32 max, CbtSocketFlags flags, GError **error)
{
  CbtCryptoTlsCreds *creds;
  CbtCryptoAuthz *authz;

  if (cbt_nbd_server_running())
    return cbt_rpc_fail(error, "NBD server already running");
  if (!tls_lookup(creds_id, authz_id, &creds, &authz, error))
    return FALSE;
  int fd = cbt_socket_listen(addr, flags, error);
  if (fd < 0) {
    cbt_crypto_tls_creds_unref(creds);
    cbt_crypto_authz_unref(authz);
    return FALSE;
  }
  tls_set(creds, authz);
  const char *path = cbt_socket_address_path(addr);
  if (path) {
    g_free(unix_path);
    unix_path = g_strdup(path);
  }
  if (cbt_nbd_server_listen(cbt_qmp_socket_address_type_to_string(addr->type), fd,
                            addr->type == CBT_QMP_SOCKET_ADDRESS_TYPE_INET, has_max ? max : 0,
                            error))
    return TRUE;
  tls_set(NULL, NULL);
  return FALSE;
}

gboolean
cbt_nbd_server_start_options(const CbtQmpNbdServerOptions *opts, GError **error)
{
  CBT_ASSERT_MAIN_THREAD();
  return server_start(opts->addr, opts->tls_creds, opts->tls_authz, opts->has_max_connections,
                      opts->max_connections, CBT_SOCKET_ALLOW_FD, error);
}

gboolean
cbt_nbd_server_start_fd(int listen_fd, GError **error)
{
  CBT_ASSERT_MAIN_THREAD();
  if (cbt_nbd_server_running())
    return cbt_rpc_fail(error, "NBD server already running");
  return cbt_nbd_server_listen("socket activation", listen_fd, cbt_socket_is_inet(listen_fd), 0,
                               error);
}

static void
server_stop(gboolean wait)
{
  cbt_nbd_server_stop_listening();
  cbt_nbd_export_shutdown_all(wait);
  tls_set(NULL, NULL);
  if (unix_path) {
    unlink(unix_path);
    g_clear_pointer(&unix_path, g_free);
  }
}

void
cbt_nbd_shutdown(void)
{
  CBT_ASSERT_MAIN_THREAD();
  server_stop(TRUE);
}

/* --- handlers ------------------------------------------------------------------------------ */

gboolean
cbt_qmp_nbd_server_start(const CbtQmpNbdServerStartArg *args, GError **error)
{
  CbtQmpSocketAddress addr;

  cbt_socket_address_from_legacy(args->addr, &addr);
  return server_start(&addr, args->tls_creds, args->tls_authz, args->has_max_connections,
                      args->max_connections, 0, error);
}

gboolean
cbt_qmp_nbd_server_stop(GError **error)
{
  if (!cbt_nbd_server_running())
    return cbt_rpc_fail(error, "NBD server not running");
  server_stop(FALSE);
  return TRUE;
}

gboolean
cbt_qmp_block_export_add(const CbtQmpBlockExportOptions *args, GError **error)
{
  if (args->type != CBT_QMP_BLOCK_EXPORT_TYPE_NBD)
    return cbt_rpc_fail(error, "Export type '%s' is not supported by cbtd",
                        cbt_qmp_block_export_type_to_string(args->type));
  return cbt_nbd_export_add(args, error);
}

gboolean
cbt_qmp_block_export_del(const CbtQmpBlockExportDelArg *args, GError **error)
{
  return cbt_nbd_export_del(args->id, args->mode == CBT_QMP_BLOCK_EXPORT_REMOVE_MODE_HARD, error);
}

CbtQmpBlockExportInfoList *
cbt_qmp_query_block_exports(GError **error)
{
  g_autoptr(GPtrArray) list = cbt_nbd_export_query();
  GPtrArray *out = g_ptr_array_new_with_free_func((GDestroyNotify)cbt_qmp_block_export_info_free);

  for (guint i = 0; i < list->len; i++) {
    CbtNbdExport *exp = g_ptr_array_index(list, i);
    CbtQmpBlockExportInfo *info = g_new0(CbtQmpBlockExportInfo, 1);

    cbt_mutex_lock(&cbt_nbd_lock);
    info->shutting_down = exp->shutting_down;
    cbt_mutex_unlock(&cbt_nbd_lock);
    info->id = g_strdup(exp->id);
    info->type = CBT_QMP_BLOCK_EXPORT_TYPE_NBD;
    /* A snapshot export shows the node it is a view of, the one the command named. */
    info->node_name = g_strdup(cbt_blockdev_get_node_name(
      exp->snapshot ? cbt_blockdev_snapshot_get_source(exp->snapshot) : exp->bd));
    g_ptr_array_add(out, info);
  }
  return out;
}

/* The deprecated form: block-export-add whose id is the export name (default: the device). */
gboolean
cbt_qmp_nbd_server_add(const CbtQmpNbdServerAddOptions *args, GError **error)
{
  /* qsd resolves the legacy "device" (a node name here) before anything else. */
  if (!cbt_blockdev_find(args->device))
    return cbt_rpc_fail(error, "Cannot find device='%s' nor node-name='%s'", args->device,
                        args->device);

  g_autoptr(CbtQmpBlockExportOptions) o = g_new0(CbtQmpBlockExportOptions, 1);
  o->type = CBT_QMP_BLOCK_EXPORT_TYPE_NBD;
  o->id = g_strdup(args->name ? args->name : args->device);
  o->node_name = g_strdup(args->device);
  o->writable = args->writable;
  o->u.nbd.name = g_strdup(args->name);
  o->u.nbd.description = g_strdup(args->description);
  if (args->bitmap) {
    CbtQmpBlockDirtyBitmapOrStr *b = g_new0(CbtQmpBlockDirtyBitmapOrStr, 1);
    b->type = CBT_QMP_BLOCK_DIRTY_BITMAP_OR_STR_KIND_LOCAL;
    b->u.local = g_strdup(args->bitmap);
    o->u.nbd.bitmaps =
      g_ptr_array_new_with_free_func((GDestroyNotify)cbt_qmp_block_dirty_bitmap_or_str_free);
    g_ptr_array_add(o->u.nbd.bitmaps, b);
  }
  return cbt_nbd_export_add(o, error);
}

gboolean
cbt_qmp_nbd_server_remove(const CbtQmpNbdServerRemoveArg *args, GError **error)
{
  return cbt_nbd_export_del(args->name, args->mode == CBT_QMP_BLOCK_EXPORT_REMOVE_MODE_HARD, error);
}
