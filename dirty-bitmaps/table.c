/* dirty-bitmaps/table.c — which named bitmaps each node has: lookup, attach/detach with
 * tracking, the query-named-block-nodes member, cleanup when a node goes away, and the holds
 * an NBD export takes on the bitmaps it publishes.
 *
 * The table is a side table keyed by node rather than a field of the node, so blockdev/'s core
 * knows bitmaps only as CbtBitmap pointers to mark (see blockdev.h).
 */
#include "dirty-bitmaps/dirty-bitmaps-private.h"

/* CbtBlockdev * -> GPtrArray of CbtDirtyBitmap * (owned), oldest first. */
static GHashTable *node_bitmaps;

/* An export's hold on a bitmap: CbtBitmap * -> ExportHold. */
typedef struct {
  CbtBlockdev *bd; /* referenced, and a user while held */
  CbtDirtyBitmap *dbm;
  guint holds; /* successful lookups not yet released */
} ExportHold;
static GHashTable *export_holds;

static GPtrArray *
bitmaps_of(CbtBlockdev *bd, gboolean create)
{
  if (!node_bitmaps)
    node_bitmaps = g_hash_table_new_full(NULL, NULL, NULL, (GDestroyNotify)g_ptr_array_unref);
  GPtrArray *arr = g_hash_table_lookup(node_bitmaps, bd);
  if (!arr && create) {
    arr = g_ptr_array_new_with_free_func((GDestroyNotify)cbt_dirty_bitmap_free);
    g_hash_table_insert(node_bitmaps, bd, arr);
  }
  return arr;
}

CbtDirtyBitmap *
cbt_dirty_bitmaps_find(CbtBlockdev *bd, const char *name)
{
  GPtrArray *arr = bitmaps_of(bd, FALSE);

  CBT_ASSERT_MAIN_THREAD();
  for (guint i = 0; arr && i < arr->len; i++) {
    CbtDirtyBitmap *dbm = g_ptr_array_index(arr, i);
    if (g_strcmp0(cbt_dirty_bitmap_get_name(dbm), name) == 0)
      return dbm;
  }
  return NULL;
}

CbtDirtyBitmap *
cbt_dirty_bitmaps_lookup(const char *node, const char *name, CbtBlockdev **pbd, GError **error)
{
  CBT_ASSERT_MAIN_THREAD();
  CbtBlockdev *bd = cbt_blockdev_find(node);
  if (!bd) {
    cbt_dirty_bitmaps_error(error, "Node '%s' not found", node);
    return NULL;
  }
  CbtDirtyBitmap *dbm = cbt_dirty_bitmaps_find(bd, name);
  if (!dbm) {
    cbt_dirty_bitmaps_error(error, "Dirty bitmap '%s' not found", name);
    return NULL;
  }
  if (pbd)
    *pbd = bd;
  return dbm;
}

GPtrArray *
cbt_dirty_bitmaps_list(CbtBlockdev *bd)
{
  CBT_ASSERT_MAIN_THREAD();
  return bitmaps_of(bd, FALSE);
}

/* Tracked by the node itself, rather than marked by a store through its observer. */
static gboolean
tracked_by_node(const CbtDirtyBitmap *dbm)
{
  return cbt_dirty_bitmap_is_recording(dbm) && !cbt_dirty_bitmap_is_persistent(dbm);
}

void
cbt_dirty_bitmaps_attach(CbtBlockdev *bd, CbtDirtyBitmap *dbm)
{
  CBT_ASSERT_MAIN_THREAD();
  g_ptr_array_add(bitmaps_of(bd, TRUE), dbm);
  if (tracked_by_node(dbm))
    cbt_blockdev_track_bitmap(bd, cbt_dirty_bitmap_get_bitmap(dbm));
}

void
cbt_dirty_bitmaps_detach(CbtBlockdev *bd, CbtDirtyBitmap *dbm)
{
  GPtrArray *arr = bitmaps_of(bd, FALSE);
  guint idx;

  CBT_ASSERT_MAIN_THREAD();
  g_return_if_fail(arr && g_ptr_array_find(arr, dbm, &idx));
  if (tracked_by_node(dbm))
    cbt_blockdev_untrack_bitmap(bd, cbt_dirty_bitmap_get_bitmap(dbm));
  g_ptr_array_steal_index(arr, idx);
  if (arr->len == 0)
    g_hash_table_remove(node_bitmaps, bd);
  cbt_dirty_bitmaps_persist_forget(dbm);
  if (cbt_dirty_bitmap_is_persistent(dbm))
    cbt_dirty_bitmaps_persist_refresh(bd);
}

void
cbt_dirty_bitmaps_set_recording(CbtBlockdev *bd, CbtDirtyBitmap *dbm, gboolean recording)
{
  CBT_ASSERT_MAIN_THREAD();
  g_return_if_fail(!cbt_dirty_bitmap_is_persistent(dbm)); /* persist.c's */
  if (!cbt_dirty_bitmap_is_recording(dbm) == !recording)
    return;
  if (recording)
    cbt_blockdev_track_bitmap(bd, cbt_dirty_bitmap_get_bitmap(dbm));
  else
    cbt_blockdev_untrack_bitmap(bd, cbt_dirty_bitmap_get_bitmap(dbm));
  cbt_dirty_bitmap_set_recording(dbm, recording);
}

CbtBitmap *
cbt_dirty_bitmaps_copy_named(const char *node, const char *name, GError **error)
{
  CbtBlockdev *bd = NULL;
  CbtDirtyBitmap *dbm = cbt_dirty_bitmaps_lookup(node, name, &bd, error);

  if (!dbm)
    return NULL;
  cbt_blockdev_drain_begin(bd);
  CbtBitmap *copy = cbt_bitmap_copy(cbt_dirty_bitmap_get_bitmap(dbm));
  cbt_blockdev_drain_end(bd);
  return copy;
}

char *
cbt_dirty_bitmaps_identity_text(CbtBlockdev *node, const char *name)
{
  CbtDirtyBitmap *dbm = cbt_dirty_bitmaps_find(node, name);

  if (!dbm)
    return NULL;
  g_autofree char *uuid = cbt_dirty_bitmap_get_uuid_string(dbm);
  return g_strconcat(uuid, cbt_dirty_bitmap_get_break(dbm) ? ":broken" : ":unbroken", NULL);
}

CbtQmpBlockDirtyInfo *
cbt_dirty_bitmaps_info(const CbtDirtyBitmap *dbm)
{
  CBT_ASSERT_MAIN_THREAD();
  CbtQmpBlockDirtyInfo *info = g_new0(CbtQmpBlockDirtyInfo, 1);

  info->name = g_strdup(cbt_dirty_bitmap_get_name(dbm));
  info->recording = cbt_dirty_bitmap_is_recording(dbm);
  info->persistent = cbt_dirty_bitmap_is_persistent(dbm);
  info->busy = cbt_dirty_bitmap_is_busy(dbm);
  info->granularity = cbt_dirty_bitmap_get_granularity(dbm);
  info->count = (gint64)MIN(cbt_dirty_bitmap_get_count(dbm), G_MAXINT64);
  info->has_inconsistent = info->inconsistent = cbt_dirty_bitmap_is_inconsistent(dbm);
  if (info->name) {
    info->bitmap_uuid = cbt_dirty_bitmap_get_uuid_string(dbm);
    info->has_bitmap_created = TRUE;
    info->bitmap_created = (gint64)cbt_dirty_bitmap_get_created(dbm);
    info->has_unbroken = TRUE;
    info->unbroken = cbt_dirty_bitmap_get_break(dbm) == CBT_DIRTY_BITMAP_UNBROKEN;
    info->broken_reason = g_strdup(cbt_dirty_bitmap_break_text(cbt_dirty_bitmap_get_break(dbm)));
  }
  cbt_dirty_bitmaps_persist_fill_info(dbm, info);
  return info;
}

/* query-named-block-nodes: `dirty-bitmaps`, newest first, absent while there are none. */
static void
node_query(CbtBlockdev *bd, gpointer data, gpointer user_data)
{
  CbtQmpBlockDeviceInfo *info = data;
  GPtrArray *arr = bitmaps_of(bd, FALSE);

  if (!arr || arr->len == 0)
    return;
  info->dirty_bitmaps =
    g_ptr_array_new_full(arr->len, (GDestroyNotify)cbt_qmp_block_dirty_info_free);
  for (guint i = arr->len; i-- > 0;)
    g_ptr_array_add(info->dirty_bitmaps, cbt_dirty_bitmaps_info(g_ptr_array_index(arr, i)));
}

/* The node is going away (drained): its bitmaps go with it. An exported bitmap keeps its node
 * in use, so none should be busy here; if one is, leak it rather than free bits an export may
 * still read. */
static void
node_closing(CbtBlockdev *bd, gpointer data, gpointer user_data)
{
  GPtrArray *arr = bitmaps_of(bd, FALSE);

  cbt_dirty_bitmaps_persist_node_closing(bd);
  while (arr && arr->len) {
    CbtDirtyBitmap *dbm = g_ptr_array_index(arr, arr->len - 1);
    gboolean busy = cbt_dirty_bitmap_is_busy(dbm);

    if (busy)
      g_critical("node '%s' closed while its bitmap '%s' is busy", cbt_blockdev_get_node_name(bd),
                 cbt_dirty_bitmap_get_name(dbm));
    gboolean last = arr->len == 1;
    cbt_dirty_bitmaps_detach(bd, dbm);
    if (!busy)
      cbt_dirty_bitmap_free(dbm);
    if (last)
      break;
  }
}

/* block_resize changed the node's size (drained): every bitmap follows it (QEMU's
 * bdrv_dirty_bitmap_truncate). The new bits are tracked before the old ones go, the store takes
 * its bitmaps' new bits and size (persist.c), and only then are the old bits freed. */
static void
node_resized(CbtBlockdev *bd, gpointer data, gpointer user_data)
{
  GPtrArray *arr = bitmaps_of(bd, FALSE);
  g_autoptr(GPtrArray) old = g_ptr_array_new_with_free_func((GDestroyNotify)cbt_bitmap_free);
  guint64 size = cbt_blockdev_get_size(bd);

  for (guint i = 0; arr && i < arr->len; i++) {
    CbtDirtyBitmap *dbm = g_ptr_array_index(arr, i);
    CbtBitmap *prev = cbt_dirty_bitmap_truncate(dbm, size);
    if (tracked_by_node(dbm)) {
      cbt_blockdev_track_bitmap(bd, cbt_dirty_bitmap_get_bitmap(dbm));
      cbt_blockdev_untrack_bitmap(bd, prev);
    }
    g_ptr_array_add(old, prev);
  }
  cbt_dirty_bitmaps_persist_resized(bd);
}

void
cbt_dirty_bitmaps_table_init(void)
{
  cbt_blockdev_notifier_add(CBT_BLOCKDEV_EVENT_RESIZED, node_resized, NULL);
  cbt_blockdev_notifier_add(CBT_BLOCKDEV_EVENT_QUERY, node_query, NULL);
  cbt_blockdev_notifier_add(CBT_BLOCKDEV_EVENT_CLOSING, node_closing, NULL);
}

/* qemu-storage-daemon's rules for one entry of an export's `bitmaps` (docs/bitmaps.md,
 * "Exporting a bitmap"), plus the recording check for the {node, name} form that 7.2 skips. */
static gboolean
check_exportable(CbtBlockdev *node, const char *node_name, CbtDirtyBitmap *dbm, const char *name,
                 gboolean readonly_export, GError **error)
{
  if (!dbm) {
    if (node_name)
      cbt_dirty_bitmaps_error(error, "Dirty bitmap '%s' not found", name);
    else
      cbt_dirty_bitmaps_error(error, "Bitmap '%s' is not found", name);
    return FALSE;
  }
  /* A recording bitmap on a read-only export of a writable node would go on changing under a
   * client that believes it is looking at a frozen point in time. */
  if (readonly_export && cbt_dirty_bitmap_is_recording(dbm) && !cbt_blockdev_is_read_only(node)) {
    cbt_dirty_bitmaps_error(error, "Enabled bitmap '%s' incompatible with readonly export", name);
    return FALSE;
  }
  return cbt_dirty_bitmap_check(dbm, CBT_DIRTY_BITMAP_CHECK_ALLOW_RO, error);
}

CbtBitmap *
cbt_dirty_bitmaps_export_lookup(CbtBlockdev *node, const char *node_name, const char *name,
                                gboolean readonly_export, GError **error)
{
  CBT_ASSERT_MAIN_THREAD();
  /* qsd also descends filter and backing children for a plain name; cbtd's nodes have neither
   * (raw's file child is not searched, as in qsd). */
  CbtDirtyBitmap *dbm = cbt_dirty_bitmaps_find(node, name);

  if (!check_exportable(node, node_name, dbm, name, readonly_export, error))
    return NULL;
  CbtBitmap *bm = cbt_dirty_bitmap_get_bitmap(dbm);
  if (!export_holds)
    export_holds = g_hash_table_new_full(NULL, NULL, NULL, g_free);
  ExportHold *hold = g_hash_table_lookup(export_holds, bm);
  if (!hold) {
    hold = g_new0(ExportHold, 1);
    hold->bd = cbt_blockdev_ref(node);
    hold->dbm = dbm;
    g_hash_table_insert(export_holds, bm, hold);
  }
  hold->holds++;
  cbt_dirty_bitmap_busy_ref(dbm);
  cbt_blockdev_add_user(node);
  return bm;
}

CbtBitmap *
cbt_dirty_bitmaps_freeze(CbtBlockdev *node, const char *name, gboolean *persistent, GError **error)
{
  CbtDirtyBitmap *dbm = cbt_dirty_bitmaps_find(node, name);

  CBT_ASSERT_MAIN_THREAD();
  if (!check_exportable(node, NULL, dbm, name, FALSE, error))
    return NULL;
  *persistent = cbt_dirty_bitmap_is_persistent(dbm);
  return cbt_bitmap_copy(cbt_dirty_bitmap_get_bitmap(dbm));
}

void
cbt_dirty_bitmaps_export_release(CbtBitmap *bm)
{
  ExportHold *hold = export_holds ? g_hash_table_lookup(export_holds, bm) : NULL;

  CBT_ASSERT_MAIN_THREAD();
  g_return_if_fail(hold != NULL);
  cbt_dirty_bitmap_busy_unref(hold->dbm);
  cbt_blockdev_remove_user(hold->bd);
  if (--hold->holds == 0) {
    cbt_blockdev_unref(hold->bd);
    g_hash_table_remove(export_holds, bm);
  }
}
