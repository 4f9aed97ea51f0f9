/* tools/backup/restore.c — a point back to a file, a device or an NBD export, with stock tools.
 *
 * qemu-img convert reads the point's chain (the overlay and its backing files) and writes the
 * disk as it was at the point's instant; a regular file stays sparse. qemu-img compare then
 * reads both and must find them equal: a restore that cannot be confirmed fails.
 */
#include "backup.h"

#include <sys/stat.h>

static gboolean
is_nbd_uri(const char *to)
{
  return g_str_has_prefix(to, "nbd://") || g_str_has_prefix(to, "nbd+unix://") ||
         g_str_has_prefix(to, "nbds://") || g_str_has_prefix(to, "nbds+unix://");
}

int
cbt_backup_restore(const char *repo, int point, const char *to, GError **error)
{
  g_autoptr(CbtBackupRepo) r = cbt_backup_repo_open(repo, NULL, FALSE, FALSE, error);
  if (!r)
    return (*error)->code;
  JsonObject *m = cbt_backup_repo_point(r, point, error);
  if (!m)
    return CBT_BACKUP_EXIT_USAGE;
  g_autofree char *image = cbt_backup_repo_file(r, json_object_get_string_member(m, "file"));
  struct stat st;
  /* Into something that exists and must keep its identity (a device, an export): -n, the
   * target as it is; otherwise a new sparse raw file. */
  gboolean existing = is_nbd_uri(to) || (stat(to, &st) == 0 && S_ISBLK(st.st_mode));
  const char *convert_new[] = { "qemu-img", "convert", "-q",  "-f", "qcow2",
                                "-O",       "raw",     image, to,   NULL };
  const char *convert_into[] = { "qemu-img", "convert", "-q",  "-n", "-f", "qcow2",
                                 "-O",       "raw",     image, to,   NULL };
  const char *compare[] = {
    "qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", image, to, NULL
  };

  if (!cbt_backup_run(existing ? convert_into : convert_new, NULL, error))
    return CBT_BACKUP_EXIT_FAILED;
  if (!cbt_backup_run(compare, NULL, error)) {
    g_prefix_error(error, "the restored disk %s does not match point %" G_GINT64_FORMAT ": ", to,
                   json_object_get_int_member(m, "seq"));
    return CBT_BACKUP_EXIT_FAILED;
  }
  g_print("point %" G_GINT64_FORMAT " restored to %s (compared equal)\n",
          json_object_get_int_member(m, "seq"), to);
  return CBT_BACKUP_EXIT_OK;
}
