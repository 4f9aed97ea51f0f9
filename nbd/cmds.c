/* nbd/cmds.c — nbd-server-start/-stop, block-export-add/-del, query-block-exports and the
 * deprecated nbd-server-add/-remove, with qemu-storage-daemon 7.2's error texts.
 *
 * Arguments were validated against schemas/block-export.json before a handler runs.
 */
#include "nbd/nbd-internal.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static char *unix_path; /* socket file to unlink when the server stops */

static const char *
opt_str(JsonObject *o, const char *name)
{
  return json_object_has_member(o, name) ? json_object_get_string_member(o, name) : NULL;
}

static gboolean
opt_bool(JsonObject *o, const char *name, gboolean def)
{
  return json_object_has_member(o, name) ? json_object_get_boolean_member(o, name) : def;
}

static gboolean fail(GError **error, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

static gboolean
fail(GError **error, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  g_autofree char *msg = g_strdup_vprintf(fmt, ap);
  va_end(ap);
  g_set_error_literal(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, msg);
  return FALSE;
}

static int fail_fd(GError **error, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

/* The same, for functions returning a file descriptor. */
static int
fail_fd(GError **error, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  g_autofree char *msg = g_strdup_vprintf(fmt, ap);
  va_end(ap);
  g_set_error_literal(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, msg);
  return -1;
}

/* --- listening sockets --------------------------------------------------------------------- */

static int
listen_unix(JsonObject *a, GError **error)
{
  const char *path = json_object_get_string_member(a, "path");
  gboolean abstract = opt_bool(a, "abstract", FALSE), tight = opt_bool(a, "tight", TRUE);
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  gsize plen = strlen(path), off = abstract ? 1 : 0;

  if (plen + off >= sizeof sun.sun_path)
    return fail_fd(error, "UNIX socket path '%s' is too long", path);
  memcpy(sun.sun_path + off, path, plen);
  socklen_t slen
      = abstract && tight ? offsetof(struct sockaddr_un, sun_path) + 1 + plen : sizeof sun;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return fail_fd(error, "Failed to create socket: %s", g_strerror(errno));
  struct stat st;
  /* Replace a stale socket, never another kind of file. */
  if (!abstract && lstat(path, &st) == 0 && S_ISSOCK(st.st_mode) && unlink(path) < 0) {
    fail(error, "Failed to unlink socket %s: %s", path, g_strerror(errno));
    close(fd);
    return -1;
  }
  if (bind(fd, (struct sockaddr *)&sun, slen) < 0) {
    fail(error, "Failed to bind socket to %s: %s", path, g_strerror(errno));
    close(fd);
    return -1;
  }
  if (listen(fd, SOMAXCONN) < 0) {
    fail(error, "Failed to listen on socket: %s", g_strerror(errno));
    close(fd);
    return -1;
  }
  if (!abstract) {
    g_free(unix_path);
    unix_path = g_strdup(path);
  }
  return fd;
}

static int
bind_addrinfo(struct addrinfo *res, GError **error)
{
  int saved = 0, one = 1;

  for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      saved = errno;
      continue;
    }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, SOMAXCONN) == 0)
      return fd;
    saved = errno;
    close(fd);
  }
  return fail_fd(error, "Failed to bind socket: %s", g_strerror(saved));
}

static int
listen_inet(JsonObject *a, GError **error)
{
  const char *host = json_object_get_string_member(a, "host");
  const char *port = json_object_get_string_member(a, "port");
  struct addrinfo hints = { .ai_flags = AI_PASSIVE, .ai_socktype = SOCK_STREAM };
  struct addrinfo *res = NULL;
  gboolean v4 = opt_bool(a, "ipv4", FALSE), v6 = opt_bool(a, "ipv6", FALSE);

  if (v4 && !v6)
    hints.ai_family = AF_INET;
  else if (v6 && !v4)
    hints.ai_family = AF_INET6;
  if (opt_bool(a, "numeric", FALSE))
    hints.ai_flags |= AI_NUMERICHOST;
  int rc = getaddrinfo(*host ? host : NULL, port, &hints, &res);
  if (rc != 0)
    return fail_fd(error, "address resolution failed for %s:%s: %s", host, port, gai_strerror(rc));
  int fd = bind_addrinfo(res, error);
  freeaddrinfo(res);
  return fd;
}

static int
listen_vsock(JsonObject *a, GError **error)
{
  const char *cid = json_object_get_string_member(a, "cid");
  const char *port = json_object_get_string_member(a, "port");
  guint64 c, p;
  struct sockaddr_vm svm = { .svm_family = AF_VSOCK };

  if (!g_ascii_string_to_unsigned(cid, 10, 0, G_MAXUINT32, &c, NULL))
    return fail_fd(error, "Invalid CID '%s'", cid);
  if (!g_ascii_string_to_unsigned(port, 10, 0, G_MAXUINT32, &p, NULL))
    return fail_fd(error, "Invalid port '%s'", port);
  svm.svm_cid = c;
  svm.svm_port = p;
  int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return fail_fd(error, "Failed to create socket: %s", g_strerror(errno));
  if (bind(fd, (struct sockaddr *)&svm, sizeof svm) < 0 || listen(fd, SOMAXCONN) < 0) {
    fail(error, "Failed to bind socket: %s", g_strerror(errno));
    close(fd);
    return -1;
  }
  return fd;
}

/* A decimal descriptor of a listening stream socket (command line only). */
static int
listen_fd_number(const char *str, GError **error)
{
  guint64 n;
  int type = 0, acc = 0;
  socklen_t l1 = sizeof type, l2 = sizeof acc;

  if (!g_ascii_string_to_unsigned(str, 10, 0, G_MAXINT, &n, NULL))
    return fail_fd(error, "Invalid file descriptor number '%s'", str);
  if (getsockopt((int)n, SOL_SOCKET, SO_TYPE, &type, &l1) < 0 || type != SOCK_STREAM
      || getsockopt((int)n, SOL_SOCKET, SO_ACCEPTCONN, &acc, &l2) < 0 || !acc)
    return fail_fd(error, "File descriptor %s is not a listening stream socket", str);
  return (int)n;
}

/* @addr: the flat SocketAddress members. @cli: fd numbers are allowed. */
static gboolean
server_start(const char *type, JsonObject *addr, JsonObject *args, gboolean cli, GError **error)
{
  const char *creds = opt_str(args, "tls-creds");
  guint32 max = json_object_has_member(args, "max-connections")
                    ? (guint32)json_object_get_int_member(args, "max-connections")
                    : 0;
  int fd = -1;

  if (cbt_nbd_server_running())
    return fail(error, "NBD server already running");
  if (creds)
    return fail(error, "No TLS credentials with id '%s'", creds);
  if (strcmp(type, "unix") == 0)
    fd = listen_unix(addr, error);
  else if (strcmp(type, "inet") == 0)
    fd = listen_inet(addr, error);
  else if (strcmp(type, "vsock") == 0)
    fd = listen_vsock(addr, error);
  else if (cli)
    fd = listen_fd_number(json_object_get_string_member(addr, "str"), error);
  else
    return fail(error, "only QEMU supports file descriptor passing");
  if (fd < 0)
    return FALSE;
  return cbt_nbd_server_listen(type, fd, strcmp(type, "inet") == 0, max, error);
}

gboolean
cbt_nbd_server_start_options(JsonObject *opts, GError **error)
{
  JsonObject *addr = json_object_get_object_member(opts, "addr");
  return server_start(json_object_get_string_member(addr, "type"), addr, opts, TRUE, error);
}

gboolean
cbt_nbd_server_start_fd(int listen_fd, GError **error)
{
  if (cbt_nbd_server_running())
    return fail(error, "NBD server already running");
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;
  gboolean inet = getsockname(listen_fd, (struct sockaddr *)&ss, &sl) == 0
                  && (ss.ss_family == AF_INET || ss.ss_family == AF_INET6);
  return cbt_nbd_server_listen("socket activation", listen_fd, inet, 0, error);
}

static void
server_stop(gboolean wait)
{
  cbt_nbd_server_stop_listening();
  cbt_nbd_export_shutdown_all(wait);
  if (unix_path) {
    unlink(unix_path);
    g_clear_pointer(&unix_path, g_free);
  }
}

void
cbt_nbd_shutdown(void)
{
  server_stop(TRUE);
}

/* --- handlers ------------------------------------------------------------------------------ */

static JsonNode *
cmd_nbd_server_start(JsonObject *args, gpointer user_data, GError **error)
{
  JsonObject *addr = json_object_get_object_member(args, "addr");
  const char *type = json_object_get_string_member(addr, "type");
  JsonObject *data = json_object_get_object_member(addr, "data");

  if (!server_start(type, data, args, FALSE, error))
    return NULL;
  return cbt_rpc_empty_return();
}

static JsonNode *
cmd_nbd_server_stop(JsonObject *args, gpointer user_data, GError **error)
{
  if (!cbt_nbd_server_running()) {
    fail(error, "NBD server not running");
    return NULL;
  }
  server_stop(FALSE);
  return cbt_rpc_empty_return();
}

/* The bitmaps list: strings, or {node, name} objects. Points into @args. */
static GArray *
parse_bitmaps(JsonObject *args)
{
  GArray *out = g_array_new(FALSE, TRUE, sizeof(CbtNbdBitmapRef));
  JsonArray *list = json_object_has_member(args, "bitmaps")
                        ? json_object_get_array_member(args, "bitmaps")
                        : NULL;

  for (guint i = 0; list && i < json_array_get_length(list); i++) {
    JsonNode *n = json_array_get_element(list, i);
    CbtNbdBitmapRef ref = { 0 };
    if (JSON_NODE_HOLDS_OBJECT(n)) {
      JsonObject *o = json_node_get_object(n);
      ref.node = json_object_get_string_member(o, "node");
      ref.name = json_object_get_string_member(o, "name");
    } else {
      ref.name = json_node_get_string(n);
    }
    g_array_append_val(out, ref);
  }
  return out;
}

static JsonNode *
cmd_block_export_add(JsonObject *args, gpointer user_data, GError **error)
{
  const char *type = json_object_get_string_member(args, "type");

  if (strcmp(type, "nbd") != 0) {
    fail(error, "Export type '%s' is not supported by cbtd", type);
    return NULL;
  }
  g_autoptr(GArray) bitmaps = parse_bitmaps(args);
  CbtNbdExportOptions o = {
    .id = json_object_get_string_member(args, "id"),
    .node_name = json_object_get_string_member(args, "node-name"),
    .name = opt_str(args, "name"),
    .description = opt_str(args, "description"),
    .writable = opt_bool(args, "writable", FALSE),
    .writethrough = opt_bool(args, "writethrough", FALSE),
    .allocation_depth = opt_bool(args, "allocation-depth", FALSE),
    .iothread = opt_str(args, "iothread"),
    .bitmaps = (const CbtNbdBitmapRef *)bitmaps->data,
    .n_bitmaps = bitmaps->len,
  };
  if (!cbt_nbd_export_add(&o, error))
    return NULL;
  return cbt_rpc_empty_return();
}

static gboolean
hard_mode(JsonObject *args)
{
  const char *mode = opt_str(args, "mode");
  return mode && strcmp(mode, "hard") == 0;
}

static JsonNode *
cmd_block_export_del(JsonObject *args, gpointer user_data, GError **error)
{
  if (!cbt_nbd_export_del(json_object_get_string_member(args, "id"), hard_mode(args), error))
    return NULL;
  return cbt_rpc_empty_return();
}

static JsonNode *
cmd_query_block_exports(JsonObject *args, gpointer user_data, GError **error)
{
  g_autoptr(GPtrArray) list = cbt_nbd_export_query();
  JsonArray *arr = json_array_new();

  for (guint i = 0; i < list->len; i++) {
    CbtNbdExport *exp = g_ptr_array_index(list, i);
    JsonObject *o = json_object_new();
    pthread_mutex_lock(&cbt_nbd_lock);
    gboolean down = exp->shutting_down;
    pthread_mutex_unlock(&cbt_nbd_lock);
    json_object_set_string_member(o, "id", exp->id);
    json_object_set_string_member(o, "type", "nbd");
    json_object_set_string_member(o, "node-name", cbt_blockdev_get_node_name(exp->bd));
    json_object_set_boolean_member(o, "shutting-down", down);
    json_array_add_object_element(arr, o);
  }
  return json_node_init_array(json_node_alloc(), arr);
}

static JsonNode *
cmd_nbd_server_add(JsonObject *args, gpointer user_data, GError **error)
{
  const char *device = json_object_get_string_member(args, "device");
  const char *name = opt_str(args, "name");
  const char *bitmap = opt_str(args, "bitmap");
  CbtNbdBitmapRef ref = { .name = bitmap };

  /* qsd resolves the legacy "device" (a node name here) before anything else. */
  if (!cbt_blockdev_find(device)) {
    fail(error, "Cannot find device='%s' nor node-name='%s'", device, device);
    return NULL;
  }
  CbtNbdExportOptions o = {
    .id = name ? name : device,
    .node_name = device,
    .name = name,
    .description = opt_str(args, "description"),
    .writable = opt_bool(args, "writable", FALSE),
    .bitmaps = bitmap ? &ref : NULL,
    .n_bitmaps = bitmap ? 1 : 0,
  };
  if (!cbt_nbd_export_add(&o, error))
    return NULL;
  return cbt_rpc_empty_return();
}

static JsonNode *
cmd_nbd_server_remove(JsonObject *args, gpointer user_data, GError **error)
{
  if (!cbt_nbd_export_del(json_object_get_string_member(args, "name"), hard_mode(args), error))
    return NULL;
  return cbt_rpc_empty_return();
}

static const CbtRpcCommand nbd_commands[] = {
  { "nbd-server-start", cmd_nbd_server_start },       { "nbd-server-stop", cmd_nbd_server_stop },
  { "block-export-add", cmd_block_export_add },       { "block-export-del", cmd_block_export_del },
  { "query-block-exports", cmd_query_block_exports }, { "nbd-server-add", cmd_nbd_server_add },
  { "nbd-server-remove", cmd_nbd_server_remove },
};

void
cbt_nbd_register_commands(CbtRpc *rpc)
{
  cbt_nbd_export_set_rpc(rpc);
  cbt_rpc_register(rpc, nbd_commands, G_N_ELEMENTS(nbd_commands), NULL);
}
