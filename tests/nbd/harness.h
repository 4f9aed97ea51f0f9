/* tests/nbd/harness.h — an in-process NBD server for the nbd/ tests.
 *
 * The test's main thread owns the default GMainContext (it runs the commands and the server's
 * accept source); each client runs on its own thread through harness_run_client(), while the main
 * thread iterates the main loop.
 */
#pragma once

#include <glib.h>
#include <json-glib/json-glib.h>
#include "bitmap/bitmap.h"
#include "rpc/rpc.h"

typedef struct {
  char *dir;  /* temporary directory, removed by harness_fini() */
  char *sock; /* the NBD server's unix socket */
  char *uri;  /* nbd+unix:///?socket=... for the default export */
  CbtRpc *rpc;
} Harness;

extern Harness harness;

/* Create the temp dir, the RPC instance with blockdev and nbd commands, and start the server. */
void harness_init(void);
void harness_fini(void);

/* Run @command with @json_args (a JSON object text, or NULL). Returns the return value, or NULL
 * with @error set. */
JsonNode *harness_qmp(const char *command, const char *json_args, GError **error);
/* Same, asserting success. */
void harness_qmp_ok(const char *command, const char *json_args);
/* Same, asserting failure with exactly @desc. */
void harness_qmp_fails(const char *command, const char *json_args, const char *desc);

/* A sparse image file of @size bytes in the temp dir with (offset, len, byte) data ranges
 * terminated by len 0; returns its path (transfer full). */
char *harness_image(const char *name, guint64 size, const guint64 *ranges);
/* blockdev-add a file node @node over @path. */
void harness_add_node(const char *node, const char *path, gboolean read_only);
/* A fresh node over a fresh image, exported as @export (block-export-add id = @export). */
void harness_export(const char *export, guint64 size, const guint64 *ranges, const char *extra);
void harness_unexport(const char *export);

/* Run @fn(@data) on a new thread while the main thread serves the main loop. */
void harness_run_client(GThreadFunc fn, gpointer data);
/* Iterate the main loop for about @ms milliseconds. */
void harness_spin(guint ms);

/* Dirty bitmaps the test owns, found by name through the test double of
 * cbt_dirty_bitmaps_export_lookup() (harness.c). */
void harness_add_bitmap(const char *name, CbtBitmap *bm);
guint harness_bitmap_releases(void);

/* Connect a raw socket to the server; -1 on failure. */
int harness_connect_raw(void);
/* Resident set size of this process in KiB. */
guint64 harness_rss_kib(void);
