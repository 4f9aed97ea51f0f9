/* job/ — background jobs with QEMU's state machine (docs/user-guide.md, "Jobs and push-mode
 * backup"): the job-* and block-job-* commands, query-jobs and query-block-jobs, the JOB_* and
 * BLOCK_JOB_* events, and the backup job (blockdev-backup and its transaction action).
 *
 * The module sits above dirty-bitmaps/ and blockdev/: a backup inserts a copy-before-write
 * filter (blockdev/) and freezes a named bitmap (dirty-bitmaps/).
 *
 * Threads: a job's work runs on a thread of its own; every state change, every event and every
 * command runs on the main thread. Everything here is main-thread only unless it says otherwise.
 */
#pragma once

#include <glib.h>
#include "schemas/qmp-types.h"

G_BEGIN_DECLS

/* Register the transaction action; once, at start-up. */
void cbt_job_init(void);
/* Cancel every job and wait for each to end (at exit, before the nodes close). */
void cbt_job_cancel_all(void);

G_END_DECLS
