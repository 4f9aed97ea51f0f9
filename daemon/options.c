/* The command line, compatible with qemu-storage-daemon's for every option the two share.
 *
 * Options are applied in the order given, each through the same QMP handler a management layer
 * would call (blockdev-add, nbd-server-start, block-export-add), so the command line and the
 * RPC cannot drift apart.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cbt-config.h"
#include "common/sockets.h"
#include "daemon/cbtd.h"
#include "nbd/nbd.h"
#include "schemas/qmp-types.h"

enum {
  OPT_BLOCKDEV = 256,
  OPT_CHARDEV,
  OPT_DAEMONIZE,
  OPT_EXPORT,
  OPT_MONITOR,
  OPT_NBD_SERVER,
  OPT_OBJECT,
  OPT_PIDFILE,
  OPT_QMP,
  OPT_SOCKET_MODE,
  OPT_STATE_DIR,
};

static const struct option long_options[] = {
  { "blockdev", required_argument, NULL, OPT_BLOCKDEV },
  { "chardev", required_argument, NULL, OPT_CHARDEV },
  { "daemonize", no_argument, NULL, OPT_DAEMONIZE },
  { "export", required_argument, NULL, OPT_EXPORT },
  { "help", no_argument, NULL, 'h' },
  { "monitor", required_argument, NULL, OPT_MONITOR },
  { "nbd-server", required_argument, NULL, OPT_NBD_SERVER },
  { "object", required_argument, NULL, OPT_OBJECT },
  { "pidfile", required_argument, NULL, OPT_PIDFILE },
  { "qmp", required_argument, NULL, OPT_QMP },
  { "socket-mode", required_argument, NULL, OPT_SOCKET_MODE },
  { "state-dir", required_argument, NULL, OPT_STATE_DIR },
  { "trace", required_argument, NULL, 'T' },
  { "version", no_argument, NULL, 'V' },
  { NULL, 0, NULL, 0 },
};
static const char short_options[] = "-hT:V";

static void
print_help(void)
{
  printf("Usage: cbtd [options]\n"
         "cbtd " CBT_VERSION ": changed-block-tracking storage daemon\n"
         "\n"
         "  -h, --help             display this help and exit\n"
         "  -V, --version          output version information and exit\n"
         "\n"
         "  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]\n"
         "             [,read-only=on|off][,<driver options>]\n"
         "                         add a block node (same members as blockdev-add; JSON too)\n"
         "  --chardev socket,id=<id>,path=<path>,server=on,wait=off\n"
         "                         a listening unix socket for --monitor\n"
         "  --monitor [chardev=]<id>[,mode=control][,pretty=on|off]\n"
         "                         serve QMP on that chardev\n"
         "  --nbd-server addr.type=unix,addr.path=<path>\n"
         "  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>\n"
         "             [,max-connections=<n>]\n"
         "                         start the NBD server (as nbd-server-start)\n"
         "  --export [type=]nbd,id=<id>,node-name=<node>[,name=<export-name>]\n"
         "           [,description=<text>][,writable=on|off][,bitmaps.0=<name>...]\n"
         "           [,allocation-depth=on|off]\n"
         "                         export a node over NBD (as block-export-add)\n"
         "  --pidfile <path>       write and lock a PID file once started\n"
         "  --daemonize            run in the background once started\n"
         "\n"
         "cbtd's own shorthands:\n"
         "  --qmp <path>           serve QMP on a unix socket at <path>\n"
         "  --socket-mode <octal>  mode of the unix sockets cbtd creates (default 0600; must\n"
         "                         keep read and write for the owner, e.g. 0660 for a group)\n"
         "  --state-dir <dir>      the embedded default: a sparse 10 GiB disk 'disk0' in <dir>,\n"
         "                         QMP at <dir>/qmp.sock, NBD at <dir>/nbd.sock\n"
         "\n"
         "Options are applied in order. systemd socket activation (LISTEN_FDS) serves NBD on\n"
         "the inherited socket.\n");
}

static gboolean
set_socket_mode(const char *text)
{
  char *end = NULL;
  guint64 mode = g_ascii_strtoull(text, &end, 8);

  if (!*text || *end || mode > 0777 || (mode & 0600) != 0600) {
    fprintf(stderr,
            "cbtd: --socket-mode '%s': expected an octal mode up to 0777 that keeps read and "
            "write for the owner (such as 0600 or 0660)\n",
            text);
    return FALSE;
  }
  cbt_socket_set_unix_mode((guint)mode);
  return TRUE;
}

int
cbtd_options_early(int argc, char **argv, CbtdEarlyOptions *early)
{
  int c;

  opterr = 0;
  optind = 0;
  while ((c = getopt_long(argc, argv, short_options, long_options, NULL)) != -1) {
    switch (c) {
    case 'h':
      print_help();
      return EXIT_SUCCESS;
    case 'V':
      printf("cbtd version %s (QMP surface of qemu-storage-daemon %d.%d)\n", CBT_VERSION,
             CBT_RPC_QEMU_MAJOR, CBT_RPC_QEMU_MINOR);
      return EXIT_SUCCESS;
    case OPT_DAEMONIZE:
      early->daemonize = TRUE;
      break;
    case OPT_PIDFILE:
      g_free(early->pidfile);
      early->pidfile = g_strdup(optarg);
      break;
    case OPT_SOCKET_MODE:
      if (!set_socket_mode(optarg))
        return EXIT_FAILURE;
      break;
    case OPT_STATE_DIR:
      g_free(early->state_dir);
      early->state_dir = g_canonicalize_filename(optarg, NULL);
      break;
    case '?':
      if (optopt && optopt < 256 && strchr("T", optopt))
        fprintf(stderr, "cbtd: option requires an argument -- '%c'\n", optopt);
      else if (optopt && optopt < 256)
        fprintf(stderr, "cbtd: invalid option -- '%c'\n", optopt);
      else if (optopt)
        fprintf(stderr, "cbtd: option '%s' requires an argument\n", argv[optind - 1]);
      else
        fprintf(stderr, "cbtd: unrecognized option '%s'\n", argv[optind - 1]);
      return EXIT_FAILURE;
    default:
      break;
    }
  }
  return -1;
}

static GHashTable *chardevs; /* id -> socket path */

static gboolean
apply_chardev(JsonObject *o, GError **error)
{
  const char *backend = json_object_get_string_member_with_default(o, "backend", NULL);
  const char *id = json_object_get_string_member_with_default(o, "id", NULL);
  const char *path = json_object_get_string_member_with_default(o, "path", NULL);
  const char *server = json_object_get_string_member_with_default(o, "server", "off");

  if (!backend || strcmp(backend, "socket") != 0) {
    g_set_error(error, CBTD_ERROR, 0, "chardev backend '%s' is not supported (only socket)",
                backend ? backend : "");
    return FALSE;
  }
  if (!id) {
    g_set_error_literal(error, CBTD_ERROR, 0, "Parameter 'id' is missing");
    return FALSE;
  }
  if (!path) {
    g_set_error_literal(error, CBTD_ERROR, 0, "only unix socket chardevs (path=...) are supported");
    return FALSE;
  }
  if (strcmp(server, "on") != 0) {
    g_set_error(error, CBTD_ERROR, 0,
                "Failed to connect to '%s': only server=on sockets "
                "are supported",
                path);
    return FALSE;
  }
  if (g_hash_table_contains(chardevs, id)) {
    g_set_error(error, CBTD_ERROR, 0,
                "attempt to add duplicate property '%s' to object "
                "(type 'container')",
                id);
    return FALSE;
  }
  g_hash_table_insert(chardevs, g_strdup(id), g_strdup(path));
  return TRUE;
}

static gboolean
apply_monitor(CbtRpc *rpc, JsonObject *o, GError **error)
{
  const char *id = json_object_get_string_member_with_default(o, "chardev", NULL);
  const char *mode = json_object_get_string_member_with_default(o, "mode", "control");
  const char *pretty = json_object_get_string_member_with_default(o, "pretty", "off");

  if (!id) {
    g_set_error_literal(error, CBTD_ERROR, 0, "Parameter 'chardev' is missing");
    return FALSE;
  }
  if (strcmp(mode, "control") != 0) {
    g_set_error(error, CBTD_ERROR, 0, "Parameter 'mode' does not accept value '%s'", mode);
    return FALSE;
  }
  if (strcmp(pretty, "on") != 0 && strcmp(pretty, "off") != 0) {
    g_set_error_literal(error, CBTD_ERROR, 0, "Parameter 'pretty' expects 'on' or 'off'");
    return FALSE;
  }
  const char *path = g_hash_table_lookup(chardevs, id);
  if (!path) {
    g_set_error(error, CBTD_ERROR, 0, "chardev \"%s\" not found", id);
    return FALSE;
  }
  return cbt_rpc_listen_unix(rpc, path, strcmp(pretty, "on") == 0, error);
}

/* --nbd-server takes the flat SocketAddress (nbd-server-start the legacy {type, data}). */
static gboolean
apply_nbd_server(CbtRpc *rpc, JsonObject *o, gboolean keyval, GError **error)
{
  g_autoptr(JsonNode) in = json_node_init_object(json_node_alloc(), o);
  g_autoptr(JsonNode) checked = cbt_rpc_check_type(rpc, "NbdServerOptions", in, keyval, error);
  if (!checked)
    return FALSE;
  g_autoptr(CbtQmpNbdServerOptions) opts = cbt_qmp_nbd_server_options_decode(checked, error);
  return opts && cbt_nbd_server_start_options(opts, error);
}

static gboolean
run_command(CbtRpc *rpc, const char *command, JsonObject *args, gboolean keyval, GError **error)
{
  g_autoptr(JsonNode) ret = cbt_rpc_execute(rpc, command, args, keyval, error);
  return ret != NULL;
}

static gboolean
apply_one(CbtRpc *rpc, int c, const char *arg, GError **error)
{
  static const char *const implied[] = {
    [OPT_BLOCKDEV - OPT_BLOCKDEV] = "driver", [OPT_CHARDEV - OPT_BLOCKDEV] = "backend",
    [OPT_EXPORT - OPT_BLOCKDEV] = "type",     [OPT_MONITOR - OPT_BLOCKDEV] = "chardev",
    [OPT_OBJECT - OPT_BLOCKDEV] = "qom-type",
  };
  gboolean is_json = FALSE;
  g_autoptr(JsonObject) o = NULL;

  switch (c) {
  case OPT_QMP:
    return cbt_rpc_listen_unix(rpc, arg, FALSE, error);
  case OPT_STATE_DIR:
    return cbtd_state_dir_setup(rpc, arg, error);
  case OPT_DAEMONIZE:
  case OPT_PIDFILE:
  case OPT_SOCKET_MODE:
    return TRUE; /* handled early */
  case 'T':
    g_set_error_literal(error, CBTD_ERROR, 0,
                        "tracing is not supported; use the logs on "
                        "stderr");
    return FALSE;
  case 1:
    g_set_error(error, CBTD_ERROR, 0, "%s: Unexpected argument", arg);
    return FALSE;
  default:
    break;
  }

  o = cbt_rpc_option_parse(arg, implied[c - OPT_BLOCKDEV], &is_json, error);
  if (!o)
    return FALSE;
  switch (c) {
  case OPT_BLOCKDEV:
    return run_command(rpc, "blockdev-add", o, !is_json, error);
  case OPT_EXPORT:
    return run_command(rpc, "block-export-add", o, !is_json, error);
  case OPT_NBD_SERVER:
    return apply_nbd_server(rpc, o, !is_json, error);
  case OPT_CHARDEV:
    return apply_chardev(o, error);
  case OPT_MONITOR:
    return apply_monitor(rpc, o, error);
  case OPT_OBJECT:
    return run_command(rpc, "object-add", o, !is_json, error);
  default:
    g_assert_not_reached();
  }
}

gboolean
cbtd_options_apply(CbtRpc *rpc, int argc, char **argv, GError **error)
{
  int c, idx = -1;

  if (!chardevs)
    chardevs = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
  opterr = 0;
  optind = 0;
  while ((c = getopt_long(argc, argv, short_options, long_options, &idx)) != -1) {
    g_autoptr(GError) local = NULL;
    if (apply_one(rpc, c, optarg, &local)) {
      idx = -1;
      continue;
    }
    if (c == 1)
      g_propagate_error(error, g_steal_pointer(&local));
    else if (idx >= 0)
      g_set_error(error, CBTD_ERROR, 0, "--%s %s: %s", long_options[idx].name, optarg,
                  local->message);
    else
      g_set_error(error, CBTD_ERROR, 0, "-%c %s: %s", c, optarg, local->message);
    return FALSE;
  }
  return TRUE;
}
