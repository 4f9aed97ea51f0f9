/* The server object: schema, handler table, monitors; running a command outside a monitor
 * (the command line) and checking a value against a schema type.
 */
#include "rpc/rpc-private.h"
#include "rpc/schema-data.h"
#include "common/keyval.h"
#include "common/sockets.h"

G_DEFINE_QUARK(cbt - rpc - error - quark, cbt_rpc_error)

gboolean
cbt_rpc_fail(GError **error, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  g_autofree char *msg = g_strdup_vprintf(fmt, ap);
  va_end(ap);
  g_set_error_literal(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, msg);
  return FALSE;
}

const char *
cbt_rpc_error_class_name(CbtRpcErrorClass cls)
{
  switch (cls) {
  case CBT_RPC_ERROR_COMMAND_NOT_FOUND:
    return "CommandNotFound";
  case CBT_RPC_ERROR_DEVICE_NOT_ACTIVE:
    return "DeviceNotActive";
  case CBT_RPC_ERROR_DEVICE_NOT_FOUND:
    return "DeviceNotFound";
  case CBT_RPC_ERROR_GENERIC:
  default:
    return "GenericError";
  }
}

JsonNode *
cbt_json_object_node(JsonObject *obj)
{
  JsonNode *node = json_node_init_object(json_node_alloc(), obj);

  json_object_unref(obj);
  return node;
}

JsonNode *
cbt_rpc_empty_return(void)
{
  return cbt_json_object_node(json_object_new());
}

CbtRpc *
cbt_rpc_new_with_schema(const char *schema_json, GError **error)
{
  CBT_ASSERT_MAIN_THREAD();
  CbtSchema *schema = cbt_schema_load(schema_json, error);

  if (!schema)
    return NULL;
  CbtRpc *rpc = g_new0(CbtRpc, 1);
  rpc->schema = schema;
  rpc->handlers = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
  rpc->context = g_main_context_ref_thread_default();
  g_mutex_init(&rpc->event_lock);
  g_queue_init(&rpc->event_queue);
  rpc->monitors = cbt_rpc_monitors_new(rpc, rpc->context);
  for (gsize i = 0; i < cbt_rpc_n_builtin_commands; i++) {
    if (g_hash_table_contains(schema->commands, cbt_rpc_builtin_commands[i].name))
      cbt_rpc_register(rpc, &cbt_rpc_builtin_commands[i], 1, rpc);
  }
  cbt_rpc_events_attach(rpc);
  return rpc;
}

CbtRpc *
cbt_rpc_new(GError **error)
{
  return cbt_rpc_new_with_schema(cbt_schema_json, error);
}

void
cbt_rpc_free(CbtRpc *rpc)
{
  CBT_ASSERT_MAIN_THREAD();
  if (!rpc)
    return;
  cbt_rpc_events_detach(rpc);
  cbt_rpc_monitors_free(rpc->monitors);
  g_mutex_lock(&rpc->event_lock);
  if (rpc->event_source) {
    g_source_destroy(rpc->event_source);
    g_source_unref(rpc->event_source);
  }
  g_queue_clear_full(&rpc->event_queue, (GDestroyNotify)json_node_unref);
  g_mutex_unlock(&rpc->event_lock);
  g_mutex_clear(&rpc->event_lock);
  g_clear_pointer(&rpc->introspection, json_node_unref);
  g_hash_table_unref(rpc->handlers);
  cbt_schema_free(rpc->schema);
  g_main_context_unref(rpc->context);
  g_free(rpc);
}

void
cbt_rpc_register(CbtRpc *rpc, const CbtRpcCommand *cmds, gsize n, gpointer user_data)
{
  CBT_ASSERT_MAIN_THREAD();
  for (gsize i = 0; i < n; i++) {
    if (!g_hash_table_contains(rpc->schema->commands, cmds[i].name)) {
      g_critical("rpc: command %s is not in the schema; not registered", cmds[i].name);
      continue;
    }
    CbtRpcEntry *e = g_new(CbtRpcEntry, 1);
    e->handler = cmds[i].handler;
    e->user_data = user_data;
    g_hash_table_replace(rpc->handlers, g_strdup(cmds[i].name), e);
  }
}

gboolean
cbt_rpc_check_complete(CbtRpc *rpc, GError **error)
{
  for (guint i = 0; i < rpc->schema->entities->len; i++) {
    CbtSchemaCommand *c = rpc->schema->entities->pdata[i];
    if (!c->is_event && !g_hash_table_contains(rpc->handlers, c->name)) {
      g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC,
                  "Command %s is in the schema but has no handler", c->name);
      return FALSE;
    }
  }
  return TRUE;
}

gboolean
cbt_rpc_listen(CbtRpc *rpc, const CbtQmpSocketAddress *addr, gboolean pretty, GError **error)
{
  CBT_ASSERT_MAIN_THREAD();
  return cbt_rpc_monitors_listen(rpc->monitors, addr, pretty, error);
}

gboolean
cbt_rpc_listen_unix(CbtRpc *rpc, const char *path, gboolean pretty, GError **error)
{
  g_autoptr(CbtQmpSocketAddress) addr = cbt_socket_address_unix(path);

  return cbt_rpc_listen(rpc, addr, pretty, error);
}

void
cbt_rpc_close_all(CbtRpc *rpc)
{
  CBT_ASSERT_MAIN_THREAD();
  cbt_rpc_monitors_close_all(rpc->monitors);
}

static gboolean
flush_timeout(gpointer data)
{
  *(gboolean *)data = TRUE;
  return G_SOURCE_REMOVE;
}

void
cbt_rpc_flush(CbtRpc *rpc, guint timeout_ms)
{
  CBT_ASSERT_MAIN_THREAD();
  gboolean expired = FALSE;
  GSource *timer = g_timeout_source_new(timeout_ms);

  g_source_set_callback(timer, flush_timeout, &expired, NULL);
  g_source_attach(timer, rpc->context);
  while (!expired && (cbt_rpc_events_pending(rpc) || cbt_rpc_monitors_busy(rpc->monitors)))
    g_main_context_iteration(rpc->context, TRUE);
  g_source_destroy(timer);
  g_source_unref(timer);
}

/* ---- outside a monitor --------------------------------------------------------------------- */

JsonNode *
cbt_rpc_execute(CbtRpc *rpc, const char *command, JsonObject *args, gboolean keyval, GError **error)
{
  CbtRpcEntry *entry;
  CbtSchemaCommand *cmd = cbt_rpc_find_command(rpc, command, &entry);
  g_autoptr(JsonNode) args_node = NULL;

  CBT_ASSERT_MAIN_THREAD();
  if (!cmd) {
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_COMMAND_NOT_FOUND,
                "The command %s has not been found", command);
    return NULL;
  }
  if (args)
    args_node = json_node_init_object(json_node_alloc(), args);
  return cbt_rpc_run_command(rpc, cmd, entry, args_node, keyval, error);
}

JsonNode *
cbt_rpc_check_type(CbtRpc *rpc, const char *type_name, JsonNode *value, gboolean keyval,
                   GError **error)
{
  CbtSchemaType *type = cbt_schema_lookup_type(rpc->schema, type_name);

  if (!type) {
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "Unknown schema type %s", type_name);
    return NULL;
  }
  return cbt_schema_check(type, value, keyval, error);
}

/* ---- command-line option values ----------------------------------------------------------- */

JsonObject *
cbt_rpc_option_parse(const char *text, const char *implied_key, gboolean *is_json, GError **error)
{
  const char *p = text;

  while (g_ascii_isspace(*p))
    p++;
  *is_json = *p == '{';
  if (!*is_json)
    return cbt_keyval_parse(text, implied_key, error);
  g_autoptr(JsonNode) root = cbt_rpc_json_parse(text, -1, error);
  if (!root)
    return NULL;
  if (!JSON_NODE_HOLDS_OBJECT(root)) {
    g_set_error_literal(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "Expecting a JSON object");
    return NULL;
  }
  return json_object_ref(json_node_get_object(root));
}
