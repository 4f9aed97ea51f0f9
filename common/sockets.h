/* common/sockets.h — stream sockets for every SocketAddress kind: listening (QMP monitors, the
 * NBD server) and connecting (cbtctl, the QMP client, tests), with one set of error texts,
 * QEMU's.
 *
 * A unix socket is bound and listening under a temporary name first and then renamed onto its
 * path, so a client that sees the path never gets "connection refused". A stale socket at the
 * path is replaced; any other kind of file is left alone (the bind then fails). Sockets are
 * created close-on-exec.
 *
 * Every call returns a descriptor (the caller closes it) or -1 with @error set.
 */
#pragma once

#include <glib.h>

#include "schemas/qmp-types.h"

G_BEGIN_DECLS

typedef enum {
  CBT_SOCKET_ALLOW_FD = 1 << 0, /* addr type fd: a decimal descriptor number of a listening
                                 * socket (the command line); otherwise refused, as over QMP */
} CbtSocketFlags;

/* A listening socket at @addr (backlog SOMAXCONN). */
int cbt_socket_listen(const CbtQmpSocketAddress *addr, CbtSocketFlags flags, GError **error);
/* The mode of every unix socket created from now on (0600 unless set: docs/user-guide.md,
 * "Limits and bad input"); it must keep read and write for the owner. Main thread, at start. */
#define CBT_SOCKET_DEFAULT_MODE 0600
void cbt_socket_set_unix_mode(guint mode);
/* A socket connected to @addr. */
int cbt_socket_connect(const CbtQmpSocketAddress *addr, GError **error);
/* The same for the common case of a unix socket at @path. */
int cbt_socket_connect_unix(const char *path, GError **error);

/* @legacy ({type, data}, as nbd-server-start takes it) seen as a flat SocketAddress: the branches
 * are the same structs. @view borrows @legacy's members: never free it. */
void cbt_socket_address_from_legacy(const CbtQmpSocketAddressLegacy *legacy,
                                    CbtQmpSocketAddress *view);
/* A unix SocketAddress for @path (transfer full). */
CbtQmpSocketAddress *cbt_socket_address_unix(const char *path);
/* The socket file a listener at @addr created (NULL for other kinds and abstract sockets). */
const char *cbt_socket_address_path(const CbtQmpSocketAddress *addr);
/* TRUE for TCP sockets (inet), which want TCP_NODELAY and keep-alive. */
gboolean cbt_socket_is_inet(int fd);

/* Socket options of an accepted connection. */
void cbt_socket_set_nodelay(int fd);
void cbt_socket_set_send_buffer(int fd, int bytes);
/* Sends block at most @ms (0: for ever). */
void cbt_socket_set_send_timeout(int fd, guint ms);

G_END_DECLS
