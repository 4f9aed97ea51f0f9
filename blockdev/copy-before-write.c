/* copy-before-write.c — QEMU's `copy-before-write` filter, the writer's half of fleecing
 * (docs/architecture.md, "The four seams"; QEMU's qapi BlockdevOptionsCbw). Reads and writes
 * pass to `file`; before a write, zero-write or discard reaches a cluster of `file` whose old
 * data the snapshot still needs, that data is copied to `target`. The snapshot_* hooks serve
 * the frozen view to a snapshot-access node above (snapshot-access.c).
 *
 * A cluster (CBW_CLUSTER bytes) is in one of these states, all under CbwState.lock:
 *   need            its old data must reach the target before any write reaches it in file
 *   being copied    claimed by one copy (need cleared, a COPY request in `reqs`, not done)
 *   done            its old data is in target (data runs) or in `zero` (zero runs); a write
 *                   marks its whole range done, as QEMU, so clusters outside `access` may be
 *                   done without a copy: no read ever looks at them
 *   free            none of those: outside the bitmap, discarded from the snapshot, or the
 *                   snapshot is broken; writes pass straight through
 * `access` says which clusters the snapshot may read (all, or the bitmap's); reading outside it,
 * or once the snapshot broke, fails with EACCES as QEMU's.
 *
 * Invariants (the ordering rule and what makes it hold):
 *  (1) No write, zero-write or discard reaches `file` in a cluster the snapshot needs until the
 *      cluster's old data is in `target` (done): before_write() returns only when no cluster of
 *      its range is `need` or being copied. A failed copy puts its clusters back to `need`
 *      (break-guest-write: the write fails with the copy's error) or breaks the snapshot
 *      (break-snapshot: snapshot_error is set first, so no later snapshot read succeeds).
 *  (2) Each cluster is copied at most once at a time: a copy claims its clusters (clears
 *      `need`) under the lock; any other writer touching them waits on `cond` until the copy
 *      is done or has failed.
 *  (3) A snapshot read of a cluster that is not done reads `file` under a FROZEN request; a
 *      writer whose clusters are done still waits until no frozen request overlaps it, so such
 *      a read never sees new data. Done clusters are read from target (or as zeroes), one run
 *      of equal state at a time: a request that starts in a copied cluster and runs past it is
 *      split, never served from the live disk (qemu-storage-daemon 7.2 does that: a bug).
 *  (4) A snapshot read returns success only if the snapshot was not broken when it finished.
 *  (5) Every bitmap here is read and changed under `lock` only (the functions named _locked
 *      check it); I/O never runs under it.
 *  (6) A discard of the snapshot waits until no copy into its clusters and no read of them
 *      from the target (TARGET requests) is in flight, so no read returns the scratch's
 *      zeroes in place of frozen data.
 *  (7) Nothing writes `file` around this node: while the filter is used it unshares write on
 *      `file` (cbw_child_perm), and the graph refuses a conflicting writer (graph.c (3)).
 */
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <time.h>
#include "blockdev/blockdev-internal.h"
#include "common/memory.h"

#define CBW_CLUSTER (64u * 1024)    /* QEMU's block-copy default cluster size */
#define CBW_ZERO_GRANULARITY 512u   /* zero runs of the source are recorded at this size */
#define CBW_MAX_COPY (1024u * 1024) /* one copy claims at most this much */
#define ROUND_DOWN(x, a) ((x) / (a) * (a))
#define ROUND_UP(x, a) ROUND_DOWN((x) + (a)-1, (a))

/* What is in flight: a copy, a snapshot read or status of the source (writers wait for it), or
 * one of the target (a discard of the snapshot waits for it). */
typedef enum { REQ_COPY, REQ_FROZEN, REQ_TARGET } ReqKind;

typedef struct {
  guint64 offset, end;
  ReqKind kind;
} Req;

typedef struct {
  CbtBlockdev *target;
  CbtQmpOnCbwError on_error;
  guint32 timeout_s; /* cbw-timeout: a writer waits this long for its copy (0: no limit) */
  CbtMutex lock;     /* a CbtMutex and a pthread condition, so ThreadSanitizer sees the ordering */
  pthread_cond_t cond;
  CbtBitmap *need, *done, *access; /* CBW_CLUSTER granularity */
  CbtBitmap *zero;                 /* CBW_ZERO_GRANULARITY: zero runs of done clusters */
  GPtrArray *reqs;                 /* Req *, in flight */
  int snapshot_error;              /* < 0 once a copy failed with break-snapshot */
  guint64 copied, max_copied;      /* bytes written to the target (atomic); 0: no bound */
  guint64 progress;                /* bytes of clusters made done by a copy (atomic) */
  gboolean zero_target; /* a backup's filter: zero runs are written to the target as zeroes */
  CbtBlockdevSnapshotBrokenFunc broken;
  gpointer broken_data;
} CbwState;

static CbtBlockdevBitmapCopyFunc bitmap_copy_fn;

void
cbt_blockdev_cbw_set_limit(CbtBlockdev *cbw, guint64 max_bytes, CbtBlockdevSnapshotBrokenFunc fn,
                           gpointer data)
{
  CbwState *s = cbw->opaque;

  CBT_ASSERT_MAIN_THREAD();
  cbt_mutex_lock(&s->lock);
  s->max_copied = max_bytes;
  s->broken = fn;
  s->broken_data = data;
  cbt_mutex_unlock(&s->lock);
}

void
cbt_blockdev_set_bitmap_copy(CbtBlockdevBitmapCopyFunc fn)
{
  CBT_ASSERT_MAIN_THREAD();
  bitmap_copy_fn = fn;
}

static CbwState *
state(CbtBlockdev *bd)
{
  return bd->opaque;
}

static CbtBlockdev *
source(CbtBlockdev *bd)
{
  return bd->file->node;
}

/* ---- in-flight requests (under lock) ------------------------------------------------------- */

static Req *
req_add_locked(CbwState *s, guint64 offset, guint64 end, ReqKind kind)
{
  Req *r = g_new(Req, 1);

  CBT_ASSERT_HELD(&s->lock);
  *r = (Req){ offset, end, kind };
  g_ptr_array_add(s->reqs, r);
  return r;
}

static void
req_remove_locked(CbwState *s, Req *r)
{
  CBT_ASSERT_HELD(&s->lock);
  g_ptr_array_remove_fast(s->reqs, r);
  g_free(r);
  pthread_cond_broadcast(&s->cond);
}

static gboolean
overlaps_locked(CbwState *s, guint64 offset, guint64 end, ReqKind kind)
{
  CBT_ASSERT_HELD(&s->lock);
  for (guint i = 0; i < s->reqs->len; i++) {
    Req *r = g_ptr_array_index(s->reqs, i);
    if (r->kind == kind && r->offset < end && offset < r->end)
      return TRUE;
  }
  return FALSE;
}

/* End of the run of chunks from @offset whose bit in @bm equals @set, at most @end. */
static guint64
run_end(const CbtBitmap *bm, gboolean set, guint64 offset, guint64 end)
{
  gint64 next =
    set ? cbt_bitmap_next_clean(bm, offset, end) : cbt_bitmap_next_dirty(bm, offset, end);

  return next < 0 ? end : (guint64)next;
}

/* ---- the copy ---------------------------------------------------------------------------------
 */

typedef struct {
  GArray *zeros; /* guint64 pairs: zero runs found, recorded when the copy succeeds */
} CopyResult;

static int
copy_data(CbtBlockdev *bd, guint64 offset, guint64 end, gboolean *is_read)
{
  if (offset >= end)
    return 0;
  CbwState *s = state(bd);
  /* The scratch's bound counts what it was asked to hold, failed copies included. */
  if (s->max_copied &&
      __atomic_add_fetch(&s->copied, end - offset, __ATOMIC_RELAXED) > s->max_copied)
    return -ENOSPC;
  g_autofree guint8 *buf = g_malloc(end - offset);
  int r = cbt_blockdev_pread(source(bd), buf, offset, end - offset);
  *is_read = r < 0;
  return r < 0 ? r : cbt_blockdev_pwrite(state(bd)->target, buf, offset, end - offset, 0);
}

/* Copy the old data of [offset, end) (claimed by the caller) to the target: data runs are
 * written, zero runs are only recorded (the target is never asked to hold them, so a sparse
 * scratch stays sparse and the snapshot reports holes where the source had them). */
static int
copy_range(CbtBlockdev *bd, guint64 offset, guint64 end, GArray *zeros, gboolean *is_read)
{
  for (guint64 pos = offset; pos < end;) {
    guint64 pnum = 0;
    guint32 st = 0;
    int r = cbt_blockdev_block_status(source(bd), pos, end - pos, &pnum, &st);
    *is_read = TRUE;
    if (r < 0)
      return r;
    /* A backup's target is a real image, not a zeroed scratch: its zeroes must be written. */
    if ((st & CBT_BLOCKDEV_STATUS_ZERO) && state(bd)->zero_target) {
      *is_read = FALSE;
      if ((r = cbt_blockdev_write_zeroes(state(bd)->target, pos, pnum, 0)) < 0)
        return r;
      pos += pnum;
      continue;
    }
    guint64 zs = ROUND_UP(pos, CBW_ZERO_GRANULARITY),
            ze = ROUND_DOWN(pos + pnum, CBW_ZERO_GRANULARITY);
    if ((st & CBT_BLOCKDEV_STATUS_ZERO) && zs < ze) {
      /* The unaligned edges of a zero run are copied as data. */
      if ((r = copy_data(bd, pos, zs, is_read)) < 0 ||
          (r = copy_data(bd, ze, pos + pnum, is_read)) < 0)
        return r;
      g_array_append_val(zeros, zs);
      g_array_append_val(zeros, ze);
    } else if ((r = copy_data(bd, pos, pos + pnum, is_read)) < 0) {
      return r;
    }
    pos += pnum;
  }
  return 0;
}

/* break-snapshot: from now on every snapshot read fails, writes pass (1). */
static void
break_snapshot_locked(CbtBlockdev *bd, CbwState *s, int r)
{
  CBT_ASSERT_HELD(&s->lock);
  if (s->snapshot_error)
    return;
  s->snapshot_error = r;
  /* The one report of it: a full scratch (ENOSPC) ends up here (docs/user-guide.md). */
  g_message("copy-before-write node '%s': copying old data to target '%s' failed (%s); the "
            "snapshot is broken, its reads fail from now on, writes to the source go on",
            bd->node_name, s->target->node_name, g_strerror(-r));
  if (s->broken)
    s->broken(r, s->broken_data);
}

/* The end of one copy, under lock: (1) and (2). */
static void
copy_finish_locked(CbtBlockdev *bd, CbwState *s, Req *req, int r, GArray *zeros)
{
  guint64 len = req->end - req->offset;

  CBT_ASSERT_HELD(&s->lock);
  if (r == 0) {
    for (guint i = 0; i + 1 < zeros->len; i += 2) {
      guint64 zs = g_array_index(zeros, guint64, i), ze = g_array_index(zeros, guint64, i + 1);
      cbt_bitmap_mark_range(s->zero, zs, ze - zs);
    }
    cbt_bitmap_mark_range(s->done, req->offset, len);
    __atomic_add_fetch(&s->progress, len, __ATOMIC_RELAXED);
  } else if (s->on_error == CBT_QMP_ON_CBW_ERROR_BREAK_GUEST_WRITE) {
    cbt_bitmap_mark_range(s->need, req->offset, len);
  } else {
    break_snapshot_locked(bd, s, r);
  }
  req_remove_locked(s, req);
}

/* cbw-timeout: the copy runs on a thread of its own and the writer waits for it at most
 * timeout_s. A copy that takes longer fails for the writer (QEMU's semantics: on-cbw-error
 * decides) but goes on: it still owns its clusters (a later writer waits for it, (2)) and
 * finishes them as any copy, done or back to need. It holds the node in flight, so a drain or
 * the node's end waits for it. */
typedef struct {
  CbtBlockdev *bd;
  Req *req;
  int r;
  gboolean finished;  /* under lock */
  gboolean abandoned; /* under lock: the writer left; the thread frees this */
} TimedCopy;

static gpointer
timed_copy_thread(gpointer data)
{
  TimedCopy *c = data;
  CbtBlockdev *bd = c->bd;
  CbwState *s = state(bd);
  gboolean is_read;

  cbt_memory_thread_begin();
  g_autoptr(GArray) zeros = g_array_new(FALSE, FALSE, sizeof(guint64));
  int r = copy_range(bd, c->req->offset, c->req->end, zeros, &is_read);

  cbt_mutex_lock(&s->lock);
  copy_finish_locked(bd, s, c->req, r, zeros);
  c->r = r;
  c->finished = TRUE;
  gboolean abandoned = c->abandoned;
  pthread_cond_broadcast(&s->cond);
  cbt_mutex_unlock(&s->lock);
  if (abandoned)
    g_free(c);
  cbt_blockdev_io_end(bd);
  return NULL;
}

static int
copy_timed_locked(CbtBlockdev *bd, CbwState *s, Req *req)
{
  CBT_ASSERT_HELD(&s->lock);
  TimedCopy *c = g_new0(TimedCopy, 1);
  gint64 end = g_get_monotonic_time() + (gint64)s->timeout_s * G_USEC_PER_SEC;
  struct timespec ts = { .tv_sec = end / G_USEC_PER_SEC, .tv_nsec = end % G_USEC_PER_SEC * 1000 };

  c->bd = bd;
  c->req = req;
  /* The writer is in flight on @bd, so no drain can be between here and the thread's end. */
  g_atomic_int_inc(&bd->inflight);
  GThread *t = g_thread_try_new("cbw-copy", timed_copy_thread, c, NULL);
  if (!t) {
    g_free(c);
    cbt_blockdev_io_end(bd);
    copy_finish_locked(bd, s, req, -EAGAIN, NULL);
    return -EAGAIN;
  }
  g_thread_unref(t);
  while (!c->finished)
    if (cbt_mutex_cond_timedwait(&s->lock, &s->cond, &ts) == ETIMEDOUT && !c->finished)
      break;
  if (c->finished) {
    int r = c->r;
    g_free(c);
    return r;
  }
  c->abandoned = TRUE;
  if (s->on_error == CBT_QMP_ON_CBW_ERROR_BREAK_SNAPSHOT)
    break_snapshot_locked(bd, s, -ETIMEDOUT);
  return -ETIMEDOUT;
}

/* Claim and copy the first run of `need` clusters in [offset, end), with the lock held (it is
 * dropped for the I/O). Returns 1 when there was nothing to claim, else the copy's result;
 * @stop_out (may be NULL) gets the end of the run claimed, @is_read whether a read failed. */
static int
copy_one_locked(CbtBlockdev *bd, guint64 offset, guint64 end, guint64 *stop_out, gboolean *is_read)
{
  CbwState *s = state(bd);
  CBT_ASSERT_HELD(&s->lock);
  gint64 first = cbt_bitmap_next_dirty(s->need, offset, end);

  if (first < 0)
    return 1;
  guint64 stop = run_end(s->need, TRUE, first, MIN(end, (guint64)first + CBW_MAX_COPY));
  stop = MIN(stop, bd->size);
  cbt_bitmap_clear_range(s->need, first, ROUND_UP(stop, CBW_CLUSTER) - first);
  Req *req = req_add_locked(s, first, stop, REQ_COPY);
  if (stop_out)
    *stop_out = stop;
  if (s->timeout_s)
    return copy_timed_locked(bd, s, req);
  g_autoptr(GArray) zeros = g_array_new(FALSE, FALSE, sizeof(guint64));
  gboolean read_failed = FALSE;
  cbt_mutex_unlock(&s->lock);
  int r = copy_range(bd, first, stop, zeros, &read_failed);
  if (is_read)
    *is_read = read_failed;
  cbt_mutex_lock(&s->lock);
  copy_finish_locked(bd, s, req, r, zeros);
  return r;
}

/* Before new data reaches [offset, offset + len) of file: (1). */
static int
before_write(CbtBlockdev *bd, guint64 offset, guint64 len)
{
  CbwState *s = state(bd);
  /* Whole clusters: a copy always covers every byte of the clusters it marks done. */
  guint64 start = ROUND_DOWN(offset, CBW_CLUSTER);
  guint64 end = MIN(ROUND_UP(offset + len, CBW_CLUSTER), bd->size);
  int r = 0;

  /* cbw-timeout bounds the wait for another writer's copy too. */
  gint64 deadline =
    s->timeout_s ? g_get_monotonic_time() + (gint64)s->timeout_s * G_USEC_PER_SEC : 0;
  struct timespec ts = { deadline / G_USEC_PER_SEC, deadline % G_USEC_PER_SEC * 1000 };

  cbt_mutex_lock(&s->lock);
  while (!s->snapshot_error) {
    r = copy_one_locked(bd, start, end, NULL, NULL);
    if (r < 0 && s->on_error == CBT_QMP_ON_CBW_ERROR_BREAK_GUEST_WRITE)
      break;
    if (r != 1)
      continue; /* copied (or broke the snapshot): look again */
    r = 0;
    gboolean copying = overlaps_locked(s, start, end, REQ_COPY);
    if (!copying && !overlaps_locked(s, start, end, REQ_FROZEN))
      break;
    if (!deadline) {
      cbt_mutex_cond_wait(&s->lock, &s->cond);
    } else if (cbt_mutex_cond_timedwait(&s->lock, &s->cond, &ts) == ETIMEDOUT && copying &&
               overlaps_locked(s, start, end, REQ_COPY)) {
      r = -ETIMEDOUT;
      if (s->on_error == CBT_QMP_ON_CBW_ERROR_BREAK_GUEST_WRITE)
        break;
      break_snapshot_locked(bd, s, r);
    }
  }
  /* QEMU marks the whole range done; its clusters that were not copied are outside the view
   * (no access), so no read looks there, and the query's count is 7.2's. */
  if (r == 0 && !s->snapshot_error)
    cbt_bitmap_mark_range(s->done, start, end - start);
  cbt_mutex_unlock(&s->lock);
  /* With break-snapshot a failed copy broke the snapshot instead: the write goes on. */
  return r < 0 && s->on_error == CBT_QMP_ON_CBW_ERROR_BREAK_GUEST_WRITE ? r : 0;
}

/* ---- a backup job's copies (backup-filter.c) ----------------------------------------------- */

void
cbt_blockdev_cbw_set_zero_target(CbtBlockdev *cbw)
{
  CBT_ASSERT_MAIN_THREAD();
  state(cbw)->zero_target = TRUE;
}

gboolean
cbt_blockdev_cbw_is_backup(CbtBlockdev *bd)
{
  return bd->drv == &cbt_blockdev_cbw_driver && state(bd)->zero_target;
}

gint64
cbt_blockdev_cbw_next_needed(CbtBlockdev *cbw, guint64 offset)
{
  CbwState *s = state(cbw);

  cbt_mutex_lock(&s->lock);
  gint64 r = offset < cbw->size ? cbt_bitmap_next_dirty(s->need, offset, cbw->size) : -1;
  cbt_mutex_unlock(&s->lock);
  return r;
}

/* The job's copy goes through the same claim as a writer's (2), so a cluster is copied once,
 * by whichever comes first. */
int
cbt_blockdev_cbw_copy_needed(CbtBlockdev *cbw, guint64 offset, guint64 max, guint64 *stop,
                             gboolean *is_read)
{
  CbwState *s = state(cbw);

  *is_read = FALSE;
  cbt_mutex_lock(&s->lock);
  int r = copy_one_locked(cbw, offset, MIN(offset + max, cbw->size), stop, is_read);
  cbt_mutex_unlock(&s->lock);
  return r;
}

void
cbt_blockdev_cbw_settle(CbtBlockdev *cbw)
{
  CbwState *s = state(cbw);

  cbt_mutex_lock(&s->lock);
  while (overlaps_locked(s, 0, cbw->size, REQ_COPY))
    cbt_mutex_cond_wait(&s->lock, &s->cond);
  cbt_mutex_unlock(&s->lock);
}

CbtBitmap *
cbt_blockdev_cbw_copy_need(CbtBlockdev *cbw)
{
  CbwState *s = state(cbw);

  cbt_mutex_lock(&s->lock);
  CbtBitmap *bm = cbt_bitmap_copy(s->need);
  cbt_mutex_unlock(&s->lock);
  return bm;
}

guint64
cbt_blockdev_cbw_progress(CbtBlockdev *cbw)
{
  return __atomic_load_n(&state(cbw)->progress, __ATOMIC_RELAXED);
}

/* ---- the live node: a filter over file ----------------------------------------------------- */

static int
cbw_pread(CbtBlockdev *bd, void *buf, guint64 offset, gsize len)
{
  return cbt_blockdev_pread(source(bd), buf, offset, len);
}

static int
cbw_pwrite(CbtBlockdev *bd, const void *buf, guint64 offset, gsize len, guint flags)
{
  int r = before_write(bd, offset, len);

  return r < 0 ? r : cbt_blockdev_pwrite(source(bd), buf, offset, len, flags);
}

static int
cbw_write_zeroes(CbtBlockdev *bd, guint64 offset, guint64 len, guint flags)
{
  int r = before_write(bd, offset, len);

  return r < 0 ? r : cbt_blockdev_write_zeroes(source(bd), offset, len, flags);
}

static int
cbw_discard(CbtBlockdev *bd, guint64 offset, guint64 len)
{
  int r = before_write(bd, offset, len);

  return r < 0 ? r : cbt_blockdev_discard(source(bd), offset, len, 0);
}

static int
cbw_flush(CbtBlockdev *bd)
{
  return cbt_blockdev_flush(source(bd));
}

static int
cbw_block_status(CbtBlockdev *bd, guint64 offset, guint64 len, guint64 *pnum, guint32 *status)
{
  return cbt_blockdev_block_status(source(bd), offset, len, pnum, status);
}

static int
cbw_block_status_walk(CbtBlockdev *bd, guint64 offset, guint64 len, CbtBlockdevStatusFunc fn,
                      gpointer user_data)
{
  return cbt_blockdev_block_status_walk(source(bd), offset, len, fn, user_data);
}

static int
cbw_get_data_fd(CbtBlockdev *bd, guint64 *fd_offset)
{
  return cbt_blockdev_get_data_fd(source(bd), fd_offset);
}

/* ---- the frozen view ------------------------------------------------------------------------ */

/* Where the snapshot's bytes from @offset come from, and for how long (< @end). */
typedef enum { FROM_FILE, FROM_TARGET, FROM_ZERO } Where;

/* Under lock: the state of the run at @offset, or a negative errno (3). */
static int
locate_locked(CbwState *s, guint64 offset, guint64 end, Where *where, guint64 *stop)
{
  CBT_ASSERT_HELD(&s->lock);
  if (s->snapshot_error || cbt_bitmap_next_clean(s->access, offset, end) >= 0)
    return -EACCES;
  if (!cbt_bitmap_get(s->done, offset)) {
    *where = FROM_FILE;
    *stop = run_end(s->done, FALSE, offset, end);
    return 0;
  }
  *stop = run_end(s->done, TRUE, offset, end);
  gboolean zero = cbt_bitmap_get(s->zero, offset);
  *where = zero ? FROM_ZERO : FROM_TARGET;
  *stop = run_end(s->zero, zero, offset, *stop);
  return 0;
}

static ReqKind
req_kind(Where where)
{
  return where == FROM_FILE ? REQ_FROZEN : REQ_TARGET;
}

static int
read_run(CbtBlockdev *bd, Where where, guint8 *buf, guint64 offset, guint64 len)
{
  if (where == FROM_ZERO) {
    memset(buf, 0, len);
    return 0;
  }
  return cbt_blockdev_pread(where == FROM_FILE ? source(bd) : state(bd)->target, buf, offset, len);
}

static int
cbw_snapshot_pread(CbtBlockdev *bd, void *buf, guint64 offset, gsize len)
{
  CbwState *s = state(bd);
  guint64 pos = offset, end = offset + len;
  int r = 0;

  cbt_mutex_lock(&s->lock);
  while (r == 0 && pos < end) {
    Where where;
    guint64 stop;
    if ((r = locate_locked(s, pos, end, &where, &stop)) < 0)
      break;
    Req *req = where == FROM_ZERO ? NULL : req_add_locked(s, pos, stop, req_kind(where));
    cbt_mutex_unlock(&s->lock);
    r = read_run(bd, where, (guint8 *)buf + (pos - offset), pos, stop - pos);
    cbt_mutex_lock(&s->lock);
    if (req)
      req_remove_locked(s, req);
    pos = stop;
  }
  if (r == 0 && s->snapshot_error)
    r = -EACCES; /* (4) */
  cbt_mutex_unlock(&s->lock);
  return r;
}

static int
cbw_snapshot_block_status(CbtBlockdev *bd, guint64 offset, guint64 len, guint64 *pnum,
                          guint32 *status)
{
  CbwState *s = state(bd);
  Where where;
  guint64 stop;
  int r;

  cbt_mutex_lock(&s->lock);
  if ((r = locate_locked(s, offset, offset + len, &where, &stop)) < 0) {
    cbt_mutex_unlock(&s->lock);
    return r;
  }
  if (where == FROM_ZERO) {
    cbt_mutex_unlock(&s->lock);
    *pnum = stop - offset;
    *status = CBT_BLOCKDEV_STATUS_HOLE | CBT_BLOCKDEV_STATUS_ZERO;
    return 0;
  }
  Req *req = req_add_locked(s, offset, stop, req_kind(where));
  cbt_mutex_unlock(&s->lock);
  CbtBlockdev *from = where == FROM_FILE ? source(bd) : s->target;
  r = cbt_blockdev_block_status(from, offset, stop - offset, pnum, status);
  cbt_mutex_lock(&s->lock);
  req_remove_locked(s, req);
  cbt_mutex_unlock(&s->lock);
  return r;
}

/* QEMU's discard of the snapshot: whole clusters leave the view, need no copy ever again and
 * are dropped from the target, once no copy into them and no read of them from the target is
 * in flight. Unaligned requests are refused (7.2 asserts). */
static int
cbw_snapshot_discard(CbtBlockdev *bd, guint64 offset, guint64 len)
{
  CbwState *s = state(bd);
  guint64 end = offset + len;

  if (offset % CBW_CLUSTER || (end % CBW_CLUSTER && end != bd->size))
    return -EINVAL;
  cbt_mutex_lock(&s->lock);
  while (overlaps_locked(s, offset, end, REQ_COPY) || overlaps_locked(s, offset, end, REQ_TARGET))
    cbt_mutex_cond_wait(&s->lock, &s->cond);
  cbt_bitmap_clear_range(s->need, offset, len);
  cbt_bitmap_clear_range(s->access, offset, len);
  cbt_bitmap_clear_range(s->done, offset, len);
  cbt_bitmap_clear_range(s->zero, offset, len);
  cbt_mutex_unlock(&s->lock);
  return cbt_blockdev_discard(s->target, offset, len, 0);
}

/* ---- open and close ------------------------------------------------------------------------ */

static void select_bits(CbwState *s, const CbtBitmap *bm);

/* The regions the bitmap option selects, grown to whole clusters (QEMU merges it into its copy
 * bitmap, whose granularity is the cluster). */
static gboolean
select_bitmap(CbwState *s, const CbtQmpBlockDirtyBitmap *ref, GError **error)
{
  if (!bitmap_copy_fn) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Node '%s' not found", ref->node);
    return FALSE;
  }
  g_autoptr(CbtBitmap) bm = bitmap_copy_fn(ref->node, ref->name, error);
  if (!bm)
    return FALSE;
  select_bits(s, bm);
  return TRUE;
}

void
cbt_blockdev_cbw_select(CbtBlockdev *cbw, const CbtBitmap *bm)
{
  CbwState *s = state(cbw);

  CBT_ASSERT_MAIN_THREAD();
  cbt_mutex_lock(&s->lock);
  select_bits(s, bm);
  cbt_mutex_unlock(&s->lock);
}

static void
select_bits(CbwState *s, const CbtBitmap *bm)
{
  cbt_bitmap_clear_all(s->need);
  guint64 size = MIN(cbt_bitmap_get_size(bm), cbt_bitmap_get_size(s->need));
  for (gint64 pos = cbt_bitmap_next_dirty(bm, 0, size); pos >= 0;) {
    guint64 stop = run_end(bm, TRUE, pos, size);
    cbt_bitmap_mark_range(s->need, pos, stop - pos);
    pos = cbt_bitmap_next_dirty(bm, stop, size);
  }
  cbt_bitmap_clear_all(s->access);
  cbt_bitmap_merge(s->access, s->need);
}

static void
state_free(CbwState *s)
{
  g_clear_pointer(&s->need, cbt_bitmap_free);
  g_clear_pointer(&s->done, cbt_bitmap_free);
  g_clear_pointer(&s->access, cbt_bitmap_free);
  g_clear_pointer(&s->zero, cbt_bitmap_free);
  g_clear_pointer(&s->reqs, g_ptr_array_unref);
  cbt_mutex_clear(&s->lock);
  pthread_cond_destroy(&s->cond);
  g_free(s);
}
G_DEFINE_AUTOPTR_CLEANUP_FUNC(CbwState, state_free)

static CbwState *
state_new(void)
{
  CbwState *s = g_new0(CbwState, 1);

  pthread_condattr_t a;

  cbt_mutex_init(&s->lock);
  /* Deadlines (cbw-timeout) are g_get_monotonic_time()'s. */
  pthread_condattr_init(&a);
  pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
  pthread_cond_init(&s->cond, &a);
  pthread_condattr_destroy(&a);
  return s;
}

static gboolean
check_target(CbtBlockdev *bd, CbtBlockdev *target, GError **error)
{
  if (!cbt_blockdev_check_writable(target, error))
    return FALSE;
  if (target->size < bd->size) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "Target node '%s' (%" G_GUINT64_FORMAT " bytes) is smaller than the source '%s' "
                "(%" G_GUINT64_FORMAT " bytes)",
                target->node_name, target->size, source(bd)->node_name, bd->size);
    return FALSE;
  }
  return TRUE;
}

static gboolean
cbw_open(CbtBlockdev *bd, const CbtQmpBlockdevOptions *opts, GError **error)
{
  const CbtQmpBlockdevOptionsCbw *o = &opts->u.copy_before_write;
  g_autoptr(CbwState) s = state_new();
  CbtBlockdevChild *t = cbt_blockdev_open_child(bd, o->target, "target", error);

  if (!t)
    return FALSE;
  bd->size = source(bd)->size;
  if (!check_target(bd, t->node, error))
    return FALSE;
  s->target = t->node;
  s->on_error = o->on_cbw_error;
  s->timeout_s = o->cbw_timeout;
  s->need = cbt_bitmap_new(bd->size, CBW_CLUSTER);
  s->done = cbt_bitmap_new(bd->size, CBW_CLUSTER);
  s->access = cbt_bitmap_new(bd->size, CBW_CLUSTER);
  s->zero = cbt_bitmap_new(bd->size, CBW_ZERO_GRANULARITY);
  s->reqs = g_ptr_array_new();
  cbt_bitmap_mark_range(s->need, 0, bd->size);
  cbt_bitmap_mark_range(s->access, 0, bd->size);
  if (o->bitmap && !select_bitmap(s, o->bitmap, error))
    return FALSE;
  if (o->bitmap) {
    JsonObject *b = json_object_new();
    json_object_set_string_member(b, "node", o->bitmap->node);
    json_object_set_string_member(b, "name", o->bitmap->name);
    json_object_set_object_member(bd->full_opts, "bitmap", b);
  }
  if (o->has_on_cbw_error)
    json_object_set_string_member(bd->full_opts, "on-cbw-error",
                                  cbt_qmp_on_cbw_error_to_string(o->on_cbw_error));
  if (o->has_cbw_timeout)
    json_object_set_int_member(bd->full_opts, "cbw-timeout", o->cbw_timeout);
  /* QEMU names a filter after the node it filters. */
  bd->exact_filename = cbt_blockdev_filename(source(bd));
  bd->opaque = g_steal_pointer(&s);
  return TRUE;
}

static void
cbw_close(CbtBlockdev *bd)
{
  g_clear_pointer(&bd->opaque, state_free);
}

/* QEMU's cbw_child_perm: the target is written and never resized (others may write it: QEMU
 * shares write there, and qemu-storage-daemon 7.2 lets it be exported writable); the source is
 * read consistently and, while anything uses the filter, written only through it, so no write
 * can bypass the copy (invariant (1)). */
static void
cbw_child_perm(CbtBlockdev *bd, const CbtBlockdevChild *c, guint64 perm, guint64 shared,
               guint64 *ret_perm, guint64 *ret_shared)
{
  if (!(c->role & CBT_BLOCKDEV_CHILD_FILTERED)) {
    *ret_perm = CBT_PERM_WRITE;
    *ret_shared = CBT_PERM_ALL & ~CBT_PERM_RESIZE;
    return;
  }
  *ret_perm = perm;
  *ret_shared = shared;
  if (bd->users || bd->writers || bd->parents->len) {
    *ret_perm |= CBT_PERM_CONSISTENT_READ;
    *ret_shared &= ~(CBT_PERM_WRITE | CBT_PERM_RESIZE);
  }
}

static void
cbw_refresh_limits(CbtBlockdev *bd)
{
  bd->min_io = bd->file ? bd->file->node->min_io : 1;
}

static CbtQmpBlockDirtyInfo *
anon_bitmap(const CbtBitmap *bm)
{
  CbtQmpBlockDirtyInfo *info = g_new0(CbtQmpBlockDirtyInfo, 1);

  info->granularity = cbt_bitmap_get_granularity(bm);
  info->count = (gint64)(cbt_bitmap_count(bm) * info->granularity);
  return info;
}

/* QEMU's filter keeps its access and done bitmaps on itself and block-copy's copy bitmap (the
 * clusters still to copy) on the source; they show in queries as anonymous bitmaps. */
static void
cbw_query_bitmaps(CbtBlockdev *bd, CbtBlockdev *shown, GPtrArray *out)
{
  CbwState *s = state(bd);

  cbt_mutex_lock(&s->lock);
  if (shown == bd) {
    g_ptr_array_add(out, anon_bitmap(s->access));
    g_ptr_array_add(out, anon_bitmap(s->done));
  } else if (shown == source(bd)) {
    g_ptr_array_add(out, anon_bitmap(s->need));
  }
  cbt_mutex_unlock(&s->lock);
}

static const CbtBlockdevChildSpec cbw_children[] = {
  { "file", CBT_BLOCKDEV_CHILD_DATA | CBT_BLOCKDEV_CHILD_PRIMARY | CBT_BLOCKDEV_CHILD_FILTERED },
  { "target", CBT_BLOCKDEV_CHILD_DATA },
  { NULL, 0 },
};

const CbtBlockdevDriver cbt_blockdev_cbw_driver = {
  .name = "copy-before-write",
  .is_filter = TRUE,
  .writes_wait = TRUE, /* for the copy of the old data (invariant 1) */
  .children = cbw_children,
  .supported_flags = CBT_BLOCKDEV_FUA | CBT_BLOCKDEV_MAY_UNMAP | CBT_BLOCKDEV_NO_FALLBACK,
  .open = cbw_open,
  .close = cbw_close,
  .child_perm = cbw_child_perm,
  .refresh_limits = cbw_refresh_limits,
  .pread = cbw_pread,
  .pwrite = cbw_pwrite,
  .flush = cbw_flush,
  .discard = cbw_discard,
  .write_zeroes = cbw_write_zeroes,
  .block_status = cbw_block_status,
  .block_status_walk = cbw_block_status_walk,
  .snapshot_pread = cbw_snapshot_pread,
  .snapshot_block_status = cbw_snapshot_block_status,
  .snapshot_discard = cbw_snapshot_discard,
  .get_data_fd = cbw_get_data_fd,
  .query_bitmaps = cbw_query_bitmaps,
};
