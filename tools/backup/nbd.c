/* tools/backup/nbd.c — reaching an NBD server with libnbd: addresses, TLS, meta contexts. */
#include "backup.h"

#include <string.h>

G_DEFINE_QUARK(cbt - backup - error - quark, cbt_backup_error)

void
cbt_backup_nbd_error(GError **error, const char *what)
{
  int err = nbd_get_errno();

  g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "%s: %s", what,
              nbd_get_error() ? nbd_get_error() : g_strerror(err ? err : EIO));
}

/* "unix:PATH", an absolute PATH, "HOST:PORT" or "[V6]:PORT". */
gboolean
cbt_backup_nbd_addr_parse(CbtBackupNbdAddr *addr, const char *text, GError **error)
{
  if (g_str_has_prefix(text, "unix:") || text[0] == '/') {
    addr->unix_path = g_strdup(text[0] == '/' ? text : text + 5);
    return TRUE;
  }
  const char *colon = strrchr(text, ':');
  if (!colon || colon == text || !colon[1]) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_USAGE,
                "--nbd '%s': expected unix:PATH, /PATH, HOST:PORT or [ADDR]:PORT", text);
    return FALSE;
  }
  if (text[0] == '[' && colon[-1] == ']')
    addr->host = g_strndup(text + 1, colon - text - 2);
  else
    addr->host = g_strndup(text, colon - text);
  addr->port = g_strdup(colon + 1);
  return TRUE;
}

void
cbt_backup_nbd_addr_clear(CbtBackupNbdAddr *addr)
{
  g_clear_pointer(&addr->unix_path, g_free);
  g_clear_pointer(&addr->host, g_free);
  g_clear_pointer(&addr->port, g_free);
  g_clear_pointer(&addr->tls_certificates, g_free);
  g_clear_pointer(&addr->tls_psk_file, g_free);
  g_clear_pointer(&addr->tls_username, g_free);
}

static gboolean
setup_tls(struct nbd_handle *h, const CbtBackupNbdAddr *addr)
{
  if (!addr->tls_certificates && !addr->tls_psk_file)
    return TRUE;
  /* TLS asked for is TLS required: never fall back to plaintext. */
  if (nbd_set_tls(h, LIBNBD_TLS_REQUIRE) == -1)
    return FALSE;
  if (addr->tls_certificates && nbd_set_tls_certificates(h, addr->tls_certificates) == -1)
    return FALSE;
  if (addr->tls_psk_file && nbd_set_tls_psk_file(h, addr->tls_psk_file) == -1)
    return FALSE;
  if (addr->tls_username && nbd_set_tls_username(h, addr->tls_username) == -1)
    return FALSE;
  /* libnbd checks the server's name only over TCP; the host is what the user typed. */
  return nbd_set_tls_verify_peer(h, true) != -1;
}

struct nbd_handle *
cbt_backup_nbd_connect(const CbtBackupNbdAddr *addr, const char *export_name,
                       const char *const *contexts, GError **error)
{
  struct nbd_handle *h = nbd_create();

  if (!h) {
    cbt_backup_nbd_error(error, "nbd_create");
    return NULL;
  }
  gboolean ok = setup_tls(h, addr) && nbd_set_export_name(h, export_name) != -1;
  for (guint i = 0; ok && contexts && contexts[i]; i++)
    ok = nbd_add_meta_context(h, contexts[i]) != -1;
  if (ok)
    ok = addr->unix_path ? nbd_connect_unix(h, addr->unix_path) != -1
                         : nbd_connect_tcp(h, addr->host, addr->port) != -1;
  if (!ok) {
    g_autofree char *what = g_strdup_printf("connecting to export '%s'", export_name);
    cbt_backup_nbd_error(error, what);
    nbd_close(h);
    return NULL;
  }
  return h;
}

static int
list_cb(void *opaque, const char *name)
{
  g_ptr_array_add(opaque, g_strdup(name));
  return 0;
}

GPtrArray *
cbt_backup_nbd_list_contexts(const CbtBackupNbdAddr *addr, const char *export_name,
                             const char *query, GError **error)
{
  g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);
  struct nbd_handle *h = nbd_create();
  gboolean ok = h && setup_tls(h, addr) && nbd_set_opt_mode(h, true) != -1 &&
                nbd_set_export_name(h, export_name) != -1 && nbd_add_meta_context(h, query) != -1;

  if (ok)
    ok = addr->unix_path ? nbd_connect_unix(h, addr->unix_path) != -1
                         : nbd_connect_tcp(h, addr->host, addr->port) != -1;
  /* Listing only: NBD_OPT_ABORT, never NBD_OPT_GO, so the export never counts us a client. */
  if (ok)
    ok = nbd_opt_list_meta_context(
           h, (nbd_context_callback){ .callback = list_cb, .user_data = names }) != -1;
  if (!ok)
    cbt_backup_nbd_error(error, "NBD_OPT_LIST_META_CONTEXT");
  if (h) {
    if (ok)
      nbd_opt_abort(h);
    nbd_close(h);
  }
  return ok ? g_steal_pointer(&names) : NULL;
}
