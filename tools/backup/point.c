/* tools/backup/point.c — a point read back with a stock tool (qemu-nbd serves its chain
 * read-only), and the file-level helpers a commit needs. */
#include "backup.h"

#include <errno.h>
#include <fcntl.h>
#include <glib/gstdio.h>
#include <gnutls/crypto.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <string.h>
#include <unistd.h>

struct CbtBackupServe {
  GPid pid;
  char *dir, *sock, *uri;
};

gboolean
cbt_backup_run(const char *const *argv, char **out, GError **error)
{
  g_autofree char *o = NULL, *e = NULL;
  int status = 0;
  g_autoptr(GError) local = NULL;

  if (!g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_SEARCH_PATH, NULL, NULL, &o, &e, &status,
                    &local)) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "%s: %s", argv[0], local->message);
    return FALSE;
  }
  if (!g_spawn_check_wait_status(status, NULL)) {
    g_strchomp(e);
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "%s failed: %s", argv[0],
                e && *e ? e : "(no message)");
    return FALSE;
  }
  if (out)
    *out = g_steal_pointer(&o);
  return TRUE;
}

/* A qcow2 image of @size, an overlay of @backing (a file name relative to the image's own
 * directory, so a repository can move) when given. */
/* Ready once it completes a handshake (a bare connect that closes at once makes qemu-nbd log a
 * broken pipe). */
static gboolean
socket_ready(const char *path)
{
  struct nbd_handle *h;
  gboolean ok;

  if (!g_file_test(path, G_FILE_TEST_EXISTS) || !(h = nbd_create()))
    return FALSE;
  ok = nbd_connect_unix(h, path) != -1;
  if (ok)
    nbd_shutdown(h, 0);
  nbd_close(h);
  return ok;
}

/* qemu-nbd must not outlive us: a killed backup would leave it holding the image. */
static void
die_with_parent(gpointer data)
{
  prctl(PR_SET_PDEATHSIG, SIGTERM);
}

CbtBackupServe *
cbt_backup_serve(const char *image, guint connections, GError **error)
{
  g_autoptr(GError) local = NULL;
  g_autofree char *dir = g_dir_make_tmp("cbt-backup-XXXXXX", &local);
  if (!dir) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "%s", local->message);
    return NULL;
  }
  CbtBackupServe *sv = g_new0(CbtBackupServe, 1);
  sv->dir = g_steal_pointer(&dir);
  sv->sock = g_build_filename(sv->dir, "nbd.sock", NULL);
  sv->uri = g_strdup_printf("nbd+unix:///?socket=%s", sv->sock);
  g_autofree char *sock_arg = g_strconcat("--socket=", sv->sock, NULL);
  /* One more than the copy's connections: the probe below counts as a client. */
  g_autofree char *shared = g_strdup_printf("--shared=%u", connections + 1);
  const char *argv[] = { "qemu-nbd",    sock_arg,       "--format=qcow2",
                         shared,        "--persistent", "--cache=writeback",
                         "--read-only", image,          NULL };

  if (!g_spawn_async(NULL, (char **)argv, NULL,
                     G_SPAWN_SEARCH_PATH | G_SPAWN_DO_NOT_REAP_CHILD | G_SPAWN_STDOUT_TO_DEV_NULL,
                     die_with_parent, NULL, &sv->pid, &local)) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "qemu-nbd: %s", local->message);
    cbt_backup_serve_stop(sv, NULL);
    return NULL;
  }
  for (int i = 0; i < 1000; i++) {
    int status;
    if (waitpid(sv->pid, &status, WNOHANG) == sv->pid) {
      sv->pid = 0;
      g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "qemu-nbd could not serve %s",
                  image);
      cbt_backup_serve_stop(sv, NULL);
      return NULL;
    }
    if (socket_ready(sv->sock))
      return sv;
    g_usleep(10 * 1000);
  }
  g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "qemu-nbd did not start on %s",
              image);
  cbt_backup_serve_stop(sv, NULL);
  return NULL;
}

const char *
cbt_backup_serve_uri(CbtBackupServe *sv)
{
  return sv->uri;
}

const char *
cbt_backup_serve_socket(CbtBackupServe *sv)
{
  return sv->sock;
}

/* qemu-nbd closes the image cleanly on SIGTERM (flushing it). */
gboolean
cbt_backup_serve_stop(CbtBackupServe *sv, GError **error)
{
  gboolean ok = TRUE;

  if (sv->pid > 0) {
    int status = 0;
    kill(sv->pid, SIGTERM);
    while (waitpid(sv->pid, &status, 0) < 0 && errno == EINTR)
      ;
    if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0) &&
        !(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM)) {
      g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED,
                  "qemu-nbd did not close the image cleanly (status %d)", status);
      ok = FALSE;
    }
    g_spawn_close_pid(sv->pid);
  }
  if (sv->sock)
    g_unlink(sv->sock);
  if (sv->dir)
    g_rmdir(sv->dir);
  g_free(sv->sock);
  g_free(sv->dir);
  g_free(sv->uri);
  g_free(sv);
  return ok;
}

gboolean
cbt_backup_image_describe(JsonObject *m, const char *path, guint64 tables, GError **error)
{
  guint64 size;
  g_autofree char *sha = cbt_backup_qcow2_tables_sha256(path, tables, &size, error);

  if (!sha)
    return FALSE;
  json_object_set_int_member(m, "image-size", (gint64)size);
  json_object_set_int_member(m, "tables-offset", (gint64)tables);
  json_object_set_string_member(m, "tables-sha256", sha);
  return TRUE;
}

char *
cbt_backup_image_check(JsonObject *m, const char *path, GError **error)
{
  guint64 size, want = json_object_get_int_member_with_default(m, "image-size", 0);
  g_autoptr(GError) local = NULL;
  g_autofree char *sha = cbt_backup_qcow2_tables_sha256(
    path, json_object_get_int_member_with_default(m, "tables-offset", 0), &size, &local);
  const char *expect = json_object_get_string_member_with_default(m, "tables-sha256", "");

  if (!sha && g_file_test(path, G_FILE_TEST_EXISTS) && size < want)
    return g_strdup_printf(
      "its image is %" G_GUINT64_FORMAT " bytes, the manifest says %" G_GUINT64_FORMAT, size, want);
  if (!sha) {
    g_propagate_error(error, g_steal_pointer(&local));
    return NULL;
  }
  if (size != want)
    return g_strdup_printf(
      "its image is %" G_GUINT64_FORMAT " bytes, the manifest says %" G_GUINT64_FORMAT, size, want);
  if (strcmp(sha, expect) != 0)
    return g_strdup_printf("its image's header and tables have the SHA-256 %s, the manifest "
                           "says %s",
                           sha, expect);
  return NULL;
}

gboolean
cbt_backup_fsync_path(const char *path, GError **error)
{
  int fd = g_open(path, O_RDONLY | O_CLOEXEC, 0);

  if (fd < 0 || fsync(fd) < 0) {
    int err = errno;
    if (fd >= 0)
      close(fd);
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "fsync %s: %s", path,
                g_strerror(err));
    return FALSE;
  }
  close(fd);
  return TRUE;
}

char *
cbt_backup_now_iso(void)
{
  g_autoptr(GDateTime) now = g_date_time_new_now_utc();
  return g_date_time_format_iso8601(now);
}
