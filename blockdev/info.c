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
                           JSON_NODE_HOLDS_OBJECT(node) ?
                           qdict_ordered(json_node_get_object(node)) : json_node_copy(node));
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
  return bd->child ? actual_size(bd->child) : 0;
}

static JsonObject *
image_info(CbtBlockdev *bd, const char *filename)
{
  JsonObject *img = json_object_new();
  gint64 actual = actual_size(bd);

  json_object_set_string_member(img, "filename", filename);
  json_object_set_string_member(img, "format", bd->drv->name);
  json_object_set_int_member(img, "virtual-size", (gint64)bd->size);
  if (actual >= 0)
    json_object_set_int_member(img, "actual-size", actual);
  /* Formats pass QEMU's image info request down: the protocol node decides. */
  CbtBlockdev *bottom = bd;
  while (bottom->child)
    bottom = bottom->child;
  if (bottom->drv->has_dirty_flag)
    json_object_set_boolean_member(img, "dirty-flag", FALSE);
  return img;
}

JsonObject *
cbt_blockdev_info(CbtBlockdev *bd)
{
  static const char *const zero[] = { "bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr" };
  static const char *const dz[] = { "off", "on", "unmap" };
  g_autofree char *filename = cbt_blockdev_filename(bd);
  JsonObject *info = json_object_new();
  JsonObject *cache = json_object_new();

  json_object_set_string_member(info, "file", filename);
  json_object_set_string_member(info, "node-name", bd->node_name);
  json_object_set_boolean_member(info, "ro", bd->read_only);
  json_object_set_string_member(info, "drv", bd->drv->name);
  json_object_set_int_member(info, "backing_file_depth", 0);
  json_object_set_boolean_member(info, "encrypted", FALSE);
  json_object_set_string_member(info, "detect_zeroes", dz[bd->detect_zeroes]);
  for (gsize i = 0; i < G_N_ELEMENTS(zero); i++)
    json_object_set_int_member(info, zero[i], 0);
  json_object_set_object_member(info, "image", image_info(bd, filename));
  json_object_set_boolean_member(cache, "writeback", TRUE);
  json_object_set_boolean_member(cache, "direct", bd->cache_direct);
  json_object_set_boolean_member(cache, "no-flush", bd->cache_no_flush);
  json_object_set_object_member(info, "cache", cache);
  json_object_set_int_member(info, "write_threshold", 0);
  if (cbt_blockdev_get_hooks()->node_info)
    cbt_blockdev_get_hooks()->node_info(bd, info);
  return info;
}
