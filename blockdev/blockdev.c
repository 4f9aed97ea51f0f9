/* blockdev.c — the node registry, references, node notifiers, users and write permission, and
 * the I/O entry points that mark tracked bitmaps before calling the driver. The graph, drain and
 * admission are graph.c's.
 */
#include <errno.h>
#include <string.h>
#include "blockdev/blockdev-internal.h"

G_DEFINE_QUARK(cbt - blockdev - error - quark, cbt_blockdev_error)

static GList *nodes; /* published nodes, newest first (by seq) */
static guint64 node_seq;

typedef struct {
  CbtBlockdevNotifyFunc fn;
  gpointer user_data;
} Notifier;

static GArray *notifiers[CBT_BLOCKDEV_EVENT__MAX]; /* Notifier, in the order added */

void
cbt_blockdev_notifier_add(CbtBlockdevEvent event, CbtBlockdevNotifyFunc fn, gpointer user_data)
{
  Notifier n = { fn, user_data };

  CBT_ASSERT_MAIN_THREAD();
  g_return_if_fail(event < CBT_BLOCKDEV_EVENT__MAX);
  if (!notifiers[event])
    notifiers[event] = g_array_new(FALSE, FALSE, sizeof(Notifier));
  g_array_append_val(notifiers[event], n);
}

void
cbt_blockdev_notifier_remove(CbtBlockdevEvent event, CbtBlockdevNotifyFunc fn, gpointer user_data)
{
  GArray *list = event < CBT_BLOCKDEV_EVENT__MAX ? notifiers[event] : NULL;

  CBT_ASSERT_MAIN_THREAD();
  for (guint i = 0; list && i < list->len; i++) {
    Notifier *n = &g_array_index(list, Notifier, i);
    if (n->fn == fn && n->user_data == user_data) {
      g_array_remove_index(list, i);
      return;
    }
  }
}

void
cbt_blockdev_notify(CbtBlockdev *bd, CbtBlockdevEvent event, gpointer data)
{
  GArray *list = notifiers[event];

  CBT_ASSERT_MAIN_THREAD();
  for (guint i = 0; list && i < list->len; i++) {
    Notifier *n = &g_array_index(list, Notifier, i);
    n->fn(bd, data, n->user_data);
  }
}

CbtBlockdev *
cbt_blockdev_new(const CbtBlockdevDriver *drv)
{
  CbtBlockdev *bd = g_new0(CbtBlockdev, 1);

  bd->refcnt = 1;
  bd->drv = drv;
  bd->min_io = 1;
  bd->children = g_ptr_array_new();
  bd->parents = g_ptr_array_new();
  bd->shared = CBT_PERM_ALL;
  bd->seq = ++node_seq;
  return bd;
}

/* Newest first by creation, not by publication: a node publishes after the children its driver
 * opened itself, but QEMU lists it as named before them. */
static gint
newer_first(gconstpointer a, gconstpointer b)
{
  guint64 sa = ((const CbtBlockdev *)a)->seq, sb = ((const CbtBlockdev *)b)->seq;

  return sa > sb ? -1 : sa < sb;
}

void
cbt_blockdev_register(CbtBlockdev *bd)
{
  CBT_ASSERT_MAIN_THREAD();
  nodes = g_list_insert_sorted(nodes, bd, newer_first);
  cbt_blockdev_notify(bd, CBT_BLOCKDEV_EVENT_OPENED, NULL);
}

GList *
cbt_blockdev_list(void)
{
  CBT_ASSERT_MAIN_THREAD();
  return nodes;
}

CbtBlockdev *
cbt_blockdev_find(const char *node_name)
{
  CBT_ASSERT_MAIN_THREAD();
  for (GList *l = nodes; l; l = l->next) {
    CbtBlockdev *bd = l->data;
    if (g_strcmp0(bd->node_name, node_name) == 0)
      return bd;
  }
  return NULL;
}

CbtBlockdev *
cbt_blockdev_ref(CbtBlockdev *bd)
{
  g_atomic_int_inc(&bd->refcnt);
  return bd;
}

/* The last reference is gone: let the bitmap layer drop the node's bitmaps, close the driver,
 * then release the child. */
static void
node_free(CbtBlockdev *bd)
{
  GList *published = g_list_find(nodes, bd);

  if (published) {
    nodes = g_list_delete_link(nodes, published);
    cbt_blockdev_drain_begin(bd);
    cbt_blockdev_notify(bd, CBT_BLOCKDEV_EVENT_CLOSING, NULL);
    cbt_blockdev_drain_end(bd);
  }
  if (bd->opaque && bd->drv->close)
    bd->drv->close(bd);
  while (bd->children->len)
    cbt_blockdev_detach_child(g_ptr_array_index(bd->children, bd->children->len - 1));
  g_ptr_array_unref(bd->children);
  g_ptr_array_unref(bd->parents);
  g_clear_pointer(&bd->export_stats, g_ptr_array_unref);
  g_free(bd->tracked);
  g_clear_pointer(&bd->full_opts, json_object_unref);
  g_free(bd->exact_filename);
  g_free(bd->block_reason);
  g_free(bd->node_name);
  g_free(bd);
}

void
cbt_blockdev_unref(CbtBlockdev *bd)
{
  if (bd && g_atomic_int_dec_and_test(&bd->refcnt))
    node_free(bd);
}

void
cbt_blockdev_close_all(void)
{
  CBT_ASSERT_MAIN_THREAD();
  /* Newest first: a parent is always newer than its children. */
  GList *owned = NULL;
  for (GList *l = nodes; l; l = l->next) {
    CbtBlockdev *bd = l->data;
    if (bd->monitor_owned)
      owned = g_list_append(owned, bd);
  }
  for (GList *l = owned; l; l = l->next) {
    CbtBlockdev *bd = l->data;
    bd->monitor_owned = FALSE;
    cbt_blockdev_unref(bd);
  }
  g_list_free(owned);
}

const char *
cbt_blockdev_get_node_name(CbtBlockdev *bd)
{
  return bd->node_name;
}

guint64
cbt_blockdev_get_size(CbtBlockdev *bd)
{
  return bd->size;
}

gboolean
cbt_blockdev_is_read_only(CbtBlockdev *bd)
{
  return bd->read_only;
}

gboolean
cbt_blockdev_can_discard(CbtBlockdev *bd)
{
  return bd->discard_unmap;
}

const char *
cbt_blockdev_get_driver_name(CbtBlockdev *bd)
{
  return bd->drv->name;
}

guint32
cbt_blockdev_get_min_io(CbtBlockdev *bd)
{
  return bd->min_io;
}

guint32
cbt_blockdev_get_max_transfer(CbtBlockdev *bd)
{
  return bd->max_transfer;
}

void
cbt_blockdev_add_user(CbtBlockdev *bd)
{
  g_autoptr(GError) error = NULL;

  CBT_ASSERT_MAIN_THREAD();
  bd->users++;
  /* QEMU would refuse the export; the callers cannot fail here, so the conflict is logged and
   * a writer is still excluded when it asks for write permission. */
  if (!cbt_blockdev_refresh_perms(bd, &error))
    g_warning("node %s: %s", bd->node_name, error->message);
}

void
cbt_blockdev_remove_user(CbtBlockdev *bd)
{
  CBT_ASSERT_MAIN_THREAD();
  g_return_if_fail(bd->users > 0);
  bd->users--;
  cbt_blockdev_refresh_perms(bd, NULL);
}

void
cbt_blockdev_hold(CbtBlockdev *bd)
{
  CBT_ASSERT_MAIN_THREAD();
  bd->holds++;
}

void
cbt_blockdev_unhold(CbtBlockdev *bd)
{
  CBT_ASSERT_MAIN_THREAD();
  g_return_if_fail(bd->holds > 0);
  bd->holds--;
}

void
cbt_blockdev_block(CbtBlockdev *bd, const char *reason)
{
  CBT_ASSERT_MAIN_THREAD();
  if (bd->blocks++ == 0)
    bd->block_reason = g_strdup(reason);
}

void
cbt_blockdev_unblock(CbtBlockdev *bd)
{
  CBT_ASSERT_MAIN_THREAD();
  g_return_if_fail(bd->blocks > 0);
  if (--bd->blocks == 0)
    g_clear_pointer(&bd->block_reason, g_free);
}

gboolean
cbt_blockdev_check_unblocked(CbtBlockdev *bd, GError **error)
{
  if (!bd->blocks)
    return TRUE;
  g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Node '%s' is busy: %s", bd->node_name,
              bd->block_reason);
  return FALSE;
}

/* ---- write permission ------------------------------------------------------------------- */

gboolean
cbt_blockdev_acquire_write(CbtBlockdev *bd, GError **error)
{
  CBT_ASSERT_MAIN_THREAD();
  if (!cbt_blockdev_check_writable(bd, error))
    return FALSE;
  bd->writers++;
  if (cbt_blockdev_refresh_perms(bd, error))
    return TRUE;
  bd->writers--;
  cbt_blockdev_refresh_perms(bd, NULL);
  return FALSE;
}

void
cbt_blockdev_release_write(CbtBlockdev *bd)
{
  CBT_ASSERT_MAIN_THREAD();
  g_return_if_fail(bd->writers > 0);
  bd->writers--;
  cbt_blockdev_refresh_perms(bd, NULL);
}

/* ---- dirty tracking ---------------------------------------------------------------------- */

static void
replace_tracked(CbtBlockdev *bd, CbtBlockdevTracked *set)
{
  cbt_blockdev_drain_begin(bd);
  CbtBlockdevTracked *old = g_atomic_pointer_exchange(&bd->tracked, set);
  cbt_blockdev_drain_end(bd);
  g_free(old);
}

/* A new set with room for @n bitmaps and @n_observers observers (NULL when both are 0: the
 * write path then returns at once). */
static CbtBlockdevTracked *
tracked_new(guint n, guint n_observers)
{
  CbtBlockdevTracked *set;

  if (n == 0 && n_observers == 0)
    return NULL;
  set =
    g_malloc(sizeof(*set) + n * sizeof(CbtBitmap *) + n_observers * sizeof(CbtBlockdevObserver));
  set->n = n;
  set->n_observers = n_observers;
  set->observers = (CbtBlockdevObserver *)&set->bitmaps[n];
  return set;
}

static gboolean
is_observer(const CbtBlockdevObserver *o, CbtBlockdevWriteFunc fn, gpointer opaque)
{
  return o->mark == fn && o->opaque == opaque;
}

/* The current set's members except @bm and the observer (@fn, @opaque), plus @add_bm and the
 * observer @add (each may be NULL), published with the node drained. */
static void
rebuild_tracked(CbtBlockdev *bd, CbtBitmap *bm, CbtBlockdevWriteFunc fn, gpointer opaque,
                CbtBitmap *add_bm, const CbtBlockdevObserver *add)
{
  CbtBlockdevTracked *cur = bd->tracked;
  guint n = cur ? cur->n : 0, no = cur ? cur->n_observers : 0;
  guint keep = add_bm != NULL, keep_obs = add != NULL, j = 0, k = 0;

  for (guint i = 0; i < n; i++)
    keep += cur->bitmaps[i] != bm;
  for (guint i = 0; i < no; i++)
    keep_obs += !is_observer(&cur->observers[i], fn, opaque);
  CbtBlockdevTracked *set = tracked_new(keep, keep_obs);
  for (guint i = 0; i < n; i++)
    if (cur->bitmaps[i] != bm)
      set->bitmaps[j++] = cur->bitmaps[i];
  if (add_bm)
    set->bitmaps[j++] = add_bm;
  for (guint i = 0; i < no; i++)
    if (!is_observer(&cur->observers[i], fn, opaque))
      set->observers[k++] = cur->observers[i];
  if (add)
    set->observers[k++] = *add;
  replace_tracked(bd, set);
}

void
cbt_blockdev_track_bitmap(CbtBlockdev *bd, CbtBitmap *bm)
{
  CBT_ASSERT_MAIN_THREAD();
  rebuild_tracked(bd, NULL, NULL, NULL, bm, NULL);
}

void
cbt_blockdev_untrack_bitmap(CbtBlockdev *bd, CbtBitmap *bm)
{
  CBT_ASSERT_MAIN_THREAD();
  if (bd->tracked)
    rebuild_tracked(bd, bm, NULL, NULL, NULL, NULL);
}

void
cbt_blockdev_add_write_observer(CbtBlockdev *bd, CbtBlockdevWriteFunc mark, gpointer opaque)
{
  CbtBlockdevObserver o = { mark, opaque };

  CBT_ASSERT_MAIN_THREAD();
  rebuild_tracked(bd, NULL, NULL, NULL, NULL, &o);
}

void
cbt_blockdev_remove_write_observer(CbtBlockdev *bd, CbtBlockdevWriteFunc mark, gpointer opaque)
{
  CBT_ASSERT_MAIN_THREAD();
  if (bd->tracked)
    rebuild_tracked(bd, NULL, mark, opaque, NULL, NULL);
}

/* The in-memory bitmaps first, then the observers (a store makes its marks durable there):
 * both before the caller issues the backend call. */
static void
mark(CbtBlockdev *bd, guint64 offset, guint64 len)
{
  CbtBlockdevTracked *set = g_atomic_pointer_get(&bd->tracked);

  if (!set || len == 0)
    return;
  for (guint i = 0; i < set->n; i++)
    cbt_bitmap_mark_range(set->bitmaps[i], offset, len);
  for (guint i = 0; i < set->n_observers; i++)
    set->observers[i].mark(set->observers[i].opaque, offset, len);
}

/* ---- I/O entry points -------------------------------------------------------------------- */

static gboolean
in_bounds(CbtBlockdev *bd, guint64 offset, guint64 len)
{
  return offset <= bd->size && len <= bd->size - offset;
}

int
cbt_blockdev_pread(CbtBlockdev *bd, void *buf, guint64 offset, gsize len)
{
  if (!in_bounds(bd, offset, len))
    return -EINVAL;
  return len ? bd->drv->pread(bd, buf, offset, len) : 0;
}

static gboolean
is_zero(const guint8 *buf, gsize len)
{
  return len == 0 || (buf[0] == 0 && memcmp(buf, buf + 1, len - 1) == 0);
}

/* A driver is given only the request flags it honours (its supported_flags): FUA is carried out
 * for it with a flush after the request, a write-zeroes that must be cheap (NO_FALLBACK) is
 * refused as not cheap, and MAY_UNMAP is dropped (zeroes are written instead). */
static int
zero_write(CbtBlockdev *bd, guint64 offset, guint64 len, guint flags)
{
  guint own = bd->drv->supported_flags;

  if ((flags & CBT_BLOCKDEV_NO_FALLBACK) && !(own & CBT_BLOCKDEV_NO_FALLBACK))
    return -ENOTSUP;
  int r = bd->drv->write_zeroes(bd, offset, len, flags & own);
  if (r == 0 && (flags & CBT_BLOCKDEV_FUA) && !(own & CBT_BLOCKDEV_FUA))
    r = bd->drv->flush(bd);
  return r;
}

static int
data_write(CbtBlockdev *bd, const void *buf, guint64 offset, gsize len, guint flags)
{
  guint own = bd->drv->supported_flags;
  int r = bd->drv->pwrite(bd, buf, offset, len, flags & own);

  if (r == 0 && (flags & CBT_BLOCKDEV_FUA) && !(own & CBT_BLOCKDEV_FUA))
    r = bd->drv->flush(bd);
  return r;
}

int
cbt_blockdev_pwrite(CbtBlockdev *bd, const void *buf, guint64 offset, gsize len, guint flags)
{
  if (!in_bounds(bd, offset, len))
    return -EINVAL;
  if (bd->read_only)
    return -EPERM;
  mark(bd, offset, len);
  g_atomic_int_inc(&bd->write_gen);
  if (len == 0)
    return 0;
  cbt_blockdev_account_write(bd, offset, len, TRUE);
  if (bd->cache_no_flush)
    flags &= ~CBT_BLOCKDEV_FUA;
  /* detect-zeroes, as QEMU: a write of zeroes becomes a zero-write (unmapping with "unmap",
   * which needs discard=unmap). */
  if (bd->detect_zeroes != CBT_QMP_BLOCKDEV_DETECT_ZEROES_OPTIONS_OFF && is_zero(buf, len)) {
    if (bd->detect_zeroes == CBT_QMP_BLOCKDEV_DETECT_ZEROES_OPTIONS_UNMAP)
      flags |= CBT_BLOCKDEV_MAY_UNMAP;
    return zero_write(bd, offset, len, flags);
  }
  return data_write(bd, buf, offset, len, flags);
}

/* QEMU's bdrv_co_flush raises flush_to_os on the node's primary child, and flush_to_disk when
 * the node was written since its last flush (its write generation moved). */
int
cbt_blockdev_flush(CbtBlockdev *bd)
{
  CbtBlockdev *primary = cbt_blockdev_primary_child(bd);

  cbt_blockdev_debug_event(primary, CBT_QMP_BLKDEBUG_EVENT_FLUSH_TO_OS);
  if (bd->cache_no_flush)
    return 0;
  guint gen = (guint)g_atomic_int_get(&bd->write_gen);
  if (gen != (guint)g_atomic_int_get(&bd->flushed_gen))
    cbt_blockdev_debug_event(primary, CBT_QMP_BLKDEBUG_EVENT_FLUSH_TO_DISK);
  int r = bd->drv->flush(bd);
  if (r == 0)
    g_atomic_int_set(&bd->flushed_gen, gen);
  return r;
}

int
cbt_blockdev_discard(CbtBlockdev *bd, guint64 offset, guint64 len, guint flags)
{
  if (!in_bounds(bd, offset, len))
    return -EINVAL;
  if (bd->read_only)
    return -EPERM;
  /* discard=ignore drops the request before it can reach the medium or the bitmaps. */
  if (!bd->discard_unmap || len == 0)
    return 0;
  mark(bd, offset, len);
  cbt_blockdev_account_write(bd, offset, len, FALSE);
  g_atomic_int_inc(&bd->write_gen);
  return bd->drv->discard(bd, offset, len);
}

int
cbt_blockdev_write_zeroes(CbtBlockdev *bd, guint64 offset, guint64 len, guint flags)
{
  if (!in_bounds(bd, offset, len))
    return -EINVAL;
  if (bd->read_only)
    return -EPERM;
  mark(bd, offset, len);
  if (len)
    cbt_blockdev_account_write(bd, offset, len, TRUE);
  g_atomic_int_inc(&bd->write_gen);
  if (!bd->discard_unmap)
    flags &= ~CBT_BLOCKDEV_MAY_UNMAP;
  if (bd->cache_no_flush)
    flags &= ~CBT_BLOCKDEV_FUA;
  return len ? zero_write(bd, offset, len, flags) : 0;
}

int
cbt_blockdev_block_status(CbtBlockdev *bd, guint64 offset, guint64 len, guint64 *pnum,
                          guint32 *status)
{
  if (len == 0 || !in_bounds(bd, offset, len))
    return -EINVAL;
  int r = bd->drv->block_status(bd, offset, len, pnum, status);
  if (r == 0 && (*pnum == 0 || *pnum > len)) {
    /* A file changing under us can confuse SEEK_DATA/SEEK_HOLE: "data" is always safe. */
    *pnum = len;
    *status = 0;
  }
  return r;
}

/* ---- status walks ------------------------------------------------------------------------ */

/* Between a driver's walk and the caller: the caller sees [pos, end) once, in order, whatever the
 * driver reports (a file changing under the driver can make its runs overlap or skip). */
typedef struct {
  CbtBlockdevStatusFunc fn;
  gpointer user_data;
  guint64 pos; /* reported up to here */
  guint64 end;
  gboolean stopped; /* fn returned FALSE */
} StatusWalk;

/* Report [w->pos, to) with @status. */
static gboolean
deliver(StatusWalk *w, guint64 to, guint32 status)
{
  guint64 from = w->pos;

  w->pos = to;
  if (!w->fn(from, to - from, status, w->user_data))
    w->stopped = TRUE;
  return !w->stopped;
}

/* FALSE once the caller stopped or the range is covered: the driver stops too. */
static gboolean
walk_report(guint64 offset, guint64 len, guint32 status, gpointer user_data)
{
  StatusWalk *w = user_data;
  guint64 to = offset < w->end ? offset + MIN(len, w->end - offset) : w->end;

  if (w->stopped)
    return FALSE;
  /* Left out by the driver: "data" is always safe. */
  if (offset > w->pos && !deliver(w, MIN(offset, w->end), 0))
    return FALSE;
  if (to > w->pos && !deliver(w, to, status))
    return FALSE;
  return w->pos < w->end;
}

/* For drivers without a walk of their own: one block_status call per run. */
static int
walk_by_status(CbtBlockdev *bd, guint64 offset, guint64 len, CbtBlockdevStatusFunc fn,
               gpointer user_data)
{
  for (guint64 pos = offset, end = offset + len; pos < end;) {
    guint64 pnum = 0;
    guint32 status = 0;
    int r = cbt_blockdev_block_status(bd, pos, end - pos, &pnum, &status);
    if (r < 0)
      return r;
    if (!fn(pos, pnum, status, user_data))
      break;
    pos += pnum;
  }
  return 0;
}

int
cbt_blockdev_block_status_walk(CbtBlockdev *bd, guint64 offset, guint64 len,
                               CbtBlockdevStatusFunc fn, gpointer user_data)
{
  StatusWalk w = { .fn = fn, .user_data = user_data, .pos = offset, .end = offset + len };
  int r;

  if (len == 0 || !in_bounds(bd, offset, len))
    return -EINVAL;
  r = bd->drv->block_status_walk ? bd->drv->block_status_walk(bd, offset, len, walk_report, &w)
                                 : walk_by_status(bd, offset, len, walk_report, &w);
  if (r == 0 && !w.stopped && w.pos < w.end)
    deliver(&w, w.end, 0);
  return r;
}

/* ---- the frozen view of snapshot-style filters ------------------------------------------- */

int
cbt_blockdev_snapshot_pread(CbtBlockdev *bd, void *buf, guint64 offset, gsize len)
{
  if (!bd->drv->snapshot_pread)
    return -ENOTSUP;
  if (!in_bounds(bd, offset, len))
    return -EINVAL;
  return len ? bd->drv->snapshot_pread(bd, buf, offset, len) : 0;
}

int
cbt_blockdev_snapshot_block_status(CbtBlockdev *bd, guint64 offset, guint64 len, guint64 *pnum,
                                   guint32 *status)
{
  if (!bd->drv->snapshot_block_status)
    return -ENOTSUP;
  if (len == 0 || !in_bounds(bd, offset, len))
    return -EINVAL;
  int r = bd->drv->snapshot_block_status(bd, offset, len, pnum, status);
  if (r == 0 && (*pnum == 0 || *pnum > len)) {
    *pnum = len; /* as cbt_blockdev_block_status: "data" is always safe */
    *status = 0;
  }
  return r;
}

int
cbt_blockdev_snapshot_discard(CbtBlockdev *bd, guint64 offset, guint64 len)
{
  if (!bd->drv->snapshot_discard)
    return -ENOTSUP;
  if (!in_bounds(bd, offset, len))
    return -EINVAL;
  return len ? bd->drv->snapshot_discard(bd, offset, len) : 0;
}

gboolean
cbt_blockdev_writes_may_wait(CbtBlockdev *bd)
{
  /* Down the file edges, where a format's or filter's writes go (copy-before-write's source,
   * blkdebug's image, raw's file). */
  for (CbtBlockdev *n = bd; n; n = n->file ? n->file->node : NULL)
    if (n->drv->writes_wait)
      return TRUE;
  return FALSE;
}

int
cbt_blockdev_get_data_fd(CbtBlockdev *bd, guint64 *fd_offset)
{
  return bd->drv->get_data_fd ? bd->drv->get_data_fd(bd, fd_offset) : -1;
}
