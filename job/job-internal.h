/* job/job-internal.h — the job core (job.c) shared with the commands (cmds.c) and the job
 * drivers (backup.c). */
#pragma once

#include "common/assert.h"
#include "job/job.h"

G_BEGIN_DECLS

typedef struct CbtJob CbtJob;

/* What a kind of job does. run() is called on the job's thread; the rest on the main thread. */
typedef struct {
  CbtQmpJobType type;
  /* The work: 0 or a negative errno (then @error may say why; otherwise strerror is used).
   * It calls cbt_job_pause_point() between chunks, returns soon after cbt_job_is_cancelled(). */
  int (*run)(CbtJob *job, GError **error);
  /* Progress for queries and events: bytes done, bytes to do. Any thread. */
  void (*progress)(CbtJob *job, guint64 *done, guint64 *total);
  /* The end (QEMU's): commit after success, abort after failure or cancel, then clean. */
  void (*commit)(CbtJob *job);
  void (*abort)(CbtJob *job);
  void (*clean)(CbtJob *job);
  void (*free)(gpointer opaque);
} CbtJobDriver;

#define CBT_JOB_ERROR (cbt_job_error_quark())
GQuark cbt_job_error_quark(void);

/* Create a job in `created` (QEMU's checks and texts: "Invalid job ID 'X'", "Job ID 'X' already
 * in use"). @opaque belongs to the driver (its free() releases it once the job exists). */
CbtJob *cbt_job_create(const char *id, const CbtJobDriver *drv, gpointer opaque,
                       gboolean auto_finalize, gboolean auto_dismiss, GError **error);
/* A job that never started goes away (`null`) without its driver's end callbacks; @opaque is
 * the caller's again (not freed). */
void cbt_job_early_fail(CbtJob *job);
/* Start the job's thread (`running`). */
void cbt_job_start(CbtJob *job);
/* Undo a job that never started: it is cancelled and ends (QEMU's job_cancel_sync of a created
 * job: aborting, concluded, null, with the driver's abort and clean). */
void cbt_job_cancel_unstarted(CbtJob *job);
/* Jobs that end together (a transaction with completion-mode grouped, QEMU's JobTxn): when one
 * fails or is cancelled, the others are cancelled and all are undone; they finalize together
 * once all have succeeded. A job alone is a group of one; add it to another while `created`. */
typedef struct CbtJobGroup CbtJobGroup;
CbtJobGroup *cbt_job_group_new(void);
void cbt_job_group_unref(CbtJobGroup *g);
void cbt_job_group_add(CbtJobGroup *g, CbtJob *job);
/* A job stays allocated while referenced, even once it is `null` (gone from the list). */
CbtJob *cbt_job_ref(CbtJob *job);
void cbt_job_unref(CbtJob *job);
gpointer cbt_job_get_opaque(CbtJob *job);
const char *cbt_job_get_id(CbtJob *job);
int cbt_job_get_ret(CbtJob *job);

/* Lookup: NULL and QEMU's text ("Job not found"; for block jobs "Block job 'X' not found",
 * DeviceNotActive). */
CbtJob *cbt_job_find(const char *id, GError **error);
CbtJob *cbt_job_find_block(const char *id, GError **error);
/* The user's verbs, with QEMU's checks and texts. */
gboolean cbt_job_user_pause(CbtJob *job, GError **error);
gboolean cbt_job_user_resume(CbtJob *job, GError **error);
gboolean cbt_job_user_cancel(CbtJob *job, GError **error);
gboolean cbt_job_complete(CbtJob *job, GError **error);
gboolean cbt_job_finalize(CbtJob *job, GError **error);
gboolean cbt_job_dismiss(CbtJob *job, GError **error);
gboolean cbt_job_set_speed(CbtJob *job, gint64 speed, GError **error);
/* Every job, newest first (borrowed). */
GList *cbt_job_list(void);
CbtQmpJobInfo *cbt_job_info(CbtJob *job);
CbtQmpBlockJobInfo *cbt_job_block_info(CbtJob *job);

/* For run(), on the job's thread. */
void cbt_job_pause_point(CbtJob *job);
gboolean cbt_job_is_cancelled(CbtJob *job);
/* After @bytes of work: wait as long as `speed` asks (woken early by pause, cancel, speed). */
void cbt_job_rate_limit(CbtJob *job, guint64 bytes);
/* The current speed (bytes per second, 0: unlimited). */
gint64 cbt_job_get_speed(CbtJob *job);
/* A failed I/O (@err a positive errno): decide by @policy as QEMU's block_job_error_action(),
 * have BLOCK_JOB_ERROR emitted and, for stop, pause the job as if by the user. */
CbtQmpBlockErrorAction cbt_job_error_action(CbtJob *job, CbtQmpBlockdevOnError policy,
                                            gboolean is_read, int err);
/* Wait until the job is cancelled (pausing when asked): a backup with sync none. */
void cbt_job_wait_cancelled(CbtJob *job);

G_END_DECLS
