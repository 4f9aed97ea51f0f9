/* backup-filter.c — the copy-before-write filter of a push-mode backup (QEMU's blockdev-backup
 * inserts one over its source: docs/user-guide.md, "Jobs and push-mode backup").
 *
 * The filter's target is the backup's target: before a write reaches a cluster of the source
 * that the backup still needs, its old data is copied there, so the target holds the source as
 * it was when the filter went in. The job copies the other clusters through the same claim
 * (cbt_blockdev_cbw_copy_needed()), so each is copied once, by whoever comes first.
 *
 * Invariants:
 *  (1) The filter goes in while the source is drained (the caller's drain): every write that
 *      reaches the source afterwards passes the filter, none is half before and half after.
 *  (2) Nothing writes the source around the filter: over a raw node's file child, the raw node
 *      itself is moved onto the filter (so its users, exports included, write through it);
 *      over any other node, the filter is used, so it unshares write on the node, and a node
 *      another user writes is refused with the permission conflict text.
 *  (3) The job's I/O enters the graph at the filter (io_begin/io_end there), so a drain of the
 *      source's file node waits for it, and the filter outlives every copy: free() drains first.
 *  (4) Filters stack: a second backup of the same raw node goes between the node and the first
 *      filter, and a filter that leaves hands its parent (the raw node or the filter above it)
 *      its own file child, in whichever order the jobs end. A snapshot export's filter (not a
 *      backup's) is not stacked on: its teardown would cut ours out.
 */
#include "blockdev/blockdev-internal.h"

struct CbtBlockdevBackupFilter {
  CbtBlockdev *source; /* the node backed up (referenced) */
  CbtBlockdev *cbw;
  gboolean swapped; /* the raw source sits on the filter */
  guint64 total;    /* bytes selected when the filter went in */
};

/* Case (2), first half: a raw node over its whole file child. */
static gboolean
is_plain_raw(CbtBlockdev *bd)
{
  return bd->drv == &cbt_blockdev_raw_driver && bd->file && cbt_blockdev_raw_offset(bd) == 0 &&
         bd->size == bd->file->node->size;
}

static CbtBlockdev *
open_filter(CbtBlockdev *below, CbtBlockdev *target, const char *node_name, GError **error)
{
  CbtQmpBlockdevRef f = { .type = CBT_QMP_BLOCKDEV_REF_KIND_REFERENCE };
  CbtQmpBlockdevRef t = { .type = CBT_QMP_BLOCKDEV_REF_KIND_REFERENCE };
  CbtQmpBlockdevOptions o = { .driver = CBT_QMP_BLOCKDEV_DRIVER_COPY_BEFORE_WRITE,
                              .detect_zeroes = CBT_QMP_BLOCKDEV_DETECT_ZEROES_OPTIONS_OFF };

  f.u.reference = below->node_name;
  t.u.reference = target->node_name;
  o.node_name = (char *)node_name;
  o.u.copy_before_write.file = &f;
  o.u.copy_before_write.target = &t;
  /* QEMU's backup keeps the filter's default: a failed copy fails the guest's write, so the
   * target never misses old data the source no longer has. */
  o.u.copy_before_write.on_cbw_error = CBT_QMP_ON_CBW_ERROR_BREAK_GUEST_WRITE;
  return cbt_blockdev_open_internal(&o, error);
}

/* The filter is used by the job: it then unshares write on its file child (2). */
static gboolean
use_filter(CbtBlockdev *cbw, GError **error)
{
  cbw->users++;
  if (cbt_blockdev_refresh_perms(cbw, error))
    return TRUE;
  cbw->users--;
  cbt_blockdev_refresh_perms(cbw, NULL);
  return FALSE;
}

static void
unuse_filter(CbtBlockdev *cbw)
{
  cbw->users--;
  cbt_blockdev_refresh_perms(cbw, NULL);
}

CbtBlockdevBackupFilter *
cbt_blockdev_backup_filter_new(CbtBlockdev *source, CbtBlockdev *target, const char *node_name,
                               const CbtBitmap *select, GError **error)
{
  CBT_ASSERT_MAIN_THREAD();
  gboolean raw = is_plain_raw(source);
  if (raw && source->file->node->drv == &cbt_blockdev_cbw_driver &&
      !cbt_blockdev_cbw_is_backup(source->file->node)) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "cbtd cannot back up node '%s' while its snapshot filter '%s' is under it",
                source->node_name, source->file->node->node_name);
    return NULL;
  }
  CbtBlockdev *below = raw ? source->file->node : source;
  CbtBlockdev *cbw = open_filter(below, target, node_name, error);

  if (!cbw)
    return NULL;
  cbt_blockdev_cbw_set_zero_target(cbw);
  if (select)
    cbt_blockdev_cbw_select(cbw, select);
  /* Over a raw node the raw node becomes the filter's parent (so it unshares write below);
   * otherwise the job's use does it. */
  if (raw ? !cbt_blockdev_swap_file(source, cbw, error) : !use_filter(cbw, error)) {
    cbt_blockdev_unref(cbw);
    return NULL;
  }
  CbtBlockdevBackupFilter *f = g_new0(CbtBlockdevBackupFilter, 1);
  f->source = cbt_blockdev_ref(source);
  f->cbw = cbw;
  f->swapped = raw;
  g_autoptr(CbtBitmap) need = cbt_blockdev_cbw_copy_need(cbw);
  f->total = MIN(cbt_bitmap_count(need) * cbt_bitmap_get_granularity(need), cbw->size);
  return f;
}

CbtBlockdev *
cbt_blockdev_backup_filter_node(CbtBlockdevBackupFilter *f)
{
  return f->cbw;
}

guint64
cbt_blockdev_backup_filter_total(CbtBlockdevBackupFilter *f)
{
  return f->total;
}

guint64
cbt_blockdev_backup_filter_progress(CbtBlockdevBackupFilter *f)
{
  return MIN(cbt_blockdev_cbw_progress(f->cbw), f->total);
}

gint64
cbt_blockdev_backup_filter_next(CbtBlockdevBackupFilter *f, guint64 offset)
{
  return cbt_blockdev_cbw_next_needed(f->cbw, offset);
}

int
cbt_blockdev_backup_filter_copy(CbtBlockdevBackupFilter *f, guint64 offset, guint64 max,
                                guint64 *stop, gboolean *is_read)
{
  cbt_blockdev_io_begin(f->cbw);
  int r = cbt_blockdev_cbw_copy_needed(f->cbw, offset, max, stop, is_read);
  cbt_blockdev_io_end(f->cbw);
  return r;
}

void
cbt_blockdev_backup_filter_settle(CbtBlockdevBackupFilter *f)
{
  cbt_blockdev_cbw_settle(f->cbw);
}

CbtBitmap *
cbt_blockdev_backup_filter_remaining(CbtBlockdevBackupFilter *f)
{
  return cbt_blockdev_cbw_copy_need(f->cbw);
}

/* Make the filter's parent (the raw node, or a later backup's filter over this one) use the
 * filter's file child instead (4), with the parent drained. Handing back the child the parent
 * had below the filter gives back only permissions it held before, so it is not refused. */
static void
unlink_filter(CbtBlockdevBackupFilter *f)
{
  g_autoptr(GError) error = NULL;

  if (f->cbw->parents->len == 0)
    return;
  CbtBlockdevChild *c = g_ptr_array_index(f->cbw->parents, 0);
  CbtBlockdev *parent = cbt_blockdev_ref(c->parent);
  /* The filter's child now, not when it went in: a lower filter may have left since. */
  CbtBlockdev *below = f->cbw->file->node;
  cbt_blockdev_drain_begin(parent);
  if (parent->drv == &cbt_blockdev_raw_driver) {
    if (!cbt_blockdev_swap_file(parent, below, &error))
      g_critical("cannot put node '%s' back on '%s': %s", parent->node_name, below->node_name,
                 error->message);
  } else {
    guint role = c->role;
    cbt_blockdev_detach_child(c);
    cbt_blockdev_attach_child(parent, below, "file", role);
    json_object_set_object_member(parent->full_opts, "file", json_object_ref(below->full_opts));
    if (!cbt_blockdev_refresh_perms(parent, &error))
      g_critical("cannot put node '%s' on '%s': %s", parent->node_name, below->node_name,
                 error->message);
  }
  cbt_blockdev_drain_end(parent);
  cbt_blockdev_unref(parent);
}

void
cbt_blockdev_backup_filter_free(CbtBlockdevBackupFilter *f)
{
  CBT_ASSERT_MAIN_THREAD();
  if (!f)
    return;
  cbt_blockdev_drain_begin(f->cbw);
  if (f->swapped)
    unlink_filter(f);
  cbt_blockdev_drain_end(f->cbw);
  if (!f->swapped)
    unuse_filter(f->cbw);
  cbt_blockdev_unref(f->cbw);
  cbt_blockdev_unref(f->source);
  g_free(f);
}
