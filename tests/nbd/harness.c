/* tests/nbd/harness.c — see harness.h. */
#include "harness.h"

#include <fcntl.h>
#include <glib/gstdio.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

#include "blockdev/blockdev.h"
#include "common/assert.h"
#include "common/sockets.h"
#include "dirty-bitmaps/dirty-bitmaps.h"
#include "nbd/nbd.h"
#include "schemas/qmp-commands.h"

Harness harness;
static GHashTable *bitmaps; /* name -> CbtBitmap (owned by the test) */
static guint releases;

JsonNode *
harness_qmp(const char *command, const char *json_args, GError **error)
{
  g_autoptr(JsonNode) args = NULL;
  if (json_args) {
    args = json_from_string(json_args, error);
    g_assert_no_error(error ? *error : NULL);
  }
  return cbt_rpc_execute(harness.rpc, command, args ? json_node_get_object(args) : NULL, FALSE,
                         error);
}

void
harness_qmp_ok(const char *command, const char *json_args)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(JsonNode) ret = harness_qmp(command, json_args, &error);
  g_assert_no_error(error);
  g_assert_nonnull(ret);
}

void
harness_qmp_fails(const char *command, const char *json_args, const char *desc)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(JsonNode) ret = harness_qmp(command, json_args, &error);
  g_assert_null(ret);
  g_assert_nonnull(error);
  g_assert_cmpstr(error->message, ==, desc);
}

/* The test double of dirty-bitmaps/, taken at link time instead of the module: nbd/ asks it for
 * an export's bitmaps, and it serves the ones the test added. */
CbtBitmap *
cbt_dirty_bitmaps_export_lookup(CbtBlockdev *node, const char *node_name, const char *name,
                                gboolean readonly_export, GError **error)
{
  CbtBitmap *bm = bitmaps ? g_hash_table_lookup(bitmaps, name) : NULL;
  if (!bm)
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "Bitmap '%s' is not found", name);
  return bm;
}

void
cbt_dirty_bitmaps_export_release(CbtBitmap *bm)
{
  releases++;
}

/* Snapshot exports: the double copies the test's bitmaps and starts no checkpoint (the Python
 * tests run the real module). */
CbtBitmap *
cbt_dirty_bitmaps_freeze(CbtBlockdev *node, const char *name, gboolean *persistent, GError **error)
{
  CbtBitmap *bm = cbt_dirty_bitmaps_export_lookup(node, NULL, name, FALSE, error);
  *persistent = FALSE;
  return bm ? cbt_bitmap_copy(bm) : NULL;
}

gboolean
cbt_dirty_bitmaps_checkpoint(CbtBlockdev *node, const char *name, guint32 granularity,
                             gboolean persistent, GError **error)
{
  g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "no checkpoint in the NBD harness");
  return FALSE;
}

/* The double has no identities: published bitmaps list none. */
char *
cbt_dirty_bitmaps_identity_text(CbtBlockdev *node, const char *name)
{
  return NULL;
}

void
harness_add_bitmap(const char *name, CbtBitmap *bm)
{
  if (!bitmaps)
    bitmaps =
      g_hash_table_new_full(g_str_hash, g_str_equal, g_free, (GDestroyNotify)cbt_bitmap_free);
  g_hash_table_replace(bitmaps, g_strdup(name), bm);
}

guint
harness_bitmap_releases(void)
{
  return releases;
}

void
harness_init(void)
{
  g_autoptr(GError) error = NULL;

  harness.dir = g_dir_make_tmp("cbt-nbd-test-XXXXXX", &error);
  g_assert_no_error(error);
  harness.sock = g_build_filename(harness.dir, "nbd.sock", NULL);
  harness.uri = g_strdup_printf("nbd+unix:///?socket=%s", harness.sock);
  cbt_main_thread_init();
  harness.rpc = cbt_rpc_new(&error);
  g_assert_no_error(error);
  cbt_qmp_register_block_core(harness.rpc);
  cbt_qmp_register_block_export(harness.rpc);
  g_autofree char *args =
    g_strdup_printf("{\"addr\": {\"type\": \"unix\", \"data\": {\"path\": \"%s\"}}}", harness.sock);
  harness_qmp_ok("nbd-server-start", args);
}

void
harness_fini(void)
{
  cbt_nbd_shutdown();
  harness_spin(10);
  cbt_blockdev_close_all();
  g_clear_pointer(&harness.rpc, cbt_rpc_free);
  g_clear_pointer(&bitmaps, g_hash_table_unref);
  g_autoptr(GDir) d = g_dir_open(harness.dir, 0, NULL);
  const char *n;
  while (d && (n = g_dir_read_name(d))) {
    g_autofree char *p = g_build_filename(harness.dir, n, NULL);
    g_unlink(p);
  }
  g_rmdir(harness.dir);
  g_free(harness.dir);
  g_free(harness.sock);
  g_free(harness.uri);
}

char *
harness_image(const char *name, guint64 size, const guint64 *ranges)
{
  char *path = g_build_filename(harness.dir, name, NULL);
  int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
  g_assert_cmpint(fd, >=, 0);
  g_assert_cmpint(ftruncate(fd, size), ==, 0);
  for (const guint64 *r = ranges; r && r[1]; r += 3) {
    g_autofree guint8 *buf = g_malloc(r[1]);
    memset(buf, (int)r[2], r[1]);
    g_assert_cmpint(pwrite(fd, buf, r[1], r[0]), ==, (gssize)r[1]);
  }
  close(fd);
  return path;
}

void
harness_add_node(const char *node, const char *path, gboolean read_only)
{
  g_autofree char *args = g_strdup_printf(
    "{\"driver\": \"file\", \"node-name\": \"%s\", \"filename\": \"%s\", \"read-only\": %s}", node,
    path, read_only ? "true" : "false");
  harness_qmp_ok("blockdev-add", args);
}

void
harness_export(const char *export, guint64 size, const guint64 *ranges, const char *extra)
{
  g_autofree char *img_name = g_strconcat(export, ".img", NULL);
  g_autofree char *img = harness_image(img_name, size, ranges);
  g_autofree char *node = g_strconcat("n-", export, NULL);
  harness_add_node(node, img, FALSE);
  g_autofree char *args = g_strdup_printf(
    "{\"type\": \"nbd\", \"id\": \"%s\", \"node-name\": \"%s\", \"name\": \"%s\"%s%s}", export,
    node, export, extra ? ", " : "", extra ? extra : "");
  harness_qmp_ok("block-export-add", args);
}

void
harness_unexport(const char *export)
{
  g_autofree char *args = g_strdup_printf("{\"id\": \"%s\", \"mode\": \"hard\"}", export);
  harness_qmp_ok("block-export-del", args);
  harness_spin(20); /* let the deletion finish before the node goes */
  g_autofree char *node = g_strdup_printf("{\"node-name\": \"n-%s\"}", export);
  harness_qmp_ok("blockdev-del", node);
}

typedef struct {
  GThreadFunc fn;
  gpointer data;
  gint done;
} Job;

static gpointer
job_thread(gpointer p)
{
  Job *job = p;
  job->fn(job->data);
  g_atomic_int_set(&job->done, 1);
  g_main_context_wakeup(NULL);
  return NULL;
}

void
harness_run_client(GThreadFunc fn, gpointer data)
{
  Job job = { fn, data, 0 };
  GThread *t = g_thread_new("client", job_thread, &job);
  while (!g_atomic_int_get(&job.done))
    g_main_context_iteration(NULL, TRUE);
  g_thread_join(t);
  while (g_main_context_iteration(NULL, FALSE))
    ;
}

static gboolean
stop_spin(gpointer p)
{
  *(gboolean *)p = TRUE;
  return G_SOURCE_REMOVE;
}

void
harness_spin(guint ms)
{
  gboolean done = FALSE;
  g_timeout_add(ms, stop_spin, &done);
  while (!done)
    g_main_context_iteration(NULL, TRUE);
}

int
harness_connect_raw(void)
{
  int fd = cbt_socket_connect_unix(harness.sock, NULL);
  if (fd < 0)
    return -1;
  struct timeval tv = { .tv_sec = 10 };
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  return fd;
}

guint64
harness_rss_kib(void)
{
  g_autofree char *status = NULL;
  g_file_get_contents("/proc/self/status", &status, NULL, NULL);
  const char *p = status ? strstr(status, "VmRSS:") : NULL;
  return p ? g_ascii_strtoull(p + 6, NULL, 10) : 0;
}
