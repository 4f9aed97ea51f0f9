/* rpc/ internals shared between its files; nothing here is visible outside rpc/. */
#pragma once

#include "rpc/rpc.h"
#include "common/assert.h"

#include <gio/gio.h>

G_BEGIN_DECLS

/* ---- json-parse.c: QEMU-compatible streaming JSON reader ---------------------------------- */

/* Errors of the JSON reader, domain CBT_JSON_ERROR. TOO_BIG means the connection must close. */
#define CBT_JSON_ERROR (cbt_json_error_quark())
GQuark cbt_json_error_quark(void);
enum { CBT_JSON_ERROR_PARSE, CBT_JSON_ERROR_TOO_BIG };

typedef struct CbtJsonStream CbtJsonStream;

/* Called once per complete top-level value: @value (transfer full) or @error (transfer full),
 * never both. */
typedef void (*CbtJsonEmitFunc)(JsonNode *value, GError *error, gpointer user_data);

CbtJsonStream *cbt_json_stream_new(gsize max_message, CbtJsonEmitFunc emit, gpointer user_data);
void cbt_json_stream_free(CbtJsonStream *js);
/* Feed bytes; values are emitted synchronously from inside this call. */
void cbt_json_stream_feed(CbtJsonStream *js, const char *buf, gsize len);
/* End of input: finish a pending number or keyword and parse what is left. */
void cbt_json_stream_flush(CbtJsonStream *js);

/* ---- Numbers: uint64 values above INT64_MAX ------------------------------------------------
 * json-glib only has gint64, and every other spare bit of a JsonNode is used by json-glib
 * itself (json_parser_new_immutable() seals nodes), so such a value is stored as a string node
 * holding "\xFF" and the decimal digits. No valid UTF-8 string starts with 0xFF, so the form
 * cannot collide with a real string; the writer prints it as a bare number, the validator
 * treats it as a number. Checked uint64/size arguments are plain int nodes holding the 64-bit
 * pattern instead, so handlers read them with (guint64)json_node_get_int(). */
JsonNode *cbt_json_uint_new(guint64 v);
/* TRUE (and the value) if @node is the big unsigned form above. */
gboolean cbt_json_get_big_uint(JsonNode *node, guint64 *value);

/* ---- json-write.c ------------------------------------------------------------------------- */

/* Append @node as QEMU prints it: ASCII only, ", " and ": " separators; @pretty indents by 4
 * with "\r\n" line ends. Non-finite doubles print as null (QEMU would print invalid "inf"). */
void cbt_json_write(GString *out, JsonNode *node, gboolean pretty);
char *cbt_json_to_string(JsonNode *node, gboolean pretty);

/* The member names of @obj in the order QEMU's QDict iterates them (its hash buckets in
 * ascending order, the newest member first within a bucket): the writer prints members in this
 * order, so output is byte-identical to QEMU's, and the request checks meet problems in QEMU's
 * order. Free the array only (names belong to @obj). */
const char **cbt_json_qdict_order(JsonObject *obj, guint *n);

/* Modified UTF-8 decoding as QEMU does it (U+0000 is "\xC0\x80"): code point or -1; *end is
 * set past the sequence. */
int cbt_json_utf8_decode(const char *s, const char **end);
gboolean cbt_json_codepoint_valid(int cp);

/* ---- schema.c: the schema model and argument validation ----------------------------------- */

typedef enum {
  CBT_TYPE_BUILTIN,
  CBT_TYPE_ENUM,
  CBT_TYPE_STRUCT,
  CBT_TYPE_UNION,
  CBT_TYPE_ALTERNATE,
  CBT_TYPE_ARRAY,
} CbtTypeKind;

typedef enum {
  CBT_BUILTIN_STR,
  CBT_BUILTIN_INT,
  CBT_BUILTIN_INT8,
  CBT_BUILTIN_INT16,
  CBT_BUILTIN_INT32,
  CBT_BUILTIN_INT64,
  CBT_BUILTIN_UINT8,
  CBT_BUILTIN_UINT16,
  CBT_BUILTIN_UINT32,
  CBT_BUILTIN_UINT64,
  CBT_BUILTIN_SIZE,
  CBT_BUILTIN_NUMBER,
  CBT_BUILTIN_BOOL,
  CBT_BUILTIN_NULL,
  CBT_BUILTIN_ANY,
} CbtBuiltin;

typedef struct CbtSchemaType CbtSchemaType;

typedef struct {
  char *name;
  gboolean optional;
  CbtSchemaType *type;
  char **features;
} CbtSchemaMember;

typedef struct {
  char *name;          /* union: the discriminator value; alternate: the branch name */
  CbtSchemaType *type; /* union: a struct, or NULL for a value without members */
} CbtSchemaVariant;

struct CbtSchemaType {
  CbtTypeKind kind;
  char *name;
  char **features;
  CbtBuiltin builtin;     /* BUILTIN */
  char **values;          /* ENUM */
  GPtrArray *members;     /* STRUCT, UNION: CbtSchemaMember*, base members first */
  char *discriminator;    /* UNION */
  GPtrArray *variants;    /* UNION, ALTERNATE: CbtSchemaVariant* */
  CbtSchemaType *element; /* ARRAY */
  int intro_id;           /* introspection number, -1 until assigned */
};

typedef struct {
  char *name;
  gboolean is_event;
  CbtSchemaType *args; /* STRUCT or UNION, or NULL when there are no arguments */
  CbtSchemaType *ret;  /* NULL: returns {} (events: unused) */
  char **features;
} CbtSchemaCommand;

typedef struct {
  GHashTable *types;    /* name -> CbtSchemaType* (owned) */
  GPtrArray *entities;  /* CbtSchemaCommand*, commands and events in schema order (owned) */
  GHashTable *commands; /* name -> CbtSchemaCommand* */
  GHashTable *events;   /* name -> CbtSchemaCommand* */
  CbtSchemaType *empty; /* the empty object type */
} CbtSchema;

CbtSchema *cbt_schema_load(const char *json_text, GError **error);
void cbt_schema_free(CbtSchema *schema);
CbtSchemaType *cbt_schema_lookup_type(CbtSchema *schema, const char *name);

/* Check @value (NULL: absent at the top, treated as {}) against @type; returns the checked
 * copy with keyval strings converted, or NULL with a QEMU-worded GError (CBT_RPC_ERROR,
 * GENERIC). */
JsonNode *cbt_schema_check(CbtSchemaType *type, JsonNode *value, gboolean keyval, GError **error);

/* ---- introspect.c ------------------------------------------------------------------------- */

/* query-qmp-schema's return value (SchemaInfo list), built once per schema. */
JsonNode *cbt_introspect_build(CbtSchema *schema);

/* ---- server.c, builtins.c, dispatch.c, events.c: the server object --------------------- */

typedef struct CbtRpcMonitors CbtRpcMonitors;

typedef struct {
  CbtRpcHandler handler;
  gpointer user_data;
} CbtRpcEntry;

struct CbtRpc {
  CbtSchema *schema;
  GHashTable *handlers;    /* command name -> CbtRpcEntry* */
  JsonNode *introspection; /* cached query-qmp-schema result */
  GMainContext *context;   /* where monitors run and events are delivered */
  CbtRpcMonitors *monitors;
  GMutex event_lock;  /* protects the two fields below (any thread emits) */
  GQueue event_queue; /* JsonNode* events not yet delivered */
  GSource *event_source;
};

#define CBT_RPC_NEGOTIATION_CMD "qmp_capabilities"

/* builtins.c: the commands rpc/ implements itself. */
extern const CbtRpcCommand cbt_rpc_builtin_commands[];
extern const gsize cbt_rpc_n_builtin_commands;

/* A command of the schema that has a handler, or NULL. */
CbtSchemaCommand *cbt_rpc_find_command(CbtRpc *rpc, const char *name, CbtRpcEntry **entry);
/* Validate @args (NULL: none) for @cmd, then call its handler. */
JsonNode *cbt_rpc_run_command(CbtRpc *rpc, CbtSchemaCommand *cmd, CbtRpcEntry *entry,
                              JsonNode *args, gboolean keyval, GError **error);
/* events.c: TRUE while events wait for delivery. */
gboolean cbt_rpc_events_pending(CbtRpc *rpc);
/* events.c: join and leave the set of servers that cbt_rpc_broadcast_event() reaches. */
void cbt_rpc_events_attach(CbtRpc *rpc);
void cbt_rpc_events_detach(CbtRpc *rpc);

/* cbt_rpc_new() with another schema (tests). */
CbtRpc *cbt_rpc_new_with_schema(const char *schema_json, GError **error);

/* A node owning @obj. */
JsonNode *cbt_json_object_node(JsonObject *obj);

/* Per-connection protocol state. */
typedef struct {
  gboolean negotiated;
  gboolean oob;
} CbtRpcSession;

/* Answer one parsed request (or parse error) from a monitor: returns the reply object
 * (transfer full). */
JsonNode *cbt_rpc_dispatch(CbtRpc *rpc, CbtRpcSession *session, JsonNode *request);
JsonNode *cbt_rpc_error_reply(const GError *error, JsonNode *id);

/* ---- monitor.c ---------------------------------------------------------------------------- */

CbtRpcMonitors *cbt_rpc_monitors_new(CbtRpc *rpc, GMainContext *context);
void cbt_rpc_monitors_free(CbtRpcMonitors *mons);
gboolean cbt_rpc_monitors_listen(CbtRpcMonitors *mons, const CbtQmpSocketAddress *addr,
                                 gboolean pretty, GError **error);
void cbt_rpc_monitors_close_all(CbtRpcMonitors *mons);
/* TRUE while some client has output queued or being written. */
gboolean cbt_rpc_monitors_busy(CbtRpcMonitors *mons);
/* Send @event (an event object) to every negotiated client; main context only. */
void cbt_rpc_monitors_broadcast(CbtRpcMonitors *mons, JsonNode *event);

/* The greeting object (transfer full). */
JsonNode *cbt_rpc_greeting(void);

G_END_DECLS
