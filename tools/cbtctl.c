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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/keyval.h"
#include "common/qmp-client.h"
#include "rpc/rpc.h"

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
      if (root && (JSON_NODE_HOLDS_NULL(root) || (JSON_NODE_HOLDS_VALUE(root) &&
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

  g_autoptr(CbtQmpClient) c = cbt_qmp_client_connect_unix(path, TRUE, 0, &error);
  g_autoptr(JsonObject) req = json_object_new();
  g_autoptr(JsonObject) r = NULL;

  json_object_set_string_member(req, "execute", command);
  if (args)
    json_object_set_object_member(req, "arguments", json_object_ref(args));
  if (!c || !(r = cbt_qmp_client_request(c, req, &error))) {
    fprintf(stderr, "cbtctl: %s\n", error->message);
    return 2;
  }
  g_autoptr(JsonNode) reply = json_node_init_object(json_node_alloc(), r);

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
