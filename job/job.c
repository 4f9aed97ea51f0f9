/* job.c — QEMU's job model (qapi/job.json; docs/user-guide.md, "Jobs and push-mode backup"):
 * the state machine, the verbs a state accepts, the end of a job (commit or abort, clean,
 * conclude, dismiss) and its events, groups of jobs that end together; the job's own thread and
 * what it shares with the main one.
 *
 * Invariants:
 *  (1) Every state change happens on the main thread, through transition(), which checks QEMU's
 *      transition table and emits JOB_STATUS_CHANGE; so events leave in the order of the
 *      changes, and a command always sees a state that its verb table decides on.
 *  (2) The job's thread tells the main thread what happened (it parked at a pause point, left
 *      it, hit an error, finished) through the job's mailbox, a FIFO read by one idle callback
 *      at a time; DONE is the last message, after which the thread is joined.
 *  (3) `lock` guards what both threads touch: pause_count, user_paused, cancelled, busy, speed,
 *      the rate-limit slot, io_status and the mailbox. The main thread never waits for the job's
 *      thread while holding it, and waits for it (join) only after DONE or at exit.
 *  (4) The job's thread does no I/O while parked: a paused job is paused at a chunk boundary,
 *      and it parks only while pause_count > 0 and it is not cancelled.
 *  (5) A job is freed only on the main thread, after its thread ended and its mailbox is empty,
 *      and once nothing references it (a transaction holds the jobs it prepared until it ends).
 *  (6) A group (QEMU's job transaction) ends together: a job that finished its work waits in
 *      `waiting` until all have, then all go `pending` and are finalized in the group's order;
 *      the first failure cancels the others, waits until each has stopped (its thread joined),
 *      then undoes all. A job alone is a group of one, so both paths are always taken.
 */
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <time.h>
#include "job/job-internal.h"
#include "rpc/rpc.h"
#include "schemas/qmp-events.h"
#include "common/memory.h"

typedef enum { MSG_PARKED, MSG_UNPARKED, MSG_ERROR, MSG_DONE } MsgKind;

typedef struct {
  MsgKind kind;
  gboolean is_read;
  CbtQmpBlockErrorAction action;
} Msg;

/* Jobs that end together (QEMU's JobTxn): a transaction with completion-mode grouped, or one
 * job alone. Main thread. */
struct CbtJobGroup {
  GList *jobs; /* CbtJob *, not yet finalized */
  gboolean aborting;
  gint refcnt;
};

struct CbtJob {
  gint refcnt; /* main thread: the job list's, and a transaction's while it prepares the job */
  char *id;
  CbtJobGroup *group;
  const CbtJobDriver *drv;
  gpointer opaque;
  /* main thread */
  CbtQmpJobStatus status;
  CbtQmpJobStatus before_pause; /* running or ready, while paused or standby */
  gboolean auto_finalize, auto_dismiss;
  gboolean started;
  gboolean deferred; /* its thread has ended: the job is done with its work */
  int ret;
  char *err;
  gboolean ended; /* the driver's resources are gone: progress is final_* */
  guint64 final_done, final_total;
  GThread *thread;
  /* the job's thread's result, read by the main thread after DONE */
  int run_ret;
  char *run_err;
  /* (3) */
  CbtMutex lock;
  pthread_cond_t cond;
  gint pause_count;
  gboolean user_paused;
  gboolean cancelled;
  gboolean busy;
  gboolean parked;   /* the job's thread waits at a pause point */
  gboolean finished; /* the job's thread is past its work (DONE posted) */
  gint64 speed;
  gint64 slot_us; /* rate limit: when the next chunk may start (monotonic) */
  CbtQmpBlockDeviceIoStatus io_status;
  GQueue mail;
  guint mail_source;
};

/* QEMU's transition table: from the row's state to the column's. */
#define U CBT_QMP_JOB_STATUS_UNDEFINED
static const gboolean stt[CBT_QMP_JOB_STATUS__MAX][CBT_QMP_JOB_STATUS__MAX] = {
  /*              U  C  R  P  Y  S  W  D  X  E  N */
  /* undefined */ { 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0 },
  /* created   */ { 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1 },
  /* running   */ { 0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0 },
  /* paused    */ { 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0 },
  /* ready     */ { 0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0 },
  /* standby   */ { 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0 },
  /* waiting   */ { 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0 },
  /* pending   */ { 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0 },
  /* aborting  */ { 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0 },
  /* concluded */ { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1 },
  /* null      */ { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 },
};
#undef U

/* QEMU's verb table: the states (columns as above) in which a verb is accepted. */
static const gboolean verbs[CBT_QMP_JOB_VERB__MAX][CBT_QMP_JOB_STATUS__MAX] = {
  [CBT_QMP_JOB_VERB_CANCEL] = { 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0 },
  [CBT_QMP_JOB_VERB_PAUSE] = { 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0 },
  [CBT_QMP_JOB_VERB_RESUME] = { 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0 },
  [CBT_QMP_JOB_VERB_SET_SPEED] = { 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0 },
  [CBT_QMP_JOB_VERB_COMPLETE] = { 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0 },
  [CBT_QMP_JOB_VERB_FINALIZE] = { 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0 },
  [CBT_QMP_JOB_VERB_DISMISS] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0 },
};

static GList *jobs; /* newest first, as QEMU lists them */

/* How long job-pause waits for the job's thread to reach its pause point. */
#define PAUSE_WAIT_US (200 * 1000)

G_DEFINE_QUARK(cbt - job - error - quark, cbt_job_error)

/* ---- state ----------------------------------------------------------------------------------- */

static void
transition(CbtJob *job, CbtQmpJobStatus s1)
{
  CbtQmpJobStatus s0 = job->status;

  CBT_ASSERT_MAIN_THREAD();
  g_assert(stt[s0][s1]);
  job->status = s1;
  if (s1 != s0)
    cbt_qmp_event_job_status_change(job->id, s1);
}

static gboolean
apply_verb(CbtJob *job, CbtQmpJobVerb verb, GError **error)
{
  if (verbs[verb][job->status])
    return TRUE;
  g_set_error(error, CBT_JOB_ERROR, 0, "Job '%s' in state '%s' cannot accept command verb '%s'",
              job->id, cbt_qmp_job_status_to_string(job->status), cbt_qmp_job_verb_to_string(verb));
  return FALSE;
}

static gboolean
is_cancelled(CbtJob *job)
{
  cbt_mutex_lock(&job->lock);
  gboolean c = job->cancelled;
  cbt_mutex_unlock(&job->lock);
  return c;
}

static void
progress(CbtJob *job, guint64 *done, guint64 *total)
{
  *done = job->final_done;
  *total = job->final_total;
  if (!job->ended && job->drv->progress)
    job->drv->progress(job, done, total);
}

/* ---- the mailbox (2) ------------------------------------------------------------------------- */

static void handle_done(CbtJob *job);

static void
handle_msg(CbtJob *job, const Msg *m)
{
  MsgKind kind = m->kind;

  if (kind == MSG_PARKED &&
      (job->status == CBT_QMP_JOB_STATUS_RUNNING || job->status == CBT_QMP_JOB_STATUS_READY)) {
    job->before_pause = job->status;
    transition(job, job->status == CBT_QMP_JOB_STATUS_READY ? CBT_QMP_JOB_STATUS_STANDBY
                                                            : CBT_QMP_JOB_STATUS_PAUSED);
  } else if (kind == MSG_UNPARKED && (job->status == CBT_QMP_JOB_STATUS_PAUSED ||
                                      job->status == CBT_QMP_JOB_STATUS_STANDBY)) {
    transition(job, job->before_pause);
  } else if (kind == MSG_ERROR) {
    cbt_qmp_event_block_job_error(
      job->id, m->is_read ? CBT_QMP_IO_OPERATION_TYPE_READ : CBT_QMP_IO_OPERATION_TYPE_WRITE,
      m->action);
  }
}

static gboolean
mail_dispatch(gpointer data)
{
  CbtJob *job = data;

  for (;;) {
    cbt_mutex_lock(&job->lock);
    Msg *m = g_queue_pop_head(&job->mail);
    if (!m || m->kind == MSG_DONE)
      job->mail_source = 0;
    cbt_mutex_unlock(&job->lock);
    if (!m)
      return G_SOURCE_REMOVE;
    MsgKind kind = m->kind;
    handle_msg(job, m);
    g_free(m);
    if (kind == MSG_DONE) {
      handle_done(job); /* may free the job (5) */
      return G_SOURCE_REMOVE;
    }
  }
}

/* The messages before DONE, now (a command's reply then follows the state changes they make,
 * as in QEMU, where the job runs in the same thread as the monitor). */
static void
read_mail_now(CbtJob *job)
{
  for (;;) {
    cbt_mutex_lock(&job->lock);
    Msg *m = g_queue_peek_head(&job->mail);
    if (m && m->kind != MSG_DONE)
      g_queue_pop_head(&job->mail);
    else
      m = NULL;
    cbt_mutex_unlock(&job->lock);
    if (!m)
      return;
    handle_msg(job, m);
    g_free(m);
  }
}

static void
post_locked(CbtJob *job, MsgKind kind, gboolean is_read, CbtQmpBlockErrorAction action)
{
  Msg *m = g_new0(Msg, 1);

  CBT_ASSERT_HELD(&job->lock);
  m->kind = kind;
  m->is_read = is_read;
  m->action = action;
  g_queue_push_tail(&job->mail, m);
  if (!job->mail_source)
    job->mail_source = g_idle_add(mail_dispatch, job);
}

/* ---- the job's thread ------------------------------------------------------------------------ */

void
cbt_job_pause_point(CbtJob *job)
{
  cbt_mutex_lock(&job->lock);
  if (job->pause_count > 0 && !job->cancelled) {
    job->busy = FALSE;
    job->parked = TRUE;
    post_locked(job, MSG_PARKED, FALSE, 0);
    pthread_cond_broadcast(&job->cond);
    while (job->pause_count > 0 && !job->cancelled)
      cbt_mutex_cond_wait(&job->lock, &job->cond);
    job->parked = FALSE;
    job->busy = TRUE;
    post_locked(job, MSG_UNPARKED, FALSE, 0);
  }
  cbt_mutex_unlock(&job->lock);
}

gboolean
cbt_job_is_cancelled(CbtJob *job)
{
  return is_cancelled(job);
}

gint64
cbt_job_get_speed(CbtJob *job)
{
  cbt_mutex_lock(&job->lock);
  gint64 speed = job->speed;
  cbt_mutex_unlock(&job->lock);
  return speed;
}

void
cbt_job_rate_limit(CbtJob *job, guint64 bytes)
{
  cbt_mutex_lock(&job->lock);
  gint64 now = g_get_monotonic_time();
  if (job->speed > 0) {
    job->slot_us = MAX(job->slot_us, now) + (gint64)(bytes * G_USEC_PER_SEC / (guint64)job->speed);
    job->busy = FALSE;
    while (job->speed > 0 && !job->cancelled && job->pause_count == 0 && now < job->slot_us) {
      struct timespec ts = { job->slot_us / G_USEC_PER_SEC, job->slot_us % G_USEC_PER_SEC * 1000 };
      cbt_mutex_cond_timedwait(&job->lock, &job->cond, &ts);
      now = g_get_monotonic_time();
    }
    job->busy = TRUE;
  }
  cbt_mutex_unlock(&job->lock);
}

CbtQmpBlockErrorAction
cbt_job_error_action(CbtJob *job, CbtQmpBlockdevOnError policy, gboolean is_read, int err)
{
  CbtQmpBlockErrorAction action;

  switch (policy) {
  case CBT_QMP_BLOCKDEV_ON_ERROR_ENOSPC:
  case CBT_QMP_BLOCKDEV_ON_ERROR_AUTO:
    action = err == ENOSPC ? CBT_QMP_BLOCK_ERROR_ACTION_STOP : CBT_QMP_BLOCK_ERROR_ACTION_REPORT;
    break;
  case CBT_QMP_BLOCKDEV_ON_ERROR_STOP:
    action = CBT_QMP_BLOCK_ERROR_ACTION_STOP;
    break;
  case CBT_QMP_BLOCKDEV_ON_ERROR_IGNORE:
    action = CBT_QMP_BLOCK_ERROR_ACTION_IGNORE;
    break;
  default:
    action = CBT_QMP_BLOCK_ERROR_ACTION_REPORT;
  }
  cbt_mutex_lock(&job->lock);
  post_locked(job, MSG_ERROR, is_read, action);
  if (action == CBT_QMP_BLOCK_ERROR_ACTION_STOP) {
    /* Paused as by the user, so job-resume resumes it (QEMU's). */
    if (!job->user_paused) {
      job->pause_count++;
      job->user_paused = TRUE;
    }
    job->io_status = err == ENOSPC ? CBT_QMP_BLOCK_DEVICE_IO_STATUS_NOSPACE
                                   : CBT_QMP_BLOCK_DEVICE_IO_STATUS_FAILED;
  }
  cbt_mutex_unlock(&job->lock);
  return action;
}

void
cbt_job_wait_cancelled(CbtJob *job)
{
  while (!is_cancelled(job)) {
    cbt_job_pause_point(job);
    cbt_mutex_lock(&job->lock);
    while (!job->cancelled && job->pause_count == 0)
      cbt_mutex_cond_wait(&job->lock, &job->cond);
    cbt_mutex_unlock(&job->lock);
  }
}

static gpointer
job_thread(gpointer data)
{
  CbtJob *job = data;
  g_autoptr(GError) error = NULL;

  cbt_memory_thread_begin();

  /* QEMU's: a pause point before the work, so a job paused at once does nothing. */
  cbt_job_pause_point(job);
  int r = job->drv->run(job, &error);
  cbt_mutex_lock(&job->lock);
  job->run_ret = r;
  job->run_err = r < 0 && error ? g_strdup(error->message) : NULL;
  job->busy = FALSE;
  job->finished = TRUE;
  post_locked(job, MSG_DONE, FALSE, 0);
  pthread_cond_broadcast(&job->cond);
  cbt_mutex_unlock(&job->lock);
  return NULL;
}

/* ---- groups ---------------------------------------------------------------------------------- */

CbtJobGroup *
cbt_job_group_new(void)
{
  CbtJobGroup *g = g_new0(CbtJobGroup, 1);

  g->refcnt = 1;
  return g;
}

static CbtJobGroup *
group_ref(CbtJobGroup *g)
{
  g->refcnt++;
  return g;
}

void
cbt_job_group_unref(CbtJobGroup *g)
{
  if (g && --g->refcnt == 0) {
    g_assert(!g->jobs);
    g_free(g);
  }
}

static void
group_leave(CbtJob *job)
{
  if (!job->group)
    return;
  job->group->jobs = g_list_remove(job->group->jobs, job);
  g_clear_pointer(&job->group, cbt_job_group_unref);
}

void
cbt_job_group_add(CbtJobGroup *g, CbtJob *job)
{
  g_assert(job->status == CBT_QMP_JOB_STATUS_CREATED);
  group_leave(job);
  job->group = group_ref(g);
  g->jobs = g_list_prepend(g->jobs, job); /* QEMU's order: the newest first */
}

/* ---- lifecycle (main thread) ----------------------------------------------------------------- */

static gboolean
id_wellformed(const char *id)
{
  if (!g_ascii_isalpha(id[0]))
    return FALSE;
  for (const char *p = id + 1; *p; p++)
    if (!g_ascii_isalnum(*p) && !strchr("-._", *p))
      return FALSE;
  return TRUE;
}

CbtJob *
cbt_job_create(const char *id, const CbtJobDriver *drv, gpointer opaque, gboolean auto_finalize,
               gboolean auto_dismiss, GError **error)
{
  CBT_ASSERT_MAIN_THREAD();
  if (!id_wellformed(id)) {
    g_set_error(error, CBT_JOB_ERROR, 0, "Invalid job ID '%s'", id);
    return NULL;
  }
  for (GList *l = jobs; l; l = l->next)
    if (strcmp(((CbtJob *)l->data)->id, id) == 0) {
      g_set_error(error, CBT_JOB_ERROR, 0, "Job ID '%s' already in use", id);
      return NULL;
    }
  CbtJob *job = g_new0(CbtJob, 1);
  job->refcnt = 1;
  job->id = g_strdup(id);
  job->drv = drv;
  job->opaque = opaque;
  job->auto_finalize = auto_finalize;
  job->auto_dismiss = auto_dismiss;
  job->busy = TRUE;
  cbt_mutex_init(&job->lock);
  pthread_condattr_t a;
  pthread_condattr_init(&a);
  pthread_condattr_setclock(&a, CLOCK_MONOTONIC); /* deadlines are g_get_monotonic_time()'s */
  pthread_cond_init(&job->cond, &a);
  pthread_condattr_destroy(&a);
  g_queue_init(&job->mail);
  jobs = g_list_prepend(jobs, job);
  transition(job, CBT_QMP_JOB_STATUS_CREATED);
  /* Alone, a job is a group of one (QEMU's). */
  CbtJobGroup *g = cbt_job_group_new();
  cbt_job_group_add(g, job);
  cbt_job_group_unref(g);
  return job;
}

static void
job_free(CbtJob *job)
{
  if (job->drv->free && job->opaque)
    job->drv->free(job->opaque);
  g_queue_clear_full(&job->mail, g_free);
  cbt_mutex_clear(&job->lock);
  pthread_cond_destroy(&job->cond);
  g_free(job->run_err);
  g_free(job->err);
  g_free(job->id);
  g_free(job);
}

CbtJob *
cbt_job_ref(CbtJob *job)
{
  job->refcnt++;
  return job;
}

void
cbt_job_unref(CbtJob *job)
{
  if (--job->refcnt == 0)
    job_free(job);
}

static void
do_dismiss(CbtJob *job)
{
  group_leave(job);
  jobs = g_list_remove(jobs, job);
  transition(job, CBT_QMP_JOB_STATUS_NULL);
  cbt_job_unref(job);
}

void
cbt_job_early_fail(CbtJob *job)
{
  g_assert(job->status == CBT_QMP_JOB_STATUS_CREATED);
  job->opaque = NULL; /* the caller's again */
  do_dismiss(job);
}

void
cbt_job_start(CbtJob *job)
{
  CBT_ASSERT_MAIN_THREAD();
  job->started = TRUE;
  transition(job, CBT_QMP_JOB_STATUS_RUNNING);
  job->thread = g_thread_new("cbtd-job", job_thread, job);
}

/* QEMU's job_update_rc: a cancelled job fails with ECANCELED; a failing one is aborting. */
static void
update_rc(CbtJob *job)
{
  if (!job->ret && is_cancelled(job))
    job->ret = -ECANCELED;
  if (job->ret) {
    if (!job->err)
      job->err = g_strdup(g_strerror(-job->ret));
    transition(job, CBT_QMP_JOB_STATUS_ABORTING);
  }
}

static void
emit_end(CbtJob *job)
{
  guint64 done, total;
  gint64 speed = cbt_job_get_speed(job);

  progress(job, &done, &total);
  if (is_cancelled(job))
    cbt_qmp_event_block_job_cancelled(job->drv->type, job->id, (gint64)total, (gint64)done, speed);
  else
    cbt_qmp_event_block_job_completed(job->drv->type, job->id, (gint64)total, (gint64)done, speed,
                                      job->ret ? job->err : NULL);
}

static void
finalize_single(CbtJob *job)
{
  update_rc(job);
  progress(job, &job->final_done, &job->final_total);
  job->ended = TRUE;
  if (!job->ret && job->drv->commit)
    job->drv->commit(job);
  else if (job->ret && job->drv->abort)
    job->drv->abort(job);
  if (job->drv->clean)
    job->drv->clean(job);
  if (job->started)
    emit_end(job);
  group_leave(job);
  transition(job, CBT_QMP_JOB_STATUS_CONCLUDED);
  if (job->auto_dismiss || !job->started)
    do_dismiss(job);
}

static gboolean
is_completed(CbtJob *job)
{
  switch (job->status) {
  case CBT_QMP_JOB_STATUS_WAITING:
  case CBT_QMP_JOB_STATUS_PENDING:
  case CBT_QMP_JOB_STATUS_ABORTING:
  case CBT_QMP_JOB_STATUS_CONCLUDED:
  case CBT_QMP_JOB_STATUS_NULL:
    return TRUE;
  default:
    return FALSE;
  }
}

/* Every job of the group, finalized in order (QEMU's job_do_finalize). */
static void
finalize_group(CbtJob *job)
{
  CbtJobGroup *g = group_ref(job->group);

  while (g->jobs)
    finalize_single(g->jobs->data);
  cbt_job_group_unref(g);
}

static void completed(CbtJob *job, int ret);

/* Wait until a cancelled job of an aborting group has ended its work (QEMU's job_finish_sync):
 * its thread stops at its next pause point; its last messages are read, DONE handled here. */
static void
finish_now(CbtJob *job)
{
  if (!job->started) {
    completed(job, -ECANCELED);
    return;
  }
  if (job->thread) {
    g_thread_join(job->thread);
    job->thread = NULL;
    if (job->mail_source)
      g_source_remove(job->mail_source);
    job->mail_source = 0;
    read_mail_now(job);
    g_queue_clear_full(&job->mail, g_free);
    g_queue_init(&job->mail);
    job->deferred = TRUE;
    if (job->run_ret < 0 && job->run_err && !job->err)
      job->err = g_strdup(job->run_err);
    completed(job, job->run_ret);
  }
}

static void
cancel_async(CbtJob *job)
{
  cbt_mutex_lock(&job->lock);
  if (job->user_paused) {
    job->user_paused = FALSE;
    job->pause_count--;
  }
  job->cancelled = TRUE;
  pthread_cond_broadcast(&job->cond);
  cbt_mutex_unlock(&job->lock);
}

/* The first failure of a group undoes all of it (QEMU's job_completed_txn_abort). */
static void
group_abort(CbtJob *job)
{
  CbtJobGroup *g = job->group;

  if (g->aborting)
    return; /* the job that failed first does it */
  g->aborting = TRUE;
  group_ref(g);
  for (GList *l = g->jobs; l; l = l->next)
    if (l->data != job)
      cancel_async(l->data);
  /* All end their work (aborting), then all are undone, in the group's order (7.2's). */
  for (GList *l = g->jobs; l; l = l->next)
    if (!is_completed(l->data))
      finish_now(l->data);
  while (g->jobs)
    finalize_single(g->jobs->data);
  cbt_job_group_unref(g);
}

static void
group_success(CbtJob *job)
{
  CbtJobGroup *g = job->group;

  transition(job, CBT_QMP_JOB_STATUS_WAITING);
  for (GList *l = g->jobs; l; l = l->next)
    if (!is_completed(l->data))
      return;
  for (GList *l = g->jobs; l; l = l->next) {
    CbtJob *other = l->data;
    transition(other, CBT_QMP_JOB_STATUS_PENDING);
    if (!other->auto_finalize)
      cbt_qmp_event_block_job_pending(other->drv->type, other->id);
  }
  for (GList *l = g->jobs; l; l = l->next)
    if (!((CbtJob *)l->data)->auto_finalize)
      return;
  finalize_group(job);
}

static void
completed(CbtJob *job, int ret)
{
  job->ret = ret;
  update_rc(job);
  if (job->ret)
    group_abort(job);
  else
    group_success(job);
}

static void
handle_done(CbtJob *job)
{
  g_thread_join(job->thread);
  job->thread = NULL;
  job->deferred = TRUE;
  if (job->run_ret < 0 && job->run_err && !job->err)
    job->err = g_strdup(job->run_err);
  completed(job, job->run_ret);
}

static void
cancel(CbtJob *job)
{
  cancel_async(job);
  if (!job->started)
    completed(job, -ECANCELED);
  else if (job->deferred)
    group_abort(job); /* waiting or pending: undone now, with its group */
  /* else its thread stops at its next pause point or rate-limit wait, then DONE */
}

void
cbt_job_cancel_unstarted(CbtJob *job)
{
  g_assert(!job->started);
  /* Another job of its group may have undone it already. */
  if (job->status != CBT_QMP_JOB_STATUS_NULL)
    cancel(job);
}

gpointer
cbt_job_get_opaque(CbtJob *job)
{
  return job->opaque;
}

const char *
cbt_job_get_id(CbtJob *job)
{
  return job->id;
}

int
cbt_job_get_ret(CbtJob *job)
{
  return job->ret;
}

void
cbt_job_cancel_all(void)
{
  CBT_ASSERT_MAIN_THREAD();
  while (jobs) {
    CbtJob *job = jobs->data;
    if (job->status == CBT_QMP_JOB_STATUS_CONCLUDED) {
      do_dismiss(job);
      continue;
    }
    cancel_async(job);
    if (job->thread)
      finish_now(job); /* ends it, and its group */
    else
      cancel(job);
    if (g_list_find(jobs, job) && job->status == CBT_QMP_JOB_STATUS_CONCLUDED)
      do_dismiss(job);
  }
}

/* ---- the verbs ------------------------------------------------------------------------------- */

CbtJob *
cbt_job_find(const char *id, GError **error)
{
  CBT_ASSERT_MAIN_THREAD();
  for (GList *l = jobs; l; l = l->next)
    if (strcmp(((CbtJob *)l->data)->id, id) == 0)
      return l->data;
  g_set_error_literal(error, CBT_JOB_ERROR, 0, "Job not found");
  return NULL;
}

CbtJob *
cbt_job_find_block(const char *id, GError **error)
{
  CbtJob *job = cbt_job_find(id, NULL);

  if (!job)
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_DEVICE_NOT_ACTIVE, "Block job '%s' not found",
                id);
  return job;
}

gboolean
cbt_job_user_pause(CbtJob *job, GError **error)
{
  if (!apply_verb(job, CBT_QMP_JOB_VERB_PAUSE, error))
    return FALSE;
  cbt_mutex_lock(&job->lock);
  gboolean already = job->user_paused;
  if (!already) {
    job->user_paused = TRUE;
    job->pause_count++;
    pthread_cond_broadcast(&job->cond);
    /* A job between chunks parks at once; one in the middle of a chunk's I/O finishes it
     * first. Wait for that briefly, never for long: QMP must not block on I/O. */
    gint64 deadline = g_get_monotonic_time() + PAUSE_WAIT_US;
    struct timespec ts = { deadline / G_USEC_PER_SEC, deadline % G_USEC_PER_SEC * 1000 };
    while (job->thread && !job->parked && !job->finished && job->pause_count > 0)
      if (cbt_mutex_cond_timedwait(&job->lock, &job->cond, &ts) == ETIMEDOUT)
        break;
  }
  cbt_mutex_unlock(&job->lock);
  if (already) {
    g_set_error_literal(error, CBT_JOB_ERROR, 0, "Job is already paused");
    return FALSE;
  }
  read_mail_now(job);
  return TRUE;
}

gboolean
cbt_job_user_resume(CbtJob *job, GError **error)
{
  cbt_mutex_lock(&job->lock);
  gboolean paused = job->user_paused && job->pause_count > 0;
  cbt_mutex_unlock(&job->lock);
  if (!paused) {
    g_set_error_literal(error, CBT_JOB_ERROR, 0, "Can't resume a job that was not paused");
    return FALSE;
  }
  if (!apply_verb(job, CBT_QMP_JOB_VERB_RESUME, error))
    return FALSE;
  cbt_mutex_lock(&job->lock);
  job->io_status = CBT_QMP_BLOCK_DEVICE_IO_STATUS_OK;
  job->user_paused = FALSE;
  job->pause_count--;
  pthread_cond_broadcast(&job->cond);
  cbt_mutex_unlock(&job->lock);
  return TRUE;
}

gboolean
cbt_job_user_cancel(CbtJob *job, GError **error)
{
  if (!apply_verb(job, CBT_QMP_JOB_VERB_CANCEL, error))
    return FALSE;
  cancel(job);
  return TRUE;
}

gboolean
cbt_job_complete(CbtJob *job, GError **error)
{
  /* No cbtd job becomes ready, so the verb table refuses every state. */
  if (!apply_verb(job, CBT_QMP_JOB_VERB_COMPLETE, error))
    return FALSE;
  g_set_error(error, CBT_JOB_ERROR, 0, "The active block job '%s' cannot be completed", job->id);
  return FALSE;
}

gboolean
cbt_job_finalize(CbtJob *job, GError **error)
{
  if (!apply_verb(job, CBT_QMP_JOB_VERB_FINALIZE, error))
    return FALSE;
  finalize_group(job);
  return TRUE;
}

gboolean
cbt_job_dismiss(CbtJob *job, GError **error)
{
  if (!apply_verb(job, CBT_QMP_JOB_VERB_DISMISS, error))
    return FALSE;
  do_dismiss(job);
  return TRUE;
}

gboolean
cbt_job_set_speed(CbtJob *job, gint64 speed, GError **error)
{
  if (!apply_verb(job, CBT_QMP_JOB_VERB_SET_SPEED, error))
    return FALSE;
  if (speed < 0) {
    g_set_error_literal(error, CBT_JOB_ERROR, 0, "Parameter 'speed' expects a non-negative value");
    return FALSE;
  }
  cbt_mutex_lock(&job->lock);
  job->speed = speed;
  pthread_cond_broadcast(&job->cond);
  cbt_mutex_unlock(&job->lock);
  return TRUE;
}

/* ---- queries --------------------------------------------------------------------------------- */

GList *
cbt_job_list(void)
{
  CBT_ASSERT_MAIN_THREAD();
  return jobs;
}

CbtQmpJobInfo *
cbt_job_info(CbtJob *job)
{
  CbtQmpJobInfo *info = g_new0(CbtQmpJobInfo, 1);
  guint64 done, total;

  progress(job, &done, &total);
  info->id = g_strdup(job->id);
  info->type = job->drv->type;
  info->status = job->status;
  info->current_progress = (gint64)done;
  info->total_progress = (gint64)total;
  info->error = g_strdup(job->err);
  return info;
}

CbtQmpBlockJobInfo *
cbt_job_block_info(CbtJob *job)
{
  CbtQmpBlockJobInfo *info = g_new0(CbtQmpBlockJobInfo, 1);
  guint64 done, total;

  progress(job, &done, &total);
  info->type = g_strdup(cbt_qmp_job_type_to_string(job->drv->type));
  info->device = g_strdup(job->id);
  info->len = (gint64)total;
  info->offset = (gint64)done;
  cbt_mutex_lock(&job->lock);
  info->busy = job->busy && job->thread && !job->deferred;
  info->paused = job->pause_count > 0;
  info->speed = job->speed;
  info->io_status = job->io_status;
  cbt_mutex_unlock(&job->lock);
  info->ready =
    job->status == CBT_QMP_JOB_STATUS_READY || job->status == CBT_QMP_JOB_STATUS_STANDBY;
  info->status = job->status;
  info->auto_finalize = job->auto_finalize;
  info->auto_dismiss = job->auto_dismiss;
  if (job->ret)
    info->error = g_strdup(job->err ? job->err : g_strerror(-job->ret));
  return info;
}
