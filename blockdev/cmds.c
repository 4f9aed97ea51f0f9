/* cmds.c — the QMP commands of block nodes: blockdev-add, blockdev-del,
 * query-named-block-nodes. Arguments arrive validated against schemas/block-core.json.
 */
#include "blockdev/blockdev-internal.h"

static JsonNode *
cmd_blockdev_add(JsonObject *args, gpointer user_data, GError **error)
{
  return cbt_blockdev_open(args, error) ? cbt_rpc_empty_return() : NULL;
}

static JsonNode *
cmd_blockdev_del(JsonObject *args, gpointer user_data, GError **error)
{
  const char *name = json_object_get_string_member(args, "node-name");
  CbtBlockdev *bd = cbt_blockdev_find(name);

  /* QEMU's checks, in its order. */
  if (!bd) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Failed to find node with node-name='%s'", name);
    return NULL;
  }
  if (bd->users > 0) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Node %s is in use", name);
    return NULL;
  }
  if (!bd->monitor_owned) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Node %s is not owned by the monitor", name);
    return NULL;
  }
  if (bd->parents > 0) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Block device %s is in use", name);
    return NULL;
  }
  bd->monitor_owned = FALSE;
  cbt_blockdev_unref(bd);
  return cbt_rpc_empty_return();
}

static JsonNode *
cmd_query_named_block_nodes(JsonObject *args, gpointer user_data, GError **error)
{
  JsonArray *list = json_array_new();
  JsonNode *ret = json_node_alloc();

  for (GList *l = cbt_blockdev_list(); l; l = l->next)
    json_array_add_object_element(list, cbt_blockdev_info(l->data));
  json_node_init_array(ret, list);
  json_array_unref(list);
  return ret;
}

static const CbtRpcCommand blockdev_commands[] = {
  { "blockdev-add", cmd_blockdev_add },
  { "blockdev-del", cmd_blockdev_del },
  { "query-named-block-nodes", cmd_query_named_block_nodes },
};

void
cbt_blockdev_register_commands(CbtRpc *rpc)
{
  cbt_rpc_register(rpc, blockdev_commands, G_N_ELEMENTS(blockdev_commands), NULL);
}
