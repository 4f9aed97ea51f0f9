/* common/qmp-client.h — a small blocking QMP client: for cbtctl, the benchmarks, tests' C
 * harnesses and backup clients, against cbtd or any QMP server (qemu-storage-daemon).
 *
 * A connection reads the greeting, negotiates capabilities (unless asked not to), then runs one
 * command at a time: cbt_qmp_client_call() sends it and waits for its reply. Events that arrive
 * meanwhile are queued in arrival order for cbt_qmp_client_next_event(), which also waits for
 * one. An error reply becomes a GError in CBT_QMP_CLIENT_ERROR whose code says the QMP class and
 * whose message is the server's desc; cbt_qmp_client_error_class() names the class. Messages are
 * framed by their JSON (a monitor with pretty=on spreads one over many lines).
 *
 * Threads: a client belongs to one thread at a time.
 */
#pragma once

#include <glib.h>
#include <json-glib/json-glib.h>

#include "schemas/qmp-types.h"

G_BEGIN_DECLS

#define CBT_QMP_CLIENT_ERROR (cbt_qmp_client_error_quark())
GQuark cbt_qmp_client_error_quark(void);
/* The error classes of QMP, and what went wrong below it. */
typedef enum {
  CBT_QMP_CLIENT_ERROR_GENERIC,           /* class GenericError */
  CBT_QMP_CLIENT_ERROR_COMMAND_NOT_FOUND, /* class CommandNotFound */
  CBT_QMP_CLIENT_ERROR_DEVICE_NOT_ACTIVE, /* class DeviceNotActive */
  CBT_QMP_CLIENT_ERROR_DEVICE_NOT_FOUND,  /* class DeviceNotFound */
  CBT_QMP_CLIENT_ERROR_OTHER_CLASS,       /* another class (cbt_qmp_client_error_class()) */
  CBT_QMP_CLIENT_ERROR_PROTOCOL,          /* not QMP: a message that is not an object, ... */
  CBT_QMP_CLIENT_ERROR_IO,                /* connection lost, timed out */
} CbtQmpClientError;

typedef struct CbtQmpClient CbtQmpClient;

/* Connect to @addr (common/sockets.h) and read the greeting; negotiate capabilities when
 * @negotiate. @timeout_ms bounds every later wait for the server (0: none). */
CbtQmpClient *cbt_qmp_client_connect(const CbtQmpSocketAddress *addr, gboolean negotiate,
                                     guint timeout_ms, GError **error);
CbtQmpClient *cbt_qmp_client_connect_unix(const char *path, gboolean negotiate, guint timeout_ms,
                                          GError **error);
void cbt_qmp_client_free(CbtQmpClient *c);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(CbtQmpClient, cbt_qmp_client_free)

/* The greeting object (owned by @c). */
JsonObject *cbt_qmp_client_greeting(CbtQmpClient *c);

/* Run @command with @args (may be NULL) and return its "return" value (transfer full), or NULL
 * with @error set: the QMP error (CBT_QMP_CLIENT_ERROR, the class as code, desc as message) or
 * a connection failure. */
JsonNode *cbt_qmp_client_call(CbtQmpClient *c, const char *command, JsonObject *args,
                              GError **error);
/* Send @request as it is (an object: "execute", "arguments", "id", ...) and return the whole
 * reply (transfer full; it may be an error reply), or NULL when the connection failed. */
JsonObject *cbt_qmp_client_request(CbtQmpClient *c, JsonObject *request, GError **error);
/* The oldest event not yet taken, waiting up to @timeout_ms (0: only those already queued)
 * for one to arrive. Transfer full; NULL with @error set on timeout or failure. */
JsonObject *cbt_qmp_client_next_event(CbtQmpClient *c, guint timeout_ms, GError **error);

/* The QMP class ("GenericError", ...) of the last error reply cbt_qmp_client_call() turned into
 * a GError (owned by @c), or NULL before any. */
const char *cbt_qmp_client_error_class(CbtQmpClient *c);

G_END_DECLS
