/* backup.c — the backup job: blockdev-backup and its transaction action (QEMU 7.2's
 * block/backup.c and blockdev.c; docs/user-guide.md, "Jobs and push-mode backup").
 *
 * At the job's instant (the source drained: one transaction with the other actions) the bitmap,
 * if any, is frozen with a successor (dirty-bitmaps/frozen.c) and a copy-before-write filter
 * goes over the source with the target as its target (blockdev/backup-filter.c). From then on
 * the filter copies a cluster's old data before any write changes it, and the job's thread
 * copies the clusters the sync mode selects that the filter has not, one chunk at a time. So
 * the target ends up equal to the source at the instant, whatever was written meanwhile.
 *
 * Invariants:
 *  (1) The bitmap's selection, the successor and the filter are taken in one drained section of
 *      the source: a write is either before the instant (in the selection, its data in the
 *      source when the filter went in) or after it (in the successor, its old data copied by
 *      the filter first).
 *  (2) The job's I/O in flight is bounded: one 64 KiB cluster with a speed limit, else WORKERS
 *      ranges of 1 MiB copied by the job's pool, all of which end before the job's thread
 *      reaches its next pause point (so a paused job does no I/O); a failed copy's clusters
 *      stay to be copied.
 *  (3) The bitmap's end follows QEMU's rules only after the job's thread has ended (commit or
 *      abort on the main thread), and the filter leaves last (clean), so no cluster of the
 *      selection is lost in between.
 *  (4) The target and the filter are blocked while the job exists (other jobs and blockdev-del:
 *      "Node 'X' is busy: block device is in use by block job: backup"), and the source is
 *      held ("Block device X is in use"), as QEMU's op blockers and references do.
 */
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include "blockdev/transaction.h"
#include "common/memory.h"
#include "dirty-bitmaps/dirty-bitmaps.h"
#include "job/job-internal.h"
#include "schemas/qmp-commands.h"

#define CHUNK_LIMITED (64u * 1024) /* with a speed limit: one cluster at a time */
#define CHUNK_MAX (1024u * 1024)   /* without: ranges of this size... */
#define WORKERS 4                  /* ...this many at a time (x-perf's max-workers, at most... */
#define MAX_WORKERS 16             /* ...this many) */
#define CLUSTER (64u * 1024)

typedef struct {
  CbtBlockdev *source, *target; /* referenced; the source held, the target blocked */
  CbtBlockdevBackupFilter *filter;
  CbtDirtyBitmapsFrozen *frozen;
  CbtQmpMirrorSyncMode sync;
  CbtQmpBitmapSyncMode bitmap_mode;
  CbtQmpBlockdevOnError on_source_error, on_target_error;
  guint workers; /* copies in flight without a speed limit */
  guint64 chunk; /* bytes per copy without a speed limit */
  CbtJob *job;
} Backup;

#define BLOCKED_BY "block device is in use by block job: backup"

/* ---- the job --------------------------------------------------------------------------------- */

/* One round of copies: @n ranges of CHUNK_MAX from @base, each copied by a thread of the pool
 * (the job's bound on I/O in flight, (2)), the job's thread waiting for all of them. */
typedef struct {
  CbtBlockdevBackupFilter *filter;
  guint64 lo, hi;
  int r;
  gboolean is_read;
  CbtMutex *lock;
  pthread_cond_t *cond;
  guint *left;
} Range;

static void
copy_range(Range *rg)
{
  for (guint64 pos = rg->lo; pos < rg->hi;) {
    guint64 stop = pos;
    int r = cbt_blockdev_backup_filter_copy(rg->filter, pos, rg->hi - pos, &stop, &rg->is_read);
    if (r != 0) {
      rg->r = r < 0 ? r : 0; /* 1: nothing left to copy in the range */
      break;
    }
    pos = stop;
  }
  cbt_mutex_lock(rg->lock);
  if (--*rg->left == 0)
    pthread_cond_broadcast(rg->cond);
  cbt_mutex_unlock(rg->lock);
}

/* The job's copy threads, its own and joined when its work ends (a GThreadPool's threads end
 * on their own after the pool is freed, behind everyone's back). */
typedef struct {
  CbtMutex lock;
  pthread_cond_t cond; /* a range to copy, or the end */
  Range *queue[MAX_WORKERS];
  guint n_queued;
  gboolean stop;
  GThread *threads[MAX_WORKERS];
  guint n;
} Workers;

static gpointer
copy_thread(gpointer data)
{
  Workers *w = data;

  cbt_memory_thread_begin();
  cbt_mutex_lock(&w->lock);
  for (;;) {
    if (w->n_queued) {
      Range *rg = w->queue[--w->n_queued];
      cbt_mutex_unlock(&w->lock);
      copy_range(rg);
      cbt_mutex_lock(&w->lock);
    } else if (w->stop) {
      break;
    } else {
      cbt_mutex_cond_wait(&w->lock, &w->cond);
    }
  }
  cbt_mutex_unlock(&w->lock);
  return NULL;
}

static void
workers_start(Workers *w, guint n)
{
  memset(w, 0, sizeof(*w));
  cbt_mutex_init(&w->lock);
  pthread_cond_init(&w->cond, NULL);
  for (guint i = 0; i < n; i++)
    w->threads[w->n++] = g_thread_new("cbtd-job-copy", copy_thread, w);
}

static void
workers_push(Workers *w, Range *rg)
{
  cbt_mutex_lock(&w->lock);
  w->queue[w->n_queued++] = rg;
  pthread_cond_signal(&w->cond);
  cbt_mutex_unlock(&w->lock);
}

static void
workers_stop(Workers *w)
{
  cbt_mutex_lock(&w->lock);
  w->stop = TRUE;
  pthread_cond_broadcast(&w->cond);
  cbt_mutex_unlock(&w->lock);
  for (guint i = 0; i < w->n; i++)
    g_thread_join(w->threads[i]);
  pthread_cond_destroy(&w->cond);
  cbt_mutex_clear(&w->lock);
}

/* Copy from @base: the clusters of up to WORKERS ranges in parallel without a speed limit, one
 * cluster with one. Returns 0 and the end of what was covered in *end, or the failure of the
 * lowest range that failed (its clusters stay to copy). */
static int
copy_round(Backup *b, Workers *pool, guint64 base, gboolean limited, guint64 *end,
           gboolean *is_read)
{
  if (limited) {
    *end = base + CHUNK_LIMITED;
    return cbt_blockdev_backup_filter_copy(b->filter, base, CHUNK_LIMITED, end, is_read);
  }
  Range rg[MAX_WORKERS];
  CbtMutex lock;
  pthread_cond_t cond;
  guint left = b->workers;

  cbt_mutex_init(&lock);
  pthread_cond_init(&cond, NULL);
  for (guint i = 0; i < b->workers; i++) {
    rg[i] =
      (Range){ b->filter, base + i * b->chunk, base + (i + 1) * b->chunk, 0, FALSE, &lock, &cond,
               &left };
    workers_push(pool, &rg[i]);
  }
  cbt_mutex_lock(&lock);
  while (left)
    cbt_mutex_cond_wait(&lock, &cond);
  cbt_mutex_unlock(&lock);
  cbt_mutex_clear(&lock);
  pthread_cond_destroy(&cond);
  *end = base + b->workers * b->chunk;
  for (guint i = 0; i < b->workers; i++)
    if (rg[i].r < 0) {
      *is_read = rg[i].is_read;
      return rg[i].r;
    }
  return 0;
}

static int
copy_all(CbtJob *job, Backup *b, Workers *pool)
{
  guint64 off = 0;

  for (;;) {
    cbt_job_pause_point(job);
    if (cbt_job_is_cancelled(job))
      return 0; /* job.c makes it ECANCELED */
    gint64 next = cbt_blockdev_backup_filter_next(b->filter, off);
    if (next < 0) {
      /* A copy for a writer in flight may still fail and leave its clusters to do. */
      cbt_blockdev_backup_filter_settle(b->filter);
      if ((next = cbt_blockdev_backup_filter_next(b->filter, 0)) < 0)
        return 0;
    }
    gboolean limited = cbt_job_get_speed(job) != 0;
    guint64 stop = (guint64)next;
    gboolean is_read = FALSE;
    int r = copy_round(b, pool, (guint64)next, limited, &stop, &is_read);
    if (r < 0) {
      CbtQmpBlockErrorAction a =
        cbt_job_error_action(job, is_read ? b->on_source_error : b->on_target_error, is_read, -r);
      if (a == CBT_QMP_BLOCK_ERROR_ACTION_REPORT)
        return r;
      off = (guint64)next; /* ignore and stop try again (2) */
    } else {
      off = stop;
    }
    if (limited)
      cbt_job_rate_limit(job, stop - (guint64)next);
  }
}

static int
backup_run(CbtJob *job, GError **error)
{
  Backup *b = cbt_job_get_opaque(job);

  if (b->sync == CBT_QMP_MIRROR_SYNC_MODE_NONE) {
    /* The filter does the work; the job lasts until it is cancelled (QEMU's). */
    cbt_job_wait_cancelled(job);
    return 0;
  }
  Workers pool;
  workers_start(&pool, b->workers);
  int r = copy_all(job, b, &pool);
  workers_stop(&pool);
  return r;
}

static void
backup_progress(CbtJob *job, guint64 *done, guint64 *total)
{
  Backup *b = cbt_job_get_opaque(job);

  *done = cbt_blockdev_backup_filter_progress(b->filter);
  *total = cbt_blockdev_backup_filter_total(b->filter);
}

/* QEMU's backup_cleanup_sync_bitmap (3). */
static void
end_bitmap(Backup *b, int ret)
{
  if (!b->frozen)
    return;
  gboolean always = b->bitmap_mode == CBT_QMP_BITMAP_SYNC_MODE_ALWAYS;
  gboolean sync = (ret == 0 || always) && b->bitmap_mode != CBT_QMP_BITMAP_SYNC_MODE_NEVER;
  g_autoptr(CbtBitmap) left = NULL;
  if (ret < 0 && always) {
    cbt_blockdev_drain_begin(b->source);
    left = cbt_blockdev_backup_filter_remaining(b->filter);
    cbt_blockdev_drain_end(b->source);
  }
  cbt_dirty_bitmaps_frozen_end(b->frozen, sync, left);
  b->frozen = NULL;
}

static void
backup_commit(CbtJob *job)
{
  end_bitmap(cbt_job_get_opaque(job), 0);
}

static void
backup_abort(CbtJob *job)
{
  end_bitmap(cbt_job_get_opaque(job), cbt_job_get_ret(job));
}

static void
release(Backup *b)
{
  end_bitmap(b, -ECANCELED);
  if (b->filter) {
    cbt_blockdev_unblock(cbt_blockdev_backup_filter_node(b->filter));
    g_clear_pointer(&b->filter, cbt_blockdev_backup_filter_free);
  }
  if (b->target) {
    cbt_blockdev_unblock(b->target);
    g_clear_pointer(&b->target, cbt_blockdev_unref);
  }
  if (b->source) {
    cbt_blockdev_unhold(b->source);
    g_clear_pointer(&b->source, cbt_blockdev_unref);
  }
}

static void
backup_clean(CbtJob *job)
{
  release(cbt_job_get_opaque(job));
}

static void
backup_free(gpointer opaque)
{
  Backup *b = opaque;

  release(b);
  g_free(b);
}

static const CbtJobDriver backup_driver = {
  .type = CBT_QMP_JOB_TYPE_BACKUP,
  .run = backup_run,
  .progress = backup_progress,
  .commit = backup_commit,
  .abort = backup_abort,
  .clean = backup_clean,
  .free = backup_free,
};

/* ---- the checks, in QEMU's order ------------------------------------------------------------ */

static CbtBlockdev *
lookup_node(const char *name, GError **error)
{
  CbtBlockdev *bd = cbt_blockdev_find(name);

  if (!bd)
    g_set_error(error, CBT_JOB_ERROR, 0, "Cannot find device='%s' nor node-name='%s'", name, name);
  return bd;
}

/* QEMU's do_backup_common: the sync mode against the bitmap arguments. */
static gboolean
check_bitmap_args(const CbtQmpBlockdevBackup *a, CbtBlockdev *source, CbtQmpMirrorSyncMode *sync,
                  CbtQmpBitmapSyncMode *mode, CbtDirtyBitmap **pdbm, GError **error)
{
  gboolean has_mode = a->has_bitmap_mode;

  *sync = a->sync;
  *mode = a->bitmap_mode;
  *pdbm = NULL;
  if ((a->sync == CBT_QMP_MIRROR_SYNC_MODE_BITMAP ||
       a->sync == CBT_QMP_MIRROR_SYNC_MODE_INCREMENTAL) &&
      !a->bitmap) {
    g_set_error(error, CBT_JOB_ERROR, 0, "must provide a valid bitmap name for '%s' sync mode",
                cbt_qmp_mirror_sync_mode_to_string(a->sync));
    return FALSE;
  }
  if (a->sync == CBT_QMP_MIRROR_SYNC_MODE_INCREMENTAL) {
    if (has_mode && a->bitmap_mode != CBT_QMP_BITMAP_SYNC_MODE_ON_SUCCESS) {
      g_set_error(error, CBT_JOB_ERROR, 0,
                  "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'");
      return FALSE;
    }
    has_mode = TRUE;
    *sync = CBT_QMP_MIRROR_SYNC_MODE_BITMAP;
    *mode = CBT_QMP_BITMAP_SYNC_MODE_ON_SUCCESS;
  }
  if (a->bitmap) {
    CbtDirtyBitmap *dbm = cbt_dirty_bitmaps_get(source, a->bitmap);
    if (!dbm) {
      g_set_error(error, CBT_JOB_ERROR, 0, "Bitmap '%s' could not be found", a->bitmap);
      return FALSE;
    }
    if (!has_mode) {
      g_set_error_literal(error, CBT_JOB_ERROR, 0,
                          "Bitmap sync mode must be given when providing a bitmap");
      return FALSE;
    }
    if (!cbt_dirty_bitmap_check(dbm, CBT_DIRTY_BITMAP_CHECK_ALLOW_RO, error))
      return FALSE;
    if (*sync == CBT_QMP_MIRROR_SYNC_MODE_NONE) {
      g_set_error_literal(error, CBT_JOB_ERROR, 0,
                          "sync mode 'none' does not produce meaningful bitmap outputs");
      return FALSE;
    }
    if (*mode == CBT_QMP_BITMAP_SYNC_MODE_NEVER && *sync != CBT_QMP_MIRROR_SYNC_MODE_BITMAP) {
      g_set_error(error, CBT_JOB_ERROR, 0,
                  "Bitmap sync mode 'never' has no meaningful effect when combined with sync "
                  "mode '%s'",
                  cbt_qmp_mirror_sync_mode_to_string(*sync));
      return FALSE;
    }
    *pdbm = dbm;
  } else if (has_mode) {
    g_set_error_literal(error, CBT_JOB_ERROR, 0,
                        "Cannot specify bitmap sync mode without a bitmap");
    return FALSE;
  }
  return TRUE;
}

/* QEMU's backup_job_create, up to the filter. */
static gboolean
check_nodes(const CbtQmpBlockdevBackup *a, CbtBlockdev *source, CbtBlockdev *target,
            CbtDirtyBitmap *dbm, CbtQmpBitmapSyncMode mode, GError **error)
{
  if (source == target) {
    g_set_error_literal(error, CBT_JOB_ERROR, 0, "Source and target cannot be the same");
    return FALSE;
  }
  if (a->has_compress && a->compress) {
    /* A node has no device name, so QEMU's text ends with an empty one. */
    g_set_error_literal(error, CBT_JOB_ERROR, 0, "Compression is not supported for this drive ");
    return FALSE;
  }
  if (!cbt_blockdev_check_unblocked(source, error) || !cbt_blockdev_check_unblocked(target, error))
    return FALSE;
  const CbtQmpBackupPerf *perf = a->x_perf;
  if (perf && perf->has_max_workers && (perf->max_workers < 1 || perf->max_workers > G_MAXINT)) {
    g_set_error(error, CBT_JOB_ERROR, 0, "max-workers must be between 1 and %d", G_MAXINT);
    return FALSE;
  }
  if (perf && perf->has_max_chunk && perf->max_chunk < 0) {
    g_set_error_literal(error, CBT_JOB_ERROR, 0,
                        "max-chunk must be zero (which means no limit) or positive");
    return FALSE;
  }
  if (dbm && mode != CBT_QMP_BITMAP_SYNC_MODE_NEVER &&
      !cbt_dirty_bitmap_check(dbm, CBT_DIRTY_BITMAP_CHECK_ALL, error))
    return FALSE;
  if (cbt_blockdev_get_size(source) != cbt_blockdev_get_size(target)) {
    g_set_error_literal(error, CBT_JOB_ERROR, 0, "Source and target image have different sizes");
    return FALSE;
  }
  /* QEMU checks this once its filter is in; nothing can fail in between here. */
  if (perf && perf->has_max_chunk && perf->max_chunk && perf->max_chunk < CLUSTER) {
    g_set_error(error, CBT_JOB_ERROR, 0,
                "Required max-chunk (%" G_GINT64_FORMAT ") is less than backup cluster size (%u)",
                perf->max_chunk, CLUSTER);
    return FALSE;
  }
  return TRUE;
}

/* ---- the action ------------------------------------------------------------------------------ */

static void
txn_commit(gpointer opaque)
{
  cbt_job_start(opaque);
}

static void
txn_abort(gpointer opaque)
{
  cbt_job_cancel_unstarted(opaque);
}

static void
txn_clean(gpointer opaque)
{
  cbt_job_unref(opaque);
}

static const CbtTxnActionOps backup_ops = { "blockdev-backup", txn_commit, txn_abort, txn_clean };

/* The group of the jobs of the grouped transaction being prepared (one at a time). */
static CbtTxn *group_txn;
static CbtJobGroup *group;

static void
group_clean(gpointer opaque)
{
  g_clear_pointer(&group, cbt_job_group_unref);
  group_txn = NULL;
}

static const CbtTxnActionOps group_ops = { "job-group", NULL, NULL, group_clean };

static void
join_group(CbtJob *job, CbtTxn *txn)
{
  if (!cbt_blockdev_txn_is_grouped(txn))
    return;
  if (group_txn != txn) {
    group = cbt_job_group_new();
    group_txn = txn;
    cbt_txn_add(txn, &group_ops, NULL);
  }
  cbt_job_group_add(group, job);
}

/* The job's instant (1): with the source drained until the transaction ends. */
static Backup *
take_instant(const CbtQmpBlockdevBackup *a, CbtBlockdev *source, CbtBlockdev *target,
             CbtDirtyBitmap *dbm, CbtTxn *txn, GError **error)
{
  Backup *b = g_new0(Backup, 1);

  cbt_blockdev_drain_in_txn(source, txn);
  if (dbm)
    b->frozen = cbt_dirty_bitmaps_freeze_for_job(source, dbm);
  const CbtBitmap *select = NULL;
  if (dbm && a->sync != CBT_QMP_MIRROR_SYNC_MODE_FULL && a->sync != CBT_QMP_MIRROR_SYNC_MODE_TOP)
    select = cbt_dirty_bitmaps_frozen_selection(b->frozen);
  b->filter = cbt_blockdev_backup_filter_new(source, target, a->filter_node_name, select, error);
  if (!b->filter) {
    backup_free(b);
    return NULL;
  }
  cbt_blockdev_block(cbt_blockdev_backup_filter_node(b->filter), BLOCKED_BY);
  b->source = cbt_blockdev_ref(source);
  cbt_blockdev_hold(source);
  b->target = cbt_blockdev_ref(target);
  cbt_blockdev_block(target, BLOCKED_BY);
  return b;
}

static gboolean
backup_prepare(const CbtQmpBlockdevBackup *a, CbtTxn *txn, GError **error)
{
  CbtQmpMirrorSyncMode sync;
  CbtQmpBitmapSyncMode mode;
  CbtDirtyBitmap *dbm;
  CbtBlockdev *source = lookup_node(a->device, error);
  CbtBlockdev *target = source ? lookup_node(a->target, error) : NULL;

  if (!target || !check_bitmap_args(a, source, &sync, &mode, &dbm, error) ||
      !check_nodes(a, source, target, dbm, mode, error))
    return FALSE;
  Backup *b = take_instant(a, source, target, dbm, txn, error);
  if (!b)
    return FALSE;
  b->sync = sync;
  b->bitmap_mode = mode;
  b->on_source_error = a->on_source_error;
  b->on_target_error = a->on_target_error;
  const CbtQmpBackupPerf *perf = a->x_perf;
  b->workers = perf && perf->has_max_workers ? (guint)MIN(perf->max_workers, MAX_WORKERS) : WORKERS;
  b->chunk = perf && perf->has_max_chunk && perf->max_chunk
               ? MIN((guint64)perf->max_chunk / CLUSTER * CLUSTER, CHUNK_MAX)
               : CHUNK_MAX;
  /* QEMU takes the device's name for an absent id: a node has none. */
  CbtJob *job = cbt_job_create(a->job_id ? a->job_id : "", &backup_driver, b, a->auto_finalize,
                               a->auto_dismiss, error);
  if (job && a->has_speed && !cbt_job_set_speed(job, a->speed, error)) {
    cbt_job_early_fail(job);
    job = NULL;
  }
  if (!job) {
    backup_free(b);
    return FALSE;
  }
  b->job = job;
  join_group(job, txn);
  cbt_txn_add(txn, &backup_ops, cbt_job_ref(job));
  return TRUE;
}

static gboolean
txn_prepare(const CbtQmpTransactionAction *act, CbtTxn *txn, GError **error)
{
  return backup_prepare(act->u.blockdev_backup.data, txn, error);
}

gboolean
cbt_qmp_blockdev_backup(const CbtQmpBlockdevBackup *args, GError **error)
{
  /* QEMU runs the command as a transaction of one action. */
  CbtTxn *txn = cbt_txn_new(FALSE);

  return cbt_txn_finish(txn, backup_prepare(args, txn, error));
}

void
cbt_job_init(void)
{
  cbt_blockdev_txn_register(CBT_QMP_TRANSACTION_ACTION_KIND_BLOCKDEV_BACKUP, txn_prepare);
}
