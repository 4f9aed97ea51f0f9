/* nbd/ — the NBD server: listener, handshake, meta contexts, transmission, exports, and the
 * nbd-server-* / block-export-* commands.
 *
 * Protocol behaviour follows shared/reference/nbd-server.md; the QMP side copies
 * qemu-storage-daemon 7.2 (argument names, error texts, BLOCK_EXPORT_DELETED).
 *
 * Threads: every function here runs on the main thread (the thread that owns the default
 * GMainContext). Each client connection has a reader thread (blocking I/O) that validates
 * requests, serves those that cannot block itself and hands the rest to up to 8 per-connection
 * workers (at most 64 requests in flight); replies go out whole under a per-connection send lock
 * as requests complete. The main thread only accepts connections and does export bookkeeping,
 * and never waits on a client socket.
 * Exports are served from blockdev/ between cbt_blockdev_io_begin() and cbt_blockdev_io_end(), so
 * a drain of the node stops NBD I/O too.
 */
#pragma once

#include <glib.h>
#include <json-glib/json-glib.h>
#include "bitmap/bitmap.h"
#include "blockdev/blockdev.h"
#include "rpc/rpc.h"

G_BEGIN_DECLS

/* cmds.c -------------------------------------------------------------------------------------- */

/* Register nbd-server-start/-stop, block-export-add/-del, query-block-exports and the deprecated
 * nbd-server-add/-remove. @rpc is kept (it must outlive the NBD server) to emit
 * BLOCK_EXPORT_DELETED; without a call here no event is emitted. */
void cbt_nbd_register_commands(CbtRpc *rpc);

/* `--nbd-server` on the command line: @opts is an NbdServerOptions object already checked by
 * cbt_rpc_check_type(rpc, "NbdServerOptions", ..., TRUE) (flat SocketAddress in `addr`). Unlike the
 * QMP command, addr.type=fd takes a decimal file descriptor number here (as qsd does outside a
 * monitor). `--export` needs nothing special: run "block-export-add" through cbt_rpc_execute(). */
gboolean cbt_nbd_server_start_options(JsonObject *opts, GError **error);

/* systemd socket activation: serve on an already listening socket (the daemon passes fd 3 when
 * LISTEN_PID is its pid and LISTEN_FDS is 1). The server takes ownership of @listen_fd. Fails with
 * "NBD server already running" when a server exists. */
gboolean cbt_nbd_server_start_fd(int listen_fd, GError **error);

/* quit / SIGTERM: delete every export (BLOCK_EXPORT_DELETED for each, in creation order), drop all
 * clients, wait for their threads, stop the server. Safe to call when nothing runs. Call it before
 * cbt_blockdev_close_all(). */
void cbt_nbd_shutdown(void);

/* export.c ------------------------------------------------------------------------------------ */

/* One entry of an export's `bitmaps` list: @node is NULL for the plain-name form. */
typedef struct {
  const char *node;
  const char *name;
} CbtNbdBitmapRef;

/* What block-export-add (type nbd) and nbd-server-add accept, already defaulted by the caller:
 * @name NULL means "the node name". @bitmaps may be NULL when @n_bitmaps is 0. */
typedef struct {
  const char *id;
  const char *node_name;
  const char *name;
  const char *description;
  gboolean writable;
  gboolean writethrough;
  gboolean allocation_depth;
  const char *iothread;
  const CbtNbdBitmapRef *bitmaps;
  gsize n_bitmaps;
} CbtNbdExportOptions;

/* Create an export with qsd's checks and texts, in qsd's order. */
gboolean cbt_nbd_export_add(const CbtNbdExportOptions *opts, GError **error);
/* block-export-del: safe mode refuses while clients are attached ("export 'X' still in use");
 * hard mode disconnects them. BLOCK_EXPORT_DELETED is emitted once the last client is gone. */
gboolean cbt_nbd_export_del(const char *id, gboolean hard, GError **error);

/* Dirty-bitmap contexts (issue 4). The bitmap commands install these hooks; without them a
 * non-empty `bitmaps` list fails with "Bitmap 'X' is not found".
 *
 * lookup: resolve @name on @node (plain form: @node_name is NULL and the lookup may descend the
 * way qsd does; pair form: @node_name names the node and @node is that node), check it may be
 * exported (busy, inconsistent, "Enabled bitmap 'X' incompatible with readonly export" when
 * @readonly_export) and mark it busy. Returns the bitmap (owned by the bitmap layer, valid until
 * release) or NULL with @error set in qsd's words.
 * release: the export is gone (or its creation failed after lookup): clear busy. */
typedef CbtBitmap *(*CbtNbdBitmapLookup)(CbtBlockdev *node, const char *node_name, const char *name,
                                         gboolean readonly_export, GError **error);
typedef void (*CbtNbdBitmapRelease)(CbtBitmap *bm);
void cbt_nbd_set_bitmap_hooks(CbtNbdBitmapLookup lookup, CbtNbdBitmapRelease release);

/* server.c ------------------------------------------------------------------------------------ */

/* A client that has not finished the handshake after this long is dropped. Default 10 s; the
 * environment variable CBTD_NBD_HANDSHAKE_TIMEOUT_MS overrides it at server start (for tests). */
void cbt_nbd_set_handshake_timeout(guint ms);

G_END_DECLS
