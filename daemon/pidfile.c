/* PID file and --daemonize, as qemu-storage-daemon does them: the PID file is written and
 * locked once everything is set up; a daemonizing parent exits only when the child's start-up
 * has succeeded or failed, with the same status. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "daemon/cbtd.h"

static char *pidfile_path;
static int pidfile_fd = -1;
static int daemon_pipe = -1;

gboolean
cbtd_pidfile_create(const char *path, GError **error)
{
  int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    g_set_error(error, CBTD_ERROR, 0, "cannot create PID file: Cannot open pid file: %s",
                g_strerror(errno));
    return FALSE;
  }
  struct flock lk = { .l_type = F_WRLCK, .l_whence = SEEK_SET };
  if (fcntl(fd, F_SETLK, &lk) < 0) {
    int saved = errno == EACCES ? EAGAIN : errno;
    close(fd);
    g_set_error(error, CBTD_ERROR, 0, "cannot create PID file: Cannot lock pid file: %s",
                g_strerror(saved));
    return FALSE;
  }
  g_autofree char *pid = g_strdup_printf("%d\n", (int)getpid());
  if (ftruncate(fd, 0) < 0 || write(fd, pid, strlen(pid)) != (ssize_t)strlen(pid)) {
    int saved = errno;
    close(fd);
    unlink(path);
    g_set_error(error, CBTD_ERROR, 0, "cannot create PID file: Failed to write pid file: %s",
                g_strerror(saved));
    return FALSE;
  }
  pidfile_fd = fd;
  pidfile_path = g_strdup(path);
  return TRUE;
}

void
cbtd_pidfile_remove(void)
{
  if (pidfile_fd < 0)
    return;
  unlink(pidfile_path);
  close(pidfile_fd);
  pidfile_fd = -1;
  g_clear_pointer(&pidfile_path, g_free);
}

gboolean
cbtd_daemonize_start(GError **error)
{
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) < 0) {
    g_set_error(error, CBTD_ERROR, 0, "daemonize: %s", g_strerror(errno));
    return FALSE;
  }
  pid_t pid = fork();
  if (pid < 0) {
    g_set_error(error, CBTD_ERROR, 0, "daemonize: %s", g_strerror(errno));
    return FALSE;
  }
  if (pid > 0) {
    unsigned char status = EXIT_FAILURE;
    close(fds[1]);
    while (read(fds[0], &status, 1) < 0 && errno == EINTR)
      ;
    _exit(status);
  }
  close(fds[0]);
  daemon_pipe = fds[1];
  setsid();
  return TRUE;
}

void
cbtd_daemonize_done(int status)
{
  if (daemon_pipe < 0)
    return;
  unsigned char s = status;
  if (status == EXIT_SUCCESS) {
    /* Detach from the terminal only once start-up errors can no longer happen. */
    int null = open("/dev/null", O_RDWR);
    if (null >= 0) {
      dup2(null, STDIN_FILENO);
      dup2(null, STDOUT_FILENO);
      dup2(null, STDERR_FILENO);
      close(null);
    }
  }
  while (write(daemon_pipe, &s, 1) < 0 && errno == EINTR)
    ;
  close(daemon_pipe);
  daemon_pipe = -1;
}
