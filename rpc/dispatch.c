/* QMP request dispatch: the envelope checks of a request, capability negotiation, schema
 * validation of the arguments, the handler call and the reply, with QEMU's texts and error
 * classes.
 */
#include "rpc/rpc-private.h"

/* ---- running a command -------------------------------------------------------------------- */

CbtSchemaCommand *
cbt_rpc_find_command(CbtRpc *rpc, const char *name, CbtRpcEntry **entry)
{
  CbtSchemaCommand *cmd = g_hash_table_lookup(rpc->schema->commands, name);

  *entry = g_hash_table_lookup(rpc->handlers, name);
  return cmd && *entry ? cmd : NULL;
}

JsonNode *
cbt_rpc_run_command(CbtRpc *rpc, CbtSchemaCommand *cmd, CbtRpcEntry *entry, JsonNode *args,
                    gboolean keyval, GError **error)
{
  g_autoptr(JsonNode) checked =
    cbt_schema_check(cmd->args ? cmd->args : rpc->schema->empty, args, keyval, error);
  GError *err = NULL;

  if (!checked)
    return NULL;
  JsonNode *ret = entry->handler(json_node_get_object(checked), entry->user_data, &err);
  if (!ret && !err)
    err = g_error_new(CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "Command %s failed", cmd->name);
  if (err) {
    g_clear_pointer(&ret, json_node_unref);
    g_propagate_error(error, err);
  }
  return ret;
}

/* ---- QMP requests ------------------------------------------------------------------------- */

JsonNode *
cbt_rpc_error_reply(const GError *error, JsonNode *id)
{
  JsonObject *reply = json_object_new();
  JsonObject *err = json_object_new();
  CbtRpcErrorClass cls = error->domain == CBT_RPC_ERROR ? error->code : CBT_RPC_ERROR_GENERIC;

  /* QEMU happens to print the id first in errors and last in successes. */
  if (id)
    json_object_set_member(reply, "id", json_node_copy(id));
  json_object_set_string_member(err, "class", cbt_rpc_error_class_name(cls));
  json_object_set_string_member(err, "desc", error->message);
  json_object_set_object_member(reply, "error", err);
  return cbt_json_object_node(reply);
}

static JsonNode *
return_reply(JsonNode *ret, JsonNode *id)
{
  JsonObject *reply = json_object_new();

  json_object_set_member(reply, "return", ret);
  if (id)
    json_object_set_member(reply, "id", json_node_copy(id));
  return cbt_json_object_node(reply);
}

/* The envelope: "execute" (or "exec-oob" once oob is on), "arguments", "id", nothing else.
 * Returns the command name and sets *oob. */
static const char *
check_envelope(JsonObject *req, gboolean allow_oob, gboolean *oob, GError **error)
{
  guint n;
  g_autofree const char **keys = cbt_json_qdict_order(req, &n);
  const char *name = NULL;

  /* In QEMU's order, so that with several problems the same one is reported. */
  for (guint i = 0; i < n; i++) {
    const char *key = keys[i];
    JsonNode *v = json_object_get_member(req, key);
    if (g_str_equal(key, "execute") || (allow_oob && g_str_equal(key, "exec-oob"))) {
      if (!JSON_NODE_HOLDS_VALUE(v) || json_node_get_value_type(v) != G_TYPE_STRING) {
        g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC,
                    "QMP input member '%s' must be a string", key);
        return NULL;
      }
      if (name) {
        g_set_error_literal(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC,
                            "QMP input member 'execute' clashes with 'exec-oob'");
        return NULL;
      }
      name = json_node_get_string(v);
      *oob = g_str_equal(key, "exec-oob");
    } else if (g_str_equal(key, "arguments")) {
      if (!JSON_NODE_HOLDS_OBJECT(v)) {
        g_set_error_literal(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC,
                            "QMP input member 'arguments' must be an object");
        return NULL;
      }
    } else if (!g_str_equal(key, "id")) {
      g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC,
                  "QMP input member '%s' is unexpected", key);
      return NULL;
    }
  }
  if (!name)
    g_set_error_literal(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC,
                        "QMP input lacks member 'execute'");
  return name;
}

/* qmp_capabilities inside a monitor: validated like any command, then per-connection. */
static JsonNode *
negotiate(CbtRpcSession *session, JsonObject *args, GError **error)
{
  if (session->negotiated) {
    g_set_error_literal(error, CBT_RPC_ERROR, CBT_RPC_ERROR_COMMAND_NOT_FOUND,
                        "Capabilities negotiation is already complete, command ignored");
    return NULL;
  }
  JsonArray *enable =
    json_object_has_member(args, "enable") ? json_object_get_array_member(args, "enable") : NULL;
  for (guint i = 0; enable && i < json_array_get_length(enable); i++)
    session->oob |= g_str_equal(json_array_get_string_element(enable, i), "oob");
  session->negotiated = TRUE;
  return cbt_rpc_empty_return();
}

static JsonNode *
dispatch_request(CbtRpc *rpc, CbtRpcSession *session, JsonObject *req, GError **error)
{
  gboolean oob = FALSE;
  const char *name = check_envelope(req, session->oob, &oob, error);
  CbtRpcEntry *entry;
  CbtSchemaCommand *cmd;

  if (!name)
    return NULL;
  cmd = cbt_rpc_find_command(rpc, name, &entry);
  if (!cmd) {
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_COMMAND_NOT_FOUND,
                "The command %s has not been found", name);
    return NULL;
  }
  if (oob) {
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "The command %s does not support OOB",
                name);
    return NULL;
  }
  if (!session->negotiated && !g_str_equal(name, CBT_RPC_NEGOTIATION_CMD)) {
    g_set_error_literal(error, CBT_RPC_ERROR, CBT_RPC_ERROR_COMMAND_NOT_FOUND, "");
    return NULL;
  }
  JsonNode *args = json_object_get_member(req, "arguments");
  if (!g_str_equal(name, CBT_RPC_NEGOTIATION_CMD))
    return cbt_rpc_run_command(rpc, cmd, entry, args, FALSE, error);

  g_autoptr(JsonNode) checked = cbt_schema_check(cmd->args, args, FALSE, error);
  return checked ? negotiate(session, json_node_get_object(checked), error) : NULL;
}

JsonNode *
cbt_rpc_dispatch(CbtRpc *rpc, CbtRpcSession *session, JsonNode *request)
{
  g_autoptr(GError) error = NULL;
  JsonNode *id = NULL;
  JsonNode *ret = NULL;

  CBT_ASSERT_MAIN_THREAD();
  if (!JSON_NODE_HOLDS_OBJECT(request)) {
    g_set_error_literal(&error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC,
                        "QMP input must be a JSON object");
  } else {
    JsonObject *req = json_node_get_object(request);
    id = json_object_get_member(req, "id");
    ret = dispatch_request(rpc, session, req, &error);
  }
  if (ret)
    return return_reply(ret, id);
  /* Before negotiation every CommandNotFound says what is expected instead. */
  if (!session->negotiated &&
      g_error_matches(error, CBT_RPC_ERROR, CBT_RPC_ERROR_COMMAND_NOT_FOUND)) {
    g_free(error->message);
    error->message = g_strdup("Expecting capabilities negotiation with 'qmp_capabilities'");
  }
  return cbt_rpc_error_reply(error, id);
}
