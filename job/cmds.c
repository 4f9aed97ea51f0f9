/* cmds.c — the QMP commands of jobs (schemas/job.json): query-jobs, job-*, query-block-jobs and
 * block-job-*, each a lookup (QEMU's texts differ between the two families) and a verb of job.c.
 */
#include "job/job-internal.h"
#include "rpc/rpc.h"
#include "schemas/qmp-commands.h"

CbtQmpJobInfoList *
cbt_qmp_query_jobs(GError **error)
{
  GPtrArray *list = g_ptr_array_new_with_free_func((GDestroyNotify)cbt_qmp_job_info_free);

  for (GList *l = cbt_job_list(); l; l = l->next)
    g_ptr_array_add(list, cbt_job_info(l->data));
  return list;
}

CbtQmpBlockJobInfoList *
cbt_qmp_query_block_jobs(GError **error)
{
  GPtrArray *list = g_ptr_array_new_with_free_func((GDestroyNotify)cbt_qmp_block_job_info_free);

  for (GList *l = cbt_job_list(); l; l = l->next)
    g_ptr_array_add(list, cbt_job_block_info(l->data));
  return list;
}

gboolean
cbt_qmp_job_pause(const CbtQmpJobPauseArg *args, GError **error)
{
  CbtJob *job = cbt_job_find(args->id, error);

  return job && cbt_job_user_pause(job, error);
}

gboolean
cbt_qmp_job_resume(const CbtQmpJobResumeArg *args, GError **error)
{
  CbtJob *job = cbt_job_find(args->id, error);

  return job && cbt_job_user_resume(job, error);
}

gboolean
cbt_qmp_job_cancel(const CbtQmpJobCancelArg *args, GError **error)
{
  CbtJob *job = cbt_job_find(args->id, error);

  return job && cbt_job_user_cancel(job, error);
}

gboolean
cbt_qmp_job_complete(const CbtQmpJobCompleteArg *args, GError **error)
{
  CbtJob *job = cbt_job_find(args->id, error);

  return job && cbt_job_complete(job, error);
}

gboolean
cbt_qmp_job_dismiss(const CbtQmpJobDismissArg *args, GError **error)
{
  CbtJob *job = cbt_job_find(args->id, error);

  return job && cbt_job_dismiss(job, error);
}

gboolean
cbt_qmp_job_finalize(const CbtQmpJobFinalizeArg *args, GError **error)
{
  CbtJob *job = cbt_job_find(args->id, error);

  return job && cbt_job_finalize(job, error);
}

gboolean
cbt_qmp_block_job_set_speed(const CbtQmpBlockJobSetSpeedArg *args, GError **error)
{
  CbtJob *job = cbt_job_find_block(args->device, error);

  return job && cbt_job_set_speed(job, args->speed, error);
}

gboolean
cbt_qmp_block_job_cancel(const CbtQmpBlockJobCancelArg *args, GError **error)
{
  CbtJob *job = cbt_job_find_block(args->device, error);

  return job && cbt_job_user_cancel(job, error);
}

gboolean
cbt_qmp_block_job_pause(const CbtQmpBlockJobPauseArg *args, GError **error)
{
  CbtJob *job = cbt_job_find_block(args->device, error);

  return job && cbt_job_user_pause(job, error);
}

gboolean
cbt_qmp_block_job_resume(const CbtQmpBlockJobResumeArg *args, GError **error)
{
  CbtJob *job = cbt_job_find_block(args->device, error);

  return job && cbt_job_user_resume(job, error);
}

gboolean
cbt_qmp_block_job_complete(const CbtQmpBlockJobCompleteArg *args, GError **error)
{
  CbtJob *job = cbt_job_find_block(args->device, error);

  return job && cbt_job_complete(job, error);
}

gboolean
cbt_qmp_block_job_finalize(const CbtQmpBlockJobFinalizeArg *args, GError **error)
{
  CbtJob *job = cbt_job_find_block(args->id, error);

  return job && cbt_job_finalize(job, error);
}

gboolean
cbt_qmp_block_job_dismiss(const CbtQmpBlockJobDismissArg *args, GError **error)
{
  CbtJob *job = cbt_job_find_block(args->id, error);

  return job && cbt_job_dismiss(job, error);
}
