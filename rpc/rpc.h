/* rpc/ — the QMP server: framing, greeting, capabilities, schema validation, dispatch, events.
 *
 * rpc/ is generic: it knows the schema and the wire protocol, never bitmaps or NBD. Domain
 * modules hand it a table of handlers (cbt_rpc_register()); the dispatcher validates every
 * request against schemas/ before a handler runs, so a handler never sees a missing, unknown
 * or mistyped argument.
 *
 * Threads: everything here runs on the thread that owns the default GMainContext (the main
 * thread), except cbt_rpc_emit_event(), which any thread may call.
 */
#pragma once

#include <glib.h>
#include <json-glib/json-glib.h>

#include "schemas/qmp-types.h"

G_BEGIN_DECLS

/* QMP error classes. A handler's GError in CBT_RPC_ERROR becomes {"class": <class>, "desc":
 * message}; a GError of any other domain becomes a GenericError with its message. */
typedef enum {
  CBT_RPC_ERROR_GENERIC,           /* "GenericError" */
  CBT_RPC_ERROR_COMMAND_NOT_FOUND, /* "CommandNotFound" */
  CBT_RPC_ERROR_DEVICE_NOT_ACTIVE, /* "DeviceNotActive" */
  CBT_RPC_ERROR_DEVICE_NOT_FOUND,  /* "DeviceNotFound" */
} CbtRpcErrorClass;

#define CBT_RPC_ERROR (cbt_rpc_error_quark())
GQuark cbt_rpc_error_quark(void);
const char *cbt_rpc_error_class_name(CbtRpcErrorClass cls);
/* Sets a GenericError with a formatted message and returns FALSE, for handlers' early exits. */
gboolean cbt_rpc_fail(GError **error, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

typedef struct CbtRpc CbtRpc;

/* A command handler. @args has been validated against the command's schema (it is an empty
 * object when the request had none; optional members keep their absence, defaults are the
 * handler's to apply). Returns the "return" value (transfer full; an empty object for
 * commands without data), or NULL with @error set. */
typedef JsonNode *(*CbtRpcHandler)(JsonObject *args, gpointer user_data, GError **error);

typedef struct {
  const char *name;
  CbtRpcHandler handler;
} CbtRpcCommand;

/* Largest message a monitor accepts; a longer one closes that client's connection. */
#define CBT_RPC_MAX_MESSAGE (8u * 1024 * 1024)
/* Deepest JSON nesting accepted (QEMU's limit). */
#define CBT_RPC_MAX_DEPTH 1024

/* The surface version reported in the greeting and by query-version. */
#define CBT_RPC_QEMU_MAJOR 7
#define CBT_RPC_QEMU_MINOR 2
#define CBT_RPC_QEMU_MICRO 0

CbtRpc *cbt_rpc_new(GError **error);
void cbt_rpc_free(CbtRpc *rpc);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(CbtRpc, cbt_rpc_free)

/* Register @n handlers; each name must be a command of the schema. */
void cbt_rpc_register(CbtRpc *rpc, const CbtRpcCommand *cmds, gsize n, gpointer user_data);
/* FALSE with @error naming the first schema command that has no handler. */
gboolean cbt_rpc_check_complete(CbtRpc *rpc, GError **error);

/* Serve QMP on a socket listening at @addr (common/sockets.h: a unix socket's file is created,
 * replacing a stale socket, and removed at close). Each connected client is served
 * independently of every other. */
gboolean cbt_rpc_listen(CbtRpc *rpc, const CbtQmpSocketAddress *addr, gboolean pretty,
                        GError **error);
gboolean cbt_rpc_listen_unix(CbtRpc *rpc, const char *path, gboolean pretty, GError **error);
/* Stop listening and drop every client (the socket files are unlinked). Output not yet written
 * is lost: call cbt_rpc_flush() first for a clean exit. */
void cbt_rpc_close_all(CbtRpc *rpc);

/* Run the main context until every queued event has been delivered and every reply and event
 * has been written to its client (or the client has gone), at most @timeout_ms. For a clean
 * exit after `quit`; never call it from inside a handler. */
void cbt_rpc_flush(CbtRpc *rpc, guint timeout_ms);

/* Validate @args (may be NULL) for @command and run it outside any monitor: the command line
 * uses this so options and QMP share one path. With @keyval, string values are converted to the
 * schema's scalar types the way QEMU's keyval visitor does ("on"/"off", decimal numbers, size
 * suffixes). Returns the handler's result (transfer full) or NULL with @error set. */
JsonNode *cbt_rpc_execute(CbtRpc *rpc, const char *command, JsonObject *args, gboolean keyval,
                          GError **error);

/* Validate @value against schema type @type_name (with @keyval as above) and return the checked,
 * converted copy (transfer full), or NULL with @error set, in QEMU's words ("Parameter 'X' is
 * missing", …). For command-line options that are types rather than commands. */
JsonNode *cbt_rpc_check_type(CbtRpc *rpc, const char *type_name, JsonNode *value, gboolean keyval,
                             GError **error);

/* Queue event @name with @data (transfer full; NULL for none) to every negotiated client, with
 * the current timestamp. Thread-safe: delivery happens on the main context. */
void cbt_rpc_emit_event(CbtRpc *rpc, const char *name, JsonObject *data);
/* The same for every live CbtRpc: what the generated emitters (schemas/qmp-events.h) call.
 * Thread-safe. */
void cbt_rpc_broadcast_event(const char *name, JsonObject *data);

/* Helpers for handlers. */
JsonNode *cbt_rpc_empty_return(void);

/* A node the writer prints as the unsigned integer @value, exact above G_MAXINT64 (json-glib
 * has only gint64; see rpc/rpc-private.h for the form). Use it to return uint64 data.
 * Checked arguments of schema types uint64/size arrive as int nodes holding the 64-bit
 * pattern: read them with (guint64)json_node_get_int(). */
JsonNode *cbt_rpc_uint_new(guint64 value);

/* Parse exactly one JSON value as the monitor does (QEMU's extensions and error texts: single
 * quotes, "JSON parse error, ..."). @len -1: @text is NUL-terminated. */
JsonNode *cbt_rpc_json_parse(const char *text, gssize len, GError **error);

/* An option value as the command line gives it: a JSON object (parsed as the monitor does) when
 * it starts with '{' (then *is_json is TRUE), else QEMU's key=value syntax (common/keyval.h),
 * whose first element without '=' is the value of @implied_key. */
JsonObject *cbt_rpc_option_parse(const char *text, const char *implied_key, gboolean *is_json,
                                 GError **error);

/* @node as QMP prints it: ASCII only, ", "/": " separators; @pretty: 4-space indent, "\r\n"
 * line ends. No trailing line end. */
char *cbt_rpc_json_to_string(JsonNode *node, gboolean pretty);

G_END_DECLS
