/* cbtd: the changed-block-tracking storage daemon.
 *
 * main() wires the modules together: it creates the QMP server, lets each domain module register
 * its commands, applies the command-line options in order through those same commands, then
 * runs the main loop until `quit` or a termination signal.
 */
#include <errno.h>
#include <glib-unix.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "cbt-config.h"
#include "blockdev/blockdev.h"
#include "common/assert.h"
#include "common/memory.h"
#include "daemon/cbtd.h"
#include "dirty-bitmaps/dirty-bitmaps.h"
#include "job/job.h"
#include "nbd/nbd.h"
#include "rpc/rpc.h"
#include "schemas/qmp-commands.h"

static GMainLoop *main_loop;

/* GLib before 2.76 serves JsonNodes and other small blocks from its slice allocator, which
 * keeps every page it ever used: one 8 MiB QMP request of small values would leave ~100 MiB
 * resident for good. It reads G_SLICE only when the library loads, so the daemon asks for
 * always-malloc (malloc_trim can then return the memory: common/memory.h) and runs itself
 * again, once. An explicit G_SLICE is left alone. */
static void
reexec_without_slices(char **argv)
{
  if (glib_check_version(2, 76, 0) == NULL || g_getenv("G_SLICE"))
    return;
  g_setenv("G_SLICE", "always-malloc", TRUE);
  execv("/proc/self/exe", argv);
  /* Cannot: go on with slices (more memory after bursts, nothing else). */
}

static gboolean
quit_now(gpointer data)
{
  g_main_loop_quit(main_loop);
  return G_SOURCE_REMOVE;
}

gboolean
cbt_qmp_quit(GError **error)
{
  /* Reply first (the monitor sends it before the idle runs), then exit. */
  g_idle_add(quit_now, NULL);
  return TRUE;
}

static gboolean
on_signal(gpointer data)
{
  g_main_loop_quit(main_loop);
  return G_SOURCE_CONTINUE;
}

/* systemd socket activation: serve NBD on the inherited listening socket (fd 3). */
static gboolean
socket_activation(GError **error)
{
  const char *pid = g_getenv("LISTEN_PID");
  const char *fds = g_getenv("LISTEN_FDS");

  if (!pid || !fds || g_ascii_strtoull(pid, NULL, 10) != (guint64)getpid())
    return TRUE;
  g_unsetenv("LISTEN_PID");
  g_unsetenv("LISTEN_FDS");
  g_unsetenv("LISTEN_FDNAMES");
  if (g_ascii_strtoull(fds, NULL, 10) != 1) {
    g_set_error(error, CBTD_ERROR, 0, "socket activation: expected 1 socket, got LISTEN_FDS=%s",
                fds);
    return FALSE;
  }
  return cbt_nbd_server_start_fd(3, error);
}

static void
shutdown_all(CbtRpc *rpc)
{
  cbt_nbd_shutdown();
  /* Deliver the replies and BLOCK_EXPORT_DELETED events queued so far before the monitors
   * close. */
  cbt_rpc_flush(rpc, 1000);
  cbt_rpc_close_all(rpc);
  /* QEMU's job_cancel_sync_all(): no job outlives its nodes. */
  cbt_job_cancel_all();
  cbt_blockdev_close_all();
}

int
main(int argc, char **argv)
{
  CbtdEarlyOptions early = { 0 };
  g_autoptr(GError) error = NULL;

  reexec_without_slices(argv);
  cbt_memory_init();
  g_set_prgname("cbtd");
  signal(SIGPIPE, SIG_IGN);
  cbt_main_thread_init();

  int status = cbtd_options_early(argc, argv, &early);
  if (status >= 0)
    return status;

  if (early.daemonize && !cbtd_daemonize_start(&error)) {
    fprintf(stderr, "cbtd: %s\n", error->message);
    return EXIT_FAILURE;
  }

  g_autoptr(CbtRpc) rpc = cbt_rpc_new(&error);
  if (!rpc) {
    fprintf(stderr, "cbtd: %s\n", error->message);
    cbtd_daemonize_done(EXIT_FAILURE);
    return EXIT_FAILURE;
  }
  cbt_blockdev_set_bitmap_copy(cbt_dirty_bitmaps_copy_named);
  /* Every schema file's commands: linking these needs every handler. */
  cbt_qmp_register_control(rpc);
  cbt_qmp_register_block_core(rpc);
  cbt_qmp_register_block_export(rpc);
  cbt_qmp_register_dirty_bitmap(rpc);
  cbt_qmp_register_qom(rpc);
  cbt_qmp_register_job(rpc);
  cbt_dirty_bitmaps_init();
  cbt_job_init();
  cbt_dirty_bitmaps_set_state_dir(early.state_dir);
  if (!cbt_rpc_check_complete(rpc, &error)) {
    fprintf(stderr, "cbtd: %s\n", error->message);
    cbtd_daemonize_done(EXIT_FAILURE);
    return EXIT_FAILURE;
  }

  main_loop = g_main_loop_new(NULL, FALSE);
  if (!socket_activation(&error) || !cbtd_options_apply(rpc, argc, argv, &error) ||
      (early.pidfile && !cbtd_pidfile_create(early.pidfile, &error))) {
    fprintf(stderr, "cbtd: %s\n", error->message);
    shutdown_all(rpc);
    cbtd_daemonize_done(EXIT_FAILURE);
    return EXIT_FAILURE;
  }

  g_unix_signal_add(SIGTERM, on_signal, NULL);
  g_unix_signal_add(SIGINT, on_signal, NULL);
  g_unix_signal_add(SIGHUP, on_signal, NULL);
  cbtd_daemonize_done(EXIT_SUCCESS);

  g_main_loop_run(main_loop);

  shutdown_all(rpc);
  cbtd_pidfile_remove();
  g_main_loop_unref(main_loop);
  g_free(early.pidfile);
  g_free(early.state_dir);
  return EXIT_SUCCESS;
}
