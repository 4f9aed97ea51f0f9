/* cmds.c — the QMP commands of block nodes: blockdev-add, blockdev-del,
 * query-named-block-nodes. Arguments arrive checked against schemas/block-core.json.
 */
#include "blockdev/blockdev-internal.h"
#include "schemas/qmp-commands.h"

gboolean
cbt_qmp_blockdev_add(const CbtQmpBlockdevOptions *args, GError **error)
{
  return cbt_blockdev_open(args, error) != NULL;
}

gboolean
cbt_qmp_blockdev_del(const CbtQmpBlockdevDelArg *args, GError **error)
{
  const char *name = args->node_name;
  CbtBlockdev *bd = cbt_blockdev_find(name);

  /* QEMU's checks, in its order. */
  if (!bd) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Failed to find node with node-name='%s'", name);
    return FALSE;
  }
  if (!cbt_blockdev_check_unblocked(bd, error))
    return FALSE;
  if (bd->users > 0) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Node %s is in use", name);
    return FALSE;
  }
  if (!bd->monitor_owned) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Node %s is not owned by the monitor", name);
    return FALSE;
  }
  if (bd->parents->len > 0 || bd->holds > 0) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Block device %s is in use", name);
    return FALSE;
  }
  bd->monitor_owned = FALSE;
  cbt_blockdev_unref(bd);
  return TRUE;
}

CbtQmpBlockDeviceInfoList *
cbt_qmp_query_named_block_nodes(const CbtQmpQueryNamedBlockNodesArg *args, GError **error)
{
  GPtrArray *list = g_ptr_array_new_with_free_func((GDestroyNotify)cbt_qmp_block_device_info_free);

  for (GList *l = cbt_blockdev_list(); l; l = l->next)
    g_ptr_array_add(list, cbt_blockdev_info(l->data));
  return list;
}
