/* snapshot.c — the point-in-time view behind cbtd's one-call snapshot export
 * (docs/user-guide.md, "Fleecing"): the QEMU fleecing graph, built by cbtd itself.
 *
 * For a raw node N over its file child F, all inside one drained section of N: a sparse scratch
 * file (unlinked right after it is opened) as a file node, a copy-before-write node over F with
 * the scratch as its target (on-cbw-error break-snapshot: the guest's writes never fail because
 * of the backup), N's file child swapped onto the filter (the instant of the view: no request
 * of N is in flight, and every later one passes the filter), and a snapshot-access node over the
 * filter. Every step is an action of one transaction (common/txn.h), so a failure undoes the
 * steps before it; teardown runs the same undos newest first, leaving N on F.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include "blockdev/blockdev-internal.h"
#include "common/txn.h"

struct CbtBlockdevSnapshot {
  CbtBlockdev *source;  /* N (referenced) */
  CbtBlockdev *file;    /* F, N's file child before the swap (referenced) */
  CbtBlockdev *scratch; /* the file node of the scratch */
  CbtBlockdev *cbw;
  gboolean swapped;  /* N's file child is the filter */
  CbtBlockdev *view; /* the snapshot-access node */
};

static gboolean
check_source(CbtBlockdev *bd, GError **error)
{
  if (bd->drv != &cbt_blockdev_raw_driver || !bd->file ||
      bd->file->node->drv != &cbt_blockdev_file_driver) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "cbtd can export a snapshot of a 'raw' node over a 'file' node only; node '%s' "
                "is a '%s' node",
                bd->node_name, bd->drv->name);
    return FALSE;
  }
  /* The view is the file node's: a window would show other bytes than the node's. */
  if (cbt_blockdev_raw_offset(bd) != 0 || bd->size != bd->file->node->size) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "cbtd cannot export a snapshot of node '%s': its 'offset' or 'size' makes it a "
                "window of its file node",
                bd->node_name);
    return FALSE;
  }
  return TRUE;
}

/* A sparse file of @size bytes in @dir, its name gone once the file node has it open: nothing
 * is left on disk when the daemon stops, however it stops. */
static CbtBlockdev *
open_scratch(const char *dir, guint64 size, GError **error)
{
  g_autofree char *path = g_build_filename(dir, "cbtd-scratch-XXXXXX", NULL);
  int fd = g_mkstemp_full(path, O_RDWR | O_CLOEXEC, 0600);

  if (fd < 0) {
    int e = errno;
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Cannot create a scratch file in '%s': %s", dir,
                g_strerror(e));
    return NULL;
  }
  int r = ftruncate(fd, (off_t)size);
  int e = errno;
  close(fd);
  if (r < 0) {
    unlink(path);
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Cannot size the scratch file '%s': %s", path,
                g_strerror(e));
    return NULL;
  }
  CbtQmpBlockdevOptions o = { .driver = CBT_QMP_BLOCKDEV_DRIVER_FILE };
  /* The schema's defaults (schemas/block-core.json), as a parsed blockdev-add would have. */
  o.detect_zeroes = CBT_QMP_BLOCKDEV_DETECT_ZEROES_OPTIONS_OFF;
  o.u.file.filename = path;
  o.u.file.locking = CBT_QMP_ON_OFF_AUTO_AUTO;
  o.u.file.aio = CBT_QMP_BLOCKDEV_AIO_OPTIONS_THREADS;
  o.u.file.bitmap_sync_interval = 10000;
  o.u.file.bitmap_intent_region = 64 << 20;
  CbtBlockdev *bd = cbt_blockdev_open_internal(&o, error);
  unlink(path);
  return bd;
}

static CbtBlockdev *
open_cbw(CbtBlockdev *file, CbtBlockdev *scratch, GError **error)
{
  CbtQmpBlockdevRef f = { .type = CBT_QMP_BLOCKDEV_REF_KIND_REFERENCE };
  CbtQmpBlockdevRef t = { .type = CBT_QMP_BLOCKDEV_REF_KIND_REFERENCE };
  CbtQmpBlockdevOptions o = { .driver = CBT_QMP_BLOCKDEV_DRIVER_COPY_BEFORE_WRITE,
                              .detect_zeroes = CBT_QMP_BLOCKDEV_DETECT_ZEROES_OPTIONS_OFF };

  f.u.reference = file->node_name;
  t.u.reference = scratch->node_name;
  o.u.copy_before_write.file = &f;
  o.u.copy_before_write.target = &t;
  o.u.copy_before_write.has_on_cbw_error = TRUE;
  o.u.copy_before_write.on_cbw_error = CBT_QMP_ON_CBW_ERROR_BREAK_SNAPSHOT;
  return cbt_blockdev_open_internal(&o, error);
}

static CbtBlockdev *
open_view(CbtBlockdev *cbw, GError **error)
{
  CbtQmpBlockdevRef f = { .type = CBT_QMP_BLOCKDEV_REF_KIND_REFERENCE };
  CbtQmpBlockdevOptions o = { .driver = CBT_QMP_BLOCKDEV_DRIVER_SNAPSHOT_ACCESS,
                              .detect_zeroes = CBT_QMP_BLOCKDEV_DETECT_ZEROES_OPTIONS_OFF };

  f.u.reference = cbw->node_name;
  o.u.snapshot_access.file = &f;
  return cbt_blockdev_open_internal(&o, error);
}

/* ---- the undos, each of one step; teardown runs them newest first ----------------------- */

static void
undo_drain(gpointer p)
{
  cbt_blockdev_drain_end(((CbtBlockdevSnapshot *)p)->source);
}

static void
undo_scratch(gpointer p)
{
  g_clear_pointer(&((CbtBlockdevSnapshot *)p)->scratch, cbt_blockdev_unref);
}

static void
undo_cbw(gpointer p)
{
  g_clear_pointer(&((CbtBlockdevSnapshot *)p)->cbw, cbt_blockdev_unref);
}

/* Back onto F, with N drained. Putting back the child N had can only give back permissions N
 * held before the swap, so it cannot be refused. */
static void
undo_swap(gpointer p)
{
  CbtBlockdevSnapshot *snap = p;
  g_autoptr(GError) error = NULL;

  if (!snap->swapped)
    return;
  if (!cbt_blockdev_swap_file(snap->source, snap->file, &error))
    g_critical("cannot put node '%s' back on '%s': %s", snap->source->node_name,
               snap->file->node_name, error->message);
  snap->swapped = FALSE;
}

static void
undo_view(gpointer p)
{
  g_clear_pointer(&((CbtBlockdevSnapshot *)p)->view, cbt_blockdev_unref);
}

static const CbtTxnActionOps drain_ops = { .name = "snapshot-drain", .clean = undo_drain };
static const CbtTxnActionOps scratch_ops = { .name = "snapshot-scratch", .abort = undo_scratch };
static const CbtTxnActionOps cbw_ops = { .name = "snapshot-cbw", .abort = undo_cbw };
static const CbtTxnActionOps swap_ops = { .name = "snapshot-swap", .abort = undo_swap };
static const CbtTxnActionOps view_ops = { .name = "snapshot-view", .abort = undo_view };

typedef struct {
  const char *dir;
  CbtBlockdevSnapshotFunc at_instant;
  gpointer opaque;
} BuildArgs;

/* The steps, in order; each records its undo only once it succeeded. */
static gboolean
build(CbtBlockdevSnapshot *snap, CbtTxn *txn, const BuildArgs *a, GError **error)
{
  cbt_blockdev_drain_begin(snap->source);
  cbt_txn_add(txn, &drain_ops, snap);
  if (!(snap->scratch = open_scratch(a->dir, snap->file->size, error)))
    return FALSE;
  cbt_txn_add(txn, &scratch_ops, snap);
  if (!(snap->cbw = open_cbw(snap->file, snap->scratch, error)))
    return FALSE;
  cbt_txn_add(txn, &cbw_ops, snap);
  if (!cbt_blockdev_swap_file(snap->source, snap->cbw, error))
    return FALSE;
  snap->swapped = TRUE;
  cbt_txn_add(txn, &swap_ops, snap);
  if (!(snap->view = open_view(snap->cbw, error)))
    return FALSE;
  cbt_txn_add(txn, &view_ops, snap);
  return !a->at_instant || a->at_instant(snap->source, a->opaque, error);
}

static void
snapshot_release(CbtBlockdevSnapshot *snap)
{
  g_clear_pointer(&snap->file, cbt_blockdev_unref);
  g_clear_pointer(&snap->source, cbt_blockdev_unref);
  g_free(snap);
}

CbtBlockdevSnapshot *
cbt_blockdev_snapshot_new(CbtBlockdev *bd, const char *scratch_dir,
                          CbtBlockdevSnapshotFunc at_instant, gpointer opaque, GError **error)
{
  const BuildArgs a = { scratch_dir ? scratch_dir : g_get_tmp_dir(), at_instant, opaque };

  CBT_ASSERT_MAIN_THREAD();
  if (!check_source(bd, error))
    return NULL;
  CbtBlockdevSnapshot *snap = g_new0(CbtBlockdevSnapshot, 1);
  snap->source = cbt_blockdev_ref(bd);
  snap->file = cbt_blockdev_ref(bd->file->node);
  CbtTxn *txn = cbt_txn_new(TRUE);
  gboolean ok = build(snap, txn, &a, error);
  cbt_txn_finish(txn, ok);
  if (!ok) {
    snapshot_release(snap);
    return NULL;
  }
  g_debug("snapshot of '%s': filter '%s', scratch '%s', view '%s'", bd->node_name,
          snap->cbw->node_name, snap->scratch->node_name, snap->view->node_name);
  return snap;
}

void
cbt_blockdev_snapshot_set_limit(CbtBlockdevSnapshot *snap, guint64 max_bytes,
                                CbtBlockdevSnapshotBrokenFunc fn, gpointer data)
{
  cbt_blockdev_cbw_set_limit(snap->cbw, max_bytes, fn, data);
}

CbtBlockdev *
cbt_blockdev_snapshot_get_view(CbtBlockdevSnapshot *snap)
{
  return snap->view;
}

CbtBlockdev *
cbt_blockdev_snapshot_get_source(CbtBlockdevSnapshot *snap)
{
  return snap->source;
}

void
cbt_blockdev_snapshot_free(CbtBlockdevSnapshot *snap)
{
  CBT_ASSERT_MAIN_THREAD();
  if (!snap)
    return;
  undo_view(snap);
  cbt_blockdev_drain_begin(snap->source);
  undo_swap(snap);
  undo_drain(snap);
  undo_cbw(snap);
  undo_scratch(snap);
  snapshot_release(snap);
}
