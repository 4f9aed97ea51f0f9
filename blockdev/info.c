/* info.c — a node as query-named-block-nodes shows it (QEMU's BlockDeviceInfo), including the
 * file name QEMU derives: the exact name of the file, or "json:{...}" built from the node's
 * strong options when those define it. QEMU prints that JSON from a hash table, so its member
 * order is the table's bucket order; clients may compare these strings, so we reproduce it.
 */
#include <string.h>
#include "blockdev/blockdev-internal.h"

#define QDICT_BUCKETS 512

/* QEMU's qdict bucket hash (tdb's). */
static guint
qdict_bucket(const char *key)
{
  guint32 v = 0x238F13AFu * (guint32)strlen(key);

  for (guint i = 0; key[i]; i++)
    v += (guint32)(guchar)key[i] << (i * 5 % 24);
  return (1103515243u * v + 12345u) % QDICT_BUCKETS;
}

static gint
by_bucket(gconstpointer a, gconstpointer b)
{
  const char *ka = *(const char *const *)a, *kb = *(const char *const *)b;
  guint ha = qdict_bucket(ka), hb = qdict_bucket(kb);

  return ha != hb ? (ha < hb ? -1 : 1) : g_strcmp0(ka, kb);
}

/* A copy of @o with members (recursively) in QEMU's print order. */
static JsonNode *
qdict_ordered(JsonObject *o)
{
  g_autoptr(GPtrArray) keys = g_ptr_array_new();
  JsonObject *out = json_object_new();
  JsonObjectIter it;
  const char *name;
  JsonNode *node;

  json_object_iter_init(&it, o);
  while (json_object_iter_next(&it, &name, &node))
    g_ptr_array_add(keys, (gpointer)name);
  g_ptr_array_sort(keys, by_bucket);
  for (guint i = 0; i < keys->len; i++) {
    node = json_object_get_member(o, keys->pdata[i]);
    json_object_set_member(out, keys->pdata[i],
                           JSON_NODE_HOLDS_OBJECT(node) ? qdict_ordered(json_node_get_object(node))
                                                        : json_node_copy(node));
  }
  JsonNode *n = json_node_alloc();
  json_node_init_object(n, out);
  json_object_unref(out);
  return n;
}

char *
cbt_blockdev_filename(CbtBlockdev *bd)
{
  if (bd->exact_filename)
    return g_strdup(bd->exact_filename);
  g_autoptr(JsonNode) ordered = qdict_ordered(bd->full_opts);
  g_autofree char *json = cbt_rpc_json_to_string(ordered, FALSE);
  return g_strconcat("json:", json, NULL);
}

static gint64
actual_size(CbtBlockdev *bd)
{
  if (bd->drv->actual_size)
    return bd->drv->actual_size(bd);
  CbtBlockdev *child = cbt_blockdev_primary_child(bd);
  return child ? actual_size(child) : 0;
}

static CbtQmpImageInfo *
image_info(CbtBlockdev *bd, const char *filename)
{
  CbtQmpImageInfo *img = g_new0(CbtQmpImageInfo, 1);
  gint64 actual = actual_size(bd);

  img->filename = g_strdup(filename);
  img->format = g_strdup(bd->drv->name);
  img->virtual_size = (gint64)bd->size;
  img->has_actual_size = actual >= 0;
  img->actual_size = actual;
  /* Formats and filters pass QEMU's image info request down: the protocol node decides,
   * unless a node on the way has no image info (snapshot-access). */
  CbtBlockdev *bottom = bd;
  while (!bottom->drv->no_image_info && cbt_blockdev_primary_child(bottom))
    bottom = cbt_blockdev_primary_child(bottom);
  img->has_dirty_flag = !bottom->drv->no_image_info && bottom->drv->has_dirty_flag;
  /* QEMU shows a filter's child as its backing image. */
  if (bd->drv->is_filter && bd->file) {
    g_autofree char *child_name = cbt_blockdev_filename(bd->file->node);
    img->backing_image = image_info(bd->file->node, child_name);
  }
  return img;
}

/* The anonymous bitmaps drivers keep on @bd (a copy-before-write node's, on itself and on its
 * source) come before the named ones: QEMU lists newest first, and they are made when the
 * filter opens, after the bitmaps a management layer adds before it. */
static void
add_driver_bitmaps(CbtBlockdev *bd, CbtQmpBlockDeviceInfo *info)
{
  GPtrArray *out = g_ptr_array_new_with_free_func((GDestroyNotify)cbt_qmp_block_dirty_info_free);

  if (bd->drv->query_bitmaps)
    bd->drv->query_bitmaps(bd, bd, out);
  for (guint i = bd->parents->len; i-- > 0;) {
    CbtBlockdevChild *c = g_ptr_array_index(bd->parents, i);
    if (c->parent->drv->query_bitmaps)
      c->parent->drv->query_bitmaps(c->parent, bd, out);
  }
  if (out->len == 0) {
    g_ptr_array_unref(out);
    return;
  }
  if (info->dirty_bitmaps) {
    for (guint i = 0; i < info->dirty_bitmaps->len; i++)
      g_ptr_array_add(out, info->dirty_bitmaps->pdata[i]);
    g_ptr_array_set_free_func(info->dirty_bitmaps, NULL);
    g_ptr_array_unref(info->dirty_bitmaps);
  }
  info->dirty_bitmaps = out;
}

CbtQmpBlockDeviceInfo *
cbt_blockdev_info(CbtBlockdev *bd)
{
  CbtQmpBlockDeviceInfo *info = g_new0(CbtQmpBlockDeviceInfo, 1);

  info->file = cbt_blockdev_filename(bd);
  info->node_name = g_strdup(bd->node_name);
  info->ro = bd->read_only;
  info->drv = g_strdup(bd->drv->name);
  info->detect_zeroes = bd->detect_zeroes;
  info->image = image_info(bd, info->file);
  info->backing_file_depth = bd->drv->is_filter && bd->file ? 1 : 0;
  info->cache = g_new0(CbtQmpBlockdevCacheInfo, 1);
  info->cache->writeback = TRUE;
  info->cache->direct = bd->cache_direct;
  info->cache->no_flush = bd->cache_no_flush;
  /* Throttling: cbtd has none, so it stays 0. */
  info->write_threshold = (gint64)__atomic_load_n(&bd->write_threshold, __ATOMIC_RELAXED);
  cbt_blockdev_notify(bd, CBT_BLOCKDEV_EVENT_QUERY, info);
  add_driver_bitmaps(bd, info);
  return info;
}
