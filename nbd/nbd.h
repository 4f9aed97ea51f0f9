/* nbd/ — the NBD server: listener, handshake, meta contexts, transmission, exports, and the
 * nbd-server-* / block-export-* commands.
 *
 * Protocol behaviour follows the NBD protocol (doc/proto.md of the NBD project), with the choices
 * docs/nbd-server.md lists; the QMP side copies qemu-storage-daemon 7.2 (argument names, error
 * texts, BLOCK_EXPORT_DELETED).
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
#include "schemas/qmp-types.h"

G_BEGIN_DECLS

/* cmds.c -------------------------------------------------------------------------------------- */

/* `--nbd-server` on the command line: nbd-server-start with a flat SocketAddress. Unlike the QMP
 * command, addr.type=fd takes a decimal file descriptor number here (as qsd does outside a
 * monitor). `--export` needs nothing special: it runs block-export-add through cbt_rpc_execute().
 */
gboolean cbt_nbd_server_start_options(const CbtQmpNbdServerOptions *opts, GError **error);

/* systemd socket activation: serve on an already listening socket (the daemon passes fd 3 when
 * LISTEN_PID is its pid and LISTEN_FDS is 1). The server takes ownership of @listen_fd. Fails with
 * "NBD server already running" when a server exists. */
gboolean cbt_nbd_server_start_fd(int listen_fd, GError **error);

/* quit / SIGTERM: delete every export (BLOCK_EXPORT_DELETED for each, in creation order), drop all
 * clients, wait for their threads, stop the server. Safe to call when nothing runs. Call it before
 * cbt_blockdev_close_all(). */
void cbt_nbd_shutdown(void);

/* export.c ------------------------------------------------------------------------------------ */

/* Create an export (block-export-add, type nbd) with qsd's checks and texts, in qsd's order. */
gboolean cbt_nbd_export_add(const CbtQmpBlockExportOptions *opts, GError **error);
/* block-export-del: safe mode refuses while clients are attached ("export 'X' still in use");
 * hard mode disconnects them. BLOCK_EXPORT_DELETED is emitted once the last client is gone. */
gboolean cbt_nbd_export_del(const char *id, gboolean hard, GError **error);

/* server.c ------------------------------------------------------------------------------------ */

/* A client that has not finished the handshake after this long is dropped. Default 10 s; the
 * environment variable CBTD_NBD_HANDSHAKE_TIMEOUT_MS overrides it at server start (for tests). */
void cbt_nbd_set_handshake_timeout(guint ms);
/* How long a connection thread waits for the next client before it ends (default 10 s). The
 * fuzzers keep them: LeakSanitizer, checking after each input, can take the per-thread state
 * GLib frees as a thread ends for a leak. */
void cbt_nbd_set_spare_wait(gint64 us);

G_END_DECLS
