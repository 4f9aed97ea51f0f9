/* tests/fuzz/fuzz-daemon.c — see fuzz-daemon.h. */
#include "fuzz-daemon.h"

#include <fcntl.h>
#include <glib/gstdio.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "blockdev/blockdev.h"
#include "common/assert.h"
#include "dirty-bitmaps/dirty-bitmaps.h"
#include "job/job.h"
#include "nbd/nbd.h"
#include "common/memory.h"
#include "schemas/qmp-commands.h"

#include <sanitizer/lsan_interface.h>

FuzzDaemon fuzz_daemon;

/* `quit` lives in daemon/main.c; here it only answers. */
gboolean
cbt_qmp_quit(GError **error)
{
  return TRUE;
}

static void
remove_tree(const char *path)
{
  g_autoptr(GDir) d = g_dir_open(path, 0, NULL);
  const char *n;

  while (d && (n = g_dir_read_name(d))) {
    g_autofree char *p = g_build_filename(path, n, NULL);
    if (g_file_test(p, G_FILE_TEST_IS_DIR) && !g_file_test(p, G_FILE_TEST_IS_SYMLINK))
      remove_tree(p);
    else
      unlink(p);
  }
  rmdir(path);
}

static void
at_exit(void)
{
  cbt_nbd_shutdown();
  fuzz_daemon_spin();
  cbt_job_cancel_all();
  cbt_blockdev_close_all();
  if (fuzz_daemon.dir)
    remove_tree(fuzz_daemon.dir);
}

static gboolean
no_op(gpointer data)
{
  return G_SOURCE_REMOVE;
}

/* GLib keeps per-thread state of this thread (its slice cache, the main loop's dispatch
 * record) only in pthread-specific data, where LeakSanitizer does not always find it: made
 * here, once, with leak checking off for it (common/memory.h, cbt_memory_thread_begin()). */
static void
prime_glib(void)
{
  cbt_memory_thread_begin();
  __lsan_disable(); /* the harnesses are built with ASan (tests/fuzz/meson.build) */
  g_idle_add(no_op, NULL);
  g_main_context_iteration(NULL, FALSE);
  __lsan_enable();
}

void
fuzz_daemon_init(void)
{
  g_autoptr(GError) error = NULL;

  prime_glib();
  fuzz_daemon.dir = g_dir_make_tmp("cbt-fuzz-XXXXXX", &error);
  if (!fuzz_daemon.dir) {
    fprintf(stderr, "fuzz: no temporary directory: %s\n", error->message);
    abort();
  }
  g_setenv("CBTD_RUN_DIR", fuzz_daemon.dir, TRUE);
  atexit(at_exit);
  cbt_main_thread_init();
  fuzz_daemon.rpc = cbt_rpc_new(&error);
  g_assert_no_error(error);
  cbt_blockdev_set_bitmap_copy(cbt_dirty_bitmaps_copy_named);
  cbt_qmp_register_control(fuzz_daemon.rpc);
  cbt_qmp_register_block_core(fuzz_daemon.rpc);
  cbt_qmp_register_block_export(fuzz_daemon.rpc);
  cbt_qmp_register_dirty_bitmap(fuzz_daemon.rpc);
  cbt_qmp_register_qom(fuzz_daemon.rpc);
  cbt_qmp_register_job(fuzz_daemon.rpc);
  cbt_dirty_bitmaps_init();
  cbt_job_init();
  g_autofree char *state = g_build_filename(fuzz_daemon.dir, "state", NULL);
  g_mkdir(state, 0700);
  cbt_dirty_bitmaps_set_state_dir(state);
  if (!cbt_rpc_check_complete(fuzz_daemon.rpc, &error)) {
    fprintf(stderr, "fuzz: %s\n", error->message);
    abort();
  }
}

void
fuzz_daemon_qmp_ok(const char *command, const char *json_args)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(JsonNode) args = json_args ? json_from_string(json_args, &error) : NULL;
  g_assert_no_error(error);
  g_autoptr(JsonNode) ret = cbt_rpc_execute(
    fuzz_daemon.rpc, command, args ? json_node_get_object(args) : NULL, FALSE, &error);
  if (!ret) {
    fprintf(stderr, "fuzz: %s failed: %s\n", command, error->message);
    abort();
  }
}

void
fuzz_daemon_nbd_start(void)
{
  fuzz_daemon.sock = g_build_filename(fuzz_daemon.dir, "nbd.sock", NULL);
  g_autofree char *args = g_strdup_printf(
    "{\"addr\": {\"type\": \"unix\", \"data\": {\"path\": \"%s\"}}}", fuzz_daemon.sock);
  fuzz_daemon_qmp_ok("nbd-server-start", args);
}

void
fuzz_daemon_add_node(const char *node, guint64 size)
{
  g_autofree char *path = g_strconcat(fuzz_daemon.dir, "/", node, ".img", NULL);
  int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);

  if (fd < 0 || ftruncate(fd, (off_t)size) != 0)
    abort();
  close(fd);
  g_autofree char *args = g_strdup_printf(
    "{\"driver\": \"file\", \"node-name\": \"%s\", \"filename\": \"%s\"}", node, path);
  fuzz_daemon_qmp_ok("blockdev-add", args);
}

void
fuzz_daemon_init_standard(void)
{
  fuzz_daemon_init();
  fuzz_daemon_nbd_start();
  fuzz_daemon_add_node("n0", 1 << 20);
  fuzz_daemon_add_node("n1", 1 << 20);
}

void
fuzz_daemon_spin(void)
{
  while (g_main_context_iteration(NULL, FALSE))
    ;
}
