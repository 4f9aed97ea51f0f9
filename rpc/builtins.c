/* The commands rpc/ answers itself: query-version, query-commands, query-qmp-schema, and
 * qmp_capabilities outside a monitor (inside one, dispatch.c handles it per connection); also
 * the greeting, which shares query-version's shape.
 */
#include "rpc/rpc-private.h"
#include "cbt-config.h"

static JsonNode *
version_info(void)
{
  JsonObject *qemu = json_object_new();
  JsonObject *info = json_object_new();

  /* Schema order, as QEMU inserts them: it decides the order within a QDict bucket. */
  json_object_set_int_member(qemu, "major", CBT_RPC_QEMU_MAJOR);
  json_object_set_int_member(qemu, "minor", CBT_RPC_QEMU_MINOR);
  json_object_set_int_member(qemu, "micro", CBT_RPC_QEMU_MICRO);
  json_object_set_object_member(info, "qemu", qemu);
  json_object_set_string_member(info, "package", CBT_PACKAGE);
  return cbt_json_object_node(info);
}

JsonNode *
cbt_rpc_greeting(void)
{
  JsonObject *qmp = json_object_new();
  JsonObject *greeting = json_object_new();
  JsonArray *caps = json_array_new();

  json_array_add_string_element(caps, "oob");
  json_object_set_member(qmp, "version", version_info());
  json_object_set_array_member(qmp, "capabilities", caps);
  json_object_set_object_member(greeting, "QMP", qmp);
  return cbt_json_object_node(greeting);
}

static JsonNode *
cmd_query_version(JsonObject *args, gpointer user_data, GError **error)
{
  return version_info();
}

static JsonNode *
cmd_query_commands(JsonObject *args, gpointer user_data, GError **error)
{
  CbtRpc *rpc = user_data;
  JsonArray *list = json_array_new();

  for (guint i = 0; i < rpc->schema->entities->len; i++) {
    CbtSchemaCommand *c = rpc->schema->entities->pdata[i];
    if (c->is_event || !g_hash_table_contains(rpc->handlers, c->name))
      continue;
    JsonObject *info = json_object_new();
    json_object_set_string_member(info, "name", c->name);
    json_array_add_object_element(list, info);
  }
  JsonNode *node = json_node_init_array(json_node_alloc(), list);
  json_array_unref(list);
  return node;
}

static JsonNode *
cmd_query_qmp_schema(JsonObject *args, gpointer user_data, GError **error)
{
  CbtRpc *rpc = user_data;

  if (!rpc->introspection)
    rpc->introspection = cbt_introspect_build(rpc->schema);
  return json_node_copy(rpc->introspection);
}

/* Outside a monitor (cbt_rpc_execute) there is nothing to negotiate. */
static JsonNode *
cmd_qmp_capabilities(JsonObject *args, gpointer user_data, GError **error)
{
  return cbt_rpc_empty_return();
}

const CbtRpcCommand cbt_rpc_builtin_commands[] = {
  { CBT_RPC_NEGOTIATION_CMD, cmd_qmp_capabilities },
  { "query-version", cmd_query_version },
  { "query-commands", cmd_query_commands },
  { "query-qmp-schema", cmd_query_qmp_schema },
};

const gsize cbt_rpc_n_builtin_commands = G_N_ELEMENTS(cbt_rpc_builtin_commands);
