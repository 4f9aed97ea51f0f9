/* cbtctl: send one QMP command to cbtd (or any QMP server) and print the reply.
 *
 *   cbtctl [--qmp PATH] [--json] COMMAND [key=value ...]
 *   cbtctl [--qmp PATH] [--json] COMMAND '{"json": "arguments"}'
 *
 * key=value arguments use the command-line syntax of the daemon (dotted keys nest, list.0=x
 * builds arrays); a value that reads as a JSON number, true, false or null is sent as that,
 * anything else as a string (use the JSON form to send a numeric-looking string).
 * Exit status: 0 on a "return", 1 on an "error" reply, 2 on usage or connection failure.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/keyval.h"
#include "rpc/rpc.h"

typedef struct {
  int fd;
  GString *buf;
} Conn;

static gboolean
conn_open(Conn *c, const char *path, GError **error)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  if (strlen(path) >= sizeof(sa.sun_path)) {
    g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT, "socket path too long: %s",
                path);
    return FALSE;
  }
  strcpy(sa.sun_path, path);
  c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
    g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno), "cannot connect to %s: %s",
                path, g_strerror(errno));
    return FALSE;
  }
  c->buf = g_string_new(NULL);
  return TRUE;
}

/* The next message: one JSON object per line. */
static JsonNode *
conn_read(Conn *c, GError **error)
{
  for (;;) {
    char *nl = memchr(c->buf->str, '\n', c->buf->len);
    if (nl) {
      gsize len = nl - c->buf->str + 1;
      g_autofree char *line = g_strndup(c->buf->str, len);
      g_string_erase(c->buf, 0, len);
      g_autoptr(JsonParser) p = json_parser_new();
      if (!json_parser_load_from_data(p, line, -1, error))
        return NULL;
      return json_node_copy(json_parser_get_root(p));
    }
    char tmp[65536];
    ssize_t n = read(c->fd, tmp, sizeof(tmp));
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0) {
      g_set_error_literal(error, G_IO_ERROR, G_IO_ERROR_CONNECTION_CLOSED,
                          "connection closed by the server");
      return NULL;
    }
    g_string_append_len(c->buf, tmp, n);
  }
}

static gboolean
conn_write(Conn *c, const char *text, GError **error)
{
  gsize len = strlen(text), done = 0;
  while (done < len) {
    ssize_t n = write(c->fd, text + done, len - done);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0) {
      g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno), "write: %s",
                  g_strerror(errno));
      return FALSE;
    }
    done += n;
  }
  return TRUE;
}

/* Send @request and return the reply (events before it are skipped). */
static JsonNode *
conn_call(Conn *c, JsonNode *request, GError **error)
{
  g_autofree char *text = json_to_string(request, FALSE);
  g_autofree char *line = g_strconcat(text, "\n", NULL);
  if (!conn_write(c, line, error))
    return NULL;
  for (;;) {
    g_autoptr(JsonNode) msg = conn_read(c, error);
    if (!msg)
      return NULL;
    if (JSON_NODE_HOLDS_OBJECT(msg) && !json_object_has_member(json_node_get_object(msg),
                                                                "event"))
      return g_steal_pointer(&msg);
  }
}

/* Give keyval's string leaves the JSON type they spell. */
static JsonNode *
typed_leaves(JsonNode *node)
{
  if (JSON_NODE_HOLDS_OBJECT(node)) {
    JsonObject *o = json_node_get_object(node);
    g_autoptr(GList) members = json_object_get_members(o);
    for (GList *l = members; l; l = l->next)
      json_object_set_member(o, l->data, typed_leaves(json_object_get_member(o, l->data)));
    return json_node_ref(node);
  }
  if (JSON_NODE_HOLDS_ARRAY(node)) {
    JsonArray *a = json_node_get_array(node);
    g_autoptr(JsonArray) out = json_array_new();
    for (guint i = 0; i < json_array_get_length(a); i++)
      json_array_add_element(out, typed_leaves(json_array_get_element(a, i)));
    return json_node_init_array(json_node_alloc(), out);
  }
  const char *s = json_node_get_string(node);
  if (s) {
    g_autoptr(JsonParser) p = json_parser_new();
    if (json_parser_load_from_data(p, s, -1, NULL)) {
      JsonNode *root = json_parser_get_root(p);
      if (root && (JSON_NODE_HOLDS_NULL(root) ||
                   (JSON_NODE_HOLDS_VALUE(root) &&
                    json_node_get_value_type(root) != G_TYPE_STRING)))
        return json_node_copy(root);
    }
  }
  return json_node_ref(node);
}

static JsonObject *
parse_arguments(int argc, char **argv, GError **error)
{
  gboolean is_json;
  if (argc == 1 && argv[0][0] == '{')
    return cbt_rpc_option_parse(argv[0], NULL, &is_json, error);
  g_autoptr(GString) s = g_string_new(NULL);
  for (int i = 0; i < argc; i++) {
    if (i)
      g_string_append_c(s, ',');
    for (const char *p = argv[i]; *p; p++) {
      if (*p == ',')
        g_string_append_c(s, ','); /* a comma inside one argument is literal */
      g_string_append_c(s, *p);
    }
  }
  JsonObject *o = cbt_keyval_parse(s->str, NULL, error);
  if (!o)
    return NULL;
  g_autoptr(JsonNode) n = json_node_init_object(json_node_alloc(), o);
  json_object_unref(o);
  g_autoptr(JsonNode) typed = typed_leaves(n);
  return json_object_ref(json_node_get_object(typed));
}

static void
usage(FILE *f)
{
  fprintf(f, "Usage: cbtctl [--qmp PATH] [--json] COMMAND [key=value ...|JSON-OBJECT]\n"
             "Send one QMP command and print the reply (pretty; raw with --json).\n"
             "PATH defaults to $CBTD_QMP, then var/qmp.sock.\n");
}

int
main(int argc, char **argv)
{
  const char *path = g_getenv("CBTD_QMP") ? g_getenv("CBTD_QMP") : "var/qmp.sock";
  gboolean raw = FALSE;
  g_autoptr(GError) error = NULL;
  int i = 1;

  for (; i < argc && argv[i][0] == '-'; i++) {
    if (!strcmp(argv[i], "--qmp") && i + 1 < argc)
      path = argv[++i];
    else if (!strncmp(argv[i], "--qmp=", 6))
      path = argv[i] + 6;
    else if (!strcmp(argv[i], "--json"))
      raw = TRUE;
    else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
      usage(stdout);
      return 0;
    } else {
      fprintf(stderr, "cbtctl: unknown option '%s'\n", argv[i]);
      usage(stderr);
      return 2;
    }
  }
  if (i >= argc) {
    usage(stderr);
    return 2;
  }
  const char *command = argv[i++];
  g_autoptr(JsonObject) args = i < argc ? parse_arguments(argc - i, argv + i, &error) : NULL;
  if (i < argc && !args) {
    fprintf(stderr, "cbtctl: %s\n", error->message);
    return 2;
  }

  Conn c = { -1, NULL };
  g_autoptr(JsonNode) greeting = NULL, caps = NULL, reply = NULL;
  g_autoptr(JsonObject) neg = json_object_new();
  g_autoptr(JsonObject) req = json_object_new();
  json_object_set_string_member(neg, "execute", "qmp_capabilities");
  json_object_set_string_member(req, "execute", command);
  if (args)
    json_object_set_object_member(req, "arguments", json_object_ref(args));
  g_autoptr(JsonNode) neg_node = json_node_init_object(json_node_alloc(), neg);
  g_autoptr(JsonNode) req_node = json_node_init_object(json_node_alloc(), req);

  if (!conn_open(&c, path, &error) || !(greeting = conn_read(&c, &error)) ||
      !(caps = conn_call(&c, neg_node, &error)) || !(reply = conn_call(&c, req_node, &error))) {
    fprintf(stderr, "cbtctl: %s\n", error->message);
    return 2;
  }
  close(c.fd);
  g_string_free(c.buf, TRUE);

  JsonObject *r = json_node_get_object(reply);
  if (json_object_has_member(r, "error")) {
    JsonObject *e = json_object_get_object_member(r, "error");
    if (raw) {
      g_autofree char *text = json_to_string(reply, FALSE);
      printf("%s\n", text);
    } else {
      fprintf(stderr, "cbtctl: %s: %s\n",
              json_object_get_string_member_with_default(e, "class", "GenericError"),
              json_object_get_string_member_with_default(e, "desc", ""));
    }
    return 1;
  }
  JsonNode *ret = json_object_get_member(r, "return");
  g_autofree char *text = json_to_string(raw ? reply : ret, !raw);
  printf("%s\n", text);
  return 0;
}
