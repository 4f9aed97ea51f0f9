/* stats.c — what the I/O path counts: write thresholds (QEMU 7.2's block/write-threshold.c and
 * BLOCK_WRITE_THRESHOLD), I/O statistics per node and per export, and query-blockstats in QEMU's
 * BlockStats shape.
 *
 * Invariants:
 *  (1) A write path that finds no threshold pays one relaxed load (cbt_blockdev_account_write);
 *      counting a request costs relaxed atomic adds on its node's and its export's blocks, never
 *      a lock. A reader may see the counters of a request half added: each counter is exact,
 *      their sum at one instant is not promised.
 *  (2) A threshold fires at most once per arming: the write that crosses it disarms it by
 *      compare-and-swap from the value it read, and only the winner emits the event.
 */
#include <time.h>
#include "blockdev/blockdev-internal.h"
#include "schemas/qmp-commands.h"
#include "schemas/qmp-events.h"

/* ---- write thresholds --------------------------------------------------------------------- */

void
cbt_blockdev_threshold_crossed(CbtBlockdev *bd, guint64 threshold, guint64 end)
{
  guint64 expected = threshold;

  if (__atomic_compare_exchange_n(&bd->write_threshold, &expected, 0, FALSE, __ATOMIC_RELAXED,
                                  __ATOMIC_RELAXED))
    cbt_qmp_event_block_write_threshold(bd->node_name, end - threshold, threshold);
}

gboolean
cbt_qmp_block_set_write_threshold(const CbtQmpBlockSetWriteThresholdArg *args, GError **error)
{
  CbtBlockdev *bd = cbt_blockdev_find(args->node_name);

  if (!bd) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Device '%s' not found", args->node_name);
    return FALSE;
  }
  __atomic_store_n(&bd->write_threshold, args->write_threshold, __ATOMIC_RELAXED);
  return TRUE;
}

/* ---- counters ----------------------------------------------------------------------------- */

struct CbtBlockdevExportStats {
  char *id;
  CbtBlockdevStats stats;
};

gint64
cbt_blockdev_now_ns(void)
{
  struct timespec ts;

  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (gint64)ts.tv_sec * G_GINT64_CONSTANT(1000000000) + ts.tv_nsec;
}

#define ADD(p, v) __atomic_add_fetch((p), (v), __ATOMIC_RELAXED)

void
cbt_blockdev_stats_done(CbtBlockdevStats *s, CbtBlockdevAcct kind, guint64 bytes, gint64 start_ns,
                        gint64 now_ns, gboolean failed)
{
  /* As qsd's account_failed false: a failure adds to nothing but its own counter. */
  if (failed) {
    ADD(&s->failed[kind], 1);
    return;
  }
  ADD(&s->ops[kind], 1);
  ADD(&s->bytes[kind], bytes);
  ADD(&s->total_ns[kind], (guint64)MAX(now_ns - start_ns, 0));
  __atomic_store_n(&s->last_access_ns, now_ns, __ATOMIC_RELAXED);
}

void
cbt_blockdev_stats_invalid(CbtBlockdevStats *s, CbtBlockdevAcct kind)
{
  ADD(&s->invalid[kind], 1);
}

CbtBlockdevStats *
cbt_blockdev_get_stats(CbtBlockdev *bd)
{
  return &bd->stats;
}

static void
export_stats_free(gpointer p)
{
  CbtBlockdevExportStats *es = p;

  g_free(es->id);
  g_free(es);
}

CbtBlockdevExportStats *
cbt_blockdev_add_export_stats(CbtBlockdev *bd, const char *id)
{
  CbtBlockdevExportStats *es = g_new0(CbtBlockdevExportStats, 1);

  CBT_ASSERT_MAIN_THREAD();
  es->id = g_strdup(id);
  if (!bd->export_stats)
    bd->export_stats = g_ptr_array_new_with_free_func(export_stats_free);
  g_ptr_array_add(bd->export_stats, es);
  return es;
}

CbtBlockdevStats *
cbt_blockdev_export_stats_get(CbtBlockdevExportStats *es)
{
  return &es->stats;
}

void
cbt_blockdev_remove_export_stats(CbtBlockdev *bd, CbtBlockdevExportStats *es)
{
  CBT_ASSERT_MAIN_THREAD();
  if (bd->export_stats)
    g_ptr_array_remove(bd->export_stats, es);
}

/* ---- query-blockstats --------------------------------------------------------------------- */

#define LOAD(p) ((gint64)__atomic_load_n((p), __ATOMIC_RELAXED))

static CbtQmpBlockDeviceStats *
device_stats(const CbtBlockdevStats *s, guint64 wr_highest)
{
  CbtQmpBlockDeviceStats *d = g_new0(CbtQmpBlockDeviceStats, 1);
  enum { R = CBT_BLOCKDEV_ACCT_READ, W = CBT_BLOCKDEV_ACCT_WRITE };
  enum { F = CBT_BLOCKDEV_ACCT_FLUSH, U = CBT_BLOCKDEV_ACCT_UNMAP };

  d->rd_bytes = LOAD(&s->bytes[R]);
  d->wr_bytes = LOAD(&s->bytes[W]);
  d->unmap_bytes = LOAD(&s->bytes[U]);
  d->rd_operations = LOAD(&s->ops[R]);
  d->wr_operations = LOAD(&s->ops[W]);
  d->flush_operations = LOAD(&s->ops[F]);
  d->unmap_operations = LOAD(&s->ops[U]);
  d->rd_total_time_ns = LOAD(&s->total_ns[R]);
  d->wr_total_time_ns = LOAD(&s->total_ns[W]);
  d->flush_total_time_ns = LOAD(&s->total_ns[F]);
  d->unmap_total_time_ns = LOAD(&s->total_ns[U]);
  d->wr_highest_offset = (gint64)wr_highest;
  gint64 last = LOAD(&s->last_access_ns);
  d->has_idle_time_ns = last != 0;
  d->idle_time_ns = last ? MAX(cbt_blockdev_now_ns() - last, 0) : 0;
  d->failed_rd_operations = LOAD(&s->failed[R]);
  d->failed_wr_operations = LOAD(&s->failed[W]);
  d->failed_flush_operations = LOAD(&s->failed[F]);
  d->failed_unmap_operations = LOAD(&s->failed[U]);
  d->invalid_rd_operations = LOAD(&s->invalid[R]);
  d->invalid_wr_operations = LOAD(&s->invalid[W]);
  d->invalid_flush_operations = LOAD(&s->invalid[F]);
  d->invalid_unmap_operations = LOAD(&s->invalid[U]);
  d->timed_stats = g_ptr_array_new();
  return d;
}

/* QEMU's bdrv_query_bds_stats(): the primary child if it holds data, else the one data child. */
static CbtBlockdev *
stats_child(CbtBlockdev *bd)
{
  CbtBlockdevChild *only = NULL;

  for (guint i = 0; i < bd->children->len; i++) {
    CbtBlockdevChild *c = g_ptr_array_index(bd->children, i);
    if ((c->role & CBT_BLOCKDEV_CHILD_PRIMARY) &&
        (c->role & (CBT_BLOCKDEV_CHILD_DATA | CBT_BLOCKDEV_CHILD_FILTERED)))
      return c->node;
  }
  for (guint i = 0; i < bd->children->len; i++) {
    CbtBlockdevChild *c = g_ptr_array_index(bd->children, i);
    if (!(c->role & CBT_BLOCKDEV_CHILD_DATA))
      continue;
    if (only)
      return NULL;
    only = c;
  }
  return only ? only->node : NULL;
}

static CbtQmpBlockStatsSpecific *
driver_specific(CbtBlockdev *bd)
{
  CbtQmpBlockStatsSpecific *ds;
  CbtQmpBlockStatsSpecificFile *f;

  if (bd->drv == &cbt_blockdev_file_driver) {
    ds = g_new0(CbtQmpBlockStatsSpecific, 1);
    ds->driver = CBT_QMP_BLOCKDEV_DRIVER_FILE;
    f = &ds->u.file;
  } else if (bd->drv == &cbt_blockdev_host_device_driver) {
    ds = g_new0(CbtQmpBlockStatsSpecific, 1);
    ds->driver = CBT_QMP_BLOCKDEV_DRIVER_HOST_DEVICE;
    f = &ds->u.host_device;
  } else {
    return NULL;
  }
  f->discard_nb_ok = LOAD(&bd->discard_ok);
  f->discard_nb_failed = LOAD(&bd->discard_failed);
  f->discard_bytes_ok = LOAD(&bd->discard_bytes_ok);
  return ds;
}

static CbtQmpBlockStats *
node_stats(CbtBlockdev *bd)
{
  CbtQmpBlockStats *s = g_new0(CbtQmpBlockStats, 1);
  CbtBlockdev *child = stats_child(bd);
  guint64 highest = __atomic_load_n(&bd->wr_highest, __ATOMIC_RELAXED);

  s->node_name = g_strdup(bd->node_name);
  s->stats = device_stats(&bd->stats, highest);
  s->driver_specific = driver_specific(bd);
  if (child)
    s->parent = node_stats(child);
  for (guint i = 0; bd->export_stats && i < bd->export_stats->len; i++) {
    CbtBlockdevExportStats *es = g_ptr_array_index(bd->export_stats, i);
    CbtQmpBlockExportStats *e = g_new0(CbtQmpBlockExportStats, 1);
    if (!s->exports)
      s->exports = g_ptr_array_new_with_free_func((GDestroyNotify)cbt_qmp_block_export_stats_free);
    e->id = g_strdup(es->id);
    e->stats = device_stats(&es->stats, highest);
    g_ptr_array_add(s->exports, e);
  }
  return s;
}

CbtQmpBlockStatsList *
cbt_qmp_query_blockstats(const CbtQmpQueryBlockstatsArg *args, GError **error)
{
  GPtrArray *list = g_ptr_array_new_with_free_func((GDestroyNotify)cbt_qmp_block_stats_free);

  if (!args->query_nodes)
    return list; /* no named block devices (see the schema) */
  /* Oldest first, as QEMU walks its nodes (the node list is newest first). */
  for (GList *l = g_list_last(cbt_blockdev_list()); l; l = l->prev)
    g_ptr_array_add(list, node_stats(l->data));
  return list;
}
